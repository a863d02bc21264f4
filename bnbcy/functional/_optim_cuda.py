"""CUDA launchers of the multi-tensor optimizer kernels (``cuda_src/optim.cu``, NUMERICS.md
§6.3-§6.6 with the fixes of §10): the step of a whole parameter group is one update launch
(plus, for ``max_unorm > 0``, one unorm launch and one small reduce launch before it), with
no host synchronisation.

The launchers take lists of torch CUDA tensors (or CuPy arrays) of one device, validate
them, build the tensor table on the host (NumPy int64, layout below and at the top of
``optim.cu``), upload it on the current stream of the parameters' framework and launch
through :data:`bnbcy.kernels.registry`. Importing this module registers the kernel specs and
needs neither CuPy nor a GPU.

Table layout (``_ROW = 16`` int64 words per tensor, rows in launch order)::

    0 p   1 g   2 state1   3 state2 (or 0)   4 absmax1 (8-bit)   5 absmax2 (8-bit)
    6 unorm slot (float32[1], or 0)   7 param_norm device pointer (float32, or 0)
    8 n   9 first chunk of the tensor in the launch's chunk numbering
    10 lo int32 step, hi int32 flags (bit 0 skip_zeros)
    11 lr | weight_decay   12 beta1 | beta2   13 beta3 | alpha   14 eps | gnorm_scale
    15 max_unorm | param_norm (value used when word 7 is 0)       (float32 pairs: lo | hi)

A chunk is 1024 elements for the 32-bit kernels and 256 elements (one quantization block of
the 8-bit states) for the 8-bit kernels.
"""
from __future__ import annotations

import numpy as np

from .. import _C, _arrays, kernels
from ..optim import _table

# The kernels are named by rule (bnbcy/optim/_table.py): one per rule, the others alias them.
NAMES = tuple(_table.RULE_IDS)
ALIASES = {k.name: k.rule for k in _table.KERNELS.values() if k.name != k.rule}
UNORM_NAMES = tuple(r for r in NAMES if any(k.trust_ratio and k.rule == r for k in _table.KERNELS.values()))
TWO_STATE = tuple(r for r in NAMES if any(k.states == 2 and k.rule == r for k in _table.KERNELS.values()))
_SUFFIX = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}

# Must match cuda_src/optim.cu.
_THREADS = 256          # BNBCY_OPT_THREADS
_ROW = 16               # BNBCY_OPT_ROW
_CHUNK32 = 1024         # BNBCY_OPT32_CHUNK
_CHUNK8 = 256           # BNBCY_OPT8_CHUNK (= the 8-bit blocksize)
_MAX_GRID = 8192        # CTAs loop over the chunks past the grid
_INT32_MAX = 2**31 - 1

_DTYPES = tuple(_SUFFIX.values())
_OPT32 = kernels.register(kernels.KernelSpec(
    "optim32", "optim", "bnbcy_optim32_{name}_{dtype}", "piq",
    (("name", NAMES), ("dtype", _DTYPES))))
_OPT8 = kernels.register(kernels.KernelSpec(
    "optim8", "optim", "bnbcy_optim8_{name}_{dtype}", "piqpp",
    (("name", NAMES), ("dtype", _DTYPES))))
_UNORM32 = kernels.register(kernels.KernelSpec(
    "optim_unorm32", "optim", "bnbcy_optim_unorm32_{name}_{dtype}", "piqp",
    (("name", UNORM_NAMES), ("dtype", _DTYPES))))
_UNORM8 = kernels.register(kernels.KernelSpec(
    "optim_unorm8", "optim", "bnbcy_optim_unorm8_{name}_{dtype}", "piqppp",
    (("name", UNORM_NAMES), ("dtype", _DTYPES))))
_UNORM_REDUCE = kernels.register(kernels.KernelSpec(
    "optim_unorm_reduce", "optim", "bnbcy_optim_unorm_reduce", "piqp"))


def _cdiv(a, b):
    return -(-a // b)


def _kernel_name(name):
    name = ALIASES.get(name, name)
    if name not in NAMES:
        raise ValueError(f"unsupported optimizer name {name!r}; one of {NAMES + tuple(ALIASES)}")
    return name


def _per_tensor(value, count, what, dtype=np.float32):
    """A scalar broadcast to ``count`` entries, or a sequence of ``count`` entries."""
    arr = np.asarray(value, dtype=dtype)
    if arr.ndim == 0:
        return np.full(count, arr, dtype=dtype)
    if arr.shape != (count,):
        raise ValueError(f"{what} must be a scalar or have one entry per tensor ({count}), got shape {arr.shape}")
    return arr


def _list(xs, count, what, allow_none=False):
    if xs is None:
        if allow_none:
            return [None] * count
        raise ValueError(f"{what} is required")
    xs = list(xs)
    if len(xs) != count:
        raise ValueError(f"{what} must have one entry per parameter ({count}), got {len(xs)}")
    return xs


def _like_view(params):
    if len(params) == 0:
        raise ValueError("params must not be empty")
    x = params[0]
    if x is None or not hasattr(x, "__dlpack__"):
        raise TypeError(f"params[0] must be a torch.Tensor or cupy.ndarray, got {type(x).__name__}")
    v = _C.view(_arrays._plain(x, _C.kind_of(x)), "params[0]")
    if not kernels.use_cuda_kernels(v):
        raise ValueError(f"the optimizer kernels need CUDA arrays, got params[0] on {v.device}")
    if v.dtype not in _SUFFIX:
        raise ValueError(f"params must be float32, float16 or bfloat16, got {v.dtype}")
    return v


def _param_view(x, k, like):
    if x is None or not hasattr(x, "__dlpack__"):
        raise TypeError(f"params[{k}] must be a {like.kind} array, got {type(x).__name__}")
    numel = _C.view(_arrays._plain(x, _C.kind_of(x)), f"params[{k}]").numel
    return _arrays.output_view(x, f"params[{k}]", like, like.dtype, numel)


class _Group:
    """Validated common arguments of one launch: views, per-tensor scalars, chunk layout."""

    def __init__(self, name, params, grads, unorms, steps, param_norms, hyper, max_unorm, skip_zeros, chunk):
        self.name = _kernel_name(name)
        self.like = _like_view(params)
        like = self.like
        nt = len(params)
        self.dtype = like.dtype
        self.p = [_param_view(x, k, like) for k, x in enumerate(params)]
        self.n = [v.numel for v in self.p]
        self.g = [_arrays.output_view(x, f"grads[{k}]", like, like.dtype, self.n[k])
                  for k, x in enumerate(_list(grads, nt, "grads"))]
        self.max_unorm = _per_tensor(max_unorm, nt, "max_unorm")
        if np.any(self.max_unorm > 0) and self.name == "lion":
            raise NotImplementedError("max_unorm is not supported for lion (bitsandbytes does not expose it)")
        if self.name == "ademamix":
            self.max_unorm = np.zeros(nt, np.float32)  # bnb: no-op for AdEMAMix
        unorms = _list(unorms, nt, "unorms", allow_none=True)
        self.unorm = [None] * nt
        self.pnorm_ptr = np.zeros(nt, np.int64)
        self.pnorm_val = np.zeros(nt, np.float32)
        pns = _list(param_norms, nt, "param_norms", allow_none=True)
        for k in range(nt):
            if self.max_unorm[k] > 0:
                if unorms[k] is None:
                    raise ValueError(f"unorms[{k}] (float32[1]) is required when max_unorm > 0")
                self.unorm[k] = _arrays.output_view(unorms[k], f"unorms[{k}]", like, "float32", 1)
                pn = pns[k]
                if pn is None:
                    raise ValueError(f"param_norms[{k}] is required when max_unorm > 0")
                if hasattr(pn, "__dlpack__"):
                    self.pnorm_ptr[k] = _arrays.output_view(pn, f"param_norms[{k}]", like, "float32", 1).ptr
                else:
                    self.pnorm_val[k] = float(pn)
        self.steps = _per_tensor(steps, nt, "steps", np.int64)
        if np.any(self.steps < 1) or np.any(self.steps > _INT32_MAX):
            raise ValueError("steps must be in [1, 2**31)")
        self.hyper = {k: _per_tensor(v, nt, k) for k, v in hyper.items()}
        self.skip = _per_tensor(skip_zeros, nt, "skip_zeros", np.int64) != 0
        # empty tensors take no chunks and stay out of the table
        self.rows = [k for k in range(nt) if self.n[k] > 0]
        chunks = np.array([_cdiv(self.n[k], chunk) for k in self.rows], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) if len(chunks) else chunks
        self.total_chunks = int(chunks.sum()) if len(chunks) else 0
        self.any_unorm = bool(np.any(self.max_unorm[self.rows] > 0)) if self.rows else False

    def table(self, s1, s2, a1, a2):
        rows = self.rows
        nt = len(rows)
        t = np.zeros((nt, _ROW), dtype=np.int64)
        f = t.view(np.float32).reshape(nt, 2 * _ROW)

        def ptrs(vs):
            return np.array([0 if vs is None or vs[k] is None else vs[k].ptr for k in rows], dtype=np.uint64)

        t[:, 0] = ptrs(self.p).view(np.int64)
        t[:, 1] = ptrs(self.g).view(np.int64)
        t[:, 2] = ptrs(s1).view(np.int64)
        t[:, 3] = ptrs(s2).view(np.int64)
        t[:, 4] = ptrs(a1).view(np.int64)
        t[:, 5] = ptrs(a2).view(np.int64)
        t[:, 6] = ptrs(self.unorm).view(np.int64)
        t[:, 7] = self.pnorm_ptr[rows]
        t[:, 8] = np.array([self.n[k] for k in rows], dtype=np.int64)
        t[:, 9] = self.first
        t[:, 10] = self.steps[rows] | (self.skip[rows].astype(np.int64) << 32)
        h = self.hyper
        for word, (lo, hi) in ((11, (h["lr"], h["weight_decay"])), (12, (h["beta1"], h["beta2"])),
                               (13, (h["beta3"], h["alpha"])), (14, (h["eps"], h["gnorm_scale"])),
                               (15, (self.max_unorm, self.pnorm_val))):
            f[:, 2 * word] = lo[rows]
            f[:, 2 * word + 1] = hi[rows]
        return t.reshape(-1)

    def upload(self, table):
        """The table on the parameters' device, copied on their framework's current stream."""
        obj = self.like.obj
        if not self.like.is_cuda:  # the SIMT emulator (bnbcy.kernels.emulate) reads host memory
            return table, _C.view(table, "table")
        if self.like.kind == "torch":
            import torch
            host = stage_table(table, lambda t: t.pin_memory(), torch.cuda.is_current_stream_capturing())
            dev = host.to(obj.device, non_blocking=True)
        else:
            import cupy
            with cupy.cuda.Device(self.like.device_id):
                dev = cupy.asarray(table)
        return dev, _C.view(dev, "table")

    def launch(self, spec, variant, args, work_items):
        """Launch ``spec`` with one CTA per work item (chunk or tensor), at most ``_MAX_GRID``."""
        grid = (max(1, min(int(work_items), _MAX_GRID)),)
        kernels.registry.launch(spec, variant, grid, (_THREADS,), args, self.like)


#: pinned host tables of launches captured into CUDA graphs: a replay copies from the captured
#: host address again, so the buffer must never return to torch's caching host allocator
GRAPH_TABLES: list = []


def stage_table(table, pin, capturing):
    """The tensor table as a pinned host tensor for an asynchronous upload.

    Outside graph capture the buffer may go back to torch's caching host allocator once the
    copy has run (it records the copy's stream). Under capture the copy is recorded, not run:
    every replay reads the captured host address again, so a recycled buffer would hand the
    kernels another launch's table. Captured tables are therefore kept for the life of the
    process (:data:`GRAPH_TABLES`; one small table per captured launch). A replay runs the
    captured step's table (its step counts and hyper-parameters), as bitsandbytes' captured
    launches run their captured scalars.
    """
    import torch
    host = pin(torch.from_numpy(table))
    if capturing:
        GRAPH_TABLES.append(host)
    return host


def _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale):
    return {"beta1": beta1, "beta2": beta2, "beta3": beta3, "alpha": alpha, "eps": eps,
            "weight_decay": weight_decay, "lr": lr, "gnorm_scale": gnorm_scale}


def launch_update_32bit(name, params, grads, state1, state2, unorms, steps, param_norms, beta1, beta2,
                        beta3, alpha, eps, weight_decay, lr, gnorm_scale=1.0, max_unorm=0.0,
                        skip_zeros=False):
    """One multi-tensor step of bitsandbytes' ``optimizer_update_32bit`` (NUMERICS.md §6.3/§6.4).

    Parameters
    ----------
    name : str
        ``adam``, ``lamb`` (= adam), ``ademamix``, ``momentum``, ``lars`` (= momentum),
        ``rmsprop``, ``adagrad`` or ``lion``.
    params, grads : list of arrays
        Contiguous CUDA tensors of one device and one dtype (float32/float16/bfloat16); params
        are updated in place, grads have the params' dtype and sizes.
    state1, state2 : list of arrays
        float32 states (``state1`` ``[2, *p.shape]`` for ademamix); ``state2`` only for
        adam/ademamix (may be None otherwise).
    unorms : list or None
        float32[1] slots (``unorm_vec``) of the tensors with ``max_unorm > 0``: written with
        ``sum u**2`` (deterministically) before the update, which reads it.
    steps : int or list of int
        Step of each tensor (first update: 1).
    param_norms : list or None
        ``||p||`` per tensor (float or float32[1] device array), read where ``max_unorm > 0``.
    beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, max_unorm : float or list
        Scalars for the whole group, or one value per tensor.
    skip_zeros : bool or list of bool
    """
    nt = len(params)
    grp = _Group(name, params, grads, unorms, steps, param_norms,
                 _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale),
                 max_unorm, skip_zeros, _CHUNK32)
    like, nm = grp.like, grp.name
    s1_mul = 2 if nm == "ademamix" else 1
    s1 = [_arrays.output_view(x, f"state1[{k}]", like, "float32", s1_mul * grp.n[k])
          for k, x in enumerate(_list(state1, nt, "state1"))]
    s2 = None
    if nm in TWO_STATE:
        s2 = [_arrays.output_view(x, f"state2[{k}]", like, "float32", grp.n[k])
              for k, x in enumerate(_list(state2, nt, "state2"))]
    if grp.total_chunks == 0:
        return
    dev, tv = grp.upload(grp.table(s1, s2, None, None))
    nrows, total = len(grp.rows), grp.total_chunks
    variant = {"name": nm, "dtype": _SUFFIX[grp.dtype]}
    if grp.any_unorm:
        partials = _arrays.empty(like, (total,), "float32")
        pv = _C.view(partials, "partials")
        grp.launch(_UNORM32, variant, (tv, nrows, total, pv), total)
        grp.launch(_UNORM_REDUCE, {}, (tv, nrows, total, pv), nrows)
    grp.launch(_OPT32, variant, (tv, nrows, total), total)
    del dev


def launch_update_8bit_blockwise(name, params, grads, state1, state2, qmap1, qmap2, absmax1, absmax2,
                                 unorms, steps, param_norms, beta1, beta2, beta3, alpha, eps,
                                 weight_decay, lr, gnorm_scale=1.0, max_unorm=0.0, skip_zeros=False):
    """One multi-tensor step of bitsandbytes' ``optimizer_update_8bit_blockwise`` (§6.5, blocks of
    256), with the fixes of §10: AdEMAMix's m2 absmax at ``absmax1[1, b]``, skipped elements
    (``skip_zeros``) keep their dequantized old state, and ``lamb``/``lars`` (``max_unorm > 0``)
    apply the trust ratio (adam/momentum/rmsprop).

    Parameters
    ----------
    state1, state2 : list of arrays
        uint8 codes (``state1`` ``[2, *p.shape]`` for ademamix; ``state2`` for adam/ademamix).
    qmap1, qmap2 : array
        float32[256] signed (state1) and unsigned (state2) dynamic maps, shared by the group.
    absmax1, absmax2 : list of arrays
        float32 ``[ceil(n/256)]`` (``[2, ceil(n/256)]`` for ademamix's absmax1).
    unorms, steps, param_norms, scalars, skip_zeros
        As :func:`launch_update_32bit`.
    """
    nt = len(params)
    grp = _Group(name, params, grads, unorms, steps, param_norms,
                 _hyper(beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale),
                 max_unorm, skip_zeros, _CHUNK8)
    like, nm = grp.like, grp.name
    two = nm in TWO_STATE
    mul = 2 if nm == "ademamix" else 1
    nblocks = [_cdiv(n, _CHUNK8) for n in grp.n]
    s1 = [_arrays.output_view(x, f"state1[{k}]", like, "uint8", mul * grp.n[k])
          for k, x in enumerate(_list(state1, nt, "state1"))]
    a1 = [_arrays.output_view(x, f"absmax1[{k}]", like, "float32", mul * nblocks[k])
          for k, x in enumerate(_list(absmax1, nt, "absmax1"))]
    q1 = _arrays.output_view(qmap1, "qmap1", like, "float32", 256)
    s2 = a2 = None
    q2 = None
    if two:
        s2 = [_arrays.output_view(x, f"state2[{k}]", like, "uint8", grp.n[k])
              for k, x in enumerate(_list(state2, nt, "state2"))]
        a2 = [_arrays.output_view(x, f"absmax2[{k}]", like, "float32", nblocks[k])
              for k, x in enumerate(_list(absmax2, nt, "absmax2"))]
        q2 = _arrays.output_view(qmap2, "qmap2", like, "float32", 256)
    if grp.total_chunks == 0:
        return
    dev, tv = grp.upload(grp.table(s1, s2, a1, a2))
    nrows, total = len(grp.rows), grp.total_chunks
    variant = {"name": nm, "dtype": _SUFFIX[grp.dtype]}
    if grp.any_unorm:
        if nm not in UNORM_NAMES:
            raise NotImplementedError(f"max_unorm is not supported for {nm}")
        partials = _arrays.empty(like, (total,), "float32")
        pv = _C.view(partials, "partials")
        grp.launch(_UNORM8, variant, (tv, nrows, total, q1, q2, pv), total)
        grp.launch(_UNORM_REDUCE, {}, (tv, nrows, total, pv), nrows)
    grp.launch(_OPT8, variant, (tv, nrows, total, q1, q2), total)
    del dev
