"""Helpers of ``bitsandbytes.utils``: outlier-dimension search, the LLM.int8 outlier tracer,
bitsandbytes' positional ``replace_linear``, the quant-state packing and the 8-bit weight-format
names (the last two re-exported from where bnbcy keeps them)."""
from __future__ import annotations

import shlex
import subprocess

import torch

from .functional.quant_state import pack_dict_to_tensor, unpack_tensor_to_dict
from .nn.modules import INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING, LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING

__all__ = ["INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING", "LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING", "OutlierTracer",
           "execute_and_return", "find_outlier_dims", "outlier_hook", "pack_dict_to_tensor", "replace_linear",
           "sync_gpu", "unpack_tensor_to_dict"]


def find_outlier_dims(weight, reduction_dim=0, zscore=4.0, topk=None, rdm=False):
    """Indices of the columns of ``weight`` whose standard deviation (over ``reduction_dim``) is
    an outlier: z-score above ``zscore``, or the ``topk`` largest; ``rdm`` draws ``topk`` at random."""
    if rdm:
        return torch.randint(0, weight.shape[1], size=(topk,), device=weight.device).long()
    std = weight.std(reduction_dim)
    if topk is not None:
        return torch.topk(std.abs(), k=topk, dim=0).indices
    return torch.where((std - std.mean()) / std.std() > zscore)[0]


class OutlierTracer:
    """Singleton that finds, per ``nn.Linear`` weight, the input dimensions holding outliers
    (:meth:`initialize` hooks every linear layer of a model; run one forward, then
    :meth:`get_outliers`)."""

    _instance = None

    def __init__(self):
        raise RuntimeError("Call get_instance() instead")

    def initialize(self, model):
        self.last_w = None
        self.current_outlier_dims = None
        self.hvalues = []
        self.outliers = []
        self.hvalue2outlier_idx = {}
        self.initialized = True
        self.hooks = [m.register_forward_pre_hook(outlier_hook) for m in model.modules()
                      if isinstance(m, torch.nn.Linear)]

    def is_initialized(self):
        return getattr(self, "initialized", False)

    def get_hvalue(self, weight):
        return weight.data.untyped_storage().data_ptr()

    def get_outliers(self, weight):
        if not self.is_initialized():
            import logging
            logging.getLogger(__name__).warning("Outlier tracer is not initialized...")
            return None
        return self.hvalue2outlier_idx.get(self.get_hvalue(weight))

    @classmethod
    def get_instance(cls):
        if cls._instance is None:
            cls._instance = cls.__new__(cls)
        return cls._instance


def outlier_hook(module, input):
    """Forward pre-hook of :class:`OutlierTracer`: the first layer's outliers come from its input
    (z-score 3 of the feature std, or magnitude above 6), each later layer's from the previous
    layer's weight; the hooks remove themselves once every layer has been seen."""
    if not isinstance(module, torch.nn.Linear):
        raise TypeError(f"outlier_hook expects an nn.Linear, got {type(module).__name__}")
    tracer = OutlierTracer.get_instance()
    hvalue = tracer.get_hvalue(module.weight)
    if hvalue in tracer.hvalue2outlier_idx:
        for hook in tracer.hooks:
            hook.remove()
        return
    tracer.outliers.append(find_outlier_dims(module.weight))
    tracer.hvalues.append(hvalue)
    if len(tracer.outliers) > 1:
        tracer.hvalue2outlier_idx[hvalue] = tracer.outliers[-1]
        return
    x = input[0]
    by_std = find_outlier_dims(x.view(-1, x.shape[-1]), reduction_dim=1, zscore=3)
    by_size = torch.where((x.abs() > 6).sum(dim=list(range(x.dim() - 1))) > 0)[0]
    tracer.hvalue2outlier_idx[hvalue] = torch.cat([by_std, by_size]).unique()


def execute_and_return(command_string: str) -> tuple[str, str]:
    """Run a command (no shell); ``(stdout, stderr)`` decoded and stripped."""
    res = subprocess.run(shlex.split(command_string), capture_output=True)
    return res.stdout.decode("UTF-8").strip(), res.stderr.decode("UTF-8").strip()


def replace_linear(model, linear_replacement, skip_modules=("lm_head",), copy_weights=False,
                   post_processing_function=None):
    """bitsandbytes' ``utils.replace_linear``: every ``nn.Linear`` child (recursively, except
    names in ``skip_modules``) becomes ``linear_replacement(in_features, out_features, bias)``;
    ``copy_weights`` moves the old parameters over; ``post_processing_function`` names a method
    called on the *old* module. For a replacement that quantizes the kept weights right away use
    :func:`bnbcy.nn.replace_linear`."""
    for name, module in model.named_children():
        if len(list(module.children())) > 0:
            replace_linear(module, linear_replacement, skip_modules, copy_weights, post_processing_function)
        if isinstance(module, torch.nn.Linear) and name not in skip_modules:
            new = linear_replacement(module.in_features, module.out_features, module.bias is not None)
            if copy_weights:
                new.weight = module.weight
                new.bias = module.bias
            model._modules[name] = new
            func = getattr(module, post_processing_function, None) if post_processing_function else None
            if func is not None:
                func(module)
    return model


def sync_gpu(t: torch.Tensor):
    """Wait for the device queue of ``t`` (CUDA or XPU; nothing on the CPU)."""
    if t.device.type == "cuda":
        torch.cuda.synchronize()
    elif t.device.type == "xpu":
        torch.xpu.synchronize()
