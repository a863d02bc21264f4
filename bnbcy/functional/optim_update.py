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

Every entry validates once, in :mod:`bnbcy.optim._validation`, and hands the validated
:class:`~bnbcy.optim._validation.Update` to :func:`run`, which checks nothing again.
CPU arrays (torch tensors, NumPy arrays) run the Cython/OpenMP kernels; CUDA arrays run
``cuda_src/optim.cu`` (one multi-tensor launch per group and state kind, no host
synchronisation), through ``_optim_cuda``.
"""
from __future__ import annotations

import numbers

import numpy as np
import torch

from .. import _C, _arrays
from .._ops import optim as _optim_ops  # noqa: F401  (defines torch.ops.bnbcy.optimizer_update_*)
from ..optim import _table
from ..optim import _validation as V
from ..optim._validation import Hyper
from . import _optim_cuda

FLOAT_DTYPES = _arrays.FLOAT_DTYPES
OPTIMIZER_NAMES = _table.OPTIMIZER_NAMES


def _param_norm(p):
    """torch.norm(p.float()) as bnb computes it (float32), as a Python float."""
    if isinstance(p, torch.Tensor):
        return float(torch.norm(p.detach().float()))
    return float(np.linalg.norm(np.asarray(p, dtype=np.float32).ravel()))


def run(u):
    """Run a validated update (:class:`bnbcy.optim._validation.Update`): one kernel call per dtype,
    on the CPU or through the CUDA launchers. Nothing is checked here."""
    if u.cuda:
        _optim_cuda.launch(u)
        return
    h = u.hyper
    args = (h.beta1, h.beta2, h.beta3, h.alpha, h.eps, h.weight_decay, h.lr)
    norms = None
    if h.max_unorm > 0:
        norms = ([float(x) for x in u.param_norms] if u.param_norms is not None
                 else [_param_norm(p) for p in u.ps])
    count = len(u.p)
    for idx in u.groups.values():
        whole = len(idx) == count

        def pick(xs, idx=idx, whole=whole):
            # the entries of this dtype (all of them, the common case, without copying the lists)
            return xs if whole else [xs[k] for k in idx]

        sel = pick(norms) if norms else None
        if u.eight:
            sums = _C.cpu_optimizer_update_8bit_blockwise(
                u.name, pick(u.p), pick(u.g), pick(u.s1), pick(u.s2) if u.two else None, u.q1, u.q2, pick(u.a1),
                pick(u.a2) if u.two else None, *args, pick(u.steps), u.gnorm_scale, h.max_unorm, sel, h.skip_zeros)
        else:
            sums = _C.cpu_optimizer_update_32bit(
                u.name, pick(u.p), pick(u.g), pick(u.s1), pick(u.s2), *args, pick(u.steps), u.gnorm_scale,
                h.max_unorm, sel, h.skip_zeros)
        if sums is not None:
            for k, s in zip(idx, sums):
                if u.unorm_vecs[k] is not None:
                    u.unorm_vecs[k][0] = float(np.float32(s))  # Σ u², as bnb's precondition kernel leaves it


def optimizer_update_32bit_multi(optimizer_name, gs, ps, state1s, beta1, eps, steps, lr, state2s=None,
                                 beta2=0.0, beta3=0.0, alpha=0.0, weight_decay=0.0, gnorm_scale=1.0,
                                 unorm_vecs=None, max_unorm=0.0, skip_zeros=False, param_norms=None, *,
                                 _checked=None):
    """In-place 32-bit update of several parameters (one kernel call per dtype).

    Same arguments as :func:`optimizer_update_32bit`, with lists for ``gs``, ``ps``,
    ``state1s``, ``state2s`` (None entries for 1-state optimizers), ``unorm_vecs``
    and ``steps`` (a list, or one int for all). ``param_norms``: ``norm(p)`` per parameter for
    the trust ratio (computed here when omitted). ``_checked`` (internal): the
    :class:`~bnbcy.optim._validation.Update` of exactly these arguments, from a caller that
    validated them (the optimizer classes' step); they are not checked again.
    """
    if _checked is not None:
        return run(_checked)
    run(V.update_32bit(optimizer_name, gs, ps, state1s, state2s, steps, beta1, beta2, beta3, alpha, eps,
                       weight_decay, lr, gnorm_scale, unorm_vecs, max_unorm, skip_zeros, param_norms))


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
    # Only the coercions the op's schema needs (floats, an int step); the op's kernel validates.
    R = V.real
    max_unorm = R(max_unorm, "max_unorm")
    param_norm = _param_norm(p) if max_unorm > 0 else 0.0
    for x, nm in ((p, "p"), (state1, "state1"), (state2, "state2")):  # updated in place: refuse lazy views
        _arrays.check_not_lazy(x, nm)
    torch.ops.bnbcy.optimizer_update_32bit(
        optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, R(beta1, "beta1"),
        R(beta2, "beta2"), R(beta3, "beta3"), R(alpha, "alpha"), R(eps, "eps"), R(weight_decay, "weight_decay"),
        V.steps([step], 1)[0], R(lr, "lr"), R(gnorm_scale, "gnorm_scale"), bool(skip_zeros))


def optimizer_update_8bit_blockwise_multi(optimizer_name, gs, ps, state1s, state2s, beta1, beta2, beta3, alpha,
                                          eps, steps, lr, qmap1, qmap2, absmax1s, absmax2s, weight_decay=0.0,
                                          gnorm_scale=1.0, skip_zeros=False, max_unorm=0.0, unorm_vecs=None, *,
                                          _checked=None):
    """In-place 8-bit blockwise update of several parameters (one kernel call per dtype).

    Same arguments as :func:`optimizer_update_8bit_blockwise` with lists for the
    per-parameter arrays and ``steps`` (a list, or one int for all); ``_checked`` as in
    :func:`optimizer_update_32bit_multi`.
    """
    if _checked is not None:
        return run(_checked)
    run(V.update_8bit(optimizer_name, gs, ps, state1s, state2s, beta1, beta2, beta3, alpha, eps, steps, lr, qmap1,
                      qmap2, absmax1s, absmax2s, weight_decay, gnorm_scale, skip_zeros, max_unorm, unorm_vecs))


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
    R = V.real                                # the op schema's coercions; the op's kernel validates
    for x, nm in ((p, "p"), (state1, "state1"), (state2, "state2"), (absmax1, "absmax1"), (absmax2, "absmax2")):
        _arrays.check_not_lazy(x, nm)  # updated in place: refuse lazy views before the op
    torch.ops.bnbcy.optimizer_update_8bit_blockwise(
        optimizer_name, g, p, state1, state2, R(beta1, "beta1"), R(beta2, "beta2"), R(beta3, "beta3"),
        R(alpha, "alpha"), R(eps, "eps"), V.steps([step], 1)[0], R(lr, "lr"), qmap1, qmap2, absmax1, absmax2,
        R(weight_decay, "weight_decay"), R(gnorm_scale, "gnorm_scale"), bool(skip_zeros))


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


__all__ = ["Hyper", "run", "optimizer_update_32bit", "optimizer_update_32bit_multi", "optimizer_update_8bit_blockwise",
           "optimizer_update_8bit_blockwise_multi", "percentile_clipping"]
