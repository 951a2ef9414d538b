"""GPTQ / SparseGPT against ExactOBS / OBQ and magnitude / RTN on the real all-MiniLM-L6-v2.

Issue 5's table: levels 50% unstructured, 2:4, 4-bit and 3-bit (asymmetric, groups of 128) and
2:4 + 4-bit, each with three methods -- ``obc`` (ExactOBS / OBQ, exact per row), ``gptq``
(GPTQ / SparseGPT) and ``magnitude`` (magnitude pruning / round-to-nearest) -- on the 36 encoder
Dense layers (embeddings and LayerNorms stay dense). Fidelity is measured on held-out sentences of
the offline corpus: mean cosine similarity of the sentence embeddings to the dense model's and
top-1 nearest-neighbour retrieval agreement. Every row records its wall and CPU time.

ExactOBS / OBQ cost ``rows * cols^3`` per matrix: the 384 x 1536 FFN output layers cost 64 times a
384 x 384 attention matrix, which puts all 36 layers out of reach on a CPU (the script times one
384 x 384 layer, extrapolates, and says so in the JSON). Where the estimate exceeds
``--obc-budget`` seconds, ExactOBS / OBQ run on the 24 attention matrices only, and GPTQ /
SparseGPT and magnitude / RTN are run on the same 24 (FFN dense) so that scope compares like with
like; the 36-layer table then has GPTQ and magnitude only.

Rows are appended to ``<out>/minilm.json`` as they finish, and a rerun skips the rows already
there (``--fresh`` starts over), so the expensive ExactOBS rows can be added by a later call::

    python experiments/minilm.py --out runs/minilm [--quick] [--methods gptq,magnitude,obc]
        [--levels s50,nm24,w4g128,w3g128,nm24w4g128] [--mode one-pass|sequential]
"""

from __future__ import annotations

import argparse
import dataclasses
import faulthandler
import json
import os
import signal
import time
from pathlib import Path

LEVELS = {  # name -> (prune, bits)
    "s50": ("0.5", None),
    "nm24": ("2:4", None),
    "w4g128": (None, 4),
    "w3g128": (None, 3),
    "nm24w4g128": ("2:4", 4),
}
METHODS = ("obc", "gptq", "magnitude")
ATTENTION = r"layer_\d+/attention/(query|key|value|output)"


def _log(msg: str) -> None:
    print(msg, flush=True)


def _probe_obc(model, variables, stats, spec_of, log) -> dict:
    """Time ExactOBS (50% unstructured, the costliest level) on one 384 x 384 layer, warm, and
    extrapolate to every encoder layer with the ``rows * cols^3`` cost of the exact solver."""
    import jax

    from obcjax import kernels as K
    from obcjax.layout import get_path
    from obcjax.stats import hessian_finalize

    path = "layer_0/attention/query"
    W = get_path(variables["params"], path, "kernel").T
    H = hessian_finalize(stats[path])[0]
    spec = spec_of("s50", "obc")
    times = []
    for _ in range(2):  # the first call compiles
        t, c = time.perf_counter(), time.process_time()
        jax.block_until_ready(K.exactobs_prune(W, H, spec.prune.sparsity, layer=path).weights)
        times.append((time.perf_counter() - t, time.process_time() - c))
    unit = times[1][1]  # CPU seconds of one warm 384 x 384 solve
    D, F = model.config.hidden_size, model.config.intermediate_size
    units = lambda rows, cols: (rows / D) * (cols / D) ** 3
    per_layer = 4 * units(D, D) + units(F, D) + units(D, F)
    est_all = unit * per_layer * model.config.num_layers
    est_att = unit * 4 * units(D, D) * model.config.num_layers
    log(
        f"ExactOBS 50% on {path} (384 x 384): {times[0][0]:.1f}s with compilation, "
        f"{times[1][0]:.1f}s wall / {unit:.1f}s CPU warm -> estimated {est_all / 60:.0f} CPU "
        f"minutes for all 36 layers, {est_att / 60:.1f} for the 24 attention matrices"
    )
    return {
        "layer": path,
        "first_call_seconds": times[0][0],
        "warm_seconds": times[1][0],
        "warm_cpu_seconds": unit,
        "estimated_cpu_seconds_all_layers": est_all,
        "estimated_cpu_seconds_attention_only": est_att,
        "cost_model": "rows * cols^3 per matrix, relative to 384 x 384",
    }


def _plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
    import matplotlib.pyplot as plt

    scopes = [s for s in ("all", "attention") if any(r["scope"] == s for r in rows)]
    fig, axes = plt.subplots(len(scopes), 2, figsize=(11, 3.6 * len(scopes)), squeeze=False)
    colors = {"obc": "tab:green", "gptq": "tab:blue", "magnitude": "tab:gray"}
    for i, scope in enumerate(scopes):
        sr = [r for r in rows if r["scope"] == scope]
        levels = [lv for lv in LEVELS if any(r["level_key"] == lv for r in sr)]
        methods = [m for m in METHODS if any(r["solver"] == m for r in sr)]
        width = 0.8 / max(len(methods), 1)
        for j, (key, label) in enumerate(
            (("cosine", "mean cosine to dense"), ("retrieval", "top-1 retrieval agreement"))
        ):
            ax = axes[i, j]
            lo = 1.0
            for k, m in enumerate(methods):
                xs, ys = [], []
                for x, lv in enumerate(levels):
                    hit = [r for r in sr if r["solver"] == m and r["level_key"] == lv]
                    if hit:
                        xs.append(x + (k - (len(methods) - 1) / 2) * width)
                        ys.append(hit[0][key])
                lo = min([lo, *ys])
                names = {
                    "obc": "ExactOBS/OBQ",
                    "gptq": "GPTQ/SparseGPT",
                    "magnitude": "magnitude/RTN",
                }
                ax.bar(xs, ys, width, label=names[m], color=colors[m])
            ax.set_xticks(range(len(levels)), [LEVEL_LABELS[lv] for lv in levels], fontsize=8)
            ax.set_ylim(max(0.0, lo - 0.05 * (1 - lo) - 0.02), 1.0)
            scope_name = (
                "all 36 encoder Dense layers"
                if scope == "all"
                else "24 attention matrices only (FFN dense)"
            )
            ax.set_title(f"{label}\n{scope_name}", fontsize=9)
            ax.grid(axis="y", alpha=0.3)
            if j == 0:
                ax.legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, held-out sentences", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LEVEL_LABELS = {
    "s50": "50%",
    "nm24": "2:4",
    "w4g128": "4-bit g128",
    "w3g128": "3-bit g128",
    "nm24w4g128": "2:4 + 4-bit",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/minilm")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="CI-sized: 32 calibration / 64 test sentences, 4-bit and 2:4, "
        "GPTQ/SparseGPT and magnitude/RTN only",
    )
    ap.add_argument("--methods", default=None, help=f"comma list among {','.join(METHODS)}")
    ap.add_argument("--levels", default=None, help=f"comma list among {','.join(LEVELS)}")
    ap.add_argument("--ncalib", type=int, default=None)
    ap.add_argument("--ntest", type=int, default=None)
    ap.add_argument("--mode", choices=("one-pass", "sequential"), default="one-pass")
    ap.add_argument(
        "--obc-budget",
        type=float,
        default=900.0,
        help="CPU seconds ExactOBS/OBQ may take per level on all 36 layers; above "
        "it they run on the 24 attention matrices only",
    )
    ap.add_argument("--fresh", action="store_true", help="discard rows of an earlier run")
    args = ap.parse_args(argv)

    import jax
    import numpy as np

    from obcjax.recipes import minilm as mc
    from obcjax.zoo import minilm

    jax.config.update("jax_default_matmul_precision", "highest")
    # Twice on a loaded 2-core CPU an ExactOBS call never returned: every XLA thread asleep and
    # an execution blocked waiting on its inputs (async dispatch). Synchronous dispatch costs
    # nothing measurable here; SIGUSR1 prints the Python stacks of a run that looks stuck.
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    methods = (args.methods or ("gptq,magnitude" if args.quick else ",".join(METHODS))).split(",")
    levels = (args.levels or ("w4g128,nm24" if args.quick else ",".join(LEVELS))).split(",")
    for name, got, allowed in (("--methods", methods, METHODS), ("--levels", levels, LEVELS)):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"{name}: {bad} not among {list(allowed)}")
    ncal = args.ncalib or (32 if args.quick else 128)
    ntest = args.ntest or (64 if args.quick else 256)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "minilm.json"
    setup = {
        "ncalib": ncal,
        "ntest": ntest,
        "mode": args.mode,
        "seed": 0,
        "corpus_split": mc.CORPUS_SPLIT,
    }
    result = {"setup": setup, "rows": [], "notes": []}
    if json_path.exists() and not args.fresh:
        old = json.loads(json_path.read_text())
        if old.get("setup") == setup:
            result = old
        else:
            _log(f"{json_path} was made with {old.get('setup')}; starting over")

    def save():
        json_path.write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    model, variables, tokenizer = minilm.load_minilm()
    calib, test = mc.corpus_split(ncal, ntest)
    batches = mc.calibration_batches(tokenizer, calib)
    reference = np.asarray(minilm.encode(model, variables, tokenizer, test))
    t, c = time.perf_counter(), time.process_time()
    stats = mc.calibrate_minilm(model, variables, batches)
    result["calibration"] = {
        "seconds": time.perf_counter() - t,
        "cpu_seconds": time.process_time() - c,
        "tokens": int(sum(b["attention_mask"].sum() for b in batches)),
        "batch_shapes": [list(b["input_ids"].shape) for b in batches],
    }
    _log(
        f"MiniLM loaded, {ncal} calibration sentences ({result['calibration']['tokens']} "
        f"tokens) calibrated in {result['calibration']['seconds']:.1f}s; {ntest} held-out "
        f"sentences; {time.perf_counter() - t0:.1f}s so far"
    )

    def spec_of(level, solver):
        prune, bits = LEVELS[level]
        return mc.level_spec(
            mc.parse_prune(prune), bits, group=128 if bits else None, solver=solver
        )

    all_layers = mc.encoder_layers(model.config.num_layers)
    att_layers = [p for p in all_layers if "/attention/" in p]
    scopes = {"all": all_layers}
    if "obc" in methods:
        if "obc_probe" not in result:
            result["obc_probe"] = _probe_obc(model, variables, stats, spec_of, _log)
            save()
        probe = result["obc_probe"]
        if probe["estimated_cpu_seconds_all_layers"] > args.obc_budget:
            scopes["attention"] = att_layers
            note = (
                f"ExactOBS/OBQ on all 36 layers was estimated at "
                f"{probe['estimated_cpu_seconds_all_layers'] / 60:.0f} CPU minutes per level "
                f"(> --obc-budget {args.obc_budget:.0f}s): it runs on the 24 attention "
                "matrices only (scope 'attention'), where every method is also run for "
                "comparison; scope 'all' has GPTQ/SparseGPT and magnitude/RTN only"
            )
            if note not in result["notes"]:
                result["notes"].append(note)
            _log(note)

    done = {(r["scope"], r["solver"], r["level_key"]) for r in result["rows"]}
    dense_mb = None
    for scope, layers in scopes.items():
        for level in levels:
            for solver in methods:
                if solver == "obc" and scope == "all" and "attention" in scopes:
                    continue
                if (scope, solver, level) in done:
                    continue
                spec = spec_of(level, solver)
                t, c = time.perf_counter(), time.process_time()
                res = mc.compress_minilm(
                    model,
                    variables,
                    spec,
                    stats=stats,
                    batches=batches,
                    mode=args.mode,
                    layers=layers,
                )
                jax.block_until_ready(res.params)
                secs, cpu = time.perf_counter() - t, time.process_time() - c
                ev = mc.compare_embeddings(
                    model, {**variables, "params": res.params}, tokenizer, test, reference
                )
                dense_bits, comp_bits = mc.dense_size_bits(res.summary, all_layers)
                dense_mb = dense_bits / 8e6
                row = {
                    "scope": scope,
                    "level_key": level,
                    "level": spec.name,
                    "method": mc.method_label(spec),
                    "solver": solver,
                    **dataclasses.asdict(ev),
                    "seconds": secs,
                    "cpu_seconds": cpu,
                    "size_mb": comp_bits / 8e6,
                    "compression": dense_bits / comp_bits,
                    "loss": res.summary["total/loss"],
                    "layers": len(layers),
                }
                result["rows"].append(row)
                save()
                _log(
                    f"[{scope:9s}] {row['method']:15s} {LEVEL_LABELS[level]:12s} cos "
                    f"{ev.cosine:.4f} (min {ev.min_cosine:.3f})  top-1 {ev.retrieval:.3f}  "
                    f"{secs:6.1f}s ({cpu:.0f}s CPU)  {row['size_mb']:.2f} MB"
                )

    rows = sorted(
        result["rows"],
        key=lambda r: (
            r["scope"] != "all",
            list(LEVELS).index(r["level_key"]),
            METHODS.index(r["solver"]),
        ),
    )
    result["rows"] = rows
    result["dense_size_mb"] = dense_mb or result.get("dense_size_mb")
    save()
    _log(
        f"\n{'scope':9s}  {'method':15s}  {'level':12s}  mean cos  top-1   wall s  CPU s   "
        "MB (Dense kernels)"
    )
    for r in rows:
        _log(
            f"{r['scope']:9s}  {r['method']:15s}  {LEVEL_LABELS[r['level_key']]:12s}  "
            f"{r['cosine']:.4f}    {r['retrieval']:.3f}  {r['seconds']:6.1f}  "
            f"{r['cpu_seconds']:6.1f}  {r['size_mb']:.2f}"
        )
    _plot(rows, out / "minilm.png")
    _log(f"wrote {json_path} and {out / 'minilm.png'} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
