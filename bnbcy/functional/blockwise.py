"""8-bit blockwise quantization: ``quantize_blockwise`` / ``dequantize_blockwise``
(NUMERICS.md §2), bitsandbytes' signatures. Torch tensors go through the ops
``torch.ops.bnbcy.{quantize,dequantize}_blockwise``; CuPy/NumPy arrays and caller-provided
outputs through the same array-level functions (:mod:`bnbcy.backends.blockwise`)."""
from __future__ import annotations

import numpy as np
import torch

from .. import _C, _arrays
from ..backends import blockwise as _bw
from ..backends.blockwise import check_blocksize, code_view  # noqa: F401  (public helpers)
from .quant_state import QuantState, check_quant_state

FLOAT_DTYPES = _bw.FLOAT_DTYPES
CUDA_BLOCKSIZES = _bw.BLOCKWISE_BLOCKSIZES

# default map per torch device (a tensor the ops can take); never written into
_default_torch_codes: dict = {}


def _torch_code(code, A):
    """``code`` as the op takes it: a tensor on A's device (None: the dynamic map)."""
    if code is None:
        code = _default_torch_codes.get(A.device)
        if code is None:
            from .maps import dynamic_map
            code = _default_torch_codes[A.device] = dynamic_map().to(A.device)
    return code


def _via_op(A, *arrays):
    """Whether a call goes through the torch op: torch tensors only, no caller buffers."""
    return isinstance(A, torch.Tensor) and all(x is None or isinstance(x, torch.Tensor) for x in arrays)


def _mean(x):
    """0-d float32 mean in x's framework (torch's reduction order for torch)."""
    m = x.mean()
    if isinstance(x, np.ndarray):
        m = np.asarray(m, dtype=np.float32)
    return m


def _own(code):
    # the state owns its map (as in bitsandbytes): later edits of `code` do not leak in
    return code.clone() if isinstance(code, torch.Tensor) else code.copy()


def quantize_blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
    """Quantize a tensor to 8-bit codes in blocks of ``blocksize`` values.

    Each block is scaled by its absolute maximum and every value replaced by the
    index of the nearest entry of ``code`` (exact ties to the even index).

    Parameters
    ----------
    A : torch.Tensor, cupy.ndarray or numpy.ndarray
        float32, float16 or bfloat16 input, any shape (non-contiguous inputs are copied).
    code : array, optional
        float32[256] sorted map; default the signed dynamic map.
    absmax : array, optional
        float32[ceil(n/blocksize)] to receive the block maxima (not with ``nested``).
    out : array, optional
        uint8 array of A's shape to receive the codes.
    blocksize : int
        64, 128, ..., 4096 on CUDA; any positive value on the CPU.
    nested : bool
        Also quantize the block maxima (after subtracting their mean).

    Returns
    -------
    q : array
        uint8 codes, A's shape, A's framework and device.
    quant_state : QuantState

    Raises
    ------
    TypeError
        ``A`` is not an array.
    ValueError
        Wrong dtype, empty ``A``, invalid ``blocksize``, bad ``code``/``out``/``absmax``.

    Notes
    -----
    Edge cases follow bitsandbytes' CUDA kernel: NaN is ignored in the block
    maximum and gets code 0; an all-zero block gets code 0 everywhere (it
    dequantizes to -0.0); in a block holding ±inf, finite values get the code of
    0.0 and ±inf code 0.
    """
    if nested and absmax is not None:
        raise ValueError("absmax= cannot be combined with nested=True: the state's absmax is then uint8 codes")
    if _via_op(A, code) and out is None and absmax is None:
        code = _torch_code(code, A)
        out, absmax = torch.ops.bnbcy.quantize_blockwise.default(A, code, _bw.as_blocksize(blocksize))
        state_code = code.to(A.device, copy=True)
    else:
        out, absmax = _bw.quantize_blockwise(A, code, blocksize, out=out, absmax=absmax)
        like = _C.view(out, "out")
        state_code = _own(_bw.default_code(like) if code is None else _arrays.to_like(code, like))
    if nested:
        offset = _mean(absmax)
        absmax -= offset
        qabs, state2 = quantize_blockwise(absmax, blocksize=blocksize, nested=False)
        return out, QuantState(absmax=qabs, code=state_code, blocksize=blocksize, dtype=A.dtype,
                               offset=offset, state2=state2)
    return out, QuantState(absmax=absmax, code=state_code, blocksize=blocksize, dtype=A.dtype)


def dequantize_blockwise(A, quant_state=None, absmax=None, code=None, out=None, blocksize=4096, nested=False):
    """Undo :func:`quantize_blockwise`: ``y = code[A] * absmax[block]`` in the state's dtype.

    Parameters
    ----------
    A : array
        uint8 codes.
    quant_state : QuantState, optional
        State from :func:`quantize_blockwise`; when given, ``absmax``, ``code`` and
        ``blocksize`` are ignored.
    absmax : array, optional
        float32 block maxima (required without ``quant_state``).
    code : array, optional
        The map; default the signed dynamic map.
    out : array, optional
        Output of A's shape and the state's dtype.
    blocksize : int
        Without ``quant_state``: the block size (float32 output).

    Returns
    -------
    array
        A's shape, ``quant_state.dtype`` (float32 without a state).
    """
    if quant_state is None:
        if absmax is None:
            raise ValueError("dequantize_blockwise needs quant_state or absmax")
        dtype = torch.float32 if isinstance(A, torch.Tensor) else np.float32
    else:
        check_quant_state(quant_state)
        absmax, code, blocksize, dtype = (quant_state.absmax, quant_state.code, quant_state.blocksize,
                                          quant_state.dtype)
        if quant_state.nested:
            absmax = dequantize_blockwise(absmax, quant_state.state2)
            absmax += quant_state.offset
    if _via_op(A, absmax, code, out) and isinstance(dtype, torch.dtype):
        blocksize = _bw.as_blocksize(blocksize)
        code = _torch_code(code, A)
        if out is None:
            return torch.ops.bnbcy.dequantize_blockwise.default(A, absmax, code, blocksize, dtype)
        _arrays.check_not_lazy(out, "out")
        torch.ops.bnbcy.dequantize_blockwise.out(A, absmax, code, blocksize, dtype, out)
        return out
    return _bw.dequantize_blockwise(A, absmax, code, blocksize, dtype, out=out)
