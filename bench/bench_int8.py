"""Benchmark LLM.int8(): int8 GEMM and the Linear8bitLt forward, bnbcy vs bitsandbytes vs torch.

Usage::

    python bench/bench_int8.py                   # CPU: 128x4096x4096 int8 GEMM, Linear8bitLt 4096->4096
    python bench/bench_int8.py --repeats 5       # quicker
    python bench/bench_int8.py --device cuda     # GPU sweep (below)

Operations (``--ops``):

* ``gemm``: ``int8_linear_matmul(A, B)``, ``A [M, K]``, ``B [N, K]`` int8, exact int32.
  ``torch`` is ``torch._int_mm(A, B.t())`` (the library routine both libraries can use).
  On CUDA, bnbcy's raw tensor-core kernel is measured too (``bnbcy-raw`` in the case
  name, forced with ``BNBCY_INT8_GEMM=raw``), to compare it with cuBLAS.
* ``linear``: the forward of an inference ``Linear8bitLt(K, N, has_fp16_weights=False,
  threshold=6.0)`` (eval mode, weights quantized) on ``x [M, K]`` with a few outlier
  feature columns; ``torch`` is the dense ``nn.Linear`` in the same 16-bit dtype.

Cases: CPU gemm 128x4096x4096, linear M=128 K=N=4096 bf16 (bitsandbytes' CPU
path also starts from float16 activations). CUDA: gemm 4096^3 and M in 1, 16, 128,
1024, 4096 for (K, N) in (4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096),
(14336, 4096); linear M in 1, 16, 128, 1024, 4096 at 4096->4096 and 4096->14336 fp16.

Bars: CPU gemm >= 1.0x bitsandbytes; linear (threshold 6.0) >= 1.0x bitsandbytes.
GPU: raw kernel >= 70% of cuBLAS int8 throughput; linear >= 1.5x bitsandbytes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import harness  # noqa: E402
from harness import Bar, Case  # noqa: E402

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LIBS = {"bnbcy": "bnbcy", "bitsandbytes": "bitsandbytes"}
OPS = ("gemm", "linear")
OUTLIER_COLS = (7, 1000, 2047)


def load_lib(impl: str):
    """The library, imported once: ``(module, None)`` or ``(None, reason)``."""
    mod, reason = harness.load_module(LIBS[impl], ("functional", "nn"))
    if mod is not None and not (hasattr(mod.functional, "int8_linear_matmul") and hasattr(mod.nn, "Linear8bitLt")):
        return None, f"{LIBS[impl]} has no int8_linear_matmul / nn.Linear8bitLt"
    return mod, reason


def _lib(impl):
    return harness.require(load_lib(impl))


# ------------------------------------------------------------------------------------------- gemm
def bind_gemm(impl, raw=False):
    def bind(inputs):
        A, B = inputs
        if impl == "torch":
            Bt = B.t()
            return lambda: torch._int_mm(A, Bt)
        F = _lib(impl).functional
        if raw:
            import os

            def call():  # the route is read per call
                os.environ["BNBCY_INT8_GEMM"] = "raw"
                try:
                    return F.int8_linear_matmul(A, B)
                finally:
                    os.environ["BNBCY_INT8_GEMM"] = ""
            return call
        return lambda: F.int8_linear_matmul(A, B)
    return bind


def check_gemm(ref, out):
    ok = bool(torch.equal(ref.cpu(), out.cpu()))
    return {"ok": ok, "exact": ok}


# ----------------------------------------------------------------------------------------- linear
def bind_linear(impl, K, N, dtype, device):
    def bind(inputs):
        x, W, bias = inputs
        if impl == "torch":
            lin = torch.nn.Linear(K, N, device=device, dtype=dtype)
            with torch.no_grad():
                lin.weight.copy_(W)
                lin.bias.copy_(bias)
            lin.eval()
        else:
            nn = _lib(impl).nn
            lin = nn.Linear8bitLt(K, N, bias=True, has_fp16_weights=False, threshold=6.0)
            with torch.no_grad():
                lin.weight = nn.Int8Params(W.to(torch.float16).cpu(), requires_grad=False,
                                           has_fp16_weights=False)
                lin.bias = torch.nn.Parameter(bias.to(dtype).cpu(), requires_grad=False)
            lin = lin.to(device)
            lin.eval()

        def call():
            with torch.no_grad():
                return lin(x)
        return call
    return bind


def check_linear(ref, out):
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return {"ok": err < 5e-2, "rel_l2_vs_dense": err}


# ------------------------------------------------------------------------------------------ cases
def make_cases(device, ops, impls, seed, rotate, gemm_shapes, linear_shapes, dtype):
    g = torch.Generator(device="cpu").manual_seed(seed)
    if "gemm" in ops:
        for M, K, N in gemm_shapes:
            def setup(M=M, K=K, N=N):
                A = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g).to(device)
                B = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g).to(device)
                return A, B
            binders = {i: bind_gemm(i) for i in impls}
            names = [("", binders)]
            if device == "cuda" and "bnbcy" in impls:
                names.append((" raw", {"bnbcy": bind_gemm("bnbcy", raw=True), "torch": bind_gemm("torch")}))
            for suffix, b in names:
                yield Case(name=f"gemm{suffix} {M}x{K}x{N}", params={"op": "gemm" + suffix.replace(" ", "-"),
                                                                    "M": M, "K": K, "N": N},
                           nbytes=M * K + N * K + 4 * M * N, setup=setup, impls=b, device=device,
                           rotate=rotate, reference="torch", check=check_gemm)
    if "linear" in ops:
        for M, K, N in linear_shapes:
            def setup(M=M, K=K, N=N):
                x = torch.randn(M, K, generator=g)
                x[:, [c for c in OUTLIER_COLS if c < K]] *= 20  # outlier features above the threshold
                W = torch.randn(N, K, generator=g) / K ** 0.5
                bias = torch.randn(N, generator=g)
                return x.to(device, dtype), W.to(device, dtype), bias.to(device, dtype)
            yield Case(name=f"linear t=6 {M}x{K}->{N} {str(dtype).replace('torch.', '')}",
                       params={"op": "linear", "M": M, "K": K, "N": N},
                       nbytes=M * K * dtype.itemsize + N * K + 4 * N + M * N * dtype.itemsize,
                       setup=setup, impls={i: bind_linear(i, K, N, dtype, device) for i in impls},
                       device=device, rotate=rotate, reference="torch", check=check_linear)


def make_bars(device, threads):
    is_op = lambda op: (lambda r: r["params"]["op"] == op)  # noqa: E731
    if device == "cuda":
        return [
            Bar("GPU raw int8 kernel >= 70% of cuBLAS (torch._int_mm)", is_op("gemm-raw"),
                lambda r: (r["impls"]["torch"]["median_ms"] / r["impls"]["bnbcy"]["median_ms"])
                if r["impls"].get("bnbcy", {}).get("status") == "ok"
                and r["impls"].get("torch", {}).get("status") == "ok" else None, 0.7),
            Bar("GPU Linear8bitLt (threshold 6.0) >= 1.5x bitsandbytes", is_op("linear"),
                harness.ratio_metric("bitsandbytes"), 1.5),
        ]
    note = "" if threads == 2 else f" [bar is defined for 2 cores; this run: {threads} threads]"
    return [
        Bar("CPU int8_linear_matmul >= 1.0x bitsandbytes" + note, is_op("gemm"),
            harness.ratio_metric("bitsandbytes"), 1.0),
        Bar("CPU Linear8bitLt forward (threshold 6.0) >= 1.0x bitsandbytes" + note, is_op("linear"),
            harness.ratio_metric("bitsandbytes"), 1.0),
    ]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=list(OPS), help="gemm linear")
    p.add_argument("--dtype", default=None, help="linear dtype (default bfloat16 on cpu, float16 on cuda)")
    p.add_argument("--size", type=int, default=4096, help="replaces 4096 in the CPU shapes (quick runs)")
    harness.add_common_args(p, repeats=20, warmup=3)
    args = p.parse_args(argv)
    harness.check_common_args(p, args)
    args.ops = harness.list_arg(args.ops, str)
    if any(o not in OPS for o in args.ops):
        p.error(f"unknown op(s); choose from {list(OPS)}")
    args.dtype = DTYPES[args.dtype or ("float16" if args.device == "cuda" else "bfloat16")]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    s = args.size
    if args.device == "cuda":
        feats = [(4096, 4096), (4096, 11008), (4096, 14336), (11008, 4096), (14336, 4096)]
        gemm_shapes = [(4096, 4096, 4096)] + [(M, K, N) for M in (1, 16, 128, 1024, 4096) for K, N in feats
                                               if (M, K, N) != (4096, 4096, 4096)]
        linear_shapes = [(M, 4096, N) for M in (1, 16, 128, 1024, 4096) for N in (4096, 14336)]
    else:
        gemm_shapes = [(128, s, s)]
        linear_shapes = [(128, s, s)]
    config = {"ops": args.ops, "gemm_shapes": gemm_shapes, "linear_shapes": linear_shapes,
              "dtype": str(args.dtype).replace("torch.", ""), "threshold": 6.0,
              "outlier_cols": list(OUTLIER_COLS)}
    rc = harness.run_benchmark(
        "int8", args,
        lambda impls: make_cases(args.device, args.ops, impls, args.seed, args.rotate, gemm_shapes,
                                 linear_shapes, args.dtype),
        make_bars, config, load_lib)
    if args.device == "cuda" and not args.no_json:
        write_routes(harness.LAST_RESULTS)
    return rc


def routes_from_results(results):
    """[[M_max, route], ..., [None, route]]: per M, the faster of bnbcy's raw kernel and cuBLAS
    (torch._int_mm), summed over the measured (K, N) shapes."""
    totals = {}
    for r in results:
        if r["params"]["op"] != "gemm-raw":
            continue
        raw, cub = r["impls"].get("bnbcy", {}), r["impls"].get("torch", {})
        if raw.get("status") != "ok" or cub.get("status") != "ok":
            continue
        t = totals.setdefault(r["params"]["M"], [0.0, 0.0])
        t[0] += raw["median_ms"]
        t[1] += cub["median_ms"]
    rows = [[M, "raw" if t[0] < t[1] else "cublas"] for M, t in sorted(totals.items())]
    if rows:
        rows[-1][0] = None  # the largest measured M covers everything above
    return rows


def write_routes(results):
    """Write bench/results/int8-routes-sm_XY.json in the format of bnbcy's int8_gemm_routes.json."""
    import json
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}"
    rows = routes_from_results(results)
    path = Path(__file__).resolve().parent / "results" / f"int8-routes-{arch}.json"
    path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "routes": {arch: rows}}, indent=1))
    print(f"int8 GEMM routes for {arch}: {rows} -> {path} (copy into bnbcy/functional/int8_gemm_routes.json)")


if __name__ == "__main__":
    sys.exit(main())
