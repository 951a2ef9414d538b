"""Hessian preparation shared by every solver: checks, scale, dead inputs, damping, inverse.

The layer loss ``||W X - Ŵ X||²`` decouples over rows, each row seeing the same Hessian
``H = 2/N Σ x xᵀ`` (Frantar, Singh, Alistarh, *Optimal Brain Compression*, 2022, §3).
Before any solver runs, :func:`prepare_core` (pure: it jits, vmaps and shards) does:

1. **Checks as a status.** Non-finite ``W`` or ``H``, an asymmetric ``H``, a negative diagonal, a
   Hessian with no signal (every diagonal entry zero or subnormal) and a failed factorisation are
   reported in :attr:`Prepared.status` (a :class:`Status` code), never raised inside a trace.
2. **Scale.** Where ``max |W|`` lies outside ``[2⁻¹⁶, 2¹⁶]``, ``W`` is divided by the power of two
   nearest to it; where the mean live diagonal of ``H`` lies outside ``[4⁻¹⁰, 4¹⁰]``, ``H`` is
   divided by the nearest power of four. Powers of two (four for ``H``, so that square roots stay
   exact) make the scaling exact in floating point, so the results do not depend on the scale of
   ``W`` or ``H`` beyond round-off (no overflow at ``W·1e20``, no underflow at ``H·1e-30``), and
   ordinary inputs compute exactly as given.
3. **Dead inputs** (``diag(H) == 0``: an input that never fired) get ``H_jj`` = the mean live
   diagonal and a zero weight column, so they are pruned for free and cannot break the Cholesky.
   (The OBC reference sets ``H_jj = 1``, which makes the damping depend on the scale of ``H``.)
4. **Relative damping** ``H += rel_damp · mean(diag H) · I`` (default 1%).
5. ``H⁻¹`` through a Cholesky factorisation checked for finiteness and positive pivots. If it
   fails the damping is raised ×10 (at most 5 times) inside the trace (a bounded
   ``lax.while_loop``); the status then says :attr:`Status.DAMPING_RAISED`.

The host wrapper :func:`prepare` validates shapes, runs the core and turns a bad status into a
``ValueError`` naming the layer (:func:`raise_for_status`); for a raised damping it also checks on
the host whether ``H`` is clearly indefinite, as a sum of outer products never is.
"""

from __future__ import annotations

import contextlib
import enum
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "Prepared",
    "Status",
    "prepare",
    "prepare_core",
    "raise_for_status",
    "layer_loss",
    "check_inputs",
    "matrix_cols",
    "is_traced",
]

_HP = jax.lax.Precision.HIGHEST
MAX_DAMP_TRIES = 6


class Status(enum.IntEnum):
    """What happened while preparing (and solving) one problem; ``status >= NONFINITE_W`` is bad.

    ``OK`` and ``DAMPING_RAISED`` carry a valid result; every other code marks a problem whose
    result must not be used (the host wrappers raise a ``ValueError`` naming the layer).
    """

    OK = 0
    DAMPING_RAISED = 1  # the Cholesky needed more damping than asked; result valid
    NONFINITE_W = 2
    NONFINITE_H = 3
    ASYMMETRIC_H = 4
    INDEFINITE_H = 5  # a negative diagonal entry
    NO_SIGNAL = 6  # every diagonal entry of H is zero or subnormal
    FACTOR_FAILED = 7  # Cholesky failed even at the largest damping


class Prepared(NamedTuple):
    """A weight matrix and Hessian ready for the solvers.

    Attributes:
      W: ``(rows, cols)`` weights with dead columns zeroed.
      H: ``(cols, cols)`` Hessian with dead diagonal entries set to the mean live diagonal, then
        damped.
      Hinv: ``(cols, cols)`` inverse of ``H``.
      dead: ``(cols,)`` bool, True where the original diagonal was 0.
      damp: absolute damping added to the diagonal (a scalar array).
      status: ``()`` int32 :class:`Status` code.
      w_scale, h_scale: the powers of two that ``W`` and ``H`` were divided by. :func:`prepare`
        returns the record in the caller's units (``W``, ``H``, ``Hinv`` scaled back);
        :func:`prepare_core` returns it in the solvers' units (``W / w_scale``, ``H / h_scale``).
    """

    W: jax.Array
    H: jax.Array
    Hinv: jax.Array
    dead: jax.Array
    damp: jax.Array
    status: jax.Array | None = None
    w_scale: jax.Array | None = None
    h_scale: jax.Array | None = None


def is_traced(*xs) -> bool:
    """True when any argument is a JAX tracer (inside ``jit``, ``vmap``, ``shard_map``, ...)."""
    return any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(xs))


def compute_dtype(*dtypes):
    """float64 where an input is float64 (and x64 is on), else float32 (half precision computes
    in float32)."""
    for d in dtypes:
        if jnp.dtype(d) == jnp.float64 and jax.config.jax_enable_x64:
            return jnp.float64
    return jnp.float32


def _real_array(x, name: str, layer: str):
    """``x`` (a JAX array or tracer as it is, anything else through ``np.asarray``), checked to
    have a real numeric or bool dtype; a ``TypeError`` naming ``name`` and ``layer`` otherwise."""
    if isinstance(x, jax.Array | jax.core.Tracer):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as e:  # ragged nested lists
            raise TypeError(
                f"layer {layer!r}: {name} must be a numeric array, got {type(x).__name__} ({e})"
            ) from None
    dt = arr.dtype
    if not (
        jnp.issubdtype(dt, jnp.floating)
        or jnp.issubdtype(dt, jnp.integer)
        or jnp.issubdtype(dt, jnp.bool_)
    ):
        given = f"{x!r}" if x is None or isinstance(x, str) else f"an array of dtype {dt}"
        raise TypeError(
            f"layer {layer!r}: {name} must be a real numeric array (float, int or bool), got "
            f"{given}"
        )
    return arr


def _check_W(W, layer: str):
    if W.ndim != 2:
        raise ValueError(
            f"layer {layer!r}: W must be a (rows, cols) matrix, got shape {tuple(W.shape)}"
        )
    if W.size == 0:
        raise ValueError(
            f"layer {layer!r}: W is empty (shape {tuple(W.shape)}); expected at least one row "
            "and one column"
        )


def matrix_cols(W, layer: str = "<matrix>") -> int:
    """The number of columns of ``W`` once it is known to be a non-empty real ``(rows, cols)``
    matrix (static checks, also under a trace); errors name ``layer``."""
    W = _real_array(W, "W", layer)
    _check_W(W, layer)
    return int(W.shape[1])


def check_inputs(W, H, layer: str = "<matrix>"):
    """Validate shapes (static, also under a trace); returns ``(W, H)`` in the compute dtype."""
    W = jnp.asarray(_real_array(W, "W", layer))
    H = jnp.asarray(_real_array(H, "H", layer))
    _check_W(W, layer)
    cols = W.shape[1]
    if H.shape != (cols, cols):
        raise ValueError(
            f"layer {layer!r}: H must be (cols, cols) = ({cols}, {cols}) to match W of shape "
            f"{W.shape}, got {H.shape}"
        )
    dtype = compute_dtype(W.dtype, H.dtype)
    return W.astype(dtype), H.astype(dtype)


def _pow2(x, base_log2: int):
    """The power of ``2**base_log2`` nearest to positive ``x`` (1 where ``x`` is 0 or not finite)."""
    ok = jnp.isfinite(x) & (x > 0)
    e = jnp.round(jnp.log2(jnp.where(ok, x, 1.0)) / base_log2) * base_log2
    return jnp.where(ok, jnp.exp2(e), 1.0).astype(x.dtype)


def prepare_core(W, H, rel_damp: float = 0.01) -> Prepared:
    """Pure preparation (see the module docstring); returns a :class:`Prepared` in solver units.

    Args:
      W: ``(rows, cols)`` weights, already in the compute dtype.
      H: ``(cols, cols)`` Hessian, in the same dtype.
      rel_damp: damping as a fraction of the mean diagonal (static or traced).

    Returns:
      A :class:`Prepared` with ``W / w_scale`` and ``H / h_scale``, and a ``status``.
    """
    dtype = W.dtype
    finite_w = jnp.all(jnp.isfinite(W))
    finite_h = jnp.all(jnp.isfinite(H))
    W = jnp.where(jnp.isfinite(W), W, 0.0)
    H = jnp.where(jnp.isfinite(H), H, 0.0)
    d = jnp.diagonal(H)
    tiny = jnp.finfo(dtype).tiny
    live = d > tiny
    nlive = jnp.sum(live)
    mean_live = jnp.sum(jnp.where(live, d, 0.0)) / jnp.maximum(nlive, 1)
    # scale only what would over- or underflow, so that ordinary inputs compute exactly as given
    wmax = jnp.max(jnp.abs(W))
    w_scale = jnp.where((wmax > 2.0**-16) & (wmax < 2.0**16), 1.0, _pow2(wmax, 1)).astype(dtype)
    h_scale = jnp.where(
        (mean_live > 4.0**-10) & (mean_live < 4.0**10), 1.0, _pow2(mean_live, 2)
    ).astype(dtype)
    W = W / w_scale
    H = H / h_scale
    d = jnp.diagonal(H)
    dead = ~live
    mean_live = jnp.where(nlive > 0, mean_live / h_scale, 1.0)
    amax = jnp.max(jnp.abs(H))
    asym = jnp.max(jnp.abs(H - H.T))
    tol = 1e-4 if dtype == jnp.float32 else 1e-10
    symmetric = asym <= tol * jnp.maximum(amax, tiny)
    # an input that never fired: decoupled from all others, curvature of an average live input
    Hd = jnp.where(dead[:, None] | dead[None, :], 0.0, H)
    Hd = Hd + jnp.diag(jnp.where(dead, mean_live, 0.0).astype(dtype))
    Hd = 0.5 * (Hd + Hd.T)
    W = jnp.where(dead[None, :], 0.0, W).astype(dtype)
    mean_diag = jnp.mean(jnp.diagonal(Hd))
    eye = jnp.eye(H.shape[0], dtype=dtype)

    def factor(damp):
        L = jnp.linalg.cholesky(Hd + damp * eye)
        return L, jnp.all(jnp.isfinite(L)) & jnp.all(jnp.diagonal(L) > 0)

    damp0 = (jnp.asarray(rel_damp, dtype) * mean_diag).astype(dtype)

    # one factorisation site (each Cholesky in the program costs compile time): try 0 uses the
    # requested damping, every retry ten times more (at least 1e-6 of the mean diagonal)
    def cond(st):
        i, _, ok, _ = st
        return (i < MAX_DAMP_TRIES) & ~ok

    def body(st):
        i, damp, _, _ = st
        damp = jnp.where(i == 0, damp0, jnp.maximum(damp * 10.0, 1e-6 * mean_diag)).astype(dtype)
        L, ok = factor(damp)
        return i + 1, damp, ok, L

    init = (jnp.asarray(0), damp0, jnp.asarray(False), jnp.zeros_like(Hd))
    tries, damp, ok, L = jax.lax.while_loop(cond, body, init)
    Linv = jax.scipy.linalg.solve_triangular(L, eye, lower=True)
    Hinv = jnp.matmul(Linv.T, Linv, precision=_HP)
    Hinv = 0.5 * (Hinv + Hinv.T)
    ok = ok & jnp.all(jnp.isfinite(Hinv))
    S = Status
    status = jnp.where(tries > 1, S.DAMPING_RAISED, S.OK)
    status = jnp.where(ok, status, S.FACTOR_FAILED)
    status = jnp.where(nlive == 0, S.NO_SIGNAL, status)
    status = jnp.where(jnp.any(d < -tiny), S.INDEFINITE_H, status)
    status = jnp.where(symmetric, status, S.ASYMMETRIC_H)
    status = jnp.where(finite_h, status, S.NONFINITE_H)
    status = jnp.where(finite_w, status, S.NONFINITE_W).astype(jnp.int32)
    return Prepared(W, Hd + damp * eye, Hinv, dead, damp, status, w_scale, h_scale)


_prepare_jit = jax.jit(prepare_core)


def to_caller_units(P: Prepared) -> Prepared:
    """A solver-units :class:`Prepared` (from :func:`prepare_core`) in the caller's units."""
    s, h = P.w_scale, P.h_scale
    return P._replace(W=P.W * s, H=P.H * h, Hinv=P.Hinv / h, damp=P.damp * h)


def to_solver_units(P: Prepared) -> Prepared:
    """The inverse of :func:`to_caller_units` (identity for a record without scales)."""
    if P.w_scale is None:
        one = jnp.ones((), P.W.dtype)
        status = jnp.asarray(Status.OK, jnp.int32)
        return P._replace(damp=jnp.asarray(P.damp, P.W.dtype), status=status, w_scale=one,
                          h_scale=one)
    s, h = P.w_scale, P.h_scale
    return P._replace(W=P.W / s, H=P.H / h, Hinv=P.Hinv * h, damp=P.damp / h)


def raise_for_status(status, layer: str, W=None, H=None, damp=None) -> None:
    """Turn a :class:`Status` into the ``ValueError`` that names the layer; no-op when usable.

    Host only (reads concrete values). For :attr:`Status.DAMPING_RAISED` it checks whether ``H`` is
    clearly indefinite (smallest eigenvalue below ``-1e-3 ×`` the mean diagonal) and raises then.
    """
    code = Status(int(status))
    if code == Status.OK:
        return
    if code == Status.DAMPING_RAISED:
        if H is not None:
            Hn = np.asarray(H, np.float64)
            mean_diag = float(np.mean(np.diag(Hn)))
            lam_min = float(np.linalg.eigvalsh(Hn).min())
            if lam_min < -1e-3 * mean_diag:
                raise ValueError(
                    f"layer {layer!r}: H is indefinite (smallest eigenvalue {lam_min:.3g}, mean "
                    f"diagonal {mean_diag:.3g}); a Hessian 2/N Σ x xᵀ is positive semidefinite, "
                    "so check how the statistics were accumulated"
                )
        return
    if code == Status.NONFINITE_W:
        bad = int(np.sum(~np.isfinite(np.asarray(W)))) if W is not None else "some"
        raise ValueError(f"layer {layer!r}: W has {bad} non-finite entries (NaN or inf)")
    if code == Status.NONFINITE_H:
        bad = int(np.sum(~np.isfinite(np.asarray(H)))) if H is not None else "some"
        raise ValueError(
            f"layer {layer!r}: H has {bad} non-finite entries (NaN or inf); check the calibration "
            "inputs of this layer"
        )
    if code == Status.ASYMMETRIC_H:
        Hn = np.asarray(H, np.float64) if H is not None else None
        detail = (
            f" (max |H - Hᵀ| = {np.abs(Hn - Hn.T).max():.3g}, max |H| = {np.abs(Hn).max():.3g})"
            if Hn is not None
            else ""
        )
        raise ValueError(f"layer {layer!r}: H is not symmetric{detail}")
    if code == Status.INDEFINITE_H:
        dmin = float(np.min(np.diag(np.asarray(H)))) if H is not None else float("nan")
        raise ValueError(
            f"layer {layer!r}: H is indefinite (a diagonal entry is {dmin:.3g} < 0); a Hessian "
            "2/N Σ x xᵀ is positive semidefinite, so check how the statistics were accumulated"
        )
    if code == Status.NO_SIGNAL:
        raise ValueError(
            f"layer {layer!r}: H has no signal (every diagonal entry is zero or subnormal): the "
            "layer's inputs were all zero during calibration, so there is nothing to fit; check "
            "the calibration batches, or leave this layer dense"
        )
    raise ValueError(
        f"layer {layer!r}: Cholesky factorisation of H failed even with damping raised "
        f"{MAX_DAMP_TRIES - 1} times (last {float(damp) if damp is not None else float('nan'):.3g}); "
        "H is numerically singular or not finite"
    )


@contextlib.contextmanager
def blas_one_thread():
    """Run the CPU LAPACK behind jaxlib's factorizations on one thread.

    The per-row factorizations here are small (at most ``cols × cols``) and many; the BLAS thread
    pool (OpenBLAS, shared with scipy) then only competes with XLA's own threads. Measured on 2
    EPYC cores with another process running: a 1152×1152 Cholesky took 1.34 s with the pool and
    22 ms on one thread.
    """
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is a dependency
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def check_rel_damp(rel_damp, layer: str) -> float:
    try:
        ok = float(rel_damp) >= 0 and np.isfinite(float(rel_damp))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"layer {layer!r}: rel_damp must be a finite number >= 0, got {rel_damp!r}")
    return float(rel_damp)


def prepare_solver_units(W, H, rel_damp: float, layer: str) -> Prepared:
    """Shape checks, :func:`prepare_core`, and (outside a trace) the errors of a bad status."""
    rel_damp = check_rel_damp(rel_damp, layer)
    W, H = check_inputs(W, H, layer)
    traced = is_traced(W, H)
    if traced:
        return prepare_core(W, H, rel_damp)
    with blas_one_thread():  # block inside: dispatch is asynchronous
        P = jax.block_until_ready(_prepare_jit(W, H, rel_damp))
    raise_for_status(P.status, layer, W, H, P.damp)
    return P


def prepare(W, H, *, rel_damp: float = 0.01, layer: str = "<matrix>") -> Prepared:
    """Check, scale, repair and damp ``H`` and invert it (in the caller's units).

    Args:
      W: ``(rows, cols)`` weights (out features × in features).
      H: ``(cols, cols)`` Hessian ``2/N Σ x xᵀ`` of the layer inputs.
      rel_damp: damping as a fraction of the mean diagonal (>= 0).
      layer: name used in error messages.

    Returns:
      A :class:`Prepared` record.

    Raises:
      ValueError: naming ``layer``, for bad shapes, non-finite entries, an asymmetric or
        indefinite ``H``, no signal in ``H``, or a factorisation that failed at every damping.
        Inside a trace nothing is raised: read ``status``.

    Example:
      >>> import jax.numpy as jnp
      >>> W, H = jnp.ones((2, 3)), jnp.eye(3)
      >>> P = prepare(W, H, rel_damp=0.01)
      >>> P.Hinv.shape == H.shape
      True
    """
    return to_caller_units(prepare_solver_units(W, H, rel_damp, layer))


@functools.partial(jax.jit)
def layer_loss(W, What, H):
    """``0.5 · tr((W - Ŵ) H (W - Ŵ)ᵀ)``: the layer's squared output error under ``H``.

    Args:
      W: ``(rows, cols)`` reference weights.
      What: ``(..., rows, cols)`` compressed weights.
      H: ``(cols, cols)``.

    Returns:
      A scalar (or one per leading index of ``What``).
    """
    D = What - W
    return 0.5 * jnp.sum(jnp.matmul(D, H, precision=_HP) * D, axis=(-2, -1))
