"""Whole-model sequential vs block-wise compression: forward passes and wall time against depth.

For each depth, a :mod:`obcjax.zoo.llama` decoder (CPU-sized width) is compressed with GPTQ 4-bit
on every block projection by :func:`obcjax.pipeline.compress_sequential` (the whole model rerun for
each layer) and by :func:`obcjax.blockwise.compress_blockwise` (each block run ``groups + 1`` times).
Block executions are **counted**, not derived: every block of the benchmarked model calls a host
callback on its output (so XLA cannot drop it), once per execution per batch. Where both modes run,
the row also says how close their results are (largest parameter difference, fraction of equal
4-bit codes). One JSON object per line::

    python benchmarks/bench_blockwise.py [--depths 4,8,16] [--dim 32] [--quick]
        [--sequential-max-depth 16] [--out rows.jsonl]

Each mode's time includes its compilations (run in one process: later depths reuse what earlier
ones compiled, as a user's session would). Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from obcjax.blockwise import compress_blockwise
from obcjax.pipeline import compress_sequential
from obcjax.specs import Int
from obcjax.transforms import LayerSpec
from obcjax.zoo import llama as L

_EXEC = [0]


def _count(_):
    _EXEC[0] += 1


class CountingBlock(L.Block):
    """A Llama block that counts its executions."""

    def __call__(self, x, cos, sin):
        y = super().__call__(x, cos, sin)
        jax.debug.callback(_count, y.sum())
        return y


def counting_llama(cfg: L.LlamaConfig, seed: int = 0) -> L.Llama:
    model = L.Llama(cfg, rngs=nnx.Rngs(seed))
    for i in range(cfg.depth):
        setattr(model, f"layers_{i}", CountingBlock(cfg, rngs=nnx.Rngs(seed + 1 + i)))
    return model


def _codes(c, p):
    q = c.qarray(p) if hasattr(c, "qarray") else c.qarrays[p]
    qs = q if isinstance(q, list) else [q]
    return np.concatenate([np.asarray(x.codes).ravel() for x in qs])


def _measure(fn):
    _EXEC[0] = 0
    t = time.perf_counter()
    out = fn()
    jax.effects_barrier()
    return out, time.perf_counter() - t, _EXEC[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depths", default="4,8,16")
    ap.add_argument("--dim", type=int, default=32)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--sequential-max-depth", type=int, default=16)
    ap.add_argument("--quick", action="store_true", help="depths 2,4 at width 16")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.depths, args.dim, args.heads = "2,4", 16, 2
    rules = [("lm_head", None), (".*", LayerSpec(quant=Int(4), solver="gptq"))]
    tokens = L.token_batches(L.markov_chain(args.vocab, seed=0), n_batches=args.batches,
                             batch_size=args.batch_size, seq_len=args.seq, seed=1)
    sink = open(args.out, "a") if args.out else None

    def emit(row):
        line = json.dumps(row)
        print(line, flush=True)
        if sink:
            sink.write(line + "\n")
            sink.flush()

    emit({"meta": True, "device": str(jax.devices()[0]), "backend": jax.default_backend(),
          "loadavg": os.getloadavg(), **{k: v for k, v in vars(args).items() if k != "out"}})
    for depth in [int(d) for d in args.depths.split(",")]:
        cfg = L.LlamaConfig(vocab=args.vocab, dim=args.dim, depth=depth, heads=args.heads)
        model = counting_llama(cfg)
        base = {"depth": depth, "dim": args.dim, "hidden": cfg.mlp_hidden,
                "batches": args.batches}
        bw, bw_s, bw_n = _measure(lambda: compress_blockwise(
            model, None, tokens, rules, blocks=r"layers_\d+"))
        emit({**base, "mode": "blockwise", "seconds": round(bw_s, 2),
              "block_executions": bw_n, "per_batch": bw_n / args.batches,
              "model_forward_equivalents": bw_n / args.batches / depth,
              "peak_bytes": bw.memory["peak_bytes"], "memory_source": bw.memory["source"]})
        if depth > args.sequential_max_depth:
            continue
        sq, sq_s, sq_n = _measure(lambda: compress_sequential(model, None, tokens, rules))
        diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                   for a, b in zip(jax.tree.leaves(bw.params), jax.tree.leaves(sq.params),
                                   strict=True))
        agree = float(np.mean(np.concatenate(
            [_codes(bw.compressed, p) == _codes(sq, p) for p in sq.specs])))
        emit({**base, "mode": "sequential", "seconds": round(sq_s, 2),
              "block_executions": sq_n, "per_batch": sq_n / args.batches,
              "model_forward_equivalents": sq_n / args.batches / depth,
              "speedup_blockwise": round(sq_s / bw_s, 2),
              "max_abs_param_diff_vs_blockwise": diff, "codes_equal_fraction": agree})
    if sink:
        sink.close()


if __name__ == "__main__":
    main()
