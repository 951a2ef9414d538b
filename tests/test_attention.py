"""Attention layers compress: a Flax MultiHeadDotProductAttention transformer block (Linen) and its
nnx.MultiHeadAttention twin, every projection (query, key, value, out) and the MLP, with ExactOBS
50%, GPTQ 4-bit and 2:4 SparseGPT; the params go back into the model and save/load exactly."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from obcjax import export
from obcjax.calibration import calibrate
from obcjax.layout import layout_for, to_matrices
from obcjax.specs import NM, Int, Unstructured
from obcjax.stats import hessian_finalize
from obcjax.transforms import compress

D, HEADS, T = 32, 4, 6
LAYERS = ["attn/query", "attn/key", "attn/value", "attn/out", "fc1", "fc2"]


class LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.MultiHeadDotProductAttention(num_heads=HEADS, qkv_features=D, name="attn")(x)
        x = x + h
        h = nn.gelu(nn.Dense(2 * D, name="fc1")(x))
        return x + nn.Dense(D, name="fc2")(h)


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.attn = nnx.MultiHeadAttention(num_heads=HEADS, in_features=D, qkv_features=D,
                                           decode=False, rngs=rngs)
        self.fc1 = nnx.Linear(D, 2 * D, rngs=rngs)
        self.fc2 = nnx.Linear(2 * D, D, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(x)
        return x + self.fc2(nnx.gelu(self.fc1(x)))


def _batches():
    # correlated features with a decaying spectrum, as real activations have (on white noise
    # every method is close to magnitude)
    r = np.random.default_rng(0)
    A = np.linalg.qr(r.normal(size=(D, D)))[0] / np.sqrt(1.0 + np.arange(D))[:, None]
    return [(r.normal(size=(16, T, D)) @ A * 4).astype(np.float32) for _ in range(4)]


def _setup(flavour):
    if flavour == "linen":
        model = LinenBlock()
        variables = model.init(jax.random.key(0), _batches()[0])
        stats = calibrate(model, variables, _batches(), layer_types=("Dense", "DenseGeneral"))
        params = variables["params"]

        def apply(p, x):
            return model.apply({"params": p}, x)

    else:
        model = NNXBlock(nnx.Rngs(0))
        stats = calibrate(model, None, _batches(), layer_types=("Dense", "DenseGeneral"))
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        graphdef, state = nnx.split(model)

        def apply(p, x):
            st = nnx.state(model)
            nnx.replace_by_pure_dict(st, p)
            return nnx.merge(graphdef, st)(x)

    return params, stats, apply


RECIPES = {
    "exactobs_50": (Unstructured(0.5), None, "obc"),
    "gptq_w4": (None, Int(4), "gptq"),
    "sparsegpt_2of4": (NM(2, 4), None, "gptq"),
}


def _leaf(tree, path):
    for p in path.split("/"):
        tree = tree[p]
    return tree


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_attention_block_compresses_saves_and_loads(flavour, tmp_path):
    params, stats, apply = _setup(flavour)
    assert set(LAYERS) <= set(stats), sorted(stats)
    x = _batches()[0]
    dense_out = np.asarray(apply(params, x))
    for name, (prune, quant, solver) in RECIPES.items():
        c = compress(params, stats, [(".*", (prune, quant))], solver=solver)
        assert sorted(c.specs) == sorted(LAYERS), name
        for path in LAYERS:
            k = np.asarray(_leaf(c.params, path)["kernel"])
            assert k.shape == np.shape(_leaf(params, path)["kernel"])
            cols = hessian_finalize(stats[path]).shape[-1]
            W = to_matrices(k, layout_for(k.shape, cols, layer=path))[0]
            if isinstance(prune, Unstructured):
                assert int((k == 0).sum()) == int(np.floor(0.5 * k.size + 0.5)), (name, path)
            if isinstance(prune, NM):
                # exactly 2 zeros in every 4 consecutive inputs of each output unit
                zeros = (W == 0).reshape(W.shape[0], -1, 4).sum(-1)
                assert (zeros == 2).all(), (name, path)
            if quant is not None:
                q = c.qarray(path)  # kernel layout: dequantizes to the kernel itself
                assert q.codes.shape == k.shape and q.layout == c.layouts[path]
                np.testing.assert_array_equal(np.asarray(q.dequantize()), k)
                np.testing.assert_array_equal(np.asarray(q.as_matrix().dequantize()), W)
                assert int(np.asarray(q.codes).max()) <= 15
        # the compressed params run in the model and stay close to dense
        out = np.asarray(apply(c.params, x))
        rel = np.linalg.norm(out - dense_out) / np.linalg.norm(dense_out)
        assert np.isfinite(out).all() and rel < 0.5, (name, rel)
        # OBS beats magnitude on the layers' own losses, by a wide margin
        if solver == "obc":
            m = compress(params, stats, [(".*", (prune, quant))], solver="magnitude")
            assert sum(c.losses.values()) < 0.8 * sum(m.losses.values())
        # save and load exactly
        path = os.path.join(tmp_path, f"{name}.safetensors")
        export.save_params(path, c.params, export.pack_compressed(c))
        back = export.load_params(path, like=c.params)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(c.params), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert np.array_equal(np.asarray(apply(jax.tree.map(jnp.asarray, back), x)), out)
