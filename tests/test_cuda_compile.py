"""Every cuda_src module compiles with nvcc (the flags of setup.py) for sm_75,
sm_80 and sm_90, without local-memory spills, and exports every kernel symbol
the registry declares. Needs nvcc, not a GPU."""
import os
import re
import shutil
import subprocess

import pytest

import bnbcy.functional  # noqa: F401  (registers the kernel specs)
from bnbcy import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_SRC = os.path.join(ROOT, "cuda_src")
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
UNITS = sorted(f for f in os.listdir(CUDA_SRC) if f.endswith(".cu"))

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed on this machine")


@needs_nvcc
@pytest.mark.parametrize("arch", ["75", "80", "90"])
@pytest.mark.parametrize("unit", UNITS)
def test_compiles_without_spills(unit, arch, tmp_path):
    cubin = tmp_path / (unit + ".cubin")
    cmd = [NVCC, "-cubin", "--use_fast_math", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-I", CUDA_SRC,
           "-Xptxas", "-v", os.path.join(CUDA_SRC, unit), "-o", str(cubin)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, f"nvcc failed for {unit} sm_{arch}:\n{log}"
    assert "warning" not in log.lower(), f"nvcc warnings for {unit} sm_{arch}:\n{log}"
    spills = [int(a) + int(b) for a, b in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)]
    assert spills, f"ptxas -v printed no register report for {unit}:\n{log}"
    assert max(spills) == 0, f"local-memory spills in {unit} sm_{arch}:\n{log}"

    # the registry's symbols for this module are all in the binary
    data = cubin.read_bytes()
    module = unit[:-3]
    declared = [k["symbol"] for k in kernels.list_kernels() if k["module"] == module]
    missing = [s for s in declared if b".text." + s.encode() + b"\0" not in data]
    assert not missing, f"kernels declared in the registry but absent from {unit}: {missing}"


def test_every_module_has_registered_kernels():
    listed = {k["module"] for k in kernels.list_kernels()}
    assert set(kernels.modules()) <= listed, f"modules without registered kernels: {set(kernels.modules()) - listed}"
