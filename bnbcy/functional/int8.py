"""LLM.int8() building blocks (NUMERICS.md §5): vector-wise int8 quantization with outlier
columns, exact int8 matmul, dequantization of int32 products, and their composites.

Every op takes torch tensors, CuPy arrays or NumPy arrays; CPU arrays run the
Cython/OpenMP kernels (``pyx/cpu_int8.pxi``) and torch's exact ``_int_mm``, CUDA arrays
``cuda_src/int8.cu`` or cuBLAS (see :func:`int8_linear_matmul`).
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch

from .. import _C, _arrays, kernels
from . import _int8_cuda

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
    kind = _arrays._kind(flags)
    if kind == "torch":
        return torch.nonzero(flags).view(-1)
    if kind == "cupy":
        import cupy
        return cupy.flatnonzero(flags).astype(cupy.int64)
    return np.flatnonzero(flags).astype(np.int64)


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold) \
            or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    return float(threshold)


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
    threshold = _check_threshold(threshold)
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    rows, cols = _rows_cols(a, "A")
    CA = _arrays.empty(a, a.shape, "int8")
    row_stats = _arrays.empty(a, (rows,), "float32")
    cav, rsv = _C.view(CA, "CA"), _C.view(row_stats, "row_stats")
    outlier_cols = flagsv = None
    if threshold > 0:
        flags = _zeros(a, (cols,), "uint8")
        fv = _C.view(flags, "flags")
        if kernels.use_cuda_kernels(a):
            _int8_cuda.launch_outlier_cols(a, fv, rows, cols, threshold)
        else:
            _C.cpu_int8_outlier_cols(a, fv, rows, cols, threshold)
        outlier_cols = _nonzero_1d(flags)
        if rows > 1 and outlier_cols.shape[0]:
            flagsv = fv
    if kernels.use_cuda_kernels(a):
        _int8_cuda.launch_vectorwise_quant(a, cav, rsv, flagsv, rows, cols, threshold)
    else:
        _C.cpu_int8_vectorwise_quant(a, cav, rsv, flagsv, rows, cols, threshold)
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


# ------------------------------------------------------------------------------------- int8 GEMM
_ROUTES_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "int8_gemm_routes.json")
_routes_cache: dict = {}


def route_from_table(table, arch: str, M: int):
    """The measured route ('raw' or 'cublas') for ``M`` rows on ``arch`` ('sm_90'), or None.

    ``table`` maps arch names to ``[[M_max, route], ...]``; the first pair with ``M <= M_max``
    applies (a last pair with ``M_max`` null covers everything above).
    """
    for m_max, route in table.get(arch, ()):
        if m_max is None or M <= m_max:
            return route
    return None


def _measured_routes():
    if "routes" not in _routes_cache:
        try:
            with open(_ROUTES_FILE) as f:
                _routes_cache["routes"] = json.load(f).get("routes", {})
        except (OSError, ValueError):
            _routes_cache["routes"] = {}
    return _routes_cache["routes"]


def _gemm_route(a, M, N, K):
    """'cublas' (torch._int_mm) or 'mma'/'dp4a' (bnbcy's raw kernels) for a CUDA int8 GEMM.

    The raw tensor-core kernel needs sm_80; torch._int_mm (cuBLASLt) needs torch arrays and
    M > 16, K and N multiples of 8. Where both apply, the routes measured on this compute
    capability (``int8_gemm_routes.json``) decide, and cuBLAS without measurements.
    ``BNBCY_INT8_GEMM=raw|cublas`` forces a route where it applies.
    """
    force = os.environ.get("BNBCY_INT8_GEMM", "")
    cublas_ok = a.kind == "torch" and M > 16 and K % 8 == 0 and N % 8 == 0
    if a.kind == "torch":
        major, minor = torch.cuda.get_device_capability(a.device_id)
    else:
        import cupy
        cc = str(cupy.cuda.Device(a.device_id).compute_capability)
        major, minor = int(cc[:-1]), int(cc[-1])
    raw = "mma" if major >= 8 else "dp4a"
    if force == "raw" or not cublas_ok:
        return raw
    if force == "cublas":
        return "cublas"
    measured = route_from_table(_measured_routes(), f"sm_{major}{minor}", M)
    return raw if measured == "raw" else "cublas"


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
    if M == 0 or N == 0:
        return out
    if kernels.use_cuda_kernels(a):
        route = _gemm_route(a, M, N, K)
        if route == "cublas":
            torch._int_mm(a.obj.reshape(M, K), b.obj.t(), out=out.reshape(M, N))
        else:
            _int8_cuda.launch_int8_gemm(a, b, ov, M, N, K, kernel=route)
        return out
    # CPU: torch's exact int8 GEMM (oneDNN: AMX/VNNI), zero-copy for NumPy arrays too
    At = a.obj if a.kind == "torch" else torch.from_numpy(a.obj)
    Bt = b.obj if b.kind == "torch" else torch.from_numpy(b.obj)
    Ot = out if a.kind == "torch" else torch.from_numpy(out)
    torch._int_mm(At.reshape(M, K), Bt.t(), out=Ot.reshape(M, N))
    return out


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
    if kernels.use_cuda_kernels(a):
        _int8_cuda.launch_mm_dequant(a, rs, cs, bv, ov, rows, cols)
    else:
        _C.cpu_int8_mm_dequant(a, rs, cs, bv, ov, rows, cols)
    return out


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
    threshold = _check_threshold(threshold)
    CA_row, rs, outlier_cols = int8_vectorwise_quant(A, threshold)
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    rows, cols = _rows_cols(a, "A")
    kind = a.kind
    X = a.obj.reshape(rows, cols)
    if kind == "torch":
        absX = X.abs()
        if threshold > 0:
            keep = absX < torch.tensor(threshold, dtype=X.dtype)
            X = X * keep
            absX = absX * keep
        cs = absX.amax(0).float()
        q = torch.round((X * 127).float() / cs)
        CA_col = torch.nan_to_num(q, nan=0.0).to(torch.int8)
    else:
        xp = np if kind == "numpy" else __import__("cupy")
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


# ------------------------------------------------------------------------------------ composites
def int8_scaled_mm(A, B, row_stats, col_stats, bias=None, dtype=None):
    """``int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias=bias, dtype=dtype)``."""
    return int8_mm_dequant(int8_linear_matmul(A, B), row_stats, col_stats, bias=bias, dtype=dtype)


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
    out = int8_scaled_mm(CA, CB, SCA, SCB, bias=bias, dtype=A.dtype)
    if outlier_cols is None or outlier_cols.numel() == 0:
        return out, None
    subA = A[:, outlier_cols].contiguous()
    subB = int8_vectorwise_dequant(CB[:, outlier_cols].contiguous(), SCB).to(A.dtype)
    return out.addmm_(subA, subB.t()), subA
