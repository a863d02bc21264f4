/* Cycles per element of the CPU optimizer kernels, without Python: one thread calls
 * bnbcy_opt_update (pyx/include/bnbcy_cpu_optim.h, the code the extension runs) on a tensor small
 * enough for the cache level asked for, many times, and reports the fastest and the median pass in
 * TSC ticks and ns per element. Built and driven by bench/bench_optim_cycles.py, which passes the
 * two dynamic maps (signed, unsigned) in a file: argv = maps_file n reps opt bits8 [max_unorm
 * [threads [part]]] (max_unorm > 0: the trust-ratio pass of LAMB/LARS runs first; threads: the
 * OpenMP threads of the step, 1 by default).
 *
 * part (8-bit only): "step" (default) times whole updates; "deq" and "rq" time one piece of the
 * 8-bit step alone, through the kernel's own functions at the lane width the step runs (AVX2 or
 * AVX-512), on the first state after the warm-up steps: "deq" dequantizes every block
 * (bnbcy_opt8_deq: the codes looked up in the map, times the absmax), "rq" requantizes every
 * block through the requantization table (bnbcy_opt_requant: the product with 1/absmax, the
 * table lookup, the codes stored). Per element, the step costs about two of each (Adam: two
 * states) plus the rule; the per-element figures of the pieces say what limits the step.
 * Cycles are TSC ticks (constant rate), not core clocks. */
#define _GNU_SOURCE
#include "bnbcy_cpu_optim.h"
#include <stdio.h>
#include <time.h>

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}

/* One piece of the 8-bit step over every 256-block of codes q (n elements; absmaxes am, map
 * qmap), with the block's floats in L1 as in the step (its n1/n2 buffers): part 1 dequantizes
 * each block into one 256-float buffer; part 2 requantizes normalized states (|d| <= 1, the
 * block absmax taken as 1, so that the table path leaves them as they are) from a 16-block ring d
 * into q. One function per width: the kernel's functions inline only into code of their target. */
#ifdef BNBCY_OPT_GROUP /* the headers' bnbcy_opt8_deq takes a length (older trees, for --base: a whole block) */
#define BNBCY_BENCH_DEQ(W, q, map, am, d) bnbcy_opt8_deq_##W(q, map, am, 0, d, BNBCY_OPT_BLOCK)
#else
#define BNBCY_BENCH_DEQ(W, q, map, am, d) bnbcy_opt8_deq_##W(q, map, am, 0, d)
#endif
#define BNBCY_BENCH_PART(W, ATTR, SET1)                                                                   \
    ATTR static void bench_part_##W(int part, const bnbcy_opt_args *a, uint8_t *q, const float *am,      \
                                    float *d, int64_t n) {                                              \
        float buf[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));                                        \
        for (int64_t b = 0; b < n / BNBCY_OPT_BLOCK; b++) {                                             \
            const int64_t o = b * BNBCY_OPT_BLOCK;                                                      \
            if (part == 1) {                                                                            \
                BNBCY_BENCH_DEQ(W, q + o, a->qmap1, SET1(am[b]), buf);                               \
                __asm__ volatile("" : : "r"(buf) : "memory"); /* the stores are kept */                \
            } else {                                                                                    \
                bnbcy_opt_requant_##W(d + (b % 16) * BNBCY_OPT_BLOCK, BNBCY_OPT_BLOCK, 1.0f, a->qmap1,  \
                                      a->t1, a->rq1, 1, q + o);                                         \
            }                                                                                           \
        }                                                                                               \
    }
BNBCY_BENCH_PART(avx2, __attribute__((target("avx2,fma,f16c"))), _mm256_set1_ps)
#if BNBCY_HAVE_AVX512_PATH
BNBCY_BENCH_PART(avx512, BNBCY_AVX512, _mm512_set1_ps)
#endif

static int cmp_d(const void *x, const void *y) {
    const double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

/* The core clock in GHz: a chain of dependent 1-cycle adds, timed by the monotonic clock. */
static double core_ghz(void) {
    unsigned long x = 1;
    const long iters = 100000000;
    const double t0 = now_ns();
    for (long i = 0; i < iters; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    return 4.0 * iters / (now_ns() - t0);
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "clock") == 0) {
        const uint64_t c0 = __rdtsc();
        const double t0 = now_ns();
        const double ghz = core_ghz();
        printf("{\"core_ghz\": %.3f, \"tsc_ghz\": %.3f}\n", ghz, (double)(__rdtsc() - c0) / (now_ns() - t0));
        return 0;
    }
    if (argc < 6) {
        fprintf(stderr, "usage: %s maps_file n reps opt bits8 [max_unorm [threads [step|deq|rq]]]\n", argv[0]);
        return 2;
    }
    float maps[512];
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(maps, sizeof(float), 512, f) != 512) { fprintf(stderr, "bad maps file\n"); return 2; }
    fclose(f);
    const int64_t n = atoll(argv[2]);
    const int reps = atoi(argv[3]), opt = atoi(argv[4]), bits8 = atoi(argv[5]);
    const float max_unorm = argc > 6 ? (float)atof(argv[6]) : 0.0f;
    const int nthreads = argc > 7 ? atoi(argv[7]) : 1;
    const char *part_name = argc > 8 ? argv[8] : "step";
    const int part = strcmp(part_name, "deq") == 0 ? 1 : strcmp(part_name, "rq") == 0 ? 2 : 0;
    if (part == 0 && strcmp(part_name, "step") != 0) {
        fprintf(stderr, "part %s: expected step, deq or rq\n", part_name);
        return 2;
    }
    /* BNBCY_CPU_ISA lowers the lane width as in the extension (which parses it in bnbcy/_env.py) */
    const char *isa_env = getenv("BNBCY_CPU_ISA");
    if (isa_env && *isa_env) {
        if (strcmp(isa_env, "scalar") == 0) bnbcy_isa_request = BNBCY_ISA_SCALAR;
        else if (strcmp(isa_env, "avx2") == 0) bnbcy_isa_request = BNBCY_ISA_AVX2;
        else if (strcmp(isa_env, "avx512") == 0) bnbcy_isa_request = BNBCY_ISA_AVX512;
        else { fprintf(stderr, "BNBCY_CPU_ISA=%s: expected scalar, avx2 or avx512\n", isa_env); return 2; }
    }
    const int isa = bnbcy_cpu_isa();
    if (part != 0 && (!bits8 || n % 256 != 0 || n < 16 * 256 || isa == BNBCY_ISA_SCALAR)) {
        fprintf(stderr, "part %s: needs bits8, n a multiple of 256 (>= 4096) and a SIMD lane width\n", part_name);
        return 2;
    }
    const int ademamix = opt == BNBCY_OPT_ADEMAMIX, two = opt == BNBCY_OPT_ADAM || ademamix;
    const int64_t nb = (n + 255) / 256;
    float *p = aligned_alloc(64, n * 4), *g = aligned_alloc(64, n * 4);
    void *s1 = aligned_alloc(64, (ademamix ? 2 : 1) * n * 4), *s2 = aligned_alloc(64, n * 4);
    float *am1 = aligned_alloc(64, 2 * nb * 4 + 64), *am2 = aligned_alloc(64, nb * 4 + 64);
    uint64_t x = 88172645463325252ull; /* xorshift: normal-ish values without libm randomness */
    for (int64_t i = 0; i < n; i++) {
        double u = 0;
        for (int k = 0; k < 4; k++) { x ^= x << 13; x ^= x >> 7; x ^= x << 17; u += (double)(x >> 11) / 9007199254740992.0; }
        p[i] = (float)((u - 2.0) * 0.1);
        g[i] = (float)((u - 2.0) * 0.01 * ((i % 7) + 1));
    }
    memset(s1, 0, (ademamix ? 2 : 1) * n * 4);
    memset(s2, 0, n * 4);
    for (int64_t i = 0; bits8 && i < (ademamix ? 2 : 1) * n; i++) ((uint8_t *)s1)[i] = 127;
    for (int64_t i = 0; i < 2 * nb; i++) am1[i] = am2[i % nb] = 0.0f;
    bnbcy_q8_table t1, t2;
    static uint32_t rq1[BNBCY_OPT_RQ_SIZE], rq2[BNBCY_OPT_RQ_SIZE];
    bnbcy_opt_args a;
    memset(&a, 0, sizeof a);
    a.opt = opt; a.dtype = BNBCY_F32; a.skip_zeros = 0;
    a.b1 = 0.9f; a.b2 = 0.999f; a.b3 = 0.9999f; a.alpha = 5.0f; a.eps = 1e-8f; a.wd = 0.0f; a.lr = 1e-4f;
    a.gnorm_scale = 1.0f; a.max_unorm = max_unorm;
    if (bits8) {
        if (bnbcy_q8_build_table(maps, &t1) != 0 || bnbcy_q8_build_table(maps + 256, &t2) != 0) return 3;
        a.qmap1 = maps; a.qmap2 = maps + 256; a.t1 = &t1; a.t2 = &t2;
        a.rq1 = bnbcy_opt_build_rq(maps, &t1, 1, rq1) == 0 ? rq1 : NULL;
        a.rq2 = bnbcy_opt_build_rq(maps + 256, &t2, 0, rq2) == 0 ? rq2 : NULL;
    }
    bnbcy_opt_tensor t;
    memset(&t, 0, sizeof t);
    t.p = p; t.g = g; t.s1 = s1; t.s2 = two ? s2 : NULL; t.absmax1 = am1; t.absmax2 = two ? am2 : NULL; t.n = n;
    t.param_norm = 1.0f;
    double *ns = malloc(sizeof(double) * reps), *tk = malloc(sizeof(double) * reps);
    float *dq = part ? aligned_alloc(64, 16 * BNBCY_OPT_BLOCK * 4) : NULL;
    for (int r = -5; r < 0; r++) { /* 5 warm-up steps fill the states */
        t.step = r + 10;
        bnbcy_opt_update(&a, &t, 1, bits8, nthreads);
    }
    if (part == 2) { /* the states, normalized by their block's absmax (the product the step forms) */
        for (int64_t i = 0; i < 16 * BNBCY_OPT_BLOCK; i++) {
            const float v = maps[((uint8_t *)s1)[i]];
            dq[i] = v > 1.0f ? 1.0f : v < -1.0f ? -1.0f : v;
        }
        if (!a.rq1) { fprintf(stderr, "part rq: no requantization table for this map\n"); return 3; }
    }
    for (int r = part ? -2 : 0; r < reps; r++) {
        const double t0 = now_ns();
        const uint64_t c0 = __rdtsc();
        if (part) {
#if BNBCY_HAVE_AVX512_PATH
            if (isa == BNBCY_ISA_AVX512) bench_part_avx512(part, &a, (uint8_t *)s1, am1, dq, n);
            else
#endif
            bench_part_avx2(part, &a, (uint8_t *)s1, am1, dq, n);
        } else {
            t.step = r + 10;
            bnbcy_opt_update(&a, &t, 1, bits8, nthreads);
        }
        const uint64_t c1 = __rdtsc();
        const double t1n = now_ns();
        if (r >= 0) { ns[r] = (t1n - t0) / n; tk[r] = (double)(c1 - c0) / n; }
    }
    qsort(ns, reps, sizeof(double), cmp_d);
    qsort(tk, reps, sizeof(double), cmp_d);
    printf("{\"n\": %lld, \"opt\": %d, \"bits8\": %d, \"ns_min\": %.4f, \"ns_median\": %.4f, \"tsc_min\": %.4f, "
           "\"tsc_median\": %.4f, \"rq\": %d, \"max_unorm\": %g, \"threads\": %d, \"part\": \"%s\", \"isa\": %d}\n",
           (long long)n, opt, bits8, ns[0], ns[reps / 2], tk[0], tk[reps / 2], a.rq1 != NULL, max_unorm, nthreads, part ? part_name : "step", isa);
    return 0;
}
