"""OBC's database of compression levels and the global solver over it.

Optimal Brain Compression (Frantar, Singh, Alistarh, NeurIPS 2022, §5) compresses a whole model to
a budget in two steps:

1. **Database.** Every layer is compressed, on its own, to every level of a list (unstructured
   sparsities, N:M, bit-widths and their combinations). For each (layer, level) the layer-wise OBS
   loss ``0.5·tr((W-Ŵ) H (W-Ŵ)ᵀ)`` and the cost (size in bits, BOPs or FLOPs) are stored, and
   optionally the compressed weights. ExactOBS rebuilds all unstructured sparsities of a layer
   from one elimination pass, so a sweep of 40 sparsities costs about one level.
2. **Global solver.** A dynamic program over layers picks one level per layer minimising the summed
   loss subject to the summed cost staying within the budget (layer losses are assumed additive,
   as in the paper). The summed score is the OBS loss, its relative or OBC's ``squared`` form, or
   the network score of :func:`network_scores` (OBC's ``loss`` mode: the calibration loss with
   only that layer at that level, from a ``loss_fn`` the caller supplies); :func:`spdy` searches
   over the DP with the stitched model's real calibration loss (OBC's default search).

Cost model (per layer; ``numel`` weights, ``nnz`` kept weights, ``b`` weight bits, 32 when not
quantized; ``positions`` output positions, 1 by default for Dense):

* ``size`` (bits): ``nnz·b`` plus, with ``overhead=True`` (default), what
  :func:`obcjax.export.theoretical_bits` counts for the packed layer: a 1-bit-per-weight mask for
  unstructured pruning, ``ceil(log2 m)`` bits per kept weight for N:M indices, 1 bit per block for
  block pruning, and a float32 scale plus a uint8 zero point per quantization group (per row for
  per-channel grids). With ``overhead=False`` it is ``nnz·b``, the ``size_bits`` of
  :func:`obcjax.transforms.summarize`.
* ``flops``: MACs of the kept weights, ``positions·nnz``.
* ``bops``: ``positions·nnz·b·abits`` (``abits`` 32 by default, or a function of the level;
  a :class:`WALevel` carries its own activation bits). N:M levels halve the MACs through
  ``nnz``; where N:M does not fit a layer's width the level is unavailable there.

Mixed weight/activation levels (OBC's "mixed" database: 8w8a, 4w4a, 2:4+8w8a, 2:4+4w4a):
a :class:`WALevel` is a weight level plus an activation bit-width. Levels sharing the same
weights (4w4a and 4w8a) are solved once. Their loss is the weights' OBS loss plus an activation
term in the same units: measured, the output error the quantized inputs add to the compressed
layer on the calibration data (:func:`obcjax.activations.activation_error_stats`), or the proxy
``Σ_i σ_i²(a) ‖Ŵ[:, i]‖²`` of uncorrelated rounding noise
(:func:`obcjax.activations.activation_errors`; ``σ_i²``: the mean squared rounding error the
a-bit grid adds to input channel ``i``; ``Ŵ`` the compressed kernel).

For example (``model``, its variables ``v``, calibration ``batches``, ``keep`` rules)::

    errs = activations.activation_error_stats(model, v, batches, (4, 8), rules=keep + [".*"])
    db = build_database(params, stats, mixed_levels((8, 4)), rules=keep + [(".*", True)],
                        act_errors=errs, positions=positions)
    choice = solve(db, db.cost_of({p: "8w8a" for p in db.paths}, "bops") / 2, metric="bops")
    res = activations.compress_mixed(model, v, batches, db, choice)   # OBC's order

Example:
    >>> import tempfile
    >>> import flax.linen as nn, jax, jax.numpy as jnp, numpy as np
    >>> from obcjax.calibration import calibrate
    >>> from obcjax.transforms import compress
    >>> from obcjax.specs import NM, Int, Unstructured
    >>> class MLP(nn.Module):
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         x = nn.relu(nn.Dense(16, name="dense_0")(x))
    ...         return nn.Dense(8, name="head")(nn.relu(nn.Dense(16, name="dense_1")(x)))
    >>> model = MLP()
    >>> x = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
    >>> v = model.init(jax.random.key(0), x)
    >>> params, stats = v["params"], calibrate(model, v, [x[:128], x[128:]])
    >>> levels = [None, *[Unstructured(s) for s in (0.5, 0.75, 0.9)], NM(2, 4), Int(4),
    ...           (Unstructured(0.5), Int(4))]
    >>> db = build_database(params, stats, levels, path=tempfile.mkdtemp(),   # resumable
    ...                     progress=False)
    >>> choice = solve(db, db.dense_cost("size") / 4)                # 4x smaller
    >>> new_params = materialize(params, db, choice)
    >>> out = compress(params, stats, to_rules(choice))              # or recompute from rules
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import re
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax import kernels as K
from obcjax._checks import check_kernel, check_rel_damp
from obcjax.fileio import CorruptedFileError, atomic_write
from obcjax.layout import from_matrices, layout_for, set_path, to_matrices
from obcjax.sizes import grids_for, layer_size
from obcjax.specs import (
    NM,
    Block,
    ExactOBS,
    Int,
    Unstructured,
    check_fits,
    solver_family,
    spec_name,
)
from obcjax.stats import HessianState, check_stats
from obcjax.transforms import (
    LayerSpec,
    as_layer_spec,
    compress,
    find_layers,
    layer_hessians,
)

__all__ = [
    "as_level",
    "METRICS",
    "WALevel",
    "parse_level",
    "mixed_levels",
    "activation_rules",
    "LayerRecord",
    "Database",
    "build_database",
    "sparsity_levels",
    "SCORES",
    "network_scores",
    "SPDYResult",
    "spdy",
    "solve",
    "uniform",
    "to_rules",
    "materialize",
    "layer_bops",
]

METRICS = ("size", "bops", "flops")
#: The per-(layer, level) scores the solvers can minimise (see :class:`Database`).
SCORES = ("obs", "relative", "squared", "network")
FORMAT_VERSION = 2  # 2: optional network scores (member 'net_loss', meta 'network') per layer
_DENSE = LayerSpec()


# ----------------------------------------------------------------------------------------------
# levels
# ----------------------------------------------------------------------------------------------


def sparsity_levels(
    min_sparsity: float = 0.0, max_sparsity: float = 0.99, density_factor: float = 0.9
) -> list[Unstructured]:
    """OBC's unstructured levels: density shrinks by ``density_factor`` per level.

    The defaults give the reference's 45 levels ``0, 0.1, 0.19, 0.271, …, 0.9892, 0.99``.

    Example:
        >>> len(sparsity_levels())
        45
    """
    if not (0.0 <= min_sparsity <= max_sparsity < 1.0):
        raise ValueError(
            f"sparsity_levels: need 0 <= min_sparsity <= max_sparsity < 1, got "
            f"{min_sparsity}, {max_sparsity}"
        )
    if not (0.0 < density_factor < 1.0):
        raise ValueError(
            f"sparsity_levels: density_factor must lie in (0, 1), got {density_factor}"
        )
    out, density = [], 1.0 - min_sparsity
    while 1.0 - density < max_sparsity:
        out.append(round(1.0 - density, 10))
        density *= density_factor
    out.append(max_sparsity)
    return [Unstructured(s) for s in out]


_MIN_ABITS, _MAX_ABITS = 4, 8


@dataclasses.dataclass(frozen=True)
class WALevel:
    """A database level with an activation bit-width: weights ``weights``, inputs at ``abits``.

    Behaves as a level everywhere (``prune``, ``quant``, ``solver``, ``name``); its BOPs use
    ``abits`` (32 when None: float inputs). :func:`to_rules` gives its weight part,
    :func:`activation_rules` its activation part.

    Attributes:
      weights: the weight level (a :class:`~obcjax.transforms.LayerSpec`, or anything
        :func:`~obcjax.transforms.as_layer_spec` reads, e.g. ``Int(4)`` or ``(NM(2, 4), Int(4))``).
      abits: activation bits 4..8, or None for float activations.

    Example:
        >>> WALevel((NM(2, 4), Int(4)), 4).name
        '2:4+4w4a'
        >>> parse_level("2:4+4w4a") == WALevel((NM(2, 4), Int(4)), 4)
        True
    """

    weights: Any = LayerSpec()
    abits: int | None = None

    def __post_init__(self):
        w = as_layer_spec(self.weights)
        object.__setattr__(self, "weights", _DENSE if w is None else w)
        a = self.abits
        if a is not None:
            if isinstance(a, bool) or not isinstance(a, (int, np.integer)):
                raise TypeError(f"WALevel: abits must be an int in 4..8 or None, got {a!r}")
            if a == 32:
                a = None
            elif not _MIN_ABITS <= a <= _MAX_ABITS:
                raise ValueError(
                    f"WALevel: activation bits must be in {_MIN_ABITS}..{_MAX_ABITS} (or None "
                    f"for float activations), got {a}"
                )
        object.__setattr__(self, "abits", None if a is None else int(a))

    @property
    def prune(self):
        return self.weights.prune

    @property
    def quant(self):
        return self.weights.quant

    @property
    def solver(self) -> str:
        return self.weights.solver

    @property
    def wbits(self) -> int:
        return _wbits(self.weights)

    @property
    def name(self) -> str:
        q = self.quant
        w = f"{self.wbits}w"
        if q is not None and q != Int(q.bits):
            w += f"[{spec_name(q)}]"
        a = f"{self.abits}a" if self.abits is not None else "32a"
        parts = [spec_name(self.prune)] if self.prune is not None else []
        return "+".join([*parts, w + a])


_LEVEL_RE = re.compile(r"^(?:(?P<prune>[^+]+)\+)?(?P<w>\d+)w(?P<a>\d+)a$")


def parse_level(text: str, *, solver: str = "obc") -> WALevel:
    """A :class:`WALevel` from OBC's names: ``"8w8a"``, ``"4w4a"``, ``"2:4+8w8a"``, ``"6w6a"``,
    ``"4w8a"``, ``"0.5+4w8a"`` (50% unstructured), ``"4block@50%+8w8a"`` or ``"blk4@50%+8w8a"``
    (blocks of 4 columns pruned at 50%, then 8-bit weights: the reference's ``4block_8w8a``
    levels), ``"32w8a"`` (float weights).

    Weights get the symmetric per-channel Lp-searched grid ``Int(bits)`` (OBC's), 32 meaning
    float weights; activations 4..8 bits, 32 meaning float.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_level: expected a string such as '2:4+4w4a', got {text!r}")
    m = _LEVEL_RE.match(text.strip().lower())
    if m is None:
        raise ValueError(
            f"parse_level: cannot read {text!r}; expected '<w>w<a>a' with an optional pruning "
            "prefix, e.g. '8w8a', '4w4a', '2:4+8w8a', '0.5+4w8a', '4block@50%+8w8a'"
        )
    prune = None
    if m["prune"] is not None:
        ptxt = m["prune"]
        try:
            blk = re.fullmatch(r"(?:(\d+)block|blk(\d+))@(.+)", ptxt)
            if blk is not None:
                frac = blk[3]
                frac = float(frac.rstrip("%")) / (100 if "%" in frac else 1)
                prune = Block(frac, int(blk[1] or blk[2]))
            elif ":" in ptxt:
                n, mm = ptxt.split(":")
                prune = NM(int(n), int(mm))
            else:
                prune = Unstructured(float(ptxt.rstrip("%")) / (100 if "%" in ptxt else 1))
        except (ValueError, TypeError) as e:
            raise ValueError(f"parse_level: bad pruning part {ptxt!r} in {text!r}: {e}") from None
    wb, ab = int(m["w"]), int(m["a"])
    if wb != 32 and not 2 <= wb <= 8:
        raise ValueError(f"parse_level: weight bits must be 2..8 or 32 in {text!r}, got {wb}")
    quant = None if wb == 32 else Int(wb)
    return WALevel(LayerSpec(prune=prune, quant=quant, solver=solver), None if ab == 32 else ab)


def mixed_levels(
    abits: Sequence[int] = (8, 4),
    wbits: Sequence[int] | None = None,
    *,
    nm: tuple[int, int] | None = (2, 4),
    extra: Sequence[Any] = (),
    solver: str = "obc",
) -> list[WALevel]:
    """OBC's mixed database levels: weight/activation bit pairs, each also with N:M pruning.

    Args:
      abits: activation bit-widths (4..8).
      wbits: weight bit-widths; None pairs each activation width with the same weight width
        (OBC's 8w8a, 4w4a), a list takes every (wbits, abits) pair.
      nm: the N:M pattern added to every pair (None: no pruned levels).
      extra: more levels (``WALevel`` or names such as ``"6w6a"``, ``"4w8a"``).
      solver: weight solver of every level (``"obc"``: OBQ / ExactOBS; ``"gptq"`` for wide
        layers).

    Returns:
      ``[WALevel]`` without duplicates, the unpruned levels first.

    Example:
        >>> [lv.name for lv in mixed_levels((8, 4))]
        ['8w8a', '4w4a', '2:4+8w8a', '2:4+4w4a']
        >>> [lv.name for lv in mixed_levels((8, 4), nm=None, extra=["6w6a", "4w8a"])]
        ['8w8a', '4w4a', '6w6a', '4w8a']
    """
    if isinstance(abits, (int, np.integer)):
        abits = (abits,)
    if not abits:
        raise ValueError("mixed_levels: abits is empty")
    if wbits is None:
        pairs = [(a, a) for a in abits]
    else:
        if isinstance(wbits, (int, np.integer)):
            wbits = (wbits,)
        pairs = [(w, a) for w in wbits for a in abits]
    out = []
    prunes = [None] if nm is None else [None, NM(*nm)]
    for prune in prunes:
        for w, a in pairs:
            quant = None if w in (None, 32) else Int(int(w))
            out.append(WALevel(LayerSpec(prune=prune, quant=quant, solver=solver), a))
    for lv in extra:
        out.append(parse_level(lv, solver=solver) if isinstance(lv, str) else _as_level(lv))
    return list(dict.fromkeys(out))


def as_level(value) -> LayerSpec | WALevel:
    """A database level from what users write: a ``WALevel``, a level name such as
    ``"0.5+w4"`` or ``"8w8a"`` (:func:`parse_level`), or a spec / ``(prune, quant)`` pair /
    None (dense), as :func:`obcjax.transforms.as_layer_spec` reads it."""
    if isinstance(value, WALevel):
        return value
    if isinstance(value, str):
        return parse_level(value)
    spec = as_layer_spec(value)
    return _DENSE if spec is None else spec


_as_level = as_level  # the module's own callers


def _weight_level(level) -> LayerSpec:
    return level.weights if isinstance(level, WALevel) else level


def _abits_of(level) -> int | None:
    return level.abits if isinstance(level, WALevel) else None


def _levels_tuple(levels, what: str) -> tuple[LayerSpec, ...]:
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Sequence):
        raise TypeError(f"{what}: levels must be a list of level specs, got {levels!r}")
    out = tuple(_as_level(v) for v in levels)
    if not out:
        raise ValueError(f"{what}: the list of levels is empty")
    seen = set()
    for lv in out:
        if lv in seen:
            raise ValueError(f"{what}: level {lv!r} appears twice in the list of levels")
        seen.add(lv)
    return out


def _wbits(level: LayerSpec) -> int:
    return level.quant.bits if level.quant is not None else 32


def layer_bops(nnz, wbits, abits, positions=1):
    """BOPs of a layer, the ``"bops"`` metric: ``nnz·positions·wbits·abits``.

    The MACs of the kept weights (``nnz`` kept weights × ``positions`` output positions, 1 for a
    Dense layer on one vector) times the weight and activation bit-widths (32 when not
    quantized). Works elementwise on arrays.

    Example:
        >>> layer_bops(nnz=3 * 3 * 16 * 32, wbits=4, abits=8, positions=8 * 8)
        9437184
    """
    return nnz * positions * wbits * abits


def _fits(level: LayerSpec, cols: int) -> bool:
    try:
        for s in (level.prune, level.quant):
            if s is not None:
                check_fits(s, cols)
    except ValueError:
        return False
    return True


def _overhead_bits(level: LayerSpec, rows: int, cols: int, kept: int) -> int:
    """Index/mask and grid bits of one ``(rows, cols)`` matrix: :mod:`obcjax.sizes`' definition
    (what obcjax.export packs), read for a kernel of shape ``(cols, rows)``."""
    q = level.quant
    shape = (cols, rows)
    size = layer_size(shape, prune=level.prune, bits=None if q is None else q.bits, kept=kept,
                      grids=grids_for(q, shape))
    return size.indices + size.grids


# ----------------------------------------------------------------------------------------------
# the database
# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LayerRecord:
    """Everything the database knows about one layer.

    Attributes:
      path: '/'-joined layer path.
      shape: kernel shape. groups: number of weight matrices (feature groups) of the kernel.
      levels: the layer's levels, in order.
      loss: ``(S,)`` float64 OBS loss per level; ``inf`` where the level does not fit the layer
        (N:M or block size not dividing the width), so the solver never picks it.
      nnz: ``(S,)`` kept weights per level (the mask's count; ``numel`` when not pruned).
      overhead: ``(S,)`` index/mask and grid bits per level (see the module docstring).
      energy: ``0.5·tr(W H Wᵀ)`` of the prepared weights (the loss of an all-zero layer), the
        normaliser of ``error="relative"``.
      fingerprint: hashes of the kernel, the Hessian, the levels and the damping.
      weights: ``(S, *shape)`` compressed kernels, or None when not kept in memory.
      weights_file: the ``.npz`` file that holds them on disk, or None.
      file_index: position of each level in ``weights_file`` (None: the same as in ``levels``).
      act_loss: ``(S,)`` the activation part of ``loss`` (mixed levels; None when there is none).
      net_loss: ``(S,)`` the network score of each level: the calibration loss of the model with
        only this layer at that level, minus the dense model's (OBC's ``loss`` mode; ``inf``
        where the level is unavailable), or None before :func:`network_scores`.
    """

    path: str
    shape: tuple[int, ...]
    groups: int
    levels: tuple[LayerSpec, ...]
    loss: np.ndarray
    nnz: np.ndarray
    overhead: np.ndarray
    energy: float
    fingerprint: Mapping[str, str]
    weights: np.ndarray | None = None
    weights_file: str | None = None
    file_index: tuple[int, ...] | None = None
    act_loss: np.ndarray | None = None
    net_loss: np.ndarray | None = None

    def slot(self, i: int) -> int:
        """Position of level ``i`` in ``weights_file``."""
        return i if self.file_index is None else self.file_index[i]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def available(self) -> np.ndarray:
        return np.isfinite(self.loss)


class Database:
    """Per-layer tables of (level → loss, cost), the input of :func:`solve` and :func:`uniform`.

    Built by :func:`build_database`, or from plain tables with :meth:`from_table`.

    Attributes:
      paths: layer paths in order. error: the default score of :meth:`losses` and the solvers,
        one of :data:`SCORES`. computed / loaded: layers computed by this call / read back from
        ``path``. path: the directory the database lives in, or None. base_loss: the dense
        model's calibration loss once :func:`network_scores` ran (else None).

    Scores (``score=`` of :meth:`losses`, :func:`solve`, :func:`uniform`, :func:`spdy`):

    * ``"obs"``: the layer's OBS loss ``0.5·tr(ΔW H ΔWᵀ)`` (plus the activation part of a mixed
      level);
    * ``"relative"``: that loss divided by the layer's ``energy`` ``0.5·tr(W H Wᵀ)``;
    * ``"squared"``: OBC's ``squared`` mode, the layer's output error divided by its largest
      output error over the layer's levels (each layer's worst level scores 1);
    * ``"network"``: OBC's ``loss`` mode, the calibration loss of the whole model with only this
      layer at this level minus the dense model's (:func:`network_scores`).

    Example:
        >>> lv, loss = db.levels("dense_1")[2], db.losses()["dense_1"][2]
        >>> cost = db.costs("size")["dense_1"]
        >>> lv.name, bool(loss > 0), bool(cost[2] < cost[0])
        ('75%', True, True)
    """

    def __init__(
        self,
        records: Iterable[LayerRecord],
        *,
        error: str = "obs",
        positions: Mapping[str, int] | None = None,
        abits: int | Callable[[LayerSpec], int] = 32,
        overhead: bool = True,
        path: str | None = None,
        rel_damp: float | None = None,
        computed: Sequence[str] = (),
        loaded: Sequence[str] = (),
        tables: Mapping[str, Mapping[str, np.ndarray]] | None = None,
        base_loss: float | None = None,
    ):
        if error not in SCORES:
            raise ValueError(f"Database: error must be one of {SCORES}, got {error!r}")
        self.records = {r.path: r for r in records}
        self.paths = tuple(self.records)
        self.error = error
        self.positions = dict(positions or {})
        self.abits = abits
        self.overhead = bool(overhead)
        self.path = path
        self.rel_damp = rel_damp
        self.computed = list(computed)
        self.loaded = list(loaded)
        self.base_loss = None if base_loss is None else float(base_loss)
        if error == "network" and any(r.net_loss is None for r in self.records.values()):
            raise ValueError(
                "Database: error='network' needs the network scores of every layer; run "
                "network_scores(database, params, loss_fn) first"
            )
        self._tables = {
            m: {p: np.asarray(v, np.float64) for p, v in t.items()}
            for m, t in (tables or {}).items()
        }

    # -- construction from plain tables ----------------------------------------------------
    @classmethod
    def from_table(
        cls,
        loss: Mapping[str, Mapping[Any, float]],
        cost: Mapping[str, Mapping[Any, float]] | Mapping[str, Mapping[str, Mapping[Any, float]]],
        *,
        metric: str = "size",
    ) -> Database:
        """A database from ``{path: {level: loss}}`` and ``{path: {level: cost}}`` tables.

        Args:
          loss: per layer, level → loss (``inf`` = level unavailable).
          cost: per layer, level → cost in ``metric``; or ``{metric: {path: {level: cost}}}`` for
            several metrics.
          metric: the metric of a single cost table.

        Example:
            >>> toy = Database.from_table({"a": {None: 0.0, Int(4): 1.0}},
            ...                           {"a": {None: 32.0, Int(4): 4.0}})
            >>> toy.paths
            ('a',)
        """
        if cost and set(cost) <= set(METRICS) and not (set(cost) & set(loss)):
            tables_in = cost
        else:
            tables_in = {metric: cost}
        records, tables = [], {m: {} for m in tables_in}
        for path, row in loss.items():
            levels = _levels_tuple(list(row), f"Database.from_table: layer {path!r}")
            lvals = np.asarray([float(v) for v in row.values()], np.float64)
            if np.isnan(lvals).any():
                raise ValueError(f"Database.from_table: layer {path!r} has a NaN loss")
            for m, t in tables_in.items():
                if path not in t:
                    raise ValueError(f"Database.from_table: no {m} cost for layer {path!r}")
                crow = {_as_level(k): float(v) for k, v in t[path].items()}
                missing = [lv.name for lv in levels if lv not in crow]
                if missing:
                    raise ValueError(
                        f"Database.from_table: layer {path!r} has no {m} cost for level(s) {missing}"
                    )
                tables[m][path] = np.asarray([crow[lv] for lv in levels], np.float64)
            zeros = np.zeros(len(levels), np.int64)
            records.append(LayerRecord(str(path), (), 1, levels, lvals, zeros, zeros, 1.0, {}))
        return cls(records, tables=tables)

    # -- tables ------------------------------------------------------------------------------
    def levels(self, path: str) -> tuple[LayerSpec, ...]:
        """The levels of layer ``path``."""
        return self._record(path).levels

    def losses(self, score: str | None = None) -> dict[str, np.ndarray]:
        """``{path: (S,) score}`` (``inf`` = unavailable).

        Args:
          score: one of :data:`SCORES` (see the class docstring); None: the database's ``error``.

        Raises:
          ValueError: an unknown score, or ``"network"`` before :func:`network_scores`.
        """
        score = self.error if score is None else score
        if score not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {score!r}")
        out = {}
        for p, r in self.records.items():
            l = np.asarray(r.loss, np.float64)
            if score == "relative":
                l = l / r.energy if r.energy > 0 else np.where(l > 0, np.inf, 0.0)
            elif score == "squared":
                fin = l[np.isfinite(l)]
                top = float(fin.max()) if fin.size else 0.0
                l = l / top if top > 0 else np.where(np.isfinite(l), 0.0, np.inf)
            elif score == "network":
                if r.net_loss is None:
                    raise ValueError(
                        f"score 'network': layer {p!r} has no network scores; run "
                        "network_scores(database, params, loss_fn) first"
                    )
                l = np.where(np.isfinite(l), np.asarray(r.net_loss, np.float64), np.inf)
            out[p] = l
        return out

    def costs(self, metric: str = "size") -> dict[str, np.ndarray]:
        """``{path: (S,) cost}`` in ``metric`` (``"size"`` bits, ``"bops"`` or ``"flops"``)."""
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if self._tables:
            if metric not in self._tables:
                raise ValueError(
                    f"this database has costs in {sorted(self._tables)} only, not {metric!r}"
                )
            return dict(self._tables[metric])
        if metric != "size":
            convs = [
                p for p, r in self.records.items() if len(r.shape) > 2 and p not in self.positions
            ]
            if convs:
                raise ValueError(
                    f"metric {metric!r} counts MACs, which for a convolution depend on its number "
                    f"of output positions; pass positions={{path: H_out*W_out}} to build_database "
                    f"for conv layer(s) {convs}"
                )
        out = {}
        for p, r in self.records.items():
            nnz = r.nnz.astype(np.float64)
            wb = np.asarray([_wbits(lv) for lv in r.levels], np.float64)
            if metric == "size":
                out[p] = nnz * wb + (r.overhead if self.overhead else 0.0)
                continue
            pos = float(self.positions.get(p, 1))
            if metric == "flops":
                out[p] = nnz * pos
            else:
                ab = [self._abits(lv) for lv in r.levels]
                out[p] = layer_bops(nnz, wb, np.asarray(ab, np.float64), pos)
        return out

    def _abits(self, level) -> int:
        if isinstance(level, WALevel):
            return 32 if level.abits is None else level.abits
        return self.abits(level) if callable(self.abits) else self.abits

    def dense_cost(self, metric: str = "size") -> float:
        """Total cost of the uncompressed layers (32-bit weights, 32-bit activations for BOPs)."""
        if self._tables:
            raise ValueError("dense_cost: a database built from tables has no dense reference")
        self.costs(metric)  # validates metric and positions
        tot = 0.0
        for p, r in self.records.items():
            n = float(r.numel)
            if metric == "size":
                tot += 32.0 * n
            else:
                pos = self.positions.get(p, 1)
                ab = self._abits(_DENSE)
                tot += n * pos if metric == "flops" else layer_bops(n, 32.0, ab, pos)
        return tot

    def min_cost(self, metric: str = "size") -> float:
        """The smallest reachable total cost: every layer at its cheapest available level."""
        c, l = self.costs(metric), self.losses()
        return float(sum(np.min(c[p][np.isfinite(l[p])]) for p in self.paths))

    def cost_of(self, assignment: Mapping[str, Any], metric: str = "size") -> float:
        """Total cost of ``{path: level}``."""
        c = self.costs(metric)
        return float(sum(c[p][i] for p, i in self._indices(assignment).items()))

    def resolve(self, assignment: Mapping[str, Any]) -> dict[str, Any]:
        """``{path: level}`` with each level as stored (names such as ``"4w4a"`` looked up).

        Example:
            >>> [lv.name for lv in db.resolve({p: Int(4) for p in db.paths}).values()]
            ['w4', 'w4', 'w4']
        """
        return {p: self.records[p].levels[i] for p, i in self._indices(assignment).items()}

    def loss_of(self, assignment: Mapping[str, Any], score: str | None = None) -> float:
        """Summed score of ``{path: level}`` (``score``: see :meth:`losses`)."""
        l = self.losses(score)
        return float(sum(l[p][i] for p, i in self._indices(assignment).items()))

    def weights(self, path: str, level) -> np.ndarray | None:
        """The stored compressed kernel of ``path`` at ``level``, or None when not stored."""
        r = self._record(path)
        i = self._level_index(path, level)
        if r.weights is not None:
            return r.weights[i]
        if r.weights_file is not None:
            return _load_weights(r.weights_file, r.slot(i), path)
        return None

    def summary(self) -> list[dict[str, Any]]:
        """One row per (layer, level): loss and the costs available, for printing or JSON."""
        l = self.losses()
        metrics = [m for m in METRICS if self._has_metric(m)]
        cs = {m: self.costs(m) for m in metrics}
        rows = []
        for p in self.paths:
            for i, lv in enumerate(self.levels(p)):
                row = {"layer": p, "level": lv.name, "loss": float(l[p][i])}
                act = self.records[p].act_loss
                if act is not None:
                    row["act_loss"] = float(act[i])
                net = self.records[p].net_loss
                if net is not None:
                    row["net_loss"] = float(net[i])
                row.update({m: float(cs[m][p][i]) for m in metrics})
                rows.append(row)
        return rows

    def subset(self, levels: Sequence[Any]) -> Database:
        """The same database restricted to ``levels`` (each layer keeps those it has).

        Example:
            >>> sparse_only = db.subset([None, Unstructured(0.5), Unstructured(0.75)])
            >>> len(sparse_only.levels("head"))
            3
        """
        want = _levels_tuple(levels, "Database.subset")
        records, tables = [], {m: {} for m in self._tables}
        for p, r in self.records.items():
            idx = [i for i, lv in enumerate(r.levels) if lv in want]
            if not idx:
                raise ValueError(
                    f"Database.subset: layer {p!r} has none of the levels "
                    f"{[lv.name for lv in want]}; its levels are {[lv.name for lv in r.levels]}"
                )
            w = None if r.weights is None else r.weights[idx]
            records.append(
                dataclasses.replace(
                    r,
                    levels=tuple(r.levels[i] for i in idx),
                    loss=r.loss[idx],
                    nnz=r.nnz[idx],
                    overhead=r.overhead[idx],
                    weights=w,
                    file_index=tuple(r.slot(i) for i in idx),
                    act_loss=None if r.act_loss is None else r.act_loss[idx],
                    net_loss=None if r.net_loss is None else r.net_loss[idx],
                )
            )
            for m, t in self._tables.items():
                tables[m][p] = t[p][idx]
        return self._with(records, tables=tables or None)

    def _with(self, records, **changes) -> Database:
        """A database like this one with other records (and other attributes as given)."""
        kw = dict(
            error=self.error,
            positions=self.positions,
            abits=self.abits,
            overhead=self.overhead,
            path=self.path,
            rel_damp=self.rel_damp,
            tables=self._tables or None,
            base_loss=self.base_loss,
            computed=self.computed,
            loaded=self.loaded,
        )
        kw.update(changes)
        return Database(records, **kw)

    # -- helpers -----------------------------------------------------------------------------
    def _has_metric(self, m: str) -> bool:
        try:
            self.costs(m)
        except ValueError:
            return False
        return True

    def _record(self, path: str) -> LayerRecord:
        if path not in self.records:
            raise ValueError(
                f"layer {path!r} is not in the database; its layers are {list(self.paths)}"
            )
        return self.records[path]

    def _level_index(self, path: str, level) -> int:
        levels = self._record(path).levels
        if isinstance(level, str):
            # a level's name ('4w4a', '2:4+w4', '50%') whatever its solver, when unambiguous
            hits = [i for i, x in enumerate(levels) if x.name == level]
            if len(hits) == 1:
                return hits[0]
        lv = _as_level(level)
        if lv not in levels:
            raise ValueError(
                f"layer {path!r}: level {lv.name!r} ({lv!r}) is not in the database; its levels "
                f"are {[x.name for x in levels]}"
            )
        return levels.index(lv)

    def _indices(self, assignment: Mapping[str, Any]) -> dict[str, int]:
        if not isinstance(assignment, Mapping):
            raise TypeError(f"assignment must be a {{path: level}} mapping, got {assignment!r}")
        missing = [p for p in self.paths if p not in assignment]
        if missing:
            raise ValueError(f"assignment has no level for layer(s) {missing}")
        out = {}
        for p in self.paths:
            i = self._level_index(p, assignment[p])
            if not np.isfinite(self.records[p].loss[i]):
                raise ValueError(
                    f"layer {p!r}: level {self.records[p].levels[i].name!r} does not fit this "
                    f"layer (shape {self.records[p].shape})"
                )
            out[p] = i
        extra = [p for p in assignment if p not in self.records]
        if extra:
            raise ValueError(f"assignment names layer(s) {extra} that are not in the database")
        return out

    def __repr__(self) -> str:
        n = sum(len(r.levels) for r in self.records.values())
        return (
            f"Database({len(self.paths)} layers, {n} (layer, level) entries, error={self.error!r})"
        )


# ----------------------------------------------------------------------------------------------
# building
# ----------------------------------------------------------------------------------------------


def _sha(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(np.asarray(a))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _layer_hessians(value, path: str) -> jax.Array:
    if isinstance(value, HessianState):
        return layer_hessians(value, path)
    H = jnp.asarray(value)
    if H.ndim == 2:
        H = H[None]
    if H.ndim != 3 or H.shape[-1] != H.shape[-2]:
        raise ValueError(
            f"layer {path!r}: statistics must be a HessianState or an array (cols, cols) / "
            f"(groups, cols, cols), got shape {tuple(H.shape)}"
        )
    return H


def _layer_matrices(kernel, H, path: str):
    G, cols = H.shape[0], H.shape[-1]
    if kernel.ndim < 2:
        raise ValueError(f"layer {path!r}: kernel must be at least 2-D, got {tuple(kernel.shape)}")
    lay = layout_for(kernel.shape, cols, G, layer=path)  # names the layer when they differ
    return to_matrices(kernel, lay), lay


def _solve_levels(W, H, P, levels, avail, *, rel_damp, method, mesh, name):
    """Results ``[(weights, mask, loss)]`` per level of one matrix (None where unavailable).

    Every level goes through the one dispatcher, :func:`obcjax.kernels.solve`, except the
    ExactOBS unstructured and block levels, which share one elimination pass per layer.
    """
    out: list[Any] = [None] * len(levels)
    batches: dict[Any, list[int]] = {}
    for i, lv in enumerate(levels):
        if not avail[i]:
            continue
        if lv.prune is None and lv.quant is None:
            out[i] = (np.asarray(W), None, 0.0)
            continue
        options = K.solver_options(lv.solver, lv.prune, lv.quant, method)
        if isinstance(options, ExactOBS) and isinstance(lv.prune, Unstructured):
            batches.setdefault(("unstr", options.method), []).append(i)
        elif isinstance(options, ExactOBS) and isinstance(lv.prune, Block):
            batches.setdefault(("block", lv.prune.size), []).append(i)
        else:
            batches.setdefault(i, []).append(i)
    kw = dict(rel_damp=rel_damp, layer=name, prepared=P)
    for key, idx in batches.items():
        if isinstance(key, tuple) and key[0] == "unstr":
            # one elimination pass serves every sparsity of the layer
            r = K.exactobs_prune(
                W, H, [levels[i].prune.sparsity for i in idx], method=key[1], mesh=mesh, **kw
            )
        elif isinstance(key, tuple):
            r = K.exactobs_block(W, H, [levels[i].prune.sparsity for i in idx], key[1], **kw)
        else:
            lv = levels[key]
            # the ExactOBS / OBQ engine reuses the prepared Hessian and splits rows over the mesh
            extra = dict(prepared=P, mesh=mesh) if solver_family(lv.solver) == "obc" else {}
            r = K.solve(W, H, lv.prune, lv.quant, lv.solver, rel_damp=rel_damp, method=method,
                        layer=name, **extra)
            mask = None if r.mask is None else np.asarray(r.mask)
            out[key] = (np.asarray(r.weights), mask, float(r.loss))
            continue
        for j, i in enumerate(idx):
            out[i] = (np.asarray(r.weights[j]), np.asarray(r.mask[j]), float(r.loss[j]))
    return out


def _compute_layer(path, kernel, Hs, levels, *, rel_damp, method, mesh, keep_weights, fp):
    mats, lay = _layer_matrices(kernel, Hs, path)
    G = lay.groups
    cols = Hs.shape[-1]
    avail = [_fits(lv, cols) for lv in levels]
    S = len(levels)
    loss = np.where(avail, 0.0, np.inf)
    nnz = np.zeros(S, np.int64)
    overhead = np.zeros(S, np.int64)
    per_level: list[list[np.ndarray]] = [[] for _ in range(S)]
    energy = 0.0
    for g in range(G):
        name = path if G == 1 else f"{path}[group {g}]"
        W = mats[g].astype(jnp.float32)
        P = K.prepare(W, Hs[g], rel_damp=rel_damp, layer=name)
        energy += float(K.layer_loss(P.W, jnp.zeros_like(P.W), P.H))
        res = _solve_levels(
            W, Hs[g], P, levels, avail, rel_damp=rel_damp, method=method, mesh=mesh, name=name
        )
        rows = W.shape[0]
        for i, r in enumerate(res):
            if r is None:
                per_level[i].append(np.zeros(W.shape, np.float32))
                continue
            w, mask, l = r
            if not np.isfinite(l):
                raise ValueError(f"layer {name!r}: level {levels[i].name!r} gave a non-finite loss")
            kept = int(mask.sum()) if mask is not None else rows * cols
            loss[i] += l
            nnz[i] += kept
            overhead[i] += _overhead_bits(levels[i], rows, cols, kept)
            per_level[i].append(w)
    weights = None
    if keep_weights:
        # npz has no bfloat16; half-precision kernels are stored as float32 (materialize casts back)
        wdtype = kernel.dtype if kernel.dtype in (jnp.float32, jnp.float64) else jnp.float32
        weights = np.stack(
            [from_matrices(np.stack([np.asarray(m) for m in ms]), lay, wdtype) for ms in per_level]
        )
    return LayerRecord(
        path, tuple(kernel.shape), G, levels, loss, nnz, overhead, energy, fp, weights
    )


def _layer_file(root: str, path: str) -> str:
    return os.path.join(root, urllib.parse.quote(path, safe="") + ".npz")


def _atomic_savez(
    fname: str, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """Write ``arrays`` as an ``.npz`` file atomically (:func:`obcjax.fileio.atomic_write`).

    Each member is the ``.npy`` serialisation ``np.savez`` writes, hashed while it is written.
    With ``meta``, a JSON member ``meta`` follows, holding ``meta`` plus ``"checksums"``:
    ``{member: SHA-256 of its .npy bytes}``, and a member ``meta_sha256`` with the SHA-256 of
    that JSON text, so a reader can verify every member (:func:`_verify_members`).

    Returns:
      ``{member: SHA-256 hex}`` of the array members.
    """
    import zipfile

    sums: dict[str, str] = {}

    def write(f):
        with zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:

            def member(name, arr):
                h = hashlib.sha256()
                with zf.open(name + ".npy", mode="w", force_zip64=True) as m:

                    class _Tee:
                        def write(self, b):
                            h.update(b)
                            return m.write(b)

                    np.lib.format.write_array(_Tee(), np.asanyarray(arr), allow_pickle=False)
                return h.hexdigest()

            for name, arr in arrays.items():
                sums[name] = member(name, arr)
            if meta is not None:
                text = json.dumps({**meta, "checksums": sums})
                member("meta", np.asarray(text))
                member("meta_sha256", np.asarray(hashlib.sha256(text.encode()).hexdigest()))

    atomic_write(fname, write, what="database file")
    return sums


def _write_record(fname: str, rec: LayerRecord) -> None:
    meta = {
        "version": FORMAT_VERSION,
        "path": rec.path,
        "shape": list(rec.shape),
        "groups": rec.groups,
        "energy": rec.energy,
        "fingerprint": dict(rec.fingerprint),
        "levels": [lv.name for lv in rec.levels],
    }
    arrays = {"loss": rec.loss, "nnz": rec.nnz, "overhead": rec.overhead}
    if rec.weights is not None:
        arrays["weights"] = rec.weights
    _atomic_savez(fname, arrays, meta)


_DB_READ_ERRORS = (OSError, ValueError, KeyError, TypeError, EOFError, IndexError, OverflowError)


def _db_corrupted(fname: str, layer: str, why: str) -> CorruptedFileError:
    return CorruptedFileError(
        f"layer {layer!r}: the database file {fname!r} is corrupted: {why}; delete it or pass "
        f"on_mismatch='recompute' to rebuild the layer"
    )


def _npy_member(z, name: str) -> np.ndarray:
    import io

    return np.lib.format.read_array(io.BytesIO(z.read(name + ".npy")), allow_pickle=False)


def _member_header(z, name: str) -> tuple[tuple[int, ...], np.dtype]:
    """``(shape, dtype)`` from a member's ``.npy`` header, without reading its data."""
    fmt = np.lib.format
    with z.open(name + ".npy") as m:
        version = fmt.read_magic(m)
        if version == (1, 0):
            shape, _, dtype = fmt.read_array_header_1_0(m)
        else:
            shape, _, dtype = fmt.read_array_header_2_0(m)
    return tuple(shape), dtype


def _json_text(z, name: str, fname: str, layer: str) -> str:
    import zipfile

    try:
        a = _npy_member(z, name)
    except (zipfile.BadZipFile, *_DB_READ_ERRORS) as e:
        raise _db_corrupted(fname, layer, f"member {name!r} is damaged ({e})") from None
    if a.ndim != 0 or a.dtype.kind != "U":
        raise _db_corrupted(fname, layer, f"member {name!r} is not a text member")
    return str(a)


def _verify_members(fname: str, layer: str) -> dict[str, Any]:
    """The record's meta dict, once every member of ``fname`` has been verified.

    Files written with checksums: the meta text must match ``meta_sha256``, the members must be
    exactly those the meta lists, and each member's bytes must match its SHA-256. Older files
    without checksums: every member is read through, which checks its zip CRC-32.

    Raises:
      CorruptedFileError: naming the layer, the file and the member that fails.
    """
    import zipfile

    chunk = 1 << 20
    try:
        with zipfile.ZipFile(fname) as z:
            names = z.namelist()
            members = [n[: -len(".npy")] for n in names if n.endswith(".npy")]
            if len(set(names)) != len(names) or len(members) != len(names):
                raise _db_corrupted(fname, layer, f"unexpected members {sorted(names)}")
            if "meta" not in members:
                raise _db_corrupted(fname, layer, "the member 'meta' is missing")
            text = _json_text(z, "meta", fname, layer)
            if "meta_sha256" in members:
                want_sha = _json_text(z, "meta_sha256", fname, layer)
                if hashlib.sha256(text.encode()).hexdigest() != want_sha:
                    raise _db_corrupted(fname, layer, "the member 'meta' fails its checksum")
            meta = json.loads(text)
            if not isinstance(meta, dict):
                raise _db_corrupted(fname, layer, "the member 'meta' is not a JSON object")
            sums = meta.get("checksums")
            if "meta_sha256" in members:
                if not isinstance(sums, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in sums.items()
                ):
                    raise _db_corrupted(fname, layer, "the meta has no valid 'checksums' table")
                want = set(sums) | {"meta", "meta_sha256"}
            else:  # written before members had checksums: the zip CRC-32 is what there is
                sums = None
                want = set(members) & {"meta", "loss", "nnz", "overhead", "weights"}
            if set(members) != want or not {"loss", "nnz", "overhead"} <= want:
                missing = sorted(({"loss", "nnz", "overhead"} | want) - set(members))
                extra = sorted(set(members) - want)
                raise _db_corrupted(
                    fname, layer, f"members missing {missing}, members not expected {extra}"
                )
            for name in sorted(set(members) - {"meta", "meta_sha256"}):
                h = hashlib.sha256()
                try:
                    with z.open(name + ".npy") as m:
                        while block := m.read(chunk):
                            h.update(block)
                except (zipfile.BadZipFile, OSError, EOFError) as e:
                    raise _db_corrupted(fname, layer, f"member {name!r} is damaged ({e})") from None
                if sums is not None and h.hexdigest() != sums[name]:
                    raise _db_corrupted(fname, layer, f"member {name!r} fails its checksum")
    except CorruptedFileError:
        raise
    except zipfile.BadZipFile as e:
        raise _db_corrupted(fname, layer, f"not a readable .npz file ({e})") from None
    except _DB_READ_ERRORS as e:
        raise _db_corrupted(fname, layer, f"{type(e).__name__}: {e}") from None
    return meta


def _read_record(fname: str, levels, layer: str | None = None) -> tuple[LayerRecord, bool]:
    """The stored record of a layer, every member verified first (see :func:`_verify_members`).

    Raises:
      CorruptedFileError: the file or one of its members does not verify, or its fields do not
        fit one another; the message names the layer, the file and the member or field.
    """
    import zipfile

    layer = fname if layer is None else layer
    meta = _verify_members(fname, layer)
    try:
        with zipfile.ZipFile(fname) as z:
            members = {n[: -len(".npy")] for n in z.namelist()}
            loss, nnz, overhead = (_npy_member(z, k) for k in ("loss", "nnz", "overhead"))
            has_w = "weights" in members
            wshape, wdtype = _member_header(z, "weights") if has_w else ((), None)
        shape = tuple(int(s) for s in meta["shape"])
        n = len(meta["levels"])
        for key, arr, kinds in (
            ("loss", loss, "f"),
            ("nnz", nnz, "iu"),
            ("overhead", overhead, "iu"),
        ):
            if arr.shape != (n,) or arr.dtype.kind not in kinds:
                raise _db_corrupted(
                    fname, layer, f"member {key!r} is {arr.dtype} {arr.shape}, expected ({n},)"
                )
        if has_w and (wshape != (n, *shape) or wdtype.kind != "f"):
            raise _db_corrupted(
                fname, layer, f"member 'weights' is {wdtype} {wshape}, expected ({n}, *{shape})"
            )
        fingerprint = meta["fingerprint"]
        if not isinstance(fingerprint, dict):
            raise TypeError("the field 'fingerprint' is not a dict")
        rec = LayerRecord(
            str(meta["path"]),
            shape,
            int(meta["groups"]),
            levels,
            np.asarray(loss),
            np.asarray(nnz),
            np.asarray(overhead),
            float(meta["energy"]),
            fingerprint,
            None,
            fname if has_w else None,
        )
    except CorruptedFileError:
        raise
    except (zipfile.BadZipFile, *_DB_READ_ERRORS) as e:
        raise _db_corrupted(fname, layer, f"a field of the meta is invalid ({e!r})") from None
    return rec, has_w


def _load_weights(fname: str, slot: int | None, layer: str) -> np.ndarray | None:
    """Level ``slot`` of the ``weights`` member of ``fname`` (all levels if None), or None.

    Raises:
      CorruptedFileError: the file changed or was damaged since it was loaded (its zip CRC or
        ``.npy`` header no longer reads), naming the layer and the file.
      FileNotFoundError: the file was removed.
    """
    import zipfile

    try:
        with np.load(fname, allow_pickle=False) as z:
            if "weights" not in z.files:
                return None
            w = z["weights"]
            return np.asarray(w if slot is None else w[slot])
    except FileNotFoundError:
        raise FileNotFoundError(
            errno.ENOENT,
            f"layer {layer!r}: the database file {fname!r} was removed after the database was "
            f"loaded; run build_database again",
        ) from None
    except (zipfile.BadZipFile, *_DB_READ_ERRORS) as e:
        raise CorruptedFileError(
            f"layer {layer!r}: cannot read the weights of the database file {fname!r}: it "
            f"changed or was damaged after it was loaded ({type(e).__name__}: {e}); rebuild it "
            f"with build_database(..., on_mismatch='recompute')"
        ) from None


def _database_folder(path) -> str:
    """``path`` as a str, once it is a folder (created if missing) that can hold the database."""
    try:
        root = os.fspath(path)
    except TypeError:
        raise TypeError(
            f"build_database: path must be a str or os.PathLike folder, got {type(path).__name__}"
        ) from None
    if os.path.exists(root) and not os.path.isdir(root):
        raise NotADirectoryError(
            errno.ENOTDIR,
            f"build_database: path {root!r} is an existing file, not a folder; the database is a "
            f"folder with one .npz file per layer: give a folder path (created if missing)",
        )
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise OSError(
            e.errno,
            f"build_database: cannot create the database folder {root!r}: {e.strerror or e}",
        ) from e
    return root


def _is_act_stats(value) -> bool:
    """An :class:`obcjax.activations.ActErrorStats` (measured), not a per-channel vector."""
    return all(hasattr(value, a) for a in ("ee", "er", "count"))


def _check_act_errors(act_errors, path: str, levels, kernel, hshape) -> None:
    need = sorted({lv.abits for lv in levels if _abits_of(lv) is not None})
    if act_errors is None or path not in act_errors:
        raise ValueError(
            f"build_database: layer {path!r} has levels with activation bits {need} but "
            f"act_errors has no entry for it; measure them with "
            f"obcjax.activations.activation_error_stats(model, variables, batches, {need}) (or "
            f"the per-channel proxy activation_errors) on the same layers"
        )
    errs = act_errors[path]
    missing = [b for b in need if b not in errs]
    if missing:
        raise ValueError(
            f"build_database: layer {path!r}: act_errors has bits {sorted(errs)} but the levels "
            f"need {missing}; pass them to activation_errors(bits=...)"
        )
    cin = None
    for b in need:
        e = errs[b]
        if _is_act_stats(e):
            G, cols = hshape[0], hshape[-1]
            for name in ("ee", "er"):
                m = np.asarray(getattr(e, name))
                if m.shape != (G, cols, cols) or not np.all(np.isfinite(m)):
                    raise ValueError(
                        f"build_database: layer {path!r}: act_errors[{b}].{name} must be finite "
                        f"of shape {(G, cols, cols)} (the layer's statistics), got {m.shape}; "
                        "were the errors measured on this model?"
                    )
            if not int(e.count) > 0:
                raise ValueError(
                    f"build_database: layer {path!r}: act_errors[{b}].count must be > 0, got "
                    f"{e.count!r}"
                )
            continue
        e = np.asarray(e)
        if e.ndim != 1 or not np.all(np.isfinite(e)) or np.any(e < 0):
            raise ValueError(
                f"build_database: layer {path!r}: act_errors[{b}] must be a finite, non-negative "
                f"(in_channels,) vector, got shape {e.shape}"
            )
        cin = e.shape[0]
    k = np.shape(kernel)
    # a grouped conv's kernel holds cin/G inputs per group: cin must be a multiple of k[-2]
    if cin is not None and (cin % k[-2] or k[-1] % (cin // k[-2])):
        raise ValueError(
            f"build_database: layer {path!r}: act_errors has {cin} input channels, which does "
            f"not fit the kernel of shape {tuple(k)} (it needs in_channels = kernel.shape[-2] x "
            f"feature groups); were the errors measured on this model?"
        )


def _act_term(kernel, groups: int, sigma2) -> float:
    """The proxy ``Σ_g Σ_c σ²[channel of c] · ‖Ŵ_g[:, c]‖²`` over the columns of each group's matrix.

    Columns run over (window taps, input channel of the group), the channel fastest, so the
    per-channel ``σ²`` of group ``g`` repeats once per tap (:mod:`obcjax.layout`).
    """
    k = np.asarray(kernel, np.float64)
    s2 = np.asarray(sigma2, np.float64).reshape(groups, -1)  # (G, channels per group)
    lay = layout_for(k.shape, math.prod(k.shape[:-1]), groups)
    mats = to_matrices(k, lay)  # (G, rows, cols)
    reps = lay.cols // s2.shape[1]
    col = np.tile(s2, (1, reps))  # (G, cols)
    return float(np.sum(col[:, None, :] * np.square(mats)))


def _act_measured(kernel, reference, groups: int, st) -> float:
    """``(tr(Ŵ ee Ŵᵀ) + 2 tr(Ŵ er ΔWᵀ)) / count`` summed over groups (see ``ActErrorStats``)."""
    ee, er = np.asarray(st.ee, np.float64), np.asarray(st.er, np.float64)
    lay = layout_for(np.shape(kernel), ee.shape[-1], groups)
    Wh = to_matrices(np.asarray(kernel, np.float64), lay)  # (G, rows, cols)
    D = Wh - to_matrices(np.asarray(reference, np.float64), lay)
    quad = np.einsum("gri,gij,grj->", Wh, ee, Wh)
    cross = np.einsum("gri,gij,grj->", Wh, er, D)
    return float((quad + 2.0 * cross) / float(st.count))


def _expand(rec: LayerRecord, levels, act_errors, path: str, reference) -> LayerRecord:
    """The record of the weight levels, spread over the (weight, activation) levels."""
    wl = rec.levels
    idx = [wl.index(_weight_level(lv)) for lv in levels]
    act = np.zeros(len(levels), np.float64)
    cache: dict[int, np.ndarray] = {}

    def kernel(j):
        if j not in cache:
            if rec.weights is not None:
                cache[j] = rec.weights[j]
            else:
                cache[j] = _load_weights(rec.weights_file, rec.slot(j), path)
        return cache[j]

    for i, lv in enumerate(levels):
        b = _abits_of(lv)
        if b is None or not np.isfinite(rec.loss[idx[i]]):
            continue
        errs = act_errors[path][b]
        groups = rec.groups
        if _is_act_stats(errs):
            act[i] = _act_measured(kernel(idx[i]), reference, groups, errs)
            continue
        cin = np.asarray(errs).shape[0]
        if cin != rec.shape[-2] * groups:
            raise ValueError(
                f"build_database: layer {path!r}: act_errors has {cin} input channels, the "
                f"kernel {rec.shape} with {groups} group(s) has {rec.shape[-2] * groups}"
            )
        act[i] = _act_term(kernel(idx[i]), groups, errs)
    return dataclasses.replace(
        rec,
        levels=tuple(levels),
        loss=rec.loss[idx] + act,
        nnz=rec.nnz[idx],
        overhead=rec.overhead[idx],
        weights=None if rec.weights is None else rec.weights[idx],
        file_index=None if rec.weights is not None else tuple(rec.slot(j) for j in idx),
        act_loss=act,
    )


_FP_WHAT = {
    "kernel": "the layer's kernel differs (params of another model or another checkpoint)",
    "hessian": "the layer's Hessian differs (statistics captured from another model or data)",
    "levels": "the list of levels differs",
    "rel_damp": "rel_damp differs",
    "version": "the database format version differs",
}


def build_database(
    params,
    stats: Mapping[str, Any],
    levels: Sequence[Any],
    *,
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any] = ((".*", True),),
    path: str | os.PathLike | None = None,
    rel_damp: float = 0.01,
    mesh=None,
    progress: bool = True,
    error: str = "obs",
    positions: Mapping[str, int] | None = None,
    abits: int | Callable[[LayerSpec], int] = 32,
    overhead: bool = True,
    store_weights: bool = True,
    method: str = "auto",
    on_mismatch: str = "raise",
    callback: Callable[[str, LayerRecord], None] | None = None,
    act_errors: Mapping[str, Mapping[int, Any]] | None = None,
) -> Database:
    """Compress every chosen layer to every level and record loss and cost (OBC's database).

    A level is anything :func:`obcjax.transforms.as_layer_spec` accepts: a
    :class:`~obcjax.transforms.LayerSpec`, a single spec (``Unstructured(0.5)``, ``NM(2, 4)``,
    ``Int(4)``, ``Block(0.5, 4)``), a ``(prune, quant)`` pair, or None for the dense layer (loss 0).
    All unstructured ExactOBS levels of a layer come from one elimination pass; N:M, OBQ and joint
    levels reuse the layer's prepared Hessian. Dense kernels ``(in, out)`` and conv kernels
    (HWIO, grouped and depthwise through one Hessian per feature group) are supported. A level that
    does not fit a layer (N:M or block size not dividing its width, group size not dividing it)
    is recorded as unavailable (``inf`` loss) rather than raising.

    Args:
      params: Flax params pytree (nested dicts).
      stats: ``{path: HessianState}`` (or ``{path: H}`` arrays ``(cols, cols)`` /
        ``(G, cols, cols)``) for every chosen layer.
      levels: the levels.
      rules: ordered ``(regex, value)`` rules choosing the layers (first match wins; a rule matching
        no layer is an error). Value True: the layer gets ``levels``; a ``list`` of levels: its
        own levels; None: the layer is left out of the database.
      path: directory of a resumable database: each finished layer is written atomically to
        ``<path>/<quoted layer path>.npz`` with a fingerprint of (kernel, Hessian, levels,
        rel_damp) and a SHA-256 of every member; a re-run reads finished layers back, every
        member verified (a damaged file raises :class:`obcjax.fileio.CorruptedFileError`
        naming the layer, the file and the member, or is recomputed with
        ``on_mismatch='recompute'``), and computes only the rest. An existing file at ``path``
        raises ``NotADirectoryError``.
      rel_damp: relative damping of every Hessian.
      mesh: optional ``jax.sharding.Mesh``; each layer's rows are split over its first axis
        (ExactOBS, N:M, OBQ and joint levels; block and non-OBC solvers run on one device).
      progress: show a tqdm bar over layers.
      error: the default score of the solvers: ``"obs"`` sums the OBS losses
        ``0.5·tr(ΔW H ΔWᵀ)``; ``"relative"`` divides each by the layer's ``0.5·tr(W H Wᵀ)``;
        ``"squared"`` by the layer's largest loss over its levels (OBC's ``squared`` mode). Any
        score can also be asked of :func:`solve` directly (``score=``).
      positions: ``{path: output positions}`` for MAC counts (BOPs, FLOPs); Dense defaults to 1,
        conv layers need it for those metrics.
      abits: activation bits for BOPs: an int, or a function of the level.
      overhead: count mask/index and grid bits in ``size`` (see the module docstring).
      store_weights: keep every level's compressed kernel (on disk with ``path``, else in memory),
        so :func:`materialize` needs no recomputation.
      method: ExactOBS/OBQ engine (``"auto"``, ``"fast"``, ``"naive"``).
      on_mismatch: a stored layer whose fingerprint differs: ``"raise"`` (ValueError naming the
        layer and what differs) or ``"recompute"`` (overwrite it).
      callback: called as ``callback(path, record)`` after each newly computed layer is stored.
      act_errors: ``{path: {abits: errors}}``, needed for levels with activation bits
        (:class:`WALevel`): an :class:`obcjax.activations.ActErrorStats` from
        :func:`obcjax.activations.activation_error_stats` (the measured output error the quantized
        inputs add is added to the weights' OBS loss), or an ``(in_channels,)`` mean squared error
        from :func:`obcjax.activations.activation_errors` (the proxy ``Σ_i σ_i² ‖Ŵ[:, i]‖²``).
        Levels that share weights are solved once; the weights are always kept (the activation
        term needs them), in memory or under ``path``.

    Returns:
      A :class:`Database`.

    Example:
        >>> small = build_database(params, stats, [None, Unstructured(0.5), NM(2, 4), Int(4)],
        ...                        rules=[("head", None), (".*", True)], progress=False)
        >>> small.paths, small.losses()["dense_0"].shape, float(small.losses()["dense_0"][0])
        (('dense_0', 'dense_1'), (4,), 0.0)
    """
    from obcjax.rules import match_rules

    if error not in ("obs", "relative", "squared"):
        raise ValueError(
            f"build_database: error must be 'obs', 'relative' or 'squared' (the 'network' score "
            f"comes from network_scores), got {error!r}"
        )
    if on_mismatch not in ("raise", "recompute"):
        raise ValueError(
            f"build_database: on_mismatch must be 'raise' or 'recompute', got {on_mismatch!r}"
        )
    rel_damp = check_rel_damp(rel_damp, "build_database")
    base_levels = _levels_tuple(levels, "build_database")
    layers = find_layers(params)
    if not layers:
        raise ValueError("build_database: no layer with a 'kernel' was found in params")
    chosen = match_rules(list(layers), rules, what="layer")
    plan: dict[str, tuple[LayerSpec, ...]] = {}
    for p, v in chosen.items():
        if v is None:
            continue
        if v is True:
            plan[p] = base_levels
        elif isinstance(v, list):
            plan[p] = _levels_tuple(v, f"build_database: layer {p!r}")
        else:
            raise TypeError(
                f"build_database: rule value for layer {p!r} must be True, None or a list of "
                f"levels, got {v!r}"
            )
    if not plan:
        raise ValueError("build_database: the rules leave every layer out of the database")
    check_stats(stats, list(plan), what="build_database", arrays=True)
    for p in plan:
        check_kernel(p, layers[p], "build_database")
    positions = dict(positions or {})
    for p, n in positions.items():
        if p not in layers:
            raise ValueError(
                f"build_database: positions names {p!r}, which is not a layer; layers are "
                f"{list(layers)}"
            )
        if not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"build_database: positions[{p!r}] must be a positive int, got {n!r}")
    root = None
    if path is not None:
        root = _database_folder(path)

    items = list(plan.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="database", unit="layer")
    records, computed, loaded = [], [], []
    for lpath, all_lvls in items:
        # levels sharing their weights (4w4a, 4w8a) are solved once, then expanded
        lvls = tuple(dict.fromkeys(_weight_level(lv) for lv in all_lvls))
        needs_act = any(_abits_of(lv) is not None for lv in all_lvls)
        keep_w = store_weights or needs_act
        kernel = jnp.asarray(layers[lpath])
        Hs = _layer_hessians(stats[lpath], lpath)
        if needs_act:
            _check_act_errors(act_errors, lpath, all_lvls, layers[lpath], Hs.shape)
        _layer_matrices(kernel, Hs, lpath)  # width check before any hashing or solving
        fp = {
            "version": str(FORMAT_VERSION),
            "kernel": _sha(np.asarray(kernel)),
            "hessian": _sha(np.asarray(Hs)),
            "levels": hashlib.sha256(repr(lvls).encode()).hexdigest(),
            "rel_damp": repr(float(rel_damp)),
        }
        fname = _layer_file(root, lpath) if root is not None else None
        if fname is not None and os.path.exists(fname):
            try:  # every member verified: a damaged file is an error here, not at materialize
                rec, has_w = _read_record(fname, lvls, lpath)
            except Exception as e:  # a foreign or damaged file: atomic writes never leave one
                if on_mismatch == "raise":
                    if isinstance(e, CorruptedFileError):
                        raise
                    raise CorruptedFileError(
                        f"layer {lpath!r}: cannot read the stored database file {fname!r} ({e}); "
                        "delete it or pass on_mismatch='recompute'"
                    ) from e
                rec, has_w = None, False
            if rec is not None:
                diff = [k for k in fp if rec.fingerprint.get(k) != fp[k]]
                if diff and on_mismatch == "raise":
                    why = "; ".join(_FP_WHAT[k] for k in diff)
                    raise ValueError(
                        f"layer {lpath!r}: the database at {root!r} was built from different "
                        f"inputs: {why}. Use another path, or on_mismatch='recompute' to overwrite"
                    )
                if not diff and (has_w or not keep_w):
                    if all_lvls != lvls:
                        rec = _expand(rec, all_lvls, act_errors, lpath, kernel)
                    records.append(rec)
                    loaded.append(lpath)
                    continue
        rec = _compute_layer(
            lpath,
            kernel,
            Hs,
            lvls,
            rel_damp=rel_damp,
            method=method,
            mesh=mesh,
            keep_weights=keep_w,
            fp=fp,
        )
        if fname is not None:
            _write_record(fname, rec)
            if rec.weights is not None:  # on disk now: do not hold every level in memory
                rec = dataclasses.replace(rec, weights=None, weights_file=fname)
        if all_lvls != lvls:
            rec = _expand(rec, all_lvls, act_errors, lpath, kernel)
        records.append(rec)
        computed.append(lpath)
        if callback is not None:
            callback(lpath, rec)
    return Database(
        records,
        error=error,
        positions=positions,
        abits=abits,
        overhead=overhead,
        path=root,
        rel_damp=float(rel_damp),
        computed=computed,
        loaded=loaded,
    )


# ----------------------------------------------------------------------------------------------
# network scores (OBC's `loss` mode) and the SPDY search
# ----------------------------------------------------------------------------------------------


def _tree_sha(tree) -> str:
    """SHA-256 of every leaf of a pytree together with its key path."""
    h = hashlib.sha256()
    for kp, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        h.update(jax.tree_util.keystr(kp).encode())
        h.update(_sha(np.asarray(leaf)).encode())
    return h.hexdigest()


def _check_params(params, database: Database, what: str) -> dict[str, Any]:
    """``find_layers(params)`` once ``params`` are those the database was built from."""
    layers = find_layers(params)
    for p in database.paths:
        r = database.records[p]
        if p not in layers:
            raise ValueError(
                f"{what}: layer {p!r} of the database is not in params; params hold "
                f"{list(layers)} -- these params do not belong to this database"
            )
        k = np.asarray(layers[p])
        if r.shape and tuple(k.shape) != r.shape:
            raise ValueError(
                f"{what}: layer {p!r} has a kernel of shape {tuple(k.shape)} in params but "
                f"{r.shape} in the database"
            )
        if r.fingerprint.get("kernel") and _sha(k) != r.fingerprint["kernel"]:
            raise ValueError(
                f"{what}: the kernel of layer {p!r} differs from the one the database was "
                "built from; pass the same params"
            )
    return layers


def _level_kernels(database: Database, path: str, what: str) -> np.ndarray:
    """``(S, *shape)`` stored kernels of every level of ``path``, in the record's order."""
    r = database.records[path]
    if r.weights is not None:
        return np.asarray(r.weights)
    if r.weights_file is not None:
        allw = _load_weights(r.weights_file, None, path)
        if allw is not None:
            return allw[[r.slot(i) for i in range(len(r.levels))]]
    raise ValueError(
        f"{what}: the database stores no weights for layer {path!r}; build it with "
        "store_weights=True (the stitched models are made of the stored levels)"
    )


def _has_act_levels(database: Database) -> bool:
    return any(_abits_of(lv) is not None for r in database.records.values() for lv in r.levels)


class _LossCaller:
    """Calls the user's ``loss_fn`` (jitted once per activation pattern when it can be)."""

    def __init__(self, loss_fn, act: bool, jit: bool | None, what: str):
        if not callable(loss_fn):
            raise TypeError(
                f"{what}: loss_fn must be a callable loss_fn(params) -> scalar calibration loss"
                f"{' (loss_fn(params, abits) for activation levels)' if act else ''}, got "
                f"{type(loss_fn).__name__}"
            )
        if jit not in (None, True, False):
            raise ValueError(f"{what}: jit must be None (try, else eager), True or False, got {jit!r}")
        self.loss_fn, self.act, self.jit, self.what = loss_fn, act, jit, what
        self._one: dict[tuple, Callable] = {}
        self._many: dict[tuple, Callable] = {}

    def __call__(self, params, abits: Mapping[str, int]):
        return self.loss_fn(params, dict(abits)) if self.act else self.loss_fn(params)

    def _value(self, v, where: str) -> float:
        try:
            x = float(np.asarray(v))
        except (TypeError, ValueError):
            raise TypeError(
                f"{self.what}: loss_fn must return a scalar, got {type(v).__name__} {np.shape(v)}"
                f" ({where})"
            ) from None
        if not math.isfinite(x):
            raise ValueError(f"{self.what}: loss_fn returned {x} ({where})")
        return x

    def _try(self, jitted, eager):
        if self.jit is False:
            return eager()
        try:
            return jitted()
        except jax.errors.JAXTypeError:
            if self.jit:
                raise
            self.jit = False  # not traceable: every later call runs eagerly
            return eager()

    def one(self, params, abits: Mapping[str, int], where: str) -> float:
        """The loss of ``params`` (activation bits ``abits``)."""
        key = tuple(sorted(abits.items()))
        if key not in self._one:
            self._one[key] = jax.jit(lambda prm: self(prm, dict(key)))
        return self._value(
            self._try(lambda: self._one[key](params), lambda: self(params, abits)), where
        )

    def levels(self, params, path: str, kernels, abits, chunk: int, where: str) -> np.ndarray:
        """Losses of ``params`` with the kernel of ``path`` set to each of ``kernels``."""
        key = (path, tuple(sorted(abits.items())))

        def eager():
            return np.asarray(
                [self(set_path(params, path, "kernel", k), abits) for k in kernels], np.float64
            )

        def jitted():
            if key not in self._many:
                ab = dict(key[1])
                self._many[key] = jax.jit(
                    lambda prm, ks: jax.vmap(lambda k: self(set_path(prm, path, "kernel", k), ab))(
                        ks
                    )
                )
            fn, out = self._many[key], []
            for s in range(0, len(kernels), chunk):
                ks = kernels[s : s + chunk]
                n = len(ks)
                if n < chunk:  # pad: one compiled shape per layer
                    ks = jnp.concatenate([ks, jnp.repeat(ks[-1:], chunk - n, axis=0)])
                out.append(np.asarray(fn(params, ks), np.float64).reshape(-1)[:n])
            return np.concatenate(out)

        vals = self._try(jitted, eager)
        if vals.shape != (len(kernels),):
            raise TypeError(f"{self.what}: loss_fn must return a scalar ({where})")
        bad = ~np.isfinite(vals)
        if bad.any():
            raise ValueError(f"{self.what}: loss_fn returned {vals[bad][0]} ({where})")
        return vals


_NET_WHAT = {
    "version": "the database format version differs",
    "record": "the layer's database entry was rebuilt",
    "params": "the params differ",
    "key": "the key differs",
    "base_loss": "the dense model's calibration loss differs (another loss_fn or other data)",
}


def _read_network(fname: str, layer: str):
    """``(network meta, net_loss)`` stored in a layer's file, or None; every member verified."""
    import zipfile

    meta = _verify_members(fname, layer)
    net = meta.get("network")
    if net is None:
        return None
    try:
        with zipfile.ZipFile(fname) as z:
            vals = _npy_member(z, "net_loss")
        names = net["levels"]
        if not isinstance(names, list) or vals.shape != (len(names),) or vals.dtype.kind != "f":
            raise ValueError(f"member 'net_loss' is {vals.dtype} {vals.shape}")
        float(net["base_loss"])
        if not isinstance(net["fingerprint"], dict):
            raise TypeError("the field 'network.fingerprint' is not a dict")
    except CorruptedFileError:
        raise
    except (zipfile.BadZipFile, *_DB_READ_ERRORS) as e:
        raise _db_corrupted(fname, layer, f"the network scores are invalid ({e!r})") from None
    return net, vals


def _write_network(fname: str, layer: str, names, net_loss, fingerprint, base: float) -> None:
    """Rewrite a layer's file with its network scores (other members unchanged, re-verified)."""
    import zipfile

    meta = _verify_members(fname, layer)
    with zipfile.ZipFile(fname) as z:
        members = [n[: -len(".npy")] for n in z.namelist()]
        arrays = {
            m: _npy_member(z, m)
            for m in members
            if m not in ("meta", "meta_sha256", "net_loss")
        }
    meta = {k: v for k, v in meta.items() if k != "checksums"}
    meta["network"] = {"fingerprint": fingerprint, "levels": list(names), "base_loss": base}
    arrays["net_loss"] = np.asarray(net_loss, np.float64)
    _atomic_savez(fname, arrays, meta)


def network_scores(
    database: Database,
    params,
    loss_fn: Callable[..., Any],
    *,
    key: str = "",
    levels_per_call: int = 8,
    jit: bool | None = None,
    progress: bool = True,
    on_mismatch: str = "raise",
    base_rtol: float = 1e-6,
) -> Database:
    """OBC's ``loss`` score: the calibration loss with only one layer at one level.

    For every (layer, level) of ``database`` the layer's kernel is replaced by the level's stored
    kernel, every other layer kept dense, and ``loss_fn`` evaluated; the score is that loss minus
    the dense model's (it may be slightly negative). The levels of a layer are evaluated
    ``levels_per_call`` at a time as one ``jit(vmap)`` of ``loss_fn`` over the stacked kernels
    (one compilation per layer); a ``loss_fn`` that cannot be traced runs eagerly, one level at a
    time. The dense level scores exactly 0.

    With ``database.path`` the scores are cached in each layer's database file (member
    ``net_loss``, with the dense loss and a fingerprint of the params, ``key`` and the layer's
    entry); a re-run reads them back, every member verified, when the fingerprint matches and the
    dense loss agrees within ``base_rtol``; otherwise ``on_mismatch`` decides. A rebuilt layer
    drops its stored scores.

    Args:
      database: a :class:`Database` with stored weights (``store_weights=True``).
      params: the params the database was built from (checked by content hash).
      loss_fn: the model-specific part, supplied by the caller: ``loss_fn(params) -> scalar``,
        the model's loss on the calibration batches with these params (traceable for the
        batched path; e.g. the mean cross-entropy, batch norm as the caller wants it). When the
        database has levels with activation bits (:class:`WALevel`) it is called as
        ``loss_fn(params, abits)`` with ``abits = {path: bits}`` of the layers whose inputs are
        quantized (``{}`` for none).
      key: a name for ``loss_fn`` and its data, stored in the fingerprint.
      levels_per_call: levels per vmapped call (memory: that many forward passes at once).
      jit: None: jit + vmap, else eagerly if ``loss_fn`` cannot be traced; True / False: always
        / never jit.
      progress: a tqdm bar over layers.
      on_mismatch: stored scores with another fingerprint: ``"raise"`` (ValueError naming the
        layer and what differs) or ``"recompute"`` (overwrite them).
      base_rtol: relative tolerance on the stored dense loss.

    Returns:
      A new :class:`Database` whose records carry ``net_loss`` and whose ``base_loss`` is the
      dense loss; solve on it with ``score="network"``.

    Raises:
      ValueError: no stored weights; params of another model; a non-finite loss; a stored
        fingerprint that differs (``on_mismatch="raise"``).
      obcjax.fileio.CorruptedFileError: a damaged database file.

    Example:
        >>> y_dense = model.apply(v, x)
        >>> def loss_fn(p):                      # the caller's calibration loss
        ...     return jnp.mean(jnp.square(model.apply({"params": p}, x) - y_dense))
        >>> db = network_scores(db, params, loss_fn)
        >>> budget = db.dense_cost("size") / 4
        >>> choice = solve(db, budget, score="network")
    """
    _check_database(database, "network_scores")
    if database._tables:
        raise ValueError("network_scores: a database built from tables has no weights to stitch")
    if on_mismatch not in ("raise", "recompute"):
        raise ValueError(
            f"network_scores: on_mismatch must be 'raise' or 'recompute', got {on_mismatch!r}"
        )
    if isinstance(levels_per_call, bool) or not isinstance(levels_per_call, (int, np.integer)) or (
        levels_per_call < 1
    ):
        raise ValueError(
            f"network_scores: levels_per_call must be a positive int, got {levels_per_call!r}"
        )
    if not isinstance(key, str):
        raise TypeError(f"network_scores: key must be a str, got {type(key).__name__}")
    layers = _check_params(params, database, "network_scores")
    call = _LossCaller(loss_fn, _has_act_levels(database), jit, "network_scores")
    base = call.one(params, {}, "the dense model")
    fp = {"version": str(FORMAT_VERSION), "params": _tree_sha(params), "key": key}
    items = list(database.paths)
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="network scores", unit="layer")
    records = []
    for p in items:
        r = database.records[p]
        names = [lv.name for lv in r.levels]
        want = {**fp, "record": _sha(np.asarray(json.dumps(dict(r.fingerprint), sort_keys=True)))}
        fname = _layer_file(database.path, p) if database.path is not None else None
        if fname is not None and not os.path.exists(fname):
            fname = None
        net = None
        if fname is not None:
            stored = _read_network(fname, p)
            if stored is not None:
                meta, vals = stored
                diff = [k for k in want if meta["fingerprint"].get(k) != want[k]]
                sb = float(meta["base_loss"])
                if abs(sb - base) > base_rtol * max(abs(base), abs(sb), 1e-30):
                    diff.append("base_loss")
                if not diff and not set(names) <= set(meta["levels"]):
                    diff.append("levels")
                if diff and on_mismatch == "raise":
                    why = "; ".join(_NET_WHAT.get(k, "the list of levels differs") for k in diff)
                    raise ValueError(
                        f"network_scores: layer {p!r}: the network scores stored in {fname!r} "
                        f"were computed differently: {why}. Pass another key or database path, "
                        "or on_mismatch='recompute' to overwrite them"
                    )
                if not diff:
                    pos = {n: i for i, n in enumerate(meta["levels"])}
                    net = np.asarray([vals[pos[n]] for n in names], np.float64)
        if net is None:
            net = _layer_network(database, p, params, layers[p], call, base, levels_per_call)
            if fname is not None:
                _write_network(fname, p, names, net, want, base)
        records.append(dataclasses.replace(r, net_loss=net))
    return database._with(records, base_loss=base)


def _layer_network(database, path, params, kernel, call, base, chunk) -> np.ndarray:
    r = database.records[path]
    S = len(r.levels)
    out = np.full(S, np.inf)
    kernels = None
    groups: dict[int | None, list[int]] = {}
    for i, lv in enumerate(r.levels):
        if not np.isfinite(r.loss[i]):
            continue
        if _weight_level(lv) == _DENSE and _abits_of(lv) is None:
            out[i] = 0.0  # the dense model itself
            continue
        groups.setdefault(_abits_of(lv), []).append(i)
    dtype = jnp.asarray(kernel).dtype
    for b, idx in groups.items():
        if kernels is None:
            kernels = _level_kernels(database, path, "network_scores")
        ks = jnp.asarray(kernels[idx], dtype)
        abits = {} if b is None else {path: b}
        vals = call.levels(params, path, ks, abits, chunk, f"layer {path!r}")
        out[idx] = vals - base
    return out


class SPDYResult(NamedTuple):
    """Result of :func:`spdy`.

    Attributes:
      assignment: ``{path: level}`` of the best stitched model found.
      loss: its calibration loss (``loss_fn``).
      dp_assignment, dp_loss: the DP's choice on the unscaled scores (the search's starting
        point) and its calibration loss; ``loss <= dp_loss`` always.
      coefs: ``(layers,)`` the per-layer multipliers of the best candidate (ones for the DP's).
      evaluations: how many stitched models were evaluated (repeated candidates are not
        re-evaluated).
      history: the best loss after each evaluation.
    """

    assignment: dict[str, Any]
    loss: float
    dp_assignment: dict[str, Any]
    dp_loss: float
    coefs: np.ndarray
    evaluations: int
    history: list[float]


def spdy(
    database: Database,
    budget: float,
    params,
    loss_fn: Callable[..., Any],
    *,
    metric: str = "size",
    score: str | None = None,
    seed: int = 0,
    inits: int = 100,
    tries: int = 100,
    max_evals: int | None = None,
    buckets: int = 10_000,
    jit: bool | None = None,
    progress: bool = True,
) -> SPDYResult:
    """SPDY search over the DP (OBC's default search): the stitched model's real calibration loss.

    A candidate is a vector of per-layer multipliers ``c ∈ [0, 1]^L``; the DP of :func:`solve`
    runs on the score table with layer ``l``'s scores multiplied by ``c_l`` and the levels it picks
    are stitched into ``params`` (stored kernels) and evaluated with ``loss_fn``. The search starts
    from the DP on the unscaled scores (``c = 1``), draws ``inits`` random candidates (uniform),
    then runs a local search: for ``k`` from ``max(1, ⌊0.1·L⌋)`` down to 1, resample ``k``
    random coordinates of the best candidate up to ``tries`` times, restarting on every
    improvement and moving to ``k − 1`` after ``tries`` failures. Only strict improvements are
    kept, so the result is never worse than the DP's choice; every candidate meets the budget
    exactly as :func:`solve` does (costs are never rounded). Deterministic under ``seed``.

    (The reference skips the local search when ``⌊0.1·L⌋ = 0``, i.e. below 10 layers; here it
    then resamples one coordinate.)

    Args:
      database: a :class:`Database` with stored weights.
      budget: the largest total cost in ``metric``.
      params: the params the database was built from.
      loss_fn: ``loss_fn(params) -> scalar`` calibration loss (``loss_fn(params, abits)`` with
        activation levels), as in :func:`network_scores`; OBC evaluates with batch norm on batch
        statistics (train mode), an implicit re-estimation.
      metric: ``"size"``, ``"bops"`` or ``"flops"``.
      score: the score table the multipliers scale (see :func:`solve`); None: the database's.
      seed: seed of the random multipliers.
      inits: random initial candidates (OBC: 100).
      tries: failed resamplings before ``k`` decreases (OBC: 100).
      max_evals: stop after this many evaluations (None: no limit).
      buckets: the DP's cost buckets.
      jit: as in :func:`network_scores`.
      progress: a tqdm bar over evaluations.

    Returns:
      A :class:`SPDYResult`.

    Example:
        >>> res = spdy(db, budget, params, loss_fn, score="network", seed=0, max_evals=8,
        ...            progress=False)
        >>> res.loss <= res.dp_loss
        True
    """
    _check_database(database, "spdy")
    b = _check_budget(budget)
    for name, v, lo in (("inits", inits, 0), ("tries", tries, 1), ("buckets", buckets, 1)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ValueError(f"spdy: {name} must be an int >= {lo}, got {v!r}")
    if max_evals is not None and (
        isinstance(max_evals, bool) or not isinstance(max_evals, (int, np.integer)) or max_evals < 1
    ):
        raise ValueError(f"spdy: max_evals must be a positive int or None, got {max_evals!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"spdy: seed must be an int, got {seed!r}")
    costs, scores = database.costs(metric), database.losses(score)
    layers = _check_params(params, database, "spdy")
    call = _LossCaller(loss_fn, _has_act_levels(database), jit, "spdy")
    paths = database.paths
    kernels = {
        p: jnp.asarray(_level_kernels(database, p, "spdy"), jnp.asarray(layers[p]).dtype)
        for p in paths
    }
    rng = np.random.default_rng(int(seed))
    L = len(paths)
    seen: dict[tuple[int, ...], float] = {}
    history: list[float] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_evals, desc="spdy", unit="eval")

    def choose(coefs) -> tuple[int, ...]:
        scaled = {
            p: np.where(np.isfinite(scores[p]), c * np.nan_to_num(scores[p], posinf=0.0), np.inf)
            for p, c in zip(paths, coefs)
        }
        return _dp(database, costs, scaled, b, metric, int(buckets))

    def evaluate(idx: tuple[int, ...]) -> float:
        if idx in seen:
            return seen[idx]
        new, abits = params, {}
        for p, i in zip(paths, idx):
            lv = database.records[p].levels[i]
            if _weight_level(lv) != _DENSE:
                new = set_path(new, p, "kernel", kernels[p][i])
            if _abits_of(lv) is not None:
                abits[p] = _abits_of(lv)
        seen[idx] = call.one(new, abits, "a stitched model")
        best_so_far = min(history[-1], seen[idx]) if history else seen[idx]
        history.append(best_so_far)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{best_so_far:.5g}")
        return seen[idx]

    def budget_left() -> bool:
        return max_evals is None or len(seen) < max_evals

    try:
        coefs = np.ones(L)
        dp_idx = choose(coefs)
        dp_loss = best = evaluate(dp_idx)
        best_idx = dp_idx
        for _ in range(int(inits)):
            if not budget_left():
                break
            c1 = rng.uniform(0.0, 1.0, size=L)
            idx = choose(c1)
            l1 = evaluate(idx)
            if l1 < best:
                best, best_idx, coefs = l1, idx, c1
        for k in range(max(1, int(0.1 * L)), 0, -1):
            improved = True
            while improved and budget_left():
                improved = False
                for _ in range(int(tries)):
                    if not budget_left():
                        break
                    c1 = coefs.copy()
                    for _ in range(k):
                        c1[rng.integers(L)] = rng.uniform(0.0, 1.0)
                    idx = choose(c1)
                    l1 = evaluate(idx)
                    if l1 < best:
                        best, best_idx, coefs = l1, idx, c1
                        improved = True
                        break
    finally:
        if bar is not None:
            bar.close()

    def as_dict(idx):
        return {p: database.records[p].levels[i] for p, i in zip(paths, idx)}

    return SPDYResult(
        as_dict(best_idx), float(best), as_dict(dp_idx), float(dp_loss), coefs, len(seen), history
    )


# ----------------------------------------------------------------------------------------------
# solving
# ----------------------------------------------------------------------------------------------


def _check_database(database, what: str) -> None:
    if not isinstance(database, Database):
        raise TypeError(
            f"{what}: database must be a Database (from build_database or Database.from_table), "
            f"got {type(database).__name__}"
        )


def _check_budget(budget) -> float:
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise TypeError(f"budget must be a number, got {budget!r}") from None
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    return b


def solve(
    database: Database,
    budget: float,
    *,
    metric: str = "size",
    buckets: int = 10_000,
    score: str | None = None,
) -> dict[str, LayerSpec]:
    """Levels minimising the summed loss with the total cost within ``budget`` (OBC's DP).

    The dynamic program runs over layers on the Pareto front of (total cost, total loss) of the
    layers so far, with exact costs: a state is dropped only if another one is at most as costly and
    at most as lossy, or if even the cheapest completion exceeds the budget. The result is therefore
    exactly optimal while the front stays within ``buckets`` states. Beyond that, as OBC discretises
    costs into 10,000 buckets of ``budget / buckets``, only the best state of each bucket is kept;
    feasibility is never approximated (costs are not rounded), only optimality, by at most what a
    budget smaller by about ``layers · budget / buckets`` would lose.

    Args:
      database: a :class:`Database`.
      budget: the largest allowed total cost, in the units of ``metric`` (bits for ``"size"``).
      metric: ``"size"``, ``"bops"`` or ``"flops"``.
      buckets: the number of cost buckets kept per layer (OBC: 10,000).
      score: what is summed and minimised, one of :data:`SCORES` (``"obs"``, ``"relative"``,
        ``"squared"``, ``"network"``; see :class:`Database`); None: the database's ``error``.

    Returns:
      ``{path: level}`` (a :class:`~obcjax.transforms.LayerSpec` per layer).

    Raises:
      ValueError: if the budget is below the smallest reachable cost (named in the message).

    Example:
        >>> choice = solve(db, 0.25 * db.dense_cost("size"))
        >>> db.cost_of(choice) <= 0.25 * db.dense_cost("size")
        True
    """
    _check_database(database, "solve")
    b = _check_budget(budget)
    if not isinstance(buckets, (int, np.integer)) or buckets < 1:
        raise ValueError(f"solve: buckets must be a positive int, got {buckets!r}")
    costs, losses = database.costs(metric), database.losses(score)
    idx = _dp(database, costs, losses, b, metric, int(buckets))
    return {p: database.levels(p)[i] for p, i in zip(database.paths, idx)}


def _dp(database, costs, losses, b, metric, buckets):
    """The DP of :func:`solve` on given ``{path: (S,)}`` cost and loss tables."""
    paths = database.paths
    cs, ls = [], []
    for p in paths:
        ok = np.isfinite(losses[p])
        if not ok.any():
            raise ValueError(f"solve: layer {p!r} has no level that fits it")
        cs.append(np.where(ok, costs[p], np.inf))
        ls.append(np.where(ok, losses[p], np.inf))
    mins = np.asarray([c.min() for c in cs])
    smallest = float(mins.sum())
    if smallest > b:
        raise ValueError(
            f"solve: budget {b:g} ({metric}) is below the smallest reachable cost {smallest:g} "
            f"(every layer at its cheapest level)"
        )
    # cheapest cost of the layers after each one, to drop states that cannot complete
    rest = np.concatenate([np.cumsum(mins[::-1])[::-1][1:], [0.0]])
    width = b / buckets
    sc, sl = np.zeros(1), np.zeros(1)
    back: list[tuple[np.ndarray, np.ndarray]] = []
    for li, (c, l) in enumerate(zip(cs, ls)):
        lev = np.nonzero(np.isfinite(l))[0]
        n = sc.size
        # one run per level, each sorted by cost because the states are: timsort merges the runs
        cc = (c[lev][:, None] + sc[None, :]).ravel()
        ix = np.flatnonzero(cc + rest[li] <= b)
        ix = ix[np.argsort(cc[ix], kind="stable")]
        cc = cc[ix]
        ll = (l[lev][:, None] + sl[None, :]).ravel()[ix]
        front = ll < np.concatenate([[np.inf], np.minimum.accumulate(ll)[:-1]])
        ix, cc, ll = ix[front], cc[front], ll[front]
        # of equal-cost states on the front the last has the lowest loss
        front = np.append(cc[1:] != cc[:-1], True)
        ix, cc, ll = ix[front], cc[front], ll[front]
        if cc.size > buckets:
            # along the front the loss falls as the cost rises: keep each bucket's last state
            bk = np.floor(cc / width)
            last = np.append(bk[1:] != bk[:-1], True)
            ix, cc, ll = ix[last], cc[last], ll[last]
        back.append((ix % n, lev[ix // n]))
        sc, sl = cc, ll
    k = int(np.argmin(sl))
    out: list[int] = [0] * len(paths)
    for li in range(len(paths) - 1, -1, -1):
        prev, choice = back[li]
        out[li] = int(choice[k])
        k = int(prev[k])
    return tuple(out)


def uniform(
    database: Database,
    budget: float,
    metric: str = "size",
    *,
    by: str = "cost",
    score: str | None = None,
) -> dict[str, LayerSpec]:
    """Baseline: the same level for every layer.

    Only levels present and available in every layer compete, and only those whose total fits the
    budget. ``by="cost"`` takes the least compressed of them (the usual uniform baseline; ties go
    to the lower loss); ``by="loss"`` the one with the lowest summed loss, a stronger baseline when
    the levels mix kinds (a 4-bit grid can beat a sparser 32-bit level of higher cost);
    ``score`` says which loss (see :func:`solve`).

    Example:
        >>> uniform(db, 0.25 * db.dense_cost("size"))["dense_0"].name   # the same level everywhere
        'w4'
    """
    _check_database(database, "uniform")
    b = _check_budget(budget)
    if by not in ("cost", "loss"):
        raise ValueError(f"uniform: by must be 'cost' or 'loss', got {by!r}")
    costs, losses = database.costs(metric), database.losses(score)
    paths = database.paths
    common = [
        lv
        for lv in database.levels(paths[0])
        if all(
            lv in database.levels(p) and np.isfinite(losses[p][database.levels(p).index(lv)])
            for p in paths
        )
    ]
    if not common:
        raise ValueError("uniform: no level is available in every layer of the database")
    tot = []
    for lv in common:
        idx = {p: database.levels(p).index(lv) for p in paths}
        tot.append(
            (
                float(sum(costs[p][i] for p, i in idx.items())),
                float(sum(losses[p][i] for p, i in idx.items())),
                lv,
            )
        )
    fits = [t for t in tot if t[0] <= b]
    if not fits:
        smallest = min(tot, key=lambda t: t[0])
        raise ValueError(
            f"uniform: budget {b:g} ({metric}) is below the smallest uniform cost "
            f"{smallest[0]:g} (level {smallest[2].name!r} in every layer)"
        )
    if by == "cost":
        best = max(fits, key=lambda t: (t[0], -t[1]))
    else:
        best = min(fits, key=lambda t: (t[1], -t[0]))
    return {p: best[2] for p in paths}


def to_rules(assignment: Mapping[str, Any]) -> list[tuple[str, LayerSpec | None]]:
    """Ordered ``(regex, spec)`` rules for :func:`obcjax.transforms.compress`.

    Each rule is the layer's exact path (``re.escape``); dense levels become None (left alone).

    Example:
        >>> to_rules({"block/dense.0": Int(4)})
        [('block/dense\\\\.0', LayerSpec(prune=None, quant=Int(...), solver='obc'))]
    """
    if not isinstance(assignment, Mapping):
        raise TypeError(
            f"to_rules: assignment must be a {{path: level}} mapping, got {assignment!r}"
        )
    out = []
    for p, lv in assignment.items():
        spec = _weight_level(_as_level(lv))
        out.append((re.escape(str(p)), None if spec == _DENSE else spec))
    return out


def activation_rules(assignment: Mapping[str, Any], *, template=None) -> list[tuple[str, Any]]:
    """Ordered ``(regex, spec)`` rules for :func:`obcjax.activations.calibrate_activations`.

    Each layer of ``assignment`` gets its exact path; a :class:`WALevel` with activation bits
    becomes ``template`` at those bits, any other level None (float inputs).

    Args:
      assignment: ``{path: level}``, e.g. from :func:`solve` on a mixed database.
      template: the activation grid (an ``ActSpec`` or ``Int``; its ``bits`` is replaced).
        Default: OBC's asymmetric per-tensor Lp-searched grid, ``Int(bits, sym=False)``.

    Example:
        >>> activation_rules({"fc1": "2:4+4w4a", "fc2": Int(8)})
        [('fc1', Int(bits=4, sym=False, ...)), ('fc2', None)]
    """
    if not isinstance(assignment, Mapping):
        raise TypeError(
            f"activation_rules: assignment must be a {{path: level}} mapping, got {assignment!r}"
        )
    out = []
    for p, lv in assignment.items():
        b = _abits_of(_as_level(lv))
        if b is None:
            out.append((re.escape(str(p)), None))
        elif template is None:
            out.append((re.escape(str(p)), Int(b, sym=False)))
        else:
            out.append((re.escape(str(p)), dataclasses.replace(template, bits=b)))
    return out


def materialize(params, database: Database, assignment: Mapping[str, Any], *, stats=None) -> Any:
    """New params with every layer of ``assignment`` at its chosen level.

    Kernels come from the database's stored weights; where none are stored, the layers are
    recompressed with :func:`obcjax.transforms.compress` from ``stats``. ``params`` must be those
    the database was built from (checked by shape and content hash); inputs are not mutated.

    Example:
        >>> new = materialize(params, db, solve(db, budget))
        >>> logits = model.apply({"params": new}, x)
    """
    _check_database(database, "materialize")
    idx = database._indices(assignment)
    layers = _check_params(params, database, "materialize")
    new, todo = params, {}
    for p, i in idx.items():
        lv = database.records[p].levels[i]
        if _weight_level(lv) == _DENSE:
            continue
        w = database.weights(p, lv)
        if w is None:
            todo[p] = lv
            continue
        new = set_path(new, p, "kernel", jnp.asarray(w, dtype=jnp.asarray(layers[p]).dtype))
    if todo:
        if stats is None:
            raise ValueError(
                f"materialize: the database stores no weights for layer(s) {list(todo)}; build it "
                "with store_weights=True or pass stats= to recompute them"
            )
        kw = {} if database.rel_damp is None else {"rel_damp": database.rel_damp}
        out = compress(new, stats, to_rules(todo), **kw)
        new = out.params
    return new
