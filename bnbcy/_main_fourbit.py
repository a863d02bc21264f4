"""The 4-bit inference section of ``python -m bnbcy``: ``Linear4bit`` forward time against rows of
the input on the CPU, next to the dense bf16 ``nn.Linear`` and to bitsandbytes' ``Linear4bit``
when it is installed, and a plot of time against rows (matplotlib, optional).

The measurement core (:func:`make_layers`, :func:`interleaved`, :func:`summary`) is shared with
``bench/bench_fourbit.py``: every implementation is timed round by round in one interleaved loop,
each call on the next of several layers, so that all see the same machine state and, with
enough layers, read their weights from memory as in a model.
"""
from __future__ import annotations

import copy
import statistics
import time
from typing import Callable, Dict, List

import torch

IMPLS = ("bnbcy", "bitsandbytes", "dense")


def bitsandbytes_or_none():
    """``bitsandbytes`` when it imports (the reference; optional here), else None."""
    try:
        import bitsandbytes
    except Exception:  # not installed, or broken on this machine: compare without it
        return None
    return bitsandbytes


def make_layers(impl: str, K: int, N: int, count: int, dtype=torch.bfloat16, seed: int = 0) -> List[torch.nn.Module]:
    """``count`` eval-mode layers ``K -> N`` of ``impl`` (NF4, blocksize 64, double-quantized
    statistics, compute dtype ``dtype``; ``dense`` is a bf16 ``nn.Linear``); layer ``i`` has the
    same float weight for every implementation."""
    layers = []
    for i in range(count):
        W = torch.randn(N, K, generator=torch.Generator().manual_seed(seed + i)) * 0.02
        if impl == "dense":
            m = torch.nn.Linear(K, N, bias=False, dtype=torch.bfloat16)
            m.weight.data.copy_(W)
        else:
            lib = __import__("bnbcy" if impl == "bnbcy" else "bitsandbytes")
            m = lib.nn.Linear4bit(K, N, bias=False, compute_dtype=dtype, compress_statistics=True, quant_type="nf4")
            m.weight = lib.nn.Params4bit(W, requires_grad=False, compress_statistics=True, quant_type="nf4",
                                         module=m)
            m = m.cpu()
        layers.append(m.eval())
    return layers


def with_compute_dtype(layers, dtype):
    """Shallow copies of 4-bit ``layers`` (the same weights) computing in ``dtype``."""
    out = []
    for m in layers:
        c = copy.copy(m)
        c.compute_dtype = dtype
        out.append(c)
    return out


def rotating_call(layers, x, start: int = 0) -> Callable[[], torch.Tensor]:
    """A callable running ``layers[i](x)`` for the next ``i`` on every call, from ``start``
    (callables sharing layers start apart, so that one never reads weights another just left
    in the cache)."""
    state = {"i": start % len(layers)}

    def call():
        i = state["i"]
        state["i"] = (i + 1) % len(layers)
        return layers[i](x)
    return call


@torch.inference_mode()
def interleaved(fns: Dict[str, Callable[[], object]], repeats: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Seconds per call of each callable, timed round by round (one call of each per round).

    Each round starts one callable further on, so that none always runs after the same one (a
    fixed order let a call always follow, e.g., a dense layer that had just evicted the cache)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names = list(fns)
    times = {name: [] for name in fns}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def summary(ts: List[float]) -> dict:
    """Median, min and interquartile range (ms) of a list of seconds."""
    ms = sorted(t * 1e3 for t in ts)
    q = statistics.quantiles(ms, n=4) if len(ms) >= 2 else [ms[0]] * 3
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "iqr_ms": q[2] - q[0], "n": len(ms)}


def plot(rows, series: Dict[str, List[float]], title: str, path: str) -> str:
    """Write a log-log plot of time (ms) against rows; returns the path, or a reason it was not written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return "not written (matplotlib is not installed: pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(rows, ys, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("rows of the input")
    ax.set_ylabel("forward time, median (ms)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run(K: int = 2048, N: int = 5632, rows=(1, 4, 16, 64), layers: int = 2, repeats: int = 7,
        plot_path: str = "bnbcy_fourbit_rows.png") -> dict:
    """Print the table and write the plot; returns the medians (ms) per implementation."""
    bnb = bitsandbytes_or_none()
    impls = [i for i in IMPLS if i != "bitsandbytes" or bnb is not None]
    print(f"\n4-bit inference on the CPU: Linear4bit {K}->{N} (NF4, double-quantized statistics, bf16 input, "
          f"eval, {torch.get_num_threads()} threads), {layers} layers in rotation, medians of {repeats} "
          f"interleaved calls")
    built = {impl: make_layers(impl, K, N, layers) for impl in impls}
    header = f"{'rows':>5}  " + "  ".join(f"{(i + ' ms'):>16}" for i in impls) + \
             ("  bitsandbytes/bnbcy" if bnb is not None else "") + "  dense/bnbcy"
    print(header)
    print("-" * len(header))
    medians = {impl: [] for impl in impls}
    for M in rows:
        x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
        times = interleaved({impl: rotating_call(built[impl], x) for impl in impls}, repeats)
        med = {impl: summary(times[impl])["median_ms"] for impl in impls}
        for impl in impls:
            medians[impl].append(med[impl])
        ratio = f"  {med['bitsandbytes'] / med['bnbcy']:>18.2f}x" if bnb is not None else ""
        print(f"{M:>5}  " + "  ".join(f"{med[i]:>16.3f}" for i in impls) + ratio +
              f"  {med['dense'] / med['bnbcy']:>10.2f}x")
    where = plot(list(rows), medians, f"Linear4bit {K}->{N} forward, CPU ({torch.get_num_threads()} threads)",
                 plot_path)
    print(f"plot of time against rows: {where}")
    if bnb is None:
        print("(bitsandbytes is not installed: no comparison with it)")
    print("bench/bench_fourbit.py measures the same with weights beyond the L3 cache, 30+ rounds, "
          "and through transformers.")
    return medians
