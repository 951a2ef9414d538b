"""One definition of a compressed model's size and compression ratio, and of a size target.

Everything that reports or plans a size -- :func:`obcjax.transforms.summarize` (and so the
``summary`` of every :class:`~obcjax.transforms.Compressed`), the CLI's tables and
``summary.json``, :mod:`obcjax.export`, :mod:`obcjax.opq`'s counts, :mod:`obcjax.fit` and the
CLI's ``--budget`` -- counts with this module:

* **dense size**: every parameter entry at :data:`DENSE_BITS` = 32 bits (the float32 model).
* **size** (payload bits) of a compressed layer = **values + indices + grids**:

  - values: every kept weight at its code width (``Int.bits``), or at 32 bits (float32) when
    the layer is not quantized;
  - indices: where the kept weights are -- 1 bit per weight for an unstructured or block mask
    (the export's bitmask), ``ceil(log2 m)`` bits per kept weight for N:M (2 bits for 2:4), none
    for a layer that is only quantized;
  - grids: each stored ``(scale, zero)`` pair at :data:`SCALE_BITS` + :data:`ZERO_BITS`
    (a float32 scale and a uint8 zero point); a layer whose rows all share one grid (OPQ's
    unified codebook, ``granularity="tensor"``) stores one, otherwise one per row and group.

  Layers left alone, biases and every other leaf count 32 bits per entry, as in the dense size.
  For float32 kernels this is exactly what :func:`obcjax.export.pack_compressed` stores,
  ``sum(export.theoretical_bits(layer))`` (the tests check it). **File bytes** (the safetensors
  header, byte padding of bit streams) are a different number, reported as such
  (``bytes_on_disk``), never as the size.
* **compression ratio** = dense size / size (``8.0`` means eight times smaller).
* **targets** are ratios, given as a number or a string: ``8``, ``8.0`` or ``"8x"``
  (:func:`as_ratio`); never a fraction.

Example:
    >>> from obcjax.specs import NM, Int
    >>> s = layer_size((64, 32), prune=NM(2, 4), bits=4, grids=32)   # Dense (in=64, out=32)
    >>> s.values, s.indices, s.grids      # 1024 kept x 4 bits, 1024 x 2-bit indices, 32 grids
    (4096, 2048, 1280)
    >>> round(ratio(32 * 64 * 32, s.total), 2)
    8.83
    >>> as_ratio("8x"), as_ratio(8)
    (8.0, 8.0)
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import numpy as np

from obcjax.specs import NM, Block, Int, Unstructured

__all__ = [
    "DENSE_BITS",
    "SCALE_BITS",
    "ZERO_BITS",
    "GRID_BITS",
    "LayerSize",
    "layer_size",
    "stored_layer_size",
    "grids_for",
    "grids_of",
    "kept_for",
    "dense_bits",
    "model_size",
    "ratio",
    "as_ratio",
]

DENSE_BITS = 32  # bits of every entry of the dense (float32) model, and of unquantized values
SCALE_BITS = 32  # a stored grid's scale (float32)
ZERO_BITS = 8  # a stored grid's zero point (uint8)
GRID_BITS = SCALE_BITS + ZERO_BITS


class LayerSize(NamedTuple):
    """The size of one layer, in bits, by part.

    Attributes:
      params: weights in the layer (its dense size is ``DENSE_BITS * params``).
      kept: weights stored (not pruned).
      values: bits of the kept values. indices: bits saying where they are. grids: bits of the
        stored ``(scale, zero)`` grids.
    """

    params: int
    kept: int
    values: int
    indices: int
    grids: int

    @property
    def total(self) -> int:
        """The layer's size: ``values + indices + grids``."""
        return self.values + self.indices + self.grids

    @property
    def dense(self) -> int:
        """The layer's dense size: ``DENSE_BITS`` per weight."""
        return DENSE_BITS * self.params


def _index_bits(m: int) -> int:
    return max(1, (int(m) - 1).bit_length())


def kept_for(prune, n: int) -> int:
    """Weights a pruning spec keeps of ``n`` when no mask is at hand: N:M keeps ``(m - n) / m``
    of them exactly; an unstructured or block sparsity ``s`` keeps ``n - round(s·n)``."""
    if prune is None:
        return n
    if isinstance(prune, NM):
        return n // prune.m * (prune.m - prune.n)
    return n - int(math.floor(prune.sparsity * n + 0.5))


def grids_for(quant: Int | None, shape) -> int:
    """Grids a quantized kernel of ``shape`` stores for ``quant``, with every axis but the last
    an input (Dense, Conv): one for ``"tensor"``, one per output for ``"channel"``, one per
    output and group of inputs for ``"group"``."""
    if quant is None:
        return 0
    if quant.granularity == "tensor":
        return 1
    out = int(shape[-1])
    if quant.granularity == "channel":
        return out
    return out * (math.prod(int(d) for d in shape[:-1]) // quant.group_size)


def grids_of(qarray) -> int:
    """Grids a stored :class:`~obcjax.quant.QArray` holds: one when every ``(scale, zero)`` pair
    is the same (a unified codebook), else one per stored pair."""
    if qarray is None:
        return 0
    s = np.ascontiguousarray(np.asarray(qarray.scale))
    z = np.ascontiguousarray(np.asarray(qarray.zero))
    sv, zv = s.view(f"u{s.itemsize}").ravel(), z.view(f"u{z.itemsize}").ravel()
    return 1 if bool(np.all(sv == sv[0]) and np.all(zv == zv[0])) else int(s.size)


def layer_size(shape, *, prune=None, bits: int | None = None, kept: int | None = None,
               grids: int = 0) -> LayerSize:
    """The size of a layer with kernel ``shape`` (see the module docstring).

    Args:
      shape: the kernel's shape.
      prune: its pruning spec (``Unstructured``, ``Block``, ``NM`` or None).
      bits: its code width, or None when not quantized (values at 32 bits).
      kept: kept weights (the True entries of its mask); default :func:`kept_for`.
      grids: stored grids (:func:`grids_of` of its QArray, or :func:`grids_for` of its spec).

    Raises:
      TypeError: a pruning spec of another kind.
    """
    n = math.prod(int(d) for d in shape)
    if prune is not None and not isinstance(prune, (Unstructured, NM, Block)):
        raise TypeError(f"layer_size: prune must be Unstructured, Block, NM or None, got {prune!r}")
    kept = kept_for(prune, n) if kept is None else int(kept)
    values = kept * (DENSE_BITS if bits is None else int(bits))
    if prune is None:
        indices = 0
    elif isinstance(prune, NM):
        indices = kept * _index_bits(prune.m)
    else:
        indices = n  # a bitmask
    return LayerSize(n, kept, values, indices, (GRID_BITS * int(grids)) if bits else 0)


def stored_layer_size(kernel, prune=None, mask=None, qarray=None) -> LayerSize:
    """The size of a layer read from what is stored: kept weights from its mask (all of them
    without one), code width and grids from its QArray (32-bit values without one).

    Args:
      kernel: the layer's kernel (only its shape is used).
      prune: its pruning spec (says whether indices are a bitmask or N:M); with a mask but no
        spec the mask is a bitmask.
      mask: its mask (True = kept), or None. qarray: its QArray, or None.
    """
    shape = np.shape(kernel)
    if mask is not None and prune is None:
        prune = Unstructured(0.0)
    kept = None if mask is None else int(np.count_nonzero(np.asarray(mask)))
    bits = None if qarray is None else int(qarray.bits)
    return layer_size(shape, prune=prune, bits=bits, kept=kept, grids=grids_of(qarray))


def dense_bits(params) -> int:
    """The dense size of ``params``: :data:`DENSE_BITS` per entry of every leaf."""
    import jax

    return DENSE_BITS * sum(int(np.size(x)) for x in jax.tree.leaves(params))


def model_size(params, layers: Mapping[str, LayerSize]) -> dict[str, Any]:
    """Totals of a model whose layers ``layers`` are compressed (every other entry of ``params``
    at 32 bits).

    Returns:
      ``{"dense_bits", "size_bits", "ratio"}``.
    """
    dense = dense_bits(params)
    size = dense - sum(s.dense for s in layers.values()) + sum(s.total for s in layers.values())
    return {"dense_bits": dense, "size_bits": size, "ratio": ratio(dense, size)}


def ratio(dense: float, size: float) -> float:
    """The compression ratio ``dense / size`` (``inf`` for an empty size)."""
    return float(dense) / float(size) if size > 0 else math.inf


def as_ratio(target, what: str = "ratio") -> float:
    """A compression-ratio target: ``8``, ``8.0`` or ``"8x"`` all mean eight times smaller.

    Args:
      target: a number ``>= 1`` or a string ``"<number>x"``.
      what: the argument's name, for errors.

    Raises:
      ValueError: naming ``what``: not a number, below 1 (a fraction such as ``1/8`` is not a
        ratio: give ``8``), or not finite.

    Example:
      >>> as_ratio("16x"), as_ratio(2.5)
      (16.0, 2.5)
    """
    value = target
    if isinstance(target, str):
        text = target.strip().lower()
        text = text[:-1] if text.endswith("x") else text
        try:
            value = float(text)
        except ValueError:
            raise ValueError(
                f"{what} must be a compression ratio such as 8 or '8x', got {target!r}"
            ) from None
    elif isinstance(target, bool) or not isinstance(target, numbers.Real):
        raise ValueError(f"{what} must be a compression ratio such as 8 or '8x', got {target!r}")
    value = float(value)
    if not math.isfinite(value) or value < 1.0:
        hint = f" (a fraction is not a ratio: for 1/{1 / value:g} give {1 / value:g})" if (
            math.isfinite(value) and 0 < value < 1) else ""
        raise ValueError(f"{what} must be a compression ratio >= 1, got {target!r}{hint}")
    return value
