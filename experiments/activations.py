"""Weights *and* activations quantized (OBC's W8A8, W4A4 and the mixed BOPs budget).

For each model: the first layer stays dense with float inputs (the usual practice; the
classifier is kept too for EfficientNet); every other layer is compressed to one of OBC's mixed
levels {8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a} (plus 6w6a and 4w8a unless --quick) in OBC's order:
weights from the database, then activation ranges (asymmetric per-tensor, Lp-searched)
calibrated on the compressed model's inputs, then batch-norm re-estimation through the
quantized forward. Configurations: W8A8 and W4A4 on every layer, the dynamic program at
2-3 BOPs budgets (2x, 4x, 6x fewer BOPs than W8A8, the last clipped to the cheapest reachable
one), and the best uniform level at each budget. Each is reported with and without batch-norm
re-estimation (models with batch norm), dense alongside.

* ``lenet5`` and ``resnet`` on scikit-learn's digits: test accuracy (539 images) and
  cross-entropy, top-1 agreement with the dense model.
* ``efficientnet`` (pretrained EfficientNet-Lite0): top-1 agreement with the dense model and KL
  on held-out crops of the offline photos (see experiments/efficientnet.py); slow on CPU.

Writes ``<out>/activations.json`` and ``<out>/activations.png``::

    python experiments/activations.py --out runs/activations [--quick]
    python experiments/activations.py --model efficientnet --ncalib 32 --ntest 64 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _enable_compile_cache() -> None:
    # the solvers' compilation dominates on small models; reruns reuse it (as the CLI does)
    import jax

    root = os.environ.get("OBCJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "obcjax"
    )
    try:
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    except Exception as e:  # an old or unusual JAX: run without the cache
        print(f"note: compilation cache disabled ({e})")


def _configs(A, db, factors):
    """``[(name, kind, assignment)]``: W8A8, W4A4, the DP and the best uniform level per budget."""
    paths = db.paths
    c8 = db.cost_of({p: "8w8a" for p in paths}, "bops")
    lo = db.min_cost("bops")
    out = [
        ("W8A8", "uniform", {p: "8w8a" for p in paths}),
        ("W4A4", "uniform", {p: "4w4a" for p in paths}),
    ]
    for f in factors:
        budget = max(c8 / f, lo)
        tag = f"{c8 / budget:.2g}x"
        out.append((f"mixed DP {tag}", "dp", A.solve(db, budget, metric="bops")))
        try:
            out.append((f"uniform {tag}", "uniform-best", A.uniform(db, budget, "bops", by="loss")))
        except ValueError:  # no single level fits every layer under this budget
            pass
    return out


def run_zoo(name: str, args) -> dict:
    import jax
    import numpy as np

    from obcjax import activations as ACT
    from obcjax import allocation as A
    from obcjax.calibration import calibrate
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    t_all = time.perf_counter()
    ds = zdata.load_dataset("digits")
    variables, info = ztrain.pretrained(name, "digits", seed=0)
    model = zmodels.linen_model(name, num_classes=zmodels.num_classes_of(name, variables))
    calib = ds["calib"]
    if args.ncalib:
        calib = zdata.Split(calib.x[: args.ncalib], calib.y[: args.ncalib])
    ncal = len(calib.y)
    batches = [x for x, _ in zdata.batches(calib, 128)]
    test = ds["test"]
    ev = {"train": False}
    dense_fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    dense_logits = np.asarray(dense_fn(variables, test.x))
    dense = ztrain.evaluate_apply(dense_fn, variables, test)
    has_bn = bool(variables.get("batch_stats"))

    t = time.perf_counter()
    stats = calibrate(model, variables, batches, apply_kwargs=ev, progress=False)
    paths = list(stats)
    keep = [(paths[0], None)]
    abits = (8, 4) if args.quick else (8, 6, 4)
    errs = ACT.activation_errors(
        model, variables, batches, abits, rules=keep + [".*"], apply_kwargs=ev
    )
    t_cal = time.perf_counter() - t
    extra = () if args.quick else ("6w6a", "4w8a")
    levels = A.mixed_levels((8, 4), extra=extra, solver=args.solver)
    positions = {p: max(1, round(int(s.count) / ncal)) for p, s in stats.items()}
    t = time.perf_counter()
    db = A.build_database(
        variables["params"],
        stats,
        levels,
        rules=keep + [(".*", True)],
        positions=positions,
        act_errors=errs,
        progress=False,
        path=args.database and os.path.join(args.database, name),
        error=args.error,
    )
    t_db = time.perf_counter() - t
    c8 = db.cost_of({p: "8w8a" for p in db.paths}, "bops")
    dense_bops = db.dense_cost("bops")
    print(
        f"{name}: dense test accuracy {100 * dense['accuracy']:.2f}%; {len(db.paths)} layers x "
        f"{len(levels)} levels, calibration {t_cal:.1f}s, database {t_db:.1f}s "
        f"({args.solver}); first layer {paths[0]!r} kept dense",
        flush=True,
    )
    rows = []
    for cname, kind, assignment in _configs(A, db, args.factors):
        t = time.perf_counter()
        assignment = db.resolve(assignment)
        new = A.materialize(variables["params"], db, assignment)
        vw = {**variables, "params": new}
        v_bn, act, v_nobn = ACT.calibrate_mixed(
            model, vw, batches, assignment, apply_kwargs=ev, batchnorm=has_bn
        )
        fn = ACT.quantized_apply(model, act, apply_kwargs=ev)
        row = {
            "config": cname,
            "kind": kind,
            "levels": {p: lv.name for p, lv in assignment.items()},
            "bops": db.cost_of(assignment, "bops"),
            "reduction_vs_w8a8": c8 / db.cost_of(assignment, "bops"),
            "reduction_vs_dense": dense_bops / db.cost_of(assignment, "bops"),
            "dp_loss": db.loss_of(assignment),
            "weights_only_accuracy": ztrain.evaluate_apply(dense_fn, v_nobn, test)["accuracy"],
        }
        for tag, v in (("", v_nobn), ("_bn", v_bn)) if has_bn else (("", v_nobn),):
            r = ztrain.evaluate_apply(fn, v, test)
            logits = np.asarray(fn(v, test.x))
            row[f"accuracy{tag}"] = r["accuracy"]
            row[f"loss{tag}"] = r["loss"]
            row[f"agreement{tag}"] = float(np.mean(logits.argmax(1) == dense_logits.argmax(1)))
        row["seconds"] = time.perf_counter() - t
        rows.append(row)
        bn = (
            f", BN re-est. {100 * row['accuracy_bn']:.2f}% (loss {row['loss_bn']:.4f})"
            if has_bn
            else ""
        )
        print(
            f"  {cname:16s} {row['reduction_vs_w8a8']:4.2f}x fewer BOPs than W8A8: "
            f"{100 * row['accuracy']:.2f}% (loss {row['loss']:.4f}){bn}  "
            f"[{', '.join(f'{p}={n}' for p, n in row['levels'].items())}]",
            flush=True,
        )
    return {
        "model": name,
        "data": "digits",
        "metric": "test accuracy",
        "dense": {"accuracy": dense["accuracy"], "loss": dense["loss"]},
        "batchnorm": has_bn,
        "ncalib": ncal,
        "kept_dense": paths[0],
        "solver": args.solver,
        "levels": [lv.name for lv in levels],
        "positions": positions,
        "bops_w8a8": c8,
        "bops_dense": dense_bops,
        "bops_min": db.min_cost("bops"),
        "calibration_seconds": t_cal,
        "database_seconds": t_db,
        "total_seconds": time.perf_counter() - t_all,
        "rows": rows,
    }


def run_efficientnet(args) -> dict:
    import jax
    import jax.numpy as jnp

    from obcjax import activations as ACT
    from obcjax import allocation as A
    from obcjax.calibration import calibrate
    from obcjax.pipeline import reestimate_batchnorm
    from obcjax.zoo import efficientnet as E

    t_all = time.perf_counter()
    _, variables = E.load_efficientnet_lite0()
    # no dropout / stochastic depth: batch-norm re-estimation in train mode stays deterministic
    model = E.EfficientNetLite0(
        num_classes=variables["params"]["classifier"]["bias"].shape[0],
        dropout_rate=0.0,
        drop_connect_rate=0.0,
    )
    ncal = args.ncalib or (32 if args.quick else 128)
    ntest = args.ntest or (64 if args.quick else 128)
    # the two scikit-learn photos, as in the figures reported for this experiment
    calib = E.preprocess(E.image_crops(ncal, seed=0, sources=("sklearn",)))
    test = E.preprocess(E.image_crops(ntest, seed=0, split="heldout", sources=("sklearn",)))
    batches = [calib[i : i + 16] for i in range(0, ncal, 16)]
    ev = {"train": False}
    fwd = jax.jit(lambda v, x: model.apply(v, x, train=False))

    def logits(fn, v):
        return jnp.concatenate([fn(v, test[i : i + 32]) for i in range(0, ntest, 32)])

    dense = logits(fwd, variables)
    # the uncompressed model with batch norm re-estimated on the calibration crops: what the
    # calibration data alone does to the statistics (crops of two photos are not ImageNet)
    v_dense_bn = reestimate_batchnorm(model, variables, batches, apply_kwargs={"train": True})
    dense_bn = E.agreement(dense, logits(fwd, v_dense_bn))
    print(
        f"dense with BN re-estimated on the calibration crops: top-1 agreement "
        f"{100 * dense_bn['top1_agreement']:.1f}% (KL {dense_bn['kl']:.3f})",
        flush=True,
    )
    t = time.perf_counter()
    stats = calibrate(model, variables, batches, apply_kwargs=ev, progress=False)
    paths = list(stats)
    keep = [(paths[0], None), (paths[-1], None)]  # stem conv and classifier stay dense
    errs = ACT.activation_errors(
        model, variables, batches, (8, 4), rules=keep + [".*"], apply_kwargs=ev
    )
    t_cal = time.perf_counter() - t
    levels = A.mixed_levels((8, 4), solver=args.solver)
    positions = {p: max(1, round(int(s.count) / ncal)) for p, s in stats.items()}
    t = time.perf_counter()
    db = A.build_database(
        variables["params"],
        stats,
        levels,
        rules=keep + [(".*", True)],
        positions=positions,
        act_errors=errs,
        progress=False,
        path=args.database and os.path.join(args.database, "efficientnet"),
        error=args.error,
    )
    t_db = time.perf_counter() - t
    c8 = db.cost_of({p: "8w8a" for p in db.paths}, "bops")
    print(
        f"EfficientNet-Lite0: {len(db.paths)} layers, calibration {t_cal:.1f}s on {ncal} "
        f"crops, database {t_db:.1f}s ({args.solver})",
        flush=True,
    )
    rows = []
    for cname, kind, assignment in _configs(A, db, args.factors):
        t = time.perf_counter()
        assignment = db.resolve(assignment)
        vw = {**variables, "params": A.materialize(variables["params"], db, assignment)}
        act = ACT.calibrate_activations(
            model, vw, batches, rules=A.activation_rules(assignment), apply_kwargs=ev
        )
        fn = ACT.quantized_apply(model, act, apply_kwargs=ev)
        tr = {"train": True}
        v_bn = reestimate_batchnorm(
            model,
            vw,
            batches,
            apply_kwargs=tr,
            forward=ACT.activation_forward(act, apply_kwargs=tr),
        )
        a, b = E.agreement(dense, logits(fn, vw)), E.agreement(dense, logits(fn, v_bn))
        w = E.agreement(dense, logits(fwd, vw))
        row = {
            "config": cname,
            "kind": kind,
            "levels": {p: lv.name for p, lv in assignment.items()},
            "bops": db.cost_of(assignment, "bops"),
            "reduction_vs_w8a8": c8 / db.cost_of(assignment, "bops"),
            "dp_loss": db.loss_of(assignment),
            "agreement": a["top1_agreement"],
            "kl": a["kl"],
            "agreement_bn": b["top1_agreement"],
            "kl_bn": b["kl"],
            "weights_only_agreement": w["top1_agreement"],
            "seconds": time.perf_counter() - t,
        }
        rows.append(row)
        counts = {}
        for lv in assignment.values():
            counts[lv.name] = counts.get(lv.name, 0) + 1
        print(
            f"  {cname:16s} {row['reduction_vs_w8a8']:4.2f}x: top-1 agreement "
            f"{100 * a['top1_agreement']:.1f}% (KL {a['kl']:.3f}), BN re-est. "
            f"{100 * b['top1_agreement']:.1f}% (KL {b['kl']:.3f})  {counts}",
            flush=True,
        )
    return {
        "model": "efficientnet-lite0",
        "data": "offline photo crops",
        "metric": "top-1 agreement with dense",
        "dense": {"agreement": 1.0, "accuracy": 1.0, "kl": 0.0},
        "dense_bn_reestimated": dense_bn,
        "batchnorm": True,
        "ncalib": ncal,
        "ntest": ntest,
        "kept_dense": [paths[0], paths[-1]],
        "solver": args.solver,
        "levels": [lv.name for lv in levels],
        "bops_w8a8": c8,
        "bops_min": db.min_cost("bops"),
        "calibration_seconds": t_cal,
        "database_seconds": t_db,
        "total_seconds": time.perf_counter() - t_all,
        "rows": [{**r, "accuracy": r["agreement"], "accuracy_bn": r["agreement_bn"]} for r in rows],
    }


def plot(results: list[dict], path: Path) -> None:
    """Top row: accuracy (agreement); bottom row: cross-entropy (KL), which 539 test images
    resolve far better than accuracy (one image = 0.19%)."""
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    n = len(results)
    fig, axes = plt.subplots(2, n, figsize=(5.2 * n, 7.2), squeeze=False)
    style = {"uniform": ("s", "C0"), "dp": ("o", "C3"), "uniform-best": ("^", "C2")}
    names = (("uniform", "W8A8 / W4A4"), ("dp", "mixed DP"), ("uniform-best", "best uniform"))
    for j, res in enumerate(results):
        second = "kl" if "kl" in res["rows"][0] else "loss"
        for i, (key, scale) in enumerate((("accuracy", 100.0), (second, 1.0))):
            ax = axes[i][j]
            for kind, label in names:
                rs = [r for r in res["rows"] if r["kind"] == kind]
                rs.sort(key=lambda r: r["reduction_vs_w8a8"])
                if not rs:
                    continue
                m, c = style[kind]
                xs = [r["reduction_vs_w8a8"] for r in rs]
                ys = [scale * r[key] for r in rs]
                no_bn = " (no BN re-est.)" if res["batchnorm"] else ""
                ax.plot(xs, ys, m + "--", color=c, mfc="none", label=label + no_bn)
                if res["batchnorm"]:
                    ys = [scale * r[key + "_bn"] for r in rs]
                    ax.plot(xs, ys, m + "-", color=c, label=f"{label}, BN re-est.")
                if kind == "uniform":
                    for r, y in zip(rs, ys):
                        ax.annotate(
                            r["config"],
                            (r["reduction_vs_w8a8"], y),
                            fontsize=7,
                            textcoords="offset points",
                            xytext=(3, -9),
                        )
            ref = res["dense"].get(key)
            if ref is not None:
                ax.axhline(scale * ref, color="gray", ls=":", label="dense")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("BOPs reduction vs W8A8 (FLOPs x w-bits x a-bits)")
            ax.set_ylabel(
                res["metric"] + " (%)"
                if i == 0
                else {"loss": "test cross-entropy", "kl": "KL(dense || compressed)"}[key]
            )
            ax.set_title(f"{res['model']} ({res['solver']} weights)", fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/activations")
    ap.add_argument(
        "--model", default="lenet5,resnet", help="comma list among lenet5, resnet, efficientnet"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="OBC's four mixed levels only, GPTQ/SparseGPT weights (minutes on CPU)",
    )
    ap.add_argument(
        "--solver",
        default=None,
        choices=("obc", "gptq", "magnitude"),
        help="weight solver of the levels (default: obc; gptq with --quick or for efficientnet)",
    )
    ap.add_argument(
        "--budgets",
        default="2,4,6",
        help="BOPs reductions vs W8A8 for the DP (clipped to the cheapest)",
    )
    ap.add_argument("--ncalib", type=int, default=None)
    ap.add_argument("--ntest", type=int, default=None, help="held-out crops (efficientnet)")
    ap.add_argument("--database", default=None, help="folder for resumable databases")
    ap.add_argument(
        "--error",
        default="relative",
        choices=("relative", "obs"),
        help="DP score: each layer's output error relative to its output energy "
        "(OBC's normalised 'squared' score, default) or the absolute OBS loss",
    )
    args = ap.parse_args(argv)
    args.factors = [float(f) for f in args.budgets.split(",")]
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    _enable_compile_cache()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    solver_arg = args.solver
    for name in args.model.split(","):
        args.solver = solver_arg or ("gptq" if args.quick or name == "efficientnet" else "obc")
        t = time.perf_counter()
        res = run_efficientnet(args) if name == "efficientnet" else run_zoo(name, args)
        print(f"{name}: {time.perf_counter() - t:.1f}s", flush=True)
        results.append(res)
    result = {
        "quick": args.quick,
        "budgets_vs_w8a8": args.factors,
        "error": args.error,
        "models": results,
    }
    (out / "activations.json").write_text(json.dumps(result, indent=2, default=float))
    plot(results, out / "activations.png")
    print(f"wrote {out / 'activations.json'} and {out / 'activations.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
