"""Benchmark 4-bit NF4 quantize / dequantize / matmul: bnbcy vs bitsandbytes vs torch.

Usage::

    python bench/bench_fourbit_functional.py                        # CPU: bf16 4096x4096 weight, nf4, blocksize 64
    python bench/bench_fourbit_functional.py --nested               # the same with compress_statistics=True
    python bench/bench_fourbit_functional.py --size 1024 --repeats 2   # quick smoke test (every 4096 -> 1024)
    python bench/bench_fourbit_functional.py --device cuda          # GPU sweep (below)

Operations (``--ops``), each on a weight ``W [N, K]`` quantized flat, row-major:

* ``quantize``: ``quantize_4bit(W, blocksize=64, compress_statistics=..., quant_type='nf4')``.
* ``dequantize``: ``dequantize_4bit(packed, state)`` of the library's own quantize
  output, into a fresh output.
* ``gemv`` (one row of A) and ``gemm`` (``--rows`` rows, default 2 4 8 16 64 on cpu,
  2 4 8 16 on cuda): ``A [M, K] @ W.T`` through the public autograd entry point,
  ``bnbcy.matmul_4bit(A, q.t(), state)`` / ``bitsandbytes.matmul_4bit(A, q.t(), state)``.

Every implementation is called through its public API exactly as a user would
call it, so allocating the outputs is part of the measured time for all of them.

The ``torch`` column is "what you would use without a 4-bit library":

* quantize / dequantize: a plain-PyTorch NF4 written here (blockwise absmax,
  nearest of the 16 NF4 values via ``torch.bucketize`` on their midpoints, two
  codes packed per byte high nibble first; dequantize as a table lookup times the
  block's absmax). It never double-quantizes the statistics (``--nested`` does
  not apply to it).
* gemv / gemm: the dense ``torch.nn.functional.linear(A, W)`` with the weight in
  its original 16-bit dtype, i.e. the speed the 4-bit weight has to match.

Cases:

* CPU (default): bf16 4096x4096; quantize, dequantize, gemv, gemm M = 2 4 8 16 64.
* CUDA: dequantize for bf16/fp16 4096x4096 and 4096x14336; gemv for (N, K) in
  (4096, 4096), (14336, 4096), (4096, 14336) x bf16/fp16; gemm M = 2 4 8 16 for
  4096x4096 and 14336x4096 bf16.

Bytes per call (GB/s and "% of copy bandwidth"): quantize reads W and writes the
packed codes and the statistics (``2n + n/2 + 4n/64`` for bf16, blocksize 64);
dequantize the reverse; gemv/gemm read the packed weight, its statistics and A
and write the output, so for gemv "% of copy" is the % of the memory roofline of a
4-bit weight (the dense baseline's own bytes are in the case's params as
``dense_nbytes``).

Output checks: quantize is compared with bitsandbytes (the libraries' NF4 codes
and absmax must be byte-identical on the CPU); dequantize with bitsandbytes'
output; gemv/gemm with a float64 product of A and the dequantized weight (relative
L2 error; the dense baseline is the check's reference and is not checked itself).

Bars (printed as PASS/FAIL/N/A lines, ``--strict`` makes FAIL the exit status):

* CPU (defined for 2 cores): quantize >= 10x and dequantize >= 1.5x faster than
  bitsandbytes; gemv >= 3x bitsandbytes and >= 1.0x the dense torch linear.
* CUDA: dequantize >= 1.0x bitsandbytes and >= 70% of copy bandwidth; gemv >= 1.2x
  bitsandbytes and >= 60% of the roofline; gemm M 2..16 >= 1.0x the dense linear.
"""
from __future__ import annotations

import argparse
import importlib
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
OPS = ("quantize", "dequantize", "gemv", "gemm")
QUANT_TYPE = "nf4"
#: Library NF4 codes may differ from the reference in this fraction of bytes on
#: CUDA and for the torch baseline (float rounding at a midpoint); on the CPU the
#: libraries must agree exactly.
MAX_MISMATCH_FRACTION = 0.01
#: Relative L2 error of a 4-bit matmul against the float64 product with the
#: dequantized weight (16-bit outputs round at ~2^-9 per element).
MAX_MATMUL_REL_ERR = 1e-2
#: Relative L2 difference allowed between dequantize outputs (nested statistics
#: are rebuilt in float32 in different orders; the torch baseline never nests).
MAX_DEQUANT_REL_DIFF = 1e-3
MAX_DEQUANT_REL_DIFF_NESTED = 2e-2


# --------------------------------------------------------------------------
# Implementations
# --------------------------------------------------------------------------


def load_functional(impl: str):
    """``<impl>.functional``, imported once: ``(module, None)`` or ``(None, reason)``."""
    return harness.load_module(LIB_MODULES[impl], ("quantize_4bit", "dequantize_4bit"))


def _functional(impl: str):
    return harness.require(load_functional(impl))


def _matmul_4bit(impl: str):
    """``<impl>.matmul_4bit`` (top-level package), or ImplUnavailable."""
    _functional(impl)  # same n/a reason when the library does not import
    fn = getattr(importlib.import_module(impl), "matmul_4bit", None)
    if fn is None:
        raise ImplUnavailable(f"{impl} has no matmul_4bit")
    return fn


def nf4_map() -> torch.Tensor:
    """The 16 NF4 values (float32, ascending) for the torch baseline, from the libraries."""
    for impl in ("bitsandbytes", "bnbcy"):
        mod, _ = load_functional(impl)
        if mod is not None and hasattr(mod, "get_4bit_type"):
            return mod.get_4bit_type(QUANT_TYPE, device="cpu").float().cpu()
    raise ImplUnavailable("neither bitsandbytes nor bnbcy is importable for the NF4 map")


class TorchNF4:
    """Plain-PyTorch blockwise NF4 (the ``torch`` baseline of quantize/dequantize)."""

    def __init__(self, device: str):
        code = nf4_map()
        assert bool((code[1:] > code[:-1]).all()), "bucketize needs a sorted code"
        self.code = code.to(device)
        self.mids = ((code[1:] + code[:-1]) / 2).to(device)  # nearest value == bucket among midpoints

    def quantize(self, A: torch.Tensor, blocksize: int):
        """Return ``(packed uint8 [(n+1)//2, 1], absmax float32 [nblocks])``."""
        flat = A.reshape(-1)
        n = flat.numel()
        nblocks = -(-n // blocksize)
        if nblocks * blocksize != n:  # zero padding leaves the last block's absmax unchanged
            flat = torch.nn.functional.pad(flat, (0, nblocks * blocksize - n))
        blocks = flat.view(nblocks, blocksize).float()
        absmax = blocks.abs().amax(dim=1)
        scaled = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(1)
        idx = torch.bucketize(scaled, self.mids, out_int32=True).to(torch.uint8).view(-1)
        packed = (idx[0::2] << 4) | idx[1::2]
        return packed[: (n + 1) // 2].view(-1, 1), absmax

    def dequantize(self, packed: torch.Tensor, absmax: torch.Tensor, blocksize: int,
                   dtype: torch.dtype, shape) -> torch.Tensor:
        """Return ``code[q] * absmax[block]`` in ``dtype`` and ``shape``."""
        p = packed.view(-1)
        idx = torch.stack((p >> 4, p & 15), dim=1).view(-1).int()
        vals = self.code.index_select(0, idx)
        n = vals.numel()
        nblocks = absmax.numel()
        if nblocks * blocksize != n:
            vals = torch.nn.functional.pad(vals, (0, nblocks * blocksize - n))
        out = (vals.view(nblocks, blocksize) * absmax.unsqueeze(1)).to(dtype)
        return out.view(-1)[: torch.Size(shape).numel()].view(shape)


# --------------------------------------------------------------------------
# Binders: inputs -> zero-arg callable (all preparation happens here)
# --------------------------------------------------------------------------


def _lib_quantize(impl: str, W: torch.Tensor, blocksize: int, nested: bool):
    return _functional(impl).quantize_4bit(W, blocksize=blocksize, compress_statistics=nested,
                                           quant_type=QUANT_TYPE)


def bind_quantize(impl: str, blocksize: int, nested: bool, torch_impl: TorchNF4):
    if impl == "torch":
        return lambda inp: (lambda: torch_impl.quantize(inp["W"], blocksize))

    def bind(inp):
        F = _functional(impl)
        W = inp["W"]
        return lambda: F.quantize_4bit(W, blocksize=blocksize, compress_statistics=nested,
                                       quant_type=QUANT_TYPE)
    return bind


def bind_dequantize(impl: str, blocksize: int, nested: bool, torch_impl: TorchNF4):
    if impl == "torch":
        def bind_torch(inp):
            W = inp["W"]
            q, absmax = torch_impl.quantize(W, blocksize)
            return lambda: torch_impl.dequantize(q, absmax, blocksize, W.dtype, W.shape)
        return bind_torch

    def bind(inp):
        F = _functional(impl)
        # Each library dequantizes its own quantize output, i.e. the usual round trip.
        q, state = _lib_quantize(impl, inp["W"], blocksize, nested)
        return lambda: F.dequantize_4bit(q, state)
    return bind


def bind_matmul(impl: str, blocksize: int, nested: bool, torch_impl: TorchNF4):
    if impl == "torch":
        def bind_torch(inp):
            A, W = inp["A"], inp["W"]
            return lambda: torch.nn.functional.linear(A, W)
        return bind_torch

    def bind(inp):
        matmul_4bit = _matmul_4bit(impl)
        A = inp["A"]
        q, state = _lib_quantize(impl, inp["W"], blocksize, nested)
        qt = q.t()  # as Linear4bit passes it; the shape comes from the state
        return lambda: matmul_4bit(A, qt, state)
    return bind


# --------------------------------------------------------------------------
# Output checks
# --------------------------------------------------------------------------


def _state_tensors(st) -> dict:
    """The arrays that define a quantize output's statistics (QuantState or plain absmax)."""
    if isinstance(st, torch.Tensor):
        return {"absmax": st}
    d = {"absmax": st.absmax}
    if getattr(st, "state2", None) is not None:
        d["state2.absmax"] = st.state2.absmax
        d["offset"] = torch.as_tensor(st.offset).reshape(1)
    return d


def make_check_quantize(device: str):
    def check_quantize(ref, out) -> dict:
        """Packed codes and statistics against bitsandbytes'."""
        (rq, rst), (q, st) = ref, out
        library = not isinstance(st, torch.Tensor)  # the torch baseline returns a bare absmax
        res = {"q_dtype": str(q.dtype), "q_shape": list(q.shape)}
        if q.numel() * q.element_size() != rq.numel() * rq.element_size():
            res.update(ok=False, error=f"expected {rq.numel() * rq.element_size()} packed bytes")
            return res
        qb, rqb = q.reshape(-1).view(torch.uint8), rq.reshape(-1).view(torch.uint8)
        frac = (qb != rqb).sum().item() / max(1, qb.numel())
        res["q_mismatch_fraction"] = frac
        ok = frac == 0 if (library and device == "cpu") else frac <= MAX_MISMATCH_FRACTION
        rt, t = _state_tensors(rst), _state_tensors(st)
        for key, rv in rt.items():
            v = t.get(key)
            if v is None or v.numel() != rv.numel() or v.dtype != rv.dtype:
                if library:  # the torch baseline has no nested statistics to compare
                    res[f"{key}_error"] = f"missing, or not {rv.dtype} [{rv.numel()}]"
                    ok = False
                continue
            if not v.is_floating_point():  # nested absmax codes: 8-bit blockwise, nearly nearest
                mis = (v.reshape(-1) != rv.reshape(-1)).sum().item() / max(1, v.numel())
                res[f"{key}_mismatch_fraction"] = mis
                ok = ok and mis <= MAX_MISMATCH_FRACTION
                continue
            rv64, v64 = rv.double().reshape(-1), v.double().reshape(-1)
            rel = ((v64 - rv64).abs().max() / rv64.abs().max().clamp_min(1e-30)).item()
            res[f"{key}_max_rel_diff"] = rel
            ok = ok and rel <= 1e-6
        res["ok"] = bool(ok)
        return res
    return check_quantize


def make_check_dequantize(nested: bool):
    tol = MAX_DEQUANT_REL_DIFF_NESTED if nested else MAX_DEQUANT_REL_DIFF

    def check_dequantize(ref: torch.Tensor, out: torch.Tensor) -> dict:
        """Against bitsandbytes' output: dtype/shape, fraction differing, relative L2 difference."""
        res = {"dtype": str(out.dtype), "shape": list(out.shape)}
        if out.dtype != ref.dtype or out.shape != ref.shape:
            res.update(ok=False, error=f"expected {ref.dtype} {list(ref.shape)}")
            return res
        frac = (out != ref).sum().item() / max(1, out.numel())
        r64 = ref.double()
        rel = ((out.double() - r64).norm() / r64.norm().clamp_min(1e-300)).item()
        res.update(mismatch_fraction=frac, rel_l2_diff=rel, ok=frac <= MAX_MISMATCH_FRACTION or rel <= tol)
        return res
    return check_dequantize


def make_check_matmul(holder: dict):
    def check_matmul(ref_dense, out) -> dict:
        """Relative L2 error against float64 ``A @ dequant(W).T`` (computed in setup)."""
        ref64 = holder.get("ref64")
        res = {"dtype": str(out.dtype), "shape": list(out.shape)}
        if ref64 is None:
            res.update(ok=False, error=f"no float64 reference: {holder.get('ref_error')}")
            return res
        if tuple(out.shape) != tuple(ref64.shape):
            res.update(ok=False, error=f"expected shape {list(ref64.shape)}")
            return res
        o64 = out.double()
        norm = ref64.norm().clamp_min(1e-300)
        rel = ((o64 - ref64).norm() / norm).item()
        # How far the dense 16-bit product is from the 4-bit one: the quantization error, for scale.
        dense_rel = ((ref_dense.double() - ref64).norm() / norm).item()
        res.update(rel_l2_err=rel, dense_vs_4bit_rel_l2=dense_rel, ok=rel <= MAX_MATMUL_REL_ERR)
        return res
    return check_matmul


#: One float64 dequantized weight, reused by the consecutive matmul cases of one weight.
_REF_WEIGHT: dict = {}


def reference_product(A: torch.Tensor, W: torch.Tensor, blocksize: int, nested: bool,
                      key: tuple) -> torch.Tensor:
    """float64 ``A @ dequant(quant(W)).T`` with the reference library (bitsandbytes, else bnbcy).

    ``key`` identifies ``W`` (shape, dtype, seed ...); the dequantized weight of the
    last key is kept, since quantizing with bitsandbytes on the CPU takes about a second.
    """
    Wd = _REF_WEIGHT.get(key)
    if Wd is None:
        _REF_WEIGHT.clear()
        last = None
        for impl in ("bitsandbytes", "bnbcy"):
            try:
                q, st = _lib_quantize(impl, W, blocksize, nested)
                Wd = _functional(impl).dequantize_4bit(q, st).double()
                break
            except Exception as exc:
                last = exc
        if Wd is None:
            raise ImplUnavailable(f"no library could dequantize the reference weight: {last}")
        _REF_WEIGHT[key] = Wd
    return A.double() @ Wd.t()


# --------------------------------------------------------------------------
# Cases
# --------------------------------------------------------------------------


def absmax_bytes(nblocks: int, nested: bool) -> int:
    """Bytes of the per-block statistics: float32 absmax, or uint8 codes + the nested state."""
    if not nested:
        return 4 * nblocks
    return nblocks + 4 * -(-nblocks // 256) + 4 * 256 + 4  # codes, absmax2, code2, offset


def scaled(d: int, size: int) -> int:
    """A dimension of the default shapes (multiples of 4096) with 4096 replaced by ``size``."""
    return max(64, d * size // 4096)


def default_sweep(device: str, size: int, rows, dtypes_override, ops):
    """``[(op, dtype, N, K, M)]`` of the default cases (M is None for quantize/dequantize)."""
    s = lambda d: scaled(d, size)  # noqa: E731
    out = []
    if device == "cuda":
        sq, wide, tall = (s(4096), s(4096)), (s(4096), s(14336)), (s(14336), s(4096))
        half = dtypes_override or [torch.bfloat16, torch.float16]
        bf = dtypes_override or [torch.bfloat16]
        plan = {
            "quantize": [(dt, N, K, None) for dt in half for N, K in (sq, wide)],
            "dequantize": [(dt, N, K, None) for dt in half for N, K in (sq, wide)],
            "gemv": [(dt, N, K, 1) for N, K in (sq, tall, wide) for dt in half],
            "gemm": [(dt, N, K, m) for N, K in (sq, tall) for dt in bf for m in rows],
        }
    else:
        dts = dtypes_override or [torch.bfloat16]
        N = K = s(4096)
        plan = {
            "quantize": [(dt, N, K, None) for dt in dts],
            "dequantize": [(dt, N, K, None) for dt in dts],
            "gemv": [(dt, N, K, 1) for dt in dts],
            "gemm": [(dt, N, K, m) for dt in dts for m in rows],
        }
    for op in ops:
        out += [(op,) + c for c in plan[op]]
    return out


def make_cases(device: str, sweep, blocksize: int, nested: bool, impls, seed: int, rotate: Optional[int]):
    """Yield the cases lazily so only one case's inputs are alive at a time."""
    torch_impl = TorchNF4(device)
    binders = {"quantize": bind_quantize, "dequantize": bind_dequantize,
               "gemv": bind_matmul, "gemm": bind_matmul}
    for op, dtype, N, K, M in sweep:
        n = N * K
        nblocks = -(-n // blocksize)
        item = torch.empty((), dtype=dtype).element_size()
        stats = absmax_bytes(nblocks, nested)
        weight_bytes = (n + 1) // 2 + stats
        params = {"op": op, "N": N, "K": K, "n": n, "blocksize": blocksize, "quant_type": QUANT_TYPE,
                  "compress_statistics": nested, "dtype": str(dtype).replace("torch.", ""),
                  "nblocks": nblocks, "seed": seed, "packed_weight_bytes": (n + 1) // 2,
                  "absmax_bytes": stats}
        holder: dict = {}
        if op in ("quantize", "dequantize"):
            nbytes = n * item + weight_bytes  # quantize: read W, write codes + stats; dequantize: reverse
            name = f"{op} {DTYPE_SHORT[dtype]} {N}x{K}"
            reference, check = "bitsandbytes", (make_check_quantize(device) if op == "quantize"
                                                else make_check_dequantize(nested))
        else:
            io = M * K * item + M * N * item
            nbytes = weight_bytes + io  # for M=1: the memory roofline of the 4-bit weight
            params.update(M=M, dense_nbytes=n * item + io, roofline_bytes=nbytes)
            name = f"{op} M={M} {DTYPE_SHORT[dtype]} {N}x{K}"
            reference, check = "torch", make_check_matmul(holder)

        def setup(N=N, K=K, M=M, dtype=dtype, holder=holder, op=op):
            # Fresh inputs per case, same values every run: N(0, 0.02) like a trained weight.
            gen = torch.Generator(device=device).manual_seed(seed)
            W = (torch.randn(N, K, generator=gen, device=device) * 0.02).to(dtype)
            inp = {"W": W}
            if M is not None:
                inp["A"] = torch.randn(M, K, generator=gen, device=device).to(dtype)
                try:
                    holder["ref64"] = reference_product(inp["A"], W, blocksize, nested,
                                                        (N, K, dtype, device, seed, blocksize, nested))
                except Exception as exc:  # checks report it; timing goes on
                    holder["ref_error"] = harness._reason(exc)
            return inp

        if op in ("quantize", "dequantize"):
            _REF_WEIGHT.clear()  # free the float64 weight of earlier matmul cases
        yield Case(name=name + (" nested" if nested else ""), params=params, nbytes=nbytes, setup=setup,
                   device=device, rotate=rotate,
                   impls={impl: binders[op](impl, blocksize, nested, torch_impl) for impl in impls},
                   reference=reference, check=check)


def make_bars(device: str, threads: int):
    is_op = lambda *ops: (lambda r: r["params"]["op"] in ops)  # noqa: E731
    if device == "cuda":
        return [
            Bar("GPU dequantize: bnbcy >= 1.0x bitsandbytes", is_op("dequantize"),
                harness.ratio_metric("bitsandbytes"), 1.0),
            Bar("GPU dequantize: bnbcy >= 70% of copy bandwidth", is_op("dequantize"),
                harness.pct_copy_metric("bnbcy"), 70.0),
            Bar("GPU gemv: bnbcy >= 1.2x bitsandbytes", is_op("gemv"),
                harness.ratio_metric("bitsandbytes"), 1.2),
            Bar("GPU gemv: bnbcy >= 60% of the 4-bit roofline (copy bandwidth)", is_op("gemv"),
                harness.pct_copy_metric("bnbcy"), 60.0),
            Bar("GPU gemm M=2..16: bnbcy >= 1.0x dense torch linear",
                lambda r: r["params"]["op"] == "gemm" and 2 <= r["params"]["M"] <= 16,
                harness.ratio_metric("torch"), 1.0),
        ]
    note = "" if threads == 2 else f" [bar is defined for 2 cores; this run: {threads} threads]"
    return [
        Bar("CPU quantize nf4: bnbcy >= 10x faster than bitsandbytes" + note, is_op("quantize"),
            harness.ratio_metric("bitsandbytes"), 10.0),
        Bar("CPU dequantize: bnbcy >= 1.5x faster than bitsandbytes" + note, is_op("dequantize"),
            harness.ratio_metric("bitsandbytes"), 1.5),
        Bar("CPU gemv (M=1): bnbcy >= 3x faster than bitsandbytes" + note, is_op("gemv"),
            harness.ratio_metric("bitsandbytes"), 3.0),
        Bar("CPU gemv (M=1): bnbcy >= 1.0x dense torch linear" + note, is_op("gemv"),
            harness.ratio_metric("torch"), 1.0),
    ]


def code_check() -> dict:
    """Compare the libraries' NF4 maps with the torch baseline's."""
    try:
        ours = nf4_map()
    except ImplUnavailable as exc:
        return {"error": str(exc)}
    res = {}
    for impl in ("bitsandbytes", "bnbcy"):
        mod, _ = load_functional(impl)
        if mod is None:
            res[impl] = None
            continue
        try:
            res[impl] = bool(torch.equal(mod.get_4bit_type(QUANT_TYPE, device="cpu").float().cpu(), ours))
        except Exception as exc:  # report, do not abort the benchmark
            res[impl] = f"{type(exc).__name__}: {exc}"
    return res


# --------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=None,
                   help="subset of quantize dequantize gemv gemm (default: all on cpu; "
                        "dequantize gemv gemm on cuda)")
    p.add_argument("--size", type=int, default=4096,
                   help="replaces 4096 in every shape (14336 scales alike), e.g. 1024 for a quick run")
    p.add_argument("--rows", nargs="+", default=None,
                   help="rows M of A for gemm (default: 2 4 8 16 64 on cpu; 2 4 8 16 on cuda)")
    p.add_argument("--dtypes", nargs="+", default=None,
                   help="float32 float16 bfloat16 (default: bfloat16 on cpu; per op on cuda)")
    p.add_argument("--blocksize", type=int, default=64)
    p.add_argument("--nested", action="store_true", help="compress_statistics=True (double quantization)")
    harness.add_common_args(p, repeats=7, warmup=2)  # bitsandbytes is slow on the cpu
    args = p.parse_args(argv)
    harness.check_common_args(p, args)

    cuda = args.device == "cuda"
    args.ops = harness.list_arg(args.ops or (["dequantize", "gemv", "gemm"] if cuda else list(OPS)), str)
    bad_ops = [o for o in args.ops if o not in OPS]
    if bad_ops:
        p.error(f"unknown op(s) {bad_ops}; choose from {list(OPS)}")
    args.rows = harness.list_arg(args.rows or ([2, 4, 8, 16] if cuda else [2, 4, 8, 16, 64]), int)
    if any(m < 2 for m in args.rows):
        p.error("--rows are for gemm (M >= 2); gemv is M = 1")
    if args.dtypes:
        names = harness.list_arg(args.dtypes, str)
        unknown = [d for d in names if d not in DTYPES]
        if unknown:
            p.error(f"unknown dtype(s) {unknown}; choose from {list(DTYPES)}")
        args.dtypes = [DTYPES[d] for d in names]
    if args.size < 64 or args.size % 64:
        p.error("--size must be a positive multiple of 64")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    bnbcy_mod, _ = load_functional("bnbcy")
    sweep = default_sweep(args.device, args.size, args.rows, args.dtypes, args.ops)
    config = {
        "ops": args.ops, "size": args.size, "rows": args.rows, "blocksize": args.blocksize,
        "quant_type": QUANT_TYPE, "compress_statistics": args.nested,
        "dtypes": sorted({str(c[1]).replace("torch.", "") for c in sweep}),
        "bnbcy_functional_file": getattr(bnbcy_mod, "__file__", None),
        "nf4_map_equal_to": code_check(),
    }
    return harness.run_benchmark(
        "fourbit", args,
        lambda impls: make_cases(args.device, sweep, args.blocksize, args.nested, impls, args.seed,
                                 args.rotate),
        make_bars, config, load_functional,
        footnote="gemv/gemm count the 4-bit weight's bytes for every column (torch included), "
                 "so for gemv %copy is the % of the 4-bit memory roofline")


if __name__ == "__main__":
    sys.exit(main())
