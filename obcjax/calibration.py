"""Capture per-layer input statistics of unmodified Flax models (Linen and NNX).

``calibrate(model, variables, batches)`` runs the model's own forward pass inside one jitted step
and, for every selected ``Dense`` / ``Conv`` layer, folds the layer's input rows (Dense inputs or
conv im2col patches, :func:`obcjax.capture.layer_rows`) into a :class:`~obcjax.stats.HessianState`.
Model code is never edited: the layers are intercepted by :mod:`obcjax.capture`.

* **Linen**: the forward pass runs under :func:`flax.linen.intercept_methods`, which sees every
  ``__call__`` of an ``nn.Dense`` / ``nn.Conv`` / ``nn.DenseGeneral`` with its bound module
  (``module.path`` is the key). A collection the model needs but the variables lack (a
  ``batch_stats`` left out) is an error, as for ``model.apply``, not a run on fresh statistics.
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
    >>> from obcjax import zoo
    >>> model, variables = zoo.linen_model("lenet5"), zoo.init_variables("lenet5", (8, 8, 1))
    >>> batches = [x for x, _ in zoo.batches(zoo.digits()["calib"], 64)]
    >>> stats = calibrate(model, variables, batches)                 # Linen
    >>> nnx_model = zoo.nnx_from_variables("lenet5", variables, input_shape=(8, 8, 1))
    >>> stats = calibrate(nnx_model, None, batches, rules=[("fc3", None), (".*", True)])  # NNX
    >>> hessian_finalize(stats["conv2"]).shape                       # (G, cols, cols)
    (1, 54, 54)
"""

from __future__ import annotations

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

from obcjax.capture import BoundModel, CaptureError, LayerCall, layer_kinds, layer_rows
from obcjax.rules import match_rules, normalize_rules
from obcjax.stats import (
    HessianState,
    check_stats,
    hessian_finalize,
    hessian_init,
    hessian_update,
)

__all__ = ["calibrate", "finalize", "shard_batch"]


def _jit_step(fn: Callable) -> Callable:
    # One indirection so tests can wrap the step (chex.assert_max_traces) before it is jitted.
    return jax.jit(fn)


# Compiled steps (and abstract discovery passes) of calls that run the same forward -- the same
# ``forward`` function, or the default one with equal keyword arguments -- over the same model
# structure (an NNX graphdef, or an equal Linen module) for the same layers: a block-wise run
# calibrates many identical blocks, each with its own parameters, and a sequential run calibrates
# the same model once per layer; each compiles once. Keyed like ``jax.jit``'s own cache, by the
# identity of the function given; bounded.
_STEP_CACHE: dict[tuple, Callable] = {}
_STEP_CACHE_SIZE = 64


def _cached_step(key, make: Callable[[], Callable]) -> Callable:
    if key is None:
        return make()
    try:
        hash(key)
    except TypeError:
        return make()
    fn = _STEP_CACHE.pop(key, None)
    if fn is None:
        fn = make()
    _STEP_CACHE[key] = fn  # most recently used last
    while len(_STEP_CACHE) > _STEP_CACHE_SIZE:
        _STEP_CACHE.pop(next(iter(_STEP_CACHE)))
    return fn


class _Sink:
    """Trace-local Hessian accumulator, the hook of both front ends.

    ``select`` None records every layer (discovery); otherwise only those paths are accumulated.
    """

    def __init__(self, states: dict[str, HessianState] | None, select=None):
        self.states = dict(states or {})
        self.select = select
        self.order: list[str] = []
        self.kinds: dict[str, str] = {}

    def hook(self, call: LayerCall, proceed):
        self._record(call)
        return proceed(*call.args, **call.kwargs)

    def _record(self, call: LayerCall):
        path = call.path
        if path not in self.kinds:
            self.order.append(path)
            self.kinds[path] = call.kind
        if self.select is not None and path not in self.select:
            return
        x = call.input
        if x is None:
            raise CaptureError(f"layer {path!r}: could not find the layer's input argument")
        shape = tuple(jnp.shape(x))
        rows = layer_rows(call.kind, call.module, x, path) if shape and shape[-1] else None
        if rows is None or rows.shape[-1] == 0:
            raise CaptureError(
                f"layer {path!r}: its input has no features (input shape {shape}); a layer "
                "without inputs has nothing to calibrate -- give it inputs, or exclude it with a "
                "(regex, None) rule"
            )
        state = self.states.get(path)
        if state is None:
            state = hessian_init(rows.shape[-1], rows.shape[1])
        try:
            self.states[path] = hessian_update(state, rows)
        except ValueError as e:
            raise CaptureError(
                f"layer {path!r}: its input rows {tuple(rows.shape)} do not match the statistics "
                f"{tuple(state.sum.shape)} (is the layer called with inputs of different widths?)"
            ) from e


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


def shard_batch(batch: Any, mesh: jax.sharding.Mesh) -> Any:
    """``batch`` with every array's leading axis sharded over all of ``mesh``'s devices.

    Scalars are replicated. This is how :func:`calibrate` places a batch given ``mesh=``; use it
    to place inputs the same way for other jitted work over the same data (e.g. a block's forward
    in :func:`obcjax.blockwise.compress_blockwise`).

    Args:
      batch: a pytree of arrays (NumPy or JAX).
      mesh: the device mesh (any axis types; sharding is over all its axes together).

    Raises:
      ValueError: a leading axis not divisible by the number of devices.

    Example:
        >>> mesh = jax.make_mesh((4,), ("data",))
        >>> x = shard_batch(np.zeros((8, 3), np.float32), mesh)
        >>> len(x.sharding.device_set), x.addressable_shards[0].data.shape
        (4, (2, 3))
    """
    return _shard(batch, _auto_mesh(mesh), 0)


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
        ``nnx.LinearGeneral`` without batch dims; columns are the flattened contracted axes);
        see :data:`obcjax.capture.LAYER_TYPES`.
      forward: ``forward(module, batch)`` runs the model, for several inputs or another method;
        ``module`` is the bound Linen module or the NNX module. Default:
        ``module(x, **apply_kwargs)``.
      apply_kwargs: static keyword arguments of the default forward (e.g. ``{"train": False}``).
        Put NNX models in evaluation mode (``model.eval()``) yourself.
      mesh: data-parallel calibration: shard every batch's leading dim over all the mesh's
        devices (``NamedSharding``, :func:`shard_batch`); variables and statistics are
        replicated, so XLA partitions the step into per-device partial sums of ``x xᵀ`` and
        all-reduces (a ``psum``) them. Batches that are already sharded over a mesh are used as
        they are. The result equals the single-device one up to float32 summation order.
        **Several hosts**: call ``jax.distributed.initialize()`` on every host first, build the
        mesh over ``jax.devices()`` (all hosts' devices), give each host's slice of every batch
        as one global array (``jax.make_array_from_process_local_data(NamedSharding(mesh,
        P(mesh.axis_names)), local_batch)``) and run the same call on every host (SPMD); each
        gets the same replicated statistics.
      progress: show a tqdm bar over batches.

    Returns:
      ``{path: HessianState}`` in forward order: ``sum (G, cols, cols)`` float32 and ``count``
      tokens, where ``params[path]["kernel"]`` is the layer's kernel. For a conv the columns run
      ``(kh, kw, cin_in_group)``; ``G`` is ``feature_group_count``.

    Raises:
      ValueError: empty ``batches``; a rule matching no layer; a batch the model rejects (its own
        error is chained); a layer whose statistics are NaN/inf (the first in forward order and
        the first batch are named); a layer that received zero tokens; a Linen model that reads
        a collection (e.g. ``batch_stats``) or a variable the variables lack (a
        :class:`~obcjax.capture.CaptureError` naming it).

    Example:
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
        ...         return nn.Dense(10)(x.reshape(x.shape[0], -1))
        >>> x = np.random.default_rng(0).normal(size=(512, 8, 8, 1)).astype(np.float32)
        >>> model = Net()
        >>> variables = model.init(jax.random.key(0), x[:1])
        >>> stats = calibrate(model, variables, [x[i : i + 64] for i in range(0, 512, 64)])
        >>> sorted(stats)
        ['Dense_0', 'conv1']
    """
    kinds = layer_kinds(layer_types, what="calibrate")
    compiled = normalize_rules(rules, what="layer")  # validate the rules before any batch runs
    if batches is None or isinstance(batches, str | bytes) or not hasattr(batches, "__iter__"):
        raise TypeError(
            "calibrate: batches must be an iterable of batches (arrays, (x, ...) tuples or "
            f"{{'x': ...}} dicts), e.g. a list or a generator; got {type(batches).__name__}"
            + (f" {batches!r}" if isinstance(batches, str | bytes) and len(batches) < 40 else "")
        )
    if forward is not None and not callable(forward):
        raise TypeError(
            f"calibrate: forward must be a function forward(module, batch), got "
            f"{type(forward).__name__}"
        )
    if apply_kwargs is not None and not isinstance(apply_kwargs, Mapping):
        raise TypeError(
            f"calibrate: apply_kwargs must be a dict of keyword arguments, got "
            f"{type(apply_kwargs).__name__}"
        )
    kwargs = dict(apply_kwargs or {})
    user_forward = forward
    if forward is None:
        # Only the input travels to the device, not labels riding along in the batch.
        select_input = _batch_input

        def forward(module, x):
            return module(x, **kwargs)

    elif kwargs:
        raise ValueError("calibrate: give either forward= or apply_kwargs=, not both")
    else:
        select_input = lambda batch, i: batch

    front = BoundModel(model, variables, what="calibrate")

    def run(variables, batch, sink: _Sink):
        front.run(forward, batch, variables=variables, hook=sink.hook, layer_types=kinds)

    if mesh is not None:
        mesh = _auto_mesh(mesh)

    iterator = iter(batches)
    if progress:
        from tqdm.auto import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        iterator = iter(tqdm(iterator, desc="calibrate", unit="batch", total=total))

    def describe(i, batch, e):
        return CaptureError(
            f"calibrate: batch {i} (leaf shapes {_shapes(batch)}) did not run through the model: "
            f"{type(e).__name__}: {e}"
        )

    states = update = order = None
    variables = front.variables
    # ``run`` (kept by a cached step after this call) always passes the variables: the bound
    # model must not keep this call's arrays alive for as long as the step stays cached.
    front.variables = None
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
            # Cached, like the step below, for calls over the same structure, forward, layer
            # types and argument shapes (a sequential run calibrates once per layer).
            structure = front.graphdef if front.is_nnx else front.model
            fkey = user_forward if user_forward is not None else _items(kwargs)
            base = None if fkey is None or _intercepted() else (structure, fkey, kinds)
            shapes_in = (_abstract(variables), _abstract(batch))
            shapes, order = _cached_step(
                None if base is None or None in shapes_in else base + ("discover", *shapes_in),
                lambda v=variables, b=batch, i=i: _discover(run, v, b, lambda e: describe(i, b, e)),
            )
            order = list(order)
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
            states = {
                p: hessian_init(shapes[p].sum.shape[-1], shapes[p].sum.shape[0]) for p in paths
            }
            if mesh is not None:
                states = jax.device_put(states, NamedSharding(mesh, P()))
            select = frozenset(paths)

            def step(states, variables, batch, _select=select):
                sink = _Sink(states, _select)
                run(variables, batch, sink)
                return {p: sink.states[p] for p in states}

            update = _cached_step(
                None if base is None else base + (select, _jit_step),
                lambda step=step: _jit_step(step),
            )
        if reshard:
            batch = _shard(batch, mesh, i)
        try:
            states = update(states, variables, batch)
        except CaptureError as e:
            if str(e).startswith("calibrate: batch"):
                raise
            raise CaptureError(
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


def _intercepted() -> bool:
    """Whether a Linen method interceptor is active around this call (``nn.intercept_methods``,
    as :func:`obcjax.recipes.minilm.calibrate_minilm` uses): a step traced under one must not
    be reused outside it, or the other way round, so such calls are not cached. Should Flax move
    its interceptor stack, every call counts as intercepted (no caching, never a stale step)."""
    import flax.linen.module as linen_module

    stack = getattr(linen_module, "_global_interceptor_stack", None)
    try:
        return stack is None or bool(stack)
    except TypeError:
        return True


def _items(kwargs: Mapping[str, Any]):
    """A hashable stand-in for the default forward's keyword arguments (None if unhashable)."""
    try:
        items = tuple(sorted(kwargs.items()))
        hash(items)
    except TypeError:
        return None
    return ("call", items)


def _abstract(tree):
    """The tree structure and leaf shapes/dtypes of ``tree``: a hashable cache key (or None)."""
    try:
        leaves, treedef = jax.tree.flatten(tree)
        key = (treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", type(x))))
                              for x in leaves))
        hash(key)
    except (TypeError, ValueError):
        return None
    return key


def _discover(run, variables, batch, describe):
    """One abstract forward pass: the HessianState shapes of every layer and their call order."""
    sink = _Sink(None)
    try:
        shapes = jax.eval_shape(
            lambda v, b, _s=sink: (run(v, b, _s), _s.states)[1], variables, batch
        )
    except CaptureError:
        raise
    except (TypeError, ValueError, IndexError, KeyError, FlaxError) as e:
        raise describe(e) from e
    return shapes, tuple(sink.order)


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
    check_stats(stats, list(stats) if isinstance(stats, Mapping) else (), what="finalize")
    return {p: hessian_finalize(s, layer=p) for p, s in stats.items()}
