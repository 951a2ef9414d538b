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

from obcjax.specs import Int

__all__ = [
    "QArray",
    "find_params",
    "quantize",
    "quantize_codes",
    "dequantize",
    "expand_params",
    "make_qarray",
    "group_size_of",
]


class QArray(NamedTuple):
    """Integer codes with per-channel / per-group / per-tensor scale and zero point.

    Attributes:
      codes: ``(rows, cols)`` uint8 integer codes in ``[0, 2**bits)``.
      scale: ``(rows, ngroups)`` float scale (``ngroups`` = 1 for per-channel or per-tensor).
      zero: ``(rows, ngroups)`` float zero point (an integer value).
      bits: number of bits (static).
      group_size: columns per group, or ``cols`` when there is one group per row (static).
    """

    codes: jax.Array
    scale: jax.Array
    zero: jax.Array
    bits: int
    group_size: int

    def dequantize(self) -> jax.Array:
        return dequantize(self)


def _tree_flatten(q: QArray):
    return (q.codes, q.scale, q.zero), (q.bits, q.group_size)


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
    """Float ``(rows, cols)`` weights of a ``QArray``."""
    cols = q.codes.shape[1]
    s, z = expand_params(q.scale, q.zero, cols)
    return s * (q.codes.astype(s.dtype) - z)


def make_qarray(W_on_grid, scale, zero, spec: Int) -> QArray:
    """Build a ``QArray`` from weights that already lie on the grid."""
    cols = W_on_grid.shape[1]
    s, z = expand_params(scale, zero, cols)
    codes = quantize_codes(W_on_grid, s, z, spec.bits)
    return QArray(codes, scale, zero, spec.bits, group_size_of(spec, cols))


def as_numpy(q: QArray) -> dict[str, np.ndarray]:
    return {"codes": np.asarray(q.codes), "scale": np.asarray(q.scale), "zero": np.asarray(q.zero)}
