"""8-bit blockwise quantization on arrays of any kind (NUMERICS.md §2): arguments validated
once, outputs allocated, kernels of :func:`bnbcy.backends.device_kernels` called."""
from __future__ import annotations

import numbers

from .. import _arrays
from ..functional.maps import dynamic_map
from . import device_kernels, on_cuda
from .cuda import BLOCKWISE_BLOCKSIZES

FLOAT_DTYPES = _arrays.FLOAT_DTYPES

# The default map, per (framework, device), so CUDA calls do not copy it each time.
_default_codes: dict = {}


def as_blocksize(blocksize) -> int:
    """``blocksize`` as a positive int (ValueError naming it otherwise)."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    blocksize = int(blocksize)
    if not 0 < blocksize <= _arrays.MAX_BLOCKSIZE:
        raise ValueError(f"blocksize must be in [1, {_arrays.MAX_BLOCKSIZE}], got {blocksize}")
    return blocksize


def check_blocksize(blocksize, like, allowed_cuda=BLOCKWISE_BLOCKSIZES):
    """Validate ``blocksize`` for an op on ``like``'s device; return it as int."""
    blocksize = as_blocksize(blocksize)
    if on_cuda(like) and blocksize not in allowed_cuda:
        raise ValueError(f"blocksize must be one of {allowed_cuda} on CUDA, got {blocksize}")
    return blocksize


def default_code(like):
    """The signed dynamic map in ``like``'s framework and device (cached per device; do not
    write into it)."""
    key = (like.kind, like.device)
    code = _default_codes.get(key)
    if code is None:
        code = _default_codes[key] = _arrays.to_like(dynamic_map(), like)
    return code


def _device_str(like):
    # how each framework spells the device of an array on like's device
    if like.kind == "torch":
        return str(like.obj.device)
    if like.kind == "cupy":
        return f"<CUDA Device {like.device_id}>"
    return "cpu"


def code_view(code, like):
    """View of the code map (float32[256]) on ``like``'s framework and device; None: the
    default dynamic map."""
    if code is None:
        code = default_code(like)
    else:
        if not hasattr(code, "__dlpack__"):
            raise TypeError(f"code must be a float32 array of 256 values, got {type(code).__name__}")
        got = _arrays.dtype_name(code.dtype)
        if got != "float32":
            raise ValueError(f"code must have dtype float32, got {got}")
        if _arrays._kind(code) != like.kind or str(getattr(code, "device", "cpu")) != _device_str(like):
            code = _arrays.to_like(code, like)
    v = _arrays.input_view(code, "code", ("float32",))
    if v.numel != 256:
        raise ValueError(f"code must have 256 values, got {v.numel} (shape {v.shape})")
    return v


def quantize_blockwise(A, code=None, blocksize=4096, out=None, absmax=None):
    """Codes and block maxima of ``A`` (see :func:`bnbcy.functional.quantize_blockwise`).

    Returns
    -------
    out : array
        uint8, A's shape.
    absmax : array
        float32 ``[ceil(n / blocksize)]``.
    """
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    blocksize = check_blocksize(blocksize, a)
    codev = code_view(code, a)
    nblocks = _arrays.num_blocks(a.numel, blocksize)
    if out is None:
        out = _arrays.empty(a, a.shape, "uint8")
    qv = _arrays.output_view(out, "out", a, "uint8", a.numel, a.shape)
    if absmax is None:
        absmax = _arrays.empty(a, (nblocks,), "float32")
    amv = _arrays.output_view(absmax, "absmax", a, "float32", nblocks)
    _arrays.check_no_overlap(qv, amv, inputs=(a, codev))
    device_kernels(a).quantize_blockwise(a, codev, qv, amv, blocksize)
    return out, absmax


def dequantize_blockwise(A, absmax, code, blocksize, dtype, out=None):
    """``code[A] * absmax[block]`` in ``dtype`` (float32, float16 or bfloat16), A's shape."""
    q = _arrays.input_view(A, "A", ("uint8",))
    blocksize = check_blocksize(blocksize, q)
    out_dtype = _arrays.check_float_dtype(dtype, "dtype (quant_state.dtype)")
    nblocks = _arrays.num_blocks(q.numel, blocksize)
    if absmax is None:
        raise ValueError("absmax is required (float32 block maxima)")
    amv = _arrays.input_view(absmax, "absmax", ("float32",))
    _arrays.check_same_device(amv, q, "absmax")
    if amv.numel < nblocks:
        raise ValueError(f"absmax must have at least {nblocks} values for {q.numel} codes in blocks of "
                         f"{blocksize}, got {amv.numel}")
    codev = code_view(code, q)
    if out is None:
        out = _arrays.empty(q, q.shape, out_dtype)
    outv = _arrays.output_view(out, "out", q, out_dtype, q.numel, q.shape)
    _arrays.check_no_overlap(outv, inputs=(q, amv, codev))
    device_kernels(q).dequantize_blockwise(q, codev, amv, outv, blocksize)
    return out
