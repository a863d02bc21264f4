/* Cycles per element of the CPU optimizer kernels, without Python: one thread calls
 * bnbcy_opt_update (pyx/include/bnbcy_cpu_optim.h, the code the extension runs) on a tensor small
 * enough for the cache level asked for, many times, and reports the fastest and the median pass in
 * TSC ticks and ns per element. Built and driven by bench/bench_optim_cycles.py, which passes the
 * two dynamic maps (signed, unsigned) in a file: argv = maps_file n reps opt bits8 [max_unorm]
 * (max_unorm > 0: the trust-ratio pass of LAMB/LARS runs first).
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
        fprintf(stderr, "usage: %s maps_file n reps opt bits8\n", argv[0]);
        return 2;
    }
    float maps[512];
    FILE *f = fopen(argv[1], "rb");
    if (!f || fread(maps, sizeof(float), 512, f) != 512) { fprintf(stderr, "bad maps file\n"); return 2; }
    fclose(f);
    const int64_t n = atoll(argv[2]);
    const int reps = atoi(argv[3]), opt = atoi(argv[4]), bits8 = atoi(argv[5]);
    const float max_unorm = argc > 6 ? (float)atof(argv[6]) : 0.0f;
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
    for (int r = -5; r < reps; r++) { /* 5 warm-up steps fill the states */
        t.step = r + 10;
        const double t0 = now_ns();
        const uint64_t c0 = __rdtsc();
        bnbcy_opt_update(&a, &t, 1, bits8, 1);
        const uint64_t c1 = __rdtsc();
        const double t1n = now_ns();
        if (r >= 0) { ns[r] = (t1n - t0) / n; tk[r] = (double)(c1 - c0) / n; }
    }
    qsort(ns, reps, sizeof(double), cmp_d);
    qsort(tk, reps, sizeof(double), cmp_d);
    printf("{\"n\": %lld, \"opt\": %d, \"bits8\": %d, \"ns_min\": %.4f, \"ns_median\": %.4f, \"tsc_min\": %.4f, "
           "\"tsc_median\": %.4f, \"rq\": %d, \"max_unorm\": %g}\n",
           (long long)n, opt, bits8, ns[0], ns[reps / 2], tk[0], tk[reps / 2], a.rq1 != NULL, max_unorm);
    return 0;
}
