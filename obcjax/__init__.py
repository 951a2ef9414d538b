"""obcjax: post-training compression of JAX/Flax models.

Optimal Brain Compression (ExactOBS pruning, OBQ quantization, both jointly), GPTQ/SparseGPT,
and the joint allocation methods OPQ, FITCompress and progressive ADMM, as pure functions on
weight matrices and Flax parameter pytrees.
"""

__version__ = "0.1.0"

from obcjax import specs  # noqa: E402
from obcjax.compile_cache import enable_compile_cache  # noqa: E402
from obcjax.specs import NM, Block, Int, Unstructured  # noqa: E402

__all__ = ["specs", "Unstructured", "NM", "Block", "Int", "enable_compile_cache", "__version__"]
