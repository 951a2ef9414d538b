"""OPQ at small scale: LeNet-5 on digits, uniform vs OPQ allocation vs the OPQ+OBS hybrid.

For each compression rate (vs fp32 kernels, counted by :func:`obcjax.opq.count_bits`: kept
weights × bits + one fp32 step per layer; biases not counted) the script builds

* ``uniform``: the same sparsity and 4 bits in every layer, magnitude masks, tensor-wide grids;
* ``opq``: OPQ's data-free allocation (Laplace model, Lagrange multiplier), magnitude masks, one
  shared codebook per layer;
* ``opq+obs``: the same allocation applied by ExactOBS pruning + OBQ (calibration data);

and scores each before and after a short fine-tune with masks and codebooks frozen (STE). It also
records the Laplace fit (KS statistic) and predicted vs measured per-layer errors (the paper's
Fig. 3 analogue). Writes ``<out>/opq.json`` and ``<out>/opq.png``.

    python experiments/opq.py --out runs/opq [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def _measured_errors(params, compressed, path):
    w = np.asarray(params[path]["kernel"], np.float64)
    c = np.asarray(compressed.params[path]["kernel"], np.float64)
    mask = (
        np.asarray(compressed.masks[path]) if path in compressed.masks else np.ones(w.shape, bool)
    )
    return float(np.mean(np.where(mask, 0.0, w * w))), float(
        np.mean(np.where(mask, (w - c) ** 2, 0))
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/opq")
    ap.add_argument("--quick", action="store_true", help="rates 10x, 20x and a shorter fine-tune")
    ap.add_argument("--steps", type=int, default=None, help="fine-tuning steps")
    args = ap.parse_args(argv)

    from obcjax import opq
    from obcjax.calibration import calibrate
    from obcjax.training import codebooks_from_qarrays, finetune
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rates = [10.0, 20.0] if args.quick else [10.0, 20.0, 40.0]
    steps = args.steps if args.steps is not None else (150 if args.quick else 500)
    name, dataset = "lenet5", "digits"
    t0 = time.perf_counter()
    ds = zdata.load_dataset(dataset)
    variables, info = ztrain.pretrained(name, dataset)
    params = variables["params"]
    dense_acc = ztrain.evaluate(name, variables, ds["test"])["accuracy"]
    model = zmodels.linen_model(name, zmodels.num_classes_of(name, variables))
    stats = calibrate(
        model,
        variables,
        [x for x, _ in zdata.batches(ds["calib"], 128)],
        apply_kwargs={"train": False},
    )
    result = {
        "model": name,
        "dataset": dataset,
        "dense_accuracy": dense_acc,
        "steps": steps,
        "rates": {},
        "fits": {},
    }

    def acc(p):
        return float(ztrain.evaluate(name, {**variables, "params": p}, ds["test"])["accuracy"])

    for rate in rates:
        plan = opq.opq_plan(params, rate)
        allocs = {
            "uniform": (opq.uniform_allocate(params, rate, bits=4), None),
            "opq": (plan.specs, None),
            "opq+obs": (plan.specs, "obc"),
        }
        row = {}
        for method, (alloc, solver) in allocs.items():
            t = time.perf_counter()
            if solver is None:
                comp = opq.opq_compress(params, alloc)
            else:
                comp = opq.opq_compress(params, alloc, stats=stats, solver=solver)
            count = opq.count_bits(params, alloc, comp.masks)
            before = acc(comp.params)
            tuned, tinfo = finetune(
                name,
                {**variables, "params": comp.params},
                comp.masks,
                codebooks_from_qarrays(comp.qarrays),
                ds,
                steps,
                lr=1e-3,
                seed=0,
            )
            after = acc(tuned["params"])
            row[method] = {
                "rate_counted": count["rate"],
                "size_bits": count["size_bits"],
                "acc_before_ft": before,
                "acc_after_ft": after,
                "layers": {
                    p: {"sparsity": (s.prune.sparsity if s.prune else 0.0), "bits": s.quant.bits}
                    for p, s in alloc.items()
                },
                "seconds": time.perf_counter() - t,
            }
            if method == "opq":
                errs = {}
                for p in alloc:
                    mp, mq = _measured_errors(params, comp, p)
                    errs[p] = {
                        "pred_prune_mse": plan.pred_prune_mse[p],
                        "meas_prune_mse": mp,
                        "pred_quant_mse": plan.pred_quant_mse[p],
                        "meas_quant_mse": mq,
                    }
                row[method]["errors"] = errs
            print(
                f"{rate:5.0f}x {method:8s} counted {count['rate']:.3f}x  before {before:.4f}  "
                f"after {after:.4f}  ({row[method]['seconds']:.1f}s)",
                flush=True,
            )
        result["rates"][f"{rate:g}"] = row
    result["fits"] = {p: opq.fit_laplace(params[p]["kernel"], p)._asdict() for p in plan.specs}
    result["seconds"] = time.perf_counter() - t0
    (out_dir / "opq.json").write_text(json.dumps(result, indent=2))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    xs = np.arange(len(rates))
    for k, method in enumerate(["uniform", "opq", "opq+obs"]):
        for stage, hatch in (("acc_before_ft", "//"), ("acc_after_ft", "")):
            ys = [result["rates"][f"{r:g}"][method][stage] for r in rates]
            axes[0].bar(
                xs + 0.13 * (2 * k + (stage == "acc_after_ft")) - 0.33,
                ys,
                0.13,
                label=f"{method} {'after' if hatch == '' else 'before'} FT",
                hatch=hatch,
                color=f"C{k}",
                alpha=1.0 if hatch == "" else 0.5,
            )
    axes[0].axhline(dense_acc, color="k", ls="--", lw=1, label="dense fp32")
    axes[0].set_xticks(xs, [f"{r:g}x" for r in rates])
    axes[0].set_ylabel("test accuracy")
    lowest = min(
        result["rates"][f"{r:g}"][m]["acc_before_ft"]
        for r in rates
        for m in result["rates"][f"{r:g}"]
    )
    axes[0].set_ylim(max(0.0, min(0.5, lowest - 0.05)), 1.0)
    axes[0].legend(fontsize=7, loc="lower left")
    axes[0].set_title("LeNet-5 / digits")
    errs = result["rates"][f"{rates[-1]:g}"]["opq"]["errors"]
    for kind, mk in (("prune", "o"), ("quant", "s")):
        pred = [e[f"pred_{kind}_mse"] for e in errs.values()]
        meas = [e[f"meas_{kind}_mse"] for e in errs.values()]
        axes[1].loglog(pred, meas, mk, label=f"{kind} error")
    lims = axes[1].get_xlim()
    axes[1].plot(lims, lims, "k:", lw=1)
    axes[1].set_xlabel("Laplace-predicted MSE per weight")
    axes[1].set_ylabel("measured MSE per weight")
    axes[1].set_title(f"error model, OPQ at {rates[-1]:g}x")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "opq.png", dpi=120)
    print(f"wrote {out_dir / 'opq.json'} and {out_dir / 'opq.png'} in {result['seconds']:.0f}s")


if __name__ == "__main__":
    main()
