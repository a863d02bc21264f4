"""4-bit NF4/FP4 blockwise quantization (NUMERICS.md §1.4-§1.5, §3):
``quantize_4bit`` / ``dequantize_4bit`` and their NF4/FP4 wrappers, ``get_4bit_type``,
bitsandbytes' signatures. Torch tensors go through ``torch.ops.bnbcy.{quantize,dequantize}_4bit``;
CuPy/NumPy arrays and caller-provided outputs through the same array-level functions
(:mod:`bnbcy.backends.fourbit`, which also documents the packed layout)."""
from __future__ import annotations

import numpy as np
import torch

from .. import _C, _arrays
from ..backends import fourbit as _fb
from ..backends.fourbit import (BLOCKSIZES_4BIT, NESTED_BLOCKSIZE, QUANT_TYPES, STORAGE_DTYPES,  # noqa: F401
                                check_blocksize_4bit, packed_bytes, storage_name)
from .blockwise import dequantize_blockwise, quantize_blockwise
from .quant_state import QuantState, check_quant_state

FLOAT_DTYPES = _arrays.FLOAT_DTYPES


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
    return torch.from_numpy(_fb.type_table(typename, blocksize)).to(device)


def _own(x):
    return x.clone() if isinstance(x, torch.Tensor) else x.copy()


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
    blocksize = check_blocksize_4bit(blocksize)
    if isinstance(A, torch.Tensor) and out is None and absmax is None and isinstance(quant_storage, torch.dtype):
        _fb.check_quant_type(quant_type)
        out, absmax = torch.ops.bnbcy.quantize_4bit.default(A, blocksize, quant_type, quant_storage)
        code = torch.from_numpy(_fb.type_table(quant_type)).to(A.device)
        shape = A.shape
    else:
        out, absmax = _fb.quantize_4bit(A, blocksize, quant_type, quant_storage, out=out, absmax=absmax)
        code = _own(_fb.type_code(quant_type, _C.view(absmax, "absmax")))
        shape = tuple(A.shape)
    if compress_statistics:
        offset = absmax.mean()
        if isinstance(absmax, np.ndarray):
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


def state_absmax(quant_state):
    """float32 block maxima of a 4-bit state (the double-quantized ones expanded)."""
    if not quant_state.nested:
        return quant_state.absmax
    absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax


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
    if quant_state is None:
        if absmax is None or out is None:
            raise ValueError("dequantize_4bit needs quant_state, or both absmax and out")
        quant_state = QuantState(absmax=absmax, shape=tuple(out.shape), dtype=out.dtype,
                                 blocksize=check_blocksize_4bit(blocksize), quant_type=quant_type)
    check_quant_state(quant_state, four_bit=True)
    _fb.check_quant_type(quant_state.quant_type)
    blocksize = check_blocksize_4bit(quant_state.blocksize, "quant_state.blocksize")
    absmax = state_absmax(quant_state)
    shape, dtype = list(quant_state.shape), quant_state.dtype
    if isinstance(A, torch.Tensor) and isinstance(absmax, torch.Tensor) and isinstance(dtype, torch.dtype) \
            and (out is None or isinstance(out, torch.Tensor)):
        if out is None:
            out = torch.ops.bnbcy.dequantize_4bit.default(A, absmax, blocksize, quant_state.quant_type, shape, dtype)
        else:
            _arrays.check_not_lazy(out, "out")
            torch.ops.bnbcy.dequantize_4bit.out(A, absmax, blocksize, quant_state.quant_type, shape, dtype, out)
    else:
        out = _fb.dequantize_4bit(A, absmax, blocksize, quant_state.quant_type, shape, dtype, out=out)
    a_shape = tuple(A.shape)
    if len(a_shape) == 2 and a_shape[0] == 1 and a_shape[1] > 1:
        return out.t() if isinstance(out, torch.Tensor) else out.T
    return out


def dequantize_fp4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type='fp4'``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "fp4")


def dequantize_nf4(A, quant_state=None, absmax=None, out=None, blocksize=None):
    """:func:`dequantize_4bit` with ``quant_type='nf4'``."""
    return dequantize_4bit(A, quant_state, absmax, out, blocksize, "nf4")
