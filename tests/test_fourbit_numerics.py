"""4-bit NF4/FP4 quantization on the CPU against the NumPy model of NUMERICS.md §3 (tests/reference.py)
and against the installed bitsandbytes 0.50.2.

CPU contract: absmax bit-identical; codes EQUAL the model run with IEEE float32 arithmetic
(r = fl32(1/m), xn = fl32(x*r), NF4 midpoint count, FP4 literal tree, sign of xn < 0); packing high
nibble first with the odd tail padded by the code of 0*r; dequantization bit-identical to
T(fl32(table[c]*absmax)) with the CUDA tables (FP4 code 8 -> -0.0).
bitsandbytes' CPU backend: NF4 equal in everything; FP4 differs only in the sign of codes of |xn| <
0.0026 and at inputs exactly on a threshold (its rule is a midpoint search, NUMERICS §11.3).
"""
import numpy as np
import pytest
import torch

import reference as R
import bnbcy.functional as F
from test_blockwise_numerics import use_cpu_isa

TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
POISON = 0xAB


@pytest.fixture(params=["avx512", "scalar"])
def cpu_path(request, monkeypatch):
    use_cpu_isa(request.param, monkeypatch)
    return request.param


def _input(n, dtype, seed, kind="normal"):
    g = np.random.default_rng(seed)
    x = g.standard_normal(n).astype(np.float32) * np.float32(g.uniform(0.01, 30))
    if kind == "edge":
        # zero runs, NaN, inf, denormals, exact table points, tiny values around FP4's zero threshold
        x[: min(n, 70)] = 0.0
        idx = g.choice(n, size=max(1, n // 50), replace=False)
        x[idx] = g.choice(np.array([np.nan, 1e-40, -1e-40, -0.0, 0.0026, -0.0026], dtype=np.float32), idx.size)
        if n > 300:
            x[200] = np.inf
            x[300:310] = R.NF4[3:13] * x[299]
    return torch.from_numpy(x).to(TORCH_DTYPE[dtype])


def _quantize(A, bs, qt, **kw):
    n = A.numel()
    out = torch.full((((n + 1) // 2), 1), POISON, dtype=torch.uint8)
    absmax = torch.full((-(-n // bs),), float("nan"))
    q, st = F.quantize_4bit(A, absmax=absmax, out=out, blocksize=bs, quant_type=qt, **kw)
    assert q is out and (st.absmax is absmax or kw.get("compress_statistics"))
    return q, st, absmax


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bs", BLOCKSIZES)
@pytest.mark.parametrize("n", [1, 7, 64, 1001, 12289])
def test_codes_absmax_dequant_match_model(cpu_path, qt, dtype, bs, n):
    A = _input(n, dtype, seed=hash((qt, dtype, bs, n)) % 2**32, kind="edge" if n > 100 else "normal")
    q, st, absmax = _quantize(A, bs, qt)
    codes, am_ref = R.quantize4_ref(A, bs, qt)
    np.testing.assert_array_equal(absmax.numpy().view(np.uint32), am_ref.view(np.uint32))
    R.assert_codes_equal(R.unpack4(q.numpy(), n + n % 2), codes, x=R.to_f32(A), absmax=am_ref, blocksize=bs)
    assert q.shape == ((n + 1) // 2, 1)
    y = F.dequantize_4bit(q, st)
    assert y.shape == A.shape and y.dtype == A.dtype
    R.assert_bits_equal(R.bits_of(y), R.f32_to_dtype_bits(R.dequantize4_f32(codes[:n], am_ref, bs, qt), dtype),
                        dtype, "dequantized")


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
def test_isa_paths_agree(qt, monkeypatch):
    A = _input(50_001, "bfloat16", 5, "edge")
    got = {}
    for isa in ("avx512", "avx2", "scalar"):
        monkeypatch.setenv("BNBCY_CPU_ISA", isa)
        q, st = F.quantize_4bit(A, blocksize=128, quant_type=qt)
        got[isa] = (q.clone(), st.absmax.clone(), F.dequantize_4bit(q, st).view(torch.int16).clone())
    for isa in ("avx2", "scalar"):
        for a, b in zip(got["avx512"], got[isa]):
            assert torch.equal(a, b), isa


def test_odd_tail_padding_nibble():
    # NF4's code of 0.0 is 0111, FP4's 0000; an all-zero block takes the NaN path (codes 0)
    for qt, pad in (("nf4", 7), ("fp4", 0)):
        q, _ = F.quantize_4bit(torch.tensor([0.5, -1.0, 0.25]), quant_type=qt)
        assert int(q[-1, 0]) & 15 == pad
        q, st = F.quantize_4bit(torch.zeros(5), quant_type=qt)
        assert q.view(-1).tolist() == [0, 0, 0] and st.absmax.tolist() == [0.0]


def test_fp4_sign_of_zero_and_literal_threshold():
    # -tiny -> code 8 (CUDA sign rule), fl32(7/12) -> 010 (literal 0.583333 threshold, not the midpoint)
    A = torch.tensor([1.0, -1e-4, 1e-4, float(np.float32(7 / 12))])
    q, st = F.quantize_4bit(A, quant_type="fp4", blocksize=64)
    codes = R.unpack4(q.numpy(), 4)
    assert codes.tolist() == [0b0011, 0b1000, 0b0000, 0b0010]
    y = F.dequantize_4bit(q, st)
    assert np.signbit(y[1].item()) and not np.signbit(y[2].item())


@pytest.mark.parametrize("storage", [torch.uint8, torch.int8, torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("nested", [False, True])
def test_quant_storage_views_same_bytes(storage, nested):
    A = _input(96 * 300, "bfloat16", 11).reshape(96, 300)
    q8, st8 = F.quantize_4bit(A, quant_type="nf4", compress_statistics=nested)
    q, st = F.quantize_4bit(A, quant_type="nf4", compress_statistics=nested, quant_storage=storage)
    itemsize = torch.empty(0, dtype=storage).element_size()
    assert q.dtype == storage and q.shape == (96 * 300 // 2 // itemsize, 1)
    assert torch.equal(q.view(torch.uint8).view(-1), q8.view(-1))
    assert torch.equal(F.dequantize_4bit(q, st), F.dequantize_4bit(q8, st8))
    assert torch.equal(F.dequantize_4bit(q.t(), st), F.dequantize_4bit(q8, st8).t())  # bnb's BC shim


def test_nested_statistics_match_model():
    A = _input(64 * 1000 + 10, "float32", 3)
    q, st = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
    _, am = R.quantize4_ref(A, 64, "nf4")
    offset = R.torch_mean_f32(am)
    qabs, absmax2 = R.quantize_ref((am - offset).astype(np.float32), 256)
    assert st.nested and st.state2.blocksize == 256 and st.absmax.dtype == torch.uint8
    np.testing.assert_array_equal(st.absmax.numpy(), qabs)
    np.testing.assert_array_equal(st.state2.absmax.numpy().view(np.uint32), absmax2.view(np.uint32))
    assert np.float32(st.offset.item()) == R.torch_mean_f32(am)
    # dequantization uses absmax_i = fl32(code[qabs]*absmax2) + offset
    am2 = R.nested_absmax_ref(st.absmax.numpy(), st.state2.absmax.numpy(), st.offset.item(), 256)
    codes, _ = R.quantize4_ref(A, 64, "nf4")
    want = R.dequantize4_f32(codes[: A.numel()], am2, 64, "nf4")
    R.assert_bits_equal(R.bits_of(F.dequantize_4bit(q, st)), R.f32_to_dtype_bits(want, "float32"), "float32")


def test_numpy_input_matches_torch():
    A = _input(4099, "float32", 9)
    qt, stt = F.quantize_4bit(A, quant_type="nf4", compress_statistics=True)
    qn, stn = F.quantize_4bit(A.numpy(), quant_type="nf4", compress_statistics=True)
    assert isinstance(qn, np.ndarray) and isinstance(stn.absmax, np.ndarray)
    np.testing.assert_array_equal(qn, qt.numpy())
    yn = F.dequantize_4bit(qn, stn)
    assert isinstance(yn, np.ndarray)
    np.testing.assert_array_equal(yn, F.dequantize_4bit(qt, stt).numpy())


def test_dequantize_without_state():
    A = _input(640, "float16", 2)
    q, st = F.quantize_4bit(A, blocksize=128, quant_type="fp4")
    out = torch.empty(640, dtype=torch.float16)
    y = F.dequantize_fp4(q, absmax=st.absmax, out=out, blocksize=128)
    assert y is out and torch.equal(y, F.dequantize_4bit(q, st))


def test_get_4bit_type_tables():
    assert F.get_4bit_type("nf4", "cpu").numpy().view(np.uint32).tolist() == R.NF4.view(np.uint32).tolist()
    assert F.get_4bit_type("fp4", "cpu").numpy().view(np.uint32).tolist() == R.FP4_CODE.view(np.uint32).tolist()
    i4 = F.get_4bit_type("int4", "cpu")
    assert i4.abs().max() == 1 and i4[0] == 1 and i4[-1] == -1
    assert F.get_4bit_type("af4", "cpu").numel() == 16
    with pytest.raises(NotImplementedError):
        F.get_4bit_type("af4", "cpu", blocksize=128)
    with pytest.raises(NotImplementedError):
        F.get_4bit_type("nf3", "cpu")


# ---------------------------------------------------------------------------------------------- bnb
bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a test dependency) is not installed")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("bs", [32, 64, 256, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_nf4_bit_identical_to_bitsandbytes(dtype, bs, nested):
    A = _input(3 * 4096 + 2, dtype, bs)
    q, st = F.quantize_4bit(A, blocksize=bs, quant_type="nf4", compress_statistics=nested)
    qb, sb = bnb_F.quantize_4bit(A, blocksize=bs, quant_type="nf4", compress_statistics=nested)
    assert torch.equal(q, qb) and q.shape == qb.shape
    assert torch.equal(st.absmax, sb.absmax)
    if nested:
        assert torch.equal(st.state2.absmax, sb.state2.absmax) and torch.equal(st.offset, sb.offset)
    # (bitsandbytes' CPU backend returns 1-D states as [1, n]; bnbcy keeps the state's shape)
    y = F.dequantize_4bit(q, st)
    assert y.shape == A.shape
    assert torch.equal(y, bnb_F.dequantize_4bit(qb, sb).reshape(A.shape))
    # each library dequantizes the other's output
    assert torch.equal(F.dequantize_4bit(qb, sb), bnb_F.dequantize_4bit(q, st).reshape(A.shape))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp4_differs_from_bitsandbytes_cpu_only_where_documented(dtype):
    A = _input(1 << 16, dtype, 21)
    q, st = F.quantize_4bit(A, blocksize=64, quant_type="fp4")
    qb, sb = bnb_F.quantize_4bit(A, blocksize=64, quant_type="fp4")
    assert torch.equal(st.absmax, sb.absmax)
    n = A.numel()
    c, cb = R.unpack4(q.numpy(), n), R.unpack4(qb.numpy(), n)
    xn = R.normalize(R.to_f32(A), st.absmax.numpy(), 64)
    bad = np.nonzero(c != cb)[0]
    zero_sign = ((c[bad] & 7) == 0) & ((cb[bad] & 7) == 0)
    on_threshold = np.isin(np.abs(xn[bad]), np.array(list(R._FP4_T.values())))
    near = ~zero_sign & ~on_threshold
    # the rest are 1-ulp reciprocal/division differences at a threshold: neighbouring magnitudes only
    assert zero_sign.sum() > 0 and near.sum() <= 0.001 * n
    y, yb = F.dequantize_4bit(q, st), bnb_F.dequantize_4bit(qb, sb).reshape(A.shape)
    same = (c == cb)
    assert torch.equal(y.view(-1)[torch.from_numpy(same)], yb.view(-1)[torch.from_numpy(same)])


def test_nf4_roundtrip_error_equals_bitsandbytes():
    A = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    err = (F.dequantize_nf4(*F.quantize_nf4(A)) - A).abs().mean().item()
    err_b = (bnb_F.dequantize_nf4(*bnb_F.quantize_nf4(A)) - A).abs().mean().item()
    assert err == err_b and 0.05 < err < 0.1


def test_quant_state_packed_dict_identical_to_bitsandbytes():
    A = _input(96 * 300, "float32", 4).reshape(96, 300)
    for nested in (False, True):
        _, st = F.quantize_4bit(A, quant_type="nf4", compress_statistics=nested)
        _, sb = bnb_F.quantize_4bit(A, quant_type="nf4", compress_statistics=nested)
        d, db = st.as_dict(packed=True), sb.as_dict(packed=True)
        assert list(d) == list(db)
        for k in d:
            assert d[k].dtype == db[k].dtype and d[k].shape == db[k].shape, k
            if nested and k == "absmax":
                # 8-bit codes of the absmax: bnb's CPU quantizer is a LUT approximation of the CUDA
                # search (NUMERICS §2.7); they may differ by one index, rarely
                diff = (d[k].int() - db[k].int()).abs()
                assert diff.max() <= 1 and (diff > 0).float().mean() < 0.05
            else:
                assert torch.equal(d[k], db[k]), k
        back = F.QuantState.from_dict(db, device="cpu")
        assert back.shape == st.shape and back.quant_type == "nf4" and back.nested == nested
        assert torch.equal(back.absmax, sb.absmax) and back.dtype == torch.float32
        back_b = bnb_F.QuantState.from_dict(d, device="cpu")
        assert torch.equal(back_b.absmax, st.absmax) and back_b.shape == sb.shape
