"""4-bit quantization of arbitrary ``nn.Parameter``s through ``torch.nn.utils.parametrize``
(``bitsandbytes.nn.parametrize``): for parameters outside ``nn.Linear``, e.g. the stacked expert
weights of MoE layers, without changing the model's class.

The parameter's data becomes the packed 4-bit codes (``module.parametrizations.<name>.original``)
and reading ``module.<name>`` dequantizes them. Within one forward of the module the dequantized
tensor is computed once (torch's parametrization cache, switched on by a pre-hook and off by an
``always_call`` forward hook, so a forward aborted by non-reentrant activation checkpointing's
early stop does not leave the cache on). ``state_dict()`` holds the codes under ``<name>`` and the
quant state under ``<name>.absmax``, ``<name>.quant_map``, ... as for ``Linear4bit`` weights.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P

from .. import functional as F

__all__ = ["Bnb4bitParametrization", "replace_parameter_4bit", "replace_parameter_4bit_prequantized"]


class Bnb4bitParametrization(nn.Module):
    """Parametrization that dequantizes 4-bit codes with its :class:`~bnbcy.functional.QuantState`.

    Parameters
    ----------
    quant_state : QuantState
        The state of the codes this parametrization is registered on (shape, dtype, absmax, ...).
    """

    def __init__(self, quant_state: F.QuantState):
        super().__init__()
        self.quant_state = quant_state

    @torch.no_grad()
    def forward(self, quantized_param: torch.Tensor) -> torch.Tensor:
        """The dequantized parameter (``quant_state.shape``, ``quant_state.dtype``)."""
        return F.dequantize_4bit(quantized_param, self.quant_state)


def _check_parameter(module: nn.Module, param_name: str) -> nn.Parameter:
    if not hasattr(module, param_name):
        raise AttributeError(f"Module does not have parameter '{param_name}'")
    param = getattr(module, param_name)
    if not isinstance(param, nn.Parameter):
        # (also what a parametrized attribute is: a plain tensor computed on access)
        raise TypeError(f"Parameter '{param_name}' is not an instance of nn.Parameter")
    return param


def replace_parameter_4bit_prequantized(module: nn.Module, param_name: str, qs_dict: dict[str, Any],
                                        device: torch.device) -> None:
    """Register the dequantizing parametrization on a parameter that already holds 4-bit codes.

    Parameters
    ----------
    module : nn.Module
        Holds ``param_name``, whose data are the packed codes (as saved under ``<name>`` by
        ``state_dict()``).
    param_name : str
    qs_dict : dict
        The quant state as in the state dict: ``absmax``, ``quant_map``,
        ``quant_state.bitsandbytes__nf4`` (or ``__fp4``), and ``nested_*`` with double quantization;
        keys may keep their ``<name>.`` prefix.
    device : torch.device
        Where the quant state's tensors go.

    Raises
    ------
    AttributeError, TypeError, ValueError
        No such attribute, not an ``nn.Parameter``, or an invalid quant state; the module is left
        as it was.
    """
    _check_parameter(module, param_name)
    quant_state = F.QuantState.from_dict(qs_dict, device=device)
    P.register_parametrization(module, param_name, Bnb4bitParametrization(quant_state), unsafe=True)
    _register_parametrization_hooks(module, param_name)


def replace_parameter_4bit(module: nn.Module, param_name: str, compress_statistics: bool = False,
                           quant_type: Literal["nf4", "fp4"] = "nf4", blocksize: Optional[int] = None) -> None:
    """Quantize ``module.<param_name>`` to 4 bits in place and dequantize it on access.

    Parameters
    ----------
    module : nn.Module
    param_name : str
        Any floating-point ``nn.Parameter`` of ``module`` (any shape).
    compress_statistics : bool, default False
        Double quantization of the block maxima.
    quant_type : {"nf4", "fp4"}, default "nf4"
    blocksize : int, optional
        Default: that of :func:`bnbcy.functional.quantize_4bit` (64).

    Raises
    ------
    AttributeError, TypeError, ValueError
        No such attribute, not an ``nn.Parameter`` (a parametrized one included), or arguments
        that ``quantize_4bit`` rejects; the module is left as it was.

    Notes
    -----
    The quantized parameter is frozen (``requires_grad=False``), as in bitsandbytes. Experimental
    in bitsandbytes too.
    """
    param = _check_parameter(module, param_name)
    quantized, quant_state = F.quantize_4bit(param.data, blocksize=blocksize, compress_statistics=compress_statistics,
                                             quant_type=quant_type)
    setattr(module, param_name, nn.Parameter(quantized, requires_grad=False))
    P.register_parametrization(module, param_name, Bnb4bitParametrization(quant_state), unsafe=True)
    _register_parametrization_hooks(module, param_name)


def _enable_parametrization_cache(module: nn.Module, inputs: tuple) -> None:
    P._cache_enabled += 1


def _disable_parametrization_cache(module: nn.Module, inputs: tuple, output: Any) -> None:
    # ``always_call`` runs this also when the forward raised before the pre-hook counted (an
    # earlier pre-hook failed): never let the counter go below zero (negative is truthy).
    P._cache_enabled = max(0, P._cache_enabled - 1)
    if not P._cache_enabled:
        P._cache = {}


def _register_parametrization_hooks(module: nn.Module, param_name: str) -> None:
    module.register_state_dict_post_hook(partial(_parametrized_state_dict_post_hook, param_name=param_name))
    module.register_forward_pre_hook(_enable_parametrization_cache)
    module.register_forward_hook(_disable_parametrization_cache, always_call=True)


def _parametrized_state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any, *,
                                       param_name: str = "weight", **kwargs) -> None:
    """Save the codes under ``<name>`` (not ``parametrizations.<name>.original``) and the quant
    state next to them, in bitsandbytes' packed format."""
    original_key = f"{prefix}parametrizations.{param_name}.original"
    if original_key not in state_dict:
        return
    state_dict[f"{prefix}{param_name}"] = state_dict.pop(original_key)
    parametrization = next((p for p in module.parametrizations[param_name] if isinstance(p, Bnb4bitParametrization)),
                           None)
    if parametrization is None:
        raise RuntimeError(f"'{param_name}' of {type(module).__name__} lost its Bnb4bitParametrization")
    for k, v in parametrization.quant_state.as_dict(packed=True).items():
        state_dict[f"{prefix}{param_name}.{k}"] = v
