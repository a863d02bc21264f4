"""The SIMD widths of the CPU optimizer kernels against the scalar width, bit for bit, on the
cases the lane loops hand to the scalar path (skip_zeros, NaN/inf gradients and parameters,
vector tails, partial 8-bit blocks) for every optimizer, format and dtype. On a CPU without
AVX2 both runs take the scalar path (and the test compares it with itself)."""
import numpy as np
import pytest
import torch

import bnbcy.functional as F
from bnbcy.functional.maps import create_dynamic_map
from bnbcy.optim import _table

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Q1, Q2 = create_dynamic_map(signed=True), create_dynamic_map(signed=False)


def _inputs(name, bits, dtype, n, rng):
    k = _table.kernel(name)
    p = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).to(dtype)
    g = torch.from_numpy((rng.standard_normal(n) * 0.1).astype(np.float32))
    g[rng.random(n) < 0.1] = 0.0
    g[7], g[300], g[n - 2] = float("nan"), float("inf"), -float("inf")
    p[11] = float("nan")
    g = g.to(dtype)
    lead = (k.state1_lead,) if k.state1_lead else ()
    nb = -(-n // 256)
    if bits == 32:
        s1 = torch.from_numpy(rng.random((*lead, n)).astype(np.float32) * 0.01)
        s2 = torch.from_numpy(rng.random(n).astype(np.float32) * 1e-4) if k.states == 2 else None
        return [p, g, s1, s2]
    s1 = torch.from_numpy(rng.integers(0, 256, (*lead, n)).astype(np.uint8))
    if name in ("rmsprop", "adagrad"):
        s1 = torch.from_numpy(rng.integers(128, 256, n).astype(np.uint8))
    a1 = torch.from_numpy(rng.random((*lead, nb)).astype(np.float32) * 0.1)
    s2 = torch.from_numpy(rng.integers(1, 256, n).astype(np.uint8)) if k.states == 2 else None
    a2 = torch.from_numpy(rng.random(nb).astype(np.float32) * 0.01) if k.states == 2 else None
    return [p, g, s1, s2, a1, a2]


def _step(name, bits, t, skip, wd, max_unorm):
    p, g, s1, s2 = t[:4]
    u = [torch.zeros(1)] if max_unorm else None
    if bits == 32:
        F.optimizer_update_32bit_multi(name, [g], [p], [s1], 0.9, 1e-8, 3, 1e-3, state2s=[s2], beta2=0.99,
                                       beta3=0.999, alpha=2.0, weight_decay=wd, gnorm_scale=0.7,
                                       unorm_vecs=u, max_unorm=max_unorm, skip_zeros=skip)
    else:
        two = _table.kernel(name).states == 2
        F.optimizer_update_8bit_blockwise_multi(
            name, [g], [p], [s1], [s2] if two else None, 0.9, 0.99, 0.999, 2.0, 1e-8, 3, 1e-3, Q1,
            Q2 if two else None, [t[4]], [t[5]] if two else None, weight_decay=wd, gnorm_scale=0.7,
            skip_zeros=skip, max_unorm=max_unorm, unorm_vecs=u)
    return u


def _assert_widths_agree(name, bits, base, skip, wd, mu, monkeypatch, what):
    """One update from copies of base at the default width and at the scalar width: every array
    (parameter, states, absmax, trust-ratio sum) must agree bit for bit."""
    res = []
    for isa in ("", "scalar"):
        monkeypatch.setenv("BNBCY_CPU_ISA", isa)
        t = [None if x is None else x.clone() for x in base]
        u = _step(name, bits, t, skip, wd, mu)
        res.append(t + (u or []))
    for a, b in zip(*res):
        if a is not None:
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8)), what


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", _table.OPTIMIZER_NAMES)
def test_simd_width_equals_scalar(name, bits, monkeypatch):
    rng = np.random.default_rng(5)
    mu = 0.01 if _table.kernel(name).trust_ratio else 0.0
    for dtype in DTYPES:
        for n, skip, wd in ((256 * 5 + 77, True, 0.1), (1000, False, 0.0)):
            base = _inputs(name, bits, dtype, n, rng)
            _assert_widths_agree(name, bits, base, skip, wd, mu, monkeypatch, (name, bits, dtype, n, skip))


@pytest.mark.parametrize("name", _table.OPTIMIZER_NAMES)
def test_simd_8bit_block_edges_equal_scalar(name, monkeypatch):
    """8-bit blocks whose new absmax or states are not finite (an inf/NaN/0/denormal/tiny absmax,
    a gradient whose square overflows): the SIMD widths take the requantization table only for
    all-finite blocks, flush only where it can act, and give the scalar path's codes, absmax,
    parameters and trust-ratio sums."""
    rng = np.random.default_rng(11)
    n = 256 * 8
    base = _inputs(name, 8, torch.float32, n, rng)
    a1 = base[4].view(-1)
    a1[1], a1[2], a1[3], a1[4] = float("inf"), float("nan"), 0.0, 1e-40
    if base[5] is not None:
        base[5][5], base[5][6] = float("nan"), float("inf")
    a1[5] = 1e-38  # normal, but its products with the smallest codes are denormal
    base[1][256 * 7 + 3] = 3e38  # finite gradient, g*g overflows
    base[1][256 * 6 + 9] = -3e38
    mu = 0.01 if _table.kernel(name).trust_ratio else 0.0
    for skip in (False, True):
        _assert_widths_agree(name, 8, base, skip, 0.0, mu, monkeypatch, (name, skip))


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("name", _table.OPTIMIZER_NAMES)
def test_simd_specialized_loops_equal_scalar(name, bits, monkeypatch):
    """The loops specialized for float32 parameters without skip_zeros (with and without weight
    decay), and the 8-bit fast blocks (no flush can act, finite absmax): gradients whose squares
    and products with the betas are subnormal or zero (the flushes the fast blocks do with fewer
    operations), signed zeros, and states at the smallest codes, bit for bit against the scalar width."""
    rng = np.random.default_rng(23)
    n = 256 * 6 + 40
    mu = 0.01 if _table.kernel(name).trust_ratio else 0.0
    tiny = torch.tensor([1e-20, -3e-21, 1e-30, 1e-40, -1e-42, 0.0, -0.0, 2e-19, -1e-19, 1e-23])
    for wd in (0.0, 0.1):
        base = _inputs(name, bits, torch.float32, n, rng)
        g = base[1]
        g[~torch.isfinite(g)] = 0.5
        base[0][~torch.isfinite(base[0])] = 0.25
        idx = torch.from_numpy(rng.integers(0, n, 300))
        g[idx] = tiny[torch.arange(300) % len(tiny)]
        g[256 * 2: 256 * 3] = tiny.repeat(26)[:256]  # a whole block of tiny gradients
        if bits == 8:
            base[2].view(-1)[: 256 * 3 : 3] = 127  # the zero code and its neighbours
            base[2].view(-1)[1: 256 * 3 : 3] = 128
            if base[3] is not None:
                base[3][: 256 * 3 : 2] = 0
                base[3][1: 256 * 3 : 2] = 1
                base[5][2] = 0.0  # block 2: second moment g*g*(1-beta2), all subnormal, flushed
        _assert_widths_agree(name, bits, base, False, wd, mu, monkeypatch, (name, bits, wd))
