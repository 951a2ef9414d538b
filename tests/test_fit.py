"""Tests of obcjax.fit: empirical Fisher vs a per-example loop, FIT score, the FITCompress search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax import fit
from obcjax.specs import Int, Unstructured
from obcjax.transforms import LayerSpec, summarize


def _mlp(seed=0, din=5, hid=7, dout=3):
    rng = np.random.default_rng(seed)
    return {
        "fc1": {
            "kernel": jnp.asarray(rng.normal(size=(din, hid)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=hid) * 0.1, jnp.float32),
        },
        "fc2": {
            "kernel": jnp.asarray(rng.normal(size=(hid, dout)), jnp.float32),
            "bias": jnp.zeros(dout, jnp.float32),
        },
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    return -jax.nn.log_softmax(logits)[y]


def _data(n=21, din=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, din)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _batches(x, y, b):
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]


def test_fisher_matches_per_example_loop_and_traces_once():
    params = _mlp()
    x, y = _data()
    before = fit.TRACE_COUNTS["fisher_step"]
    # 21 examples in batches of 8: the last batch (5) is padded, which must neither retrace nor
    # count the padding rows
    f = fit.fisher_diagonal(_loss, params, _batches(x, y, 8), tol=0.0, max_batches=10)
    assert fit.TRACE_COUNTS["fisher_step"] - before == 1
    assert f.batches == 3 and f.examples == 21 and not f.converged
    ref = {"fc1": np.zeros((5, 7)), "fc2": np.zeros((7, 3))}
    for i in range(len(y)):
        g = jax.grad(_loss)(params, x[i], y[i])
        for p in ref:
            ref[p] += np.asarray(g[p]["kernel"], np.float64) ** 2
    for p in ref:
        np.testing.assert_allclose(np.asarray(f.diag[p]), ref[p] / len(y), rtol=1e-4, atol=1e-7)


def test_fisher_early_stop_and_rules():
    params = _mlp()
    x, y = _data(8)
    same = [(x, y)] * 6  # identical batches: the running mean stops moving after batch 2
    f = fit.fisher_diagonal(_loss, params, same, tol=1e-6, min_batches=2)
    assert f.converged and f.batches == 2 and f.changes[1] < 1e-6
    f1 = fit.fisher_diagonal(_loss, params, same, rules=("fc1",), tol=1e-6)
    assert set(f1.diag) == {"fc1"}


def test_fisher_errors():
    params = _mlp()
    x, y = _data(8)
    with pytest.raises(ValueError, match="no labels"):
        fit.fisher_diagonal(_loss, params, [x])
    with pytest.raises(ValueError, match="no labels"):
        fit.fisher_diagonal(_loss, params, [{"x": x}])
    with pytest.raises(ValueError, match="no kernels matched"):
        fit.fisher_diagonal(_loss, params, [(x, y)], rules=("conv.*",))
    with pytest.raises(ValueError, match="empty"):
        fit.fisher_diagonal(_loss, params, [])


def _sym_minmax_noise(kernel, bits):
    w = np.asarray(kernel, np.float64)  # (in, out); rows of the grid are output channels
    xmax = np.maximum(np.abs(np.minimum(w.min(0), 0)), np.maximum(w.max(0), 0))
    step = 2 * xmax / (2**bits - 1)
    return np.broadcast_to(step**2 / 12, w.shape)


def test_fit_score_matches_manual_formula():
    params = _mlp()
    rng = np.random.default_rng(3)
    F = {p: jnp.asarray(rng.uniform(0.1, 2.0, params[p]["kernel"].shape)) for p in params}
    grid = Int(bits=3, search="minmax")
    got = fit.fit_score(F, params, {"fc1": LayerSpec(quant=grid), "fc2": None}, per_layer=True)
    want = np.sum(np.asarray(F["fc1"]) * _sym_minmax_noise(params["fc1"]["kernel"], 3))
    assert got["fc1"] == pytest.approx(want, rel=1e-5) and got["fc2"] == 0.0
    # pruning only: the pruned weights' F·w², and they are the smallest F·w²
    w = np.asarray(params["fc2"]["kernel"], np.float64)
    sal = np.asarray(F["fc2"]) * w**2
    s = fit.fit_score(F, params, {"fc2": LayerSpec(prune=Unstructured(0.5))})
    k = int(np.floor(0.5 * w.size + 0.5))
    assert s == pytest.approx(np.sort(sal.ravel())[:k].sum(), rel=1e-5)
    # joint: pruned weights contribute w², kept ones the noise
    spec = LayerSpec(prune=Unstructured(0.5), quant=grid)
    m = fit.fisher_mask(F["fc2"], w, 0.5)
    want = np.sum(
        np.asarray(F["fc2"]) * np.where(m, _sym_minmax_noise(params["fc2"]["kernel"], 3), w**2)
    )
    assert fit.fit_score(F, params, {"fc2": spec}) == pytest.approx(want, rel=1e-5)
    # more bits, less FIT
    lo = fit.fit_score(F, params, {"fc1": LayerSpec(quant=Int(bits=8, search="minmax"))})
    assert lo < got["fc1"] / 100


def _search_setup(seed=0):
    params = _mlp(seed, din=12, hid=24, dout=10)
    rng = np.random.default_rng(seed + 10)
    F = {p: jnp.asarray(rng.gamma(0.5, 1.0, params[p]["kernel"].shape)) for p in params}
    return params, F


def _counted_size(params, plan):
    kernel_n = sum(m.size for m in plan.masks.values())
    other = sum(np.size(x) for x in jax.tree.leaves(params)) - kernel_n
    return sum(int(plan.masks[p].sum()) * plan.bits[p] for p in plan.masks) + 32 * other


@pytest.mark.parametrize("ratio", [0.3, 0.15, 0.1, 0.07])
def test_search_meets_target_from_stored_bits_and_masks(ratio):
    params, F = _search_setup()
    plan = fit.fit_search(params, F, target_ratio=ratio)
    counted = _counted_size(params, plan)
    assert counted == plan.size_bits <= ratio * plan.dense_bits
    sizes = [t["size_bits"] for t in plan.trace]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))  # every move saves bits
    # the plan's specs agree with its masks, and the materialised model is no larger
    for p, spec in plan.specs.items():
        pruned = plan.masks[p].size - int(plan.masks[p].sum())
        assert (spec.prune.sparsity * plan.masks[p].size if spec.prune else 0) == pytest.approx(
            pruned
        )
        assert spec.quant.bits == plan.bits[p]
    out = fit.apply_plan(params, plan)
    assert out.summary["total/size_bits"] <= plan.size_bits
    assert summarize(params, out.params, plan.specs)["total/size_bits"] <= ratio * plan.dense_bits
    assert plan.fit == pytest.approx(
        fit.fit_score(F, params, plan.specs, masks=plan.masks), rel=1e-4
    )
    assert [r for r, _ in plan.rules()] == ["fc1", "fc2"]


def test_search_deterministic_and_no_retrace():
    params, F = _search_setup()
    a = fit.fit_search(params, F, target_ratio=0.1, seed=3)
    before = fit.TRACE_COUNTS["score"]
    b = fit.fit_search(params, F, target_ratio=0.1, seed=3)
    c = fit.fit_search(params, F, target_ratio=0.08, seed=3)
    assert len(b.trace) > 5 and len(c.trace) > len(b.trace)
    assert fit.TRACE_COUNTS["score"] == before  # same shapes: no new trace across steps or calls
    assert a.trace == b.trace and a.bits == b.bits
    assert all(np.array_equal(a.masks[p], b.masks[p]) for p in a.masks)
    # a fresh layer count is a new shape: exactly one trace for a whole search
    p3 = {**params, "fc3": {"kernel": jnp.ones((10, 4)) * 0.3}}
    F3 = {**F, "fc3": jnp.ones((10, 4))}
    before = fit.TRACE_COUNTS["score"]
    d = fit.fit_search(p3, F3, target_ratio=0.1)
    assert fit.TRACE_COUNTS["score"] - before == 1 and len(d.trace) > 5


def test_search_errors():
    params, F = _search_setup()
    with pytest.raises(ValueError, match="unreachable"):
        fit.fit_search(params, F, target_ratio=0.001)
    with pytest.raises(ValueError, match="no kernels matched"):
        fit.fit_search(params, F, target_ratio=0.1, rules=("conv",))
    with pytest.raises(ValueError, match="no Fisher diagonal.*fc2"):
        fit.fit_search(params, {"fc1": F["fc1"]}, target_ratio=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        fit.fit_search(params, F)
    with pytest.raises(ValueError, match="bit_schedule"):
        fit.fit_search(params, F, target_ratio=0.1, bit_schedule=(4, 6))
    plan = fit.fit_search(params, F, target_ratio=0.1)
    with pytest.raises(ValueError, match="needs calibration stats"):
        fit.apply_plan(params, plan, solver="obc")
