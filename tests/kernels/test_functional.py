"""The functional core: every public solver is pure in ``(W, H)``.

Each solver runs under ``jax.jit``, under ``jax.vmap`` over stacked problems (equal to separate
calls), inside ``shard_map`` over rows on the fake 4-device CPU mesh, compiles once per shape,
does not depend on the scale of ``W`` or ``H``, and reports trouble as a status in a trace and as
an error naming the layer on the host.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as PS

from obcjax import kernels as K
from obcjax.kernels.prepare import Status
from obcjax.specs import NM, Int
from tests.kernels.reference import make_problem

ROWS, COLS = 8, 16
ASYM4 = Int(bits=4, sym=False)

# name -> f(W, H): every public solver, with static options closed over
SOLVERS = {
    "exactobs_prune": lambda W, H: K.exactobs_prune(W, H, 0.5),
    "exactobs_levels": lambda W, H: K.exactobs_prune(W, H, [0.25, 0.75]),
    "exactobs_nm": lambda W, H: K.exactobs_nm(W, H, NM(2, 4)),
    "exactobs_block": lambda W, H: K.exactobs_block(W, H, 0.5, 4),
    "obq_quantize": lambda W, H: K.obq_quantize(W, H, ASYM4),
    "obq_joint": lambda W, H: K.obq_prune_quantize(W, H, "2:4", 4),
    "gptq_quantize": lambda W, H: K.gptq_quantize(W, H, ASYM4, act_order=True),
    "sparsegpt_prune": lambda W, H: K.sparsegpt_prune(W, H, 0.5, quant=Int(4)),
    "sparsegpt_nm": lambda W, H: K.sparsegpt_prune(W, H, "2:4"),
    "magnitude_prune": lambda W, H: K.magnitude_prune(W, 0.5, H=H),
    "magnitude_nm": lambda W, H: K.magnitude_nm(W, "2:4", H=H),
    "rtn_quantize": lambda W, H: K.rtn_quantize(W, 4, H=H),
    "solve": lambda W, H: K.solve(W, H, 0.5, 8, "obc"),
}
# solvers whose rows are independent (the others allocate sparsity over all rows together)
ROW_SEPARABLE = {"exactobs_nm", "obq_quantize", "gptq_quantize", "sparsegpt_nm", "magnitude_nm",
                 "rtn_quantize"}


def _problems(n=3, rows=ROWS, cols=COLS):
    ps = [make_problem(rows, cols, seed) for seed in range(n)]
    return (jnp.asarray(np.stack([p[0] for p in ps]), jnp.float32),
            jnp.asarray(np.stack([p[1] for p in ps]), jnp.float32))


def _close(a: K.Result, b: K.Result):
    """Equal up to round-off: a batched and an unbatched program may round a value within an ulp
    of a grid midpoint to different sides, so a few quantized entries (and, through OBQ's
    compensation, their row's later choices) may differ by one step."""
    wa, wb = np.asarray(a.weights), np.asarray(b.weights)
    if a.qarray is None:
        np.testing.assert_allclose(wa, wb, rtol=2e-4, atol=2e-5)
    else:
        d = np.abs(np.asarray(a.qarray.codes, np.int32) - np.asarray(b.qarray.codes, np.int32))
        assert d.max() <= 1 and (d > 0).mean() <= 0.03, (d > 0).sum()
        assert (~np.isclose(wa, wb, rtol=2e-4, atol=2e-5)).mean() <= 0.03
    if a.mask is not None:
        np.testing.assert_array_equal(np.asarray(a.mask), np.asarray(b.mask))
    np.testing.assert_allclose(float(jnp.sum(a.loss)), float(jnp.sum(b.loss)), rtol=2e-2)


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_jit_and_vmap_equal_separate_calls(name):
    f = SOLVERS[name]
    W, H = _problems()
    eager = [f(W[i], H[i]) for i in range(3)]
    jitted = jax.jit(f)(W[0], H[0])
    _close(jitted, eager[0])
    assert int(jitted.status) in (Status.OK, Status.DAMPING_RAISED)
    batched = jax.vmap(f)(W, H)
    assert batched.weights.shape[0] == 3
    for i in range(3):
        _close(jax.tree.map(lambda x, i=i: x[i], batched), eager[i])
    # and inside a user's own jitted program
    total = jax.jit(lambda W, H: jnp.sum(jax.vmap(f)(W, H).loss))(W, H)
    assert np.isfinite(float(total))


@pytest.mark.parametrize("name", sorted(SOLVERS))
def test_inside_shard_map_over_rows(name):
    if len(jax.devices()) < 4:
        pytest.skip("needs the 4 fake CPU devices of tests/conftest.py")
    f = SOLVERS[name]
    W, H = _problems(1, rows=16)
    W, H = W[0], H[0]
    mesh = Mesh(np.array(jax.devices()[:4]), ("rows",))
    run = jax.jit(jax.shard_map(lambda w, h: f(w, h).weights, mesh=mesh, in_specs=(PS("rows"), PS()),
                                out_specs=PS(*(("rows",) if name != "exactobs_levels" else (None, "rows"))),
                                check_vma=False))
    got = np.asarray(run(W, H))
    assert np.isfinite(got).all() and got.shape[-2:] == W.shape
    if name in ROW_SEPARABLE:
        np.testing.assert_allclose(got, np.asarray(f(W, H).weights), rtol=2e-4, atol=2e-5)


def test_shard_map_with_axis_name_allocates_over_all_rows():
    if len(jax.devices()) < 4:
        pytest.skip("needs the 4 fake CPU devices of tests/conftest.py")
    W, H = _problems(1, rows=16)
    W, H = W[0], H[0]
    mesh = Mesh(np.array(jax.devices()[:4]), ("rows",))
    run = jax.jit(jax.shard_map(
        lambda w, h: K.exactobs_prune(w, h, 0.5, axis_name="rows").mask, mesh=mesh,
        in_specs=(PS("rows"), PS()), out_specs=PS("rows"), check_vma=False))
    np.testing.assert_array_equal(np.asarray(run(W, H)), np.asarray(K.exactobs_prune(W, H, 0.5).mask))


def test_one_trace_per_shape():
    W, H = _problems(4)

    @jax.jit
    @chex.assert_max_traces(n=1)
    def run(W, H):
        return K.obq_prune_quantize(W, H, NM(2, 4), ASYM4).weights

    for i in range(4):
        run(W[i], H[i])
    # the host path reuses its compiled programs too: a second problem of the same shape adds
    # no cache entry
    import importlib

    KX = importlib.import_module("obcjax.kernels.exactobs")
    KP = importlib.import_module("obcjax.kernels.prepare")

    K.exactobs_nm(W[0], H[0], 2, 4)
    before = (KX._greedy_jit._cache_size(), KP._prepare_jit._cache_size())
    K.exactobs_nm(W[1], H[1], 2, 4)
    assert (KX._greedy_jit._cache_size(), KP._prepare_jit._cache_size()) == before


SCALE_SOLVERS = ["exactobs_prune", "exactobs_nm", "obq_quantize", "obq_joint", "gptq_quantize",
                 "sparsegpt_prune"]


@pytest.mark.parametrize("name", SCALE_SOLVERS)
def test_scale_invariance(name):
    f = SOLVERS[name]
    W, H = _problems(1)
    W, H = W[0], H[0]
    base = f(W, H)
    cases = [(1.0, 1e-30), (1.0, 1e-20), (1.0, 1e20), (1.0, 1e30), (1e-15, 1.0), (1e15, 1.0)]
    for ws, hs in cases:
        r = f(W * ws, H * hs)
        assert np.isfinite(np.asarray(r.weights)).all(), (ws, hs)
        assert np.isfinite(float(r.loss)), (ws, hs)
        if base.mask is not None:
            np.testing.assert_array_equal(np.asarray(r.mask), np.asarray(base.mask), err_msg=str((ws, hs)))
        if base.qarray is not None:
            np.testing.assert_array_equal(np.asarray(r.qarray.codes), np.asarray(base.qarray.codes),
                                          err_msg=str((ws, hs)))
        np.testing.assert_allclose(np.asarray(r.weights) / ws, np.asarray(base.weights),
                                   rtol=1e-3, atol=1e-4, err_msg=str((ws, hs)))
        np.testing.assert_allclose(float(r.loss) / (ws * ws * hs), float(base.loss), rtol=1e-3)


@pytest.mark.parametrize("name", ["exactobs_prune", "obq_quantize", "gptq_quantize", "sparsegpt_nm"])
def test_no_signal_and_non_finite(name):
    f = SOLVERS[name]
    W, H = _problems(1)
    W, H = W[0], H[0]
    with pytest.raises(ValueError, match="no signal"):
        f(W, jnp.zeros_like(H))
    with pytest.raises(ValueError, match="no signal"):
        f(W, H * 1e-44)  # subnormal in float32
    with pytest.raises(ValueError, match="W has 1 non-finite"):
        f(W.at[0, 0].set(jnp.nan), H)
    with pytest.raises(ValueError, match="H has 2 non-finite"):
        f(W, H.at[0, 1].set(jnp.inf).at[1, 0].set(jnp.inf))
    # in a trace: a status, no exception
    st = jax.jit(lambda W, H: f(W, H).status)
    assert int(st(W, jnp.zeros_like(H))) == Status.NO_SIGNAL
    assert int(st(W.at[0, 0].set(jnp.nan), H)) == Status.NONFINITE_W
    assert int(st(W, H)) == Status.OK


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_half_precision_computes_in_float32(dtype):
    W, H = _problems(1)
    W, H = W[0], H[0]
    r = K.obq_quantize(W.astype(dtype), H.astype(dtype), 4)
    assert r.weights.dtype == dtype
    ref = K.obq_quantize(W.astype(dtype).astype(jnp.float32), H.astype(dtype).astype(jnp.float32), 4)
    np.testing.assert_array_equal(np.asarray(r.qarray.codes), np.asarray(ref.qarray.codes))
    r = K.sparsegpt_prune(W.astype(dtype), H.astype(dtype), "2:4")
    assert r.weights.dtype == dtype


def test_indefinite_and_damping_raised():
    W, H = _problems(1)
    W, H = W[0], H[0]
    Hn = H - 3 * jnp.eye(COLS) * jnp.mean(jnp.diag(H))
    with pytest.raises(ValueError, match="indefinite"):
        K.exactobs_nm(W, Hn, 2, 4)
    # a singular PSD H with no damping: the trace raises the damping itself and says so
    X = np.random.default_rng(0).standard_normal((4, COLS))
    Hs = jnp.asarray(2 * X.T @ X / 4, jnp.float32)
    r = jax.jit(functools.partial(K.exactobs_nm, n=2, m=4, rel_damp=0.0))(W, Hs)
    assert int(r.status) in (Status.OK, Status.DAMPING_RAISED)
    assert np.isfinite(np.asarray(r.weights)).all()
