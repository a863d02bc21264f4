# CPU optimizer updates (NUMERICS.md §6.3-§6.6): one call updates every tensor of a
# parameter group in one OpenMP pass; the loops live in include/bnbcy_cpu_optim.h.

from libc.stdlib cimport malloc, free
from libc.stdint cimport uint32_t

cdef extern from "bnbcy_cpu_optim.h" nogil:
    int BNBCY_OPT_ADAM, BNBCY_OPT_MOMENTUM, BNBCY_OPT_RMSPROP, BNBCY_OPT_ADAGRAD
    int BNBCY_OPT_LION, BNBCY_OPT_ADEMAMIX
    ctypedef struct bnbcy_opt_tensor:
        void *p
        const void *g
        void *s1
        void *s2
        float *absmax1
        float *absmax2
        int64_t n
        int step
        float param_norm
        float us
        double unorm
    ctypedef struct bnbcy_opt_args:
        int opt, dtype, skip_zeros
        float b1, b2, b3, alpha, eps, wd, lr, gnorm_scale, max_unorm
        const float *qmap1
        const float *qmap2
        const bnbcy_q8_table *t1
        const bnbcy_q8_table *t2
        const uint32_t *rq1
        const uint32_t *rq2
    int BNBCY_OPT_RQ_SIZE
    int bnbcy_opt_build_rq(const float *code, const bnbcy_q8_table *t, int sign_fix, uint32_t *rq)
    uint32_t bnbcy_opt_rq_lookup(const uint32_t *rq, float x)
    uint32_t bnbcy_opt_rq_ref(float x, int pos, const float *code, const bnbcy_q8_table *t,
                              int sign_fix)
    int bnbcy_opt_uses_unorm(int opt)
    int bnbcy_opt_update(const bnbcy_opt_args *a, bnbcy_opt_tensor *ts, int ntensors, int bits8,
                         int nthreads)

#: the C rule ids by name (tests/test_optim_table.py checks them against bnbcy/optim/_table.py)
OPT_RULE_IDS = {"adam": BNBCY_OPT_ADAM, "momentum": BNBCY_OPT_MOMENTUM, "rmsprop": BNBCY_OPT_RMSPROP,
                "adagrad": BNBCY_OPT_ADAGRAD, "lion": BNBCY_OPT_LION, "ademamix": BNBCY_OPT_ADEMAMIX}


# Requantization tables of the AVX-512 8-bit path (256 KB each) by (map bytes, sign fix); like
# the search tables, few maps are ever in use.
cdef dict _opt_rq_tables = {}


cdef object _opt_rq_table(TensorView code, object table, bint sign_fix):
    """Bytes holding the requantization table of ``code`` (include/bnbcy_cpu_optim.h,
    bnbcy_opt_build_rq), or None when the map needs the general path."""
    if table is None:
        return None
    key = (PyBytes_FromStringAndSize(<char *>code.data, 256 * sizeof(float)), sign_fix)
    try:
        return _opt_rq_tables[key]
    except KeyError:
        pass
    buf = PyBytes_FromStringAndSize(NULL, BNBCY_OPT_RQ_SIZE * sizeof(uint32_t))
    cdef uint32_t *rq = <uint32_t *>PyBytes_AS_STRING(buf)
    cdef const bnbcy_q8_table *t = <const bnbcy_q8_table *>PyBytes_AS_STRING(table)
    cdef const float *c = <const float *>code.data
    cdef int rc
    with nogil:
        rc = bnbcy_opt_build_rq(c, t, sign_fix, rq)
    result = buf if rc == 0 else None
    if len(_opt_rq_tables) >= _Q8_TABLE_CACHE:
        _opt_rq_tables.pop(next(iter(_opt_rq_tables)))
    _opt_rq_tables[key] = result
    return result


def opt_requant_codes(TensorView code, bint sign_fix, TensorView x, TensorView via_table,
                      TensorView reference):
    """Testing hook: the 8-bit optimizers' requantization codes of the normalized states ``x``
    (float32, for states of x's sign) through the AVX-512 path's table (``via_table``) and
    through the general search plus sign fix (``reference``), both uint8 of x's size.
    Returns False, writing neither, when ``code`` gets no table."""
    _require(code, "code", "float32", 256)
    _require(x, "x", "float32", -1)
    _require(via_table, "via_table", "uint8", x.numel)
    _require(reference, "reference", "uint8", x.numel)
    table = _q8_table(code)
    rq_bytes = _opt_rq_table(code, table, sign_fix)
    if rq_bytes is None:
        return False
    cdef const uint32_t *rq = <const uint32_t *>PyBytes_AS_STRING(rq_bytes)
    cdef const bnbcy_q8_table *t = <const bnbcy_q8_table *>PyBytes_AS_STRING(table)
    cdef const float *c = <const float *>code.data
    cdef const float *xs = <const float *>x.data
    cdef uint8_t *vt = <uint8_t *>via_table.data
    cdef uint8_t *ref = <uint8_t *>reference.data
    cdef int64_t i
    with nogil:
        for i in range(x.numel):
            vt[i] = <uint8_t>bnbcy_opt_rq_lookup(rq, xs[i])
            ref[i] = <uint8_t>bnbcy_opt_rq_ref(xs[i], xs[i] > 0.0, c, t, sign_fix)
    return True


cdef int _opt_code(object name) except -1:
    """The C rule id of optimizer ``name``, through the one table (bnbcy/optim/_table.py)."""
    from bnbcy.optim import _table
    row = _table.KERNELS.get(name) if isinstance(name, str) else None
    if row is None:
        raise ValueError(f"Unsupported optimizer name {name!r}; expected one of {', '.join(_table.OPTIMIZER_NAMES)}")
    return OPT_RULE_IDS[row.rule]


# bnbcy's callers reach these functions with an Update of bnbcy/optim/_validation.py, which has
# checked everything already. The checks below stay because bnbcy._C is importable and callable
# directly: a caller that bypasses the layer with a wrong size or dtype would otherwise make the C
# loops read or write out of bounds.
cdef void _opt_check_lists(int count, list lists, tuple names) except *:
    for lst, nm in zip(lists, names):
        if lst is not None and len(lst) != count:
            raise ValueError(f"{nm} has {len(lst)} entries but params has {count}")


cdef inline void _opt_require(TensorView v, str what, int k, str dtype, int64_t numel) except *:
    # _require's conditions (a CPU view is not is_cuda), so that the name ``what[k]`` is formatted
    # only for its error: a group's call checks several arrays per tensor
    if not (v.device_type == BNBCY_DL_CPU and v.contiguous and (dtype is None or v.dtype == dtype)
            and (numel < 0 or v.numel == numel)):
        _require(v, f"{what}[{k}]", dtype, numel)


cdef void _opt_require_state(object v, str what, int k, str dtype, int64_t numel) except *:
    if not isinstance(v, TensorView):
        raise ValueError(f"{what}[{k}] must be a TensorView, got {type(v).__name__}")
    _opt_require(<TensorView>v, what, k, dtype, numel)
    if (<TensorView>v).readonly:
        raise ValueError(f"{what}[{k}] must be writable")


cdef int _opt_fill(bnbcy_opt_args *a, bnbcy_opt_tensor *ts, list params, list grads, list steps,
                   list param_norms) except -1:
    """Validate params/grads/steps and fill the pointers shared by both kernels; returns the dtype."""
    cdef int k, dtype = -1
    cdef TensorView p, g
    for k in range(len(params)):
        if not isinstance(params[k], TensorView) or not isinstance(grads[k], TensorView):
            raise ValueError(f"params[{k}] and grads[{k}] must be TensorViews")
        p = params[k]
        g = grads[k]
        _opt_require(p, "params", k, None, -1)
        _opt_require(g, "grads", k, None, p.numel)
        if p.readonly:
            raise ValueError(f"params[{k}] must be writable")
        d = 0 if p.dtype == "float32" else _float_code(p, f"params[{k}]")
        if g.dtype != p.dtype:
            raise ValueError(f"grads[{k}] must have the dtype of params[{k}] ({p.dtype}), got {g.dtype}")
        if dtype == -1:
            dtype = d
        elif d != dtype:
            raise ValueError(f"all params of one call must share a dtype: params[{k}] is {p.dtype}")
        step = steps[k]
        if isinstance(step, bool) or int(step) != step or step < 1:
            raise ValueError(f"steps[{k}] must be a positive int, got {step!r}")
        ts[k].p = p.data
        ts[k].g = g.data
        ts[k].n = p.numel
        ts[k].step = <int>int(step)
        ts[k].param_norm = float(param_norms[k]) if param_norms is not None else 0.0
        ts[k].s1 = NULL
        ts[k].s2 = NULL
        ts[k].absmax1 = NULL
        ts[k].absmax2 = NULL
    return dtype


cdef _opt_result(const bnbcy_opt_args *a, bnbcy_opt_tensor *ts, int count):
    if a.max_unorm > 0.0 and bnbcy_opt_uses_unorm(a.opt):
        return [ts[k].unorm for k in range(count)]
    return None


def cpu_optimizer_update_32bit(str name, list params, list grads, list state1, list state2,
                               float beta1, float beta2, float beta3, float alpha, float eps,
                               float weight_decay, float lr, list steps, float gnorm_scale,
                               float max_unorm, list param_norms, bint skip_zeros):
    """One 32-bit update (§6.3/§6.4) of every tensor of a parameter group, in place.

    ``state1``/``state2`` hold float32 TensorViews (``state2`` entries None for 1-state
    optimizers; ademamix state1 has 2·n elements). Returns the per-tensor sums of the
    squared would-be updates (what bnb writes to ``unorm_vec``) when ``max_unorm > 0``
    and the optimizer uses it, else None.
    """
    cdef bnbcy_opt_args a
    a.opt = _opt_code(name)
    cdef int count = len(params), k, rc
    _opt_check_lists(count, [grads, state1, state2, steps, param_norms],
                     ("grads", "state1", "state2", "steps", "param_norms"))
    if max_unorm > 0.0 and param_norms is None:
        raise ValueError("max_unorm > 0 needs param_norms")
    cdef bint two = a.opt == BNBCY_OPT_ADAM or a.opt == BNBCY_OPT_ADEMAMIX
    if two and state2 is None:
        raise ValueError(f"{name} needs state2")
    if count == 0:
        return None
    cdef bnbcy_opt_tensor *ts = <bnbcy_opt_tensor *>malloc(count * sizeof(bnbcy_opt_tensor))
    if ts == NULL:
        raise MemoryError()
    try:
        a.dtype = _opt_fill(&a, ts, params, grads, steps, param_norms)
        for k in range(count):
            _opt_require_state(state1[k], "state1", k, "float32",
                               2 * ts[k].n if a.opt == BNBCY_OPT_ADEMAMIX else ts[k].n)
            ts[k].s1 = (<TensorView>state1[k]).data
            if two:
                _opt_require_state(state2[k], "state2", k, "float32", ts[k].n)
                ts[k].s2 = (<TensorView>state2[k]).data
        a.skip_zeros = skip_zeros
        a.b1, a.b2, a.b3, a.alpha, a.eps = beta1, beta2, beta3, alpha, eps
        a.wd, a.lr, a.gnorm_scale, a.max_unorm = weight_decay, lr, gnorm_scale, max_unorm
        a.qmap1 = a.qmap2 = NULL
        a.t1 = a.t2 = NULL
        a.rq1 = a.rq2 = NULL
        nthreads = omp_get_max_threads()
        with nogil:
            rc = bnbcy_opt_update(&a, ts, count, 0, nthreads)
        if rc != 0:
            raise MemoryError()
        return _opt_result(&a, ts, count)
    finally:
        free(ts)


def cpu_optimizer_update_8bit_blockwise(str name, list params, list grads, list state1, list state2,
                                        TensorView qmap1, TensorView qmap2, list absmax1, list absmax2,
                                        float beta1, float beta2, float beta3, float alpha, float eps,
                                        float weight_decay, float lr, list steps, float gnorm_scale,
                                        float max_unorm, list param_norms, bint skip_zeros):
    """One 8-bit blockwise update (§6.5, blocks of 256) of every tensor of a group, in place.

    ``state1``/``state2`` hold uint8 codes (``state2``/``absmax2``/``qmap2`` None for
    1-state optimizers; ademamix: state1 2·n codes, absmax1 2·nblocks values), ``qmap1``
    the signed and ``qmap2`` the unsigned dynamic map. Returns what
    :func:`cpu_optimizer_update_32bit` returns.
    """
    cdef bnbcy_opt_args a
    a.opt = _opt_code(name)
    cdef int count = len(params), k, rc
    cdef int64_t nb
    _opt_check_lists(count, [grads, state1, state2, absmax1, absmax2, steps, param_norms],
                     ("grads", "state1", "state2", "absmax1", "absmax2", "steps", "param_norms"))
    if max_unorm > 0.0 and param_norms is None:
        raise ValueError("max_unorm > 0 needs param_norms")
    cdef bint two = a.opt == BNBCY_OPT_ADAM or a.opt == BNBCY_OPT_ADEMAMIX
    cdef bint ademamix = a.opt == BNBCY_OPT_ADEMAMIX
    if two and (state2 is None or absmax2 is None or qmap2 is None):
        raise ValueError(f"{name} needs state2, absmax2 and qmap2")
    if qmap1 is None:
        raise ValueError("qmap1 is required")
    _require(qmap1, "qmap1", "float32", 256)
    table1 = _q8_table(qmap1)
    rq1 = _opt_rq_table(qmap1, table1, True)
    table2 = rq2 = None
    if two:
        _require(qmap2, "qmap2", "float32", 256)
        table2 = _q8_table(qmap2)
        rq2 = _opt_rq_table(qmap2, table2, False)
    if count == 0:
        return None
    cdef bnbcy_opt_tensor *ts = <bnbcy_opt_tensor *>malloc(count * sizeof(bnbcy_opt_tensor))
    if ts == NULL:
        raise MemoryError()
    try:
        a.dtype = _opt_fill(&a, ts, params, grads, steps, param_norms)
        for k in range(count):
            nb = (ts[k].n + 255) // 256
            _opt_require_state(state1[k], "state1", k, "uint8", 2 * ts[k].n if ademamix else ts[k].n)
            _opt_require_state(absmax1[k], "absmax1", k, "float32", 2 * nb if ademamix else nb)
            ts[k].s1 = (<TensorView>state1[k]).data
            ts[k].absmax1 = <float *>(<TensorView>absmax1[k]).data
            if two:
                _opt_require_state(state2[k], "state2", k, "uint8", ts[k].n)
                _opt_require_state(absmax2[k], "absmax2", k, "float32", nb)
                ts[k].s2 = (<TensorView>state2[k]).data
                ts[k].absmax2 = <float *>(<TensorView>absmax2[k]).data
        a.skip_zeros = skip_zeros
        a.b1, a.b2, a.b3, a.alpha, a.eps = beta1, beta2, beta3, alpha, eps
        a.wd, a.lr, a.gnorm_scale, a.max_unorm = weight_decay, lr, gnorm_scale, max_unorm
        a.qmap1 = <const float *>qmap1.data
        a.qmap2 = <const float *>qmap2.data if two else NULL
        a.t1 = <const bnbcy_q8_table *>PyBytes_AS_STRING(table1) if table1 is not None else NULL
        a.t2 = <const bnbcy_q8_table *>PyBytes_AS_STRING(table2) if table2 is not None else NULL
        a.rq1 = <const uint32_t *>PyBytes_AS_STRING(rq1) if rq1 is not None else NULL
        a.rq2 = <const uint32_t *>PyBytes_AS_STRING(rq2) if rq2 is not None else NULL
        nthreads = omp_get_max_threads()
        with nogil:
            rc = bnbcy_opt_update(&a, ts, count, 1, nthreads)
        if rc != 0:
            raise MemoryError()
        return _opt_result(&a, ts, count)
    finally:
        free(ts)


# Fingerprints of torch tensors for the optimizer step's cached layouts (bnbcy/optim/_validation.py,
# Layout). Built and compared here: a step compares several per parameter, and most of their cost is
# torch's accessors, which Python bytecode around them only adds to.
cdef object _strided = None


cdef inline bint _fp_equal(object t, tuple fp) except -1:
    return t.data_ptr() == fp[0] and t.shape == fp[1] and t.stride() == fp[2] and t.dtype is fp[3]


cdef inline bint _state_fp_equal(object t, tuple fp) except -1:
    return t.data_ptr() == fp[0] and t.numel() == fp[1] and t.dtype is fp[2]


def tensor_fingerprint(t):
    """``(data_ptr, shape, strides, dtype)`` of a strided torch tensor, what a view of it is made
    of; None for another layout (sparse). Tensors with equal fingerprints have equal views (the
    address also tells the device: CPU and CUDA memory never share addresses)."""
    global _strided
    if _strided is None:
        import torch
        _strided = torch.strided
    if t.layout is not _strided:
        return None
    return (t.data_ptr(), t.shape, t.stride(), t.dtype)


def state_fingerprint(t):
    """``(data_ptr, numel, dtype)`` of an optimizer state tensor: what can change in place
    without replacing the tensor object and move its memory or its extent (``resize_``, ``set_``,
    ``.data`` re-pointed elsewhere, a reallocated storage)."""
    return (t.data_ptr(), t.numel(), t.dtype)


def layout_matches(object p, tuple pfp, dict state, tuple entries, tuple maps, dict seen, object g, object gfp):
    """Whether ``p`` still has the fingerprint ``pfp`` and, for every ``(key, tensor,
    state_fingerprint)`` of ``entries`` and ``maps``, ``state[key]`` is still ``tensor`` with that
    fingerprint: 0 if not; 2 if also the gradient ``g`` has the fingerprint ``gfp``, else 1.
    ``maps`` are shared by many parameters: each is fingerprinted once per ``seen`` (by id)."""
    if not _fp_equal(p, pfp):
        return 0
    cdef tuple e
    for e in entries:
        t = state.get(e[0])
        if t is not e[1] or not _state_fp_equal(t, <tuple>e[2]):
            return 0
    for e in maps:
        t = state.get(e[0])
        if t is not e[1]:
            return 0
        if id(t) not in seen:
            if not _state_fp_equal(t, <tuple>e[2]):
                return 0
            seen[id(t)] = True
    if gfp is None:
        return 1
    try:
        return 2 if _fp_equal(g, <tuple>gfp) else 1
    except RuntimeError:              # a gradient without strided memory (sparse): checked again
        return 1
