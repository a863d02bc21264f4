"""The error contract of quantize_blockwise / dequantize_blockwise.

Every rejected argument raises with a message that names the argument, says what was expected and what
was given ("... got ..."); nothing is written into caller buffers when a call is rejected.
"""
import re

import numpy as np
import pytest
import torch

import reference as R

import bnbcy.functional as F

try:
    import cupy
except Exception:  # pragma: no cover
    cupy = None

POISON = 0xAB


class _Raises:
    """pytest.raises plus checks on the message: the argument name as a word, 'got', extras."""

    def __init__(self, exc, name, *extras):
        self.exc, self.name, self.extras = exc, name, extras

    def __enter__(self):
        self.cm = pytest.raises(self.exc, match=rf"(?<![A-Za-z_]){re.escape(self.name)}(?![A-Za-z_])")
        self.info = self.cm.__enter__()
        return self.info

    def __exit__(self, *exc_info):
        handled = self.cm.__exit__(*exc_info)
        if not handled:
            return handled
        msg = str(self.info.value)
        assert "got" in msg, f"message does not say what was given: {msg!r}"
        for e in self.extras:
            assert re.search(e, msg), f"message lacks {e!r}: {msg!r}"
        return handled


def raises(exc, name, *extras):
    return _Raises(exc, name, *extras)


def _x(n=1000, dtype=torch.float32, kind="torch"):
    t = torch.from_numpy(np.random.default_rng(n).standard_normal(n).astype(np.float32)).to(dtype)
    return t.numpy() if kind == "numpy" else t


def _poisoned_torch(shape, dtype):
    buf = torch.empty(shape, dtype=dtype)
    buf.view(torch.uint8).fill_(POISON)
    return buf


def _all_poison(buf):
    b = buf.contiguous().view(torch.uint8) if isinstance(buf, torch.Tensor) \
        else np.ascontiguousarray(buf).view(np.uint8)
    return bool((b == POISON).all())


# --------------------------------------------------------------------------------------------------
# quantize_blockwise: A
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [[1.0, 2.0, 3.0], 3, 2.5, None, "abc"],
                         ids=["list", "int", "float", "None", "str"])
def test_quantize_A_not_an_array(bad):
    with raises(TypeError, "A"):
        F.quantize_blockwise(bad)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("dtype", ["int32", "float64", "uint8", "bool", "int8"])
def test_quantize_A_bad_dtype(kind, dtype):
    a = np.arange(100).astype(dtype)
    A = torch.from_numpy(a) if kind == "torch" else a
    with raises(ValueError, "A", "float32", "float16", "bfloat16", dtype):
        F.quantize_blockwise(A, blocksize=64)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5, 2)])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_quantize_A_empty(kind, shape):
    A = torch.empty(shape) if kind == "torch" else np.empty(shape, np.float32)
    with raises(ValueError, "A"):
        F.quantize_blockwise(A, blocksize=64)


# --------------------------------------------------------------------------------------------------
# blocksize
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [0, -1, -64, 64.0, 100.5, "64", None], ids=repr)
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_quantize_bad_blocksize(kind, bs):
    with raises(ValueError, "blocksize"):
        F.quantize_blockwise(_x(kind=kind), blocksize=bs)


@pytest.mark.parametrize("bs", [0, -64, 64.0, "64"], ids=repr)
def test_dequantize_bad_blocksize(bs):
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    with raises(ValueError, "blocksize"):
        F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=bs)


def test_cpu_accepts_any_positive_blocksize():
    for bs in (1, 3, 100, 333, 5000, 10 ** 6):
        q, qs = F.quantize_blockwise(_x(1000), blocksize=bs)
        assert qs.absmax.shape == (R.nblocks(1000, bs),)


# --------------------------------------------------------------------------------------------------
# code
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    torch.zeros(256, dtype=torch.float64), torch.zeros(256, dtype=torch.float16),
    torch.zeros(255), torch.zeros(257), torch.zeros(16), np.zeros(255, np.float32), np.zeros(256, np.float64),
], ids=["f64", "f16", "255", "257", "16", "np255", "npf64"])
def test_quantize_bad_code(bad):
    with raises(ValueError, "code"):
        F.quantize_blockwise(_x(), code=bad, blocksize=64)


def test_dequantize_bad_code():
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    with raises(ValueError, "code"):
        F.dequantize_blockwise(q, absmax=qs.absmax, code=torch.zeros(100), blocksize=64)
    with raises(ValueError, "code"):
        F.dequantize_blockwise(q, absmax=qs.absmax, code=torch.zeros(256, dtype=torch.float64), blocksize=64)


def test_code_of_another_kind_is_converted():
    """Maps are torch CPU tensors by API; a NumPy A with the default torch map works (and vice versa)."""
    xn = _x(500, kind="numpy")
    q, qs = F.quantize_blockwise(xn, code=F.create_dynamic_map(), blocksize=64)
    assert isinstance(q, np.ndarray)
    q_ref, _ = R.quantize_ref(xn, 64)
    np.testing.assert_array_equal(q, q_ref)
    y = F.dequantize_blockwise(q, absmax=qs.absmax, code=F.create_dynamic_map(), blocksize=64)
    assert isinstance(y, np.ndarray)
    q2, _ = F.quantize_blockwise(torch.from_numpy(xn), code=F.create_dynamic_map().numpy(), blocksize=64)
    np.testing.assert_array_equal(q2.numpy(), q)


# --------------------------------------------------------------------------------------------------
# out= / absmax= of quantize_blockwise
# --------------------------------------------------------------------------------------------------
def _bad_outs(n):
    big = _poisoned_torch((2 * n,), torch.uint8)
    return {
        "shape_n+1": _poisoned_torch((n + 1,), torch.uint8),
        "shape_2d": _poisoned_torch((1, n), torch.uint8),
        "dtype_int8": _poisoned_torch((n,), torch.int8),
        "dtype_f32": _poisoned_torch((n,), torch.float32),
        "noncontig": big[::2],
        "numpy": np.full((n,), POISON, np.uint8),
    }


@pytest.mark.parametrize("case", list(_bad_outs(4)))
def test_quantize_bad_out(case):
    n = 1000
    x = _x(n)
    x_before = x.clone()
    out = _bad_outs(n)[case]
    absmax = _poisoned_torch((R.nblocks(n, 64),), torch.float32)
    extra = {"dtype_int8": "uint8", "dtype_f32": "uint8", "numpy": "torch"}.get(case)
    with raises(ValueError, "out", *([extra] if extra else [])):
        F.quantize_blockwise(x, out=out, absmax=absmax, blocksize=64)
    assert _all_poison(out), "out was written by a rejected call"
    assert _all_poison(absmax), "absmax was written by a rejected call"
    assert torch.equal(x, x_before)


def test_quantize_out_torch_for_numpy_A():
    x = _x(kind="numpy")
    out = _poisoned_torch(x.shape, torch.uint8)
    with raises(ValueError, "out", "numpy"):
        F.quantize_blockwise(x, out=out, blocksize=64)
    assert _all_poison(out)


@pytest.mark.parametrize("case", ["short", "long", "2d", "f16", "f64", "noncontig", "numpy"])
def test_quantize_bad_absmax(case):
    n = 1000
    nb = R.nblocks(n, 64)
    x = _x(n)
    bad = {
        "short": lambda: _poisoned_torch((nb - 1,), torch.float32),
        "long": lambda: _poisoned_torch((nb + 1,), torch.float32),
        "2d": lambda: _poisoned_torch((1, nb + 1), torch.float32),
        "f16": lambda: _poisoned_torch((nb,), torch.float16),
        "f64": lambda: _poisoned_torch((nb,), torch.float64),
        "noncontig": lambda: _poisoned_torch((2 * nb,), torch.float32)[::2],
        "numpy": lambda: np.full((nb,), np.nan, np.float32),
    }[case]()
    out = _poisoned_torch((n,), torch.uint8)
    with raises(ValueError, "absmax"):
        F.quantize_blockwise(x, out=out, absmax=bad, blocksize=64)
    assert _all_poison(out), "out was written by a rejected call"
    if case != "numpy":
        assert _all_poison(bad), "absmax was written by a rejected call"


def test_quantize_rejected_call_leaves_everything_unchanged():
    """A valid out= with a bad absmax= (and vice versa): nothing is written."""
    n = 300
    x = _x(n)
    out = _poisoned_torch((n,), torch.uint8)
    good_absmax = _poisoned_torch((R.nblocks(n, 64),), torch.float32)
    with raises(ValueError, "absmax"):
        F.quantize_blockwise(x, out=out, absmax=_poisoned_torch((2,), torch.float32), blocksize=64)
    assert _all_poison(out)
    with raises(ValueError, "out"):
        F.quantize_blockwise(x, out=_poisoned_torch((n, 1), torch.uint8), absmax=good_absmax, blocksize=64)
    assert _all_poison(good_absmax)
    with raises(ValueError, "code"):
        F.quantize_blockwise(x, code=torch.zeros(10), out=out, absmax=good_absmax, blocksize=64)
    assert _all_poison(out) and _all_poison(good_absmax)
    with raises(ValueError, "blocksize"):
        F.quantize_blockwise(x, out=out, absmax=good_absmax, blocksize=0)
    assert _all_poison(out) and _all_poison(good_absmax)


# --------------------------------------------------------------------------------------------------
# dequantize_blockwise
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.int8, torch.int32, torch.float16])
def test_dequantize_A_not_uint8(dtype):
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    with raises(ValueError, "A", "uint8"):
        F.dequantize_blockwise(q.to(dtype), qs)


@pytest.mark.parametrize("bad", [[1, 2, 3], 7, None], ids=["list", "int", "None"])
def test_dequantize_A_not_an_array(bad):
    _, qs = F.quantize_blockwise(_x(), blocksize=64)
    with pytest.raises(TypeError, match=r"(?<![A-Za-z_])A(?![A-Za-z_])"):
        F.dequantize_blockwise(bad, qs)


def test_dequantize_needs_state_or_absmax():
    q, _ = F.quantize_blockwise(_x(), blocksize=64)
    with pytest.raises(ValueError, match=r"quant_state|absmax"):
        F.dequantize_blockwise(q)
    with pytest.raises(ValueError, match=r"quant_state|absmax"):
        F.dequantize_blockwise(q, code=F.create_dynamic_map(), blocksize=64)


def test_dequantize_absmax_too_short():
    n = 1000
    q, qs = F.quantize_blockwise(_x(n), blocksize=64)
    out = _poisoned_torch((n,), torch.float32)
    with raises(ValueError, "absmax", str(R.nblocks(n, 64))):
        F.dequantize_blockwise(q, absmax=qs.absmax[:-1].clone(), blocksize=64, out=out)
    assert _all_poison(out)
    with raises(ValueError, "absmax"):   # right size for blocksize 64, too short for 32
        F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=32)
    short_state = F.QuantState(absmax=qs.absmax[:3].clone(), code=qs.code, blocksize=64, dtype=torch.float32)
    with raises(ValueError, "absmax"):
        F.dequantize_blockwise(q, short_state, out=out)
    assert _all_poison(out)


def test_dequantize_absmax_bad_dtype():
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    with raises(ValueError, "absmax", "float32"):
        F.dequantize_blockwise(q, absmax=qs.absmax.double(), blocksize=64)


@pytest.mark.parametrize("case", ["shape", "shape_2d", "dtype", "dtype_vs_state", "noncontig", "numpy"])
def test_dequantize_bad_out(case):
    n = 1000
    x = _x(n, dtype=torch.float16)
    q, qs = F.quantize_blockwise(x, blocksize=64)          # state dtype float16
    out = {
        "shape": lambda: _poisoned_torch((n - 1,), torch.float16),
        "shape_2d": lambda: _poisoned_torch((n, 1), torch.float16),
        "dtype": lambda: _poisoned_torch((n,), torch.uint8),
        "dtype_vs_state": lambda: _poisoned_torch((n,), torch.float32),
        "noncontig": lambda: _poisoned_torch((2 * n,), torch.float16)[::2],
        "numpy": lambda: np.full((2 * n,), POISON, np.uint8).view(np.float16),
    }[case]()
    with raises(ValueError, "out"):
        F.dequantize_blockwise(q, qs, out=out)
    assert _all_poison(out), "out was written by a rejected call"


def test_dequantize_numpy_A_with_torch_out():
    xn = _x(kind="numpy")
    q, qs = F.quantize_blockwise(xn, blocksize=64)
    out = _poisoned_torch(q.shape, torch.float32)
    with raises(ValueError, "out"):
        F.dequantize_blockwise(q, qs, out=out)
    assert _all_poison(out)


def test_dequantize_absmax_of_other_kind():
    """absmax must live with A: a NumPy absmax for torch codes is rejected (naming absmax)."""
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    with raises(ValueError, "absmax"):
        F.dequantize_blockwise(q, absmax=qs.absmax.numpy(), blocksize=64)


def test_inputs_unchanged_after_errors():
    n = 700
    x = _x(n)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    q_before, absmax_before, x_before = q.clone(), qs.absmax.clone(), x.clone()
    for call in (
        lambda: F.quantize_blockwise(x, blocksize=-3),
        lambda: F.quantize_blockwise(x, out=q[:-1]),
        lambda: F.dequantize_blockwise(q, absmax=qs.absmax[:2], blocksize=64),
        lambda: F.dequantize_blockwise(q, qs, out=torch.empty(n, dtype=torch.float16)),
    ):
        with pytest.raises(ValueError):
            call()
    assert torch.equal(q, q_before) and torch.equal(qs.absmax, absmax_before) and torch.equal(x, x_before)


# --------------------------------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.parametrize("bs", [32, 100, 8192, 96, 1, 0, -64])
@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_cuda_blocksize_must_be_power_of_two_64_to_4096(kind, bs):
    x = _x().cuda()
    if kind == "cupy":
        x = cupy.asarray(x.cpu().numpy())
    with raises(ValueError, "blocksize"):
        F.quantize_blockwise(x, blocksize=bs)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    with raises(ValueError, "blocksize"):
        F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=bs)


@pytest.mark.cuda
def test_cuda_out_and_absmax_on_wrong_device_or_kind():
    n = 1000
    x = _x(n).cuda()
    nb = R.nblocks(n, 64)
    cpu_out = _poisoned_torch((n,), torch.uint8)
    with raises(ValueError, "out"):
        F.quantize_blockwise(x, out=cpu_out, blocksize=64)
    assert _all_poison(cpu_out)
    with raises(ValueError, "absmax"):
        F.quantize_blockwise(x, absmax=torch.empty(nb), blocksize=64)
    if cupy is not None:
        with raises(ValueError, "out"):
            F.quantize_blockwise(x, out=cupy.empty((n,), cupy.uint8), blocksize=64)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    with raises(ValueError, "absmax"):
        F.dequantize_blockwise(q, absmax=qs.absmax.cpu(), blocksize=64)
    with raises(ValueError, "out"):
        F.dequantize_blockwise(q, qs, out=torch.empty(n))
    # CPU codes with a CUDA state
    with raises(ValueError, "absmax"):
        F.dequantize_blockwise(q.cpu(), qs)


@pytest.mark.cuda
def test_cuda_code_map_on_cpu_is_converted():
    x = _x(4096 + 5).cuda()
    q, qs = F.quantize_blockwise(x, code=F.create_dynamic_map(), blocksize=64)
    assert q.is_cuda and qs.absmax.is_cuda
    y = F.dequantize_blockwise(q, absmax=qs.absmax, code=F.create_dynamic_map(), blocksize=64)
    assert y.is_cuda
