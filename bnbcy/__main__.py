"""``python -m bnbcy``: what this build has, then a short quantization demo.

The demo quantizes an embedded, generated weight tensor (normal values with a
few large outliers, as in trained linear layers) with 8-bit blockwise
quantization, for each blocksize and dtype, on the CPU and (when available)
on the GPU, and prints memory before/after and the round-trip error.
"""
from __future__ import annotations

import argparse
import time

import torch

import bnbcy
from bnbcy import functional as F


def _weight(rows=1024, cols=1024, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    idx = torch.randint(0, w.numel(), (w.numel() // 1000,), generator=g)
    w.view(-1)[idx] *= 50.0  # sparse outliers make the blocksize matter
    return w


def _print_features(info):
    print(f"bnbcy {bnbcy.__version__}")
    print(f"  CPU kernels      : yes (OpenMP threads: {info['cpu_threads']})")
    archs = ", ".join("sm_" + a for a in info["fatbin_archs"]) or "none (NVRTC at first use)"
    print(f"  CUDA kernels     : {', '.join(info['cuda_modules'])}; shipped binaries: {archs}")
    print(f"  CuPy             : {info['cupy'] or 'not installed'}")
    if info["devices"]:
        for i, d in enumerate(info["devices"]):
            print(f"  GPU {i}            : {d['name']} (compute capability {d['compute_capability']})")
    else:
        print(f"  GPU              : none ({info['cuda_error']})")


def _demo(w, device, blocksizes, dtypes):
    rows = []
    for dtype in dtypes:
        x = w.to(device=device, dtype=dtype)
        ref = x.double()
        for bs in blocksizes:
            t0 = time.perf_counter()
            q, state = F.quantize_blockwise(x, blocksize=bs)
            y = F.dequantize_blockwise(q, state)
            if device != "cpu":
                torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3
            err = (y.double() - ref).abs()
            before = x.numel() * x.element_size()
            after = q.numel() + state.absmax.numel() * 4
            rel = (err.norm() / ref.norm()).item()
            rows.append((device, str(dtype).replace("torch.", ""), bs, before, after, err.max().item(), rel, ms))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bnbcy", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--blocksizes", default="64,256,1024,4096")
    args = ap.parse_args(argv)

    info = bnbcy.features()
    _print_features(info)
    w = _weight(args.rows, args.cols)
    blocksizes = [int(b) for b in args.blocksizes.split(",")]
    dtypes = [torch.float32, torch.float16, torch.bfloat16]
    devices = ["cpu"] + (["cuda"] if info["devices"] and torch.cuda.is_available() else [])

    print(f"\n8-bit blockwise quantization of a generated {args.rows}x{args.cols} weight "
          f"(N(0, 0.02) with 0.1% outliers x50)")
    header = f"{'device':6}  {'dtype':8}  {'block':>5}  {'bytes before':>12}  {'bytes after':>11}  " \
             f"{'ratio':>5}  {'max abs err':>11}  {'rel L2 err':>10}  {'ms':>7}"
    print(header)
    print("-" * len(header))
    for device in devices:
        for dev, dt, bs, before, after, emax, rel, ms in _demo(w, device, blocksizes, dtypes):
            print(f"{dev:6}  {dt:8}  {bs:>5}  {before:>12,}  {after:>11,}  {before / after:>5.2f}  "
                  f"{emax:>11.3e}  {rel:>10.3e}  {ms:>7.2f}")
    print("\nrel L2 err = ||dequant(quant(W)) - W|| / ||W||, against the float64 weight.")


if __name__ == "__main__":
    main()
