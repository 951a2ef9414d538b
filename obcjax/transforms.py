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
from obcjax.kernels import _engine as KE
from obcjax.kernels import exactobs as KX
from obcjax.kernels import gptq as KG
from obcjax.kernels import sparsegpt as KS
from obcjax.kernels.prepare import _damped_inverse, _fix_dead, blas_one_thread
from obcjax.quant import QArray, expand_params, find_params, make_qarray, quantize
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
    p, q = spec.prune, spec.quant
    kw = dict(rel_damp=rel_damp, layer=layer)
    if p is not None:
        check_fits(p, W.shape[1], layer)
    if q is not None:
        check_fits(q, W.shape[1], layer)
    if spec.solver == "magnitude":
        if p is None:
            return K.rtn_quantize(W, q, H=H, **kw)
        if isinstance(p, Unstructured):
            r = K.magnitude_prune(W, p.sparsity, H=H, **kw)
        elif isinstance(p, NM):
            r = K.magnitude_nm(W, p.n, p.m, H=H, **kw)
        else:
            raise ValueError(f"layer {layer!r}: magnitude baseline has no block pruning")
        if q is None:
            return r
        rq = K.rtn_quantize(r.weights, q, H=H, **kw)
        P = K.prepare(W, H, **kw)
        Wq = jnp.where(r.mask, rq.weights, 0.0)
        loss = K.layer_loss(P.W, Wq, P.H)
        D = Wq - P.W
        row = 0.5 * jnp.sum(jnp.matmul(D, P.H, precision="highest") * D, axis=1)
        return K.Result(Wq, r.mask, rq.qarray, loss, row)
    if spec.solver == "gptq":
        if p is None:
            return K.gptq_quantize(W, H, q, **kw)
        if isinstance(p, Block):
            raise ValueError(f"layer {layer!r}: SparseGPT has no block pruning; use solver='obc'")
        return K.sparsegpt_prune(W, H, p, quant=q, **kw)
    kw["method"] = method
    if p is None:
        return K.obq_quantize(W, H, q, **kw)
    if q is not None:
        return K.obq_prune_quantize(W, H, p, q, **kw)
    if isinstance(p, Unstructured):
        return K.exactobs_prune(W, H, p.sparsity, **kw)
    if isinstance(p, NM):
        return K.exactobs_nm(W, H, p.n, p.m, **kw)
    return K.exactobs_block(W, H, p.sparsity, p.size, **kw)


# ------------------------------------------------------------------------------ group batching
#
# The kernels' public entry points check inputs on the host and loop over damping retries, so
# they cannot be vmapped; their compiled pieces can. The functions below replay each kernel's
# recipe with those pieces vmapped over a leading group axis. Where a kernel would branch on the
# data (a check that fails, a damping retry, a failed factorisation) the group is flagged and
# solved again by the kernel itself, so errors and retries are the kernels' own.

_GROUP_BYTES = 1 << 28  # working set of one chunk of groups
_GROUP_CHUNK = 512  # most groups per compiled call (chunks are powers of two: few compilations)
_BLOCKSIZE = 128  # the GPTQ / SparseGPT default block, as the per-matrix calls use it


class _Groups(NamedTuple):
    """Per-group results stacked on a leading axis (NumPy), ``ok[g]`` False = redo group g."""

    weights: np.ndarray  # (G, rows, cols)
    mask: np.ndarray | None  # (G, rows, cols) bool
    qarray: Any  # QArray with (G, ...) leaves, or None
    loss: np.ndarray  # (G,)
    ok: np.ndarray  # (G,) bool


def _map_groups(fn, arrays, per_group_bytes: int):
    """``fn`` (vmapped over axis 0 of every leaf of ``arrays``) in chunks of groups.

    Chunks have a power-of-two size (the last one padded by repeating the last group, whose
    duplicate results are dropped) so that layers of different widths share compilations.
    """
    G = jax.tree.leaves(arrays)[0].shape[0]
    cap = max(1, min(_GROUP_CHUNK, _GROUP_BYTES // max(int(per_group_bytes), 1)))
    gc = min(1 << (cap.bit_length() - 1), 1 << (G - 1).bit_length())
    outs = []
    for s in range(0, G, gc):
        idx = np.minimum(np.arange(s, s + gc), G - 1)
        chunk = arrays if gc == G else jax.tree.map(lambda a, idx=idx: a[idx], arrays)
        outs.append(jax.tree.map(np.asarray, fn(chunk)))
    return jax.tree.map(lambda *xs: np.concatenate(xs)[:G], *outs)


@jax.jit
def _prep_checks(W, H):
    """check_inputs' finiteness / symmetry tests and _fix_dead, for one group."""
    finite = jnp.all(jnp.isfinite(W)) & jnp.all(jnp.isfinite(H))
    scale = jnp.max(jnp.abs(H))
    asym = jnp.max(jnp.abs(H - H.T))
    W, H, dead = _fix_dead(W, H)
    return W, H, finite, scale, asym, jnp.mean(jnp.diag(H))


_prep_checks_g = jax.jit(jax.vmap(_prep_checks))
_damped_inverse_g = jax.jit(jax.vmap(_damped_inverse))


def _prepare_groups(W, H, rel_damp: float):
    """``K.prepare`` of every group: ``(W, Hd, Hinv, ok)``; ``ok`` False where the kernel would
    raise or retry with more damping (those groups are redone by the kernel)."""
    if not (rel_damp >= 0 and np.isfinite(rel_damp)):
        return None  # the kernel raises the error
    G, _, cols = W.shape
    bytes_ = 4 * (2 * cols * cols + W.shape[1] * cols)
    Wp, Hp, finite, scale, asym, mean_diag = _map_groups(
        lambda a: _prep_checks_g(*a), (W, H), bytes_
    )
    tol = 1e-4  # check_inputs' float32 tolerance
    ok = finite & (asym.astype(np.float64) <= tol * np.maximum(scale.astype(np.float64), 1e-30))
    ok &= mean_diag > 0
    # the kernel multiplies in Python floats, then casts to the Hessian's dtype
    damp = (rel_damp * mean_diag.astype(np.float64)).astype(np.float32)
    Hd, Hinv, inv_ok = _map_groups(lambda a: _damped_inverse_g(*a), (Hp, damp), 3 * bytes_)
    return Wp, Hd, Hinv, ok & inv_ok


@functools.partial(jax.jit, static_argnames=("spec",))
def _grid_g(W, spec: Int):
    return jax.vmap(lambda w: find_params(w, spec))(W)


@functools.partial(jax.jit, static_argnames=("spec",))
def _qarray_g(Wq, scale, zero, spec: Int):
    return jax.vmap(lambda w, s, z: make_qarray(w, s, z, spec))(Wq, scale, zero)


@jax.jit
def _loss_g(W0, What, H):
    D = What - W0
    row = 0.5 * jnp.sum(jnp.matmul(D, H, precision="highest") * D, axis=-1)
    return jax.vmap(K.layer_loss)(W0, What, H), row


def _split_qarray(qa, G: int) -> list[QArray]:
    codes, scale, zero = (np.asarray(x) for x in (qa.codes, qa.scale, qa.zero))
    return [
        QArray(
            jnp.asarray(codes[g]),
            jnp.asarray(scale[g]),
            jnp.asarray(zero[g]),
            qa.bits,
            qa.group_size,
        )
        for g in range(G)
    ]


# --- magnitude / round-to-nearest (kernels/baselines.py) ---


def _rtn_g(W, spec: Int):
    scale, zero = _grid_g(jnp.asarray(W), spec)
    s, z = jax.vmap(lambda a, b: expand_params(a, b, W.shape[-1]))(scale, zero)
    Wq = quantize(jnp.asarray(W), s, z, spec.bits)
    return np.asarray(Wq), _qarray_g(Wq, scale, zero, spec)


def _magnitude_mask_g(W, p) -> np.ndarray:
    G, rows, cols = W.shape
    a = np.abs(W)
    if isinstance(p, Unstructured):
        k = int(math.floor(p.sparsity * rows * cols + 0.5))
        idx = np.argsort(a.reshape(G, -1), axis=1, kind="stable")[:, :k]
        mask = np.ones((G, rows * cols), bool)
        np.put_along_axis(mask, idx, False, axis=1)
        return mask.reshape(W.shape)
    g = a.reshape(G, rows, cols // p.m, p.m)
    ranks = np.argsort(np.argsort(g, axis=-1, kind="stable"), axis=-1, kind="stable")
    return (ranks >= p.n).reshape(W.shape)


def _magnitude_g(W, Hd, spec: LayerSpec):
    p, q = spec.prune, spec.quant
    mask = None
    What = W
    qa = None
    if p is not None:
        mask = _magnitude_mask_g(W, p)
        What = np.where(mask, W, 0.0).astype(W.dtype)
    if q is not None:
        # rtn_quantize prepares its input again: dead columns are already zero, so the grid is
        # found on ``What`` itself; 0 is on every grid, so pruned entries stay 0
        Wq, qa = _rtn_g(What, q)
        What = Wq if mask is None else np.where(mask, Wq, 0.0).astype(W.dtype)
    loss, _ = _loss_g(jnp.asarray(W), jnp.asarray(What), Hd)
    return What, mask, qa, np.asarray(loss)


# --- GPTQ / SparseGPT (kernels/gptq.py, kernels/sparsegpt.py) ---


@functools.partial(jax.jit, static_argnames=("plan",))
def _sweep_g(W, U, stab, ztab, gidx, kblock, plan):
    run = functools.partial(KG.sweep, plan=plan)
    return jax.vmap(run, in_axes=(0, 0, 0, 0, None, None))(W, U, stab, ztab, gidx, kblock)


@functools.partial(jax.jit, static_argnames=("n",))
def _factor_pad_g(W, Hinv, n):
    """Upper Cholesky factor of each ``Hinv`` (natural order); W and U padded to ``n`` columns
    (zero weights, identity rows of U) as ``pad_problem`` does."""
    G, rows, cols = W.shape
    U, ok = jax.vmap(KG.cholesky_upper_inverse, in_axes=(0, None))(
        Hinv, jnp.arange(cols, dtype=jnp.int32)
    )
    Wp = jnp.zeros((G, rows, n), W.dtype).at[:, :, :cols].set(W)
    Up = jnp.broadcast_to(jnp.eye(n, dtype=U.dtype), (G, n, n)).at[:, :cols, :cols].set(U)
    return Wp, Up, ok


def _sweep_groups(W, Hinv, spec: LayerSpec):
    """GPTQ (quantization only) or SparseGPT (pruning, optionally + quantization) per group."""
    G, rows, cols = W.shape
    p, q = spec.prune, spec.quant
    dtype = W.dtype
    if p is None:  # gptq_quantize, natural order, dynamic groups for group-wise grids
        dynamic = q.granularity == "group"
        unit = q.group_size if dynamic else 1
        block, sub = KG.plan_sizes(_BLOCKSIZE, unit, keep_block=False)
        mode, nm_n = "none", 0
    elif isinstance(p, NM):
        dynamic = False
        block, sub = KG.plan_sizes(_BLOCKSIZE, p.m, keep_block=False)
        unit, mode, nm_n = p.m, "nm", p.n
    else:
        dynamic = False
        block, sub = KG.plan_sizes(_BLOCKSIZE, 1, keep_block=True)
        unit, mode, nm_n = 1, "unstructured", 0
    n = KG.round_up(cols, block)
    if mode == "unstructured":
        kblock = KS.block_counts(p.sparsity, rows, cols, block)
    else:
        kblock = np.zeros((n // block,), np.int32)
    Wj = jnp.asarray(W)
    scale = zero = None
    if dynamic:
        stab = jnp.ones((G, rows, n // q.group_size), dtype)
        ztab = jnp.zeros((G, rows, n // q.group_size), dtype)
        gidx = np.arange(n) // q.group_size
    elif q is not None:
        scale, zero = _grid_g(Wj, q)
        ng = scale.shape[-1]
        stab = jnp.concatenate([scale, jnp.ones((G, rows, 1), dtype)], axis=-1)
        ztab = jnp.concatenate([zero, jnp.zeros((G, rows, 1), dtype)], axis=-1)
        gidx = np.concatenate([np.arange(cols) // (cols // ng), np.full(n - cols, ng)])
    else:
        stab = jnp.ones((G, rows, 1), dtype)
        ztab = jnp.zeros((G, rows, 1), dtype)
        gidx = np.zeros((n,), np.int64)
    plan = KG.Sweep(
        cols=cols,
        block=block,
        sub=sub,
        unit=unit,
        bits=None if q is None else q.bits,
        dyn_spec=q if dynamic else None,
        prune=mode,
        nm_n=nm_n,
    )
    gidx = jnp.asarray(gidx, jnp.int32)
    kblock = jnp.asarray(kblock, jnp.int32)

    def run(a):
        Wg, Hg, sg, zg = a
        Wp, Up, ok = _factor_pad_g(Wg, Hg, n)
        Wf, keep, row_loss, sg, zg = _sweep_g(Wp, Up, sg, zg, gidx, kblock, plan)
        return Wf[:, :, :cols], keep[:, :, :cols], jnp.sum(row_loss, axis=-1), sg, zg, ok

    bytes_ = 4 * (3 * n * n + 4 * rows * n)
    Wf, keep, loss, stab, ztab, ok = _map_groups(run, (Wj, jnp.asarray(Hinv), stab, ztab), bytes_)
    qa = None
    if q is not None:
        if dynamic:
            ng = cols // q.group_size
            scale, zero = jnp.asarray(stab[..., :ng]), jnp.asarray(ztab[..., :ng])
        qa = _qarray_g(jnp.asarray(Wf), scale, zero, q)
    return Wf, (keep if p is not None else None), qa, loss, ok


# --- ExactOBS / OBQ (kernels/exactobs.py) ---


@functools.partial(jax.jit, static_argnames=("rule", "nsteps", "method", "chunk"))
def _greedy_g(W, Hinv, attrs, rule, nsteps, method, chunk):
    run = lambda w, h, a: KX._greedy_jit(w, h, a, rule, nsteps, method, chunk, None, None)
    return jax.vmap(run)(W, Hinv, attrs)


@functools.partial(jax.jit, static_argnames=("chunk",))
def _rebuild_chol_g(W, Hinv, perm, counts, chunk):
    """``rebuild_levels`` (all levels, one Cholesky per row) of every group.

    Args: ``W (G, rows, cols)``, ``Hinv (G, cols, cols)``, ``perm (G, rows, cols)``,
    ``counts (G, L, rows)``. Returns ``(G, L, rows, cols)`` weights, ``(G, L, rows)`` losses.
    """
    run = lambda w, h, p, c: KX._rebuild_chol(w, h, p, c.T, chunk)  # counts (rows, L) per group
    wl, rl = jax.vmap(run)(W, Hinv, perm, counts)  # (G, rows, L, cols), (G, rows, L)
    return jnp.swapaxes(wl, 1, 2), jnp.swapaxes(rl, 1, 2)


def _engine_g(W, Hinv, attrs, rule, nsteps: int, method: str):
    G, rows, cols = W.shape
    m = KX._resolve(method, cols)
    ch = KX._engine_chunk(rows, cols, nsteps, method, 4, None, KX.DEFAULT_MEMORY_BYTES)
    bytes_ = ch * KX._engine_bytes(cols, nsteps, m, 4) + 4 * (cols * cols + 3 * rows * cols)
    return _map_groups(lambda a: _greedy_g(*a, rule, nsteps, m, ch), (W, Hinv, attrs), bytes_)


def _exactobs_levels_g(W, Hinv, levels: Sequence[float], method: str):
    """exactobs_prune of every group for the sparsities ``levels``: (L, G, ...) weights, masks,
    losses. Every row is eliminated to the end (the kernel may stop early, with the same counts)."""
    G, rows, cols = W.shape
    order, _, losses, _ = _engine_g(W, Hinv, {}, KE.PruneRule(), cols, method)
    ks = [int(math.floor(s * rows * cols + 0.5)) for s in levels]
    counts = np.stack([KX.allocate_counts(losses[g], ks) for g in range(G)])  # (G, L, rows)
    L = len(levels)
    ch = KX._chunk(rows, (3 * cols * cols + 2 * L * cols) * 4, None, KX.DEFAULT_MEMORY_BYTES)
    bytes_ = ch * (3 * cols * cols + 2 * L * cols) * 4 + 4 * (cols * cols + 2 * L * rows * cols)
    weights, row_loss = _map_groups(
        lambda a: _rebuild_chol_g(*a, chunk=ch),
        (jnp.asarray(W), jnp.asarray(Hinv), jnp.asarray(order, jnp.int32), jnp.asarray(counts)),
        bytes_,
    )  # (G, L, rows, cols), (G, L, rows)
    t = np.arange(cols)
    masks = np.ones((G, L, rows, cols), bool)
    for lv in range(L):
        pruned = t[None, None, :] < counts[:, lv, :, None]
        np.put_along_axis(masks[:, lv], order, ~pruned, axis=2)
    weights = np.where(masks, weights, 0.0).astype(W.dtype)
    return weights.swapaxes(0, 1), masks.swapaxes(0, 1), row_loss.swapaxes(0, 1)


def _obc_g(W, Hinv, spec: LayerSpec, method: str):
    G, rows, cols = W.shape
    p, q = spec.prune, spec.quant
    mask = None
    row_loss = np.zeros((G, rows), W.dtype)
    base = W
    if isinstance(p, Unstructured):
        w, m, rl = _exactobs_levels_g(W, Hinv, [p.sparsity], method)
        base, mask, row_loss = w[0], m[0], rl[0]
    elif isinstance(p, NM):
        nsteps = cols * p.n // p.m
        order, _, losses, Wf = _engine_g(W, Hinv, {}, KE.NMRule(p.n, p.m), nsteps, method)
        mask = np.ones((G, rows, cols), bool)
        np.put_along_axis(mask, order, False, axis=2)
        base = np.where(mask, Wf, 0.0).astype(W.dtype)
        row_loss = losses.sum(axis=-1)
    if q is None:
        return base, mask, None, row_loss.sum(axis=-1)
    scale, zero = _grid_g(jnp.asarray(base), q)
    s, z = jax.vmap(lambda a, b: expand_params(a, b, cols))(scale, zero)
    attrs = {"scale": s.astype(W.dtype), "zero": z.astype(W.dtype)}
    if mask is not None:
        attrs["pre"] = jnp.asarray(~mask)
    rule = KE.QuantRule(q.bits, True, "greedy", has_pre=mask is not None)
    _, _, losses, Wq = _engine_g(jnp.asarray(base), Hinv, attrs, rule, cols, method)
    if mask is not None:
        Wq = np.where(mask, Wq, 0.0).astype(W.dtype)
    qa = _qarray_g(jnp.asarray(Wq), scale, zero, q)
    return Wq, mask, qa, (row_loss + losses.sum(axis=-1)).sum(axis=-1)


def _batchable(spec: LayerSpec) -> bool:
    return not isinstance(spec.prune, Block)


def _solve_groups(W, H, spec: LayerSpec, *, rel_damp, method, path) -> _Groups | None:
    """Every group of a layer at once; None where this spec has no batched form.

    Args:
      W: ``(G, rows, cols)`` float32. H: ``(G, cols, cols)``.
    """
    if not _batchable(spec):
        return None
    G, rows, cols = W.shape
    for s in (spec.prune, spec.quant):
        if s is not None:  # the same for every group: the kernel's message for group 0
            check_fits(s, cols, f"{path}[group 0]")
    if spec.solver == "obc":
        KX._resolve(method, cols)  # raises on a bad method, as the kernels do
    # the many small factorizations run best on one BLAS thread (see blas_one_thread)
    with blas_one_thread():
        return _solve_groups_prepared(W, H, spec, rel_damp=rel_damp, method=method)


def _solve_groups_prepared(W, H, spec: LayerSpec, *, rel_damp, method) -> _Groups | None:
    prep = _prepare_groups(W, H, rel_damp)
    if prep is None:
        return None
    Wp, Hd, Hinv, ok = prep
    if spec.solver == "magnitude":
        What, mask, qa, loss = _magnitude_g(Wp, jnp.asarray(Hd), spec)
    elif spec.solver == "gptq":
        What, mask, qa, loss, ok2 = _sweep_groups(Wp, Hinv, spec)
        ok = ok & ok2
    else:
        What, mask, qa, loss = _obc_g(Wp, Hinv, spec, method)
    return _Groups(np.asarray(What), mask, qa, np.asarray(loss), np.asarray(ok))


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
      rel_damp: relative damping of every Hessian. method: ``"fast"`` or ``"naive"`` engine.
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
        if res is None:
            res = _Groups(None, None, None, None, np.zeros((G,), bool))
        outs, ms, qs, loss = [], [], [], 0.0
        qlist = _split_qarray(res.qarray, G) if res.qarray is not None else None
        for g in range(G):
            if res.ok[g]:
                outs.append(res.weights[g])
                ms.append(None if res.mask is None else res.mask[g])
                qs.append(None if qlist is None else qlist[g])
                loss += float(res.loss[g])
                continue
            name = path if G == 1 else f"{path}[group {g}]"
            r = _solve(mats[g], H[g], spec, layer=name, **kw)
            outs.append(np.asarray(r.weights))
            ms.append(None if r.mask is None else np.asarray(r.mask))
            qs.append(r.qarray)
            loss += float(r.loss)
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
                for lv, w in enumerate(
                    _levels_one(mats[g], H[g], levels, solver, rel_damp, method, name)
                ):
                    per_level[lv].append(np.asarray(w))
        for lv in range(len(levels)):
            k = _group_kernel(np.stack(per_level[lv]), kernel.shape, kernel.dtype)
            out[lv] = _set_path(out[lv], path, "kernel", k)
    return out


def _levels_one(W, H, levels, solver, rel_damp, method, layer):
    if solver == "obc":
        r = K.exactobs_prune(W, H, levels, rel_damp=rel_damp, method=method, layer=layer)
        return list(r.weights)
    return [K.magnitude_prune(W, s, layer=layer).weights for s in levels]


def _prune_levels_groups(W, H, levels, solver, rel_damp, method, path):
    """prune_levels of every group at once: ``[level][group] -> (rows, cols)``, or None."""
    G, rows, cols = W.shape
    try:
        [Unstructured(s) for s in levels]
    except (TypeError, ValueError):
        return None  # the per-group path reports it in the kernels' words
    if not levels:
        return None
    if solver == "magnitude":
        Wn = np.asarray(W)
        if not np.all(np.isfinite(Wn)):
            return None
        return [list(np.where(_magnitude_mask_g(Wn, Unstructured(s)), Wn, 0.0)) for s in levels]
    KX._resolve(method, cols)
    with blas_one_thread():
        prep = _prepare_groups(W, H, rel_damp)
        if prep is None:
            return None
        Wp, _, Hinv, ok = prep
        weights, _, _ = _exactobs_levels_g(Wp, Hinv, levels, method)  # (L, G, rows, cols)
    per_level = [list(weights[lv]) for lv in range(len(levels))]
    for g in np.nonzero(~ok)[0]:
        for lv, w in enumerate(
            _levels_one(W[g], H[g], levels, solver, rel_damp, method, f"{path}[group {g}]")
        ):
            per_level[lv][g] = np.asarray(w)
    return per_level
