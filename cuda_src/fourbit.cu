// 4-bit blockwise quantization (NF4 / FP4) and fused 4-bit matmuls (NUMERICS.md §3, §4).
//
// Exported kernels (launch geometry computed by bnbcy/functional/_fourbit_cuda.py):
//   bnbcy_quantize_4bit_{nf4,fp4}_{f32,f16,bf16}_{32..4096}(A, out, absmax, n)
//       blockDim = max(256, BS/8); each thread owns 8 consecutive elements (4 output bytes).
//       Codes and absmax bit-identical to bitsandbytes' kQuantizeBlockwise (4-bit): block max of
//       |x| ignoring NaN, r = rcp.approx.ftz(m), xn = x*r (ftz), then the NF4 threshold search or
//       the FP4 literal tree. Element 2j -> high nibble of byte j, 2j+1 -> low nibble; elements
//       past n read as 0.0 (odd n: the last low nibble encodes 0*r).
//   bnbcy_dequantize_4bit_{nf4,fp4}_{f32,f16,bf16}(q, absmax, out, n, log2_blocksize)
//       blockDim = 256; each thread owns 16 outputs (one 8-byte load, 16-byte stores).
//   bnbcy_gemv_4bit_{f32,f16,bf16}(A, B, absmax, code, bias, out, N, K, log2_blocksize)
//       out[n] = sum_k A[k] * code[nib(n*K+k)] * absmax[(n*K+k) >> log2bs] (+ bias[n]), fp32.
//       blockDim = 128 (4 warps), BNBCY_GEMV_ROWS = 8 consecutive rows per block, grid = ceil(N/8).
//       Thread t takes the 32-weight chunks c = t, t+128, ... of K: it loads A[32c..32c+32) once
//       (16-byte loads, kept as fp32 in registers), then for each of the 8 rows one 16-byte load of
//       B (32 weights, coalesced 512 bytes per warp and row) and one absmax; a 16-float code table
//       lives in shared memory. Reduction: a multi-value butterfly (9 shuffles for 8 rows), then
//       the 4 warps through shared memory in a fixed order (deterministic).
//   bnbcy_gemm_4bit_small_{f32,f16,bf16}_{4,8,16}(A, B, absmax, code, bias, out, M, N, K, log2bs)
//       out[m, n] for M <= MT rows of A. Each warp = 8 row-lanes x 4 k-groups; each lane owns RL
//       rows (n0 + rowlane + 8i) so a block covers 8*RL rows of W and splits K into 4*WARPS
//       k-groups of 32-weight chunks. Each weight byte is read once (16-byte loads, prefetched one
//       K-tile ahead) and used for all MT rows of A; A is staged per K-tile in shared memory as
//       fp32 (chunk stride 36 floats: the 4 k-groups of a warp read conflict-free float4s, the 8
//       row-lanes of a k-group broadcast). Partial sums are reduced over the k-groups through
//       shared memory in a fixed order (deterministic).
//         MT = 4:  RL = 4, WARPS = 8 (256 threads, 32 rows per block, K-tile 1024)
//         MT = 8:  RL = 4, WARPS = 8 (256 threads, 32 rows per block, K-tile 1024)
//         MT = 16: RL = 2, WARPS = 4 (128 threads, 16 rows per block, K-tile 512)
// gemv/gemm preconditions (checked by the caller): K % 32 == 0 and blocksize >= 32 (every 32-aligned
// run of 32 weights lies in one row and one absmax block).
#include "bnbcy_common.cuh"

#define BNBCY_Q4_ITEMS 8
#define BNBCY_DQ4_ITEMS 16
#define BNBCY_DQ4_THREADS 256
#define BNBCY_GEMV_THREADS 128
#define BNBCY_GEMV_ROWS 8

// NF4 values (NUMERICS.md §1.4) and FP4 magnitudes by the low 3 bits (§1.5), exact float32.
__constant__ float bnbcy_nf4_values[16] = {
    -0x1p+0f, -0x1.647362p-1f, -0x1.0cd66p-1f, -0x1.94654p-2f,
    -0x1.23449ap-2f, -0x1.7a6a7ep-3f, -0x1.74f0e2p-4f, 0.0f,
    0x1.45f5fep-4f, 0x1.4995c6p-3f, 0x1.f809bap-3f, 0x1.5a0674p-2f,
    0x1.c3497p-2f, 0x1.200f56p-1f, 0x1.722766p-1f, 0x1p+0f};
__constant__ float bnbcy_fp4_magnitudes[8] = {
    0.0f, 0x1.555556p-8f, 0x1.555556p-1f, 0x1p+0f, 0x1.555556p-2f, 0x1p-1f, 0x1.555556p-3f, 0x1p-2f};

__device__ __forceinline__ bool bnbcy_aligned4(const void *p) {
    return (reinterpret_cast<u64>(p) & 3u) == 0;
}

// NF4 code = #{k : x > t_k} over the 15 thresholds t_k of bitsandbytes' CUDA tree as nvcc compiles
// its decimal literals (NUMERICS.md §3.2; k = 0, 8, 12, 14 are one ulp off the float64-rounded
// midpoints), as a 4-level binary search (equivalent for strictly increasing thresholds; NaN -> 0).
__device__ __forceinline__ u32 nf4_code(float x) {
    const float t0 = -0x1.b239b2p-1f, t1 = -0x1.38a4ep-1f, t2 = -0x1.d709p-2f, t3 = -0x1.5bd4ecp-2f;
    const float t4 = -0x1.e079d8p-3f, t5 = -0x1.1a7178p-3f, t6 = -0x1.74f0e2p-5f, t7 = 0x1.45f5fep-5f;
    const float t8 = 0x1.ec90c6p-4f, t9 = 0x1.a0cfcp-3f, t10 = 0x1.2b05a8p-2f, t11 = 0x1.8ea7f2p-2f;
    const float t12 = 0x1.00da06p-1f, t13 = 0x1.491b5ep-1f, t14 = 0x1.b913b2p-1f;
    const bool b3 = x > t7;
    const bool b2 = x > (b3 ? t11 : t3);
    const bool b1 = x > (b3 ? (b2 ? t13 : t9) : (b2 ? t5 : t1));
    const bool b0 = x > (b3 ? (b2 ? (b1 ? t14 : t12) : (b1 ? t10 : t8))
                            : (b2 ? (b1 ? t6 : t4) : (b1 ? t2 : t0)));
    return ((u32)b3 << 3) | ((u32)b2 << 2) | ((u32)b1 << 1) | (u32)b0;
}

// FP4: sign 8 if x < 0 (-0.0 and NaN get 0), magnitude by bitsandbytes' literal tree on |x|.
__device__ __forceinline__ u32 fp4_code(float x) {
    const u32 sign = x < 0.0f ? 8u : 0u;
    const float a = abs_ftz(x);
    const bool b2 = a > 0x1.2aaaaap-2f;                                  // 0.29166667
    const bool b1 = a > (b2 ? 0x1.2aaaap-1f : 0x1.6p-4f);                // 0.583333 : 0.0859375
    const bool b0 = a > (b2 ? (b1 ? 0x1.aaaaaap-1f : 0x1.aaaaacp-2f)     // 0.8333333 : 0.4166667
                            : (b1 ? 0x1.aaaaaap-3f : 0x1.555572p-9f));   // 0.20833333 : 0.00260417
    const u32 mag = b2 ? (b1 ? 2u : 4u) : (b1 ? 6u : 0u);
    return sign | mag | (u32)b0;
}

template <bool NF4>
__device__ __forceinline__ u32 code4(float xn) {
    if constexpr (NF4) return nf4_code(xn);
    else return fp4_code(xn);
}

// ------------------------------------------------------------------------------------ quantize
template <class Tr, int BS, bool NF4>
__device__ __forceinline__ void quantize_4bit(const typename Tr::storage *__restrict__ A,
                                              u8 *__restrict__ out, float *__restrict__ absmax,
                                              long long n) {
    constexpr int E = BNBCY_Q4_ITEMS;
    static_assert(E == 8, "load8_or_zero/block_absmax8 hold 8 elements per thread");
    constexpr int TPQ = BS / E;  // threads per quantization block: 4 .. 512
    __shared__ float s_warp_max[32];

    const long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * E;
    float x[E];
    load8_or_zero<Tr>(A, base, n, x);
    const float m = block_absmax8<BS>(x, s_warp_max);

    if (base >= n) return;
    if (threadIdx.x % TPQ == 0) absmax[base / BS] = m;
    const float r = rcp_approx(m);
    u32 word = 0;
#pragma unroll
    for (int j = 0; j < E / 2; j++) {
        const u32 hi = code4<NF4>(mul_ftz(x[2 * j], r));
        const u32 lo = code4<NF4>(mul_ftz(x[2 * j + 1], r));
        word |= ((hi << 4) | lo) << (8 * j);
    }
    u8 *o = out + base / 2;
    if (base + E <= n && bnbcy_aligned4(o)) {
        *reinterpret_cast<u32 *>(o) = word;
    } else {
#pragma unroll
        for (int j = 0; j < E / 2; j++)
            if (base + 2 * j < n) o[j] = (u8)(word >> (8 * j));
    }
}

// ---------------------------------------------------------------------------------- dequantize
template <bool NF4>
__device__ __forceinline__ void fill_lut4(float *s_lut) {
    if (threadIdx.x < 16) {
        const u32 c = threadIdx.x;
        // FP4 as bitsandbytes: lut[c & 7] * (1 - 2 * (c >> 3)), so code 8 -> -0.0
        s_lut[c] = NF4 ? bnbcy_nf4_values[c]
                       : mul_ftz(bnbcy_fp4_magnitudes[c & 7u], 1.0f - (float)(2 * (int)(c >> 3)));
    }
    __syncthreads();
}

template <class Tr, bool NF4>
__device__ __forceinline__ void dequantize_4bit(const u8 *__restrict__ q, const float *__restrict__ absmax,
                                                typename Tr::storage *__restrict__ out, long long n,
                                                int log2_blocksize) {
    typedef typename Tr::storage S;
    constexpr int E = BNBCY_DQ4_ITEMS;
    __shared__ float s_lut[16];
    fill_lut4<NF4>(s_lut);

    const long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * E;
    if (base >= n) return;
    // blocksize >= 32 and base % 16 == 0: the 16 elements share one absmax
    const float s = absmax[base >> log2_blocksize];
    const u8 *qb = q + base / 2;
    if (base + E <= n && aligned8(qb) && aligned16(out + base)) {
        const uint2 w = __ldg(reinterpret_cast<const uint2 *>(qb));
        S y0[8], y1[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int sh = 8 * (e >> 1) + ((e & 1) ? 0 : 4);  // even element: high nibble
            y0[e] = Tr::from_float(mul_ftz(s_lut[(w.x >> sh) & 15u], s));
            y1[e] = Tr::from_float(mul_ftz(s_lut[(w.y >> sh) & 15u], s));
        }
        store8(out + base, y0);
        store8(out + base + 8, y1);
    } else {
#pragma unroll
        for (int e = 0; e < E; e++) {
            const long long i = base + e;
            if (i < n) {
                const u32 b = qb[e >> 1];
                const u32 c = (e & 1) ? (b & 15u) : (b >> 4);
                out[i] = Tr::from_float(mul_ftz(s_lut[c], s));
            }
        }
    }
}

// ----------------------------------------------------------------------------- gemv / gemm
__device__ __forceinline__ u32 u4_word(const uint4 &v, int j) {
    return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// 16 packed bytes (32 weights), as one 16-byte load when aligned, else byte by byte.
__device__ __forceinline__ uint4 load_b16(const u8 *__restrict__ p, bool vec) {
    if (vec) return __ldg(reinterpret_cast<const uint4 *>(p));
    u32 w[4];
#pragma unroll
    for (int j = 0; j < 4; j++)
        w[j] = (u32)p[4 * j] | ((u32)p[4 * j + 1] << 8) | ((u32)p[4 * j + 2] << 16) | ((u32)p[4 * j + 3] << 24);
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Eight consecutive elements of A as fp32 (16-byte loads when vec: p then 16-byte aligned).
template <class Tr>
__device__ __forceinline__ void load_a8(const typename Tr::storage *__restrict__ p, bool vec, float (&v)[8]) {
    typedef typename Tr::storage S;
    if (vec) {
        S raw[8];
        load8(p, raw);
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = Tr::to_float(raw[e]);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) v[e] = Tr::to_float(p[e]);
    }
}

// Weight e (0..31) of a 16-byte chunk: byte e/2, high nibble for even e.
__device__ __forceinline__ u32 nib(const uint4 &w, int e) {
    return (u4_word(w, e >> 3) >> (8 * ((e >> 1) & 3) + ((e & 1) ? 0 : 4))) & 15u;
}

// Sum R values per lane over the 32 lanes of a warp at once: after log2(R) halving exchanges
// and the remaining xor steps, every lane holds the total of row butterfly_row<R>(lane).
template <int R>
__device__ __forceinline__ float warp_sum_multi(float (&v)[R], int lane) {
    static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R must be a power of two <= 32");
#pragma unroll
    for (int h = R / 2, off = 16; h >= 1; h >>= 1, off >>= 1) {
        const bool up = (lane & off) != 0;
#pragma unroll
        for (int i = 0; i < h; i++) {
            const float send = up ? v[i] : v[i + h];
            const float keep = up ? v[i + h] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, off);
        }
    }
#pragma unroll
    for (int off = 16 / R; off >= 1; off >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], off);
    return v[0];
}

template <int R>
__device__ __forceinline__ int butterfly_row(int lane) {
    int row = 0;
#pragma unroll
    for (int h = R / 2, off = 16; h >= 1; h >>= 1, off >>= 1)
        if (lane & off) row += h;
    return row;
}

template <class Tr>
__device__ __forceinline__ void gemv_4bit(const typename Tr::storage *__restrict__ A, const u8 *__restrict__ B,
                                          const float *__restrict__ absmax, const float *__restrict__ code,
                                          const typename Tr::storage *__restrict__ bias,
                                          typename Tr::storage *__restrict__ out, int N, int K,
                                          int log2_blocksize) {
    constexpr int R = BNBCY_GEMV_ROWS;
    constexpr int T = BNBCY_GEMV_THREADS;
    constexpr int W = T / 32;
    __shared__ float s_code[16];
    __shared__ float s_red[W][R];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];
    __syncthreads();

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n0 = blockIdx.x * R;
    const int chunks = K >> 5;
    const bool vecA = aligned16(A);
    const bool vecB = aligned16(B);
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; r++) acc[r] = 0.0f;

    for (int c = threadIdx.x; c < chunks; c += T) {
        const int k = c << 5;
        // B and absmax of the 8 rows first, so that the loads are all in flight together
        uint4 w[R];
        float s[R];
#pragma unroll
        for (int r = 0; r < R; r++) {
            const int nr = n0 + r;
            if (nr < N) {
                const long long e = (long long)nr * K + k;
                w[r] = load_b16(B + (e >> 1), vecB);
                s[r] = __ldg(absmax + (e >> log2_blocksize));
            } else {
                w[r] = make_uint4(0u, 0u, 0u, 0u);
                s[r] = 0.0f;
            }
        }
        float a[32];
#pragma unroll
        for (int j = 0; j < 4; j++) {
            float v[8];
            load_a8<Tr>(A + k + 8 * j, vecA, v);
#pragma unroll
            for (int e = 0; e < 8; e++) a[8 * j + e] = v[e];
        }
#pragma unroll
        for (int r = 0; r < R; r++) {
            float p = 0.0f;
#pragma unroll
            for (int e = 0; e < 32; e++) p = __fmaf_rn(a[e], s_code[nib(w[r], e)], p);
            acc[r] = __fmaf_rn(p, s[r], acc[r]);
        }
    }

    const float total = warp_sum_multi<R>(acc, lane);
    if ((lane & (32 / R - 1)) == 0) s_red[warp][butterfly_row<R>(lane)] = total;
    __syncthreads();
    if (threadIdx.x < R) {
        const int nr = n0 + threadIdx.x;
        if (nr < N) {
            float y = s_red[0][threadIdx.x];
#pragma unroll
            for (int j = 1; j < W; j++) y += s_red[j][threadIdx.x];
            if (bias != nullptr) y += Tr::to_float(bias[nr]);
            out[nr] = Tr::from_float(y);
        }
    }
}

template <class Tr, int MT, int RL, int WARPS>
__device__ __forceinline__ void gemm_4bit_small(const typename Tr::storage *__restrict__ A,
                                                const u8 *__restrict__ B, const float *__restrict__ absmax,
                                                const float *__restrict__ code,
                                                const typename Tr::storage *__restrict__ bias,
                                                typename Tr::storage *__restrict__ out, int M, int N, int K,
                                                int log2_blocksize) {
    constexpr int THREADS = 32 * WARPS;
    constexpr int KG = 4 * WARPS;        // k-groups per block
    constexpr int TILE_K = 32 * KG;      // weights of a row per K-tile
    constexpr int CS = 36;               // floats per 32-k chunk in shared memory (4 pad)
    constexpr int ROWS = 8 * RL;         // rows of W per block
    constexpr int A_FLOATS = MT * KG * CS;
    constexpr int RED_FLOATS = KG * MT * ROWS;
    constexpr int SMEM = A_FLOATS > RED_FLOATS ? A_FLOATS : RED_FLOATS;
    __shared__ __align__(16) float s_buf[SMEM];
    __shared__ float s_code[16];
    if (threadIdx.x < 16) s_code[threadIdx.x] = code[threadIdx.x];  // visible after the first barrier

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int rl = lane & 7;                   // row-lane
    const int g = warp * 4 + (lane >> 3);      // k-group
    const int n0 = blockIdx.x * ROWS;
    const int nchunks = K >> 5;
    const bool vecA = aligned16(A);
    const bool vecB = aligned16(B);

    float acc[RL][MT];
#pragma unroll
    for (int i = 0; i < RL; i++)
#pragma unroll
        for (int m = 0; m < MT; m++) acc[i][m] = 0.0f;

    // this thread's chunk of a tile: c = k0/32 + g, rows n0 + rl + 8i
    uint4 wc[RL];
    float sc[RL];
#pragma unroll
    for (int i = 0; i < RL; i++) {
        const int nr = n0 + rl + 8 * i;
        const int c = g;
        if (c < nchunks && nr < N) {
            const long long e = (long long)nr * K + ((long long)c << 5);
            wc[i] = load_b16(B + (e >> 1), vecB);
            sc[i] = __ldg(absmax + (e >> log2_blocksize));
        } else {
            wc[i] = make_uint4(0u, 0u, 0u, 0u);
            sc[i] = 0.0f;
        }
    }

    for (int k0 = 0; k0 < K; k0 += TILE_K) {
        // prefetch the next tile's weights (in flight while A is staged and this tile computed)
        uint4 wn[RL];
        float sn[RL];
        const int cn = ((k0 + TILE_K) >> 5) + g;
#pragma unroll
        for (int i = 0; i < RL; i++) {
            const int nr = n0 + rl + 8 * i;
            if (k0 + TILE_K < K && cn < nchunks && nr < N) {
                const long long e = (long long)nr * K + ((long long)cn << 5);
                wn[i] = load_b16(B + (e >> 1), vecB);
                sn[i] = __ldg(absmax + (e >> log2_blocksize));
            } else {
                wn[i] = make_uint4(0u, 0u, 0u, 0u);
                sn[i] = 0.0f;
            }
        }

        __syncthreads();  // the previous tile's readers are done
        // stage A[0:MT, k0:k0+TILE_K) as fp32; rows >= M and columns >= K are zero
        for (int idx = threadIdx.x; idx < MT * (TILE_K / 8); idx += THREADS) {
            const int m = idx / (TILE_K / 8);
            const int kk = (idx % (TILE_K / 8)) * 8;
            float v[8];
            if (m < M && k0 + kk < K) {  // K % 32 == 0: all 8 are inside the row
                load_a8<Tr>(A + (long long)m * K + (k0 + kk), vecA, v);
            } else {
#pragma unroll
                for (int e = 0; e < 8; e++) v[e] = 0.0f;
            }
            float4 *dst = reinterpret_cast<float4 *>(s_buf + m * (KG * CS) + (kk >> 5) * CS + (kk & 31));
            dst[0] = make_float4(v[0], v[1], v[2], v[3]);
            dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        }
        __syncthreads();

        if ((k0 >> 5) + g < nchunks) {
            const float *a_base = s_buf + g * CS;
#pragma unroll
            for (int q = 0; q < 8; q++) {  // weights 4q .. 4q+3 of the chunk
                float4 a4[MT];
#pragma unroll
                for (int m = 0; m < MT; m++)
                    a4[m] = *reinterpret_cast<const float4 *>(a_base + m * (KG * CS) + 4 * q);
#pragma unroll
                for (int i = 0; i < RL; i++) {
                    const float w0 = s_code[nib(wc[i], 4 * q)] * sc[i];
                    const float w1 = s_code[nib(wc[i], 4 * q + 1)] * sc[i];
                    const float w2 = s_code[nib(wc[i], 4 * q + 2)] * sc[i];
                    const float w3 = s_code[nib(wc[i], 4 * q + 3)] * sc[i];
#pragma unroll
                    for (int m = 0; m < MT; m++) {
                        float t = acc[i][m];
                        t = __fmaf_rn(a4[m].x, w0, t);
                        t = __fmaf_rn(a4[m].y, w1, t);
                        t = __fmaf_rn(a4[m].z, w2, t);
                        t = __fmaf_rn(a4[m].w, w3, t);
                        acc[i][m] = t;
                    }
                }
            }
        }
#pragma unroll
        for (int i = 0; i < RL; i++) {
            wc[i] = wn[i];
            sc[i] = sn[i];
        }
    }

    // reduce over the k-groups: s_buf[(g * MT + m) * ROWS + row]
    __syncthreads();
#pragma unroll
    for (int i = 0; i < RL; i++)
#pragma unroll
        for (int m = 0; m < MT; m++) s_buf[(g * MT + m) * ROWS + rl + 8 * i] = acc[i][m];
    __syncthreads();
    for (int t = threadIdx.x; t < MT * ROWS; t += THREADS) {
        const int m = t / ROWS, row = t % ROWS;
        const int nr = n0 + row;
        if (m < M && nr < N) {
            float y = s_buf[m * ROWS + row];
            for (int gg = 1; gg < KG; gg++) y += s_buf[(gg * MT + m) * ROWS + row];
            if (bias != nullptr) y += Tr::to_float(bias[nr]);
            out[(long long)m * N + nr] = Tr::from_float(y);
        }
    }
}

// ------------------------------------------------------------------------------------ exports
#define BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, BS)                                                    \
    extern "C" __global__ void __launch_bounds__(512) bnbcy_quantize_4bit_##QT##_##NAME##_##BS(   \
        const TR::storage *__restrict__ A, u8 *__restrict__ out, float *__restrict__ absmax,     \
        long long n) {                                                                           \
        quantize_4bit<TR, BS, ISNF4>(A, out, absmax, n);                                         \
    }

#define BNBCY_Q4_QUANT_ALL_BS(TR, NAME, QT, ISNF4) \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 32)        \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 64)        \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 128)       \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 256)       \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 512)       \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 1024)      \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 2048)      \
    BNBCY_Q4_QUANT(TR, NAME, QT, ISNF4, 4096)

#define BNBCY_Q4_DEQUANT(TR, NAME, QT, ISNF4)                                                       \
    extern "C" __global__ void __launch_bounds__(BNBCY_DQ4_THREADS) bnbcy_dequantize_4bit_##QT##_##NAME( \
        const u8 *__restrict__ q, const float *__restrict__ absmax, TR::storage *__restrict__ out,    \
        long long n, int log2_blocksize) {                                                          \
        dequantize_4bit<TR, ISNF4>(q, absmax, out, n, log2_blocksize);                              \
    }

#define BNBCY_GEMV4(TR, NAME)                                                                        \
    extern "C" __global__ void __launch_bounds__(BNBCY_GEMV_THREADS) bnbcy_gemv_4bit_##NAME(          \
        const TR::storage *__restrict__ A, const u8 *__restrict__ B, const float *__restrict__ absmax, \
        const float *__restrict__ code, const TR::storage *__restrict__ bias,                         \
        TR::storage *__restrict__ out, int N, int K, int log2_blocksize) {                           \
        gemv_4bit<TR>(A, B, absmax, code, bias, out, N, K, log2_blocksize);                          \
    }

#define BNBCY_GEMM4_SMALL(TR, NAME, MT, RL, WARPS)                                                   \
    extern "C" __global__ void __launch_bounds__(32 * WARPS) bnbcy_gemm_4bit_small_##NAME##_##MT(     \
        const TR::storage *__restrict__ A, const u8 *__restrict__ B, const float *__restrict__ absmax, \
        const float *__restrict__ code, const TR::storage *__restrict__ bias,                         \
        TR::storage *__restrict__ out, int M, int N, int K, int log2_blocksize) {                    \
        gemm_4bit_small<TR, MT, RL, WARPS>(A, B, absmax, code, bias, out, M, N, K, log2_blocksize);  \
    }

#define BNBCY_FOURBIT_DTYPE(TR, NAME)             \
    BNBCY_Q4_QUANT_ALL_BS(TR, NAME, nf4, true)    \
    BNBCY_Q4_QUANT_ALL_BS(TR, NAME, fp4, false)   \
    BNBCY_Q4_DEQUANT(TR, NAME, nf4, true)         \
    BNBCY_Q4_DEQUANT(TR, NAME, fp4, false)        \
    BNBCY_GEMV4(TR, NAME)                         \
    BNBCY_GEMM4_SMALL(TR, NAME, 4, 4, 8)          \
    BNBCY_GEMM4_SMALL(TR, NAME, 8, 4, 8)          \
    BNBCY_GEMM4_SMALL(TR, NAME, 16, 2, 4)

BNBCY_FOURBIT_DTYPE(f32_t, f32)
BNBCY_FOURBIT_DTYPE(f16_t, f16)
BNBCY_FOURBIT_DTYPE(bf16_t, bf16)
