# CPU kernels of 4-bit quantization and dequantization; the loops live in
# include/bnbcy_cpu_fourbit.h and run with the GIL released (OpenMP). The 4-bit matmul runs the
# execution layout's kernels (cpu_fourbit_exec.pxi).

from libc.stdint cimport uint32_t

cdef extern from "bnbcy_cpu_fourbit.h" nogil:
    ctypedef struct bnbcy_q4_scales:
        const float *absmax
        const uint8_t *qabs
        const float *code2
        const float *absmax2
        float offset
        int log2_blocksize2
    const uint32_t *bnbcy_nf4_lut_bits
    const uint32_t *bnbcy_fp4_lut_bits
    int bnbcy_q4_quantize(const void *A, int dtype, int64_t n, int64_t blocksize, int fp4, uint8_t *q,
                          float *absmax, int nthreads)
    int bnbcy_q4_dequantize(const uint8_t *q, const float *lut, const bnbcy_q4_scales *sc,
                            int64_t start, int64_t count, int64_t blocksize, void *out, int dtype,
                            int nthreads)


cdef int _quant_type_code(str quant_type) except -1:
    if quant_type == "nf4":
        return 0
    if quant_type == "fp4":
        return 1
    raise ValueError(f"quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


cdef int _q4_scales(bnbcy_q4_scales *sc, object scales, int64_t nblocks) except -1:
    """Fill ``sc`` from ``scales``: a float32 TensorView, or the nested tuple
    ``(qabs uint8, code2 float32[256], absmax2 float32, offset, blocksize2)``."""
    cdef TensorView v, code2, absmax2
    cdef int64_t bs2
    if isinstance(scales, TensorView):
        v = scales
        _require(v, "absmax", "float32", -1)
        if v.numel < nblocks:
            raise ValueError(f"absmax must have at least {nblocks} values, got {v.numel}")
        sc.absmax = <const float *>v.data
        sc.qabs = NULL
        return 0
    v, code2, absmax2, offset, bs2 = scales
    _require(v, "absmax", "uint8", -1)
    _require(code2, "nested code", "float32", 256)
    _require(absmax2, "nested absmax", "float32", -1)
    if bs2 <= 0 or bs2 & (bs2 - 1):
        raise ValueError(f"nested blocksize must be a power of two, got {bs2}")
    if v.numel < nblocks or absmax2.numel < (nblocks + bs2 - 1) // bs2:
        raise ValueError(f"nested absmax holds too few values for {nblocks} blocks")
    sc.absmax = NULL
    sc.qabs = <const uint8_t *>v.data
    sc.code2 = <const float *>code2.data
    sc.absmax2 = <const float *>absmax2.data
    sc.offset = offset
    sc.log2_blocksize2 = (bs2 - 1).bit_length()
    return 0


def cpu_quantize_4bit(TensorView A, TensorView q, TensorView absmax, int64_t blocksize, str quant_type):
    """Quantize ``A`` to packed 4-bit codes ``q`` ((n+1)//2 bytes) and float32 ``absmax``."""
    if blocksize <= 0 or blocksize % 2:
        raise ValueError(f"blocksize must be a positive even number, got {blocksize}")
    cdef int64_t n = A.numel
    cdef int64_t nblocks = (n + blocksize - 1) // blocksize
    _require(A, "A", None, -1)
    _require(q, "out", "uint8", (n + 1) // 2)
    _require(absmax, "absmax", "float32", nblocks)
    if q.readonly or absmax.readonly:
        raise ValueError("out and absmax must be writable")
    cdef int dtype = _float_code(A, "A")
    cdef int fp4 = _quant_type_code(quant_type)
    cdef const void *a = A.data
    cdef uint8_t *qp = <uint8_t *>q.data
    cdef float *am = <float *>absmax.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_q4_quantize(a, dtype, n, blocksize, fp4, qp, am, nthreads)


def cpu_dequantize_4bit(TensorView q, scales, TensorView out, int64_t start, int64_t blocksize,
                        str quant_type):
    """Dequantize elements ``[start, start + out.numel)`` of the packed ``q`` into ``out``.

    ``scales`` is the float32 absmax view or the nested tuple (see ``_q4_scales``).
    """
    if blocksize <= 0:
        raise ValueError(f"blocksize must be positive, got {blocksize}")
    cdef int64_t count = out.numel
    if start < 0 or (start + count + 1) // 2 > q.numel:
        raise ValueError(f"elements [{start}, {start + count}) are past the {q.numel} packed bytes")
    _require(q, "A", "uint8", -1)
    _require(out, "out", None, -1)
    if out.readonly:
        raise ValueError("out must be writable")
    cdef int dtype = _float_code(out, "out")
    cdef bnbcy_q4_scales sc
    _q4_scales(&sc, scales, (start + count + blocksize - 1) // blocksize)
    cdef const float *lut = <const float *>(bnbcy_fp4_lut_bits if _quant_type_code(quant_type) else bnbcy_nf4_lut_bits)
    cdef const uint8_t *qp = <const uint8_t *>q.data
    cdef void *o = out.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_q4_dequantize(qp, lut, &sc, start, count, blocksize, o, dtype, nthreads)
