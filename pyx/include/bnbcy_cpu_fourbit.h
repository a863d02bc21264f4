/* CPU kernels of 4-bit (NF4/FP4) quantization and dequantization (NUMERICS.md §3, §4); the 4-bit
 * matmul is bnbcy_cpu_fourbit_exec.h's (the execution layout's kernels serve the functional API).
 *
 * Layout: element e of the flat tensor is nibble e of the packed bytes, even
 * elements in the high nibble (q[e/2] >> 4), odd ones in the low nibble.
 * Quantization: per block m = max|x| (NaN ignored, ftz), r = 1/m, xn = x*r, then
 *   NF4: code = #{k : xn > t_k} over the 15 float32 midpoints of the NF4 table,
 *   FP4: sign bit for xn < 0, magnitude from bitsandbytes' literal threshold tree.
 * Both are binary searches over sorted thresholds (4 and 3 compares); the AVX-512
 * path does them 16 lanes at a time with a register-resident table (vpermps).
 * Dequantization reads the 16-entry table with vpermps as well. */
#ifndef BNBCY_CPU_FOURBIT_H
#define BNBCY_CPU_FOURBIT_H
#include "bnbcy_cpu_blockwise8.h"

#define BNBCY_OMP_MIN_GEMM ((int64_t)1 << 20)

/* NF4 decision thresholds t_0..t_14: bitsandbytes' CUDA literals as nvcc compiles them (NUMERICS.md
 * §3.2; k = 0, 8, 12, 14 are one ulp off the fl32 midpoints of the table), +inf pad. */
static const uint32_t bnbcy_nf4_thresh_bits[16] = {
    0xbf591cd9u, 0xbf1c5270u, 0xbeeb8480u, 0xbeadea76u, 0xbe703cecu, 0xbe0d38bcu, 0xbd3a7871u,
    0x3d22faffu, 0x3df64863u, 0x3e5067e0u, 0x3e9582d4u, 0x3ec753f9u, 0x3f006d03u, 0x3f248dafu,
    0x3f5c89d9u, 0x7f800000u};
/* FP4 magnitude thresholds, ascending: the literals of bitsandbytes' tree. */
static const uint32_t bnbcy_fp4_thresh_bits[16] = {
    0x3b2aaab9u, 0x3db00000u, 0x3e555555u, 0x3e955555u, 0x3ed55556u, 0x3f155550u, 0x3f555555u,
    0x7f800000u, 0x7f800000u, 0x7f800000u, 0x7f800000u, 0x7f800000u, 0x7f800000u, 0x7f800000u,
    0x7f800000u, 0x7f800000u};
/* FP4 magnitude rank (0 = smallest) -> 3-bit code (000 < 001 < 110 < 111 < 100 < 101 < 010 < 011). */
static const int32_t bnbcy_fp4_rank_code[16] = {0, 1, 6, 7, 4, 5, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0};

/* Dequantization tables of the CUDA kernels (FP4 code 8 is -0.0). */
static const uint32_t bnbcy_nf4_lut_bits[16] = {
    0xbf800000u, 0xbf3239b1u, 0xbf066b30u, 0xbeca32a0u, 0xbe91a24du, 0xbe3d353fu, 0xbdba7871u, 0x00000000u,
    0x3da2faffu, 0x3e24cae3u, 0x3e7c04ddu, 0x3ead033au, 0x3ee1a4b8u, 0x3f1007abu, 0x3f3913b3u, 0x3f800000u};
static const uint32_t bnbcy_fp4_lut_bits[16] = {
    0x00000000u, 0x3baaaaabu, 0x3f2aaaabu, 0x3f800000u, 0x3eaaaaabu, 0x3f000000u, 0x3e2aaaabu, 0x3e800000u,
    0x80000000u, 0xbbaaaaabu, 0xbf2aaaabu, 0xbf800000u, 0xbeaaaaabu, 0xbf000000u, 0xbe2aaaabu, 0xbe800000u};

static inline uint8_t bnbcy_nf4_code(float xn) {
    const float *t = (const float *)bnbcy_nf4_thresh_bits;
    int c = 0; /* NaN fails every compare: code 0 */
    if (xn > t[c + 7]) c += 8;
    if (xn > t[c + 3]) c += 4;
    if (xn > t[c + 1]) c += 2;
    if (xn > t[c]) c += 1;
    return (uint8_t)c;
}

static inline uint8_t bnbcy_fp4_code(float xn) {
    const float *t = (const float *)bnbcy_fp4_thresh_bits;
    const float a = fabsf(xn);
    int r = 0;
    if (a > t[r + 3]) r += 4;
    if (a > t[r + 1]) r += 2;
    if (a > t[r]) r += 1;
    return (uint8_t)(bnbcy_fp4_rank_code[r] | (xn < 0.0f ? 8 : 0)); /* -0.0 and NaN: sign 0 */
}

static inline int bnbcy_nibble(const uint8_t *q, int64_t e) {
    return (q[e >> 1] >> ((e & 1) ? 0 : 4)) & 15;
}

/* Per-block scales: float32 absmax, or (nested) absmax_b = code2[qabs_b] * absmax2[b / bs2] + offset,
 * computed as dequantize_blockwise followed by the float32 addition of the offset. */
typedef struct {
    const float *absmax;
    const uint8_t *qabs;
    const float *code2;
    const float *absmax2;
    float offset;
    int log2_blocksize2; /* the nested blocksize is a power of two (256) */
} bnbcy_q4_scales;

static inline float bnbcy_q4_scale(const bnbcy_q4_scales *s, int64_t b) {
    if (s->absmax) return s->absmax[b];
    return bnbcy_ftz(bnbcy_ftz(s->code2[s->qabs[b]]) * bnbcy_ftz(s->absmax2[b >> s->log2_blocksize2])) + s->offset;
}

#if BNBCY_HAVE_AVX512_PATH
/* 16 nibbles from 8 bytes (lanes 2j: high nibble of byte j, 2j+1: low nibble); only the low 4
 * bits of each lane are meaningful, which is all vpermps/vpermd read. */
BNBCY_AVX512 static inline __m512i bnbcy_nib16(__m128i bytes8) {
    const __m512i shifts = _mm512_set_epi32(0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4);
    return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(bytes8, bytes8)), shifts);
}

/* Codes of one block (len elements at even flat index) into (len+1)/2 bytes. */
BNBCY_AVX512 static void bnbcy_q4_codes_avx512(const void *x, int dtype, int64_t len, float r, int fp4,
                                               uint8_t *q) {
    const char *p = (const char *)x;
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 vr = _mm512_set1_ps(r);
    const __m512 thr = _mm512_loadu_ps(fp4 ? (const float *)bnbcy_fp4_thresh_bits
                                           : (const float *)bnbcy_nf4_thresh_bits);
    const __m512i rank_code = _mm512_loadu_si512(bnbcy_fp4_rank_code);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        /* lanes past len read 0: the padding element of an odd tail is 0*r, as on CUDA */
        const __m512 xn = bnbcy_ftz16(_mm512_mul_ps(bnbcy_ftz16(bnbcy_load16(p + i * isz, dtype, k)), vr));
        __m512i c = _mm512_setzero_si512();
        if (!fp4) {
            __mmask16 gt = _mm512_cmp_ps_mask(xn, _mm512_permutexvar_ps(_mm512_set1_epi32(7), thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(8));
            gt = _mm512_cmp_ps_mask(xn, _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(3)), thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(4));
            gt = _mm512_cmp_ps_mask(xn, _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(1)), thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(2));
            gt = _mm512_cmp_ps_mask(xn, _mm512_permutexvar_ps(c, thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(1));
        } else {
            const __m512 a = _mm512_and_ps(xn, absmask);
            __mmask16 gt = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(_mm512_set1_epi32(3), thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(4));
            gt = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(_mm512_add_epi32(c, _mm512_set1_epi32(1)), thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(2));
            gt = _mm512_cmp_ps_mask(a, _mm512_permutexvar_ps(c, thr), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, gt, c, _mm512_set1_epi32(1));
            c = _mm512_permutexvar_epi32(c, rank_code);
            const __mmask16 neg = _mm512_cmp_ps_mask(xn, _mm512_setzero_ps(), _CMP_LT_OQ);
            c = _mm512_mask_or_epi32(c, neg, c, _mm512_set1_epi32(8));
        }
        /* qword j holds codes 2j (low dword) and 2j+1: byte j = c[2j] << 4 | c[2j+1] */
        const __m512i pair = _mm512_or_si512(_mm512_slli_epi64(c, 4), _mm512_srli_epi64(c, 32));
        const int64_t rem = len - i < 16 ? len - i : 16;
        _mm_mask_storeu_epi8(q + i / 2, (__mmask16)((1u << ((rem + 1) / 2)) - 1u), _mm512_cvtepi64_epi8(pair));
    }
}

/* CPUs with AVX512-BF16 (Sapphire Rapids, Zen 4) round float32 to bfloat16 in one instruction
 * (RNE, like c10::BFloat16; NaN payloads would differ, so callers keep NaN away). Whole 32-value groups only; returns
 * how many values it wrote. Same products as bnbcy_q4_dequant_avx512 (no ftz needed: the caller
 * takes this path only when no product can be subnormal). */
#define BNBCY_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
static int bnbcy_cpu_has_avx512bf16(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = bnbcy_cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
    }
    return cached;
}

BNBCY_AVX512BF16 static int64_t bnbcy_q4_dequant_bf16_native(const uint8_t *q, int64_t len, const float *lut,
                                                              float s, uint16_t *out) {
    const __m512 vs = _mm512_set1_ps(s), vlut = _mm512_loadu_ps(lut);
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) {
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + i / 2));
        const __m512 y0 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(b), vlut), vs);
        const __m512 y1 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(_mm_unpackhi_epi64(b, b)), vlut), vs);
        _mm512_storeu_si512(out + i, (__m512i)_mm512_cvtne2ps_pbh(y1, y0));
    }
    return i;
}

/* out[j] = T(ftz(lut[nibble(j)] * s)) for len elements starting at an even flat index (q at its byte). */
BNBCY_AVX512 static void bnbcy_q4_dequant_avx512(const uint8_t *q, int64_t len, const float *lut, float s,
                                                 void *out, int dtype) {
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const __m512 vs = _mm512_set1_ps(s), vlut = _mm512_loadu_ps(lut);
    /* Nonzero table values are >= 2^-8 in magnitude (NF4 0.0796, FP4 0.0052; user maps may be
     * smaller, hence the check on the table too), so for such scales no product can be subnormal. */
    float lmin = FLT_MAX;
    for (int i = 0; i < 16; i++) if (lut[i] != 0.0f && fabsf(lut[i]) < lmin) lmin = fabsf(lut[i]);
    const int ftz = !(fabsf(s) * lmin >= FLT_MIN);
    int64_t i = 0;
    /* finite s: finite products, so no NaN whose payload the native conversion would keep */
    if (!ftz && dtype == BNBCY_BF16 && isfinite(s) && bnbcy_cpu_has_avx512bf16())
        i = bnbcy_q4_dequant_bf16_native(q, len, lut, s, (uint16_t *)out);
    if (!ftz) {
        for (; i + 32 <= len; i += 32) { /* 16 bytes -> 32 values */
            const __m128i b = _mm_loadu_si128((const __m128i *)(q + i / 2));
            const __m512 y0 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(b), vlut), vs);
            const __m512 y1 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(_mm_unpackhi_epi64(b, b)), vlut), vs);
            bnbcy_store16((char *)out + i * isz, dtype, 0xFFFF, y0);
            bnbcy_store16((char *)out + (i + 16) * isz, dtype, 0xFFFF, y1);
        }
    }
    for (; i < len; i += 16) {
        const int64_t rem = len - i < 16 ? len - i : 16;
        const __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << ((rem + 1) / 2)) - 1u), q + i / 2);
        const __m512 y = bnbcy_ftz16(_mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(b), vlut), vs));
        bnbcy_store16((char *)out + i * isz, dtype, bnbcy_tail_mask(len - i), y);
    }
}

#else
static inline void bnbcy_q4_codes_avx512(const void *x, int dtype, int64_t len, float r, int fp4, uint8_t *q) {}
static inline void bnbcy_q4_dequant_avx512(const uint8_t *q, int64_t len, const float *lut, float s, void *out,
                                           int dtype) {}
#endif

/* Quantize n elements of A (dtype) in blocks of blocksize (even) into (n+1)/2 bytes. */
static int bnbcy_q4_quantize(const void *A, int dtype, int64_t n, int64_t blocksize, int fp4, uint8_t *q,
                             float *absmax, int nthreads) {
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16 || blocksize <= 0 || (blocksize & 1)) return -1;
    const int64_t nblocks = (n + blocksize - 1) / blocksize;
    const int isa = bnbcy_cpu_isa();
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= BNBCY_OMP_MIN_WORK)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (n - start) < blocksize ? (n - start) : blocksize;
        const char *x = (const char *)A + start * isz;
        uint8_t *qb = q + start / 2;
        float m = -FLT_MAX; /* fmaxf from -FLT_MAX: NaN ignored */
        int64_t done = 0;
        if (isa == BNBCY_ISA_AVX512) {
            m = bnbcy_absmax_avx512(x, dtype, len);
            done = len;
        } else if (isa == BNBCY_ISA_AVX2) {
            done = bnbcy_absmax_avx2(x, dtype, len, &m);
        }
        for (int64_t i = done; i < len; i++) {
            const float a = fabsf(bnbcy_load_any(x, dtype, i));
            m = a > m ? a : m;
        }
        if (len < blocksize && !(m > 0.0f)) m = 0.0f; /* CUDA pads a partial block with zeros */
        if (m >= 0.0f && m < FLT_MIN) m = 0.0f;
        absmax[b] = m;
        if (m == 0.0f) { /* x * inf: NaN (or 0 * inf) everywhere, code 0 for both types */
            memset(qb, 0, (size_t)((len + 1) / 2));
            continue;
        }
        float r = 1.0f / m;
        if (fabsf(r) < FLT_MIN) r = 0.0f;
        if (isa == BNBCY_ISA_AVX512) {
            bnbcy_q4_codes_avx512(x, dtype, len, r, fp4, qb);
            continue;
        }
        for (int64_t i = 0; i < len; i += 2) {
            const float x0 = bnbcy_ftz(bnbcy_ftz(bnbcy_load_any(x, dtype, i)) * r);
            const float x1 = i + 1 < len ? bnbcy_ftz(bnbcy_ftz(bnbcy_load_any(x, dtype, i + 1)) * r)
                                         : bnbcy_ftz(0.0f * r);
            const uint8_t c0 = fp4 ? bnbcy_fp4_code(x0) : bnbcy_nf4_code(x0);
            const uint8_t c1 = fp4 ? bnbcy_fp4_code(x1) : bnbcy_nf4_code(x1);
            qb[i / 2] = (uint8_t)(c0 << 4 | c1);
        }
    }
    return 0;
}

/* out[j] = T(ftz(lut[nibble(e)] * scale(e / blocksize))) for e = start + j, j < count.
 * lut: 16 float32 values (the type's table). */
static int bnbcy_q4_dequantize(const uint8_t *q, const float *lut_in, const bnbcy_q4_scales *sc,
                               int64_t start, int64_t count, int64_t blocksize, void *out, int dtype,
                               int nthreads) {
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16 || blocksize <= 0) return -1;
    if (count <= 0) return 0;
    float lut[16];
    for (int i = 0; i < 16; i++) lut[i] = bnbcy_ftz(lut_in[i]);
    const int isa = bnbcy_cpu_isa();
    const size_t isz = dtype == BNBCY_F32 ? 4 : 2;
    const int64_t b0 = start / blocksize, b1 = (start + count - 1) / blocksize;
    bnbcy_advise_hugepages(out, (size_t)count * isz);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (count >= BNBCY_OMP_MIN_WORK)
    for (int64_t b = b0; b <= b1; b++) {
        int64_t e = b * blocksize > start ? b * blocksize : start;
        const int64_t end = (b + 1) * blocksize < start + count ? (b + 1) * blocksize : start + count;
        const float s = bnbcy_ftz(bnbcy_q4_scale(sc, b));
        char *o = (char *)out + (e - start) * isz;
        if (e & 1) { /* an odd first element: the low nibble of its byte */
            bnbcy_store_any(o, dtype, 0, bnbcy_ftz(lut[bnbcy_nibble(q, e)] * s));
            e++;
            o += isz;
        }
        if (isa == BNBCY_ISA_AVX512) {
            bnbcy_q4_dequant_avx512(q + e / 2, end - e, lut, s, o, dtype);
            continue;
        }
        for (int64_t i = 0; i < end - e; i++)
            bnbcy_store_any(o, dtype, i, bnbcy_ftz(lut[bnbcy_nibble(q, e + i)] * s));
    }
    return 0;
}

#endif
