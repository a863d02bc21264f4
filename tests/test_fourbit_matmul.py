"""4-bit matmul (``gemm_4bit``/``gemv_4bit``/``matmul_4bit``) on the CPU against float64 references
built from the dequantized weight, gradients included, and the bad inputs of the 4-bit ops."""
import numpy as np
import pytest
import torch

import bnbcy
import bnbcy.functional as F
from bnbcy.backends import cpu as CPU
from bnbcy.functional import fourbit_matmul as MM
from test_blockwise_numerics import use_cpu_isa

DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# |error| <= TOL * sum_k |a_k w_k| (fp32 accumulation, plus rounding the result to the dtype)
TOL = {"float32": 2e-6, "float16": 1e-3, "bfloat16": 8e-3}


@pytest.fixture(params=["avx512", "scalar"])
def cpu_path(request, monkeypatch):
    use_cpu_isa(request.param, monkeypatch)
    return request.param


def _case(N, K, dtype, qt="nf4", nested=False, bs=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(N, K, generator=g).to(DT[dtype])
    q, st = F.quantize_4bit(W, blocksize=bs, quant_type=qt, compress_statistics=nested)
    Wd = F.dequantize_4bit(q, st).double()
    return q, st, Wd, g


def _check(y, A, Wd, bias, dtype):
    ref = A.double() @ Wd.t() + (bias.double() if bias is not None else 0)
    scale = A.double().abs() @ Wd.abs().t() + (bias.double().abs() if bias is not None else 0)
    err = (y.double() - ref).abs()
    bad = err > TOL[dtype] * scale + 1e-30
    assert not bad.any(), f"max rel err {(err / scale).max().item():.3g} at {bad.nonzero()[:4].tolist()}"


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("M", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("NK", [(64, 128), (33, 96), (40, 77), (17, 1000)])
@pytest.mark.parametrize("nested", [False, True])
def test_gemm_matches_float64(cpu_path, dtype, M, NK, nested):
    N, K = NK
    q, st, Wd, g = _case(N, K, dtype, nested=nested, seed=M + N)
    A = torch.randn(M, K, generator=g).to(DT[dtype])
    bias = torch.randn(N, generator=g).to(DT[dtype])
    out = torch.full((M, N), float("nan"), dtype=DT[dtype])
    y = MM.gemm_4bit(A, q, st, bias=bias, out=out)
    assert y is out and y.dtype == DT[dtype]
    _check(y, A, Wd, bias, dtype)


@pytest.mark.parametrize("qt", ["nf4", "fp4"])
@pytest.mark.parametrize("bs", [32, 128, 4096])
def test_matmul_4bit_shapes_and_blocksizes(qt, bs):
    q, st, Wd, g = _case(48, 256, "bfloat16", qt=qt, bs=bs)
    for shape in [(256,), (1, 256), (3, 5, 256), (2, 1, 256)]:
        A = torch.randn(shape, generator=g).to(torch.bfloat16)
        y = bnbcy.matmul_4bit(A, q.t(), st)
        assert y.shape == shape[:-1] + (48,)
        _check(y.reshape(-1, 48), A.reshape(-1, 256), Wd, None, "bfloat16")


def test_chunked_path_covers_odd_chunk_starts(monkeypatch):
    # many rows of A take the chunked path; tiny chunks start at odd elements when K is odd
    monkeypatch.setattr(CPU, "CHUNK_ELEMENTS", 3 * 77)
    q, st, Wd, g = _case(31, 77, "float32", nested=True)
    A = torch.randn(40, 77, generator=g)
    bias = torch.randn(31, generator=g)
    _check(MM.gemm_4bit(A, q, st, bias=bias), A, Wd, bias, "float32")


def test_fused_and_chunked_paths_agree(monkeypatch):
    q, st, Wd, g = _case(128, 512, "float32", qt="fp4")
    A = torch.randn(6, 512, generator=g)
    fused = MM.gemm_4bit(A, q, st)
    monkeypatch.setattr(CPU, "FUSED_MAX_ROWS", 0)
    chunked = MM.gemm_4bit(A, q, st)
    # both within the fp32-accumulation bound of the float64 reference (summation orders differ)
    _check(fused, A, Wd, None, "float32")
    _check(chunked, A, Wd, None, "float32")
    torch.testing.assert_close(fused, chunked, rtol=1e-4, atol=1e-4)


def test_gemv_4bit_and_numpy_inputs():
    q, st, Wd, g = _case(64, 128, "float32")
    A = torch.randn(1, 128, generator=g)
    y = F.gemv_4bit(A, q.t(), state=st)
    assert y.shape == (1, 64)
    _check(y, A, Wd, None, "float32")
    qn, stn = F.quantize_4bit(Wd.float().numpy(), quant_type="nf4")  # numpy weight, numpy state
    yn = F.gemv_4bit(A.numpy(), qn, state=stn)
    assert isinstance(yn, np.ndarray) and yn.shape == (1, 64)
    Wdn = torch.from_numpy(F.dequantize_4bit(qn, stn)).double()
    _check(torch.from_numpy(yn), A, Wdn, None, "float32")
    with pytest.raises(ValueError, match="state cannot be None"):
        F.gemv_4bit(A, q)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("M", [1, 4, 20])
def test_matmul_4bit_gradients(dtype, M):
    q, st, Wd, g = _case(24, 64, dtype, nested=True, seed=7)
    A = torch.randn(M, 64, generator=g).to(DT[dtype]).requires_grad_()
    bias = torch.randn(24, generator=g).to(DT[dtype]).requires_grad_()
    y = bnbcy.matmul_4bit(A, q.t(), st, bias=bias)
    gout = torch.randn(M, 24, generator=g).to(DT[dtype])
    y.backward(gout)
    ref_gA = gout.double() @ Wd
    tol = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(A.grad.double(), ref_gA, rtol=tol, atol=tol * ref_gA.abs().max().item())
    torch.testing.assert_close(bias.grad.double(), gout.double().sum(0), rtol=tol, atol=tol * M)
    assert A.grad.dtype == A.dtype and bias.grad.dtype == bias.dtype
    assert not q.requires_grad


def test_matmul_4bit_gradcheck_float64_reference():
    # the forward is linear in A: finite differences in float64 on the float32 op agree
    q, st, Wd, g = _case(8, 32, "float32")
    A = torch.randn(3, 32, generator=g, requires_grad=True)
    y = bnbcy.matmul_4bit(A, q.t(), st)
    (y ** 2).sum().backward()
    ref = 2 * (A.detach().double() @ Wd.t()) @ Wd
    torch.testing.assert_close(A.grad.double(), ref, rtol=1e-5, atol=1e-5)


def test_bias_only_gradient_and_no_grad_mode():
    q, st, Wd, g = _case(16, 32, "float32")
    A = torch.randn(4, 32, generator=g)
    bias = torch.zeros(16, requires_grad=True)
    bnbcy.matmul_4bit(A, q.t(), st, bias=bias).sum().backward()
    assert torch.equal(bias.grad, torch.full((16,), 4.0))
    with torch.no_grad():
        y = bnbcy.matmul_4bit(A.requires_grad_(), q.t(), st)
    assert not y.requires_grad


# ---------------------------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    q, st, Wd, g = _case(16, 32, "float32")
    A = torch.randn(2, 32)
    with pytest.raises(ValueError, match="32 features"):
        bnbcy.matmul_4bit(torch.randn(2, 31), q.t(), st)
    with pytest.raises(ValueError, match="dtype"):
        bnbcy.matmul_4bit(A.to(torch.int32), q.t(), st)
    with pytest.raises(ValueError, match="bias must have 16"):
        bnbcy.matmul_4bit(A, q.t(), st, bias=torch.zeros(15))
    with pytest.raises(ValueError, match="quant_state is required"):
        bnbcy.matmul_4bit(A, q.t(), None)
    _, st1 = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    with pytest.raises(ValueError, match="2-D"):
        bnbcy.matmul_4bit(A, q.t(), st1)
    with pytest.raises(ValueError, match="too few"):
        MM.gemm_4bit(A, q[:10], st)
    with pytest.raises(ValueError, match="numpy array"):
        MM.gemm_4bit(A, q.numpy(), st)
    with pytest.raises(ValueError, match="gradients"):
        bnbcy.matmul_4bit(A.requires_grad_(), q.t(), st, out=torch.empty(2, 16))


@pytest.mark.parametrize("kwargs, match", [
    (dict(blocksize=16), "blocksize must be one of"),
    (dict(blocksize=100), "blocksize must be one of"),
    (dict(quant_type="nf3"), "quant_type"),
    (dict(quant_storage=torch.complex64), "quant_storage"),
])
def test_quantize_4bit_rejects(kwargs, match):
    with pytest.raises(ValueError, match=match):
        F.quantize_4bit(torch.randn(64), **kwargs)


def test_quantize_4bit_rejects_inputs():
    with pytest.raises(ValueError, match="dtype"):
        F.quantize_4bit(torch.arange(64))
    with pytest.raises(ValueError, match="empty"):
        F.quantize_4bit(torch.empty(0))
    with pytest.raises(TypeError):
        F.quantize_4bit([1.0, 2.0])
    # 10 elements -> 5 bytes: not a whole number of float16 storage items
    with pytest.raises(ValueError, match="multiple of the 2-byte"):
        F.quantize_4bit(torch.randn(10), quant_storage=torch.float16)
    with pytest.raises(ValueError, match="out must have shape"):
        F.quantize_4bit(torch.randn(64), out=torch.empty(31, 1, dtype=torch.uint8))
    with pytest.raises(ValueError, match="absmax"):
        F.quantize_4bit(torch.randn(64), absmax=torch.empty(2, dtype=torch.float16))
    # non-contiguous input is copied, as in bitsandbytes
    W = torch.randn(32, 64)
    q1, _ = F.quantize_4bit(W.t(), quant_type="nf4")
    q2, _ = F.quantize_4bit(W.t().contiguous(), quant_type="nf4")
    assert torch.equal(q1, q2)


def test_dequantize_4bit_rejects():
    q, st = F.quantize_4bit(torch.randn(64), quant_type="nf4")
    with pytest.raises(ValueError, match="needs quant_state"):
        F.dequantize_4bit(q, absmax=st.absmax)
    with pytest.raises(ValueError, match="too few"):
        F.dequantize_4bit(q[:10], st)
    with pytest.raises(ValueError, match="out must have dtype"):
        F.dequantize_4bit(q, st, out=torch.empty(64, dtype=torch.float16))
    bad = F.QuantState(absmax=st.absmax, shape=st.shape, code=st.code, blocksize=64, quant_type="int4",
                       dtype=torch.float32)
    with pytest.raises(ValueError, match="quant_type"):
        F.dequantize_4bit(q, bad)
    with pytest.raises(ValueError, match="quant_state.absmax"):
        F.dequantize_4bit(q, F.QuantState(absmax=st.absmax.double(), shape=st.shape, blocksize=64,
                                          quant_type="nf4", dtype=torch.float32))
