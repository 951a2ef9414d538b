"""Tests of obcjax.opq: Laplace closed forms vs Monte Carlo, the allocation's budget, errors."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest

from obcjax import opq
from obcjax.layout import set_path
from obcjax.specs import Int, Unstructured
from obcjax.transforms import LayerSpec

RNG = np.random.default_rng(0)
B = 0.05
W_MC = RNG.laplace(0.0, B, 1_000_000)


def _mc_quant(w, t, bits, m):
    d = opq.grid_step(m, bits)
    half = 2 ** (bits - 1)
    q = (np.clip(np.round(w / d) + half, 0, 2**bits - 1) - half) * d
    return np.mean(np.where(np.abs(w) >= t, (w - q) ** 2, 0.0))


@pytest.mark.parametrize("t_over_b", [0.1, 0.7, 1.5, 3.0])
def test_prune_error_and_ratio_match_monte_carlo(t_over_b):
    t = t_over_b * B
    mc = np.mean(np.where(np.abs(W_MC) < t, W_MC**2, 0.0))
    assert opq.prune_error(t, B) == pytest.approx(mc, rel=0.03)
    assert opq.kept_fraction(t, B) == pytest.approx(np.mean(np.abs(W_MC) >= t), rel=0.01)


def test_prune_error_limits():
    assert opq.prune_error(0.0, B) == pytest.approx(0.0, abs=1e-18)
    assert opq.prune_error(np.inf, B) == pytest.approx(2 * B * B)


@pytest.mark.parametrize("bits,t_over_b", [(2, 0.5), (3, 0.0), (4, 1.0), (6, 2.0), (8, 0.3)])
def test_quant_error_exact_matches_monte_carlo(bits, t_over_b):
    t = t_over_b * B
    m = float(np.abs(W_MC).max())  # truncated at the sample's range, as the allocation does
    mc = _mc_quant(W_MC, t, bits, m)
    assert opq.quant_error(t, B, opq.grid_step(m, bits), bits, m) == pytest.approx(mc, rel=0.03)
    # an untruncated model on a range well inside the tail: clipping error must be modelled too
    # (the rare tail samples make this Monte Carlo noisier: about 2 % relative s.d.)
    m2 = 4 * B
    mc2 = _mc_quant(W_MC, t, bits, m2)
    assert opq.quant_error(t, B, opq.grid_step(m2, bits), bits) == pytest.approx(mc2, rel=0.06)


def test_highres_approximation_is_good_at_high_rate_only():
    m = float(np.abs(W_MC).max())
    t = 0.5 * B
    hi = [
        opq.quant_error(t, B, opq.grid_step(m, 8), 8, m),
        opq.quant_error_highres(t, B, opq.grid_step(m, 8)),
    ]
    lo = [
        opq.quant_error(t, B, opq.grid_step(m, 2), 2, m),
        opq.quant_error_highres(t, B, opq.grid_step(m, 2)),
    ]
    assert hi[1] == pytest.approx(hi[0], rel=0.05)
    assert abs(lo[1] / lo[0] - 1) > 0.2


def test_fit_laplace_recovers_scale_and_ks_separates_shapes():
    f = opq.fit_laplace(W_MC[:20000].reshape(100, 200))
    assert f.b == pytest.approx(B, rel=0.02)
    assert f.ks < 0.02
    u = opq.fit_laplace(RNG.uniform(-1, 1, 20000))
    assert u.ks > 0.06


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "conv": {
            "kernel": r.laplace(0, 0.2, (3, 3, 4, 8)).astype(np.float32),
            "bias": np.zeros(8, np.float32),
        },
        "fc1": {
            "kernel": r.laplace(0, 0.05, (72, 96)).astype(np.float32),
            "bias": np.zeros(96, np.float32),
        },
        "fc2": {
            "kernel": r.laplace(0, 0.1, (96, 10)).astype(np.float32),
            "bias": np.zeros(10, np.float32),
        },
    }


@pytest.mark.parametrize("rate", [6.0, 13.7, 30.0])
@pytest.mark.parametrize("include_other", [False, True])
def test_allocation_meets_rate_counted_from_stored_masks(rate, include_other):
    p = _params()
    plan = opq.opq_plan(p, rate, include_other=include_other)
    out = opq.opq_compress(p, plan.specs)
    c = opq.count_bits(p, plan.specs, out.masks, include_other=include_other)
    budget = c["plan_dense_bits"] / rate
    max_bits = max(s.quant.bits for s in plan.specs.values())
    assert c["plan_bits"] <= budget + 1e-9
    assert budget - c["plan_bits"] < max_bits  # within one weight
    assert c["plan_bits"] == plan.size_bits
    # the size (obcjax.sizes) adds the masks and the zero points: the summary's
    kept = sum(int(np.count_nonzero(out.mask(q))) for q in plan.specs)
    assert c["size_bits"] == out.summary["total/size_bits"] == opq.count_stored(p, out)["size_bits"]
    assert c["rate"] == pytest.approx(out.summary["total/compression"]) and c["rate"] < rate
    assert kept == sum(plan.kept.values())
    for path, spec in plan.specs.items():
        assert c[f"{path}/kept"] == plan.kept[path]
        assert spec.quant == Int(
            bits=plan.bits[path], sym=True, search="minmax", granularity="tensor"
        )


def test_relative_weighting_prunes_bigger_layers_harder():
    p = _params()
    s = {k: (v.prune.sparsity if v.prune else 0.0) for k, v in opq.opq_allocate(p, 16.0).items()}
    assert s["fc1"] > s["fc2"] > s["conv"]


def test_sse_weighting_at_high_rate_reduces_to_global_magnitude_pruning():
    # ω = 1 and Δ²/12 ≪ t² give one threshold for every layer: global magnitude pruning
    p = _params(3)
    plan = opq.opq_plan(p, 16.0, weighting="sse", bits_choices=[8])
    total = sum(plan.kept.values())
    mags = np.concatenate([np.abs(np.ravel(p[k]["kernel"])) for k in plan.kept])
    thr = np.sort(mags)[::-1][total - 1]
    for k, kept in plan.kept.items():
        glob = int(np.sum(np.abs(p[k]["kernel"]) >= thr))
        assert abs(kept - glob) <= max(0.1 * glob, 5), (k, kept, glob)
    rel = opq.opq_plan(p, 16.0, weighting="relative", bits_choices=[8]).kept
    assert abs(rel["fc2"] - plan.kept["fc2"]) > 0.15 * plan.kept["fc2"]  # weighting matters


def test_opq_compress_matches_numpy_reference():
    p = _params(1)
    before = {k: np.array(v["kernel"]) for k, v in p.items()}
    alloc = opq.opq_allocate(p, 12.0)
    out = opq.opq_compress(p, alloc)
    for k, v in before.items():
        np.testing.assert_array_equal(p[k]["kernel"], v)  # inputs are not mutated
    for path, spec in alloc.items():
        k = np.asarray(p[path]["kernel"], np.float64)
        kept = k.size - math.floor(spec.prune.sparsity * k.size + 0.5)
        thr = np.sort(np.abs(k).ravel())[::-1][kept - 1]
        mask = np.abs(k) >= thr
        assert int(mask.sum()) == kept
        d = opq.grid_step(np.abs(k).max(), spec.quant.bits)
        half = 2 ** (spec.quant.bits - 1)
        ref = np.where(mask, (np.clip(np.round(k / d) + half, 0, 2 * half - 1) - half) * d, 0.0)
        np.testing.assert_allclose(np.asarray(out.params[path]["kernel"]), ref, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(out.mask(path)), mask)
        assert len(np.unique(np.asarray(out.qarray(path).scale))) == 1  # one codebook per layer
    assert p["fc1"]["kernel"] is not out.params["fc1"]["kernel"]


def _model_objective(params, alloc):
    """Σ ω_i N_i (e_p + e_q) of an allocation under the Laplace model, relative weighting."""
    total = 0.0
    for path, spec in alloc.items():
        f = opq.fit_laplace(params[path]["kernel"])
        kept = f.n - math.floor((spec.prune.sparsity if spec.prune else 0.0) * f.n + 0.5)
        t = -f.b * math.log(kept / f.n)
        d = opq.grid_step(f.m, spec.quant.bits)
        e = opq.prune_error(t, f.b) + opq.quant_error(t, f.b, d, spec.quant.bits, f.m)
        total += float(e) / (2 * f.b * f.b)
    return total


@pytest.mark.parametrize("bits", [3, 4, 5])
def test_opq_beats_uniform_on_its_own_objective_at_equal_size(bits):
    p = _params(2)
    o = opq.opq_allocate(p, 12.0)
    u = opq.uniform_allocate(p, 12.0, bits=bits)
    assert _model_objective(p, o) < _model_objective(p, u)


def test_uniform_allocation_meets_rate():
    p = _params()
    alloc = opq.uniform_allocate(p, 10.0, bits=4)
    c = opq.count_bits(p, alloc, opq.opq_compress(p, alloc).masks)
    assert 0 <= c["plan_dense_bits"] / 10.0 - c["plan_bits"] < 4
    sp = [s.prune.sparsity for s in alloc.values()]
    assert np.ptp(sp) < 0.05


def test_plan_rules_escapes_paths_and_swaps_solver():
    alloc = {"a.b/c": LayerSpec(Unstructured(0.5), Int(4, granularity="tensor"), "magnitude")}
    rules = opq.plan_rules(alloc, solver="obc")
    assert rules[0][0] == re.escape("a.b/c") and rules[0][1].solver == "obc"
    assert re.fullmatch(rules[0][0], "aXb/c") is None


def test_unreachable_rates_raise():
    p = _params()
    with pytest.raises(ValueError, match="unreachable"):
        opq.opq_allocate(p, 1e5)
    with pytest.raises(ValueError, match="below what OPQ allocates"):
        opq.opq_allocate(p, 2.0)
    with pytest.raises(ValueError, match="out of reach"):
        opq.uniform_allocate(p, 1e5)


def test_all_zero_and_degenerate_layers_raise_naming_the_layer():
    p = _params()
    z = {**p, "fc2": {**p["fc2"], "kernel": np.zeros((96, 10), np.float32)}}
    with pytest.raises(ValueError, match="'fc2'.*all 960 weights are zero"):
        opq.opq_allocate(z, 10.0)
    opq.opq_allocate(z, 5.0, rules=[("fc2", None), (".*", True)])  # leaving it out works
    c = {**p, "conv": {**p["conv"], "kernel": np.full((3, 3, 4, 8), -0.3, np.float32)}}
    with pytest.raises(ValueError, match="'conv'.*degenerate"):
        opq.opq_allocate(c, 10.0)
    bimodal = np.sign(RNG.standard_normal((72, 96))) * (1 + 0.01 * RNG.random((72, 96)))
    g = {**p, "fc1": {**p["fc1"], "kernel": bimodal.astype(np.float32)}}
    with pytest.raises(ValueError, match="'fc1'.*KS statistic"):
        opq.opq_allocate(g, 10.0, max_ks=0.2)
    n = {**p, "fc1": {**p["fc1"], "kernel": np.full((72, 96), np.nan, np.float32)}}
    with pytest.raises(ValueError, match="'fc1'.*NaN"):
        opq.opq_allocate(n, 10.0)


def test_bad_arguments_raise():
    p = _params()
    with pytest.raises(ValueError, match="weighting"):
        opq.opq_allocate(p, 10.0, weighting="l1")
    with pytest.raises(ValueError, match="bits_choices"):
        opq.opq_allocate(p, 10.0, bits_choices=[1, 4])
    with pytest.raises(ValueError, match="rate"):
        opq.opq_allocate(p, -3.0)
    with pytest.raises(ValueError, match="matches no layer"):
        opq.opq_allocate(p, 10.0, rules=[("nope", True)])
    with pytest.raises(ValueError, match="needs calibration stats"):
        opq.opq_compress(p, opq.opq_allocate(p, 10.0), solver="obc")


# ----------------------------------------------------------------------------- stored count


def _big_params(seed=5):
    r = np.random.default_rng(seed)
    return {
        "a": {"kernel": r.laplace(0, 0.05, (120, 250)).astype(np.float32)},
        "b": {"kernel": r.laplace(0, 0.2, (3, 3, 16, 64)).astype(np.float32)},
    }


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
@pytest.mark.parametrize("rate", [7.0, 21.5])
def test_rate_met_exactly_as_counted_from_stored_bits_masks_and_grids(rate, granularity):
    p = _params(4)
    plan = opq.opq_plan(p, rate, granularity=granularity)
    out = opq.opq_compress(p, plan.specs)
    c = opq.count_stored(p, out)  # reads masks, QArray bits and grids only
    budget = c["plan_dense_bits"] / rate
    assert c["plan_bits"] <= budget and budget - c["plan_bits"] < max(plan.bits.values())
    assert c["plan_bits"] == plan.size_bits
    assert c["size_bits"] == out.summary["total/size_bits"]
    for path in out.specs:
        q = out.qarray(path)
        assert c[f"{path}/bits"] == plan.bits[path] == q.bits
        assert c[f"{path}/kept"] == plan.kept[path]
        grids = len(np.unique(np.asarray(q.scale)))
        assert grids == (1 if granularity == "tensor" else p[path]["kernel"].shape[-1])
    # the count follows what is stored: one more kept weight costs exactly its bits
    path = max(plan.kept, key=plan.kept.get)
    m = np.array(out.mask(path))
    m[np.unravel_index(np.argmin(m), m.shape)] = True
    c2 = opq.count_stored(p, out._replace(masks=set_path(out.masks, path, "kernel", m)))
    assert c2["plan_bits"] - c["plan_bits"] == plan.bits[path]
    assert c2["size_bits"] - c["size_bits"] == plan.bits[path]


def test_per_channel_grids_cost_one_scale_per_output_channel():
    p = _params(4)
    t = opq.opq_plan(p, 10.0)
    ch = {
        k: LayerSpec(s.prune, Int(s.quant.bits, search="minmax", granularity="channel"), s.solver)
        for k, s in t.specs.items()
    }
    ct = opq.count_stored(p, opq.opq_compress(p, t.specs))
    cc = opq.count_stored(p, opq.opq_compress(p, ch))
    extra = sum(32 * (p[k]["kernel"].shape[-1] - 1) for k in t.specs)
    assert cc["plan_bits"] - ct["plan_bits"] == extra
    assert opq.count_bits(p, ch)["plan_bits"] == cc["plan_bits"]
    # the size charges a uint8 zero point per grid as well
    assert cc["size_bits"] - ct["size_bits"] == extra * 40 // 32
    assert opq.count_bits(p, ch)["size_bits"] == cc["size_bits"]


# ----------------------------------------------------------------------------- error model


@pytest.mark.parametrize("rate", [6.0, 12.0, 30.0])
def test_predicted_errors_match_measured_on_laplace_layers(rate):
    p = _big_params()
    alloc = opq.opq_allocate(p, rate)
    pred = opq.predict_errors(p, alloc)
    meas = opq.measure_errors(p, opq.opq_compress(p, alloc))
    for k in alloc:
        assert pred[k]["pred_prune_mse"] == pytest.approx(meas[k]["meas_prune_mse"], rel=0.08)
        assert pred[k]["pred_quant_mse"] == pytest.approx(meas[k]["meas_quant_mse"], rel=0.05)


def test_predicted_errors_are_off_for_non_laplace_weights():
    # negative control: the agreement above is a property of Laplace weights, not of the code
    r = np.random.default_rng(2)
    p = {"u": {"kernel": r.uniform(-1, 1, (120, 250)).astype(np.float32)}}
    alloc = {"u": LayerSpec(Unstructured(0.5), Int(4, search="minmax", granularity="tensor"))}
    pred = opq.predict_errors(p, alloc)["u"]
    meas = opq.measure_errors(p, opq.opq_compress(p, alloc))["u"]
    assert abs(pred["pred_prune_mse"] / meas["meas_prune_mse"] - 1) > 0.2


def test_measure_errors_output_error_uses_the_hessian():
    from obcjax.stats import hessian_init, hessian_update

    p = _params(1)
    alloc = opq.opq_allocate(p, 12.0)
    out = opq.opq_compress(p, alloc)
    r = np.random.default_rng(0)
    stats = {}
    for k, v in p.items():
        cols = int(np.prod(v["kernel"].shape[:-1]))
        x = r.normal(size=(500, cols)).astype(np.float32)
        stats[k] = hessian_update(hessian_init(cols), x)
        w = np.asarray(v["kernel"], np.float64).reshape(cols, -1)
        d = np.asarray(out.params[k]["kernel"], np.float64).reshape(cols, -1) - w
        ref = np.sum((x @ d) ** 2) / np.sum((x @ w) ** 2)
        got = opq.measure_errors(p, out, stats)[k]["rel_out_err"]
        assert got == pytest.approx(ref, rel=1e-4)


# ----------------------------------------------------------------------------- fine-tuning


def _violations(params, masks, cbs, ulps=0):
    """Weights nonzero where masked plus weights more than ``ulps`` ulp off their frozen grid."""
    from obcjax.quant import quantize

    n = 0
    for k, cb in cbs.items():
        w = np.asarray(params[k]["kernel"])
        n += int(np.sum(w[~np.asarray(masks[k])] != 0))
        q = np.asarray(quantize(w, cb.scale, cb.zero, cb.bits))
        n += int(np.sum(np.abs(w - q) > ulps * np.spacing(np.abs(q))))
    return n


def test_finetune_keeps_masks_and_codebooks_bit_for_bit():
    from obcjax import training as T
    from obcjax.recipes.finetune import zoo_finetune
    from obcjax.zoo import models as zm
    from obcjax.zoo.data import Split

    v = zm.init_variables("cnn1d", (40, 1), seed=0)
    alloc = opq.opq_allocate(v["params"], 15.0)
    # one fine-tune covers both codebook kinds: unified on conv1/conv3, per channel on conv2/fc
    alloc = {
        k: s
        if k in ("conv1", "conv3")
        else LayerSpec(s.prune, dataclasses.replace(s.quant, granularity="channel"), s.solver)
        for k, s in alloc.items()
    }
    comp = opq.opq_compress(v["params"], alloc)
    cbs = opq.kernel_codebooks(v["params"], comp.qarrays)
    for k, cb in cbs.items():
        unified = k in ("conv1", "conv3")
        assert np.shape(cb.scale) == (() if unified else (v["params"][k]["kernel"].shape[-1],))
    saved = {k: (np.array(cb.scale), np.array(cb.zero), cb.bits) for k, cb in cbs.items()}
    saved_masks = {k: np.array(comp.mask(k)) for k in comp.specs if comp.mask(k) is not None}
    assert _violations(comp.params, saved_masks, cbs) == 0
    r = np.random.default_rng(0)
    data = Split(r.normal(size=(64, 40, 1)).astype(np.float32), r.integers(0, 10, 64))
    v2, info = zoo_finetune(
        "cnn1d",
        {**v, "params": comp.params},
        comp.masks,
        cbs,
        data,
        5,
        lr=3e-2,
        batch_size=16,
        weight_decay=1e-2,
    )
    # training.quantize_params computes w + (Q(w) - w) (the STE expression), which can land one ulp off
    # the grid point Q(w); see test_export_is_exactly_on_the_grid
    assert _violations(v2["params"], saved_masks, cbs, ulps=1) == 0
    # negative control: the shadow weights did move off the grid, so the check can fail
    assert _violations(info["shadow_params"], saved_masks, cbs, ulps=1) > 0
    st = info["opt_state"]
    for k, (s, z, b) in saved.items():
        cb = T.get_codebooks(st)[k]
        assert cb.bits == b
        np.testing.assert_array_equal(np.asarray(cb.scale), s)
        np.testing.assert_array_equal(np.asarray(cb.zero), z)
        np.testing.assert_array_equal(np.asarray(T.get_masks(st)[k]["kernel"]), saved_masks[k])
        np.testing.assert_array_equal(np.asarray(comp.mask(k)), saved_masks[k])  # not mutated
    assert any(
        not np.array_equal(
            np.asarray(v2["params"][k]["kernel"]), np.asarray(comp.params[k]["kernel"])
        )
        for k in cbs
    )


def test_export_is_exactly_on_the_grid():
    import jax.numpy as jnp

    from obcjax import training as T
    from obcjax.quant import quantize

    w = np.random.default_rng(0).normal(size=(50, 40)).astype(np.float32)
    cb = T.Codebook(jnp.float32(0.0731), jnp.float32(4.0), 3)
    e = np.asarray(T.quantize_params({"l": {"kernel": w}}, {"l": cb})["l"]["kernel"])
    np.testing.assert_array_equal(e, np.asarray(quantize(w, cb.scale, cb.zero, cb.bits)))


def test_kernel_codebooks_errors():
    p = _params()
    g = {"fc1": LayerSpec(None, Int(4, search="minmax", granularity="group", group_size=8))}
    with pytest.raises(ValueError, match="'fc1'.*granularity='group'"):
        opq.kernel_codebooks(p, opq.opq_compress(p, g).qarrays)
    with pytest.raises(ValueError, match="'zz' is not in params"):
        opq.kernel_codebooks(p, {"zz": {"kernel": opq.opq_compress(
            p, {"fc1": LayerSpec(None, Int(4))}).qarray("fc1")}})


# ----------------------------------------------------------------------------- bad input


def test_per_channel_budget_unreachable_and_bad_granularity():
    p = _params()
    # at 80x the 114 per-channel fp32 scales alone exceed the budget; the unified codebook fits
    opq.opq_allocate(p, 80.0)
    with pytest.raises(ValueError, match="unreachable"):
        opq.opq_allocate(p, 80.0, granularity="channel")
    with pytest.raises(ValueError, match="granularity"):
        opq.opq_allocate(p, 10.0, granularity="group")
    ch = opq.opq_allocate(p, 10.0, granularity="channel")
    with pytest.raises(ValueError, match="'conv'.*tensor-wide"):
        opq.predict_errors(p, ch)


def test_all_zero_output_channel_falls_back_to_a_finite_grid():
    # documented fallback of obcjax.quant: an all-zero channel gets the grid of [-1, 1]
    p = _params()
    k = np.array(p["fc1"]["kernel"])
    k[:, 3] = 0.0
    q = {**p, "fc1": {**p["fc1"], "kernel": k}}
    ch = opq.opq_allocate(q, 10.0, granularity="channel")
    out = opq.opq_compress(q, ch)
    w = np.asarray(out.params["fc1"]["kernel"])
    assert np.all(np.isfinite(w)) and np.all(w[:, 3] == 0)
    cb = opq.kernel_codebooks(q, out.qarrays)["fc1"]
    assert np.all(np.isfinite(np.asarray(cb.scale))) and np.all(np.asarray(cb.scale) > 0)
