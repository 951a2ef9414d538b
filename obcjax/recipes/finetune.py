"""Fine-tuning recipes bound to the bundled zoo's models (Linen classifiers by name).

The library's :func:`obcjax.training.finetune` and :func:`obcjax.fit.finetune_plan` take what a
user has -- a loss function, params, batches. These drivers build those from a zoo model name, a
zoo variables dict and a zoo data split:

* :func:`zoo_example_loss` -- the per-example cross-entropy of a zoo model in eval mode, the
  ``loss_fn`` of :func:`obcjax.fit.fisher_diagonal`.
* :func:`zoo_batch_loss` -- the training-mode batch loss ``loss(params, batch_stats, (x, y))``
  with the batch statistics threaded through, the ``loss_fn`` of ``finetune`` /
  ``progressive_admm`` with ``model_state``.
* :func:`zoo_finetune` -- OPQ's fine-tuning with masks and codebooks frozen, on a zoo model
  (AdamW, cosine decay; batches drawn without replacement, reshuffled each epoch).
* :func:`zoo_finetune_plan` -- FITCompress's final fine-tuning of a compressed zoo model.

Example:
    >>> import jax.numpy as jnp
    >>> from obcjax import zoo
    >>> from obcjax.training import Codebook
    >>> variables = zoo.init_variables("lenet5", (8, 8, 1))
    >>> k = variables["params"]["fc3"]["kernel"]
    >>> masks = {"fc3": {"kernel": jnp.abs(k) > 0.05}}       # usually Compressed.masks and
    >>> cbs = {"fc3": Codebook(jnp.abs(k).max() / 7, jnp.array(8.0), 4)}  # codebooks_from_qarrays
    >>> v, info = zoo_finetune("lenet5", variables, masks, cbs, zoo.digits(), steps=3)
    >>> len(info["losses"]), bool(jnp.all(v["params"]["fc3"]["kernel"][~masks["fc3"]["kernel"]] == 0))
    (3, True)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from obcjax import fit, training
from obcjax.zoo import data as zoo_data
from obcjax.zoo import models as zoo_models
from obcjax.zoo import train as zoo_train

__all__ = [
    "zoo_example_loss",
    "zoo_batch_loss",
    "zoo_batches",
    "zoo_finetune",
    "zoo_finetune_plan",
]


def zoo_example_loss(name: str, variables: Mapping[str, Any]) -> Callable:
    """Per-example cross-entropy ``loss(params, x, y)`` of a zoo model in eval mode.

    Each call returns a new function (the jit cache of :func:`obcjax.fit.fisher_diagonal` is keyed
    by it): build it once and reuse it.

    Example:
      >>> from obcjax import zoo
      >>> v = zoo.init_variables("lenet5", (8, 8, 1))
      >>> x, y = next(zoo.batches(zoo.digits()["calib"], 4))
      >>> float(zoo_example_loss("lenet5", v)(v["params"], x[0], y[0])) > 0
      True
    """
    module = zoo_models.linen_model(name, zoo_models.num_classes_of(name, variables))
    bs = variables.get("batch_stats", {})

    def loss(params, x, y):
        logits = module.apply({"params": params, "batch_stats": bs}, x[None], train=False)[0]
        return -jax.nn.log_softmax(logits)[y]

    return loss


def zoo_batch_loss(name: str, variables: Mapping[str, Any]) -> Callable:
    """Training-mode batch cross-entropy ``loss(params, batch_stats, (x, y)) -> (loss, stats)``.

    The ``loss_fn`` of :func:`obcjax.training.finetune` and
    :func:`obcjax.admm.progressive_admm` with ``model_state=variables["batch_stats"]``.
    """
    module = zoo_models.linen_model(name, zoo_models.num_classes_of(name, variables))

    def loss(params, batch_stats, batch):
        x, y = batch
        logits, upd = module.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        return zoo_train.cross_entropy(logits, y), upd.get("batch_stats", batch_stats)

    return loss


def zoo_batches(split, batch_size: int, seed: int = 0) -> Callable[[int], Any]:
    """``epoch -> batches`` of a split: full batches, reshuffled every epoch (seeded).

    Raises:
      ValueError: ``batch_size`` exceeds the split (no full batch).
    """
    n = len(split.y)
    if batch_size > n:
        raise ValueError(f"zoo_batches: batch_size {batch_size} exceeds the split ({n} examples)")

    def epoch(e: int):
        return zoo_data.batches(split, batch_size, seed=seed * 1000 + e, drop_last=True)

    return epoch


def _train_split(data, what: str):
    if isinstance(data, Mapping):
        if "train" not in data:
            raise ValueError(f"{what}: data must be a Split or a dict with a 'train' split")
        data = data["train"]
    x, y = data
    if len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what}: data has {len(x)} inputs and {len(y)} labels")
    return zoo_data.Split(np.asarray(x), np.asarray(y))


def zoo_finetune(
    name: str,
    variables: Mapping[str, Any],
    masks,
    codebooks: Mapping[str, training.Codebook],
    data,
    steps: int,
    *,
    lr: float = 1e-3,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    seed: int = 0,
):
    """Fine-tune a zoo model's float weights with masks and codebooks frozen (OPQ §3.4).

    Args:
      name: zoo model name (``obcjax.zoo.models``), e.g. ``"lenet5"``.
      variables: ``{"params", "batch_stats"}``; the params are the starting shadow weights
        (typically the compressed ones: then step 0 reproduces the compressed model exactly).
      masks: params-shaped mask tree or ``{layer path: kernel mask}`` (e.g. ``Compressed.masks``;
        converted by :func:`obcjax.training.mask_tree`).
      codebooks: ``{layer path: Codebook}`` (e.g. :func:`obcjax.training.codebooks_from_qarrays`).
      data: a ``Split`` ``(x, y)`` or a dict with a ``"train"`` split.
      steps: optimizer steps (batches drawn without replacement, reshuffled each epoch).
      lr: AdamW peak learning rate, cosine-decayed to 0. weight_decay: on kernels only.

    Returns:
      ``(variables, info)``: variables with the exported on-grid params and the updated batch
      statistics; ``info`` as :func:`obcjax.training.finetune`'s.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"zoo_finetune: steps must be a non-negative int, got {steps!r}")
    split = _train_split(data, "zoo_finetune")
    params = variables["params"]
    bsz = min(int(batch_size), len(split.y))
    tx = zoo_train.make_optimizer(lr, max(steps, 1), weight_decay)
    out, info = training.finetune(
        zoo_batch_loss(name, variables),
        params,
        zoo_batches(split, bsz, seed),
        steps,
        masks=training.mask_tree(params, masks) if masks else None,
        codebooks=codebooks,
        model_state=variables.get("batch_stats", {}),
        tx=tx,
    )
    return {**variables, "params": out, "batch_stats": info["model_state"]}, info


def zoo_finetune_plan(name: str, variables: Mapping[str, Any], out, data, steps: int, **kwargs):
    """FITCompress's fine-tuning (:func:`obcjax.fit.finetune_plan`) of a compressed zoo model.

    Args:
      name: zoo model name. variables: the model's variables (``batch_stats`` are kept).
      out: a :class:`~obcjax.transforms.Compressed` (e.g. :func:`obcjax.fit.apply_plan`'s).
      data: a ``Split`` or ``{"train": Split}``. steps: optimizer steps.
      **kwargs: ``lr``, ``batch_size``, ``weight_decay``, ``seed`` (as :func:`zoo_finetune`).

    Returns:
      ``(variables, info)``; the params lie on the grids and keep the masks.
    """
    return zoo_finetune(
        name, {**variables, "params": out.params}, out.masks, fit.codebooks_of(out), data, steps,
        **kwargs,
    )  # fmt: skip
