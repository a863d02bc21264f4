"""Benchmark 8-bit blockwise quantize / dequantize: bnbcy vs bitsandbytes vs torch.

Usage::

    python bench/bench_blockwise.py                       # CPU, 16M float32, blocksize 4096
    python bench/bench_blockwise.py --repeats 5           # quicker
    python bench/bench_blockwise.py --device cuda         # GPU sweep (n 16M, 256M; bs 64, 256, 4096;
                                                          #   float32, float16, bfloat16)
    python bench/bench_blockwise.py --device cuda --n 16M --blocksizes 4096 --dtypes float16

Every implementation is called through its public API exactly as a user would
call it (``quantize_blockwise(A, blocksize=bs)`` and
``dequantize_blockwise(q, state)`` with the library's own quantize output), so
allocation of the outputs is part of the measured time for all of them.

The ``torch`` column is a plain-PyTorch implementation written here, the
"what you would write without a library" baseline: blockwise absmax scaling
and nearest code via ``torch.bucketize`` on the code midpoints; dequantize as
a code lookup times the per-block absmax, reshape-based.

Bars from the issue (printed as PASS/FAIL/N/A lines, ``--strict`` makes FAIL
the exit status):

* CPU (defined for 2 cores): bnbcy quantize >= 5x and dequantize >= 3x faster
  than bitsandbytes.
* CUDA: bnbcy >= 1.0x bitsandbytes and >= 70% of the device copy bandwidth,
  for both operations, in every case of the sweep.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import harness  # noqa: E402
from harness import Bar, Case, ImplUnavailable  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
LIB_MODULES = {"bnbcy": "bnbcy.functional", "bitsandbytes": "bitsandbytes.functional"}

#: A quantize output may differ from the reference in this fraction of bytes
#: before the check fails: bitsandbytes' code search is not exactly "nearest"
#: (about 0.2% of randn values land one or a few codes away from the nearest
#: one), so an exact-nearest implementation legitimately differs a little.
MAX_MISMATCH_FRACTION = 0.01


# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------


def load_functional(impl: str):
    """``<impl>.functional``, imported once: ``(module, None)`` or ``(None, reason)``."""
    return harness.load_module(LIB_MODULES[impl], ("quantize_blockwise", "dequantize_blockwise"))


def _functional(impl: str):
    return harness.require(load_functional(impl))


def dynamic_map() -> torch.Tensor:
    """The default 8-bit "dynamic" code (256 sorted float32 values) for the torch baseline.

    The map is data (identical in both libraries, bit for bit); it is taken from
    bitsandbytes, the reference, or from bnbcy when bitsandbytes is absent.
    """
    for impl in ("bitsandbytes", "bnbcy"):
        mod, _ = load_functional(impl)
        if mod is not None and hasattr(mod, "create_dynamic_map"):
            return mod.create_dynamic_map().float().cpu()
    raise ImplUnavailable("neither bitsandbytes nor bnbcy is importable for the code map")


class TorchBlockwise:
    """Plain-PyTorch blockwise 8-bit quantization (the ``torch`` baseline).

    Parameters
    ----------
    device : str
        Where the code table lives.
    """

    def __init__(self, device: str):
        code = dynamic_map()
        assert bool((code[1:] >= code[:-1]).all()), "bucketize needs a sorted code"
        self.code = code.to(device)
        # Nearest code == bucket among the midpoints between neighbouring codes.
        self.mids = ((code[1:] + code[:-1]) / 2).to(device)

    def quantize(self, A: torch.Tensor, blocksize: int):
        """Return ``(q uint8 shaped like A, absmax float32 [nblocks])``."""
        flat = A.reshape(-1)
        n = flat.numel()
        nblocks = -(-n // blocksize)
        if nblocks * blocksize != n:  # zero padding leaves the last block's absmax unchanged
            flat = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
        blocks = flat.view(nblocks, blocksize).float()
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        idx = torch.bucketize(scaled, self.mids, out_int32=True)
        q = idx.to(torch.uint8).view(-1)[:n].view(A.shape)
        return q, absmax

    def dequantize(self, q: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                   dtype: torch.dtype) -> torch.Tensor:
        """Return ``code[q] * absmax[block]`` in ``dtype``, shaped like ``q``."""
        # index_select takes int32 indices; a uint8 tensor used as an index
        # would be interpreted as a boolean mask.
        vals = self.code.index_select(0, q.reshape(-1).int())
        n = vals.numel()
        nblocks = absmax.numel()
        if nblocks * blocksize != n:
            vals = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n))
        out = (vals.view(nblocks, blocksize) * absmax.unsqueeze(1)).to(dtype)
        return out.view(-1)[:n].view(q.shape)


# --------------------------------------------------------------------------
# Binders: inputs -> zero-arg callable (all preparation happens here)
# --------------------------------------------------------------------------


def bind_quantize(impl: str, blocksize: int, torch_impl: TorchBlockwise):
    if impl == "torch":
        return lambda A: (lambda: torch_impl.quantize(A, blocksize))

    def bind(A):
        F = _functional(impl)
        return lambda: F.quantize_blockwise(A, blocksize=blocksize)
    return bind


def bind_dequantize(impl: str, blocksize: int, torch_impl: TorchBlockwise):
    if impl == "torch":
        def bind_torch(A):
            q, absmax = torch_impl.quantize(A, blocksize)
            return lambda: torch_impl.dequantize(q, absmax, blocksize, A.dtype)
        return bind_torch

    def bind(A):
        F = _functional(impl)
        # Each library dequantizes its own quantize output, i.e. the usual round trip.
        q, state = F.quantize_blockwise(A, blocksize=blocksize)
        return lambda: F.dequantize_blockwise(q, state)
    return bind


def bind_dequantize_out(impl: str, blocksize: int, torch_impl: TorchBlockwise):
    """Dequantize into a preallocated ``out=``: the kernel alone, without the
    first-touch page faults of a fresh output (which dominate on some VMs)."""
    if impl == "torch":
        def bind_torch(A):
            q, absmax = torch_impl.quantize(A, blocksize)
            n = q.numel()
            if n % blocksize or A.dtype != torch.float32:
                raise ImplUnavailable("torch out= baseline needs float32 and whole blocks")
            out = torch.empty_like(A)
            idx = q.reshape(-1).int()
            return lambda: torch.mul(torch_impl.code.index_select(0, idx).view(-1, blocksize),
                                     absmax.unsqueeze(1), out=out.view(-1, blocksize))
        return bind_torch

    def bind(A):
        F = _functional(impl)
        q, state = F.quantize_blockwise(A, blocksize=blocksize)
        out = torch.empty_like(A)
        try:
            F.dequantize_blockwise(q, state, out=out)
        except NotImplementedError as exc:  # bitsandbytes' CPU backend has no out= form
            raise ImplUnavailable(f"out= not supported: {str(exc).splitlines()[0][:120]}") from exc
        return lambda: F.dequantize_blockwise(q, state, out=out)
    return bind


# --------------------------------------------------------------------------
# Output checks (against bitsandbytes)
# --------------------------------------------------------------------------


def _q_absmax(out):
    """Split a quantize output ``(q, QuantState)`` or ``(q, absmax)``."""
    q, st = out
    absmax = st.absmax if hasattr(st, "absmax") else st
    return q, absmax


def check_quantize(ref, out) -> dict:
    """Compare quantize outputs: dtype/shape, fraction of differing bytes, absmax."""
    rq, ra = _q_absmax(ref)
    q, a = _q_absmax(out)
    res = {"q_dtype": str(q.dtype), "q_shape": list(q.shape), "absmax_shape": list(a.shape)}
    if q.dtype != rq.dtype or q.shape != rq.shape or a.numel() != ra.numel():
        res.update(ok=False, error=f"expected q {rq.dtype} {list(rq.shape)}, absmax {list(ra.shape)}")
        return res
    frac = (q != rq).sum().item() / max(1, q.numel())
    ra32, a32 = ra.float().reshape(-1), a.float().reshape(-1)
    rel = ((a32 - ra32).abs().max() / ra32.abs().max().clamp_min(1e-30)).item()
    res.update(q_mismatch_fraction=frac, absmax_max_rel_diff=rel,
               ok=frac <= MAX_MISMATCH_FRACTION and rel <= 1e-6)
    return res


def check_dequantize(ref: torch.Tensor, out: torch.Tensor) -> dict:
    """Compare dequantize outputs: dtype/shape, fraction differing, max difference."""
    res = {"dtype": str(out.dtype), "shape": list(out.shape)}
    if out.dtype != ref.dtype or out.shape != ref.shape:
        res.update(ok=False, error=f"expected {ref.dtype} {list(ref.shape)}")
        return res
    frac = (out != ref).sum().item() / max(1, out.numel())
    diff = (out.float() - ref.float()).abs().max().item()
    scale = ref.float().abs().max().item()
    res.update(mismatch_fraction=frac, max_abs_diff=diff,
               max_rel_diff=diff / scale if scale else diff,
               ok=frac <= MAX_MISMATCH_FRACTION)
    return res


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


def fmt_n(n: int) -> str:
    """16777216 -> '16M' (binary multiples), other sizes verbatim."""
    for shift, unit in ((30, "G"), (20, "M"), (10, "K")):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def parse_n(text: str) -> int:
    """'16777216', '16M', '256M', '1G' (binary multiples) -> int."""
    t = text.strip().upper()
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def make_cases(device: str, ns, blocksizes, dtypes, ops, impls, seed: int, rotate: Optional[int]):
    """Yield the cases lazily so only one case's inputs are alive at a time."""
    torch_impl = TorchBlockwise(device)
    binders = {"quantize": bind_quantize, "dequantize": bind_dequantize,
               "dequantize-out": bind_dequantize_out}
    checks = {"quantize": check_quantize, "dequantize": check_dequantize,
              "dequantize-out": check_dequantize}
    for op in ops:
        for dtype in dtypes:
            for n in ns:
                for bs in blocksizes:
                    nblocks = -(-n // bs)
                    itemsize = torch.empty((), dtype=dtype).element_size()
                    # quantize: read n*itemsize, write n codes + nblocks float32 absmax;
                    # dequantize: the reverse.
                    nbytes = n * itemsize + n + 4 * nblocks

                    def setup(n=n, dtype=dtype):
                        # Fresh input per case, same values every run.
                        gen = torch.Generator(device=device).manual_seed(seed)
                        return torch.randn(n, generator=gen, device=device, dtype=dtype)

                    yield Case(
                        name=f"{op} {DTYPE_SHORT[dtype]} bs={bs} n={fmt_n(n)}",
                        params={"op": op, "n": n, "blocksize": bs, "dtype": str(dtype).replace("torch.", ""),
                                "nblocks": nblocks, "seed": seed},
                        nbytes=nbytes, setup=setup, device=device, rotate=rotate,
                        impls={name: binders[op](name, bs, torch_impl) for name in impls},
                        reference="bitsandbytes", check=checks[op])


def make_bars(device: str, threads: int):
    is_op = lambda op: (lambda r: r["params"]["op"] == op)  # noqa: E731
    if device == "cuda":
        return [
            Bar("GPU quantize: bnbcy >= 1.0x bitsandbytes", is_op("quantize"),
                harness.ratio_metric("bitsandbytes"), 1.0),
            Bar("GPU dequantize: bnbcy >= 1.0x bitsandbytes", is_op("dequantize"),
                harness.ratio_metric("bitsandbytes"), 1.0),
            Bar("GPU quantize: bnbcy >= 70% of copy bandwidth", is_op("quantize"),
                harness.pct_copy_metric("bnbcy"), 70.0),
            Bar("GPU dequantize: bnbcy >= 70% of copy bandwidth", is_op("dequantize"),
                harness.pct_copy_metric("bnbcy"), 70.0),
        ]
    note = "" if threads == 2 else f" [bar is defined for 2 cores; this run: {threads} threads]"
    return [
        Bar("CPU quantize: bnbcy >= 5x faster than bitsandbytes" + note, is_op("quantize"),
            harness.ratio_metric("bitsandbytes"), 5.0),
        Bar("CPU dequantize: bnbcy >= 3x faster than bitsandbytes" + note, is_op("dequantize"),
            harness.ratio_metric("bitsandbytes"), 3.0),
    ]


def code_check(device: str) -> dict:
    """Compare the libraries' dynamic maps with the torch baseline's code."""
    ours = dynamic_map()
    res = {}
    for impl in ("bitsandbytes", "bnbcy"):
        mod, _ = load_functional(impl)
        fn = getattr(mod, "create_dynamic_map", None) if mod is not None else None
        if fn is None:
            res[impl] = None
            continue
        try:
            res[impl] = bool(torch.equal(fn().float().cpu(), ours))
        except Exception as exc:  # report, do not abort the benchmark
            res[impl] = f"{type(exc).__name__}: {exc}"
    return res


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", nargs="+", default=None,
                   help="element counts, e.g. 16777216 or 16M (default: 16M on cpu; 16M 256M on cuda)")
    p.add_argument("--blocksizes", nargs="+", default=None,
                   help="default: 4096 on cpu; 64 256 4096 on cuda")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="float32 float16 bfloat16 (default: float32 on cpu; all three on cuda)")
    p.add_argument("--ops", nargs="+", default=["quantize", "dequantize", "dequantize-out"])
    harness.add_common_args(p, repeats=20, warmup=3)
    args = p.parse_args(argv)
    harness.check_common_args(p, args)

    cuda = args.device == "cuda"
    args.n = harness.list_arg(args.n or (["16M", "256M"] if cuda else ["16M"]), parse_n)
    args.blocksizes = harness.list_arg(args.blocksizes or ([64, 256, 4096] if cuda else [4096]), int)
    dtypes = harness.list_arg(args.dtypes or (list(DTYPES) if cuda else ["float32"]), str)
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
    args.dtypes = [DTYPES[d] for d in dtypes]
    args.ops = harness.list_arg(args.ops, str)
    bad_ops = [o for o in args.ops if o not in ("quantize", "dequantize", "dequantize-out")]
    if bad_ops:
        p.error(f"unknown op(s) {bad_ops}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bnbcy_mod, _ = load_functional("bnbcy")
    config = {
        "n": args.n, "blocksizes": args.blocksizes,
        "dtypes": [str(d).replace("torch.", "") for d in args.dtypes], "ops": args.ops,
        "bnbcy_functional_file": getattr(bnbcy_mod, "__file__", None),
        "dynamic_map_equal_to": code_check(args.device),
    }
    return harness.run_benchmark(
        "blockwise", args,
        lambda impls: make_cases(args.device, args.n, args.blocksizes, args.dtypes, args.ops, impls,
                                 args.seed, args.rotate),
        make_bars, config, load_functional)


if __name__ == "__main__":
    sys.exit(main())
