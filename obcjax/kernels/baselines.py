"""Baselines with the solvers' signatures: magnitude pruning (layer-wise, N:M) and
round-to-nearest quantization. No compensation; the loss is reported when ``H`` is given.

Pure in ``W`` (and ``H``): they jit, vmap and shard like the solvers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from obcjax.kernels.exactobs import Result, finish, setup
from obcjax.kernels.gptq import rank_in_row
from obcjax.kernels.prepare import (
    Status,
    check_inputs,
    compute_dtype,
    is_traced,
    layer_loss,
    matrix_cols,
)
from obcjax.quant import expand_params, find_params, make_qarray, quantize
from obcjax.specs import NM, Int, Unstructured, as_prune, as_quant, check_fits

__all__ = ["magnitude_prune", "magnitude_nm", "rtn_quantize"]

_HP = jax.lax.Precision.HIGHEST


def _problem(W, H, rel_damp, layer):
    """``(W0, P, out_dtype)``: solver-units weights and preparation when ``H`` is given."""
    if H is None:
        matrix_cols(W, layer)  # a non-empty real (rows, cols) matrix, or the error naming layer
        W = jnp.asarray(W)
        out = W.dtype if jnp.issubdtype(W.dtype, jnp.floating) else jnp.float32
        W = W.astype(compute_dtype(W.dtype))
        if not is_traced(W) and not bool(np.all(np.isfinite(np.asarray(W)))):
            bad = int(np.sum(~np.isfinite(np.asarray(W))))
            raise ValueError(f"layer {layer!r}: W has {bad} non-finite entries (NaN or inf)")
        return W, None, out
    P, out = setup(W, H, rel_damp, layer, None)
    return P.W, P, out


def _finish(W0, What, mask, qa, P, out):
    if P is None:
        row = jnp.full((W0.shape[0],), jnp.nan, W0.dtype)
        ok = jnp.asarray(Status.OK, jnp.int32)
        return Result(What.astype(out), mask, qa, jnp.asarray(jnp.nan, W0.dtype), row, ok)
    D = What - W0
    row = 0.5 * jnp.sum(jnp.matmul(D, P.H, precision=_HP) * D, axis=1)
    return finish(Result(What, mask, qa, layer_loss(W0, What, P.H), row), P, out)


def magnitude_mask(W, sparsity: float):
    """Bool mask keeping all but the ``floor(s·rows·cols + 0.5)`` smallest ``|w|`` (stable)."""
    k = int(math.floor(sparsity * W.size + 0.5))
    idx = jnp.argsort(jnp.abs(W).ravel(), stable=True)[:k]
    return jnp.ones((W.size,), bool).at[idx].set(False).reshape(W.shape)


def magnitude_prune(
    W, sparsity: float | Unstructured, *, H=None, rel_damp: float = 0.01, layer: str = "<matrix>"
) -> Result:
    """Zero the ``floor(s·rows·cols + 0.5)`` smallest ``|w|`` of the layer (stable order)."""
    spec = as_prune(sparsity, what="sparsity", layer=layer)
    if not isinstance(spec, Unstructured):
        raise TypeError(f"layer {layer!r}: sparsity must be a fraction in [0, 1), got {sparsity!r}")
    W0, P, out = _problem(W, H, rel_damp, layer)
    mask = magnitude_mask(W0, spec.sparsity)
    return _finish(W0, jnp.where(mask, W0, 0.0), mask, None, P, out)


def magnitude_nm(
    W, n: int | NM | str, m: int | None = None, *, H=None, rel_damp: float = 0.01,
    layer: str = "<matrix>",
) -> Result:
    """Zero the ``n`` smallest ``|w|`` in every group of ``m`` consecutive columns.

    The pattern is ``magnitude_nm(W, NM(2, 4))``, ``magnitude_nm(W, "2:4")`` or
    ``magnitude_nm(W, 2, 4)``.
    """
    spec = as_prune(n, what="n:m pattern", layer=layer) if m is None else NM(n, m)
    if not isinstance(spec, NM):
        raise TypeError(f"layer {layer!r}: expected an N:M pattern (NM(2, 4), '2:4'), got {n!r}")
    check_fits(spec, matrix_cols(W, layer), layer)
    W0, P, out = _problem(W, H, rel_damp, layer)
    rows, cols = W0.shape
    g = jnp.abs(W0).reshape(rows, cols // spec.m, spec.m)
    mask = (rank_in_row(g) >= spec.n).reshape(rows, cols)
    return _finish(W0, jnp.where(mask, W0, 0.0), mask, None, P, out)


def rtn_quantize(
    W, spec: Int | int, *, H=None, rel_damp: float = 0.01, layer: str = "<matrix>"
) -> Result:
    """Round each weight to the nearest grid point (grid from ``find_params``)."""
    spec = as_quant(spec, what="spec", layer=layer)
    if spec is None:
        raise TypeError(
            f"layer {layer!r}: spec: expected a number of bits in 2..8 (4, 'w4') or an Int spec, "
            "got None"
        )
    check_fits(spec, matrix_cols(W, layer), layer)
    W0, P, out = _problem(W, H, rel_damp, layer)
    scale, zero = find_params(W0, spec)
    s, z = expand_params(scale, zero, W0.shape[1])
    Wq = quantize(W0, s, z, spec.bits)
    return _finish(W0, Wq, None, make_qarray(Wq, scale, zero, spec), P, out)


_ = check_inputs  # re-exported for callers that validate without preparing
