"""Compress the layers of a Flax parameter pytree with the per-matrix solvers.

``compress(params, stats, rules)`` finds every layer (a dict holding a ``"kernel"``) under
``params``, picks a :class:`LayerSpec` for it by ordered regex rules on its '/'-joined path (first
match wins; a rule matching nothing is an error), maps its kernel to weight matrices, runs the
solver with the layer's Hessian, and maps the result back. Inputs are never mutated.

Kernel layout, in one place:

* Dense kernel ``(in, out)``: ``W = kernel.T``.
* Conv kernel ``(*spatial, in/G, out)`` (Flax HWIO): group ``g`` owns output channels
  ``g·out/G … (g+1)·out/G - 1`` and ``W_g = kernel[..., g-th slice].reshape(-1, out/G).T``, whose
  columns run ``(kh, kw, cin)`` -- the order of the calibration patches, and the order in which
  N:M groups run along input channels at a fixed spatial tap.

Grouped and depthwise convs have one Hessian per group, so each group is its own problem. When
``G > 1`` the groups are solved together: the matrices ``(G, out/G, cols)`` and Hessians
``(G, cols, cols)`` go through the solvers' compiled pieces vmapped over the group axis (in
chunks of groups), which gives the per-group results of the kernels up to float round-off
(GPTQ, SparseGPT, OBQ, ExactOBS unstructured / N:M, joint prune + quantize, magnitude / RTN;
block pruning keeps the per-group loop). A depthwise layer with 1152 channels then costs a few
compiled calls instead of 1152 rounds of small dispatches. A group whose inputs are invalid, or
whose Hessian needs more damping than ``rel_damp``, is solved again on its own by the kernels,
which raise or retry exactly as they do for one matrix (messages name ``path[group g]``).

Example:
    >>> stats = calibrate(model, variables, batches)
    >>> out = compress(variables["params"], stats, [("conv1", None), (".*", LayerSpec(
    ...     prune=NM(2, 4), quant=Int(4)))])
    >>> logits = model.apply({**variables, "params": out.params}, x)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax import kernels as K
from obcjax.kernels.prepare import blas_one_thread
from obcjax.quant import QArray
from obcjax.specs import NM, Block, Int, Unstructured, check_fits, spec_name

__all__ = [
    "LayerSpec",
    "Compressed",
    "compress",
    "find_layers",
    "kernel_to_matrices",
    "matrices_to_kernel",
    "as_layer_spec",
    "summarize",
    "prune_levels",
]

SOLVERS = ("obc", "magnitude", "gptq")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """What to do to one layer.

    Attributes:
      prune: ``Unstructured``, ``NM`` or ``Block`` (or None).
      quant: ``Int`` weight grid (or None).
      solver: ``"obc"`` (ExactOBS / OBQ, exact per row), ``"gptq"`` (GPTQ / SparseGPT, for wide
        layers) or ``"magnitude"`` (magnitude pruning / round-to-nearest baselines).
    """

    prune: Unstructured | NM | Block | None = None
    quant: Int | None = None
    solver: str = "obc"

    def __post_init__(self):
        if self.prune is not None and not isinstance(self.prune, (Unstructured, NM, Block)):
            raise TypeError(
                f"LayerSpec.prune must be Unstructured, NM or Block, got {self.prune!r}"
            )
        if self.quant is not None and not isinstance(self.quant, Int):
            raise TypeError(f"LayerSpec.quant must be Int, got {self.quant!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"LayerSpec.solver must be one of {SOLVERS}, got {self.solver!r}")
        if isinstance(self.prune, Block) and self.quant is not None:
            raise ValueError("LayerSpec: block pruning combined with quantization is not supported")

    @property
    def name(self) -> str:
        parts = [spec_name(s) for s in (self.prune, self.quant) if s is not None]
        return "+".join(parts) or "dense"


def as_layer_spec(value, solver: str = "obc") -> LayerSpec | None:
    """Normalise a rule value: a LayerSpec, a single spec, a ``(prune, quant)`` pair or None."""
    if value is None or isinstance(value, LayerSpec):
        return value
    if isinstance(value, (Unstructured, NM, Block)):
        return LayerSpec(prune=value, solver=solver)
    if isinstance(value, Int):
        return LayerSpec(quant=value, solver=solver)
    if isinstance(value, tuple) and len(value) == 2:
        return LayerSpec(prune=value[0], quant=value[1], solver=solver)
    raise TypeError(f"cannot interpret {value!r} as a layer spec")


class Compressed(NamedTuple):
    """Result of :func:`compress`; per-layer entries are keyed by the layer's '/'-joined path.

    Attributes:
      params: the new params pytree (same structure, dtypes and shapes as the input).
      masks: ``{path: bool kernel-shaped array}`` (True = kept) for pruned layers.
      qarrays: ``{path: [QArray per group]}`` for quantized layers.
      losses: ``{path: float}`` OBS loss ``0.5·tr(ΔW H ΔWᵀ)`` summed over the layer's groups.
      specs: ``{path: LayerSpec}`` of the compressed layers.
      summary: flat dict, see :func:`summarize`.
    """

    params: Any
    masks: dict[str, jax.Array]
    qarrays: dict[str, list[QArray]]
    losses: dict[str, float]
    specs: dict[str, LayerSpec]
    summary: dict[str, Any]


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


def kernel_to_matrices(kernel, groups: int = 1) -> list[jax.Array]:
    """Weight matrices ``(out/G, cols)`` of a Dense ``(in, out)`` or conv ``(..., in/G, out)`` kernel."""
    kernel = jnp.asarray(kernel)
    out = kernel.shape[-1]
    if out % groups:
        raise ValueError(f"{out} output channels are not divisible into {groups} groups")
    og = out // groups
    return [kernel[..., g * og : (g + 1) * og].reshape(-1, og).T for g in range(groups)]


def matrices_to_kernel(mats: Sequence[jax.Array], shape, dtype=None) -> jax.Array:
    """Inverse of :func:`kernel_to_matrices`."""
    og = mats[0].shape[0]
    if len(mats) == 1:
        k = mats[0].T.reshape(*shape[:-1], og)
    else:
        # one stack + transpose instead of a concatenation of G parts: XLA compiles a
        # G-operand concatenate in minutes for depthwise layers with ~1000 channels; concrete
        # arrays are stacked on the host, which compiles nothing at all
        xp = jnp if any(isinstance(m, jax.core.Tracer) for m in mats) else np
        S = xp.stack([xp.asarray(m) for m in mats])  # (G, og, cols)
        k = jnp.asarray(xp.transpose(S, (2, 0, 1)).reshape(*shape[:-1], len(mats) * og))
    return k.astype(dtype) if dtype is not None else k


def _set_path(tree, path: str, key: str, value):
    """Functional update of ``tree[path...][key]`` on nested dicts (copies along the path)."""
    parts = path.split("/") if path else []

    def rec(node, i):
        node = dict(node)
        if i == len(parts):
            node[key] = value
        else:
            node[parts[i]] = rec(node[parts[i]], i + 1)
        return node

    return rec(tree, 0)


def _solve(W, H, spec: LayerSpec, *, rel_damp, method, layer) -> K.Result:
    """One matrix through the one dispatcher, :func:`obcjax.kernels.solve`."""
    return K.solve(W, H, spec.prune, spec.quant, spec.solver, rel_damp=rel_damp, method=method,
                   layer=layer)


def _solve_pure(W, H, *, spec: LayerSpec, rel_damp, method) -> K.Result:
    return K.solve(W, H, spec.prune, spec.quant, spec.solver, rel_damp=rel_damp, method=method,
                   layer="<group>")


# ------------------------------------------------------------------------------ group batching
#
# Same-shaped problems (the groups of a grouped or depthwise conv) are one vmapped call of the
# pure solvers, compiled once per (shape, spec) and chunked to a memory budget. Problems whose
# status is bad are reported by the host in the layer's words.

_GROUP_BYTES = 1 << 28  # working set of one chunk of groups
_GROUP_CHUNK = 512  # most groups per compiled call (chunks are powers of two: few compilations)


class _Groups(NamedTuple):
    """Per-group results stacked on a leading axis."""

    weights: np.ndarray  # (G, rows, cols) or (G, L, rows, cols)
    mask: np.ndarray | None
    qarray: QArray | None  # fields stacked over groups
    loss: np.ndarray  # (G,) or (G, L)
    status: np.ndarray  # (G,)


_BATCHED: dict = {}


def _batched(fn, key):
    """``jit(vmap(fn))``, one per static options ``key`` (so one compile per (shape, options),
    shared by every layer of that shape)."""
    if key not in _BATCHED:
        _BATCHED[key] = jax.jit(jax.vmap(fn))
    return _BATCHED[key]


def _group_chunk(G: int, rows: int, cols: int) -> int:
    per_group = 4 * (3 * cols * cols + 8 * rows * cols)
    fit = max(1, min(_GROUP_CHUNK, _GROUP_BYTES // per_group, G))
    return 1 << (fit.bit_length() - 1)


def _map_groups(fn, key, W, H) -> _Groups:
    """``fn(W[g], H[g])`` for every group in power-of-two chunks of one compiled vmapped call."""
    G, rows, cols = W.shape
    ch = _group_chunk(G, rows, cols)
    run = _batched(fn, key)
    pad = (-G) % ch
    if pad:
        W = jnp.concatenate([W, jnp.repeat(W[-1:], pad, axis=0)])
        H = jnp.concatenate([H, jnp.repeat(H[-1:], pad, axis=0)])
    outs = []
    with blas_one_thread():
        for i in range(0, G + pad, ch):
            outs.append(jax.block_until_ready(run(W[i : i + ch], H[i : i + ch])))
    res = jax.tree.map(lambda *xs: np.concatenate([np.asarray(x) for x in xs])[:G], *outs)
    return _Groups(res.weights, res.mask, res.qarray, res.loss, res.status)


def _check_groups(status, path: str, W, H) -> None:
    """Raise for the first group with a bad status, naming it; a group with no signal is a dead
    group (its weights are zero, as for a dead input) unless every group of the layer is."""
    status = np.asarray(status)
    bad = status >= int(K.Status.NONFINITE_W)
    no_signal = status == int(K.Status.NO_SIGNAL)
    if no_signal.all():
        K.raise_for_status(status[0], path, W[0], H[0])
    for g in np.nonzero(bad & ~no_signal)[0]:
        K.raise_for_status(status[g], f"{path}[group {g}]", W[g], H[g])
    for g in np.nonzero(status == int(K.Status.DAMPING_RAISED))[0]:
        K.raise_for_status(status[g], f"{path}[group {g}]", W[g], H[g])


def _solve_groups(W, H, spec: LayerSpec, *, rel_damp, method, path) -> _Groups:
    """Every group of a grouped conv in one vmapped call of :func:`obcjax.kernels.solve`."""
    cols = W.shape[-1]
    for s in (spec.prune, spec.quant):
        if s is not None:
            check_fits(s, cols, f"{path}[group 0]")
    fn = functools.partial(_solve_pure, spec=spec, rel_damp=rel_damp, method=method)
    res = _map_groups(fn, ("solve", spec, rel_damp, method), W, H)
    _check_groups(res.status, path, W, H)
    return res


def _group_matrices(kernel, G: int):
    """``(G, out/G, cols)`` stack of :func:`kernel_to_matrices` in one reshape."""
    out = kernel.shape[-1]
    return jnp.asarray(kernel).reshape(-1, G, out // G).transpose(1, 2, 0)


def _group_kernel(S, shape, dtype=None):
    """Inverse of :func:`_group_matrices` (NumPy in, jax array out)."""
    G, og, _ = S.shape
    k = jnp.asarray(np.transpose(np.asarray(S), (2, 0, 1)).reshape(*shape[:-1], G * og))
    return k.astype(dtype) if dtype is not None else k


def _layer_problem(path, kernel, state, dead_inputs, where: str):
    """Hessians ``(G, cols, cols)`` and float32 weight matrices ``(G, out/G, cols)`` of a layer."""
    H = _hessians(state, path, dead_inputs)
    G, cols = H.shape[0], H.shape[-1]
    if kernel.shape[-1] % G or math.prod(kernel.shape[:-1]) != cols:
        raise ValueError(
            f"{where}layer {path!r}: kernel of shape {tuple(kernel.shape)} does not match its "
            f"statistics ({G} group(s) of width {cols}); the statistics come from another model"
        )
    return H, _group_matrices(kernel, G).astype(jnp.float32)


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


def _hessians(state, layer: str, dead_inputs: str = "zero"):
    from obcjax.stats import hessian_finalize

    H = hessian_finalize(state)
    H = jnp.asarray(H)
    if H.ndim == 2:
        H = H[None]
    if dead_inputs == "keep":
        H = _revive_dead(H)
    return H


def compress(
    params,
    stats: Mapping[str, Any],
    rules: Sequence[tuple[str, Any]] | Mapping[str, Any],
    *,
    rel_damp: float = 0.01,
    method: str = "auto",
    solver: str = "obc",
    progress: bool = False,
    dead_inputs: str = "zero",
) -> Compressed:
    """Compress every layer of ``params`` chosen by ``rules``.

    Args:
      params: a Flax params pytree (nested dicts; the ``"params"`` collection).
      stats: ``{path: HessianState}`` from :func:`obcjax.calibration.calibrate`.
      rules: ordered ``(regex, spec)`` pairs (or a dict); ``spec`` is a :class:`LayerSpec`, a
        single spec, a ``(prune, quant)`` pair, or None to leave the layer alone.
      rel_damp: relative damping of every Hessian. method: the ExactOBS/OBQ engine
        (``"auto"``, ``"blocked"``, ``"fast"`` or ``"naive"``; all give the same result).
      solver: default solver for rule values that are not LayerSpecs.
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
    if isinstance(rules, Mapping):
        rules = list(rules.items())
    layers = find_layers(params)
    if not layers:
        raise ValueError("compress: no layer with a 'kernel' was found in params")
    chosen = match_rules(list(layers), [(r, v) for r, v in rules], what="layer")
    specs = {p: as_layer_spec(v, solver) for p, v in chosen.items()}
    specs = {p: s for p, s in specs.items() if s is not None and (s.prune or s.quant)}
    missing = [p for p in specs if p not in stats]
    if missing:
        raise ValueError(
            f"compress: no calibration statistics for layer(s) {missing}; the statistics hold "
            f"{sorted(stats)} -- were they captured from this model?"
        )
    new_params = params
    masks, qarrays, losses = {}, {}, {}
    items = list(specs.items())
    if progress:
        from tqdm.auto import tqdm

        items = tqdm(items, desc="compress", unit="layer")
    for path, spec in items:
        kernel = jnp.asarray(layers[path])
        H, mats = _layer_problem(path, kernel, stats[path], dead_inputs, "")
        G = H.shape[0]
        kw = dict(rel_damp=rel_damp, method=method)
        res = _solve_groups(mats, H, spec, path=path, **kw) if G > 1 else None
        if res is not None:
            outs = list(res.weights)
            ms = None if res.mask is None else list(res.mask)
            qs = None if res.qarray is None else [
                jax.tree.map(lambda x, g=g: jnp.asarray(x[g]), res.qarray) for g in range(G)
            ]
            loss = float(np.sum(res.loss))
        else:  # one matrix (or groups one by one): the host path, errors name the group
            outs, ms, qs, loss = [], [], [], 0.0
            for g in range(G):
                name = path if G == 1 else f"{path}[group {g}]"
                r = _solve(mats[g], H[g], spec, layer=name, **kw)
                outs.append(np.asarray(r.weights))
                ms.append(None if r.mask is None else np.asarray(r.mask))
                qs.append(r.qarray)
                loss += float(r.loss)
            ms = None if spec.prune is None else ms
        new_kernel = _group_kernel(np.stack(outs), kernel.shape, kernel.dtype)
        new_params = _set_path(new_params, path, "kernel", new_kernel)
        if spec.prune is not None:
            masks[path] = _group_kernel(np.stack(ms), kernel.shape)
        if spec.quant is not None:
            qarrays[path] = qs
        losses[path] = loss
    summary = summarize(params, new_params, specs, losses)
    return Compressed(new_params, masks, qarrays, losses, specs, summary)


def summarize(params, new_params, specs: Mapping[str, LayerSpec], losses=None) -> dict[str, Any]:
    """Flat '/'-keyed summary: per layer size, sparsity, bits, theoretical bits and loss; totals.

    The theoretical size of a layer counts its kept weights at their bit-width (32 when not
    quantized), the cost model of OBC; biases and other leaves count at 32 bits.
    """
    losses = losses or {}
    new = find_layers(new_params)
    out: dict[str, Any] = {}
    total_params = 0
    dense_bits = 0
    comp_bits = 0
    for path, k in new.items():
        kn = np.asarray(k)
        n = kn.size
        spec = specs.get(path)
        bits = spec.quant.bits if (spec is not None and spec.quant is not None) else 32
        nz = int(np.count_nonzero(kn)) if (spec is not None and spec.prune is not None) else n
        out[f"{path}/params"] = n
        out[f"{path}/sparsity"] = 1.0 - nz / n
        out[f"{path}/bits"] = bits
        out[f"{path}/size_bits"] = nz * bits
        out[f"{path}/spec"] = spec.name if spec is not None else "dense"
        if path in losses:
            out[f"{path}/loss"] = float(losses[path])
        total_params += n
        dense_bits += 32 * n
        comp_bits += nz * bits
    other = sum(np.size(x) for x in jax.tree.leaves(new_params)) - total_params
    out["total/params"] = total_params + other
    out["total/dense_bits"] = dense_bits + 32 * other
    out["total/size_bits"] = comp_bits + 32 * other
    out["total/compression"] = out["total/dense_bits"] / max(out["total/size_bits"], 1)
    out["total/loss"] = float(sum(losses.values()))
    return out


def prune_levels(
    params,
    stats: Mapping[str, Any],
    sparsities: Sequence[float],
    *,
    rules: Sequence[tuple[str, Any]] = ((".*", True),),
    solver: str = "obc",
    rel_damp: float = 0.01,
    method: str = "auto",
    dead_inputs: str = "zero",
) -> list[Any]:
    """Params pruned to each of several unstructured sparsities, one elimination pass per layer.

    OBC's database idea: ExactOBS eliminates every row once and any number of levels is rebuilt
    from the recorded orders, so a whole sweep costs little more than one level.

    Args:
      rules: which layers to prune (a value of None leaves a layer dense).
      solver: ``"obc"`` (ExactOBS) or ``"magnitude"``.
      dead_inputs: as in :func:`compress` (``"obc"`` only; magnitude pruning ignores ``H``).

    Returns:
      One params pytree per sparsity.
    """
    from obcjax.rules import match_rules

    _check_dead_inputs(dead_inputs, "prune_levels")
    layers = find_layers(params)
    chosen = {
        p: v
        for p, v in match_rules(list(layers), list(rules), what="layer").items()
        if v is not None
    }
    if solver not in ("obc", "magnitude"):
        raise ValueError(f"prune_levels: solver must be 'obc' or 'magnitude', got {solver!r}")
    levels = [float(x) for x in sparsities]
    out = [params for _ in levels]
    for path in chosen:
        kernel = jnp.asarray(layers[path])
        H, mats = _layer_problem(path, kernel, stats[path], dead_inputs, "prune_levels: ")
        G = H.shape[0]
        per_level = None
        if G > 1:
            per_level = _prune_levels_groups(mats, H, levels, solver, rel_damp, method, path)
        if per_level is None:
            per_level = [[] for _ in levels]
            for g in range(G):
                name = path if G == 1 else f"{path}[group {g}]"
                r = _levels_one(mats[g], H[g], levels, solver, rel_damp, method, name)
                for lv, w in enumerate(r.weights):
                    per_level[lv].append(np.asarray(w))
        for lv in range(len(levels)):
            k = _group_kernel(np.stack(per_level[lv]), kernel.shape, kernel.dtype)
            out[lv] = _set_path(out[lv], path, "kernel", k)
    return out


def _levels_one(W, H, levels, solver, rel_damp, method, layer):
    if solver == "obc":
        return K.exactobs_prune(W, H, list(levels), rel_damp=rel_damp, method=method, layer=layer)
    return K.Result(
        jnp.stack([K.magnitude_prune(W, s, layer=layer).weights for s in levels]),
        None, None, jnp.zeros((len(levels),)), jnp.zeros((len(levels), W.shape[0])),
        jnp.asarray(K.Status.OK, jnp.int32),
    )


def _prune_levels_groups(W, H, levels, solver, rel_damp, method, path):
    """prune_levels of every group at once: ``[level][group] -> (rows, cols)``."""
    levels = tuple(float(Unstructured(s).sparsity) for s in levels)
    fn = functools.partial(_levels_one, levels=levels, solver=solver, rel_damp=rel_damp,
                           method=method, layer="<group>")
    res = _map_groups(fn, ("levels", levels, solver, rel_damp, method), W, H)
    _check_groups(res.status, path, W, H)
    return [list(res.weights[:, lv]) for lv in range(len(levels))]
