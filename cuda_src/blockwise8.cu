// 8-bit blockwise dynamic quantization (NUMERICS.md §2).
//
// Exported kernels (launch geometry is computed by bnbcy/functional/blockwise.py):
//   bnbcy_quantize_blockwise_{f32,f16,bf16}_{64..4096}(A, code, out, absmax, n)
//       blockDim = max(256, BS/8); each thread owns 8 consecutive elements.
//   bnbcy_dequantize_blockwise_{f32,f16,bf16}(q, code, absmax, out, n, log2_blocksize)
//       blockDim = 256; each thread owns 8 consecutive elements.
// Codes and absmax are bit-identical to bitsandbytes' kQuantizeBlockwise: the block
// maximum ignores NaN (fmaxf), r = rcp.approx.ftz(m), xn = x*r with ftz, then the
// literal 7-step search over the map with midpoint tie-breaks.
#include "bnbcy_common.cuh"

#define BNBCY_Q8_ITEMS 8

// The search of bitsandbytes' dQuantize, literally: correct for any sorted map,
// including maps with repeated values (zero-padded maps).
__device__ __forceinline__ u8 q8_search(const float *__restrict__ code, float x) {
    int p = 127, lo_i = 0, hi_i = 255;
    float lo = -1.0f, hi = 1.0f, v = code[127];
#pragma unroll
    for (int step = 64; step > 0; step >>= 1) {
        if (x > v) { lo_i = p; lo = v; p += step; }
        else { hi_i = p; hi = v; p -= step; }
        v = code[p];
    }
    if (hi_i == 255) hi = code[255];
    if (lo_i == 0) lo = code[0];
    // midpoints pinned (add.rn.ftz, mul.rn.ftz) like every rounding of the contract
    if (x > v) return (u8)(x > mul_ftz(add_ftz(hi, v), 0.5f) ? hi_i : p);
    return (u8)(x < mul_ftz(add_ftz(lo, v), 0.5f) ? lo_i : p);
}

template <class Tr, int BS>
__device__ __forceinline__ void quantize_blockwise(const typename Tr::storage *__restrict__ A,
                                                   const float *__restrict__ code,
                                                   u8 *__restrict__ out,
                                                   float *__restrict__ absmax, long long n) {
    constexpr int E = BNBCY_Q8_ITEMS;
    static_assert(E == 8, "load8_or_zero/block_absmax8 hold 8 elements per thread");
    constexpr int TPQ = BS / E;  // threads per quantization block: 8 .. 512
    __shared__ float s_code[256];
    __shared__ float s_warp_max[32];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];

    const long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * E;
    float x[E];
    load8_or_zero<Tr>(A, base, n, x);
    const float m = block_absmax8<BS>(x, s_warp_max);
    __syncthreads();  // s_code is complete

    if (base >= n) return;
    if (threadIdx.x % TPQ == 0) absmax[base / BS] = m;
    const float r = rcp_approx(m);
    u8 q[E];
#pragma unroll
    for (int e = 0; e < E; e++) q[e] = q8_search(s_code, mul_ftz(x[e], r));
    if (base + E <= n && aligned8(out + base)) {
        uint2 w;
        w.x = q[0] | (q[1] << 8) | (q[2] << 16) | ((u32)q[3] << 24);
        w.y = q[4] | (q[5] << 8) | (q[6] << 16) | ((u32)q[7] << 24);
        *reinterpret_cast<uint2 *>(out + base) = w;
    } else {
#pragma unroll
        for (int e = 0; e < E; e++)
            if (base + e < n) out[base + e] = q[e];
    }
}

template <class Tr>
__device__ __forceinline__ void dequantize_blockwise(const u8 *__restrict__ q,
                                                     const float *__restrict__ code,
                                                     const float *__restrict__ absmax,
                                                     typename Tr::storage *__restrict__ out,
                                                     long long n, int log2_blocksize) {
    typedef typename Tr::storage S;
    constexpr int E = BNBCY_Q8_ITEMS;
    __shared__ float s_code[256];
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s_code[i] = code[i];
    __syncthreads();

    const long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * E;
    if (base >= n) return;
    // blocksize >= 64 and base % 8 == 0: the 8 elements share one absmax.
    const float s = absmax[base >> log2_blocksize];
    if (base + E <= n && aligned8(q + base) && aligned16(out + base)) {
        const uint2 w = __ldg(reinterpret_cast<const uint2 *>(q + base));
        S y[E];
#pragma unroll
        for (int e = 0; e < E; e++) {
            const u32 c = ((e < 4 ? w.x : w.y) >> (8 * (e & 3))) & 0xffu;
            y[e] = Tr::from_float(mul_ftz(s_code[c], s));
        }
        store8(out + base, y);
    } else {
#pragma unroll
        for (int e = 0; e < E; e++)
            if (base + e < n) out[base + e] = Tr::from_float(mul_ftz(s_code[q[base + e]], s));
    }
}

#define BNBCY_Q8_QUANT(TR, NAME, BS)                                                         \
    extern "C" __global__ void __launch_bounds__(512) bnbcy_quantize_blockwise_##NAME##_##BS( \
        const TR::storage *__restrict__ A, const float *__restrict__ code,                    \
        u8 *__restrict__ out, float *__restrict__ absmax, long long n) {                     \
        quantize_blockwise<TR, BS>(A, code, out, absmax, n);                                 \
    }

#define BNBCY_Q8_QUANT_ALL_BS(TR, NAME) \
    BNBCY_Q8_QUANT(TR, NAME, 64)        \
    BNBCY_Q8_QUANT(TR, NAME, 128)       \
    BNBCY_Q8_QUANT(TR, NAME, 256)       \
    BNBCY_Q8_QUANT(TR, NAME, 512)       \
    BNBCY_Q8_QUANT(TR, NAME, 1024)      \
    BNBCY_Q8_QUANT(TR, NAME, 2048)      \
    BNBCY_Q8_QUANT(TR, NAME, 4096)

#define BNBCY_Q8_DEQUANT(TR, NAME)                                                             \
    extern "C" __global__ void __launch_bounds__(256) bnbcy_dequantize_blockwise_##NAME(       \
        const u8 *__restrict__ q, const float *__restrict__ code,                              \
        const float *__restrict__ absmax, TR::storage *__restrict__ out, long long n,          \
        int log2_blocksize) {                                                                  \
        dequantize_blockwise<TR>(q, code, absmax, out, n, log2_blocksize);                     \
    }

BNBCY_Q8_QUANT_ALL_BS(f32_t, f32)
BNBCY_Q8_QUANT_ALL_BS(f16_t, f16)
BNBCY_Q8_QUANT_ALL_BS(bf16_t, bf16)
BNBCY_Q8_DEQUANT(f32_t, f32)
BNBCY_Q8_DEQUANT(f16_t, f16)
BNBCY_Q8_DEQUANT(bf16_t, bf16)
