# A pool of large CPU output buffers, recycled across calls.
#
# torch and NumPy give every large CPU allocation fresh pages from the kernel, which zeroes and
# maps them on first touch: for a dequantized 64 MB output that costs three times the kernel
# itself. Outputs of at least _POOL_MIN_BYTES come from here instead; when the last array using a
# buffer dies the buffer returns to the pool (up to BNBCY_CPU_POOL_MB megabytes cached, default
# 512; 0 turns the pool off) and the next output of its size class reuses the mapped pages, as
# torch's CUDA caching allocator does for device memory. empty_cpu_cache() unmaps what is cached.

from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_STRIDES, PyBUF_WRITABLE

cdef extern from "bnbcy_cpu_pool.h" nogil:
    size_t BNBCY_POOL_ALIGN
    void *bnbcy_pool_map(size_t bytes, void **base, size_t *mapped)
    void bnbcy_pool_unmap(void *base, size_t mapped)

cdef Py_ssize_t _POOL_MIN_BYTES = 4 << 20
cdef char *_POOL_FORMAT = "B"


cdef size_t _pool_limit_from_env() except? 0:
    # bnbcy._env parses BNBCY_CPU_POOL_MB (whole megabytes, bounded so the byte count fits size_t)
    from bnbcy import _env
    return <size_t>_env.cpu_pool_bytes()


# size class (bytes) -> list of (aligned pointer, base, mapped length) as ints
cdef dict _pool_free = {}
cdef size_t _pool_cached = 0
cdef size_t _pool_limit = 0
cdef bint _pool_limit_read = False


cdef size_t _pool_get_limit() except? 0:
    global _pool_limit, _pool_limit_read
    if not _pool_limit_read:
        _pool_limit = _pool_limit_from_env()
        _pool_limit_read = True
    return _pool_limit


cdef class PoolBuffer:
    """A writable byte buffer from the CPU output pool; returns to the pool when freed."""
    cdef char *ptr
    cdef void *base
    cdef size_t capacity, mapped
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __cinit__(self):
        self.ptr = NULL

    def __getbuffer__(self, Py_buffer *view, int flags):
        view.buf = self.ptr
        view.obj = self
        view.len = self.nbytes
        view.readonly = 0
        view.itemsize = 1
        view.format = _POOL_FORMAT if flags & PyBUF_FORMAT else NULL
        view.ndim = 1
        self.shape[0] = self.nbytes
        self.strides[0] = 1
        view.shape = self.shape if flags & PyBUF_ND else NULL
        view.strides = self.strides if flags & PyBUF_STRIDES == PyBUF_STRIDES else NULL
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        global _pool_cached
        if self.ptr == NULL:
            return
        # (at interpreter exit the module's dict may already be gone: then just unmap)
        if _pool_free is not None and _pool_cached + self.capacity <= _pool_limit:
            _pool_free.setdefault(self.capacity, []).append(
                (<size_t>self.ptr, <size_t>self.base, self.mapped))
            _pool_cached += self.capacity
        else:
            bnbcy_pool_unmap(self.base, self.mapped)
        self.ptr = NULL


def pool_buffer(Py_ssize_t nbytes):
    """A PoolBuffer of ``nbytes`` bytes (uninitialised), or None when the pool is off or
    ``nbytes`` is below its threshold (the caller then allocates as usual)."""
    global _pool_cached
    if nbytes < _POOL_MIN_BYTES or _pool_get_limit() == 0:
        return None
    cdef size_t capacity = ((<size_t>nbytes + BNBCY_POOL_ALIGN - 1) // BNBCY_POOL_ALIGN) * BNBCY_POOL_ALIGN
    cdef PoolBuffer buf = PoolBuffer.__new__(PoolBuffer)
    cdef void *base = NULL
    cdef size_t mapped = 0
    free_list = _pool_free.get(capacity)
    if free_list:
        p, b, m = free_list.pop()
        _pool_cached -= capacity
        buf.ptr = <char *><size_t>p
        buf.base = <void *><size_t>b
        buf.mapped = m
    else:
        buf.ptr = <char *>bnbcy_pool_map(capacity, &base, &mapped)
        if buf.ptr == NULL:
            raise MemoryError(f"cannot map {capacity} bytes for a CPU output")
        buf.base = base
        buf.mapped = mapped
    buf.capacity = capacity
    buf.nbytes = nbytes
    return buf


def pool_stats():
    """``{'cached_bytes', 'limit_bytes', 'buffers'}`` of the CPU output pool."""
    return {"cached_bytes": _pool_cached, "limit_bytes": _pool_get_limit(),
            "buffers": sum(len(v) for v in _pool_free.values())}


def pool_release():
    """Unmap every cached buffer (buffers in use are not affected)."""
    global _pool_cached
    for lst in _pool_free.values():
        for p, b, m in lst:
            bnbcy_pool_unmap(<void *><size_t>b, <size_t>m)
    _pool_free.clear()
    _pool_cached = 0
