"""OBC database of levels and the global solver: agreement with compress(), costs, DP optimality,
resumability, mesh equality, errors."""

import dataclasses
import itertools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax import export
from obcjax.allocation import (
    Database,
    WALevel,
    activation_rules,
    build_database,
    materialize,
    mixed_levels,
    parse_level,
    solve,
    sparsity_levels,
    to_rules,
    uniform,
)
from obcjax.specs import NM, Block, Int, Unstructured
from obcjax.stats import HessianState
from obcjax.transforms import LayerSpec, compress

LEVELS = [
    None,
    Unstructured(0.25),
    Unstructured(0.5),
    Unstructured(0.75),
    Unstructured(0.9),
    NM(2, 4),
    Int(4),
    (Unstructured(0.75), Int(4)),
]
PATHS = ("dense_0", "dense_1", "dense_2")


def _state(rng, cols, groups=1, tokens=48, scale=1.0):
    # correlated inputs with a different spectrum per layer, so layers differ in sensitivity
    X = rng.normal(size=(groups, tokens, cols)) @ rng.normal(size=(groups, cols, cols)) * scale
    return HessianState(
        jnp.asarray(np.einsum("gti,gtj->gij", X, X), jnp.float32), jnp.asarray(tokens, jnp.int32)
    )


def _mlp(seed=0):
    rng = np.random.default_rng(seed)
    params, stats = {}, {}
    for i, p in enumerate(PATHS):
        params[p] = {
            "kernel": jnp.asarray(rng.normal(size=(16, 16)) * (1 + i), jnp.float32),
            "bias": jnp.zeros((16,), jnp.float32),
        }
        stats[p] = _state(rng, 16, scale=0.5 + i)
    return params, stats


@pytest.fixture(scope="module")
def mlp():
    params, stats = _mlp()
    db = build_database(params, stats, LEVELS, progress=False, positions={"dense_1": 5})
    return params, stats, db


def _brute(db, budget, metric="size"):
    losses, costs = db.losses(), db.costs(metric)
    best = np.inf
    for combo in itertools.product(*(range(len(db.levels(p))) for p in db.paths)):
        c = sum(costs[p][i] for p, i in zip(db.paths, combo))
        l = sum(losses[p][i] for p, i in zip(db.paths, combo))
        if c <= budget and np.isfinite(l):
            best = min(best, l)
    return best


def test_database_matches_compress_and_kernels(mlp):
    params, stats, db = mlp
    assert db.paths == PATHS and db.computed == list(PATHS) and db.loaded == []
    for p in PATHS:
        l = db.losses()[p]
        assert l[0] == 0.0 and np.all(np.isfinite(l))
        # more sparsity never costs less loss in one ExactOBS pass
        assert np.all(np.diff(l[:5]) > 0)
        np.testing.assert_array_equal(db.weights(p, None), params[p]["kernel"])
    # a mixed assignment: materialize (stored weights) == compress with the derived rules
    choice = {"dense_0": NM(2, 4), "dense_1": (Unstructured(0.75), Int(4)), "dense_2": Int(4)}
    rules = to_rules(choice)
    assert [r[0] for r in rules] == ["dense_0", "dense_1", "dense_2"]
    out = compress(params, stats, rules)
    new = materialize(params, db, choice)
    for p in PATHS:
        np.testing.assert_allclose(new[p]["kernel"], out.params[p]["kernel"], rtol=1e-6, atol=1e-6)
        assert new[p]["bias"] is params[p]["bias"]
    assert db.loss_of(choice) == pytest.approx(sum(out.losses.values()), rel=1e-5)
    assert params["dense_0"]["kernel"] is not new["dense_0"]["kernel"]  # input not mutated


def test_block_plus_quant_levels():
    """The reference's ``4block_8w8a`` levels: blocks of 4 columns pruned, then 8-bit OBQ."""
    params, stats = _mlp(3)
    levels = [None, Block(0.5, 4), parse_level("4block@50%+8w8a").weights]
    db = build_database(params, stats, levels, progress=False)
    choice = {p: (Block(0.5, 4), Int(8)) for p in PATHS}
    out = compress(params, stats, to_rules(choice))
    new = materialize(params, db, choice)
    for p in PATHS:
        l = db.losses()[p]
        assert l[2] > l[1] > 0  # quantizing the survivors adds loss
        W = np.asarray(out.params[p]["kernel"])
        np.testing.assert_allclose(new[p]["kernel"], W, rtol=1e-6, atol=1e-6)
        mask = np.asarray(out.mask(p))
        blocks = mask.T.reshape(16, 4, 4)  # (rows, blocks, size) in matrix layout
        assert np.all(blocks.all(-1) | ~blocks.any(-1))  # whole blocks kept or removed
        assert blocks.all(-1).sum() == 16 * 4 // 2  # half the blocks of the layer are kept
        assert np.all(W[~mask] == 0)
        deq = np.asarray(out.qarray(p).dequantize())
        np.testing.assert_array_equal(np.where(mask, deq, 0.0), W)  # survivors on the grid
    assert db.loss_of(choice) == pytest.approx(sum(out.losses.values()), rel=1e-5)


@pytest.mark.parametrize("li", range(len(LEVELS)))
def test_costs_agree_with_summarize_and_export(mlp, li):
    params, stats, db = mlp
    lv = LayerSpec() if LEVELS[li] is None else db.levels("dense_0")[li]
    out = compress(params, stats, [("dense_0", None if lv == LayerSpec() else lv)])
    W = np.asarray(out.params["dense_0"]["kernel"]).T
    mask = out.mask("dense_0")
    mask = None if mask is None else np.asarray(mask).T
    qa = out.qarray("dense_0")
    qa = None if qa is None else qa.as_matrix()
    nm = (lv.prune.n, lv.prune.m) if isinstance(lv.prune, NM) else None
    packed = export.pack_layer(W, mask=mask, qarray=qa, nm=nm)
    assert db.costs("size")["dense_0"][li] == export.theoretical_bits(packed)
    # the size of obcjax.sizes, as summarize gives it; without overhead its kept values
    db_raw = Database(db.records.values(), overhead=False)
    summ = out.summary
    assert db.costs("size")["dense_0"][li] == summ["dense_0/size_bits"]
    assert db_raw.costs("size")["dense_0"][li] == summ["dense_0/value_bits"]
    # MACs of kept weights, times bits for BOPs; dense_1 has 5 output positions
    nnz1 = db.records["dense_1"].nnz[li]
    assert db.costs("flops")["dense_1"][li] == 5 * nnz1
    bits = lv.quant.bits if lv.quant else 32
    assert db.costs("bops")["dense_1"][li] == 5 * nnz1 * bits * 32


def test_dp_equals_brute_force_on_toy_tables():
    rng = np.random.default_rng(1)
    levels = [None, Unstructured(0.5), Int(4), NM(2, 4), (Unstructured(0.5), Int(4))]
    loss, cost = {}, {}
    for p in ("a", "b", "c"):
        loss[p] = {lv: float(x) for lv, x in zip(levels, np.r_[0, rng.exponential(size=4)])}
        cost[p] = {lv: float(x) for lv, x in zip(levels, rng.integers(10, 200, size=5))}
    loss["b"][Int(4)] = np.inf  # unavailable level: never chosen
    db = Database.from_table(loss, cost)
    two = Database.from_table(
        loss, {"size": cost, "flops": {p: {lv: 1.0 for lv in levels} for p in cost}}
    )
    assert two.costs("size")["a"].tolist() == db.costs("size")["a"].tolist()
    with pytest.raises(ValueError, match="costs in .*'flops', 'size'.*not 'bops'"):
        two.costs("bops")
    lo, hi = db.min_cost(), sum(max(c.values()) for c in cost.values())
    for budget in np.linspace(lo, hi, 23):
        choice = solve(db, budget)
        assert db.cost_of(choice) <= budget
        assert choice["b"] != LayerSpec(quant=Int(4))
        assert db.loss_of(choice) == pytest.approx(_brute(db, budget), rel=1e-12, abs=0)
        # with very few buckets the answer stays feasible, merely no better than the optimum
        coarse = solve(db, budget, buckets=2)
        assert db.cost_of(coarse) <= budget
        assert db.loss_of(coarse) >= db.loss_of(choice) - 1e-12


def test_dp_equals_brute_force_on_real_database(mlp):
    _, _, db = mlp
    for metric in ("size", "bops", "flops"):
        lo, hi = db.min_cost(metric), db.dense_cost(metric)
        for frac in (0.0, 0.05, 0.2, 0.4, 0.7):
            budget = lo + frac * (hi - lo)
            choice = solve(db, budget, metric=metric)
            assert db.cost_of(choice, metric) <= budget
            assert db.loss_of(choice) == pytest.approx(_brute(db, budget, metric), rel=1e-9)


def test_dp_not_worse_than_uniform(mlp):
    _, _, db = mlp
    strict = 0
    for lv in LEVELS[1:]:
        budget = db.cost_of({p: lv for p in PATHS})
        u = uniform(db, budget)
        ub = uniform(db, budget, by="loss")
        dp = solve(db, budget)
        assert max(db.cost_of(u), db.cost_of(ub), db.cost_of(dp)) <= budget
        assert db.loss_of(ub) <= db.loss_of(u)
        assert db.loss_of(dp) <= db.loss_of(ub) * (1 + 1e-12)
        strict += db.loss_of(dp) < 0.99 * db.loss_of(ub)
    assert strict >= 3  # layers differ in sensitivity, so mixing levels pays off
    # uniform: the least compressed level that fits
    budget = db.cost_of({p: Unstructured(0.5) for p in PATHS})
    assert uniform(db, budget - 1) != uniform(db, budget)
    assert set(uniform(db, budget).values()) == {LayerSpec(prune=Unstructured(0.5))}


def test_budget_below_reachable_raises(mlp):
    _, _, db = mlp
    lo = db.min_cost("size")
    solve(db, lo)  # exactly reachable
    with pytest.raises(ValueError, match=f"smallest reachable cost {lo:g}"):
        solve(db, lo - 1)
    with pytest.raises(ValueError, match="smallest uniform cost"):
        uniform(db, lo - 1)
    with pytest.raises(ValueError, match="budget"):
        solve(db, -1.0)
    with pytest.raises(ValueError, match="metric"):
        solve(db, lo, metric="latency")


def test_relative_error_mode(mlp):
    _, _, db = mlp
    rel = Database(db.records.values(), error="relative")
    for p in PATHS:
        r = db.records[p]
        assert r.energy > 0
        np.testing.assert_allclose(rel.losses()[p], db.losses()[p] / r.energy)
        assert rel.losses()[p][4] < 1.0  # 90 % pruned with compensation beats the zero layer


def test_resumable_after_interruption(mlp, tmp_path):
    params, stats, full = mlp

    class Stop(Exception):
        pass

    def interrupt(path, record):
        raise Stop(path)

    with pytest.raises(Stop, match="dense_0"):
        build_database(params, stats, LEVELS, path=tmp_path, progress=False, callback=interrupt)
    assert sorted(os.listdir(tmp_path)) == ["dense_0.npz"]  # atomic: no temporary left behind
    seen = []
    db = build_database(
        params, stats, LEVELS, path=tmp_path, progress=False, callback=lambda p, r: seen.append(p)
    )
    assert db.loaded == ["dense_0"] and db.computed == ["dense_1", "dense_2"] == seen
    for p in PATHS:
        a, b = db.records[p], full.records[p]
        np.testing.assert_array_equal(a.loss, b.loss)
        np.testing.assert_array_equal(a.nnz, b.nnz)
        np.testing.assert_array_equal(a.overhead, b.overhead)
        assert a.weights is None and a.weights_file is not None  # on disk, not in memory
        for lv in db.levels(p):
            np.testing.assert_array_equal(db.weights(p, lv), full.weights(p, lv))
    # a third run computes nothing and gives the same answer
    again = build_database(params, stats, LEVELS, path=tmp_path, progress=False)
    assert again.computed == [] and again.loaded == list(PATHS)
    budget = 0.3 * full.dense_cost()
    assert solve(again, budget) == solve(full, budget)
    # a subset of the levels still finds its weights in the files
    sub = again.subset([Int(4), None])
    assert sub.levels("dense_2") == (LayerSpec(), LayerSpec(quant=Int(4)))
    np.testing.assert_array_equal(sub.weights("dense_2", Int(4)), full.weights("dense_2", Int(4)))
    assert set(solve(sub, budget).values()) <= {LayerSpec(), LayerSpec(quant=Int(4))}
    # statistics of another model: a clear error, or a recomputation when asked
    other = dict(stats, dense_1=_state(np.random.default_rng(9), 16))
    with pytest.raises(ValueError, match="'dense_1'.*Hessian differs"):
        build_database(params, other, LEVELS, path=tmp_path, progress=False)
    with pytest.raises(ValueError, match="'dense_0'.*levels differs"):
        build_database(params, stats, LEVELS[:-1], path=tmp_path, progress=False)
    redo = build_database(
        params, other, LEVELS, path=tmp_path, progress=False, on_mismatch="recompute"
    )
    assert redo.computed == ["dense_1"]
    assert not np.array_equal(redo.records["dense_1"].loss, full.records["dense_1"].loss)


def test_mesh_equals_one_device(mlp):
    params, stats, _ = mlp
    assert len(jax.devices()) == 4
    mesh = jax.make_mesh((4,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    levels = [None, Unstructured(0.5), Unstructured(0.9), Int(4)]
    rules = [("dense_2", None), (".*", True)]
    one = build_database(params, stats, levels, rules=rules, progress=False)
    four = build_database(params, stats, levels, rules=rules, progress=False, mesh=mesh)
    assert four.paths == ("dense_0", "dense_1")
    for p in four.paths:
        np.testing.assert_allclose(four.records[p].loss, one.records[p].loss, rtol=1e-6)
        np.testing.assert_array_equal(four.records[p].nnz, one.records[p].nnz)
        np.testing.assert_allclose(
            four.records[p].weights, one.records[p].weights, rtol=1e-5, atol=1e-6
        )


def test_depthwise_conv_layer():
    rng = np.random.default_rng(3)
    params = {
        "dw": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)},
        "fc": {"kernel": jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)},
    }
    stats = {"dw": _state(rng, 9, groups=4), "fc": _state(rng, 16)}
    levels = [None, Unstructured(0.5), NM(2, 4)]
    db = build_database(params, stats, levels, progress=False)
    r = db.records["dw"]
    assert r.groups == 4 and r.shape == (3, 3, 1, 4)
    assert np.isinf(r.loss[2]) and np.isfinite(db.records["fc"].loss[2])  # 9 columns: no 2:4
    assert r.nnz[1] == 4 * (9 - 5)  # floor(0.5·9 + 0.5) = 5 zeros in each group
    out = compress(params, stats, [("dw", Unstructured(0.5)), ("fc", None)])
    np.testing.assert_allclose(
        db.weights("dw", Unstructured(0.5)), out.params["dw"]["kernel"], rtol=1e-6, atol=1e-6
    )
    assert r.loss[1] == pytest.approx(out.losses["dw"], rel=1e-5)
    # the DP never picks a level that does not fit; uniform only offers common levels
    for budget in (db.min_cost(), 0.6 * db.dense_cost()):
        assert solve(db, budget)["dw"] != LayerSpec(prune=NM(2, 4))
    assert uniform(db, db.cost_of({"dw": Unstructured(0.5), "fc": NM(2, 4)}))["fc"] != NM(2, 4)
    with pytest.raises(ValueError, match="does not fit"):
        db.cost_of({"dw": NM(2, 4), "fc": None})
    # MACs of a conv need its number of output positions
    with pytest.raises(ValueError, match=r"positions.*\['dw'\]"):
        solve(db, 1e9, metric="flops")
    db2 = build_database(params, stats, levels, progress=False, positions={"dw": 36})
    assert db2.costs("flops")["dw"][1] == 36 * 16 and db2.loaded == []


def test_errors_name_the_layer(mlp, tmp_path):
    params, stats, db = mlp
    with pytest.raises(ValueError, match="'head'.*matches no layer"):
        build_database(params, stats, LEVELS, rules=[("head", None), (".*", True)], progress=False)
    bad = dict(stats, dense_1=_state(np.random.default_rng(0), 12))
    with pytest.raises(ValueError, match="'dense_1'.*does not match its statistics"):
        build_database(params, bad, LEVELS, progress=False)
    with pytest.raises(ValueError, match=r"no calibration statistics for layer\(s\) \['dense_2'\]"):
        build_database(params, {k: stats[k] for k in PATHS[:2]}, LEVELS, progress=False)
    with pytest.raises(ValueError, match="appears twice"):
        build_database(params, stats, [None, Int(4), LayerSpec(quant=Int(4))], progress=False)
    with pytest.raises(ValueError, match="positions names 'dense_9'"):
        build_database(params, stats, LEVELS, positions={"dense_9": 3}, progress=False)
    choice = {p: Int(4) for p in PATHS}
    # param trees that do not belong to the database
    missing = {k: v for k, v in params.items() if k != "dense_2"}
    with pytest.raises(ValueError, match="'dense_2' of the database is not in params"):
        materialize(missing, db, choice)
    other = dict(params, dense_1={"kernel": params["dense_1"]["kernel"][:8]})
    with pytest.raises(ValueError, match=r"'dense_1' has a kernel of shape \(8, 16\)"):
        materialize(other, db, choice)
    changed = dict(params, dense_0={"kernel": params["dense_0"]["kernel"] + 1.0})
    with pytest.raises(ValueError, match="kernel of layer 'dense_0' differs"):
        materialize(changed, db, choice)
    # assignments naming unknown layers or levels
    with pytest.raises(ValueError, match=r"no level for layer\(s\) \['dense_2'\]"):
        db.loss_of({"dense_0": Int(4), "dense_1": Int(4)})
    with pytest.raises(ValueError, match="'dense_0': level 'w3'"):
        db.loss_of(dict(choice, dense_0=Int(3)))
    with pytest.raises(ValueError, match=r"\['conv'\] that are not in the database"):
        db.loss_of(dict(choice, conv=Int(4)))
    # no stored weights and no stats to recompute from
    nw = build_database(params, stats, [None, Int(4)], progress=False, store_weights=False)
    with pytest.raises(ValueError, match="stores no weights"):
        materialize(params, nw, choice)
    rec = materialize(params, nw, choice, stats=stats)
    np.testing.assert_allclose(
        rec["dense_1"]["kernel"], db.weights("dense_1", Int(4)), rtol=1e-6, atol=1e-6
    )


def test_sparsity_levels_and_rules_round_trip():
    lv = sparsity_levels()
    assert len(lv) == 45 and lv[0].sparsity == 0.0 and lv[-1].sparsity == 0.99
    assert lv[2].sparsity == pytest.approx(0.19) and lv[3].sparsity == pytest.approx(0.271)
    rules = to_rules({"block.1/dense[0]": Int(4), "head": None})
    assert rules[0][0] == r"block\.1/dense\[0\]" and rules[1] == ("head", None)
    assert rules[0][1] == LayerSpec(quant=Int(4))


# ---------------------------------------------------------------------------------------------
# mixed weight/activation levels (OBC's 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a) under a BOPs budget
# ---------------------------------------------------------------------------------------------

MIXED = mixed_levels((8, 4), extra=["6w6a", "4w8a"], solver="magnitude")


def _act_errors(seed=5):
    rng = np.random.default_rng(seed)
    # 4-bit noise ~ 16² x the 8-bit one, per input channel, different in every layer
    out = {}
    for p in PATHS:
        base = rng.uniform(0.5, 2.0, size=16) * 1e-3
        out[p] = {8: base, 6: base * 16, 4: base * 256}
    return out


@pytest.fixture(scope="module")
def mixed(mlp):
    params, stats, _ = mlp
    errs = _act_errors()
    db = build_database(
        params, stats, MIXED, progress=False, positions={"dense_1": 5}, act_errors=errs
    )
    return params, stats, errs, db


def _bops_from_specs(db, assignment):
    """BOPs recounted from the specs alone: positions · numel · density · w-bits · a-bits."""
    tot = 0.0
    for p, lv in assignment.items():
        lv = parse_level(lv) if isinstance(lv, str) else lv
        numel = int(np.prod(db.records[p].shape))
        density = 1.0
        if isinstance(lv.prune, NM):
            density = lv.prune.n / lv.prune.m
        elif isinstance(lv.prune, Unstructured):
            density = 1 - lv.prune.sparsity
        wb = lv.quant.bits if lv.quant is not None else 32
        ab = lv.abits if lv.abits is not None else 32
        tot += db.positions.get(p, 1) * numel * density * wb * ab
    return tot


def test_mixed_levels_names_and_parsing():
    assert [lv.name for lv in mixed_levels((8, 4))] == ["8w8a", "4w4a", "2:4+8w8a", "2:4+4w4a"]
    assert [lv.name for lv in mixed_levels((8, 4), (8, 4), nm=None)] == [
        "8w8a",
        "8w4a",
        "4w8a",
        "4w4a",
    ]
    for lv in MIXED:
        assert parse_level(lv.name, solver="magnitude") == lv
    lv = parse_level("2:4+4w8a")
    assert (lv.prune, lv.quant, lv.abits, lv.wbits) == (NM(2, 4), Int(4), 8, 4)
    assert parse_level("32w8a").quant is None and parse_level("4w32a").abits is None
    assert parse_level("0.5+6w6a").prune == Unstructured(0.5)
    blk = parse_level("4block@50%+8w8a")  # the reference's 4block_8w8a levels
    assert (blk.prune, blk.quant, blk.abits) == (Block(0.5, 4), Int(8), 8)
    assert parse_level(blk.name) == blk and blk.name == "blk4@50%+8w8a"
    assert WALevel(Int(4), 4) == parse_level("4w4a")  # a bare spec is read as a LayerSpec
    with pytest.raises(ValueError, match="4..8"):
        parse_level("4w3a")
    with pytest.raises(ValueError, match="4..8"):
        WALevel(Int(4), 9)
    with pytest.raises(ValueError, match="expected '<w>w<a>a'"):
        parse_level("w4a4")
    with pytest.raises(ValueError, match="weight bits"):
        parse_level("12w8a")


def test_mixed_database_losses_and_shared_weights(mixed):
    params, stats, errs, db = mixed
    for p in PATHS:
        r = db.records[p]
        assert r.levels == tuple(MIXED)
        li = {lv.name: i for i, lv in enumerate(r.levels)}
        # 4w4a and 4w8a share the (solved once) weights and the weights' loss
        w44, w48 = db.weights(p, "4w4a"), db.weights(p, "4w8a")
        np.testing.assert_array_equal(w44, w48)
        wl = r.loss - r.act_loss
        assert wl[li["4w4a"]] == pytest.approx(wl[li["4w8a"]], rel=1e-12)
        # the activation term is sum_i sigma_i^2 ||W_hat[:, i]||^2 (kernel (in, out): rows = in)
        for name, b in (("8w8a", 8), ("4w4a", 4), ("2:4+4w4a", 4), ("6w6a", 6)):
            k = np.asarray(db.weights(p, name), np.float64)
            want = float(np.sum(errs[p][b][:, None] * k**2))
            assert r.act_loss[li[name]] == pytest.approx(want, rel=1e-9)
        assert r.act_loss[li["4w4a"]] > r.act_loss[li["4w8a"]] > 0
        # weight part of a magnitude/RTN level: the OBS loss of those weights
        W = np.asarray(params[p]["kernel"], np.float64).T
        H = np.asarray(stats[p].sum, np.float64)[0] * 2 / float(stats[p].count)
        d = np.asarray(w44, np.float64).T - W
        assert wl[li["4w4a"]] == pytest.approx(0.5 * np.trace(d @ H @ d.T), rel=2e-2)


def test_mixed_bops_recounted_from_specs_meet_the_budget(mixed):
    _, _, _, db = mixed
    c8 = db.cost_of({p: "8w8a" for p in PATHS}, "bops")
    assert c8 == _bops_from_specs(db, {p: "8w8a" for p in PATHS})
    assert db.dense_cost("bops") == 16 * c8  # 32w32a
    lo = db.min_cost("bops")
    # the cheapest level: 2:4 halves the MACs of 4w4a
    assert lo == _bops_from_specs(db, {p: "2:4+4w4a" for p in PATHS}) == c8 / 8
    seen = set()
    for factor in (1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0):
        budget = c8 / factor
        choice = solve(db, budget, metric="bops")
        assert all(isinstance(lv, WALevel) for lv in choice.values())
        recount = _bops_from_specs(db, choice)
        assert recount <= budget * (1 + 1e-12)
        assert recount == pytest.approx(db.cost_of(choice, "bops"), rel=1e-12)
        assert db.loss_of(choice) == pytest.approx(_brute(db, budget, "bops"), rel=1e-9)
        seen.add(tuple(lv.name for lv in choice.values()))
    assert len(seen) >= 4  # the budgets really change the choice
    # a budget below the cheapest configuration names the cheapest reachable BOPs
    with pytest.raises(ValueError, match=f"smallest reachable cost {lo:g}"):
        solve(db, lo * 0.99, metric="bops")


def test_mixed_rules_materialize_and_activation_rules(mixed):
    params, stats, _, db = mixed
    choice = {
        "dense_0": parse_level("2:4+4w4a", solver="magnitude"),
        "dense_1": parse_level("8w8a", solver="magnitude"),
        "dense_2": WALevel(None, None),
    }
    rules = to_rules(choice)
    assert rules[0] == ("dense_0", LayerSpec(NM(2, 4), Int(4), "magnitude"))
    assert rules[2] == ("dense_2", None)
    arules = activation_rules(choice)
    assert arules == [
        ("dense_0", Int(4, sym=False)),
        ("dense_1", Int(8, sym=False)),
        ("dense_2", None),
    ]
    assert activation_rules({"a": Int(4)}) == [("a", None)]  # weight-only level: float inputs
    choice["dense_2"] = parse_level("4w8a", solver="magnitude")
    new = materialize(params, db, choice)
    out = compress(
        params, stats, rules[:2] + [("dense_2", LayerSpec(quant=Int(4), solver="magnitude"))]
    )
    for p in PATHS:
        np.testing.assert_array_equal(new[p]["kernel"], out.params[p]["kernel"])
    with pytest.raises(ValueError, match="is not in the database"):
        db.cost_of({**choice, "dense_0": parse_level("2:4+6w6a")}, "bops")


def test_mixed_database_resumes_and_checks_act_errors(mlp, tmp_path):
    params, stats, _ = mlp
    errs = _act_errors()
    levels = mixed_levels((8, 4), solver="magnitude")
    a = build_database(
        params,
        stats,
        levels,
        progress=False,
        path=tmp_path / "db",
        act_errors=errs,
        store_weights=False,
    )
    b = build_database(params, stats, levels, progress=False, path=tmp_path / "db", act_errors=errs)
    assert b.loaded == list(PATHS) and b.computed == []
    for p in PATHS:
        np.testing.assert_array_equal(a.records[p].loss, b.records[p].loss)
        np.testing.assert_array_equal(a.weights(p, "2:4+4w4a"), b.weights(p, "2:4+4w4a"))
    # the activation term is not stored: other errors give other losses from the same weights
    c = build_database(
        params,
        stats,
        levels,
        progress=False,
        path=tmp_path / "db",
        act_errors={p: {k: 2 * e for k, e in d.items()} for p, d in errs.items()},
    )
    r, rc = b.records["dense_0"], c.records["dense_0"]
    np.testing.assert_allclose(rc.act_loss, 2 * r.act_loss)
    np.testing.assert_allclose(rc.loss - rc.act_loss, r.loss - r.act_loss, rtol=1e-12)
    with pytest.raises(ValueError, match=r"'dense_1'.*act_errors has no entry"):
        build_database(
            params,
            stats,
            levels,
            progress=False,
            act_errors={k: v for k, v in errs.items() if k != "dense_1"},
        )
    with pytest.raises(ValueError, match=r"'dense_0'.*need \[4\]"):
        build_database(
            params,
            stats,
            levels,
            progress=False,
            act_errors={p: {8: d[8]} for p, d in errs.items()},
        )
    with pytest.raises(ValueError, match=r"'dense_0'.*input channels"):
        build_database(
            params,
            stats,
            levels,
            progress=False,
            act_errors={p: {k: e[:8] for k, e in d.items()} for p, d in errs.items()},
        )


def test_mixed_conv_groups_and_nm_width():
    rng = np.random.default_rng(4)
    params = {
        "dw": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 1, 4)), jnp.float32)},
        "pw": {"kernel": jnp.asarray(rng.normal(size=(1, 1, 4, 8)), jnp.float32)},
    }
    stats = {"dw": _state(rng, 9, groups=4), "pw": _state(rng, 4)}
    errs = {
        "dw": {4: np.array([1.0, 2.0, 3.0, 4.0]) * 1e-2},
        "pw": {4: np.array([4.0, 3.0, 2.0, 1.0]) * 1e-2},
    }
    levels = [parse_level(t, solver="magnitude") for t in ("32w4a", "4w4a", "2:4+4w4a")]
    db = build_database(
        params, stats, levels, progress=False, act_errors=errs, positions={"dw": 16, "pw": 16}
    )
    r = db.records["dw"]
    # 9 columns per group: no 2:4, so no halving of the MACs is ever chosen there
    assert np.isinf(r.loss[2]) and np.isfinite(db.records["pw"].loss[2])
    assert solve(db, db.min_cost("bops"), metric="bops")["dw"].name == "4w4a"
    # group g of the depthwise kernel reads input channel g only
    k = np.asarray(params["dw"]["kernel"], np.float64)
    want = sum(errs["dw"][4][g] * np.sum(k[..., 0, g] ** 2) for g in range(4))
    assert r.act_loss[0] == pytest.approx(want, rel=1e-9)  # float weights: the dense kernel
    assert db.costs("bops")["dw"][0] == 16 * 36 * 32 * 4
    assert db.costs("bops")["pw"][2] == 16 * 16 * 4 * 4


# ---------------------------------------------------------------------------------------------
# network scores (OBC's `loss` mode), the `squared` score and the SPDY search
# ---------------------------------------------------------------------------------------------

# a subset of LEVELS on 16 x 16 matrices: the solvers compiled for the `mlp` fixture are reused
NET_LEVELS = [None, Unstructured(0.5), Unstructured(0.75), NM(2, 4), Int(4),
              (Unstructured(0.75), Int(4))]


def _net_fwd(p, x, keep=None):
    h = x
    for i in range(3):
        if keep is not None:
            keep[f"d{i}"] = h
        h = h @ p[f"d{i}"]["kernel"] + p[f"d{i}"]["bias"]
        if i < 2:
            h = jnp.tanh(h)
    return h


def _net_problem():
    rng = np.random.default_rng(7)
    dims = [16, 16, 16, 16]
    params = {
        f"d{i}": {
            "kernel": jnp.asarray(rng.normal(size=dims[i : i + 2]) / np.sqrt(dims[i]), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=dims[i + 1]) * 0.1, jnp.float32),
        }
        for i in range(3)
    }
    X = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    Y = _net_fwd(params, X) + 0.1 * jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)
    ins = {}
    _net_fwd(params, X, ins)
    stats = {
        p: HessianState((x.T @ x)[None], jnp.asarray(x.shape[0], jnp.int32)) for p, x in ins.items()
    }

    def loss_fn(p):
        return jnp.mean(jnp.square(_net_fwd(p, X) - Y))

    def loss64(p):  # the same loss in float64 NumPy, for the brute-force stitch
        h = np.asarray(X, np.float64)
        for i in range(3):
            h = h @ np.asarray(p[f"d{i}"]["kernel"], np.float64) + np.asarray(
                p[f"d{i}"]["bias"], np.float64
            )
            h = np.tanh(h) if i < 2 else h
        return float(np.mean(np.square(h - np.asarray(Y, np.float64))))

    return params, stats, loss_fn, loss64


@pytest.fixture(scope="module")
def net():
    from obcjax.allocation import network_scores

    params, stats, loss_fn, loss64 = _net_problem()
    db = build_database(params, stats, NET_LEVELS, progress=False)
    return params, stats, loss_fn, loss64, network_scores(db, params, loss_fn, progress=False)


def _stitch(params, db, assignment):
    from obcjax.layout import set_path

    new = params
    for p, lv in assignment.items():
        new = set_path(new, p, "kernel", jnp.asarray(db.weights(p, lv)))
    return new


def test_network_scores_equal_a_brute_force_stitch(net):
    params, _, loss_fn, loss64, db = net
    base = loss64(params)
    assert db.base_loss == pytest.approx(base, rel=1e-5)
    for p in db.paths:
        r = db.records[p]
        assert r.net_loss[0] == 0.0  # the dense level is the dense model
        for i, lv in enumerate(r.levels[1:], 1):
            want = loss64(_stitch(params, db, {p: lv})) - base
            assert r.net_loss[i] == pytest.approx(want, rel=1e-3, abs=1e-6 * base)
    # every score solves; the DP on each is optimal for that score (brute force)
    budget = 0.3 * db.dense_cost("size")
    for score in ("obs", "relative", "squared", "network"):
        choice = solve(db, budget, score=score)
        assert db.cost_of(choice) <= budget
        table = db._with(
            [dataclasses.replace(db.records[p], loss=db.losses(score)[p]) for p in db.paths],
            error="obs",
        )
        assert db.loss_of(choice, score) == pytest.approx(_brute(table, budget), rel=1e-9)
    # squared: each layer's largest output error scores 1
    sq = db.losses("squared")
    for p in db.paths:
        ls = db.records[p].loss
        np.testing.assert_allclose(sq[p], ls / ls.max(), rtol=1e-12)


def test_network_scores_eager_loss_and_errors(net, tmp_path):
    from obcjax.allocation import network_scores

    params, stats, loss_fn, _, db = net

    def not_traceable(p):  # np.asarray on a tracer: falls back to eager calls
        return float(np.asarray(loss_fn(p)))

    eager = network_scores(db, params, not_traceable, progress=False)
    for p in db.paths:
        np.testing.assert_allclose(eager.records[p].net_loss, db.records[p].net_loss, rtol=1e-4,
                                   atol=1e-7)
    with pytest.raises(ValueError, match="differs from the one the database was built from"):
        network_scores(db, {**params, "d0": {**params["d0"], "kernel": params["d0"]["kernel"] + 1}},
                       loss_fn, progress=False)
    with pytest.raises(ValueError, match="network_scores.*no weights"):
        network_scores(build_database(params, stats, NET_LEVELS, progress=False,
                                      store_weights=False), params, loss_fn, progress=False)
    with pytest.raises(ValueError, match="network_scores"):
        solve(build_database(params, stats, NET_LEVELS[:2], progress=False), 1e9, score="network")
    with pytest.raises(ValueError, match="returned nan"):
        network_scores(db, params, lambda p: loss_fn(p) * jnp.nan, progress=False)


def test_network_scores_are_cached_and_resumable(monkeypatch, tmp_path):
    from obcjax import allocation
    from obcjax.allocation import network_scores
    from obcjax.fileio import CorruptedFileError

    params, stats, loss_fn = _net_problem()[:3]
    path = tmp_path / "db"
    db = build_database(params, stats, NET_LEVELS, progress=False, path=path)
    a = network_scores(db, params, loss_fn, progress=False, key="mse")
    calls = []

    def counting(p):
        calls.append(1)
        return loss_fn(p)

    b = network_scores(
        build_database(params, stats, NET_LEVELS, progress=False, path=path),
        params, counting, progress=False, key="mse", jit=False,
    )
    assert len(calls) == 1  # only the dense loss: every layer read back
    for p in db.paths:
        np.testing.assert_array_equal(a.records[p].net_loss, b.records[p].net_loss)
        np.testing.assert_array_equal(a.weights(p, Int(4)), b.weights(p, Int(4)))
    # another loss (its dense loss differs) or another key: an error, or a recompute
    with pytest.raises(ValueError, match=r"'d0'.*dense model's calibration loss differs"):
        network_scores(db, params, lambda p: 2 * loss_fn(p), progress=False, key="mse")
    with pytest.raises(ValueError, match=r"'d0'.*the key differs"):
        network_scores(db, params, loss_fn, progress=False, key="other")
    c = network_scores(db, params, lambda p: 2 * loss_fn(p), progress=False, key="mse",
                       on_mismatch="recompute", jit=False)
    np.testing.assert_allclose(c.records["d1"].net_loss, 2 * a.records["d1"].net_loss, rtol=1e-5)
    # a damaged file is an error naming the layer, never a silently different result
    import zipfile

    f = allocation._layer_file(str(path), "d2")
    with zipfile.ZipFile(f) as z:
        members = {n: z.read(n) for n in z.namelist()}
    raw = bytearray(members["net_loss.npy"])
    raw[-3] ^= 0xFF  # one byte of the last score
    members["net_loss.npy"] = bytes(raw)
    with zipfile.ZipFile(f, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)
    with pytest.raises(CorruptedFileError, match=r"'d2'.*'net_loss' fails its checksum"):
        network_scores(db, params, lambda p: 2 * loss_fn(p), progress=False, key="mse")
    # a database written by the previous format version: an error or a recompute
    old = tmp_path / "old"
    monkeypatch.setattr(allocation, "FORMAT_VERSION", 1)
    build_database(params, stats, NET_LEVELS, progress=False, path=old)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="format version differs"):
        build_database(params, stats, NET_LEVELS, progress=False, path=old)
    build_database(params, stats, NET_LEVELS, progress=False, path=old, on_mismatch="recompute")


def test_spdy_is_deterministic_and_never_worse_than_the_dp(net):
    from obcjax.allocation import spdy

    params, _, loss_fn, loss64, db = net
    budget = 0.3 * db.dense_cost("size")
    kw = dict(score="network", inits=12, tries=6, progress=False)
    r1 = spdy(db, budget, params, loss_fn, seed=3, **kw)
    r2 = spdy(db, budget, params, loss_fn, seed=3, **kw)
    assert r1.assignment == r2.assignment and r1.loss == r2.loss and r1.history == r2.history
    np.testing.assert_array_equal(r1.coefs, r2.coefs)
    # the starting point is the DP on the same scores, and the search only keeps improvements
    assert r1.dp_assignment == solve(db, budget, score="network")
    assert r1.loss <= r1.dp_loss
    assert r1.history == sorted(r1.history, reverse=True) and r1.history[0] == r1.dp_loss
    assert db.cost_of(r1.assignment) <= budget
    # the reported loss is the stitched model's real calibration loss
    assert r1.loss == pytest.approx(loss64(_stitch(params, db, r1.assignment)), rel=1e-4)
    assert r1.dp_loss == pytest.approx(loss64(_stitch(params, db, r1.dp_assignment)), rel=1e-4)
    capped = spdy(db, budget, params, loss_fn, seed=3, max_evals=2, **kw)
    assert capped.evaluations <= 2
    with pytest.raises(ValueError, match="smallest reachable cost"):
        spdy(db, 1.0, params, loss_fn, **kw)


def test_dense_general_kernels_through_the_layout():
    """Kernels with several output (or input) axes are read through obcjax.layout, as compress
    reads them: the database's levels equal compress's results."""
    rng = np.random.default_rng(5)
    params = {
        "q": {"kernel": jnp.asarray(rng.normal(size=(16, 2, 8)), jnp.float32)},  # (in, heads, hd)
        "o": {"kernel": jnp.asarray(rng.normal(size=(2, 8, 16)), jnp.float32)},  # (heads, hd, out)
    }
    stats = {"q": _state(rng, 16), "o": _state(rng, 16)}
    levels = [None, Unstructured(0.5), Int(4)]
    db = build_database(params, stats, levels, progress=False)
    for lv in levels[1:]:
        out = compress(params, stats, [(".*", lv)])
        for p in ("q", "o"):  # (compress solves the two same-shaped layers as one vmapped call)
            np.testing.assert_allclose(db.weights(p, lv), out.params[p]["kernel"], rtol=1e-5,
                                       atol=1e-6)
