"""Frozen, hashable compression specs.

Every spec is a frozen dataclass, so it can be a static argument of ``jax.jit`` and a
dictionary key. Specs validate themselves on construction; the error names the field and the
accepted range. Whether a spec fits a given layer (for example ``NM(2, 4)`` on a width that is
not a multiple of 4) is checked by :func:`check_fits`, which also names the layer.

Example:
    >>> from obcjax.specs import NM, Int, Unstructured
    >>> NM(2, 4)                 # 2 zeros in every 4 consecutive input columns
    NM(n=2, m=4)
    >>> Int(bits=4, sym=True)    # per-channel symmetric 4-bit, error-searched range
    Int(bits=4, sym=True, search='lp', granularity='channel', group_size=None, p=2.4, maxshrink=0.8, grid=100)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

__all__ = ["Unstructured", "NM", "Block", "Int", "PruneSpec", "check_fits", "spec_name"]


@dataclasses.dataclass(frozen=True)
class Unstructured:
    """Unstructured pruning to a fraction ``sparsity`` of zeros in ``[0, 1)``."""

    sparsity: float

    def __post_init__(self):
        s = float(self.sparsity)
        if not (0.0 <= s < 1.0) or s != s:
            raise ValueError(f"Unstructured: sparsity must lie in [0, 1), got {self.sparsity!r}")
        object.__setattr__(self, "sparsity", s)


@dataclasses.dataclass(frozen=True)
class NM:
    """N:M pruning: ``n`` zeros in every group of ``m`` consecutive input columns.

    ``NM(2, 4)`` is the 2:4 pattern of sparse tensor cores. Columns follow the kernel's own
    order, which for a Flax HWIO conv kernel flattened to ``(kh*kw*cin, cout)`` means groups run
    along input channels at a fixed spatial tap (the hardware convention).
    """

    n: int
    m: int

    def __post_init__(self):
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise TypeError(f"NM: n and m must be ints, got n={self.n!r}, m={self.m!r}")
        if self.m < 2 or not (0 < self.n < self.m):
            raise ValueError(f"NM: need 0 < n < m and m >= 2, got n={self.n}, m={self.m}")

    @property
    def sparsity(self) -> float:
        return self.n / self.m


@dataclasses.dataclass(frozen=True)
class Block:
    """Block pruning: blocks of ``size`` consecutive input columns removed together."""

    sparsity: float
    size: int = 4

    def __post_init__(self):
        s = float(self.sparsity)
        if not (0.0 <= s < 1.0) or s != s:
            raise ValueError(f"Block: sparsity must lie in [0, 1), got {self.sparsity!r}")
        if not isinstance(self.size, int) or self.size < 1:
            raise ValueError(f"Block: size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "sparsity", s)


@dataclasses.dataclass(frozen=True)
class Int:
    """Uniform integer weight quantization grid.

    Args:
      bits: 2..8.
      sym: symmetric grid (zero point fixed at ``2**(bits-1)``, as the OBC reference) or
        asymmetric (integer zero point from the range).
      search: ``"lp"`` shrinks the range over ``grid`` candidates (down to ``1 - maxshrink``)
        and keeps the one with the smallest ``sum |q(w) - w|**p`` per channel (the OBC
        reference's search, p = 2.4); ``"minmax"`` uses the full range.
      granularity: ``"channel"`` (one scale per output row), ``"tensor"`` or ``"group"``
        (``group_size`` consecutive input columns share a scale).
    """

    bits: int = 4
    sym: bool = True
    search: Literal["lp", "minmax"] = "lp"
    granularity: Literal["channel", "tensor", "group"] = "channel"
    group_size: int | None = None
    p: float = 2.4
    maxshrink: float = 0.8
    grid: int = 100

    def __post_init__(self):
        if not isinstance(self.bits, int) or not (2 <= self.bits <= 8):
            raise ValueError(f"Int: bits must be an int in 2..8, got {self.bits!r}")
        if self.search not in ("lp", "minmax"):
            raise ValueError(f"Int: search must be 'lp' or 'minmax', got {self.search!r}")
        if self.granularity not in ("channel", "tensor", "group"):
            raise ValueError(
                f"Int: granularity must be 'channel', 'tensor' or 'group', got {self.granularity!r}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"Int: granularity='group' needs a positive int group_size, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError("Int: group_size is only meaningful with granularity='group'")
        if not (0.0 <= self.maxshrink < 1.0):
            raise ValueError(f"Int: maxshrink must lie in [0, 1), got {self.maxshrink}")
        if self.grid < 1 or self.p <= 0:
            raise ValueError(f"Int: need grid >= 1 and p > 0, got grid={self.grid}, p={self.p}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1


PruneSpec = Unstructured | NM | Block


def check_fits(spec, cols: int, layer: str = "<matrix>") -> None:
    """Raise ``ValueError`` naming ``layer`` if ``spec`` cannot apply to ``cols`` input columns."""
    if isinstance(spec, NM) and cols % spec.m != 0:
        raise ValueError(
            f"layer {layer!r}: N:M pattern {spec.n}:{spec.m} needs the input width to be a "
            f"multiple of {spec.m}, but it has {cols} columns"
        )
    if isinstance(spec, Block) and cols % spec.size != 0:
        raise ValueError(
            f"layer {layer!r}: block pruning with blocks of {spec.size} needs the input width to "
            f"be a multiple of {spec.size}, but it has {cols} columns"
        )
    if isinstance(spec, Int) and spec.granularity == "group" and cols % spec.group_size != 0:
        raise ValueError(
            f"layer {layer!r}: group size {spec.group_size} does not divide the input width {cols}"
        )


def spec_name(spec) -> str:
    """Short human-readable label, e.g. ``'50%'``, ``'2:4'``, ``'w4'``, ``'blk4@50%'``."""
    if spec is None:
        return "dense"
    if isinstance(spec, Unstructured):
        return f"{100 * spec.sparsity:g}%"
    if isinstance(spec, NM):
        return f"{spec.n}:{spec.m}"
    if isinstance(spec, Block):
        return f"blk{spec.size}@{100 * spec.sparsity:g}%"
    if isinstance(spec, Int):
        g = {"channel": "", "tensor": "t", "group": f"g{spec.group_size}"}[spec.granularity]
        return f"w{spec.bits}{'' if spec.sym else 'a'}{g}"
    raise TypeError(f"not a compression spec: {spec!r}")
