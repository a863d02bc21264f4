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

/* The rule ids of bnbcy/optim/_table.py RULE_IDS (and of cuda_src/optim.cu; tests/test_optim_table.py). */
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
    /* set by bnbcy_opt_update: smallest nonzero |qmap1|, |qmap2| (proves products normal),
     * whether every entry of qmap2 is >= 0 or -0, and whether every entry of both is finite */
    float qmin1, qmin2;
    int q2nn, qfin;
    /* requantization tables of qmap1 (sign fix included) and qmap2 for the SIMD widths
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


/* ----------------------------------------------------------------- 8-bit --- */

static inline uint8_t bnbcy_opt_code(float xn, const float *code, const bnbcy_q8_table *t) {
    if (t == NULL) return bnbcy_q8_code_search(xn, code);
    if (t->one_per_bucket) return bnbcy_q8_code_packed(xn, t->packed);
    return bnbcy_q8_code_table(xn, t, t->steps);
}

/* 1/M for the requantization, flushed: xn = ftz(s * ftz(1/M)) has the shape of CUDA's
 * div.approx.ftz (a multiplication by an approximate reciprocal, 0 for |M| > 2^126) and costs a
 * multiplication per element instead of a division. */
static inline __attribute__((always_inline)) float bnbcy_opt_recip(float M) { return bnbcy_ftz(1.0f / M); }

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

/* The SIMD requantization (AVX2, AVX-512) reads one table entry per element, indexed by the top
 * 16 bits u >> 16 of the normalized state x (sign, exponent, 7 mantissa bits):
 * rq[u >> 16] = T << 16 | A << 8 | B
 * and the code is (u & 0xFFFF) <= T ? A : B. A bucket holds values of one sign and at most one
 * midpoint (the map's `packed` table), so the code steps at most once along the low bits in
 * either direction, and the exact-tie rule and the sign fix of §6.5 fold into A, B and T.
 * Per 16 elements this drops the order key, the flush of x, the -0 fold, the NaN test and
 * the sign fix of bnbcy_opt_requant: the builder proves that the flush and the fold cannot
 * change a code, and the caller uses the table only for blocks with 0 < M <= FLT_MAX whose
 * states are all finite (a NaN state never enters M, so M alone does not prove it). */
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

/* Whether the flushes of a dequantized state (absmax am) and of its product with beta can act:
 * only when the smallest nonzero product is subnormal, which it almost never is. */
static inline __attribute__((always_inline)) int bnbcy_opt_may_flush(float am, float qmin, float beta) {
    return !(am == 0.0f || (am * qmin >= FLT_MIN && (beta == 0.0f || am * qmin * beta >= FLT_MIN)));
}

static inline float bnbcy_opt_absmax_acc(float m, float s) {
    const float a = fabsf(s);
    return a > m ? a : m; /* NaN never enters (as fmaxf from -FLT_MAX) */
}

/* The running max of the bits of |s| (L_MAXABSU): unsigned order is the order of |s|, NaN last. */
static inline __attribute__((always_inline)) uint32_t bnbcy_opt_maxabsu(uint32_t m, float s) {
    const uint32_t u = bnbcy_f2u(s) & 0x7FFFFFFFu;
    return u > m ? u : m;
}

/* A block's absmax from mu, the max of the bits of |state| over its lanes: the float of mu
 * while no state is NaN, else the max that skips NaN (bnbcy_opt_absmax_acc) of the states
 * n[0..len) and of pad (the padding lanes' absmax, -FLT_MAX if none). */
static inline __attribute__((always_inline)) float bnbcy_opt_block_absmax(uint32_t mu, const float *n, int64_t len, float pad) {
    if (mu <= 0x7F800000u) return bnbcy_u2f(mu);
    for (int64_t i = 0; i < len; i++) pad = bnbcy_opt_absmax_acc(pad, n[i]);
    return pad;
}


/* ------------------------------------------- rules and loops, per lane width --- */

static void bnbcy_opt32_chunk_scalar(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                                     int64_t len);
static void bnbcy_opt8_chunk_scalar(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                                    int64_t len);

#define BNBCY_OPT_LANES_ISA 0
#include "bnbcy_cpu_optim_lanes.h"
#include "bnbcy_cpu_optim_rules.h"
#include "bnbcy_cpu_optim_loops.h"
#if BNBCY_HAVE_AVX512_PATH
#undef BNBCY_OPT_LANES_ISA
#define BNBCY_OPT_LANES_ISA 1
#include "bnbcy_cpu_optim_lanes.h"
#include "bnbcy_cpu_optim_rules.h"
#include "bnbcy_cpu_optim_loops.h"
#undef BNBCY_OPT_LANES_ISA
#define BNBCY_OPT_LANES_ISA 2
#include "bnbcy_cpu_optim_lanes.h"
#include "bnbcy_cpu_optim_rules.h"
#include "bnbcy_cpu_optim_loops.h"
#endif


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

/* The chunk functions of one lane width. */
typedef struct {
    void (*chunk32)(const bnbcy_opt_args *, const bnbcy_opt_tensor *, int64_t, int64_t);
    void (*chunk8)(const bnbcy_opt_args *, const bnbcy_opt_tensor *, int64_t, int64_t);
    double (*unorm)(const bnbcy_opt_args *, const bnbcy_opt_tensor *, int64_t, int64_t, int);
} bnbcy_opt_width;

/* The widest lane width this CPU (or BNBCY_CPU_ISA) allows. */
static bnbcy_opt_width bnbcy_opt_pick_width(void) {
    bnbcy_opt_width w = {bnbcy_opt32_chunk_scalar, bnbcy_opt8_chunk_scalar, bnbcy_opt_unorm_chunk_scalar};
#if BNBCY_HAVE_AVX512_PATH
    const int isa = bnbcy_cpu_isa();
    if (isa == BNBCY_ISA_AVX512) {
        w.chunk32 = bnbcy_opt32_chunk_avx512; w.chunk8 = bnbcy_opt8_chunk_avx512; w.unorm = bnbcy_opt_unorm_chunk_avx512;
    } else if (isa == BNBCY_ISA_AVX2 && __builtin_cpu_supports("fma")) {
        w.chunk32 = bnbcy_opt32_chunk_avx2; w.chunk8 = bnbcy_opt8_chunk_avx2; w.unorm = bnbcy_opt_unorm_chunk_avx2;
    }
#endif
    return w;
}

/* Runs one update of every tensor. bits8: 8-bit blockwise states. Returns 0, or -1 when
 * memory for the chunk list cannot be had. */
static int bnbcy_opt_update(const bnbcy_opt_args *args, bnbcy_opt_tensor *ts, int ntensors, int bits8,
                            int nthreads) {
    bnbcy_opt_args local = *args;
    local.qmin1 = local.qmin2 = 0.0f;
    local.q2nn = local.qmap2 != NULL;
    local.qfin = 1;
    for (int c = 0; bits8 && c < 256; c++) {
        if (local.qmap2 && !(local.qmap2[c] >= 0.0f)) local.q2nn = 0; /* -0 >= 0; NaN is not */
        if ((local.qmap1 && !isfinite(local.qmap1[c])) || (local.qmap2 && !isfinite(local.qmap2[c]))) local.qfin = 0;
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
    const bnbcy_opt_width w = bnbcy_opt_pick_width();
    const int par = total >= BNBCY_OMP_MIN_WORK && nchunks > 1;
    #pragma omp parallel num_threads(nthreads) if (par)
    {
        if (unorm) {
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < nchunks; i++) {
                const bnbcy_opt_tensor *t = &ts[ct[i]];
                const int64_t len = t->n - cs[i] < BNBCY_OPT_CHUNK ? t->n - cs[i] : BNBCY_OPT_CHUNK;
                part[i] = w.unorm(a, t, cs[i], len, bits8);
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
            (bits8 ? w.chunk8 : w.chunk32)(a, t, cs[i], len);
        }
    }
    free(ct); free(cs); free(part);
    return 0;
}

#endif
