"""GPTQ kernel vs the float64 NumPy reference, OBQ's fixed-order variant, RTN, and bad input."""

import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax.kernels import layer_loss, obq_quantize, prepare, rtn_quantize
from obcjax.kernels.gptq import Sweep, gptq_quantize, sweep
from obcjax.quant import find_params
from obcjax.specs import Int
from tests.kernels import reference_gptq as ref

ASYM = Int(bits=4, sym=False, search="minmax")


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


CASES = {
    "channel-asym": (ASYM, {}),
    "channel-sym-lp-3bit": (Int(bits=3), {}),
    "act-order": (ASYM, {"act_order": True}),
    "groups32-dynamic": (Int(bits=4, granularity="group", group_size=32), {}),
    "groups16-dynamic-asym": (
        Int(bits=3, sym=False, search="minmax", granularity="group", group_size=16),
        {},
    ),
    "groups32-static-act-order": (
        Int(bits=4, sym=False, search="minmax", granularity="group", group_size=32),
        {"act_order": True, "static_groups": True},
    ),
    "tensor-2bit-act-order": (Int(bits=2, granularity="tensor"), {"act_order": True}),
}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference_float64(x64, name):
    spec, kw = CASES[name]
    # 96 columns, blocksize 40: a ragged last block; column 7 is dead
    W, H, _ = ref.correlated_problem(20, 96, seed=1, dead=(7,))
    r = gptq_quantize(W, H, spec, blocksize=40, **kw)
    Wr, codes, scale, zero, row_loss = ref.gptq_np(W, H, spec, **kw)
    assert r.weights.dtype == jnp.float64
    np.testing.assert_array_equal(np.asarray(r.qarray.codes), codes)
    np.testing.assert_allclose(np.asarray(r.weights), Wr, rtol=0, atol=1e-8)
    np.testing.assert_allclose(np.asarray(r.qarray.scale), scale, rtol=1e-9)
    np.testing.assert_allclose(np.asarray(r.qarray.zero), zero, rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(r.row_loss), row_loss, rtol=1e-8, atol=1e-14)
    assert r.mask is None
    assert np.all(np.asarray(r.weights)[:, 7] == 0.0)


def test_loss_is_the_layer_loss(x64):
    W, H, _ = ref.correlated_problem(16, 80, seed=2, dead=(3,))
    r = gptq_quantize(W, H, Int(bits=3, granularity="group", group_size=16), blocksize=32)
    P = prepare(W, H)
    direct = float(layer_loss(P.W, r.weights, P.H))
    assert direct > 0
    assert float(r.loss) == pytest.approx(direct, rel=1e-9)
    assert float(jnp.sum(r.row_loss)) == pytest.approx(float(r.loss), rel=1e-12)


@pytest.mark.parametrize("spec", [ASYM, Int(bits=4), Int(bits=4, granularity="group", group_size=16)])
def test_equals_obq_fixed_order(x64, spec):
    # cols == blocksize, natural order: GPTQ is OBQ with the columns fixed left to right
    # (OBQ takes every grid from the prepared weights: GPTQ's static groups)
    W, H, _ = ref.correlated_problem(12, 64, seed=3)
    r = gptq_quantize(W, H, spec, blocksize=64, static_groups=True)
    o = obq_quantize(W, H, spec, order="natural", outlier_rule=False)
    np.testing.assert_array_equal(np.asarray(r.qarray.codes), np.asarray(o.qarray.codes))
    np.testing.assert_allclose(np.asarray(r.weights), np.asarray(o.weights), atol=1e-10)
    assert float(r.loss) == pytest.approx(float(o.loss), rel=1e-9)


def test_blocksize_changes_round_off_only(x64):
    W, H, _ = ref.correlated_problem(10, 100, seed=4)
    runs = [gptq_quantize(W, H, ASYM, blocksize=b) for b in (1, 7, 32, 128, 1000)]
    for r in runs[1:]:
        np.testing.assert_array_equal(np.asarray(r.qarray.codes), np.asarray(runs[0].qarray.codes))
        np.testing.assert_allclose(np.asarray(r.weights), np.asarray(runs[0].weights), atol=1e-12)


def test_float32_agrees_loosely_with_reference():
    W, H, _ = ref.correlated_problem(32, 128, seed=5)
    r = gptq_quantize(W.astype(np.float32), H.astype(np.float32), ASYM)
    assert r.weights.dtype == jnp.float32
    _, codes, _, _, row_loss = ref.gptq_np(W, H, ASYM)
    same = np.mean(np.asarray(r.qarray.codes) == codes)
    assert same > 0.97, same
    assert float(r.loss) == pytest.approx(row_loss.sum(), rel=0.03)


@pytest.mark.parametrize(
    "spec, kw",
    [
        (ASYM, {}),
        (Int(bits=3), {"act_order": True}),
        (Int(bits=2, sym=False, search="minmax"), {}),
        (Int(bits=4, granularity="group", group_size=32), {}),
    ],
)
def test_never_worse_than_rtn(spec, kw):
    W, H, _ = ref.correlated_problem(32, 128, seed=6)
    W, H = W.astype(np.float32), H.astype(np.float32)
    g = gptq_quantize(W, H, spec, **kw)
    r = rtn_quantize(W, spec, H=H)
    P = prepare(W, H)
    lg = float(layer_loss(P.W, g.weights, P.H))
    lr = float(layer_loss(P.W, r.weights, P.H))
    assert lg < lr, (lg, lr)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_codes_in_range_and_qarray_consistent(bits):
    W, H, _ = ref.correlated_problem(8, 64, seed=7)
    spec = Int(bits=bits, granularity="group", group_size=32)
    r = gptq_quantize(W.astype(np.float32), H.astype(np.float32), spec, blocksize=16)
    codes = np.asarray(r.qarray.codes)
    assert codes.dtype == np.uint8 and codes.shape == (8, 64)
    assert codes.min() >= 0 and codes.max() <= 2**bits - 1
    assert r.qarray.scale.shape == (8, 2) and r.qarray.group_size == 32 and r.qarray.bits == bits
    np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), np.asarray(r.weights))


def test_static_groups_use_the_grid_of_the_original_weights(x64):
    spec = Int(bits=4, sym=False, search="minmax", granularity="group", group_size=16)
    W, H, _ = ref.correlated_problem(6, 64, seed=8)
    r = gptq_quantize(W, H, spec, act_order=True, static_groups=True)
    scale, zero = find_params(prepare(W, H).W, spec)
    np.testing.assert_array_equal(np.asarray(r.qarray.scale), np.asarray(scale))
    np.testing.assert_array_equal(np.asarray(r.qarray.zero), np.asarray(zero))
    # dynamic groups recompute on compensated weights: the later groups' scales differ
    d = gptq_quantize(W, H, spec)
    assert not np.allclose(np.asarray(d.qarray.scale)[:, 1:], np.asarray(scale)[:, 1:])


def test_inputs_not_mutated():
    W, H, _ = ref.correlated_problem(8, 48, seed=9, dead=(0,))
    W, H = W.astype(np.float32), H.astype(np.float32)
    W0, H0 = W.copy(), H.copy()
    gptq_quantize(W, H, ASYM, act_order=True)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)


def _sweep_jaxpr_size(cols):
    plan = Sweep(cols=cols, block=32, sub=32, unit=1, bits=4)
    args = (
        jnp.zeros((4, cols)),
        jnp.eye(cols),
        jnp.ones((4, 1)),
        jnp.zeros((4, 1)),
        jnp.zeros((cols,), jnp.int32),
        jnp.zeros((cols // 32,), jnp.int32),
    )
    jaxpr = jax.make_jaxpr(functools.partial(sweep, plan=plan))(*args)
    return _count_eqns(jaxpr.jaxpr)


def _count_eqns(jaxpr):
    # equations, nested sub-programs (loops, conds) included; printed lines would also count
    # line wraps of longer literals
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            n += _count_eqns(sub)
    return n


def test_trace_does_not_grow_with_width():
    # the column loop is a fori_loop, never unrolled: the program has the same size at any width
    assert _sweep_jaxpr_size(64) == _sweep_jaxpr_size(1024)


def test_equal_shapes_do_not_retrace():
    W, H, _ = ref.correlated_problem(8, 48, seed=10)
    W, H = W.astype(np.float32), H.astype(np.float32)
    gptq_quantize(W, H, ASYM)
    before = sweep._cache_size()
    gptq_quantize(W + 0.01, H, ASYM)
    assert sweep._cache_size() == before


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_group_size_must_divide_width():
    W, H, _ = ref.correlated_problem(4, 48, seed=11)
    with pytest.raises(ValueError, match=r"'fc1'.*group size 32 does not divide the input width 48"):
        gptq_quantize(W, H, Int(bits=4, granularity="group", group_size=32), layer="fc1")


def test_act_order_with_dynamic_groups_is_refused():
    W, H, _ = ref.correlated_problem(4, 64, seed=12)
    spec = Int(bits=4, granularity="group", group_size=32)
    with pytest.raises(ValueError, match="static_groups=True"):
        gptq_quantize(W, H, spec, act_order=True, layer="fc1")
    gptq_quantize(W, H, spec, act_order=True, static_groups=True)  # the suggested fix works


@pytest.mark.parametrize("bits", [0, 1, 9, 16])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        Int(bits=bits)


def test_wrong_spec_and_blocksize():
    W, H, _ = ref.correlated_problem(4, 32, seed=13)
    with pytest.raises(TypeError, match="spec: expected a number of bits"):
        gptq_quantize(W, H, 4.5)
    with pytest.raises(ValueError, match="blocksize must be a positive int"):
        gptq_quantize(W, H, ASYM, blocksize=0)
    with pytest.raises(ValueError, match=r"H must be \(cols, cols\)"):
        gptq_quantize(W, H[:16, :16], ASYM)
