"""Activation quantization: calibration, fake-quantized forward, integer reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from obcjax.activations import (
    ActQuant,
    activation_forward,
    apply_quantized,
    calibrate_activations,
    fake_quantize,
    integer_layer,
)
from obcjax.kernels import obq_quantize, rtn_quantize
from obcjax.specs import Int
from obcjax.transforms import kernel_to_matrices, matrices_to_kernel


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
        params[path] = {**params[path], "kernel": matrices_to_kernel([r.weights for r in rs],
                                                                     k.shape)}
    vq = {"params": params}
    x = jnp.asarray(xs[1])
    ins = _layer_inputs(model, vq, x)
    convs = {"conv": dict(kernel_shape=(3, 3, 3, 8), strides=2, padding="SAME"),
             "dw": dict(kernel_shape=(3, 3, 1, 8), padding=1, feature_group_count=8)}
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
        ref = integer_layer(ins_q(model, vq, x, aq)[path], aq[path], wq[path],
                            bias=params[path]["bias"], conv=convs.get(path))
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
    nnx.update(nx, nnx.State({
        "conv": {"kernel": nnx.Param(p["conv"]["kernel"]), "bias": nnx.Param(p["conv"]["bias"])},
        "dw": {"kernel": nnx.Param(p["dw"]["kernel"]), "bias": nnx.Param(p["dw"]["bias"])},
        "fc": {"kernel": nnx.Param(p["fc"]["kernel"]), "bias": nnx.Param(p["fc"]["bias"])},
    }))
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
    aq = calibrate_activations(model, v, xs, rules=[("conv", None), ".*"])
    assert list(aq) == ["dw", "fc"]
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
