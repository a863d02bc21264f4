"""Cost of the op layer: a torch call through ``torch.ops.bnbcy.<op>`` (dispatcher, schema
parsing, the CompositeExplicitAutograd kernel) against the same array-level function called
directly (``bnbcy.backends.*``: the one validation and the kernel, no dispatcher), on small
CPU workloads where a per-call overhead shows.

Usage::

    python bench/bench_dispatch.py                 # prints a table, writes bench/results/dispatch-*.json
    python bench/bench_dispatch.py --repeats 60

Method: per case, the two paths alternate round by round (``--repeats`` rounds); a round times
``--calls`` back-to-back calls of one path and records the mean per call. Reported: the median
over rounds, the minimum and the inter-quartile range, in microseconds; the overhead is the
difference of the medians. The CPU model and flags are recorded with the results.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

import bnbcy
import bnbcy.functional as F
from bnbcy.backends import blockwise as BW, fourbit as FB, int8 as I8

RESULTS = Path(__file__).resolve().parent / "results"


def _cpu():
    info = {"machine": platform.machine(), "model": "", "flags": []}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not info["model"]:
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not info["flags"]:
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(f for f in flags if f.startswith(("avx", "fma", "f16c", "amx")))
    except OSError:
        pass
    info["isa"] = bnbcy._C.cpu_isa()
    info["threads"] = torch.get_num_threads()
    return info


def _cases():
    g = torch.Generator().manual_seed(0)
    x4k = torch.randn(4096, generator=g)
    code = F.create_dynamic_map()
    W = torch.randn(1024, 1024, generator=g).to(torch.bfloat16)
    q, st = F.quantize_4bit(W, quant_type="nf4", compress_statistics=True)
    A1 = torch.randn(1, 1024, generator=g).to(torch.bfloat16)
    nested = (st.state2.absmax, 64, "nf4", None, st.absmax, st.state2.code, st.offset)
    a16 = torch.randn(1, 1024, generator=g).half()
    return {
        "quantize_blockwise n=4096 fp32": (
            lambda: torch.ops.bnbcy.quantize_blockwise.default(x4k, code, 256),
            lambda: BW.quantize_blockwise(x4k, code, 256)),
        "gemm_4bit 1x1024 @ nf4[1024,1024] bf16 nested": (
            lambda: torch.ops.bnbcy.gemm_4bit.default(A1, q, [1024, 1024], nested[0], 64, "nf4", None,
                                                      nested[4], nested[5], nested[6]),
            lambda: FB.gemm_4bit(A1, q, (1024, 1024), nested[0], 64, "nf4", None, nested[4], nested[5],
                                 nested[6])),
        "int8_vectorwise_quant 1x1024 fp16": (
            lambda: torch.ops.bnbcy.int8_vectorwise_quant.default(a16, 0.0),
            lambda: I8.int8_vectorwise_quant(a16, 0.0)),
    }


def _stats(xs):
    xs = sorted(xs)
    q1, _, q3 = statistics.quantiles(xs, n=4)
    return {"median_us": statistics.median(xs), "min_us": xs[0], "iqr_us": q3 - q1}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--calls", type=int, default=50)
    args = ap.parse_args(argv)
    results = {}
    for name, (via_op, direct) in _cases().items():
        for fn in (via_op, direct):   # warm up both
            for _ in range(20):
                fn()
        samples = {"op": [], "direct": []}
        for _ in range(args.repeats):
            for label, fn in (("op", via_op), ("direct", direct)):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                samples[label].append((time.perf_counter() - t0) / args.calls * 1e6)
        row = {label: _stats(v) for label, v in samples.items()}
        row["overhead_us"] = row["op"]["median_us"] - row["direct"]["median_us"]
        row["samples_us"] = samples
        results[name] = row
        print(f"{name:48s} op {row['op']['median_us']:8.1f} us (min {row['op']['min_us']:.1f}, IQR "
              f"{row['op']['iqr_us']:.1f})  direct {row['direct']['median_us']:8.1f} us (min "
              f"{row['direct']['min_us']:.1f}, IQR {row['direct']['iqr_us']:.1f})  overhead "
              f"{row['overhead_us']:+.1f} us")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = {"bench": "dispatch", "time": stamp, "commit": commit, "torch": torch.__version__, "cpu": _cpu(),
           "repeats": args.repeats, "calls_per_round": args.calls, "results": results}
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"dispatch-{stamp}-{commit or 'nogit'}.json"
    path.write_text(json.dumps(out, indent=1))
    print(f"cpu: {out['cpu']['model']} ({out['cpu']['isa']}, {out['cpu']['threads']} threads) -> {path}")


if __name__ == "__main__":
    main()
