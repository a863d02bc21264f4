"""8-bit blockwise quantization: ``quantize_blockwise`` / ``dequantize_blockwise``
(NUMERICS.md §2). CPU arrays run the Cython/OpenMP kernels, CUDA arrays the
``cuda_src/blockwise8.cu`` kernels through the kernel registry."""
from __future__ import annotations

import numbers

from .. import _C, _arrays, kernels
from .maps import dynamic_map
from .quant_state import QuantState

FLOAT_DTYPES = _arrays.FLOAT_DTYPES
CUDA_BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)
# Elements per CUDA thread; must equal BNBCY_Q8_ITEMS in cuda_src/blockwise8.cu.
_ITEMS = 8
_DEQUANT_THREADS = 256
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

_QUANTIZE = kernels.register(kernels.KernelSpec(
    "quantize_blockwise", "blockwise8", "bnbcy_quantize_blockwise_{dtype}_{blocksize}", "ppppq",
    (("dtype", tuple(_SUFFIX.values())), ("blocksize", CUDA_BLOCKSIZES))))
_DEQUANTIZE = kernels.register(kernels.KernelSpec(
    "dequantize_blockwise", "blockwise8", "bnbcy_dequantize_blockwise_{dtype}", "ppppqi",
    (("dtype", tuple(_SUFFIX.values())),)))

# The default map, per (framework, device), so CUDA calls do not copy it each time.
_default_codes: dict = {}


def check_blocksize(blocksize, like, allowed_cuda=CUDA_BLOCKSIZES):
    """Validate ``blocksize`` for an op on ``like``'s device; return it as int."""
    if isinstance(blocksize, bool) or not isinstance(blocksize, numbers.Integral):
        raise ValueError(f"blocksize must be a positive int, got {blocksize!r}")
    blocksize = int(blocksize)
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    if kernels.use_cuda_kernels(like) and blocksize not in allowed_cuda:
        raise ValueError(f"blocksize must be one of {allowed_cuda} on CUDA, got {blocksize}")
    return blocksize


def code_view(code, like):
    """View of the code map (float32[256]) on ``like``'s framework and device."""
    if code is None:
        key = (like.kind, like.device)
        code = _default_codes.get(key)
        if code is None:
            code = _default_codes[key] = _arrays.to_like(dynamic_map(), like)
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


def _device_str(like):
    # how each framework spells the device of an array on like's device
    if like.kind == "torch":
        return str(like.obj.device)
    if like.kind == "cupy":
        return f"<CUDA Device {like.device_id}>"
    return "cpu"


def _launch_quantize(a, code, q, absmax, blocksize):
    if kernels.use_cuda_kernels(a):
        threads = max(256, blocksize // _ITEMS)
        grid = -(-a.numel // (threads * _ITEMS))
        kernels.registry.launch(_QUANTIZE, {"dtype": _SUFFIX[a.dtype], "blocksize": blocksize},
                                (grid,), (threads,), (a, code, q, absmax, a.numel), a)
    else:
        _C.cpu_quantize_blockwise(a, code, q, absmax, blocksize)


def _launch_dequantize(q, code, absmax, out, blocksize):
    if kernels.use_cuda_kernels(q):
        grid = -(-q.numel // (_DEQUANT_THREADS * _ITEMS))
        kernels.registry.launch(_DEQUANTIZE, {"dtype": _SUFFIX[out.dtype]}, (grid,), (_DEQUANT_THREADS,),
                                (q, code, absmax, out, q.numel, blocksize.bit_length() - 1), q)
    else:
        _C.cpu_dequantize_blockwise(q, code, absmax, out, blocksize)


def _mean(x):
    """0-d float32 mean in x's framework (torch's reduction order for torch)."""
    m = x.mean()
    if _arrays._kind(x) == "numpy":
        import numpy as np
        m = np.asarray(m, dtype=np.float32)
    return m


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
    a = _arrays.input_view(A, "A", FLOAT_DTYPES)
    blocksize = check_blocksize(blocksize, a)
    if nested and absmax is not None:
        raise ValueError("absmax= cannot be combined with nested=True: the state's absmax is then uint8 codes")
    codev = code_view(code, a)
    nblocks = -(-a.numel // blocksize)
    if out is None:
        out = _arrays.empty(a, a.shape, "uint8")
    qv = _arrays.output_view(out, "out", a, "uint8", a.numel, a.shape)
    if absmax is None:
        absmax = _arrays.empty(a, (nblocks,), "float32")
    amv = _arrays.output_view(absmax, "absmax", a, "float32", nblocks)
    _launch_quantize(a, codev, qv, amv, blocksize)

    # the state owns its map (as in bitsandbytes): later edits of `code` do not leak in
    state_code = codev.obj.clone() if a.kind == "torch" else codev.obj.copy()
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
    if quant_state is None and absmax is None:
        raise ValueError("dequantize_blockwise needs quant_state or absmax")
    q = _arrays.input_view(A, "A", ("uint8",))
    if quant_state is None:
        quant_state = QuantState(absmax=absmax, code=code, blocksize=blocksize,
                                 dtype=_arrays.framework_dtype(q.kind, "float32"))
    blocksize = check_blocksize(quant_state.blocksize, q)
    out_dtype = _arrays.dtype_name(quant_state.dtype)
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"quant_state.dtype must be float32, float16 or bfloat16, got {out_dtype}")

    scales = quant_state.absmax
    if quant_state.nested:
        scales = dequantize_blockwise(scales, quant_state.state2)
        scales += quant_state.offset
    nblocks = -(-q.numel // blocksize)
    amv = _arrays.input_view(scales, "absmax", ("float32",))
    _arrays.check_same_device(amv, q, "absmax")
    if amv.numel < nblocks:
        raise ValueError(f"absmax must have at least {nblocks} values for {q.numel} codes in blocks of "
                         f"{blocksize}, got {amv.numel}")
    codev = code_view(quant_state.code, q)
    if out is None:
        out = _arrays.empty(q, q.shape, out_dtype)
    outv = _arrays.output_view(out, "out", q, out_dtype, q.numel, q.shape)
    _launch_dequantize(q, codev, amv, outv, blocksize)
    return out
