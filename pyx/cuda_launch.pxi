# The one launch path of every GPU kernel: cuLaunchKernel from the CUDA driver,
# resolved with dlopen at first use so that the extension builds and imports
# on machines without CUDA. Kernel arguments are packed from a signature string
# (one character per parameter) into properly typed slots.

from libc.stdint cimport int32_t, uint32_t, uintptr_t
from libc.string cimport memcpy

cdef extern from "<dlfcn.h>" nogil:
    void *dlopen(const char *filename, int flag)
    void *dlsym(void *handle, const char *symbol)
    char *dlerror()
    int RTLD_NOW
    int RTLD_GLOBAL

ctypedef int (*cuLaunchKernel_t)(void *f, unsigned int gx, unsigned int gy, unsigned int gz,
                                 unsigned int bx, unsigned int by, unsigned int bz,
                                 unsigned int shmem, void *stream, void **params,
                                 void **extra) noexcept nogil
ctypedef int (*cuGetErrorString_t)(int error, const char **pstr) noexcept nogil
ctypedef int (*cuCtxGetCurrent_t)(void **pctx) noexcept nogil
ctypedef int (*cuDevicePrimaryCtxRetain_t)(void **pctx, int dev) noexcept nogil
ctypedef int (*cuCtxPushCurrent_t)(void *ctx) noexcept nogil
ctypedef int (*cuCtxPopCurrent_t)(void **pctx) noexcept nogil
ctypedef int (*cuStreamSynchronize_t)(void *stream) noexcept nogil
# An emulated kernel's handle points at its entry in the emulator library, whose first member is
# this launch function (bnbcy/_emulator/kernel_table.h).
ctypedef int (*emu_launch_t)(const void *entry, const unsigned int *grid, const unsigned int *block,
                             unsigned int shmem, void **params, int nparams, char *err, int errlen,
                             int flags) noexcept nogil

cdef void *_libcuda = NULL
cdef cuLaunchKernel_t _cuLaunchKernel = NULL
cdef cuGetErrorString_t _cuGetErrorString = NULL
cdef cuCtxGetCurrent_t _cuCtxGetCurrent = NULL
cdef cuDevicePrimaryCtxRetain_t _cuDevicePrimaryCtxRetain = NULL
cdef cuCtxPushCurrent_t _cuCtxPushCurrent = NULL
cdef cuCtxPopCurrent_t _cuCtxPopCurrent = NULL
cdef cuStreamSynchronize_t _cuStreamSynchronize = NULL
cdef dict _primary_ctx = {}

cdef enum:
    _MAX_ARGS = 32


class CudaLaunchError(RuntimeError):
    """A CUDA driver call made by bnbcy failed."""


class EmulatedKernelError(CudaLaunchError):
    """An emulated kernel broke a CUDA rule (partial barrier or shuffle, bad launch, ...)."""

# device argument of cuda_launch for kernels of bnbcy's SIMT emulator
EMULATED_DEVICE = -1


cdef void *_sym(const char *name) except NULL:
    cdef void *p = dlsym(_libcuda, name)
    if p == NULL:
        raise CudaLaunchError(f"libcuda has no symbol {name.decode()}")
    return p


cdef int _load_driver() except -1:
    global _libcuda, _cuLaunchKernel, _cuGetErrorString, _cuCtxGetCurrent
    global _cuDevicePrimaryCtxRetain, _cuCtxPushCurrent, _cuCtxPopCurrent, _cuStreamSynchronize
    if _libcuda != NULL:
        return 0
    cdef void *h = dlopen(b"libcuda.so.1", RTLD_NOW | RTLD_GLOBAL)
    if h == NULL:
        h = dlopen(b"libcuda.so", RTLD_NOW | RTLD_GLOBAL)
    if h == NULL:
        raise CudaLaunchError("cannot load the CUDA driver (libcuda.so.1): is an NVIDIA driver installed?")
    _libcuda = h
    _cuLaunchKernel = <cuLaunchKernel_t>_sym(b"cuLaunchKernel")
    _cuGetErrorString = <cuGetErrorString_t>_sym(b"cuGetErrorString")
    _cuCtxGetCurrent = <cuCtxGetCurrent_t>_sym(b"cuCtxGetCurrent")
    _cuDevicePrimaryCtxRetain = <cuDevicePrimaryCtxRetain_t>_sym(b"cuDevicePrimaryCtxRetain")
    _cuCtxPushCurrent = <cuCtxPushCurrent_t>_sym(b"cuCtxPushCurrent_v2")
    _cuCtxPopCurrent = <cuCtxPopCurrent_t>_sym(b"cuCtxPopCurrent_v2")
    _cuStreamSynchronize = <cuStreamSynchronize_t>_sym(b"cuStreamSynchronize")
    return 0


cdef str _cu_error(int rc):
    cdef const char *s = NULL
    if _cuGetErrorString != NULL and _cuGetErrorString(rc, &s) == 0 and s != NULL:
        return f"CUDA error {rc}: {s.decode()}"
    return f"CUDA error {rc}"


cdef int _check(int rc, str what) except -1:
    if rc != 0:
        raise CudaLaunchError(f"{what} failed: {_cu_error(rc)}")
    return 0


ctypedef union _ArgSlot:
    void *p
    long long q
    int i
    unsigned int u
    float f
    double d


def cuda_launch(uintptr_t function, tuple grid, tuple block, unsigned int shared_mem,
                uintptr_t stream, int device, str signature, tuple args, bint sync=False):
    """Launch a CUDA kernel and check the launch.

    Parameters
    ----------
    function : int
        ``CUfunction`` handle (loaded in ``device``'s primary context).
    grid, block : tuple of int
        Launch dimensions, 1 to 3 entries each.
    shared_mem : int
        Dynamic shared memory in bytes.
    stream : int
        ``CUstream`` handle (0 = legacy default stream).
    device : int
        Device ordinal the function and arguments live on; ``EMULATED_DEVICE`` (-1): ``function``
        is a kernel of bnbcy's SIMT emulator and the arguments are host memory.
    signature : str
        One character per kernel parameter: ``p`` pointer (a TensorView, an int
        address or None), ``q`` int64, ``i`` int32, ``u`` uint32, ``f`` float32,
        ``d`` float64.
    args : tuple
        The argument values, matching ``signature``.
    sync : bool
        Synchronise the stream after the launch and report asynchronous errors
        (debugging and tests).

    Raises
    ------
    CudaLaunchError
        If the driver reports an error for the launch (or, with ``sync``, for
        the kernel's execution).
    """
    cdef int nargs = len(signature)
    if nargs != len(args):
        raise ValueError(f"kernel signature {signature!r} has {nargs} parameters, got {len(args)} arguments")
    if nargs > _MAX_ARGS:
        raise ValueError(f"at most {_MAX_ARGS} kernel parameters are supported")
    cdef unsigned int g[3]
    cdef unsigned int b[3]
    _dims(grid, g, "grid")
    _dims(block, b, "block")
    cdef _ArgSlot slots[_MAX_ARGS]
    cdef void *params[_MAX_ARGS]
    cdef int k
    for k in range(nargs):
        c = signature[k]
        a = args[k]
        if c == "p":
            if a is None:
                slots[k].p = NULL
            elif isinstance(a, TensorView):
                slots[k].p = (<TensorView>a).data
            else:
                slots[k].p = <void *><uintptr_t>a
        elif c == "q":
            slots[k].q = a
        elif c == "i":
            slots[k].i = a
        elif c == "u":
            slots[k].u = a
        elif c == "f":
            slots[k].f = a
        elif c == "d":
            slots[k].d = a
        else:
            raise ValueError(f"unknown kernel parameter type {c!r} in signature {signature!r}")
        params[k] = &slots[k]

    if device == EMULATED_DEVICE:
        _emulated_launch(function, g, b, shared_mem, params, nargs, grid, block)
        return
    _load_driver()
    cdef void *ctx = _primary_context(device)
    cdef void *popped = NULL
    cdef void *current = NULL
    cdef int rc
    cdef int rc_sync = 0
    cdef bint pushed = False
    cdef void *f = <void *>function
    cdef void *s = <void *>stream
    with nogil:
        # Kernels live in the device's primary context (the one torch and CuPy
        # use); make it current only when the calling thread is elsewhere.
        if _needs_push(_cuCtxGetCurrent(&current), current, ctx):
            rc = _cuCtxPushCurrent(ctx)
            pushed = rc == 0
        else:
            rc = 0
        if rc == 0:
            rc = _cuLaunchKernel(f, g[0], g[1], g[2], b[0], b[1], b[2], shared_mem, s,
                                 params, NULL)
            if rc == 0 and sync:
                rc_sync = _cuStreamSynchronize(s)
        if pushed:
            _cuCtxPopCurrent(&popped)
    _check(rc, f"launch of a kernel on cuda:{device} with grid {grid} and block {block}")
    _check(rc_sync, f"kernel execution on cuda:{device} (grid {grid}, block {block})")


cdef inline bint _needs_push(int rc, void *current, void *primary) noexcept nogil:
    # Only the retained primary context itself will do: another context current on the same
    # device (cuCtxCreate, a library's own) has neither the loaded modules nor the memory.
    return rc != 0 or current == NULL or current != primary


def _context_needs_push(int rc, uintptr_t current, uintptr_t primary):
    """Whether a launch pushes the primary context, given cuCtxGetCurrent's result (tests)."""
    return _needs_push(rc, <void *>current, <void *>primary)


cdef int _emulated_launch(uintptr_t function, unsigned int *g, unsigned int *b, unsigned int shared_mem,
                          void **params, int nargs, tuple grid, tuple block) except -1:
    cdef char err[2048]
    cdef emu_launch_t launch = (<emu_launch_t *>function)[0]
    cdef const void *entry = <const void *>function
    cdef int rc
    err[0] = 0
    with nogil:
        rc = launch(entry, g, b, shared_mem, params, nargs, err, 2048, 0)
    if rc != 0:
        raise EmulatedKernelError(f"emulated kernel (grid {grid}, block {block}): {err.decode(errors='replace')}")
    return 0


cdef void *_primary_context(int device) except NULL:
    cdef void *ctx = NULL
    try:
        return <void *><uintptr_t>_primary_ctx[device]
    except KeyError:
        pass
    _check(_cuDevicePrimaryCtxRetain(&ctx, device), f"cuDevicePrimaryCtxRetain({device})")
    _primary_ctx[device] = <uintptr_t>ctx
    return ctx


cdef int _dims(tuple t, unsigned int *out, str name) except -1:
    if not 1 <= len(t) <= 3:
        raise ValueError(f"{name} must have 1 to 3 dimensions, got {t}")
    out[0] = out[1] = out[2] = 1
    for i, x in enumerate(t):
        if x < 1:
            raise ValueError(f"{name} dimensions must be positive, got {t}")
        out[i] = x
    return 0
