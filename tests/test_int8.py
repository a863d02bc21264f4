"""LLM.int8() ops on the CPU: against a NumPy model of NUMERICS.md §5 (written here from the spec),
against int64 / float64 references, and against the installed bitsandbytes (whose CPU path is exact for
the quantization, NUMERICS §11.5)."""
import numpy as np
import pytest
import torch

import bnbcy
import bnbcy.functional as F
from test_blockwise_numerics import use_cpu_isa

DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
C_MM = np.uint32(0x38820610).view(np.float32)     # fl32(1/127^2), bnb's CUDA constant
C_DQ = np.uint32(0x3C010204).view(np.float32)     # fl32(1/127)


@pytest.fixture(params=["avx512", "scalar"])
def cpu_path(request, monkeypatch):
    use_cpu_isa(request.param, monkeypatch)
    return request.param


def _input(rows, cols, dtype, seed, outlier_cols=(), zero_rows=()):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, cols, generator=g) * 2
    for c in outlier_cols:
        A[:, c] *= 8
    for r in zero_rows:
        A[r] = 0
    return A.to(DT[dtype])


def quant_model(A, threshold):
    """NumPy model of §5.1 (CPU rounding: scale = fl32(127 * fl32(1/m)))."""
    x = A.float().numpy().reshape(-1, A.shape[-1]).astype(np.float32)
    thr = np.float32(torch.tensor(threshold, dtype=A.dtype).float().item()) if threshold > 0 else np.inf
    absx = np.abs(x)
    inl = absx < thr if threshold > 0 else absx <= thr
    m = np.where(inl & ~np.isnan(absx), absx, 0).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        scale = (np.float32(127) * (np.float32(1) / m)).astype(np.float32)
        y = np.rint((x * scale[:, None]).astype(np.float32))
    q = np.nan_to_num(np.clip(y, -127, 127), nan=0).astype(np.int8)
    cols = None
    if threshold > 0:
        out = absx >= thr
        q[out] = 0
        cols = np.flatnonzero(out.any(axis=0))
        if x.shape[0] > 1:
            q[:, cols] = 0
    return q.reshape(A.shape), m, cols


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 2.5])
@pytest.mark.parametrize("shape", [(1, 300), (64, 300), (5, 7, 33)])
def test_vectorwise_quant_matches_model(cpu_path, dtype, threshold, shape):
    A = _input(int(np.prod(shape[:-1])), shape[-1], dtype, seed=len(shape) * 7 + shape[-1],
               outlier_cols=(3, shape[-1] - 1), zero_rows=(0,) if shape[0] > 1 else ()).reshape(shape)
    CA, stats, cols = F.int8_vectorwise_quant(A, threshold)
    q, m, mcols = quant_model(A, threshold)
    assert CA.dtype == torch.int8 and CA.shape == A.shape and stats.shape == (q.size // shape[-1],)
    np.testing.assert_array_equal(stats.numpy(), m)
    np.testing.assert_array_equal(CA.numpy(), q)
    if threshold == 0:
        assert cols is None
    else:
        assert cols.dtype == torch.int64 and cols.tolist() == mcols.tolist()


def test_vectorwise_quant_edge_values():
    A = torch.tensor([[1.0, float("nan"), -2.0, 0.5], [0.0, 0.0, 0.0, 0.0], [float("inf"), 1.0, 2.0, 3.0]],
                     dtype=torch.float16)
    CA, stats, _ = F.int8_vectorwise_quant(A)
    # NaN is left out of the row maximum and gets code 0 (as the CUDA kernel); zero row -> 0;
    # an inf row scales everything to 0
    assert stats.tolist()[:2] == [2.0, 0.0] and stats[2].item() == float("inf")
    assert CA.tolist() == [[64, 0, -127, 32], [0, 0, 0, 0], [0, 0, 0, 0]]
    # single row with threshold: only the outliers are zeroed, not whole columns
    A1 = torch.tensor([[1.0, 7.0, -2.0]], dtype=torch.float16)
    CA1, s1, c1 = F.int8_vectorwise_quant(A1, 6.0)
    assert CA1.tolist() == [[64, 0, -127]] and s1.item() == 2.0 and c1.tolist() == [1]


def test_vectorwise_dequant_exact():
    A = _input(10, 50, "float16", 1)
    CA, stats, _ = F.int8_vectorwise_quant(A)
    y = F.int8_vectorwise_dequant(CA, stats)
    want = ((CA.numpy().astype(np.float32) * stats.numpy()[:, None]).astype(np.float32) * C_DQ).astype(np.float32)
    np.testing.assert_array_equal(y.numpy(), want)
    yn = F.int8_vectorwise_dequant(CA.numpy(), stats.numpy())
    np.testing.assert_array_equal(yn, want)


@pytest.mark.parametrize("MKN", [(1, 1, 1), (3, 5, 2), (17, 33, 9), (128, 256, 64), (2, 4097, 3)])
def test_linear_matmul_exact(MKN):
    M, K, N = MKN
    g = torch.Generator().manual_seed(M * K)
    A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
    B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    ref = A.numpy().astype(np.int64) @ B.numpy().astype(np.int64).T
    out = torch.full((M, N), -7, dtype=torch.int32)
    C = F.int8_linear_matmul(A, B, out=out)
    assert C is out
    np.testing.assert_array_equal(C.numpy(), ref)
    np.testing.assert_array_equal(F.int8_linear_matmul(A.numpy(), B.numpy()), ref)
    C3 = F.int8_linear_matmul(A.reshape(1, M, K), B)
    assert C3.shape == (1, M, N) and torch.equal(C3[0], C)


@pytest.mark.parametrize("out_dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("bias_dtype", [None, "float16", "float32"])
def test_mm_dequant_matches_formula(cpu_path, out_dtype, bias_dtype):
    g = torch.Generator().manual_seed(3)
    C = torch.randint(-200000, 200000, (37, 45), dtype=torch.int32, generator=g)
    r, c = torch.rand(37, generator=g) * 4, torch.rand(45, generator=g) * 4
    bias = None if bias_dtype is None else torch.randn(45, generator=g).to(DT[bias_dtype])
    y = F.int8_mm_dequant(C, r, c, bias=bias, dtype=DT[out_dtype])
    assert y.dtype == DT[out_dtype] and y.shape == C.shape
    p = ((C.numpy().astype(np.float32) * r.numpy()[:, None]).astype(np.float32) * c.numpy()[None]).astype(np.float32)
    b = 0.0 if bias is None else bias.float().numpy().astype(np.float64)[None]
    want = torch.from_numpy(p.astype(np.float64) * np.float64(C_MM) + b)  # fma: one rounding, to out dtype
    if out_dtype == "float32":
        want = want.float()
    else:
        want = want.to(DT[out_dtype])
    assert torch.equal(y, want)


def test_mm_dequant_default_is_float16_and_out():
    C = torch.randint(-1000, 1000, (4, 8), dtype=torch.int32)
    r, c = torch.rand(4), torch.rand(8)
    assert F.int8_mm_dequant(C, r, c).dtype == torch.float16
    out = torch.empty(4, 8, dtype=torch.bfloat16)
    assert F.int8_mm_dequant(C, r, c, out=out) is out


def test_double_quant():
    A = _input(40, 96, "float16", 5, outlier_cols=(10,))
    CA, CAt, rs, cs, cols = F.int8_double_quant(A, threshold=6.0)
    CA2, rs2, cols2 = F.int8_vectorwise_quant(A, 6.0)
    assert torch.equal(CA, CA2) and torch.equal(rs, rs2) and torch.equal(cols, cols2)
    X = A.float().numpy()
    keep = np.abs(X) < 6.0
    want_cs = np.where(keep, np.abs(X), 0).max(axis=0).astype(np.float32)
    np.testing.assert_array_equal(cs.numpy(), want_cs)
    prod16 = (A * keep_t(keep) * 127).float().numpy()  # the product is rounded in float16 first
    with np.errstate(invalid="ignore", divide="ignore"):
        want = np.nan_to_num(np.rint(prod16 / want_cs), nan=0).astype(np.int8)
    np.testing.assert_array_equal(CAt.numpy(), want)
    with pytest.raises(ValueError, match="must be None"):
        F.int8_double_quant(A, out_row=torch.empty_like(CA))


def keep_t(keep):
    return torch.from_numpy(keep)


# --------------------------------------------------------------------------------- matmul / autograd
def _state(training=False, fp16_weights=False):
    s = bnbcy.MatmulLtState()
    s.is_training, s.has_fp16_weights = training, fp16_weights
    return s


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_matmul_forward_vs_float64(dtype, threshold):
    A = _input(24, 128, dtype, 9, outlier_cols=(5, 77)).reshape(4, 6, 128)
    W = _input(48, 128, dtype, 10)
    bias = torch.randn(48).to(DT[dtype])
    y = bnbcy.matmul(A, W, state=_state(), threshold=threshold, bias=bias)
    assert y.shape == (4, 6, 48) and y.dtype == DT[dtype]
    ref = A.double() @ W.double().t() + bias.double()
    rel = ((y.double() - ref).norm() / ref.norm()).item()
    assert rel < (0.03 if threshold == 0 else 0.015), rel
    # the outlier decomposition is exact for the outlier columns: compare with a model that takes
    # them in 16 bits and the rest through the int8 codes
    if threshold:
        A2 = A.reshape(-1, 128)
        CA, SCA, cols = F.int8_vectorwise_quant(A2.to(torch.float16), threshold)
        CB, SCB, _ = F.int8_vectorwise_quant(W.to(torch.float16))
        regular = (CA.double() * SCA.double()[:, None] / 127) @ (CB.double() * SCB.double()[:, None] / 127).t()
        outl = A2[:, cols].double() @ (CB[:, cols].double() * SCB.double()[:, None] / 127).t()
        model = (regular + outl + bias.double()).reshape(4, 6, 48)
        # the int8 part, the outlier part and their sum are each rounded to the dtype
        size = (regular.abs() + outl.abs() + bias.double().abs()).reshape(4, 6, 48)
        tol = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 1e-5}[dtype]
        assert ((y.double() - model).abs() <= tol * size + 1e-3).all()


@pytest.mark.parametrize("training", [False, True])
def test_matmul_gradients_vs_float64(training):
    g = torch.Generator().manual_seed(4)
    A = (torch.randn(10, 64, generator=g) * 2).requires_grad_()
    W = torch.randn(32, 64, generator=g).requires_grad_()
    b = torch.randn(32, generator=g).requires_grad_()
    st = _state(training=training, fp16_weights=True)
    y = bnbcy.matmul(A, W, state=st, threshold=4.0, bias=b)
    gy = torch.randn(y.shape, generator=g)
    y.backward(gy)
    Wq = st.CB.double() * st.SCB.double()[:, None] / 127
    torch.testing.assert_close(A.grad.double(), gy.double() @ Wq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(W.grad.double(), gy.double().t() @ A.detach().double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(b.grad.double(), gy.double().sum(0), rtol=1e-6, atol=1e-5)


def test_matmul_with_int8_weight_and_state():
    W = _input(16, 32, "float16", 2)
    CB, SCB, _ = F.int8_vectorwise_quant(W)
    st = _state()
    st.CB, st.SCB = CB, SCB
    A = _input(3, 32, "float16", 3)
    y = bnbcy.matmul(A, CB, state=st)
    ref = A.double() @ (CB.double() * SCB.double()[:, None] / 127).t()
    assert ((y.double() - ref).norm() / ref.norm()) < 0.02
    with pytest.raises(ValueError, match="int8"):
        bnbcy.matmul(A, CB, state=_state())


# ------------------------------------------------------------------------------------- bitsandbytes
bnb_F = pytest.importorskip("bitsandbytes.functional", reason="bitsandbytes (a test dependency) is not installed")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("threshold", [0.0, 6.0, 1.5])
def test_vectorwise_quant_bit_identical_to_bitsandbytes(cpu_path, dtype, threshold):
    for seed in range(4):
        A = _input(48, 200, dtype, seed, outlier_cols=(1, 150), zero_rows=(7,))
        CA, stats, cols = F.int8_vectorwise_quant(A, threshold)
        CAb, statsb, colsb = bnb_F.int8_vectorwise_quant(A.clone(), threshold)
        assert torch.equal(CA, CAb) and torch.equal(stats, statsb)
        assert (cols is None and colsb is None) or torch.equal(cols, colsb)


def test_linear_matmul_equals_bitsandbytes():
    A = torch.randint(-128, 128, (128, 512), dtype=torch.int8)
    B = torch.randint(-128, 128, (256, 512), dtype=torch.int8)
    assert torch.equal(F.int8_linear_matmul(A, B), bnb_F.int8_linear_matmul(A, B))


def test_mm_dequant_vs_bitsandbytes_cpu_constant():
    # bitsandbytes' CPU path uses 6.200124e-05 instead of the CUDA 6.200012e-05 (NUMERICS §5.4):
    # the results agree to the float16 rounding of that 1.8e-5 relative difference
    C = torch.randint(-100000, 100000, (64, 64), dtype=torch.int32)
    r, c = torch.rand(64) * 3, torch.rand(64) * 3
    y, yb = F.int8_mm_dequant(C, r, c), bnb_F.int8_mm_dequant(C, r, c)
    assert torch.allclose(y.float(), yb.float(), rtol=2e-3, atol=1e-6)


# ----------------------------------------------------------------------------------------- bad input
def test_bad_inputs():
    A8 = torch.zeros(4, 8, dtype=torch.int8)
    B8 = torch.zeros(3, 8, dtype=torch.int8)
    with pytest.raises(ValueError, match="int8"):
        F.int8_linear_matmul(A8.float(), B8)
    with pytest.raises(ValueError, match="inner dimensions"):
        F.int8_linear_matmul(A8, torch.zeros(3, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match="numpy array"):
        F.int8_linear_matmul(A8, B8.numpy())
    with pytest.raises(ValueError, match="2-D"):
        F.int8_linear_matmul(A8, B8.reshape(1, 3, 8))
    with pytest.raises(ValueError, match="out must have"):
        F.int8_linear_matmul(A8, B8, out=torch.empty(4, 4, dtype=torch.int32))
    C = torch.zeros(4, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="row_stats must have 4"):
        F.int8_mm_dequant(C, torch.ones(3), torch.ones(3))
    with pytest.raises(ValueError, match="col_stats must have 3"):
        F.int8_mm_dequant(C, torch.ones(4), torch.ones(4))
    with pytest.raises(ValueError, match="row_stats must have dtype float32"):
        F.int8_mm_dequant(C, torch.ones(4, dtype=torch.float16), torch.ones(3))
    with pytest.raises(ValueError, match="A must have dtype int32"):
        F.int8_mm_dequant(C.float(), torch.ones(4), torch.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        F.int8_vectorwise_quant(torch.ones(2, 2, dtype=torch.float16), -1.0)
    with pytest.raises(ValueError, match="dtype"):
        F.int8_vectorwise_quant(torch.ones(2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="stats must have one value per row"):
        F.int8_vectorwise_dequant(A8, torch.ones(3))
    with pytest.raises(ValueError, match="features"):
        bnbcy.matmul(torch.ones(2, 5, dtype=torch.float16), torch.ones(3, 8, dtype=torch.float16), state=_state())


def test_matmul_float64_inputs_run_in_float32():
    A = torch.randn(4, 64, dtype=torch.float64)
    W = torch.randn(16, 64)
    b = torch.randn(16, dtype=torch.float64)
    y = bnbcy.matmul(A, W, state=_state(), threshold=3.0, bias=b)
    assert y.dtype == torch.float64
    ref = A @ W.double().t() + b
    assert ((y - ref).norm() / ref.norm()) < 0.02


def test_gemm_route_table_lookup():
    from bnbcy.functional.int8 import _measured_routes, route_from_table
    table = {"sm_90": [[16, "raw"], [1024, "cublas"], [None, "raw"]]}
    assert route_from_table(table, "sm_90", 1) == "raw"
    assert route_from_table(table, "sm_90", 17) == "cublas"
    assert route_from_table(table, "sm_90", 4096) == "raw"
    assert route_from_table(table, "sm_80", 4096) is None
    assert isinstance(_measured_routes(), dict)  # the shipped table parses
