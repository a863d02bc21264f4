"""How this build's GPU path was checked: compiled, emulated, or run on a GPU.

The rule (printed by ``python -m bnbcy``, documented in ``docs/architecture.md``):

* **compiled** -- the build ships fatbins (nvcc ran at build time; the line names the SASS
  architectures), or CuPy's NVRTC is importable, so every ``cuda_src/*.cu`` is compiled at
  first use. Compiling says nothing about results.
* **emulated** -- this build has the SIMT emulator (``bnbcy.kernels.emulate``), a host C++
  compiler can build it, and (in a source checkout) its suite exists: the CUDA tests
  (``tests/test_*_cuda.py``, ``tests/test_emulator*.py``), which run the kernels on CPU tensors
  against the CPU kernels and float64 (``BNBCY_EMULATE_CUDA=1 python -m pytest -m cuda tests``).
  The line says the suite exists, not that it passed: CI runs it.
* **run on GPU** -- ``bench/results/`` holds a ``gpu_check-*.json`` written by
  ``bench/gpu_check.sh`` for *this source*: its ``source_hash`` (a SHA-256 over the files that
  make up the GPU path, :func:`source_hash`) equals the hash of the tree being reported on.
  Any change to a kernel, the Cython layer or a Python module voids it; a summary written on a
  machine without a GPU never counts. The line names the GPU, the date and which steps passed.

Run as a script (``python bnbcy/_gpu_evidence.py --source-hash``) it needs neither the built
extension nor an import of the package, so ``gpu_check.sh`` can record the hash before it builds.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os

_HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(_HERE)

# (directory relative to the root, glob patterns): what the GPU path is made of
_SOURCE_SETS = (
    ("cuda_src", ("*.cu", "*.cuh")),
    ("pyx", ("*.pyx", "*.pxi", "*.pxd", "include/*.h")),
    ("bnbcy", ("**/*.py", "**/*.json")),
    (".", ("setup.py",)),
)
_EXCLUDE = ("bnbcy/_cuda/",)   # build output


def source_files(root=ROOT):
    """The files :func:`source_hash` covers, as sorted paths relative to ``root``."""
    found = set()
    for sub, patterns in _SOURCE_SETS:
        for pat in patterns:
            for path in glob.glob(os.path.join(root, sub, pat), recursive=True):
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                if os.path.isfile(path) and "__pycache__" not in rel and not rel.startswith(_EXCLUDE):
                    found.add(rel)
    return sorted(found)


def source_hash(root=ROOT):
    """SHA-256 (hex) over the names and contents of :func:`source_files`; None outside a
    source checkout (no ``cuda_src/``)."""
    if not os.path.isdir(os.path.join(root, "cuda_src")):
        return None
    h = hashlib.sha256()
    for rel in source_files(root):
        with open(os.path.join(root, rel), "rb") as fh:
            data = fh.read()
        h.update(rel.encode() + b"\0" + str(len(data)).encode() + b"\0" + data)
    return h.hexdigest()


def gpu_results(root=ROOT, digest=None):
    """``gpu_check.sh`` summaries under ``bench/results/`` whose ``source_hash`` is ``digest``
    (default: this tree's), newest first."""
    digest = source_hash(root) if digest is None else digest
    out = []
    if digest is None:
        return out
    for path in glob.glob(os.path.join(root, "bench", "results", "gpu_check*.json")):
        try:
            with open(path) as fh:
                res = json.load(fh)
        except (OSError, ValueError):
            continue
        ran = [s for s in res.get("steps", []) if s.get("gpu_only") and s.get("status") != "not-run"] \
            if isinstance(res, dict) else []
        # a summary written without a GPU (it stops at the first GPU-only step) proves nothing
        if ran and res.get("gpu") not in (None, "", "none") and res.get("source_hash") == digest:
            res["_path"] = os.path.relpath(path, root)
            out.append(res)
    return sorted(out, key=lambda r: str(r.get("date_utc", "")), reverse=True)


def _compiled(manifest):
    archs = manifest.get("archs") or []
    if archs:
        ptx = manifest.get("ptx")
        return ("yes: fatbins built by nvcc for " + ", ".join("sm_" + a for a in archs)
                + (f" (+ PTX compute_{ptx})" if ptx else ""))
    try:
        from cupy.cuda import nvrtc
        major, minor = nvrtc.getVersion()
        return f"yes: no fatbins; NVRTC {major}.{minor} (CuPy) compiles the kernels at first use"
    except Exception as exc:  # no CuPy, or no NVRTC library: say which
        return f"no: no fatbins in this build and no NVRTC ({type(exc).__name__}: {exc})"


def _emulated(kernels, root):
    if not callable(getattr(kernels, "emulate", None)):
        return "no: this build has no SIMT emulator"
    try:
        from ._emulator.build import compiler
        cxx = compiler()
    except Exception as exc:  # no emulator package, or no host compiler to build it with
        return f"no: the SIMT emulator cannot be built here ({type(exc).__name__}: {exc})"
    # the emulated suite is the CUDA suite run on CPU tensors, plus the emulator's own tests
    suite = sorted(glob.glob(os.path.join(root, "tests", "test_*_cuda.py"))
                   + glob.glob(os.path.join(root, "tests", "test_emulator*.py")))
    if not suite:
        return f"emulator present (bnbcy.kernels.emulate, built with {cxx}); its suite is not in this install"
    return (f"yes: SIMT emulator (bnbcy.kernels.emulate, built with {os.path.basename(cxx)}) and its suite "
            f"({len(suite)} files); run BNBCY_EMULATE_CUDA=1 python -m pytest -m cuda tests")


def _run_on_gpu(root):
    digest = source_hash(root)
    if digest is None:
        return "unknown: not a source checkout (the rule reads bench/results/ of one)"
    hits = gpu_results(root, digest)
    if not hits:
        return f"no: bench/results/ has no gpu_check.sh result for this source (hash {digest[:12]})"
    r = hits[0]
    steps = r.get("steps", [])
    passed = [s["name"] for s in steps if s.get("status") == "passed"]
    other = [f"{s['name']} {s.get('status')}" for s in steps if s.get("status") != "passed"]
    verdict = "all steps passed" if not other else "NOT all passed: " + ", ".join(other)
    return (f"yes: {r.get('gpu', '?')} on {r.get('date_utc', '?')}, {verdict} "
            f"({len(passed)}/{len(steps)} passed; {r['_path']})")


def evidence(root=ROOT):
    """The three answers as a dict: ``compiled``, ``emulated``, ``run_on_gpu`` (strings that
    start with ``yes``/``no``/``unknown`` and say why)."""
    from . import kernels
    return {"compiled": _compiled(kernels.registry.manifest), "emulated": _emulated(kernels, root),
            "run_on_gpu": _run_on_gpu(root)}


def format_evidence(ev):
    """Lines for ``python -m bnbcy``."""
    return ["  GPU path checked :",
            f"    compiled       : {ev['compiled']}",
            f"    emulated       : {ev['emulated']}",
            f"    run on a GPU   : {ev['run_on_gpu']}"]


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source-hash", action="store_true", help="print the source hash and exit")
    ap.add_argument("--root", default=ROOT)
    args = ap.parse_args()
    if args.source_hash:
        print(source_hash(args.root) or "")
    else:
        print(json.dumps({"source_hash": source_hash(args.root), "files": len(source_files(args.root))}))
