"""torch.compile(fullgraph=True) of models with Linear4bit / LinearNF4 / Linear8bitLt: inference
and QLoRA-style training (frozen quantized base + trainable low-rank adapters), with and without
activation checkpointing, against eager. fullgraph=True fails on any graph break, so a pass
also means dynamo reached only the ``torch.ops.bnbcy`` ops (no Cython call) from the forwards.

Most cases use the ``aot_eager`` backend (dynamo + AOTAutograd with the ops' fake kernels and
registered backward, no code generation: fast); inductor's ``mode="default"`` and
``"reduce-overhead"`` run on one model holding all three layer kinds. On the CPU,
``reduce-overhead`` compiles like ``default`` (CUDA graphs apply to CUDA tensors only)."""
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import bnbcy.nn as bnn

IN, HID, RANK = 64, 32, 4


def _base(kind):
    if kind == "nf4":
        return bnn.LinearNF4(IN, IN, compute_dtype=torch.float32)
    if kind == "fp4":
        return bnn.Linear4bit(IN, IN, quant_type="fp4", compress_statistics=False)
    if kind == "int8":
        return bnn.Linear8bitLt(IN, IN, has_fp16_weights=False)
    if kind == "int8-outliers":
        return bnn.Linear8bitLt(IN, IN, has_fp16_weights=False, threshold=2.5)
    raise AssertionError(kind)


class Adapted(nn.Module):
    """``base(x) + up(down(x))``: a frozen quantized base with a trainable LoRA-like adapter."""

    def __init__(self, base):
        super().__init__()
        self.base, self.down, self.up = base, nn.Linear(IN, RANK, bias=False), nn.Linear(RANK, IN, bias=False)
        nn.init.normal_(self.up.weight, std=0.1)   # LoRA starts at 0; nonzero so grads reach `down`

    def forward(self, x):
        return self.base(x) + self.up(self.down(x))


class Net(nn.Module):
    def __init__(self, kinds, ckpt=False):
        super().__init__()
        self.blocks = nn.ModuleList(Adapted(_base(k)) for k in kinds)
        self.head = nn.Linear(IN, HID)
        self.ckpt = ckpt

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.ckpt else block(x)
            x = torch.relu(x)
        return self.head(x)


def _model(kinds, ckpt=False, seed=0):
    torch.manual_seed(seed)
    m = Net(kinds, ckpt).to("cpu")          # quantizes the bases
    for name, p in m.named_parameters():
        p.requires_grad_(".base." not in name or name.endswith("bias"))
    return m


def _x(rows=5, seed=1):
    return torch.randn(rows, IN, generator=torch.Generator().manual_seed(seed))


def _train_step(m, x, call=None):
    """One loss.backward through ``call`` (default ``m``); the grads of m's parameters."""
    m.zero_grad(set_to_none=True)
    loss = (m if call is None else call)(x).square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


def _compiled(m, **kw):
    torch._dynamo.reset()
    return torch.compile(m, fullgraph=True, **kw)


@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8", "int8-outliers"])
def test_inference_no_graph_break_matches_eager(kind):
    m = _model([kind]).eval()
    x = _x()
    with torch.no_grad():
        ref = m(x)
        c = _compiled(m, backend="aot_eager")
        assert torch.equal(c(x), ref)
        assert torch.equal(c(_x(seed=2)), m(_x(seed=2)))   # same graph, other data


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("kind", ["nf4", "fp4", "int8"])
def test_qlora_training_no_graph_break_grads_match_eager(kind, ckpt):
    m = _model([kind], ckpt=ckpt).train()
    x = _x()
    ref_loss, ref_grads = _train_step(m, x)
    assert set(ref_grads) == {"blocks.0.base.bias", "blocks.0.down.weight", "blocks.0.up.weight",
                              "head.weight", "head.bias"}
    loss, grads = _train_step(m, x, _compiled(m, backend="aot_eager"))
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-6, msg=name)


def test_input_gradient_through_4bit_base_matches_eager():
    m = _model(["nf4", "fp4"]).train()
    x = _x().requires_grad_()
    m(x).sum().backward()
    ref = x.grad.clone()
    x.grad = None
    _compiled(m, backend="aot_eager")(x).sum().backward()
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_inductor_modes(mode):
    m = _model(["nf4", "int8", "fp4"], ckpt=mode == "default")
    x = _x()
    if mode == "default":   # checkpointed QLoRA training step (forward and backward graphs)
        ref_loss, ref_grads = _train_step(m.train(), x)
        c = _compiled(m, mode=mode)
        loss, grads = _train_step(m, x, c)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5, msg=name)
    else:
        c = _compiled(m, mode=mode)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(c(x), m(x), rtol=1e-5, atol=1e-6)
