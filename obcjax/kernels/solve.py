"""One dispatcher from a (prune, quant, solver) spec to the solver that computes it.

``compress``, ``prune_levels``, the database of levels and the CLI all go through :func:`solve`,
so each combination has one meaning everywhere. Like the solvers it is pure in ``W`` and ``H``:
``jax.vmap(lambda W, H: solve(W, H, "2:4", None, "obc"))`` solves stacked problems in one call.
"""

from __future__ import annotations

import jax.numpy as jnp

from obcjax.kernels._engine import AUTO_FAST_COLS
from obcjax.kernels.baselines import magnitude_nm, magnitude_prune, rtn_quantize
from obcjax.kernels.exactobs import (
    CACHE_BYTES,
    DEFAULT_MEMORY_BYTES,
    Result,
    exactobs_block,
    exactobs_nm,
    exactobs_prune,
    obq_prune_quantize,
    obq_quantize,
    setup,
)
from obcjax.kernels.gptq import gptq_quantize
from obcjax.kernels.prepare import matrix_cols
from obcjax.kernels.sparsegpt import sparsegpt_prune
from obcjax.specs import (
    GPTQ,
    NM,
    OBQ,
    SOLVER_NAMES,
    Block,
    ExactOBS,
    Magnitude,
    SparseGPT,
    Unstructured,
    as_prune,
    as_quant,
    as_solver,
    check_fits,
)

__all__ = ["solve", "solver_options", "solve_bytes", "SOLVER_NAMES"]


def solver_options(solver, prune, quant, method: str | None = None):
    """The option record that computes ``(prune, quant)`` for ``solver`` (a name or a record).

    ``"obc"`` is :class:`~obcjax.specs.ExactOBS` for pruning and :class:`~obcjax.specs.OBQ` when
    quantizing (jointly with pruning too); ``"gptq"`` is :class:`~obcjax.specs.GPTQ` for
    quantization and :class:`~obcjax.specs.SparseGPT` when pruning; ``"magnitude"`` is
    :class:`~obcjax.specs.Magnitude`. A record of the other member of a family is converted
    (``GPTQ(blocksize=64)`` on a pruning spec is ``SparseGPT(blocksize=64)``).
    """
    solver = as_solver(solver)
    if isinstance(solver, str):
        if solver == "obc":
            m = method or "auto"
            return OBQ(method=m) if quant is not None else ExactOBS(method=m)
        if solver == "gptq":
            return SparseGPT() if prune is not None else GPTQ()
        return Magnitude()
    if isinstance(solver, ExactOBS) and quant is not None:
        return OBQ(method=solver.method)
    if isinstance(solver, OBQ) and quant is None:
        return ExactOBS(method=solver.method)
    if isinstance(solver, GPTQ) and prune is not None:
        return SparseGPT(blocksize=solver.blocksize)
    if isinstance(solver, SparseGPT) and prune is None:
        return GPTQ(blocksize=solver.blocksize)
    return solver


def solve_bytes(rows: int, cols: int, options, itemsize: int = 4) -> int:
    """A generous estimate of the working set of one :func:`solve` of a ``(rows, cols)`` matrix
    with the option record ``options`` (from :func:`solver_options`), in bytes.

    Callers that ``vmap`` many problems (``compress``) size their batches with it: the ExactOBS /
    OBQ engine keeps a ``(cols, cols)`` inverse per row in flight, chunked to the kernels' own
    memory budget; the other solvers hold a few ``(cols, cols)`` and ``(rows, cols)`` arrays.
    """
    base = itemsize * (3 * cols * cols + 8 * rows * cols)
    if isinstance(options, ExactOBS | OBQ):
        per_row = 3 * cols * cols * itemsize
        blocked = options.method in ("blocked", "fast") or (
            options.method == "auto" and cols >= AUTO_FAST_COLS
        )
        budget = CACHE_BYTES if blocked else DEFAULT_MEMORY_BYTES
        base += max(per_row, min(rows * per_row, budget))
    return base


def solve(
    W,
    H,
    prune=None,
    quant=None,
    solver="obc",
    *,
    rel_damp: float = 0.01,
    method: str | None = None,
    layer: str = "<matrix>",
    prepared=None,
    mesh=None,
) -> Result:
    """Compress one matrix as ``(prune, quant)`` says, with the solver ``solver`` names.

    Args:
      W: ``(rows, cols)`` weights.
      H: ``(cols, cols)`` Hessian.
      prune: None, a spec or a shorthand (``0.5``, ``"2:4"``, ``Block(0.5, 4)``).
      quant: None, an :class:`~obcjax.specs.Int` or a number of bits.
      solver: ``"obc"``, ``"gptq"``, ``"magnitude"`` or an option record (``GPTQ(...)``, ...).
      rel_damp: relative damping.
      method: the ExactOBS/OBQ engine for ``"obc"`` (overrides nothing when the record gives
        one).
      layer: name used in error messages.
      prepared: the problem already prepared by :func:`~obcjax.kernels.prepare` (skips that
        work; the ExactOBS / OBQ, GPTQ and SparseGPT solvers). mesh: rows split over a device
        mesh (the ExactOBS / OBQ solvers; the others run on one device).

    Returns:
      The solver's :class:`~obcjax.kernels.Result`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> X = jax.random.normal(jax.random.key(0), (64, 8))
      >>> W, H = jax.random.normal(jax.random.key(1), (4, 8)), 2 * X.T @ X / 64
      >>> r = solve(W, H, "2:4", 4, "gptq")
      >>> r.qarray.bits, int((~r.mask).sum())
      (4, 16)
    """
    prune = as_prune(prune, what="prune", layer=layer)
    quant = as_quant(quant, what="quant", layer=layer)
    if prune is None and quant is None:
        raise ValueError(f"layer {layer!r}: nothing to do (no pruning and no quantization)")
    cols = matrix_cols(W, layer)
    for s in (prune, quant):
        if s is not None:
            check_fits(s, cols, layer)
    opts = solver_options(solver, prune, quant, method)
    kw = dict(rel_damp=rel_damp, layer=layer)
    pre = {} if prepared is None else dict(prepared=prepared)
    obc = dict(pre, **({} if mesh is None else dict(mesh=mesh)))
    if isinstance(opts, Magnitude):
        if prune is None:
            return rtn_quantize(W, quant, H=H, **kw)
        if isinstance(prune, Block):
            raise ValueError(f"layer {layer!r}: magnitude baseline has no block pruning")
        if isinstance(prune, Unstructured):
            r = magnitude_prune(W, prune, H=H, **kw)
        else:
            r = magnitude_nm(W, prune, H=H, **kw)
        if quant is None:
            return r
        rq = rtn_quantize(r.weights, quant, **kw)
        Wq = jnp.where(r.mask, rq.weights, 0.0)
        # the loss against the prepared weights under the damped H, as the other solvers report
        P, _ = setup(W, H, rel_damp, layer, None)
        D = Wq.astype(P.W.dtype) / P.w_scale - P.W
        row = 0.5 * jnp.sum(jnp.matmul(D, P.H, precision="highest") * D, axis=1)
        unit = P.w_scale * P.w_scale * P.h_scale
        return Result(Wq, r.mask, rq.qarray, jnp.sum(row) * unit, row * unit, P.status,
                      P.damp * P.h_scale)
    if isinstance(opts, GPTQ):
        return gptq_quantize(W, H, quant, blocksize=opts.blocksize, act_order=opts.act_order,
                             static_groups=opts.static_groups, **pre, **kw)
    if isinstance(opts, SparseGPT):
        if isinstance(prune, Block):
            raise ValueError(f"layer {layer!r}: SparseGPT has no block pruning; use solver='obc'")
        return sparsegpt_prune(W, H, prune, quant=quant, blocksize=opts.blocksize, **pre, **kw)
    if isinstance(opts, OBQ):
        if prune is None:
            return obq_quantize(W, H, quant, outlier_rule=opts.outlier_rule, order=opts.order,
                                method=opts.method, **obc, **kw)
        return obq_prune_quantize(W, H, prune, quant, outlier_rule=opts.outlier_rule,
                                  method=opts.method, **obc, **kw)
    if isinstance(prune, Unstructured):
        return exactobs_prune(W, H, prune.sparsity, method=opts.method, **obc, **kw)
    if isinstance(prune, NM):
        return exactobs_nm(W, H, prune, method=opts.method, **obc, **kw)
    return exactobs_block(W, H, prune, **pre, **kw)
