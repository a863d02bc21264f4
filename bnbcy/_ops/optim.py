"""``bnbcy::optimizer_update_32bit``, ``bnbcy::optimizer_update_8bit_blockwise`` (bitsandbytes
0.50.2's schemas): the single-parameter optimizer updates, in place. The kernel validates once,
in the optimizer validation layer (:mod:`bnbcy.optim._validation`: ``update_32bit`` /
``update_8bit``, what :func:`bnbcy.functional.optim_update.optimizer_update_32bit_multi` and its
8-bit twin call), and runs the validated update (``optim_update.run``); the optimizer classes call
that layer directly with a whole group per call."""
from __future__ import annotations

import torch

from ..optim import _validation as V
from ._lib import op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_fake(g, p):
    torch._check(g.numel() == p.numel(),
                 lambda: f"g and p must have the same number of elements, got {g.numel()} and {p.numel()}")
    torch._check(g.dtype in _FLOATS, lambda: f"g must be bfloat16, float16, or float32, got {g.dtype}")
    torch._check(g.dtype == p.dtype,
                 lambda: f"Expected all tensors to have the same dtype, got g.dtype={g.dtype}, p.dtype={p.dtype}")


def _functional():
    """bnbcy.functional.optim_update (imported at the first call: it imports this module)."""
    global _optim_update
    if _optim_update is None:
        from ..functional import optim_update
        _optim_update = optim_update
    return _optim_update


_optim_update = None


def _update_32bit(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3,
                  alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros=False):
    _functional().run(V.update_32bit(optimizer_name, [g], [p], [state1], [state2], [step], beta1, beta2, beta3, alpha,
                                     eps, weight_decay, lr, gnorm_scale, [unorm_vec], max_unorm, skip_zeros,
                                     [param_norm]))


def _update_32bit_fake(optimizer_name, g, p, state1, state2, unorm_vec, max_unorm, param_norm, beta1, beta2, beta3,
                       alpha, eps, weight_decay, step, lr, gnorm_scale, skip_zeros=False):
    _check_fake(g, p)


def _update_8bit(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
                 absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros=False):
    _functional().run(V.update_8bit(optimizer_name, [g], [p], [state1], [state2], beta1, beta2, beta3, alpha, eps,
                                    [step], lr, qmap1, qmap2, [absmax1], [absmax2], weight_decay, gnorm_scale,
                                    skip_zeros))


def _update_8bit_fake(optimizer_name, g, p, state1, state2, beta1, beta2, beta3, alpha, eps, step, lr, qmap1, qmap2,
                      absmax1, absmax2, weight_decay, gnorm_scale, skip_zeros=False):
    _check_fake(g, p)
    torch._check(state1.dtype == torch.uint8, lambda: f"state1 must be uint8, got {state1.dtype}")
    torch._check(qmap1.dtype == absmax1.dtype == torch.float32,
                 lambda: f"Expected qmap1 and absmax1 to be float32, got qmap1.dtype={qmap1.dtype}, "
                         f"absmax1.dtype={absmax1.dtype}")


optimizer_update_32bit = op(
    "optimizer_update_32bit",
    "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, "
    "Tensor(a4!)? unorm_vec, float max_unorm, float param_norm, float beta1, float beta2, float beta3, "
    "float alpha, float eps, float weight_decay, int step, float lr, float gnorm_scale, "
    "bool skip_zeros=False) -> ()",
    impl=_update_32bit, fake=_update_32bit_fake)

optimizer_update_8bit_blockwise = op(
    "optimizer_update_8bit_blockwise",
    "(str optimizer_name, Tensor(a0!) g, Tensor(a1!) p, Tensor(a2!) state1, Tensor(a3!)? state2, "
    "float beta1, float beta2, float beta3, float alpha, float eps, int step, float lr, Tensor(a4!) qmap1, "
    "Tensor(a5!)? qmap2, Tensor(a6!) absmax1, Tensor(a7!)? absmax2, float weight_decay, float gnorm_scale, "
    "bool skip_zeros=False) -> ()",
    impl=_update_8bit, fake=_update_8bit_fake)
