"""Offline, deterministic data sets for the model zoo: sklearn digits, procedural MNIST-1D, text.

Nothing here touches the network. Every function is deterministic under its seed.

* :func:`digits` -- scikit-learn's bundled 8x8 handwritten digits (1797 images, UCI optdigits),
  images ``(N, 8, 8, 1)`` in ``[0, 1]``, a stratified 60/10/30 train/calib/test split.
* :func:`mnist1d` -- MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated
  procedurally by a faithful re-implementation of the ``mnist1d`` package's generator (same
  templates, transforms, defaults and random stream), signals ``(N, 40, 1)``.
* :func:`text_corpus` -- English sentences from text that ships with Python (the language
  reference in ``pydoc_data``, standard-library docstrings, the Zen of Python), for calibrating
  a sentence encoder.
* :func:`load_dataset` -- by name; :func:`batches` -- a (shuffled) numpy batch iterator.

Example:
    >>> ds = load_dataset("digits")
    >>> ds["train"].x.shape, ds["train"].y.dtype
    ((1078, 8, 8, 1), dtype('int32'))
    >>> for x, y in batches(ds["calib"], 64, seed=0):
    ...     pass
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np

__all__ = [
    "Split",
    "DATASET_NAMES",
    "digits",
    "mnist1d",
    "mnist1d_templates",
    "text_corpus",
    "load_dataset",
    "batches",
    "fingerprint",
]

DATASET_NAMES = ("digits", "mnist1d")


class Split(NamedTuple):
    """One split of a classification data set.

    Attributes:
      x: ``(N, *input_shape)`` float32 inputs.
      y: ``(N,)`` int32 class labels.
    """

    x: np.ndarray
    y: np.ndarray


def _check_int(name: str, value, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _stratified_split(
    y: np.ndarray, fractions: tuple[float, ...], rng: np.random.Generator
) -> list[np.ndarray]:
    """Index arrays, one per fraction, splitting every class in the given proportions.

    Per class the indices are permuted by ``rng`` and cut at rounded cumulative fractions, so
    every split keeps the class balance. Each returned index array is shuffled (classes mixed).
    """
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    bounds = np.cumsum(fractions)
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cuts = np.round(bounds * len(idx)).astype(int)
        cuts[-1] = len(idx)
        for k, (lo, hi) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            parts[k].append(idx[lo:hi])
    return [rng.permutation(np.concatenate(p)) for p in parts]


def digits(seed: int = 0) -> dict[str, Split]:
    """scikit-learn's bundled 8x8 digits with a stratified train/calib/test split.

    ``sklearn.datasets.load_digits()`` (1797 images, values 0..16) scaled to ``[0, 1]``. Every class
    is split 60 % train, 10 % calib, 30 % test (disjoint; rounded per class), giving
    1078 / 180 / 539 images for any seed. The calib split is for calibrating compression (and for
    validation); the test split is for final figures only.

    Args:
      seed: seed of the split (the images themselves are fixed).

    Returns:
      ``{"train", "calib", "test"}`` -> :class:`Split` with x ``(N, 8, 8, 1)`` float32 and y
      ``(N,)`` int32.

    Example:
        >>> ds = digits()
        >>> ds["test"].x.shape
        (539, 8, 8, 1)
    """
    seed = _check_int("digits: seed", seed, minimum=0)
    from obcjax._extras import require

    bunch = require("sklearn.datasets", "obcjax.zoo.digits").load_digits()
    x = (np.asarray(bunch.images, np.float32) / 16.0)[..., None]
    y = np.asarray(bunch.target, np.int32)
    rng = np.random.default_rng(seed)
    train, calib, test = _stratified_split(y, (0.6, 0.1, 0.3), rng)
    return {k: Split(x[i], y[i]) for k, i in (("train", train), ("calib", calib), ("test", test))}


# ---------------------------------------------------------------------------------------------
# MNIST-1D
# ---------------------------------------------------------------------------------------------

# The ten hand-made 12-point templates of the mnist1d package (Greydanus 2020), digits 0..9.
_MNIST1D_TEMPLATES = (
    (5, 6, 6.5, 6.75, 7, 7, 7, 7, 6.75, 6.5, 6, 5),
    (5, 3, 3, 3.4, 3.8, 4.2, 4.6, 5, 5.4, 5.8, 5, 5),
    (5, 6, 6.5, 6.5, 6, 5.25, 4.75, 4, 3.5, 3.5, 4, 5),
    (5, 6, 6.5, 6.5, 6, 5, 5, 6, 6.5, 6.5, 6, 5),
    (5, 4.4, 3.8, 3.2, 2.6, 2.6, 5, 5, 5, 5, 5, 5),
    (5, 3, 3, 3, 3, 5, 6, 6.5, 6.5, 6, 4.5, 5),
    (5, 4, 3.5, 3.25, 3, 3, 3, 3, 3.25, 3.5, 4, 5),
    (5, 7, 7, 6.6, 6.2, 5.8, 5.4, 5, 4.6, 4.2, 5, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 4, 3.5, 3.5, 4, 5),
    (5, 4, 3.5, 3.5, 4, 5, 5, 5, 5, 4.7, 4.3, 5),
)

# mnist1d's get_dataset_args() defaults.
_MNIST1D_ARGS = dict(
    template_len=12,
    padding=(36, 60),
    scale_coeff=0.4,
    max_translation=48,
    corr_noise_scale=0.25,
    iid_noise_scale=2e-2,
    shear_scale=0.75,
    final_seq_length=40,
    train_split=0.8,
)


def mnist1d_templates() -> np.ndarray:
    """The ten MNIST-1D templates, whitened as in the paper: ``(10, 12)`` float64.

    Each template is standardized, shifted to start (and end) at 0, and divided by 6.
    """
    x = np.asarray(_MNIST1D_TEMPLATES, np.float64)
    x = x - x.mean(1, keepdims=True)
    x = x / x.std(1, keepdims=True)
    x = x - x[:, :1]
    return x / 6.0


def _gaussian_smooth(x: np.ndarray, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """1-D Gaussian filter with half-sample symmetric ('reflect') borders.

    The same filter as ``scipy.ndimage.gaussian_filter(x, sigma)`` on a 1-D array (scipy's
    default mode and truncation), written out so that the data set needs numpy only.
    """
    radius = int(truncate * sigma + 0.5)
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (t / sigma) ** 2)
    w /= w.sum()
    # np.pad "symmetric" repeats the edge sample (d c b a | a b c d), like scipy's "reflect".
    # Padding by tiling handles signals shorter than the radius as scipy does.
    reps = int(np.ceil(radius / len(x))) + 1
    ext = np.pad(x, reps * len(x), mode="symmetric")
    start = reps * len(x) - radius
    ext = ext[start : start + len(x) + 2 * radius]
    return np.convolve(ext, w[::-1], mode="valid")


def _interpolate(x: np.ndarray, n: int) -> np.ndarray:
    """Linear resampling of ``x`` onto ``n`` evenly spaced points over the same extent."""
    return np.interp(np.linspace(0.0, 1.0, n), np.linspace(0.0, 1.0, len(x)), x)


def _mnist1d_transform(x: np.ndarray, rng: np.random.RandomState, a: dict) -> np.ndarray:
    """One MNIST-1D sample from a template, drawing from ``rng`` in the package's order."""
    eps = 1e-8
    lo, hi = a["padding"]
    p = lo + int(rng.rand() * (hi - lo + 1))
    new_x = np.concatenate([x + eps, np.zeros(p)])
    new_x = _interpolate(new_x, a["template_len"] + hi)
    new_x = new_x * (1 + a["scale_coeff"] * (rng.rand() - 0.5))
    k = rng.choice(a["max_translation"])
    new_x = np.concatenate([new_x[len(new_x) - k :], new_x[: len(new_x) - k]])
    # Correlated noise fills only the (exactly zero) padding; the digit itself stays clean.
    mask = new_x != 0
    corr = _gaussian_smooth(a["corr_noise_scale"] * rng.randn(len(new_x)), 2.0)
    new_x = mask * new_x + (1 - mask) * corr
    new_x = new_x + a["iid_noise_scale"] * rng.randn(len(new_x))
    coeff = a["shear_scale"] * (rng.rand() - 0.5)
    new_x = new_x - coeff * np.linspace(-0.5, 0.5, len(new_x))
    return _interpolate(new_x, a["final_seq_length"])


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All ``10 * per_class`` signals ``(N, 40, 1)`` float32 and labels, shuffled and standardized."""
    templates = mnist1d_templates()
    rng = np.random.RandomState(seed)
    xs, ys = [], []
    for label, template in enumerate(templates):
        for _ in range(per_class):
            xs.append(_mnist1d_transform(template, rng, _MNIST1D_ARGS))
            ys.append(label)
    order = rng.permutation(len(ys))
    x = np.stack(xs)[order]
    y = np.asarray(ys, np.int32)[order]
    x = (x - x.mean()) / x.std()
    x = x.astype(np.float32)[..., None]
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def mnist1d(num_samples: int = 5000, seed: int = 42, calib_fraction: float = 0.1) -> dict[str, Split]:
    """MNIST-1D, generated procedurally (Greydanus 2020, "Scaling down deep learning").

    A re-implementation of ``mnist1d.data.make_dataset`` with its default arguments, not a
    dependency on the package: the 10 hand-made 12-point templates are padded with 36..60 zeros,
    resampled to 72 points, scaled by ``1 ± 0.2``, circularly translated by up to 47 steps, the
    padding filled with Gaussian-smoothed noise (scale 0.25, sigma 2), iid noise (0.02) added to
    everything, sheared (±0.375 linear ramp) and resampled to 40 points; the whole set is then
    shuffled and standardized (global mean 0, std 1). Random numbers are drawn from
    ``np.random.RandomState(seed)`` in the package's order, so the signals match the package's
    ``make_dataset()`` (seed 42: its 4000/1000 train/test arrays) up to float rounding.

    The package's first 80 % (4000 of the default 5000) is its training set and the last 20 % its
    test set; we keep that test set and hold out the last ``calib_fraction`` of the training part
    as a disjoint calib split (default 3600 / 400 / 1000). The paper reports about 68 % test
    accuracy for an MLP and 94 % for a CNN when trained on all 4000.

    Args:
      num_samples: total number of signals (a multiple of 10 is used: ``num_samples // 10`` per
        class).
      seed: random seed (the package default is 42).
      calib_fraction: fraction of the package's training part held out as calib, in ``[0, 1)``.

    Returns:
      ``{"train", "calib", "test"}`` -> :class:`Split` with x ``(N, 40, 1)`` float32 and y ``(N,)``
      int32.

    Example:
        >>> ds = mnist1d()
        >>> ds["train"].x.shape, ds["test"].x.shape
        ((3600, 40, 1), (1000, 40, 1))
    """
    num_samples = _check_int("mnist1d: num_samples", num_samples, minimum=10)
    seed = _check_int("mnist1d: seed", seed, minimum=0)
    if not 0.0 <= float(calib_fraction) < 1.0:
        raise ValueError(f"mnist1d: calib_fraction must be in [0, 1), got {calib_fraction}")
    x, y = _mnist1d_arrays(num_samples // len(_MNIST1D_TEMPLATES), seed)
    # Copies: the generated arrays are memoized and callers may write into theirs.
    x, y = x.copy(), y.copy()
    n_pool = int(len(y) * _MNIST1D_ARGS["train_split"])
    n_calib = int(round(n_pool * float(calib_fraction)))
    cut = n_pool - n_calib
    return {
        "train": Split(x[:cut], y[:cut]),
        "calib": Split(x[cut:n_pool], y[cut:n_pool]),
        "test": Split(x[n_pool:], y[n_pool:]),
    }


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _raw_texts() -> list[str]:
    # The sources and the sentence filter live in obcjax.zoo.text (one home for offline text).
    from obcjax.zoo import text

    return [t for name in text.IN_DOMAIN for t in text.source_texts(name)]


def _sentences(t: str) -> Iterator[str]:
    from obcjax.zoo import text

    return text.split_sentences(t)


def text_corpus(seed: int = 0, per_split: int = 400) -> dict[str, list[str]]:
    """English sentences from text that ships with Python, split into calib and test.

    Sources, in a fixed order: the Zen of Python (``this``), the language-reference topics in
    ``pydoc_data.topics`` and the docstrings of ~80 standard-library modules and their public
    classes and functions. Paragraphs are cut into sentences; a sentence is kept if it has
    30..200 ASCII characters and at least 6 words, starts with a capital, ends with ``.``, ``!``
    or ``?``, and looks like prose (no code punctuation, at least 90 % letters and spaces).
    Duplicates are dropped (first occurrence kept), the rest is shuffled by ``seed`` and the
    first ``2 * per_split`` are dealt into two disjoint lists. Deterministic for a given Python
    installation (the text comes from it).

    Args:
      seed: seed of the shuffle.
      per_split: number of sentences per split (fewer if the installation has fewer).

    Returns:
      ``{"calib": [...], "test": [...]}``, disjoint lists of ``per_split`` sentences each.

    Example:
        >>> corpus = text_corpus()
        >>> len(corpus["calib"]), corpus["calib"][0][0].isupper()
        (400, True)
    """
    seed = _check_int("text_corpus: seed", seed, minimum=0)
    per_split = _check_int("text_corpus: per_split", per_split, minimum=1)
    unique = list(dict.fromkeys(s for text in _raw_texts() for s in _sentences(text)))
    if not unique:
        raise RuntimeError("text_corpus: no sentences found in this Python installation")
    order = np.random.default_rng(seed).permutation(len(unique))
    picked = [unique[i] for i in order[: 2 * per_split]]
    half = (len(picked) + 1) // 2 if len(picked) < 2 * per_split else per_split
    return {"calib": picked[:half], "test": picked[half:]}


# ---------------------------------------------------------------------------------------------
# Access
# ---------------------------------------------------------------------------------------------


def load_dataset(name: str, **kwargs) -> dict[str, Split]:
    """A classification data set by name.

    Args:
      name: ``"digits"`` (see :func:`digits`) or ``"mnist1d"`` (see :func:`mnist1d`).
      **kwargs: passed to the data set's function (e.g. ``seed``).

    Returns:
      ``{"train", "calib", "test"}`` -> :class:`Split`.

    Raises:
      ValueError: for an unknown name.

    Example:
        >>> load_dataset("mnist1d", num_samples=1000)["test"].x.shape
        (200, 40, 1)
    """
    if name == "digits":
        return digits(**kwargs)
    if name == "mnist1d":
        return mnist1d(**kwargs)
    raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")


def batches(
    split: Split, batch_size: int, *, seed: int | None = None, drop_last: bool = False
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Iterate over ``(x, y)`` numpy batches of a split.

    Args:
      split: the :class:`Split` (not modified).
      batch_size: examples per batch (the last one may be smaller unless ``drop_last``).
      seed: if given, the order is a permutation drawn from ``np.random.default_rng(seed)``;
        otherwise the split's own order.
      drop_last: drop a final batch smaller than ``batch_size``.

    Yields:
      ``x: (B, *input_shape)``, ``y: (B,)``.

    Example:
        >>> sizes = [len(y) for _, y in batches(digits()["calib"], 64)]
        >>> sizes
        [64, 64, 52]
    """
    batch_size = _check_int("batches: batch_size", batch_size, minimum=1)
    x, y = split
    if len(x) != len(y):
        raise ValueError(f"batches: split has {len(x)} inputs but {len(y)} labels")
    n = len(y)
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        idx = order[start : start + batch_size]
        yield x[idx], y[idx]


def fingerprint(ds: dict[str, Split]) -> str:
    """SHA-256 hex digest of a data set's splits (names, shapes, dtypes and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(ds):
        for arr in ds[key]:
            arr = np.ascontiguousarray(arr)
            h.update(f"{key}:{arr.dtype.str}:{arr.shape}".encode())
            h.update(arr.tobytes())
    return h.hexdigest()
