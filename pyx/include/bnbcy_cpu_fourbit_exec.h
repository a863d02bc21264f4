/* CPU inference kernels of the 4-bit execution path (docs/fourbit.md, "Inference on the CPU").
 *
 * They read the weight in its storage format -- bitsandbytes' packed codes (element e in
 * nibble e of the flat weight, even elements in the high nibble) with float32 or nested
 * absmax -- so nothing is repacked and the storage stays the one source of truth.
 *
 * Decoding 8 weights on AVX2: one 4-byte broadcast load holds 8 consecutive nibbles; a
 * variable right shift (4,0,12,8,20,16,28,24) brings nibble j into the low bits of lane j,
 * in element order; the map lookup is one 16-entry vpermps on AVX-512, two 8-entry ones and a
 * blend on AVX2. The vector loops are written once for both widths in
 * bnbcy_cpu_fourbit_exec_lanes.h; bnbcy/_ops/fourbit_exec.py self-checks a width against the
 * scalar loops below on its first use and falls back when they disagree.
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
    uint8_t planes[4][16];/* planes[k][c] = byte k of lut[c] (the AVX2 group decoder's byte lookups) */
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

/* Calls BODY(..., R) with R = rows as a compile-time constant (1..8), so the per-row
 * accumulators of the always-inline bodies stay in registers. */
#define BNBCY_ROWS_DISPATCH(BODY, rows, ...)                                   \
    switch (rows) {                                                           \
    case 1: BODY(__VA_ARGS__, 1); break;                                      \
    case 2: BODY(__VA_ARGS__, 2); break;                                      \
    case 3: BODY(__VA_ARGS__, 3); break;                                      \
    case 4: BODY(__VA_ARGS__, 4); break;                                      \
    case 5: BODY(__VA_ARGS__, 5); break;                                      \
    case 6: BODY(__VA_ARGS__, 6); break;                                      \
    case 7: BODY(__VA_ARGS__, 7); break;                                      \
    default: BODY(__VA_ARGS__, 8); break;                                     \
    }

#if BNBCY_HAVE_AVX512_PATH /* x86-64 with GCC/Clang: the AVX2 and AVX-512 paths exist */
/* Every AVX2 CPU made so far has FMA, but the ISA does not promise it. */
static int bnbcy_q4x_has_fma(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("fma");
    }
    return cached;
}
/* float16 A to float32 with F16C (exact, as bnbcy_f16_to_f32): A is converted before the threads
 * start, and value by value the software conversion kept float16 inputs ~5-20% behind bfloat16
 * at one row. Returns 0 where the CPU has no F16C (the caller converts value by value); n = 0
 * only asks. */
__attribute__((target("avx,f16c"))) static int bnbcy_q4x_f16_to_f32(const uint16_t *h, float *f, int64_t n) {
    static int has = -1;
    if (has < 0) {
        __builtin_cpu_init();
        has = __builtin_cpu_supports("f16c") != 0;
    }
    if (!has) return 0;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(f + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + i))));
    for (; i < n; i++) f[i] = bnbcy_f16_to_f32(h[i]);
    return 1;
}
#define BNBCY_Q4X_LANES_ISA 1
#include "bnbcy_cpu_fourbit_exec_lanes.h"
#undef BNBCY_Q4X_LANES_ISA
#define BNBCY_Q4X_LANES_ISA 2
#include "bnbcy_cpu_fourbit_exec_lanes.h"
#undef BNBCY_Q4X_LANES_ISA
#else
static int bnbcy_q4x_has_fma(void) { return 0; }
static int bnbcy_q4x_f16_to_f32(const uint16_t *h, float *f, int64_t n) { return 0; }
#define BNBCY_Q4X_STUBS(w)                                                                                  \
    static inline void bnbcy_q4x_rows_##w(const float *a, int64_t lda, int rows, const bnbcy_q4x_weight *W, \
                                          int64_t e0, int64_t len, const float *sbuf, int64_t sb0, float *y) {} \
    static inline void bnbcy_q4x_rows_group_##w(const float *a, int64_t lda, int rows, const bnbcy_q4x_weight *W, \
                                                int64_t e0, int64_t len, const float *sbuf, int64_t sb0, float *y) {} \
    static inline int64_t bnbcy_q4x_dequant_run_##w(const bnbcy_q4x_weight *W, int64_t e, int64_t len,     \
                                                    float s, float *w) { return 0; }                      \
    static inline int bnbcy_q4x_group_src_##w(int j) { return j; }                                    \
    static inline void bnbcy_q4x_block_scales_##w(const bnbcy_q4x_weight *W, int64_t b0, int64_t b1, float *sbuf) {}
BNBCY_Q4X_STUBS(avx2)
BNBCY_Q4X_STUBS(avx512)
#undef BNBCY_Q4X_STUBS
#endif

/* The lane width the kernels run for the requested isa: 2 AVX-512, 1 AVX2+FMA, 0 scalar (never
 * above what the CPU has: the caller's request is clamped here, so no path can fault). */
static int bnbcy_q4x_width(int isa) {
    const int best = bnbcy_cpu_isa();
    if (isa > best) isa = best;
    if (isa >= BNBCY_ISA_AVX512) return 2;
    return isa >= BNBCY_ISA_AVX2 && bnbcy_q4x_has_fma() ? 1 : 0;
}

/* sbuf[b - b0] = the scale of block b, b0 <= b < b1: plain or nested statistics decoded once per
 * row block (not once per block per row pass), vectorized -- decoded one by one they took a third
 * of the one-row time. */
static void bnbcy_q4x_block_scales(const bnbcy_q4x_weight *W, int64_t b0, int64_t b1, float *sbuf, int width) {
    if (width == 2) bnbcy_q4x_block_scales_avx512(W, b0, b1, sbuf);
    else if (width == 1) bnbcy_q4x_block_scales_avx2(W, b0, b1, sbuf);
    else for (int64_t b = b0; b < b1; b++) sbuf[b - b0] = bnbcy_q4x_scale(W, b);
}

/* The scalar form of bnbcy_q4x_rows_{avx2,avx512} (any number of rows up to
 * BNBCY_Q4X_ROWS_PER_PASS): the reference the self-check compares the vector kernels with. */
static void bnbcy_q4x_rows_scalar(const float *a, int64_t lda, int R, const bnbcy_q4x_weight *W, int64_t e0,
                                  int64_t len, const float *sbuf, int64_t sb0, float *y) {
    for (int r = 0; r < R; r++) y[r] = 0.0f;
    for (int64_t e = e0, e1 = e0 + len; e < e1;) {
        const int64_t b = e >> W->lg;
        const int64_t end = ((b + 1) << W->lg) < e1 ? ((b + 1) << W->lg) : e1;
        for (int r = 0; r < R; r++) {
            float part = 0.0f;
            for (int64_t i = e; i < end; i++) part += a[r * lda + (i - e0)] * W->lut[bnbcy_nibble(W->q, i)];
            y[r] += part * sbuf[b - sb0];
        }
        e = end;
    }
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
    for (int k = 0; k < 4; k++)
        for (int i = 0; i < 16; i++) W->planes[k][i] = ((const uint8_t *)W->lut)[4 * i + k];
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

/* Columns of A per K chunk for `rows` rows: rows * kc floats in 16 KB (half of L1), a multiple
 * of 32 (whole groups of the group path), at least 256. */
static int64_t bnbcy_q4x_k_chunk(int rows, int64_t K) {
    int64_t kc = ((int64_t)4096 / rows) & ~(int64_t)31;
    if (kc < 256) kc = 256;
    return kc < K ? kc : K;
}

/* out[m, n] = T(sum_k A[m, k] * W[n, k] + bias[n]) (float32 accumulation, one rounding to T).
 * Threads split the weight into row blocks; per block the scales are decoded once, then each
 * group of up to BNBCY_Q4X_ROWS_PER_PASS rows of A takes every weight row of the block, decoding
 * the weights once for the whole group. Memory reads the packed weight once per call. The sums
 * gather in a float32 [N, M] buffer and go to out row by row per block. (Chunking K so that A
 * stays in L1 measured slower: A streams well from L2.) isa: the instruction set to run
 * (BNBCY_ISA_*, clamped to what the CPU has). */
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
    const int width = bnbcy_q4x_width(isa);
    /* the group path: whole 32-weight groups in blocks, A laid out in the width's group order */
    const int group = width && K % 32 == 0 && W->lg >= 5;
    /* float16 A goes through F16C where the CPU has it, 32 values (one group) at a time */
    const int f16c = dtype == BNBCY_F16 && bnbcy_q4x_f16_to_f32((const uint16_t *)A, af, 0);
    if (group) {
        int src[32];
        float g32[32];
        for (int j = 0; j < 32; j++) src[j] = width == 2 ? bnbcy_q4x_group_src_avx512(j) : bnbcy_q4x_group_src_avx2(j);
        for (int64_t g = 0; g < M * K; g += 32) {
            if (f16c) {
                bnbcy_q4x_f16_to_f32((const uint16_t *)A + g, g32, 32);
                for (int j = 0; j < 32; j++) af[g + j] = g32[src[j]];
            } else {
                for (int j = 0; j < 32; j++) af[g + j] = bnbcy_load_any(A, dtype, g + src[j]);
            }
        }
    } else if (f16c) {
        bnbcy_q4x_f16_to_f32((const uint16_t *)A, af, M * K);
    } else {
        for (int64_t i = 0; i < M * K; i++) af[i] = bnbcy_load_any(A, dtype, i);
    }
    /* equal passes (9 rows: 5 + 4, not 8 + 1: a lone row runs the slower one-row loop) */
    const int64_t passes = (M + BNBCY_Q4X_ROWS_PER_PASS - 1) / BNBCY_Q4X_ROWS_PER_PASS;
    const int64_t per_pass = (M + passes - 1) / passes;
    const int64_t max_blocks = ((NB * K) >> W->lg) + 2; /* blocks a row block touches, at most */
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        float *sbuf = (float *)malloc((size_t)max_blocks * sizeof(float));
        if (!sbuf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t n0 = 0; n0 < N; n0 += NB) {
            if (!sbuf) continue;
            const int64_t n1 = n0 + NB < N ? n0 + NB : N;
            const int64_t b0 = (n0 * K) >> W->lg, b1 = ((n1 * K - 1) >> W->lg) + 1;
            bnbcy_q4x_block_scales(W, b0, b1, sbuf, width);
            for (int64_t m = 0; m < M; m += per_pass) {
                const int rows = M - m < per_pass ? (int)(M - m) : (int)per_pass;
                /* several rows: K in chunks whose rows of A stay in L1 while the block's weight rows
                 * pass (unchunked, each weight row streams all rows of A from L2 again) */
                const int64_t kc = rows == 1 ? K : bnbcy_q4x_k_chunk(rows, K);
                for (int64_t k0 = 0; k0 < K; k0 += kc) {
                    const int64_t len = K - k0 < kc ? K - k0 : kc;
                    for (int64_t n = n0; n < n1; n++) {
                        const float *a = af + m * K + k0;
                        const int64_t e = n * K + k0;
                        float part[BNBCY_Q4X_ROWS_PER_PASS];
                        float *y = k0 ? part : acc + n * M + m;
                        if (group && width == 2) bnbcy_q4x_rows_group_avx512(a, K, rows, W, e, len, sbuf, b0, y);
                        else if (group) bnbcy_q4x_rows_group_avx2(a, K, rows, W, e, len, sbuf, b0, y);
                        else if (width == 2) bnbcy_q4x_rows_avx512(a, K, rows, W, e, len, sbuf, b0, y);
                        else if (width == 1) bnbcy_q4x_rows_avx2(a, K, rows, W, e, len, sbuf, b0, y);
                        else bnbcy_q4x_rows_scalar(a, K, rows, W, e, len, sbuf, b0, y);
                        if (k0)
                            for (int r = 0; r < rows; r++) acc[n * M + m + r] += part[r];
                    }
                }
            }
            /* row by row of out: its rows lie N values apart, and writing a column of 16 of them per
             * weight row would put 16 lines a multiple of 4 KB apart in one 8-way L1 set */
            for (int64_t m = 0; m < M; m++)
                for (int64_t n = n0; n < n1; n++)
                    bnbcy_store_any(out, dtype, m * N + n,
                                    acc[n * M + m] + (bias ? bnbcy_load_any(bias, dtype, n) : 0.0f));
        }
        free(sbuf);
    }
    free(af);
    free(acc);
    return failed ? -2 : 0;
}

/* buf[(n - n0) * K + k] = ftz(lut[code] * scale) for rows n0 <= n < n1: the same values as
 * bnbcy_q4_dequantize writes as float32, on every lane width. */
static int bnbcy_q4x_dequant_rows(const bnbcy_q4x_weight *W, int64_t n0, int64_t n1, float *buf, int nthreads,
                                  int isa) {
    const int64_t K = W->K;
    if (n0 < 0 || n1 > W->N || n0 > n1) return -1;
    const int width = bnbcy_q4x_width(isa);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
    for (int64_t n = n0; n < n1; n++) {
        float *w = buf + (n - n0) * K;
        const int64_t e0 = n * K;
#define BNBCY_Q4X_RUN_DEQ(e, end, s)                                                       \
        {                                                                                  \
            int64_t i = (e);                                                               \
            if (width && (i & 1)) { w[i - e0] = bnbcy_ftz(W->lut[bnbcy_nibble(W->q, i)] * (s)); i++; } \
            if (width == 2) i += bnbcy_q4x_dequant_run_avx512(W, i, (end) - i, (s), w + (i - e0)); \
            else if (width == 1) i += bnbcy_q4x_dequant_run_avx2(W, i, (end) - i, (s), w + (i - e0)); \
            for (; i < (end); i++) w[i - e0] = bnbcy_ftz(W->lut[bnbcy_nibble(W->q, i)] * (s)); \
        }
        BNBCY_Q4X_FOR_RUNS(W, e0, e0 + K, BNBCY_Q4X_RUN_DEQ)
#undef BNBCY_Q4X_RUN_DEQ
    }
    return 0;
}

#endif
