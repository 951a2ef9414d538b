"""obcjax.capture: one interception for Linen and NNX (calibration, activations, pipeline, FIT)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.errors import ScopeCollectionNotFound

from obcjax import fit
from obcjax.activations import activation_forward, calibrate_activations, fake_quantize
from obcjax.calibration import calibrate
from obcjax.capture import (
    LAYER_TYPES,
    BoundModel,
    CaptureError,
    input_hook,
    intercept,
    layer_kinds,
    layer_rows,
)
from obcjax.pipeline import reestimate_batchnorm
from obcjax.stats import hessian_finalize

KINDS = ("Dense", "Conv", "DenseGeneral")


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3), strides=2, name="conv")(x))
        x = nn.DenseGeneral((2, 3), name="proj")(x)  # kernel (4, 2, 3)
        return nn.Dense(5, name="fc")(x.reshape(x.shape[0], -1))


class NetNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 4, (3, 3), strides=2, rngs=rngs)
        self.proj = nnx.LinearGeneral(4, (2, 3), rngs=rngs)
        self.fc = nnx.Linear(3 * 3 * 6, 5, rngs=rngs)

    def __call__(self, x):
        x = self.proj(nnx.relu(self.conv(x)))
        return self.fc(x.reshape(x.shape[0], -1))


def _twins(seed=0):
    lin = Net()
    v = lin.init(jax.random.key(seed), jnp.zeros((1, 6, 6, 3)))
    nx = NetNNX(nnx.Rngs(seed + 1))
    state = nnx.state(nx, nnx.Param)
    nnx.replace_by_pure_dict(state, v["params"])
    nnx.update(nx, state)
    return lin, v, nx


def _x(seed=0, n=2):
    return np.random.default_rng(seed).normal(size=(n, 6, 6, 3)).astype(np.float32)


def _record(log):
    def hook(call, proceed):
        y = proceed(*call.args, **call.kwargs)
        log.append((call.path, call.kind, tuple(call.input.shape), tuple(y.shape)))
        return y

    return hook


def test_intercept_sees_the_same_calls_in_linen_and_nnx_twins():
    lin, v, nx = _twins()
    x = jnp.asarray(_x())
    seen_l, seen_n = [], []
    with intercept(lin, _record(seen_l), KINDS):
        y_l = lin.apply(v, x)
    with intercept(nx, _record(seen_n), KINDS):
        y_n = nx(x)
    assert (
        seen_l
        == seen_n
        == [
            ("conv", "Conv", (2, 6, 6, 3), (2, 3, 3, 4)),
            ("proj", "DenseGeneral", (2, 3, 3, 4), (2, 3, 3, 2, 3)),
            ("fc", "Dense", (2, 54), (2, 5)),
        ]
    )
    np.testing.assert_allclose(y_l, y_n, rtol=1e-6, atol=1e-6)
    # a subset of the layer types; the NNX names and classes mean the same layers
    for types in (["Linear"], [nn.Dense], [nnx.Linear]):
        seen = []
        with intercept(nx, _record(seen), types):
            nx(x)
        assert [s[0] for s in seen] == ["fc"]


def test_calibrate_equals_layer_rows_on_dense_conv_and_densegeneral():
    lin, v, nx = _twins()
    xs = [_x(1), _x(2)]
    got_l = calibrate(lin, v, xs, layer_types=KINDS)
    got_n = calibrate(nx, None, xs, layer_types=KINDS)
    assert list(got_l) == list(got_n) == ["conv", "proj", "fc"]
    layers = {"conv": nx.conv, "proj": nx.proj, "fc": nx.fc}
    inputs = {p: [] for p in layers}

    def keep(call):
        inputs[call.path].append(call.input)

    for x in xs:
        with intercept(nx, input_hook(keep), KINDS):
            nx(jnp.asarray(x))
    for path, kind in (("conv", "Conv"), ("proj", "DenseGeneral"), ("fc", "Dense")):
        rows = np.concatenate(
            [np.asarray(layer_rows(kind, layers[path], a, path), np.float64) for a in inputs[path]]
        )
        ref = 2 * np.einsum("tgi,tgj->gij", rows, rows) / len(rows)
        for got in (got_l, got_n):
            np.testing.assert_allclose(hessian_finalize(got[path]), ref, rtol=1e-5, atol=1e-6)
    assert int(got_l["proj"].count) == 2 * 2 * 9 and got_l["proj"].sum.shape == (1, 4, 4)


def test_input_hook_replaces_inputs_on_both_front_ends():
    lin, v, nx = _twins()
    x = jnp.asarray(_x())

    def halve_conv(call):
        return call.input / 2 if call.path == "conv" else None

    with intercept(lin, input_hook(halve_conv), KINDS):
        y_l = lin.apply(v, x)
    with intercept(nx, input_hook(halve_conv), KINDS):
        y_n = nx(x)
    want = lin.apply(v, x / 2)
    np.testing.assert_allclose(y_l, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y_n, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flavour", ["linen", "nnx"])
def test_nested_contexts_innermost_sees_the_call_first(flavour):
    lin, v, nx = _twins()
    model = nx if flavour == "nnx" else lin
    run = (lambda x: nx(x)) if flavour == "nnx" else (lambda x: lin.apply(v, x))
    x = jnp.asarray(_x())
    outer = []
    with intercept(
        model, input_hook(lambda c: outer.append(c.input) if c.path == "conv" else None)
    ):
        with intercept(model, input_hook(lambda c: c.input + 1.0 if c.path == "conv" else None)):
            run(x)
        run(x)  # the inner context is gone
    np.testing.assert_array_equal(outer[0], x + 1.0)
    np.testing.assert_array_equal(outer[1], x)


def test_calibrate_through_activation_forward_sees_the_quantized_inputs_on_both_front_ends():
    # calibrate's interception is entered first and activation_forward's inside it: the
    # statistics are those of the inputs the layers really get (Linen saw the float ones before)
    lin, v, nx = _twins()
    xs = [_x(1)]
    aq = calibrate_activations(lin, v, xs, layer_types=KINDS)
    fwd = activation_forward(aq, layer_types=KINDS)
    got_l = calibrate(lin, v, xs, layer_types=KINDS, forward=fwd)
    got_n = calibrate(nx, None, xs, layer_types=KINDS, forward=fwd)
    rows = np.asarray(layer_rows("Conv", nx.conv, fake_quantize(xs[0], aq["conv"])), np.float64)
    ref = 2 * np.einsum("tgi,tgj->gij", rows, rows) / len(rows)
    for got in (got_l, got_n):
        np.testing.assert_allclose(hessian_finalize(got["conv"]), ref, rtol=1e-5, atol=1e-6)
    for p in got_n:
        np.testing.assert_allclose(got_l[p].sum, got_n[p].sum, rtol=1e-5, atol=1e-5)


class MyDense(nn.Dense):
    def __call__(self, inputs):
        return super().__call__(inputs)


class Wrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
        return MyDense(3, name="fc")(x)


class MyLinear(nnx.Linear):
    def __call__(self, inputs):
        return super().__call__(inputs)


def test_a_subclass_calling_super_reaches_the_hook_once():
    x = jnp.ones((2, 4))
    model = Wrapped()
    v = model.init(jax.random.key(0), x)
    seen = []
    with intercept(model, _record(seen), ["Dense"]):
        model.apply(v, x)
    assert [s[:2] for s in seen] == [("fc", "Dense")]
    layer = MyLinear(4, 3, rngs=nnx.Rngs(0))
    seen = []
    # both the subclass and its parent class wrapped: still one call
    with intercept(layer, _record(seen), [MyLinear, "Dense"]):
        layer(x)
    assert [s[:2] for s in seen] == [("", "MyLinear")]


def test_nnx_classes_restored_also_on_error():
    _, _, nx = _twins()
    orig = {c: c.__dict__["__call__"] for c in (nnx.Linear, nnx.Conv, nnx.LinearGeneral)}

    def boom(call, proceed):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with intercept(nx, boom, KINDS):
            nx(jnp.asarray(_x()))
    for c, f in orig.items():
        assert c.__dict__["__call__"] is f


def test_another_thread_is_not_intercepted():
    # The NNX wrapper is installed on the class while a context is open; a call from another
    # thread (here on the very same model) must run untouched.
    _, _, nx = _twins()
    x = jnp.asarray(_x())
    orig = nnx.Linear.__dict__["__call__"]
    entered, release = threading.Event(), threading.Event()
    calls = []

    def hook(call, proceed):
        calls.append(threading.get_ident())
        return proceed(*call.args, **call.kwargs)

    def worker():
        with intercept(nx, hook, KINDS):
            entered.set()
            assert release.wait(60)
            nx(x)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert entered.wait(60)
        y = nx(x)  # this thread, while the worker's context is open
    finally:
        release.set()
        t.join(60)
    assert calls and set(calls) == {t.ident}
    assert len(calls) == 3
    np.testing.assert_allclose(y, nx(x))
    assert nnx.Linear.__dict__["__call__"] is orig


def test_concurrent_nnx_calibrations_equal_sequential_ones():
    models = [_twins(seed)[2] for seed in range(3)]
    xs = [_x(5), _x(6)]
    want = [calibrate(m, None, xs, layer_types=KINDS) for m in models]
    got: dict[int, object] = {}
    errors = []
    start = threading.Barrier(len(models))

    def worker(i):
        try:
            start.wait(60)
            got[i] = calibrate(models[i], None, xs, layer_types=KINDS)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not errors, errors
    for i, w in enumerate(want):
        assert list(got[i]) == list(w)
        for p in w:
            np.testing.assert_array_equal(got[i][p].sum, w[p].sum)
            assert int(got[i][p].count) == int(w[p].count)


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(4, (3, 3), name="conv1")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        return nn.Conv(2, (3, 3), name="conv2")(nn.relu(x))


def test_missing_batch_stats_is_an_error_not_fresh_statistics():
    model = BNNet()
    v = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.5, v["batch_stats"])}
    xs = [_x(7)]
    ev = {"train": False}
    with pytest.raises(ScopeCollectionNotFound):  # what model.apply says
        model.apply({"params": v["params"]}, xs[0], **ev)
    with pytest.raises(CaptureError, match=r"calibrate: .*collection 'batch_stats'.*\['params'\]"):
        calibrate(model, {"params": v["params"]}, xs, apply_kwargs=ev)
    # the collection given, but without this layer's statistics: the variables are named
    with pytest.raises(CaptureError, match=r"\['bn/mean', 'bn/var'\].*'batch_stats'"):
        calibrate(model, {"params": v["params"], "batch_stats": {}}, xs, apply_kwargs=ev)
    with pytest.raises(ValueError, match="reestimate_batchnorm: .*'batch_stats'"):
        reestimate_batchnorm(model, {"params": v["params"]}, xs, apply_kwargs={"train": True})
    # with the statistics the model was trained with, conv2's statistics are those of its inputs
    stats = calibrate(model, v, xs, apply_kwargs=ev)
    seen = []
    bound = BoundModel(model, v)
    keep = input_hook(lambda c: seen.append((c.path, c.module, c.input)))
    bound.run(lambda m, x: m(x, **ev), jnp.asarray(xs[0]), hook=keep, layer_types=["Conv"])
    assert [s[0] for s in seen] == ["conv1", "conv2"]
    rows = np.asarray(layer_rows("Conv", seen[1][1], seen[1][2]), np.float64)
    ref = 2 * np.einsum("tgi,tgj->gij", rows, rows) / len(rows)
    np.testing.assert_allclose(hessian_finalize(stats["conv2"]), ref, rtol=1e-5, atol=1e-6)
    # batch statistics updated by a training-mode forward pass are discarded
    bound.run(lambda m, x: m(x, train=True), jnp.asarray(xs[0]))
    np.testing.assert_array_equal(v["batch_stats"]["bn"]["mean"], np.full(4, 0.5, np.float32))


def test_bound_model_errors_and_layer_kinds():
    lin, v, nx = _twins()
    with pytest.raises(TypeError, match="Linen model needs its variables"):
        BoundModel(lin, None)
    with pytest.raises(TypeError, match="must be a dict"):
        BoundModel(lin, [v])
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        BoundModel(lambda x: x, v)
    with pytest.raises(TypeError, match="flax.linen.Module or a flax.nnx.Module"):
        with intercept(object(), lambda c, p: None):
            pass
    with pytest.raises(ValueError, match="pure dict"):
        BoundModel(nx, {"nope": {"kernel": jnp.zeros(3)}})
    with pytest.raises(ValueError, match="unknown layer type 'Embed'"):
        layer_kinds(["Embed"])
    with pytest.raises(ValueError, match="unknown layer type 'Embed'"):
        with intercept(nx, lambda c, p: None, ["Embed"]):
            pass
    assert layer_kinds(["LinearGeneral", nn.Conv, "Dense", "Linear"]) == (
        "DenseGeneral",
        "Conv",
        "Dense",
    )
    assert set(LAYER_TYPES) == set(KINDS)
    # NNX: a partial pure dict replaces parts of a private copy; the model is not changed
    before = np.asarray(nx.fc.kernel[...])
    bound = BoundModel(nx, {"fc": {"kernel": jnp.zeros_like(nx.fc.kernel[...])}})
    y = bound.run(lambda m, x: m(x), jnp.asarray(_x()))
    np.testing.assert_allclose(y, np.broadcast_to(np.asarray(nx.fc.bias[...]), y.shape))
    np.testing.assert_array_equal(nx.fc.kernel[...], before)


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(6, name="fc1")(x))
        x = nn.relu(nn.Dense(5, name="fc2")(x))
        return nn.Dense(3, name="fc3")(x)


class MLPNNX(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 6, rngs=rngs)
        self.fc2 = nnx.Linear(6, 5, rngs=rngs)
        self.fc3 = nnx.Linear(5, 3, rngs=rngs)

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def test_fit_activation_fisher_on_an_nnx_model_equals_its_linen_twin():
    lin = MLP()
    v = lin.init(jax.random.key(3), jnp.zeros((1, 2, 4)))
    nx = MLPNNX(nnx.Rngs(0))
    rng = np.random.default_rng(4)
    x = rng.normal(size=(10, 2, 4)).astype(np.float32)
    y = rng.integers(0, 3, 10).astype(np.int32)
    batches = [(x[:6], y[:6]), (x[6:], y[6:])]
    want = fit.activation_fisher(lin, v, batches, tol=0.0)
    # the NNX model's own (other) weights replaced by the twin's, given as a pure dict
    got = fit.activation_fisher(nx, v["params"], batches, tol=0.0)
    assert got.order == want.order == ["fc1", "fc2", "fc3"]
    assert set(got.trace) == {"fc2", "fc3"} and got.examples == 10 and got.batches == 2
    for p in got.trace:
        assert got.trace[p] == pytest.approx(want.trace[p], rel=1e-5)
        assert got.lo[p] == pytest.approx(want.lo[p], rel=1e-6, abs=1e-7)
        assert got.hi[p] == pytest.approx(want.hi[p], rel=1e-6)
    # the model's own state when variables is None: different weights, different traces
    own = fit.activation_fisher(nx, None, batches, tol=0.0)
    assert own.order == want.order and own.trace["fc2"] != pytest.approx(want.trace["fc2"])
