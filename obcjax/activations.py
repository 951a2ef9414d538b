"""Activation quantization at layer inputs of unmodified Flax models (the "A" of OBC's WxAy).

OBC (Frantar, Singh, Alistarh, NeurIPS 2022) quantizes the input of every compressed layer with
one asymmetric per-tensor grid whose range is calibrated on calibration batches, by min-max or by
the same Lp-norm (p = 2.4) shrink search the weight grid uses, *after* the weights have been
compressed (so the ranges describe the inputs the compressed model really produces); batch-norm
statistics are re-estimated last. For transformer inputs a dynamic per-token grid (one absmax
scale per token, computed at run time, as in LLM.int8 / SmoothQuant) is offered next to it.

* :class:`ActSpec` says how one layer input is quantized: 4..8 bits, symmetric or asymmetric,
  ``granularity="tensor"`` (static, calibrated) or ``"token"`` (dynamic, Dense layers only).
* :func:`calibrate_activations` collects each matched layer's input range and a bounded,
  deterministic sample of its rows, and fits one grid per layer (``ActQuant``). Rules choose the
  layers and may give each its own spec (the mixed levels of :mod:`obcjax.allocation`).
* :func:`activation_forward` turns a forward function into one whose matched layers see
  fake-quantized inputs ``x̂ = s·(clip(round(x/s) + z, 0, 2^b − 1) − z)``; it plugs into
  ``model.apply``-style evaluation, :func:`obcjax.calibration.calibrate` and
  :func:`obcjax.pipeline.reestimate_batchnorm` (all take ``forward=``).
* :func:`integer_layer` is the deployable reference: codes × codes accumulated in int32 and
  rescaled once, for Dense (per-tensor or per-token) and Conv (grouped/depthwise included). The
  tests check that the fake-quantized float forward equals it, so the simulated accuracy is the
  deployable one.
* :func:`activation_errors` measures, per layer and bit-width, the per-channel mean squared error
  the activation grid adds; :func:`obcjax.allocation.build_database` turns it into the activation
  part of each mixed level's loss.
* :func:`compress_mixed` / :func:`calibrate_mixed` apply a per-layer choice of weight and
  activation levels in OBC's order: weights, then activation ranges on the compressed model's
  inputs, then batch-norm re-estimation through the quantized forward.

Model code is never edited: layers are intercepted by :mod:`obcjax.capture` (Linen through
``nn.intercept_methods``; NNX layer classes' ``__call__`` wrapped for the duration of one call only).

Example:
    >>> from obcjax import zoo
    >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
    >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
    >>> aq = calibrate_activations(model, v, batches, ActSpec(8), rules=[("conv1", None), ".*"])
    >>> logits = apply_quantized(model, v, batches[0], aq)   # fake-quantized layer inputs
    >>> list(aq), aq["fc1"].bits
    (['conv2', 'fc1', 'fc2', 'fc3'], 8)
    >>> # mixed budget: database + DP, then weights -> activation ranges -> BN (compress_mixed)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from obcjax.capture import BoundModel, input_hook, intercept, layer_kinds, layer_rows
from obcjax.quant import find_params
from obcjax.rules import match_rules, normalize_rules
from obcjax.specs import Int

__all__ = [
    "ActSpec",
    "ActQuant",
    "MixedResult",
    "calibrate_activations",
    "activation_errors",
    "activation_forward",
    "apply_quantized",
    "quantized_apply",
    "fake_quantize",
    "codes",
    "act_grid",
    "integer_layer",
    "calibrate_mixed",
    "compress_mixed",
    "mixed_database",
    "ActErrorStats",
    "activation_error_stats",
]

MIN_BITS, MAX_BITS = 4, 8


@dataclasses.dataclass(frozen=True)
class ActSpec:
    """How one layer input is quantized.

    Attributes:
      bits: 4..8.
      sym: symmetric grid. Default: asymmetric for ``"tensor"`` (OBC's default), symmetric for
        ``"token"``. A symmetric per-tensor grid is the weights' one (zero point ``2^(b−1)``,
        ``scale = 2·absmax/(2^b − 1)``); a symmetric per-token grid maps each token's absmax to
        ``±(2^(b−1) − 1)`` (``scale = absmax/(2^(b−1) − 1)``, nothing clipped).
      search: ``"lp"`` (the reference's shrink search, p = 2.4, default for ``"tensor"``) or
        ``"minmax"``; a per-token grid is dynamic and always min-max / absmax.
      granularity: ``"tensor"``: one static grid per layer input, calibrated; ``"token"``: one
        grid per token (per row of the last axis), computed on the fly; Dense layers only, since a
        convolution mixes positions that would carry different scales.
      p, maxshrink, grid: the Lp search (see :mod:`obcjax.quant`).

    Example:
        >>> ActSpec(4)                              # OBC: asymmetric per-tensor, Lp search
        ActSpec(bits=4, sym=False, search='lp', granularity='tensor', p=2.4, maxshrink=0.8, grid=100)
        >>> ActSpec(8, granularity="token")         # transformers: dynamic symmetric per-token
        ActSpec(bits=8, sym=True, search='minmax', granularity='token', p=2.4, maxshrink=0.8, grid=100)
    """

    bits: int = 8
    sym: bool | None = None
    search: str | None = None
    granularity: str = "tensor"
    p: float = 2.4
    maxshrink: float = 0.8
    grid: int = 100

    def __post_init__(self):
        if self.granularity not in ("tensor", "token"):
            raise ValueError(
                f"ActSpec: granularity must be 'tensor' or 'token', got {self.granularity!r}"
            )
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, np.integer)):
            raise TypeError(
                f"ActSpec: bits must be an int in {MIN_BITS}..{MAX_BITS}, got {self.bits!r}"
            )
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ValueError(
                f"ActSpec: activation bits must be in {MIN_BITS}..{MAX_BITS}, got {self.bits}"
            )
        token = self.granularity == "token"
        if self.sym is None:
            object.__setattr__(self, "sym", token)
        if self.search is None:
            object.__setattr__(self, "search", "minmax" if token else "lp")
        if self.search not in ("lp", "minmax"):
            raise ValueError(f"ActSpec: search must be 'lp' or 'minmax', got {self.search!r}")
        if token and self.search == "lp":
            raise ValueError(
                "ActSpec: a per-token grid is dynamic (absmax of each token at run time) and has "
                "no calibrated range to search; use search='minmax' or granularity='tensor'"
            )
        object.__setattr__(self, "bits", int(self.bits))

    @property
    def name(self) -> str:
        return (
            f"a{self.bits}{'' if self.sym else 'a'}{'tok' if self.granularity == 'token' else ''}"
        )


DEFAULT_SPEC = ActSpec(8)


def as_act_spec(value, layer: str = "activations") -> ActSpec:
    """An :class:`ActSpec` from an ``ActSpec`` or an :class:`~obcjax.specs.Int` (per-tensor)."""
    if isinstance(value, ActSpec):
        return value
    if isinstance(value, Int):
        if not MIN_BITS <= value.bits <= MAX_BITS:
            raise ValueError(
                f"{layer}: activation bits must be in {MIN_BITS}..{MAX_BITS}, got {value.bits}"
            )
        return ActSpec(
            value.bits,
            sym=value.sym,
            search=value.search,
            p=value.p,
            maxshrink=value.maxshrink,
            grid=value.grid,
        )
    raise TypeError(
        f"{layer}: an activation spec must be obcjax.activations.ActSpec or obcjax.specs.Int, "
        f"got {value!r}"
    )


class ActQuant(NamedTuple):
    """One activation grid: ``x̂ = scale·(code − zero)``, codes in ``[0, 2^bits)``.

    ``granularity="tensor"``: ``scale`` and ``zero`` are scalars. ``"token"``: both are None, the
    grid of each token is computed from its values (:func:`act_grid`).
    """

    scale: jax.Array | None
    zero: jax.Array | None
    bits: int
    sym: bool
    granularity: str = "tensor"


def _act_flatten(a):
    return (a.scale, a.zero), (a.bits, a.sym, a.granularity)


jax.tree_util.register_pytree_node(ActQuant, _act_flatten, lambda aux, ch: ActQuant(*ch, *aux))


def act_grid(x, aq: ActQuant):
    """``(scale, zero)`` of ``x`` on ``aq``: scalars, or ``(..., 1)`` per token."""
    if aq.granularity == "tensor":
        return aq.scale, aq.zero
    x = jnp.asarray(x, jnp.float32)
    if aq.sym:
        amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
        # an all-zero token: any positive scale is exact
        scale = jnp.where(amax > 0, amax / (2 ** (aq.bits - 1) - 1), 1.0)
        return scale, jnp.full_like(scale, 2 ** (aq.bits - 1))
    lo = jnp.minimum(jnp.min(x, axis=-1, keepdims=True), 0.0)
    hi = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), 0.0)
    scale = jnp.where(hi > lo, (hi - lo) / (2**aq.bits - 1), 1.0)
    return scale, jnp.round(-lo / scale)


def fake_quantize(x, aq: ActQuant):
    """Round ``x`` to the grid of ``aq`` (float in, float out, same shape and dtype)."""
    scale, zero = act_grid(x, aq)
    maxq = 2**aq.bits - 1
    q = jnp.clip(jnp.round(x / scale) + zero, 0, maxq)
    return (scale * (q - zero)).astype(jnp.asarray(x).dtype)


def codes(x, aq: ActQuant):
    """Integer codes (int32) of ``x`` on the grid of ``aq``."""
    scale, zero = act_grid(x, aq)
    maxq = 2**aq.bits - 1
    return jnp.clip(jnp.round(x / scale) + zero, 0, maxq).astype(jnp.int32)


def _default_forward(apply_kwargs):
    kwargs = dict(apply_kwargs or {})

    def forward(module, x):
        if isinstance(x, Mapping):
            x = x["x"]
        elif isinstance(x, (tuple, list)):
            x = x[0]
        return module(x, **kwargs)

    return forward


_CONVS = (nn.Conv, nnx.Conv)


def _input_hook(transform: Callable) -> Callable:
    # transform(path, x, layer) -> the new input, or None to leave it alone
    return input_hook(lambda call: transform(call.path, call.input, call.module))


class _Gathered(NamedTuple):
    order: list[str]
    is_conv: dict[str, bool]
    lo: dict[str, float]
    hi: dict[str, float]
    rows: dict[str, np.ndarray]  # (n, channels) strided sample of the input's rows


def _gather(model, variables, batches, *, layer_types, forward, sample, what) -> _Gathered:
    """Run every batch once (eagerly) and keep each layer input's range and a row sample."""
    batches = list(batches)
    if not batches:
        raise ValueError(f"{what}: batches is empty")
    if not isinstance(sample, (int, np.integer)) or sample < 1:
        raise ValueError(f"{what}: sample must be a positive int, got {sample!r}")
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    rows: dict[str, list[np.ndarray]] = {}
    is_conv: dict[str, bool] = {}
    order: list[str] = []
    seen: dict[str, jax.Array] = {}

    def collect(path, x, layer):
        if path not in seen:
            seen[path] = x
            is_conv.setdefault(path, isinstance(layer, _CONVS))
        return None

    kinds = layer_kinds(layer_types, what=what)
    bound = BoundModel(model, variables, what=what)
    hook = _input_hook(collect)

    def run(batch):
        bound.run(forward, batch, hook=hook, layer_types=kinds)

    for batch in batches:
        seen.clear()
        # eager on purpose: the inputs are reduced right away and never stacked
        run(batch)
        for path, x in seen.items():
            x = np.asarray(x, np.float32)
            x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
            if path not in lo:
                order.append(path)
                lo[path], hi[path], rows[path] = np.inf, -np.inf, []
            lo[path] = min(lo[path], float(x.min()))
            hi[path] = max(hi[path], float(x.max()))
            keep = max(1, sample // x.shape[1])
            stride = max(1, x.shape[0] // keep)
            rows[path].append(x[::stride][:keep])
    for path in order:
        if not (np.isfinite(lo[path]) and np.isfinite(hi[path])):
            raise ValueError(f"layer {path!r}: its inputs are not finite; cannot calibrate them")
    return _Gathered(order, is_conv, lo, hi, {p: np.concatenate(r) for p, r in rows.items()})


def _fit(spec: ActSpec, g: _Gathered, path: str) -> ActQuant:
    if spec.granularity == "token":
        if g.is_conv[path]:
            raise ValueError(
                f"layer {path!r}: per-token activation scales need a Dense layer; this is a "
                "convolution, whose outputs mix positions that would carry different scales. "
                "Use granularity='tensor' for it"
            )
        return ActQuant(None, None, spec.bits, spec.sym, "token")
    # exact extremes in the sample so the min-max grid is the global one; zeros pad the sample
    # to a power of two so layers share compiled searches: 0 is always in the range and on the
    # grid, so it moves neither the range nor the Lp error
    vals = np.concatenate([g.rows[path].ravel(), [g.lo[path], g.hi[path]]]).astype(np.float32)
    vals = np.pad(vals, (0, max(256, 1 << (vals.size - 1).bit_length()) - vals.size))
    scale, zero = find_params(
        jnp.asarray(vals)[None, :],
        Int(
            spec.bits,
            sym=spec.sym,
            search=spec.search,
            p=spec.p,
            maxshrink=spec.maxshrink,
            grid=spec.grid,
        ),
    )
    return ActQuant(
        jnp.asarray(scale).reshape(()), jnp.asarray(zero).reshape(()), spec.bits, spec.sym
    )


def _layer_specs(g: _Gathered, rules, default: ActSpec) -> dict[str, ActSpec]:
    """``{path: spec}`` of the layers the rules choose (True: ``default``; a spec: that spec)."""
    chosen = match_rules(g.order, rules, what="layer input")
    out = {}
    for path in g.order:
        v = chosen.get(path)
        if v is None:
            continue
        out[path] = default if v is True else as_act_spec(v, f"layer {path!r}")
    return out


def calibrate_activations(
    model,
    variables,
    batches: Sequence[Any],
    spec: ActSpec | Int = DEFAULT_SPEC,
    *,
    rules=(".*",),
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
    sample: int = 1 << 15,
) -> dict[str, ActQuant]:
    """Fit one activation grid per matched layer input on calibration batches.

    Args:
      model: Linen or NNX module (not modified). variables: Linen variable dict (for NNX: None
        or a state that replaces parts of the model's, as in :func:`obcjax.calibration.calibrate`).
      batches: calibration batches (run once, eagerly).
      spec: the default :class:`ActSpec` (an :class:`~obcjax.specs.Int` is read as per-tensor);
        the Lp search is the reference's (p = 2.4, shrink factors down to ``1 − maxshrink`` on a
        ``grid``-point schedule).
      rules: ordered ``(regex, value)`` rules on layer paths, first match wins: value True (or a
        bare regex) quantizes the input with ``spec``, an ``ActSpec``/``Int`` with that spec, None
        leaves it in float. A rule that matches no layer input is an error naming the rule.
        :func:`obcjax.allocation.activation_rules` writes them from a mixed-level choice.
      layer_types: layer kinds whose inputs are quantized (``"Dense"``, ``"Conv"``,
        ``"DenseGeneral"``).
      sample: values kept per layer and batch for the Lp search (a deterministic strided sample
        of whole rows; min and max always come from all values).

    Returns:
      ``{path: ActQuant}`` in forward order.

    Raises:
      ValueError: bits outside 4..8, a rule matching no layer input, a per-token spec on a
        convolution, non-finite inputs, no batches.
    """
    spec = as_act_spec(spec)
    normalize_rules(rules, what="layer input")
    forward = forward or _default_forward(apply_kwargs)
    g = _gather(
        model,
        variables,
        batches,
        layer_types=layer_types,
        forward=forward,
        sample=sample,
        what="calibrate_activations",
    )
    return {path: _fit(s, g, path) for path, s in _layer_specs(g, rules, spec).items()}


def _error_setup(model, variables, batches, bits, spec, rules, forward, apply_kwargs,
                 layer_types, sample, what: str):
    """Checked ``(spec, bits, gathered inputs, forward)`` shared by the two activation-error
    statistics (``forward`` defaulted)."""
    spec = as_act_spec(spec)
    bits = tuple(dict.fromkeys(bits))
    if not bits:
        raise ValueError(f"{what}: bits is empty")
    for b in bits:
        dataclasses.replace(spec, bits=b)  # validates 4..8
    normalize_rules(rules, what="layer input")
    forward = forward or _default_forward(apply_kwargs)
    g = _gather(model, variables, batches, layer_types=layer_types, forward=forward,
                sample=sample, what=what)
    return spec, bits, g, forward


def activation_errors(
    model,
    variables,
    batches: Sequence[Any],
    bits: Sequence[int] = (4, 8),
    spec: ActSpec | Int = DEFAULT_SPEC,
    *,
    rules=(".*",),
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
    sample: int = 1 << 15,
) -> dict[str, dict[int, np.ndarray]]:
    """Per-channel mean squared error ``E[(x̂ − x)²]`` of each layer input at each bit-width.

    One calibration pass; for each matched layer and each of ``bits`` the grid of ``spec`` (with
    that bit-width) is fitted as :func:`calibrate_activations` would, and the error of the sampled
    rows is averaged per input channel. :func:`obcjax.allocation.build_database` weighs it by the
    squared compressed weights of every input channel to get the activation part of a mixed
    level's loss, ``Σ_i σ_i² ‖Ŵ[:, i]‖²`` (the output error if the rounding noise is uncorrelated
    across channels; the same units as the OBS loss ``0.5·tr(ΔW H ΔWᵀ)``).

    Args:
      bits: the activation bit-widths to measure (each 4..8).
      spec: the grid template (its ``bits`` is replaced by each of ``bits``); rule values may
        give a layer its own template, as in :func:`calibrate_activations`.
      Others: as in :func:`calibrate_activations`.

    Returns:
      ``{path: {bits: (channels,) float64}}`` in forward order.

    Example:
        >>> from obcjax import zoo
        >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
        >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
        >>> errs = activation_errors(model, v, batches, (4, 8), rules=[("conv1", None), ".*"])
        >>> sorted(errs["fc1"]), errs["fc1"][4].shape       # per input channel of fc1
        ([4, 8], (64,))
        >>> # then: build_database(params, stats, mixed_levels((8, 4)), act_errors=errs)
    """
    spec, bits, g, _ = _error_setup(model, variables, batches, bits, spec, rules, forward,
                                    apply_kwargs, layer_types, sample, "activation_errors")
    out: dict[str, dict[int, np.ndarray]] = {}
    for path, s in _layer_specs(g, rules, spec).items():
        x = jnp.asarray(g.rows[path])
        out[path] = {}
        for b in bits:
            aq = _fit(dataclasses.replace(s, bits=b), g, path)
            e = np.asarray(fake_quantize(x, aq), np.float64) - np.asarray(x, np.float64)
            out[path][int(b)] = np.mean(np.square(e), axis=0)
    return out


class ActErrorStats(NamedTuple):
    """Second moments of one layer input's rounding error at one bit-width, in the layer's rows.

    With ``r`` a row the layer multiplies with its flattened kernel (:func:`obcjax.capture.layer_rows`:
    the input of a Dense layer, an im2col patch of a conv) and ``e = r̂ − r`` the rounding error of
    the quantized input, the output error of weights ``Ŵ`` (reference ``W``, ``ΔW = Ŵ − W``) over
    the calibration tokens is ``Σ ‖Ŵ r̂ − W r‖² = Σ ‖ΔW r‖² + tr(Ŵ ee Ŵᵀ) + 2 tr(Ŵ er ΔWᵀ)``, with
    no assumption on the errors: :func:`obcjax.allocation.build_database` takes the last two terms
    divided by ``count`` as the measured activation part of a mixed level's loss.

    Attributes:
      ee: ``(G, cols, cols)`` float64 ``Σ e eᵀ`` per feature group.
      er: ``(G, cols, cols)`` float64 ``Σ e rᵀ``.
      count: the number of rows (tokens) summed.
    """

    ee: np.ndarray
    er: np.ndarray
    count: int


def activation_error_stats(
    model,
    variables,
    batches: Sequence[Any],
    bits: Sequence[int] = (4, 8),
    spec: ActSpec | Int = DEFAULT_SPEC,
    *,
    rules=(".*",),
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
    sample: int = 1 << 15,
) -> dict[str, dict[int, ActErrorStats]]:
    """The measured activation error of each layer input at each bit-width (:class:`ActErrorStats`).

    One pass fits the grids exactly as :func:`calibrate_activations` does (per layer, per
    bit-width, from ``spec``), a second pass runs the calibration batches again and accumulates,
    for every matched layer call, the second moments of the rounding error of its rows and their
    cross moments with the rows. :func:`obcjax.allocation.build_database` turns them into the
    exact output error the quantized inputs add to each level's weights (measured, where
    :func:`activation_errors` gives the per-channel proxy that assumes uncorrelated errors).

    Args:
      bits: the activation bit-widths (each 4..8).
      spec: the grid template (its ``bits`` replaced by each of ``bits``).
      Others: as in :func:`calibrate_activations`.

    Returns:
      ``{path: {bits: ActErrorStats}}`` in forward order.

    Example:
        >>> from obcjax import zoo
        >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
        >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
        >>> st = activation_error_stats(model, v, batches, (4,), rules=[("conv1", None), ".*"])
        >>> st["conv2"][4].ee.shape                     # one 3x3x6 patch per output position
        (1, 54, 54)
    """
    spec, bits, g, forward = _error_setup(model, variables, batches, bits, spec, rules, forward,
                                          apply_kwargs, layer_types, sample,
                                          "activation_error_stats")
    grids = {
        path: {int(b): _fit(dataclasses.replace(s, bits=b), g, path) for b in bits}
        for path, s in _layer_specs(g, rules, spec).items()
    }
    acc: dict[str, dict[int, list]] = {p: {} for p in grids}

    def observe(call):
        if call.path not in grids:
            return None
        x = jnp.asarray(call.input, jnp.float32)
        R = np.asarray(layer_rows(call.kind, call.module, x, call.path), np.float64)
        for b, aq in grids[call.path].items():
            E = np.asarray(
                layer_rows(call.kind, call.module, fake_quantize(x, aq) - x, call.path), np.float64
            )
            ee = np.einsum("tgi,tgj->gij", E, E)
            er = np.einsum("tgi,tgj->gij", E, R)
            cur = acc[call.path].get(b)
            acc[call.path][b] = (
                [ee, er, R.shape[0]]
                if cur is None
                else [cur[0] + ee, cur[1] + er, cur[2] + R.shape[0]]
            )
        return None

    kinds = layer_kinds(layer_types, what="activation_error_stats")
    bound = BoundModel(model, variables, what="activation_error_stats")
    hook = input_hook(observe)
    for batch in list(batches):
        bound.run(forward, batch, hook=hook, layer_types=kinds)  # eager: reduced right away
    return {
        p: {b: ActErrorStats(*acc[p][b]) for b in grids[p]} for p in grids if acc[p]
    }


def activation_forward(
    aq: Mapping[str, ActQuant],
    *,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
) -> Callable:
    """A ``forward(module, batch)`` whose layers in ``aq`` see fake-quantized inputs.

    Works for a bound Linen module and an NNX module alike, so it can be passed as ``forward=``
    to :func:`obcjax.calibration.calibrate` or :func:`obcjax.pipeline.reestimate_batchnorm`.
    """
    inner = forward or _default_forward(apply_kwargs)
    kinds = layer_kinds(layer_types, what="activation_forward")

    def transform(path, x, layer):
        a = aq.get(path)
        return None if a is None else fake_quantize(x, a)

    hook = _input_hook(transform)

    def fwd(module, batch):
        with intercept(module, hook, kinds):
            return inner(module, batch)

    return fwd


def apply_quantized(
    model,
    variables,
    x,
    aq: Mapping[str, ActQuant],
    *,
    apply_kwargs=None,
    layer_types=("Dense", "Conv"),
):
    """Linen ``model.apply(variables, x, **apply_kwargs)`` with fake-quantized layer inputs."""
    fwd = activation_forward(aq, layer_types=layer_types, apply_kwargs=apply_kwargs)
    return model.apply(variables, x, method=lambda m, x: fwd(m, x))


def quantized_apply(
    model, aq: Mapping[str, ActQuant], *, apply_kwargs=None, layer_types=("Dense", "Conv")
) -> Callable:
    """A jitted ``(variables, x) -> logits`` of a Linen model with fake-quantized layer inputs.

    Example:
        >>> from obcjax import zoo
        >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
        >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
        >>> aq = calibrate_activations(model, v, batches, ActSpec(8))
        >>> fn = quantized_apply(model, aq, apply_kwargs={"train": False})
        >>> zoo.evaluate_apply(fn, v, zoo.digits()["test"])["n"]
        539
    """
    kw = dict(apply_kwargs or {})
    return jax.jit(
        lambda v, x: apply_quantized(model, v, x, aq, apply_kwargs=kw, layer_types=layer_types)
    )


def integer_layer(x, aq: ActQuant, wq, *, bias=None, conv: Mapping[str, Any] | None = None):
    """Reference integer execution of one layer: int32 accumulation of code products.

    ``y = s_a · s_w[o] · Σ_i (c_x,i − z_a)(c_w,oi − z_w,o) + b``, with the activation codes
    ``c_x`` of ``x`` on ``aq`` (one ``s_a, z_a`` per tensor, or per token) and the weight codes
    of ``wq``.

    Args:
      x: the layer's float input: Dense ``(..., in)``, Conv ``(N, *spatial, cin)``.
      aq: the input's activation grid (per-token grids: Dense only).
      wq: the layer's weights as a list of :class:`~obcjax.quant.QArray` (one per feature group)
        of per-row (``granularity="channel"``) grids, in the solvers' ``W: (out/G, cols)`` layout.
      bias: optional ``(out,)``.
      conv: for a conv layer, the keyword arguments of :func:`obcjax.stats.conv_patches`
        (``kernel_shape``, ``strides``, ``padding``, ``dilation``, ``feature_group_count``).

    Returns:
      Float ``(..., out)`` (Dense) or ``(tokens, out)`` (Conv, positions flattened).
    """
    from obcjax.stats import conv_patches

    if not isinstance(wq, (list, tuple)):
        wq = [wq]
    token = aq.granularity == "token"
    if token and conv is not None:
        raise ValueError("integer_layer: per-token activation grids are for Dense layers only")
    scale, zero = act_grid(x, aq)
    cx = codes(x, aq) - jnp.asarray(zero).astype(jnp.int32)  # centred codes; 0 is exactly x̂ = 0
    if conv is None:
        rows = cx.reshape(-1, cx.shape[-1])[:, None, :]
        lead = x.shape[:-1]
        sa = jnp.reshape(scale, (-1, 1)) if token else scale
    else:
        # zero padding of centred codes is exactly the float conv's zero padding
        rows = conv_patches(cx.astype(jnp.float32), **conv).astype(jnp.int32)
        lead = None
        sa = scale
    outs = []
    for g, q in enumerate(wq):
        if q.scale.shape[1] != 1:
            raise ValueError("integer_layer: weights need one grid per output row (channel)")
        cw = q.codes.astype(jnp.int32) - q.zero.astype(jnp.int32)  # (og, cols)
        acc = jnp.matmul(rows[:, g, :], cw.T, preferred_element_type=jnp.int32)
        outs.append(acc.astype(jnp.float32) * sa * q.scale[:, 0][None, :])
    y = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
    if bias is not None:
        y = y + bias
    if conv is None:
        return y.reshape(*lead, y.shape[-1])
    return y


# ----------------------------------------------------------------------------------------------
# OBC's order for a mixed weight/activation choice
# ----------------------------------------------------------------------------------------------


class MixedResult(NamedTuple):
    """Result of :func:`compress_mixed`.

    Attributes:
      variables: the new variables: compressed kernels, and batch statistics re-estimated through
        the activation-quantized forward when the model has batch norm and ``batchnorm=True``.
      act: ``{path: ActQuant}`` of the layers whose inputs are quantized.
      assignment: the ``{path: level}`` that was applied.
      compressed: the :class:`obcjax.transforms.Compressed` when the weights were recomputed from
        ``stats`` (None when taken from the database's stored weights).
      bops: total BOPs of the assignment in the database (None without a database).
      variables_no_bn: the variables before batch-norm re-estimation (the same as ``variables``
        when none was done).
    """

    variables: Any
    act: dict[str, ActQuant]
    assignment: dict[str, Any]
    compressed: Any
    bops: float | None
    variables_no_bn: Any


def _has_batchnorm(model, variables) -> bool:
    if isinstance(model, nnx.Module):
        return any(isinstance(n, nnx.BatchNorm) for _, n in nnx.iter_graph(model))
    return bool(isinstance(variables, Mapping) and variables.get("batch_stats"))


def _train_kwargs(apply_kwargs, bn_apply_kwargs):
    if bn_apply_kwargs is not None:
        return dict(bn_apply_kwargs)
    kw = dict(apply_kwargs or {})
    if "train" in kw:
        kw["train"] = True
    return kw


def calibrate_mixed(
    model,
    variables,
    batches: Sequence[Any],
    assignment: Mapping[str, Any],
    *,
    act_spec: ActSpec | Int = DEFAULT_SPEC,
    batchnorm: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
    bn_apply_kwargs: Mapping[str, Any] | None = None,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    forward: Callable | None = None,
    sample: int = 1 << 15,
) -> tuple[Any, dict[str, ActQuant], Any]:
    """Steps 2 and 3 of OBC's order on already weight-compressed ``variables``.

    Activation ranges are calibrated on the compressed model's inputs (every layer of
    ``assignment`` whose level carries activation bits, with ``act_spec``'s grid at those bits),
    then batch-norm statistics are re-estimated with the activation-quantized forward.

    Args:
      assignment: ``{path: level}`` from :func:`obcjax.allocation.solve` (mixed levels).
      act_spec: grid template (bits taken from each level).
      batchnorm: re-estimate batch norm (when the model has any).
      apply_kwargs: keyword arguments of the evaluation forward (e.g. ``{"train": False}``).
      bn_apply_kwargs: those of the batch-norm pass; default ``apply_kwargs`` with
        ``train=True`` where it has a ``train`` entry.

    Returns:
      ``(variables, act, variables_before_bn)``.
    """
    from obcjax.allocation import activation_rules
    from obcjax.pipeline import reestimate_batchnorm

    rules = activation_rules(assignment, template=as_act_spec(act_spec))
    active = [r for r in rules if r[1] is not None]
    act: dict[str, ActQuant] = {}
    if active:
        act = calibrate_activations(
            model,
            variables,
            batches,
            act_spec,
            rules=rules,
            layer_types=layer_types,
            apply_kwargs=apply_kwargs,
            forward=forward,
            sample=sample,
        )
    before = variables
    if batchnorm and _has_batchnorm(model, variables):
        kw = _train_kwargs(apply_kwargs, bn_apply_kwargs)
        fwd = activation_forward(act, layer_types=layer_types, apply_kwargs=kw)
        variables = reestimate_batchnorm(model, variables, batches, apply_kwargs=kw, forward=fwd)
    return variables, act, before


def compress_mixed(
    model,
    variables,
    batches: Sequence[Any],
    database,
    assignment: Mapping[str, Any],
    *,
    stats: Mapping[str, Any] | None = None,
    act_spec: ActSpec | Int = DEFAULT_SPEC,
    batchnorm: bool = True,
    apply_kwargs: Mapping[str, Any] | None = None,
    bn_apply_kwargs: Mapping[str, Any] | None = None,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    rel_damp: float | None = None,
    sample: int = 1 << 15,
) -> MixedResult:
    """Apply a per-layer mixed weight/activation choice to a Linen model in OBC's order.

    1. weights: every layer of ``assignment`` takes its level's compressed kernel (from the
       database's stored weights, else recomputed from ``stats``);
    2. activation ranges: calibrated on the *compressed* model's inputs (:func:`calibrate_mixed`);
    3. batch norm: re-estimated last, through the activation-quantized forward.

    Args:
      model: Linen module. variables: its variable dict (``params`` and maybe ``batch_stats``).
      batches: calibration batches (ranges and batch norm).
      database: the :class:`obcjax.allocation.Database` the assignment comes from, or None to
        recompute the weights from ``stats`` (then ``compressed`` holds the per-layer summary).
      assignment: ``{path: level}`` (:func:`obcjax.allocation.solve` on a mixed database, or a
        uniform one such as ``{p: "8w8a" for p in db.paths}``).
      stats: calibration statistics, needed when the database keeps no weights or is None.
      act_spec, batchnorm, apply_kwargs, bn_apply_kwargs: see :func:`calibrate_mixed`.
      rel_damp: damping when recomputing from ``stats`` (default: the database's, else 0.01).

    Returns:
      A :class:`MixedResult`; evaluate it with
      ``quantized_apply(model, res.act, apply_kwargs=...)(res.variables, x)``.

    Example:
        >>> from obcjax.allocation import mixed_levels, solve
        >>> from obcjax.calibration import calibrate
        >>> from obcjax import zoo
        >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
        >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
        >>> # the mixed database of OBC (tens of seconds: every layer at every level)
        >>> stats = calibrate(model, v, batches)  # doctest: +SKIP
        >>> db = mixed_database(model, v, batches, stats, mixed_levels((8, 4)),  # doctest: +SKIP
        ...                     positions={"conv1": 64, "conv2": 16})
        >>> budget = db.cost_of({p: "8w8a" for p in db.paths}, "bops") / 2  # doctest: +SKIP
        >>> res = compress_mixed(model, v, batches, db,  # doctest: +SKIP
        ...                      solve(db, budget, metric="bops"))
        >>> res.bops <= budget  # doctest: +SKIP
        True
    """
    from obcjax import allocation as A
    from obcjax.transforms import compress

    if isinstance(model, nnx.Module) or not isinstance(variables, Mapping):
        raise TypeError(
            "compress_mixed: needs a Linen model and its variable dict; for NNX compress the "
            "weights first, then call calibrate_mixed(model, state, ...)"
        )
    assignment = {p: A.as_level(lv) for p, lv in assignment.items()}
    compressed = None
    bops = None
    if database is not None:
        new_params = A.materialize(variables["params"], database, assignment, stats=stats)
        try:
            bops = database.cost_of(assignment, "bops")
        except ValueError:  # no positions for the convs: BOPs unknown, not an error here
            bops = None
    else:
        if stats is None:
            raise ValueError("compress_mixed: give a database or the calibration stats")
        kw = {} if rel_damp is None else {"rel_damp": rel_damp}
        compressed = compress(variables["params"], stats, A.to_rules(assignment), **kw)
        new_params = compressed.params
    v = {**variables, "params": new_params}
    v, act, before = calibrate_mixed(
        model,
        v,
        batches,
        assignment,
        act_spec=act_spec,
        batchnorm=batchnorm,
        apply_kwargs=apply_kwargs,
        bn_apply_kwargs=bn_apply_kwargs,
        layer_types=layer_types,
        sample=sample,
    )
    return MixedResult(v, act, assignment, compressed, bops, before)


def mixed_database(
    model,
    variables,
    batches: Sequence[Any],
    stats: Mapping[str, Any],
    levels: Sequence[Any],
    *,
    rules=((".*", True),),
    act_spec: ActSpec | Int = DEFAULT_SPEC,
    apply_kwargs: Mapping[str, Any] | None = None,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    forward: Callable | None = None,
    sample: int = 1 << 15,
    act_error: str = "measured",
    **database_kwargs,
):
    """OBC's mixed database in one call: activation errors, then the database of levels.

    Measures the activation errors at every activation bit-width the levels use, on the
    layers ``rules`` put in the database (:func:`activation_error_stats`, the output error the
    quantized inputs add, measured; or the per-channel proxy of :func:`activation_errors`), and
    passes them to
    :func:`obcjax.allocation.build_database` (Linen variables; ``params`` from
    ``variables["params"]``).

    Args:
      stats: calibration statistics of the layers (:func:`obcjax.calibration.calibrate`).
      levels: the levels, e.g. :func:`obcjax.allocation.mixed_levels` ``((8, 4))``.
      rules: the database's rules (True: in the database, None: left out).
      act_spec: the activation grid used to measure the errors (use the same in
        :func:`compress_mixed`).
      act_error: ``"measured"`` (:func:`activation_error_stats`) or ``"proxy"``
        (:func:`activation_errors`, uncorrelated per-channel errors).
      database_kwargs: passed on to :func:`~obcjax.allocation.build_database` (``positions``,
        ``path``, ``error``, ``rel_damp``, ``progress``...).

    Example:
        >>> from obcjax.allocation import mixed_levels
        >>> from obcjax.calibration import calibrate
        >>> from obcjax import zoo
        >>> model, v = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
        >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
        >>> # every layer but conv1 at 4 levels (tens of seconds)
        >>> stats = calibrate(model, v, batches)  # doctest: +SKIP
        >>> db = mixed_database(model, v, batches, stats, mixed_levels((8, 4)),  # doctest: +SKIP
        ...                     rules=[("conv1", None), (".*", True)], positions={"conv2": 16},
        ...                     error="relative")
        >>> db.paths  # doctest: +SKIP
        ['conv2', 'fc1', 'fc2', 'fc3']
    """
    from obcjax import allocation as A

    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("mixed_database: needs a Linen variable dict with 'params'")
    lv = [A.as_level(x) for x in levels]
    bits = sorted({x.abits for x in lv if isinstance(x, A.WALevel) and x.abits is not None})
    errs = None
    if bits:
        act_rules = [
            (pat, None if val is None else True)
            for pat, val in normalize_rules(rules, what="layer")
        ]
        if act_error not in ("measured", "proxy"):
            raise ValueError(
                f"mixed_database: act_error must be 'measured' or 'proxy', got {act_error!r}"
            )
        measure = activation_error_stats if act_error == "measured" else activation_errors
        errs = measure(
            model,
            variables,
            batches,
            bits,
            act_spec,
            rules=act_rules,
            layer_types=layer_types,
            apply_kwargs=apply_kwargs,
            forward=forward,
            sample=sample,
        )
    return A.build_database(
        variables["params"], stats, lv, rules=rules, act_errors=errs, **database_kwargs
    )
