// Multi-tensor optimizer updates (NUMERICS.md §6.3-§6.6, with the fixes of §10).
//
// One launch updates every tensor of a parameter group. The launcher
// (bnbcy/functional/_optim_cuda.py) uploads a TABLE of int64 words, one ROW of
// BNBCY_OPT_ROW = 16 words per tensor, rows sorted by FIRST:
//
//   word  content
//   0     p        T*      parameter (updated in place)
//   1     g        T*      gradient
//   2     state1   float* (32-bit) / u8* (8-bit); AdEMAMix: [2, n] (m1 then m2)
//   3     state2   float* / u8*, or 0 (1-state optimizers)
//   4     absmax1  float*  8-bit: [nblocks] (AdEMAMix: [2, nblocks], m2 at absmax1[nblocks + b])
//   5     absmax2  float*  8-bit 2-state: [nblocks]
//   6     unorm    float*  float32[1] slot of the update norm (max_unorm > 0), or 0
//   7     pnorm    float*  device float32 param_norm, or 0 (then word 15 hi is used)
//   8     n        int64   elements of the tensor (> 0)
//   9     first    int64   index of the tensor's first CHUNK in the launch's chunk numbering
//   10    lo: step (int32, first update = 1)   hi: flags (bit 0: skip_zeros)
//   11    lo: lr            hi: weight_decay           (float32 bit patterns)
//   12    lo: beta1         hi: beta2
//   13    lo: beta3         hi: alpha
//   14    lo: eps           hi: gnorm_scale
//   15    lo: max_unorm     hi: param_norm (used when word 7 is 0)
//
// A CHUNK is BNBCY_OPT32_CHUNK = 1024 elements for the 32-bit kernels (256 threads x 4,
// element k*256 + tid of the chunk per thread: coalesced scalar accesses, no alignment
// needed) and BNBCY_OPT8_CHUNK = 256 elements (= one quantization block, one element per
// thread) for the 8-bit kernels. Every kernel runs 256 threads per CTA and loops
// chunk = blockIdx.x, blockIdx.x + gridDim.x, ... < total_chunks; the tensor of a chunk is
// found by a binary search over the FIRST words (the last row with first <= chunk, so a
// row with no chunks is never picked).
//
// Exported kernels (T in f32, f16, bf16):
//   bnbcy_optim32_{adam,ademamix,momentum,rmsprop,adagrad,lion}_{T}(table, num_tensors, total_chunks)
//   bnbcy_optim8_{adam,ademamix,momentum,rmsprop,adagrad,lion}_{T}(table, num_tensors, total_chunks,
//                                                                  qmap1, qmap2)
//   bnbcy_optim_unorm32_{adam,momentum,rmsprop,adagrad}_{T}(table, num_tensors, total_chunks, partials)
//   bnbcy_optim_unorm8_{adam,momentum,rmsprop,adagrad}_{T}(table, num_tensors, total_chunks,
//                                                           qmap1, qmap2, partials)
//   bnbcy_optim_unorm_reduce(table, num_tensors, total_chunks, partials)
// max_unorm (LAMB/LARS trust ratio, §6.4): the unorm kernel writes one partial sum of u^2 per
// chunk (fixed-order in-CTA reduction) to partials[chunk]; the reduce kernel (one CTA per
// tensor) adds a tensor's partials in a fixed order into its unorm slot; the update kernel
// then reads the slot. Deterministic, unlike bitsandbytes' float atomics.
//
// Every rounding of the contract is pinned with the helpers of bnbcy_common.cuh.
#include "bnbcy_common.cuh"

#define BNBCY_OPT_THREADS 256
#define BNBCY_OPT_ROW 16
#define BNBCY_OPT32_ITEMS 4
#define BNBCY_OPT32_CHUNK (BNBCY_OPT_THREADS * BNBCY_OPT32_ITEMS)
#define BNBCY_OPT8_CHUNK BNBCY_OPT_THREADS

// The rule ids of bnbcy/optim/_table.py RULE_IDS (the CPU's BNBCY_OPT_* too; tests/test_optim_table.py).
enum { OPT_ADAM = 0, OPT_MOMENTUM = 1, OPT_RMSPROP = 2, OPT_ADAGRAD = 3, OPT_LION = 4, OPT_ADEMAMIX = 5 };

// ------------------------------------------------------------------------------- table
struct OptRow {
    u64 p, g, s1, s2, a1, a2, unorm;
    long long n, first;
    int step;
    bool skip_zeros;
    float lr, wd, beta1, beta2, beta3, alpha, eps, gnorm_scale, max_unorm, param_norm;
};

__device__ __forceinline__ int opt_find_tensor(const long long *__restrict__ table, int num_tensors,
                                               long long chunk) {
    int lo = 0, hi = num_tensors - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) >> 1;
        if (table[(long long)mid * BNBCY_OPT_ROW + 9] <= chunk) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

__device__ __forceinline__ float opt_lo(long long w) { return __uint_as_float((u32)((u64)w & 0xffffffffull)); }
__device__ __forceinline__ float opt_hi(long long w) { return __uint_as_float((u32)((u64)w >> 32)); }

__device__ __forceinline__ OptRow opt_load_row(const long long *__restrict__ table, int t) {
    const long long *w = table + (long long)t * BNBCY_OPT_ROW;
    OptRow r;
    r.p = (u64)w[0];
    r.g = (u64)w[1];
    r.s1 = (u64)w[2];
    r.s2 = (u64)w[3];
    r.a1 = (u64)w[4];
    r.a2 = (u64)w[5];
    r.unorm = (u64)w[6];
    const u64 pn_ptr = (u64)w[7];
    r.n = w[8];
    r.first = w[9];
    r.step = (int)(u32)((u64)w[10] & 0xffffffffull);
    r.skip_zeros = (((u64)w[10] >> 32) & 1ull) != 0;
    r.lr = opt_lo(w[11]);
    r.wd = opt_hi(w[11]);
    r.beta1 = opt_lo(w[12]);
    r.beta2 = opt_hi(w[12]);
    r.beta3 = opt_lo(w[13]);
    r.alpha = opt_hi(w[13]);
    r.eps = opt_lo(w[14]);
    r.gnorm_scale = opt_hi(w[14]);
    r.max_unorm = opt_lo(w[15]);
    r.param_norm = pn_ptr ? *reinterpret_cast<const float *>(pn_ptr) : opt_hi(w[15]);
    return r;
}

// update scale of the max_unorm trust ratio (bnb: 2-state L = max_unorm*param_norm,
// 1-state L = fma(max_unorm, param_norm, eps)); 1 when disabled.
template <bool ONE_STATE>
__device__ __forceinline__ float opt_update_scale(const OptRow &r) {
    float us = 1.0f;
    if (r.max_unorm > 0.0f && r.unorm != 0ull) {
        const float u = sqrt_approx(*reinterpret_cast<const float *>(r.unorm));
        const float L = ONE_STATE ? fma_ftz(r.max_unorm, r.param_norm, r.eps) : mul_ftz(r.max_unorm, r.param_norm);
        if (u > L) us = div_approx(L, u);
    }
    return us;
}

// ------------------------------------------------------------------- CTA reductions
// Fixed-order reductions over the 256 threads of a CTA (deterministic). Every thread must call
// them; s_red holds R x 8 floats. They end with a barrier, so s_red may be reused at once.
template <int R>
__device__ __forceinline__ void cta_max256(float (&v)[R], float (*s_red)[8]) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < R; k++) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) v[k] = max_ftz(v[k], __shfl_xor_sync(0xffffffffu, v[k], off));
        if (lane == 0) s_red[k][warp] = v[k];
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < R; k++) {
        float m = s_red[k][0];
#pragma unroll
        for (int w = 1; w < BNBCY_OPT_THREADS / 32; w++) m = max_ftz(m, s_red[k][w]);
        v[k] = m;
    }
    __syncthreads();
}

__device__ __forceinline__ float cta_sum256(float v, float *s_red) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) v = add_ftz(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (lane == 0) s_red[warp] = v;
    __syncthreads();
    float s = s_red[0];
#pragma unroll
    for (int w = 1; w < BNBCY_OPT_THREADS / 32; w++) s = add_ftz(s, s_red[w]);
    __syncthreads();
    return s;
}

// ------------------------------------------------------------------- small helpers
template <class Tr>
__device__ __forceinline__ float round_T(float x) {
    return Tr::to_float(Tr::from_float(x));
}

__device__ __forceinline__ float sgn_f(float v) {
    return (float)((0.0f < v) - (v < 0.0f));
}

__device__ __forceinline__ bool is_finite_f(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// bitsandbytes' quantize_2D<SIGNED>: the 7-step search over a sorted 256-entry map with the
// sentinels lower = SIGNED ? -1 : 0, upper = 1 for never-visited neighbours (the first step's
// quadrant values are code[63], code[127], code[191]), midpoint tie-breaks toward the pivot.
template <bool SIGNED>
__device__ __forceinline__ u32 opt_q8_search(const float *__restrict__ code, float x) {
    int pivot = 127, upper_pivot = 255, lower_pivot = 0;
    float lower = SIGNED ? -1.0f : 0.0f, upper = 1.0f;
    float val = code[127];
#pragma unroll
    for (int step = 64; step > 0; step >>= 1) {
        if (x > val) { lower_pivot = pivot; lower = val; pivot += step; }
        else { upper_pivot = pivot; upper = val; pivot -= step; }
        val = code[pivot];
    }
    if (x > val) return (u32)(x > mul_ftz(add_ftz(upper, val), 0.5f) ? upper_pivot : pivot);
    return (u32)(x < mul_ftz(add_ftz(lower, val), 0.5f) ? lower_pivot : pivot);
}

// Requantize a signed state value: search, then bnb's sign fix (byte arithmetic mod 256).
__device__ __forceinline__ u8 opt_requant_signed(const float *__restrict__ code, float s, float M) {
    u32 c = opt_q8_search<true>(code, div_approx(s, M));
    if ((__float_as_uint(code[c]) >> 31) != (__float_as_uint(s) >> 31)) c = s > 0.0f ? c + 1u : c - 1u;
    return (u8)(c & 0xffu);
}

// ====================================================================== the update rules
// Each rule (NUMERICS.md §6.3-§6.6) is written once, as the CPU's pyx/include/bnbcy_cpu_optim_rules.h
// writes it, and combined with a state format by the loops below. F8 = false is the 32-bit
// format (states are the stored floats), F8 = true the 8-bit blockwise one (states are the
// dequantized codes). The two follow bitsandbytes' two kernels, whose float32 rounding points
// differ (which product is rounded first, whether the clipped gradient is rounded to T, which
// gradient rmsprop/adagrad divide, where the trust ratio applies); where they do, a rule branches
// on F8 at compile time. A rule is pure: the loops decide what is stored (skip_zeros, a
// non-finite 8-bit gradient, padding lanes), so the 8-bit loop may run a rule before its
// block's absmax reduction and store after it.

// The per-chunk scalars of the rules: one typed record built once per chunk from the table row.
struct OptHp {
    float b1, b2, b3, omb1, omb2, omb3, eps, lr, wd, decay, gns, alpha;
    float c1, c2, c2eps, ss, us, r1, r2;  // bias corrections (2-state), update scale, trust ratio
    bool has_wd, skip, first, scaled;  // scaled: max_unorm is on (8-bit kernels scale only then)
};

template <bool F8, int OPT>
__device__ __forceinline__ OptHp opt_hp(const OptRow &r) {
    OptHp h;
    h.b1 = r.beta1; h.b2 = r.beta2; h.b3 = r.beta3;
    h.omb1 = sub_ftz(1.0f, r.beta1); h.omb2 = sub_ftz(1.0f, r.beta2); h.omb3 = sub_ftz(1.0f, r.beta3);
    h.eps = r.eps; h.lr = r.lr; h.wd = r.wd; h.gns = r.gnorm_scale; h.alpha = r.alpha;
    h.decay = sub_ftz(1.0f, mul_ftz(r.lr, r.wd));  // 1 - lr*wd
    h.has_wd = r.wd > 0.0f;
    h.skip = r.skip_zeros;
    h.first = r.step == 1;
    h.scaled = r.max_unorm > 0.0f;
    h.c1 = h.c2 = h.c2eps = h.ss = h.r1 = h.r2 = 1.0f;
    constexpr bool TWO_STATE = OPT == OPT_ADAM || OPT == OPT_ADEMAMIX;
    h.us = opt_update_scale<!TWO_STATE>(r);
    if constexpr (TWO_STATE) {
        const float fstep = (float)r.step;
        h.c1 = sub_ftz(1.0f, pow_approx(r.beta1, fstep));
        h.c2 = sqrt_approx(sub_ftz(1.0f, pow_approx(r.beta2, fstep)));
        h.c2eps = mul_ftz(r.eps, h.c2);
        h.ss = div_approx(mul_ftz(h.c2, -r.lr), h.c1);
        if (!F8 || h.scaled) h.ss = mul_ftz(h.ss, h.us);
        h.r1 = rcp_approx(h.c1);
        h.r2 = rcp_approx(sub_ftz(1.0f, pow_approx(r.beta2, fstep)));
    }
    return h;
}

// The update scale of a 1-state rule: the 32-bit kernels always multiply (x1 when off, which
// flushes a denormal d), the 8-bit ones only when max_unorm is on.
template <bool F8>
__device__ __forceinline__ float opt_scale(const OptHp &h, float d) {
    return (!F8 || h.scaled) ? mul_ftz(h.us, d) : d;
}

// The clipped gradient: the 32-bit kernels round it to T, the 8-bit ones keep float32.
template <class Tr, bool F8>
__device__ __forceinline__ float opt_clip(const OptHp &h, float gr) {
    const float g = mul_ftz(h.gns, gr);
    return F8 ? g : round_T<Tr>(g);
}

// ---- 2-state rules. g: the clipped gradient; p the parameter (updated).

// adam / lamb moments: s1 = m, s2 = v (shared by the update and the trust-ratio pass).
template <bool F8>
__device__ __forceinline__ void ema_adam(const OptHp &h, float g, float &s1, float &s2) {
    if constexpr (F8) {
        s2 = fma_ftz(g, mul_ftz(h.omb2, g), mul_ftz(s2, h.b2));
        s1 = fma_ftz(h.omb1, g, mul_ftz(s1, h.b1));
    } else {
        s1 = fma_ftz(h.b1, s1, mul_ftz(h.omb1, g));
        s2 = fma_ftz(h.b2, s2, mul_ftz(h.omb2, mul_ftz(g, g)));
    }
}

template <class Tr, bool F8>
__device__ __forceinline__ void rule_adam(const OptHp &h, float g, float &s1, float &s2, float &p) {
    ema_adam<F8>(h, g, s1, s2);
    p = round_T<Tr>(fma_ftz(h.ss, div_approx(s1, add_ftz(sqrt_approx(s2), h.c2eps)), p));
    if (h.has_wd) p = mul_ftz(p, h.decay);  // the store rounds it
}

// ademamix: s1 = fast EMA m1, s3 = slow EMA m2, s2 = nu (no skip_zeros, no max_unorm).
template <class Tr, bool F8>
__device__ __forceinline__ void rule_ademamix(const OptHp &h, float g, float &s1, float &s2, float &s3, float &p) {
    if constexpr (F8) {
        s2 = fma_ftz(g, mul_ftz(h.omb2, g), mul_ftz(s2, h.b2));
        s1 = fma_ftz(h.omb1, g, mul_ftz(s1, h.b1));
        s3 = fma_ftz(h.omb3, g, mul_ftz(s3, h.b3));
    } else {
        s1 = fma_ftz(h.b1, s1, mul_ftz(h.omb1, g));
        s3 = fma_ftz(h.b3, s3, mul_ftz(h.omb3, g));
        s2 = fma_ftz(h.b2, s2, mul_ftz(g, mul_ftz(h.omb2, g)));
    }
    const float num = fma_ftz(s3, h.alpha, div_approx(s1, h.c1));
    const float den = add_ftz(div_approx(sqrt_approx(s2), h.c2), h.eps);
    p = round_T<Tr>(sub_ftz(p, mul_ftz(div_approx(num, den), h.lr)));
    if (h.has_wd) p = mul_ftz(p, h.decay);
}

// ---- 1-state rules. The state EMAs (shared by the update and the trust-ratio pass).
__device__ __forceinline__ float ema_momentum(const OptHp &h, float g, float s) {
    return h.first ? g : fma_ftz(h.b1, s, g);
}

template <bool F8>
__device__ __forceinline__ float ema_rmsprop(const OptHp &h, float g, float s) {
    return F8 ? fma_ftz(h.omb1, mul_ftz(g, g), mul_ftz(s, h.b1)) : fma_ftz(h.b1, s, mul_ftz(g, mul_ftz(h.omb1, g)));
}

__device__ __forceinline__ float ema_adagrad(float g, float s) {
    return fma_ftz(g, g, s);
}

// What a 1-state rule did to one element: whether skip_zeros leaves it alone (the old p and
// state are kept) and, for 8-bit lion, whether its rounded step is zero (then the decayed p pd
// is stored with the new state).
struct Opt1Out {
    bool active, stepped;
};

// One 1-state update: gradient scaling, weight decay and the rule. gr: the raw gradient; s the
// state, p the parameter (both updated); pd receives p after lion's decoupled decay.
template <class Tr, bool F8, int OPT>
__device__ __forceinline__ Opt1Out rule_1state(const OptHp &h, float gr, float &s, float &p, float &pd) {
    float g = opt_clip<Tr, F8>(h, gr);
    if (h.has_wd) {
        if (OPT == OPT_LION) p = round_T<Tr>(mul_ftz(h.decay, p));
        else g = F8 ? fma_ftz(p, h.wd, g) : round_T<Tr>(fma_ftz(p, h.wd, g));
    }
    pd = p;
    Opt1Out o;
    o.active = !h.skip || !is_zero_ftz(F8 ? gr : g);
    o.stepped = o.active;
    if constexpr (OPT == OPT_MOMENTUM) {
        s = ema_momentum(h, g, s);
        p = sub_ftz(p, opt_scale<F8>(h, mul_ftz(h.lr, s)));
    } else if constexpr (OPT == OPT_RMSPROP) {
        s = ema_rmsprop<F8>(h, g, s);
        // bnb's 8-bit kernel divides the raw gradient
        p = sub_ftz(p, opt_scale<F8>(h, mul_ftz(h.lr, div_approx(F8 ? gr : g, add_ftz(sqrt_approx(s), h.eps)))));
    } else if constexpr (OPT == OPT_ADAGRAD) {
        s = ema_adagrad(g, s);
        p = sub_ftz(p, mul_ftz(h.lr, div_approx(F8 ? gr : g, add_ftz(sqrt_approx(s), h.eps))));
    } else {  // lion: sign of the beta1 interpolation, then the beta2 EMA
        if constexpr (F8) {
            // T(sgn(...) * lr): bnb keeps it in the gradient slot and re-tests it for skip_zeros
            const float gs = round_T<Tr>(mul_ftz(h.lr, sgn_f(fma_ftz(h.omb1, g, mul_ftz(s, h.b1)))));
            s = fma_ftz(h.omb2, g, mul_ftz(s, h.b2));
            p = sub_ftz(p, gs);
            o.stepped = !h.skip || !is_zero_ftz(gs);
        } else {
            const float d = fma_ftz(h.b1, s, mul_ftz(h.omb1, g));
            p = sub_ftz(p, mul_ftz(h.us, mul_ftz(h.lr, sgn_f(d))));
            s = fma_ftz(h.b2, s, mul_ftz(h.omb2, g));
        }
    }
    return o;
}

// The would-be update u of the trust ratio (§6.4: no weight decay; OLD states). g: the clipped
// gradient. The 8-bit adam pass zeroes the moments of a non-finite gradient (ema = false).
template <bool F8, int OPT>
__device__ __forceinline__ float rule_unorm(const OptHp &h, float g, float s1, float s2, bool ema = true) {
    if constexpr (OPT == OPT_ADAM) {
        if (ema) ema_adam<F8>(h, g, s1, s2);
        else s1 = s2 = 0.0f;
        return div_approx(mul_ftz(s1, h.r1), add_ftz(sqrt_approx(mul_ftz(s2, h.r2)), h.eps));
    } else if constexpr (OPT == OPT_MOMENTUM) {
        return ema_momentum(h, g, s1);
    } else if constexpr (OPT == OPT_RMSPROP) {
        return div_approx(g, add_ftz(sqrt_approx(ema_rmsprop<F8>(h, g, s1)), h.eps));
    } else {  // adagrad
        return div_approx(g, add_ftz(sqrt_approx(ema_adagrad(g, s1)), h.eps));
    }
}

// ====================================================================== 32-bit updates
template <class Tr, int OPT>
__device__ __forceinline__ void optim32(const long long *__restrict__ table, int num_tensors, long long total_chunks) {
    typedef typename Tr::storage S;
    for (long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
        const OptRow r = opt_load_row(table, opt_find_tensor(table, num_tensors, chunk));
        const OptHp h = opt_hp<false, OPT>(r);
        // pointers to the chunk and 32-bit indices within it (fewer registers than 64-bit ones)
        const long long start = (chunk - r.first) * BNBCY_OPT32_CHUNK;
        S *__restrict__ P = reinterpret_cast<S *>(r.p) + start;
        const S *__restrict__ G = reinterpret_cast<const S *>(r.g) + start;
        float *__restrict__ S1 = reinterpret_cast<float *>(r.s1) + start;
        float *__restrict__ S2 = reinterpret_cast<float *>(r.s2) + start;
        float *__restrict__ S3 = reinterpret_cast<float *>(r.s1) + r.n + start;  // ademamix's m2
        const long long rest = r.n - start;
        const int len = rest < BNBCY_OPT32_CHUNK ? (int)rest : BNBCY_OPT32_CHUNK;
#pragma unroll
        for (int k = 0; k < BNBCY_OPT32_ITEMS; k++) {
            const int i = (int)threadIdx.x + k * BNBCY_OPT_THREADS;
            if (i >= len) break;
            const float gr = Tr::to_float(G[i]);
            float p = Tr::to_float(P[i]);
            if constexpr (OPT == OPT_ADAM) {
                const float g = opt_clip<Tr, false>(h, gr);
                if (h.skip && is_zero_ftz(g)) continue;
                float s1 = S1[i], s2 = S2[i];
                rule_adam<Tr, false>(h, g, s1, s2, p);
                S1[i] = s1;
                S2[i] = s2;
            } else if constexpr (OPT == OPT_ADEMAMIX) {  // state1 = [m1 | m2]
                float s1 = S1[i], s2 = S2[i], s3 = S3[i];
                rule_ademamix<Tr, false>(h, opt_clip<Tr, false>(h, gr), s1, s2, s3, p);
                S1[i] = s1;
                S3[i] = s3;
                S2[i] = s2;
            } else {
                float s1 = S1[i], pd;
                if (!rule_1state<Tr, false, OPT>(h, gr, s1, p, pd).active) continue;
                S1[i] = s1;
            }
            P[i] = Tr::from_float(p);
        }
    }
}

// ============================================================ max_unorm, 32-bit states
// partials[chunk] = sum over the chunk of u^2 (§6.4: OLD states, g*gnorm_scale, no decay).
template <class Tr, int OPT>
__device__ __forceinline__ void optim_unorm32(const long long *__restrict__ table, int num_tensors,
                                              long long total_chunks, float *__restrict__ partials) {
    typedef typename Tr::storage S;
    __shared__ float s_red[BNBCY_OPT_THREADS / 32];
    for (long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
        const OptRow r = opt_load_row(table, opt_find_tensor(table, num_tensors, chunk));
        const OptHp h = opt_hp<false, OPT>(r);
        const S *__restrict__ G = reinterpret_cast<const S *>(r.g);
        const float *__restrict__ S1 = reinterpret_cast<const float *>(r.s1);
        const float *__restrict__ S2 = reinterpret_cast<const float *>(r.s2);
        const long long base = (chunk - r.first) * BNBCY_OPT32_CHUNK + threadIdx.x;
        float acc = 0.0f;
#pragma unroll
        for (int k = 0; k < BNBCY_OPT32_ITEMS; k++) {
            const long long i = base + k * BNBCY_OPT_THREADS;
            if (i >= r.n) break;
            const float u = rule_unorm<false, OPT>(h, opt_clip<Tr, false>(h, Tr::to_float(G[i])), S1[i],
                                                   OPT == OPT_ADAM ? S2[i] : 0.0f);
            acc = fma_ftz(u, u, acc);
        }
        const float total = cta_sum256(acc, s_red);
        if (threadIdx.x == 0) partials[chunk] = total;
    }
}

// unorm slot of each tensor = its chunks' partials summed in a fixed order (one CTA per tensor).
__device__ __forceinline__ void optim_unorm_reduce(const long long *__restrict__ table, int num_tensors,
                                                   long long total_chunks, const float *__restrict__ partials) {
    __shared__ float s_red[BNBCY_OPT_THREADS / 32];
    for (int t = blockIdx.x; t < num_tensors; t += gridDim.x) {
        const long long *w = table + (long long)t * BNBCY_OPT_ROW;
        const long long first = w[9];
        const long long last = t + 1 < num_tensors ? w[BNBCY_OPT_ROW + 9] : total_chunks;
        float acc = 0.0f;
        for (long long c = first + threadIdx.x; c < last; c += BNBCY_OPT_THREADS) acc = add_ftz(acc, partials[c]);
        const float total = cta_sum256(acc, s_red);
        if (threadIdx.x == 0 && w[6] != 0) *reinterpret_cast<float *>((u64)w[6]) = total;
    }
}


// ====================================================================== 8-bit blockwise
struct Opt8Shared {
    float q1[256];
    float q2[256];
    float red[3][8];
};

// One chunk = one quantization block, one element per thread: dequantize, run the rule, reduce
// the block's new absmax, requantize.
template <class Tr, int OPT>
__device__ __forceinline__ void optim8(const long long *__restrict__ table, int num_tensors, long long total_chunks,
                                       const float *__restrict__ qmap1, const float *__restrict__ qmap2) {
    typedef typename Tr::storage S;
    constexpr bool TWO_STATE = OPT == OPT_ADAM || OPT == OPT_ADEMAMIX;
    __shared__ Opt8Shared sm;
    sm.q1[threadIdx.x] = qmap1[threadIdx.x];
    if (TWO_STATE) sm.q2[threadIdx.x] = qmap2[threadIdx.x];
    __syncthreads();

    for (long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
        const int t = opt_find_tensor(table, num_tensors, chunk);
        const OptRow r = opt_load_row(table, t);
        const OptHp h = opt_hp<true, OPT>(r);
        S *__restrict__ P = reinterpret_cast<S *>(r.p);
        const S *__restrict__ G = reinterpret_cast<const S *>(r.g);
        u8 *__restrict__ C1 = reinterpret_cast<u8 *>(r.s1);
        u8 *__restrict__ C2 = reinterpret_cast<u8 *>(r.s2);
        float *__restrict__ A1 = reinterpret_cast<float *>(r.a1);
        float *__restrict__ A2 = reinterpret_cast<float *>(r.a2);
        const long long b = chunk - r.first;  // quantization block of the tensor
        const long long nblocks = (r.n + BNBCY_OPT8_CHUNK - 1) / BNBCY_OPT8_CHUNK;
        const long long i = b * BNBCY_OPT8_CHUNK + threadIdx.x;
        const bool valid = i < r.n;

        // padding lanes of a partial last block: g = 0, p = 0, c1 = c3 = 128, c2 = 0 (never stored)
        const float g = valid ? Tr::to_float(G[i]) : 0.0f;
        float p = valid ? Tr::to_float(P[i]) : 0.0f;
        const float a1 = A1[b];

        if constexpr (TWO_STATE) {
            const u32 c1 = valid ? C1[i] : 128u;
            const u32 c2 = valid ? C2[i] : 0u;
            const float a2 = A2[b];
            u32 c3 = 128u;
            float a3 = 0.0f;
            if (OPT == OPT_ADEMAMIX) {
                c3 = valid ? C1[r.n + i] : 128u;
                a3 = A1[nblocks + b];
            }
            // a non-finite gradient zeroes the states and leaves p (bnb's 8-bit 2-state kernels)
            const bool finite = is_finite_f(g);
            float s[3] = {0.0f, 0.0f, 0.0f};  // s1, s2, s3
            if (finite) {
                s[0] = mul_ftz(sm.q1[c1], a1);
                s[1] = mul_ftz(sm.q2[c2], a2);
                const float gv = opt_clip<Tr, true>(h, g);
                if constexpr (OPT == OPT_ADAM) {
                    rule_adam<Tr, true>(h, gv, s[0], s[1], p);
                } else {
                    s[2] = mul_ftz(sm.q1[c3], a3);
                    rule_ademamix<Tr, true>(h, gv, s[0], s[1], s[2], p);
                }
            }
            float M[3];
#pragma unroll
            for (int k = 0; k < 3; k++) M[k] = max_ftz(-BNBCY_FLT_MAX, abs_ftz(s[k]));
            cta_max256<3>(M, sm.red);  // ends with a barrier: every absmax read above is done
            // the stores re-read their pointers from the table row (volatile: not kept in
            // registers across the reduction)
            const volatile long long *w = table + (long long)t * BNBCY_OPT_ROW;
            if (threadIdx.x == 0) {
                reinterpret_cast<float *>(w[4])[b] = M[0];
                reinterpret_cast<float *>(w[5])[b] = M[1];
                if (OPT == OPT_ADEMAMIX) reinterpret_cast<float *>(w[4])[nblocks + b] = M[2];
            }
            if (valid) {
                if (finite) reinterpret_cast<S *>(w[0])[i] = Tr::from_float(p);
                reinterpret_cast<u8 *>(w[2])[i] = opt_requant_signed(sm.q1, s[0], M[0]);
                reinterpret_cast<u8 *>(w[3])[i] = (u8)opt_q8_search<false>(sm.q2, div_approx(s[1], M[1]));
                if (OPT == OPT_ADEMAMIX) reinterpret_cast<u8 *>(w[2])[r.n + i] = opt_requant_signed(sm.q1, s[2], M[2]);
            }
        } else {
            const u32 c1 = valid ? C1[i] : 128u;
            const float s_old = mul_ftz(sm.q1[c1], a1);
            float s1 = s_old, pd;
            const Opt1Out o = rule_1state<Tr, true, OPT>(h, g, s1, p, pd);
            if (!o.active) s1 = s_old;  // skipped elements keep their dequantized old state (bnb: undefined)
            float M[1] = {max_ftz(-BNBCY_FLT_MAX, abs_ftz(s1))};
            cta_max256<1>(M, sm.red);
            if (threadIdx.x == 0) A1[b] = M[0];
            if (valid) {
                if (o.active) P[i] = Tr::from_float(o.stepped ? p : pd);
                C1[i] = opt_requant_signed(sm.q1, s1, M[0]);
            }
        }
    }
}

// ============================================================= max_unorm, 8-bit states
// partials[chunk] = sum of u^2 over the block, from the would-be new (dequantized) states
// of §6.5 with the u of §6.4 (no weight decay).
template <class Tr, int OPT>
__device__ __forceinline__ void optim_unorm8(const long long *__restrict__ table, int num_tensors,
                                             long long total_chunks, const float *__restrict__ qmap1,
                                             const float *__restrict__ qmap2, float *__restrict__ partials) {
    typedef typename Tr::storage S;
    __shared__ float s_q1[256];
    __shared__ float s_q2[256];
    __shared__ float s_red[BNBCY_OPT_THREADS / 32];
    s_q1[threadIdx.x] = qmap1[threadIdx.x];
    if (OPT == OPT_ADAM) s_q2[threadIdx.x] = qmap2[threadIdx.x];
    __syncthreads();
    for (long long chunk = blockIdx.x; chunk < total_chunks; chunk += gridDim.x) {
        const OptRow r = opt_load_row(table, opt_find_tensor(table, num_tensors, chunk));
        const OptHp h = opt_hp<true, OPT>(r);
        const S *__restrict__ G = reinterpret_cast<const S *>(r.g);
        const u8 *__restrict__ C1 = reinterpret_cast<const u8 *>(r.s1);
        const u8 *__restrict__ C2 = reinterpret_cast<const u8 *>(r.s2);
        const float *__restrict__ A1 = reinterpret_cast<const float *>(r.a1);
        const float *__restrict__ A2 = reinterpret_cast<const float *>(r.a2);
        const long long b = chunk - r.first;
        const long long i = b * BNBCY_OPT8_CHUNK + threadIdx.x;
        float acc = 0.0f;
        if (i < r.n) {
            const float g = Tr::to_float(G[i]);
            const float s1 = mul_ftz(s_q1[C1[i]], A1[b]);
            const float s2 = OPT == OPT_ADAM ? mul_ftz(s_q2[C2[i]], A2[b]) : 0.0f;
            const float u = rule_unorm<true, OPT>(h, opt_clip<Tr, true>(h, g), s1, s2, is_finite_f(g));
            acc = mul_ftz(u, u);
        }
        const float total = cta_sum256(acc, s_red);
        if (threadIdx.x == 0) partials[chunk] = total;
    }
}

// ============================================================================ exports
#define BNBCY_OPT32(TR, DT, NAME, OPT)                                                                      \
    extern "C" __global__ void __launch_bounds__(BNBCY_OPT_THREADS) bnbcy_optim32_##NAME##_##DT(           \
        const long long *__restrict__ table, int num_tensors, long long total_chunks) {                     \
        optim32<TR, OPT>(table, num_tensors, total_chunks);                                                 \
    }

#define BNBCY_OPT8(TR, DT, NAME, OPT)                                                                       \
    extern "C" __global__ void __launch_bounds__(BNBCY_OPT_THREADS) bnbcy_optim8_##NAME##_##DT(            \
        const long long *__restrict__ table, int num_tensors, long long total_chunks,                       \
        const float *__restrict__ qmap1, const float *__restrict__ qmap2) {                                 \
        optim8<TR, OPT>(table, num_tensors, total_chunks, qmap1, qmap2);                                    \
    }

#define BNBCY_OPT_UNORM32(TR, DT, NAME, OPT)                                                                \
    extern "C" __global__ void __launch_bounds__(BNBCY_OPT_THREADS) bnbcy_optim_unorm32_##NAME##_##DT(     \
        const long long *__restrict__ table, int num_tensors, long long total_chunks,                       \
        float *__restrict__ partials) {                                                                     \
        optim_unorm32<TR, OPT>(table, num_tensors, total_chunks, partials);                                 \
    }

#define BNBCY_OPT_UNORM8(TR, DT, NAME, OPT)                                                                 \
    extern "C" __global__ void __launch_bounds__(BNBCY_OPT_THREADS) bnbcy_optim_unorm8_##NAME##_##DT(      \
        const long long *__restrict__ table, int num_tensors, long long total_chunks,                       \
        const float *__restrict__ qmap1, const float *__restrict__ qmap2, float *__restrict__ partials) {   \
        optim_unorm8<TR, OPT>(table, num_tensors, total_chunks, qmap1, qmap2, partials);                    \
    }

#define BNBCY_OPT_ALL_NAMES(M, TR, DT)    \
    M(TR, DT, adam, OPT_ADAM)             \
    M(TR, DT, ademamix, OPT_ADEMAMIX)     \
    M(TR, DT, momentum, OPT_MOMENTUM)     \
    M(TR, DT, rmsprop, OPT_RMSPROP)       \
    M(TR, DT, adagrad, OPT_ADAGRAD)       \
    M(TR, DT, lion, OPT_LION)

#define BNBCY_OPT_UNORM_NAMES(M, TR, DT) \
    M(TR, DT, adam, OPT_ADAM)            \
    M(TR, DT, momentum, OPT_MOMENTUM)    \
    M(TR, DT, rmsprop, OPT_RMSPROP)      \
    M(TR, DT, adagrad, OPT_ADAGRAD)

#define BNBCY_OPT_DTYPE(TR, DT)                     \
    BNBCY_OPT_ALL_NAMES(BNBCY_OPT32, TR, DT)        \
    BNBCY_OPT_ALL_NAMES(BNBCY_OPT8, TR, DT)         \
    BNBCY_OPT_UNORM_NAMES(BNBCY_OPT_UNORM32, TR, DT) \
    BNBCY_OPT_UNORM_NAMES(BNBCY_OPT_UNORM8, TR, DT)

BNBCY_OPT_DTYPE(f32_t, f32)
BNBCY_OPT_DTYPE(f16_t, f16)
BNBCY_OPT_DTYPE(bf16_t, bf16)

extern "C" __global__ void __launch_bounds__(BNBCY_OPT_THREADS) bnbcy_optim_unorm_reduce(
    const long long *__restrict__ table, int num_tensors, long long total_chunks, const float *__restrict__ partials) {
    optim_unorm_reduce(table, num_tensors, total_chunks, partials);
}
