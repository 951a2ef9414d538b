"""Train, evaluate and cache the zoo models (optax, deterministic, CPU-sized).

* :func:`make_train_step` -- a jitted, pure step ``(params, batch_stats, opt_state, x, y) ->
  (params, batch_stats, opt_state, loss)`` for any Linen-style ``apply_fn`` and optax ``tx``;
  fine-tuning with frozen masks chains a masking transform in front of ``tx``.
* :func:`train` -- AdamW (decay on kernels only) with a linear warm-up and a cosine decay of the
  learning rate, label smoothing and random-shift augmentation; deterministic under its seed.
* :func:`evaluate` / :func:`evaluate_apply` -- accuracy and mean cross-entropy on a split.
* :func:`pretrained` -- a trained model from ``$OBCJAX_CACHE`` (default ``~/.cache/obcjax``), or
  trained on the spot and cached (flax msgpack, written with :func:`obcjax.fileio.atomic_write`:
  a crash leaves the old file or the new one, never half of one). The file records a SHA-256
  key of the training recipe, the trainer version and the data, and checksums of the weights and
  of the recorded info, so a stale or damaged file is retrained (with a
  :class:`ZooCacheWarning`) instead of trusted: a damaged cache never loads as another model.

Recipes (:data:`DEFAULT_CONFIGS`) and what they reach, seed 0 (test split; seeds 0-4 varied by
about ±0.5 points on digits and ±1 point on MNIST-1D):

==========  ========  ========  ============================================
model       data set  test acc  recipe
==========  ========  ========  ============================================
mlp         digits    ~99.3 %   60 epochs, batch 64, lr 2e-3
lenet5      digits    ~99.1 %   80 epochs, batch 64, lr 5e-3
resnet      digits    ~99.3 %   15 epochs, batch 64, lr 5e-3
mlp         mnist1d   ~79 %     80 epochs, batch 128, lr 2e-3, shifts ±3
cnn1d       mnist1d   ~96.5 %   80 epochs, batch 128, lr 5e-3, shifts ±2
==========  ========  ========  ============================================

All with label smoothing 0.1, weight decay 0.05 and a few warm-up epochs. Random shifts hurt on
the 8x8 digits (a pixel is an eighth of the image; LeNet-5 lost about 2 points) but help a lot
on MNIST-1D, whose generator itself translates the signals.

Example:
    >>> variables, history = train("mlp", "digits", epochs=5, batch_size=32, lr=1e-3)
    >>> evaluate("mlp", variables, load_dataset("digits")["test"])["accuracy"] > 0.8
    True
    >>> # a recipe of the table: trained once (a minute or two), then read from the cache
    >>> variables, info = pretrained("lenet5", "digits")  # doctest: +SKIP
    >>> info["test_accuracy"] > 0.97, info["source"] in ("cache", "trained")  # doctest: +SKIP
    (True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from obcjax.fileio import atomic_write
from obcjax.zoo import models as zoo_models
from obcjax.zoo.data import Split, fingerprint, load_dataset

__all__ = [
    "TrainConfig",
    "DEFAULT_CONFIGS",
    "ZooCacheWarning",
    "cross_entropy",
    "make_train_step",
    "make_optimizer",
    "shift_examples",
    "train",
    "evaluate",
    "evaluate_apply",
    "pretrained",
    "cache_dir",
    "cache_path",
]

# Layout of a cache file; bump when the record's fields change.
_FORMAT = 1
# Version of the training procedure (step, optimizer, shuffling, augmentation); part of every
# cache key, so bump it whenever a change would give different weights for the same recipe.
_TRAINER_VERSION = 2


class ZooCacheWarning(UserWarning):
    """A cached zoo checkpoint was stale, damaged or could not be written; it is retrained."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe: AdamW, linear warm-up then cosine decay to 0, optional augmentation.

    Attributes:
      epochs: passes over the train split.
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      lr: peak learning rate.
      weight_decay: AdamW decoupled weight decay, applied to kernels only (not to biases or
        BatchNorm scales).
      warmup_epochs: epochs of linear warm-up from 0 to ``lr`` before the cosine decay.
      label_smoothing: weight of the uniform distribution mixed into the one-hot targets.
      max_shift: random translation of every training example by up to this many steps along
        each spatial axis (pixels of an image, samples of a signal), filled with zeros; a fresh
        shift per example and epoch. 0 disables it.
      dataset_kwargs: keyword arguments of :func:`obcjax.zoo.data.load_dataset`, as pairs.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    max_shift: int = 0
    dataset_kwargs: tuple[tuple[str, Any], ...] = ()


# The recipes `pretrained` uses, chosen on the calib split (mean over seeds 0-4); each trains in
# a few seconds on 2 CPU cores after a few seconds of compilation.
_SMOOTH, _DECAY = 0.1, 5e-2
DEFAULT_CONFIGS: dict[tuple[str, str], TrainConfig] = {
    ("mlp", "digits"): TrainConfig(
        epochs=60, batch_size=64, lr=2e-3, weight_decay=_DECAY, warmup_epochs=3,
        label_smoothing=_SMOOTH,
    ),
    ("lenet5", "digits"): TrainConfig(
        epochs=80, batch_size=64, lr=5e-3, weight_decay=_DECAY, warmup_epochs=4,
        label_smoothing=_SMOOTH,
    ),
    ("resnet", "digits"): TrainConfig(
        epochs=15, batch_size=64, lr=5e-3, weight_decay=_DECAY, warmup_epochs=1,
        label_smoothing=_SMOOTH,
    ),
    ("mlp", "mnist1d"): TrainConfig(
        epochs=80, batch_size=128, lr=2e-3, weight_decay=_DECAY, warmup_epochs=3,
        label_smoothing=_SMOOTH, max_shift=3,
    ),
    ("cnn1d", "mnist1d"): TrainConfig(
        epochs=80, batch_size=128, lr=5e-3, weight_decay=_DECAY, warmup_epochs=3,
        label_smoothing=_SMOOTH, max_shift=2,
    ),
}  # fmt: skip


def cross_entropy(
    logits: jax.Array, labels: jax.Array, *, label_smoothing: float = 0.0
) -> jax.Array:
    """Mean softmax cross-entropy of ``(N, C)`` logits against ``(N,)`` integer labels.

    With ``label_smoothing = a`` the target is ``(1 - a) * one_hot + a / C``.
    """
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def _raw_step(
    apply_fn: Callable, tx: optax.GradientTransformation, label_smoothing: float = 0.0
) -> Callable:
    def loss_fn(params, batch_stats, x, y):
        logits, updates = apply_fn(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = cross_entropy(logits, y, label_smoothing=label_smoothing)
        return loss, updates.get("batch_stats", batch_stats)

    def step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def make_train_step(
    apply_fn: Callable, tx: optax.GradientTransformation, *, label_smoothing: float = 0.0
) -> Callable:
    """A jitted, pure training step with integer-label cross-entropy.

    Args:
      apply_fn: a Linen-style apply, ``apply_fn(variables, x, train=True,
        mutable=["batch_stats"]) -> (logits, updates)`` (e.g. ``module.apply``).
      tx: the optax transform; chain masking or projection transforms in front of the optimizer
        to fine-tune under frozen masks or codebooks (``tx.update`` receives the params).
      label_smoothing: see :func:`cross_entropy`.

    Returns:
      ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``
      with ``x: (B, *input_shape)``, ``y: (B,)`` int. Inputs are not modified (no donation).

    Example:
        >>> module = zoo_models.linen_model("mlp")
        >>> v = zoo_models.init_variables("mlp", (8, 8, 1))
        >>> tx = optax.adam(1e-3)
        >>> step = make_train_step(module.apply, tx)
        >>> x, y = np.zeros((4, 8, 8, 1), np.float32), np.arange(4, dtype=np.int32)
        >>> p, bs, s, loss = step(v["params"], v["batch_stats"], tx.init(v["params"]), x, y)
        >>> bool(loss > 0)
        True
    """
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(
            f"make_train_step: label_smoothing must be in [0, 1), got {label_smoothing}"
        )
    return jax.jit(_raw_step(apply_fn, tx, float(label_smoothing)))


def _decay_mask(params):
    # Biases and BatchNorm scales do not set the capacity that weight decay is meant to limit;
    # decaying them only pulls the fit off (the usual practice since ResNet training recipes).
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(
    lr: float, total_steps: int, weight_decay: float = 1e-4, *, warmup_steps: int = 0
) -> optax.GradientTransformation:
    """AdamW: the learning rate rises linearly from 0 to ``lr`` over ``warmup_steps``, then decays
    to 0 along a cosine over the remaining steps; weight decay applies to kernels (ndim > 1) only.

    Example:
        >>> tx = make_optimizer(3e-3, total_steps=1000, warmup_steps=100)
        >>> state = tx.init({"kernel": np.ones((2, 2), np.float32), "bias": np.zeros(2, np.float32)})
    """
    total = max(int(total_steps), 1)
    warmup = min(max(int(warmup_steps), 0), total - 1)
    if warmup:
        schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, total)
    else:
        schedule = optax.cosine_decay_schedule(lr, total)
    return optax.adamw(schedule, weight_decay=weight_decay, mask=_decay_mask)


def shift_examples(x: np.ndarray, max_shift: int, rng: np.random.Generator) -> np.ndarray:
    """Translate every example by a random offset in ``[-max_shift, max_shift]`` per spatial axis.

    Vacated positions are filled with zeros: the background of the digits, the mean of the
    standardized MNIST-1D signals. Spatial axes are all axes but the batch and the last (channel)
    axis.

    Args:
      x: ``(N, *spatial, C)`` examples (not modified).
      max_shift: largest offset, ``>= 0``.
      rng: the source of the offsets (advanced by ``N * len(spatial)`` draws).

    Returns:
      A new array like ``x``.

    Example:
        >>> shift_examples(np.ones((4, 8, 8, 1)), 1, np.random.default_rng(0)).shape
        (4, 8, 8, 1)
    """
    x = np.asarray(x)
    if x.ndim < 3:
        raise ValueError(f"shift_examples: x must be (N, *spatial, C), got shape {x.shape}")
    if max_shift <= 0:
        return x.copy()
    n, spatial = x.shape[0], x.shape[1:-1]
    offsets = rng.integers(-max_shift, max_shift + 1, size=(len(spatial), n))
    pad = [(0, 0)] + [(max_shift, max_shift)] * len(spatial) + [(0, 0)]
    padded = np.pad(x, pad)
    # One gather: example i reads rows [max_shift - o_i, max_shift - o_i + size) on each axis.
    index: list[np.ndarray] = [np.arange(n).reshape((n,) + (1,) * len(spatial))]
    for axis, size in enumerate(spatial):
        shape = [n] + [1] * len(spatial)
        shape[axis + 1] = size
        start = (max_shift - offsets[axis]).reshape(n, 1)
        index.append((start + np.arange(size)).reshape(shape))
    return padded[tuple(index)]


def _check_split(split, where: str) -> Split:
    if not (isinstance(split, tuple) and len(split) == 2):
        raise TypeError(f"{where}: expected a Split(x, y), got {type(split).__name__}")
    x, y = (np.asarray(a) for a in split)
    if len(x) != len(y) or y.ndim != 1:
        raise ValueError(f"{where}: x has {len(x)} examples and y shape {y.shape}; need (N,) y")
    if len(y) == 0:
        raise ValueError(f"{where}: the split is empty")
    return Split(x.astype(np.float32, copy=False), y.astype(np.int32, copy=False))


def _resolve_dataset(dataset, dataset_kwargs=None) -> dict[str, Split]:
    if isinstance(dataset, str):
        return load_dataset(dataset, **(dataset_kwargs or {}))
    if isinstance(dataset, Mapping) and "train" in dataset:
        return dict(dataset)
    raise TypeError(
        "dataset must be a data set name ('digits', 'mnist1d') or a dict of Splits with a "
        f"'train' key, got {type(dataset).__name__}"
    )


def evaluate_apply(
    apply_fn: Callable, variables: Any, split: Split, *, batch_size: int = 512
) -> dict[str, float]:
    """Accuracy and mean cross-entropy of any ``apply_fn(variables, x) -> logits`` on a split.

    Batches are padded to one fixed size so a jitted ``apply_fn`` compiles once.

    Args:
      apply_fn: ``(variables, x: (B, *input_shape)) -> (B, C)`` logits (e.g. a jitted Linen
        apply, or ``lambda _, x: nnx_model(x)``).
      variables: passed through to ``apply_fn``.
      split: the :class:`Split` to score.
      batch_size: examples per call.

    Returns:
      ``{"accuracy": float in [0, 1], "loss": float, "n": int}``.

    Example:
        >>> from flax import nnx
        >>> model = zoo_models.nnx_model("mlp", input_shape=(8, 8, 1), rngs=nnx.Rngs(0))
        >>> res = evaluate_apply(lambda v, x: model(x), None, load_dataset("digits")["test"])
        >>> res["n"], 0.0 <= res["accuracy"] <= 1.0
        (539, True)
    """
    x, y = _check_split(split, "evaluate")
    if batch_size < 1:
        raise ValueError(f"evaluate: batch_size must be >= 1, got {batch_size}")
    n = len(y)
    bsz = min(int(batch_size), n)
    correct, loss_sum = 0, 0.0
    for start in range(0, n, bsz):
        xb, yb = x[start : start + bsz], y[start : start + bsz]
        m = len(yb)
        if m < bsz:
            xb = np.concatenate([xb, np.zeros((bsz - m, *xb.shape[1:]), xb.dtype)])
        logits = np.asarray(apply_fn(variables, jnp.asarray(xb)), np.float64)[:m]
        if logits.ndim != 2 or logits.shape[0] != m:
            raise ValueError(f"evaluate: apply_fn returned shape {logits.shape}, need (B, C)")
        shifted = logits - logits.max(axis=1, keepdims=True)
        logz = np.log(np.exp(shifted).sum(axis=1))
        loss_sum += float((logz - shifted[np.arange(m), yb]).sum())
        correct += int((logits.argmax(axis=1) == yb).sum())
    return {"accuracy": correct / n, "loss": loss_sum / n, "n": n}


def evaluate(name: str, variables: Mapping, split: Split, *, batch_size: int = 512) -> dict:
    """Accuracy and mean cross-entropy of a zoo model (eval mode) on a split.

    Example:
        >>> variables = zoo_models.init_variables("lenet5", (8, 8, 1))   # untrained
        >>> res = evaluate("lenet5", variables, load_dataset("digits")["test"])
        >>> sorted(res), res["n"]
        (['accuracy', 'loss', 'n'], 539)
    """
    return evaluate_apply(
        functools.partial(zoo_models.apply, name), variables, split, batch_size=batch_size
    )


@functools.lru_cache(maxsize=16)
def _step_fn(
    name: str,
    classes: int,
    lr: float,
    total_steps: int,
    weight_decay: float,
    warmup_steps: int,
    label_smoothing: float,
):
    """The optimizer and its jitted training step, cached per recipe.

    The cache spares re-compiling (seconds) when the same recipe is trained again. Steps are
    dispatched one by one from Python rather than scanned: XLA:CPU runs the convolutions of a
    ``lax.scan`` body several times slower than the same step jitted alone (measured: a ResNet
    epoch on digits 2.1 s of CPU scanned vs 0.4 s looped).
    """
    tx = make_optimizer(lr, total_steps, weight_decay, warmup_steps=warmup_steps)
    raw = _raw_step(zoo_models.linen_model(name, classes).apply, tx, label_smoothing)
    return tx, jax.jit(raw)


def train(
    name: str,
    dataset: str | Mapping[str, Split],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 1e-4,
    warmup_epochs: int = 0,
    label_smoothing: float = 0.0,
    max_shift: int = 0,
    num_classes: int | None = None,
    variables: Mapping | None = None,
    eval_every: int = 1,
) -> tuple[dict, dict]:
    """Train a zoo model with AdamW, a warm-up + cosine learning rate and optional shifts.

    Each epoch shuffles the train split with ``np.random.default_rng(seed)``, optionally shifts
    every example (:func:`shift_examples`, same generator), drops the last partial batch and runs
    the steps in one jitted ``lax.scan``; the same seed gives the same parameters, bit for bit,
    on the same machine, software and XLA flags.

    Args:
      name: one of :data:`obcjax.zoo.models.MODEL_NAMES`.
      dataset: a data set name (loaded with its defaults) or ``{"train": Split, ...}``; a
        ``"calib"`` split, if present, is scored every ``eval_every`` epochs and after the last.
      epochs: passes over the train split.
      batch_size: examples per step (at most the train size).
      lr: peak learning rate.
      seed: seeds the initialization, the shuffles and the shifts.
      weight_decay: AdamW decoupled weight decay (kernels only).
      warmup_epochs: epochs of linear learning-rate warm-up (fewer than ``epochs``).
      label_smoothing: in ``[0, 1)``; see :func:`cross_entropy`.
      max_shift: random translation augmentation (``0``: none); see :func:`shift_examples`.
      num_classes: head width (default: ``max(label) + 1`` of the train split).
      variables: start from these variables instead of a fresh initialization (not modified).
      eval_every: score the calib split every this many epochs (``0``: only after the last).

    Returns:
      ``(variables, history)``: variables ``{"params", "batch_stats"}``, history
      ``{"loss": [per-epoch mean train loss (label-smoothed if smoothing)], "calib_accuracy":
      [...], "seconds": float}`` (``seconds``: the training loop, compilation included).

    Example:
        >>> variables, history = train("mlp", "digits", epochs=5, batch_size=32, lr=1e-3)
        >>> len(history["loss"]), history["loss"][-1] < history["loss"][0]
        (5, True)
    """
    ds = _resolve_dataset(dataset)
    tr = _check_split(ds["train"], f"train({name!r}): train split")
    calib = _check_split(ds["calib"], f"train({name!r}): calib split") if "calib" in ds else None
    for arg, value, lo in (
        ("epochs", epochs, 1),
        ("batch_size", batch_size, 1),
        ("warmup_epochs", warmup_epochs, 0),
        ("max_shift", max_shift, 0),
        ("eval_every", eval_every, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
            raise ValueError(f"train({name!r}): {arg} must be an int >= {lo}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"train({name!r}): lr must be > 0, got {lr}")
    if warmup_epochs >= epochs:
        raise ValueError(
            f"train({name!r}): warmup_epochs ({warmup_epochs}) must be fewer than epochs ({epochs})"
        )
    if not 0.0 <= float(label_smoothing) < 1.0:
        raise ValueError(
            f"train({name!r}): label_smoothing must be in [0, 1), got {label_smoothing}"
        )
    if batch_size > len(tr.y):
        raise ValueError(
            f"train({name!r}): batch_size {batch_size} exceeds the {len(tr.y)} training examples"
        )
    input_shape = tr.x.shape[1:]
    if max_shift and len(input_shape) < 2:
        raise ValueError(
            f"train({name!r}): max_shift needs examples with a spatial and a channel axis, "
            f"got input shape {input_shape}"
        )
    classes = int(num_classes) if num_classes is not None else int(tr.y.max()) + 1
    if variables is None:
        variables = zoo_models.init_variables(name, input_shape, num_classes=classes, seed=seed)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    steps_per_epoch = len(tr.y) // batch_size
    tx, step = _step_fn(
        name,
        classes,
        float(lr),
        steps_per_epoch * int(epochs),
        float(weight_decay),
        steps_per_epoch * int(warmup_epochs),
        float(label_smoothing),
    )
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    history: dict[str, Any] = {"loss": [], "calib_accuracy": []}
    t0 = time.perf_counter()
    for epoch in range(epochs):
        idx = rng.permutation(len(tr.y))[: steps_per_epoch * batch_size]
        x = shift_examples(tr.x[idx], max_shift, rng) if max_shift else tr.x[idx]
        xs = x.reshape(steps_per_epoch, batch_size, *input_shape)
        ys = tr.y[idx].reshape(steps_per_epoch, batch_size)
        losses = []
        for i in range(steps_per_epoch):
            params, batch_stats, opt_state, loss = step(
                params, batch_stats, opt_state, xs[i], ys[i]
            )
            losses.append(loss)
        loss = jnp.stack(losses).mean()
        history["loss"].append(float(loss))
        last = epoch == epochs - 1
        if calib is not None and (last or (eval_every and (epoch + 1) % eval_every == 0)):
            v = {"params": params, "batch_stats": batch_stats}
            history["calib_accuracy"].append(evaluate(name, v, calib)["accuracy"])
    history["seconds"] = time.perf_counter() - t0
    return {"params": params, "batch_stats": batch_stats}, history


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The zoo's cache directory: ``$OBCJAX_CACHE/zoo`` (default ``~/.cache/obcjax/zoo``)."""
    root = os.environ.get("OBCJAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "obcjax"
    )
    return Path(root) / "zoo"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _config_json(cfg: TrainConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str)


def cache_path(
    name: str, dataset_name: str, seed: int = 0, *, config: TrainConfig | None = None
) -> Path:
    """Where :func:`pretrained` keeps the checkpoint of one (model, data set, seed, recipe).

    The default recipe of a pair lives in ``{name}-{dataset_name}-seed{seed}.msgpack``; any other
    recipe gets a 12-hex-digit digest of its fields appended, so custom recipes never overwrite
    the default checkpoint.

    Example:
        >>> cache_path("lenet5", "digits").name
        'lenet5-digits-seed0.msgpack'
    """
    stem = f"{name}-{dataset_name}-seed{int(seed)}"
    if config is not None and config != DEFAULT_CONFIGS.get((name, dataset_name)):
        stem += "-" + _sha256(_config_json(config).encode())[:12]
    return cache_dir() / f"{stem}.msgpack"


def _cache_key(name: str, dataset_name: str, seed: int, cfg: TrainConfig, data_hash: str) -> str:
    recipe = {
        "format": _FORMAT,
        "trainer": _TRAINER_VERSION,
        "model": name,
        "dataset": dataset_name,
        "seed": int(seed),
        "config": json.loads(_config_json(cfg)),
        "data": data_hash,
    }
    return _sha256(json.dumps(recipe, sort_keys=True, default=str).encode())


def _load_cached(path: Path, key: str, template: Any, what: str) -> tuple[dict, dict] | None:
    """The cached (variables, stored info) if the file is whole and matches ``key``, else None."""
    if not path.exists():
        return None
    try:
        record = serialization.msgpack_restore(path.read_bytes())
        if not isinstance(record, Mapping):
            raise ValueError(f"not a checkpoint record (got {type(record).__name__})")
        if record.get("format") != _FORMAT or record.get("key") != key:
            warnings.warn(
                f"pretrained: the cache file {path} is stale (made by another recipe, trainer "
                f"version or data set); retraining {what} and replacing it",
                ZooCacheWarning,
                stacklevel=3,
            )
            return None
        payload = record["payload"]
        if not isinstance(payload, bytes) or _sha256(payload) != record["sha256"]:
            raise ValueError("weights checksum mismatch")
        # files written before the info checksum have none: their weights are still verified
        if "info_sha256" in record and _sha256(record["info"].encode()) != record["info_sha256"]:
            raise ValueError("info checksum mismatch")
        variables = zoo_models._plain(serialization.msgpack_restore(payload))
        variables.setdefault("batch_stats", {})
        shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables)
        want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), template)
        if shapes != want:
            raise ValueError("weights do not fit the model")
        info = json.loads(record["info"])
    except Exception as err:  # any damage to the file means: do not trust it
        warnings.warn(
            f"pretrained: the cache file {path} is corrupted ({type(err).__name__}: {err}); "
            f"retraining {what} and replacing it",
            ZooCacheWarning,
            stacklevel=3,
        )
        return None
    return jax.tree.map(jnp.asarray, variables), info


def _save_atomic(path: Path, data: bytes) -> None:
    """Write a cache file through :func:`obcjax.fileio.atomic_write` (a temporary file, fsync,
    ``os.replace``; temporary files of killed writers are removed on the next write)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data, what="zoo cache file")


def _record_bytes(variables: Any, key: str, info: Mapping[str, Any]) -> bytes:
    """The cache file of ``variables``: the msgpack of a record whose weights (``payload``) and
    ``info`` each carry a SHA-256 that :func:`_load_cached` verifies."""
    payload = serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    info_text = json.dumps(info, default=str)
    record = {
        "format": _FORMAT,
        "key": key,
        "sha256": _sha256(payload),
        "info": info_text,
        "info_sha256": _sha256(info_text.encode()),
        "payload": payload,
    }
    return serialization.msgpack_serialize(record)


def pretrained(
    name: str, dataset_name: str, *, seed: int = 0, config: TrainConfig | None = None
) -> tuple[dict, dict]:
    """A trained zoo model: from the cache, or trained deterministically and cached.

    The recipe is ``config`` or else :data:`DEFAULT_CONFIGS` ``[(name, dataset_name)]``. The
    cache file (:func:`cache_path`) holds flax-msgpack weights, a SHA-256 checksum of them, and
    the SHA-256 key of (recipe, seed, trainer version, data fingerprint, format); a file whose key
    differs (stale) or that fails to parse, checksum or fit the model (corrupted) is retrained
    and replaced, with a :class:`ZooCacheWarning`. Files are written with
    :func:`obcjax.fileio.atomic_write` (a temporary file moved into place with ``os.replace``), so
    neither a crash nor a concurrent caller ever sees half a file.

    Args:
      name: model name, e.g. ``"lenet5"``.
      dataset_name: ``"digits"`` or ``"mnist1d"``.
      seed: training seed.
      config: a custom :class:`TrainConfig` (cached in its own file); default: the pair's
        recipe in :data:`DEFAULT_CONFIGS`.

    Returns:
      ``(variables, info)``: variables ``{"params", "batch_stats"}``; info with ``test_accuracy``,
      ``test_loss``, ``calib_accuracy``, ``train_seconds``, ``num_params``, ``config``,
      ``versions``, ``key``, ``path`` and ``source`` (``"cache"`` or ``"trained"``).

    Raises:
      ValueError: for an unknown model or data set, or a pair without a recipe and no
        ``config``.
      TypeError: if ``config`` is not a :class:`TrainConfig`.

    Example:
        >>> variables, info = pretrained("cnn1d", "mnist1d")  # doctest: +SKIP
        >>> info["source"], info["test_accuracy"] > 0.9  # doctest: +SKIP
        ('trained', True)
    """
    zoo_models._entry(name)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"pretrained: seed must be an int >= 0, got {seed!r}")
    if config is None:
        cfg = DEFAULT_CONFIGS.get((name, dataset_name))
        if cfg is None:
            known = ", ".join(f"{m}/{d}" for m, d in DEFAULT_CONFIGS)
            raise ValueError(
                f"pretrained: no training recipe for model {name!r} on dataset {dataset_name!r}; "
                f"known pairs: {known} (or pass config=TrainConfig(...))"
            )
    elif isinstance(config, TrainConfig):
        cfg = config
    else:
        raise TypeError(f"pretrained: config must be a TrainConfig, got {type(config).__name__}")
    ds = load_dataset(dataset_name, **dict(cfg.dataset_kwargs))
    key = _cache_key(name, dataset_name, seed, cfg, fingerprint(ds))
    path = cache_path(name, dataset_name, seed, config=cfg)
    input_shape = ds["train"].x.shape[1:]
    classes = int(ds["train"].y.max()) + 1
    template = jax.eval_shape(
        lambda: zoo_models.init_variables(name, input_shape, num_classes=classes, seed=seed)
    )

    what = f"{name} on {dataset_name} (seed {seed})"
    cached = _load_cached(path, key, template, what)
    if cached is not None:
        variables, info = cached
        return variables, {**info, "path": str(path), "source": "cache"}

    variables, history = train(
        name,
        ds,
        epochs=cfg.epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        seed=seed,
        weight_decay=cfg.weight_decay,
        warmup_epochs=cfg.warmup_epochs,
        label_smoothing=cfg.label_smoothing,
        max_shift=cfg.max_shift,
        num_classes=classes,
        eval_every=0,
    )
    test = evaluate(name, variables, ds["test"])
    calib = evaluate(name, variables, ds["calib"])
    info = {
        "model": name,
        "dataset": dataset_name,
        "seed": int(seed),
        "config": dataclasses.asdict(cfg),
        "test_accuracy": test["accuracy"],
        "test_loss": test["loss"],
        "calib_accuracy": calib["accuracy"],
        "train_seconds": history["seconds"],
        "num_params": zoo_models.count_params(variables["params"]),
        "trainer_version": _TRAINER_VERSION,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__},
        "key": key,
    }
    try:
        _save_atomic(path, _record_bytes(variables, key, info))
    except OSError as err:
        warnings.warn(
            f"pretrained: could not write the cache file {path}: {err}",
            ZooCacheWarning,
            stacklevel=2,
        )
    return variables, {**info, "path": str(path), "source": "trained"}
