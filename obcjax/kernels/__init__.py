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
from obcjax.kernels.gptq import gptq_quantize
from obcjax.kernels.prepare import (
    Prepared,
    Status,
    layer_loss,
    prepare,
    prepare_core,
    raise_for_status,
)
from obcjax.kernels.solve import solve, solver_options
from obcjax.kernels.sparsegpt import sparsegpt_prune

__all__ = [
    "Prepared",
    "Result",
    "Status",
    "solve",
    "solver_options",
    "prepare_core",
    "raise_for_status",
    "gptq_quantize",
    "sparsegpt_prune",
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

# Appended: the working-set estimate callers size vmapped batches with, and the ExactOBS engine's
# static schedules (cost accounting in benchmarks), public so that nothing outside the kernels
# imports the private ``_engine`` module.
from obcjax.kernels._engine import blocked_plan, phase_plan  # noqa: E402
from obcjax.kernels.solve import solve_bytes  # noqa: E402

__all__ += ["solve_bytes", "blocked_plan", "phase_plan"]
