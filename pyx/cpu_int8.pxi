# CPU kernels of LLM.int8(): vector-wise int8 quantization with outlier columns and the
# dequantization of int32 products. Loops in include/bnbcy_cpu_int8.h, GIL released.

from libc.stdint cimport int8_t, int32_t

cdef extern from "bnbcy_cpu_int8.h" nogil:
    void bnbcy_i8_outlier_cols(const void *A, int dtype, int64_t rows, int64_t cols, float thr,
                               uint8_t *flags, int nthreads)
    int bnbcy_i8_vectorwise_quant(const void *A, int dtype, int64_t rows, int64_t cols, float threshold,
                                  const uint8_t *col_flags, int8_t *CA, float *row_stats, int nthreads)
    int bnbcy_i8_mm_dequant(const int32_t *A, const float *row, const float *col, const void *bias,
                            int bias_dtype, void *out, int out_dtype, int64_t rows, int64_t cols,
                            int nthreads)


def cpu_int8_outlier_cols(TensorView A, TensorView flags, int64_t rows, int64_t cols, float threshold):
    """``flags[c] = 1`` where a row of ``A`` ([rows, cols]) has ``|a| >= threshold`` (in A's dtype)."""
    _require(A, "A", None, rows * cols)
    _require(flags, "flags", "uint8", cols)
    cdef int dtype = _float_code(A, "A")
    cdef const void *a = A.data
    cdef uint8_t *f = <uint8_t *>flags.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_i8_outlier_cols(a, dtype, rows, cols, threshold, f, nthreads)


def cpu_int8_vectorwise_quant(TensorView A, TensorView CA, TensorView row_stats, TensorView col_flags,
                              int64_t rows, int64_t cols, float threshold):
    """Row-wise int8 codes of ``A`` ([rows, cols]) into ``CA`` and ``row_stats``; ``col_flags``
    (uint8 [cols] or None) zeroes whole columns."""
    _require(A, "A", None, rows * cols)
    _require(CA, "CA", "int8", rows * cols)
    _require(row_stats, "row_stats", "float32", rows)
    if col_flags is not None:
        _require(col_flags, "col_flags", "uint8", cols)
    if CA.readonly or row_stats.readonly:
        raise ValueError("CA and row_stats must be writable")
    cdef int dtype = _float_code(A, "A")
    cdef const void *a = A.data
    cdef const uint8_t *f = <const uint8_t *>col_flags.data if col_flags is not None else NULL
    cdef int8_t *q = <int8_t *>CA.data
    cdef float *st = <float *>row_stats.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_i8_vectorwise_quant(a, dtype, rows, cols, threshold, f, q, st, nthreads)


def cpu_int8_mm_dequant(TensorView A, TensorView row_stats, TensorView col_stats, TensorView bias,
                        TensorView out, int64_t rows, int64_t cols):
    """``out = fma(A * row * col, 1/127^2, bias)`` rounded once to out's dtype."""
    _require(A, "A", "int32", rows * cols)
    _require(row_stats, "row_stats", "float32", rows)
    _require(col_stats, "col_stats", "float32", cols)
    _require(out, "out", None, rows * cols)
    if out.readonly:
        raise ValueError("out must be writable")
    cdef int odt = _float_code(out, "out")
    cdef int bdt = 0
    cdef const void *b = NULL
    if bias is not None:
        _require(bias, "bias", None, cols)
        bdt = _float_code(bias, "bias")
        b = bias.data
    cdef const int32_t *a = <const int32_t *>A.data
    cdef const float *r = <const float *>row_stats.data
    cdef const float *c = <const float *>col_stats.data
    cdef void *o = out.data
    cdef int nthreads = omp_get_max_threads()
    with nogil:
        bnbcy_i8_mm_dequant(a, r, c, b, bdt, o, odt, rows, cols, nthreads)
