"""Compress the layers of a Flax parameter pytree with the per-matrix solvers.

``compress(params, stats, rules)`` finds every layer (a dict holding a ``"kernel"``) under
``params``, picks a :class:`LayerSpec` for it by ordered regex rules on its '/'-joined path (first
match wins; a rule matching nothing is an error), maps its kernel to weight matrices, runs the
solver with the layer's Hessian, and maps the result back. Inputs are never mutated.

The kernel <-> matrix layout lives in :mod:`obcjax.layout`: Dense ``(in, out)`` is
``W = kernel.T``; a conv ``(*spatial, in/G, out)`` (Flax HWIO) is ``G`` problems whose columns run
``(kh, kw, cin)`` -- the order of the calibration patches, and the order in which N:M groups run
along input channels at a fixed spatial tap; a DenseGeneral kernel (attention query / key / value
``(in, heads, head_dim)``, output ``(heads, head_dim, out)``) contracts the leading axes whose
sizes multiply to the width of its statistics.

Grouped and depthwise convs have one Hessian per group, so each group is its own problem. Every
set of same-shaped problems with the same ``(prune, quant, solver options)`` -- the groups of a
depthwise conv, a transformer's query / key / value, its repeated blocks -- is solved as one
``jit(vmap)`` of the pure solver (:func:`obcjax.kernels.solve`), compiled once per (shape,
options) and run in power-of-two chunks sized to a memory budget (on a CPU, large problems go one
by one through the host wrappers instead, which is faster there). A problem alone of its kind goes
through the solver's host wrapper. Either way a bad problem raises the error that names its layer
(``path``, or ``path[group g]``), the first in the order of the layers.

Example:
    >>> import flax.linen as nn, jax, numpy as np
    >>> from obcjax.calibration import calibrate
    >>> from obcjax.specs import NM, Int
    >>> model = nn.Sequential([nn.Dense(16), nn.relu, nn.Dense(4)])
    >>> x = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> variables = model.init(jax.random.key(0), x)
    >>> stats = calibrate(model, variables, [x])
    >>> out = compress(variables["params"], stats, [("layers_0", None), (".*", LayerSpec(
    ...     prune=NM(2, 4), quant=Int(4)))])
    >>> sorted(out.specs), model.apply({"params": out.params}, x).shape
    (['layers_2'], (64, 4))
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax import kernels as K
from obcjax._checks import check_kernel, check_rel_damp, check_rules, rule_spec, sparsity_list
from obcjax.kernels.prepare import blas_one_thread
from obcjax.layout import (
    Layout,
    from_matrices,
    get_path,
    layout_for,
    set_path,
    to_matrices,
)
from obcjax.quant import QArray, kernel_qarray
from obcjax.specs import (
    NM,
    SOLVER_NAMES,
    Block,
    ExactOBS,
    Int,
    Magnitude,
    SolverSpec,
    Unstructured,
    as_prune,
    as_quant,
    as_solver,
    check_fits,
    solver_family,
    spec_name,
)
from obcjax.stats import check_stats

__all__ = [
    "LayerSpec",
    "Compressed",
    "compress",
    "find_layers",
    "as_layer_spec",
    "summarize",
    "prune_levels",
    "layer_hessians",
    "SOLVERS",
]

SOLVERS = SOLVER_NAMES  # the solver shorthands (defined once, in obcjax.specs)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What to do to one layer.

    Frozen and hashable (a static ``jax.jit`` argument, a dictionary key).

    Attributes:
      prune: ``Unstructured``, ``NM`` or ``Block`` (or None); shorthands such as ``0.5``,
        ``"50%"`` or ``"2:4"`` are read as :func:`obcjax.specs.as_prune` reads them.
      quant: ``Int`` weight grid (or None); a number of bits (``4``, ``"w4"``) is ``Int(bits)``.
      solver: ``"obc"`` (ExactOBS / OBQ, exact per row), ``"gptq"`` (GPTQ / SparseGPT, for wide
        layers), ``"magnitude"`` (magnitude pruning / round-to-nearest baselines), or an option
        record from :mod:`obcjax.specs`: ``ExactOBS(method=...)``, ``OBQ(outlier_rule=...,
        order=...)``, ``GPTQ(blocksize=..., act_order=..., static_groups=...)``,
        ``SparseGPT(blocksize=...)``, ``Magnitude()``. A record of the other member of a family
        is converted as :func:`obcjax.kernels.solver_options` says (``GPTQ(...)`` on a pruned
        layer is SparseGPT).

    Example:
        >>> from obcjax.specs import GPTQ, Int
        >>> LayerSpec(quant=Int(4), solver=GPTQ(act_order=True)).name
        'w4'
    """

    prune: Unstructured | NM | Block | None = None
    quant: Int | None = None
    solver: str | SolverSpec = "obc"

    def __post_init__(self):
        object.__setattr__(self, "prune", as_prune(self.prune, what="LayerSpec.prune"))
        object.__setattr__(self, "quant", as_quant(self.quant, what="LayerSpec.quant"))
        as_solver(self.solver, what="LayerSpec.solver")

    @property
    def name(self) -> str:
        parts = [spec_name(s) for s in (self.prune, self.quant) if s is not None]
        return "+".join(parts) or "dense"

    @property
    def family(self) -> str:
        """The solver's shorthand: ``"obc"``, ``"gptq"`` or ``"magnitude"``."""
        return solver_family(self.solver)


def as_layer_spec(value, solver: str | SolverSpec = "obc") -> LayerSpec | None:
    """Normalise a rule value: a LayerSpec, a single spec, a ``(prune, quant)`` pair, a
    ``(prune, quant, solver)`` triple or None. ``solver`` is used where the value names none."""
    if value is None or isinstance(value, LayerSpec):
        return value
    if isinstance(value, (Unstructured, NM, Block)):
        return LayerSpec(prune=value, solver=solver)
    if isinstance(value, Int):
        return LayerSpec(quant=value, solver=solver)
    if isinstance(value, tuple) and len(value) == 2:
        return LayerSpec(prune=value[0], quant=value[1], solver=solver)
    if isinstance(value, tuple) and len(value) == 3:
        return LayerSpec(prune=value[0], quant=value[1], solver=value[2])
    raise TypeError(f"cannot interpret {value!r} as a layer spec")


class Compressed(NamedTuple):
    """Result of :func:`compress` (and of every other producer: build it with :meth:`from_flat`).

    ``masks`` and ``qarrays`` mirror ``params``: the same tree, with the layer's entry at its
    ``"kernel"`` leaf, in the kernel's own layout, and None at every other leaf (a dense or
    unquantized layer's kernel, biases, norms). They are consumed as they are:
    ``jax.tree.map(..., params, masks, is_leaf=lambda x: x is None)`` pairs each kernel with its
    mask, :func:`obcjax.export.pack_compressed` packs them, and the fine-tuning mask transform of
    :mod:`obcjax.training` takes ``masks``.

    ``losses``, ``specs`` and ``layouts`` stay ``{path: value}`` dicts keyed by the layer's
    '/'-joined path: they describe a layer (the dict that holds a kernel), not a leaf; they are
    records and numbers that no tree operation pairs with params; and they are keyed the way
    ``rules`` match layers and :func:`summarize` names its entries. :meth:`mask` and
    :meth:`qarray` read the trees by the same path.

    Attributes:
      params: the new params pytree (same structure, dtypes and shapes as the input).
      masks: params-shaped tree: a bool kernel-shaped mask (True = kept) for every pruned
        layer, None elsewhere.
      qarrays: params-shaped tree: one kernel-layout :class:`~obcjax.quant.QArray` per quantized
        layer (a grouped conv's groups included; ``codes`` of the kernel's shape, ``scale`` /
        ``zero`` of shape ``(ngroups, *output axes)``, ``layout`` recorded), None elsewhere.
      losses: ``{path: float}`` OBS loss ``0.5·tr(ΔW H ΔWᵀ)`` summed over the layer's groups.
      specs: ``{path: LayerSpec}`` of the compressed layers.
      summary: flat dict, see :func:`summarize`.
      layouts: ``{path: obcjax.layout.Layout}``: how each compressed kernel was read as the
        solvers' matrices (the frame of N:M patterns and quantization groups; export uses it).

    Example:
        >>> import numpy as np
        >>> from obcjax.stats import hessian_init, hessian_update
        >>> rng = np.random.default_rng(0)
        >>> params = {"fc": {"kernel": rng.normal(size=(16, 8)).astype(np.float32),
        ...                  "bias": np.zeros(8, np.float32)}}
        >>> stats = {"fc": hessian_update(hessian_init(16), rng.normal(size=(64, 16)))}
        >>> out = compress(params, stats, [("fc", LayerSpec("2:4", 4))])
        >>> out.masks["fc"]["bias"] is None, out.masks["fc"]["kernel"].shape
        (True, (16, 8))
        >>> q = out.qarray("fc")                       # = out.qarrays["fc"]["kernel"]
        >>> bool(np.allclose(q.dequantize(), out.params["fc"]["kernel"]))
        True
    """

    params: Any
    masks: Any
    qarrays: Any
    losses: dict[str, float]
    specs: dict[str, LayerSpec]
    summary: dict[str, Any]
    layouts: dict[str, Layout] | None = None

    def mask(self, path: str):
        """The mask of layer ``path`` (kernel-shaped, True = kept), or None when it has none."""
        return _kernel_entry(self.masks, path)

    def qarray(self, path: str) -> QArray | None:
        """The kernel-layout QArray of layer ``path``, or None when it is not quantized."""
        return _kernel_entry(self.qarrays, path)

    @classmethod
    def from_flat(
        cls,
        params,
        masks: Mapping[str, Any] | None = None,
        qarrays: Mapping[str, Any] | None = None,
        losses: Mapping[str, float] | None = None,
        specs: Mapping[str, LayerSpec] | None = None,
        summary: Mapping[str, Any] | None = None,
        layouts: Mapping[str, Layout] | None = None,
    ) -> Compressed:
        """The record of per-layer results, the one constructor every producer uses.

        Args:
          params: the new params (compressed kernels in place).
          masks: ``{path: bool kernel-shaped mask}`` (True = kept), kernel layout.
          qarrays: ``{path: QArray}``: a kernel-layout QArray, or the solvers' matrix-layout
            QArrays (one per group, a list; or one), put in kernel layout with the layer's
            layout (from ``layouts``, else read off the codes' width, see
            :func:`obcjax.layout.layout_for`).
          losses: ``{path: float}``. specs: ``{path: LayerSpec}``.
          summary: the summary; None (what :func:`compress` passes) computes it with
            :func:`summarize` from ``params``, ``specs`` and the stored masks and QArrays.
          layouts: ``{path: Layout}``; a layer missing from it gets the layout of its QArray,
            else every axis but the last as an input (Dense, Conv).

        Raises:
          ValueError: a path that is not a layer of ``params``, or a mask whose shape is not
            its kernel's.
        """
        masks, qarrays = dict(masks or {}), dict(qarrays or {})
        losses, specs = dict(losses or {}), dict(specs or {})
        layouts = dict(layouts or {})
        kernels = find_layers(params)
        for path in (*masks, *qarrays, *specs):
            if path not in kernels:
                raise ValueError(
                    f"Compressed.from_flat: layer {path!r} is not in params (layers: "
                    f"{sorted(kernels)[:8]})"
                )
        mask_tree = qarray_tree = jax.tree.map(lambda _: None, params)
        for path, m in masks.items():
            shape = tuple(np.shape(kernels[path]))
            if tuple(np.shape(m)) != shape:
                raise ValueError(
                    f"Compressed.from_flat: layer {path!r}: mask of shape {tuple(np.shape(m))}, "
                    f"kernel of shape {shape}"
                )
            mask_tree = set_path(mask_tree, path, "kernel", jnp.asarray(m, bool))
        for path, q in qarrays.items():
            q = _kernel_qarray(q, kernels[path], layouts.get(path), path)
            layouts.setdefault(path, q.layout)
            qarray_tree = set_path(qarray_tree, path, "kernel", q)
        for path in {**masks, **specs}:
            if path not in layouts:
                shape = tuple(int(d) for d in np.shape(kernels[path]))
                layouts[path] = Layout(shape, len(shape) - 1, 1)
        if summary is None:
            summary = summarize(params, params, specs, losses, masks=mask_tree,
                                qarrays=qarray_tree)
        return cls(params, mask_tree, qarray_tree, losses, specs, dict(summary), layouts)


def _kernel_entry(tree, path: str):
    try:
        return get_path(tree, path, "kernel")
    except KeyError:
        return None


def _kernel_qarray(q, kernel, layout: Layout | None, path: str) -> QArray:
    """A layer's QArray in kernel layout (see :meth:`Compressed.from_flat`)."""
    if isinstance(q, QArray) and q.layout is not None:
        if tuple(np.shape(q.codes)) != tuple(np.shape(kernel)):
            raise ValueError(
                f"Compressed.from_flat: layer {path!r}: QArray codes of shape "
                f"{tuple(np.shape(q.codes))}, kernel of shape {tuple(np.shape(kernel))}"
            )
        return q
    qs = [q] if isinstance(q, QArray) else list(q)
    if layout is None:
        cols = int(np.shape(qs[0].codes)[-1])
        groups = len(qs) if np.ndim(qs[0].codes) == 2 else int(np.shape(qs[0].codes)[0])
        layout = layout_for(np.shape(kernel), cols, groups, layer=path)
    try:
        return kernel_qarray(qs[0] if len(qs) == 1 else qs, layout)
    except ValueError as e:
        raise ValueError(f"Compressed.from_flat: layer {path!r}: {e}") from None


def find_layers(params) -> dict[str, jax.Array]:
    """``{path: kernel}`` for every dict under ``params`` that holds a ``"kernel"`` leaf."""
    out: dict[str, jax.Array] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            if "kernel" in node and not isinstance(node["kernel"], Mapping):
                out["/".join(prefix)] = node["kernel"]
            for k, v in node.items():
                if isinstance(v, Mapping):
                    walk(v, prefix + (str(k),))

    walk(params, ())
    return out


def _layer_problem(path, kernel, state, dead_inputs, where: str):
    """Hessians ``(G, cols, cols)``, float32 weight matrices ``(G, rows, cols)`` and the
    :class:`~obcjax.layout.Layout` of a layer (Dense, Conv, DenseGeneral; see
    :mod:`obcjax.layout`)."""
    H = layer_hessians(state, path, dead_inputs)
    G, cols = H.shape[0], H.shape[-1]
    try:
        layout = layout_for(kernel.shape, cols, G, layer=path)
    except ValueError as e:
        raise ValueError(f"{where}{e}") from None
    return H, to_matrices(kernel, layout).astype(jnp.float32), layout


def _check_dead_inputs(dead_inputs, where: str) -> None:
    if dead_inputs not in ("zero", "keep"):
        raise ValueError(f"{where}: dead_inputs must be 'zero' or 'keep', got {dead_inputs!r}")


@jax.jit
def _revive_dead(H):
    """``H (G, c, c)`` with every zero diagonal entry set to ``1e-6 ×`` the mean live diagonal."""
    d = jnp.diagonal(H, axis1=1, axis2=2)
    live = d > 0
    n = jnp.sum(live, axis=1, keepdims=True)
    mean = jnp.where(n > 0, jnp.sum(jnp.where(live, d, 0.0), axis=1, keepdims=True) / n, 1.0)
    add = jnp.where(live, 0.0, jnp.where(n > 0, 1e-6 * mean, 1.0))
    return H + add[:, :, None] * jnp.eye(H.shape[-1], dtype=H.dtype)


def layer_hessians(state, layer: str, dead_inputs: str = "zero") -> jax.Array:
    """A layer's Hessians ``(G, cols, cols)`` (``G = 1`` for a Dense layer) from its statistics.

    Args:
      state: the layer's :class:`~obcjax.stats.HessianState` from calibration.
      layer: its path, named in errors.
      dead_inputs: ``"zero"`` or ``"keep"``, as in :func:`compress`.
    """
    from obcjax.stats import hessian_finalize

    H = hessian_finalize(state, layer=layer)
    H = jnp.asarray(H)
    if H.ndim == 2:
        H = H[None]
    if dead_inputs == "keep":
        H = _revive_dead(H)
    return H



_hessians = layer_hessians  # the old name, still imported by modules outside this one


# ---------------------------------------------------------------------------- problem batching
#
# Same-shaped problems with the same static options (the groups of a grouped or depthwise conv,
# same-shaped layers anywhere in the model) are one vmapped call of the pure solvers, compiled
# once per (shape, options) and chunked to a memory budget. Problems whose status is bad are
# reported by the host in the layer's words.

_GROUP_BYTES = 1 << 28  # working set of one chunk of problems
_GROUP_CHUNK = 512  # most problems per compiled call (chunks are powers of two: few compilations)


class _Groups(NamedTuple):
    """Per-problem results stacked on a leading axis."""

    weights: np.ndarray  # (N, rows, cols) or (N, L, rows, cols)
    mask: np.ndarray | None
    qarray: QArray | None  # fields stacked over problems
    loss: np.ndarray  # (N,) or (N, L)
    status: np.ndarray  # (N,)


_BATCHED: dict = {}


def _batched(fn, key):
    """``jit(vmap(fn))``, one per static options ``key`` (so one compile per (shape, options),
    shared by every layer of that shape)."""
    if key not in _BATCHED:
        _BATCHED[key] = jax.jit(jax.vmap(fn))
    return _BATCHED[key]


def _chunk_size(n: int, per_problem_bytes: int) -> int:
    """A power of two: the smallest that holds all ``n`` problems if the budget allows, else the
    largest the budget allows."""
    fit = max(1, min(_GROUP_CHUNK, _GROUP_BYTES // max(per_problem_bytes, 1)))
    fit = 1 << (fit.bit_length() - 1)
    want = 1 << max(n - 1, 0).bit_length()
    return min(want, fit)


def _map_groups(fn, key, W, H, per_problem_bytes: int) -> _Groups:
    """``fn(W[i], H[i])`` for every problem, in power-of-two chunks of one compiled vmapped call
    (the last chunk padded with copies of the last problem)."""
    N = W.shape[0]
    ch = _chunk_size(N, per_problem_bytes)
    run = _batched(fn, key)
    pad = (-N) % ch
    if pad:
        W = jnp.concatenate([W, jnp.repeat(W[-1:], pad, axis=0)])
        H = jnp.concatenate([H, jnp.repeat(H[-1:], pad, axis=0)])
    outs = []
    with blas_one_thread():
        for i in range(0, N + pad, ch):
            outs.append(jax.block_until_ready(run(W[i : i + ch], H[i : i + ch])))
    res = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:N], *outs)
    return _Groups(res.weights, res.mask, res.qarray, res.loss, res.status)


def _stacked(fn, key, W, H, per_problem_bytes: int) -> _Groups | None:
    """:func:`_map_groups`, or None when the options cannot be traced (a combination the solver
    refuses, say): then the problems go one by one through the host wrappers, whose errors name
    the layer. Tests replace this function to force the one-by-one path."""
    if _one_by_one_on_cpu(W.shape[1:]):
        return None
    try:
        return _map_groups(fn, key, W, H, per_problem_bytes)
    except (ValueError, TypeError, NotImplementedError):
        _BATCHED.pop(key, None)
        return None


# On a CPU, a vmapped solve of large problems is slower than the host wrappers one after another
# (measured by benchmarks/suite.py on 2 cores: 2:4 ExactOBS on 12 stacked 64x256 problems took
# 5.5 s vmapped against 1.8 s one by one, 6 stacked 384x384 15.7 s against 9.0 s; GPTQ 4-bit on
# 6 x 384x384 0.50 s against 0.27 s): each problem already fills the cores with its rows, the
# host path of unstructured ExactOBS stops rows early, and a vmapped batch of per-problem
# inverses no longer fits in cache. Small problems (the groups of a depthwise conv: 1 x 9) are
# the opposite: one call each would be all overhead. Accelerators batch everything.
_CPU_LOOP_WORK = 1 << 21  # rows * cols^2 from which a CPU solves problems one by one


def _one_by_one_on_cpu(shape) -> bool:
    rows, cols = shape
    return jax.default_backend() == "cpu" and rows * cols * cols >= _CPU_LOOP_WORK


def _problem_name(path: str, G: int, g: int) -> str:
    return path if G == 1 else f"{path}[group {g}]"


def _check_groups(status, path: str, W, H) -> None:
    """Raise for the first problem of a layer with a bad status, naming it; a group with no
    signal is a dead group (its weights are zero, as for a dead input) unless every group of the
    layer is."""
    status = np.asarray(status)
    G = status.shape[0]
    bad = status >= int(K.Status.NONFINITE_W)
    no_signal = status == int(K.Status.NO_SIGNAL)
    if no_signal.all():
        K.raise_for_status(status[0], path, W[0], H[0])
    for g in np.nonzero(bad & ~no_signal)[0]:
        K.raise_for_status(status[g], _problem_name(path, G, g), W[g], H[g])
    for g in np.nonzero(status == int(K.Status.DAMPING_RAISED))[0]:
        K.raise_for_status(status[g], _problem_name(path, G, g), W[g], H[g])


def _solve_pure(W, H, *, prune, quant, options, rel_damp) -> K.Result:
    return K.solve(W, H, prune, quant, options, rel_damp=rel_damp, layer="<stacked>")


def _solve(W, H, spec: LayerSpec, *, rel_damp, method, layer) -> K.Result:
    """One matrix through the one dispatcher, :func:`obcjax.kernels.solve` (host wrapper)."""
    return K.solve(W, H, spec.prune, spec.quant, spec.solver, rel_damp=rel_damp, method=method,
                   layer=layer)


class _Layer(NamedTuple):
    """One layer's problem: its kernel, Hessians ``(G, cols, cols)`` and float32 matrices
    ``(G, out/G, cols)``, and the key of the set of problems it is solved with."""

    kernel: jax.Array
    H: jax.Array
    mats: jax.Array
    layout: Layout
    key: tuple


def _solve_sets(layers: Mapping[str, _Layer], fn_of, bytes_of):
    """Solve every layer of ``layers`` (in order) whose set of same-keyed problems holds more than
    one problem as one stacked call per set; yields ``(path, _Groups | None)`` in order, None for
    a layer that must be solved one by one. Statuses are checked layer by layer, so the first bad
    layer in order raises, as it would one by one."""
    sets: dict[tuple, list[str]] = {}
    for path, lay in layers.items():
        sets.setdefault(lay.key, []).append(path)
    done: dict[str, _Groups | None] = {}
    for path, lay in layers.items():
        if path not in done:
            members = sets[lay.key]
            n = sum(layers[p].H.shape[0] for p in members)
            res = None
            if n > 1:
                W = jnp.concatenate([layers[p].mats for p in members])
                H = jnp.concatenate([layers[p].H for p in members])
                rows, cols = W.shape[1:]
                res = _stacked(fn_of(lay.key), lay.key, W, H, bytes_of(lay.key, rows, cols))
            start = 0
            for p in members:
                G = layers[p].H.shape[0]
                done[p] = None if res is None else jax.tree.map(
                    lambda x, s=start, G=G: x[s : s + G], res
                )
                start += G
        res = done.pop(path)
        if res is not None:
            _check_groups(res.status, path, lay.mats, lay.H)
        yield path, res


def compress(
    params,
    stats: Mapping[str, Any],
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any],
    *,
    rel_damp: float = 0.01,
    method: str = "auto",
    solver: str | SolverSpec = "obc",
    progress: bool = False,
    dead_inputs: str = "zero",
) -> Compressed:
    """Compress every layer of ``params`` chosen by ``rules``.

    Same-shaped problems with the same ``(prune, quant, solver options)`` (the groups of a
    grouped conv, same-shaped layers anywhere in the model) are solved together, as one vmapped
    call of :func:`obcjax.kernels.solve` compiled once per (shape, options); a problem alone of
    its kind goes through the solver's host wrapper.

    Args:
      params: a Flax params pytree (nested dicts; the ``"params"`` collection).
      stats: ``{path: HessianState}`` from :func:`obcjax.calibration.calibrate`.
      rules: ordered ``(regex, spec)`` pairs (or a dict); ``spec`` is a :class:`LayerSpec`, a
        single spec, a ``(prune, quant)`` pair, a ``(prune, quant, solver)`` triple, or None to
        leave the layer alone.
      rel_damp: relative damping of every Hessian. method: the ExactOBS/OBQ engine
        (``"auto"``, ``"blocked"``, ``"fast"`` or ``"naive"``; all give the same result) for
        layers whose solver is ``"obc"`` (an ``ExactOBS`` / ``OBQ`` record names its own).
      solver: default solver for rule values that are not LayerSpecs: a name (``"obc"``,
        ``"gptq"``, ``"magnitude"``) or an option record (``GPTQ(act_order=True)``, ...).
      progress: show a tqdm bar over layers.
      dead_inputs: what happens to the weights of an input that never fired during calibration
        (``diag(H) == 0``). ``"zero"`` (the OBC / GPTQ reference, the kernels' rule): they are
        pruned for free. ``"keep"``: such an input is given a tiny curvature
        (``1e-6 · mean`` of the group's live diagonal, or 1 when the whole group is dead), so
        the kernels keep its weights: it is coupled to no other input, so it is simply rounded
        to the grid (quantization) or ranked as nearly free to prune (pruning), and it moves no
        other weight. With few calibration samples, inputs that are silent on the calibration
        set but fire on other data are common (e.g. 1918 inputs of EfficientNet-Lite0 on 128
        crops of 6 photos); zeroing them costs more than 8-bit rounding does.

    Returns:
      A :class:`Compressed` record.
    """
    from obcjax.rules import match_rules

    _check_dead_inputs(dead_inputs, "compress")
    solver = as_solver(solver, what="compress: solver")
    rules = check_rules(rules, "compress")
    rel_damp = check_rel_damp(rel_damp, "compress")
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    layers = find_layers(params)
    if not layers:
        raise ValueError("compress: no layer with a 'kernel' was found in params")
    chosen = match_rules(list(layers), [(r, v) for r, v in rules], what="layer")
    specs = {p: rule_spec(v, solver, p, "compress") for p, v in chosen.items()}
    specs = {p: s for p, s in specs.items() if s is not None and (s.prune or s.quant)}
    check_stats(stats, list(specs), what="compress")
    for path in specs:
        check_kernel(path, layers[path], "compress")
    problems: dict[str, _Layer] = {}
    layouts: dict[str, Layout] = {}
    for path, spec in specs.items():
        kernel = jnp.asarray(layers[path])
        H, mats, layout = _layer_problem(path, kernel, stats[path], dead_inputs, "")
        G, rows, cols = mats.shape
        layouts[path] = layout
        for s in (spec.prune, spec.quant):
            if s is not None:
                check_fits(s, cols, _problem_name(path, G, 0))
        options = K.solver_options(spec.solver, spec.prune, spec.quant, method)
        key = ("solve", spec.prune, spec.quant, options, float(rel_damp), rows, cols)
        problems[path] = _Layer(kernel, H, mats, layout, key)

    def fn_of(key):
        _, prune, quant, options, damp, _, _ = key
        return functools.partial(_solve_pure, prune=prune, quant=quant, options=options,
                                 rel_damp=damp)

    def bytes_of(key, rows, cols):
        return K.solve_bytes(rows, cols, key[3])

    new_params = params
    masks, qarrays, losses = {}, {}, {}
    solved = _solve_sets(problems, fn_of, bytes_of)
    if progress:
        from tqdm.auto import tqdm

        solved = tqdm(solved, total=len(problems), desc="compress", unit="layer")
    for path, res in solved:
        spec, lay = specs[path], problems[path]
        G = lay.H.shape[0]
        if res is not None:
            outs = list(res.weights)
            ms = None if res.mask is None else list(res.mask)
            qs = res.qarray  # fields stacked over the layer's G groups
            loss = float(np.sum(res.loss))
        else:  # one problem alone of its kind: the host wrapper, whose errors name the layer
            outs, ms, qs, loss = [], [], [], 0.0
            for g in range(G):
                r = _solve(lay.mats[g], lay.H[g], spec, rel_damp=rel_damp, method=method,
                           layer=_problem_name(path, G, g))
                outs.append(np.asarray(r.weights))
                ms.append(None if r.mask is None else np.asarray(r.mask))
                qs.append(r.qarray)
                loss += float(r.loss)
        new_kernel = jnp.asarray(from_matrices(np.stack(outs), lay.layout, lay.kernel.dtype))
        new_params = set_path(new_params, path, "kernel", new_kernel)
        if spec.prune is not None:
            masks[path] = from_matrices(np.stack([np.asarray(m) for m in ms]), lay.layout)
        if spec.quant is not None:
            qarrays[path] = kernel_qarray(qs, lay.layout)
        losses[path] = loss
    return Compressed.from_flat(new_params, masks, qarrays, losses, specs, None, layouts)


def summarize(params, new_params, specs: Mapping[str, LayerSpec], losses=None, *, masks=None,
              qarrays=None) -> dict[str, Any]:
    """Flat '/'-keyed summary: per layer size, sparsity, bits and loss; totals.

    Sizes and the ratio are those of :mod:`obcjax.sizes`, the one definition: a compressed
    layer's ``size_bits`` is its kept values (at their code width, 32 bits when not quantized)
    + indices (a 1-bit-per-weight mask, or N:M's ``ceil(log2 m)`` bits per kept weight) + grids
    (a float32 scale and a uint8 zero point each), also given by part (``value_bits``,
    ``index_bits``, ``grid_bits``); every other leaf counts 32 bits, as in the dense size.
    ``total/compression`` is ``total/dense_bits / total/size_bits``. For float32 kernels the
    compressed layers' size is what :func:`obcjax.export.pack_compressed` stores.

    Args:
      params: the original params (unused; kept for the call's shape).
      new_params: the compressed params.
      specs: ``{path: LayerSpec}`` of the compressed layers.
      losses: ``{path: float}``.
      masks, qarrays: the stored masks and QArrays (``{path: ...}`` or params-shaped trees, as
        :class:`Compressed` holds them): kept weights are read off the masks and grids off the
        QArrays; without them kept weights are the nonzeros of a pruned kernel (N:M: its
        pattern) and grids follow the spec.
    """
    from obcjax import sizes

    losses = losses or {}
    masks, qarrays = _by_layer(masks), _by_layer(qarrays)
    new = find_layers(new_params)
    out: dict[str, Any] = {}
    compressed = {}
    for path, k in new.items():
        spec = specs.get(path)
        n = int(np.size(k))
        if spec is None or not (spec.prune or spec.quant):
            size = sizes.layer_size(np.shape(k))
        elif path in masks or path in qarrays:
            size = sizes.stored_layer_size(k, spec.prune, masks.get(path), qarrays.get(path))
        else:
            kept = None
            if spec.prune is not None and not isinstance(spec.prune, NM):
                kept = int(np.count_nonzero(np.asarray(k)))
            bits = spec.quant.bits if spec.quant is not None else None
            size = sizes.layer_size(np.shape(k), prune=spec.prune, bits=bits, kept=kept,
                                    grids=sizes.grids_for(spec.quant, np.shape(k)))
        if spec is not None:
            compressed[path] = size
        bits = spec.quant.bits if (spec is not None and spec.quant is not None) else 32
        out[f"{path}/params"] = n
        out[f"{path}/sparsity"] = 1.0 - size.kept / n
        out[f"{path}/bits"] = bits
        out[f"{path}/size_bits"] = size.total
        out[f"{path}/value_bits"] = size.values
        out[f"{path}/index_bits"] = size.indices
        out[f"{path}/grid_bits"] = size.grids
        out[f"{path}/spec"] = spec.name if spec is not None else "dense"
        if path in losses:
            out[f"{path}/loss"] = float(losses[path])
    total = sizes.model_size(new_params, compressed)
    out["total/params"] = total["dense_bits"] // sizes.DENSE_BITS
    out["total/dense_bits"] = total["dense_bits"]
    out["total/size_bits"] = total["size_bits"]
    # by part: values (every leaf not compressed at 32 bits among them), indices, grids
    out["total/index_bits"] = sum(x.indices for x in compressed.values())
    out["total/grid_bits"] = sum(x.grids for x in compressed.values())
    out["total/value_bits"] = total["size_bits"] - out["total/index_bits"] - out["total/grid_bits"]
    out["total/compression"] = total["ratio"]
    out["total/loss"] = float(sum(losses.values()))
    return out


def _by_layer(entries) -> dict[str, Any]:
    """``{path: entry}`` of a ``{path: entry}`` dict or of a params-shaped tree (None skipped)."""
    if not entries:
        return {}
    if any(isinstance(v, Mapping) for v in entries.values()):
        return {p: x for p, x in find_layers(entries).items() if x is not None}
    return {p: x for p, x in entries.items() if x is not None}


def prune_levels(
    params,
    stats: Mapping[str, Any],
    sparsities: Sequence[float],
    *,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    solver: str | ExactOBS | Magnitude = "obc",
    rel_damp: float = 0.01,
    method: str = "auto",
    dead_inputs: str = "zero",
) -> list[Any]:
    """Params pruned to each of several unstructured sparsities, one elimination pass per layer.

    OBC's database idea: ExactOBS eliminates every row once and any number of levels is rebuilt
    from the recorded orders, so a whole sweep costs little more than one level. As in
    :func:`compress`, same-shaped problems are solved together in one vmapped call.

    Args:
      rules: which layers to prune (a value of None leaves a layer dense).
      solver: ``"obc"`` or ``ExactOBS(method=...)`` (ExactOBS), ``"magnitude"`` or
        ``Magnitude()``.
      dead_inputs: as in :func:`compress` (``"obc"`` only; magnitude pruning ignores ``H``).

    Returns:
      One params pytree per sparsity.
    """
    from obcjax.rules import match_rules

    _check_dead_inputs(dead_inputs, "prune_levels")
    rel_damp = check_rel_damp(rel_damp, "prune_levels")
    levels = sparsity_list(sparsities, "prune_levels")
    layers = find_layers(params)
    chosen = {
        p: v
        for p, v in match_rules(list(layers), list(rules), what="layer").items()
        if v is not None
    }
    if not (solver in ("obc", "magnitude") or isinstance(solver, ExactOBS | Magnitude)):
        raise ValueError(f"prune_levels: solver must be 'obc' or 'magnitude', got {solver!r}")
    options = K.solver_options(solver, Unstructured(0.5), None, method)
    check_stats(stats, list(chosen), what="prune_levels")
    for path in chosen:
        check_kernel(path, layers[path], "prune_levels")
    problems: dict[str, _Layer] = {}
    for path in chosen:
        kernel = jnp.asarray(layers[path])
        H, mats, layout = _layer_problem(path, kernel, stats[path], dead_inputs, "prune_levels: ")
        rows, cols = mats.shape[1:]
        key = ("levels", levels, options, float(rel_damp), rows, cols)
        problems[path] = _Layer(kernel, H, mats, layout, key)

    def fn_of(key):
        return functools.partial(_levels_one, levels=key[1], options=key[2], rel_damp=key[3],
                                 layer="<stacked>")

    def bytes_of(key, rows, cols):
        return K.solve_bytes(rows, cols, key[2]) + 8 * len(levels) * rows * cols

    out = [params for _ in levels]
    for path, res in _solve_sets(problems, fn_of, bytes_of):
        lay = problems[path]
        G = lay.H.shape[0]
        if res is not None:
            per_level = [list(res.weights[:, lv]) for lv in range(len(levels))]
        else:
            per_level = [[] for _ in levels]
            for g in range(G):
                r = _levels_one(lay.mats[g], lay.H[g], levels, options, rel_damp,
                                _problem_name(path, G, g))
                for lv, w in enumerate(r.weights):
                    per_level[lv].append(np.asarray(w))
        for lv in range(len(levels)):
            k = jnp.asarray(from_matrices(np.stack(per_level[lv]), lay.layout, lay.kernel.dtype))
            out[lv] = set_path(out[lv], path, "kernel", k)
    return out


def _levels_one(W, H, levels, options, rel_damp, layer):
    if isinstance(options, ExactOBS):
        return K.exactobs_prune(W, H, list(levels), rel_damp=rel_damp, method=options.method,
                                layer=layer)
    return K.Result(
        jnp.stack([K.magnitude_prune(W, s, layer=layer).weights for s in levels]),
        None, None, jnp.zeros((len(levels),)), jnp.zeros((len(levels), W.shape[0])),
        jnp.asarray(K.Status.OK, jnp.int32),
    )
