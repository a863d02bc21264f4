/* AVX-512 variants of the 8-bit blockwise CPU kernels, chosen at run time on
 * CPUs that have AVX-512 F/BW/VL/DQ (the scalar kernels serve everywhere else).
 * They perform the same IEEE float32 operations as the scalar code, lane by
 * lane, so both give the same bits. */
#ifndef BNBCY_CPU_SIMD_H
#define BNBCY_CPU_SIMD_H
#include "bnbcy_cpu_common.h"
#include <stdlib.h>
#include <string.h>

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

/* Gathers into a register zeroed just before. A gather merges into its destination register,
 * so it waits for whatever last wrote it; GCC drops the zeroing of a full-mask gather and may
 * pick a register written late in the previous loop iteration (a division), which chains the
 * iterations: the 8-bit optimizer passes ran up to 2x slower. The volatile asm keeps the zeroing
 * idiom in front of every gather. */
BNBCY_AVX512 static inline __m512 bnbcy_gather_ps(__m512i idx, const float *base) {
    __m512 z;
    __asm__ volatile("vpxord %0, %0, %0" : "=v"(z));
    return _mm512_mask_i32gather_ps(z, (__mmask16)0xFFFF, idx, base, 4);
}

BNBCY_AVX512 static inline __m512i bnbcy_gather_epi32(__m512i idx, const void *base) {
    __m512i z;
    __asm__ volatile("vpxord %0, %0, %0" : "=v"(z));
    return _mm512_mask_i32gather_epi32(z, (__mmask16)0xFFFF, idx, base, 4);
}

/* bnbcy_gather_epi32 with byte offsets (4 bytes read at base + idx). */
BNBCY_AVX512 static inline __m512i bnbcy_gather_epi32_s1(__m512i idx, const void *base) {
    __m512i z;
    __asm__ volatile("vpxord %0, %0, %0" : "=v"(z));
    return _mm512_mask_i32gather_epi32(z, (__mmask16)0xFFFF, idx, base, 1);
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
BNBCY_AVX512 static inline __attribute__((always_inline)) __m512 bnbcy_ftz16(__m512 v) {
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
            const __m512i e = bnbcy_gather_epi32(_mm512_srli_epi32(key, 16), packed);
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
        __m512i c = _mm512_and_si512(bnbcy_gather_epi32_s1(_mm512_srli_epi32(key, 16), lut), byte);
        if (steps == 1) { /* the common case (both dynamic maps): two independent gathers */
            const __m512 m0 = bnbcy_gather_ps(c, mids);
            const __m512 m1 = bnbcy_gather_ps(_mm512_add_epi32(c, one), mids);
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
            const __mmask16 lt = _mm512_cmp_ps_mask(bnbcy_gather_ps(c, mids), xn, _CMP_LT_OQ);
            c = _mm512_mask_add_epi32(c, lt, c, one);
        }
        const __mmask16 tie = _mm512_cmp_ps_mask(bnbcy_gather_ps(c, mids), xn, _CMP_EQ_OQ) &
                              _mm512_test_epi32_mask(c, one);
        c = _mm512_mask_add_epi32(c, tie, c, one);
        c = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(xn, xn, _CMP_ORD_Q), c); /* NaN -> 0 */
        _mm512_mask_cvtepi32_storeu_epi8(q + i, k, c);
    }
}

/* Store 16 float32 lanes (those in k) as dtype: float16 and bfloat16 rounded to
 * nearest even, bfloat16 NaN as c10::BFloat16 writes it (0x7FC0). */
BNBCY_AVX512 static inline void bnbcy_store16(void *out, int dtype, __mmask16 k, __m512 y) {
    if (dtype == BNBCY_F32) {
        _mm512_mask_storeu_ps(out, k, y);
    } else if (dtype == BNBCY_F16) {
        __m256i h = _mm512_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm256_mask_storeu_epi16(out, k, h);
    } else {
        const __m512i u = _mm512_castps_si512(y);
        __m512i b = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                         _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                          _mm512_set1_epi32(1))));
        b = _mm512_srli_epi32(b, 16);
        b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(y, y, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
        _mm256_mask_storeu_epi16(out, k, _mm512_cvtepi32_epi16(b));
    }
}

/* out[i] = T(ftz(lut[q[i]] * s)) for one block. */
BNBCY_AVX512 static void bnbcy_q8_dequant_avx512(const uint8_t *q, const float *lut, float s,
                                                 int64_t len, void *out, int dtype) {
    const __m512 vs = _mm512_set1_ps(s);
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512i c = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, q + i));
        const __m512 y = bnbcy_ftz16(_mm512_mul_ps(bnbcy_gather_ps(c, lut), vs));
        bnbcy_store16((char *)out + i * isz, dtype, k, y);
    }
}
/* ------------------------------------------------------------------ AVX2 */
/* Eight lanes; whole vectors only (block tails use the scalar helpers, which
 * compute the same bits). Codes need the packed bucket table. */
#define BNBCY_AVX2_TARGET __attribute__((target("avx2,f16c")))

/* The 8-lane forms of bnbcy_gather_ps / bnbcy_gather_epi32 (same reason). */
BNBCY_AVX2_TARGET static inline __m256 bnbcy_gather8_ps(__m256i idx, const float *base) {
    __m256 z;
    __asm__ volatile("vpxor %0, %0, %0" : "=x"(z));
    return _mm256_mask_i32gather_ps(z, base, idx, _mm256_castsi256_ps(_mm256_set1_epi32(-1)), 4);
}

BNBCY_AVX2_TARGET static inline __m256i bnbcy_gather8_epi32(__m256i idx, const void *base) {
    __m256i z;
    __asm__ volatile("vpxor %0, %0, %0" : "=x"(z));
    return _mm256_mask_i32gather_epi32(z, (const int *)base, idx, _mm256_set1_epi32(-1), 4);
}

static int bnbcy_cpu_has_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    }
    return cached;
}

BNBCY_AVX2_TARGET static inline __m256 bnbcy_load8(const void *p, int dtype) {
    if (dtype == BNBCY_F32) return _mm256_loadu_ps((const float *)p);
    const __m128i h = _mm_loadu_si128((const __m128i *)p);
    if (dtype == BNBCY_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

BNBCY_AVX2_TARGET static inline __attribute__((always_inline)) __m256 bnbcy_ftz8(__m256 v) {
    const __m256 sign = _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u));
    const __m256 sub = _mm256_cmp_ps(_mm256_andnot_ps(sign, v), _mm256_set1_ps(FLT_MIN), _CMP_LT_OQ);
    return _mm256_blendv_ps(v, _mm256_and_ps(v, sign), sub);
}

/* max |x| over whole vectors (from m, NaN ignored); returns the count handled. */
BNBCY_AVX2_TARGET static int64_t bnbcy_absmax_avx2(const void *x, int dtype, int64_t len, float *m) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    __m256 m0 = _mm256_set1_ps(*m), m1 = m0;
    int64_t i = 0;
    for (; i + 16 <= len; i += 16) { /* maxps(a, b) returns b when a is NaN */
        m0 = _mm256_max_ps(_mm256_and_ps(bnbcy_load8(p + i * isz, dtype), absmask), m0);
        m1 = _mm256_max_ps(_mm256_and_ps(bnbcy_load8(p + (i + 8) * isz, dtype), absmask), m1);
    }
    for (; i + 8 <= len; i += 8)
        m0 = _mm256_max_ps(_mm256_and_ps(bnbcy_load8(p + i * isz, dtype), absmask), m0);
    float lanes[8];
    _mm256_storeu_ps(lanes, _mm256_max_ps(m0, m1));
    for (int k = 0; k < 8; k++) *m = lanes[k] > *m ? lanes[k] : *m;
    return i;
}

/* Codes of whole vectors through the packed table; returns the count handled. */
BNBCY_AVX2_TARGET static int64_t bnbcy_q8_codes_avx2(const void *x, int dtype, int64_t len, float r,
                                                     const uint32_t *packed, uint8_t *q) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m256 vr = _mm256_set1_ps(r);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), low16 = _mm256_set1_epi32(0xFFFF),
                  one = _mm256_set1_epi32(1), byte = _mm256_set1_epi32(0xFF);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m256 xn = bnbcy_ftz8(_mm256_mul_ps(bnbcy_ftz8(bnbcy_load8(p + i * isz, dtype)), vr));
        const __m256i u = _mm256_castps_si256(_mm256_add_ps(xn, _mm256_setzero_ps()));
        const __m256i key = _mm256_xor_si256(u, _mm256_or_si256(_mm256_srai_epi32(u, 31), sign));
        const __m256i e = bnbcy_gather8_epi32(_mm256_srli_epi32(key, 16), packed);
        const __m256i lo = _mm256_and_si256(key, low16);
        const __m256i mid = _mm256_and_si256(_mm256_srli_epi32(e, 8), low16);
        const __m256i has = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_srli_epi32(e, 24), one), one);
        const __m256i odd = _mm256_cmpeq_epi32(_mm256_and_si256(e, one), one);
        const __m256i above = _mm256_cmpgt_epi32(lo, mid); /* both < 2^16: signed compare is exact */
        const __m256i tie = _mm256_and_si256(_mm256_cmpeq_epi32(lo, mid), odd);
        const __m256i inc = _mm256_and_si256(_mm256_and_si256(_mm256_or_si256(above, tie), has), one);
        __m256i c = _mm256_add_epi32(_mm256_and_si256(e, byte), inc);
        c = _mm256_and_si256(c, _mm256_castps_si256(_mm256_cmp_ps(xn, xn, _CMP_ORD_Q))); /* NaN -> 0 */
        const __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(c, c), _mm256_setzero_si256());
        const uint32_t lo4 = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(w));
        const uint32_t hi4 = (uint32_t)_mm_cvtsi128_si32(_mm256_extracti128_si256(w, 1));
        memcpy(q + i, &lo4, 4);
        memcpy(q + i + 4, &hi4, 4);
    }
    return i;
}

/* out[i] = T(ftz(lut[q[i]] * s)) over whole vectors; returns the count handled. */
BNBCY_AVX2_TARGET static int64_t bnbcy_q8_dequant_avx2(const uint8_t *q, const float *lut, float s,
                                                       int64_t len, void *out, int dtype) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i rne = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1),
                  qnan = _mm256_set1_epi32(0x7FC0);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        const __m256i c = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        const __m256 y = bnbcy_ftz8(_mm256_mul_ps(bnbcy_gather8_ps(c, lut), vs));
        if (dtype == BNBCY_F32) {
            _mm256_storeu_ps((float *)out + i, y);
        } else if (dtype == BNBCY_F16) {
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i),
                             _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        } else { /* bfloat16 as c10::BFloat16 (NaN -> 0x7FC0) */
            const __m256i u = _mm256_castps_si256(y);
            __m256i b = _mm256_add_epi32(u, _mm256_add_epi32(rne, _mm256_and_si256(_mm256_srli_epi32(u, 16), one)));
            b = _mm256_srli_epi32(b, 16);
            b = _mm256_blendv_epi8(b, qnan, _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
            const __m256i w = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);
            _mm_storeu_si128((__m128i *)((uint16_t *)out + i), _mm256_castsi256_si128(w));
        }
    }
    return i;
}

#else /* no SIMD paths on this compiler/architecture: stubs, never called */
#define BNBCY_HAVE_AVX512_PATH 0
static int bnbcy_cpu_has_avx512(void) { return 0; }
static int bnbcy_cpu_has_avx2(void) { return 0; }
static inline int64_t bnbcy_absmax_avx2(const void *x, int dtype, int64_t len, float *m) { return 0; }
static inline int64_t bnbcy_q8_codes_avx2(const void *x, int dtype, int64_t len, float r, const uint32_t *packed,
                                          uint8_t *q) { return 0; }
static inline int64_t bnbcy_q8_dequant_avx2(const uint8_t *q, const float *lut, float s, int64_t len, void *out,
                                            int dtype) { return 0; }
static inline float bnbcy_absmax_avx512(const void *x, int dtype, int64_t len) { return 0.0f; }
static inline void bnbcy_q8_codes_avx512(const void *x, int dtype, int64_t len, float r, const uint8_t *lut,
                                         const float *mids, int steps, const uint32_t *packed, uint8_t *q) {}
static inline void bnbcy_q8_dequant_avx512(const uint8_t *q, const float *lut, float s, int64_t len,
                                           void *out, int dtype) {}
#endif

enum { BNBCY_ISA_SCALAR = 0, BNBCY_ISA_AVX2 = 1, BNBCY_ISA_AVX512 = 2 };

/* The instruction set BNBCY_CPU_ISA asks for, as bnbcy/_env.py parsed it (-1: the best the CPU has);
 * set from the Cython view layer (pyx/tensor_view.pxi), which re-reads the variable when it changes. */
static int bnbcy_isa_request = -1;

/* The best instruction set this CPU has, lowered to the requested one (tests use it to cover every
 * path); never above what the CPU has. */
static int bnbcy_cpu_isa(void) {
    int best = bnbcy_cpu_has_avx512() ? BNBCY_ISA_AVX512 : bnbcy_cpu_has_avx2() ? BNBCY_ISA_AVX2 : BNBCY_ISA_SCALAR;
    int w = bnbcy_isa_request;
    if (w < 0) return best;
    if (w == BNBCY_ISA_AVX2 && !bnbcy_cpu_has_avx2()) w = BNBCY_ISA_SCALAR;
    return w < best ? w : best;
}

#endif
