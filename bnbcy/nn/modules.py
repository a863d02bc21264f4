"""4-bit layers with bitsandbytes' names, signatures, defaults and checkpoint format
(``bitsandbytes.nn.modules``; NUMERICS.md §3.5 and §4).

* :class:`Params4bit` -- a ``torch.nn.Parameter`` holding a float weight until its first
  move to a (non-meta) device, then the packed 4-bit codes plus a :class:`QuantState`.
* :class:`Linear4bit`, :class:`LinearNF4`, :class:`LinearFP4` -- ``nn.Linear`` over a
  :class:`Params4bit` weight, computing ``x @ dequant(W).T + bias`` through
  ``bnbcy.matmul_4bit``.

Quantization happens on CPU too (bnbcy's CPU kernels read the standard packed layout),
so ``Linear4bit(...).cpu()`` or ``.to("cpu")`` quantizes.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import torch
from torch import nn

from ..functional.fourbit import quantize_4bit as _quantize_4bit
from ..functional.quant_state import QuantState

__all__ = ["Params4bit", "Linear4bit", "LinearFP4", "LinearNF4", "fix_4bit_weight_quant_state_from_module"]

# Settings a Params4bit carries besides its data; pickling/copying keeps all of them.
_SETTINGS = ("blocksize", "compress_statistics", "quant_type", "quant_state", "quant_storage",
             "bnb_quantized", "module")


def _matmul_4bit(*args, **kwargs):
    # through the package attribute, as bitsandbytes calls ``bnb.matmul_4bit``, so that a
    # patched ``bnbcy.matmul_4bit`` is honoured
    import bnbcy
    return bnbcy.matmul_4bit(*args, **kwargs)


def _rebuild_params4bit(data, requires_grad):
    """Unpickling entry point of :class:`Params4bit` (settings follow via ``__setstate__``)."""
    return Params4bit(data, requires_grad=requires_grad)


class Params4bit(torch.nn.Parameter):
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

    def _cast(self, dtype):
        return self.to(dtype=dtype)

    def half(self, memory_format=torch.preserve_format):
        return self._cast(torch.float16)

    def float(self, memory_format=torch.preserve_format):
        return self._cast(torch.float32)

    def bfloat16(self, memory_format=torch.preserve_format):
        return self._cast(torch.bfloat16)

    def double(self, memory_format=torch.preserve_format):
        return self._cast(torch.float64)

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
        elif x.dtype == torch.float16:
            # bitsandbytes keeps compute_dtype unset here and warns; the matmul then runs in
            # float16. Say so plainly (bnb's text blames a float32 default that is not used).
            single = x.numel() == x.shape[-1]
            warnings.warn(
                f"{type(self).__name__} received a torch.float16 input and has no compute_dtype: the 4-bit "
                f"matmul runs in float16 for this and later calls{' (single-row inference)' if single else ''}. "
                f"Pass compute_dtype=torch.float16 to make that explicit, or compute_dtype=torch.float32 "
                f"for float32 accumulation at lower speed.", UserWarning, stacklevel=3)

    def _warn_fp16_upcast(self, x: torch.Tensor) -> None:
        if self._fp16_upcast_warned or x.dtype != torch.float16 or self.compute_dtype != torch.float32:
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
        # weight.t() as bitsandbytes passes it: matmul_4bit views the codes as (-1, 1) and
        # takes N, K from quant_state.shape
        return _matmul_4bit(x, self.weight.t(), bias=bias, quant_state=quant_state).to(inp_dtype)

    # -------------------------------------------------------------------- state dict
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        """``weight`` and ``bias`` as nn.Linear, then the weight's quant state as
        ``weight.absmax``, ``weight.quant_map``, ``weight.nested_*`` and the packed
        ``weight.quant_state.bitsandbytes__<type>`` blob (bitsandbytes' keys)."""
        super()._save_to_state_dict(destination, prefix, keep_vars)
        quant_state = getattr(self.weight, "quant_state", None)
        if quant_state is not None:
            for k, v in quant_state.as_dict(packed=True).items():
                destination[prefix + "weight." + k] = v if keep_vars else v.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """Load a quantized (bitsandbytes-format) or a float state dict.

        * Quantized: the ``weight.*`` quant-state entries rebuild the weight with
          :meth:`Params4bit.from_prequantized` on the current weight's device (the
          incoming codes' device when the current weight is on ``meta``). The module
          need not be quantized before.
        * Float into a not-yet-quantized module: as ``nn.Linear`` (copied in place).
        * Float into a quantized module: the float weight is quantized with the module's
          settings on the current device.
        """
        wkey = prefix + "weight"
        qs_prefix = wkey + "."
        qs_keys = [k for k in state_dict if k.startswith(qs_prefix)]
        incoming = state_dict.get(wkey)
        if not qs_keys and not (incoming is not None and getattr(self.weight, "bnb_quantized", False)):
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
        device = self.weight.device if self.weight.device.type != "meta" else incoming.device
        expected = (self.out_features, self.in_features)
        try:
            if qs_keys:
                new = Params4bit.from_prequantized(
                    data=incoming.detach(), quantized_stats={k[len(qs_prefix):]: state_dict[k] for k in qs_keys},
                    requires_grad=False, device=device, module=self)
            elif tuple(incoming.shape) == expected and incoming.is_floating_point():
                w = self.weight
                new = Params4bit(incoming.detach().clone(), requires_grad=False, blocksize=w.blocksize,
                                 compress_statistics=w.compress_statistics, quant_type=w.quant_type,
                                 quant_storage=w.quant_storage, module=self)._quantize(device)
            else:
                error_msgs.append(f"size mismatch for {wkey}: copying a float weight of shape "
                                  f"{tuple(incoming.shape)} into a quantized {type(self).__name__} "
                                  f"of shape {expected}")
                return
        except (ValueError, KeyError, TypeError) as exc:
            error_msgs.append(f"While loading the quantized weight {wkey}: {exc}")
            return
        if tuple(new.quant_state.shape) != expected:
            error_msgs.append(f"size mismatch for {wkey}: the checkpoint holds a quantized weight of shape "
                              f"{tuple(new.quant_state.shape)}, the module expects {expected}")
            return
        self.weight = new
        self.quant_storage = new.quant_storage

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
