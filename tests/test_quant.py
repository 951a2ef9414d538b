"""The quantization grid of ``obcjax.quant`` against the float64 NumPy reference.

``find_params`` (including the Lp-2.4 shrink search), ``quantize``, ``quantize_codes``,
``make_qarray`` and ``dequantize`` for every granularity, symmetric and asymmetric, 2..8 bits.
The reference (``tests/kernels/reference.py``) searches unit by unit in plain Python.

XLA rewrites a division by a constant as a multiplication by its reciprocal, so the kernel's
scales differ from the reference's by an ulp now and then: float64 grids are compared to 1e-13
relative, integer zero points exactly. Rounding is compared bit for bit on a shared grid.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obcjax.quant import dequantize, find_params, make_qarray, quantize, quantize_codes
from obcjax.specs import Int
from tests.kernels.reference import (
    expand_ref,
    find_params_ref,
    lp_error_ref,
    make_problem,
    quantize_ref,
)

ROWS, COLS, GROUP = 8, 16, 4

# every bit width with the search; the full range for the widths the solver tests use (the
# grid is compiled once per spec, which dominates the run time)
SPECS = [
    Int(bits, sym=sym, search=search, granularity=gran, group_size=GROUP if gran == "group" else None)
    for bits, sym, gran, search in itertools.product(
        range(2, 9), (True, False), ("channel", "group", "tensor"), ("lp", "minmax")
    )
    if search == "lp" or bits in (2, 3, 4, 8)
]


def _ids(spec: Int) -> str:
    return f"b{spec.bits}-{'sym' if spec.sym else 'asym'}-{spec.granularity}-{spec.search}"


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _weights(seed=0):
    W, _ = make_problem(ROWS, COLS, seed)
    W[1, 3] = 0.0  # an exact zero must stay exactly zero
    W[2] = np.abs(W[2])  # a row without negative values: the range still contains 0
    W[5, :GROUP] = 0.0  # an all-zero group: range [-1, 1]
    return W


def _units(W, spec):
    """``(row, group, values)`` of every unit of the spec's granularity."""
    rows, cols = W.shape
    if spec.granularity == "tensor":
        return [(0, 0, W.ravel())]
    g = spec.group_size if spec.granularity == "group" else cols
    return [(i, k, W[i, k * g : (k + 1) * g]) for i in range(rows) for k in range(cols // g)]


@pytest.mark.parametrize("spec", SPECS, ids=_ids)
def test_find_params_matches_reference_float64(x64, spec):
    W = _weights()
    scale, zero = find_params(W, spec)
    assert scale.dtype == np.float64
    scale, zero = np.asarray(scale), np.asarray(zero)
    rs, rz = find_params_ref(W, spec)
    ngroups = COLS // GROUP if spec.granularity == "group" else 1
    assert scale.shape == zero.shape == (ROWS, ngroups)
    np.testing.assert_allclose(scale, rs, rtol=1e-13, atol=0)
    np.testing.assert_array_equal(zero, rz)
    if spec.granularity == "tensor":
        assert np.all(scale == scale[0, 0]) and np.all(zero == zero[0, 0])


@pytest.mark.parametrize(
    "spec",
    [s for s in SPECS if s.bits in (3, 8) and s.search == "lp"],
    ids=_ids,
)
def test_find_params_float32_is_as_good_as_reference(spec):
    """In float32 a near-tie of the search may pick a neighbouring candidate; its objective must
    then be as small as the float64 optimum up to float32 round-off."""
    W = _weights().astype(np.float32).astype(np.float64)
    scale, zero = find_params(W.astype(np.float32), spec)
    assert scale.dtype == np.float32
    scale, zero = np.asarray(scale, np.float64), np.asarray(zero, np.float64)
    rs, rz = find_params_ref(W, spec)
    for i, k, x in _units(W, spec):
        if scale[i, k] == pytest.approx(rs[i, k], rel=1e-5) and zero[i, k] == rz[i, k]:
            continue
        got = lp_error_ref(x, scale[i, k], zero[i, k], spec.bits, spec.p)
        best = lp_error_ref(x, rs[i, k], rz[i, k], spec.bits, spec.p)
        assert got <= best * (1 + 1e-4), (i, k, scale[i, k], rs[i, k], got, best)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.bits in (2, 3, 8)], ids=_ids)
def test_quantize_codes_and_dequantize_bit_exact(x64, spec):
    W = _weights(1)
    scale, zero = find_params(W, spec)
    s, z = expand_ref(np.asarray(scale), np.asarray(zero), COLS)
    q = np.asarray(quantize(W, s, z, spec.bits))
    codes = np.asarray(quantize_codes(W, s, z, spec.bits))
    rq, rcodes = quantize_ref(W, s, z, spec.bits)
    assert codes.dtype == np.uint8
    np.testing.assert_array_equal(codes, rcodes)
    np.testing.assert_array_equal(q, rq)
    assert codes.min() >= 0 and codes.max() <= 2**spec.bits - 1
    qa = make_qarray(q, scale, zero, spec)
    assert qa.bits == spec.bits
    assert qa.group_size == (GROUP if spec.granularity == "group" else COLS)
    np.testing.assert_array_equal(np.asarray(qa.codes), rcodes)
    np.testing.assert_array_equal(np.asarray(dequantize(qa)), rq)
    np.testing.assert_array_equal(np.asarray(qa.dequantize()), rq)
    # zeros are exactly representable: they map to the zero point and back to 0
    assert q[1, 3] == 0.0 and codes[1, 3] == z[1, 3]
    assert np.all(q[5, :GROUP] == 0.0)


@pytest.mark.parametrize("spec", [s for s in SPECS if s.search == "lp"], ids=_ids)
def test_zero_on_every_grid_and_search_beats_minmax(x64, spec):
    W = _weights(2)
    scale, zero = find_params(W, spec)
    s, z = expand_ref(np.asarray(scale), np.asarray(zero), COLS)
    assert np.all(np.asarray(quantize(np.zeros_like(W), s, z, spec.bits)) == 0.0)
    assert np.all((z >= 0) & (z <= 2**spec.bits - 1) & (z == np.round(z)))
    mm = Int(spec.bits, spec.sym, "minmax", spec.granularity, spec.group_size)
    ms, mz = find_params(W, mm)
    scale, zero, ms, mz = map(np.asarray, (scale, zero, ms, mz))
    for i, k, x in _units(W, spec):
        lp = lp_error_ref(x, scale[i, k], zero[i, k], spec.bits, spec.p)
        full = lp_error_ref(x, ms[i, k], mz[i, k], spec.bits, spec.p)
        assert lp <= full * (1 + 1e-12)


def test_find_params_group_size_must_divide_width():
    W = np.ones((4, 10))
    with pytest.raises(ValueError, match="group size 4 does not divide the input width 10"):
        find_params(W, Int(4, granularity="group", group_size=4))


def test_find_params_rejects_non_matrix():
    with pytest.raises(ValueError, match="rows, cols"):
        find_params(np.ones(8), Int(4))


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 4.0])
def test_int_spec_rejects_bits_outside_2_to_8(bits):
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        Int(bits=bits)


def test_int_spec_group_needs_group_size():
    with pytest.raises(ValueError, match="group_size"):
        Int(4, granularity="group")


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    bits=st.sampled_from([2, 3, 4, 8]),
    sym=st.booleans(),
    gran=st.sampled_from(["channel", "group", "tensor"]),
    scale_exp=st.integers(-6, 6),
    zeros=st.floats(0.0, 0.5),
)
def test_grid_properties(seed, bits, sym, gran, scale_exp, zeros):
    """Codes in range, 0 on the grid, dequantize(codes) == quantized values, the search no worse
    than the full range, for weights of any magnitude and with many exact zeros."""
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((ROWS, COLS)) * 10.0**scale_exp
    W[rng.random(W.shape) < zeros] = 0.0
    spec = Int(bits, sym=sym, granularity=gran, group_size=GROUP if gran == "group" else None)
    with jax.enable_x64(True):
        scale, zero = find_params(W, spec)
        q = quantize(W, *expand_ref(np.asarray(scale), np.asarray(zero), COLS), bits)
        qa = make_qarray(q, scale, zero, spec)
        codes, deq = np.asarray(qa.codes), np.asarray(dequantize(qa))
        mm = Int(bits, sym, "minmax", gran, spec.group_size)
        ms, mz = (np.asarray(a) for a in find_params(W, mm))
    scale, zero, q = np.asarray(scale), np.asarray(zero), np.asarray(q)
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    assert codes.min() >= 0 and codes.max() < 2**bits
    np.testing.assert_array_equal(deq, q)
    assert np.all(q[W == 0] == 0.0)
    for i, k, x in _units(W, spec):
        lp = lp_error_ref(x, scale[i, k], zero[i, k], bits, spec.p)
        assert lp <= lp_error_ref(x, ms[i, k], mz[i, k], bits, spec.p) * (1 + 1e-12)
