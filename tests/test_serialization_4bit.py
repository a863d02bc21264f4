"""Linear4bit checkpoints: bitsandbytes' state_dict format both ways, fresh-module loading,
safetensors and torch.save (NUMERICS.md §3.5)."""
import io
import json

import pytest
import torch

import bnbcy.nn as bnn
from bnbcy.functional.fourbit import dequantize_4bit

bnb = pytest.importorskip("bitsandbytes")  # a test dependency (pyproject [test]); never missing in CI
from safetensors.torch import load_file, save_file  # noqa: E402

CONFIGS = [(qt, nested) for qt in ("nf4", "fp4") for nested in (True, False)]
IN, OUT = 300, 96  # 28800 weights: 450 blocks of 64, 2 nested blocks of 256 (the last one partial)


def _float_linear(seed, in_f=IN, out_f=OUT, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_f, out_f).to(dtype)


def _bnbcy_layer(lin, quant_type, nested, storage=torch.uint8):
    m = bnn.Linear4bit(lin.in_features, lin.out_features, compress_statistics=nested, quant_type=quant_type,
                       quant_storage=storage).to(lin.weight.dtype)  # still float: a dtype cast
    m.load_state_dict(lin.state_dict())
    return m.cpu()


def _bnb_layer(lin, quant_type, nested, storage=torch.uint8):
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, compress_statistics=nested, quant_type=quant_type,
                          quant_storage=storage)
    m.load_state_dict(lin.state_dict())
    m = m.to("cpu")  # bitsandbytes 0.50.2 quantizes on a CPU move too
    # bnb's CPU eval path repacks for AVX512-BF16 (and fails for K % blocksize != 0): keep the standard layout
    m.support_avx512bf16_for_cpu = False
    return m


def _bnb_from_bnbcy_state_dict(sd, lin, prefix=""):
    """bitsandbytes' own loading path (the one transformers uses)."""
    w = prefix + "weight"
    stats = {k[len(w) + 1:]: v for k, v in sd.items() if k.startswith(w + ".")}
    param = bnb.nn.Params4bit.from_prequantized(data=sd[w], quantized_stats=stats, device="cpu")
    m = bnb.nn.Linear4bit(lin.in_features, lin.out_features, quant_type=param.quant_type,
                          compress_statistics=param.compress_statistics, quant_storage=param.quant_storage)
    m.weight = param
    m.weight.module = m
    m.quant_state = param.quant_state
    m.bias = torch.nn.Parameter(sd[prefix + "bias"].clone())
    m.support_avx512bf16_for_cpu = False
    return m


def _blob(sd):
    (key,) = [k for k in sd if "bitsandbytes__" in k]
    return key, json.loads(bytes(sd[key].tolist()).decode("utf-8"))


@pytest.mark.parametrize("quant_type,nested", CONFIGS)
def test_state_dict_layout_equals_bitsandbytes(quant_type, nested):
    lin = _float_linear(0)
    ours = _bnbcy_layer(lin, quant_type, nested).state_dict()
    theirs = _bnb_layer(lin, quant_type, nested).state_dict()
    assert list(ours) == list(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert type(ours[k]) is torch.Tensor, k  # plain tensors: weights_only/safetensors-safe
    kb, jb = _blob(theirs)
    ko, jo = _blob(ours)
    assert ko == kb == f"weight.quant_state.bitsandbytes__{quant_type}"
    assert list(jo) == list(jb)
    for k in jb:
        if k == "nested_offset":
            assert jo[k] == pytest.approx(jb[k], rel=1e-6)
        else:
            assert jo[k] == jb[k], k
    # same codes for NF4; FP4 may differ only in the sign of zero codes (NUMERICS.md §3.2)
    assert torch.equal(ours["weight.quant_map"], theirs["weight.quant_map"])
    if quant_type == "nf4":
        assert torch.equal(ours["weight"], theirs["weight"])
    assert torch.equal(ours["bias"], theirs["bias"])


@pytest.mark.parametrize("quant_type,nested", CONFIGS)
def test_bitsandbytes_state_dict_loads_into_fresh_bnbcy_module(quant_type, nested):
    lin = _float_linear(1)
    bm = _bnb_layer(lin, quant_type, nested)
    sd = bm.state_dict()
    m = bnn.Linear4bit(IN, OUT)  # fresh: float weight, default settings (fp4, nested)
    result = m.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert m.weight.bnb_quantized and m.weight.quant_type == quant_type
    assert m.weight.compress_statistics == nested and m.quant_state is m.weight.quant_state
    ours = dequantize_4bit(m.weight.data, m.weight.quant_state)
    theirs = bnb.functional.dequantize_4bit(bm.weight.data, bm.weight.quant_state)
    assert torch.equal(ours, theirs)  # value-equal (bnb's CPU dequant may flip the sign of zeros)
    x = torch.randn(7, IN, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(m(x), bm(x), rtol=1e-5, atol=1e-5)
    # and saving again reproduces the checkpoint exactly
    again = m.state_dict()
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)


@pytest.mark.parametrize("quant_type,nested", CONFIGS)
@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16])
def test_bnbcy_state_dict_loads_into_bitsandbytes(quant_type, nested, storage):
    lin = _float_linear(3)
    m = _bnbcy_layer(lin, quant_type, nested, storage)
    sd = m.state_dict()
    bm = _bnb_from_bnbcy_state_dict(sd, lin)
    assert bm.weight.quant_storage == storage and bm.weight.quant_type == quant_type
    ours = dequantize_4bit(m.weight.data, m.weight.quant_state)
    theirs = bnb.functional.dequantize_4bit(bm.weight.data, bm.weight.quant_state)
    assert torch.equal(ours, theirs)
    x = torch.randn(3, 5, IN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.allclose(m(x), bm(x), rtol=1e-5, atol=1e-5)


def test_fresh_module_strict_load_inside_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    q = torch.nn.Sequential(bnn.LinearNF4(64, 64), torch.nn.ReLU(), bnn.LinearNF4(64, 8, compress_statistics=False))
    q.load_state_dict(model.state_dict())
    q.cpu()
    sd = q.state_dict()
    fresh = torch.nn.Sequential(bnn.Linear4bit(64, 64), torch.nn.ReLU(), bnn.Linear4bit(64, 8))
    result = fresh.load_state_dict(sd, strict=True)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert fresh[0].weight.quant_state.nested and not fresh[2].weight.quant_state.nested
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(5))
    assert torch.equal(fresh(x), q(x))


def test_strict_load_reports_missing_and_unexpected_keys():
    lin = _float_linear(6, 64, 32)
    sd = _bnbcy_layer(lin, "nf4", True).state_dict()
    broken = {k: v for k, v in sd.items() if k != "bias"}
    with pytest.raises(RuntimeError, match="Missing key.*bias"):
        bnn.Linear4bit(64, 32).load_state_dict(broken)
    without_weight = {k: v for k, v in sd.items() if k != "weight"}
    with pytest.raises(RuntimeError, match="Missing key.*weight"):
        bnn.Linear4bit(64, 32).load_state_dict(without_weight)
    extra = dict(sd, **{"weight.bogus": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="bogus"):
        bnn.Linear4bit(64, 32).load_state_dict(extra)
    with pytest.raises(RuntimeError, match="size mismatch"):
        bnn.Linear4bit(32, 64).load_state_dict(sd)  # same element count, transposed shape


def test_float_state_dict_loads_like_nn_linear():
    lin = _float_linear(7, 64, 32)
    m = bnn.Linear4bit(64, 32, quant_type="nf4")
    result = m.load_state_dict(lin.state_dict())
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert isinstance(m.weight, bnn.Params4bit) and not m.weight.bnb_quantized
    assert torch.equal(m.weight.data, lin.weight.data) and torch.equal(m.bias.data, lin.bias.data)
    m.cpu()
    direct = _bnbcy_layer(lin, "nf4", True)
    assert torch.equal(m.weight.data, direct.weight.data)
    # assign=True keeps the Params4bit subclass and its settings
    a = bnn.Linear4bit(64, 32, quant_type="nf4", compress_statistics=False)
    a.load_state_dict(lin.state_dict(), assign=True)
    assert isinstance(a.weight, bnn.Params4bit) and a.weight.quant_type == "nf4"
    a.cpu()
    assert a.weight.bnb_quantized and not a.weight.quant_state.nested


def test_float_state_dict_into_quantized_module_requantizes():
    m = _bnbcy_layer(_float_linear(8, 64, 32), "fp4", False)
    lin = _float_linear(9, 64, 32)
    m.load_state_dict(lin.state_dict())
    direct = _bnbcy_layer(lin, "fp4", False)
    assert torch.equal(m.weight.data, direct.weight.data) and m.weight.quant_state == direct.weight.quant_state
    assert m.quant_state is m.weight.quant_state


@pytest.mark.parametrize("quant_type,nested", CONFIGS)
def test_safetensors_round_trip(tmp_path, quant_type, nested):
    lin = _float_linear(10)
    model = torch.nn.Sequential(_bnbcy_layer(lin, quant_type, nested), torch.nn.GELU(),
                                _bnbcy_layer(_float_linear(11, OUT, 16), quant_type, nested))
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))  # raises on shared tensors
    loaded = load_file(str(path))
    fresh = torch.nn.Sequential(bnn.Linear4bit(IN, OUT), torch.nn.GELU(), bnn.Linear4bit(OUT, 16))
    fresh.load_state_dict(loaded, strict=True)
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(12))
    assert torch.equal(fresh(x), model(x))
    # bitsandbytes reads the safetensors file too
    bm = _bnb_from_bnbcy_state_dict(loaded, lin, prefix="0.")
    with torch.no_grad():
        assert torch.allclose(bm(x), model[0](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weights_only", [True, False])
def test_torch_save_load_state_dict(weights_only):
    m = _bnbcy_layer(_float_linear(13), "nf4", True, torch.float16)
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=weights_only)
    fresh = bnn.Linear4bit(IN, OUT, quant_storage=torch.float16)
    fresh.load_state_dict(sd, strict=True)
    assert fresh.weight.dtype == torch.float16 and fresh.quant_storage == torch.float16
    x = torch.randn(2, IN, generator=torch.Generator().manual_seed(14))
    assert torch.equal(fresh(x), m(x))


def test_bf16_model_state_dict_round_trip():
    lin = _float_linear(15, 128, 32, dtype=torch.bfloat16)
    m = _bnbcy_layer(lin, "nf4", True)
    sd = m.state_dict()
    assert sd["bias"].dtype == torch.bfloat16 and _blob(sd)[1]["dtype"] == "bfloat16"
    fresh = bnn.Linear4bit(128, 32)
    fresh.load_state_dict(sd)
    assert fresh.weight.quant_state.dtype == torch.bfloat16 and fresh.bias.dtype == torch.float32
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(16), dtype=torch.bfloat16)
    assert torch.equal(fresh(x), m(x))
    bm = _bnb_from_bnbcy_state_dict(sd, lin)
    assert torch.equal(bnb.functional.dequantize_4bit(bm.weight.data, bm.weight.quant_state),
                       dequantize_4bit(m.weight.data, m.weight.quant_state))
