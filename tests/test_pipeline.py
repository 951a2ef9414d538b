"""Sequential compression, batch-norm re-estimation and statistics correction on small models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx

from obcjax.calibration import calibrate
from obcjax.pipeline import (
    batchnorm_paths,
    compress_sequential,
    correct_statistics,
    reestimate_batchnorm,
)
from obcjax.specs import Int, Unstructured
from obcjax.transforms import compress


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.Dense(12, name="fc1")(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(x)
        x = nn.Dense(10, name="fc2")(x)
        x = nn.relu(x)
        return nn.Dense(3, name="fc3")(x)


class NetNNX(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(16, 12, rngs=rngs)
        self.bn = nnx.BatchNorm(12, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(12, 10, rngs=rngs)
        self.fc3 = nnx.Linear(10, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.bn(self.fc1(x))))))


def _data(seed=0, n=4, b=32):
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(16, 16)) * np.exp(-np.arange(16) / 4)
    return [(rng.normal(size=(b, 16)) @ mix + 0.5).astype(np.float32) for _ in range(n)]


@pytest.fixture(scope="module")
def linen():
    model = Net()
    v = model.init(jax.random.key(0), jnp.zeros((1, 16)))
    # non-trivial running statistics so that re-estimation visibly changes them
    v = {**v, "batch_stats": jax.tree.map(lambda a: a + 0.3, v["batch_stats"])}
    return model, v


def test_reestimate_batchnorm_equals_explicit_moments(linen):
    model, v = linen
    batches = _data()
    new = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
    p = v["params"]["fc1"]
    z = np.concatenate([np.asarray(b, np.float64) @ np.asarray(p["kernel"], np.float64)
                        + np.asarray(p["bias"]) for b in batches])
    np.testing.assert_allclose(new["batch_stats"]["bn"]["mean"], z.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(new["batch_stats"]["bn"]["var"], z.var(0), rtol=1e-4, atol=1e-5)
    # params untouched, input not mutated
    assert new["params"] is v["params"]
    np.testing.assert_array_equal(v["batch_stats"]["bn"]["mean"], np.full(12, 0.3, np.float32))
    assert batchnorm_paths(model, v, batches[0], apply_kwargs={"train": True}) == ["bn"]


def test_reestimate_batchnorm_nnx_matches_linen(linen):
    model, v = linen
    nx = NetNNX(nnx.Rngs(0))
    # same parameters in the NNX twin
    nnx.update(nx, nnx.State({
        "fc1": {"kernel": nnx.Param(v["params"]["fc1"]["kernel"]),
                "bias": nnx.Param(v["params"]["fc1"]["bias"])},
    }))
    batches = _data(1)
    new_l = reestimate_batchnorm(model, v, batches, apply_kwargs={"train": True})
    before = np.asarray(nx.bn.mean[...]).copy()
    state = reestimate_batchnorm(nx, None, batches)
    np.testing.assert_array_equal(np.asarray(nx.bn.mean[...]), before)  # model not mutated
    nnx.update(nx, state)
    np.testing.assert_allclose(nx.bn.mean[...], new_l["batch_stats"]["bn"]["mean"], rtol=1e-5,
                               atol=1e-6)
    np.testing.assert_allclose(nx.bn.var[...], new_l["batch_stats"]["bn"]["var"], rtol=1e-5,
                               atol=1e-6)


def test_reestimate_batchnorm_errors(linen):
    model, v = linen
    with pytest.raises(ValueError, match="empty"):
        reestimate_batchnorm(model, v, [])

    class NoBN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(2)(x)

    m = NoBN()
    vv = m.init(jax.random.key(0), jnp.zeros((1, 16)))
    with pytest.raises(ValueError, match="no batch-norm"):
        reestimate_batchnorm(m, vv, _data())


def _stats_of(model, v, batches, *, train):
    return calibrate(model, v, batches, apply_kwargs={"train": train})


def test_sequential_first_layer_equals_one_pass_and_later_layers_see_compressed_inputs(linen):
    model, v = linen
    batches = _data(2)
    rules = [(".*", Unstructured(0.5))]
    seq = compress_sequential(model, v, batches, rules, apply_kwargs={"train": False})
    one = compress(v["params"], _stats_of(model, v, batches, train=False), rules)
    np.testing.assert_allclose(seq.params["fc1"]["kernel"], one.params["fc1"]["kernel"],
                               rtol=1e-5, atol=1e-6)
    # fc2 by hand: statistics of the model whose fc1 is already compressed
    v1 = {**v, "params": {**v["params"], "fc1": seq.params["fc1"]}}
    st = calibrate(model, v1, batches, rules=["fc2"], apply_kwargs={"train": False})
    by_hand = compress(v["params"], st, [("fc2", Unstructured(0.5))])
    np.testing.assert_allclose(seq.params["fc2"]["kernel"], by_hand.params["fc2"]["kernel"],
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(seq.params["fc2"]["kernel"], one.params["fc2"]["kernel"])
    for path in ("fc1", "fc2", "fc3"):
        k = np.asarray(seq.params[path]["kernel"])
        assert np.count_nonzero(k) == k.size - round(0.5 * k.size)
    assert set(seq.losses) == {"fc1", "fc2", "fc3"}
    assert seq.summary["total/loss"] == pytest.approx(sum(seq.losses.values()))


def test_sequential_quantized_and_skip(linen):
    model, v = linen
    batches = _data(3, n=2)
    rules = [("fc3", None), (".*", Int(4))]
    seq = compress_sequential(model, v, batches, rules, apply_kwargs={"train": False})
    np.testing.assert_array_equal(seq.params["fc3"]["kernel"], v["params"]["fc3"]["kernel"])
    assert {p for p in seq.specs if seq.qarray(p) is not None} == {"fc1", "fc2"}
    assert seq.qarrays["fc3"]["kernel"] is None and seq.masks["fc1"]["kernel"] is None
    np.testing.assert_allclose(seq.qarray("fc2").dequantize(), seq.params["fc2"]["kernel"],
                               rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="leave every layer dense"):
        compress_sequential(model, v, batches, [(".*", None)], apply_kwargs={"train": False})
    with pytest.raises(ValueError, match="matches no layer"):
        compress_sequential(model, v, batches, [("nope", Int(4))], apply_kwargs={"train": False})


def _out_moments(model, v, batches, name):
    outs = []

    def interceptor(next_fun, args, kw, context):
        y = next_fun(*args, **kw)
        if context.method_name == "__call__" and context.module.name == name:
            outs.append(np.asarray(y, np.float64))
        return y

    for b in batches:
        with nn.intercept_methods(interceptor):
            model.apply(v, b, train=False)
    y = np.concatenate(outs)
    return y.mean(0), y.std(0)


def test_correct_statistics_matches_dense_moments(linen):
    model, v = linen
    batches = _data(4)
    stats = _stats_of(model, v, batches, train=False)
    comp = compress(v["params"], stats, [(".*", Unstructured(0.7))])
    vc = {**v, "params": comp.params}
    md, sd = _out_moments(model, v, batches, "bn")
    mc, sc = _out_moments(model, vc, batches, "bn")
    assert np.abs(mc - md).max() > 1e-3  # there is something to correct
    fixed = correct_statistics(model, v, vc, batches, on="norm", apply_kwargs={"train": False})
    mf, sf = _out_moments(model, fixed, batches, "bn")
    np.testing.assert_allclose(mf, md, atol=1e-4)
    np.testing.assert_allclose(sf, sd, rtol=1e-3, atol=1e-4)
    # on="bias": the mean output of every Dense matches the dense model's, in forward order
    fixed_b = correct_statistics(model, v, vc, batches, on="bias", apply_kwargs={"train": False})
    for name in ("fc1", "fc2", "fc3"):
        np.testing.assert_allclose(_out_moments(model, fixed_b, batches, name)[0],
                                   _out_moments(model, v, batches, name)[0], atol=1e-4)
    np.testing.assert_array_equal(vc["params"]["fc1"]["bias"], comp.params["fc1"]["bias"])
    with pytest.raises(ValueError, match="on must be"):
        correct_statistics(model, v, vc, batches, on="mean")
