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

__all__ = [
    "Unstructured",
    "NM",
    "Block",
    "Int",
    "PruneSpec",
    "check_fits",
    "spec_name",
    "as_prune",
    "as_quant",
    "ExactOBS",
    "OBQ",
    "GPTQ",
    "SparseGPT",
    "Magnitude",
    "SolverSpec",
    "SOLVER_NAMES",
    "as_solver",
    "solver_family",
]


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


def _where(layer: str | None, what: str) -> str:
    return f"layer {layer!r}: {what}" if layer else what


_PRUNE_FORMS = ("expected a sparsity in [0, 1) (0.5, '50%'), an N:M pattern ('2:4') or a spec "
                "(Unstructured, NM, Block)")
_QUANT_FORMS = "expected a number of bits in 2..8 (4, 'w4') or an Int spec"


def as_prune(value, *, what: str = "prune", layer: str | None = None):
    """A pruning spec from a spec or a shorthand, the same everywhere (Python, rules, CLI).

    A float in ``[0, 1)`` (or ``"0.5"``, ``"50%"``) is :class:`Unstructured`; ``"2:4"`` or a pair
    ``(2, 4)`` is :class:`NM`; specs pass through; None stays None.

    Example:
        >>> as_prune(0.5), as_prune("2:4"), as_prune("75%")
        (Unstructured(sparsity=0.5), NM(n=2, m=4), Unstructured(sparsity=0.75))
    """
    if value is None or isinstance(value, (Unstructured, NM, Block)):
        return value
    if isinstance(value, bool):
        raise TypeError(_where(layer, f"{what}: expected a sparsity in [0, 1) (0.5, '50%'), an "
                               f"N:M pattern ('2:4') or a spec, got {value!r}"))
    try:
        if isinstance(value, tuple) and len(value) == 2:
            return NM(int(value[0]), int(value[1]))
        if isinstance(value, str):
            text = value.strip()
            if ":" in text:
                n, m = text.split(":")
                return NM(int(n), int(m))
            if text.endswith("%"):
                return Unstructured(float(text[:-1]) / 100)
            return Unstructured(float(text))
        if hasattr(value, "__float__") and getattr(value, "ndim", 0) == 0:
            return Unstructured(float(value))
    except (TypeError, ValueError) as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(_where(layer, f"{what}: {_PRUNE_FORMS}, got {value!r}{detail}")) from None
    raise TypeError(_where(layer, f"{what}: {_PRUNE_FORMS}, got {value!r}"))


def as_quant(value, *, what: str = "quant", layer: str | None = None):
    """A quantization spec from an :class:`Int` or a shorthand: an int (or ``"4"``, ``"w4"``) of
    bits is ``Int(bits)``; None stays None.

    Example:
        >>> as_quant(4) == Int(4), as_quant("w8") == Int(8)
        (True, True)
    """
    if value is None or isinstance(value, Int):
        return value
    if isinstance(value, bool):
        raise TypeError(_where(layer, f"{what}: {_QUANT_FORMS}, got {value!r}"))
    try:
        if isinstance(value, str):
            text = value.strip().lower().removeprefix("w")
            return Int(int(text))
        if hasattr(value, "__index__"):
            return Int(int(value))
        if isinstance(value, float) and value.is_integer():
            return Int(int(value))
    except (TypeError, ValueError) as e:
        detail = f" ({e})" if str(e) else ""
        raise ValueError(_where(layer, f"{what}: {_QUANT_FORMS}, got {value!r}{detail}")) from None
    raise TypeError(_where(layer, f"{what}: {_QUANT_FORMS}, got {value!r}"))


_METHODS = ("auto", "blocked", "fast", "naive")


def _check_method(name, method):
    if method not in _METHODS:
        raise ValueError(f"{name}: method must be one of {_METHODS}, got {method!r}")


def _check_block(name, blocksize):
    if isinstance(blocksize, bool) or not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"{name}: blocksize must be a positive int, got {blocksize!r}")


@dataclasses.dataclass(frozen=True)
class ExactOBS:
    """Options of ExactOBS pruning (OBC): the engine formulation (all give the same result)."""

    method: str = "auto"

    def __post_init__(self):
        _check_method("ExactOBS", self.method)


@dataclasses.dataclass(frozen=True)
class OBQ:
    """Options of the Optimal Brain Quantizer (OBC), also used for joint prune + quantize.

    Attributes:
      method: engine formulation (``"auto"``, ``"blocked"``, ``"fast"``, ``"naive"``).
      outlier_rule: quantize the worst out-of-range weight first (OBC §4).
      order: ``"greedy"`` (OBQ) or ``"natural"`` (columns left to right).
    """

    method: str = "auto"
    outlier_rule: bool = True
    order: str = "greedy"

    def __post_init__(self):
        _check_method("OBQ", self.method)
        if self.order not in ("greedy", "natural"):
            raise ValueError(f"OBQ: order must be 'greedy' or 'natural', got {self.order!r}")


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """Options of GPTQ (Frantar et al., 2023): lazy block width, act-order, static groups."""

    blocksize: int = 128
    act_order: bool = False
    static_groups: bool = False

    def __post_init__(self):
        _check_block("GPTQ", self.blocksize)


@dataclasses.dataclass(frozen=True)
class SparseGPT:
    """Options of SparseGPT (Frantar & Alistarh, 2023): the mask-selection / lazy block width."""

    blocksize: int = 128

    def __post_init__(self):
        _check_block("SparseGPT", self.blocksize)


@dataclasses.dataclass(frozen=True)
class Magnitude:
    """The baselines: magnitude pruning and round-to-nearest quantization (no compensation)."""


SolverSpec = ExactOBS | OBQ | GPTQ | SparseGPT | Magnitude


SOLVER_NAMES = ("obc", "magnitude", "gptq")
"""The solver shorthands, in the order the command lines list them: ``"obc"`` (ExactOBS / OBQ),
``"magnitude"`` (magnitude pruning / round to nearest) and ``"gptq"`` (GPTQ / SparseGPT)."""

_FAMILY = {ExactOBS: "obc", OBQ: "obc", GPTQ: "gptq", SparseGPT: "gptq", Magnitude: "magnitude"}


def as_solver(value, *, what: str = "solver"):
    """A solver: one of :data:`SOLVER_NAMES` or an option record, checked.

    Example:
        >>> as_solver("gptq"), as_solver(GPTQ(act_order=True)).act_order
        ('gptq', True)
    """
    if isinstance(value, str) and value in SOLVER_NAMES:
        return value
    if type(value) in _FAMILY:
        return value
    raise (ValueError if isinstance(value, str) else TypeError)(
        f"{what} must be one of {SOLVER_NAMES} or an option record (ExactOBS, OBQ, GPTQ, "
        f"SparseGPT, Magnitude), got {value!r}"
    )


def solver_family(solver) -> str:
    """The shorthand name of a solver or option record: ``"obc"``, ``"gptq"`` or ``"magnitude"``.

    Example:
        >>> solver_family(SparseGPT(blocksize=64)), solver_family("obc")
        ('gptq', 'obc')
    """
    solver = as_solver(solver)
    return solver if isinstance(solver, str) else _FAMILY[type(solver)]
