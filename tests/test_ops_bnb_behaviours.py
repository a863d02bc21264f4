"""Behaviours aligned with bitsandbytes 0.50.2 (issue 10, part 6), checked against the installed
bitsandbytes itself: ``matmul`` with a frozen int8 weight takes ``state.CB``; a float weight plus
``SCB`` into an unquantized ``Linear8bitLt`` raises bitsandbytes' RuntimeError; Linear4bit's
compute-dtype notice and ``matmul_4bit``'s deprecation text; ``Int8Params`` keeps
``torch.Tensor.is_quantized``; the int8 weight is dequantized with one rounding."""
import logging
import warnings

import bitsandbytes as bnb
import pytest
import torch

import bnbcy
import bnbcy.nn as bnn
from bnbcy.autograd._functions import MatmulLtState


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _frozen_state(CB, SCB, training):
    st = MatmulLtState()
    st.CB, st.SCB, st.has_fp16_weights, st.is_training = CB, SCB, False, training
    return st


@pytest.mark.parametrize("training", [False, True], ids=["int8-product", "dequantized-product"])
def test_matmul_frozen_weight_comes_from_state_CB_and_B_is_not_checked(training):
    W = torch.randn(24, 40, generator=_g(1))
    CB, SCB, _ = bnbcy.functional.int8_vectorwise_quant(W.half())
    A = torch.randn(3, 40, generator=_g(2)).half()
    bogus_B = torch.empty(7, 3)                       # shape unrelated to the weight
    y = bnbcy.matmul(A, bogus_B, state=_frozen_state(CB, SCB, training))
    ref = bnb.matmul(A, bogus_B, state=_bnb_state(CB, SCB, training))
    assert y.shape == ref.shape == (3, 24)
    Wd = CB.double() * SCB.double().unsqueeze(1) / 127
    exact = A.double() @ Wd.t()
    assert (y.double() - exact).abs().max() <= 0.02 * exact.abs().max()
    if training:   # A @ dequant(CB).T: the same expression as bitsandbytes, bit for bit
        assert torch.equal(y, ref)
    with pytest.raises(ValueError, match="40 features|expects 40"):
        bnbcy.matmul(A[:, :39], bogus_B, state=_frozen_state(CB, SCB, training))


def _bnb_state(CB, SCB, training):
    st = bnb.MatmulLtState()
    st.CB, st.SCB, st.has_fp16_weights, st.is_training = CB, SCB, False, training
    return st


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_weight_dequantization_rounds_once_as_bitsandbytes(dtype):
    W = torch.randn(32, 48, generator=_g(3))
    CB, SCB, _ = bnbcy.functional.int8_vectorwise_quant(W.half())
    A = torch.randn(4, 48, generator=_g(4)).to(dtype)
    ours = bnbcy.matmul(A, CB, state=_frozen_state(CB, SCB, True))
    theirs = bnb.matmul(A, CB, state=_bnb_state(CB, SCB, True))
    assert torch.equal(ours, theirs)
    # and the weight itself: one rounding of fl32(cb * fl32(scb * fl32(1/127))) to the dtype
    from bnbcy.autograd._functions import _dequant_weight
    once = (CB.float() * (SCB.unsqueeze(1) * torch.tensor(1 / 127, dtype=torch.float32))).to(dtype)
    assert torch.equal(_dequant_weight(CB, SCB, dtype), once)


def test_float_weight_with_SCB_into_unquantized_linear8bitlt_raises_bitsandbytes_error():
    sd = {"weight": torch.randn(16, 32, generator=_g(5)), "bias": torch.zeros(16), "SCB": torch.ones(16)}
    with pytest.raises(RuntimeError) as theirs:
        bnb.nn.Linear8bitLt(32, 16, has_fp16_weights=False).load_state_dict(dict(sd))
    m = bnn.Linear8bitLt(32, 16, has_fp16_weights=False)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError) as ours:
        m.load_state_dict(dict(sd))
    assert str(ours.value) == str(theirs.value)
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("rows", [1, 3])
def test_linear4bit_fp16_notice_is_bitsandbytes_log_record(rows, caplog):
    x = torch.randn(rows, 32, generator=_g(6)).half()
    with caplog.at_level(logging.WARNING):
        bnb.nn.LinearNF4(32, 16).to("cpu")(x)
        bnn.LinearNF4(32, 16).to("cpu")(x)
    theirs = [r.getMessage() for r in caplog.records if r.name == "bitsandbytes.nn.modules"]
    ours = [r.getMessage() for r in caplog.records if r.name == "bnbcy.nn.modules"]
    assert len(theirs) == 1 and ours == theirs


def test_matmul_4bit_deprecation_text_is_bitsandbytes():
    W = torch.randn(48, 32, generator=_g(7))
    A = torch.randn(2, 32, generator=_g(8))
    msgs = []
    for lib in (bnb, bnbcy):
        q, st = lib.functional.quantize_4bit(W.t().contiguous(), quant_type="nf4")   # [K, N] orientation
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            y = lib.matmul_4bit(A, q.t(), st)
        msgs.append([(w.category, str(w.message)) for w in rec])
        assert y.shape == (2, 48)
    assert msgs[0] == msgs[1] and msgs[0][0][0] is DeprecationWarning


def test_int8params_keeps_tensor_is_quantized():
    m = bnn.Linear8bitLt(32, 16, has_fp16_weights=False).to("cpu")
    assert m.weight.dtype == torch.int8
    assert m.weight.is_quantized is False        # torch's attribute: not a torch quantized tensor
    assert "is_quantized" not in vars(bnn.Int8Params)
    assert bnn.Int8Params(torch.randn(4, 4)).is_quantized is False
