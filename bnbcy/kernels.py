"""The CUDA kernel registry: the one way bnbcy finds and launches GPU code.

Each ``cuda_src/*.cu`` file is a *module*. Per device, a module is loaded once:
from the fatbin shipped with the package when one of its binaries fits the
device, otherwise compiled from the shipped source with NVRTC (through
``cupy.RawModule``). Ops declare the kernels they launch as :class:`KernelSpec`
entries and launch them through :meth:`KernelRegistry.launch`, which calls the
Cython launch path (``bnbcy._C.cuda_launch``) on the input framework's current
stream and checks the launch.

The registry is public for notebook work::

    import bnbcy.kernels as K
    K.list_kernels()                       # every kernel, with module and signature
    src = K.source("blockwise8")            # the module's current source
    K.rebuild("blockwise8", src.replace(...))   # functional ops now use the new build
    K.rebuild("blockwise8", options=("-std=c++17",))  # same source, other options
    K.restore("blockwise8")                # back to the shipped build

Without a GPU, the same launches run in bnbcy's SIMT emulator (``docs/emulator.md``):
``with K.emulate():`` (or ``BNBCY_EMULATE_CUDA=1``) sends ops on CPU arrays (torch and
NumPy) through the CUDA launchers, argument packing and ``_C.cuda_launch`` to the
shipped (or rebuilt) kernels compiled as host C++.

Environment
-----------
BNBCY_FORCE_NVRTC=1   ignore shipped fatbins (compile every module with NVRTC).
BNBCY_CUDA_SYNC=1     synchronise after every launch and report kernel errors
                      at the launch that caused them (tests set this).
BNBCY_EMULATE_CUDA=1  ops on CPU arrays run the CUDA kernels in the SIMT emulator.
BNBCY_EMULATOR_ARCH   __CUDA_ARCH__ the emulated kernels see (default 800; 750 for the
                      pre-Ampere paths).
BNBCY_EMULATOR_LATE_CP_ASYNC=1  cp.async copies land only when a wait requires them.
BNBCY_EMULATOR_SANITIZE=1       emulated kernels built with AddressSanitizer + UBSan (the
                      process must preload libasan; see docs/emulator.md).
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import hashlib
import itertools
import json
import os
import threading

from . import _C
from . import _arrays, _env

PACKAGE_CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_cuda")
REPO_CUDA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cuda_src")
# Same numerics flags as the nvcc build in setup.py (NUMERICS.md §0).
DEFAULT_NVRTC_OPTIONS = ("--use_fast_math", "-std=c++17")

CudaLaunchError = _C.CudaLaunchError


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """A family of exported kernels sharing one signature.

    Attributes
    ----------
    name : str
        Family name, e.g. ``'quantize_blockwise'``.
    module : str
        The ``cuda_src`` file stem holding the kernels.
    symbol : str
        ``str.format`` template of the ``extern "C"`` symbol, filled from a variant.
    signature : str
        Parameter types for :func:`bnbcy._C.cuda_launch` (``p`` pointer, ``q``
        int64, ``i`` int32, ``u`` uint32, ``f`` float32, ``d`` float64).
    variants : tuple of (str, tuple)
        Template fields and their allowed values.
    """

    name: str
    module: str
    symbol: str
    signature: str
    variants: tuple = ()

    def symbols(self):
        """Every concrete symbol of the family."""
        if not self.variants:
            return [self.symbol]
        keys = [k for k, _ in self.variants]
        return [self.symbol.format(**dict(zip(keys, vals)))
                for vals in itertools.product(*(v for _, v in self.variants))]


def _cuda_dir():
    if os.path.isfile(os.path.join(PACKAGE_CUDA_DIR, "manifest.json")):
        return PACKAGE_CUDA_DIR
    return REPO_CUDA_DIR  # a source checkout that has not been built


class KernelRegistry:
    """Loads CUDA modules once per device and launches their kernels."""

    def __init__(self, cuda_dir=None):
        self.cuda_dir = cuda_dir or _cuda_dir()
        manifest_path = os.path.join(self.cuda_dir, "manifest.json")
        self.manifest = {"archs": [], "ptx": None, "modules": {}}
        if os.path.isfile(manifest_path):
            with open(manifest_path) as fh:
                self.manifest = json.load(fh)
        self._specs = {}
        self._overrides = {}   # module -> (source, options)
        self._loaded = {}      # (module, device) -> (cupy.RawModule, origin)
        self._functions = {}   # (symbol, device) -> CUfunction handle
        self._emulated = {}    # (module, arch, sanitize) -> emulator Library (current source)
        self._emulated_all = []  # every emulator Library loaded (launch counts of rebuilt ones too)
        self._checked = set()  # (library key, symbol) whose signature matched its spec
        self._lock = threading.RLock()
        self.sync = _env.get("BNBCY_CUDA_SYNC")

    # ----------------------------------------------------------------- specs
    def register(self, spec: KernelSpec) -> KernelSpec:
        """Declare a kernel family (done by the op modules at import)."""
        self._specs[spec.name] = spec
        return spec

    def modules(self):
        """Names of the CUDA modules (``cuda_src`` file stems)."""
        return sorted(f[:-3] for f in os.listdir(self.cuda_dir) if f.endswith(".cu"))

    def list_kernels(self):
        """Every registered kernel as dicts of symbol, family, module and signature."""
        return [{"symbol": s, "family": spec.name, "module": spec.module, "signature": spec.signature}
                for spec in self._specs.values() for s in spec.symbols()]

    def _module_of(self, name: str) -> str:
        if name in self.modules():
            return name
        if name in self._specs:
            return self._specs[name].module
        for spec in self._specs.values():
            if name in spec.symbols():
                return spec.module
        raise KeyError(f"no CUDA module, kernel family or kernel named {name!r}; "
                       f"modules: {self.modules()}")

    def shipped_source(self, name: str) -> str:
        """The source the package ships for a module (or a kernel's module)."""
        with open(os.path.join(self.cuda_dir, self._module_of(name) + ".cu")) as fh:
            return fh.read()

    def source(self, name: str) -> str:
        """The source currently in use for a module (a rebuilt one if rebuilt)."""
        module = self._module_of(name)
        if module in self._overrides:
            return self._overrides[module][0]
        return self.shipped_source(module)

    def status(self):
        """How each loaded (module, device) was built: 'fatbin', 'nvrtc' or 'rebuilt'; emulated
        builds as ``module@emulator``: 'emulated' or 'emulated-rebuilt'."""
        out = {f"{m}@cuda:{d}": origin for (m, d), (_, origin) in self._loaded.items()}
        for (m, _arch, _san) in self._emulated:
            out[f"{m}@emulator"] = "emulated-rebuilt" if m in self._overrides else "emulated"
        return out

    # ----------------------------------------------------------- (re)building
    def rebuild(self, name: str, source: str | None = None, options=None, device: int | None = None):
        """Compile a module from (edited) source and/or other options with NVRTC.

        The functional ops use the new build from the next launch on, on every
        device. The build is compiled now on ``device`` (default: the current
        one) so that compile errors surface here.

        Parameters
        ----------
        name : str
            Module, kernel family or kernel symbol.
        source : str, optional
            New source; default: the current source.
        options : sequence of str, optional
            NVRTC options; default :data:`DEFAULT_NVRTC_OPTIONS`. The directory of
            the shipped sources is always on the include path.
        """
        module = self._module_of(name)
        src = self.source(module) if source is None else source
        opts = tuple(DEFAULT_NVRTC_OPTIONS if options is None else options)
        if emulating():
            with self._lock:
                lib = self._build_emulated(module, src, opts)  # raises on compile errors
                self._drop(module)
                self._overrides[module] = (src, opts)
                self._emulated[(module,) + _emulator_config()] = lib
            return
        import cupy

        dev = cupy.cuda.runtime.getDevice() if device is None else device
        with self._lock:
            mod = self._compile(src, opts, dev)  # raises on compile errors; nothing replaced
            self._drop(module)
            self._overrides[module] = (src, opts)
            self._loaded[(module, dev)] = (mod, "rebuilt")

    def restore(self, name: str | None = None):
        """Go back to the shipped build of one module (or of all)."""
        with self._lock:
            modules = list(self._overrides) if name is None else [self._module_of(name)]
            for module in modules:
                self._overrides.pop(module, None)
                self._drop(module)

    def _drop(self, module):
        for key in [k for k in self._loaded if k[0] == module]:
            del self._loaded[key]
        for key in [k for k in self._emulated if k[0] == module]:
            del self._emulated[key]
        symbols = {s for spec in self._specs.values() if spec.module == module for s in spec.symbols()}
        for key in [k for k in self._functions if k[0] in symbols]:
            del self._functions[key]

    def _compile(self, source, options, device):
        import cupy
        with cupy.cuda.Device(device):
            mod = cupy.RawModule(code=source, options=nvrtc_options(options, self.cuda_dir))
            mod.compile()
        return mod

    # -------------------------------------------------------------- emulation
    def _build_emulated(self, module, source, options):
        from . import _emulator
        arch, sanitize = _emulator_config()
        lib = _emulator.build(module, source, self.cuda_dir, arch=arch, ftz=_fast_math(options),
                              sanitize=sanitize)
        self._emulated_all.append(lib)
        return lib

    def _emulated_library(self, module):
        key = (module,) + _emulator_config()
        lib = self._emulated.get(key)
        if lib is None:
            with self._lock:
                lib = self._emulated.get(key)
                if lib is None:
                    src, opts = self._overrides.get(module, (None, DEFAULT_NVRTC_OPTIONS))
                    src = self.shipped_source(module) if src is None else src
                    lib = self._emulated[key] = self._build_emulated(module, src, opts)
        return lib

    def emulated_launches(self):
        """Emulated launches so far per kernel symbol (all builds, rebuilt ones included)."""
        counts = {}
        for lib in self._emulated_all:
            for sym, n in lib.launches().items():
                counts[sym] = counts.get(sym, 0) + n
        return counts

    def coverage(self):
        """Every registered kernel with its number of emulated launches (0 if never launched)."""
        counts = self.emulated_launches()
        return {k["symbol"]: counts.get(k["symbol"], 0) for k in self.list_kernels()}

    def _launch_emulated(self, spec, symbol, grid, block, args, shared_mem):
        lib = self._emulated_library(spec.module)
        fn = lib.handle(symbol)
        if (lib.key, symbol) not in self._checked:
            kinds = lib.kinds(symbol)
            if kinds != spec.signature:
                raise TypeError(f"kernel {symbol}: registry signature {spec.signature!r} does not match the "
                                f"kernel's parameter types {kinds!r} (p pointer, q int64, i int32, u uint32, "
                                f"f float32, d float64)")
            self._checked.add((lib.key, symbol))
        lib.configure(late_cp_async=_late_cp_async())
        _C.cuda_launch(fn, tuple(grid), tuple(block), shared_mem, 0, _C.EMULATED_DEVICE, spec.signature,
                       tuple(args), False)

    def _fatbin_fits(self, device) -> bool:
        import cupy
        cc = int(cupy.cuda.Device(device).compute_capability)
        archs = [int(a) for a in self.manifest.get("archs", [])]
        ptx = self.manifest.get("ptx")
        same_major = [a for a in archs if a // 10 == cc // 10 and a <= cc]
        return bool(same_major) or (ptx is not None and int(ptx) <= cc)

    def _module(self, module, device):
        key = (module, device)
        hit = self._loaded.get(key)
        if hit is not None:
            return hit[0]
        import cupy
        with self._lock:
            if key in self._loaded:
                return self._loaded[key][0]
            if module in self._overrides:
                src, opts = self._overrides[module]
                entry = (self._compile(src, opts, device), "rebuilt")
            else:
                entry = None
                fatbin = self.manifest.get("modules", {}).get(module)
                if fatbin and not _env.get("BNBCY_FORCE_NVRTC") and self._fatbin_fits(device):
                    try:
                        with cupy.cuda.Device(device):
                            mod = cupy.RawModule(path=os.path.join(self.cuda_dir, fatbin))
                            mod.module  # load now: a driver too old for the binary fails here
                        entry = (mod, "fatbin")
                    except cupy.cuda.driver.CUDADriverError:
                        entry = None
                if entry is None:
                    entry = (self._compile(self.shipped_source(module), DEFAULT_NVRTC_OPTIONS, device),
                             "nvrtc")
            self._loaded[key] = entry
            return entry[0]

    def function(self, symbol: str, module: str, device: int) -> int:
        """``CUfunction`` handle of ``symbol`` on ``device`` (loading the module once)."""
        key = (symbol, device)
        fn = self._functions.get(key)
        if fn is None:
            import cupy
            mod = self._module(module, device)
            with cupy.cuda.Device(device):
                fn = mod.get_function(symbol).kernel.ptr
            self._functions[key] = fn
        return fn

    # ---------------------------------------------------------------- launch
    def launch(self, spec: KernelSpec, variant: dict, grid, block, args, like, shared_mem: int = 0):
        """Launch one kernel of ``spec`` on the current stream of ``like``'s framework.

        Parameters
        ----------
        spec : KernelSpec
        variant : dict
            Values of the spec's template fields.
        grid, block : tuple of int
        args : tuple
            Kernel arguments matching ``spec.signature``.
        like : TensorView
            The array whose device and framework stream the launch uses.
        """
        symbol = spec.symbol.format(**variant)
        if not like.is_cuda:
            if not emulating():
                raise ValueError(f"kernel {symbol} needs CUDA arrays, got {like.kind} arrays on the CPU "
                                 "(bnbcy.kernels.emulate() runs it in the SIMT emulator)")
            self._launch_emulated(spec, symbol, grid, block, args, shared_mem)
            return
        fn = self.function(symbol, spec.module, like.device_id)
        stream = _arrays.current_stream(like)
        _C.cuda_launch(fn, tuple(grid), tuple(block), shared_mem, stream, like.device_id,
                       spec.signature, tuple(args), self.sync)


registry = KernelRegistry()

register = registry.register
list_kernels = registry.list_kernels
modules = registry.modules
source = registry.source
shipped_source = registry.shipped_source
rebuild = registry.rebuild
restore = registry.restore
status = registry.status


emulated_launches = registry.emulated_launches
coverage = registry.coverage


def nvrtc_options(options, cuda_dir):
    """NVRTC options of a build: ``options``, the include path and a hash of the headers there.

    CuPy caches NVRTC builds by source text and options; the headers a module includes are not
    part of that key, so their hash is passed as a define: a changed header is a new build.
    """
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(cuda_dir, "*.cuh"))):
        with open(path, "rb") as fh:
            h.update(os.path.basename(path).encode() + b"\0" + fh.read() + b"\0")
    return tuple(options) + (f"-I{cuda_dir}", f"-DBNBCY_HEADERS_SHA256={h.hexdigest()[:32]}")


# ----------------------------------------------------------------------------- emulation
_emulate_stack = []  # (enabled, late_cp_async) of the enclosing emulate() blocks, innermost last
_emulate_lock = threading.Lock()


def _env_flag(name):
    return os.environ.get(name, "").strip() not in ("", "0")


def emulating() -> bool:
    """Whether ops on CPU arrays are sent through the CUDA launch path to the SIMT emulator
    (the innermost :func:`emulate` block, else ``BNBCY_EMULATE_CUDA=1``). The one CPU/CUDA
    dispatch consults this."""
    if _emulate_stack:
        return _emulate_stack[-1][0]
    return _env_flag("BNBCY_EMULATE_CUDA")


def use_cuda_kernels(view) -> bool:
    """Whether an op on ``view`` launches the CUDA kernels (a CUDA array, or emulation)."""
    return view.is_cuda or emulating()


def _late_cp_async():
    for enabled, late in reversed(_emulate_stack):
        if late is not None:
            return late
    return _env_flag("BNBCY_EMULATOR_LATE_CP_ASYNC")


def _emulator_config():
    arch = int(os.environ.get("BNBCY_EMULATOR_ARCH", "800") or 800)
    if arch not in (750, 800, 860, 890, 900):
        raise ValueError(f"BNBCY_EMULATOR_ARCH must be one of 750, 800, 860, 890, 900, got {arch}")
    return arch, _env_flag("BNBCY_EMULATOR_SANITIZE")


def _fast_math(options):
    opts = set(options)
    return "--use_fast_math" in opts or "-use_fast_math" in opts or "--ftz=true" in opts or "-ftz=true" in opts


@contextlib.contextmanager
def emulate(enabled=True, late_cp_async=None):
    """Run CUDA kernels on CPU arrays in the SIMT emulator inside the ``with`` block.

    Parameters
    ----------
    enabled : bool
        ``False``: CPU arrays use the CPU kernels inside the block (even under
        ``BNBCY_EMULATE_CUDA=1``), e.g. to compute a reference.
    late_cp_async : bool, optional
        ``cp.async`` copies land only when a ``cp.async.wait_group`` requires them (a missing
        or too weak wait then reads stale shared memory); default ``BNBCY_EMULATOR_LATE_CP_ASYNC``.

    Notes
    -----
    Emulated is not run on a GPU: see ``docs/emulator.md`` for what the emulator guarantees.
    Blocks nest; the innermost decides. The setting is process-wide, not per thread.
    """
    with _emulate_lock:
        _emulate_stack.append((bool(enabled), late_cp_async))
    try:
        yield
    finally:
        with _emulate_lock:
            _emulate_stack.pop()
