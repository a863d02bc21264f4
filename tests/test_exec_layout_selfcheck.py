"""The self-check of the vector widths of the 4-bit inference kernels (``bnbcy._ops.fourbit_exec``):
it passes on the widths this CPU has, and a width whose results disagree with the scalar kernels
is dropped with one warning, the next narrower one running instead (never silently wrong)."""
import warnings

import pytest
import torch

from bnbcy import _C
from bnbcy._ops import fourbit_exec as FE
from bnbcy.functional.fourbit import dequantize_4bit, quantize_4bit
from bnbcy.nn._exec_layout import build

HAS_AVX2 = _C.cpu_isa() in ("avx2", "avx512")
HAS_AVX512 = _C.cpu_isa() == "avx512"


@pytest.fixture
def fresh(monkeypatch):
    """An empty self-check cache (restored afterwards), so each test sees a first use."""
    monkeypatch.setattr(FE, "_CHECKED", {})
    monkeypatch.setattr(FE, "SELFCHECK_HOOK", None)


def _product(x):
    W = torch.randn(12, 96, generator=torch.Generator().manual_seed(3)) * 0.1
    q, st = quantize_4bit(W, blocksize=64, compress_statistics=True)
    lay = build(q, st, x.dtype)
    y = FE.gemm_4bit_exec(x, lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax,
                          lay.nested_offset, lay.blocksize, lay.nested_blocksize, lay.N, None)
    ref, bound = FE.error_bound(x.double(), dequantize_4bit(q, st).double(), None, x.dtype)
    assert ((y.double() - ref).abs() <= bound).all()


@pytest.mark.parametrize("isa", [pytest.param("avx2", marks=pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no avx2 (hardware)")),
                                 pytest.param("avx512", marks=pytest.mark.skipif(not HAS_AVX512, reason="this CPU has no avx512 (hardware)"))])
def test_self_check_passes_on_this_cpu(fresh, monkeypatch, isa):
    monkeypatch.setenv("BNBCY_CPU_ISA", isa)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FE.self_check(isa) and FE.kernel_isa() == isa
    assert FE._CHECKED == {isa: True}  # run once, cached


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no avx2 (hardware)")
def test_mismatch_warns_once_and_falls_back(fresh, monkeypatch):
    seen = []

    def corrupt(isa, y):  # a vector kernel gone wrong in one output
        seen.append(isa)
        y = y.clone()
        y.view(-1)[0] += 1.0
        return y

    monkeypatch.setattr(FE, "SELFCHECK_HOOK", corrupt)
    best = _C.cpu_isa()
    with pytest.warns(RuntimeWarning, match="disagree with the scalar ones") as rec:
        assert FE.kernel_isa() == "scalar"
    # every vector width this CPU has was checked and dropped, each warned once
    assert sorted(set(seen)) == sorted(FE.ISA_NAMES[1:FE.ISA_NAMES.index(best) + 1])
    assert len(rec) == len(set(seen))
    assert FE.plan() is FE.PLANS["scalar"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning, the products still right (scalar)
        for dtype in (torch.float32, torch.bfloat16):
            _product(torch.randn(3, 96).to(dtype))


@pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no avx2 (hardware)")
def test_fallback_to_the_next_width_only(fresh, monkeypatch):
    """A failing width falls back one step: the hook fails only the widest width."""
    best = _C.cpu_isa()
    monkeypatch.setattr(FE, "SELFCHECK_HOOK", lambda isa, y: y + 1.0 if isa == best else y)
    with pytest.warns(RuntimeWarning, match=best):
        assert FE.kernel_isa() == FE.ISA_NAMES[FE.ISA_NAMES.index(best) - 1]


def test_scalar_needs_no_check(fresh, monkeypatch):
    monkeypatch.setenv("BNBCY_CPU_ISA", "scalar")
    monkeypatch.setattr(FE, "SELFCHECK_HOOK", lambda isa, y: pytest.fail("the scalar kernels are the reference"))
    assert FE.kernel_isa() == "scalar"
    _product(torch.randn(2, 96))
