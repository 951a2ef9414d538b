"""obcjax: post-training compression of JAX/Flax models.

Optimal Brain Compression (ExactOBS pruning, OBQ quantization, both jointly), GPTQ/SparseGPT,
and the joint allocation methods OPQ, FITCompress and progressive ADMM, as pure functions on
weight matrices and Flax parameter pytrees.

The names here are the common path; everything else lives in the submodules, listed in
``__all__`` too:

* one call: :func:`oneshot` (calibrate, compress one-pass or sequentially, repair batch norm);
* the steps: :func:`calibrate`, :func:`compress`, :func:`prune_levels`;
* models made of repeated blocks, one block at a time: :func:`compress_blockwise`;
* the specs: :class:`Unstructured`, :class:`NM`, :class:`Block`, :class:`Int` and the solver
  records :class:`ExactOBS`, :class:`OBQ`, :class:`GPTQ`, :class:`SparseGPT`, :class:`Magnitude`
  (a layer's bundle of them, ``LayerSpec``, is :class:`obcjax.transforms.LayerSpec`);
* files: :func:`save_params` / :func:`load_params` (a whole params tree, compressed layers
  packed);
* :func:`enable_compile_cache`.

``import obcjax`` is light: it imports neither JAX nor Flax. Every other name, and every
submodule, loads when first used (PEP 562).

Example:
    >>> import obcjax
    >>> obcjax.NM(2, 4)
    NM(n=2, m=4)
    >>> obcjax.oneshot.__module__
    'obcjax.workflow'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from obcjax.compile_cache import enable_compile_cache  # noqa: E402  (stdlib only)
from obcjax.specs import (  # noqa: E402  (no JAX)
    GPTQ,
    NM,
    OBQ,
    Block,
    ExactOBS,
    Int,
    Magnitude,
    SparseGPT,
    Unstructured,
)

# public name -> module that defines it (loaded on first use)
_EXPORTS = {
    "calibrate": "calibration",
    "compress": "transforms",
    "prune_levels": "transforms",
    "oneshot": "workflow",
    "OneShotResult": "workflow",
    "compress_blockwise": "blockwise",
    "save_params": "export",
    "load_params": "export",
}

__all__ = [
    "__version__",
    # one call, and the steps
    "oneshot",
    "OneShotResult",
    "calibrate",
    "compress",
    "prune_levels",
    "compress_blockwise",
    # specs
    "Unstructured",
    "NM",
    "Block",
    "Int",
    "ExactOBS",
    "OBQ",
    "GPTQ",
    "SparseGPT",
    "Magnitude",
    # files, compilation
    "save_params",
    "load_params",
    "enable_compile_cache",
    # subpackages and modules, for the rest
    "activations",
    "admm",
    "allocation",
    "blockwise",
    "calibration",
    "capture",
    "cli",
    "compile_cache",
    "export",
    "fileio",
    "fit",
    "kernels",
    "layout",
    "opq",
    "pipeline",
    "quant",
    "recipes",
    "rules",
    "sizes",
    "specs",
    "stats",
    "training",
    "transforms",
    "workflow",
    "zoo",
]

# every other public name of __all__ is a submodule (loaded on first use)
_SUBMODULES = frozenset(__all__) - set(_EXPORTS) - set(globals())

if TYPE_CHECKING:
    from obcjax import (
        activations,
        admm,
        allocation,
        blockwise,
        calibration,
        capture,
        cli,
        compile_cache,
        export,
        fileio,
        fit,
        kernels,
        layout,
        opq,
        pipeline,
        quant,
        recipes,
        rules,
        sizes,
        specs,
        stats,
        training,
        transforms,
        workflow,
        zoo,
    )
    from obcjax.calibration import calibrate
    from obcjax.export import load_params, save_params
    from obcjax.transforms import compress, prune_levels
    from obcjax.workflow import OneShotResult, oneshot


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value  # later lookups skip __getattr__
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
