"""The LLM.int8() ops with bitsandbytes' schemas: ``int8_linear_matmul(.out)``,
``int8_vectorwise_quant``, ``int8_vectorwise_dequant``, ``int8_mm_dequant``, ``int8_scaled_mm``,
``int8_mixed_scaled_mm``, ``int8_double_quant``. None is differentiable (int8 operands); the
modules' training paths differentiate the dense dequantized weight instead."""
from __future__ import annotations

import torch

from ..backends import int8 as _i8
from ._lib import op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check(cond, msg):
    torch._check(cond, lambda: msg)


# ------------------------------------------------------------------------------- linear matmul
def _matmul_fake(A, B):
    _check(A.dtype == torch.int8, "A must be int8")
    _check(B.dtype == torch.int8, "B must be int8")
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=torch.int32)


def _matmul_out(A, B, out):
    _i8.int8_linear_matmul(A, B, out=out)


def _matmul_out_fake(A, B, out):
    want = (*A.shape[:-1], B.shape[0])
    _matmul_fake(A, B)
    _check(tuple(out.shape) == want, f"Expected out.shape == {want}, got {tuple(out.shape)}")
    _check(out.dtype == torch.int32, f"Expected out.dtype == int32, got {out.dtype}")


int8_linear_matmul = op("int8_linear_matmul", "(Tensor A, Tensor B) -> Tensor",
                        impl=_i8.int8_linear_matmul, fake=_matmul_fake)
op("int8_linear_matmul.out", "(Tensor A, Tensor B, Tensor! out) -> ()", impl=_matmul_out, fake=_matmul_out_fake)


# ------------------------------------------------------------------------------ vectorwise
def _outliers_fake(A):
    return A.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


def _vectorwise_quant_fake(A, threshold=0.0):
    _check(A.dtype in _FLOATS, f"A must be float16, bfloat16 or float32, got {A.dtype}")
    CA = A.new_empty(A.shape, dtype=torch.int8)
    row_stats = A.new_empty((A.numel() // A.shape[-1],), dtype=torch.float32)
    return CA, row_stats, (_outliers_fake(A) if threshold > 0.0 else None)


int8_vectorwise_quant = op("int8_vectorwise_quant", "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor?)",
                           impl=_i8.int8_vectorwise_quant, fake=_vectorwise_quant_fake)


def _vectorwise_dequant_fake(A, stats):
    _check(A.dtype == torch.int8, "A must be int8")
    return torch.empty_like(A, dtype=torch.float32)


int8_vectorwise_dequant = op("int8_vectorwise_dequant", "(Tensor A, Tensor stats) -> Tensor",
                             impl=_i8.int8_vectorwise_dequant, fake=_vectorwise_dequant_fake)


# ------------------------------------------------------------------------------- dequant / mm
def _mm_dequant_fake(A, row_stats, col_stats, dtype=None, bias=None):
    _check(A.dtype == torch.int32, "A must be int32")
    return torch.empty_like(A, dtype=dtype or torch.float16)


int8_mm_dequant = op(
    "int8_mm_dequant",
    "(Tensor A, Tensor row_stats, Tensor col_stats, ScalarType? dtype=None, Tensor? bias=None) -> Tensor",
    impl=_i8.int8_mm_dequant, fake=_mm_dequant_fake)


def _scaled_mm_fake(A, B, row_stats, col_stats, bias=None, dtype=None):
    _matmul_fake(A, B)
    return A.new_empty((*A.shape[:-1], B.shape[0]), dtype=dtype or torch.float16)


int8_scaled_mm = op(
    "int8_scaled_mm",
    "(Tensor A, Tensor B, Tensor row_stats, Tensor col_stats, Tensor? bias=None, ScalarType? dtype=None) -> Tensor",
    impl=_i8.int8_scaled_mm, fake=_scaled_mm_fake)


def _mixed_fake(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    out = A.new_empty((*CA.shape[:-1], CB.shape[0]))
    n = 0 if outlier_cols is None else outlier_cols.shape[0]
    return out, A.new_empty((A.shape[0], n))


int8_mixed_scaled_mm = op(
    "int8_mixed_scaled_mm",
    "(Tensor A, Tensor CA, Tensor CB, Tensor SCA, Tensor SCB, Tensor? outlier_cols=None, Tensor? bias=None) "
    "-> (Tensor, Tensor?)",
    impl=_i8.int8_mixed_scaled_mm, fake=_mixed_fake)


def _double_quant_fake(A, threshold=0.0):
    _check(A.dtype in _FLOATS, f"A must be float16, bfloat16 or float32, got {A.dtype}")
    rows = A.numel() // A.shape[-1]
    return (torch.empty_like(A, dtype=torch.int8), torch.empty_like(A, dtype=torch.int8),
            A.new_empty((rows,), dtype=torch.float32), A.new_empty((A.shape[-1],), dtype=torch.float32),
            _outliers_fake(A) if threshold > 0.0 else None)


int8_double_quant = op("int8_double_quant", "(Tensor A, float threshold=0.0) -> (Tensor, Tensor, Tensor, Tensor, Tensor?)",
                       impl=_i8.int8_double_quant, fake=_double_quant_fake)
