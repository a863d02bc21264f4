"""The torch.library ops (``torch.ops.bnbcy.*``): bitsandbytes' schemas, ``opcheck`` (schema,
fake kernel, autograd registration, AOT dispatch) for every op and dtype on the CPU, the
re-definition under another namespace, and the one CPU/CUDA dispatch point."""
import numpy as np
import pytest
import torch

import bitsandbytes  # noqa: F401  (defines torch.ops.bitsandbytes: the reference schemas)
import bnbcy
import bnbcy.functional as F
from bnbcy import _ops, backends

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
OPS = sorted({name.split(".")[0] for name in _ops.defined_ops()})
BNB_OPS = ["quantize_blockwise", "dequantize_blockwise", "quantize_4bit", "dequantize_4bit", "gemv_4bit",
           "gemm_4bit", "int8_linear_matmul", "int8_vectorwise_quant", "int8_vectorwise_dequant",
           "int8_mm_dequant", "int8_scaled_mm", "int8_mixed_scaled_mm", "int8_double_quant"]


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _opcheck(op, args, kwargs=None):
    torch.library.opcheck(op, args, kwargs or {})


def _schema(ns, name, overload="default"):
    return str(getattr(getattr(torch.ops, ns), name).__getattr__(overload)._schema).split("::", 1)[1]


@pytest.mark.parametrize("name", BNB_OPS)
def test_every_op_has_bitsandbytes_schema(name):
    assert name in OPS
    for overload in getattr(torch.ops.bitsandbytes, name).overloads():
        assert _schema("bnbcy", name, overload) == _schema("bitsandbytes", name, overload), overload
    assert set(getattr(torch.ops.bnbcy, name).overloads()) == set(getattr(torch.ops.bitsandbytes, name).overloads())


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_blockwise(dtype):
    A = torch.randn(5, 70, generator=_g(1)).to(dtype)
    code = F.create_dynamic_map()
    _opcheck(torch.ops.bnbcy.quantize_blockwise.default, (A, code, 64))
    q, absmax = torch.ops.bnbcy.quantize_blockwise(A, code, 64)
    _opcheck(torch.ops.bnbcy.dequantize_blockwise.default, (q, absmax, code, 64, dtype))
    out = torch.empty(q.shape, dtype=dtype)
    _opcheck(torch.ops.bnbcy.dequantize_blockwise.out, (q, absmax, code, 64, dtype, out))
    torch.ops.bnbcy.dequantize_blockwise.out(q, absmax, code, 64, dtype, out)
    assert torch.equal(out, torch.ops.bnbcy.dequantize_blockwise(q, absmax, code, 64, dtype))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_4bit(dtype, quant_type):
    W = torch.randn(24, 64, generator=_g(2)).to(dtype)
    _opcheck(torch.ops.bnbcy.quantize_4bit.default, (W, 64, quant_type, torch.uint8))
    # an integer storage view: float views of the packed bytes may hold NaN patterns, which
    # opcheck's equality would call different
    _opcheck(torch.ops.bnbcy.quantize_4bit.default, (W, 32, quant_type, torch.int16))
    q, absmax = torch.ops.bnbcy.quantize_4bit(W, 64, quant_type, torch.uint8)
    _opcheck(torch.ops.bnbcy.dequantize_4bit.default, (q, absmax, 64, quant_type, [24, 64], dtype))
    out = torch.empty(24, 64, dtype=dtype)
    _opcheck(torch.ops.bnbcy.dequantize_4bit.out, (q, absmax, 64, quant_type, [24, 64], dtype, out))
    code = F.get_4bit_type(quant_type, device="cpu")
    for rows in (1, 3, 20):   # fused kernel and chunked path
        A = torch.randn(rows, 64, generator=_g(3)).to(dtype)
        _opcheck(torch.ops.bnbcy.gemv_4bit.default, (A, q, [24, 64], absmax, code, 64))
        _opcheck(torch.ops.bnbcy.gemv_4bit.out, (A, q, [24, 64], absmax, code, 64, torch.empty(rows, 24, dtype=dtype)))
        _opcheck(torch.ops.bnbcy.gemm_4bit.default, (A, q, [24, 64], absmax, 64, quant_type),
                 {"bias": torch.randn(24, generator=_g(4)).to(dtype)})


@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck_gemm_4bit_nested_and_autograd(dtype):
    W = torch.randn(16, 96, generator=_g(5)).to(dtype)
    q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A = torch.randn(2, 3, 96, generator=_g(6)).to(dtype).requires_grad_()
    bias = torch.randn(16, generator=_g(7)).to(dtype).requires_grad_()
    args = (A, q, [16, 96], st.state2.absmax, 64, "nf4")
    kwargs = {"bias": bias, "absmax_8bit": st.absmax, "absmax_code": st.state2.code, "absmax_offset": st.offset}
    _opcheck(torch.ops.bnbcy.gemm_4bit.default, args, kwargs)
    # the registered backward: grad_A = grad @ W_dequantized, grad_bias = grad summed; no weight grad
    y = torch.ops.bnbcy.gemm_4bit(*args, **kwargs)
    g = torch.randn(y.shape, generator=_g(8)).to(dtype)
    y.backward(g)
    Wd = F.dequantize_4bit(q, st).to(dtype)
    torch.testing.assert_close(A.grad, torch.matmul(g, Wd))
    torch.testing.assert_close(bias.grad, g.reshape(-1, 16).sum(0))
    # the backward's own op (bnbcy's; chunked over W's rows on the CPU)
    _opcheck(torch.ops.bnbcy.gemm_4bit_grad_input.default, (g, q, [16, 96], st.state2.absmax, 64, "nf4"),
             {k: kwargs[k] for k in ("absmax_8bit", "absmax_code", "absmax_offset")})


def test_gemm_4bit_input_gradient_is_chunked_on_cpu(monkeypatch):
    W = torch.randn(37, 80, generator=_g(19))
    q, st = F.quantize_4bit(W, quant_type="fp4")
    g = torch.randn(3, 37, generator=_g(20))
    whole = torch.ops.bnbcy.gemm_4bit_grad_input(g, q, [37, 80], st.absmax, 64, "fp4")
    monkeypatch.setattr(backends.cpu, "CHUNK_ELEMENTS", 5 * 80)   # 8 chunks, the last one short
    chunked = torch.ops.bnbcy.gemm_4bit_grad_input(g, q, [37, 80], st.absmax, 64, "fp4")
    ref = g.double() @ F.dequantize_4bit(q, st).double()
    for y in (whole, chunked):
        assert (y.double() - ref).abs().max() <= 1e-5 * (g.abs().double() @ W.abs().double()).max()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_opcheck_int8(dtype, threshold):
    A = (torch.randn(6, 40, generator=_g(9)) * 1.5).to(dtype)
    _opcheck(torch.ops.bnbcy.int8_vectorwise_quant.default, (A, threshold))
    _opcheck(torch.ops.bnbcy.int8_double_quant.default, (A, threshold))
    CA, SCA, cols = torch.ops.bnbcy.int8_vectorwise_quant(A, threshold)
    W = torch.randn(12, 40, generator=_g(10)).to(dtype)
    CB, SCB, _ = torch.ops.bnbcy.int8_vectorwise_quant(W, 0.0)
    _opcheck(torch.ops.bnbcy.int8_vectorwise_dequant.default, (CB, SCB))
    _opcheck(torch.ops.bnbcy.int8_linear_matmul.default, (CA, CB))
    _opcheck(torch.ops.bnbcy.int8_linear_matmul.out, (CA, CB, torch.empty(6, 12, dtype=torch.int32)))
    C = torch.ops.bnbcy.int8_linear_matmul(CA, CB)
    bias = torch.randn(12, generator=_g(11)).to(dtype)
    _opcheck(torch.ops.bnbcy.int8_mm_dequant.default, (C, SCA, SCB), {"dtype": dtype, "bias": bias})
    _opcheck(torch.ops.bnbcy.int8_scaled_mm.default, (CA, CB, SCA, SCB), {"bias": bias, "dtype": dtype})
    _opcheck(torch.ops.bnbcy.int8_mixed_scaled_mm.default, (A, CA, CB, SCA, SCB, cols, bias))


def test_ops_agree_with_functional_and_reject_bad_input_before_writing():
    A = torch.randn(300, generator=_g(12))
    q, st = F.quantize_blockwise(A, blocksize=64)
    q2, absmax2 = torch.ops.bnbcy.quantize_blockwise(A, st.code, 64)
    assert torch.equal(q, q2) and torch.equal(st.absmax, absmax2)
    out = torch.full((300,), 7.0)
    with pytest.raises(ValueError, match="out must have dtype float16"):
        torch.ops.bnbcy.dequantize_blockwise.out(q, st.absmax, st.code, 64, torch.float16, out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="A must have dtype"):
        torch.ops.bnbcy.quantize_blockwise(A.double(), st.code, 64)


def test_add_namespace_answers_with_the_same_kernels():
    # the stand-in calls add_namespace("bitsandbytes"); the real bitsandbytes is loaded in this
    # process (it owns that namespace here), so another one is used
    _ops.add_namespace("bnbcy_ns_test")
    _ops.add_namespace("bnbcy_ns_test")  # idempotent
    A = torch.randn(2, 64, generator=_g(13))
    W = torch.randn(8, 64, generator=_g(14))
    q, absmax = torch.ops.bnbcy_ns_test.quantize_4bit(W, 64, "nf4", torch.uint8)
    q1, absmax1 = torch.ops.bnbcy.quantize_4bit(W, 64, "nf4", torch.uint8)
    assert torch.equal(q, q1) and torch.equal(absmax, absmax1)
    assert torch.equal(torch.ops.bnbcy_ns_test.gemm_4bit(A, q, [8, 64], absmax, 64, "nf4"),
                       torch.ops.bnbcy.gemm_4bit(A, q, [8, 64], absmax, 64, "nf4"))
    for name in _ops.defined_ops():
        base, _, overload = name.partition(".")
        assert _schema("bnbcy_ns_test", base, overload or "default") == _schema("bnbcy", base, overload or "default")


def test_add_namespace_bitsandbytes_in_a_fresh_process_and_clash_here():
    import subprocess
    import sys
    code = ("import torch, bnbcy._ops as o; o.add_namespace('bitsandbytes'); "
            "W, A = torch.randn(8, 64), torch.randn(2, 64); "
            "q, a = torch.ops.bitsandbytes.quantize_4bit(W, 64, 'nf4', torch.uint8); "
            "y = torch.ops.bitsandbytes.gemm_4bit(A, q, [8, 64], a, 64, 'nf4'); "
            "assert torch.equal(y, torch.ops.bnbcy.gemm_4bit(A, q, [8, 64], a, 64, 'nf4')); "
            "print(sorted(torch.ops.bitsandbytes.dequantize_4bit.overloads()), tuple(y.shape))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["['default',", "'out']", "(2,", "8)"]
    # here the real bitsandbytes owns torch.ops.bitsandbytes: refused, nothing half-defined
    with pytest.raises(RuntimeError, match="already defines"):
        _ops.add_namespace("bitsandbytes")
    _ops.add_namespace("bnbcy_ns_test")


def test_one_dispatch_point_sends_cpu_arrays_to_cuda_launchers_when_emulating(monkeypatch):
    calls = []
    cpu_kernel = backends.cpu.quantize_blockwise
    for mod in (backends.cpu, backends.cuda):
        # record which kernel module is picked; compute on the CPU (no GPU, no emulator here)
        monkeypatch.setattr(mod, "quantize_blockwise",
                            lambda *a, _m=mod.__name__: (calls.append(_m), cpu_kernel(*a)))
    x = torch.randn(256, generator=_g(15))
    F.quantize_blockwise(x, blocksize=64)                 # torch tensor: through the op
    F.quantize_blockwise(x.numpy(), blocksize=64)         # NumPy: the same backend function
    monkeypatch.setattr(bnbcy.kernels, "emulating", lambda: True)
    F.quantize_blockwise(x, blocksize=64)
    F.quantize_blockwise(x.numpy(), blocksize=64)
    assert calls == ["bnbcy.backends.cpu"] * 2 + ["bnbcy.backends.cuda"] * 2
    with pytest.raises(ValueError, match="on CUDA"):     # emulated: CUDA's blocksize rules
        F.quantize_blockwise(x, blocksize=100)


def test_validation_runs_once_per_call(monkeypatch):
    from bnbcy import _arrays
    seen = []
    real = _arrays.input_view
    monkeypatch.setattr(_arrays, "input_view", lambda x, name, *a, **k: (seen.append(name), real(x, name, *a, **k))[1])
    W = torch.randn(16, 64, generator=_g(16))
    q, st = F.quantize_4bit(W, quant_type="nf4")
    seen.clear()
    bnbcy.matmul_4bit(torch.randn(1, 64, generator=_g(17)), q.t(), st)
    assert seen.count("A") == 1 and seen.count("B") == 1, seen
    seen.clear()
    F.int8_vectorwise_quant(torch.randn(4, 64, generator=_g(18)).half())
    assert seen.count("A") == 1, seen


def test_numpy_arrays_take_the_same_path_and_checks():
    W = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    q, st = F.quantize_4bit(W, quant_type="fp4")
    qt, stt = F.quantize_4bit(torch.from_numpy(W), quant_type="fp4")
    assert np.array_equal(q, qt.numpy()) and np.array_equal(st.absmax, stt.absmax.numpy())
    with pytest.raises(ValueError, match="A must have dtype"):
        F.quantize_4bit(W.astype(np.float64))
    with pytest.raises(ValueError, match="A must have dtype"):
        F.quantize_4bit(torch.from_numpy(W).double())


def test_meta_tensors_get_shapes_from_the_fake_kernels():
    A = torch.empty(3, 64, device="meta")
    q, absmax = torch.ops.bnbcy.quantize_4bit(torch.empty(8, 64, device="meta"), 64, "nf4", torch.uint8)
    assert (q.shape, q.dtype, absmax.shape) == ((256, 1), torch.uint8, (8,))
    assert torch.ops.bnbcy.gemm_4bit(A, q, [8, 64], absmax, 64, "nf4").shape == (3, 8)
    CA, SCA, cols = torch.ops.bnbcy.int8_vectorwise_quant(A.half(), 0.0)
    assert (CA.dtype, SCA.shape, cols) == (torch.int8, (3,), None)
