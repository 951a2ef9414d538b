"""Capture per-layer input statistics of unmodified Flax models (Linen and NNX).

``calibrate(model, variables, batches)`` runs the model's own forward pass inside one jitted step
and, for every selected ``Dense`` / ``Conv`` layer, folds the layer's input rows (Dense inputs or
conv im2col patches, see :mod:`obcjax.stats`) into a :class:`~obcjax.stats.HessianState`. Model code
is never edited:

* **Linen**: the forward pass runs under :func:`flax.linen.intercept_methods`, which sees every
  ``__call__`` of an ``nn.Dense`` / ``nn.Conv`` / ``nn.DenseGeneral`` with its bound module
  (``module.path`` is the key).
* **NNX**: the model is split into ``(graphdef, state)``; inside the jitted step it is merged
  again, every ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.LinearGeneral`` instance is mapped to its
  attribute path by :func:`flax.nnx.iter_graph`, and the classes' ``__call__`` is wrapped for the
  duration of the trace only (restored afterwards, also on error). The user's model is not mutated:
  state changes made by the forward pass (batch statistics, RNG counters) are discarded.

Both front ends feed one sink, so Linen and NNX twins give the same keys and the same statistics.
A key is the '/'-joined path of the layer's parameters minus the final ``"kernel"``, so
``params[path]["kernel"]`` (Linen ``variables["params"]``, NNX ``nnx.state(model, nnx.Param)``) is
the layer's weight, which is what :func:`obcjax.transforms.compress` expects.

The step function ``(states, variables, batch) -> states`` is traced once per batch shape;
``variables`` is an argument, not a constant, so a later *sequential* mode (GPTQ-style, calibrating
layer ``l+1`` on the outputs of already-compressed layers ``≤ l``) is just another call with other
variables.

Example:
    >>> stats = calibrate(model, variables, batches)                 # Linen
    >>> stats = calibrate(nnx_model, None, batches, rules=[("head", None), (".*", True)])
    >>> H = obcjax.stats.hessian_finalize(stats["conv1"])            # (G, cols, cols)
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx
from flax.errors import FlaxError
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from obcjax.rules import match_rules, normalize_rules
from obcjax.stats import (
    HessianState,
    conv_patches,
    dense_inputs,
    hessian_finalize,
    hessian_init,
    hessian_update,
)

__all__ = ["calibrate", "LAYER_TYPES", "finalize"]

# Layer type names understood by ``layer_types``, with their Linen and NNX classes.
LAYER_TYPES: dict[str, tuple[type, type]] = {
    "Dense": (nn.Dense, nnx.Linear),
    "Conv": (nn.Conv, nnx.Conv),
    "DenseGeneral": (nn.DenseGeneral, nnx.LinearGeneral),
}
_ALIASES = {"Linear": "Dense", "LinearGeneral": "DenseGeneral"}

# The NNX hook patches classes, which is process-global: one trace at a time.
_PATCH_LOCK = threading.RLock()


class CalibrationError(ValueError):
    """A calibration problem already described with its layer / batch; never re-wrapped."""


def _jit_step(fn: Callable) -> Callable:
    # One indirection so tests can wrap the step (chex.assert_max_traces) before it is jitted.
    return jax.jit(fn)


# ----------------------------------------------------------------------------- layer rows


def _axes(axis, ndim: int) -> tuple[int, ...]:
    # Flax sorts the contracted axes: the kernel's leading dims follow the input's axis order.
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis))


def _layer_rows(kind: str, module, x, path: str) -> jax.Array:
    """Rows ``(tokens, G, cols)`` the layer multiplies with its flattened kernel."""
    x = jnp.asarray(x)
    if kind == "Dense":
        return dense_inputs(x)[:, None, :]
    if kind == "DenseGeneral":
        batch = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
        if batch:
            raise CalibrationError(
                f"layer {path!r}: DenseGeneral/LinearGeneral with batch dims has one weight per "
                "batch index and is not supported; exclude it with a (regex, None) rule"
            )
        axes = _axes(module.axis, x.ndim)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        return x.reshape(-1, 1, math.prod(x.shape[x.ndim - len(axes) :]))
    # Conv: Linen and NNX use the same attribute names and the same padding semantics.
    ks = module.kernel_size
    ks = (ks,) if isinstance(ks, int) else tuple(ks)
    G = int(module.feature_group_count)
    cin = x.shape[-1]
    try:
        return conv_patches(
            x,
            ks + (cin // max(G, 1), 1),
            strides=module.strides,
            padding=module.padding,
            dilation=module.kernel_dilation,
            feature_group_count=G,
            input_dilation=module.input_dilation,
        )
    except ValueError as e:
        raise CalibrationError(f"layer {path!r}: {e}") from e


class _Sink:
    """Trace-local accumulator shared by both front ends.

    ``select`` None records every layer (discovery); otherwise only those paths are accumulated.
    """

    def __init__(self, states: dict[str, HessianState] | None, select=None):
        self.states = dict(states or {})
        self.select = select
        self.order: list[str] = []
        self.kinds: dict[str, str] = {}
        self._active: set[int] = set()

    @contextlib.contextmanager
    def call(self, path: str, kind: str, module, args, kwargs):
        # A subclass whose __call__ calls super().__call__ would be seen twice: count it once.
        key = id(module)
        if key in self._active:
            yield
            return
        self._active.add(key)
        try:
            self._record(path, kind, module, args, kwargs)
            yield
        finally:
            self._active.discard(key)

    def _record(self, path, kind, module, args, kwargs):
        if path not in self.kinds:
            self.order.append(path)
            self.kinds[path] = kind
        if self.select is not None and path not in self.select:
            return
        x = args[0] if args else kwargs.get("inputs")
        if x is None:
            raise CalibrationError(f"layer {path!r}: could not find the layer's input argument")
        rows = _layer_rows(kind, module, x, path)
        state = self.states.get(path)
        if state is None:
            state = hessian_init(rows.shape[-1], rows.shape[1])
        try:
            self.states[path] = hessian_update(state, rows)
        except ValueError as e:
            raise CalibrationError(
                f"layer {path!r}: its input rows {tuple(rows.shape)} do not match the statistics "
                f"{tuple(state.sum.shape)} (is the layer called with inputs of different widths?)"
            ) from e


def _kinds(layer_types: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(layer_types, str):
        layer_types = (layer_types,)
    out = []
    for t in layer_types:
        name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        name = _ALIASES.get(name, name)
        if name not in LAYER_TYPES:
            raise ValueError(
                f"calibrate: unknown layer type {t!r}; known: {sorted(LAYER_TYPES) + sorted(_ALIASES)}"
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


# ----------------------------------------------------------------------------- front ends


class _Linen:
    """Linen: ``variables`` is the variable dict; capture through ``nn.intercept_methods``."""

    def __init__(self, model: nn.Module, variables, kinds, forward):
        if variables is None:
            raise TypeError("calibrate: a Linen model needs its variables ({'params': ...})")
        if not isinstance(variables, Mapping):
            raise TypeError(
                f"calibrate: Linen variables must be a dict like {{'params': ...}}, got "
                f"{type(variables).__name__}"
            )
        self.model = model
        self.variables = variables
        self.classes = {k: LAYER_TYPES[k][0] for k in kinds}
        self.forward = forward

    def run(self, variables, batch, sink: _Sink):
        classes = self.classes

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__":
                return next_fun(*args, **kwargs)
            for kind, cls in classes.items():
                if isinstance(context.module, cls):
                    path = "/".join(str(p) for p in context.module.path)
                    with sink.call(path, kind, context.module, args, kwargs):
                        return next_fun(*args, **kwargs)
            return next_fun(*args, **kwargs)

        # mutable=True: a model that updates batch statistics or sows intermediates still runs;
        # the updates are discarded.
        bound = self.model.bind(variables, mutable=True)
        with nn.intercept_methods(interceptor):
            self.forward(bound, batch)


@contextlib.contextmanager
def _patch_calls(classes: Sequence[type], hook):
    """Wrap ``cls.__call__`` of each class with ``hook``; always restore the originals."""
    with _PATCH_LOCK:
        saved = {}
        try:
            for cls in classes:
                orig = cls.__dict__["__call__"]
                saved[cls] = orig

                @functools.wraps(orig)
                def wrapper(self, *args, _orig=orig, **kwargs):
                    with hook(self, args, kwargs):
                        return _orig(self, *args, **kwargs)

                type.__setattr__(cls, "__call__", wrapper)
            yield
        finally:
            for cls, orig in saved.items():
                type.__setattr__(cls, "__call__", orig)


class _NNX:
    """NNX: ``variables`` is the model's ``nnx.State``; capture by wrapping the classes' calls."""

    def __init__(self, model: nnx.Module, variables, kinds, forward):
        graphdef, state = nnx.split(model)
        # Copy the Variable objects: the split state shares them with the model, which must not
        # change.
        state = jax.tree.map(lambda a: a, state)
        if isinstance(variables, nnx.State):
            tmp = nnx.merge(graphdef, state)
            nnx.update(tmp, variables)  # a (partial) state over the copy, never over the model
            state = nnx.split(tmp)[1]
        elif isinstance(variables, Mapping):
            try:
                nnx.replace_by_pure_dict(state, variables)
            except (KeyError, ValueError, TypeError) as e:
                raise ValueError(
                    "calibrate: NNX variables given as a dict must be a (partial) pure dict of the "
                    f"model's state, e.g. nnx.state(model, nnx.Param).to_pure_dict(): {e}"
                ) from e
        elif variables is not None:
            raise TypeError(
                "calibrate: NNX variables must be None (use the model's own), an nnx.State or a "
                f"pure dict of it, got {type(variables).__name__}"
            )
        self.graphdef = graphdef
        self.variables = state
        self.classes = {k: LAYER_TYPES[k][1] for k in kinds}
        self.forward = forward

    def run(self, variables, batch, sink: _Sink):
        model = nnx.merge(self.graphdef, variables)
        where: dict[int, tuple[str, str]] = {}
        for p, node in nnx.iter_graph(model):
            for kind, cls in self.classes.items():
                if isinstance(node, cls) and id(node) not in where:
                    where[id(node)] = ("/".join(str(k) for k in p), kind)

        @contextlib.contextmanager
        def hook(module, args, kwargs):
            found = where.get(id(module))
            if found is None:  # a layer built inside __call__ has no parameters in the state
                yield
                return
            with sink.call(found[0], found[1], module, args, kwargs):
                yield

        with _patch_calls(list(dict.fromkeys(self.classes.values())), hook):
            self.forward(model, batch)


# ----------------------------------------------------------------------------- batches


def _batch_input(batch, i: int):
    """The model input of one batch: an array, a tuple's first element, or a dict's ``"x"``."""
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise ValueError(
                f"calibrate: batch {i} is a dict without an 'x' entry (keys {sorted(batch)}); "
                "pass arrays, (x, ...) tuples, {'x': ...} dicts, or a forward= function"
            )
        return batch["x"]
    if isinstance(batch, tuple | list):
        if not batch:
            raise ValueError(f"calibrate: batch {i} is an empty {type(batch).__name__}")
        return batch[0]
    return batch


def _shapes(tree) -> str:
    return str(jax.tree.map(lambda a: tuple(np.shape(a)), tree))


def _auto_mesh(mesh):
    # Explicit-axis meshes (jax.make_mesh's default) type-check every sharded contraction; the
    # token reduction here is meant to be an ordinary all-reduce.
    types = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
    return jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=types)


def _mesh_of(batch):
    for leaf in jax.tree.leaves(batch):
        sh = getattr(leaf, "sharding", None)
        if isinstance(sh, NamedSharding) and sh.mesh.size > 1:
            return sh.mesh
    return None


def _shard(batch, mesh, i: int):
    spec = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    rep = NamedSharding(mesh, P())

    def put(a):
        a = a if isinstance(a, jax.Array) else np.asarray(a)
        if a.ndim == 0:
            return jax.device_put(a, rep)
        if a.shape[0] % mesh.size:
            raise ValueError(
                f"calibrate: batch {i} has {a.shape[0]} examples, not divisible over the mesh's "
                f"{mesh.size} devices; use a batch size that is a multiple of {mesh.size}"
            )
        return jax.device_put(a, spec)

    return jax.tree.map(put, batch)


@jax.jit
def _finite(states: dict[str, HessianState]) -> dict[str, jax.Array]:
    return {p: jnp.all(jnp.isfinite(s.sum)) for p, s in states.items()}


# ----------------------------------------------------------------------------- public API


def calibrate(
    model: nn.Module | nnx.Module,
    variables: Any,
    batches: Iterable[Any],
    *,
    rules: Sequence[tuple[str, Any]] | Sequence[str] | str = (".*",),
    layer_types: Sequence[str] = ("Dense", "Conv"),
    forward: Callable[[Any, Any], Any] | None = None,
    apply_kwargs: Mapping[str, Any] | None = None,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = False,
) -> dict[str, HessianState]:
    """Capture ``Σ x xᵀ`` of the inputs of every selected layer over a stream of batches.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``. Its code is not touched.
      variables: Linen: the variable dict (``{"params": ..., "batch_stats": ...}``). NNX: None for
        the model's own state, or an ``nnx.State`` / pure dict (possibly partial, e.g. compressed
        params) that replaces parts of it -- the model itself is not changed.
      batches: any iterable (consumed once, one batch in memory at a time). A batch is an array,
        a tuple/list whose first element is the input, or a dict with an ``"x"`` entry; with
        ``forward`` it can be any pytree.
      rules: regexes (``re.fullmatch`` on '/'-joined layer paths, first match wins) choosing the
        layers, as bare strings or ``(regex, value)`` pairs where a value of None skips the layer.
        A rule that matches no layer is an error.
      layer_types: which layer classes to capture: ``"Dense"`` (``nn.Dense`` / ``nnx.Linear``),
        ``"Conv"`` (``nn.Conv`` / ``nnx.Conv``), ``"DenseGeneral"`` (``nn.DenseGeneral`` /
        ``nnx.LinearGeneral`` without batch dims; columns are the flattened contracted axes).
      forward: ``forward(module, batch)`` runs the model, for several inputs or another method;
        ``module`` is the bound Linen module or the NNX module. Default:
        ``module(x, **apply_kwargs)``.
      apply_kwargs: static keyword arguments of the default forward (e.g. ``{"train": False}``).
        Put NNX models in evaluation mode (``model.eval()``) yourself.
      mesh: shard every batch's leading dim over all the mesh's devices (``NamedSharding``);
        variables and statistics are replicated. Batches that are already sharded over a mesh
        are used as they are. The result equals the single-device one up to summation order.
      progress: show a tqdm bar over batches.

    Returns:
      ``{path: HessianState}`` in forward order: ``sum (G, cols, cols)`` float32 and ``count``
      tokens, where ``params[path]["kernel"]`` is the layer's kernel. For a conv the columns run
      ``(kh, kw, cin_in_group)``; ``G`` is ``feature_group_count``.

    Raises:
      ValueError: empty ``batches``; a rule matching no layer; a batch the model rejects (its own
        error is chained); a layer whose statistics are NaN/inf (the first in forward order and
        the first batch are named); a layer that received zero tokens.

    Example:
        >>> stats = calibrate(model, variables, [x[i : i + 64] for i in range(0, 512, 64)])
        >>> sorted(stats)
        ['Dense_0', 'conv1']
    """
    kinds = _kinds(layer_types)
    compiled = normalize_rules(rules, what="layer")  # validate the rules before any batch runs
    kwargs = dict(apply_kwargs or {})
    if forward is None:
        # Only the input travels to the device, not labels riding along in the batch.
        select_input = _batch_input

        def forward(module, x):
            return module(x, **kwargs)

    elif kwargs:
        raise ValueError("calibrate: give either forward= or apply_kwargs=, not both")
    else:
        select_input = lambda batch, i: batch

    if isinstance(model, nnx.Module):
        front = _NNX(model, variables, kinds, forward)
    elif isinstance(model, nn.Module):
        front = _Linen(model, variables, kinds, forward)
    else:
        raise TypeError(
            f"calibrate: model must be a flax.linen.Module or a flax.nnx.Module, got "
            f"{type(model).__name__}"
        )
    if mesh is not None:
        mesh = _auto_mesh(mesh)

    iterator = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        iterator = iter(tqdm(iterator, desc="calibrate", unit="batch", total=total))

    def describe(i, batch, e):
        return CalibrationError(
            f"calibrate: batch {i} (leaf shapes {_shapes(batch)}) did not run through the model: "
            f"{type(e).__name__}: {e}"
        )

    states = update = order = None
    variables = front.variables
    finite_flags: list[dict[str, jax.Array]] = []
    n = 0
    reshard = mesh is not None
    for i, batch in enumerate(iterator):
        batch = select_input(batch, i)
        if states is None:
            if mesh is None:
                # Batches already sharded over a mesh: replicate the rest there, keep theirs.
                mesh = _mesh_of(batch)
            if mesh is not None:
                variables = jax.device_put(variables, NamedSharding(mesh, P()))
            # Discovery: an abstract forward pass lists the layers (in call order) and their widths.
            sink = _Sink(None)
            try:
                shapes = jax.eval_shape(
                    lambda v, b, _s=sink: (front.run(v, b, _s), _s.states)[1], variables, batch
                )
            except CalibrationError:
                raise
            except (TypeError, ValueError, IndexError, KeyError, FlaxError) as e:
                raise describe(i, batch, e) from e
            order = list(sink.order)
            if not order:
                raise ValueError(
                    f"calibrate: the model called no layer of types {list(kinds)}; nothing to "
                    "calibrate"
                )
            chosen = match_rules(order, compiled, what="layer")
            paths = [p for p in order if p in chosen and chosen[p] is not None]
            if not paths:
                raise ValueError(
                    f"calibrate: every matched layer was skipped by a None rule; layers: {order}"
                )
            states = {p: hessian_init(shapes[p].sum.shape[-1], shapes[p].sum.shape[0]) for p in paths}
            if mesh is not None:
                states = jax.device_put(states, NamedSharding(mesh, P()))
            select = frozenset(paths)

            def step(states, variables, batch, _select=select):
                sink = _Sink(states, _select)
                front.run(variables, batch, sink)
                return {p: sink.states[p] for p in states}

            update = _jit_step(step)
        if reshard:
            batch = _shard(batch, mesh, i)
        try:
            states = update(states, variables, batch)
        except CalibrationError as e:
            if str(e).startswith("calibrate: batch"):
                raise
            raise CalibrationError(
                f"calibrate: batch {i} (leaf shapes {_shapes(batch)}) does not fit the layer "
                f"widths seen in batch 0: {e}"
            ) from e
        except (TypeError, ValueError, IndexError, KeyError, FlaxError) as e:
            raise describe(i, batch, e) from e
        finite_flags.append(_finite(states))
        n += 1

    if n == 0:
        raise ValueError("calibrate: batches is empty; give at least one calibration batch")
    _check(states, paths, finite_flags)
    return {p: states[p] for p in paths}


def _check(states, paths, finite_flags):
    """Raise on the first non-finite layer (forward order, first batch) or a zero-token layer."""
    last = jax.device_get(finite_flags[-1])
    bad = [p for p in paths if not bool(last[p])]
    if bad:
        flags = jax.device_get(finite_flags)
        first_batch = next(i for i, f in enumerate(flags) if not all(bool(f[p]) for p in paths))
        first = next(p for p in paths if not bool(flags[first_batch][p]))
        raise ValueError(
            f"calibrate: layer {first!r} (the first in forward order) got NaN or inf inputs from "
            f"batch {first_batch}; {len(bad)} layer(s) affected in all. Check the calibration "
            "data for non-finite values (or the model's activations for overflow)"
        )
    counts = jax.device_get({p: states[p].count for p in paths})
    empty = [p for p in paths if int(counts[p]) == 0]
    if empty:
        raise ValueError(
            f"calibrate: layer(s) {empty} received zero tokens (the batches had no rows / "
            "positions for them); give non-empty batches or exclude the layers with (regex, None)"
        )


def finalize(stats: Mapping[str, HessianState]) -> dict[str, jax.Array]:
    """``{path: H (G, cols, cols)}`` from :func:`calibrate`'s output (``2 · sum / count``)."""
    return {p: hessian_finalize(s, layer=p) for p, s in stats.items()}
