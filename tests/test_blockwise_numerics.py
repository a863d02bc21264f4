"""8-bit blockwise quantization: bnbcy against the NumPy reference model (tests/reference.py).

CPU contract (NUMERICS.md §2.2-§2.5, bnbcy's CPU kernel): codes EQUAL the literal §2.2 search run with
IEEE float32 NumPy arithmetic (r = fl32(1/m), xn = fl32(x*r)); absmax is bit-identical (NaN ignored,
float32-denormal |x| flushed to 0); dequantization is bit-identical to T(fl32(code[q]*absmax)).
NaN outputs compare equal to any NaN; everything else is compared bit for bit.

CUDA variants (``cuda`` marker) check the same on the GPU, allowing the one-index code differences that
CUDA's rcp.approx reciprocal can cause (see ``reference.codes_with_reciprocal_slack``).
"""
import numpy as np
import pytest
import torch

import reference as R
import bnbcy.functional as F
from bnbcy import _C

try:
    import cupy
except Exception:  # pragma: no cover
    cupy = None

BLOCKSIZES_CUDA = (64, 128, 256, 512, 1024, 2048, 4096)
BLOCKSIZES_CPU = BLOCKSIZES_CUDA + (100, 333, 1, 7)
DTYPES = R.DTYPE_NAMES
TORCH_DTYPE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POISON = 0xAB


def use_cpu_isa(isa, monkeypatch):
    """Select a CPU kernel path (bnbcy reads BNBCY_CPU_ISA on every call); skip where the CPU lacks it."""
    monkeypatch.setenv("BNBCY_CPU_ISA", isa)
    if _C.cpu_isa() != isa:
        pytest.skip(f"this CPU has no {isa} (hardware)")


@pytest.fixture(params=["avx512", "avx2", "scalar"])
def cpu_path(request, monkeypatch):
    """Run every CPU kernel path: AVX-512, AVX2 and the portable scalar one."""
    use_cpu_isa(request.param, monkeypatch)
    return request.param


def _rng(*parts):
    return np.random.default_rng(R.seed_of(*parts))


def _n_for(blocksize, rng):
    """A length with a partial last block: 2-3 full blocks plus a random remainder (>= 1)."""
    full = 2 if blocksize >= 1024 else 3
    return full * blocksize + int(rng.integers(1, max(2, blocksize)))


def _poisoned_like(x, dtype_name, shape=None):
    """An output buffer of x's kind/device filled with 0xAB bytes."""
    shape = tuple(x.shape) if shape is None else shape
    k = R.kind_of(x)
    if k == "torch":
        buf = torch.empty(shape, dtype=TORCH_DTYPE.get(dtype_name, torch.uint8), device=x.device)
        buf.view(torch.uint8).fill_(POISON)
        return buf
    mod = np if k == "numpy" else cupy
    buf = mod.empty(shape, dtype=dtype_name)
    buf.view(np.uint8).fill(POISON)
    return buf


def check_quantize(x, q, qs, blocksize, code=None, *, exact=True):
    """Shape/dtype/kind checks plus codes == reference and absmax bit-identical.

    Returns (x32 flat, reference codes flat, reference absmax)."""
    kind = R.kind_of(x)
    assert R.kind_of(q) == kind, f"q is {R.kind_of(q)}, input is {kind}"
    assert tuple(q.shape) == tuple(x.shape)
    assert R.dtype_name(q) == "uint8"
    n = int(np.prod(x.shape))
    nb = R.nblocks(n, blocksize)
    assert R.kind_of(qs.absmax) == kind, f"absmax is {R.kind_of(qs.absmax)}, input is {kind}"
    assert tuple(qs.absmax.shape) == (nb,)
    assert R.dtype_name(qs.absmax) == "float32"
    assert qs.blocksize == blocksize
    assert R.dtype_name(qs.dtype) == R.dtype_name(x)
    if kind == "torch":
        assert isinstance(qs.dtype, torch.dtype)
        assert q.device == x.device and qs.absmax.device == x.device
    else:
        assert not isinstance(qs.dtype, torch.dtype)
        assert np.dtype(qs.dtype) == np.dtype(x.dtype)
    if kind == "cupy":
        assert q.device.id == x.device.id and qs.absmax.device.id == x.device.id
    code_np = R.DYNAMIC_SIGNED if code is None else R.to_f32(code)
    assert R.dtype_name(qs.code) == "float32" and tuple(qs.code.shape) == (256,)
    np.testing.assert_array_equal(R.bits_of(qs.code), code_np.view(np.uint32), err_msg="QuantState.code")
    x32 = R.to_f32(x).ravel()
    q_ref, absmax_ref = R.quantize_ref(x32, blocksize, code_np)
    R.assert_bits_equal(R.bits_of(qs.absmax), absmax_ref.view(np.uint32), "float32", "absmax")
    got = R.to_numpy(q).ravel()
    if exact:
        R.assert_codes_equal(got, q_ref, x32, absmax_ref, blocksize)
    return x32, q_ref, absmax_ref


def check_dequantize(y, q, absmax, blocksize, out_dtype, code=None, like=None):
    """y bit-identical to T(fl32(code[q]*absmax)); y of q's kind/shape/dtype."""
    like = q if like is None else like
    assert R.kind_of(y) == R.kind_of(like)
    assert tuple(y.shape) == tuple(q.shape)
    assert R.dtype_name(y) == out_dtype
    code_np = R.DYNAMIC_SIGNED if code is None else R.to_f32(code)
    exp = R.dequantize_ref_bits(R.to_numpy(q), R.to_numpy(absmax), blocksize, out_dtype, code_np)
    R.assert_bits_equal(R.bits_of(y).ravel(), exp, out_dtype, "dequantized")


def check_error_bound(x32, y, absmax, blocksize, out_dtype, code=None):
    code_np = R.DYNAMIC_SIGNED if code is None else R.to_f32(code)
    x64 = x32.astype(np.float64)
    y64 = R.bits_to_f64(R.bits_of(y).ravel(), out_dtype)
    bound, ok = R.roundtrip_error_bound(x64, absmax, blocksize, out_dtype, code_np)
    with np.errstate(invalid="ignore"):
        err = np.abs(y64 - x64)
    bad = np.nonzero(ok & ~(err <= bound))[0]
    assert bad.size == 0, (f"{bad.size} elements exceed the error bound; first {bad[:5].tolist()}: "
                           f"x={x64[bad[:5]].tolist()} y={y64[bad[:5]].tolist()} "
                           f"bound={bound[bad[:5]].tolist()}")
    # the coarse map-wide bound of the brief: |err| <= (maxgap/2 + slack) * absmax
    m = R.expand(np.asarray(absmax, np.float64), x64.size, blocksize)
    coarse = (R.max_gap_bound(code_np) + 2.0 ** -20) * m \
        + m * (2.0 ** -24 + R.UNIT_ROUNDOFF[out_dtype]) * 1.0001 + R.HALF_MIN_SUBNORMAL[out_dtype] \
        + R.FTZ_SLACK
    assert np.all(err[ok] <= coarse[ok])
    return int(ok.sum())


# --------------------------------------------------------------------------------------------------
# maps and the reference model itself
# --------------------------------------------------------------------------------------------------
def test_dynamic_maps_equal_embedded_tables():
    for signed, table in ((True, R.DYNAMIC_SIGNED), (False, R.DYNAMIC_UNSIGNED)):
        m = F.create_dynamic_map(signed=signed)
        assert isinstance(m, torch.Tensor) and m.dtype == torch.float32 and tuple(m.shape) == (256,)
        np.testing.assert_array_equal(m.view(torch.int32).numpy(), table.view(np.int32))
    assert F.create_dynamic_map()[127].item() == 0.0 and F.create_dynamic_map()[255].item() == 1.0


def _probes(code):
    c = code.astype(np.float32)
    mids = ((c[:-1] + c[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    base = np.concatenate([c, mids, np.float32([0.0, -0.0, 1.0, -1.0, 1.5, -1.5, 2.0, -2.0, 1e-30,
                                                -1e-30, np.inf, -np.inf, np.nan, 1e-40, -1e-40])])
    ups = np.nextafter(base, np.float32(np.inf)).astype(np.float32)
    downs = np.nextafter(base, np.float32(-np.inf)).astype(np.float32)
    rnd = np.random.default_rng(7).uniform(-1.05, 1.05, 20000).astype(np.float32)
    return np.concatenate([base, ups, downs, rnd])


@pytest.mark.parametrize("which", ["signed", "unsigned"])
def test_reference_literal_search_equals_closed_form(which):
    """Self-check of the model: literal search == closed form on every code, midpoint and neighbour."""
    code = R.DYNAMIC_SIGNED if which == "signed" else R.DYNAMIC_UNSIGNED
    p = _probes(code)
    np.testing.assert_array_equal(R.search_literal(code, p), R.search_closed_form(code, p))
    # exact ties go to the even index (§2.2)
    mids = ((code[:-1] + code[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    q = R.search_literal(code, mids).astype(int)
    assert np.all(q % 2 == 0) and np.all((q == np.arange(255)) | (q == np.arange(1, 256)))
    # and the chosen code is nearest in float64 wherever xn is not within 1e-6 of a midpoint
    fin = p[np.isfinite(p)]
    near_tie = np.min(np.abs(fin[:, None].astype(np.float64) - mids[None, :]), axis=1) < 1e-6
    qv = code[R.search_literal(code, fin).astype(int)].astype(np.float64)
    ideal = R.nearest_f64(code, fin.astype(np.float64))
    assert np.all((np.abs(qv - fin) == np.abs(ideal - fin))[~near_tie])


# --------------------------------------------------------------------------------------------------
# the main grid: distributions x dtypes x blocksizes (CPU)
# --------------------------------------------------------------------------------------------------
def _grid(dists, dtypes, blocksizes):
    """(dist, dtype, blocksize) combinations, without values a dtype cannot hold (fp16 vs 1e±30)."""
    return [(d, t, b) for d in dists for t in dtypes for b in blocksizes if R.supports(d, t)]


@pytest.mark.parametrize("dist,dtype,blocksize", _grid(R.DISTRIBUTIONS, DTYPES, BLOCKSIZES_CPU))
def test_quantize_dequantize_matches_reference(dist, dtype, blocksize, cpu_path):
    rng = _rng("grid", dist, dtype, blocksize)
    n = _n_for(blocksize, rng) if blocksize >= 64 else int(rng.integers(200, 600))
    x = R.make_input(R.make_values(dist, n, rng, blocksize), dtype)
    x_before = R.bits_of(x)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    np.testing.assert_array_equal(R.bits_of(x), x_before, err_msg="input was modified")
    x32, q_ref, absmax_ref = check_quantize(x, q, qs, blocksize)
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, absmax_ref, blocksize, dtype)
    checked = check_error_bound(x32, y, absmax_ref, blocksize, dtype)
    if dist not in ("zero_blocks", "inf", "denormal"):
        assert checked >= 0.9 * n


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 3, 63, 64, 65, 127, 1000, 4095, 4097])
def test_small_and_partial_lengths(dtype, n, cpu_path):
    rng = _rng("small", dtype, n)
    for blocksize in (64, 4096):
        x = R.make_input(rng.standard_normal(n) * 3, dtype)
        q, qs = F.quantize_blockwise(x, blocksize=blocksize)
        x32, _, absmax_ref = check_quantize(x, q, qs, blocksize)
        y = F.dequantize_blockwise(q, qs)
        check_dequantize(y, q, absmax_ref, blocksize, dtype)
        check_error_bound(x32, y, absmax_ref, blocksize, dtype)


@pytest.mark.parametrize("kind,dtype", [("torch", "float32"), ("torch", "bfloat16"), ("numpy", "float32"),
                                        ("numpy", "float16")])
def test_zero_dim_input_keeps_its_shape(kind, dtype):
    """A 0-d array is one element in one block; q, the dequantized output and out= are 0-d too."""
    x = R.make_input(np.array(-2.5), dtype, kind)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    assert tuple(q.shape) == () and R.kind_of(q) == kind
    check_quantize(x, q, qs, 64)
    assert int(R.to_numpy(q)) == 0 and float(R.to_numpy(qs.absmax)[0]) == 2.5
    y = F.dequantize_blockwise(q, qs)
    assert tuple(y.shape) == ()
    check_dequantize(y, q, np.float32([2.5]), 64, dtype)
    out = _poisoned_like(x, "uint8")
    q2, _ = F.quantize_blockwise(x, blocksize=64, out=out)
    assert q2 is out and int(R.to_numpy(out)) == 0


def test_default_map_is_not_shared_with_callers():
    """Mutating a returned map or a state's code must not change later default quantizations."""
    x = R.make_input(_rng("shared_map").standard_normal(1000), "float32")
    q0, qs0 = F.quantize_blockwise(x, blocksize=64)
    F.create_dynamic_map().mul_(2)
    qs0.code.mul_(3)
    q1, qs1 = F.quantize_blockwise(x, blocksize=64)
    assert torch.equal(q0, q1)
    np.testing.assert_array_equal(R.bits_of(qs1.code), R.DYNAMIC_SIGNED.view(np.uint32))


def test_default_blocksize_is_4096():
    x = R.make_input(_rng("default_bs").standard_normal(9000), "float32")
    q, qs = F.quantize_blockwise(x)
    assert qs.blocksize == 4096
    check_quantize(x, q, qs, 4096)
    check_dequantize(F.dequantize_blockwise(q, qs), q, qs.absmax.numpy(), 4096, "float32")


@pytest.mark.parametrize("shape", [(7, 300), (3, 5, 129), (2, 3, 4, 91), (1, 1, 1, 1), (4097, 1)])
@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_multidim_and_noncontiguous(shape, kind):
    rng = _rng("shape", shape, kind)
    x = R.make_input(rng.standard_normal(int(np.prod(shape))).reshape(shape) * 5, "float32", kind)
    for xin in (x, x.T if kind == "numpy" else x.mT if x.dim() >= 2 else x):
        for bs in (64, 333):
            q, qs = F.quantize_blockwise(xin, blocksize=bs)
            # row-major order of the *logical* array (bnb calls .contiguous())
            x32, _, absmax_ref = check_quantize(xin, q, qs, bs)
            y = F.dequantize_blockwise(q, qs)
            check_dequantize(y, q, absmax_ref, bs, "float32")
    # strided (non-contiguous) 1-D slice of a bigger buffer
    big = R.make_input(rng.standard_normal(4 * int(np.prod(shape))), "float32", kind)
    xs = big[::4]
    assert not (xs.flags.c_contiguous if kind == "numpy" else xs.is_contiguous()) or xs.shape[0] == 1
    q, qs = F.quantize_blockwise(xs, blocksize=64)
    check_quantize(xs, q, qs, 64)


# --------------------------------------------------------------------------------------------------
# torch vs numpy inputs
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("blocksize", [64, 256, 4096, 100])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("dist", ["normal", "outliers", "nan", "zero_blocks"])
def test_numpy_and_torch_inputs_agree(dist, dtype, blocksize):
    rng = _rng("np_vs_torch", dist, dtype, blocksize)
    v = R.make_values(dist, _n_for(blocksize, rng), rng, blocksize)
    xt = R.make_input(v, dtype, "torch")
    xn = R.make_input(v, dtype, "numpy")
    qt, st = F.quantize_blockwise(xt, blocksize=blocksize)
    qn, sn = F.quantize_blockwise(xn, blocksize=blocksize)
    assert isinstance(qn, np.ndarray) and isinstance(sn.absmax, np.ndarray)
    check_quantize(xn, qn, sn, blocksize)
    np.testing.assert_array_equal(qn, qt.numpy())
    np.testing.assert_array_equal(R.bits_of(sn.absmax), R.bits_of(st.absmax))
    yn = F.dequantize_blockwise(qn, sn)
    yt = F.dequantize_blockwise(qt, st)
    assert isinstance(yn, np.ndarray) and yn.dtype == np.dtype(dtype)
    check_dequantize(yn, qn, sn.absmax, blocksize, dtype)
    R.assert_bits_equal(R.bits_of(yn), R.bits_of(yt), dtype, "numpy vs torch dequant")


def test_numpy_input_with_torch_code_map():
    """``code`` may be of another kind than A (maps are torch CPU tensors by API): converted."""
    rng = _rng("np_torch_code")
    x = R.make_input(rng.standard_normal(1000), "float32", "numpy")
    code = F.create_dynamic_map(signed=True)
    q, qs = F.quantize_blockwise(x, code=code, blocksize=64)
    check_quantize(x, q, qs, 64)
    y = F.dequantize_blockwise(q, absmax=qs.absmax, code=code, blocksize=64)
    check_dequantize(y, q, qs.absmax, 64, "float32")
    # numpy code with torch A
    xt = torch.from_numpy(x)
    q2, qs2 = F.quantize_blockwise(xt, code=code.numpy(), blocksize=64)
    np.testing.assert_array_equal(q2.numpy(), q)


# --------------------------------------------------------------------------------------------------
# edge cases, explicit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 4096, 100])
def test_zero_blocks_give_code_0_and_negative_zero(dtype, blocksize, cpu_path):
    n = 3 * blocksize + 5
    v = _rng("zeros", dtype, blocksize).standard_normal(n)
    v[:blocksize] = 0.0
    v[blocksize:blocksize + 10] = -0.0
    v[blocksize + 10:2 * blocksize] = 0.0
    v[3 * blocksize:] = 0.0                                  # partial last block
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    check_quantize(x, q, qs, blocksize)
    qn = q.numpy()
    assert np.all(qn[:2 * blocksize] == 0) and np.all(qn[3 * blocksize:] == 0)
    am = qs.absmax.numpy()
    assert am[0] == 0 and am[1] == 0 and am[3] == 0 and am[2] > 0
    y = F.dequantize_blockwise(q, qs)
    yb = R.bits_of(y)
    sign = np.uint32(0x80000000) if dtype == "float32" else np.uint16(0x8000)
    zero_idx = np.r_[0:2 * blocksize, 3 * blocksize:n]
    assert np.all(yb[zero_idx] == sign), "zero blocks must dequantize to -0.0"


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_gets_code_0_and_is_ignored_in_absmax(dtype, cpu_path):
    v = np.array([1.0, np.nan, -2.0, 0.5] * 32)          # 128 elements, blocksize 64 -> 2 blocks
    v[64:] = np.array([np.nan, 0.25] * 32)
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    check_quantize(x, q, qs, 64)
    qn = q.numpy()
    assert np.all(qn[np.isnan(v)] == 0)
    np.testing.assert_array_equal(qs.absmax.numpy(), np.float32([2.0, 0.25]))
    assert np.all(qn[64:][1::2] == 255)                    # 0.25/0.25 == 1.0 -> code 255
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, qs.absmax, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_nan_block(dtype):
    """All-NaN block: every code 0.  (absmax of such a block is a corner the spec leaves to the
    kernel — fmaxf from -FLT_MAX gives -FLT_MAX on CUDA full blocks, 0 with zero padding — so only
    'not NaN' is required of it.)"""
    v = np.full(192, np.nan)
    v[128:] = np.linspace(-1, 1, 64)
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    qn = q.numpy()
    assert np.all(qn[:128] == 0)
    am = qs.absmax.numpy()
    assert not np.any(np.isnan(am)) and am[2] == 1.0
    q_ref, _ = R.quantize_ref(x, 64)
    np.testing.assert_array_equal(qn[128:], q_ref[128:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_inf_block(dtype, cpu_path):
    """Block with ±inf: absmax inf, r = 0: finite -> code 127, ±inf -> NaN -> code 0;
    dequantizing gives NaN (0*inf) / -inf (code[0]*inf)."""
    rng = _rng("inf", dtype)
    v = rng.standard_normal(200)
    v[3], v[70], v[71] = np.inf, -np.inf, np.inf
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    check_quantize(x, q, qs, 64)
    qn = q.numpy()
    am = qs.absmax.numpy()
    assert np.isinf(am[0]) and np.isinf(am[1]) and np.all(np.isfinite(am[2:]))
    fin = np.isfinite(v[:128])
    assert np.all(qn[:128][fin] == 127) and np.all(qn[:128][~fin] == 0)
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, am, 64, dtype)
    yf = y.float().numpy()
    assert np.all(np.isnan(yf[:128][fin])) and np.all(yf[:128][~fin] == -np.inf)
    assert np.all(np.isfinite(yf[128:]))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_denormals(dtype, cpu_path):
    """float32-denormal |x| counts as 0 in the absmax; the product x*r is IEEE (not flushed) on CPU."""
    tiny = 2.0 ** -130
    v = np.zeros(256)
    v[:64] = tiny * np.linspace(-1, 1, 64)                 # only denormals/zeros -> absmax 0
    v[64:128] = tiny                                       # + one normal value
    v[100] = 2.0 ** -125
    v[128:192] = np.linspace(-3, 3, 64)                    # ordinary block with a denormal
    v[130] = -tiny
    v[192:] = tiny * 3
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    check_quantize(x, q, qs, 64)
    am = qs.absmax.numpy()
    assert am[0] == 0 and am[3] == 0 and am[1] == np.float32(2.0 ** -125) and am[2] == 3.0
    qn = q.numpy()
    assert np.all(qn[:64] == 0) and np.all(qn[192:] == 0), "absmax 0 (all denormal): NaN path, code 0"
    assert qn[130] == 127
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, am, 64, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_huge_absmax_flushes_the_reciprocal(dtype, cpu_path):
    """2**126 < m <= FLT_MAX: fl32(1/m) is denormal and flushed (CUDA rcp.ftz) -> r = 0, so every
    finite element gets the code of 0.0 (127) and NaN gets 0 -- the inf-block behaviour."""
    v = np.linspace(-1, 1, 192) * 2.0 ** 127
    v[64:128] = np.linspace(-1, 1, 64) * 3e38
    v[128:192] = np.linspace(-1, 1, 64) * 2.0 ** 125          # r = 2**-125: normal, not flushed
    v[130] = np.nan
    v[5] = np.nan
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64)
    check_quantize(x, q, qs, 64)
    qn = q.numpy()
    assert np.all(qn[:128][~np.isnan(v[:128])] == 127) and qn[5] == 0
    assert qn[130] == 0 and qn[191] == 255 and qn[128] == 0
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, qs.absmax.numpy(), 64, dtype)


@pytest.mark.parametrize("blocksize", [64, 512, 4096])
def test_exact_midpoint_ties_go_to_even_index(blocksize, cpu_path):
    """Inputs at exact float32 midpoints (absmax a power of two, so xn is exact): ties -> even code."""
    code = R.DYNAMIC_SIGNED
    mids = ((code[:-1] + code[1:]).astype(np.float32) * np.float32(0.5)).astype(np.float32)
    probes = np.concatenate([mids, np.nextafter(mids, np.float32(2)), np.nextafter(mids, np.float32(-2)),
                             code]).astype(np.float32)
    for scale in (np.float32(1.0), np.float32(4.0), np.float32(2.0 ** -20)):
        blocks = []
        for i in range(0, probes.size, blocksize - 1):
            chunk = probes[i:i + blocksize - 1]
            blocks.append(np.concatenate([np.float32([1.0]), chunk]) * scale)
        x = torch.from_numpy(np.concatenate(blocks).astype(np.float32))
        q, qs = F.quantize_blockwise(x, blocksize=blocksize)
        x32, q_ref, _ = check_quantize(x, q, qs, blocksize)
        at_mid = np.isin(x32 / scale, mids)
        assert np.all(q.numpy()[at_mid] % 2 == 0)


# --------------------------------------------------------------------------------------------------
# dequantize paths and output dtypes
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 1024, 333])
def test_dequantize_output_dtypes_from_same_codes(out_dtype, blocksize, cpu_path):
    rng = _rng("deq_dtypes", out_dtype, blocksize)
    n = _n_for(blocksize, rng)
    q = torch.from_numpy(rng.integers(0, 256, n).astype(np.uint8))
    absmax = torch.from_numpy((np.exp(rng.uniform(-20, 20, R.nblocks(n, blocksize)))).astype(np.float32))
    qs = F.QuantState(absmax=absmax, code=F.create_dynamic_map(), blocksize=blocksize,
                      dtype=TORCH_DTYPE[out_dtype])
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, absmax.numpy(), blocksize, out_dtype)


@pytest.mark.parametrize("kind", ["torch", "numpy"])
@pytest.mark.parametrize("blocksize", [64, 4096, 100])
def test_dequantize_with_absmax_and_code_args(kind, blocksize):
    rng = _rng("deq_absmax", kind, blocksize)
    x = R.make_input(rng.standard_normal(_n_for(blocksize, rng)), "float16", kind)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    y = F.dequantize_blockwise(q, absmax=qs.absmax, code=qs.code, blocksize=blocksize)
    check_dequantize(y, q, qs.absmax, blocksize, "float32")       # no state -> float32
    y2 = F.dequantize_blockwise(q, absmax=qs.absmax, blocksize=blocksize)  # default map
    R.assert_bits_equal(R.bits_of(y2), R.bits_of(y), "float32")
    # with quant_state the absmax/code/blocksize arguments are ignored
    y3 = F.dequantize_blockwise(q, qs, absmax=qs.absmax * 0 + 7, blocksize=blocksize * 2)
    check_dequantize(y3, q, qs.absmax, blocksize, "float16")


# --------------------------------------------------------------------------------------------------
# out= / absmax= kwargs (poisoned buffers)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,dtype", [("torch", "float32"), ("torch", "float16"), ("torch", "bfloat16"),
                                        ("numpy", "float32"), ("numpy", "float16")])
@pytest.mark.parametrize("blocksize", [64, 2048, 333])
def test_out_and_absmax_kwargs(kind, dtype, blocksize):
    rng = _rng("out", kind, dtype, blocksize)
    n = _n_for(blocksize, rng)
    x = R.make_input(rng.standard_normal(n).reshape(-1, 1) * 2, dtype, kind)
    out = _poisoned_like(x, "uint8")
    absmax = _poisoned_like(x, "float32", (R.nblocks(n, blocksize),))
    q, qs = F.quantize_blockwise(x, absmax=absmax, out=out, blocksize=blocksize)
    assert q is out, "quantize_blockwise must return the out= array"
    assert qs.absmax is absmax, "QuantState.absmax must be the absmax= array"
    check_quantize(x, q, qs, blocksize)
    q_plain, qs_plain = F.quantize_blockwise(x, blocksize=blocksize)
    np.testing.assert_array_equal(R.to_numpy(q), R.to_numpy(q_plain))

    yout = _poisoned_like(x, dtype)
    y = F.dequantize_blockwise(q, qs, out=yout)
    assert y is yout, "dequantize_blockwise must return the out= array"
    check_dequantize(y, q, R.to_numpy(absmax), blocksize, dtype)
    # absmax= path of dequantize with out= (float32 output)
    yout32 = _poisoned_like(x, "float32")
    y32 = F.dequantize_blockwise(q, absmax=absmax, blocksize=blocksize, out=yout32)
    assert y32 is yout32
    check_dequantize(y32, q, R.to_numpy(absmax), blocksize, "float32")


# --------------------------------------------------------------------------------------------------
# nested=True
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 256, 4096, 100])
def test_nested_roundtrip(dtype, blocksize):
    rng = _rng("nested", dtype, blocksize)
    n = max(_n_for(blocksize, rng), 70 * blocksize + 3 if blocksize <= 256 else 0)
    v = rng.standard_normal(n) * np.exp(rng.uniform(-3, 3, n))
    x = R.make_input(v, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=blocksize, nested=True)
    ref = R.nested_quantize_ref(x, blocksize)
    assert qs.nested and qs.state2 is not None and qs.offset is not None
    R.assert_codes_equal(q.numpy(), ref["q"], R.to_f32(x), ref["absmax"], blocksize)
    # offset = torch mean of the float32 absmax, bit-identical
    assert isinstance(qs.offset, torch.Tensor) and qs.offset.dim() == 0 and qs.offset.dtype == torch.float32
    R.assert_bits_equal(R.bits_of(qs.offset.reshape(1)), np.float32([ref["offset"]]).view(np.uint32),
                        "float32", "offset")
    # first-level absmax stored as uint8 codes of (absmax - offset)
    assert qs.absmax.dtype == torch.uint8 and tuple(qs.absmax.shape) == (R.nblocks(n, blocksize),)
    R.assert_codes_equal(qs.absmax.numpy(), ref["qabs"], ref["centred"], ref["absmax2"], blocksize,
                         what="nested absmax codes")
    s2 = qs.state2
    assert s2.blocksize == blocksize and s2.dtype == torch.float32
    R.assert_bits_equal(R.bits_of(s2.absmax), ref["absmax2"].view(np.uint32), "float32", "absmax2")
    np.testing.assert_array_equal(R.bits_of(s2.code), R.DYNAMIC_SIGNED.view(np.uint32))
    assert qs.dtype == TORCH_DTYPE[dtype] and qs.blocksize == blocksize
    # dequant: absmax' = fl32(fl32(code[qabs]*absmax2) + offset), then §2.4
    absmax_d = R.nested_absmax_ref(ref["qabs"], ref["absmax2"], ref["offset"], blocksize)
    state_before = (qs.absmax.clone(), qs.offset.clone(), qs.state2.absmax.clone())
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, absmax_d, blocksize, dtype)
    assert all(torch.equal(a, b) for a, b in zip(state_before, (qs.absmax, qs.offset, qs.state2.absmax))), \
        "dequantize_blockwise modified the nested state"
    yout = _poisoned_like(x, dtype)
    assert F.dequantize_blockwise(q, qs, out=yout) is yout
    R.assert_bits_equal(R.bits_of(yout), R.bits_of(y), dtype, "nested dequant with out=")
    # error bound: the per-element bound for the true absmax plus the absmax reconstruction error
    x32 = R.to_f32(x).ravel()
    bound, ok = R.roundtrip_error_bound(x32.astype(np.float64), ref["absmax"], blocksize, dtype)
    dm = R.expand(np.abs(absmax_d.astype(np.float64) - ref["absmax"]), n, blocksize)
    y64 = R.bits_to_f64(R.bits_of(y), dtype)
    err = np.abs(y64 - x32)
    assert np.all(err[ok] <= bound[ok] + dm[ok] * (1 + 2 * R.UNIT_ROUNDOFF[dtype]))
    # the nested absmax is accurate to ~1% of the largest |absmax - offset|
    assert np.max(np.abs(absmax_d - ref["absmax"])) <= 0.01 * np.max(np.abs(ref["centred"])) + 1e-30


@pytest.mark.parametrize("kind", ["numpy"])
def test_nested_numpy_input(kind):
    rng = _rng("nested_np")
    x = R.make_input(rng.standard_normal(64 * 50 + 7), "float32", kind)
    q, qs = F.quantize_blockwise(x, blocksize=64, nested=True)
    assert isinstance(q, np.ndarray)
    off = np.float32(qs.offset.item() if isinstance(qs.offset, torch.Tensor) else np.asarray(qs.offset))
    # offset is the float32 mean of the absmax; NumPy's summation order is not torch's: allow 2 ulp
    torch_off = R.torch_mean_f32(R.block_absmax(x, 64))
    assert abs(float(off) - float(torch_off)) <= 2 * np.spacing(torch_off)
    ref = R.nested_quantize_ref(x, 64, offset=off)          # the rest follows from the state's offset
    R.assert_codes_equal(q, ref["q"])
    R.assert_codes_equal(R.to_numpy(qs.absmax), ref["qabs"], what="nested absmax codes")
    R.assert_bits_equal(R.bits_of(qs.state2.absmax), ref["absmax2"].view(np.uint32), "float32")
    y = F.dequantize_blockwise(q, qs)
    assert isinstance(y, np.ndarray) and y.dtype == np.float32
    absmax_d = R.nested_absmax_ref(ref["qabs"], ref["absmax2"], np.float32(off), 64)
    check_dequantize(y, q, absmax_d, 64, "float32")


@pytest.mark.parametrize("dtype", DTYPES)
def test_quantstate_as_dict_from_dict_nested(dtype):
    rng = _rng("as_dict", dtype)
    x = R.make_input(rng.standard_normal(64 * 20 + 5), dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64, nested=True)
    d = qs.as_dict()
    assert list(d) == ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape",
                       "nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype",
                       "nested_offset"]
    assert d["quant_type"] is None and d["shape"] is None and d["blocksize"] == 64
    assert d["dtype"] == dtype and d["nested_dtype"] == "float32" and d["nested_blocksize"] == 64
    assert isinstance(d["nested_offset"], float) and d["nested_offset"] == qs.offset.item()
    assert d["absmax"].dtype == torch.uint8 and d["nested_absmax"].dtype == torch.float32
    assert d["nested_quant_map"].data_ptr() != qs.state2.code.data_ptr()   # cloned
    qs2 = F.QuantState.from_dict(dict(d), torch.device("cpu"))
    assert qs2 == qs and qs2.nested
    y1 = F.dequantize_blockwise(q, qs)
    y2 = F.dequantize_blockwise(q, qs2)
    R.assert_bits_equal(R.bits_of(y2), R.bits_of(y1), dtype, "dequant after from_dict")
    # non-nested 8-bit state
    q, qs = F.quantize_blockwise(x, blocksize=128)
    d = qs.as_dict()
    assert list(d) == ["quant_type", "absmax", "blocksize", "quant_map", "dtype", "shape"]
    assert F.QuantState.from_dict(dict(d), "cpu") == qs
    assert d["absmax"] is qs.absmax or torch.equal(d["absmax"], qs.absmax)


# --------------------------------------------------------------------------------------------------
# non-default maps (duplicates: literal search)
# --------------------------------------------------------------------------------------------------
def _maps():
    return {
        "dynamic_unsigned": lambda: F.create_dynamic_map(signed=False),
        "dynamic_4bit_exp": lambda: F.create_dynamic_map(True, 4, 8),
        "dynamic_total5": lambda: F.create_dynamic_map(True, 3, 5),
        "linear_signed": lambda: F.create_linear_map(True),
        "linear_unsigned": lambda: F.create_linear_map(False),
        "linear_4bit": lambda: F.create_linear_map(True, 4),
        "fp8_e5m2": lambda: F.create_fp8_map(True),
        "fp8_e4m3": lambda: F.create_fp8_map(True, 4, 3, 8),
        "fp4_padded": lambda: F.create_fp8_map(True, 2, 1, 4),
        "normal": lambda: F.create_normal_map(),
    }


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("map_name", sorted(_maps()))
def test_nondefault_code_maps(map_name, dtype, cpu_path):
    code = _maps()[map_name]()
    assert code.dtype == torch.float32 and tuple(code.shape) == (256,)
    code_np = code.numpy()
    is_sorted = bool(np.all(np.diff(code_np.astype(np.float64)) >= 0))  # create_linear_map(True, 4) is not
    rng = _rng("maps", map_name, dtype)
    for blocksize in (64, 256, 333):
        n = _n_for(blocksize, rng)
        v = rng.standard_normal(n)
        v[rng.random(n) < 0.02] = 0.0
        v[::97] = np.nan
        if "unsigned" in map_name:
            v[: n // 2] = np.abs(v[: n // 2])          # both non-negative blocks and signed values
        x = R.make_input(v, dtype)
        q, qs = F.quantize_blockwise(x, code=code, blocksize=blocksize)
        x32, q_ref, absmax_ref = check_quantize(x, q, qs, blocksize, code=code)
        y = F.dequantize_blockwise(q, qs)
        check_dequantize(y, q, absmax_ref, blocksize, dtype, code=code)
        if "unsigned" not in map_name and is_sorted:
            check_error_bound(x32, y, absmax_ref, blocksize, dtype, code=code_np)
    assert torch.equal(code, _maps()[map_name]()), "the map argument was modified"


@pytest.mark.parametrize("style", ["uniform", "clustered", "wide"])
def test_random_strictly_increasing_maps(style, cpu_path):
    """Arbitrary sorted maps (values outside [-1, 1], many midpoints packed close together): codes equal
    the literal search.  20 maps per style, more than any small per-map cache holds."""
    rng = _rng("random_maps", style)
    for i in range(20):
        if style == "uniform":
            c = rng.uniform(-1.5, 1.5, 256)
        elif style == "clustered":      # 200 values within 1e-6 of 0.3: many midpoints per float bucket
            c = np.concatenate([0.3 + rng.uniform(-1e-6, 1e-6, 200), rng.uniform(-1, 1, 56)])
        else:
            c = rng.choice([-1, 1], 256) * 10.0 ** rng.uniform(-30, 1, 256)
        code = np.unique(c.astype(np.float32))
        while code.size < 256:
            code = np.unique(np.concatenate([code, rng.uniform(-1, 1, 256 - code.size).astype(np.float32)]))
        code = torch.from_numpy(code[:256].copy())
        v = rng.standard_normal(64 * 20 + 9)
        if style == "clustered":
            v[::2] = 0.3 + rng.uniform(-2e-6, 2e-6, v[::2].size)
            v[::64] = 1.0
        x = torch.from_numpy(v.astype(np.float32))
        q, qs = F.quantize_blockwise(x, code=code, blocksize=64)
        check_quantize(x, q, qs, 64, code=code)
        check_dequantize(F.dequantize_blockwise(q, qs), q, qs.absmax.numpy(), 64, "float32", code=code)


@pytest.mark.parametrize("dtype", DTYPES)
def test_large_inputs_parallel_path(dtype, cpu_path):
    """n well above the single-thread threshold, so the OpenMP path runs; partial last block."""
    rng = _rng("large", dtype)
    n = (1 << 19) + 77
    v = R.make_values("outliers", n, rng, 64)
    v[1000:1064] = 0.0
    v[5000] = np.nan
    x = R.make_input(v, dtype)
    for blocksize in (64, 4096, 333):
        q, qs = F.quantize_blockwise(x, blocksize=blocksize)
        x32, _, absmax_ref = check_quantize(x, q, qs, blocksize)
        y = F.dequantize_blockwise(q, qs)
        check_dequantize(y, q, absmax_ref, blocksize, dtype)
    q, qs = F.quantize_blockwise(x, blocksize=64, nested=True)
    ref = R.nested_quantize_ref(x, 64)
    R.assert_codes_equal(q.numpy(), ref["q"])
    R.assert_codes_equal(qs.absmax.numpy(), ref["qabs"])
    absmax_d = R.nested_absmax_ref(ref["qabs"], ref["absmax2"], ref["offset"], 64)
    check_dequantize(F.dequantize_blockwise(q, qs), q, absmax_d, 64, dtype)


def test_search_paths_of_the_standard_maps():
    info = lambda c: _C.q8_search_info(_C.view(c, "code"))  # noqa: E731
    assert info(F.create_dynamic_map()) == "packed"
    assert info(F.create_dynamic_map(False)) == "packed"
    assert info(F.create_linear_map(True, 4)) == "literal"  # repeated zeros


def test_code_map_with_duplicates_uses_literal_search():
    """Zero-padded maps: literal search and the 'closed form' disagree; bnbcy must follow the literal."""
    code = F.create_linear_map(True, 4).numpy()              # 16 values, 240 zeros in the middle
    probes = _probes(code)
    x = torch.from_numpy(np.concatenate([np.float32([1.0]), probes[np.isfinite(probes)
                                                                   & (np.abs(probes) <= 1)]]))
    q, qs = F.quantize_blockwise(x, code=torch.from_numpy(code), blocksize=x.numel())
    assert qs.absmax.item() == 1.0
    lit = R.search_literal(code, R.ftz(x.numpy()))  # r == 1; mul.ftz flushes denormal probes
    R.assert_codes_equal(q.numpy(), lit, x.numpy())
    assert np.any(lit != R.search_literal(np.sort(code), x.numpy()))  # the probe set is discriminating


# --------------------------------------------------------------------------------------------------
# CUDA variants
# --------------------------------------------------------------------------------------------------
def _assert_cuda_codes_close(got, x, absmax, blocksize, code=None, max_frac=1e-3):
    """GPU codes vs the IEEE model: equal except where a reciprocal within ±2 ulp (rcp.approx) gives
    another code; those differ by at most one index and are rare."""
    got = R.to_numpy(got).ravel().astype(np.int32)
    x32 = R.to_f32(x).ravel()
    q_ieee, _ = R.quantize_ref(x32, blocksize, None if code is None else R.to_f32(code))
    q_ieee = q_ieee.ravel().astype(np.int32)
    diff = np.nonzero(got != q_ieee)[0]
    if diff.size:
        slack = R.codes_with_reciprocal_slack(x32, absmax, blocksize,
                                              None if code is None else R.to_f32(code))
        bad = diff[~np.any(slack[:, diff] == got[diff], axis=0)]
        assert bad.size == 0, (f"GPU codes not explained by the reciprocal rounding at {bad[:5].tolist()}: "
                               f"got {got[bad[:5]].tolist()}, IEEE model {q_ieee[bad[:5]].tolist()}, "
                               f"x={x32[bad[:5]].tolist()}")
        code_np = R.DYNAMIC_SIGNED if code is None else R.to_f32(code)
        if np.all(np.diff(code_np.astype(np.float64)) > 0):
            assert np.all(np.abs(got[diff] - q_ieee[diff]) <= 1)
        else:  # repeated values (zero-padded maps): the two values must be neighbours in value
            u = np.unique(code_np)
            k_got = np.searchsorted(u, code_np[got[diff]])
            k_ieee = np.searchsorted(u, code_np[q_ieee[diff]])
            assert np.all(np.abs(k_got - k_ieee) <= 1)
        assert diff.size <= max(2, max_frac * got.size), f"{diff.size} of {got.size} codes differ"
    return diff.size


CUDA_DISTS = ("normal", "student_t", "outliers", "zero_blocks", "nan", "inf", "tiny", "huge")


@pytest.mark.cuda
@pytest.mark.parametrize("dist,dtype,blocksize", _grid(CUDA_DISTS, DTYPES, BLOCKSIZES_CUDA))
def test_cuda_quantize_dequantize(dist, dtype, blocksize):
    rng = _rng("cuda_grid", dist, dtype, blocksize)
    n = _n_for(blocksize, rng) + 40 * blocksize
    v = R.make_values(dist, n, rng, blocksize)
    x = R.make_input(v, dtype, "torch", "cuda")
    q, qs = F.quantize_blockwise(x, blocksize=blocksize)
    x32, _, absmax_ref = check_quantize(x, q, qs, blocksize, exact=False)
    _assert_cuda_codes_close(q, x, absmax_ref, blocksize)
    # CPU vs CUDA: same input on the CPU
    qc, qsc = F.quantize_blockwise(x.cpu(), blocksize=blocksize)
    R.assert_bits_equal(R.bits_of(qsc.absmax), R.bits_of(qs.absmax), "float32", "CPU vs CUDA absmax")
    d = np.nonzero(qc.numpy().ravel() != q.cpu().numpy().ravel())[0]
    assert d.size <= max(2, 1e-3 * n)
    y = F.dequantize_blockwise(q, qs)
    assert y.device == x.device and y.dtype == x.dtype
    check_dequantize(y, q, absmax_ref, blocksize, dtype)
    check_error_bound(x32, y, absmax_ref, blocksize, dtype)
    # out= on the GPU, poisoned
    out = _poisoned_like(x, "uint8")
    q2, _ = F.quantize_blockwise(x, blocksize=blocksize, out=out)
    assert q2 is out
    np.testing.assert_array_equal(q2.cpu().numpy(), q.cpu().numpy())
    yout = _poisoned_like(x, dtype)
    y2 = F.dequantize_blockwise(q, qs, out=yout)
    assert y2 is yout
    R.assert_bits_equal(R.bits_of(y2), R.bits_of(y), dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 256, 4096])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cuda_cupy_inputs_match_torch(dtype, blocksize):
    assert cupy is not None
    rng = _rng("cupy", dtype, blocksize)
    v = R.make_values("outliers", _n_for(blocksize, rng) + 10 * blocksize, rng, blocksize)
    xt = R.make_input(v, dtype, "torch", "cuda")
    xc = R.make_input(v, dtype, "cupy")
    qt, st = F.quantize_blockwise(xt, blocksize=blocksize)
    qc, sc = F.quantize_blockwise(xc, blocksize=blocksize)
    assert isinstance(qc, cupy.ndarray) and isinstance(sc.absmax, cupy.ndarray)
    check_quantize(xc, qc, sc, blocksize, exact=False)
    np.testing.assert_array_equal(cupy.asnumpy(qc), qt.cpu().numpy())
    np.testing.assert_array_equal(R.bits_of(sc.absmax), R.bits_of(st.absmax))
    yc = F.dequantize_blockwise(qc, sc)
    assert isinstance(yc, cupy.ndarray) and yc.dtype == np.dtype(dtype)
    R.assert_bits_equal(R.bits_of(yc), R.bits_of(F.dequantize_blockwise(qt, st)), dtype)
    # nested on cupy
    qn, sn = F.quantize_blockwise(xc, blocksize=blocksize, nested=True)
    yn = F.dequantize_blockwise(qn, sn)
    assert isinstance(yn, cupy.ndarray)
    x32 = R.to_f32(xc)
    assert np.nanmax(np.abs(R.to_f32(yn) - x32)) <= 0.05 * np.max(np.abs(x32))


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["torch", "cupy"])
def test_cuda_zero_dim_input_keeps_its_shape(kind):
    x = R.make_input(np.array(-2.5), "float32", kind, "cuda")
    q, qs = F.quantize_blockwise(x, blocksize=64)
    assert tuple(q.shape) == () and R.kind_of(q) == kind
    assert int(R.to_numpy(q)) == 0 and float(R.to_numpy(qs.absmax)[0]) == 2.5
    y = F.dequantize_blockwise(q, qs)
    assert tuple(y.shape) == () and float(R.to_numpy(y)) == R.DYNAMIC_SIGNED[0] * np.float32(2.5)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_edge_cases(dtype):
    v = np.zeros(64 * 6 + 10)
    v[64:128] = np.linspace(-2, 2, 64)
    v[70] = np.nan
    v[128:192] = np.linspace(-1, 1, 64)
    v[130], v[131] = np.inf, -np.inf
    v[192:256] = np.nan
    v[200] = 0.5
    v[256:] = 0.0                                            # includes the partial last block
    v[300] = -3.0
    x = R.make_input(v, dtype, "torch", "cuda")
    q, qs = F.quantize_blockwise(x, blocksize=64)
    qn = q.cpu().numpy()
    am = qs.absmax.cpu().numpy()
    assert np.all(qn[:64] == 0) and am[0] == 0                 # zero block
    assert qn[70] == 0 and am[1] == 2.0                       # NaN ignored
    fin = np.isfinite(v[128:192])
    assert np.isinf(am[2]) and np.all(qn[128:192][fin] == 127) and np.all(qn[128:192][~fin] == 0)
    assert am[3] == 0.5 and qn[200] == 255 and np.all(qn[192:256][np.isnan(v[192:256])] == 0)
    assert np.all(qn[320:] == 0) and am[5] == 0 and am[6] == 0  # zero blocks (last one partial)
    assert am[4] == 3.0 and qn[300] == 0
    _assert_cuda_codes_close(q, x, R.block_absmax(R.to_f32(x), 64), 64)
    y = F.dequantize_blockwise(q, qs)
    check_dequantize(y, q, am, 64, dtype)


@pytest.mark.cuda
@pytest.mark.parametrize("map_name", ["linear_signed", "fp8_e5m2", "dynamic_unsigned", "fp4_padded"])
def test_cuda_nondefault_maps(map_name):
    code = _maps()[map_name]()
    rng = _rng("cuda_maps", map_name)
    x = R.make_input(rng.standard_normal(64 * 100 + 3), "float32", "torch", "cuda")
    q, qs = F.quantize_blockwise(x, code=code, blocksize=64)
    _, _, absmax_ref = check_quantize(x, q, qs, 64, code=code, exact=False)
    _assert_cuda_codes_close(q, x, absmax_ref, 64, code=code)
    check_dequantize(F.dequantize_blockwise(q, qs), q, absmax_ref, 64, "float32", code=code)


@pytest.mark.cuda
@pytest.mark.parametrize("blocksize", [64, 4096])
def test_cuda_nested(blocksize):
    rng = _rng("cuda_nested", blocksize)
    x = R.make_input(rng.standard_normal(blocksize * 300 + 9), "float32", "torch", "cuda")
    q, qs = F.quantize_blockwise(x, blocksize=blocksize, nested=True)
    assert qs.absmax.device == x.device and qs.absmax.dtype == torch.uint8
    qc, qsc = F.quantize_blockwise(x.cpu(), blocksize=blocksize, nested=True)
    np.testing.assert_allclose(qs.offset.item(), qsc.offset.item(), rtol=1e-6)
    y = F.dequantize_blockwise(q, qs)
    x32 = R.to_f32(x)
    assert np.max(np.abs(R.to_f32(y) - x32)) <= 0.02 * np.max(np.abs(x32))


def test_dense_strictly_increasing_map_uses_multi_step_table(cpu_path):
    """A strictly increasing map whose midpoints crowd into the same 2^-7-wide bucket (two values
    per ulp-scale cluster) takes the table path with several compares per element; it must still
    give the literal search's codes."""
    rng = np.random.default_rng(1234)
    base = np.sort(rng.uniform(-1, 1, 128)).astype(np.float32)
    code = np.sort(np.concatenate([base, np.nextafter(base, np.float32(2), dtype=np.float32),
                                   ])).astype(np.float32)
    code = np.unique(code)
    code = np.concatenate([code, np.linspace(1.5, 2.0, 256 - code.size, dtype=np.float32)])
    code = np.sort(code).astype(np.float32)
    assert code.size == 256 and np.all(np.diff(code) > 0)
    assert _C.q8_search_info(_C.view(torch.from_numpy(code), "code")).startswith("table:")
    x = np.clip(rng.standard_normal(20_000) * 0.6, -1.9, 1.9).astype(np.float32)
    probes = np.concatenate([x, code[:128], ((code[:-1] + code[1:]) * np.float32(0.5)).astype(np.float32)])
    probes = np.concatenate([probes, np.float32([2.0])])  # fixes absmax = 2.0, r = 0.5 exactly
    q, qs = F.quantize_blockwise(torch.from_numpy(probes), code=torch.from_numpy(code), blocksize=probes.size)
    assert qs.absmax.item() == 2.0
    exp = R.search_literal(code, R.normalize(probes, np.float32([2.0]), probes.size))
    R.assert_codes_equal(q.numpy(), exp, probes)
