"""CUDA launchers of the multi-tensor optimizer kernels (``cuda_src/optim.cu``, NUMERICS.md
§6.3-§6.6 with the fixes of §10): the step of a whole parameter group is one update launch
(plus, for ``max_unorm > 0``, one unorm launch and one small reduce launch before it), with
no host synchronisation.

The launchers take a validated update (``bnbcy.optim._validation.Update``: views of torch CUDA
tensors or CuPy arrays of one device; the public ``launch_update_*`` validate their arguments
there first), build the tensor table on the host (NumPy int64, layout below and at the top of
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
import torch

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


def _device_norm(p):
    """||p|| as a float32[1] array on p's device (no host synchronisation)."""
    if isinstance(p, torch.Tensor):
        return torch.linalg.vector_norm(p.detach().float()).reshape(1)
    import cupy
    return cupy.linalg.norm(p.astype(cupy.float32).ravel()).reshape(1)


def _norm_slot(p, value):
    """||p|| given on the host, as a float32[1] array on p's device."""
    if isinstance(p, torch.Tensor):
        return torch.full((1,), value, dtype=torch.float32, device=p.device)
    import cupy
    return cupy.full((1,), value, dtype=cupy.float32)


class _Group:
    """One launch's tensors (the indices ``idx`` of a validated update, one dtype): table rows and
    chunk layout."""

    def __init__(self, u, idx, chunk):
        self.u, self.idx = u, idx
        self.name = u.kernel.rule
        self.like = u.p[idx[0]]
        self.dtype = self.like.dtype
        self.n = [u.p[k].numel for k in idx]
        nt = len(idx)
        # bnb: max_unorm is a no-op for AdEMAMix (its kernels have no trust-ratio pass)
        self.max_unorm = np.full(nt, 0.0 if self.name == "ademamix" else u.hyper.max_unorm, np.float32)
        self.unorm = [None] * nt
        self.keep = []                            # norms made here, alive until the launch is queued
        self.pnorm_ptr = np.zeros(nt, np.int64)
        self.pnorm_val = np.zeros(nt, np.float32)
        if self.max_unorm[0] > 0:
            for j, k in enumerate(idx):
                slot = u.unorm_vecs[k]
                if slot is None:                  # the update norm goes to a scratch slot
                    slot = _arrays.empty(self.like, (1,), "float32")
                self.unorm[j] = _C.view(slot, "unorm_vec")
                pn = None if u.param_norms is None else u.param_norms[k]
                if pn is None:
                    pn = _device_norm(u.ps[k])
                elif not hasattr(pn, "__dlpack__"):
                    pn = _norm_slot(u.ps[k], pn)
                self.keep.append(pn)
                self.pnorm_ptr[j] = _C.view(pn, "param_norm").ptr
        self.steps = np.array([u.steps[k] for k in idx], dtype=np.int64)
        h = u.hyper
        self.hyper = {k: np.full(nt, getattr(h, k), np.float32) for k in
                      ("beta1", "beta2", "beta3", "alpha", "eps", "weight_decay", "lr")}
        self.hyper["gnorm_scale"] = np.full(nt, u.gnorm_scale, np.float32)
        self.skip = np.full(nt, bool(h.skip_zeros))
        # empty tensors take no chunks and stay out of the table
        self.rows = [j for j in range(nt) if self.n[j] > 0]
        chunks = np.array([_cdiv(self.n[j], chunk) for j in self.rows], dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(chunks)[:-1]]).astype(np.int64) if len(chunks) else chunks
        self.total_chunks = int(chunks.sum()) if len(chunks) else 0
        self.any_unorm = bool(np.any(self.max_unorm[self.rows] > 0)) if self.rows else False

    def views(self, which):
        """The update's views ``which`` (``"p"``, ``"s1"``, ...) of this launch, or None."""
        vs = getattr(self.u, which)
        return [vs[k] for k in self.idx]

    def table(self):
        rows = self.rows
        nt = len(rows)
        t = np.zeros((nt, _ROW), dtype=np.int64)
        f = t.view(np.float32).reshape(nt, 2 * _ROW)

        def ptrs(vs):
            return np.array([0 if vs[j] is None else vs[j].ptr for j in rows], dtype=np.uint64).view(np.int64)

        for word, which in enumerate(("p", "g", "s1", "s2", "a1", "a2")):
            t[:, word] = ptrs(self.views(which))
        t[:, 6] = ptrs(self.unorm)
        t[:, 7] = self.pnorm_ptr[rows]
        t[:, 8] = np.array([self.n[j] for j in rows], dtype=np.int64)
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
            # a pinned buffer goes back to torch's caching host allocator after the copy (recorded
            # on the stream); CUDA-graph capture, whose replays would reread it, is refused by
            # the validation layer
            dev = torch.from_numpy(table).pin_memory().to(obj.device, non_blocking=True)
        else:
            import cupy
            with cupy.cuda.Device(self.like.device_id):
                dev = cupy.asarray(table)
        return dev, _C.view(dev, "table")

    def launch(self, spec, variant, args, work_items):
        """Launch ``spec`` with one CTA per work item (chunk or tensor), at most ``_MAX_GRID``."""
        grid = (max(1, min(int(work_items), _MAX_GRID)),)
        kernels.registry.launch(spec, variant, grid, (_THREADS,), args, self.like)


def launch(u):
    """Run a validated update (:class:`bnbcy.optim._validation.Update`) on CUDA arrays (or in the
    SIMT emulator): per dtype one table upload, the trust-ratio passes where ``max_unorm > 0``
    and one update launch. Nothing is checked here."""
    chunk = _CHUNK8 if u.eight else _CHUNK32
    for idx in u.groups.values():
        grp = _Group(u, idx, chunk)
        if grp.total_chunks == 0:
            continue
        dev, tv = grp.upload(grp.table())
        nrows, total = len(grp.rows), grp.total_chunks
        variant = {"name": grp.name, "dtype": _SUFFIX[grp.dtype]}
        q = (u.q1, u.q2) if u.eight else ()
        if grp.any_unorm:
            partials = _arrays.empty(grp.like, (total,), "float32")
            pv = _C.view(partials, "partials")
            grp.launch(_UNORM8 if u.eight else _UNORM32, variant, (tv, nrows, total, *q, pv), total)
            grp.launch(_UNORM_REDUCE, {}, (tv, nrows, total, pv), nrows)
        grp.launch(_OPT8 if u.eight else _OPT32, variant, (tv, nrows, total, *q), total)
        del dev


def _require_cuda(u):
    if not u.cuda:
        raise ValueError(f"the optimizer kernels need CUDA arrays, got params on {u.p[0].device if u.p else 'none'}")
    return u


def launch_update_32bit(name, params, grads, state1, state2, unorms, steps, param_norms, beta1, beta2,
                        beta3, alpha, eps, weight_decay, lr, gnorm_scale=1.0, max_unorm=0.0,
                        skip_zeros=False):
    """One multi-tensor step of bitsandbytes' ``optimizer_update_32bit`` (NUMERICS.md §6.3/§6.4),
    validated by :func:`bnbcy.optim._validation.update_32bit`.

    Parameters
    ----------
    name : str
        ``adam``, ``lamb`` (= adam), ``ademamix``, ``momentum``, ``lars`` (= momentum),
        ``rmsprop``, ``adagrad`` or ``lion``.
    params, grads : list of arrays
        Contiguous CUDA tensors of one device (float32/float16/bfloat16; one launch per dtype);
        params are updated in place, grads have the params' dtype and sizes.
    state1, state2 : list of arrays
        float32 states (``state1`` ``[2, *p.shape]`` for ademamix); ``state2`` only for
        adam/ademamix (may be None otherwise).
    unorms : list or None
        float32[1] slots (``unorm_vec``) written with ``sum u**2`` (deterministically) before the
        update, which reads it, where ``max_unorm > 0`` (scratch slots where None).
    steps : int or list of int
        Step of each tensor (first update: 1).
    param_norms : list or None
        ``||p||`` per tensor (float or float32[1] device array; computed where None), read where
        ``max_unorm > 0``.
    beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale, max_unorm : float
    skip_zeros : bool
    """
    from ..optim import _validation as V
    launch(_require_cuda(V.update_32bit(name, grads, params, state1, state2, steps, beta1, beta2, beta3, alpha, eps,
                                        weight_decay, lr, gnorm_scale, unorms, max_unorm, skip_zeros,
                                        param_norms)))


def launch_update_8bit_blockwise(name, params, grads, state1, state2, qmap1, qmap2, absmax1, absmax2,
                                 unorms, steps, param_norms, beta1, beta2, beta3, alpha, eps,
                                 weight_decay, lr, gnorm_scale=1.0, max_unorm=0.0, skip_zeros=False):
    """One multi-tensor step of bitsandbytes' ``optimizer_update_8bit_blockwise`` (§6.5, blocks of
    256), with the fixes of §10: AdEMAMix's m2 absmax at ``absmax1[1, b]``, skipped elements
    (``skip_zeros``) keep their dequantized old state, and ``lamb``/``lars`` (``max_unorm > 0``)
    apply the trust ratio (adam/momentum/rmsprop). Validated by
    :func:`bnbcy.optim._validation.update_8bit`.

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
    from ..optim import _validation as V
    launch(_require_cuda(V.update_8bit(name, grads, params, state1, state2, beta1, beta2, beta3, alpha, eps, steps,
                                       lr, qmap1, qmap2, absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros,
                                       max_unorm, unorms, param_norms)))
