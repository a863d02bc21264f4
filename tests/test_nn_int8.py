"""Int8Params and Linear8bitLt on the CPU (NUMERICS.md §5.7-§5.8), and replace_linear with
Linear8bitLt."""
import copy
import inspect
import io
import pickle

import pytest
import torch
from torch import nn

import bnbcy
import bnbcy.functional
import bnbcy.nn as bnn
from bnbcy.nn import modules as nn_modules

IN, OUT = 96, 40
DTYPES = [(torch.float32, 2e-6), (torch.bfloat16, 2e-2), (torch.float16, 3e-3)]  # (dtype, rel err of the dtype)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=_gen(seed)).to(dtype)


def _ref_scb(w):
    """SCB = float16 absmax of each weight row, widened to float32."""
    return w.to(torch.float16).abs().amax(dim=1).float()


def _ref_cb(w):
    """Row-wise codes round(w16 * 127 / absmax) (ties to even) in float64."""
    w16 = w.to(torch.float16).double()
    scb = _ref_scb(w).double()
    return torch.round(w16 * 127.0 / scb[:, None])


def _deq(cb, scb):
    """The quantized weight in float64: CB * SCB / 127."""
    return cb.double() * scb.double()[:, None] / 127.0


def _layer(has_fp16_weights=False, threshold=0.0, seed=0, in_f=IN, out_f=OUT, bias=True):
    torch.manual_seed(seed)
    m = bnn.Linear8bitLt(in_f, out_f, bias=bias, has_fp16_weights=has_fp16_weights, threshold=threshold)
    if bias:
        with torch.no_grad():
            m.bias.copy_(_randn(out_f, seed=seed + 100))
    w = m.weight.data.clone()
    return m.cpu(), w


def _codes(m):
    """(CB, SCB) of a quantized layer, wherever they currently live (weight or state)."""
    cb = m.weight.CB if m.weight.CB is not None else m.state.CB
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
    return cb, scb


def _dense_ref(m, x):
    """float64 ``x @ (CB * SCB / 127).T + b``."""
    cb, scb = _codes(m)
    y = x.double() @ _deq(cb, scb).t()
    return y + m.bias.double() if m.bias is not None else y


def _sim_lt(x, cb, scb, bias, threshold):
    """Independent float64 simulation of the LLM.int8 forward (MatMul8bitLt, NUMERICS §5.1-§5.6):
    row-wise int8 input codes with outlier columns (|x16| >= threshold) taken out of the int8
    product and multiplied with the dequantized weight columns instead."""
    x2 = x.reshape(-1, x.shape[-1])
    a16 = x2.to(torch.float16).double()
    absA = a16.abs()
    if threshold > 0:
        out_mask = absA >= threshold
        cols = out_mask.any(dim=0)
        row_stats = torch.where(out_mask, torch.zeros_like(absA), absA).amax(dim=1)
    else:
        cols = torch.zeros(a16.shape[1], dtype=torch.bool)
        row_stats = absA.amax(dim=1)
    ca = torch.round(a16 * 127.0 / row_stats[:, None]).nan_to_num(0.0)
    if threshold > 0:
        ca[:, cols] = 0
    y = (ca @ cb.double().t()) * (row_stats[:, None] * scb.double()[None, :]) / (127.0 * 127.0)
    if bias is not None:
        y = y + bias.double()
    if cols.any():
        y = y + x2.double()[:, cols] @ _deq(cb, scb)[:, cols].t()
    return y.reshape(*x.shape[:-1], cb.shape[0]), cols


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _outlier_input(shape, cols, seed, dtype=torch.float32, value=9.0):
    x = _randn(*shape, seed=seed)
    g = _gen(seed + 1)
    for c in cols:
        sign = torch.where(torch.rand(shape[:-1], generator=g) < 0.5, -1.0, 1.0)
        x[..., c] = sign * (value + torch.rand(shape[:-1], generator=g))
    return x.to(dtype)


# ------------------------------------------------------------------------------ Int8Params
@pytest.mark.parametrize("move", ["to", "cpu", "to_device_obj", "to_with_dtype", "module_cpu", "module_to"])
def test_int8params_quantizes_on_first_cpu_move(move):
    w = _randn(OUT, IN, seed=1) * 0.05
    w[3, 7] = 1.5  # a large weight: its row gets a larger scale
    if move.startswith("module"):
        m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
        m.weight.data.copy_(w)
        m = m.cpu() if move == "module_cpu" else m.to("cpu")
        p = m.weight
        assert isinstance(p, bnn.Int8Params)
    else:
        p0 = bnn.Int8Params(w.clone(), requires_grad=False)
        p = {"to": lambda: p0.to("cpu"), "cpu": p0.cpu, "to_device_obj": lambda: p0.to(torch.device("cpu")),
             "to_with_dtype": lambda: p0.to("cpu", torch.float16)}[move]()
    assert type(p) is bnn.Int8Params
    assert p.dtype == torch.int8 and p.shape == (OUT, IN) and p.is_contiguous()
    assert not p.requires_grad and not p.has_fp16_weights
    assert p.SCB.dtype == torch.float32 and p.SCB.shape == (OUT,)
    assert torch.equal(p.SCB, _ref_scb(w))  # exact float16 row absmax
    assert p.CB.dtype == torch.int8 and p.CB.data_ptr() == p.data_ptr()
    diff = (p.data.double() - _ref_cb(w)).abs()
    assert diff.max() <= 1 and (diff == 0).double().mean() > 0.999
    # the absmax element of every row is +-127
    assert torch.equal(p.data.abs().amax(dim=1), torch.full((OUT,), 127, dtype=torch.int8))


def test_int8params_requires_grad_default_is_dropped_on_quantization():
    p = bnn.Int8Params(_randn(8, 16, seed=2))
    assert p.requires_grad and not p.has_fp16_weights and p.CB is None and p.SCB is None
    q = p.to("cpu")  # bitsandbytes raises here ("data set to a tensor that requires gradients...")
    assert q.dtype == torch.int8 and not q.requires_grad
    empty = bnn.Int8Params()
    assert empty.shape == (0,) and empty.requires_grad


def test_int8params_fp16_weights_and_meta_do_not_quantize():
    w = _randn(8, 16, seed=3)
    p = bnn.Int8Params(w.clone(), requires_grad=True, has_fp16_weights=True)
    q = p.to("cpu")
    assert type(q) is bnn.Int8Params and q.dtype == torch.float32 and q.requires_grad and q.has_fp16_weights
    assert torch.equal(q, w) and q.CB is None and q.SCB is None
    h = p.to(torch.float16)
    assert h.dtype == torch.float16 and h.has_fp16_weights
    m = bnn.Linear8bitLt(16, 8, has_fp16_weights=False, device="meta")
    assert m.weight.device.type == "meta" and m.weight.dtype == torch.float32
    moved = m.weight.to("meta")
    assert moved.dtype == torch.float32 and moved.CB is None
    # a float weight moved by dtype only stays float
    p2 = bnn.Int8Params(w.clone(), requires_grad=False)
    assert p2.to(torch.bfloat16).dtype == torch.bfloat16


def test_second_move_and_dtype_casts_keep_codes(monkeypatch):
    p = bnn.Int8Params(_randn(OUT, IN, seed=4), requires_grad=False).to("cpu")
    codes, scb = p.data.clone(), p.SCB.clone()
    m, _ = _layer()

    def boom(*a, **k):
        raise AssertionError("requantized")
    monkeypatch.setattr(bnbcy.functional, "int8_vectorwise_quant", boom)
    for q in (p.to("cpu"), p.cpu(), p.to(torch.float16), p.half(), p.float(), p.bfloat16(),
              p.to("cpu", torch.float32), p.to(torch.device("cpu"), non_blocking=True)):
        assert type(q) is bnn.Int8Params and q.dtype == torch.int8
        assert torch.equal(q.data, codes) and torch.equal(q.SCB, scb)
        assert q.CB.data_ptr() == q.data_ptr() and not q.has_fp16_weights
    m.to("cpu").half().float().to(torch.bfloat16)  # module casts leave int8 weights alone
    assert m.weight.dtype == torch.int8 and m.weight.SCB.dtype == torch.float32


def test_deepcopy_copy_and_pickle_keep_codes_and_settings():
    p = bnn.Int8Params(_randn(OUT, IN, seed=5), requires_grad=False).cpu()
    f = bnn.Int8Params(_randn(4, 6, seed=6), requires_grad=True, has_fp16_weights=True)
    for clone in (copy.deepcopy, lambda t: pickle.loads(pickle.dumps(t)), copy.copy,
                  lambda t: torch.load(_saved(t), weights_only=False)):
        q = clone(p)
        assert type(q) is bnn.Int8Params and q.dtype == torch.int8 and not q.requires_grad
        assert torch.equal(q.data, p.data) and torch.equal(q.SCB, p.SCB) and not q.has_fp16_weights
        assert q.CB is not None and q.CB.data_ptr() == q.data_ptr()  # CB stays the data itself
        g = clone(f)
        assert type(g) is bnn.Int8Params and g.has_fp16_weights and g.requires_grad and torch.equal(g, f)
        assert g.CB is None and g.SCB is None
    d = copy.deepcopy(p)
    assert d.data_ptr() != p.data_ptr() and d.SCB.data_ptr() != p.SCB.data_ptr()  # a real copy
    d.data.zero_()
    assert p.data.abs().sum() > 0


def _saved(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return buf


# ------------------------------------------------------------------------- Linear8bitLt setup
def test_signatures_and_defaults_match_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes")

    def params(f):
        return [(p.name, p.default) for p in inspect.signature(f).parameters.values()]
    assert params(bnn.Linear8bitLt.__init__) == params(bnb.nn.Linear8bitLt.__init__)
    assert params(bnn.Int8Params.__new__) == params(bnb.nn.Int8Params.__new__)
    assert bnn.Linear8bitLt is nn_modules.Linear8bitLt and bnn.Int8Params is nn_modules.Int8Params


@pytest.mark.parametrize("has_fp16_weights,threshold", [(True, 0.0), (False, 0.0), (False, 6.0), (True, 6.0)])
def test_linear8bitlt_state_configuration(has_fp16_weights, threshold):
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=has_fp16_weights, threshold=threshold)
    st = m.state
    assert type(st).__name__ == "MatmulLtState"
    assert st.threshold == threshold and st.has_fp16_weights == has_fp16_weights
    assert st.use_pool == (threshold > 0 and not has_fp16_weights)
    assert st.CB is None and st.SCB is None and st.is_training
    assert type(m.weight) is bnn.Int8Params and m.weight.has_fp16_weights == has_fp16_weights
    assert m.weight.requires_grad == has_fp16_weights and m.weight.dtype == torch.float32
    assert m.index is None and m.in_features == IN and m.out_features == OUT
    m = m.cpu()
    assert m.weight.dtype == (torch.float32 if has_fp16_weights else torch.int8)


# ---------------------------------------------------------------------------- forward: eval
@pytest.mark.parametrize("shape", [(7, IN), (2, 5, IN), (1, IN)])
def test_eval_forward_threshold0_matches_int8_simulation(shape):
    m, w = _layer(seed=10)
    m.eval()
    x = _randn(*shape, seed=11)
    with torch.no_grad():
        y = m(x)
    assert y.shape == (*shape[:-1], OUT) and y.dtype == torch.float32
    cb, scb = _codes(m)
    sim, _ = _sim_lt(x, cb, scb, m.bias, 0.0)
    # the int8 path: row-quantized input times int8 weight, dequantized through float16
    assert torch.allclose(y.double(), sim, rtol=1e-3, atol=1e-3 * sim.abs().max().item())
    ref = _dense_ref(m, x)  # vs the float64 product with the quantized weight: input quantization error only
    assert _rel(y, ref) < 0.02
    assert _rel(y, x.double() @ w.double().t() + m.bias.double()) < 0.03  # vs the original float weight


@pytest.mark.parametrize("shape", [(16, IN), (2, 8, IN)])
def test_eval_forward_threshold6_decomposes_outlier_columns(shape):
    cols = (3, 17, 60)
    x = _outlier_input(shape, cols, seed=12)
    errs = {}
    for threshold in (0.0, 6.0):
        m, _ = _layer(threshold=threshold, seed=13)
        m.eval()
        with torch.no_grad():
            y = m(x)
        cb, scb = _codes(m)
        sim, sim_cols = _sim_lt(x, cb, scb, m.bias, threshold)
        assert torch.allclose(y.double(), sim, rtol=1e-3, atol=1e-3 * sim.abs().max().item()), threshold
        errs[threshold] = _rel(y, _dense_ref(m, x))
        if threshold > 0:
            assert sim_cols.nonzero().flatten().tolist() == list(cols)
            assert m.state.idx is not None and sorted(m.state.idx.tolist()) == list(cols)
    assert errs[6.0] < 0.012, errs
    assert errs[0.0] > 2.5 * errs[6.0], errs  # the outliers crush the int8 rows without the decomposition


def test_eval_threshold_without_outliers_equals_threshold0():
    x = _randn(9, IN, seed=14).clamp(-5, 5)
    outs = []
    for threshold in (0.0, 6.0):
        m, _ = _layer(threshold=threshold, seed=15)
        with torch.no_grad():
            outs.append(m.eval()(x))
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_eval_forward_input_dtypes(dtype, tol, threshold):
    m, _ = _layer(threshold=threshold, seed=16)
    m.eval()
    x = _outlier_input((2, 6, IN), (5, 40), seed=17, dtype=dtype)
    bias_before = m.bias.detach().clone()
    with torch.no_grad():
        y = m(x)
    assert y.dtype == dtype and y.shape == (2, 6, OUT)
    assert m.bias.dtype == torch.float32 and torch.equal(m.bias, bias_before)  # bias cast per call, not mutated
    cb, scb = _codes(m)
    sim, _ = _sim_lt(x, cb, scb, m.bias.to(dtype), threshold)
    assert torch.allclose(y.double(), sim, rtol=2e-3 + 2 * tol, atol=(2e-3 + 2 * tol) * sim.abs().max().item())


def test_eval_state_handoff_and_repeat_forward():
    m, _ = _layer(seed=18)
    cb0, scb0 = m.weight.data.clone(), m.weight.SCB.clone()
    m.eval()
    x = _randn(4, IN, seed=19)
    with torch.no_grad():
        y1 = m(x)
    # bitsandbytes moves CB/SCB from the weight into the state on the first forward
    assert m.weight.CB is None and m.weight.SCB is None
    assert torch.equal(m.state.CB, cb0) and torch.equal(m.state.SCB, scb0)
    assert m.weight.dtype == torch.int8 and m.weight.data_ptr() == m.state.CB.data_ptr()
    with torch.no_grad():
        y2 = m(x)
    assert torch.equal(y1, y2)
    m.cpu()  # a later move keeps everything in place
    with torch.no_grad():
        assert torch.equal(m(x), y1)
    assert torch.equal(m.state_dict()["SCB"], scb0)


def test_unquantized_inference_module_quantizes_in_forward():
    # bitsandbytes: a has_fp16_weights=False module that was never moved quantizes its float
    # weight in the first forward and keeps the codes
    torch.manual_seed(20)
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).eval()
    w = m.weight.data.clone()
    x = _randn(3, IN, seed=21)
    with torch.no_grad():
        y = m(x)
    assert m.weight.dtype == torch.int8 and torch.equal(m.state.SCB, _ref_scb(w))
    assert _rel(y, _dense_ref(m, x)) < 0.02
    assert set(m.state_dict()) == {"weight", "bias", "SCB", "weight_format"}


# -------------------------------------------------------------------------- forward: training
@pytest.mark.parametrize("shape", [(6, IN), (2, 3, IN)])
@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_inference_weights_in_train_mode_give_input_and_bias_gradients(shape, dtype, tol):
    m, _ = _layer(seed=22)
    m.train()
    x = _randn(*shape, seed=23, dtype=dtype).requires_grad_(True)
    y = m(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], OUT)
    cb, scb = _codes(m)
    W = _deq(cb, scb)
    ref = x.double() @ W.t() + m.bias.double()  # CPU training: dequantized weight, no input quantization
    assert _rel(y, ref) < 4 * tol + 1e-6
    g = _randn(*y.shape, seed=24, dtype=dtype)
    y.backward(g)
    assert x.grad is not None and x.grad.dtype == dtype and x.grad.shape == x.shape
    assert _rel(x.grad, g.double() @ W) < 4 * tol + 1e-6
    assert m.bias.grad is not None and m.bias.grad.dtype == torch.float32
    assert _rel(m.bias.grad, g.double().reshape(-1, OUT).sum(0)) < 4 * tol + 1e-6
    assert not m.weight.requires_grad and m.weight.grad is None and m.weight.dtype == torch.int8


@pytest.mark.parametrize("shape", [(6, IN), (2, 3, IN)])
def test_fp16_weights_training_gives_weight_gradient(shape):
    m, w = _layer(has_fp16_weights=True, seed=25)
    assert m.weight.dtype == torch.float32 and m.weight.requires_grad
    m.train()
    x = _randn(*shape, seed=26).requires_grad_(True)
    y = m(x)
    Wq = _deq(*_codes(m))  # the weight quantized on the fly for this forward
    assert _rel(Wq, w) < 0.01 and torch.equal(_codes(m)[1], _ref_scb(w))
    x64 = x.detach().double()
    assert _rel(y, x64 @ Wq.t() + m.bias.double()) < 1e-5
    assert _rel(y, x64 @ w.double().t() + m.bias.double()) < 0.01
    g = _randn(*y.shape, seed=27)
    y.backward(g)
    g2, x2 = g.double().reshape(-1, OUT), x64.reshape(-1, IN)
    assert m.weight.grad is not None and m.weight.grad.shape == (OUT, IN)
    assert _rel(m.weight.grad, g2.t() @ x2) < 1e-5  # dense float64 weight gradient
    assert _rel(x.grad, g.double() @ Wq) < 1e-5
    assert _rel(m.bias.grad, g2.sum(0)) < 1e-5
    assert m.weight.dtype == torch.float32 and torch.equal(m.weight.data, w)  # the float weight is kept


def test_fp16_weights_training_step_requantizes_updated_weight():
    m, _ = _layer(has_fp16_weights=True, seed=28)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    x = _randn(8, IN, seed=29)
    target = _randn(8, OUT, seed=30)
    losses = []
    for _ in range(4):
        opt.zero_grad()  # set_to_none: the next forward requantizes the updated weight
        loss = ((m(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    stale = _codes(m)[1].clone()
    m(x)  # the weight still has its gradient (accumulation): the codes are kept, as in bitsandbytes
    assert torch.equal(_codes(m)[1], stale) and not torch.equal(stale, _ref_scb(m.weight.detach()))
    opt.zero_grad()
    y = m(x)
    assert torch.equal(_codes(m)[1], _ref_scb(m.weight.detach()))
    assert _rel(y, x.double() @ m.weight.detach().double().t() + m.bias.detach().double()) < 0.01


def test_fp16_weights_eval_forward_uses_int8_path():
    m, w = _layer(has_fp16_weights=True, seed=31)
    m.eval()
    x = _randn(5, IN, seed=32)
    with torch.no_grad():
        y = m(x)
    cb, scb = _codes(m)
    assert torch.equal(scb, _ref_scb(w)) and m.weight.dtype == torch.float32
    sim, _ = _sim_lt(x, cb, scb, m.bias, 0.0)
    assert torch.allclose(y.double(), sim, rtol=1e-3, atol=1e-3 * sim.abs().max().item())
    # with autograd on, the eval (int8) path gives the weight a gradient too (bitsandbytes has no
    # CPU kernel for it; bnbcy computes grad.T @ x densely, NUMERICS §5.7)
    xg = x.clone().requires_grad_(True)
    g = _randn(5, OUT, seed=33)
    m(xg).backward(g)
    assert _rel(m.weight.grad, g.double().t() @ x.double()) < 1e-5
    assert _rel(xg.grad, g.double() @ _deq(cb, scb)) < 1e-5


def test_no_bias_and_empty_input():
    m, w = _layer(seed=33, bias=False)
    assert m.bias is None
    for mode in (m.eval, m.train):
        mode()
        x = _randn(4, IN, seed=34)
        with torch.no_grad():
            y = m(x)
        assert _rel(y, _dense_ref(m, x)) < 0.02
        e = m(torch.empty(0, IN))
        assert e.shape == (0, OUT)


def test_bad_inputs_raise_clear_errors():
    m, _ = _layer(seed=35)
    with pytest.raises(ValueError, match=f"in_features={IN}"):
        m(torch.randn(3, IN + 1))
    with pytest.raises(ValueError, match="0-d"):
        m(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point"):
        m(torch.ones(3, IN, dtype=torch.int64))
    with pytest.raises(TypeError, match="floating-point"):
        m([[0.0] * IN])
    meta = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False, device="meta")
    with pytest.raises(RuntimeError, match="meta"):
        meta(torch.randn(2, IN))


def test_module_deepcopy_and_pickle_keep_outputs():
    m, _ = _layer(threshold=6.0, seed=36)
    m.eval()
    x = _outlier_input((5, IN), (9,), seed=37)
    with torch.no_grad():
        y = m(x)  # codes now in m.state
    for clone in (copy.deepcopy, lambda t: pickle.loads(pickle.dumps(t)),
                  lambda t: torch.load(_saved(t), weights_only=False)):
        c = clone(m)
        assert type(c.weight) is bnn.Int8Params and c.weight.dtype == torch.int8
        assert c.state.threshold == 6.0 and not c.state.has_fp16_weights
        with torch.no_grad():
            assert torch.equal(c(x), y)
        assert torch.equal(c.state_dict()["SCB"], m.state_dict()["SCB"])


# ------------------------------------------------------------------------------ replace_linear
class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.k = nn.Linear(64, 64, bias=False)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))

    def forward(self, x):
        return self.mlp(self.q(x) + self.k(x))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        for b in self.blocks:
            x = x + b(x)
        return self.lm_head(x)


def test_replace_linear_linear8bitlt_keeps_weights_and_quantizes():
    torch.manual_seed(40)
    model = _Net().eval()
    dense = copy.deepcopy(model)
    before = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    out = bnn.replace_linear(model, bnn.Linear8bitLt, has_fp16_weights=False, threshold=6.0)
    assert out is model
    for n, m in model.named_modules():
        if n not in before:
            continue
        w0, b0 = before[n]
        if n == "lm_head":
            assert type(m) is nn.Linear and torch.equal(m.weight, w0)
            continue
        assert type(m) is bnn.Linear8bitLt, n
        assert not m.training and m.state.threshold == 6.0 and not m.state.has_fp16_weights and m.state.use_pool
        assert type(m.weight) is bnn.Int8Params and m.weight.dtype == torch.int8 and not m.weight.requires_grad
        assert m.weight.device.type == "cpu" and torch.equal(m.weight.SCB, _ref_scb(w0))
        assert (m.weight.data.double() - _ref_cb(w0)).abs().max() <= 1
        assert (m.bias is None) == (b0 is None)
        if b0 is not None:
            assert torch.equal(m.bias, b0) and m.bias.requires_grad
    x = _outlier_input((4, 64), (2, 30), seed=41)
    with torch.no_grad():
        y = model(x)
        ref = copy.deepcopy(dense).double()(x.double())
    assert _rel(y, ref) < 0.02
    bnn.replace_linear(model, bnn.Linear8bitLt, has_fp16_weights=False)  # already quantized layers stay
    assert model.blocks[0].q.state.threshold == 6.0


def test_replace_linear_linear8bitlt_fp16_weights_meta_and_bf16():
    torch.manual_seed(42)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    w = model[0].weight.detach().clone()
    bnn.replace_linear(model, bnn.Linear8bitLt, skip_modules=())
    assert all(type(m) is bnn.Linear8bitLt for m in model)
    assert model[0].weight.dtype == torch.float32 and model[0].weight.requires_grad
    assert model[0].weight.has_fp16_weights and torch.equal(model[0].weight, w)
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Linear(32, 16))
    bnn.replace_linear(meta_model, bnn.Linear8bitLt, has_fp16_weights=False)
    assert type(meta_model[0]) is bnn.Linear8bitLt and meta_model[0].weight.device.type == "meta"
    assert meta_model[0].weight.dtype == torch.float32  # an unquantized placeholder
    bf = nn.Sequential(nn.Linear(32, 16)).to(torch.bfloat16)
    wb = bf[0].weight.detach().clone()
    bnn.replace_linear(bf, bnn.Linear8bitLt, has_fp16_weights=False)
    assert bf[0].weight.dtype == torch.int8 and torch.equal(bf[0].weight.SCB, _ref_scb(wb))
    assert bf[0].bias.dtype == torch.bfloat16
    x = _randn(3, 32, seed=43, dtype=torch.bfloat16)
    with torch.no_grad():
        y = bf.eval()(x)
    assert y.dtype == torch.bfloat16
    assert _rel(y, x.double() @ wb.double().t() + bf[0].bias.double()) < 0.03
