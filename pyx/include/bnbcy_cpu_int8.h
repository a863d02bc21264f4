/* CPU kernels of LLM.int8() (NUMERICS.md §5): row-wise (vector-wise) int8 quantization with
 * an outlier threshold, and the dequantization of int32 products.
 *
 * Quantization of row r (K values a, dtype T):
 *   outlier  : |a| >= thr, thr = T(threshold) (bitsandbytes compares in the input's dtype)
 *   stats[r] = max |a| over the non-outliers (NaN ignored as in the CUDA kernel; exact in T)
 *   code     = rne(fl32(a * scale)), scale = fl32(127 * fl32(1 / stats[r])): the two roundings of
 *              torch's `127.0 / row_stats` in bitsandbytes' CPU path (CUDA's div.approx is also a
 *              multiplication by a reciprocal); NaN -> 0, outliers -> 0, and with col_flags every
 *              element of a flagged column -> 0.
 * mm-dequant: y = OUT(fma(fl32(fl32(A * row[r]) * col[c]), 0x1.04c0cp-14 (fl32(1/127^2),
 *   the CUDA kernel's constant), bias[c])), one rounding to the output dtype. */
#ifndef BNBCY_CPU_INT8_H
#define BNBCY_CPU_INT8_H
#include "bnbcy_cpu_fourbit.h"

#define BNBCY_MM_DEQUANT_SCALE 0x1.040c2p-14f /* bits 0x38820610 */

/* T(x) for a float32 x, widened back: the threshold as the input's dtype holds it. */
static inline float bnbcy_round_to_dtype(float x, int dtype) {
    if (dtype == BNBCY_F16) return bnbcy_f16_to_f32(bnbcy_f32_to_f16(x));
    if (dtype == BNBCY_BF16) return bnbcy_bf16_to_f32(bnbcy_f32_to_bf16(x));
    return x;
}

/* rne(x) to int8 for |x| <= 127.5; NaN -> 0. */
static inline int8_t bnbcy_rne_i8(float x) {
    if (x != x) return 0;
    float r = nearbyintf(x); /* default rounding mode: ties to even */
    if (r > 127.0f) r = 127.0f;
    if (r < -127.0f) r = -127.0f;
    return (int8_t)r;
}

#if BNBCY_HAVE_AVX512_PATH
BNBCY_AVX512 static void bnbcy_i8_flag_row_avx512(const void *x, int dtype, int64_t len, float thr, uint8_t *flags) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF)), vthr = _mm512_set1_ps(thr);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __mmask16 out = k & _mm512_cmp_ps_mask(_mm512_and_ps(bnbcy_load16(p + i * isz, dtype, k), absmask),
                                                    vthr, _CMP_GE_OQ);
        if (out) _mm_mask_storeu_epi8(flags + i, out, _mm_set1_epi8(1));
    }
}
#endif

/* flags[c] |= any row has |A[r, c]| >= thr. flags must be zeroed by the caller. */
static void bnbcy_i8_outlier_cols(const void *A, int dtype, int64_t rows, int64_t cols, float thr,
                                  uint8_t *flags, int nthreads) {
    const int isa = bnbcy_cpu_isa();
    thr = bnbcy_round_to_dtype(thr, dtype);
    #pragma omp parallel num_threads(nthreads) if (rows * cols >= BNBCY_OMP_MIN_WORK)
    {
        uint8_t *mine = (uint8_t *)calloc((size_t)cols, 1);
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            if (!mine) continue;
#if BNBCY_HAVE_AVX512_PATH
            if (isa == BNBCY_ISA_AVX512) {
                bnbcy_i8_flag_row_avx512((const char *)A + r * cols * (dtype == BNBCY_F32 ? 4 : 2), dtype, cols,
                                         thr, mine);
                continue;
            }
#endif
            for (int64_t c = 0; c < cols; c++)
                if (fabsf(bnbcy_load_any(A, dtype, r * cols + c)) >= thr) mine[c] = 1;
        }
        #pragma omp critical
        {
            if (mine)
                for (int64_t c = 0; c < cols; c++) flags[c] |= mine[c];
            else /* out of memory: this thread's rows are rescanned serially */
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < cols; c++)
                        if (fabsf(bnbcy_load_any(A, dtype, r * cols + c)) >= thr) flags[c] = 1;
        }
        free(mine);
    }
}

#if BNBCY_HAVE_AVX512_PATH
/* max |a| over a row's non-outliers (|a| < thr; NaN fails the compare) */
BNBCY_AVX512 static float bnbcy_i8_row_absmax_avx512(const void *x, int dtype, int64_t len, float thr, int use_thr) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF)), vthr = _mm512_set1_ps(thr);
    __m512 m = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512 a = _mm512_and_ps(bnbcy_load16(p + i * isz, dtype, k), absmask);
        /* without a threshold thr is +inf and inf counts (<=); NaN fails both compares */
        const __mmask16 in = use_thr ? _mm512_cmp_ps_mask(a, vthr, _CMP_LT_OQ) : _mm512_cmp_ps_mask(a, vthr, _CMP_LE_OQ);
        m = _mm512_mask_max_ps(m, k & in, a, m);
    }
    return _mm512_reduce_max_ps(m);
}

BNBCY_AVX512 static void bnbcy_i8_row_codes_avx512(const void *x, int dtype, int64_t len, float scale, float thr,
                                                   int use_thr, const uint8_t *col_flags, int8_t *q) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF)), vthr = _mm512_set1_ps(thr),
                 vs = _mm512_set1_ps(scale);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512 a = bnbcy_load16(p + i * isz, dtype, k);
        const __m512 y = _mm512_roundscale_ps(_mm512_mul_ps(a, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __mmask16 keep = _mm512_cmp_ps_mask(y, y, _CMP_ORD_Q); /* NaN -> 0 */
        if (use_thr) keep &= _mm512_cmp_ps_mask(_mm512_and_ps(a, absmask), vthr, _CMP_LT_OQ);
        if (col_flags) keep &= _mm512_cmpeq_epi32_mask(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, col_flags + i)),
                                                       _mm512_setzero_si512());
        const __m512i c = _mm512_maskz_cvtps_epi32(keep, _mm512_min_ps(_mm512_max_ps(y, _mm512_set1_ps(-127.0f)),
                                                                        _mm512_set1_ps(127.0f)));
        _mm_mask_storeu_epi8(q + i, k, _mm512_cvtepi32_epi8(c));
    }
}

BNBCY_AVX512 static void bnbcy_i8_dequant_row_avx512(const int32_t *A, float rs, const float *col, const void *bias,
                                                     int bias_dtype, void *out, int out_dtype, int64_t len) {
    const size_t osz = out_dtype == BNBCY_F32 ? 4 : 2, bsz = bias_dtype == BNBCY_F32 ? 4 : 2;
    const __m512 vr = _mm512_set1_ps(rs), vc = _mm512_set1_ps(BNBCY_MM_DEQUANT_SCALE);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512 p = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(k, A + i)), vr),
                                       _mm512_maskz_loadu_ps(k, col + i));
        const __m512 b = bias ? bnbcy_load16((const char *)bias + i * bsz, bias_dtype, k) : _mm512_setzero_ps();
        bnbcy_store16((char *)out + i * osz, out_dtype, k, _mm512_fmadd_ps(p, vc, b));
    }
}
#endif

static int bnbcy_i8_vectorwise_quant(const void *A, int dtype, int64_t rows, int64_t cols, float threshold,
                                     const uint8_t *col_flags, int8_t *CA, float *row_stats, int nthreads) {
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16) return -1;
    const int use_thr = threshold > 0.0f;
    const float thr = use_thr ? bnbcy_round_to_dtype(threshold, dtype) : INFINITY;
    const int isa = bnbcy_cpu_isa();
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * cols >= BNBCY_OMP_MIN_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t base = r * cols;
        const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
#if BNBCY_HAVE_AVX512_PATH
        if (isa == BNBCY_ISA_AVX512) {
            const float m = bnbcy_i8_row_absmax_avx512((const char *)A + base * isz, dtype, cols, thr, use_thr);
            row_stats[r] = m;
            bnbcy_i8_row_codes_avx512((const char *)A + base * isz, dtype, cols, 127.0f * (1.0f / m), thr, use_thr,
                                      col_flags, CA + base);
            continue;
        }
#endif
        (void)isz;
        float m = 0.0f;
        for (int64_t c = 0; c < cols; c++) {
            const float a = fabsf(bnbcy_load_any(A, dtype, base + c));
            if ((use_thr ? a < thr : a <= thr) && a > m) m = a; /* NaN fails every compare */
        }
        row_stats[r] = m;
        const float scale = 127.0f * (1.0f / m); /* m == 0: inf, and 0 * inf = NaN -> code 0 */
        for (int64_t c = 0; c < cols; c++) {
            const float a = bnbcy_load_any(A, dtype, base + c);
            int8_t q = bnbcy_rne_i8(a * scale);
            if ((use_thr && fabsf(a) >= thr) || (col_flags && col_flags[c])) q = 0;
            CA[base + c] = q;
        }
    }
    return 0;
}

static int bnbcy_i8_mm_dequant(const int32_t *A, const float *row, const float *col, const void *bias,
                               int bias_dtype, void *out, int out_dtype, int64_t rows, int64_t cols,
                               int nthreads) {
    if (out_dtype < BNBCY_F32 || out_dtype > BNBCY_BF16) return -1;
    const int isa = bnbcy_cpu_isa();
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (rows * cols >= BNBCY_OMP_MIN_WORK)
    for (int64_t r = 0; r < rows; r++) {
        const float rs = row[r];
#if BNBCY_HAVE_AVX512_PATH
        if (isa == BNBCY_ISA_AVX512) {
            bnbcy_i8_dequant_row_avx512(A + r * cols, rs, col, bias, bias_dtype,
                                        (char *)out + r * cols * (out_dtype == BNBCY_F32 ? 4 : 2), out_dtype, cols);
            continue;
        }
#endif
        for (int64_t c = 0; c < cols; c++) {
            const float p = ((float)A[r * cols + c] * rs) * col[c];
            const float b = bias ? bnbcy_load_any(bias, bias_dtype, c) : 0.0f;
            bnbcy_store_any(out, out_dtype, r * cols + c, fmaf(p, BNBCY_MM_DEQUANT_SCALE, b));
        }
    }
    return 0;
}

#endif
