/* Ways to do the 8-bit optimizer's table lookups on AVX2, timed alone on one thread (the
 * evidence behind the choices in pyx/include/bnbcy_cpu_optim_lanes.h and _loops.h):
 *
 *   inserts    8 scalar loads + vinsertps per 8 lanes: the kernel's bnbcy_opt_lut8 itself
 *   movzx      the same, each code loaded by its own byte load
 *   gpr        table entries paired in 64-bit registers, then vmovq/vpinsrq
 *   gather8    one 8-lane vgatherdps
 *   gather4x2  two 4-lane vgatherdps
 *   deq+rule   a dequantization and Adam's update (vsqrtps + vdivps) per 8 lanes: in two whole
 *              loops, fused per vector, and in turn by groups of 16/32/64 elements
 *
 * Build and run: gcc -O3 -std=c11 bench/optim_lookups.c -o /tmp/optim_lookups -lm && /tmp/optim_lookups
 * Prints the median and minimum over 60 interleaved rounds (each the fastest of 30 passes over 4096
 * elements, in L1/L2) in core cycles per 8 lanes; the core clock is measured by a chain of adds. */
#define _GNU_SOURCE
#include "../pyx/include/bnbcy_cpu_optim.h" /* bnbcy_opt_lut8: the kernel's own lookup */
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <x86intrin.h>

#define N 4096
#define ATTR __attribute__((target("avx2,fma,f16c"), noinline)) /* the kernel's AVX2 target */
static float lut[256] __attribute__((aligned(64)));
static uint8_t q[N] __attribute__((aligned(64)));
static float d[N] __attribute__((aligned(64))), m[N] __attribute__((aligned(64))), v[N] __attribute__((aligned(64)));
static float p[N] __attribute__((aligned(64))), g[N] __attribute__((aligned(64)));

#define CONSTS                                                                                          \
    const __m256 am = _mm256_set1_ps(1.5f), b1 = _mm256_set1_ps(0.9f), c1 = _mm256_set1_ps(0.1f),         \
                 b2 = _mm256_set1_ps(0.999f), c2 = _mm256_set1_ps(0.001f), eps = _mm256_set1_ps(1e-8f),   \
                 nlr = _mm256_set1_ps(-1e-3f)
#define DEQ(i) _mm256_store_ps(d + (i), _mm256_mul_ps(bnbcy_opt_lut8(q + (i), lut), am))
#define RULE(i)                                                                                         \
    do {                                                                                                \
        const __m256 gg = _mm256_load_ps(g + (i));                                                      \
        const __m256 mm = _mm256_fmadd_ps(_mm256_load_ps(m + (i)), b1, _mm256_mul_ps(gg, c1));          \
        const __m256 vv = _mm256_fmadd_ps(_mm256_load_ps(v + (i)), b2, _mm256_mul_ps(_mm256_mul_ps(gg, gg), c2)); \
        _mm256_store_ps(m + (i), mm);                                                                   \
        _mm256_store_ps(v + (i), vv);                                                                   \
        _mm256_store_ps(p + (i), _mm256_fmadd_ps(_mm256_div_ps(mm, _mm256_add_ps(_mm256_sqrt_ps(vv), eps)), nlr, \
                                                 _mm256_load_ps(p + (i))));                             \
    } while (0)

ATTR static void inserts(void) { CONSTS; (void)b1; (void)c1; (void)b2; (void)c2; (void)eps; (void)nlr;
    for (int i = 0; i < N; i += 8) DEQ(i); }
ATTR static void movzx(void) {
    const __m256 am = _mm256_set1_ps(1.5f);
    for (int i = 0; i < N; i += 8) {
        const volatile uint8_t *c = q + i; /* one byte load per code */
        const __m128 lo = _mm_setr_ps(lut[c[0]], lut[c[1]], lut[c[2]], lut[c[3]]);
        const __m128 hi = _mm_setr_ps(lut[c[4]], lut[c[5]], lut[c[6]], lut[c[7]]);
        _mm256_store_ps(d + i, _mm256_mul_ps(_mm256_set_m128(hi, lo), am));
    }
}
ATTR static void gpr(void) {
    const __m256 am = _mm256_set1_ps(1.5f);
    const uint32_t *lu = (const uint32_t *)lut;
    for (int i = 0; i < N; i += 8) {
        const volatile uint8_t *c = q + i;
        const uint64_t a0 = lu[c[0]] | (uint64_t)lu[c[1]] << 32, a1 = lu[c[2]] | (uint64_t)lu[c[3]] << 32;
        const uint64_t a2 = lu[c[4]] | (uint64_t)lu[c[5]] << 32, a3 = lu[c[6]] | (uint64_t)lu[c[7]] << 32;
        _mm256_store_ps(d + i, _mm256_mul_ps(_mm256_castsi256_ps(_mm256_set_epi64x((long long)a3, (long long)a2,
                                                                                   (long long)a1, (long long)a0)), am));
    }
}
ATTR static void gather8(void) {
    const __m256 am = _mm256_set1_ps(1.5f);
    for (int i = 0; i < N; i += 8) {
        const __m256i ix = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        _mm256_store_ps(d + i, _mm256_mul_ps(_mm256_i32gather_ps(lut, ix, 4), am));
    }
}
ATTR static void gather4x2(void) {
    const __m256 am = _mm256_set1_ps(1.5f);
    for (int i = 0; i < N; i += 8) {
        uint32_t w0, w1;
        memcpy(&w0, q + i, 4);
        memcpy(&w1, q + i + 4, 4);
        const __m128 lo = _mm_i32gather_ps(lut, _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)w0)), 4);
        const __m128 hi = _mm_i32gather_ps(lut, _mm_cvtepu8_epi32(_mm_cvtsi32_si128((int)w1)), 4);
        _mm256_store_ps(d + i, _mm256_mul_ps(_mm256_set_m128(hi, lo), am));
    }
}
ATTR static void rule_only(void) { CONSTS; (void)am; for (int i = 0; i < N; i += 8) RULE(i); }
ATTR static void separate(void) { CONSTS; for (int i = 0; i < N; i += 8) DEQ(i); for (int i = 0; i < N; i += 8) RULE(i); }
ATTR static void fused(void) { CONSTS; for (int i = 0; i < N; i += 8) { DEQ(i); RULE(i); } }
#define GROUPED(G)                                                                                      \
    ATTR static void grouped##G(void) {                                                                 \
        CONSTS;                                                                                         \
        for (int i = 0; i < N; i += G) {                                                                \
            for (int j = 0; j < G; j += 8) DEQ(i + j);                                                  \
            for (int j = 0; j < G; j += 8) RULE(i + j);                                                 \
        }                                                                                               \
    }
GROUPED(16)
GROUPED(32)
GROUPED(64)

static double now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e9 + ts.tv_nsec;
}
static int cmp_d(const void *x, const void *y) {
    const double a = *(const double *)x, b = *(const double *)y;
    return a < b ? -1 : a > b;
}

int main(void) {
    unsigned long x = 1;
    const long iters = 50000000;
    double t0 = now_ns();
    const uint64_t k0 = __rdtsc();
    for (long i = 0; i < iters; i++) __asm__ volatile("add $1, %0\n\tadd $1, %0\n\tadd $1, %0\n\tadd $1, %0" : "+r"(x));
    const double dt = now_ns() - t0, core_per_tsc = 4.0 * iters / (double)(__rdtsc() - k0);
    char model[128] = "unknown";
    FILE *f = fopen("/proc/cpuinfo", "r");
    for (char line[512]; f && fgets(line, sizeof line, f);)
        if (strncmp(line, "model name", 10) == 0) { snprintf(model, sizeof model, "%s", strchr(line, ':') + 2); model[strcspn(model, "\n")] = 0; break; }
    if (f) fclose(f);
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) { printf("%s: no AVX2+FMA\n", model); return 0; }
    printf("cpu: %s; core %.2f GHz\n", model, 4.0 * iters / dt);
    for (int i = 0; i < 256; i++) lut[i] = i * 0.01f - 1.0f;
    srand(1);
    for (int i = 0; i < N; i++) { q[i] = (uint8_t)(rand() & 255); g[i] = rand() * 1e-9f; v[i] = 1e-4f; m[i] = 0; p[i] = 1; }
    void (*fn[])(void) = {inserts, movzx, gpr, gather8, gather4x2, rule_only, separate, fused, grouped16, grouped32, grouped64};
    const char *name[] = {"inserts", "movzx", "gpr", "gather8", "gather4x2", "rule alone", "deq+rule: two loops",
                          "deq+rule: fused", "deq+rule: groups of 16", "deq+rule: groups of 32", "deq+rule: groups of 64"};
    enum { K = sizeof fn / sizeof fn[0], ROUNDS = 60 };
    static double r[K][ROUNDS];
    for (int rd = 0; rd < ROUNDS; rd++)
        for (int k = 0; k < K; k++) {
            uint64_t best = ~0ull;
            for (int rep = 0; rep < 30; rep++) {
                const uint64_t a = __rdtsc();
                fn[k]();
                const uint64_t b = __rdtsc();
                if (b - a < best) best = b - a;
            }
            r[k][rd] = (double)best / N * 8 * core_per_tsc;
        }
    for (int k = 0; k < K; k++) {
        qsort(r[k], ROUNDS, sizeof(double), cmp_d);
        printf("%-24s %6.2f core cycles per 8 lanes (min %.2f)\n", name[k], r[k][ROUNDS / 2], r[k][0]);
    }
    return 0;
}
