"""CUDA launchers of the 4-bit kernels (``cuda_src/fourbit.cu``): NF4/FP4 quantize and
dequantize (NUMERICS.md §3), ``gemv_4bit`` and the fused small-M 4-bit GEMM (§4).

The launch functions take already-validated :class:`bnbcy._C.TensorView` objects on one
CUDA device and only compute the launch geometry. Importing this module registers the
kernel specs and needs neither CuPy nor a GPU.
"""
from __future__ import annotations

from .. import kernels

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
SMALL_GEMM_MAX_ROWS = 16
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

# Must match cuda_src/fourbit.cu.
_Q4_ITEMS = 8              # BNBCY_Q4_ITEMS: elements per thread of the quantizer
_DQ4_ITEMS = 16            # BNBCY_DQ4_ITEMS
_DQ4_THREADS = 256         # BNBCY_DQ4_THREADS
_GEMV_THREADS = 128        # BNBCY_GEMV_THREADS
_GEMV_ROWS = 8             # BNBCY_GEMV_ROWS: rows of W per block
# mt -> (rows of W per lane RL, warps per block) of BNBCY_GEMM4_SMALL(..., MT, RL, WARPS)
_GEMM_GEOMETRY = {4: (4, 8), 8: (4, 8), 16: (2, 4)}
# the small-M GEMM's int k-offsets run up to K + one K-tile (32 * 4 * WARPS weights at most)
_MAX_K = 2**31 - 32 * 4 * max(w for _, w in _GEMM_GEOMETRY.values())

_QUANTIZE = kernels.register(kernels.KernelSpec(
    "quantize_4bit", "fourbit", "bnbcy_quantize_4bit_{qt}_{dtype}_{blocksize}", "pppq",
    (("qt", QUANT_TYPES), ("dtype", tuple(_SUFFIX.values())), ("blocksize", BLOCKSIZES))))
_DEQUANTIZE = kernels.register(kernels.KernelSpec(
    "dequantize_4bit", "fourbit", "bnbcy_dequantize_4bit_{qt}_{dtype}", "pppqi",
    (("qt", QUANT_TYPES), ("dtype", tuple(_SUFFIX.values())))))
_GEMV = kernels.register(kernels.KernelSpec(
    "gemv_4bit", "fourbit", "bnbcy_gemv_4bit_{dtype}", "ppppppiii",
    (("dtype", tuple(_SUFFIX.values())),)))
_GEMM_SMALL = kernels.register(kernels.KernelSpec(
    "gemm_4bit_small", "fourbit", "bnbcy_gemm_4bit_small_{dtype}_{mt}", "ppppppiiii",
    (("dtype", tuple(_SUFFIX.values())), ("mt", tuple(_GEMM_GEOMETRY)))))


def _cdiv(a, b):
    return -(-a // b)


def _log2(blocksize):
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    return int(blocksize).bit_length() - 1


def _check_qt(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def launch_quantize_4bit(a, q, absmax, blocksize, quant_type):
    """Quantize ``a`` (float32/float16/bfloat16, ``n`` elements) to packed 4-bit codes.

    Parameters
    ----------
    a : TensorView
        Contiguous input on a CUDA device.
    q : TensorView
        uint8, ``(n + 1) // 2`` bytes; element ``2j`` -> high nibble of byte ``j``.
    absmax : TensorView
        float32, ``ceil(n / blocksize)`` values.
    blocksize : int
        32, 64, ..., 4096.
    quant_type : {'nf4', 'fp4'}
    """
    _check_qt(quant_type)
    _log2(blocksize)
    n = a.numel
    if n == 0:
        return
    threads = max(256, blocksize // _Q4_ITEMS)
    grid = _cdiv(n, threads * _Q4_ITEMS)
    kernels.registry.launch(_QUANTIZE, {"qt": quant_type, "dtype": _SUFFIX[a.dtype], "blocksize": blocksize},
                            (grid,), (threads,), (a, q, absmax, n), a)


def launch_dequantize_4bit(q, absmax, out, n, blocksize, quant_type):
    """Dequantize ``n`` packed 4-bit codes into ``out`` (float32/float16/bfloat16).

    Parameters
    ----------
    q : TensorView
        uint8, ``(n + 1) // 2`` bytes.
    absmax : TensorView
        float32 block maxima (``ceil(n / blocksize)`` values).
    out : TensorView
        ``n`` elements of the output dtype.
    n : int
        Number of elements.
    blocksize : int
        32, 64, ..., 4096.
    quant_type : {'nf4', 'fp4'}
    """
    _check_qt(quant_type)
    log2bs = _log2(blocksize)
    n = int(n)
    if n == 0:
        return
    grid = _cdiv(n, _DQ4_THREADS * _DQ4_ITEMS)
    kernels.registry.launch(_DEQUANTIZE, {"qt": quant_type, "dtype": _SUFFIX[out.dtype]},
                            (grid,), (_DQ4_THREADS,), (q, absmax, out, n, log2bs), q)


def _check_matmul(N, K, blocksize):
    if K % 32 != 0:
        raise ValueError(f"the fused 4-bit kernels need K % 32 == 0, got K={K}")
    if N >= 2**31 or K > _MAX_K:
        raise ValueError(f"N must be below 2**31 and K at most {_MAX_K}, got N={N}, K={K}")
    return _log2(blocksize)


def launch_gemv_4bit(A, B, absmax, code, bias, out, N, K, blocksize):
    """``out[n] = sum_k A[k] * code[B[n, k]] * absmax[(n*K + k) // blocksize] (+ bias[n])``.

    Parameters
    ----------
    A : TensorView
        ``K`` elements (float32/float16/bfloat16).
    B : TensorView
        uint8 packed weight ``W[N, K]`` (``(N*K + 1) // 2`` bytes).
    absmax : TensorView
        float32 block maxima of ``W``.
    code : TensorView
        float32[16] map (the QuantState code).
    bias : TensorView or None
        ``N`` elements of A's dtype.
    out : TensorView
        ``N`` elements of A's dtype.
    N, K : int
        ``K % 32 == 0``.
    blocksize : int
        32, 64, ..., 4096.
    """
    log2bs = _check_matmul(N, K, blocksize)
    if N == 0:
        return
    grid = _cdiv(N, _GEMV_ROWS)
    kernels.registry.launch(_GEMV, {"dtype": _SUFFIX[A.dtype]}, (grid,), (_GEMV_THREADS,),
                            (A, B, absmax, code, bias, out, N, K, log2bs), A)


def launch_gemm_4bit_small(A, B, absmax, code, bias, out, M, N, K, blocksize):
    """``out[M, N] = A[M, K] @ dequant(W[N, K]).T (+ bias)`` for ``M <= 16``, fp32 accumulation.

    Parameters
    ----------
    A : TensorView
        ``M * K`` elements, row-major (float32/float16/bfloat16).
    B, absmax, code, bias, blocksize
        As :func:`launch_gemv_4bit`.
    out : TensorView
        ``M * N`` elements of A's dtype, row-major.
    M, N, K : int
        ``1 <= M <= SMALL_GEMM_MAX_ROWS``, ``K % 32 == 0``.

    Raises
    ------
    ValueError
        ``M > SMALL_GEMM_MAX_ROWS`` or ``K % 32 != 0``.
    """
    if M > SMALL_GEMM_MAX_ROWS:
        raise ValueError(f"launch_gemm_4bit_small handles at most {SMALL_GEMM_MAX_ROWS} rows of A, got M={M}")
    log2bs = _check_matmul(N, K, blocksize)
    if M <= 0 or N == 0:
        return
    mt = next(m for m in sorted(_GEMM_GEOMETRY) if m >= M)
    rl, warps = _GEMM_GEOMETRY[mt]
    grid = _cdiv(N, 8 * rl)
    kernels.registry.launch(_GEMM_SMALL, {"dtype": _SUFFIX[A.dtype], "mt": mt}, (grid,), (32 * warps,),
                            (A, B, absmax, code, bias, out, M, N, K, log2bs), A)
