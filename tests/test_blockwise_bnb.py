"""bnbcy against the installed bitsandbytes 0.50.2.

CPU: maps bit-identical; absmax bit-identical; dequantization of the SAME codes bit-identical.  bnb's
CPU quantizer is a 65536-bin LUT approximation (NUMERICS §2.7), so its codes are compared with ours only
through the documented rule: where they differ, ours equals the reference (exact §2.2 search) and is at
least as near to xn as bnb's.  QuantState equality/serialization semantics match bnb's.

CUDA (``cuda`` marker): codes and absmax bit-identical to bnb's CUDA kernels for every blocksize and
dtype, partial blocks and edge cases; dequantization bit-identical.
"""
import warnings

import numpy as np
import pytest
import torch

import reference as R

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    bnb = pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as BF

import bnbcy.functional as F

BLOCKSIZES_CUDA = (64, 128, 256, 512, 1024, 2048, 4096)
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _rng(*parts):
    return np.random.default_rng(R.seed_of("bnb", *parts))


def _bits_equal_tensor(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.int32 if a.element_size() == 4 else torch.int16),
        b.contiguous().view(torch.int32 if b.element_size() == 4 else torch.int16))


# --------------------------------------------------------------------------------------------------
# maps
# --------------------------------------------------------------------------------------------------
DYNAMIC_ARGS = [(True, 7, 8), (False, 7, 8), (True, 4, 8), (True, 5, 8), (True, 2, 8), (True, 3, 5),
                (True, 3, 4), (True, 2, 4), (True, 7, 6)]
FP8_ARGS = [(True, 5, 2, 8), (True, 4, 3, 8), (True, 3, 4, 8), (True, 2, 1, 4), (True, 3, 2, 6),
            (False, 5, 3, 8), (True, 4, 2, 7)]
LINEAR_ARGS = [(True, 8, True), (False, 8, True), (True, 8, False), (False, 8, False), (True, 4, True),
               (False, 4, True), (True, 5, False)]
NORMAL_ARGS = [(0.9677083, True), (0.9677083, False), (0.99, True), (0.95, False)]


@pytest.mark.parametrize("args", DYNAMIC_ARGS)
def test_dynamic_map_bit_identical(args):
    ours, theirs = F.create_dynamic_map(*args), BF.create_dynamic_map(*args)
    assert _bits_equal_tensor(ours, theirs), args
    kw = dict(zip(("signed", "max_exponent_bits", "total_bits"), args))
    assert _bits_equal_tensor(F.create_dynamic_map(**kw), theirs)


@pytest.mark.parametrize("args", [(False, 5, 8), (False, 4, 8), (False, 6, 8)])
def test_dynamic_map_inconsistent_args_raise_like_bnb(args):
    with pytest.raises(Exception):
        BF.create_dynamic_map(*args)
    with pytest.raises(Exception):
        F.create_dynamic_map(*args)


@pytest.mark.parametrize("args", FP8_ARGS)
def test_fp8_map_bit_identical(args):
    assert _bits_equal_tensor(F.create_fp8_map(*args), BF.create_fp8_map(*args)), args


@pytest.mark.parametrize("args", LINEAR_ARGS)
def test_linear_map_bit_identical(args):
    assert _bits_equal_tensor(F.create_linear_map(*args), BF.create_linear_map(*args)), args


@pytest.mark.parametrize("args", NORMAL_ARGS)
def test_normal_map_bit_identical(args):
    assert _bits_equal_tensor(F.create_normal_map(*args), BF.create_normal_map(*args)), args


def test_default_maps_bit_identical():
    assert _bits_equal_tensor(F.create_dynamic_map(), BF.create_dynamic_map())
    assert _bits_equal_tensor(F.create_normal_map(), BF.create_normal_map())
    assert _bits_equal_tensor(F.create_linear_map(), BF.create_linear_map())
    assert _bits_equal_tensor(F.create_fp8_map(), BF.create_fp8_map())
    for m in (F.create_dynamic_map(), F.create_normal_map(), F.create_fp8_map(), F.create_linear_map()):
        assert m.device.type == "cpu" and m.dtype == torch.float32 and m.shape == (256,)


# --------------------------------------------------------------------------------------------------
# CPU: absmax, dequantization of the same codes, codes through the documented rule
# --------------------------------------------------------------------------------------------------
CPU_DISTS = ("normal", "student_t", "outliers", "zero_blocks", "nan", "inf", "tiny", "huge")


def _compare_codes_via_rule(ours, theirs, x, absmax, blocksize, code=None):
    """Where ours != bnb's: ours == reference and |code[ours]-xn| <= |code[bnb]-xn|."""
    code_np = R.DYNAMIC_SIGNED if code is None else R.to_f32(code)
    ours = R.to_numpy(ours).ravel().astype(np.int64)
    theirs = R.to_numpy(theirs).ravel().astype(np.int64)
    x32 = R.to_f32(x).ravel()
    q_ref, _ = R.quantize_ref(x32, blocksize, code_np)
    R.assert_codes_equal(ours, q_ref, x32, absmax, blocksize)
    d = np.nonzero(ours != theirs)[0]
    if d.size:
        xn = R.normalize(x32, absmax, blocksize)[d].astype(np.float64)
        fin = np.isfinite(xn)
        e_ours = np.abs(code_np[ours[d]].astype(np.float64) - xn)
        e_bnb = np.abs(code_np[theirs[d]].astype(np.float64) - xn)
        # an exact float32-midpoint tie counts as equally near (§2.2: the even index wins)
        c_o, c_b = code_np[ours[d]], code_np[theirs[d]]
        mid32 = ((c_o + c_b).astype(np.float32) * np.float32(0.5)).astype(np.float32)
        tie = (xn == mid32.astype(np.float64)) & (ours[d] % 2 == 0) & (np.abs(ours[d] - theirs[d]) == 1)
        worse = fin & (e_ours > e_bnb) & ~tie
        assert not np.any(worse), (f"our code is farther than bnb's at {d[worse][:5].tolist()}: "
                                   f"xn={xn[worse][:5].tolist()} ours={ours[d][worse][:5].tolist()} "
                                   f"bnb={theirs[d][worse][:5].tolist()}")
    return d.size


def _grid(dists, dtypes, blocksizes):
    return [(d, t, b) for d in dists for t in dtypes for b in blocksizes if R.supports(d, t)]


@pytest.mark.parametrize("dist,dtype,blocksize",
                         _grid(CPU_DISTS, R.DTYPE_NAMES, BLOCKSIZES_CUDA + (100, 333)))
def test_cpu_against_bnb(dist, dtype, blocksize):
    rng = _rng("cpu", dist, dtype, blocksize)
    n = (3 if blocksize < 1024 else 2) * blocksize + int(rng.integers(1, blocksize))
    x = R.make_input(R.make_values(dist, n, rng, blocksize), dtype)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    bq, bqs = BF.quantize_blockwise(x, blocksize=blocksize)
    # absmax bit-identical
    R.assert_bits_equal(R.bits_of(qs.absmax), R.bits_of(bqs.absmax), "float32", "absmax vs bnb")
    assert qs.dtype == bqs.dtype and qs.blocksize == bqs.blocksize and q.shape == bq.shape
    assert _bits_equal_tensor(qs.code, bqs.code)
    # codes: through the documented rule only
    ndiff = _compare_codes_via_rule(q, bq, x, R.to_numpy(qs.absmax), blocksize)
    if dist in ("normal", "student_t", "outliers"):
        assert ndiff <= 0.05 * n, f"{ndiff} of {n} codes differ from bnb's CPU LUT quantizer"
    # dequantization of the same codes, both libraries, the state's dtype
    for codes in (q, bq):
        ours = F.dequantize_blockwise(codes, qs)
        theirs = BF.dequantize_blockwise(codes, bqs)
        assert ours.dtype == theirs.dtype == TORCH_DTYPE[dtype]
        R.assert_bits_equal(R.bits_of(ours), R.bits_of(theirs), dtype, "dequant vs bnb")
    # absmax= path (float32 output)
    ours = F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=blocksize)
    theirs = BF.dequantize_blockwise(q, absmax=bqs.absmax, blocksize=blocksize)
    R.assert_bits_equal(R.bits_of(ours), R.bits_of(theirs), "float32", "dequant(absmax=) vs bnb")


def test_exact_zero_code_differs_from_bnb_cpu_as_documented():
    """NUMERICS §2.7: bnb's CPU LUT maps an exact 0.0 to code 131; the nearest code (ours, CUDA) is 127."""
    x = torch.tensor([0.0, 1.0, -1.0, 0.5] * 16)
    q, _ = F.quantize_blockwise(x, blocksize=64)
    bq, _ = BF.quantize_blockwise(x, blocksize=64)
    assert q[0].item() == 127 and q[1].item() == 255 and q[2].item() == 0
    assert bq[0].item() == 131        # documents the bnb CPU deviation this suite tolerates
    _compare_codes_via_rule(q, bq, x, np.float32([1.0]), 64)


@pytest.mark.parametrize("args", [("linear", (True,)), ("fp8", (True,)), ("dynamic", (False,)),
                                  ("normal", ())])
def test_cpu_against_bnb_nondefault_maps(args):
    name, a = args
    code = {"linear": F.create_linear_map, "fp8": F.create_fp8_map, "dynamic": F.create_dynamic_map,
            "normal": F.create_normal_map}[name](*a)
    rng = _rng("maps", name)
    x = torch.from_numpy(rng.standard_normal(64 * 40 + 17).astype(np.float32))
    if name == "dynamic":
        x = x.abs()
    q, qs = F.quantize_blockwise(x, code=code, blocksize=64)
    bq, bqs = BF.quantize_blockwise(x, code=code, blocksize=64)
    R.assert_bits_equal(R.bits_of(qs.absmax), R.bits_of(bqs.absmax), "float32", "absmax")
    ours = F.dequantize_blockwise(q, qs)
    theirs = BF.dequantize_blockwise(q, bqs)
    R.assert_bits_equal(R.bits_of(ours), R.bits_of(theirs), "float32", "dequant vs bnb")
    # bnb's LUT uses the sorted-midpoint rule; with duplicated values only the value must agree
    x32 = x.numpy()
    q_ref, _ = R.quantize_ref(x32, 64, code.numpy())
    R.assert_codes_equal(q.numpy(), q_ref, x32)
    _compare_codes_via_rule(q, bq, x, qs.absmax.numpy(), 64, code)


@pytest.mark.parametrize("dtype", R.DTYPE_NAMES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_cpu_nested_against_bnb(dtype, blocksize):
    rng = _rng("nested", dtype, blocksize)
    n = blocksize * 70 + 11
    x = R.make_input(rng.standard_normal(n) * 3, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize, nested=True)
    bq, bqs = BF.quantize_blockwise(x, blocksize=blocksize, nested=True)
    # the offset is torch's mean of bit-identical absmax values
    assert _bits_equal_tensor(qs.offset.reshape(1), bqs.offset.reshape(1))
    assert qs.state2.blocksize == bqs.state2.blocksize and qs.state2.dtype == bqs.state2.dtype
    assert _bits_equal_tensor(qs.state2.absmax, bqs.state2.absmax)
    assert _bits_equal_tensor(qs.state2.code, bqs.state2.code)
    assert qs.absmax.dtype == bqs.absmax.dtype == torch.uint8
    # first-level codes and nested absmax codes follow the rule
    _compare_codes_via_rule(q, bq, x, R.block_absmax(R.to_f32(x), blocksize), blocksize)
    centred = R.block_absmax(R.to_f32(x), blocksize) - np.float32(qs.offset.item())
    _compare_codes_via_rule(qs.absmax, bqs.absmax, torch.from_numpy(centred.astype(np.float32)),
                            qs.state2.absmax.numpy(), blocksize)
    # dequantizing the same state: bit-identical in both libraries (states are interchangeable)
    ours = F.dequantize_blockwise(q, qs)
    bnb_state = BF.QuantState(absmax=qs.absmax, code=qs.code, blocksize=blocksize, dtype=qs.dtype,
                              offset=qs.offset,
                              state2=BF.QuantState(absmax=qs.state2.absmax, code=qs.state2.code,
                                                   blocksize=blocksize, dtype=torch.float32))
    theirs = BF.dequantize_blockwise(q, bnb_state)
    R.assert_bits_equal(R.bits_of(ours), R.bits_of(theirs), dtype, "nested dequant vs bnb")
    ours_b = F.dequantize_blockwise(bq, bqs)     # our dequantizer on bnb's own state
    theirs_b = BF.dequantize_blockwise(bq, bqs)
    R.assert_bits_equal(R.bits_of(ours_b), R.bits_of(theirs_b), dtype, "dequant of bnb's nested state")


# --------------------------------------------------------------------------------------------------
# QuantState semantics
# --------------------------------------------------------------------------------------------------
def _state(**kw):
    base = dict(absmax=torch.tensor([1.0, 2.0, 3.0]), code=F.create_dynamic_map(), blocksize=64,
                dtype=torch.float32)
    base.update(kw)
    return F.QuantState(**base)


def test_quantstate_equality_semantics():
    a = _state()
    assert a == _state() and not (a != _state())
    assert a == _state(absmax=torch.tensor([1.0, 2.0, 3.0 + 5e-7]))          # allclose(atol=1e-6)
    assert a != _state(absmax=torch.tensor([1.0, 2.0, 3.1]))
    assert a != _state(blocksize=128)
    assert a != _state(dtype=torch.float16)
    assert a != _state(code=F.create_linear_map())
    assert a != _state(shape=torch.Size([3, 64]))
    assert a != _state(quant_type="nf4")
    assert (a == "not a state") is False and (a == None) is False  # noqa: E711
    s2 = _state()
    nested = _state(absmax=torch.tensor([1, 2, 3], dtype=torch.uint8), offset=torch.tensor(0.5), state2=s2)
    assert nested.nested and not a.nested
    assert nested != a and a != nested
    assert nested == _state(absmax=torch.tensor([1, 2, 3], dtype=torch.uint8), offset=torch.tensor(0.5),
                            state2=_state())
    assert nested != _state(absmax=torch.tensor([1, 2, 3], dtype=torch.uint8), offset=torch.tensor(0.25),
                            state2=_state())
    assert nested != _state(absmax=torch.tensor([1, 2, 3], dtype=torch.uint8), offset=torch.tensor(0.5),
                            state2=_state(blocksize=256))


def test_quantstate_legacy_indexing_like_bnb():
    x = torch.randn(1000)
    for nested in (False, True):
        _, qs = F.quantize_blockwise(x, blocksize=64, nested=nested)
        _, bqs = BF.quantize_blockwise(x, blocksize=64, nested=nested)
        for i in (1, 2, 3, 5):
            assert qs[i] == bqs[i]
        assert torch.equal(qs[0], qs.absmax)
        if nested:
            assert qs[4][0] is qs.offset and qs[4][1] is qs.state2
        else:
            assert qs[4] is None and bqs[4] is None


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", R.DTYPE_NAMES)
def test_quantstate_as_dict_like_bnb(nested, dtype):
    x = R.make_input(_rng("as_dict", nested, dtype).standard_normal(64 * 9 + 3), dtype)
    _, qs = F.quantize_blockwise(x, blocksize=64, nested=nested)
    _, bqs = BF.quantize_blockwise(x, blocksize=64, nested=nested)
    d, bd = qs.as_dict(), bqs.as_dict()
    assert list(d) == list(bd)
    for k in d:
        if isinstance(bd[k], torch.Tensor):
            assert isinstance(d[k], torch.Tensor) and d[k].dtype == bd[k].dtype and d[k].shape == bd[k].shape
        else:
            assert d[k] == bd[k] and type(d[k]) is type(bd[k]), k
    # packed=True without quant_type returns the unpacked dict (bnb behaviour)
    assert list(qs.as_dict(packed=True)) == list(bd)
    if not nested:
        # states cross over: bnb's dict into our QuantState and back
        assert F.QuantState.from_dict(dict(bd), torch.device("cpu")) == qs
        assert BF.QuantState.from_dict(dict(d), torch.device("cpu")) == bqs


def test_quantstate_from_dict_errors_like_bnb():
    with pytest.raises(ValueError):
        BF.QuantState.from_dict({"absmax": torch.ones(2)}, "cpu")
    with pytest.raises(ValueError):
        F.QuantState.from_dict({"absmax": torch.ones(2)}, "cpu")


# --------------------------------------------------------------------------------------------------
# CUDA: bit-identical to bnb's CUDA kernels
# --------------------------------------------------------------------------------------------------
CUDA_DISTS = ("normal", "student_t", "outliers", "zero_blocks", "nan", "inf", "denormal", "tiny", "huge")


def _cuda_compare(x, blocksize, code=None, nested=False):
    q, qs = F.quantize_blockwise(x, code=code, blocksize=blocksize, nested=nested)
    bq, bqs = BF.quantize_blockwise(x, code=code, blocksize=blocksize, nested=nested)
    torch.cuda.synchronize()
    assert q.device == x.device and q.shape == bq.shape and q.dtype == torch.uint8
    R.assert_codes_equal(q.cpu().numpy(), bq.cpu().numpy(), R.to_f32(x), what="codes vs bnb CUDA")
    if nested:
        R.assert_codes_equal(qs.absmax.cpu().numpy(), bqs.absmax.cpu().numpy(), what="nested codes")
        R.assert_bits_equal(R.bits_of(qs.offset.reshape(1)), R.bits_of(bqs.offset.reshape(1)), "float32")
        R.assert_bits_equal(R.bits_of(qs.state2.absmax), R.bits_of(bqs.state2.absmax), "float32",
                            "nested absmax2 vs bnb CUDA")
    else:
        R.assert_bits_equal(R.bits_of(qs.absmax), R.bits_of(bqs.absmax), "float32", "absmax vs bnb CUDA")
    y = F.dequantize_blockwise(q, qs)
    by = BF.dequantize_blockwise(bq, bqs)
    assert y.dtype == by.dtype and y.device == x.device
    R.assert_bits_equal(R.bits_of(y), R.bits_of(by), R.dtype_name(y), "dequant vs bnb CUDA")
    return q, qs


@pytest.mark.cuda
@pytest.mark.parametrize("dist,dtype,blocksize", _grid(CUDA_DISTS, R.DTYPE_NAMES, BLOCKSIZES_CUDA))
def test_cuda_bit_identical_to_bnb(dist, dtype, blocksize):
    rng = _rng("cuda", dist, dtype, blocksize)
    n = 50 * blocksize + int(rng.integers(1, blocksize))          # partial last block
    x = R.make_input(R.make_values(dist, n, rng, blocksize), dtype, "torch", "cuda")
    _cuda_compare(x, blocksize)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", R.DTYPE_NAMES)
@pytest.mark.parametrize("n", [1, 63, 64, 65, 4095, 4097, 1 << 20])
def test_cuda_lengths_bit_identical_to_bnb(dtype, n):
    x = R.make_input(_rng("cuda_len", dtype, n).standard_normal(n), dtype, "torch", "cuda")
    for bs in (64, 4096):
        _cuda_compare(x, bs)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", R.DTYPE_NAMES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
def test_cuda_edge_cases_bit_identical_to_bnb(dtype, blocksize):
    bs = blocksize
    v = _rng("cuda_edge", dtype, bs).standard_normal(6 * bs + bs // 2)
    v[:bs] = 0.0                                       # zero block
    v[bs + 3] = np.nan                                 # NaN in an ordinary block
    v[2 * bs:3 * bs] = np.nan                          # all-NaN full block
    v[3 * bs + 1], v[3 * bs + 2] = np.inf, -np.inf     # inf block
    v[4 * bs:5 * bs] = 2.0 ** -130                     # denormal block (bfloat16/float32)
    v[6 * bs:] = np.nan                                # all-NaN partial last block
    x = R.make_input(v, dtype, "torch", "cuda")
    q, qs = _cuda_compare(x, bs)
    qn = q.cpu().numpy()
    assert np.all(qn[:bs] == 0) and qn[bs + 3] == 0 and np.all(qn[2 * bs:3 * bs] == 0)
    assert np.all(qn[6 * bs:] == 0)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 1024])
@pytest.mark.parametrize("dtype", R.DTYPE_NAMES)
def test_cuda_nested_bit_identical_to_bnb(dtype, blocksize):
    x = R.make_input(_rng("cuda_nested", dtype, blocksize).standard_normal(blocksize * 300 + 5), dtype,
                     "torch", "cuda")
    _cuda_compare(x, blocksize, nested=True)


@pytest.mark.cuda
@pytest.mark.parametrize("map_name", ["linear", "fp8", "unsigned", "fp4_padded"])
def test_cuda_nondefault_maps_bit_identical_to_bnb(map_name):
    code = {"linear": lambda: F.create_linear_map(True), "fp8": lambda: F.create_fp8_map(True),
            "unsigned": lambda: F.create_dynamic_map(False),
            "fp4_padded": lambda: F.create_fp8_map(True, 2, 1, 4)}[map_name]()
    x = R.make_input(_rng("cuda_maps", map_name).standard_normal(64 * 200 + 9), "float32", "torch", "cuda")
    _cuda_compare(x, 64, code=code.cuda())
    _cuda_compare(x, 256, code=code)
