"""Shared pytest configuration: the ``cuda`` marker and device detection.

CUDA tests are skipped, with the reason printed, where no GPU (or no CuPy)
is present; on a GPU machine run them with ``pytest -m cuda``. With
``BNBCY_EMULATE_CUDA=1`` they run on CPU tensors in bnbcy's SIMT emulator
(``docs/emulator.md``), except those marked ``gpu_only`` (they need real hardware);
at the end the run reports how many emulated launches each registered kernel got
(``BNBCY_EMULATOR_REPORT``: also as JSON to that path; ``BNBCY_EMULATOR_REQUIRE_ALL=1``:
the run fails when a registered kernel was never launched).
"""
import json
import os

import pytest

from bnbcy import kernels


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


EMULATED = kernels.emulating()
CUDA_SKIP_REASON = None if EMULATED else _cuda_reason()
HAS_CUDA = CUDA_SKIP_REASON is None


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU and CuPy (or BNBCY_EMULATE_CUDA=1)")
    config.addinivalue_line("markers", "gpu_only(reason): a CUDA test that needs real hardware, not the emulator")


def _emulator_suite(item):
    # the CUDA test files written for both a GPU and the emulator (tensors on cuda_env.DEVICE)
    name = os.path.basename(str(item.fspath))
    return name.endswith("_cuda.py") or name.startswith("test_emulator")


def pytest_collection_modifyitems(config, items):
    if EMULATED:
        for item in items:
            mark = item.get_closest_marker("gpu_only")
            if mark is not None:
                why = mark.args[0] if mark.args else "needs real hardware"
                item.add_marker(pytest.mark.skip(reason=f"needs a real GPU, not the emulator: {why}"))
            elif "cuda" in item.keywords and not _emulator_suite(item):
                item.add_marker(pytest.mark.skip(reason=(
                    "needs a real GPU: written for CUDA tensors (device placement, CuPy, torch.cuda); "
                    "its kernels run emulated in tests/test_*_cuda.py and tests/test_emulator.py")))
        return
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason=f"CUDA test skipped: {CUDA_SKIP_REASON}; the emulated CUDA suite runs "
                                   "them on the CPU: BNBCY_EMULATE_CUDA=1 python -m pytest -m cuda tests")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    if EMULATED:
        return "bnbcy CUDA tests: run in the SIMT emulator on the CPU (BNBCY_EMULATE_CUDA=1; emulated, not a GPU)"
    return f"bnbcy CUDA tests: {'enabled' if HAS_CUDA else 'skipped: ' + CUDA_SKIP_REASON}"


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not EMULATED:
        return
    cov = kernels.coverage()
    unused = sorted(s for s, n in cov.items() if n == 0)
    tr = terminalreporter
    tr.section("emulated kernel launches")
    for sym, n in sorted(cov.items()):
        tr.write_line(f"{n:8d}  {sym}")
    tr.write_line(f"{len(cov) - len(unused)} of {len(cov)} registered kernels launched in the emulator, "
                  f"{sum(cov.values())} emulated launches")
    if unused:
        more = f" and {len(unused) - 12} more" if len(unused) > 12 else ""
        tr.write_line(f"never launched: {', '.join(unused[:12])}{more}")
    path = os.environ.get("BNBCY_EMULATOR_REPORT")
    if path:
        with open(path, "w") as fh:
            json.dump({"kernels": cov, "never_launched": unused, "total_launches": sum(cov.values())}, fh,
                      indent=1, sort_keys=True)
        tr.write_line(f"report written to {path}")


def pytest_sessionfinish(session, exitstatus):
    if EMULATED and os.environ.get("BNBCY_EMULATOR_REQUIRE_ALL", "") not in ("", "0"):
        if any(n == 0 for n in kernels.coverage().values()) and session.exitstatus == 0:
            session.exitstatus = 1  # a registered kernel never ran: the coverage requirement fails


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
