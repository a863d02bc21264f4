"""4-bit NF4/FP4 blockwise quantization (NUMERICS.md §1.4-§1.5, §3):
``quantize_4bit`` / ``dequantize_4bit`` and their NF4/FP4 wrappers, ``get_4bit_type``.

Packed layout: element 2j is the high nibble of byte j, element 2j+1 the low
nibble; ``(n+1)//2`` bytes shaped ``(bytes // itemsize(quant_storage), 1)`` and
viewed as ``quant_storage`` (the bytes are the same whatever the view).
CPU arrays run the Cython/OpenMP kernels, CUDA arrays ``cuda_src/fourbit.cu``.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .. import _C, _arrays, kernels
from . import _fourbit_cuda
from .blockwise import dequantize_blockwise, quantize_blockwise
from .quant_state import QuantState

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


def _type_table(typename: str, blocksize: int = 64) -> np.ndarray:
    """float32[16] table of ``typename``, divided (in float32) by its absolute maximum."""
    if typename not in _TYPE_VALUES:
        raise NotImplementedError(f"Typename {typename} not supported (known: {sorted(_TYPE_VALUES)})")
    if typename == "af4" and blocksize != 64:
        raise NotImplementedError("4-bit AbnormalFloats currently only support blocksize 64.")
    t = np.array(_TYPE_VALUES[typename], dtype=np.float32)
    return t / np.abs(t).max()


def get_4bit_type(typename, device=None, blocksize=64):
    """The 16 values of a 4-bit data type as a float32 torch tensor.

    Parameters
    ----------
    typename : {'nf4', 'fp4', 'int4', 'af4'}
    device : torch.device or str, optional
        Default ``'cuda'`` when CUDA is available, else ``'cpu'`` (bitsandbytes
        always defaults to ``'cuda'``).
    blocksize : int
        Only ``'af4'`` depends on it (64 only).

    Returns
    -------
    torch.Tensor
        float32[16], indexed by 4-bit code. ``'int4'`` works here (bitsandbytes
        0.50.2 raises on it).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.from_numpy(_type_table(typename, blocksize)).to(device)


def _code_like(quant_type, like):
    """The quant type's table in ``like``'s framework and device (cached per device)."""
    key = (quant_type, like.kind, like.device)
    code = _type_cache.get(key)
    if code is None:
        code = _type_cache[key] = _arrays.to_like(_type_table(quant_type), like)
    return _clone(code)


def _clone(x):
    return x.clone() if _arrays._kind(x) == "torch" else x.copy()


def _check_quant_type(quant_type):
    if quant_type not in QUANT_TYPES:
        raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def check_blocksize_4bit(blocksize):
    """Validate a 4-bit blocksize (the same set on every device); default 64."""
    if blocksize is None:
        return 64
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral) \
            or int(blocksize) not in BLOCKSIZES_4BIT:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES_4BIT} for 4-bit quantization, got {blocksize!r}")
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
    kind = _arrays._kind(B)
    B = _arrays.contiguous(B)
    if kind == "torch":
        flat = B.detach().reshape(-1)
        return flat if flat.dtype == torch.uint8 else flat.view(torch.uint8)
    flat = B.reshape(-1)
    return flat if flat.dtype == np.uint8 else flat.view(np.uint8)


def _storage_view(q, name: str, nbytes: int):
    """View the uint8 buffer ``q`` as ``name`` with bitsandbytes' ``(bytes // itemsize, 1)`` shape."""
    kind = _arrays._kind(q)
    dt = _arrays.framework_dtype(kind, name)
    itemsize = dt.itemsize
    return q.view(dt).reshape(nbytes // itemsize, 1)


def quantize_4bit(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_type="fp4",
                  quant_storage=torch.uint8):
    """Quantize a tensor to packed 4-bit NF4 or FP4 codes in blocks of ``blocksize`` values.

    Parameters
    ----------
    A : torch.Tensor, cupy.ndarray or numpy.ndarray
        float32, float16 or bfloat16, any shape (non-contiguous inputs are copied).
    absmax : array, optional
        float32[ceil(n / blocksize)] to receive the block maxima.
    out : array, optional
        Packed output: ``(n+1)//2`` bytes, of dtype ``quant_storage`` and shape
        ``((n+1)//2 // itemsize, 1)``.
    blocksize : int, optional
        32, 64 (default), 128, ..., 4096.
    compress_statistics : bool
        Double-quantize the block maxima (8-bit, blocks of 256, after subtracting their mean).
    quant_type : {'fp4', 'nf4'}
        Default 'fp4', as in bitsandbytes.
    quant_storage : dtype
        dtype the packed bytes are viewed as (uint8, float16, bfloat16, float32, ...),
        so that FSDP sees one dtype; the bytes do not depend on it.

    Returns
    -------
    packed : array
        Of A's framework and device.
    quant_state : QuantState
        With ``shape``, ``dtype`` and ``quant_type`` of A, the type's 16-value ``code``.

    Raises
    ------
    ValueError
        Wrong dtype, empty ``A``, unknown ``quant_type``, invalid ``blocksize``, a
        byte count that is not a multiple of the storage itemsize, bad ``out``/``absmax``.
    """
    _check_quant_type(quant_type)
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
    nblocks = -(-n // blocksize)
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
    if kernels.use_cuda_kernels(a):
        _fourbit_cuda.launch_quantize_4bit(a, qv, amv, blocksize, quant_type)
    else:
        _C.cpu_quantize_4bit(a, qv, amv, blocksize, quant_type)

    shape = A.shape if a.kind == "torch" else tuple(A.shape)
    code = _code_like(quant_type, a)
    if compress_statistics:
        offset = absmax.mean()
        if a.kind == "numpy":
            offset = np.asarray(offset, dtype=np.float32)
        qabs, state2 = quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
        state = QuantState(absmax=qabs, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type,
                           dtype=A.dtype, offset=offset, state2=state2)
    else:
        state = QuantState(absmax=absmax, shape=shape, code=code, blocksize=blocksize, quant_type=quant_type,
                           dtype=A.dtype)
    return out, state


def quantize_fp4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type='fp4'``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "fp4", quant_storage)


def quantize_nf4(A, absmax=None, out=None, blocksize=None, compress_statistics=False, quant_storage=torch.uint8):
    """:func:`quantize_4bit` with ``quant_type='nf4'``."""
    return quantize_4bit(A, absmax, out, blocksize, compress_statistics, "nf4", quant_storage)


def block_scales(quant_state, like, nblocks):
    """Per-block scales of a 4-bit state for the kernels on ``like``'s device.

    CPU kernels take the nested statistics as they are (the scale of a block is
    rebuilt in the kernel); CUDA kernels take float32 absmax, expanded here.
    """
    if not quant_state.nested:
        v = _arrays.input_view(quant_state.absmax, "quant_state.absmax", ("float32",))
        _arrays.check_same_device(v, like, "quant_state.absmax")
        if v.numel < nblocks:
            raise ValueError(f"quant_state.absmax must have at least {nblocks} values, got {v.numel}")
        return v
    state2 = quant_state.state2
    if kernels.use_cuda_kernels(like):
        expanded = dequantize_blockwise(quant_state.absmax, state2)
        expanded += quant_state.offset
        return block_scales(QuantState(absmax=expanded), like, nblocks)
    qabs = _arrays.input_view(quant_state.absmax, "quant_state.absmax", ("uint8",))
    _arrays.check_same_device(qabs, like, "quant_state.absmax")
    code2 = _arrays.input_view(_arrays.to_like(state2.code, like), "quant_state.state2.code", ("float32",))
    absmax2 = _arrays.input_view(state2.absmax, "quant_state.state2.absmax", ("float32",))
    _arrays.check_same_device(absmax2, like, "quant_state.state2.absmax")
    if qabs.numel < nblocks:
        raise ValueError(f"quant_state.absmax must have at least {nblocks} values, got {qabs.numel}")
    offset = float(np.float32(quant_state.offset.item() if hasattr(quant_state.offset, "item")
                              else quant_state.offset))
    return (qabs, code2, absmax2, offset, int(state2.blocksize))


def dequantize_4bit(A, quant_state=None, absmax=None, out=None, blocksize=None, quant_type="fp4"):
    """Undo :func:`quantize_4bit`: ``y = table[code] * absmax[block]`` in the state's dtype and shape.

    Parameters
    ----------
    A : array
        The packed codes (any ``quant_storage`` view).
    quant_state : QuantState, optional
        From :func:`quantize_4bit`. Without it, ``absmax`` and ``out`` are required and
        give the scales, shape and dtype.
    absmax : array, optional
        float32 block maxima (without ``quant_state``).
    out : array, optional
        Output of the state's shape and dtype.
    blocksize : int, optional
        Without ``quant_state`` (default 64).
    quant_type : {'fp4', 'nf4'}
        Without ``quant_state``.

    Returns
    -------
    array
        The dequantized tensor. As in bitsandbytes, a packed tensor passed transposed
        (shape ``(1, m)``, m > 1) gives the transposed result.
    """
    q = _arrays.input_view(packed_bytes(A), "A", ("uint8",))
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=tuple(out.shape), dtype=out.dtype,
                                 blocksize=check_blocksize_4bit(blocksize), quant_type=quant_type)
    qt = quant_state.quant_type
    _check_quant_type(qt)
    blocksize = check_blocksize_4bit(quant_state.blocksize)
    if quant_state.shape is None:
        raise ValueError("quant_state.shape is required to dequantize 4-bit codes")
    shape = tuple(quant_state.shape)
    n = int(np.prod(shape, dtype=np.int64))
    if q.numel * 2 < n:
        raise ValueError(f"A holds {q.numel} bytes, too few for {n} 4-bit values of shape {shape}")
    dtype = _arrays.dtype_name(quant_state.dtype)
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float32, float16 or bfloat16, got {dtype}")
    if out is None:
        out = _arrays.empty(q, shape, dtype)
    outv = _arrays.output_view(out, "out", q, dtype, n, shape)
    scales = block_scales(quant_state, q, -(-n // blocksize))
    if kernels.use_cuda_kernels(q):
        _fourbit_cuda.launch_dequantize_4bit(q, scales, outv, n, blocksize, qt)
    else:
        _C.cpu_dequantize_4bit(q, scales, outv, 0, blocksize, qt)
    a_shape = tuple(A.shape)
    if len(a_shape) == 2 and a_shape[0] == 1 and a_shape[1] > 1:
        return out.t() if _arrays._kind(out) == "torch" else out.T
    return out


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type='fp4'``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type='nf4'``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")
