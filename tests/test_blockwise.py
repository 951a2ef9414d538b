"""Block-wise sequential compression (obcjax.blockwise): equal to whole-model sequential mode,
forward passes linear in depth, Linen and NNX, offloading, data-parallel calibration, errors."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from obcjax.blockwise import compress_blockwise, device_memory, find_blocks
from obcjax.pipeline import compress_sequential
from obcjax.specs import NM, Int, Unstructured
from obcjax.transforms import LayerSpec
from obcjax.zoo import llama as L

BLOCKS = r"layers_\d+"


def _tokens(n=2, b=4, s=16, vocab=32):
    return L.token_batches(L.markov_chain(vocab, seed=0), n_batches=n, batch_size=b, seq_len=s,
                           seed=1)


def _mask(c, p):
    return np.asarray(c.mask(p)) if hasattr(c, "mask") else np.asarray(c.masks[p])


def _codes(c, p):
    q = c.qarray(p) if hasattr(c, "qarray") else c.qarrays[p]
    qs = q if isinstance(q, list) else [q]
    return np.concatenate([np.asarray(x.codes).ravel() for x in qs])


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ----------------------------------------------------------------------------- equality


@pytest.mark.slow  # whole-model sequential reruns the depth-8 model 33 times (~1-5 min on 2 cores)
def test_decoder_depth8_equals_whole_model_sequential():
    """Depth-8 Llama decoder, a 2:4 SparseGPT group (q/k share the input), then GPTQ 4-bit on
    o_proj (input depends on the compressed q/k) and down_proj (on everything before)."""
    model = L.llama(vocab=32, dim=16, depth=8, heads=2, hidden=32, seed=0)
    tokens = _tokens()
    rules = [(r".*attn/[qk]_proj", LayerSpec(prune=NM(2, 4), solver="gptq")),
             (r".*attn/o_proj|.*mlp/down_proj", LayerSpec(quant=Int(4), solver="gptq")),
             (".*", None)]
    out = compress_blockwise(model, None, tokens, rules, blocks=BLOCKS)
    ref = compress_sequential(model, None, tokens, rules)
    assert sorted(out.specs) == sorted(ref.specs) and len(out.specs) == 8 * 4
    for p, spec in out.specs.items():
        if spec.prune is not None:
            np.testing.assert_array_equal(_mask(out.compressed, p), _mask(ref, p), err_msg=p)
        else:
            agree = np.mean(_codes(out.compressed, p) == _codes(ref, p))
            assert agree >= 0.99, (p, agree)  # round-off may move a code at a rounding tie
    for a, b in zip(_leaves(out.params), _leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * max(1.0, np.abs(b).max()))
    # the groups GPTQ uses, in forward order
    assert out.blocks[0]["groups"] == [["attn/q_proj", "attn/k_proj"], ["attn/o_proj"],
                                       ["mlp/down_proj"]]


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, scale):
        h = nn.relu(nn.Dense(12, name="fc1")(x)) * scale
        return x + nn.Dense(x.shape[-1], name="fc2")(h)


class _Stack(nn.Module):
    depth: int = 3

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(8, name="stem")(x)
        for i in range(self.depth):
            x = _Block(name=f"block{i}")(x, jnp.float32(0.5))
        return nn.Dense(3, name="head")(x)


def test_linen_stack_equals_whole_model_sequential():
    x = np.random.default_rng(0).normal(size=(96, 6)).astype(np.float32)
    model = _Stack(3)
    v = model.init(jax.random.key(0), x)
    batches = [x[:48], x[48:]]
    rules = [("stem|head", None), (".*", Unstructured(0.5))]
    out = compress_blockwise(model, v, batches, rules, blocks=r"block\d")
    ref = compress_sequential(model, v, batches, rules)
    assert [b["path"] for b in out.blocks] == ["block0", "block1", "block2"]
    for p in ref.specs:
        np.testing.assert_array_equal(_mask(out.compressed, p), _mask(ref, p), err_msg=p)
    for a, b in zip(_leaves(out.params), _leaves(ref.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # the compressed params run in the model; a list of paths names the same blocks
    assert model.apply({"params": out.params}, x).shape == (96, 3)
    assert find_blocks(model, v, x[:2], ["block1", "block0"]) == ["block0", "block1"]


# ----------------------------------------------------------------------------- forward counts

_CALLS = [0]


def _count(_):
    _CALLS[0] += 1


class _CBlock(nnx.Module):
    """A block that counts its executions (a host callback on its output: never dead code)."""

    def __init__(self, d, rngs):
        self.fc1 = nnx.Linear(d, d, rngs=rngs)
        self.fc2 = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        y = x + self.fc2(nnx.relu(self.fc1(x)))
        jax.debug.callback(_count, y.sum())
        return y


class _CStack(nnx.Module):
    def __init__(self, depth, d=8):
        rngs = nnx.Rngs(0)
        self.depth = depth
        for i in range(depth):
            setattr(self, f"b{i}", _CBlock(d, rngs))

    def __call__(self, x):
        for i in range(self.depth):
            x = getattr(self, f"b{i}")(x)
        return x


def _executions(fn):
    _CALLS[0] = 0
    fn()
    jax.effects_barrier()
    return _CALLS[0]


def test_forward_passes_linear_in_depth():
    x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    batches = [x[:32], x[32:]]
    rules = [(".*", Int(4))]
    blockwise, sequential = {}, {}
    for depth in (2, 4, 8):
        m = _CStack(depth)
        blockwise[depth] = _executions(lambda m=m: compress_blockwise(
            m, None, batches, rules, blocks=r"b\d", solver="gptq"))
    for depth in (2, 4):
        m = _CStack(depth)
        sequential[depth] = _executions(lambda m=m: compress_sequential(
            m, None, batches, rules, solver="gptq"))
    # block-wise: 1 capture pass (every block) + per block 2 groups + 1 forward, per batch
    for depth, n in blockwise.items():
        assert n == len(batches) * depth * (1 + 2 + 1), (depth, n)
    # whole-model sequential: one full pass per layer (2 per block), plus one pass over the
    # first batch to find the layer order: quadratic in depth
    for depth, n in sequential.items():
        assert n == depth * (len(batches) * 2 * depth + 1), (depth, n)
    assert blockwise[8] == 2 * blockwise[4] == 4 * blockwise[2]
    assert sequential[4] > 3.5 * sequential[2]


# ----------------------------------------------------------------------------- offload, mesh


def test_offload_same_result_less_device_memory():
    model = L.llama(vocab=32, dim=16, depth=2, heads=2, hidden=32, seed=0)
    tokens = _tokens(n=16, b=8, s=32)
    rules = [("lm_head", None), (".*", Int(4))]
    kw = dict(blocks=BLOCKS, solver="gptq", track_error=True)
    on = compress_blockwise(model, None, tokens, rules, offload=True, **kw)
    off = compress_blockwise(model, None, tokens, rules, offload=False, **kw)
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(on.params))
    for a, b in zip(_leaves(on.params), _leaves(off.params), strict=True):
        np.testing.assert_array_equal(a, b)
    assert [b["rel_error"] for b in on.blocks] == [b["rel_error"] for b in off.blocks]
    assert all(0 < b["rel_error"] < 1 for b in on.blocks)
    # two activation caches (compressed + dense) of 16 batches stay on the host
    cache = 2 * 16 * 8 * 32 * 16 * 4
    if on.memory["source"] == "live_arrays":
        assert on.memory["added_peak_bytes"] < off.memory["added_peak_bytes"] - cache // 2, (
            on.memory, off.memory)
    assert device_memory()["live_array_bytes"] > 0


def test_data_parallel_blockwise_equals_one_device():
    assert jax.device_count() >= 4
    mesh = jax.make_mesh((4,), ("data",))
    x = np.random.default_rng(1).normal(size=(128, 6)).astype(np.float32)
    model = _Stack(2)
    v = model.init(jax.random.key(0), x)
    batches = [x[:64], x[64:]]
    rules = [("stem|head", None), (".*", Unstructured(0.5))]
    one = compress_blockwise(model, v, batches, rules, blocks=r"block\d")
    four = compress_blockwise(model, v, batches, rules, blocks=r"block\d", mesh=mesh)
    for p in one.specs:
        np.testing.assert_array_equal(_mask(four.compressed, p), _mask(one.compressed, p))
    for a, b in zip(_leaves(four.params), _leaves(one.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- errors


class _Unchained(nn.Module):
    @nn.compact
    def __call__(self, x):
        for i in range(2):
            x = 2.0 * _Block(name=f"block{i}")(x, jnp.float32(0.5))
        return x


def test_errors():
    x = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
    model = _Stack(2)
    v = model.init(jax.random.key(0), x)
    ok = [("stem|head", None), (".*", Unstructured(0.5))]
    with pytest.raises(ValueError, match="no module path matches|called no module"):
        compress_blockwise(model, v, [x], ok, blocks=r"layer\d")
    with pytest.raises(ValueError, match=r"\['stem', 'head'\] outside every block"):
        compress_blockwise(model, v, [x], [(".*", Unstructured(0.5))], blocks=r"block\d")
    with pytest.raises(ValueError, match="batches is empty"):
        compress_blockwise(model, v, [], ok, blocks=r"block\d")
    with pytest.raises(TypeError, match="blocks must be a regex"):
        compress_blockwise(model, v, [x], ok, blocks=3)
    with pytest.raises(ValueError, match="nest"):
        compress_blockwise(model, v, [x], ok, blocks=r"block\d(/fc1)?")
    w = _Unchained().init(jax.random.key(0), x[:, :6])
    with pytest.raises(ValueError, match="not chained at block 'block1'"):
        compress_blockwise(_Unchained(), w, [x], [(".*", Unstructured(0.5))], blocks=r"block\d")
