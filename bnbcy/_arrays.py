"""Framework adapters: everything bnbcy does to an array that depends on which
framework owns it (torch, CuPy, NumPy) lives here.

Kernels see arrays only through :class:`bnbcy._C.TensorView`; this module turns
arguments into validated views, allocates outputs with the input's own
framework on the input's device, converts small auxiliary arrays (code maps)
to the input's kind, and finds the stream to launch on.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from . import _C

FLOAT_DTYPES = ("float32", "float16", "bfloat16")

# Size limits of the argument layer. The CPU kernels index with int64 and any blocksize up to
# MAX_BLOCKSIZE (CUDA takes 64..4096); element counts stay below MAX_NUMEL so that every
# offset, byte count and ``start + blocksize`` the kernels form fits int64.
MAX_BLOCKSIZE = 2 ** 31 - 1
MAX_NUMEL = 2 ** 62
# CUDA kernels that take sizes as 32-bit ints (gemv/gemm dims, int8 GEMM dims, 4-bit block shift).
INT32_MAX = 2 ** 31 - 1

_TORCH_DTYPES = {
    "float16": torch.float16, "float32": torch.float32, "float64": torch.float64,
    "bfloat16": torch.bfloat16, "int8": torch.int8, "int16": torch.int16, "int32": torch.int32,
    "int64": torch.int64, "uint8": torch.uint8, "bool": torch.bool,
}


_DTYPE_NAMES: dict = {}


def dtype_name(dtype) -> str:
    """Canonical name (``'float32'``, ``'bfloat16'``, ...) of a torch/NumPy dtype or name."""
    name = _DTYPE_NAMES.get(dtype)
    if name is not None:
        return name
    if isinstance(dtype, torch.dtype):
        name = str(dtype).replace("torch.", "")
    elif isinstance(dtype, str):
        return dtype
    else:
        try:
            name = np.dtype(dtype).name
        except TypeError as exc:
            raise ValueError(f"not a dtype: {dtype!r}") from exc
    _DTYPE_NAMES[dtype] = name
    return name


def framework_dtype(kind: str, name: str):
    """The dtype object of framework ``kind`` for the canonical ``name``."""
    if kind == "torch":
        return _TORCH_DTYPES[name]
    if name == "bfloat16":
        try:
            import ml_dtypes  # NumPy and CuPy know bfloat16 only through ml_dtypes
        except ImportError as exc:
            raise ValueError(f"{kind} arrays cannot hold bfloat16 here (ml_dtypes is not installed)") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _plain(x, kind):
    """Detach torch tensors (DLPack refuses tensors that require grad)."""
    if kind == "torch" and x.requires_grad:
        return x.detach()
    return x


_kind = _C.kind_of


def contiguous(x):
    """``x`` itself when C-contiguous, else a C-contiguous copy by its own framework."""
    kind = _kind(x)
    if kind == "torch":
        return x.contiguous()
    if kind in ("numpy", "cupy"):
        # not ascontiguousarray: it turns 0-d arrays into 1-d ones
        return x if x.flags.c_contiguous else x.copy(order="C")
    return x


def _fmt_dtypes(dtypes) -> str:
    return dtypes[0] if len(dtypes) == 1 else ", ".join(dtypes[:-1]) + " or " + dtypes[-1]


def num_blocks(n: int, blocksize: int) -> int:
    """``ceil(n / blocksize)`` for a validated element count and blocksize.

    Raises
    ------
    ValueError
        ``blocksize`` is not in ``[1, MAX_BLOCKSIZE]`` or ``n`` not in ``[0, MAX_NUMEL]``.
    """
    if not 0 < blocksize <= MAX_BLOCKSIZE:
        raise ValueError(f"blocksize must be in [1, {MAX_BLOCKSIZE}], got {blocksize}")
    if not 0 <= n <= MAX_NUMEL:
        raise ValueError(f"element count must be in [0, {MAX_NUMEL}], got {n}")
    return -(-n // blocksize)


def check_float_dtype(dtype, name: str = "quant_state.dtype") -> str:
    """Canonical name of a float32/float16/bfloat16 dtype (torch, NumPy or name); ValueError otherwise."""
    try:
        got = dtype_name(dtype) if dtype is not None and not isinstance(dtype, bool) else None
    except (ValueError, TypeError):
        got = None
    if got not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be one of {', '.join(FLOAT_DTYPES)} (a torch or NumPy dtype), "
                         f"got {dtype!r}")
    return got


def check_shape(shape, name: str = "quant_state.shape") -> tuple:
    """``shape`` as a tuple of non-negative ints whose product fits the kernels; ValueError otherwise."""
    ok = isinstance(shape, (tuple, list, torch.Size)) and all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d >= 0 for d in shape)
    if ok:
        shape = tuple(int(d) for d in shape)
        n = 1
        for d in shape:
            n *= d
        ok = n <= MAX_NUMEL
    if not ok:
        raise ValueError(f"{name} must be a sequence of non-negative ints with at most {MAX_NUMEL} "
                         f"elements in all, got {shape!r}")
    return shape


def check_index_range(value: int, name: str, limit: int = INT32_MAX):
    """Raise ValueError unless ``0 <= value <= limit`` (a size a kernel takes as a narrower int)."""
    if not 0 <= value <= limit:
        raise ValueError(f"{name} must be in [0, {limit}] for this kernel, got {value}")
    return value


def check_no_overlap(*outputs, inputs=()):
    """Raise ValueError if an output view shares memory with another output or with an input.

    Memory ranges are compared (``TensorView.span`` on the same device), so a slice, a reinterpreting
    ``.view(dtype)`` or any other alias is caught whatever framework made it. Inputs may alias each
    other (both are only read). ``None`` entries are skipped; views of empty arrays overlap nothing.
    One sort and sweep: O(k log k) for k views (optimizer groups pass hundreds).
    """
    spans = sorted(((v.device_type, v.device_id) + v.span + (is_out, i), v)
                   for is_out, group in ((True, outputs), (False, inputs))
                   for i, v in enumerate(group) if v is not None and v.numel > 0)
    dev = reach_any = reach_out = None  # the earlier view reaching furthest (any / outputs only)
    for (dt, di, lo, hi, is_out, _), v in spans:
        if dev != (dt, di):
            dev, reach_any, reach_out = (dt, di), None, None
        other = reach_any if is_out else reach_out
        if other is not None and lo < other[0]:
            a, b = (v, other[1]) if is_out else (other[1], v)
            (a_lo, a_hi), (b_lo, b_hi) = a.span, b.span
            raise ValueError(f"{a.name} must not share memory with {b.name}, got overlapping byte ranges "
                             f"[{a_lo:#x}, {a_hi:#x}) and [{b_lo:#x}, {b_hi:#x})")
        if reach_any is None or hi > reach_any[0]:
            reach_any = (hi, v)
        if is_out and (reach_out is None or hi > reach_out[0]):
            reach_out = (hi, v)


def check_not_lazy(x, name: str):
    """Raise the view layer's ValueError for a torch ``out=`` with the negative/conjugate bit set, before
    it reaches a ``torch.ops.bnbcy.*.out`` overload (torch's dispatcher fails on it unclearly)."""
    if isinstance(x, torch.Tensor) and (x.is_neg() or x.is_conj()):
        _C.view(x, name)


def _resolved(x, kind):
    """A torch tensor with its lazy negative/conjugate bit applied (DLPack exports drop the bit)."""
    if kind == "torch" and (x.is_neg() or x.is_conj()):
        return x.resolve_neg().resolve_conj()
    return x


def input_view(x, name: str, dtypes=None, *, allow_empty: bool = False, make_contiguous: bool = True):
    """Validated view of an input array.

    Parameters
    ----------
    x : array
        torch.Tensor, cupy.ndarray or numpy.ndarray.
    name : str
        Argument name for error messages.
    dtypes : sequence of str, optional
        Accepted canonical dtype names.
    allow_empty : bool
        Whether zero elements are acceptable.
    make_contiguous : bool
        Copy a non-contiguous input (as bitsandbytes does) instead of rejecting it; also
        copy a torch tensor with the negative/conjugate bit set (with False, both are refused).

    Returns
    -------
    TensorView
    """
    if x is None or not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a torch.Tensor, cupy.ndarray or numpy.ndarray, "
                        f"got {type(x).__name__}")
    kind = _kind(x)
    if dtypes is not None:
        got = dtype_name(x.dtype)
        if got not in dtypes:
            raise ValueError(f"{name} must have dtype {_fmt_dtypes(dtypes)}, got {got}")
    if make_contiguous:  # a copy is allowed: also apply a lazy negation (in-place arguments are refused)
        x = _resolved(contiguous(x), kind)
    v = _C.view(_plain(x, kind), name)
    if not v.contiguous:
        raise ValueError(f"{name} must be contiguous (C order), got strides {v.strides} for shape {v.shape}")
    if not allow_empty and v.numel == 0:
        raise ValueError(f"{name} must not be empty, got shape {v.shape}")
    return v


def output_view(x, name: str, like, dtype: str, numel: int, shape=None):
    """Validated view of a caller-provided output array (``out=``, ``absmax=``).

    It must be of ``like``'s framework and device, contiguous, writable, of
    ``dtype`` and with ``numel`` elements (and ``shape`` when given); a torch tensor
    with the negative or conjugate bit set is refused (writes would land negated).
    Overlap with the inputs is checked by the op (:func:`check_no_overlap`).
    """
    if not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a {like.kind} array, got {type(x).__name__}")
    kind = _kind(x)
    if kind != like.kind:
        raise ValueError(f"{name} must be a {like.kind} array like the input, got a {kind} array")
    got = dtype_name(x.dtype)
    if got != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {got}")
    v = _C.view(_plain(x, kind), name)
    if v.device != like.device:
        raise ValueError(f"{name} must be on {like.device} like the input, got {v.device}")
    if not v.contiguous:
        raise ValueError(f"{name} must be contiguous (C order), got strides {v.strides}")
    if v.readonly:
        raise ValueError(f"{name} must be writable")
    if v.numel != numel or (shape is not None and tuple(v.shape) != tuple(shape)):
        want = f"shape {tuple(shape)}" if shape is not None else f"{numel} elements"
        raise ValueError(f"{name} must have {want}, got shape {v.shape}")
    return v


def check_same_device(v, like, name: str):
    """Raise ValueError unless ``v`` is of ``like``'s framework and device."""
    if v.kind != like.kind or v.device != like.device:
        raise ValueError(f"{name} must be a {like.kind} array on {like.device} like the input, "
                         f"got a {v.kind} array on {v.device}")


def _pooled_empty(kind: str, shape: tuple, dtype: str):
    """A CPU array of ``kind`` backed by a buffer of bnbcy's CPU output pool (``pyx/cpu_pool.pxi``),
    or None for small outputs or with the pool off."""
    numel = math.prod(shape)
    raw = np.dtype(np.uint16) if dtype == "bfloat16" else np.dtype(dtype)
    buf = _C.pool_buffer(numel * raw.itemsize)
    if buf is None:
        return None
    arr = np.frombuffer(buf, dtype=raw, count=numel).reshape(shape)
    if kind == "numpy":
        return arr.view(framework_dtype("numpy", dtype)) if dtype == "bfloat16" else arr
    t = torch.from_numpy(arr)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def empty(like, shape, dtype: str):
    """Uninitialised array of ``like``'s framework and device.

    Large CPU outputs (torch and NumPy) come from bnbcy's CPU output pool, which recycles mapped
    pages across calls; CUDA torch uses torch's caching allocator, CuPy its memory pool.
    """
    shape = tuple(shape)
    if like.kind in ("torch", "numpy") and not like.is_cuda and dtype != "bool":
        out = _pooled_empty(like.kind, shape, dtype)
        if out is not None:
            return out
    if like.kind == "torch":
        return torch.empty(shape, dtype=_TORCH_DTYPES[dtype], device=like.obj.device)
    if like.kind == "numpy":
        return np.empty(shape, dtype=framework_dtype("numpy", dtype))
    if like.kind == "cupy":
        import cupy
        with cupy.cuda.Device(like.device_id):
            return cupy.empty(shape, dtype=framework_dtype("cupy", dtype))
    raise TypeError(f"unsupported array kind {like.kind}")


def to_like(x, like, dtype: str | None = None):
    """``x`` converted to ``like``'s framework and device (no copy if already there)."""
    kind = _kind(x)
    if like.kind == "torch":
        if kind == "numpy":
            t = torch.from_numpy(np.ascontiguousarray(x))
        elif kind == "cupy":
            t = torch.from_dlpack(x)
        else:
            t = x
        t = t.detach().to(like.obj.device)
        return t if dtype is None else t.to(_TORCH_DTYPES[dtype])
    if like.kind == "numpy":
        if kind == "torch":
            a = x.detach().cpu().numpy()
        elif kind == "cupy":
            a = x.get()
        else:
            a = np.asarray(x)
        return a if dtype is None else a.astype(framework_dtype("numpy", dtype), copy=False)
    if like.kind == "cupy":
        import cupy
        with cupy.cuda.Device(like.device_id):
            if kind == "torch":
                a = cupy.from_dlpack(x.detach()) if x.is_cuda else cupy.asarray(x.detach().numpy())
            else:
                a = cupy.asarray(x)
            if a.device.id != like.device_id:  # peer copy onto like's device
                a = cupy.array(a, copy=True)
            return a if dtype is None else a.astype(framework_dtype("cupy", dtype), copy=False)
    raise TypeError(f"unsupported array kind {like.kind}")


def current_stream(like) -> int:
    """Handle of the current CUDA stream of ``like``'s framework on its device."""
    if like.kind == "torch":
        return torch._C._cuda_getCurrentRawStream(like.device_id)
    if like.kind == "cupy":
        import cupy
        with cupy.cuda.Device(like.device_id):
            return cupy.cuda.get_current_stream().ptr
    raise ValueError(f"{like.kind} arrays have no CUDA stream")
