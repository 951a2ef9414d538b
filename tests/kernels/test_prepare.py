"""``obcjax.kernels.prepare`` / ``layer_loss`` against the float64 reference, and input checks.

Preparation (kernel contract): dead inputs (``diag H == 0``) get ``H_jj = 1`` and a zero weight
column, then ``rel_damp · mean(diag H)`` is added to the diagonal and ``H`` is inverted by
Cholesky, escalating the damping if that fails and refusing indefinite matrices. Bad input to
any solver must raise ``ValueError`` naming the layer; inputs are never mutated.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest

from obcjax.kernels import (
    exactobs_block,
    exactobs_nm,
    exactobs_prune,
    layer_loss,
    magnitude_nm,
    magnitude_prune,
    obq_prune_quantize,
    obq_quantize,
    prepare,
    rtn_quantize,
)
from obcjax.specs import NM, Int, Unstructured
from tests.kernels.reference import layer_loss_ref, make_problem, prepare_ref


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def _close(a, b, tol):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    err = np.max(np.abs(a - b)) if a.size else 0.0
    assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs error {err:.3g}"


@pytest.mark.parametrize("rel_damp", [0.0, 0.01, 0.1])
def test_prepare_matches_reference_float64(x64, rel_damp):
    W, H = make_problem(6, 24, seed=3, dead=[0, 7])
    P = prepare(W, H, rel_damp=rel_damp)
    R = prepare_ref(W, H, rel_damp)
    assert P.W.dtype == P.H.dtype == P.Hinv.dtype == np.float64
    np.testing.assert_array_equal(np.asarray(P.dead), R.dead)
    assert R.dead.tolist() == [j in (0, 7) for j in range(24)]
    assert P.damp == pytest.approx(R.damp, rel=1e-12)
    np.testing.assert_array_equal(np.asarray(P.W), R.W)
    _close(P.H, R.H, 1e-13)
    _close(P.Hinv, R.Hinv, 1e-9)
    _close(np.asarray(P.Hinv) @ R.H, np.eye(24), 1e-9)
    # dead inputs are decoupled exactly, so their weights can never be revived by a compensation
    assert np.all(np.asarray(P.Hinv)[[0, 7]][:, np.r_[1:7, 8:24]] == 0.0)


def test_prepare_matches_reference_float32():
    W, H = make_problem(6, 24, seed=3, dead=[5])
    W32, H32 = W.astype(np.float32), H.astype(np.float32)
    P = prepare(W32, H32)
    R = prepare_ref(W32, H32)
    assert P.W.dtype == P.Hinv.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(P.dead), R.dead)
    _close(P.W, R.W, 0)
    _close(P.H, R.H, 1e-6)
    _close(P.Hinv, R.Hinv, 1e-4)


def test_dead_column_gets_the_mean_live_diagonal(x64):
    H = np.diag([0.0, 2.0, 4.0, 6.0])
    P = prepare(np.ones((2, 4)), H, rel_damp=0.5)
    # the dead entry gets the mean live diagonal (4), so the mean of (4, 2, 4, 6) is 4: the
    # damping does not depend on the scale of H (the OBC reference's 1 would make it 3.25 here
    # and something else at H·10)
    assert float(P.damp) == pytest.approx(0.5 * 4.0)
    assert float(prepare(np.ones((2, 4)), 10 * H, rel_damp=0.5).damp) == pytest.approx(20.0)
    np.testing.assert_allclose(np.diag(np.asarray(P.H)), [4, 2, 4, 6] + np.array(0.5 * 4.0))
    np.testing.assert_array_equal(np.asarray(P.W)[:, 0], 0.0)
    np.testing.assert_array_equal(np.asarray(P.W)[:, 1:], 1.0)


def test_layer_loss_matches_reference(x64):
    W, H = make_problem(5, 12, seed=4)
    rng = np.random.default_rng(0)
    What = W + 0.1 * rng.standard_normal((3, 5, 12))
    got = np.asarray(layer_loss(W, What, H))
    assert got.shape == (3,)
    np.testing.assert_allclose(got, layer_loss_ref(W, What, H), rtol=1e-12)
    D = What[1] - W
    assert float(layer_loss(W, What[1], H)) == pytest.approx(0.5 * np.trace(D @ H @ D.T), rel=1e-12)
    assert float(layer_loss(W, W, H)) == 0.0


def test_singular_hessian_escalates_damping(x64):
    """With no damping a rank-deficient (but PSD) H has no Cholesky factor: damping must rise."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((3, 10))  # 3 samples for 10 inputs: rank 3
    H = 2.0 * X.T @ X / 3
    H = 0.5 * (H + H.T)
    P = prepare(rng.standard_normal((4, 10)), H, rel_damp=0.0)
    assert P.damp > 0
    Hd = np.asarray(P.H)
    _close(Hd, H + P.damp * np.eye(10), 1e-13)
    _close(np.asarray(P.Hinv) @ Hd, np.eye(10), 1e-6)
    assert np.all(np.isfinite(np.asarray(P.Hinv)))


def test_prepare_never_mutates_inputs(x64):
    W, H = make_problem(4, 8, seed=5, dead=[2])
    W0, H0 = W.copy(), H.copy()
    prepare(W, H)
    exactobs_prune(W, H, 0.5, method="naive")
    obq_quantize(W, H, Int(4), method="naive")
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)


# ------------------------------------------------------------------------------------------------
# bad input, for every solver that takes a Hessian
# ------------------------------------------------------------------------------------------------

SOLVERS = {
    "prepare": lambda W, H, layer: prepare(W, H, layer=layer),
    "exactobs_prune": lambda W, H, layer: exactobs_prune(W, H, 0.5, layer=layer),
    "exactobs_nm": lambda W, H, layer: exactobs_nm(W, H, 2, 4, layer=layer),
    "exactobs_block": lambda W, H, layer: exactobs_block(W, H, 0.5, 4, layer=layer),
    "obq_quantize": lambda W, H, layer: obq_quantize(W, H, Int(4), layer=layer),
    "obq_prune_quantize": lambda W, H, layer: obq_prune_quantize(
        W, H, Unstructured(0.5), Int(4), layer=layer
    ),
    "obq_prune_quantize_nm": lambda W, H, layer: obq_prune_quantize(
        W, H, NM(2, 4), Int(4), layer=layer
    ),
    "magnitude_prune": lambda W, H, layer: magnitude_prune(W, 0.5, H=H, layer=layer),
    "magnitude_nm": lambda W, H, layer: magnitude_nm(W, 2, 4, H=H, layer=layer),
    "rtn_quantize": lambda W, H, layer: rtn_quantize(W, Int(4), H=H, layer=layer),
}


def _bad_inputs():
    W, H = make_problem(4, 8, seed=6)
    nanW = W.copy()
    nanW[1, 2] = np.nan
    infH = H.copy()
    infH[3, 3] = np.inf
    nanH = H.copy()
    nanH[0, 1] = nanH[1, 0] = np.nan
    asym = H.copy()
    asym[0, 5] += 0.5 * np.abs(H).max()
    lam, Q = np.linalg.eigh(H)
    lam[0] = -0.5 * lam.mean()  # a clearly negative eigenvalue, well beyond the 1% damping
    indef = Q @ np.diag(lam) @ Q.T
    indef = 0.5 * (indef + indef.T)
    return {
        "H-too-small": (W, H[:6, :6], r"\(cols, cols\) = \(8, 8\)"),
        "H-not-square": (W, H[:, :6], r"\(cols, cols\) = \(8, 8\)"),
        "W-1d": (W[0], H, r"\(rows, cols\)"),
        "W-3d": (W[None], H, r"\(rows, cols\)"),
        "nan-in-W": (nanW, H, r"W has 1 non-finite"),
        "inf-in-H": (W, infH, r"H has 1 non-finite"),
        "nan-in-H": (W, nanH, r"H has 2 non-finite"),
        "asymmetric-H": (W, asym, "not symmetric"),
        "indefinite-H": (W, indef, "indefinite"),
    }


BAD = _bad_inputs()


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("solver", sorted(SOLVERS))
def test_bad_input_raises_value_error_naming_the_layer(solver, case):
    W, H, pattern = BAD[case]
    with pytest.raises(ValueError, match=pattern) as info:
        SOLVERS[solver](W, H, "block3/fc1")
    assert "block3/fc1" in str(info.value)


@pytest.mark.parametrize("rel_damp", [-0.01, float("nan"), float("inf")])
def test_bad_rel_damp(rel_damp):
    W, H = make_problem(4, 8, seed=6)
    with pytest.raises(ValueError, match="rel_damp"):
        prepare(W, H, rel_damp=rel_damp, layer="fc")
