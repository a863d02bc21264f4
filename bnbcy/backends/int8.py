"""LLM.int8() ops on arrays of any kind (NUMERICS.md §5): vector-wise int8 quantization with
outlier columns, exact int8 matmul, dequantization of int32 products, and their composites.
Arguments validated once, outputs allocated, kernels of :func:`bnbcy.backends.device_kernels`
called."""
from __future__ import annotations

import math

import numpy as np
import torch

from .. import _arrays
from . import device_kernels

FLOAT_DTYPES = _arrays.FLOAT_DTYPES
# fl32(1/127): int8_vectorwise_dequant's constant (bits 0x3c010204)
INV127 = np.float32(np.uint32(0x3C010204).view(np.float32))


def _rows_cols(v, name):
    if not v.shape:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d array")
    cols = int(v.shape[-1])
    if cols == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(v.shape)}")
    return v.numel // cols, cols


def _zeros(like, shape, dtype):
    x = _arrays.empty(like, shape, dtype)
    x[...] = 0
    return x


def _nonzero_1d(flags):
    """int64 indices of the nonzero entries of a 1-D array, in its framework."""
    if isinstance(flags, torch.Tensor):
        return torch.nonzero(flags).view(-1)
    if isinstance(flags, np.ndarray):
        return np.flatnonzero(flags).astype(np.int64)
    import cupy
    return cupy.flatnonzero(flags).astype(cupy.int64)


def check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


def _view(x, name):
    return _arrays.input_view(x, name, make_contiguous=False)


def int8_vectorwise_quant(A, threshold=0.0):
    """``(CA, row_stats, outlier_cols)`` (see :func:`bnbcy.functional.int8_vectorwise_quant`)."""
    threshold = check_threshold(threshold)
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    rows, cols = _rows_cols(a, "A")
    kern = device_kernels(a)
    CA = _arrays.empty(a, a.shape, "int8")
    row_stats = _arrays.empty(a, (rows,), "float32")
    outlier_cols = flagsv = None
    if threshold > 0:
        flags = _zeros(a, (cols,), "uint8")
        fv = _view(flags, "flags")
        kern.int8_outlier_cols(a, fv, rows, cols, threshold)
        outlier_cols = _nonzero_1d(flags)
        if rows > 1 and outlier_cols.shape[0]:
            flagsv = fv
    kern.int8_vectorwise_quant(a, _view(CA, "CA"), _view(row_stats, "row_stats"), flagsv, rows, cols, threshold)
    return CA, row_stats, outlier_cols


def int8_vectorwise_dequant(A, stats):
    """``fl32(fl32(float(A) * stats[row]) * fl32(1/127))``: float32, A's shape."""
    a = _arrays.input_view(A, "A", ("int8",))
    rows, cols = _rows_cols(a, "A")
    s = _arrays.input_view(stats, "stats", ("float32",))
    _arrays.check_same_device(s, a, "stats")
    if s.numel != rows:
        raise ValueError(f"stats must have one value per row of A ({rows}), got shape {tuple(s.shape)}")
    A2, s2 = a.obj.reshape(rows, cols), s.obj.reshape(rows, 1)
    if a.kind == "torch":
        y = A2.float() * s2 * torch.tensor(float(INV127), dtype=torch.float32, device=A2.device)
    else:
        y = A2.astype(np.float32) * s2 * INV127
    return y.reshape(tuple(a.shape))


def int8_linear_matmul(A, B, out=None):
    """Exact ``A @ B.T`` of int8 ``A (..., K)`` and ``B [N, K]`` in int32 ``(..., N)``."""
    a = _arrays.input_view(A, "A", ("int8",))
    b = _arrays.input_view(B, "B", ("int8",))
    _arrays.check_same_device(b, a, "B")
    if len(b.shape) != 2:
        raise ValueError(f"B must be 2-D [N, K], got shape {tuple(b.shape)}")
    M, K = _rows_cols(a, "A")
    N = int(b.shape[0])
    if int(b.shape[1]) != K:
        raise ValueError(f"inner dimensions differ: A has K={K} (shape {tuple(a.shape)}), "
                         f"B has K={int(b.shape[1])} (shape {tuple(b.shape)})")
    out_shape = tuple(a.shape[:-1]) + (N,)
    if out is None:
        out = _arrays.empty(a, out_shape, "int32")
    ov = _arrays.output_view(out, "out", a, "int32", M * N, out_shape)
    _arrays.check_no_overlap(ov, inputs=(a, b))
    if M == 0 or N == 0:
        return out
    device_kernels(a).int8_linear_matmul(a, b, out, ov, M, N, K)
    return out


def int8_mm_dequant(A, row_stats, col_stats, dtype=None, bias=None, out=None):
    """``OUT(fma(A * row * col, fl32(1/127²), bias))`` of an int32 product (see
    :func:`bnbcy.functional.int8_mm_dequant`); the dtype of ``out`` wins over ``dtype``."""
    a = _arrays.input_view(A, "A", ("int32",))
    rows, cols = _rows_cols(a, "A")
    rs = _arrays.input_view(row_stats, "row_stats", ("float32",))
    cs = _arrays.input_view(col_stats, "col_stats", ("float32",))
    for v, name, n in ((rs, "row_stats", rows), (cs, "col_stats", cols)):
        _arrays.check_same_device(v, a, name)
        if v.numel != n:
            raise ValueError(f"{name} must have {n} values for A of shape {tuple(a.shape)}, "
                             f"got shape {tuple(v.shape)}")
    bv = None
    if bias is not None:
        bv = _arrays.input_view(bias, "bias", FLOAT_DTYPES)
        _arrays.check_same_device(bv, a, "bias")
        if bv.numel != cols:
            raise ValueError(f"bias must have {cols} values, got shape {tuple(bv.shape)}")
    if out is not None:
        out_dtype = _arrays.dtype_name(out.dtype)
    else:
        out_dtype = "float16" if dtype is None else _arrays.dtype_name(dtype)
        if out_dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be float16, bfloat16 or float32, got {dtype}")
        out = _arrays.empty(a, tuple(a.shape), out_dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out must be float16, bfloat16 or float32, got {out_dtype}")
    ov = _arrays.output_view(out, "out", a, out_dtype, rows * cols, tuple(a.shape))
    _arrays.check_no_overlap(ov, inputs=(a, rs, cs, bv))
    device_kernels(a).int8_mm_dequant(a, rs, cs, bv, ov, rows, cols)
    return out


def int8_double_quant(A, threshold=0.0):
    """Row-wise and column-wise int8 quantization: ``(CA_row, CA_col, row_stats, col_stats,
    outlier_cols)`` (see :func:`bnbcy.functional.int8_double_quant`)."""
    threshold = check_threshold(threshold)
    CA_row, rs, outlier_cols = int8_vectorwise_quant(A, threshold)
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    rows, cols = _rows_cols(a, "A")
    X = a.obj.reshape(rows, cols)
    if a.kind == "torch":
        absX = X.abs()
        if threshold > 0:
            keep = absX < torch.tensor(threshold, dtype=X.dtype)
            X = X * keep
            absX = absX * keep
        cs = absX.amax(0).float()
        q = torch.round((X * 127).float() / cs)
        CA_col = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    else:
        xp = np if a.kind == "numpy" else __import__("cupy")
        absX = xp.abs(X)
        if threshold > 0:
            keep = absX < X.dtype.type(threshold)
            X = X * keep
            absX = absX * keep
        cs = absX.max(axis=0).astype(xp.float32)
        with np.errstate(invalid="ignore", divide="ignore"):
            q = xp.rint((X * X.dtype.type(127)).astype(xp.float32) / cs)
        CA_col = xp.nan_to_num(q, nan=0.0).astype(xp.int8)
    return CA_row, CA_col.reshape(tuple(a.shape)), rs, cs, outlier_cols


def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
    """``int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype, bias)``."""
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, dtype=dtype, bias=bias)


def int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """LLM.int8() product of a 2-D torch ``A`` with the int8 weight ``CB``: the int8 product of the
    regular columns plus a 16-bit product of the outlier columns.

    Returns
    -------
    out : torch.Tensor
        ``[M, N]`` in A's dtype.
    subA : torch.Tensor
        ``A[:, outlier_cols]`` (``[M, 0]`` without outliers).
    """
    out = int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if outlier_cols is None or outlier_cols.numel() == 0:
        return out, A.new_empty((A.shape[0], 0))
    subA = A[:, outlier_cols].contiguous()
    subB = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype)
    return out.addmm_(subA, subB.t()), subA
