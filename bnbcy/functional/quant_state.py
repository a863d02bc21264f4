"""QuantState: the statistics needed to undo a quantization, with bitsandbytes'
field names, legacy indexing and (packed) state_dict format (NUMERICS.md §3.5)."""
from __future__ import annotations

import json

import numpy as np
import torch

from .. import _arrays


def pack_dict_to_tensor(d: dict) -> torch.Tensor:
    """JSON-encode a dict of plain values into a uint8 tensor (safetensors-safe)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t) -> dict:
    """Inverse of :func:`pack_dict_to_tensor`."""
    data = bytes(_to_numpy(t).astype(np.uint8).tobytes())
    return json.loads(data.decode("utf-8"))


def _to_numpy(x):
    kind = _arrays._kind(x)
    if kind == "torch":
        return x.detach().cpu().numpy() if x.dtype != torch.bfloat16 else x.detach().float().cpu().numpy()
    if kind == "cupy":
        return x.get()
    return np.asarray(x)


def _move(x, device):
    """Move an array of any supported kind to ``device`` ('cpu', 'cuda', 'cuda:N', torch.device)."""
    if x is None:
        return None
    kind = _arrays._kind(x)
    if kind == "torch":
        return x.to(device)
    dev = torch.device(device)
    if dev.type == "cpu":
        return x.get() if kind == "cupy" else x
    import cupy
    with cupy.cuda.Device(dev.index if dev.index is not None else cupy.cuda.runtime.getDevice()):
        return cupy.asarray(x)


def _clone(x):
    return x.clone() if _arrays._kind(x) == "torch" else x.copy()


class QuantState:
    """Container of quantization statistics (``bitsandbytes.functional.QuantState``).

    Parameters
    ----------
    absmax : array
        Per-block scales: float32, or uint8 codes when nested (double-quantized).
    shape : torch.Size or tuple, optional
        Shape of the original tensor (4-bit states).
    code : array
        The quantization map.
    blocksize : int
    quant_type : {'nf4', 'fp4'} or None
    dtype : dtype
        Dtype of the original tensor (torch dtype for torch inputs, NumPy dtype otherwise).
    offset : array, optional
        0-d float32 mean subtracted from absmax before its quantization (nested).
    state2 : QuantState, optional
        State of the quantized absmax (nested).
    """

    valid_quant_types = ("fp4", "nf4")
    valid_qs_type_keys = [f"bitsandbytes__{x}" for x in valid_quant_types]
    valid_qs_keys = [
        "absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state", "quant_type",
        "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset",
    ]

    def __init__(self, absmax, shape=None, code=None, blocksize=None, quant_type=None, dtype=None,
                 offset=None, state2=None):
        self.absmax = absmax
        self.shape = shape
        self.code = code
        self.dtype = dtype
        self.blocksize = blocksize
        self.quant_type = quant_type
        self.offset = offset
        self.state2 = state2
        self.nested = state2 is not None

    def __getattr__(self, name):
        # FSDP resolves the packed key "quant_state.bitsandbytes__nf4" through getattr.
        if name.startswith("bitsandbytes__"):
            packed = self.as_dict(packed=True)
            key = "quant_state." + name
            if key in packed:
                return packed[key]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def __getitem__(self, idx):
        """Legacy list layout ``[absmax, shape, dtype, blocksize, [offset, state2] | None, quant_type]``."""
        nested = [self.offset, self.state2] if self.nested else None
        return [self.absmax, self.shape, self.dtype, self.blocksize, nested, self.quant_type][idx]

    @classmethod
    def from_dict(cls, qs_dict: dict, device) -> "QuantState":
        """Rebuild a state from :meth:`as_dict` output (packed or not, keys may be prefixed).

        Raises
        ------
        ValueError
            If the packed entry is missing or ambiguous, or unknown keys are present.
        """
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in k and hasattr(v, "__dlpack__")]
        if "quant_type" not in qs_dict:
            if not packed_keys:
                raise ValueError("Expected packed or unpacked quant_state items, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(f"There should be exactly one `quant_state` item with ending from "
                                 f"{cls.valid_qs_type_keys}. Detected {packed_keys}.")
        if len(packed_keys) == 1:
            qs_dict.update(unpack_tensor_to_dict(qs_dict.pop(packed_keys[0])))
        qs_dict = {k.split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"unexpected quant_state keys {sorted(unknown)}; valid keys: {cls.valid_qs_keys}")

        offset = state2 = None
        if "nested_absmax" in qs_dict:
            offset = _move(torch.tensor(float(qs_dict["nested_offset"])), device)
            state2 = cls(absmax=_move(qs_dict["nested_absmax"], device), blocksize=qs_dict["nested_blocksize"],
                         code=_move(qs_dict["nested_quant_map"], device),
                         dtype=getattr(torch, qs_dict["nested_dtype"]))
        shape = qs_dict.get("shape")
        return cls(quant_type=qs_dict["quant_type"], absmax=_move(qs_dict["absmax"], device),
                   blocksize=qs_dict["blocksize"], code=_move(qs_dict["quant_map"], device),
                   dtype=getattr(torch, qs_dict["dtype"]),
                   shape=torch.Size(shape) if shape is not None else None, offset=offset, state2=state2)

    def as_dict(self, packed: bool = False) -> dict:
        """State as a dict for ``state_dict`` saving.

        Parameters
        ----------
        packed : bool
            Put every non-tensor item into one uint8 tensor under
            ``quant_state.bitsandbytes__<quant_type>`` (safetensors needs tensors only).
            Only applies when ``quant_type`` is set.
        """
        d = {
            "quant_type": self.quant_type,
            "absmax": self.absmax,
            "blocksize": self.blocksize,
            "quant_map": self.code,
            "dtype": _arrays.dtype_name(self.dtype),
            "shape": tuple(self.shape) if self.shape is not None else None,
        }
        if self.nested:
            d.update({
                "nested_absmax": self.state2.absmax,
                "nested_blocksize": self.state2.blocksize,
                # un-shared so safetensors' removal of shared tensors cannot drop it
                "nested_quant_map": _clone(self.state2.code),
                "nested_dtype": _arrays.dtype_name(self.state2.dtype),
                "nested_offset": float(self.offset.item()),
            })
        if not packed or self.quant_type is None:
            return d
        tensors = {k: v for k, v in d.items() if hasattr(v, "__dlpack__")}
        plain = {k: v for k, v in d.items() if not hasattr(v, "__dlpack__")}
        tensors["quant_state.bitsandbytes__" + self.quant_type] = pack_dict_to_tensor(plain)
        return tensors

    def to(self, device):
        """Move the state's arrays to ``device`` in place."""
        self.code = _move(self.code, device)
        self.absmax = _move(self.absmax, device)
        if self.nested:
            self.offset = _move(self.offset, device)
            self.state2.absmax = _move(self.state2.absmax, device)
            self.state2.code = _move(self.state2.code, device)

    def __eq__(self, other):
        if not isinstance(other, QuantState):
            return False

        def close(a, b):
            if a is None or b is None:
                return a is b
            a, b = _to_numpy(a), _to_numpy(b)
            return a.shape == b.shape and np.allclose(a.astype(np.float64), b.astype(np.float64), atol=1e-6)

        def same_dtype(a, b):
            return (a is None and b is None) or (a is not None and b is not None
                                                  and _arrays.dtype_name(a) == _arrays.dtype_name(b))

        return (close(self.absmax, other.absmax) and self.shape == other.shape
                and close(self.code, other.code) and same_dtype(self.dtype, other.dtype)
                and self.blocksize == other.blocksize and self.quant_type == other.quant_type
                and (close(self.offset, other.offset) if self.offset is not None and other.offset is not None
                     else self.offset is other.offset)
                and (self.state2 == other.state2 if self.state2 is not None and other.state2 is not None
                     else self.state2 is other.state2))

    __hash__ = None
