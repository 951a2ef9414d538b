"""The common case in one call: :func:`oneshot` calibrates, compresses and repairs a model.

Users of the PyTorch tools know the shape of it (``oneshot(model, recipe=..., dataset=...)``):
one call from a trained model and a little calibration data to a compressed model. Here it is a
thin composition of the library's own steps, each usable alone:

1. :func:`obcjax.calibration.calibrate` -- the inputs' Hessian of every chosen layer;
2. :func:`obcjax.transforms.compress` (``mode="one-pass"``: every layer from the dense model's
   statistics, as OBC does) or :func:`obcjax.pipeline.compress_sequential`
   (``mode="sequential"``: each layer recalibrated on the already compressed prefix, as GPTQ and
   SparseGPT do);
3. optionally :func:`obcjax.pipeline.reestimate_batchnorm` -- batch-norm statistics re-estimated
   on the calibration data (OBC's batch-norm tuning).

The module is named ``workflow`` (not ``oneshot``) so that ``obcjax.oneshot`` is always the
function: importing a submodule of the same name would replace the package attribute.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from flax import nnx

from obcjax.calibration import calibrate
from obcjax.capture import BoundModel
from obcjax.pipeline import compress_sequential, reestimate_batchnorm
from obcjax.specs import SolverSpec
from obcjax.transforms import Compressed, compress

__all__ = ["MODES", "OneShotResult", "oneshot"]

#: The compression modes of :func:`oneshot`.
MODES = ("one-pass", "sequential")


class OneShotResult(NamedTuple):
    """What :func:`oneshot` returns.

    Attributes:
      variables: the compressed model's variables, in the form the model takes: Linen, the
        variable dict (``{"params": ..., "batch_stats": ...}``) for ``model.apply``; NNX, an
        ``nnx.State`` of the whole model (``nnx.update(model, result.variables)``).
      summary: the flat '/'-keyed summary of sizes, sparsities, bits and losses
        (:func:`obcjax.transforms.summarize`), the same as ``compressed.summary``.
      compressed: the :class:`~obcjax.transforms.Compressed` record (params in the solvers'
        tree: the Linen ``params`` collection, or the NNX pure ``nnx.Param`` dict; masks,
        quantized arrays, losses), what :func:`obcjax.export.pack_compressed` and fine-tuning
        take.
    """

    variables: Any
    summary: dict[str, Any]
    compressed: Compressed


def _rules(recipe) -> list[tuple[Any, Any]]:
    if isinstance(recipe, Mapping):
        return list(recipe.items())
    if isinstance(recipe, str | bytes) or not isinstance(recipe, Iterable):
        raise TypeError(
            "oneshot: recipe must be the rules compress takes: a list of (regex, spec) pairs or "
            f"a dict {{regex: spec}}, e.g. [('.*', (NM(2, 4), Int(4)))]; got {type(recipe).__name__}"
        )
    return list(recipe)


def oneshot(
    model,
    variables,
    batches: Iterable[Any],
    recipe: Sequence[tuple[str, Any]] | Mapping[str, Any],
    *,
    mode: str = "one-pass",
    repair_batchnorm: bool = False,
    layer_types: Sequence[str] = ("Dense", "Conv"),
    apply_kwargs: Mapping[str, Any] | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    forward: Callable[[Any, Any], Any] | None = None,
    solver: str | SolverSpec = "obc",
    rel_damp: float = 0.01,
    progress: bool = False,
) -> OneShotResult:
    """Calibrate, compress and (optionally) repair batch norm, in one call; Linen or NNX.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module`` (not modified; put an NNX model in
        evaluation mode, ``model.eval()``, yourself).
      variables: Linen: the variable dict, every collection the model reads. NNX: None (the
        model's own state), or an ``nnx.State`` / pure dict applied over it.
      batches: calibration batches, any iterable (kept as a list: sequential mode and the
        batch-norm repair run over them again). A batch is an array, a tuple/list whose first
        element is the input, or a dict with an ``"x"`` entry (any pytree with ``forward``).
      recipe: the rules :func:`obcjax.transforms.compress` takes: ordered ``(regex, spec)``
        pairs or a dict, matched with ``re.fullmatch`` against '/'-joined layer paths, first
        match wins; a spec is a pruning or quantization spec, a ``(prune, quant)`` pair, a
        :class:`~obcjax.transforms.LayerSpec`, or None to leave the layer dense. Only the layers
        the recipe compresses are calibrated.
      mode: ``"one-pass"`` (every layer from the dense model's statistics; OBC) or
        ``"sequential"`` (layer by layer in forward order, each recalibrated on the compressed
        prefix; GPTQ / SparseGPT).
      repair_batchnorm: re-estimate every batch-norm layer's statistics on ``batches`` after
        compression (:func:`obcjax.pipeline.reestimate_batchnorm`).
      layer_types: which layer classes are calibrated (``"Dense"``, ``"Conv"``,
        ``"DenseGeneral"``; see :data:`obcjax.capture.LAYER_TYPES`).
      apply_kwargs: keyword arguments of the model's call for calibration (e.g.
        ``{"train": False}``).
      train_kwargs: Linen: the keyword arguments that run batch norm on batch statistics for
        the repair (e.g. ``{"train": True}``); default ``apply_kwargs``. NNX switches its
        ``nnx.BatchNorm`` layers itself.
      forward: ``forward(module, batch)`` runs the model, for several inputs or another method
        (as for :func:`~obcjax.calibration.calibrate`).
      solver: the default solver for rule values that are not ``LayerSpec`` s: ``"obc"``,
        ``"gptq"``, ``"magnitude"`` or an option record.
      rel_damp: relative damping of every Hessian.
      progress: show progress bars.

    Returns:
      A :class:`OneShotResult`: ``(variables, summary, compressed)``.

    Raises:
      ValueError: an unknown ``mode``; empty ``batches``; a rule that matches no layer; and
        whatever calibration and compression raise (each names the layer).
      TypeError: a ``recipe`` that is not a list or dict of rules; a model or variables of the
        wrong kind.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import flax.linen as nn
        >>> from obcjax import NM, Unstructured, oneshot
        >>> class MLP(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(8, name="head")(nn.relu(nn.Dense(32, name="hidden")(x)))
        >>> x = jax.random.normal(jax.random.key(0), (256, 16))
        >>> model = MLP()
        >>> variables = model.init(jax.random.key(1), x[:1])
        >>> res = oneshot(model, variables, [x[:128], x[128:]],
        ...               [("hidden", NM(2, 4)), ("head", Unstructured(0.5))])
        >>> res.summary["hidden/sparsity"], res.summary["head/sparsity"]
        (0.5, 0.5)
        >>> model.apply(res.variables, x).shape
        (256, 8)
    """
    if mode not in MODES:
        raise ValueError(f"oneshot: mode must be one of {MODES}, got {mode!r}")
    rules = _rules(recipe)
    batches = list(batches)
    if not batches:
        raise ValueError("oneshot: batches is empty; give at least one calibration batch")
    bound = BoundModel(model, variables, what="oneshot")
    if bound.is_nnx:
        params = nnx.to_pure_dict(nnx.state(bound.module(), nnx.Param))
    else:
        if "params" not in variables:
            raise TypeError(
                f"oneshot: a Linen model's variables need a 'params' collection, got "
                f"{sorted(variables)}"
            )
        params = variables["params"]
    run = dict(apply_kwargs=apply_kwargs, forward=forward, layer_types=layer_types)
    if mode == "one-pass":
        stats = calibrate(model, variables, batches, rules=rules, progress=progress, **run)
        out = compress(params, stats, rules, solver=solver, rel_damp=rel_damp, progress=progress)
    else:
        out = compress_sequential(
            model, params if bound.is_nnx else variables, batches, rules, solver=solver,
            rel_damp=rel_damp, progress=progress, **run,
        )
    if bound.is_nnx:
        new = BoundModel(bound.module(), out.params, what="oneshot").variables
    else:
        new = {**variables, "params": out.params}
    if repair_batchnorm:
        kwargs = apply_kwargs if train_kwargs is None else train_kwargs
        new = reestimate_batchnorm(model, new, batches, apply_kwargs=kwargs, forward=forward)
    return OneShotResult(new, out.summary, out)
