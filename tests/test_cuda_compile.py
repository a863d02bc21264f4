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


def _load_nvrtc():
    """libnvrtc from the system or from the nvidia-cuda-nvrtc wheel (the test extra), or None."""
    import ctypes
    import ctypes.util
    import glob
    import site
    cands = [ctypes.util.find_library("nvrtc")]
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        cands += sorted(glob.glob(os.path.join(d, "nvidia", "*", "lib", "libnvrtc.so*")))
    for c in filter(None, cands):
        if "builtins" in c or ".alt." in c:
            continue
        try:
            # NVRTC dlopens its builtins by soname: load them first from the same folder
            for b in glob.glob(os.path.join(os.path.dirname(c), "libnvrtc-builtins.so*")):
                if ".alt." not in b:
                    ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(c)
        except OSError:
            continue
    return None


NVRTC = _load_nvrtc()


@pytest.mark.skipif(NVRTC is None, reason="libnvrtc is not installed (pip install nvidia-cuda-nvrtc)")
@pytest.mark.parametrize("arch", ["75", "80", "90"])
@pytest.mark.parametrize("unit", UNITS)
def test_nvrtc_compiles_shipped_source(unit, arch):
    """The fallback path: the registry's NVRTC build of the shipped source and include dir."""
    import ctypes
    src = kernels.shipped_source(unit[:-3]).encode()
    prog = ctypes.c_void_p()
    assert NVRTC.nvrtcCreateProgram(ctypes.byref(prog), src, unit.encode(), 0, None, None) == 0
    opts = [o.encode() for o in kernels.DEFAULT_NVRTC_OPTIONS] + \
        [b"-I" + kernels.registry.cuda_dir.encode(), f"-arch=sm_{arch}".encode()]
    rc = NVRTC.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    NVRTC.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetProgramLog(prog, log)
    assert rc == 0, f"NVRTC failed on {unit} for sm_{arch}:\n{log.value.decode()}"
    NVRTC.nvrtcGetCUBINSize(prog, ctypes.byref(size))
    cubin = ctypes.create_string_buffer(size.value)
    NVRTC.nvrtcGetCUBIN(prog, cubin)
    NVRTC.nvrtcDestroyProgram(ctypes.byref(prog))
    declared = [k["symbol"] for k in kernels.list_kernels() if k["module"] == unit[:-3]]
    missing = [s for s in declared if b".text." + s.encode() + b"\0" not in cubin.raw]
    assert not missing, f"kernels missing from the NVRTC build of {unit}: {missing}"


# PTX parameter types of each signature character of bnbcy._C.cuda_launch
_PTX_PARAM = {"p": ".u64", "q": ".u64", "i": ".u32", "u": ".u32", "f": ".f32", "d": ".f64"}


@needs_nvcc
@pytest.mark.parametrize("unit", UNITS)
def test_registry_signatures_match_kernel_parameters(unit, tmp_path):
    """What the launch path packs (KernelSpec.signature) is what each kernel takes."""
    ptx_file = tmp_path / (unit + ".ptx")
    res = subprocess.run([NVCC, "-ptx", "--use_fast_math", "-std=c++17", "-arch=sm_90", "-I", CUDA_SRC,
                          os.path.join(CUDA_SRC, unit), "-o", str(ptx_file)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    ptx = ptx_file.read_text()
    entries = {name: re.findall(r"\.param\s+(\.\w+)", params)
               for name, params in re.findall(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx)}
    for k in kernels.list_kernels():
        if k["module"] != unit[:-3]:
            continue
        assert k["symbol"] in entries, f"{k['symbol']} is not an entry of {unit}"
        # pointers are .u64 in PTX; a .u64 slot for an int64 is the same width
        expected = [_PTX_PARAM[c] for c in k["signature"]]
        got = [".u64" if t in (".u64", ".s64", ".b64") else ".u32" if t in (".u32", ".s32", ".b32") else t
               for t in entries[k["symbol"]]]
        assert got == expected, f"{k['symbol']}: kernel takes {entries[k['symbol']]}, registry packs {k['signature']}"
