"""Per-element cost of the CPU optimizer kernels, without Python or threads in the way.

Usage::

    python bench/bench_optim_cycles.py                  # 16K elements (in L2), 30 interleaved rounds
    python bench/bench_optim_cycles.py --n 16384 4194304 --rounds 40
    python bench/bench_optim_cycles.py --base /tmp/old-tree   # against another tree's kernels, interleaved

Compiles ``bench/optim_cycles.c`` (which includes ``pyx/include/bnbcy_cpu_optim.h``, the kernels
the extension runs) with ``gcc -O3 -fopenmp`` and runs it for each case, one thread, the cases
interleaved round by round. A round runs ``--steps`` updates of one tensor and keeps the median
step; the report gives, per case, the median over rounds with the minimum and the inter-quartile
range, in ns per element, TSC ticks per element and core cycles per element (the core clock is
measured by a chain of dependent adds), and the cost per byte moved relative to Adam8bit.
``BNBCY_CPU_ISA=scalar|avx2|avx512`` forces a lane width as in the extension. ``--base TREE``
builds the same driver against ``TREE/pyx/include`` too (e.g. ``git worktree add /tmp/old-tree
<commit>``) and runs both in every round, reporting the ratio base/this per case.

At 16K elements every array sits in L2, so the figures are the kernels' compute cost: the
per-element budget a two-core step must stay under to keep up with memory. Writes
``bench/results/optim-cycles-<date>.json`` with the CPU model, flags and load average.

``--threads 2`` runs the step cases on two OpenMP threads (with ``--n 16777216``: the figure
``bench_optim.py`` measures through Python, without Python). The cases ``deq8`` and ``rq8`` are
pieces of the 8-bit step timed alone, through the kernel's own functions at the lane width the
step runs: dequantizing one state (the map lookups, times the absmax) and requantizing one state
(the product with 1/absmax, the requantization-table lookup, the codes stored), each on one
thread with the block in L1 as in the step. With them the report adds the decomposition of
Adam8bit: two dequantizations + two requantizations + Adam32bit (the rule with its streams) against
the whole 8-bit step; what the pieces leave over is the 8-bit loop's own work (block absmaxes,
the stores of the new states, the checks).
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import shutil
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = HERE / "optim_cycles.c"
RESULTS = HERE / "results"
#: case -> (rule id of bnbcy_cpu_optim.h, 8-bit, max_unorm, bytes read + written per element
#: (None: a piece of a step, not a step), part of optim_cycles.c)
CASES = {
    "adam8bit": (0, 1, 0.0, 16, "step"),
    "lion8bit": (4, 1, 0.0, 14, "step"),
    "momentum8bit": (1, 1, 0.0, 14, "step"),
    "rmsprop8bit": (2, 1, 0.0, 14, "step"),
    "ademamix8bit": (5, 1, 0.0, 18, "step"),
    "lamb8bit": (0, 1, 1.0, 26, "step"),
    "adam32bit": (0, 0, 0.0, 28, "step"),
    "ademamix32bit": (5, 0, 0.0, 40, "step"),
    "deq8": (0, 1, 0.0, None, "deq"),
    "rq8": (0, 1, 0.0, None, "rq"),
}


def _cpu():
    model, flags = platform.machine(), []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                flags = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_tile")
                         if f in have]
                break
    except OSError:
        pass
    return {"model": model, "flags": flags, "cores": os.cpu_count()}


def _build(out_dir: Path, tree: Path = ROOT) -> Path:
    inc = tree / "pyx" / "include"
    src = SRC.read_bytes() + b"".join(p.read_bytes() for p in sorted(inc.glob("*.h")))
    exe = out_dir / f"optim_cycles-{hashlib.sha1(src).hexdigest()[:12]}"
    if not exe.exists():
        # the headers' own directory is searched first for their quoted includes: copy the driver
        # next to them, so that every header comes from `tree`
        with tempfile.TemporaryDirectory() as d:
            shutil.copytree(inc, Path(d) / "include")
            shutil.copy(SRC, Path(d) / "include" / SRC.name)
            subprocess.run(["gcc", "-O3", "-std=c11", "-fopenmp", str(Path(d) / "include" / SRC.name),
                            "-o", str(exe), "-lm"], check=True)
    return exe


def _maps(path: Path):
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from bnbcy.functional.maps import create_dynamic_map

    m = [np.asarray(create_dynamic_map(signed=s).numpy(), dtype=np.float32) for s in (True, False)]
    path.write_bytes(np.concatenate(m).tobytes())


def _decompose(rows, threads):
    """Adam8bit's one-thread step against the sum of its pieces (two dequantizations, two
    requantizations, the 32-bit step for the rule), per tree and size, where all were measured."""
    out = []
    if threads != 1:
        return out
    for tree, n in sorted({(r["tree"], r["n"]) for r in rows}):
        got = {r["case"]: r["ns_median"] for r in rows if r["tree"] == tree and r["n"] == n}
        if all(c in got for c in ("adam8bit", "deq8", "rq8", "adam32bit")):
            lookups = 2 * got["deq8"] + 2 * got["rq8"]
            out.append({"tree": tree, "n": n, "step_ns": got["adam8bit"], "deq_ns": got["deq8"], "rq_ns": got["rq8"],
                        "rule_ns": got["adam32bit"], "lookups_ns": lookups, "pieces_ns": lookups + got["adam32bit"]})
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[16384], help="elements per tensor")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--steps", type=int, default=50, help="updates per round (the round keeps their median)")
    ap.add_argument("--base", type=Path, default=None, help="another tree whose kernels run interleaved")
    ap.add_argument("--threads", type=int, default=1, help="OpenMP threads of the step cases (pieces: one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    tmp = Path(tempfile.gettempdir()) / "bnbcy-optim-cycles"
    tmp.mkdir(exist_ok=True)
    exe, maps = _build(tmp), tmp / "maps.bin"
    trees = {"this": exe}
    if args.base is not None:
        trees["base"] = _build(tmp, args.base.resolve())
    _maps(maps)
    clock = json.loads(subprocess.run([str(exe), "clock"], capture_output=True, text=True, check=True).stdout)
    load0 = os.getloadavg()
    cases = list(args.cases)
    for c in [c for c in cases if CASES[c][4] != "step"]:  # a piece needs a SIMD width and 8-bit codes
        opt, bits8, mu, _b, part = CASES[c]
        for n in args.n:
            run = subprocess.run([str(exe), str(maps), str(n), "1", str(opt), str(bits8), str(mu), "1", part],
                                 capture_output=True, text=True)
            if run.returncode != 0:
                print(f"dropped {c} at n={n}: {run.stderr.strip()}")
                cases.remove(c)
                break
    samples = {(tr, c, n): [] for n in args.n for c in cases for tr in trees}
    for _ in range(args.rounds):
        for (tr, c, n) in samples:
            opt, bits8, mu, _b, part = CASES[c]
            threads = args.threads if part == "step" else 1
            out = subprocess.run([str(trees[tr]), str(maps), str(n), str(args.steps), str(opt), str(bits8), str(mu),
                                  str(threads), part], capture_output=True, text=True, check=True).stdout
            samples[(tr, c, n)].append(json.loads(out))
    rows = []
    for (tr, c, n), runs in samples.items():
        ns = sorted(r["ns_median"] for r in runs)
        tsc = sorted(r["tsc_median"] for r in runs)
        q = statistics.quantiles(ns, n=4)
        med = statistics.median(ns)
        rows.append({"tree": tr, "case": c, "n": n, "ns_median": med, "ns_min": ns[0], "ns_iqr": q[2] - q[0],
                     "tsc_median": statistics.median(tsc), "cycles_median": med * clock["core_ghz"],
                     "bytes_per_elem": CASES[c][3], "part": CASES[c][4], "threads": runs[0]["threads"],
                     "rounds": len(runs)})
    for r in rows:  # per byte, relative to Adam8bit of the same tree and size: > 1 means cheaper per byte
        ref = next((x for x in rows if x["case"] == "adam8bit" and x["n"] == r["n"] and x["tree"] == r["tree"]), None)
        r["per_byte_vs_adam8bit"] = ((ref["ns_median"] / ref["bytes_per_elem"]) / (r["ns_median"] / r["bytes_per_elem"])
                                     if ref and r["bytes_per_elem"] else None)
        base = next((x for x in rows if x["tree"] == "base" and x["case"] == r["case"] and x["n"] == r["n"]), None)
        r["base_over_this"] = base["ns_median"] / r["ns_median"] if base and r["tree"] == "this" else None
    meta = {"cpu": _cpu(), "isa": os.environ.get("BNBCY_CPU_ISA") or "auto", "clock": clock,
            "base": str(args.base) if args.base else None,
            "load_before": load0, "load_after": os.getloadavg(), "threads": args.threads, "steps_per_round": args.steps,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    print(f"cpu: {meta['cpu']['model']} ({' '.join(meta['cpu']['flags'])}); core {clock['core_ghz']:.2f} GHz, "
          f"TSC {clock['tsc_ghz']:.3f} GHz; load {load0[0]:.1f}; steps on {args.threads} thread(s), pieces on one; "
          f"{args.rounds} interleaved rounds")
    print(f"{'tree':5s} {'case':15s} {'n':>9s} {'thr':>3s} {'ns/elem':>8s} {'min':>7s} {'IQR':>6s} {'TSC/elem':>9s} "
          f"{'cyc/elem':>9s} {'B/elem':>6s} {'per byte vs Adam8bit':>21s} {'base/this':>9s}")
    for r in rows:
        pb = "" if r["per_byte_vs_adam8bit"] is None else f"{r['per_byte_vs_adam8bit']:.2f}"
        bt = "" if r["base_over_this"] is None else f"{r['base_over_this']:.3f}"
        by = "" if r["bytes_per_elem"] is None else str(r["bytes_per_elem"])
        print(f"{r['tree']:5s} {r['case']:15s} {r['n']:9d} {r['threads']:3d} {r['ns_median']:8.3f} {r['ns_min']:7.3f} "
              f"{r['ns_iqr']:6.3f} {r['tsc_median']:9.2f} {r['cycles_median']:9.2f} {by:>6s} {pb:>21s} {bt:>9s}")
    decomposition = _decompose(rows, args.threads)
    for d in decomposition:
        print(f"{d['tree']} n={d['n']}: Adam8bit step {d['step_ns']:.3f} ns/elem; 2 x deq8 + 2 x rq8 + Adam32bit = "
              f"{2 * d['deq_ns']:.3f} + {2 * d['rq_ns']:.3f} + {d['rule_ns']:.3f} = {d['pieces_ns']:.3f} "
              f"({100 * d['pieces_ns'] / d['step_ns']:.0f}% of the step; lookups alone {d['lookups_ns']:.3f})")
    path = Path(args.json) if args.json else RESULTS / f"optim-cycles-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "optim_cycles", "meta": meta, "results": rows,
                                "decomposition": decomposition}, indent=1))
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
