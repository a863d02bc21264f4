"""CUDA LLM.int8 kernels (cuda_src/int8.cu) launched directly through
bnbcy.functional._int8_cuda with torch CUDA tensors.

* outlier columns + vector-wise quantization: codes, row statistics and outlier columns
  bit-identical to bitsandbytes' CUDA ``int8_vectorwise_quant`` (fp16 inputs with outliers,
  zero rows, NaN, inf; thresholds 0 and 6.0; warp-per-row and block-per-row shapes; aligned
  and unaligned rows). Outputs are poisoned first and guarded.
* mm_dequant: bit-identical to bitsandbytes' CUDA ``int8_mm_dequant`` (fp16, with and without an
  fp16 bias); bf16/fp32 outputs against a float64 emulation of the pinned expression.
* int8 GEMM (``mma`` and ``dp4a`` kernels): exactly equal to an integer reference (int64 on the
  CPU; float64 on the GPU for the large shapes, exact there) and to ``torch._int_mm`` where that
  applies, for M/N/K tails, K not a multiple of 4, K = 0 and unaligned operands.

Everything launching a kernel carries the ``cuda`` marker (skipped without a GPU); the bnb
comparisons skip when the bitsandbytes CUDA library cannot be loaded.
"""

import pytest
import torch
from cuda_env import DEVICE, EMULATED, pick, sync  # noqa: F401

from bnbcy import _C
from bnbcy.functional import _int8_cuda as I8

cuda = pytest.mark.cuda
GUARD = 64
DEQ_CONST = 6.200012e-05  # float32 0x38820610


def _v(t, name="t"):
    return _C.view(t, name)


def _bits(t):
    t = t.contiguous().cpu()
    return t.view(torch.int32) if t.element_size() == 4 else t.view(torch.int16)


def _assert_same_floats(a, b, what, signed_zeros=True):
    """Bit equality of two float tensors (NaNs compared by position only)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (what, a.dtype, b.dtype, a.shape, b.shape)
    na, nb = torch.isnan(a.float()).cpu(), torch.isnan(b.float()).cpu()
    assert torch.equal(na, nb), f"{what}: NaN positions differ"
    if not signed_zeros:  # -0.0 + 0.0 == +0.0
        a, b = a + 0.0, b + 0.0
    ba, bb = _bits(a)[~na], _bits(b)[~nb]
    bad = (ba != bb).nonzero()
    assert bad.numel() == 0, (f"{what}: {bad.numel()} values differ, first at {bad[:5].flatten().tolist()}: "
                              f"{a.cpu()[~na][bad[:5, 0]].tolist()} vs {b.cpu()[~nb][bad[:5, 0]].tolist()}")




# --------------------------------------------------------------------------------------------------
# vector-wise quantization
# --------------------------------------------------------------------------------------------------
def _special_fp16(rows, cols, seed):
    """randn * 2 with outliers (|a| = 6.0 exactly, 7.5, -9, inf), a zero row, NaNs, an all-NaN row
    and a row holding only outliers."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g, dtype=torch.float32) * 2.0
    if cols > 3:
        idx = torch.randint(0, rows * cols, (max(1, rows * cols // 97),), generator=g)
        vals = torch.tensor([6.0, -6.0, 7.5, -9.0, 5.99609375, 100.0])
        x.view(-1)[idx] = vals[torch.arange(idx.numel()) % vals.numel()]
    if rows > 1:
        x[1] = 0.0
    if rows > 2:
        x[2, ::5] = float("nan")
    if rows > 3:
        x[3] = float("nan")
    if rows > 4:
        x[4] = 8.0
        x[4, ::2] = -7.0
    if rows > 5 and cols > 2:
        x[5, 1] = float("inf")
    return x.to(torch.float16).to(DEVICE)


def _ours_vectorwise_quant(A, threshold):
    rows, cols = A.shape
    n = rows * cols
    av = _v(A, "A")
    flags = None
    if threshold > 0.0:
        flags = torch.zeros(cols + GUARD, dtype=torch.uint8, device=A.device)
        I8.launch_outlier_cols(av, _v(flags[:cols], "flags"), rows, cols, threshold)
    cbuf = torch.full((n + GUARD,), 0x5A, dtype=torch.int8, device=A.device)
    sbuf = torch.full((rows + GUARD,), float("nan"), dtype=torch.float32, device=A.device)
    fv = _v(flags[:cols], "flags") if (flags is not None and rows > 1) else None
    I8.launch_vectorwise_quant(av, _v(cbuf[:n], "CA"), _v(sbuf[:rows], "row_stats"), fv, rows, cols, threshold)
    sync()
    assert torch.all(cbuf[n:] == 0x5A), "vectorwise_quant wrote past CA"
    assert torch.all(torch.isnan(sbuf[rows:])), "vectorwise_quant wrote past row_stats"
    outlier_cols = None
    if flags is not None:
        assert torch.all(flags[cols:] == 0), "outlier_cols wrote past flags"
        outlier_cols = torch.nonzero(flags[:cols]).view(-1)
    return cbuf[:n].view(rows, cols), sbuf[:rows], outlier_cols


QUANT_SHAPES = [(1, 1), (1, 7), (3, 64), (6, 100), (8, 1000), (7, 1024), (9, 1025), (4, 4096), (6, 8191),
                (33, 2048), (2, 20000), (300, 72)]


@cuda
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("shape", QUANT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_vectorwise_quant_bit_identical_to_bnb(bnbF, shape, threshold):
    rows, cols = shape
    A = _special_fp16(rows, cols, seed=rows * 100003 + cols)
    CA, stats, cols_out = _ours_vectorwise_quant(A, threshold)
    bCA, bstats, bcols = bnbF.int8_vectorwise_quant(A, threshold=threshold)
    sync()
    bad = (CA != bCA).nonzero()
    assert bad.numel() == 0, f"codes differ at {bad[:5].tolist()}: {CA[tuple(bad[:5].T)].tolist()} vs " \
                             f"{bCA[tuple(bad[:5].T)].tolist()}"
    # the sign of a zero statistic (all-zero/NaN/outlier rows) depends on the reduction order
    _assert_same_floats(stats, bstats, "row_stats", signed_zeros=False)
    if threshold == 0.0:
        assert bcols is None
    else:
        assert bcols is not None and torch.equal(cols_out.cpu(), bcols.cpu()), (cols_out, bcols)


@cuda
@pytest.mark.parametrize("offset", [1, 2, 3])
def test_vectorwise_quant_unaligned_input(bnbF, offset):
    """A row start that is not 16-byte aligned takes the scalar path."""
    rows, cols = 5, 2048
    buf = _special_fp16(1, rows * cols + offset, seed=offset).view(-1)
    A = buf[offset:].view(rows, cols)
    for threshold in (0.0, 6.0):
        CA, stats, cols_out = _ours_vectorwise_quant(A, threshold)
        bCA, bstats, bcols = bnbF.int8_vectorwise_quant(A.contiguous(), threshold=threshold)
        assert torch.equal(CA, bCA)
        _assert_same_floats(stats, bstats, "row_stats", signed_zeros=False)
        if threshold > 0.0:
            assert torch.equal(cols_out.cpu(), bcols.cpu())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vectorwise_quant_other_dtypes(dtype):
    """bf16/fp32 (bnb's CUDA op takes fp16 only): codes within one step of round(a * 127 / max)."""
    g = torch.Generator().manual_seed(7)
    A = (torch.randn(37, 1500, generator=g) * 3).to(dtype).to(DEVICE)
    CA, stats, cols_out = _ours_vectorwise_quant(A, 6.0)
    Af = A.float()
    t = torch.tensor(6.0, dtype=dtype).float().item()
    keep = Af.abs() < t
    ref_stats = torch.where(keep, Af.abs(), torch.zeros_like(Af)).amax(1)
    torch.testing.assert_close(stats, ref_stats, rtol=0, atol=0)
    ref = torch.round(Af * (127.0 / ref_stats[:, None]))
    ref = torch.where(Af.abs() < 6.0, ref, torch.zeros_like(ref))
    ref[:, (Af.abs() >= t).any(0)] = 0
    assert (CA.float() - ref).abs().max().item() <= 1
    assert torch.equal(cols_out.cpu(), torch.nonzero((Af.abs() >= t).any(0)).view(-1).cpu())


# --------------------------------------------------------------------------------------------------
# mm_dequant
# --------------------------------------------------------------------------------------------------
def _dequant_inputs(rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    A = torch.randint(-(2**20), 2**20, (rows, cols), generator=g, dtype=torch.int32)
    flat = A.view(-1)
    big = flat[::13]  # every 13th value anywhere in the int32 range (fp16 overflow included)
    flat[::13] = torch.randint(-(2**31), 2**31, (big.numel(),), generator=g, dtype=torch.int64).to(torch.int32)
    if rows * cols > 2:
        A.view(-1)[1] = 0
    row = (torch.rand(rows, generator=g) * 8 + 0.01).to(torch.float16).float()
    col = (torch.rand(cols, generator=g) * 8 + 0.01).to(torch.float16).float()
    bias = (torch.randn(cols, generator=g) * 4).to(torch.float16)
    return A.to(DEVICE), row.to(DEVICE), col.to(DEVICE), bias.to(DEVICE)


def _ours_dequant(A, row, col, bias, dtype):
    rows, cols = A.shape
    n = rows * cols
    obuf = torch.full((n + GUARD,), float("nan"), dtype=dtype, device=A.device)
    I8.launch_mm_dequant(_v(A, "A"), _v(row, "row_stats"), _v(col, "col_stats"),
                         None if bias is None else _v(bias, "bias"), _v(obuf[:n], "out"), rows, cols)
    sync()
    assert torch.all(torch.isnan(obuf[n:].float())), "mm_dequant wrote past out"
    return obuf[:n].view(rows, cols)


def _emulated_dequant(A, row, col, bias, dtype):
    """fl32(fl32(A * row) * col), then fma with the constant in float64 (exact product), rounded."""
    p = (A.float() * row[:, None]) * col[None, :]
    b = torch.zeros_like(p) if bias is None else bias.float()[None, :].expand_as(p)
    c = torch.tensor(DEQ_CONST, dtype=torch.float32).double()
    return (p.double() * c + b.double()).float().to(dtype)


DEQUANT_SHAPES = [(1, 1), (3, 7), (17, 64), (5, 1001), (128, 4096), (2, 8)]


@cuda
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("shape", DEQUANT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_mm_dequant_bit_identical_to_bnb(bnbF, shape, with_bias):
    A, row, col, bias = _dequant_inputs(*shape, seed=shape[0] * 7919 + shape[1])
    bias = bias if with_bias else None
    out = _ours_dequant(A, row, col, bias, torch.float16)
    ref = bnbF.int8_mm_dequant(A, row, col, bias=bias)
    sync()
    _assert_same_floats(out, ref.view(out.shape), "mm_dequant fp16")


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mm_dequant_matches_emulation(dtype):
    for shape in DEQUANT_SHAPES:
        A, row, col, bias = _dequant_inputs(*shape, seed=shape[0] + shape[1])
        bias = bias.to(dtype)
        for b in (None, bias):
            out = _ours_dequant(A, row, col, b, dtype)
            _assert_same_floats(out, _emulated_dequant(A, row, col, b, dtype), f"mm_dequant {dtype} {shape}")


@cuda
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_mm_dequant_bias_of_another_dtype(out_dtype, bias_dtype):
    """The bias is read in its own dtype (it was read as the output dtype: an fp32 bias with fp16
    output gave garbage, an fp16 bias with fp32 output read past the buffer)."""
    from bnbcy import functional as F
    for shape in ((3, 7), (17, 64), (2, 8)):  # scalar and 16-byte paths
        A, row, col, bias = _dequant_inputs(*shape, seed=shape[0] * 3 + shape[1])
        b = bias.to(bias_dtype)
        out = F.int8_mm_dequant(A, row, col, bias=b, dtype=out_dtype)
        sync()
        _assert_same_floats(out, _emulated_dequant(A, row, col, b, out_dtype).to(out.device),
                            f"bias {bias_dtype} out {out_dtype} {shape}")


@cuda
def test_mm_dequant_unaligned_scalar_path(bnbF):
    A, row, col, bias = _dequant_inputs(9, 64, seed=3)
    buf = torch.empty(A.numel() + 1, dtype=torch.int32, device=DEVICE)
    Au = buf[1:].view(A.shape)
    Au.copy_(A)
    out = _ours_dequant(Au, row, col, bias, torch.float16)
    _assert_same_floats(out, bnbF.int8_mm_dequant(A, row, col, bias=bias).view(out.shape), "unaligned")


# --------------------------------------------------------------------------------------------------
# int8 GEMM
# --------------------------------------------------------------------------------------------------
GEMM_SHAPES = [(1, 1, 1), (1, 1, 3), (3, 5, 7), (1, 17, 33), (17, 33, 127), (33, 17, 129), (127, 129, 64),
               (128, 128, 64), (129, 127, 65), (64, 64, 16), (3, 200, 1023), (1, 4096, 4096), (200, 300, 1024),
               (257, 4099, 4093), (130, 258, 4100), (1000, 1000, 4097), (4096, 4096, 4096)]
GEMM_SHAPES = pick(GEMM_SHAPES, [s for s in GEMM_SHAPES if s[0] * s[1] * s[2] <= 2**23])
POISON = -123456789


def _gemm_ref(A, B):
    M, K = A.shape
    N = B.shape[0]
    if M * N * K <= 2**27:
        return (A.cpu().long() @ B.cpu().long().T).to(torch.int32)
    # float64 on the GPU is exact: |partial sums| <= K * 2**14 < 2**53
    return (A.double() @ B.double().T).to(torch.int32).cpu()


def _ours_gemm(A, B, kernel, M, N, K):
    cbuf = torch.full((M * N + GUARD,), POISON, dtype=torch.int32, device=DEVICE)
    I8.launch_int8_gemm(_v(A, "A"), _v(B, "B"), _v(cbuf[: M * N], "C"), M, N, K, kernel=kernel)
    sync()
    assert torch.all(cbuf[M * N:] == POISON), "gemm wrote past C"
    return cbuf[: M * N].view(M, N)


def _rand_i8(shape, g):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


@cuda
@pytest.mark.parametrize("kernel", I8.GEMM_KERNELS)
@pytest.mark.parametrize("shape", GEMM_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_int8_gemm_exact(kernel, shape):
    M, N, K = shape
    g = torch.Generator().manual_seed(M * 31 + N * 7 + K)
    A, B = _rand_i8((M, K), g).to(DEVICE), _rand_i8((N, K), g).to(DEVICE)
    if M * N * K > 1:  # extremes: -128 * -128 everywhere in the first row / column
        A[0] = -128
        B[0] = -128
    C = _ours_gemm(A, B, kernel, M, N, K)
    ref = _gemm_ref(A, B)
    bad = (C.cpu() != ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} wrong entries, first at {bad[:5].tolist()}"
    if M > 16 and K % 8 == 0 and N % 8 == 0 and K >= 16:
        try:
            tref = torch._int_mm(A, B.T)
        except RuntimeError:  # pragma: no cover - depends on the torch build
            return
        assert torch.equal(C, tref)


@cuda
@pytest.mark.parametrize("kernel", I8.GEMM_KERNELS)
def test_int8_gemm_k_zero_writes_zeros(kernel):
    A = torch.empty(5, 0, dtype=torch.int8, device=DEVICE)
    B = torch.empty(7, 0, dtype=torch.int8, device=DEVICE)
    C = _ours_gemm(A, B, kernel, 5, 7, 0)
    assert torch.all(C == 0)


@cuda
@pytest.mark.parametrize("kernel", I8.GEMM_KERNELS)
@pytest.mark.parametrize("offset", [1, 4, 8])
def test_int8_gemm_unaligned_operands(kernel, offset):
    """Operands and output off their 16-byte alignment (no cp.async / vector stores)."""
    M, N, K = 70, 90, 256
    g = torch.Generator().manual_seed(offset)
    abuf, bbuf = _rand_i8((M * K + offset,), g).to(DEVICE), _rand_i8((N * K + offset,), g).to(DEVICE)
    A, B = abuf[offset:].view(M, K), bbuf[offset:].view(N, K)
    cbuf = torch.full((M * N + 1 + GUARD,), POISON, dtype=torch.int32, device=DEVICE)
    C = cbuf[1: 1 + M * N]
    I8.launch_int8_gemm(_v(A, "A"), _v(B, "B"), _v(C, "C"), M, N, K, kernel=kernel)
    sync()
    assert cbuf[0].item() == POISON and torch.all(cbuf[1 + M * N:] == POISON)
    assert torch.equal(C.view(M, N).cpu(), _gemm_ref(A, B))


@cuda
def test_int8_gemm_kernels_agree_random_shapes():
    g = torch.Generator().manual_seed(1234)
    for _ in range(20):
        M, N, K = (int(v) for v in torch.randint(1, 300, (3,), generator=g))
        A, B = _rand_i8((M, K), g).to(DEVICE), _rand_i8((N, K), g).to(DEVICE)
        ref = _gemm_ref(A, B)
        for kernel in I8.GEMM_KERNELS:
            assert torch.equal(_ours_gemm(A, B, kernel, M, N, K).cpu(), ref), (kernel, M, N, K)


# --------------------------------------------------------------------------------------------------
# launcher argument checks (no GPU needed: they raise before any launch)
# --------------------------------------------------------------------------------------------------
def test_launch_int8_gemm_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kernel"):
        I8.launch_int8_gemm(None, None, None, 1, 1, 1, kernel="wmma")
    with pytest.raises(ValueError, match="M"):
        I8.launch_int8_gemm(None, None, None, -1, 1, 1)
    with pytest.raises(ValueError, match="K"):
        I8.launch_int8_gemm(None, None, None, 1, 1, 2**31)


@cuda
@pytest.mark.parametrize("kernel", I8.GEMM_KERNELS)
def test_int8_gemm_splits_tall_products(monkeypatch, kernel):
    """M above gridDim.y (65535) row tiles is launched in row slabs instead of raising (the limit
    is lowered here so that the slabs are small)."""
    monkeypatch.setattr(I8, "_MAX_GRID_Y", 2)
    bm = I8._GEMM_TILES[kernel][0]
    M, N, K = 5 * bm + 3, 9, 40
    g = torch.Generator().manual_seed(4)
    A, B = _rand_i8((M, K), g).to(DEVICE), _rand_i8((N, K), g).to(DEVICE)
    C = _ours_gemm(A, B, kernel, M, N, K)
    assert torch.equal(C.cpu(), _gemm_ref(A, B))


def test_launch_vectorwise_quant_rejects_negative_threshold():
    with pytest.raises(ValueError, match="threshold"):
        I8.launch_vectorwise_quant(None, None, None, None, 1, 1, -1.0)


def test_int8_kernels_registered():
    from bnbcy import kernels
    syms = {k["symbol"] for k in kernels.list_kernels() if k["module"] == "int8"}
    assert {"bnbcy_int8_gemm_mma", "bnbcy_int8_gemm_dp4a", "bnbcy_int8_vectorwise_quant_f16",
            "bnbcy_int8_outlier_cols_bf16", "bnbcy_int8_mm_dequant_f32"} <= syms
