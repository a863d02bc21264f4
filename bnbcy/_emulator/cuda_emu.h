// bnbcy's SIMT emulator: the CUDA constructs bnbcy's kernels use, for host C++ (g++).
//
// The driver (bnbcy/_emulator/build.py) compiles one translation unit per cuda_src module:
// this header, then the module's source as it is (BNBCY_EMULATOR defined, so that
// bnbcy_common.cuh takes the host stand-ins of its inline-PTX helpers from here), then a
// table of the module's kernels. Every CUDA thread of a block is a fiber (ucontext); the
// block's fibers run one at a time on the calling OS thread, each until its next
// synchronisation point (__syncthreads, a warp collective, exit). The scheduler then
// completes warp collectives whose named lanes all arrived, and the block barrier when every
// live thread of the block waits at it. Anything else (a shuffle reached by part of a warp, a
// barrier reached by part of a block, lanes meeting at different collectives) is an error
// reported to Python, never a hang. Blocks run one after the other; static and dynamic
// __shared__ memory lives in one section, poisoned (0xFF bytes: NaN floats) before each block.
//
// What is not here is a compile error: an unsupported intrinsic is an undeclared name, and
// inline PTX (asm) without a host stand-in does not compile.
#pragma once

#ifndef BNBCY_EMULATOR
#error "cuda_emu.h is compiled by bnbcy's emulator driver, with BNBCY_EMULATOR defined"
#endif

#include <stdint.h>
#include <stddef.h>
#include <string.h>
#include <stdio.h>
#include <stdarg.h>
#include <math.h>
#include <ucontext.h>
#include <sys/mman.h>
#include <mutex>
#include <type_traits>
#include <xmmintrin.h>
#include <pmmintrin.h>
#include "kernel_table.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define BNBCY_EMU_ASAN 1
#else
#define BNBCY_EMU_ASAN 0
#endif

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800
#endif
#ifndef BNBCY_EMU_FTZ
#define BNBCY_EMU_FTZ 1  // --use_fast_math: unpinned float ops flush denormals (MXCSR FTZ/DAZ)
#endif

// ------------------------------------------------------------------------- CUDA qualifiers
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __restrict__ __restrict
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#ifdef BNBCY_EMU_SCAN  // the driver's first pass finds the kernels and their launch bounds
#define __launch_bounds__(...) __bnbcy_lb__(__VA_ARGS__)
#define __global__ __bnbcy_kernel__
#else
#define __launch_bounds__(...)
#define __global__ __attribute__((used))
#endif
#define __constant__ const
// Static __shared__ variables: one copy (blocks run one at a time), all in one section so the
// scheduler can poison them per block and map shared-window addresses (cvta.to.shared).
#define __shared__ static __attribute__((section("bnbcy_shared"), aligned(16)))

namespace bnbcy_emu {

struct uint3_t { unsigned int x, y, z; };

// ------------------------------------------------------------------------- launch state
enum FiberState { RUNNABLE = 0, AT_BARRIER, AT_WARP, DONE };
enum WarpOp { W_NONE = 0, W_SHFL_XOR, W_SHFL_DOWN, W_SHFL_UP, W_SHFL_IDX, W_BALLOT, W_ANY, W_ALL,
              W_SYNCWARP, W_MMA_S8_16832, W_LDMATRIX_X4 };
static const char *const kWarpOpName[] = {"-", "__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                                          "__shfl_sync", "__ballot_sync", "__any_sync", "__all_sync",
                                          "__syncwarp", "mma.sync.m16n8k32.s8", "ldmatrix.x4"};

struct CpAsync { uint8_t *dst; const uint8_t *src; unsigned src_bytes, cp_size; };
enum { MAX_CP_ASYNC = 64, MAX_CP_GROUPS = 16 };

struct Fiber {
    ucontext_t ctx;
    uint3_t tid;
    int linear, state;
    const char *site; int line;            // where it waits (barrier / collective)
    int op; unsigned mask;
    uint32_t in[12], out[4];
    // cp.async: issued copies in order, and how many of them each committed group ends with
    CpAsync cp[MAX_CP_ASYNC];
    int ncp, ngroups, group_end[MAX_CP_GROUPS], committed;
    void *fake_stack;
};

struct Launch {
    uint3_t grid, block, bid;
    unsigned nthreads, dyn_shared;
    Fiber *fibers;
    Fiber *cur;
    ucontext_t sched;
    char *error; size_t errlen; bool failed;
    int late_cp_async;   // 1: copies land only when a wait requires them (catches a missing wait)
    const void *sched_stack_bottom; size_t sched_stack_size;
};

extern Launch *g;  // the launch being run (one at a time per library, under g_mutex)

__attribute__((noreturn)) void fail(const char *fmt, ...);

}  // namespace bnbcy_emu

#define threadIdx (bnbcy_emu::g->cur->tid)
#define blockIdx (bnbcy_emu::g->bid)
#define blockDim (bnbcy_emu::g->block)
#define gridDim (bnbcy_emu::g->grid)
static const int warpSize = 32;

// ------------------------------------------------------------------------- vector types
#define BNBCY_EMU_VEC2(T, N, A) struct __attribute__((aligned(A))) N { T x, y; };               \
    static inline N make_##N(T x, T y) { N v; v.x = x; v.y = y; return v; }
#define BNBCY_EMU_VEC4(T, N, A) struct __attribute__((aligned(A))) N { T x, y, z, w; };         \
    static inline N make_##N(T x, T y, T z, T w) { N v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
BNBCY_EMU_VEC2(float, float2, 8)
BNBCY_EMU_VEC4(float, float4, 16)
BNBCY_EMU_VEC2(int, int2, 8)
BNBCY_EMU_VEC4(int, int4, 16)
BNBCY_EMU_VEC2(unsigned int, uint2, 8)
BNBCY_EMU_VEC4(unsigned int, uint4, 16)
#undef BNBCY_EMU_VEC2
#undef BNBCY_EMU_VEC4

template <class T> static inline T __ldg(const T *p) { return *p; }

static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; memcpy(&f, &u, 4); return f; }
static inline int __float_as_int(float f) { int u; memcpy(&u, &f, 4); return u; }

// ------------------------------------------------------------- exact PTX float operations
namespace bnbcy_emu {
// (bit tests: the MXCSR of an emulated thread may have DAZ set, which would hide subnormals)
static inline bool is_sub(float x) {
    const uint32_t u = __float_as_uint(x);
    return (u & 0x7f800000u) == 0 && (u & 0x007fffffu) != 0;
}
// .ftz: a subnormal input or (rounded) result becomes a zero of the same sign
static inline float ftz(float x) { return is_sub(x) ? __uint_as_float(__float_as_uint(x) & 0x80000000u) : x; }
// The pinned helpers compute with denormals on (the MXCSR of an emulated thread may have
// FTZ/DAZ set for the unpinned code), then flush exactly as PTX says.
struct IeeeScope {
    unsigned saved;
    IeeeScope() : saved(_mm_getcsr()) { _mm_setcsr(saved & ~0x8040u); }
    ~IeeeScope() { _mm_setcsr(saved); }
};
}  // namespace bnbcy_emu

#define BNBCY_EMU_FTZ_BINOP(NAME, EXPR)                                           \
    static inline float NAME(float a, float b) {                                  \
        bnbcy_emu::IeeeScope s_;                                                  \
        a = bnbcy_emu::ftz(a); b = bnbcy_emu::ftz(b);                             \
        volatile float r_ = (EXPR);                                               \
        return bnbcy_emu::ftz(r_);                                                \
    }
BNBCY_EMU_FTZ_BINOP(mul_ftz, a * b)           // mul.rn.ftz.f32
BNBCY_EMU_FTZ_BINOP(add_ftz, a + b)           // add.rn.ftz.f32
BNBCY_EMU_FTZ_BINOP(sub_ftz, a - b)           // sub.rn.ftz.f32
#undef BNBCY_EMU_FTZ_BINOP

// fma.rn.ftz.f32: one rounding
static inline float fma_ftz(float a, float b, float c) {
    bnbcy_emu::IeeeScope s_;
    volatile float r = __builtin_fmaf(bnbcy_emu::ftz(a), bnbcy_emu::ftz(b), bnbcy_emu::ftz(c));
    return bnbcy_emu::ftz(r);
}
// __fmaf_rn of a --use_fast_math (-ftz=true) build compiles to fma.rn.ftz.f32
static inline float __fmaf_rn(float a, float b, float c) {
#if BNBCY_EMU_FTZ
    return fma_ftz(a, b, c);
#else
    bnbcy_emu::IeeeScope s_;
    volatile float r = __builtin_fmaf(a, b, c);
    return r;
#endif
}
static inline float __fmul_rn(float a, float b) {
#if BNBCY_EMU_FTZ
    return mul_ftz(a, b);
#else
    bnbcy_emu::IeeeScope s_; volatile float r = a * b; return r;
#endif
}
static inline float __fadd_rn(float a, float b) {
#if BNBCY_EMU_FTZ
    return add_ftz(a, b);
#else
    bnbcy_emu::IeeeScope s_; volatile float r = a + b; return r;
#endif
}

// abs.ftz.f32: clears the sign (NaN stays NaN), subnormals -> +0
static inline float abs_ftz(float x) {
    return __uint_as_float(__float_as_uint(bnbcy_emu::ftz(x)) & 0x7fffffffu);
}
// max.ftz.f32: NaN operands are dropped (both NaN: canonical NaN), +0 > -0
static inline float max_ftz(float a, float b) {
    a = bnbcy_emu::ftz(a); b = bnbcy_emu::ftz(b);
    if (a != a && b != b) return __uint_as_float(0x7fffffffu);
    if (a != a) return b;
    if (b != b) return a;
    if (a == 0.0f && b == 0.0f) return signbit(a) ? b : a;
    return a > b ? a : b;
}
// set.eq.ftz.u32.f32 x, 0
static inline bool is_zero_ftz(float x) { return bnbcy_emu::ftz(x) == 0.0f; }

// cvt.rni.ftz.s32.f32: nearest, ties to even; saturating; NaN -> 0
static inline int f2i_rni(float x) {
    x = bnbcy_emu::ftz(x);
    if (x != x) return 0;
    if (x >= 2147483648.0f) return 2147483647;
    if (x <= -2147483648.0f) return (-2147483647 - 1);
    bnbcy_emu::IeeeScope s_;
    return (int)nearbyintf(x);  // default rounding mode: to nearest even
}

// .approx operations: IEEE results (within the documented error of the PTX instructions),
// with their ftz and documented special ranges.
static inline float rcp_approx(float x) {  // rcp.approx.ftz.f32 (max 1 ulp)
    bnbcy_emu::IeeeScope s_;
    volatile float r = 1.0f / bnbcy_emu::ftz(x);
    return bnbcy_emu::ftz(r);
}
static inline float div_approx(float a, float b) {  // div.approx.ftz.f32: a * (1/b), 2 ulp
    return mul_ftz(a, rcp_approx(b));    // |b| > 2^126: 1/b flushes, 0 (NaN for a = inf), as PTX
}
static inline float sqrt_approx(float x) {  // sqrt.approx.ftz.f32
    bnbcy_emu::IeeeScope s_;
    volatile float r = sqrtf(bnbcy_emu::ftz(x));
    return bnbcy_emu::ftz(r);
}
static inline float ex2_approx(float x) {  // ex2.approx.ftz.f32 (2 ulp + ftz)
    bnbcy_emu::IeeeScope s_;
    volatile float r = exp2f(bnbcy_emu::ftz(x));
    return bnbcy_emu::ftz(r);
}
static inline float lg2_approx(float x) {  // lg2.approx.ftz.f32
    bnbcy_emu::IeeeScope s_;
    volatile float r = log2f(bnbcy_emu::ftz(x));
    return bnbcy_emu::ftz(r);
}

// cvt.rn.f16.f32 (nearest even, overflow to inf, NaN -> canonical 0x7fff) and cvt.f32.f16 (exact)
static inline unsigned short cvt_rn_f16_f32(float f) {
    const uint32_t u = __float_as_uint(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (unsigned short)0x7fffu;
    if (a >= 0x477ff000u) return (unsigned short)(sign | 0x7c00u);  // >= 65520: inf
    if (a < 0x38800000u) {                                           // below 2^-14: subnormal half
        if (a < 0x33000000u) return (unsigned short)sign;            // < 2^-25: rounds to 0 (tie -> even 0)
        const uint32_t mant = (a & 0x7fffffu) | 0x800000u;
        const int shift = 126 - (int)(a >> 23);                      // 14 - e + 23 - 10 + ...
        // value = mant * 2^(e-150); half subnormal unit = 2^-24 -> q = mant >> (126 - e) with e = a>>23
        const uint32_t q = mant >> shift, rem = mant & ((1u << shift) - 1), half = 1u << (shift - 1);
        uint32_t r = q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u);
        return (unsigned short)(sign | r);
    }
    uint32_t r = a - 0x38000000u;                                    // rebias exponent 127 -> 15
    const uint32_t rem = r & 0x1fffu;
    r >>= 13;
    if (rem > 0x1000u || (rem == 0x1000u && (r & 1u))) r++;
    return (unsigned short)(sign | r);
}
static inline float cvt_f32_f16(unsigned short h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 31u, m = h & 1023u;
    if (e == 0) {
        const float v = ldexpf((float)m, -24);
        return sign ? -v : v;
    }
    if (e == 31) return __uint_as_float(sign | 0x7f800000u | (m << 13));
    return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
}
// cvt.rn.bf16.f32 (nearest even, NaN -> canonical 0x7fff)
static inline unsigned short cvt_rn_bf16_f32(float f) {
    const uint32_t u = __float_as_uint(f);
    if (f != f) return (unsigned short)0x7fffu;
    return (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// dp4a.s32.s32: four signed byte products plus c, wrapping
static inline int dp4a_s32(unsigned int a, unsigned int b, int c) {
    uint32_t acc = (uint32_t)c;
    for (int k = 0; k < 4; k++)
        acc += (uint32_t)((int)(signed char)(a >> (8 * k)) * (int)(signed char)(b >> (8 * k)));
    return (int)acc;
}

// ------------------------------------------------------------------------- synchronisation
namespace bnbcy_emu {
void yield_to_scheduler(int state, const char *site, int line);
uint32_t warp_collective(int op, unsigned mask, const uint32_t *in, int nin, uint32_t *out, const char *site,
                         int line);
}  // namespace bnbcy_emu

#define __syncthreads() bnbcy_emu::yield_to_scheduler(bnbcy_emu::AT_BARRIER, __FILE__, __LINE__)

template <class T>
static inline T bnbcy_emu_shfl(int op, unsigned mask, T v, int arg, int width, const char *site, int line) {
    static_assert(sizeof(T) == 4, "the emulator's shuffles move 32-bit values");
    uint32_t in[3], out;
    memcpy(&in[0], &v, 4);
    in[1] = (uint32_t)arg;
    in[2] = (uint32_t)width;
    bnbcy_emu::warp_collective(op, mask, in, 3, &out, site, line);
    T r;
    memcpy(&r, &out, 4);
    return r;
}
#define __shfl_xor_sync(mask, v, lm, ...) \
    bnbcy_emu_shfl(bnbcy_emu::W_SHFL_XOR, (mask), (v), (lm), BNBCY_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_down_sync(mask, v, d, ...) \
    bnbcy_emu_shfl(bnbcy_emu::W_SHFL_DOWN, (mask), (v), (d), BNBCY_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_up_sync(mask, v, d, ...) \
    bnbcy_emu_shfl(bnbcy_emu::W_SHFL_UP, (mask), (v), (d), BNBCY_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define __shfl_sync(mask, v, src, ...) \
    bnbcy_emu_shfl(bnbcy_emu::W_SHFL_IDX, (mask), (v), (src), BNBCY_EMU_WIDTH(__VA_ARGS__), __FILE__, __LINE__)
#define BNBCY_EMU_WIDTH(...) (bnbcy_emu_width_or_32(0, ##__VA_ARGS__))
static inline int bnbcy_emu_width_or_32(int) { return 32; }
static inline int bnbcy_emu_width_or_32(int, int w) { return w; }

static inline unsigned bnbcy_emu_vote(int op, unsigned mask, int pred, const char *site, int line) {
    uint32_t in[1] = {(uint32_t)(pred != 0)}, out;
    bnbcy_emu::warp_collective(op, mask, in, 1, &out, site, line);
    return out;
}
#define __ballot_sync(mask, p) bnbcy_emu_vote(bnbcy_emu::W_BALLOT, (mask), (p), __FILE__, __LINE__)
#define __any_sync(mask, p) ((int)bnbcy_emu_vote(bnbcy_emu::W_ANY, (mask), (p), __FILE__, __LINE__))
#define __all_sync(mask, p) ((int)bnbcy_emu_vote(bnbcy_emu::W_ALL, (mask), (p), __FILE__, __LINE__))
#define __syncwarp(...) ((void)bnbcy_emu_vote(bnbcy_emu::W_SYNCWARP, bnbcy_emu_mask_or_full(0, ##__VA_ARGS__), 1, \
                                               __FILE__, __LINE__))
static inline unsigned bnbcy_emu_mask_or_full(int) { return 0xffffffffu; }
static inline unsigned bnbcy_emu_mask_or_full(int, unsigned m) { return m; }

// ------------------------------------------------------------- shared window, cp.async, mma
extern "C" {
extern uint8_t __start_bnbcy_shared[];
extern uint8_t __stop_bnbcy_shared[];
}
namespace bnbcy_emu {
static inline uint8_t *shared_ptr(uint32_t addr, uint32_t bytes, const char *what) {
    const size_t size = (size_t)(__stop_bnbcy_shared - __start_bnbcy_shared);
    if ((size_t)addr + bytes > size)
        fail("%s: shared address 0x%x (+%u bytes) outside the block's shared memory (%zu bytes)", what, addr,
             bytes, size);
    return __start_bnbcy_shared + addr;
}
void cp_async(uint8_t *dst, const void *src, unsigned cp_size, unsigned src_bytes);
void cp_async_commit();
void cp_async_wait(int n);
}  // namespace bnbcy_emu

#if __CUDA_ARCH__ >= 800
// cvta.to.shared: offset in the block's shared window
static inline unsigned int smem_u32(const void *p) {
    const uint8_t *q = (const uint8_t *)p;
    if (q < __start_bnbcy_shared || q >= __stop_bnbcy_shared)
        bnbcy_emu::fail("cvta.to.shared of an address outside __shared__ memory");
    return (unsigned int)(q - __start_bnbcy_shared);
}
// cp.async.cg.shared.global [dst], [src], 16, src_bytes
static inline void cp_async16(unsigned int dst, const void *src, unsigned int src_bytes) {
    bnbcy_emu::cp_async(bnbcy_emu::shared_ptr(dst, 16, "cp.async"), src, 16, src_bytes);
}
static inline void cp_async_commit() { bnbcy_emu::cp_async_commit(); }
template <int N> static inline void cp_async_wait() { bnbcy_emu::cp_async_wait(N); }

static inline void ldmatrix_x4(unsigned int (&r)[4], unsigned int addr) {
    uint32_t out[4];
    bnbcy_emu::warp_collective(bnbcy_emu::W_LDMATRIX_X4, 0xffffffffu, &addr, 1, out, __FILE__, __LINE__);
    for (int k = 0; k < 4; k++) r[k] = out[k];
}
static inline void mma_s8_16832(int (&d)[4], const unsigned int (&a)[4], const unsigned int (&b)[2]) {
    uint32_t in[10], out[4];
    for (int k = 0; k < 4; k++) in[k] = a[k];
    in[4] = b[0];
    in[5] = b[1];
    for (int k = 0; k < 4; k++) in[6 + k] = (uint32_t)d[k];
    bnbcy_emu::warp_collective(bnbcy_emu::W_MMA_S8_16832, 0xffffffffu, in, 10, out, __FILE__, __LINE__);
    for (int k = 0; k < 4; k++) d[k] = (int)out[k];
}
#endif

// Dynamic shared memory: `extern __shared__ T name[];` is rewritten by the driver to
// `BNBCY_EMU_DYNAMIC_SHARED(T, name)` (the only source transformation it makes).
enum { BNBCY_EMU_MAX_DYN_SHARED = 227 * 1024 };
extern "C" uint8_t bnbcy_emu_dyn_shared[BNBCY_EMU_MAX_DYN_SHARED];
#define BNBCY_EMU_DYNAMIC_SHARED(T, name) T *const name = reinterpret_cast<T *>(bnbcy_emu_dyn_shared)

// inline PTX without a host stand-in does not compile
#define asm(...) static_assert(sizeof(int) == 0, "bnbcy emulator: inline PTX without a host stand-in")
