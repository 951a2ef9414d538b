"""Block-wise compression of the zoo's Llama-shaped decoder (issue 19).

A :mod:`obcjax.zoo.llama` decoder is trained briefly on a Markov-chain token stream, then
compressed block by block (:func:`obcjax.blockwise.compress_blockwise`) with

* ``gptq_w4``: GPTQ 4-bit on every block projection,
* ``sparsegpt_2:4``: SparseGPT 2:4 on every block projection,
* ``exactobs_attn_50``: ExactOBS 50 % unstructured on the attention projections only,

each with and without offloading. Reported per block: wall time, the relative error of the block's
output in the compressed model against the dense model (``track_error``) and the device memory
after it; per run: the peak device memory (allocator statistics on a GPU/TPU, live JAX arrays on a
CPU, see :func:`obcjax.blockwise.device_memory`), the forward counts, and the next-token loss and
relative logit error of the compressed model on held-out sequences. ``lm_head`` and the embedding
stay dense. Rows go to ``<out>/decoder_blockwise.json``::

    python experiments/decoder_blockwise.py --out runs/decoder_blockwise [--quick]
        [--methods gptq_w4,sparsegpt_2:4,exactobs_attn_50] [--depth 8 --dim 128]
        [--minilm [--minilm-sentences 32]]     # MiniLM: block-wise vs whole-model sequential
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from obcjax.blockwise import compress_blockwise
from obcjax.specs import NM, Int, Unstructured
from obcjax.transforms import LayerSpec
from obcjax.zoo import llama as L

METHODS = {
    "gptq_w4": [("lm_head", None), (".*", LayerSpec(quant=Int(4), solver="gptq"))],
    "sparsegpt_2:4": [("lm_head", None), (".*", LayerSpec(prune=NM(2, 4), solver="gptq"))],
    "exactobs_attn_50": [(r".*attn/.*", LayerSpec(prune=Unstructured(0.5), solver="obc")),
                         (".*", None)],
}


def _eval(model, params, tokens):
    """Next-token loss of the model with ``params``, and its logits."""
    m = nnx.clone(model)
    nnx.update(m, jax.tree.map(jnp.asarray, params))
    logits = jax.jit(lambda t: m(t))(tokens)
    return float(L.next_token_loss(m, tokens)), np.asarray(logits)


def run(args) -> dict:
    cfg = L.LlamaConfig(vocab=args.vocab, dim=args.dim, depth=args.depth, heads=args.heads)
    chain = L.markov_chain(cfg.vocab, seed=0)
    model = L.llama(cfg, seed=0)
    train_data = L.token_batches(chain, n_batches=8, batch_size=16, seq_len=args.seq, seed=10)
    t0 = time.perf_counter()
    losses = L.train(model, train_data, steps=args.train_steps) if args.train_steps else []
    train_s = time.perf_counter() - t0
    calib = L.token_batches(chain, n_batches=args.batches, batch_size=args.batch_size,
                            seq_len=args.seq, seed=1)
    held = L.token_batches(chain, n_batches=1, batch_size=32, seq_len=args.seq, seed=2)[0]
    dense_params = nnx.state(model, nnx.Param).to_pure_dict()
    dense_loss, dense_logits = _eval(model, dense_params, held)
    report = {
        "config": {**vars(args), "mlp_hidden": cfg.mlp_hidden,
                   "params": int(sum(np.size(a) for a in jax.tree.leaves(dense_params)))},
        "device": str(jax.devices()[0]), "backend": jax.default_backend(),
        "train": {"steps": args.train_steps, "seconds": train_s,
                  "first_loss": losses[0] if losses else None,
                  "last_loss": losses[-1] if losses else None},
        "dense_heldout_loss": dense_loss,
        "rows": [],
    }
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}), flush=True)
    for name in args.methods.split(","):
        for offload in (False, True):
            t = time.perf_counter()
            out = compress_blockwise(model, None, calib, METHODS[name], blocks=r"layers_\d+",
                                     offload=offload, track_error=True)
            wall = time.perf_counter() - t
            loss, logits = _eval(model, out.params, held)
            row = {
                "method": name, "offload": offload, "seconds": wall,
                "peak_device_bytes": out.memory["peak_bytes"],
                "added_peak_device_bytes": out.memory["added_peak_bytes"],
                "memory_source": out.memory["source"],
                "device_peak_bytes_in_use": out.memory["device_peak_bytes_in_use"],
                "forwards": out.forwards,
                "heldout_loss": loss,
                "logits_rel_error": float(np.linalg.norm(logits - dense_logits)
                                          / np.linalg.norm(dense_logits)),
                "blocks": [{"path": b["path"], "seconds": round(b["seconds"], 3),
                            "rel_error": b["rel_error"],
                            "live_bytes": b["memory"]["live_array_bytes"],
                            "bytes_in_use": b["memory"]["bytes_in_use"]} for b in out.blocks],
            }
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            del out
            gc.collect()
    return report


def minilm(args) -> dict:
    """all-MiniLM-L6-v2 (Linen), GPTQ 4-bit on the 36 encoder Dense layers: block-wise (blocks
    ``layer_i``) against whole-model sequential mode on the same calibration sentences."""
    from obcjax.pipeline import compress_sequential
    from obcjax.zoo import data as D
    from obcjax.zoo import minilm as M

    model, variables, tok = M.load_minilm()
    sents = D.text_corpus(seed=0, per_split=max(args.minilm_sentences, 32))["calib"]
    sents = sents[: args.minilm_sentences]
    batches = []
    for i in range(0, len(sents), 16):
        ids, mask, _ = M.tokenize(tok, sents[i:i + 16], max_len=64)
        batches.append((ids, mask))

    def fwd(m, b):
        return m(b[0], b[1])

    from obcjax.recipes import minilm as R

    # GPTQ 4-bit with GPTQ's grid (asymmetric, min-max, one per output row), as the recipe's
    spec = R.level_spec(bits=4, group=None, solver="gptq")
    rules = [(r"layer_\d+/.*", spec), (".*", None)]
    t = time.perf_counter()
    bw = compress_blockwise(model, variables, batches, rules, blocks=r"layer_\d+", forward=fwd,
                            layer_types=("Dense",))
    bw_s = time.perf_counter() - t
    t = time.perf_counter()
    sq = compress_sequential(model, variables, batches, rules, forward=fwd)
    sq_s = time.perf_counter() - t
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
               for a, b in zip(jax.tree.leaves(bw.params), jax.tree.leaves(sq.params), strict=True))

    def codes(c, p):
        q = c.qarray(p) if hasattr(c, "qarray") else c.qarrays[p]
        qs = q if isinstance(q, list) else [q]
        return np.concatenate([np.asarray(x.codes).ravel() for x in qs])

    agree = float(np.mean(np.concatenate([codes(bw.compressed, p) == codes(sq, p)
                                          for p in sq.specs])))
    # GPTQ feeds each column's rounding error into the columns after it, so one code moved by
    # float32 round-off (a value at a rounding tie) moves later codes of its row: agreement is
    # reported per layer (forward order) and the layer losses side by side.
    by_layer = {p: float(np.mean(codes(bw.compressed, p) == codes(sq, p))) for p in sq.specs}
    loss_ratio = {p: float(bw.losses[p]) / max(float(sq.losses[p]), 1e-30) for p in sq.specs}
    # Fidelity on held-out sentences: both modes, and the MiniLM recipe's own sequential mode
    # (GPTQ-style layer groups, statistics over the real tokens only: padding rows zeroed).
    test = D.text_corpus(seed=0, per_split=max(args.minilm_sentences, 128))["test"][:128]
    ref = np.asarray(M.encode(model, variables, tok, test))
    t = time.perf_counter()
    rb = R.calibration_batches(tok, sents, batch_size=16, max_len=64)
    recipe = R.compress_minilm(model, variables, spec, batches=rb, mode="sequential")
    recipe_s = time.perf_counter() - t
    cosine = {name: R.compare_embeddings(model, {**variables, "params": p}, tok, test, ref).cosine
              for name, p in (("blockwise", bw.params), ("sequential", sq.params),
                              ("recipe_sequential", recipe.params))}
    row = {"model": "all-MiniLM-L6-v2", "spec": "gptq_w4", "layers": len(sq.specs),
           "sentences": len(sents), "blockwise_s": bw_s, "sequential_s": sq_s,
           "recipe_sequential_s": recipe_s,
           "blockwise_forwards": bw.forwards, "sequential_forwards": len(sq.specs) + 1,
           "max_abs_param_diff": diff, "codes_equal_fraction": agree,
           "codes_equal_by_layer": by_layer, "layer_loss_ratio_blockwise_over_sequential":
           loss_ratio,
           "held_out_cosine": cosine, "held_out_sentences": len(test),
           "groups": bw.blocks[0]["groups"]}
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/decoder_blockwise")
    ap.add_argument("--quick", action="store_true", help="a tiny decoder, seconds of work")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--depth", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=None)
    ap.add_argument("--seq", type=int, default=None)
    ap.add_argument("--batches", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--minilm", action="store_true",
                    help="also MiniLM: block-wise vs whole-model sequential (GPTQ 4-bit)")
    ap.add_argument("--minilm-sentences", type=int, default=32)
    args = ap.parse_args(argv)
    small = dict(depth=4, dim=32, vocab=64, seq=32, batches=2, train_steps=60)
    full = dict(depth=8, dim=128, vocab=256, seq=64, batches=8, train_steps=300)
    for k, v in (small if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    for name in filter(None, args.methods.split(",")):
        if name not in METHODS:
            ap.error(f"--methods: unknown method {name!r}; known: {sorted(METHODS)}")
    report = run(args) if args.methods else {}
    if args.minilm:
        report["minilm"] = minilm(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decoder_blockwise.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {out / 'decoder_blockwise.json'}", flush=True)


if __name__ == "__main__":
    main()
