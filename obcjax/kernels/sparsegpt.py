"""SparseGPT: one-shot pruning (optionally with joint quantization) in GPTQ's fixed-order sweep.

Frantar, Alistarh, *SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot*,
ICML 2023 (arXiv 2301.00774).

The sweep is GPTQ's (:mod:`obcjax.kernels.gptq`): columns left to right, each fixed to its
target with the OBS update through the upper Cholesky factor ``U`` of the prepared ``H⁻¹``, lazy
block updates. The target of a pruned entry is 0, of a kept one its own value (or its grid point
with ``quant``). The mask is *adaptive*: it is chosen as the sweep goes, on the weights as updated
so far, with the OBS saliency ``w² / U_ii²``:

* unstructured: at the start of every block of ``blocksize`` columns, the block's entries with
  the smallest saliency are pruned, jointly over all rows of the block (so rows get different
  sparsities). The counts per block are ``K(end) - K(start)`` with
  ``K(c) = floor(s · rows · c + 0.5)``, so every block prunes its share and the layer has exactly
  ``floor(s · rows · cols + 0.5)`` zeros (the reference prunes ``int(s · rows · B) + 1`` per
  block through a ``<=`` threshold);
* N:M: when the sweep reaches the first column of a group of ``m``, every row prunes its ``n``
  entries of smallest saliency in the group (ties: the lower column).

Pruned weights are exactly 0. Joint quantization finds the grid on the dense prepared ``W``
before pruning (as the reference) and puts every kept weight on it; 0 is on every grid, so
pruned weights get the zero-point code.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from obcjax.kernels.exactobs import Result, run_staged, setup
from obcjax.kernels.gptq import (
    Sweep,
    check_blocksize,
    factor_core,
    pad_problem,
    plan_sizes,
    raise_factor_failed,
    round_up,
    sweep,
)
from obcjax.kernels.prepare import Prepared, matrix_cols
from obcjax.quant import find_params, make_qarray
from obcjax.specs import NM, Block, Int, Unstructured, as_prune, as_quant, check_fits

__all__ = ["sparsegpt_prune", "block_counts", "as_prune_spec"]


def block_counts(sparsity: float, rows: int, cols: int, block: int) -> np.ndarray:
    """Entries to prune in each block of ``block`` columns: ``K(end) - K(start)``.

    ``K(c) = floor(sparsity · rows · c + 0.5)``, so the counts add up to the layer's
    ``floor(sparsity · rows · cols + 0.5)`` and each block prunes its proportional share.
    """
    ends = np.minimum(np.arange(1, -(-cols // block) + 1) * block, cols)
    K = np.array([math.floor(sparsity * rows * int(e) + 0.5) for e in ends], np.int64)
    return np.diff(np.concatenate([[0], K])).astype(np.int32)


def as_prune_spec(prune, layer: str = "<matrix>") -> Unstructured | NM:
    """``prune`` as a spec: a fraction of zeros becomes :class:`Unstructured`; errors name ``layer``."""
    if isinstance(prune, Unstructured | NM):
        return prune
    if not isinstance(prune, Block):
        try:
            spec = as_prune(prune, what="prune", layer=layer)
        except TypeError:
            spec = None
        if spec is not None:
            return spec
    hint = (
        "; block pruning has no SparseGPT form, use exactobs_block"
        if isinstance(prune, Block)
        else ""
    )
    raise TypeError(
        f"layer {layer!r}: prune must be a sparsity in [0, 1), obcjax.specs.Unstructured or "
        f"obcjax.specs.NM, got {prune!r}{hint}"
    )


def sparsegpt_prune(
    W,
    H,
    prune: float | Unstructured | NM,
    *,
    quant: Int | None = None,
    blocksize: int = 128,
    rel_damp: float = 0.01,
    layer: str = "<matrix>",
    prepared: Prepared | None = None,
) -> Result:
    """SparseGPT pruning of one layer, optionally quantizing the kept weights in the same pass.

    Args:
      W: ``(rows, cols)`` weights (out × in), float32 or float64.
      H: ``(cols, cols)`` Hessian ``2/N Σ x xᵀ``.
      prune: a fraction of zeros in ``[0, 1)`` or :class:`obcjax.specs.Unstructured` (layer-wide,
        adaptive mask per block), or :class:`obcjax.specs.NM` (``n`` zeros in every ``m``
        consecutive columns).
      quant: optional :class:`obcjax.specs.Int` grid for joint quantization, found on the dense
        prepared weights (any granularity; group grids are static).
      blocksize: for unstructured pruning the mask-selection window and lazy-update block (it
        changes the result); for N:M only a speed knob (rounded up to a multiple of ``m``).
      rel_damp: relative damping of ``H``.
      layer: name used in error messages.
      prepared: a :class:`Prepared` to reuse.

    Returns:
      A :class:`Result`: ``weights`` ``(rows, cols)`` with pruned entries exactly 0, ``mask``
      (True = kept), ``qarray`` when ``quant`` is given, ``loss`` = sum of the step losses
      ``(w - t)² / (2 U_ii²)`` (= ``layer_loss(prep.W, weights, prep.H)``) and ``row_loss``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = sparsegpt_prune(W, H, NM(2, 4))
      >>> bool(jnp.all(r.mask.reshape(W.shape[0], -1, 4).sum(-1) == 2))
      True
    """
    prune = as_prune_spec(prune, layer)
    quant = as_quant(quant, what="quant", layer=layer)
    blocksize = check_blocksize(blocksize, layer)
    cols = matrix_cols(W, layer)
    check_fits(prune, cols, layer)
    if quant is not None:
        check_fits(quant, cols, layer)
    P, out = setup(W, H, rel_damp, layer, prepared)
    res = run_staged(P, _sparsegpt_body, out, prune=prune, quant=quant, blocksize=blocksize)
    return raise_factor_failed(res, layer)


def _sparsegpt_body(P: Prepared, *, prune, quant, blocksize: int) -> Result:
    """SparseGPT on a prepared problem in solver units (pure; staged by :func:`sparsegpt_prune`)."""
    rows, cols = P.W.shape
    dtype = P.W.dtype

    if isinstance(prune, NM):
        block, sub = plan_sizes(blocksize, prune.m, keep_block=False)
        unit, mode = prune.m, "nm"
    else:
        block, sub = plan_sizes(blocksize, 1, keep_block=True)
        unit, mode = 1, "unstructured"
    n = round_up(cols, block)
    if mode == "unstructured":
        kblock = jnp.asarray(block_counts(prune.sparsity, rows, cols, block))
    else:
        kblock = jnp.zeros((n // block,), jnp.int32)

    U, status = factor_core(P, np.arange(cols))
    Wp, Up = pad_problem(P.W, U, n)
    if quant is not None:
        scale, zero = find_params(P.W, quant)
        G = scale.shape[1]
        stab = jnp.concatenate([scale, jnp.ones((rows, 1), dtype)], axis=1)
        ztab = jnp.concatenate([zero, jnp.zeros((rows, 1), dtype)], axis=1)
        gidx = np.concatenate([np.arange(cols) // (cols // G), np.full(n - cols, G)])
    else:
        stab = jnp.ones((rows, 1), dtype)
        ztab = jnp.zeros((rows, 1), dtype)
        gidx = np.zeros((n,), np.int64)

    plan = Sweep(
        cols=cols,
        block=block,
        sub=sub,
        unit=unit,
        bits=None if quant is None else quant.bits,
        prune=mode,
        nm_n=prune.n if mode == "nm" else 0,
    )
    Wf, keep, row_loss, _, _ = sweep(
        Wp, Up, stab, ztab, jnp.asarray(gidx, jnp.int32), kblock, plan=plan
    )
    Wf, keep = Wf[:, :cols], keep[:, :cols]
    qa = None if quant is None else make_qarray(Wf, scale, zero, quant)
    return Result(Wf, keep, qa, jnp.sum(row_loss), row_loss, status)
