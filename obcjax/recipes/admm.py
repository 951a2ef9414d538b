"""Progressive-ADMM recipes bound to the bundled zoo's models (Linen classifiers by name).

:func:`obcjax.admm.progressive_admm` and :func:`obcjax.admm.obs_start` take a loss function,
params, batches and calibration statistics. These drivers build them from a zoo model name, its
variables and a zoo data set (``{"train", "test", "calib"}`` splits), with test accuracy recorded
after every phase:

* :func:`zoo_progressive_admm` -- the progressive schedule on a zoo model.
* :func:`zoo_obs_start` -- ExactOBS / OBQ on calibration batches as ADMM's starting point.

Example:
    >>> from obcjax import zoo
    >>> from obcjax.specs import Unstructured
    >>> v = zoo.init_variables("lenet5", (8, 8, 1))
    >>> # two stages of ADMM + masked retraining (tens of seconds)
    >>> v, hist = zoo_progressive_admm(  # doctest: +SKIP
    ...     "lenet5", v, zoo.load_dataset("digits"),
    ...     [[("fc.*", Unstructured(s))] for s in (0.9, 0.97)])
    >>> hist[-1]["sparsity"]  # doctest: +SKIP
    0.97
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from obcjax import admm as A
from obcjax.calibration import calibrate
from obcjax.recipes.finetune import zoo_batch_loss, zoo_batches
from obcjax.zoo import data as zoo_data
from obcjax.zoo import models as zoo_models
from obcjax.zoo import train as zoo_train

__all__ = ["zoo_progressive_admm", "zoo_obs_start"]


def _calib_inputs(data: Mapping, batch: int, what: str) -> list:
    if "calib" not in data:
        raise ValueError(f"{what}: needs a 'calib' split in data")
    return [x for x, _ in zoo_data.batches(data["calib"], batch)]


def zoo_obs_start(
    name: str,
    variables: Mapping,
    data: Mapping,
    targets,
    *,
    solver: str = "obc",
    calib_batch: int = 128,
    rel_damp: float = 0.01,
):
    """:func:`obcjax.admm.obs_start` on a zoo model, calibrated on ``data["calib"]``.

    Returns:
      ``(variables, compressed)``: the compressed variables and the
      :class:`~obcjax.transforms.Compressed` record.
    """
    model = zoo_models.linen_model(name, zoo_models.num_classes_of(name, variables))
    xs = _calib_inputs(data, calib_batch, "zoo_obs_start")
    rules = [re.escape(p) for p in A.resolve_targets(variables["params"], targets)]
    stats = calibrate(model, variables, xs, rules=rules, apply_kwargs={"train": False})
    params, out = A.obs_start(variables["params"], stats, targets, solver=solver, rel_damp=rel_damp)
    return {**variables, "params": params}, out


def zoo_progressive_admm(
    name: str,
    variables: Mapping,
    data: Mapping,
    schedule: Sequence,
    *,
    batch_size: int = 32,
    seed: int = 0,
    calib_batch: int = 128,
    **kwargs,
):
    """:func:`obcjax.admm.progressive_admm` on a zoo model, with test accuracy per phase.

    Args:
      name: zoo model name (``"lenet5"``, ``"mlp"``...).
      variables: ``{"params", "batch_stats"}`` of a trained model (not modified).
      data: ``{"train", "test", ...}`` splits (:func:`obcjax.zoo.data.load_dataset`); ``"calib"``
        too with ``mask_solver="obs"``.
      schedule: a sequence of target rules, rising (:func:`obcjax.admm.check_schedule`).
      batch_size: examples per step (full batches, reshuffled every epoch from ``seed``).
      calib_batch: calibration batch size for ``mask_solver="obs"``.
      **kwargs: passed to ``progressive_admm`` (``rho``, ``admm_epochs``, ``mask_solver``...).

    Returns:
      ``(variables, history)``: ``history`` as ``progressive_admm``'s, with the accuracies
      (``acc_admm``, ``acc_hard``, ``acc_projected``, ``acc``) on ``data["test"]``.

    Raises:
      ValueError: ``batch_size`` exceeds the train split, a missing split, and
        ``progressive_admm``'s errors.
    """
    if "train" not in data or "test" not in data:
        raise ValueError("zoo_progressive_admm: data needs 'train' and 'test' splits")
    classes = zoo_models.num_classes_of(name, variables)
    model = zoo_models.linen_model(name, classes)
    test = data["test"]
    if len(data["train"].y) < batch_size:
        raise ValueError(f"zoo_progressive_admm: batch_size {batch_size} exceeds the train split")

    def evaluate(params, batch_stats):
        v = {"params": params, "batch_stats": batch_stats}
        return zoo_train.evaluate(name, v, test)["accuracy"]

    cal = None
    if kwargs.get("mask_solver") == "obs":
        xs = _calib_inputs(data, calib_batch, "zoo_progressive_admm")

        def cal(params, batch_stats, path):
            return calibrate(
                model,
                {"params": params, "batch_stats": batch_stats},
                xs,
                rules=[re.escape(path)],
                apply_kwargs={"train": False},
            )

    params, batch_stats, history = A.progressive_admm(
        zoo_batch_loss(name, variables),
        variables["params"],
        zoo_batches(data["train"], batch_size, seed),
        schedule,
        model_state=variables.get("batch_stats", {}),
        evaluate=evaluate,
        calibrate=cal,
        **kwargs,
    )
    return {"params": params, "batch_stats": batch_stats}, history
