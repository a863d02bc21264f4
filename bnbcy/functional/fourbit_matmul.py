"""Matrix products with a packed 4-bit weight (NUMERICS.md §4): ``A @ W.T (+ bias)``
where ``W`` is ``[N, K]`` (out_features x in_features), quantized flat and row-major.

Torch tensors go through ``torch.ops.bnbcy.gemm_4bit`` / ``gemv_4bit`` (differentiable in A
and bias), CuPy/NumPy arrays and ``out=`` through :func:`bnbcy.backends.fourbit.gemm_4bit`.
Where it runs (:mod:`bnbcy.backends.cpu`, :mod:`bnbcy.backends.cuda`):

* CPU: up to the execution plan's ``fused_max_rows`` rows of A run the fused Cython/OpenMP
  kernel of ``Linear4bit``'s inference path (``bnbcy._ops.fourbit_exec``), which reads the
  packed weight directly. More rows dequantize the weight in
  chunks of rows into a small buffer and multiply each chunk with the BLAS of
  the array's framework, so the dense weight is never materialised whole.
* CUDA: one row runs the gemv kernel, 2-16 rows the fused small-batch kernel
  (both need ``K % 32 == 0``); everything else dequantizes the weight and runs
  the framework's dense matmul, as bitsandbytes does.
"""
from __future__ import annotations

import torch

from .. import _arrays
from ..backends import fourbit as _fb
from .fourbit import state_absmax
from .quant_state import check_quant_state


def _state_nk(state):
    if state is None:
        raise ValueError("state cannot be None: the 4-bit matmul needs the QuantState from quantize_4bit()")
    check_quant_state(state, "state", four_bit=True)
    if len(state.shape) != 2:
        raise ValueError(f"the 4-bit weight must be 2-D [out_features, in_features], got shape {state.shape}")
    return int(state.shape[0]), int(state.shape[1])


def gemm_args(state):
    """``(absmax, blocksize, quant_type, absmax_8bit, absmax_code, absmax_offset)`` of the
    ``gemm_4bit`` op for ``state`` (bitsandbytes' mapping of a nested state)."""
    _fb.check_quant_type(state.quant_type)
    if not state.nested:
        return state.absmax, state.blocksize, state.quant_type, None, None, None
    if state.state2.blocksize != _fb.NESTED_BLOCKSIZE:
        raise NotImplementedError("nested quantization with state2.blocksize != 256 is not supported")
    return state.state2.absmax, state.blocksize, state.quant_type, state.absmax, state.state2.code, state.offset


def _all_torch(*xs):
    return all(x is None or isinstance(x, torch.Tensor) for x in xs)


def gemm_4bit(A, B, state, bias=None, out=None):
    """``A @ W.T (+ bias)`` for the packed 4-bit weight ``W`` (``B``) with quant state ``state``.

    Parameters
    ----------
    A : array
        ``(..., K)``, float32/float16/bfloat16.
    B : array
        The packed weight (any quant_storage view, transposed or not).
    state : QuantState
        2-D ``shape == (N, K)``.
    bias : array, optional
        ``[N]`` of A's dtype.
    out : array, optional
        ``(..., N)`` of A's dtype.

    Returns
    -------
    array
        ``(..., N)`` in A's dtype, framework and device.
    """
    N, K = _state_nk(state)
    absmax, blocksize, qt, absmax_8bit, absmax_code, offset = gemm_args(state)
    blocksize = _fb.check_blocksize_4bit(blocksize, "state.blocksize")
    if out is None and isinstance(A, torch.Tensor) and _all_torch(B, bias, absmax, absmax_8bit, absmax_code, offset):
        return torch.ops.bnbcy.gemm_4bit.default(A, B, [N, K], absmax, blocksize, qt, bias, absmax_8bit,
                                                 absmax_code, offset)
    return _fb.gemm_4bit(A, B, (N, K), absmax, blocksize, qt, bias, absmax_8bit, absmax_code, offset, out=out)


def gemv_4bit(A, B, out=None, transposed_A=False, transposed_B=False, state=None):
    """``A @ W.T`` for a packed 4-bit weight, meant for one row of A (token-by-token inference).

    bitsandbytes' signature; ``transposed_A``/``transposed_B`` are ignored as there.
    Unlike bitsandbytes' CUDA kernel, which reads only the first row, every row of
    ``A`` (``(..., K)``) is multiplied.

    Returns
    -------
    array
        ``(..., N)`` in A's dtype.
    """
    if state is None:
        raise ValueError("state cannot be None. gemv_4bit() requires the state from quantize_4bit()")
    N, K = _state_nk(state)
    absmax = state_absmax(state)
    blocksize = _fb.check_blocksize_4bit(state.blocksize, "state.blocksize")
    if isinstance(A, torch.Tensor) and _all_torch(B, absmax, state.code, out):
        if out is None:
            return torch.ops.bnbcy.gemv_4bit.default(A, B, [N, K], absmax, state.code, blocksize)
        _arrays.check_not_lazy(out, "out")
        torch.ops.bnbcy.gemv_4bit.out(A, B, [N, K], absmax, state.code, blocksize, out)
        return out
    return _fb.gemv_4bit(A, B, (N, K), absmax, state.code, blocksize, out=out)
