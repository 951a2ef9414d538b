"""Baselines with the solvers' signatures: magnitude pruning (layer-wise, N:M) and
round-to-nearest quantization. No compensation; the loss is reported when ``H`` is given."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from obcjax.kernels.exactobs import Result
from obcjax.kernels.prepare import check_inputs, layer_loss, prepare
from obcjax.quant import expand_params, find_params, make_qarray, quantize
from obcjax.specs import NM, Int, Unstructured, check_fits

__all__ = ["magnitude_prune", "magnitude_nm", "rtn_quantize"]


def _prepared_w(W, H, rel_damp, layer):
    if H is None:
        W = jnp.asarray(W)
        if W.ndim != 2:
            raise ValueError(f"layer {layer!r}: W must be (rows, cols), got shape {W.shape}")
        if not bool(jnp.all(jnp.isfinite(W))):
            raise ValueError(f"layer {layer!r}: W has non-finite entries")
        return W, None
    P = prepare(W, H, rel_damp=rel_damp, layer=layer)
    return P.W, P


def _finish(W0, What, mask, qa, P):
    if P is None:
        row = jnp.full((W0.shape[0],), jnp.nan, W0.dtype)
        return Result(What, mask, qa, jnp.asarray(jnp.nan, W0.dtype), row)
    D = What - W0
    row = 0.5 * jnp.sum(jnp.matmul(D, P.H, precision="highest") * D, axis=1)
    return Result(What, mask, qa, layer_loss(W0, What, P.H), row)


def magnitude_prune(
    W, sparsity: float, *, H=None, rel_damp: float = 0.01, layer: str = "<matrix>"
) -> Result:
    """Zero the ``floor(s·rows·cols + 0.5)`` smallest ``|w|`` of the layer (stable order)."""
    try:
        s = Unstructured(sparsity).sparsity
    except (TypeError, ValueError) as e:
        raise type(e)(f"layer {layer!r}: {e}") from e
    W0, P = _prepared_w(W, H, rel_damp, layer)
    Wn = np.asarray(W0)
    k = int(math.floor(s * Wn.size + 0.5))
    idx = np.argsort(np.abs(Wn).ravel(), kind="stable")[:k]
    mask = np.ones(Wn.size, bool)
    mask[idx] = False
    mask = jnp.asarray(mask.reshape(Wn.shape))
    return _finish(W0, jnp.where(mask, W0, 0.0), mask, None, P)


def magnitude_nm(
    W, n: int, m: int, *, H=None, rel_damp: float = 0.01, layer: str = "<matrix>"
) -> Result:
    """Zero the ``n`` smallest ``|w|`` in every group of ``m`` consecutive columns."""
    spec = NM(n, m)
    W0, P = _prepared_w(W, H, rel_damp, layer)
    check_fits(spec, W0.shape[1], layer)
    rows, cols = W0.shape
    g = np.abs(np.asarray(W0)).reshape(rows, cols // m, m)
    ranks = np.argsort(np.argsort(g, axis=-1, kind="stable"), axis=-1, kind="stable")
    mask = jnp.asarray((ranks >= n).reshape(rows, cols))
    return _finish(W0, jnp.where(mask, W0, 0.0), mask, None, P)


def rtn_quantize(
    W, spec: Int, *, H=None, rel_damp: float = 0.01, layer: str = "<matrix>"
) -> Result:
    """Round each weight to the nearest grid point (grid from ``find_params``)."""
    if not isinstance(spec, Int):
        raise TypeError(f"layer {layer!r}: spec must be obcjax.specs.Int, got {spec!r}")
    W0, P = _prepared_w(W, H, rel_damp, layer)
    check_fits(spec, W0.shape[1], layer)
    scale, zero = find_params(W0, spec)
    s, z = expand_params(scale, zero, W0.shape[1])
    Wq = quantize(W0, s, z, spec.bits)
    return _finish(W0, Wq, None, make_qarray(Wq, scale, zero, spec), P)


_ = check_inputs  # re-exported for callers that validate without preparing
