// LLM.int8 kernels (NUMERICS.md §5): outlier columns, row-wise (vector-wise) int8 quantization,
// int32 -> float dequantization of matmul results, and the int8 x int8 -> int32 GEMM.
//
// Exported kernels (launch geometry computed by bnbcy/functional/_int8_cuda.py):
//   bnbcy_int8_outlier_cols_{f16,bf16,f32}(A, flags, rows, cols, threshold)
//       flags[c] = 1 when some |A[r, c]| >= T(threshold), compared in T (for fp16 as torch's
//       `A.abs() >= threshold`, i.e. half(|a|) >= half(threshold)); NaN never flags. flags is
//       pre-zeroed by the caller; only 1s are written (benign identical-value races).
//       blockDim = 256, grid = (ceil(cols / 256), min(rows, 1024)); thread = one column, rows
//       strided by gridDim.y.
//   bnbcy_int8_vectorwise_quant_{f16,bf16,f32}(A, CA, row_stats, col_flags, rows, cols, threshold)
//       As bitsandbytes' kInt8VectorQuant: row_stats[r] = max |a| (in T, NaN dropped, start -0.0)
//       over the row, or over the elements with |a| < T(threshold) when threshold > 0;
//       scale = div.approx.ftz(127, row_stats[r]); CA = int8(cvt.rni.ftz.s32(a * scale))
//       (mul.rn.ftz; the int -> int8 cast keeps the low byte, as bnb's store). threshold > 0:
//       elements with !(|a| < threshold) (float compare) -> 0. col_flags != NULL: every element
//       of a flagged column -> 0 (the caller passes flags only when rows > 1, as bnb).
//       blockDim = 256. cols <= BNBCY_I8_WARP_ROW_MAX_COLS: one warp per row, 8 rows per block,
//       grid = ceil(rows / 8); otherwise one block per row, grid = rows.
//   bnbcy_int8_mm_dequant_{f16,bf16,f32}(A, row_stats, col_stats, bias, out, rows, cols)
//       out = T(fma.rn.ftz(fl32(fl32(float(A) * row[r]) * col[c]), 0x38820610, bias[c] or 0)); bias is
//       float32 whatever T (the launcher widens an fp16/bf16 bias, exactly)
//       (bnb's kdequant_mm_int32_fp16). blockDim = 256, 8 outputs per thread,
//       grid = ceil(rows * cols / 2048).
//   bnbcy_int8_gemm_mma(A, B, C, M, N, K)     C[M, N] = A[M, K] @ B[N, K]^T, int32, exact.
//       sm_80+: tensor cores (mma.sync m16n8k32 s8), CTA tile 128x128x64, 8 warps (2 x 4, warp
//       tile 64x32), 3-stage cp.async pipeline (48 KB static shared memory), ldmatrix.x4 from
//       an XOR-swizzled layout (conflict-free). cp.async needs K % 16 == 0 and 16-byte aligned
//       A, B; otherwise the same pipeline stages the tiles through registers (4-byte or byte
//       loads). Tails (M, N, K) are zero-filled in shared memory.
//       sm_75: the same symbol runs a dp4a tile of 128x128 (8x8 outputs per thread).
//       blockDim = 256, grid = (ceil(N / 128), ceil(M / 128)).
//   bnbcy_int8_gemm_dp4a(A, B, C, M, N, K)    the same product with dp4a only (any arch >= 6.1):
//       tile 64x64x32, 4x4 outputs per thread. blockDim = 256, grid = (ceil(N / 64), ceil(M / 64)).
// Integer results wrap modulo 2^32 (exact whenever |C| < 2^31, i.e. K < 131072 for any input).
#include "bnbcy_common.cuh"

#define BNBCY_I8_THREADS 256
#define BNBCY_I8_WARP_ROW_MAX_COLS 1024

typedef signed char s8;

// ------------------------------------------------------------------------------ element helpers
// A float32 threshold rounded to T and widened back (the compare "in T").
template <class Tr>
__device__ __forceinline__ float round_to_T(float x) {
    return Tr::to_float(Tr::from_float(x));
}

// --------------------------------------------------------------------------------- outlier cols
template <class Tr>
__device__ __forceinline__ void int8_outlier_cols(const typename Tr::storage *__restrict__ A, u8 *__restrict__ flags,
                                                  long long rows, int cols, float threshold) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    const float t = round_to_T<Tr>(threshold);
    for (long long r = blockIdx.y; r < rows; r += gridDim.y) {
        if (abs_exact(Tr::to_float(A[r * cols + c])) >= t) {
            flags[c] = 1;
            return;
        }
    }
}

// --------------------------------------------------------------------------- vectorwise quant
struct RowMax {
    float m;
    bool sparse;
    float t;  // T(threshold)
    __device__ __forceinline__ void add(float x) {
        const float a = abs_ftz(x);
        // bnb: fmaxf(m, |a| < T(threshold) ? |a| : m); NaN is dropped either way
        if (!sparse || a < t) m = max_ftz(m, a);
    }
};

struct RowQuant {
    float scale;
    bool sparse;
    float threshold;
    __device__ __forceinline__ u32 code(float x, bool flagged) const {
        if (flagged) return 0u;
        if (sparse && !(abs_ftz(x) < threshold)) return 0u;
        return (u32)f2i_rni(mul_ftz(x, scale)) & 0xffu;
    }
};

template <class Tr>
__device__ __forceinline__ void int8_vectorwise_quant(const typename Tr::storage *__restrict__ A, s8 *__restrict__ CA,
                                                      float *__restrict__ row_stats, const u8 *__restrict__ col_flags,
                                                      long long rows, int cols, float threshold) {
    typedef typename Tr::storage S;
    constexpr int T = BNBCY_I8_THREADS;
    constexpr int WARPS = T / 32;
    __shared__ float s_max[WARPS];

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const bool warp_rows = cols <= BNBCY_I8_WARP_ROW_MAX_COLS;  // uniform over the grid
    long long r;
    int t0, nt;
    if (warp_rows) {
        r = (long long)blockIdx.x * WARPS + warp;
        t0 = lane;
        nt = 32;
        if (r >= rows) return;  // no block-wide barrier in this mode
    } else {
        r = blockIdx.x;
        t0 = threadIdx.x;
        nt = T;
    }

    const S *__restrict__ row = A + r * cols;
    // 8-element chunks through 16-byte loads when every row start is 16-byte aligned
    const bool vec = ((long long)cols * (long long)sizeof(S)) % 16 == 0 && aligned16(A);
    const int nvec = vec ? cols / 8 : 0;

    RowMax rm;
    rm.m = -0.0f;  // bnb: TReduction(-FLT_MIN), which is -0.0 in half
    rm.sparse = threshold > 0.0f;
    rm.t = round_to_T<Tr>(threshold);
    for (int j = t0; j < nvec; j += nt) {
        S raw[8];
        load8(row + 8 * j, raw);
#pragma unroll
        for (int e = 0; e < 8; e++) rm.add(Tr::to_float(raw[e]));
    }
    for (int c = nvec * 8 + t0; c < cols; c += nt) rm.add(Tr::to_float(row[c]));

    float m = rm.m;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = max_ftz(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (!warp_rows) {
        if (lane == 0) s_max[warp] = m;
        __syncthreads();
        m = s_max[0];
#pragma unroll
        for (int w = 1; w < WARPS; w++) m = max_ftz(m, s_max[w]);
    }
    if (t0 == 0) row_stats[r] = m;

    RowQuant rq;
    rq.scale = div_approx(127.0f, m);
    rq.sparse = rm.sparse;
    rq.threshold = threshold;
    s8 *__restrict__ orow = CA + r * cols;
    const bool vec_out = vec && cols % 8 == 0 && aligned8(CA);
    const bool vec_flags = col_flags != nullptr && cols % 8 == 0 && aligned8(col_flags);
    for (int j = t0; j < nvec; j += nt) {
        S raw[8];
        load8(row + 8 * j, raw);
        u32 fl[2] = {0u, 0u};
        if (vec_flags) {
            const uint2 f = __ldg(reinterpret_cast<const uint2 *>(col_flags + 8 * j));
            fl[0] = f.x;
            fl[1] = f.y;
        } else if (col_flags != nullptr) {
#pragma unroll
            for (int e = 0; e < 8; e++) fl[e >> 2] |= (u32)(col_flags[8 * j + e] != 0) << (8 * (e & 3));
        }
        u32 w[2] = {0u, 0u};
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const bool flagged = ((fl[e >> 2] >> (8 * (e & 3))) & 0xffu) != 0u;
            w[e >> 2] |= rq.code(Tr::to_float(raw[e]), flagged) << (8 * (e & 3));
        }
        if (vec_out) {
            *reinterpret_cast<uint2 *>(orow + 8 * j) = make_uint2(w[0], w[1]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) orow[8 * j + e] = (s8)(u8)(w[e >> 2] >> (8 * (e & 3)));
        }
    }
    for (int c = nvec * 8 + t0; c < cols; c += nt) {
        const bool flagged = col_flags != nullptr && col_flags[c] != 0;
        orow[c] = (s8)(u8)rq.code(Tr::to_float(row[c]), flagged);
    }
}

// ---------------------------------------------------------------------------------- mm_dequant
template <class Tr>
__device__ __forceinline__ float dequant_one(int a, float rs, float cs, float b) {
    const float c = __uint_as_float(0x38820610u);  // 6.200012e-05f = fl32(1/127^2), bnb's MM_DEQUANT_CONST
    return fma_ftz(mul_ftz(mul_ftz((float)a, rs), cs), c, b);
}

template <class Tr>
__device__ __forceinline__ void int8_mm_dequant(const int *__restrict__ A, const float *__restrict__ row_stats,
                                                const float *__restrict__ col_stats,
                                                const float *__restrict__ bias,
                                                typename Tr::storage *__restrict__ out, long long rows, int cols) {
    typedef typename Tr::storage S;
    const long long n = rows * cols;
    const long long base = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 8;
    if (base >= n) return;
    const bool vec = cols % 8 == 0 && aligned16(A) && aligned16(out) && aligned16(col_stats) &&
                     (bias == nullptr || aligned16(bias));
    if (vec) {
        // cols % 8 == 0: the 8 elements lie in one row and base + 8 <= n
        const long long r = base / cols;
        const int c = (int)(base - r * cols);
        const int4 a0 = __ldg(reinterpret_cast<const int4 *>(A + base));
        const int4 a1 = __ldg(reinterpret_cast<const int4 *>(A + base) + 1);
        const int a[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
        const float rs = __ldg(row_stats + r);
        float cs[8];
        load8(col_stats + c, cs);
        float b[8];
        if (bias != nullptr) {
            load8(bias + c, b);
        } else {
#pragma unroll
            for (int e = 0; e < 8; e++) b[e] = 0.0f;
        }
        S y[8];
#pragma unroll
        for (int e = 0; e < 8; e++) y[e] = Tr::from_float(dequant_one<Tr>(a[e], rs, cs[e], b[e]));
        store8(out + base, y);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const long long i = base + e;
            if (i < n) {
                const long long r = i / cols;
                const int c = (int)(i - r * cols);
                const float b = bias != nullptr ? bias[c] : 0.0f;
                out[i] = Tr::from_float(dequant_one<Tr>(A[i], row_stats[r], col_stats[c], b));
            }
        }
    }
}

// ------------------------------------------------------------------------------- GEMM helpers
// Inline-PTX helpers are guarded: bnbcy's SIMT emulator (bnbcy/_emulator/cuda_emu.h) defines them.
#ifndef BNBCY_EMULATOR
__device__ __forceinline__ int dp4a_s32(u32 a, u32 b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#endif

__device__ __forceinline__ bool aligned4(const void *p) {
    return (reinterpret_cast<u64>(p) & 3u) == 0;
}

// Bytes k .. k+3 of row `row` of the row-major [nrows, K] int8 matrix P as one little-endian
// word; bytes past K and rows past nrows read as 0. words: K % 4 == 0 and P 4-byte aligned.
__device__ __forceinline__ u32 load_word_or_zero(const s8 *__restrict__ P, int row, int nrows, int K, int k,
                                                 bool words) {
    if (row >= nrows || k >= K) return 0u;
    const s8 *p = P + (long long)row * K + k;
    if (words) return __ldg(reinterpret_cast<const unsigned int *>(p));
    u32 w = 0u;
#pragma unroll
    for (int b = 0; b < 4; b++)
        if (k + b < K) w |= (u32)(u8)p[b] << (8 * b);
    return w;
}

// dp4a GEMM of one BM x BN tile of C at (bm0, bn0). blockDim = (BM/TM)*(BN/TN). Shared memory
// holds K-major 4-byte words, sA[w][m] = A[bm0+m, k0+4w .. +3] (rows padded by 4 words: the
// transposing stores are conflict-free, the 16-byte reads aligned). Thread (ty, tx) owns rows
// g*4*TY + 4*ty + e and columns g*4*TX + 4*tx + e (conflict-free 16-byte reads).
template <int BM, int BN, int BK, int TM, int TN>
__device__ __forceinline__ void gemm_dp4a_tile(const s8 *__restrict__ A, const s8 *__restrict__ B, int *__restrict__ C,
                                               int M, int N, int K, int bm0, int bn0) {
    constexpr int TX = BN / TN, TY = BM / TM;
    constexpr int THREADS = TX * TY;
    constexpr int KW = BK / 4;
    static_assert(TM % 4 == 0 && TN % 4 == 0 && BK % 4 == 0, "4-wide micro tiles");
    static_assert(BM % 32 == 0 && BN % 32 == 0, "row padding of 4 words keeps the stores conflict-free");
    __shared__ __align__(16) u32 sA[KW][BM + 4];
    __shared__ __align__(16) u32 sB[KW][BN + 4];

    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const bool words = K % 4 == 0 && aligned4(A) && aligned4(B);

    int acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; i++)
#pragma unroll
        for (int j = 0; j < TN; j++) acc[i][j] = 0;

    for (int k0 = 0; k0 < K; k0 += BK) {
        for (int idx = tid; idx < BM * KW; idx += THREADS) {
            const int m = idx / KW, w = idx % KW;
            sA[w][m] = load_word_or_zero(A, bm0 + m, M, K, k0 + 4 * w, words);
        }
        for (int idx = tid; idx < BN * KW; idx += THREADS) {
            const int n = idx / KW, w = idx % KW;
            sB[w][n] = load_word_or_zero(B, bn0 + n, N, K, k0 + 4 * w, words);
        }
        __syncthreads();
#pragma unroll
        for (int w = 0; w < KW; w++) {
            u32 a[TM], b[TN];
#pragma unroll
            for (int g = 0; g < TM / 4; g++) {
                const uint4 v = *reinterpret_cast<const uint4 *>(&sA[w][g * 4 * TY + 4 * ty]);
                a[4 * g] = v.x; a[4 * g + 1] = v.y; a[4 * g + 2] = v.z; a[4 * g + 3] = v.w;
            }
#pragma unroll
            for (int g = 0; g < TN / 4; g++) {
                const uint4 v = *reinterpret_cast<const uint4 *>(&sB[w][g * 4 * TX + 4 * tx]);
                b[4 * g] = v.x; b[4 * g + 1] = v.y; b[4 * g + 2] = v.z; b[4 * g + 3] = v.w;
            }
#pragma unroll
            for (int i = 0; i < TM; i++)
#pragma unroll
                for (int j = 0; j < TN; j++) acc[i][j] = dp4a_s32(a[i], b[j], acc[i][j]);
        }
        __syncthreads();
    }

    const bool vec_c = N % 4 == 0 && aligned16(C);
#pragma unroll
    for (int i = 0; i < TM; i++) {
        const int row = bm0 + (i / 4) * 4 * TY + 4 * ty + (i % 4);
        if (row >= M) continue;
        int *crow = C + (long long)row * N;
#pragma unroll
        for (int g = 0; g < TN / 4; g++) {
            const int col = bn0 + g * 4 * TX + 4 * tx;
            if (vec_c && col + 3 < N) {
                *reinterpret_cast<int4 *>(crow + col) =
                    make_int4(acc[i][4 * g], acc[i][4 * g + 1], acc[i][4 * g + 2], acc[i][4 * g + 3]);
            } else {
#pragma unroll
                for (int e = 0; e < 4; e++)
                    if (col + e < N) crow[col + e] = acc[i][4 * g + e];
            }
        }
    }
}

#if __CUDA_ARCH__ >= 800
// ------------------------------------------------------------------ tensor-core (sm_80+) pieces
#ifndef BNBCY_EMULATOR
__device__ __forceinline__ u32 smem_u32(const void *p) {
    u32 r;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
    return r;
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 writes 16 zero bytes (reads nothing).
__device__ __forceinline__ void cp_async16(u32 dst, const void *src, u32 src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 (&r)[4], u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// D = A(16x32, row) * B(32x8, col) + D, s8 inputs, s32 accumulators (wrapping, exact).
__device__ __forceinline__ void mma_s8_16832(int (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // BNBCY_EMULATOR

#define BNBCY_MMA_BM 128
#define BNBCY_MMA_BN 128
#define BNBCY_MMA_BK 64
#define BNBCY_MMA_STAGES 3

// Byte offset of 16-byte chunk ch (0..3) of tile row `row` (64 bytes per row): the chunk index
// is XORed with (row >> 1) & 3, so the 8 rows an ldmatrix (or 8 consecutive cp.async threads)
// touch cover all 32 banks.
__device__ __forceinline__ u32 swz(int row, int ch) {
    return (u32)(row * 64 + 16 * (ch ^ ((row >> 1) & 3)));
}

// 16 bytes (k .. k+15) of row `row` of P through registers, zero past K / nrows.
__device__ __forceinline__ uint4 load16_or_zero(const s8 *__restrict__ P, int row, int nrows, int K, int k,
                                                bool words) {
    return make_uint4(load_word_or_zero(P, row, nrows, K, k, words), load_word_or_zero(P, row, nrows, K, k + 4, words),
                      load_word_or_zero(P, row, nrows, K, k + 8, words),
                      load_word_or_zero(P, row, nrows, K, k + 12, words));
}

__device__ __forceinline__ void gemm_mma_sm80(const s8 *__restrict__ A, const s8 *__restrict__ B, int *__restrict__ C,
                                              int M, int N, int K) {
    constexpr int BM = BNBCY_MMA_BM, BN = BNBCY_MMA_BN, BK = BNBCY_MMA_BK, STAGES = BNBCY_MMA_STAGES;
    constexpr int A_BYTES = BM * BK, STAGE_BYTES = (BM + BN) * BK;
    static_assert(BK == 64, "swz() assumes 64-byte tile rows");
    static_assert(STAGES * STAGE_BYTES <= 48 * 1024, "static shared memory limit");
    __shared__ __align__(128) u8 smem[STAGES * STAGE_BYTES];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, warp tile 64 x 32
    const int bm0 = blockIdx.y * BM, bn0 = blockIdx.x * BN;
    const u32 s_base = smem_u32(smem);
    // cp.async moves whole 16-byte chunks: every chunk must be 16-byte aligned and inside or outside K
    const bool async = K % 16 == 0 && aligned16(A) && aligned16(B);
    const bool words = K % 4 == 0 && aligned4(A) && aligned4(B);
    const int KT = (K + BK - 1) / BK;

    // thread -> chunks (row tid/4 + 64i, chunk tid%4), i = 0, 1, of the A and of the B tile
    auto load_tile = [&](int stage, int kt) {
        const int k = kt * BK + 16 * (tid & 3);
        const u32 sa = s_base + stage * STAGE_BYTES, sb = sa + A_BYTES;
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const int row = (tid >> 2) + 64 * i;
            const u32 off = swz(row, tid & 3);
            const int gm = bm0 + row, gn = bn0 + row;
            if (async) {
                const bool va = gm < M && k < K, vb = gn < N && k < K;
                cp_async16(sa + off, va ? (const void *)(A + (long long)gm * K + k) : (const void *)A, va ? 16u : 0u);
                cp_async16(sb + off, vb ? (const void *)(B + (long long)gn * K + k) : (const void *)B, vb ? 16u : 0u);
            } else {
                *reinterpret_cast<uint4 *>(smem + stage * STAGE_BYTES + off) = load16_or_zero(A, gm, M, K, k, words);
                *reinterpret_cast<uint4 *>(smem + stage * STAGE_BYTES + A_BYTES + off) =
                    load16_or_zero(B, gn, N, K, k, words);
            }
        }
    };

    int acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; i++)
#pragma unroll
        for (int j = 0; j < 4; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) acc[i][j][e] = 0;

#pragma unroll
    for (int s = 0; s < STAGES - 1; s++) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();
    }

    // ldmatrix lane roles: lanes 8j..8j+7 address the 8 rows of matrix j
    const int lrow = lane & 7, lmat = lane >> 3;
    for (int kt = 0; kt < KT; kt++) {
        cp_async_wait<STAGES - 2>();  // this thread's copies of tile kt have landed
        __syncthreads();              // everyone's have; everyone is done with tile kt - 1
        {
            const int nk = kt + STAGES - 1;
            if (nk < KT) load_tile(nk % STAGES, nk);  // into the stage tile kt - 1 used
            cp_async_commit();
        }
        const u32 sa = s_base + (kt % STAGES) * STAGE_BYTES, sb = sa + A_BYTES;
#pragma unroll
        for (int ks = 0; ks < BK / 32; ks++) {
            u32 af[4][4], bf[4][2];
            // A: matrices (rows 0-7, k 0-15), (rows 8-15, k 0-15), (rows 0-7, k 16-31), (rows 8-15, k 16-31)
            //    = fragment registers a0..a3 of m16n8k32
#pragma unroll
            for (int mi = 0; mi < 4; mi++) {
                const int row = wm * 64 + mi * 16 + (lmat & 1) * 8 + lrow;
                ldmatrix_x4(af[mi], sa + swz(row, 2 * ks + (lmat >> 1)));
            }
            // B (stored [n][k]): matrices (n 0-7, k 0-15), (n 0-7, k 16-31), (n 8-15, k 0-15),
            //    (n 8-15, k 16-31) = b0, b1 of n-tile 2p and b0, b1 of n-tile 2p+1
#pragma unroll
            for (int p = 0; p < 2; p++) {
                const int row = wn * 32 + p * 16 + (lmat >> 1) * 8 + lrow;
                u32 r[4];
                ldmatrix_x4(r, sb + swz(row, 2 * ks + (lmat & 1)));
                bf[2 * p][0] = r[0];
                bf[2 * p][1] = r[1];
                bf[2 * p + 1][0] = r[2];
                bf[2 * p + 1][1] = r[3];
            }
#pragma unroll
            for (int mi = 0; mi < 4; mi++)
#pragma unroll
                for (int ni = 0; ni < 4; ni++) mma_s8_16832(acc[mi][ni], af[mi], bf[ni]);
        }
    }
    cp_async_wait<0>();

    // accumulator (mi, ni): d0, d1 at (row g, cols 2t, 2t+1), d2, d3 at (row g+8, same cols)
    const bool vec_c = N % 2 == 0 && aligned8(C);
#pragma unroll
    for (int mi = 0; mi < 4; mi++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int row = bm0 + wm * 64 + mi * 16 + (lane >> 2) + 8 * h;
            if (row >= M) continue;
            int *crow = C + (long long)row * N;
#pragma unroll
            for (int ni = 0; ni < 4; ni++) {
                const int col = bn0 + wn * 32 + ni * 8 + 2 * (lane & 3);
                const int v0 = acc[mi][ni][2 * h], v1 = acc[mi][ni][2 * h + 1];
                if (vec_c && col + 1 < N) {
                    *reinterpret_cast<int2 *>(crow + col) = make_int2(v0, v1);
                } else {
                    if (col < N) crow[col] = v0;
                    if (col + 1 < N) crow[col + 1] = v1;
                }
            }
        }
    }
}
#endif  // __CUDA_ARCH__ >= 800

// ------------------------------------------------------------------------------------- exports
#define BNBCY_INT8_ELEMWISE(SUF, TR)                                                                           \
    extern "C" __global__ void __launch_bounds__(BNBCY_I8_THREADS) bnbcy_int8_outlier_cols_##SUF(              \
        const TR::storage *__restrict__ A, u8 *__restrict__ flags, long long rows, int cols, float threshold) { \
        int8_outlier_cols<TR>(A, flags, rows, cols, threshold);                                                 \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(BNBCY_I8_THREADS) bnbcy_int8_vectorwise_quant_##SUF(          \
        const TR::storage *__restrict__ A, s8 *__restrict__ CA, float *__restrict__ row_stats,                  \
        const u8 *__restrict__ col_flags, long long rows, int cols, float threshold) {                          \
        int8_vectorwise_quant<TR>(A, CA, row_stats, col_flags, rows, cols, threshold);                          \
    }                                                                                                           \
    extern "C" __global__ void __launch_bounds__(BNBCY_I8_THREADS) bnbcy_int8_mm_dequant_##SUF(                \
        const int *__restrict__ A, const float *__restrict__ row_stats, const float *__restrict__ col_stats,    \
        const float *__restrict__ bias, TR::storage *__restrict__ out, long long rows, int cols) {              \
        int8_mm_dequant<TR>(A, row_stats, col_stats, bias, out, rows, cols);                                    \
    }

BNBCY_INT8_ELEMWISE(f16, f16_t)
BNBCY_INT8_ELEMWISE(bf16, bf16_t)
BNBCY_INT8_ELEMWISE(f32, f32_t)

extern "C" __global__ void __launch_bounds__(256) bnbcy_int8_gemm_mma(const s8 *__restrict__ A,
                                                                     const s8 *__restrict__ B, int *__restrict__ C,
                                                                     int M, int N, int K) {
#if __CUDA_ARCH__ >= 800
    gemm_mma_sm80(A, B, C, M, N, K);
#else
    gemm_dp4a_tile<128, 128, 32, 8, 8>(A, B, C, M, N, K, blockIdx.y * 128, blockIdx.x * 128);
#endif
}

extern "C" __global__ void __launch_bounds__(256) bnbcy_int8_gemm_dp4a(const s8 *__restrict__ A,
                                                                      const s8 *__restrict__ B, int *__restrict__ C,
                                                                      int M, int N, int K) {
    gemm_dp4a_tile<64, 64, 32, 4, 4>(A, B, C, M, N, K, blockIdx.y * 64, blockIdx.x * 64);
}
