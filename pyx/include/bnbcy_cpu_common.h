/* Scalar helpers shared by bnbcy's CPU kernels: float16/bfloat16 conversions
 * (round-to-nearest-even, as torch and CUDA convert) and flush-to-zero (CUDA
 * builds run with --use_fast_math, so float32 denormals become signed zeros). */
#ifndef BNBCY_CPU_COMMON_H
#define BNBCY_CPU_COMMON_H
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

enum { BNBCY_F32 = 0, BNBCY_F16 = 1, BNBCY_BF16 = 2 };

/* Large outputs are usually fresh allocations (torch does not cache CPU memory) whose first
 * touch costs one page fault per 4 KiB page. Asking for transparent huge pages on the 2 MiB-aligned
 * interior and then populating the range in one call (MADV_POPULATE_WRITE, Linux 5.14+) replaces
 * thousands of faults by a few huge-page allocations: a fresh 32 MB output costs ~3 ms instead of
 * ~9 ms, and faulting huge pages in one call also avoids the long stalls that faulting them one
 * by one from several threads can hit. Advisory only: pages already mapped are left as they are,
 * contents never change, and errors (older kernels, THP off) are ignored. */
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
static inline void bnbcy_advise_hugepages(void *p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const uintptr_t huge = (uintptr_t)2 << 20, page = 4096;
    if (bytes < 2 * huge) return;
    uintptr_t lo = ((uintptr_t)p + huge - 1) & ~(huge - 1);
    uintptr_t hi = ((uintptr_t)p + bytes) & ~(huge - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_HUGEPAGE);
    lo = ((uintptr_t)p + page - 1) & ~(page - 1);
    hi = ((uintptr_t)p + bytes) & ~(page - 1);
    if (hi > lo) madvise((void *)lo, hi - lo, MADV_POPULATE_WRITE);
#else
    (void)p; (void)bytes;
#endif
}

static inline uint32_t bnbcy_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bnbcy_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bnbcy_ftz(float y) { return fabsf(y) < FLT_MIN ? copysignf(0.0f, y) : y; }

static inline float bnbcy_bf16_to_f32(uint16_t h) { return bnbcy_u2f((uint32_t)h << 16); }

/* Same bits as c10::BFloat16's round_to_nearest_even. */
static inline uint16_t bnbcy_f32_to_bf16(float f) {
    uint32_t u = bnbcy_f2u(f);
    if (f != f) return (uint16_t)0x7FC0;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* IEEE binary16 -> binary32, exact (subnormals included). */
static inline float bnbcy_f16_to_f32(uint16_t h) {
    const uint32_t shifted_exp = 0x7C00u << 13;
    uint32_t o = ((uint32_t)h & 0x7FFFu) << 13;
    uint32_t exp = shifted_exp & o;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == shifted_exp) {
        o += (uint32_t)(128 - 16) << 23; /* inf / NaN */
    } else if (exp == 0) {
        o += 1u << 23; /* subnormal: renormalise through one exact float subtraction */
        o = bnbcy_f2u(bnbcy_u2f(o) - bnbcy_u2f(113u << 23));
    }
    return bnbcy_u2f(o | (((uint32_t)h & 0x8000u) << 16));
}

/* binary32 -> binary16, round-to-nearest-even, overflow to inf, NaN kept quiet. */
static inline uint16_t bnbcy_f32_to_f16(float f) {
    uint32_t x = bnbcy_f2u(f);
    const uint32_t sign = x & 0x80000000u;
    x ^= sign;
    uint16_t o;
    if (x >= (uint32_t)(127 + 16) << 23) {
        o = x > (255u << 23) ? 0x7E00 : 0x7C00;
    } else if (x < (113u << 23)) {
        /* result is a half subnormal or zero: let one float addition round it */
        const uint32_t magic = (uint32_t)((127 - 15) + (23 - 10) + 1) << 23;
        o = (uint16_t)(bnbcy_f2u(bnbcy_u2f(x) + bnbcy_u2f(magic)) - magic);
    } else {
        const uint32_t mant_odd = (x >> 13) & 1u;
        x += ((uint32_t)(15 - 127) << 23) + 0xFFFu + mant_odd;
        o = (uint16_t)(x >> 13);
    }
    return (uint16_t)(o | (sign >> 16));
}

/* Element i of a float32/float16/bfloat16 array as float32, and the store back (RNE). */
static inline float bnbcy_load_any(const void *p, int dtype, int64_t i) {
    if (dtype == BNBCY_F32) return ((const float *)p)[i];
    if (dtype == BNBCY_F16) return bnbcy_f16_to_f32(((const uint16_t *)p)[i]);
    return bnbcy_bf16_to_f32(((const uint16_t *)p)[i]);
}

static inline void bnbcy_store_any(void *p, int dtype, int64_t i, float y) {
    if (dtype == BNBCY_F32) ((float *)p)[i] = y;
    else if (dtype == BNBCY_F16) ((uint16_t *)p)[i] = bnbcy_f32_to_f16(y);
    else ((uint16_t *)p)[i] = bnbcy_f32_to_bf16(y);
}

#endif
