"""ExactOBS pruning (unstructured, N:M, block) against the float64 NumPy reference, plus properties.

Frantar, Singh, Alistarh, *Optimal Brain Compression* (NeurIPS 2022), §3-4: every row runs its own
greedy OBS elimination with the prepared inverse Hessian; unstructured and block pruning then rank
the running maxima of all rows' step losses together (OBC's layer-wise allocation). The reference
(``tests/kernels/reference.py``) carries a full per-row inverse and a trace of every step, so the
kernels' left-looking ``fast`` form, the ``naive`` rank-1 form, the early stop of a single level and
the order-only rebuild of the weights are all checked against the same slow, obvious code.

Compilation dominates the run time, so nearly everything uses one small shape (``ROWS × COLS``)
in float64; ``WIDE`` problems exist only to reach the fast kernel's compaction phases (they start
at 96 elimination steps). Bad shapes, non-finite and indefinite inputs are tested in
``test_prepare.py`` for every solver and are not repeated here.

Example:
    .venv/bin/pytest tests/kernels/test_exactobs.py
"""

from __future__ import annotations

import importlib
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from obcjax.kernels import (
    allocate_counts,
    elimination_order,
    exactobs_block,
    exactobs_nm,
    exactobs_prune,
    magnitude_nm,
    magnitude_prune,
    prepare,
    rebuild_levels,
)
from obcjax.kernels._engine import PruneRule, blocked_plan, greedy_row_naive, phase_plan
from tests.kernels.reference import (
    allocate_ref,
    exactobs_block_ref,
    exactobs_nm_ref,
    exactobs_prune_ref,
    layer_loss_ref,
    ls_reconstruction_ref,
    make_problem,
    prepare_ref,
    row_loss_ref,
)

exactobs = importlib.import_module("obcjax.kernels.exactobs")
prepare_mod = importlib.import_module("obcjax.kernels.prepare")

ROWS, COLS, DEAD = 6, 32, (5,)
# the fast kernel compacts its free columns between phases, which start at 96 elimination steps:
# 128 columns give two phases for a full pass and for 3:4
WIDE, WIDE_DEAD, WIDE_SEED = (4, 128), (7,), 1
PROPS = settings(max_examples=12, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def _problem(seed, shape=(ROWS, COLS), dead=DEAD, tiny_row=True):
    """A correlated problem with a dead input and (optionally) one row of tiny weights.

    The tiny row's steps are the cheapest of the layer, so the allocation hands it all of its
    weights: with ``method="fast"`` and one level this forces the early-stopped pass to re-run it.
    """
    W, H = make_problem(*shape, seed, dead=dead)
    if tiny_row:
        W[shape[0] // 3] *= 1e-3
    return W, H


def _spy(monkeypatch, module, name):
    calls = []
    original = getattr(module, name)

    def wrapper(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


def _check_against_reference(r, R, W, H, *, atol=1e-10, rtol=1e-9):
    """Same masks, weights within ``atol``, losses equal to the reference and to the layer error."""
    P = prepare_ref(W, H)
    weights, mask = np.asarray(r.weights), np.asarray(r.mask)
    assert weights.dtype == np.float64 and mask.dtype == bool
    assert weights.shape == R.weights.shape and mask.shape == R.mask.shape
    np.testing.assert_array_equal(mask, R.mask)
    assert np.all(weights[~mask] == 0.0)
    np.testing.assert_allclose(weights, R.weights, rtol=0, atol=atol)
    np.testing.assert_allclose(np.asarray(r.row_loss), R.row_loss, rtol=rtol, atol=1e-15)
    np.testing.assert_allclose(np.asarray(r.loss), R.loss, rtol=rtol, atol=1e-15)
    true = layer_loss_ref(P.W, weights, P.H)
    np.testing.assert_allclose(np.asarray(r.loss), true, rtol=rtol, atol=1e-15)


# ------------------------------------------------------------------------------------------------
# unstructured ExactOBS vs the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["naive", "fast", "blocked"])
def test_prune_single_level_matches_reference(method, monkeypatch):
    W, H = _problem(3)
    calls = _spy(monkeypatch, exactobs, "elimination_order")
    r = exactobs_prune(W, H, 0.5, method=method)
    R = exactobs_prune_ref(W, H, 0.5)
    assert R.margin > 1e-6  # well separated: float64 round-off cannot flip a decision
    _check_against_reference(r, R, W, H)
    assert np.all(np.asarray(r.weights)[:, DEAD] == 0.0)
    assert int(np.asarray(r.mask)[ROWS // 3].sum()) == 0  # the tiny row is pruned entirely
    steps = [kw["nsteps"] for _, kw in calls]
    if method != "naive":
        # an early-stopped pass (ceil(32 · (0.5 + 0.5/4)) = 20 steps), then the full re-run of the
        # rows the allocation emptied: the path whose counts must equal a full pass
        assert steps == [20, COLS]
        assert calls[1][0][0].W.shape[0] == 1
    else:
        assert steps == [COLS]


def test_pruned_weights_are_the_optimal_reconstruction_of_their_mask():
    """Independent of the greedy: kept weights solve the least-squares problem for that support."""
    W, H = _problem(3)
    r = exactobs_prune(W, H, 0.5, method="naive")
    P = prepare_ref(W, H)
    mask = np.asarray(r.mask)
    for i in range(ROWS):
        expected = ls_reconstruction_ref(P.W[i], P.H, ~mask[i])
        np.testing.assert_allclose(np.asarray(r.weights)[i], expected, rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "method, shape", [("naive", (ROWS, COLS)), ("fast", WIDE), ("blocked", WIDE)]
)
def test_prune_levels_from_one_pass_match_reference(method, shape):
    levels = [0.25, 0.5, 0.9]
    if shape == WIDE:
        W, H = _problem(WIDE_SEED, WIDE, dead=WIDE_DEAD, tiny_row=False)
    else:
        W, H = _problem(3)
    if method == "fast":
        assert len(phase_plan(shape[1], shape[1])) >= 2  # the compaction between phases is run
    if method == "blocked":
        block, phases = blocked_plan(shape[1], shape[1])
        assert len(phases) >= 2 and shape[1] // block >= 8  # compactions and many block updates
    r = exactobs_prune(W, H, levels, method=method)
    R = exactobs_prune_ref(W, H, levels)
    assert R.margin > 1e-6
    assert (
        r.weights.shape == (3, *shape)
        and r.loss.shape == (3,)
        and r.row_loss.shape == (3, shape[0])
    )
    _check_against_reference(r, R, W, H, atol=1e-9)


def test_levels_equal_separate_single_level_calls():
    W, H = _problem(3)
    many = exactobs_prune(W, H, [0.25, 0.5, 0.9], method="naive")
    one = exactobs_prune(W, H, 0.5, method="naive")
    np.testing.assert_array_equal(np.asarray(many.mask[1]), np.asarray(one.mask))
    np.testing.assert_allclose(np.asarray(many.weights[1]), np.asarray(one.weights), atol=1e-12)
    assert float(many.loss[1]) == pytest.approx(float(one.loss), rel=1e-12)


def test_elimination_order_and_step_losses_match_reference():
    W, H = _problem(3)
    order, losses = elimination_order(prepare(W, H), method="naive")
    R = exactobs_prune_ref(W, H, 0.5)
    np.testing.assert_array_equal(np.asarray(order), R.order)
    np.testing.assert_allclose(np.asarray(losses), R.step_loss, rtol=1e-9, atol=1e-18)
    # the dead input costs nothing and goes first in every row
    np.testing.assert_array_equal(np.asarray(order)[:, 0], DEAD[0])


def test_allocate_counts_matches_reference_with_ties():
    rng = np.random.default_rng(0)
    # small integers: many exact ties (broken row-major) and rows whose losses go down and up again
    losses = rng.integers(0, 5, size=(5, 7)).astype(np.float64)
    losses[2] = 0.0
    ks = [0, 1, 6, 13, 20, 34, 35]
    counts = allocate_counts(losses, ks)
    assert counts.shape == (len(ks), 5)
    for k, c in zip(ks, counts):
        expected, _ = allocate_ref(losses, k)
        np.testing.assert_array_equal(c, expected)
        assert c.sum() == k
    assert np.all(np.diff(counts, axis=0) >= 0)  # more compression only extends each row's prefix


def test_allocate_counts_ranks_running_maxima():
    # row 0's second step is cheap but sits behind an expensive first one: it cannot be taken alone
    losses = np.array([[5.0, 0.0, 0.0], [1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(allocate_counts(losses, [2, 3, 4]), [[0, 2], [0, 3], [1, 3]])


@pytest.mark.parametrize("path", ["solve", "chol"])
def test_rebuild_levels_is_the_closed_form_reconstruction(path, monkeypatch):
    """Any elimination order and counts: the weights are the least-squares fit for that support."""
    rows, cols = WIDE
    W, H = make_problem(rows, cols, WIDE_SEED, dead=WIDE_DEAD)
    rng = np.random.default_rng(1)
    perm = np.stack([rng.permutation(cols) for _ in range(rows)])
    if path == "solve":  # one level, few eliminations: a small solve with Hinv[S, S]
        counts = np.array([[0, 5, 17, 30]])
    else:  # many eliminations: one Cholesky per row in pivot order
        counts = np.array([[cols, 90, 80, 0], [60, 50, cols, 40], [3, 3, 3, 3]])
    used = {name: _spy(monkeypatch, exactobs, name) for name in ("_rebuild_solve", "_rebuild_chol")}
    P = prepare(W, H)
    weights, row_loss = rebuild_levels(P.W, P.Hinv, perm, counts)
    assert len(used[f"_rebuild_{path}"]) >= 1
    assert weights.shape == (len(counts), rows, cols) and row_loss.shape == (len(counts), rows)
    R = prepare_ref(W, H)
    for l in range(len(counts)):
        expected = np.zeros((rows, cols))
        for i in range(rows):
            pruned = np.zeros(cols, bool)
            pruned[perm[i, : counts[l, i]]] = True
            expected[i] = ls_reconstruction_ref(R.W[i], R.H, pruned)
            assert np.all(np.asarray(weights)[l, i, pruned] == 0.0)
        np.testing.assert_allclose(np.asarray(weights[l]), expected, rtol=0, atol=1e-9)
        np.testing.assert_allclose(
            np.asarray(row_loss[l]), row_loss_ref(R.W, expected, R.H), rtol=1e-8, atol=1e-15
        )


def test_float32_prune_agrees_with_reference():
    W, H = _problem(6)
    R = exactobs_prune_ref(W.astype(np.float32), H.astype(np.float32), 0.5)
    assert R.margin > 1e-3  # wide enough for float32 round-off
    with jax.enable_x64(False):
        r = exactobs_prune(W.astype(np.float32), H.astype(np.float32), 0.5, method="naive")
        assert r.weights.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(r.mask), R.mask)
    np.testing.assert_allclose(np.asarray(r.weights), R.weights, rtol=0, atol=2e-4)
    assert float(r.loss) == pytest.approx(float(R.loss), rel=1e-3)


# ------------------------------------------------------------------------------------------------
# N:M and block vs the reference
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "n, m, method, shape",
    [
        (2, 4, "naive", (ROWS, COLS)),
        (4, 8, "naive", (ROWS, COLS)),
        (3, 4, "fast", WIDE),
        (3, 4, "blocked", WIDE),
    ],
)
def test_nm_matches_reference(n, m, method, shape):
    if shape == WIDE:
        W, H = _problem(WIDE_SEED, WIDE, dead=WIDE_DEAD, tiny_row=False)
    else:
        W, H = _problem(1)
    if method == "fast":
        assert len(phase_plan(shape[1] * n // m, shape[1])) >= 2
    r = exactobs_nm(W, H, n, m, method=method)
    R = exactobs_nm_ref(W, H, n, m)
    assert R.margin > 1e-6
    _check_against_reference(r, R, W, H, atol=1e-9)
    groups = np.asarray(r.mask).reshape(shape[0], -1, m)
    assert np.all(groups.sum(axis=-1) == m - n)


@pytest.mark.parametrize("sparsity, size", [([0.25, 0.5, 0.75], 4), (0.5, 4)])
def test_block_matches_reference(sparsity, size):
    W, H = _problem(0)
    r = exactobs_block(W, H, sparsity, size)
    R = exactobs_block_ref(W, H, sparsity, size)
    assert R.margin > 1e-6
    _check_against_reference(r, R, W, H, atol=1e-9)
    levels = np.atleast_1d(sparsity)
    masks = np.asarray(r.mask).reshape(len(levels), ROWS, COLS // size, size)
    assert np.all(masks.all(axis=-1) | ~masks.any(axis=-1))  # whole blocks only
    for l, s in enumerate(levels):
        assert (~masks[l, ..., 0]).sum() == math.floor(s * ROWS * (COLS // size) + 0.5)


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------


def _count(s, total):
    return math.floor(s * total + 0.5)


@PROPS
@given(
    seed=st.integers(0, 2**31 - 1),
    levels=st.lists(st.floats(0.0, 0.95), min_size=3, max_size=3),
    decay=st.floats(0.6, 0.95),
)
def test_prune_properties(seed, levels, decay):
    W, H = make_problem(ROWS, COLS, seed, decay=decay)
    r = exactobs_prune(W, H, levels, method="naive")
    P = prepare_ref(W, H)
    weights, mask, loss = np.asarray(r.weights), np.asarray(r.mask), np.asarray(r.loss)
    for l, s in enumerate(levels):
        assert (~mask[l]).sum() == _count(s, ROWS * COLS)  # exactly the requested sparsity
        assert np.all(weights[l][~mask[l]] == 0.0)
        true = layer_loss_ref(P.W, weights[l], P.H)
        assert loss[l] == pytest.approx(true, rel=1e-8, abs=1e-13)
        mag = float(magnitude_prune(W, s, H=H).loss)
        assert loss[l] <= mag * (1 + 1e-9) + 1e-13  # correlated inputs: OBS beats magnitude
    # more compression never lowers the error, and the pruned sets are nested
    by = np.argsort(levels, kind="stable")
    assert np.all(np.diff(loss[by]) >= -1e-13)
    for a, b in zip(by[:-1], by[1:]):
        assert np.all(~mask[a] <= ~mask[b])


@PROPS
@given(seed=st.integers(0, 2**31 - 1), nm=st.sampled_from([(2, 4), (4, 8)]))
def test_nm_properties(seed, nm):
    n, m = nm
    W, H = make_problem(ROWS, COLS, seed)
    r = exactobs_nm(W, H, n, m, method="naive")
    mask, weights = np.asarray(r.mask), np.asarray(r.weights)
    assert np.all((~mask).reshape(ROWS, -1, m).sum(axis=-1) == n)  # exactly n zeros per group
    assert np.all(weights[~mask] == 0.0)
    P = prepare_ref(W, H)
    assert float(r.loss) == pytest.approx(layer_loss_ref(P.W, weights, P.H), rel=1e-8)
    assert float(r.loss) < float(magnitude_nm(W, n, m, H=H).loss)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), s=st.floats(0.0, 0.95))
def test_block_properties(seed, s):
    W, H = make_problem(ROWS, COLS, seed)
    r = exactobs_block(W, H, s, 4)
    mask, weights = np.asarray(r.mask), np.asarray(r.weights)
    blocks = mask.reshape(ROWS, COLS // 4, 4)
    assert np.all(blocks.all(axis=-1) | ~blocks.any(axis=-1))
    assert (~blocks[..., 0]).sum() == _count(s, ROWS * COLS // 4)
    assert np.all(weights[~mask] == 0.0)
    P = prepare_ref(W, H)
    assert float(r.loss) == pytest.approx(layer_loss_ref(P.W, weights, P.H), rel=1e-8, abs=1e-13)


@PROPS
@given(seed=st.integers(0, 2**31 - 1), c=st.floats(0.01, 100.0), s=st.floats(0.0, 0.95))
def test_identity_hessian_reduces_to_magnitude(seed, c, s):
    """With ``H = c·I`` no weight compensates another: OBS ranks by ``|w|`` and moves nothing."""
    W = np.random.default_rng(seed).standard_normal((ROWS, COLS))
    H = c * np.eye(COLS)
    r, g = exactobs_prune(W, H, s, method="naive"), magnitude_prune(W, s, H=H)
    np.testing.assert_array_equal(np.asarray(r.mask), np.asarray(g.mask))
    np.testing.assert_array_equal(np.asarray(r.weights), np.asarray(g.weights))
    assert float(r.loss) == pytest.approx(float(g.loss), rel=1e-9, abs=1e-300)
    r, g = exactobs_nm(W, H, 2, 4, method="naive"), magnitude_nm(W, 2, 4, H=H)
    np.testing.assert_array_equal(np.asarray(r.mask), np.asarray(g.mask))
    np.testing.assert_array_equal(np.asarray(r.weights), np.asarray(g.weights))
    # blocks: the k blocks of smallest norm in the whole layer
    r = exactobs_block(W, H, s, 4)
    norms = (W.reshape(ROWS, -1, 4) ** 2).sum(axis=-1).ravel()
    pruned = np.zeros(norms.size, bool)
    pruned[np.argsort(norms, kind="stable")[: _count(s, norms.size)]] = True
    expected = np.repeat(~pruned.reshape(ROWS, -1), 4, axis=1)
    np.testing.assert_array_equal(np.asarray(r.mask), expected)
    np.testing.assert_array_equal(np.asarray(r.weights), np.where(expected, W, 0.0))


def test_zero_sparsity_is_the_identity():
    W, H = _problem(2)
    P = prepare_ref(W, H)
    r = exactobs_prune(W, H, [0.0, 0.5, 0.9], method="naive")
    np.testing.assert_array_equal(np.asarray(r.weights[0]), P.W)  # prepared: dead column zeroed
    assert bool(np.all(np.asarray(r.mask[0]))) and float(r.loss[0]) == 0.0
    r = exactobs_prune(W, H, 0.0, method="naive")
    np.testing.assert_array_equal(np.asarray(r.weights), P.W)
    assert float(r.loss) == 0.0
    b = exactobs_block(W, H, 0.0, 4)
    np.testing.assert_array_equal(np.asarray(b.weights), P.W)
    assert bool(np.all(np.asarray(b.mask))) and float(b.loss) == 0.0


def test_full_sparsity_costs_the_whole_layer():
    # k = floor(0.999 · 192 + 0.5) = 192: every weight goes and the loss is ½ tr(W H Wᵀ)
    W, H = _problem(3)
    r = exactobs_prune(W, H, [0.25, 0.5, 0.999], method="naive")
    P = prepare_ref(W, H)
    assert np.all(np.asarray(r.weights[2]) == 0.0) and not np.any(np.asarray(r.mask[2]))
    assert float(r.loss[2]) == pytest.approx(layer_loss_ref(P.W, np.zeros_like(P.W), P.H), rel=1e-9)


# ------------------------------------------------------------------------------------------------
# bad input (shapes, NaN/inf and indefinite H: see test_prepare.py)
# ------------------------------------------------------------------------------------------------


def test_nm_and_block_need_a_divisible_width():
    W, H = make_problem(4, 30, 7)
    with pytest.raises(ValueError, match=r"'enc/fc1'.*2:4.*multiple of 4.*30 columns"):
        exactobs_nm(W, H, 2, 4, layer="enc/fc1")
    with pytest.raises(ValueError, match=r"'enc/fc1'.*blocks of 4.*multiple of 4.*30 columns"):
        exactobs_block(W, H, 0.5, 4, layer="enc/fc1")


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (1, 1)])
def test_nm_pattern_must_be_valid(n, m):
    W, H = make_problem(ROWS, COLS, 7)
    with pytest.raises(ValueError, match="0 < n < m"):
        exactobs_nm(W, H, n, m, layer="fc")


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, float("nan"), [0.5, 1.0]])
@pytest.mark.parametrize("solver", ["prune", "block"])
def test_sparsity_outside_unit_interval_is_refused(solver, sparsity):
    W, H = make_problem(ROWS, COLS, 7)
    fn = exactobs_prune if solver == "prune" else exactobs_block
    with pytest.raises(ValueError, match=r"sparsity must lie in \[0, 1\)"):
        fn(W, H, sparsity, layer="enc/fc1")


@pytest.mark.parametrize("solver", ["prune", "block"])
def test_sparsity_error_names_the_layer(solver):
    W, H = make_problem(ROWS, COLS, 7)
    fn = exactobs_prune if solver == "prune" else exactobs_block
    with pytest.raises(ValueError, match="enc/fc1"):
        fn(W, H, 1.5, layer="enc/fc1")


def test_other_bad_arguments():
    W, H = make_problem(ROWS, COLS, 7)
    with pytest.raises(ValueError, match="empty list"):
        exactobs_prune(W, H, [])
    with pytest.raises(ValueError, match="method must be 'auto', 'fast', 'blocked' or 'naive'"):
        exactobs_prune(W, H, 0.5, method="left")
    with pytest.raises(ValueError, match="method must be"):
        exactobs_nm(W, H, 2, 4, method="slow")
    with pytest.raises(ValueError, match="size must be a positive int"):
        exactobs_block(W, H, 0.5, 0)


# ------------------------------------------------------------------------------------------------
# inputs, tracing
# ------------------------------------------------------------------------------------------------


def test_inputs_are_never_mutated():
    W, H = _problem(2)
    W0, H0 = W.copy(), H.copy()
    exactobs_prune(W, H, 0.5, method="fast")
    exactobs_prune(W, H, 0.5, method="blocked")
    exactobs_prune(W, H, [0.25, 0.5, 0.9], method="naive")
    exactobs_nm(W, H, 2, 4, method="naive")
    exactobs_block(W, H, 0.5, 4)
    elimination_order(prepare(W, H), method="naive")
    np.testing.assert_array_equal(W, W0)
    np.testing.assert_array_equal(H, H0)


def _cache_sizes():
    fns = {
        "greedy": exactobs._greedy_jit,
        "rebuild_chol": exactobs._rebuild_chol,
        "rebuild_solve": exactobs._rebuild_solve,
        "block": exactobs._block_orders,
        "prepare": prepare_mod._prepare_jit,
    }
    return {name: fn._cache_size() for name, fn in fns.items()}


def test_equal_shapes_do_not_retrace():
    def run(seed):
        W, H = _problem(seed)
        exactobs_prune(W, H, 0.5, method="naive")
        exactobs_prune(W, H, [0.25, 0.5, 0.9], method="naive")
        exactobs_nm(W, H, 2, 4, method="naive")
        exactobs_block(W, H, 0.5, 4)

    run(0)
    before = _cache_sizes()
    run(1)
    assert _cache_sizes() == before


# under x64, jnp.argmin returns int64, which the naive engine and the block kernel scatter into
# their int32 order arrays; JAX warns that this "will result in an error" in future releases
def test_naive_engine_traces_cleanly_under_x64():
    w, Hinv = jnp.ones(8), jnp.eye(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        jax.make_jaxpr(lambda w, h: greedy_row_naive(w, h, {}, {}, PruneRule(), 4))(w, Hinv)


def test_block_kernel_traces_cleanly_under_x64():
    w, Hinv = jnp.ones(8), jnp.eye(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        jax.make_jaxpr(lambda w, h: exactobs._block_row(w, h, 4))(w, Hinv)
