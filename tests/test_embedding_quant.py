"""Quantized embedding tables (Embedding8bit, Embedding4bit, EmbeddingFP4, EmbeddingNF4) against
bitsandbytes on the CPU: the same lookups bit for bit, the same warnings and errors; plus
``functional.has_avx512bf16`` and ``bnbcy.utils``."""
import logging

import pytest
import torch

import bitsandbytes as bnb
import bnbcy

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _both(name, n, d, dtype, **kw):
    g = torch.Generator().manual_seed(n * d)
    src = torch.nn.Embedding(n, d)
    src.weight.data = torch.randn(n, d, generator=g)
    src.weight.data[1] = 0.0                           # an all-zero row (absmax 0)
    src.weight.data[2, 0] = 40.0                       # an outlier
    mods = []
    for lib in (bnbcy, bnb):
        m = getattr(lib.nn, name)(n, d, dtype=dtype, **kw)
        m.load_state_dict(src.state_dict())
        mods.append(m.to("cpu"))
    return src, mods


@pytest.mark.parametrize("name", ["Embedding8bit", "Embedding4bit", "EmbeddingFP4", "EmbeddingNF4"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [128, 96])   # 96: blocks straddle rows (whole-table path for 4-bit)
def test_lookups_match_bitsandbytes(name, dtype, dim):
    src, (ours, theirs) = _both(name, 40, dim, dtype)
    idx = torch.tensor([[0, 1, 2, 39], [5, 5, 0, 38]])
    y, ref = ours(idx), theirs(idx)
    assert y.dtype == ref.dtype == dtype and y.shape == (2, 4, dim)
    if name in ("Embedding8bit", "EmbeddingNF4"):
        assert torch.equal(y, ref)
    else:
        # FP4: bnbcy rounds as bitsandbytes' CUDA kernel (docs/fourbit.md); bitsandbytes' CPU
        # kernel differs for inputs exactly on a threshold. The lookup equals bnbcy's own table.
        assert (y != ref).sum() <= y.numel() // 100
        table = bnbcy.functional.dequantize_4bit(ours.weight.data, ours.weight.quant_state).to(dtype)
        assert torch.equal(y, table[idx])
    assert (y[0, 1] == 0).all()
    exact = src.weight.data.to(dtype).float()[idx]
    tol = 0.02 if name == "Embedding8bit" else 0.6   # int8 rows vs 4-bit codes, for N(0,1) rows
    assert ((y.float() - exact).abs() <= tol * exact.abs().amax(-1, keepdim=True).clamp_min(1) + 1e-6).all()
    assert ours(torch.tensor(7)).shape == (dim,)   # 0-d index


def test_4bit_quant_type_and_storage_match():
    for cls, qt in ((bnbcy.nn.EmbeddingNF4, "nf4"), (bnbcy.nn.EmbeddingFP4, "fp4"), (bnbcy.nn.Embedding4bit, "fp4")):
        m = cls(8, 64).to("cpu")
        assert m.weight.quant_state.quant_type == qt and m.weight.data.dtype == torch.uint8
        assert m.weight.quant_state.state2 is None   # no double quantization, as bitsandbytes
    _, (ours, theirs) = _both("EmbeddingNF4", 8, 64, torch.float32, quant_storage=torch.bfloat16)
    assert ours.weight.data.dtype == theirs.weight.data.dtype == torch.bfloat16
    idx = torch.tensor([1, 2, 7])
    assert torch.equal(ours(idx), theirs(idx))


def test_warning_for_dims_not_divisible_by_the_blocksize(caplog):
    with caplog.at_level(logging.WARNING):
        bnbcy.nn.EmbeddingNF4(8, 100)
    assert "Embedding size 100 is not divisible by block size 64. This will lead to slow inference." in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        bnbcy.nn.EmbeddingNF4(8, 128)
    assert "divisible" not in caplog.text


@pytest.mark.parametrize("name,msg", [("Embedding8bit", "Embedding8bit"), ("Embedding4bit", "Embedding4bit"),
                                      ("EmbeddingNF4", "Embedding4bit"), ("EmbeddingFP4", "Embedding4bit")])
def test_state_dict_is_refused_like_bitsandbytes(name, msg):
    for lib in (bnbcy, bnb):
        m = getattr(lib.nn, name)(8, 64).to("cpu")
        with pytest.raises(NotImplementedError, match=f"^Saving {msg} module is not implemented$"):
            m.state_dict()


def test_unquantized_8bit_table_raises_bitsandbytes_error():
    # bitsandbytes' own check never fires (its Int8Params always has an SCB attribute, None
    # before quantization), so it fails later with AttributeError; bnbcy raises the error it meant.
    m = bnbcy.nn.Embedding8bit(8, 64)
    with pytest.raises(RuntimeError, match=r"Embedding layer is not quantized\. Please call \.cuda\(\) or "
                                           r"\.to\(device\) first\."):
        m(torch.tensor([0]))
    with pytest.raises(AttributeError):
        bnb.nn.Embedding8bit(8, 64)(torch.tensor([0]))


def test_unquantized_4bit_table_raises():
    m = bnbcy.nn.EmbeddingNF4(8, 64)
    with pytest.raises(RuntimeError, match="not quantized"):
        m(torch.tensor([0]))


def test_has_avx512bf16_matches_bitsandbytes():
    assert bnbcy.functional.has_avx512bf16() == bool(bnb.functional.has_avx512bf16())
    assert isinstance(bnbcy.functional.has_avx512bf16(), bool)


def test_utils_match_bitsandbytes():
    import bitsandbytes.utils as bu
    import bnbcy.utils as ou
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 48, generator=g)
    w[:, [3, 17]] *= 30
    assert torch.equal(ou.find_outlier_dims(w), bu.find_outlier_dims(w))
    assert torch.equal(ou.find_outlier_dims(w, topk=5), bu.find_outlier_dims(w, topk=5))
    d = {"a": 1, "b": [1, 2]}
    assert torch.equal(ou.pack_dict_to_tensor(d), bu.pack_dict_to_tensor(d))
    assert ou.unpack_tensor_to_dict(bu.pack_dict_to_tensor(d)) == d
    assert ou.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING == bu.LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Sequential(torch.nn.Linear(8, 4)),
                                   torch.nn.Linear(4, 2))
    a = ou.replace_linear(model(), bnbcy.nn.Linear8bitLt, skip_modules=("2",), copy_weights=True)
    b = bu.replace_linear(model(), bnb.nn.Linear8bitLt, skip_modules=("2",), copy_weights=True)
    assert [type(m).__name__ for m in a.modules()] == [type(m).__name__ for m in b.modules()]
    assert torch.equal(a[0].weight, b[0].weight)

    x = torch.randn(5, 8)
    x[:, 2] = 9.0
    outs = []
    for u in (ou, bu):
        u.OutlierTracer._instance = None
        net = model()
        tracer = u.OutlierTracer.get_instance()
        tracer.initialize(net)
        net(x)
        outs.append([tracer.get_outliers(m.weight).tolist() for m in net.modules() if isinstance(m, torch.nn.Linear)])
    assert outs[0] == outs[1] and 2 in outs[0][0]
