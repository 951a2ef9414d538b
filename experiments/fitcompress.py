"""FIT and FITCompress at small scale: LeNet-5 on digits.

1. FIT vs measured damage: ~20 random per-layer (bits, sparsity) configurations, each pruned by
   the per-layer Fisher ranking ``F·w²`` and rounded to nearest on min-max grids; Spearman rank
   correlation of FIT (Δ²/12 noise model, and the actual rounding error) with the test accuracy
   drop and the test loss increase.
2. Equal size: at each target ``α*`` (fraction of the fp32 size of all params; sizes counted as
   ``summarize``: kept weights × bits, biases at 32 bits) compare

   * ``fitcompress``: the FIT path search's plan with its own global Fisher masks + RTN;
   * ``fit+obc`` / ``fit+magnitude``: the same per-layer sparsities and bits applied by
     ExactOBS/OBQ (calibration data) or by magnitude pruning + RTN (hybrids);
   * ``uniform@b``: the same bits b and the same sparsity in every layer (magnitude + RTN), for
     every b that can meet the size; ``uniform (best)`` is the best of those by test accuracy
     (an oracle choice that flatters the baseline).

No fine-tuning. Writes ``<out>/fitcompress.json`` and ``<out>/fitcompress.png``.

    python experiments/fitcompress.py --out runs/fitcompress [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def _uniform_sparsity(sizes, other_bits, bits, target):
    """Smallest uniform sparsity (OBC's floor(s·n + 0.5) count) whose size meets ``target``."""
    n = np.asarray(sizes)
    s = max(0.0, 1.0 - (target - other_bits) / (bits * n.sum()))
    while s < 0.999:
        kept = n - np.floor(s * n + 0.5)
        if kept @ np.full(len(n), bits) + other_bits <= target:
            return s
        s += 1e-4
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/fitcompress")
    ap.add_argument("--quick", action="store_true", help="two sizes, looser Fisher tolerance")
    ap.add_argument("--configs", type=int, default=20, help="random configurations")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import jax
    from scipy.stats import spearmanr

    from obcjax import fit
    from obcjax.calibration import calibrate
    from obcjax.specs import Int, Unstructured
    from obcjax.transforms import LayerSpec, compress, find_layers
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    ratios = [0.10, 0.05] if args.quick else [0.2, 0.1, 0.05, 0.03, 0.02]
    name, dataset = "lenet5", "digits"
    t0 = time.perf_counter()
    ds = zdata.load_dataset(dataset)
    variables, _ = ztrain.pretrained(name, dataset)
    params = variables["params"]
    test = ds["test"]

    def score(p):
        r = ztrain.evaluate(name, {**variables, "params": p}, test)
        return float(r["accuracy"]), float(r["loss"])

    dense_acc, dense_loss = score(params)

    t = time.perf_counter()
    loss_fn = fit.zoo_example_loss(name, variables)
    fisher = fit.fisher_diagonal(
        loss_fn,
        params,
        zdata.batches(ds["train"], 64, seed=args.seed),
        tol=1e-2 if args.quick else 1e-3,
        min_batches=4,
        max_batches=20 if args.quick else 60,
    )
    fisher_s = time.perf_counter() - t
    layers = find_layers(params)
    paths = list(layers)
    result = {
        "model": name,
        "dataset": dataset,
        "dense_accuracy": dense_acc,
        "dense_loss": dense_loss,
        "fisher": {
            "batches": fisher.batches,
            "examples": fisher.examples,
            "converged": fisher.converged,
            "last_change": fisher.changes[-1],
            "seconds": fisher_s,
        },
    }

    # 1. FIT vs measured damage on random configurations
    rng = np.random.default_rng(args.seed)
    configs = []
    for i in range(args.configs):
        specs, masks = {}, {}
        for p in paths:
            b = int(rng.choice([2, 3, 4, 8]))
            s = float(rng.choice([0.0, 0.25, 0.5, 0.75, 0.9]))
            specs[p] = LayerSpec(
                prune=Unstructured(s) if s else None, quant=Int(bits=b, search="minmax")
            )
            if s:
                masks[p] = fit.fisher_mask(fisher.diag[p], layers[p], s, seed=i)
        fm = fit.fit_score(fisher, params, specs, masks=masks, noise="model")
        fa = fit.fit_score(fisher, params, specs, masks=masks, noise="actual")
        comp = fit.materialize(params, specs, masks)
        acc, loss = score(comp.params)
        configs.append(
            {
                "layers": {
                    p: {"bits": s.quant.bits, "sparsity": s.prune.sparsity if s.prune else 0.0}
                    for p, s in specs.items()
                },
                "fit_model": fm,
                "fit_actual": fa,
                "accuracy": acc,
                "acc_drop": dense_acc - acc,
                "loss_increase": loss - dense_loss,
                "size_ratio": comp.summary["total/size_bits"] / comp.summary["total/dense_bits"],
            }
        )
    corr = {}
    for fk in ("fit_model", "fit_actual"):
        for mk in ("acc_drop", "loss_increase"):
            r = spearmanr([c[fk] for c in configs], [c[mk] for c in configs])
            corr[f"{fk}~{mk}"] = {"rho": float(r.statistic), "p": float(r.pvalue)}
    result["random_configs"] = configs
    result["spearman"] = corr
    print("spearman", json.dumps(corr, indent=1), flush=True)

    # 2. equal size
    model = zmodels.linen_model(name, zmodels.num_classes_of(name, variables))
    stats = calibrate(
        model,
        variables,
        [x for x, _ in zdata.batches(ds["calib"], 128)],
        apply_kwargs={"train": False},
    )
    sizes = [layers[p].size for p in paths]
    n_all = sum(np.size(x) for x in jax.tree.leaves(params))
    other_bits = 32 * (n_all - sum(sizes))
    table = {}
    for ratio in ratios:
        t = time.perf_counter()
        plan = fit.fit_search(params, fisher, target_ratio=ratio, seed=args.seed)
        search_s = time.perf_counter() - t
        rows = {}
        for method, solver in (
            ("fitcompress", "fit"),
            ("fit+obc", "obc"),
            ("fit+magnitude", "magnitude"),
        ):
            comp = fit.apply_plan(params, plan, stats=stats, solver=solver)
            acc, loss = score(comp.params)
            rows[method] = {
                "accuracy": acc,
                "loss": loss,
                "size_ratio": comp.summary["total/size_bits"] / comp.summary["total/dense_bits"],
            }
        rows["fitcompress"].update(
            search_seconds=search_s,
            steps=len(plan.trace) - 1,
            global_sparsity=plan.sparsity,
            fit=plan.fit,
            layers={
                p: {
                    "bits": plan.bits[p],
                    "sparsity": 1.0 - float(plan.masks[p].mean()),
                }
                for p in paths
            },
        )
        target = ratio * 32 * n_all
        best = None
        for b in (8, 6, 4, 3, 2):
            s = _uniform_sparsity(sizes, other_bits, b, target)
            if s is None:
                continue
            spec = LayerSpec(
                prune=Unstructured(s) if s > 0 else None,
                quant=Int(bits=b, search="minmax"),
                solver="magnitude",
            )
            comp = compress(params, stats, [(".*", spec)])
            acc, loss = score(comp.params)
            row = {
                "accuracy": acc,
                "loss": loss,
                "sparsity": s,
                "size_ratio": comp.summary["total/size_bits"] / comp.summary["total/dense_bits"],
                "fit": fit.fit_score(fisher, params, {p: spec for p in paths}, masks=comp.masks),
            }
            rows[f"uniform@{b}"] = row
            if best is None or acc > rows[best]["accuracy"]:
                best = f"uniform@{b}"
        rows["uniform (best)"] = {**rows[best], "choice": best} if best else None
        table[str(ratio)] = rows
        print(
            f"alpha*={ratio}: "
            + ", ".join(
                f"{k} {v['accuracy']:.4f}@{v['size_ratio']:.4f}" for k, v in rows.items() if v
            ),
            flush=True,
        )
    result["equal_size"] = table
    result["seconds"] = time.perf_counter() - t0
    (out_dir / "fitcompress.json").write_text(json.dumps(result, indent=1, default=float))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 4))
    fx = [c["fit_model"] for c in configs]
    ax[0].scatter(fx, [c["acc_drop"] for c in configs])
    ax[0].set_xscale("log")
    ax[0].set_xlabel("FIT (Δ²/12 model)")
    ax[0].set_ylabel("test accuracy drop")
    rho = corr["fit_model~acc_drop"]["rho"]
    ax[0].set_title(f"random configs, Spearman ρ = {rho:.2f}")
    for method in ("fitcompress", "fit+obc", "fit+magnitude", "uniform (best)"):
        xs = [r for r in ratios if table[str(r)].get(method)]
        ax[1].plot(xs, [table[str(r)][method]["accuracy"] for r in xs], "o-", label=method)
    ax[1].set_xscale("log")
    ax[1].set_xlabel("size / fp32 size")
    ax[1].set_ylabel("test accuracy (no fine-tuning)")
    ax[1].axhline(dense_acc, color="gray", ls=":", label="dense")
    ax[1].legend()
    fig.tight_layout()
    fig.savefig(out_dir / "fitcompress.png", dpi=120)
    print(f"done in {result['seconds']:.0f}s -> {out_dir}", flush=True)
    return result


if __name__ == "__main__":
    main()
