"""The one place that maps a layer's kernel to the weight matrices the solvers see, and back.

Every solver works on ``W: (rows, cols)`` matrices, one row per output unit and one column per
input feature the layer contracts over, with ``H: (cols, cols)`` from the layer's inputs. A Flax
kernel holds the contracted (input) axes first and the output axes last:

* ``nn.Dense`` / ``nnx.Linear``: ``(in, out)``.
* ``nn.Conv`` / ``nnx.Conv`` (HWIO): ``(*window, in / groups, out)``; a grouped or depthwise conv
  is ``groups`` independent problems, each with its own ``H`` and ``out / groups`` rows.
* ``nn.DenseGeneral`` / ``nnx.LinearGeneral`` with any input and output axes, such as the
  attention projections of ``nn.MultiHeadDotProductAttention`` / ``nnx.MultiHeadAttention``:
  query/key/value ``(in, heads, head_dim)`` (one contracted axis) and the output projection
  ``(heads, head_dim, out)`` (two contracted axes).

The number of contracted axes is not in the kernel: it comes from the width ``cols`` of the
statistics captured at the layer's input (see :func:`layout_for`). The matrix is then

    ``W = kernel.reshape(cols, groups, rows).transpose(1, 2, 0)``  ``(groups, rows, cols)``,

with ``rows = prod(output axes) / groups``; :func:`to_matrices` and :func:`from_matrices` are
exact inverses (a reshape and a transpose, no arithmetic). N:M patterns and quantization groups
run along ``cols``, i.e. along the flattened input axes, the innermost (last contracted) axis
fastest: along input channels at a fixed spatial tap for a conv, along ``head_dim`` within a head
for an attention output projection.

The per-output grids of a quantized kernel (``QArray.scale`` / ``zero`` in kernel layout,
``(ngroups, *output axes)``) map to the solvers' ``(groups, rows, ngroups)`` by the same rule,
with :meth:`Layout.grid` as their layout.

:func:`kernel_to_matrices` and :func:`matrices_to_kernel` are the list-of-matrices form for a
kernel whose last axis is its only output axis (Dense, Conv), where no statistics are needed to
tell inputs from outputs.

Parameter trees are nested dicts addressed by ``'/'``-joined paths; :func:`get_path` and
:func:`set_path` read and update them functionally.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

__all__ = [
    "Layout",
    "layout_for",
    "to_matrices",
    "from_matrices",
    "kernel_to_matrices",
    "matrices_to_kernel",
    "get_path",
    "set_path",
    "path_of",
    "flatten_paths",
    "unflatten_paths",
    "replace_leaves",
]


class Layout(NamedTuple):
    """How a kernel of ``shape`` is read as ``groups`` matrices ``(rows, cols)``.

    Attributes:
      shape: the kernel's shape.
      n_in: how many leading axes are contracted (``1`` for Dense, ``ndim - 1`` for a conv).
      groups: independent problems along the output axes (a grouped conv's groups).
    """

    shape: tuple[int, ...]
    n_in: int
    groups: int = 1

    @property
    def cols(self) -> int:
        return math.prod(self.shape[: self.n_in])

    @property
    def rows(self) -> int:
        """Rows of each group's matrix."""
        return math.prod(self.shape[self.n_in :]) // self.groups

    def grid(self, ngroups: int) -> Layout:
        """The layout of a per-output array with ``ngroups`` entries along the inputs.

        A quantized kernel's ``scale`` and ``zero`` have shape ``(ngroups, *output axes)`` in
        kernel layout (``ngroups = cols / group_size``); read with this layout they are the
        solvers' ``(groups, rows, ngroups)`` grids.

        Example:
          >>> Layout((3, 3, 4, 8), 3, groups=2).grid(1)
          Layout(shape=(1, 8), n_in=1, groups=2)
        """
        return Layout((int(ngroups), *self.shape[self.n_in :]), 1, self.groups)


def layout_for(shape, cols: int, groups: int = 1, *, layer: str = "<kernel>") -> Layout:
    """The :class:`Layout` of a kernel whose input statistics are ``cols`` wide.

    The contracted axes are the leading axes whose sizes multiply to ``cols``; axes of size 1
    between inputs and outputs count as inputs (as a depthwise conv's ``in / groups = 1``; the
    matrices are the same either way).

    Args:
      shape: the kernel's shape (at least 2 axes).
      cols: width of the layer's input statistics (``H`` is ``(groups, cols, cols)``).
      groups: independent problems (a grouped conv's ``feature_group_count``).
      layer: the parameter path, for error messages.

    Returns:
      A :class:`Layout`.

    Raises:
      ValueError: naming ``layer`` when no leading axes multiply to ``cols`` (the statistics
        belong to another layer or model), or the output axes do not split into ``groups``.

    Example:
      >>> layout_for((32, 4, 8), 32)          # attention query (in, heads, head_dim)
      Layout(shape=(32, 4, 8), n_in=1, groups=1)
      >>> layout_for((4, 8, 32), 32).n_in     # attention output (heads, head_dim, out)
      2
      >>> layout_for((3, 3, 1, 16), 9, groups=16).rows   # depthwise 3x3 conv
      1
    """
    shape = tuple(int(d) for d in shape)
    if len(shape) < 2:
        raise ValueError(
            f"layer {layer!r}: a kernel needs input and output axes, got shape {shape}"
        )
    fits = [k for k in range(1, len(shape)) if math.prod(shape[:k]) == cols]
    n_in = fits[-1] if fits else None  # size-1 axes after the inputs count as inputs (HWIO)
    if n_in is None:
        raise ValueError(
            f"layer {layer!r}: kernel of shape {shape} does not match its statistics ({groups} "
            f"group(s) of width {cols}): no leading axes of the kernel multiply to {cols}; the "
            "statistics come from another layer or model"
        )
    out = math.prod(shape[n_in:])
    if groups < 1 or out % groups:
        raise ValueError(
            f"layer {layer!r}: kernel of shape {shape} has {out} outputs, which do not split "
            f"into {groups} groups"
        )
    return Layout(shape, n_in, int(groups))


def to_matrices(kernel, layout: Layout):
    """``(groups, rows, cols)`` weight matrices of ``kernel`` (jax or NumPy, same module out).

    Example:
      >>> import numpy as np
      >>> k = np.arange(24.0).reshape(2, 3, 4)            # DenseGeneral (in=2, 3, 4)
      >>> W = to_matrices(k, layout_for(k.shape, 2))
      >>> W.shape, bool((W[0] == k.reshape(2, 12).T).all())
      ((1, 12, 2), True)
    """
    if tuple(kernel.shape) != layout.shape:
        raise ValueError(f"kernel of shape {tuple(kernel.shape)} does not match {layout}")
    xp = np if isinstance(kernel, np.ndarray) else jnp
    return xp.transpose(xp.reshape(kernel, (layout.cols, layout.groups, layout.rows)), (1, 2, 0))


def from_matrices(mats, layout: Layout, dtype=None):
    """The kernel of ``mats (groups, rows, cols)``: the inverse of :func:`to_matrices`.

    NumPy in gives NumPy out (no compilation for concrete host arrays); jax arrays or tracers
    give a jax array.
    """
    xp = np if isinstance(mats, np.ndarray) else jnp
    want = (layout.groups, layout.rows, layout.cols)
    if tuple(mats.shape) != want:
        raise ValueError(f"matrices of shape {tuple(mats.shape)} do not match {layout} ({want})")
    k = xp.reshape(xp.transpose(mats, (2, 0, 1)), layout.shape)
    return k.astype(dtype) if dtype is not None else k


def kernel_to_matrices(kernel, groups: int = 1) -> list:
    """Matrices ``(out/groups, cols)`` of a Dense ``(in, out)`` or Conv ``(..., in/G, out)``
    kernel (every axis but the last is an input): :func:`to_matrices` as a list.

    Args:
      kernel: the kernel (jax or NumPy; a jax array comes back).
      groups: a grouped conv's ``feature_group_count``.

    Raises:
      ValueError: the output channels are not divisible into ``groups``.

    Example:
      >>> import numpy as np
      >>> d = np.arange(12.0).reshape(3, 4)                # Dense (in=3, out=4)
      >>> bool((kernel_to_matrices(d)[0] == d.T).all())
      True
    """
    kernel = jnp.asarray(kernel)
    if kernel.ndim < 2:
        raise ValueError(f"a kernel needs input and output axes, got shape {tuple(kernel.shape)}")
    out = kernel.shape[-1]
    if groups < 1 or out % groups:
        raise ValueError(f"{out} output channels are not divisible into {groups} groups")
    return list(to_matrices(kernel, Layout(tuple(kernel.shape), kernel.ndim - 1, int(groups))))


def matrices_to_kernel(mats, shape, dtype=None):
    """The kernel of ``shape`` whose matrices are ``mats`` (the inverse of
    :func:`kernel_to_matrices`); a jax array.

    Concrete arrays are stacked on the host (XLA compiles a ``G``-operand concatenation for
    minutes on depthwise layers with ~1000 channels; a host stack compiles nothing).

    Example:
      >>> import numpy as np
      >>> k = np.arange(24.0).reshape(2, 3, 4)
      >>> bool((np.asarray(matrices_to_kernel(kernel_to_matrices(k, 2), k.shape)) == k).all())
      True
    """
    import jax

    concrete = not any(isinstance(m, jax.core.Tracer) for m in mats)
    xp = np if concrete else jnp
    S = xp.stack([xp.asarray(m) for m in mats])  # (G, og, cols)
    shape = tuple(int(d) for d in shape)
    full = (*shape[:-1], S.shape[0] * S.shape[1])
    k = from_matrices(S, Layout(full, len(full) - 1, S.shape[0]))
    k = jnp.asarray(k)
    return k.astype(dtype) if dtype is not None else k


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p] if path else []


def _child_key(node, part: str):
    """The key of ``node`` that the path part ``part`` names: the string itself, or the integer
    it spells where the container has integer keys (an ``nnx.List``'s pure dict, a tuple)."""
    if not part.isdigit() or (isinstance(node, Mapping) and part in node):
        return part
    if isinstance(node, Mapping):
        return int(part) if int(part) in node else part
    return int(part) if isinstance(node, list | tuple) else part


def get_path(tree: Mapping, path: str, key: str | None = None) -> Any:
    """``tree[p0][p1]...[key]`` for ``path = "p0/p1/..."``.

    Raises:
      KeyError: naming the path and the missing part.

    Example:
      >>> get_path({"a": {"b": {"kernel": 1}}}, "a/b", "kernel")
      1
    """
    node = tree
    parts = _parts(path) + ([key] if key is not None else [])
    for i, p in enumerate(parts):
        if not isinstance(node, Mapping) and not hasattr(node, "__getitem__"):
            raise KeyError(f"{'/'.join(parts[:i]) or '<root>'!r} is a leaf, not a module")
        try:
            node = node[_child_key(node, p)]
        except (KeyError, TypeError, IndexError):
            raise KeyError(
                f"no {p!r} under {'/'.join(parts[:i]) or '<root>'!r} (looking for "
                f"{'/'.join(parts)!r})"
            ) from None
    return node


def set_path(tree: Mapping, path: str, key: str, value) -> dict:
    """Functional update of ``tree[path...][key]`` on nested dicts (copies along the path).

    Example:
      >>> set_path({"a": {"b": {"kernel": 1}}}, "a/b", "kernel", 2)
      {'a': {'b': {'kernel': 2}}}
    """
    parts = _parts(path)

    def rec(node, i):
        node = dict(node)
        if i == len(parts):
            node[key] = value
        else:
            k = _child_key(node, parts[i])
            node[k] = rec(node[k], i + 1)
        return node

    return rec(tree, 0)


def path_of(keypath) -> str:
    """The ``'/'``-joined path of a JAX key path (dict keys, sequence indices, attribute names).

    Works on any container JAX flattens: nested dicts, ``FrozenDict``, ``nnx.State`` (whose
    array leaves sit at the same paths as the nested dict's).

    Example:
      >>> import jax
      >>> [path_of(kp) for kp, _ in jax.tree_util.tree_flatten_with_path({"a": {"b": 1}})[0]]
      ['a/b']
    """
    parts = []
    for k in keypath:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def flatten_paths(tree, is_leaf=None) -> dict[str, Any]:
    """``{leaf path: leaf}`` of any pytree (``None`` subtrees, i.e. absent entries, are skipped);
    ``is_leaf`` as in ``jax.tree_util`` (e.g. to keep a ``QArray`` whole).

    Example:
      >>> flatten_paths({"fc": {"kernel": 1, "bias": None}})
      {'fc/kernel': 1}
    """
    import jax

    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return {path_of(kp): x for kp, x in flat}


def unflatten_paths(flat: Mapping[str, Any]) -> dict:
    """Nested dicts from ``{'/'-joined path: leaf}`` (the inverse of :func:`flatten_paths`).

    Example:
      >>> unflatten_paths({"fc/kernel": 1})
      {'fc': {'kernel': 1}}
    """
    out: dict = {}
    for path, leaf in flat.items():
        parts = _parts(path)
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = leaf
    return out


def replace_leaves(tree, new: Mapping[str, Any]):
    """``tree`` (any container: nested dicts, ``FrozenDict``, ``nnx.State``) with the leaves at
    the ``'/'``-joined paths of ``new`` replaced; the container type is kept.

    Raises:
      KeyError: a path of ``new`` that is not a leaf of ``tree``.

    Example:
      >>> replace_leaves({"fc": {"kernel": 1, "bias": 2}}, {"fc/kernel": 3})
      {'fc': {'bias': 2, 'kernel': 3}}
    """
    import jax

    seen = set()

    def one(kp, x):
        p = path_of(kp)
        if p in new:
            seen.add(p)
            return new[p]
        return x

    out = jax.tree_util.tree_map_with_path(one, tree)
    missing = set(new) - seen
    if missing:
        raise KeyError(f"replace_leaves: no leaf at {sorted(missing)}")
    return out
