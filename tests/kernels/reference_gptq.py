"""Slow, obvious float64 NumPy references for GPTQ and SparseGPT (no JAX, no lazy blocks).

Written from the algorithm descriptions (obc.md §1.2, §4, §5 and the kernel contract), not from
the JAX kernels: one column at a time, every update applied to the whole matrix at once, and the
inverse Hessian downdated explicitly (the Schur complement form of OBS) instead of read from a
Cholesky factor. The only use of a Cholesky factor is SparseGPT's saliency ``w² / U_ii²``,
where ``U_ii²`` is, by definition, the diagonal of the downdated inverse at column ``i``.
"""

from __future__ import annotations

import math

import numpy as np

# --------------------------------------------------------------------------------------------
# preparation and grid (obcjax.kernels.prepare / obcjax.quant conventions)
# --------------------------------------------------------------------------------------------


def prepare_np(W, H, rel_damp=0.01):
    """Dead columns, relative damping, inverse: returns ``(W, H, Hinv)`` in float64."""
    W = np.array(W, np.float64)
    H = np.array(H, np.float64)
    dead = np.diag(H) == 0
    H[dead, dead] = np.mean(np.diag(H)[~dead]) if (~dead).any() else 1.0
    W[:, dead] = 0.0
    H = 0.5 * (H + H.T)
    H = H + rel_damp * np.mean(np.diag(H)) * np.eye(H.shape[0])
    Hinv = np.linalg.inv(H)
    return W, H, 0.5 * (Hinv + Hinv.T)


def grid_range_np(xmin, xmax, bits, sym):
    maxq = 2**bits - 1
    if sym:
        xmax = np.maximum(np.abs(xmin), xmax)
        xmin = -xmax
    both = (xmin == 0) & (xmax == 0)
    xmin = np.where(both, -1.0, xmin)
    xmax = np.where(both, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = np.full_like(scale, 2 ** (bits - 1)) if sym else np.round(-xmin / scale)
    return scale, zero


def quantize_np(x, scale, zero, bits):
    q = np.clip(np.round(x / scale) + zero, 0, 2**bits - 1)
    return scale * (q - zero)


def find_params_np(X, spec):
    """Per-row grid of ``X: (rows, k)`` (one group): ``(scale, zero)`` each ``(rows,)``."""
    xmin = np.minimum(X.min(axis=1), 0.0)
    xmax = np.maximum(X.max(axis=1), 0.0)
    scale, zero = grid_range_np(xmin, xmax, spec.bits, spec.sym)
    if spec.search == "lp":
        best = np.full(scale.shape, np.inf)
        z0 = zero
        for i in range(int(spec.maxshrink * spec.grid)):
            p = 1.0 - i / spec.grid
            s1, z1 = grid_range_np(p * xmin, p * xmax, spec.bits, spec.sym)
            if spec.sym:
                z1 = z0
            err = np.sum(
                np.abs(quantize_np(X, s1[:, None], z1[:, None], spec.bits) - X) ** spec.p, 1
            )
            better = err < best
            best = np.where(better, err, best)
            scale = np.where(better, s1, scale)
            zero = np.where(better, z1, zero)
    return scale, zero


def grid_table_np(W, spec):
    """Per-row, per-group parameters ``(rows, ngroups)`` for a whole matrix."""
    rows, cols = W.shape
    if spec.granularity == "tensor":
        s, z = find_params_np(W.reshape(1, -1), spec)
        return np.full((rows, 1), s[0]), np.full((rows, 1), z[0])
    g = spec.group_size if spec.granularity == "group" else cols
    out = [find_params_np(W[:, k : k + g], spec) for k in range(0, cols, g)]
    return np.stack([o[0] for o in out], 1), np.stack([o[1] for o in out], 1)


# --------------------------------------------------------------------------------------------
# the OBS step in explicit-inverse form
# --------------------------------------------------------------------------------------------


def obs_fix(W, Hinv, i, target):
    """Fix column ``i`` of every row to ``target`` and compensate; returns the step losses."""
    d = Hinv[i, i]
    err = W[:, i] - target
    W -= np.outer(err / d, Hinv[i, :])
    W[:, i] = target
    Hinv -= np.outer(Hinv[:, i], Hinv[i, :]) / d
    Hinv[i, :] = 0.0
    Hinv[:, i] = 0.0
    return err**2 / (2 * d)


def gptq_np(W, H, spec, *, act_order=False, static_groups=False, rel_damp=0.01):
    """GPTQ, one column at a time. Returns ``(weights, codes, scale, zero, row_loss)``."""
    W, H, Hinv = prepare_np(W, H, rel_damp)
    W0 = W.copy()
    rows, cols = W.shape
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(cols)
    grouped = spec.granularity == "group"
    g = spec.group_size if grouped else cols
    scale, zero = grid_table_np(W0, spec)  # static / per-channel grid on the prepared weights
    loss = np.zeros(rows)
    for t, i in enumerate(order):
        if grouped and not static_groups and t % g == 0:
            # dynamic group: grid of the next g columns as they are now (natural order only)
            s, z = find_params_np(W[:, i : i + g], spec)
            scale[:, i // g], zero[:, i // g] = s, z
        k = i // g if grouped else 0
        q = quantize_np(W[:, i], scale[:, k], zero[:, k], spec.bits)
        loss += obs_fix(W, Hinv, i, q)
    sc = np.repeat(scale, g if grouped else cols, axis=1)
    zc = np.repeat(zero, g if grouped else cols, axis=1)
    codes = np.clip(np.round(W / sc) + zc, 0, 2**spec.bits - 1).astype(np.int64)
    return W, codes, scale, zero, loss


def sparsegpt_np(W, H, prune, *, quant=None, blocksize=128, rel_damp=0.01):
    """SparseGPT, one column at a time. Returns ``(weights, keep_mask, row_loss)``.

    ``prune`` is an ``Unstructured`` or ``NM`` spec (``obcjax.specs``).
    """
    W, H, Hinv = prepare_np(W, H, rel_damp)
    rows, cols = W.shape
    # U_ii² = diagonal of the inverse after columns 0..i-1 are eliminated
    Udiag2 = np.diag(np.linalg.cholesky(Hinv).T) ** 2
    if quant is not None:
        scale, zero = grid_table_np(W, quant)
        g = quant.group_size if quant.granularity == "group" else cols
    keep = np.ones((rows, cols), bool)
    loss = np.zeros(rows)
    nm = hasattr(prune, "m")
    s = prune.sparsity
    for i in range(cols):
        if not nm and i % blocksize == 0:
            end = min(i + blocksize, cols)
            k = math.floor(s * rows * end + 0.5) - math.floor(s * rows * i + 0.5)
            score = (W[:, i:end] ** 2 / Udiag2[None, i:end]).ravel()
            pruned = np.argsort(score, kind="stable")[:k]
            blk = np.ones(score.size, bool)
            blk[pruned] = False
            keep[:, i:end] = blk.reshape(rows, end - i)
        if nm and i % prune.m == 0:
            score = W[:, i : i + prune.m] ** 2 / Udiag2[None, i : i + prune.m]
            for r in range(rows):
                smallest = np.argsort(score[r], kind="stable")[: prune.n]
                keep[r, i + smallest] = False
        target = np.where(keep[:, i], W[:, i], 0.0)
        if quant is not None:
            target = quantize_np(target, scale[:, i // g], zero[:, i // g], quant.bits)
        loss += obs_fix(W, Hinv, i, target)
    return W, keep, loss


def layer_loss_np(W, What, H):
    D = What - W
    return 0.5 * np.sum((D @ H) * D)


def correlated_problem(rows, cols, *, seed=0, samples=None, dead=()):
    """A layer as in ANCHORS.md: ``W ~ N(0, 1/cols)``, ``X = Z·A`` with a decaying spectrum.

    Returns float64 ``(W, H, X)`` with ``H = 2/N XᵀX``; columns in ``dead`` never fire.
    """
    rng = np.random.default_rng(seed)
    Q, _ = np.linalg.qr(rng.normal(size=(cols, cols)))
    A = Q / np.sqrt(1.0 + np.arange(cols))[:, None]
    X = rng.normal(size=(samples or 2 * cols, cols)) @ A
    X[:, list(dead)] = 0.0
    W = rng.normal(size=(rows, cols)) / np.sqrt(cols)
    H = (2.0 / X.shape[0]) * (X.T @ X)
    return W, H, X
