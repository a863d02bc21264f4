// Shared device helpers of bnbcy's CUDA kernels.
//
// Every float operation whose rounding is part of the numerics contract
// (NUMERICS.md §0) is pinned with inline PTX, so the result does not depend on
// compiler flags or on whether nvcc or NVRTC built the module. No CUDA headers
// are included: NVRTC then needs no include path.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;

#define BNBCY_FLT_MAX 3.402823466e+38f

// Every helper written in inline PTX sits between `#ifndef BNBCY_EMULATOR` and `#endif`:
// bnbcy's SIMT emulator (bnbcy/_emulator/cuda_emu.h) defines the same functions for the host.
#ifndef BNBCY_EMULATOR
__device__ __forceinline__ float rcp_approx(float x) {
    float r;
    asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float mul_ftz(float a, float b) {
    float r;
    asm("mul.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// fabsf/fmaxf with the ftz of bitsandbytes' --use_fast_math build, pinned. max
// returns the non-NaN operand when one is NaN, like fmaxf.
__device__ __forceinline__ float abs_ftz(float x) {
    float r;
    asm("abs.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float max_ftz(float a, float b) {
    float r;
    asm("max.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// cvt.f32.f16 / cvt.rn.f16.f32 / cvt.rn.bf16.f32
__device__ __forceinline__ float cvt_f32_f16(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 cvt_rn_f16_f32(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#if __CUDA_ARCH__ >= 800
__device__ __forceinline__ u16 cvt_rn_bf16_f32(float f) {
    u16 h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

// a / b and __fdividef(a, b) of bitsandbytes' --use_fast_math build: div.approx.ftz.f32, pinned.
__device__ __forceinline__ float div_approx(float a, float b) {
    float r;
    asm("div.approx.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// fmaf / __fmaf_rn of the --use_fast_math build (one rounding, ftz), pinned.
__device__ __forceinline__ float fma_ftz(float a, float b, float c) {
    float r;
    asm("fma.rn.ftz.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}

// __float2int_rn of the --use_fast_math build: cvt.rni.ftz.s32.f32 (ties to even, saturating,
// NaN -> 0), pinned.
__device__ __forceinline__ int f2i_rni(float x) {
    int r;
    asm("cvt.rni.ftz.s32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// ---- fast-math helpers of the optimizer kernels (NUMERICS.md §0), pinned -------------------
// sqrtf of the --use_fast_math build: sqrt.approx.ftz.f32.
__device__ __forceinline__ float sqrt_approx(float x) {
    float r;
    asm("sqrt.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float ex2_approx(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float lg2_approx(float x) {
    float r;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ float add_ftz(float a, float b) {
    float r;
    asm("add.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

__device__ __forceinline__ float sub_ftz(float a, float b) {
    float r;
    asm("sub.rn.ftz.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}

// x == 0.0f compared with ftz (a denormal compares equal to zero), as the --use_fast_math build.
__device__ __forceinline__ bool is_zero_ftz(float x) {
    u32 r;
    asm("set.eq.ftz.u32.f32 %0, %1, 0f00000000;" : "=r"(r) : "f"(x));
    return r != 0u;
}
#endif  // BNBCY_EMULATOR

// Element types: storage type plus exact conversions to and from float32
// (round-to-nearest-even on the way back).
struct f32_t {
    typedef float storage;
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};

struct f16_t {
    typedef u16 storage;
    static __device__ __forceinline__ float to_float(u16 h) { return cvt_f32_f16(h); }
    static __device__ __forceinline__ u16 from_float(float f) { return cvt_rn_f16_f32(f); }
};

struct bf16_t {
    typedef u16 storage;
    static __device__ __forceinline__ float to_float(u16 h) { return __uint_as_float((u32)h << 16); }
    static __device__ __forceinline__ u16 from_float(float f) {
#if __CUDA_ARCH__ >= 800
        return cvt_rn_bf16_f32(f);
#else
        u32 u = __float_as_uint(f);
        if (f != f) return (u16)0x7FFF;  // the canonical NaN cvt.rn.bf16.f32 writes
        return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
    }
};

// Eight consecutive elements as float32, through 16-byte loads (p 16-byte aligned).
__device__ __forceinline__ void load8(const float *__restrict__ p, float (&v)[8]) {
    const float4 a = __ldg(reinterpret_cast<const float4 *>(p));
    const float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

__device__ __forceinline__ void load8(const u16 *__restrict__ p, u16 (&v)[8]) {
    const uint4 w = __ldg(reinterpret_cast<const uint4 *>(p));
    const u32 words[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        v[2 * k] = (u16)(words[k] & 0xffffu);
        v[2 * k + 1] = (u16)(words[k] >> 16);
    }
}

// Eight consecutive elements stored through 16-byte stores (p 16-byte aligned).
__device__ __forceinline__ void store8(float *__restrict__ p, const float (&v)[8]) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

__device__ __forceinline__ void store8(u16 *__restrict__ p, const u16 (&v)[8]) {
    uint4 w;
    w.x = v[0] | ((u32)v[1] << 16);
    w.y = v[2] | ((u32)v[3] << 16);
    w.z = v[4] | ((u32)v[5] << 16);
    w.w = v[6] | ((u32)v[7] << 16);
    *reinterpret_cast<uint4 *>(p) = w;
}

__device__ __forceinline__ bool aligned16(const void *p) {
    return (reinterpret_cast<u64>(p) & 15u) == 0;
}
__device__ __forceinline__ bool aligned8(const void *p) {
    return (reinterpret_cast<u64>(p) & 7u) == 0;
}

// Eight consecutive elements from base as float32; elements at or past n read as 0.0, as
// bitsandbytes' blockwise kernels load them (so an all-NaN partial block has absmax 0).
template <class Tr>
__device__ __forceinline__ void load8_or_zero(const typename Tr::storage *__restrict__ A, long long base,
                                              long long n, float (&x)[8]) {
    typedef typename Tr::storage S;
    if (base + 8 <= n && aligned16(A)) {
        S raw[8];
        load8(A + base, raw);
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = Tr::to_float(raw[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) x[e] = base + e < n ? Tr::to_float(A[base + e]) : 0.0f;
    }
}

// max |x| over a quantization block of BS elements held 8 per thread by BS/8 consecutive
// threads (NaN dropped by max, ftz as bitsandbytes' --use_fast_math build). Every thread of the
// CUDA block must call it (it may synchronise); s_warp_max holds one float per warp.
template <int BS>
__device__ __forceinline__ float block_absmax8(const float (&x)[8], float *s_warp_max) {
    constexpr int TPQ = BS / 8;
    float m = -BNBCY_FLT_MAX;
#pragma unroll
    for (int e = 0; e < 8; e++) m = max_ftz(m, abs_ftz(x[e]));
    if constexpr (TPQ <= 32) {
#pragma unroll
        for (int off = TPQ / 2; off > 0; off >>= 1) m = max_ftz(m, __shfl_xor_sync(0xffffffffu, m, off));
    } else {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) m = max_ftz(m, __shfl_xor_sync(0xffffffffu, m, off));
        const int warp = threadIdx.x >> 5;
        if ((threadIdx.x & 31) == 0) s_warp_max[warp] = m;
        __syncthreads();
        constexpr int WPQ = TPQ / 32;
        const int first = (warp / WPQ) * WPQ;
        m = s_warp_max[first];
#pragma unroll
        for (int k = 1; k < WPQ; k++) m = max_ftz(m, s_warp_max[first + k]);
    }
    return m;
}

// |x| by clearing the sign bit: exact, no flush of denormals (torch's abs()).
__device__ __forceinline__ float abs_exact(float x) {
    return __uint_as_float(__float_as_uint(x) & 0x7fffffffu);
}

// powf(b, (float)e) / __powf of the --use_fast_math build: ex2~(lg2~(b) * e).
__device__ __forceinline__ float pow_approx(float b, float e) {
    return ex2_approx(mul_ftz(lg2_approx(b), e));
}
