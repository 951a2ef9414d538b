"""MiniLM calibrated for the text it will see: in-domain vs cross-domain fidelity (issue 20, item 6).

all-MiniLM-L6-v2 (the zoo's pretrained weights) is compressed with GPTQ 4-bit (asymmetric,
groups of 128), 2:4 SparseGPT and 50 % SparseGPT on every encoder Dense layer (36 matrices), from
one of several calibration sets (:data:`CALIBS`; all but ``in-domain`` are drawn by
:func:`obcjax.zoo.text.english_corpus`, sentences dealt round-robin from their sources, never any
held-out sentence below):

* ``in-domain``: the corpus of :func:`obcjax.zoo.data.text_corpus` (the language reference and
  standard-library docstrings: text about Python);
* ``mixed``: the technical sources (package READMEs, licences, the email package's notes and
  messages, scikit-learn's data-set descriptions, the language reference, docstrings, the Zen);
* ``english``: the natural English of :data:`obcjax.zoo.text.NATURAL` (news, Wikipedia, movie
  reviews), the default of ``obcjax compress --model minilm``; ``all``: both;
* ``english-no-news`` / ``english-no-wiki`` and ``all-no-news`` / ``all-no-wiki``: the same
  without the news / Wikipedia source, so that source is a held-out natural-English domain;

and evaluated on four held-out sets (:data:`TESTS`):

* ``in-domain``: the held-out split of ``text_corpus`` (same sources as the in-domain
  calibration, other sentences);
* ``idle``: IDLE's user documentation (``idlelib``'s help page, README, history, news), a source
  that no calibration set draws from;
* ``news``: the Lee corpus of Australian news stories; ``wikipedia``: Wikipedia articles. A
  figure is cross-domain where the calibration set does not draw from the held-out set's source
  (the table marks the others with ``*``: same source, other sentences).

Fidelity is the mean cosine of the sentence embeddings to the dense model's (and the worst
sentence's, and top-1 retrieval agreement). Variants: one-pass (every layer from the dense
model's statistics, OBC) and sequential (GPTQ/SparseGPT: each layer group calibrated on the
compressed prefix's outputs), and for GPTQ act-order (with static groups). RTN and magnitude
pruning are the calibration-free baselines. Rows go to ``<out>/minilm_text.json`` as they finish
and a rerun with the same setup skips them (``--fresh`` starts over)::

    python experiments/minilm_text.py --out runs/minilm_text [--quick] [--ncalib 1024]
        [--levels w4g128,nm24,s50] [--calib in-domain,english-no-news,...]
        [--variants one-pass,act-order,...]

Measured (1024 calibration sentences, 256 held-out per set, mean cosine; ``--calib
in-domain,mixed,english-no-news,english-no-wiki,all-no-news,all-no-wiki --levels
w4g128,nm24,s50 --variants one-pass,act-order``), on the natural source each set leaves out:

==================  =========  ==============  =========  ===========  =============
calibration         held out   GPTQ w4g128     + act-ord  2:4 SparseGPT 50% SparseGPT
==================  =========  ==============  =========  ===========  =============
english-no-news     news       0.9840          0.9877     0.8643       0.9213
english-no-wiki     wikipedia  0.9837          0.9873     0.8594       0.9197
all-no-news         news       0.9826          0.9860     0.8478       0.9105
all-no-wiki         wikipedia  0.9836          0.9868     0.8529       0.9165
mixed               news       0.9779          0.9815     0.8126       0.8875
in-domain           news       0.9736          0.9765     0.7856       0.8649
in-domain           wikipedia  0.9761          0.9798     0.8059       0.8874
(RTN / magnitude)   news       0.9543                     0.5965       0.7123
==================  =========  ==============  =========  ===========  =============

Natural-English calibration costs fidelity on technical text (the Python corpus's held-out
split: 0.9830 for english-no-news with act-order, 0.9900 for all-no-news, 0.9914 for
in-domain). With act-order, news held out, English calibration: 128 sentences 0.9843, 256
0.9861, 512 0.9872, 1024 0.9877; sequential mode at 256 sentences 0.9860 (no gain, 5x the time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

LEVELS = {"w4g128": (None, 4), "nm24": ("2:4", None), "s50": ("0.5", None)}
_TECHNICAL = ("zen", "reference", "docstrings", "licenses", "readmes", "email", "datasets")
#: calibration set -> its text sources (None: the in-domain corpus's calibration split)
CALIBS = {
    "in-domain": None,
    "mixed": _TECHNICAL,
    "english": ("news", "wikipedia", "reviews"),
    "all": (*_TECHNICAL, "news", "wikipedia", "reviews"),
    "english-no-news": ("wikipedia", "reviews"),
    "english-no-wiki": ("news", "reviews"),
    "all-no-news": (*_TECHNICAL, "wikipedia", "reviews"),
    "all-no-wiki": (*_TECHNICAL, "news", "reviews"),
}
DEFAULT_CALIBS = (
    "in-domain",
    "mixed",
    "english-no-news",
    "english-no-wiki",
    "all-no-news",
    "all-no-wiki",
)
# variant -> (mode, act_order); act-order applies to quantization only
VARIANTS = {
    "one-pass": ("one-pass", False),
    "sequential": ("sequential", False),
    "act-order": ("one-pass", True),
    "sequential+act-order": ("sequential", True),
}
TESTS = ("in-domain", "idle", "news", "wikipedia")


def _log(msg: str) -> None:
    print(msg, flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/minilm_text")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small: 64 calibration / 64 held-out sentences, GPTQ 4-bit g128 one-pass only, "
        "calibrated on in-domain and english-no-news",
    )
    ap.add_argument("--ncalib", type=int, default=None, help="calibration sentences (1024)")
    ap.add_argument("--ntest", type=int, default=None, help="held-out sentences per set (256)")
    ap.add_argument("--levels", default=None, help=f"comma list among {','.join(LEVELS)}")
    ap.add_argument(
        "--calib",
        default=None,
        help=f"comma list among {','.join(CALIBS)} (default {','.join(DEFAULT_CALIBS)})",
    )
    ap.add_argument(
        "--variants",
        default=None,
        help=f"comma list among {','.join(VARIANTS)} (default one-pass,act-order: the sequential "
        "ones recalibrate 24 times)",
    )
    ap.add_argument("--no-baselines", action="store_true", help="skip RTN / magnitude rows")
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument("--fresh", action="store_true", help="discard rows of an earlier run")
    args = ap.parse_args(argv)

    levels = (args.levels or ("w4g128" if args.quick else ",".join(LEVELS))).split(",")
    calibs = (
        args.calib or ("in-domain,english-no-news" if args.quick else ",".join(DEFAULT_CALIBS))
    ).split(",")
    variants = (args.variants or ("one-pass" if args.quick else "one-pass,act-order")).split(",")
    for name, got, allowed in (
        ("--levels", levels, LEVELS),
        ("--calib", calibs, CALIBS),
        ("--variants", variants, VARIANTS),
    ):
        bad = [x for x in got if x not in allowed]
        if bad:
            ap.error(f"{name}: {bad} not among {list(allowed)}")
    ncal = args.ncalib or (64 if args.quick else 1024)
    ntest = args.ntest or (64 if args.quick else 256)
    if ncal < 1 or ntest < 3:
        ap.error("--ncalib must be >= 1 and --ntest >= 3")

    import jax
    import numpy as np

    from obcjax.recipes import minilm as mc
    from obcjax.zoo import minilm, text

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_enable_async_dispatch", False)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "minilm_text.json"
    setup = {
        "ncalib": ncal,
        "ntest": ntest,
        "seed": 0,
        "rel_damp": args.rel_damp,
        "tests": list(TESTS),
    }
    result = {"setup": setup, "rows": []}
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
    # (the in-domain corpus holds ~1100 calibration sentences: only cut them when asked for)
    in_calib, in_test = mc.corpus_split(ncal if "in-domain" in calibs else 1, ntest)
    # A held-out set depends only on its source and the seed (english_corpus draws it first).
    test_sets = {"in-domain": in_test}
    for t in TESTS[1:]:
        test_sets[t] = text.english_corpus(["zen"], [t], ncalib=1, ntest=ntest)["test"]
    held = {s for sents in test_sets.values() for s in sents}
    calib_sets, corpora = ({"in-domain": in_calib} if "in-domain" in calibs else {}), {}
    for c in calibs:
        if CALIBS[c] is not None:
            got = text.english_corpus(CALIBS[c], text.HELD_OUT, ncalib=ncal, ntest=1, exclude=held)
            calib_sets[c] = got["calib"]
            corpora[c] = {"calib_sources": got["calib_sources"], "calib": len(got["calib"])}
    overlap = {
        (c, t): len(set(calib_sets[c]) & set(test_sets[t])) for c in calib_sets for t in test_sets
    }
    assert not any(overlap.values()), f"calibration and held-out sentences overlap: {overlap}"
    result["corpora"] = {
        "in-domain": {
            "sources": list(text.IN_DOMAIN),
            "calib": len(calib_sets.get("in-domain", [])),
            "test": len(in_test),
        },
        **corpora,
        "tests": {t: len(s) for t, s in test_sets.items()},
        "examples": {
            **{f"calib:{k}": v[:3] for k, v in calib_sets.items()},
            **{f"test:{k}": v[:3] for k, v in test_sets.items()},
        },
    }
    refs = {
        t: np.asarray(minilm.encode(model, variables, tokenizer, s)) for t, s in test_sets.items()
    }
    _log(
        f"MiniLM loaded; calibration sets {', '.join(f'{k}: {len(v)}' for k, v in calib_sets.items())}"
        f"; held-out {', '.join(f'{k}: {len(v)}' for k, v in test_sets.items())} "
        f"({time.perf_counter() - t0:.1f}s)"
    )
    layers = mc.encoder_layers(model.config.num_layers)

    def spec_of(level, solver):
        prune, bits = LEVELS[level]
        return mc.level_spec(
            mc.parse_prune(prune), bits, group=128 if bits else None, solver=solver
        )

    def evaluate(params):
        v = {**variables, "params": params}
        return {
            t: dataclasses.asdict(mc.compare_embeddings(model, v, tokenizer, s, refs[t]))
            for t, s in test_sets.items()
        }

    def log_row(row):
        cos = "  ".join(f"{t} {row['eval'][t]['cosine']:.4f}" for t in TESTS)
        cos += "  retrieval " + " ".join(f"{row['eval'][t]['retrieval']:.3f}" for t in TESTS)
        _log(
            f"{row['calib']:15s} {row['method']:10s} {row['level']:8s} {row['variant']:21s} "
            f"{cos}  ({row['seconds']:.0f}s)"
        )

    done = {(r["calib"], r["level_key"], r["variant"]) for r in result["rows"]}
    baselines = [] if args.no_baselines else [lv for lv in levels if ("none", lv, "-") not in done]

    for calib in calibs:
        batches = mc.calibration_batches(tokenizer, calib_sets[calib])
        stats = None
        if baselines or any(VARIANTS[v][0] == "one-pass" for v in variants):
            t = time.perf_counter()
            stats = mc.calibrate_minilm(model, variables, batches, layers=layers)
            result.setdefault("calibration_seconds", {})[calib] = time.perf_counter() - t
        # calibration-free baselines (RTN, magnitude): the statistics are not used
        for level in baselines:
            spec = spec_of(level, "magnitude")
            t = time.perf_counter()
            res = mc.compress_minilm(model, variables, spec, stats=stats, layers=layers)
            row = {
                "calib": "none",
                "level_key": level,
                "level": spec.name,
                "method": mc.method_label(spec),
                "variant": "-",
                "seconds": time.perf_counter() - t,
                "eval": evaluate(res.params),
            }
            result["rows"].append(row)
            save()
            log_row(row)
        baselines = []
        for level in levels:
            for variant in variants:
                mode, act_order = VARIANTS[variant]
                if act_order and LEVELS[level][1] is None:
                    continue  # act-order is a quantization option
                if (calib, level, variant) in done:
                    continue
                spec = spec_of(level, "gptq")
                t, c = time.perf_counter(), time.process_time()
                res = mc.compress_minilm(
                    model,
                    variables,
                    spec,
                    stats=stats,
                    batches=batches,
                    mode=mode,
                    act_order=act_order,
                    static_groups=act_order,
                    rel_damp=args.rel_damp,
                    layers=layers,
                )
                jax.block_until_ready(res.params)
                row = {
                    "calib": calib,
                    "level_key": level,
                    "level": spec.name,
                    "method": mc.method_label(spec),
                    "variant": variant,
                    "mode": mode,
                    "act_order": act_order,
                    "seconds": time.perf_counter() - t,
                    "cpu_seconds": time.process_time() - c,
                    "loss": res.summary["total/loss"],
                    "eval": evaluate(res.params),
                }
                result["rows"].append(row)
                save()
                log_row(row)

    def cell(r, t):
        # '*': the calibration set draws from the held-out set's source (other sentences)
        srcs = set(CALIBS.get(r["calib"]) or text.IN_DOMAIN) if r["calib"] != "none" else set()
        same = bool(srcs & set(text.IN_DOMAIN if t == "in-domain" else (t,)))
        ev = r["eval"][t]
        return f"{ev['cosine']:.4f}/{ev['retrieval']:.3f}{'*' if same else ' '}"

    _log(
        f"\n{'calib':15s}  {'method':10s}  {'level':8s}  {'variant':21s}  "
        + "  ".join(f"{t:>13s}" for t in TESTS)
        + "   (mean cosine/top-1 retrieval; *: same source as calibration)"
    )
    for r in result["rows"]:
        _log(
            f"{r['calib']:15s}  {r['method']:10s}  {r['level']:8s}  {r['variant']:21s}  "
            + "  ".join(f"{cell(r, t):>13s}" for t in TESTS)
        )
    _log(f"wrote {json_path} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
