"""Swap a model's ``torch.nn.Linear`` layers for quantized linear layers.

:func:`replace_linear` is generic over the replacement class; how a class takes over the
old float weight is a small per-class *weight hook* (see :func:`register_weight_hook`),
so a later class (e.g. ``Linear8bitLt``) plugs in by registering its own.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, Iterable

from torch import nn

from .modules import Int8Params, Linear4bit, Linear8bitLt, Params4bit

__all__ = ["replace_linear", "register_weight_hook"]

# linear class -> hook(new_module, old_linear). Looked up along the class's MRO, so
# LinearNF4/LinearFP4 use Linear4bit's hook.
_WEIGHT_HOOKS: Dict[type, Callable[[nn.Module, nn.Linear], None]] = {}


def register_weight_hook(linear_cls: type, hook: Callable[[nn.Module, nn.Linear], None] = None):
    """Register how ``linear_cls`` takes over the float weight of an ``nn.Linear``.

    Parameters
    ----------
    linear_cls : type
        The replacement class (its subclasses inherit the hook).
    hook : callable, optional
        ``hook(new, old)``: ``new`` is a ``linear_cls`` built on the ``meta`` device,
        ``old`` the ``nn.Linear`` it replaces. The hook must give ``new`` its weight, built
        from ``old.weight`` and ready (quantized) on ``old.weight.device``. The bias is
        handled by :func:`replace_linear`. Usable as a decorator when omitted.

    Examples
    --------
    >>> @register_weight_hook(Linear8bitLt)               # doctest: +SKIP
    ... def _(new, old):
    ...     new.weight = Int8Params(old.weight.data, requires_grad=False,
    ...                             has_fp16_weights=new.weight.has_fp16_weights).to(old.weight.device)
    """
    if hook is None:
        def deco(fn):
            _WEIGHT_HOOKS[linear_cls] = fn
            return fn
        return deco
    _WEIGHT_HOOKS[linear_cls] = hook
    return hook


def _find_hook(linear_cls: type):
    for klass in linear_cls.__mro__:
        if klass in _WEIGHT_HOOKS:
            return _WEIGHT_HOOKS[klass]
    return None


@register_weight_hook(Linear4bit)
def _linear4bit_weight(new: Linear4bit, old: nn.Linear) -> None:
    # Params4bit from the old float weight with the new layer's settings, quantized at
    # once on the weight's own device (a meta weight stays a float placeholder).
    w = new.weight
    param = Params4bit(old.weight.data, requires_grad=False, blocksize=w.blocksize,
                       compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                       quant_storage=w.quant_storage, module=new)
    new.weight = param.to(old.weight.device)


@register_weight_hook(Linear8bitLt)
def _linear8bit_weight(new: Linear8bitLt, old: nn.Linear) -> None:
    # Int8Params from the old float weight with the new layer's settings, quantized at once on
    # the weight's own device unless has_fp16_weights (then the float weight is kept, trainable
    # as the old one was); a meta weight stays a float placeholder.
    fp16 = new.weight.has_fp16_weights
    param = Int8Params(old.weight.data, requires_grad=fp16 and old.weight.requires_grad, has_fp16_weights=fp16)
    new.weight = param.to(old.weight.device)


def _is_replaceable(module: nn.Module, linear_cls: type) -> bool:
    if not isinstance(module, nn.Linear) or isinstance(module, linear_cls):
        return False
    # layers that are already quantized (any class with a weight hook) stay as they are
    return not any(isinstance(module, k) for k in _WEIGHT_HOOKS)


def _accepts(cls: type, name: str) -> bool:
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _replace_one(old: nn.Linear, linear_cls: type, copy_weights: bool, kwargs: dict) -> nn.Module:
    device = old.weight.device
    hook = _find_hook(linear_cls) if copy_weights else None
    has_bias = old.bias is not None
    if hook is not None and _accepts(linear_cls, "device"):
        # built on meta: no throw-away random init of a full-size float weight
        new = linear_cls(old.in_features, old.out_features, bias=has_bias, device="meta", **kwargs)
        hook(new, old)
        if has_bias:
            new.bias = nn.Parameter(old.bias.data, requires_grad=old.bias.requires_grad)
    else:
        # generic path: build on the weight's device, copy the float tensors in (nn.Linear
        # semantics), then move, which quantizes classes that quantize on a move
        new = linear_cls(old.in_features, old.out_features, bias=has_bias, **kwargs)
        if copy_weights:
            new.load_state_dict(old.state_dict())
        new = new.to(device)
    new.train(old.training)
    return new


def replace_linear(model: nn.Module, linear_cls: type = Linear4bit, skip_modules: Iterable[str] = ("lm_head",),
                   copy_weights: bool = True, **kwargs) -> nn.Module:
    """Replace every ``torch.nn.Linear`` of ``model`` (recursively) with ``linear_cls``.

    Parameters
    ----------
    model : torch.nn.Module
        Changed in place (and returned). A bare ``nn.Linear`` cannot be replaced in place:
        pass a container holding it.
    linear_cls : type
        Constructed as ``linear_cls(in_features, out_features, bias=..., **kwargs)``;
        default :class:`Linear4bit`.
    skip_modules : iterable of str
        Layers left as they are, matched by qualified name (``"decoder.lm_head"``) or by
        leaf name (``"lm_head"`` matches every child called so).
    copy_weights : bool
        Keep the old weights and biases (default). False keeps ``linear_cls``'s own fresh
        initialization (still quantized on the old layer's device).
    **kwargs
        For ``linear_cls`` (e.g. ``quant_type="nf4"``, ``compute_dtype=torch.bfloat16``).

    Returns
    -------
    torch.nn.Module
        ``model``.

    Notes
    -----
    * The new weights are quantized right away on each old weight's device (CPU
      included), so the model is ready to run without a ``.to(device)`` call; a weight on
      ``meta`` stays an unquantized placeholder (load a quantized state dict into it, or
      move the model to quantize). The float weights are released with the old layers.
    * Subclasses of ``nn.Linear`` are replaced too, except those already quantized
      (``linear_cls`` and every class with a weight hook) and the ``out_proj`` of
      ``nn.MultiheadAttention``, whose weight is read directly rather than called.
    * How the weight is transferred is chosen per class (:func:`register_weight_hook`);
      classes without a hook get a generic copy (``load_state_dict``) and ``.to(device)``.
    """
    skip = set(skip_modules or ())
    if isinstance(model, nn.Linear) and _is_replaceable(model, linear_cls):
        raise TypeError("replace_linear changes a model in place; pass a module that contains the nn.Linear")

    def visit(parent: nn.Module, prefix: str) -> None:
        if isinstance(parent, nn.MultiheadAttention):
            return
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}{name}"
            if name in skip or qualified in skip:
                continue
            if _is_replaceable(child, linear_cls):
                setattr(parent, name, _replace_one(child, linear_cls, copy_weights, kwargs))
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return model
