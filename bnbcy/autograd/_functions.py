"""Autograd wrappers of the quantized matmuls (NUMERICS.md §4).

``matmul_4bit`` is the QLoRA path: the 4-bit weight is frozen, so gradients
flow to the input and the bias only.
"""
from __future__ import annotations

import warnings

import torch

from .. import _arrays
from ..functional import fourbit_matmul as _mm
from ..functional.fourbit import dequantize_4bit, packed_bytes


class MatMul4Bit(torch.autograd.Function):
    """``A @ W.T + bias`` with a packed 4-bit ``W``; backward gives ``grad_A = grad @ W`` and
    ``grad_bias = grad.sum``, never a gradient for the frozen weight."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        ctx.state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(B)
        if bias is not None and bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
        return _mm.gemm_4bit(A, B, quant_state, bias=bias, out=out)

    @staticmethod
    def backward(ctx, grad_output):
        (B,) = ctx.saved_tensors
        need_A, _, _, need_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        if need_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        if need_A:
            grad_A = _mm.weight_grad_input(grad_output, B, ctx.state)
        return grad_A, None, None, grad_bias, None


def matmul_4bit(A, B, quant_state, out=None, bias=None):
    """``A @ W.T (+ bias)`` for a 4-bit weight, with autograd for ``A`` and ``bias``.

    Parameters
    ----------
    A : torch.Tensor, cupy.ndarray or numpy.ndarray
        ``(..., K)``; fp32, fp16 or bf16.
    B : array
        The packed weight as stored by ``Params4bit`` (``weight.t()`` is fine).
    quant_state : QuantState
        State of ``B``; ``shape == (N, K)``.
    out : array, optional
        Output buffer ``(..., N)`` (not with autograd).
    bias : array, optional
        ``[N]``.

    Returns
    -------
    array
        ``(..., N)`` in A's dtype.
    """
    if quant_state is None:
        raise ValueError("quant_state is required")
    if quant_state.shape is None or len(quant_state.shape) != 2:
        raise ValueError(f"matmul_4bit: quant_state.shape must be 2-D [N, K], got {quant_state.shape}")
    N, K = (int(s) for s in quant_state.shape)
    if A.shape and A.shape[-1] == N and N != K:
        # A weight quantized as [K, N] (deprecated orientation): multiply by its dequantized transpose.
        warnings.warn("matmul_4bit: the weight seems quantized as [in_features, out_features]; this "
                      "orientation is deprecated and runs through a dense dequantized weight",
                      DeprecationWarning, stacklevel=2)
        W = dequantize_4bit(packed_bytes(B, "B"), quant_state).reshape(N, K)
        if _arrays._kind(A) == "torch":
            return torch.nn.functional.linear(A, W.to(A.dtype).t(), bias)
        y = A @ W.astype(A.dtype)
        return y if bias is None else y + bias
    if _arrays._kind(A) == "torch" and torch.is_grad_enabled() and (
            A.requires_grad or (bias is not None and bias.requires_grad)):
        if out is not None:
            raise ValueError("matmul_4bit: out= cannot be used when gradients are required")
        return MatMul4Bit.apply(A, B, None, bias, quant_state)
    if bias is not None and _arrays.dtype_name(bias.dtype) != _arrays.dtype_name(A.dtype):
        bias = bias.to(A.dtype) if _arrays._kind(bias) == "torch" else bias.astype(A.dtype)
    return _mm.gemm_4bit(A, B, quant_state, bias=bias, out=out)
