/* CPU kernels of 4-bit (NF4/FP4) quantization and of the fused 4-bit matmul
 * (NUMERICS.md §3, §4).
 *
 * Layout: element e of the flat tensor is nibble e of the packed bytes, even
 * elements in the high nibble (q[e/2] >> 4), odd ones in the low nibble.
 * Quantization: per block m = max|x| (NaN ignored, ftz), r = 1/m, xn = x*r, then
 *   NF4: code = #{k : xn > t_k} over the 15 float32 midpoints of the NF4 table,
 *   FP4: sign bit for xn < 0, magnitude from bitsandbytes' literal threshold tree.
 * Both are binary searches over sorted thresholds (4 and 3 compares); the AVX-512
 * path does them 16 lanes at a time with a register-resident table (vpermps).
 * Dequantization and the matmul read the 16-entry table with vpermps as well. */
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

/* sum_j a[j] * lut[nibble(j)] over len weights from an even flat index, as a vector of partial sums. */
BNBCY_AVX512 static inline __m512 bnbcy_q4_dot_run_avx512(const float *a, const uint8_t *q, int64_t len,
                                                          __m512 vlut) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= len; i += 32) { /* 16 bytes -> 32 weights, two independent chains */
        const __m128i b = _mm_loadu_si128((const __m128i *)(q + i / 2));
        const __m512 w0 = _mm512_permutexvar_ps(bnbcy_nib16(b), vlut);
        const __m512 w1 = _mm512_permutexvar_ps(bnbcy_nib16(_mm_unpackhi_epi64(b, b)), vlut);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), w0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + i + 16), w1, s1);
    }
    for (; i < len; i += 16) {
        const int64_t rem = len - i < 16 ? len - i : 16;
        const __mmask16 k = bnbcy_tail_mask(rem);
        const __m128i b = _mm_maskz_loadu_epi8((__mmask16)((1u << ((rem + 1) / 2)) - 1u), q + i / 2);
        const __m512 w = _mm512_permutexvar_ps(bnbcy_nib16(b), vlut);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + i), w, s0);
    }
    return _mm512_add_ps(s0, s1);
}

/* y[r] = sum_k a[r*lda + k] * w[k] for r < rows (rows <= 4): w is loaded once per 16 k for all rows. */
BNBCY_AVX512 static void bnbcy_dot_rows_avx512(const float *a, int64_t lda, int rows, const float *w,
                                              int64_t len, float *y) {
    __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const __m512 wv = _mm512_maskz_loadu_ps(k, w + i);
        for (int r = 0; r < rows; r++) s[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + r * lda + i), wv, s[r]);
    }
    for (int r = 0; r < rows; r++) y[r] = _mm512_reduce_add_ps(s[r]);
}
#else
static inline void bnbcy_q4_codes_avx512(const void *x, int dtype, int64_t len, float r, int fp4, uint8_t *q) {}
static inline void bnbcy_q4_dequant_avx512(const uint8_t *q, int64_t len, const float *lut, float s, void *out,
                                           int dtype) {}
static inline void bnbcy_dot_rows_avx512(const float *a, int64_t lda, int rows, const float *w, int64_t len,
                                         float *y) {}
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

/* Row n of the weight (K values from flat element e0), dequantized, into w (float32). */
static void bnbcy_q4_decode_row(const uint8_t *q, int64_t e0, int64_t K, const float *lut,
                                const bnbcy_q4_scales *sc, int lg, float *w, int isa) {
    for (int64_t e = e0; e < e0 + K;) {
        const int64_t b = e >> lg; /* blocksize is a power of two: no division per block */
        const int64_t end = (b + 1) << lg < e0 + K ? (b + 1) << lg : e0 + K;
        const float s = bnbcy_ftz(bnbcy_q4_scale(sc, b));
        if ((e & 1) || isa != BNBCY_ISA_AVX512) {
            w[e - e0] = bnbcy_ftz(lut[bnbcy_nibble(q, e)] * s);
            e++;
            if (isa != BNBCY_ISA_AVX512) {
                for (; e < end; e++) w[e - e0] = bnbcy_ftz(lut[bnbcy_nibble(q, e)] * s);
                continue;
            }
        }
        bnbcy_q4_dequant_avx512(q + e / 2, end - e, lut, s, w + (e - e0), BNBCY_F32);
        e = end;
    }
}

#if BNBCY_HAVE_AVX512_PATH
/* sum_k a[k] * W[n, k] for the row starting at flat element e0, per-block partial sums scaled once. */
BNBCY_AVX512 static float bnbcy_q4_row_dot_avx512(const float *a, const uint8_t *q, int64_t e0, int64_t K,
                                                  const float *lut, const bnbcy_q4_scales *sc, int lg) {
    const __m512 vlut = _mm512_loadu_ps(lut);
    __m512 acc = _mm512_setzero_ps();
    float extra = 0.0f;
    for (int64_t e = e0; e < e0 + K;) {
        const int64_t b = e >> lg; /* blocksize is a power of two: no division per block */
        const int64_t end = (b + 1) << lg < e0 + K ? (b + 1) << lg : e0 + K;
        const float s = bnbcy_q4_scale(sc, b);
        if (e & 1) {
            extra += a[e - e0] * lut[bnbcy_nibble(q, e)] * s;
            e++;
        }
        acc = _mm512_fmadd_ps(bnbcy_q4_dot_run_avx512(a + (e - e0), q + e / 2, end - e, vlut),
                              _mm512_set1_ps(s), acc);
        e = end;
    }
    return _mm512_reduce_add_ps(acc) + extra;
}

/* y[r] = sum_k a[r*lda + k] * W[n, k] for R rows of A (R a compile-time constant after inlining):
 * each 16 weights are decoded and scaled once and used for all R rows. */
BNBCY_AVX512 static inline __attribute__((always_inline)) void
bnbcy_q4_rows_dot_body(const float *a, int64_t lda, const uint8_t *q, int64_t e0, int64_t K, const float *lut,
                       const bnbcy_q4_scales *sc, int lg, float *y, const int R) {
    const __m512 vlut = _mm512_loadu_ps(lut);
    __m512 acc[8];
    float extra[8];
    for (int r = 0; r < R; r++) { acc[r] = _mm512_setzero_ps(); extra[r] = 0.0f; }
    for (int64_t e = e0; e < e0 + K;) {
        const int64_t b = e >> lg;
        const int64_t end = (b + 1) << lg < e0 + K ? (b + 1) << lg : e0 + K;
        const float s = bnbcy_q4_scale(sc, b);
        const __m512 vs = _mm512_set1_ps(s);
        if (e & 1) {
            const float w = lut[bnbcy_nibble(q, e)] * s;
            for (int r = 0; r < R; r++) extra[r] += a[r * lda + (e - e0)] * w;
            e++;
        }
        int64_t i = e;
        for (; i + 32 <= end; i += 32) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(q + i / 2));
            const __m512 w0 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(bytes), vlut), vs);
            const __m512 w1 = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(_mm_unpackhi_epi64(bytes, bytes)), vlut), vs);
            const float *ap = a + (i - e0);
            for (int r = 0; r < R; r++) {
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * lda), w0, acc[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * lda + 16), w1, acc[r]);
            }
        }
        for (; i < end; i += 16) {
            const int64_t rem = end - i < 16 ? end - i : 16;
            const __mmask16 k = bnbcy_tail_mask(rem);
            const __m128i bytes = _mm_maskz_loadu_epi8((__mmask16)((1u << ((rem + 1) / 2)) - 1u), q + i / 2);
            const __m512 w = _mm512_mul_ps(_mm512_permutexvar_ps(bnbcy_nib16(bytes), vlut), vs);
            for (int r = 0; r < R; r++)
                acc[r] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, a + r * lda + (i - e0)), w, acc[r]);
        }
        e = end;
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(acc[r]) + extra[r];
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

/* The K % 32 == 0 fast path: every 32-weight group lies in one block and starts at an even flat index,
 * and A comes deinterleaved per 32-group (16 even-k values, then 16 odd-k values; see
 * bnbcy_deinterleave32), so one byte load feeds high nibbles to the even half and low nibbles to the
 * odd half without shuffling nibbles into element order (3 instead of 6 shuffle-port uops per 32). */
BNBCY_AVX512 static inline __attribute__((always_inline)) void
bnbcy_q4_rows_dot32_body(const float *ad, int64_t lda, const uint8_t *q, int64_t e0, int64_t K, const float *lut,
                         const bnbcy_q4_scales *sc, int lg, float *y, const int R) {
    const __m512 vlut = _mm512_loadu_ps(lut);
    const int64_t bs = (int64_t)1 << lg;
    __m512 acc[8];
    for (int r = 0; r < R; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t e = e0; e < e0 + K;) {
        const int64_t b = e >> lg;
        const int64_t end = (b + 1) * bs < e0 + K ? (b + 1) * bs : e0 + K;
        const float s = bnbcy_q4_scale(sc, b);
        if (R == 1) { /* partial sums per block, scaled once */
            __m512 p0 = _mm512_setzero_ps(), p1 = _mm512_setzero_ps();
            for (int64_t i = e; i < end; i += 32) {
                const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i / 2)));
                const float *ap = ad + (i - e0);
                p0 = _mm512_fmadd_ps(_mm512_loadu_ps(ap), _mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), vlut), p0);
                p1 = _mm512_fmadd_ps(_mm512_loadu_ps(ap + 16), _mm512_permutexvar_ps(x, vlut), p1);
            }
            acc[0] = _mm512_fmadd_ps(_mm512_add_ps(p0, p1), _mm512_set1_ps(s), acc[0]);
        } else {
            const __m512 vs = _mm512_set1_ps(s);
            for (int64_t i = e; i < end; i += 32) {
                const __m512i x = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + i / 2)));
                const __m512 whi = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(x, 4), vlut), vs);
                const __m512 wlo = _mm512_mul_ps(_mm512_permutexvar_ps(x, vlut), vs);
                const float *ap = ad + (i - e0);
                for (int r = 0; r < R; r++) {
                    acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * lda), whi, acc[r]);
                    acc[r] = _mm512_fmadd_ps(_mm512_loadu_ps(ap + r * lda + 16), wlo, acc[r]);
                }
            }
        }
        e = end;
    }
    for (int r = 0; r < R; r++) y[r] = _mm512_reduce_add_ps(acc[r]);
}

BNBCY_AVX512 static void bnbcy_q4_rows_dot32_avx512(const float *ad, int64_t lda, int rows, const uint8_t *q,
                                                    int64_t e0, int64_t K, const float *lut,
                                                    const bnbcy_q4_scales *sc, int lg, float *y) {
    BNBCY_ROWS_DISPATCH(bnbcy_q4_rows_dot32_body, rows, ad, lda, q, e0, K, lut, sc, lg, y);
}

BNBCY_AVX512 static void bnbcy_q4_rows_dot_avx512(const float *a, int64_t lda, int rows, const uint8_t *q,
                                                  int64_t e0, int64_t K, const float *lut,
                                                  const bnbcy_q4_scales *sc, int lg, float *y) {
    BNBCY_ROWS_DISPATCH(bnbcy_q4_rows_dot_body, rows, a, lda, q, e0, K, lut, sc, lg, y);
}
#endif

/* out[m, n] = T(sum_k A[m, k] * W[n, k] (+ bias[n])), W the packed [N, K] weight; float32 accumulation.
 * One row of A reads the packed weight once, fused. Several rows decode each weight row once into a
 * per-thread float32 buffer (L1/L2-resident) and take one dot product per row of A. The dense weight
 * is never materialised. */
static int bnbcy_q4_gemm(const void *A, int dtype, int64_t M, const uint8_t *q, const float *code,
                         const bnbcy_q4_scales *sc, int64_t blocksize, const void *bias, void *out,
                         int64_t N, int64_t K, int nthreads) {
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16 || blocksize <= 0 || (blocksize & (blocksize - 1))) return -1;
    const int lg = __builtin_ctzll((unsigned long long)blocksize);
    const int isa = bnbcy_cpu_isa();
    float lut[16];
    for (int i = 0; i < 16; i++) lut[i] = code[i];
    const float *af = (const float *)A;
    float *aconv = NULL;
    /* lg >= 5: blocks hold whole 32-groups (blocksize 32 and up, as the Python layer enforces) */
    const int fast32 = isa == BNBCY_ISA_AVX512 && K % 32 == 0 && lg >= 5;
    if (dtype != BNBCY_F32 || fast32) {
        aconv = (float *)malloc((size_t)(M * K) * sizeof(float) + 64);
        if (!aconv) return -2;
        if (fast32) { /* per 32-group: the 16 even-k values, then the 16 odd-k values */
            for (int64_t g = 0; g < M * K; g += 32)
                for (int j = 0; j < 16; j++) {
                    aconv[g + j] = bnbcy_load_any(A, dtype, g + 2 * j);
                    aconv[g + 16 + j] = bnbcy_load_any(A, dtype, g + 2 * j + 1);
                }
        } else {
            for (int64_t i = 0; i < M * K; i++) aconv[i] = bnbcy_load_any(A, dtype, i);
        }
        af = aconv;
    }
    int failed = 0;
    /* a matmul streams 4 bits per weight: below ~1M weight-rows one thread finishes before a
     * parallel region pays for itself */
    #pragma omp parallel num_threads(nthreads) if (N * K * M >= BNBCY_OMP_MIN_GEMM)
    {
        /* the scalar path decodes a weight row once into w for all rows of A */
        const int need_w = M > 1 && isa != BNBCY_ISA_AVX512;
        float *w = need_w ? (float *)malloc((size_t)K * sizeof(float) + 64) : NULL;
        if (need_w && !w) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            if (need_w && !w) continue;
            const float bn = bias ? bnbcy_load_any(bias, dtype, n) : 0.0f;
            if (M == 1 && !fast32) {
                float s;
#if BNBCY_HAVE_AVX512_PATH
                if (isa == BNBCY_ISA_AVX512) {
                    s = bnbcy_q4_row_dot_avx512(af, q, n * K, K, lut, sc, lg);
                } else
#endif
                {
                    s = 0.0f;
                    for (int64_t e = n * K; e < (n + 1) * K;) {
                        const int64_t b = e >> lg;
                        const int64_t end = (b + 1) * blocksize < (n + 1) * K ? (b + 1) * blocksize : (n + 1) * K;
                        float part = 0.0f;
                        for (; e < end; e++) part += af[e - n * K] * lut[bnbcy_nibble(q, e)];
                        s += part * bnbcy_q4_scale(sc, b);
                    }
                }
                bnbcy_store_any(out, dtype, n, s + bn);
                continue;
            }
#if BNBCY_HAVE_AVX512_PATH
            if (fast32) {
                for (int64_t m = 0; m < M; m += 8) {
                    const int rows = M - m < 8 ? (int)(M - m) : 8;
                    float y[8];
                    bnbcy_q4_rows_dot32_avx512(af + m * K, K, rows, q, n * K, K, lut, sc, lg, y);
                    for (int r = 0; r < rows; r++) bnbcy_store_any(out, dtype, (m + r) * N + n, y[r] + bn);
                }
                continue;
            }
            if (isa == BNBCY_ISA_AVX512) {
                for (int64_t m = 0; m < M; m += 8) {
                    const int rows = M - m < 8 ? (int)(M - m) : 8;
                    float y[8];
                    bnbcy_q4_rows_dot_avx512(af + m * K, K, rows, q, n * K, K, lut, sc, lg, y);
                    for (int r = 0; r < rows; r++) bnbcy_store_any(out, dtype, (m + r) * N + n, y[r] + bn);
                }
                continue;
            }
#endif
            bnbcy_q4_decode_row(q, n * K, K, lut, sc, lg, w, isa);
            for (int64_t m = 0; m < M; m += 4) {
                const int rows = M - m < 4 ? (int)(M - m) : 4;
                float y[4];
                if (isa == BNBCY_ISA_AVX512) {
                    bnbcy_dot_rows_avx512(af + m * K, K, rows, w, K, y);
                } else {
                    for (int r = 0; r < rows; r++) {
                        y[r] = 0.0f;
                        for (int64_t k = 0; k < K; k++) y[r] += af[(m + r) * K + k] * w[k];
                    }
                }
                for (int r = 0; r < rows; r++) bnbcy_store_any(out, dtype, (m + r) * N + n, y[r] + bn);
            }
        }
        free(w);
    }
    free(aconv);
    return failed ? -2 : 0;
}

#endif
