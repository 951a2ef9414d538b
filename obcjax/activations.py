"""Activation quantization at layer inputs of unmodified Flax models (the "A" of OBC's WxAy).

OBC quantizes the input of every compressed layer with one asymmetric per-tensor grid whose range is
calibrated on calibration batches, by min-max or by the same Lp-norm (p = 2.4) shrink search the
weight grid uses, *after* the weights have been compressed (so the ranges describe the inputs the
compressed model really produces); batch-norm statistics are re-estimated last.

* :func:`calibrate_activations` collects each matched layer's input range and a bounded,
  deterministic sample of its values, and fits one grid per layer (``ActQuant``).
* :func:`activation_forward` turns a forward function into one whose matched layers see
  fake-quantized inputs ``x̂ = s·(clip(round(x/s) + z, 0, 2^b − 1) − z)``; it plugs into
  ``model.apply``-style evaluation, :func:`obcjax.calibration.calibrate` and
  :func:`obcjax.pipeline.reestimate_batchnorm` (all take ``forward=``).
* :func:`integer_layer` is the deployable reference: codes × codes accumulated in int32 and
  rescaled once, for Dense and Conv (grouped/depthwise included). The tests check that the
  fake-quantized float forward equals it, so the simulated accuracy is the deployable one.

Model code is never edited: Linen layers are intercepted with ``nn.intercept_methods``; NNX layer
classes' ``__call__`` is wrapped for the duration of one call only.

Example:
    >>> aq = calibrate_activations(model, v, batches, Int(8, sym=False), rules=[("conv1", None), ".*"],
    ...                            apply_kwargs={"train": False})
    >>> fwd = activation_forward(aq, apply_kwargs={"train": False})
    >>> logits = apply_quantized(model, v, x, aq, apply_kwargs={"train": False})
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from obcjax.calibration import _PATCH_LOCK, LAYER_TYPES
from obcjax.quant import find_params
from obcjax.rules import match_rules, normalize_rules
from obcjax.specs import Int

__all__ = [
    "ActQuant",
    "calibrate_activations",
    "activation_forward",
    "apply_quantized",
    "fake_quantize",
    "integer_layer",
]


DEFAULT_SPEC = Int(8, sym=False, search="lp")


class ActQuant(NamedTuple):
    """One per-tensor activation grid: ``x̂ = scale·(code − zero)``, codes in ``[0, 2^bits)``."""

    scale: jax.Array
    zero: jax.Array
    bits: int
    sym: bool


def _act_flatten(a):
    return (a.scale, a.zero), (a.bits, a.sym)


jax.tree_util.register_pytree_node(ActQuant, _act_flatten, lambda aux, ch: ActQuant(*ch, *aux))


def _check_spec(spec: Int, layer: str = "activations"):
    if not isinstance(spec, Int):
        raise TypeError(f"{layer}: activation spec must be obcjax.specs.Int, got {spec!r}")
    if not 4 <= spec.bits <= 8:
        raise ValueError(f"{layer}: activation bits must be in 4..8, got {spec.bits}")


def fake_quantize(x, aq: ActQuant):
    """Round ``x`` to the grid of ``aq`` (float in, float out)."""
    maxq = 2**aq.bits - 1
    q = jnp.clip(jnp.round(x / aq.scale) + aq.zero, 0, maxq)
    return (aq.scale * (q - aq.zero)).astype(jnp.asarray(x).dtype)


def codes(x, aq: ActQuant):
    """Integer codes (int32) of ``x`` on the grid of ``aq``."""
    maxq = 2**aq.bits - 1
    return jnp.clip(jnp.round(x / aq.scale) + aq.zero, 0, maxq).astype(jnp.int32)


def _kinds(layer_types):
    return {k: LAYER_TYPES[k] for k in layer_types}


def _default_forward(apply_kwargs):
    kwargs = dict(apply_kwargs or {})

    def forward(module, x):
        if isinstance(x, Mapping):
            x = x["x"]
        elif isinstance(x, (tuple, list)):
            x = x[0]
        return module(x, **kwargs)

    return forward


@contextlib.contextmanager
def _intercept_inputs(model_or_module, transform, layer_types, *, nnx_module=None):
    """Within the context, ``transform(path, x)`` replaces the first input of matched layers."""
    linen_classes = tuple(LAYER_TYPES[k][0] for k in layer_types)
    if nnx_module is None:

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, linen_classes):
                path = "/".join(str(p) for p in context.module.path)
                new = transform(path, args[0])
                if new is not None:
                    args = (new, *args[1:])
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            yield
        return
    classes = [LAYER_TYPES[k][1] for k in layer_types]
    where = {id(node): "/".join(str(k) for k in p) for p, node in nnx.iter_graph(nnx_module)
             if isinstance(node, tuple(classes))}
    with _PATCH_LOCK:  # re-entrant: calibration may already be wrapping the same classes
        saved = {}
        try:
            for cls in dict.fromkeys(classes):
                orig = cls.__dict__["__call__"]
                saved[cls] = orig

                def wrapper(self, x, *a, _orig=orig, **k):
                    p = where.get(id(self))
                    if p is not None:
                        new = transform(p, x)
                        if new is not None:
                            x = new
                    return _orig(self, x, *a, **k)

                type.__setattr__(cls, "__call__", wrapper)
            yield
        finally:
            for cls, orig in saved.items():
                type.__setattr__(cls, "__call__", orig)


def calibrate_activations(
    model,
    variables,
    batches: Sequence[Any],
    spec: Int = DEFAULT_SPEC,
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
      batches: calibration batches (run once).
      spec: ``Int(bits 4..8, sym, search="lp"|"minmax")``; the Lp search is the reference's
        (p = 2.4, shrink factors down to ``1 − maxshrink`` on a ``grid``-point schedule).
      rules: regexes choosing layers; a ``(regex, None)`` rule skips matched layers.
      sample: values kept per layer and batch for the Lp search (a deterministic strided sample;
        min and max always come from all values).

    Returns:
      ``{path: ActQuant}`` in forward order.
    """
    _check_spec(spec)
    normalize_rules(rules, what="layer")
    forward = forward or _default_forward(apply_kwargs)
    batches = list(batches)
    if not batches:
        raise ValueError("calibrate_activations: batches is empty")
    lo: dict[str, float] = {}
    hi: dict[str, float] = {}
    samples: dict[str, list[np.ndarray]] = {}
    order: list[str] = []

    def collect(path, x):
        if path not in seen:
            seen[path] = x
        return None

    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)

        def run(state, batch):
            m = nnx.merge(graphdef, state)
            with _intercept_inputs(None, collect, layer_types, nnx_module=m):
                forward(m, batch)
            return dict(seen)

        base = jax.tree.map(lambda a: a, state)
        if variables is not None:
            tmp = nnx.merge(graphdef, base)
            nnx.update(tmp, variables)
            base = nnx.split(tmp)[1]
        args0 = base
    else:

        def run(variables, batch):
            bound = model.bind(variables, mutable=True)
            with _intercept_inputs(model, collect, layer_types):
                forward(bound, batch)
            return dict(seen)

        args0 = variables
    for batch in batches:
        seen: dict[str, jax.Array] = {}
        # eager on purpose: the inputs are reduced right away and never stacked
        got = run(args0, batch)
        for path, x in got.items():
            x = np.asarray(x, np.float32).ravel()
            if path not in lo:
                order.append(path)
                lo[path], hi[path], samples[path] = np.inf, -np.inf, []
            lo[path] = min(lo[path], float(x.min()))
            hi[path] = max(hi[path], float(x.max()))
            stride = max(1, x.size // sample)
            samples[path].append(x[::stride][:sample])
    chosen = match_rules(order, rules, what="layer")
    out = {}
    for path in order:
        if chosen.get(path) is None:
            continue
        if not (np.isfinite(lo[path]) and np.isfinite(hi[path])):
            raise ValueError(f"layer {path!r}: its inputs are not finite; cannot calibrate them")
        vals = np.concatenate(samples[path])
        # exact extremes in the sample so the min-max grid is the global one
        vals = np.concatenate([vals, [lo[path], hi[path]]]).astype(np.float32)
        scale, zero = find_params(jnp.asarray(vals)[None, :],
                                  Int(spec.bits, sym=spec.sym, search=spec.search, p=spec.p,
                                      maxshrink=spec.maxshrink, grid=spec.grid))
        out[path] = ActQuant(jnp.asarray(scale).reshape(()), jnp.asarray(zero).reshape(()),
                             spec.bits, spec.sym)
    return out


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

    def transform(path, x):
        a = aq.get(path)
        return None if a is None else fake_quantize(x, a)

    def fwd(module, batch):
        nm = module if isinstance(module, nnx.Module) else None
        with _intercept_inputs(module, transform, layer_types, nnx_module=nm):
            return inner(module, batch)

    return fwd


def apply_quantized(model, variables, x, aq: Mapping[str, ActQuant], *, apply_kwargs=None,
                    layer_types=("Dense", "Conv")):
    """Linen ``model.apply(variables, x, **apply_kwargs)`` with fake-quantized layer inputs."""
    fwd = activation_forward(aq, layer_types=layer_types, apply_kwargs=apply_kwargs)
    return model.apply(variables, x, method=lambda m, x: fwd(m, x))


def integer_layer(x, aq: ActQuant, wq, *, bias=None, conv: Mapping[str, Any] | None = None):
    """Reference integer execution of one layer: int32 accumulation of code products.

    ``y = s_a · s_w[o] · Σ_i (c_x,i − z_a)(c_w,oi − z_w,o) + b``, with the activation codes
    ``c_x`` of ``x`` on ``aq`` and the weight codes of ``wq``.

    Args:
      x: the layer's float input: Dense ``(..., in)``, Conv ``(N, *spatial, cin)``.
      aq: the input's activation grid.
      wq: the layer's weights as a list of :class:`~obcjax.quant.QArray` (one per feature group)
        of per-row (``granularity="channel"``) grids, in the solvers' ``W: (out/G, cols)`` layout.
      bias: optional ``(out,)``.
      conv: for a conv layer, the keyword arguments of :func:`obcjax.stats.conv_patches`
        (``kernel_shape``, ``strides``, ``padding``, ``dilation``, ``feature_group_count``).

    Returns:
      Float ``(..., out)``.
    """
    from obcjax.stats import conv_patches

    if not isinstance(wq, (list, tuple)):
        wq = [wq]
    cx = codes(x, aq) - aq.zero.astype(jnp.int32)  # centred codes; 0 is exactly x̂ = 0
    if conv is None:
        rows = cx.reshape(-1, cx.shape[-1])[:, None, :]
        lead = x.shape[:-1]
    else:
        # zero padding of centred codes is exactly the float conv's zero padding
        rows = conv_patches(cx.astype(jnp.float32), **conv).astype(jnp.int32)
        lead = None
    outs = []
    for g, q in enumerate(wq):
        if q.scale.shape[1] != 1:
            raise ValueError("integer_layer: weights need one grid per output row (channel)")
        cw = q.codes.astype(jnp.int32) - q.zero.astype(jnp.int32)  # (og, cols)
        acc = jnp.matmul(rows[:, g, :], cw.T, preferred_element_type=jnp.int32)
        outs.append(acc.astype(jnp.float32) * (aq.scale * q.scale[:, 0])[None, :])
    y = jnp.concatenate(outs, axis=-1) if len(outs) > 1 else outs[0]
    if bias is not None:
        y = y + bias
    if conv is None:
        return y.reshape(*lead, y.shape[-1])
    return y
