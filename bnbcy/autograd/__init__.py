"""Autograd functions of bnbcy (``bnbcy.autograd._functions`` as in bitsandbytes)."""
from ._functions import MatMul4Bit, MatMul8bitFp, MatMul8bitLt, MatmulLtState, matmul, matmul_4bit

__all__ = ["MatMul4Bit", "MatMul8bitFp", "MatMul8bitLt", "MatmulLtState", "matmul", "matmul_4bit"]
