"""Matrix products with a packed 4-bit weight (NUMERICS.md §4): ``A @ W.T (+ bias)``
where ``W`` is ``[N, K]`` (out_features x in_features), quantized flat and row-major.

Dispatch (:func:`gemm_4bit`):

* CPU: up to ``CPU_FUSED_MAX_ROWS`` rows of A run the fused Cython/OpenMP kernel,
  which reads the packed weight directly. More rows dequantize the weight in
  chunks of rows into a small buffer and multiply each chunk with the BLAS of
  the array's framework, so the dense weight is never materialised whole.
* CUDA: one row runs the gemv kernel, 2-16 rows the fused small-batch kernel
  (both need ``K % 32 == 0``); everything else dequantizes the weight and runs
  the framework's dense matmul, as bitsandbytes does.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _C, _arrays, kernels
from . import _fourbit_cuda
from .fourbit import block_scales, check_blocksize_4bit, packed_bytes, dequantize_4bit
from .quant_state import QuantState

# Rows of A up to which the fused CPU kernel beats dequantize-in-chunks + BLAS
# (bench/bench_fourbit.py, 2-core Sapphire Rapids, bf16 4096x4096).
CPU_FUSED_MAX_ROWS = 12
# Elements of dense weight per chunk of the chunked CPU path (8 Mi: 16-32 MB).
CPU_CHUNK_ELEMENTS = 1 << 23
CUDA_FUSED_MAX_ROWS = 16


def _state_nk(state):
    if state is None:
        raise ValueError("state cannot be None: the 4-bit matmul needs the QuantState from quantize_4bit()")
    if not isinstance(state, QuantState):
        raise TypeError(f"state must be a QuantState, got {type(state).__name__}")
    if state.shape is None or len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], got shape {state.shape}")
    return int(state.shape[0]), int(state.shape[1])


def _code16(state, like):
    code = state.code
    if code is None:
        raise ValueError("quant_state.code (the 16-value map) is missing")
    cv = _arrays.input_view(_arrays.to_like(code, like), "quant_state.code", ("float32",))
    if cv.numel != 16:
        raise ValueError(f"quant_state.code must have 16 values for a 4-bit weight, got {cv.numel}")
    return cv


def _linear_dense(A2, W, bias):
    """``A2 @ W.T + bias`` in A2's framework."""
    kind = _arrays._kind(A2)
    if kind == "torch":
        return torch.nn.functional.linear(A2, W, bias)
    y = A2 @ W.T
    if bias is not None:
        y += bias
    return y


def _dequant_rows_cpu(q, scales, state, n0, n1, K, buf):
    """Rows ``[n0, n1)`` of the weight into ``buf`` (``[>= n1-n0, K]``, A's dtype); returns the view."""
    rows = buf[: n1 - n0]
    _C.cpu_dequantize_4bit(q, scales, _arrays.input_view(rows, "buffer"), n0 * K,
                           check_blocksize_4bit(state.blocksize), state.quant_type)
    return rows


def _chunk_rows(N, K):
    return max(1, min(N, CPU_CHUNK_ELEMENTS // K))


def weight_chunks(B, state, dtype_like):
    """Yield ``(n0, n1, W[n0:n1])`` dense chunks of the 4-bit weight in ``dtype_like``'s dtype
    and framework (CPU), reusing one buffer. CUDA arrays get one chunk, the whole weight."""
    N, K = _state_nk(state)
    q = _arrays.input_view(packed_bytes(B, "B"), "B", ("uint8",))
    like = _arrays.input_view(dtype_like, "A", _arrays.FLOAT_DTYPES, allow_empty=True)
    if kernels.use_cuda_kernels(q) or kernels.use_cuda_kernels(like):
        yield 0, N, _dequant_full(B, state, like)
        return
    scales = block_scales(state, q, -(-N * K // check_blocksize_4bit(state.blocksize)))
    rows = _chunk_rows(N, K)
    buf = _arrays.empty(like, (rows, K), like.dtype)
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        yield n0, n1, _dequant_rows_cpu(q, scales, state, n0, n1, K, buf)


def _dequant_full(B, state, like):
    W = dequantize_4bit(packed_bytes(B, "B"), state)
    kind = _arrays._kind(W)
    W = W.reshape(tuple(state.shape))
    if _arrays.dtype_name(W.dtype) != like.dtype:
        W = W.to(_arrays.framework_dtype("torch", like.dtype)) if kind == "torch" else \
            W.astype(_arrays.framework_dtype(kind, like.dtype))
    return W


def gemm_4bit(A, B, state, bias=None, out=None):
    """``A @ W.T (+ bias)`` for the packed 4-bit weight ``W`` (``B``) with quant state ``state``.

    Parameters
    ----------
    A : array
        ``(..., K)``, float32/float16/bfloat16.
    B : array
        The packed weight (any quant_storage view, transposed or not).
    state : QuantState
        2-D ``shape == (N, K)``.
    bias : array, optional
        ``[N]`` of A's dtype.
    out : array, optional
        ``(..., N)`` of A's dtype.

    Returns
    -------
    array
        ``(..., N)`` in A's dtype, framework and device.
    """
    N, K = _state_nk(state)
    a = _arrays.input_view(A, "A", _arrays.FLOAT_DTYPES, allow_empty=True)
    if not a.shape or a.shape[-1] != K:
        raise ValueError(f"A must have {K} features in its last dimension to multiply a [{N}, {K}] 4-bit "
                         f"weight, got shape {tuple(a.shape)}")
    q = _arrays.input_view(packed_bytes(B, "B"), "B", ("uint8",))
    _arrays.check_same_device(q, a, "B")
    if q.numel < (N * K + 1) // 2:
        raise ValueError(f"B holds {q.numel} bytes, too few for a [{N}, {K}] 4-bit weight")
    blocksize = check_blocksize_4bit(state.blocksize)
    M = a.numel // K
    out_shape = tuple(a.shape[:-1]) + (N,)
    biasv = None
    if bias is not None:
        biasv = _arrays.input_view(bias, "bias", (a.dtype,))
        _arrays.check_same_device(biasv, a, "bias")
        if biasv.numel != N:
            raise ValueError(f"bias must have {N} values, got shape {tuple(biasv.shape)}")
    if out is None:
        out = _arrays.empty(a, out_shape, a.dtype)
    outv = _arrays.output_view(out, "out", a, a.dtype, M * N, out_shape)
    if M == 0:
        return out

    if kernels.use_cuda_kernels(a):
        if K % 32 == 0 and M <= CUDA_FUSED_MAX_ROWS:
            scales = block_scales(state, q, -(-N * K // blocksize))
            code = _code16(state, a)
            if M == 1:
                _fourbit_cuda.launch_gemv_4bit(a, q, scales, code, biasv, outv, N, K, blocksize)
            else:
                _fourbit_cuda.launch_gemm_4bit_small(a, q, scales, code, biasv, outv, M, N, K, blocksize)
            return out
        y = _linear_dense(a.obj.reshape(M, K), _dequant_full(B, state, a), bias)
        out.reshape(M, N)[...] = y
        return out

    if M <= CPU_FUSED_MAX_ROWS:
        scales = block_scales(state, q, -(-N * K // blocksize))
        _C.cpu_gemm_4bit(a, q, _code16(state, a), scales, biasv, outv, M, N, K, blocksize)
        return out
    A2 = a.obj.reshape(M, K)
    out2 = out.reshape(M, N)
    for n0, n1, Wc in weight_chunks(B, state, a.obj):
        out2[:, n0:n1] = _linear_dense(A2, Wc, bias[n0:n1] if bias is not None else None)
    return out


def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """``A @ W.T`` for a packed 4-bit weight, meant for one row of A (token-by-token inference).

    bitsandbytes' signature; ``transposed_A``/``transposed_B`` are ignored as there.
    Unlike bitsandbytes' CUDA kernel, which reads only the first row, every row of
    ``A`` (``(..., K)``) is multiplied.

    Returns
    -------
    array
        ``(..., N)`` in A's dtype.
    """
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    return gemm_4bit(A, B, state, out=out)


def weight_grad_input(grad_out, B, state):
    """``grad_out @ W`` (the input gradient of ``A @ W.T``), chunked over W's rows on the CPU."""
    N, K = _state_nk(state)
    g2 = grad_out.reshape(-1, N)
    kind = _arrays._kind(grad_out)
    if kind == "torch":
        gA = torch.zeros(g2.shape[0], K, dtype=grad_out.dtype, device=grad_out.device)
        for n0, n1, Wc in weight_chunks(B, state, grad_out):
            gA.addmm_(g2[:, n0:n1], Wc)
    else:
        gA = np.zeros((g2.shape[0], K), dtype=grad_out.dtype) if kind == "numpy" else None
        for n0, n1, Wc in weight_chunks(B, state, grad_out):
            part = g2[:, n0:n1] @ Wc
            gA = part if gA is None else gA + part
    return gA.reshape(tuple(grad_out.shape[:-1]) + (K,))
