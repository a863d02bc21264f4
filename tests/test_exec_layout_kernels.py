"""The CPU inference kernels of the execution layout (``bnbcy::gemm_4bit_exec``) against float64
products of the packed reference, on every shape class and every ISA path this CPU can run."""
import dataclasses

import pytest
import torch

from bnbcy import _C, _arrays
from bnbcy._ops import fourbit_exec as FE
from bnbcy.functional.fourbit import dequantize_4bit, quantize_4bit
from bnbcy.nn._exec_layout import build

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (N, K): K % 32 == 0 (the group path: A in the width's group order); K a multiple of 8 but not
# of the block; K even, not of 8 (tails); odd K (rows start at odd nibbles); one row; odd K > 256
# (several rows: K chunks that start at odd nibbles); more rows than a row block of the kernel,
# without and with the group path (both with K chunks)
SHAPES = ((24, 128), (9, 160), (33, 72), (10, 70), (7, 129), (1, 257), (5, 777), (130, 1032), (130, 1024))
_HAS = {"scalar": True, "avx2": _C.cpu_isa() in ("avx2", "avx512"), "avx512": _C.cpu_isa() == "avx512"}
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(not _HAS[isa], reason=f"this CPU has no {isa} (hardware)"))
        for isa in FE.ISA_NAMES]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv("BNBCY_CPU_ISA", request.param)
    assert _C.cpu_isa() == request.param and FE.kernel_isa() == request.param
    return request.param


@pytest.fixture(params=("fused", "tiled"))
def path(request, monkeypatch):
    """Force one kernel for every row count (the plan's cut-over is a speed choice only)."""
    for name, p in list(FE.PLANS.items()):
        rows = 10 ** 9 if request.param == "fused" else 0
        # small tiles: several tiles and a partial last one even for small weights
        monkeypatch.setitem(FE.PLANS, name, dataclasses.replace(p, fused_max_rows=rows, tile_bytes=4096))
    return request.param


def _weight(N, K, nested, quant_type="nf4", blocksize=64, seed=0):
    W = torch.randn(N, K, generator=_gen(seed)) * 0.1
    q, st = quantize_4bit(W, blocksize=blocksize, compress_statistics=nested, quant_type=quant_type)
    return q, st


def _call(x, q, st, bias=None):
    lay = build(q, st, x.dtype)
    return FE.gemm_4bit_exec(x, lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax,
                             lay.nested_offset, lay.blocksize, lay.nested_blocksize, lay.N, bias)


def _check(y, x, q, st, bias=None):
    """|y - ref| within float32 accumulation error plus the output dtype's rounding."""
    W = dequantize_4bit(q, st).double().reshape(tuple(st.shape))
    ref, bound = FE.error_bound(x.double().reshape(-1, x.shape[-1]), W,
                                bias.double() if bias is not None else None, x.dtype)
    y64 = y.double().reshape(ref.shape)
    assert y.dtype == x.dtype and torch.isfinite(y64).all()
    bad = (y64 - ref).abs() > bound
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} outside the bound, worst " \
                          f"{float(((y64 - ref).abs() / bound).max()):.3g}x"


@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("nested", (False, True))
def test_shapes_rows_isas_paths(isa, path, N, K, nested):
    q, st = _weight(N, K, nested, seed=N * K)
    for M in (1, 3, 9, 17):
        for dtype in DTYPES:
            x = torch.randn(M, K, generator=_gen(M)).to(dtype)
            _check(_call(x, q, st), x, q, st)


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("blocksize", (32, 128, 4096))
def test_blocksizes_types_bias_batch_dims(isa, path, quant_type, blocksize):
    K = {32: 224, 128: 200, 4096: 256}[blocksize]  # group path at 32 (one group per block) and 4096
    q, st = _weight(19, K, True, quant_type=quant_type, blocksize=blocksize, seed=blocksize)
    for dtype in DTYPES:
        x = torch.randn(2, 3, K, generator=_gen(1)).to(dtype)
        bias = torch.randn(19, generator=_gen(2)).to(dtype)
        y = _call(x, q, st, bias)
        assert y.shape == (2, 3, 19)
        _check(y, x, q, st, bias)


def test_edge_inputs_and_empty(isa, path):
    q, st = _weight(16, 64, True)
    x = torch.zeros(4, 64)
    x[1] = -0.0
    x[2, ::3] = 1e-40  # subnormal inputs
    x[3] = torch.finfo(torch.float32).max / 1e6
    _check(_call(x, q, st), x, q, st)
    for M in (0,):
        y = _call(torch.empty(M, 64), q, st)
        assert y.shape == (M, 16)
    y = _call(torch.full((1, 64), float("nan")), q, st)
    assert torch.isnan(y).all()


def _views(q, st, N, K):
    """The kernels' arguments: codes, map and the plain or nested ``(qabs, code2, absmax2, offset, bs2)``."""
    v = _arrays.input_view
    if st.nested:
        scales = (v(st.absmax, "absmax"), v(st.state2.code, "code2"), v(st.state2.absmax, "absmax2"),
                  float(st.offset), st.state2.blocksize)
    else:
        scales = v(st.absmax, "absmax")
    return v(q.reshape(-1), "B"), v(st.code.float(), "code"), scales


@pytest.mark.parametrize("nested", (False, True))
def test_kernels_write_every_output_poisoned(isa, nested):
    N, K = 21, 130
    q, st = _weight(N, K, nested)
    qv, cv, sc = _views(q, st, N, K)
    for M in (1, 5, 12):
        x = torch.randn(M, K, generator=_gen(M))
        out = torch.full((M, N), float("nan"))
        _C.cpu_q4x_gemm_fused(_arrays.input_view(x, "A"), qv, cv, sc, None, _arrays.input_view(out, "out"),
                              M, N, K, st.blocksize, 2, FE.ISA_NAMES.index(isa))
        _check(out, x, q, st)
    # the tile dequantization gives dequantize_4bit's float32 values bit for bit
    dense = dequantize_4bit(q, st).reshape(N, K)
    for n0, n1 in ((0, N), (3, 4), (5, 17), (20, 21)):
        buf = torch.full((n1 - n0 + 2, K), float("nan"))
        _C.cpu_q4x_dequant_rows(qv, cv, sc, _arrays.input_view(buf, "buf"), n0, n1, N, K, st.blocksize, 2,
                                FE.ISA_NAMES.index(isa))
        assert torch.equal(buf[: n1 - n0], dense[n0:n1])
        assert torch.isnan(buf[n1 - n0:]).all()  # nothing past the rows asked for


def test_bad_arguments_raise_and_change_nothing():
    q, st = _weight(8, 64, True)
    lay = build(q, st, torch.float32)
    args = [torch.randn(2, 64), lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax,
            lay.nested_offset, lay.blocksize, lay.nested_blocksize, lay.N, None]
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    bad = {0: torch.randn(2, 64).double(), 1: lay.B[:10], 2: lay.code[:8], 3: lay.absmax.float(),
           4: None, 7: 48, 9: 0, 10: torch.randn(7)}
    for i, v in bad.items():
        a = list(args)
        a[i] = v
        with pytest.raises(ValueError):
            FE.gemm_4bit_exec(*a)
    for a, b in zip(args, before):
        assert not isinstance(a, torch.Tensor) or torch.equal(a, b)
    qv, cv, sc = _views(q, st, 8, 64)
    with pytest.raises(ValueError):
        _C.cpu_q4x_dequant_rows(qv, cv, sc, _arrays.input_view(torch.empty(4, 64), "buf"), 0, 8, 8, 64, 64, 1, 1)
    with pytest.raises(ValueError):
        _C.cpu_q4x_dequant_rows(qv, cv, sc, _arrays.input_view(torch.empty(8, 64), "buf"), 2, 9, 8, 64, 64, 1, 1)
    with pytest.raises(ValueError):
        _C.cpu_q4x_gemm_fused(_arrays.input_view(torch.randn(2, 64), "A"), qv, cv, sc, None,
                              _arrays.input_view(torch.empty(2, 8), "out"), 2, 8, 64, 48, 1, 1)


def test_fake_kernel_and_compile():
    q, st = _weight(12, 64, True)
    lay = build(q, st, torch.bfloat16)
    x = torch.randn(3, 64).bfloat16()

    def f(x):
        return FE.gemm_4bit_exec(x, lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax,
                                 lay.nested_offset, lay.blocksize, lay.nested_blocksize, lay.N, None) * 2

    torch.library.opcheck(FE.gemm_4bit_exec, (x, lay.B, lay.code, lay.absmax, lay.nested_code, lay.nested_absmax,
                                               lay.nested_offset, lay.blocksize, lay.nested_blocksize, lay.N, None),
                          test_utils=("test_schema", "test_faketensor"))
    torch._dynamo.reset()
    assert torch.equal(torch.compile(f, backend="eager", fullgraph=True)(x), f(x))


def test_plans_cover_every_isa():
    assert set(FE.PLANS) == {"scalar", "avx2", "avx512"}
    assert _C.cpu_isa() in FE.PLANS
    for p in FE.PLANS.values():
        assert p.fused_max_rows >= 1 and p.tile_bytes >= 4096 and p.weights_per_thread >= 1


@pytest.mark.parametrize("N,K", ((24, 128), (7, 129)))
def test_functional_gemm_4bit_runs_the_exec_kernel(isa, N, K):
    """The functional CPU gemv/gemm (up to the plan's cut-over) is the execution layout's fused
    kernel: same bits (more rows: both dequantize in tiles, in different dtypes)."""
    from bnbcy.functional import gemm_4bit, gemv_4bit
    q, st = _weight(N, K, True, seed=K)
    for dtype in DTYPES:
        for M in (1, min(5, FE.plan().fused_max_rows)):
            x = torch.randn(M, K, generator=_gen(M)).to(dtype)
            y = _call(x, q, st)
            assert torch.equal(gemm_4bit(x, q.t(), st), y)
            assert torch.equal(gemv_4bit(x, q.t(), state=st), y)
