"""The 15 NF4 decision thresholds on the CPU are the float32 values nvcc compiles bitsandbytes'
CUDA literals to (NUMERICS.md §3.2): 4 of them (k = 0, 8, 12, 14) are one ulp away from the
float64-rounded midpoints, and bitsandbytes' own CPU kernel uses the latter. Every threshold,
both float32 neighbours and values between are checked; the CUDA kernel (emulated or on a GPU)
is checked by tests/test_fourbit_cuda.py::test_nf4_thresholds_cuda."""
import warnings

import numpy as np
import pytest
import torch

from bnbcy import functional as F

# what nvcc emits for bitsandbytes' kQuantizeBlockwise NF4 tree (NUMERICS.md §3.2)
CUDA_T = [0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
          0x3df64863, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9]
# bitsandbytes' CPU kernel (float32 midpoints of its code): differs at k = 0, 8, 12, 14
BNB_CPU_T = [0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871, 0x3d22faff,
             0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf, 0x3f5c89da]


def _f(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def threshold_probe_values():
    """Each threshold, its two float32 neighbours, 5 random values between consecutive thresholds."""
    t = _f(CUDA_T)
    vals = [t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)), _f(BNB_CPU_T)]
    rng = np.random.default_rng(12)
    edges = np.concatenate([[-1.0], t.astype(np.float64), [1.0]])
    for lo, hi in zip(edges[:-1], edges[1:]):
        vals.append(rng.uniform(lo, hi, 5).astype(np.float32))
    return np.unique(np.concatenate(vals))


def rule(x, bits):
    return (x[:, None] > _f(bits)[None, :]).sum(axis=1)


def blocks_of(x):
    """x laid out in blocks of 64 whose absmax is 1.0 (so the scaled value is x itself)."""
    per = 63
    nb = -(-x.size // per)
    out = np.zeros(nb * 64, np.float32)
    idx = []
    for b in range(nb):
        chunk = x[b * per:(b + 1) * per]
        out[b * 64] = 1.0
        out[b * 64 + 1:b * 64 + 1 + chunk.size] = chunk
        idx.extend(range(b * 64 + 1, b * 64 + 1 + chunk.size))
    return out, np.array(idx)


def codes(q, n):
    q = np.asarray(q).reshape(-1).astype(np.int64)
    return np.stack([q >> 4, q & 15], axis=1).reshape(-1)[:n]


def check_nf4_codes(got, x, idx, reps=1):
    """Codes at idx follow bnb's CUDA literals; equal to bnb's CPU kernel except at its 4 old values."""
    want = rule(x, CUDA_T)
    assert np.array_equal(got[idx], want), [(float(v), int(g), int(w)) for v, g, w in zip(x, got[idx], want)
                                            if g != w][:8]
    # the two tables disagree on exactly one input per shifted threshold, by one code
    d = want - rule(x, BNB_CPU_T)
    assert np.count_nonzero(d) == 4 * reps and np.all(np.abs(d) <= 1)


def test_nf4_thresholds_cpu():
    x = threshold_probe_values()
    a, idx = blocks_of(x)
    q, st = F.quantize_4bit(torch.from_numpy(a), blocksize=64, quant_type="nf4")
    assert np.all(st.absmax.numpy() == 1.0)
    got = codes(q.numpy(), a.size)
    check_nf4_codes(got, x, idx)
    # bitsandbytes' CPU kernel agrees everywhere but at its own 4 thresholds
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import bitsandbytes.functional as BF
        bq, _ = BF.quantize_4bit(torch.from_numpy(a), blocksize=64, quant_type="nf4")
    bc = codes(bq.view(torch.uint8).numpy(), a.size)
    assert np.array_equal(bc[idx], rule(x, BNB_CPU_T))
    differ = x[bc[idx] != got[idx]].view(np.uint32)
    assert sorted(differ.tolist()) == [0x3df64863, 0x3f006d04, 0x3f5c89da, 0xbf591cd8]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512"])
def test_nf4_thresholds_every_cpu_path(monkeypatch, isa):
    """The SIMD paths share the one threshold table (a path this CPU lacks falls back)."""
    monkeypatch.setenv("BNBCY_CPU_ISA", isa)
    x = threshold_probe_values()
    a, idx = blocks_of(np.tile(x, 3))
    q, _ = F.quantize_4bit(torch.from_numpy(a), blocksize=64, quant_type="nf4")
    check_nf4_codes(codes(q.numpy(), a.size), np.tile(x, 3), idx, reps=3)
