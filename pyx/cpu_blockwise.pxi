# CPU kernels of 8-bit blockwise quantization; the loops live in
# include/bnbcy_cpu_blockwise8.h and run with the GIL released, in parallel
# with OpenMP.

from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport uint8_t

cdef extern from "bnbcy_cpu_blockwise8.h" nogil:
    int bnbcy_cpu_isa()
    ctypedef struct bnbcy_q8_table:
        int steps
        int one_per_bucket
    int bnbcy_q8_build_table(const float *code, bnbcy_q8_table *t)
    int bnbcy_q8_quantize(const void *A, int dtype, int64_t n, int64_t blocksize,
                          const float *code, const bnbcy_q8_table *table, uint8_t *q,
                          float *absmax, int nthreads)
    int bnbcy_q8_dequantize(const uint8_t *q, const float *code, const float *absmax,
                            int64_t n, int64_t blocksize, void *out, int dtype, int nthreads)

# Search tables by code-map bytes. Maps are few (the dynamic map, a handful of
# user maps), a table is 66 KB, so a small bounded cache is enough.
cdef dict _q8_tables = {}
cdef int _Q8_TABLE_CACHE = 16


cdef object _q8_table(TensorView code):
    """Bytes holding a bnbcy_q8_table for ``code``, or None for the literal search."""
    key = PyBytes_FromStringAndSize(<char *>code.data, 256 * sizeof(float))
    try:
        return _q8_tables[key]
    except KeyError:
        pass
    buf = PyBytes_FromStringAndSize(NULL, sizeof(bnbcy_q8_table))
    cdef bnbcy_q8_table *t = <bnbcy_q8_table *>PyBytes_AS_STRING(buf)
    cdef const float *c = <const float *>code.data
    cdef int rc
    with nogil:
        rc = bnbcy_q8_build_table(c, t)
    table = buf if rc == 0 else None
    if len(_q8_tables) >= _Q8_TABLE_CACHE:
        _q8_tables.pop(next(iter(_q8_tables)))
    _q8_tables[key] = table
    return table


def cpu_isa():
    """Instruction set the CPU kernels use now: 'avx512', 'avx2' or 'scalar'
    (the best the CPU has, lowered by ``BNBCY_CPU_ISA``)."""
    _sync_isa()
    return ("scalar", "avx2", "avx512")[bnbcy_cpu_isa()]


def q8_search_info(TensorView code):
    """How the CPU quantizer searches ``code``: 'literal', 'packed' (one table
    read per element) or 'table:<k>' (k midpoint compares per element)."""
    table = _q8_table(code)
    if table is None:
        return "literal"
    cdef const bnbcy_q8_table *t = <const bnbcy_q8_table *>PyBytes_AS_STRING(table)
    return "packed" if t.one_per_bucket else f"table:{t.steps}"


cdef void _require(TensorView v, str name, str dtype, int64_t numel) except *:
    # Last line of defence: the Python layer validates first, with friendlier messages.
    if v.is_cuda:
        raise ValueError(f"{name} must be on the CPU for a CPU kernel, got {v.device}")
    if not v.contiguous:
        raise ValueError(f"{name} must be contiguous")
    if dtype is not None and v.dtype != dtype:
        raise ValueError(f"{name} must be {dtype}, got {v.dtype}")
    if numel >= 0 and v.numel != numel:
        raise ValueError(f"{name} must have {numel} elements, got {v.numel}")


cdef int _float_code(TensorView v, str name) except -1:
    if v.dtype == "float32":
        return 0
    if v.dtype == "float16":
        return 1
    if v.dtype == "bfloat16":
        return 2
    raise ValueError(f"{name} must be float32, float16 or bfloat16, got {v.dtype}")


def cpu_quantize_blockwise(TensorView A, TensorView code, TensorView q, TensorView absmax,
                           int64_t blocksize):
    """Quantize ``A`` into ``q`` (uint8) and ``absmax`` (float32) on the CPU."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    cdef int64_t n = A.numel
    cdef int64_t nblocks = n // blocksize + (n % blocksize != 0)  # cannot overflow
    _require(A, "A", None, -1)
    _require(code, "code", "float32", 256)
    _require(q, "out", "uint8", n)
    _require(absmax, "absmax", "float32", nblocks)
    if q.readonly or absmax.readonly:
        raise ValueError("out and absmax must be writable")
    cdef int dtype = _float_code(A, "A")
    table = _q8_table(code)
    cdef const bnbcy_q8_table *t = NULL
    if table is not None:
        t = <const bnbcy_q8_table *>PyBytes_AS_STRING(table)
    cdef const void *a = A.data
    cdef const float *c = <const float *>code.data
    cdef uint8_t *qp = <uint8_t *>q.data
    cdef float *am = <float *>absmax.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_q8_quantize(a, dtype, n, blocksize, c, t, qp, am, nthreads)


def cpu_dequantize_blockwise(TensorView q, TensorView code, TensorView absmax, TensorView out,
                             int64_t blocksize):
    """Dequantize ``q`` with ``code`` and per-block ``absmax`` into ``out`` on the CPU."""
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    cdef int64_t n = q.numel
    cdef int64_t nblocks = n // blocksize + (n % blocksize != 0)  # cannot overflow
    _require(q, "A", "uint8", -1)
    _require(code, "code", "float32", 256)
    _require(absmax, "absmax", "float32", -1)
    _require(out, "out", None, n)
    if absmax.numel < nblocks:
        raise ValueError(f"absmax must have at least {nblocks} elements, got {absmax.numel}")
    if out.readonly:
        raise ValueError("out must be writable")
    cdef int dtype = _float_code(out, "out")
    cdef const uint8_t *qp = <const uint8_t *>q.data
    cdef const float *c = <const float *>code.data
    cdef const float *am = <const float *>absmax.data
    cdef void *o = out.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_q8_dequantize(qp, c, am, n, blocksize, o, dtype, nthreads)
