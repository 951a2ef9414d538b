"""Tests of obcjax.admm: projections against brute force, the optax transform, the driver."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from obcjax import admm as A
from obcjax.recipes.admm import zoo_progressive_admm
from obcjax.specs import NM, Unstructured
from obcjax.training import keep_mask
from obcjax.zoo.data import Split
from obcjax.zoo.models import init_variables


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------- projections


@pytest.mark.parametrize("k", [0, 1, 3, 6])
def test_topk_equals_brute_force(k):
    v = _rng(k).normal(size=6).astype(np.float32)
    v[2] = -v[4]  # a tie in |v|
    got = np.asarray(A.project_topk(v, k), np.float64)
    best = min(
        float(np.sum(v[[i for i in range(6) if i not in S]].astype(np.float64) ** 2))
        for S in itertools.combinations(range(6), k)
    )
    assert np.count_nonzero(got) <= k
    assert np.all((got == 0) | (got == v))
    np.testing.assert_allclose(np.sum((got - v) ** 2), best, rtol=1e-6, atol=1e-9)


def test_topk_ties_are_deterministic_and_never_exceed_k():
    v = np.array([1.0, -1.0, 1.0, 0.5], np.float32)
    got = np.asarray(A.project_topk(v, 2))
    np.testing.assert_array_equal(got, [1.0, -1.0, 0.0, 0.0])


def test_nm_equals_brute_force():
    W = _rng(1).normal(size=(3, 8)).astype(np.float32)
    got = np.asarray(A.project_nm(W, 2, 4), np.float64)
    best = 0.0
    for r in range(3):
        for g in range(2):
            grp = W[r, 4 * g : 4 * g + 4].astype(np.float64)
            best += min(np.sum(grp[list(S)] ** 2) for S in itertools.combinations(range(4), 2))
            assert np.count_nonzero(got[r, 4 * g : 4 * g + 4]) == 2
    np.testing.assert_allclose(np.sum((got - W) ** 2), best, rtol=1e-6)


@pytest.mark.parametrize("axis", [0, 1])
def test_rows_and_columns_equal_brute_force(axis):
    W = _rng(2 + axis).normal(size=(5, 4)).astype(np.float64)
    proj = A.project_rows if axis == 0 else A.project_columns
    got = np.asarray(proj(W.astype(np.float32), 2), np.float64)
    n = W.shape[axis]
    best = min(
        np.sum(np.take(W, [i for i in range(n) if i not in S], axis=axis) ** 2)
        for S in itertools.combinations(range(n), 2)
    )
    np.testing.assert_allclose(np.sum((got - W) ** 2), best, rtol=1e-5)
    assert np.count_nonzero(np.any(got != 0, axis=1 - axis)) == 2


@pytest.mark.parametrize("nonzero", [False, True])
def test_fixed_scale_level_assignment_equals_brute_force(nonzero):
    v = _rng(4).normal(size=4) * 2
    q, hi = 0.7, 3
    codes = [c for c in range(-hi, hi + 1) if not (nonzero and c == 0)]
    best = min(np.sum((v - q * np.array(c)) ** 2) for c in itertools.product(codes, repeat=v.size))
    k = np.asarray(A.nearest_levels(jnp.asarray(v, jnp.float32), q, hi, nonzero=nonzero))
    assert set(np.abs(k).astype(int)) <= {abs(c) for c in codes}
    np.testing.assert_allclose(np.sum((v - q * k) ** 2), best, rtol=1e-5)


def _best_joint(v, codes):
    """min over code vectors of ||v - q k||^2 with the optimal q > 0 for each code vector."""
    best = float(np.sum(v**2))  # q -> 0+ limit
    for c in itertools.product(codes, repeat=v.size):
        k = np.array(c, np.float64)
        kk, vk = k @ k, v @ k
        if kk > 0 and vk > 0:
            best = min(best, float(v @ v - vk * vk / kk))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ternary_is_the_exact_joint_projection(seed):
    v = _rng(10 + seed).normal(size=7)
    got, q = A.project_ternary(jnp.asarray(v, jnp.float32))
    got = np.asarray(got, np.float64)
    assert set(np.round(np.unique(np.abs(got)) / float(q), 5)) <= {0.0, 1.0}
    np.testing.assert_allclose(np.sum((got - v) ** 2), _best_joint(v, (-1, 0, 1)), rtol=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_is_the_exact_joint_projection(seed):
    v = _rng(20 + seed).normal(size=8)
    got = np.asarray(A.project_binary(jnp.asarray(v, jnp.float32))[0], np.float64)
    assert np.unique(np.abs(got)).size == 1
    np.testing.assert_allclose(np.sum((got - v) ** 2), _best_joint(v, (-1, 1)), rtol=1e-5)


def test_binary_on_support_zeroes_the_rest():
    v = jnp.array([0.5, -2.0, 3.0, 0.1])
    sup = jnp.array([True, True, False, True])
    got, q = A.project_binary(v, support=sup)
    np.testing.assert_allclose(np.asarray(got), [q, -q, 0.0, q], rtol=1e-6)
    np.testing.assert_allclose(float(q), (0.5 + 2.0 + 0.1) / 3, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3])
def test_uniform_als_is_a_fixed_point_and_near_the_grid_optimum(bits):
    v = _rng(30 + bits).normal(size=6)
    got, q = A.project_uniform(jnp.asarray(v, jnp.float32), bits, iters=30)
    got, q = np.asarray(got, np.float64), float(q)
    hi = 2 ** (bits - 1) - 1
    k = np.round(got / q)
    np.testing.assert_allclose(got, q * k, atol=1e-5)
    assert np.all(np.abs(k) <= hi)
    # Level assignment exact for the returned q (brute force over all code vectors).
    codes = range(-hi, hi + 1)
    best_fixed = min(np.sum((v - q * np.array(c)) ** 2) for c in itertools.product(codes, repeat=6))
    err = np.sum((got - v) ** 2)
    np.testing.assert_allclose(err, best_fixed, rtol=1e-5)
    # q is the least-squares scale of its codes.
    np.testing.assert_allclose(q, (v @ k) / (k @ k), rtol=1e-5)
    # A heuristic for the joint problem: never better than the true optimum, and close to it.
    best_joint = _best_joint(v, codes)
    assert best_joint <= err + 1e-6
    assert err <= 1.5 * best_joint + 1e-6


def test_uniform_on_support_reserves_zero():
    v = jnp.array([0.01, -0.9, 1.2, 0.3, 2.0])
    sup = jnp.array([True, True, False, True, True])
    got, q = A.project_uniform(v, 3, support=sup)
    got = np.asarray(got)
    assert got[2] == 0
    assert np.all(got[[0, 1, 3, 4]] != 0)
    assert np.all(np.abs(np.round(got / float(q))) <= 3)


def test_bits_out_of_range():
    for bits in (1, 9, True):
        with pytest.raises(ValueError, match="bits"):
            A.Uniform(bits)
    with pytest.raises(ValueError, match="2..8"):
        A.project_uniform(jnp.ones(3), 1)


# ----------------------------------------------------------------------------- layer level


def _params(seed=0):
    r = _rng(seed)
    return {
        "conv": {"kernel": jnp.asarray(r.normal(size=(3, 3, 4, 4)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(r.normal(size=(8, 6)), jnp.float32), "bias": jnp.zeros(6)},
    }


def test_project_layouts_and_zero_remaining_weights_error():
    p = _params()
    conv = np.asarray(A.project(p["conv"]["kernel"], NM(2, 4), layer="conv"))
    assert np.all(np.count_nonzero(conv.reshape(-1, 4).T.reshape(4, -1, 4), axis=-1) == 2)
    # conv columns run (kh, kw, cin): 36 columns; one input channel leaves 9, not a multiple of 4.
    with pytest.raises(ValueError, match="'conv'.*multiple of 4"):
        A.project(p["conv"]["kernel"][:, :, :1], NM(2, 4), layer="conv")
    assert conv.shape == p["conv"]["kernel"].shape
    filt = np.asarray(A.project(p["conv"]["kernel"], A.Filters(0.5), layer="conv"))
    assert np.count_nonzero(np.any(filt.reshape(-1, 4) != 0, axis=0)) == 2
    with pytest.raises(ValueError, match="'fc'.*leaves no weights"):
        A.resolve_targets(p, [("fc", Unstructured(0.995))])
    with pytest.raises(ValueError, match="'conv'.*leaves no weights"):
        A.resolve_targets(p, [("conv", A.Filters(0.9))])


def test_joint_prune_then_quantize():
    p = _params(1)
    k = np.asarray(A.project(p["fc"]["kernel"], (Unstructured(0.75), A.Uniform(3)), layer="fc"))
    assert np.count_nonzero(k) == 12
    mags = np.unique(np.abs(k[k != 0]))
    q = mags.min()
    codes = mags / q
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert codes.max() <= 3 + 1e-4


# ----------------------------------------------------------------------------- optax transform


def test_chained_state_checkpoints_through_flax_serialization():
    from flax import serialization

    p = _params(2)
    tx = optax.chain(
        A.admm([("fc", Unstructured(0.5)), ("conv", A.Uniform(3))], update_every=2),
        optax.adam(1e-2),
        keep_mask({"fc": {"kernel": np.asarray(p["fc"]["kernel"]) > 0}}),
    )
    step = jax.jit(tx.update)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.3), p)
    state = tx.init(p)
    adm = state[0]
    assert isinstance(adm, A.ADMMState) and set(adm.Z) == {"fc", "conv"}
    np.testing.assert_array_equal(  # Z starts at the projection of W, U at 0
        np.asarray(adm.Z["fc"]), np.asarray(A.project_topk(p["fc"]["kernel"], 24))
    )
    assert not np.any(np.asarray(adm.U["conv"]))
    leaves, treedef = jax.tree.flatten(state)  # a pytree: flattens and rebuilds
    assert isinstance(jax.tree.unflatten(treedef, leaves)[0], A.ADMMState)
    for _ in range(3):
        upd, state = step(grads, state, p)
        p = optax.apply_updates(p, upd)
    blob = serialization.to_bytes(state)
    restored = serialization.from_bytes(tx.init(_params(5)), blob)  # a template of other values
    jax.tree.map(np.testing.assert_array_equal, restored, state)
    a, b = p, p
    sa, sb = state, restored
    for _ in range(3):  # crosses the Z/U update of call 4: the restored state behaves the same
        ua, sa = step(grads, sa, a)
        ub, sb = step(grads, sb, b)
        a, b = optax.apply_updates(a, ua), optax.apply_updates(b, ub)
    jax.tree.map(np.testing.assert_array_equal, (a, sa), (b, sb))
    assert int(sa[0].step) == 6 and float(sa[0].rho["fc"]) == pytest.approx(1e-3 * 1.3**2)


def test_chain_with_sgd_matches_the_admm_equations():
    p = _params(3)
    rho, lr, growth, every = 0.5, 0.1, 2.0, 2
    spec = Unstructured(0.5)
    tx = optax.chain(
        A.admm([("fc", spec)], rho=rho, rho_growth=growth, update_every=every), optax.sgd(lr)
    )
    state = tx.init(p)
    W = np.asarray(p["fc"]["kernel"], np.float64)
    Z = np.asarray(A.project_topk(W.astype(np.float32), 24), np.float64)
    U = np.zeros_like(W)
    r = rho
    step = jax.jit(tx.update)
    params = p
    for t in range(5):
        g = {k: {kk: jnp.full_like(vv, 0.1) for kk, vv in d.items()} for k, d in params.items()}
        if t > 0 and t % every == 0:
            Z = np.asarray(A.project_topk(jnp.asarray(W + U, jnp.float32), 24), np.float64)
            U = U + W - Z
            r *= growth
        W = W - lr * (0.1 + r * (W - Z + U))
        upd, state = step(g, state, params)
        params = optax.apply_updates(params, upd)
        np.testing.assert_allclose(np.asarray(params["fc"]["kernel"]), W, rtol=1e-4, atol=1e-5)
        # Unconstrained leaves get the plain SGD step.
        np.testing.assert_allclose(np.asarray(params["fc"]["bias"]), -lr * 0.1 * (t + 1), atol=1e-6)
    np.testing.assert_allclose(float(state[0].rho["fc"]), rho * growth**2, rtol=1e-6)
    assert int(state[0].step) == 5


def test_admm_solves_a_sparse_least_squares_problem():
    # min ||W - A||^2 s.t. nnz(W) <= k has the solution topk(A); ADMM with rising rho finds it.
    A_ = jnp.asarray(_rng(5).normal(size=(8, 6)), jnp.float32)
    p = {"fc": {"kernel": A_ + 0.3 * jnp.asarray(_rng(6).normal(size=(8, 6)), jnp.float32)}}
    # rho grows 1.1^40 ~ 45x to ~9: lr * (1 + rho) stays < 2, so SGD stays stable.
    tx = optax.chain(
        A.admm([("fc", Unstructured(0.75))], rho=0.2, rho_growth=1.1, update_every=10),
        optax.sgd(0.1),
    )
    state = tx.init(p)
    primal0 = float(state[0].primal["fc"])

    @jax.jit
    def step(p, state):
        g = jax.grad(lambda q: 0.5 * jnp.sum((q["fc"]["kernel"] - A_) ** 2))(p)
        upd, state = tx.update(g, state, p)
        return optax.apply_updates(p, upd), state

    for _ in range(400):
        p, state = step(p, state)
    target = np.asarray(A.project_topk(A_, 12))
    Z = np.asarray(state[0].Z["fc"])
    np.testing.assert_array_equal(Z != 0, target != 0)
    np.testing.assert_allclose(Z, target, atol=5e-2)
    assert float(state[0].primal["fc"]) < min(0.1, primal0 / 20)


def test_keep_mask_on_hard_project_masks_keeps_zeros_under_weight_decay():
    p = _params()
    proj, masks = A.hard_project(p, [("fc", Unstructured(0.5)), ("conv", A.Ternary())])
    assert not np.any(np.asarray(masks["conv"]["kernel"]))
    assert all(masks[k]["bias"] is None for k in masks if "bias" in masks[k])
    tx = optax.chain(optax.adamw(0.1, weight_decay=0.5), keep_mask(masks))
    state = tx.init(proj)
    grads = jax.tree.map(jnp.ones_like, proj)
    upd, _ = tx.update(grads, state, proj)
    new = optax.apply_updates(proj, upd)
    np.testing.assert_array_equal(np.asarray(new["conv"]["kernel"]), proj["conv"]["kernel"])
    fc0 = np.asarray(proj["fc"]["kernel"]) == 0
    assert np.all(np.asarray(new["fc"]["kernel"])[fc0] == 0)
    assert np.all(np.asarray(new["fc"]["kernel"])[~fc0] != np.asarray(proj["fc"]["kernel"])[~fc0])


def test_freeze_zeros_keeps_gradient_and_projection_off_frozen_entries():
    p = _params()
    k = np.asarray(p["fc"]["kernel"]).copy()
    k[0] = 0.0
    p = {**p, "fc": {**p["fc"], "kernel": jnp.asarray(k)}}
    tx = A.admm([("fc", Unstructured(0.5))], freeze_zeros=True, update_every=1)
    state = tx.init(p)
    upd, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    upd, state = tx.update(jax.tree.map(jnp.ones_like, p), state, p)
    assert np.all(np.asarray(upd["fc"]["kernel"])[0] == 0)
    assert np.all(np.asarray(state.Z["fc"])[0] == 0)


# ----------------------------------------------------------------------------- schedule, driver


def test_schedule_validation():
    p = _params()
    ok = [[("fc", Unstructured(0.5))], [("fc", Unstructured(0.75))]]
    assert len(A.check_schedule(p, ok)) == 2
    with pytest.raises(ValueError, match="stage 1 is not tighter"):
        A.check_schedule(p, [[("fc", Unstructured(0.5))]] * 2)
    with pytest.raises(ValueError, match="stage 1 loosens layer 'fc'"):
        A.check_schedule(p, ok[::-1])
    with pytest.raises(ValueError, match="loosens layer 'conv'"):
        A.check_schedule(p, [[("conv", A.Uniform(2))], [("conv", A.Uniform(4))]])
    with pytest.raises(ValueError, match="non-empty"):
        A.check_schedule(p, [])
    with pytest.raises(ValueError, match="matches no layer"):
        A.check_schedule(p, [[("nope", Unstructured(0.5))]])


# ----------------------------------------------------------------------------- retraining, hybrids


@pytest.mark.parametrize("spec", [A.Uniform(3), A.Ternary(), (Unstructured(0.5), A.Binary())])
def test_levels_snap_and_straight_through_gradient(spec):
    p = _params(8)
    new, masks, levels = A.hard_project(p, [("fc", spec)], with_levels=True)
    lv = levels["fc"]
    P = np.asarray(new["fc"]["kernel"], np.float64)
    # the projection lies on its own levels: snapping it again changes nothing
    np.testing.assert_allclose(np.asarray(A.snap(new["fc"]["kernel"], lv)), P, atol=1e-6)
    # snap = nearest allowed level, entry by entry, for arbitrary weights (brute force)
    W = np.asarray(_rng(9).normal(size=p["fc"]["kernel"].shape) * 1.5, np.float64)
    q = float(lv.q)
    codes = [c for c in range(-lv.hi, lv.hi + 1) if not (lv.nonzero and c == 0)]
    grid = q * np.asarray(codes, np.float64)
    want = grid[np.argmin(np.abs(W[..., None] - grid), axis=-1)]
    want = np.where(np.asarray(lv.support), want, 0.0)
    got = np.asarray(A.snap(jnp.asarray(W, jnp.float32), lv), np.float64)
    np.testing.assert_allclose(got, want, atol=1e-5)
    # value snapped, gradient straight through
    c = jnp.asarray(_rng(10).normal(size=W.shape), jnp.float32)
    val = A.ste_apply({"fc": {"kernel": jnp.asarray(W, jnp.float32)}}, levels)["fc"]["kernel"]
    np.testing.assert_allclose(np.asarray(val), got, atol=1e-6)
    g = jax.grad(lambda k: jnp.sum(A.ste_apply({"fc": {"kernel": k}}, levels)["fc"]["kernel"] * c))(
        jnp.asarray(W, jnp.float32)
    )
    np.testing.assert_allclose(np.asarray(g), np.asarray(c))
    assert not np.any(np.asarray(masks["fc"]["kernel"]))  # masked retraining freezes quantized


def test_obs_compensate_is_the_masked_least_squares_solution():
    from obcjax.kernels import layer_loss
    from obcjax.stats import hessian_init, hessian_update

    r = _rng(11)
    X = r.normal(size=(200, 8)) @ r.normal(size=(8, 8))  # correlated inputs
    X = X.astype(np.float32)
    p = _params(12)
    st = hessian_update(hessian_init(8), jnp.asarray(X))
    proj, masks = A.hard_project(p, [("fc", Unstructured(0.6))])
    out = A.obs_compensate(p, {"fc": st}, masks, rel_damp=0.0)
    W0 = np.asarray(p["fc"]["kernel"], np.float64).T  # (out, in) rows
    M = np.asarray(masks["fc"]["kernel"]).T
    got = np.asarray(out["fc"]["kernel"], np.float64).T
    X64 = X.astype(np.float64)
    for o in range(W0.shape[0]):
        S = np.nonzero(M[o])[0]
        ws, *_ = np.linalg.lstsq(X64[:, S], X64 @ W0[o], rcond=None)
        want = np.zeros(8)
        want[S] = ws
        np.testing.assert_allclose(got[o], want, rtol=2e-3, atol=2e-4)
    H = jnp.asarray(2 * X64.T @ X64 / 200, jnp.float32)
    assert float(layer_loss(W0, got, H)) < 0.9 * float(
        layer_loss(W0, np.asarray(proj["fc"]["kernel"], np.float64).T, H)
    )
    assert out["conv"]["kernel"] is p["conv"]["kernel"]  # other layers untouched
    with pytest.raises(ValueError, match="statistics for layer 'fc'"):
        A.obs_compensate(p, {}, masks)


def test_progressive_driver_final_masks_and_levels_hold_exactly():
    r = _rng(7)
    x = r.normal(size=(96, 4, 4, 1)).astype(np.float32)
    y = (x[:, :2].sum(axis=(1, 2, 3)) > 0).astype(np.int32)
    data = {"train": Split(x[:64], y[:64]), "test": Split(x[64:], y[64:])}
    v = init_variables("mlp", (4, 4, 1), num_classes=2)
    schedule = [
        [("fc1", Unstructured(0.5)), ("fc2", Unstructured(0.5))],
        [
            ("fc1", Unstructured(0.9)),
            ("fc2", (Unstructured(0.75), A.Uniform(3))),
            ("fc3", A.Binary()),
        ],
    ]
    out, hist = zoo_progressive_admm(
        "mlp", v, data, schedule, rho=0.05, admm_epochs=1, updates_per_stage=2,
        retrain_epochs=1, batch_size=32, lr=1e-2,
    )  # fmt: skip
    assert np.count_nonzero(v["params"]["fc1"]["kernel"]) == v["params"]["fc1"]["kernel"].size
    fc1 = np.asarray(out["params"]["fc1"]["kernel"])
    fc2 = np.asarray(out["params"]["fc2"]["kernel"])
    fc3 = np.asarray(out["params"]["fc3"]["kernel"])
    assert np.count_nonzero(fc1) == round(0.1 * fc1.size)
    assert np.count_nonzero(fc2) == round(0.25 * fc2.size)
    # zeros of stage 0 stay zero in stage 1
    assert hist[0]["fc2/sparsity"] == pytest.approx(0.5, abs=1e-3)
    mags = np.unique(np.abs(fc2[fc2 != 0]))
    assert 1 <= mags.size <= 3  # 3 bits, zero reserved for pruned: codes +-1..+-3
    on_grid = [
        np.allclose(m := mags / (mags.max() / c), np.round(m), atol=1e-4) and m.min() > 0.5
        for c in (1, 2, 3)
    ]
    assert any(on_grid)
    assert np.unique(np.abs(fc3)).size == 1 and np.all(fc3 != 0)
    assert [h["stage"] for h in hist] == [0, 1]
    assert hist[-1]["fc3/levels"] == 1
    assert 0.0 <= hist[-1]["acc"] <= 1.0 and "acc_hard" in hist[0]
    with pytest.raises(ValueError, match="quant_retrain"):
        zoo_progressive_admm("mlp", v, data, schedule, quant_retrain="inq")
    with pytest.raises(ValueError, match="calib"):
        zoo_progressive_admm("mlp", v, data, schedule, mask_solver="obs")
    with pytest.raises(ValueError, match="calibrate"):
        A.progressive_admm(lambda p, b: 0.0, v["params"], [1], schedule, mask_solver="obs")


# ----------------------------------------------------------------------------- incremental (INQ)


def test_incremental_freeze_grows_by_magnitude_and_keeps_frozen_entries():
    p = _params(13)
    _, _, levels = A.hard_project(p, [("fc", (Unstructured(0.25), A.Uniform(3)))], with_levels=True)
    lv = levels["fc"]
    sup = np.asarray(lv.support)
    k = jnp.where(lv.support, jnp.asarray(_rng(14).normal(size=sup.shape), jnp.float32), 0.0)
    frozen, prev_k, prev_f = None, np.asarray(k), np.zeros(sup.shape, bool)
    for f in (0.5, 0.75, 1.0):
        k, frozen = A.incremental_freeze(k, lv, f, frozen)
        kn, fz = np.asarray(k), np.asarray(frozen)
        assert fz.sum() == int(np.ceil(f * sup.sum())) and not np.any(fz & ~sup)
        np.testing.assert_array_equal(kn[prev_f], prev_k[prev_f])  # frozen stay as they were
        new = fz & ~prev_f
        np.testing.assert_array_equal(kn[new], np.asarray(A.snap(prev_k, lv))[new])  # snapped
        np.testing.assert_array_equal(kn[~new], prev_k[~new])  # the rest untouched
        free = sup & ~fz
        if free.any():  # the largest free magnitudes went first
            assert np.abs(prev_k[new]).min() >= np.abs(prev_k[free]).max()
        prev_k, prev_f = kn, fz
    np.testing.assert_array_equal(prev_k, np.asarray(A.snap(prev_k, lv)))  # all on the levels
    with pytest.raises(ValueError, match="fraction"):
        A.incremental_freeze(k, lv, 0.0)


def test_progressive_incremental_quant_retraining_ends_on_the_levels():
    r = _rng(15)
    params = {
        "fc1": {"kernel": jnp.asarray(r.normal(size=(6, 12)), jnp.float32)},
        "fc2": {"kernel": jnp.asarray(r.normal(size=(12, 3)) * 0.5, jnp.float32)},
    }
    x = r.normal(size=(48, 6)).astype(np.float32)
    y = np.argmax(x[:, :3], 1)
    data = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 48, 16)]

    def loss(p, batch):
        xb, yb = batch
        logits = jnp.tanh(xb @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(yb)), yb])

    schedule = [[("fc1", Unstructured(0.5)), ("fc2", A.Uniform(3))]]
    new, _, hist = A.progressive_admm(
        loss, params, data, schedule, admm_epochs=0, retrain_epochs=2, lr=1e-2,
        quant_retrain="incremental", inq_fractions=(0.5, 1.0),
    )  # fmt: skip
    fc2 = np.asarray(new["fc2"]["kernel"], np.float64)
    mags = np.unique(np.abs(fc2[fc2 != 0]))
    assert 1 <= mags.size <= 3
    assert any(  # q * k with the largest code c in 1..3
        np.allclose(mags / (mags.max() / c), np.round(mags / (mags.max() / c)), atol=1e-4)
        for c in (1, 2, 3)
    )
    assert np.count_nonzero(np.asarray(new["fc1"]["kernel"])) == 36
    assert np.isfinite(hist[0]["loss"])
    with pytest.raises(ValueError, match="inq_fractions"):
        A.progressive_admm(loss, params, data, schedule, quant_retrain="incremental",
                           inq_fractions=(0.5, 0.9))  # fmt: skip
