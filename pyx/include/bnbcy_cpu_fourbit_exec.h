/* CPU inference kernels of the 4-bit execution path (docs/fourbit.md, "Inference on the CPU").
 *
 * They read the weight in its storage format -- bitsandbytes' packed codes (element e in
 * nibble e of the flat weight, even elements in the high nibble) with float32 or nested
 * absmax -- so nothing is repacked and the storage stays the one source of truth.
 *
 * Decoding 8 weights on AVX2: one 4-byte broadcast load holds 8 consecutive nibbles; a
 * variable right shift (4,0,12,8,20,16,28,24) brings nibble j into the low bits of lane j,
 * in element order; two 8-entry permutes (table halves 0-7 and 8-15, vpermps reads the low
 * 3 bits) and a blend on bit 3 give the float32 table values. AVX-512 CPUs run this AVX2 code
 * too (no separate AVX-512 variant: it could not be tested on the machines this was built on).
 *
 * Two kernels:
 *  - bnbcy_q4x_gemm_fused: out[M, N] = A @ W.T (+ bias) for few rows: each weight row is decoded
 *    once per 8 rows of A and reused for all of them (its 2 KB stay in L1 across the passes),
 *    so memory reads the packed weight once per call; float32 accumulation.
 *  - bnbcy_q4x_dequant_rows: rows [n0, n1) of W as float32 into a cache-sized tile, for the
 *    tiled many-row path (tile + BLAS in the Python layer).
 * The row cut-over and thread counts are chosen per ISA in bnbcy/_ops/fourbit_exec.py. */
#ifndef BNBCY_CPU_FOURBIT_EXEC_H
#define BNBCY_CPU_FOURBIT_EXEC_H
#include "bnbcy_cpu_fourbit.h"

/* Rows of A handled per pass over one decoded weight row (accumulators stay in registers). */
#define BNBCY_Q4X_ROWS_PER_PASS 8

typedef struct {
    const uint8_t *q;     /* packed codes of the flat [N, K] weight */
    int64_t N, K;
    int lg;               /* log2 of the (power-of-two) blocksize */
    float lut[16];        /* the map, flushed to zero as bnbcy_q4_dequantize reads it */
    bnbcy_q4_scales sc;
} bnbcy_q4x_weight;

static inline float bnbcy_q4x_scale(const bnbcy_q4x_weight *W, int64_t b) {
    return bnbcy_ftz(bnbcy_q4_scale(&W->sc, b));
}

/* Calls F(e, end, s) for each block-aligned run [e, end) of flat elements [e0, e1), with the
 * run's scale s. */
#define BNBCY_Q4X_FOR_RUNS(W, e0, e1, F)                                          \
    for (int64_t e_ = (e0); e_ < (e1);) {                                         \
        const int64_t b_ = e_ >> (W)->lg;                                         \
        const int64_t end_ = ((b_ + 1) << (W)->lg) < (e1) ? ((b_ + 1) << (W)->lg) : (e1); \
        const float s_ = bnbcy_q4x_scale((W), b_);                                \
        F(e_, end_, s_);                                                          \
        e_ = end_;                                                                \
    }

#if BNBCY_HAVE_AVX512_PATH /* x86-64 with GCC/Clang: the AVX2 path exists */
#define BNBCY_AVX2_FMA __attribute__((target("avx2,fma,f16c")))
/* Every AVX2 CPU made so far has FMA, but the ISA does not promise it. */
static int bnbcy_q4x_has_fma(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("fma");
    }
    return cached;
}
typedef struct {
    __m256 lo, hi;   /* table entries 0-7 and 8-15 */
    __m256i shifts;  /* nibble j of a little-endian dword -> low bits of lane j */
    __m256i seven;
} bnbcy_q4x_dec;

BNBCY_AVX2_FMA static inline bnbcy_q4x_dec bnbcy_q4x_dec_init(const float *lut) {
    bnbcy_q4x_dec d;
    d.lo = _mm256_loadu_ps(lut);
    d.hi = _mm256_loadu_ps(lut + 8);
    d.shifts = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    d.seven = _mm256_set1_epi32(7);
    return d;
}

/* The table values of the 8 weights whose nibbles are the 4 bytes at p (elements in order). */
BNBCY_AVX2_FMA static inline __m256 bnbcy_q4x_dec8(const bnbcy_q4x_dec *d, const uint8_t *p) {
    const __m256i v = _mm256_srlv_epi32(_mm256_castps_si256(_mm256_broadcast_ss((const float *)p)), d->shifts);
    const __m256 a = _mm256_permutevar8x32_ps(d->lo, v), b = _mm256_permutevar8x32_ps(d->hi, v);
    /* bit 3 set <=> (v & 15) > 7; compare on the ALU ports, the shuffle ports are the bottleneck */
    const __m256i hi = _mm256_cmpgt_epi32(_mm256_and_si256(v, _mm256_set1_epi32(15)), d->seven);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(hi));
}

BNBCY_AVX2_FMA static inline float bnbcy_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* y[r] = sum_j a[r*lda + j] * W.flat[e0 + j], j < len, r < R (a span of one weight row):
 * R (1..8) is a compile-time constant after inlining. One row: unscaled partial sums per block,
 * scaled once; several: the decoded weights are scaled once and used for all R rows. */
BNBCY_AVX2_FMA static inline __attribute__((always_inline)) void
bnbcy_q4x_rows_avx2(const float *a, int64_t lda, const bnbcy_q4x_weight *W, int64_t e0, int64_t len, float *y,
                    const int R) {
    const bnbcy_q4x_dec d = bnbcy_q4x_dec_init(W->lut);
    /* eight named accumulators, not an array: GCC stores an accumulator array back to the stack
     * on every iteration; with R constant the unused ones vanish */
    __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0,
           acc6 = acc0, acc7 = acc0;
    float extra[BNBCY_Q4X_ROWS_PER_PASS];
    for (int r = 0; r < R; r++) extra[r] = 0.0f;
#define BNBCY_Q4X_FMA(r) if (R > r) acc##r = _mm256_fmadd_ps(_mm256_loadu_ps(ap + r * lda), w, acc##r);
#define BNBCY_Q4X_RUN(e, end, s)                                                                   \
    {                                                                                              \
        int64_t i = (e);                                                                           \
        if (i & 1) { /* odd start (odd K): the low nibble of its byte */                           \
            const float w = W->lut[bnbcy_nibble(W->q, i)] * (s);                                   \
            for (int r = 0; r < R; r++) extra[r] += a[r * lda + (i - e0)] * w;                     \
            i++;                                                                                   \
        }                                                                                          \
        if (R == 1) {                                                                              \
            __m256 p0 = _mm256_setzero_ps(), p1 = _mm256_setzero_ps();                             \
            for (; i + 16 <= (end); i += 16) {                                                     \
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + (i - e0)), bnbcy_q4x_dec8(&d, W->q + ((uint64_t)i >> 1)), p0); \
                p1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + (i - e0) + 8), bnbcy_q4x_dec8(&d, W->q + ((uint64_t)i >> 1) + 4), p1); \
            }                                                                                      \
            for (; i + 8 <= (end); i += 8)                                                         \
                p0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + (i - e0)), bnbcy_q4x_dec8(&d, W->q + ((uint64_t)i >> 1)), p0); \
            acc0 = _mm256_fmadd_ps(_mm256_add_ps(p0, p1), _mm256_set1_ps(s), acc0);                \
        } else {                                                                                   \
            const __m256 vs = _mm256_set1_ps(s);                                                   \
            for (; i + 8 <= (end); i += 8) {                                                       \
                const __m256 w = _mm256_mul_ps(bnbcy_q4x_dec8(&d, W->q + ((uint64_t)i >> 1)), vs);              \
                const float *ap = a + (i - e0);                                                    \
                BNBCY_Q4X_FMA(0) BNBCY_Q4X_FMA(1) BNBCY_Q4X_FMA(2) BNBCY_Q4X_FMA(3)                 \
                BNBCY_Q4X_FMA(4) BNBCY_Q4X_FMA(5) BNBCY_Q4X_FMA(6) BNBCY_Q4X_FMA(7)                 \
            }                                                                                      \
        }                                                                                          \
        for (; i < (end); i++) { /* the last < 8 weights of the run */                            \
            const float w = W->lut[bnbcy_nibble(W->q, i)] * (s);                                   \
            for (int r = 0; r < R; r++) extra[r] += a[r * lda + (i - e0)] * w;                     \
        }                                                                                          \
    }
    BNBCY_Q4X_FOR_RUNS(W, e0, e0 + len, BNBCY_Q4X_RUN)
#undef BNBCY_Q4X_RUN
#undef BNBCY_Q4X_FMA
    const __m256 accs[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    for (int r = 0; r < R; r++) y[r] = bnbcy_hsum8(accs[r]) + extra[r];
}

#define BNBCY_Q4X_ROWS_BODY(a, lda, W, e0, len, y, R) bnbcy_q4x_rows_avx2(a, lda, W, e0, len, y, R)
BNBCY_AVX2_FMA static void bnbcy_q4x_rows_avx2_any(const float *a, int64_t lda, int rows,
                                                     const bnbcy_q4x_weight *W, int64_t e0, int64_t len, float *y) {
    BNBCY_ROWS_DISPATCH(BNBCY_Q4X_ROWS_BODY, rows, a, lda, W, e0, len, y);
}
#undef BNBCY_Q4X_ROWS_BODY

/* w[j] = ftz(lut[nibble(e + j)] * s), j < len, e even (as bnbcy_q4_dequantize computes it). */
BNBCY_AVX2_FMA static int64_t bnbcy_q4x_dequant_run_avx2(const bnbcy_q4x_weight *W, int64_t e, int64_t len,
                                                           float s, float *w) {
    const bnbcy_q4x_dec d = bnbcy_q4x_dec_init(W->lut);
    const __m256 vs = _mm256_set1_ps(s);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8)
        _mm256_storeu_ps(w + i, bnbcy_ftz8(_mm256_mul_ps(bnbcy_q4x_dec8(&d, W->q + ((uint64_t)(e + i) >> 1)), vs)));
    return i;
}
#else
static int bnbcy_q4x_has_fma(void) { return 0; }
static inline void bnbcy_q4x_rows_avx2_any(const float *a, int64_t lda, int rows, const bnbcy_q4x_weight *W,
                                           int64_t e0, int64_t len, float *y) {}
static inline int64_t bnbcy_q4x_dequant_run_avx2(const bnbcy_q4x_weight *W, int64_t e, int64_t len, float s,
                                                 float *w) { return 0; }
#endif

/* The scalar form of bnbcy_q4x_rows_avx2 (any number of rows up to BNBCY_Q4X_ROWS_PER_PASS). */
static void bnbcy_q4x_rows_scalar(const float *a, int64_t lda, int R, const bnbcy_q4x_weight *W, int64_t e0,
                                  int64_t len, float *y) {
    for (int r = 0; r < R; r++) y[r] = 0.0f;
#define BNBCY_Q4X_RUN_SCALAR(e, end, s)                                                  \
    for (int r = 0; r < R; r++) {                                                        \
        float part = 0.0f;                                                               \
        for (int64_t i = (e); i < (end); i++) part += a[r * lda + (i - e0)] * W->lut[bnbcy_nibble(W->q, i)]; \
        y[r] += part * (s);                                                              \
    }
    BNBCY_Q4X_FOR_RUNS(W, e0, e0 + len, BNBCY_Q4X_RUN_SCALAR)
#undef BNBCY_Q4X_RUN_SCALAR
}

/* Fill W; returns -1 for a blocksize that is not a power of two. */
static int bnbcy_q4x_weight_init(bnbcy_q4x_weight *W, const uint8_t *q, const float *code,
                                 const bnbcy_q4_scales *sc, int64_t blocksize, int64_t N, int64_t K) {
    if (blocksize <= 0 || (blocksize & (blocksize - 1))) return -1;
    W->q = q;
    W->N = N;
    W->K = K;
    W->lg = __builtin_ctzll((unsigned long long)blocksize);
    for (int i = 0; i < 16; i++) W->lut[i] = bnbcy_ftz(code[i]);
    W->sc = *sc;
    return 0;
}

/* Weight rows per row block: their packed bytes (<= 64 KB) stay in L2 while each group of
 * BNBCY_Q4X_ROWS_PER_PASS rows of A (from L2 as well) passes over them. */
static int64_t bnbcy_q4x_row_block(int64_t N, int64_t K) {
    int64_t nb = ((int64_t)1 << 17) / (K > 0 ? K : 1);
    if (nb < 1) nb = 1;
    return nb > N ? N : nb;
}

/* out[m, n] = T(sum_k A[m, k] * W[n, k] + bias[n]) (float32 accumulation, one rounding to T).
 * Threads split the weight into row blocks; per block, each group of up to
 * BNBCY_Q4X_ROWS_PER_PASS rows of A takes every weight row of the block, decoding 8 weights at a
 * time once for the whole group. Memory reads the packed weight once per call. The sums gather
 * in a float32 [N, M] buffer and go to out row by row per block. (Chunking K so that A stays in
 * L1 measured slower: A streams well from L2.) */
static int bnbcy_q4x_gemm_fused(const bnbcy_q4x_weight *W, const void *A, int dtype, int64_t M,
                                const void *bias, void *out, int nthreads, int isa) {
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16) return -1;
    const int64_t N = W->N, K = W->K, NB = bnbcy_q4x_row_block(N, K);
    float *af = (float *)malloc((size_t)(M * K) * sizeof(float) + 64);
    float *acc = (float *)malloc((size_t)(M * N) * sizeof(float) + 64);
    if (!af || !acc) {
        free(af);
        free(acc);
        return -2;
    }
    for (int64_t i = 0; i < M * K; i++) af[i] = bnbcy_load_any(A, dtype, i);
    const int vec = isa >= BNBCY_ISA_AVX2 && bnbcy_q4x_has_fma();
    /* equal passes (9 rows: 5 + 4, not 8 + 1: a lone row runs the slower one-row loop) */
    const int64_t passes = (M + BNBCY_Q4X_ROWS_PER_PASS - 1) / BNBCY_Q4X_ROWS_PER_PASS;
    const int64_t per_pass = (M + passes - 1) / passes;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t n0 = 0; n0 < N; n0 += NB) {
        const int64_t n1 = n0 + NB < N ? n0 + NB : N;
        for (int64_t m = 0; m < M; m += per_pass) {
            const int rows = M - m < per_pass ? (int)(M - m) : (int)per_pass;
            for (int64_t n = n0; n < n1; n++) {
                if (vec) bnbcy_q4x_rows_avx2_any(af + m * K, K, rows, W, n * K, K, acc + n * M + m);
                else bnbcy_q4x_rows_scalar(af + m * K, K, rows, W, n * K, K, acc + n * M + m);
            }
        }
        /* row by row of out: its rows lie N values apart, and writing a column of 16 of them per
         * weight row would put 16 lines a multiple of 4 KB apart in one 8-way L1 set */
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = n0; n < n1; n++)
                bnbcy_store_any(out, dtype, m * N + n, acc[n * M + m] + (bias ? bnbcy_load_any(bias, dtype, n) : 0.0f));
    }
    free(af);
    free(acc);
    return 0;
}

/* buf[(n - n0) * K + k] = ftz(lut[code] * scale) for rows n0 <= n < n1: the same values as
 * bnbcy_q4_dequantize writes as float32. */
static int bnbcy_q4x_dequant_rows(const bnbcy_q4x_weight *W, int64_t n0, int64_t n1, float *buf, int nthreads,
                                  int isa) {
    const int64_t K = W->K;
    if (n0 < 0 || n1 > W->N || n0 > n1) return -1;
    const int vec = isa >= BNBCY_ISA_AVX2 && bnbcy_q4x_has_fma();
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t n = n0; n < n1; n++) {
        float *w = buf + (n - n0) * K;
        const int64_t e0 = n * K;
#define BNBCY_Q4X_RUN_DEQ(e, end, s)                                                       \
        {                                                                                  \
            int64_t i = (e);                                                               \
            if (vec && (i & 1)) { w[i - e0] = bnbcy_ftz(W->lut[bnbcy_nibble(W->q, i)] * (s)); i++; } \
            if (vec) i += bnbcy_q4x_dequant_run_avx2(W, i, (end) - i, (s), w + (i - e0));  \
            for (; i < (end); i++) w[i - e0] = bnbcy_ftz(W->lut[bnbcy_nibble(W->q, i)] * (s)); \
        }
        BNBCY_Q4X_FOR_RUNS(W, e0, e0 + K, BNBCY_Q4X_RUN_DEQ)
#undef BNBCY_Q4X_RUN_DEQ
    }
    return 0;
}

#endif
