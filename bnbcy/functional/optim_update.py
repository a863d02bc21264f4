"""Optimizer update functions with bitsandbytes' names and signatures (NUMERICS.md §6).

``optimizer_update_32bit`` / ``optimizer_update_8bit_blockwise`` update one parameter
in place, like ``bitsandbytes.functional``; the ``*_multi`` variants update all
parameters of a group in one kernel call (one OpenMP pass over every tensor), which is
what the optimizer classes use. The arithmetic is that of bnb's CUDA kernels with IEEE
division/square root/power in place of the fast-math approximations (§0).

Deliberate differences from bnb 0.50.2 (NUMERICS.md §10):

* AdEMAMix 8-bit uses ``absmax1[1, b]`` for the slow EMA of every block.
* 8-bit 1-state optimizers with ``skip_zeros`` keep the old (dequantized) state of the
  skipped elements instead of an uninitialised value.
* ``max_unorm`` (LAMB/LARS trust ratio) works with 8-bit states too; the update norm is
  computed in a first pass, in double precision per chunk and summed in a fixed order
  (deterministic), instead of with float atomics.

CPU arrays (torch tensors, NumPy arrays) run the Cython/OpenMP kernels; CUDA arrays run
``cuda_src/optim.cu`` (one multi-tensor launch per group and state kind, no host
synchronisation), through ``_optim_cuda``.
"""
from __future__ import annotations

import dataclasses
import numbers

import numpy as np
import torch

from .. import _C, _arrays, backends
from .._ops import optim as _optim_ops  # noqa: F401  (defines torch.ops.bnbcy.optimizer_update_*)
from ..optim import _table
from . import _optim_cuda

FLOAT_DTYPES = _arrays.FLOAT_DTYPES
OPTIMIZER_NAMES = _table.OPTIMIZER_NAMES
_TWO_STATE = tuple(k.name for k in _table.KERNELS.values() if k.states == 2)


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The hyper-parameters of one update step, as the optimizer classes pass them (hashable:
    parameters with equal records share a kernel call)."""
    lr: float
    beta1: float
    beta2: float = 0.0
    beta3: float = 0.0
    alpha: float = 0.0
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_unorm: float = 0.0
    skip_zeros: bool = False


def _check_name(name):
    _table.kernel(name)


def _on_cuda(views):
    """Whether the update runs the CUDA kernels: the arrays are on a GPU (then all of them must
    be; the launcher checks devices), or CPU arrays go to the SIMT emulator
    (:func:`bnbcy.kernels.emulating`)."""
    views = [v for v in views if v is not None]
    cuda = [v.is_cuda for v in views]
    if any(cuda) and not all(cuda):
        raise ValueError("optimizer update: parameters, gradients and states must all be on the same "
                         "device (got a mix of CPU and CUDA arrays)")
    return bool(views) and backends.on_cuda(views[0])


def _check_unorm_vecs(unorm_vecs, max_unorm):
    """``unorm_vec`` entries, when the update writes them, must be writable float32[1] arrays."""
    if max_unorm <= 0.0:
        return
    for k, u in enumerate(unorm_vecs):
        if u is None:
            continue
        v = _inplace_view(u, "unorm_vec" if len(unorm_vecs) == 1 else f"unorm_vecs[{k}]", ("float32",))
        if v.numel != 1:
            raise ValueError(f"unorm_vec must be a float32 array of one element (receives the squared update "
                             f"norm), got {v.numel} elements")


def _device_norm(p):
    """||p|| as a float32[1] array on p's device (no host synchronisation)."""
    if isinstance(p, torch.Tensor):
        return torch.linalg.vector_norm(p.detach().float()).reshape(1)
    import cupy
    return cupy.linalg.norm(p.astype(cupy.float32).ravel()).reshape(1)


def _norm_slot(p, value):
    """A given ||p|| as a float32[1] array on p's device."""
    if isinstance(p, torch.Tensor):
        return torch.full((1,), value, dtype=torch.float32, device=p.device)
    import cupy
    return cupy.full((1,), value, dtype=cupy.float32)


def _unorm_slots(unorm_vecs, ps):
    """float32[1] unorm slots for the CUDA trust-ratio pass (fresh ones where the caller gave none)."""
    out = []
    for u, p in zip(unorm_vecs, ps):
        if u is None:
            like = _C.view(p.detach() if isinstance(p, torch.Tensor) else p, "p")
            u = _arrays.empty(like, (1,), "float32")
        out.append(u)
    return out


def _inplace_view(x, name, dtypes):
    """View of an array the kernel updates in place: it must already be contiguous."""
    if x is None or not hasattr(x, "__dlpack__"):
        raise TypeError(f"{name} must be a torch.Tensor or numpy.ndarray, got {type(x).__name__}")
    v = _arrays.input_view(x, name, dtypes, make_contiguous=False)
    if v.readonly:
        raise ValueError(f"{name} must be writable")
    return v


def _param_norm(p):
    """torch.norm(p.float()) as bnb computes it (float32), as a Python float."""
    if isinstance(p, torch.Tensor):
        return float(torch.norm(p.detach().float()))
    return float(np.linalg.norm(np.asarray(p, dtype=np.float32).ravel()))


def _scalar(x, name):
    if isinstance(x, torch.Tensor):
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {x!r}")
    return float(x)


def _steps(steps, count):
    if isinstance(steps, (list, tuple)):
        if len(steps) != count:
            raise ValueError(f"steps has {len(steps)} entries but there are {count} params")
        out = list(steps)
    else:
        out = [steps] * count
    res = []
    for s in out:
        if isinstance(s, torch.Tensor):
            s = s.item()
        if isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1:
            raise ValueError(f"step must be a positive int, got {s!r}")
        res.append(int(s))
    return res


def _as_list(x, count, name):
    if x is None:
        return [None] * count
    x = list(x)
    if len(x) != count:
        raise ValueError(f"{name} has {len(x)} entries but there are {count} params")
    return x


def _lists(optimizer_name, ps, gs, per_param, steps, max_unorm):
    """The checks both ``*_multi`` entry points start with: the name, one entry per parameter in
    every list of ``per_param`` (None: all None), the steps, ``max_unorm`` and the ``unorm_vec``
    entries. Returns ``(ps, gs, count, lists in per_param's order, steps, max_unorm)``."""
    _check_name(optimizer_name)
    ps, gs = list(ps), list(gs)
    count = len(ps)
    if len(gs) != count:
        raise ValueError(f"gs has {len(gs)} entries but ps has {count}")
    lists = [_as_list(v, count, k) for k, v in per_param.items()]
    max_unorm = _scalar(max_unorm, "max_unorm")
    _check_unorm_vecs(lists[-1], max_unorm)
    return ps, gs, count, lists, _steps(steps, count), max_unorm


def _write_unorm(unorm_vecs, sums, idx):
    if sums is None:
        return
    for k, s in zip(idx, sums):
        u = unorm_vecs[k]
        if u is not None:
            u[0] = float(np.float32(s))  # Σ u², as bnb's precondition kernel leaves it


def _group_by_dtype(ps, gs):
    """Indices of the params grouped by dtype (one kernel call per dtype), after checks."""
    pv, gv, groups = [], [], {}
    for k, (p, g) in enumerate(zip(ps, gs)):
        v = _inplace_view(p, f"p[{k}]" if len(ps) > 1 else "p", FLOAT_DTYPES)
        w = _arrays.input_view(g, f"g[{k}]" if len(ps) > 1 else "g", FLOAT_DTYPES)
        if w.dtype != v.dtype:
            raise ValueError(f"g must have the dtype of p ({v.dtype}), got {w.dtype}")
        if w.numel != v.numel:
            raise ValueError(f"g must have the {v.numel} elements of p, got {w.numel}")
        pv.append(v)
        gv.append(w)
        groups.setdefault(v.dtype, []).append(k)
    _on_cuda(pv + gv)  # mixed CPU/CUDA lists are refused before anything runs
    return pv, gv, groups


def optimizer_update_32bit_multi(optimizer_name, gs, ps, state1s, beta1, eps, steps, lr, state2s=None,
                                 beta2=0.0, beta3=0.0, alpha=0.0, weight_decay=0.0, gnorm_scale=1.0,
                                 unorm_vecs=None, max_unorm=0.0, skip_zeros=False, param_norms=None):
    """In-place 32-bit update of several parameters (one kernel call per dtype).

    Same arguments as :func:`optimizer_update_32bit`, with lists for ``gs``, ``ps``,
    ``state1s``, ``state2s`` (None entries for 1-state optimizers), ``unorm_vecs``
    and ``steps`` (a list, or one int for all). ``param_norms``: ``norm(p)`` per parameter for
    the trust ratio (computed here when omitted).
    """
    ps, gs, count, (state1s, state2s, unorm_vecs), steps, max_unorm = _lists(
        optimizer_name, ps, gs, {"state1s": state1s, "state2s": state2s, "unorm_vecs": unorm_vecs}, steps,
        max_unorm)
    if param_norms is not None:
        param_norms = [_scalar(x, "param_norm") for x in _as_list(param_norms, count, "param_norms")]
    pv, gv, groups = _group_by_dtype(ps, gs)
    s1v, s2v = [], []
    for k in range(count):
        if state1s[k] is None:
            raise ValueError("state1 is required")
        s1v.append(_inplace_view(state1s[k], "state1", ("float32",)))
        if optimizer_name in _TWO_STATE:
            if state2s[k] is None:
                raise ValueError(f"{optimizer_name} needs state2")
            s2v.append(_inplace_view(state2s[k], "state2", ("float32",)))
            if s2v[k].numel != pv[k].numel:
                raise ValueError(f"state2 must have the {pv[k].numel} elements of p, got {s2v[k].numel}")
        else:
            s2v.append(None)
        if optimizer_name == "ademamix" and tuple(s1v[k].shape) != (2, *pv[k].shape):
            raise ValueError(f"ademamix state1 must have shape {(2, *pv[k].shape)}, got {s1v[k].shape}")
        if optimizer_name != "ademamix" and s1v[k].numel != pv[k].numel:
            raise ValueError(f"state1 must have the {pv[k].numel} elements of p, got {s1v[k].numel}")
    _arrays.check_no_overlap(*pv, *s1v, *s2v, inputs=gv)  # updated in place: no aliasing
    args = (_scalar(beta1, "beta1"), _scalar(beta2, "beta2"), _scalar(beta3, "beta3"),
            _scalar(alpha, "alpha"), _scalar(eps, "eps"), _scalar(weight_decay, "weight_decay"),
            _scalar(lr, "lr"))
    if _on_cuda(pv + gv + s1v + s2v):
        unorms = _unorm_slots(unorm_vecs, ps) if max_unorm > 0 else None
        for idx in groups.values():
            _optim_cuda.launch_update_32bit(
                optimizer_name, [ps[k] for k in idx], [gs[k] for k in idx], [state1s[k] for k in idx],
                [state2s[k] for k in idx] if optimizer_name in _TWO_STATE else None,
                [unorms[k] for k in idx] if unorms else None, [steps[k] for k in idx],
                [_device_norm(ps[k]) if param_norms is None else _norm_slot(ps[k], param_norms[k]) for k in idx]
                if max_unorm > 0 else None, *args,
                gnorm_scale=_scalar(gnorm_scale, "gnorm_scale"), max_unorm=max_unorm,
                skip_zeros=bool(skip_zeros))
        return
    norms = None
    if max_unorm > 0:
        norms = param_norms if param_norms is not None else [_param_norm(ps[k]) for k in range(count)]
    for idx in groups.values():
        sums = _C.cpu_optimizer_update_32bit(
            optimizer_name, [pv[k] for k in idx], [gv[k] for k in idx], [s1v[k] for k in idx],
            [s2v[k] for k in idx], *args, [steps[k] for k in idx], _scalar(gnorm_scale, "gnorm_scale"),
            max_unorm, [norms[k] for k in idx] if norms else None, bool(skip_zeros))
        _write_unorm(unorm_vecs, sums, idx)


def optimizer_update_32bit(optimizer_name, g, p, state1, beta1, eps, step, lr, state2=None, beta2=0.0,
                           beta3=0.0, alpha=0.0, weight_decay=0.0, gnorm_scale=1.0, unorm_vec=None,
                           max_unorm=0.0, skip_zeros=False):
    """In-place optimizer update of ``p`` with float32 states (bitsandbytes' signature).

    Parameters
    ----------
    optimizer_name : str
        adam, lamb, ademamix, momentum, lars, rmsprop, adagrad or lion.
    g, p : array
        Gradient and parameter, same dtype (float32, float16 or bfloat16); p is updated.
    state1, state2 : array
        float32 states (state2 for adam/lamb/ademamix; ademamix state1 is ``[2, *p.shape]``).
    beta1, beta2, beta3, alpha, eps, weight_decay, lr, gnorm_scale : float
    step : int
        The step number, starting at 1.
    unorm_vec : array, optional
        float32[1]; receives Σ u² (the squared update norm) when ``max_unorm > 0``.
    max_unorm : float
        Trust-ratio bound relative to ``norm(p)`` (LAMB 1.0, LARS 0.02); 0 disables.
    skip_zeros : bool
        Leave elements whose gradient is exactly 0 untouched.
    """
    if not isinstance(p, torch.Tensor):       # NumPy / CuPy arrays: no torch op
        optimizer_update_32bit_multi(optimizer_name, [g], [p], [state1], beta1, eps, [step], lr,
                                     state2s=[state2], beta2=beta2, beta3=beta3, alpha=alpha,
                                     weight_decay=weight_decay, gnorm_scale=gnorm_scale, unorm_vecs=[unorm_vec],
                                     max_unorm=max_unorm, skip_zeros=skip_zeros)
        return
    _check_name(optimizer_name)
    max_unorm = _scalar(max_unorm, "max_unorm")
    param_norm = _param_norm(p) if max_unorm > 0 else 0.0
    for x, nm in ((p, "p"), (state1, "state1"), (state2, "state2")):  # updated in place: refuse lazy views
        _arrays.check_not_lazy(x, nm)
    torch.ops.bnbcy.optimizer_update_32bit(
        optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, _scalar(beta1, "beta1"),
        _scalar(beta2, "beta2"), _scalar(beta3, "beta3"), _scalar(alpha, "alpha"), _scalar(eps, "eps"),
        _scalar(weight_decay, "weight_decay"), _steps([step], 1)[0], _scalar(lr, "lr"),
        _scalar(gnorm_scale, "gnorm_scale"), bool(skip_zeros))


def optimizer_update_8bit_blockwise_multi(optimizer_name, gs, ps, state1s, state2s, beta1, beta2, beta3, alpha,
                                          eps, steps, lr, qmap1, qmap2, absmax1s, absmax2s, weight_decay=0.0,
                                          gnorm_scale=1.0, skip_zeros=False, max_unorm=0.0, unorm_vecs=None):
    """In-place 8-bit blockwise update of several parameters (one kernel call per dtype).

    Same arguments as :func:`optimizer_update_8bit_blockwise` with lists for the
    per-parameter arrays and ``steps`` (a list, or one int for all).
    """
    ps, gs, count, (state1s, state2s, absmax1s, absmax2s, unorm_vecs), steps, max_unorm = _lists(
        optimizer_name, ps, gs, {"state1s": state1s, "state2s": state2s, "absmax1s": absmax1s,
                                 "absmax2s": absmax2s, "unorm_vecs": unorm_vecs}, steps, max_unorm)
    two = optimizer_name in _TWO_STATE
    pv, gv, groups = _group_by_dtype(ps, gs)
    if qmap1 is None:
        raise ValueError("qmap1 is required")
    q1v = _arrays.input_view(qmap1, "qmap1", ("float32",))
    q2v = None
    if two:
        if qmap2 is None:
            raise ValueError(f"{optimizer_name} needs qmap2")
        q2v = _arrays.input_view(qmap2, "qmap2", ("float32",))
    for v, nm in ((q1v, "qmap1"), (q2v, "qmap2")):
        if v is not None and v.numel != 256:
            raise ValueError(f"{nm} must have 256 values, got {v.numel}")
    s1v, s2v, a1v, a2v = [], [], [], []
    for k in range(count):
        n = pv[k].numel
        nb = -(-n // 256)
        if state1s[k] is None or absmax1s[k] is None:
            raise ValueError("state1 and absmax1 are required")
        s1 = _inplace_view(state1s[k], "state1", ("uint8",))
        a1 = _inplace_view(absmax1s[k], "absmax1", ("float32",))
        if optimizer_name == "ademamix":
            if tuple(s1.shape) != (2, *pv[k].shape):
                raise ValueError(f"ademamix state1 must have shape {(2, *pv[k].shape)}, got {s1.shape}")
            if a1.numel != 2 * nb:
                raise ValueError(f"ademamix absmax1 must have shape (2, {nb}), got {a1.shape}")
        else:
            if s1.numel != n:
                raise ValueError(f"state1 must have the {n} elements of p, got {s1.numel}")
            if a1.numel != nb:
                raise ValueError(f"absmax1 must have {nb} values (one per 256 elements), got {a1.numel}")
        s1v.append(s1)
        a1v.append(a1)
        if two:
            if state2s[k] is None or absmax2s[k] is None:
                raise ValueError(f"{optimizer_name} needs state2 and absmax2")
            s2 = _inplace_view(state2s[k], "state2", ("uint8",))
            a2 = _inplace_view(absmax2s[k], "absmax2", ("float32",))
            if s2.numel != n:
                raise ValueError(f"state2 must have the {n} elements of p, got {s2.numel}")
            if a2.numel != nb:
                raise ValueError(f"absmax2 must have {nb} values (one per 256 elements), got {a2.numel}")
            s2v.append(s2)
            a2v.append(a2)
        else:
            s2v.append(None)
            a2v.append(None)
    _arrays.check_no_overlap(*pv, *s1v, *s2v, *a1v, *a2v, inputs=(*gv, q1v, q2v))  # updated in place
    args = (_scalar(beta1, "beta1"), _scalar(beta2, "beta2"), _scalar(beta3, "beta3"),
            _scalar(alpha, "alpha"), _scalar(eps, "eps"), _scalar(weight_decay, "weight_decay"),
            _scalar(lr, "lr"))
    if _on_cuda(pv + gv + s1v + s2v + a1v + a2v + [q1v, q2v]):
        unorms = _unorm_slots(unorm_vecs, ps) if max_unorm > 0 else None
        for idx in groups.values():
            _optim_cuda.launch_update_8bit_blockwise(
                optimizer_name, [ps[k] for k in idx], [gs[k] for k in idx], [state1s[k] for k in idx],
                [state2s[k] for k in idx] if two else None, qmap1, qmap2 if two else None,
                [absmax1s[k] for k in idx], [absmax2s[k] for k in idx] if two else None,
                [unorms[k] for k in idx] if unorms else None, [steps[k] for k in idx],
                [_device_norm(ps[k]) for k in idx] if max_unorm > 0 else None, *args,
                gnorm_scale=_scalar(gnorm_scale, "gnorm_scale"), max_unorm=max_unorm,
                skip_zeros=bool(skip_zeros))
        return
    norms = [_param_norm(ps[k]) for k in range(count)] if max_unorm > 0 else None
    for idx in groups.values():
        sums = _C.cpu_optimizer_update_8bit_blockwise(
            optimizer_name, [pv[k] for k in idx], [gv[k] for k in idx], [s1v[k] for k in idx],
            [s2v[k] for k in idx] if two else None, q1v, q2v, [a1v[k] for k in idx],
            [a2v[k] for k in idx] if two else None, *args, [steps[k] for k in idx],
            _scalar(gnorm_scale, "gnorm_scale"), max_unorm, [norms[k] for k in idx] if norms else None,
            bool(skip_zeros))
        _write_unorm(unorm_vecs, sums, idx)


def optimizer_update_8bit_blockwise(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step,
                                    lr, qmap1, qmap2, absmax1, absmax2, weight_decay=0.0, gnorm_scale=1.0,
                                    skip_zeros=False, max_unorm=0.0, unorm_vec=None):
    """In-place optimizer update with 8-bit blockwise states (bitsandbytes' signature).

    States are uint8 codes in blocks of 256 elements with float32 ``absmax1/2`` per block
    (ademamix: state1 ``[2, *p.shape]``, absmax1 ``[2, nblocks]``); ``qmap1`` is the signed
    and ``qmap2`` the unsigned dynamic map (``qmap2``/``state2``/``absmax2`` None for 1-state
    optimizers). ``max_unorm``/``unorm_vec`` are a bnbcy extension (LAMB/LARS in 8-bit).
    """
    if not isinstance(p, torch.Tensor) or max_unorm or unorm_vec is not None:
        # NumPy / CuPy arrays, or the trust ratio (a bnbcy extension, not in bnb's op schema)
        optimizer_update_8bit_blockwise_multi(optimizer_name, [g], [p], [state1], [state2], beta1, beta2, beta3,
                                              alpha, eps, [step], lr, qmap1, qmap2, [absmax1], [absmax2],
                                              weight_decay=weight_decay, gnorm_scale=gnorm_scale,
                                              skip_zeros=skip_zeros, max_unorm=max_unorm, unorm_vecs=[unorm_vec])
        return
    _check_name(optimizer_name)
    for x, nm in ((p, "p"), (state1, "state1"), (state2, "state2"), (absmax1, "absmax1"), (absmax2, "absmax2")):
        _arrays.check_not_lazy(x, nm)  # updated in place: refuse lazy views before the op
    torch.ops.bnbcy.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, _scalar(beta1, "beta1"), _scalar(beta2, "beta2"),
        _scalar(beta3, "beta3"), _scalar(alpha, "alpha"), _scalar(eps, "eps"), _steps([step], 1)[0],
        _scalar(lr, "lr"), qmap1, qmap2, absmax1, absmax2, _scalar(weight_decay, "weight_decay"),
        _scalar(gnorm_scale, "gnorm_scale"), bool(skip_zeros))


def percentile_clipping(grad, gnorm_vec, step, percentile=5):
    """Percentile clipping of bitsandbytes ≤ 0.49 (removed from bnb in 0.50).

    Keeps the squared gradient norms of the last 100 steps in ``gnorm_vec``
    (float32[100]; at step 1 every slot gets the first norm) and returns
    ``(current_gnorm, clip_value, gnorm_scale)``: the current norm, the norm at the
    given percentile of the history, and ``clip_value / current_gnorm`` when the
    current norm exceeds it, else 1.0.
    """
    if isinstance(step, bool) or not isinstance(step, numbers.Integral):
        raise ValueError(f"step must be an int, got {step!r}")
    if isinstance(percentile, bool) or not isinstance(percentile, numbers.Integral) or not 0 <= percentile < 100:
        raise ValueError(f"percentile must be an int in [0, 100), got {percentile!r}")
    torch_in = isinstance(gnorm_vec, torch.Tensor)
    vec = gnorm_vec if torch_in else torch.from_numpy(gnorm_vec)
    if vec.dtype != torch.float32 or vec.numel() != 100:
        raise ValueError(f"gnorm_vec must be float32[100], got {vec.dtype} with {vec.numel()} values")
    g = grad.detach() if isinstance(grad, torch.Tensor) else torch.from_numpy(np.asarray(grad))
    # Σ g² in double, then float32 (bnb sums float32 with atomics: order-dependent)
    gnorm_sq = torch.sum(g.double().square()).float()
    if step == 1:
        vec.fill_(gnorm_sq)
    else:
        vec[step % 100] = gnorm_sq
    current_gnorm = torch.sqrt(vec[step % 100])
    vals, _ = torch.sort(vec)
    clip_value = torch.sqrt(vals[percentile])
    gnorm_scale = 1.0
    if current_gnorm > clip_value:
        gnorm_scale = clip_value / current_gnorm
    return current_gnorm, clip_value, gnorm_scale


__all__ = ["Hyper", "optimizer_update_32bit", "optimizer_update_32bit_multi", "optimizer_update_8bit_blockwise",
           "optimizer_update_8bit_blockwise_multi", "percentile_clipping"]
