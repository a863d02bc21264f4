"""Autograd wrappers of the quantized matmuls (NUMERICS.md §4), built on the ``torch.ops.bnbcy``
ops so that ``torch.compile`` traces them whole.

``matmul_4bit`` is the QLoRA path: the 4-bit weight is frozen, so gradients flow to the input
and the bias only (the ``gemm_4bit`` op carries that autograd formula).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

import torch

from ..functional import fourbit_matmul as _mm
from ..functional import int8 as _i8
from ..functional.fourbit import dequantize_4bit, packed_bytes


class MatMul4Bit(torch.autograd.Function):
    """``A @ W.T + bias`` with a packed 4-bit ``W``; backward gives ``grad_A = grad @ W`` and
    ``grad_bias = grad.sum``, never a gradient for the frozen weight. (:func:`matmul_4bit`
    calls the differentiable ``gemm_4bit`` op directly; this class is bitsandbytes' API.)"""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, quant_state=None):
        ctx.state = quant_state
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.save_for_backward(B)
        if bias is not None and bias.dtype != A.dtype:
            bias = bias.to(A.dtype)
        y = _mm.gemm_4bit(A, B, quant_state, bias=bias)
        if out is not None:
            out.copy_(y)
            y = out
        return y

    @staticmethod
    def backward(ctx, grad_output):
        (B,) = ctx.saved_tensors
        need_A, _, _, need_bias, _ = ctx.needs_input_grad
        grad_A = grad_bias = None
        if need_bias:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0, dtype=ctx.bias_dtype)
        if need_A:
            grad_A = torch.ops.bnbcy.gemm_4bit_grad_input.default(grad_output, B, list(ctx.state.shape),
                                                                  *_mm.gemm_args(ctx.state))
        return grad_A, None, None, grad_bias, None


def _is_torch(x):
    return isinstance(x, torch.Tensor)


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
        ``[N]``; cast to A's dtype (differentiably).

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
        if not torch.compiler.is_compiling():
            warnings.warn(
                f"matmul_4bit: weight was quantized from a [K, N] tensor (quant_state.shape="
                f"{list(quant_state.shape)}). Re-quantize from the weight in [N, K] (out_features, "
                "in_features) orientation. This will be an error in a future version.",
                DeprecationWarning, stacklevel=2)
        W = dequantize_4bit(packed_bytes(B, "B"), quant_state).reshape(N, K)
        if _is_torch(A):
            y = torch.nn.functional.linear(A, W.to(A.dtype).t(), bias)
        else:
            y = A @ W.astype(A.dtype)
            y = y if bias is None else y + bias
        if out is not None:
            out[...] = y
            return out
        return y
    if bias is not None and bias.dtype != A.dtype:
        bias = bias.to(A.dtype) if _is_torch(bias) else bias.astype(A.dtype)
    if out is not None and _is_torch(A) and torch.is_grad_enabled() and (
            A.requires_grad or (bias is not None and bias.requires_grad)):
        raise ValueError("matmul_4bit: out= cannot be used when gradients are required")
    return _mm.gemm_4bit(A, B, quant_state, bias=bias, out=out)


# ------------------------------------------------------------------------------------- LLM.int8()
@dataclasses.dataclass
class MatmulLtState:
    """State of an LLM.int8() matmul (``bitsandbytes.autograd._functions.MatmulLtState``):
    the int8 weight ``CB`` with its row scales ``SCB``, the outlier threshold and columns."""

    force_no_igemmlt: bool = False
    CB: Optional[torch.Tensor] = None
    SB: Optional[torch.Tensor] = None
    SCB: Optional[torch.Tensor] = None
    SBt: Optional[torch.Tensor] = None
    CBt: Optional[torch.Tensor] = None
    subB: Optional[torch.Tensor] = None
    outlier_pool: Optional[object] = None
    has_accumulated_gradients = False
    threshold = 0.0
    idx: Optional[torch.Tensor] = None
    is_training = True
    has_fp16_weights = True
    use_pool = False

    # layouts of bitsandbytes < 0.45, kept readable (always None) for downstream code
    _deprecated_fields = frozenset({"CxB", "CxBt", "formatB", "_tile_indices"})

    def __getattr__(self, name):
        if name in MatmulLtState._deprecated_fields:
            warnings.warn(f"MatmulLtState.{name} is deprecated and always None", FutureWarning, stacklevel=2)
            return None
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def reset_grads(self):
        self.CB = self.SB = self.SCB = self.SBt = self.CBt = None


def _int8_weight(B, state):
    """(CB, SCB) of the weight: ``state.CB``/``SCB`` when the weight is frozen int8
    (``has_fp16_weights=False``; B itself is then not looked at, as in bitsandbytes), else
    quantized from the 16/32-bit B when it changed."""
    if state.has_fp16_weights or state.CB is None:
        if B.dtype == torch.int8:
            raise ValueError("the weight is int8 but state.CB/SCB are not set: pass the MatmulLtState "
                             "that holds its scales")
        if (state.is_training and B.grad is None) or state.CB is None or state.SCB is None:
            state.CB, state.SCB, _ = _i8.int8_vectorwise_quant(B.detach().contiguous().to(torch.float16))
    return state.CB, state.SCB


def _dequant_weight(CB, SCB, dtype):
    """``CB * SCB / 127`` in ``dtype``, rounded once (bitsandbytes' expression)."""
    return CB.to(dtype).mul_(SCB.unsqueeze(1).mul(1.0 / 127.0))


def _check_features(A, CB):
    if A.shape[-1] != CB.shape[-1]:
        raise ValueError(f"matmul: A has {A.shape[-1]} features, the int8 weight {tuple(CB.shape)} expects "
                         f"{CB.shape[-1]}")


def _int8_forward(A, B, state, bias):
    """The LLM.int8() product ``A @ W.T + bias`` in A's dtype (no autograd); returns
    ``(y, CB, SCB)``."""
    CB, SCB = _int8_weight(B, state)
    N = CB.shape[0]
    if A.numel() == 0:
        return A.new_empty(A.shape[:-1] + (N,)), CB, SCB
    _check_features(A, CB)
    A2 = A.reshape(-1, A.shape[-1])
    # outputs are produced in A's dtype, or float32 for other float dtypes (float64), then cast
    cd = A.dtype if A.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
    if cd != A.dtype:
        A2 = A2.to(cd)
    # bitsandbytes quantizes activations as float16 (its CUDA kernel's contract)
    A16 = A2 if A2.dtype == torch.float16 else A2.to(torch.float16)
    CA, SCA, cols = _i8.int8_vectorwise_quant(A16, state.threshold)
    bias_c = None if bias is None else bias.to(cd)
    if state.threshold > 0.0:
        state.idx = cols
        y, _ = _i8.int8_mixed_scaled_mm(A2, CA, CB, SCA, SCB, cols, bias_c)
    else:
        y = _i8.int8_scaled_mm(CA, CB, SCA, SCB, bias=bias_c, dtype=cd)
    return y.reshape(A.shape[:-1] + (N,)).to(A.dtype), CB, SCB


def _to_out(y, out):
    if out is None:
        return y
    out.copy_(y)
    return out


class MatMul8bitLt(torch.autograd.Function):
    """``A @ B.T + bias`` the LLM.int8() way: int8 product of the regular input columns, 16-bit
    product of the outlier columns (``|a| >= state.threshold``).

    Backward: ``grad_A = grad @ dequant(CB)``; ``grad_B = grad.T @ A`` (dense, in A's dtype) when
    the weight is trainable -- bitsandbytes pairs row codes with column scales there (NUMERICS
    §5.7), bnbcy computes the product that the float64 reference gives.
    """

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, state=None):
        state = state or MatmulLtState()
        ctx.state = state
        ctx.A_shape, ctx.A_dtype = A.shape, A.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.empty = A.numel() == 0
        y, _, _ = _int8_forward(A, B, state, bias)
        ctx.grad_B = ctx.needs_input_grad[1]
        ctx.save_for_backward(A if ctx.grad_B else None)
        return _to_out(y, out)

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.empty:
            return torch.zeros(ctx.A_shape, dtype=ctx.A_dtype, device=grad_output.device), None, None, None, None
        (A,) = ctx.saved_tensors
        state = ctx.state
        need_A, need_B, _, need_bias, _ = ctx.needs_input_grad
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        grad_A = grad_B = grad_bias = None
        if need_bias:
            grad_bias = g2.sum(0, dtype=ctx.bias_dtype)
        if need_A:
            W = _dequant_weight(state.CB, state.SCB, grad_output.dtype)
            grad_A = (g2 @ W).reshape(ctx.A_shape).to(ctx.A_dtype)
        if need_B:
            grad_B = g2.t().to(A.dtype) @ A.reshape(-1, A.shape[-1])
        return grad_A, grad_B, None, grad_bias, None


def _fp_forward(A, B, state, bias):
    """``A @ dequant(CB).T + bias`` in A's dtype as plain differentiable torch code (traceable by
    torch.compile): gradients for A and bias, and for a trainable float ``B`` the
    straight-through ``grad.T @ A`` of bitsandbytes' ``MatMul8bitFp``."""
    CB, SCB = _int8_weight(B, state)
    _check_features(A, CB)
    W = _dequant_weight(CB, SCB, A.dtype)
    if B.dtype != torch.int8 and B.requires_grad:
        W = B + (W - B).detach()   # forward: the int8 weight; backward: gradient into B
    return torch.nn.functional.linear(A, W, None if bias is None else bias.to(A.dtype))


class MatMul8bitFp(torch.autograd.Function):
    """Training on the CPU (as bitsandbytes): ``A @ dequant(CB).T + bias`` in A's dtype, with
    input, weight and bias gradients."""

    @staticmethod
    def forward(ctx, A, B, out=None, bias=None, state=None):
        state = state or MatmulLtState()
        CB, SCB = _int8_weight(B, state)
        _check_features(A, CB)
        W = _dequant_weight(CB, SCB, A.dtype)
        # backward rebuilds W from the int8 codes instead of keeping a float copy alive
        ctx.state = state
        ctx.save_for_backward(A)
        ctx.bias_dtype = None if bias is None else bias.dtype
        y = torch.nn.functional.linear(A, W, None if bias is None else bias.to(A.dtype))
        return _to_out(y, out)

    @staticmethod
    def backward(ctx, grad_output):
        (A,) = ctx.saved_tensors
        need_A, need_B, _, need_bias, _ = ctx.needs_input_grad
        g2 = grad_output.reshape(-1, grad_output.shape[-1])
        grad_A = None
        if need_A:
            W = _dequant_weight(ctx.state.CB, ctx.state.SCB, grad_output.dtype)
            grad_A = (grad_output @ W).to(A.dtype)
        grad_B = (g2.t() @ A.reshape(-1, A.shape[-1]).to(g2.dtype)) if need_B else None
        grad_bias = g2.sum(0, dtype=ctx.bias_dtype) if need_bias else None
        return grad_A, grad_B, None, grad_bias, None


def matmul(A, B, out=None, state=None, threshold=0.0, bias=None):
    """LLM.int8() matmul ``A @ B.T (+ bias)`` (``bitsandbytes.matmul``).

    Parameters
    ----------
    A : torch.Tensor
        ``(..., K)`` float16/bfloat16/float32.
    B : torch.Tensor
        The weight ``[N, K]``: 16/32-bit (quantized here) or int8 with ``state.CB``/``SCB`` set.
        With ``state.has_fp16_weights=False`` and ``state.CB`` set, the weight is ``state.CB``
        and B is not looked at.
    out : torch.Tensor, optional
    state : MatmulLtState, optional
    threshold : float
        > 0 sets ``state.threshold`` (outlier decomposition).
    bias : torch.Tensor, optional

    Returns
    -------
    torch.Tensor
        ``(..., N)`` in A's dtype.

    Notes
    -----
    As bitsandbytes: in training mode on the CPU the product is ``A @ dequant(CB).T``
    (``MatMul8bitFp``), else the int8 product (``MatMul8bitLt``). Calls that need no gradient
    and the CPU training product run as plain op calls, without an ``autograd.Function``, so
    that torch.compile traces them whole.
    """
    state = state or MatmulLtState()
    if threshold > 0.0:
        state.threshold = threshold
    if state.is_training and A.device.type in ("cpu", "xpu"):
        return _to_out(_fp_forward(A, B, state, bias), out)
    needs_grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad
                                              or (bias is not None and bias.requires_grad))
    if not needs_grad:
        return _to_out(_int8_forward(A, B, state, bias)[0], out)
    return MatMul8bitLt.apply(A, B, out, bias, state)
