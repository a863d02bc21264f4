"""The op table: one record per ``torch.library`` op, defined under ``bnbcy`` and, on request,
under further namespaces with the same kernels (the bitsandbytes stand-in calls
``add_namespace("bitsandbytes")``).

An op module declares each op once::

    op("dequantize_blockwise", "(Tensor A, Tensor absmax, Tensor code, int blocksize, "
       "ScalarType dtype) -> Tensor", impl=_dequantize_blockwise, fake=_dequantize_blockwise_fake)

``impl`` is registered as the CompositeExplicitAutograd kernel (one function for every device:
it validates and calls the one CPU/CUDA dispatch); ``fake`` is the meta kernel for
torch.compile; ``autograd=(backward, setup_context)`` makes the op differentiable.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch

NAMESPACE = "bnbcy"


@dataclasses.dataclass
class OpRecord:
    name: str                      # "quantize_blockwise" or "dequantize_blockwise.out"
    schema: str                    # "(Tensor A, ...) -> Tensor"
    impl: Callable
    fake: Optional[Callable] = None
    autograd: Optional[tuple] = None   # (backward, setup_context)


_OPS: dict[str, OpRecord] = {}
_LIBS: dict[str, torch.library.Library] = {}


def _register(ns: str, rec: OpRecord) -> None:
    lib = _LIBS.get(ns)
    if lib is None:
        lib = _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
    lib.define(rec.name + rec.schema)
    qual = f"{ns}::{rec.name}"
    lib.impl(rec.name, rec.impl, "CompositeExplicitAutograd")
    if rec.fake is not None:
        torch.library.register_fake(qual, rec.fake, lib=lib)
    if rec.autograd is not None:
        backward, setup_context = rec.autograd
        torch.library.register_autograd(qual, backward, setup_context=setup_context, lib=lib)


def op(name: str, schema: str, impl: Callable, fake: Callable | None = None,
       autograd: tuple | None = None):
    """Define ``bnbcy::name`` (and the same op in every namespace added so far); return the
    ``torch.ops`` overload packet of the bnbcy op."""
    if name in _OPS:
        raise RuntimeError(f"bnbcy op {name!r} is defined twice")
    rec = _OPS[name] = OpRecord(name, schema, impl, fake, autograd)
    for ns in [NAMESPACE, *[n for n in _LIBS if n != NAMESPACE]]:
        _register(ns, rec)
    base = name.split(".")[0]
    return getattr(torch.ops.bnbcy, base)


def _taken(ns: str) -> list:
    packet = getattr(torch.ops, ns)
    return [rec.name for rec in _OPS.values() if hasattr(packet, rec.name.split(".")[0])]


def add_namespace(ns: str) -> None:
    """Define every bnbcy op under ``torch.ops.<ns>`` too, with the same kernels (idempotent).

    Raises
    ------
    RuntimeError
        When ``torch.ops.<ns>`` already holds one of the ops (e.g. the real bitsandbytes is
        imported in this process); nothing is defined then.
    """
    if ns in _LIBS:
        return
    taken = _taken(ns)
    if taken:
        raise RuntimeError(f"cannot define bnbcy's ops under torch.ops.{ns}: it already defines "
                           f"{', '.join(taken[:4])}{', ...' if len(taken) > 4 else ''} (another library "
                           f"named {ns!r} is loaded in this process)")
    _LIBS[ns] = torch.library.Library(ns, "FRAGMENT")
    for rec in _OPS.values():
        _register(ns, rec)


def defined_ops() -> list[str]:
    """Names of every op defined so far (overloads as ``name.overload``)."""
    return sorted(_OPS)
