"""QuantState: the statistics needed to undo a quantization, with bitsandbytes'
field names, legacy indexing and (packed) state_dict format (NUMERICS.md §3.5)."""
from __future__ import annotations

import json
import numbers
from collections.abc import Mapping

import numpy as np
import torch

from .. import _arrays


def pack_dict_to_tensor(d: dict) -> torch.Tensor:
    """JSON-encode a dict of plain values into a uint8 tensor (safetensors-safe)."""
    return torch.tensor(list(json.dumps(d).encode("utf-8")), dtype=torch.uint8)


def unpack_tensor_to_dict(t) -> dict:
    """Inverse of :func:`pack_dict_to_tensor`.

    Raises
    ------
    ValueError
        ``t`` is not a uint8 array of UTF-8 JSON text encoding an object.
    """
    if not hasattr(t, "__dlpack__") or _arrays.dtype_name(t.dtype) != "uint8":
        raise ValueError(f"the packed quant_state must be a uint8 tensor of JSON bytes, got "
                         f"{_describe(t)}")
    data = bytes(_to_numpy(t).tobytes())
    try:
        d = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"the packed quant_state must hold UTF-8 JSON text, got {len(data)} bytes that do "
                         f"not parse ({exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"the packed quant_state must hold a JSON object, got a JSON {type(d).__name__}")
    return d


def _describe(x) -> str:
    if hasattr(x, "__dlpack__") and hasattr(x, "dtype"):
        return f"a {type(x).__name__} of dtype {_arrays.dtype_name(x.dtype)} and shape {tuple(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:200]


# --------------------------------------------------------------------------------------------------
# Field validation: on use (the ops call these) and in from_dict. Each raises naming the field, what
# was expected and what was given.
# --------------------------------------------------------------------------------------------------
check_float_dtype = _arrays.check_float_dtype
check_shape = _arrays.check_shape
check_blocksize = _arrays.check_blocksize


def check_offset(quant_state, name: str = "quant_state") -> float:
    """The nested state's offset as a float (a GPU or traced offset is returned as it is, unread).
    TypeError when it is None (as bitsandbytes raises), ValueError when it is not one finite number."""
    offset = quant_state.offset
    if offset is None:
        raise TypeError(f"{name}.offset must be the 0-d float32 mean of a nested (double-quantized) state, "
                        f"got None")
    try:
        if isinstance(offset, numbers.Real) and not isinstance(offset, bool):
            value = float(offset)
        elif hasattr(offset, "__dlpack__") and all(d == 1 for d in offset.shape):
            if (offset.is_cuda or torch.compiler.is_compiling() if isinstance(offset, torch.Tensor)
                    else type(offset).__module__.partition(".")[0] == "cupy"):
                # reading a device value syncs the stream on every call, and a traced one breaks the
                # graph: there the shape is checked and the value stays data
                return offset
            value = float(offset.item())
        else:
            raise ValueError
    except (ValueError, TypeError, AttributeError):
        raise ValueError(f"{name}.offset must be one finite number (a 0-d float32 array), got "
                         f"{_describe(offset)}") from None
    if not np.isfinite(value):
        raise ValueError(f"{name}.offset must be finite, got {value}")
    return value


_STATE_FIELDS = ("absmax", "code", "blocksize", "dtype")


def check_state(quant_state, name: str = "quant_state"):
    """Raise TypeError unless ``quant_state`` looks like a QuantState (bitsandbytes' own ones pass too)."""
    if not all(hasattr(quant_state, f) for f in _STATE_FIELDS):
        raise TypeError(f"{name} must be a QuantState, got {type(quant_state).__name__}")
    return quant_state


def check_quant_state(quant_state, name: str = "quant_state", four_bit: bool = False):
    """Validate the fields an op reads from ``quant_state`` before it reads any (the one check on use).

    ``blocksize`` in range, ``dtype`` a float dtype, ``shape`` (required for 4-bit) non-negative ints,
    and for a nested state: ``offset`` one finite number, ``state2`` a state with valid fields.
    The arrays (absmax, code) are checked by the array layer when viewed.

    Raises
    ------
    TypeError
        Not a QuantState, or a nested state whose ``offset`` or ``state2`` is None.
    ValueError
        A field of the wrong type or out of range (the message names it).
    """
    check_state(quant_state, name)
    check_blocksize(quant_state.blocksize, f"{name}.blocksize")
    check_float_dtype(quant_state.dtype, f"{name}.dtype")
    shape = getattr(quant_state, "shape", None)
    if four_bit and shape is None:
        raise ValueError(f"{name}.shape is required to dequantize 4-bit codes, got None")
    if shape is not None:
        check_shape(shape, f"{name}.shape")
    if getattr(quant_state, "nested", False) or getattr(quant_state, "state2", None) is not None:
        if getattr(quant_state, "state2", None) is None:
            raise TypeError(f"{name}.state2 must be the QuantState of the quantized absmax of a nested state, "
                            f"got None")
        check_offset(quant_state, name)
        check_quant_state(quant_state.state2, f"{name}.state2")
    return quant_state


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

        Every field is validated first (types, dtypes, sizes, the packed blob's JSON schema);
        nothing is moved before all of them pass.

        Raises
        ------
        TypeError
            ``qs_dict`` is not a mapping.
        ValueError
            The packed entry is missing or ambiguous, unknown keys are present, a field is
            missing or of the wrong type, dtype or size (the message names it).
        """
        if not isinstance(qs_dict, Mapping):
            raise TypeError(f"qs_dict must be a dict of quant_state items, got {type(qs_dict).__name__}")
        qs_dict = dict(qs_dict)
        packed_keys = [k for k, v in qs_dict.items() if "quant_state" in str(k) and hasattr(v, "__dlpack__")]
        if "quant_type" not in qs_dict:
            if not packed_keys:
                raise ValueError("Expected packed or unpacked quant_state items, found neither")
            if len(packed_keys) != 1 or packed_keys[0].split(".")[-1] not in cls.valid_qs_type_keys:
                raise ValueError(f"There should be exactly one `quant_state` item with ending from "
                                 f"{cls.valid_qs_type_keys}. Detected {packed_keys}.")
        if len(packed_keys) == 1:
            blob = unpack_tensor_to_dict(qs_dict.pop(packed_keys[0]))
            bad = sorted(set(map(str, blob)) - set(_PLAIN_KEYS))
            if bad:
                raise ValueError(f"the packed quant_state may hold only {list(_PLAIN_KEYS)}, got keys {bad}")
            qs_dict.update(blob)
        qs_dict = {str(k).split(".")[-1]: v for k, v in qs_dict.items()}
        unknown = set(qs_dict) - set(cls.valid_qs_keys)
        if unknown:
            raise ValueError(f"unexpected quant_state keys {sorted(unknown)}; valid keys: {cls.valid_qs_keys}")
        f = _validated_fields(qs_dict)

        offset = state2 = None
        if f["nested"]:
            offset = _move(torch.tensor(f["nested_offset"], dtype=torch.float32), device)
            state2 = cls(absmax=_move(qs_dict["nested_absmax"], device), blocksize=f["nested_blocksize"],
                         code=_move(qs_dict["nested_quant_map"], device), dtype=_TORCH_FLOAT[f["nested_dtype"]])
        shape = f["shape"]
        return cls(quant_type=f["quant_type"], absmax=_move(qs_dict["absmax"], device),
                   blocksize=f["blocksize"], code=_move(qs_dict["quant_map"], device),
                   dtype=_TORCH_FLOAT[f["dtype"]],
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


_TORCH_FLOAT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# keys whose values are plain (JSON) values, not arrays
_PLAIN_KEYS = ("quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset")
_NESTED_KEYS = ("nested_absmax", "nested_quant_map", "nested_blocksize", "nested_dtype", "nested_offset")


def _array_field(d, key, dtype, numel=None):
    v = d.get(key)
    if not hasattr(v, "__dlpack__") or not hasattr(v, "dtype"):
        raise ValueError(f"quant_state item {key!r} must be a {dtype} tensor, got {_describe(v)}")
    got = _arrays.dtype_name(v.dtype)
    n = int(np.prod(tuple(v.shape), dtype=np.int64))
    if got != dtype or (numel is not None and n != numel):
        want = f"{dtype} tensor" + (f" of {numel} values" if numel is not None else "")
        raise ValueError(f"quant_state item {key!r} must be a {want}, got {_describe(v)}")
    return n


def _validated_fields(d: dict) -> dict:
    """The plain fields of a from_dict input, validated (arrays are checked, not converted)."""
    for key in ("quant_type", "absmax", "blocksize", "quant_map", "dtype"):
        if key not in d:
            raise ValueError(f"quant_state item {key!r} is missing (got keys {sorted(d)})")
    qt = d["quant_type"]
    if qt is not None and qt not in QuantState.valid_quant_types:  # None: an 8-bit blockwise state
        raise ValueError(f"quant_state item 'quant_type' must be one of {QuantState.valid_quant_types} "
                         f"(or None for an 8-bit state), got {qt!r}")
    f = {"quant_type": qt,
         "blocksize": check_blocksize(d["blocksize"], "quant_state item 'blocksize'"),
         "dtype": check_float_dtype(d["dtype"], "quant_state item 'dtype'"),
         "shape": None if d.get("shape") is None else check_shape(d["shape"], "quant_state item 'shape'")}
    present = [k for k in _NESTED_KEYS if k in d]
    f["nested"] = bool(present)
    if present and len(present) != len(_NESTED_KEYS):
        missing = [k for k in _NESTED_KEYS if k not in d]
        raise ValueError(f"a nested quant_state needs all of {list(_NESTED_KEYS)}; missing {missing}")
    n_absmax = _array_field(d, "absmax", "uint8" if f["nested"] else "float32")
    _array_field(d, "quant_map", "float32", 256 if qt is None else 16)
    if f["shape"] is not None:
        n = 1
        for s in f["shape"]:
            n *= s
        want = _arrays.num_blocks(n, f["blocksize"])
        if n_absmax != want:
            raise ValueError(f"quant_state item 'absmax' must have {want} values for shape {f['shape']} in "
                             f"blocks of {f['blocksize']}, got {n_absmax}")
    if f["nested"]:
        f["nested_blocksize"] = check_blocksize(d["nested_blocksize"], "quant_state item 'nested_blocksize'")
        f["nested_dtype"] = check_float_dtype(d["nested_dtype"], "quant_state item 'nested_dtype'")
        off = d["nested_offset"]
        if isinstance(off, bool) or not isinstance(off, numbers.Real) or not np.isfinite(float(off)):
            raise ValueError(f"quant_state item 'nested_offset' must be a finite number, got {off!r}")
        f["nested_offset"] = float(off)
        _array_field(d, "nested_quant_map", "float32", 256)
        _array_field(d, "nested_absmax", "float32", _arrays.num_blocks(n_absmax, f["nested_blocksize"]))
    return f
