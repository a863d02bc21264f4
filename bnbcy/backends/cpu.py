"""CPU kernels of every op on validated views (the Cython/OpenMP layer, torch's exact int8
GEMM). Same functions, same arguments as :mod:`.cuda`; :func:`bnbcy.backends.device_kernels`
picks one of the two."""
from __future__ import annotations

import torch

from .. import _C, _arrays
from ._dense import linear_dense

# Rows of A up to which the fused CPU kernel (the execution layout's, bnbcy/_ops/fourbit_exec.py)
# runs; None: its plan's cut-over for the instruction set in use.
FUSED_MAX_ROWS = None
# Elements of dense weight per chunk of the chunked path (8 Mi: 16-32 MB).
CHUNK_ELEMENTS = 1 << 23
# The kernels take double-quantized block maxima as they are (no expanded copy).
NESTED_IN_KERNEL = True


# the Cython kernels themselves where their arguments are the common ones
quantize_blockwise = _C.cpu_quantize_blockwise
dequantize_blockwise = _C.cpu_dequantize_blockwise
quantize_4bit = _C.cpu_quantize_4bit
int8_outlier_cols = _C.cpu_int8_outlier_cols
int8_vectorwise_quant = _C.cpu_int8_vectorwise_quant
int8_mm_dequant = _C.cpu_int8_mm_dequant


def dequantize_4bit(q, scales, out, n, blocksize, quant_type):
    """``scales``: float32 absmax view, or the nested ``(qabs, code2, absmax2, offset, bs2)``."""
    _C.cpu_dequantize_4bit(q, scales, out, 0, blocksize, quant_type)


def _chunk_rows(N, K):
    return max(1, min(N, CHUNK_ELEMENTS // K))


def weight_chunks(q, scales, N, K, blocksize, quant_type, like):
    """Yield ``(n0, n1, W[n0:n1])``: dense row chunks of the 4-bit weight in ``like``'s dtype
    and framework, written into one reused buffer (the whole weight never exists densely)."""
    rows = _chunk_rows(N, K)
    buf = _arrays.empty(like, (rows, K), like.dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        chunk = buf[: n1 - n0]
        _C.cpu_dequantize_4bit(q, scales, _arrays.input_view(chunk, "buffer"), n0 * K, blocksize, quant_type)
        yield n0, n1, chunk


def gemm_4bit(a, q, code, scales, bias, biasv, out, outv, M, N, K, blocksize, quant_type):
    """``out = A @ W.T (+ bias)``: the fused kernel of the execution layout for few rows (the
    same product ``Linear4bit`` runs in inference), else chunks of W and BLAS."""
    from .._ops import fourbit_exec
    if M <= (fourbit_exec.plan().fused_max_rows if FUSED_MAX_ROWS is None else FUSED_MAX_ROWS):
        fourbit_exec.fused(a, q, code, scales, biasv, outv, M, N, K, blocksize)
        return
    from .fourbit import quant_type_of
    A2, out2 = a.obj.reshape(M, K), out.reshape(M, N)
    for n0, n1, Wc in weight_chunks(q, scales, N, K, blocksize, quant_type_of(quant_type, code), a):
        out2[:, n0:n1] = linear_dense(A2, Wc, bias[n0:n1] if bias is not None else None)


def gemm_4bit_grad_input(g, q, scales, out, M, N, K, blocksize, quant_type):
    """``out[M, K] = grad[M, N] @ W``, W dequantized a chunk of rows at a time."""
    g2 = g.obj.reshape(M, N)
    out[...] = 0
    for n0, n1, Wc in weight_chunks(q, scales, N, K, blocksize, quant_type, g):
        if isinstance(out, torch.Tensor):
            out.addmm_(g2[:, n0:n1], Wc)
        else:
            out += g2[:, n0:n1] @ Wc


def _as_torch(x):
    return x if isinstance(x, torch.Tensor) else torch.from_numpy(x)


def int8_linear_matmul(a, b, out, outv, M, N, K):
    """torch's exact int8 GEMM (oneDNN: AMX/VNNI), zero-copy for NumPy arrays too."""
    torch._int_mm(_as_torch(a.obj).reshape(M, K), _as_torch(b.obj).t(), out=_as_torch(out).reshape(M, N))
