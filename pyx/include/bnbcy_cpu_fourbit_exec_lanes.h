/* The vector kernels of the 4-bit inference path, written once for both lane widths: included by
 * bnbcy_cpu_fourbit_exec.h once per width with BNBCY_Q4X_LANES_ISA set (no include guard):
 * 1 = AVX2+FMA (8 floats), 2 = AVX-512 F/BW/VL/DQ (16 floats).
 *
 *   X_T, X_W, X_FN(x), X_ATTR      lane type, width, per-width name, target attribute
 *   X_DEC_T, X_DEC_INIT(W)         decoder state (the map of weight W in registers)
 *   X_DEC(d, p)                    the X_W table values of the X_W consecutive weights whose
 *                                  nibbles are the X_W/2 bytes at p (elements in order)
 *   X_DEC32(d, p, w)               the 32 weights of the 16 bytes at p into w[0 .. 32/X_W) in
 *                                  the width's group order: element bnbcy_q4x_group_src_<w>(j)
 *                                  at position j (A is laid out the same way once per call)
 *   X_LOAD X_STORE X_SET1 X_ZERO X_ADD X_MUL X_FMA(a, b, c) = a*b + c, X_FTZ, X_HSUM
 *
 * Decoding: the bytes are broadcast to every lane, a variable right shift brings nibble j into
 * the low bits of lane j (shifts 4, 0, 12, 8, 20, 16, 28, 24: even elements are high nibbles).
 * AVX-512: the 16-entry map is one vpermps (16 lanes, low 4 bits). AVX2: vpermps has 8 entries,
 * so two (map halves 0-7 and 8-15) and a blend on bit 3, which a variable left shift puts at the
 * sign bit (vblendvps reads only it) -- no compare, one uop fewer. */

#undef X_T
#undef X_W
#undef X_FN
#undef X_ATTR
#undef X_DEC_T
#undef X_DEC_INIT
#undef X_DEC
#undef X_DEC32
#undef X_LOAD
#undef X_STORE
#undef X_SET1
#undef X_ZERO
#undef X_ADD
#undef X_MUL
#undef X_FMA
#undef X_FTZ
#undef X_HSUM
#undef X_GATHER
#undef X_ADD_I32
#undef X_SHR_I32
#undef X_U8_I32
#undef X_IOTA
#undef X_I

#if BNBCY_Q4X_LANES_ISA == 1
#define X_T __m256
#define X_W 8
#define X_FN(x) x##_avx2
#define X_ATTR __attribute__((target("avx2,fma,f16c")))
#define X_DEC_T bnbcy_q4x_dec8
#define X_DEC_INIT(W) bnbcy_q4x_dec8_init((W)->lut, (W)->planes)
#define X_DEC(d, p) bnbcy_q4x_decode8(d, p)
#define X_DEC32(d, p, w) bnbcy_q4x_decode32_avx2(d, p, w)
#define X_LOAD(p) _mm256_loadu_ps(p)
#define X_STORE(p, v) _mm256_storeu_ps(p, v)
#define X_SET1(x) _mm256_set1_ps(x)
#define X_ZERO() _mm256_setzero_ps()
#define X_ADD(a, b) _mm256_add_ps(a, b)
#define X_MUL(a, b) _mm256_mul_ps(a, b)
#define X_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define X_FTZ(v) bnbcy_ftz8(v)
#define X_HSUM(v) bnbcy_q4x_hsum8(v)
#define X_I __m256i
#define X_IOTA() _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
#define X_U8_I32(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define X_SHR_I32(v, n) _mm256_srl_epi32(v, _mm_cvtsi32_si128(n))
#define X_ADD_I32(v, n) _mm256_add_epi32(v, _mm256_set1_epi32(n))
#define X_GATHER(idx, base) bnbcy_gather8_ps(idx, base)

#ifndef BNBCY_Q4X_DEC8_DEFINED
#define BNBCY_Q4X_DEC8_DEFINED
typedef struct {
    __m256 lo, hi;       /* map entries 0-7 and 8-15 */
    __m256i sr, sl;      /* nibble j -> low bits of lane j; its bit 3 -> bit 31 of lane j */
    __m256i plane[4];    /* byte k of the 16 float32 map entries, in both 128-bit lanes */
    __m256i sr32, nib;   /* low nibbles -> lane 0, high nibbles -> lane 1; 0x0F bytes */
} bnbcy_q4x_dec8;

X_ATTR static inline bnbcy_q4x_dec8 bnbcy_q4x_dec8_init(const float *lut, const uint8_t (*planes)[16]) {
    bnbcy_q4x_dec8 d;
    d.lo = _mm256_loadu_ps(lut);
    d.hi = _mm256_loadu_ps(lut + 8);
    d.sr = _mm256_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24);
    d.sl = _mm256_setr_epi32(24, 28, 16, 20, 8, 12, 0, 4); /* 28 - sr */
    for (int k = 0; k < 4; k++) d.plane[k] = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)planes[k]));
    d.sr32 = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    d.nib = _mm256_set1_epi8(15);
    return d;
}

/* 32 weights from the 16 bytes at p, in group order (bnbcy_q4x_group_src): four in-lane byte
 * lookups (vpshufb, one per byte of the float32 entries) and two rounds of unpacks assemble the
 * floats -- 12 in-lane shuffles per 32 weights instead of 8 cross-lane vpermps + 4 blends, which
 * measured 1.7x faster on Zen 3 (vpermps is the slow one there). */
X_ATTR static inline void bnbcy_q4x_decode32_avx2(const bnbcy_q4x_dec8 *d, const uint8_t *p, __m256 *w) {
    const __m256i x = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)p));
    const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(x, d->sr32), d->nib);
    const __m256i b0 = _mm256_shuffle_epi8(d->plane[0], idx), b1 = _mm256_shuffle_epi8(d->plane[1], idx);
    const __m256i b2 = _mm256_shuffle_epi8(d->plane[2], idx), b3 = _mm256_shuffle_epi8(d->plane[3], idx);
    const __m256i l01 = _mm256_unpacklo_epi8(b0, b1), h01 = _mm256_unpackhi_epi8(b0, b1);
    const __m256i l23 = _mm256_unpacklo_epi8(b2, b3), h23 = _mm256_unpackhi_epi8(b2, b3);
    w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(l01, l23));
    w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(l01, l23));
    w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(h01, h23));
    w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(h01, h23));
}

/* Group order of bnbcy_q4x_decode32_avx2: position 8t + i holds element 2(4t + i) + 1 (the low
 * nibbles come out in lane 0), position 8t + 4 + i element 2(4t + i) (t, i < 4). */
static inline int bnbcy_q4x_group_src_avx2(int j) {
    const int t = j >> 3, i = j & 3;
    return 2 * (4 * t + i) + ((j & 4) ? 0 : 1);
}

X_ATTR static inline __m256 bnbcy_q4x_decode8(const bnbcy_q4x_dec8 *d, const uint8_t *p) {
    const __m256i x = _mm256_castps_si256(_mm256_broadcast_ss((const float *)p));
    const __m256i v = _mm256_srlv_epi32(x, d->sr);
    const __m256 a = _mm256_permutevar8x32_ps(d->lo, v), b = _mm256_permutevar8x32_ps(d->hi, v);
    return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_sllv_epi32(x, d->sl)));
}

X_ATTR static inline float bnbcy_q4x_hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

#elif BNBCY_Q4X_LANES_ISA == 2
#define X_T __m512
#define X_W 16
#define X_FN(x) x##_avx512
#define X_ATTR BNBCY_AVX512
#define X_DEC_T bnbcy_q4x_dec16
#define X_DEC_INIT(W) bnbcy_q4x_dec16_init((W)->lut, (W)->planes)
#define X_DEC(d, p) bnbcy_q4x_decode16(d, p)
#define X_DEC32(d, p, w) ((w)[0] = bnbcy_q4x_decode16(d, p), (w)[1] = bnbcy_q4x_decode16(d, (p) + 8))
#define X_LOAD(p) _mm512_loadu_ps(p)
#define X_STORE(p, v) _mm512_storeu_ps(p, v)
#define X_SET1(x) _mm512_set1_ps(x)
#define X_ZERO() _mm512_setzero_ps()
#define X_ADD(a, b) _mm512_add_ps(a, b)
#define X_MUL(a, b) _mm512_mul_ps(a, b)
#define X_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define X_FTZ(v) bnbcy_ftz16(v)
#define X_HSUM(v) _mm512_reduce_add_ps(v)
#define X_I __m512i
#define X_IOTA() _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
#define X_U8_I32(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define X_SHR_I32(v, n) _mm512_srl_epi32(v, _mm_cvtsi32_si128(n))
#define X_ADD_I32(v, n) _mm512_add_epi32(v, _mm512_set1_epi32(n))
#define X_GATHER(idx, base) bnbcy_gather_ps(idx, base)

#ifndef BNBCY_Q4X_DEC16_DEFINED
#define BNBCY_Q4X_DEC16_DEFINED
typedef struct {
    __m512 lut;
    __m512i sr;
} bnbcy_q4x_dec16;

X_ATTR static inline bnbcy_q4x_dec16 bnbcy_q4x_dec16_init(const float *lut, const uint8_t (*planes)[16]) {
    bnbcy_q4x_dec16 d;
    d.lut = _mm512_loadu_ps(lut);
    d.sr = _mm512_setr_epi32(4, 0, 12, 8, 20, 16, 28, 24, 4, 0, 12, 8, 20, 16, 28, 24);
    return d;
}

/* lanes 0-7 take the first 4 bytes (nibbles 0-7), lanes 8-15 the next 4: a broadcast and a
 * merge-masked broadcast (no cross-lane shuffle besides the lookup itself) */
X_ATTR static inline __m512 bnbcy_q4x_decode16(const bnbcy_q4x_dec16 *d, const uint8_t *p) {
    int32_t lo, hi;
    memcpy(&lo, p, 4);
    memcpy(&hi, p + 4, 4);
    const __m512i x = _mm512_mask_set1_epi32(_mm512_set1_epi32(lo), (__mmask16)0xFF00, hi);
    return _mm512_permutexvar_ps(_mm512_srlv_epi32(x, d->sr), d->lut);
}

/* The 16-entry vpermps keeps element order: the group order is the identity. */
static inline int bnbcy_q4x_group_src_avx512(int j) { return j; }
#endif
#endif

/* y[r] = sum_j a[r*lda + j] * W.flat[e0 + j], j < len, r < R (a span of one weight row), with the
 * block scales at sbuf[b - sb0] (block b). R (1..8) is a compile-time constant after inlining.
 * One row: per block, unscaled partial sums in 4 independent accumulators (the FMA latency
 * chains overlap), scaled once; several rows: the decoded weights are scaled once and used for
 * all R rows. */
X_ATTR static inline __attribute__((always_inline)) void
X_FN(bnbcy_q4x_rows_body)(const float *a, int64_t lda, const bnbcy_q4x_weight *W, int64_t e0, int64_t len,
                          const float *sbuf, int64_t sb0, float *y, const int R) {
    const X_DEC_T d = X_DEC_INIT(W);
    /* eight named accumulators, not an array: GCC stores an accumulator array back to the stack
     * on every iteration; with R constant the unused ones vanish */
    X_T acc0 = X_ZERO(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0, acc6 = acc0,
        acc7 = acc0;
    float extra[BNBCY_Q4X_ROWS_PER_PASS];
    for (int r = 0; r < R; r++) extra[r] = 0.0f;
    const uint8_t *q = W->q;
#define BNBCY_Q4X_FMA(r) if (R > r) acc##r = X_FMA(X_LOAD(ap + r * lda), w, acc##r);
    for (int64_t e = e0, e1 = e0 + len; e < e1;) {
        const int64_t b = e >> W->lg;
        const int64_t end = ((b + 1) << W->lg) < e1 ? ((b + 1) << W->lg) : e1;
        const float s = sbuf[b - sb0];
        int64_t i = e;
        if (i & 1) { /* odd start (odd K): the low nibble of its byte */
            const float w = W->lut[bnbcy_nibble(q, i)] * s;
            for (int r = 0; r < R; r++) extra[r] += a[r * lda + (i - e0)] * w;
            i++;
        }
        if (R == 1) {
            X_T p0 = X_ZERO(), p1 = p0, p2 = p0, p3 = p0;
            for (; i + 4 * X_W <= end; i += 4 * X_W) {
                const float *ap = a + (i - e0);
                const uint8_t *qp = q + ((uint64_t)i >> 1);
                p0 = X_FMA(X_LOAD(ap), X_DEC(&d, qp), p0);
                p1 = X_FMA(X_LOAD(ap + X_W), X_DEC(&d, qp + X_W / 2), p1);
                p2 = X_FMA(X_LOAD(ap + 2 * X_W), X_DEC(&d, qp + X_W), p2);
                p3 = X_FMA(X_LOAD(ap + 3 * X_W), X_DEC(&d, qp + 3 * X_W / 2), p3);
            }
            for (; i + X_W <= end; i += X_W)
                p0 = X_FMA(X_LOAD(a + (i - e0)), X_DEC(&d, q + ((uint64_t)i >> 1)), p0);
            acc0 = X_FMA(X_ADD(X_ADD(p0, p1), X_ADD(p2, p3)), X_SET1(s), acc0);
        } else {
            const X_T vs = X_SET1(s);
            for (; i + X_W <= end; i += X_W) {
                const X_T w = X_MUL(X_DEC(&d, q + ((uint64_t)i >> 1)), vs);
                const float *ap = a + (i - e0);
                BNBCY_Q4X_FMA(0) BNBCY_Q4X_FMA(1) BNBCY_Q4X_FMA(2) BNBCY_Q4X_FMA(3)
                BNBCY_Q4X_FMA(4) BNBCY_Q4X_FMA(5) BNBCY_Q4X_FMA(6) BNBCY_Q4X_FMA(7)
            }
        }
        for (; i < end; i++) { /* the last < X_W weights of the run */
            const float w = W->lut[bnbcy_nibble(q, i)] * s;
            for (int r = 0; r < R; r++) extra[r] += a[r * lda + (i - e0)] * w;
        }
        e = end;
    }
#undef BNBCY_Q4X_FMA
    const X_T accs[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    for (int r = 0; r < R; r++) y[r] = X_HSUM(accs[r]) + extra[r];
}

/* bnbcy_q4x_rows_body for the group path: K % 32 == 0 and blocks of >= 32 weights, so every
 * 32-weight group of a row lies in one block at an even index, and a holds each group of A in the
 * width's group order (X_DEC32). */
X_ATTR static inline __attribute__((always_inline)) void
X_FN(bnbcy_q4x_rows_group_body)(const float *a, int64_t lda, const bnbcy_q4x_weight *W, int64_t e0, int64_t len,
                                const float *sbuf, int64_t sb0, float *y, const int R) {
    enum { G = 32 / X_W };
    const X_DEC_T d = X_DEC_INIT(W);
    X_T acc0 = X_ZERO(), acc1 = acc0, acc2 = acc0, acc3 = acc0, acc4 = acc0, acc5 = acc0, acc6 = acc0,
        acc7 = acc0;
    const uint8_t *q = W->q;
    const int64_t bs = (int64_t)1 << W->lg, e1 = e0 + len;
#define BNBCY_Q4X_FMA(r) if (R > r) acc##r = X_FMA(X_LOAD(ap + r * lda), wg, acc##r);
    for (int64_t e = e0; e < e1;) {
        const int64_t end = (e | (bs - 1)) + 1 < e1 ? (e | (bs - 1)) + 1 : e1;
        const float s = sbuf[(e >> W->lg) - sb0];
        if (R == 1) {
            X_T p0 = X_ZERO(), p1 = p0, p2 = p0, p3 = p0;
            for (int64_t i = e; i < end; i += 32) {
                X_T w[G];
                X_DEC32(&d, q + ((uint64_t)i >> 1), w);
                const float *ap = a + (i - e0);
                p0 = X_FMA(X_LOAD(ap), w[0], p0);
                p1 = X_FMA(X_LOAD(ap + X_W), w[1], p1);
                if (G > 2) {
                    p2 = X_FMA(X_LOAD(ap + 2 * X_W), w[G > 2 ? 2 : 0], p2);
                    p3 = X_FMA(X_LOAD(ap + 3 * X_W), w[G > 2 ? 3 : 0], p3);
                }
            }
            acc0 = X_FMA(X_ADD(X_ADD(p0, p1), X_ADD(p2, p3)), X_SET1(s), acc0);
        } else {
            const X_T vs = X_SET1(s);
            for (int64_t i = e; i < end; i += 32) {
                X_T w[G];
                X_DEC32(&d, q + ((uint64_t)i >> 1), w);
                for (int g = 0; g < G; g++) {
                    const X_T wg = X_MUL(w[g], vs);
                    const float *ap = a + (i - e0) + g * X_W;
                    BNBCY_Q4X_FMA(0) BNBCY_Q4X_FMA(1) BNBCY_Q4X_FMA(2) BNBCY_Q4X_FMA(3)
                    BNBCY_Q4X_FMA(4) BNBCY_Q4X_FMA(5) BNBCY_Q4X_FMA(6) BNBCY_Q4X_FMA(7)
                }
            }
        }
        e = end;
    }
#undef BNBCY_Q4X_FMA
    const X_T accs[8] = {acc0, acc1, acc2, acc3, acc4, acc5, acc6, acc7};
    for (int r = 0; r < R; r++) y[r] = X_HSUM(accs[r]);
}

#define BNBCY_Q4X_ROWS_BODY(a, lda, W, e0, len, sbuf, sb0, y, R) X_FN(bnbcy_q4x_rows_group_body)(a, lda, W, e0, len, sbuf, sb0, y, R)
X_ATTR static void X_FN(bnbcy_q4x_rows_group)(const float *a, int64_t lda, int rows, const bnbcy_q4x_weight *W,
                                              int64_t e0, int64_t len, const float *sbuf, int64_t sb0, float *y) {
    BNBCY_ROWS_DISPATCH(BNBCY_Q4X_ROWS_BODY, rows, a, lda, W, e0, len, sbuf, sb0, y);
}
#undef BNBCY_Q4X_ROWS_BODY

#define BNBCY_Q4X_ROWS_BODY(a, lda, W, e0, len, sbuf, sb0, y, R) X_FN(bnbcy_q4x_rows_body)(a, lda, W, e0, len, sbuf, sb0, y, R)
X_ATTR static void X_FN(bnbcy_q4x_rows)(const float *a, int64_t lda, int rows, const bnbcy_q4x_weight *W,
                                        int64_t e0, int64_t len, const float *sbuf, int64_t sb0, float *y) {
    BNBCY_ROWS_DISPATCH(BNBCY_Q4X_ROWS_BODY, rows, a, lda, W, e0, len, sbuf, sb0, y);
}
#undef BNBCY_Q4X_ROWS_BODY

/* w[j] = ftz(lut[nibble(e + j)] * s) for whole vectors of j < len, e even (the values
 * bnbcy_q4_dequantize computes: one float32 product each, so every width gives the same bits);
 * returns the count written. */
X_ATTR static int64_t X_FN(bnbcy_q4x_dequant_run)(const bnbcy_q4x_weight *W, int64_t e, int64_t len, float s,
                                                  float *w) {
    const X_DEC_T d = X_DEC_INIT(W);
    const X_T vs = X_SET1(s);
    int64_t i = 0;
    for (; i + X_W <= len; i += X_W)
        X_STORE(w + i, X_FTZ(X_MUL(X_DEC(&d, W->q + ((uint64_t)(e + i) >> 1)), vs)));
    return i;
}

/* sbuf[b - b0] = bnbcy_q4x_scale(W, b) for b0 <= b < b1, X_W blocks at a time (the same float32
 * operations lane by lane: nested statistics gather code2[qabs] and absmax2). */
X_ATTR static void X_FN(bnbcy_q4x_block_scales)(const bnbcy_q4x_weight *W, int64_t b0, int64_t b1, float *sbuf) {
    const bnbcy_q4_scales *sc = &W->sc;
    int64_t b = b0;
    if (sc->absmax) {
        for (; b + X_W <= b1; b += X_W) X_STORE(sbuf + (b - b0), X_FTZ(X_LOAD(sc->absmax + b)));
    } else if (b1 < ((int64_t)1 << 31)) { /* int32 block indices */
        const X_T off = X_SET1(sc->offset);
        for (; b + X_W <= b1; b += X_W) {
            const X_T c = X_FTZ(X_GATHER(X_U8_I32(sc->qabs + b), sc->code2));
            const X_T m = X_FTZ(X_GATHER(X_SHR_I32(X_ADD_I32(X_IOTA(), (int)b), sc->log2_blocksize2), sc->absmax2));
            X_STORE(sbuf + (b - b0), X_FTZ(X_ADD(X_FTZ(X_MUL(c, m)), off)));
        }
    }
    for (; b < b1; b++) sbuf[b - b0] = bnbcy_q4x_scale(W, b);
}
