/* The optimizer update rules (NUMERICS.md §6.3-§6.6), each written once, generic over the lane
 * type of bnbcy_cpu_optim_lanes.h (included after it, once per lane width; no include guard).
 *
 * A rule maps (gradient, parameter, old states) to (new states, new parameter) for one state
 * format: f8 = 0 is the 32-bit format (states are the stored floats), f8 = 1 the 8-bit blockwise
 * one (states are the dequantized codes). The two formats follow bitsandbytes' two CUDA kernels,
 * whose float32 rounding points differ (the 8-bit kernel flushes denormals and pairs its fmas
 * differently); where they do, the rule says so with `if (f8)`. f8 and the optimizer are
 * compile-time constants at every call (the loops are instantiated per optimizer), so each
 * instantiation carries only its own arithmetic.
 *
 * The rules compute every lane; the special cases that change what is stored (skip_zeros,
 * a non-finite gradient in the 8-bit 2-state format) are flagged through `odd` and handled by
 * the caller, which redoes such a vector lane by lane with the scalar instantiation, where
 * the rule implements them exactly. */

/* Per-call scalars of the rules, as lanes: one typed record built once per chunk/block. */
typedef struct {
    L_T b1, b2, b3, omb1, omb2, omb3, eps, lr, wd, decay, gns, us, ssus, c2eps, c1, c2, alpha, r1, r2;
    int dt, skip, has_wd, first;
    /* 8-bit: whether the flushes of the dequantized states 1, 2, 3 and of their products with the
     * betas can act (bnbcy_opt_may_flush; set per block, 1 = always flush, which is exact) */
    int fz1, fz2, fz3;
    /* 8-bit: the old second moment is >= 0, -0 or NaN in every lane (a nonnegative map and
     * absmax), so the new one is too and L_FTZ_NN flushes it exactly */
    int nn2;
    /* 8-bit SIMD: the maps and the block's absmaxes are finite, so its old states are; a vector whose gradient
     * and old parameter are finite then has no NaN operand but the ones it makes (default NaNs),
     * and gives the scalar path's bits without testing its results */
    int fin;
} L_FN(bnbcy_opt_lhp);

L_ATTR static inline __attribute__((always_inline)) L_FN(bnbcy_opt_lhp) L_FN(bnbcy_opt_lhp_make)(const bnbcy_opt_args *a,
                                                                  const bnbcy_opt_tensor *t) {
    L_FN(bnbcy_opt_lhp) h;
    h.b1 = L_SET1(a->b1); h.b2 = L_SET1(a->b2); h.b3 = L_SET1(a->b3);
    h.omb1 = L_SET1(1.0f - a->b1); h.omb2 = L_SET1(1.0f - a->b2); h.omb3 = L_SET1(1.0f - a->b3);
    h.eps = L_SET1(a->eps); h.lr = L_SET1(a->lr); h.wd = L_SET1(a->wd);
    h.decay = L_SET1(1.0f - a->lr * a->wd); h.gns = L_SET1(a->gnorm_scale); h.us = L_SET1(t->us);
    h.ssus = L_SET1(t->ss * t->us); h.c2eps = L_SET1(t->c2eps); h.c1 = L_SET1(t->c1); h.c2 = L_SET1(t->c2);
    h.alpha = L_SET1(a->alpha); h.r1 = L_SET1(t->r1); h.r2 = L_SET1(t->r2);
    h.dt = a->dtype; h.skip = a->skip_zeros; h.has_wd = a->wd > 0.0f; h.first = t->step == 1;
    h.fz1 = h.fz2 = h.fz3 = 1;
    h.nn2 = h.fin = 0;
    return h;
}

/* ---- 2-state rules. g: the (clipped) gradient; *p the parameter (updated). ---- */

/* adam / lamb moments: s1 = m, s2 = v (shared by the update and the trust-ratio pass). */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_ema_adam)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T g, L_T *s1, L_T *s2) {
    if (f8) {
        const L_T v = L_FMA(g, L_MUL(h->omb2, g), L_FTZ_IF(h->fz2, L_MUL(*s2, h->b2)));
        *s2 = h->nn2 ? L_FTZ_NN(v) : L_FTZ(v);
        *s1 = L_FTZ(L_FMA(h->omb1, g, L_FTZ_IF(h->fz1, L_MUL(*s1, h->b1))));
    } else {
        *s1 = L_FMA(*s1, h->b1, L_MUL(h->omb1, g));
        *s2 = L_FMA(*s2, h->b2, L_MUL(h->omb2, L_MUL(g, g)));
    }
}

/* adam / lamb update. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_rule_adam)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T g, L_T *s1, L_T *s2, L_T *p) {
    L_FN(bnbcy_ema_adam)(h, f8, g, s1, s2);
    *p = L_ROUND(L_FMA(h->ssus, L_DIV(*s1, L_ADD(L_SQRT(*s2), h->c2eps)), *p), h->dt);
    if (h->has_wd) *p = L_MUL(*p, h->decay); /* the store rounds it */
}

/* ademamix: s1 = fast EMA m1, s3 = slow EMA m2, s2 = nu. */
L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_rule_ademamix)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T g, L_T *s1, L_T *s2, L_T *s3, L_T *p) {
    if (f8) {
        const L_T v = L_FMA(g, L_MUL(h->omb2, g), L_FTZ_IF(h->fz2, L_MUL(*s2, h->b2)));
        *s2 = h->nn2 ? L_FTZ_NN(v) : L_FTZ(v);
        *s1 = L_FTZ(L_FMA(h->omb1, g, L_FTZ_IF(h->fz1, L_MUL(*s1, h->b1))));
        *s3 = L_FTZ(L_FMA(h->omb3, g, L_FTZ_IF(h->fz3, L_MUL(*s3, h->b3))));
    } else {
        *s1 = L_FMA(*s1, h->b1, L_MUL(h->omb1, g));
        *s3 = L_FMA(*s3, h->b3, L_MUL(h->omb3, g));
        *s2 = L_FMA(*s2, h->b2, L_MUL(g, L_MUL(h->omb2, g)));
    }
    const L_T upd = L_MUL(L_DIV(L_FMA(*s3, h->alpha, L_DIV(*s1, h->c1)), L_ADD(L_DIV(L_SQRT(*s2), h->c2), h->eps)),
                          h->lr);
    *p = L_ROUND(L_SUB(*p, upd), h->dt);
    if (h->has_wd) *p = L_MUL(*p, h->decay);
}

/* ---- 1-state rules. gr: the raw gradient; g: clipped (and, but for lion, weight-decayed). ---- */

L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_rule_momentum)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T gr, L_T g, L_T *s, L_T *p) {
    (void)gr;
    *s = h->first ? g : L_FMA(*s, h->b1, g);
    if (f8) *s = L_FTZ(*s);
    *p = L_SUB(*p, L_MUL(h->us, L_MUL(*s, h->lr)));
}

L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_rule_rmsprop)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T gr, L_T g, L_T *s, L_T *p) {
    if (f8) *s = L_FTZ(L_FMA(h->omb1, L_MUL(g, g), L_FTZ_IF(h->fz1, L_MUL(*s, h->b1))));
    else *s = L_FMA(*s, h->b1, L_MUL(g, L_MUL(h->omb1, g)));
    /* bnb's 8-bit kernel divides the raw gradient */
    *p = L_SUB(*p, L_MUL(h->us, L_MUL(L_DIV(f8 ? gr : g, L_ADD(L_SQRT(*s), h->eps)), h->lr)));
}

L_ATTR static inline __attribute__((always_inline)) void L_FN(bnbcy_rule_adagrad)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T gr, L_T g, L_T *s, L_T *p) {
    *s = L_FMA(g, g, *s);
    if (f8) *s = L_FTZ(*s);
    *p = L_SUB(*p, L_MUL(L_DIV(f8 ? gr : g, L_ADD(L_SQRT(*s), h->eps)), h->lr));
}

/* lion (decoupled weight decay, applied to p by the caller). Returns sign(d) * lr as the
 * 8-bit format rounds it (its skip_zeros test). */
L_ATTR static inline __attribute__((always_inline)) L_T L_FN(bnbcy_rule_lion)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, L_T gr, L_T g, L_T *s, L_T *p) {
    (void)gr;
    if (f8) {
        const L_T gs = L_ROUND(L_MUL(L_SGN(L_FMA(h->omb1, g, L_FTZ_IF(h->fz1, L_MUL(*s, h->b1)))), h->lr), h->dt);
        *s = L_FTZ(L_FMA(h->omb2, g, L_FTZ_IF(h->fz1, L_MUL(*s, h->b2))));
        *p = L_SUB(*p, gs);
        return gs;
    }
    const L_T d = L_FMA(*s, h->b1, L_MUL(h->omb1, g));
    *p = L_SUB(*p, L_MUL(h->us, L_MUL(L_SGN(d), h->lr)));
    *s = L_FMA(*s, h->b2, L_MUL(h->omb2, g));
    return d;
}

/* One 1-state update: gradient scaling, weight decay and the rule. *pd receives p after lion's
 * decoupled decay (what skip_zeros keeps of a lane whose lion step is 0). Returns the lanes
 * skip_zeros leaves alone: bit k for a zero gradient (the old p and state are kept), bit 16 + k
 * for a zero 8-bit lion step (*pd and the new state are stored). */
L_ATTR static inline __attribute__((always_inline)) int L_FN(bnbcy_rule_1state)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, const int opt, L_T gr, L_T *s, L_T *p, L_T *pd) {
    L_T g = L_MUL(h->gns, gr);
    if (!f8) g = L_ROUND(g, h->dt);
    if (h->has_wd) {
        if (opt == BNBCY_OPT_LION) *p = L_ROUND(L_MUL(*p, h->decay), h->dt);
        else if (f8) g = L_FMA(*p, h->wd, g);
        else g = L_ROUND(L_FMA(*p, h->wd, g), h->dt);
    }
    *pd = *p;
    int skip = h->skip ? L_ZERO(f8 ? gr : g) : 0;
    switch (opt) {
    case BNBCY_OPT_MOMENTUM: L_FN(bnbcy_rule_momentum)(h, f8, gr, g, s, p); break;
    case BNBCY_OPT_RMSPROP: L_FN(bnbcy_rule_rmsprop)(h, f8, gr, g, s, p); break;
    case BNBCY_OPT_ADAGRAD: L_FN(bnbcy_rule_adagrad)(h, f8, gr, g, s, p); break;
    default: {
        const L_T gs = L_FN(bnbcy_rule_lion)(h, f8, gr, g, s, p);
        if (f8 && h->skip) skip |= L_ZERO(gs) << 16;
    }
    }
    return skip;
}

/* The would-be update u of the trust ratio (§6.4: no weight decay; what bnb's precondition
 * kernels compute, whose flushes differ from the update's). gr: the raw gradient; s1, s2 the
 * old states. The caller zeroes 8-bit adam lanes with a non-finite gradient. */
L_ATTR static inline __attribute__((always_inline)) L_T L_FN(bnbcy_rule_unorm)(
    const L_FN(bnbcy_opt_lhp) *h, const int f8, const int opt, L_T gr, L_T s1, L_T s2) {
    L_T g = L_MUL(h->gns, gr);
    if (!f8) g = L_ROUND(g, h->dt);
    switch (opt) {
    case BNBCY_OPT_ADAM:
        L_FN(bnbcy_ema_adam)(h, f8, g, &s1, &s2);
        return L_DIV(L_MUL(s1, h->r1), L_ADD(L_SQRT(L_MUL(s2, h->r2)), h->eps));
    case BNBCY_OPT_MOMENTUM: return h->first ? g : L_FMA(s1, h->b1, g);
    case BNBCY_OPT_RMSPROP:
        s1 = f8 ? L_FMA(h->omb1, L_MUL(g, g), L_FTZ(L_MUL(s1, h->b1))) : L_FMA(s1, h->b1, L_MUL(g, L_MUL(h->omb1, g)));
        return L_DIV(g, L_ADD(L_SQRT(s1), h->eps));
    default: /* adagrad */
        return L_DIV(g, L_ADD(L_SQRT(L_FMA(g, g, s1)), h->eps));
    }
}
