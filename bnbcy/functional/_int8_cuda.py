"""CUDA launchers of the LLM.int8 kernels (``cuda_src/int8.cu``, NUMERICS.md §5): outlier
columns, row-wise int8 quantization, int32 -> float dequantization of matmul results and the
int8 GEMM ``C = A @ B.T`` (int32).

The launch functions take already-validated :class:`bnbcy._C.TensorView` objects on one
CUDA device (contiguous, row-major) and only compute the launch geometry. Importing this
module registers the kernel specs and needs neither CuPy nor a GPU.
"""
from __future__ import annotations

from .. import _C, _arrays, kernels

_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
GEMM_KERNELS = ("mma", "dp4a")

# Must match cuda_src/int8.cu.
_THREADS = 256                 # BNBCY_I8_THREADS: block size of the element-wise kernels
_WARP_ROW_MAX_COLS = 1024      # BNBCY_I8_WARP_ROW_MAX_COLS: warp per row up to this many columns
_ROWS_PER_BLOCK = _THREADS // 32
_DEQUANT_ITEMS = 8             # outputs per thread of mm_dequant
_OUTLIER_MAX_GRID_Y = 1024     # row strips of the outlier-column scan
# kernel -> (tile rows of C, tile columns of C, threads)
_GEMM_TILES = {"mma": (128, 128, 256), "dp4a": (64, 64, 256)}
_MAX_GRID_Y = 65535
_GEMM_MAX_K = 2**31 - 256      # the kernels' int k-offsets run up to K + one K-tile
_INT32_MAX = 2**31 - 1

_OUTLIER_COLS = kernels.register(kernels.KernelSpec(
    "int8_outlier_cols", "int8", "bnbcy_int8_outlier_cols_{dtype}", "ppqif",
    (("dtype", tuple(_SUFFIX.values())),)))
_VECTORWISE_QUANT = kernels.register(kernels.KernelSpec(
    "int8_vectorwise_quant", "int8", "bnbcy_int8_vectorwise_quant_{dtype}", "ppppqif",
    (("dtype", tuple(_SUFFIX.values())),)))
_MM_DEQUANT = kernels.register(kernels.KernelSpec(
    "int8_mm_dequant", "int8", "bnbcy_int8_mm_dequant_{dtype}", "pppppqi",
    (("dtype", tuple(_SUFFIX.values())),)))
_GEMM = kernels.register(kernels.KernelSpec(
    "int8_gemm", "int8", "bnbcy_int8_gemm_{kernel}", "pppiii",
    (("kernel", GEMM_KERNELS),)))


def _cdiv(a, b):
    return -(-a // b)


def _dtype_suffix(view, what):
    try:
        return _SUFFIX[view.dtype]
    except KeyError:
        raise TypeError(f"{what} must be float32, float16 or bfloat16, got {view.dtype}") from None


def _check_cols(cols):
    cols = int(cols)
    if not 0 <= cols <= _INT32_MAX:
        raise ValueError(f"cols must be in [0, 2**31), got {cols}")
    return cols


def launch_outlier_cols(A, flags, rows, cols, threshold):
    """Flag the columns of ``A[rows, cols]`` holding an element with ``|a| >= threshold``.

    The comparison is made in A's dtype (for float16 ``half(|a|) >= half(threshold)``, as
    bitsandbytes' ``A.abs() >= threshold``); NaN never flags a column.

    Parameters
    ----------
    A : TensorView
        ``rows * cols`` elements (float32/float16/bfloat16), row-major.
    flags : TensorView
        uint8, ``cols`` bytes, **zeroed by the caller**; flagged columns are set to 1.
    rows, cols : int
    threshold : float
        ``> 0``.
    """
    rows, cols = int(rows), _check_cols(cols)
    if rows <= 0 or cols == 0:
        return
    grid = (_cdiv(cols, _THREADS), min(rows, _OUTLIER_MAX_GRID_Y))
    kernels.registry.launch(_OUTLIER_COLS, {"dtype": _dtype_suffix(A, "A")}, grid, (_THREADS,),
                            (A, flags, rows, cols, float(threshold)), A)


def launch_vectorwise_quant(A, CA, row_stats, col_flags, rows, cols, threshold):
    """Row-wise int8 quantization, bit-identical to bitsandbytes' ``int8_vectorwise_quant`` kernel.

    ``row_stats[r] = max |A[r, :]|`` (over ``|a| < threshold`` when ``threshold > 0``; NaN
    ignored), ``CA = round(A * div~(127, row_stats[r]))`` (ties to even); with ``threshold > 0``
    the outliers themselves are written as 0, and with ``col_flags`` every flagged column.

    Parameters
    ----------
    A : TensorView
        ``rows * cols`` elements (float32/float16/bfloat16), row-major.
    CA : TensorView
        int8, ``rows * cols`` codes.
    row_stats : TensorView
        float32, ``rows`` values.
    col_flags : TensorView or None
        uint8 ``[cols]`` from :func:`launch_outlier_cols`; bitsandbytes zeroes whole outlier
        columns only when ``rows > 1`` -- pass None otherwise.
    rows, cols : int
    threshold : float
        ``>= 0``; 0 disables the outlier handling.
    """
    rows, cols = int(rows), _check_cols(cols)
    threshold = float(threshold)
    if threshold < 0.0:
        raise ValueError(f"threshold must be >= 0, got {threshold}")
    if rows <= 0:
        return
    if cols <= _WARP_ROW_MAX_COLS:
        grid = _cdiv(rows, _ROWS_PER_BLOCK)  # one warp per row
    else:
        grid = rows                          # one block per row
    if grid > _INT32_MAX:
        raise ValueError(f"too many rows for one launch: {rows}")
    kernels.registry.launch(_VECTORWISE_QUANT, {"dtype": _dtype_suffix(A, "A")}, (grid,), (_THREADS,),
                            (A, CA, row_stats, col_flags, rows, cols, threshold), A)


def launch_mm_dequant(A, row_stats, col_stats, bias, out, rows, cols):
    """``out = T(fma(A * row_stats[r] * col_stats[c], 1/127**2, bias[c]))`` as bitsandbytes'
    ``int8_mm_dequant`` kernel (constant ``0x38820610``, products rounded to float32 in turn).

    Parameters
    ----------
    A : TensorView
        int32 ``[rows, cols]`` matmul result, row-major.
    row_stats : TensorView
        float32 ``[rows]``.
    col_stats : TensorView
        float32 ``[cols]``.
    bias : TensorView or None
        ``[cols]`` float32/float16/bfloat16 (any, independent of ``out``; the kernel reads float32, so
        a 16-bit bias is widened first, exactly).
    out : TensorView
        ``[rows, cols]`` float32/float16/bfloat16.
    rows, cols : int
    """
    rows, cols = int(rows), _check_cols(cols)
    if rows <= 0 or cols == 0:
        return
    grid = _cdiv(rows * cols, _THREADS * _DEQUANT_ITEMS)
    if grid > _INT32_MAX:
        raise ValueError(f"too many elements for one launch: {rows * cols}")
    suffix = _dtype_suffix(out, "out")
    keep = None
    if bias is not None:
        _dtype_suffix(bias, "bias")
        if bias.dtype != "float32":
            keep = _arrays.to_like(bias.obj, A, "float32")  # alive until the launch is queued
            bias = _C.view(keep, "bias")
    kernels.registry.launch(_MM_DEQUANT, {"dtype": suffix}, (grid,), (_THREADS,),
                            (A, row_stats, col_stats, bias, out, rows, cols), A)
    del keep


def launch_int8_gemm(A, B, C, M, N, K, kernel="mma"):
    """``C[M, N] = A[M, K] @ B[N, K].T`` in exact int32 arithmetic (wrapping only past int32).

    Parameters
    ----------
    A : TensorView
        int8 ``[M, K]``, row-major (``lda = K``).
    B : TensorView
        int8 ``[N, K]``, row-major (``ldb = K``).
    C : TensorView
        int32 ``[M, N]``, row-major (``ldc = N``).
    M, N, K : int
        Any sizes below ``2**31`` (``K <= 2**31 - 256``; ``K = 0`` writes zeros).
    kernel : {'mma', 'dp4a'}
        ``'mma'``: tensor cores on sm_80+ (dp4a tiles on older GPUs), for large shapes;
        ``'dp4a'``: the simple 64x64-tile dp4a kernel (small shapes, cross-checks).

    Raises
    ------
    ValueError
        Unknown kernel, negative or too large sizes.

    Notes
    -----
    M above 65535 row tiles (the grid's y limit) is launched as several row slabs.
    """
    if kernel not in _GEMM_TILES:
        raise ValueError(f"kernel must be one of {GEMM_KERNELS}, got {kernel!r}")
    M, N, K = int(M), int(N), int(K)
    for name, v, top in (("M", M, _INT32_MAX), ("N", N, _INT32_MAX), ("K", K, _GEMM_MAX_K)):
        if not 0 <= v <= top:
            raise ValueError(f"{name} must be in [0, {top}], got {v}")
    if M == 0 or N == 0:
        return
    bm, bn, threads = _GEMM_TILES[kernel]
    # gridDim.y is at most 65535 row tiles: taller products are launched in row slabs
    slab = _MAX_GRID_Y * bm
    for m0 in range(0, M, slab):
        rows = min(slab, M - m0)
        a, c = (A, C) if m0 == 0 else (A.ptr + m0 * K, C.ptr + 4 * m0 * N)
        kernels.registry.launch(_GEMM, {"kernel": kernel}, (_cdiv(N, bn), _cdiv(rows, bm)), (threads,),
                                (a, B, c, rows, N, K), A)
