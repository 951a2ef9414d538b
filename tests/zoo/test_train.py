"""Tests for obcjax.zoo.train: loss, optimizer, augmentation, training, evaluation, cache."""

import dataclasses
import os
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import serialization

from obcjax.zoo import data, models, train
from obcjax.zoo.train import DEFAULT_CONFIGS, TrainConfig, ZooCacheWarning

# A recipe that trains the MLP on digits in well under a second once compiled.
TINY = TrainConfig(epochs=2, batch_size=128, lr=3e-3, weight_decay=5e-2, label_smoothing=0.1)


@pytest.fixture(scope="module")
def digits():
    return data.digits()


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OBCJAX_CACHE", str(tmp_path))
    return tmp_path / "zoo"


def _equal_trees(a, b) -> bool:
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


# ---------------------------------------------------------------------------------------------
# Loss, optimizer, step
# ---------------------------------------------------------------------------------------------


def _ce_reference(logits, labels, smoothing=0.0):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    target = np.full(logits.shape, smoothing / logits.shape[1])
    target[np.arange(len(labels)), labels] += 1.0 - smoothing
    return float(-(target * logp).sum(1).mean())


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy(smoothing):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((16, 7)) * 3
    labels = rng.integers(0, 7, 16)
    got = train.cross_entropy(
        jnp.asarray(logits, jnp.float32), jnp.asarray(labels), label_smoothing=smoothing
    )
    assert float(got) == pytest.approx(_ce_reference(logits, labels, smoothing), rel=1e-5)


def test_optimizer_decays_kernels_only():
    params = {"fc": {"kernel": jnp.full((3, 2), 2.0), "bias": jnp.full((2,), 2.0)}}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = train.make_optimizer(0.1, total_steps=100, weight_decay=0.5)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    # Zero gradients leave only the decoupled decay: -lr * wd * kernel at step 0 (lr = peak).
    np.testing.assert_allclose(updates["fc"]["kernel"], -0.1 * 0.5 * 2.0, rtol=1e-6)
    np.testing.assert_array_equal(updates["fc"]["bias"], 0.0)


def test_optimizer_warmup_starts_at_zero_and_reaches_peak():
    params = {"w": jnp.zeros((4, 4))}
    grads = {"w": jnp.ones((4, 4))}
    tx = train.make_optimizer(0.1, total_steps=20, weight_decay=0.0, warmup_steps=5)
    state = tx.init(params)
    update = jax.jit(tx.update)
    sizes = []
    for _ in range(8):
        u, state = update(grads, state, params)
        sizes.append(float(jnp.abs(u["w"]).max()))
    # Adam's normalized step is ~lr: 0 at step 0, rising linearly to the peak at step 5.
    assert sizes[0] == 0.0
    np.testing.assert_allclose(sizes[1:6], [0.02, 0.04, 0.06, 0.08, 0.1], rtol=1e-4)
    assert sizes[7] < sizes[5]  # then the cosine decay


def test_train_step_decreases_loss_and_keeps_inputs(digits):
    module = models.linen_model("mlp")
    v = models.init_variables("mlp", (8, 8, 1))
    params = jax.tree.map(np.asarray, v["params"])  # numpy: a mutation would show
    before = jax.tree.map(np.copy, params)
    tx = optax.adam(1e-2)
    step = train.make_train_step(module.apply, tx, label_smoothing=0.0)
    x, y = digits["train"].x[:64], digits["train"].y[:64]
    p, bs, s = params, {}, tx.init(params)
    losses = []
    for _ in range(30):
        p, bs, s, loss = step(p, bs, s, x, y)
        losses.append(float(loss))
    assert losses[0] == pytest.approx(
        _ce_reference(models.apply("mlp", v, x), y), rel=1e-4
    )  # the first loss is the untrained model's
    assert losses[-1] < 0.1 * losses[0]
    assert bs == {}
    assert _equal_trees(params, before)


def test_make_train_step_rejects_bad_smoothing():
    with pytest.raises(ValueError, match="label_smoothing"):
        train.make_train_step(models.linen_model("mlp").apply, optax.sgd(0.1), label_smoothing=1)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


def test_shift_examples_moves_each_example_within_range():
    n, size, s = 400, 7, 2
    x = np.zeros((n, size, size, 1), np.float32)
    x[:, 3, 3, 0] = np.arange(1, n + 1)  # one bright pixel, tagged with its example
    before = x.copy()
    out = train.shift_examples(x, s, np.random.default_rng(0))
    np.testing.assert_array_equal(x, before)  # input untouched
    assert out.shape == x.shape and out.dtype == x.dtype
    offsets = set()
    for i in range(n):
        rows, cols = np.nonzero(out[i, :, :, 0])
        assert len(rows) == 1 and out[i, rows[0], cols[0], 0] == i + 1
        offsets.add((int(rows[0]) - 3, int(cols[0]) - 3))
    assert offsets == {(a, b) for a in range(-s, s + 1) for b in range(-s, s + 1)}


def test_shift_examples_zero_fill_deterministic_and_1d():
    x = np.ones((64, 10, 1), np.float32)
    a = train.shift_examples(x, 3, np.random.default_rng(5))
    b = train.shift_examples(x, 3, np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    # A shift by k leaves k zeros at one end: sums range over 7..10.
    sums = a.sum(axis=(1, 2))
    assert set(sums.tolist()) <= {7.0, 8.0, 9.0, 10.0} and len(set(sums.tolist())) > 2
    same = train.shift_examples(x, 0, np.random.default_rng(5))
    np.testing.assert_array_equal(same, x)
    assert same is not x
    with pytest.raises(ValueError, match="shift_examples"):
        train.shift_examples(np.ones((4, 10)), 1, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------------
# train / evaluate
# ---------------------------------------------------------------------------------------------


def _small(ds, n=256):
    return {"train": data.Split(ds["train"].x[:n], ds["train"].y[:n]), "calib": ds["calib"]}


def test_train_is_deterministic_under_its_seed(digits):
    ds = _small(digits)
    kw = dict(epochs=3, batch_size=64, lr=3e-3, label_smoothing=0.1, max_shift=1, warmup_epochs=1)
    a, ha = train.train("mlp", ds, seed=0, **kw)
    b, hb = train.train("mlp", ds, seed=0, **kw)
    c, _ = train.train("mlp", ds, seed=1, **kw)
    assert _equal_trees(a, b) and ha["loss"] == hb["loss"]
    assert not _equal_trees(a, c)
    assert len(ha["loss"]) == 3 and len(ha["calib_accuracy"]) == 3
    # The augmentation is part of the seeded stream: without it the weights differ.
    d, _ = train.train("mlp", ds, seed=0, **{**kw, "max_shift": 0})
    assert not _equal_trees(a, d)


def test_train_eval_every_and_start_variables(digits):
    ds = _small(digits)
    start = models.init_variables("mlp", (8, 8, 1), seed=9)
    snapshot = jax.tree.map(np.array, start)
    v, h = train.train("mlp", ds, epochs=4, batch_size=64, lr=1e-3, variables=start, eval_every=0)
    assert len(h["calib_accuracy"]) == 1 and len(h["loss"]) == 4
    assert _equal_trees(start, snapshot)
    assert not _equal_trees(v["params"], start["params"])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 10_000}, "exceeds the 256 training examples"),
        ({"warmup_epochs": 2}, "warmup_epochs"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"epochs": 0}, "epochs"),
        ({"lr": 0.0}, "lr"),
        ({"max_shift": -1}, "max_shift"),
    ],
)
def test_train_rejects_bad_arguments(digits, kwargs, match):
    kw = {"epochs": 2, "batch_size": 32, "lr": 1e-3, **kwargs}
    with pytest.raises(ValueError, match=match):
        train.train("mlp", _small(digits), **kw)


def test_evaluate_apply_matches_numpy():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((37, 4, 3)).astype(np.float32)
    y = rng.integers(0, 5, 37).astype(np.int32)
    w = rng.standard_normal((12, 5)).astype(np.float32)
    fn = jax.jit(lambda w, x: x.reshape(x.shape[0], -1) @ w)
    got = train.evaluate_apply(fn, w, data.Split(x, y), batch_size=16)  # 16+16+5 (padded)
    logits = x.reshape(37, -1).astype(np.float64) @ w
    assert got["n"] == 37
    assert got["accuracy"] == pytest.approx(float((logits.argmax(1) == y).mean()))
    assert got["loss"] == pytest.approx(_ce_reference(logits, y), rel=1e-5)
    with pytest.raises(ValueError, match="empty"):
        train.evaluate_apply(fn, w, data.Split(x[:0], y[:0]))


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def test_cache_paths(cache):
    assert train.cache_dir() == cache
    default = train.cache_path("lenet5", "digits")
    assert default == cache / "lenet5-digits-seed0.msgpack"
    assert (
        train.cache_path("lenet5", "digits", config=DEFAULT_CONFIGS["lenet5", "digits"]) == default
    )
    custom = train.cache_path("lenet5", "digits", 2, config=TINY)
    assert custom.parent == cache and custom.name.startswith("lenet5-digits-seed2-")
    assert custom != train.cache_path("lenet5", "digits", 2, config=dataclasses.replace(TINY, lr=1))


def test_cache_key_covers_every_recipe_field():
    base = train._cache_key("mlp", "digits", 0, TINY, "data")
    changed = {
        "epochs": 3, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "warmup_epochs": 1,
        "label_smoothing": 0.2, "max_shift": 1, "dataset_kwargs": (("seed", 1),),
    }  # fmt: skip
    assert set(changed) == {f.name for f in dataclasses.fields(TrainConfig)}
    keys = {
        train._cache_key("mlp", "digits", 0, dataclasses.replace(TINY, **{k: v}), "data")
        for k, v in changed.items()
    }
    keys |= {
        train._cache_key("mlp", "digits", 1, TINY, "data"),
        train._cache_key("mlp", "digits", 0, TINY, "other data"),
        train._cache_key("lenet5", "digits", 0, TINY, "data"),
    }
    assert base not in keys and len(keys) == len(changed) + 3


def test_pretrained_caches_and_reloads(cache, digits):
    v1, info1 = train.pretrained("mlp", "digits", config=TINY)
    path = train.cache_path("mlp", "digits", config=TINY)
    assert info1["source"] == "trained" and info1["path"] == str(path) and path.is_file()
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZooCacheWarning)
        v2, info2 = train.pretrained("mlp", "digits", config=TINY)
    assert info2["source"] == "cache"
    assert _equal_trees(v1, v2)
    assert info2["test_accuracy"] == info1["test_accuracy"]
    assert train.evaluate("mlp", v2, digits["test"])["accuracy"] == info1["test_accuracy"]
    # A changed recipe is trained anew (into its own file), not read from this one.
    v3, info3 = train.pretrained("mlp", "digits", config=dataclasses.replace(TINY, epochs=3))
    assert info3["source"] == "trained" and info3["path"] != info1["path"]
    assert not _equal_trees(v1, v3)


def _rewrite_record(path, **changes):
    record = serialization.msgpack_restore(path.read_bytes())
    path.write_bytes(serialization.msgpack_serialize({**record, **changes}))


def _flip_payload_byte(path):
    record = serialization.msgpack_restore(path.read_bytes())
    payload = bytearray(record["payload"])
    payload[len(payload) // 2] ^= 0xFF
    _rewrite_record(path, payload=bytes(payload))


def _wrong_shapes(path):
    payload = serialization.msgpack_serialize(
        jax.tree.map(np.asarray, models.init_variables("mlp", (4, 4, 1)))
    )
    _rewrite_record(path, payload=payload, sha256=train._sha256(payload))


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: os.path.getsize(p) // 2]),
    "garbage": lambda p: p.write_bytes(b"\x00not a checkpoint\xff" * 10),
    "not a record": lambda p: p.write_bytes(serialization.msgpack_serialize(7)),
    "flipped byte": _flip_payload_byte,
    "wrong shapes": _wrong_shapes,
}


@pytest.mark.parametrize("damage", list(CORRUPTIONS))
def test_corrupt_cache_retrains_with_warning(cache, damage):
    v1, _ = train.pretrained("mlp", "digits", config=TINY)
    path = train.cache_path("mlp", "digits", config=TINY)
    CORRUPTIONS[damage](path)
    with pytest.warns(ZooCacheWarning, match=r"is corrupted \(.*\); retraining mlp on digits"):
        v2, info = train.pretrained("mlp", "digits", config=TINY)
    assert info["source"] == "trained"
    assert _equal_trees(v1, v2)  # deterministic: the retrained weights are the same
    _, again = train.pretrained("mlp", "digits", config=TINY)  # and the file was repaired
    assert again["source"] == "cache"


def test_stale_cache_retrains_with_warning(cache, monkeypatch):
    train.pretrained("mlp", "digits", config=TINY)
    path = train.cache_path("mlp", "digits", config=TINY)
    _rewrite_record(path, key="0" * 64)
    with pytest.warns(ZooCacheWarning, match="is stale"):
        _, info = train.pretrained("mlp", "digits", config=TINY)
    assert info["source"] == "trained"
    # A new trainer version invalidates every cached checkpoint.
    monkeypatch.setattr(train, "_TRAINER_VERSION", train._TRAINER_VERSION + 1)
    with pytest.warns(ZooCacheWarning, match="is stale"):
        _, info = train.pretrained("mlp", "digits", config=TINY)
    assert info["source"] == "trained"


def test_unwritable_cache_still_returns_a_model(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("OBCJAX_CACHE", str(blocker))
    with pytest.warns(ZooCacheWarning, match="could not write"):
        v, info = train.pretrained("mlp", "digits", config=TINY)
    assert info["source"] == "trained" and "fc1" in v["params"]


def test_pretrained_rejects_unknown_pairs(cache):
    with pytest.raises(
        ValueError, match="no training recipe for model 'cnn1d' on dataset 'digits'"
    ):
        train.pretrained("cnn1d", "digits")
    with pytest.raises(ValueError, match="unknown model 'vgg'"):
        train.pretrained("vgg", "digits")
    with pytest.raises(TypeError, match="TrainConfig"):
        train.pretrained("mlp", "digits", config={"epochs": 1})
    with pytest.raises(ValueError, match="seed"):
        train.pretrained("mlp", "digits", seed=-1)
    assert not cache.exists()


def test_cache_write_failure_leaves_the_old_file_and_no_temp(cache, monkeypatch):
    """A write that dies half-way (a full disk at fsync) keeps the old cache file byte for byte,
    removes its temporary file, warns, and still returns the model."""
    from obcjax import fileio

    train.pretrained("mlp", "digits", config=TINY)
    path = train.cache_path("mlp", "digits", config=TINY)
    before = path.read_bytes()
    _rewrite_record(path, key="0" * 64)  # stale: the next call retrains and rewrites it
    stale = path.read_bytes()

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio.os, "fsync", full_disk)
    with pytest.warns(ZooCacheWarning) as seen:
        v, info = train.pretrained("mlp", "digits", config=TINY)
    assert [bool(re.search("could not write.*No space left", str(w.message))) for w in seen] == [
        False,  # stale
        True,
    ]
    assert info["source"] == "trained" and "fc1" in v["params"]
    assert path.read_bytes() == stale  # untouched: never half a file
    assert [p.name for p in cache.iterdir()] == [path.name]  # no temporary file left
    monkeypatch.undo()
    monkeypatch.setenv("OBCJAX_CACHE", str(cache.parent))
    with pytest.warns(ZooCacheWarning, match="is stale"):
        train.pretrained("mlp", "digits", config=TINY)
    payload = lambda b: serialization.msgpack_restore(b)["payload"]  # noqa: E731
    assert payload(path.read_bytes()) == payload(before)  # deterministic: the same weights


def test_cache_write_removes_temp_files_of_killed_writers(cache):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # its pid is now (almost certainly) free: a writer that was killed
    path = train.cache_path("mlp", "digits", config=TINY)
    cache.mkdir(parents=True)
    dead = cache / f".{path.name}.{proc.pid}.0123456789ab.tmp"
    dead.write_bytes(b"half a checkpoint")
    train.pretrained("mlp", "digits", config=TINY)
    assert sorted(p.name for p in cache.iterdir()) == [path.name]


def test_cache_byte_flips_load_the_original_or_retrain(tmp_path):
    """Every byte of a cache file's header (format, key, checksums, info, the start of the
    weights) and a sample of the weights, flipped: the file loads as the exact original (a flip
    that changes nothing) or is refused (retrained), never as another model or other info."""
    variables = jax.tree.map(np.asarray, models.init_variables("mlp", (8, 8, 1)))
    template = jax.eval_shape(lambda: models.init_variables("mlp", (8, 8, 1)))
    key = "ab" * 32
    info = {"test_accuracy": 0.97, "config": {"epochs": 2}, "key": key}
    data = train._record_bytes(variables, key, info)
    path = tmp_path / "mlp.msgpack"
    path.write_bytes(data)
    loaded = train._load_cached(path, key, template, "mlp")
    assert loaded is not None and _equal_trees(loaded[0], variables) and loaded[1] == info
    head = data.index(b"payload") + 64  # the record's fields, then the start of the weights
    rng = np.random.default_rng(0)
    where = list(range(head)) + sorted(rng.choice(np.arange(head, len(data)), 150, replace=False))
    where += list(range(len(data) - 16, len(data)))
    refused = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ZooCacheWarning)
        for i in where:
            flipped = bytearray(data)
            flipped[i] ^= 0xFF
            path.write_bytes(bytes(flipped))
            got = train._load_cached(path, key, template, "mlp")
            if got is None:
                refused += 1
                continue
            assert _equal_trees(got[0], variables), f"byte {i}: another model loaded"
            assert got[1] == info, f"byte {i}: other info loaded"
    assert refused >= len(where) - 8  # almost every flip is caught (a few hit ignored bytes)


# ---------------------------------------------------------------------------------------------
# Acceptance: the default recipes reach their accuracy
# ---------------------------------------------------------------------------------------------


def test_lenet5_digits_reaches_97_percent_and_caches(cache, digits):
    v, info = train.pretrained("lenet5", "digits")
    assert info["source"] == "trained"
    assert info["config"] == dataclasses.asdict(DEFAULT_CONFIGS["lenet5", "digits"])
    acc = train.evaluate("lenet5", v, digits["test"])["accuracy"]
    assert acc == info["test_accuracy"]
    assert acc >= 0.97, f"LeNet-5 test accuracy {acc:.4f} < 0.97"
    assert info["calib_accuracy"] >= 0.95
    assert info["path"] == str(cache / "lenet5-digits-seed0.msgpack")
    v2, info2 = train.pretrained("lenet5", "digits")
    assert info2["source"] == "cache" and _equal_trees(v, v2)


def test_mlp_digits_reaches_97_percent(digits):
    cfg = DEFAULT_CONFIGS["mlp", "digits"]
    kw = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "dataset_kwargs"}
    v, history = train.train("mlp", digits, seed=0, eval_every=0, **kw)
    assert history["loss"][-1] < 0.5 * history["loss"][0]
    assert train.evaluate("mlp", v, digits["test"])["accuracy"] >= 0.97
