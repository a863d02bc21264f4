"""LLM.int8() building blocks (NUMERICS.md §5), bitsandbytes' signatures: vector-wise int8
quantization with outlier columns, exact int8 matmul, dequantization of int32 products, and
their composites.

Torch tensors go through the ``torch.ops.bnbcy.int8_*`` ops, CuPy/NumPy arrays and ``out=``
through the same array-level functions (:mod:`bnbcy.backends.int8`). CPU arrays run the
Cython/OpenMP kernels and torch's exact ``_int_mm``, CUDA arrays ``cuda_src/int8.cu`` or
cuBLAS (routes: :func:`bnbcy.backends.cuda.gemm_route`).
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _arrays
from ..backends import int8 as _i8
from ..backends.cuda import measured_routes as _measured_routes, route_from_table  # noqa: F401
from ..backends.int8 import INV127, check_threshold  # noqa: F401

FLOAT_DTYPES = _i8.FLOAT_DTYPES


def _torch(*xs):
    return all(x is None or isinstance(x, torch.Tensor) for x in xs)


def int8_vectorwise_quant(A, threshold=0.0):
    """Quantize each row of ``A`` to int8 with its own absmax scale.

    Parameters
    ----------
    A : array
        float16 (bitsandbytes' contract), bfloat16 or float32, shape ``(..., K)``.
    threshold : float
        > 0: elements with ``|a| >= threshold`` (compared in A's dtype) are outliers:
        left out of the row maxima, written as 0, and their columns reported; with
        more than one row, whole outlier columns are written as 0.

    Returns
    -------
    CA : array
        int8, A's shape: ``rne(a * 127 / row_stats[r])``.
    row_stats : array
        float32 ``[rows]``: max ``|a|`` over the non-outliers of each row.
    outlier_cols : array or None
        int64 column indices (empty when none), None when ``threshold == 0``.
    """
    threshold = check_threshold(threshold)
    if isinstance(A, torch.Tensor):
        return torch.ops.bnbcy.int8_vectorwise_quant.default(A, threshold)
    return _i8.int8_vectorwise_quant(A, threshold)


def int8_vectorwise_dequant(A, stats):
    """``fl32(fl32(float(A) * stats[row]) * fl32(1/127))``: float32, A's shape."""
    if _torch(A, stats):
        return torch.ops.bnbcy.int8_vectorwise_dequant.default(A, stats)
    return _i8.int8_vectorwise_dequant(A, stats)


def int8_linear_matmul(A, B, out=None, dtype=torch.int32):
    """Exact ``A @ B.T`` of int8 operands in int32.

    Parameters
    ----------
    A : array
        int8 ``(..., K)``.
    B : array
        int8 ``[N, K]``.
    out : array, optional
        int32 ``(..., N)``.
    dtype : torch.int32
        Only int32 (as bitsandbytes).

    Returns
    -------
    array
        int32 ``(..., N)``: every product and sum exact (int32 wrap-around only past 2^31).
    """
    if dtype not in (torch.int32, np.int32, "int32"):
        raise NotImplementedError(f"int8_linear_matmul only produces int32, got dtype={dtype}")
    if isinstance(A, torch.Tensor) and _torch(B, out):
        if out is None:
            return torch.ops.bnbcy.int8_linear_matmul.default(A, B)
        _arrays.check_not_lazy(out, "out")
        torch.ops.bnbcy.int8_linear_matmul.out(A, B, out)
        return out
    return _i8.int8_linear_matmul(A, B, out=out)


def int8_mm_dequant(A, row_stats, col_stats, out=None, bias=None, dtype=None):
    """Scale an int32 product back: ``out = OUT(fma(A * row * col, fl32(1/127²), bias))``.

    The product is rounded as bitsandbytes' CUDA kernel (constant 0x38820610); the
    result is rounded once to the output dtype.

    Parameters
    ----------
    A : array
        int32 ``(..., N)``.
    row_stats : array
        float32, one per row of A.
    col_stats : array
        float32 ``[N]``.
    out : array, optional
        Output (its dtype wins over ``dtype``).
    bias : array, optional
        ``[N]``, float16/bfloat16/float32.
    dtype : dtype, optional
        Output dtype, default float16 as bitsandbytes (whose other dtypes pass
        through float16 first; bnbcy rounds once, to the requested dtype).

    Returns
    -------
    array
    """
    if out is None and isinstance(A, torch.Tensor) and _torch(row_stats, col_stats, bias) \
            and (dtype is None or isinstance(dtype, torch.dtype)):
        return torch.ops.bnbcy.int8_mm_dequant.default(A, row_stats, col_stats, dtype, bias)
    return _i8.int8_mm_dequant(A, row_stats, col_stats, dtype=dtype, bias=bias, out=out)


def int8_double_quant(A, col_stats=None, row_stats=None, out_col=None, out_row=None, threshold=0.0):
    """Row-wise and column-wise int8 quantization of a 2-D (or flattened) ``A``.

    Returns
    -------
    CA_row, CA_col : array
        int8, A's shape.
    row_stats, col_stats : array
        float32 ``[rows]`` and ``[K]``.
    outlier_cols : array or None

    Notes
    -----
    Column part as bitsandbytes: outliers (``|a| >= threshold``) zeroed,
    ``col_stats = max |a|`` per column, ``CA_col = rne(T(a * 127) / col_stats)`` with
    the product rounded in A's dtype first.
    """
    if any(x is not None for x in (col_stats, row_stats, out_col, out_row)):
        raise ValueError("int8_double_quant: col_stats, row_stats, out_col and out_row must be None "
                         "(preallocated outputs are not supported, as in bitsandbytes)")
    threshold = check_threshold(threshold)
    if isinstance(A, torch.Tensor):
        return torch.ops.bnbcy.int8_double_quant.default(A, threshold)
    return _i8.int8_double_quant(A, threshold)


def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
    """``int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias=bias, dtype=dtype)``."""
    if _torch(A, B, row_stats, col_stats, bias) and isinstance(A, torch.Tensor) \
            and (dtype is None or isinstance(dtype, torch.dtype)):
        return torch.ops.bnbcy.int8_scaled_mm.default(A, B, row_stats, col_stats, bias, dtype)
    return _i8.int8_scaled_mm(A, B, row_stats, col_stats, bias=bias, dtype=dtype)


def int8_mixed_scaled_mm(A, CA, CB, SCA, SCB, outlier_cols=None, bias=None):
    """LLM.int8() product of a 2-D torch ``A`` with the int8 weight ``CB``: the int8 product of the
    regular columns plus a 16-bit product of the outlier columns.

    Returns
    -------
    out : torch.Tensor
        ``[M, N]`` in A's dtype.
    subA : torch.Tensor or None
        ``A[:, outlier_cols]`` (None without outliers).
    """
    out, subA = torch.ops.bnbcy.int8_mixed_scaled_mm.default(A, CA, CB, SCA, SCB, outlier_cols, bias)
    if outlier_cols is None or outlier_cols.numel() == 0:
        return out, None
    return out, subA
