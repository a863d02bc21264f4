/* Lane types of the CPU optimizer kernels: what the update rules (bnbcy_cpu_optim_rules.h) and
 * loops (bnbcy_cpu_optim_loops.h) are written against. Included once per lane width with
 * BNBCY_OPT_LANES_ISA set (no include guard): 0 = scalar (one float), 1 = AVX2 (8 floats),
 * 2 = AVX-512 (16 floats). Each operation is the one IEEE float32 instruction of its name
 * (L_FMA one fused multiply-add), so every width computes the scalar path's bits lane by lane.
 *
 *   L_T, L_W, L_FN(x), L_ATTR      lane type, width, per-width name, target attribute
 *   L_SET1 L_ADD L_SUB L_MUL L_DIV L_SQRT L_FMA(a, b, c) = a*b + c
 *   L_FTZ (denormal -> signed 0), L_FTZ_IF(f, x) (L_FTZ when f), L_ROUND(x, dt) (the value x takes stored as dt), L_SGN
 *   L_FTZ_NN(x)                    L_FTZ for x >= +0 or NaN (never -0): x where x >= FLT_MIN or NaN, else +0
 *   L_LOADT/L_STORET(base, dt, i)  W elements of a float32/float16/bfloat16 array at index i
 *   L_LOADF/L_STOREF(ptr)          W float32
 *   L_DEQ(q, qmap, absmax)         qmap[q[0..W)] * absmax
 *   L_TI, L_ZEROI                  unsigned 32-bit lanes, all zero
 *   L_MAXABSU(M, x)                max(bits of |x|, M) per lane (unsigned): while no x is NaN the
 *                                  float of M is max |x|; a NaN makes M > the bits of inf
 *   L_HMAXU(M)                     the largest lane of M
 *   L_BAD(x)                       lanes where x is NaN/inf, as an int bit mask
 *   L_BAD2(x, y)                   lanes where x or y is NaN/inf (nonzero iff any; the mask may differ)
 *   L_ZERO(x)                      lanes where x == 0, as an int bit mask
 *   L_ACCU(acc, u)                 acc[k] += (double)(u*u) for lane k (u*u rounded to float)
 *   L_RQ(s, r, rq, q)              the codes of the block s[0..256) * r through the requantization
 *                                  table (bnbcy_opt_rq_lookup, lane by lane); may overwrite s */

#undef L_T
#undef L_W
#undef L_FN
#undef L_ATTR
#undef L_SET1
#undef L_ADD
#undef L_SUB
#undef L_MUL
#undef L_DIV
#undef L_SQRT
#undef L_FMA
#undef L_FTZ
#undef L_FTZ_IF
#undef L_FTZ_NN
#undef L_ROUND
#undef L_SGN
#undef L_LOADT
#undef L_STORET
#undef L_LOADF
#undef L_STOREF
#undef L_DEQ
#undef L_TI
#undef L_ZEROI
#undef L_MAXABSU
#undef L_HMAXU
#undef L_BAD
#undef L_BAD2
#undef L_ZERO
#undef L_RQ
#undef L_PREFETCH
#undef L_ACCU
#define L_FTZ_IF(f, x) ((f) ? L_FTZ(x) : (x))

#if BNBCY_OPT_LANES_ISA == 0
#define L_T float
#define L_W 1
#define L_FN(x) x##_scalar
#define L_ATTR
#define L_SET1(x) ((float)(x))
#define L_ADD(a, b) ((a) + (b))
#define L_SUB(a, b) ((a) - (b))
#define L_MUL(a, b) ((a) * (b))
#define L_DIV(a, b) ((a) / (b))
#define L_SQRT(a) sqrtf(a)
#define L_FMA(a, b, c) fmaf(a, b, c)
#define L_FTZ(a) bnbcy_ftz(a)
#define L_FTZ_NN(a) bnbcy_ftz(a)
#define L_ROUND(x, dt) bnbcy_opt_round(x, dt)
#define L_SGN(d) bnbcy_opt_sgn(d)
#define L_LOADT(base, dt, i) bnbcy_load_any(base, dt, i)
#define L_STORET(base, dt, i, v) bnbcy_store_any(base, dt, i, v)
#define L_LOADF(ptr) (*(const float *)(ptr))
#define L_STOREF(ptr, v) (*(float *)(ptr) = (v))
#define L_DEQ(q, qmap, absmax) ((qmap)[*(q)] * (absmax))
#define L_TI uint32_t
#define L_ZEROI 0u
#define L_MAXABSU(M, x) bnbcy_opt_maxabsu(M, x)
#define L_HMAXU(M) (M)
#define L_BAD(x) (!isfinite(x))
#define L_BAD2(x, y) (!isfinite(x) || !isfinite(y))
#define L_ZERO(x) ((x) == 0.0f)
#define L_RQ(s, r, rq, q) \
    for (int i_ = 0; i_ < BNBCY_OPT_BLOCK; i_++) (q)[i_] = (uint8_t)bnbcy_opt_rq_lookup(rq, (s)[i_] * (r))
#define L_PREFETCH(p) ((void)(p))
#define L_ACCU(acc, u) (*(acc) += (double)((u) * (u)))

#elif BNBCY_OPT_LANES_ISA == 1
#define L_T __m256
#define L_W 8
#define L_FN(x) x##_avx2
#define L_ATTR __attribute__((target("avx2,fma,f16c")))
#define L_SET1(x) _mm256_set1_ps(x)
#define L_ADD(a, b) _mm256_add_ps(a, b)
#define L_SUB(a, b) _mm256_sub_ps(a, b)
#define L_MUL(a, b) _mm256_mul_ps(a, b)
#define L_DIV(a, b) _mm256_div_ps(a, b)
#define L_SQRT(a) _mm256_sqrt_ps(a)
#define L_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define L_FTZ(a) bnbcy_ftz8(a)
#define L_FTZ_NN(a) _mm256_and_ps(a, _mm256_cmp_ps(a, _mm256_set1_ps(FLT_MIN), _CMP_NLT_UQ))
#define L_ROUND(x, dt) bnbcy_opt_round8(x, dt)
#define L_SGN(d) bnbcy_opt_sgn8(d)
#define L_LOADT(base, dt, i) bnbcy_load8((const char *)(base) + (i) * ((dt) == BNBCY_F32 ? 4 : 2), dt)
#define L_STORET(base, dt, i, v) bnbcy_opt_store8((char *)(base) + (i) * ((dt) == BNBCY_F32 ? 4 : 2), dt, v)
#define L_LOADF(ptr) _mm256_loadu_ps(ptr)
#define L_STOREF(ptr, v) _mm256_storeu_ps(ptr, v)
#define L_DEQ(q, qmap, absmax) _mm256_mul_ps(bnbcy_opt_lut8(q, qmap), absmax)
#define L_TI __m256i
#define L_ZEROI _mm256_setzero_si256()
#define L_MAXABSU(M, x) _mm256_max_epu32(M, _mm256_and_si256(_mm256_castps_si256(x), _mm256_set1_epi32(0x7FFFFFFF)))
#define L_HMAXU(M) bnbcy_opt_hmaxu8(M)
#define L_BAD(x) _mm256_movemask_ps(_mm256_cmp_ps(_mm256_sub_ps(x, x), _mm256_setzero_ps(), _CMP_UNORD_Q))
/* x * 0 + y * 0 is NaN exactly where x or y is not finite: one test for both */
#define L_BAD2(x, y)                                                                                  \
    _mm256_movemask_ps(_mm256_cmp_ps(_mm256_fmadd_ps(x, _mm256_setzero_ps(), _mm256_mul_ps(y, _mm256_setzero_ps())), \
                                     _mm256_setzero_ps(), _CMP_UNORD_Q))
#define L_ZERO(x) _mm256_movemask_ps(_mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_EQ_OQ))
#define L_RQ(s, r, rq, q) bnbcy_opt_rq8(s, r, rq, q)
#define L_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define L_ACCU(acc, u) bnbcy_opt_accu8(acc, u)

#ifndef BNBCY_OPT_LANES_AVX2_HELPERS
#define BNBCY_OPT_LANES_AVX2_HELPERS
/* bnbcy_opt_round, 8 lanes (F16C for float16; bfloat16 as bnbcy_f32_to_bf16). */
L_ATTR static inline __attribute__((always_inline)) __m256 bnbcy_opt_round8(__m256 x, int dtype) {
    if (dtype == BNBCY_F32) return x;
    if (dtype == BNBCY_F16) return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i u = _mm256_castps_si256(x);
    __m256i b = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                     _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    b = _mm256_and_si256(b, _mm256_set1_epi32((int)0xFFFF0000u));
    b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC00000), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
    return _mm256_castsi256_ps(b);
}

/* bnbcy_opt_sgn, 8 lanes: +1, -1, or +0 (zero and NaN). */
L_ATTR static inline __attribute__((always_inline)) __m256 bnbcy_opt_sgn8(__m256 d) {
    const __m256 z = _mm256_setzero_ps();
    return _mm256_or_ps(_mm256_and_ps(_mm256_cmp_ps(d, z, _CMP_GT_OQ), _mm256_set1_ps(1.0f)),
                        _mm256_and_ps(_mm256_cmp_ps(d, z, _CMP_LT_OQ), _mm256_set1_ps(-1.0f)));
}

/* 8 float32 lanes stored as dtype (bnbcy_store_any, lane by lane). */
L_ATTR static inline __attribute__((always_inline)) void bnbcy_opt_store8(void *out, int dtype, __m256 y) {
    if (dtype == BNBCY_F32) {
        _mm256_storeu_ps((float *)out, y);
    } else if (dtype == BNBCY_F16) {
        _mm_storeu_si128((__m128i *)out, _mm256_cvtps_ph(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    } else {
        const __m256i u = _mm256_castps_si256(y);
        __m256i b = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                                         _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
        b = _mm256_srli_epi32(b, 16);
        b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(y, y, _CMP_UNORD_Q)));
        _mm_storeu_si128((__m128i *)out, _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08)));
    }
}

L_ATTR static inline __attribute__((always_inline)) void bnbcy_opt_accu8(double *acc, __m256 u) {
    const __m256 uu = _mm256_mul_ps(u, u);
    _mm256_storeu_pd(acc, _mm256_add_pd(_mm256_loadu_pd(acc), _mm256_cvtps_pd(_mm256_castps256_ps128(uu))));
    _mm256_storeu_pd(acc + 4, _mm256_add_pd(_mm256_loadu_pd(acc + 4), _mm256_cvtps_pd(_mm256_extractf128_ps(uu, 1))));
}

/* Table lookups of 8 lanes by scalar loads: on Zen 3 a vpgatherdd/vgatherdps costs more than
 * the eight loads and inserts (the 8-bit Adam step ran 10% faster without the gathers). */
L_ATTR static inline __attribute__((always_inline)) __m256 bnbcy_opt_lut8(const uint8_t *q, const float *lut) {
    uint32_t c0, c1;
    memcpy(&c0, q, 4); memcpy(&c1, q + 4, 4);
    const __m128 lo = _mm_setr_ps(lut[c0 & 255], lut[(c0 >> 8) & 255], lut[(c0 >> 16) & 255], lut[c0 >> 24]);
    const __m128 hi = _mm_setr_ps(lut[c1 & 255], lut[(c1 >> 8) & 255], lut[(c1 >> 16) & 255], lut[c1 >> 24]);
    return _mm256_set_m128(hi, lo);
}

L_ATTR static inline __attribute__((always_inline)) uint32_t bnbcy_opt_hmaxu8(__m256i M) {
    __m128i m = _mm_max_epu32(_mm256_castsi256_si128(M), _mm256_extracti128_si256(M, 1));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0x4E));
    m = _mm_max_epu32(m, _mm_shuffle_epi32(m, 0xB1));
    return (uint32_t)_mm_cvtsi128_si32(m);
}

/* bnbcy_opt_rq_lookup of the block s[0..256) * r (s is overwritten with the products): the code
 * is (u & 0xFFFF) <= T ? A : B. The products go through memory so that the table indices are
 * loaded as 16-bit halves (no vector-to-GPR extracts, which are what limit a vpextrd version); the
 * codes of 32 lanes are packed into one store. */
L_ATTR static inline __attribute__((always_inline)) __m256i bnbcy_opt_rq8_lanes(const float *s, const uint16_t *hw,
                                                                             const uint32_t *rq) {
    /* the top half of the product of lane j is hw[2 j] */
    const __m128i elo = _mm_setr_epi32((int)rq[hw[0]], (int)rq[hw[2]], (int)rq[hw[4]], (int)rq[hw[6]]);
    const __m128i ehi = _mm_setr_epi32((int)rq[hw[8]], (int)rq[hw[10]], (int)rq[hw[12]], (int)rq[hw[14]]);
    const __m256i e = _mm256_set_m128i(ehi, elo), u = _mm256_load_si256((const __m256i *)s);
    /* both sides below 2^16: the signed compare is exact */
    const __m256i above = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0xFFFF)), _mm256_srli_epi32(e, 16));
    /* the code is the low byte of each lane */
    return _mm256_and_si256(_mm256_blendv_epi8(_mm256_srli_epi32(e, 8), e, above), _mm256_set1_epi32(255));
}

L_ATTR static inline __attribute__((always_inline)) void bnbcy_opt_rq8(float *s, __m256 r, const uint32_t *rq, uint8_t *q) {
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 8) _mm256_store_ps(s + i, _mm256_mul_ps(_mm256_load_ps(s + i), r));
    const uint16_t *hw = (const uint16_t *)s + 1;
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 32) {
        const __m256i c0 = bnbcy_opt_rq8_lanes(s + i, hw + 2 * i, rq), c1 = bnbcy_opt_rq8_lanes(s + i + 8, hw + 2 * i + 16, rq);
        const __m256i c2 = bnbcy_opt_rq8_lanes(s + i + 16, hw + 2 * i + 32, rq);
        const __m256i c3 = bnbcy_opt_rq8_lanes(s + i + 24, hw + 2 * i + 48, rq);
        /* after the packs the 4-code dwords are c0-c3 low halves, then c0-c3 high halves: the permute restores lane order */
        const __m256i w = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
        _mm256_storeu_si256((__m256i *)(q + i), _mm256_permutevar8x32_epi32(w, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    }
}
#endif

#elif BNBCY_OPT_LANES_ISA == 2
#define L_T __m512
#define L_W 16
#define L_FN(x) x##_avx512
#define L_ATTR BNBCY_AVX512
#define L_SET1(x) _mm512_set1_ps(x)
#define L_ADD(a, b) _mm512_add_ps(a, b)
#define L_SUB(a, b) _mm512_sub_ps(a, b)
#define L_MUL(a, b) _mm512_mul_ps(a, b)
#define L_DIV(a, b) _mm512_div_ps(a, b)
#define L_SQRT(a) _mm512_sqrt_ps(a)
#define L_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define L_FTZ(a) bnbcy_ftz16(a)
#define L_FTZ_NN(a) _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, _mm512_set1_ps(FLT_MIN), _CMP_NLT_UQ), a)
#define L_ROUND(x, dt) bnbcy_opt_round16(x, dt)
#define L_SGN(d) bnbcy_opt_sgn16(d)
#define L_LOADT(base, dt, i) bnbcy_load16((const char *)(base) + (i) * ((dt) == BNBCY_F32 ? 4 : 2), dt, 0xFFFF)
#define L_STORET(base, dt, i, v) bnbcy_store16((char *)(base) + (i) * ((dt) == BNBCY_F32 ? 4 : 2), dt, 0xFFFF, v)
#define L_LOADF(ptr) _mm512_loadu_ps(ptr)
#define L_STOREF(ptr, v) _mm512_storeu_ps(ptr, v)
#define L_DEQ(q, qmap, absmax) \
    _mm512_mul_ps(bnbcy_gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q))), qmap), absmax)
#define L_TI __m512i
#define L_ZEROI _mm512_setzero_si512()
#define L_MAXABSU(M, x) _mm512_max_epu32(M, _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(0x7FFFFFFF)))
#define L_HMAXU(M) _mm512_reduce_max_epu32(M)
#define L_BAD(x) ((int)_mm512_fpclass_ps_mask(x, 0x99))
#define L_BAD2(x, y) ((int)(_mm512_fpclass_ps_mask(x, 0x99) | _mm512_fpclass_ps_mask(y, 0x99)))
#define L_ZERO(x) ((int)_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_EQ_OQ))
#define L_RQ(s, r, rq, q) \
    for (int i_ = 0; i_ < BNBCY_OPT_BLOCK; i_ += 16) bnbcy_opt_rq16((s) + i_, r, rq, (q) + i_)
#define L_PREFETCH(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#define L_ACCU(acc, u) bnbcy_opt_accu16(acc, u)

#ifndef BNBCY_OPT_LANES_AVX512_HELPERS
#define BNBCY_OPT_LANES_AVX512_HELPERS
/* bnbcy_opt_round, 16 lanes. */
L_ATTR static inline __attribute__((always_inline)) __m512 bnbcy_opt_round16(__m512 x, int dtype) {
    if (dtype == BNBCY_F32) return x;
    if (dtype == BNBCY_F16)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512i u = _mm512_castps_si512(x);
    __m512i b = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    b = _mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u));
    b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(b);
}

L_ATTR static inline __attribute__((always_inline)) __m512 bnbcy_opt_sgn16(__m512 d) {
    const __mmask16 pos = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __mmask16 neg = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 r = _mm512_mask_mov_ps(_mm512_setzero_ps(), pos, _mm512_set1_ps(1.0f));
    return _mm512_mask_mov_ps(r, neg, _mm512_set1_ps(-1.0f));
}

L_ATTR static inline __attribute__((always_inline)) void bnbcy_opt_accu16(double *acc, __m512 u) {
    const __m512 uu = _mm512_mul_ps(u, u);
    _mm512_storeu_pd(acc, _mm512_add_pd(_mm512_loadu_pd(acc), _mm512_cvtps_pd(_mm512_castps512_ps256(uu))));
    _mm512_storeu_pd(acc + 8, _mm512_add_pd(_mm512_loadu_pd(acc + 8),
                                            _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(uu), 1)))));
}

/* bnbcy_opt_rq_lookup of s[0..16) * r. */
L_ATTR static inline __attribute__((always_inline)) void bnbcy_opt_rq16(const float *s, __m512 r, const uint32_t *rq, uint8_t *q) {
    const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(s), r));
    const __m512i e = bnbcy_gather_epi32(_mm512_srli_epi32(u, 16), rq);
    /* (u & 0xFFFF) <= T  <=>  e >= u << 16, as the low 16 bits of e are below 1 << 16 */
    const __mmask16 a = _mm512_cmpge_epu32_mask(e, _mm512_slli_epi32(u, 16));
    _mm_storeu_si128((__m128i *)q, _mm512_cvtepi32_epi8(_mm512_mask_srli_epi32(e, a, e, 8)));
}
#endif
#endif
