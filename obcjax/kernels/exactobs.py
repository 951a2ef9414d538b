"""ExactOBS pruning and OBQ quantization (Frantar, Singh, Alistarh, NeurIPS 2022).

Every solver takes ``W: (rows, cols)`` (out × in) and the layer Hessian ``H: (cols, cols)`` and
returns a :class:`Result`. The layer loss decouples over rows, so each row runs its own exact
greedy Optimal Brain Surgeon / Quantizer elimination (``_engine``); rows are vmapped in chunks
sized from a memory budget and never looped over in Python.

Unstructured pruning follows OBC's layer-wise allocation: every row is eliminated to the end
once, recording its pivot order and step losses; the step losses of all rows are ranked together
(on each row's running maximum, so every row's selection is a prefix of its own order), and a
target sparsity gives each row its own count. The weights of any level are then rebuilt exactly
from the order alone (no per-step weight traces are stored):

* many levels: one Cholesky factor ``U`` of ``Hinv`` permuted into the row's pivot order gives
  ``e = U⁻ᵀ w`` and every level ``w(n) = w - e[:n] U[:n]`` (a GEMM over levels);
* one or two levels: a solve with ``Hinv[S, S]`` for the pruned set ``S`` only:
  ``w' = w - Hinv[:, S] Hinv[S, S]⁻¹ w_S``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.kernels._engine import AUTO_FAST_COLS, NMRule, PruneRule, QuantRule, run_rows
from obcjax.kernels.prepare import (
    Prepared,
    _real_array,
    blas_one_thread,
    is_traced,
    matrix_cols,
    prepare_solver_units,
    to_solver_units,
)
from obcjax.quant import QArray, expand_params, find_params, make_qarray
from obcjax.specs import NM, Block, Int, Unstructured, as_prune, as_quant, check_fits

__all__ = [
    "Result",
    "exactobs_prune",
    "exactobs_nm",
    "exactobs_block",
    "obq_quantize",
    "obq_prune_quantize",
    "elimination_order",
    "allocate_counts",
    "rebuild_levels",
    "DEFAULT_MEMORY_BYTES",
    "allocate_counts_traced",
    "setup",
    "finish",
    "run_staged",
]

_HP = jax.lax.Precision.HIGHEST
DEFAULT_MEMORY_BYTES = 1 << 29  # working set of one chunk of rows (naive kernel, rebuilds)
# The fast kernel re-reads each row's factor rows every step: it runs best when the chunk's factor
# buffers stay in the last-level cache (measured on 2 EPYC cores: 8 rows at 576 columns, 4 at 1152,
# 1 at 2304 were the fastest chunks).
CACHE_BYTES = 24 << 20


class Result(NamedTuple):
    """Output of every solver.

    Attributes:
      weights: ``(rows, cols)``, or ``(L, rows, cols)`` for a list of levels.
      mask: bool, same shape as ``weights``, True where a weight is kept; None for quantizers.
      qarray: the integer codes for quantizing solvers, else None.
      loss: ``()`` or ``(L,)``: the OBS loss estimate, ``0.5·tr((W-Ŵ) H (W-Ŵ)ᵀ)`` with the
        prepared ``W`` and ``H``.
      row_loss: ``(rows,)`` or ``(L, rows)``.
      status: ``()`` int32 :class:`obcjax.kernels.Status` (``OK`` or ``DAMPING_RAISED`` for a
        usable result). Host calls raise instead of returning a bad status; inside ``jit`` /
        ``vmap`` / ``shard_map`` read it.
      damp: the absolute damping that was added to the diagonal of ``H``.
    """

    weights: jax.Array
    mask: jax.Array | None
    qarray: QArray | None
    loss: jax.Array
    row_loss: jax.Array
    status: jax.Array | None = None
    damp: jax.Array | None = None


def setup(W, H, rel_damp, layer, prepared):
    """``(P, out_dtype)``: the problem in solver units (see :mod:`obcjax.kernels.prepare`).

    Shapes are checked (statically, also under a trace); outside a trace a bad status raises the
    error that names ``layer``. ``prepared`` (a :class:`Prepared` in caller units) skips the work.
    """
    Wa = jnp.asarray(_real_array(W, "W", layer))
    out = Wa.dtype if jnp.issubdtype(Wa.dtype, jnp.floating) else jnp.float32
    if prepared is not None:
        return to_solver_units(prepared), out
    return prepare_solver_units(Wa, H, rel_damp, layer), out


def finish(res: Result, P: Prepared, out_dtype) -> Result:
    """A solver-units :class:`Result` in the caller's units and dtype, with status and damping.

    The scales are powers of two, so this is exact: a quantized result still equals
    ``qarray.dequantize()`` bit for bit.
    """
    s, h = P.w_scale, P.h_scale
    qa = res.qarray
    if qa is not None:
        qa = qa._replace(scale=qa.scale * s.astype(qa.scale.dtype))
    weights = (res.weights * s).astype(out_dtype)
    status = P.status if res.status is None else res.status
    return Result(weights, res.mask, qa, res.loss * (s * s * h), res.row_loss * (s * s * h),
                  status, P.damp * h)


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("body", "opts", "out_dtype"))
def _staged(P, extra, body, opts, out_dtype):
    """``finish(body(P, *extra, **opts))`` as one compiled program.

    On the host, the bookkeeping around the engine (masks, codes, unit conversion) would
    otherwise run as a dozen small eagerly compiled programs (about 1.3 s of a first call at
    256x576 on 2 CPU cores). ``body`` is a module-level function and ``opts`` a sorted tuple of
    hashable ``(name, value)`` pairs, so one (shape, options) compiles once.
    """
    return finish(body(P, *extra, **dict(opts)), P, out_dtype)


def run_staged(P, body, out_dtype, *extra, **opts):
    """``finish(body(P, *extra, **opts))`` as one compiled program per (shapes, body, options).

    Args:
      P: a :class:`Prepared` in solver units (from :func:`setup`).
      body: a module-level solver body ``body(P, *extra, **opts) -> Result`` (solver units).
      out_dtype: the dtype of the returned weights.
      *extra: further array arguments of ``body``.
      **opts: static, hashable options of ``body``.

    Returns:
      The :class:`Result` in the caller's units (see :func:`finish`).
    """
    return _staged(P, extra, body, tuple(sorted(opts.items())), jnp.dtype(out_dtype))


def _engine_chunk(rows, cols, nsteps, method, item, chunk_rows, memory_bytes):
    method = _resolve(method, cols)
    if method in ("fast", "blocked") and chunk_rows is None:
        memory_bytes = min(memory_bytes, CACHE_BYTES)
    return _chunk(rows, _engine_bytes(cols, nsteps, method, item), chunk_rows, memory_bytes)


def _chunk(rows: int, per_row_bytes: int, chunk_rows: int | None, memory_bytes: int) -> int:
    if chunk_rows is not None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
        return min(int(chunk_rows), rows)
    return int(max(1, min(rows, memory_bytes // max(per_row_bytes, 1))))


def _resolve(method: str, cols: int) -> str:
    if method == "auto":
        return "blocked" if cols >= AUTO_FAST_COLS else "naive"
    if method not in ("fast", "blocked", "naive"):
        raise ValueError(f"method must be 'auto', 'fast', 'blocked' or 'naive', got {method!r}")
    return method


def _engine_bytes(cols: int, nsteps: int, method: str, itemsize: int) -> int:
    if method in ("naive", "blocked"):
        return 3 * cols * cols * itemsize
    return nsteps * cols * itemsize + 16 * cols * itemsize


@functools.partial(jax.jit, static_argnames=("rule", "nsteps", "method", "chunk", "mesh", "axis"))
def _greedy_jit(W, Hinv, cols_attr, rule, nsteps, method, chunk, mesh, axis):
    run = lambda W, Hinv, a: run_rows(W, Hinv, a, rule, nsteps, method=method, chunk=chunk)
    if mesh is None:
        return run(W, Hinv, cols_attr)
    from jax.sharding import PartitionSpec as PS

    rows_spec = PS(axis)
    attr_spec = jax.tree.map(lambda _: rows_spec, cols_attr)
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(rows_spec, PS(), attr_spec),
        out_specs=rows_spec,
        check_vma=False,
    )(W, Hinv, cols_attr)


def _greedy(W, Hinv, cols_attr, rule, nsteps, method, chunk, mesh=None, axis=None):
    """Run the engine on all rows; with a ``mesh``, rows are split over its ``axis`` devices."""
    if mesh is None:
        return _greedy_jit(W, Hinv, cols_attr, rule, nsteps, method, chunk, None, None)
    axis = axis or mesh.axis_names[0]
    ndev = mesh.shape[axis]
    rows = W.shape[0]
    pad = (-rows) % ndev
    if pad:
        W = jnp.concatenate([W, jnp.zeros((pad, W.shape[1]), W.dtype)])
        cols_attr = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), cols_attr
        )
    chunk = max(1, min(chunk, W.shape[0] // ndev))
    out = _greedy_jit(W, Hinv, cols_attr, rule, nsteps, method, chunk, mesh, axis)
    return jax.tree.map(lambda a: a[:rows], out)


def _sparsity_list(sparsity, layer: str | None = None) -> tuple[list[float], bool]:
    where = f"layer {layer!r}: " if layer else ""
    if is_traced(sparsity):
        raise TypeError(f"{where}sparsity must be a static number (it sets shapes), not a traced "
                        "array; pass it as a static argument of jit")
    try:
        if isinstance(sparsity, str) or np.ndim(sparsity) == 0:
            items, single = [sparsity], True
        else:
            items, single = list(sparsity), False
        levels = [
            as_prune(s, what="sparsity", layer=layer).sparsity if isinstance(s, str) else float(s)
            for s in items
        ]
    except (TypeError, ValueError) as e:
        if str(e).startswith(where) and where:
            raise ValueError(str(e)) from None
        raise ValueError(
            f"{where}sparsity must be a fraction of zeros in [0, 1) or a list of them, got "
            f"{sparsity!r}"
        ) from None
    if not levels:
        raise ValueError(f"{where}sparsity: an empty list of levels was given")
    for s in levels:
        if not (0.0 <= s < 1.0):
            raise ValueError(f"{where}sparsity must lie in [0, 1), got {s}")
    return levels, single


def _count(s: float, total: int) -> int:
    return int(math.floor(s * total + 0.5))


def allocate_counts(losses: np.ndarray, ks: Sequence[int]) -> np.ndarray:
    """OBC's layer-wise allocation of eliminations to rows.

    Args:
      losses: ``(rows, nsteps)`` step losses of each row's greedy elimination.
      ks: total number of eliminations wanted for each level.

    Returns:
      ``(L, rows)`` int counts ``n_i``: row ``i`` keeps its first ``n_i`` eliminations. Ranking uses
      each row's running maximum, so selections are prefixes; ties go to the earlier row-major entry.
    """
    losses = np.asarray(losses, np.float64)
    rows, n = losses.shape
    env = np.maximum.accumulate(losses, axis=1)
    order = np.argsort(env.ravel(), kind="stable")
    rowid = order // n
    return np.stack([np.bincount(rowid[: int(k)], minlength=rows) for k in ks]).astype(np.int32)


def _over_rows(run, mesh, W, Hinv, *per_row):
    """``run(W, Hinv, *per_row)``, with rows split over the mesh's first axis when one is given."""
    if mesh is None:
        return run(W, Hinv, *per_row)
    from jax.sharding import PartitionSpec as PS

    rows_spec = PS(mesh.axis_names[0])
    return jax.shard_map(
        run,
        mesh=mesh,
        in_specs=(rows_spec, PS(), *(rows_spec,) * len(per_row)),
        out_specs=rows_spec,
        check_vma=False,
    )(W, Hinv, *per_row)


def _pad_rows(W, perm, counts, ndev: int):
    """``(W, perm, counts, pad)`` with rows padded to a multiple of ``ndev`` (zero weights,
    identity order, no eliminations); ``counts (L, rows)`` stays NumPy or jax as given."""
    rows, cols = W.shape
    pad = (-rows) % ndev
    if not pad:
        return W, perm, counts, 0
    xp = np if isinstance(counts, np.ndarray) else jnp
    Wp = jnp.concatenate([W, jnp.zeros((pad, cols), W.dtype)])
    pp = jnp.concatenate([perm, jnp.tile(jnp.arange(cols, dtype=perm.dtype), (pad, 1))])
    cp = xp.concatenate([counts, xp.zeros((counts.shape[0], pad), counts.dtype)], axis=1)
    return Wp, pp, cp, pad


@functools.partial(jax.jit, static_argnames=("chunk", "mesh"))
def _rebuild_chol(W, Hinv, perm, counts, chunk, mesh=None):
    """All levels at once: one Cholesky per row of ``Hinv`` in pivot order.

    ``counts`` is ``(rows, L)``; rows unbatched when ``chunk == 1`` (see :func:`_rebuild_solve`).
    """
    cols = W.shape[1]
    t = jnp.arange(cols)

    def one(args):
        w, p, n = args
        P = Hinv[p][:, p]
        L = jnp.linalg.cholesky(P)  # P = L Lᵀ; upper factor of the elimination is U = Lᵀ
        wp = w[p]
        e = jax.scipy.linalg.solve_triangular(L, wp, lower=True)
        M = t[None, :] < n[:, None]
        Wl = wp[None, :] - jnp.matmul(jnp.where(M, e[None, :], 0.0), L.T, precision=_HP)
        Wl = jnp.where(M, 0.0, Wl)
        out = jnp.zeros_like(Wl).at[:, p].set(Wl)
        rl = 0.5 * jnp.sum(jnp.where(M, e[None, :] ** 2, 0.0), axis=1)
        return out, rl

    def run(W, Hinv, perm, counts):
        return jax.lax.map(one, (W, perm, counts), batch_size=chunk if chunk > 1 else None)

    return _over_rows(run, mesh, W, Hinv, perm, counts)


@functools.partial(jax.jit, static_argnames=("nmax", "chunk", "mesh"))
def _rebuild_solve(W, Hinv, perm, n, nmax, chunk, mesh=None):
    """One level: ``w' = w - Hinv[:, S] Hinv[S, S]⁻¹ w_S`` with ``|S| = n_i <= nmax``.

    Rows run one at a time (``chunk == 1``, unbatched: batched gathers and Cholesky are several
    times slower per row on the CPU) or ``chunk`` at a time (vmapped, for accelerators).
    ``Hinv[:, S] z`` is formed as ``z Hinv[S, :]`` (``Hinv`` is symmetric): a gather of whole
    rows instead of columns.
    """

    def one(args):
        w, p, ni = args
        S = p[:nmax]
        valid = jnp.arange(nmax) < ni
        both = valid[:, None] & valid[None, :]
        HS = Hinv[S]
        A = jnp.where(both, HS[:, S], jnp.eye(nmax, dtype=W.dtype))
        b = jnp.where(valid, w[S], 0.0)
        L = jnp.linalg.cholesky(A)
        z = jax.scipy.linalg.cho_solve((L, True), b)
        z = jnp.where(valid, z, 0.0)
        wn = w - jnp.matmul(z, HS, precision=_HP)
        wn = wn.at[S].set(jnp.where(valid, 0.0, wn[S]))
        return wn, 0.5 * jnp.dot(b, z, precision=_HP)

    def run(W, Hinv, perm, n):
        return jax.lax.map(one, (W, perm, n), batch_size=chunk if chunk > 1 else None)

    return _over_rows(run, mesh, W, Hinv, perm, n)


def rebuild_levels(
    W,
    Hinv,
    perm,
    counts,
    *,
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    mesh=None,
):
    """Exact weights after each row's first ``counts[l, i]`` eliminations in order ``perm``.

    Args:
      W: ``(rows, cols)`` prepared weights.
      Hinv: ``(cols, cols)`` prepared inverse Hessian.
      perm: ``(rows, cols)`` each row's elimination order (a permutation of the columns).
      counts: ``(L, rows)`` eliminations per row and level.
      mesh: optional ``jax.sharding.Mesh``; rows are split over its first axis.

    Returns:
      ``(weights (L, rows, cols), row_loss (L, rows))``.
    """
    rows, cols = W.shape
    counts = np.asarray(counts, np.int32)
    L = counts.shape[0]
    item = jnp.dtype(W.dtype).itemsize
    nmaxes = [int(counts[l].max()) for l in range(L)]
    bucket = lambda n: min(cols, max(1, -(-n // 32) * 32))
    cost_chol = cols**3 / 3 + 2 * L * cols**2
    cost_solve = sum(bucket(n) ** 3 / 3 + 2 * cols * bucket(n) for n in nmaxes)
    perm = jnp.asarray(perm, jnp.int32)
    ndev = 1 if mesh is None else mesh.shape[mesh.axis_names[0]]
    Wp, pp, cp, pad = _pad_rows(W, perm, counts, ndev)
    # unbatched rows on the CPU (see _rebuild_solve), vmapped chunks elsewhere
    default = 1 if jax.default_backend() == "cpu" else None
    want = chunk_rows if chunk_rows else default

    def chunk_for(per_row):
        return max(1, min(_chunk(rows, per_row, want, memory_bytes), (rows + pad) // ndev))

    with blas_one_thread():
        if cost_solve < cost_chol:
            outs, losses = [], []
            for l in range(L):
                if nmaxes[l] == 0:
                    outs.append(jnp.asarray(W))
                    losses.append(jnp.zeros((rows,), W.dtype))
                    continue
                nmax = bucket(nmaxes[l])
                ch = chunk_for(3 * nmax * nmax * item + 4 * cols * item)
                wl, rl = _rebuild_solve(Wp, Hinv, pp, jnp.asarray(cp[l]), nmax, ch, mesh)
                outs.append(wl[:rows])
                losses.append(rl[:rows])
            out = jnp.stack(outs), jnp.stack(losses)
        else:
            ch = chunk_for((3 * cols * cols + 2 * L * cols) * item)
            wl, rl = _rebuild_chol(Wp, Hinv, pp, jnp.asarray(cp.T), ch, mesh)
            out = jnp.swapaxes(wl[:rows], 0, 1), rl[:rows].T
        return jax.block_until_ready(out)


def elimination_order(
    P: Prepared,
    *,
    nsteps: int | None = None,
    method: str = "auto",
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    mesh=None,
):
    """Greedy ExactOBS pruning order and step losses of every row.

    Returns:
      ``(order, losses)``, each ``(rows, nsteps)``: the column eliminated at each step and its loss.
    """
    rows, cols = P.W.shape
    nsteps = cols if nsteps is None else int(nsteps)
    item = jnp.dtype(P.W.dtype).itemsize
    ch = _engine_chunk(rows, cols, nsteps, method, item, chunk_rows, memory_bytes)
    order, _, losses, _ = _greedy(
        P.W, P.Hinv, {}, PruneRule(), nsteps, _resolve(method, cols), ch, mesh
    )
    return order, losses


def _complete_perm(order: np.ndarray, cols: int) -> np.ndarray:
    """Extend partial elimination orders ``(rows, n)`` to full permutations (unused tail)."""
    rows, n = order.shape
    if n == cols:
        return order
    seen = np.zeros((rows, cols), bool)
    np.put_along_axis(seen, order, True, axis=1)
    rest = np.argsort(seen, axis=1, kind="stable")[:, : cols - n]
    return np.concatenate([order, rest], axis=1)


def _partial_allocation(P: Prepared, ks, smax: float, **kw):
    """Elimination orders and per-row counts for totals ``ks``, stopping rows early when possible.

    Rows first run to ``n1 ≈ cols·(smax + (1 - smax)/4)`` steps; steps not run count as +inf in
    the allocation. Because the allocation ranks running maxima, an unrun step can only matter for a
    row whose every run step was selected; exactly those rows are run again to the end. The counts
    are therefore identical to a full pass.
    """
    rows, cols = P.W.shape
    if _resolve(kw.get("method", "auto"), cols) == "naive":
        smax = 1.0  # small layers: one compiled pass is cheaper than two
    n1 = cols if smax >= 0.75 else min(cols, int(math.ceil(cols * (smax + 0.25 * (1 - smax)))))
    order, losses = elimination_order(P, nsteps=n1, **kw)
    order, losses = np.asarray(order), np.asarray(losses)
    if n1 == cols:
        return order, allocate_counts(losses, ks)
    full = np.full((rows, cols), np.inf)
    full[:, :n1] = losses
    counts = allocate_counts(full, ks)
    sat = np.nonzero((counts >= n1).any(axis=0))[0]
    order = _complete_perm(order, cols)
    if sat.size:
        # pad the subset to a power of two so repeated calls reuse the compiled kernel
        npad = min(rows, 1 << int(math.ceil(math.log2(sat.size))))
        take = np.concatenate([sat, np.full(npad - sat.size, sat[0])])
        o2, l2 = elimination_order(P._replace(W=P.W[take]), nsteps=cols, **kw)
        order[sat] = np.asarray(o2)[: sat.size]
        full[sat] = np.asarray(l2)[: sat.size]
        counts = allocate_counts(full, ks)
    return order, counts




# --------------------------------------------------------------------------------------------
# traceable pieces: allocation and rebuild with the counts as arrays
# --------------------------------------------------------------------------------------------


def allocate_counts_traced(losses, sparsities: Sequence[float], units: int, axis_name=None):
    """:func:`allocate_counts` inside a trace: ``(L, rows)`` int32 counts.

    Args:
      losses: ``(rows, nsteps)`` step losses.
      sparsities: the levels; level ``l`` eliminates ``floor(s·rows_total·units + 0.5)`` steps.
      units: eliminations a row can make in all (columns, or blocks).
      axis_name: inside ``shard_map`` over rows, the mesh axis: the ranking is then global (the
        step losses of every device are gathered), each device keeps its own rows' counts.
    """
    env = jax.lax.cummax(losses, axis=1)
    rows_local = env.shape[0]
    if axis_name is not None:
        env = jax.lax.all_gather(env, axis_name, tiled=True)
    R, n = env.shape
    order = jnp.argsort(env.ravel(), stable=True)
    rowid = (order // n).astype(jnp.int32)
    pos = jnp.arange(R * n)
    counts = jnp.stack(
        [
            jnp.zeros((R,), jnp.int32).at[rowid].add((pos < _count(s, R * units)).astype(jnp.int32))
            for s in sparsities
        ]
    )
    if axis_name is not None:
        start = jax.lax.axis_index(axis_name) * rows_local
        counts = jax.lax.dynamic_slice_in_dim(counts, start, rows_local, axis=1)
    return counts


def _rebuild_traced(W, Hinv, perm, counts, chunk_rows, memory_bytes, mesh):
    """All levels from ``perm`` and traced ``counts (L, rows)``: ``(weights, mask, row_loss)``."""
    rows, cols = W.shape
    L = counts.shape[0]
    item = jnp.dtype(W.dtype).itemsize
    ndev = 1 if mesh is None else mesh.shape[mesh.axis_names[0]]
    Wp, pp, cp, pad = _pad_rows(W, perm, counts, ndev)
    want = chunk_rows if chunk_rows else (1 if jax.default_backend() == "cpu" else None)
    ch = _chunk(rows, (3 * cols * cols + 2 * L * cols) * item, want, memory_bytes)
    ch = max(1, min(ch, (rows + pad) // ndev))
    wl, rl = _rebuild_chol(Wp, Hinv, pp, cp.T, ch, mesh)
    weights, row_loss = jnp.swapaxes(wl[:rows], 0, 1), rl[:rows].T
    inv = jnp.argsort(perm, axis=1)
    mask = inv[None] >= counts[:, :, None]
    return jnp.where(mask, weights, 0.0), mask, row_loss


@functools.partial(jax.jit, static_argnames=("single",))
def _levels_tail(weights, mask, row_loss, single):
    return _levels_result(jnp.where(mask, weights, 0.0), mask, row_loss, single)


def _given(P, res):
    """A body for :func:`_staged` that only converts ``res`` (already computed) to caller units."""
    return res


def _levels_result(weights, mask, row_loss, single):
    loss = jnp.sum(row_loss, axis=-1)
    if single:
        return Result(weights[0], mask[0], None, loss[0], row_loss[0])
    return Result(weights, mask, None, loss, row_loss)


# --------------------------------------------------------------------------------------------
# public solvers: host checks, a pure body in solver units, the result in the caller's units
# --------------------------------------------------------------------------------------------


def _prune_body(P, levels, single, *, method, chunk_rows, memory_bytes, mesh, axis_name, traced):
    rows, cols = P.W.shape
    kw = dict(method=method, chunk_rows=chunk_rows, memory_bytes=memory_bytes, mesh=mesh)
    if traced or axis_name is not None:
        order, losses = elimination_order(P, nsteps=cols, **kw)
        counts = allocate_counts_traced(losses, levels, cols, axis_name)
        return _levels_result(
            *_rebuild_traced(P.W, P.Hinv, order, counts, chunk_rows, memory_bytes, mesh), single
        )
    # on the host: rows stop early where the allocation allows, and one or two levels are
    # rebuilt by a solve over the pruned set only (both give the same result as the traced path)
    ks = [_count(s, rows * cols) for s in levels]
    order, counts = _partial_allocation(P, ks, max(levels), **kw)
    weights, row_loss = rebuild_levels(
        P.W, P.Hinv, order, counts, chunk_rows=chunk_rows, memory_bytes=memory_bytes, mesh=mesh
    )
    t = np.arange(cols)
    masks = []
    order_np = np.asarray(order)
    for l in range(len(levels)):
        m = np.ones((rows, cols), bool)
        pruned = t[None, :] < counts[l][:, None]
        np.put_along_axis(m, order_np, ~pruned, axis=1)
        masks.append(m)
    return _levels_tail(weights, jnp.asarray(np.stack(masks)), row_loss, single)


def exactobs_prune(
    W,
    H,
    sparsity: float | Unstructured | Sequence[float],
    *,
    rel_damp: float = 0.01,
    method: str = "auto",
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
    mesh=None,
    axis_name: str | None = None,
) -> Result:
    """Unstructured ExactOBS pruning with OBC's layer-wise allocation.

    Pure in ``W`` and ``H``: it runs under ``jax.jit``, ``jax.vmap`` (stacked problems) and
    ``shard_map`` over rows (pass ``axis_name`` there so the allocation ranks all rows together).

    Args:
      W: ``(rows, cols)`` weights.
      H: ``(cols, cols)`` Hessian.
      sparsity: a fraction of zeros in ``[0, 1)`` for the whole layer (or an
        :class:`~obcjax.specs.Unstructured`), or a list of them (one elimination pass serves all
        levels; the result then has a leading level axis).
      rel_damp: relative damping.
      method: ``"blocked"`` (right-looking, lazy), ``"fast"`` (left-looking), ``"naive"``
        (rank-1 downdates) or ``"auto"`` (blocked from 384 columns up, else naive); all give the
        same result.
      chunk_rows / memory_bytes: rows processed at once (default: from the memory budget).
      mesh: optional ``jax.sharding.Mesh``; rows are split over its first axis with
        ``shard_map`` (multi-host meshes work the same after ``jax.distributed.initialize``).
      axis_name: the row axis when called inside the caller's own ``shard_map``.

    Returns:
      A :class:`Result`; the number of zeros is ``floor(s·rows·cols + 0.5)`` for each level.

    Raises:
      ValueError: outside a trace, for a bad sparsity, shape or Hessian (naming ``layer``).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = exactobs_prune(W, H, [0.5, 0.75])
      >>> r.weights.shape, int((~r.mask[1]).sum())
      ((2, 4, 8), 24)
    """
    if isinstance(sparsity, Unstructured):
        sparsity = sparsity.sparsity
    levels, single = _sparsity_list(sparsity, layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    res = _prune_body(
        P, levels, single, method=method, chunk_rows=chunk_rows, memory_bytes=memory_bytes,
        mesh=mesh, axis_name=axis_name, traced=is_traced(P.W, P.H),
    )
    return run_staged(P, _given, out, res)


def _require_quant(value, what: str, layer: str) -> Int:
    """A quantization grid that must be given: ``as_quant``, and None is a ``TypeError``."""
    spec = as_quant(value, what=what, layer=layer)
    if spec is None:
        raise TypeError(
            f"layer {layer!r}: {what}: expected a number of bits in 2..8 (4, 'w4') or an Int "
            "spec, got None"
        )
    return spec


def _as_nm(n, m, layer) -> NM:
    if m is None:
        spec = as_prune(n, what="n:m pattern", layer=layer)
        if not isinstance(spec, NM):
            raise TypeError(f"layer {layer!r}: expected an N:M pattern (NM(2, 4), '2:4'), got {n!r}")
        return spec
    return NM(n, m)


def _nm_body(P, spec: NM, *, method, chunk_rows, memory_bytes, mesh):
    rows, cols = P.W.shape
    nsteps = cols * spec.n // spec.m
    item = jnp.dtype(P.W.dtype).itemsize
    ch = _engine_chunk(rows, cols, nsteps, method, item, chunk_rows, memory_bytes)
    order, _, losses, Wf = _greedy(
        P.W, P.Hinv, {}, NMRule(spec.n, spec.m), nsteps, _resolve(method, cols), ch, mesh
    )
    mask = jnp.ones((rows, cols), bool).at[jnp.arange(rows)[:, None], order].set(False)
    Wf = jnp.where(mask, Wf, 0.0)
    row_loss = jnp.sum(losses, axis=1)
    return Result(Wf, mask, None, jnp.sum(row_loss), row_loss)


def exactobs_nm(
    W,
    H,
    n: int | NM | str,
    m: int | None = None,
    *,
    rel_damp: float = 0.01,
    method: str = "auto",
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
    mesh=None,
) -> Result:
    """N:M ExactOBS: ``n`` zeros in every ``m`` consecutive columns, greedy per row.

    The pattern is ``exactobs_nm(W, H, NM(2, 4))``, ``exactobs_nm(W, H, "2:4")`` or
    ``exactobs_nm(W, H, 2, 4)``. Pure in ``W`` and ``H`` (jit, vmap, shard_map over rows).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = exactobs_nm(W, H, "2:4")
      >>> bool((r.mask.reshape(4, 2, 4).sum(-1) == 2).all())
      True
    """
    spec = _as_nm(n, m, layer)
    check_fits(spec, matrix_cols(W, layer), layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    return run_staged(P, _nm_body, out, spec=spec, method=method, chunk_rows=chunk_rows,
                       memory_bytes=memory_bytes, mesh=mesh)


def _grid_attrs(Wg, spec: Int):
    scale, zero = find_params(Wg, spec)
    cols = Wg.shape[1]
    s, z = expand_params(scale, zero, cols)
    return scale, zero, {"scale": s.astype(Wg.dtype), "zero": z.astype(Wg.dtype)}


def _greedy_group(spec: Int) -> int:
    # Group-wise grids: OBQ fixes one group at a time, left to right (greedily inside it). A
    # greedy pass across groups ends every group at once, each with its last weights' error left
    # for the few free weights of the other groups' tails; on MiniLM's attention at g128 it lost
    # to GPTQ's column order by 12 % in layer loss, while group by group beats GPTQ.
    return spec.group_size if spec.granularity == "group" else 0


def _obq_body(P, spec: Int, *, outlier_rule, order, method, chunk_rows, memory_bytes, mesh):
    rows, cols = P.W.shape
    scale, zero, attrs = _grid_attrs(P.W, spec)
    rule = QuantRule(spec.bits, bool(outlier_rule) and order == "greedy", order,
                     group=_greedy_group(spec))
    item = jnp.dtype(P.W.dtype).itemsize
    ch = _engine_chunk(rows, cols, cols, method, item, chunk_rows, memory_bytes)
    _, _, losses, Wq = _greedy(P.W, P.Hinv, attrs, rule, cols, _resolve(method, cols), ch, mesh)
    qa = make_qarray(Wq, scale, zero, spec)
    row_loss = jnp.sum(losses, axis=1)
    return Result(Wq, None, qa, jnp.sum(row_loss), row_loss)


def obq_quantize(
    W,
    H,
    spec: Int | int,
    *,
    rel_damp: float = 0.01,
    outlier_rule: bool = True,
    order: str = "greedy",
    method: str = "auto",
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
    mesh=None,
) -> Result:
    """Optimal Brain Quantizer: greedy per-weight quantization with OBS compensation.

    Pure in ``W`` and ``H`` (jit, vmap, shard_map over rows).

    Args:
      spec: the grid (:class:`obcjax.specs.Int`, or its number of bits), found on the prepared
        weights. With group-wise grids the greedy fixes one group at a time, left to right
        (greedily inside the group), so every group's error can still move into the later groups.
      outlier_rule: quantize the worst out-of-range weight first whenever some free weight's rounding
        error exceeds half a step (OBC §4), which stops compensation from pushing weights off-grid.
      order: ``"greedy"`` (OBQ) or ``"natural"`` (columns left to right: GPTQ without lazy blocks).

    Returns:
      A :class:`Result` whose ``qarray`` holds the integer codes.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = obq_quantize(W, H, 4)
      >>> bool((r.qarray.dequantize() == r.weights).all())
      True
    """
    spec = _require_quant(spec, "spec", layer)
    if order not in ("greedy", "natural"):
        raise ValueError(f"layer {layer!r}: order must be 'greedy' or 'natural', got {order!r}")
    check_fits(spec, matrix_cols(W, layer), layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    return run_staged(P, _obq_body, out, spec=spec, outlier_rule=bool(outlier_rule), order=order,
                       method=method, chunk_rows=chunk_rows, memory_bytes=memory_bytes, mesh=mesh)


def obq_prune_quantize(
    W,
    H,
    prune: Unstructured | NM | float | str,
    quant: Int | int,
    *,
    rel_damp: float = 0.01,
    outlier_rule: bool = True,
    method: str = "auto",
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
    mesh=None,
) -> Result:
    """Joint pruning + quantization: ExactOBS pruning, then OBQ of the survivors.

    The pruned coordinates are eliminated first (target 0) so the quantizer sees the inverse
    Hessian restricted to each row's support; pruned weights stay exactly zero (0 is on every
    grid) and the survivors are quantized with OBS compensation. The grid is found on the pruned
    weights. ``prune`` is a spec or a shorthand (``0.5``, ``"2:4"``, ``Block(0.5, 4)``: blocks
    of consecutive columns removed together, then the survivors quantized, the reference's
    ``4block_8w`` levels), ``quant`` an :class:`~obcjax.specs.Int` or a number of bits. Pure in
    ``W`` and ``H``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = obq_prune_quantize(W, H, 0.5, 4)
      >>> int((r.weights == 0).sum()) >= 16
      True
    """
    prune = as_prune(prune, what="prune", layer=layer)
    quant = _require_quant(quant, "quant", layer)
    if not isinstance(prune, Unstructured | NM | Block):
        raise TypeError(
            f"layer {layer!r}: prune must be Unstructured, NM or Block, got {prune!r}"
        )
    cols = matrix_cols(W, layer)
    check_fits(prune, cols, layer)
    check_fits(quant, cols, layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    kw = dict(method=method, chunk_rows=chunk_rows, memory_bytes=memory_bytes, mesh=mesh)
    if isinstance(prune, Unstructured | Block):
        # the host path allocates on the host (numpy) between the passes; the quantizer is staged
        if isinstance(prune, Block):
            rp = _block_body(P, [prune.sparsity], True, prune.size, chunk_rows=chunk_rows,
                             memory_bytes=memory_bytes)
        else:
            rp = _prune_body(P, [prune.sparsity], True, axis_name=None,
                             traced=is_traced(P.W, P.H), **kw)
        return run_staged(P, _joint_quant_body, out, rp, quant=quant,
                           outlier_rule=bool(outlier_rule), **kw)
    return run_staged(P, _joint_nm_body, out, prune=prune, quant=quant,
                       outlier_rule=bool(outlier_rule), **kw)


def _joint_nm_body(P, *, prune, quant, outlier_rule, method, chunk_rows, memory_bytes, mesh):
    rp = _nm_body(P, prune, method=method, chunk_rows=chunk_rows, memory_bytes=memory_bytes,
                  mesh=mesh)
    return _joint_quant_body(P, rp, quant=quant, outlier_rule=outlier_rule, method=method,
                             chunk_rows=chunk_rows, memory_bytes=memory_bytes, mesh=mesh)


def _joint_quant_body(P, rp, *, quant, outlier_rule, method, chunk_rows, memory_bytes, mesh):
    """OBQ of the survivors of the pruning result ``rp`` (pruned coordinates eliminated first)."""
    rows, cols = P.W.shape
    scale, zero, attrs = _grid_attrs(rp.weights, quant)
    attrs["pre"] = ~rp.mask
    rule = QuantRule(quant.bits, bool(outlier_rule), "greedy", has_pre=True,
                     group=_greedy_group(quant))
    item = jnp.dtype(P.W.dtype).itemsize
    ch = _engine_chunk(rows, cols, cols, method, item, chunk_rows, memory_bytes)
    _, _, losses, Wq = _greedy(
        rp.weights, P.Hinv, attrs, rule, cols, _resolve(method, cols), ch, mesh
    )
    Wq = jnp.where(rp.mask, Wq, 0.0)
    qa = make_qarray(Wq, scale, zero, quant)
    row_loss = rp.row_loss + jnp.sum(losses, axis=1)
    return Result(Wq, rp.mask, qa, jnp.sum(row_loss), row_loss)

# --------------------------------------------------------------------------------------------
# block pruning (rank-`size` steps; per-row Hinv, reference formulation)
# --------------------------------------------------------------------------------------------


def _block_row(w, Hinv, size: int):
    cols = w.shape[0]
    nb = cols // size
    B = jnp.arange(nb)[:, None] * size + jnp.arange(size)[None, :]
    eye = jnp.eye(size, dtype=w.dtype)

    def body(k, st):
        w, Hi, free, order, losses = st
        Mb = Hi[B[:, :, None], B[:, None, :]]
        Mb = jnp.where(free[:, None, None], Mb, eye)
        wb = w[B]
        z = jnp.linalg.solve(Mb, wb[..., None])[..., 0]
        score = jnp.where(free, 0.5 * jnp.sum(wb * z, axis=1), jnp.inf)
        b = jnp.argmin(score)
        idx = B[b]
        HB = Hi[:, idx]
        Minv = jnp.linalg.inv(Mb[b])
        w = w - jnp.matmul(HB, z[b], precision=_HP)
        w = w.at[idx].set(0.0)
        Hi = Hi - jnp.matmul(jnp.matmul(HB, Minv, precision=_HP), HB.T, precision=_HP)
        return (
            w,
            Hi,
            free.at[b].set(False),
            order.at[k].set(b.astype(jnp.int32)),
            losses.at[k].set(score[b]),
        )

    st = (w, Hinv, jnp.ones((nb,), bool), jnp.zeros((nb,), jnp.int32), jnp.zeros((nb,), w.dtype))
    _, _, _, order, losses = jax.lax.fori_loop(0, nb, body, st)
    return order, losses


@functools.partial(jax.jit, static_argnames=("size", "chunk"))
def _block_orders(W, Hinv, size, chunk):
    return jax.lax.map(lambda w: _block_row(w, Hinv, size), W, batch_size=chunk)




def exactobs_block(
    W,
    H,
    sparsity: float | Sequence[float],
    size: int = 4,
    *,
    rel_damp: float = 0.01,
    chunk_rows: int | None = None,
    memory_bytes: int = DEFAULT_MEMORY_BYTES,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
) -> Result:
    """Block ExactOBS: blocks of ``size`` consecutive columns removed together (OBC §4.2).

    Each row greedily removes the block with the smallest ``½ w_Bᵀ (Hinv_BB)⁻¹ w_B``; the block
    losses of all rows are ranked together as in unstructured pruning, and the weights are rebuilt
    exactly from the block order (removing a block equals removing its columns one by one).
    ``sparsity`` may also be a :class:`~obcjax.specs.Block` (its size is then used). Pure in ``W``
    and ``H``.
    """
    if isinstance(sparsity, Block):
        sparsity, size = sparsity.sparsity, sparsity.size
    levels, single = _sparsity_list(sparsity, layer)
    if isinstance(size, bool) or not isinstance(size, int | np.integer) or size < 1:
        raise ValueError(f"layer {layer!r}: size must be a positive int (the block width), got {size!r}")
    size = int(size)
    check_fits(Block(levels[0], size), matrix_cols(W, layer), layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    res = _block_body(P, levels, single, size, chunk_rows=chunk_rows, memory_bytes=memory_bytes)
    if is_traced(P.W, P.H):
        return finish(res, P, out)
    return run_staged(P, _given, out, res)


def _block_body(P, levels, single, size: int, *, chunk_rows, memory_bytes) -> Result:
    """Block ExactOBS on a prepared problem in solver units (host or traced allocation)."""
    rows, cols = P.W.shape
    nb = cols // size
    item = jnp.dtype(P.W.dtype).itemsize
    ch = _chunk(rows, 3 * cols * cols * item, chunk_rows, memory_bytes)
    border, blosses = _block_orders(P.W, P.Hinv, size, ch)
    perm = (border[:, :, None] * size + jnp.arange(size)).reshape(rows, cols)
    if is_traced(P.W, P.H):
        counts = allocate_counts_traced(blosses, levels, nb) * size
        return _levels_result(
            *_rebuild_traced(P.W, P.Hinv, perm, counts, chunk_rows, memory_bytes, None), single
        )
    counts = allocate_counts(np.asarray(blosses), [_count(s, rows * nb) for s in levels])
    perm = np.asarray(perm)
    weights, row_loss = rebuild_levels(
        P.W, P.Hinv, perm, counts * size, chunk_rows=chunk_rows, memory_bytes=memory_bytes
    )
    t = np.arange(cols)
    masks = []
    for l in range(len(levels)):
        msk = np.ones((rows, cols), bool)
        np.put_along_axis(msk, perm, ~(t[None, :] < (counts[l] * size)[:, None]), axis=1)
        masks.append(msk)
    return _levels_tail(weights, jnp.asarray(np.stack(masks)), row_loss, single)
