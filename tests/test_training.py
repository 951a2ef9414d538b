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


def test_masked_keeps_pruned_weights_exactly_zero_under_weight_decay():
    p = _params()
    m = _masks(p)
    tx = optax.chain(optax.adamw(1e-1, weight_decay=0.5), T.masked(T.mask_tree(p, m)))
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


def test_chain_holds_masks_and_codebooks_and_jits():
    p = _params()
    tx = optax.chain(
        T.frozen_codebooks(_cbs()), optax.sgd(0.1), T.masked(T.mask_tree(p, _masks(p)))
    )
    st = tx.init(p)
    assert T.get_codebooks(st)["b"].bits == 2
    assert T.get_masks(st) is not None

    @jax.jit
    def step(p, st):
        g = jax.grad(
            lambda q: sum(
                jnp.sum(x**2)
                for x in jax.tree.leaves(T.quantized_apply(q, T.get_codebooks(st), T.get_masks(st)))
            )
        )(p)
        u, st = tx.update(g, st, p)
        return optax.apply_updates(p, u), st

    p2, st2 = step(p, st)
    chex.assert_trees_all_equal(T.get_codebooks(st2), T.get_codebooks(st))
    chex.assert_trees_all_equal(T.get_masks(st2), T.get_masks(st))
    assert T.get_codebooks(optax.sgd(0.1).init(p)) == {} and T.get_masks(()) is None


def test_quantized_apply_values_on_grid_and_ste_gradient_is_the_mask():
    p = _params()
    m = T.mask_tree(p, _masks(p))
    cbs = _cbs()
    q = T.quantized_apply(p, cbs, m)
    for k, cb in cbs.items():
        ref = np.asarray(quantize(p[k]["kernel"], cb.scale, cb.zero, cb.bits))
        ref = np.where(np.asarray(m[k]["kernel"]), ref, 0.0)
        np.testing.assert_array_equal(np.asarray(q[k]["kernel"]), ref)
    g = jax.grad(lambda x: jnp.sum(T.quantized_apply(x, cbs, m)["a"]["kernel"] * 3.0))(p)
    np.testing.assert_array_equal(np.asarray(g["a"]["kernel"]), 3.0 * np.asarray(m["a"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(q["a"]["bias"]), np.asarray(p["a"]["bias"]))


def test_mask_tree_and_codebooks_from_qarrays_errors():
    p = _params()
    with pytest.raises(ValueError, match="'a'.*mask shape"):
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
    with pytest.raises(ValueError, match="masked: the mask tree"):
        T.masked({"a": True}).init(p)


def test_finetune_leaves_masks_and_codebooks_bit_for_bit_unchanged():
    from obcjax import opq
    from obcjax.zoo import models as zm

    v = zm.init_variables("mlp", (8, 8, 1), seed=0)
    alloc = opq.opq_allocate(v["params"], 12.0)
    comp = opq.opq_compress(v["params"], alloc)
    cbs = T.codebooks_from_qarrays(comp.qarrays)
    r = np.random.default_rng(0)
    data = Split(r.normal(size=(64, 8, 8, 1)).astype(np.float32), r.integers(0, 10, 64))
    v2, info = T.finetune(
        "mlp",
        {**v, "params": comp.params},
        comp.masks,
        cbs,
        data,
        4,
        lr=1e-2,
        batch_size=16,
        weight_decay=1e-3,
    )
    st = info["opt_state"]
    for path, mask in comp.masks.items():
        np.testing.assert_array_equal(np.asarray(T.get_masks(st)[path]["kernel"]), np.asarray(mask))
        w = np.asarray(v2["params"][path]["kernel"])
        assert np.all(w[~np.asarray(mask)] == 0.0)
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
        T.finetune("mlp", v, comp.masks, cbs, data, -1)
