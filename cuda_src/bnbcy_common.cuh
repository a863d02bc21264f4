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

// Element types: storage type plus exact conversions to and from float32
// (round-to-nearest-even on the way back).
struct f32_t {
    typedef float storage;
    static __device__ __forceinline__ float to_float(float v) { return v; }
    static __device__ __forceinline__ float from_float(float v) { return v; }
};

struct f16_t {
    typedef u16 storage;
    static __device__ __forceinline__ float to_float(u16 h) {
        float f;
        asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
        return f;
    }
    static __device__ __forceinline__ u16 from_float(float f) {
        u16 h;
        asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
    }
};

struct bf16_t {
    typedef u16 storage;
    static __device__ __forceinline__ float to_float(u16 h) { return __uint_as_float((u32)h << 16); }
    static __device__ __forceinline__ u16 from_float(float f) {
#if __CUDA_ARCH__ >= 800
        u16 h;
        asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
        return h;
#else
        u32 u = __float_as_uint(f);
        if (f != f) return (u16)0x7FFF;  // the canonical NaN cvt.rn.bf16.f32 writes
        return (u16)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
    }
};

// Load/store N consecutive elements, 16-byte vectors when the address allows.
template <typename S, int N>
__device__ __forceinline__ void load_vec(const S *__restrict__ p, S (&v)[N]) {
    static_assert((N * sizeof(S)) % 16 == 0, "vector loads need whole 16-byte chunks");
    const uint4 *q = reinterpret_cast<const uint4 *>(p);
#pragma unroll
    for (int k = 0; k < (int)(N * sizeof(S) / 16); k++) {
        uint4 w = __ldg(q + k);
        *reinterpret_cast<uint4 *>(&v[k * 16 / sizeof(S)]) = w;
    }
}

__device__ __forceinline__ bool aligned16(const void *p) {
    return (reinterpret_cast<u64>(p) & 15u) == 0;
}
__device__ __forceinline__ bool aligned8(const void *p) {
    return (reinterpret_cast<u64>(p) & 7u) == 0;
}
