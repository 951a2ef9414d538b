"""Global allocation at equal budgets: uniform, DP on OBS or network loss, SPDY, FITCompress.

OBC (Frantar, Singh, Alistarh, NeurIPS 2022) scores every (layer, level) of its database by the
network's calibration loss with only that layer compressed (its ``loss`` mode), and searches with
SPDY (random per-layer multipliers on the score table, a DP per candidate, the stitched model's
real calibration loss, local search). This experiment compares, on zoo models, at equal model-size
and equal BOPs budgets:

* ``uniform``: the best single level that fits the budget (least summed OBS loss);
* ``dp_obs``: the DP on the summed layer-wise OBS losses (:func:`obcjax.allocation.solve`);
* ``dp_squared``: the DP on OBC's ``squared`` score (each layer's loss over its worst level);
* ``dp_network``: the DP on the network scores (:func:`obcjax.allocation.network_scores`);
* ``spdy``: :func:`obcjax.allocation.spdy` on the network scores, seeded;
* ``fit`` / ``fit_reest``: FITCompress's greedy A* search (:func:`obcjax.fit.fit_search`) with one
  empirical Fisher at the float weights / re-estimated at the expanded node (``fit_reest``), on the
  calibration data, over the database's bit-widths and its own global Fisher-ranked pruning
  schedule, materialised as FITCompress does (its masks + round-to-nearest,
  :func:`obcjax.fit.apply_plan`): FIT does not use the database.

The five database methods pick from the same database (one pass per layer and level, first layer
kept dense). FIT's budget is the same number: its own size model is the database's plus 32 bits
per leaf outside the database's layers (that constant is added to its target), its BOPs are the
database's (:func:`obcjax.allocation.layer_bops`, 32-bit activations, the same positions), and the
cost reported is measured on the materialised plan with the database's formula
(``cost_model_diff``: FIT's own number minus it). Reported per (budget, method): test accuracy and
test loss (after batch-norm re-estimation on the calibration set for models with batch norm), the
calibration loss the scores and SPDY use (mean cross-entropy on the calibration set, batch norm on
batch statistics as in OBC's search), the cost reached, and the wall time of the method's own work
(the DP alone for the OBS-based methods; network scoring plus DP or search for the network-based
ones; the Fisher plus the search and the materialisation for FIT; on a re-run the database and the
scores are read back, ``read_back`` in the JSON, and the times are then load times). ``claim``
checks "network-aware allocation >= OBS-loss allocation" (``dp_network`` and ``spdy`` against
``dp_obs``) per budget, with a verdict by margin.

EfficientNet-Lite0 (``--models efficientnet_lite0``, :func:`efficientnet_task`; pretrained weights
and photos offline): no labels, so "accuracy" is the top-1 agreement with the dense model on crops
of held-out photos and fresh crops, and the calibration loss is KL(dense || compressed) on the
calibration crops. The full ExactOBS database plus a network evaluation per (layer, level) takes
hours on a CPU, so this run is cut to fit well under an hour: the database is solved by the fast
family (``solver="gptq"``: GPTQ / SparseGPT), 5 levels (dense, 8/4/3 bits, 50% + 4 bits), only
the 32 pointwise convs are compressed (stem, classifier and the 16 depthwise convs stay dense),
``--ncalib`` (32) calibration crops, a short SPDY, FIT re-estimated on 16 of them.
Run it on its own; its entry is merged into the same JSON::

    python experiments/allocation_compare.py --out runs/allocation_compare [--quick]
    python experiments/allocation_compare.py --out runs/allocation_compare --models efficientnet_lite0

Writes ``<out>/allocation_compare.json`` (a run replaces its own models' entries and keeps the
others), ``<out>/allocation_compare.png`` and the table, ``<out>/allocation_compare.md``; the databases, their network scores and the
EfficientNet calibration statistics are cached under ``<out>`` (a re-run resumes).

``--quick`` (LeNet-5 only, 4 levels (dense, OBQ 8/4/3 bits), one size and one BOPs budget, a short
search, FIT on 8/4/3 bits) is what CI runs (tests/test_experiments.py).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

METHODS = ("uniform", "dp_obs", "dp_squared", "dp_network", "spdy", "fit", "fit_reest")


class Task(NamedTuple):
    """The model-specific half of the comparison: everything :func:`compare` needs.

    ``loss_fn(params)`` is the calibration loss the network scores, SPDY and the table use;
    ``test(params) -> (accuracy, test loss)``; ``example_loss(params, x, y)`` is one example's loss
    for FIT's empirical Fisher, read on ``fisher_batches`` (the calibration data, with labels);
    ``reestimate``: ``{"every": k, "batches": n}`` for the ``fit_reest`` rows.
    """

    model: str
    data: str
    params: Any
    stats: Mapping[str, Any]
    rules: list
    positions: dict
    levels: list
    loss_fn: Callable[[Any], Any]
    loss_key: str
    test: Callable[[Any], tuple[float, float]]
    example_loss: Callable[[Any, Any, Any], Any]
    fisher_batches: list
    factors: dict
    spdy: dict
    reestimate: dict
    jit: bool | None = None
    info: dict | None = None


def _levels(quick: bool):
    from obcjax.specs import NM, Int, Unstructured
    from obcjax.transforms import LayerSpec

    if quick:
        return [None, LayerSpec(quant=Int(8)), LayerSpec(quant=Int(4)), LayerSpec(quant=Int(3))]
    return [None, LayerSpec(quant=Int(8)), LayerSpec(quant=Int(4)), LayerSpec(quant=Int(3)),
            LayerSpec(quant=Int(2)),
            LayerSpec(prune=Unstructured(0.5), quant=Int(4)),
            LayerSpec(prune=Unstructured(0.75), quant=Int(4)),
            LayerSpec(prune=NM(2, 4), quant=Int(4)),
            LayerSpec(prune=Unstructured(0.5), quant=Int(3))]


def digits_task(name: str, dataset: str, *, quick: bool) -> Task:
    """LeNet-5 / ResNet on a small zoo dataset: test accuracy, cross-entropy calibration loss."""
    import jax.numpy as jnp
    import optax

    from obcjax.calibration import calibrate
    from obcjax.pipeline import reestimate_batchnorm
    from obcjax.recipes.finetune import zoo_example_loss
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    ds = zdata.load_dataset(dataset)
    variables, _ = ztrain.pretrained(name, dataset)
    model = zmodels.linen_model(name, num_classes=zmodels.num_classes_of(name, variables))
    calib = ds["calib"]
    batches = [x for x, _ in zdata.batches(calib, 256)]
    stats = calibrate(model, variables, batches, apply_kwargs={"train": False}, progress=False)
    first = next(iter(stats))
    ncal = len(calib.y)
    has_bn = bool(variables.get("batch_stats"))
    xs, ys = jnp.asarray(calib.x), jnp.asarray(calib.y)

    # the model-specific part: the calibration loss of a params tree (batch statistics when the
    # model has batch norm, as OBC's search evaluates in train mode)
    def loss_fn(params):
        v = {**variables, "params": params}
        if has_bn:
            logits, _ = model.apply(v, xs, train=True, mutable=["batch_stats"])
        else:
            logits = model.apply(v, xs, train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ys).mean()

    def test(params):
        v = {**variables, "params": params}
        if has_bn:
            v = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
        r = ztrain.evaluate(name, v, ds["test"])
        return float(r["accuracy"]), float(r["loss"])

    return Task(
        model=name, data=dataset, params=variables["params"], stats=stats,
        rules=[(re.escape(first), None), (".*", True)],
        positions={p: max(1, round(int(s.count) / ncal)) for p, s in stats.items()},
        levels=_levels(quick), loss_fn=loss_fn, loss_key=f"{name}/{dataset}/calib-ce", test=test,
        example_loss=zoo_example_loss(name, variables),
        fisher_batches=list(zdata.batches(calib, 64)),
        factors={"size": [10.0] if quick else [8.0, 12.0, 16.0],
                 "bops": [10.0] if quick else [8.0, 16.0, 24.0]},
        spdy=(dict(inits=10, tries=5, max_evals=30) if quick
              else dict(inits=100, tries=100, max_evals=400)),
        reestimate={"every": 1, "batches": 3},
        info={"kept_dense": [first], "batch_norm": has_bn,
              "accuracy_is": "test accuracy (batch norm re-estimated on the calibration set)",
              "calib_loss_is": f"mean cross-entropy on the {ncal} calibration images"},
    )  # fmt: skip


def efficientnet_task(*, out: Path, ncal: int, ntest: int, log) -> Task:
    """EfficientNet-Lite0 (pretrained ImageNet weights, offline photos): no labels, so the metric
    is top-1 agreement with the dense model and the calibration loss is KL(dense || compressed).

    Made feasible on a CPU: the database's levels are solved by the fast family
    (``solver="gptq"``: GPTQ for bits, SparseGPT for sparsity + bits), not ExactOBS/OBQ; the
    32 pointwise (1x1) convs are compressed, the stem conv, the classifier and the 16 depthwise
    convs stay dense (a depthwise conv is one Hessian per channel: a thousand tiny solves per
    level, for about 3% of the weights); a few levels; ``ncal`` calibration crops.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from obcjax.calibration import calibrate
    from obcjax.specs import Int, Unstructured
    from obcjax.stats import load_stats, save_stats
    from obcjax.transforms import LayerSpec
    from obcjax.zoo import efficientnet as E

    name = "efficientnet_lite0"
    model, variables = E.load_efficientnet_lite0()
    calib = E.preprocess(E.image_crops(ncal, seed=0, size=E.IMAGE_SIZE, split="calibration"))
    tests = {
        split: E.preprocess(E.image_crops(ntest, seed=0, size=E.IMAGE_SIZE, split=split))
        for split in ("heldout", "heldout_crops")
    }
    bsz = 16
    fwd_jit = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def fwd(params, x):
        # fixed batches (the last one padded): one compilation serves every evaluation
        n = x.shape[0]
        x = jnp.concatenate([x, jnp.zeros(((-n) % bsz, *x.shape[1:]), x.dtype)])
        v = {**variables, "params": params}
        return jnp.concatenate([fwd_jit(v, x[i : i + bsz]) for i in range(0, x.shape[0], bsz)])[:n]

    params = variables["params"]
    dense_cal = fwd(params, calib)
    logp_dense = jax.nn.log_softmax(dense_cal, axis=-1)
    dense_test = jnp.concatenate([fwd(params, x) for x in tests.values()])

    def loss_fn(p):  # KL(dense || compressed) on the calibration crops, 0 at the dense model
        lp = jax.nn.log_softmax(fwd(p, calib), axis=-1)
        return jnp.mean(jnp.sum(jnp.exp(logp_dense) * (logp_dense - lp), axis=-1))

    def test(p):
        a = E.agreement(dense_test, jnp.concatenate([fwd(p, x) for x in tests.values()]))
        return a["top1_agreement"], a["kl"]

    # the calibration statistics are cached next to the results (with the recipe they came from)
    captured = r"stem/conv|classifier|head/conv|blocks_\d+/(expand|project)/conv"
    recipe = {"photos": list(E.split_photos("calibration")), "ncalib": ncal,
              "size": E.IMAGE_SIZE, "seed": 0, "layers": captured}  # fmt: skip
    cache = out / f"calib_stats_{name}_{ncal}.npz"
    stats = load_stats(cache, recipe=recipe)  # verified; None if absent or made another way
    if stats is None:
        t = time.perf_counter()
        stats = calibrate(model, variables, [calib[i : i + bsz] for i in range(0, ncal, bsz)],
                          rules=[captured], apply_kwargs={"train": False}, progress=False)
        save_stats(cache, stats, recipe=recipe)
        log(f"  calibrated on {ncal} crops in {time.perf_counter() - t:.1f}s")
    bs = variables.get("batch_stats", {})

    def example_loss(p, x, y):  # one crop's cross-entropy against the dense model's top-1 class
        lg = model.apply({"params": p, "batch_stats": bs}, x[None], train=False)[0]
        return -jax.nn.log_softmax(lg)[y]

    top1 = np.asarray(jnp.argmax(dense_cal, -1))
    cal_np = np.asarray(calib)
    g = dict(solver="gptq")
    return Task(
        model=name, data=f"photo crops ({ncal} calibration)", params=params, stats=stats,
        rules=[("stem/conv", None), ("classifier", None), (r".*/depthwise/conv", None),
               (".*", True)],
        positions={p: max(1, round(int(s.count) / ncal)) for p, s in stats.items()},
        levels=[None, LayerSpec(quant=Int(8), **g), LayerSpec(quant=Int(4), **g),
                LayerSpec(quant=Int(3), **g), LayerSpec(prune=Unstructured(0.5), quant=Int(4), **g)],
        loss_fn=loss_fn, loss_key=f"{name}/{ncal}crops/calib-kl", test=test,
        example_loss=example_loss,
        fisher_batches=[(cal_np[i : i + bsz], top1[i : i + bsz]) for i in range(0, ncal, bsz)],
        factors={"size": [6.0, 9.0], "bops": [6.0, 9.0]},
        spdy=dict(inits=8, tries=4, max_evals=16),
        reestimate={"every": 1, "batches": 1},
        jit=False,  # loss_fn runs one compiled forward per batch; no jit(vmap) of the whole net
        info={"kept_dense": ["stem/conv", "classifier", "blocks_*/depthwise/conv (16)"],
              "batch_norm": True, "database_solver": "gptq (GPTQ / SparseGPT), not ExactOBS/OBQ",
              "accuracy_is": f"top-1 agreement with the dense model on {ntest} crops of the 3 "
                             f"held-out photos + {ntest} fresh crops of the calibration photos",
              "calib_loss_is": f"mean KL(dense || compressed) on the {ncal} calibration crops",
              "test_loss_is": "mean KL(dense || compressed) on the test crops",
              "ncalib": ncal, "ntest": 2 * ntest},
    )  # fmt: skip


def compare(task: Task, *, out: Path, seed: int, log) -> dict:
    """Every method at every budget of ``task``: the rows of the table (see the module doc)."""
    import jax
    import numpy as np

    from obcjax import allocation as A
    from obcjax import fit as F
    from obcjax.specs import Int
    from obcjax.transforms import find_layers

    t0 = time.perf_counter()
    name, params = task.model, task.params
    loss_eval = task.loss_fn if task.jit is False else jax.jit(task.loss_fn)
    dense_acc, dense_test_loss = task.test(params)
    dense_cal = float(loss_eval(params))
    log(f"{name}/{task.data}: dense accuracy {100 * dense_acc:.2f}, calibration loss "
        f"{dense_cal:.4f}")  # fmt: skip

    t = time.perf_counter()
    db = A.build_database(params, task.stats, task.levels, rules=task.rules,
                          path=str(out / f"db_{name}"), positions=task.positions, overhead=False,
                          progress=False)  # fmt: skip
    t_db = time.perf_counter() - t
    t = time.perf_counter()
    db = A.network_scores(db, params, task.loss_fn, key=task.loss_key, jit=task.jit,
                          progress=False)  # fmt: skip
    t_net = time.perf_counter() - t
    log(f"  database {t_db:.1f}s ({len(db.paths)} layers x {len(db.levels(db.paths[0]))} "
        f"levels), network scores {t_net:.1f}s")  # fmt: skip

    # FIT (FITCompress): one empirical Fisher of the database's layers on the calibration data,
    # then its own path search over (per-layer bits, one global Fisher-ranked pruning level)
    paths = db.paths
    fit_rules = [re.escape(p) for p in paths]
    nb = len(task.fisher_batches)
    t = time.perf_counter()
    fisher = F.fisher_diagonal(task.example_loss, params, task.fisher_batches, rules=fit_rules,
                               tol=0.0, min_batches=nb, max_batches=nb)  # fmt: skip
    t_fisher = time.perf_counter() - t
    kernels = find_layers(params)
    n_sel = sum(int(np.size(kernels[p])) for p in paths)
    other_bits = 32 * (sum(int(np.size(x)) for x in jax.tree.leaves(params)) - n_sel)
    pos = {p: int(task.positions.get(p, 1)) for p in paths}
    nre = task.reestimate["batches"]
    # FIT's bit schedule: the database's bit-widths (its pruning is its own global schedule)
    bits = sorted({lv.quant.bits for lv in task.levels if lv is not None and lv.quant}, reverse=True)
    log(f"  Fisher {t_fisher:.1f}s ({fisher.examples} examples)")

    def fit_search(metric, budget, reest):
        # the database's cost model exactly: size = Σ kept·bits of the database's layers (FIT
        # adds 32 bits per other leaf: added to the target), BOPs with 32-bit activations
        kw = dict(rules=fit_rules, quant=Int(8), bit_schedule=bits, seed=seed, positions=pos,
                  act_bits=32)  # fmt: skip
        if metric == "size":
            kw["target_bits"] = budget + other_bits
        else:
            kw["target_bops"] = budget
        if reest:
            kw.update(reestimate_every=task.reestimate["every"], loss_fn=task.example_loss,
                      batches=task.fisher_batches[:nre],
                      fisher_kwargs=dict(tol=0.0, min_batches=nre, max_batches=nre))  # fmt: skip
        plan = F.fit_search(params, fisher, **kw)
        return plan, F.apply_plan(params, plan).params

    def measured_cost(plan, metric):
        # the database's cost function on the materialised plan: kept weights from its masks
        nnz = {p: int(np.sum(plan.masks[p])) for p in paths}
        if metric == "size":
            return float(sum(nnz[p] * plan.bits[p] for p in paths))
        return float(sum(A.layer_bops(nnz[p], plan.bits[p], 32, pos[p]) for p in paths))

    def pick(method, metric, budget):
        if method == "uniform":
            return A.uniform(db, budget, metric, by="loss", score="obs")
        if method.startswith("dp_"):
            return A.solve(db, budget, metric=metric, score=method[3:])
        if method == "spdy":
            return A.spdy(db, budget, params, task.loss_fn, metric=metric, score="network",
                          seed=seed, progress=False, jit=task.jit, **task.spdy)  # fmt: skip
        return fit_search(metric, budget, method == "fit_reest")

    rows = []
    for metric, fs in task.factors.items():
        dense_cost = db.dense_cost(metric)
        for f in fs:
            budget = dense_cost / f
            row = {"metric": metric, "factor": f, "budget": budget, "methods": {}}
            for method in METHODS:
                t = time.perf_counter()
                try:
                    res = pick(method, metric, budget)
                except (ValueError, RuntimeError) as e:  # a budget this allocator cannot reach
                    row["methods"][method] = {"error": str(e)}
                    continue
                wall = time.perf_counter() - t
                extra = {}
                if method.startswith("fit"):
                    plan, cparams = res
                    cost = measured_cost(plan, metric)
                    model_cost = plan.size_bits - other_bits if metric == "size" else plan.bops
                    wall += t_fisher
                    extra = {
                        "cost_fit_model": float(model_cost),
                        "cost_model_diff": float(model_cost) - cost,
                        "global_sparsity": plan.sparsity, "steps": len(plan.trace) - 1,
                        "fisher_passes": plan.fisher_passes,
                        "fisher_seconds": plan.fisher_seconds + t_fisher,
                        "search_seconds": plan.seconds,
                        "levels": {p: f"s{1 - plan.masks[p].mean():.3f}w{plan.bits[p]}"
                                   for p in paths},
                    }  # fmt: skip
                else:
                    if method == "spdy":
                        extra = {"evaluations": res.evaluations,
                                 "dp_start_calib_loss": res.dp_loss}  # fmt: skip
                        res = res.assignment
                    if method in ("dp_network", "spdy"):
                        wall += t_net
                    cparams = A.materialize(params, db, res)
                    cost = db.cost_of(res, metric)
                    extra.update(obs_loss=db.loss_of(res, "obs"),
                                 levels={p: lv.name for p, lv in res.items()})  # fmt: skip
                acc, tl = task.test(cparams)
                row["methods"][method] = {
                    "accuracy": acc, "test_loss": tl, "calib_loss": float(loss_eval(cparams)),
                    "cost": cost, "reduction": dense_cost / cost, "wall_seconds": wall, **extra,
                }  # fmt: skip
            rows.append(row)
            log(f"  {metric} {f:g}x: " + "  ".join(
                f"{m} {100 * r['accuracy']:.1f}% cal {r['calib_loss']:.4f}"
                if "accuracy" in r else f"{m} -" for m, r in row["methods"].items()))  # fmt: skip
    return {
        "model": name, "data": task.data, **(task.info or {}),
        "levels": [lv.name for lv in db.levels(paths[0])],
        "dense": {"accuracy": dense_acc, "test_loss": dense_test_loss, "calib_loss": dense_cal},
        "database_seconds": t_db, "network_scores_seconds": t_net, "spdy": task.spdy,
        # a re-run reads the database and its network scores back: its times are load times
        "read_back": bool(db.loaded) and not db.computed,
        "fit": {
            "fisher": {"examples": fisher.examples, "batches": fisher.batches,
                       "seconds": t_fisher},
            "bit_schedule": bits, "pruned_fractions": "prune_schedule(40, -3)",
            "rule": "astar (lam 1)", "grid": "Int(bits): the database levels' grid family",
            "materialize": "FIT's own global F*w^2 masks + round-to-nearest (apply_plan, "
                           "solver='fit'); no OBS error compensation",
            "cost_model": "the database's: size = sum kept*bits over its layers (FIT's own "
                          "size adds 32 bits per other leaf, added to the target), BOPs = "
                          "layer_bops(kept, bits, 32, positions); cost_model_diff per row",
            "reestimate_every": task.reestimate["every"],
            "reestimate_batches": nre, "seed": seed,
        },  # fmt: skip
        "rows": rows, "claim": _claim(rows, dense_cal), "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def run_model(name: str, dataset: str, *, quick: bool, out: Path, seed: int, log,
              ncal: int = 32, ntest: int = 32) -> dict:
    """:func:`compare` on a zoo model (``efficientnet_lite0``: :func:`efficientnet_task`)."""
    if name == "efficientnet_lite0":
        task = efficientnet_task(out=out, ncal=ncal, ntest=ntest, log=log)
    else:
        task = digits_task(name, dataset, quick=quick)
    return compare(task, out=out, seed=seed, log=log)


def _claim(rows, dense_calib: float | None = None, margin: float = 0.05) -> dict:
    """'network-aware allocation >= OBS-loss allocation': ``dp_network`` and ``spdy`` against
    ``dp_obs`` on the calibration loss (the objective both target) and the test accuracy.

    Each case gets a verdict on the calibration-loss ratio ``r = network / obs``: ``"holds,
    wide"`` (``r <= 1 - margin``), ``"holds, narrow"`` (``r <= 1``), ``"fails, narrow"``
    (``r <= 1 + margin``) or ``"fails, wide"``. ``damage_ratio``: the same on the damage over the
    dense model's calibration loss, ``(network − dense) / (obs − dense)`` (None when ``dp_obs``
    does not raise the loss).
    """
    out = []
    for row in rows:
        m = row["methods"]
        o = m.get("dp_obs", {})
        if "calib_loss" not in o:
            continue
        for method in ("dp_network", "spdy"):
            r = m.get(method, {})
            if "calib_loss" not in r:
                continue
            ratio = r["calib_loss"] / o["calib_loss"]
            side = "holds" if ratio <= 1 else "fails"
            wide = ratio <= 1 - margin if ratio <= 1 else ratio > 1 + margin
            out.append({
                "metric": row["metric"], "factor": row["factor"], "method": method,
                "calib_loss_ratio": ratio,
                "damage_ratio": (r["calib_loss"] - dense_calib) / (o["calib_loss"] - dense_calib)
                if dense_calib is not None and o["calib_loss"] > dense_calib else None,
                "accuracy_delta": r["accuracy"] - o["accuracy"],
                "holds_calib": r["calib_loss"] <= o["calib_loss"],
                "holds_accuracy": r["accuracy"] >= o["accuracy"],
                "verdict": f"{side}, {'wide' if wide else 'narrow'}",
            })  # fmt: skip
    verdicts = [c["verdict"] for c in out]
    return {"cases": out, "margin": margin,
            "verdicts": {v: verdicts.count(v) for v in sorted(set(verdicts))},
            "holds_calib_all": all(c["holds_calib"] for c in out) if out else None,
            "holds_accuracy_all": all(c["holds_accuracy"] for c in out) if out else None}


def table(results) -> str:
    """The markdown table: model, budget, method, accuracy (or top-1 agreement), calibration
    loss, cost reached (as a reduction of the dense cost), wall time."""
    lines = ["| model | budget | method | accuracy / agreement (%) | calibration loss | "
             "reduction reached | wall (s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for res in results:
        d = res["dense"]
        lines.append(f"| {res['model']} | dense | - | {100 * d['accuracy']:.2f} | "
                     f"{d['calib_loss']:.4f} | 1 | - |")  # fmt: skip
        for row in res["rows"]:
            for m, r in row["methods"].items():
                budget = f"{row['metric']} {row['factor']:g}x"
                if "accuracy" not in r:
                    lines.append(f"| {res['model']} | {budget} | {m} | unreachable | | | |")
                    continue
                lines.append(
                    f"| {res['model']} | {budget} | {m} | {100 * r['accuracy']:.2f} | "
                    f"{r['calib_loss']:.4f} | {r['reduction']:.2f}x | {r['wall_seconds']:.1f} |"
                )
    return "\n".join(lines) + "\n"


def _plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 3.6 * len(results)), squeeze=False)
    for ax_row, res in zip(axes, results):
        labels = [f"{r['metric']} {r['factor']:g}x" for r in res["rows"]]
        x = np.arange(len(labels))
        w = 0.8 / len(METHODS)
        for j, m in enumerate(METHODS):
            acc = [100 * r["methods"].get(m, {}).get("accuracy", np.nan) for r in res["rows"]]
            cal = [r["methods"].get(m, {}).get("calib_loss", np.nan) for r in res["rows"]]
            ax_row[0].bar(x + j * w, acc, w, label=m)
            ax_row[1].bar(x + j * w, cal, w, label=m)
        ax_row[0].axhline(100 * res["dense"]["accuracy"], color="gray", ls=":", label="dense")
        ax_row[1].axhline(res["dense"]["calib_loss"], color="gray", ls=":", label="dense")
        lo = min(100 * r["methods"][m]["accuracy"] for r in res["rows"] for m in r["methods"]
                 if "accuracy" in r["methods"][m])
        ax_row[0].set_ylim(max(0, lo - 5), 100)
        agree = "agreement" in res.get("accuracy_is", "")
        first = "top-1 agreement with dense (%)" if agree else "test accuracy (%)"
        second = "calibration KL to dense" if agree else "calibration loss"
        for ax, ylabel in zip(ax_row, (first, second)):
            ax.set_xticks(x + 0.4 - w / 2)
            ax.set_xticklabels(labels)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{res['model']}/{res['data']}")
            ax.grid(alpha=0.3, axis="y")
        if res["dense"]["calib_loss"] > 1e-6:  # FIT can be far off: log
            ax_row[1].set_yscale("log")
        ax_row[1].legend(fontsize=7)
    fig.suptitle("allocation at equal budgets (size: weight bits; BOPs: MACs x w-bits x a-bits)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/allocation_compare")
    ap.add_argument("--models", default=None, help="comma list (default lenet5,resnet)")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="LeNet-5, 4 levels, 2 budgets (CI)")
    ap.add_argument("--ncalib", type=int, default=32, help="EfficientNet calibration crops")
    ap.add_argument("--ntest", type=int, default=32,
                    help="EfficientNet test crops per split (held-out photos, fresh crops)")
    args = ap.parse_args(argv)
    import obcjax

    obcjax.enable_compile_cache()  # the solvers' compilation dominates on these small models
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = (args.models or ("lenet5" if args.quick else "lenet5,resnet")).split(",")

    def log(msg):
        print(msg, flush=True)

    results = [run_model(m, args.data, quick=args.quick, out=out, seed=args.seed, log=log,
                         ncal=args.ncalib, ntest=args.ntest)
               for m in models]  # fmt: skip
    # one JSON for every model run into this folder: a run replaces its own models' entries
    fname = out / "allocation_compare.json"
    if fname.exists():
        ran = {r["model"] for r in results}
        old = [r for r in json.loads(fname.read_text()) if r.get("model") not in ran]
        results = old + results
    fname.write_text(json.dumps(results, indent=2))
    (out / "allocation_compare.md").write_text(table(results))
    _plot(results, out / "allocation_compare.png")
    for res in results:
        c = res["claim"]
        log(f"{res['model']}: network-aware <= OBS-loss calibration loss in every case: "
            f"{c['holds_calib_all']}; accuracy >= in every case: {c['holds_accuracy_all']}")
    log(f"wrote {out / 'allocation_compare.json'}, .png and .md (the table)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
