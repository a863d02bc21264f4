/* CPU kernels of 8-bit blockwise quantization (NUMERICS.md §2).
 *
 * Quantization: per block m = max|x| (NaN ignored, ftz), r = 1/m, xn = x*r,
 * code = nearest entry of the 256-value map, exact ties to the even index.
 * For strictly increasing maps the nearest code is found through a 65536-bucket
 * table over the top 16 bits of an order-preserving key of xn followed by a few
 * branch-free midpoint compares; any other map uses the literal 7-step binary
 * search of the CUDA kernel. Dequantization: y = T(code[q] * absmax[block]). */
#ifndef BNBCY_CPU_BLOCKWISE8_H
#define BNBCY_CPU_BLOCKWISE8_H
#include "bnbcy_cpu_common.h"
#include "bnbcy_cpu_simd.h"
#include <stdlib.h>

/* Work below this many elements runs on one thread: the fork/join costs more. */
#define BNBCY_OMP_MIN_WORK 65536

typedef struct {
    float mids[256];      /* mids[i] = fl32(fl32(c[i]+c[i+1])*0.5); mids[255] = +inf */
    float mids_pad;       /* +inf: SIMD code reads mids[c + 1] for c <= 255 */
    uint8_t lut[65536 + 4]; /* #{i : mids[i] < smallest value of bucket}; +4: SIMD gathers read 4 bytes */
    int32_t steps;        /* most midpoints inside one bucket: compares per element */
    int32_t one_per_bucket; /* no bucket holds two midpoints: `packed` is valid */
    /* packed[k] = lut[k] | key16(mid) << 8 | has_mid << 24, where mid is the midpoint
     * inside bucket k: it shares the bucket's top 16 key bits, so comparing the low
     * 16 key bits of xn with key16(mid) compares the values (one table read per code). */
    uint32_t packed[65536];
} bnbcy_q8_table;

static inline uint32_t bnbcy_order_key(float v) {
    uint32_t u = bnbcy_f2u(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

static inline float bnbcy_key_value(uint32_t key) {
    return bnbcy_u2f((key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key);
}

static inline int bnbcy_count_below(const float *mids, float v, int inclusive) {
    int lo = 0, hi = 255; /* count over mids[0..254] */
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        int below = inclusive ? (mids[mid] <= v) : (mids[mid] < v);
        if (below) lo = mid + 1; else hi = mid;
    }
    return lo;
}

/* Returns 0 and fills t when code is strictly increasing (and finite); returns
 * -1 otherwise, in which case callers use the literal search. */
static int bnbcy_q8_build_table(const float *code, bnbcy_q8_table *t) {
    for (int i = 0; i < 256; i++)
        if (!isfinite(code[i]) || (i > 0 && !(code[i - 1] < code[i]))) return -1;
    for (int i = 0; i < 255; i++) t->mids[i] = (code[i] + code[i + 1]) * 0.5f;
    t->mids[255] = INFINITY;
    t->mids_pad = INFINITY;
    int steps = 0;
    for (uint32_t k = 0; k < 65536; k++) {
        float lo = bnbcy_key_value(k << 16), hi = bnbcy_key_value((k << 16) | 0xFFFFu);
        if (lo != lo || hi != hi) { t->lut[k] = 0; continue; } /* NaN buckets */
        int below = bnbcy_count_below(t->mids, lo, 0);
        int upto = bnbcy_count_below(t->mids, hi, 1);
        t->lut[k] = (uint8_t)below;
        if (upto - below > steps) steps = upto - below;
    }
    t->steps = steps;
    t->one_per_bucket = 1;
    for (uint32_t k = 0; k < 65536; k++) t->packed[k] = t->lut[k];
    for (int i = 0; i < 255; i++) {
        const uint32_t key = bnbcy_order_key(t->mids[i] + 0.0f); /* -0.0 -> +0.0: keys order values */
        uint32_t *e = &t->packed[key >> 16];
        if (*e & (1u << 24)) t->one_per_bucket = 0;
        *e |= (1u << 24) | ((key & 0xFFFFu) << 8);
    }
    return 0;
}

static inline uint8_t bnbcy_q8_code_packed(float xn, const uint32_t *packed) {
    const uint32_t key = bnbcy_order_key(xn + 0.0f);
    const uint32_t e = packed[key >> 16], lo = key & 0xFFFFu, mid = (e >> 8) & 0xFFFFu;
    const uint32_t has = (e >> 24) & 1u, c0 = e & 0xFFu;
    const uint32_t above = has & (lo > mid), tie = has & (lo == mid) & c0; /* tie: even index */
    return xn == xn ? (uint8_t)(c0 + above + tie) : 0;
}

static inline uint8_t bnbcy_q8_code_table(float xn, const bnbcy_q8_table *t, int steps) {
    uint32_t c = t->lut[bnbcy_order_key(xn) >> 16];
    for (int s = 0; s < steps; s++) c += t->mids[c] < xn;
    c += (t->mids[c] == xn) & (c & 1u); /* exact tie: the even index */
    return xn == xn ? (uint8_t)c : 0;
}

/* The CUDA kernel's search, literally (correct for maps with repeated values). */
static inline uint8_t bnbcy_q8_code_search(float xn, const float *code) {
    int p = 127, lo_i = 0, hi_i = 255;
    float lo = -1.0f, hi = 1.0f, v = code[127];
    for (int step = 64; step > 0; step >>= 1) {
        if (xn > v) { lo_i = p; lo = v; p += step; }
        else { hi_i = p; hi = v; p -= step; }
        v = code[p];
    }
    if (hi_i == 255) hi = code[255];
    if (lo_i == 0) lo = code[0];
    if (xn > v) return (uint8_t)((xn > (hi + v) * 0.5f) ? hi_i : p);
    return (uint8_t)((xn < (lo + v) * 0.5f) ? lo_i : p);
}

#define BNBCY_Q8_DEFINE_BLOCK(SUFFIX, TYPE, LOAD, DTYPE)                                 \
    static inline void bnbcy_q8_block_##SUFFIX(const TYPE *x, int64_t len,               \
                                               const float *code,                        \
                                               const bnbcy_q8_table *t, uint8_t *q,      \
                                               float *absmax, int isa, int partial) {    \
        float m = -FLT_MAX; /* as fmaxf from -FLT_MAX: NaN ignored, all-NaN -> -FLT_MAX */ \
        int64_t done = 0;                                                                \
        if (isa == BNBCY_ISA_AVX512) {                                                   \
            m = bnbcy_absmax_avx512(x, DTYPE, len);                                      \
            done = len;                                                                  \
        } else if (isa == BNBCY_ISA_AVX2) {                                              \
            done = bnbcy_absmax_avx2(x, DTYPE, len, &m);                                 \
        }                                                                                \
        for (int64_t i = done; i < len; i++) {                                           \
            float a = fabsf(LOAD(x[i]));                                                 \
            m = a > m ? a : m;                                                           \
        }                                                                                \
        if (partial && !(m > 0.0f)) m = 0.0f; /* CUDA pads a partial block with zeros */ \
        if (m >= 0.0f && m < FLT_MIN) m = 0.0f; /* ftz */                                \
        *absmax = m;                                                                     \
        if (m == 0.0f) { /* 0 * inf = NaN for every element: code 0 */                   \
            memset(q, 0, (size_t)len);                                                   \
            return;                                                                      \
        }                                                                                \
        float r = 1.0f / m;                                                              \
        if (fabsf(r) < FLT_MIN) r = 0.0f; /* ftz: |m| > 2^126 */                         \
        if (t && isa == BNBCY_ISA_AVX512) {                                              \
            bnbcy_q8_codes_avx512(x, DTYPE, len, r, t->lut, t->mids, t->steps,          \
                                  t->one_per_bucket ? t->packed : NULL, q);              \
        } else if (t && t->one_per_bucket) {                                             \
            int64_t i = isa == BNBCY_ISA_AVX2 ? bnbcy_q8_codes_avx2(x, DTYPE, len, r, t->packed, q) : 0; \
            for (; i < len; i++)                                                         \
                q[i] = bnbcy_q8_code_packed(bnbcy_ftz(bnbcy_ftz(LOAD(x[i])) * r), t->packed); \
        } else if (t) {                                                                  \
            const int steps = t->steps;                                                  \
            for (int64_t i = 0; i < len; i++)                                            \
                q[i] = bnbcy_q8_code_table(bnbcy_ftz(bnbcy_ftz(LOAD(x[i])) * r), t, steps); \
        } else {                                                                         \
            for (int64_t i = 0; i < len; i++)                                            \
                q[i] = bnbcy_q8_code_search(bnbcy_ftz(bnbcy_ftz(LOAD(x[i])) * r), code); \
        }                                                                                \
    }

#define BNBCY_LOAD_F32(v) (v)
BNBCY_Q8_DEFINE_BLOCK(f32, float, BNBCY_LOAD_F32, BNBCY_F32)
BNBCY_Q8_DEFINE_BLOCK(f16, uint16_t, bnbcy_f16_to_f32, BNBCY_F16)
BNBCY_Q8_DEFINE_BLOCK(bf16, uint16_t, bnbcy_bf16_to_f32, BNBCY_BF16)

/* table may be NULL (literal search). Returns 0, or -1 for an unknown dtype. */
static int bnbcy_q8_quantize(const void *A, int dtype, int64_t n, int64_t blocksize,
                             const float *code, const bnbcy_q8_table *table, uint8_t *q,
                             float *absmax, int nthreads) {
    const int64_t nblocks = n / blocksize + (n % blocksize != 0);  /* no overflow for huge blocksizes */
    const int isa = bnbcy_cpu_isa();
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16) return -1;
    bnbcy_advise_hugepages(q, (size_t)n);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= BNBCY_OMP_MIN_WORK)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (n - start) < blocksize ? (n - start) : blocksize;
        if (dtype == BNBCY_F32)
            bnbcy_q8_block_f32((const float *)A + start, len, code, table, q + start, absmax + b, isa,
                               len < blocksize);
        else if (dtype == BNBCY_F16)
            bnbcy_q8_block_f16((const uint16_t *)A + start, len, code, table, q + start, absmax + b, isa,
                               len < blocksize);
        else
            bnbcy_q8_block_bf16((const uint16_t *)A + start, len, code, table, q + start, absmax + b, isa,
                               len < blocksize);
    }
    return 0;
}

static int bnbcy_q8_dequantize(const uint8_t *q, const float *code, const float *absmax,
                               int64_t n, int64_t blocksize, void *out, int dtype,
                               int nthreads) {
    const int64_t nblocks = n / blocksize + (n % blocksize != 0);  /* no overflow for huge blocksizes */
    float lut[256];
    const int isa = bnbcy_cpu_isa();
    if (dtype < BNBCY_F32 || dtype > BNBCY_BF16) return -1;
    for (int i = 0; i < 256; i++) lut[i] = bnbcy_ftz(code[i]);
    bnbcy_advise_hugepages(out, (size_t)n * (dtype == BNBCY_F32 ? 4 : 2));
    #pragma omp parallel for schedule(static) num_threads(nthreads) if (n >= BNBCY_OMP_MIN_WORK)
    for (int64_t b = 0; b < nblocks; b++) {
        const int64_t start = b * blocksize;
        const int64_t len = (n - start) < blocksize ? (n - start) : blocksize;
        const float s = bnbcy_ftz(absmax[b]);
        const uint8_t *qb = q + start;
        void *ob = (char *)out + start * (dtype == BNBCY_F32 ? 4 : 2);
        int64_t i = 0;
        if (isa == BNBCY_ISA_AVX512) {
            bnbcy_q8_dequant_avx512(qb, lut, s, len, ob, dtype);
            i = len;
        } else if (isa == BNBCY_ISA_AVX2) {
            i = bnbcy_q8_dequant_avx2(qb, lut, s, len, ob, dtype);
        }
        if (dtype == BNBCY_F32) {
            for (; i < len; i++) ((float *)ob)[i] = bnbcy_ftz(lut[qb[i]] * s);
        } else if (dtype == BNBCY_F16) {
            for (; i < len; i++) ((uint16_t *)ob)[i] = bnbcy_f32_to_f16(bnbcy_ftz(lut[qb[i]] * s));
        } else {
            for (; i < len; i++) ((uint16_t *)ob)[i] = bnbcy_f32_to_bf16(bnbcy_ftz(lut[qb[i]] * s));
        }
    }
    return 0;
}

#endif
