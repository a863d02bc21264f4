"""``bnbcy::quantize_4bit``, ``dequantize_4bit(.out)``, ``gemv_4bit(.out)``, ``gemm_4bit``
(bitsandbytes' schemas). ``gemm_4bit`` is differentiable in ``A`` and ``bias`` (the 4-bit
weight is frozen), which makes QLoRA training traceable by torch.compile."""
from __future__ import annotations

import torch

from ..backends import fourbit as _fb
from ._lib import op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_BLOCKSIZES = _fb.BLOCKSIZES_4BIT


def _check_4bit(blocksize, quant_type):
    torch._check(blocksize in _BLOCKSIZES, lambda: f"invalid blocksize {blocksize}")
    torch._check(quant_type in ("nf4", "fp4"), lambda: f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def _check_float(x, name):
    torch._check(x.dtype in _FLOATS, lambda: f"{name} must be float16, bfloat16 or float32, got {x.dtype}")


# ------------------------------------------------------------------------------------ quantize
def _quantize_fake(A, blocksize, quant_type, quant_storage):
    _check_4bit(blocksize, quant_type)
    _check_float(A, "A")
    n = A.numel()
    blocks = -(n // -blocksize)
    return (A.new_empty(((n + 1) // (quant_storage.itemsize * 2), 1), dtype=quant_storage),
            A.new_empty((blocks,), dtype=torch.float32))


quantize_4bit = op(
    "quantize_4bit", "(Tensor A, int blocksize, str quant_type, ScalarType quant_storage) -> (Tensor, Tensor)",
    impl=_fb.quantize_4bit, fake=_quantize_fake)


# ---------------------------------------------------------------------------------- dequantize
def _dequantize_fake(A, absmax, blocksize, quant_type, shape, dtype):
    _check_4bit(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    torch._check(dtype in _FLOATS, lambda: f"dtype must be float16, bfloat16 or float32, got {dtype}")
    return A.new_empty(shape, dtype=dtype)


def _dequantize_out(A, absmax, blocksize, quant_type, shape, dtype, out):
    _fb.dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype, out=out)


def _dequantize_out_fake(A, absmax, blocksize, quant_type, shape, dtype, out):
    _dequantize_fake(A, absmax, blocksize, quant_type, shape, dtype)
    torch._check(tuple(out.shape) == tuple(shape), lambda: f"Expected out.shape == {shape}, got {out.shape}")
    torch._check(out.dtype == dtype, lambda: f"Expected out.dtype == {dtype}, got {out.dtype}")


_DQ_ARGS = "Tensor A, Tensor absmax, int blocksize, str quant_type, int[] shape, ScalarType dtype"
dequantize_4bit = op("dequantize_4bit", f"({_DQ_ARGS}) -> Tensor", impl=_fb.dequantize_4bit,
                     fake=_dequantize_fake)
op("dequantize_4bit.out", f"({_DQ_ARGS}, Tensor! out) -> ()", impl=_dequantize_out, fake=_dequantize_out_fake)


# --------------------------------------------------------------------------------------- gemv
def _gemv_fake(A, B, shapeB, absmax, code, blocksize):
    torch._check(blocksize in _BLOCKSIZES, lambda: f"invalid blocksize {blocksize}")
    _check_float(A, "A")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def _gemv_out(A, B, shapeB, absmax, code, blocksize, out):
    _fb.gemv_4bit(A, B, shapeB, absmax, code, blocksize, out=out)


def _gemv_out_fake(A, B, shapeB, absmax, code, blocksize, out):
    want = (*A.shape[:-1], shapeB[0])
    _gemv_fake(A, B, shapeB, absmax, code, blocksize)
    torch._check(tuple(out.shape) == want, lambda: f"Expected out.shape == {want}, got {out.shape}")
    torch._check(out.dtype == A.dtype, lambda: f"Expected out.dtype == {A.dtype}, got {out.dtype}")


_GEMV_ARGS = "Tensor A, Tensor B, int[] shapeB, Tensor absmax, Tensor code, int blocksize"
gemv_4bit = op("gemv_4bit", f"({_GEMV_ARGS}) -> Tensor", impl=_fb.gemv_4bit, fake=_gemv_fake)
op("gemv_4bit.out", f"({_GEMV_ARGS}, Tensor! out) -> ()", impl=_gemv_out, fake=_gemv_out_fake)


# --------------------------------------------------------------------------------------- gemm
def _gemm_fake(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
               absmax_offset=None):
    torch._check(len(shapeB) == 2, lambda: f"shapeB must be 2-D [N, K], got {list(shapeB)}")
    torch._check(A.shape[-1] == shapeB[1], lambda: f"A inner dim ({A.shape[-1]}) must match shapeB ({shapeB[1]})")
    _check_float(A, "A")
    _check_4bit(blocksize, quant_type)
    torch._check(absmax.dtype == torch.float32, lambda: f"absmax must be float32, got {absmax.dtype}")
    if absmax_8bit is not None:
        torch._check(absmax_8bit.dtype == torch.uint8, lambda: f"absmax_8bit must be uint8, got {absmax_8bit.dtype}")
        torch._check(absmax_code is not None and absmax_offset is not None,
                     lambda: "absmax_code and absmax_offset are required with absmax_8bit")
    if bias is not None:
        torch._check(bias.dtype == A.dtype, lambda: f"bias dtype ({bias.dtype}) must match A dtype ({A.dtype})")
    return A.new_empty((*A.shape[:-1], shapeB[0]))


def _gemm_setup(ctx, inputs, output):
    A, B, shapeB, absmax, blocksize, quant_type, bias, absmax_8bit, absmax_code, absmax_offset = inputs
    ctx.save_for_backward(B, absmax, absmax_8bit, absmax_code, absmax_offset)
    ctx.shapeB, ctx.blocksize, ctx.quant_type = list(shapeB), blocksize, quant_type
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.need_A, ctx.need_bias = A.requires_grad, bias is not None and bias.requires_grad


def _gemm_backward(ctx, grad):
    B, absmax, absmax_8bit, absmax_code, absmax_offset = ctx.saved_tensors
    grad_A = grad_bias = None
    if ctx.need_A:
        grad_A = torch.ops.bnbcy.gemm_4bit_grad_input.default(grad, B, ctx.shapeB, absmax, ctx.blocksize,
                                                              ctx.quant_type, absmax_8bit, absmax_code,
                                                              absmax_offset)
    if ctx.need_bias:
        grad_bias = grad.reshape(-1, ctx.shapeB[0]).sum(0, dtype=ctx.bias_dtype)
    return grad_A, None, None, None, None, None, grad_bias, None, None, None


def _grad_input_fake(grad, B, shapeB, absmax, blocksize, quant_type, absmax_8bit=None, absmax_code=None,
                     absmax_offset=None):
    _check_float(grad, "grad")
    torch._check(grad.shape[-1] == shapeB[0], lambda: f"grad must have {shapeB[0]} values in its last dimension")
    return grad.new_empty((*grad.shape[:-1], shapeB[1]))


# bnbcy's own op (bitsandbytes has none): the input gradient of gemm_4bit, chunked on the CPU
gemm_4bit_grad_input = op(
    "gemm_4bit_grad_input",
    "(Tensor grad, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, "
    "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor",
    impl=_fb.gemm_4bit_grad_input, fake=_grad_input_fake)


gemm_4bit = op(
    "gemm_4bit",
    "(Tensor A, Tensor B, int[] shapeB, Tensor absmax, int blocksize, str quant_type, Tensor? bias=None, "
    "Tensor? absmax_8bit=None, Tensor? absmax_code=None, Tensor? absmax_offset=None) -> Tensor",
    impl=_fb.gemm_4bit, fake=_gemm_fake, autograd=(_gemm_backward, _gemm_setup))

__all__ = ["dequantize_4bit", "gemm_4bit", "gemm_4bit_grad_input", "gemv_4bit", "quantize_4bit"]
