"""FIT sensitivity and the FITCompress path search (joint per-layer bits + global pruning).

* :func:`fisher_diagonal`: the empirical Fisher diagonal ``F_i = (1/N) Σ_n (∂ℓ_n/∂w_i)²`` of every
  selected kernel, from true per-example gradients (``jax.vmap(jax.grad(...))``), streamed over
  batches with an early stop on the relative change of the running mean.
* :func:`fit_score`: FIT of a configuration, ``Σ_layers Σ_i F_i δw_i²``: quantization noise
  ``δw_i² = Δ_i²/12`` (``Δ_i`` = step of the grid of the weight's row for the layer's bits) on kept
  weights, ``δw_i = w_i`` on pruned ones.
* :func:`fit_search`: FITCompress's greedy path search. State = (bit index per layer into a
  descending schedule, one global pruning level on a log schedule); masks come from the global
  Fisher-weighted ranking ``F_i·w_i²``. ``rule="astar"`` (default, the paper): each child ``θ'`` of
  the current node costs ``f = g + sqrt(Σ F (θ − θ')²) + λ·|α' − α*|·sqrt(Σ F θ'²)``, the best
  child is expanded, the search stops at the first child within the size target.
  ``rule="ratio"`` (ours): the move with the smallest modelled ΔFIT per bit saved. Sizes count
  kept weights × bits, biases at 32 bits: the value bits of :mod:`obcjax.sizes` (the size of the
  compressed model adds its masks and grids; ``Compressed.summary`` gives both).
* :func:`apply_plan`: materialise a plan with its own Fisher masks and round-to-nearest
  (``solver="fit"``, :func:`prune_and_round`), or hand its per-layer specs to :func:`obcjax.transforms.compress`
  (``"obc"``: ExactOBS/OBQ, ``"magnitude"``, ``"gptq"``; needs calibration statistics).
* :func:`fit_database` / :func:`fit_dp` (hybrid): OBC's database + dynamic program
  (:mod:`obcjax.allocation`) with per-layer FIT scores in place of the OBS losses.
* :func:`finetune_plan`: the final quantization-aware fine-tuning of any model (a loss function,
  the compressed params, batches) with the mask and the per-row grids frozen
  (:func:`obcjax.training.finetune`, straight-through estimator); :func:`codebooks_of` turns a
  compressed model's grids into frozen codebooks. Zoo-bound drivers (``zoo_example_loss``,
  ``zoo_finetune_plan``) live in :mod:`obcjax.recipes.finetune`.
* :func:`activation_fisher` / :func:`activation_fit`: FIT's activation term ``Tr F(a)·Δ_a²/12``
  from per-example gradients w.r.t. layer inputs (the first layer's input, the data, skipped);
  :func:`activation_grids` gives the min-max activation grids it models.

:func:`fit_search` options: ``reestimate_every`` re-estimates the Fisher at the expanded node (as
the authors' code; the cost is reported), ``act`` adds FIT's activation term to the objective, and
``target_bops`` / ``target_bops_ratio`` constrain BOPs (:func:`obcjax.allocation.layer_bops`) next
to or instead of the size.

Differences from the papers (see shared/algorithms/joint-methods.md §1): by default the Fisher is
computed once at the float weights (the paper re-estimates it at each expanded node:
``reestimate_every=1``); the early stop is on
the relative change of the running estimate (the code's rule is the variance of per-batch
deviations); the search is greedy (beam 1); children are rounded from the float master weights
(as PQuantML); the noise model of :func:`fit_score` is Δ²/12 (``noise="actual"`` uses the real
rounding error), while the A* step cost uses the actual rounded weights.

References:
  Zandonati, Pol, Pierini, Sirkin, Kopetz. FIT: A Metric for Model Sensitivity. arXiv 2210.08502.
  Zandonati, Bucagu, Pol, Pierini, Sirkin, Kopetz. Towards Optimal Compression: Joint Pruning and
  Quantization (FITCompress). arXiv 2302.07612.

Example:
    >>> rng = np.random.default_rng(0)
    >>> params = {"fc1": {"kernel": jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)},
    ...           "fc2": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}}
    >>> def loss(p, x, y):                        # ONE example's loss, any model
    ...     logits = jnp.tanh(x @ p["fc1"]["kernel"]) @ p["fc2"]["kernel"]
    ...     return -jax.nn.log_softmax(logits)[y]
    >>> data = [(rng.normal(size=(32, 8)), rng.integers(0, 3, 32)) for _ in range(4)]
    >>> fisher = fisher_diagonal(loss, params, data)
    >>> plan = fit_search(params, fisher, target_ratio=0.1, bit_schedule=(8, 4))
    >>> out = apply_plan(params, plan)                        # or stats=..., solver="obc"
    >>> plan.size_bits <= plan.target_bits
    True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.capture import BoundModel, input_hook, layer_kinds
from obcjax.layout import Layout, from_matrices, set_path, to_matrices
from obcjax.quant import expand_params, find_params, make_qarray, quantize
from obcjax.sizes import as_ratio
from obcjax.specs import Int, Unstructured
from obcjax.transforms import (
    Compressed,
    LayerSpec,
    as_layer_spec,
    compress,
    find_layers,
)

__all__ = [
    "Fisher",
    "FITPlan",
    "fisher_diagonal",
    "quant_noise",
    "fisher_mask",
    "fit_score",
    "fit_search",
    "apply_plan",
    "prune_and_round",
    "prune_schedule",
    "fit_database",
    "fit_dp",
    "codebooks_of",
    "finetune_plan",
    "ActFisher",
    "activation_fisher",
    "activation_fit",
    "activation_grids",
    "TRACE_COUNTS",
]

#: Number of times each jitted kernel of this module was traced (for no-retrace checks).
TRACE_COUNTS: collections.Counter = collections.Counter()

# min-max grids: the noise tables need one grid per (layer, bits); the error search of
# Int's default would cost a compile each
_DEFAULT_GRID = Int(bits=8, search="minmax")


class Fisher(NamedTuple):
    """Empirical Fisher diagonal.

    Attributes:
      diag: ``{layer path: kernel-shaped float32 array}`` of mean squared per-example gradients.
      batches: batches consumed.
      examples: examples consumed.
      converged: True if the early stop fired (False: ``max_batches`` or data ran out).
      changes: relative change of the running mean after each batch (``inf`` for the first).
    """

    diag: dict[str, jax.Array]
    batches: int
    examples: int
    converged: bool
    changes: list[float]


# -- Fisher ---------------------------------------------------------------------------------------


def _select(params, rules, where: str) -> dict[str, jax.Array]:
    layers = find_layers(params)
    if isinstance(rules, str):
        rules = (rules,)
    out = {}
    for p, k in layers.items():
        if any(re.fullmatch(r, p) for r in rules):
            out[p] = k
    if not out:
        raise ValueError(
            f"{where}: no kernels matched rules {list(rules)}; the layers with a 'kernel' are "
            f"{sorted(layers)}"
        )
    return out


def _with_kernels(params, kernels: Mapping[str, Any]):
    """A copy of ``params`` whose layers' kernels are replaced (nested dicts copied on the path)."""
    for path, k in kernels.items():
        params = set_path(params, path, "kernel", k)
    return params


def _matrix_layout(shape) -> Layout:
    """Dense ``(in, out)`` / conv ``(..., in, out)``: every axis but the last is an input."""
    return Layout(tuple(shape), len(shape) - 1, 1)


@functools.lru_cache(maxsize=32)
def _fisher_step(loss_fn: Callable, paths: tuple[str, ...]):
    def step(params, kernels, x, y, w):
        TRACE_COUNTS["fisher_step"] += 1

        def one(kern, xi, yi):
            return loss_fn(_with_kernels(params, kern), xi, yi)

        g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(kernels, x, y)
        return {p: jnp.tensordot(w, g[p] * g[p], axes=1) for p in paths}

    return jax.jit(step)


def _split_batch(batch, i: int):
    if isinstance(batch, Mapping):
        x, y = batch.get("x"), batch.get("y")
    elif isinstance(batch, (tuple, list)) and len(batch) == 2:
        x, y = batch
    else:
        x, y = batch, None
    if y is None:
        raise ValueError(
            f"fisher_diagonal: batch {i} has no labels; the empirical Fisher needs (x, y) pairs "
            f"(a tuple or a dict with 'x' and 'y'), got {type(batch).__name__}"
        )
    x, y = np.asarray(x), np.asarray(y)
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"fisher_diagonal: batch {i} has {len(x)} inputs but {len(y)} labels")
    return x, y


def _padded_batch(batch, i: int, size: int | None, where: str):
    """``(x, y, weights, examples, size)``: batch ``i`` padded to the first batch's ``size``
    (padding rows repeat the first example with weight 0, so one compiled step serves all)."""
    x, y = _split_batch(batch, i)
    b = len(y)
    size = b if size is None else size
    if b > size:
        raise ValueError(
            f"{where}: batch {i} has {b} examples, more than the first batch ({size}); use "
            "batches of equal size (a smaller last one is fine)"
        )
    w = np.zeros(size, np.float32)
    w[:b] = 1.0
    if b < size:
        x = np.concatenate([x, np.repeat(x[:1], size - b, 0)])
        y = np.concatenate([y, np.repeat(y[:1], size - b, 0)])
    return x, y, w, b, size


def _converged(changes: list, cur, prev, t: int, min_batches: int, max_batches: int, tol: float):
    """``(converged, stop)`` after batch ``t``: appends the relative change of the running mean
    ``cur`` against ``prev`` to ``changes``; converged once it is below ``tol`` (from
    ``min_batches`` on), stop then or at ``max_batches``."""
    changes.append(_relative_change(cur, prev))
    converged = t >= min_batches and changes[-1] < tol
    return converged, converged or t >= max_batches


def _relative_change(cur, prev) -> float:
    """``||cur - prev|| / ||cur||`` of a running estimate (inf for the first batch), the early-stop
    signal of the Fisher estimates."""
    if prev is None:
        return math.inf
    denom = float(np.linalg.norm(cur))
    return float(np.linalg.norm(cur - prev)) / denom if denom > 0 else 0.0


def fisher_diagonal(
    loss_fn: Callable[[Any, Any, Any], jax.Array],
    params,
    batches: Iterable[Any],
    *,
    rules: Sequence[str] | str = (".*",),
    tol: float = 1e-3,
    min_batches: int = 2,
    max_batches: int = 100,
) -> Fisher:
    """Empirical Fisher diagonal of the selected kernels from per-example gradients.

    Every batch is padded to the size of the first one (padding rows have weight 0), so the jitted
    step is traced once. After batch ``t`` the running mean ``F_t`` is compared with ``F_{t-1}``:
    the estimate stops when ``‖F_t − F_{t−1}‖₂ / ‖F_t‖₂ < tol`` and ``t ≥ min_batches``.

    Args:
      loss_fn: ``loss_fn(params, x, y) -> scalar`` loss of ONE example (``x`` without batch axis,
        ``y`` its label); must be a stable object (it keys the jit cache): build it once (zoo
        models: :func:`obcjax.recipes.finetune.zoo_example_loss`).
      params: params pytree (nested dicts); kernels found by :func:`obcjax.transforms.find_layers`.
      batches: iterable of ``(x, y)`` pairs or ``{"x", "y"}`` dicts; ``x: (B, ...)``, ``y: (B,)``.
      rules: regexes (``re.fullmatch`` on layer paths) choosing the kernels.
      tol: early stop when the relative change of the running mean falls below this.
      min_batches: the fewest batches before the early stop may fire.
      max_batches: the most batches read.

    Returns:
      A :class:`Fisher`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(4, 2)).astype(np.float32)}}
        >>> def loss(p, x, y):                               # one example: x (4,), y (2,)
        ...     return jnp.sum((x @ p["fc1"]["kernel"] - y) ** 2)
        >>> data = [(rng.normal(size=(16, 4)), rng.normal(size=(16, 2))) for _ in range(3)]
        >>> f = fisher_diagonal(loss, params, data)
        >>> f.diag["fc1"].shape == params["fc1"]["kernel"].shape
        True
    """
    if not (tol >= 0):
        raise ValueError(f"fisher_diagonal: tol must be >= 0, got {tol!r}")
    if min_batches < 1 or max_batches < min_batches:
        raise ValueError(
            f"fisher_diagonal: need 1 <= min_batches <= max_batches, got {min_batches}, "
            f"{max_batches}"
        )
    kernels = _select(params, rules, "fisher_diagonal")
    paths = tuple(kernels)
    step = _fisher_step(loss_fn, paths)
    kern = {p: jnp.asarray(k) for p, k in kernels.items()}
    total = {p: np.zeros(k.shape, np.float64) for p, k in kern.items()}
    prev, size, n, t, converged, changes = None, None, 0, 0, False, []
    for t, batch in enumerate(batches, start=1):
        x, y, w, b, size = _padded_batch(batch, t - 1, size, "fisher_diagonal")
        out = step(params, kern, jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
        for p in paths:
            total[p] += np.asarray(out[p], np.float64)
        n += b
        cur = np.concatenate([total[p].ravel() for p in paths]) / n
        converged, stop = _converged(changes, cur, prev, t, min_batches, max_batches, tol)
        prev = cur
        if stop:
            break
    if n == 0:
        raise ValueError("fisher_diagonal: batches is empty")
    diag = {p: jnp.asarray(total[p] / n, jnp.float32) for p in paths}
    return Fisher(diag, t, n, converged, changes)


# -- FIT score ------------------------------------------------------------------------------------


def quant_noise(kernel, spec: Int) -> jax.Array:
    """Kernel-shaped expected squared rounding error ``Δ²/12`` of each weight on ``spec``'s grid.

    ``Δ`` is the grid step of the weight's row (channel), group or tensor, from
    :func:`obcjax.quant.find_params` on the kernel's ``(out, cols)`` matrix.
    """
    if not isinstance(spec, Int):
        raise TypeError(f"quant_noise: spec must be an Int, got {spec!r}")
    return _quant_noise(jnp.asarray(kernel, jnp.float32), spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _quant_noise(kernel, spec: Int) -> jax.Array:
    lay = _matrix_layout(kernel.shape)
    (W,) = to_matrices(kernel, lay)
    scale, _ = find_params(W, spec)
    s, _ = expand_params(scale, jnp.zeros_like(scale), W.shape[1])
    return from_matrices((s * s / 12.0)[None], lay)


def _rtn(kernel, spec: Int, mask=None) -> jax.Array:
    kernel = jnp.asarray(kernel, jnp.float32)
    if mask is not None:
        kernel = jnp.where(jnp.asarray(mask, bool), kernel, 0.0)
    return _rtn_jit(kernel, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def _rtn_jit(kernel, spec: Int) -> jax.Array:
    lay = _matrix_layout(kernel.shape)
    (W,) = to_matrices(kernel, lay)
    scale, zero = find_params(W, spec)
    s, z = expand_params(scale, zero, W.shape[1])
    return from_matrices(quantize(W, s, z, spec.bits)[None], lay)


def fisher_mask(F, w, sparsity: float, *, seed: int = 0) -> np.ndarray:
    """Kept-weight mask of one layer: the ``floor(s·n + 0.5)`` smallest ``F·w²`` are pruned.

    Ties are broken by a permutation drawn from ``seed``.
    """
    s = Unstructured(sparsity).sparsity
    sal = np.asarray(F, np.float64) * np.asarray(w, np.float64) ** 2
    k = int(math.floor(s * sal.size + 0.5))
    tie = np.random.default_rng(seed).permutation(sal.size)
    order = np.lexsort((tie, sal.ravel()))
    keep = np.ones(sal.size, bool)
    keep[order[:k]] = False
    return keep.reshape(sal.shape)


def _diag(fisher) -> Mapping[str, Any]:
    return fisher.diag if isinstance(fisher, Fisher) else fisher


def fit_score(
    fisher: Fisher | Mapping[str, Any],
    params,
    specs: Mapping[str, LayerSpec | None],
    *,
    masks: Mapping[str, Any] | None = None,
    noise: str = "model",
    per_layer: bool = False,
    per_parameter: bool = False,
    seed: int = 0,
) -> float | dict[str, Any]:
    """FIT of compressing ``params`` by ``specs``: ``Σ_l Σ_i F_i δw_i²``.

    Args:
      fisher: a :class:`Fisher` or ``{path: kernel-shaped diagonal}``.
      params: float params.
      specs: ``{path: LayerSpec}`` (None or a dense spec = untouched, FIT 0).
      masks: optional ``{path: kept mask}``; else an ``Unstructured`` layer is pruned by
        :func:`fisher_mask` (per-layer ``F·w²`` ranking).
      noise: ``"model"`` (``Δ²/12`` per kept weight) or ``"actual"`` (the rounding error of the
        masked weights on the grid, the form of the FITCompress code).
      per_layer: return ``{path: FIT}`` instead of the sum.
      per_parameter: return ``{path: kernel-shaped F·δw²}`` (each weight's term) instead.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        ...           "fc2": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
        >>> fisher = {p: np.ones_like(params[p]["kernel"]) for p in params}  # or fisher_diagonal
        >>> fit_score(fisher, params, {"fc1": LayerSpec(quant=Int(4))}) > 0
        True
    """
    if noise not in ("model", "actual"):
        raise ValueError(f"fit_score: noise must be 'model' or 'actual', got {noise!r}")
    diag = _diag(fisher)
    layers = find_layers(params)
    out = {}
    for path, spec in specs.items():
        if path not in layers:
            raise ValueError(f"fit_score: layer {path!r} is not in params ({sorted(layers)})")
        if spec is None or (spec.prune is None and spec.quant is None):
            out[path] = np.zeros(np.shape(layers[path])) if per_parameter else 0.0
            continue
        if path not in diag:
            raise ValueError(f"fit_score: no Fisher diagonal for layer {path!r}")
        if spec.prune is not None and not isinstance(spec.prune, Unstructured):
            raise ValueError(f"fit_score: layer {path!r}: only Unstructured pruning is modelled")
        w = np.asarray(layers[path], np.float64)
        F = np.asarray(diag[path], np.float64)
        if masks is not None and path in masks:
            keep = np.asarray(masks[path], bool)
        elif spec.prune is not None:
            keep = fisher_mask(F, w, spec.prune.sparsity, seed=seed)
        else:
            keep = np.ones(w.shape, bool)
        if spec.quant is None:
            d2 = np.zeros_like(w)
        elif noise == "model":
            d2 = np.asarray(quant_noise(w, spec.quant), np.float64)
        else:
            d2 = (np.asarray(_rtn(w, spec.quant, keep), np.float64) - w) ** 2
        terms = F * np.where(keep, d2, w * w)
        out[path] = terms if per_parameter else float(np.sum(terms))
    if per_parameter or per_layer:
        return out
    return float(sum(out.values()))


# -- path search ----------------------------------------------------------------------------------


def prune_schedule(levels: int = 40, end_exp: float = -3.0) -> np.ndarray:
    """Pruned fractions ``1 − 10^{e·j/(K−1)}``, ``j = 0…K−1`` (log-spaced kept fractions)."""
    if levels < 2:
        raise ValueError(f"prune_schedule: levels must be >= 2, got {levels}")
    if not end_exp < 0:
        raise ValueError(f"prune_schedule: end_exp must be < 0, got {end_exp}")
    return 1.0 - 10.0 ** (end_exp * np.arange(levels) / (levels - 1))


class FITPlan(NamedTuple):
    """Result of :func:`fit_search`.

    Attributes:
      specs: ``{path: LayerSpec}`` (``Unstructured`` at the layer's exact pruned fraction, when
        any weight is pruned, and ``Int`` at its bits).
      masks: ``{path: kernel-shaped bool}`` kept weights (global ``F·w²`` ranking).
      bits: ``{path: int}``.
      level: index into ``pruned_fractions``.
      sparsity: the level's global pruned fraction.
      size_bits: Σ kept × bits + 32 × (all other leaves), ``summarize``'s ``total/value_bits``.
      dense_bits: 32 × all leaves.
      target_bits: the size target (None when only a BOPs target was given).
      fit: FIT of the plan (noise model, under the last Fisher estimate; plus the activation
        term ``act_fit`` when the search was given ``act``).
      trace: one dict per step: move, layer, fit, size_bits, score (see :func:`fit_search`).
      bops: BOPs of the selected layers (:func:`obcjax.allocation.layer_bops`: kept weights ×
        output positions × weight bits × activation bits), or None when not counted.
      target_bops: the BOPs target, or None.
      dense_bops: BOPs of the selected layers with 32-bit weights, or None.
      act_bits: ``{path: activation bits}`` used for BOPs and the activation term (32: not
        quantized), or None.
      act_fit: FIT's activation term of the plan (0 without ``act``).
      fisher_passes: Fisher re-estimations run during the search (``reestimate_every``).
      fisher_batches: batches those passes consumed.
      fisher_seconds: wall time of those passes.
      seconds: wall time of the whole search (Fisher passes included).
    """

    specs: dict[str, LayerSpec]
    masks: dict[str, np.ndarray]
    bits: dict[str, int]
    level: int
    sparsity: float
    size_bits: int
    dense_bits: int
    target_bits: float
    fit: float
    trace: list[dict]
    bops: int | None = None
    target_bops: float | None = None
    dense_bops: int | None = None
    act_bits: dict[str, int] | None = None
    act_fit: float = 0.0
    fisher_passes: int = 0
    fisher_batches: int = 0
    fisher_seconds: float = 0.0
    seconds: float = 0.0

    def rules(self) -> list[tuple[str, LayerSpec | None]]:
        """Ordered rules for :func:`obcjax.transforms.compress` (via ``allocation.to_rules``)."""
        from obcjax.allocation import to_rules

        return to_rules(self.specs)


@functools.partial(jax.jit, static_argnames=("num_layers",))
def _score(Fw2, FS, F, QW, theta, rank, layer_id, cand_bidx, cand_k, *, num_layers: int):
    """Per candidate state ``(bit indices, pruned count)``: modelled FIT, kept count per layer,
    the Fisher step ``Σ F (θ − θ')²`` from the current weights ``theta`` and the self-FIT
    ``Σ F θ'²`` of the candidate's weights ``θ'`` (pruned, rounded from the float master)."""
    TRACE_COUNTS["score"] += 1
    idx = jnp.arange(Fw2.shape[0])

    def one(bidx, k):
        keep = rank >= k
        lb = bidx[layer_id]
        fit = jnp.sum(jnp.where(keep, FS[lb, idx], Fw2))
        child = jnp.where(keep, QW[lb, idx], 0.0)
        d = theta - child
        step = jnp.sum(F * d * d)
        selff = jnp.sum(F * child * child)
        kept = jax.ops.segment_sum(keep.astype(jnp.int32), layer_id, num_segments=num_layers)
        return fit, kept, step, selff

    return jax.vmap(one)(cand_bidx, cand_k)


def fit_search(
    params,
    fisher: Fisher | Mapping[str, Any],
    *,
    target_bits: float | None = None,
    target_ratio: float | None = None,
    ratio: float | str | None = None,
    bit_schedule: Sequence[int] = (8, 6, 4, 3, 2),
    pruned_fractions: Sequence[float] | None = None,
    quant: Int = _DEFAULT_GRID,
    rules: Sequence[str] | str = (".*",),
    rule: str = "astar",
    lam: float = 1.0,
    solver: str = "obc",
    seed: int = 0,
    max_steps: int = 100_000,
    target_bops: float | None = None,
    target_bops_ratio: float | None = None,
    positions: Mapping[str, int] | None = None,
    act: ActFisher | None = None,
    act_bits: str | int | Mapping[str, int] = "weights",
    reestimate_every: int | None = None,
    loss_fn: Callable[[Any, Any, Any], jax.Array] | None = None,
    batches: Iterable[Any] | Callable[[int], Iterable[Any]] | None = None,
    fisher_kwargs: Mapping[str, Any] | None = None,
) -> FITPlan:
    """FITCompress greedy path search to a size and/or BOPs target.

    Start: every selected layer at ``bit_schedule[0]``, nothing pruned. From the current node the
    children are: one per layer that can still lose bits (only that layer moves one step down the
    bit schedule) and one that raises the global pruning level by one step (the next
    ``floor(p·N)`` weights of smallest ``F·w²`` over all selected kernels are zeroed). A pruning
    level that would empty a layer is never taken. Children's weights are pruned and rounded from
    the float master (rounding error does not accumulate). Two step rules:

    * ``rule="astar"`` (the paper's greedy A*): each child ``θ'`` costs
      ``f = g + sqrt(Σ F (θ − θ')²) + lam·|α' − α*|·sqrt(Σ F θ'²)`` (``g`` the Fisher path length
      so far, ``α = size / fp32 size``); the search stops at the first expansion that yields a
      child within the target (the cheapest such child by ``f``), else it moves to the child of
      smallest ``f`` and drops the others.
    * ``rule="ratio"`` (ours): the child with the smallest modelled ``ΔFIT / Δsize``; stops as
      soon as the size meets the target.

    Options beyond the size target (all off by default; the default search is unchanged):

    * **BOPs** (``target_bops`` / ``target_bops_ratio``): BOPs of the selected layers,
      :func:`obcjax.allocation.layer_bops` (kept weights × output positions × weight bits ×
      activation bits, the ``"bops"`` metric of OBC's allocator). ``positions`` gives each
      layer's output positions (``H_out·W_out`` of a conv); else ``act.positions``, else 1 for a
      Dense kernel. With both a size and a BOPs target the search stops when both hold; ``α`` in
      the heuristic becomes the larger of the two relative shortfalls (``cost/dense − target/
      dense``), and ``rule="ratio"`` divides ΔFIT by the fraction of the remaining gaps closed.
    * **Activation term** (``act``, :func:`activation_fisher`): FIT's ``Tr F(a)·Δ_a²/12`` of each
      selected layer's input (:func:`activation_fit`) at ``act_bits`` joins the objective: the
      modelled FIT of ``rule="ratio"`` and the squared step length of ``rule="astar"`` (the step
      adds the activation FIT it raises). ``act_bits="weights"`` ties a layer's input bits to its
      weight bits (FITCompress's calibration: the same total bits), so lowering a layer's bits
      also coarsens its input; an int or ``{path: bits}`` fixes them (a constant term then, but
      it sets the BOPs; 32 or a layer left out: not quantized).
    * **Fisher re-estimation** (``reestimate_every=k``; needs ``loss_fn`` and ``batches``, as
      :func:`fisher_diagonal`): before every ``k``-th expansion (not the first, which uses
      ``fisher``) the Fisher is re-estimated at the current node's weights, as the authors' code
      does at each expanded node. The new Fisher scores the children and re-ranks the weights
      still kept by ``F·θ²`` on the node's (rounded) weights; pruned weights stay pruned. The
      cost is reported in ``fisher_passes``, ``fisher_batches`` and ``fisher_seconds``.

    Args:
      params: float params.
      fisher: :func:`fisher_diagonal` of the same kernels (or ``{path: diagonal}``).
      target_bits: size target in bits (``summarize``'s ``total/value_bits``).
      target_ratio: size target as a fraction of the fp32 size of all params (``α*``); give at
        most one of ``target_bits``, ``target_ratio`` and ``ratio``.
      ratio: the same target as a compression ratio, ``8``, ``8.0`` or ``"8x"``
        (:func:`obcjax.sizes.as_ratio`; ``ratio=8`` is ``target_ratio=1/8``), the form every
        other size target of obcjax takes.
      bit_schedule: strictly decreasing bit-widths in 2..8.
      pruned_fractions: increasing global pruned fractions starting at 0; default
        :func:`prune_schedule` ``(40, -3)``.
      quant: grid template (bits replaced per layer); the noise model uses its row steps.
      rules: regexes choosing the layers (must all have a Fisher diagonal).
      rule: ``"astar"`` or ``"ratio"`` (see above).
      lam: the heuristic's weight λ (astar).
      solver: the ``LayerSpec.solver`` written into ``specs`` (for ``compress``).
      seed: tie-breaking seed (ranking ties and equal move scores).
      max_steps: the most expansions before a ``RuntimeError``.
      target_bops: BOPs target of the selected layers.
      target_bops_ratio: BOPs target as a fraction of ``dense_bops`` (32-bit weights, activations
        at ``act_bits``' 32-bit value); give at most one of the two.
      positions: ``{path: output positions}`` for the MAC counts (needed for convolutions unless
        ``act`` carries them).
      act: an :class:`ActFisher`: adds FIT's activation term to the objective.
      act_bits: ``"weights"``, an int or ``{path: int}`` in 2..32 (see above).
      reestimate_every: re-estimate the Fisher every this many expansions (None: never).
      loss_fn: per-example loss for the re-estimation (as :func:`fisher_diagonal`).
      batches: a list of batches reused by every re-estimation, or a callable
        ``pass_index -> iterable`` of batches.
      fisher_kwargs: passed to :func:`fisher_diagonal` (``tol``, ``min_batches``,
        ``max_batches``).

    Returns:
      A :class:`FITPlan`; ``trace`` holds one dict per node on the path (move, layer, fit,
      size_bits, alpha, g, h, f, score, sparsity, bits; ``bops`` when counted, ``act_fit`` with
      ``act``, ``reestimated`` with ``reestimate_every``).

    Raises:
      ValueError: no kernel matched, a kernel has no Fisher diagonal, a bad schedule or rule, no
        target or two of a kind, a target below the smallest reachable size or BOPs (the message
        gives it), a convolution without positions for BOPs, bad activation bits, or
        re-estimation without ``loss_fn`` / reusable ``batches``.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        ...           "fc2": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
        >>> fisher = {p: np.ones_like(params[p]["kernel"]) for p in params}  # or fisher_diagonal
        >>> plan = fit_search(params, fisher, target_ratio=0.1, bit_schedule=(8, 4))
        >>> plan.size_bits <= plan.target_bits
        True
        >>> rules = plan.rules()                 # for compress(params, stats, rules)
        >>> small = fit_search(params, fisher, target_bops_ratio=0.02, act_bits=8)
        >>> small.bops <= small.target_bops
        True
    """
    t_start = time.perf_counter()
    diag = _diag(fisher)
    if ratio is not None:  # 8, 8.0 or "8x": the size target is dense / ratio
        if target_bits is not None or target_ratio is not None:
            raise ValueError("fit_search: give exactly one of target_bits, target_ratio or ratio")
        target_ratio = 1.0 / as_ratio(ratio, "fit_search: ratio")
    if target_bits is not None and target_ratio is not None:
        raise ValueError("fit_search: give exactly one of target_bits or target_ratio, not both")
    if target_bops is not None and target_bops_ratio is not None:
        raise ValueError(
            "fit_search: give exactly one of target_bops or target_bops_ratio, not both"
        )
    has_size = target_bits is not None or target_ratio is not None
    has_bops = target_bops is not None or target_bops_ratio is not None
    if not (has_size or has_bops):
        raise ValueError(
            "fit_search: give exactly one of target_bits or target_ratio (and/or one of "
            "target_bops or target_bops_ratio)"
        )
    if rule not in ("astar", "ratio"):
        raise ValueError(f"fit_search: rule must be 'astar' or 'ratio', got {rule!r}")
    if not (float(lam) >= 0 and math.isfinite(float(lam))):
        raise ValueError(f"fit_search: lam must be a finite number >= 0, got {lam!r}")
    bsched = tuple(int(b) for b in bit_schedule)
    if (
        not bsched
        or any(not (2 <= b <= 8) for b in bsched)
        or any(a <= b for a, b in zip(bsched, bsched[1:]))
    ):
        raise ValueError(
            f"fit_search: bit_schedule must be strictly decreasing ints in 2..8, got {bit_schedule}"
        )
    fr = np.asarray(prune_schedule() if pruned_fractions is None else pruned_fractions, float)
    if fr.ndim != 1 or fr.size < 1 or fr[0] != 0 or np.any(np.diff(fr) <= 0) or fr[-1] >= 1:
        raise ValueError(
            "fit_search: pruned_fractions must start at 0, increase strictly and stay below 1"
        )
    if not isinstance(quant, Int):
        raise TypeError(f"fit_search: quant must be an Int grid, got {quant!r}")
    if reestimate_every is not None:
        if isinstance(reestimate_every, bool) or not (
            isinstance(reestimate_every, (int, np.integer)) and reestimate_every >= 1
        ):
            raise ValueError(
                f"fit_search: reestimate_every must be an int >= 1 or None, got {reestimate_every!r}"
            )
        if not callable(loss_fn):
            raise ValueError("fit_search: reestimate_every needs loss_fn (a per-example loss)")
        if batches is None or (not callable(batches) and iter(batches) is batches):
            raise ValueError(
                "fit_search: reestimate_every needs batches it can read again: a list of batches "
                f"or a callable pass_index -> iterable, got {type(batches).__name__}"
            )
    kernels = _select(params, rules, "fit_search")
    missing = [p for p in kernels if p not in diag]
    if missing:
        raise ValueError(f"fit_search: no Fisher diagonal for layer(s) {missing}")
    paths = tuple(kernels)
    L = len(paths)
    ws = [np.asarray(kernels[p], np.float32) for p in paths]
    Fs = [np.asarray(diag[p], np.float32) for p in paths]
    for p, w, F in zip(paths, ws, Fs):
        if F.shape != w.shape:
            raise ValueError(
                f"fit_search: layer {p!r}: Fisher diagonal shape {F.shape} != kernel {w.shape}"
            )
    sizes = np.array([w.size for w in ws], np.int64)
    N = int(sizes.sum())
    all_leaves = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    other_bits = 32 * (all_leaves - N)
    dense_bits = 32 * all_leaves
    target = None
    if has_size:
        target = float(target_bits) if target_bits is not None else float(target_ratio) * dense_bits
        if not target > 0:
            raise ValueError(f"fit_search: the size target must be > 0, got {target}")
    alpha_star = None if target is None else target / dense_bits

    # activation bits per (layer, bit index), the activation term, and the BOPs' MAC counts
    abits_tab = _act_bits_table(act_bits, paths, bsched)
    count_bops = has_bops or positions is not None
    pos = _positions_of(positions, act, paths, ws) if count_bops else None
    act_tab = np.zeros((L, len(bsched)))
    if act is not None:
        if not isinstance(act, ActFisher):
            raise TypeError(f"fit_search: act must be an ActFisher, got {type(act).__name__}")
        for l, p in enumerate(paths):
            if p in act.trace:
                for bi in range(len(bsched)):
                    a = int(abits_tab[l, bi])
                    act_tab[l, bi] = activation_fit(act, {p: a})[p] if a <= 16 else 0.0
    lix = np.arange(L)

    def bops_of(kept, cb):
        """BOPs of candidates: kept ``(C, L)`` weights, bit indices ``cb (C, L)``."""
        from obcjax.allocation import layer_bops

        wb, ab = np.asarray(bsched, np.int64)[cb], abits_tab[lix, cb]
        return layer_bops(kept.astype(np.int64), wb, ab, pos[None]).sum(axis=1)

    bops_target = dense_bops = None
    if count_bops:
        dense_bops = int(np.sum(_dense_bops(sizes, pos, act_bits, paths)))
    if has_bops:
        bops_target = (
            float(target_bops) if target_bops is not None else float(target_bops_ratio) * dense_bops
        )
        if not bops_target > 0:
            raise ValueError(f"fit_search: the BOPs target must be > 0, got {bops_target}")

    layer_id = np.repeat(np.arange(L), sizes).astype(np.int32)
    w_flat = np.concatenate([w.ravel() for w in ws]).astype(np.float64)
    F_flat = np.concatenate([F.ravel() for F in Fs]).astype(np.float64)
    sal = F_flat * w_flat**2
    rng = np.random.default_rng(seed)
    perm = rng.permutation(N)
    order = np.lexsort((perm, sal))
    rank = np.empty(N, np.int32)
    rank[order] = np.arange(N, dtype=np.int32)
    ks = np.unique(np.floor(fr * N + 1e-9).astype(np.int64))
    # kept per layer at each level, to forbid levels that would empty a layer
    kept_at = np.stack([np.bincount(layer_id[rank >= k], minlength=L) for k in ks])
    ok_levels = np.nonzero((kept_at >= 1).all(axis=1))[0]
    jmax = int(ok_levels.max())
    bvec = np.asarray(bsched, np.int64)
    last = np.full(L, len(bsched) - 1)
    min_size = int(kept_at[jmax] @ np.full(L, bvec[-1])) + other_bits
    if target is not None and target < min_size:
        raise ValueError(
            f"fit_search: size target {target:.0f} bits ({target / dense_bits:.4g} of fp32) is "
            f"unreachable; the smallest reachable size is {min_size} bits "
            f"({min_size / dense_bits:.4g}) with {bvec[-1]} bits and {ks[jmax] / N:.4g}"
            " pruned; lower the bit schedule or extend pruned_fractions"
        )
    if has_bops:
        min_bops = int(bops_of(kept_at[jmax][None], last[None])[0])
        if bops_target < min_bops:
            raise ValueError(
                f"fit_search: BOPs target {bops_target:.6g} ({bops_target / dense_bops:.4g} of "
                f"dense) is unreachable; the smallest reachable is {min_bops} "
                f"({min_bops / dense_bops:.4g}) with {bvec[-1]} bits and {ks[jmax] / N:.4g} pruned"
            )
    specs_b = [dataclasses.replace(quant, bits=b) for b in bsched]
    noise = np.stack(
        [np.concatenate([np.asarray(quant_noise(w, s)).ravel() for w in ws]) for s in specs_b]
    )
    FS = noise * F_flat
    QW = np.stack([np.concatenate([np.asarray(_rtn(w, s)).ravel() for w in ws]) for s in specs_b])
    dev = dict(
        Fw2=jnp.asarray(sal, jnp.float32),
        FS=jnp.asarray(FS, jnp.float32),
        F=jnp.asarray(F_flat, jnp.float32),
        QW=jnp.asarray(QW, jnp.float32),
        rank=jnp.asarray(rank),
        layer_id=jnp.asarray(layer_id),
    )

    def weights_of(bidx, k):
        return np.where(rank >= k, QW[bidx[layer_id], np.arange(N)], 0.0).astype(np.float32)

    def score(cb, ck, theta):
        out = _score(
            **dev,
            theta=jnp.asarray(theta),
            cand_bidx=jnp.asarray(cb, jnp.int32),
            cand_k=jnp.asarray(ck, jnp.int32),
            num_layers=L,
        )
        return [np.asarray(o, np.float64) for o in out]

    def shortfall(csize, cbops):
        """Signed relative distance to the targets: the largest ``cost/dense − target/dense``."""
        d = None if target is None else csize / dense_bits - alpha_star
        if bops_target is not None:
            db = cbops / dense_bops - bops_target / dense_bops
            d = db if d is None else np.maximum(d, db)
        return d

    def met(csize, cbops):
        ok = True if target is None else csize <= target
        if bops_target is not None:
            ok = ok & (cbops <= bops_target)
        return ok

    def snapshot(move, layer, fit, size, g, h, f, sc):
        rec = {
            "move": move,
            "layer": layer,
            "fit": fit,
            "size_bits": int(size),
            "alpha": size / dense_bits,
            "g": g,
            "h": h,
            "f": f,
            "score": sc,
            "sparsity": float(ks[j] / N),
            "bits": [int(bsched[b]) for b in bidx],
        }
        if count_bops:
            rec["bops"] = int(bops)
        if act is not None:
            rec["act_fit"] = float(afit)
        if reestimate_every is not None:
            rec["reestimated"] = reestimated
        return rec

    fkw = dict(fisher_kwargs or {})
    n_pass, n_batches, fisher_s = 0, 0, 0.0

    def reestimate(theta):
        """The Fisher at the current node; re-rank the kept weights by ``F·θ²``."""
        nonlocal F_flat, rank, kept_at, jmax, n_pass, n_batches, fisher_s
        t0 = time.perf_counter()
        off, node = 0, {}
        for l, p in enumerate(paths):
            node[p] = jnp.asarray(theta[off : off + sizes[l]].reshape(ws[l].shape))
            off += sizes[l]
        data = batches(n_pass) if callable(batches) else batches
        new = fisher_diagonal(
            loss_fn, _with_kernels(params, node), data,
            rules=tuple(re.escape(p) for p in paths), **fkw,
        )  # fmt: skip
        n_pass += 1
        n_batches += new.batches
        F_flat = np.concatenate([np.asarray(new.diag[p], np.float64).ravel() for p in paths])
        kept_now = np.nonzero(rank >= ks[j])[0]
        sal_now = F_flat[kept_now] * np.asarray(theta, np.float64)[kept_now] ** 2
        new_rank = rank.copy()
        new_rank[kept_now[np.lexsort((perm[kept_now], sal_now))]] = ks[j] + np.arange(
            kept_now.size, dtype=np.int32
        )
        rank = new_rank
        kept_at = np.stack([np.bincount(layer_id[rank >= k], minlength=L) for k in ks])
        jmax = int(np.nonzero((kept_at >= 1).all(axis=1))[0].max())
        dev.update(
            Fw2=jnp.asarray(F_flat * w_flat**2, jnp.float32),
            FS=jnp.asarray(noise * F_flat, jnp.float32),
            F=jnp.asarray(F_flat, jnp.float32),
            rank=jnp.asarray(rank),
        )
        fisher_s += time.perf_counter() - t0

    bidx = np.zeros(L, np.int64)
    j = 0
    theta = weights_of(bidx, ks[0])
    # the start state is scored with the candidate batch's shape (L + 1 copies) so the jitted
    # scorer is traced once per search
    fits0, kept0, _, self0 = score(np.repeat(bidx[None], L + 1, 0), np.full(L + 1, ks[0]), theta)
    afit = float(act_tab[lix, bidx].sum())
    fit = float(fits0[0]) + afit
    size = int(kept0[0] @ bvec[bidx]) + other_bits
    bops = int(bops_of(kept0[:1], bidx[None])[0]) if count_bops else None
    g = 0.0
    h0 = float(lam * abs(shortfall(size, bops)) * math.sqrt(self0[0]))
    reestimated = False
    trace = [snapshot("start", None, fit, size, 0.0, h0, h0, 0.0)]
    steps = 0
    done = bool(met(size, bops))
    while not done:
        if steps >= max_steps:
            raise RuntimeError(f"fit_search: no solution within max_steps={max_steps}")
        reestimated = reestimate_every is not None and steps > 0 and steps % reestimate_every == 0
        if reestimated:
            reestimate(theta)
            cur = score(np.repeat(bidx[None], L + 1, 0), np.full(L + 1, ks[j]), theta)
            fit = float(cur[0][0]) + afit
        steps += 1
        cb = np.repeat(bidx[None], L + 1, 0)
        ck = np.full(L + 1, ks[j], np.int64)
        valid = np.zeros(L + 1, bool)
        for l in range(L):
            if bidx[l] + 1 < len(bsched):
                cb[l, l] += 1
                valid[l] = True
        if j + 1 <= jmax:
            ck[L] = ks[j + 1]
            valid[L] = True
        fits, kept, step, selff = score(cb, ck, theta)
        kept = kept.astype(np.int64)
        cafit = act_tab[lix[None], cb].sum(axis=1)
        fits = fits + cafit
        step = step + (cafit - afit)
        csize = np.einsum("cl,cl->c", kept, bvec[cb]) + other_bits
        saved = size - csize
        cbops = bops_of(kept, cb) if count_bops else None
        if bops_target is None:
            valid &= saved > 0
        else:
            # a move must bring an unmet target closer
            gain = np.zeros(L + 1, bool)
            if target is not None and size > target:
                gain |= saved > 0
            if bops > bops_target:
                gain |= cbops < bops
            valid &= gain
        if not valid.any():
            raise RuntimeError(
                "fit_search: no move brings the targets closer (after a Fisher re-estimation the "
                "ranking can forbid the pruning levels the first ranking allowed)"
            )
        hs = lam * np.abs(shortfall(csize, cbops)) * np.sqrt(np.maximum(selff, 0.0))
        fs = g + np.sqrt(np.maximum(step, 0.0)) + hs
        if rule == "astar":
            reach = valid & met(csize, cbops)
            pool = reach if reach.any() else valid
            sc = np.where(pool, fs, np.inf)
        elif bops_target is None:
            sc = np.where(valid, (fits - fit) / np.maximum(saved, 1), np.inf)
        else:
            # the fraction of each unmet gap the move closes
            prog = np.zeros(L + 1)
            if target is not None and size > target:
                prog += np.maximum(saved, 0) / (size - target)
            if bops > bops_target:
                prog += np.maximum(bops - cbops, 0) / (bops - bops_target)
            sc = np.where(valid, (fits - fit) / np.maximum(prog, 1e-300), np.inf)
        best = sc.min()
        ties = np.nonzero(sc == best)[0]
        c = int(ties[0]) if len(ties) == 1 else int(rng.choice(ties))
        if c == L:
            j += 1
            move, layer = "prune", None
        else:
            bidx[c] += 1
            move, layer = "quant", paths[c]
        g += math.sqrt(max(float(step[c]), 0.0))
        fit, size, afit = float(fits[c]), int(csize[c]), float(cafit[c])
        if count_bops:
            bops = int(cbops[c])
        theta = weights_of(bidx, ks[j])
        trace.append(snapshot(move, layer, fit, size, g, float(hs[c]), float(fs[c]), float(best)))
        done = bool(met(size, bops))

    keep_flat = rank >= ks[j]
    specs, masks, bits = {}, {}, {}
    off = 0
    for l, p in enumerate(paths):
        m = keep_flat[off : off + sizes[l]].reshape(ws[l].shape)
        off += sizes[l]
        pruned = int(sizes[l] - m.sum())
        b = int(bsched[bidx[l]])
        prune = Unstructured(pruned / sizes[l]) if pruned else None
        specs[p] = LayerSpec(prune=prune, quant=dataclasses.replace(quant, bits=b), solver=solver)
        masks[p] = m
        bits[p] = b
    abits_out = None
    if count_bops or act is not None:
        abits_out = {p: int(abits_tab[l, bidx[l]]) for l, p in enumerate(paths)}
    return FITPlan(
        specs, masks, bits, j, float(ks[j] / N), size, dense_bits, target, fit, trace,
        bops=bops, target_bops=bops_target, dense_bops=dense_bops, act_bits=abits_out,
        act_fit=afit, fisher_passes=n_pass, fisher_batches=n_batches, fisher_seconds=fisher_s,
        seconds=time.perf_counter() - t_start,
    )  # fmt: skip


def _act_bits_table(act_bits, paths, bsched) -> np.ndarray:
    """``(L, len(bsched))`` activation bits of each layer at each weight-bit index."""
    L = len(paths)

    def check(b, where):
        if isinstance(b, bool) or not isinstance(b, (int, np.integer)) or not 2 <= b <= 32:
            raise ValueError(f"fit_search: act_bits{where} must be an int in 2..32, got {b!r}")
        return int(b)

    if isinstance(act_bits, str):
        if act_bits != "weights":
            raise ValueError(
                f"fit_search: act_bits must be 'weights', an int or {{path: int}}, got {act_bits!r}"
            )
        return np.tile(np.asarray(bsched, np.int64), (L, 1))
    if isinstance(act_bits, Mapping):
        extra = sorted(set(act_bits) - set(paths))
        if extra:
            raise ValueError(
                f"fit_search: act_bits names layer(s) {extra} the search does not select "
                f"({list(paths)})"
            )
        col = [check(act_bits[p], f"[{p!r}]") if p in act_bits else 32 for p in paths]
    else:
        col = [check(act_bits, "")] * L
    return np.repeat(np.asarray(col, np.int64)[:, None], len(bsched), axis=1)


def _dense_abits(act_bits, p) -> int:
    if isinstance(act_bits, str):
        return 32
    if isinstance(act_bits, Mapping):
        return int(act_bits.get(p, 32))
    return int(act_bits)


def _dense_bops(sizes, pos, act_bits, paths) -> np.ndarray:
    from obcjax.allocation import layer_bops

    ab = np.asarray([_dense_abits(act_bits, p) for p in paths], np.int64)
    return layer_bops(np.asarray(sizes, np.int64), 32, ab, pos)


def _positions_of(positions, act, paths, ws) -> np.ndarray:
    """Output positions per layer: ``positions``, else ``act.positions``, else 1 for Dense."""
    given = dict(positions or {})
    extra = sorted(set(given) - set(paths))
    if extra:
        raise ValueError(
            f"fit_search: positions names layer(s) {extra} the search does not select "
            f"({list(paths)})"
        )
    from_act = dict(getattr(act, "positions", None) or {}) if act is not None else {}
    out, convs = [], []
    for p, w in zip(paths, ws):
        v = given.get(p, from_act.get(p))
        if v is None:
            if w.ndim > 2:
                convs.append(p)
                continue
            v = 1
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"fit_search: positions[{p!r}] must be an int >= 1, got {v!r}")
        out.append(int(v))
    if convs:
        raise ValueError(
            "fit_search: BOPs count MACs, which for a convolution depend on its number of output "
            f"positions; pass positions={{path: H_out*W_out}} (or act= from activation_fisher) "
            f"for conv layer(s) {convs}"
        )
    return np.asarray(out, np.int64)


def apply_plan(
    params, plan: FITPlan, *, stats: Mapping[str, Any] | None = None, solver: str = "fit"
) -> Compressed:
    """Materialise a plan.

    Args:
      params: the float params the plan was searched on.
      plan: a :class:`FITPlan`.
      stats: calibration statistics (:func:`obcjax.calibration.calibrate`), needed unless
        ``solver="fit"``.
      solver: ``"fit"``: the plan's own Fisher masks, then round-to-nearest on the plan's grids
        (FITCompress proper, no fine-tuning); ``"obc"``, ``"magnitude"`` or ``"gptq"``: the plan's
        per-layer sparsities and bits handed to :func:`obcjax.transforms.compress` (hybrids).

    Returns:
      A :class:`obcjax.transforms.Compressed` (``losses`` empty for ``"fit"``).
    """
    if solver != "fit":
        if stats is None:
            raise ValueError(f"apply_plan: solver={solver!r} needs calibration stats")
        specs = {p: dataclasses.replace(s, solver=solver) for p, s in plan.specs.items()}
        from obcjax.allocation import to_rules

        return compress(params, stats, to_rules(specs))
    return prune_and_round(params, plan.specs, plan.masks)


def prune_and_round(
    params, specs: Mapping[str, LayerSpec], masks: Mapping[str, Any] | None = None
) -> Compressed:
    """Prune by ``masks`` (kept = True; layers without one are dense) and round the kept weights
    to each spec's grid (round-to-nearest). No data, no error feedback.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        ...           "fc2": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
        >>> fisher = {p: np.ones_like(params[p]["kernel"]) for p in params}  # or fisher_diagonal
        >>> m = {"fc1": fisher_mask(fisher["fc1"], params["fc1"]["kernel"], 0.5)}
        >>> out = prune_and_round(params, {"fc1": LayerSpec(Unstructured(0.5), Int(4))}, m)
        >>> float((out.params["fc1"]["kernel"] == 0).mean())
        0.5
    """
    layers = find_layers(params)
    masks = masks or {}
    new = params
    out_masks, qarrays = {}, {}
    for p, spec in specs.items():
        if p not in layers:
            raise ValueError(f"prune_and_round: layer {p!r} is not in params ({sorted(layers)})")
        if spec is None:
            continue
        k = jnp.asarray(layers[p])
        m = jnp.asarray(masks[p], bool) if p in masks else jnp.ones(k.shape, bool)
        if m.shape != k.shape:
            raise ValueError(f"prune_and_round: layer {p!r}: mask {m.shape} != kernel {k.shape}")
        if spec.quant is not None:
            q = _rtn(k, spec.quant, m)
            lay = _matrix_layout(k.shape)
            (Wq,) = to_matrices(q, lay)
            scale, zero = find_params(to_matrices(jnp.where(m, k, 0.0), lay)[0], spec.quant)
            qarrays[p] = make_qarray(Wq, scale, zero, spec.quant)
        else:
            q = jnp.where(m, k, 0.0)
        if p in masks:
            out_masks[p] = m
        new = _with_kernels(new, {p: q.astype(k.dtype)})
    specs = {p: s for p, s in specs.items() if s is not None}
    return Compressed.from_flat(new, out_masks, qarrays, {}, dict(specs))


# -- hybrid: the OBC dynamic program fed with FIT scores ------------------------------------------


def _default_levels(bits: Sequence[int] = (8, 6, 4, 3, 2)) -> list[LayerSpec]:
    from obcjax.allocation import sparsity_levels

    out = []
    for s in sparsity_levels():
        for b in bits:
            prune = Unstructured(s.sparsity) if s.sparsity > 0 else None
            out.append(LayerSpec(prune=prune, quant=dataclasses.replace(_DEFAULT_GRID, bits=b)))
    return out


def _level_of(value, where: str) -> LayerSpec:
    spec = as_layer_spec(value)
    spec = LayerSpec() if spec is None else spec
    if spec.prune is not None and not isinstance(spec.prune, Unstructured):
        raise ValueError(f"{where}: level {spec.name!r}: only Unstructured pruning is modelled")
    return spec


def fit_database(
    params,
    fisher: Fisher | Mapping[str, Any],
    levels: Sequence[Any] | None = None,
    *,
    rules: Sequence[str] | str = (".*",),
    seed: int = 0,
):
    """OBC's database of levels with FIT scores as the per-layer losses (a hybrid).

    For every selected layer and level the loss is the layer's FIT (:func:`fit_score`: the
    smallest ``F·w²`` pruned per layer by :func:`fisher_mask`, ``Δ²/12`` noise on the kept
    weights) and the ``size`` cost is ``kept × bits`` (32 when not quantized), no index overhead:
    the accounting of :func:`obcjax.transforms.summarize` and :func:`fit_search`. Feed it to
    :func:`obcjax.allocation.solve` (or use :func:`fit_dp`).

    Args:
      params: float params.
      fisher: the Fisher diagonal of the selected kernels.
      levels: level specs (``LayerSpec``, ``Int``, ``Unstructured``, ``(Unstructured, Int)`` or
        None for dense); default: OBC's 45 sparsities × bits (8, 6, 4, 3, 2) on min-max grids.
      rules: regexes choosing the layers.
      seed: ranking tie-break (as :func:`fisher_mask`).

    Returns:
      An :class:`obcjax.allocation.Database` (built with ``Database.from_table``).

    Example:
        >>> from obcjax.allocation import solve
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        ...           "fc2": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
        >>> fisher = {p: np.ones_like(params[p]["kernel"]) for p in params}  # or fisher_diagonal
        >>> db = fit_database(params, fisher)
        >>> budget_bits = 0.1 * 32 * (64 * 32 + 32 * 10)
        >>> choice = solve(db, budget_bits)
        >>> db.cost_of(choice) <= budget_bits
        True
    """
    from obcjax.allocation import Database

    diag = _diag(fisher)
    lv = [_level_of(v, "fit_database") for v in (_default_levels() if levels is None else levels)]
    if not lv:
        raise ValueError("fit_database: the list of levels is empty")
    kernels = _select(params, rules, "fit_database")
    loss, cost = {}, {}
    for p, k in kernels.items():
        if p not in diag:
            raise ValueError(f"fit_database: no Fisher diagonal for layer {p!r}")
        w = np.asarray(k, np.float64).ravel()
        F = np.asarray(diag[p], np.float64).ravel()
        if F.size != w.size:
            raise ValueError(f"fit_database: layer {p!r}: Fisher size {F.size} != kernel {w.size}")
        n = w.size
        tie = np.random.default_rng(seed).permutation(n)
        order = np.lexsort((tie, F * w * w))
        pruned_cum = np.concatenate([[0.0], np.cumsum((F * w * w)[order])])
        noise: dict[Int | None, np.ndarray] = {}
        lrow, crow = {}, {}
        for spec in lv:
            q = spec.quant
            if q not in noise:
                d2 = np.zeros(n) if q is None else np.asarray(quant_noise(k, q), np.float64).ravel()
                noise[q] = np.concatenate([[0.0], np.cumsum((F * d2)[order])])
            s = 0.0 if spec.prune is None else spec.prune.sparsity
            kp = int(math.floor(s * n + 0.5))
            nc = noise[q]
            lrow[spec] = float(pruned_cum[kp] + nc[-1] - nc[kp])
            crow[spec] = float((n - kp) * (32 if q is None else q.bits))
        loss[p], cost[p] = lrow, crow
    return Database.from_table(loss, cost, metric="size")


def fit_dp(
    params,
    fisher: Fisher | Mapping[str, Any],
    *,
    target_bits: float | None = None,
    target_ratio: float | None = None,
    ratio: float | str | None = None,
    levels: Sequence[Any] | None = None,
    rules: Sequence[str] | str = (".*",),
    solver: str = "obc",
    seed: int = 0,
) -> FITPlan:
    """Per-layer levels by OBC's dynamic program on FIT scores (:func:`fit_database`).

    Unlike :func:`fit_search` every layer gets its own sparsity (per-layer ``F·w²`` masks) and
    bits, chosen to minimise the summed FIT within the size target (exact DP over the levels).

    Returns:
      A :class:`FITPlan` (``level`` = -1, ``trace`` = [], ``sparsity`` the overall pruned
      fraction of the selected kernels) usable with :func:`apply_plan`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc1": {"kernel": rng.normal(size=(64, 32)).astype(np.float32)},
        ...           "fc2": {"kernel": rng.normal(size=(32, 10)).astype(np.float32)}}
        >>> fisher = {p: np.ones_like(params[p]["kernel"]) for p in params}  # or fisher_diagonal
        >>> plan = fit_dp(params, fisher, ratio=20)
        >>> out = apply_plan(params, plan)      # or apply_plan(params, plan, stats=stats, solver="obc")
        >>> plan.size_bits <= plan.target_bits
        True
    """
    from obcjax.allocation import solve

    if sum(x is not None for x in (target_bits, target_ratio, ratio)) != 1:
        raise ValueError("fit_dp: give exactly one of target_bits, target_ratio or ratio")
    if ratio is not None:  # 8, 8.0 or "8x": the size target is dense / ratio
        target_ratio = 1.0 / as_ratio(ratio, "fit_dp: ratio")
    kernels = _select(params, rules, "fit_dp")
    diag = _diag(fisher)
    db = fit_database(params, fisher, levels, rules=rules, seed=seed)
    all_leaves = int(sum(np.size(x) for x in jax.tree.leaves(params)))
    N = int(sum(np.size(k) for k in kernels.values()))
    other_bits = 32 * (all_leaves - N)
    dense_bits = 32 * all_leaves
    target = float(target_bits) if target_bits is not None else float(target_ratio) * dense_bits
    if target - other_bits < db.min_cost("size"):
        raise ValueError(
            f"fit_dp: size target {target:.0f} bits ({target / dense_bits:.4g} of fp32) is "
            f"unreachable; the smallest size over these levels is "
            f"{db.min_cost('size') + other_bits:.0f} bits"
        )
    choice = solve(db, target - other_bits, metric="size")
    specs, masks, bits = {}, {}, {}
    size, pruned, fit = other_bits, 0, 0.0
    losses = db.losses()
    for p, spec in choice.items():
        w = kernels[p]
        s = 0.0 if spec.prune is None else spec.prune.sparsity
        m = fisher_mask(diag[p], w, s, seed=seed)
        b = 32 if spec.quant is None else spec.quant.bits
        specs[p] = dataclasses.replace(spec, solver=solver)
        masks[p], bits[p] = m, b
        size += int(m.sum()) * b
        pruned += int(m.size - m.sum())
        fit += float(losses[p][db.levels(p).index(spec)])
    return FITPlan(specs, masks, bits, -1, pruned / N, size, dense_bits, target, fit, [])


# -- fine-tuning with the mask and bit-widths fixed -----------------------------------------------


def codebooks_of(out: Compressed) -> dict:
    """Frozen per-row codebooks (:class:`obcjax.training.Codebook`) of a compressed model's grids.

    Each layer's ``QArray`` grids (one scale and zero point per output row, any granularity but
    ``"group"``) become one ``Codebook`` whose ``(out,)`` scale broadcasts over the kernel's last
    axis, so :func:`obcjax.training.fake_quantize_params` reproduces the compressed kernels exactly.
    """
    from obcjax.training import Codebook

    cbs = {}
    for p in out.specs:
        q = out.qarray(p)  # kernel layout: scale / zero (ngroups, *output axes)
        if q is None:
            continue
        if np.shape(q.scale)[0] != 1:
            raise ValueError(
                f"codebooks_of: layer {p!r} has per-group grids; a frozen codebook needs one "
                "scale per output row (granularity 'channel' or 'tensor')"
            )
        cbs[p] = Codebook(jnp.asarray(q.scale[0]), jnp.asarray(q.zero[0]), int(q.bits))
    return cbs


def finetune_plan(loss_fn: Callable, out: Compressed, batches, steps: int | None = None, **kwargs):
    """Quantization-aware fine-tuning of a compressed model with its mask and bits fixed.

    FITCompress's final "single-shot fine-tuning": :func:`obcjax.training.finetune` from the
    compressed weights, the pruned weights held at 0 (:func:`obcjax.training.keep_mask`) and
    every quantized kernel on its frozen per-row grid (:func:`codebooks_of`; STE forward). Any
    model: the loss function is the user's (zoo models:
    :func:`obcjax.recipes.finetune.zoo_finetune_plan`).

    Args:
      loss_fn: as :func:`obcjax.training.finetune`: ``loss_fn(params, batch) -> scalar`` or, with
        ``model_state=...`` in ``kwargs``, ``loss_fn(params, model_state, batch) -> (scalar,
        model_state)``.
      out: a :class:`~obcjax.transforms.Compressed` (e.g. :func:`apply_plan`'s result); its
        params are the starting weights (nested dicts; for an NNX model, ``nnx.State`` works
        too).
      batches: iterable of batches or a callable ``epoch -> iterable``.
      steps: optimizer steps.
      **kwargs: passed to ``finetune`` (``model_state``, ``tx``, ``lr``, ``weight_decay``).

    Returns:
      ``finetune``'s ``(params, info)``; the params lie on the grids and keep the masks.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc": {"kernel": jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)}}
        >>> def batch_loss(p, batch):                   # any model's batch loss
        ...     x, y = batch
        ...     return -jnp.mean(jax.nn.log_softmax(x @ p["fc"]["kernel"])[jnp.arange(len(y)), y])
        >>> data = [(rng.normal(size=(32, 16)), rng.integers(0, 3, 32)) for _ in range(4)]
        >>> fisher = {"fc": np.ones((16, 3), np.float32)}               # or fisher_diagonal
        >>> plan = fit_search(params, fisher, target_ratio=0.15, bit_schedule=(8, 4))
        >>> out = apply_plan(params, plan)
        >>> new, info = finetune_plan(batch_loss, out, data, steps=4, lr=1e-3)
        >>> pruned = ~plan.masks["fc"]
        >>> bool(jnp.all(new["fc"]["kernel"][pruned] == 0)), len(info["losses"])
        (True, 4)
    """
    from obcjax.training import finetune, mask_tree

    masks = mask_tree(out.params, out.masks)
    return finetune(
        loss_fn, out.params, batches, steps, masks=masks, codebooks=codebooks_of(out), **kwargs
    )


# -- FIT of activation quantization ---------------------------------------------------------------


class ActFisher(NamedTuple):
    """Empirical Fisher traces of layer inputs (activations), FIT's activation term.

    Attributes:
      trace: ``{layer path: Tr F(a)}`` = mean over examples of ``‖∂ℓ/∂a‖²`` (a = the layer's
        whole input for one example).
      lo: ``{layer path: float}`` mean over batches of the per-batch min of ``a``.
      hi: ``{layer path: float}`` mean over batches of the per-batch max of ``a``.
      order: the layers in call order.
      batches: as :class:`Fisher`.
      examples: as :class:`Fisher`.
      converged: as :class:`Fisher`.
      changes: as :class:`Fisher`.
      positions: ``{layer path: output positions}`` of every layer in ``order`` for one example
        (``H_out·W_out`` of a conv, the tokens of a Dense layer on a sequence, else 1): the MAC
        counts of :func:`fit_search`'s BOPs.
    """

    trace: dict[str, float]
    lo: dict[str, float]
    hi: dict[str, float]
    order: list[str]
    batches: int
    examples: int
    converged: bool
    changes: list[float]
    positions: dict[str, int] | None = None


def activation_fisher(
    module,
    variables: Any,
    batches: Iterable[Any],
    *,
    rules: Sequence[str] | str = (".*",),
    skip_first: bool = True,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    tol: float = 1e-3,
    min_batches: int = 2,
    max_batches: int = 100,
) -> ActFisher:
    """Fisher traces of the inputs of ``Dense`` / ``Conv`` layers of a Linen or NNX classifier.

    FIT's activation term (Zandonati et al. 2022): ``Tr F(a_l)·Δ_l²/12`` per quantized layer input,
    with ``Tr F(a_l) = (1/N) Σ_n ‖∂ℓ_n/∂a_l‖²`` from per-example gradients (a zero perturbation is
    added to each matched layer's input through :func:`obcjax.capture.intercept` and differentiated
    under ``vmap``) and ``Δ_l`` from the mean per-batch range. The first layer's input (the data) is
    skipped as in the paper unless ``skip_first=False``. Loss: cross-entropy of the logits.

    Args:
      module: a Linen module (``module.apply(variables, x, **apply_kwargs) -> logits``) or an NNX
        module (``module(x, **apply_kwargs) -> logits``; put it in evaluation mode yourself).
      variables: Linen: its variables (every collection it reads, e.g. ``batch_stats``). NNX: None
        for the model's own state, or a state / pure dict replacing parts of it (the model is not
        changed).
      batches: ``(x, y)`` pairs or ``{"x", "y"}`` dicts.
      rules: regexes choosing layers.
      skip_first: skip the first layer's input (the data), as the paper.
      layer_types: the layer kinds whose inputs are measured.
      apply_kwargs: keyword arguments of the model call (e.g. ``{"train": False}``).
      tol: early stop on the relative change of the running traces, as :func:`fisher_diagonal`.
      min_batches: as :func:`fisher_diagonal`.
      max_batches: as :func:`fisher_diagonal`.

    Returns:
      An :class:`ActFisher`.

    Raises:
      ValueError: a batch without labels, no layer matched, empty batches; a Linen model that
        reads a collection the variables lack (:class:`~obcjax.capture.CaptureError`).

    Example:
        >>> from obcjax import zoo
        >>> ds, variables = zoo.digits(), zoo.init_variables("lenet5", (8, 8, 1))
        >>> act = activation_fisher(zoo.linen_model("lenet5"), variables,
        ...                         zoo.batches(ds["calib"], 64))
        >>> list(act.trace)                 # conv1's input, the data, is skipped
        ['conv2', 'fc1', 'fc2', 'fc3']
        >>> fit4 = activation_fit(act, {p: 4 for p in act.trace})
    """
    kwargs = dict(apply_kwargs or {})
    if isinstance(rules, str):
        rules = (rules,)
    kinds = layer_kinds(layer_types, what="activation_fisher")
    bound = BoundModel(module, variables, what="activation_fisher")

    def apply(x, transform):
        """The logits of ``x`` with ``transform(path, a)`` replacing matched layer inputs ``a``."""

        hook = input_hook(lambda call: transform(call.path, call.input))
        return bound.run(lambda m, b: m(b, **kwargs), x, hook=hook, layer_types=kinds)

    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        raise ValueError("activation_fisher: batches is empty")
    x0, _ = _split_batch(first, 0)
    seen: dict[str, tuple] = {}
    npos: dict[str, int] = {}

    def record(call, proceed):
        out = proceed(*call.args, **call.kwargs)
        if call.path not in seen:
            seen[call.path] = tuple(call.input.shape)
            npos[call.path] = int(math.prod(jnp.shape(out)[1:-1]))
        return out

    jax.eval_shape(
        lambda x: bound.run(lambda m, b: m(b, **kwargs), x, hook=record, layer_types=kinds),
        jnp.asarray(x0[:1]),
    )
    order = list(seen)
    cand = order[1:] if skip_first else order
    paths = tuple(p for p in cand if any(re.fullmatch(r, p) for r in rules))
    if not paths:
        raise ValueError(
            f"activation_fisher: no layer input matched rules {list(rules)} (skip_first="
            f"{skip_first}); the layers in call order are {order}"
        )
    eps0 = {p: jnp.zeros(seen[p], jnp.float32) for p in paths}

    def one(eps, xi, yi):
        def add(path, a):
            return a + eps[path].astype(a.dtype) if path in eps else None

        logits = apply(xi[None], add)
        return -jax.nn.log_softmax(logits[0])[yi]

    @jax.jit
    def step(x, y, w):
        g = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(eps0, x, y)
        tr = {p: jnp.tensordot(w, jnp.sum(g[p].reshape(len(w), -1) ** 2, axis=1), 1) for p in paths}
        got = {}

        def rng(path, a):
            if path in eps0 and path not in got:
                got[path] = (jnp.min(a), jnp.max(a))
            return None

        apply(x, rng)
        return tr, got

    total = dict.fromkeys(paths, 0.0)
    lo_sum, hi_sum = dict.fromkeys(paths, 0.0), dict.fromkeys(paths, 0.0)
    prev, size, n, t, converged, changes = None, None, 0, 0, False, []
    for t, batch in enumerate(itertools.chain([first], batches), start=1):
        x, y, w, b, size = _padded_batch(batch, t - 1, size, "activation_fisher")
        tr, rg = step(jnp.asarray(x), jnp.asarray(y), jnp.asarray(w))
        for p in paths:
            total[p] += float(tr[p])
            lo_sum[p] += float(rg[p][0])
            hi_sum[p] += float(rg[p][1])
        n += b
        cur = np.array([total[p] / n for p in paths])
        converged, stop = _converged(changes, cur, prev, t, min_batches, max_batches, tol)
        prev = cur
        if stop:
            break
    return ActFisher(
        {p: total[p] / n for p in paths},
        {p: lo_sum[p] / t for p in paths},
        {p: hi_sum[p] / t for p in paths},
        order,
        t,
        n,
        converged,
        changes,
        {p: npos[p] for p in order},
    )


def _act_step(act: ActFisher, path: str, bits: int) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 2 <= bits <= 16:
        raise ValueError(
            f"activation_fit: layer {path!r}: bits must be an int in 2..16, got {bits!r}"
        )
    lo, hi = min(act.lo[path], 0.0), max(act.hi[path], 0.0)
    return (hi - lo) / (2**bits - 1)


def activation_fit(act: ActFisher, bits: Mapping[str, int]) -> dict[str, float]:
    """FIT's activation term per layer: ``Tr F(a)·Δ²/12`` with ``Δ = (hi − lo)/(2^b − 1)``.

    Args:
      act: :func:`activation_fisher`'s result.
      bits: ``{layer path: bits}`` (layers left out are not quantized).

    Example:
        >>> from obcjax import zoo
        >>> ds, variables = zoo.digits(), zoo.init_variables("lenet5", (8, 8, 1))
        >>> act = activation_fisher(zoo.linen_model("lenet5"), variables,
        ...                         zoo.batches(ds["calib"], 64))
        >>> fit = {b: sum(activation_fit(act, {p: b for p in act.trace}).values()) for b in (4, 8)}
        >>> fit[8] < fit[4]                 # a finer grid adds less noise
        True
    """
    out = {}
    for p, b in bits.items():
        if p not in act.trace:
            raise ValueError(
                f"activation_fit: no activation Fisher for layer {p!r}; have {sorted(act.trace)}"
            )
        d = _act_step(act, p, b)
        out[p] = act.trace[p] * d * d / 12.0
    return out


def activation_grids(act: ActFisher, bits: Mapping[str, int]) -> dict:
    """``{path: obcjax.activations.ActQuant}`` asymmetric min-max grids on the ranges FIT models.

    Use with :func:`obcjax.activations.activation_forward` to measure what ``activation_fit``
    predicts.
    """
    from obcjax.activations import ActQuant

    out = {}
    for p, b in bits.items():
        d = _act_step(act, p, b)
        lo = min(act.lo[p], 0.0)
        zero = float(np.round(-lo / d)) if d > 0 else 0.0
        out[p] = ActQuant(jnp.asarray(d if d > 0 else 1.0), jnp.asarray(zero), int(b), False)
    return out
