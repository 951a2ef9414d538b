"""SparseGPT kernel vs the float64 NumPy reference, exact patterns, loss, baselines, bad input."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend import core as jax_core

from obcjax.kernels import layer_loss, magnitude_nm, magnitude_prune, prepare, rtn_quantize
from obcjax.kernels.exactobs import Result
from obcjax.kernels.gptq import Sweep, sweep
from obcjax.kernels.sparsegpt import block_counts, sparsegpt_prune
from obcjax.specs import NM, Block, Int, Unstructured
from tests.kernels import reference_gptq as ref

ASYM4 = Int(bits=4, sym=False, search="minmax")

# name: (prune spec, quant spec, blocksize). 96 columns with blocksize 40 leave a ragged last
# block; NM(1, 3) makes the sub-block width 33, not a power of two.
CASES = {
    "unstructured-50-ragged": (Unstructured(0.5), None, 40),
    "unstructured-70-bs32": (Unstructured(0.7), None, 32),
    "unstructured-ties": (Unstructured(0.1), None, 32),
    "nm-2-4": (NM(2, 4), None, 40),
    "nm-1-3": (NM(1, 3), None, 40),
    "joint-50-4bit-asym": (Unstructured(0.5), ASYM4, 40),
    "joint-2-4-3bit-group32-lp": (NM(2, 4), Int(bits=3, granularity="group", group_size=32), 128),
}
ROWS, COLS, DEAD = 16, 96, 7


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _problem(name):
    W, H, _ = ref.correlated_problem(ROWS, COLS, seed=1, dead=(DEAD,))
    if name == "unstructured-ties":
        # 80 exact zeros in the first block but only 51 to prune there: the mask must follow
        # the row-major tie order; row 3 also has a group of four zeros (N:M column order)
        W[:, 0:5] = 0.0
    W[3, 12:16] = 0.0
    return W, H


@functools.cache
def _kernel_and_reference(name):
    prune, quant, bs = CASES[name]
    W, H = _problem(name)
    with jax.enable_x64(True):
        r = sparsegpt_prune(W, H, prune, quant=quant, blocksize=bs)
        r = jax.tree.map(np.asarray, r)
    return r, ref.sparsegpt_np(W, H, prune, quant=quant, blocksize=bs)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_numpy_reference_float64(x64, name):
    r, (Wr, keep, row_loss) = _kernel_and_reference(name)
    assert isinstance(r, Result) and r.weights.dtype == np.float64
    np.testing.assert_array_equal(r.mask, keep)
    np.testing.assert_allclose(r.weights, Wr, rtol=0, atol=1e-9)
    np.testing.assert_allclose(r.row_loss, row_loss, rtol=1e-8, atol=1e-14)
    assert float(r.loss) == pytest.approx(row_loss.sum(), rel=1e-9)
    assert np.all(r.weights[:, DEAD] == 0.0)
    if name != "unstructured-ties":  # there, more zero scores tie than there are zeros to make
        assert not np.any(r.mask[:, DEAD])
    _, quant, _ = CASES[name]
    if quant is None:
        assert r.qarray is None
    else:
        np.testing.assert_array_equal(np.asarray(r.qarray.dequantize()), r.weights)


@pytest.mark.parametrize("name", list(CASES))
def test_exact_pattern(name):
    prune, _, bs = CASES[name]
    r, _ = _kernel_and_reference(name)
    assert np.all(r.weights[~r.mask] == 0.0)
    if isinstance(prune, NM):
        zeros = (~r.mask).reshape(ROWS, COLS // prune.m, prune.m).sum(-1)
        assert np.all(zeros == prune.n)
    else:
        assert (~r.mask).sum() == math.floor(prune.sparsity * ROWS * COLS + 0.5)
        per_block = [(~r.mask[:, i : i + bs]).sum() for i in range(0, COLS, bs)]
        np.testing.assert_array_equal(per_block, block_counts(prune.sparsity, ROWS, COLS, bs))


def test_ties_follow_row_major_order():
    r, _ = _kernel_and_reference("unstructured-ties")
    k0 = block_counts(0.1, ROWS, COLS, 32)[0]
    pruned0 = np.flatnonzero(~r.mask[:, :32].ravel())
    Wp = ref.prepare_np(*_problem("unstructured-ties"))[0]
    zeros0 = np.flatnonzero(Wp[:, :32].ravel() == 0.0)  # columns 0-4, the dead one, row 3's four
    assert k0 < zeros0.size
    np.testing.assert_array_equal(pruned0, zeros0[:k0])


def test_qarray_codes_and_pruned_zero_points(x64):
    r, _ = _kernel_and_reference("joint-50-4bit-asym")
    qa = r.qarray
    assert qa.bits == 4 and qa.codes.dtype == jnp.uint8 and qa.codes.shape == (ROWS, COLS)
    zero = np.broadcast_to(np.asarray(qa.zero), (ROWS, COLS))
    np.testing.assert_array_equal(np.asarray(qa.codes)[~r.mask], zero[~r.mask])
    # the grid is the dense prepared weights' grid (SparseGPT finds it before pruning)
    W, H = _problem("joint-50-4bit-asym")
    s, z = ref.grid_table_np(ref.prepare_np(W, H)[0], ASYM4)
    np.testing.assert_allclose(np.asarray(qa.scale), s, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(qa.zero), z)


@pytest.mark.parametrize("prune", [0.0, Unstructured(0.0)])
def test_zero_sparsity_is_identity(x64, prune):
    W, H = _problem("dense")
    r = sparsegpt_prune(W, H, prune, blocksize=40)
    Wp = np.asarray(prepare(W, H).W)
    np.testing.assert_array_equal(np.asarray(r.weights), Wp)
    assert np.all(np.asarray(r.mask)) and float(r.loss) == 0.0


def test_float_sparsity_equals_unstructured_spec(x64):
    W, H = _problem("dense")
    a = sparsegpt_prune(W, H, 0.5, blocksize=40)
    b, _ = _kernel_and_reference("unstructured-50-ragged")
    np.testing.assert_array_equal(np.asarray(a.mask), b.mask)
    np.testing.assert_array_equal(np.asarray(a.weights), b.weights)


@pytest.mark.parametrize("name", ["unstructured-50-ragged", "nm-2-4", "joint-50-4bit-asym"])
def test_loss_is_the_true_layer_error(x64, name):
    prune, quant, bs = CASES[name]
    # no damping and no dead input: the prepared H is 2/N XᵀX itself, so the returned loss must
    # be the output error ||(W - Ŵ) Xᵀ||² / N measured on the calibration inputs
    W, _, X = ref.correlated_problem(ROWS, COLS, seed=2, samples=3 * COLS)
    H = (2.0 / X.shape[0]) * (X.T @ X)
    r = sparsegpt_prune(W, H, prune, quant=quant, blocksize=bs, rel_damp=0.0)
    D = np.asarray(r.weights) - W
    direct = np.sum((D @ X.T) ** 2) / X.shape[0]
    assert direct > 0
    assert float(r.loss) == pytest.approx(direct, rel=1e-8)
    assert float(r.loss) == pytest.approx(float(layer_loss(W, r.weights, H)), rel=1e-8)
    rows = np.sum((D @ X.T) ** 2, axis=1) / X.shape[0]
    np.testing.assert_allclose(np.asarray(r.row_loss), rows, rtol=1e-7)


def test_blocksize_is_a_speed_knob_for_nm(x64):
    W, H = _problem("dense")
    a = sparsegpt_prune(W, H, NM(2, 4), blocksize=8)  # rounded up to one 32-column sub-block
    b, _ = _kernel_and_reference("nm-2-4")
    np.testing.assert_array_equal(np.asarray(a.mask), b.mask)
    np.testing.assert_allclose(np.asarray(a.weights), b.weights, atol=1e-12)


@pytest.fixture(scope="module")
def wide_problem():
    W, H, _ = ref.correlated_problem(64, 256, seed=3)
    return W.astype(np.float32), H.astype(np.float32)


@pytest.mark.parametrize("prune", [Unstructured(0.5), NM(2, 4)])
def test_beats_magnitude_on_correlated_inputs(wide_problem, prune):
    W, H = wide_problem
    s = sparsegpt_prune(W, H, prune)
    if isinstance(prune, NM):
        m = magnitude_nm(W, prune.n, prune.m, H=H)
    else:
        m = magnitude_prune(W, prune.sparsity, H=H)
    P = prepare(W, H)
    ls = float(layer_loss(P.W, s.weights, P.H))
    lm = float(layer_loss(P.W, m.weights, P.H))
    assert ls < 0.8 * lm, (ls, lm)
    assert float(s.loss) == pytest.approx(ls, rel=1e-3)


def test_joint_beats_magnitude_then_rtn(wide_problem):
    W, H = wide_problem
    s = sparsegpt_prune(W, H, NM(2, 4), quant=ASYM4)
    m = magnitude_nm(W, 2, 4)
    q = rtn_quantize(m.weights, ASYM4)
    P = prepare(W, H)
    ls = float(layer_loss(P.W, s.weights, P.H))
    lm = float(layer_loss(P.W, jnp.where(m.mask, q.weights, 0.0), P.H))
    assert ls < 0.8 * lm, (ls, lm)


def test_float32_agrees_with_float64_reference(wide_problem):
    W, H = wide_problem
    r = sparsegpt_prune(W, H, NM(2, 4))
    _, keep, row_loss = ref.sparsegpt_np(W, H, NM(2, 4))
    assert r.weights.dtype == jnp.float32
    assert np.mean(np.asarray(r.mask) == keep) > 0.98
    assert float(r.loss) == pytest.approx(row_loss.sum(), rel=0.02)


def test_inputs_not_mutated(wide_problem):
    W, H = (a.copy() for a in wide_problem)
    W[:, 5] = 0.0
    H[5, :] = H[:, 5] = 0.0  # a dead input: preparation rewrites W and H, on copies only
    W0, H0 = W.copy(), H.copy()
    Wj, Hj = jnp.asarray(W), jnp.asarray(H)
    sparsegpt_prune(W, H, Unstructured(0.5))
    sparsegpt_prune(Wj, Hj, NM(2, 4), quant=ASYM4)
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)
    np.testing.assert_array_equal(np.asarray(Wj), W0)
    np.testing.assert_array_equal(np.asarray(Hj), H0)


# --------------------------------------------------------------------------------------------
# compile size
# --------------------------------------------------------------------------------------------


def _count_eqns(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for sub in jax_core.jaxprs_in_params(eqn.params):
            n += _count_eqns(sub)
    return n


def _sweep_size(cols, prune, bits):
    unit = 4 if prune == "nm" else 1
    plan = Sweep(cols=cols, block=32, sub=32, unit=unit, bits=bits, prune=prune, nm_n=2)
    args = (
        jnp.zeros((4, cols)),
        jnp.eye(cols),
        jnp.ones((4, 2)),
        jnp.zeros((4, 2)),
        jnp.zeros((cols,), jnp.int32),
        jnp.zeros((cols // 32,), jnp.int32),
    )
    return _count_eqns(jax.make_jaxpr(functools.partial(sweep, plan=plan))(*args).jaxpr)


@pytest.mark.parametrize("prune", ["unstructured", "nm"])
@pytest.mark.parametrize("bits", [None, 4])
def test_trace_does_not_grow_with_width(prune, bits):
    assert _sweep_size(64, prune, bits) == _sweep_size(2048, prune, bits)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), 1.5])
def test_sparsity_out_of_range_names_layer(bad):
    W, H, _ = ref.correlated_problem(4, 32, seed=5)
    with pytest.raises(ValueError, match=r"layer 'fc1'.*sparsity.*\[0, 1\)"):
        sparsegpt_prune(W, H, bad, layer="fc1")


@pytest.mark.parametrize("bad", [Block(0.5, 4), True, None, Int(bits=4)])
def test_wrong_prune_type_names_layer(bad):
    W, H, _ = ref.correlated_problem(4, 32, seed=5)
    with pytest.raises(TypeError, match=r"layer 'fc1'.*Unstructured or obcjax.specs.NM"):
        sparsegpt_prune(W, H, bad, layer="fc1")


def test_bad_shapes_and_specs_name_layer():
    W, H, _ = ref.correlated_problem(4, 30, seed=6)
    with pytest.raises(ValueError, match=r"'fc1'.*2:4 needs the input width to be a multiple of 4"):
        sparsegpt_prune(W, H, NM(2, 4), layer="fc1")
    with pytest.raises(
        ValueError, match=r"'fc1'.*group size 16 does not divide the input width 30"
    ):
        sparsegpt_prune(
            W, H, 0.5, quant=Int(bits=4, granularity="group", group_size=16), layer="fc1"
        )
    with pytest.raises(TypeError, match=r"'fc1'.*quant: expected a number of bits"):
        sparsegpt_prune(W, H, 0.5, quant=NM(2, 4), layer="fc1")
    with pytest.raises(ValueError, match=r"'fc1'.*blocksize must be a positive int"):
        sparsegpt_prune(W, H, 0.5, blocksize=0, layer="fc1")
    with pytest.raises(ValueError, match=r"'fc1'.*H must be \(cols, cols\)"):
        sparsegpt_prune(W, H[:10, :10], 0.5, layer="fc1")
    Wn = W.copy()
    Wn[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"'fc1'.*W has 1 non-finite"):
        sparsegpt_prune(Wn, H, 0.5, layer="fc1")
