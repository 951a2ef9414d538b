"""Tests of obcjax.opq: Laplace closed forms vs Monte Carlo, the allocation's budget, errors."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from obcjax import opq
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
    budget = c["dense_bits"] / rate
    max_bits = max(s.quant.bits for s in plan.specs.values())
    assert c["size_bits"] <= budget + 1e-9
    assert budget - c["size_bits"] < max_bits  # within one weight
    assert c["size_bits"] == plan.size_bits
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
        np.testing.assert_array_equal(np.asarray(out.masks[path]), mask)
        assert len(np.unique(np.asarray(out.qarrays[path][0].scale))) == 1  # one codebook per layer
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
    assert 0 <= c["dense_bits"] / 10.0 - c["size_bits"] < 4
    sp = [s.prune.sparsity for s in alloc.values()]
    assert np.ptp(sp) < 0.05


def test_to_rules_escapes_paths_and_swaps_solver():
    alloc = {"a.b/c": LayerSpec(Unstructured(0.5), Int(4, granularity="tensor"), "magnitude")}
    rules = opq.to_rules(alloc, solver="obc")
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
