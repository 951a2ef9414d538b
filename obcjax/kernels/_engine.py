"""The greedy row-wise elimination engine behind ExactOBS and OBQ.

For one row ``w`` and the inverse Hessian ``Hinv`` (shared by all rows), ExactOBS repeatedly
picks a free coordinate ``j``, fixes it to a target ``t_j`` (0 to prune, the grid point to
quantize) and moves the other free weights optimally:

    e = (w_j - t_j) / sqrt(d_j),  u = Hinv⁽ᵏ⁾[j, :] / sqrt(d_j),  w -= e · u,  loss += e² / 2,

after which ``Hinv⁽ᵏ⁺¹⁾ = Hinv⁽ᵏ⁾ - u uᵀ`` (``d = diag Hinv⁽ᵏ⁾``). The vectors ``u`` are the rows of
the upper Cholesky factor of ``Hinv`` taken in pivot order, so the greedy elimination is a
*pivoted Cholesky factorisation* of ``Hinv`` whose pivot rule looks at the weights.

Three formulations with identical results:

* ``naive`` (the OBC reference): carry ``Hinv⁽ᵏ⁾`` per row and apply the rank-1 downdate every step:
  8·cols² bytes read and written per step and row; memory-bound.
* ``fast`` (left-looking): never form ``Hinv⁽ᵏ⁾``. The pivot row is rebuilt on demand as
  ``Hinv[j, :] - U[:k, j]ᵀ U[:k, :]`` from the original (shared) ``Hinv`` and the ``k`` vectors
  found so far, the diagonal is downdated in O(cols). The elimination runs in a few static
  phases; at each phase start the still-free coordinates are compacted to the front, so the work
  per step is ``k × free`` instead of ``cols²``. To reach step ``n`` the fast form moves about
  ``4·Σ_k k·(cols - k)`` bytes instead of ``8·n·cols²`` (12× fewer for a full pass, more for a
  partial one), and half the flops of the naive form. Still memory-bound: every step re-reads
  the ``k`` factor rows.
* ``blocked`` (right-looking, lazy): each row keeps ``S = Hinv⁽ᵏ⁰⁾`` over its active slots and
  brings it up to date only once per block of ``b`` steps with one rank-``b`` GEMM
  ``S -= UᵦᵀUᵦ``; inside a block the pivot row is ``S[j] - Uᵦ[:, j]ᵀ Uᵦ`` from the ``≤ b`` factor
  rows of the block, which stay in cache. Per step it does ``active²`` multiply-adds, more than
  the left-looking ``k·active``, but inside a compute-bound GEMM, and it moves ``≈ 8·active²/b``
  bytes of ``S`` instead of ``4·k·active`` of factor rows (``b = 64``). The default from 384
  columns up (measured faster than ``fast`` at 576-2304 columns, with a third of its compile
  time).

Pivot rules are small frozen dataclasses (static under ``jit``) with per-column attributes that
travel with the compaction.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from obcjax.quant import quantize

_HP = jax.lax.Precision.HIGHEST
_BIG = jnp.iinfo(jnp.int32).max
# below this width the per-row inverse fits in cache and the naive downdate is as fast (measured)
AUTO_FAST_COLS = 384


# --------------------------------------------------------------------------------------------
# pivot rules. select(...) -> (j, target, new_running_aux)
#   w, d, free, col: current active-slot arrays; col["idx"] is the original column of each slot.
# --------------------------------------------------------------------------------------------


def _first_free_by(priority, free):
    return jnp.argmin(jnp.where(free, priority, _BIG))


@dataclasses.dataclass(frozen=True)
class PruneRule:
    """Unstructured pruning: ``argmin w_j² / d_j``."""

    def init(self, col, row):
        return ()

    def select(self, k, w, d, free, col, row, run):
        score = jnp.where(free, w * w / d, jnp.inf)
        j = jnp.argmin(score)
        return j, jnp.zeros((), w.dtype), run


@dataclasses.dataclass(frozen=True)
class NMRule:
    """N:M pruning: like :class:`PruneRule`, skipping groups that already hold ``n`` zeros."""

    n: int
    m: int

    def init(self, col, row):
        return jnp.zeros((col["idx"].shape[0] // self.m,), jnp.int32)

    def select(self, k, w, d, free, col, row, counts):
        gid = col["idx"] // self.m
        full = counts[gid] >= self.n
        score = jnp.where(free & ~full, w * w / d, jnp.inf)
        j = jnp.argmin(score)
        counts = counts.at[gid[j]].add(jnp.int32(1))
        return j, jnp.zeros((), w.dtype), counts


@dataclasses.dataclass(frozen=True)
class QuantRule:
    """OBQ: round to the grid, greedy ``argmin (w - q)² / d`` with the outlier rule.

    ``order="natural"`` fixes columns left to right instead (the fixed-order variant; GPTQ
    without lazy blocks). Coordinates flagged in ``col["pre"]`` (already pruned weights) are
    eliminated first, in column order, with target 0. With ``group > 0`` (group-wise grids) the
    greedy choice is confined to the first group of ``group`` consecutive columns that still has
    free columns: groups are fixed left to right, greedily within each, so every group but the
    last ends with the later groups still free to absorb its error.
    """

    bits: int
    outlier_rule: bool = True
    order: str = "greedy"
    has_pre: bool = False
    group: int = 0

    def init(self, col, row):
        return ()

    def select(self, k, w, d, free, col, row, run):
        scale, zero = col["scale"], col["zero"]
        q = quantize(w, scale, zero, self.bits)
        err = (w - q) ** 2
        if self.order == "natural":
            j = _first_free_by(col["idx"], free)
        else:
            cand = free
            if self.group:
                gid = col["idx"] // self.group
                cand = free & (gid == jnp.min(jnp.where(free, gid, _BIG)))
            score = jnp.where(cand, err / d, jnp.inf)
            j = jnp.argmin(score)
            if self.outlier_rule:
                outlier = cand & (err > 0.25 * scale * scale)
                jo = jnp.argmax(jnp.where(cand, err, -jnp.inf))
                j = jnp.where(jnp.any(outlier) & (score[j] > 0), jo, j)
        target = q[j]
        if self.has_pre:
            pre = col["pre"] & free
            jp = _first_free_by(col["idx"], pre)
            use_pre = jnp.any(pre)
            j = jnp.where(use_pre, jp, j)
            target = jnp.where(use_pre, jnp.zeros((), w.dtype), q[j])
        return j, target, run


# --------------------------------------------------------------------------------------------
# one row
# --------------------------------------------------------------------------------------------


def _phase_bounds(nsteps: int, cols: int, nphases: int):
    """Static step ranges; more phases early, where the free set is large."""
    # each phase is compiled separately: few phases for short runs, at most `nphases`
    nph = max(1, min(nphases, nsteps // 48))
    bounds = sorted({round(nsteps * i / nph) for i in range(nph + 1)})
    return list(zip(bounds[:-1], bounds[1:]))


def phase_plan(nsteps: int, cols: int, nphases: int = 8):
    """``[(start, end, active_columns)]`` of the fast kernel's phases (for cost accounting)."""
    return [(a, b, cols - a) for a, b in _phase_bounds(nsteps, cols, nphases)]


def _step_update(j, target, row_j, dj, w, d, free):
    """Shared bookkeeping once the current pivot row ``row_j = Hinv⁽ᵏ⁾[j, :]`` is known."""
    sd = jnp.sqrt(dj)
    u = jnp.where(free, row_j / sd, 0.0)
    e = (w[j] - target) / sd
    w = (w - e * u).at[j].set(target)
    free = free.at[j].set(False)
    d = jnp.where(free, d - u * u, d)
    return u, e, w, d, free


def _init_state(w, Hinv, col, row, rule, nsteps):
    """Start of a row's elimination: diagonal, free set, column ids, rule state, empty records."""
    cols, dtype = w.shape[0], w.dtype
    col = dict(col, idx=jnp.arange(cols, dtype=jnp.int32))
    order = jnp.zeros((nsteps,), jnp.int32)
    records = (order, jnp.zeros((nsteps,), dtype), jnp.zeros((nsteps,), dtype))
    return (
        jnp.diag(Hinv).astype(dtype),
        jnp.ones((cols,), bool),
        col,
        rule.init(col, row),
        *records,
    )


def greedy_row_fast(w, Hinv, col, row, rule, nsteps: int, nphases: int = 8):
    """Left-looking greedy elimination of one row (see module docstring).

    Args:
      w: ``(cols,)`` one row of weights.
      Hinv: ``(cols, cols)`` shared inverse Hessian.
      col: dict of per-column ``(cols,)`` attributes for the rule.
      row: per-row scalars.
      rule: a pivot rule.
      nsteps: number of eliminations (static).

    Returns:
      ``(order, targets, losses, w_final)``: ``order``/``targets``/``losses`` are ``(nsteps,)``
      (original column indices, the value fixed, the step loss ``e²/2``); ``w_final`` is the
      full row after ``nsteps`` eliminations.
    """
    cols, dtype = w.shape[0], w.dtype
    d, free, col, run, order, targets, losses = _init_state(w, Hinv, col, row, rule, nsteps)
    U = jnp.zeros((nsteps, cols), dtype)  # rows of the pivoted Cholesky factor (active slots)

    for start, end in _phase_bounds(nsteps, cols, nphases):
        if start > 0:
            # compact: the (cols - start) free slots first, keeping their relative order
            keep = cols - start
            perm = jnp.argsort(~free, stable=True)[:keep]
            w, d, free = w[perm], d[perm], free[perm]
            col = {key: v[perm] for key, v in col.items()}
            U = U[:, perm]
        hi = end  # rows of U that can be non-zero during this phase
        Hrows = Hinv  # shared; indexed by original column ids

        def body(k, st, hi=hi, Hrows=Hrows):
            w, d, free, U, order, targets, losses, run, col = st
            j, target, run = rule.select(k, w, d, free, col, row, run)
            jo = col["idx"][j]
            Ublk = U[:hi]
            coef = Ublk[:, j]
            row_j = Hrows[jo][col["idx"]] - jnp.matmul(coef, Ublk, precision=_HP)
            dj = jnp.maximum(row_j[j], jnp.finfo(dtype).tiny)
            u, e, w, d, free = _step_update(j, target, row_j, dj, w, d, free)
            U = U.at[k].set(u)
            order = order.at[k].set(jo)
            targets = targets.at[k].set(target)
            losses = losses.at[k].set(0.5 * e * e)
            return (w, d, free, U, order, targets, losses, run, col)

        st = (w, d, free, U, order, targets, losses, run, col)
        w, d, free, U, order, targets, losses, run, col = jax.lax.fori_loop(start, end, body, st)

    w_full = jnp.zeros((cols,), dtype).at[col["idx"]].set(w)
    w_full = w_full.at[order].set(targets)
    return order, targets, losses, w_full


def default_phases(cols: int) -> int:
    """Compaction phases of the blocked engine for ``cols`` columns.

    Each phase is a separately compiled copy of the row program (about 0.6 s of XLA compile time
    each on a CPU), while compaction only pays once the active set is wide: measured on 2 CPU
    cores, 2 phases instead of 4 at 576 columns saved 1.1 s of compile for 0.25 s more run time
    (unstructured, 256 rows); at 1152 columns and up, 4 phases run clearly faster.
    """
    return 2 if cols < 1024 else 4


def blocked_plan(nsteps: int, cols: int, nphases: int | None = None, block: int | None = None):
    """Static schedule of :func:`greedy_row_blocked`: ``(block, [(start, end), ...])``.

    Blocks of 64 steps on wide layers (the GEMM that closes a block is then compute-bound), fewer
    on short runs so that small problems still cross several blocks. Phase boundaries (where the
    active columns are compacted) fall on whole blocks; only the last block can be partial.
    """
    if nphases is None:
        nphases = default_phases(cols)
    if block is None:
        block = 64 if nsteps >= 512 else max(4, nsteps // 8)
    raw = _phase_bounds(nsteps, cols, nphases)
    bounds = sorted({min(nsteps, block * round(a / block)) for a, _ in raw} | {nsteps})
    return block, list(zip(bounds[:-1], bounds[1:]))


def greedy_row_blocked(w, Hinv, col, row, rule, nsteps: int, nphases: int | None = None,
                       block=None):
    """Right-looking blocked greedy elimination of one row (see module docstring).

    The row keeps its own ``S = Hinv⁽ᵏ⁰⁾`` over the active slots, brought up to date once per
    block of steps by one rank-``block`` update ``S -= UᵦᵀUᵦ`` (a GEMM); inside the block the
    pivot row is ``S[j] - Uᵦ[:, j]ᵀ Uᵦ`` from the block's factor rows, which stay in cache. Work
    per step: ``active²`` multiply-adds, but in a compute-bound GEMM instead of the left-looking
    form's memory-bound ``k × active`` matrix-vector product, so it wins on wide layers.
    Same arguments and results as :func:`greedy_row_fast`.
    """
    cols, dtype = w.shape[0], w.dtype
    d, free, col, run, order, targets, losses = _init_state(w, Hinv, col, row, rule, nsteps)
    S = Hinv.astype(dtype)
    block, phases = blocked_plan(nsteps, cols, nphases, block)

    def run_block(st, k0, size, A):
        # k0 may be traced; size (steps in this block) and A (active slots) are static
        w, d, free, S, order, targets, losses, run, col = st

        def step(i, inner):
            w, d, free, Ub, order, targets, losses, run, col = inner
            k = k0 + i
            j, target, run = rule.select(k, w, d, free, col, row, run)
            row_j = S[j] - jnp.matmul(Ub[:, j], Ub, precision=_HP)
            dj = jnp.maximum(row_j[j], jnp.finfo(dtype).tiny)
            u, e, w, d, free = _step_update(j, target, row_j, dj, w, d, free)
            Ub = Ub.at[i].set(u)
            order = order.at[k].set(col["idx"][j])
            targets = targets.at[k].set(target)
            losses = losses.at[k].set(0.5 * e * e)
            return (w, d, free, Ub, order, targets, losses, run, col)

        inner = (w, d, free, jnp.zeros((size, A), dtype), order, targets, losses, run, col)
        w, d, free, Ub, order, targets, losses, run, col = jax.lax.fori_loop(0, size, step, inner)
        S = S - jnp.matmul(Ub.T, Ub, precision=_HP)
        return (w, d, free, S, order, targets, losses, run, col)

    for start, end in phases:
        if start > 0:
            # compact: the (cols - start) free slots first, keeping their relative order
            keep = cols - start
            perm = jnp.argsort(~free, stable=True)[:keep]
            w, d, free = w[perm], d[perm], free[perm]
            col = {key: v[perm] for key, v in col.items()}
            S = S[perm][:, perm]
        A = cols - start
        nfull, rem = divmod(end - start, block)
        st = (w, d, free, S, order, targets, losses, run, col)
        if nfull:

            def body(b, st, start=start, A=A):
                return run_block(st, start + b * block, block, A)

            st = jax.lax.fori_loop(0, nfull, body, st)
        if rem:
            st = run_block(st, start + nfull * block, rem, A)
        w, d, free, S, order, targets, losses, run, col = st

    w_full = jnp.zeros((cols,), dtype).at[col["idx"]].set(w)
    w_full = w_full.at[order].set(targets)
    return order, targets, losses, w_full


def greedy_row_naive(w, Hinv, col, row, rule, nsteps: int):
    """Reference formulation: per-row ``Hinv`` with a rank-1 downdate each step."""
    cols = w.shape[0]
    dtype = w.dtype
    col = dict(col, idx=jnp.arange(cols, dtype=jnp.int32))
    run = rule.init(col, row)
    free = jnp.ones((cols,), bool)
    order = jnp.zeros((nsteps,), jnp.int32)
    targets = jnp.zeros((nsteps,), dtype)
    losses = jnp.zeros((nsteps,), dtype)

    def body(k, st):
        w, Hi, free, order, targets, losses, run = st
        d = jnp.maximum(jnp.diag(Hi), jnp.finfo(dtype).tiny)
        j, target, run = rule.select(k, w, d, free, col, row, run)
        row_j = Hi[j]
        dj = d[j]
        u, e, w, _, free = _step_update(j, target, row_j, dj, w, d, free)
        Hi = Hi - jnp.outer(row_j, row_j) / dj
        order = order.at[k].set(j.astype(jnp.int32))
        targets = targets.at[k].set(target)
        losses = losses.at[k].set(0.5 * e * e)
        return (w, Hi, free, order, targets, losses, run)

    st = (w, Hinv.astype(dtype), free, order, targets, losses, run)
    w, _, free, order, targets, losses, run = jax.lax.fori_loop(0, nsteps, body, st)
    return order, targets, losses, w


def run_rows(
    W, Hinv, cols_attr: dict[str, Any], rule, nsteps: int, *, method: str, chunk: int, row=None
):
    """Run the greedy elimination on every row, ``chunk`` rows at a time (vmapped).

    Args:
      W: ``(rows, cols)`` weights.
      Hinv: ``(cols, cols)`` shared inverse Hessian.
      cols_attr: dict of ``(rows, cols)`` per-column attributes (row-specific, e.g. grid scale
        per column).

    Returns:
      ``order, targets, losses``: ``(rows, nsteps)``; ``W_final``: ``(rows, cols)``.
    """
    row = row or {}
    if method == "auto":
        method = "blocked" if W.shape[1] >= AUTO_FAST_COLS else "naive"
    if method == "fast":
        fn = lambda w, c: greedy_row_fast(w, Hinv, c, row, rule, nsteps)
    elif method == "blocked":
        fn = lambda w, c: greedy_row_blocked(w, Hinv, c, row, rule, nsteps)
    elif method == "naive":
        fn = lambda w, c: greedy_row_naive(w, Hinv, c, row, rule, nsteps)
    else:
        raise ValueError(f"method must be 'auto', 'fast', 'blocked' or 'naive', got {method!r}")
    # rows padded to a whole number of chunks: ``lax.map`` would otherwise compile the row
    # program twice (the scan over full chunks and the remainder), doubling compile time
    rows = W.shape[0]
    chunk = max(1, min(int(chunk), rows))
    nchunks = -(-rows // chunk)
    chunk = -(-rows // nchunks)  # the same number of chunks with the least padding
    pad = nchunks * chunk - rows
    if pad:
        W = jnp.concatenate([W, jnp.zeros((pad, W.shape[1]), W.dtype)])
        cols_attr = jax.tree.map(
            lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), cols_attr
        )
    out = jax.lax.map(lambda a: fn(*a), (W, cols_attr), batch_size=chunk)
    return jax.tree.map(lambda a: a[:rows], out) if pad else out
