"""CUDA 4-bit kernels (cuda_src/fourbit.cu) launched directly through
bnbcy.functional._fourbit_cuda with torch CUDA tensors.

* quantize: packed codes and absmax bit-identical to bitsandbytes' CUDA quantize_4bit (nf4/fp4, three
  dtypes, every blocksize, partial/odd lengths, NaN/inf/zero/denormal blocks); outputs poisoned first,
  guard bytes after the outputs must stay untouched.
* dequantize: bit-identical to bitsandbytes' CUDA dequantize_4bit.
* gemv / small gemm: against a float64 reference (fp32-accumulation tolerance), on bnbcy's and on
  bitsandbytes' quantized weights, and against bnb's gemv_4bit (loose, bnb rounds products in T).

All tests carry the ``cuda`` marker (skipped without a GPU); the bnb comparisons skip when the
bitsandbytes CUDA library cannot be loaded.
"""
import zlib

import pytest
import torch
from cuda_env import DEVICE, EMULATED, pick, sync  # noqa: F401

from bnbcy import _C
from bnbcy.functional import _fourbit_cuda as FC

pytestmark = pytest.mark.cuda

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
EPS = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
BLOCKSIZES = FC.BLOCKSIZES
GUARD = 64


def _v(t, name="t"):
    return _C.view(t, name)


def _bits(t):
    """Integer view of a float tensor's bit patterns (on the CPU)."""
    t = t.contiguous().cpu()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _assert_same_floats(a, b, what):
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    na, nb = torch.isnan(a.float()).cpu(), torch.isnan(b.float()).cpu()
    assert torch.equal(na, nb), f"{what}: NaN positions differ"
    ba, bb = _bits(a)[~na], _bits(b)[~nb]
    bad = (ba != bb).nonzero()
    assert bad.numel() == 0, f"{what}: {bad.numel()} values differ, first at {bad[:5].flatten().tolist()}"




# --------------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------------
def _special_input(n, blocksize, dtype, seed):
    """randn * 3 with whole blocks of zeros, NaN, +inf, denormals and an all-NaN block."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 3.0
    tiny = {"float32": 1e-40, "float16": 1e-7, "bfloat16": 1e-40}[dtype]
    nb = -(-n // blocksize)

    def blk(b):
        return slice(b * blocksize, min((b + 1) * blocksize, n))
    if nb > 1:
        x[blk(1)] = 0.0
    if nb > 2:
        s = blk(2)
        x[s][::7] = float("nan")
    if nb > 3:
        x[blk(3).start] = float("inf")
    if nb > 4:
        x[blk(4)] = torch.randn(len(range(n)[blk(4)]), generator=g, dtype=torch.float64) * tiny
    if nb > 5:
        x[blk(5)] = float("nan")
    if nb > 6:
        s = blk(6)
        x[s] = x[s].abs() * -1.0  # all negative (FP4 sign bit)
    if n >= 3:
        x[-2] = -0.0
    return x.to(DTYPES[dtype]).to(DEVICE)


def _lengths(blocksize):
    return sorted({1, 3, 31, blocksize * 8, blocksize * 8 + 1, blocksize * 8 + 17, blocksize * 7 + blocksize - 1})


# --------------------------------------------------------------------------------------------------
# quantize / dequantize vs bitsandbytes
# --------------------------------------------------------------------------------------------------
def _ours_quantize(x, blocksize, qt):
    n = x.numel()
    nbytes, nblocks = (n + 1) // 2, -(-n // blocksize)
    qbuf = torch.full((nbytes + GUARD,), 0xAB, dtype=torch.uint8, device=x.device)
    abuf = torch.full((nblocks + GUARD,), float("nan"), dtype=torch.float32, device=x.device)
    FC.launch_quantize_4bit(_v(x, "A"), _v(qbuf[:nbytes], "q"), _v(abuf[:nblocks], "absmax"), blocksize, qt)
    sync()
    assert torch.all(qbuf[nbytes:] == 0xAB), "quantize wrote past the packed output"
    assert torch.all(torch.isnan(abuf[nblocks:])), "quantize wrote past absmax"
    return qbuf[:nbytes], abuf[:nblocks]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
def test_quantize_dequantize_bit_identical_to_bnb(bnbF, qt, dtype, blocksize):
    for n in _lengths(blocksize):
        x = _special_input(n, blocksize, dtype, seed=zlib.crc32(repr((qt, dtype, blocksize, n)).encode()))
        q, absmax = _ours_quantize(x, blocksize, qt)
        bq, bstate = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=qt)
        sync()
        assert torch.equal(q.cpu(), bq.reshape(-1).view(torch.uint8).cpu()), f"codes differ (n={n})"
        _assert_same_floats(absmax, bstate.absmax, f"absmax (n={n})")

        # dequantize bnb's codes, poisoned output with a guard
        out = torch.full((n + GUARD,), float("nan"), dtype=DTYPES[dtype], device=x.device)
        FC.launch_dequantize_4bit(_v(bq.reshape(-1).view(torch.uint8), "q"), _v(bstate.absmax, "absmax"),
                                  _v(out[:n], "out"), n, blocksize, qt)
        ref = bnbF.dequantize_4bit(bq, bstate)
        sync()
        assert torch.all(torch.isnan(out[n:].float())), "dequantize wrote past n"
        _assert_same_floats(out[:n], ref.reshape(-1), f"dequantize (n={n})")


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_quantize_fp4_nf4_edge_values(bnbF, qt, dtype):
    # values at and next to every NF4 threshold / FP4 pivot (times absmax 1), in one block of 64
    pivots = [0.29166667, 0.583333, 0.8333333, 0.4166667, 0.0859375, 0.20833333, 0.00260417,
              0.58333331, 0.0026, -0.0026, -0.001, 0.001]
    nf4 = [-0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
           -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
           0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
           0.5016634166240692, 0.6427869200706482, 0.8614784181118011]
    base = torch.tensor(pivots + nf4, dtype=torch.float32)
    vals = torch.cat([base, torch.nextafter(base, torch.tensor(2.0)), torch.nextafter(base, torch.tensor(-2.0)),
                      -base, torch.tensor([1.0, -1.0, 0.0, -0.0])])
    x = vals.to(DTYPES[dtype]).to(DEVICE)
    for blocksize in (32, 64, 128):
        q, absmax = _ours_quantize(x, blocksize, qt)
        bq, bstate = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=qt)
        sync()
        assert torch.equal(q.cpu(), bq.reshape(-1).view(torch.uint8).cpu())
        _assert_same_floats(absmax, bstate.absmax, "absmax")


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_unaligned_pointers_take_the_scalar_paths(qt, dtype):
    blocksize, n = 64, 64 * 37 + 5
    x = _special_input(n, blocksize, dtype, seed=7)
    q, absmax = _ours_quantize(x, blocksize, qt)
    # input and packed output misaligned by one element / one byte
    xbuf = torch.empty(n + 1, dtype=x.dtype, device=x.device)
    xbuf[1:] = x
    qbuf = torch.full(((n + 1) // 2 + 1,), 0xAB, dtype=torch.uint8, device=x.device)
    ab2 = torch.empty_like(absmax)
    FC.launch_quantize_4bit(_v(xbuf[1:], "A"), _v(qbuf[1:], "q"), _v(ab2, "absmax"), blocksize, qt)
    sync()
    assert torch.equal(qbuf[1:], q) and qbuf[0].item() == 0xAB
    _assert_same_floats(ab2, absmax, "absmax")
    # dequantize from a misaligned q into a misaligned out equals the aligned launch
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    FC.launch_dequantize_4bit(_v(q, "q"), _v(absmax, "absmax"), _v(out, "out"), n, blocksize, qt)
    obuf = torch.empty(n + 1, dtype=x.dtype, device=x.device)
    FC.launch_dequantize_4bit(_v(qbuf[1:], "q"), _v(absmax, "absmax"), _v(obuf[1:], "out"), n, blocksize, qt)
    sync()
    _assert_same_floats(obuf[1:], out, "misaligned dequantize")


def _unpack_codes(q, n):
    q = q.reshape(-1).to(torch.int64)
    return torch.stack([q >> 4, q & 15], dim=1).reshape(-1)[:n]


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", list(DTYPES))
def test_dequantize_follows_the_formula(qt, dtype):
    # y = T(fl32(lut[c] * absmax)), FP4 code 8 -> -0.0; checked without bitsandbytes
    blocksize, n = 32, 32 * 40 + 3
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, ((n + 1) // 2,), generator=g, dtype=torch.uint8).to(DEVICE)
    absmax = (torch.rand(-(-n // blocksize), generator=g) * 4).to(DEVICE)
    out = torch.empty(n, dtype=DTYPES[dtype], device=DEVICE)
    FC.launch_dequantize_4bit(_v(q, "q"), _v(absmax, "absmax"), _v(out, "out"), n, blocksize, qt)
    sync()
    lut = _code_map(qt).cpu()
    codes = _unpack_codes(q.cpu(), n)
    ref = (lut[codes] * absmax.cpu()[torch.arange(n) // blocksize]).to(DTYPES[dtype])
    _assert_same_floats(out.cpu(), ref, "dequantize formula")


# --------------------------------------------------------------------------------------------------
# gemv / small gemm vs a float64 reference
# --------------------------------------------------------------------------------------------------
def _quantized_weight(N, K, blocksize, qt, seed):
    g = torch.Generator().manual_seed(seed)
    W = (torch.randn(N, K, generator=g) * 0.5).to(DEVICE)
    q, absmax = _ours_quantize(W.reshape(-1), blocksize, qt)
    return q, absmax


NF4_HEX = [0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871, 0x00000000,
           0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000]
FP4_MAG_HEX = [0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab, 0x3e800000]


def _from_bits(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def _code_map(kind, seed=0):
    """The 16-value map: NF4, FP4 as bnb's CUDA dequantizer computes it (code 8 = -0.0), or custom."""
    if kind == "nf4":
        return _from_bits(NF4_HEX).to(DEVICE)
    if kind == "fp4":
        mag = _from_bits(FP4_MAG_HEX)
        return torch.cat([mag, mag * -1.0]).to(DEVICE)
    g = torch.Generator().manual_seed(seed)  # an arbitrary (unsorted) custom map
    return (torch.rand(16, generator=g) * 2 - 1).to(DEVICE)


def _reference(A, q, absmax, code, bias, N, K, blocksize):
    """float64 A @ W.T (+ bias) and |A| @ |W|.T, W = code[c] * absmax[block] in float64."""
    codes = _unpack_codes(q, N * K)
    idx = torch.arange(N * K, device=q.device) // blocksize
    W = (code.double()[codes] * absmax.double()[idx]).reshape(N, K)
    A64 = A.double().reshape(-1, K)
    ref = A64 @ W.T
    if bias is not None:
        ref = ref + bias.double()
    return ref, A64.abs() @ W.abs().T + (0 if bias is None else bias.double().abs())


def _assert_matmul_close(out, ref, absref, dtype, K, what):
    # fp32 accumulation (K roundings at most) plus the final rounding to T
    tol = absref * (K * 2.0**-23) + (ref.abs() + absref * (K * 2.0**-23)) * 2 * EPS[dtype] + 1e-7
    err = (out.double().reshape(ref.shape) - ref).abs()
    bad = (err > tol) | torch.isnan(out.double().reshape(ref.shape))
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {bad.numel()} outputs off, "
                                 f"max err {float(err.max()):.3e}, tol at worst {float(tol[bad].min()):.3e}")


GEMV_SHAPES = pick([(1, 32), (7, 64), (33, 96), (100, 4128), (257, 320), (1024, 4096)],
                   [(1, 32), (7, 64), (33, 96), (20, 4128), (257, 320)])


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("qt", ["nf4", "fp4", "custom"])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_float64_reference(dtype, qt, blocksize, with_bias):
    for N, K in GEMV_SHAPES:
        q, absmax = _quantized_weight(N, K, blocksize, "fp4" if qt == "fp4" else "nf4", seed=N * 7 + K)
        code = _code_map(qt, seed=N)
        g = torch.Generator().manual_seed(K)
        A = torch.randn(K, generator=g).to(DTYPES[dtype]).to(DEVICE)
        bias = torch.randn(N, generator=g).to(DTYPES[dtype]).to(DEVICE) if with_bias else None
        out = torch.full((N + GUARD,), float("nan"), dtype=DTYPES[dtype], device=DEVICE)
        FC.launch_gemv_4bit(_v(A, "A"), _v(q, "B"), _v(absmax, "absmax"), _v(code, "code"),
                            None if bias is None else _v(bias, "bias"), _v(out[:N], "out"), N, K, blocksize)
        sync()
        assert torch.all(torch.isnan(out[N:].float())), "gemv wrote past N"
        ref, absref = _reference(A, q, absmax, code, bias, N, K, blocksize)
        _assert_matmul_close(out[:N], ref, absref, dtype, K, f"gemv N={N} K={K}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 9, 15, 16])
@pytest.mark.parametrize("qt", ["nf4", "custom"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemm_small_matches_float64_reference(dtype, M, qt, with_bias):
    for (N, K), blocksize in pick([((1, 32), 32), ((33, 96), 64), ((100, 1056), 128), ((250, 2080), 4096),
                                   ((1024, 4096), 64)],
                                  [((1, 32), 32), ((33, 96), 64), ((100, 1056), 128), ((40, 4096), 4096)]):
        q, absmax = _quantized_weight(N, K, blocksize, "nf4", seed=N + K)
        code = _code_map(qt, seed=K)
        g = torch.Generator().manual_seed(M * 1000 + N)
        A = torch.randn(M, K, generator=g).to(DTYPES[dtype]).to(DEVICE)
        bias = torch.randn(N, generator=g).to(DTYPES[dtype]).to(DEVICE) if with_bias else None
        out = torch.full((M * N + GUARD,), float("nan"), dtype=DTYPES[dtype], device=DEVICE)
        FC.launch_gemm_4bit_small(_v(A, "A"), _v(q, "B"), _v(absmax, "absmax"), _v(code, "code"),
                                  None if bias is None else _v(bias, "bias"), _v(out[:M * N], "out"),
                                  M, N, K, blocksize)
        sync()
        assert torch.all(torch.isnan(out[M * N:].float())), "gemm wrote past M*N"
        ref, absref = _reference(A, q, absmax, code, bias, N, K, blocksize)
        _assert_matmul_close(out[:M * N].reshape(M, N), ref, absref, dtype, K, f"gemm M={M} N={N} K={K}")


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_matmul_unaligned_pointers(dtype):
    N, K, M, blocksize = 70, 320, 3, 64
    q, absmax = _quantized_weight(N, K, blocksize, "nf4", seed=11)
    code = _code_map("nf4")
    g = torch.Generator().manual_seed(5)
    A = torch.randn(M, K, generator=g).to(DTYPES[dtype]).to(DEVICE)
    abuf = torch.empty(M * K + 1, dtype=A.dtype, device=DEVICE)
    abuf[1:] = A.reshape(-1)
    qbuf = torch.empty(q.numel() + 1, dtype=torch.uint8, device=DEVICE)
    qbuf[1:] = q
    ref, absref = _reference(A, q, absmax, code, None, N, K, blocksize)
    out = torch.empty(M * N, dtype=A.dtype, device=DEVICE)
    FC.launch_gemm_4bit_small(_v(abuf[1:], "A"), _v(qbuf[1:], "B"), _v(absmax, "absmax"), _v(code, "code"),
                              None, _v(out, "out"), M, N, K, blocksize)
    gv = torch.empty(N, dtype=A.dtype, device=DEVICE)
    FC.launch_gemv_4bit(_v(abuf[1:K + 1], "A"), _v(qbuf[1:], "B"), _v(absmax, "absmax"), _v(code, "code"),
                        None, _v(gv, "out"), N, K, blocksize)
    sync()
    _assert_matmul_close(out.reshape(M, N), ref, absref, dtype, K, "gemm unaligned")
    _assert_matmul_close(gv.reshape(1, N), ref[:1], absref[:1], dtype, K, "gemv unaligned")


def test_gemm_small_rejects_more_than_16_rows():
    assert FC.SMALL_GEMM_MAX_ROWS == 16
    A = torch.zeros(17, 32, device=DEVICE)
    q = torch.zeros(16 * 17, dtype=torch.uint8, device=DEVICE)
    absmax = torch.ones(17, device=DEVICE)
    out = torch.empty(17, 17, device=DEVICE)
    with pytest.raises(ValueError):
        FC.launch_gemm_4bit_small(_v(A), _v(q), _v(absmax), _v(_code_map("nf4")), None, _v(out),
                                  17, 17, 32, 32)


# --------------------------------------------------------------------------------------------------
# gemv / gemm on bitsandbytes' quantized weights, and vs bnb's gemv_4bit
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_matmul_on_bnb_weights(bnbF, dtype, qt, blocksize):
    N, K = 512, 1024
    g = torch.Generator().manual_seed(21)
    W = torch.randn(N, K, generator=g).to(DTYPES[dtype]).to(DEVICE)
    bq, st = bnbF.quantize_4bit(W, blocksize=blocksize, quant_type=qt)
    q = bq.reshape(-1).view(torch.uint8)
    code = st.code.float().contiguous()
    A = torch.randn(4, K, generator=g).to(DTYPES[dtype]).to(DEVICE)
    ref, absref = _reference(A, q, st.absmax, code, None, N, K, blocksize)

    gv = torch.empty(N, dtype=A.dtype, device=DEVICE)
    FC.launch_gemv_4bit(_v(A[0]), _v(q), _v(st.absmax), _v(code), None, _v(gv), N, K, blocksize)
    out = torch.empty(4, N, dtype=A.dtype, device=DEVICE)
    FC.launch_gemm_4bit_small(_v(A), _v(q), _v(st.absmax), _v(code), None, _v(out), 4, N, K, blocksize)
    sync()
    _assert_matmul_close(gv.reshape(1, N), ref[:1], absref[:1], dtype, K, "gemv on bnb weights")
    _assert_matmul_close(out, ref, absref, dtype, K, "gemm on bnb weights")

    # bnb's own gemv (products rounded in T for fp16/bf16): relative L2 agreement only
    bout = bnbF.gemv_4bit(A[:1].reshape(1, 1, K), bq, state=st).reshape(-1)
    sync()
    rel = float((bout.double() - gv.double()).norm() / ref[0].norm())
    assert rel < 8 * EPS[dtype] + 1e-5, f"ours vs bnb gemv_4bit: relative L2 difference {rel:.3e}"


def test_nf4_thresholds_cuda():
    """Every NF4 threshold (bnb's CUDA literals as nvcc compiles them), its neighbours and values
    between get the codes of the rule checked on the CPU by tests/test_nf4_thresholds.py."""
    from test_nf4_thresholds import blocks_of, check_nf4_codes, codes, threshold_probe_values
    x = threshold_probe_values()
    a, idx = blocks_of(x)
    q, absmax = _ours_quantize(torch.from_numpy(a).to(DEVICE), 64, "nf4")
    assert torch.all(absmax == 1.0)
    check_nf4_codes(codes(q.cpu().numpy(), a.size), x, idx)
