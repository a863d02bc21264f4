"""CUDA kernels of every op on validated views: the launchers (``functional/_fourbit_cuda.py``,
``functional/_int8_cuda.py``, the blockwise kernels registered here) and cuBLAS where it wins.
Same functions, same arguments as :mod:`.cpu`. With :func:`bnbcy.kernels.emulating` the views
may be CPU arrays: the launches then go to the SIMT emulator."""
from __future__ import annotations

import json
import os

import torch

from .. import _arrays, _env, kernels
from ..functional import _fourbit_cuda, _int8_cuda
from ._dense import linear_dense

BLOCKWISE_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
FUSED_MAX_ROWS = 16
# The kernels take float32 block maxima: double-quantized ones are expanded first.
NESTED_IN_KERNEL = False
# Elements per CUDA thread; must equal BNBCY_Q8_ITEMS in cuda_src/blockwise8.cu.
_ITEMS = 8
_DEQUANT_THREADS = 256
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

_QUANTIZE = kernels.register(kernels.KernelSpec(
    "quantize_blockwise", "blockwise8", "bnbcy_quantize_blockwise_{dtype}_{blocksize}", "ppppq",
    (("dtype", tuple(_SUFFIX.values())), ("blocksize", BLOCKWISE_BLOCKSIZES))))
_DEQUANTIZE = kernels.register(kernels.KernelSpec(
    "dequantize_blockwise", "blockwise8", "bnbcy_dequantize_blockwise_{dtype}", "ppppqi",
    (("dtype", tuple(_SUFFIX.values())),)))


def _int32_sizes(**sizes):
    """Sizes the CUDA kernels take as 32-bit ints must fit (ValueError naming the size otherwise)."""
    for name, value in sizes.items():
        _arrays.check_index_range(value, name)


def quantize_blockwise(a, code, q, absmax, blocksize):
    threads = max(256, blocksize // _ITEMS)
    grid = -(-a.numel // (threads * _ITEMS))
    kernels.registry.launch(_QUANTIZE, {"dtype": _SUFFIX[a.dtype], "blocksize": blocksize},
                            (grid,), (threads,), (a, code, q, absmax, a.numel), a)


def dequantize_blockwise(q, code, absmax, out, blocksize):
    grid = -(-q.numel // (_DEQUANT_THREADS * _ITEMS))
    kernels.registry.launch(_DEQUANTIZE, {"dtype": _SUFFIX[out.dtype]}, (grid,), (_DEQUANT_THREADS,),
                            (q, code, absmax, out, q.numel, blocksize.bit_length() - 1), q)


def quantize_4bit(a, q, absmax, blocksize, quant_type):
    _fourbit_cuda.launch_quantize_4bit(a, q, absmax, blocksize, quant_type)


def dequantize_4bit(q, scales, out, n, blocksize, quant_type):
    """``scales``: float32 absmax view (the nested statistics are expanded by the caller)."""
    _fourbit_cuda.launch_dequantize_4bit(q, scales, out, n, blocksize, quant_type)


def gemm_4bit(a, q, code, scales, bias, biasv, out, outv, M, N, K, blocksize, quant_type):
    """gemv kernel for one row, the fused small-batch kernel for 2-16 rows (both need
    ``K % 32 == 0``), else the dequantized weight and the framework's dense matmul."""
    if K % 32 == 0 and M <= FUSED_MAX_ROWS:
        _int32_sizes(N=N, K=K)  # the fused kernels take them as int
        if M == 1:
            _fourbit_cuda.launch_gemv_4bit(a, q, scales, code, biasv, outv, N, K, blocksize)
        else:
            _fourbit_cuda.launch_gemm_4bit_small(a, q, scales, code, biasv, outv, M, N, K, blocksize)
        return
    from .fourbit import quant_type_of
    W = _arrays.empty(a, (N, K), a.dtype)
    _fourbit_cuda.launch_dequantize_4bit(q, scales, _arrays.input_view(W, "W"), N * K, blocksize,
                                         quant_type_of(quant_type, code))
    out.reshape(M, N)[...] = linear_dense(a.obj.reshape(M, K), W, bias)


def int8_outlier_cols(a, flags, rows, cols, threshold):
    _int32_sizes(cols=cols)
    _int8_cuda.launch_outlier_cols(a, flags, rows, cols, threshold)


def int8_vectorwise_quant(a, ca, row_stats, col_flags, rows, cols, threshold):
    _int32_sizes(cols=cols)
    _int8_cuda.launch_vectorwise_quant(a, ca, row_stats, col_flags, rows, cols, threshold)


def int8_mm_dequant(a, row_stats, col_stats, bias, out, rows, cols):
    _int32_sizes(cols=cols)
    _int8_cuda.launch_mm_dequant(a, row_stats, col_stats, bias, out, rows, cols)


# ------------------------------------------------------------------------------------- int8 GEMM
_ROUTES_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "functional",
                            "int8_gemm_routes.json")
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


def measured_routes():
    """The routes of ``functional/int8_gemm_routes.json`` (``{}`` when unreadable)."""
    if "routes" not in _routes_cache:
        try:
            with open(_ROUTES_FILE) as f:
                _routes_cache["routes"] = json.load(f).get("routes", {})
        except (OSError, ValueError):
            _routes_cache["routes"] = {}
    return _routes_cache["routes"]


def _capability(a):
    if not a.is_cuda:
        return 8, 0   # emulated: the launch path of an sm_80 device
    if a.kind == "torch":
        return torch.cuda.get_device_capability(a.device_id)
    import cupy
    cc = str(cupy.cuda.Device(a.device_id).compute_capability)
    return int(cc[:-1]), int(cc[-1])


def gemm_route(a, M, N, K):
    """'cublas' (torch._int_mm) or 'mma'/'dp4a' (bnbcy's raw kernels) for a CUDA int8 GEMM.

    The raw tensor-core kernel needs sm_80; torch._int_mm (cuBLASLt) needs CUDA torch arrays
    and M > 16, K and N multiples of 8. Where both apply, the routes measured on this compute
    capability (``int8_gemm_routes.json``) decide, and cuBLAS without measurements.
    ``BNBCY_INT8_GEMM=raw|cublas`` forces a route where it applies.
    """
    force = _env.get("BNBCY_INT8_GEMM")
    cublas_ok = a.kind == "torch" and a.is_cuda and M > 16 and K % 8 == 0 and N % 8 == 0
    major, minor = _capability(a)
    raw = "mma" if major >= 8 else "dp4a"
    if force == "raw" or not cublas_ok:
        return raw
    if force == "cublas":
        return "cublas"
    measured = route_from_table(measured_routes(), f"sm_{major}{minor}", M)
    return raw if measured == "raw" else "cublas"


def int8_linear_matmul(a, b, out, outv, M, N, K):
    _int32_sizes(M=M, N=N, K=K)
    route = gemm_route(a, M, N, K)
    if route == "cublas":
        torch._int_mm(a.obj.reshape(M, K), b.obj.t(), out=out.reshape(M, N))
    else:
        _int8_cuda.launch_int8_gemm(a, b, outv, M, N, K, kernel=route)
