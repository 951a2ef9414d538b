"""``obcjax.oneshot``: calibrate + compress (one-pass or sequential) + batch-norm repair, in one
call, for Linen and NNX, checked against the same steps called one by one.

Every comparison is between two runs of the same deterministic computations on the same
inputs (bit for bit), or of exact counts (sparsity), so nothing here depends on round-off.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import obcjax
from obcjax import NM, Int, Unstructured, oneshot
from obcjax.calibration import calibrate
from obcjax.pipeline import compress_sequential, reestimate_batchnorm
from obcjax.transforms import compress

X = np.random.default_rng(0).normal(size=(128, 8)).astype(np.float32)
BATCHES = [X[:64], X[64:]]
RECIPE = [("fc1", None), ("fc2", (NM(2, 4), Int(4))), ("fc3", Unstructured(0.5))]


class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.relu(nn.Dense(16, name="fc1")(x))
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn")(x)
        x = nn.relu(nn.Dense(16, name="fc2")(x))
        return nn.Dense(4, name="fc3")(x)


class NetNNX(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(8, 16, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.fc2 = nnx.Linear(16, 16, rngs=rngs)
        self.fc3 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.bn(nnx.relu(self.fc1(x)))))))


@pytest.fixture(scope="module")
def linen():
    model = Net()
    return model, model.init(jax.random.key(0), X[:1])


def _nnx():
    model = NetNNX(nnx.Rngs(0))
    model.eval()
    return model


def _equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y))
                                      for x, y in zip(la, lb))


def test_public_face():
    assert obcjax.oneshot is oneshot and oneshot.__module__ == "obcjax.workflow"
    assert obcjax.compress is compress and obcjax.calibrate is calibrate
    for name in obcjax.__all__:
        assert getattr(obcjax, name) is not None, name


def test_linen_one_pass_is_calibrate_then_compress(linen):
    model, variables = linen
    before = jax.tree.map(np.array, variables)
    res = oneshot(model, variables, BATCHES, RECIPE, solver="gptq")
    stats = calibrate(model, variables, BATCHES, rules=RECIPE)
    out = compress(variables["params"], stats, RECIPE, solver="gptq")
    assert _equal(res.variables["params"], out.params)
    assert _equal(res.variables["batch_stats"], variables["batch_stats"])  # no repair asked
    assert res.summary == res.compressed.summary == out.summary
    assert set(res.compressed.losses) == {"fc2", "fc3"}
    # 2:4 (a 4-bit grid may round a kept weight to 0 too) and exactly 50%
    assert res.summary["fc2/sparsity"] >= 0.5 and res.summary["fc3/sparsity"] == 0.5
    assert res.summary["fc2/bits"] == 4
    assert _equal(variables, before)  # the inputs are not changed
    assert model.apply(res.variables, X).shape == (128, 4)


def test_linen_sequential_and_batchnorm_repair(linen):
    model, variables = linen
    res = oneshot(model, variables, iter(BATCHES), RECIPE, mode="sequential",
                  repair_batchnorm=True, train_kwargs={"train": True}, solver="gptq")
    out = compress_sequential(model, variables, BATCHES, RECIPE, solver="gptq")
    assert _equal(res.compressed.params, out.params)
    want = reestimate_batchnorm(model, {**variables, "params": out.params}, BATCHES,
                                apply_kwargs={"train": True})
    assert _equal(res.variables, want)
    # the repaired statistics are the calibration data's, not the initial (0, 1)
    assert not np.allclose(res.variables["batch_stats"]["bn"]["mean"], 0)


def test_nnx_one_pass_and_repair():
    model = _nnx()
    before = nnx.to_pure_dict(nnx.state(model))
    res = oneshot(model, None, BATCHES, dict(RECIPE), repair_batchnorm=True)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    stats = calibrate(model, None, BATCHES, rules=RECIPE)
    out = compress(params, stats, RECIPE)
    assert _equal(res.compressed.params, out.params)
    assert isinstance(res.variables, nnx.State)
    want = reestimate_batchnorm(model, out.params, BATCHES)
    assert _equal(res.variables, want)
    assert _equal(nnx.to_pure_dict(nnx.state(model)), before)  # the model is not changed
    fresh = _nnx()
    nnx.update(fresh, res.variables)
    assert float(jnp.mean(fresh.fc3.kernel[...] == 0)) == 0.5
    assert fresh(X).shape == (128, 4)


def test_nnx_sequential_matches_linen_paths():
    model = _nnx()
    res = oneshot(model, None, BATCHES, RECIPE, mode="sequential", solver="gptq")
    out = compress_sequential(model, None, BATCHES, RECIPE, solver="gptq")
    assert _equal(res.compressed.params, out.params)
    assert set(res.compressed.losses) == {"fc2", "fc3"}


@pytest.mark.parametrize(
    "kwargs, recipe, error, match",
    [
        ({"mode": "greedy"}, RECIPE, ValueError, "one-pass"),
        ({}, "fc2", TypeError, "recipe"),
        ({}, 0.5, TypeError, "recipe"),
        ({"batches": []}, RECIPE, ValueError, "batches is empty"),
        ({}, [("nosuch", Unstructured(0.5))], ValueError, "matches no layer"),
    ],
)
def test_bad_input(linen, kwargs, recipe, error, match):
    model, variables = linen
    kwargs = {"batches": BATCHES, **kwargs}
    batches = kwargs.pop("batches")
    with pytest.raises(error, match=match):
        oneshot(model, variables, batches, recipe, **kwargs)


def test_linen_without_params(linen):
    model, variables = linen
    with pytest.raises((TypeError, ValueError), match="params"):
        oneshot(model, {"batch_stats": variables["batch_stats"]}, BATCHES, RECIPE)
