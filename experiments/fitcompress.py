"""FIT and FITCompress at small scale: LeNet-5 on digits (or the 1-D CNN on MNIST-1D).

1. ``corr``, FIT vs measured damage: random per-layer (bits, sparsity) configurations, each pruned
   by the per-layer Fisher ranking ``F·w²`` and rounded to nearest on min-max grids; Spearman rank
   correlation of FIT (Δ²/12 noise model, and the actual rounding error) with the test accuracy
   drop and the test loss increase. Then random (weight bits, activation bits) configurations
   with FIT's activation term added (activations fake-quantized on the min-max ranges FIT models).
2. ``table``, equal size: at each target ``α*`` (fraction of the fp32 size of all params; sizes
   counted as ``summarize``: kept weights × bits, biases at 32 bits, no index overhead):

   * ``fitcompress``: the paper's greedy A* path search (f = g + λh) with its own global Fisher
     masks + round-to-nearest; ``fitcompress-ratio``: our ΔFIT/Δsize step rule;
   * ``fit+obc``: the A* plan's per-layer sparsities and bits applied by ExactOBS/OBQ (hybrid);
   * ``fit-dp``: OBC's dynamic program over a grid of (sparsity, bits) levels fed with FIT
     scores, with Fisher masks + RTN, and ``fit-dp+obc`` applied by ExactOBS/OBQ (hybrid);
   * ``obc-dp``: OBC proper, the same DP and levels fed with ExactOBS/OBQ losses;
   * ``uniform (best)``: the same bits and sparsity in every layer (magnitude + RTN), the best
     bit-width by test accuracy (an oracle choice that flatters the baseline).

   Each before and after the same quantization-aware fine-tuning (mask and grids frozen, STE).
3. ``path``: the A* search path in compression space (global sparsity vs mean bits, α vs the
   Fisher path length) for the smallest target.
4. ``reest``: the A* search with one Fisher at the float weights vs the Fisher re-estimated at the
   expanded node every ``--reestimate-every`` expansions (the authors' code: every one, on fresh
   batches of the training split), at each target: the plans (bits, global sparsity, the
   fraction of masks that differ), accuracy and loss before and after the same fine-tuning, and
   the cost (Fisher passes, batches, seconds; the search's wall time). ``--quick``: the smallest
   target only, 4 batches of 64 per pass.

Writes ``<out>/fitcompress.json`` and ``<out>/fitcompress.png``.

    python experiments/fitcompress.py --out runs/fitcompress [--quick] [--model cnn1d --dataset mnist1d]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PARTS = ("corr", "act", "table", "path", "reest")


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
    ap.add_argument("--quick", action="store_true", help="two sizes, fewer configs, looser Fisher")
    ap.add_argument("--model", default="lenet5")
    ap.add_argument("--dataset", default="digits")
    ap.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    ap.add_argument("--configs", type=int, default=None, help="random configurations (corr/act)")
    ap.add_argument("--ratios", default=None, help="comma list of size targets α*")
    ap.add_argument("--ft-steps", type=int, default=None, help="fine-tuning steps (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reestimate-every", type=int, default=1,
                    help="reest: re-estimate the Fisher every this many expansions")  # fmt: skip
    ap.add_argument(
        "--merge",
        default=None,
        help="comma list of fitcompress.json files of partial runs: merge, replot, exit",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return _merge(args.merge.split(","), Path(args.out))
    parts = [p for p in args.parts.split(",") if p]
    if [p for p in parts if p not in PARTS]:
        ap.error(f"unknown parts in {parts}; choose from {PARTS}")

    import jax
    import jax.numpy as jnp
    from scipy.stats import spearmanr

    from obcjax import allocation, fit
    from obcjax.calibration import calibrate
    from obcjax.capture import input_hook, intercept
    from obcjax.recipes.finetune import zoo_example_loss, zoo_finetune_plan
    from obcjax.specs import Int, Unstructured
    from obcjax.transforms import LayerSpec, compress, find_layers
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", flush=True)

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    ratios = [0.10, 0.05] if quick else [0.2, 0.1, 0.05, 0.03, 0.02]
    if args.ratios:
        ratios = [float(r) for r in args.ratios.split(",")]
    n_cfg = args.configs or (12 if quick else 40)
    ft_steps = args.ft_steps if args.ft_steps is not None else (100 if quick else 300)
    name, dataset = args.model, args.dataset
    ds = zdata.load_dataset(dataset)
    variables, _ = ztrain.pretrained(name, dataset)
    params = variables["params"]
    test = ds["test"]
    classes = zmodels.num_classes_of(name, variables)
    module = zmodels.linen_model(name, classes)
    bsz = 32 if dataset == "digits" else 64

    def score(p):
        r = ztrain.evaluate(name, {**variables, "params": p}, test)
        return float(r["accuracy"]), float(r["loss"])

    dense_acc, dense_loss = score(params)
    log(f"{name}/{dataset}: dense {dense_acc:.4f}")

    t = time.perf_counter()
    loss_fn = zoo_example_loss(name, variables)
    fisher = fit.fisher_diagonal(
        loss_fn,
        params,
        zdata.batches(ds["train"], 64, seed=args.seed),
        tol=1e-2 if quick else 1e-3,
        min_batches=4,
        max_batches=20 if quick else 60,
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
    log(f"Fisher: {result['fisher']}")
    rng = np.random.default_rng(args.seed)

    def spearman(xs, ys):
        r = spearmanr(xs, ys)
        return {"rho": float(r.statistic), "p": float(r.pvalue)}

    # 1. FIT vs measured damage on random weight configurations
    configs = []
    if "corr" in parts:
        for i in range(n_cfg):
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
            comp = fit.prune_and_round(params, specs, masks)
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
                    "size_ratio": comp.summary["total/size_bits"]
                    / comp.summary["total/dense_bits"],
                }
            )
        corr = {
            f"{fk}~{mk}": spearman([c[fk] for c in configs], [c[mk] for c in configs])
            for fk in ("fit_model", "fit_actual")
            for mk in ("acc_drop", "loss_increase")
        }
        result["random_configs"] = configs
        result["spearman"] = corr
        log(f"spearman (weights): {json.dumps(corr)}")

    # 1b. weights + activations
    act_configs = []
    if "act" in parts:
        t = time.perf_counter()
        act = fit.activation_fisher(
            module, variables, zdata.batches(ds["train"], 64, seed=args.seed + 1),
            tol=1e-2 if quick else 1e-3, min_batches=4, max_batches=20 if quick else 60,
        )  # fmt: skip
        log(f"activation Fisher over {act.batches} batches ({time.perf_counter() - t:.0f}s)")

        def fq_apply(v, x):
            # grids travel as arguments (scale, zero, 2^b - 1 per layer): one compile for all
            grids = v["grids"]

            def fq(path, a):
                g = grids.get(path)
                if g is None:
                    return None
                s, z, top = g
                q = jnp.clip(jnp.round(a / s) + z, 0, top)
                return (s * (q - z)).astype(a.dtype)

            with intercept(module, input_hook(lambda c: fq(c.path, c.input)), ("Dense", "Conv")):
                return module.apply({k: w for k, w in v.items() if k != "grids"}, x)

        fq_apply = jax.jit(fq_apply)

        def grid_args(abits):
            return {
                p: (g.scale, g.zero, jnp.asarray(2.0**g.bits - 1))
                for p, g in fit.activation_grids(act, abits).items()
            }

        for _ in range(n_cfg):
            specs = {p: LayerSpec(quant=Int(bits=int(rng.choice([3, 4, 6, 8])), search="minmax"))
                     for p in paths}  # fmt: skip
            abits = {p: int(rng.choice([3, 4, 6, 8])) for p in act.trace}
            fw = fit.fit_score(fisher, params, specs)
            fa = float(sum(fit.activation_fit(act, abits).values()))
            comp = fit.prune_and_round(params, specs)
            r = ztrain.evaluate_apply(
                fq_apply, {**variables, "params": comp.params, "grids": grid_args(abits)}, test
            )
            act_configs.append(
                {
                    "wbits": {p: s.quant.bits for p, s in specs.items()},
                    "abits": abits,
                    "fit_weights": fw,
                    "fit_activations": fa,
                    "fit_total": fw + fa,
                    "accuracy": r["accuracy"],
                    "acc_drop": dense_acc - r["accuracy"],
                    "loss_increase": r["loss"] - dense_loss,
                }
            )
        corr_a = {
            f"{fk}~{mk}": spearman([c[fk] for c in act_configs], [c[mk] for c in act_configs])
            for fk in ("fit_total", "fit_weights", "fit_activations")
            for mk in ("acc_drop", "loss_increase")
        }
        result["activation_fisher"] = {
            "trace": act.trace, "lo": act.lo, "hi": act.hi, "batches": act.batches,
            "converged": act.converged,
        }  # fmt: skip
        result["act_configs"] = act_configs
        result["spearman_with_activations"] = corr_a
        log(f"spearman (weights + activations): {json.dumps(corr_a)}")

    # 2. equal size
    table, plans = {}, {}
    if "table" in parts or "path" in parts:
        stats = calibrate(
            module,
            variables,
            [x for x, _ in zdata.batches(ds["calib"], 128)],
            apply_kwargs={"train": False},
        )
        sizes = [layers[p].size for p in paths]
        n_all = sum(np.size(x) for x in jax.tree.leaves(params))
        other_bits = 32 * (n_all - sum(sizes))
        # OBC's database costs one ExactOBS/OBQ solve (and compile) per level and layer: a
        # modest grid, the same for the FIT-fed and the OBS-fed dynamic programs
        sp_grid = [0.0, 0.5, 0.7, 0.8, 0.9, 0.95] + ([] if quick else [0.97])
        b_grid = [8, 4, 3, 2]
        levels = [
            LayerSpec(prune=Unstructured(s) if s else None, quant=Int(bits=b, search="minmax"))
            for s in sp_grid
            for b in b_grid
        ]
        db = None
        if "table" in parts:
            t = time.perf_counter()
            db = allocation.build_database(params, stats, levels, overhead=False, progress=False)
            result["obc_database_seconds"] = time.perf_counter() - t
            log(f"OBC database: {len(levels)} levels x {len(paths)} layers "
                f"({result['obc_database_seconds']:.0f}s)")  # fmt: skip

        def finetuned(comp):
            if not ft_steps:
                return None
            v, _ = zoo_finetune_plan(name, variables, comp, ds, ft_steps, lr=1e-3,
                                     batch_size=bsz, seed=args.seed)  # fmt: skip
            return score(v["params"])[0]

        def row(comp, **extra):
            acc, loss = score(comp.params)
            return {
                "accuracy": acc,
                "loss": loss,
                "size_ratio": comp.summary["total/size_bits"] / comp.summary["total/dense_bits"],
                "accuracy_ft": finetuned(comp),
                **extra,
            }

        def layer_info(plan):
            return {p: {"bits": plan.bits[p], "sparsity": 1.0 - float(plan.masks[p].mean())}
                    for p in paths}  # fmt: skip

        for ratio in ratios if "table" in parts else [min(ratios)]:
            rows = {}
            t = time.perf_counter()
            plan = fit.fit_search(params, fisher, target_ratio=ratio, seed=args.seed)
            search_s = time.perf_counter() - t
            plans[ratio] = plan
            if "table" not in parts:
                break
            rplan = fit.fit_search(params, fisher, target_ratio=ratio, seed=args.seed,
                                   rule="ratio")  # fmt: skip
            rows["fitcompress"] = row(
                fit.apply_plan(params, plan), search_seconds=search_s, steps=len(plan.trace) - 1,
                global_sparsity=plan.sparsity, fit=plan.fit, layers=layer_info(plan),
            )  # fmt: skip
            rows["fitcompress-ratio"] = row(
                fit.apply_plan(params, rplan), steps=len(rplan.trace) - 1, fit=rplan.fit,
                layers=layer_info(rplan),
            )  # fmt: skip
            rows["fit+obc"] = row(fit.apply_plan(params, plan, stats=stats, solver="obc"))
            dplan = fit.fit_dp(params, fisher, target_ratio=ratio, levels=levels)
            rows["fit-dp"] = row(fit.apply_plan(params, dplan), fit=dplan.fit,
                                 layers=layer_info(dplan))  # fmt: skip
            rows["fit-dp+obc"] = row(fit.apply_plan(params, dplan, stats=stats, solver="obc"))
            budget = ratio * 32 * n_all - other_bits
            choice = allocation.solve(db, budget, metric="size")
            obc_out = compress(params, stats, allocation.to_rules(choice))
            rows["obc-dp"] = row(
                obc_out,
                fit=fit.fit_score(fisher, params, {p: s for p, s in choice.items()},
                                  masks={p: obc_out.mask(p) for p in obc_out.specs
                                         if obc_out.mask(p) is not None}),
                layers={p: {"bits": s.quant.bits if s.quant else 32,
                            "sparsity": s.prune.sparsity if s.prune else 0.0}
                        for p, s in choice.items()},
            )  # fmt: skip
            best, best_comp = None, None
            for b in (8, 6, 4, 3, 2):
                s = _uniform_sparsity(sizes, other_bits, b, ratio * 32 * n_all)
                if s is None:
                    continue
                spec = LayerSpec(
                    prune=Unstructured(s) if s > 0 else None,
                    quant=Int(bits=b, search="minmax"),
                    solver="magnitude",
                )
                comp = compress(params, stats, [(".*", spec)])
                acc, loss = score(comp.params)
                rows[f"uniform@{b}"] = {
                    "accuracy": acc,
                    "loss": loss,
                    "sparsity": s,
                    "size_ratio": comp.summary["total/size_bits"]
                    / comp.summary["total/dense_bits"],
                }
                if best is None or acc > rows[best]["accuracy"]:
                    best, best_comp = f"uniform@{b}", comp
            if best:
                rows["uniform (best)"] = {**rows[best], "choice": best,
                                          "accuracy_ft": finetuned(best_comp)}  # fmt: skip
            table[str(ratio)] = rows
            log(
                f"alpha*={ratio}: "
                + ", ".join(
                    f"{k} {v['accuracy']:.4f}/"
                    f"{v['accuracy_ft'] if v.get('accuracy_ft') is not None else float('nan'):.4f}"
                    f"@{v['size_ratio']:.4f}"
                    for k, v in rows.items()
                    if not k.startswith("uniform@")
                )
            )
        result["equal_size"] = table
        result["fine_tune"] = {"steps": ft_steps, "lr": 1e-3, "batch_size": bsz,
                               "optimizer": "AdamW, cosine (recipes.finetune.zoo_finetune_plan)"}  # fmt: skip

    # 4. one Fisher vs the Fisher re-estimated at the expanded node
    if "reest" in parts:
        re_batches = 4 if quick else 20
        reest = {}
        for ratio in [min(ratios)] if quick else ratios:
            rows = {}
            for label, every in (("fixed", None), ("reestimated", args.reestimate_every)):
                t = time.perf_counter()
                kw = {}
                if every is not None:
                    kw = dict(
                        reestimate_every=every, loss_fn=loss_fn,
                        batches=lambda i: zdata.batches(ds["train"], 64, seed=args.seed + 1000 + i),
                        fisher_kwargs={"tol": 0.0, "min_batches": re_batches,
                                       "max_batches": re_batches},
                    )  # fmt: skip
                plan = fit.fit_search(params, fisher, target_ratio=ratio, seed=args.seed, **kw)
                comp = fit.apply_plan(params, plan)
                acc, loss = score(comp.params)
                ft = None
                if ft_steps:
                    v, _ = zoo_finetune_plan(name, variables, comp, ds, ft_steps, lr=1e-3,
                                             batch_size=bsz, seed=args.seed)  # fmt: skip
                    ft = score(v["params"])[0]
                rows[label] = {
                    "accuracy": acc, "loss": loss, "accuracy_ft": ft,
                    "size_ratio": plan.size_bits / plan.dense_bits, "fit": plan.fit,
                    "steps": len(plan.trace) - 1, "global_sparsity": plan.sparsity,
                    "bits": plan.bits, "fisher_passes": plan.fisher_passes,
                    "fisher_batches": plan.fisher_batches, "fisher_seconds": plan.fisher_seconds,
                    "search_seconds": plan.seconds, "wall_seconds": time.perf_counter() - t,
                    "masks": plan.masks,
                }  # fmt: skip
            a, b = rows["fixed"].pop("masks"), rows["reestimated"].pop("masks")
            n = sum(m.size for m in a.values())
            rows["masks_differ"] = sum(int(np.sum(a[p] != b[p])) for p in a) / n
            rows["same_bits"] = rows["fixed"]["bits"] == rows["reestimated"]["bits"]
            reest[str(ratio)] = rows
            f, r = rows["fixed"], rows["reestimated"]
            log(
                f"reest alpha*={ratio}: fixed {f['accuracy']:.4f} ({f['steps']} steps, "
                f"{f['search_seconds']:.1f}s) vs re-estimated {r['accuracy']:.4f} "
                f"({r['steps']} steps, {r['fisher_passes']} Fisher passes, "
                f"{r['fisher_seconds']:.1f}s of {r['search_seconds']:.1f}s); masks differ "
                f"{rows['masks_differ']:.3f}, same bits {rows['same_bits']}"
            )
        result["reestimation"] = {
            "every": args.reestimate_every, "batches_per_pass": re_batches, "batch_size": 64,
            "by_target": reest,
        }  # fmt: skip

    # 3. the search path
    if "path" in parts and plans:
        plan = plans[min(plans)]
        result["path"] = {"target_ratio": min(plans), "trace": plan.trace}

    result["seconds"] = time.perf_counter() - t_start
    (out_dir / "fitcompress.json").write_text(json.dumps(result, indent=1, default=float))
    _plot(result, paths, layers, out_dir / "fitcompress.png")
    log(f"done -> {out_dir}")
    return result


def _merge(files, out_dir: Path):
    """One JSON and figure from the JSONs of runs of different ``--parts`` on the same model."""
    from obcjax.transforms import find_layers
    from obcjax.zoo import train as ztrain

    result = {}
    for f in files:
        result.update(json.loads(Path(f).read_text()))
    result["merged_from"] = files
    variables, _ = ztrain.pretrained(result["model"], result["dataset"])
    layers = find_layers(variables["params"])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "fitcompress.json").write_text(json.dumps(result, indent=1, default=float))
    _plot(result, list(layers), layers, out_dir / "fitcompress.png")
    return result


def _plot(result, paths, layers, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    want = [
        "random_configs" in result,
        bool(result.get("equal_size")),
        bool(result.get("equal_size")),
        "path" in result,
    ]
    n = max(1, sum(want))
    fig, axs = plt.subplots(1, n, figsize=(5.3 * n, 4.2), squeeze=False)
    it = iter(axs[0])
    ax = [next(it) if w else None for w in want]
    dense_acc = result["dense_accuracy"]
    if "random_configs" in result:
        cfg = result["random_configs"]
        ax[0].scatter([c["fit_model"] for c in cfg], [c["acc_drop"] for c in cfg], s=12,
                      label="weights")  # fmt: skip
        rho = result["spearman"]["fit_model~acc_drop"]["rho"]
        title = f"weights ρ={rho:.2f}"
        if "act_configs" in result:
            ac = result["act_configs"]
            ax[0].scatter([c["fit_total"] for c in ac], [c["acc_drop"] for c in ac], s=12,
                          marker="x", label="weights + activations")  # fmt: skip
            rho_a = result["spearman_with_activations"]["fit_total~acc_drop"]["rho"]
            title += f", W+A ρ={rho_a:.2f}"
        ax[0].set_xscale("log")
        ax[0].set_xlabel("FIT")
        ax[0].set_ylabel("test accuracy drop")
        ax[0].set_title(f"random configs (Spearman) {title}", fontsize=9)
        ax[0].legend(fontsize=7)
    table = result.get("equal_size", {})
    if table:
        rs = sorted(float(r) for r in table)
        methods = ["fitcompress", "fitcompress-ratio", "fit+obc", "fit-dp", "fit-dp+obc",
                   "obc-dp", "uniform (best)"]  # fmt: skip
        for i, (key, a) in enumerate((("accuracy", ax[1]), ("accuracy_ft", ax[2]))):
            for m in methods:
                xs = [r for r in rs if table[str(r)].get(m) and table[str(r)][m].get(key)]
                if xs:
                    a.plot(xs, [table[str(r)][m][key] for r in xs], "o-", label=m, ms=4)
            a.set_xscale("log")
            a.set_xlabel("size / fp32 size (α*)")
            a.set_ylabel("test accuracy")
            a.axhline(dense_acc, color="gray", ls=":", label="dense")
            a.set_title("equal size, " + ("no fine-tuning" if i == 0 else "after QAT fine-tune"))
            a.legend(fontsize=7)
    if "path" in result:
        tr = result["path"]["trace"]
        n = np.array([layers[p].size for p in paths], float)
        mean_bits = [float(np.dot(n, t["bits"]) / n.sum()) for t in tr]
        sp = [t["sparsity"] for t in tr]
        sc = ax[3].scatter(sp, mean_bits, c=range(len(tr)), cmap="viridis", s=18, zorder=3)
        ax[3].plot(sp, mean_bits, "-", color="gray", lw=0.8)
        for t, x, y in zip(tr, sp, mean_bits, strict=True):
            if t["move"] == "quant":
                ax[3].annotate(t["layer"], (x, y), fontsize=6, xytext=(3, 2),
                               textcoords="offset points")  # fmt: skip
        ax[3].set_xlabel("global pruned fraction")
        ax[3].set_ylabel("mean bits per weight (size-weighted)")
        ax[3].set_title(f"A* path to α*={result['path']['target_ratio']} "
                        f"(g = {tr[-1]['g']:.3g})", fontsize=9)  # fmt: skip
        fig.colorbar(sc, ax=ax[3], label="step")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
