"""Per-step Python overhead of the optimizer updates: validation, views and dispatch around
kernels that have almost nothing to do (200 tensors of 256 elements; a single 256-element
functional call), with torch's own Adam on the same 200 tensors for scale.

Usage::

    python bench/bench_optim_overhead.py                      # this tree
    python bench/bench_optim_overhead.py --base /tmp/old-tree # interleaved against another tree

``--base`` is a checkout of another commit with its extension built (or the same ``_C`` copied
in when ``pyx/`` did not change): e.g. ``git archive 089ea9c | tar -x -C /tmp/old-tree`` and
copy ``bnbcy/_C*.so``. Each tree runs in its own worker process (one interpreter per tree); the
workers are driven round by round, alternating, so a stall of the shared machine hits both
alike; a round runs every case once (in both trees), so slow drifts of the machine hit all
cases alike too. A round times ``--calls`` back-to-back steps and records the mean per step. Reported per
case and tree: median over ``--repeats`` rounds, minimum and inter-quartile range, in
microseconds, and the ratio of the medians. ``torch_Adam_fused_200x256`` /
``torch_Adam_foreach_200x256`` are ``torch.optim.Adam(fused=True)`` / ``(foreach=True)`` on the same
tensors (the same torch in both trees); the ``/torch`` lines give bnbcy's Adam steps over torch's
fused one, round by round in the same worker. ``Adam8bit_200x256_newgrads`` gives every step fresh
gradient tensors, as ``zero_grad(set_to_none=True)`` and ``backward`` do (the gradients are then
checked every step). ``--gc`` keeps the garbage collector on while timing (off by default).
Writes ``bench/results/optim-overhead-*.json`` with the CPU model, ISA path, thread count and load
average.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CASES = ("Adam32bit_200x256", "Adam8bit_200x256", "AdEMAMix8bit_200x256", "Adam8bit_200x256_newgrads",
         "torch_Adam_fused_200x256", "torch_Adam_foreach_200x256", "update_32bit_adam_256", "update_8bit_adam_256")
TORCH_REF = "torch_Adam_fused_200x256"
VS_TORCH = ("Adam32bit_200x256", "Adam8bit_200x256")


def _cases():
    import torch
    import bnbcy.functional as F
    import bnbcy.optim as O
    g = torch.Generator().manual_seed(0)

    def model(cls, new_grads=False, **kw):
        ps = [torch.nn.Parameter(torch.randn(256, generator=g)) for _ in range(200)]
        grads = [[torch.randn(256, generator=g) * 1e-2 for _ in ps] for _ in range(2)]
        for p, gr in zip(ps, grads[0]):
            p.grad = gr
        opt = cls(ps, **kw)
        opt.step()
        if not new_grads:
            return opt.step
        turn = [0]

        def step():                       # other gradient tensors than the last step's
            turn[0] ^= 1
            for p, gr in zip(ps, grads[turn[0]]):
                p.grad = gr
            opt.step()
        return step

    p, gr = torch.randn(256, generator=g), torch.randn(256, generator=g)
    s1, s2 = torch.zeros(256), torch.zeros(256)
    q1 = F.create_dynamic_map(signed=True)
    q2 = F.create_dynamic_map(signed=False)
    c1, c2 = torch.zeros(256, dtype=torch.uint8), torch.zeros(256, dtype=torch.uint8)
    a1, a2 = torch.zeros(1), torch.zeros(1)
    return {
        "Adam32bit_200x256": model(O.Adam32bit),
        "Adam8bit_200x256": model(O.Adam8bit, min_8bit_size=0),
        "AdEMAMix8bit_200x256": model(O.AdEMAMix8bit, min_8bit_size=0),
        "Adam8bit_200x256_newgrads": model(O.Adam8bit, new_grads=True, min_8bit_size=0),
        "torch_Adam_fused_200x256": model(torch.optim.Adam, fused=True),
        "torch_Adam_foreach_200x256": model(torch.optim.Adam, foreach=True),
        "update_32bit_adam_256": lambda: F.optimizer_update_32bit("adam", gr, p, s1, 0.9, 1e-8, 3, 1e-3, state2=s2,
                                                                  beta2=0.999),
        "update_8bit_adam_256": lambda: F.optimizer_update_8bit_blockwise(
            "adam", gr, p, c1, c2, 0.9, 0.999, 0.0, 0.0, 1e-8, 3, 1e-3, q1, q2, a1, a2),
    }


def worker(keep_gc=False):
    """Read ``case calls`` lines; answer the mean seconds per call of each."""
    import gc
    import torch
    import bnbcy
    torch.set_num_threads(1)
    cases = _cases()
    print(json.dumps({"ready": bnbcy.__file__, "isa": bnbcy._C.cpu_isa()}), flush=True)
    for line in sys.stdin:
        name, calls = line.split()
        fn = cases[name]
        if not keep_gc:
            gc.disable()
        t0 = time.perf_counter()
        for _ in range(int(calls)):
            fn()
        dt_ = (time.perf_counter() - t0) / int(calls)
        gc.enable()
        print(json.dumps({"s": dt_}), flush=True)


def _spawn(tree, keep_gc):
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker"] + (["--gc"] if keep_gc else [])
    proc = subprocess.Popen(cmd, cwd=str(tree), env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    info = json.loads(proc.stdout.readline())
    return proc, info


def _ask(proc, name, calls):
    proc.stdin.write(f"{name} {calls}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())["s"]


def _stats(xs):
    xs = sorted(x * 1e6 for x in xs)
    q = statistics.quantiles(xs, n=4)
    return {"median_us": statistics.median(xs), "min_us": xs[0], "iqr_us": q[2] - q[0], "n": len(xs)}


def _cpu():
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"model": model, "machine": platform.machine(), "cores": os.cpu_count()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--base", type=Path, help="another tree to interleave with this one")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--cases", nargs="*", default=list(CASES))
    ap.add_argument("--gc", action="store_true", help="keep the garbage collector on while timing")
    args = ap.parse_args()
    if args.worker:
        worker(args.gc)
        return
    trees = {"this": HERE.parent}
    if args.base:
        trees["base"] = args.base.resolve()
    procs = {k: _spawn(t, args.gc) for k, t in trees.items()}
    load0 = os.getloadavg()
    samples = {c: {k: [] for k in trees} for c in args.cases}
    for c in args.cases:
        for k in trees:                               # warm-up
            _ask(procs[k][0], c, args.calls)
    for r in range(args.repeats):
        order = list(trees) if r % 2 == 0 else list(reversed(trees))
        for c in args.cases:
            for k in order:
                samples[c][k].append(_ask(procs[k][0], c, args.calls))
    for proc, _ in procs.values():
        proc.stdin.close()
        proc.wait()
    results = []
    print(f"CPU: {_cpu()['model']}  isa={procs['this'][1]['isa']}  load average {load0}")
    print(f"{'case':26s} " + " ".join(f"{k + ' median (min, IQR) us':>34s}" for k in trees) + "   this/base")
    for c in args.cases:
        st = {k: _stats(samples[c][k]) for k in trees}
        ratio = st["this"]["median_us"] / st["base"]["median_us"] if "base" in st else None
        results.append({"case": c, **{k: v for k, v in st.items()}, "ratio_this_over_base": ratio})
        cells = " ".join(f"{v['median_us']:14.1f} ({v['min_us']:8.1f}, {v['iqr_us']:7.1f})" for v in st.values())
        print(f"{c:26s} {cells}   {'' if ratio is None else f'{ratio:.3f}'}")
    vs_torch = {}
    if TORCH_REF in samples:
        for c in VS_TORCH:
            if c not in samples:
                continue
            # per round, in the same worker: bnbcy's step over torch's fused step
            vs_torch[c] = {k: statistics.median(a / b for a, b in zip(samples[c][k], samples[TORCH_REF][k]))
                           for k in trees}
            print(f"{c + ' / torch fused':38s} " + "  ".join(f"{k} {v:.2f}x" for k, v in vs_torch[c].items()))
    RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"optim-overhead-{stamp}.json"
    meta = {"cpu": _cpu(), "isa": procs["this"][1]["isa"], "trees": {k: str(v) for k, v in trees.items()},
            "load_before": load0, "load_after": os.getloadavg(), "repeats": args.repeats, "calls": args.calls,
            "threads_env": os.environ.get("OMP_NUM_THREADS"), "gc": args.gc}
    out.write_text(json.dumps({"benchmark": "optim_overhead", "meta": meta, "results": results,
                               "over_torch_fused": vs_torch}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
