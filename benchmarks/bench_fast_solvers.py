"""Benchmark GPTQ and SparseGPT: speed (steady state and first call) and error vs baselines.

Layers follow ../shared/ANCHORS.md: weights N(0, 1/cols); calibration X = Z·A with Z Gaussian and
A a random rotation scaled by 1/sqrt(1+i); 2·cols samples (the GPTQ/SparseGPT rows there); 1%
relative damping; float32. "err" is the relative output error ||(W-Ŵ)Xᵀ||² / ||WXᵀ||².

Operations: ``gptq4`` (4-bit, per-channel asymmetric min-max grid, block 128: GPTQ's defaults),
``sparsegpt50`` (50% unstructured, 128-column mask blocks) and ``sparsegpt24`` (2:4). Each is
compared with its no-compensation baseline (round-to-nearest on the same grid, magnitude
pruning) on every shape, and with the exact greedy solvers (OBQ with the same grid, ExactOBS
50% / 2:4) on one small shape in the same run, since those are too slow for wide layers.

Times: ``first_call_s`` is the first call of an operation on a fresh shape (tracing + compiling
+ running; the shape's ``prepare`` record, run before, holds the preparation's own compile);
``time_s`` the best of ``--repeat`` further calls from ``(W, H)`` (preparation, Cholesky and the
sweep); ``solve_s`` the same with a ready :class:`obcjax.kernels.Prepared` (the sweep and its
set-up only); ``compile_s = first_call_s - time_s``. Every device found (CPU, and a GPU when
there is one) gets its own records.

Usage:
  python benchmarks/bench_fast_solvers.py --quick     # small shapes, seconds
  python benchmarks/bench_fast_solvers.py             # 768x768, 512x2304, 3072x768
  python benchmarks/bench_fast_solvers.py --shapes 4096x4096 --ops gptq4 --devices cpu
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
    exactobs_nm,
    exactobs_prune,
    magnitude_nm,
    magnitude_prune,
    obq_quantize,
    prepare,
    rtn_quantize,
)
from obcjax.kernels.gptq import gptq_quantize
from obcjax.kernels.sparsegpt import sparsegpt_prune
from obcjax.specs import NM, Int, Unstructured

GRID = Int(bits=4, sym=False, search="minmax")  # GPTQ's default grid
OPS = {
    "gptq4": (
        lambda W, H, **kw: gptq_quantize(W, H, GRID, **kw),
        lambda W, H: rtn_quantize(W, GRID, H=H),
        lambda W, H: obq_quantize(W, H, GRID),
        "rtn",
        "obq",
    ),
    "sparsegpt50": (
        lambda W, H, **kw: sparsegpt_prune(W, H, Unstructured(0.5), **kw),
        lambda W, H: magnitude_prune(W, 0.5, H=H),
        lambda W, H: exactobs_prune(W, H, 0.5),
        "magnitude",
        "exactobs",
    ),
    "sparsegpt24": (
        lambda W, H, **kw: sparsegpt_prune(W, H, NM(2, 4), **kw),
        lambda W, H: magnitude_nm(W, 2, 4, H=H),
        lambda W, H: exactobs_nm(W, H, 2, 4),
        "magnitude",
        "exactobs",
    ),
}


def make_layer(rows, cols, seed=0):
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    A = Q / np.sqrt(1.0 + np.arange(cols))[:, None]
    X = (rng.normal(size=(2 * cols, cols)) @ A).astype(np.float32)
    W = (rng.normal(size=(rows, cols)) / np.sqrt(cols)).astype(np.float32)
    H = ((2.0 / X.shape[0]) * (X.T.astype(np.float64) @ X)).astype(np.float32)
    return W, H, X


def rel_err(W, What, X):
    W, What, X = (np.asarray(a, np.float64) for a in (W, What, X))
    return float(np.sum(((W - What) @ X.T) ** 2) / np.sum((W @ X.T) ** 2))


def timed(fn, repeat):
    """``(result, first_call_s, best_s, best_cpu_s)``, every call synchronised.

    ``best_cpu_s`` is the process CPU time (all threads) of the fastest call: on a shared
    machine it moves much less with the load than the wall time does.
    """
    t = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t
    best, cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        wall = time.perf_counter() - t
        if wall < best:
            best, cpu = wall, time.process_time() - c
    return out, first, best, cpu


def devices(which: str):
    found = []
    for kind in which.split(","):
        try:
            found.append(jax.devices(kind)[0])
        except RuntimeError:
            pass  # no such backend on this machine
    return found


def bench_prepare(rows, cols, repeat):
    """Preparation alone (checks, damping, inverse), shared by every solver of a shape."""
    W, H, _ = make_layer(rows, cols)
    Wj, Hj = jnp.asarray(W), jnp.asarray(H)
    _, first, best, cpu = timed(lambda: prepare(Wj, Hj).Hinv, repeat)
    return {
        "op": "prepare",
        "shape": [rows, cols],
        "first_call_s": first,
        "time_s": best,
        "cpu_s": cpu,
    }


def bench_shape(op, rows, cols, repeat):
    solver, baseline, _, base_name, _ = OPS[op]
    W, H, X = make_layer(rows, cols)
    Wj, Hj = jnp.asarray(W), jnp.asarray(H)
    r, first, best, cpu = timed(lambda: solver(Wj, Hj).weights, repeat)
    P = prepare(Wj, Hj)
    _, _, solve, solve_cpu = timed(lambda: solver(Wj, Hj, prepared=P).weights, repeat)
    b = baseline(Wj, Hj).weights
    err, berr = rel_err(W, r, X), rel_err(W, b, X)
    return {
        "op": op,
        "shape": [rows, cols],
        "first_call_s": first,
        "time_s": best,
        "cpu_s": cpu,
        "solve_s": solve,
        "solve_cpu_s": solve_cpu,
        "compile_s": max(first - best, 0.0),
        "err": err,
        f"err_{base_name}": berr,
        f"err_ratio_vs_{base_name}": err / berr,
    }


def bench_exact(op, rows, cols):
    solver, _, exact, _, exact_name = OPS[op]
    W, H, X = make_layer(rows, cols, seed=1)
    Wj, Hj = jnp.asarray(W), jnp.asarray(H)
    fast, _, tf, cf = timed(lambda: solver(Wj, Hj).weights, 1)
    slow, _, ts, cs = timed(lambda: exact(Wj, Hj).weights, 1)
    ef, es = rel_err(W, fast, X), rel_err(W, slow, X)
    return {
        "op": op,
        "shape": [rows, cols],
        "compare": exact_name,
        "err": ef,
        f"err_{exact_name}": es,
        f"err_ratio_vs_{exact_name}": ef / es,
        "time_s": tf,
        "cpu_s": cf,
        f"time_{exact_name}_s": ts,
        f"cpu_{exact_name}_s": cs,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes, one repeat")
    ap.add_argument("--shapes", default="768x768,512x2304,3072x768")
    ap.add_argument(
        "--exact-shape", default="256x576", help="shape for the ExactOBS/OBQ comparison"
    )
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--devices", default="cpu,gpu")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    shapes, exact_shape, repeat = args.shapes, args.exact_shape, args.repeat
    if args.quick:
        shapes, exact_shape, repeat = "128x128,64x384,384x128", "64x128", 1
    ops = args.ops.split(",")
    out = {
        "machine": {
            "platform": platform.processor() or platform.machine(),
            "jax": jax.__version__,
            "default_backend": jax.default_backend(),
            "matmul_precision": str(jax.config.jax_default_matmul_precision),
        },
        "runs": [],
    }
    for dev in devices(args.devices):
        with jax.default_device(dev):
            rec = {"device": str(dev), "platform": dev.platform, "layers": [], "vs_exact": []}
            for shp in shapes.split(","):
                rows, cols = (int(v) for v in shp.split("x"))
                rec["layers"].append(bench_prepare(rows, cols, repeat))
                print(json.dumps(rec["layers"][-1]), flush=True)
                for op in ops:
                    rec["layers"].append(bench_shape(op, rows, cols, repeat))
                    print(json.dumps(rec["layers"][-1]), flush=True)
            rows, cols = (int(v) for v in exact_shape.split("x"))
            for op in ops:
                rec["vs_exact"].append(bench_exact(op, rows, cols))
                print(json.dumps(rec["vs_exact"][-1]), flush=True)
            out["runs"].append(rec)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
