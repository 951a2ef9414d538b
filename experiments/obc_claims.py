"""Reproduce the OBC paper's claims at small scale on the zoo models (offline, CPU/GPU/TPU alike).

Claims checked, each written to ``<out>/obc_claims.json`` and plotted in ``<out>/obc_claims.png``:

1. ExactOBS beats magnitude pruning across 50-95% unstructured sparsity.
2. OBQ beats round-to-nearest at 2, 3 and 4 bits.
3. Joint 2:4 sparsity + 4-bit weights (OBC) beats magnitude + RTN.
4. A non-uniform allocation from the database of levels and the dynamic program beats the uniform
   allocation at the same model-size budget (when :mod:`obcjax.allocation` is available).
5. Batch-norm re-estimation recovers accuracy after pruning (models with batch norm).
6. One-pass (OBC) against sequential (GPTQ-style) compression.

The first layer is kept dense everywhere, as in the OBC paper's experiments. ``--quick`` runs
LeNet-5 with fewer levels; ``--smoke`` (what CI runs, tests/test_experiments.py) one level of each
claim; the default runs LeNet-5 and the ResNet on digits.

    python experiments/obc_claims.py --out runs/obc_claims [--quick|--smoke] [--models lenet5,resnet]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path


def _acc(ztrain, name, variables, test):
    return float(ztrain.evaluate(name, variables, test)["accuracy"])


def run_model(name: str, dataset: str, *, quick: bool, log, smoke: bool = False) -> dict:
    from obcjax.calibration import calibrate
    from obcjax.pipeline import compress_sequential, reestimate_batchnorm
    from obcjax.specs import NM, Int, Unstructured
    from obcjax.transforms import LayerSpec, compress, prune_levels
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    ds = zdata.load_dataset(dataset)
    variables, info = ztrain.pretrained(name, dataset)
    model = zmodels.linen_model(name, num_classes=zmodels.num_classes_of(name, variables))
    batches = [x for x, _ in zdata.batches(ds["calib"], 128)]
    stats = calibrate(model, variables, batches, apply_kwargs={"train": False})
    first = next(iter(stats))
    keep = [(re.escape(first), None)]
    has_bn = bool(variables.get("batch_stats"))

    def finish(params, bn=has_bn):
        v = {**variables, "params": params}
        if bn:
            v = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
        return v

    def acc(v):
        return _acc(ztrain, name, v, ds["test"])

    dense = acc(variables)
    out: dict = {"model": name, "data": dataset, "dense_accuracy": dense, "kept_dense": first,
                 "batch_norm": has_bn}
    log(f"{name}/{dataset}: dense {100 * dense:.2f}%")

    # 1. pruning sweep, every level from one elimination pass per layer
    levels = [0.7] if smoke else [0.5, 0.7, 0.9] if quick else [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    sweep = {}
    for solver in ("obc", "magnitude"):
        t = time.perf_counter()
        ps = prune_levels(variables["params"], stats, levels, rules=keep + [(".*", True)],
                          solver=solver)
        sweep[solver] = [acc(finish(p)) for p in ps]
        log(f"  prune {solver}: " + " ".join(f"{100 * s:.0f}%:{100 * a:.1f}"
                                             for s, a in zip(levels, sweep[solver]))
            + f" ({time.perf_counter() - t:.1f}s)")
    out["prune"] = {"sparsity": levels, "accuracy": sweep}

    # 2. quantization
    bits = [4] if smoke else [3, 4] if quick else [2, 3, 4]
    quant, quant_loss = {}, {}
    for solver in ("obc", "magnitude"):
        runs = [compress(variables["params"], stats, keep + [(".*", Int(b))], solver=solver)
                for b in bits]
        quant[solver] = [acc(finish(r.params)) for r in runs]
        quant_loss[solver] = [float(r.summary["total/loss"]) for r in runs]
        log(f"  quant {solver}: " + " ".join(f"w{b}:{100 * a:.1f}"
                                             for b, a in zip(bits, quant[solver])))
    out["quant"] = {"bits": bits, "accuracy": quant, "loss": quant_loss}

    # 3. joint 2:4 + 4-bit where 2:4 fits the layer width (input channels per tap % 4 == 0)
    widths = {p: s.sum.shape[-1] for p, s in stats.items()}
    nm_layers = [p for p in stats if p != first and widths[p] % 4 == 0]
    if nm_layers:
        joint_rules = keep + [(re.escape(p), LayerSpec(prune=NM(2, 4), quant=Int(4)))
                              for p in nm_layers] + [(".*", Int(4))]
        joint, joint_loss = {}, {}
        for solver in ("obc", "magnitude"):
            r = compress(variables["params"], stats, joint_rules, solver=solver)
            joint[solver] = acc(finish(r.params))
            joint_loss[solver] = float(r.summary["total/loss"])
        out["joint_2of4_w4"] = {"layers_2of4": nm_layers, "accuracy": joint, "loss": joint_loss}
        log(f"  2:4+w4: obc {100 * joint['obc']:.1f}  magnitude {100 * joint['magnitude']:.1f}")

    # 4. non-uniform (database + DP) vs uniform at equal size budget
    try:
        from obcjax import allocation
    except ImportError:
        allocation = None
    if allocation is not None and hasattr(allocation, "build_database"):
        try:
            out["dp_vs_uniform"] = _dp_vs_uniform(allocation, variables, stats, keep, finish, acc,
                                                  quick=quick, log=log, smoke=smoke)
        except Exception as e:  # report, do not lose the other claims
            out["dp_vs_uniform"] = {"error": f"{type(e).__name__}: {e}"}
            log(f"  dp vs uniform failed: {e}")

    # 5. batch-norm re-estimation on vs off at 70%
    if has_bn:
        p70 = prune_levels(variables["params"], stats, [0.7], rules=keep + [(".*", True)])[0]
        on, off = acc(finish(p70, True)), acc(finish(p70, False))
        out["bn_reestimation"] = {"sparsity": 0.7, "on": on, "off": off}
        log(f"  BN re-estimation at 70%: on {100 * on:.1f}  off {100 * off:.1f}")

    # 6. one-pass vs sequential
    s_seq = 0.7 if quick else 0.8
    rules = keep + [(".*", Unstructured(s_seq))]
    one = compress(variables["params"], stats, rules)
    seq = compress_sequential(model, variables, batches, rules, apply_kwargs={"train": False})
    out["one_pass_vs_sequential"] = {
        "sparsity": s_seq,
        "one_pass": {"accuracy": acc(finish(one.params)), "loss": one.summary["total/loss"]},
        "sequential": {"accuracy": acc(finish(seq.params)), "loss": seq.summary["total/loss"]},
    }
    o = out["one_pass_vs_sequential"]
    log(f"  {100 * s_seq:.0f}%: one-pass {100 * o['one_pass']['accuracy']:.1f}  sequential "
        f"{100 * o['sequential']['accuracy']:.1f}")
    return out


def _dp_vs_uniform(allocation, variables, stats, keep, finish, acc, *, quick, log, smoke=False):
    from obcjax.specs import Unstructured

    sparsities = ([0.0, 0.5, 0.7, 0.9] if smoke else [0.0, 0.5, 0.7, 0.8, 0.9] if quick
                  else [0.0, 0.3, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95])
    levels = [Unstructured(s) for s in sparsities if s > 0]
    db = allocation.build_database(variables["params"], stats, levels,
                                   rules=keep + [(".*", True)], progress=False)
    res = {}
    for target in ([0.7] if quick else [0.6, 0.7, 0.8]):
        budget = allocation.budget_for(db, target) if hasattr(allocation, "budget_for") else None
        if budget is None:
            costs = db.dense_cost() if hasattr(db, "dense_cost") else None
            if costs is None:
                raise RuntimeError("allocation has no budget helper")
            budget = costs * (1 - target)
        dp = allocation.solve(db, budget, metric="size")
        un = allocation.uniform(db, budget, metric="size")
        a_dp = acc(finish(allocation.materialize(variables["params"], db, dp)))
        a_un = acc(finish(allocation.materialize(variables["params"], db, un)))
        res[str(target)] = {"budget": budget, "dp": a_dp, "uniform": a_un}
        log(f"  {100 * target:.0f}% size reduction: DP {100 * a_dp:.1f}  uniform {100 * a_un:.1f}")
    return res


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 3.4 * len(results)), squeeze=False)
    for row, r in zip(axes, results):
        a1, a2 = row
        for solver, label in (("obc", "ExactOBS / OBQ"), ("magnitude", "magnitude / RTN")):
            a1.plot([100 * s for s in r["prune"]["sparsity"]],
                    [100 * a for a in r["prune"]["accuracy"][solver]], "o-", label=label)
            a2.plot(r["quant"]["bits"], [100 * a for a in r["quant"]["accuracy"][solver]], "o-",
                    label=label)
        for a in (a1, a2):
            a.axhline(100 * r["dense_accuracy"], ls="--", color="gray", label="dense")
            a.grid(alpha=0.3)
            a.legend()
        a1.set(xlabel="unstructured sparsity (%)", ylabel="test accuracy (%)",
               title=f"{r['model']}/{r['data']}: pruning")
        a2.set(xlabel="weight bits", xticks=r["quant"]["bits"], title="quantization")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/obc_claims")
    ap.add_argument("--quick", action="store_true", help="LeNet-5, fewer levels")
    ap.add_argument("--smoke", action="store_true", help="one level per claim (what CI runs)")
    ap.add_argument("--models", default=None,
                    help="comma list of zoo models on digits (default lenet5,resnet; quick: lenet5)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    small = args.quick or args.smoke
    names = (args.models or ("lenet5" if small else "lenet5,resnet")).split(",")
    results = [run_model(n, "digits", quick=small, smoke=args.smoke,
                         log=lambda s: print(s, flush=True)) for n in names]
    (out / "obc_claims.json").write_text(json.dumps(results, indent=2))
    plot(results, out / "obc_claims.png")
    print(f"wrote {out / 'obc_claims.json'} and {out / 'obc_claims.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
