"""Helpers of the hardening tests: snapshots of every argument's bytes, so a test can assert that a
rejected call left every argument (arrays, QuantStates, modules) exactly as it was."""
import numpy as np
import torch


def array_bytes(x):
    """The bytes of an array (torch: its values with any lazy negation applied), or None."""
    if isinstance(x, torch.Tensor):
        t = x.detach()
        if t.device.type == "meta":  # no data to compare
            return (str(t.dtype), tuple(t.shape), "meta")
        if t.is_neg() or t.is_conj():
            t = t.resolve_neg().resolve_conj()
        return (str(t.dtype), tuple(t.shape), t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    if isinstance(x, np.ndarray):
        return (str(x.dtype), x.shape, np.ascontiguousarray(x).view(np.uint8).tobytes())
    return None


def snapshot(obj):
    """A comparable snapshot of an argument: arrays by bytes, QuantStates field by field (nested too),
    modules by their state_dict and parameter identities, lists/tuples/dicts element-wise."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.dtype, torch.Size)):
        return obj
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return array_bytes(obj)
    if isinstance(obj, torch.nn.Module):
        return ({k: array_bytes(v) for k, v in obj.state_dict().items()},
                [(n, id(p), type(p).__name__) for n, p in obj.named_parameters()],
                snapshot(getattr(getattr(obj, "weight", None), "quant_state", None)))
    if isinstance(obj, dict):
        return {k: snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [snapshot(v) for v in obj]
    if hasattr(obj, "absmax") and hasattr(obj, "blocksize"):  # QuantState
        return {k: snapshot(getattr(obj, k, None)) for k in
                ("absmax", "shape", "code", "blocksize", "quant_type", "dtype", "offset", "state2", "nested")}
    return repr(obj)


def assert_unchanged(before, args, what="a rejected call"):
    after = snapshot(args)
    assert after == before, f"{what} changed its arguments"
