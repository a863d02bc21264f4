/* The loops of the CPU optimizer kernels, generic over the lane type (included after
 * bnbcy_cpu_optim_lanes.h and bnbcy_cpu_optim_rules.h, once per lane width; no include guard):
 * load a vector, apply the rule of bnbcy_cpu_optim_rules.h, store. Above the scalar width a
 * vector with a lane the rule flags (skip_zeros, a non-finite gradient or result) is redone
 * lane by lane by the scalar instantiation, and so are tails shorter than a vector: every
 * width gives the scalar path's bits. Each loop is instantiated per optimizer (the `opt`
 * argument is a constant at every call), so none carries a switch. */

/* ---------------------------------------------------------------- 32-bit --- */

/* Elements [i, i + L_W) of a 32-bit update. Above the scalar width: returns 0, writing
 * nothing, when the vector needs the scalar path. */
L_ATTR static inline __attribute__((always_inline)) int L_FN(bnbcy_opt32_vec)(
    const L_FN(bnbcy_opt_lhp) *h, const bnbcy_opt_tensor *t, int64_t i, const int opt) {
    const int dt = h->dt;
    float *s1p = (float *)t->s1 + i;
    const L_T gr = L_LOADT(t->g, dt, i);
    L_T p = L_LOADT(t->p, dt, i), s1 = L_LOADF(s1p);
    if (opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX) {
        float *s2p = (float *)t->s2 + i, *s3p = (float *)t->s1 + t->n + i;
        const L_T g = L_ROUND(L_MUL(h->gns, gr), dt);
        L_T s2 = L_LOADF(s2p), s3;
        int skip = 0;
        if (opt == BNBCY_OPT_ADAM) {
            skip = h->skip ? L_ZERO(g) : 0;
            L_FN(bnbcy_rule_adam)(h, 0, g, &s1, &s2, &p);
        } else {
            s3 = L_LOADF(s3p);
            L_FN(bnbcy_rule_ademamix)(h, 0, g, &s1, &s2, &s3, &p);
        }
        if (skip) return L_W == 1;
        if (L_W > 1 && L_BAD2(gr, p)) return 0;
        L_STOREF(s1p, s1);
        L_STOREF(s2p, s2);
        if (opt == BNBCY_OPT_ADEMAMIX) L_STOREF(s3p, s3);
    } else {
        L_T pd;
        const int skip = L_FN(bnbcy_rule_1state)(h, 0, opt, gr, &s1, &p, &pd);
        if (skip) return L_W == 1;
        if (L_W > 1 && L_BAD2(gr, p)) return 0;
        L_STOREF(s1p, s1);
    }
    L_STORET(t->p, dt, i, p);
    return 1;
}

#ifndef BNBCY_OPT_LOOPS_ONCE
#define BNBCY_OPT_LOOPS_ONCE
/* Elements ahead that the 32-bit SIMD loop prefetches, every 16 elements (one line of each float32
 * stream): 2-3% off the two-core step out of cache on Zen 3 (bench_optim.py, 16M elements). */
#define BNBCY_OPT32_PREFETCH 512
/* The per-call flags a loop can be specialized on (SIMD widths): BNBCY_OPT_SPEC_GENERIC reads them at
 * run time; the others fix float32 parameters and no skip_zeros, without / with weight decay, so
 * that the loop carries neither the dtype branches nor the skip test. */
enum { BNBCY_OPT_SPEC_GENERIC = 0, BNBCY_OPT_SPEC_F32 = 1, BNBCY_OPT_SPEC_F32_WD = 2 };

static inline int bnbcy_opt_spec(const bnbcy_opt_args *a) {
    if (a->dtype != BNBCY_F32 || a->skip_zeros) return BNBCY_OPT_SPEC_GENERIC;
    return a->wd > 0.0f ? BNBCY_OPT_SPEC_F32_WD : BNBCY_OPT_SPEC_F32;
}

/* Whether a block's second moment stays >= 0 or NaN (never -0), so that L_FTZ_NN flushes it
 * exactly (h.nn2): a nonnegative map, the block's absmax am2 not negative, beta2 in [0, 1]. */
static inline int bnbcy_opt_nn2(const bnbcy_opt_args *a, float am2) {
    return a->q2nn && !(am2 < 0.0f) && a->b2 >= 0.0f && a->b2 <= 1.0f;
}

/* One switch over the optimizer (and, above the scalar width W, the specialization) of a loop
 * FN(a, t, start, len, opt, spec). */
#define BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, OPT)                                                \
    case (OPT) * 3: FN(a, t, start, len, OPT, BNBCY_OPT_SPEC_GENERIC); break;                          \
    case (OPT) * 3 + 1: FN(a, t, start, len, OPT, BNBCY_OPT_SPEC_F32); break;                          \
    case (OPT) * 3 + 2: FN(a, t, start, len, OPT, BNBCY_OPT_SPEC_F32_WD); break;
#define BNBCY_OPT_DISPATCH(W, FN, a, t, start, len)                                                    \
    do {                                                                                                \
        const int spec_ = (W) > 1 ? bnbcy_opt_spec(a) : BNBCY_OPT_SPEC_GENERIC;                         \
        switch ((a)->opt * 3 + spec_) {                                                                 \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_ADAM)                                  \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_ADEMAMIX)                              \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_MOMENTUM)                              \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_RMSPROP)                               \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_ADAGRAD)                               \
            BNBCY_OPT_SPEC_CASES(FN, a, t, start, len, BNBCY_OPT_LION)                                  \
        default: break; /* the rule ids are validated before the kernels run */                        \
        }                                                                                               \
    } while (0)
#endif

/* The rule scalars of a call, with the flags of spec made compile-time constants. */
L_ATTR static inline __attribute__((always_inline)) L_FN(bnbcy_opt_lhp) L_FN(bnbcy_opt_lhp_spec)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, const int spec) {
    L_FN(bnbcy_opt_lhp) h = L_FN(bnbcy_opt_lhp_make)(a, t);
    if (spec != BNBCY_OPT_SPEC_GENERIC) {
        h.dt = BNBCY_F32;
        h.skip = 0;
        h.has_wd = spec == BNBCY_OPT_SPEC_F32_WD;
    }
    return h;
}

/* Prefetches element i of every stream of a 32-bit update. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt32_prefetch)(const bnbcy_opt_tensor *t, int dt,
                                                                                 int64_t i, const int opt) {
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    L_PREFETCH((const char *)t->p + i * isz);
    L_PREFETCH((const char *)t->g + i * isz);
    L_PREFETCH((const float *)t->s1 + i);
    if (opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX) L_PREFETCH((const float *)t->s2 + i);
    if (opt == BNBCY_OPT_ADEMAMIX) L_PREFETCH((const float *)t->s1 + t->n + i);
}

L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt32_chunk_k)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t0, int64_t start, int64_t len, const int opt, const int spec) {
    const L_FN(bnbcy_opt_lhp) h = L_FN(bnbcy_opt_lhp_spec)(a, t0, spec);
    /* a local copy: the stores (may_alias vector types) cannot change its pointers, which then
     * stay in registers instead of being reloaded every vector */
    const bnbcy_opt_tensor tl = *t0, *t = &tl;
    int64_t i = start;
    /* until a vector needs the scalar path, a loop without calls (a call clobbers its registers) */
    for (; i + L_W <= start + len; i += L_W) {
        if (L_W > 1 && (i & 15) == 0 && i + BNBCY_OPT32_PREFETCH < t->n)
            L_FN(bnbcy_opt32_prefetch)(t, h.dt, i + BNBCY_OPT32_PREFETCH, opt);
        if (!L_FN(bnbcy_opt32_vec)(&h, t, i, opt)) break;
    }
    for (; i + L_W <= start + len; i += L_W)
        if (!L_FN(bnbcy_opt32_vec)(&h, t, i, opt)) bnbcy_opt32_chunk_scalar(a, t0, i, L_W);
    if (i < start + len) bnbcy_opt32_chunk_scalar(a, t0, i, start + len - i);
}

L_ATTR static void L_FN(bnbcy_opt32_chunk)(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                                           int64_t len) {
    BNBCY_OPT_DISPATCH(L_W, L_FN(bnbcy_opt32_chunk_k), a, t, start, len);
}

/* ----------------------------------------------------------------- 8-bit --- */

/* The dequantized states of elements [0, len) of a block (len a multiple of L_W), into d (SIMD
 * widths: the block loop then reads them from there, which keeps the lookups off the rule's
 * dependency chain). */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt8_deq)(const uint8_t *q, const float *qmap,
                                                                          const L_T am, const int fz, float *d,
                                                                          const int len) {
    if (fz) for (int i = 0; i < len; i += L_W) L_STOREF(d + i, L_FTZ(L_DEQ(q + i, qmap, am)));
    else for (int i = 0; i < len; i += L_W) L_STOREF(d + i, L_DEQ(q + i, qmap, am));
}

#ifndef BNBCY_OPT_GROUP
/* Elements a SIMD block dequantizes (its first state) ahead of the rule, in turn with it: the
 * lookups then overlap the rule's work, which they do not across two whole-block loops. On Zen 3
 * (bench_optim_cycles.py, 16K elements, against whole-block loops): Lion8bit 1.17x, Momentum8bit
 * 1.24x, RMSprop8bit 1.05x, Adam8bit 1.02x; groups of 32 gave less, 64 nothing. Adam's second
 * state stays one whole-block loop (grouping both states was 5% slower); AdEMAMix keeps three. */
#define BNBCY_OPT_GROUP 16
#endif

/* Elements [i, i + L_W) of an 8-bit block: dequantize, apply the rule, store p and the new
 * states (unquantized, into n1/n2/n3), fold the bits of their |values| into M[0..3)
 * (L_MAXABSU: the block's absmax and whether a state is NaN in one unsigned max). Returns 0,
 * writing nothing, when the vector needs the scalar path (above the scalar width). */
L_ATTR static inline __attribute__((always_inline)) int L_FN(bnbcy_opt8_vec)(
    const L_FN(bnbcy_opt_lhp) *h, const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start, int i,
    const L_T *am, float *n1, float *n2, float *n3, L_TI *M0, L_TI *M1, L_TI *M2, const int opt) {
    const int dt = h->dt, two = opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX;
    const uint8_t *q1 = (const uint8_t *)t->s1 + start + i;
    const L_T gr = L_LOADT(t->g, dt, start + i), p0 = L_LOADT(t->p, dt, start + i);
    /* above the scalar width the old states were dequantized into n1/n2/n3 (bnbcy_opt8_deq) */
    L_T p = p0, s1 = L_W > 1 ? L_LOADF(n1 + i) : L_FTZ_IF(h->fz1, L_DEQ(q1, a->qmap1, am[0])), s2, s3;
    if (two) {
        const L_T g = L_MUL(gr, h->gns);
        s2 = L_W > 1 ? L_LOADF(n2 + i) : L_FTZ_IF(h->fz2, L_DEQ((const uint8_t *)t->s2 + start + i, a->qmap2, am[1]));
        if (opt == BNBCY_OPT_ADAM) {
            L_FN(bnbcy_rule_adam)(h, 1, g, &s1, &s2, &p);
        } else {
            s3 = L_W > 1 ? L_LOADF(n3 + i) : L_FTZ_IF(h->fz3, L_DEQ(q1 + t->n, a->qmap1, am[2]));
            L_FN(bnbcy_rule_ademamix)(h, 1, g, &s1, &s2, &s3, &p);
        }
        if (L_W == 1 && L_BAD(gr)) { /* a non-finite gradient resets the states, keeps p */
            s1 = s2 = s3 = L_SET1(0.0f);
            p = p0;
        }
        if (L_W > 1 && L_BAD2(gr, h->fin ? p0 : p)) return 0;
        L_STOREF(n2 + i, s2);
        *M1 = L_MAXABSU(*M1, s2);
        if (opt == BNBCY_OPT_ADEMAMIX) {
            L_STOREF(n3 + i, s3);
            *M2 = L_MAXABSU(*M2, s3);
        }
    } else {
        const L_T d1 = s1;
        L_T pd;
        const int skip = L_FN(bnbcy_rule_1state)(h, 1, opt, gr, &s1, &p, &pd);
        if (L_W > 1 && (skip | L_BAD2(gr, h->fin ? p0 : p))) return 0;
        if (L_W == 1 && (skip & 1)) { /* zero gradient: the old p and (dequantized) state */
            s1 = d1;
            p = p0;
        } else if (L_W == 1 && skip) { /* zero lion step: the decayed p, the new state */
            p = pd;
        }
    }
    L_STOREF(n1 + i, s1);
    *M0 = L_MAXABSU(*M0, s1);
    L_STORET(t->p, dt, start + i, p);
    return 1;
}

/* Requantizes one block of new states with its absmax M: through the requantization table when
 * it applies (a full block, 0 < M <= FLT_MAX, rq given only when every state is finite), else
 * bnbcy_opt_requant. s is scratch: the table path overwrites it. */
L_ATTR static void L_FN(bnbcy_opt_requant)(float *s, int64_t len, float M, const float *code,
                                                  const bnbcy_q8_table *t, const uint32_t *rq, int sign_fix,
                                                  uint8_t *q) {
    if (L_W > 1 && rq != NULL && len == BNBCY_OPT_BLOCK && M > 0.0f && M <= FLT_MAX) {
        const L_T r = L_SET1(bnbcy_opt_recip(M));
        L_RQ(s, r, rq, q);
        return;
    }
    bnbcy_opt_requant(s, len, M, code, t, sign_fix, q);
}

/* Blocks ahead of the one being updated that a SIMD block prefetches: the hardware prefetcher
 * alone left the two-core step about 5% short of its compute time (AVX-512 measurements). */
#define BNBCY_OPT_PREFETCH 4

/* Prefetches the 8-bit block at element `ahead`: its gradient, codes and (with_p) parameter. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt8_prefetch)(const bnbcy_opt_tensor *t, int dt,
                                                                                int64_t ahead, const int opt,
                                                                                const int with_p) {
    const int two = opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX;
    const size_t isz = dt == BNBCY_F32 ? 4 : 2;
    for (size_t k = 0; k < BNBCY_OPT_BLOCK * isz; k += 64) {
        L_PREFETCH((const char *)t->g + ahead * isz + k);
        if (with_p) L_PREFETCH((const char *)t->p + ahead * isz + k);
    }
    for (int k = 0; k < BNBCY_OPT_BLOCK; k += 64) {
        L_PREFETCH((const uint8_t *)t->s1 + ahead + k);
        if (two) L_PREFETCH((const uint8_t *)t->s2 + ahead + k);
        if (opt == BNBCY_OPT_ADEMAMIX) L_PREFETCH((const uint8_t *)t->s1 + t->n + ahead + k);
    }
}

/* One 256-block [start, start+len) of an 8-bit update (above the scalar width len is 256), with the
 * block's absmaxes amv and flush flags fz (bnbcy_opt8_block_params). fzc = 0: the fast variant, in
 * which no flush can act (the loop carries none of their tests) and h.nn2, h.fin hold; 1: the
 * flags fz, read at run time. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt8_block_k)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, const L_FN(bnbcy_opt_lhp) *h0, int64_t b, int64_t start,
    int64_t len, const float *amv, const int *fz, const int opt, const int fzc) {
    float n1[BNBCY_OPT_BLOCK] __attribute__((aligned(64))), n2[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
    float n3[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
    L_FN(bnbcy_opt_lhp) h = *h0;
    const int two = opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX, ademamix = opt == BNBCY_OPT_ADEMAMIX;
    const int64_t nblocks = (t->n + BNBCY_OPT_BLOCK - 1) / BNBCY_OPT_BLOCK;
    const float am1 = amv[0], am2 = amv[1], am3 = amv[2];
    h.fz1 = fzc ? fz[0] : 0;
    h.fz2 = fzc ? fz[1] : 0;
    h.fz3 = fzc ? fz[2] : 0;
    h.nn2 = h.fin = !fzc;
    const L_T am[3] = {L_SET1(am1), L_SET1(am2), L_SET1(am3)};
    /* three variables, not an array: GCC kept an array in memory, a store-to-load chain per vector */
    L_TI M0 = L_ZEROI, M1 = L_ZEROI, M2 = L_ZEROI;
    uint32_t Ms[3] = {0u, 0u, 0u}; /* lanes redone by the scalar path, and the padding lanes */
    float pad[3] = {-FLT_MAX, -FLT_MAX, -FLT_MAX}; /* the padding lanes' absmax */
    if (L_W > 1 && start + (BNBCY_OPT_PREFETCH + 1) * BNBCY_OPT_BLOCK <= t->n)
        L_FN(bnbcy_opt8_prefetch)(t, h.dt, start + BNBCY_OPT_PREFETCH * BNBCY_OPT_BLOCK, opt, 1);
    /* vectors that need the scalar path, redone after the loop (they touch only their own
     * lanes): no call inside the loop, whose registers a call would clobber */
    uint32_t redo = 0;
#define BNBCY_OPT8_VEC_AT(i)                                                                             \
    if (!L_FN(bnbcy_opt8_vec)(&h, a, t, start, i, am, n1, n2, n3, &M0, &M1, &M2, opt)) redo |= 1u << ((i) / L_W % 32)
    if (L_W > 1 && !ademamix) { /* the first state dequantized a group at a time, in turn with the rule */
        if (two) L_FN(bnbcy_opt8_deq)((const uint8_t *)t->s2 + start, a->qmap2, am[1], h.fz2, n2, BNBCY_OPT_BLOCK);
        for (int g0 = 0; g0 < BNBCY_OPT_BLOCK; g0 += BNBCY_OPT_GROUP) {
            L_FN(bnbcy_opt8_deq)((const uint8_t *)t->s1 + start + g0, a->qmap1, am[0], h.fz1, n1 + g0, BNBCY_OPT_GROUP);
            for (int i = g0; i < g0 + BNBCY_OPT_GROUP; i += L_W) BNBCY_OPT8_VEC_AT(i);
        }
    } else {
        if (L_W > 1) {
            const uint8_t *q1 = (const uint8_t *)t->s1 + start;
            L_FN(bnbcy_opt8_deq)(q1, a->qmap1, am[0], h.fz1, n1, BNBCY_OPT_BLOCK);
            if (two) L_FN(bnbcy_opt8_deq)((const uint8_t *)t->s2 + start, a->qmap2, am[1], h.fz2, n2, BNBCY_OPT_BLOCK);
            if (ademamix) L_FN(bnbcy_opt8_deq)(q1 + t->n, a->qmap1, am[2], h.fz3, n3, BNBCY_OPT_BLOCK);
        }
        for (int i = 0; i + L_W <= len; i += L_W) BNBCY_OPT8_VEC_AT(i);
    }
#undef BNBCY_OPT8_VEC_AT
    if (L_W > 1 && redo) {
        const bnbcy_opt_lhp_scalar hs = bnbcy_opt_lhp_make_scalar(a, t);
        const float ams[3] = {am1, am2, am3};
        for (int v = 0; v < BNBCY_OPT_BLOCK / L_W; v++)
            if (redo >> v & 1)
                for (int k = v * L_W; k < (v + 1) * L_W; k++)
                    bnbcy_opt8_vec_scalar(&hs, a, t, start, k, ams, n1, n2, n3, &Ms[0], &Ms[1], &Ms[2], opt);
    }
    if (len < BNBCY_OPT_BLOCK) { /* padding lanes (scalar width only): code 128 / 0, g = 0, p = 0 */
        const float d1 = bnbcy_ftz(a->qmap1[128] * am1);
        float s1 = d1, s2 = two ? bnbcy_ftz(a->qmap2[0] * am2) : 0.0f, s3 = bnbcy_ftz(a->qmap1[128] * am3);
        float p = 0.0f, pd;
        const bnbcy_opt_lhp_scalar hs = bnbcy_opt_lhp_make_scalar(a, t);
        if (opt == BNBCY_OPT_ADAM) bnbcy_rule_adam_scalar(&hs, 1, 0.0f, &s1, &s2, &p);
        else if (opt == BNBCY_OPT_ADEMAMIX) bnbcy_rule_ademamix_scalar(&hs, 1, 0.0f, &s1, &s2, &s3, &p);
        else if (bnbcy_rule_1state_scalar(&hs, 1, opt, 0.0f, &s1, &p, &pd) & 1) s1 = d1;
        const float ps[3] = {s1, s2, s3};
        for (int k = 0; k < 3; k++) {
            Ms[k] = bnbcy_opt_maxabsu(Ms[k], ps[k]);
            pad[k] = bnbcy_opt_absmax_acc(pad[k], ps[k]);
        }
    }
    /* state k: its codes, map, search and requantization tables, absmax slot (ademamix's slow
     * EMA is state 3: the second half of s1 and absmax1) */
    uint8_t *const qs[3] = {(uint8_t *)t->s1 + start, two ? (uint8_t *)t->s2 + start : NULL,
                            (uint8_t *)t->s1 + t->n + start};
    float *const ams_out[3] = {t->absmax1 + b, two ? t->absmax2 + b : NULL, t->absmax1 + nblocks + b};
    float *const ns[3] = {n1, n2, n3};
    const uint32_t Mv[3] = {L_HMAXU(M0), L_HMAXU(M1), L_HMAXU(M2)};
    for (int k = 0; k < (ademamix ? 3 : two ? 2 : 1); k++) {
        const uint32_t mu = Mv[k] > Ms[k] ? Mv[k] : Ms[k];
        const float m = bnbcy_opt_block_absmax(mu, ns[k], len, pad[k]);
        const int s2nd = k == 1; /* state 2 has the unsigned map, no sign fix */
        *ams_out[k] = m;
        /* the requantization table holds finite states only (a NaN state never enters m) */
        L_FN(bnbcy_opt_requant)(ns[k], len, m, s2nd ? a->qmap2 : a->qmap1, s2nd ? a->t2 : a->t1,
                                mu < 0x7F800000u ? (s2nd ? a->rq2 : a->rq1) : NULL, !s2nd, qs[k]);
    }
}

/* The absmaxes (flushed) and flush flags of block b; returns whether the block may take the fast
 * variant of bnbcy_opt8_block_k: no flush can act, the maps and absmaxes are finite (h.fin), and
 * the second moment is nonnegative (h.nn2: a nonnegative map, absmax and beta2 in [0, 1]). */
L_ATTR static inline __attribute__((always_inline)) int L_FN(bnbcy_opt8_block_params)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t b, float *amv, int *fz, const int opt) {
    const int two = opt == BNBCY_OPT_ADAM || opt == BNBCY_OPT_ADEMAMIX, ademamix = opt == BNBCY_OPT_ADEMAMIX;
    const int64_t nblocks = (t->n + BNBCY_OPT_BLOCK - 1) / BNBCY_OPT_BLOCK;
    amv[0] = bnbcy_ftz(t->absmax1[b]);
    amv[1] = two ? bnbcy_ftz(t->absmax2[b]) : 0.0f;
    amv[2] = ademamix ? bnbcy_ftz(t->absmax1[nblocks + b]) : 0.0f;
    /* the scalar width always flushes (exact); above it, only where a flush can act */
    fz[0] = L_W == 1 || bnbcy_opt_may_flush(amv[0], a->qmin1, a->b1) ||
            (opt == BNBCY_OPT_LION && bnbcy_opt_may_flush(amv[0], a->qmin1, a->b2));
    fz[1] = L_W == 1 || bnbcy_opt_may_flush(amv[1], a->qmin2, a->b2);
    fz[2] = L_W == 1 || bnbcy_opt_may_flush(amv[2], a->qmin1, a->b3);
    return L_W > 1 && a->qfin && !(fz[0] | fz[1] | fz[2]) && isfinite(amv[0]) && isfinite(amv[1]) && isfinite(amv[2]) &&
           (!two || bnbcy_opt_nn2(a, amv[1]));
}

L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt8_chunk_k)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t0, int64_t start, int64_t len, const int opt, const int spec) {
    const L_FN(bnbcy_opt_lhp) h = L_FN(bnbcy_opt_lhp_spec)(a, t0, spec);
    const bnbcy_opt_tensor tl = *t0, *t = &tl; /* see bnbcy_opt32_chunk_k */
    for (int64_t s = start; s < start + len; s += BNBCY_OPT_BLOCK) {
        const int64_t l = start + len - s < BNBCY_OPT_BLOCK ? start + len - s : BNBCY_OPT_BLOCK;
        const int64_t b = s / BNBCY_OPT_BLOCK;
        if (L_W > 1 && l < BNBCY_OPT_BLOCK) {
            bnbcy_opt8_chunk_scalar(a, t0, s, l);
            continue;
        }
        float amv[3];
        int fz[3];
        if (L_FN(bnbcy_opt8_block_params)(a, t, b, amv, fz, opt)) L_FN(bnbcy_opt8_block_k)(a, t, &h, b, s, l, amv, fz, opt, 0);
        else L_FN(bnbcy_opt8_block_k)(a, t, &h, b, s, l, amv, fz, opt, 1);
    }
}

L_ATTR static void L_FN(bnbcy_opt8_chunk)(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                                          int64_t len) {
    BNBCY_OPT_DISPATCH(L_W, L_FN(bnbcy_opt8_chunk_k), a, t, start, len);
}

/* ------------------------------------------------------- trust ratio pass --- */

/* Sum of u^2 over [start, start+len) (a chunk starts on a 256-block), in BNBCY_OPT_LANES double
 * lanes, element i of the chunk in lane i mod 16, the lanes added in order at the end: every
 * width gives the same sum. */
/* The would-be update of L_W elements with gradient gr and old states s1, s2; an 8-bit adam lane
 * with a non-finite gradient contributes 0. */
L_ATTR static inline __attribute__((always_inline)) L_T L_FN(bnbcy_opt_unorm_vec)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, const int opt, L_T gr, L_T s1, L_T s2) {
    L_T u = L_FN(bnbcy_rule_unorm)(h, f8, opt, gr, s1, s2);
    if (f8 && opt == BNBCY_OPT_ADAM && L_BAD(gr)) {
        if (L_W > 1) { /* lane by lane */
            float uu[L_W];
            L_STOREF(uu, u);
            float grs[L_W];
            L_STOREF(grs, gr);
            for (int k = 0; k < L_W; k++) if (!isfinite(grs[k])) uu[k] = 0.0f;
            u = L_LOADF(uu);
        } else {
            u = L_SET1(0.0f);
        }
    }
    return u;
}

/* One full 8-bit block of the trust-ratio pass (SIMD widths): the states dequantized first, off the
 * rule's dependency chain. fzc = 0: neither flush can act and the second moment is nonnegative
 * (h.nn2), so the loop carries no flush tests; 1: the flags of h, read at run time. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_opt_unorm_block_k)(
    const L_FN(bnbcy_opt_lhp) *h0, const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t i, double *acc,
    float *d1, float *d2, const int opt, const int fzc) {
    L_FN(bnbcy_opt_lhp) h = *h0;
    const int64_t b = i / BNBCY_OPT_BLOCK;
    const int two = opt == BNBCY_OPT_ADAM, dt = h.dt;
    const float am1 = t->absmax1[b], am2 = two ? t->absmax2[b] : 0.0f;
    if (!fzc) h.fz1 = h.fz2 = 0, h.nn2 = 1;
    if (i + (BNBCY_OPT_PREFETCH + 1) * BNBCY_OPT_BLOCK <= t->n) /* as the update's blocks do; p is not read */
        L_FN(bnbcy_opt8_prefetch)(t, dt, i + BNBCY_OPT_PREFETCH * BNBCY_OPT_BLOCK, opt, 0);
    if (two) L_FN(bnbcy_opt8_deq)((const uint8_t *)t->s2 + i, a->qmap2, L_SET1(am2), h.fz2, d2, BNBCY_OPT_BLOCK);
    for (int j = 0; j < BNBCY_OPT_BLOCK; j += BNBCY_OPT_LANES) { /* i - chunk start: a multiple of 16 */
        /* the first state a group at a time, as the update's blocks do (BNBCY_OPT_GROUP) */
        L_FN(bnbcy_opt8_deq)((const uint8_t *)t->s1 + i + j, a->qmap1, L_SET1(am1), h.fz1, d1 + j, BNBCY_OPT_LANES);
        for (int l = 0; l < BNBCY_OPT_LANES; l += L_W) {
            const L_T s2 = two ? L_LOADF(d2 + j + l) : L_SET1(0.0f);
            L_ACCU(acc + l, L_FN(bnbcy_opt_unorm_vec)(&h, 1, opt, L_LOADT(t->g, dt, i + j + l), L_LOADF(d1 + j + l), s2));
        }
    }
}

L_ATTR static inline __attribute__((always_inline)) double L_FN(bnbcy_opt_unorm_chunk_k)(
    const bnbcy_opt_args *a, const bnbcy_opt_tensor *t0, int64_t start, int64_t len, const int f8, const int opt,
    const int spec) {
    L_FN(bnbcy_opt_lhp) h = L_FN(bnbcy_opt_lhp_spec)(a, t0, spec);
    const bnbcy_opt_tensor tl = *t0, *t = &tl; /* see bnbcy_opt32_chunk_k */
    const int dt = h.dt, two = opt == BNBCY_OPT_ADAM;
    double acc[BNBCY_OPT_LANES] __attribute__((aligned(64))) = {0.0};
    int64_t i = start;
    if (f8 && L_W > 1) {
        float d1[BNBCY_OPT_BLOCK] __attribute__((aligned(64))), d2[BNBCY_OPT_BLOCK] __attribute__((aligned(64)));
        for (; i + BNBCY_OPT_BLOCK <= start + len; i += BNBCY_OPT_BLOCK) {
            const int64_t b = i / BNBCY_OPT_BLOCK;
            const float am1 = t->absmax1[b], am2 = two ? t->absmax2[b] : 0.0f;
            /* the flushes of the dequantized states and of adam's products with the betas act only
             * where bnbcy_opt_may_flush says (a raw denormal or NaN absmax: always flush) */
            h.fz1 = bnbcy_opt_may_flush(am1, a->qmin1, a->b1);
            h.fz2 = bnbcy_opt_may_flush(am2, a->qmin2, a->b2);
            const int nn2 = !two || bnbcy_opt_nn2(a, am2);
            if (!h.fz1 && !h.fz2 && nn2) L_FN(bnbcy_opt_unorm_block_k)(&h, a, t, i, acc, d1, d2, opt, 0);
            else L_FN(bnbcy_opt_unorm_block_k)(&h, a, t, i, acc, d1, d2, opt, 1);
        }
    }
    h.fz1 = h.fz2 = 1;
    for (; i + L_W <= start + len; i += L_W) {
        const L_T gr = L_LOADT(t->g, dt, i);
        L_T s1, s2 = L_SET1(0.0f);
        if (f8) {
            const int64_t b = i / BNBCY_OPT_BLOCK;
            s1 = L_FTZ(L_DEQ((const uint8_t *)t->s1 + i, a->qmap1, L_SET1(t->absmax1[b])));
            if (two) s2 = L_FTZ(L_DEQ((const uint8_t *)t->s2 + i, a->qmap2, L_SET1(t->absmax2[b])));
        } else {
            s1 = L_LOADF((const float *)t->s1 + i);
            if (two) s2 = L_LOADF((const float *)t->s2 + i);
        }
        L_ACCU(acc + (i - start) % BNBCY_OPT_LANES, L_FN(bnbcy_opt_unorm_vec)(&h, f8, opt, gr, s1, s2));
    }
    if (i < start + len) { /* tail: the scalar lanes continue the same accumulators */
        const bnbcy_opt_lhp_scalar hs = bnbcy_opt_lhp_make_scalar(a, t);
        for (; i < start + len; i++) {
            const float gr = bnbcy_load_any(t->g, dt, i);
            float s1, s2 = 0.0f;
            if (f8) {
                const int64_t b = i / BNBCY_OPT_BLOCK;
                s1 = bnbcy_ftz(a->qmap1[((const uint8_t *)t->s1)[i]] * t->absmax1[b]);
                if (two) s2 = bnbcy_ftz(a->qmap2[((const uint8_t *)t->s2)[i]] * t->absmax2[b]);
            } else {
                s1 = ((const float *)t->s1)[i];
                if (two) s2 = ((const float *)t->s2)[i];
            }
            float u = bnbcy_rule_unorm_scalar(&hs, f8, opt, gr, s1, s2);
            if (f8 && two && !isfinite(gr)) u = 0.0f;
            acc[(i - start) % BNBCY_OPT_LANES] += (double)(u * u);
        }
    }
    return bnbcy_opt_lanes_total(acc);
}

L_ATTR static double L_FN(bnbcy_opt_unorm_chunk)(const bnbcy_opt_args *a, const bnbcy_opt_tensor *t, int64_t start,
                                                 int64_t len, int f8) {
    /* the pass has no weight decay: one specialization (float32, no skip_zeros) serves both */
    const int spec = L_W > 1 && bnbcy_opt_spec(a) != BNBCY_OPT_SPEC_GENERIC;
#define BNBCY_OPT_UNORM_CASE(OPT)                                                              \
    case OPT:                                                                                   \
        if (spec) return f8 ? L_FN(bnbcy_opt_unorm_chunk_k)(a, t, start, len, 1, OPT, BNBCY_OPT_SPEC_F32) \
                            : L_FN(bnbcy_opt_unorm_chunk_k)(a, t, start, len, 0, OPT, BNBCY_OPT_SPEC_F32); \
        return f8 ? L_FN(bnbcy_opt_unorm_chunk_k)(a, t, start, len, 1, OPT, BNBCY_OPT_SPEC_GENERIC)  \
                  : L_FN(bnbcy_opt_unorm_chunk_k)(a, t, start, len, 0, OPT, BNBCY_OPT_SPEC_GENERIC);
    switch (a->opt) {
        BNBCY_OPT_UNORM_CASE(BNBCY_OPT_ADAM)
        BNBCY_OPT_UNORM_CASE(BNBCY_OPT_MOMENTUM)
        BNBCY_OPT_UNORM_CASE(BNBCY_OPT_RMSPROP)
        BNBCY_OPT_UNORM_CASE(BNBCY_OPT_ADAGRAD)
    default: return 0.0;
    }
#undef BNBCY_OPT_UNORM_CASE
}
