"""Per-matrix solvers on ``W: (rows, cols)`` and ``H: (cols, cols)``; no Flax here.

ExactOBS pruning (unstructured with OBC's layer-wise allocation, N:M, blocks), OBQ quantization,
joint prune + quantize, magnitude and round-to-nearest baselines, and the shared preparation.
"""

from obcjax.kernels.baselines import magnitude_nm, magnitude_prune, rtn_quantize
from obcjax.kernels.exactobs import (
    Result,
    allocate_counts,
    elimination_order,
    exactobs_block,
    exactobs_nm,
    exactobs_prune,
    obq_prune_quantize,
    obq_quantize,
    rebuild_levels,
)
from obcjax.kernels.prepare import Prepared, layer_loss, prepare

__all__ = [
    "Prepared",
    "Result",
    "prepare",
    "layer_loss",
    "exactobs_prune",
    "exactobs_nm",
    "exactobs_block",
    "obq_quantize",
    "obq_prune_quantize",
    "elimination_order",
    "allocate_counts",
    "rebuild_levels",
    "magnitude_prune",
    "magnitude_nm",
    "rtn_quantize",
]

try:  # GPTQ / SparseGPT live in their own modules
    from obcjax.kernels.gptq import gptq_quantize  # noqa: F401

    __all__.append("gptq_quantize")
except ImportError:  # pragma: no cover - during development only
    pass
try:
    from obcjax.kernels.sparsegpt import sparsegpt_prune  # noqa: F401

    __all__.append("sparsegpt_prune")
except ImportError:  # pragma: no cover
    pass
