"""Tests for obcjax.zoo.data: splits, MNIST-1D generator, text corpus, batches, fingerprint."""

import socket

import numpy as np
import pytest

from obcjax.zoo import data

# ---------------------------------------------------------------------------------------------
# No network: every loader must work with sockets refused.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a connection fail loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_no_network_fixture_blocks_connections(no_network):
    # The guard itself must bite, or the offline tests below would prove nothing.
    with pytest.raises(AssertionError, match="network access"):
        socket.create_connection(("example.com", 80), timeout=0.1)


# ---------------------------------------------------------------------------------------------
# digits
# ---------------------------------------------------------------------------------------------


def _rows(x: np.ndarray, y: np.ndarray) -> list[tuple[bytes, int]]:
    """Each example as a hashable (image bytes, label) pair, sorted."""
    x = np.ascontiguousarray(x, np.float32)
    return sorted((x[i].tobytes(), int(y[i])) for i in range(len(y)))


def test_digits_shapes_dtypes_and_range(no_network):
    ds = data.digits()
    assert set(ds) == {"train", "calib", "test"}
    sizes = {k: len(s.y) for k, s in ds.items()}
    assert sizes == {"train": 1078, "calib": 180, "test": 539}
    for split in ds.values():
        assert isinstance(split, data.Split)
        assert split.x.shape == (len(split.y), 8, 8, 1)
        assert split.x.dtype == np.float32 and split.y.dtype == np.int32
        assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        assert set(np.unique(split.y)) == set(range(10))


def test_digits_splits_partition_the_data_set():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    full = _rows(np.asarray(bunch.images, np.float32)[..., None] / 16.0, bunch.target)
    ds = data.digits(seed=3)
    x = np.concatenate([s.x for s in ds.values()])
    y = np.concatenate([s.y for s in ds.values()])
    # Same multiset of examples: every image is in exactly one split (disjoint and complete).
    assert _rows(x, y) == full


def test_digits_splits_are_stratified():
    ds = data.digits()
    total = np.bincount(np.concatenate([s.y for s in ds.values()]), minlength=10)
    for name, frac in (("train", 0.6), ("calib", 0.1), ("test", 0.3)):
        counts = np.bincount(ds[name].y, minlength=10)
        assert np.all(np.abs(counts - frac * total) <= 1), (name, counts, frac * total)


def test_digits_deterministic_and_seed_dependent():
    a, b, c = data.digits(seed=0), data.digits(seed=0), data.digits(seed=1)
    for k in a:
        np.testing.assert_array_equal(a[k].x, b[k].x)
        np.testing.assert_array_equal(a[k].y, b[k].y)
    assert not np.array_equal(a["test"].y, c["test"].y)
    assert _rows(a["test"].x, a["test"].y) != _rows(c["test"].x, c["test"].y)


@pytest.mark.parametrize("seed, err", [(-1, ValueError), (1.5, TypeError), (True, TypeError)])
def test_digits_rejects_bad_seed(seed, err):
    with pytest.raises(err, match="seed"):
        data.digits(seed=seed)


# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------


def test_mnist1d_templates():
    t = data.mnist1d_templates()
    assert t.shape == (10, 12) and t.dtype == np.float64
    # Whitened to unit std, shifted to start (and, for these templates, end) at 0, then / 6.
    np.testing.assert_allclose(t[:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(t[:, -1], 0.0, atol=1e-12)
    np.testing.assert_allclose(t.std(axis=1), 1 / 6, rtol=1e-12)
    assert len({row.tobytes() for row in t}) == 10


def test_mnist1d_shapes_dtypes_and_standardization(no_network):
    ds = data.mnist1d()
    assert {k: s.x.shape for k, s in ds.items()} == {
        "train": (3600, 40, 1),
        "calib": (400, 40, 1),
        "test": (1000, 40, 1),
    }
    x = np.concatenate([s.x for s in ds.values()])
    assert x.dtype == np.float32 and all(s.y.dtype == np.int32 for s in ds.values())
    assert abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1.0) < 1e-4


def test_mnist1d_class_balanced():
    for n in (1000, 5000):
        ds = data.mnist1d(num_samples=n)
        y = np.concatenate([s.y for s in ds.values()])
        np.testing.assert_array_equal(np.bincount(y, minlength=10), np.full(10, n // 10))
        # Shuffled before the split, so each split holds every class.
        for s in ds.values():
            assert set(np.unique(s.y)) == set(range(10))


def test_mnist1d_deterministic_across_regeneration():
    a = data.mnist1d(num_samples=500, seed=7)
    data._mnist1d_arrays.cache_clear()  # regenerate instead of reading the memo
    b = data.mnist1d(num_samples=500, seed=7)
    c = data.mnist1d(num_samples=500, seed=8)
    for k in a:
        np.testing.assert_array_equal(a[k].x, b[k].x)
        np.testing.assert_array_equal(a[k].y, b[k].y)
    assert not np.allclose(a["train"].x, c["train"].x)


def test_mnist1d_splits_are_disjoint():
    ds = data.mnist1d()
    keys = [{row.tobytes() for row in s.x} for s in ds.values()]
    assert sum(len(k) for k in keys) == 5000  # no duplicate signal anywhere
    assert not (keys[0] & keys[1]) and not (keys[0] & keys[2]) and not (keys[1] & keys[2])


def test_mnist1d_matches_the_reference_package():
    # Reference values printed by mnist1d 0.0.2.post1 (Greydanus), make_dataset() with its default
    # arguments (seed 42): d["y"][:10], d["x"][0, :6], d["x_test"][-1, -4:], d["y_test"][-5:].
    # Our train + calib is the package's train set, our test its test set.
    ds = data.mnist1d()
    train_x = np.concatenate([ds["train"].x, ds["calib"].x])[..., 0]
    train_y = np.concatenate([ds["train"].y, ds["calib"].y])
    assert train_y[:10].tolist() == [2, 6, 4, 5, 6, 6, 6, 0, 3, 1]
    np.testing.assert_allclose(
        train_x[0, :6], [-0.33201, -0.47191, -0.7787, -1.00974, -0.88235, 0.10393], atol=2e-5
    )
    np.testing.assert_allclose(
        ds["test"].x[-1, -4:, 0], [0.44723, 0.65988, 0.87773, 1.19315], atol=2e-5
    )
    assert ds["test"].y[-5:].tolist() == [2, 5, 9, 6, 4]


def test_mnist1d_returns_independent_copies():
    a = data.mnist1d(num_samples=200)
    a["train"].x[:] = 123.0
    b = data.mnist1d(num_samples=200)
    assert not np.any(b["train"].x == 123.0)


def test_gaussian_smooth_matches_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for n in (5, 17, 72):  # shorter than, and longer than, the filter radius (8)
        x = rng.standard_normal(n)
        np.testing.assert_allclose(
            data._gaussian_smooth(x, 2.0), ndimage.gaussian_filter(x, 2.0), atol=1e-12
        )


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"num_samples": 5}, ValueError, "num_samples"),
        ({"calib_fraction": 1.0}, ValueError, "calib_fraction"),
        ({"seed": -3}, ValueError, "seed"),
        ({"num_samples": 100.0}, TypeError, "num_samples"),
    ],
)
def test_mnist1d_rejects_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        data.mnist1d(**kwargs)


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def test_text_corpus_offline_non_empty_and_disjoint(no_network):
    corpus = data.text_corpus()
    assert set(corpus) == {"calib", "test"}
    assert len(corpus["calib"]) == 400 and len(corpus["test"]) == 400
    assert not set(corpus["calib"]) & set(corpus["test"])
    assert len(set(corpus["calib"])) == 400  # no duplicates within a split
    for s in corpus["calib"] + corpus["test"]:
        assert isinstance(s, str) and s.isascii()
        assert 30 <= len(s) <= 200 and len(s.split()) >= 6
        assert s[0].isupper() and s[-1] in ".!?"


def test_text_corpus_deterministic_and_seeded():
    a, b, c = data.text_corpus(seed=0), data.text_corpus(seed=0), data.text_corpus(seed=1)
    assert a == b
    assert a["calib"] != c["calib"]


def test_text_corpus_small_splits():
    corpus = data.text_corpus(per_split=5)
    assert len(corpus["calib"]) == 5 and len(corpus["test"]) == 5
    with pytest.raises(ValueError, match="per_split"):
        data.text_corpus(per_split=0)


# ---------------------------------------------------------------------------------------------
# load_dataset, batches, fingerprint
# ---------------------------------------------------------------------------------------------


def test_load_dataset_by_name():
    ds = data.load_dataset("mnist1d", num_samples=1000)
    assert ds["test"].x.shape == (200, 40, 1)
    assert data.load_dataset("digits")["train"].x.shape == (1078, 8, 8, 1)
    with pytest.raises(ValueError, match="unknown dataset 'mnist'.*digits, mnist1d"):
        data.load_dataset("mnist")


def test_batches_cover_every_example_once_and_are_seeded():
    split = data.digits()["calib"]
    x_before = split.x.copy()
    plain = list(data.batches(split, 64))
    assert [len(y) for _, y in plain] == [64, 64, 52]
    np.testing.assert_array_equal(np.concatenate([x for x, _ in plain]), split.x)

    shuffled = list(data.batches(split, 64, seed=1))
    xs = np.concatenate([x for x, _ in shuffled])
    ys = np.concatenate([y for _, y in shuffled])
    assert _rows(xs, ys) == _rows(split.x, split.y)
    assert not np.array_equal(ys, split.y)
    again = np.concatenate([y for _, y in data.batches(split, 64, seed=1)])
    np.testing.assert_array_equal(ys, again)

    dropped = list(data.batches(split, 64, seed=1, drop_last=True))
    assert [len(y) for _, y in dropped] == [64, 64]
    np.testing.assert_array_equal(split.x, x_before)  # not modified


def test_batches_rejects_bad_arguments():
    split = data.digits()["calib"]
    with pytest.raises(ValueError, match="batch_size"):
        list(data.batches(split, 0))
    with pytest.raises(ValueError, match="180 inputs but 179 labels"):
        list(data.batches(data.Split(split.x, split.y[:-1]), 8))


def test_fingerprint_tracks_content():
    ds = data.mnist1d(num_samples=200)
    fp = data.fingerprint(ds)
    assert len(fp) == 64 and fp == data.fingerprint(data.mnist1d(num_samples=200))
    changed = dict(ds)
    x = ds["test"].x.copy()
    x[0, 0, 0] += 1e-3
    changed["test"] = data.Split(x, ds["test"].y)
    assert data.fingerprint(changed) != fp
    relabeled = dict(ds)
    relabeled["test"] = data.Split(ds["test"].x, (ds["test"].y + 1) % 10)
    assert data.fingerprint(relabeled) != fp
