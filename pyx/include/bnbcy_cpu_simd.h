/* AVX-512 variants of the 8-bit blockwise CPU kernels, chosen at run time on
 * CPUs that have AVX-512 F/BW/VL/DQ (the scalar kernels serve everywhere else).
 * They perform the same IEEE float32 operations as the scalar code, lane by
 * lane, so both give the same bits. */
#ifndef BNBCY_CPU_SIMD_H
#define BNBCY_CPU_SIMD_H
#include "bnbcy_cpu_common.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define BNBCY_HAVE_AVX512_PATH 1
#include <immintrin.h>
#define BNBCY_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

static int bnbcy_cpu_has_avx512(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    }
    return cached;
}

static inline __mmask16 bnbcy_tail_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1u);
}

/* 16 elements of dtype at p (lanes outside k read as 0) as float32. */
BNBCY_AVX512 static inline __m512 bnbcy_load16(const void *p, int dtype, __mmask16 k) {
    if (dtype == BNBCY_F32) return _mm512_maskz_loadu_ps(k, p);
    __m256i h = _mm256_maskz_loadu_epi16(k, p);
    if (dtype == BNBCY_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* Denormals to signed zeros, as CUDA's .ftz does to inputs and results. */
BNBCY_AVX512 static inline __m512 bnbcy_ftz16(__m512 v) {
    const __mmask16 sub = _mm512_cmp_ps_mask(_mm512_abs_ps(v), _mm512_set1_ps(FLT_MIN), _CMP_LT_OQ);
    return _mm512_mask_and_ps(v, sub, v, _mm512_castsi512_ps(_mm512_set1_epi32((int)0x80000000u)));
}

/* max |x| over the block, NaN ignored, from -FLT_MAX (as the scalar loop). */
BNBCY_AVX512 static float bnbcy_absmax_avx512(const void *x, int dtype, int64_t len) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    __m512 m0 = _mm512_set1_ps(-FLT_MAX), m1 = m0;
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) { /* two chains hide the max latency */
        /* vmaxps(a, b) returns b when a is NaN: NaN never enters the maximum */
        m0 = _mm512_max_ps(_mm512_and_ps(bnbcy_load16(p + i * isz, dtype, 0xFFFF), absmask), m0);
        m1 = _mm512_max_ps(_mm512_and_ps(bnbcy_load16(p + (i + 16) * isz, dtype, 0xFFFF), absmask), m1);
    }
    for (; i < len; i += 16) {
        __mmask16 k = bnbcy_tail_mask(len - i);
        m0 = _mm512_mask_max_ps(m0, k, _mm512_and_ps(bnbcy_load16(p + i * isz, dtype, k), absmask), m0);
    }
    return _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
}

/* Codes of one block through the bucket table (see bnbcy_q8_code_table). */
BNBCY_AVX512 static void bnbcy_q8_codes_avx512(const void *x, int dtype, int64_t len, float r,
                                               const uint8_t *lut, const float *mids, int steps,
                                               const uint32_t *packed, uint8_t *q) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 vr = _mm512_set1_ps(r);
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), one = _mm512_set1_epi32(1),
                  byte = _mm512_set1_epi32(0xFF), low16 = _mm512_set1_epi32(0xFFFF),
                  has_bit = _mm512_set1_epi32(1 << 24);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512 xn = bnbcy_ftz16(_mm512_mul_ps(bnbcy_ftz16(bnbcy_load16(p + i * isz, dtype, k)), vr));
        if (packed) { /* one midpoint per bucket at most: one table read (bnbcy_q8_code_packed) */
            const __m512i u = _mm512_castps_si512(_mm512_add_ps(xn, _mm512_setzero_ps()));
            const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
            const __m512i e = _mm512_i32gather_epi32(_mm512_srli_epi32(key, 16), packed, 4);
            const __m512i lo = _mm512_and_si512(key, low16);
            const __m512i mid = _mm512_and_si512(_mm512_srli_epi32(e, 8), low16);
            const __mmask16 has = _mm512_test_epi32_mask(e, has_bit);
            const __mmask16 above = has & _mm512_cmpgt_epu32_mask(lo, mid);
            const __mmask16 tie = has & _mm512_cmpeq_epi32_mask(lo, mid) & _mm512_test_epi32_mask(e, one);
            __m512i c = _mm512_and_si512(e, byte);
            c = _mm512_mask_add_epi32(c, above | tie, c, one);
            c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(xn, xn, _CMP_ORD_Q), c); /* NaN -> 0 */
            _mm512_mask_cvtepi32_storeu_epi8(q + i, k, c);
            continue;
        }
        const __m512i u = _mm512_castps_si512(xn);
        const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
        /* 4-byte gathers at byte offsets: the table is padded by 3 bytes */
        __m512i c = _mm512_and_si512(_mm512_i32gather_epi32(_mm512_srli_epi32(key, 16), lut, 1), byte);
        if (steps == 1) { /* the common case (both dynamic maps): two independent gathers */
            const __m512 m0 = _mm512_i32gather_ps(c, mids, 4);
            const __m512 m1 = _mm512_i32gather_ps(_mm512_add_epi32(c, one), mids, 4);
            const __mmask16 lt = _mm512_cmp_ps_mask(m0, xn, _CMP_LT_OQ);
            c = _mm512_mask_add_epi32(c, lt, c, one);
            const __m512 mc = _mm512_mask_blend_ps(lt, m0, m1);
            const __mmask16 tie1 = _mm512_cmp_ps_mask(mc, xn, _CMP_EQ_OQ) & _mm512_test_epi32_mask(c, one);
            c = _mm512_mask_add_epi32(c, tie1, c, one);
            c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(xn, xn, _CMP_ORD_Q), c);
            _mm512_mask_cvtepi32_storeu_epi8(q + i, k, c);
            continue;
        }
        for (int s = 0; s < steps; s++) {
            const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_i32gather_ps(c, mids, 4), xn, _CMP_LT_OQ);
            c = _mm512_mask_add_epi32(c, lt, c, one);
        }
        const __mmask16 tie = _mm512_cmp_ps_mask(_mm512_i32gather_ps(c, mids, 4), xn, _CMP_EQ_OQ) &
                              _mm512_test_epi32_mask(c, one);
        c = _mm512_mask_add_epi32(c, tie, c, one);
        c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(xn, xn, _CMP_ORD_Q), c); /* NaN -> 0 */
        _mm512_mask_cvtepi32_storeu_epi8(q + i, k, c);
    }
}

/* out[i] = T(ftz(lut[q[i]] * s)) for one block. */
BNBCY_AVX512 static void bnbcy_q8_dequant_avx512(const uint8_t *q, const float *lut, float s,
                                                 int64_t len, void *out, int dtype) {
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i rne = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1),
                  qnan = _mm512_set1_epi32(0x7FC0);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, q + i));
        const __m512 y = bnbcy_ftz16(_mm512_mul_ps(_mm512_i32gather_ps(c, lut, 4), vs));
        if (dtype == BNBCY_F32) {
            _mm512_mask_storeu_ps((float *)out + i, k, y);
        } else if (dtype == BNBCY_F16) {
            __m256i h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            _mm256_mask_storeu_epi16((uint16_t *)out + i, k, h);
        } else { /* bfloat16, rounded as c10::BFloat16 (NaN -> 0x7FC0) */
            const __m512i u = _mm512_castps_si512(y);
            __m512i b = _mm512_add_epi32(u, _mm512_add_epi32(rne, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));
            b = _mm512_srli_epi32(b, 16);
            b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), qnan);
            _mm256_mask_storeu_epi16((uint16_t *)out + i, k, _mm512_cvtepi32_epi16(b));
        }
    }
}
#else /* no AVX-512 path on this compiler/architecture: stubs, never called */
#define BNBCY_HAVE_AVX512_PATH 0
static int bnbcy_cpu_has_avx512(void) { return 0; }
static inline float bnbcy_absmax_avx512(const void *x, int dtype, int64_t len) { return 0.0f; }
static inline void bnbcy_q8_codes_avx512(const void *x, int dtype, int64_t len, float r, const uint8_t *lut,
                                         const float *mids, int steps, const uint32_t *packed, uint8_t *q) {}
static inline void bnbcy_q8_dequant_avx512(const uint8_t *q, const float *lut, float s, int64_t len,
                                           void *out, int dtype) {}
#endif

#endif
