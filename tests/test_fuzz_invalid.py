"""Generated invalid inputs (hypothesis, CPU): each must raise the exception docs/errors.md lists for
its kind (TypeError / ValueError / RuntimeError for module loads) and leave every argument unchanged,
bytes compared. Kinds: wrong dtype, rank, size, framework, layout, flags (read-only, lazily negated),
memory overlap, huge or non-integer sizes, NaN/inf where a number must be finite, corrupted
QuantStates and corrupted (packed) state_dicts."""
import json

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz_support import snapshot

import bnbcy
import bnbcy.functional as F

FUZZ = settings(max_examples=20, deadline=None, print_blob=True, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
BAD_DTYPES = ["float64", "int8", "int16", "int32", "int64", "uint8", "bool", "complex64"]


def _x(n, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32))


def _must_raise(call, args, exc=(ValueError,)):
    before = snapshot(args)
    try:
        call()
    except exc as e:
        msg = str(e)
    else:
        raise AssertionError("the call accepted an invalid argument")
    assert snapshot(args) == before, f"a rejected call changed its arguments ({msg})"
    return msg


def _as(kind, t):
    return t.numpy() if kind == "numpy" else t


FLOAT_OPS = {
    "quantize_blockwise": lambda A: F.quantize_blockwise(A, blocksize=64),
    "quantize_4bit": lambda A: F.quantize_4bit(A),
    "int8_vectorwise_quant": lambda A: F.int8_vectorwise_quant(A),
    "int8_double_quant": lambda A: F.int8_double_quant(A),
}


@FUZZ
@given(op=st.sampled_from(sorted(FLOAT_OPS)), dtype=st.sampled_from(BAD_DTYPES), kind=st.sampled_from(["torch", "numpy"]),
       n=st.integers(1, 300).map(lambda k: 2 * k))
def test_fuzz_wrong_input_dtype(op, dtype, kind, n):
    A = _as(kind, (_x(n) * 10).to(getattr(torch, dtype)) if dtype != "complex64" else
            torch.complex(_x(n), _x(n, 1)))
    msg = _must_raise(lambda: FLOAT_OPS[op](A.reshape(2, -1)), [A])
    assert "A" in msg and dtype in msg


@FUZZ
@given(bs=st.one_of(st.integers(-2 ** 70, 0), st.integers(2 ** 31, 2 ** 70), st.floats(allow_nan=True),
                    st.sampled_from(["64", None, True, 64.0, [64]])))
def test_fuzz_bad_blocksize(bs):
    x = _x(500)
    _must_raise(lambda: F.quantize_blockwise(x, blocksize=bs), [x])
    q, qs = F.quantize_blockwise(x, blocksize=64)
    qs.blocksize = bs
    _must_raise(lambda: F.dequantize_blockwise(q, qs), [q, qs])
    if bs is not None:  # quantize_4bit's blocksize=None means the default, 64
        _must_raise(lambda: F.quantize_4bit(x, blocksize=bs), [x])
    p, ps = F.quantize_4bit(x)
    ps.blocksize = bs
    _must_raise(lambda: F.dequantize_4bit(p, ps), [p, ps])


def _bad_out(draw, like, dtype):
    """A caller buffer wrong in exactly one drawn way for an output shaped/typed like ``like``."""
    how = draw(st.sampled_from(["numel", "rank", "dtype", "noncontig", "negated", "framework", "readonly", "meta"]))
    shape = tuple(like.shape)
    n = int(np.prod(shape))
    if how == "numel":
        return torch.zeros(max(0, n + draw(st.sampled_from([-1, 1, 7]))), dtype=dtype), how
    if how == "rank":
        return torch.zeros((1, *shape) if draw(st.booleans()) else (n,) if len(shape) > 1 else (n, 1),
                           dtype=dtype), how
    if how == "dtype":
        other = draw(st.sampled_from([t for t in (torch.uint8, torch.int8, torch.float16, torch.float32,
                                                  torch.int32, torch.float64) if t != dtype]))
        return torch.zeros(shape, dtype=other), how
    if how == "noncontig":
        return torch.zeros((*shape[:-1], 2 * shape[-1]), dtype=dtype)[..., ::2], how
    if how == "negated":
        return torch._neg_view(torch.zeros(shape, dtype=dtype)), how
    if how == "framework":
        return torch.zeros(shape, dtype=dtype).numpy(), how
    if how == "meta":
        return torch.empty(shape, dtype=dtype, device="meta"), how
    a = torch.zeros(shape, dtype=dtype).numpy()
    a.flags.writeable = False
    return a, how


@st.composite
def out_cases(draw):
    op = draw(st.sampled_from(["quantize_blockwise", "dequantize_blockwise", "quantize_4bit", "dequantize_4bit",
                               "int8_linear_matmul", "int8_mm_dequant", "gemm_4bit"]))
    x = _x(1024, draw(st.integers(0, 1000)))
    if op == "quantize_blockwise":
        like = torch.zeros(1024, dtype=torch.uint8)
        out, how = _bad_out(draw, like, torch.uint8)
        return op, (lambda: F.quantize_blockwise(x, out=out, blocksize=64)), [x, out], how
    if op == "dequantize_blockwise":
        q, qs = F.quantize_blockwise(x, blocksize=64)
        out, how = _bad_out(draw, x, torch.float32)
        return op, (lambda: F.dequantize_blockwise(q, qs, out=out)), [q, qs, out], how
    if op == "quantize_4bit":
        out, how = _bad_out(draw, torch.zeros(512, 1), torch.uint8)
        return op, (lambda: F.quantize_4bit(x, out=out)), [x, out], how
    if op == "dequantize_4bit":
        p, ps = F.quantize_4bit(x.reshape(32, 32))
        out, how = _bad_out(draw, torch.zeros(32, 32), torch.float32)
        return op, (lambda: F.dequantize_4bit(p, ps, out=out)), [p, ps, out], how
    if op == "int8_linear_matmul":
        a, b = torch.ones(4, 32, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8)
        out, how = _bad_out(draw, torch.zeros(4, 8), torch.int32)
        return op, (lambda: F.int8_linear_matmul(a, b, out=out)), [a, b, out], how
    if op == "int8_mm_dequant":
        a, rs, cs = torch.ones(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(8)
        out, how = _bad_out(draw, torch.zeros(4, 8), torch.float16)
        if how == "dtype" and out.dtype in (torch.float32,):
            how = "dtype-ok"  # float32 is a valid int8_mm_dequant output dtype
        return op, (lambda: F.int8_mm_dequant(a, rs, cs, out=out)), [a, rs, cs, out], how
    p, ps = F.quantize_4bit(x.reshape(32, 32))
    A = _x(64, 3).reshape(2, 32)
    out, how = _bad_out(draw, torch.zeros(2, 32), torch.float32)
    return op, (lambda: F.gemm_4bit(A, p.t(), ps, out=out)), [A, p, ps, out], how


@FUZZ
@given(case=out_cases())
def test_fuzz_bad_out(case):
    op, call, args, how = case
    if how == "dtype-ok":
        return
    msg = _must_raise(call, args)
    assert "out" in msg, msg


@FUZZ
@given(op=st.sampled_from(["quantize_blockwise", "quantize_4bit", "dequantize_blockwise", "dequantize_4bit",
                           "int8_mm_dequant"]),
       start=st.integers(0, 4095), kind=st.sampled_from(["torch", "numpy"]))
def test_fuzz_out_overlapping_an_input(op, start, kind):
    """out= is any window of an input's bytes: always refused (memory ranges, any framework)."""
    x = _as(kind, _x(1024))
    as_u8 = (lambda a: a.view(torch.uint8)) if kind == "torch" else (lambda a: a.view(np.uint8))
    if op == "quantize_blockwise":
        s = min(start, 4096 - 1024)
        out = as_u8(x)[s:s + 1024]
        msg = _must_raise(lambda: F.quantize_blockwise(x, out=out, blocksize=64), [x])
    elif op == "quantize_4bit":
        s = min(start, 4096 - 512)
        out = as_u8(x)[s:s + 512].reshape(512, 1)
        msg = _must_raise(lambda: F.quantize_4bit(x, out=out), [x])
    elif op == "dequantize_blockwise":
        buf = _as(kind, torch.zeros(2048))       # 8192 bytes: A's codes at byte s, out a window holding them
        q, qs = F.quantize_blockwise(_as(kind, _x(1024)), blocksize=64)
        s = min(2 * start, 8192 - 1024)
        qa = as_u8(buf)[s:s + 1024]
        qa[...] = q
        o = min(s // 4, 1024)
        out = buf[o:o + 1024]
        msg = _must_raise(lambda: F.dequantize_blockwise(qa, qs, out=out), [buf, qs])
    elif op == "dequantize_4bit":
        buf = _as(kind, torch.zeros(32, 32))
        p, ps = F.quantize_4bit(_as(kind, _x(1024)).reshape(32, 32))
        s = min(start, 4096 - 512)
        pa = as_u8(buf).reshape(-1)[s:s + 512].reshape(512, 1)
        pa[...] = p
        msg = _must_raise(lambda: F.dequantize_4bit(pa, ps, out=buf), [buf, ps])
    else:
        a = _as(kind, torch.ones(32, 32, dtype=torch.int32))
        rs, cs = _as(kind, torch.ones(32)), _as(kind, torch.ones(32))
        s = min(start, 4096 - 2048) // 2 * 2   # a float16 [32, 32] window of A's 4096 bytes
        f16 = torch.float16 if kind == "torch" else np.float16
        out = as_u8(a).reshape(-1)[s:s + 2048].view(f16).reshape(32, 32)
        msg = _must_raise(lambda: F.int8_mm_dequant(a, rs, cs, out=out), [a, rs, cs])
    assert "share memory" in msg, msg


STATE_MUTATIONS = {
    "dtype": [None, "float64", torch.int8, 5, np.float64, "bf16"],
    "shape": [(-1, 32), ("32", 32), (32.5, 32), None, (2 ** 40, 2 ** 40)],
    "absmax": ["short", "f16", None, "list"],
    "offset": [None, float("nan"), float("inf"), "0.5", "vector"],
    "quant_type": ["int4", None, "NF4", 4],
    "state2": [None, "junk"],
}


@FUZZ
@given(field=st.sampled_from(sorted(STATE_MUTATIONS)), data=st.data(), nested=st.booleans(),
       op=st.sampled_from(["dequantize_4bit", "gemv_4bit"]))
def test_fuzz_corrupted_4bit_quant_state(field, data, nested, op):
    if op == "gemv_4bit" and field in ("dtype", "quant_type"):
        op = "dequantize_4bit"  # the fused product takes A's dtype and the state's 16-value code instead
    value = data.draw(st.sampled_from(STATE_MUTATIONS[field]))
    if field in ("offset", "state2") and not nested:
        nested = True
    p, ps = F.quantize_4bit(_x(1024).reshape(32, 32), quant_type="nf4", compress_statistics=nested)
    if field == "absmax":
        value = {"short": ps.absmax[:-1].clone(), "f16": ps.absmax.half(), "None": None,
                 "list": ps.absmax.tolist()}.get(str(value) if value is None else value, value)
    elif field == "offset" and value == "vector":
        value = torch.ones(3)
    elif field == "state2" and value == "junk":
        value = {"absmax": 1}
    setattr(ps, field, value)
    if field == "state2":
        ps.nested = True
    A = _x(32, 2).reshape(1, 32)
    call = (lambda: F.dequantize_4bit(p, ps)) if op == "dequantize_4bit" else (lambda: F.gemv_4bit(A, p.t(), state=ps))
    _must_raise(call, [p, ps, A], (ValueError, TypeError))


@FUZZ
@given(nested=st.booleans(), edits=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(0, 255)),
                                            min_size=1, max_size=4),
       truncate=st.integers(0, 3), tensor_edit=st.sampled_from([None, "absmax", "quant_map", "nested_absmax"]))
def test_fuzz_corrupted_state_dict(nested, edits, truncate, tensor_edit):
    """Random byte edits of the packed blob, a truncated blob or tensor: from_dict raises ValueError or
    (the edit kept it valid) builds a state; Linear4bit.load_state_dict raises RuntimeError or loads;
    a failed load leaves the module as it was."""
    src = bnbcy.nn.Linear4bit(32, 32, bias=False, quant_type="nf4", compress_statistics=nested).to("cpu")
    sd = dict(src.state_dict())
    key = next(k for k in sd if "quant_state." in k)
    blob = bytearray(sd[key].numpy().tobytes())
    for pos, byte in edits:
        blob[pos % len(blob)] = byte
    if truncate:
        blob = blob[:len(blob) - truncate * 7]
    sd[key] = torch.tensor(list(blob), dtype=torch.uint8)
    if tensor_edit and "weight." + tensor_edit in sd:
        sd["weight." + tensor_edit] = sd["weight." + tensor_edit][:-1]
    qs_items = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    before = snapshot(qs_items)
    try:
        F.QuantState.from_dict(qs_items, device="cpu")
    except ValueError:
        pass
    assert snapshot(qs_items) == before
    dst = bnbcy.nn.Linear4bit(32, 32, bias=False, quant_type="nf4", compress_statistics=nested).to("cpu")
    dst_before = snapshot(dst)
    try:
        dst.load_state_dict(sd)
    except RuntimeError:
        assert snapshot(dst) == dst_before, "a failed load changed the module"


@FUZZ
@given(value=st.one_of(st.floats(allow_nan=True).filter(lambda v: not (v == v and 0 <= v < 100)),
                       st.sampled_from([True, "5", None, 5.0])))
def test_fuzz_bad_percentile(value):
    g, vec = _x(100), torch.zeros(100)
    _must_raise(lambda: F.percentile_clipping(g, vec, 3, percentile=value), [g, vec])


@FUZZ
@given(value=st.one_of(st.floats(max_value=-1e-30), st.just(float("nan")), st.sampled_from(["1", None, True])))
def test_fuzz_bad_threshold(value):
    A = _x(64).reshape(4, 16)
    _must_raise(lambda: F.int8_vectorwise_quant(A, threshold=value), [A])


@FUZZ
@given(offset=st.sampled_from([float("nan"), float("inf"), "x", None, True, [1.0]]))
def test_fuzz_bad_nested_offset_in_blob(offset):
    _, ps = F.quantize_4bit(_x(1024).reshape(32, 32), compress_statistics=True)
    d = ps.as_dict(packed=True)
    k = next(k for k in d if "quant_state." in k)
    blob = F.unpack_tensor_to_dict(d[k])
    blob["nested_offset"] = offset
    d[k] = torch.tensor(list(json.dumps(blob).encode()), dtype=torch.uint8)
    _must_raise(lambda: F.QuantState.from_dict(d, device="cpu"), [d])


@FUZZ
@given(spans=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 40), st.booleans()), min_size=1, max_size=12))
def test_fuzz_overlap_check_matches_brute_force(spans):
    """check_no_overlap (sort and sweep) refuses exactly the sets where an output meets another view."""
    from bnbcy import _C, _arrays
    buf = np.zeros(256, np.uint8)
    views = [(_C.view(buf[lo:lo + n], f"v{i}"), out) for i, (lo, n, out) in enumerate(spans)]
    outs = [v for v, o in views if o]
    ins = [v for v, o in views if not o]

    def meet(a, b):
        return a.numel and b.numel and a.span[0] < b.span[1] and b.span[0] < a.span[1]
    want = any(meet(a, b) for i, a in enumerate(outs) for b in outs[i + 1:] + ins)
    try:
        _arrays.check_no_overlap(*outs, inputs=ins)
        got = False
    except ValueError as e:
        got = True
        assert "must not share memory" in str(e)
    assert got == want
