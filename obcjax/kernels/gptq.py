"""GPTQ: fixed-order OBS quantization with one Cholesky factor and lazy block updates.

Frantar, Ashkboos, Hoefler, Alistarh, *GPTQ: Accurate Post-Training Quantization for Generative
Pre-trained Transformers*, ICLR 2023 (arXiv 2210.17323).

Columns are quantized left to right (or by descending ``diag(H)`` with ``act_order``), the same
order for every row. If ``U`` is the upper Cholesky factor of the prepared ``H⁻¹``
(``H⁻¹ = UᵀU``), the OBS step that fixes column ``i`` to its grid point ``q`` and moves the
remaining columns optimally is, for all rows at once,

    e = (W[:, i] - q) / U_ii,   W[:, i:] -= e ⊗ U[i, i:],   loss += e² / 2,

so the whole pass needs one factorisation instead of a downdate per step. Updates are *lazy*:
inside a block of columns only that block is touched and the columns to its right receive one
GEMM per block, ``W[:, end:] -= E · U[block, end:]``. The blocking changes the round-off only,
never the result in exact arithmetic, so ``blocksize`` is a speed knob here (SparseGPT's adaptive
mask is the exception: there it also sets the mask-selection window).

The sweep (:func:`sweep`, shared with :mod:`obcjax.kernels.sparsegpt`) is one compiled program
of nested ``lax.fori_loop`` s over blocks, sub-blocks and columns with ``lax.dynamic_slice``, so
its trace and compile time do not grow with the width (the loop is never unrolled in Python).
Widths that are not a multiple of the block size are padded with inert columns (zero weights,
identity rows of ``U``), which receive no updates and cost no loss.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.kernels.exactobs import Result, run_staged, setup
from obcjax.kernels.prepare import Prepared, Status, is_traced, matrix_cols
from obcjax.quant import find_params, make_qarray, quantize
from obcjax.specs import Int, as_quant, check_fits

__all__ = ["gptq_quantize", "cholesky_upper_inverse", "Sweep", "sweep"]

_HP = jax.lax.Precision.HIGHEST
# Inside a block, columns are further grouped into sub-blocks of this width whose updates are
# also lazy: each column step then touches a (rows, 32) slab that stays in cache instead of the
# whole (rows, blocksize) block (measured ~3x faster on CPU at 4096 columns).
_SUB = 32


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Static configuration of one GPTQ/SparseGPT sweep (hashable; a ``jit`` static argument).

    Attributes:
      cols: real number of columns (the arrays may be padded beyond it).
      block: lazy-update block width ``B``; a multiple of ``sub``.
      sub: sub-block width; a multiple of ``unit``.
      unit: columns between two "events" (grid recomputation for dynamic groups, N:M mask choice).
      bits: quantization bits, or ``None`` to keep values (pruning only).
      dyn_spec: the :class:`Int` spec whose grid is recomputed at every unit start (dynamic
        groups, ``unit`` = group size), or ``None``.
      prune: ``"none"``, ``"unstructured"`` (mask chosen at each block start from a per-block
        count) or ``"nm"`` (``nm_n`` smallest of each ``unit`` = m columns, per row).
      nm_n: zeros per N:M group.
    """

    cols: int
    block: int
    sub: int
    unit: int
    bits: int | None = None
    dyn_spec: Int | None = None
    prune: str = "none"
    nm_n: int = 0


def round_up(x: int, k: int) -> int:
    return -(-x // k) * k


def plan_sizes(blocksize: int, unit: int, *, keep_block: bool) -> tuple[int, int]:
    """``(block, sub)`` widths: ``block`` a multiple of ``sub``, ``sub`` a multiple of ``unit``.

    ``keep_block`` (SparseGPT's unstructured mask, where the block is a semantic window): the
    block stays as asked and sub-blocking is used only when it divides the block.
    """
    if keep_block:
        sub = _SUB if (blocksize % _SUB == 0 and _SUB % unit == 0) else blocksize
        return blocksize, sub
    sub = round_up(max(_SUB, unit), unit)
    block = round_up(max(blocksize, sub), sub)
    return block, sub


def smallest_k(score, k):
    """Bool mask of the ``k`` smallest entries of ``score`` (non-negative, +inf allowed).

    Ties are broken by row-major position, as a stable argsort of ``score.ravel()`` would. The
    k-th smallest value is found by bisection on the IEEE bit patterns (monotone for
    non-negative floats): 32 or 64 counting passes instead of a sort, which XLA runs slowly on
    CPU (a sort of each 4096x128 block took most of SparseGPT's time).
    """
    flat = score.reshape(-1)
    itype = jnp.int32 if flat.dtype == jnp.float32 else jnp.int64
    nbits = 32 if itype == jnp.int32 else 64
    bits = jax.lax.bitcast_convert_type(flat, itype)
    k = jnp.asarray(k, itype)

    def halve(_, lohi):
        lo, hi = lohi  # count(bits <= lo) < k <= count(bits <= hi)
        mid = lo + (hi - lo) // 2
        big = jnp.sum(bits <= mid, dtype=itype) >= k
        return jnp.where(big, lo, mid), jnp.where(big, mid, hi)

    inf_bits = jax.lax.bitcast_convert_type(jnp.asarray(jnp.inf, flat.dtype), itype)
    lo0, hi0 = jnp.asarray(-1, itype), inf_bits
    _, t = jax.lax.fori_loop(0, nbits, halve, (lo0, hi0))
    less = bits < t
    eq = bits == t
    take = k - jnp.sum(less, dtype=itype)
    chosen = less | (eq & (jnp.cumsum(eq, dtype=itype) <= take))
    return chosen.reshape(score.shape)


def rank_in_row(score):
    """Rank of each entry within its row (0 = smallest; ties: the lower column first)."""
    m = score.shape[-1]
    if m > 16:
        order = jnp.argsort(score, axis=-1, stable=True)
        return jnp.argsort(order, axis=-1, stable=True)
    a = score[..., :, None]  # entry j
    b = score[..., None, :]  # entry i
    i = jnp.arange(m)
    before = (b < a) | ((b == a) & (i[None, :] < i[:, None]))
    return jnp.sum(before, axis=-1)


@functools.partial(jax.jit, static_argnames=("plan",))
def sweep(W, U, scale_tab, zero_tab, gidx, kblock, *, plan: Sweep):
    """Run the fixed-order OBS sweep with lazy block updates.

    Args:
      W: ``(rows, n)`` weights in processing order, ``n`` a multiple of ``plan.block`` (padding
        columns zero).
      U: ``(n, n)`` upper Cholesky factor of ``H⁻¹`` in processing order (identity on padding).
      scale_tab, zero_tab: ``(rows, G)`` grid parameter table; column ``j`` uses group
        ``gidx[j]``. With ``plan.dyn_spec`` the table is (re)filled as the sweep goes, group
        ``j // unit`` for column ``j``.
      gidx: ``(n,)`` int32 group of each column (processing order).
      kblock: ``(n // block,)`` int32 number of entries to prune in each block (unstructured).
      plan: static :class:`Sweep`.

    Returns:
      ``(W_final, keep, row_loss, scale_tab, zero_tab)``: the fixed values, the bool mask of kept
      entries (all True unless pruning), ``(rows,)`` summed step losses ``e²/2`` and the final
      grid tables.
    """
    rows, n = W.shape
    dtype = W.dtype
    B, S, unit = plan.block, plan.sub, plan.unit
    nb = n // B
    quant = plan.bits is not None
    prune = plan.prune != "none"

    def block_body(b, carry):
        W, keep, loss, stab, ztab = carry
        i1 = b * B
        W1 = jax.lax.dynamic_slice(W, (0, i1), (rows, B))
        U1 = jax.lax.dynamic_slice(U, (i1, i1), (B, B))
        d1 = jnp.diagonal(U1)
        if plan.prune == "unstructured":
            real = (i1 + jnp.arange(B)) < plan.cols
            score = jnp.where(real[None, :], (W1 * W1) / (d1 * d1)[None, :], jnp.inf)
            K1 = ~smallest_k(score, kblock[b])
        else:
            K1 = jnp.ones((rows, B), bool)
        E1 = jnp.zeros((rows, B), dtype)

        def sub_body(s, st):
            W1, K1, E1, loss, stab, ztab = st
            j0 = s * S
            Ws = jax.lax.dynamic_slice(W1, (0, j0), (rows, S))  # values at sub-block start
            Us = jax.lax.dynamic_slice(U1, (j0, j0), (S, S))
            Ks = jax.lax.dynamic_slice(K1, (0, j0), (rows, S))
            Es = jnp.zeros((rows, S), dtype)

            def current(Es, c0, width):
                # left-looking: the sub-block's own updates are applied when a column is read,
                # ``w = w0 - Es Us[:, cols]`` (Es is zero right of the columns fixed so far), so
                # a column step reads Es once and writes one column instead of rewriting Ws
                W0 = jax.lax.dynamic_slice(Ws, (0, c0), (rows, width))
                Uc = jax.lax.dynamic_slice(Us, (0, c0), (S, width))
                return W0 - jnp.matmul(Es, Uc, precision=_HP)

            def unit_body(u, st):
                Qs, Ks, Es, loss, stab, ztab = st
                c0 = u * unit
                if plan.dyn_spec is not None:
                    sc, ze = find_params(current(Es, c0, unit), plan.dyn_spec)
                    g = (i1 + j0 + c0) // unit
                    stab = jax.lax.dynamic_update_slice(stab, sc.astype(dtype), (0, g))
                    ztab = jax.lax.dynamic_update_slice(ztab, ze.astype(dtype), (0, g))
                if plan.prune == "nm":
                    du = jax.lax.dynamic_slice(jnp.diagonal(Us), (c0,), (unit,))
                    Wu = current(Es, c0, unit)
                    score = (Wu * Wu) / (du * du)[None, :]
                    Ku = rank_in_row(score) >= plan.nm_n
                    Ks = jax.lax.dynamic_update_slice(Ks, Ku, (0, c0))

                def col_body(k, st):
                    Qs, Es, loss = st
                    j = c0 + k
                    w = current(Es, j, 1)[:, 0]
                    q = w
                    if prune:
                        kp = jax.lax.dynamic_index_in_dim(Ks, j, axis=1, keepdims=False)
                        q = jnp.where(kp, q, jnp.zeros((), dtype))
                    if quant:
                        g = gidx[i1 + j0 + j]
                        sg = jax.lax.dynamic_index_in_dim(stab, g, axis=1, keepdims=False)
                        zg = jax.lax.dynamic_index_in_dim(ztab, g, axis=1, keepdims=False)
                        q = quantize(q, sg, zg, plan.bits)
                    e = (w - q) / jax.lax.dynamic_slice(Us, (j, j), (1, 1))[0, 0]
                    Qs = jax.lax.dynamic_update_index_in_dim(Qs, q, j, axis=1)
                    Es = jax.lax.dynamic_update_index_in_dim(Es, e, j, axis=1)
                    return Qs, Es, loss + 0.5 * e * e

                Qs, Es, loss = jax.lax.fori_loop(0, unit, col_body, (Qs, Es, loss))
                return Qs, Ks, Es, loss, stab, ztab

            Qs = jnp.zeros((rows, S), dtype)
            Ws, Ks, Es, loss, stab, ztab = jax.lax.fori_loop(
                0, S // unit, unit_body, (Qs, Ks, Es, loss, stab, ztab)
            )
            # lazy flush of the sub-block onto the rest of the block (columns left of the
            # sub-block meet zeros of the triangular U; the sub-block itself is written back)
            Ur = jax.lax.dynamic_slice(U1, (j0, 0), (S, B))
            W1 = W1 - jnp.matmul(Es, Ur, precision=_HP)
            W1 = jax.lax.dynamic_update_slice(W1, Ws, (0, j0))
            K1 = jax.lax.dynamic_update_slice(K1, Ks, (0, j0))
            E1 = jax.lax.dynamic_update_slice(E1, Es, (0, j0))
            return W1, K1, E1, loss, stab, ztab

        W1, K1, E1, loss, stab, ztab = jax.lax.fori_loop(
            0, B // S, sub_body, (W1, K1, E1, loss, stab, ztab)
        )
        W = jax.lax.dynamic_update_slice(W, W1, (0, i1))
        if prune:
            keep = jax.lax.dynamic_update_slice(keep, K1, (0, i1))

        # lazy flush of the block onto the columns to its right, one block-wide slab at a time
        # so that no flops are spent on the (zero) lower triangle of U
        def trail(c, W):
            c0 = c * B
            Wc = jax.lax.dynamic_slice(W, (0, c0), (rows, B))
            Uc = jax.lax.dynamic_slice(U, (i1, c0), (B, B))
            Wc = Wc - jnp.matmul(E1, Uc, precision=_HP)
            return jax.lax.dynamic_update_slice(W, Wc, (0, c0))

        W = jax.lax.fori_loop(b + 1, nb, trail, W)
        return W, keep, loss, stab, ztab

    keep = jnp.ones((rows, n), bool)
    loss = jnp.zeros((rows,), dtype)
    carry = (W, keep, loss, scale_tab.astype(dtype), zero_tab.astype(dtype))
    return jax.lax.fori_loop(0, nb, block_body, carry)


@jax.jit
def cholesky_upper_inverse(Hinv, perm):
    """Upper Cholesky factor ``U`` of ``Hinv[perm][:, perm]`` (``UᵀU = Hinv``), and a finite flag."""
    Hp = Hinv[perm][:, perm]
    Hp = 0.5 * (Hp + Hp.T)
    U = jnp.linalg.cholesky(Hp).T
    ok = jnp.all(jnp.isfinite(U)) & jnp.all(jnp.diagonal(U) > 0)
    return U, ok


def pad_problem(W, U, n: int):
    """Pad ``W`` with zero columns and ``U`` with an identity block up to ``n`` columns."""
    rows, cols = W.shape
    if n == cols:
        return W, U
    Wp = jnp.zeros((rows, n), W.dtype).at[:, :cols].set(W)
    Up = jnp.eye(n, dtype=U.dtype).at[:cols, :cols].set(U)
    return Wp, Up


def factor_core(P: Prepared, perm):
    """Upper Cholesky factor of the prepared ``H⁻¹`` in ``perm`` order, and the new status.

    Pure (traceable): a failed factorisation is :attr:`~obcjax.kernels.Status.FACTOR_FAILED` in
    the returned status; :func:`raise_factor_failed` turns it into the host error.
    """
    U, ok = cholesky_upper_inverse(P.Hinv, jnp.asarray(perm, jnp.int32))
    status = P.status if P.status is not None else jnp.asarray(Status.OK, jnp.int32)
    return U, jnp.where(ok, status, Status.FACTOR_FAILED).astype(jnp.int32)


def raise_factor_failed(res: Result, layer: str) -> Result:
    """Host check after a staged GPTQ/SparseGPT solve: a failed factorisation names ``layer``.

    A no-op under a trace (the status then carries it) and for any other status.
    """
    if not is_traced(res.status) and int(res.status) == Status.FACTOR_FAILED:
        damp = float(res.damp) if res.damp is not None else float("nan")
        raise ValueError(
            f"layer {layer!r}: the Cholesky factorisation of the inverse Hessian failed "
            f"(damping {damp:.3g}); raise rel_damp"
        )
    return res


def check_blocksize(blocksize, layer: str) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int | np.integer) or blocksize < 1:
        raise ValueError(f"layer {layer!r}: blocksize must be a positive int, got {blocksize!r}")
    return int(blocksize)


def gptq_quantize(
    W,
    H,
    spec: Int,
    *,
    blocksize: int = 128,
    act_order: bool = False,
    static_groups: bool = False,
    rel_damp: float = 0.01,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
) -> Result:
    """GPTQ quantization of one layer (Frantar et al., ICLR 2023).

    Columns are fixed in order (natural, or by descending ``diag(H)`` with ``act_order``), each
    to its grid point, and the error is compensated on the columns not yet fixed with the OBS
    update of the prepared Hessian. Equal to :func:`obcjax.kernels.obq_quantize` with
    ``order="natural", outlier_rule=False`` up to round-off, for every ``blocksize``.

    Grids (``obcjax.quant``): per-channel / per-tensor parameters come from
    ``find_params(prep.W, spec)`` on the whole (prepared) matrix. With
    ``spec.granularity == "group"`` the parameters of each group of ``spec.group_size``
    consecutive columns are either recomputed when the sweep reaches the group's first column,
    on the current (already error-compensated) weights (default, GPTQ's ``--groupsize``), or
    with ``static_groups=True`` precomputed on the prepared weights before any update (GPTQ's
    ``--static-groups``). Groups always index original columns, so the returned ``QArray`` has
    the usual layout: ``scale[:, k]`` serves original columns ``k·g … (k+1)·g - 1``.

    ``act_order`` with dynamic groups would form groups of columns that are scattered in the
    original order (GPTQ then needs a per-column ``g_idx`` at inference); that combination is
    refused, use ``static_groups=True``.

    Args:
      W: ``(rows, cols)`` weights (out × in), float32 or float64.
      H: ``(cols, cols)`` Hessian ``2/N Σ x xᵀ``.
      spec: the grid, an :class:`obcjax.specs.Int`.
      blocksize: lazy-update block width (speed only; rounded up to a multiple of the sub-block
        and of the group size).
      act_order: process columns by descending ``diag(H)``.
      static_groups: with group-wise grids, fix the groups' parameters before the sweep.
      rel_damp: relative damping of ``H``.
      layer: name used in error messages.
      prepared: a :class:`Prepared` from :func:`obcjax.kernels.prepare` to reuse (then ``W``,
        ``H`` and ``rel_damp`` only serve the checks).

    Returns:
      A :class:`Result`: dequantized ``weights`` ``(rows, cols)``, ``mask=None``, ``qarray``
      with the integer codes, ``loss`` (the sum of the step losses ``(w - q)² / (2 U_ii²)``,
      equal to ``layer_loss(prep.W, weights, prep.H)``) and ``row_loss`` ``(rows,)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = gptq_quantize(W, H, Int(bits=4, sym=False, search="minmax"))
      >>> bool(jnp.all(r.qarray.dequantize() == r.weights))
      True
    """
    spec = as_quant(spec, what="spec", layer=layer)
    if spec is None:
        raise TypeError(
            f"layer {layer!r}: spec: expected a number of bits in 2..8 (4, 'w4') or an Int spec, "
            "got None"
        )
    blocksize = check_blocksize(blocksize, layer)
    check_fits(spec, matrix_cols(W, layer), layer)
    grouped = spec.granularity == "group"
    if act_order and grouped and not static_groups:
        raise ValueError(
            f"layer {layer!r}: act_order with group-wise grids needs static_groups=True (dynamic "
            "groups in act-order would mix columns from different original groups); pass "
            "static_groups=True, or act_order=False"
        )
    P, out = setup(W, H, rel_damp, layer, prepared)
    res = run_staged(
        P, _gptq_body, out, spec=spec, blocksize=blocksize, act_order=bool(act_order),
        static_groups=bool(static_groups),
    )
    return raise_factor_failed(res, layer)


def _gptq_body(P: Prepared, *, spec: Int, blocksize: int, act_order: bool, static_groups: bool):
    """GPTQ on a prepared problem in solver units (pure; staged by :func:`gptq_quantize`)."""
    grouped = spec.granularity == "group"
    rows, cols = P.W.shape
    dtype = P.W.dtype
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(P.H), stable=True).astype(jnp.int32)
    else:
        perm = jnp.arange(cols, dtype=jnp.int32)
    dynamic = grouped and not static_groups
    unit = spec.group_size if dynamic else 1
    block, sub = plan_sizes(blocksize, unit, keep_block=False)
    n = round_up(cols, block)
    U, status = factor_core(P, perm)
    Wp, Up = pad_problem(P.W[:, perm], U, n)

    if dynamic:
        g = spec.group_size
        ngroups = n // g
        stab = jnp.ones((rows, ngroups), dtype)
        ztab = jnp.zeros((rows, ngroups), dtype)
        gidx = np.arange(n) // g
    else:
        scale, zero = find_params(P.W, spec)
        G = scale.shape[1]
        # one extra inert group (scale 1, zero 0) for the padding columns
        stab = jnp.concatenate([scale, jnp.ones((rows, 1), dtype)], axis=1)
        ztab = jnp.concatenate([zero, jnp.zeros((rows, 1), dtype)], axis=1)
        gsize = cols // G
        gidx = jnp.concatenate([perm // gsize, jnp.full((n - cols,), G, jnp.int32)])

    plan = Sweep(
        cols=cols,
        block=block,
        sub=sub,
        unit=unit,
        bits=spec.bits,
        dyn_spec=spec if dynamic else None,
    )
    kblock = jnp.zeros((n // block,), jnp.int32)
    Wq, _, row_loss, stab, ztab = sweep(
        Wp, Up, stab, ztab, jnp.asarray(gidx, jnp.int32), kblock, plan=plan
    )
    inv = jnp.argsort(perm)
    Wq = Wq[:, :cols][:, inv]
    if dynamic:
        scale, zero = stab[:, : cols // spec.group_size], ztab[:, : cols // spec.group_size]
    qa = make_qarray(Wq, scale, zero, spec)
    return Result(Wq, None, qa, jnp.sum(row_loss), row_loss, status)
