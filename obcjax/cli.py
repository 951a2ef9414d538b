"""Command line: ``obcjax compress`` (and ``obcjax train``).

``obcjax compress`` with no arguments is the built-in default: LeNet-5 trained on scikit-learn's
bundled digits (trained in seconds the first time, then cached), calibrated on the calibration
split, compressed with OBC (ExactOBS 50% unstructured + OBQ 4-bit, jointly) next to the
magnitude + round-to-nearest baseline at the same target; it prints a before/after table and a
per-layer table, sweeps sparsity for a plot of accuracy against compression, and writes
``summary.json`` and ``accuracy_vs_sparsity.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

from obcjax.specs import NM, Int, Unstructured


def _parse_prune(text: str | None):
    if text is None or text.lower() in ("none", "0", "dense"):
        return None
    if ":" in text:
        n, m = text.split(":")
        return NM(int(n), int(m))
    return Unstructured(float(text))


def _parse_bits(text: str | None):
    if text is None or str(text).lower() in ("none", "32", "0"):
        return None
    return int(text)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, sep, *body])


def _kb(bits: float) -> str:
    return f"{bits / 8 / 1024:.1f}"


def cmd_compress(args) -> int:
    import jax
    import numpy as np

    from obcjax.calibration import calibrate
    from obcjax.pipeline import compress_sequential, reestimate_batchnorm
    from obcjax.transforms import LayerSpec, compress, prune_levels
    from obcjax.zoo import data as zdata
    from obcjax.zoo import models as zmodels
    from obcjax.zoo import train as ztrain

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ds = zdata.load_dataset(args.data)
    variables, info = ztrain.pretrained(args.model, args.data, seed=args.seed)
    model = zmodels.linen_model(args.model, num_classes=zmodels.num_classes_of(args.model, variables))
    test = ds["test"]
    calib = ds["calib"]
    if args.nsamples:
        calib = zdata.Split(calib.x[: args.nsamples], calib.y[: args.nsamples])

    def evaluate(v):
        return ztrain.evaluate(args.model, v, test)["accuracy"]

    print(f"model {args.model} on {args.data}: {info.get('source', '?')} "
          f"(test accuracy {100 * info['test_accuracy']:.2f}%), calibrating on {len(calib.y)} "
          f"examples", flush=True)
    calib_batches = [x for x, _ in zdata.batches(calib, 128)]
    stats = calibrate(model, variables, calib_batches, apply_kwargs={"train": False},
                      progress=args.progress)
    prune = _parse_prune(args.prune)
    bits = _parse_bits(args.wbits)
    quant = Int(bits, sym=not args.asym) if bits else None
    if prune is None and quant is None:
        print("nothing to do: give --prune and/or --wbits", file=sys.stderr)
        return 2
    keep_list = list(args.keep)
    if args.keep_first:
        keep_list.insert(0, re.escape(next(iter(stats))))  # the first layer in forward order
    keep = [(r, None) for r in keep_list]
    has_bn = bool(variables.get("batch_stats")) and not args.no_bn

    def run(solver, p=prune, q=quant):
        rules = keep + [(".*", LayerSpec(prune=p, quant=q, solver=solver))]
        if args.mode == "sequential":
            out = compress_sequential(model, variables, calib_batches, rules,
                                      apply_kwargs={"train": False}, rel_damp=args.rel_damp,
                                      progress=args.progress)
        else:
            out = compress(variables["params"], stats, rules, rel_damp=args.rel_damp,
                           progress=args.progress)
        return out, finish(out.params)

    def finish(params):
        # batch-norm re-estimation on the calibration data (OBC's BN tuning)
        v = {**variables, "params": params}
        if has_bn:
            v = reestimate_batchnorm(model, v, calib_batches, apply_kwargs={"train": True})
        return v

    dense_acc = evaluate(variables)
    results = {}
    if args.budget and "," in args.abits:
        results.update(_mixed_runs(args, model, variables, stats, keep, calib_batches, test,
                                   has_bn, len(calib.y)))
    elif args.budget:
        results.update(_budget_runs(args, variables, stats, keep, finish, evaluate, len(calib.y)))
    else:
        for solver in args.solvers.split(","):
            t = time.perf_counter()
            res, v = run(solver)
            secs = time.perf_counter() - t
            results[solver] = (res, evaluate(v), secs, v)

    first = next(iter(results.values()))[0]
    dense_bits = first.summary["total/dense_bits"]
    rows = [["dense", f"{100 * dense_acc:.2f}", "+0.00", _kb(dense_bits), "1.0x", "0.0%", "32", "-"]]
    for solver, (res, a, secs, _) in results.items():
        s = res.summary
        layers = [k[: -len("/params")] for k in s if k.endswith("/params") and k != "total/params"]
        nparams = sum(s[f"{p}/params"] for p in layers)
        nz = sum(s[f"{p}/params"] * (1 - s[f"{p}/sparsity"]) for p in layers)
        rows.append([
            solver, f"{100 * a:.2f}", f"{100 * (a - dense_acc):+.2f}", _kb(s["total/size_bits"]),
            f"{s['total/compression']:.1f}x", f"{100 * (1 - nz / nparams):.1f}%",
            "mixed" if args.budget else str(bits or 32), f"{secs:.1f}s",
        ])
    spec_name = LayerSpec(prune=prune, quant=quant).name if not args.budget else f"budget {args.budget}"
    print(f"\ntarget {spec_name}" + ("" if args.budget else " on every layer")
          + (f" except {', '.join(keep_list)}" if keep_list else "")
          + f" ({args.mode}" + (", batch-norm re-estimated)" if has_bn else ")"))
    print(_table(rows, ["method", "acc %", "delta", "size KB", "ratio", "sparsity", "w-bits",
                        "time"]))
    layer_rows = []
    for path in first.summary:
        if not path.endswith("/params") or path == "total/params":
            continue
        p = path[: -len("/params")]
        s = first.summary
        row = [p, s[f"{p}/spec"], str(s[f"{p}/params"]), f"{100 * s[f'{p}/sparsity']:.1f}%",
               str(s[f"{p}/bits"])]
        for res, *_ in results.values():
            row.append(f"{res.losses[p]:.4g}" if p in res.losses else "-")
        layer_rows.append(row)
    print()
    print(_table(layer_rows, ["layer", "spec", "params", "sparsity", "bits"]
                 + [f"loss {s}" for s in results]))

    summary = {
        "model": args.model, "data": args.data, "target": spec_name, "mode": args.mode,
        "kept_dense": keep_list, "batchnorm_reestimated": has_bn,
        "dense_accuracy": dense_acc,
        "methods": {k: {"accuracy": a, "seconds": secs, "summary": r.summary,
                        "losses": r.losses} for k, (r, a, secs, _) in results.items()},
    }
    if args.save:
        from obcjax import export

        solver = next(iter(results))
        res, acc, _, v = results[solver]
        save_path = Path(args.save)
        packed = {f"params/{k}": layer for k, layer in export.pack_compressed(res).items()}
        export.save_params(save_path, dict(v), packed, metadata={
            "model": args.model, "data": args.data, "target": spec_name, "solver": solver,
            "test_accuracy": acc})
        on_disk = save_path.stat().st_size
        theory_bits = sum(export.theoretical_bits(x) for x in packed.values())
        n_packed = sum(int(np.prod(x.shape)) for x in packed.values())
        n_all = sum(int(np.size(a)) for a in jax.tree.leaves(dict(v)))
        theory = theory_bits / 8 + 4 * (n_all - n_packed)
        print(f"\nsaved {solver} model to {save_path}: {on_disk / 1024:.1f} KB on disk, "
              f"theoretical {theory / 1024:.1f} KB, dense float32 {4 * n_all / 1024:.1f} KB "
              f"({4 * n_all / on_disk:.1f}x smaller)")
        summary["saved"] = {"path": str(save_path), "bytes_on_disk": on_disk,
                            "bytes_theoretical": theory, "bytes_dense_float32": 4 * n_all}
    if args.sweep:
        levels = [float(v) for v in args.sweep.split(",")]
        sweep = {}
        keep_rules = keep + [(".*", True)]
        for solver in [s for s in args.solvers.split(",") if s in ("obc", "magnitude")]:
            plist = prune_levels(variables["params"], stats, levels, rules=keep_rules,
                                 solver=solver, rel_damp=args.rel_damp)
            accs = [evaluate(finish(p)) for p in plist]
            sweep[solver] = accs
            print(f"sweep {solver}: " + "  ".join(f"{100 * s:.0f}%:{100 * a:.1f}"
                                                  for s, a in zip(levels, accs)), flush=True)
        summary["sweep"] = {"sparsity": levels, "accuracy": sweep}
        import matplotlib

        matplotlib.use(os.environ.get("MPLBACKEND", "Agg"))
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for solver, accs in sweep.items():
            ax.plot([100 * s for s in levels], [100 * a for a in accs], "o-",
                    label={"obc": "ExactOBS (OBC)", "magnitude": "magnitude",
                           "gptq": "SparseGPT"}.get(solver, solver))
        ax.axhline(100 * dense_acc, color="gray", ls="--", label="dense")
        ax.set_xlabel("unstructured sparsity of every layer (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{args.model} on {args.data}: one-shot pruning, no retraining")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        png = out_dir / "accuracy_vs_sparsity.png"
        fig.savefig(png, dpi=120)
        print(f"plot: {png}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    print(f"summary: {out_dir / 'summary.json'}  ({time.perf_counter() - t0:.1f}s total)")
    return 0


def _parse_budget(text: str) -> tuple[str, float]:
    metric, _, value = text.rpartition("=")
    metric = metric or "size"
    if metric not in ("size", "bops", "flops"):
        raise SystemExit(f"--budget: metric must be size, bops or flops, got {metric!r}")
    value = value.lower().rstrip("x")
    try:
        factor = float(value)
    except ValueError:
        raise SystemExit(f"--budget: expected e.g. 16x, size=16x or bops=8x, got {text!r}") from None
    if factor < 1:
        raise SystemExit(f"--budget: the reduction factor must be >= 1, got {factor}")
    return metric, factor


BUDGET_LEVELS = ("none", "0.5", "0.6", "0.7", "0.8", "0.9", "0.95", "w8", "w4", "w3", "w2",
                 "0.5+w4", "0.5+w3", "0.7+w4", "0.7+w3", "0.8+w4", "2:4+w4")


def _parse_level(text: str):
    from obcjax.transforms import LayerSpec

    if text == "none":
        return None
    prune = quant = None
    for part in text.split("+"):
        if part.startswith("w"):
            quant = Int(int(part[1:]))
        else:
            prune = _parse_prune(part)
    return LayerSpec(prune=prune, quant=quant)


def _budget_runs(args, variables, stats, keep, finish, evaluate, ncalib):
    """OBC's database of levels + dynamic program against the best uniform level, same budget."""
    from obcjax import allocation as A
    from obcjax.transforms import compress

    metric, factor = _parse_budget(args.budget)
    levels = [_parse_level(t) for t in (args.levels.split(",") if args.levels else BUDGET_LEVELS)]
    positions = {p: max(1, round(int(s.count) / ncalib)) for p, s in stats.items()}
    abits = 32 if metric != "bops" else (lambda level: int(args.abits))
    t = time.perf_counter()
    db = A.build_database(variables["params"], stats, levels, rules=keep + [(".*", True)],
                          path=args.database, rel_damp=args.rel_damp, positions=positions,
                          abits=abits, overhead=False, progress=args.progress)
    t_db = time.perf_counter() - t
    budget = db.dense_cost(metric) / factor
    print(f"database: {len(db.paths)} layers x {len(levels)} levels in {t_db:.1f}s; budget "
          f"{metric} / {factor:g} of the compressed layers' dense cost", flush=True)
    out = {}
    for name, assign in (("obc-dp", lambda: A.solve(db, budget, metric=metric)),
                         ("obc-uniform", lambda: A.uniform(db, budget, metric, by="loss"))):
        t = time.perf_counter()
        assignment = assign()
        res = compress(variables["params"], stats, keep + A.to_rules(assignment),
                       rel_damp=args.rel_damp)
        secs = time.perf_counter() - t + t_db
        v = finish(res.params)
        out[name] = (res, evaluate(v), secs, v)
        print(f"{name}: " + ", ".join(f"{p}={a.name if a is not None else 'dense'}"
                                     for p, a in assignment.items()), flush=True)
    return out


def _mixed_runs(args, model, variables, stats, keep, calib_batches, test, has_bn, ncalib):
    """OBC's mixed weight/activation levels + DP under a BOPs budget, in OBC's order (weights,
    then activation ranges on the compressed model, then batch norm), vs the best uniform level."""
    from obcjax import activations as ACT
    from obcjax import allocation as A
    from obcjax.transforms import compress
    from obcjax.zoo import train as ztrain

    metric, factor = _parse_budget(args.budget)
    if metric != "bops":
        raise SystemExit("--abits with several widths quantizes activations: use --budget bops=Nx")
    abits = sorted({int(b) for b in args.abits.split(",")}, reverse=True)
    levels = ([A.parse_level(t) for t in args.levels.split(",")] if args.levels
              else A.mixed_levels(abits))
    ev = {"train": False}
    positions = {p: max(1, round(int(s.count) / ncalib)) for p, s in stats.items()}
    t = time.perf_counter()
    db = ACT.mixed_database(model, variables, calib_batches, stats, levels,
                            rules=keep + [(".*", True)], apply_kwargs=ev, positions=positions,
                            path=args.database, rel_damp=args.rel_damp, error="relative",
                            progress=args.progress)
    t_db = time.perf_counter() - t
    dense = db.dense_cost("bops")
    budget = dense / factor
    print(f"database: {len(db.paths)} layers x {len(levels)} levels in {t_db:.1f}s; budget: BOPs "
          f"/ {factor:g} of the compressed layers at 32w32a (all 8w8a = 16x, all 4w4a = 64x, "
          f"cheapest reachable {dense / db.min_cost('bops'):.0f}x)", flush=True)
    out = {}
    for name, assign in (("obc-dp", lambda: A.solve(db, budget, metric="bops")),
                         ("obc-uniform", lambda: A.uniform(db, budget, "bops", by="loss"))):
        t = time.perf_counter()
        try:
            assignment = assign()
        except ValueError as e:  # below the cheapest (uniform) configuration: the message says it
            if name == "obc-dp":
                raise SystemExit(f"--budget {args.budget}: {e}") from None
            print(f"{name}: skipped ({e})", flush=True)
            continue
        res = compress(variables["params"], stats, keep + A.to_rules(assignment),
                       rel_damp=args.rel_damp)
        v, act, _ = ACT.calibrate_mixed(model, {**variables, "params": res.params}, calib_batches,
                                        assignment, apply_kwargs=ev, batchnorm=has_bn)
        acc = ztrain.evaluate_apply(ACT.quantized_apply(model, act, apply_kwargs=ev), v,
                                    test)["accuracy"]
        out[name] = (res, acc, time.perf_counter() - t + t_db, v)
        print(f"{name}: " + ", ".join(f"{p}={lv.name}" for p, lv in assignment.items())
              + f" ({dense / db.cost_of(assignment, 'bops'):.1f}x fewer BOPs than 32w32a)",
              flush=True)
    return out


def cmd_evaluate(args) -> int:
    from obcjax import export
    from obcjax.zoo import data as zdata
    from obcjax.zoo import train as ztrain

    path = Path(args.load)
    variables = export.load_params(path)
    _, meta = export.load(path)
    meta = meta or {}
    model = args.model or meta.get("model")
    data = args.data or meta.get("data")
    if not model or not data:
        print("evaluate: the file names no model/data; give --model and --data", file=sys.stderr)
        return 2
    ds = zdata.load_dataset(data)
    acc = ztrain.evaluate(model, variables, ds["test"])["accuracy"]
    print(_table([[str(path), model, data, meta.get("target", "?"), f"{100 * acc:.2f}",
                   f"{path.stat().st_size / 1024:.1f}"]],
                  ["file", "model", "data", "target", "acc %", "KB on disk"]))
    return 0


def cmd_train(args) -> int:
    from obcjax.zoo import train as ztrain

    _, info = ztrain.pretrained(args.model, args.data, seed=args.seed)
    print(f"{args.model} on {args.data}: test accuracy {100 * info['test_accuracy']:.2f}% "
          f"({info.get('source')}; {info.get('path')})")
    return 0


def _enable_compile_cache() -> None:
    # Repeated runs of the same command reuse the compiled solvers instead of recompiling them
    # (compilation, not arithmetic, dominates on small models).
    if os.environ.get("OBCJAX_NO_COMPILE_CACHE"):
        return
    import jax

    root = os.environ.get("OBCJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                          "obcjax")
    try:
        jax.config.update("jax_compilation_cache_dir", os.path.join(root, "xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    except Exception as e:  # an old or unusual JAX: run without the cache
        print(f"note: compilation cache disabled ({e})", file=sys.stderr)


def _minilm_argv(argv: list[str]) -> list[str] | None:
    """The arguments after ``compress --model minilm`` (its own options), or None."""
    args = list(argv)
    if args and args[0] == "compress":
        args = args[1:]
    elif args and args[0] in ("evaluate", "train"):
        return None
    for i, a in enumerate(args):
        if a == "--model" and i + 1 < len(args) and args[i + 1] == "minilm":
            return args[:i] + args[i + 2 :]
        if a == "--model=minilm":
            return args[:i] + args[i + 1 :]
    return None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = _minilm_argv(argv)
    if rest is not None:
        # the transformer has its own options (text calibration, group size, act-order)
        from obcjax.zoo import minilm_compress

        _enable_compile_cache()
        return minilm_compress.run(rest)
    ap = argparse.ArgumentParser(prog="obcjax", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    c = sub.add_parser("compress", help="calibrate and compress a zoo model (default: LeNet-5/digits)")
    c.add_argument("--model", default="lenet5",
                   help="zoo model (mlp, lenet5, resnet, cnn1d), or minilm: the pretrained "
                        "sentence encoder, with its own options (obcjax compress --model minilm "
                        "--help)")
    c.add_argument("--data", default="digits")
    c.add_argument("--prune", default="0.5", help="sparsity (0.5), N:M (2:4) or none")
    c.add_argument("--wbits", default="4", help="weight bits 2..8, or none")
    c.add_argument("--asym", action="store_true", help="asymmetric weight grid")
    c.add_argument("--solvers", default="obc,magnitude",
                   help="comma list of obc, magnitude, gptq (GPTQ/SparseGPT)")
    c.add_argument("--keep", action="append", default=[],
                   help="regex of layers to leave dense (repeatable)")
    c.add_argument("--keep-first", action=argparse.BooleanOptionalAction, default=True,
                   help="leave the first layer dense (default; the usual practice, as in OBC)")
    c.add_argument("--mode", choices=("one-pass", "sequential"), default="one-pass",
                   help="one-pass: every layer from the dense model's statistics (OBC); "
                        "sequential: recalibrate on the compressed prefix (GPTQ/SparseGPT)")
    c.add_argument("--no-bn", action="store_true",
                   help="skip batch-norm re-estimation of models with batch norm")
    c.add_argument("--rel-damp", type=float, default=0.01)
    c.add_argument("--nsamples", type=int, default=0, help="calibration examples (0 = all)")
    c.add_argument("--sweep", default="0.5,0.6,0.7,0.8,0.9",
                   help="sparsity levels for the accuracy plot ('' to skip)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--out", default="runs/compress")
    c.add_argument("--progress", action="store_true")
    c.add_argument("--budget", default=None,
                   help="global budget instead of one target: e.g. 16x (model size), "
                        "bops=8x or flops=2x (reduction vs dense); OBC's database of levels "
                        "and dynamic program against the best uniform level")
    c.add_argument("--levels", default=None,
                   help="comma list of database levels, e.g. none,0.5,0.9,w4,0.5+w4,2:4+w4")
    c.add_argument("--abits", default="8",
                   help="activation bits: one value is the activation width in the BOPs count of "
                        "weight-only levels (default 8); a comma list such as 4,8 quantizes the "
                        "activations too, and --budget bops=Nx then picks per layer among OBC's "
                        "mixed levels 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a (or --levels 8w8a,6w6a,...)")
    c.add_argument("--database", default=None,
                   help="folder to keep the database in (resumable: an interrupted run goes on)")
    c.add_argument("--save", default=None,
                   help="write the first solver's compressed model, packed, to this file")
    e = sub.add_parser("evaluate", help="evaluate a packed model written by compress --save")
    e.add_argument("--load", required=True)
    e.add_argument("--model", default=None, help="zoo model (default: from the file)")
    e.add_argument("--data", default=None, help="data set (default: from the file)")
    t = sub.add_parser("train", help="train (or load from cache) a zoo model")
    t.add_argument("--model", default="lenet5")
    t.add_argument("--data", default="digits")
    t.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd is None:
        args = ap.parse_args(["compress", *argv])
    _enable_compile_cache()
    if args.cmd == "compress":
        return cmd_compress(args)
    if args.cmd == "evaluate":
        return cmd_evaluate(args)
    return cmd_train(args)


if __name__ == "__main__":
    raise SystemExit(main())
