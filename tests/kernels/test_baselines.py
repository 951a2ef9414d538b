"""Magnitude pruning (layer-wise and N:M) and round-to-nearest against the NumPy reference.

The baselines take the solvers' signatures and compensate nothing: magnitude pruning zeroes the
``floor(s·rows·cols + 0.5)`` smallest ``|w|`` of the whole layer (stable row-major order on ties),
N:M zeroes the ``n`` smallest of every ``m`` consecutive columns, and RTN rounds every weight on
the grid of ``obcjax.quant.find_params``. With ``H`` the weights are the prepared ones (dead inputs
zeroed) and the loss is ``½ tr((W-Ŵ) H (W-Ŵ)ᵀ)`` with the damped ``H``; without it the loss is NaN.
That ExactOBS / OBQ beat these baselines is tested in ``test_exactobs.py`` and ``test_obq.py``.

Example:
    .venv/bin/pytest tests/kernels/test_baselines.py
"""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obcjax.kernels import magnitude_nm, magnitude_prune, prepare, rtn_quantize
from obcjax.quant import expand_params, find_params
from obcjax.specs import NM, Int
from tests.kernels.reference import (
    magnitude_nm_ref,
    magnitude_prune_ref,
    make_problem,
    rtn_ref,
)

ROWS, COLS, DEAD = 6, 32, (5,)
PROPS = settings(max_examples=15, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _tied_weights(seed):
    """Small integers: many exact ties (and zeros), so the stable tie-break decides."""
    return np.random.default_rng(seed).integers(-3, 4, size=(ROWS, COLS)).astype(np.float64)


def _check_loss(r, R, with_h):
    if with_h:
        np.testing.assert_allclose(np.asarray(r.row_loss), R.row_loss, rtol=1e-12, atol=1e-15)
        assert float(r.loss) == pytest.approx(float(R.loss), rel=1e-12)
    else:
        assert np.isnan(float(r.loss)) and np.all(np.isnan(np.asarray(r.row_loss)))
        assert r.row_loss.shape == (ROWS,)


# ------------------------------------------------------------------------------------------------
# against the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999])
@pytest.mark.parametrize("tied", [False, True])
def test_magnitude_prune_matches_reference(sparsity, with_h, tied):
    W, H = make_problem(ROWS, COLS, 0, dead=DEAD)
    if tied:
        W = _tied_weights(0)
    Hx = H if with_h else None
    r = magnitude_prune(W, sparsity, H=Hx)
    R = magnitude_prune_ref(W, sparsity, H=Hx)
    assert r.qarray is None
    np.testing.assert_array_equal(np.asarray(r.mask), R.mask)
    np.testing.assert_array_equal(np.asarray(r.weights), R.weights)
    assert (~np.asarray(r.mask)).sum() == math.floor(sparsity * ROWS * COLS + 0.5)
    _check_loss(r, R, with_h)
    if with_h:  # prepared weights: the dead input is zero, so it ranks among the smallest
        assert np.all(np.asarray(r.weights)[:, DEAD] == 0.0)


@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (1, 2), (3, 4)])
@pytest.mark.parametrize("tied", [False, True])
def test_magnitude_nm_matches_reference(n, m, with_h, tied):
    W, H = make_problem(ROWS, COLS, 1, dead=DEAD)
    if tied:
        W = _tied_weights(1)
    Hx = H if with_h else None
    r = magnitude_nm(W, n, m, H=Hx)
    R = magnitude_nm_ref(W, n, m, H=Hx)
    np.testing.assert_array_equal(np.asarray(r.mask), R.mask)
    np.testing.assert_array_equal(np.asarray(r.weights), R.weights)
    assert np.all((~np.asarray(r.mask)).reshape(ROWS, -1, m).sum(axis=-1) == n)
    _check_loss(r, R, with_h)


RTN_SPECS = {
    "sym-lp": Int(bits=4),
    "asym-minmax-3bit": Int(bits=3, sym=False, search="minmax"),
    "asym-lp-group16": Int(bits=4, sym=False, granularity="group", group_size=16),
    "sym-lp-tensor-2bit": Int(bits=2, granularity="tensor"),
    "asym-8bit": Int(bits=8, sym=False),
}


@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("name", list(RTN_SPECS))
def test_rtn_matches_reference(name, with_h):
    spec = RTN_SPECS[name]
    W, H = make_problem(ROWS, COLS, 2, dead=DEAD)
    Hx = H if with_h else None
    r = rtn_quantize(W, spec, H=Hx)
    assert r.mask is None and r.qarray.bits == spec.bits
    # the grid of the (prepared) weights, exactly
    W0 = prepare(W, H).W if with_h else W
    scale, zero = find_params(W0, spec)
    np.testing.assert_array_equal(np.asarray(r.qarray.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(r.qarray.zero), np.asarray(zero))
    # same grid, same float64 division and rounding: the codes agree exactly, ties included
    R = rtn_ref(W, spec, H=Hx, params=(np.asarray(scale), np.asarray(zero)))
    np.testing.assert_array_equal(np.asarray(r.qarray.codes), R.codes)
    np.testing.assert_allclose(np.asarray(r.weights), R.weights, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), np.asarray(r.weights))
    _check_loss(r, R, with_h)


def test_float32_stays_float32_without_h():
    W, _ = make_problem(ROWS, COLS, 3)
    W32 = W.astype(np.float32)
    with jax.enable_x64(False):
        for r in (
            magnitude_prune(W32, 0.5),
            magnitude_nm(W32, 2, 4),
            rtn_quantize(W32, Int(bits=4)),
        ):
            assert r.weights.dtype == np.float32
    np.testing.assert_array_equal(
        np.asarray(magnitude_prune(W32, 0.5).mask), magnitude_prune_ref(W32, 0.5).mask
    )


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


@PROPS
@given(seed=st.integers(0, 2**31 - 1), s=st.floats(0.0, 0.99), scale=st.floats(1e-3, 1e3))
def test_magnitude_prune_properties(seed, s, scale):
    W = scale * np.random.default_rng(seed).standard_normal((ROWS, COLS))
    r = magnitude_prune(W, s)
    mask, weights = np.asarray(r.mask), np.asarray(r.weights)
    k = math.floor(s * ROWS * COLS + 0.5)
    assert (~mask).sum() == k
    np.testing.assert_array_equal(weights, np.where(mask, W, 0.0))  # kept weights untouched
    if 0 < k < W.size:
        assert np.abs(W[~mask]).max() <= np.abs(W[mask]).min()


@PROPS
@given(seed=st.integers(0, 2**31 - 1), nm=st.sampled_from([(1, 4), (2, 4), (4, 8), (7, 8)]))
def test_magnitude_nm_properties(seed, nm):
    n, m = nm
    W = np.random.default_rng(seed).standard_normal((ROWS, COLS))
    r = magnitude_nm(W, n, m)
    mask = np.asarray(r.mask).reshape(ROWS, -1, m)
    g = np.abs(W).reshape(ROWS, -1, m)
    assert np.all((~mask).sum(axis=-1) == n)
    gone = np.where(~mask, g, -np.inf).max(axis=-1)
    kept = np.where(mask, g, np.inf).min(axis=-1)
    assert np.all(gone <= kept)
    np.testing.assert_array_equal(np.asarray(r.weights), np.where(np.asarray(r.mask), W, 0.0))


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    spec=st.sampled_from(
        [RTN_SPECS["sym-lp"], RTN_SPECS["asym-minmax-3bit"], RTN_SPECS["asym-8bit"]]
    ),
)
def test_rtn_properties(seed, spec):
    W = np.random.default_rng(seed).standard_normal((ROWS, COLS))
    r = rtn_quantize(W, spec)
    codes, weights = np.asarray(r.qarray.codes), np.asarray(r.weights)
    assert codes.min() >= 0 and codes.max() < 2**spec.bits
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), weights)
    s, z = (np.asarray(a) for a in expand_params(r.qarray.scale, r.qarray.zero, COLS))
    lo, hi = s * (0 - z), s * (spec.maxq - z)
    inside = (W >= lo) & (W <= hi)
    # nearest grid point: within half a step inside the range, the end point outside it
    assert np.all(np.abs(weights - W)[inside] <= 0.5 * s[inside] * (1 + 1e-12))
    np.testing.assert_allclose(weights[~inside], np.clip(W, lo, hi)[~inside], rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------


def test_bad_input_names_the_layer():
    W, H = make_problem(ROWS, 30, 4)
    with pytest.raises(ValueError, match=r"'enc/fc1'.*2:4.*multiple of 4.*30 columns"):
        magnitude_nm(W, 2, 4, layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*group size 16 does not divide .* 30"):
        rtn_quantize(W, Int(bits=4, granularity="group", group_size=16), layer="enc/fc1")
    with pytest.raises(TypeError, match=r"'enc/fc1'.*spec: expected a number of bits"):
        rtn_quantize(W, NM(2, 4), layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*spec: expected a number of bits.*'w9'"):
        rtn_quantize(W, "w9", layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*\(rows, cols\)"):
        magnitude_prune(W[0], 0.5, layer="enc/fc1")
    for bad in (np.nan, np.inf):
        Wb = W.copy()
        Wb[2, 3] = bad
        with pytest.raises(ValueError, match=r"'enc/fc1'.*non-finite"):
            magnitude_prune(Wb, 0.5, layer="enc/fc1")
        with pytest.raises(ValueError, match=r"'enc/fc1'.*non-finite"):
            rtn_quantize(Wb, Int(bits=4), layer="enc/fc1")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 2.0, float("nan")])
def test_sparsity_outside_unit_interval_is_refused(sparsity):
    W, _ = make_problem(ROWS, COLS, 4)
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        magnitude_prune(W, sparsity, layer="enc/fc1")


def test_sparsity_error_names_the_layer():
    W, _ = make_problem(ROWS, COLS, 4)
    with pytest.raises(ValueError, match="enc/fc1"):
        magnitude_prune(W, 1.5, layer="enc/fc1")


def test_inputs_are_never_mutated():
    W, H = make_problem(ROWS, COLS, 5, dead=DEAD)
    W0, H0 = W.copy(), H.copy()
    magnitude_prune(W, 0.5, H=H)
    magnitude_prune(W, 0.5)
    magnitude_nm(W, 2, 4, H=H)
    rtn_quantize(W, Int(bits=4), H=H)
    rtn_quantize(W, Int(bits=4))
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)
