"""Shared pytest configuration: the ``cuda`` marker and device detection.

CUDA tests are skipped, with the reason printed, where no GPU (or no CuPy)
is present; on a GPU machine run them with ``pytest -m cuda``.
"""
import pytest


def _cuda_reason():
    try:
        import torch
    except ImportError:  # torch is a hard dependency, but keep the message clear
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    try:
        import cupy  # noqa: F401
    except ImportError:
        return "CuPy is not installed (pip install bnbcy[cuda12] or [cuda13])"
    return None


CUDA_SKIP_REASON = _cuda_reason()
HAS_CUDA = CUDA_SKIP_REASON is None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and CuPy")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=f"CUDA test skipped: {CUDA_SKIP_REASON}")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    return f"bnbcy CUDA tests: {'enabled' if HAS_CUDA else 'skipped: ' + CUDA_SKIP_REASON}"


@pytest.fixture(scope="module")
def bnbF():
    """bitsandbytes.functional with its CUDA library loaded (for bit-identity tests on a GPU)."""
    import warnings
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as BF
            from bitsandbytes.cextension import CudaBNBNativeLibrary, lib
    except Exception as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"bitsandbytes is not importable: {exc!r}")
    if not isinstance(lib, CudaBNBNativeLibrary):
        pytest.skip(f"bitsandbytes' CUDA library is not loaded (got {type(lib).__name__}); "
                    "its ops would not run the CUDA kernels")
    return BF
