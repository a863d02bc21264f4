"""bnbcy: bitsandbytes-compatible k-bit quantization for PyTorch, CuPy and NumPy.

``import bnbcy as bnb`` works where code expects bitsandbytes' public API.
"""
__version__ = "0.1.0"

try:
    from . import _C
except ImportError as exc:  # pragma: no cover - only in an unbuilt source checkout
    raise ImportError("bnbcy's Cython extension is not built; install with "
                      "`pip install -e .` (needs a C compiler and Cython)") from exc

from . import functional, kernels, nn
from . import optim
from .autograd._functions import MatMul4Bit, MatMul8bitLt, MatmulLtState, matmul, matmul_4bit
from ._features import features

__all__ = ["MatMul4Bit", "MatMul8bitLt", "MatmulLtState", "functional", "kernels", "features", "matmul", "matmul_4bit", "nn", "__version__"]
