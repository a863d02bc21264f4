"""bnbcy: bitsandbytes-compatible k-bit quantization for PyTorch, CuPy and NumPy.

``import bnbcy as bnb`` works where code expects bitsandbytes' public API; code and tools that
import ``bitsandbytes`` by name get bnbcy through the opt-in stand-in (``BNBCY_AS_BITSANDBYTES=1``
or :func:`install_as_bitsandbytes`, see ``docs/standin.md``).
"""
from ._version import __version__

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only in an unbuilt source checkout
    raise ImportError("bnbcy's Cython extension is not built; install with "
                      "`pip install -e .` (needs a C compiler and Cython)") from exc

from . import functional, kernels, nn
from . import optim, utils
from .autograd._functions import MatMul4Bit, MatMul8bitLt, MatmulLtState, matmul, matmul_4bit
from ._features import build_info
from ._standin import install_as_bitsandbytes

# What integrations (transformers, accelerate, diffusers) read from ``bitsandbytes``: the
# "multi_backend" signal (CPU support) and the torch device types the ops run on.
# The build report that ``features()`` used to be is :func:`build_info`.
features = {"multi_backend"}
supported_torch_devices = {"cpu", "cuda"}


def empty_cpu_cache():
    """Unmap the large CPU output buffers bnbcy keeps for reuse.

    Outputs of 4 MiB and more on the CPU (torch and NumPy) come from a pool that recycles mapped
    pages across calls, as torch's CUDA caching allocator does for device memory. Freed buffers
    stay cached up to ``BNBCY_CPU_POOL_MB`` megabytes (default 512; 0 turns the pool off).
    Buffers still in use are not affected.
    """
    _C.pool_release()


def cpu_cache_info() -> dict:
    """``{'cached_bytes', 'limit_bytes', 'buffers'}`` of the CPU output pool (see
    :func:`empty_cpu_cache`)."""
    return _C.pool_stats()


__all__ = ["MatMul4Bit", "MatMul8bitLt", "MatmulLtState", "build_info", "cpu_cache_info", "empty_cpu_cache",
           "features", "functional", "install_as_bitsandbytes", "kernels", "matmul", "matmul_4bit", "nn", "optim",
           "supported_torch_devices", "utils", "__version__"]
