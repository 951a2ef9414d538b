"""Tests of obcjax.fit: empirical Fisher vs a per-example loop, FIT score, the FITCompress search."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from obcjax import fit
from obcjax.specs import NM, Int, Unstructured
from obcjax.transforms import LayerSpec, summarize


def _mlp(seed=0, din=5, hid=7, dout=3):
    rng = np.random.default_rng(seed)
    return {
        "fc1": {
            "kernel": jnp.asarray(rng.normal(size=(din, hid)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=hid) * 0.1, jnp.float32),
        },
        "fc2": {
            "kernel": jnp.asarray(rng.normal(size=(hid, dout)), jnp.float32),
            "bias": jnp.zeros(dout, jnp.float32),
        },
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    logits = h @ params["fc2"]["kernel"] + params["fc2"]["bias"]
    return -jax.nn.log_softmax(logits)[y]


def _data(n=21, din=5, seed=1):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, din)).astype(np.float32), rng.integers(0, 3, n).astype(np.int32)


def _batches(x, y, b):
    return [(x[i : i + b], y[i : i + b]) for i in range(0, len(y), b)]


def test_fisher_matches_per_example_loop_and_traces_once():
    params = _mlp()
    x, y = _data()
    before = fit.TRACE_COUNTS["fisher_step"]
    # 21 examples in batches of 8: the last batch (5) is padded, which must neither retrace nor
    # count the padding rows
    f = fit.fisher_diagonal(_loss, params, _batches(x, y, 8), tol=0.0, max_batches=10)
    assert fit.TRACE_COUNTS["fisher_step"] - before == 1
    assert f.batches == 3 and f.examples == 21 and not f.converged
    ref = {"fc1": np.zeros((5, 7)), "fc2": np.zeros((7, 3))}
    for i in range(len(y)):
        g = jax.grad(_loss)(params, x[i], y[i])
        for p in ref:
            ref[p] += np.asarray(g[p]["kernel"], np.float64) ** 2
    for p in ref:
        np.testing.assert_allclose(np.asarray(f.diag[p]), ref[p] / len(y), rtol=1e-4, atol=1e-7)


def test_fisher_early_stop_and_rules():
    params = _mlp()
    x, y = _data(8)
    same = [(x, y)] * 6  # identical batches: the running mean stops moving after batch 2
    f = fit.fisher_diagonal(_loss, params, same, tol=1e-6, min_batches=2)
    assert f.converged and f.batches == 2 and f.changes[1] < 1e-6
    f1 = fit.fisher_diagonal(_loss, params, same, rules=("fc1",), tol=1e-6)
    assert set(f1.diag) == {"fc1"}


def test_fisher_errors():
    params = _mlp()
    x, y = _data(8)
    with pytest.raises(ValueError, match="no labels"):
        fit.fisher_diagonal(_loss, params, [x])
    with pytest.raises(ValueError, match="no labels"):
        fit.fisher_diagonal(_loss, params, [{"x": x}])
    with pytest.raises(ValueError, match="no kernels matched"):
        fit.fisher_diagonal(_loss, params, [(x, y)], rules=("conv.*",))
    with pytest.raises(ValueError, match="empty"):
        fit.fisher_diagonal(_loss, params, [])


def _sym_minmax_noise(kernel, bits):
    w = np.asarray(kernel, np.float64)  # (in, out); rows of the grid are output channels
    xmax = np.maximum(np.abs(np.minimum(w.min(0), 0)), np.maximum(w.max(0), 0))
    step = 2 * xmax / (2**bits - 1)
    return np.broadcast_to(step**2 / 12, w.shape)


def test_fit_score_matches_manual_formula():
    params = _mlp()
    rng = np.random.default_rng(3)
    F = {p: jnp.asarray(rng.uniform(0.1, 2.0, params[p]["kernel"].shape)) for p in params}
    grid = Int(bits=3, search="minmax")
    got = fit.fit_score(F, params, {"fc1": LayerSpec(quant=grid), "fc2": None}, per_layer=True)
    want = np.sum(np.asarray(F["fc1"]) * _sym_minmax_noise(params["fc1"]["kernel"], 3))
    assert got["fc1"] == pytest.approx(want, rel=1e-5) and got["fc2"] == 0.0
    # pruning only: the pruned weights' F·w², and they are the smallest F·w²
    w = np.asarray(params["fc2"]["kernel"], np.float64)
    sal = np.asarray(F["fc2"]) * w**2
    s = fit.fit_score(F, params, {"fc2": LayerSpec(prune=Unstructured(0.5))})
    k = int(np.floor(0.5 * w.size + 0.5))
    assert s == pytest.approx(np.sort(sal.ravel())[:k].sum(), rel=1e-5)
    # joint: pruned weights contribute w², kept ones the noise
    spec = LayerSpec(prune=Unstructured(0.5), quant=grid)
    m = fit.fisher_mask(F["fc2"], w, 0.5)
    want = np.sum(
        np.asarray(F["fc2"]) * np.where(m, _sym_minmax_noise(params["fc2"]["kernel"], 3), w**2)
    )
    assert fit.fit_score(F, params, {"fc2": spec}) == pytest.approx(want, rel=1e-5)
    # more bits, less FIT
    lo = fit.fit_score(F, params, {"fc1": LayerSpec(quant=Int(bits=8, search="minmax"))})
    assert lo < got["fc1"] / 100


def _search_setup(seed=0):
    params = _mlp(seed, din=12, hid=24, dout=10)
    rng = np.random.default_rng(seed + 10)
    F = {p: jnp.asarray(rng.gamma(0.5, 1.0, params[p]["kernel"].shape)) for p in params}
    return params, F


def _counted_size(params, plan):
    kernel_n = sum(m.size for m in plan.masks.values())
    other = sum(np.size(x) for x in jax.tree.leaves(params)) - kernel_n
    return sum(int(plan.masks[p].sum()) * plan.bits[p] for p in plan.masks) + 32 * other


@pytest.mark.parametrize(
    "ratio,rule", [(0.3, "ratio"), (0.15, "astar"), (0.1, "ratio"), (0.07, "astar")]
)
def test_search_meets_target_from_stored_bits_and_masks(ratio, rule):
    params, F = _search_setup()
    plan = fit.fit_search(params, F, target_ratio=ratio, rule=rule)
    counted = _counted_size(params, plan)
    assert counted == plan.size_bits <= ratio * plan.dense_bits
    sizes = [t["size_bits"] for t in plan.trace]
    assert all(a > b for a, b in zip(sizes, sizes[1:]))  # every move saves bits
    # the plan's specs agree with its masks, and the materialised model is no larger
    for p, spec in plan.specs.items():
        pruned = plan.masks[p].size - int(plan.masks[p].sum())
        assert (spec.prune.sparsity * plan.masks[p].size if spec.prune else 0) == pytest.approx(
            pruned
        )
        assert spec.quant.bits == plan.bits[p]
    out = fit.apply_plan(params, plan)
    # FIT plans on kept values (obcjax.sizes' value bits); the size adds masks and grids
    assert out.summary["total/value_bits"] <= plan.size_bits
    assert summarize(params, out.params, plan.specs)["total/value_bits"] <= ratio * plan.dense_bits
    assert plan.fit == pytest.approx(
        fit.fit_score(F, params, plan.specs, masks=plan.masks), rel=1e-4
    )
    assert [r for r, _ in plan.rules()] == ["fc1", "fc2"]


def test_search_deterministic_and_no_retrace():
    params, F = _search_setup()
    a = fit.fit_search(params, F, target_ratio=0.1, seed=3)
    before = fit.TRACE_COUNTS["score"]
    b = fit.fit_search(params, F, target_ratio=0.1, seed=3)
    c = fit.fit_search(params, F, target_ratio=0.08, seed=3)
    assert len(b.trace) > 5 and len(c.trace) > len(b.trace)
    assert fit.TRACE_COUNTS["score"] == before  # same shapes: no new trace across steps or calls
    assert a.trace == b.trace and a.bits == b.bits
    assert all(np.array_equal(a.masks[p], b.masks[p]) for p in a.masks)
    # a fresh layer count is a new shape: exactly one trace for a whole search
    p3 = {**params, "fc3": {"kernel": jnp.ones((10, 4)) * 0.3}}
    F3 = {**F, "fc3": jnp.ones((10, 4))}
    before = fit.TRACE_COUNTS["score"]
    d = fit.fit_search(p3, F3, target_ratio=0.1)
    assert fit.TRACE_COUNTS["score"] - before == 1 and len(d.trace) > 5


def test_search_errors():
    params, F = _search_setup()
    with pytest.raises(ValueError, match="unreachable"):
        fit.fit_search(params, F, target_ratio=0.001)
    with pytest.raises(ValueError, match="no kernels matched"):
        fit.fit_search(params, F, target_ratio=0.1, rules=("conv",))
    with pytest.raises(ValueError, match="no Fisher diagonal.*fc2"):
        fit.fit_search(params, {"fc1": F["fc1"]}, target_ratio=0.1)
    with pytest.raises(ValueError, match="exactly one"):
        fit.fit_search(params, F)
    with pytest.raises(ValueError, match="bit_schedule"):
        fit.fit_search(params, F, target_ratio=0.1, bit_schedule=(4, 6))
    with pytest.raises(ValueError, match="rule"):
        fit.fit_search(params, F, target_ratio=0.1, rule="beam")
    plan = fit.fit_search(params, F, target_ratio=0.1)
    with pytest.raises(ValueError, match="needs calibration stats"):
        fit.apply_plan(params, plan, solver="obc")
    with pytest.raises(ValueError, match="unreachable"):
        fit.fit_dp(params, F, target_ratio=0.001)
    with pytest.raises(ValueError, match="only Unstructured"):
        fit.fit_database(params, F, [LayerSpec(prune=NM(2, 4))])


def _rtn(params, path, bits):
    """Round-to-nearest kernel on the min-max grid (the public prune_and_round, no mask)."""
    spec = LayerSpec(quant=Int(bits=bits, search="minmax"))
    return np.asarray(fit.prune_and_round(params, {path: spec}).params[path]["kernel"], np.float64)


def test_astar_steps_follow_the_paper_cost():
    params, F = _search_setup(1)
    sched = (8, 4, 2)
    fr = fit.prune_schedule(12, -1.5)
    plan = fit.fit_search(
        params, F, target_ratio=0.08, bit_schedule=sched, pruned_fractions=fr, rule="astar", lam=0.7
    )
    paths = ["fc1", "fc2"]
    w = {p: np.asarray(params[p]["kernel"], np.float64) for p in paths}
    Fd = {p: np.asarray(F[p], np.float64) for p in paths}
    n_all = sum(np.size(x) for x in jax.tree.leaves(params))
    other = 32 * (n_all - sum(w[p].size for p in paths))
    dense, target = 32 * n_all, 0.08 * 32 * n_all
    sal = np.concatenate([(Fd[p] * w[p] ** 2).ravel() for p in paths])
    order = np.argsort(sal, kind="stable")
    N = sal.size

    def node(bits, j):
        keep = np.ones(N, bool)
        keep[order[: int(np.floor(fr[j] * N + 1e-9))]] = False
        th, off, size = {}, 0, other
        for p in paths:
            m = keep[off : off + w[p].size].reshape(w[p].shape)
            off += w[p].size
            th[p] = np.where(m, _rtn(params, p, bits[p]), 0.0)
            size += int(m.sum()) * bits[p]
        return th, size

    bits, j, g = {p: sched[0] for p in paths}, 0, 0.0
    theta, size = node(bits, j)
    for t, rec in enumerate(plan.trace[1:], start=1):
        kids = {}
        for p in paths:
            if bits[p] != sched[-1]:
                kids[("quant", p)] = ({**bits, p: sched[sched.index(bits[p]) + 1]}, j)
        kids[("prune", None)] = (bits, j + 1)
        f = {}
        for key, (b, jj) in kids.items():
            th, sz = node(b, jj)
            step = sum(np.sum(Fd[p] * (theta[p] - th[p]) ** 2) for p in paths)
            selff = sum(np.sum(Fd[p] * th[p] ** 2) for p in paths)
            f[key] = (g + np.sqrt(step) + 0.7 * abs(sz / dense - 0.08) * np.sqrt(selff), sz, step)
        reach = {k: v for k, v in f.items() if v[1] <= target}
        pool = reach or f
        best = min(pool, key=lambda k: pool[k][0])
        assert (rec["move"], rec["layer"]) == best, f"step {t}"
        assert rec["f"] == pytest.approx(pool[best][0], rel=1e-4)
        bits, j = kids[best]
        g += np.sqrt(pool[best][2])
        theta, size = node(bits, j)
        assert rec["size_bits"] == size and rec["g"] == pytest.approx(g, rel=1e-4)
        assert (t == len(plan.trace) - 1) == (size <= target)  # stops at the first node in budget


def test_fit_dp_is_the_brute_force_optimum():
    params, F = _search_setup(2)
    grid = Int(bits=8, search="minmax")
    levels = [
        LayerSpec(prune=Unstructured(s) if s else None, quant=Int(bits=b, search="minmax"))
        for s in (0.0, 0.5, 0.8)
        for b in (8, 4, 2)
    ]
    n_all = sum(np.size(x) for x in jax.tree.leaves(params))
    target = 0.09 * 32 * n_all
    plan = fit.fit_dp(params, F, target_bits=target, levels=levels)
    other = 32 * (n_all - params["fc1"]["kernel"].size - params["fc2"]["kernel"].size)
    best = None
    for a in levels:
        for b in levels:
            specs = {"fc1": a, "fc2": b}
            size = other + sum(
                (np.size(params[p]["kernel"]) - int(np.floor(
                    (s.prune.sparsity if s.prune else 0) * np.size(params[p]["kernel"]) + 0.5
                ))) * s.quant.bits
                for p, s in specs.items()
            )  # fmt: skip
            if size <= target:
                f = fit.fit_score(F, params, specs)
                if best is None or f < best[0]:
                    best = (f, specs)
    assert plan.fit == pytest.approx(best[0], rel=1e-6)
    assert {p: (s.prune, s.quant.bits) for p, s in plan.specs.items()} == {
        p: (s.prune, s.quant.bits) for p, s in best[1].items()
    }
    assert _counted_size(params, plan) == plan.size_bits <= target
    assert grid.bits == 8


def _zoo_mlp(seed=0):
    from obcjax.zoo.models import init_variables

    return init_variables("mlp", (4, 4, 1), num_classes=3, seed=seed)


def test_finetune_plan_keeps_mask_and_grid():
    from obcjax.recipes.finetune import zoo_finetune_plan
    from obcjax.training import fake_quantize_params, mask_tree
    from obcjax.zoo.data import Split

    v = _zoo_mlp()
    p = v["params"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, 48).astype(np.int32)
    F = {k: jnp.asarray(rng.uniform(0.5, 1.0, p[k]["kernel"].shape)) for k in ("fc1", "fc3")}
    n_sel = p["fc1"]["kernel"].size + p["fc3"]["kernel"].size
    other = 32 * (sum(np.size(a) for a in jax.tree.leaves(p)) - n_sel)
    target = other + 0.6 * 3 * n_sel  # needs both 3 bits and pruning
    plan = fit.fit_search(p, F, target_bits=target, rules=("fc1", "fc3"), bit_schedule=(4, 3))
    assert any(s.prune for s in plan.specs.values())
    out = fit.apply_plan(p, plan)
    cbs = fit.codebooks_of(out)
    # the frozen codebooks reproduce the compressed kernels: fine-tuning starts where RTN ended
    again = fake_quantize_params(out.params, cbs, mask_tree(p, out.masks))
    for k in ("fc1", "fc3"):
        np.testing.assert_array_equal(np.asarray(again[k]["kernel"]), out.params[k]["kernel"])
    new, info = zoo_finetune_plan("mlp", v, out, Split(x, y), 6, lr=0.05, batch_size=16)
    assert len(info["losses"]) == 6
    moved = 0
    for k in ("fc1", "fc3"):
        kern = np.asarray(new["params"][k]["kernel"], np.float64)
        m = plan.masks[k]
        assert np.all(kern[~m] == 0)
        s, z = np.asarray(cbs[k].scale, np.float64), np.asarray(cbs[k].zero, np.float64)
        codes = kern / s + z
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert codes.min() >= -1e-3 and codes.max() <= 2 ** plan.bits[k] - 1 + 1e-3
        moved += int(np.sum(kern != np.asarray(out.params[k]["kernel"])))
    assert moved > 0


def test_activation_fisher_matches_manual_gradients():
    from obcjax.zoo.models import linen_model

    v = _zoo_mlp(1)
    p = v["params"]
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 4, 4, 1)).astype(np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    act = fit.activation_fisher(linen_model("mlp", 3), v, batches, tol=0.0)
    assert act.order == ["fc1", "fc2", "fc3"] and set(act.trace) == {"fc2", "fc3"}
    assert act.batches == 2 and act.examples == 10

    def dense(name, h):
        return h @ p[name]["kernel"] + p[name]["bias"]

    def ce(logits, t):
        return -jax.nn.log_softmax(logits)[t]

    tr2 = tr3 = 0.0
    for i in range(10):
        h1 = jax.nn.relu(dense("fc1", jnp.asarray(x[i]).reshape(-1)))
        h2 = jax.nn.relu(dense("fc2", h1))
        g1 = jax.grad(lambda a, i=i: ce(dense("fc3", jax.nn.relu(dense("fc2", a))), y[i]))(h1)
        g2 = jax.grad(lambda a, i=i: ce(dense("fc3", a), y[i]))(h2)
        tr2 += float(np.sum(np.asarray(g1, np.float64) ** 2)) / 10
        tr3 += float(np.sum(np.asarray(g2, np.float64) ** 2)) / 10
    assert act.trace["fc2"] == pytest.approx(tr2, rel=1e-4)
    assert act.trace["fc3"] == pytest.approx(tr3, rel=1e-4)
    his = []
    for xb in (x[:6], x[6:]):
        h1 = jax.nn.relu(dense("fc1", jnp.asarray(xb).reshape(len(xb), -1)))
        his.append(float(h1.max()))
    assert act.hi["fc2"] == pytest.approx(np.mean(his), rel=1e-5) and act.lo["fc2"] == 0.0
    got = fit.activation_fit(act, {"fc2": 4})["fc2"]
    assert got == pytest.approx(tr2 * (np.mean(his) / 15) ** 2 / 12, rel=1e-4)
    assert fit.activation_fit(act, {"fc2": 8})["fc2"] < got / 200
    with pytest.raises(ValueError, match="no labels"):
        fit.activation_fisher(linen_model("mlp", 3), v, [x])
    with pytest.raises(ValueError, match="no layer input matched"):
        fit.activation_fisher(linen_model("mlp", 3), v, batches, rules=("fc1",))
    with pytest.raises(ValueError, match="'fc1'"):
        fit.activation_fit(act, {"fc1": 4})


# -- issue 20: Fisher re-estimation, the activation term, BOPs -------------------------------------


def test_default_search_path_is_unchanged():
    """The plans of the search before the re-estimation / activation / BOPs options (pinned)."""
    params, F = _search_setup(0)
    fr = fit.prune_schedule(12, -1.5)
    want = {"astar": "pq1q2q1q2pq1q2p", "ratio": "q1q2pq1q2pq1pq2"}
    for rule, path in want.items():
        plan = fit.fit_search(params, F, target_ratio=0.1, rule=rule, pruned_fractions=fr)
        moves = "".join(
            "q" + t["layer"][-1] if t["move"] == "quant" else "p" for t in plan.trace[1:]
        )
        assert moves == path, rule
        assert plan.bits == {"fc1": 3, "fc2": 3} and plan.level == 3 and plan.size_bits == 1706
        assert plan.fisher_passes == 0 and plan.bops is None and plan.act_fit == 0.0
        assert set(plan.trace[-1]) == {
            "move", "layer", "fit", "size_bits", "alpha", "g", "h", "f", "score", "sparsity", "bits"
        }  # fmt: skip


def _gated():
    """``a (4, 2) → b (2, 1)``, linear: ``a``'s column 0 feeds ``b[0]`` only."""
    a = np.array([[0.1, 1.0], [0.1, 1.0], [0.1, 1.0], [0.1, 0.25]], np.float32)
    params = {"a": {"kernel": jnp.asarray(a)}, "b": {"kernel": jnp.ones((2, 1), jnp.float32)}}

    def loss(p, x, y):
        return 0.5 * jnp.sum((x @ p["a"]["kernel"] @ p["b"]["kernel"] - y) ** 2)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = rng.normal(size=(256, 1)).astype(np.float32)
    return params, loss, [(x[i : i + 64], y[i : i + 64]) for i in range(0, 256, 64)]


def test_reestimated_fisher_reranks_when_the_weights_move():
    params, loss, data = _gated()
    F = fit.fisher_diagonal(loss, params, data, tol=0.0)
    sal = {p: np.asarray(F.diag[p]) * np.asarray(params[p]["kernel"]) ** 2 for p in params}
    # at the float weights: a's column 0 ranks lowest, then a[3, 1], then b[0] (wide margins)
    assert sal["a"][:, 0].max() < 0.6 * sal["a"][3, 1] and sal["a"][3, 1] < 0.75 * sal["b"][0, 0]
    # 10 weights at 8 bits: level 1 prunes 4 (a's column 0), level 2 one more; 40 bits = level 2
    kw = dict(target_bits=40, bit_schedule=(8,), pruned_fractions=(0.0, 0.4, 0.5))
    fixed = fit.fit_search(params, F, **kw)
    again = fit.fit_search(
        params, F, reestimate_every=1, loss_fn=loss, batches=data, fisher_kwargs={"tol": 0.0}, **kw
    )
    for plan in (fixed, again):
        assert [t["move"] for t in plan.trace[1:]] == ["prune", "prune"]
        assert not plan.masks["a"][:, 0].any() and plan.size_bits == 40
    # one Fisher at the float weights: the fixed ranking prunes a[3, 1] next
    assert not fixed.masks["a"][3, 1] and fixed.masks["b"][0, 0] and fixed.fisher_passes == 0
    # re-estimated at the node (a's column 0 is zero): b[0] now sees a zero input, its Fisher is
    # exactly 0, so it goes first
    node = {**params, "a": {"kernel": params["a"]["kernel"].at[:, 0].set(0.0)}}
    assert float(fit.fisher_diagonal(loss, node, data).diag["b"][0, 0]) == 0.0
    assert again.masks["a"][3, 1] and not again.masks["b"][0, 0]
    assert again.fisher_passes == 1 and again.fisher_batches == 4
    assert again.fisher_seconds > 0 and again.seconds >= again.fisher_seconds
    assert [t["reestimated"] for t in again.trace] == [False, False, True]
    # a callable gives fresh batches per pass; every=2 never fires within two expansions
    calls = []
    fresh = fit.fit_search(
        params, F, reestimate_every=1, loss_fn=loss,
        batches=lambda i: calls.append(i) or iter(data), **kw,
    )  # fmt: skip
    assert calls == [0] and all(np.array_equal(fresh.masks[p], again.masks[p]) for p in params)
    late = fit.fit_search(params, F, reestimate_every=2, loss_fn=loss, batches=data, **kw)
    assert late.fisher_passes == 0
    assert [{k: v for k, v in t.items() if k != "reestimated"} for t in late.trace] == fixed.trace
    assert all(np.array_equal(late.masks[p], fixed.masks[p]) for p in params)
    with pytest.raises(ValueError, match="loss_fn"):
        fit.fit_search(params, F, reestimate_every=1, batches=data, **kw)
    with pytest.raises(ValueError, match="read again"):
        fit.fit_search(params, F, reestimate_every=1, loss_fn=loss, batches=iter(data), **kw)
    with pytest.raises(ValueError, match="reestimate_every"):
        fit.fit_search(params, F, reestimate_every=0, loss_fn=loss, batches=data, **kw)


def _act(trace1, trace2=1.0):
    return fit.ActFisher(
        {"fc1": trace1, "fc2": trace2}, {"fc1": 0.0, "fc2": 0.0}, {"fc1": 1.0, "fc2": 1.0},
        ["fc0", "fc1", "fc2"], 1, 1, True, [0.0],
    )  # fmt: skip


@pytest.mark.parametrize("rule", ["astar", "ratio"])
def test_activation_term_moves_the_choice(rule):
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.normal(size=(16, 16)), jnp.float32)
    params = {"fc1": {"kernel": k}, "fc2": {"kernel": k}}
    F = {"fc1": jnp.ones((16, 16)), "fc2": jnp.full((16, 16), 1.5)}  # fc1's weights are cheaper
    kw = dict(target_bits=8 * 256 + 4 * 256, bit_schedule=(8, 4), pruned_fractions=(0.0,))
    kw["rule"] = rule
    plain = fit.fit_search(params, F, **kw)
    assert plain.bits == {"fc1": 4, "fc2": 8}
    # fc1's input is very sensitive: with its bits tied to the weights', fc2 goes to 4 bits
    act = _act(1e5)
    plan = fit.fit_search(params, F, act=act, **kw)
    assert plan.bits == {"fc1": 8, "fc2": 4} and plan.act_bits == {"fc1": 8, "fc2": 4}
    want = sum(fit.activation_fit(act, plan.act_bits).values())
    assert plan.act_fit == pytest.approx(want, rel=1e-12)
    assert plan.fit == pytest.approx(fit.fit_score(F, params, plan.specs) + want, rel=1e-4)
    # fixed activation bits make the term a constant: the choice is the plain one again
    fixed = fit.fit_search(params, F, act=act, act_bits=8, **kw)
    assert fixed.bits == plain.bits and fixed.act_fit == pytest.approx(
        sum(fit.activation_fit(act, {"fc1": 8, "fc2": 8}).values())
    )
    with pytest.raises(ValueError, match="act_bits"):
        fit.fit_search(params, F, act=act, act_bits=1, **kw)
    with pytest.raises(ValueError, match="act_bits names"):
        fit.fit_search(params, F, act=act, act_bits={"fc9": 8}, **kw)


def _bops(plan, pos, abits=None):
    return sum(
        pos[p] * int(plan.masks[p].sum()) * plan.bits[p] * (abits or plan.bits)[p]
        for p in plan.masks
    )


@pytest.mark.parametrize("rule", ["astar", "ratio"])
def test_bops_budget_is_respected_exactly(rule):
    from obcjax.allocation import layer_bops

    params, F = _search_setup(0)
    pos = {"fc1": 3, "fc2": 5}
    dense = sum(layer_bops(params[p]["kernel"].size, 32, 32, pos[p]) for p in pos)
    fr = fit.prune_schedule(12, -1.5)
    plan = fit.fit_search(
        params, F, target_bops_ratio=0.01, positions=pos, rule=rule, pruned_fractions=fr
    )
    assert plan.dense_bops == dense and plan.target_bits is None
    assert plan.bops == _bops(plan, pos) <= 0.01 * dense == plan.target_bops
    assert plan.trace[-2]["bops"] > plan.target_bops  # the first node within the budget
    assert [t["bops"] for t in plan.trace] == sorted((t["bops"] for t in plan.trace), reverse=True)
    # fixed 8-bit activations (BOPs linear in the weight bits), with a size target too: both hold
    both = fit.fit_search(
        params, F, target_ratio=0.2, target_bops=plan.bops, positions=pos, act_bits=8,
        rule=rule, pruned_fractions=fr,
    )  # fmt: skip
    assert both.dense_bops == dense // 4 and both.act_bits == {"fc1": 8, "fc2": 8}
    assert both.bops == _bops(both, pos, both.act_bits) <= plan.bops
    assert both.size_bits == _counted_size(params, both) <= 0.2 * both.dense_bits
    assert not (
        both.trace[-2]["bops"] <= plan.bops and both.trace[-2]["size_bits"] <= both.target_bits
    )
    with pytest.raises(ValueError, match="unreachable"):
        fit.fit_search(params, F, target_bops=1, positions=pos)
    with pytest.raises(ValueError, match="not both"):
        fit.fit_search(params, F, target_bops=1e6, target_bops_ratio=0.1)
    conv = {"c": {"kernel": jnp.ones((3, 3, 2, 4))}}
    with pytest.raises(ValueError, match="positions.*'c'"):
        fit.fit_search(conv, {"c": jnp.ones((3, 3, 2, 4))}, target_bops_ratio=0.1)


def test_activation_fisher_positions_give_the_conv_macs():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(4, (3, 3), name="c1")(x))
            x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="c2")(x))
            return nn.Dense(3, name="fc")(x.reshape(len(x), -1))

    rng = np.random.default_rng(0)
    x = rng.normal(size=(8, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 3, 8).astype(np.int32)
    net = Net()
    v = net.init(jax.random.key(0), x[:1])
    act = fit.activation_fisher(net, v, [(x, y)])
    assert act.positions == {"c1": 64, "c2": 16, "fc": 1}
    p = v["params"]
    F = {k: jnp.ones_like(p[k]["kernel"]) for k in p}
    plan = fit.fit_search(p, F, target_bops_ratio=0.05, act=act)
    pos = act.positions
    assert plan.bops == _bops(plan, pos) <= plan.target_bops
    assert plan.dense_bops == 32 * 32 * sum(pos[k] * p[k]["kernel"].size for k in p)
