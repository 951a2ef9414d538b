"""obcjax.calibration: statistics captured from unmodified Linen and NNX models."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from obcjax import calibration
from obcjax.calibration import calibrate, finalize
from obcjax.stats import hessian_finalize
from tests.reference_stats import np_patches

RNG = np.random.default_rng(0)


def _same_pads(n, k, s, d):
    """TensorFlow/XLA 'SAME' padding, written out independently of lax."""
    eff = (k - 1) * d + 1
    out = -(-n // s)
    total = max((out - 1) * s + eff - n, 0)
    return (total // 2, total - total // 2)


def _ref_H(rows):
    """2/N Σ x xᵀ per group in float64 from (tokens, G, cols) rows."""
    rows = np.asarray(rows, np.float64)
    return 2 * np.einsum("tgi,tgj->gij", rows, rows) / rows.shape[0]


def _assert_rel(a, b, rtol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    err = np.abs(a - b).max() / np.abs(b).max()
    assert err <= rtol, err


# ----------------------------------------------------------------------------- one-layer models


class LinenOne(nn.Module):
    """A single named layer, so its input is the batch itself."""

    make: object

    @nn.compact
    def __call__(self, x):
        return self.make()(x)


class NNXOne(nnx.Module):
    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        return self.layer(x)


CONV_CASES = {
    # name: (x spatial, cin, kernel, out, strides, padding, dilation, groups)
    "stride2_same": ((9, 8), 4, (3, 3), 6, (2, 2), "SAME", (1, 1), 1),
    "explicit_pad": ((7, 8), 4, (3, 2), 6, (1, 1), ((2, 1), (0, 1)), (1, 1), 1),
    "dilation2": ((9, 9), 4, (3, 3), 6, (1, 1), "SAME", (2, 2), 1),
    "depthwise": ((7, 7), 6, (3, 3), 6, (1, 1), "SAME", (1, 1), 6),
    "grouped": ((7, 6), 6, (3, 3), 9, (2, 1), "VALID", (1, 2), 3),
    "conv1d": ((15,), 4, (5,), 6, (2,), "SAME", (2,), 2),
}


@pytest.mark.parametrize("case", list(CONV_CASES))
@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_conv_hessian_matches_float64_numpy(case, flavour):
    xs, cin, ks, out, strides, padding, dil, G = CONV_CASES[case]
    batches = [RNG.normal(size=(b, *xs, cin)).astype(np.float32) for b in (2, 3)]
    kw = dict(strides=strides, padding=padding, kernel_dilation=dil, feature_group_count=G)
    if flavour == "linen":
        model = LinenOne(lambda: nn.Conv(out, ks, name="layer", **kw))
        variables = model.init(jax.random.key(0), batches[0])
    else:
        model = NNXOne(nnx.Conv(cin, out, ks, rngs=nnx.Rngs(0), **kw))
        variables = None
    stats = calibrate(model, variables, batches)
    assert list(stats) == ["layer"]
    if padding == "SAME":
        pads = [_same_pads(n, k, s, d) for n, k, s, d in zip(xs, ks, strides, dil)]
    elif padding == "VALID":
        pads = [(0, 0)] * len(xs)
    else:
        pads = list(padding)
    rows = np.concatenate([np_patches(b, ks, strides, pads, dil, G) for b in batches])
    assert int(stats["layer"].count) == rows.shape[0]
    _assert_rel(hessian_finalize(stats["layer"]), _ref_H(rows))


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_dense_on_sequences_matches_float64_numpy(flavour):
    batches = [RNG.normal(size=(b, 5, 7)).astype(np.float32) for b in (2, 4)]
    if flavour == "linen":
        model = LinenOne(lambda: nn.Dense(3, name="layer"))
        variables = model.init(jax.random.key(0), batches[0])
    else:
        model, variables = NNXOne(nnx.Linear(7, 3, rngs=nnx.Rngs(0))), None
    stats = calibrate(model, variables, batches)
    X = np.concatenate([b.reshape(-1, 7) for b in batches]).astype(np.float64)
    assert int(stats["layer"].count) == 30
    assert stats["layer"].sum.shape == (1, 7, 7)
    _assert_rel(hessian_finalize(stats["layer"])[0], 2 * X.T @ X / 30)


def test_dense_general_linen_and_nnx_twins():
    x = RNG.normal(size=(3, 4, 2, 5)).astype(np.float32)
    lin = LinenOne(lambda: nn.DenseGeneral((2, 3), axis=(-1, 1), name="layer"))
    v = lin.init(jax.random.key(0), x)
    nx = NNXOne(nnx.LinearGeneral((4, 5), (2, 3), axis=(-1, 1), rngs=nnx.Rngs(0)))
    a = calibrate(lin, v, [x], layer_types=["DenseGeneral"])
    b = calibrate(nx, None, [x], layer_types=["LinearGeneral"])
    # Flax sorts the contracted axes, so rows are (axis 1, axis 3) flattened: kernel.reshape(20, -1).
    X = np.moveaxis(x, (1, 3), (2, 3)).reshape(-1, 20).astype(np.float64)
    for s in (a, b):
        _assert_rel(hessian_finalize(s["layer"])[0], 2 * X.T @ X / 6)
    k = np.asarray(v["params"]["layer"]["kernel"], np.float64)
    assert k.shape == (4, 5, 2, 3)
    y = X @ k.reshape(20, 6) + np.asarray(v["params"]["layer"]["bias"]).reshape(6)
    np.testing.assert_allclose(lin.apply(v, x).reshape(-1, 6), y, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- twins


class LinenBlock(nn.Module):
    def setup(self):
        self.dw = nn.Conv(8, (3, 3), feature_group_count=8)
        self.grouped = nn.Conv(8, (3, 3), feature_group_count=2, padding=((1, 1), (2, 0)))

    def __call__(self, x):
        return self.grouped(nn.relu(self.dw(x)))


class LinenNet(nn.Module):
    def setup(self):
        self.conv1 = nn.Conv(8, (3, 3), strides=2)
        self.block = LinenBlock()
        self.seq = nn.Conv(6, (3,), kernel_dilation=2, padding="CAUSAL")
        self.dense = nn.Dense(5)
        self.head = nn.Dense(3)

    def __call__(self, x):
        h = self.block(nn.relu(self.conv1(x)))  # (B, 4, 4, 8)
        s = nn.relu(self.seq(h.reshape(h.shape[0], 16, 8)))  # 1-d conv over 16 positions
        d = self.dense(s)  # Dense on (B, T, F)
        return self.head(d.mean(1))


class NNXBlock(nnx.Module):
    def __init__(self, rngs):
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, rngs=rngs)
        self.grouped = nnx.Conv(8, 8, (3, 3), feature_group_count=2, padding=((1, 1), (2, 0)),
                                rngs=rngs)

    def __call__(self, x):
        return self.grouped(nnx.relu(self.dw(x)))


class NNXNet(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), strides=2, rngs=rngs)
        self.block = NNXBlock(rngs)
        self.seq = nnx.Conv(8, 6, (3,), kernel_dilation=2, padding="CAUSAL", rngs=rngs)
        self.dense = nnx.Linear(6, 5, rngs=rngs)
        self.head = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        h = self.block(nnx.relu(self.conv1(x)))
        s = nnx.relu(self.seq(h.reshape(h.shape[0], 16, 8)))
        d = self.dense(s)
        return self.head(d.mean(1))


def _twins():
    nx = NNXNet(nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(nx, nnx.Param))
    return LinenNet(), {"params": params}, nx


def _batches(sizes=(4, 4, 4), seed=0):
    r = np.random.default_rng(seed)
    return [r.normal(size=(b, 8, 8, 3)).astype(np.float32) for b in sizes]


ORDER = ["conv1", "block/dw", "block/grouped", "seq", "dense", "head"]


def _find_kernels(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            if "kernel" in v:
                out["/".join(map(str, prefix + (k,)))] = v["kernel"]
            out.update(_find_kernels(v, prefix + (k,)))
    return out


def test_linen_and_nnx_twins_agree():
    lin, variables, nx = _twins()
    np.testing.assert_allclose(lin.apply(variables, _batches()[0]), nx(_batches()[0]), rtol=1e-5,
                               atol=1e-6)
    a = calibrate(lin, variables, _batches())
    b = calibrate(nx, None, _batches())
    assert list(a) == list(b) == ORDER
    kernels = _find_kernels(variables["params"])
    for p in ORDER:
        assert a[p].sum.shape == b[p].sum.shape
        assert int(a[p].count) == int(b[p].count) > 0
        np.testing.assert_allclose(a[p].sum, b[p].sum, rtol=1e-6, atol=1e-6 * float(
            jnp.abs(a[p].sum).max()))
        # The key addresses the kernel, and the statistics fit its flattened groups.
        G, cols = a[p].sum.shape[:2]
        k = kernels[p]
        assert k.shape[-1] % G == 0 and int(np.prod(k.shape[:-1])) == cols
    assert a["block/dw"].sum.shape == (8, 9, 9)
    assert a["block/grouped"].sum.shape == (2, 36, 36)
    assert int(a["dense"].count) == 12 * 16


def test_twin_statistics_equal_explicit_forward():
    # Recompute the inputs of `seq` and `dense` by hand from the NNX model and compare.
    lin, variables, nx = _twins()
    xs = _batches()
    stats = calibrate(lin, variables, xs)
    hs = [nx.block(nnx.relu(nx.conv1(x))).reshape(x.shape[0], 16, 8) for x in xs]
    k = nx.seq.kernel[...]
    rows = np.concatenate([np_patches(h, (3,), (1,), [(4, 0)], (2,), 1) for h in hs])
    _assert_rel(hessian_finalize(stats["seq"]), _ref_H(rows))
    X = np.maximum(rows[:, 0] @ np.asarray(k, np.float64).reshape(24, 6) + nx.seq.bias[...], 0)
    _assert_rel(hessian_finalize(stats["dense"])[0], 2 * X.T @ X / X.shape[0])


def test_rules_select_and_skip():
    lin, variables, nx = _twins()
    rules = [("head", None), ("block/.*", True), ("dense", True)]
    a = calibrate(lin, variables, _batches((2,)), rules=rules)
    b = calibrate(nx, None, _batches((2,)), rules=rules)
    assert list(a) == list(b) == ["block/dw", "block/grouped", "dense"]
    only = calibrate(nx, None, _batches((2,)), layer_types=("Conv",), rules=".*/dw")
    assert list(only) == ["block/dw"]


def test_batch_forms_and_custom_forward():
    lin, variables, nx = _twins()
    xs = _batches((2, 2))
    ref = calibrate(nx, None, xs, rules="conv1")["conv1"]
    ys = [np.zeros(2)] * 2
    for batches in ([(x, y) for x, y in zip(xs, ys)], [{"x": x, "y": y} for x, y in zip(xs, ys)]):
        got = calibrate(nx, None, batches, rules="conv1")["conv1"]
        np.testing.assert_array_equal(got.sum, ref.sum)
    got = calibrate(
        lin, variables, [{"img": x} for x in xs], rules="conv1",
        forward=lambda m, b: m(b["img"]), progress=True,
    )["conv1"]
    np.testing.assert_allclose(got.sum, ref.sum, rtol=1e-6)
    # A generator is consumed once, lazily.
    got = calibrate(nx, None, (x for x in xs), rules="conv1")["conv1"]
    np.testing.assert_array_equal(got.sum, ref.sum)


def test_sequential_mode_is_a_second_call_with_other_variables():
    lin, variables, nx = _twins()
    xs = _batches((2,))
    base = calibrate(lin, variables, xs)
    params = jax.tree.map(lambda a: a, variables["params"])
    params["block"]["grouped"]["kernel"] = 0.5 * params["block"]["grouped"]["kernel"]
    a = calibrate(lin, {"params": params}, xs)
    b = calibrate(nx, {"block": {"grouped": {"kernel": params["block"]["grouped"]["kernel"]}}}, xs)
    c = calibrate(nx, nnx.State({"block": {"grouped": {"kernel": nnx.Param(
        params["block"]["grouped"]["kernel"])}}}), xs)
    for s in (a, b, c):
        # Layers before the change see the same inputs, layers after it do not.
        np.testing.assert_allclose(s["block/grouped"].sum, base["block/grouped"].sum, rtol=1e-6)
        assert not np.allclose(s["seq"].sum, base["seq"].sum, rtol=1e-3)
        np.testing.assert_allclose(s["seq"].sum, a["seq"].sum, rtol=1e-5, atol=1e-5)
    # The NNX model was not changed by calibrating with other variables.
    np.testing.assert_array_equal(nx.block.grouped.kernel[...],
                                  variables["params"]["block"]["grouped"]["kernel"])


def test_nnx_model_is_not_mutated_and_classes_restored():
    class WithBN(nnx.Module):
        def __init__(self, rngs):
            self.conv1 = nnx.Conv(3, 4, (3, 3), rngs=rngs)
            self.bn = nnx.BatchNorm(4, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv1(x))

    m = WithBN(nnx.Rngs(0))  # train mode: the forward pass would update batch statistics
    before = jax.tree.map(np.array, nnx.state(m))
    orig = nnx.Conv.__call__
    calibrate(m, None, _batches((2,)))
    chex.assert_trees_all_equal(jax.tree.map(np.array, nnx.state(m)), before)
    assert nnx.Conv.__call__ is orig
    with pytest.raises(ValueError):
        calibrate(m, None, [np.ones((2, 8, 8, 5), np.float32)])
    assert nnx.Conv.__call__ is orig and nnx.Linear.__call__ is not None


# ----------------------------------------------------------------------------- jit and sharding


def _counting(fn, calls):
    def wrapped(*a, **k):
        calls.append(1)
        return fn(*a, **k)

    return wrapped


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_step_traced_once_for_equal_shapes(monkeypatch, flavour):
    chex.clear_trace_counter()
    monkeypatch.setattr(
        calibration, "_jit_step", lambda fn: jax.jit(chex.assert_max_traces(fn, n=1))
    )
    lin, variables, nx = _twins()
    model, v = (lin, variables) if flavour == "linen" else (nx, None)
    stats = calibrate(model, v, _batches((3, 3, 3, 3)))
    assert int(stats["conv1"].count) == 12 * 16
    # A second call on the same model reuses the compiled step: no trace at all, so even two new
    # batch shapes stay within n=1 ... once the counter has been cleared.
    calls = []
    monkeypatch.setattr(calibration, "_discover", _counting(calibration._discover, calls))
    calibrate(model, v, _batches((3, 3)))
    assert calls == []  # the abstract discovery pass is cached as well
    # The check can fail: two new batch shapes mean two traces.
    chex.clear_trace_counter()
    with pytest.raises(AssertionError, match="traced > 1 times"):
        calibrate(model, v, _batches((5, 2)))
    chex.clear_trace_counter()


def test_four_devices_equal_one_device():
    assert jax.device_count() >= 4
    lin, variables, nx = _twins()
    xs = _batches((4, 8))
    mesh = jax.make_mesh((4,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,))
    ref_l = calibrate(lin, variables, xs)
    for model, v in ((lin, variables), (nx, None)):
        got = calibrate(model, v, xs, mesh=mesh)
        for p in ORDER:
            assert len(got[p].sum.sharding.device_set) == 4
            np.testing.assert_allclose(got[p].sum, ref_l[p].sum, rtol=1e-5,
                                       atol=1e-6 * float(jnp.abs(ref_l[p].sum).max()))
            assert int(got[p].count) == int(ref_l[p].count)
    # Batches already sharded over a mesh are used as they are.
    auto = jax.make_mesh((2, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    sh = jax.sharding.NamedSharding(auto, jax.sharding.PartitionSpec(("a", "b")))
    got = calibrate(nx, None, [jax.device_put(x, sh) for x in xs])
    for p in ORDER:
        np.testing.assert_allclose(got[p].sum, ref_l[p].sum, rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(ref_l[p].sum).max()))
    with pytest.raises(ValueError, match="not divisible over the mesh's 4 devices"):
        calibrate(nx, None, _batches((6,)), mesh=mesh)


def test_data_parallel_psum_and_masks_equal_one_device(monkeypatch):
    """4 devices: the compiled step sums per-device partial Hessians with all-reduces, and the
    ExactOBS masks derived from the statistics are exactly those of one device (a well-conditioned
    problem: 512 Gaussian rows for 16 columns, no ties in the OBS ranking)."""
    from obcjax.calibration import shard_batch
    from obcjax.specs import Unstructured
    from obcjax.transforms import compress

    rng = np.random.default_rng(3)
    model = nn.Sequential([nn.Dense(24), nn.relu, nn.Dense(8)])
    xs = [rng.normal(size=(128, 16)).astype(np.float32) for _ in range(4)]
    variables = model.init(jax.random.key(0), xs[0])
    mesh = jax.make_mesh((4,), ("data",))
    steps = []
    monkeypatch.setattr(calibration, "_jit_step", lambda fn: steps.append(jax.jit(fn)) or steps[-1])
    one = calibrate(model, variables, xs)
    four = calibrate(model, variables, xs, mesh=mesh)
    assert len(steps) == 2
    states = jax.tree.map(jnp.zeros_like, one)
    hlo = steps[1].lower(states, variables, shard_batch(xs[0], mesh)).compile().as_text()
    assert "all-reduce" in hlo
    assert "all-reduce" not in steps[0].lower(states, variables, xs[0]).compile().as_text()
    for p in one:
        assert len(four[p].sum.sharding.device_set) == 4
        np.testing.assert_allclose(four[p].sum, one[p].sum, rtol=1e-5,
                                   atol=1e-6 * float(jnp.abs(one[p].sum).max()))
    rules = [(".*", Unstructured(0.5))]
    a = compress(variables["params"], one, rules)
    b = compress(variables["params"], four, rules)
    for p in one:
        ma = a.mask(p) if hasattr(a, "mask") else a.masks[p]
        mb = b.mask(p) if hasattr(b, "mask") else b.masks[p]
        np.testing.assert_array_equal(np.asarray(ma), np.asarray(mb))
    np.testing.assert_allclose(
        np.asarray(a.params["layers_2"]["kernel"]), np.asarray(b.params["layers_2"]["kernel"]),
        rtol=1e-4, atol=1e-5)
    # shard_batch: what calibrate does with mesh=, and a clear error for a ragged batch
    assert len(shard_batch(xs[0], mesh).sharding.device_set) == 4
    with pytest.raises(ValueError, match="not divisible over the mesh's 4 devices"):
        shard_batch(xs[0][:6], mesh)


# ----------------------------------------------------------------------------- errors


def test_error_rule_matching_no_layer():
    lin, variables, nx = _twins()
    for model, v in ((lin, variables), (nx, None)):
        with pytest.raises(ValueError, match=r"'blok/dw'.*'block/dw'"):
            calibrate(model, v, _batches((2,)), rules=["blok/dw"])


def test_error_empty_batches():
    lin, variables, nx = _twins()
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(lin, variables, [])
    with pytest.raises(ValueError, match="batches is empty"):
        calibrate(nx, None, iter(()))


def test_error_wrong_input_shape_names_batch_and_chains_model_error():
    lin, variables, nx = _twins()
    bad = np.ones((2, 8, 8, 5), np.float32)
    for model, v in ((lin, variables), (nx, None)):
        with pytest.raises(ValueError, match=r"batch 0 .*\(2, 8, 8, 5\).*did not run") as e:
            calibrate(model, v, [bad])
        assert e.value.__cause__ is not None
        # The same for a later batch whose shape differs from the first.
        with pytest.raises(ValueError, match=r"batch 1 "):
            calibrate(model, v, [_batches((2,))[0], bad])


def test_error_nan_names_first_layer_and_batch():
    lin, variables, nx = _twins()
    xs = _batches((2, 2, 2))
    xs[1] = xs[1].copy()
    xs[1][0, 3, 3, 1] = np.nan
    for model, v in ((lin, variables), (nx, None)):
        with pytest.raises(ValueError, match=r"layer 'conv1' \(the first in forward order\).*batch 1"):
            calibrate(model, v, xs)
    # Skip conv1: the first affected layer is then the next one.
    with pytest.raises(ValueError, match=r"layer 'block/dw'"):
        calibrate(nx, None, xs, rules=[("conv1", None), (".*", True)])
    xs[1][0, 3, 3, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or inf"):
        calibrate(nx, None, xs)


def test_error_zero_tokens():
    lin, variables, nx = _twins()
    empty = np.zeros((0, 8, 8, 3), np.float32)
    for model, v in ((lin, variables), (nx, None)):
        with pytest.raises(ValueError, match=r"\['conv1', 'block/dw'.*zero tokens"):
            calibrate(model, v, [empty])


def test_error_bad_arguments():
    lin, variables, nx = _twins()
    with pytest.raises(TypeError, match="Linen model needs its variables"):
        calibrate(lin, None, _batches((2,)))
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        calibrate(lambda x: x, None, _batches((2,)))
    with pytest.raises(ValueError, match="unknown layer type 'Embed'"):
        calibrate(nx, None, _batches((2,)), layer_types=["Embed"])
    with pytest.raises(ValueError, match="without an 'x' entry"):
        calibrate(nx, None, [{"img": _batches((2,))[0]}])
    with pytest.raises(ValueError, match="forward= or apply_kwargs="):
        calibrate(nx, None, _batches((2,)), forward=lambda m, b: m(b), apply_kwargs={"a": 1})
    with pytest.raises(ValueError, match="no layer of types"):
        calibrate(nx, None, _batches((2,)), layer_types=["DenseGeneral"])


def test_finalize_all():
    lin, variables, _ = _twins()
    H = finalize(calibrate(lin, variables, _batches((2,))))
    assert list(H) == ORDER and H["block/dw"].shape == (8, 9, 9)
    for h in H.values():
        np.testing.assert_allclose(h, jnp.swapaxes(h, -1, -2), rtol=1e-6, atol=1e-6)


def test_cached_step_not_reused_under_an_interceptor():
    """A Linen interceptor around calibrate changes what the step computes: such a call traces
    its own step (the cache is bypassed), and the statistics see the intercepted inputs."""
    import flax.linen as nn

    lin, variables, _ = _twins()
    xs = _batches((3, 3))
    plain = calibrate(lin, variables, xs)

    def double_dense_inputs(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            args = (args[0] * 2.0, *args[1:])
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(double_dense_inputs):
        doubled = calibrate(lin, variables, xs)
    again = calibrate(lin, variables, xs)
    # "dense" (the first Dense) sees its input doubled: x xT scales by 4. The convs before it
    # are not intercepted.
    np.testing.assert_allclose(doubled["dense"].sum, 4 * plain["dense"].sum, rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(plain["dense"].sum).max()))
    # (another compiled program: equal up to float32 summation order)
    np.testing.assert_allclose(doubled["conv1"].sum, plain["conv1"].sum, rtol=1e-5,
                               atol=1e-6 * float(jnp.abs(plain["conv1"].sum).max()))
    for p in plain:
        np.testing.assert_array_equal(again[p].sum, plain[p].sum)


def test_cached_step_does_not_keep_the_variables_alive():
    """The compiled step stays cached after calibrate returns; the arrays of the call must not."""
    import gc
    import weakref

    lin, variables, _ = _twins()
    params = jax.tree.map(lambda a: np.array(a, copy=True), variables["params"])
    ref = weakref.ref(params["dense"]["kernel"])
    calibrate(lin, {"params": params}, _batches((3,)))
    del params
    gc.collect()
    assert ref() is None
