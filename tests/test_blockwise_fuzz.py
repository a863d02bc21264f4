"""Property tests (hypothesis) for 8-bit blockwise quantization on the CPU.

Shapes of 1-4 dims up to ~50k elements, float32/float16/bfloat16, torch and NumPy inputs (contiguous or
not), every CUDA blocksize plus arbitrary positive CPU blocksizes, magnitudes 1e-30..1e30, with
NaN/±inf/zeros sprinkled in.  Properties: output shape/dtype/kind, codes == the reference model
(tests/reference.py) exactly, absmax and dequantization bit-identical, round-trip error bound.
"""
import contextlib
import os

import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference as R
from test_blockwise_numerics import check_dequantize, check_error_bound, check_quantize

import bnbcy.functional as F
from bnbcy import _C

SETTINGS = settings(max_examples=50, deadline=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
MAX_N = 50_000
BLOCKSIZES = st.one_of(st.sampled_from([64, 128, 256, 512, 1024, 2048, 4096]),
                       st.integers(1, 5000))


@contextlib.contextmanager
def cpu_path(isa: str):
    """Run on one CPU kernel path (bnbcy reads BNBCY_CPU_ISA on every call)."""
    old = os.environ.get("BNBCY_CPU_ISA")
    os.environ["BNBCY_CPU_ISA"] = isa
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("BNBCY_CPU_ISA", None)
        else:
            os.environ["BNBCY_CPU_ISA"] = old


def _available_isas():
    """The CPU kernel paths this machine can run (the scalar one always)."""
    found = []
    for isa in ("avx512", "avx2", "scalar"):
        with cpu_path(isa):
            if _C.cpu_isa() == isa:
                found.append(isa)
    return found


ISAS = _available_isas()


@st.composite
def shapes(draw):
    ndim = draw(st.integers(1, 4))
    dims, budget = [], MAX_N
    for i in range(ndim):
        hi = budget if i == ndim - 1 else min(budget, 400)
        d = draw(st.integers(1, max(1, hi)))
        dims.append(d)
        budget = max(1, budget // d)
    return tuple(dims)


@st.composite
def float_inputs(draw):
    dtype = draw(st.sampled_from(R.DTYPE_NAMES))
    kind = "torch" if dtype == "bfloat16" else draw(st.sampled_from(["torch", "numpy"]))
    shape = draw(shapes())
    n = int(np.prod(shape))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    exp_lo, exp_hi = (-4, 3) if dtype == "float16" else (-30, 30)
    scale = 10.0 ** draw(st.integers(exp_lo, exp_hi))
    dist = draw(st.sampled_from(["normal", "student_t", "uniform", "log_uniform", "outliers"]))
    rng = np.random.default_rng(seed)
    if dist == "normal":
        v = rng.standard_normal(n)
    elif dist == "student_t":
        v = rng.standard_t(2, n)
    elif dist == "uniform":
        v = rng.uniform(-1, 1, n)
    elif dist == "log_uniform":          # magnitudes spread over 12 decades inside every block
        v = rng.choice([-1.0, 1.0], n) * 10.0 ** rng.uniform(-12, 0, n)
    else:
        v = rng.standard_normal(n)
        v[rng.random(n) < 0.005] *= 100
    v = v * scale
    specials = draw(st.lists(st.sampled_from([np.nan, np.inf, -np.inf, 0.0, -0.0]), max_size=4))
    for s in specials:
        v[rng.integers(0, n)] = s
    x = R.make_input(v.reshape(shape), dtype, kind)
    if draw(st.booleans()) and len(shape) >= 2:   # non-contiguous view of the same data
        x = x.T if kind == "numpy" else x.mT
    return x


@SETTINGS
@given(x=float_inputs(), blocksize=BLOCKSIZES, isa=st.sampled_from(ISAS))
def test_fuzz_quantize_dequantize(x, blocksize, isa):
    dtype = R.dtype_name(x)
    before = R.bits_of(x)
    with cpu_path(isa):
        q, qs = F.quantize_blockwise(x, blocksize=blocksize)
        y = F.dequantize_blockwise(q, qs)
    np.testing.assert_array_equal(R.bits_of(x), before)
    x32, _, absmax_ref = check_quantize(x, q, qs, blocksize)       # shape/dtype/kind, codes, absmax
    check_dequantize(y, q, absmax_ref, blocksize, dtype, like=x)   # kind, shape, dtype, bits
    check_error_bound(x32, y, absmax_ref, blocksize, dtype)


FLOAT32S = st.floats(width=32, allow_nan=True, allow_infinity=True, allow_subnormal=True)


@SETTINGS
@given(vals=st.lists(FLOAT32S, min_size=1, max_size=3000), blocksize=BLOCKSIZES,
       dtype=st.sampled_from(R.DTYPE_NAMES), isa=st.sampled_from(ISAS))
def test_fuzz_arbitrary_float32_values(vals, blocksize, dtype, isa):
    """Any float32 bit pattern (NaN, ±inf, denormals, ±0, extremes) in any block layout."""
    v = np.asarray(vals, dtype=np.float64)
    if dtype == "float16":
        v = np.where(np.abs(v) > R.FP16_MAX, np.copysign(np.inf, v), v)
    x = R.make_input(v, dtype)
    with cpu_path(isa):
        q, qs = F.quantize_blockwise(x, blocksize=blocksize)
        y = F.dequantize_blockwise(q, qs)
    _, _, absmax_ref = check_quantize(x, q, qs, blocksize)
    check_dequantize(y, q, absmax_ref, blocksize, dtype)
    check_error_bound(R.to_f32(x).ravel(), y, absmax_ref, blocksize, dtype)


@SETTINGS
@given(vals=st.lists(st.floats(-1, 1, width=32), min_size=1, max_size=2000),
       exponent=st.integers(-100, 100), isa=st.sampled_from(ISAS))
def test_fuzz_search_on_exact_values(vals, exponent, isa):
    """With absmax a power of two the normalisation is exact, so this fuzzes the §2.2 search itself
    (midpoints, ties, neighbours) through the library: codes == literal search of x/absmax."""
    scale = np.float32(2.0 ** exponent)
    xn = np.asarray(vals, dtype=np.float32)
    x32 = np.concatenate([np.float32([1.0]), xn]) * scale
    x = torch.from_numpy(x32)
    with cpu_path(isa):
        q, qs = F.quantize_blockwise(x, blocksize=x32.size)
    assert qs.absmax.item() == scale
    q_ref, _ = R.quantize_ref(x32, x32.size)
    R.assert_codes_equal(q.numpy(), q_ref, x32)
    exact = (x32[1:] / scale == xn) & (np.abs(x32[1:]) >= R.FLT_MIN_NORMAL)   # no underflow
    np.testing.assert_array_equal(q_ref[1:][exact], R.search_literal(R.DYNAMIC_SIGNED, xn[exact]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(x=float_inputs(), blocksize=st.sampled_from([64, 256, 4096, 100]))
def test_fuzz_nested(x, blocksize):
    """nested=True: same codes as nested=False, the absmax codes follow the reference, and the
    dequantization follows §2.5 from the state's own offset/state2."""
    if R.kind_of(x) != "torch":
        x = torch.from_numpy(np.ascontiguousarray(x))
    x32 = R.to_f32(x)
    if not np.all(np.isfinite(x32)):
        x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)   # keep the absmax finite
    q, qs = F.quantize_blockwise(x, blocksize=blocksize, nested=True)
    ref = R.nested_quantize_ref(x, blocksize)
    R.assert_codes_equal(q.numpy(), ref["q"])
    R.assert_bits_equal(R.bits_of(qs.offset.reshape(1)), np.float32([ref["offset"]]).view(np.uint32),
                        "float32", "offset")
    R.assert_codes_equal(qs.absmax.numpy(), ref["qabs"], ref["centred"], ref["absmax2"], blocksize)
    absmax_d = R.nested_absmax_ref(ref["qabs"], ref["absmax2"], ref["offset"], blocksize)
    check_dequantize(F.dequantize_blockwise(q, qs), q, absmax_d, blocksize, R.dtype_name(x))
