"""Every environment variable bnbcy reads, parsed in one place.

Each variable has one entry in :data:`VARIABLES` (its kind, default and accepted values);
the rest of bnbcy asks :func:`get` for the parsed value and never reads ``os.environ``
itself (the C side receives parsed values: the CPU ISA choice through
``_C``'s view layer, the CPU pool limit through ``pyx/cpu_pool.pxi``).

A malformed value of a variable whose misreading would be harmful (a memory limit)
raises :class:`ValueError`; a malformed switch or choice warns once
(:class:`BnbcyEnvWarning`) naming the variable and its accepted values, and the
default applies. Values are re-read on each :func:`get` (tests flip them) and parsed
once per distinct raw string.

This module uses only the standard library, so ``setup.py`` can load it by path.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

__all__ = ["BnbcyEnvWarning", "VARIABLES", "get", "describe"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")
# The pool limit in bytes must fit a 64-bit size_t: (2**64 - 1) >> 20 MB, rounded down to 2**43.
POOL_MB_MAX = 1 << 43


class BnbcyEnvWarning(UserWarning):
    """A BNBCY_* environment variable holds a value bnbcy does not accept (the default is used)."""


@dataclass(frozen=True)
class Variable:
    """One environment variable: ``kind`` is 'flag', 'choice' or 'megabytes'."""

    name: str
    kind: str
    default: object
    choices: tuple = ()
    doc: str = ""

    def accepted(self) -> str:
        if self.kind == "flag":
            return "1/true/yes/on or 0/false/no/off (or unset)"
        if self.kind == "choice":
            return ", ".join(repr(c) for c in self.choices) + " (or unset)"
        return f"a whole number of megabytes from 0 to {POOL_MB_MAX}"


VARIABLES = {v.name: v for v in (
    Variable("BNBCY_CPU_ISA", "choice", "", ("scalar", "avx2", "avx512"),
             "Lower the CPU kernels' instruction set (never above what the CPU has)."),
    Variable("BNBCY_CPU_POOL_MB", "megabytes", 512, (),
             "Megabytes of freed large CPU outputs the output pool keeps mapped; 0 turns it off."),
    Variable("BNBCY_CUDA_SYNC", "flag", False, (),
             "Synchronize after every CUDA launch and raise launch errors at the call."),
    Variable("BNBCY_INT8_GEMM", "choice", "", ("raw", "cublas"),
             "Force the CUDA int8 GEMM route where it applies (default: the measured route)."),
    Variable("BNBCY_FORCE_NVRTC", "flag", False, (),
             "Compile CUDA kernels with NVRTC even where a fitting fatbin was built."),
    Variable("BNBCY_NO_NVCC", "flag", False, (),
             "Build time: do not compile fatbins with nvcc (kernels come from NVRTC at first use)."),
    Variable("BNBCY_EMULATE_CUDA", "flag", False, (),
             "Run CUDA kernels in the SIMT emulator on the CPU."),
    Variable("BNBCY_AS_BITSANDBYTES", "flag", False, (),
             "Let `import bitsandbytes` load bnbcy."),
)}

_parsed: dict = {}  # (name, raw) -> parsed value


def _warn(var: Variable, raw: str, what: str):
    warnings.warn(f"{var.name}={raw!r} is not accepted ({what}); accepted: {var.accepted()}; "
                  f"using the default {var.default!r}", BnbcyEnvWarning, stacklevel=4)
    return var.default


def _parse(var: Variable, raw: str):
    text = raw.strip().lower()
    if var.kind == "flag":
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        return _warn(var, raw, "not a switch value")
    if var.kind == "choice":
        if text == "" or text == "auto":
            return var.default
        if text in var.choices:
            return text
        return _warn(var, raw, "unknown value")
    # megabytes: a wrong memory limit must not pass silently
    try:
        mb = int(raw.strip())
    except ValueError:
        raise ValueError(f"{var.name} must be a whole number of megabytes from 0 to {POOL_MB_MAX}, "
                         f"got {raw!r}") from None
    if not 0 <= mb <= POOL_MB_MAX:
        raise ValueError(f"{var.name} must be a whole number of megabytes from 0 to {POOL_MB_MAX}, "
                         f"got {mb}")
    return mb


def get(name: str):
    """The parsed value of the environment variable ``name`` (one of :data:`VARIABLES`).

    Raises
    ------
    KeyError
        ``name`` is not a variable bnbcy knows (a programming error).
    ValueError
        A megabyte count that is not a whole number in range.
    """
    var = VARIABLES[name]
    raw = os.environ.get(name)
    if raw is None:
        return var.default
    key = (name, raw)
    try:
        return _parsed[key]
    except KeyError:
        pass
    value = _parse(var, raw)  # warns (once: the result is cached) or raises
    _parsed[key] = value
    return value


def cpu_pool_bytes() -> int:
    """``BNBCY_CPU_POOL_MB`` in bytes (0: the pool is off)."""
    return get("BNBCY_CPU_POOL_MB") << 20


def cpu_isa_request() -> int:
    """``BNBCY_CPU_ISA`` as the C side's number: -1 (the best the CPU has), 0 scalar, 1 avx2, 2 avx512."""
    isa = get("BNBCY_CPU_ISA")
    return VARIABLES["BNBCY_CPU_ISA"].choices.index(isa) if isa else -1


def describe() -> str:
    """Markdown table of every variable (docs/errors.md embeds it; a test keeps them equal)."""
    rows = ["| variable | accepted values | default | on a bad value | meaning |", "|---|---|---|---|---|"]
    for v in VARIABLES.values():
        bad = "ValueError" if v.kind == "megabytes" else "one-time BnbcyEnvWarning, default used"
        default = "unset" if v.default in ("", False) else repr(v.default)
        rows.append(f"| `{v.name}` | {v.accepted()} | {default} | {bad} | {v.doc} |")
    return "\n".join(rows)
