"""Activation quantization: calibration, fake-quantized forward, integer reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from obcjax.activations import (
    ActQuant,
    ActSpec,
    activation_errors,
    activation_forward,
    apply_quantized,
    calibrate_activations,
    compress_mixed,
    fake_quantize,
    integer_layer,
    mixed_database,
    quantized_apply,
)
from obcjax.allocation import activation_rules, materialize, parse_level, solve
from obcjax.calibration import calibrate
from obcjax.kernels import obq_quantize, rtn_quantize
from obcjax.layout import kernel_to_matrices, matrices_to_kernel
from obcjax.pipeline import reestimate_batchnorm
from obcjax.specs import Int


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(8, (3, 3), strides=2, padding="SAME", name="conv")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, padding=1, name="dw")(x)
        x = nn.relu(x).reshape(x.shape[0], -1)
        return nn.Dense(5, name="fc")(x)


class NetNNX(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.dw = nnx.Conv(8, 8, (3, 3), feature_group_count=8, padding=1, rngs=rngs)
        self.fc = nnx.Linear(8 * 4 * 4, 5, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.dw(nnx.relu(self.conv(x))))
        return self.fc(x.reshape(x.shape[0], -1))


@pytest.fixture(scope="module")
def setup():
    rng = np.random.default_rng(0)
    xs = [rng.normal(size=(8, 8, 8, 3)).astype(np.float32) for _ in range(3)]
    model = Net()
    v = model.init(jax.random.key(0), jnp.asarray(xs[0]))
    return model, v, xs


def _layer_inputs(model, v, x):
    seen = {}

    def interceptor(next_fun, args, kw, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            seen[context.module.name] = args[0]
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        model.apply(v, x)
    return seen


def test_minmax_and_lp_ranges(setup):
    model, v, xs = setup
    mm = calibrate_activations(model, v, xs, Int(8, sym=False, search="minmax"))
    lp = calibrate_activations(model, v, xs, Int(8, sym=False, search="lp"))
    assert list(mm) == ["conv", "dw", "fc"]
    ins = [_layer_inputs(model, v, x) for x in xs]
    for path in mm:
        vals = np.concatenate([np.asarray(i[path]).ravel() for i in ins])
        lo, hi = min(vals.min(), 0), max(vals.max(), 0)
        np.testing.assert_allclose(mm[path].scale, (hi - lo) / 255, rtol=1e-5)
        # the shrink search only narrows the range, and never raises the Lp error it minimizes
        assert float(lp[path].scale) <= float(mm[path].scale) * (1 + 1e-6)

        def err(a, vals=vals):
            return np.sum(np.abs(np.asarray(fake_quantize(jnp.asarray(vals), a)) - vals) ** 2.4)

        assert err(lp[path]) <= err(mm[path]) * (1 + 1e-3)
    # more bits: a finer grid, never a coarser one
    four = calibrate_activations(model, v, xs, Int(4, sym=False, search="minmax"))
    for path in mm:
        assert float(four[path].scale) > float(mm[path].scale)


def test_fake_quantized_forward_equals_integer_reference(setup):
    model, v, xs = setup
    aq = calibrate_activations(model, v, xs, Int(6, sym=False, search="lp"))
    params = dict(v["params"])
    wq = {}
    for path, G in (("conv", 1), ("dw", 8), ("fc", 1)):
        k = params[path]["kernel"]
        rs = [rtn_quantize(W, Int(4)) for W in kernel_to_matrices(k, G)]
        wq[path] = [r.qarray for r in rs]
        params[path] = {
            **params[path],
            "kernel": matrices_to_kernel([r.weights for r in rs], k.shape),
        }
    vq = {"params": params}
    x = jnp.asarray(xs[1])
    ins = _layer_inputs(model, vq, x)
    convs = {
        "conv": dict(kernel_shape=(3, 3, 3, 8), strides=2, padding="SAME"),
        "dw": dict(kernel_shape=(3, 3, 1, 8), padding=1, feature_group_count=8),
    }
    outs = {}

    def interceptor(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        if context.method_name == "__call__" and context.module.name in convs | {"fc": 0}:
            outs[context.module.name] = y
        return y

    fwd = activation_forward(aq)
    with nn.intercept_methods(interceptor):
        model.apply(vq, x, method=lambda m, x: fwd(m, x))
    for path in ("conv", "dw", "fc"):
        ref = integer_layer(
            ins_q(model, vq, x, aq)[path],
            aq[path],
            wq[path],
            bias=params[path]["bias"],
            conv=convs.get(path),
        )
        got = outs[path].reshape(-1, outs[path].shape[-1])
        np.testing.assert_allclose(got, ref.reshape(got.shape), rtol=1e-5, atol=1e-5)
    del ins


def ins_q(model, v, x, aq):
    """Layer inputs of the activation-quantized network (before each layer's own rounding)."""
    seen = {}
    fwd = activation_forward(aq)

    def interceptor(next_fun, args, kw, context):
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            seen.setdefault(context.module.name, args[0])
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        model.apply(v, x, method=lambda m, x: fwd(m, x))
    return seen


def test_apply_quantized_changes_little_at_8_bits_and_nnx_twin_agrees(setup):
    model, v, xs = setup
    aq8 = calibrate_activations(model, v, xs, Int(8, sym=False))
    aq4 = calibrate_activations(model, v, xs, Int(4, sym=False))
    x = jnp.asarray(xs[2])
    dense = model.apply(v, x)
    e8 = float(jnp.abs(apply_quantized(model, v, x, aq8) - dense).max())
    e4 = float(jnp.abs(apply_quantized(model, v, x, aq4) - dense).max())
    assert 0 < e8 < e4
    nx = NetNNX(nnx.Rngs(0))
    p = v["params"]
    nnx.update(
        nx,
        nnx.State(
            {
                "conv": {
                    "kernel": nnx.Param(p["conv"]["kernel"]),
                    "bias": nnx.Param(p["conv"]["bias"]),
                },
                "dw": {"kernel": nnx.Param(p["dw"]["kernel"]), "bias": nnx.Param(p["dw"]["bias"])},
                "fc": {"kernel": nnx.Param(p["fc"]["kernel"]), "bias": nnx.Param(p["fc"]["bias"])},
            }
        ),
    )
    aq_nnx = calibrate_activations(nx, None, xs, Int(8, sym=False))
    for path in aq8:
        np.testing.assert_allclose(aq_nnx[path].scale, aq8[path].scale, rtol=1e-5)
    y = activation_forward(aq8)(nx, x)
    np.testing.assert_allclose(y, apply_quantized(model, v, x, aq8), rtol=1e-5, atol=1e-5)
    # the classes' calls are restored afterwards
    np.testing.assert_allclose(nx(x), dense, rtol=1e-5, atol=1e-5)


def test_errors_and_skip_rules(setup):
    model, v, xs = setup
    with pytest.raises(ValueError, match="4..8"):
        calibrate_activations(model, v, xs, Int(3))
    with pytest.raises(ValueError, match="'nope'"):
        calibrate_activations(model, v, xs, rules=["nope"])
    with pytest.raises(ValueError, match="empty"):
        calibrate_activations(model, v, [])
    with pytest.raises(ValueError, match="4..8"):
        ActSpec(9)
    with pytest.raises(ValueError, match=r"'dw'.*4..8"):
        calibrate_activations(model, v, xs, rules=[("dw", Int(3)), ".*"])
    with pytest.raises(TypeError, match=r"'dw'.*ActSpec"):
        calibrate_activations(model, v, xs, rules=[("dw", "a4"), ".*"])
    with pytest.raises(ValueError, match=r"'conv'.*per-token.*Dense"):
        calibrate_activations(model, v, xs, rules=[("conv", ActSpec(8, granularity="token"))])
    with pytest.raises(ValueError, match="dynamic"):
        ActSpec(8, granularity="token", search="lp")
    aq = calibrate_activations(model, v, xs, rules=[("conv", None), ".*"])
    assert list(aq) == ["dw", "fc"]
    mixed = calibrate_activations(
        model, v, xs, rules=[("conv", None), ("dw", ActSpec(4)), ("fc", ActSpec(6, sym=True))]
    )
    assert [(a.bits, a.sym) for a in mixed.values()] == [(4, False), (6, True)]
    assert float(mixed["fc"].zero) == 32  # symmetric: the zero point sits at 2^(b-1)
    assert isinstance(aq["dw"], ActQuant)
    leaves, tree = jax.tree.flatten(aq)
    assert jax.tree.unflatten(tree, leaves)["fc"].bits == 8


def test_obq_weights_with_activation_quant_integer_path():
    # Dense layer: OBQ codes + activation codes in int32 reproduce the float fake-quant matmul
    rng = np.random.default_rng(3)
    X = rng.normal(size=(64, 24)).astype(np.float32)
    W = rng.normal(size=(6, 24)).astype(np.float32)
    H = 2 * X.T @ X / 64
    r = obq_quantize(W, H, Int(4))
    aq = ActQuant(jnp.float32(0.05), jnp.float32(128.0), 8, False)
    ref = integer_layer(jnp.asarray(X), aq, [r.qarray])
    flt = fake_quantize(jnp.asarray(X), aq) @ r.weights.T
    np.testing.assert_allclose(ref, flt, rtol=1e-5, atol=1e-5)


def test_lp_ranges_are_monotone_in_the_shrink_search(setup):
    # the candidates of a wider search contain those of a narrower one, and a later candidate
    # wins only when strictly better: the range can only shrink and the Lp error only fall
    model, v, xs = setup
    ins = [_layer_inputs(model, v, x) for x in xs]
    mm = calibrate_activations(model, v, xs, ActSpec(4, search="minmax"))
    prev = None
    for ms in (0.0, 0.2, 0.5, 0.8):
        aq = calibrate_activations(model, v, xs, ActSpec(4, maxshrink=ms))
        cur = {}
        for path, a in aq.items():
            vals = np.concatenate([np.asarray(i[path]).ravel() for i in ins])
            q = np.asarray(fake_quantize(jnp.asarray(vals), a), np.float64)
            cur[path] = (float(a.scale), float(np.sum(np.abs(q - vals) ** 2.4)))
            if ms == 0.0:
                np.testing.assert_allclose(a.scale, mm[path].scale, rtol=1e-6)
                continue
            assert cur[path][0] <= prev[path][0] * (1 + 1e-6)
            assert cur[path][1] <= prev[path][1] * (1 + 1e-4)
        prev = cur
    # at 4 bits clipping pays off somewhere: the search is not a no-op
    assert any(cur[p][0] < float(mm[p].scale) * 0.99 for p in cur)


class Tok(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(6, name="d1")(x))
        return nn.Dense(3, name="d2")(x)


@pytest.mark.parametrize("sym", [True, False])
def test_per_token_dense_equals_integer_reference(sym):
    rng = np.random.default_rng(7)
    # tokens whose magnitudes differ by orders: one scale per token is what they need
    x = rng.normal(size=(2, 5, 12)) * np.exp(2 * rng.normal(size=(2, 5, 1)))
    x = jnp.asarray(x, jnp.float32)
    model = Tok()
    v = model.init(jax.random.key(1), x)
    spec = ActSpec(6, granularity="token", sym=sym)
    assert spec.search == "minmax"
    aq = calibrate_activations(model, v, [x], spec)
    a = aq["d1"]
    assert (a.granularity, a.sym, a.scale) == ("token", sym, None)
    xq = np.asarray(fake_quantize(x, a))
    amax = np.max(np.abs(np.asarray(x)), axis=-1, keepdims=True)
    if sym:
        # the token's absmax lands on the grid's last code: nothing is clipped
        step = amax / 31
        np.testing.assert_allclose(np.max(np.abs(xq), axis=-1, keepdims=True), amax, rtol=1e-5)
    else:
        xn = np.asarray(x)
        step = (
            np.maximum(xn.max(-1, keepdims=True), 0) - np.minimum(xn.min(-1, keepdims=True), 0)
        ) / 63
    assert np.all(np.abs(xq - np.asarray(x)) <= 0.5 * step * (1 + 1e-4) + 1e-7)
    # a per-tensor grid at the same bits loses the small tokens
    pt = calibrate_activations(model, v, [x], ActSpec(6, search="minmax", sym=sym))["d1"]
    rel = lambda y: np.mean(np.abs(y - np.asarray(x)) / amax)  # noqa: E731
    assert rel(xq) < 0.5 * rel(np.asarray(fake_quantize(x, pt)))
    # integer path: int32 code products, one activation scale per token
    params = dict(v["params"])
    wq = {}
    for path in ("d1", "d2"):
        r = rtn_quantize(params[path]["kernel"].T, Int(4))
        wq[path] = [r.qarray]
        params[path] = {**params[path], "kernel": r.weights.T}
    vq = {"params": params}
    outs = {}

    def interceptor(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            outs[context.module.name] = (args[0], y)
        return y

    fwd = activation_forward(aq)
    with nn.intercept_methods(interceptor):
        model.apply(vq, x, method=lambda m, x: fwd(m, x))
    for path in ("d1", "d2"):
        x_in = ins_q_tok(model, vq, x, aq)[path]
        ref = integer_layer(x_in, aq[path], wq[path], bias=params[path]["bias"])
        assert ref.shape == outs[path][1].shape
        np.testing.assert_allclose(outs[path][1], ref, rtol=1e-5, atol=1e-5)
    # jitted evaluation gives the same
    np.testing.assert_allclose(
        quantized_apply(model, aq)(vq, x), apply_quantized(model, vq, x, aq), rtol=1e-6, atol=1e-6
    )
    with pytest.raises(ValueError, match="Dense layers only"):
        integer_layer(x_in, a, wq["d1"], conv={"kernel_shape": (1, 12, 6)})


def ins_q_tok(model, v, x, aq):
    seen = {}
    fwd = activation_forward(aq)

    def interceptor(next_fun, args, kw, context):
        if context.method_name == "__call__" and isinstance(context.module, nn.Dense):
            seen.setdefault(context.module.name, args[0])
        return next_fun(*args, **kw)

    with nn.intercept_methods(interceptor):
        model.apply(v, x, method=lambda m, x: fwd(m, x))
    return seen


def test_activation_errors_are_the_grids_per_channel_mse(setup):
    model, v, xs = setup
    errs = activation_errors(model, v, xs, (4, 8), rules=[("conv", None), ".*"])
    assert list(errs) == ["dw", "fc"]
    ins = [_layer_inputs(model, v, x) for x in xs]
    for b in (4, 8):
        aq = calibrate_activations(model, v, xs, ActSpec(b), rules=[("conv", None), ".*"])
        for path, a in aq.items():
            X = np.concatenate([np.asarray(i[path]).reshape(-1, i[path].shape[-1]) for i in ins])
            e = np.asarray(fake_quantize(jnp.asarray(X), a), np.float64) - X
            assert errs[path][b].shape == (X.shape[1],)
            np.testing.assert_allclose(errs[path][b], np.mean(e**2, axis=0), rtol=1e-4, atol=1e-12)
    assert np.sum(errs["dw"][4]) > 20 * np.sum(errs["dw"][8]) > 0
    with pytest.raises(ValueError, match="4..8"):
        activation_errors(model, v, xs, (2, 8))


def test_measured_activation_errors_equal_a_direct_computation(setup):
    """The database's measured activation part is the layer's real output error: the compressed
    layer on quantized inputs against the dense layer, less the weights' own error."""
    from obcjax.activations import activation_error_stats

    model, v, xs = setup
    stats = calibrate(model, v, xs)
    levels = [parse_level(t, solver="magnitude") for t in ("32w4a", "4w4a", "4w8a", "2:4+4w4a")]
    rules = [("conv", None), (".*", True)]
    db = mixed_database(model, v, xs, stats, levels, rules=rules, progress=False)
    proxy = mixed_database(model, v, xs, stats, levels, rules=rules, progress=False,
                           act_error="proxy")
    st = activation_error_stats(model, v, xs, (4, 8), rules=[("conv", None), ".*"])
    assert list(st) == ["dw", "fc"] and st["dw"][4].ee.shape == (8, 9, 9)
    ins = [_layer_inputs(model, v, x) for x in xs]
    layer = {
        "dw": lambda k, x: nn.Conv(8, (3, 3), feature_group_count=8, padding=1, use_bias=False)
        .apply({"params": {"kernel": k}}, x).reshape(-1, 8),
        "fc": lambda k, x: x.reshape(x.shape[0], -1) @ k,
    }
    for path in ("dw", "fc"):
        r = db.records[path]
        W = jnp.asarray(v["params"][path]["kernel"])
        for i, lv in enumerate(r.levels):
            if not np.isfinite(r.loss[i]):
                continue
            aq = calibrate_activations(model, v, xs, ActSpec(lv.abits), rules=[path])[path]
            K = jnp.asarray(db.weights(path, lv))
            tot = wonly = tokens = 0.0
            for inp in ins:
                x = inp[path]
                ref = np.asarray(layer[path](W, x), np.float64)
                yq = np.asarray(layer[path](K, fake_quantize(x, aq)), np.float64)
                yw = np.asarray(layer[path](K, x), np.float64)
                tot += np.sum((yq - ref) ** 2)
                wonly += np.sum((yw - ref) ** 2)
                tokens += ref.shape[0]
            want = (tot - wonly) / tokens
            assert r.act_loss[i] == pytest.approx(want, rel=2e-3, abs=1e-6 * tot / tokens)
        # the proxy (uncorrelated per-channel errors) is another number; both are positive
        assert np.all(proxy.records[path].act_loss[np.isfinite(r.loss)] > 0)
        assert not np.allclose(proxy.records[path].act_loss, r.act_loss)
    with pytest.raises(ValueError, match="act_error"):
        mixed_database(model, v, xs, stats, levels, rules=rules, act_error="exact")


class BNNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Conv(8, (3, 3), use_bias=False, name="conv")(x)
        x = nn.BatchNorm(use_running_average=not train, name="bn")(x)
        x = nn.relu(x)
        x = nn.Conv(8, (3, 3), feature_group_count=8, name="dw")(x)
        return nn.Dense(5, name="fc")(nn.relu(x).mean(axis=(1, 2)))


def test_compress_mixed_follows_obc_order(setup):
    _, _, xs = setup
    model = BNNet()
    v = model.init(jax.random.key(2), jnp.asarray(xs[0]))
    ev = {"train": False}
    stats = calibrate(model, v, xs, apply_kwargs=ev)
    levels = [parse_level(t, solver="magnitude") for t in ("8w8a", "4w4a", "2:4+4w4a")]
    # activation errors at 4 and 8 bits, then the database, in one call
    db = mixed_database(
        model,
        v,
        xs,
        stats,
        levels,
        apply_kwargs=ev,
        progress=False,
        positions={"conv": 64, "dw": 64},
        act_error="proxy",
    )
    errs = activation_errors(model, v, xs, (4, 8), apply_kwargs=ev)
    k = np.asarray(db.weights("fc", "2:4+4w4a"), np.float64)
    assert db.records["fc"].act_loss[2] == pytest.approx(np.sum(errs["fc"][4][:, None] * k**2))
    c8 = db.cost_of({p: "8w8a" for p in db.paths}, "bops")
    choice = solve(db, c8 / 2.5, metric="bops")
    assert {lv.abits for lv in choice.values()} == {4, 8}  # a real mix
    res = compress_mixed(model, v, xs, db, choice, apply_kwargs=ev)
    assert res.bops == db.cost_of(choice, "bops") <= c8 / 2.5
    # 1. weights first: the database's compressed kernels
    new = materialize(v["params"], db, choice)
    for p in db.paths:
        np.testing.assert_array_equal(res.variables["params"][p]["kernel"], new[p]["kernel"])
    # 2. activation ranges from the compressed model's inputs, not the dense model's
    vw = {**v, "params": new}
    want = calibrate_activations(model, vw, xs, rules=activation_rules(choice), apply_kwargs=ev)
    dense = calibrate_activations(model, v, xs, rules=activation_rules(choice), apply_kwargs=ev)
    assert list(res.act) == ["conv", "dw", "fc"]
    for p, a in res.act.items():
        assert a.bits == choice[p].abits
        np.testing.assert_allclose(a.scale, want[p].scale, rtol=1e-6)
    assert any(
        abs(float(res.act[p].scale) - float(dense[p].scale)) > 1e-4 * float(dense[p].scale)
        for p in ("dw", "fc")
    )
    # 3. batch norm last, through the activation-quantized forward
    tr = {"train": True}
    bn = reestimate_batchnorm(
        model,
        res.variables_no_bn,
        xs,
        apply_kwargs=tr,
        forward=activation_forward(res.act, apply_kwargs=tr),
    )
    plain = reestimate_batchnorm(model, res.variables_no_bn, xs, apply_kwargs=tr)
    got = res.variables["batch_stats"]["bn"]
    np.testing.assert_allclose(got["mean"], bn["batch_stats"]["bn"]["mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["var"], bn["batch_stats"]["bn"]["var"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(got["var"], plain["batch_stats"]["bn"]["var"], rtol=1e-6, atol=0)
    assert res.variables_no_bn["batch_stats"] is v["batch_stats"]
    y = quantized_apply(model, res.act, apply_kwargs=ev)(res.variables, jnp.asarray(xs[0]))
    assert y.shape == (8, 5) and bool(jnp.all(jnp.isfinite(y)))
    with pytest.raises(TypeError, match="Linen"):
        compress_mixed(model, None, xs, db, choice)
