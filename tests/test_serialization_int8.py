"""Linear8bitLt checkpoints: bitsandbytes' state_dict format both ways, fresh-module loading,
weight_format, safetensors and torch.save (NUMERICS.md §5.8)."""
import io

import pytest
import torch

import bnbcy.nn as bnn

bnb = pytest.importorskip("bitsandbytes")  # a test dependency (pyproject [test]); never missing in CI
from safetensors.torch import load_file, save_file  # noqa: E402

IN, OUT = 200, 72
KEYS = ["weight", "bias", "SCB", "weight_format"]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _float_linear(seed, in_f=IN, out_f=OUT):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight[::7, 5] *= 20  # a few large weights: uneven row scales
    return lin


def _input(seed, rows=6, outlier_cols=(4, 50)):
    x = torch.randn(rows, IN, generator=_gen(seed))
    for c in outlier_cols:
        x[:, c] = 8.0 + torch.rand(rows, generator=_gen(seed + c))
    return x


def _bnbcy_layer(lin, threshold=0.0):
    m = bnn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    return m.cpu()


def _bnb_layer(lin, threshold=0.0):
    m = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(lin.state_dict())
    return m.to("cpu")  # bitsandbytes 0.50.2 quantizes on a move from the CPU to the CPU too


def _bnb_from_state_dict(sd, threshold=0.0):
    """bitsandbytes' own loading path: the module must be quantized (moved) before loading."""
    m = bnb.nn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold).to("cpu")
    m.load_state_dict(sd)
    return m


def _bytes(t):
    return t.detach().contiguous().view(torch.uint8).reshape(-1)


def _fwd(m, x, train=False):
    m.train(train)
    with torch.no_grad():
        return m(x)


def _cb_scb(m):
    cb = m.weight.CB if m.weight.CB is not None else m.state.CB
    scb = m.weight.SCB if m.weight.SCB is not None else m.state.SCB
    return cb, scb


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------------- layout
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_state_dict_layout_equals_bitsandbytes(threshold):
    lin = _float_linear(0)
    ours = _bnbcy_layer(lin, threshold).state_dict()
    theirs = _bnb_layer(lin, threshold).state_dict()
    assert list(ours) == list(theirs) == KEYS
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and ours[k].shape == theirs[k].shape, k
        assert type(ours[k]) is torch.Tensor, k  # plain tensors: weights_only/safetensors-safe
    assert ours["weight"].dtype == torch.int8 and ours["SCB"].dtype == torch.float32
    assert ours["weight_format"].dtype == torch.uint8 and ours["weight_format"].shape == () \
        and ours["weight_format"].item() == 0
    assert torch.equal(ours["bias"], lin.bias.detach())
    # both quantize W.half() with the float16 row absmax
    assert torch.equal(ours["SCB"], theirs["SCB"])
    assert torch.equal(ours["SCB"], lin.weight.detach().half().abs().amax(1).float())
    # bnbcy's CPU quantizer follows bitsandbytes' CPU backend (IEEE 127/absmax, ties to even)
    assert torch.equal(_bytes(ours["weight"]), _bytes(theirs["weight"]))


def test_state_dict_after_forward_and_fp16_weights_layout():
    lin = _float_linear(1)
    for m in (_bnbcy_layer(lin), _bnb_layer(lin)):
        sd0 = m.state_dict()
        _fwd(m, _input(2))  # CB/SCB move to m.state: SCB is then saved from the state
        sd1 = m.state_dict()
        assert list(sd1) == KEYS and all(torch.equal(sd0[k], sd1[k]) for k in KEYS)
    ours = bnn.Linear8bitLt(IN, OUT).cpu().state_dict()
    theirs = bnb.nn.Linear8bitLt(IN, OUT).cpu().state_dict()
    assert list(ours) == list(theirs) == ["weight", "bias"]
    assert ours["weight"].dtype == theirs["weight"].dtype == torch.float32


# ------------------------------------------------------------------------ bnb <-> bnbcy
@pytest.mark.parametrize("threshold", [0.0, 6.0])
@pytest.mark.parametrize("after_forward", [False, True])
def test_bitsandbytes_state_dict_loads_into_fresh_bnbcy_module(threshold, after_forward):
    lin = _float_linear(3)
    theirs = _bnb_layer(lin, threshold)
    x = _input(4)
    if after_forward:
        _fwd(theirs, x)
    sd = theirs.state_dict()
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)  # never moved
    result = m.load_state_dict(sd)  # strict
    assert not result.missing_keys and not result.unexpected_keys
    assert type(m.weight) is bnn.Int8Params and m.weight.dtype == torch.int8 and not m.weight.requires_grad
    assert torch.equal(_bytes(m.weight), _bytes(sd["weight"]))
    assert torch.equal(_bytes(m.weight.SCB), _bytes(sd["SCB"]))
    assert m.weight.CB.data_ptr() == m.weight.data_ptr()
    assert torch.equal(m.bias, sd["bias"])
    # same forward as bitsandbytes: training mode (dequantized weight) and eval (int8 path)
    assert torch.allclose(_fwd(m, x, train=True), _fwd(theirs, x, train=True), rtol=1e-5, atol=1e-5)
    y, y_bnb = _fwd(m, x), _fwd(theirs, x)
    # bnb's CPU mm-dequant constant differs by 1.8e-5 relative (NUMERICS §5.4) and outputs pass fp16
    assert torch.allclose(y, y_bnb, rtol=2e-3, atol=2e-3 * y_bnb.abs().max().item())
    assert _rel(y, y_bnb) < 2e-3
    assert list(m.state_dict()) == KEYS
    assert all(torch.equal(m.state_dict()[k], sd[k]) for k in KEYS)


@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_bnbcy_state_dict_loads_through_bitsandbytes_loading_path(threshold):
    lin = _float_linear(5)
    ours = _bnbcy_layer(lin, threshold)
    sd = ours.state_dict()
    theirs = _bnb_from_state_dict(sd, threshold)
    assert torch.equal(_bytes(theirs.weight), _bytes(sd["weight"]))
    assert torch.equal(_bytes(theirs.weight.SCB), _bytes(sd["SCB"]))
    x = _input(6)
    assert torch.allclose(_fwd(ours, x, train=True), _fwd(theirs, x, train=True), rtol=1e-5, atol=1e-5)
    y, y_bnb = _fwd(ours, x), _fwd(theirs, x)
    assert torch.allclose(y, y_bnb, rtol=2e-3, atol=2e-3 * y_bnb.abs().max().item())
    # and a state dict saved after a forward (SCB from the state) loads into bnb too
    sd2 = ours.state_dict()
    theirs2 = _bnb_from_state_dict(sd2, threshold)
    assert torch.equal(theirs2.weight.SCB, sd["SCB"]) and torch.equal(theirs2.weight.data, sd["weight"])


# ------------------------------------------------------------------------ bnbcy loading
def test_fresh_meta_and_nested_modules_load_strictly():
    lins = torch.nn.Sequential(_float_linear(7), torch.nn.ReLU(), _float_linear(8, in_f=OUT, out_f=IN))
    src = torch.nn.Sequential(bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False), torch.nn.ReLU(),
                              bnn.Linear8bitLt(OUT, IN, has_fp16_weights=False))
    src.load_state_dict(lins.state_dict())
    src = src.cpu()
    sd = src.state_dict()
    assert list(sd) == [f"{i}.{k}" for i in (0, 2) for k in KEYS]
    with torch.device("meta"):
        dst = torch.nn.Sequential(bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False), torch.nn.ReLU(),
                                  bnn.Linear8bitLt(OUT, IN, has_fp16_weights=False))
    assert dst[0].weight.device.type == "meta"
    dst.load_state_dict(sd, assign=True)  # meta parameters are replaced, not copied into
    for i in (0, 2):
        assert dst[i].weight.device.type == "cpu" and dst[i].weight.dtype == torch.int8
        assert type(dst[i].weight) is bnn.Int8Params and dst[i].bias.device.type == "cpu"
        assert torch.equal(dst[i].weight.data, sd[f"{i}.weight"]) and torch.equal(dst[i].weight.SCB, sd[f"{i}.SCB"])
    x = _input(9)
    assert torch.equal(_fwd(dst, x), _fwd(src, x))
    # assign=True keeps the incoming tensors
    fresh = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    fresh.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("0.")}, assign=True)
    assert type(fresh.weight) is bnn.Int8Params and fresh.weight.data_ptr() == sd["0.weight"].data_ptr()


def test_load_into_quantized_module_is_in_place_and_resets_state():
    a, b = _bnbcy_layer(_float_linear(10)), _bnbcy_layer(_float_linear(11))
    x = _input(12)
    ya = _fwd(a, x)
    _fwd(b, x)  # b's codes are in b.state now
    param = b.weight
    b.load_state_dict(a.state_dict())
    assert b.weight is param  # the parameter object is kept (as bitsandbytes)
    assert torch.equal(b.weight.data, a.state.CB) and torch.equal(_cb_scb(b)[1], a.state.SCB)
    assert torch.equal(_fwd(b, x), ya)


def test_float_state_dict_into_quantized_module_is_quantized():
    lin = _float_linear(13)
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).cpu()  # quantized random init
    m.load_state_dict(lin.state_dict())  # bitsandbytes would copy the floats into the int8 codes
    ref = _bnbcy_layer(lin)
    assert m.weight.dtype == torch.int8
    assert torch.equal(m.weight.data, ref.weight.data) and torch.equal(m.weight.SCB, ref.weight.SCB)
    # not yet quantized: a float state dict loads like nn.Linear and the move quantizes
    f = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    f.load_state_dict(lin.state_dict())
    assert f.weight.dtype == torch.float32 and torch.equal(f.weight, lin.weight)
    assert type(f.weight) is bnn.Int8Params and f.cpu().weight.dtype == torch.int8


def test_loading_errors_are_clear():
    sd = _bnbcy_layer(_float_linear(14)).state_dict()
    with pytest.raises(RuntimeError, match="has_fp16_weights=True"):
        bnn.Linear8bitLt(IN, OUT, has_fp16_weights=True).load_state_dict(sd)
    with pytest.raises(RuntimeError, match="size mismatch"):
        bnn.Linear8bitLt(IN + 8, OUT, has_fp16_weights=False).load_state_dict(sd, strict=False)
    bad = dict(sd, SCB=sd["SCB"][:-1])
    with pytest.raises(RuntimeError, match="size mismatch for SCB"):
        bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).load_state_dict(bad)
    no_scb = {k: v for k, v in sd.items() if k != "SCB"}
    with pytest.raises(RuntimeError, match="SCB is missing"):
        bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).load_state_dict(no_scb)
    with pytest.raises(RuntimeError, match="Missing key"):
        bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).load_state_dict({k: sd[k] for k in ("weight", "SCB")})


# --------------------------------------------------------------------------- weight_format
@pytest.mark.parametrize("fmt", [0, "row", torch.tensor(0, dtype=torch.uint8), torch.tensor(0)])
def test_weight_format_row_accepted(fmt):
    sd = dict(_bnbcy_layer(_float_linear(15)).state_dict(), weight_format=fmt)
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    assert not m.load_state_dict(sd).unexpected_keys
    assert torch.equal(m.weight.data, sd["weight"])
    assert sd["weight_format"] is fmt  # the caller's dict is left alone
    # and bitsandbytes accepts the same values
    _bnb_from_state_dict(dict(sd))


@pytest.mark.parametrize("fmt,name", [(1, "col32"), ("col32", "col32"), (3, "col_ampere"),
                                      (torch.tensor(2, dtype=torch.uint8), "col_turing"), (7, "7"),
                                      ("nonsense", "nonsense")])
def test_weight_format_other_raises_naming_it(fmt, name):
    sd = dict(_bnbcy_layer(_float_linear(16)).state_dict(), weight_format=fmt)
    with pytest.raises(ValueError, match=name):
        bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).load_state_dict(sd)
    with pytest.raises(ValueError, match=name):  # bitsandbytes raises too
        _bnb_from_state_dict(dict(sd))


def test_state_dict_without_weight_format_loads():
    sd = _bnbcy_layer(_float_linear(17)).state_dict()
    del sd["weight_format"]
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False)
    m.load_state_dict(sd)
    assert torch.equal(m.weight.SCB, sd["SCB"])


# --------------------------------------------------------------------------- files
@pytest.mark.parametrize("threshold", [0.0, 6.0])
def test_safetensors_round_trip(tmp_path, threshold):
    src = _bnbcy_layer(_float_linear(18), threshold)
    path = str(tmp_path / "int8.safetensors")
    save_file(src.state_dict(), path)
    sd = load_file(path)
    assert sd["weight_format"].dtype == torch.uint8 and sd["weight_format"].shape == ()
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)
    m.load_state_dict(sd)
    x = _input(19)
    assert torch.equal(_fwd(m, x), _fwd(src, x))
    # a bitsandbytes checkpoint written with safetensors loads too
    path2 = str(tmp_path / "bnb.safetensors")
    theirs = _bnb_layer(_float_linear(20), threshold)
    save_file(theirs.state_dict(), path2)
    m2 = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=threshold)
    m2.load_state_dict(load_file(path2))
    assert torch.equal(m2.weight.data, theirs.weight.data) and torch.equal(m2.weight.SCB, theirs.weight.SCB)


def test_torch_save_round_trips():
    src = _bnbcy_layer(_float_linear(21), 6.0)
    x = _input(22)
    y = _fwd(src, x)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    m = bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False, threshold=6.0)
    m.load_state_dict(sd)
    assert torch.equal(_fwd(m, x), y)
    buf = io.BytesIO()
    torch.save(src, buf)  # the whole module (Int8Params subclass, MatmulLtState)
    buf.seek(0)
    whole = torch.load(buf, weights_only=False)
    assert type(whole.weight) is bnn.Int8Params and whole.state.threshold == 6.0
    assert torch.equal(_fwd(whole, x), y)
