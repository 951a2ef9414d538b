"""OBC's non-uniform allocation (database of levels + dynamic program) against uniform levels.

At each model-size budget (a reduction factor of the compressed layers' float32 size, weights only,
as in the OBC paper) the script compares

* ``dp``: one level per layer chosen by :func:`obcjax.allocation.solve` from a database of joint
  levels (unstructured sparsity x bit-width, one ExactOBS pass per layer plus OBQ solves);
* ``uniform``: the best single level that every layer can take within the same budget
  (:func:`obcjax.allocation.uniform`, ``by="loss"``: the feasible level of least summed loss);

by test accuracy and test loss (the loss is the finer signal: 1 digits test image is 0.19 points).
The database error is the summed OBS loss (``--error obs``) or OBC's per-layer normalised loss
(``--error relative``). The database is stored under ``<out>/db`` and resumes when re-run.
Writes ``<out>/dp_budget.json`` and ``<out>/dp_budget.png``.

    python experiments/dp_budget.py --out runs/dp_budget [--quick|--smoke] [--model lenet5 --data digits]

``--smoke`` (4 levels, 2 budgets) is what CI runs (tests/test_experiments.py).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _levels(quick: bool, smoke: bool = False):
    from obcjax.specs import Int, Unstructured
    from obcjax.transforms import LayerSpec

    if smoke:
        return [None, LayerSpec(quant=Int(8)), LayerSpec(quant=Int(4)),
                LayerSpec(prune=Unstructured(0.6), quant=Int(4))]
    sparsities = (0.3, 0.5, 0.7) if quick else (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    bits = (4, 3) if quick else (5, 4, 3, 2)
    levels = [None] + [LayerSpec(quant=Int(b)) for b in (8, *bits)]
    levels += [LayerSpec(prune=Unstructured(s), quant=Int(b)) for s in sparsities for b in bits]
    return levels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/dp_budget")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--quick", action="store_true", help="fewer levels and budgets")
    ap.add_argument("--smoke", action="store_true",
                    help="4 levels, 2 budgets, OBS error only (what CI runs)")
    ap.add_argument("--budgets", default=None, help="comma list of reduction factors")
    ap.add_argument("--error", default="obs,relative", help="database errors to try")
    ap.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=True)
    args = ap.parse_args(argv)

    import re

    import numpy as np

    from obcjax import allocation as A
    from obcjax.calibration import calibrate
    from obcjax.pipeline import reestimate_batchnorm
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = zdata.load_dataset(args.data)
    variables, _ = ztrain.pretrained(args.model, args.data)
    model = zmodels.linen_model(args.model, num_classes=zmodels.num_classes_of(args.model, variables))
    batches = [x for x, _ in zdata.batches(ds["calib"], 128)]
    stats = calibrate(model, variables, batches, apply_kwargs={"train": False}, progress=False)
    keep = [(re.escape(next(iter(stats))), None)] if args.keep_first else []
    has_bn = bool(variables.get("batch_stats"))

    def score(params):
        v = {**variables, "params": params}
        if has_bn:
            v = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
        r = ztrain.evaluate(args.model, v, ds["test"])
        return float(r["accuracy"]), float(r["loss"])

    dense_acc, dense_loss = score(variables["params"])
    print(f"{args.model}/{args.data}: dense accuracy {100 * dense_acc:.2f}, loss {dense_loss:.4f}",
          flush=True)
    levels = _levels(args.quick, args.smoke)
    default_budgets = "8,12" if args.smoke else "12,16,20" if args.quick else "8,12,16,20,24,28"
    factors = [float(f) for f in (args.budgets or default_budgets).split(",")]
    if args.smoke and args.error == "obs,relative":
        args.error = "obs"
    result = {"model": args.model, "data": args.data, "dense": {"accuracy": dense_acc,
              "loss": dense_loss}, "levels": [A.as_level(lv).name if lv is not None else "dense"
                                               for lv in levels], "kept_dense": [r for r, _ in keep],
              "runs": {}}
    for error in args.error.split(","):
        t = time.perf_counter()
        db = A.build_database(variables["params"], stats, levels, rules=keep + [(".*", True)],
                              path=str(out / "db"), error=error, overhead=False, progress=False)
        t_db = time.perf_counter() - t
        dense_cost = db.dense_cost("size")
        rows = []
        for f in factors:
            budget = dense_cost / f
            row = {"factor": f}
            for name, pick in (("dp", lambda b=budget, db=db: A.solve(db, b, metric="size")),
                               ("uniform", lambda b=budget, db=db: A.uniform(db, b, "size", by="loss"))):
                try:
                    assignment = pick()
                except ValueError as e:  # the budget is below what this allocator can reach
                    row[name] = {"error": str(e)}
                    continue
                params = A.materialize(variables["params"], db, assignment)
                acc, loss = score(params)
                row[name] = {
                    "accuracy": acc, "loss": loss, "db_loss": db.loss_of(assignment),
                    "reduction": dense_cost / db.cost_of(assignment, "size"),
                    "levels": {p: (lv.name if lv is not None else "dense")
                               for p, lv in assignment.items()},
                }
            rows.append(row)
            d, u = row.get("dp", {}), row.get("uniform", {})
            print(f"[{error}] {f:g}x  dp {100 * d.get('accuracy', np.nan):.2f} "
                  f"(loss {d.get('loss', np.nan):.4f})  uniform {100 * u.get('accuracy', np.nan):.2f}"
                  f" (loss {u.get('loss', np.nan):.4f})  dp levels {d.get('levels')}", flush=True)
        result["runs"][error] = {"database_seconds": t_db, "rows": rows}
    result["seconds"] = time.perf_counter() - t0
    (out / "dp_budget.json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for error, run in result["runs"].items():
        for name, ls in (("dp", "o-"), ("uniform", "s--")):
            pts = [(r["factor"], r[name]) for r in run["rows"] if "accuracy" in r.get(name, {})]
            if not pts:
                continue
            xs = [p[0] for p in pts]
            axes[0].plot(xs, [100 * p[1]["accuracy"] for p in pts], ls, label=f"{name} ({error})")
            axes[1].plot(xs, [p[1]["loss"] for p in pts], ls, label=f"{name} ({error})")
    axes[0].axhline(100 * dense_acc, color="gray", ls=":", label="dense")
    axes[1].axhline(dense_loss, color="gray", ls=":", label="dense")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_ylabel("test loss")
    for ax in axes:
        ax.set_xlabel("size reduction of the compressed layers (x, weights only)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{args.model}/{args.data}: OBC dynamic program vs uniform level")
    fig.tight_layout()
    fig.savefig(out / "dp_budget.png", dpi=120)
    print(f"wrote {out / 'dp_budget.json'} and {out / 'dp_budget.png'} "
          f"({result['seconds']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
