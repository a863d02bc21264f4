"""The CUDA launch path's host-side rules, checked without a GPU: the NVRTC build key covers the
included headers, the primary-context test of _C.cuda_launch, launch limits of the launchers, and
source rules of the kernels. (What needs a driver is checked by reasoning and these unit tests
only: no GPU has run them.)"""
import re
import sys
import types

import pytest
import torch

from bnbcy import _C, kernels
from bnbcy.functional import _fourbit_cuda as FC


def _fake_cupy(calls):
    class RawModule:
        def __init__(self, code, options):
            calls.append((code, tuple(options)))

        def compile(self):
            return None

    class Device:
        def __init__(self, d):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *a):
            return False
    cp = types.ModuleType("cupy")
    cp.RawModule = RawModule
    cp.cuda = types.SimpleNamespace(Device=Device)
    return cp


def test_nvrtc_build_key_changes_with_the_included_header(tmp_path, monkeypatch):
    """CuPy keys its NVRTC cache on source text and options: a changed bnbcy_common.cuh must change
    the options, or a stale cubin is reused."""
    (tmp_path / "m.cu").write_text('#include "bnbcy_common.cuh"\n')
    (tmp_path / "bnbcy_common.cuh").write_text("#define A 1\n")
    calls = []
    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy(calls))
    reg = kernels.KernelRegistry(cuda_dir=str(tmp_path))
    src = (tmp_path / "m.cu").read_text()
    reg._compile(src, kernels.DEFAULT_NVRTC_OPTIONS, 0)
    reg._compile(src, kernels.DEFAULT_NVRTC_OPTIONS, 0)
    (tmp_path / "bnbcy_common.cuh").write_text("#define A 2\n")
    reg._compile(src, kernels.DEFAULT_NVRTC_OPTIONS, 0)
    (a_code, a_opts), (b_code, b_opts), (c_code, c_opts) = calls
    assert a_code == b_code == c_code and a_opts == b_opts
    assert a_opts != c_opts, "the NVRTC cache key (source, options) did not change with the header"
    assert f"-I{tmp_path}" in a_opts and all(o in a_opts for o in kernels.DEFAULT_NVRTC_OPTIONS)


def test_launch_pushes_the_primary_context_unless_it_is_current():
    prim = 0x1000
    assert not _C._context_needs_push(0, prim, prim)
    assert _C._context_needs_push(0, 0x2000, prim)  # another context current on the same device
    assert _C._context_needs_push(0, 0, prim)       # no context current
    assert _C._context_needs_push(201, prim, prim)  # cuCtxGetCurrent failed


def test_fourbit_matmul_caps_k_below_the_tile_overflow():
    """k0 + TILE_K (an int in the small-M GEMM) must not overflow: K is capped as for int8."""
    v = _C.view(torch.zeros(64), "t")
    q = _C.view(torch.zeros(64, dtype=torch.uint8), "q")
    for K in (2**31 - 32, 2**31 - 512):
        for launch in (lambda: FC.launch_gemm_4bit_small(v, q, v, v, None, v, 1, 1, K, 64),
                       lambda: FC.launch_gemv_4bit(v, q, v, v, None, v, 1, K, 64)):
            with pytest.raises(ValueError, match="K at most"):
                launch()
    assert FC._MAX_K + 1024 <= 2**31


def _function_body(src, name):
    start = src.index(name)
    i = src.index("{", start)
    depth = 0
    for j in range(i, len(src)):
        depth += {"{": 1, "}": -1}.get(src[j], 0)
        if depth == 0:
            return src[i:j + 1]
    raise AssertionError(name)


def test_blockwise8_search_midpoints_are_pinned():
    """Every float operation of q8_search goes through a pinned PTX helper (NUMERICS.md §0): a bare
    `(hi + v) * 0.5f` depends on the compiler flags (ftz, contraction)."""
    body = _function_body(kernels.shipped_source("blockwise8"), "q8_search(")
    assert not re.search(r"\)\s*\*\s*0\.5f|\+\s*v\)", body), body
    assert body.count("mul_ftz(add_ftz(") == 2
