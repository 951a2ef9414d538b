"""OPQ at small scale: uniform vs OPQ allocation, unified vs per-channel grids, the OPQ+OBS hybrid.

For one zoo model and data set (LeNet-5 / digits or the 1-D CNN / MNIST-1D) and each compression
rate (the planner's count vs fp32 kernels, :func:`obcjax.opq.count_stored`'s ``plan_rate`` from the
stored masks, bits and grids: kept weights × bits + 32 bits per stored grid; biases not counted;
each row also records ``size_ratio``, the ratio of :mod:`obcjax.sizes`, masks, zero points and
biases included) the script builds

* ``uniform-<b>b``: the same sparsity and ``b`` bits in every layer (``--uniform-bits``; a
  bit-width that cannot reach the rate is recorded as unreachable), magnitude masks, one
  tensor-wide grid per layer;
* ``opq``: OPQ's data-free allocation (Laplace model, Lagrange multiplier), magnitude masks, one
  shared (unified) codebook per layer;
* ``opq-channel``: the same masks and bits with one grid per output channel (32 more bits per
  channel, so its counted rate is a little lower): the issue's unified-vs-per-channel comparison;
* ``opq-channel@rate``: OPQ allocated with the per-channel grids charged to the budget
  (``granularity='channel'``), i.e. per-channel at the same counted rate (unreachable when the
  scales alone exceed the budget);
* ``opq+obs``: the same allocation solved by ExactOBS pruning + OBQ on calibration data;

and scores each before and after a short fine-tune with masks and codebooks frozen (STE). Per
layer it records the predicted (Laplace) and measured pruning / quantization MSE and the
relative output error on the calibration inputs. After fine-tuning the final weights are
``M ⊙ Q(w)`` of the shadow weights on the frozen grids, computed directly (``export_ulp_mismatches``
counts the weights where ``obcjax.training.quantize_params``, which returns the STE expression
``w + (Q(w) - w)``, is an ulp off); the script checks they are zero where masked and on the grid. Writes ``<out>/opq.json`` and
``<out>/opq.png``.

    python experiments/opq.py --model lenet5 --rates 10,20,40,80 --steps 300
    python experiments/opq.py --model cnn1d --data mnist1d --rates 10,20,40,80 --steps 300
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path

import numpy as np

DEFAULT_DATA = {"lenet5": "digits", "mlp": "digits", "resnet": "digits", "cnn1d": "mnist1d"}
TENSOR_METHODS = ("opq",)  # plus every uniform-<b>b: the grids the Laplace model describes


def _floats(text):
    return [float(x) for x in text.split(",") if x.strip()]


def _exact_export(shadow, masks, codebooks):
    """``M ⊙ Q(w)`` computed directly (the STE expression ``w + (Q(w) - w)`` can sit an ulp
    off the grid point): the weights a deployment stores as codes + codebook."""
    import jax.numpy as jnp

    from obcjax.layout import set_path
    from obcjax.quant import quantize
    from obcjax.transforms import find_layers

    layers = find_layers(shadow)
    out = shadow
    for p, cb in codebooks.items():
        w = quantize(layers[p], cb.scale, cb.zero, cb.bits)
        if p in masks:
            w = jnp.where(masks[p], w, 0.0)
        out = set_path(out, p, "kernel", w)
    return out


def _frozen_ok(params, masks, codebooks):
    """Kernels are zero where masked and exactly on their frozen grid."""
    from obcjax.quant import quantize
    from obcjax.transforms import find_layers

    layers = find_layers(params)
    for p, cb in codebooks.items():
        w = np.asarray(layers[p])
        if p in masks and np.any(w[~np.asarray(masks[p])] != 0.0):
            return False
        if not np.array_equal(w, np.asarray(quantize(w, cb.scale, cb.zero, cb.bits))):
            return False
    return True


def _same_masks(a, b):
    """Two Compressed records hold the same masks, layer by layer."""
    return set(a.specs) == set(b.specs) and all(
        np.array_equal(np.asarray(a.mask(p)), np.asarray(b.mask(p))) for p in a.specs
    )


def _mismatch(a, b):
    from obcjax.transforms import find_layers

    la, lb = find_layers(a), find_layers(b)
    return int(sum(np.sum(np.asarray(la[p]) != np.asarray(lb[p])) for p in la))


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [float(r) for r in result["rates"]]
    rows = [result["rates"][f"{r:g}"] for r in rates]
    methods = [m for m in rows[-1] if not m.startswith("_")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ax = axes[0]
    for k, m in enumerate(methods):
        xs = [r for r, row in zip(rates, rows, strict=True) if "acc_before_ft" in row.get(m, {})]
        ok = [row[m] for row in rows if "acc_before_ft" in row.get(m, {})]
        color = f"C{k}"
        ax.plot(xs, [o["acc_before_ft"] for o in ok], "--o", color=color, alpha=0.6, ms=3)
        ax.plot(xs, [o["acc_after_ft"] for o in ok], "-o", color=color, label=m, ms=4)
    ax.axhline(result["dense_accuracy"], color="k", ls=":", lw=1, label="dense fp32")
    ax.set_xscale("log")
    ax.set_xticks(rates, [f"{r:g}x" for r in rates])
    ax.minorticks_off()
    ax.set_ylabel("test accuracy (dashed: before FT, solid: after)")
    ax.set_title(f"{result['model']} / {result['dataset']}, FT {result['steps']} steps")
    ax.legend(fontsize=7, loc="lower left")
    ax = axes[1]
    for kind, mk in (("prune", "o"), ("quant", "s")):
        pred, meas = [], []
        for row in rows:
            for m in methods:
                for e in row.get(m, {}).get("layers", {}).values():
                    if f"pred_{kind}_mse" in e and e[f"pred_{kind}_mse"] > 0:
                        pred.append(e[f"pred_{kind}_mse"])
                        meas.append(e[f"meas_{kind}_mse"])
        ax.loglog(pred, meas, mk, ms=3, alpha=0.6, label=f"{kind} error ({len(pred)} layers)")
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("Laplace-predicted MSE per weight")
    ax.set_ylabel("measured MSE per weight")
    ax.set_title("error model (uniform + OPQ, all rates)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for k, r in enumerate(rates):
        row = result["rates"][f"{r:g}"]
        if "layers" not in row.get("opq", {}) or "layers" not in row.get("opq-channel", {}):
            continue
        u = row["opq"]["layers"]
        c = row["opq-channel"]["layers"]
        ax.loglog(
            [u[p]["rel_out_err"] for p in u],
            [c[p]["rel_out_err"] for p in u],
            "o",
            color=f"C{k}",
            label=f"{r:g}x",
        )
    lo, hi = ax.get_xlim()
    ax.plot([lo, hi], [lo, hi], "k:", lw=1)
    ax.set_xlabel("unified codebook: relative output error per layer")
    ax.set_ylabel("per-channel grids, same masks and bits")
    ax.set_title("same masks+bits; below diagonal: per-channel better")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="lenet5", help="zoo model (obcjax.zoo.models.MODEL_NAMES)")
    ap.add_argument("--data", default=None, help="data set (default: the model's usual one)")
    ap.add_argument("--rates", default="10,20,40,80", help="comma-separated compression rates")
    ap.add_argument("--uniform-bits", default="2,3,4", help="bit-widths of the uniform baselines")
    ap.add_argument("--steps", type=int, default=300, help="fine-tuning steps per configuration")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    ap.add_argument("--replot", action="store_true", help="only redraw <out>/opq.png from its JSON")
    ap.add_argument("--out", default=None, help="output folder (default runs/opq_<model>_<data>)")
    args = ap.parse_args(argv)

    from obcjax import opq
    from obcjax.calibration import calibrate
    from obcjax.recipes.finetune import zoo_finetune
    from obcjax.transforms import LayerSpec, find_layers
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    name = args.model
    if name not in zmodels.MODEL_NAMES:
        ap.error(f"--model must be one of {zmodels.MODEL_NAMES}, got {name!r}")
    dataset = args.data or DEFAULT_DATA[name]
    rates = _floats(args.rates)
    ubits = [int(b) for b in _floats(args.uniform_bits)]
    methods = None if args.methods is None else set(args.methods.split(","))
    out_dir = Path(args.out or f"runs/opq_{name}_{dataset}")
    if args.replot:
        _plot(json.loads((out_dir / "opq.json").read_text()), out_dir / "opq.png")
        return
    out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    ds = zdata.load_dataset(dataset)
    variables, info = ztrain.pretrained(name, dataset)
    params = variables["params"]
    model = zmodels.linen_model(name, zmodels.num_classes_of(name, variables))
    stats = calibrate(
        model,
        variables,
        [x for x, _ in zdata.batches(ds["calib"], 128)],
        apply_kwargs={"train": False},
    )

    def acc(v):
        return float(ztrain.evaluate(name, v, ds["test"])["accuracy"])

    dense_acc = acc(variables)
    fits = {p: opq.fit_laplace(k, p)._asdict() for p, k in find_layers(params).items()}
    result = {
        "model": name,
        "dataset": dataset,
        "test_size": int(len(ds["test"].y)),
        "calib_size": int(len(ds["calib"].y)),
        "dense_accuracy": dense_acc,
        "pretrained_source": info.get("source"),
        "steps": args.steps,
        "lr": args.lr,
        "count": "rate_counted: kept x bits + 32 bits per stored grid (count_stored plan_rate); "
        "biases and mask indices not counted. size_ratio: obcjax.sizes (values + 1-bit mask + "
        "float32 scale and uint8 zero per grid, every other leaf at 32 bits)",
        "fits": fits,
        "rates": {},
    }
    print(f"{name}/{dataset}: dense {dense_acc:.4f}, layers {list(fits)}", flush=True)

    for rate in rates:
        plan = opq.opq_plan(params, rate)
        channel = {
            p: LayerSpec(
                prune=s.prune,
                quant=dataclasses.replace(s.quant, granularity="channel"),
                solver=s.solver,
            )
            for p, s in plan.specs.items()
        }
        configs = {}
        for b in ubits:
            try:
                configs[f"uniform-{b}b"] = (opq.uniform_allocate(params, rate, bits=b), None)
            except ValueError as err:
                configs[f"uniform-{b}b"] = (str(err), None)
        configs["opq"] = (plan.specs, None)
        configs["opq-channel"] = (channel, None)
        try:
            configs["opq-channel@rate"] = (
                opq.opq_allocate(params, rate, granularity="channel"),
                None,
            )
        except ValueError as err:
            configs["opq-channel@rate"] = (str(err), None)
        configs["opq+obs"] = (plan.specs, "obc")
        if methods is not None:
            configs = {m: c for m, c in configs.items() if m in methods}
        row = {"_lambda": plan.lam}
        for method, (alloc, solver) in configs.items():
            if isinstance(alloc, str):
                row[method] = {"unreachable": alloc}
                print(f"{rate:5.0f}x {method:12s} unreachable", flush=True)
                continue
            t = time.perf_counter()
            if solver is None:
                comp = opq.opq_compress(params, alloc)
            else:
                comp = opq.opq_compress(params, alloc, stats=stats, solver=solver)
            stored = opq.count_stored(params, comp)
            planned = opq.count_bits(params, alloc, comp.masks)
            assert stored["size_bits"] == planned["size_bits"], (method, stored, planned)
            layers = opq.measure_errors(params, comp, stats)
            if method in TENSOR_METHODS or method.startswith("uniform"):
                for p, e in opq.predict_errors(params, alloc).items():
                    layers[p].update(e)
            for p, s in alloc.items():
                layers[p]["sparsity"] = s.prune.sparsity if s.prune else 0.0
                layers[p]["bits"] = s.quant.bits
            cbs = opq.kernel_codebooks(params, comp.qarrays)
            before = acc({**variables, "params": comp.params})
            tuned, tinfo = zoo_finetune(
                name,
                {**variables, "params": comp.params},
                comp.masks,
                cbs,
                ds,
                args.steps,
                lr=args.lr,
                seed=0,
            )
            by_path = {p: comp.mask(p) for p in comp.specs if comp.mask(p) is not None}
            exact = _exact_export(tinfo["shadow_params"], by_path, cbs)
            after = acc({**tuned, "params": exact})
            row[method] = {
                "rate_counted": stored["plan_rate"],
                "size_ratio": stored["rate"],
                "size_bits": stored["size_bits"],
                "acc_before_ft": before,
                "acc_after_ft": after,
                "frozen_ok": _frozen_ok(exact, by_path, cbs),
                "export_ulp_mismatches": _mismatch(tuned["params"], exact),
                "ft_final_loss": float(np.mean(tinfo["losses"][-20:])) if args.steps else None,
                "sum_rel_out_err": float(sum(e["rel_out_err"] for e in layers.values())),
                "layers": layers,
                "seconds": time.perf_counter() - t,
                "ft_seconds": tinfo["seconds"],
            }
            print(
                f"{rate:5.0f}x {method:12s} counted {stored['plan_rate']:7.3f}x "
                f"(size {stored['rate']:.2f}x)  before {before:.4f}  "
                f"after {after:.4f}  Σrel_out {row[method]['sum_rel_out_err']:.3f}  "
                f"({row[method]['seconds']:.1f}s)",
                flush=True,
            )
        masks_equal = "opq" in row and _same_masks(
            opq.opq_compress(params, plan.specs), opq.opq_compress(params, channel)
        )
        uni = {m: v for m, v in row.items() if m.startswith("uniform") and "acc_after_ft" in v}
        if "opq" not in row:
            uni = {}
        row["_summary"] = {
            "opq_channel_same_masks": masks_equal,
            "best_uniform_before": max(uni, key=lambda m: uni[m]["acc_before_ft"]) if uni else None,
            "best_uniform_after": max(uni, key=lambda m: uni[m]["acc_after_ft"]) if uni else None,
            "opq_beats_best_uniform_before": bool(uni)
            and row["opq"]["acc_before_ft"] > max(v["acc_before_ft"] for v in uni.values()),
            "opq_beats_best_uniform_after": bool(uni)
            and row["opq"]["acc_after_ft"] > max(v["acc_after_ft"] for v in uni.values()),
        }
        result["rates"][f"{rate:g}"] = row
        (out_dir / "opq.json").write_text(json.dumps(result, indent=1, default=_json_default))
    result["seconds"] = time.perf_counter() - t0
    (out_dir / "opq.json").write_text(json.dumps(result, indent=1, default=_json_default))
    _plot(result, out_dir / "opq.png")
    print(f"wrote {out_dir / 'opq.json'} and {out_dir / 'opq.png'} in {result['seconds']:.0f}s")


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, float) and math.isinf(x):
        return None
    raise TypeError(f"not JSON serializable: {type(x).__name__}")


if __name__ == "__main__":
    main()
