"""Build bnbcy: the Cython extension (CPU kernels with OpenMP, DLPack view, CUDA
launch path) and, where nvcc is found, one fatbin per ``cuda_src/*.cu``.

The CUDA sources always ship inside the package (``bnbcy/_cuda``), so a device
that no shipped binary fits compiles them with NVRTC at first use. A machine
without nvcc and without CuPy still builds a complete CPU library.

Environment
-----------
BNBCY_NO_NVCC=1       skip the fatbins even if nvcc is present.
BNBCY_CUDA_ARCHS      e.g. "75;80;90": the SASS targets (default below).
NVCC                  path of nvcc (default: $CUDA_HOME/bin/nvcc, then PATH).
"""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))
CUDA_SRC = os.path.join(ROOT, "cuda_src")
# SASS for every architecture bnb ships, plus PTX of the newest for later GPUs.
DEFAULT_ARCHS = ["75", "80", "86", "89", "90"]
# Same flags as bitsandbytes' CUDA build: the numerics contract depends on them.
NVCC_FLAGS = ["--use_fast_math", "-O3", "-std=c++17", "-lineinfo"]


def _env_flag(name):
    """A BNBCY_* switch parsed by bnbcy/_env.py (loaded by path: the package is not built yet)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("_bnbcy_env", os.path.join(ROOT, "bnbcy", "_env.py"))
    mod = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(mod)
    return mod.get(name)


def find_nvcc():
    if _env_flag("BNBCY_NO_NVCC"):
        return None
    for cand in (os.environ.get("NVCC"),
                 os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),
                 shutil.which("nvcc")):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


def cuda_archs():
    env = os.environ.get("BNBCY_CUDA_ARCHS")
    return [a.strip() for a in env.replace(",", ";").split(";") if a.strip()] if env else DEFAULT_ARCHS


def openmp_flags():
    if sys.platform == "darwin":  # Apple clang needs libomp from Homebrew; build serial otherwise
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


class BuildExt(build_ext):
    """build_ext that also ships the CUDA sources and compiles their fatbins."""

    def run(self):
        super().run()
        pkg_dir = os.path.dirname(self.get_ext_fullpath("bnbcy._C"))
        self.build_cuda(os.path.join(pkg_dir, "_cuda"))

    def build_cuda(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        sources = sorted(f for f in os.listdir(CUDA_SRC) if f.endswith((".cu", ".cuh")))
        for f in sources:
            shutil.copy2(os.path.join(CUDA_SRC, f), os.path.join(out_dir, f))
        nvcc = find_nvcc()
        archs = cuda_archs()
        manifest = {"nvcc": None, "archs": [], "ptx": None, "flags": NVCC_FLAGS, "modules": {}}
        if nvcc is None:
            print("bnbcy: nvcc not found; CUDA kernels will be compiled with NVRTC at first use")
        else:
            manifest["nvcc"] = subprocess.run([nvcc, "--version"], capture_output=True,
                                              text=True).stdout.strip().splitlines()[-1]
            manifest["archs"] = archs
            manifest["ptx"] = archs[-1]
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            gencode.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
            units = [f for f in sources if f.endswith(".cu")]

            def compile_one(f):
                stem = f[:-3]
                target = os.path.join(out_dir, stem + ".fatbin")
                cmd = [nvcc, "--fatbin", *NVCC_FLAGS, *gencode, "-I", CUDA_SRC,
                       os.path.join(CUDA_SRC, f), "-o", target]
                print("bnbcy: " + " ".join(cmd))
                res = subprocess.run(cmd, capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {f}:\n{res.stdout}\n{res.stderr}")
                return stem

            workers = max(1, min(len(units), os.cpu_count() or 1))
            with ThreadPoolExecutor(workers) as pool:
                for stem in pool.map(compile_one, units):
                    manifest["modules"][stem] = stem + ".fatbin"
        with open(os.path.join(out_dir, "manifest.json"), "w") as fh:
            json.dump(manifest, fh, indent=1)


class BuildPy(build_py):
    """build_py that also puts the stand-in's start-up hook at the top of the wheel.

    ``bnbcy-standin.pth`` must land in site-packages itself (not in the package) for Python's
    ``site`` to run it; it imports ``_bnbcy_standin`` only when ``BNBCY_AS_BITSANDBYTES`` is set.
    """
    PTH = "bnbcy-standin.pth"

    def run(self):
        super().run()
        if not self.editable_mode:  # setuptools' editable wheels carry only their own finder
            self.copy_file(os.path.join(ROOT, self.PTH), os.path.join(self.build_lib, self.PTH))

    def get_outputs(self, include_bytecode=True):
        extra = [] if self.editable_mode else [os.path.join(self.build_lib, self.PTH)]
        return super().get_outputs(include_bytecode) + extra


compile_args, link_args = openmp_flags()
ext = Extension(
    "bnbcy._C",
    sources=["pyx/_C.pyx"],
    include_dirs=["pyx/include"],
    extra_compile_args=["-O3", "-std=c11", *compile_args],
    extra_link_args=link_args,
    libraries=["dl"] if sys.platform.startswith("linux") else [],
    depends=[os.path.join("pyx", f) for f in os.listdir(os.path.join(ROOT, "pyx")) if f.endswith(".pxi")]
    + [os.path.join("pyx", "include", f) for f in os.listdir(os.path.join(ROOT, "pyx", "include"))],
)

try:
    from Cython.Build import cythonize
except ImportError as exc:  # pragma: no cover - build requirement
    raise SystemExit("bnbcy needs Cython>=3 to build (pip install cython)") from exc

setup(
    ext_modules=cythonize([ext], compiler_directives={"language_level": "3"}, include_path=["pyx"]),
    cmdclass={"build_ext": BuildExt, "build_py": BuildPy},
)
