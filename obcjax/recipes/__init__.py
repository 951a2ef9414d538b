"""Recipes: drivers that put the library to work on a concrete model or training set-up.

The library (:mod:`obcjax.calibration`, :mod:`obcjax.transforms`, :mod:`obcjax.pipeline`, ...)
takes what a user has -- a Flax model, its variables, an iterable of batches, a loss -- and knows
nothing of any particular model. A recipe is the layer above: it binds those calls to one model
family, one data set or one training loop (the bundled zoo's models among them) and is what the
command line runs. The dependencies go one way only: recipes import the library and the zoo; no
library module imports a recipe (the import contracts in ``pyproject.toml`` check it).

* :mod:`obcjax.recipes.minilm` -- the pretrained all-MiniLM-L6-v2 sentence encoder compressed with
  GPTQ / SparseGPT, ExactOBS / OBQ or magnitude baselines, scored on held-out sentences (what
  ``obcjax compress --model minilm`` runs).
* :mod:`obcjax.recipes.finetune` -- fine-tuning with frozen masks and codebooks on a zoo model
  (OPQ, FITCompress), and the zoo models' loss functions.
* :mod:`obcjax.recipes.admm` -- progressive ADMM and its ExactOBS start on a zoo model.

Submodules load lazily (PEP 562): ``import obcjax.recipes`` imports none of them, nor Flax.

Example:
    >>> from obcjax import recipes
    >>> "minilm" in recipes.__all__
    True
    >>> recipes.minilm.parse_bits("4")
    4
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["minilm", "finetune", "admm"]

if TYPE_CHECKING:
    from obcjax.recipes import admm, finetune, minilm


def __getattr__(name: str) -> Any:
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
