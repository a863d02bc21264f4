# CPU kernels of the 4-bit inference path (execution layout, docs/fourbit.md); the loops live in
# include/bnbcy_cpu_fourbit_exec.h and run with the GIL released (OpenMP). The op layer
# (bnbcy/_ops/fourbit_exec.py) validates first and picks the kernel, the threads and the tiles.

cdef extern from "bnbcy_cpu_fourbit_exec.h" nogil:
    ctypedef struct bnbcy_q4x_weight:
        pass
    int bnbcy_q4x_weight_init(bnbcy_q4x_weight *W, const uint8_t *q, const float *code,
                              const bnbcy_q4_scales *sc, int64_t blocksize, int64_t N, int64_t K)
    int bnbcy_q4x_gemm_fused(const bnbcy_q4x_weight *W, const void *A, int dtype, int64_t M,
                             const void *bias, void *out, int nthreads, int isa)
    int bnbcy_q4x_dequant_rows(const bnbcy_q4x_weight *W, int64_t n0, int64_t n1, float *buf,
                               int nthreads, int isa)

# The kernels run the instruction set they are given (0 scalar, 1 avx2, 2 avx512: the op layer's
# self-checked choice), clamped in C to what the CPU has and to BNBCY_CPU_ISA (cpu_isa()).


cdef int _q4x_weight(bnbcy_q4x_weight *W, bnbcy_q4_scales *sc, TensorView q, TensorView code, object scales,
                     int64_t N, int64_t K, int64_t blocksize) except -1:
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"blocksize must be a power of two, got {blocksize}")
    if N <= 0 or K <= 0:
        raise ValueError(f"invalid weight shape N={N}, K={K}")
    _require(q, "B", "uint8", -1)
    if q.numel < (N * K + 1) // 2:
        raise ValueError(f"B must hold at least {(N * K + 1) // 2} bytes for a {N}x{K} weight, got {q.numel}")
    _require(code, "code", "float32", 16)
    _q4_scales(sc, scales, (N * K + blocksize - 1) // blocksize)
    bnbcy_q4x_weight_init(W, <const uint8_t *>q.data, <const float *>code.data, sc, blocksize, N, K)
    return 0


def cpu_q4x_gemm_fused(TensorView A, TensorView q, TensorView code, scales, TensorView bias, TensorView out,
                       int64_t M, int64_t N, int64_t K, int64_t blocksize, int nthreads, int isa):
    """``out[M, N] = A[M, K] @ W[N, K]^T (+ bias)`` from the packed weight, each weight row
    decoded once for all rows of ``A`` (``scales``: see ``_q4_scales``; ``bias`` may be None;
    ``isa``: 0 scalar, 1 avx2, 2 avx512, lowered to what the CPU and ``BNBCY_CPU_ISA`` allow)."""
    cdef bnbcy_q4x_weight W
    cdef bnbcy_q4_scales sc
    _q4x_weight(&W, &sc, q, code, scales, N, K, blocksize)
    if M < 0:
        raise ValueError(f"invalid row count M={M}")
    _require(A, "A", None, M * K)
    _require(out, "out", A.dtype, M * N)
    if out.readonly:
        raise ValueError("out must be writable")
    if bias is not None:
        _require(bias, "bias", A.dtype, N)
    cdef int dtype = _float_code(A, "A")
    cdef const void *a = A.data
    cdef const void *bi = bias.data if bias is not None else NULL
    cdef void *o = out.data
    cdef int rc
    if M == 0:
        return
    nthreads = max(1, min(nthreads, omp_get_max_threads()))
    with nogil:
        rc = bnbcy_q4x_gemm_fused(&W, a, dtype, M, bi, o, nthreads, isa)
    if rc == -2:
        raise MemoryError("cpu_q4x_gemm_fused: could not allocate its work buffer")


def cpu_q4x_dequant_rows(TensorView q, TensorView code, scales, TensorView buf, int64_t n0, int64_t n1,
                         int64_t N, int64_t K, int64_t blocksize, int nthreads, int isa):
    """Rows ``[n0, n1)`` of the packed ``[N, K]`` weight as float32 into ``buf`` (row-major,
    ``(n1 - n0) * K`` values at its start), with the values ``cpu_dequantize_4bit`` writes
    (``isa`` as for ``cpu_q4x_gemm_fused``)."""
    cdef bnbcy_q4x_weight W
    cdef bnbcy_q4_scales sc
    _q4x_weight(&W, &sc, q, code, scales, N, K, blocksize)
    if n0 < 0 or n1 > N or n0 > n1:
        raise ValueError(f"rows [{n0}, {n1}) are outside the weight's {N} rows")
    _require(buf, "buf", "float32", -1)
    if buf.numel < (n1 - n0) * K or buf.readonly:
        raise ValueError(f"buf must be a writable float32 buffer of at least {(n1 - n0) * K} values")
    cdef float *b = <float *>buf.data
    nthreads = max(1, min(nthreads, omp_get_max_threads()))
    with nogil:
        bnbcy_q4x_dequant_rows(&W, n0, n1, b, nthreads, isa)
