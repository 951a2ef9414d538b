"""obcjax benchmark suite: JSON rows comparable with ../shared/ANCHORS.md.

One JSON object per line on stdout (and all of them in ``--out FILE``). Every measurement runs
in a fresh worker subprocess, so a row's first call pays its own tracing and compilation (no
compile cache of an earlier row helps it; the persistent compilation cache is switched off in
the workers) and its peak memory is its own.

Sections:

* ``exactobs``: the OBC reference's operations on ANCHORS.md's synthetic layers
  (``bench_exactobs.make_layer``: weights N(0, 1/cols), X = Z·A with a decaying spectrum,
  4·cols samples, 1 % relative damping, float32): ``exactobs_db`` (the unstructured database, OBC's
  45 levels plus the 50 % level from one elimination pass; err is the 50 % level's),
  ``exactobs_50`` (the 50 % level alone), ``exactobs_2:4`` and ``obq_4bit`` (Int(4, sym=True),
  per-channel, lp-searched range, as OBC).
* ``fast``: ``gptq_4bit`` (per-channel asymmetric min-max, block 128: GPTQ's defaults) and
  ``sparsegpt_50`` on ``bench_fast_solvers.make_layer`` (2·cols samples, as ANCHORS.md).
* ``batching``: a model's same-shaped layers solved one by one (``loop``: the host wrapper
  ``K.solve`` per layer, as ``compress`` does; ``loop_jit``: one ``jax.jit`` of the pure solver
  called per layer) vs all at once (``vmap``: one ``jax.jit(jax.vmap(...))`` call). The vmap row
  carries ``speedup_*`` ratios computed from the loop rows of the same run.
* ``compress``: whole-model ``obcjax.transforms.compress`` of LeNet-5 (random init, digits
  calibration) and of all-MiniLM-L6-v2's 36 encoder Dense layers (64-128 calibration sentences),
  with 50 % ExactOBS and 4-bit GPTQ. first_s is the first call in a fresh process (calibration
  runs before it, untimed, and is reported as ``calibrate_s``); steady_s the next call(s).
* ``block``: one Llama block (:mod:`obcjax.zoo.llama`, random weights) at a real width
  (``--device``: dim 4096, SwiGLU hidden 11008, 32 heads, as Llama-7B) compressed by
  :func:`obcjax.blockwise.compress_blockwise` with 4-bit GPTQ on its seven projections, on
  random tokens: calibration, the solves in forward order (q/k/v and gate/up as shared-input
  groups) and the block's forward, all in the timed call; ``err`` is the block output's relative
  error against the dense block (``track_error``).

Every row: ``section, op, shape, first_s, steady_s, err, compiles, peak_bytes, device, backend,
jax`` and more: ``compiles`` counts XLA compilations during the first call (``jax_log_compiles``
messages "Finished XLA compilation"), ``compile_s`` their summed time, ``compiles_steady`` those
during the steady calls (should be 0), ``traces`` the "Finished tracing" messages, ``compiled``
the compiled programs by name; ``peak_bytes`` is the device's ``memory_stats()['peak_bytes_in_use']``
(null where the backend has no such statistic, e.g. CPU), ``peak_rss_bytes`` the worker's
resident-set peak; ``steady_s`` the minimum of ``repeat`` calls after the first; ``anchor`` the
reference's figures from ANCHORS.md for this operation and shape on this kind of machine, with
``vs_anchor_first`` / ``vs_anchor_steady`` = reference time / ours; ``load1`` the machine's load
average when the row started (timings are noisy on a shared machine).

Usage:
  python benchmarks/suite.py --device --out benchmarks/results/h100-$(date +%F).jsonl     # one GPU, < 8 min
  python benchmarks/suite.py --cpu-small --out benchmarks/results/cpu-small-$(date +%F).jsonl
  python benchmarks/suite.py --cpu-small --quick       # ~1 minute smoke run (tiny shapes)
  python benchmarks/suite.py --cpu-small --sections batching,compress
  python benchmarks/suite.py --device --filter 'exactobs_db 512x2304'   # one row
  python benchmarks/suite.py --cpu-small --cpu-devices 2   # ExactOBS rows sharded over 2 CPU devices
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent

# --------------------------------------------------------------------------------------------
# Reference figures (../shared/ANCHORS.md): {(op, "RxC"): (seconds, err)}
# --------------------------------------------------------------------------------------------

ANCHOR_H100 = {
    ("exactobs_db", "256x576"): (2.99, 0.01717),
    ("exactobs_db", "256x1152"): (5.94, 0.01587),
    ("exactobs_db", "512x2304"): (53.9, 0.01401),
    ("exactobs_db", "768x768"): (8.46, 0.01615),
    ("exactobs_2:4", "256x576"): (1.18, 0.0373),
    ("exactobs_2:4", "256x1152"): (3.08, 0.0345),
    ("exactobs_2:4", "512x2304"): (21.3, 0.0305),
    ("exactobs_2:4", "768x768"): (3.68, 0.0353),
    ("obq_4bit", "256x576"): (3.57, 0.00342),
    ("obq_4bit", "256x1152"): (7.88, 0.00322),
    ("obq_4bit", "512x2304"): (57.7, 0.00287),
    ("obq_4bit", "768x768"): (11.2, 0.00329),
    ("gptq_4bit", "768x768"): (0.177, 0.00462),
    ("gptq_4bit", "3072x768"): (0.172, 0.00461),
    ("gptq_4bit", "4096x4096"): (1.34, 0.00495),
    ("sparsegpt_50", "768x768"): (0.132, 0.0252),
    ("sparsegpt_50", "3072x768"): (0.138, 0.0253),
    ("sparsegpt_50", "4096x4096"): (0.921, 0.0196),
}
# 2 CPU cores: the side-by-side run of ANCHORS.md (reference in the same process as obcjax).
ANCHOR_CPU = {
    ("exactobs_db", "256x576"): (86.3, 0.01717),
    ("exactobs_db", "128x1152"): (330.5, 0.01601),
    ("exactobs_2:4", "256x576"): (42.7, 0.0373),
    ("exactobs_2:4", "128x1152"): (225.4, None),
    ("obq_4bit", "256x576"): (83.5, 0.00342),
    ("obq_4bit", "128x1152"): (349.2, None),
    ("gptq_4bit", "768x768"): (0.157, None),
    ("gptq_4bit", "3072x768"): (0.266, None),
    ("gptq_4bit", "4096x4096"): (5.44, None),
    ("sparsegpt_50", "768x768"): (0.178, None),
    ("sparsegpt_50", "3072x768"): (0.391, None),
    ("sparsegpt_50", "4096x4096"): (4.89, None),
}

# --------------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------------

EXACT_OPS = ("exactobs_db", "exactobs_50", "exactobs_2:4", "obq_4bit")
FAST_OPS = ("gptq_4bit", "sparsegpt_50")
COMPRESS_RECIPES = ("exactobs_50", "gptq_4bit")

PROFILES = {
    "device": dict(
        exact_shapes=["256x576", "256x1152", "768x768", "512x2304"],
        exact_ops=EXACT_OPS,
        # the 50 % level alone only where ANCHORS.md has the naive JAX kernel's time for it
        exact_50_shapes=["768x768", "512x2304"],
        fast_shapes=["768x768", "4096x4096"],
        fast_ops=FAST_OPS,
        # (layers, rows, cols, spec): a small conv stack, all 24 of MiniLM's 384x384 layers,
        # MiniLM's q/k/v with GPTQ
        batching=[(12, 64, 256, "2:4"), (24, 384, 384, "2:4"), (6, 384, 384, "gptq4")],
        compress=[
            ("lenet5", "exactobs_50"),
            ("lenet5", "gptq_4bit"),
            ("minilm", "gptq_4bit"),
            ("minilm", "exactobs_50"),
        ],
        # (dim, hidden, heads, sequences, tokens per sequence): one Llama-7B-wide block
        block=[(4096, 11008, 32, 16, 512)],
        ncalib=128,
        repeat_small=3,
        repeat_large=1,
        repeat_fast=5,
        budget_s=460.0,
    ),
    "cpu-small": dict(
        exact_shapes=["256x576", "128x1152"],
        exact_ops=EXACT_OPS,
        fast_shapes=["768x768", "3072x768"],
        fast_ops=FAST_OPS,
        batching=[(12, 64, 256, "2:4"), (6, 384, 384, "2:4"), (6, 384, 384, "gptq4")],
        # MiniLM with ExactOBS takes tens of minutes on 2 shared cores: add it with
        # --compress lenet5:exactobs_50,lenet5:gptq_4bit,minilm:gptq_4bit,minilm:exactobs_50
        compress=[("lenet5", "exactobs_50"), ("lenet5", "gptq_4bit"), ("minilm", "gptq_4bit")],
        block=[(512, 1376, 8, 8, 128)],
        ncalib=64,
        repeat_small=3,
        repeat_large=1,
        repeat_fast=5,
        budget_s=1800.0,
    ),
}
# --quick: a smoke run of every section (tiny shapes, one job per kind of work)
QUICK = dict(
    exact_shapes=["64x128"],
    exact_ops=("exactobs_db", "exactobs_2:4"),
    fast_shapes=["256x256"],
    fast_ops=("gptq_4bit",),
    batching=[(4, 32, 64, "2:4")],
    compress=[("lenet5", "gptq_4bit")],
    block=[(64, 176, 4, 2, 32)],
    ncalib=32,
    repeat_small=1,
    repeat_large=1,
    repeat_fast=1,
    budget_s=240.0,
)
SECTIONS = ("exactobs", "fast", "batching", "compress", "block")
# Share of the run's budget each section may use (unused time passes on to the next section), so
# a slow section cannot starve the others of their rows.
SHARES = {"exactobs": 0.42, "fast": 0.11, "batching": 0.16, "compress": 0.21, "block": 0.10}


def _shape_str(shape) -> str:
    return "x".join(str(v) for v in shape)


def build_jobs(profile: dict, sections) -> list[dict]:
    jobs = []

    def rep(rows, cols, nsteps):
        return profile["repeat_small"] if rows * cols * nsteps <= 3e8 else profile["repeat_large"]

    if "exactobs" in sections:
        for shp in profile["exact_shapes"]:
            r, c = (int(v) for v in shp.split("x"))
            for op in profile["exact_ops"]:
                if op == "exactobs_50" and shp not in profile.get("exact_50_shapes", [shp]):
                    continue
                jobs.append(dict(section="exactobs", op=op, shape=[r, c], repeat=rep(r, c, c)))
    if "fast" in sections:
        for shp in profile["fast_shapes"]:
            r, c = (int(v) for v in shp.split("x"))
            for op in profile["fast_ops"]:
                # sub-second calls: more repeats, the minimum is then less noisy
                jobs.append(
                    dict(section="fast", op=op, shape=[r, c], repeat=profile["repeat_fast"])
                )
    if "batching" in sections:
        for n, r, c, spec in profile["batching"]:
            for variant in ("loop", "loop_jit", "vmap"):
                jobs.append(
                    dict(
                        section="batching",
                        op=f"{spec} {variant}",
                        spec=spec,
                        variant=variant,
                        shape=[n, r, c],
                        repeat=rep(n * r, c, c // 2),
                    )
                )
    if "compress" in sections:
        for model, recipe in profile["compress"]:
            jobs.append(
                dict(
                    section="compress",
                    op=f"{model} {recipe}",
                    model=model,
                    recipe=recipe,
                    ncalib=profile["ncalib"],
                    repeat=1,
                )
            )
    if "block" in sections:
        for dim, hidden, heads, nseq, seq in profile.get("block", []):
            jobs.append(
                dict(
                    section="block",
                    op="llama_block gptq_4bit",
                    shape=[dim, hidden],
                    heads=heads,
                    tokens=[nseq, seq],
                    repeat=1,
                )
            )
    return jobs


# --------------------------------------------------------------------------------------------
# Worker: one job in a fresh process
# --------------------------------------------------------------------------------------------


class CompileLog:
    """Counts JAX's ``jax_log_compiles`` messages (XLA compilations and traces)."""

    def __init__(self):
        import logging

        self.compiles: list[tuple[str, float]] = []
        self.traces = 0
        log = self

        class Handler(logging.Handler):
            def emit(self, record):
                msg = record.getMessage()
                if msg.startswith("Finished XLA compilation of "):
                    rest = msg[len("Finished XLA compilation of ") :]
                    name, _, tail = rest.rpartition(" in ")
                    try:
                        secs = float(tail.split()[0])
                    except (ValueError, IndexError):
                        secs = 0.0
                    log.compiles.append((name, secs))
                elif msg.startswith("Finished tracing"):
                    log.traces += 1

        import jax

        jax.config.update("jax_log_compiles", True)
        lg = logging.getLogger("jax")
        lg.addHandler(Handler())
        lg.propagate = False  # keep the worker's stderr readable

    def mark(self):
        return len(self.compiles), self.traces

    def since(self, mark):
        n, t = mark
        items = self.compiles[n:]
        by: dict[str, int] = {}
        for name, _ in items:
            by[name] = by.get(name, 0) + 1
        return {
            "compiles": len(items),
            "compile_s": round(sum(s for _, s in items), 4),
            "traces": self.traces - t,
            "compiled": dict(sorted(by.items(), key=lambda kv: -kv[1])),
        }


def _timed(fn, repeat, log):
    """``(out, first_s, steady_s, counters)``; every call synchronised.

    ``*_cpu_s`` are the worker's CPU time (all threads) of the first and of the fastest steady
    call: on a shared machine they move much less with the load than wall times do.
    """
    import jax

    m0 = log.mark()
    t, c = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn())
    first, first_cpu = time.perf_counter() - t, time.process_time() - c
    c_first = log.since(m0)
    _write_row(
        {
            "first_s": first,
            "first_cpu_s": first_cpu,
            "steady_s": None,
            **c_first,
            "partial": "first call only (the worker did not finish)",
        }
    )
    m1 = log.mark()
    best = best_cpu = None
    for _ in range(repeat):
        t, c = time.perf_counter(), time.process_time()
        out = jax.block_until_ready(fn())
        d = time.perf_counter() - t
        if best is None or d < best:
            best, best_cpu = d, time.process_time() - c
    c_steady = log.since(m1)
    counters = {
        "first_cpu_s": first_cpu,
        "steady_cpu_s": best_cpu,
        **c_first,
        "compiles_steady": c_steady["compiles"],
        "traces_steady": c_steady["traces"],
    }
    return out, first, best, counters


def _peaks():
    import resource

    import jax

    peak = None
    try:
        stats = jax.devices()[0].memory_stats()
        if stats:
            peak = stats.get("peak_bytes_in_use")
    except Exception:  # noqa: BLE001 - a backend without memory statistics
        peak = None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, rss


def _layer_job(job, log, mesh):
    import bench_exactobs as BE
    import bench_fast_solvers as BF
    import jax
    import jax.numpy as jnp

    from obcjax import kernels as K
    from obcjax.specs import Int

    rows, cols = job["shape"]
    op = job["op"]
    make = BE.make_layer if job["section"] == "exactobs" else BF.make_layer
    W, H, X = make(rows, cols)
    Wj, Hj = jax.block_until_ready((jnp.asarray(W), jnp.asarray(H)))
    kw = {} if mesh is None else {"mesh": mesh}
    levels = None
    if op == "exactobs_db":
        levels = list(BE.LEVELS) + [0.5]
        fn = lambda: K.exactobs_prune(Wj, Hj, levels, **kw).weights  # noqa: E731
    elif op == "exactobs_50":
        fn = lambda: K.exactobs_prune(Wj, Hj, 0.5, **kw).weights  # noqa: E731
    elif op == "exactobs_2:4":
        fn = lambda: K.exactobs_nm(Wj, Hj, 2, 4, **kw).weights  # noqa: E731
    elif op == "obq_4bit":
        grid = Int(4, sym=True)
        fn = lambda: K.obq_quantize(Wj, Hj, grid, **kw).weights  # noqa: E731
    elif op == "gptq_4bit":
        fn = lambda: K.gptq_quantize(Wj, Hj, BF.GRID).weights  # noqa: E731
    elif op == "sparsegpt_50":
        fn = lambda: K.sparsegpt_prune(Wj, Hj, 0.5).weights  # noqa: E731
    else:
        raise ValueError(f"unknown op {op!r}")
    out, first, steady, counters = _timed(fn, job["repeat"], log)
    What = out[-1] if levels is not None else out
    row = {"first_s": first, "steady_s": steady, "err": BE.rel_err(W, What, X), **counters}
    if levels is not None:
        row["levels"] = len(levels)
    if mesh is not None:
        row["mesh_devices"] = mesh.size
    return row


def _batch_spec(spec):
    from obcjax.specs import Int

    if spec == "2:4":
        return "2:4", None, "obc"
    if spec == "gptq4":
        return None, Int(4, sym=False, search="minmax"), "gptq"
    raise ValueError(spec)


def _batching_job(job, log):
    import bench_exactobs as BE
    import jax
    import jax.numpy as jnp
    import numpy as np

    from obcjax import kernels as K

    n, rows, cols = job["shape"]
    prune, quant, solver = _batch_spec(job["spec"])
    layers = [BE.make_layer(rows, cols, seed=i) for i in range(n)]
    Ws = jnp.asarray(np.stack([l[0] for l in layers]))
    Hs = jnp.asarray(np.stack([l[1] for l in layers]))
    jax.block_until_ready((Ws, Hs))
    Wl = [Ws[i] for i in range(n)]
    Hl = [Hs[i] for i in range(n)]
    pure = lambda W, H: K.solve(W, H, prune, quant, solver).weights  # noqa: E731
    variant = job["variant"]
    if variant == "loop":
        fn = lambda: [pure(Wl[i], Hl[i]) for i in range(n)]  # noqa: E731
    elif variant == "loop_jit":
        one = jax.jit(pure)
        fn = lambda: [one(Wl[i], Hl[i]) for i in range(n)]  # noqa: E731
    elif variant == "vmap":
        many = jax.jit(jax.vmap(pure))
        fn = lambda: many(Ws, Hs)  # noqa: E731
    else:
        raise ValueError(variant)
    out, first, steady, counters = _timed(fn, job["repeat"], log)
    errs = [BE.rel_err(layers[i][0], out[i], layers[i][2]) for i in range(n)]
    return {"first_s": first, "steady_s": steady, "err": float(np.mean(errs)), **counters}


def _model_problem(model, ncalib):
    """``(params, stats, rule, calibration samples)`` for a whole-model compress."""
    import jax
    import numpy as np

    from obcjax.calibration import calibrate

    if model == "lenet5":
        from obcjax.zoo import data as zdata
        from obcjax.zoo import models as zm

        net = zm.linen_model("lenet5")
        variables = zm.init_variables("lenet5", (8, 8, 1))
        x = np.asarray(zdata.digits()["calib"].x)  # all 180 calibration images
        batches = [x[i : i + 64] for i in range(0, len(x), 64)]
        stats = calibrate(net, variables, batches, apply_kwargs={"train": False})
        return variables["params"], stats, ".*", f"{len(x)} digits images"
    if model == "minilm":
        from obcjax.recipes import minilm as mc
        from obcjax.zoo import data as zdata
        from obcjax.zoo import minilm

        net, variables, tok = minilm.load_minilm()
        sentences = zdata.text_corpus(per_split=max(ncalib, 1))["calib"][:ncalib]
        batches = mc.calibration_batches(tok, sentences, batch_size=32)
        stats = mc.calibrate_minilm(net, variables, batches)
        jax.block_until_ready(stats)
        return variables["params"], stats, mc.ENCODER_DENSE, f"{len(sentences)} sentences"
    raise ValueError(f"unknown model {model!r}")


def _compress_job(job, log):
    import re

    from obcjax.specs import Int, Unstructured
    from obcjax.transforms import LayerSpec, compress, find_layers

    t = time.perf_counter()
    params, stats, rule, calib = _model_problem(job["model"], job["ncalib"])
    cal = time.perf_counter() - t
    if job["recipe"] == "exactobs_50":
        spec = LayerSpec(prune=Unstructured(0.5), solver="obc")
    elif job["recipe"] == "gptq_4bit":
        spec = LayerSpec(quant=Int(4, sym=False, search="minmax"), solver="gptq")
    else:
        raise ValueError(job["recipe"])
    layers = {p: k for p, k in find_layers(params).items() if re.fullmatch(rule, p) and p in stats}
    shapes = {}
    for p, k in layers.items():
        G, cols = int(stats[p].sum.shape[0]), int(stats[p].sum.shape[-1])
        s = (int(k.shape[-1]) // G, cols)
        shapes[s] = shapes.get(s, 0) + 1
    box = {}

    def fn():
        box["out"] = compress(params, stats, [(rule, spec)])
        return box["out"].params

    _, first, steady, counters = _timed(fn, job["repeat"], log)
    summary = box["out"].summary
    return {
        "first_s": first,
        "steady_s": steady,
        "err": None,
        "loss": summary.get("total/loss"),
        "layers": len(layers),
        "distinct_shapes": len(shapes),
        "shape": [list(s) + [c] for s, c in sorted(shapes.items())],  # [rows, cols, n layers]
        "calibrate_s": cal,
        "calibration": calib,
        **counters,
    }


def _block_job(job, log):
    import numpy as np

    from obcjax.blockwise import compress_blockwise
    from obcjax.specs import Int
    from obcjax.transforms import LayerSpec
    from obcjax.zoo import llama as L

    dim, hidden = job["shape"]
    nseq, seq = job["tokens"]
    vocab = 256
    model = L.llama(vocab=vocab, dim=dim, depth=1, heads=job["heads"], hidden=hidden, seed=0)
    rng = np.random.default_rng(0)
    per_batch = max(1, min(nseq, 4))
    tokens = [rng.integers(0, vocab, size=(per_batch, seq)).astype(np.int32)
              for _ in range(-(-nseq // per_batch))]
    spec = LayerSpec(quant=Int(4, sym=False, search="minmax"), solver="gptq")
    rules = [(r"layers_0/.*", spec), (".*", None)]
    box = {}

    def fn():
        box["out"] = compress_blockwise(model, None, tokens, rules, blocks=r"layers_\d+",
                                        track_error=True)
        return box["out"].params

    _, first, steady, counters = _timed(fn, job["repeat"], log)
    out = box["out"]
    (block,) = out.blocks
    return {
        "first_s": first,
        "steady_s": steady,
        "err": block["rel_error"],
        "loss": out.summary.get("total/loss"),
        "layers": len(out.specs),
        "groups": block["groups"],
        "tokens": nseq * seq,
        "block_forwards": out.forwards.get("block_forwards"),
        "job_peak_bytes": out.memory.get("peak_bytes"),
        "job_added_peak_bytes": out.memory.get("added_peak_bytes"),
        "memory_source": out.memory.get("source"),
        **counters,
    }


_WORKER: dict = {}


def _write_row(fields: dict) -> None:
    """Write the worker's row (with the common fields) to its output file; a later call replaces
    it, so a worker killed after its first call still leaves that call's figures."""
    import jax

    if not _WORKER:
        return
    job = _WORKER["job"]
    peak, rss = _peaks()
    dev = jax.devices()[0]
    row = {
        "section": job["section"],
        "op": job["op"],
        "shape": job.get("shape"),
        **fields,
        "peak_bytes": peak,
        "peak_rss_bytes": rss,
        "repeat": job["repeat"],
        "device": getattr(dev, "device_kind", str(dev)),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "precision": _WORKER["precision"],
    }
    tmp = _WORKER["out"] + ".tmp"
    with open(tmp, "w") as f:
        json.dump(row, f)
    os.replace(tmp, _WORKER["out"])


def worker(job: dict, out_path: str, precision: str, cpu_devices: int) -> None:
    sys.path.insert(0, str(HERE))
    import jax

    _WORKER.update(job=job, out=out_path, precision=precision)

    if cpu_devices > 1:
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if precision != "default":
        jax.config.update("jax_default_matmul_precision", precision)
    import obcjax  # noqa: F401  (before switching the persistent cache off, in case it sets one)

    jax.config.update("jax_enable_compilation_cache", False)
    log = CompileLog()
    mesh = None
    if cpu_devices > 1 and job["section"] == "exactobs" and jax.default_backend() == "cpu":
        mesh = jax.make_mesh(
            (len(jax.devices()),), ("rows",), axis_types=(jax.sharding.AxisType.Auto,)
        )
    if job["section"] in ("exactobs", "fast"):
        row = _layer_job(job, log, mesh)
    elif job["section"] == "batching":
        row = _batching_job(job, log)
    elif job["section"] == "compress":
        row = _compress_job(job, log)
    elif job["section"] == "block":
        row = _block_job(job, log)
    else:
        raise ValueError(job["section"])
    _write_row(row)


# --------------------------------------------------------------------------------------------
# Parent: run the jobs, add the ratios, print rows
# --------------------------------------------------------------------------------------------


def _git_commit():
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:  # noqa: BLE001
        return None


def _git_dirty():
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "obcjax"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        return bool(out.strip())
    except Exception:  # noqa: BLE001
        return None


def _git_diff_sha():
    """SHA-1 of ``git diff HEAD -- obcjax`` (None when clean): which uncommitted library ran."""
    try:
        import hashlib

        out = subprocess.run(
            ["git", "diff", "HEAD", "--", "obcjax"],
            cwd=ROOT,
            capture_output=True,
            timeout=30,
        ).stdout
        return hashlib.sha1(out).hexdigest()[:12] if out.strip() else None
    except Exception:  # noqa: BLE001
        return None


def run_job(job, args, timeout):
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "row.json")
        cmd = [
            sys.executable,
            str(pathlib.Path(__file__).resolve()),
            "--worker",
            json.dumps(job),
            "--worker-out",
            out,
            "--precision",
            args.precision,
            "--cpu-devices",
            str(args.cpu_devices),
        ]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), env.get("PYTHONPATH", "")])
        t = time.perf_counter()
        try:
            p = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env
            )
            wall = time.perf_counter() - t
            if p.returncode == 0 and os.path.exists(out):
                with open(out) as f:
                    row = json.load(f)
                row["worker_wall_s"] = round(wall, 3)
                return row
            err = (p.stderr or p.stdout).strip().splitlines()[-8:]
            why = f"exit {p.returncode}: " + " | ".join(err)
        except subprocess.TimeoutExpired:
            wall = time.perf_counter() - t
            why = f"timed out after {timeout:.0f} s"
        if os.path.exists(out):  # the first call finished: keep its figures
            with open(out) as f:
                row = json.load(f)
            row.update(error=why, worker_wall_s=round(wall, 3))
            return row
        return _failed(job, why, wall)


def _failed(job, why, wall):
    return {
        "section": job["section"],
        "op": job["op"],
        "shape": job.get("shape"),
        "first_s": None,
        "steady_s": None,
        "err": None,
        "compiles": None,
        "peak_bytes": None,
        "device": None,
        "backend": None,
        "jax": None,
        "error": why,
        "worker_wall_s": round(wall, 3),
    }


def _add_anchor(row, profile_name):
    if row["section"] not in ("exactobs", "fast") or row.get("first_s") is None:
        return
    table = ANCHOR_H100 if row.get("backend") == "gpu" else ANCHOR_CPU
    where = "H100 (ANCHORS.md)" if table is ANCHOR_H100 else "2 CPU cores (ANCHORS.md side by side)"
    op = "exactobs_db" if row["op"] == "exactobs_db" else row["op"]
    ref = table.get((op, _shape_str(row["shape"])))
    if ref is None:
        return
    row["anchor"] = {"time_s": ref[0], "err": ref[1], "machine": where}
    row["vs_anchor_first"] = ref[0] / row["first_s"]
    if row.get("steady_s"):
        row["vs_anchor_steady"] = ref[0] / row["steady_s"]


def _add_speedups(row, done):
    if row["section"] != "batching" or not row["op"].endswith(" vmap") or row["first_s"] is None:
        return
    base = row["op"][: -len(" vmap")]
    for variant in ("loop", "loop_jit"):
        other = next(
            (
                r
                for r in done
                if r["op"] == f"{base} {variant}"
                and r["shape"] == row["shape"]
                and r.get("first_s") is not None
            ),
            None,
        )
        if other is None:
            continue
        row[f"speedup_first_vs_{variant}"] = other["first_s"] / row["first_s"]
        if other.get("steady_s") and row.get("steady_s"):
            row[f"speedup_steady_vs_{variant}"] = other["steady_s"] / row["steady_s"]


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Usage:")[1],
    )
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--device", action="store_true", help="one GPU (H100): ANCHORS.md shapes, < 8 min"
    )
    g.add_argument("--cpu-small", action="store_true", help="CPU-sized shapes (default), minutes")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a ~1 minute smoke run")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"subset of {SECTIONS}")
    ap.add_argument(
        "--filter",
        default=None,
        help="regex: run only the jobs whose 'section op RxC' it finds (re.search)",
    )
    ap.add_argument(
        "--compress",
        default=None,
        help="MODEL:RECIPE list for the compress section (models lenet5, minilm; recipes "
        f"{', '.join(COMPRESS_RECIPES)}), replacing the profile's",
    )
    ap.add_argument("--out", default=None, help="also write every row (JSON lines) to this file")
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole run; jobs that no longer fit are skipped "
        "(default: 450 for --device, 1800 for --cpu-small, 240 with --quick)",
    )
    ap.add_argument("--job-timeout", type=float, default=300.0, help="seconds per worker")
    ap.add_argument(
        "--precision",
        default="highest",
        choices=["highest", "high", "default"],
        help="jax_default_matmul_precision in the workers (ANCHORS.md: fp32, TF32 off)",
    )
    ap.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="on CPU, split the exactobs rows over this many devices (shard_map)",
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker is not None:
        worker(json.loads(args.worker), args.worker_out, args.precision, args.cpu_devices)
        return 0

    name = "device" if args.device else "cpu-small"
    profile = dict(PROFILES[name])
    if args.quick:
        profile.update(QUICK)
    if args.budget is not None:
        profile["budget_s"] = args.budget
    if args.compress:
        pairs = [tuple(x.strip().split(":")) for x in args.compress.split(",") if x.strip()]
        bad = [
            p
            for p in pairs
            if len(p) != 2 or p[0] not in ("lenet5", "minilm") or p[1] not in COMPRESS_RECIPES
        ]
        if bad:
            ap.error(
                f"--compress: {bad} not MODEL:RECIPE with MODEL in lenet5, minilm and "
                f"RECIPE in {COMPRESS_RECIPES}"
            )
        profile["compress"] = pairs
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"--sections: unknown {bad}; choose among {SECTIONS}")
    jobs = build_jobs(profile, sections)
    if args.filter:
        import re

        key = lambda j: f"{j['section']} {j['op']} {_shape_str(j.get('shape') or [])}"  # noqa: E731
        jobs = [j for j in jobs if re.search(args.filter, key(j))]

    t0 = time.perf_counter()
    meta = {
        "section": "meta",
        "profile": name + (" --quick" if args.quick else ""),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "obcjax_dirty": _git_dirty(),
        "obcjax_diff_sha": _git_diff_sha(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "python": platform.python_version(),
        "precision": args.precision,
        "cpu_devices": args.cpu_devices,
        "jobs": len(jobs),
        "budget_s": profile["budget_s"],
    }
    out_f = open(args.out, "w") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if out_f:
            out_f.write(line + "\n")
            out_f.flush()

    emit(meta)
    done = []
    budget = profile["budget_s"]
    present = [s for s in SECTIONS if any(j["section"] == s for j in jobs)]
    total = sum(SHARES[s] for s in present) or 1.0
    deadline, acc = {}, 0.0
    for s in present:
        acc += SHARES[s] / total
        deadline[s] = acc * budget
    for job in jobs:
        now = time.perf_counter() - t0
        left = min(budget, deadline[job["section"]] + 30.0) - now
        if budget - now < 20 or deadline[job["section"]] - now < 5:
            row = _failed(job, "skipped: the time budget of its section is spent", 0.0)
        else:
            load1 = os.getloadavg()[0]
            row = run_job(job, args, min(args.job_timeout, left))
            row["load1"] = load1
        _add_anchor(row, name)
        _add_speedups(row, done)
        done.append(row)
        emit(row)
    emit(
        {
            "section": "end",
            "wall_s": time.perf_counter() - t0,
            "failed": sum(1 for r in done if r.get("error")),
        }
    )
    if out_f:
        out_f.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
