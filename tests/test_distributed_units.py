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


def _int8_layer(seed):
    torch.manual_seed(seed)
    return bnn.Linear8bitLt(32, 16, bias=True, has_fp16_weights=False).to("cpu")


def test_int8_layer_follows_a_weight_a_wrapper_replaced():
    """FSDP2 swaps the parameter object (and FSDP1 its storage) around each forward: the
    forward reads the codes it is handed, with the module's SCB."""
    m = _int8_layer(0)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = m(x)
        codes = m.weight.data.clone()
        m.weight = torch.nn.Parameter(codes, requires_grad=False)     # what FSDP2 installs
        assert torch.equal(m(x), want)
        assert m.state.CB is m.weight
        m.weight = torch.nn.Parameter(torch.zeros_like(codes), requires_grad=False)
        assert torch.equal(m(x), m.bias.expand(3, -1))                # not a stale copy of the codes
    assert m.SCB is m.state.SCB and m.weight_format.item() == 0


def test_int8_load_into_a_held_weight_is_in_place():
    src, dst = _int8_layer(1), _int8_layer(2)
    x = torch.randn(3, 32)
    with torch.no_grad():
        want = src(x)
        dst(x)
    held = torch.nn.Parameter(dst.weight.data.clone(), requires_grad=False)
    dst.weight = held
    scb = dst.SCB
    dst.load_state_dict(src.state_dict())
    assert dst.weight is held and dst.SCB is scb           # the objects FSDP / DDP hold
    with torch.no_grad():
        assert torch.equal(dst(x), want)
    # a float weight into a held module is quantized, then copied in place
    dst.load_state_dict({"weight": torch.randn(16, 32), "bias": torch.zeros(16)})
    assert dst.weight is held and dst.weight.dtype == torch.int8


def test_has_storage_sees_freed_storage():
    t = torch.randn(4, 4)
    view = t[1:]
    assert D.has_storage(view)
    t.untyped_storage().resize_(0)           # what FSDP does to an unsharded parameter between uses
    assert not D.has_storage(view) and D.has_storage(torch.empty(0))
