"""A user's own NNX model, defined here (not from the zoo), through the training-side library.

Issue 17's acceptance: ``finetune`` with frozen masks, ``progressive_admm`` and ``fit_search`` +
``finetune_plan`` take a loss function, params (``nnx.State`` or dicts) and batches; the optax
transforms (``keep_mask``, ``frozen_codebooks``, ``admm``) work inside ``nnx.Optimizer`` exactly as
in a functional loop over plain dicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from obcjax import admm as A
from obcjax import fit
from obcjax import training as T
from obcjax.specs import Unstructured


class Net(nnx.Module):
    """The user's model: a two-layer MLP classifier."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(6, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jnp.tanh(self.fc1(x)))


def _data(n=64, seed=0, bsz=16):
    r = np.random.default_rng(seed)
    x = r.normal(size=(n, 6)).astype(np.float32)
    y = np.argmax(x[:, :3], axis=1).astype(np.int32)
    return [(x[i : i + bsz], y[i : i + bsz]) for i in range(0, n, bsz)]


def _ce(logits, y):
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])


def _model_and_loss(seed=0):
    model = Net(nnx.Rngs(seed))
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(p, batch):
        x, y = batch
        return _ce(nnx.merge(graphdef, p)(x), y)

    return model, graphdef, params, loss


def _fc1_mask(params, frac=0.5):
    k = np.asarray(T.pure_params(params)["fc1"]["kernel"])
    return {"fc1": {"kernel": jnp.asarray(np.abs(k) > np.quantile(np.abs(k), frac))}}


def test_finetune_nnx_state_with_frozen_masks_and_codebooks():
    model, graphdef, params, loss = _model_and_loss()
    masks = _fc1_mask(params)
    cbs = {"fc2": T.Codebook(jnp.float32(0.05), jnp.float32(8.0), 4)}
    start = T.quantize_params(params, {}, masks)  # zero where pruned: the "compressed" model
    assert isinstance(start, nnx.State)
    new, info = T.finetune(loss, start, _data(), 8, masks=masks, codebooks=cbs, lr=0.05)
    assert isinstance(new, nnx.State) and len(info["losses"]) == 8
    k = np.asarray(new["fc1"]["kernel"])
    keep = np.asarray(masks["fc1"]["kernel"])
    assert np.all(k[~keep] == 0.0)  # pruned weights exactly zero
    assert np.all(k[keep] != np.asarray(start["fc1"]["kernel"])[keep])  # kept ones trained
    w2 = np.asarray(new["fc2"]["kernel"])
    codes = w2 / 0.05 + 8.0
    np.testing.assert_array_equal(codes, np.round(codes))  # fc2 exactly on its frozen grid
    nnx.update(model, new)  # back into the user's model
    assert model(jnp.ones((2, 6))).shape == (2, 3)


def _both_loops(model, start, loss, tx, batches):
    """The transform ``tx()`` inside ``nnx.Optimizer`` on ``model`` and, functionally, on the
    plain dict of ``start``: ``(optimizer, final dict params, final functional state)``."""
    opt = nnx.Optimizer(model, tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        grads = nnx.grad(lambda m: _ce(m(x), y))(model)
        opt.update(model, grads)

    p = nnx.to_pure_dict(start)
    f = tx()
    st = f.init(p)

    @jax.jit
    def fstep(p, st, x, y):
        g = jax.grad(lambda q: loss(q, (x, y)))(p)
        u, st = f.update(g, st, p)
        return optax.apply_updates(p, u), st

    for x, y in batches:
        step(model, opt, x, y)
        p, st = fstep(p, st, x, y)
    return opt, p, st


def test_keep_mask_and_codebooks_inside_nnx_optimizer_match_a_dict_loop():
    model, graphdef, params, loss = _model_and_loss(1)
    masks = _fc1_mask(params, 0.6)
    start = T.quantize_params(params, {}, masks)
    nnx.update(model, start)
    cbs = {"fc2": T.Codebook(jnp.float32(0.1), jnp.float32(8.0), 4)}

    def tx():
        return optax.chain(
            T.frozen_codebooks(cbs), optax.adamw(0.05, weight_decay=0.1), T.keep_mask(masks)
        )

    opt, p, st = _both_loops(model, start, loss, tx, _data(seed=2) * 2)
    k = np.asarray(model.fc1.kernel[...])
    keep = np.asarray(masks["fc1"]["kernel"])
    assert np.all(k[~keep] == 0.0)
    np.testing.assert_allclose(k, np.asarray(p["fc1"]["kernel"]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(T.get_masks(opt.opt_state)["fc1"]["kernel"]), keep)
    assert T.get_codebooks(opt.opt_state)["fc2"].bits == 4


def test_admm_inside_nnx_optimizer_matches_a_dict_loop():
    model, graphdef, params, loss = _model_and_loss(3)

    def tx():
        return optax.chain(
            A.admm([("fc1", Unstructured(0.75))], rho=0.05, update_every=2), optax.adam(1e-2)
        )

    opt, p, st = _both_loops(model, params, loss, tx, _data(seed=4) + _data(seed=5))
    adm = nnx.as_pure(opt.opt_state)[0]
    assert isinstance(adm, A.ADMMState) and int(adm.step) == 8
    z = np.asarray(adm.Z["fc1"])
    assert np.count_nonzero(z) == round(0.25 * z.size)  # Z on the constraint set
    np.testing.assert_allclose(np.asarray(model.fc1.kernel[...]), np.asarray(p["fc1"]["kernel"]),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(z, np.asarray(st[0].Z["fc1"]), rtol=1e-5, atol=1e-6)


def test_progressive_admm_on_nnx_state():
    model, graphdef, params, loss = _model_and_loss(6)
    calls = []

    def evaluate(p, _):
        calls.append(1)
        x, y = _data(seed=9)[0]
        return float(jnp.mean(jnp.argmax(nnx.merge(graphdef, p)(x), -1) == y))

    schedule = [
        [("fc1", Unstructured(0.5))],
        [("fc1", Unstructured(0.75)), ("fc2", A.Uniform(3))],
    ]
    new, state, hist = A.progressive_admm(
        loss, params, _data(seed=7), schedule, evaluate=evaluate, rho=0.05,
        admm_epochs=1, updates_per_stage=2, retrain_epochs=1, lr=1e-2,
    )  # fmt: skip
    assert state is None and isinstance(new, nnx.State)
    k1 = np.asarray(new["fc1"]["kernel"])
    assert np.count_nonzero(k1) == round(0.25 * k1.size)
    k0 = np.asarray(T.pure_params(params)["fc1"]["kernel"])
    assert np.count_nonzero(k0) == k0.size  # the input is not modified
    k2 = np.asarray(new["fc2"]["kernel"])
    assert 1 <= np.unique(np.abs(k2)).size <= 4  # 3 bits: levels q*k, |k| <= 3
    assert [h["stage"] for h in hist] == [0, 1] and hist[1]["fc1/sparsity"] == 0.75
    assert {"acc_admm", "acc_hard", "acc_projected", "acc"} <= set(hist[0]) and len(calls) == 8
    nnx.update(model, new)
    assert model(jnp.ones((1, 6))).shape == (1, 3)


def test_fit_search_and_finetune_plan_on_nnx_model():
    model, graphdef, params, loss = _model_and_loss(8)

    def example_loss(p, x, y):  # one example, as fisher_diagonal wants
        return -jax.nn.log_softmax(nnx.merge(graphdef, p)(x[None])[0])[y]

    data = _data(seed=10)
    fisher = fit.fisher_diagonal(example_loss, params, data, rules=("fc1", "fc2"))
    plan = fit.fit_search(params, fisher, target_ratio=0.12, bit_schedule=(8, 4))
    out = fit.apply_plan(params, plan)
    assert plan.size_bits <= plan.target_bits and plan.sparsity > 0
    new, info = fit.finetune_plan(loss, out, data, 6, lr=1e-2)
    assert len(info["losses"]) == 6
    cbs = fit.codebooks_of(out)
    moved = 0
    for k in ("fc1", "fc2"):
        kern = np.asarray(new[k]["kernel"], np.float64)
        assert np.all(kern[~plan.masks[k]] == 0)
        s, z = np.asarray(cbs[k].scale, np.float64), np.asarray(cbs[k].zero, np.float64)
        codes = kern / s + z
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        shadow = np.asarray(info["shadow_params"][k]["kernel"])
        moved += int(np.sum(shadow != np.asarray(out.params[k]["kernel"])))
    assert moved > 0  # the float shadows trained; the exported kernels stay on the grids
    nnx.update(model, new)
    assert model(jnp.ones((1, 6))).shape == (1, 3)


def test_mask_errors_name_the_leaf():
    _, _, params, _ = _model_and_loss()
    with pytest.raises(ValueError, match="'fc1' names a layer"):
        T.keep_mask({"fc1": np.ones((6, 16), bool)}).init(params)
    with pytest.raises(ValueError, match="'fc1/kernel' has shape"):
        T.keep_mask({"fc1": {"kernel": np.ones((2, 2), bool)}}).init(params)
