"""Global allocation compared at equal budgets: uniform, DP on OBS loss, DP on network loss, SPDY.

OBC (Frantar, Singh, Alistarh, NeurIPS 2022) scores every (layer, level) of its database by the
network's calibration loss with only that layer compressed (its ``loss`` mode), and searches with
SPDY (random per-layer multipliers on the score table, a DP per candidate, the stitched model's
real calibration loss, local search). This experiment compares, on zoo models, at equal model-size
and equal BOPs budgets:

* ``uniform``: the best single level that fits the budget (least summed OBS loss);
* ``dp_obs``: the DP on the summed layer-wise OBS losses (:func:`obcjax.allocation.solve`);
* ``dp_squared``: the DP on OBC's ``squared`` score (each layer's loss over its worst level);
* ``dp_network``: the DP on the network scores (:func:`obcjax.allocation.network_scores`);
* ``spdy``: :func:`obcjax.allocation.spdy` on the network scores, seeded.

Every method picks from the same database (one ExactOBS/OBQ pass per layer, first layer kept
dense). Reported per (budget, method): test accuracy and test loss (after batch-norm
re-estimation on the calibration set for models with batch norm), the calibration loss the
scores and SPDY use (mean cross-entropy on the calibration set, batch norm on batch statistics as
in OBC's search), the cost reached, and the wall time of the method's own work (the DP alone for
the OBS-based methods; network scoring plus DP or search for the network-based ones; on a re-run
the database and the scores are read back, ``read_back`` in the JSON, and the times are then
load times).

EfficientNet-Lite0 is not run here: its database plus one network evaluation per (layer, level)
on CPU takes hours (see experiments/efficientnet.py for its single-configuration timings).

Writes ``<out>/allocation_compare.json`` and ``<out>/allocation_compare.png``::

    python experiments/allocation_compare.py --out runs/allocation_compare [--quick]

``--quick`` (LeNet-5 only, 4 levels (dense, OBQ 8/4/3 bits), one size and one BOPs budget, a short
search) is what CI runs (tests/test_experiments.py).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

METHODS = ("uniform", "dp_obs", "dp_squared", "dp_network", "spdy")


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


def run_model(name: str, dataset: str, *, quick: bool, out: Path, seed: int, log) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from obcjax import allocation as A
    from obcjax.calibration import calibrate
    from obcjax.pipeline import reestimate_batchnorm
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    t0 = time.perf_counter()
    ds = zdata.load_dataset(dataset)
    variables, _ = ztrain.pretrained(name, dataset)
    model = zmodels.linen_model(name, num_classes=zmodels.num_classes_of(name, variables))
    calib = ds["calib"]
    batches = [x for x, _ in zdata.batches(calib, 256)]
    stats = calibrate(model, variables, batches, apply_kwargs={"train": False}, progress=False)
    first = next(iter(stats))
    rules = [(re.escape(first), None), (".*", True)]
    ncal = len(calib.y)
    positions = {p: max(1, round(int(s.count) / ncal)) for p, s in stats.items()}
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

    loss_jit = jax.jit(loss_fn)

    def test(params):
        v = {**variables, "params": params}
        if has_bn:
            v = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
        r = ztrain.evaluate(name, v, ds["test"])
        return float(r["accuracy"]), float(r["loss"])

    dense_acc, dense_test_loss = test(variables["params"])
    dense_cal = float(loss_jit(variables["params"]))
    log(f"{name}/{dataset}: dense accuracy {100 * dense_acc:.2f}, calibration loss {dense_cal:.4f}")

    t = time.perf_counter()
    db = A.build_database(variables["params"], stats, _levels(quick), rules=rules,
                          path=str(out / f"db_{name}"), positions=positions, overhead=False,
                          progress=False)
    t_db = time.perf_counter() - t
    t = time.perf_counter()
    db = A.network_scores(db, variables["params"], loss_fn, key=f"{name}/{dataset}/calib-ce",
                          progress=False)
    t_net = time.perf_counter() - t
    log(f"  database {t_db:.1f}s ({len(db.paths)} layers x {len(db.levels(db.paths[0]))} "
        f"levels), network scores {t_net:.1f}s")

    factors = {"size": [10.0] if quick else [8.0, 12.0, 16.0],
               "bops": [10.0] if quick else [8.0, 16.0, 24.0]}
    spdy_kw = (dict(inits=10, tries=5, max_evals=30) if quick
               else dict(inits=100, tries=100, max_evals=400))
    rows = []
    for metric, fs in factors.items():
        dense_cost = db.dense_cost(metric)
        for f in fs:
            budget = dense_cost / f
            row = {"metric": metric, "factor": f, "budget": budget, "methods": {}}
            picks = {
                "uniform": lambda: A.uniform(db, budget, metric, by="loss", score="obs"),
                "dp_obs": lambda: A.solve(db, budget, metric=metric, score="obs"),
                "dp_squared": lambda: A.solve(db, budget, metric=metric, score="squared"),
                "dp_network": lambda: A.solve(db, budget, metric=metric, score="network"),
                "spdy": lambda: A.spdy(db, budget, variables["params"], loss_fn, metric=metric,
                                       score="network", seed=seed, progress=False, **spdy_kw),
            }
            for method in METHODS:
                t = time.perf_counter()
                try:
                    res = picks[method]()
                except ValueError as e:  # the budget is below what this allocator can reach
                    row["methods"][method] = {"error": str(e)}
                    continue
                wall = time.perf_counter() - t
                extra = {}
                if method == "spdy":
                    extra = {"evaluations": res.evaluations, "dp_start_calib_loss": res.dp_loss}
                    res = res.assignment
                if method in ("dp_network", "spdy"):
                    wall += t_net
                params = A.materialize(variables["params"], db, res)
                acc, tl = test(params)
                row["methods"][method] = {
                    "accuracy": acc, "test_loss": tl,
                    "calib_loss": float(loss_jit(params)),
                    "obs_loss": db.loss_of(res, "obs"),
                    "cost": db.cost_of(res, metric),
                    "reduction": dense_cost / db.cost_of(res, metric),
                    "wall_seconds": wall,
                    "levels": {p: lv.name for p, lv in res.items()},
                    **extra,
                }
            rows.append(row)
            log(f"  {metric} {f:g}x: " + "  ".join(
                f"{m} {100 * r['accuracy']:.1f}% cal {r['calib_loss']:.4f}"
                if "accuracy" in r else f"{m} -" for m, r in row["methods"].items()))
    return {
        "model": name, "data": dataset, "kept_dense": first, "batch_norm": has_bn,
        "levels": [lv.name for lv in db.levels(db.paths[0])],
        "dense": {"accuracy": dense_acc, "test_loss": dense_test_loss, "calib_loss": dense_cal},
        "database_seconds": t_db, "network_scores_seconds": t_net, "spdy": spdy_kw,
        # a re-run reads the database and its network scores back: its times are load times
        "read_back": bool(db.loaded) and not db.computed,
        "rows": rows, "claim": _claim(rows), "seconds": time.perf_counter() - t0,
    }


def _claim(rows) -> dict:
    """'network-aware allocation >= OBS-loss allocation' on the calibration loss and accuracy."""
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
            out.append({
                "metric": row["metric"], "factor": row["factor"], "method": method,
                "calib_loss_ratio": r["calib_loss"] / o["calib_loss"],
                "accuracy_delta": r["accuracy"] - o["accuracy"],
                "holds_calib": r["calib_loss"] <= o["calib_loss"],
                "holds_accuracy": r["accuracy"] >= o["accuracy"],
            })
    return {"cases": out,
            "holds_calib_all": all(c["holds_calib"] for c in out) if out else None,
            "holds_accuracy_all": all(c["holds_accuracy"] for c in out) if out else None}


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
        for ax, ylabel in zip(ax_row, ("test accuracy (%)", "calibration loss")):
            ax.set_xticks(x + 0.4 - w / 2)
            ax.set_xticklabels(labels)
            ax.set_ylabel(ylabel)
            ax.set_title(f"{res['model']}/{res['data']}")
            ax.grid(alpha=0.3, axis="y")
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
    args = ap.parse_args(argv)
    import obcjax

    obcjax.enable_compile_cache()  # the solvers' compilation dominates on these small models
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    models = (args.models or ("lenet5" if args.quick else "lenet5,resnet")).split(",")

    def log(msg):
        print(msg, flush=True)

    results = [run_model(m, args.data, quick=args.quick, out=out, seed=args.seed, log=log)
               for m in models]
    (out / "allocation_compare.json").write_text(json.dumps(results, indent=2))
    _plot(results, out / "allocation_compare.png")
    for res in results:
        c = res["claim"]
        log(f"{res['model']}: network-aware <= OBS-loss calibration loss in every case: "
            f"{c['holds_calib_all']}; accuracy >= in every case: {c['holds_accuracy_all']}")
    log(f"wrote {out / 'allocation_compare.json'} and {out / 'allocation_compare.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
