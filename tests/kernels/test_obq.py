"""OBQ quantization and joint prune + quantize against the float64 NumPy reference, plus properties.

Frantar, Singh, Alistarh, *Optimal Brain Compression* (NeurIPS 2022), §4: per row, every free
weight is rounded to the grid, the one with the smallest ``(w - q)² / Hinv_jj`` is fixed and the
others compensate; the outlier rule fixes the worst out-of-range weight first. ``order="natural"``
fixes the columns left to right (GPTQ without lazy blocks). ``obq_prune_quantize`` prunes with
ExactOBS, finds the grid on the pruned weights and runs OBQ with the pruned coordinates eliminated
first, so they stay exactly 0.

The reference is given the kernel's own grid (``params=``): grids found independently agree only
to round-off, and the tests here are about the greedy. Each reference case checks its ``margin``
(closest decision, rounding edge or outlier threshold) so that float64 round-off cannot flip a
code. Compilation dominates: one small shape in float64 and few distinct pivot rules (bits, outlier
rule, order) are reused throughout. Bad shapes, NaN/inf and indefinite ``H`` are tested for every
solver in ``test_prepare.py``.

Example:
    .venv/bin/pytest tests/kernels/test_obq.py
"""

from __future__ import annotations

import importlib
import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obcjax.kernels import (
    exactobs_block,
    exactobs_nm,
    exactobs_prune,
    obq_prune_quantize,
    obq_quantize,
    prepare,
    rtn_quantize,
)
from obcjax.kernels._engine import phase_plan
from obcjax.quant import expand_params, find_params, quantize
from obcjax.specs import NM, Block, Int, Unstructured
from tests.kernels.reference import (
    layer_loss_ref,
    make_problem,
    obq_prune_quantize_ref,
    obq_ref,
    prepare_ref,
)

exactobs = importlib.import_module("obcjax.kernels.exactobs")
quant_mod = importlib.import_module("obcjax.quant")

ROWS, COLS, DEAD = 6, 32, (5,)
WIDE, WIDE_DEAD, WIDE_SEED = (4, 128), (7,), 1  # 128 steps: the fast kernel runs two phases
ASYM4 = Int(bits=4, sym=False)
PROPS = settings(max_examples=10, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _grid(r):
    return np.asarray(r.qarray.scale), np.asarray(r.qarray.zero)


def _check_quantized(r, R, W, H, spec, *, mask=None):
    """Codes, weights and losses equal to the reference; the grid is that of the prepared weights."""
    P = prepare_ref(W, H)
    codes, weights = np.asarray(r.qarray.codes), np.asarray(r.weights)
    assert weights.dtype == np.float64 and codes.dtype == np.uint8
    assert r.qarray.bits == spec.bits
    np.testing.assert_array_equal(codes, R.codes)
    np.testing.assert_allclose(weights, R.weights, rtol=0, atol=1e-10)
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), weights)  # exactly on grid
    np.testing.assert_allclose(np.asarray(r.row_loss), R.row_loss, rtol=1e-9, atol=1e-15)
    assert float(r.loss) == pytest.approx(float(R.loss), rel=1e-9)
    # the sum of the OBS step losses is the true layer error, cross terms included
    assert float(r.loss) == pytest.approx(layer_loss_ref(P.W, weights, P.H), rel=1e-9)
    assert np.all(weights[:, list(DEAD if W.shape == (ROWS, COLS) else WIDE_DEAD)] == 0.0)


# ------------------------------------------------------------------------------------------------
# OBQ vs the reference
# ------------------------------------------------------------------------------------------------

# name: (spec, order, outlier_rule, seed); seeds picked for a comfortable margin (asserted below)
CASES = {
    "sym-lp-greedy": (Int(bits=4), "greedy", True, 2),
    "asym-lp-greedy": (ASYM4, "greedy", True, 1),
    "asym-minmax-tensor-greedy": (
        Int(bits=4, sym=False, search="minmax", granularity="tensor"),
        "greedy",
        True,
        1,
    ),
    "asym-lp-group16-greedy": (
        Int(bits=4, sym=False, granularity="group", group_size=16),
        "greedy",
        True,
        1,
    ),
    "sym-lp-2bit-greedy": (Int(bits=2), "greedy", True, 1),
    "sym-lp-greedy-no-outlier-rule": (Int(bits=4), "greedy", False, 1),
    "asym-minmax-natural": (Int(bits=4, sym=False, search="minmax"), "natural", False, 1),
    "sym-lp-group16-natural": (Int(bits=4, granularity="group", group_size=16), "natural", True, 1),
}


@pytest.mark.parametrize("name", list(CASES))
def test_obq_matches_reference(name):
    _obq_vs_reference(name, "naive")


@pytest.mark.parametrize(
    "name", ["asym-lp-group16-greedy", "sym-lp-2bit-greedy", "sym-lp-group16-natural"]
)
def test_blocked_obq_matches_reference(name):
    """The right-looking blocked kernel (blocks of 4 steps at 32 columns) gives the same codes."""
    _obq_vs_reference(name, "blocked")


def _obq_vs_reference(name, method):
    spec, order, rule, seed = CASES[name]
    W, H = make_problem(ROWS, COLS, seed, dead=DEAD)
    r = obq_quantize(W, H, spec, order=order, outlier_rule=rule, method=method)
    assert r.mask is None
    scale, zero = find_params(prepare(W, H).W, spec)
    np.testing.assert_array_equal(np.asarray(r.qarray.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(r.qarray.zero), np.asarray(zero))
    # the natural order has no outlier rule, whatever the flag says
    R = obq_ref(W, H, spec, outlier_rule=rule, order=order, params=_grid(r))
    assert R.margin > 1e-5
    _check_quantized(r, R, W, H, spec)
    if order == "natural":
        np.testing.assert_array_equal(R.order, np.tile(np.arange(COLS), (ROWS, 1)))


def test_outlier_rule_is_exercised_and_changes_the_codes():
    spec, _, _, seed = CASES["sym-lp-greedy"]
    W, H = make_problem(ROWS, COLS, seed, dead=DEAD)
    P = prepare(W, H)
    s, z = expand_params(*find_params(P.W, spec), COLS)
    Wp = np.asarray(P.W)
    err = (Wp - np.asarray(quantize(Wp, s, z, spec.bits))) ** 2
    # the Lp search shrinks the range: some weights start off the grid's end, so the rule fires
    assert np.any(err > np.asarray(s) ** 2 / 4)
    with_rule = obq_quantize(W, H, spec, outlier_rule=True, method="naive")
    without = obq_quantize(W, H, spec, outlier_rule=False, method="naive")
    assert np.any(np.asarray(with_rule.qarray.codes) != np.asarray(without.qarray.codes))
    R = obq_ref(W, H, spec, outlier_rule=False, params=_grid(without))
    np.testing.assert_array_equal(np.asarray(without.qarray.codes), R.codes)


def test_float32_obq_agrees_with_reference():
    spec = CASES["asym-lp-greedy"][0]
    W, H = make_problem(ROWS, COLS, 1, dead=DEAD)
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    with jax.enable_x64(False):
        r = obq_quantize(W32, H32, spec, method="naive")
        assert r.weights.dtype == np.float32
        grid = _grid(r)
    R = obq_ref(W32, H32, spec, params=grid)
    same = np.mean(np.asarray(r.qarray.codes) == R.codes)
    assert same >= 0.97, same
    assert float(r.loss) == pytest.approx(float(R.loss), rel=2e-2)


# ------------------------------------------------------------------------------------------------
# joint prune + quantize vs the reference
# ------------------------------------------------------------------------------------------------


def _check_joint(r, R, W, H, quant, pruned_only):
    mask, codes = np.asarray(r.mask), np.asarray(r.qarray.codes)
    np.testing.assert_array_equal(mask, R.mask)
    _check_quantized(r, R, W, H, quant)
    assert np.all(np.asarray(r.weights)[~mask] == 0.0)  # pruned stay exactly zero ...
    _, z = expand_params(r.qarray.scale, r.qarray.zero, W.shape[1])
    np.testing.assert_array_equal(codes[~mask], np.asarray(z)[~mask])  # ... on the zero point
    # the grid is that of the pruned weights
    scale, zero = find_params(pruned_only.weights, quant)
    np.testing.assert_array_equal(np.asarray(r.qarray.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(r.qarray.zero), np.asarray(zero))
    np.testing.assert_array_equal(mask, np.asarray(pruned_only.mask))
    assert float(r.loss) > float(pruned_only.loss) > 0


@pytest.mark.parametrize(
    "prune, seed", [(Unstructured(0.5), 2), (NM(2, 4), 1), (Block(0.5, 4), 2)]
)
def test_prune_quantize_matches_reference(prune, seed):
    W, H = make_problem(ROWS, COLS, seed, dead=DEAD)
    r = obq_prune_quantize(W, H, prune, ASYM4, method="naive")
    R = obq_prune_quantize_ref(W, H, prune, ASYM4, params=_grid(r))
    assert R.margin > 1e-5
    if isinstance(prune, NM):
        only = exactobs_nm(W, H, prune.n, prune.m, method="naive")
    elif isinstance(prune, Block):
        only = exactobs_block(W, H, prune)
        blocks = np.asarray(r.mask).reshape(ROWS, COLS // 4, 4)
        assert np.all(blocks.all(-1) | ~blocks.any(-1))  # whole blocks kept or removed
    else:
        only = exactobs_prune(W, H, prune.sparsity, method="naive")
    _check_joint(r, R, W, H, ASYM4, only)


@pytest.mark.parametrize("method", ["fast", "blocked"])
def test_fast_kernel_matches_reference_through_compaction(method):
    """The fast kernel compacts its free columns between phases (128 steps: two phases).

    Every per-column attribute must travel with the compaction: the grid of each group of 32
    columns and the "already pruned" flag. The 3:4 pruning (with the same fast kernel) eliminates
    96 columns first, so the quantization steps themselves run in the second, compacted phase.
    """
    spec = Int(bits=4, sym=False, granularity="group", group_size=32)
    W, H = make_problem(*WIDE, WIDE_SEED, dead=WIDE_DEAD)
    assert len(phase_plan(WIDE[1], WIDE[1])) >= 2
    r = obq_prune_quantize(W, H, NM(3, 4), spec, method=method)
    R = obq_prune_quantize_ref(W, H, NM(3, 4), spec, params=_grid(r))
    assert R.margin > 1e-5
    assert r.qarray.scale.shape == (WIDE[0], 4)
    _check_joint(r, R, W, H, spec, exactobs_nm(W, H, 3, 4, method=method))


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([2, 4, 8]),
    decay=st.floats(0.6, 0.95),
)
def test_obq_properties(seed, bits, decay):
    spec = Int(bits=bits)
    W, H = make_problem(ROWS, COLS, seed, dead=DEAD, decay=decay)
    r = obq_quantize(W, H, spec, method="naive")
    codes, weights = np.asarray(r.qarray.codes), np.asarray(r.weights)
    assert codes.min() >= 0 and codes.max() < 2**bits
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), weights)
    s, z = expand_params(r.qarray.scale, r.qarray.zero, COLS)
    np.testing.assert_array_equal(np.asarray(quantize(weights, s, z, bits)), weights)
    assert np.all(weights[:, list(DEAD)] == 0.0)
    P = prepare_ref(W, H)
    assert float(r.loss) == pytest.approx(layer_loss_ref(P.W, weights, P.H), rel=1e-8)
    # correlated inputs: compensation beats rounding each weight on its own
    assert float(r.loss) < float(rtn_quantize(W, spec, H=H).loss)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    c=st.floats(0.01, 100.0),
    spec=st.sampled_from([Int(bits=4), Int(bits=4, sym=False, search="minmax")]),
    order=st.sampled_from(["greedy", "natural"]),
)
def test_identity_hessian_reduces_to_round_to_nearest(seed, c, spec, order):
    W = np.random.default_rng(seed).standard_normal((ROWS, COLS))
    H = c * np.eye(COLS)
    r = obq_quantize(W, H, spec, order=order, outlier_rule=False, method="naive")
    g = rtn_quantize(W, spec, H=H)
    np.testing.assert_array_equal(np.asarray(r.qarray.codes), np.asarray(g.qarray.codes))
    np.testing.assert_array_equal(np.asarray(r.weights), np.asarray(g.weights))
    assert float(r.loss) == pytest.approx(float(g.loss), rel=1e-9)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    prune=st.one_of(st.floats(0.0, 0.95).map(Unstructured), st.just(NM(2, 4))),
)
def test_prune_quantize_properties(seed, prune):
    W, H = make_problem(ROWS, COLS, seed, dead=DEAD)
    r = obq_prune_quantize(W, H, prune, ASYM4, method="naive")
    mask, weights, codes = np.asarray(r.mask), np.asarray(r.weights), np.asarray(r.qarray.codes)
    if isinstance(prune, NM):
        assert np.all((~mask).reshape(ROWS, -1, 4).sum(axis=-1) == 2)
    else:
        assert (~mask).sum() == math.floor(prune.sparsity * ROWS * COLS + 0.5)
    assert np.all(weights[~mask] == 0.0)
    _, z = expand_params(r.qarray.scale, r.qarray.zero, COLS)
    np.testing.assert_array_equal(codes[~mask], np.asarray(z)[~mask])
    assert codes.max() < 16
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), weights)
    P = prepare_ref(W, H)
    assert float(r.loss) == pytest.approx(layer_loss_ref(P.W, weights, P.H), rel=1e-8)


# ------------------------------------------------------------------------------------------------
# bad input (shapes, NaN/inf and indefinite H: see test_prepare.py)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        Int(bits=bits)


def test_bad_specs_name_the_layer():
    W, H = make_problem(ROWS, COLS, 7)
    with pytest.raises(TypeError, match=r"'enc/fc1'.*spec: expected a number of bits"):
        obq_quantize(W, H, NM(2, 4), layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*group size 12 does not divide .* 32"):
        obq_quantize(W, H, Int(bits=4, granularity="group", group_size=12), layer="enc/fc1")
    with pytest.raises(ValueError, match="order must be 'greedy' or 'natural'"):
        obq_quantize(W, H, ASYM4, order="act", layer="enc/fc1")
    with pytest.raises(TypeError, match=r"'enc/fc1'.*prune: expected a sparsity"):
        obq_prune_quantize(W, H, Int(4), ASYM4, layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*quant: expected a number of bits.*'int4'"):
        obq_prune_quantize(W, H, NM(2, 4), "int4", layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*group size 12"):
        obq_prune_quantize(
            W, H, NM(2, 4), Int(bits=4, granularity="group", group_size=12), layer="enc/fc1"
        )


def test_nm_width_must_divide_for_joint_compression():
    W, H = make_problem(ROWS, 30, 7)
    with pytest.raises(ValueError, match=r"'enc/fc1'.*2:4.*multiple of 4.*30 columns"):
        obq_prune_quantize(W, H, NM(2, 4), ASYM4, layer="enc/fc1")


# ------------------------------------------------------------------------------------------------
# inputs, tracing
# ------------------------------------------------------------------------------------------------


def test_inputs_are_never_mutated():
    W, H = make_problem(ROWS, COLS, 2, dead=DEAD)
    W0, H0 = W.copy(), H.copy()
    obq_quantize(W, H, ASYM4, method="naive")
    obq_quantize(W, H, ASYM4, order="natural", method="naive")
    obq_prune_quantize(W, H, Unstructured(0.5), ASYM4, method="naive")
    obq_prune_quantize(W, H, NM(2, 4), ASYM4, method="naive")
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)


def test_equal_shapes_do_not_retrace():
    def run(seed):
        W, H = make_problem(ROWS, COLS, seed, dead=DEAD)
        obq_quantize(W, H, ASYM4, method="naive")
        obq_prune_quantize(W, H, NM(2, 4), ASYM4, method="naive")
        obq_prune_quantize(W, H, Unstructured(0.5), ASYM4, method="naive")

    def sizes():
        fns = (exactobs._greedy_jit, exactobs._rebuild_chol, quant_mod._find_params)
        return [f._cache_size() for f in fns]

    run(0)
    before = sizes()
    run(1)
    assert sizes() == before
