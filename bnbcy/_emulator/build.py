"""Build and load emulated CUDA modules: a ``cuda_src`` module compiled as host C++.

One shared library per (module source, emulator sources, included headers, options):
the cache key is a hash of the preprocessed translation unit (so an edited
``bnbcy_common.cuh`` or emulator header gives a new build), the flags and the
compiler's version. Libraries live in ``$BNBCY_EMULATOR_CACHE`` (default
``~/.cache/bnbcy/emulator``).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import threading

HERE = os.path.dirname(os.path.abspath(__file__))
RUNTIME = os.path.join(HERE, "simt_runtime.cpp")
CXX_FLAGS = ("-std=gnu++17", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing", "-ffp-contract=off",
             "-fno-fast-math", "-fno-math-errno", "-w",
             # nothing shared between two loaded builds (static locals of inline functions would be
             # unified process-wide as GNU unique symbols): only the entry points are exported
             "-fvisibility=hidden", "-fno-gnu-unique")
SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
                  "-g")
# `extern __shared__ T name[];` (dynamic shared memory): the one rewrite of the source.
_DYN_SHARED = re.compile(r"extern\s+__shared__\s+(?:__align__\s*\(\s*\d+\s*\)\s*)?([\w:<>\s\*]+?)\s*"
                         r"(?:__align__\s*\(\s*\d+\s*\)\s*)?(\w+)\s*\[\s*\]\s*;")
_KERNEL = re.compile(r'extern\s+"C"\s+__bnbcy_kernel__\s+void\s+')
_lock = threading.Lock()


class EmulatorBuildError(RuntimeError):
    """The host compiler rejected an emulated module (an unsupported construct, a syntax error)."""


def compiler():
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise EmulatorBuildError("the CUDA emulator needs a host C++ compiler (g++); none found (set CXX)")
    return cxx


def cache_dir():
    d = os.environ.get("BNBCY_EMULATOR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bnbcy",
                                                               "emulator")
    os.makedirs(d, exist_ok=True)
    return d


def sanitizer_runtime_loaded() -> bool:
    """Whether AddressSanitizer's runtime is in this process (it must be preloaded)."""
    try:
        ctypes.CDLL(None).__asan_init  # noqa: B018
        return True
    except AttributeError:
        return False


def translation_unit(module: str, source: str) -> str:
    """The C++ the emulator compiles for a module: emulation header, the source, kernel table."""
    body = _DYN_SHARED.sub(lambda m: f"BNBCY_EMU_DYNAMIC_SHARED({m.group(1).strip()}, {m.group(2)});", source)
    return f'#include "cuda_emu.h"\n#line 1 "{module}.cu"\n{body}\n'


def _run(cmd, what):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmulatorBuildError(f"{what} failed ({' '.join(cmd[:1])} exit {r.returncode}):\n{r.stderr[-6000:]}")
    return r.stdout


def _balanced(text, i):
    """Index just past the parenthesised group starting at text[i] == '('."""
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "(":
            depth += 1
        elif text[j] == ")":
            depth -= 1
            if depth == 0:
                return j + 1
    raise EmulatorBuildError("unbalanced parentheses in a kernel declaration")


def find_kernels(preprocessed: str):
    """(name, launch-bounds expression or None) of every extern "C" __global__ function."""
    out = []
    for m in _KERNEL.finditer(preprocessed):
        i = m.end()
        bounds = None
        if preprocessed.startswith("__bnbcy_lb__", i):
            j = preprocessed.index("(", i)
            k = _balanced(preprocessed, j)
            bounds = preprocessed[j + 1:k - 1].split(",")[0].strip()
            i = k
        name = re.match(r"\s*(\w+)\s*\(", preprocessed[i:])
        if name is None:
            raise EmulatorBuildError(f"cannot read a kernel name at: {preprocessed[m.start():m.start() + 120]!r}")
        out.append((name.group(1), bounds))
    return out


class _Entry(ctypes.Structure):
    _fields_ = [("launch", ctypes.c_void_p), ("name", ctypes.c_char_p), ("fn", ctypes.c_void_p),
                ("invoke", ctypes.c_void_p), ("nparams", ctypes.c_int), ("kinds", ctypes.c_char_p),
                ("max_threads", ctypes.c_int), ("launches", ctypes.c_ulonglong)]


class Library:
    """A loaded emulated module: its kernels by name, as launchable handles."""

    def __init__(self, path, module, key):
        self.path, self.module, self.key = path, module, key
        self._dll = ctypes.CDLL(path, mode=os.RTLD_LOCAL | os.RTLD_NOW)
        get = self._dll.bnbcy_emu_kernels
        get.restype = ctypes.POINTER(_Entry)
        get.argtypes = [ctypes.POINTER(ctypes.c_int)]
        n = ctypes.c_int()
        table = get(ctypes.byref(n))
        self.entries = {table[k].name.decode(): ctypes.pointer(table[k]) for k in range(n.value)}
        self._configure = self._dll.bnbcy_emu_configure
        self._configure.argtypes = [ctypes.c_int]

    def handle(self, symbol: str) -> int:
        """Address of the kernel's entry: the ``function`` argument of ``_C.cuda_launch``."""
        try:
            return ctypes.addressof(self.entries[symbol].contents)
        except KeyError:
            raise KeyError(f"emulated module {self.module!r} has no kernel {symbol!r}") from None

    def kinds(self, symbol: str) -> str:
        return self.entries[symbol].contents.kinds.decode()

    def launches(self):
        """Emulated launches per kernel of this library."""
        return {name: e.contents.launches for name, e in self.entries.items()}

    def configure(self, late_cp_async: bool):
        self._configure(1 if late_cp_async else 0)


def build(module: str, source: str, include_dir: str, arch: int = 80, ftz: bool = True,
          sanitize: bool = False) -> Library:
    """Compile (or fetch from the cache) and load the emulated build of one module.

    Parameters
    ----------
    module : str
        Module name (``cuda_src`` file stem); used in error messages and ``__FILE__``.
    source : str
        The module's CUDA source (as shipped, or edited).
    include_dir : str
        Where its ``#include "..."`` headers are (the shipped ``cuda_src``).
    arch : int
        The ``__CUDA_ARCH__`` the source sees (80: the sm_80+ paths, 75: the others).
    ftz : bool
        Unpinned float operations flush denormals, as under ``--use_fast_math``.
    sanitize : bool
        Build with AddressSanitizer and UBSan (load only in a process that preloads libasan).

    Raises
    ------
    EmulatorBuildError
        The source does not compile as emulated host code.
    """
    if sanitize and not sanitizer_runtime_loaded():
        raise EmulatorBuildError("a sanitizer build loads only in a process started with "
                                 f"LD_PRELOAD={asan_runtime()} (see docs/emulator.md)")
    cxx = compiler()
    defs = [f"-D__CUDA_ARCH__={int(arch)}", f"-DBNBCY_EMU_FTZ={1 if ftz else 0}", "-DBNBCY_EMULATOR=1",
            f"-I{HERE}", f"-I{include_dir}"]
    flags = list(CXX_FLAGS) + (list(SANITIZE_FLAGS) if sanitize else [])
    tu = translation_unit(module, source)
    with _lock, tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        src = os.path.join(tmp, f"{module}_emu.cpp")
        with open(src, "w") as fh:
            fh.write(tu)
        pre = _run([cxx, "-std=gnu++17", "-E", "-P", "-DBNBCY_EMU_SCAN=1", *defs, src], f"preprocessing {module}")
        kernels = find_kernels(pre)
        with open(RUNTIME) as fh:
            runtime = fh.read()
        version = _run([cxx, "--version"], "g++ --version")
        key = hashlib.sha256("\0".join([pre, runtime, " ".join(flags + defs[:2]), version]).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir(), f"{module}-{key}{'-asan' if sanitize else ''}.so")
        if not os.path.isfile(path):
            table = ["", "static bnbcy_emu::Entry bnbcy_emu_table[] = {"]
            for name, bounds in kernels:
                table.append(f'    bnbcy_emu::make_entry(&bnbcy_emu_launch, "{name}", &{name}, '
                             f'(int)({bounds if bounds else 0})),')
            table.append("    {}};" if not kernels else "};")
            table.append('extern "C" __attribute__((visibility("default"))) '
                         'bnbcy_emu::Entry *bnbcy_emu_kernels(int *n) { '
                         f"*n = {len(kernels)}; return bnbcy_emu_table; }}")
            with open(src, "a") as fh:
                fh.write("\n".join(table) + "\n")
            out = os.path.join(tmp, "lib.so")
            _run([cxx, *flags, *defs, "-o", out, src, RUNTIME], f"compiling emulated module {module}")
            os.replace(out, path)
        return Library(path, module, key)


def asan_runtime() -> str:
    """Path of the compiler's AddressSanitizer runtime (to LD_PRELOAD)."""
    return _run([compiler(), "-print-file-name=libasan.so"], "g++ -print-file-name").strip()
