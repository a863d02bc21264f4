/* CPU optimizer update kernels (NUMERICS.md §6.3-§6.6): bitsandbytes' 32-bit and
 * 8-bit blockwise updates for adam/lamb, ademamix, momentum/lars, rmsprop, adagrad
 * and lion, for many tensors of one parameter group in ONE OpenMP pass.
 *
 * The float32 rounding points and fma pairings are those of bnb's CUDA kernels;
 * CUDA's fast-math approximations (rcp/div/sqrt/pow .approx) are replaced by the IEEE
 * operations (1/x, /, sqrtf, powf). fma is written as fmaf (the build uses
 * -std=c11, so the compiler never contracts other products).
 *
 * Work split: every tensor is cut into chunks of BNBCY_OPT_CHUNK elements (a multiple
 * of the 256-element 8-bit block); the chunks of all tensors form one list that a
 * single `omp parallel for` walks. With max_unorm > 0 a first pass sums the squared
 * would-be update per chunk in double; the per-tensor sum adds the chunk partials in
 * chunk order, so the result does not depend on the thread count. */
#ifndef BNBCY_CPU_OPTIM_H
#define BNBCY_CPU_OPTIM_H
#include "bnbcy_cpu_blockwise8.h"
#include "bnbcy_omp.h"
#include <stdlib.h>

enum {
    BNBCY_OPT_ADAM = 0, /* adam, lamb */
    BNBCY_OPT_MOMENTUM = 1, /* momentum, lars */
    BNBCY_OPT_RMSPROP = 2,
    BNBCY_OPT_ADAGRAD = 3,
    BNBCY_OPT_LION = 4,
    BNBCY_OPT_ADEMAMIX = 5
};

#define BNBCY_OPT_BLOCK 256
#define BNBCY_OPT_CHUNK 16384

typedef struct {
    void *p;             /* n elements of dtype */
    const void *g;       /* n elements of dtype */
    void *s1;            /* float32 (32-bit) or uint8 codes (8-bit); ademamix: 2n */
    void *s2;            /* float32 / uint8 or NULL (1-state) */
    float *absmax1;      /* 8-bit: [nblocks] ([2, nblocks] for ademamix) */
    float *absmax2;      /* 8-bit 2-state: [nblocks] */
    int64_t n;
    int32_t step;
    float param_norm;    /* used when max_unorm > 0 */
    /* filled by the driver */
    float c1, c2, ss, c2eps, r1, r2, us;
    double unorm;        /* sum of squared would-be updates (0 when not computed) */
} bnbcy_opt_tensor;

typedef struct {
    int opt, dtype, skip_zeros;
    float b1, b2, b3, alpha, eps, wd, lr, gnorm_scale, max_unorm;
    /* 8-bit */
    const float *qmap1, *qmap2;
    const bnbcy_q8_table *t1, *t2; /* NULL: literal search */
    /* set by bnbcy_opt_update: k when signbit(qmap1[c]) == (c < k) for every c (the signed
     * dynamic map: 127), so the sign fix needs no table read; -1 otherwise */
    int neg_below1;
    /* set by bnbcy_opt_update: smallest nonzero |qmap1|, |qmap2| (proves products normal) */
    float qmin1, qmin2;
    /* requantization tables of qmap1 (sign fix included) and qmap2 for the AVX-512 path
     * (bnbcy_opt_build_rq), or NULL */
    const uint32_t *rq1, *rq2;
} bnbcy_opt_args;

/* Optimizers whose update takes the trust ratio (adagrad computes the norm but, as in bnb,
 * does not apply it; lion and ademamix ignore max_unorm as bnb effectively does). */
static inline int bnbcy_opt_uses_unorm(int opt) {
    return opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_MOMENTUM || opt == BNBCY_OPT_RMSPROP ||
           opt == BNBCY_OPT_ADAGRAD;
}

/* T(x) as a float: the value x takes when stored as dtype. */
static inline float bnbcy_opt_round(float x, int dtype) {
    if (dtype == BNBCY_F32) return x;
    if (dtype == BNBCY_F16) return bnbcy_f16_to_f32(bnbcy_f32_to_f16(x));
    return bnbcy_bf16_to_f32(bnbcy_f32_to_bf16(x));
}

static inline float bnbcy_opt_sgn(float d) { return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : 0.0f); }

/* ---------------------------------------------------------------- 32-bit --- */

/* The trust ratio's sum of u^2 (§6.4) accumulates in 16 double lanes, element i of a chunk in lane
 * i mod 16, and adds the lanes in order at the end: the scalar and AVX-512 passes give the same
 * sum, and the per-tensor total (chunk sums in chunk order) does not depend on the thread count. */
#define BNBCY_OPT_LANES 16

static inline double bnbcy_opt_lanes_total(const double *acc) {
    double s = 0.0;
    for (int j = 0; j < BNBCY_OPT_LANES; j++) s += acc[j];
    return s;
}

/* Sum of u^2 over [start, start+len) from the would-be new states (§6.4). */
static double bnbcy_opt32_unorm_chunk(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                      int64_t start, int64_t len) {
    const int dt = a->dtype;
    const float b1 = a->b1, b2 = a->b2, omb1 = 1.0f - a->b1, omb2 = 1.0f - a->b2, eps = a->eps;
    const float *s1 = (const float *)t->s1, *s2 = (const float *)t->s2;
    double acc[BNBCY_OPT_LANES] = {0.0};
    for (int64_t i = start; i < start + len; i++) {
        const float g = bnbcy_opt_round(a->gnorm_scale * bnbcy_load_any(t->g, dt, i), dt);
        float u;
        switch (a->opt) {
        case BNBCY_OPT_ADAM: {
            const float m = fmaf(s1[i], b1, omb1 * g), v = fmaf(s2[i], b2, omb2 * (g * g));
            u = (m * t->r1) / (sqrtf(v * t->r2) + eps);
            break;
        }
        case BNBCY_OPT_MOMENTUM: u = t->step == 1 ? g : fmaf(s1[i], b1, g); break;
        case BNBCY_OPT_RMSPROP: u = g / (sqrtf(fmaf(s1[i], b1, g * (omb1 * g))) + eps); break;
        case BNBCY_OPT_ADAGRAD: u = g / (sqrtf(fmaf(g, g, s1[i])) + eps); break;
        default: u = 0.0f;
        }
        acc[(i - start) % BNBCY_OPT_LANES] += (double)(u * u);
    }
    return bnbcy_opt_lanes_total(acc);
}

static void bnbcy_opt32_chunk_scalar(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                     int64_t start, int64_t len) {
    const int dt = a->dtype, skip = a->skip_zeros;
    const float b1 = a->b1, b2 = a->b2, b3 = a->b3, eps = a->eps, lr = a->lr, wd = a->wd;
    const float omb1 = 1.0f - b1, omb2 = 1.0f - b2, omb3 = 1.0f - b3, decay = 1.0f - lr * wd;
    const float gns = a->gnorm_scale, us = t->us;
    float *s1 = (float *)t->s1, *s2 = (float *)t->s2;
    const int64_t end = start + len;
    switch (a->opt) {
    case BNBCY_OPT_ADAM: {
        const float ssus = t->ss * us, c2eps = t->c2eps;
        for (int64_t i = start; i < end; i++) {
            const float g = bnbcy_opt_round(gns * bnbcy_load_any(t->g, dt, i), dt);
            if (skip && g == 0.0f) continue;
            const float m = fmaf(s1[i], b1, omb1 * g), v = fmaf(s2[i], b2, omb2 * (g * g));
            s1[i] = m;
            s2[i] = v;
            float p = bnbcy_opt_round(fmaf(ssus, m / (sqrtf(v) + c2eps), bnbcy_load_any(t->p, dt, i)), dt);
            if (wd > 0.0f) p = p * decay;
            bnbcy_store_any(t->p, dt, i, p);
        }
        break;
    }
    case BNBCY_OPT_ADEMAMIX: {
        float *m2s = s1 + t->n;
        const float c1 = t->c1, c2 = t->c2, alpha = a->alpha;
        for (int64_t i = start; i < end; i++) {
            const float g = bnbcy_opt_round(gns * bnbcy_load_any(t->g, dt, i), dt);
            const float m1 = fmaf(s1[i], b1, omb1 * g), m2 = fmaf(m2s[i], b3, omb3 * g);
            const float nu = fmaf(s2[i], b2, g * (omb2 * g));
            s1[i] = m1;
            m2s[i] = m2;
            s2[i] = nu;
            const float upd = (fmaf(m2, alpha, m1 / c1) / (sqrtf(nu) / c2 + eps)) * lr;
            float p = bnbcy_opt_round(bnbcy_load_any(t->p, dt, i) - upd, dt);
            if (wd > 0.0f) p = p * decay;
            bnbcy_store_any(t->p, dt, i, p);
        }
        break;
    }
    default: { /* 1-state */
        const int opt = a->opt, first = t->step == 1;
        for (int64_t i = start; i < end; i++) {
            float g = bnbcy_opt_round(gns * bnbcy_load_any(t->g, dt, i), dt);
            float p = bnbcy_load_any(t->p, dt, i);
            if (wd > 0.0f && opt != BNBCY_OPT_LION) g = bnbcy_opt_round(fmaf(p, wd, g), dt);
            if (skip && g == 0.0f) continue;
            float s = s1[i];
            switch (opt) {
            case BNBCY_OPT_MOMENTUM:
                s = first ? g : fmaf(s, b1, g);
                p = p - us * (s * lr);
                break;
            case BNBCY_OPT_RMSPROP:
                s = fmaf(s, b1, g * (omb1 * g));
                p = p - us * ((g / (sqrtf(s) + eps)) * lr);
                break;
            case BNBCY_OPT_ADAGRAD:
                s = fmaf(g, g, s);
                p = p - (g / (sqrtf(s) + eps)) * lr;
                break;
            default: { /* lion */
                if (wd > 0.0f) p = bnbcy_opt_round(p * decay, dt);
                const float d = fmaf(s, b1, omb1 * g);
                p = p - us * (bnbcy_opt_sgn(d) * lr);
                s = fmaf(s, b2, omb2 * g);
            }
            }
            s1[i] = s;
            bnbcy_store_any(t->p, dt, i, p);
        }
    }
    }
}

#if BNBCY_HAVE_AVX512_PATH
/* The same operations as bnbcy_opt32_chunk_scalar, 16 lanes at a time. */
BNBCY_AVX512 static inline __m512 bnbcy_opt_round16(__m512 x, int dtype) {
    if (dtype == BNBCY_F32) return x;
    if (dtype == BNBCY_F16)
        return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m512i u = _mm512_castps_si512(x);
    __m512i b = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                                     _mm512_and_si512(_mm512_srli_epi32(u, 16),
                                                                      _mm512_set1_epi32(1))));
    b = _mm512_and_si512(b, _mm512_set1_epi32((int)0xFFFF0000u));
    b = _mm512_mask_mov_epi32(b, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC00000));
    return _mm512_castsi512_ps(b);
}

BNBCY_AVX512 static inline __m512 bnbcy_opt_sgn16(__m512 d) {
    const __mmask16 pos = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_GT_OQ);
    const __mmask16 neg = _mm512_cmp_ps_mask(d, _mm512_setzero_ps(), _CMP_LT_OQ);
    __m512 r = _mm512_mask_mov_ps(_mm512_setzero_ps(), pos, _mm512_set1_ps(1.0f));
    return _mm512_mask_mov_ps(r, neg, _mm512_set1_ps(-1.0f));
}

BNBCY_AVX512 static void bnbcy_opt32_chunk_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                  int64_t start, int64_t len) {
    const int dt = a->dtype, skip = a->skip_zeros, opt = a->opt;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    const char *gp = (const char *)t->g;
    char *pp = (char *)t->p;
    float *s1 = (float *)t->s1, *s2 = (float *)t->s2;
    const __m512 b1 = _mm512_set1_ps(a->b1), b2 = _mm512_set1_ps(a->b2), b3 = _mm512_set1_ps(a->b3);
    const __m512 omb1 = _mm512_set1_ps(1.0f - a->b1), omb2 = _mm512_set1_ps(1.0f - a->b2),
                 omb3 = _mm512_set1_ps(1.0f - a->b3);
    const __m512 eps = _mm512_set1_ps(a->eps), lr = _mm512_set1_ps(a->lr), wd = _mm512_set1_ps(a->wd);
    const __m512 decay = _mm512_set1_ps(1.0f - a->lr * a->wd), gns = _mm512_set1_ps(a->gnorm_scale);
    const __m512 us = _mm512_set1_ps(t->us), zero = _mm512_setzero_ps();
    const int has_wd = a->wd > 0.0f, scale_g = a->gnorm_scale != 1.0f, first = t->step == 1;
    for (int64_t i = start; i < start + len; i += 16) {
        __mmask16 k = bnbcy_tail_mask(start + len - i);
        __m512 g = bnbcy_load16(gp + i * isz, dt, k);
        if (scale_g) g = bnbcy_opt_round16(_mm512_mul_ps(gns, g), dt);
        __m512 p = bnbcy_load16(pp + i * isz, dt, k);
        if (opt == BNBCY_OPT_ADAM) {
            if (skip) k &= _mm512_cmp_ps_mask(g, zero, _CMP_NEQ_UQ);
            const __m512 m = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s1 + i), b1, _mm512_mul_ps(omb1, g));
            const __m512 v = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s2 + i), b2,
                                             _mm512_mul_ps(omb2, _mm512_mul_ps(g, g)));
            _mm512_mask_storeu_ps(s1 + i, k, m);
            _mm512_mask_storeu_ps(s2 + i, k, v);
            const __m512 den = _mm512_add_ps(_mm512_sqrt_ps(v), _mm512_set1_ps(t->c2eps));
            p = bnbcy_opt_round16(_mm512_fmadd_ps(_mm512_set1_ps(t->ss * t->us), _mm512_div_ps(m, den), p), dt);
            if (has_wd) p = _mm512_mul_ps(p, decay);
        } else if (opt == BNBCY_OPT_ADEMAMIX) {
            const __m512 m1 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s1 + i), b1, _mm512_mul_ps(omb1, g));
            const __m512 m2 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s1 + t->n + i), b3, _mm512_mul_ps(omb3, g));
            const __m512 nu = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(k, s2 + i), b2,
                                              _mm512_mul_ps(g, _mm512_mul_ps(omb2, g)));
            _mm512_mask_storeu_ps(s1 + i, k, m1);
            _mm512_mask_storeu_ps(s1 + t->n + i, k, m2);
            _mm512_mask_storeu_ps(s2 + i, k, nu);
            const __m512 num = _mm512_fmadd_ps(m2, _mm512_set1_ps(a->alpha), _mm512_div_ps(m1, _mm512_set1_ps(t->c1)));
            const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(nu), _mm512_set1_ps(t->c2)), eps);
            p = bnbcy_opt_round16(_mm512_sub_ps(p, _mm512_mul_ps(_mm512_div_ps(num, den), lr)), dt);
            if (has_wd) p = _mm512_mul_ps(p, decay);
        } else {
            if (has_wd && opt != BNBCY_OPT_LION) g = bnbcy_opt_round16(_mm512_fmadd_ps(p, wd, g), dt);
            if (skip) k &= _mm512_cmp_ps_mask(g, zero, _CMP_NEQ_UQ);
            __m512 s = _mm512_maskz_loadu_ps(k, s1 + i);
            if (opt == BNBCY_OPT_MOMENTUM) {
                s = first ? g : _mm512_fmadd_ps(s, b1, g);
                p = _mm512_sub_ps(p, _mm512_mul_ps(us, _mm512_mul_ps(s, lr)));
            } else if (opt == BNBCY_OPT_RMSPROP) {
                s = _mm512_fmadd_ps(s, b1, _mm512_mul_ps(g, _mm512_mul_ps(omb1, g)));
                const __m512 q = _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(s), eps));
                p = _mm512_sub_ps(p, _mm512_mul_ps(us, _mm512_mul_ps(q, lr)));
            } else if (opt == BNBCY_OPT_ADAGRAD) {
                s = _mm512_fmadd_ps(g, g, s);
                const __m512 q = _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(s), eps));
                p = _mm512_sub_ps(p, _mm512_mul_ps(q, lr));
            } else { /* lion */
                if (has_wd) p = bnbcy_opt_round16(_mm512_mul_ps(p, decay), dt);
                const __m512 d = _mm512_fmadd_ps(s, b1, _mm512_mul_ps(omb1, g));
                p = _mm512_sub_ps(p, _mm512_mul_ps(us, _mm512_mul_ps(bnbcy_opt_sgn16(d), lr)));
                s = _mm512_fmadd_ps(s, b2, _mm512_mul_ps(omb2, g));
            }
            _mm512_mask_storeu_ps(s1 + i, k, s);
        }
        bnbcy_store16(pp + i * isz, dt, k, p);
    }
}
#endif

/* ----------------------------------------------------------------- 8-bit --- */

static inline uint8_t bnbcy_opt_code(float xn, const float *code, const bnbcy_q8_table *t) {
    if (t == NULL) return bnbcy_q8_code_search(xn, code);
    if (t->one_per_bucket) return bnbcy_q8_code_packed(xn, t->packed);
    return bnbcy_q8_code_table(xn, t, t->steps);
}

/* 1/M for the requantization, flushed: xn = ftz(s * ftz(1/M)) has the shape of CUDA's
 * div.approx.ftz (a multiplication by an approximate reciprocal, 0 for |M| > 2^126) and costs a
 * multiplication per element instead of a division. */
static inline float bnbcy_opt_recip(float M) { return bnbcy_ftz(1.0f / M); }

/* Requantize one block of new states with its new absmax M (§6.5), sign fix if signed. */
static inline void bnbcy_opt_requant(const float *s, int64_t len, float M, const float *code,
                                     const bnbcy_q8_table *t, int sign_fix, uint8_t *q) {
    const float r = bnbcy_opt_recip(M);
    for (int64_t i = 0; i < len; i++) {
        uint32_t c = bnbcy_opt_code(bnbcy_ftz(s[i] * r), code, t);
        if (sign_fix && (signbit(code[c]) != 0) != (signbit(s[i]) != 0))
            c = s[i] > 0.0f ? ((c + 1) & 255u) : ((c - 1) & 255u);
        q[i] = (uint8_t)c;
    }
}

/* ------------------------------------------------ requantization tables --- */

/* The AVX-512 requantization reads one table entry per element, indexed by the top 16 bits u >> 16
 * of the normalized state x (sign, exponent, 7 mantissa bits): rq[u >> 16] = T << 16 | A << 8 | B
 * and the code is (u & 0xFFFF) <= T ? A : B. A bucket holds values of one sign and at most one
 * midpoint (the map's `packed` table), so the code steps at most once along the low bits in
 * either direction, and the exact-tie rule and the sign fix of §6.5 fold into A, B and T.
 * Per 16 elements this drops the order key, the flush of x, the -0 fold, the NaN test and
 * the sign fix of bnbcy_opt_requant_avx512: the builder proves that the flush and the fold cannot
 * change a code, and the caller uses the table only for blocks with 0 < M <= FLT_MAX, where
 * every state is finite (a non-finite state makes M infinite, or NaN everywhere and
 * M = -FLT_MAX). */
#define BNBCY_OPT_RQ_SIZE 65536

/* Code of x (= the state s times a positive r) as bnbcy_opt_requant finds it. pos: s > 0. */
static uint32_t bnbcy_opt_rq_ref(float x, int pos, const float *code, const bnbcy_q8_table *t,
                                 int sign_fix) {
    uint32_t c = bnbcy_opt_code(bnbcy_ftz(x), code, t);
    if (sign_fix && (signbit(code[c]) != 0) != (signbit(x) != 0))
        c = pos ? ((c + 1) & 255u) : ((c - 1) & 255u);
    return c;
}

static inline uint32_t bnbcy_opt_rq_lookup(const uint32_t *rq, float x) {
    const uint32_t u = bnbcy_f2u(x), e = rq[u >> 16];
    return (u & 0xFFFFu) <= (e >> 16) ? (e >> 8) & 255u : e & 255u;
}

/* Fills rq[BNBCY_OPT_RQ_SIZE] for code (t: its search table). Returns 0, or -1 when the map does
 * not allow it (the caller then keeps the general path). */
static int bnbcy_opt_build_rq(const float *code, const bnbcy_q8_table *t, int sign_fix, uint32_t *rq) {
    if (t == NULL || !t->one_per_bucket) return -1;
    for (uint32_t k = 0; k < BNBCY_OPT_RQ_SIZE; k++) {
        const float x0 = bnbcy_u2f(k << 16), x1 = bnbcy_u2f((k << 16) | 0xFFFFu);
        if (!isfinite(x0) || !isfinite(x1)) { rq[k] = 0; continue; } /* never reach the table */
        const int pos = x0 > 0.0f; /* +0 (bucket 0) is checked below */
        const uint32_t A = bnbcy_opt_rq_ref(x0, pos, code, t, sign_fix);
        const uint32_t B = bnbcy_opt_rq_ref(x1, pos, code, t, sign_fix);
        uint32_t T = 0xFFFFu;
        if (A != B) { /* the last low half that still gives A (codes step once per bucket) */
            uint32_t l = 0, h = 0xFFFFu;
            while (l < h) {
                const uint32_t m = (l + h) >> 1;
                if (bnbcy_opt_rq_ref(bnbcy_u2f((k << 16) | m), pos, code, t, sign_fix) == B) h = m;
                else l = m + 1;
            }
            T = l - 1; /* l > 0: x0 gives A */
        }
        rq[k] = T << 16 | A << 8 | B;
    }
    /* A subnormal x must get the code of its signed zero, and +0 the same code for s of either
     * sign (x = +0 may come from a positive s that underflowed). */
    const float zp = 0.0f, zn = -0.0f;
    const uint32_t cz = bnbcy_opt_rq_ref(zp, 0, code, t, sign_fix);
    const uint32_t czn = bnbcy_opt_rq_ref(zn, 0, code, t, sign_fix);
    if (bnbcy_opt_rq_ref(zp, 1, code, t, sign_fix) != cz) return -1;
    for (uint32_t k = 0; k < 0x80u; k++) /* buckets of the zeros and subnormals */
        if (rq[k] != (0xFFFF0000u | cz << 8 | cz) || rq[k | 0x8000u] != (0xFFFF0000u | czn << 8 | czn))
            return -1;
    return 0;
}

static inline float bnbcy_opt_absmax_acc(float m, float s) {
    const float a = fabsf(s);
    return a > m ? a : m; /* NaN never enters (as fmaxf from -FLT_MAX) */
}

/* One 2-state element (adam/lamb, ademamix). Returns the new p (unstored). */
static inline float bnbcy_opt8_elem2(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, float gr,
                                     float p, float d1, float d2, float d3, float *s1, float *s2,
                                     float *s3, int *finite) {
    const int dt = a->dtype;
    *finite = isfinite(gr);
    if (*finite) {
        const float gv = gr * a->gnorm_scale;
        *s2 = bnbcy_ftz(fmaf(gv, (1.0f - a->b2) * gv, bnbcy_ftz(d2 * a->b2)));
        *s1 = bnbcy_ftz(fmaf(1.0f - a->b1, gv, bnbcy_ftz(d1 * a->b1)));
        if (a->opt == BNBCY_OPT_ADEMAMIX) *s3 = bnbcy_ftz(fmaf(1.0f - a->b3, gv, bnbcy_ftz(d3 * a->b3)));
        if (a->opt == BNBCY_OPT_ADAM) {
            p = bnbcy_opt_round(fmaf(t->ss * t->us, *s1 / (sqrtf(*s2) + t->c2eps), p), dt);
        } else {
            const float upd = (fmaf(*s3, a->alpha, *s1 / t->c1) / (sqrtf(*s2) / t->c2 + a->eps)) * a->lr;
            p = bnbcy_opt_round(p - upd, dt);
        }
        if (a->wd > 0.0f) p = bnbcy_opt_round(p * (1.0f - a->lr * a->wd), dt);
    } else {
        *s1 = *s2 = *s3 = 0.0f;
    }
    return p;
}

/* One 1-state element (momentum/lars, rmsprop, adagrad, lion). Returns the new p. */
static inline float bnbcy_opt8_elem1(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, float gr,
                                     float p, float d1, float *s1) {
    const int dt = a->dtype;
    const float lr = a->lr;
    float gv = gr * a->gnorm_scale;
    if (a->skip_zeros && gr == 0.0f) {
        *s1 = d1; /* bnb leaves it uninitialised; keep the old state */
        return p;
    }
    if (a->wd > 0.0f) {
        if (a->opt == BNBCY_OPT_LION) p = bnbcy_opt_round(p * (1.0f - lr * a->wd), dt);
        else gv = fmaf(p, a->wd, gv);
    }
    float s;
    switch (a->opt) {
    case BNBCY_OPT_MOMENTUM:
        s = bnbcy_ftz(t->step == 1 ? gv : fmaf(d1, a->b1, gv));
        return *s1 = s, bnbcy_opt_round(p - t->us * (s * lr), dt);
    case BNBCY_OPT_RMSPROP:
        s = bnbcy_ftz(fmaf(1.0f - a->b1, gv * gv, bnbcy_ftz(d1 * a->b1)));
        return *s1 = s, bnbcy_opt_round(p - t->us * ((gr / (sqrtf(s) + a->eps)) * lr), dt);
    case BNBCY_OPT_ADAGRAD:
        s = bnbcy_ftz(fmaf(gv, gv, d1));
        return *s1 = s, bnbcy_opt_round(p - (gr / (sqrtf(s) + a->eps)) * lr, dt);
    default: { /* lion */
        const float gs = bnbcy_opt_round(bnbcy_opt_sgn(fmaf(1.0f - a->b1, gv, bnbcy_ftz(d1 * a->b1))) * lr, dt);
        *s1 = bnbcy_ftz(fmaf(1.0f - a->b2, gv, bnbcy_ftz(d1 * a->b2)));
        if (a->skip_zeros && gs == 0.0f) return p;
        return bnbcy_opt_round(p - gs, dt);
    }
    }
}

/* The would-be update u of one element for the trust ratio (no weight decay). */
static inline float bnbcy_opt8_unorm_elem(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, float gr,
                                          float d1, float d2) {
    const float gv = gr * a->gnorm_scale;
    switch (a->opt) {
    case BNBCY_OPT_ADAM: {
        if (!isfinite(gr)) return 0.0f;
        const float v = bnbcy_ftz(fmaf(gv, (1.0f - a->b2) * gv, bnbcy_ftz(d2 * a->b2)));
        const float m = bnbcy_ftz(fmaf(1.0f - a->b1, gv, bnbcy_ftz(d1 * a->b1)));
        return (m * t->r1) / (sqrtf(v * t->r2) + a->eps);
    }
    case BNBCY_OPT_MOMENTUM: return t->step == 1 ? gv : fmaf(d1, a->b1, gv);
    case BNBCY_OPT_RMSPROP:
        return gv / (sqrtf(fmaf(1.0f - a->b1, gv * gv, bnbcy_ftz(d1 * a->b1))) + a->eps);
    case BNBCY_OPT_ADAGRAD: return gv / (sqrtf(fmaf(gv, gv, d1)) + a->eps);
    default: return 0.0f;
    }
}

static double bnbcy_opt8_unorm_chunk(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                     int64_t start, int64_t len) {
    const uint8_t *q1 = (const uint8_t *)t->s1, *q2 = (const uint8_t *)t->s2;
    double acc[BNBCY_OPT_LANES] = {0.0};
    for (int64_t i = start; i < start + len; i++) {
        const int64_t b = i / BNBCY_OPT_BLOCK;
        const float d1 = bnbcy_ftz(a->qmap1[q1[i]] * t->absmax1[b]);
        const float d2 = q2 ? bnbcy_ftz(a->qmap2[q2[i]] * t->absmax2[b]) : 0.0f;
        const float u = bnbcy_opt8_unorm_elem(a, t, bnbcy_load_any(t->g, a->dtype, i), d1, d2);
        acc[(i - start) % BNBCY_OPT_LANES] += (double)(u * u);
    }
    return bnbcy_opt_lanes_total(acc);
}

#if BNBCY_HAVE_AVX512_PATH
/* Elements ahead that the AVX-512 trust-ratio passes prefetch: on the machines measured the
 * hardware prefetcher alone left the 8-bit pass at half its in-cache speed. */
#define BNBCY_OPT_PF_AHEAD 1024

/* acc lanes 0-7 (lo) and 8-15 (hi) += u^2 (rounded to float, then widened, as the scalar pass). */
BNBCY_AVX512 static inline void bnbcy_opt_lanes_add16(__m512 u, __m512d *lo, __m512d *hi) {
    const __m512 uu = _mm512_mul_ps(u, u);
    *lo = _mm512_add_pd(*lo, _mm512_cvtps_pd(_mm512_castps512_ps256(uu)));
    *hi = _mm512_add_pd(*hi, _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(uu), 1))));
}

BNBCY_AVX512 static inline double bnbcy_opt_lanes_total16(__m512d lo, __m512d hi) {
    double acc[BNBCY_OPT_LANES];
    _mm512_storeu_pd(acc, lo);
    _mm512_storeu_pd(acc + 8, hi);
    return bnbcy_opt_lanes_total(acc);
}

/* bnbcy_opt32_unorm_chunk, 16 lanes at a time. */
BNBCY_AVX512 static double bnbcy_opt32_unorm_chunk_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                          int64_t start, int64_t len) {
    const int dt = a->dtype, first = t->step == 1;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    const __m512 b1 = _mm512_set1_ps(a->b1), b2 = _mm512_set1_ps(a->b2), omb1 = _mm512_set1_ps(1.0f - a->b1),
                 omb2 = _mm512_set1_ps(1.0f - a->b2), eps = _mm512_set1_ps(a->eps),
                 gns = _mm512_set1_ps(a->gnorm_scale), r1 = _mm512_set1_ps(t->r1), r2 = _mm512_set1_ps(t->r2);
    const float *s1 = (const float *)t->s1 + start, *s2 = (const float *)t->s2 + start;
    const char *gp = (const char *)t->g + start * isz;
    __m512d lo = _mm512_setzero_pd(), hi = lo;
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        _mm_prefetch(gp + (i + BNBCY_OPT_PF_AHEAD) * isz, _MM_HINT_T0);
        _mm_prefetch((const char *)(s1 + i + BNBCY_OPT_PF_AHEAD), _MM_HINT_T0);
        if (a->opt == BNBCY_OPT_ADAM) _mm_prefetch((const char *)(s2 + i + BNBCY_OPT_PF_AHEAD), _MM_HINT_T0);
        const __m512 g = bnbcy_opt_round16(_mm512_mul_ps(gns, bnbcy_load16(gp + i * isz, dt, k)), dt);
        const __m512 x1 = _mm512_maskz_loadu_ps(k, s1 + i);
        __m512 u;
        switch (a->opt) {
        case BNBCY_OPT_ADAM: {
            const __m512 x2 = _mm512_maskz_loadu_ps(k, s2 + i);
            const __m512 m = _mm512_fmadd_ps(x1, b1, _mm512_mul_ps(omb1, g));
            const __m512 v = _mm512_fmadd_ps(x2, b2, _mm512_mul_ps(omb2, _mm512_mul_ps(g, g)));
            u = _mm512_div_ps(_mm512_mul_ps(m, r1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(v, r2)), eps));
            break;
        }
        case BNBCY_OPT_MOMENTUM: u = first ? g : _mm512_fmadd_ps(x1, b1, g); break;
        case BNBCY_OPT_RMSPROP:
            u = _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(_mm512_fmadd_ps(x1, b1, _mm512_mul_ps(g, _mm512_mul_ps(omb1, g)))), eps));
            break;
        case BNBCY_OPT_ADAGRAD:
            u = _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(_mm512_fmadd_ps(g, g, x1)), eps));
            break;
        default: u = _mm512_setzero_ps();
        }
        bnbcy_opt_lanes_add16(_mm512_maskz_mov_ps(k, u), &lo, &hi);
    }
    return bnbcy_opt_lanes_total16(lo, hi);
}

/* bnbcy_opt8_unorm_chunk, 16 lanes at a time (a chunk starts on a 256-block), inlined once per
 * optimizer so that the loop carries no switch. */
BNBCY_AVX512 static inline __attribute__((always_inline)) double bnbcy_opt8_unorm_chunk_avx512_k(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start, int64_t len, const int opt) {
    const int dt = a->dtype, first = t->step == 1;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    const __m512 b1 = _mm512_set1_ps(a->b1), b2 = _mm512_set1_ps(a->b2), omb1 = _mm512_set1_ps(1.0f - a->b1),
                 omb2 = _mm512_set1_ps(1.0f - a->b2), eps = _mm512_set1_ps(a->eps),
                 gns = _mm512_set1_ps(a->gnorm_scale), r1 = _mm512_set1_ps(t->r1), r2 = _mm512_set1_ps(t->r2);
    const int two = opt == BNBCY_OPT_ADAM;
    const uint8_t *q1 = (const uint8_t *)t->s1 + start, *q2 = two ? (const uint8_t *)t->s2 + start : NULL;
    const char *gp = (const char *)t->g + start * isz;
    __m512d lo = _mm512_setzero_pd(), hi = lo;
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = bnbcy_tail_mask(len - i);
        const int64_t b = (start + i) / BNBCY_OPT_BLOCK;
        const __m512 gr = bnbcy_load16(gp + i * isz, dt, k), gv = _mm512_mul_ps(gr, gns);
        _mm_prefetch(gp + (i + BNBCY_OPT_PF_AHEAD) * isz, _MM_HINT_T0);
        if ((i & 63) == 0) {
            _mm_prefetch((const char *)q1 + i + BNBCY_OPT_PF_AHEAD, _MM_HINT_T0);
            if (two) _mm_prefetch((const char *)q2 + i + BNBCY_OPT_PF_AHEAD, _MM_HINT_T0);
        }
        const __m512 x1 = bnbcy_gather_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, q1 + i)), a->qmap1);
        const __m512 x2 = two ? bnbcy_gather_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(k, q2 + i)), a->qmap2)
                              : x1;
        const __m512 d1 = bnbcy_ftz16(_mm512_mul_ps(x1, _mm512_set1_ps(t->absmax1[b])));
        __m512 u;
        switch (opt) {
        case BNBCY_OPT_ADAM: {
            const __m512 d2 = bnbcy_ftz16(_mm512_mul_ps(x2, _mm512_set1_ps(t->absmax2[b])));
            const __m512 v = bnbcy_ftz16(_mm512_fmadd_ps(gv, _mm512_mul_ps(omb2, gv), bnbcy_ftz16(_mm512_mul_ps(d2, b2))));
            const __m512 m = bnbcy_ftz16(_mm512_fmadd_ps(omb1, gv, bnbcy_ftz16(_mm512_mul_ps(d1, b1))));
            u = _mm512_div_ps(_mm512_mul_ps(m, r1), _mm512_add_ps(_mm512_sqrt_ps(_mm512_mul_ps(v, r2)), eps));
            u = _mm512_maskz_mov_ps(~_mm512_fpclass_ps_mask(gr, 0x99), u); /* non-finite g: 0 */
            break;
        }
        case BNBCY_OPT_MOMENTUM: u = first ? gv : _mm512_fmadd_ps(d1, b1, gv); break;
        case BNBCY_OPT_RMSPROP:
            u = _mm512_div_ps(gv, _mm512_add_ps(_mm512_sqrt_ps(_mm512_fmadd_ps(omb1, _mm512_mul_ps(gv, gv),
                                                                               bnbcy_ftz16(_mm512_mul_ps(d1, b1)))), eps));
            break;
        case BNBCY_OPT_ADAGRAD:
            u = _mm512_div_ps(gv, _mm512_add_ps(_mm512_sqrt_ps(_mm512_fmadd_ps(gv, gv, d1)), eps));
            break;
        default: u = _mm512_setzero_ps();
        }
        bnbcy_opt_lanes_add16(_mm512_maskz_mov_ps(k, u), &lo, &hi);
    }
    return bnbcy_opt_lanes_total16(lo, hi);
}

BNBCY_AVX512 static double bnbcy_opt8_unorm_chunk_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                         int64_t start, int64_t len) {
    switch (a->opt) {
    case BNBCY_OPT_ADAM: return bnbcy_opt8_unorm_chunk_avx512_k(a, t, start, len, BNBCY_OPT_ADAM);
    case BNBCY_OPT_MOMENTUM: return bnbcy_opt8_unorm_chunk_avx512_k(a, t, start, len, BNBCY_OPT_MOMENTUM);
    case BNBCY_OPT_RMSPROP: return bnbcy_opt8_unorm_chunk_avx512_k(a, t, start, len, BNBCY_OPT_RMSPROP);
    case BNBCY_OPT_ADAGRAD: return bnbcy_opt8_unorm_chunk_avx512_k(a, t, start, len, BNBCY_OPT_ADAGRAD);
    default: return 0.0;
    }
}
#endif

/* One 256-block [start, start+len) of an 8-bit update. */
static void bnbcy_opt8_block(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t b,
                             int64_t start, int64_t len) {
    float n1[BNBCY_OPT_BLOCK], n2[BNBCY_OPT_BLOCK], n3[BNBCY_OPT_BLOCK];
    const int dt = a->dtype, two = a->opt == BNBCY_OPT_ADAM || a->opt == BNBCY_OPT_ADEMAMIX;
    const int ademamix = a->opt == BNBCY_OPT_ADEMAMIX;
    const int64_t nblocks = (t->n + BNBCY_OPT_BLOCK - 1) / BNBCY_OPT_BLOCK;
    uint8_t *q1 = (uint8_t *)t->s1 + start, *q2 = two ? (uint8_t *)t->s2 + start : NULL;
    uint8_t *q3 = ademamix ? (uint8_t *)t->s1 + t->n + start : NULL;
    const float a1 = bnbcy_ftz(t->absmax1[b]), a2 = two ? bnbcy_ftz(t->absmax2[b]) : 0.0f;
    const float a3 = ademamix ? bnbcy_ftz(t->absmax1[nblocks + b]) : 0.0f;
    const float *m1 = a->qmap1, *m2 = a->qmap2;
    float M1 = -FLT_MAX, M2 = -FLT_MAX, M3 = -FLT_MAX;
    for (int64_t i = 0; i < len; i++) {
        const float gr = bnbcy_load_any(t->g, dt, start + i), p = bnbcy_load_any(t->p, dt, start + i);
        const float d1 = bnbcy_ftz(m1[q1[i]] * a1);
        float np;
        if (two) {
            const float d2 = bnbcy_ftz(m2[q2[i]] * a2), d3 = ademamix ? bnbcy_ftz(m1[q3[i]] * a3) : 0.0f;
            int finite;
            np = bnbcy_opt8_elem2(a, t, gr, p, d1, d2, d3, n1 + i, n2 + i, n3 + i, &finite);
            M2 = bnbcy_opt_absmax_acc(M2, n2[i]);
            if (ademamix) M3 = bnbcy_opt_absmax_acc(M3, n3[i]);
        } else {
            np = bnbcy_opt8_elem1(a, t, gr, p, d1, n1 + i);
        }
        M1 = bnbcy_opt_absmax_acc(M1, n1[i]);
        bnbcy_store_any(t->p, dt, start + i, np);
    }
    if (len < BNBCY_OPT_BLOCK) { /* padding lanes: c1 = 128, c2 = 0, g = 0, p = 0 */
        float s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
        const float d1 = bnbcy_ftz(m1[128] * a1);
        if (two) {
            int finite;
            bnbcy_opt8_elem2(a, t, 0.0f, 0.0f, d1, bnbcy_ftz(m2[0] * a2), bnbcy_ftz(m1[128] * a3),
                             &s1, &s2, &s3, &finite);
            M2 = bnbcy_opt_absmax_acc(M2, s2);
            if (ademamix) M3 = bnbcy_opt_absmax_acc(M3, s3);
        } else {
            bnbcy_opt8_elem1(a, t, 0.0f, 0.0f, d1, &s1);
        }
        M1 = bnbcy_opt_absmax_acc(M1, s1);
    }
    t->absmax1[b] = M1;
    bnbcy_opt_requant(n1, len, M1, m1, a->t1, 1, q1);
    if (two) {
        t->absmax2[b] = M2;
        bnbcy_opt_requant(n2, len, M2, m2, a->t2, 0, q2);
    }
    if (ademamix) {
        t->absmax1[nblocks + b] = M3;
        bnbcy_opt_requant(n3, len, M3, m1, a->t1, 1, q3);
    }
}

#if BNBCY_HAVE_AVX512_PATH
/* Codes of 16 values xn (bnbcy_opt_code lane by lane; t != NULL). */
BNBCY_AVX512 static inline __m512i bnbcy_opt_codes16(__m512 xn, const bnbcy_q8_table *t) {
    const __m512i sign = _mm512_set1_epi32((int)0x80000000u), one = _mm512_set1_epi32(1),
                  byte = _mm512_set1_epi32(0xFF), low16 = _mm512_set1_epi32(0xFFFF);
    __m512i c;
    if (t->one_per_bucket) {
        const __m512i u = _mm512_castps_si512(_mm512_add_ps(xn, _mm512_setzero_ps()));
        const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
        const __m512i e = bnbcy_gather_epi32(_mm512_srli_epi32(key, 16), t->packed);
        const __m512i lo = _mm512_and_si512(key, low16);
        const __m512i mid = _mm512_and_si512(_mm512_srli_epi32(e, 8), low16);
        const __mmask16 has = _mm512_test_epi32_mask(e, _mm512_set1_epi32(1 << 24));
        const __mmask16 above = has & _mm512_cmpgt_epu32_mask(lo, mid);
        const __mmask16 tie = has & _mm512_cmpeq_epi32_mask(lo, mid) & _mm512_test_epi32_mask(e, one);
        c = _mm512_and_si512(e, byte);
        c = _mm512_mask_add_epi32(c, above | tie, c, one);
    } else {
        const __m512i u = _mm512_castps_si512(xn);
        const __m512i key = _mm512_xor_si512(u, _mm512_or_si512(_mm512_srai_epi32(u, 31), sign));
        c = _mm512_and_si512(bnbcy_gather_epi32_s1(_mm512_srli_epi32(key, 16), t->lut), byte);
        for (int s = 0; s < t->steps; s++) {
            const __mmask16 lt = _mm512_cmp_ps_mask(bnbcy_gather_ps(c, t->mids), xn, _CMP_LT_OQ);
            c = _mm512_mask_add_epi32(c, lt, c, one);
        }
        const __mmask16 tie = _mm512_cmp_ps_mask(bnbcy_gather_ps(c, t->mids), xn, _CMP_EQ_OQ) &
                              _mm512_test_epi32_mask(c, one);
        c = _mm512_mask_add_epi32(c, tie, c, one);
    }
    return _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(xn, xn, _CMP_ORD_Q), c); /* NaN -> 0 */
}

/* bnbcy_opt_requant for a full block (len 256), 16 lanes at a time. */
BNBCY_AVX512 static void bnbcy_opt_requant_avx512(const float *s, float M, const float *code,
                                                  const bnbcy_q8_table *t, int sign_fix, int neg_below,
                                                  uint8_t *q) {
    const __m512 vr = _mm512_set1_ps(bnbcy_opt_recip(M));
    const __m512i signbit = _mm512_set1_epi32((int)0x80000000u), one = _mm512_set1_epi32(1),
                  byte = _mm512_set1_epi32(0xFF);
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 16) {
        const __m512 v = _mm512_loadu_ps(s + i);
        __m512i c = bnbcy_opt_codes16(bnbcy_ftz16(_mm512_mul_ps(v, vr)), t);
        if (sign_fix) {
            __mmask16 bad;
            if (neg_below >= 0) { /* the map's sign is a threshold on the code: no gather */
                const __mmask16 negc = _mm512_cmplt_epi32_mask(c, _mm512_set1_epi32(neg_below));
                bad = negc ^ _mm512_test_epi32_mask(_mm512_castps_si512(v), signbit);
            } else {
                const __m512i qs = _mm512_castps_si512(bnbcy_gather_ps(c, code));
                bad = _mm512_test_epi32_mask(_mm512_xor_si512(qs, _mm512_castps_si512(v)), signbit);
            }
            const __mmask16 pos = _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ);
            c = _mm512_mask_add_epi32(c, bad & pos, c, one);
            c = _mm512_mask_sub_epi32(c, bad & ~pos, c, one);
            c = _mm512_and_si512(c, byte);
        }
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(c));
    }
}

/* bnbcy_opt_requant for a full block through the requantization table (see bnbcy_opt_build_rq;
 * the caller checks 0 < M <= FLT_MAX). */
BNBCY_AVX512 static void bnbcy_opt_requant_rq_avx512(const float *s, float M, const uint32_t *rq, uint8_t *q) {
    const __m512 vr = _mm512_set1_ps(bnbcy_opt_recip(M));
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 16) {
        const __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(s + i), vr));
        const __m512i e = bnbcy_gather_epi32(_mm512_srli_epi32(u, 16), rq);
        /* (u & 0xFFFF) <= T  <=>  e >= u << 16, as the low 16 bits of e are below 1 << 16 */
        const __mmask16 a = _mm512_cmpge_epu32_mask(e, _mm512_slli_epi32(u, 16));
        _mm_storeu_si128((__m128i *)(q + i), _mm512_cvtepi32_epi8(_mm512_mask_srli_epi32(e, a, e, 8)));
    }
}

/* Requantizes a full block: the table when it applies, else bnbcy_opt_requant_avx512. */
BNBCY_AVX512 static inline void bnbcy_opt_requant_block_avx512(const float *s, float M, const float *code,
                                                               const bnbcy_q8_table *t, const uint32_t *rq,
                                                               int sign_fix, int neg_below, uint8_t *q) {
    if (rq != NULL && M > 0.0f && M <= FLT_MAX) bnbcy_opt_requant_rq_avx512(s, M, rq, q);
    else bnbcy_opt_requant_avx512(s, M, code, t, sign_fix, neg_below, q);
}

/* Blocks ahead of the one being updated that the adam block prefetches: the hardware prefetcher
 * alone left the two-core step about 5% short of its compute time. */
#define BNBCY_OPT_PREFETCH 4

/* Whether the flushes of a dequantized state (absmax am) and of its product with beta can act:
 * only when the smallest nonzero product is subnormal, which it almost never is. */
static inline int bnbcy_opt_may_flush(float am, float qmin, float beta) {
    return !(am == 0.0f || (am * qmin >= FLT_MIN && (beta == 0.0f || am * qmin * beta >= FLT_MIN)));
}

/* d * beta with the flushes of bnbcy_opt8_block (d = the dequantized state) when they can act. */
BNBCY_AVX512 static inline __m512 bnbcy_opt_decay16(__m512 d, __m512 beta, int flush) {
    if (!flush) return _mm512_mul_ps(d, beta);
    return bnbcy_ftz16(_mm512_mul_ps(bnbcy_ftz16(d), beta));
}

/* qmap[q[0..15]] * absmax, one gather. */
BNBCY_AVX512 static inline __m512 bnbcy_opt_dequant16(const uint8_t *q, const float *qmap, __m512 absmax) {
    return _mm512_mul_ps(bnbcy_gather_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q)), qmap),
                         absmax);
}

/* A full 256-block of 8-bit adam/lamb or ademamix (bnbcy_opt8_block + bnbcy_opt8_elem2, 16 lanes at
 * a time, the same operations in the same order). Inlined into one function per optimizer so
 * that adam carries none of ademamix's third state. */
BNBCY_AVX512 static inline __attribute__((always_inline)) void bnbcy_opt8_2state_block_avx512(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t b, int64_t start, const int ademamix) {
    float n1[BNBCY_OPT_BLOCK] __attribute__((aligned(64))), n2[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
    float n3[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
    const int dt = a->dtype;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    const int64_t nblocks = (t->n + BNBCY_OPT_BLOCK - 1) / BNBCY_OPT_BLOCK;
    const char *gp = (const char *)t->g + start * isz;
    char *pp = (char *)t->p + start * isz;
    uint8_t *q1 = (uint8_t *)t->s1 + start, *q2 = (uint8_t *)t->s2 + start;
    uint8_t *q3 = ademamix ? (uint8_t *)t->s1 + t->n + start : NULL;
    const float am1 = bnbcy_ftz(t->absmax1[b]), am2 = bnbcy_ftz(t->absmax2[b]);
    const float am3 = ademamix ? bnbcy_ftz(t->absmax1[nblocks + b]) : 0.0f;
    const __m512 a1 = _mm512_set1_ps(am1), a2 = _mm512_set1_ps(am2), a3 = _mm512_set1_ps(am3);
    const __m512 b1 = _mm512_set1_ps(a->b1), b2 = _mm512_set1_ps(a->b2), b3 = _mm512_set1_ps(a->b3),
                 omb1 = _mm512_set1_ps(1.0f - a->b1), omb2 = _mm512_set1_ps(1.0f - a->b2),
                 omb3 = _mm512_set1_ps(1.0f - a->b3), gns = _mm512_set1_ps(a->gnorm_scale),
                 ssus = _mm512_set1_ps(t->ss * t->us), c2eps = _mm512_set1_ps(t->c2eps),
                 c1 = _mm512_set1_ps(t->c1), c2 = _mm512_set1_ps(t->c2), alpha = _mm512_set1_ps(a->alpha),
                 eps = _mm512_set1_ps(a->eps), lr = _mm512_set1_ps(a->lr),
                 decay = _mm512_set1_ps(1.0f - a->lr * a->wd);
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    const int has_wd = a->wd > 0.0f;
    __m512 M1 = _mm512_set1_ps(-FLT_MAX), M2 = M1, M3 = M1;
    if (start + (BNBCY_OPT_PREFETCH + 1) * BNBCY_OPT_BLOCK <= t->n) {
        const int64_t ahead = BNBCY_OPT_PREFETCH * BNBCY_OPT_BLOCK;
        for (size_t k = 0; k < BNBCY_OPT_BLOCK * isz; k += 64) {
            _mm_prefetch(gp + ahead * isz + k, _MM_HINT_T0);
            _mm_prefetch(pp + ahead * isz + k, _MM_HINT_T0);
        }
        for (int k = 0; k < BNBCY_OPT_BLOCK; k += 64) {
            _mm_prefetch((const char *)q1 + ahead + k, _MM_HINT_T0);
            _mm_prefetch((const char *)q2 + ahead + k, _MM_HINT_T0);
            if (ademamix) _mm_prefetch((const char *)q3 + ahead + k, _MM_HINT_T0);
        }
    }
    const int ftz1 = bnbcy_opt_may_flush(am1, a->qmin1, a->b1), ftz2 = bnbcy_opt_may_flush(am2, a->qmin2, a->b2);
    const int ftz3 = ademamix && bnbcy_opt_may_flush(am3, a->qmin1, a->b3);
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 16) {
        const __m512 g = bnbcy_load16(gp + i * isz, dt, 0xFFFF);
        __m512 p = bnbcy_load16(pp + i * isz, dt, 0xFFFF);
        const __m512 d1 = bnbcy_opt_dequant16(q1 + i, a->qmap1, a1), d2 = bnbcy_opt_dequant16(q2 + i, a->qmap2, a2);
        const __m512 d3 = ademamix ? bnbcy_opt_dequant16(q3 + i, a->qmap1, a3) : d1;
        const __m512 d1b = bnbcy_opt_decay16(d1, b1, ftz1), d2b = bnbcy_opt_decay16(d2, b2, ftz2);
        const __m512 gv = _mm512_mul_ps(g, gns);
        __m512 s2 = _mm512_fmadd_ps(gv, _mm512_mul_ps(omb2, gv), d2b);
        __m512 s1 = _mm512_fmadd_ps(omb1, gv, d1b), s3 = s1;
        /* Flushes and the non-finite-gradient reset only when a lane needs one: a NaN/inf g makes
         * s2 NaN/inf, and ftz leaves every other value alone. */
        __mmask16 odd = _mm512_fpclass_ps_mask(s2, 0xB9) | _mm512_fpclass_ps_mask(s1, 0x20);
        if (ademamix) {
            s3 = _mm512_fmadd_ps(omb3, gv, bnbcy_opt_decay16(d3, b3, ftz3));
            odd |= _mm512_fpclass_ps_mask(s3, 0x20);
        }
        __mmask16 fin = 0xFFFF;
        if (__builtin_expect(odd != 0, 0)) {
            fin = ~_mm512_fpclass_ps_mask(g, 0x99); /* not NaN / inf */
            s2 = _mm512_maskz_mov_ps(fin, bnbcy_ftz16(s2));
            s1 = _mm512_maskz_mov_ps(fin, bnbcy_ftz16(s1));
            s3 = _mm512_maskz_mov_ps(fin, bnbcy_ftz16(s3));
        }
        if (!ademamix) {
            p = bnbcy_opt_round16(
                _mm512_fmadd_ps(ssus, _mm512_div_ps(s1, _mm512_add_ps(_mm512_sqrt_ps(s2), c2eps)), p), dt);
        } else {
            const __m512 num = _mm512_fmadd_ps(s3, alpha, _mm512_div_ps(s1, c1));
            const __m512 den = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(s2), c2), eps);
            p = bnbcy_opt_round16(_mm512_sub_ps(p, _mm512_mul_ps(_mm512_div_ps(num, den), lr)), dt);
        }
        if (has_wd) p = bnbcy_opt_round16(_mm512_mul_ps(p, decay), dt);
        bnbcy_store16(pp + i * isz, dt, fin, p);
        _mm512_store_ps(n1 + i, s1);
        _mm512_store_ps(n2 + i, s2);
        M1 = _mm512_max_ps(_mm512_and_ps(s1, absmask), M1); /* NaN never enters */
        M2 = _mm512_max_ps(_mm512_and_ps(s2, absmask), M2);
        if (ademamix) {
            _mm512_store_ps(n3 + i, s3);
            M3 = _mm512_max_ps(_mm512_and_ps(s3, absmask), M3);
        }
    }
    const float m1 = _mm512_reduce_max_ps(M1), m2 = _mm512_reduce_max_ps(M2);
    t->absmax1[b] = m1;
    t->absmax2[b] = m2;
    bnbcy_opt_requant_block_avx512(n1, m1, a->qmap1, a->t1, a->rq1, 1, a->neg_below1, q1);
    bnbcy_opt_requant_block_avx512(n2, m2, a->qmap2, a->t2, a->rq2, 0, -1, q2);
    if (ademamix) {
        const float m3 = _mm512_reduce_max_ps(M3);
        t->absmax1[nblocks + b] = m3;
        bnbcy_opt_requant_block_avx512(n3, m3, a->qmap1, a->t1, a->rq1, 1, a->neg_below1, q3);
    }
}

BNBCY_AVX512 static void bnbcy_opt8_adam_block_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                      int64_t b, int64_t start) {
    bnbcy_opt8_2state_block_avx512(a, t, b, start, 0);
}

BNBCY_AVX512 static void bnbcy_opt8_ademamix_block_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                          int64_t b, int64_t start) {
    bnbcy_opt8_2state_block_avx512(a, t, b, start, 1);
}

/* A full 256-block of an 8-bit 1-state update (momentum/lars, rmsprop, adagrad, lion):
 * bnbcy_opt8_block + bnbcy_opt8_elem1, 16 lanes at a time, the same operations in the same
 * order (each fmaf one _mm512_fmadd_ps). */
BNBCY_AVX512 static void bnbcy_opt8_1state_block_avx512(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t,
                                                        int64_t b, int64_t start) {
    float n1[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
    const int dt = a->dtype, opt = a->opt, skip = a->skip_zeros, has_wd = a->wd > 0.0f, first = t->step == 1;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    const char *gp = (const char *)t->g + start * isz;
    char *pp = (char *)t->p + start * isz;
    uint8_t *q1 = (uint8_t *)t->s1 + start;
    const float am = bnbcy_ftz(t->absmax1[b]);
    const __m512 a1 = _mm512_set1_ps(am), b1 = _mm512_set1_ps(a->b1), b2 = _mm512_set1_ps(a->b2),
                 omb1 = _mm512_set1_ps(1.0f - a->b1), omb2 = _mm512_set1_ps(1.0f - a->b2),
                 gns = _mm512_set1_ps(a->gnorm_scale), lr = _mm512_set1_ps(a->lr), eps = _mm512_set1_ps(a->eps),
                 wd = _mm512_set1_ps(a->wd), us = _mm512_set1_ps(t->us),
                 decay = _mm512_set1_ps(1.0f - a->lr * a->wd), zero = _mm512_setzero_ps();
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
    __m512 M1 = _mm512_set1_ps(-FLT_MAX);
    /* As in the adam block: the flushes of d1 and of d1 * beta (beta1; lion also beta2) can only act
     * when the smallest nonzero product is subnormal; skip them when it provably is not. */
    int ftz1 = bnbcy_opt_may_flush(am, a->qmin1, a->b1);
    if (opt == BNBCY_OPT_LION) ftz1 |= bnbcy_opt_may_flush(am, a->qmin1, a->b2);
    for (int i = 0; i < BNBCY_OPT_BLOCK; i += 16) {
        const __m512 gr = bnbcy_load16(gp + i * isz, dt, 0xFFFF);
        const __m512 p = bnbcy_load16(pp + i * isz, dt, 0xFFFF);
        __m512 d1 = bnbcy_opt_dequant16(q1 + i, a->qmap1, a1);
        if (ftz1) d1 = bnbcy_ftz16(d1);
        __m512 gv = _mm512_mul_ps(gr, gns), np = p, s;
        if (has_wd) {
            if (opt == BNBCY_OPT_LION) np = bnbcy_opt_round16(_mm512_mul_ps(p, decay), dt);
            else gv = _mm512_fmadd_ps(p, wd, gv);
        }
        if (opt == BNBCY_OPT_MOMENTUM) {
            s = bnbcy_ftz16(first ? gv : _mm512_fmadd_ps(d1, b1, gv));
            np = bnbcy_opt_round16(_mm512_sub_ps(np, _mm512_mul_ps(us, _mm512_mul_ps(s, lr))), dt);
        } else if (opt == BNBCY_OPT_RMSPROP) {
            __m512 d1b = _mm512_mul_ps(d1, b1);
            if (ftz1) d1b = bnbcy_ftz16(d1b);
            s = bnbcy_ftz16(_mm512_fmadd_ps(omb1, _mm512_mul_ps(gv, gv), d1b));
            const __m512 q = _mm512_div_ps(gr, _mm512_add_ps(_mm512_sqrt_ps(s), eps));
            np = bnbcy_opt_round16(_mm512_sub_ps(np, _mm512_mul_ps(us, _mm512_mul_ps(q, lr))), dt);
        } else if (opt == BNBCY_OPT_ADAGRAD) {
            s = bnbcy_ftz16(_mm512_fmadd_ps(gv, gv, d1));
            const __m512 q = _mm512_div_ps(gr, _mm512_add_ps(_mm512_sqrt_ps(s), eps));
            np = bnbcy_opt_round16(_mm512_sub_ps(np, _mm512_mul_ps(q, lr)), dt);
        } else { /* lion */
            __m512 d1b1 = _mm512_mul_ps(d1, b1), d1b2 = _mm512_mul_ps(d1, b2);
            if (ftz1) { d1b1 = bnbcy_ftz16(d1b1); d1b2 = bnbcy_ftz16(d1b2); }
            const __m512 gs = bnbcy_opt_round16(
                _mm512_mul_ps(bnbcy_opt_sgn16(_mm512_fmadd_ps(omb1, gv, d1b1)), lr), dt);
            s = bnbcy_ftz16(_mm512_fmadd_ps(omb2, gv, d1b2));
            const __m512 upd = bnbcy_opt_round16(_mm512_sub_ps(np, gs), dt);
            np = skip ? _mm512_mask_mov_ps(upd, _mm512_cmp_ps_mask(gs, zero, _CMP_EQ_OQ), np) : upd;
        }
        if (skip) { /* gr == 0: the old (dequantized) state and the old p */
            const __mmask16 z = _mm512_cmp_ps_mask(gr, zero, _CMP_EQ_OQ);
            s = _mm512_mask_mov_ps(s, z, d1);
            np = _mm512_mask_mov_ps(np, z, p);
        }
        bnbcy_store16(pp + i * isz, dt, 0xFFFF, np);
        _mm512_store_ps(n1 + i, s);
        M1 = _mm512_max_ps(_mm512_and_ps(s, absmask), M1); /* NaN never enters */
    }
    const float m1 = _mm512_reduce_max_ps(M1);
    t->absmax1[b] = m1;
    bnbcy_opt_requant_block_avx512(n1, m1, a->qmap1, a->t1, a->rq1, 1, a->neg_below1, q1);
}
#endif

static void bnbcy_opt8_chunk(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                             int64_t len) {
#if BNBCY_HAVE_AVX512_PATH
    const int isa512 = bnbcy_cpu_isa() == BNBCY_ISA_AVX512;
    const int simd = isa512 && a->opt == BNBCY_OPT_ADAM && a->t1 && a->t2;
    const int simd3 = isa512 && a->opt == BNBCY_OPT_ADEMAMIX && a->t1 && a->t2;
    const int simd1 = isa512 && a->t1 &&
                      (a->opt == BNBCY_OPT_MOMENTUM || a->opt == BNBCY_OPT_RMSPROP ||
                       a->opt == BNBCY_OPT_ADAGRAD || a->opt == BNBCY_OPT_LION);
#else
    const int simd = 0, simd1 = 0, simd3 = 0;
#endif
    for (int64_t s = start; s < start + len; s += BNBCY_OPT_BLOCK) {
        const int64_t l = start + len - s < BNBCY_OPT_BLOCK ? start + len - s : BNBCY_OPT_BLOCK;
#if BNBCY_HAVE_AVX512_PATH
        if (simd && l == BNBCY_OPT_BLOCK) { bnbcy_opt8_adam_block_avx512(a, t, s / BNBCY_OPT_BLOCK, s); continue; }
        if (simd1 && l == BNBCY_OPT_BLOCK) { bnbcy_opt8_1state_block_avx512(a, t, s / BNBCY_OPT_BLOCK, s); continue; }
        if (simd3 && l == BNBCY_OPT_BLOCK) { bnbcy_opt8_ademamix_block_avx512(a, t, s / BNBCY_OPT_BLOCK, s); continue; }
#endif
        (void)simd; (void)simd1; (void)simd3;
        bnbcy_opt8_block(a, t, s / BNBCY_OPT_BLOCK, s, l);
    }
}

/* ---------------------------------------------------------------- driver --- */

/* Fills the per-tensor scalars of §6.3 (IEEE pow/sqrt/div in place of the approximations). */
static void bnbcy_opt_scalars(const bnbcy_opt_args *a, bnbcy_opt_tensor *t) {
    const float step = (float)t->step;
    const float pb1 = powf(a->b1, step), pb2 = powf(a->b2, step);
    t->c1 = 1.0f - pb1;
    t->c2 = sqrtf(1.0f - pb2);
    t->ss = -(t->c2 * a->lr) / t->c1;
    t->c2eps = t->c2 * a->eps;
    t->r1 = 1.0f / (1.0f - pb1);
    t->r2 = 1.0f / (1.0f - pb2);
    t->us = 1.0f;
    t->unorm = 0.0;
}

/* Runs one update of every tensor. bits8: 8-bit blockwise states. Returns 0, or -1 when
 * memory for the chunk list cannot be had. */
static int bnbcy_opt_update(const bnbcy_opt_args *args, bnbcy_opt_tensor *ts, int ntensors, int bits8,
                            int nthreads) {
    bnbcy_opt_args local = *args;
    local.neg_below1 = -1;
    if (bits8 && local.qmap1) {
        int k = 0;
        while (k < 256 && signbit(local.qmap1[k])) k++;
        int ok = 1;
        for (int c = k; c < 256; c++) ok &= !signbit(local.qmap1[c]);
        if (ok) local.neg_below1 = k;
    }
    local.qmin1 = local.qmin2 = 0.0f;
    for (int c = 0; bits8 && c < 256; c++) {
        const float v1 = local.qmap1 ? fabsf(local.qmap1[c]) : 0.0f, v2 = local.qmap2 ? fabsf(local.qmap2[c]) : 0.0f;
        if (v1 > 0.0f && (local.qmin1 == 0.0f || v1 < local.qmin1)) local.qmin1 = v1;
        if (v2 > 0.0f && (local.qmin2 == 0.0f || v2 < local.qmin2)) local.qmin2 = v2;
    }
    const bnbcy_opt_args *a = &local;
    int64_t nchunks = 0, total = 0;
    for (int k = 0; k < ntensors; k++) {
        bnbcy_opt_scalars(a, &ts[k]);
        nchunks += (ts[k].n + BNBCY_OPT_CHUNK - 1) / BNBCY_OPT_CHUNK;
        total += ts[k].n;
    }
    if (nchunks == 0) return 0;
    int32_t *ct = (int32_t *)malloc((size_t)nchunks * sizeof(int32_t));
    int64_t *cs = (int64_t *)malloc((size_t)nchunks * sizeof(int64_t));
    double *part = NULL;
    const int unorm = a->max_unorm > 0.0f && bnbcy_opt_uses_unorm(a->opt);
    if (unorm) part = (double *)malloc((size_t)nchunks * sizeof(double));
    if (!ct || !cs || (unorm && !part)) {
        free(ct); free(cs); free(part);
        return -1;
    }
    int64_t c = 0;
    for (int k = 0; k < ntensors; k++)
        for (int64_t s = 0; s < ts[k].n; s += BNBCY_OPT_CHUNK) { ct[c] = k; cs[c] = s; c++; }
    const int isa = bnbcy_cpu_isa();
    const int par = total >= BNBCY_OMP_MIN_WORK && nchunks > 1;
    #pragma omp parallel num_threads(nthreads) if (par)
    {
        if (unorm) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < nchunks; i++) {
                const bnbcy_opt_tensor *t = &ts[ct[i]];
                const int64_t len = t->n - cs[i] < BNBCY_OPT_CHUNK ? t->n - cs[i] : BNBCY_OPT_CHUNK;
#if BNBCY_HAVE_AVX512_PATH
                if (isa == BNBCY_ISA_AVX512) {
                    part[i] = bits8 ? bnbcy_opt8_unorm_chunk_avx512(a, t, cs[i], len)
                                    : bnbcy_opt32_unorm_chunk_avx512(a, t, cs[i], len);
                    continue;
                }
#endif
                part[i] = bits8 ? bnbcy_opt8_unorm_chunk(a, t, cs[i], len)
                                : bnbcy_opt32_unorm_chunk(a, t, cs[i], len);
            }
            /* implicit barrier */
            #pragma omp single
            {
                for (int64_t i = 0; i < nchunks; i++) ts[ct[i]].unorm += part[i];
                for (int k = 0; k < ntensors; k++) {
                    bnbcy_opt_tensor *t = &ts[k];
                    const float u = sqrtf((float)t->unorm);
                    const float L = a->opt == BNBCY_OPT_ADAM ? a->max_unorm * t->param_norm
                                                             : fmaf(a->max_unorm, t->param_norm, a->eps);
                    if (u > L) t->us = L / u;
                }
            } /* implicit barrier */
        }
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < nchunks; i++) {
            const bnbcy_opt_tensor *t = &ts[ct[i]];
            const int64_t len = t->n - cs[i] < BNBCY_OPT_CHUNK ? t->n - cs[i] : BNBCY_OPT_CHUNK;
            if (bits8) {
                bnbcy_opt8_chunk(a, t, cs[i], len);
            } else {
#if BNBCY_HAVE_AVX512_PATH
                if (isa == BNBCY_ISA_AVX512) { bnbcy_opt32_chunk_avx512(a, t, cs[i], len); continue; }
#endif
                (void)isa;
                bnbcy_opt32_chunk_scalar(a, t, cs[i], len);
            }
        }
    }
    free(ct); free(cs); free(part);
    return 0;
}

#endif
