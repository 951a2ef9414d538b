"""Benchmark the ExactOBS / OBQ kernels: blocked (right-looking), fast (left-looking), naive.

``naive`` is the OBC reference formulation (a rank-1 downdate of the per-row inverse Hessian every
step); ``fast`` rebuilds each pivot row from the factor rows found so far; ``blocked`` keeps a
per-row inverse and updates it once per block of 64 steps with one GEMM (the default engine).

Layers follow ../shared/ANCHORS.md: weights N(0, 1/cols); calibration X = Z·A with Z Gaussian and
A a random rotation scaled by 1/sqrt(1+i); 4·cols samples; 1% relative damping; float32.
"err" is the relative output error ||(W-Ŵ)Xᵀ||² / ||WXᵀ||².

Prints one JSON object per (shape, operation) and a final summary object. The naive kernel on
wide layers takes hours on a CPU, so it can be timed on a subset of rows (``--naive-rows``) and
scaled to the full row count; such entries say ``"naive_extrapolated": true``.

Usage:
  python benchmarks/bench_exactobs.py                    # the four anchor shapes
  python benchmarks/bench_exactobs.py --quick            # small shapes (seconds)
  python benchmarks/bench_exactobs.py --shapes 256x576 --ops unstructured,nm,obq
  python benchmarks/bench_exactobs.py --devices 2 ...  # rows sharded over 2 CPU devices (cores)
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.kernels import (
    blocked_plan,
    elimination_order,
    exactobs_nm,
    exactobs_prune,
    obq_quantize,
    phase_plan,
    prepare,
    rebuild_levels,
)
from obcjax.kernels.exactobs import allocate_counts
from obcjax.specs import Int

LEVELS = [0.0] + [float(1 - 0.9**i) for i in range(1, 44)] + [0.99]  # OBC's 45 levels


def make_layer(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    A = Q / np.sqrt(1.0 + np.arange(cols))[:, None]
    X = (rng.normal(size=(4 * cols, cols)) @ A).astype(np.float32)
    W = (rng.normal(size=(rows, cols)) / np.sqrt(cols)).astype(np.float32)
    H = (2.0 / X.shape[0]) * (X.T.astype(np.float64) @ X).astype(np.float32)
    return W, H, X


def rel_err(W, What, X):
    num = float(jnp.sum(jnp.matmul(W - What, X.T, precision="highest") ** 2))
    den = float(jnp.sum(jnp.matmul(W, X.T, precision="highest") ** 2))
    return num / den


def timed(fn, repeat=1):
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best = first
    for _ in range(repeat):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t)
    return out, first, best


def machine_peaks():
    """GEMM FLOP/s and copy bandwidth of this machine, measured now."""
    a = jnp.ones((2048, 2048), jnp.float32)
    f = jax.jit(lambda x: jnp.matmul(x, x, precision="highest"))
    _, _, t = timed(lambda: f(a), repeat=3)
    gemm = 2 * 2048**3 / t
    b = jnp.ones((8, 16 << 20), jnp.float32)  # 512 MiB, far beyond the caches
    g = jax.jit(lambda x: jnp.sum(x, axis=1))
    _, _, t = timed(lambda: g(b), repeat=3)
    bw = b.size * 4 / t
    return {"gemm_flops": gemm, "read_bytes_per_s": bw}


def traffic(cols, nsteps, method):
    """Bytes moved and flops of the elimination (the dominant per-step work), per row."""
    if method == "naive":
        return 8.0 * cols * cols * nsteps, 2.0 * cols * cols * nsteps
    by = fl = 0.0
    if method == "blocked":
        # per block: S read and written once around the rank-b GEMM; per step: the block's factor
        # rows read for the pivot row (b/2 on average)
        b, phases = blocked_plan(nsteps, cols)
        for start, end in phases:
            act = cols - start
            for k0 in range(start, end, b):
                n = min(b, end - k0)
                by += 8.0 * act * act + 4.0 * act * n * n / 2
                fl += 2.0 * act * act * n + 2.0 * act * n * n / 2
        return by, fl
    for start, end, act in phase_plan(nsteps, cols):
        n = end - start
        by += 4.0 * end * act * n
        fl += 2.0 * end * act * n
    return by, fl


def run_op(op, W, H, X, method, rows_used=None, mesh=None):
    Wm = W if rows_used is None else W[:rows_used]
    P = prepare(Wm, H)
    rows, cols = Wm.shape
    if op == "unstructured":

        def go():
            order, losses = elimination_order(P, method=method, mesh=mesh)
            counts = allocate_counts(
                np.asarray(losses), [int(np.floor(s * rows * cols + 0.5)) for s in LEVELS + [0.5]]
            )
            return rebuild_levels(P.W, P.Hinv, order, counts)[0][-1]

        nsteps = cols
    elif op == "unstructured50":

        def go():
            return exactobs_prune(Wm, H, 0.5, method=method, prepared=P, mesh=mesh).weights

        nsteps = cols
    elif op == "nm":

        def go():
            return exactobs_nm(Wm, H, 2, 4, method=method, prepared=P, mesh=mesh).weights

        nsteps = cols // 2
    elif op == "obq":

        def go():
            return obq_quantize(
                Wm, H, Int(4, sym=True), method=method, prepared=P, mesh=mesh
            ).weights

        nsteps = cols
    else:
        raise ValueError(op)
    What, first, best = timed(go, repeat=0 if rows * cols * cols > 2e8 else 1)
    return What, first, best, nsteps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="256x576,256x1152,512x2304,768x768")
    ap.add_argument("--quick", action="store_true", help="small shapes only")
    ap.add_argument("--ops", default="unstructured,nm,obq")
    ap.add_argument("--methods", default="blocked,fast,naive")
    ap.add_argument(
        "--devices",
        type=int,
        default=1,
        help="split rows over this many CPU devices (one per core) with shard_map",
    )
    ap.add_argument("--out", default=None, help="also write all records to this JSON file")
    ap.add_argument(
        "--naive-rows",
        type=int,
        default=32,
        help="time the methods not in --full-methods on this many rows of wide layers (scaled)",
    )
    ap.add_argument("--full-methods", default="blocked", help="methods timed on every row")
    args = ap.parse_args()
    if args.devices > 1:
        jax.config.update("jax_num_cpu_devices", args.devices)
    mesh = None
    if args.devices > 1:
        mesh = jax.make_mesh((args.devices,), ("rows",), axis_types=(jax.sharding.AxisType.Auto,))
    shapes = "64x256,128x384" if args.quick else args.shapes
    peaks = machine_peaks()
    meta = {
        "device": str(jax.devices()[0]),
        "backend": jax.default_backend(),
        "platform": platform.processor() or platform.machine(),
        "jax": jax.__version__,
        "devices": len(jax.devices()),
        **peaks,
    }
    print(json.dumps({"machine": meta}), flush=True)
    results = []
    for shp in shapes.split(","):
        rows, cols = (int(v) for v in shp.split("x"))
        W, H, X = make_layer(rows, cols)
        for op in args.ops.split(","):
            rec = {"shape": [rows, cols], "op": op}
            for method in args.methods.split(","):
                sub = None
                full = args.full_methods.split(",")
                if method not in full and cols >= 1152 and rows > args.naive_rows:
                    sub = args.naive_rows
                What, first, best, nsteps = run_op(op, W, H, X, method, sub, mesh)
                used = rows if sub is None else sub
                scale = rows / used
                by, fl = traffic(cols, nsteps, method)
                t = best * scale
                rec[method] = {
                    "time_s": t,
                    "first_call_s": first * scale,
                    "rows_timed": used,
                    "extrapolated": sub is not None,
                    "bytes_per_s": by * rows / t,
                    "flops_per_s": fl * rows / t,
                    "frac_peak_bw": by * rows / t / peaks["read_bytes_per_s"],
                    "frac_peak_flops": fl * rows / t / peaks["gemm_flops"],
                }
                if sub is None:
                    rec[method]["err"] = rel_err(W, What, X)
                else:
                    rec[method]["err_rows_timed"] = rel_err(W[:sub], What, X)
            for a, b in (("fast", "naive"), ("blocked", "naive"), ("blocked", "fast")):
                if a in rec and b in rec:
                    rec[f"speedup_{a}_vs_{b}"] = rec[b]["time_s"] / rec[a]["time_s"]
            print(json.dumps(rec), flush=True)
            results.append(rec)
    summary = {
        "summary": [
            {
                "shape": r["shape"],
                "op": r["op"],
                **{f"{m}_s": r[m]["time_s"] for m in ("blocked", "fast", "naive") if m in r},
                **{k: v for k, v in r.items() if k.startswith("speedup")},
                "err": next(
                    (r[m]["err"] for m in ("blocked", "fast", "naive") if m in r and "err" in r[m]),
                    None,
                ),
            }
            for r in results
        ]
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"machine": meta, "records": results, **summary}, f, indent=1)


if __name__ == "__main__":
    main()
