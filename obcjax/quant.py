"""Uniform integer quantization grids and the quantized-array type ``QArray``.

Conventions (shared by every solver and by the NumPy references in the tests):

* The range always contains 0: ``xmin = min(0, min w)``, ``xmax = max(0, max w)`` over a channel
  (row), a group of consecutive columns of a row, or the whole tensor. A zero range becomes
  ``[-1, 1]``.
* Asymmetric: ``scale = (xmax - xmin) / maxq``, integer ``zero = round(-xmin / scale)``.
* Symmetric: ``xmax = max(|xmin|, xmax)``, ``xmin = -xmax``, ``scale = 2 xmax / maxq``,
  ``zero = 2**(bits-1)`` (the OBC reference's grid; its integer range is one step longer on the
  negative side).
* ``quantize(w) = scale * (clip(round(w / scale) + zero, 0, maxq) - zero)``; 0 is always exactly
  on the grid, so pruned weights stay zero.
* ``search="lp"``: for ``i`` in ``range(int(maxshrink * grid))`` the range is shrunk by
  ``1 - i / grid`` (the zero point recomputed when asymmetric) and the candidate with the smallest
  ``sum |q(w) - w|**p`` (p = 2.4) is kept per channel/group; the first minimum wins ties.

References:
  Frantar, Singh, Alistarh. Optimal Brain Compression. NeurIPS 2022 (``quant.py`` of
  IST-DASLab/OBC describes the same grid and search).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.layout import Layout, from_matrices, to_matrices
from obcjax.specs import Int

__all__ = [
    "QArray",
    "find_params",
    "quantize",
    "quantize_codes",
    "dequantize",
    "expand_params",
    "make_qarray",
    "kernel_qarray",
    "group_size_of",
]


class QArray(NamedTuple):
    """Integer codes with per-channel / per-group / per-tensor scale and zero point.

    A QArray is in one of two layouts, told apart by ``layout``:

    * **matrix** (``layout is None``; what the solvers return, one problem ``(rows, cols)``):
      ``codes (rows, cols)``, ``scale`` and ``zero (rows, ngroups)``, groups of ``group_size``
      consecutive columns.
    * **kernel** (``layout`` is the :class:`obcjax.layout.Layout` of a Flax kernel; what
      :class:`obcjax.transforms.Compressed` holds, one QArray per layer, a grouped conv's groups
      included): ``codes`` has the kernel's shape, ``scale`` and ``zero`` have shape
      ``(ngroups, *output axes)``, the groups running along the flattened input axes (the
      solvers' columns, see :mod:`obcjax.layout`). With one grid per output (``ngroups = 1``,
      granularity ``"channel"`` or ``"tensor"``) they broadcast against the kernel, so
      ``scale * (codes - zero)`` is the kernel.

    :meth:`dequantize` gives the float weights in the QArray's own layout; :func:`kernel_qarray`
    and :meth:`as_matrix` convert between the two.

    Attributes:
      codes: uint8 integer codes in ``[0, 2**bits)``.
      scale: float scale.
      zero: float zero point (an integer value).
      bits: number of bits (static).
      group_size: columns per group, or ``cols`` when there is one group per row (static).
      layout: the kernel's :class:`~obcjax.layout.Layout`, or None for a matrix (static).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int
    group_size: int
    layout: Layout | None = None

    def dequantize(self) -> jax.Array:
        """Float weights, ``(rows, cols)`` for a matrix QArray, the kernel for a kernel one."""
        return dequantize(self)

    @property
    def ngroups(self) -> int:
        """Grids per output row (``cols / group_size``)."""
        return int(np.shape(self.scale)[-1] if self.layout is None else np.shape(self.scale)[0])

    def as_matrix(self, group: int | None = None) -> QArray:
        """The matrix-layout QArray of one conv group, or of every group stacked along the rows.

        ``group=None`` gives ``(out, cols)`` codes with every output unit a row (the groups one
        after another): the matrix ``kernel.reshape(cols, out).T`` that :mod:`obcjax.export`
        packs. A matrix QArray is returned as it is (``group`` None or 0).

        Example:
          >>> from obcjax.layout import Layout
          >>> m = QArray(np.arange(6, dtype=np.uint8).reshape(2, 3), np.ones((2, 1)),
          ...            np.zeros((2, 1)), 4, 3)
          >>> k = kernel_qarray(m, Layout((3, 2), 1))        # Dense (in=3, out=2)
          >>> k.codes.shape, k.scale.shape, bool((k.as_matrix().codes == m.codes).all())
          ((3, 2), (1, 2), True)
        """
        if self.layout is None:
            if group not in (None, 0):
                raise ValueError(f"QArray.as_matrix: a matrix QArray has one group, got {group}")
            return self
        lay = self.layout
        grid = lay.grid(self.ngroups)
        c, s, z = (to_matrices(x, lay_) for x, lay_ in
                   ((self.codes, lay), (self.scale, grid), (self.zero, grid)))
        if group is None:
            c, s, z = (x.reshape(-1, x.shape[-1]) for x in (c, s, z))
        else:
            if not 0 <= group < lay.groups:
                raise ValueError(f"QArray.as_matrix: group {group} of {lay.groups}")
            c, s, z = c[group], s[group], z[group]
        return QArray(c, s, z, self.bits, self.group_size)


def _tree_flatten(q: QArray):
    return (q.codes, q.scale, q.zero), (q.bits, q.group_size, q.layout)


jax.tree_util.register_pytree_node(QArray, _tree_flatten, lambda aux, ch: QArray(*ch, *aux))


def _grid_from_range(xmin, xmax, bits: int, sym: bool):
    maxq = 2**bits - 1
    if sym:
        xmax = jnp.maximum(jnp.abs(xmin), xmax)
        xmin = -xmax
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = jnp.where(both_zero, -1.0, xmin)
    xmax = jnp.where(both_zero, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    if sym:
        zero = jnp.full_like(scale, 2 ** (bits - 1))
    else:
        zero = jnp.round(-xmin / scale)
    return scale, zero


def quantize(w, scale, zero, bits: int):
    """Round ``w`` to the grid (``scale``, ``zero``) of ``bits`` bits; returns float values."""
    maxq = 2**bits - 1
    q = jnp.clip(jnp.round(w / scale) + zero, 0, maxq)
    return scale * (q - zero)


def quantize_codes(w, scale, zero, bits: int):
    """Integer codes (uint8) of ``w`` on the grid."""
    maxq = 2**bits - 1
    return jnp.clip(jnp.round(w / scale) + zero, 0, maxq).astype(jnp.uint8)


def _group_view(W, spec: Int):
    """Reshape ``W: (rows, cols)`` into ``(rows, ngroups, gsize)`` for the spec's granularity."""
    rows, cols = W.shape
    if spec.granularity == "group":
        g = spec.group_size
        return W.reshape(rows, cols // g, g)
    if spec.granularity == "tensor":
        return W.reshape(1, 1, rows * cols)
    return W.reshape(rows, 1, cols)


@functools.partial(jax.jit, static_argnames=("spec",))
def _find_params(W, spec: Int):
    X = _group_view(W, spec)
    xmin = jnp.minimum(X.min(axis=-1), 0.0)
    xmax = jnp.maximum(X.max(axis=-1), 0.0)
    scale, zero = _grid_from_range(xmin, xmax, spec.bits, spec.sym)
    if spec.search == "lp":
        nsteps = int(spec.maxshrink * spec.grid)

        def body(i, carry):
            best_err, best_scale, best_zero = carry
            p = 1.0 - i / spec.grid
            s1, z1 = _grid_from_range(p * xmin, p * xmax, spec.bits, spec.sym)
            if spec.sym:
                z1 = zero
            q = quantize(X, s1[..., None], z1[..., None], spec.bits)
            err = jnp.sum(jnp.abs(q - X) ** spec.p, axis=-1)
            better = err < best_err
            return (
                jnp.where(better, err, best_err),
                jnp.where(better, s1, best_scale),
                jnp.where(better, z1, best_zero),
            )

        init = (jnp.full(scale.shape, jnp.inf, W.dtype), scale, zero)
        _, scale, zero = jax.lax.fori_loop(0, nsteps, body, init)
    return scale, zero


def find_params(W: jax.typing.ArrayLike, spec: Int):
    """Grid parameters of ``W: (rows, cols)`` for ``spec``.

    Returns:
      ``(scale, zero)``, each ``(rows, ngroups)``; per-tensor parameters are broadcast to every
      row so that all granularities share one layout.

    Example:
      >>> W = jnp.array([[-1.0, 0.0, 0.5, 2.0]])
      >>> scale, zero = find_params(W, Int(bits=4))   # symmetric, per output row
      >>> scale.shape, zero.shape
      ((1, 1), (1, 1))
    """
    W = jnp.asarray(W)
    if W.ndim != 2:
        raise ValueError(f"find_params expects a (rows, cols) matrix, got shape {W.shape}")
    if spec.granularity == "group" and W.shape[1] % spec.group_size:
        raise ValueError(
            f"group size {spec.group_size} does not divide the input width {W.shape[1]}"
        )
    scale, zero = _find_params(W, spec)
    if spec.granularity == "tensor":
        scale = jnp.broadcast_to(scale.reshape(1, 1), (W.shape[0], 1))
        zero = jnp.broadcast_to(zero.reshape(1, 1), (W.shape[0], 1))
    return scale, zero


def expand_params(scale, zero, cols: int):
    """Per-column ``(rows, cols)`` scale and zero from ``(rows, ngroups)`` parameters."""
    g = cols // scale.shape[1]
    return jnp.repeat(scale, g, axis=1), jnp.repeat(zero, g, axis=1)


def group_size_of(spec: Int, cols: int) -> int:
    return spec.group_size if spec.granularity == "group" else cols


def dequantize(q: QArray) -> jax.Array:
    """Float weights of a ``QArray``: ``(rows, cols)`` for a matrix one, the kernel (its shape)
    for a kernel-layout one."""
    if q.layout is None:
        cols = q.codes.shape[1]
        s, z = expand_params(q.scale, q.zero, cols)
        return s * (q.codes.astype(s.dtype) - z)
    m = q.as_matrix()
    W = dequantize(m).reshape(q.layout.groups, q.layout.rows, q.layout.cols)
    return from_matrices(W, q.layout)


def kernel_qarray(qarrays, layout: Layout) -> QArray:
    """The kernel-layout QArray of a layer from the solvers' matrix QArrays.

    Args:
      qarrays: one matrix QArray per group of ``layout`` (a sequence), a single one when the
        layout has one group, or one whose fields are stacked ``(groups, rows, ...)``.
      layout: the kernel's :class:`obcjax.layout.Layout` (:func:`obcjax.layout.layout_for`).

    Returns:
      A QArray whose ``codes`` have the kernel's shape and ``scale`` / ``zero`` the shape
      ``(ngroups, *output axes)``.

    Raises:
      ValueError: the groups disagree on ``bits`` or ``group_size``, or the shapes do not fit
        the layout.

    Example:
      >>> from obcjax.layout import layout_for
      >>> W = np.random.default_rng(0).normal(size=(8, 6)).astype(np.float32)  # 2 groups x 4 rows
      >>> qs = [make_qarray(w, *find_params(w, Int(4)), Int(4)) for w in (W[:4], W[4:])]
      >>> q = kernel_qarray(qs, layout_for((3, 2, 8), 6, groups=2))   # a grouped conv kernel
      >>> q.codes.shape, q.scale.shape
      ((3, 2, 8), (1, 8))
    """
    if isinstance(qarrays, QArray) and qarrays.layout is not None:
        if qarrays.layout != layout:
            raise ValueError(f"kernel_qarray: QArray of {qarrays.layout}, expected {layout}")
        return qarrays
    if isinstance(qarrays, QArray):
        stacked = np.ndim(qarrays.codes) == 3
        qs = None if stacked else [qarrays]
    else:
        qs = list(qarrays)
        stacked = False
        if not qs or any(not isinstance(q, QArray) or q.layout is not None for q in qs):
            raise ValueError("kernel_qarray: expected matrix-layout QArrays, one per group")
        bits, gs = {int(q.bits) for q in qs}, {int(q.group_size) for q in qs}
        if len(bits) > 1 or len(gs) > 1:
            raise ValueError(
                f"kernel_qarray: the groups of a layer store different bits {sorted(bits)} or "
                f"group sizes {sorted(gs)}"
            )
    if stacked:
        c, s, z, bits, gs = qarrays.codes, qarrays.scale, qarrays.zero, qarrays.bits, \
            qarrays.group_size
    else:
        xp = jnp if any(isinstance(q.codes, jax.Array) for q in qs) else np
        c, s, z = (xp.stack([xp.asarray(getattr(q, f)) for q in qs])
                   for f in ("codes", "scale", "zero"))
        bits, gs = qs[0].bits, qs[0].group_size
    want = (layout.groups, layout.rows, layout.cols)
    if tuple(c.shape) != want or tuple(s.shape) != tuple(z.shape) or s.shape[:2] != want[:2]:
        raise ValueError(
            f"kernel_qarray: codes {tuple(c.shape)} and grids {tuple(s.shape)} do not fit "
            f"{layout} (codes {want})"
        )
    grid = layout.grid(s.shape[-1])
    return QArray(from_matrices(c, layout), from_matrices(s, grid), from_matrices(z, grid),
                  int(bits), int(gs), layout)


def make_qarray(W_on_grid, scale, zero, spec: Int) -> QArray:
    """Build a matrix ``QArray`` from weights ``(rows, cols)`` on the grid (others are rounded)."""
    cols = W_on_grid.shape[1]
    s, z = expand_params(scale, zero, cols)
    codes = quantize_codes(W_on_grid, s, z, spec.bits)
    return QArray(codes, scale, zero, spec.bits, group_size_of(spec, cols))


def as_numpy(q: QArray) -> dict[str, np.ndarray]:
    return {"codes": np.asarray(q.codes), "scale": np.asarray(q.scale), "zero": np.asarray(q.zero)}
