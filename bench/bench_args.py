"""Cost of bnbcy's argument layer on small calls (CPU): what the hardening checks add per call.

One command (``python bench/bench_args.py [--repeats N]``) prints a table and writes JSON to
``bench/results/``. Cases, timed round by round interleaved (each round runs every case once, so
machine stalls hit all cases alike), medians with min and IQR in microseconds:

* ``view``: ``_C.view`` of a torch tensor (DLPack export, the neg/conj and NULL checks, the
  BNBCY_CPU_ISA change check);
* ``overlap4``: ``_arrays.check_no_overlap`` of 2 outputs against 2 inputs (what an op adds);
* ``overlap400``: the same for 200 outputs and 200 inputs (an optimizer group);
* ``quant_state``: ``check_quant_state`` of a nested 4-bit state (dequantize_4bit's check on use);
* ``kernel_only``: the CPU kernel on prepared views (4096 float32, blocksize 64);
* ``quantize_numpy``: the whole ``F.quantize_blockwise`` of the same array (NumPy: array layer,
  no torch op), so ``quantize_numpy - kernel_only`` is the complete argument-layer cost.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

from bnbcy import _C, _arrays  # noqa: E402
import bnbcy.functional as F  # noqa: E402
from bnbcy.functional.quant_state import check_quant_state  # noqa: E402


def _cases():
    t = torch.randn(4096)
    xs = np.random.default_rng(0).standard_normal(4096).astype(np.float32)
    out, am = np.empty(4096, np.uint8), np.empty(64, np.float32)
    v_in, v_out, v_am = _C.view(xs, "A"), _C.view(out, "out"), _C.view(am, "absmax")
    v_code = F.code_view(None, v_in)
    big_out = [_C.view(np.empty(64, np.float32), "p") for _ in range(200)]
    big_in = [_C.view(np.empty(64, np.float32), "g") for _ in range(200)]
    _, ps = F.quantize_4bit(torch.randn(64, 64), compress_statistics=True)
    return {
        "view": lambda: _C.view(t, "A"),
        "overlap4": lambda: _arrays.check_no_overlap(v_out, v_am, inputs=(v_in, v_code)),
        "overlap400": lambda: _arrays.check_no_overlap(*big_out, inputs=big_in),
        "quant_state": lambda: check_quant_state(ps, four_bit=True),
        "kernel_only": lambda: _C.cpu_quantize_blockwise(v_in, v_code, v_out, v_am, 64),
        "quantize_numpy": lambda: F.quantize_blockwise(xs, out=out, absmax=am, blocksize=64),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="rounds (every case once per round)")
    ap.add_argument("--inner", type=int, default=20, help="calls per timed sample")
    args = ap.parse_args()
    cases = _cases()
    for fn in cases.values():  # warm up
        for _ in range(50):
            fn()
    samples = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, fn in cases.items():
            t0 = time.perf_counter()
            for _ in range(args.inner):
                fn()
            samples[name].append((time.perf_counter() - t0) / args.inner * 1e6)
    meta = harness.collect_metadata("cpu")
    results = []
    print(f"CPU: {meta['cpu_model']}, {meta['cpu_count']} cores; {args.repeats} interleaved rounds of "
          f"{args.inner} calls; microseconds per call")
    print(f"{'case':<16}{'median':>10}{'min':>10}{'IQR':>16}")
    for name, s in samples.items():
        a = np.asarray(s)
        q1, med, q3 = np.percentile(a, [25, 50, 75])
        results.append({"case": name, "median_us": med, "min_us": a.min(), "q1_us": q1, "q3_us": q3,
                        "samples": len(a)})
        print(f"{name:<16}{med:>10.2f}{a.min():>10.2f}{q1:>8.2f}-{q3:<7.2f}")
    path = harness.write_json(harness.default_result_path(meta).with_name(
        "args-" + harness.default_result_path(meta).name), "bench_args", meta, results,
        config={"repeats": args.repeats, "inner": args.inner})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
