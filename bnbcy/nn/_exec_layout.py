"""The execution layout of a CPU ``Linear4bit`` in inference (docs/fourbit.md, "Inference on the CPU").

The storage format -- bitsandbytes' packed codes in ``Params4bit`` and its ``QuantState`` -- stays
the one source of truth: state_dict, safetensors, ``dequantize_4bit``, PEFT merges, ``.to()``,
pickling and FSDP flattening all see exactly the bytes bitsandbytes writes, before and after
inference. The layout never copies or repacks them: the CPU kernels read the storage nibble order
directly (on AVX2 one broadcast + variable shift puts 8 consecutive nibbles in element order), so
its extra memory is the 16-value float32 map and a few tensor views (0% of the packed weight).

What it holds is what every call would otherwise rebuild and check: the flat uint8 view of the
codes, the float32 map, the plain or nested statistics and the shapes, i.e. the arguments of
``bnbcy::gemm_4bit_exec``. It is built on the first eval-mode CPU forward that needs no gradient
through the weight (never in training mode), keyed to the weight's storage, version counter and
quant state and to the compute dtype, and rebuilt when any of them changes; as it holds views, an
in-place change of the codes is seen by the very next call even where no version counter moves
(``weight.data.copy_``).
"""
from __future__ import annotations

import dataclasses
import weakref
from typing import Optional

import torch

#: Set to False to route every forward through ``bnbcy.matmul_4bit`` (tests, benchmarks).
ENABLED = True

_LAYOUTS: "weakref.WeakKeyDictionary[torch.nn.Module, ExecLayout]" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class ExecLayout:
    """Arguments of ``bnbcy::gemm_4bit_exec`` for one weight (views of its storage)."""
    key: tuple
    B: torch.Tensor                      # flat uint8 view of the packed codes
    code: torch.Tensor                   # the map, float32 [16]
    absmax: torch.Tensor                 # float32, or uint8 when nested
    nested_code: Optional[torch.Tensor]
    nested_absmax: Optional[torch.Tensor]
    nested_offset: Optional[torch.Tensor]
    blocksize: int
    nested_blocksize: int
    N: int
    extra_bytes: int                     # bytes held beyond the module's own tensors


def _version(t) -> tuple:
    return (t.data_ptr(), t._version) if isinstance(t, torch.Tensor) else (id(t), t)


def _key(weight, qs, dtype) -> tuple:
    key = [id(weight), _version(weight), tuple(weight.shape), id(qs), _version(qs.absmax), _version(qs.code),
           _version(qs.offset), qs.blocksize, dtype]
    if qs.state2 is not None:
        key += [id(qs.state2), _version(qs.state2.absmax), _version(qs.state2.code), qs.state2.blocksize]
    return tuple(key)


def _as_f32(t, extra: list):
    if t.dtype == torch.float32 and t.is_contiguous():
        return t
    t = t.to(torch.float32).contiguous()
    extra.append(t.numel() * 4)
    return t


def build(weight, qs, dtype, key=()) -> ExecLayout:
    """The layout of ``weight`` (packed ``Params4bit`` data) with quant state ``qs``."""
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    B = data.reshape(-1)
    if B.dtype != torch.uint8:
        B = B.view(torch.uint8)
    nested = qs.state2 is not None
    extra: list = []
    offset = None
    if nested:
        offset = qs.offset if isinstance(qs.offset, torch.Tensor) else torch.tensor(float(qs.offset))
        offset = _as_f32(offset.reshape(()), extra)
    return ExecLayout(
        key=key, B=B, code=_as_f32(qs.code, extra), absmax=qs.absmax,
        nested_code=_as_f32(qs.state2.code, extra) if nested else None,
        nested_absmax=_as_f32(qs.state2.absmax, extra) if nested else None,
        nested_offset=offset, blocksize=int(qs.blocksize),
        nested_blocksize=int(qs.state2.blocksize) if nested else 0, N=int(qs.shape[0]),
        extra_bytes=sum(extra))


def layout(module, dtype) -> ExecLayout:
    """The cached layout of ``module``'s weight for ``dtype`` inputs, rebuilt when the key changed."""
    weight, qs = module.weight, module.weight.quant_state
    if torch.compiler.is_compiling():  # no cache under tracing: the views are cheap to rebuild
        return build(weight, qs, dtype)
    key = _key(weight, qs, dtype)
    lay = _LAYOUTS.get(module)
    if lay is None or lay.key != key:
        lay = _LAYOUTS[module] = build(weight, qs, dtype, key)
    return lay


def cached(module) -> Optional[ExecLayout]:
    """The layout ``module`` holds now (None before its first inference forward or after a discard)."""
    return _LAYOUTS.get(module)


def discard(module) -> None:
    """Drop ``module``'s layout (it is rebuilt on the next inference forward)."""
    _LAYOUTS.pop(module, None)


def _applies(module, x, qs) -> bool:
    import bnbcy
    from .. import kernels
    from ..autograd._functions import matmul_4bit
    w = module.weight
    return (ENABLED and not module.training and not kernels.emulating()  # emulated runs test the CUDA path and x.device.type == "cpu" and w.device.type == "cpu"
            and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not (torch.is_grad_enabled() and x.requires_grad)
            and getattr(w, "bnb_quantized", False) and qs is not None and qs.shape is not None
            and tuple(qs.shape) == (module.out_features, module.in_features)
            and getattr(qs.absmax, "device", x.device).type == "cpu"
            and bnbcy.matmul_4bit is matmul_4bit)  # a patched matmul_4bit is honoured


def linear(module, x, bias) -> Optional[torch.Tensor]:
    """``x @ W.T + bias`` through the execution layout, or None where it does not apply
    (training mode, gradients through ``x``, not on the CPU, not quantized, a patched
    ``bnbcy.matmul_4bit``); ``x`` and ``bias`` are already in the compute dtype."""
    qs = module.weight.quant_state
    if not _applies(module, x, qs):
        if module.training:
            discard(module)  # nothing is kept while training; the next eval forward builds afresh
        return None
    from .._ops.fourbit_exec import gemm_4bit_exec
    lay = layout(module, x.dtype)
    fold_bias = bias is not None and not (torch.is_grad_enabled() and bias.requires_grad)
    y = gemm_4bit_exec(x, lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax, lay.nested_offset,
                       lay.blocksize, lay.nested_blocksize, lay.N, bias.detach() if fold_bias else None)
    if bias is not None and not fold_bias:
        y = y + bias  # the bias's gradient still flows
    return y
