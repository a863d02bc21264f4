"""4-bit NF4/FP4 ops on arrays of any kind (NUMERICS.md §1.4-§1.5, §3, §4): quantize,
dequantize and ``A @ W.T`` with a packed weight. Arguments validated once, outputs allocated,
kernels of :func:`bnbcy.backends.device_kernels` called.

Packed layout: element 2j is the high nibble of byte j, element 2j+1 the low nibble;
``(n+1)//2`` bytes shaped ``(bytes // itemsize(quant_storage), 1)`` and viewed as
``quant_storage`` (the bytes are the same whatever the view).
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .. import _arrays
from . import device_kernels
from .blockwise import code_view

FLOAT_DTYPES = _arrays.FLOAT_DTYPES
BLOCKSIZES_4BIT = (32, 64, 128, 256, 512, 1024, 2048, 4096)
QUANT_TYPES = ("nf4", "fp4")
STORAGE_DTYPES = ("uint8", "int8", "float16", "bfloat16", "float32", "int16", "int32", "float64", "int64")
NESTED_BLOCKSIZE = 256

_TYPE_VALUES = {
    "nf4": [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
            -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
            0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
            0.7229568362236023, 1.0],
    # raw FP4 magnitudes by bit pattern (1 sign, 2 exponent, 1 mantissa bit; bias 2)
    "fp4": [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0],
    "int4": [7, 6, 5, 4, 3, 2, 1, 0, 0, -1, -2, -3, -4, -5, -6, -7],
    # AbnormalFloat4 for blocksize 64 (arXiv:2306.06965), in bitsandbytes' (descending) order
    "af4": [1.0, 0.72424863, 0.55496234, 0.42563882, 0.31675666, 0.21961274, 0.12934483, 0.04273164, 0.0,
            -0.04934812, -0.14982478, -0.25607552, -0.3736951, -0.51243739, -0.69441008, -1.0],
}
_type_cache: dict = {}


def type_table(typename: str, blocksize: int = 64) -> np.ndarray:
    """float32[16] table of ``typename``, divided (in float32) by its absolute maximum."""
    if typename not in _TYPE_VALUES:
        raise NotImplementedError(f"Typename {typename} not supported (known: {sorted(_TYPE_VALUES)})")
    if typename == "af4" and blocksize != 64:
        raise NotImplementedError("4-bit AbnormalFloats currently only support blocksize 64.")
    t = np.array(_TYPE_VALUES[typename], dtype=np.float32)
    return t / np.abs(t).max()


def type_code(quant_type, like):
    """The quant type's table in ``like``'s framework and device (cached per device; do not
    write into it)."""
    key = (quant_type, like.kind, like.device)
    code = _type_cache.get(key)
    if code is None:
        code = _type_cache[key] = _arrays.to_like(type_table(quant_type), like)
    return code


def check_quant_type(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    return quant_type


def check_blocksize_4bit(blocksize, name="blocksize"):
    """Validate a 4-bit blocksize (the same set on every device). None means 64 for an argument;
    for a state's field (``name`` other than 'blocksize') it is an error."""
    if blocksize is None and name == "blocksize":
        return 64
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) \
            or int(blocksize) not in BLOCKSIZES_4BIT:
        raise ValueError(f"{name} must be one of {BLOCKSIZES_4BIT} for 4-bit quantization, got {blocksize!r}")
    return int(blocksize)


def storage_name(quant_storage) -> str:
    """Canonical dtype name of ``quant_storage`` (torch or NumPy dtype)."""
    try:
        name = _arrays.dtype_name(quant_storage)
    except ValueError:
        name = None
    if name not in STORAGE_DTYPES:
        raise ValueError(f"quant_storage must be one of {STORAGE_DTYPES} (torch or NumPy dtype), "
                         f"got {quant_storage!r}")
    return name


def packed_bytes(B, name="A"):
    """The packed 4-bit buffer ``B`` (any ``quant_storage`` view, any shape) as a flat uint8 array
    of its own framework, without copying when it is contiguous."""
    if B is None or not hasattr(B, "__dlpack__"):
        raise TypeError(f"{name} must be a torch.Tensor, cupy.ndarray or numpy.ndarray of packed 4-bit "
                        f"codes, got {type(B).__name__}")
    B = _arrays.contiguous(B)
    if isinstance(B, torch.Tensor):
        flat = B.detach().reshape(-1)
        return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    flat = B.reshape(-1)
    return flat if flat.dtype == np.uint8 else flat.view(np.uint8)


def _storage_view(q, name: str, nbytes: int):
    """View the uint8 buffer ``q`` as ``name`` with bitsandbytes' ``(bytes // itemsize, 1)`` shape."""
    dt = _arrays.framework_dtype(_arrays._kind(q), name)
    return q.view(dt).reshape(nbytes // dt.itemsize, 1)


def quantize_4bit(A, blocksize=64, quant_type="fp4", quant_storage=torch.uint8, out=None, absmax=None):
    """Packed 4-bit codes and block maxima of ``A`` (see :func:`bnbcy.functional.quantize_4bit`).

    Returns
    -------
    packed : array
        ``((n+1)//2 // itemsize, 1)`` of dtype ``quant_storage``.
    absmax : array
        float32 ``[ceil(n / blocksize)]``.
    """
    check_quant_type(quant_type)
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    blocksize = check_blocksize_4bit(blocksize)
    storage = storage_name(quant_storage)
    n = a.numel
    nbytes = (n + 1) // 2
    itemsize = np.dtype(storage if storage != "bfloat16" else "float16").itemsize
    if nbytes % itemsize:
        raise ValueError(f"{n} elements pack into {nbytes} bytes, not a multiple of the {itemsize}-byte "
                         f"quant_storage {storage}; use quant_storage=uint8 or an element count divisible "
                         f"by {2 * itemsize}")
    nblocks = _arrays.num_blocks(n, blocksize)
    if out is None:
        q = _arrays.empty(a, (nbytes,), "uint8")
        out = _storage_view(q, storage, nbytes)
    else:
        _arrays.output_view(out, "out", a, storage, nbytes // itemsize, (nbytes // itemsize, 1))
        q = packed_bytes(out, "out")
    qv = _arrays.output_view(q, "out", a, "uint8", nbytes)
    if absmax is None:
        absmax = _arrays.empty(a, (nblocks,), "float32")
    amv = _arrays.output_view(absmax, "absmax", a, "float32", nblocks)
    _arrays.check_no_overlap(qv, amv, inputs=(a,))
    device_kernels(a).quantize_4bit(a, qv, amv, blocksize, quant_type)
    return out, absmax


def _absmax_view(absmax, like, nblocks, name="absmax"):
    v = _arrays.input_view(absmax, name, ("float32",))
    _arrays.check_same_device(v, like, name)
    if v.numel < nblocks:
        raise ValueError(f"{name} must have at least {nblocks} values, got {v.numel}")
    return v


def dequantize_4bit(A, absmax, blocksize, quant_type, shape, dtype, out=None):
    """``table[code] * absmax[block]`` in ``dtype``, of ``shape``."""
    check_quant_type(quant_type)
    q = _arrays.input_view(packed_bytes(A), "A", ("uint8",))
    blocksize = check_blocksize_4bit(blocksize, "blocksize (quant_state.blocksize)")
    shape = _arrays.check_shape(shape, "shape (quant_state.shape)")
    n = math.prod(shape)
    if q.numel * 2 < n:
        raise ValueError(f"A holds too few bytes for {n} 4-bit values of shape {shape}: expected at least "
                         f"{(n + 1) // 2}, got {q.numel}")
    dtype = _arrays.check_float_dtype(dtype, "dtype (quant_state.dtype)")
    scales = _absmax_view(absmax, q, _arrays.num_blocks(n, blocksize), "absmax (quant_state.absmax)")
    if out is None:
        out = _arrays.empty(q, shape, dtype)
    outv = _arrays.output_view(out, "out", q, dtype, n, shape)
    _arrays.check_no_overlap(outv, inputs=(q, scales))
    device_kernels(q).dequantize_4bit(q, scales, outv, n, blocksize, quant_type)
    return out


def _nested_scales(like, nblocks, absmax, absmax_8bit, absmax_code, absmax_offset):
    """Scales of a double-quantized state for the kernels: float32 block maxima on CUDA, the
    statistics as they are on the CPU (the kernels rebuild each block's scale)."""
    name = "absmax_8bit (quant_state.absmax)"
    qabs = _arrays.input_view(absmax_8bit, name, ("uint8",))
    _arrays.check_same_device(qabs, like, name)
    if qabs.numel < nblocks:
        raise ValueError(f"{name} must have at least {nblocks} values, got {qabs.numel}")
    if absmax_code is None or absmax_offset is None:
        raise TypeError(f"absmax_code and absmax_offset (quant_state.state2.code, quant_state.offset) are "
                        f"required with absmax_8bit, got {type(absmax_code).__name__} and "
                        f"{type(absmax_offset).__name__}")
    code2 = code_view(absmax_code, like)
    absmax2 = _absmax_view(absmax, like, -(-nblocks // NESTED_BLOCKSIZE), "absmax (quant_state.state2.absmax)")
    if getattr(absmax_offset, "shape", ()) not in ((), (1,)):
        raise ValueError(f"absmax_offset must be a 0-d float32 array, got shape {tuple(absmax_offset.shape)}")
    kernels = device_kernels(like)
    if kernels.NESTED_IN_KERNEL:
        offset = float(np.float32(absmax_offset.item() if hasattr(absmax_offset, "item") else absmax_offset))
        return (qabs, code2, absmax2, offset, NESTED_BLOCKSIZE)
    expanded = _arrays.empty(like, (qabs.numel,), "float32")
    kernels.dequantize_blockwise(qabs, code2, absmax2, _arrays.input_view(expanded, "absmax"), NESTED_BLOCKSIZE)
    expanded += _arrays.to_like(absmax_offset, like)
    return _arrays.input_view(expanded, "absmax", ("float32",))


def gemm_4bit(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None, absmax_code=None,
              absmax_offset=None, out=None, code=None):
    """``A @ W.T (+ bias)`` for the packed 4-bit weight ``W`` = ``B`` of shape ``shapeB = [N, K]``.

    Parameters
    ----------
    A : array
        ``(..., K)``, float32/float16/bfloat16.
    B : array
        The packed weight (any quant_storage view, transposed or not).
    shapeB : sequence of int
        ``[N, K]``.
    absmax : array
        float32 block maxima; with ``absmax_8bit``, the maxima of its 256-blocks.
    blocksize : int
    quant_type : {'nf4', 'fp4'} or None
        None with ``code`` given (gemv_4bit).
    bias : array, optional
        ``[N]`` of A's dtype.
    absmax_8bit, absmax_code, absmax_offset : array, optional
        Double-quantized block maxima: uint8 codes, their float32[256] map and 0-d offset.
    out : array, optional
        ``(..., N)`` of A's dtype.
    code : array, optional
        The 16-value map (default: the quant type's table).

    Returns
    -------
    array
        ``(..., N)`` in A's dtype, framework and device.
    """
    if len(_arrays.check_shape(shapeB, "shapeB (state.shape)")) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], got shape {tuple(shapeB)}")
    N, K = int(shapeB[0]), int(shapeB[1])
    a = _arrays.input_view(A, "A", FLOAT_DTYPES, allow_empty=True)
    if not a.shape or a.shape[-1] != K:
        raise ValueError(f"A must have {K} features in its last dimension to multiply a [{N}, {K}] 4-bit "
                         f"weight, got shape {tuple(a.shape)}")
    q = _arrays.input_view(packed_bytes(B, "B"), "B", ("uint8",))
    _arrays.check_same_device(q, a, "B")
    if q.numel < (N * K + 1) // 2:
        raise ValueError(f"B holds too few bytes for a [{N}, {K}] 4-bit weight: expected at least "
                         f"{(N * K + 1) // 2}, got {q.numel}")
    blocksize = check_blocksize_4bit(blocksize, "blocksize (state.blocksize)")
    if code is None:
        code = type_code(check_quant_type(quant_type), a)
    cv = _arrays.input_view(_arrays.to_like(code, a), "code", ("float32",))
    if cv.numel != 16:
        raise ValueError(f"code must have 16 values for a 4-bit weight, got {cv.numel}")
    M = a.numel // K
    out_shape = tuple(a.shape[:-1]) + (N,)
    biasv = None
    if bias is not None:
        biasv = _arrays.input_view(bias, "bias", (a.dtype,))
        _arrays.check_same_device(biasv, a, "bias")
        if biasv.numel != N:
            raise ValueError(f"bias must have {N} values, got shape {tuple(biasv.shape)}")
    nblocks = _arrays.num_blocks(N * K, blocksize)
    if absmax_8bit is None:
        scales = _absmax_view(absmax, a, nblocks, "absmax (quant_state.absmax)")
    else:
        scales = _nested_scales(a, nblocks, absmax, absmax_8bit, absmax_code, absmax_offset)
    if out is None:
        out = _arrays.empty(a, out_shape, a.dtype)
    outv = _arrays.output_view(out, "out", a, a.dtype, M * N, out_shape)
    scale_views = scales[:3] if isinstance(scales, tuple) else (scales,)  # nested: (qabs, code2, absmax2, ...)
    _arrays.check_no_overlap(outv, inputs=(a, q, cv, biasv, *scale_views))
    if M == 0:
        return out
    device_kernels(a).gemm_4bit(a, q, cv, scales, None if biasv is None else biasv.obj, biasv, out, outv,
                                M, N, K, blocksize, quant_type)
    return out


def quant_type_of(quant_type, code_v):
    """``quant_type``, or (None) the type whose table ``code_v`` (16 float32 values) holds: the
    dense paths dequantize by type, ``gemv_4bit`` gives only the map."""
    if quant_type is not None:
        return quant_type
    c = code_v.obj
    c = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else (c.get() if hasattr(c, "get") else c)
    for qt in QUANT_TYPES:
        if np.array_equal(np.asarray(c, dtype=np.float32).reshape(-1), type_table(qt)):
            return qt
    raise ValueError("code must be the NF4 or FP4 table for a 4-bit product of more rows than the fused "
                     "kernels take")


def gemv_4bit(A, B, shapeB, absmax, code, blocksize, out=None):
    """``A @ W.T`` with the 16-value map ``code`` (bitsandbytes' ``gemv_4bit`` op); every row of
    ``A`` is multiplied."""
    if code is None:
        raise ValueError("code (the 16-value map of the 4-bit weight) is required")
    return gemm_4bit(A, B, shapeB, absmax, blocksize, None, out=out, code=code)
