"""compress() over Flax parameter pytrees: layout, agreement with the kernels, summary, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from obcjax import kernels as K
from obcjax.calibration import calibrate
from obcjax.specs import NM, Int, Unstructured
from obcjax.stats import hessian_finalize
from obcjax.transforms import (
    LayerSpec,
    as_layer_spec,
    compress,
    find_layers,
    kernel_to_matrices,
    matrices_to_kernel,
    prune_levels,
)


class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, padding="SAME", name="dw")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(16, name="fc")(x)
        return nn.Dense(4, name="head")(nn.relu(x))


@pytest.fixture(scope="module")
def setup():
    model = Small()
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(16, 6, 6, 2)).astype(np.float32) for _ in range(3)]
    v = model.init(jax.random.key(0), jnp.asarray(xs[0]))
    stats = calibrate(model, v, xs)
    return model, v, stats, xs


def test_kernel_matrix_round_trip_and_groups():
    k = jnp.arange(3 * 3 * 2 * 8, dtype=jnp.float32).reshape(3, 3, 2, 8)
    for G in (1, 2, 4):
        kk = k[:, :, : 8 // G if G > 1 else 2] if G > 1 else k
        mats = kernel_to_matrices(kk, G)
        assert len(mats) == G and mats[0].shape == (8 // G, kk.shape[0] * kk.shape[1] * kk.shape[2])
        np.testing.assert_array_equal(matrices_to_kernel(mats, kk.shape), kk)
    # Dense (in, out): W = kernel.T
    d = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(kernel_to_matrices(d)[0], d.T)
    with pytest.raises(ValueError, match="not divisible"):
        kernel_to_matrices(k, 3)


def test_find_layers_and_specs(setup):
    _, v, stats, _ = setup
    assert list(find_layers(v["params"])) == ["conv", "dw", "fc", "head"]
    assert list(stats) == ["conv", "dw", "fc", "head"]
    assert as_layer_spec(Int(4)) == LayerSpec(quant=Int(4))
    assert as_layer_spec((NM(2, 4), Int(3))).name == "2:4+w3"
    with pytest.raises(TypeError):
        as_layer_spec("half")
    with pytest.raises(ValueError, match="solver"):
        LayerSpec(prune=Unstructured(0.5), solver="obs")


def test_compress_equals_kernel_calls_per_layer(setup):
    _, v, stats, _ = setup
    rules = [("head", None), ("dw", Int(4)), (".*", Unstructured(0.5))]
    out = compress(v["params"], stats, rules)
    # Dense: W = kernel.T, same result as the kernel on the layer's Hessian
    H = hessian_finalize(stats["fc"])[0]
    r = K.exactobs_prune(v["params"]["fc"]["kernel"].T, H, 0.5)
    np.testing.assert_allclose(out.params["fc"]["kernel"], r.weights.T, rtol=1e-5, atol=1e-6)
    assert out.losses["fc"] == pytest.approx(float(r.loss), rel=1e-5)
    # conv (HWIO): columns (kh, kw, cin)
    Hc = hessian_finalize(stats["conv"])[0]
    rc = K.exactobs_prune(kernel_to_matrices(v["params"]["conv"]["kernel"])[0], Hc, 0.5)
    np.testing.assert_allclose(out.params["conv"]["kernel"],
                               matrices_to_kernel([rc.weights], (3, 3, 2, 8)), rtol=1e-5, atol=1e-6)
    # depthwise: one Hessian per group, each output channel quantized on its own grid
    Hd = hessian_finalize(stats["dw"])
    assert Hd.shape == (8, 9, 9)
    mats = kernel_to_matrices(v["params"]["dw"]["kernel"], 8)
    for g in (0, 5):
        rq = K.obq_quantize(mats[g], Hd[g], Int(4))
        np.testing.assert_allclose(kernel_to_matrices(out.params["dw"]["kernel"], 8)[g],
                                   rq.weights, rtol=1e-5, atol=1e-6)
    assert len(out.qarrays["dw"]) == 8
    # skipped layer is untouched, structure and dtypes preserved
    np.testing.assert_array_equal(out.params["head"]["kernel"], v["params"]["head"]["kernel"])
    assert jax.tree.structure(out.params) == jax.tree.structure(v["params"])
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(v["params"])):
        assert a.shape == b.shape and a.dtype == b.dtype
    # masks mirror kernels, True = kept
    assert out.masks["fc"].shape == v["params"]["fc"]["kernel"].shape
    np.testing.assert_array_equal(out.masks["fc"], np.asarray(out.params["fc"]["kernel"]) != 0)
    assert set(out.specs) == {"conv", "dw", "fc"}


def test_summary_counts(setup):
    _, v, stats, _ = setup
    out = compress(v["params"], stats, [("fc", (Unstructured(0.75), Int(4))), (".*", None)])
    s = out.summary
    n = v["params"]["fc"]["kernel"].size
    assert s["fc/params"] == n
    assert s["fc/sparsity"] == pytest.approx(round(0.75 * n) / n)
    assert s["fc/bits"] == 4 and s["conv/bits"] == 32
    assert s["fc/size_bits"] == (n - round(0.75 * n)) * 4
    total = sum(x.size for x in jax.tree.leaves(v["params"]))
    assert s["total/params"] == total
    assert s["total/dense_bits"] == 32 * total
    assert s["total/compression"] == pytest.approx(32 * total / s["total/size_bits"])
    assert s["total/loss"] == pytest.approx(out.losses["fc"])


def test_inputs_not_mutated_and_obc_beats_magnitude(setup):
    model, v, stats, xs = setup
    before = jax.tree.map(np.array, v["params"])
    rules = [(".*", Unstructured(0.6))]
    obc = compress(v["params"], stats, rules)
    mag = compress(v["params"], stats, rules, solver="magnitude")
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, v["params"]))
    for path in obc.losses:
        assert obc.losses[path] <= mag.losses[path] * (1 + 1e-6)


def test_prune_levels_equals_compress(setup):
    _, v, stats, _ = setup
    levels = [0.3, 0.7]
    many = prune_levels(v["params"], stats, levels, rules=[("dw", None), (".*", True)])
    for s, p in zip(levels, many):
        one = compress(v["params"], stats, [("dw", None), (".*", Unstructured(s))])
        for path in ("conv", "fc", "head"):
            np.testing.assert_allclose(p[path]["kernel"], one.params[path]["kernel"], rtol=1e-5,
                                       atol=1e-6)
        np.testing.assert_array_equal(p["dw"]["kernel"], v["params"]["dw"]["kernel"])


def test_errors_name_the_layer(setup):
    model, v, stats, xs = setup
    with pytest.raises(ValueError, match="'nope'"):
        compress(v["params"], stats, [("nope", Int(4))])
    with pytest.raises(ValueError, match="no calibration statistics.*'head'"):
        compress(v["params"], {k: s for k, s in stats.items() if k != "head"}, [(".*", Int(4))])
    # statistics from another model: widths do not match
    other = dict(stats)
    other["fc"] = stats["head"]
    with pytest.raises(ValueError, match="layer 'fc'.*another model"):
        compress(v["params"], other, [("fc", Int(4)), (".*", None)])
    with pytest.raises(ValueError, match="'head'"):
        compress(v["params"], stats, [("head", NM(2, 3))])
    with pytest.raises(ValueError, match="no layer"):
        compress({"a": {"b": jnp.zeros(3)}}, stats, [(".*", Int(4))])
