"""bnbcy's SIMT emulator: the shipped ``cuda_src`` kernels compiled as host C++ and run on
the CPU, one fiber per CUDA thread (see ``docs/emulator.md``). Used through
:func:`bnbcy.kernels.emulate`; :func:`build` is the low-level entry point."""
from .build import EmulatorBuildError, Library, asan_runtime, build, sanitizer_runtime_loaded

__all__ = ["EmulatorBuildError", "Library", "asan_runtime", "build", "sanitizer_runtime_loaded"]
