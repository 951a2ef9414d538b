"""Train, evaluate and cache the zoo models (optax, deterministic, CPU-sized).

* :func:`make_train_step` -- a jitted, pure step ``(params, batch_stats, opt_state, x, y) ->
  (params, batch_stats, opt_state, loss)`` for any Linen-style ``apply_fn`` and optax ``tx``;
  fine-tuning with frozen masks chains a masking transform in front of ``tx``.
* :func:`train` -- AdamW with a cosine learning-rate decay, one ``lax.scan`` per epoch,
  deterministic under its seed.
* :func:`evaluate` / :func:`evaluate_apply` -- accuracy and mean cross-entropy on a split.
* :func:`pretrained` -- a trained model from ``$OBCJAX_CACHE`` (default ``~/.cache/obcjax``), or
  trained on the spot and cached (flax msgpack, written atomically). The file records a SHA-256
  key of the training recipe and the data, and a checksum of the weights, so a stale or damaged
  file is retrained instead of trusted.

Example:
    >>> variables, info = pretrained("lenet5", "digits")
    >>> info["test_accuracy"] > 0.97, info["source"] in ("cache", "trained")
    (True, True)
    >>> evaluate("lenet5", variables, load_dataset("digits")["test"])["accuracy"] > 0.97
    True
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization

from obcjax.zoo import models as zoo_models
from obcjax.zoo.data import Split, fingerprint, load_dataset

__all__ = [
    "TrainConfig",
    "DEFAULT_CONFIGS",
    "cross_entropy",
    "make_train_step",
    "make_optimizer",
    "train",
    "evaluate",
    "evaluate_apply",
    "pretrained",
    "cache_dir",
    "cache_path",
]

_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training recipe (AdamW, cosine decay of the learning rate to 0 over all steps).

    Attributes:
      epochs: passes over the train split.
      batch_size: examples per step (the last partial batch of an epoch is dropped).
      lr: peak learning rate.
      weight_decay: AdamW decoupled weight decay.
      dataset_kwargs: keyword arguments of :func:`obcjax.zoo.data.load_dataset`, as pairs.
    """

    epochs: int
    batch_size: int
    lr: float
    weight_decay: float = 1e-4
    dataset_kwargs: tuple[tuple[str, Any], ...] = ()


# The recipes `pretrained` uses; each trains in seconds on 2 CPU cores.
DEFAULT_CONFIGS: dict[tuple[str, str], TrainConfig] = {
    ("mlp", "digits"): TrainConfig(epochs=30, batch_size=32, lr=1e-3),
    ("lenet5", "digits"): TrainConfig(epochs=40, batch_size=32, lr=3e-3),
    ("resnet", "digits"): TrainConfig(epochs=20, batch_size=32, lr=3e-3),
    ("mlp", "mnist1d"): TrainConfig(epochs=30, batch_size=64, lr=1e-3),
    ("cnn1d", "mnist1d"): TrainConfig(epochs=60, batch_size=64, lr=3e-3),
}


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean softmax cross-entropy of ``(N, C)`` logits against ``(N,)`` integer labels."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _raw_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    def loss_fn(params, batch_stats, x, y):
        logits, updates = apply_fn(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return cross_entropy(logits, y), updates.get("batch_stats", batch_stats)

    def step(params, batch_stats, opt_state, x, y):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch_stats, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), batch_stats, opt_state, loss

    return step


def make_train_step(apply_fn: Callable, tx: optax.GradientTransformation) -> Callable:
    """A jitted, pure training step with integer-label cross-entropy.

    Args:
      apply_fn: a Linen-style apply, ``apply_fn(variables, x, train=True,
        mutable=["batch_stats"]) -> (logits, updates)`` (e.g. ``module.apply``).
      tx: the optax transform; chain masking or projection transforms in front of the optimizer
        to fine-tune under frozen masks or codebooks (``tx.update`` receives the params).

    Returns:
      ``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``
      with ``x: (B, *input_shape)``, ``y: (B,)`` int. Inputs are not modified (no donation).

    Example:
        >>> module = zoo_models.linen_model("mlp")
        >>> v = zoo_models.init_variables("mlp", (8, 8, 1))
        >>> tx = optax.adam(1e-3)
        >>> step = make_train_step(module.apply, tx)
        >>> p, bs, s, loss = step(v["params"], v["batch_stats"], tx.init(v["params"]), x, y)
    """
    return jax.jit(_raw_step(apply_fn, tx))


def make_optimizer(lr: float, total_steps: int, weight_decay: float = 1e-4):
    """AdamW with the learning rate decayed from ``lr`` to 0 along a cosine over the steps."""
    schedule = optax.cosine_decay_schedule(lr, max(int(total_steps), 1))
    return optax.adamw(schedule, weight_decay=weight_decay)


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
        >>> evaluate_apply(lambda v, x: model(x), None, ds["test"])["accuracy"]
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
        >>> evaluate("lenet5", variables, load_dataset("digits")["test"])
        {'accuracy': 0.98..., 'loss': 0.05..., 'n': 539}
    """
    return evaluate_apply(
        functools.partial(zoo_models.apply, name), variables, split, batch_size=batch_size
    )


@functools.lru_cache(maxsize=16)
def _epoch_fn(name: str, classes: int, lr: float, total_steps: int, weight_decay: float):
    """The optimizer and a jitted epoch (a ``lax.scan`` of steps), cached per recipe.

    One scan per epoch instead of one dispatch per step: the steps are milliseconds on a CPU.
    The cache spares re-compiling (seconds) when the same recipe is trained again.
    """
    tx = make_optimizer(lr, total_steps, weight_decay)
    raw = _raw_step(zoo_models.linen_model(name, classes).apply, tx)

    @jax.jit
    def run_epoch(params, batch_stats, opt_state, xs, ys):
        def body(carry, batch):
            p, bs, s = carry
            p, bs, s, loss = raw(p, bs, s, *batch)
            return (p, bs, s), loss

        (params, batch_stats, opt_state), losses = jax.lax.scan(
            body, (params, batch_stats, opt_state), (xs, ys)
        )
        return params, batch_stats, opt_state, losses.mean()

    return tx, run_epoch


def train(
    name: str,
    dataset: str | Mapping[str, Split],
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    weight_decay: float = 1e-4,
    num_classes: int | None = None,
    variables: Mapping | None = None,
) -> tuple[dict, dict]:
    """Train a zoo model with AdamW and a cosine learning-rate decay.

    Each epoch shuffles the train split with ``np.random.default_rng(seed)``, drops the last
    partial batch and runs the steps in one jitted ``lax.scan``; the same seed gives the same
    parameters, bit for bit, on the same machine and software.

    Args:
      name: one of :data:`obcjax.zoo.models.MODEL_NAMES`.
      dataset: a data set name (loaded with its defaults) or ``{"train": Split, ...}``; a
        ``"calib"`` split, if present, is scored after every epoch.
      epochs: passes over the train split.
      batch_size: examples per step (at most the train size).
      lr: peak learning rate.
      seed: seeds the initialization and the shuffles.
      weight_decay: AdamW decoupled weight decay.
      num_classes: head width (default: ``max(label) + 1`` of the train split).
      variables: start from these variables instead of a fresh initialization (not modified).

    Returns:
      ``(variables, history)``: variables ``{"params", "batch_stats"}``, history
      ``{"loss": [per-epoch mean train loss], "calib_accuracy": [...], "seconds": float}``.

    Example:
        >>> variables, history = train("mlp", "digits", epochs=5, batch_size=32, lr=1e-3)
    """
    ds = _resolve_dataset(dataset)
    tr = _check_split(ds["train"], f"train({name!r}): train split")
    calib = _check_split(ds["calib"], f"train({name!r}): calib split") if "calib" in ds else None
    for arg, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"train({name!r}): {arg} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"train({name!r}): lr must be > 0, got {lr}")
    if batch_size > len(tr.y):
        raise ValueError(
            f"train({name!r}): batch_size {batch_size} exceeds the {len(tr.y)} training examples"
        )
    input_shape = tr.x.shape[1:]
    classes = int(num_classes) if num_classes is not None else int(tr.y.max()) + 1
    if variables is None:
        variables = zoo_models.init_variables(name, input_shape, num_classes=classes, seed=seed)
    params, batch_stats = variables["params"], variables.get("batch_stats", {})

    steps_per_epoch = len(tr.y) // batch_size
    tx, run_epoch = _epoch_fn(
        name, classes, float(lr), steps_per_epoch * int(epochs), float(weight_decay)
    )
    opt_state = tx.init(params)
    rng = np.random.default_rng(seed)
    history: dict[str, Any] = {"loss": [], "calib_accuracy": []}
    t0 = time.perf_counter()
    for _ in range(epochs):
        idx = rng.permutation(len(tr.y))[: steps_per_epoch * batch_size]
        xs = tr.x[idx].reshape(steps_per_epoch, batch_size, *input_shape)
        ys = tr.y[idx].reshape(steps_per_epoch, batch_size)
        params, batch_stats, opt_state, loss = run_epoch(
            params, batch_stats, opt_state, jnp.asarray(xs), jnp.asarray(ys)
        )
        history["loss"].append(float(loss))
        if calib is not None:
            v = {"params": params, "batch_stats": batch_stats}
            history["calib_accuracy"].append(evaluate(name, v, calib)["accuracy"])
    history["seconds"] = time.perf_counter() - t0
    return {"params": params, "batch_stats": batch_stats}, history


# ---------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """The zoo's cache directory: ``$OBCJAX_CACHE/zoo`` (default ``~/.cache/obcjax/zoo``)."""
    root = os.environ.get("OBCJAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "obcjax")
    return Path(root) / "zoo"


def cache_path(name: str, dataset_name: str, seed: int = 0) -> Path:
    """Where :func:`pretrained` keeps the checkpoint of one (model, data set, seed)."""
    return cache_dir() / f"{name}-{dataset_name}-seed{int(seed)}.msgpack"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _cache_key(name: str, dataset_name: str, seed: int, cfg: TrainConfig, data_hash: str) -> str:
    recipe = {
        "format": _FORMAT,
        "model": name,
        "dataset": dataset_name,
        "seed": int(seed),
        "config": dataclasses.asdict(cfg),
        "data": data_hash,
    }
    return _sha256(json.dumps(recipe, sort_keys=True, default=str).encode())


def _load_cached(path: Path, key: str, template: Any) -> tuple[dict, dict] | None:
    """The cached (variables, stored info) if the file is whole and matches ``key``, else None."""
    if not path.exists():
        return None
    try:
        record = serialization.msgpack_restore(path.read_bytes())
        if record.get("format") != _FORMAT or record.get("key") != key:
            warnings.warn(f"pretrained: {path} is stale (recipe changed); retraining", stacklevel=3)
            return None
        payload = record["payload"]
        if _sha256(payload) != record["sha256"]:
            raise ValueError("weights checksum mismatch")
        variables = zoo_models._plain(serialization.msgpack_restore(payload))
        variables.setdefault("batch_stats", {})
        shapes = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), variables)
        want = jax.tree.map(lambda a: (tuple(a.shape), str(a.dtype)), template)
        if shapes != want:
            raise ValueError("weights do not fit the model")
        info = json.loads(record["info"])
    except Exception as err:  # any damage to the file means: do not trust it
        warnings.warn(f"pretrained: {path} is corrupted ({err}); retraining", stacklevel=3)
        return None
    return jax.tree.map(jnp.asarray, variables), info


def _save_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def pretrained(name: str, dataset_name: str, *, seed: int = 0) -> tuple[dict, dict]:
    """A trained zoo model: from the cache, or trained deterministically and cached.

    The recipe is :data:`DEFAULT_CONFIGS` ``[(name, dataset_name)]``. The cache file
    (:func:`cache_path`) holds flax-msgpack weights, a SHA-256 checksum of them, and the SHA-256
    key of (recipe, seed, data fingerprint, format); a file whose key differs (stale) or that
    fails to parse, checksum or fit the model (corrupted) is retrained and replaced, with a
    warning. Files are written to a temporary file and moved into place with ``os.replace``.

    Args:
      name: model name, e.g. ``"lenet5"``.
      dataset_name: ``"digits"`` or ``"mnist1d"``.
      seed: training seed.

    Returns:
      ``(variables, info)``: variables ``{"params", "batch_stats"}``; info with ``test_accuracy``,
      ``test_loss``, ``calib_accuracy``, ``train_seconds``, ``num_params``, ``config``, ``key``,
      ``path`` and ``source`` (``"cache"`` or ``"trained"``).

    Raises:
      ValueError: for a (model, data set) pair without a recipe.

    Example:
        >>> variables, info = pretrained("cnn1d", "mnist1d")
        >>> round(info["test_accuracy"], 2)
    """
    cfg = DEFAULT_CONFIGS.get((name, dataset_name))
    if cfg is None:
        zoo_models._entry(name)
        known = ", ".join(f"{m}/{d}" for m, d in DEFAULT_CONFIGS)
        raise ValueError(
            f"pretrained: no training recipe for model {name!r} on dataset {dataset_name!r}; "
            f"known pairs: {known}"
        )
    ds = load_dataset(dataset_name, **dict(cfg.dataset_kwargs))
    key = _cache_key(name, dataset_name, seed, cfg, fingerprint(ds))
    path = cache_path(name, dataset_name, seed)
    input_shape = ds["train"].x.shape[1:]
    classes = int(ds["train"].y.max()) + 1
    template = jax.eval_shape(
        lambda: zoo_models.init_variables(name, input_shape, num_classes=classes, seed=seed)
    )

    cached = _load_cached(path, key, template)
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
        num_classes=classes,
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
        "key": key,
    }
    payload = serialization.msgpack_serialize(jax.tree.map(np.asarray, variables))
    record = {
        "format": _FORMAT,
        "key": key,
        "sha256": _sha256(payload),
        "info": json.dumps(info, default=str),
        "payload": payload,
    }
    try:
        _save_atomic(path, serialization.msgpack_serialize(record))
    except OSError as err:
        warnings.warn(f"pretrained: could not write the cache file {path}: {err}", stacklevel=2)
    return variables, {**info, "path": str(path), "source": "trained"}
