"""Intercept the layers of unmodified Flax models, Linen and NNX alike.

This is the only module that knows how Flax layers are intercepted; calibration
(:mod:`obcjax.calibration`), activation quantization (:mod:`obcjax.activations`), batch-norm repair
(:mod:`obcjax.pipeline`) and FIT's activation Fisher (:mod:`obcjax.fit`) all go through it.

* :func:`intercept` routes every ``__call__`` of the chosen layers through a hook
  ``hook(call, proceed)``: ``call`` is a :class:`LayerCall` (the layer's '/'-joined path, its kind,
  the module, its arguments) and ``proceed(*args, **kwargs)`` runs the layer. A hook may read the
  input, replace it, or read the output. **Linen**: through :func:`flax.linen.intercept_methods`
  (``module.path`` is the path). **NNX**: the layer classes' ``__call__`` is wrapped while any
  interception is active; the wrapper only dispatches calls made by the thread that entered the
  context and by modules of the graph given (their paths come from :func:`flax.nnx.iter_graph`),
  so other threads, and other models, run untouched. Contexts nest in the same order on both front
  ends: the innermost sees a call first, so an outer observer (calibration) sees the input an
  inner one (activation quantization) passes on, which is what the layer gets.
* :class:`BoundModel` holds a model with its variables as one pytree that a jitted step takes as
  an argument, and runs a forward pass over it. The user's model and variables are never changed:
  NNX runs on a copy of the state, and Linen updates (batch statistics) are discarded. A Linen
  model that needs a collection the variables lack (``batch_stats``) is an error, as it is for
  ``model.apply``, never a run on fresh statistics.
* :func:`layer_rows` gives the rows ``(tokens, G, cols)`` a ``Dense`` / ``Conv`` /
  ``DenseGeneral`` layer multiplies with its flattened kernel (conv im2col patches, see
  :mod:`obcjax.stats`).

Both front ends give the same paths for Linen/NNX twins: the '/'-joined path of the layer's
parameters, so ``params[path]["kernel"]`` is its kernel.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from obcjax.capture import intercept
    >>> model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
    >>> seen = {}
    >>> def hook(call, proceed):
    ...     seen[call.path] = (call.kind, call.input.shape)
    ...     return proceed(*call.args, **call.kwargs)
    >>> with intercept(model, hook, ["Dense"]):
    ...     y = model(jnp.ones((5, 3)))
    >>> seen
    {'layers/0': ('Dense', (5, 3)), 'layers/1': ('Dense', (5, 4))}
"""

from __future__ import annotations

import contextlib
import functools
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax import nnx
from flax.errors import (
    ApplyScopeInvalidVariablesStructureError,
    ApplyScopeInvalidVariablesTypeError,
    InvalidRngError,
    ScopeCollectionNotFound,
    ScopeParamNotFoundError,
    ScopeVariableNotFoundError,
)
from flax.traverse_util import flatten_dict

from obcjax.stats import conv_patches, dense_inputs

__all__ = [
    "LAYER_TYPES",
    "BoundModel",
    "CaptureError",
    "LayerCall",
    "input_hook",
    "intercept",
    "layer_kinds",
    "layer_rows",
]

#: Layer type names with a kernel, each with its Linen and NNX class.
LAYER_TYPES: dict[str, tuple[type, type]] = {
    "Dense": (nn.Dense, nnx.Linear),
    "Conv": (nn.Conv, nnx.Conv),
    "DenseGeneral": (nn.DenseGeneral, nnx.LinearGeneral),
}
_ALIASES = {"Linear": "Dense", "LinearGeneral": "DenseGeneral"}

# Linen collections that are never made mutable: parameters are read only (a missing one is
# Flax's own error), and sown intermediates are not kept.
_READ_ONLY = ("params", "intermediates")


class CaptureError(ValueError):
    """A capture problem already described with its layer or batch; callers do not re-wrap it."""


class LayerCall(NamedTuple):
    """One intercepted layer call, as a hook sees it.

    Attributes:
      path: the layer's '/'-joined path (``params[path]`` holds its parameters).
      kind: its ``LAYER_TYPES`` name (``"Dense"``, ``"Conv"``, ``"DenseGeneral"``), or the class
        name for a layer class given directly (``"BatchNorm"``).
      module: the bound Linen module or the NNX module.
      args, kwargs: the call's arguments.
    """

    path: str
    kind: str
    module: Any
    args: tuple
    kwargs: dict

    @property
    def input(self) -> Any:
        """The layer's input: the first positional argument (or ``inputs=`` / ``x=``)."""
        if self.args:
            return self.args[0]
        return self.kwargs.get("inputs", self.kwargs.get("x"))

    def replace_input(self, x: Any) -> LayerCall:
        """The same call with its input replaced by ``x``."""
        if self.args or not ({"inputs", "x"} & set(self.kwargs)):
            return self._replace(args=(x, *self.args[1:]))
        key = "inputs" if "inputs" in self.kwargs else "x"
        return self._replace(kwargs={**self.kwargs, key: x})


Hook = Callable[[LayerCall, Callable[..., Any]], Any]


def input_hook(transform: Callable[[LayerCall], Any]) -> Hook:
    """A hook for :func:`intercept` that replaces each layer's input by ``transform(call)``.

    A None result leaves the input alone, so ``transform`` may also only observe.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> layer = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
        >>> with intercept(layer, input_hook(lambda call: jnp.zeros_like(call.input)), "Dense"):
        ...     y = layer(jnp.ones((1, 2)))
        >>> y.tolist()
        [[0.0]]
    """

    def hook(call: LayerCall, proceed):
        new = transform(call)
        if new is not None:
            call = call.replace_input(new)
        return proceed(*call.args, **call.kwargs)

    return hook


# ----------------------------------------------------------------------------- layer types


def layer_kinds(
    layer_types: Sequence[str | type] | str, *, what: str = "capture"
) -> tuple[str, ...]:
    """Canonical ``LAYER_TYPES`` names of ``layer_types``, in order, without repeats.

    Args:
      layer_types: names (``"Dense"``, ``"Conv"``, ``"DenseGeneral"``, or the NNX names
        ``"Linear"`` / ``"LinearGeneral"``) or layer classes (read by their name).
      what: the caller's name, for the error message.

    Raises:
      ValueError: an unknown layer type (the known names are listed).

    Example:
        >>> from flax import nnx
        >>> layer_kinds(["Linear", nnx.Conv, "Dense"])
        ('Dense', 'Conv')
    """
    if isinstance(layer_types, str):
        layer_types = (layer_types,)
    out = []
    for t in layer_types:
        name = t if isinstance(t, str) else getattr(t, "__name__", repr(t))
        name = _ALIASES.get(name, name)
        if name not in LAYER_TYPES:
            raise ValueError(
                f"{what}: unknown layer type {t!r}; known: {sorted(LAYER_TYPES) + sorted(_ALIASES)}"
            )
        out.append(name)
    return tuple(dict.fromkeys(out))


def _classes(layer_types, base: type) -> list[tuple[type, str]]:
    """``(class, kind)`` pairs of one front end (``base``: ``nn.Module`` or ``nnx.Module``)."""
    if isinstance(layer_types, str | type):
        layer_types = (layer_types,)
    twin = {cls: kind for kind, classes in LAYER_TYPES.items() for cls in classes}
    out = []
    for t in layer_types:
        if isinstance(t, type) and t not in twin:
            pairs = [(t, t.__name__)]
        else:
            kind = twin[t] if isinstance(t, type) else layer_kinds([t], what="intercept")[0]
            pairs = [(cls, kind) for cls in LAYER_TYPES[kind]]
        out += [(cls, kind) for cls, kind in pairs if issubclass(cls, base)]
    return list(dict.fromkeys(out))


# ----------------------------------------------------------------------------- interception


class _Dispatch:
    """One active interception: which modules it wraps, with what hook."""

    def __init__(self, hook: Hook, locate: Callable[[Any], tuple[str, str] | None]):
        self.hook = hook
        self.locate = locate
        # A subclass whose __call__ calls super().__call__ reaches the hook twice: once counts.
        self.inside: set[int] = set()

    def wrap(self, module, fun: Callable) -> Callable:
        found = self.locate(module)
        if found is None or id(module) in self.inside:
            return fun

        def run(*args, **kwargs):
            self.inside.add(id(module))
            try:
                return self.hook(LayerCall(found[0], found[1], module, args, kwargs), fun)
            finally:
                self.inside.discard(id(module))

        return run


# NNX: the wrapper is installed on a class while any thread intercepts it (counted under the
# lock); what it does is decided per thread, by that thread's stack of active interceptions.
_INSTALL_LOCK = threading.Lock()
_INSTALLED: dict[type, tuple[Callable, int]] = {}
_LOCAL = threading.local()


def _stack(front: str) -> list[_Dispatch]:
    """This thread's active interceptions of one front end (``"linen"`` or ``"nnx"``)."""
    stacks = _LOCAL.__dict__.setdefault("stacks", {})
    return stacks.setdefault(front, [])


def _owner(cls: type) -> type:
    """The class whose own ``__call__`` instances of ``cls`` run (the one to wrap)."""
    for c in cls.__mro__:
        if "__call__" in c.__dict__:
            return c
    raise TypeError(f"intercept: {cls.__name__} has no __call__ to intercept")


def _install(cls: type) -> None:
    with _INSTALL_LOCK:
        orig, users = _INSTALLED.get(cls, (cls.__dict__["__call__"], 0))
        if users == 0:

            @functools.wraps(orig)
            def wrapper(self, *args, _orig=orig, **kwargs):
                return _dispatch(_stack("nnx"), self, functools.partial(_orig, self), args, kwargs)

            type.__setattr__(cls, "__call__", wrapper)
        _INSTALLED[cls] = (orig, users + 1)


def _uninstall(cls: type) -> None:
    with _INSTALL_LOCK:
        orig, users = _INSTALLED[cls]
        if users == 1:
            type.__setattr__(cls, "__call__", orig)
            del _INSTALLED[cls]
        else:
            _INSTALLED[cls] = (orig, users - 1)


def _path(parts) -> str:
    return "/".join(str(p) for p in parts)


def _dispatch(stack: list[_Dispatch], module, fun: Callable, args, kwargs):
    # the newest interception ends up outermost: it sees the call first, and what it passes on
    # (a replaced input) is what earlier ones, closer to the layer, see
    for d in tuple(stack):
        fun = d.wrap(module, fun)
    return fun(*args, **kwargs)


@contextlib.contextmanager
def _intercept_linen(hook: Hook, pairs) -> Iterator[None]:
    def locate(module):
        for cls, kind in pairs:
            if isinstance(module, cls):
                return _path(module.path), kind
        return None

    stack = _stack("linen")

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__":
            return next_fun(*args, **kwargs)
        return _dispatch(stack, context.module, next_fun, args, kwargs)

    d = _Dispatch(hook, locate)
    # One Flax interceptor per thread dispatches all of ours: Flax runs its interceptors oldest
    # first, and the order here must be the NNX one.
    ctx = nn.intercept_methods(interceptor) if not stack else contextlib.nullcontext()
    with ctx:
        stack.append(d)
        try:
            yield
        finally:
            stack.remove(d)


@contextlib.contextmanager
def _intercept_nnx(model: nnx.Module, hook: Hook, pairs) -> Iterator[None]:
    where: dict[int, tuple[str, str]] = {}
    for parts, node in nnx.iter_graph(model):
        for cls, kind in pairs:
            if isinstance(node, cls) and id(node) not in where:
                where[id(node)] = (_path(parts), kind)
    # a layer built inside __call__ is not in the graph (no parameters in the state): left alone
    d = _Dispatch(hook, lambda module: where.get(id(module)))
    owners = list(dict.fromkeys(_owner(cls) for cls, _ in pairs))
    installed = []
    stack = _stack("nnx")
    try:
        for cls in owners:
            _install(cls)
            installed.append(cls)
        stack.append(d)
        yield
    finally:
        if d in stack:
            stack.remove(d)
        for cls in reversed(installed):
            _uninstall(cls)


@contextlib.contextmanager
def intercept(
    model: nn.Module | nnx.Module,
    hook: Hook,
    layer_types: Sequence[str | type] | str | type = ("Dense", "Conv"),
) -> Iterator[None]:
    """Within the context, route every call of the chosen layers through ``hook``.

    ``hook(call, proceed)`` gets a :class:`LayerCall` and ``proceed``, which runs the layer (and
    any interception entered earlier): return ``proceed(*call.args, **call.kwargs)`` to observe,
    ``proceed(*call.replace_input(x).args, ...)`` to replace the input, or read what ``proceed``
    returns. Contexts nest; the innermost one sees a call first. A layer's ``__call__`` that calls
    its parent class's ``__call__`` reaches a hook once.

    Args:
      model: a Linen module (any; Linen interception is by class and reaches every bound module
        of the thread) or the NNX module whose sub-modules are intercepted (paths relative to it).
      hook: ``hook(call: LayerCall, proceed) -> output``.
      layer_types: ``LAYER_TYPES`` names (both twins) or classes (``nn.BatchNorm``,
        ``nnx.BatchNorm``: each used by its own front end, subclasses included).

    Raises:
      TypeError: ``model`` is neither a Linen nor an NNX module.
      ValueError: an unknown layer type name.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> model = nn.Sequential([nn.Dense(4), nn.relu, nn.Dense(2)])
        >>> variables = model.init(jax.random.key(0), jnp.ones((1, 3)))
        >>> def halve(call, proceed):  # the first layer's input is halved
        ...     x = call.input / 2 if call.path == "layers_0" else call.input
        ...     return proceed(*call.replace_input(x).args, **call.kwargs)
        >>> with intercept(model, halve, ["Dense"]):
        ...     y = model.apply(variables, 2 * jnp.ones((1, 3)))
        >>> bool(jnp.allclose(y, model.apply(variables, jnp.ones((1, 3)))))
        True
    """
    if isinstance(model, nnx.Module):
        with _intercept_nnx(model, hook, _classes(layer_types, nnx.Module)):
            yield
    elif isinstance(model, nn.Module):
        with _intercept_linen(hook, _classes(layer_types, nn.Module)):
            yield
    else:
        raise TypeError(
            f"intercept: model must be a flax.linen.Module or a flax.nnx.Module, got "
            f"{type(model).__name__}"
        )


# ----------------------------------------------------------------------------- model + variables


class BoundModel:
    """A Linen or NNX model with its variables, run as a function of one variables pytree.

    ``variables`` (the attribute) is what a jitted step takes as an argument: the Linen variable
    dict, or the ``nnx.State`` of a private copy of the NNX model with the given state applied.
    :meth:`run` runs ``forward(module, batch)`` on any such pytree, optionally under
    :func:`intercept`. Neither the model nor the variables given are changed.

    Args:
      model: a ``flax.linen.Module`` or a ``flax.nnx.Module``.
      variables: Linen: the variable dict (``{"params": ..., "batch_stats": ...}``). NNX: None for
        the model's own state, or an ``nnx.State`` / pure dict (possibly partial, e.g. compressed
        params) that replaces parts of it.
      what: the caller's name, for error messages.

    Raises:
      TypeError: another model type; Linen variables that are not a dict; NNX variables of
        another type.
      ValueError: an NNX pure dict that does not fit the model's state.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import linen as nn
        >>> class Net(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(2)(nn.BatchNorm(use_running_average=True)(x))
        >>> v = Net().init(jax.random.key(0), jnp.ones((1, 3)))
        >>> bm = BoundModel(Net(), {"params": v["params"]})
        >>> bm.run(lambda m, x: m(x), jnp.ones((1, 3)))
        Traceback (most recent call last):
        ...
        obcjax.capture.CaptureError: capture: the model reads the collection 'batch_stats' ...
        >>> BoundModel(Net(), v).run(lambda m, x: m(x), jnp.ones((1, 3))).shape
        (1, 2)
    """

    def __init__(self, model: nn.Module | nnx.Module, variables: Any, *, what: str = "capture"):
        self.model = model
        self.what = what
        self.is_nnx = isinstance(model, nnx.Module)
        if self.is_nnx:
            self.graphdef, self.variables = self._nnx_state(model, variables)
        elif isinstance(model, nn.Module):
            if variables is None:
                raise TypeError(f"{what}: a Linen model needs its variables ({{'params': ...}})")
            if not isinstance(variables, Mapping):
                raise TypeError(
                    f"{what}: Linen variables must be a dict like {{'params': ...}}, got "
                    f"{type(variables).__name__}"
                )
            bad = {c: type(v).__name__ for c, v in variables.items() if not isinstance(v, Mapping)}
            if bad:
                raise TypeError(
                    f"{what}: every collection of the Linen variables must be a nested dict (as "
                    f"model.init returns, e.g. {{'params': {{'fc1': {{'kernel': ...}}}}}}), got "
                    f"{bad}"
                )
            self.variables = variables
        else:
            raise TypeError(
                f"{what}: model must be a flax.linen.Module or a flax.nnx.Module, got "
                f"{type(model).__name__}"
            )

    def _nnx_state(self, model, variables):
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
                    f"{self.what}: NNX variables given as a dict must be a (partial) pure dict of "
                    f"the model's state, e.g. nnx.state(model, nnx.Param).to_pure_dict(): {e}"
                ) from e
        elif variables is not None:
            raise TypeError(
                f"{self.what}: NNX variables must be None (use the model's own), an nnx.State or "
                f"a pure dict of it, got {type(variables).__name__}"
            )
        return graphdef, state

    def module(self, variables: Any = None):
        """The runnable module over ``variables`` (default: :attr:`variables`).

        Linen: the model bound to them, every collection they hold mutable except ``params`` and
        ``intermediates`` (updates are discarded with the bound module; a collection they do not
        hold cannot be created, so a model that needs it fails). NNX: a module merged from them.
        """
        variables = self.variables if variables is None else variables
        if self.is_nnx:
            return nnx.merge(self.graphdef, variables)
        return self.model.bind(variables, mutable=self._mutable(variables))

    @staticmethod
    def _mutable(variables) -> list[str]:
        return [c for c in variables if c not in _READ_ONLY]

    def run(
        self,
        forward: Callable[[Any, Any], Any],
        batch: Any,
        *,
        variables: Any = None,
        hook: Hook | None = None,
        layer_types: Sequence[str | type] | str | type = ("Dense", "Conv"),
    ) -> Any:
        """``forward(module, batch)`` on :meth:`module` of ``variables``, under ``hook`` if given.

        Raises:
          CaptureError: a Linen model that reads a collection, or a variable of a collection,
            that ``variables`` lacks (it would otherwise run on freshly initialised values).
        """
        variables = self.variables if variables is None else variables
        module = self.module(variables)
        ctx = contextlib.nullcontext() if hook is None else intercept(module, hook, layer_types)
        try:
            with ctx:
                out = forward(module, batch)
        except ScopeCollectionNotFound as e:
            if self.is_nnx:
                raise
            raise self._missing(variables, e) from e
        except (ScopeParamNotFoundError, ScopeVariableNotFoundError, InvalidRngError) as e:
            if self.is_nnx:
                raise
            raise self._missing_variable(variables, e) from e
        except (ApplyScopeInvalidVariablesTypeError, ApplyScopeInvalidVariablesStructureError) as e:
            if self.is_nnx:
                raise
            raise CaptureError(
                f"{self.what}: variables must be a dict of collections, each a nested dict of "
                f"arrays ({{'params': {{'layer': {{'kernel': ...}}}}}}), as model.init returns; got "
                f"collections {_kinds(variables)}"
            ) from e
        if not self.is_nnx:
            self._check_created(module, variables)
        return out

    def _missing(self, variables, e) -> CaptureError:
        m = re.search(r'access "([^"]*)" from collection "([^"]*)" in "([^"]*)"', str(e))
        col, where = (
            (m.group(2), f" (variable {m.group(1)!r} of {m.group(3)!r})") if m else ("?", "")
        )
        example = "{'params': ...}" if col == "params" else f"{{'params': ..., {col!r}: ...}}"
        return CaptureError(
            f"{self.what}: the model reads the collection {col!r}{where}, which the variables do "
            f"not have (they have {sorted(variables)}); give every collection the model was "
            f"trained with, e.g. {example}, as model.apply needs them"
        )

    def _missing_variable(self, variables, e) -> CaptureError:
        """A layer whose variable is missing from ``variables`` (Flax's ScopeParamNotFoundError,
        or an InvalidRngError when it would have to initialise one)."""
        text = str(e)
        m = re.search(r'named "([^"]*)" in scope "([^"]*)"', text) or re.search(
            r'"([^"]*)" in collection "[^"]*" in scope "([^"]*)"', text
        )
        if m:
            name, layer = m.group(1), m.group(2).strip("/") or "<root>"
            col = "params"
            m2 = re.search(r'collection "([^"]*)"', text)
            if m2:
                col = m2.group(1)
            held = variables.get(col, {})
            held = sorted(held) if isinstance(held, Mapping) else type(held).__name__
            return CaptureError(
                f"{self.what}: layer {layer!r} needs the variable {name!r} of the collection "
                f"{col!r}, which the variables do not have (variables[{col!r}] holds {held}); "
                "give the variables the model was initialised or trained with"
            )
        m = re.search(r'(\S+) needs PRNG for "([^"]*)"', text)
        layer, col = (m.group(1), m.group(2)) if m else ("a layer", "params")
        return CaptureError(
            f"{self.what}: {layer} has no {col!r} variables in the variables given and would have "
            f"to initialise them (which needs an RNG); the variables lack that layer (they hold "
            f"collections {sorted(variables)}); give the variables the model was initialised or "
            "trained with"
        )

    def _check_created(self, module, variables) -> None:
        # A mutable collection lets Flax initialise what is missing from it: catch that here.
        after = module.variables
        for col in self._mutable(variables):
            new = set(flatten_dict(after.get(col, {}), sep="/")) - set(
                flatten_dict(variables[col], sep="/")
            )
            if new:
                raise CaptureError(
                    f"{self.what}: the model reads variable(s) {sorted(new)} of the collection "
                    f"{col!r}, which the variables do not have; give the variables the model was "
                    "trained with"
                )


def _kinds(variables) -> str:
    if not isinstance(variables, Mapping):
        return type(variables).__name__
    return str({k: type(v).__name__ for k, v in variables.items()})


# ----------------------------------------------------------------------------- layer rows


def _axes(axis, ndim: int) -> tuple[int, ...]:
    # Flax sorts the contracted axes: the kernel's leading dims follow the input's axis order.
    axis = (axis,) if isinstance(axis, int) else tuple(axis)
    return tuple(sorted(a % ndim for a in axis))


def layer_rows(kind: str, module: Any, x: jax.typing.ArrayLike, path: str = "?") -> jax.Array:
    """Rows ``(tokens, G, cols)`` a layer multiplies with its flattened kernel.

    Dense: the input's last axis (``G = 1``). DenseGeneral / LinearGeneral: the contracted axes,
    flattened in the kernel's order. Conv (Linen or NNX, same attributes): the im2col patches of
    :func:`obcjax.stats.conv_patches`, columns ``(kh, kw, cin_in_group)``, ``G`` the
    ``feature_group_count``.

    Args:
      kind: ``"Dense"``, ``"Conv"`` or ``"DenseGeneral"`` (see :func:`layer_kinds`).
      module: the layer (its attributes give axes, kernel size, strides, padding).
      x: its input.
      path: the layer's path, for error messages.

    Raises:
      CaptureError: a DenseGeneral with batch dims; a conv input that does not fit the layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> conv = nnx.Conv(3, 8, (3, 3), feature_group_count=1, rngs=nnx.Rngs(0))
        >>> layer_rows("Conv", conv, jnp.ones((2, 5, 5, 3))).shape
        (50, 1, 27)
    """
    x = jnp.asarray(x)
    if kind == "Dense":
        return dense_inputs(x)[:, None, :]
    if kind == "DenseGeneral":
        batch = getattr(module, "batch_dims", None) or getattr(module, "batch_axis", None)
        if batch:
            raise CaptureError(
                f"layer {path!r}: DenseGeneral/LinearGeneral with batch dims has one weight per "
                "batch index and is not supported; exclude it with a (regex, None) rule"
            )
        axes = _axes(module.axis, x.ndim)
        x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
        return x.reshape(-1, 1, math.prod(x.shape[x.ndim - len(axes) :]))
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
        raise CaptureError(f"layer {path!r}: {e}") from e
