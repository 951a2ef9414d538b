"""compress() over Flax parameter pytrees: layout, agreement with the kernels, summary, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from obcjax import kernels as K
from obcjax.calibration import calibrate
from obcjax.layout import kernel_to_matrices, matrices_to_kernel
from obcjax.quant import QArray
from obcjax.specs import GPTQ, NM, OBQ, Block, ExactOBS, Int, Magnitude, SparseGPT, Unstructured
from obcjax.stats import hessian_finalize
from obcjax.transforms import (
    Compressed,
    LayerSpec,
    as_layer_spec,
    compress,
    find_layers,
    prune_levels,
)


class Small(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), padding="SAME", name="conv")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, padding="SAME", name="dw")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        x = nn.Dense(16, name="fc")(x)
        return nn.Dense(4, name="head")(nn.relu(x))


@pytest.fixture(scope="module")
def setup():
    model = Small()
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(16, 6, 6, 2)).astype(np.float32) for _ in range(3)]
    v = model.init(jax.random.key(0), jnp.asarray(xs[0]))
    stats = calibrate(model, v, xs)
    return model, v, stats, xs


def test_kernel_matrix_round_trip_and_groups():
    k = jnp.arange(3 * 3 * 2 * 8, dtype=jnp.float32).reshape(3, 3, 2, 8)
    for G in (1, 2, 4):
        kk = k[:, :, : 8 // G if G > 1 else 2] if G > 1 else k
        mats = kernel_to_matrices(kk, G)
        assert len(mats) == G and mats[0].shape == (8 // G, kk.shape[0] * kk.shape[1] * kk.shape[2])
        np.testing.assert_array_equal(matrices_to_kernel(mats, kk.shape), kk)
    # Dense (in, out): W = kernel.T
    d = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(kernel_to_matrices(d)[0], d.T)
    with pytest.raises(ValueError, match="not divisible"):
        kernel_to_matrices(k, 3)


def test_find_layers_and_specs(setup):
    _, v, stats, _ = setup
    assert list(find_layers(v["params"])) == ["conv", "dw", "fc", "head"]
    assert list(stats) == ["conv", "dw", "fc", "head"]
    assert as_layer_spec(Int(4)) == LayerSpec(quant=Int(4))
    assert as_layer_spec((NM(2, 4), Int(3))).name == "2:4+w3"
    with pytest.raises(TypeError):
        as_layer_spec("half")
    with pytest.raises(ValueError, match="solver"):
        LayerSpec(prune=Unstructured(0.5), solver="obs")


def test_compress_equals_kernel_calls_per_layer(setup):
    _, v, stats, _ = setup
    rules = [("head", None), ("dw", Int(4)), (".*", Unstructured(0.5))]
    out = compress(v["params"], stats, rules)
    # Dense: W = kernel.T, same result as the kernel on the layer's Hessian
    H = hessian_finalize(stats["fc"])[0]
    r = K.exactobs_prune(v["params"]["fc"]["kernel"].T, H, 0.5)
    np.testing.assert_allclose(out.params["fc"]["kernel"], r.weights.T, rtol=1e-5, atol=1e-6)
    assert out.losses["fc"] == pytest.approx(float(r.loss), rel=1e-5)
    # conv (HWIO): columns (kh, kw, cin)
    Hc = hessian_finalize(stats["conv"])[0]
    rc = K.exactobs_prune(kernel_to_matrices(v["params"]["conv"]["kernel"])[0], Hc, 0.5)
    np.testing.assert_allclose(
        out.params["conv"]["kernel"],
        matrices_to_kernel([rc.weights], (3, 3, 2, 8)),
        rtol=1e-5,
        atol=1e-6,
    )
    # depthwise: one Hessian per group, each output channel quantized on its own grid
    Hd = hessian_finalize(stats["dw"])
    assert Hd.shape == (8, 9, 9)
    mats = kernel_to_matrices(v["params"]["dw"]["kernel"], 8)
    for g in (0, 5):
        rq = K.obq_quantize(mats[g], Hd[g], Int(4))
        np.testing.assert_allclose(
            kernel_to_matrices(out.params["dw"]["kernel"], 8)[g], rq.weights, rtol=1e-5, atol=1e-6
        )
    q = out.qarray("dw")  # one kernel-layout QArray for the 8 groups
    assert q.layout.groups == 8 and q.codes.shape == v["params"]["dw"]["kernel"].shape
    np.testing.assert_allclose(q.dequantize(), out.params["dw"]["kernel"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(q.as_matrix(5).codes, K.obq_quantize(mats[5], Hd[5], Int(4))
                                  .qarray.codes)
    # skipped layer is untouched, structure and dtypes preserved
    np.testing.assert_array_equal(out.params["head"]["kernel"], v["params"]["head"]["kernel"])
    assert jax.tree.structure(out.params) == jax.tree.structure(v["params"])
    for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(v["params"])):
        assert a.shape == b.shape and a.dtype == b.dtype
    # masks mirror kernels, True = kept
    assert out.mask("fc").shape == v["params"]["fc"]["kernel"].shape
    np.testing.assert_array_equal(out.mask("fc"), np.asarray(out.params["fc"]["kernel"]) != 0)
    # masks and qarrays mirror params: an entry at each compressed kernel, None elsewhere
    none = lambda x: x is None or isinstance(x, QArray)  # noqa: E731
    for tree in (out.masks, out.qarrays):
        assert jax.tree.structure(tree, is_leaf=none) == jax.tree.structure(
            jax.tree.map(lambda _: 0, v["params"]))
    assert out.masks["fc"]["bias"] is None and out.masks["dw"]["kernel"] is None
    assert out.qarrays["fc"]["kernel"] is None and out.qarrays["dw"]["bias"] is None
    assert out.masks["fc"]["kernel"] is out.mask("fc")
    assert set(out.specs) == {"conv", "dw", "fc"}


def test_summary_counts(setup):
    _, v, stats, _ = setup
    out = compress(v["params"], stats, [("fc", (Unstructured(0.75), Int(4))), (".*", None)])
    s = out.summary
    n = v["params"]["fc"]["kernel"].size
    assert s["fc/params"] == n
    assert s["fc/sparsity"] == pytest.approx(round(0.75 * n) / n)
    assert s["fc/bits"] == 4 and s["conv/bits"] == 32
    # obcjax.sizes: kept values at 4 bits + a 1-bit mask per weight + a float32 scale and a
    # uint8 zero point per output row
    rows = v["params"]["fc"]["kernel"].shape[-1]
    assert s["fc/value_bits"] == (n - round(0.75 * n)) * 4
    assert (s["fc/index_bits"], s["fc/grid_bits"]) == (n, rows * 40)
    assert s["fc/size_bits"] == (n - round(0.75 * n)) * 4 + n + rows * 40
    total = sum(x.size for x in jax.tree.leaves(v["params"]))
    assert s["total/params"] == total
    assert s["total/dense_bits"] == 32 * total
    assert s["total/compression"] == pytest.approx(32 * total / s["total/size_bits"])
    assert s["total/loss"] == pytest.approx(out.losses["fc"])


def test_inputs_not_mutated_and_obc_beats_magnitude(setup):
    model, v, stats, xs = setup
    before = jax.tree.map(np.array, v["params"])
    rules = [(".*", Unstructured(0.6))]
    obc = compress(v["params"], stats, rules)
    mag = compress(v["params"], stats, rules, solver="magnitude")
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, v["params"]))
    for path in obc.losses:
        assert obc.losses[path] <= mag.losses[path] * (1 + 1e-6)


def test_prune_levels_equals_compress(setup):
    _, v, stats, _ = setup
    levels = [0.3, 0.7]
    many = prune_levels(v["params"], stats, levels, rules=[("dw", None), (".*", True)])
    for s, p in zip(levels, many):
        one = compress(v["params"], stats, [("dw", None), (".*", Unstructured(s))])
        for path in ("conv", "fc", "head"):
            np.testing.assert_allclose(
                p[path]["kernel"], one.params[path]["kernel"], rtol=1e-5, atol=1e-6
            )
        np.testing.assert_array_equal(p["dw"]["kernel"], v["params"]["dw"]["kernel"])


def test_errors_name_the_layer(setup):
    model, v, stats, xs = setup
    with pytest.raises(ValueError, match="'nope'"):
        compress(v["params"], stats, [("nope", Int(4))])
    with pytest.raises(ValueError, match="no calibration statistics.*'head'"):
        compress(v["params"], {k: s for k, s in stats.items() if k != "head"}, [(".*", Int(4))])
    # statistics from another model: widths do not match
    other = dict(stats)
    other["fc"] = stats["head"]
    with pytest.raises(ValueError, match="layer 'fc'.*another layer or model"):
        compress(v["params"], other, [("fc", Int(4)), (".*", None)])
    with pytest.raises(ValueError, match="'head'"):
        compress(v["params"], stats, [("head", NM(2, 3))])
    with pytest.raises(ValueError, match="no layer"):
        compress({"a": {"b": jnp.zeros(3)}}, stats, [(".*", Int(4))])


# ------------------------------------------------------------------ grouped / depthwise batching


class Grouped(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(12, (3, 3), padding="SAME", name="conv")(x))
        x = nn.relu(nn.Conv(12, (3, 3), feature_group_count=12, padding="SAME", name="dw")(x))
        x = nn.relu(nn.Conv(16, (3, 3), feature_group_count=4, padding="SAME", name="gc")(x))
        x = nn.Conv(16, (1, 1), feature_group_count=4, name="gc1")(x)
        return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def grouped():
    model = Grouped()
    rng = np.random.default_rng(1)
    xs = [rng.normal(size=(8, 6, 6, 2)).astype(np.float32) for _ in range(2)]
    v = model.init(jax.random.key(1), jnp.asarray(xs[0]))
    return v, calibrate(model, v, xs)


def _per_group_loop(monkeypatch):
    import obcjax.transforms as T

    monkeypatch.setattr(T, "_stacked", lambda *a, **k: None)


def _same(a, b, rtol=1e-5, atol=1e-6):
    """Equal results up to round-off. A vmapped and an unbatched program may round a value that
    lies within an ulp of a grid midpoint to different sides, so at most 1% of the quantized
    entries may differ by exactly one grid step (seen: 1 of 108 at 8 bits)."""
    assert set(a.specs) == set(b.specs)
    for path in a.specs:
        ka, kb = np.asarray(a.params[path]["kernel"]), np.asarray(b.params[path]["kernel"])
        if a.qarray(path) is not None:
            far = ~np.isclose(ka, kb, rtol=rtol, atol=atol)
            assert far.mean() <= 0.01, (path, far.sum())
            ca = np.asarray(a.qarray(path).codes, np.int32).ravel()
            cb = np.asarray(b.qarray(path).codes, np.int32).ravel()
            assert np.abs(ca - cb).max() <= 1 and (ca != cb).mean() <= 0.01, path
        else:
            np.testing.assert_allclose(ka, kb, rtol=rtol, atol=atol, err_msg=path)
        rel = 1e-3 if a.qarray(path) is not None else 1e-4  # (a one-step code flip: ~1e-4)
        assert a.losses[path] == pytest.approx(b.losses[path], rel=rel, abs=1e-9), path
        assert (a.mask(path) is None) == (b.mask(path) is None)
        if a.mask(path) is not None:
            np.testing.assert_array_equal(a.mask(path), b.mask(path), err_msg=path)
        if a.qarray(path) is not None:
            assert a.qarray(path).layout == b.qarray(path).layout
            for qa, qb in [(a.qarray(path), b.qarray(path))]:
                np.testing.assert_allclose(qa.scale, qb.scale, rtol=1e-6, err_msg=path)
                np.testing.assert_array_equal(qa.zero, qb.zero, err_msg=path)
                assert (qa.bits, qa.group_size) == (qb.bits, qb.group_size)


def _ls(solver, prune=None, quant=None):
    return LayerSpec(prune=prune, quant=quant, solver=solver)


# (depthwise "dw", grouped "gc", grouped 1x1 "gc1") specs: every batched solver path once --
# GPTQ with static and dynamic (group-wise) grids, SparseGPT unstructured and N:M with joint
# quantization, OBQ, ExactOBS unstructured and N:M with OBQ, magnitude / RTN, alone and joint.
CASES = [
    (
        _ls("gptq", Unstructured(0.5), Int(8)),
        _ls("gptq", quant=Int(3, sym=False, granularity="group", group_size=9)),
        _ls("gptq", NM(2, 4), Int(4)),
    ),
    (_ls("obc", quant=Int(4)), _ls("obc", Unstructured(0.5), Int(8)), _ls("obc", NM(2, 4))),
    (
        _ls("magnitude", Unstructured(0.5), Int(8)),
        _ls("magnitude", quant=Int(4)),
        _ls("magnitude", NM(2, 4), Int(4)),
    ),
]


@pytest.mark.parametrize(
    "case", CASES, ids=lambda c: "-".join(f"{s.solver}:{s.name}" for s in c if s is not None)
)
def test_grouped_batches_equal_per_group_loop(grouped, case, monkeypatch):
    import obcjax.transforms as T

    v, stats = grouped
    rules = [("dw", case[0]), ("gc", case[1]), ("gc1", case[2]), (".*", None)]
    # small chunks: 12 depthwise groups run as 8 + 4 (padded to 8) in two compiled calls
    monkeypatch.setattr(T, "_GROUP_CHUNK", 8)
    calls = []
    solve = T._solve
    monkeypatch.setattr(T, "_solve", lambda *a, **k: calls.append(k["layer"]) or solve(*a, **k))
    batched = compress(v["params"], stats, rules)
    assert calls == []  # no group fell back to the per-matrix path
    _per_group_loop(monkeypatch)
    loop = compress(v["params"], stats, rules)
    assert len(calls) == 12 + 4 + (4 if case[2] is not None else 0)
    _same(batched, loop)
    if case[2] is not None:
        m = np.asarray(batched.mask("gc1")).reshape(4, 4, 4)  # (cin/G, G, out/G): 2 of 4 kept
        assert (m.sum(axis=0) == 2).all()
    # and the loop itself is the kernel on group g's matrix and Hessian
    if case[0].solver == "gptq":
        H = hessian_finalize(stats["dw"])
        W5 = kernel_to_matrices(v["params"]["dw"]["kernel"], 12)[5]
        r = K.sparsegpt_prune(W5, H[5], case[0].prune, quant=case[0].quant)
        got = kernel_to_matrices(batched.params["dw"]["kernel"], 12)[5]
        np.testing.assert_allclose(got, r.weights, rtol=1e-5, atol=1e-6)


def test_grouped_fallback_retry_and_errors(grouped, monkeypatch):
    from obcjax.stats import HessianState

    v, stats = grouped
    # Group 3 of the depthwise conv gets a singular H (all ones): with rel_damp=0 its Cholesky
    # fails and the kernel retries with more damping; the batched path hands it to the kernel.
    st = stats["dw"]
    ones = jnp.ones((9, 9), jnp.float32) * st.count.astype(jnp.float32) / 2
    bad = {**stats, "dw": HessianState(st.sum.at[3].set(ones), st.count)}
    rules = [("dw", LayerSpec(quant=Int(4), solver="gptq")), (".*", None)]
    batched = compress(v["params"], bad, rules, rel_damp=0.0)
    assert np.isfinite(np.asarray(batched.params["dw"]["kernel"])).all()
    _per_group_loop(monkeypatch)
    _same(batched, compress(v["params"], bad, rules, rel_damp=0.0))
    monkeypatch.undo()
    # Errors name the group, the first bad one as the loop would.
    k = np.array(v["params"]["dw"]["kernel"])
    k[..., 5] = np.nan
    k[0, 0, 0, 7] = np.inf
    params = {**v["params"], "dw": {**v["params"]["dw"], "kernel": jnp.asarray(k)}}
    for solver in ("gptq", "obc", "magnitude"):
        with pytest.raises(ValueError, match=r"'dw\[group 5\]'.*non-finite"):
            compress(params, stats, [("dw", LayerSpec(quant=Int(4), solver=solver)), (".*", None)])
    with pytest.raises(ValueError, match=r"'dw\[group 0\]'.*2:4.*multiple of 4"):
        compress(v["params"], stats, [("dw", LayerSpec(prune=NM(2, 4))), (".*", None)])


def test_prune_levels_grouped_equals_per_group_loop(grouped, monkeypatch):
    v, stats = grouped
    rules = [("dw|gc", True), (".*", None)]
    for solver in ("obc", "magnitude"):
        batched = prune_levels(v["params"], stats, [0.25, 0.5], rules=rules, solver=solver)
        with monkeypatch.context() as m:
            import obcjax.transforms as T

            m.setattr(T, "_stacked", lambda *a, **k: None)
            loop = prune_levels(v["params"], stats, [0.25, 0.5], rules=rules, solver=solver)
        for b, lp in zip(batched, loop):
            for path in ("dw", "gc"):
                np.testing.assert_allclose(
                    b[path]["kernel"], lp[path]["kernel"], rtol=1e-5, atol=1e-6
                )
                np.testing.assert_array_equal(
                    np.asarray(b[path]["kernel"]) == 0, np.asarray(lp[path]["kernel"]) == 0
                )


@pytest.mark.parametrize("solver", ["gptq", "magnitude"])
def test_dead_inputs_zero_or_keep(grouped, solver):
    from obcjax.quant import quantize
    from obcjax.stats import HessianState

    v, stats = grouped
    # input 2 of group 1 of "gc" never fired: its row and column of the statistics are zero
    st = stats["gc"]
    s1 = st.sum[1].at[2, :].set(0.0).at[:, 2].set(0.0)
    dead = {**stats, "gc": HessianState(st.sum.at[1].set(s1), st.count)}
    rules = [("gc", LayerSpec(quant=Int(8), solver=solver)), (".*", None)]
    W1 = kernel_to_matrices(v["params"]["gc"]["kernel"], 4)[1]
    zero = compress(v["params"], dead, rules)
    np.testing.assert_array_equal(kernel_to_matrices(zero.params["gc"]["kernel"], 4)[1][:, 2], 0)
    keep = compress(v["params"], dead, rules, dead_inputs="keep")
    got = kernel_to_matrices(keep.params["gc"]["kernel"], 4)[1]
    qa = keep.qarray("gc").as_matrix(1)
    # the dead input is rounded to its row's grid, not zeroed...
    np.testing.assert_allclose(
        got[:, 2], quantize(W1[:, 2], qa.scale[:, 0], qa.zero[:, 0], 8), rtol=1e-6, atol=1e-7
    )
    assert np.abs(np.asarray(got[:, 2])).max() > 0
    # ...and, coupled to nothing, it does not matter which curvature it is given: the kernel on
    # the same problem with a much larger one gives the same matrix
    H1 = hessian_finalize(dead["gc"])[1]
    H1 = H1.at[2, 2].set(jnp.mean(jnp.diag(H1)))
    if solver == "gptq":
        r = K.gptq_quantize(W1, H1, Int(8))
    elif solver == "obc":
        r = K.obq_quantize(W1, H1, Int(8))
    else:
        r = K.rtn_quantize(W1, Int(8), H=H1)
    np.testing.assert_allclose(got, r.weights, rtol=1e-5, atol=1e-6)
    # other groups are the same either way
    for g in (0, 2, 3):
        np.testing.assert_array_equal(
            kernel_to_matrices(keep.params["gc"]["kernel"], 4)[g],
            kernel_to_matrices(zero.params["gc"]["kernel"], 4)[g],
        )
    with pytest.raises(ValueError, match="dead_inputs"):
        compress(v["params"], dead, rules, dead_inputs="drop")


# ------------------------------------------------------ same-shaped layers: one vmapped call


class Stack(nn.Module):
    """Four same-shaped Dense layers (a transformer's q/k/v/out, or its repeated blocks)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(16, name="inp")(x)
        for i in range(4):
            x = nn.relu(nn.Dense(16, name=f"block{i}")(x))
        return nn.Dense(3, name="head")(x)


@pytest.fixture(scope="module")
def stack():
    model = Stack()
    rng = np.random.default_rng(2)
    xs = [rng.normal(size=(32, 8)).astype(np.float32) for _ in range(3)]
    v = model.init(jax.random.key(2), jnp.asarray(xs[0]))
    return v, calibrate(model, v, xs)


BLOCKS = [f"block{i}" for i in range(4)]


def _identical(a, b, code_flips=0.0):
    """The same masks and the same codes; weights and losses equal up to float round-off.

    ``code_flips``: the fraction of codes that may differ by one grid step (see :func:`_same`:
    the solvers' host wrappers and their traced cores may round a value within an ulp of a grid
    midpoint to different sides).
    """
    assert set(a.specs) == set(b.specs)
    for path in a.specs:
        assert (a.mask(path) is None) == (b.mask(path) is None)
        if a.mask(path) is not None:
            np.testing.assert_array_equal(a.mask(path), b.mask(path), err_msg=path)
        assert (a.qarray(path) is None) == (b.qarray(path) is None)
        flips = 0
        for qa, qb in [(a.qarray(path), b.qarray(path))] if a.qarray(path) is not None else []:
            d = np.abs(np.asarray(qa.codes, np.int32) - np.asarray(qb.codes, np.int32))
            assert d.max() <= (1 if code_flips else 0), path
            flips += int(np.count_nonzero(d))
            np.testing.assert_array_equal(qa.zero, qb.zero, err_msg=path)
            np.testing.assert_allclose(qa.scale, qb.scale, rtol=1e-6, err_msg=path)
        ka, kb = np.asarray(a.params[path]["kernel"]), np.asarray(b.params[path]["kernel"])
        assert flips <= code_flips * ka.size, (path, flips)
        far = ~np.isclose(ka, kb, rtol=1e-6, atol=1e-7)
        assert far.sum() <= flips, path  # only where a code flipped
        rel = 1e-3 if flips else 1e-5
        assert a.losses[path] == pytest.approx(b.losses[path], rel=rel, abs=1e-9), path


def _jitted_one_by_one(v, stats, spec, paths):
    """Each layer alone through ``jax.jit`` of the one dispatcher: the program a vmapped call
    batches, without the batch."""
    solve = jax.jit(lambda W, H: K.solve(W, H, spec.prune, spec.quant, spec.solver))
    return {p: solve(v["params"][p]["kernel"].T, hessian_finalize(stats[p])[0]) for p in paths}


STACK_SPECS = [
    LayerSpec(Unstructured(0.5), None, "obc"),
    LayerSpec(NM(2, 4), Int(4), ExactOBS()),
    LayerSpec(None, Int(4), OBQ(order="natural")),
    LayerSpec(None, Int(3, sym=False, granularity="group", group_size=8),
              GPTQ(act_order=True, static_groups=True)),
    LayerSpec(NM(2, 4), Int(8), SparseGPT(blocksize=8)),
    LayerSpec(Unstructured(0.5), Int(8), Magnitude()),
]


@pytest.mark.parametrize("spec", STACK_SPECS, ids=lambda s: f"{type(s.solver).__name__}:{s.name}")
def test_same_shaped_layers_batched_equal_one_by_one(stack, spec, monkeypatch):
    import obcjax.transforms as T

    v, stats = stack
    rules = [("inp|head", None), (".*", spec)]
    calls = []
    solve = T._solve
    monkeypatch.setattr(T, "_solve", lambda *a, **k: calls.append(k["layer"]) or solve(*a, **k))
    batched = compress(v["params"], stats, rules)
    assert calls == []  # the four blocks went through one stacked call
    # vmap adds nothing but round-off: each layer alone through the same jitted program gives
    # the same masks and codes
    for path, r in _jitted_one_by_one(v, stats, spec, BLOCKS).items():
        np.testing.assert_allclose(
            batched.params[path]["kernel"], np.asarray(r.weights).T, rtol=1e-6, atol=1e-7
        )
        if spec.prune is not None:
            np.testing.assert_array_equal(batched.mask(path), np.asarray(r.mask).T)
        if spec.quant is not None:
            np.testing.assert_array_equal(batched.qarray(path).as_matrix().codes, r.qarray.codes)
        assert batched.losses[path] == pytest.approx(float(r.loss), rel=1e-5)
    # and the one-by-one fallback (the solvers' host wrappers) gives the same masks and codes
    monkeypatch.setattr(T, "_stacked", lambda *a, **k: None)
    one_by_one = compress(v["params"], stats, rules)
    assert calls == BLOCKS
    _identical(batched, one_by_one, code_flips=0.01)


def test_solver_records_reach_the_kernels(stack):
    v, stats = stack
    W = v["params"]["block2"]["kernel"].T
    H = hessian_finalize(stats["block2"])[0]
    q = Int(4, granularity="group", group_size=8)
    out = compress(v["params"], stats, [("block2", LayerSpec(None, q, GPTQ(act_order=True,
                   static_groups=True))), (".*", None)])
    want = K.gptq_quantize(W, H, q, act_order=True, static_groups=True)
    np.testing.assert_array_equal(out.qarray("block2").as_matrix().codes, want.qarray.codes)
    plain = K.gptq_quantize(W, H, q, static_groups=True)
    assert (np.asarray(plain.qarray.codes) != np.asarray(want.qarray.codes)).any()
    # the compress-level default solver may be a record too; GPTQ on a pruned layer is SparseGPT
    out = compress(v["params"], stats, [("block2", NM(2, 4)), (".*", None)],
                   solver=GPTQ(blocksize=4))
    want = K.sparsegpt_prune(W, H, NM(2, 4), blocksize=4)
    np.testing.assert_array_equal(out.mask("block2"), np.asarray(want.mask).T)


def test_layer_spec_solvers_and_shorthands():
    s = LayerSpec(0.5, 4, GPTQ(blocksize=64))
    assert s == LayerSpec(Unstructured(0.5), Int(4), GPTQ(blocksize=64))
    assert s.family == "gptq" and LayerSpec().family == "obc"
    assert hash(s) == hash(LayerSpec(Unstructured(0.5), Int(4), GPTQ(blocksize=64)))
    assert as_layer_spec(("2:4", None, Magnitude())) == LayerSpec(NM(2, 4), None, Magnitude())
    assert jax.jit(lambda x, spec: x * spec.quant.bits, static_argnums=1)(1.0, s) == 4.0
    with pytest.raises(ValueError, match="LayerSpec.solver.*'obc', 'magnitude', 'gptq'"):
        LayerSpec(quant=Int(4), solver="obs")
    with pytest.raises(TypeError, match="LayerSpec.solver"):
        LayerSpec(quant=Int(4), solver=Int(4))
    with pytest.raises(ValueError, match="compress: solver"):
        compress({}, {}, [], solver="sparsegpt")


def test_stacked_errors_name_the_layer(stack, monkeypatch):
    import obcjax.transforms as T
    from obcjax.stats import HessianState

    v, stats = stack
    calls = []
    solve = T._solve
    monkeypatch.setattr(T, "_solve", lambda *a, **k: calls.append(k["layer"]) or solve(*a, **k))
    rules = [("inp|head", None), (".*", LayerSpec(quant=Int(4), solver="gptq"))]
    # problem 2 of the stacked four has non-finite weights, problem 3 a Hessian with no signal
    k = np.array(v["params"]["block2"]["kernel"])
    k[1, 1] = np.nan
    params = {**v["params"], "block2": {"kernel": jnp.asarray(k), "bias": v["params"]["block2"]["bias"]}}
    st = stats["block3"]
    dead = {**stats, "block3": HessianState(jnp.zeros_like(st.sum), st.count)}
    with pytest.raises(ValueError, match=r"layer 'block2': W has 1 non-finite"):
        compress(params, dead, rules)
    with pytest.raises(ValueError, match=r"layer 'block3': H has no signal"):
        compress(v["params"], dead, rules)
    assert calls == []  # reported from the stacked call's statuses
    # a combination the solver refuses is refused in the layer's words, first layer first
    with pytest.raises(ValueError, match=r"layer 'block0'.*magnitude baseline has no block"):
        compress(v["params"], stats, [("inp|head", None), (".*", LayerSpec(prune=Block(0.5, 4),
                                                                           solver="magnitude"))])


def test_one_trace_per_shape_and_options(stack, monkeypatch):
    import chex

    import obcjax.transforms as T

    v, stats = stack
    monkeypatch.setattr(T, "_BATCHED", {})
    traces = []

    def counted(*a, **k):
        traces.append(1)
        return solve_pure(*a, **k)

    solve_pure = T._solve_pure
    monkeypatch.setattr(T, "_solve_pure", chex.assert_max_traces(counted, n=1))
    rules = [("inp|head", None), (".*", LayerSpec(NM(2, 4), None, "gptq"))]
    a = compress(v["params"], stats, rules)
    b = compress(v["params"], stats, rules)  # the same program again: no new trace
    assert len(traces) == 1
    _identical(a, b)
    # three of the four (padded to a chunk of four) reuse it as well
    compress(v["params"], stats, [("inp|head|block0", None), (".*", LayerSpec(NM(2, 4), None,
                                                                              "gptq"))])
    assert len(traces) == 1


def test_prune_levels_same_shaped_layers_equal_one_by_one(stack, monkeypatch):
    import obcjax.transforms as T

    v, stats = stack
    rules = [("inp|head", None), (".*", True)]
    for solver in ("obc", ExactOBS(method="naive"), "magnitude"):
        batched = prune_levels(v["params"], stats, [0.3, 0.6], rules=rules, solver=solver)
        with monkeypatch.context() as m:
            m.setattr(T, "_stacked", lambda *a, **k: None)
            loop = prune_levels(v["params"], stats, [0.3, 0.6], rules=rules, solver=solver)
        for b, lp in zip(batched, loop):
            for path in BLOCKS:
                np.testing.assert_array_equal(
                    np.asarray(b[path]["kernel"]) == 0, np.asarray(lp[path]["kernel"]) == 0
                )
                np.testing.assert_allclose(
                    b[path]["kernel"], lp[path]["kernel"], rtol=1e-6, atol=1e-7
                )
    with pytest.raises(ValueError, match="prune_levels: solver"):
        prune_levels(v["params"], stats, [0.5], solver=GPTQ())


def test_from_flat_builds_the_trees_from_per_layer_results(setup):
    """Every producer's constructor: matrix QArrays (one per group) go to kernel layout with the
    layer's layout, read off the codes when none is given; bad paths and shapes are errors."""
    _, v, stats, _ = setup
    out = compress(v["params"], stats, [("dw", Int(4)), ("fc", Unstructured(0.5)), (".*", None)])
    q = out.qarray("dw")
    per_group = [q.as_matrix(g) for g in range(8)]
    again = Compressed.from_flat(out.params, {"fc": out.mask("fc")}, {"dw": per_group},
                                 out.losses, out.specs, out.summary)
    assert again.qarray("dw").layout == q.layout == out.layouts["dw"]
    for f in ("codes", "scale", "zero"):
        np.testing.assert_array_equal(getattr(again.qarray("dw"), f), getattr(q, f))
    np.testing.assert_array_equal(again.mask("fc"), out.mask("fc"))
    assert again.layouts["fc"] == out.layouts["fc"]
    assert again.mask("dw") is None and again.qarray("fc") is None and again.mask("nope") is None
    with pytest.raises(ValueError, match="'nope' is not in params"):
        Compressed.from_flat(out.params, {"nope": out.mask("fc")})
    with pytest.raises(ValueError, match="layer 'fc': mask of shape"):
        Compressed.from_flat(out.params, {"fc": out.mask("fc")[:2]})
