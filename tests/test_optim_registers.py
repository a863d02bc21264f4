"""Register counts of the optimizer kernels (cuda_src/optim.cu) as ptxas reports them, pinned:
256-thread CTAs reach full occupancy on sm_80/sm_90 (2048 threads per SM) at <= 32 registers a
thread, so every kernel must stay there except the ones listed, which may not grow past their
count (lower a cap when a change brings a kernel down). No spills anywhere. Needs nvcc, not a GPU."""
import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
FULL_OCCUPANCY = 32

#: kernels above FULL_OCCUPANCY registers (75% occupancy), with their pinned count
OVER = {
    "80": {"bnbcy_optim32_adam_f32": 40, "bnbcy_optim32_adam_f16": 37, "bnbcy_optim32_adam_bf16": 37,
           "bnbcy_optim8_adam_bf16": 39},
    "90": {f"bnbcy_optim32_ademamix_{d}": 40 for d in ("f32", "f16", "bf16")},
}


def _ptxas_report(arch, tmp_path):
    cmd = [NVCC, "-cubin", "--use_fast_math", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-I",
           os.path.join(ROOT, "cuda_src"), "-Xptxas", "-v", os.path.join(ROOT, "cuda_src", "optim.cu"), "-o",
           str(tmp_path / f"optim_{arch}.cubin")]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    found = re.findall(r"Compiling entry function '(\w+)' for 'sm_\d+'\nptxas info\s+: Function properties for \w+\n"
                       r"\s+\d+ bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads\n"
                       r"ptxas info\s+: Used (\d+) registers", res.stdout + res.stderr)
    return {name: (int(regs), int(st) + int(ld)) for name, st, ld, regs in found}


@pytest.mark.skipif(NVCC is None, reason="nvcc (ptxas) is not installed on this machine: register counts unchecked")
@pytest.mark.parametrize("arch", ["80", "90"])
def test_optimizer_kernel_registers(arch, tmp_path):
    report = _ptxas_report(arch, tmp_path)
    assert len(report) >= 60, f"ptxas reported {len(report)} optimizer kernels"
    spills = {k: s for k, (_, s) in report.items() if s}
    assert not spills, f"sm_{arch} spills: {spills}"
    over = {k: r for k, (r, _) in report.items() if r > OVER[arch].get(k, FULL_OCCUPANCY)}
    assert not over, f"sm_{arch}: registers above the pinned counts: {over}"
    stale = {k: (report[k][0], cap) for k, cap in OVER[arch].items() if report[k][0] < cap}
    assert not stale, f"sm_{arch}: kernels now below their pinned count; lower the caps: {stale}"
