"""Tests of obcjax.training: frozen masks and codebooks, STE, optax composition, finetune."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from obcjax import training as T
from obcjax.quant import QArray, quantize
from obcjax.zoo.data import Split


def _params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "a": {
            "kernel": jnp.asarray(r.normal(size=(6, 5)), jnp.float32),
            "bias": jnp.asarray(r.normal(size=(5,)), jnp.float32),
        },
        "b": {"kernel": jnp.asarray(r.normal(size=(5, 3)), jnp.float32)},
    }


def _masks(p, seed=1):
    r = np.random.default_rng(seed)
    return {
        "a": r.random(p["a"]["kernel"].shape) > 0.5,
        "b": r.random(p["b"]["kernel"].shape) > 0.3,
    }


def _cbs():
    return {
        "a": T.Codebook(jnp.float32(0.25), jnp.float32(8.0), 4),
        "b": T.Codebook(jnp.float32(0.5), jnp.float32(2.0), 2),
    }


def test_keep_mask_keeps_pruned_weights_exactly_zero_under_weight_decay():
    m = _masks(_params())
    p = T.quantize_params(_params(), {}, T.mask_tree(_params(), m))  # zero where pruned
    tx = optax.chain(optax.adamw(1e-1, weight_decay=0.5), T.keep_mask(T.mask_tree(p, m)))
    st = tx.init(p)
    g = jax.tree.map(jnp.ones_like, p)
    new = p
    for _ in range(3):
        u, st = tx.update(g, st, new)
        new = optax.apply_updates(new, u)
    for k in ("a", "b"):
        w = np.asarray(new[k]["kernel"])
        assert np.all(w[~m[k]] == 0.0)
        assert np.all(w[m[k]] != np.asarray(p[k]["kernel"])[m[k]])  # kept weights do train
    assert not np.array_equal(np.asarray(new["a"]["bias"]), np.asarray(p["a"]["bias"]))
    np.testing.assert_array_equal(np.asarray(T.get_masks(st)["a"]["kernel"]), m["a"])
    assert "bias" not in T.get_masks(st)["a"]  # dense leaves are absent


def test_keep_mask_freezes_nonzero_entries_and_accepts_absent_or_none():
    p = _params()
    frozen = {"b": {"kernel": np.zeros((5, 3), bool)}, "a": None}  # b frozen, a free
    tx = optax.chain(optax.adam(0.1), T.keep_mask(frozen))
    st = tx.init(p)
    u, _ = tx.update(jax.tree.map(jnp.ones_like, p), st, p)
    new = optax.apply_updates(p, u)
    np.testing.assert_array_equal(np.asarray(new["b"]["kernel"]), np.asarray(p["b"]["kernel"]))
    assert not np.array_equal(np.asarray(new["a"]["kernel"]), np.asarray(p["a"]["kernel"]))


def test_chain_holds_masks_and_codebooks_and_jits():
    p = _params()
    tx = optax.chain(
        T.frozen_codebooks(_cbs()), optax.sgd(0.1), T.keep_mask(T.mask_tree(p, _masks(p)))
    )
    st = tx.init(p)
    assert T.get_codebooks(st)["b"].bits == 2
    assert T.get_masks(st) is not None

    @jax.jit
    def step(p, st):
        g = jax.grad(
            lambda q: sum(
                jnp.sum(x**2)
                for x in jax.tree.leaves(
                    T.fake_quantize_params(q, T.get_codebooks(st), T.get_masks(st))
                )
            )
        )(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st

    p2, st2 = step(p, st)
    chex.assert_trees_all_equal(T.get_codebooks(st2), T.get_codebooks(st))
    chex.assert_trees_all_equal(T.get_masks(st2), T.get_masks(st))
    assert T.get_codebooks(optax.sgd(0.1).init(p)) == {} and T.get_masks(()) is None


def test_fake_quantize_values_on_grid_and_ste_gradient_is_the_mask():
    p = _params()
    m = T.mask_tree(p, _masks(p))
    cbs = _cbs()
    q = T.fake_quantize_params(p, cbs, m)
    for k, cb in cbs.items():
        ref = np.asarray(quantize(p[k]["kernel"], cb.scale, cb.zero, cb.bits))
        ref = np.where(np.asarray(m[k]["kernel"]), ref, 0.0)
        np.testing.assert_array_equal(np.asarray(q[k]["kernel"]), ref)
    g = jax.grad(lambda x: jnp.sum(T.fake_quantize_params(x, cbs, m)["a"]["kernel"] * 3.0))(p)
    np.testing.assert_array_equal(np.asarray(g["a"]["kernel"]), 3.0 * np.asarray(m["a"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(q["a"]["bias"]), np.asarray(p["a"]["bias"]))


def test_mask_tree_and_codebooks_from_qarrays_errors():
    p = _params()
    with pytest.raises(ValueError, match="'a/kernel' has shape"):
        T.mask_tree(p, {"a": np.ones((2, 2), bool)})
    with pytest.raises(ValueError, match="'zz' is not in params"):
        T.mask_tree(p, {"zz": np.ones((2, 2), bool)})
    qa = QArray(
        jnp.zeros((3, 4), jnp.uint8), jnp.array([[0.1], [0.2], [0.1]]), jnp.full((3, 1), 8.0), 4, 4
    )
    with pytest.raises(ValueError, match="'a'.*granularity='tensor'"):
        T.codebooks_from_qarrays({"a": [qa]})
    qt = qa._replace(scale=jnp.full((3, 1), 0.1))
    cb = T.codebooks_from_qarrays({"a": [qt]})["a"]
    assert cb.bits == 4 and float(cb.scale) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="'a' names a layer, not a leaf"):
        T.keep_mask({"a": np.ones((6, 5), bool)}).init(p)
    with pytest.raises(ValueError, match="keep_mask: mask of 'a/kernel' has shape"):
        T.keep_mask({"a": {"kernel": np.ones((2, 2), bool)}}).init(p)
    with pytest.raises(ValueError, match="codebook for 'zz'"):
        T.frozen_codebooks({"zz": _cbs()["a"]}).init(p)


def test_finetune_leaves_masks_and_codebooks_bit_for_bit_unchanged():
    from obcjax import opq
    from obcjax.recipes.finetune import zoo_finetune
    from obcjax.zoo import models as zm

    v = zm.init_variables("mlp", (8, 8, 1), seed=0)
    alloc = opq.opq_allocate(v["params"], 12.0)
    comp = opq.opq_compress(v["params"], alloc)
    cbs = T.codebooks_from_qarrays(comp.qarrays)
    r = np.random.default_rng(0)
    data = Split(r.normal(size=(64, 8, 8, 1)).astype(np.float32), r.integers(0, 10, 64))
    masks = T.mask_tree(comp.params, comp.masks)
    v2, info = zoo_finetune(
        "mlp",
        {**v, "params": comp.params},
        masks,
        cbs,
        data,
        4,
        lr=1e-2,
        batch_size=16,
        weight_decay=1e-3,
    )
    st = info["opt_state"]
    for path in comp.masks:
        mask = np.asarray(masks[path]["kernel"])
        np.testing.assert_array_equal(np.asarray(T.get_masks(st)[path]["kernel"]), mask)
        w = np.asarray(v2["params"][path]["kernel"])
        assert np.all(w[~mask] == 0.0)
        cb = T.get_codebooks(st)[path]
        assert cb.bits == cbs[path].bits
        np.testing.assert_array_equal(np.asarray(cb.scale), np.asarray(cbs[path].scale))
        np.testing.assert_array_equal(np.asarray(cb.zero), np.asarray(cbs[path].zero))
        # exported weights lie on the original codebook
        codes = np.round(w / float(cb.scale)) + float(cb.zero)
        np.testing.assert_allclose(w, float(cb.scale) * (codes - float(cb.zero)), rtol=0, atol=1e-7)
        assert codes.min() >= 0 and codes.max() <= 2**cb.bits - 1
    changed = [
        not np.array_equal(
            np.asarray(v2["params"][k]["kernel"]), np.asarray(comp.params[k]["kernel"])
        )
        for k in comp.masks
    ]
    assert any(changed)  # training did something
    assert len(info["losses"]) == 4 and all(np.isfinite(info["losses"]))
    with pytest.raises(ValueError, match="steps"):
        zoo_finetune("mlp", v, comp.masks, cbs, data, -1)


def test_finetune_functional_loop_on_dicts_steps_and_epochs():
    p = _params()
    m = T.mask_tree(p, _masks(p))
    start = T.quantize_params(p, {}, m)
    r = np.random.default_rng(0)
    data = [(r.normal(size=(4, 6)).astype(np.float32), r.normal(size=(4, 3))) for _ in range(3)]

    def loss(q, batch):
        x, y = batch
        return jnp.mean(
            (jnp.tanh(x @ q["a"]["kernel"] + q["a"]["bias"]) @ q["b"]["kernel"] - y) ** 2
        )

    new, info = T.finetune(loss, start, data, 7, masks=m, codebooks=_cbs(), lr=0.05)
    assert len(info["losses"]) == 7  # re-iterates the list past one epoch
    for k, cb in _cbs().items():
        w = np.asarray(new[k]["kernel"])
        assert np.all(w[~np.asarray(m[k]["kernel"])] == 0.0)
        ref = np.asarray(quantize(info["shadow_params"][k]["kernel"], cb.scale, cb.zero, cb.bits))
        np.testing.assert_array_equal(w, np.where(np.asarray(m[k]["kernel"]), ref, 0.0))
    _, one = T.finetune(loss, start, data)  # one pass by default
    assert len(one["losses"]) == 3
    with pytest.raises(ValueError, match="ran out"):
        T.finetune(loss, start, iter(data), 5)
    with pytest.raises(ValueError, match="steps"):
        T.finetune(loss, start, data, -1)
