"""The CPU output pool (pyx/cpu_pool.pxi): large outputs reuse mapped buffers across calls,
never while an array still uses them, and always hold fully written results."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import bnbcy
import bnbcy.functional as F
from bnbcy import _C

N = 2 << 20  # 8 MB of float32: above the pool's 4 MiB threshold


@pytest.fixture
def quantized():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, generator=g)
    q, st = F.quantize_blockwise(x, blocksize=256)
    ref = torch.empty(N)
    F.dequantize_blockwise(q, st, out=ref)  # the caller's buffer: not from the pool
    return q, st, ref


def test_freed_output_is_reused_and_fully_rewritten(quantized):
    q, st, ref = quantized
    bnbcy.empty_cpu_cache()
    y = F.dequantize_blockwise(q, st)
    assert torch.equal(y, ref)
    ptr = y.data_ptr()
    y.fill_(float("nan"))  # poison, then give the buffer back
    del y
    info = bnbcy.cpu_cache_info()
    assert info["buffers"] == 1 and info["cached_bytes"] >= N * 4
    y2 = F.dequantize_blockwise(q, st)
    assert y2.data_ptr() == ptr, "a freed buffer of the same size class is reused"
    assert torch.equal(y2, ref)
    assert bnbcy.cpu_cache_info()["buffers"] == 0


def test_buffer_in_use_through_a_view_is_not_reused(quantized):
    q, st, ref = quantized
    y = F.dequantize_blockwise(q, st)
    view = y[1000:2000]
    ptr = y.data_ptr()
    del y
    y2 = F.dequantize_blockwise(q, st)
    assert y2.data_ptr() != ptr
    y2.fill_(7.0)
    assert torch.equal(view, ref[1000:2000])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_outputs_and_numpy(dtype):
    q, st = F.quantize_blockwise(torch.randn(N).to(dtype), blocksize=256)
    ref = torch.empty(N, dtype=dtype)
    F.dequantize_blockwise(q, st, out=ref)
    for _ in range(2):  # a fresh buffer, then a recycled one
        y = F.dequantize_blockwise(q, st)
        assert y.dtype == dtype and y.shape == (N,) and y.is_contiguous()
        assert torch.equal(y, ref)
        del y
    qn, stn = F.quantize_blockwise(np.random.default_rng(0).standard_normal(N).astype(np.float32), blocksize=256)
    yn = F.dequantize_blockwise(qn, stn)
    assert isinstance(yn, np.ndarray) and yn.dtype == np.float32 and yn.flags.writeable
    refn = np.empty(N, np.float32)
    F.dequantize_blockwise(qn, stn, out=refn)
    np.testing.assert_array_equal(yn, refn)


def test_pooled_tensor_behaves_like_a_tensor(quantized):
    q, st, ref = quantized
    y = F.dequantize_blockwise(q, st)
    z = y.clone().mul_(2)
    assert torch.equal(z, ref * 2)
    p = torch.nn.Parameter(y)  # usable as a parameter, with autograd
    (p * 3).sum().backward()
    assert torch.equal(p.grad, torch.full_like(ref, 3))
    assert torch.equal(torch.from_numpy(y.numpy()), ref)


def test_small_outputs_bypass_the_pool():
    bnbcy.empty_cpu_cache()
    q, st = F.quantize_blockwise(torch.randn(1000), blocksize=256)
    del q
    assert bnbcy.cpu_cache_info()["buffers"] == 0


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=120)


def test_pool_off_and_bad_setting():
    code = ("import torch, bnbcy, bnbcy.functional as F\n"
            "q, st = F.quantize_blockwise(torch.randn(2 << 20), blocksize=256)\n"
            "y = F.dequantize_blockwise(q, st); del y\n"
            "print(bnbcy.cpu_cache_info())\n")
    off = _run(code, BNBCY_CPU_POOL_MB="0")
    assert off.returncode == 0, off.stderr
    assert "'limit_bytes': 0" in off.stdout and "'buffers': 0" in off.stdout
    bad = _run(code, BNBCY_CPU_POOL_MB="lots")
    assert bad.returncode != 0 and "BNBCY_CPU_POOL_MB must be a whole number of megabytes" in bad.stderr


def test_cached_bytes_stay_under_the_limit():
    code = ("import torch, bnbcy, bnbcy.functional as F\n"
            "q, st = F.quantize_blockwise(torch.randn(4 << 20), blocksize=256)\n"
            "ys = [F.dequantize_blockwise(q, st) for _ in range(5)]\n"  # 5 x 16 MiB in use
            "del ys\n"
            "info = bnbcy.cpu_cache_info(); print(info)\n"
            "assert info['cached_bytes'] <= info['limit_bytes'] == 40 << 20, info\n"
            "assert info['buffers'] == 2, info\n")
    r = _run(code, BNBCY_CPU_POOL_MB="40")
    assert r.returncode == 0, r.stdout + r.stderr
