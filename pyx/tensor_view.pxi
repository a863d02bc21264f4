# TensorView: a zero-copy view of any DLPack-capable array (torch.Tensor,
# cupy.ndarray, numpy.ndarray) as pointer, shape, strides, dtype and device.
#
# The view keeps the DLPack capsule alive and never renames it, so the
# producer's capsule destructor releases the export when the view dies; the
# memory therefore stays valid exactly as long as the view does.

from cpython.pycapsule cimport PyCapsule_IsValid, PyCapsule_GetPointer
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport getenv
from libc.string cimport strcmp

cdef extern from "bnbcy_cpu_simd.h":
    int bnbcy_isa_request

cdef extern from "bnbcy_dlpack.h":
    ctypedef struct BnbcyDLDevice:
        int device_type
        int device_id
    ctypedef struct BnbcyDLDataType:
        unsigned char code
        unsigned char bits
        unsigned short lanes
    ctypedef struct BnbcyDLTensor:
        void *data
        BnbcyDLDevice device
        int ndim
        BnbcyDLDataType dtype
        int64_t *shape
        int64_t *strides
        uint64_t byte_offset
    ctypedef struct BnbcyDLManagedTensor:
        BnbcyDLTensor dl_tensor
    ctypedef struct BnbcyDLManagedTensorVersioned:
        uint64_t flags
        BnbcyDLTensor dl_tensor
    uint64_t BNBCY_DLPACK_FLAG_READ_ONLY
    int BNBCY_DL_CPU, BNBCY_DL_CUDA, BNBCY_DL_CUDA_HOST, BNBCY_DL_CUDA_MANAGED


# (DLDataTypeCode, bits) -> canonical dtype name shared by every framework.
cdef dict _DTYPE_NAMES = {
    (2, 16): "float16", (2, 32): "float32", (2, 64): "float64", (4, 16): "bfloat16",
    (0, 8): "int8", (0, 16): "int16", (0, 32): "int32", (0, 64): "int64",
    (1, 8): "uint8", (1, 16): "uint16", (1, 32): "uint32", (1, 64): "uint64",
    (6, 8): "bool", (5, 64): "complex64", (5, 128): "complex128",
}

cdef dict _ITEMSIZE = {
    "float16": 2, "float32": 4, "float64": 8, "bfloat16": 2, "int8": 1, "int16": 2,
    "int32": 4, "int64": 8, "uint8": 1, "uint16": 2, "uint32": 4, "uint64": 8,
    "bool": 1, "complex64": 8, "complex128": 16,
}


cdef dict _kinds = {}


cdef str _kind_of(object obj):
    """'torch', 'cupy', 'numpy' or the top-level module of another producer."""
    cls = type(obj)
    kind = _kinds.get(cls)
    if kind is None:
        # walk the MRO: subclasses defined elsewhere (Params4bit, a user's Tensor subclass,
        # np.ndarray subclasses) belong to the framework of their base class
        for base in cls.__mro__:
            mod = base.__module__ or ""
            kind = next((k for k in ("torch", "cupy", "numpy") if mod == k or mod.startswith(k + ".")), None)
            if kind is not None:
                break
        if kind is None:
            kind = (cls.__module__ or "").split(".")[0]
        _kinds[cls] = kind
    return kind


def kind_of(obj):
    """Framework of an array: 'torch', 'cupy', 'numpy' (or another producer's module)."""
    return _kind_of(obj)


cdef class TensorView:
    """Zero-copy view of a DLPack-capable array.

    Attributes
    ----------
    obj : object
        The viewed array (kept alive by the view).
    kind : str
        ``'torch'``, ``'cupy'`` or ``'numpy'`` (the framework that owns ``obj``).
    dtype : str
        Canonical dtype name (``'float32'``, ``'bfloat16'``, ``'uint8'``, ...).
    shape, strides : tuple of int
        Shape and strides (in elements).
    numel, itemsize : int
    device_type, device_id : int
        DLPack device; ``device`` gives ``'cpu'`` or ``'cuda:N'``.
    contiguous, readonly : bool
    ptr : int
        Address of the first element (byte offset applied).
    name : str
        The argument name the view was made for (error messages).
    span : (int, int)
        Byte addresses ``[lo, hi)`` of the memory the elements occupy (``lo == hi`` when empty).
    """

    cdef readonly object obj
    cdef readonly str kind
    cdef readonly str dtype
    cdef readonly tuple shape
    cdef readonly tuple strides
    cdef readonly int64_t numel
    cdef readonly int itemsize
    cdef readonly int device_type
    cdef readonly int device_id
    cdef readonly bint contiguous
    cdef readonly bint readonly
    cdef readonly str name
    cdef void *data
    cdef int64_t _lo, _hi  # element offsets of the lowest and one past the highest element
    cdef object _capsule

    @property
    def ptr(self):
        return <uintptr_t>self.data

    @property
    def span(self):
        cdef uintptr_t base = <uintptr_t>self.data
        return (base + self._lo * self.itemsize, base + self._hi * self.itemsize)

    @property
    def is_cuda(self):
        return self.device_type == BNBCY_DL_CUDA or self.device_type == BNBCY_DL_CUDA_MANAGED

    @property
    def device(self):
        return f"cuda:{self.device_id}" if self.is_cuda else "cpu"

    @property
    def nbytes(self):
        return self.numel * self.itemsize

    def __repr__(self):
        return (f"TensorView({self.kind}, dtype={self.dtype}, shape={self.shape}, "
                f"device={self.device}, contiguous={self.contiguous})")


cdef object _torch_to_dlpack = None


cdef object _export_torch(object obj):
    # torch.utils.dlpack.to_dlpack is torch's public exporter without the
    # stream handshake of Tensor.__dlpack__ (which bnbcy does not need, see
    # below) and ten times cheaper per call.
    global _torch_to_dlpack
    if _torch_to_dlpack is None:
        from torch.utils.dlpack import to_dlpack
        _torch_to_dlpack = to_dlpack
    return _torch_to_dlpack(obj)


cdef object _export_capsule(object obj, int device_type):
    # CUDA producers get stream=-1: bnbcy launches on the producer's own current
    # stream, so no cross-stream synchronisation is wanted.
    stream = -1 if device_type != BNBCY_DL_CPU and device_type != BNBCY_DL_CUDA_HOST else None
    try:
        return obj.__dlpack__(stream=stream, max_version=(1, 0))
    except TypeError:  # producer predates DLPack 1.0 keyword arguments
        return obj.__dlpack__(stream=stream) if stream is not None else obj.__dlpack__()


cpdef TensorView view(object obj, str name):
    """Return a :class:`TensorView` of ``obj`` without copying.

    Parameters
    ----------
    obj : torch.Tensor, cupy.ndarray or numpy.ndarray
        Any object implementing ``__dlpack__`` and ``__dlpack_device__``.
    name : str
        Argument name used in error messages.

    Raises
    ------
    TypeError
        If ``obj`` does not support DLPack.
    ValueError
        If its dtype or device is one bnbcy does not understand.
    """
    if not hasattr(obj, "__dlpack__") or not hasattr(obj, "__dlpack_device__"):
        raise TypeError(f"{name} must be a torch.Tensor, cupy.ndarray or numpy.ndarray, "
                        f"got {type(obj).__module__}.{type(obj).__qualname__}")
    _sync_isa()
    cdef TensorView v = TensorView.__new__(TensorView)
    cdef str kind = _kind_of(obj)
    if kind == "torch" and (obj.is_neg() or obj.is_conj()):
        # torch's DLPack export drops the negative bit: the view would read -x
        raise ValueError(f"{name} is a {'negative' if obj.is_neg() else 'conjugate'} view (a lazily negated "
                         f"tensor); pass {name}.resolve_neg().resolve_conj(), got is_neg={obj.is_neg()}, "
                         f"is_conj={obj.is_conj()}")
    try:
        if kind == "torch":
            cap = _export_torch(obj)
        else:
            cap = _export_capsule(obj, int(obj.__dlpack_device__()[0]))
    except (BufferError, RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} cannot be shared through DLPack: {exc}") from exc
    cdef BnbcyDLTensor *t
    cdef BnbcyDLManagedTensorVersioned *mv
    cdef BnbcyDLManagedTensor *ml
    if PyCapsule_IsValid(cap, "dltensor_versioned"):
        mv = <BnbcyDLManagedTensorVersioned *>PyCapsule_GetPointer(cap, "dltensor_versioned")
        t = &mv.dl_tensor
        v.readonly = (mv.flags & BNBCY_DLPACK_FLAG_READ_ONLY) != 0
    elif PyCapsule_IsValid(cap, "dltensor"):
        ml = <BnbcyDLManagedTensor *>PyCapsule_GetPointer(cap, "dltensor")
        t = &ml.dl_tensor
        v.readonly = False
    else:
        raise TypeError(f"{name}.__dlpack__() did not return a DLPack capsule")

    key = (t.dtype.code, t.dtype.bits)
    if t.dtype.lanes != 1 or key not in _DTYPE_NAMES:
        raise ValueError(f"{name} has a dtype bnbcy does not support "
                         f"(DLPack code {t.dtype.code}, {t.dtype.bits} bits, {t.dtype.lanes} lanes)")
    if t.device.device_type not in (BNBCY_DL_CPU, BNBCY_DL_CUDA, BNBCY_DL_CUDA_HOST,
                                    BNBCY_DL_CUDA_MANAGED):
        raise ValueError(f"{name} is on a device bnbcy does not support "
                         f"(DLPack device type {t.device.device_type}); expected CPU or CUDA")

    v.obj = obj
    v.name = name
    v._capsule = cap
    v.kind = kind
    v.dtype = _DTYPE_NAMES[key]
    v.itemsize = _ITEMSIZE[v.dtype]
    v.device_type = t.device.device_type
    if v.device_type == BNBCY_DL_CUDA_HOST:  # pinned host memory is CPU memory for kernels
        v.device_type = BNBCY_DL_CPU
    v.device_id = t.device.device_id if v.device_type != BNBCY_DL_CPU else 0
    v.data = <void *>(<char *>t.data + t.byte_offset)

    cdef int i
    cdef int64_t numel = 1
    shape = []
    for i in range(t.ndim):
        shape.append(t.shape[i])
        numel *= t.shape[i]
    v.shape = tuple(shape)
    v.numel = numel
    if t.data == NULL and numel > 0:
        # tensor subclasses without storage (DTensor, wrapper subclasses) export no memory
        raise ValueError(f"{name} exports no memory (NULL data pointer with {numel} elements), e.g. a DTensor "
                         f"or another tensor subclass without storage; pass a plain tensor (DTensor: "
                         f"x.to_local() or x.full_tensor()), got {type(obj).__qualname__}")
    cdef int64_t expected = 1
    cdef bint contiguous = True
    if t.strides == NULL:
        v.strides = tuple(_row_major_strides(v.shape))
    else:
        strides = []
        for i in range(t.ndim):
            strides.append(t.strides[i])
        v.strides = tuple(strides)
        for i in range(t.ndim - 1, -1, -1):
            if t.shape[i] != 1 and t.strides[i] != expected:
                contiguous = False
                break
            expected *= t.shape[i]
    v.contiguous = contiguous or numel == 0
    cdef int64_t lo = 0, hi = 1, step
    if numel == 0:
        hi = 0
    else:
        for i in range(t.ndim):
            step = (t.shape[i] - 1) * v.strides[i]
            if step < 0:
                lo += step
            else:
                hi += step
    v._lo, v._hi = lo, hi
    return v


cdef object _env_module = None
cdef bint _isa_synced = False
cdef bytes _isa_raw = None  # the BNBCY_CPU_ISA string bnbcy_isa_request was parsed from


cdef int _sync_isa() except -1:
    """Hand the C kernels BNBCY_CPU_ISA as bnbcy._env parses it, again whenever the variable changes
    (every kernel argument comes through view(), so a changed value is seen by the next call)."""
    global _env_module, _isa_synced, _isa_raw, bnbcy_isa_request
    cdef const char *raw = getenv("BNBCY_CPU_ISA")
    if _isa_synced and ((raw == NULL and _isa_raw is None)
                        or (raw != NULL and _isa_raw is not None and strcmp(raw, _isa_raw) == 0)):
        return 0
    if _env_module is None:
        from bnbcy import _env
        _env_module = _env
    bnbcy_isa_request = _env_module.cpu_isa_request()
    _isa_raw = None if raw == NULL else <bytes>raw
    _isa_synced = True
    return 0


cdef list _row_major_strides(tuple shape):
    cdef list strides = [1] * len(shape)
    cdef int64_t acc = 1
    for i in range(len(shape) - 1, -1, -1):
        strides[i] = acc
        acc *= shape[i]
    return strides
