"""Linear4bit / Linear8bitLt load_state_dict is all or nothing: on any error the module
(parameter objects, their data and attributes, quant state, LLM.int8 state) is as before."""
import pytest
import torch

import bnbcy.nn as bnn

IN, OUT = 64, 32


def _q4(seed, **kw):
    torch.manual_seed(seed)
    return bnn.Linear4bit(IN, OUT, quant_type="nf4", **kw).to("cpu")


def _q8(seed):
    torch.manual_seed(seed)
    return bnn.Linear8bitLt(IN, OUT, has_fp16_weights=False).to("cpu")


def _fingerprint(m):
    """Everything a load may change, by value and by identity."""
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = m(x).clone()
    params = {n: (id(p), p.detach().clone(), type(p)) for n, p in m.named_parameters()}
    qs = getattr(m, "quant_state", None)
    scb = m._scb().clone() if isinstance(m, bnn.Linear8bitLt) else None
    return out, params, id(qs), scb


def _assert_unchanged(m, before):
    out, params, qs_id, scb = before
    now = _fingerprint(m)
    assert torch.equal(now[0], out)
    assert set(now[1]) == set(params)
    for n, (pid, data, typ) in params.items():
        assert now[1][n][0] == pid and now[1][n][2] is typ and torch.equal(now[1][n][1], data), n
    assert now[2] == qs_id
    if scb is not None:
        assert torch.equal(now[3], scb)


def _bad_4bit_dicts():
    good = _q4(1).state_dict()
    blob = next(k for k in good if "bitsandbytes__" in k)
    yield "unexpected key (strict)", {**good, "extra": torch.zeros(1)}
    yield "missing bias (strict)", {k: v for k, v in good.items() if k != "bias"}
    yield "bias of the wrong shape", {**good, "bias": torch.zeros(OUT + 1)}
    yield "truncated absmax", {**good, "weight.absmax": good["weight.absmax"][:-1]}
    yield "blob that is not JSON", {**good, blob: torch.tensor(list(b"{not json"), dtype=torch.uint8)}
    yield "weight of another layer's shape", {**good, "weight": good["weight"][:-1]}


@pytest.mark.parametrize("case", list(range(6)))
def test_linear4bit_bad_state_dict_leaves_module_as_before(case):
    name, sd = list(_bad_4bit_dicts())[case]
    m = _q4(0)
    before = _fingerprint(m)
    with pytest.raises(RuntimeError):
        m.load_state_dict(sd)
    _assert_unchanged(m, before)


def test_linear4bit_bad_entry_inside_a_model_leaves_that_layer_as_before():
    model = torch.nn.Sequential(_q4(0), torch.nn.ReLU())
    before = _fingerprint(model[0])
    sd = {"0." + k: v for k, v in _q4(1).state_dict().items()}
    sd["0.weight.absmax"] = sd["0.weight.absmax"][:-1]
    with pytest.raises(RuntimeError, match="absmax|While loading"):
        model.load_state_dict(sd)
    _assert_unchanged(model[0], before)


def test_linear4bit_good_load_still_loads():
    m, src = _q4(0), _q4(1)
    w = m.weight
    m.load_state_dict(src.state_dict())
    assert m.weight is w                   # quantized already: codes copied in place
    x = torch.randn(3, IN)
    with torch.no_grad():
        assert torch.equal(m(x), src(x))


@pytest.mark.parametrize("case", ["unexpected", "scb_shape", "weight_dtype", "weight_shape"])
def test_linear8bit_bad_state_dict_leaves_module_as_before(case):
    m = _q8(0)
    with torch.no_grad():
        m(torch.randn(2, IN))             # CB/SCB handed to the state, as after real use
    before = _fingerprint(m)
    sd = _q8(1).state_dict()
    if case == "unexpected":
        sd["extra"] = torch.zeros(1)
    elif case == "scb_shape":
        sd["SCB"] = sd["SCB"][:-1]
    elif case == "weight_dtype":
        sd["weight"] = sd["weight"].to(torch.int16)
    else:
        sd["weight"] = sd["weight"][:-1]
    with pytest.raises(RuntimeError):
        m.load_state_dict(sd)
    _assert_unchanged(m, before)
