"""OPQ: one-shot, data-free pruning + quantization allocation under a Laplace weight model.

Hu, Peng, Zhu, Aly, Lin. "OPQ: Compressing Deep Neural Networks with One-shot Pruning-Quantization",
AAAI 2021 (arXiv 2205.11141). The paper fits a Laplace density to each layer's pre-trained weights,
writes the pruning error and the quantization error in closed form, and solves for every layer's
pruning threshold and quantization step with Lagrange multipliers, using the weights only (no data).
Each layer then has one magnitude mask and ONE codebook shared by all its channels; both stay frozen
while the float weights are fine-tuned (see :mod:`obcjax.training`).

What is the paper's and what is ours (see ``/work/shared/algorithms/joint-methods.md`` §2; the paper's
method section was not available, so the allocation equations are a reconstruction):

* [paper] Laplace model, closed-form errors, Lagrange multipliers, magnitude masks, one shared
  codebook per layer, frozen masks/codebooks during fine-tuning.
* [derived] ``w ~ Laplace(0, β)``, ``β = mean|w|`` (maximum likelihood). Pruning at threshold ``t``:
  kept fraction ``q(t) = exp(-t/β)``, pruning error per weight
  ``e_p(t) = E[w² 1{|w|<t}] = 2β² - exp(-t/β)(t² + 2βt + 2β²)``.
* [derived] Quantization error of the survivors on the layer's uniform grid, exactly (sum over the
  grid's bins of closed-form Laplace integrals, including clipping and survivors that round to 0) by
  :func:`quant_error`, and in the high-resolution form ``exp(-t/β) Δ²/12`` by
  :func:`quant_error_highres` (the form the paper's Fig. 3 compares against, as summarised).
* [reconstructed] One joint objective ``Σ_i ω_i N_i (e_p + e_q)`` under one size budget
  ``Σ_i N_i q_i(t_i) bits_i + overhead ≤ 32 Σ_i N_i / rate``. With the high-resolution ``e_q`` the
  stationarity in ``t`` is closed-form: ``t_i² = λ bits_i / ω_i + Δ_i²/12``; each layer then picks
  the bit-width (hence ``Δ_i = 2 max|w_i| / (2^bits - 1)``, the tensor-wide min-max grid) that
  minimises its Lagrangian with the exact error, and ``λ`` is found by bisection. ``weighting``
  picks ``ω_i``: ``"relative"`` = ``1/(2 N_i β_i²)`` (each layer's error relative to its energy;
  bigger layers are pruned harder), ``"energy"`` = ``1/(2 β_i²)``, ``"sse"`` = 1 (plain squared
  error; without quantization this reduces to global magnitude pruning).
* [ours] The budget is met in integers: after bisection the bit-widths are fixed, a second
  bisection sets the thresholds, kept counts are floored, and the few bits left are handed out one
  weight at a time to the layer with the largest error saving per bit, so the stored size is at
  most the budget and less than one weight (``max bits``) below it.

Two counts (:func:`count_bits` from the specs and masks, :func:`count_stored` from a
``Compressed`` record alone). The **size** (``size_bits``, ``rate``) is the one definition of
:mod:`obcjax.sizes` -- kept values + the 1-bit-per-weight mask + a float32 scale and a uint8 zero
point per stored grid, every other leaf at 32 bits -- the number ``summarize``, the CLI and
:mod:`obcjax.export` give. The **planner's count** (``plan_bits``, ``plan_rate``), which
``rate`` of :func:`opq_allocate` / :func:`opq_plan` targets, is the OPQ paper's: kept weights ×
bits (the mask's kept count) + one fp32 step per stored grid -- one per layer for the unified
codebook (its symmetric zero point is fixed by the bit-width), one per output channel for
per-channel grids -- + ``index_bits`` per weight of every pruned layer (0 by default: the paper's
count of index overhead is unknown; ``index_bits=1`` charges the mask as the size does). Layers
the rules leave alone count 32 bits per weight on both sides; in the planner's count biases and
other leaves count only with ``include_other=True``. A plan at ``rate=20`` is therefore a model
whose size ratio is below 20 (by the mask bits); the reports say which count they give.

Unified vs per-channel [ours]: ``granularity="channel"`` allocates with one grid per output
channel charged to the budget (the error model stays the tensor grid's, an upper bound);
:func:`kernel_codebooks` turns either kind of stored grid into frozen codebooks for
:func:`obcjax.training.finetune`. :func:`predict_errors` / :func:`measure_errors` give the
model's and the measured per-layer errors (and, with calibration statistics, each layer's
relative output error).

Bad input: an unreachable rate raises and names the highest reachable one; an all-zero layer or
one whose weights all have one magnitude (degenerate fit) raises naming the layer (leave it out
with a rule ``(path, None)``); a poor but non-degenerate fit is used as is unless ``max_ks`` is
given; an all-zero output channel under per-channel grids gets :mod:`obcjax.quant`'s fallback
grid (range ``[-1, 1]``; its weights stay 0).

Example:
    >>> from obcjax import zoo
    >>> variables = zoo.init_variables("lenet5", (8, 8, 1))
    >>> alloc = opq_allocate(variables["params"], 20.0)
    >>> out = opq_compress(variables["params"], alloc)
    >>> c = count_stored(variables["params"], out)
    >>> round(c["plan_rate"], 2)    # the planner's count: 20.0 up to one weight
    20.0
    >>> round(c["rate"], 2)         # the size (obcjax.sizes): masks and zero points too
    10.84
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from obcjax import kernels as K
from obcjax import sizes
from obcjax.layout import kernel_to_matrices, matrices_to_kernel, set_path
from obcjax.specs import Int, Unstructured
from obcjax.transforms import (
    Compressed,
    LayerSpec,
    compress,
    find_layers,
)

__all__ = [
    "LaplaceFit",
    "OPQPlan",
    "fit_laplace",
    "kept_fraction",
    "prune_error",
    "quant_error",
    "quant_error_highres",
    "grid_step",
    "opq_plan",
    "opq_allocate",
    "uniform_allocate",
    "plan_rules",
    "opq_compress",
    "count_bits",
    "count_stored",
    "predict_errors",
    "measure_errors",
    "kernel_codebooks",
    "CODEBOOK_BITS",
]

CODEBOOK_BITS = 32  # one fp32 step per layer; the symmetric zero point follows from the bit-width
WEIGHTINGS = ("relative", "energy", "sse")


class LaplaceFit(NamedTuple):
    """Laplace(0, ``b``) fit of one layer's weights.

    Attributes:
      b: scale, the maximum-likelihood ``mean|w|``.
      m: ``max|w|`` (the range of the layer's min-max grid).
      n: number of weights.
      ks: Kolmogorov-Smirnov statistic ``sup |F_emp - F_laplace|`` of the signed weights.
    """

    b: float
    m: float
    n: int
    ks: float


class OPQPlan(NamedTuple):
    """Full output of :func:`opq_plan`; every dict is keyed by layer path.

    Attributes:
      specs: ``{path: LayerSpec}`` (what :func:`opq_allocate` returns).
      fits: ``{path: LaplaceFit}``.
      kept: ``{path: int}`` weights kept by the mask.
      bits: ``{path: int}``.
      threshold: ``{path: float}`` the model threshold ``t = -b ln(kept/N)``.
      pred_prune_mse / pred_quant_mse: ``{path: float}`` per-weight errors the model predicts.
      lam: the Lagrange multiplier of the bit-choice stage.
      budget_bits / size_bits / dense_bits: totals as counted by :func:`count_bits`.
    """

    specs: dict[str, LayerSpec]
    fits: dict[str, LaplaceFit]
    kept: dict[str, int]
    bits: dict[str, int]
    threshold: dict[str, float]
    pred_prune_mse: dict[str, float]
    pred_quant_mse: dict[str, float]
    lam: float
    budget_bits: float
    size_bits: float
    dense_bits: float


# ----------------------------------------------------------------------------- closed forms


def fit_laplace(w, layer: str = "<weights>") -> LaplaceFit:
    """Maximum-likelihood Laplace(0, b) fit of ``w`` (any shape) and its KS statistic.

    Raises:
      ValueError: non-finite weights, an all-zero layer (b = 0), or a degenerate layer whose
        weights all have the same magnitude (no threshold separates them), naming ``layer``.

    Example:
      >>> round(fit_laplace(np.random.default_rng(0).laplace(0, 0.1, 10_000)).b, 2)
      0.1
    """
    x = np.asarray(w, np.float64).ravel()
    if x.size == 0:
        raise ValueError(f"layer {layer!r}: has no weights to fit")
    if not np.all(np.isfinite(x)):
        raise ValueError(
            f"layer {layer!r}: weights have NaN/inf entries; a Laplace fit needs finite"
        )
    a = np.abs(x)
    b = float(a.mean())
    m = float(a.max())
    if b == 0.0:
        raise ValueError(
            f"layer {layer!r}: all {x.size} weights are zero, so the Laplace scale is 0 and no "
            "pruning threshold or quantization step can be derived; leave the layer out with a "
            "rule (layer, None)"
        )
    if m - a.min() <= 1e-12 * m:
        raise ValueError(
            f"layer {layer!r}: every weight has magnitude {m:g}, a degenerate Laplace fit (the "
            "magnitude ranking that defines the mask is arbitrary); leave the layer out with a rule"
        )
    xs = np.sort(x)
    cdf = np.where(xs < 0, 0.5 * np.exp(xs / b), 1.0 - 0.5 * np.exp(-xs / b))
    i = np.arange(1, x.size + 1)
    ks = float(max(np.max(i / x.size - cdf), np.max(cdf - (i - 1) / x.size)))
    return LaplaceFit(b, m, int(x.size), ks)


def kept_fraction(t, b):
    """``q(t) = P(|w| >= t) = exp(-t/b)`` for ``w ~ Laplace(0, b)``."""
    return np.exp(-np.asarray(t, np.float64) / b)


def prune_error(t, b):
    """Pruning MSE per weight ``E[w² 1{|w| < t}] = 2b² - exp(-t/b)(t² + 2bt + 2b²)`` [derived].

    Example:
      >>> float(prune_error(np.inf, 1.0))   # all pruned: the variance 2b²
      2.0
    """
    t = np.asarray(t, np.float64)
    tf = np.where(np.isinf(t), 0.0, t)
    tail = np.where(np.isinf(t), 0.0, np.exp(-tf / b) * (tf * tf + 2 * b * tf + 2 * b * b))
    return 2 * b * b - tail


def grid_step(m: float, bits: int) -> float:
    """Step of the tensor-wide symmetric min-max grid of ``obcjax.quant`` (``2 m / (2^bits - 1)``)."""
    return 2.0 * m / (2**bits - 1)


def _side_error(t, b, delta, levels, m=np.inf):
    """``∫_t^m (x - Q(x))² e^{-x/b}/(2b) dx`` with ``Q(x) = Δ min(round(x/Δ), levels)``.

    Uses ``∫_lo^hi (x-c)² e^{-x/b}/(2b) dx = (g(lo) - g(hi))/2``,
    ``g(x) = e^{-x/b}((x-c)² + 2b(x-c) + 2b²)`` and ``g(∞) = 0``.
    """
    t = np.asarray(t, np.float64)[..., None]
    k = np.arange(levels + 1, dtype=np.float64)
    c = k * delta
    lo = np.maximum(np.maximum((k - 0.5) * delta, 0.0), t)
    hi = np.minimum(np.where(k == levels, np.inf, (k + 0.5) * delta), m)
    valid = hi > lo

    def g(x):
        d = np.where(np.isinf(x), 0.0, x - c)
        return np.where(np.isinf(x), 0.0, np.exp(-x / b) * (d * d + 2 * b * d + 2 * b * b))

    part = np.where(valid, 0.5 * (g(lo) - g(np.where(valid, hi, lo))), 0.0)
    return part.sum(-1)


def quant_error(t, b, delta, bits: int, m: float = np.inf):
    """Exact quantization MSE per weight of the survivors ``t <= |w| < m`` on the layer's grid.

    The grid is the symmetric one of :mod:`obcjax.quant`: levels ``kΔ`` for
    ``k = -2^(bits-1) … 2^(bits-1) - 1`` (one more on the negative side), weights beyond the last
    level clip to it, survivors below ``Δ/2`` round to 0 and their whole value is error. Pruned
    weights contribute nothing here (see :func:`prune_error`). [derived]

    The Laplace tail is unbounded, but a layer has no weight beyond its ``max|w| = m``; the
    allocation therefore truncates the integral at ``m`` (the mass left out, ``exp(-m/b)``, is
    about ``1/N`` for ``N`` Laplace weights). Without truncation the positive side's clipping of
    the model's tail dominates at high bit-widths, an artefact.

    Args:
      t: threshold(s), any shape. b: Laplace scale. delta: grid step. bits: grid bits.
      m: upper end of the integral (``inf``: the whole Laplace tail, clipped).

    Returns:
      ``E[(w - Q(w))² 1{t <= |w| < m}]``, the shape of ``t``.
    """
    half = 2 ** (bits - 1)
    return _side_error(t, b, delta, half - 1, m) + _side_error(t, b, delta, half, m)


def quant_error_highres(t, b, delta):
    """High-resolution approximation ``exp(-t/b) Δ²/12`` of :func:`quant_error`."""
    return kept_fraction(t, b) * delta * delta / 12.0


def _predict(fit: LaplaceFit, kept: int, bits: int | None) -> tuple[float, float, float]:
    """(threshold, prune MSE, quant MSE) per weight the model predicts for ``kept`` survivors.

    The threshold is the model's ``t`` with ``q(t) = kept/N``; the grid is the tensor-wide
    min-max grid of the kept weights, whose range is ``max|w|`` as long as one weight is kept.
    """
    t = -fit.b * math.log(kept / fit.n) if kept > 0 else math.inf
    ep = float(prune_error(t, fit.b))
    if bits is None or kept == 0:
        return t, ep, 0.0
    eq = float(quant_error(t, fit.b, grid_step(fit.m, bits), bits, fit.m))
    return t, ep, eq


# ----------------------------------------------------------------------------- allocation


def _selected(params, rules) -> tuple[dict[str, Any], dict[str, Any]]:
    from obcjax.rules import match_rules

    layers = find_layers(params)
    if not layers:
        raise ValueError("opq: no layer with a 'kernel' was found in params")
    chosen = match_rules(list(layers), list(rules), what="layer")
    sel = {p: layers[p] for p, v in chosen.items() if v is not None and v is not False}
    if not sel:
        raise ValueError("opq: the rules select no layer to compress")
    return layers, sel


def _totals(
    params, layers, sel, index_bits: float, include_other: bool, granularity: str = "tensor"
):
    """Dense bits and the fixed part of the compressed size (overheads, untouched leaves)."""
    n_all = sum(int(np.size(k)) for k in layers.values())
    other = 0
    if include_other:
        import jax

        other = sum(int(np.size(x)) for x in jax.tree.leaves(params)) - n_all
    n_sel = sum(int(np.size(k)) for k in sel.values())
    dense = 32.0 * (n_all + other)
    grids = sum(1 if granularity == "tensor" else int(np.shape(k)[-1]) for k in sel.values())
    fixed = 32.0 * (n_all - n_sel + other) + CODEBOOK_BITS * grids
    fixed += index_bits * n_sel
    return dense, fixed


def _omega(weighting: str, fit: LaplaceFit) -> float:
    if weighting == "relative":
        return 1.0 / (2.0 * fit.n * fit.b * fit.b)
    if weighting == "energy":
        return 1.0 / (2.0 * fit.b * fit.b)
    return 1.0


def _check_common(rate, bits_choices, weighting, index_bits):
    rate = sizes.as_ratio(rate, "opq: rate")  # 8, 8.0 or "8x"
    bits = sorted({int(b) for b in bits_choices})
    if not bits or bits[0] < 2 or bits[-1] > 8:
        raise ValueError(
            f"opq: bits_choices must be non-empty ints in 2..8, got {list(bits_choices)}"
        )
    if weighting not in WEIGHTINGS:
        raise ValueError(f"opq: weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (index_bits >= 0):
        raise ValueError(f"opq: index_bits must be >= 0, got {index_bits}")
    return rate, bits


def opq_plan(
    params,
    rate: float | str,
    *,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    bits_choices: Iterable[int] = range(2, 9),
    weighting: str = "relative",
    index_bits: float = 0.0,
    include_other: bool = False,
    max_ks: float | None = None,
    solver: str = "magnitude",
    granularity: str = "tensor",
) -> OPQPlan:
    """OPQ allocation with its diagnostics; see :func:`opq_allocate` for the arguments.

    Returns:
      An :class:`OPQPlan`.
    """
    rate, bits = _check_common(rate, bits_choices, weighting, index_bits)
    if granularity not in ("tensor", "channel"):
        raise ValueError(
            f"opq: granularity must be 'tensor' (one unified codebook per layer, OPQ) or "
            f"'channel' (one grid per output channel), got {granularity!r}"
        )
    layers, sel = _selected(params, rules)
    paths = list(sel)
    fits = {}
    for p in paths:
        f = fit_laplace(sel[p], p)
        if max_ks is not None and f.ks > max_ks:
            raise ValueError(
                f"layer {p!r}: the Laplace fit is poor (KS statistic {f.ks:.3f} > max_ks={max_ks}); "
                "the analytic allocation would not describe this layer -- raise max_ks or leave "
                "the layer out with a rule"
            )
        fits[p] = f
    dense, fixed = _totals(params, layers, sel, index_bits, include_other, granularity)
    budget = dense / rate
    N = np.array([fits[p].n for p in paths], np.float64)
    B = np.array([fits[p].b for p in paths], np.float64)
    M = np.array([fits[p].m for p in paths], np.float64)
    W = np.array([_omega(weighting, fits[p]) for p in paths], np.float64)
    bits_arr = np.array(bits, np.float64)
    lo_size = fixed + float(bits[0]) * len(paths)  # one weight per layer at the fewest bits
    hi_size = fixed + float(N.sum()) * bits[-1]
    if budget < lo_size:
        raise ValueError(
            f"opq: rate {rate:g}x is unreachable: even one kept weight per layer at {bits[0]} bits "
            f"plus overheads needs {lo_size:.0f} bits, over the budget {budget:.0f}; the highest "
            f"reachable rate is {dense / lo_size:.4g}x (drop index_bits/include_other or compress "
            "more layers)"
        )
    if budget >= hi_size:
        raise ValueError(
            f"opq: rate {rate:g}x is below what OPQ allocates: every selected weight kept at "
            f"{bits[-1]} bits already gives {dense / hi_size:.4g}x; ask for a rate above that or "
            "allow more bits"
        )
    # Per layer and bit-width: the grid step and the exact error at any threshold.
    D = np.array([[grid_step(m, b) for b in bits] for m in M])  # (L, nb)

    def choose(lam):
        # Closed-form stationary threshold of the high-resolution Lagrangian, per (layer, bits).
        t = np.sqrt(lam * bits_arr[None] / W[:, None] + D * D / 12.0)
        q = np.exp(-t / B[:, None])
        e = np.empty_like(t)
        for i in range(len(paths)):
            for j, b in enumerate(bits):
                e[i, j] = prune_error(t[i, j], B[i]) + quant_error(t[i, j], B[i], D[i, j], b, M[i])
        lag = W[:, None] * N[:, None] * e + lam * N[:, None] * q * bits_arr[None]
        j = np.argmin(lag, axis=1)
        rows = np.arange(len(paths))
        return j, t[rows, j], q[rows, j]

    def size_of(q, bsel):
        return fixed + float(np.sum(N * q * bsel))

    # λ brackets: scale-free via t/b; sizes fall as λ grows (the minimiser of L_i moves to smaller
    # size), so log-bisection finds the smallest λ whose continuous size fits the budget.
    lam_lo, lam_hi = 1e-30, 1.0
    while size_of(*(lambda r: (r[2], bits_arr[r[0]]))(choose(lam_hi))) > budget:
        lam_hi *= 10.0
        if lam_hi > 1e60:
            raise ValueError(f"opq: could not bracket the Lagrange multiplier for rate {rate:g}x")
    for _ in range(200):
        mid = math.sqrt(lam_lo * lam_hi)
        j, _, q = choose(mid)
        if size_of(q, bits_arr[j]) > budget:
            lam_lo = mid
        else:
            lam_hi = mid
        if lam_hi / lam_lo < 1 + 1e-12:
            break
    jsel, _, _ = choose(lam_hi)
    bsel = bits_arr[jsel]
    dsel = D[np.arange(len(paths)), jsel]

    # Second stage, bit-widths fixed: the continuous size is monotone in μ; bisect exactly.
    def fixed_q(mu):
        t = np.sqrt(mu * bsel / W + dsel * dsel / 12.0)
        return np.exp(-t / B)

    mu_lo, mu_hi = lam_lo * 1e-6, lam_hi * 1e6
    while size_of(fixed_q(mu_hi), bsel) > budget:
        mu_hi *= 10.0
    for _ in range(300):
        mid = math.sqrt(mu_lo * mu_hi)
        if size_of(fixed_q(mid), bsel) > budget:
            mu_lo = mid
        else:
            mu_hi = mid
        if mu_hi / mu_lo < 1 + 1e-14:
            break
    kept = np.clip(np.floor(N * fixed_q(mu_hi)), 1, N).astype(np.int64)
    ib = bsel.astype(np.int64)
    size = fixed + float(np.sum(kept * ib))
    while size > budget:  # floor of a fit-to-budget size can only shrink; guard the clip at 1
        i = int(np.argmax(np.where(kept > 1, kept * ib, -1)))
        kept[i] -= 1
        size -= ib[i]

    # Integer fill: the next weight of layer i has magnitude ≈ its threshold t; keeping it saves
    # ω (t² - Δ²/12) of error for bits_i bits.
    def gain(i):
        t = -B[i] * math.log(kept[i] / N[i]) if kept[i] < N[i] else 0.0
        return W[i] * (t * t - dsel[i] ** 2 / 12.0) / ib[i]

    heap = [(-gain(i), i) for i in range(len(paths)) if kept[i] < N[i]]
    heapq.heapify(heap)
    while heap:
        g, i = heapq.heappop(heap)
        if budget - size >= ib[i]:
            kept[i] += 1
            size += ib[i]
            if kept[i] < N[i]:
                heapq.heappush(heap, (-gain(i), i))

    specs, kept_d, bits_d, thr, ep, eq = {}, {}, {}, {}, {}, {}
    for i, p in enumerate(paths):
        n = int(N[i])
        k = int(kept[i])
        b = int(ib[i])
        quant = Int(bits=b, sym=True, search="minmax", granularity=granularity)
        prune = Unstructured((n - k) / n) if k < n else None
        specs[p] = LayerSpec(prune=prune, quant=quant, solver=solver)
        kept_d[p], bits_d[p] = k, b
        thr[p], ep[p], eq[p] = _predict(fits[p], k, b)
    return OPQPlan(specs, fits, kept_d, bits_d, thr, ep, eq, lam_hi, budget, size, dense)


def opq_allocate(
    params,
    rate: float | str,
    *,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    bits_choices: Iterable[int] = range(2, 9),
    weighting: str = "relative",
    index_bits: float = 0.0,
    include_other: bool = False,
    max_ks: float | None = None,
    solver: str = "magnitude",
    granularity: str = "tensor",
) -> dict[str, LayerSpec]:
    """Per-layer pruning ratio and bit-width of the unified codebook, from the weights alone.

    Args:
      params: a Flax params pytree (layers = dicts holding a ``"kernel"``).
      rate: target compression vs fp32, ``8``, ``8.0`` or ``"8x"`` (:func:`obcjax.sizes.as_ratio`;
        the planner's count ``plan_dense_bits / plan_bits``, see :func:`count_bits`); met
        to within one weight from below (size ≤ budget < size + max bits).
      rules: ordered ``(regex, value)`` pairs choosing the layers (value None: leave dense).
      bits_choices: bit-widths a layer may get (2..8).
      weighting: ``"relative"`` (default), ``"energy"`` or ``"sse"``; see the module docstring.
      index_bits: mask overhead per weight of each selected layer (0: not counted).
      include_other: count biases and other leaves at 32 bits on both sides.
      max_ks: raise if a layer's Laplace fit has a KS statistic above this.
      solver: the LayerSpec solver (``"magnitude"`` = OPQ; ``"obc"`` = the OPQ+OBS hybrid).
      granularity: ``"tensor"`` (OPQ's unified codebook, one grid per layer) or ``"channel"``
        (one grid per output channel, 32 bits each, charged to the budget: the equal-rate
        per-channel comparison). [ours] The error model stays the tensor-wide grid's, an
        upper bound on a per-channel grid's error.

    Returns:
      ``{path: LayerSpec(prune=Unstructured(s) or None, quant=Int(b, granularity=granularity,
      search='minmax'), solver=solver)}``.

    Raises:
      ValueError: unreachable rate (too high or below the no-pruning 8-bit rate), an all-zero or
        degenerate layer, a poor fit under ``max_ks``, bad arguments.

    Example:
      >>> from obcjax import zoo
      >>> variables = zoo.init_variables("lenet5", (8, 8, 1))
      >>> alloc = opq_allocate(variables["params"], 20.0, rules=[("conv1", None), (".*", True)])
      >>> sorted(alloc), alloc["fc1"].quant.bits     # conv1 left dense, 32 bits in the count
      (['conv2', 'fc1', 'fc2', 'fc3'], 3)
    """
    return opq_plan(
        params,
        rate,
        rules=rules,
        bits_choices=bits_choices,
        weighting=weighting,
        index_bits=index_bits,
        include_other=include_other,
        max_ks=max_ks,
        solver=solver,
        granularity=granularity,
    ).specs


def uniform_allocate(
    params,
    rate: float | str,
    *,
    bits: int = 4,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    index_bits: float = 0.0,
    include_other: bool = False,
    solver: str = "magnitude",
) -> dict[str, LayerSpec]:
    """Baseline: the same sparsity and bit-width in every layer, at the same size count as OPQ.

    Kept counts are ``floor(N_i q)`` for the largest common kept fraction ``q`` that fits, then
    the leftover bits go one weight at a time to the layers in order, so the rate is met as
    exactly as :func:`opq_allocate` meets it.

    Example:
      >>> from obcjax import zoo
      >>> variables = zoo.init_variables("lenet5", (8, 8, 1))
      >>> alloc = uniform_allocate(variables["params"], 20.0, bits=4)
      >>> {lv.quant.bits for lv in alloc.values()}
      {4}
    """
    rate, _ = _check_common(rate, [bits], "sse", index_bits)
    layers, sel = _selected(params, rules)
    dense, fixed = _totals(params, layers, sel, index_bits, include_other)
    budget = dense / rate
    paths = list(sel)
    N = np.array([int(np.size(sel[p])) for p in paths], np.int64)
    for p in paths:
        fit_laplace(sel[p], p)  # same input checks as OPQ
    q = (budget - fixed) / (bits * N.sum())
    if q * N.min() < 1 or q > 1:
        lo, hi = dense / (fixed + bits * len(paths)), dense / (fixed + bits * N.sum())
        raise ValueError(
            f"uniform_allocate: rate {rate:g}x is out of reach at {bits} bits; reachable rates "
            f"lie in [{hi:.4g}x, {lo:.4g}x) (one weight per smallest layer bounds the top)"
        )
    kept = np.floor(N * q).astype(np.int64)
    size = fixed + bits * kept.sum()
    i = 0
    while budget - size >= bits and np.any(kept < N):
        if kept[i % len(paths)] < N[i % len(paths)]:
            kept[i % len(paths)] += 1
            size += bits
        i += 1
    quant = Int(bits=bits, sym=True, search="minmax", granularity="tensor")
    return {
        p: LayerSpec(
            prune=Unstructured((int(n) - int(k)) / int(n)) if k < n else None,
            quant=quant,
            solver=solver,
        )
        for p, n, k in zip(paths, N, kept, strict=True)
    }


def plan_rules(allocation: Mapping[str, LayerSpec], *, solver: str | None = None) -> list:
    """``[(re.escape(path), LayerSpec)]`` rules for :func:`obcjax.transforms.compress`.

    ``solver`` replaces every spec's solver (``"obc"`` gives the OPQ+OBS hybrid).

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> rules = plan_rules(opq_allocate(params, 20.0), solver="obc")  # for compress(params, stats, rules)
      >>> rules[2][0], rules[2][1].solver
      ('fc1', 'obc')
    """
    out = []
    for p, s in allocation.items():
        if not isinstance(s, LayerSpec):
            raise TypeError(f"layer {p!r}: allocation values must be LayerSpec, got {s!r}")
        if solver is not None:
            s = LayerSpec(prune=s.prune, quant=s.quant, solver=solver)
        out.append((re.escape(p), s))
    return out


def opq_compress(
    params,
    allocation: Mapping[str, LayerSpec],
    *,
    stats: Mapping[str, Any] | None = None,
    solver: str | None = None,
    rel_damp: float = 0.01,
) -> Compressed:
    """Apply an allocation: magnitude masks + one shared (tensor-wide) codebook per layer.

    Without ``stats`` no data is used: each layer's kernel (flattened as one ``(out, cols)``
    matrix; a tensor-wide grid and a layer-wide magnitude ranking do not depend on conv groups)
    is magnitude-pruned to its spec's sparsity and the survivors rounded to the grid found on the
    pruned kernel -- exactly what ``compress(..., solver='magnitude')`` does, without Hessians.
    With ``stats`` this is ``compress(params, stats, plan_rules(allocation, solver=solver))``; with
    ``solver='obc'`` that is the OPQ+OBS hybrid (ExactOBS pruning + OBQ on OPQ's allocation).

    Returns:
      A :class:`obcjax.transforms.Compressed` (``losses`` empty without stats).

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> out = opq_compress(params, opq_allocate(params, 20.0))
      >>> out.specs["fc1"].name
      '49.5312%+w3t'
      >>> # the OPQ+OBS hybrid on one layer, with its calibration statistics
      >>> from obcjax.stats import hessian_init, hessian_update
      >>> x = np.random.default_rng(0).normal(size=(256, 84))        # fc3's inputs
      >>> stats = {"fc3": hessian_update(hessian_init(84), x)}
      >>> alloc = {"fc3": opq_allocate(params, 20.0)["fc3"]}
      >>> hybrid = opq_compress(params, alloc, stats=stats, solver="obc")
    """
    if stats is not None:
        return compress(params, stats, plan_rules(allocation, solver=solver), rel_damp=rel_damp)
    if solver not in (None, "magnitude"):
        raise ValueError(f"opq_compress: solver={solver!r} needs calibration stats (stats=...)")
    layers = find_layers(params)
    missing = [p for p in allocation if p not in layers]
    if missing:
        raise ValueError(f"opq_compress: allocation names layer(s) {missing} absent from params")
    new_params, masks, qarrays = params, {}, {}
    for path, spec in allocation.items():
        kernel = jnp.asarray(layers[path])
        W = kernel_to_matrices(kernel, 1)[0].astype(jnp.float32)
        mask = None
        if spec.prune is not None:
            if not isinstance(spec.prune, Unstructured):
                raise ValueError(f"layer {path!r}: OPQ masks are unstructured, got {spec.prune!r}")
            r = K.magnitude_prune(W, spec.prune.sparsity, layer=path)
            W, mask = r.weights, r.mask
        if spec.quant is not None:
            rq = K.rtn_quantize(W, spec.quant, layer=path)
            W = rq.weights if mask is None else jnp.where(mask, rq.weights, 0.0)
            qarrays[path] = rq.qarray
        new_params = set_path(
            new_params, path, "kernel", matrices_to_kernel([W], kernel.shape, kernel.dtype)
        )
        if mask is not None:
            masks[path] = matrices_to_kernel([mask.astype(jnp.float32)], kernel.shape) > 0
    specs = dict(allocation)
    return Compressed.from_flat(new_params, masks, qarrays, {}, specs)


def _grids(quant: Int, kernel_shape) -> int:
    """Number of (scale, zero) grids a layer stores for ``quant`` (one per row of each group)."""
    if quant.granularity == "tensor":
        return 1
    rows = int(kernel_shape[-1])
    if quant.granularity == "channel":
        return rows
    cols = int(np.prod(kernel_shape[:-1]))
    return rows * (cols // quant.group_size)


def _codebook_bits(grids: int, bits: int, sym: bool) -> float:
    # a symmetric grid's zero point follows from the bit-width; an asymmetric one stores it
    return grids * (CODEBOOK_BITS + (0 if sym else bits))


def _other_leaves(params, layers) -> int:
    import jax

    return sum(int(np.size(x)) for x in jax.tree.leaves(params)) - sum(
        int(np.size(k)) for k in layers.values()
    )


def count_bits(
    params,
    allocation: Mapping[str, LayerSpec],
    masks: Mapping[str, Any] | None = None,
    *,
    index_bits: float = 0.0,
    include_other: bool = False,
) -> dict[str, float]:
    """Size of an allocation, from stored masks when given (else from the specs): the size
    (:mod:`obcjax.sizes`, the one definition) and the planner's count.

    ``size_bits``, ``dense_bits`` and ``rate`` are those of :mod:`obcjax.sizes` (kept values +
    mask bits + grids, every other leaf at 32 bits): the numbers
    :func:`obcjax.transforms.summarize` and :mod:`obcjax.export` give for the compressed model.
    ``plan_bits``, ``plan_dense_bits`` and ``plan_rate`` are the count :func:`opq_allocate`'s
    ``rate`` targets (the OPQ paper's, which leaves the mask out):
    kept weights × bits + :data:`CODEBOOK_BITS` per stored grid (one per layer for the unified
    ``granularity='tensor'`` codebook of OPQ, one per output channel for ``'channel'``, one per
    row and group for ``'group'``; plus ``bits`` for the zero point of an asymmetric grid) +
    ``index_bits`` per weight of each allocated layer (as the planner counts it); layers outside
    ``allocation`` at 32 bits per weight. See :func:`count_stored` for the count from a
    :class:`~obcjax.transforms.Compressed` record alone.

    Returns:
      ``{"dense_bits", "size_bits", "rate", "plan_dense_bits", "plan_bits", "plan_rate"}`` and
      per layer ``"<path>/kept"``, ``"<path>/bits"``.

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> alloc = opq_allocate(params, 20.0)
      >>> round(count_bits(params, alloc)["plan_rate"], 2)     # from the specs alone
      20.0
      >>> out = opq_compress(params, alloc)
      >>> c = count_bits(params, alloc, out.masks)            # the stored mask tree
      >>> round(c["plan_rate"], 2), c["size_bits"] == out.summary["total/size_bits"]
      (20.0, True)
    """
    layers = find_layers(params)
    masks = _layer_masks(masks)
    dense = 0.0
    size = 0.0
    out: dict[str, float] = {}
    sized = {}
    for p, k in layers.items():
        n = int(np.size(k))
        dense += 32.0 * n
        spec = allocation.get(p)
        if spec is None:
            size += 32.0 * n
            continue
        if p in masks:
            kept = int(np.count_nonzero(np.asarray(masks[p])))
        elif spec.prune is not None:
            kept = n - int(math.floor(spec.prune.sparsity * n + 0.5))
        else:
            kept = n
        q = spec.quant
        bits = q.bits if q is not None else 32
        size += kept * bits
        if q is not None:
            size += _codebook_bits(_grids(q, np.shape(k)), q.bits, q.sym)
        sized[p] = sizes.layer_size(np.shape(k), prune=spec.prune, bits=None if q is None else
                                    q.bits, kept=kept, grids=_grids(q, np.shape(k)) if q else 0)
        size += index_bits * n
        out[f"{p}/kept"] = kept
        out[f"{p}/bits"] = bits
    if include_other:
        other = _other_leaves(params, layers)
        dense += 32.0 * other
        size += 32.0 * other
    return _totals_out(out, params, sized, dense, size)


def _totals_out(out, params, sized, plan_dense, plan_size) -> dict[str, float]:
    total = sizes.model_size(params, sized)
    out.update(dense_bits=total["dense_bits"], size_bits=total["size_bits"], rate=total["ratio"],
               plan_dense_bits=plan_dense, plan_bits=plan_size, plan_rate=plan_dense / plan_size)
    return out


def _layer_masks(masks) -> dict[str, Any]:
    """``{path: mask}`` of a params-shaped mask tree (``Compressed.masks``) or of a dict keyed by
    layer path."""
    if not masks:
        return {}
    if any(isinstance(v, Mapping) for v in masks.values()):
        return {p: m for p, m in find_layers(masks).items() if m is not None}
    return dict(masks)


def count_stored(
    params, compressed: Compressed, *, index_bits: float = 0.0, include_other: bool = False
) -> dict[str, float]:
    """Size read from what a :class:`~obcjax.transforms.Compressed` record stores.

    ``size_bits`` / ``rate`` are those of :mod:`obcjax.sizes` (kept values + mask bits + grids,
    every other leaf at 32 bits), equal to ``compressed.summary``'s; ``plan_bits`` /
    ``plan_rate`` are the planner's count, as in :func:`count_bits`. For the planner's count no
    spec is consulted: kept weights are the True entries of the
    stored mask (every weight when a layer has none), bits are the stored ``QArray.bits``, and the
    number of grids is 1 when every stored ``(scale, zero)`` row is the same (a unified
    codebook) and the number of stored rows otherwise. Each grid costs :data:`CODEBOOK_BITS` (a symmetric grid's zero
    point, ``2^(bits-1)`` everywhere, is implied; any other zero point costs ``bits`` more).
    ``index_bits`` is charged per weight of every layer with a mask or a QArray.

    Args:
      params: the ORIGINAL params (for the dense count and the untouched layers).
      compressed: the record of :func:`opq_compress` or :func:`obcjax.transforms.compress`.

    Returns:
      As :func:`count_bits`.

    Raises:
      ValueError: a mask whose shape differs from its kernel, or a stored code outside its
        ``bits`` (the record is inconsistent).

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> out = opq_compress(params, opq_allocate(params, 20.0))
      >>> round(count_stored(params, out)["plan_rate"], 2)  # 20.0 up to one weight
      20.0
    """
    layers = find_layers(params)
    dense = size = 0.0
    out: dict[str, float] = {}
    sized = {}
    for p, k in layers.items():
        n = int(np.size(k))
        dense += 32.0 * n
        mask = compressed.mask(p)
        q = compressed.qarray(p)
        if mask is None and q is None:
            size += 32.0 * n
            continue
        if mask is not None:
            mask = np.asarray(mask)
            if mask.shape != tuple(np.shape(k)):
                raise ValueError(
                    f"layer {p!r}: stored mask has shape {mask.shape}, kernel {np.shape(k)}"
                )
            kept = int(np.count_nonzero(mask))
        else:
            kept = n
        if q is None:
            bits, book = 32, 0.0
        else:
            bits = int(q.bits)
            codes_max = int(np.max(np.asarray(q.codes)))
            if codes_max > 2**bits - 1:
                raise ValueError(
                    f"layer {p!r}: a stored code ({codes_max}) does not fit in {bits} bits"
                )
            sc = np.asarray(q.scale).ravel()
            ze = np.asarray(q.zero).ravel()
            # one shared grid is a unified codebook; otherwise every stored row is a grid
            unified = bool(np.all(sc == sc[0]) and np.all(ze == ze[0]))
            grids = 1 if unified else sc.size
            sym = bool(np.all(ze == 2 ** (bits - 1)))
            book = _codebook_bits(grids, bits, sym)
        size += kept * bits + book + index_bits * n
        spec = compressed.specs.get(p)
        sized[p] = sizes.stored_layer_size(k, None if spec is None else spec.prune, mask, q)
        out[f"{p}/kept"] = kept
        out[f"{p}/bits"] = bits
    if include_other:
        other = _other_leaves(params, layers)
        dense += 32.0 * other
        size += 32.0 * other
    return _totals_out(out, params, sized, dense, size)


def predict_errors(params, allocation: Mapping[str, LayerSpec]) -> dict[str, dict[str, float]]:
    """Per-weight pruning and quantization MSE the Laplace model predicts for an allocation.

    Works for any allocation with magnitude masks and tensor-wide symmetric min-max grids
    (OPQ's, :func:`uniform_allocate`'s): each layer's kept count comes from its spec, the
    threshold from ``q(t) = kept/N`` and the errors from :func:`prune_error` and
    :func:`quant_error` (truncated at ``max|w|``). [derived]

    Returns:
      ``{path: {"threshold", "kept", "bits", "pred_prune_mse", "pred_quant_mse"}}``.

    Raises:
      ValueError: a layer whose grid the model does not describe (per-channel or per-group,
        asymmetric, or an ``'lp'`` range search), or a non-unstructured mask, naming the layer.

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> pred = predict_errors(params, opq_allocate(params, 20.0))["fc1"]
      >>> pred["kept"], pred["bits"]
      (3876, 3)
    """
    layers = find_layers(params)
    out = {}
    for p, spec in allocation.items():
        if p not in layers:
            raise ValueError(f"predict_errors: layer {p!r} is not in params")
        q = spec.quant
        if q is not None and (q.granularity != "tensor" or not q.sym or q.search != "minmax"):
            raise ValueError(
                f"layer {p!r}: the Laplace model predicts the tensor-wide symmetric min-max grid "
                f"only, got {q!r}"
            )
        if spec.prune is not None and not isinstance(spec.prune, Unstructured):
            raise ValueError(f"layer {p!r}: OPQ masks are unstructured, got {spec.prune!r}")
        fit = fit_laplace(layers[p], p)
        s = spec.prune.sparsity if spec.prune is not None else 0.0
        kept = fit.n - int(math.floor(s * fit.n + 0.5))
        t, ep, eq = _predict(fit, kept, None if q is None else q.bits)
        out[p] = {
            "threshold": t,
            "kept": kept,
            "bits": None if q is None else q.bits,
            "pred_prune_mse": ep,
            "pred_quant_mse": eq,
        }
    return out


def measure_errors(
    params, compressed: Compressed, stats: Mapping[str, Any] | None = None
) -> dict[str, dict[str, float]]:
    """Measured per-weight errors of a compressed model, split as :func:`predict_errors` splits.

    ``prune_mse = mean(w² over pruned)`` and ``quant_mse = mean((w - ŵ)² over kept)``, both
    divided by the layer's full weight count N (the normalisation of the predictions). For the
    OPQ+OBS hybrid the kept weights are also moved by the OBS updates; that shows up in
    ``quant_mse``. With ``stats`` (calibration Hessians) also the relative output error
    ``tr(D H Dᵀ) / tr(W H Wᵀ)``, ``D = Ŵ - W``, of each layer on the calibration inputs.

    Returns:
      ``{path: {"meas_prune_mse", "meas_quant_mse"[, "rel_out_err"]}}`` for every layer in
      ``compressed.specs``.

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> alloc = opq_allocate(params, 20.0)
      >>> sorted(measure_errors(params, opq_compress(params, alloc))["fc1"])  # stats=: rel_out_err
      ['meas_prune_mse', 'meas_quant_mse']
    """
    from obcjax.stats import hessian_finalize

    layers = find_layers(params)
    out = {}
    for p in compressed.specs:
        w = np.asarray(layers[p], np.float64)
        c = np.asarray(find_layers(compressed.params)[p], np.float64)
        m = compressed.mask(p)
        m = np.ones(w.shape, bool) if m is None else np.asarray(m)
        row = {
            "meas_prune_mse": float(np.mean(np.where(m, 0.0, w * w))),
            "meas_quant_mse": float(np.mean(np.where(m, (w - c) ** 2, 0.0))),
        }
        if stats is not None and p in stats:
            H = np.asarray(hessian_finalize(stats[p], layer=p), np.float64)
            G = H.shape[0]
            Ws = [np.asarray(x, np.float64) for x in kernel_to_matrices(w, G)]
            Cs = [np.asarray(x, np.float64) for x in kernel_to_matrices(c, G)]
            num = sum(np.sum(((C - W) @ Hg) * (C - W)) for W, C, Hg in zip(Ws, Cs, H, strict=True))
            den = sum(np.sum((W @ Hg) * W) for W, Hg in zip(Ws, H, strict=True))
            row["rel_out_err"] = float(num / den) if den > 0 else math.nan
        out[p] = row
    return out


def kernel_codebooks(params, qarrays) -> dict[str, Any]:
    """Frozen codebooks for :mod:`obcjax.training` from stored QArrays, unified or per channel.

    A layer whose stored grid is one ``(scale, zero)`` gets a scalar (unified) codebook, as
    :func:`obcjax.training.codebooks_from_qarrays` gives; a per-output-channel grid gets
    ``scale``/``zero`` of the kernel's output shape (``(out,)`` for Dense ``(in, out)`` and conv
    ``(..., in/G, out)``), which broadcasts against the kernel. This is what the
    unified-vs-per-channel comparison fine-tunes with.

    Args:
      params: the params the QArrays belong to.
      qarrays: ``Compressed.qarrays``, the params-shaped tree of kernel-layout QArrays (None
        where a layer is not quantized).

    Raises:
      ValueError: per-group grids (several scales per output channel), or a layer not in params.

    Example:
      >>> from obcjax import zoo
      >>> params = zoo.init_variables("lenet5", (8, 8, 1))["params"]
      >>> alloc_channel = opq_allocate(params, 20.0, granularity="channel")
      >>> cbs = kernel_codebooks(params, opq_compress(params, alloc_channel).qarrays)
      >>> cbs["fc1"].scale.shape                         # one grid per output channel
      (120,)
    """
    from obcjax.training import Codebook

    layers = find_layers(params)
    out = {}
    for p, q in find_layers(qarrays).items():
        if q is None:
            continue
        if p not in layers:
            raise ValueError(f"kernel_codebooks: layer {p!r} is not in params")
        s, z = np.asarray(q.scale), np.asarray(q.zero)  # (ngroups, *output axes)
        if s.shape[0] != 1:
            raise ValueError(
                f"layer {p!r}: {s.shape[0]} grids per output channel (granularity='group'); a "
                "frozen codebook needs one grid per layer or per output channel"
            )
        s, z = s[0], z[0]
        if tuple(np.shape(q.codes)) != tuple(np.shape(layers[p])):
            raise ValueError(f"layer {p!r}: stored grids do not match the kernel's channels")
        if np.all(s == s.flat[0]) and np.all(z == z.flat[0]):
            out[p] = Codebook(jnp.asarray(s.flat[0]), jnp.asarray(z.flat[0]), int(q.bits))
        else:
            out[p] = Codebook(jnp.asarray(s), jnp.asarray(z), int(q.bits))
    return out
