"""Emulated kernels built with AddressSanitizer + UBSan run a subset of every module clean
(bnbcy/_emulator/sanitize_check.py in a subprocess that preloads libasan)."""
import os
import subprocess
import sys

import pytest

from bnbcy._emulator import asan_runtime

pytestmark = pytest.mark.cuda  # part of the emulated CUDA suite


def test_sanitized_emulated_kernels_run_clean():
    lib = asan_runtime()
    if not os.path.isabs(lib) or not os.path.exists(lib):
        pytest.fail(f"g++ has no AddressSanitizer runtime (got {lib!r}): install libasan")
    env = dict(os.environ, LD_PRELOAD=lib, BNBCY_EMULATOR_SANITIZE="1",
               ASAN_OPTIONS="detect_leaks=0:abort_on_error=1", UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))] +
                                          [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-m", "bnbcy._emulator.sanitize_check"], env=env, capture_output=True,
                       text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "sanitized emulated kernels: ok" in out
    assert "ERROR: AddressSanitizer" not in out and "runtime error:" not in out, out[-4000:]
