"""Whole-model compression passes that need the model, not only its parameters.

* :func:`compress_sequential`: GPTQ/SparseGPT-style sequential mode. Layers are compressed one at a
  time in forward order, and each layer's statistics are collected on the outputs of the already
  compressed prefix, so later layers compensate for the error of earlier ones. OBC itself compresses
  every layer from the dense model's statistics (one pass, :func:`obcjax.transforms.compress`).
* :func:`reestimate_batchnorm`: OBC's batch-norm repair. After compression the running means and
  variances of every batch-norm layer no longer describe its inputs; they are re-estimated on the
  calibration data as exact averages over all batches (PyTorch's ``momentum=None``), with the
  network run in training mode so every batch-norm normalizes with batch statistics.
* :func:`correct_statistics`: the per-channel statistics correction of the OBC code, folded into
  norm-layer scales and biases (or a mean shift into Dense/Conv biases).

Model code is never edited: layer inputs are intercepted by :mod:`obcjax.capture` (Linen
``nn.intercept_methods``; NNX by wrapping the layer classes' ``__call__`` during the trace only).

Example:
    >>> from obcjax import zoo
    >>> from obcjax.specs import Unstructured
    >>> model, variables = zoo.linen_model("resnet"), zoo.init_variables("resnet", (8, 8, 1))
    >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
    >>> rules = [("fc", Unstructured(0.5)), (".*", None)]       # e.g. [(".*", Unstructured(0.5))]
    >>> out = compress_sequential(model, variables, batches, rules, apply_kwargs={"train": False})
    >>> variables = {**variables, "params": out.params}
    >>> variables = reestimate_batchnorm(model, variables, batches, apply_kwargs={"train": True})
    >>> sorted(variables["batch_stats"])[:3]
    ['block1', 'block2', 'block3']
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx

from obcjax.calibration import calibrate
from obcjax.capture import BoundModel, LayerCall
from obcjax.layout import get_path, set_path
from obcjax.rules import match_rules
from obcjax.transforms import Compressed, as_layer_spec, compress, find_layers

__all__ = ["compress_sequential", "reestimate_batchnorm", "correct_statistics", "batchnorm_paths"]


def _input(batch):
    if isinstance(batch, Mapping):
        return batch["x"]
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


def _is_nnx(model) -> bool:
    return isinstance(model, nnx.Module)


def _params_of(model, variables):
    if _is_nnx(model):
        if variables is None:
            return nnx.state(model, nnx.Param).to_pure_dict()
        return variables
    if not isinstance(variables, Mapping) or "params" not in variables:
        raise TypeError("a Linen model needs its variables as a dict with a 'params' entry")
    return variables["params"]


def compress_sequential(
    model,
    variables,
    batches: Sequence[Any],
    rules,
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    solver: str = "obc",
    rel_damp: float = 0.01,
    method: str = "auto",
    progress: bool = False,
) -> Compressed:
    """Compress layer by layer in forward order, recalibrating on the compressed prefix.

    Args:
      model: a Linen or NNX module (not modified).
      variables: Linen: the variable dict; NNX: None (the model's own state) or a pure dict of
        its ``nnx.Param`` state.
      batches: a re-iterable sequence of calibration batches (it is run once per layer).
      rules: ordered ``(regex, spec)`` rules as for :func:`obcjax.transforms.compress`.
      apply_kwargs, forward, layer_types: how to run the model and which layer classes to
        capture, as for :func:`obcjax.calibration.calibrate`.
      solver, rel_damp, method: as for :func:`obcjax.transforms.compress`.

    Returns:
      A :class:`~obcjax.transforms.Compressed` record whose ``params`` are in the layout given
      (Linen ``params`` collection, or the NNX pure ``Param`` dict).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("compress_sequential: batches is empty")
    params = _params_of(model, variables)
    layers = find_layers(params)
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    chosen = match_rules(list(layers), list(rules), what="layer")
    specs = {p: as_layer_spec(v, solver) for p, v in chosen.items()}
    specs = {p: s for p, s in specs.items() if s is not None and (s.prune or s.quant)}
    if not specs:
        raise ValueError("compress_sequential: the rules leave every layer dense")
    cal = dict(apply_kwargs=apply_kwargs, forward=forward, layer_types=layer_types)
    # The forward order comes from one abstract-free calibration pass over the first batch.
    order = [p for p in calibrate(model, _vars(model, variables, params), batches[:1],
                                  rules=[re.escape(p) for p in specs], **cal) if p in specs]
    masks, qarrays, losses, layouts = {}, {}, {}, {}
    it = order
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(order, desc="sequential", unit="layer")
    # Every pass captures all the layers to compress, not only the current one: one compiled
    # calibration step serves every pass (a step per layer costs a compile per layer), and the
    # extra statistics cost about what the layers' own matmuls do.
    everything = [(re.escape(p), True) for p in order]
    for path in it:
        stats = calibrate(model, _vars(model, variables, params), batches, rules=everything, **cal)
        out = compress(params, {path: stats[path]}, [(re.escape(path), specs[path])],
                       rel_damp=rel_damp, method=method)
        params = out.params
        if out.mask(path) is not None:
            masks[path] = out.mask(path)
        if out.qarray(path) is not None:
            qarrays[path] = out.qarray(path)
        losses.update(out.losses)
        layouts.update(out.layouts)
    return Compressed.from_flat(params, masks, qarrays, losses, specs, None, layouts)


def _vars(model, variables, params):
    if _is_nnx(model):
        return params
    return {**variables, "params": params}


# ----------------------------------------------------------------------------- batch norm


def _feature_axes(module, ndim: int) -> tuple[int, ...]:
    axis = getattr(module, "axis", -1)
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    return tuple(a % ndim for a in axes)


def _moments(module, x):
    x = jnp.asarray(x, jnp.float32)
    feat = _feature_axes(module, x.ndim)
    red = tuple(i for i in range(x.ndim) if i not in feat)
    n = int(np.prod([x.shape[i] for i in red])) if red else 1
    mean = jnp.mean(x, axis=red)
    sq = jnp.mean(jnp.square(x), axis=red)
    return mean, sq, n


def batchnorm_paths(model, variables=None, batch=None, *, apply_kwargs=None, forward=None):
    """The '/'-joined paths of the batch-norm layers a forward pass calls, in call order."""
    acc = _collect_bn(model, variables, [batch], apply_kwargs=apply_kwargs, forward=forward)
    return list(acc)


_BATCHNORMS = (nn.BatchNorm, nnx.BatchNorm)


def _collect_bn(model, variables, batches, *, apply_kwargs=None, forward=None):
    kwargs = dict(apply_kwargs or {})
    if forward is None:

        def forward(module, x):
            return module(_input(x), **kwargs)

    bound = BoundModel(model, variables, what="reestimate_batchnorm")
    if bound.is_nnx:
        inner = forward

        def forward(m, batch):
            for _, node in nnx.iter_graph(m):
                if isinstance(node, nnx.BatchNorm):
                    node.use_running_average = False
            return inner(m, batch)

    def step(variables, batch):
        out = {}

        def hook(call: LayerCall, proceed):
            out[call.path] = _moments(call.module, call.input)[:2]
            return proceed(*call.args, **call.kwargs)

        bound.run(forward, batch, variables=variables, hook=hook, layer_types=_BATCHNORMS)
        return out

    run = jax.jit(step)
    first_arg = bound.variables
    acc: dict[str, list] = {}
    for batch in batches:
        moments = run(first_arg, batch)
        # weights: elements reduced per feature; equal for equal batch shapes, so count by batch
        n = int(np.prod(np.shape(_input(batch))[:1]))
        for path, (m, s) in moments.items():
            if path not in acc:
                acc[path] = [0.0, 0.0, 0]
            acc[path][0] = acc[path][0] + n * m
            acc[path][1] = acc[path][1] + n * s
            acc[path][2] += n
    return acc


def reestimate_batchnorm(
    model,
    variables,
    batches: Sequence[Any],
    *,
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
):
    """Re-estimate every batch-norm layer's running mean and variance on calibration data.

    The model runs in training mode (Linen: pass e.g. ``apply_kwargs={"train": True}``; NNX:
    every ``nnx.BatchNorm`` is switched to batch statistics on an internal copy), each batch-norm
    input is intercepted, and the means of ``x`` and ``x²`` over all batches give the new
    statistics: ``mean = E[x]``, ``var = E[x²] - E[x]²`` (exact averages, not a moving average).

    Args:
      model: Linen or NNX module (not modified).
      variables: Linen variable dict with ``batch_stats``; NNX: None or a state/pure dict that
        replaces parts of the model's state (e.g. compressed params).

    Returns:
      Linen: a new variable dict; NNX: a new ``nnx.State`` of the whole model (apply it with
      ``nnx.update(model, state)``).
    """
    batches = list(batches)
    if not batches:
        raise ValueError("reestimate_batchnorm: batches is empty")
    acc = _collect_bn(model, variables, batches, apply_kwargs=apply_kwargs, forward=forward)
    if not acc:
        raise ValueError("reestimate_batchnorm: the forward pass called no batch-norm layer")
    new = {}
    for path, (m, s, n) in acc.items():
        mean = m / n
        new[path] = (mean, jnp.maximum(s / n - jnp.square(mean), 0.0))
    if _is_nnx(model):
        tmp = BoundModel(model, variables, what="reestimate_batchnorm").module()
        for p, node in nnx.iter_graph(tmp):
            key = "/".join(str(k) for k in p)
            if isinstance(node, nnx.BatchNorm) and key in new:
                node.mean[...] = new[key][0].astype(node.mean[...].dtype)
                node.var[...] = new[key][1].astype(node.var[...].dtype)
        return nnx.split(tmp)[1]
    if "batch_stats" not in variables:
        raise ValueError("reestimate_batchnorm: the variables have no 'batch_stats' collection")
    stats = variables["batch_stats"]
    for path, (mean, var) in new.items():
        old = get_path(stats, path)
        stats = set_path(stats, path, "mean", mean.astype(old["mean"].dtype))
        stats = set_path(stats, path, "var", var.astype(old["var"].dtype))
    return {**variables, "batch_stats": stats}


def correct_statistics(
    model,
    dense_variables,
    compressed_variables,
    batches: Sequence[Any],
    *,
    on: str = "norm",
    rules=(".*",),
    apply_kwargs: Mapping[str, Any] | None = None,
    forward: Callable | None = None,
):
    """OBC's statistics correction, folded into the parameters (Linen models).

    The per-channel mean ``μ`` and standard deviation ``σ`` of a layer's outputs are measured in
    the dense network (``d``) and in the compressed one (``c``), each on its own inputs, and the
    layer is corrected so its outputs match the dense ones in those statistics:

    * ``on="norm"``: every ``BatchNorm`` / ``LayerNorm`` output gets the affine correction of the
      OBC code, ``out ← (out − μ_c)·σ_d/σ_c + μ_d``, folded into its ``scale`` and ``bias``.
    * ``on="bias"``: every ``Dense`` / ``Conv`` with a bias gets the mean shift
      ``b ← b + μ_d − μ_c`` (for models without normalization layers, such as LeNet-5).

    Layers are corrected one after another in forward order, since a corrected layer changes the
    inputs of every later one.

    Args:
      dense_variables, compressed_variables: Linen variable dicts of the same model.
      batches: calibration batches (re-iterable).
      on: ``"norm"`` or ``"bias"``. rules: regexes choosing the layers.

    Returns:
      New compressed variables.
    """
    if _is_nnx(model):
        raise TypeError("correct_statistics: Linen models only")
    if on not in ("norm", "bias"):
        raise ValueError(f"correct_statistics: on must be 'norm' or 'bias', got {on!r}")
    batches = list(batches)
    if not batches:
        raise ValueError("correct_statistics: batches is empty")
    classes = (nn.BatchNorm, nn.LayerNorm) if on == "norm" else (nn.Dense, nn.Conv)
    kwargs = dict(apply_kwargs or {})
    if forward is None:

        def forward(module, x):
            return module(_input(x), **kwargs)

    bound = BoundModel(model, dense_variables, what="correct_statistics")

    def step(variables, batch):
        out = {}

        def hook(call: LayerCall, proceed):
            y = proceed(*call.args, **call.kwargs)
            y2 = jnp.asarray(y, jnp.float32).reshape(-1, y.shape[-1])
            out[call.path] = (jnp.mean(y2, axis=0), jnp.mean(jnp.square(y2), axis=0))
            return y

        bound.run(forward, batch, variables=variables, hook=hook, layer_types=classes)
        return out

    run = jax.jit(step)

    def moments(variables):
        tot = None
        for b in batches:
            r = run(variables, b)
            tot = r if tot is None else jax.tree.map(jnp.add, tot, r)
        return {p: (m / len(batches), jnp.sqrt(jnp.maximum(s / len(batches) - (m / len(batches)) ** 2, 0.0)))
                for p, (m, s) in tot.items()}

    dense = moments(dense_variables)
    params = compressed_variables["params"]
    avail = [p for p in dense if isinstance(get_path(params, p), Mapping) and "bias" in get_path(params, p)]
    if not avail:
        raise ValueError(f"correct_statistics: no {'normalization' if on == 'norm' else 'biased'} "
                         "layer with a bias was called")
    chosen = [p for p, v in match_rules(avail, rules, what="layer").items() if v is not None]
    for path in chosen:
        comp = moments({**compressed_variables, "params": params})
        (md, sd), (mc, sc) = dense[path], comp[path]
        leaf = get_path(params, path)
        b = leaf["bias"]
        if on == "bias":
            params = set_path(params, path, "bias", (b + md - mc).astype(b.dtype))
            continue
        ratio = sd / (sc + 1e-9)
        if "scale" in leaf:
            params = set_path(params, path, "scale", (leaf["scale"] * ratio).astype(b.dtype))
        elif not np.allclose(np.asarray(ratio), 1.0):
            raise ValueError(f"layer {path!r}: a norm layer without a scale cannot take the "
                             "σ correction; use on='bias' on the layer before it")
        params = set_path(params, path, "bias", ((b - mc) * ratio + md).astype(b.dtype))
    return {**compressed_variables, "params": params}
