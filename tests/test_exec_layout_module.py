"""Linear4bit's execution layout: when it is built and rebuilt, and that every access users and
other libraries make to the weight after inference sees bitsandbytes' storage bit for bit."""
import copy
import io
import pickle

import pytest
import torch

import bnbcy
import bnbcy.nn as bnn
from bnbcy.functional.fourbit import dequantize_4bit
from bnbcy.nn import _exec_layout as EL

bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes 0.50.2 is the reference (a test dependency)")


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _pair(in_f=72, out_f=24, nested=True, quant_type="nf4", storage=torch.uint8, seed=0):
    """The same float weight quantized by bnbcy and by bitsandbytes (their CPU codes agree)."""
    W = torch.randn(out_f, in_f, generator=_gen(seed)) * 0.1
    b = torch.randn(out_f, generator=_gen(seed + 1)) * 0.1
    mods = []
    for lib in (bnn, bnb.nn):
        m = lib.Linear4bit(in_f, out_f, bias=True, compute_dtype=torch.bfloat16, compress_statistics=nested,
                           quant_type=quant_type, quant_storage=storage)
        m.weight = lib.Params4bit(W.clone(), requires_grad=False, compress_statistics=nested,
                                  quant_type=quant_type, quant_storage=storage, module=m)
        m.bias = torch.nn.Parameter(b.clone())
        mods.append(m.cpu().eval())
    return mods


def _ref(m, x):
    W = dequantize_4bit(m.weight.data, m.weight.quant_state).double()
    return x.double() @ W.T + m.bias.double()


def _close(y, m, x):
    ref, y = _ref(m, x).detach(), y.detach()
    assert torch.allclose(y.double(), ref, rtol=2 ** -6, atol=1e-3 * float(ref.abs().max())), \
        float((y.double() - ref).abs().max())


def _infer(m, x):
    with torch.no_grad():
        return m(x)


def _state_bytes(sd):
    return {k: (v.view(torch.uint8) if v.is_floating_point() else v).clone() for k, v in sd.items()
            if isinstance(v, torch.Tensor)}


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("nested", (False, True))
@pytest.mark.parametrize("storage", (torch.uint8, torch.bfloat16, torch.float32))
def test_built_once_in_eval_and_matches_packed_path(nested, storage):
    m, _ = _pair(nested=nested, storage=storage)
    x = torch.randn(3, 72, generator=_gen(3)).bfloat16()
    assert EL.cached(m) is None
    y = _infer(m, x)
    lay = EL.cached(m)
    assert lay is not None and lay.B.data_ptr() == m.weight.data_ptr()  # a view, no copy of the codes
    assert lay.extra_bytes <= 0.10 * m.weight.numel() * m.weight.element_size()
    _infer(m, x)
    assert EL.cached(m) is lay  # not rebuilt while nothing changed
    EL.ENABLED = False
    try:
        y_packed = _infer(m, x)
    finally:
        EL.ENABLED = True
    _close(y, m, x)
    assert torch.allclose(y.float(), y_packed.float(), rtol=2 ** -6, atol=2e-2)


def test_never_built_for_training_or_gradients():
    m, _ = _pair()
    x = torch.randn(2, 72, generator=_gen(4)).bfloat16()
    m.train()
    _infer(m, x)
    assert EL.cached(m) is None
    m.eval()
    xg = x.clone().requires_grad_()
    y = m(xg)
    assert EL.cached(m) is None  # gradients flow through x: the autograd path
    y.float().sum().backward()
    assert xg.grad is not None
    # eval with grad mode on and x without grad: the layout serves, the bias keeps its gradient
    m.bias.grad = None
    y = m(x)
    assert EL.cached(m) is not None and y.requires_grad
    y.float().sum().backward()
    assert m.bias.grad is not None and torch.allclose(m.bias.grad, torch.full_like(m.bias, 2.0))
    # back to training: discarded, and rebuilt on the next eval forward
    m.train()
    _infer(m, x)
    assert EL.cached(m) is None
    m.eval()
    _infer(m, x)
    assert EL.cached(m) is not None


def test_every_access_after_inference_is_bitsandbytes_storage(tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    m, ref = _pair()
    ours_before = _state_bytes(m.state_dict())
    _same(ours_before, _state_bytes(ref.state_dict()))  # same codes as bitsandbytes to begin with
    deq_before = dequantize_4bit(m.weight.data, m.weight.quant_state)
    for rows in (1, 5, 40):
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            _infer(m, torch.randn(rows, 72, generator=_gen(rows)).to(dt))
    assert EL.cached(m) is not None
    # state_dict (and so FSDP's and accelerate's views of it) and safetensors
    _same(_state_bytes(m.state_dict()), ours_before)
    path = tmp_path / "w.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(path))
    _same(_state_bytes(safetensors.load_file(str(path))), ours_before)
    # dequantize (what PEFT's merge_and_unload reads): equal, and equal to bitsandbytes'
    assert torch.equal(dequantize_4bit(m.weight.data, m.weight.quant_state), deq_before)
    assert torch.equal(bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state), deq_before)
    # pickling, deepcopy, .to(): the same bytes
    for other in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m), m.to("cpu")):
        _same(_state_bytes(other.state_dict()), ours_before)
    half = _state_bytes(copy.deepcopy(m).to(torch.float16).state_dict())  # casts the bias, not the codes
    _same({k: v for k, v in half.items() if k != "bias"}, {k: v for k, v in ours_before.items() if k != "bias"})
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    _same(_state_bytes(torch.load(buf, weights_only=False)), ours_before)
    # a module loaded from that state runs and matches
    fresh = bnn.Linear4bit(72, 24, compute_dtype=torch.bfloat16, quant_type="nf4")
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(2, 72, generator=_gen(9)).bfloat16()
    assert torch.equal(_infer(fresh.eval(), x), _infer(m, x))


def test_rebuilt_when_the_weight_changes():
    m, _ = _pair(seed=0)
    other, _ = _pair(seed=10)
    x = torch.randn(4, 72, generator=_gen(5)).bfloat16()
    _infer(m, x)
    lay = EL.cached(m)
    # in place through .data (no version counter moves): the layout's views see the new codes
    m.weight.data.copy_(other.weight.data)
    m.weight.quant_state.absmax.copy_(other.weight.quant_state.absmax)
    m.weight.quant_state.state2.absmax.copy_(other.weight.quant_state.state2.absmax)
    m.weight.quant_state.offset.copy_(other.weight.quant_state.offset)
    _close(_infer(m, x), m, x)
    assert EL.cached(m).absmax is m.weight.quant_state.absmax
    # load_state_dict: a new weight and quant state
    m2, _ = _pair(seed=20)
    m.load_state_dict(m2.state_dict())
    y = _infer(m, x)
    assert EL.cached(m) is not lay and EL.cached(m).B.data_ptr() == m.weight.data_ptr()
    assert torch.equal(y, _infer(m2, x))
    # in place through the parameter itself (version counter moves): rebuilt
    lay = EL.cached(m)
    with torch.no_grad():
        m.weight.copy_(other.weight)
    m.weight.quant_state = other.weight.quant_state
    y = _infer(m, x)
    assert EL.cached(m) is not lay and EL.cached(m).absmax is other.weight.quant_state.absmax
    _close(y, m, x)
    # another compute dtype: a layout for that dtype
    lay = EL.cached(m)
    m.compute_dtype = torch.float32
    yf = _infer(m, x.float())
    assert EL.cached(m) is not lay and yf.dtype == torch.float32
    _close(yf, m, x.float())
    # the weight replaced as FSDP does (a plain parameter of the same bytes, state from the module)
    m.quant_state = m.weight.quant_state
    m.weight = torch.nn.Parameter(m.weight.data.clone(), requires_grad=False)
    _close(_infer(m, x.float()), m, x.float())


def test_patched_matmul_4bit_is_honoured(monkeypatch):
    m, _ = _pair()
    calls = []
    orig = bnbcy.matmul_4bit

    def spy(*a, **k):
        calls.append(1)
        return orig(*a, **k)

    monkeypatch.setattr(bnbcy, "matmul_4bit", spy)
    _infer(m, torch.randn(2, 72).bfloat16())
    assert calls and EL.cached(m) is None


def test_compiled_module_matches_eager():
    m, _ = _pair()
    x = torch.randn(3, 72, generator=_gen(6)).bfloat16()
    eager = _infer(m, x)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(x), eager)
