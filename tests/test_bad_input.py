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


# ==================================================================================================
# Issue 14: each finding of the hostile-input review, with the arguments checked unchanged after the
# rejected call (bytes compared). The crash-prone ones (a NULL data pointer) run in a subprocess in
# tests/test_fuzz_crash.py.
# ==================================================================================================
from fuzz_support import assert_unchanged, snapshot  # noqa: E402


def _rejects(exc, name, call, args, *extras):
    """``call()`` raises ``exc`` naming ``name`` (and saying what it got) and leaves ``args`` unchanged."""
    before = snapshot(args)
    with raises(exc, name, *extras):
        call()
    assert_unchanged(before, args)


@pytest.mark.parametrize("bs", [2 ** 63 - 4000, 2 ** 63 - 1, 2 ** 31, 2 ** 64 + 64])
def test_finding_huge_blocksize_quantize(bs):
    x = _x(5000)
    out = _poisoned_torch((5000,), torch.uint8)
    _rejects(ValueError, "blocksize", lambda: F.quantize_blockwise(x, out=out, blocksize=bs), [x, out],
             str(2 ** 31 - 1))


def test_finding_huge_blocksize_in_state_dequantize():
    q, qs = F.quantize_blockwise(_x(5000), blocksize=64)
    qs.blocksize = 2 ** 63 - 4000
    out = _poisoned_torch((5000,), torch.float32)
    _rejects(ValueError, "blocksize", lambda: F.dequantize_blockwise(q, qs, out=out), [q, qs, out])
    assert _all_poison(out)


def test_finding_largest_blocksize_is_one_block():
    x = _x(5000)
    q, qs = F.quantize_blockwise(x, blocksize=2 ** 31 - 1)
    q_ref, absmax_ref = R.quantize_ref(x.numpy(), 5000)
    np.testing.assert_array_equal(q.numpy(), q_ref)
    np.testing.assert_array_equal(qs.absmax.numpy(), absmax_ref)


def _neg(t):
    """A lazily negated view holding -t (the public route: ``complex.conj().imag``)."""
    v = torch._neg_view(-t)
    assert v.is_neg()
    return v


def test_finding_negative_view_input_is_resolved():
    x = _x(1000)
    xn = _neg(x)
    q, qs = F.quantize_blockwise(xn, blocksize=64)
    q_ref, qs_ref = F.quantize_blockwise(x.clone(), blocksize=64)
    assert torch.equal(q, q_ref) and torch.equal(qs.absmax, qs_ref.absmax)
    p, ps = F.quantize_4bit(xn, quant_type="nf4")
    p_ref, ps_ref = F.quantize_4bit(x.clone(), quant_type="nf4")
    assert torch.equal(p, p_ref) and torch.equal(ps.absmax, ps_ref.absmax)
    # the public route of the report: the imaginary part of a conjugated complex tensor
    c = torch.complex(torch.zeros(1000), x).conj().imag
    assert c.is_neg()
    q2, _ = F.quantize_blockwise(c, blocksize=64)
    assert torch.equal(q2, F.quantize_blockwise(-x, blocksize=64)[0])


def test_finding_negative_view_out_is_refused():
    x = _x(1000)
    out = _neg(torch.zeros(1000, dtype=torch.uint8))
    _rejects(ValueError, "out", lambda: F.quantize_blockwise(x, out=out, blocksize=64), [x, out], "negative")
    absmax = _neg(torch.zeros(R.nblocks(1000, 64)))
    _rejects(ValueError, "absmax", lambda: F.quantize_blockwise(x, absmax=absmax, blocksize=64), [x, absmax])
    q, qs = F.quantize_blockwise(x, blocksize=64)
    dout = _neg(torch.zeros(1000))
    _rejects(ValueError, "out", lambda: F.dequantize_blockwise(q, qs, out=dout), [q, qs, dout])
    p, ps = F.quantize_4bit(x, quant_type="fp4")
    _rejects(ValueError, "out", lambda: F.dequantize_4bit(p, ps, out=dout), [p, ps, dout])
    pout = _neg(torch.zeros(500, 1, dtype=torch.uint8))
    _rejects(ValueError, "out", lambda: F.quantize_4bit(x, out=pout), [x, pout])


def test_finding_quantize_out_overlapping_A():
    n = 1000
    x = _x(n)
    _rejects(ValueError, "out", lambda: F.quantize_blockwise(x, out=x.view(torch.uint8)[:n], blocksize=64), [x],
             "share memory")
    xn = x.numpy()
    _rejects(ValueError, "out", lambda: F.quantize_blockwise(xn, out=xn.view(np.uint8)[:n], blocksize=64), [xn])


def test_finding_absmax_overlapping_out():
    n = 1024
    x = _x(n)
    buf = _poisoned_torch((n + 64,), torch.uint8)
    out, absmax = buf[:n], buf[n - 32:n + 32].view(torch.float32)  # absmax starts inside out
    _rejects(ValueError, "out", lambda: F.quantize_blockwise(x, out=out, absmax=absmax, blocksize=64), [x, buf],
             "absmax")
    assert _all_poison(buf)
    _rejects(ValueError, "out", lambda: F.quantize_4bit(x, out=buf[:512].reshape(512, 1),
                                                        absmax=buf[512 - 32:512 + 32].view(torch.float32)),
             [x, buf])
    assert _all_poison(buf)


def test_finding_dequantize_out_holding_A():
    n = 1024
    q, qs = F.quantize_blockwise(_x(n), blocksize=64)
    buf = torch.empty(n, dtype=torch.float32)
    qa = buf.view(torch.uint8)[:n]
    qa.copy_(q)
    _rejects(ValueError, "out", lambda: F.dequantize_blockwise(qa, qs, out=buf), [buf, qs], "A")
    # out holding absmax's bytes
    big = torch.empty(n + 64, dtype=torch.float32)
    am = big[n:n + qs.absmax.numel()]
    am.copy_(qs.absmax)
    st = F.QuantState(absmax=am, code=qs.code, blocksize=64, dtype=torch.float32)
    _rejects(ValueError, "out", lambda: F.dequantize_blockwise(q, st, out=big[8:8 + n]), [q, big], "absmax")


def test_finding_dequantize_4bit_out_holding_A():
    w = _x(4096).reshape(64, 64)
    p, ps = F.quantize_4bit(w, quant_type="nf4")
    buf = torch.empty(64, 64, dtype=torch.float32)
    pa = buf.view(torch.uint8).reshape(-1)[:p.numel()].reshape(p.shape)
    pa.copy_(p)
    _rejects(ValueError, "out", lambda: F.dequantize_4bit(pa, ps, out=buf), [buf, ps], "A")


@pytest.mark.parametrize("nested_op", ["4bit", "4bit_gemv", "blockwise"])
def test_finding_nested_state_offset_none(nested_op):
    w = _x(4096).reshape(64, 64)
    if nested_op == "blockwise":
        q, qs = F.quantize_blockwise(w, blocksize=64, nested=True)
        qs.offset = None
        _rejects(TypeError, "quant_state.offset", lambda: F.dequantize_blockwise(q, qs), [q, qs])
        return
    p, ps = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    ps.offset = None
    if nested_op == "4bit":
        _rejects(TypeError, "quant_state.offset", lambda: F.dequantize_4bit(p, ps), [p, ps])
    else:
        a = _x(64).reshape(1, 64)
        _rejects(TypeError, "state.offset", lambda: F.gemv_4bit(a, p.t(), state=ps), [a, p, ps])


def _packed_state(nested=True, quant_type="nf4"):
    _, ps = F.quantize_4bit(_x(4096).reshape(64, 64), quant_type=quant_type, compress_statistics=nested)
    return ps.as_dict(packed=True)


def _with_blob(d, edit):
    key = next(k for k in d if "quant_state." in k)
    blob = F.unpack_tensor_to_dict(d[key])
    d = dict(d)
    d[key] = F.pack_dict_to_tensor(edit(blob)) if callable(edit) else edit
    return d


def _set(k, v):
    def edit(b):
        b = dict(b)
        b[k] = v
        return b
    return edit


def _drop(k):
    def edit(b):
        b = dict(b)
        b.pop(k)
        return b
    return edit


@pytest.mark.parametrize("case,field", [
    ("dtype_unknown", "dtype"), ("dtype_int", "dtype"), ("dtype_int8_name", "dtype"),
    ("blob_list", "JSON object"), ("blob_not_json", "JSON"), ("blob_not_utf8", "UTF-8"),
    ("missing_nested_offset", "nested_offset"), ("nested_offset_str", "nested_offset"),
    ("blocksize_neg", "blocksize"), ("blocksize_huge", "blocksize"), ("blocksize_float", "blocksize"),
    ("shape_neg", "shape"), ("shape_str", "shape"), ("quant_type_bad", "quant_state"),
    ("absmax_short", "absmax"), ("absmax_dtype", "absmax"), ("quant_map_short", "quant_map"),
    ("nested_absmax_short", "nested_absmax"), ("nested_dtype_int", "nested_dtype"), ("extra_key", "only"),
    ("missing_absmax", "absmax"),
])
def test_finding_from_dict_corrupted(case, field):
    d = _packed_state()
    d = {
        "dtype_unknown": lambda: _with_blob(d, _set("dtype", "float128x")),
        "dtype_int": lambda: _with_blob(d, _set("dtype", 5)),
        "dtype_int8_name": lambda: _with_blob(d, _set("dtype", "int8")),
        "blob_list": lambda: _with_blob(d, F.pack_dict_to_tensor([1, 2])),
        "blob_not_json": lambda: _with_blob(d, torch.tensor(list(b"{nope"), dtype=torch.uint8)),
        "blob_not_utf8": lambda: _with_blob(d, torch.tensor([0xff, 0xfe], dtype=torch.uint8)),
        "missing_nested_offset": lambda: _with_blob(d, _drop("nested_offset")),
        "nested_offset_str": lambda: _with_blob(d, _set("nested_offset", "0.1")),
        "blocksize_neg": lambda: _with_blob(d, _set("blocksize", -64)),
        "blocksize_huge": lambda: _with_blob(d, _set("blocksize", 2 ** 63 - 4000)),
        "blocksize_float": lambda: _with_blob(d, _set("blocksize", 64.0)),
        "shape_neg": lambda: _with_blob(d, _set("shape", [-64, 64])),
        "shape_str": lambda: _with_blob(d, _set("shape", "64x64")),
        "quant_type_bad": lambda: {k.replace("nf4", "xx4") if k.startswith("quant_state") else k: v
                                   for k, v in d.items()},
        "absmax_short": lambda: {**d, "absmax": d["absmax"][:-1]},
        "absmax_dtype": lambda: {**d, "absmax": d["absmax"].float()},
        "quant_map_short": lambda: {**d, "quant_map": d["quant_map"][:8]},
        "nested_absmax_short": lambda: {**d, "nested_absmax": d["nested_absmax"][:0]},
        "nested_dtype_int": lambda: _with_blob(d, _set("nested_dtype", 3)),
        "extra_key": lambda: _with_blob(d, _set("evil", 1)),
        "missing_absmax": lambda: {k: v for k, v in d.items() if k != "absmax"},
    }[case]()
    before = snapshot(d)
    with pytest.raises(ValueError, match=field) as info:
        F.QuantState.from_dict(d, device="cpu")
    assert "got" in str(info.value) or "missing" in str(info.value) or "Detected" in str(info.value), info.value
    assert_unchanged(before, d)


def test_finding_from_dict_not_a_mapping():
    with raises(TypeError, "qs_dict"):
        F.QuantState.from_dict([("absmax", torch.ones(2))], device="cpu")


def test_finding_from_dict_valid_roundtrip_both_kinds():
    for nested in (False, True):
        _, ps = F.quantize_4bit(_x(4096).reshape(64, 64), quant_type="fp4", compress_statistics=nested)
        assert F.QuantState.from_dict(ps.as_dict(packed=True), device="cpu") == ps
        assert F.QuantState.from_dict(ps.as_dict(), device="cpu") == ps


def test_finding_linear4bit_load_state_dict_bad_dtype_is_collected():
    import bnbcy
    src = bnbcy.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu")
    sd = _with_blob(src.state_dict(), _set("dtype", "float128x"))
    dst = bnbcy.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu")
    before = snapshot(dst)
    with pytest.raises(RuntimeError, match="dtype"):  # torch's error collection, not a raw AttributeError
        dst.load_state_dict(sd)
    assert_unchanged(before, dst)


def test_finding_state_dtype_none_message():
    p, ps = F.quantize_4bit(_x(4096).reshape(64, 64), quant_type="nf4")
    ps.dtype = None
    _rejects(ValueError, "quant_state.dtype", lambda: F.dequantize_4bit(p, ps), [p, ps], "None")
    q, qs = F.quantize_blockwise(_x(), blocksize=64)
    qs.dtype = None
    _rejects(ValueError, "quant_state.dtype", lambda: F.dequantize_blockwise(q, qs), [q, qs], "None")


@pytest.mark.parametrize("shape", [(-64, 64), (64, "64"), (64.0, 64)], ids=repr)
def test_finding_state_negative_shape_message(shape):
    p, ps = F.quantize_4bit(_x(4096).reshape(64, 64), quant_type="nf4")
    ps.shape = shape
    _rejects(ValueError, "quant_state.shape", lambda: F.dequantize_4bit(p, ps), [p, ps])
    a = _x(64).reshape(1, 64)
    _rejects(ValueError, "state.shape", lambda: F.gemv_4bit(a, p.t(), state=ps), [a, p, ps])


@pytest.mark.parametrize("pct", [5.5, -1, 100, True, "5"], ids=repr)
def test_finding_percentile_clipping_bad_percentile(pct):
    g, vec = _x(100), torch.zeros(100)
    _rejects(ValueError, "percentile", lambda: F.percentile_clipping(g, vec, 2, percentile=pct), [g, vec])


def test_finding_short_state2_names_the_argument():
    p, g, s1, s2 = _x(100), _x(100), torch.zeros(100), torch.zeros(50)
    _rejects(ValueError, "state2", lambda: F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, 1, 1e-3,
                                                                     state2=s2, beta2=0.999), [p, g, s1, s2], "100")
    with pytest.raises(ValueError) as info:
        F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999)
    assert "state2[0]" not in str(info.value)


def test_finding_int8_vectorwise_quant_dtypes_as_documented():
    """docs/int8.md: float16/bfloat16/float32 accepted, float64 refused with ValueError."""
    import pathlib
    doc = (pathlib.Path(__file__).parent.parent / "docs" / "int8.md").read_text()
    assert "any float dtype" not in doc
    A = _x(64).reshape(4, 16)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        F.int8_vectorwise_quant(A.to(dt))
    _rejects(ValueError, "A", lambda: F.int8_vectorwise_quant(A.double()), [A], "float64")


def test_finding_gemv_4bit_truncated_inputs_raise():
    """Kept from before (bitsandbytes aborts here): truncated absmax or packed weight raise ValueError."""
    w = _x(4096).reshape(64, 64)
    p, ps = F.quantize_4bit(w, quant_type="nf4")
    a = _x(64).reshape(1, 64)
    short = F.QuantState(absmax=ps.absmax[:-1].clone(), shape=ps.shape, code=ps.code, blocksize=ps.blocksize,
                         quant_type="nf4", dtype=ps.dtype)
    _rejects(ValueError, "absmax", lambda: F.gemv_4bit(a, p.t(), state=short), [a, p, short])
    _rejects(ValueError, "B", lambda: F.gemv_4bit(a, p[:-1].t(), state=ps), [a, p, ps])


def test_cuda_int32_size_limits_checked_before_launch():
    """Sizes the CUDA kernels take as 32-bit ints are checked before a launch (runs without a GPU: the
    check comes first)."""
    from bnbcy.backends import cuda as C
    with raises(ValueError, "N", str(2 ** 31 - 1)):
        C.int8_linear_matmul(None, None, None, None, 1, 2 ** 31, 8)
    with raises(ValueError, "K"):
        C.gemm_4bit(None, None, None, None, None, None, None, None, 1, 64, 2 ** 32, 64, "nf4")
    with raises(ValueError, "cols"):
        C.int8_mm_dequant(None, None, None, None, None, 1, 2 ** 31)
