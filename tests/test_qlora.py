"""QLoRA on the CPU: frozen 4-bit base layers (replace_linear) + trainable low-rank adapters;
and replace_linear itself."""
import copy
import math

import pytest
import torch
from torch import nn

import bnbcy.nn as bnn
from bnbcy.functional.fourbit import dequantize_4bit


class LoRA(nn.Module):
    """``base(x) + scale * x A^T B^T`` with a frozen base and trainable A (r x in), B (out x r)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, generator=None):
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features, generator=generator) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, r))  # starts as the base model exactly
        self.scale = alpha / r

    def forward(self, x):
        return self.base(x) + (x @ self.A.t() @ self.B.t()) * self.scale


class MLP(nn.Module):
    def __init__(self, d_in=32, d_hidden=64, d_out=8):
        super().__init__()
        self.fc1 = nn.Linear(d_in, d_hidden)
        self.fc2 = nn.Linear(d_hidden, d_hidden)
        self.head = nn.Linear(d_hidden, d_out)

    def forward(self, x):
        return self.head(torch.nn.functional.gelu(self.fc2(torch.nn.functional.gelu(self.fc1(x)))))


def _teacher_with_low_rank_shift(model, gen, rank=4, size=0.5):
    """The target: the same network with a rank-``rank`` change of every weight (learnable by LoRA)."""
    teacher = copy.deepcopy(model)
    with torch.no_grad():
        for lin in (teacher.fc1, teacher.fc2, teacher.head):
            out_f, in_f = lin.weight.shape
            u = torch.randn(out_f, rank, generator=gen)
            v = torch.randn(rank, in_f, generator=gen)
            lin.weight += size * (u @ v) / math.sqrt(in_f * rank)
    return teacher


@pytest.mark.parametrize("quant_type,compute_dtype", [("nf4", torch.float32), ("fp4", torch.bfloat16)])
def test_qlora_trains_adapters_only(quant_type, compute_dtype):
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    base = MLP()
    teacher = _teacher_with_low_rank_shift(base, gen)
    x = torch.randn(256, 32, generator=gen)
    with torch.no_grad():
        y = teacher(x)

    model = bnn.replace_linear(base, quant_type=quant_type, compute_dtype=compute_dtype, skip_modules=())
    for name in ("fc1", "fc2", "head"):
        layer = getattr(model, name)
        assert isinstance(layer, bnn.Linear4bit) and layer.weight.bnb_quantized
        setattr(model, name, LoRA(layer, generator=gen))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    frozen_absmax = [m.weight.quant_state.absmax.clone() for m in model.modules() if isinstance(m, bnn.Linear4bit)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        f"{k}.{ab}" for k in ("fc1", "fc2", "head") for ab in "AB"}

    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    losses = []
    for step in range(50):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                if p.requires_grad:
                    assert p.grad is not None and torch.isfinite(p.grad).all(), n
                else:
                    assert p.grad is None, n
        opt.step()
        losses.append(loss.item())

    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.2 * losses[0], losses  # ~0.035 observed
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.grad is None and p.dtype == frozen[n].dtype
            assert torch.equal(p.detach().view(torch.uint8), frozen[n].view(torch.uint8)), n  # byte for byte
    now = [m.weight.quant_state.absmax for m in model.modules() if isinstance(m, bnn.Linear4bit)]
    assert all(torch.equal(a, b) for a, b in zip(now, frozen_absmax))


# --------------------------------------------------------------------------- replace_linear
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.k = nn.Linear(64, 64, bias=False)
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.attn = nn.MultiheadAttention(64, 4)
        self.lm_head = nn.Linear(64, 10)


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_replace_linear_keeps_weights_and_skips():
    torch.manual_seed(1)
    model = Net()
    before = {n: (m.weight.detach().clone(), None if m.bias is None else m.bias.detach().clone())
              for n, m in _linears(model).items()}
    out = bnn.replace_linear(model, skip_modules=("lm_head", "blocks.1.q"), quant_type="nf4",
                             compute_dtype=torch.float32)
    assert out is model
    after = _linears(model)
    assert set(after) == set(before)
    kept = {"lm_head", "blocks.1.q", "attn.out_proj"}  # skipped by leaf / qualified name; MHA's own
    for n, m in after.items():
        w0, b0 = before[n]
        if n in kept:
            assert type(m) is not bnn.Linear4bit and torch.equal(m.weight, w0)
            continue
        assert type(m) is bnn.Linear4bit, n
        assert m.weight.bnb_quantized and m.weight.quant_type == "nf4" and m.compute_dtype == torch.float32
        assert m.weight.module is m and m.quant_state is m.weight.quant_state
        assert (m.bias is None) == (b0 is None)
        if b0 is not None:
            assert torch.equal(m.bias, b0) and m.bias.requires_grad
        deq = dequantize_4bit(m.weight.data, m.weight.quant_state)
        err = (deq - w0).norm() / w0.norm()
        assert err < 0.12, (n, err)
        assert (deq - w0).abs().max() <= 0.2 * w0.abs().max()
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))
    y_ref = before["blocks.0.mlp.0"][0] @ x.t()
    y = model.blocks[0].mlp[0](x) - model.blocks[0].mlp[0].bias
    assert ((y.t() - y_ref).norm() / y_ref.norm()) < 0.12


def test_replace_linear_variants_and_idempotence():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(32, 16), nn.Linear(16, 8))
    w1 = model[1].weight.detach().clone()
    bnn.replace_linear(model, linear_cls=bnn.LinearFP4, compress_statistics=False,
                       quant_storage=torch.bfloat16)
    assert all(type(m) is bnn.LinearFP4 for m in model)
    assert model[0].weight.dtype == torch.bfloat16 and not model[0].weight.quant_state.nested
    snapshot = [m.weight.data.clone() for m in model]
    bnn.replace_linear(model)  # quantized layers are left alone
    assert all(type(m) is bnn.LinearFP4 for m in model)
    assert all(torch.equal(a, m.weight.data) for a, m in zip(snapshot, model))
    deq = dequantize_4bit(model[1].weight.data, model[1].weight.quant_state)
    assert torch.allclose(deq, w1, atol=0.25 * w1.abs().max())


def test_replace_linear_copy_weights_false_and_meta():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 32))
    w0 = model[0].weight.detach().clone()
    bnn.replace_linear(model, copy_weights=False, quant_type="nf4")
    m = model[0]
    assert m.weight.bnb_quantized
    deq = dequantize_4bit(m.weight.data, m.weight.quant_state)
    assert (deq - w0).norm() / w0.norm() > 0.5  # a fresh initialization, not the old weight
    with torch.device("meta"):
        meta_model = nn.Sequential(nn.Linear(64, 32))
    bnn.replace_linear(meta_model, quant_type="nf4")
    assert type(meta_model[0]) is bnn.Linear4bit and not meta_model[0].weight.bnb_quantized
    assert meta_model[0].weight.device.type == "meta"


def test_replace_linear_training_mode_and_bare_linear():
    model = nn.Sequential(nn.Linear(64, 32)).eval()
    bnn.replace_linear(model)
    assert not model[0].training
    with pytest.raises(TypeError, match="in place"):
        bnn.replace_linear(nn.Linear(64, 32))


def test_replace_linear_with_a_registered_hook_and_a_generic_class():
    calls = []

    class MyLinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, scale=1.0, device=None):
            super().__init__(in_features, out_features, bias, device)
            self.scale = scale

    bnn.register_weight_hook(MyLinear, lambda new, old: (
        calls.append(new), setattr(new, "weight", nn.Parameter(old.weight.data * new.scale))))
    try:
        torch.manual_seed(5)
        model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 2))
        w0 = model[0].weight.detach().clone()
        bnn.replace_linear(model, linear_cls=MyLinear, scale=2.0)
        assert len(calls) == 2 and all(type(m) is MyLinear for m in model)
        assert torch.equal(model[0].weight, 2 * w0) and model[0].bias.device.type == "cpu"
    finally:
        from bnbcy.nn import convert
        convert._WEIGHT_HOOKS.pop(MyLinear)

    class Plain(nn.Linear):  # no hook: generic copy through load_state_dict
        pass

    model = nn.Sequential(nn.Linear(8, 4))
    w0 = model[0].weight.detach().clone()
    bnn.replace_linear(model, linear_cls=Plain)
    assert type(model[0]) is Plain and torch.equal(model[0].weight, w0)
