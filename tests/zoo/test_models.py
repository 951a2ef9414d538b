"""Tests for obcjax.zoo.models: Linen/NNX twins, one parameter layout, conversions, errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from obcjax.zoo import models

SHAPES = {"mlp": (8, 8, 1), "lenet5": (8, 8, 1), "resnet": (8, 8, 1), "cnn1d": (40, 1)}


def _x(shape, n=5, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((n, *shape)), jnp.float32)


def _flat(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flat(v, (*prefix, k)))
        else:
            out["/".join((*prefix, k))] = v
    return out


def _layout(variables):
    return {
        coll: {p: (tuple(a.shape), jnp.dtype(a.dtype)) for p, a in _flat(tree).items()}
        for coll, tree in variables.items()
    }


def _perturbed(variables, seed=1):
    """Variables with every leaf randomized (non-trivial BatchNorm statistics included)."""
    rng = np.random.default_rng(seed)

    def f(path, a):
        if path[-1].key == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, a.shape), a.dtype)
        return jnp.asarray(rng.standard_normal(a.shape) * 0.3, a.dtype)

    return jax.tree_util.tree_map_with_path(f, variables)


def test_model_names_registry():
    assert set(models.MODEL_NAMES) == set(SHAPES)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_linen_and_nnx_layouts_identical(name):
    shape = SHAPES[name]
    linen = jax.eval_shape(
        lambda: models.linen_model(name, 7).init(
            jax.random.key(0), jnp.zeros((1, *shape)), train=False
        )
    )
    linen = {"params": {}, "batch_stats": {}, **models._plain(linen)}
    # The NNX classes as NNX itself would build them (abstractly: no random draws).
    nnx_cls = models._REGISTRY[name][1]
    native = nnx.eval_shape(lambda: nnx_cls(7, input_shape=shape, rngs=nnx.Rngs(0)))
    assert _layout(models.variables_from_nnx(native)) == _layout(linen)
    fresh_nnx = models.variables_from_nnx(
        models.nnx_model(name, 7, input_shape=shape, rngs=nnx.Rngs(0))
    )
    assert _layout(fresh_nnx) == _layout(linen)
    assert _layout(models.init_variables(name, shape, num_classes=7)) == _layout(linen)
    assert bool(linen["batch_stats"]) == (name == "resnet")


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_twins_give_identical_logits(name):
    shape = SHAPES[name]
    v = _perturbed(models.init_variables(name, shape, seed=2))
    x = _x(shape)
    linen = models.apply(name, v, x)
    model = models.nnx_from_variables(name, v, input_shape=shape)
    assert linen.shape == (5, 10)
    np.testing.assert_allclose(np.asarray(model(x)), np.asarray(linen), rtol=1e-5, atol=1e-5)
    # The comparison can fail: other values give other logits.
    other = models.apply(name, _perturbed(models.init_variables(name, shape), seed=9), x)
    assert not np.allclose(np.asarray(other), np.asarray(linen), atol=1e-3)


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_round_trip_is_exact(name):
    shape = SHAPES[name]
    v = _perturbed(models.init_variables(name, shape, seed=4))
    back = models.variables_from_nnx(models.nnx_from_variables(name, v, input_shape=shape))
    assert jax.tree.structure(back) == jax.tree.structure(v)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(back)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # And from the NNX side: NNX -> variables -> NNX keeps the logits.
    m = models.nnx_model(name, input_shape=shape, rngs=nnx.Rngs(3))
    m2 = models.nnx_from_variables(name, models.variables_from_nnx(m), input_shape=shape)
    x = _x(shape, seed=5)
    np.testing.assert_array_equal(np.asarray(m(x)), np.asarray(m2(x)))


def test_resnet_train_mode_twins_and_no_mutation():
    shape = SHAPES["resnet"]
    v = _perturbed(models.init_variables("resnet", shape, seed=5))
    snapshot = jax.tree.map(np.array, v)
    x = _x(shape, n=5, seed=6)  # the batch size of the other tests: apply is compiled
    linen_train = jax.jit(
        lambda v, x: models.linen_model("resnet").apply(v, x, train=True, mutable=["batch_stats"])
    )
    logits, updates = linen_train(v, x)
    model = models.nnx_from_variables("resnet", v, input_shape=shape)
    eval_logits = model(x)
    # NNX models start in eval mode: running statistics, and they stay untouched.
    np.testing.assert_allclose(
        np.asarray(eval_logits), np.asarray(models.apply("resnet", v, x)), rtol=1e-5, atol=1e-5
    )
    model.train()
    nnx_logits = model(x)
    model.eval()
    np.testing.assert_allclose(np.asarray(nnx_logits), np.asarray(logits), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(nnx_logits), np.asarray(eval_logits), atol=1e-3)
    updated = models.variables_from_nnx(model)["batch_stats"]
    want = models._plain(updates)["batch_stats"]
    for p, a in _flat(want).items():
        np.testing.assert_allclose(
            np.asarray(_flat(updated)[p]), np.asarray(a), rtol=1e-5, atol=1e-6
        )
    # Training the NNX copy did not write into the variables it was built from.
    for a, b in zip(jax.tree.leaves(snapshot), jax.tree.leaves(v)):
        np.testing.assert_array_equal(a, np.asarray(b))
    # apply(train=True) uses the batch statistics too, and discards the updates.
    np.testing.assert_allclose(
        np.asarray(models.apply("resnet", v, x, train=True)), np.asarray(logits), atol=1e-5
    )


def test_init_variables_deterministic_and_distribution():
    a = models.init_variables("mlp", (40, 1), seed=0)
    b = models.init_variables("mlp", (40, 1), seed=0)
    c = models.init_variables("mlp", (40, 1), seed=1)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(
        np.asarray(a["params"]["fc1"]["kernel"]), c["params"]["fc1"]["kernel"]
    )
    k = np.asarray(a["params"]["fc2"]["kernel"])  # 256 x 256
    assert np.abs(k).max() <= 2 / math.sqrt(256) / 0.8796 + 1e-6  # truncated at 2 std
    assert abs(k.std() - 1 / math.sqrt(256)) < 0.05 / math.sqrt(256)  # LeCun: var = 1 / fan_in
    assert not np.any(np.asarray(a["params"]["fc2"]["bias"]))
    r = models.init_variables("resnet", (8, 8, 1))
    np.testing.assert_array_equal(np.asarray(r["params"]["bn1"]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(r["batch_stats"]["bn1"]["var"]), 1.0)
    np.testing.assert_array_equal(np.asarray(r["batch_stats"]["bn1"]["mean"]), 0.0)


def test_nnx_model_seeded_by_rngs():
    a = models.variables_from_nnx(models.nnx_model("mlp", input_shape=(40, 1), rngs=nnx.Rngs(0)))
    b = models.variables_from_nnx(models.nnx_model("mlp", input_shape=(40, 1), rngs=nnx.Rngs(0)))
    c = models.variables_from_nnx(models.nnx_model("mlp", input_shape=(40, 1), rngs=nnx.Rngs(1)))
    np.testing.assert_array_equal(a["params"]["fc1"]["kernel"], b["params"]["fc1"]["kernel"])
    assert not np.array_equal(a["params"]["fc1"]["kernel"], c["params"]["fc1"]["kernel"])
    k = np.asarray(a["params"]["fc2"]["kernel"])
    assert abs(k.std() - 1 / math.sqrt(256)) < 0.05 / math.sqrt(256)
    rngs = nnx.Rngs(0)
    first = models.variables_from_nnx(models.nnx_model("mlp", input_shape=(40, 1), rngs=rngs))
    second = models.variables_from_nnx(models.nnx_model("mlp", input_shape=(40, 1), rngs=rngs))
    # One Rngs object advances: two models drawn from it differ.
    assert not np.array_equal(first["params"]["fc1"]["kernel"], second["params"]["fc1"]["kernel"])
    with pytest.raises(TypeError, match="nnx.Rngs"):
        models.nnx_model("mlp", input_shape=(40, 1), rngs=0)


def test_count_params_and_num_classes():
    v = models.init_variables("lenet5", (8, 8, 1), num_classes=10)
    # conv1 3*3*1*6+6, conv2 3*3*6*16+16, fc1 (2*2*16)*120+120, fc2 120*84+84, fc3 84*10+10
    assert models.count_params(v["params"]) == 60 + 880 + 7800 + 10164 + 850
    assert models.num_classes_of("lenet5", v) == 10
    v3 = models.init_variables("cnn1d", (40, 1), num_classes=3)
    assert models.num_classes_of("cnn1d", v3) == 3
    assert models.apply("cnn1d", v3, _x((40, 1))).shape == (5, 3)
    # cnn1d: 40 -> 20 -> 10 -> 5 positions of 32 channels feed the head.
    assert v3["params"]["fc"]["kernel"].shape == (5 * 32, 3)


def test_mlp_accepts_any_input_rank():
    v = models.init_variables("mlp", (3, 5))
    assert v["params"]["fc1"]["kernel"].shape == (15, 256)
    assert models.apply("mlp", v, _x((3, 5))).shape == (5, 10)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: models.linen_model("vgg"), "unknown model 'vgg'"),
        (lambda: models.init_variables("lenet5", (8, 8)), r"lenet5: input_shape .*\(H, W, C\)"),
        (lambda: models.init_variables("lenet5", (2, 2, 1)), "at least 4x4"),
        (lambda: models.init_variables("cnn1d", (1, 40, 1)), r"cnn1d: input_shape .*\(L, C\)"),
        (lambda: models.linen_model("mlp", num_classes=0), "num_classes must be >= 1"),
        (lambda: models.num_classes_of("resnet", {"params": {}}), "lack params/fc/kernel"),
    ],
)
def test_bad_arguments_raise_clear_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nnx_from_variables_checks_every_entry():
    v = models.init_variables("lenet5", (8, 8, 1))
    shape = (8, 8, 1)
    missing = {"params": {k: w for k, w in v["params"].items() if k != "conv2"}, "batch_stats": {}}
    with pytest.raises(ValueError, match="params/conv2/.* is missing"):
        models.nnx_from_variables("lenet5", missing, input_shape=shape)
    extra = {"params": {**v["params"], "fc9": {"bias": jnp.zeros(3)}}, "batch_stats": {}}
    with pytest.raises(ValueError, match="does not use.*fc9/bias"):
        models.nnx_from_variables("lenet5", extra, input_shape=shape)
    wrong = jax.tree.map(lambda a: a, v)
    wrong["params"]["fc1"] = {**v["params"]["fc1"], "kernel": jnp.zeros((65, 120))}
    with pytest.raises(ValueError, match=r"params/fc1/kernel has shape \(65, 120\)"):
        models.nnx_from_variables("lenet5", wrong, input_shape=shape)
    with pytest.raises(ValueError, match="input_shape"):
        models.nnx_from_variables("lenet5", v, input_shape=(12, 12, 1))  # fc1 would be 144 wide
    with pytest.raises(ValueError, match="num_classes=5"):
        models.nnx_from_variables("lenet5", v, input_shape=shape, num_classes=5)
    with pytest.raises(ValueError, match="unexpected variable collections"):
        models.nnx_from_variables("lenet5", {**v, "cache": {}}, input_shape=shape)
    with pytest.raises(TypeError, match="nnx.Module"):
        models.variables_from_nnx(v)
