"""Generated valid inputs for the public ops and modules (hypothesis, CPU): every result must match the
NumPy models of tests/reference.py (or a float64 reference where the op is a product), whatever the
framework, layout (non-contiguous, lazily negated torch views, caller-provided disjoint slices of one
buffer as out=/absmax=) and values (NaN, ±inf, denormals, huge). 8-bit blockwise quantization has its
own property suite (tests/test_blockwise_fuzz.py); here it is fuzzed through the argument layer."""
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from fuzz_support import snapshot

import bnbcy
import bnbcy.functional as F

FUZZ = settings(max_examples=15, deadline=None, print_blob=True, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
DISTS = ["normal", "student_t", "outliers", "zero_blocks", "nan", "inf", "denormal", "tiny", "huge"]


@st.composite
def arrays(draw, max_n=3000, dtypes=R.DTYPE_NAMES, finite=False, min_n=1, even=False, dists=tuple(DISTS)):
    """(array, float64 values) of a drawn dtype, framework, shape, layout and value distribution."""
    dtype = draw(st.sampled_from(dtypes))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(["torch", "numpy"]))
    n = draw(st.integers(min_n, max_n))
    if even:
        n += n % 2
    dists = [d for d in dists if R.supports(d, dtype) and not (finite and d in ("nan", "inf"))]
    dist = draw(st.sampled_from(dists))
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    v = R.make_values(dist, n, rng)
    layout = draw(st.sampled_from(["flat", "2d", "transposed", "negated"] if kind == "torch"
                                  else ["flat", "2d", "transposed"]))
    rows = next((r for r in (8, 4, 2) if n % r == 0), 1)
    if layout == "negated":
        x = torch._neg_view(R.make_input(-v, dtype, kind))  # a lazily negated view holding v
    else:
        x = R.make_input(v, dtype, kind)
        if layout in ("2d", "transposed"):
            x = x.reshape(rows, n // rows)
            if layout == "transposed":
                x = x.T if kind == "numpy" else x.t()
    logical = x.resolve_neg() if kind == "torch" else x
    return x, np.ascontiguousarray(R.to_f32(logical)).ravel()


@FUZZ
@given(data=arrays(), blocksize=st.sampled_from([64, 256, 4096, 100, 1]))
def test_fuzz_blockwise_through_every_layout(data, blocksize):
    x, x32 = data
    before = snapshot(x)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    assert snapshot(x) == before
    q_ref, absmax_ref = R.quantize_ref(x32.ravel(), blocksize)
    R.assert_codes_equal(R.to_numpy(q).ravel(), q_ref.ravel(), x32.ravel(), absmax_ref, blocksize)
    R.assert_bits_equal(R.bits_of(qs.absmax), absmax_ref.view(np.uint32), "float32", "absmax")


@FUZZ
@given(n=st.integers(1, 4000), gap=st.integers(0, 64), order=st.booleans(), dtype=st.sampled_from(R.DTYPE_NAMES))
def test_fuzz_disjoint_slices_of_one_buffer_are_accepted(n, gap, order, dtype):
    """out= and absmax= carved from one buffer without overlap work (only real overlap is refused)."""
    x = R.make_input(np.random.default_rng(n).standard_normal(n), dtype)
    nb = R.nblocks(n, 64)
    buf = torch.empty(n + 4 * nb + gap + 8, dtype=torch.uint8)
    if order:
        out, am_at = buf[:n], n + gap
    else:
        out, am_at = buf[4 * nb + gap:4 * nb + gap + n], 0
    am_at += (-(buf.data_ptr() + am_at)) % 4   # float32 alignment
    absmax = buf[am_at:am_at + 4 * nb].view(torch.float32)
    if am_at < out.data_ptr() - buf.data_ptr() + n and out.data_ptr() - buf.data_ptr() < am_at + 4 * nb:
        return  # alignment pushed them together: that case is test_bad_input's
    F.quantize_blockwise(x, out=out, absmax=absmax, blocksize=64)
    q_ref, absmax_ref = R.quantize_ref(x, 64)
    R.assert_codes_equal(out.numpy(), q_ref)
    np.testing.assert_array_equal(absmax.numpy(), absmax_ref)


@FUZZ
@given(data=arrays(even=True), blocksize=st.sampled_from([32, 64, 128, 4096]),
       quant_type=st.sampled_from(["nf4", "fp4"]), nested=st.booleans(),
       storage=st.sampled_from([torch.uint8, torch.float32, torch.bfloat16]))
def test_fuzz_4bit_roundtrip_matches_reference(data, blocksize, quant_type, nested, storage):
    x, x32 = data
    n = x32.size
    if (n // 2) % (torch.finfo(storage).bits // 8 if storage.is_floating_point else 1) \
            or (storage == torch.bfloat16 and R.kind_of(x) == "numpy"):  # NumPy bfloat16 needs ml_dtypes
        storage = torch.uint8
    if nested:
        x32 = np.nan_to_num(x32, nan=0.0, posinf=1.0, neginf=-1.0)  # keep the absmax mean finite
        x = R.make_input(x32, "float32", R.kind_of(x))
    before = snapshot(x)
    p, ps = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested,
                            quant_storage=storage)
    assert snapshot(x) == before
    codes_ref, absmax_ref = R.quantize4_ref(x32.ravel(), blocksize, quant_type)
    packed = p.view(torch.uint8).numpy().ravel() \
        if R.kind_of(p) == "torch" else p.view(np.uint8).ravel()
    np.testing.assert_array_equal(packed, R.pack4(codes_ref))
    if nested:
        absmax_used = R.nested_absmax_ref(R.to_numpy(ps.absmax), R.to_numpy(ps.state2.absmax),
                                          float(ps.offset), 256)
    else:
        absmax_used = absmax_ref
        np.testing.assert_array_equal(R.to_numpy(ps.absmax), absmax_ref)
    y = F.dequantize_4bit(p, ps)
    assert tuple(y.shape) == tuple(x.shape) and R.dtype_name(y) == R.dtype_name(x)
    want = R.dequantize4_f32(codes_ref[:n], absmax_used, blocksize, quant_type)
    R.assert_bits_equal(R.bits_of(y).ravel() if R.kind_of(y) == "numpy" else R.bits_of(y.contiguous()).ravel(),
                        R.f32_to_dtype_bits(want, R.dtype_name(x)).ravel()
                        if R.dtype_name(x) != "float32" else want.view(np.uint32), R.dtype_name(x),
                        "dequantized")


@FUZZ
@given(M=st.integers(1, 20), N=st.integers(1, 48), k32=st.integers(1, 4), quant_type=st.sampled_from(["nf4", "fp4"]),
       dtype=st.sampled_from(R.DTYPE_NAMES), nested=st.booleans(), bias=st.booleans(), seed=st.integers(0, 2 ** 31))
def test_fuzz_gemm_4bit_matches_float64(M, N, k32, quant_type, dtype, nested, bias, seed):
    K = 32 * k32
    rng = np.random.default_rng(seed)
    W = torch.from_numpy(rng.standard_normal((N, K)).astype(np.float32)).to(getattr(torch, dtype))
    A = torch.from_numpy(rng.standard_normal((M, K)).astype(np.float32)).to(getattr(torch, dtype))
    b = torch.from_numpy(rng.standard_normal(N).astype(np.float32)).to(A.dtype) if bias else None
    p, ps = F.quantize_4bit(W, quant_type=quant_type, compress_statistics=nested)
    Wd = F.dequantize_4bit(p, ps).double()
    ref = A.double() @ Wd.T + (b.double() if bias else 0)
    y = F.gemm_4bit(A, p.t(), ps, bias=b)
    tol = {"float32": 1e-4, "float16": 2e-2, "bfloat16": 1e-1}[dtype]
    scale = (A.double().abs() @ Wd.abs().T).max().item() + 1
    assert (y.double() - ref).abs().max().item() <= tol * scale


@FUZZ
@given(data=arrays(max_n=2000, finite=True, min_n=2, dists=[d for d in DISTS if d != "denormal"]), threshold=st.sampled_from([0.0, 0.0, 1.5, 3.0]))
def test_fuzz_int8_vectorwise_quant_matches_float64(data, threshold):
    """(Float32 denormals are flushed as CUDA does; tests/test_int8.py covers them.)"""
    x, x32 = data
    rows = next(r for r in (8, 4, 2, 1) if x32.size % r == 0)
    x = x.reshape(rows, -1) if R.kind_of(x) == "torch" else x.reshape(rows, -1)
    a = x32.reshape(rows, -1).astype(np.float64)
    before = snapshot(x)
    CA, rs, outl = F.int8_vectorwise_quant(x, threshold=threshold)
    assert snapshot(x) == before
    CA, rs = R.to_numpy(CA).astype(np.int64), R.to_numpy(rs).astype(np.float64)
    keep = np.ones_like(a, bool) if threshold == 0 else np.abs(x32.reshape(rows, -1)) < np.float32(threshold)
    rs_ref = np.where(keep, np.abs(a), 0).max(axis=1)
    np.testing.assert_allclose(rs, rs_ref, rtol=1e-6, atol=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.rint(a * 127 / rs_ref[:, None])
    ok = keep & np.isfinite(want) & (rs_ref[:, None] > 0)
    if threshold > 0:
        cols = np.nonzero((~keep).any(axis=0))[0]
        np.testing.assert_array_equal(np.sort(R.to_numpy(outl)), cols)
        if rows > 1:  # whole outlier columns are written as 0
            assert (CA[:, cols] == 0).all()
            ok[:, cols] = False
    assert np.abs(CA[ok] - want[ok]).max(initial=0) <= 1   # float32 rounding of the product


@FUZZ
@given(M=st.integers(1, 24), N=st.integers(1, 24), K=st.integers(1, 64), seed=st.integers(0, 2 ** 31),
       kind=st.sampled_from(["torch", "numpy"]))
def test_fuzz_int8_linear_matmul_and_dequant_exact(M, N, K, seed, kind):
    rng = np.random.default_rng(seed)
    A = rng.integers(-127, 128, (M, K), dtype=np.int8)
    B = rng.integers(-127, 128, (N, K), dtype=np.int8)
    At, Bt = (torch.from_numpy(A), torch.from_numpy(B)) if kind == "torch" else (A, B)
    C = F.int8_linear_matmul(At, Bt)
    np.testing.assert_array_equal(R.to_numpy(C), A.astype(np.int64) @ B.astype(np.int64).T)
    rs = rng.uniform(0.1, 10, M).astype(np.float32)
    cs = rng.uniform(0.1, 10, N).astype(np.float32)
    rst, cst = (torch.from_numpy(rs), torch.from_numpy(cs)) if kind == "torch" else (rs, cs)
    y = F.int8_mm_dequant(C, rst, cst, dtype=torch.float32)
    ref = R.to_numpy(C).astype(np.float64) * rs[:, None] * cs[None, :] / 127 ** 2
    np.testing.assert_allclose(R.to_numpy(y).astype(np.float64), ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(inf=st.sampled_from([32, 64, 96]), outf=st.integers(1, 40), quant_type=st.sampled_from(["nf4", "fp4"]),
       nested=st.booleans(), bias=st.booleans(), rows=st.integers(1, 5), seed=st.integers(0, 2 ** 31))
def test_fuzz_linear4bit_module_and_state_dict(inf, outf, quant_type, nested, bias, rows, seed):
    torch.manual_seed(seed)
    m = bnbcy.nn.Linear4bit(inf, outf, bias=bias, quant_type=quant_type, compress_statistics=nested,
                            compute_dtype=torch.float32).to("cpu")
    x = torch.randn(rows, inf)
    W = F.dequantize_4bit(m.weight.data, m.weight.quant_state).double()
    ref = x.double() @ W.T + (m.bias.double() if bias else 0)
    y = m(x)
    assert (y.double() - ref).abs().max().item() <= 1e-4 * (ref.abs().max().item() + 1)
    fresh = bnbcy.nn.Linear4bit(inf, outf, bias=bias, quant_type=quant_type, compress_statistics=nested,
                                compute_dtype=torch.float32)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)


@settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(inf=st.integers(1, 48), outf=st.integers(1, 40), bias=st.booleans(), rows=st.integers(1, 5),
       seed=st.integers(0, 2 ** 31))
def test_fuzz_linear8bitlt_module_and_state_dict(inf, outf, bias, rows, seed):
    torch.manual_seed(seed)
    m = bnbcy.nn.Linear8bitLt(inf, outf, bias=bias, has_fp16_weights=False).to("cpu")
    x = torch.randn(rows, inf)
    Wd = m.weight.data.double() * m.weight.SCB.double()[:, None] / 127
    ref = x.double() @ Wd.T + (m.bias.double() if bias else 0)
    y = m(x)
    # the int8 product quantizes x per row too: the error is that of two 8-bit roundings
    bound = 2.5 / 127 * (x.double().abs() @ Wd.abs().T).max().item() + 1e-6
    assert (y.double() - ref).abs().max().item() <= bound
    fresh = bnbcy.nn.Linear8bitLt(inf, outf, bias=bias, has_fp16_weights=False)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(x), y)
