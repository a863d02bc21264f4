"""LARS optimizers (``bitsandbytes.optim.lars``), generated from the family table in
:mod:`bnbcy.optim._families`."""
import torch as _torch

from ._families import build

_classes = build(__name__, "LARS")
LARS = _classes["LARS"]
LARS8bit = _classes["LARS8bit"]
LARS32bit = _classes["LARS32bit"]
del _classes

__all__ = ["LARS", "LARS8bit", "LARS32bit", "PytorchLARS"]


class PytorchLARS(_torch.optim.Optimizer):
    """Reference LARS in plain PyTorch (``bitsandbytes.optim.lars.PytorchLARS``).

    Parameters
    ----------
    params : iterable
        Parameters to optimize, or dicts defining parameter groups.
    lr : float, default 0.01
        The learning rate.
    momentum : float, default 0
        Momentum factor.
    dampening : float, default 0
        Dampening of the momentum.
    weight_decay : float, default 0
        L2 penalty added to the gradient.
    nesterov : bool, default False
        Nesterov momentum (needs momentum > 0 and dampening 0).
    max_unorm : float, default 0.02
        Largest update norm relative to the parameter norm.
    """

    def __init__(self, params, lr=0.01, momentum=0, dampening=0, weight_decay=0, nesterov=False, max_unorm=0.02):
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      nesterov=nesterov, max_unorm=max_unorm))

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)

    @_torch.no_grad()
    def step(self, closure=None):
        """Perform a single optimization step; returns the closure's loss, if any."""
        loss = None
        if closure is not None:
            with _torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            wd, mom, damp = group["weight_decay"], group["momentum"], group["dampening"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad if wd == 0 else p.grad.add(p, alpha=wd)
                update = d
                if mom != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.detach().clone()
                    else:
                        buf.mul_(mom).add_(d, alpha=1 - damp)
                    update = d + buf * mom if group["nesterov"] else buf
                scale = 1.0
                if group["max_unorm"] > 0.0:
                    pnorm, unorm = _torch.norm(p.detach()), _torch.norm(update)
                    if unorm > group["max_unorm"] * pnorm:
                        scale = group["max_unorm"] * pnorm / unorm
                p.add_(update, alpha=-group["lr"] * scale)
        return loss
