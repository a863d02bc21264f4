"""bnbcy.nn.parametrize against bitsandbytes' on the CPU: 4-bit parametrization of arbitrary
parameters (MoE-style 3-D expert stacks included), state_dict round trips, the parametrization
cache around forwards (activation checkpointing included), and bad input leaving modules as
they were."""
import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize as P
from torch.utils.checkpoint import checkpoint

import bitsandbytes.nn.parametrize as bnb_par
import bnbcy.functional as F
import bnbcy.nn.parametrize as par


class Experts(nn.Module):
    """A stack of expert weights (as MoE layers keep them), outside any nn.Linear."""

    def __init__(self, n=4, d=64, f=32, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(n, f, d, generator=g, dtype=torch.float32).to(dtype) * 0.05)
        self.bias = nn.Parameter(torch.zeros(f, dtype=dtype))
        self.calls = 0

    def forward(self, x):  # reads self.w twice: the cache must make that one dequantization
        self.calls += 1
        return torch.einsum("bd,nfd->bnf", x, self.w) + self.w.sum() * 0 + self.bias


def _pair(dtype=torch.float32, **kw):
    a, b = Experts(dtype=dtype), Experts(dtype=dtype)
    par.replace_parameter_4bit(a, "w", **kw)
    bnb_par.replace_parameter_4bit(b, "w", **kw)
    return a, b


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("compress_statistics", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_bitsandbytes(quant_type, compress_statistics, dtype):
    a, b = _pair(dtype, quant_type=quant_type, compress_statistics=compress_statistics, blocksize=64)
    assert P.is_parametrized(a, "w") and isinstance(a.parametrizations.w[0], par.Bnb4bitParametrization)
    assert a.w.dtype == dtype and a.w.shape == (4, 32, 64)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        if not (k == "w" and quant_type == "fp4"):
            assert torch.equal(sa[k], sb[k]), k
    if quant_type == "nf4":
        assert torch.equal(sa["w"], sb["w"]) and torch.equal(a.w, b.w)
    else:
        # bnbcy's FP4 follows bitsandbytes' CUDA kernel (docs/fourbit.md): zeros keep the input's
        # sign, and inputs exactly on a rounding threshold (bf16 ones hit them) follow CUDA's
        # threshold literals; bitsandbytes' CPU kernel differs in both. Any other code is equal.
        assert (a.w != b.w).sum() <= a.w.numel() // 1000
        assert torch.equal(F.dequantize_4bit(sb["w"], a.parametrizations.w[0].quant_state), b.w)
    assert not a.parametrizations.w.original.requires_grad


def test_state_dict_round_trip_into_a_fresh_module():
    a = Experts()
    ref = a.w.detach().clone()
    par.replace_parameter_4bit(a, "w", compress_statistics=True)
    sd = a.state_dict()
    assert "w" in sd and "w.absmax" in sd and "w.quant_state.bitsandbytes__nf4" in sd
    assert not any(k.startswith("parametrizations.") for k in sd)

    fresh = Experts()
    fresh.w = nn.Parameter(sd["w"], requires_grad=False)
    qs = {k[len("w."):]: v for k, v in sd.items() if k.startswith("w.")}
    par.replace_parameter_4bit_prequantized(fresh, "w", qs, torch.device("cpu"))
    fresh.bias.data.copy_(sd["bias"])
    assert torch.equal(fresh.w, a.w)
    sd2 = fresh.state_dict()
    assert sorted(sd2) == sorted(sd) and all(torch.equal(sd2[k], sd[k]) for k in sd)
    # and the same state dict loads through bitsandbytes' function too
    other = Experts()
    other.w = nn.Parameter(sd["w"], requires_grad=False)
    bnb_par.replace_parameter_4bit_prequantized(other, "w", qs, torch.device("cpu"))
    assert torch.equal(other.w, a.w)
    assert (a.w - ref).abs().max() < 0.05 * 3  # NF4 error bound: well under the weights' range


def _count_dequant(monkeypatch):
    calls = []
    real = F.dequantize_4bit

    def counting(*args, **kw):
        calls.append(1)
        return real(*args, **kw)
    monkeypatch.setattr(F, "dequantize_4bit", counting)
    return calls


def test_cache_one_dequantization_per_forward_and_cleared_after(monkeypatch):
    m = Experts()
    par.replace_parameter_4bit(m, "w")
    calls = _count_dequant(monkeypatch)
    x = torch.randn(3, 64)
    m(x)
    assert len(calls) == 1                     # two reads of m.w, one dequantization
    assert P._cache_enabled == 0 and P._cache == {}
    m(x)
    assert len(calls) == 2                     # not cached across forwards


def test_cache_counter_survives_a_failing_forward():
    m = Experts()
    par.replace_parameter_4bit(m, "w")
    with pytest.raises(RuntimeError):
        m(torch.randn(3, 7))                   # wrong width: einsum raises inside the forward
    assert P._cache_enabled == 0 and P._cache == {}


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_leaves_no_cache_behind(use_reentrant):
    m = Experts()
    par.replace_parameter_4bit(m, "w")
    x = torch.randn(3, 64, requires_grad=True)
    for _ in range(3):
        y = checkpoint(m, x, use_reentrant=use_reentrant)
        y.sum().backward()
        assert P._cache_enabled == 0 and P._cache == {}
    ref = torch.einsum("bd,nfd->bnf", x.detach(), m.w).sum(dim=(1, 2))
    assert x.grad is not None and torch.isfinite(x.grad).all() and ref.shape == (3,)


def test_bad_input_leaves_the_module_unchanged():
    m = Experts()
    before = m.w.detach().clone()
    with pytest.raises(AttributeError, match="does not have parameter 'nope'"):
        par.replace_parameter_4bit(m, "nope")
    m.buf = torch.zeros(3)
    with pytest.raises(TypeError, match="not an instance of nn.Parameter"):
        par.replace_parameter_4bit(m, "buf")
    with pytest.raises(ValueError):
        par.replace_parameter_4bit(m, "w", quant_type="int3")
    assert not P.is_parametrized(m) and torch.equal(m.w, before)
    par.replace_parameter_4bit(m, "w")
    with pytest.raises(TypeError):             # a parametrized attribute is no nn.Parameter any more
        par.replace_parameter_4bit(m, "w")
    assert len(m.parametrizations.w) == 1
