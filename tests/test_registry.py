"""The kernel registry and the Cython launch path, as far as they work without a GPU,
plus the CUDA-only behaviour (rebuild/restore, fatbin vs NVRTC, launch errors)."""
import numpy as np
import pytest
import torch

import bnbcy
import bnbcy.functional as F
from bnbcy import _C, kernels


def test_list_kernels_names_every_variant():
    ks = kernels.list_kernels()
    symbols = {k["symbol"] for k in ks}
    for dt in ("f32", "f16", "bf16"):
        assert f"bnbcy_dequantize_blockwise_{dt}" in symbols
        for bs in (64, 128, 256, 512, 1024, 2048, 4096):
            assert f"bnbcy_quantize_blockwise_{dt}_{bs}" in symbols
    assert all(set(k) == {"symbol", "family", "module", "signature"} for k in ks)
    assert {k["signature"] for k in ks if k["family"] == "quantize_blockwise"} == {"ppppq"}


def test_source_by_module_family_and_symbol():
    src = kernels.source("blockwise8")
    assert "bnbcy_quantize_blockwise_" in src and "rcp_approx" in src
    assert kernels.source("quantize_blockwise") == src
    assert kernels.source("bnbcy_dequantize_blockwise_bf16") == src
    with pytest.raises(KeyError, match="no CUDA module"):
        kernels.source("no_such_kernel")


def test_manifest_matches_build():
    m = kernels.registry.manifest
    if m.get("nvcc"):
        assert m["archs"] and set(m["modules"]) == set(kernels.modules())
        assert "--use_fast_math" in m["flags"]


def test_build_info_reports_cpu():
    info = bnbcy.build_info()
    assert info["cpu_threads"] >= 1
    assert "blockwise8" in info["cuda_modules"]


def test_launch_rejects_bad_signature_before_touching_the_driver():
    with pytest.raises(ValueError, match="signature"):
        _C.cuda_launch(0, (1,), (1,), 0, 0, 0, "pq", (None,))
    with pytest.raises(ValueError, match="unknown kernel parameter type"):
        _C.cuda_launch(0, (1,), (1,), 0, 0, 0, "z", (1,))
    with pytest.raises(ValueError, match="grid"):
        _C.cuda_launch(0, (0,), (1,), 0, 0, 0, "", ())


def test_tensor_view_reads_dlpack_metadata():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    v = _C.view(t, "t")
    assert (v.kind, v.dtype, v.shape, v.strides, v.numel, v.device, v.contiguous) == \
        ("torch", "float32", (4, 6), (6, 1), 24, "cpu", True)
    assert v.ptr == t.data_ptr()
    vt = _C.view(t.t(), "t")
    assert not vt.contiguous and vt.strides == (1, 6)
    a = np.zeros((3, 5), dtype=np.float16)[:, 1:]
    va = _C.view(a, "a")
    assert va.kind == "numpy" and va.dtype == "float16" and not va.contiguous and va.ptr == a.ctypes.data
    b = torch.zeros(4, dtype=torch.bfloat16)
    assert _C.view(b, "b").dtype == "bfloat16"
    ro = np.arange(4, dtype=np.float32)
    ro.flags.writeable = False
    assert _C.view(ro, "ro").readonly
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        _C.view([1, 2], "x")


@pytest.mark.cuda
def test_cuda_rebuild_and_restore_changes_what_ops_run():
    x = torch.randn(10_000, device="cuda")
    q0, s0 = F.quantize_blockwise(x, blocksize=256)
    src = kernels.source("blockwise8")
    # an edited kernel: every code + 1 (mod 256) for float32 inputs
    edited = src.replace("q[e] = q8_search(s_code, mul_ftz(x[e], r));",
                         "q[e] = (u8)(q8_search(s_code, mul_ftz(x[e], r)) + 1);")
    assert edited != src
    try:
        kernels.rebuild("blockwise8", edited)
        assert "rebuilt" in kernels.status().values()
        q1, _ = F.quantize_blockwise(x, blocksize=256)
        assert torch.equal(q1, (q0.int() + 1).remainder(256).to(torch.uint8))
    finally:
        kernels.restore("blockwise8")
    q2, _ = F.quantize_blockwise(x, blocksize=256)
    assert torch.equal(q2, q0)


@pytest.mark.cuda
def test_cuda_nvrtc_build_equals_fatbin(monkeypatch):
    x = torch.randn(1 << 16, device="cuda", dtype=torch.bfloat16)
    q0, s0 = F.quantize_blockwise(x, blocksize=64)
    kernels.rebuild("blockwise8")  # same source, NVRTC with the default options
    try:
        q1, s1 = F.quantize_blockwise(x, blocksize=64)
        y1 = F.dequantize_blockwise(q1, s1)
    finally:
        kernels.restore()
    assert torch.equal(q0, q1) and torch.equal(s0.absmax, s1.absmax)
    assert torch.equal(F.dequantize_blockwise(q0, s0), y1)


@pytest.mark.cuda
def test_cuda_launch_error_is_raised_not_hung():
    spec = kernels.registry._specs["dequantize_blockwise"]
    fn = kernels.registry.function("bnbcy_dequantize_blockwise_f32", spec.module, 0)
    like = _C.view(torch.empty(1, device="cuda"), "like")
    with pytest.raises(kernels.CudaLaunchError):
        # 4096 threads per block exceeds every GPU's limit: the driver refuses the launch
        _C.cuda_launch(fn, (1,), (4096,), 0, 0, 0, "ppppqi", (None, None, None, None, 0, 6), True)
    assert like.is_cuda
