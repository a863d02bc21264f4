"""What this build of bnbcy has (CPU kernels, shipped CUDA binaries, CuPy, GPUs) and what the
CPU offers."""
from __future__ import annotations

import functools

from . import _C, kernels


def build_info() -> dict:
    """Describe the build and the machine.

    Returns
    -------
    dict
        ``cpu_threads`` (OpenMP), ``fatbin_archs`` and ``nvcc`` (shipped CUDA
        binaries), ``cuda_modules``, ``cupy`` (version or None), ``devices``
        (name and compute capability of each visible GPU) and ``cuda_error``
        (why CUDA is unavailable, or None).
    """
    info = {
        "cpu_threads": _C.num_threads(),
        "fatbin_archs": kernels.registry.manifest.get("archs", []),
        "nvcc": kernels.registry.manifest.get("nvcc"),
        "cuda_modules": kernels.modules(),
        "cupy": None,
        "devices": [],
        "cuda_error": None,
    }
    try:
        import cupy
    except ImportError:
        info["cuda_error"] = "CuPy is not installed (pip install bnbcy[cuda12] or bnbcy[cuda13])"
        return info
    info["cupy"] = cupy.__version__
    try:
        for d in range(cupy.cuda.runtime.getDeviceCount()):
            props = cupy.cuda.runtime.getDeviceProperties(d)
            info["devices"].append({"name": props["name"].decode(),
                                    "compute_capability": cupy.cuda.Device(d).compute_capability})
    except Exception as exc:  # no driver / no device: report, do not fail
        info["cuda_error"] = f"no usable CUDA device: {exc}"
    return info


@functools.lru_cache(maxsize=None)
def has_avx512bf16() -> bool:
    """Whether the CPU has AVX512-BF16 (``bitsandbytes.functional.has_avx512bf16``).

    Read from the kernel's CPU flags (``avx512_bf16`` in ``/proc/cpuinfo``); False where they
    cannot be read (other operating systems), as bitsandbytes answers when its probe is missing.
    """
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return "avx512_bf16" in line.split(":", 1)[1].split()
    except OSError:
        pass
    return False
