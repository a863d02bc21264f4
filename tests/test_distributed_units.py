"""Single-process checks of bnbcy.distributed's pieces: the fixed-length quant-state blob and
the sharded form of the 8-bit optimizer state (exact and requantized)."""
import json

import bitsandbytes as bnb
import pytest
import torch

import bnbcy
import bnbcy.distributed as D
import bnbcy.nn as bnn
from bnbcy.functional.blockwise import dequantize_blockwise, quantize_blockwise
from bnbcy.functional.maps import create_dynamic_map


def _layer(seed=0):
    torch.manual_seed(seed)
    return bnn.Linear4bit(64, 32, quant_type="nf4").to("cpu")


def test_plain_state_dict_keeps_bitsandbytes_bytes_and_fixed_length_pads():
    m = _layer()
    plain = m.state_dict()
    with D.fixed_length_quant_state():
        fixed = m.state_dict()
    key = "weight.quant_state.bitsandbytes__nf4"
    assert plain.keys() == fixed.keys()
    n = plain[key].numel()
    assert n < D.FIXED_BLOB_BYTES and fixed[key].numel() == D.FIXED_BLOB_BYTES
    assert torch.equal(fixed[key][:n], plain[key]) and bool((fixed[key][n:] == ord(" ")).all())
    assert json.loads(bytes(fixed[key].tolist())) == json.loads(bytes(plain[key].tolist()))
    # values that change the JSON's length do not change the padded entry's length
    other = _layer(seed=3)
    with D.fixed_length_quant_state():
        assert other.state_dict()[key].numel() == D.FIXED_BLOB_BYTES


def test_fixed_length_state_dict_loads_in_bnbcy_and_bitsandbytes():
    m = _layer()
    with D.fixed_length_quant_state():
        sd = m.state_dict()
    fresh = bnn.Linear4bit(64, 32)
    fresh.load_state_dict(sd)
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), m(x))
    stats = {k[len("weight."):]: v for k, v in sd.items() if k.startswith("weight.")}
    p = bnb.nn.Params4bit.from_prequantized(data=sd["weight"], quantized_stats=stats, device="cpu")
    assert torch.equal(bnb.functional.dequantize_4bit(p.data, p.quant_state),
                       bnbcy.functional.dequantize_4bit(m.weight.data, m.weight.quant_state))


def test_pad_blob_longer_than_the_fixed_length_rounds_up():
    blob = torch.full((D.FIXED_BLOB_BYTES + 3,), ord("a"), dtype=torch.uint8)
    assert D.pad_blob(blob).numel() == 2 * D.FIXED_BLOB_BYTES


def _fsdp1_param(n):
    p = torch.nn.Parameter(torch.randn(n))
    p._fsdp_flattened = True        # what FSDP1 marks on the parameters it flattened
    return p


def _state(n, gen):
    q = create_dynamic_map(signed=True)
    vals = torch.randn(n, generator=gen)
    codes, qs = quantize_blockwise(vals, code=q, blocksize=256)
    return {"step": 4, "state1": codes, "absmax1": qs.absmax, "qmap1": q}, q


def test_sharded_form_round_trip_is_exact_on_the_same_sharding():
    p = _fsdp1_param(700)
    st, q = _state(700, torch.Generator().manual_seed(0))
    form = D.optimizer_state_to_sharded(p, st)
    assert "qmap1" not in form and form["state1"].shape == p.shape == form["absmax1"].shape
    assert form["state1"].dtype == torch.float32       # FSDP1: one dtype for all states
    back = D.optimizer_state_from_sharded(p, form, lambda name, dev: q)
    assert back["step"] == 4 and back["qmap1"] is q
    assert torch.equal(back["state1"], st["state1"]) and torch.equal(back["absmax1"], st["absmax1"])


def test_sharded_form_on_another_sharding_requantizes_the_values():
    full = _fsdp1_param(700)
    st, q = _state(700, torch.Generator().manual_seed(1))
    form = D.optimizer_state_to_sharded(full, st)
    values = dequantize_blockwise(st["state1"], absmax=st["absmax1"], code=q, blocksize=256)
    piece = slice(100, 500)                      # blocks of this piece straddle the saved ones
    p = _fsdp1_param(400)
    back = D.optimizer_state_from_sharded(p, {k: (v[piece] if torch.is_tensor(v) else v) for k, v in form.items()},
                                          lambda name, dev: q)
    assert back["state1"].dtype == torch.uint8 and back["absmax1"].shape == (2,)
    again = dequantize_blockwise(back["state1"], absmax=back["absmax1"], code=q, blocksize=256)
    scale = values[piece].abs().max()
    assert torch.allclose(again, values[piece], atol=float(scale) * 0.02)


def test_sharded_form_rejects_a_state_of_another_shape():
    p = _fsdp1_param(300)
    st, q = _state(300, torch.Generator().manual_seed(2))
    form = D.optimizer_state_to_sharded(p, st)
    form["absmax1"] = form["absmax1"][:-1]
    with pytest.raises(ValueError, match="absmax1"):
        D.optimizer_state_from_sharded(p, form, lambda name, dev: q)
