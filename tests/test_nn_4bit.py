"""Params4bit and Linear4bit/LinearNF4/LinearFP4 on the CPU (NUMERICS.md §3.5, §4)."""
import copy
import io
import logging
import pickle
import warnings

import numpy as np
import pytest
import torch

import bnbcy
import bnbcy.nn as bnn
from bnbcy.functional import dequantize_blockwise
from bnbcy.functional.fourbit import dequantize_4bit, get_4bit_type, quantize_4bit
from bnbcy.nn import modules as nn_modules

STORAGES = (torch.uint8, torch.float16, torch.bfloat16, torch.float32)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _bytes(t):
    return t.detach().contiguous().view(torch.uint8).reshape(-1).clone()


def _reference_dequant(packed, qs):
    """Independent decoding of the packed layout: high nibble first, table[code] * block scale."""
    b = _bytes(packed).numpy()
    codes = np.empty(b.size * 2, dtype=np.int64)
    codes[0::2], codes[1::2] = b >> 4, b & 0xF
    n = int(np.prod(tuple(qs.shape)))
    codes = codes[:n]
    if qs.nested:
        scales = (dequantize_blockwise(qs.absmax, qs.state2) + qs.offset).numpy()
    else:
        scales = qs.absmax.numpy()
    table = get_4bit_type(qs.quant_type, device="cpu").numpy()
    vals = table[codes] * scales[np.arange(n) // qs.blocksize]
    return torch.from_numpy(vals.astype(np.float32)).reshape(tuple(qs.shape))


def _quantized_linear(cls=bnn.Linear4bit, in_f=96, out_f=40, seed=0, **kw):
    torch.manual_seed(seed)
    m = cls(in_f, out_f, **kw)
    w = m.weight.data.clone()
    return m.cpu(), w


def _dense_ref(m, x):
    """float64 ``x @ W_deq.T + b`` with the layer's own dequantized weight."""
    W = dequantize_4bit(m.weight.data, m.weight.quant_state).double()
    y = x.double() @ W.t()
    if m.bias is not None:
        y = y + m.bias.double()
    return y


# ------------------------------------------------------------------------------ Params4bit
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("move", ["to", "cpu", "to_device_obj"])
def test_params4bit_quantizes_on_first_cpu_move(quant_type, compress_statistics, blocksize, move):
    w = _randn(48, 70, seed=1)
    p = bnn.Params4bit(w, quant_type=quant_type, compress_statistics=compress_statistics, blocksize=blocksize)
    assert not p.bnb_quantized and p.quant_state is None and p.dtype == torch.float32
    q = {"to": lambda: p.to("cpu"), "cpu": p.cpu, "to_device_obj": lambda: p.to(torch.device("cpu"))}[move]()
    assert isinstance(q, bnn.Params4bit) and q.bnb_quantized and not q.requires_grad
    n = w.numel()
    assert q.dtype == torch.uint8 and tuple(q.shape) == ((n + 1) // 2, 1)
    qs = q.quant_state
    assert tuple(qs.shape) == (48, 70) and qs.dtype == torch.float32
    assert qs.blocksize == blocksize and qs.quant_type == quant_type and qs.nested == compress_statistics
    assert qs.absmax.dtype == (torch.uint8 if compress_statistics else torch.float32)
    # the same bytes as the functional op with the same settings
    packed, st = quantize_4bit(w, blocksize=blocksize, compress_statistics=compress_statistics,
                               quant_type=quant_type)
    assert torch.equal(_bytes(q), _bytes(packed)) and st == qs
    # and the packed layout decodes (independently) to the op's dequantization, near w
    deq = dequantize_4bit(q.data, qs)
    assert torch.equal(deq, _reference_dequant(q, qs))
    assert (deq - w).abs().max() <= 0.2 * w.abs().max()


def test_params4bit_defaults():
    p = bnn.Params4bit()
    assert p.numel() == 0 and p.blocksize == 64 and p.compress_statistics is True
    assert p.quant_type == "fp4" and p.quant_storage == torch.uint8 and p.bnb_quantized is False
    assert p.module is None and p.quant_state is None and not p.requires_grad


def test_module_move_quantizes_and_sets_module_quant_state():
    m, _ = _quantized_linear(quant_type="nf4")
    assert m.quant_state is m.weight.quant_state is not None
    assert m.weight.module is m


def test_second_move_keeps_state_without_requantizing(monkeypatch):
    m, _ = _quantized_linear(quant_type="nf4")
    before, qs = _bytes(m.weight), m.weight.quant_state

    def fail(*a, **k):
        raise AssertionError("requantized on a second move")
    monkeypatch.setattr(nn_modules, "_quantize_4bit", fail)
    m.cpu()
    m.to("cpu")
    p2 = m.weight.to("cpu")
    assert p2.quant_state is qs and m.weight.quant_state is qs and m.quant_state is qs
    assert torch.equal(_bytes(m.weight), before) and torch.equal(_bytes(p2), before)
    assert p2.bnb_quantized and p2.module is m


@pytest.mark.parametrize("storage", STORAGES)
def test_dtype_casts_leave_packed_bytes(storage):
    m, _ = _quantized_linear(quant_type="fp4", quant_storage=storage)
    before = _bytes(m.weight)
    assert m.weight.dtype == storage
    for cast in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        q = m.weight.to(cast)
        assert isinstance(q, bnn.Params4bit) and q.dtype == storage and torch.equal(_bytes(q), before)
    for meth in ("half", "float", "bfloat16", "double"):
        assert torch.equal(_bytes(getattr(m.weight, meth)()), before)
    m.half()
    m.to(torch.bfloat16)
    m.to("cpu", torch.float32)
    m.float()
    assert m.weight.dtype == storage and torch.equal(_bytes(m.weight), before)
    assert m.bias.dtype == torch.float32  # float parameters still follow the casts


def test_dtype_cast_before_quantization_casts_float_weight():
    w = _randn(16, 64, seed=2)
    p = bnn.Params4bit(w, quant_type="nf4").to(torch.bfloat16)
    assert isinstance(p, bnn.Params4bit) and p.dtype == torch.bfloat16 and not p.bnb_quantized
    q = p.cpu()
    assert q.quant_state.dtype == torch.bfloat16
    assert dequantize_4bit(q.data, q.quant_state).dtype == torch.bfloat16


def test_meta_move_does_not_quantize():
    p = bnn.Params4bit(torch.empty(8, 64, device="meta"))
    q = p.to("meta")
    assert not q.bnb_quantized and q.device.type == "meta"


def _same_settings(a, b):
    for name in ("blocksize", "compress_statistics", "quant_type", "quant_storage", "bnb_quantized"):
        assert getattr(a, name) == getattr(b, name), name
    assert a.requires_grad == b.requires_grad


def test_deepcopy_and_copy():
    m, _ = _quantized_linear(quant_type="nf4", compress_statistics=True)
    p = m.weight
    d = copy.deepcopy(p)
    assert type(d) is bnn.Params4bit
    _same_settings(d, p)
    assert torch.equal(_bytes(d), _bytes(p)) and d.data_ptr() != p.data_ptr()
    assert d.quant_state == p.quant_state and d.quant_state is not p.quant_state
    assert d.quant_state.absmax.data_ptr() != p.quant_state.absmax.data_ptr()
    c = copy.copy(p)
    _same_settings(c, p)
    assert c.quant_state is p.quant_state and c.data_ptr() == p.data_ptr()
    # copying the module copies the weight with it, and the copies point at each other
    dm = copy.deepcopy(m)
    assert dm.weight.module is dm and dm.quant_state is dm.weight.quant_state
    x = _randn(3, 96, seed=3)
    assert torch.equal(dm(x), m(x))


def test_pickle_keeps_subclass_settings_and_state():
    m, _ = _quantized_linear(quant_type="fp4", compress_statistics=True, quant_storage=torch.bfloat16)
    p = pickle.loads(pickle.dumps(m.weight))
    assert type(p) is bnn.Params4bit
    _same_settings(p, m.weight)
    assert p.quant_state == m.weight.quant_state and torch.equal(_bytes(p), _bytes(m.weight))
    m2 = pickle.loads(pickle.dumps(m))
    assert type(m2.weight) is bnn.Params4bit and m2.weight.module is m2 and m2.quant_state is m2.weight.quant_state
    x = _randn(2, 96, seed=4)
    assert torch.equal(m2(x), m(x))
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    m3 = torch.load(buf, weights_only=False)
    assert type(m3.weight) is bnn.Params4bit and torch.equal(m3(x), m(x))


def test_getstate_setstate_roundtrip():
    m, _ = _quantized_linear(quant_type="nf4")
    state = m.weight.__getstate__()
    assert {"data", "requires_grad", "quant_state", "blocksize", "quant_type"} <= set(state)
    p = bnn.Params4bit.__new__(bnn.Params4bit)
    p.__setstate__(state)
    _same_settings(p, m.weight)
    assert p.quant_state is m.weight.quant_state


@pytest.mark.parametrize("how", ["torch.chunk", "Tensor.chunk", "torch.split", "Tensor.split"])
def test_chunk_split_keep_subclass(how):
    m, _ = _quantized_linear(quant_type="nf4")
    p = m.weight
    parts = {"torch.chunk": lambda: torch.chunk(p, 3), "Tensor.chunk": lambda: p.chunk(3),
             "torch.split": lambda: torch.split(p, 500), "Tensor.split": lambda: p.split(500)}[how]()
    assert len(parts) > 1
    for part in parts:
        assert type(part) is bnn.Params4bit
        _same_settings(part, p)
        assert part.quant_state is p.quant_state and part.module is m
    assert torch.equal(torch.cat([t.data for t in parts]), p.data)


@pytest.mark.parametrize("nested", [True, False])
def test_from_prequantized(nested):
    m, _ = _quantized_linear(quant_type="nf4", compress_statistics=nested, quant_storage=torch.float16)
    sd = m.state_dict()
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    owner = bnn.Linear4bit(96, 40)
    p = bnn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=owner)
    assert type(p) is bnn.Params4bit and p.bnb_quantized and not p.requires_grad
    assert p.quant_storage == torch.float16 and p.blocksize == 64 and p.quant_type == "nf4"
    assert p.compress_statistics == nested and owner.quant_state is p.quant_state
    assert p.quant_state == m.weight.quant_state
    assert torch.equal(dequantize_4bit(p.data, p.quant_state), dequantize_4bit(m.weight.data, m.weight.quant_state))


def test_quant_state_proxies():
    p = bnn.Params4bit(_randn(8, 64, seed=5), quant_type="nf4", compress_statistics=True)
    for name in ("absmax", "code", "quant_map", "offset", "state2", "nested_absmax", "nested_offset"):
        assert not hasattr(p, name)  # nothing to proxy before quantization
    p = p.cpu()
    qs = p.quant_state
    assert p.absmax is qs.absmax and p.code is qs.code and p.quant_map is qs.code
    assert p.offset is qs.offset and p.state2 is qs.state2 and p.nested_offset is qs.offset
    assert p.nested_absmax is qs.state2.absmax and p.nested_quant_map is qs.state2.code
    assert p.nested_blocksize == 256 and p.nested_dtype == torch.float32
    with pytest.raises(AttributeError):
        p.absmax = torch.zeros(1)  # read-only
    flat = bnn.Params4bit(_randn(8, 64, seed=5), quant_type="nf4", compress_statistics=False).cpu()
    assert flat.offset is None and flat.state2 is None
    for name in ("nested_absmax", "nested_blocksize", "nested_quant_map", "nested_dtype"):
        assert not hasattr(flat, name)


# ----------------------------------------------------------------------------- Linear4bit
def test_class_signatures_and_defaults():
    m = bnn.Linear4bit(64, 32)
    assert m.weight.quant_type == "fp4" and m.weight.compress_statistics and m.quant_storage == torch.uint8
    assert m.compute_dtype is None and m.compute_type_is_set is False and m.quant_state is None
    assert isinstance(m.weight, bnn.Params4bit) and m.weight.module is m and not m.weight.requires_grad
    assert bnn.LinearNF4(64, 32).weight.quant_type == "nf4"
    assert bnn.LinearFP4(64, 32, False, torch.bfloat16, False, torch.float16).weight.quant_type == "fp4"
    m = bnn.LinearNF4(64, 32, bias=False, compute_dtype=torch.bfloat16, compress_statistics=False)
    assert m.bias is None and m.compute_dtype == torch.bfloat16 and m.compute_type_is_set
    assert isinstance(m, torch.nn.Linear) and isinstance(m, bnn.Linear4bit)


@pytest.mark.parametrize("cls,quant_type", [(bnn.LinearNF4, "nf4"), (bnn.LinearFP4, "fp4"),
                                            (bnn.Linear4bit, "nf4"), (bnn.Linear4bit, "fp4")])
@pytest.mark.parametrize("shape", [(96,), (5, 96), (2, 3, 96)])
def test_forward_fp32_matches_dense_reference(cls, quant_type, shape):
    kw = {} if cls is not bnn.Linear4bit else {"quant_type": quant_type}
    m, w0 = _quantized_linear(cls, **kw)
    assert m.weight.quant_type == quant_type
    x = _randn(*shape, seed=6)
    y = m(x)
    assert y.shape == shape[:-1] + (40,) and y.dtype == torch.float32
    ref = _dense_ref(m, x)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    # quantization error against the original float layer: loose
    orig = x.double() @ w0.double().t() + m.bias.double()
    rel = (y.double() - orig).norm() / orig.norm()
    assert rel < 0.2, rel


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_forward_half_inputs(dtype, tol, quant_type):
    m, _ = _quantized_linear(quant_type=quant_type, compute_dtype=dtype)
    x = _randn(4, 96, seed=7, dtype=dtype)
    y = m(x)
    assert y.dtype == dtype
    ref = _dense_ref(m, x)
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


def test_compute_dtype_from_first_input():
    m, _ = _quantized_linear(quant_type="nf4")
    m(_randn(2, 96, seed=8, dtype=torch.bfloat16))
    assert m.compute_dtype == torch.bfloat16 and m.compute_type_is_set
    # later inputs are computed in the dtype the first one chose, output in their own dtype
    x = _randn(2, 96, seed=9)
    y = m(x)
    assert y.dtype == torch.float32
    twin = copy.deepcopy(m)
    assert torch.equal(y, twin(x.to(torch.bfloat16)).float())
    m2, _ = _quantized_linear(quant_type="nf4")
    m2(_randn(2, 96, seed=8))
    assert m2.compute_dtype == torch.float32


@pytest.mark.parametrize("rows", [1, 4])
def test_fp16_input_without_compute_dtype_logs_once(rows, caplog):
    # bitsandbytes' notice, through logging, in its words
    m, _ = _quantized_linear(quant_type="nf4")
    x = _randn(rows, 96, seed=10, dtype=torch.float16)
    with caplog.at_level(logging.WARNING, logger="bnbcy.nn.modules"):
        y = m(x)
    tail = "slow inference." if rows == 1 else "slow inference or training speed."
    assert [r.getMessage() for r in caplog.records] == [
        "Input type into Linear4bit is torch.float16, but bnb_4bit_compute_dtype=torch.float32 (default). "
        "This will lead to " + tail]
    assert m.compute_dtype is None and y.dtype == torch.float16
    ref = _dense_ref(m, x)
    assert (y.double() - ref).abs().max() <= 3e-3 * ref.abs().max()
    caplog.clear()
    with warnings.catch_warnings(), caplog.at_level(logging.WARNING, logger="bnbcy.nn.modules"):
        warnings.simplefilter("error")
        m(x)  # only the first call logs
    assert caplog.records == []


def test_fp16_input_with_fp32_compute_dtype_warns_upcast():
    m, _ = _quantized_linear(quant_type="fp4", compute_dtype=torch.float32)
    x = _randn(3, 96, seed=11, dtype=torch.float16)
    with pytest.warns(UserWarning, match="upcast to float32"):
        y = m(x)
    assert y.dtype == torch.float16
    # computed in float32 (the same computation as for the upcast input), rounded once to float16
    assert torch.equal(y, m(x.float()).half())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m(x)
        m(x.float())  # fp32 inputs never warn


def test_bias_dtype_handling():
    m, _ = _quantized_linear(quant_type="nf4", compute_dtype=torch.float32)
    m.bias.data = m.bias.data.half()
    x = _randn(3, 96, seed=12).requires_grad_(True)
    m.bias.requires_grad_(True)
    y = m(x)
    assert y.dtype == torch.float32
    assert m.bias.dtype == torch.float16  # the parameter keeps its dtype (cast per call)
    ref = _dense_ref(m, x.detach())
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    y.sum().backward()
    assert m.bias.grad.dtype == torch.float16
    assert torch.allclose(m.bias.grad.float(), torch.full((40,), 3.0))
    assert m.weight.grad is None


def test_no_bias():
    m, _ = _quantized_linear(quant_type="fp4", bias=False)
    x = _randn(4, 96, seed=13)
    ref = _dense_ref(m, x)
    assert (m(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_input_and_bias_gradients_match_dense():
    m, _ = _quantized_linear(quant_type="nf4")
    m.bias.requires_grad_(True)
    x = _randn(2, 3, 96, seed=14).requires_grad_(True)
    g = _randn(2, 3, 40, seed=15)
    m(x).backward(g)
    W = dequantize_4bit(m.weight.data, m.weight.quant_state).double()
    assert torch.allclose(x.grad.double(), g.double() @ W, rtol=1e-5, atol=1e-5)
    assert torch.allclose(m.bias.grad.double(), g.double().sum((0, 1)), rtol=1e-5, atol=1e-5)
    assert m.weight.grad is None


def test_quant_storage_does_not_change_output():
    x = _randn(6, 96, seed=16)
    outs, blobs = [], []
    for storage in STORAGES:
        m, _ = _quantized_linear(quant_type="nf4", quant_storage=storage, seed=3)
        assert m.weight.dtype == storage and m.quant_storage == storage
        outs.append(m(x))
        blobs.append(_bytes(m.weight))
    for y, b in zip(outs[1:], blobs[1:]):
        assert torch.equal(y, outs[0]) and torch.equal(b, blobs[0])


@pytest.mark.parametrize("compress_statistics", [True, False])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_blocksize_and_double_quant_via_params4bit(compress_statistics, blocksize):
    torch.manual_seed(17)
    m = bnn.LinearNF4(128, 24, compress_statistics=compress_statistics)
    w = m.weight.data.clone()
    m.weight = bnn.Params4bit(w, blocksize=blocksize, compress_statistics=compress_statistics,
                              quant_type="nf4", module=m)
    m.cpu()
    qs = m.weight.quant_state
    assert qs.blocksize == blocksize and qs.nested == compress_statistics and m.quant_state is qs
    assert qs.absmax.numel() == w.numel() // blocksize
    x = _randn(5, 128, seed=18)
    ref = _dense_ref(m, x)
    assert (m(x).double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert torch.equal(dequantize_4bit(m.weight.data, qs), _reference_dequant(m.weight, qs))


def test_lost_quant_state_is_restored_from_module():
    m, _ = _quantized_linear(quant_type="nf4")
    x = _randn(2, 96, seed=19)
    y = m(x)
    # as FSDP does: the parameter comes back as a plain Parameter without attributes
    m.weight = torch.nn.Parameter(m.weight.data, requires_grad=False)
    assert torch.equal(m(x), y)
    assert isinstance(m.weight, bnn.Params4bit) and m.weight.quant_state is m.quant_state


def test_bad_inputs_raise_clear_errors():
    m, _ = _quantized_linear(quant_type="nf4")
    with pytest.raises(ValueError, match="in_features=96"):
        m(_randn(4, 95, seed=20))
    with pytest.raises(ValueError, match="in_features"):
        m(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(4, 96, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="not quantized"):
        bnn.Linear4bit(96, 40)(_randn(2, 96, seed=21))
    fresh, _ = _quantized_linear(quant_type="nf4")
    with pytest.raises(TypeError, match="compute_dtype"):
        fresh(_randn(2, 96, seed=21, dtype=torch.float64))  # no kernel for float64 compute
    m64, _ = _quantized_linear(quant_type="nf4", compute_dtype=torch.float32)
    x64 = _randn(2, 96, seed=21, dtype=torch.float64)
    assert torch.equal(m64(x64), m64(x64.float()).double())  # with a compute_dtype, it is cast


def test_empty_inputs():
    m, _ = _quantized_linear(quant_type="nf4")
    assert m(torch.empty(0, 96)).shape == (0, 40)
    assert m(torch.empty(2, 0, 96)).shape == (2, 0, 40)


def test_functional_ops_accept_params4bit():
    """bitsandbytes' functional ops take the Params4bit itself (``F.dequantize_4bit(layer.weight,
    layer.weight.quant_state)``; bnb 0.50.2's Linear4bit passes ``self.weight`` to matmul_4bit)."""
    m, _ = _quantized_linear(quant_type="nf4")
    qs = m.weight.quant_state
    assert torch.equal(dequantize_4bit(m.weight, qs), dequantize_4bit(m.weight.data, qs))
    x = _randn(3, 96, seed=22)
    assert torch.allclose(bnbcy.matmul_4bit(x, m.weight, qs, bias=m.bias), m(x), rtol=1e-6, atol=1e-6)
