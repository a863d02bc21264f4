"""4-bit and LLM.int8 layers with bitsandbytes' names, signatures, defaults and checkpoint
format (``bitsandbytes.nn.modules``; NUMERICS.md §3.5, §4, §5.7-§5.8).

* :class:`Params4bit` -- a ``torch.nn.Parameter`` holding a float weight until its first
  move to a (non-meta) device, then the packed 4-bit codes plus a :class:`QuantState`.
* :class:`Linear4bit`, :class:`LinearNF4`, :class:`LinearFP4` -- ``nn.Linear`` over a
  :class:`Params4bit` weight, computing ``x @ dequant(W).T + bias`` through
  ``bnbcy.matmul_4bit``.

* :class:`Int8Params` -- a ``torch.nn.Parameter`` quantized row-wise to int8 (``CB``) with
  float32 row scales (``SCB``) on its first move to a (non-meta) device.
* :class:`Linear8bitLt` -- ``nn.Linear`` of LLM.int8, computing through ``bnbcy.matmul``
  with a :class:`~bnbcy.autograd._functions.MatmulLtState`.

Quantization happens on CPU too (bnbcy's CPU kernels read the standard packed layout),
so ``Linear4bit(...).cpu()`` or ``.to("cpu")`` quantizes.
"""
from __future__ import annotations

import copy
import logging
import warnings
from types import SimpleNamespace
from typing import Any, Optional

import torch
from torch import nn

from ..functional.fourbit import quantize_4bit as _quantize_4bit
from .. import distributed as _dist
from ..functional.quant_state import QuantState
from . import _exec_layout

logger = logging.getLogger(__name__)

__all__ = ["Params4bit", "Linear4bit", "LinearFP4", "LinearNF4", "fix_4bit_weight_quant_state_from_module",
           "Int8Params", "Linear8bitLt", "maybe_rearrange_weight", "Embedding", "StableEmbedding"]

# Settings a Params4bit carries besides its data; pickling/copying keeps all of them.
_SETTINGS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage",
             "bnb_quantized", "module")


# ------------------------------------------------------------------ state-dict helpers
def _set_quant_buffers(module, tensors):
    """Register ``tensors`` (name -> tensor or None) as non-persistent buffers ``_qs_<name>``
    of ``module`` (not in the state dict; DDP broadcasts them in place)."""
    for name, t in tensors.items():
        key = "_qs_" + name
        if t is None or not isinstance(t, torch.Tensor):
            module._buffers.pop(key, None)
            module._non_persistent_buffers_set.discard(key)
        else:
            module._buffers[key] = t
            module._non_persistent_buffers_set.add(key)


def _snapshot(module):
    """What a state-dict load may change in ``module``: parameter objects, their data and
    attributes, buffers, the module's attributes (and LLM.int8 state)."""
    params = {}
    for name, p in module._parameters.items():
        if p is None:
            params[name] = (None, None, None)
            continue
        data = _dist.local(p).detach().clone()
        attrs = dict(p.__dict__) if not _dist.is_dtensor(p) else None
        params[name] = (p, data, attrs)
    extra = {}
    for k in ("CB", "SCB"):
        for holder in (module._parameters.get("weight"), getattr(module, "state", None)):
            t = getattr(holder, k, None) if holder is not None else None
            if isinstance(t, torch.Tensor) and _dist.has_storage(t):
                extra[id(t)] = (t, t.detach().clone())
    state = getattr(module, "state", None)
    return (params, dict(module._buffers), set(module._non_persistent_buffers_set),
            {k: v for k, v in module.__dict__.items() if k not in ("_parameters", "_buffers", "_modules")},
            dict(state.__dict__) if state is not None and hasattr(state, "__dict__") else None, extra)


def _restore(module, snap):
    params, buffers, non_persistent, attrs, state_attrs, extra = snap
    with torch.no_grad():
        for name, (p, data, pattrs) in params.items():
            module._parameters[name] = p
            if p is None:
                continue
            target = _dist.local(p)
            if target.shape == data.shape and target.dtype == data.dtype:
                target.copy_(data)
            else:
                p.data = data
            if pattrs is not None:
                p.__dict__.clear()
                p.__dict__.update(pattrs)
        for t, data in extra.values():
            if t.shape == data.shape and t.dtype == data.dtype:
                t.copy_(data)
    module._buffers.clear()
    module._buffers.update(buffers)
    module._non_persistent_buffers_set.clear()
    module._non_persistent_buffers_set.update(non_persistent)
    for k in [k for k in module.__dict__ if k not in attrs and k not in ("_parameters", "_buffers", "_modules")]:
        del module.__dict__[k]
    module.__dict__.update(attrs)
    if state_attrs is not None:
        module.state.__dict__.clear()
        module.state.__dict__.update(state_attrs)


def _atomic_load(module, load, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs):
    """Run ``load`` (a ``_load_from_state_dict`` body); if it reports an error or raises,
    put ``module`` back as it was."""
    snap = _snapshot(module)
    n = len(error_msgs)
    try:
        load(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    except BaseException:
        _restore(module, snap)
        raise
    if len(error_msgs) > n:
        _restore(module, snap)


def _load_all_or_nothing(module, load_state_dict, state_dict, strict, assign):
    """``load_state_dict`` that leaves ``module`` as it was when it raises (e.g. for missing
    or unexpected keys under ``strict``, reported after everything else was loaded)."""
    snap = _snapshot(module)
    try:
        return load_state_dict(state_dict, strict=strict, assign=assign)
    except BaseException:
        _restore(module, snap)
        raise


def _check_packed_state(codes, quant_state, wkey):
    """Sizes of loaded 4-bit codes and their state against the state's shape/blocksize; an
    error message, or None."""
    n = 1
    for d in quant_state.shape:
        n *= int(d)
    local = _dist.local(codes)
    nbytes = (local.numel() * local.element_size()) if not _dist.is_sharded(codes) else None
    if nbytes is not None and nbytes != (n + 1) // 2:
        return (f"{wkey}: {nbytes} bytes of packed codes for a weight of shape {tuple(quant_state.shape)}, "
                f"expected {(n + 1) // 2}")
    try:
        blocks = -(-n // int(quant_state.blocksize))
    except (TypeError, ValueError, ZeroDivisionError):
        return f"{wkey}.quant_state: blocksize must be a positive int, got {quant_state.blocksize!r}"
    if quant_state.absmax is None or quant_state.absmax.numel() != blocks:
        got = None if quant_state.absmax is None else quant_state.absmax.numel()
        return (f"{wkey}.absmax: expected {blocks} block maxima for shape {tuple(quant_state.shape)} and "
                f"blocksize {quant_state.blocksize}, got {got}")
    if quant_state.nested:
        s2 = quant_state.state2
        nb2 = -(-blocks // int(s2.blocksize))
        if s2.absmax is None or s2.absmax.numel() != nb2:
            return (f"{wkey}.nested_absmax: expected {nb2} elements, got "
                    f"{None if s2.absmax is None else s2.absmax.numel()}")
    return None


def _matmul_4bit(*args, **kwargs):
    # through the package attribute, as bitsandbytes calls ``bnb.matmul_4bit``, so that a
    # patched ``bnbcy.matmul_4bit`` is honoured
    import bnbcy
    return bnbcy.matmul_4bit(*args, **kwargs)


def _rebuild_params4bit(data, requires_grad):
    """Unpickling entry point of :class:`Params4bit` (settings follow via ``__setstate__``)."""
    return Params4bit(data, requires_grad=requires_grad)


class _DtypeCastsThroughTo:
    """``half()``/``float()``/``bfloat16()``/``double()`` routed through the class's ``to``, which
    leaves quantized codes untouched (a plain cast would turn the codes into numbers)."""

    def half(self, memory_format=torch.preserve_format):
        return self.to(dtype=torch.float16)

    def float(self, memory_format=torch.preserve_format):
        return self.to(dtype=torch.float32)

    def bfloat16(self, memory_format=torch.preserve_format):
        return self.to(dtype=torch.bfloat16)

    def double(self, memory_format=torch.preserve_format):
        return self.to(dtype=torch.float64)


class Params4bit(_DtypeCastsThroughTo, torch.nn.Parameter):
    """A weight that is quantized to 4 bits on its first move to a device.

    Parameters
    ----------
    data : torch.Tensor, optional
        The float weight (``[out_features, in_features]``), or already-packed codes
        when ``bnb_quantized=True``. Default: an empty tensor.
    requires_grad : bool
        Default False: 4-bit weights are frozen (``matmul_4bit`` gives no weight gradient).
    quant_state : QuantState, optional
        State of already-packed ``data``.
    blocksize : int, optional
        Default 64.
    compress_statistics : bool
        Double-quantize the block maxima (default True).
    quant_type : {'fp4', 'nf4'}
        Default 'fp4', as in bitsandbytes.
    quant_storage : torch.dtype
        dtype the packed bytes are viewed as (default ``torch.uint8``).
    module : torch.nn.Module, optional
        Owner; it gets the quant state as ``module.quant_state`` too, so that the state
        can be restored if a wrapper (e.g. FSDP) replaces the parameter.
    bnb_quantized : bool
        Whether ``data`` already holds packed codes.

    Notes
    -----
    * ``.to(device)``, ``.cpu()`` and ``.cuda()`` quantize on the first move to a non-meta
      device (CPU included); a dtype given in the same call is ignored for the
      quantization, as in bitsandbytes. Later moves move codes and state without
      requantizing.
    * Once quantized, dtype conversions (``.to(dtype)``, ``.half()``, ``.float()``,
      ``.bfloat16()``, ``.double()``) return the codes unchanged: ``quant_storage`` is a
      view of bytes, so a numeric cast would destroy them. (bitsandbytes casts, which
      corrupts float ``quant_storage``.)
    * Pickling and ``copy.deepcopy`` keep the subclass, the settings and the state
      (bitsandbytes' pickle gives back a plain ``Parameter``).
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = False,
                quant_state: Optional[QuantState] = None, blocksize: Optional[int] = None,
                compress_statistics: bool = True, quant_type: str = "fp4",
                quant_storage: torch.dtype = torch.uint8, module: Optional[nn.Module] = None,
                bnb_quantized: bool = False, **kwargs) -> "Params4bit":
        if data is None:
            data = torch.empty(0)
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.blocksize = 64 if blocksize is None else blocksize
        self.compress_statistics = compress_statistics
        self.quant_type = quant_type
        self.quant_state = quant_state
        self.quant_storage = quant_storage
        self.bnb_quantized = bnb_quantized
        self.module = module
        return self

    # ----------------------------------------------------------------- pickling / copying
    def __getstate__(self):
        state = self.__dict__.copy()
        # bitsandbytes' layout: data and requires_grad travel in the state too
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state):
        state = dict(state)
        data = state.pop("data", None)
        requires_grad = state.pop("requires_grad", None)
        if data is not None:
            self.data = data
        if requires_grad is not None:
            self.requires_grad = requires_grad
        for name in _SETTINGS:
            setattr(self, name, state.pop(name, getattr(self, name, None)))
        self.__dict__.update(state)  # foreign attributes (e.g. set by other libraries)

    def __reduce_ex__(self, proto):
        # The settings go in the third item, applied after the object exists, so that the
        # module <-> parameter reference cycle pickles like any other cycle.
        state = self.__getstate__()
        del state["data"], state["requires_grad"]
        return _rebuild_params4bit, (self.data, self.requires_grad), state

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = type(self).__new__(type(self), self.data.clone(memory_format=torch.preserve_format),
                                 requires_grad=self.requires_grad)
        memo[id(self)] = new
        state = self.__getstate__()
        del state["data"], state["requires_grad"]
        module = state.pop("module")
        new.__setstate__(copy.deepcopy(state, memo))
        # The owner is copied only as part of copying the owner itself (then it is in
        # memo); a lone parameter copy keeps pointing at the original owner, as in bnb.
        new.module = memo.get(id(module), module) if module is not None else None
        return new

    def __copy__(self):
        new = type(self).__new__(type(self), self.data, requires_grad=self.requires_grad)
        new.__setstate__(self.__getstate__())
        return new

    # --------------------------------------------------------------- QuantState proxies
    # Properties (not __getattr__) so FSDP can resolve "weight.absmax" and torch.compile can
    # trace them. blocksize/quant_type/dtype/shape are deliberately absent: they collide with
    # parameter settings or tensor attributes and live in the packed JSON blob.
    def _qs(self, name, nested=False):
        qs = self.__dict__.get("quant_state")
        if qs is None or (nested and qs.state2 is None):
            raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")
        return qs

    absmax = property(lambda self: self._qs("absmax").absmax)
    code = property(lambda self: self._qs("code").code)
    quant_map = property(lambda self: self._qs("quant_map").code)
    offset = property(lambda self: self._qs("offset").offset)
    state2 = property(lambda self: self._qs("state2").state2)
    nested_absmax = property(lambda self: self._qs("nested_absmax", True).state2.absmax)
    nested_blocksize = property(lambda self: self._qs("nested_blocksize", True).state2.blocksize)
    nested_quant_map = property(lambda self: self._qs("nested_quant_map", True).state2.code)
    nested_dtype = property(lambda self: self._qs("nested_dtype", True).state2.dtype)
    nested_offset = property(lambda self: self._qs("nested_offset").offset)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_prequantized(cls, data: torch.Tensor, quantized_stats: dict[str, Any], requires_grad: bool = False,
                          device="cuda", module: Optional[nn.Module] = None, **kwargs) -> "Params4bit":
        """Rebuild a quantized weight from a state-dict slice.

        Parameters
        ----------
        data : torch.Tensor
            The packed codes (``state_dict["weight"]``); its dtype becomes ``quant_storage``.
        quantized_stats : dict
            The ``weight.*`` entries with the ``weight.`` prefix removed (``absmax``,
            ``quant_map``, ``quant_state.bitsandbytes__nf4`` ...), packed or not.
        requires_grad : bool
        device : torch.device or str
            Where codes and state go (default ``'cuda'`` as in bitsandbytes).
        module : torch.nn.Module, optional
            Owner; gets ``module.quant_state``.
        """
        quant_state = QuantState.from_dict(qs_dict=quantized_stats, device=device)
        self = cls(data.to(device), requires_grad=requires_grad, quant_state=quant_state,
                   blocksize=quant_state.blocksize, compress_statistics=quant_state.nested,
                   quant_type=quant_state.quant_type, quant_storage=data.dtype, module=module,
                   bnb_quantized=True)
        if module is not None:
            module.quant_state = quant_state
        return self

    def _quantize(self, device):
        w = self.data.contiguous().to(device)
        packed, quant_state = _quantize_4bit(w, blocksize=self.blocksize,
                                             compress_statistics=self.compress_statistics,
                                             quant_type=self.quant_type, quant_storage=self.quant_storage)
        if self.requires_grad and not packed.is_floating_point():
            # integer codes cannot require grad; the weight gets no gradient anyway
            self.requires_grad_(False)
        self.data = packed
        self.quant_state = quant_state
        if self.module is not None:
            self.module.quant_state = quant_state
        self.bnb_quantized = True
        return self

    # ------------------------------------------------------------------------ moves
    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        if device is not None and device.type != "meta" and not self.bnb_quantized:
            return self._quantize(device)
        if self.bnb_quantized:
            dtype = None  # the codes are bytes: never cast them
            if device is not None and self.quant_state is not None:
                self.quant_state.to(device)
        moved = self.data.to(device=device, dtype=dtype, non_blocking=non_blocking)
        return Params4bit(moved, requires_grad=self.requires_grad, quant_state=self.quant_state,
                          blocksize=self.blocksize, compress_statistics=self.compress_statistics,
                          quant_type=self.quant_type, quant_storage=self.quant_storage,
                          module=self.module, bnb_quantized=self.bnb_quantized)


    # ------------------------------------------------------------------ torch functions
    _SPLITS = frozenset({torch.chunk, torch.split, torch.Tensor.chunk, torch.Tensor.split})

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = {} if kwargs is None else kwargs
        result = super().__torch_function__(func, types, args, kwargs)
        if func not in cls._SPLITS:
            return result
        # chunk/split keep the subclass and its settings (FSDP shards through them)
        src = args[0]

        def wrap(t):
            return cls(t, requires_grad=src.requires_grad, quant_state=src.quant_state,
                       blocksize=src.blocksize, compress_statistics=src.compress_statistics,
                       quant_type=src.quant_type, quant_storage=src.quant_storage, module=src.module,
                       bnb_quantized=src.bnb_quantized)
        return tuple(wrap(t) for t in result) if isinstance(result, (tuple, list)) else wrap(result)


def fix_4bit_weight_quant_state_from_module(module: nn.Module) -> None:
    """Give ``module.weight`` its quant state back when a wrapper replaced the parameter.

    Raises
    ------
    RuntimeError
        If the weight was never quantized.
    """
    if getattr(module.weight, "quant_state", None) is not None:
        return
    if getattr(module, "quant_state", None) is None:
        raise RuntimeError(
            f"{type(module).__name__} weight is not quantized yet: move the module to a device "
            f"(.to(device), .cpu(), .cuda()) to quantize it, or load a quantized state_dict.")
    # e.g. FSDP flattens/unflattens parameters and drops the subclass attributes; the module
    # kept a reference to the state when it quantized, so restore it from there.
    if module.weight.dim() != 2 or module.weight.shape[1] != 1:
        raise RuntimeError(f"{type(module).__name__}: the weight has shape {tuple(module.weight.shape)}, "
                           f"not the packed (n, 1) layout, and no quant state; cannot restore it")
    if not isinstance(module.weight, Params4bit):
        module.weight = Params4bit(module.weight.data, quant_storage=module.quant_storage, bnb_quantized=True,
                                   module=module)
    module.weight.quant_state = module.quant_state


class Linear4bit(nn.Linear):
    """Linear layer with a 4-bit (NF4/FP4) weight, as in QLoRA.

    Parameters
    ----------
    input_features, output_features : int
    bias : bool
    compute_dtype : torch.dtype, optional
        dtype of the matmul. Unset, the first input decides: float32/bfloat16 inputs set it
        to their dtype; float16 inputs leave it unset (computed in float16) with a warning.
    compress_statistics : bool
        Double-quantize the block maxima (default True).
    quant_type : {'fp4', 'nf4'}
    quant_storage : torch.dtype
        dtype the packed weight bytes are viewed as (default ``torch.uint8``).
    device : torch.device or str, optional
        Where the (float, not yet quantized) weight is created.

    Notes
    -----
    The weight is quantized when the module is moved (``.to(device)``, ``.cpu()``,
    ``.cuda()``) -- on CPU too. A quantized ``state_dict`` (bitsandbytes' format) loads into
    a freshly constructed module with plain ``load_state_dict``. Differences from
    bitsandbytes 0.50.2: the bias is cast per call instead of having its ``.data``
    replaced by a compute-dtype copy; a float16 input with ``compute_dtype=float32`` warns
    (bitsandbytes only warns when ``compute_dtype`` is unset); no AVX512-BF16 CPU repacking.
    """

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_type="fp4", quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.weight = Params4bit(self.weight.data, requires_grad=False, compress_statistics=compress_statistics,
                                 quant_type=quant_type, quant_storage=quant_storage, module=self)
        self.compute_dtype = compute_dtype
        self.compute_type_is_set = compute_dtype is not None
        self.quant_state = None
        self.quant_storage = quant_storage
        self._fp16_upcast_warned = False

    # ---------------------------------------------------------------- compute dtype
    def set_compute_type(self, x: torch.Tensor) -> None:
        """First-input rule for an unset ``compute_dtype`` (bitsandbytes' behaviour)."""
        if x.dtype in (torch.float32, torch.bfloat16):
            # safe to compute in the input's own dtype, and fastest
            self.compute_dtype = x.dtype
        elif x.dtype == torch.float16 and not torch.compiler.is_compiling():
            # bitsandbytes keeps compute_dtype unset here (the matmul runs in float16) and logs
            # this notice, in its words
            if x.numel() == x.shape[-1]:
                logger.warning("Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                               "(default). This will lead to slow inference.")
            else:
                logger.warning("Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 "
                               "(default). This will lead to slow inference or training speed.")

    def _warn_fp16_upcast(self, x: torch.Tensor) -> None:
        if self._fp16_upcast_warned or x.dtype != torch.float16 or self.compute_dtype != torch.float32 \
                or torch.compiler.is_compiling():
            return
        self._fp16_upcast_warned = True
        warnings.warn(
            f"{type(self).__name__} has compute_dtype=torch.float32 but received a torch.float16 input: the "
            f"input is upcast to float32 for the 4-bit matmul (slower, more memory) and the result cast back "
            f"to float16. Use compute_dtype=torch.float16 for float16 compute.", UserWarning, stacklevel=3)

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fix_4bit_weight_quant_state_from_module(self)
        quant_state = self.weight.quant_state
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point tensor input, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dimension is "
                             f"{x.shape[-1] if x.dim() else 'missing (0-d input)'}, expected "
                             f"in_features={self.in_features} (input shape {tuple(x.shape)})")
        if not self.compute_type_is_set:
            self.set_compute_type(x)
            self.compute_type_is_set = True
        self._warn_fp16_upcast(x)

        inp_dtype = x.dtype
        if self.compute_dtype is not None:
            x = x.to(self.compute_dtype)
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"{type(self).__name__}: cannot compute in {x.dtype}; pass compute_dtype="
                            f"torch.float32, torch.float16 or torch.bfloat16")
        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            # differentiable cast; the parameter itself keeps its dtype (bnb swaps .data)
            bias = bias.to(x.dtype)
        # CPU inference: the execution layout (never repacks the storage; None where it does not apply)
        y = _exec_layout.linear(self, x, bias)
        if y is not None:
            return y.to(inp_dtype)
        # weight.t() as bitsandbytes passes it: matmul_4bit views the codes as (-1, 1) and
        # takes N, K from quant_state.shape
        return _matmul_4bit(x, self.weight.t(), bias=bias, quant_state=quant_state).to(inp_dtype)

    # -------------------------------------------------------------------- state dict
    @property
    def quant_state(self) -> Optional[QuantState]:
        """The weight's quant state, kept on the module too (a wrapper such as FSDP may
        replace the parameter object and lose it)."""
        return self.__dict__.get("_quant_state")

    @quant_state.setter
    def quant_state(self, value: Optional[QuantState]) -> None:
        self.__dict__["_quant_state"] = value
        self._sync_quant_buffers()

    def _sync_quant_buffers(self):
        # absmax / nested state as non-persistent buffers that *are* the state's tensors: DDP
        # broadcasts buffers in place, so rank 0's statistics travel with its codes
        qs = self.__dict__.get("_quant_state")
        _set_quant_buffers(self, {"absmax": qs.absmax if qs is not None else None,
                                  "nested_absmax": qs.state2.absmax if qs is not None and qs.nested else None,
                                  "nested_offset": qs.offset if qs is not None and qs.nested else None})

    def _apply(self, fn, recurse=True):
        result = super()._apply(fn, recurse)
        self._sync_quant_buffers()       # a move/cast replaced the buffers: point them at the state again
        return result

    def _current_quant_state(self):
        """The weight's quant state, or the module's when a wrapper replaced the parameter."""
        w = self.weight
        if isinstance(w, Params4bit) and not _dist.is_dtensor(w):
            return w.quant_state
        return self.quant_state

    def _weight_is_quantized(self) -> bool:
        w = self.weight
        if isinstance(w, Params4bit) and not _dist.is_dtensor(w):
            return bool(w.bnb_quantized)
        return self.quant_state is not None     # held by a wrapper (FSDP), quantized before

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``weight`` and ``bias`` as nn.Linear, then the weight's quant state as
        ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the packed
        ``weight.quant_state.bitsandbytes__<type>`` blob (bitsandbytes' keys).

        The quant state comes from the module when a wrapper (FSDP) replaced the parameter.
        In a distributed state dict (the weight is a DTensor or held by FSDP, or inside
        :func:`bnbcy.distributed.fixed_length_quant_state`) the blob is padded with JSON
        whitespace to a fixed length, which DCP's planner needs."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        quant_state = self._current_quant_state() if self._weight_is_quantized() else None
        if quant_state is None:
            return
        fixed = _dist.use_fixed_length_blob(self.weight)
        if _dist.is_dtensor(self.weight):
            # torch.distributed.checkpoint.state_dict resolves "weight.absmax" etc. by getattr
            # on the parameter, which FSDP2 made a plain DTensor: give it the names again
            _dist.expose_quant_state(self.weight, quant_state)
        for k, v in quant_state.as_dict(packed=True).items():
            if fixed and k.startswith("quant_state."):
                v = _dist.pad_blob(v)
            destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: on any error (bad entries, missing
        or unexpected keys with ``strict``) the module is left as it was."""
        return _load_all_or_nothing(self, super().load_state_dict, state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load a quantized (bitsandbytes-format) or a float state dict.

        * Quantized: the ``weight.*`` quant-state entries give the codes' state. Into a
          quantized module (or one whose parameter FSDP holds: a DTensor, an FSDP1 view) the
          codes are copied into the existing parameter and the state replaced; otherwise
          the weight is rebuilt with :meth:`Params4bit.from_prequantized` on the current
          weight's device (the incoming codes' device when the current weight is on
          ``meta``). The module need not be quantized before.
        * Float into a not-yet-quantized module: as ``nn.Linear`` (copied in place).
        * Float into a quantized module: the float weight is quantized with the module's
          settings and installed as above.

        An error leaves this module as it was (the message goes to ``error_msgs``).
        """
        _atomic_load(self, self._load_weight_and_rest, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs)

    def _load_weight_and_rest(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        qs_prefix = wkey + "."
        qs_keys = [k for k in state_dict if k.startswith(qs_prefix)]
        incoming = state_dict.get(wkey)
        if not qs_keys and not (incoming is not None and self._weight_is_quantized()):
            old = self.weight
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            self._rewrap_weight(old)
            return

        rest = {k: v for k, v in state_dict.items() if k != wkey and k not in qs_keys}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if wkey in missing_keys:
            missing_keys.remove(wkey)
        if incoming is None:
            missing_keys.append(wkey)
            return
        w = self.weight
        device = w.device if w.device.type != "meta" else incoming.device
        expected = (self.out_features, self.in_features)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        try:
            if qs_keys:
                stats = {k[len(qs_prefix):]: state_dict[k] for k in qs_keys}
                quant_state = QuantState.from_dict(qs_dict={k: _dist.full(v) for k, v in stats.items()},
                                                   device=device)
                codes = incoming.detach()
            elif tuple(incoming.shape) == expected and incoming.is_floating_point():
                settings = w if isinstance(w, Params4bit) else self._settings_param()
                q = Params4bit(_dist.full(incoming.detach()).clone(), requires_grad=False,
                               blocksize=settings.blocksize, compress_statistics=settings.compress_statistics,
                               quant_type=settings.quant_type, quant_storage=settings.quant_storage)._quantize(device)
                codes, quant_state = q.data, q.quant_state
            else:
                error_msgs.append(f"size mismatch for {wkey}: copying a float weight of shape "
                                  f"{tuple(incoming.shape)} into a quantized {type(self).__name__} "
                                  f"of shape {expected}")
                return
        except Exception as exc:    # noqa: BLE001 -- any bad entry is this key's load error
            error_msgs.append(f"While loading the quantized weight {wkey}: {type(exc).__name__}: {exc}")
            return
        if quant_state.shape is None or tuple(quant_state.shape) != expected:
            error_msgs.append(f"size mismatch for {wkey}: the checkpoint holds a quantized weight of shape "
                              f"{None if quant_state.shape is None else tuple(quant_state.shape)}, the module "
                              f"expects {expected}")
            return
        msg = _check_packed_state(codes, quant_state, wkey)
        if msg:
            error_msgs.append(msg)
            return
        held = _dist.is_sharded(w) or not isinstance(w, Params4bit)
        if held or (self._weight_is_quantized() and not assign and w.device.type != "meta"
                    and _dist.local(w).dtype == codes.dtype and tuple(w.shape) == tuple(codes.shape)):
            msg = self._copy_codes_in_place(codes, wkey)
            if msg:
                error_msgs.append(msg)
                return
            self._install_quant_state(quant_state)
            return
        new = Params4bit(codes.to(device), requires_grad=False, quant_state=quant_state,
                         blocksize=quant_state.blocksize, compress_statistics=quant_state.nested,
                         quant_type=quant_state.quant_type, quant_storage=codes.dtype, module=self,
                         bnb_quantized=True)
        self.weight = new
        self.quant_state = quant_state
        self.quant_storage = new.quant_storage

    def _settings_param(self):
        # the settings of a weight a wrapper replaced (it is quantized: the module has its state)
        qs = self.quant_state
        return SimpleNamespace(blocksize=qs.blocksize, compress_statistics=qs.nested, quant_type=qs.quant_type,
                               quant_storage=self.quant_storage)

    def _copy_codes_in_place(self, codes, wkey):
        return _dist.copy_in_place(self.weight, codes, wkey)

    def _install_quant_state(self, quant_state):
        w = self.weight
        if isinstance(w, Params4bit) and not _dist.is_dtensor(w):
            w.quant_state = quant_state
            w.blocksize, w.compress_statistics = quant_state.blocksize, quant_state.nested
            w.quant_type, w.bnb_quantized = quant_state.quant_type, True
        self.quant_state = quant_state

    def _rewrap_weight(self, old):
        # load_state_dict(assign=True) replaces the parameter by a plain one: restore the
        # subclass and the settings of the parameter it replaced, so the next move quantizes
        w = self.weight
        if isinstance(w, Params4bit) or not isinstance(old, Params4bit):
            return
        self.weight = Params4bit(w.data, requires_grad=False, blocksize=old.blocksize,
                                 compress_statistics=old.compress_statistics, quant_type=old.quant_type,
                                 quant_storage=old.quant_storage, module=self)


class LinearFP4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type='fp4'``."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "fp4",
                         quant_storage, device)


class LinearNF4(Linear4bit):
    """:class:`Linear4bit` with ``quant_type='nf4'`` (QLoRA's NormalFloat4)."""

    def __init__(self, input_features, output_features, bias=True, compute_dtype=None, compress_statistics=True,
                 quant_storage=torch.uint8, device=None):
        super().__init__(input_features, output_features, bias, compute_dtype, compress_statistics, "nf4",
                         quant_storage, device)


# ===================================================================================== LLM.int8
# Int8Params / Linear8bitLt (NUMERICS.md §5.7-§5.8): bitsandbytes' names, signatures, defaults and
# state_dict format (``weight`` int8 [out, in], ``SCB`` float32 [out], ``weight_format`` uint8 0).

# bitsandbytes.utils.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING and its inverse
LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {"row": 0, "col32": 1, "col_turing": 2, "col_ampere": 3}
INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING = {v: k for k, v in LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING.items()}

# Settings an Int8Params carries besides its data; pickling/copying keeps all of them.
_INT8_SETTINGS = ("CB", "SCB", "has_fp16_weights")


def _int8_vectorwise_quant(A):
    # looked up at call time through the package, as bitsandbytes calls
    # ``bnb.functional.int8_vectorwise_quant`` (a patched op is honoured)
    from .. import functional
    return functional.int8_vectorwise_quant(A)


def _matmul(*args, **kwargs):
    import bnbcy
    return bnbcy.matmul(*args, **kwargs)


def _matmul_lt_state():
    from ..autograd import _functions
    return _functions.MatmulLtState()


def _rebuild_int8params(data, requires_grad):
    """Unpickling entry point of :class:`Int8Params` (settings follow via ``__setstate__``)."""
    return Int8Params(data, requires_grad=requires_grad)


class Int8Params(_DtypeCastsThroughTo, torch.nn.Parameter):
    """An LLM.int8 weight: quantized row-wise to int8 on its first move to a device.

    Parameters
    ----------
    data : torch.Tensor, optional
        The float weight ``[out_features, in_features]``, or int8 codes (with ``SCB``).
        Default: an empty tensor.
    requires_grad : bool
        Default True, as in bitsandbytes; False for int8 ``data`` and once the weight is
        quantized (integer tensors cannot require grad; bitsandbytes raises instead).
    has_fp16_weights : bool
        Keep the float weight (never quantize on a move); the matmul quantizes it on the
        fly. Default False.
    CB : torch.Tensor, optional
        int8 codes ``[out, in]`` (the same tensor as ``data`` once quantized).
    SCB : torch.Tensor, optional
        float32 ``[out]`` row scales: the float16 absmax of each weight row.

    Notes
    -----
    * ``.to(device)``, ``.cpu()``, ``.cuda()`` from a non-int8 weight to a non-meta device
      (CPU included) quantize unless ``has_fp16_weights``:
      ``CB, SCB, _ = int8_vectorwise_quant(W.to(float16))``; ``data`` becomes ``CB``. A
      dtype given in the same call is ignored for the quantization, as in bitsandbytes.
      Later moves carry ``CB`` (= ``data``) and ``SCB`` along without requantizing.
    * Once quantized, dtype conversions (``.to(dtype)``, ``.half()``...) leave the codes
      as they are (bitsandbytes casts them, which destroys them).
    * Pickling and ``copy.deepcopy`` keep the subclass, ``CB``, ``SCB`` and the settings
      (bitsandbytes' pickle gives back a plain ``Parameter``).
    * bitsandbytes quantizes only when the float weight is on the CPU, and raises when the
      parameter requires grad; bnbcy quantizes from any non-meta device and clears
      ``requires_grad``.
    """

    def __new__(cls, data: Optional[torch.Tensor] = None, requires_grad: bool = True,
                has_fp16_weights: bool = False, CB: Optional[torch.Tensor] = None,
                SCB: Optional[torch.Tensor] = None, **kwargs) -> "Int8Params":
        if data is None:
            data = torch.empty(0)
        if requires_grad and not (data.is_floating_point() or data.is_complex()):
            requires_grad = False  # int8 codes cannot require grad
        self = torch.Tensor._make_subclass(cls, data, requires_grad)
        self.CB = CB
        self.SCB = SCB
        self.has_fp16_weights = has_fp16_weights
        return self

    @property
    def _is_int8(self) -> bool:
        # whether ``data`` holds int8 codes (not named is_quantized: that is torch.Tensor's, for
        # torch's own quantized tensors, and libraries read it)
        return self.dtype == torch.int8

    # ----------------------------------------------------------------- pickling / copying
    def __getstate__(self):
        state = self.__dict__.copy()
        state["data"] = self.data
        state["requires_grad"] = self.requires_grad
        return state

    def __setstate__(self, state):
        state = dict(state)
        data = state.pop("data", None)
        requires_grad = state.pop("requires_grad", None)
        cb_is_data = state.pop("_CB_is_data", False)
        if data is not None:
            if not (data.is_floating_point() or data.is_complex()):
                self.requires_grad_(False)
            self.data = data
        if requires_grad is not None:
            self.requires_grad = requires_grad
        for name in _INT8_SETTINGS:
            setattr(self, name, state.pop(name, getattr(self, name, None)))
        if cb_is_data:
            self.CB = self.data
        self.__dict__.update(state)  # foreign attributes (e.g. set by other libraries)

    def _settings_state(self):
        # the settings, with CB replaced by a marker when it is the data itself (pickle would
        # otherwise store the codes twice and unpickle two unrelated tensors)
        state = self.__dict__.copy()
        if self._cb_is_data():
            state["CB"] = None
            state["_CB_is_data"] = True
        return state

    def _cb_is_data(self) -> bool:
        cb = self.__dict__.get("CB")
        return (isinstance(cb, torch.Tensor) and cb.device == self.device and cb.shape == self.shape
                and cb.dtype == self.dtype and cb.numel() > 0 and cb.data_ptr() == self.data_ptr())

    def __reduce_ex__(self, proto):
        return _rebuild_int8params, (self.data, self.requires_grad), self._settings_state()

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        new = type(self).__new__(type(self), self.data.clone(memory_format=torch.preserve_format),
                                 requires_grad=self.requires_grad)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self._settings_state(), memo))
        return new

    def __copy__(self):
        new = type(self).__new__(type(self), self.data, requires_grad=self.requires_grad)
        new.__setstate__(self.__getstate__())
        return new

    # ------------------------------------------------------------------------ moves
    def _quantize(self, device):
        """Quantize the float weight on ``device`` (in place; returns ``self``)."""
        if self.has_fp16_weights:
            return self._moved(self.data.to(device))
        if self.data.is_complex():
            raise TypeError(f"Int8Params: cannot quantize a {self.dtype} weight")
        w = self.data.contiguous().to(device=device, dtype=torch.float16)
        CB, SCB, _ = _int8_vectorwise_quant(w)
        if self.requires_grad:
            self.requires_grad_(False)  # integer codes cannot require grad (bitsandbytes raises)
        self.data = CB
        self.CB = self.data
        self.SCB = SCB
        return self

    def _moved(self, data):
        return Int8Params(data, requires_grad=self.requires_grad, has_fp16_weights=self.has_fp16_weights)

    def cpu(self):
        return self.to(device="cpu")

    def cuda(self, device=None, non_blocking: bool = False):
        return self.to(device="cuda" if device is None else device, non_blocking=non_blocking)

    def xpu(self, device=None, non_blocking: bool = False):
        return self.to(device="xpu" if device is None else device, non_blocking=non_blocking)

    def to(self, *args, **kwargs):
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        quantized = self._is_int8
        if (not quantized and not self.has_fp16_weights and device is not None and device.type != "meta"
                and self.device.type != "meta"):
            return self._quantize(device)
        if quantized:
            dtype = None  # the codes are bytes: never cast them
        new = self._moved(self.data.to(device=device, dtype=dtype, non_blocking=non_blocking))
        if quantized:
            new.CB = new.data
            scb = self.SCB
            if scb is not None and device is not None and scb.device.type != "meta":
                scb = scb.to(device, non_blocking=non_blocking)
            new.SCB = scb
        return new



def _parse_weight_format(weight_format):
    if isinstance(weight_format, torch.Tensor):
        if weight_format.numel() != 1:
            raise ValueError(f"Expected a scalar weight_format, got a tensor of shape {tuple(weight_format.shape)}")
        weight_format = weight_format.item()
    if isinstance(weight_format, bool) or not isinstance(weight_format, (int, str)):
        raise ValueError(f"Expected supported weight format - got {weight_format!r}")
    if isinstance(weight_format, int):
        if weight_format not in INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING:
            raise ValueError(f"Expected supported weight format - got {weight_format}")
        weight_format = INVERSE_LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING[weight_format]
    if weight_format != "row":
        raise ValueError(f"Only 'row' weight format is supported, got {weight_format}")
    return weight_format


def maybe_rearrange_weight(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Load pre-hook of :class:`Linear8bitLt`: pops ``weight_format`` (int, str or a scalar
    tensor; ``{0: 'row', 1: 'col32', 2: 'col_turing', 3: 'col_ampere'}``) and accepts only
    'row'.

    Raises
    ------
    ValueError
        For any other format, naming it.
    """
    key = f"{prefix}weight_format"
    if key not in state_dict:
        return
    # bitsandbytes leaves the key alone when the weight is absent (then it is reported as
    # unexpected); bnbcy checks and consumes it either way
    _parse_weight_format(state_dict.pop(key))


class Linear8bitLt(nn.Linear):
    """Linear layer of LLM.int8 (https://arxiv.org/abs/2208.07339).

    Parameters
    ----------
    input_features, output_features : int
    bias : bool
    has_fp16_weights : bool
        Default True: the weight stays float (trainable) and is quantized on the fly in
        each forward pass. False: the weight is quantized to int8 when the module is moved
        (``.to(device)``, ``.cpu()``, ``.cuda()``; CPU included) -- inference.
    threshold : float
        Outlier threshold of the mixed-precision decomposition: input (activation) columns
        holding a value with ``|x| >= threshold`` are multiplied in the input's precision,
        the rest in int8. 0.0 (default) disables it.
    index : optional
        Kept for signature compatibility (unused, as in bitsandbytes).
    device : torch.device or str, optional
        Where the (float, not yet quantized) weight is created.

    Notes
    -----
    The forward pass is ``bnbcy.matmul(x, weight, bias=bias, state=self.state)``
    (NUMERICS.md §5.7): in training mode on the CPU the int8 weight is dequantized and
    used densely (``MatMul8bitFp``); otherwise the input is quantized row-wise to int8 too.

    The ``state_dict`` is bitsandbytes': ``weight`` (int8 once quantized), ``bias``, and
    when ``has_fp16_weights=False`` also ``SCB`` (float32 ``[out]``) and ``weight_format``
    (uint8 scalar 0 = row-major). Differences from bitsandbytes 0.50.2:

    * a quantized ``state_dict`` loads into a freshly constructed
      ``Linear8bitLt(..., has_fp16_weights=False)`` (no ``.to(device)`` first); a float
      weight loaded into an already quantized module is quantized (bitsandbytes would
      copy the floats into the int8 codes);
    * the bias is cast to the input dtype per call (bitsandbytes replaces ``bias.data``);
    * ``.cpu()``/``.cuda()`` move ``state.CB``/``state.SCB`` along as ``.to()`` does.
    """

    def __init__(self, input_features: int, output_features: int, bias=True, has_fp16_weights=True,
                 threshold=0.0, index=None, device=None):
        super().__init__(input_features, output_features, bias, device)
        self.state = _matmul_lt_state()
        self.index = index

        self.state.threshold = threshold
        self.state.has_fp16_weights = has_fp16_weights
        if threshold > 0.0 and not has_fp16_weights:
            self.state.use_pool = True

        self.weight = Int8Params(self.weight.data, has_fp16_weights=has_fp16_weights,
                                 requires_grad=has_fp16_weights)
        self._register_load_state_dict_pre_hook(maybe_rearrange_weight)

    # ------------------------------------------------------------------------ state
    def train(self, mode: bool = True):
        """``nn.Module.train``; also sets ``state.is_training`` (read by ``bnbcy.matmul``) here
        rather than in ``forward``, so a compiled forward writes no state."""
        super().train(mode)
        self.state.is_training = mode
        return self

    def init_8bit_state(self):
        """Hand the weight's ``CB``/``SCB`` to ``self.state`` (bitsandbytes' first-forward step)."""
        self.state.CB = self.weight.CB
        self.state.SCB = self.weight.SCB
        self.weight.CB = None
        self.weight.SCB = None

    def _scb(self):
        # the weight's, the state's, or -- when a wrapper (FSDP2) replaced the parameter before
        # the first forward -- the module's buffer that holds the same tensor
        for scb in (getattr(self.weight, "SCB", None), self.state.SCB, self._buffers.get("_qs_SCB")):
            if scb is not None:
                return scb
        return None

    def _follow_held_weight(self):
        """Point ``state.CB`` at the weight a wrapper holds (FSDP1 swaps the parameter's
        storage, FSDP2 the parameter object, per forward), so the matmul reads the gathered
        codes, never a stale or freed copy; ``SCB`` stays on the module (``state.SCB``)."""
        w = self.weight
        if self.state.has_fp16_weights or w.dtype != torch.int8 or self.state.CB is w:
            return
        if _dist.is_sharded(w) or not isinstance(w, Int8Params):
            self.state.SCB = self._scb()
            if self.state.SCB is None:
                raise RuntimeError(f"{type(self).__name__}: the int8 weight is held by a wrapper (FSDP) but the "
                                   f"module has no row scales (state.SCB); quantize it (.to(device)) or load a "
                                   f"quantized state_dict before wrapping")
            self.state.CB = w

    def _apply(self, fn, recurse=True):
        # nn.Module keeps the parameter object and swaps its .data, so the CB/SCB attributes
        # of the parameter and the state tensors are brought along here
        result = super()._apply(fn, recurse)
        w = self.weight
        if isinstance(w, Int8Params) and w._is_int8:
            dev = w.device
            if w.CB is not None:
                w.CB = w.data
            if w.SCB is not None and w.SCB.device != dev and dev.type != "meta":
                w.SCB = w.SCB.to(dev)
            if self.state.CB is not None and self.state.CB.device != dev and dev.type != "meta":
                self.state.CB = w.data if not self.state.has_fp16_weights else self.state.CB.to(dev)
            if self.state.SCB is not None and self.state.SCB.device != dev and dev.type != "meta":
                self.state.SCB = self.state.SCB.to(dev)
        self._sync_quant_buffers()
        return result

    # ----------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{type(self).__name__} expects a floating-point tensor input, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{type(self).__name__}: input's last dimension is "
                             f"{x.shape[-1] if x.dim() else 'missing (0-d input)'}, expected "
                             f"in_features={self.in_features} (input shape {tuple(x.shape)})")
        if self.weight.device.type == "meta":
            raise RuntimeError(f"{type(self).__name__}: the weight is on the meta device; load a state_dict "
                               f"or materialize the module before calling it")
        # state writes only when something changed: torch.compile then traces a forward without
        # side effects (required inside activation checkpointing)
        if self.state.is_training != self.training:
            self.state.is_training = self.training
        if getattr(self.weight, "CB", None) is not None:
            self.init_8bit_state()
        self._follow_held_weight()

        bias = self.bias
        if bias is not None and bias.dtype != x.dtype:
            # differentiable cast; the parameter itself keeps its dtype (bnb swaps .data)
            bias = bias.to(x.dtype)

        out = _matmul(x, self.weight, bias=bias, state=self.state)

        if not self.state.has_fp16_weights and self.state.CB is not None and self.weight.dtype != torch.int8:
            self.weight.data = self.state.CB   # a float weight quantized by this first call
        return out

    # -------------------------------------------------------------------- state dict
    # torch.distributed.checkpoint.state_dict resolves each state-dict key by getattr on the
    # module: the two entries that are not parameters or buffers must resolve too (FSDP2)
    @property
    def SCB(self) -> Optional[torch.Tensor]:
        """The float32 row scales of the int8 weight (``None`` before quantization)."""
        return self._scb()

    @property
    def weight_format(self) -> torch.Tensor:
        """The ``weight_format`` state-dict entry (uint8 0: row-major)."""
        return torch.tensor(LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"], dtype=torch.uint8)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``weight`` and ``bias`` as nn.Linear; with ``has_fp16_weights=False`` and a
        quantized weight also ``SCB`` and ``weight_format`` (bitsandbytes' keys)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        scb = self._scb()
        if not self.state.has_fp16_weights and scb is not None:
            destination[prefix + "SCB"] = scb if keep_vars else scb.detach()
            destination[prefix + "weight_format"] = self.weight_format

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``, all or nothing: on any error (bad entries, missing
        or unexpected keys with ``strict``) the module is left as it was."""
        return _load_all_or_nothing(self, super().load_state_dict, state_dict, strict, assign)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load a quantized (bitsandbytes-format) or a float state dict.

        * int8 ``weight`` + ``SCB``: into a quantized module, copied in place (as
          bitsandbytes); into a not yet quantized one (e.g. freshly constructed), the weight
          becomes an int8 :class:`Int8Params` with ``CB``/``SCB`` on the current weight's
          device (the incoming codes' device when the current weight is on ``meta``).
        * float ``weight`` into a not yet quantized module: as ``nn.Linear``.
        * float ``weight`` into a quantized module: quantized on the current device.

        An error leaves this module as it was (the message goes to ``error_msgs``).
        """
        _atomic_load(self, self._load_weight_and_rest, state_dict, prefix, local_metadata, strict, missing_keys,
                     unexpected_keys, error_msgs)
        self._sync_quant_buffers()

    def _sync_quant_buffers(self):
        # SCB as a non-persistent buffer that *is* the row-scale tensor (DDP broadcasts it in place)
        _set_quant_buffers(self, {"SCB": self._scb()})

    def _load_weight_and_rest(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey, skey = prefix + "weight", prefix + "SCB"
        incoming = state_dict.get(wkey)
        scb_in = state_dict.get(skey)
        quantized = self._weight_is_quantized()
        float_in = incoming is not None and incoming.is_floating_point()
        if float_in and not quantized and scb_in is not None:
            # bitsandbytes' error (a float weight with row scales is a checkpoint this module
            # cannot hold until it is quantized); raised before anything is loaded
            raise RuntimeError("Loading a quantized checkpoint into non-quantized Linear8bitLt is not supported. "
                               "Please call module.cuda() before module.load_state_dict()")
        if (incoming is None and scb_in is None) or (float_in and not quantized):
            old = self.weight
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
            self._rewrap_weight(old)
            return

        popped = {k: state_dict.pop(k) for k in (wkey, skey) if k in state_dict}
        try:
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                          unexpected_keys, error_msgs)
        finally:
            state_dict.update(popped)
        if wkey in missing_keys:
            missing_keys.remove(wkey)
        assign = bool(local_metadata.get("assign_to_params_buffers", False))
        try:
            if incoming is None:
                if strict:
                    missing_keys.append(wkey)
                self._load_scb_only(scb_in, skey, error_msgs)
            elif float_in:
                self._load_float_into_quantized(incoming, wkey, error_msgs)
                if scb_in is not None and strict:
                    unexpected_keys.append(skey)
            else:
                self._load_int8(incoming, scb_in, wkey, skey, assign, error_msgs)
        except (ValueError, TypeError, RuntimeError) as exc:
            error_msgs.append(f"While loading {wkey}: {exc}")

    def _expected_shape(self):
        return (self.out_features, self.in_features)

    def _held_by_wrapper(self) -> bool:
        # FSDP2 made the int8 weight a DTensor (or, unsharded, a plain int8 parameter)
        w = self.weight
        return _dist.is_sharded(w) or (w.dtype == torch.int8 and not isinstance(w, Int8Params))

    def _weight_is_quantized(self) -> bool:
        w = self.weight
        return (isinstance(w, Int8Params) and w._is_int8) or self._held_by_wrapper()

    def _load_into_held(self, codes, scb, wkey, skey, error_msgs):
        """Copy int8 ``codes`` (full or sharded) and row scales ``scb`` (or keep the module's
        when None) into the weight FSDP holds and the module's own ``SCB`` tensor."""
        current = self._scb()
        if scb is not None and not self._check_scb(scb, skey, error_msgs):
            return
        if current is None:
            error_msgs.append(f"{skey}: the module has no row scales to keep; load them with the weight")
            return
        msg = _dist.copy_in_place(self.weight, codes, wkey)
        if msg:
            error_msgs.append(msg)
            return
        with torch.no_grad():
            if scb is not None:
                current.copy_(_dist.full(scb))
        self.state.SCB = current

    def _check_scb(self, scb, skey, error_msgs):
        if not isinstance(scb, torch.Tensor) or not scb.is_floating_point():
            error_msgs.append(f"{skey}: expected a float32 tensor of row scales, got "
                              f"{getattr(scb, 'dtype', type(scb).__name__)}")
            return False
        if tuple(scb.shape) != (self.out_features,):
            error_msgs.append(f"size mismatch for {skey}: copying a param with shape {tuple(scb.shape)} from "
                              f"checkpoint, the shape in current model is ({self.out_features},)")
            return False
        return True

    def _reset_8bit_state(self, scb):
        # CB/SCB live on the weight again; the next forward hands them to the state
        self.weight.CB = self.weight.data
        self.weight.SCB = scb
        self.state.CB = None
        self.state.SCB = None

    def _load_scb_only(self, scb_in, skey, error_msgs):
        if not self._check_scb(scb_in, skey, error_msgs):
            return
        current = self._scb()
        if current is None:
            error_msgs.append(f"{skey}: row scales without an int8 weight, into a {type(self).__name__} whose "
                              f"weight is not quantized; load the weight too")
            return
        with torch.no_grad():
            current.copy_(scb_in)

    def _load_float_into_quantized(self, incoming, wkey, error_msgs):
        if tuple(incoming.shape) != self._expected_shape():
            error_msgs.append(f"size mismatch for {wkey}: copying a param with shape {tuple(incoming.shape)} from "
                              f"checkpoint, the shape in current model is {self._expected_shape()}")
            return
        device = self.weight.device
        new = Int8Params(_dist.full(incoming.detach()).clone(), requires_grad=False,
                         has_fp16_weights=False)._quantize(device)
        if self._held_by_wrapper():
            self._load_into_held(new.data, new.SCB, wkey, wkey.removesuffix("weight") + "SCB", error_msgs)
            return
        self.weight = new
        self.state.CB = None
        self.state.SCB = None

    def _load_int8(self, incoming, scb_in, wkey, skey, assign, error_msgs):
        name = type(self).__name__
        if self.state.has_fp16_weights:
            error_msgs.append(f"{wkey}: an int8 (quantized) weight cannot be loaded into {name} with "
                              f"has_fp16_weights=True; construct it with has_fp16_weights=False")
            return
        if incoming.dtype != torch.int8:
            error_msgs.append(f"{wkey}: expected a float or an int8 weight, got {incoming.dtype}")
            return
        if tuple(incoming.shape) != self._expected_shape():
            error_msgs.append(f"size mismatch for {wkey}: copying a param with shape {tuple(incoming.shape)} from "
                              f"checkpoint, the shape in current model is {self._expected_shape()}")
            return
        quantized = self._weight_is_quantized()
        if self._held_by_wrapper():
            self._load_into_held(incoming, scb_in, wkey, skey, error_msgs)
            return
        if scb_in is None:
            if not quantized or self._scb() is None:
                error_msgs.append(f"{skey} is missing: an int8 weight needs its row scales to load into a "
                                  f"{name} that is not quantized yet")
                return
            with torch.no_grad():  # bitsandbytes: codes copied, the module's scales kept
                self.weight.data.copy_(incoming)
            self._reset_8bit_state(self._scb())
            return
        if not self._check_scb(scb_in, skey, error_msgs):
            return
        if quantized and not assign and self.weight.device.type != "meta":
            # in place (as bitsandbytes): the parameter object stays the same
            current = self._scb()
            with torch.no_grad():
                self.weight.data.copy_(incoming)
                if current is None or current.dtype != torch.float32:
                    current = scb_in.detach().to(self.weight.device, torch.float32, copy=True)
                else:
                    current.copy_(scb_in)
            self._reset_8bit_state(current)
            return
        device = incoming.device if self.weight.device.type == "meta" else self.weight.device
        if assign:
            data, scb = incoming.detach(), scb_in.detach().to(torch.float32)
        else:
            data = incoming.detach().to(device, copy=True)
            scb = scb_in.detach().to(device, torch.float32, copy=True)
        self.weight = Int8Params(data, requires_grad=False, has_fp16_weights=False)
        self._reset_8bit_state(scb)

    def _rewrap_weight(self, old):
        # load_state_dict(assign=True) replaces the parameter by a plain one: restore the
        # subclass and the settings of the parameter it replaced, so the next move quantizes
        w = self.weight
        if isinstance(w, Int8Params) or not isinstance(old, Int8Params):
            return
        self.weight = Int8Params(w.data, requires_grad=w.requires_grad, has_fp16_weights=old.has_fp16_weights)


# --------------------------------------------------------------------------- embeddings (NUMERICS.md §8)
def _register_32bit_optim_state(module):
    # the weight always gets 32-bit optimizer state, even under an 8-bit optimizer
    from ..optim.optimizer import GlobalOptimManager
    GlobalOptimManager.get_instance().register_module_override(module, "weight", {"optim_bits": 32})


class _XavierEmbeddingInit:
    def reset_parameters(self) -> None:
        """Xavier-uniform initialisation, then zero the ``padding_idx`` row."""
        torch.nn.init.xavier_uniform_(self.weight)
        self._fill_padding_idx_with_zero()

    def _fill_padding_idx_with_zero(self) -> None:
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def _lookup(self, input):
        return torch.nn.functional.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                             self.scale_grad_by_freq, self.sparse)


class StableEmbedding(_XavierEmbeddingInit, nn.Embedding):
    """Embedding with Xavier-uniform init, a LayerNorm on its output and 32-bit optimizer state.

    Registers ``{"optim_bits": 32}`` for its ``weight`` with
    :class:`bnbcy.optim.GlobalOptimManager`, so 8-bit optimizers keep 32-bit state for it
    (bitsandbytes' ``nn.StableEmbedding``).

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size.
    embedding_dim : int
        Size of each embedding vector.
    padding_idx : int, optional
        Row that gets no gradient and is initialised to zeros.
    max_norm : float, optional
        Renormalise looked-up rows to at most this norm.
    norm_type : float, default 2.0
        The p of the norm for ``max_norm``.
    scale_grad_by_freq : bool, default False
        Scale gradients by the inverse frequency of the words in the batch.
    sparse : bool, default False
        Sparse gradients (not supported by bnbcy's optimizers).
    _weight : torch.Tensor, optional
        Initial weight.
    device, dtype : optional
        Factory arguments of the weight (the LayerNorm uses the default dtype).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Optional[torch.Tensor] = None, device=None, dtype=None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device, dtype)
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        _register_32bit_optim_state(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        emb = self._lookup(input).to(torch.get_default_dtype())   # layer norm in full precision
        return self.norm(emb).to(self.weight.dtype)


class Embedding(_XavierEmbeddingInit, nn.Embedding):
    """Embedding with Xavier-uniform init and 32-bit optimizer state (bitsandbytes' ``nn.Embedding``).

    Parameters
    ----------
    num_embeddings : int
        Vocabulary size.
    embedding_dim : int
        Size of each embedding vector.
    padding_idx : int, optional
        Row that gets no gradient and is initialised to zeros.
    max_norm : float, optional
        Renormalise looked-up rows to at most this norm.
    norm_type : float, default 2.0
        The p of the norm for ``max_norm``.
    scale_grad_by_freq : bool, default False
        Scale gradients by the inverse frequency of the words in the batch.
    sparse : bool, default False
        Sparse gradients (not supported by bnbcy's optimizers).
    _weight : torch.Tensor, optional
        Initial weight.
    device : torch.device, optional
        Device of the weight.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: Optional[int] = None,
                 max_norm: Optional[float] = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
                 sparse: bool = False, _weight: Optional[torch.Tensor] = None,
                 device: Optional[torch.device] = None) -> None:
        super().__init__(num_embeddings, embedding_dim, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                         sparse, _weight, device=device)
        _register_32bit_optim_state(self)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self._lookup(input)
