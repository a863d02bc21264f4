"""Benchmark optimizer steps: bnbcy vs torch.optim (fused) vs bitsandbytes.

Usage::

    python bench/bench_optim.py                    # CPU: every case below, 40 interleaved rounds
    python bench/bench_optim.py --ops adam8bit --n 1M --repeats 30   # quicker
    python bench/bench_optim.py --device cuda      # GPU: 256M-element tensor, and a ~100M-parameter
                                                   # model of ~200 tensors of mixed sizes

Cases (``--ops``), one float32 parameter of ``--n`` elements (default 16M on the CPU):

* ``adam32bit``: ``Adam32bit`` vs ``torch.optim.Adam(fused=True)`` (and bitsandbytes' ``Adam32bit``).
* ``adam8bit``: ``Adam8bit`` vs ``torch.optim.Adam(fused=True)``, the 32-bit state it replaces (and
  bitsandbytes' ``Adam8bit``); in the same case, interleaved round by round with them, bnbcy's
  ``Lion8bit``, ``AdEMAMix8bit`` and ``LAMB8bit`` (columns ``bnbcy:lion8bit`` ...), compared with
  ``Adam8bit`` per byte moved. The case's GB/s column counts Adam8bit's bytes for every column;
  the per-byte comparison uses each rule's own bytes (``OPS``).
* ``lion8bit``, ``ademamix8bit``, ``lamb8bit``: one of them alone (bnbcy only).
* ``model``: ``AdamW8bit`` over ~200 tensors of mixed sizes (100M parameters) vs
  ``torch.optim.AdamW(fused=True)``.

Each timed call is one ``optimizer.step()`` with the gradients already in place (set once in
setup); the parameters drift a little over the repeats, which does not change the cost. The
implementations of a case are timed interleaved, round by round (``bench/harness.py``). Bytes
per call (bnbcy's step; the GB/s column of every implementation of a case uses it): p read and
written, g read, the states read and written (``OPS`` below). On the CPU the copy bandwidth is
measured too (``torch`` ``copy_`` of 256 MiB), the yardstick of the "% of copy" figures.

The optimizer-state memory (bytes per parameter) of each implementation is printed at the end
and stored in the JSON config (``state_bytes_per_param``).

Bars (CPU, defined for 2 cores): Adam32bit and Adam8bit each <= 1.0x the time of torch's fused
Adam; Adam8bit >= 20x faster than bitsandbytes' CPU Adam8bit; Lion8bit, AdEMAMix8bit, LAMB8bit no
slower than Adam8bit per byte moved; the 200-tensor model <= 1.0x torch's fused AdamW; Adam8bit
state <= 2.04 bytes/param. GPU: Adam8bit on 256M elements >= 1.0x bitsandbytes and >= 70% of copy
bandwidth; the 200-tensor model >= 1.0x torch AdamW(fused=True).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import harness  # noqa: E402
from harness import Bar, Case  # noqa: E402

LIBS = {"bnbcy": "bnbcy", "bitsandbytes": "bitsandbytes"}
#: op -> (bnbcy class, torch class or None, bytes per element bnbcy's step reads + writes)
OPS = {
    "adam32bit": ("Adam32bit", "Adam", 28),      # p r/w 8, g 4, two float32 states r/w 16
    "adam8bit": ("Adam8bit", "Adam", 16),        # p r/w 8, g 4, two 8-bit states r/w 4 (+ absmax)
    "lion8bit": ("Lion8bit", None, 14),          # one 8-bit state
    "ademamix8bit": ("AdEMAMix8bit", None, 18),  # three 8-bit states
    "lamb8bit": ("LAMB8bit", None, 26),          # + the trust-ratio pass: g 4, states 2, ||p|| 4
    "model": ("AdamW8bit", "AdamW", 16),         # ~200 tensors, 100M parameters
}
CPU_OPS = ("adam32bit", "adam8bit", "model")
#: the 8-bit rules timed in the adam8bit case, interleaved with Adam8bit (impl "bnbcy:<op>")
FAMILY_8BIT = ("lion8bit", "ademamix8bit", "lamb8bit")
#: "<op>/<impl>" -> optimizer-state bytes per parameter, filled while the cases run
STATE_BYTES: dict = {}


def load_lib(impl: str):
    """The library with its ``optim`` package: ``(module, None)`` or ``(None, reason)``."""
    mod, reason = harness.load_module(LIBS[impl], ("optim",))
    if mod is not None and not hasattr(mod.optim, "Adam8bit"):
        return None, f"{LIBS[impl]}.optim has no Adam8bit"
    return mod, reason


def _lib(impl):
    return harness.require(load_lib(impl))


def state_bytes(opt) -> int:
    """Bytes of every tensor in the optimizer's state."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


def bind_step(impl, op, params_numel, own_op=None):
    """The binder of one implementation of ``op``; ``own_op``: the case's op, when it differs
    (a family rule timed in the adam8bit case)."""
    own_op = own_op or op
    cls_name, torch_name, _ = OPS[op]

    def bind(params):
        if impl == "torch" and torch_name is None:
            return None
        if impl == "bitsandbytes" and op not in ("adam8bit", "adam32bit"):
            return None   # bitsandbytes' CPU optimizers take seconds per step at these sizes
        params = [p.detach().clone().requires_grad_() for p in params]
        g = torch.Generator(device="cpu").manual_seed(1)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.device, p.dtype) * 1e-2
        if impl == "torch":
            opt = getattr(torch.optim, torch_name)(params, lr=1e-3, fused=True)
        else:
            opt = getattr(_lib(impl).optim, cls_name)(params, lr=1e-3)
        opt.step()  # states exist from here on
        STATE_BYTES[f"{op}/{impl}"] = state_bytes(opt) / params_numel

        def call():
            opt.step()
            return params[0] if op == own_op else None  # another rule's p: nothing to compare
        return call
    return bind


def check_close(ref, out):
    if out is None:  # another rule in the case (tests/test_optim_*.py check its values)
        return {"ok": True, "rel_l2_vs_ref": None}
    err = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    return {"ok": err < 1e-2, "rel_l2_vs_ref": err}


def model_shapes(total: int, count: int = 200):
    """~count tensors of mixed sizes (matrices, vectors, embeddings) adding up to ~total elements."""
    g = torch.Generator().manual_seed(0)
    sizes = (torch.rand(count, generator=g) ** 3 + 1e-3)
    sizes = (sizes / sizes.sum() * total).long().clamp(min=1)
    return [(int(s),) for s in sizes]


def make_cases(device, ops, impls, n, seed, rotate):
    for op in ops:
        shapes = model_shapes(n if n < 2**27 else 100 * 2**20) if op == "model" else [(n,)]
        if op == "model" and device == "cpu":
            shapes = model_shapes(100 * 2**20)
        numel = sum(s[0] for s in shapes)

        def setup(shapes=shapes):
            g = torch.Generator().manual_seed(seed)
            return [torch.randn(s, generator=g).to(device) for s in shapes]
        binders = {i: bind_step(i, op, numel) for i in impls}
        if op == "adam8bit" and device == "cpu" and "bnbcy" in impls:
            binders.update({f"bnbcy:{f}": bind_step("bnbcy", f, numel, own_op=op) for f in FAMILY_8BIT})
        yield Case(name=f"{op} n={numel / 2**20:.0f}M tensors={len(shapes)}",
                   params={"op": op, "numel": numel, "tensors": len(shapes), "bytes_per_elem": OPS[op][2]},
                   nbytes=numel * OPS[op][2], setup=setup, impls=binders, device=device, rotate=1,
                   reference="torch" if OPS[op][1] else None, check=check_close)


def _ns_per_byte(r, impl, op):
    e = r["impls"].get(impl, {})
    return e["median_ms"] * 1e6 / (r["params"]["numel"] * OPS[op][2]) if e.get("status") == "ok" else None


def per_byte_vs_adam8bit(op):
    """Metric of rule ``op`` in the adam8bit case (interleaved with Adam8bit, same run):
    (Adam8bit's time per byte) / (its time per byte), >= 1 when it is no slower than Adam8bit by
    more than its extra bytes."""
    def metric(r):
        mine, ref = _ns_per_byte(r, f"bnbcy:{op}", op), _ns_per_byte(r, "bnbcy", "adam8bit")
        return ref / mine if mine and ref else None
    return metric


def make_bars(device, threads):
    is_op = lambda op: (lambda r: r["params"]["op"] == op)  # noqa: E731
    if device == "cuda":
        return [
            Bar("GPU Adam8bit >= 1.0x bitsandbytes", is_op("adam8bit"), harness.ratio_metric("bitsandbytes"), 1.0),
            Bar("GPU Adam8bit >= 70% of copy bandwidth", is_op("adam8bit"), harness.pct_copy_metric("bnbcy"), 70.0),
            Bar("GPU 200-tensor model >= 1.0x torch AdamW(fused=True)", is_op("model"),
                harness.ratio_metric("torch"), 1.0),
        ]
    note = "" if threads == 2 else f" [bar is defined for 2 cores; this run: {threads} threads]"
    bars = [
        Bar("CPU Adam32bit time <= 1.0x torch Adam(fused=True) (ratio torch/bnbcy >= 1)" + note, is_op("adam32bit"),
            harness.ratio_metric("torch"), 1.0),
        Bar("CPU Adam8bit time <= 1.0x torch Adam(fused=True) (ratio torch/bnbcy >= 1)" + note, is_op("adam8bit"),
            harness.ratio_metric("torch"), 1.0),
        Bar("CPU Adam8bit >= 20x faster than bitsandbytes" + note, is_op("adam8bit"),
            harness.ratio_metric("bitsandbytes"), 20.0),
        Bar("CPU 200-tensor 100M model: AdamW8bit time <= 1.0x torch AdamW(fused=True)" + note, is_op("model"),
            harness.ratio_metric("torch"), 1.0),
    ]
    for op in FAMILY_8BIT:
        bars.append(Bar(f"CPU {OPS[op][0]} time per byte <= Adam8bit's ({OPS[op][2]} vs 16 B/elem, interleaved "
                        "in the adam8bit case; metric Adam8bit ns/B / its ns/B >= 1)" + note, is_op("adam8bit"),
                        per_byte_vs_adam8bit(op), 1.0))
    return bars


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", nargs="+", default=None, help=" ".join(OPS))
    p.add_argument("--n", default=None, help="elements (default 16M on cpu, 256M on cuda; model: 100M)")
    harness.add_common_args(p, repeats=40, warmup=3)
    args = p.parse_args(argv)
    harness.check_common_args(p, args)
    cuda = args.device == "cuda"
    args.ops = harness.list_arg(args.ops or (["adam8bit", "model"] if cuda else list(CPU_OPS)), str)
    args.cpu_copy_bandwidth = True   # GB/s against the measured copy bandwidth on the CPU too
    if not cuda and args.copy_mib == 1024:
        args.copy_mib = 256
    if any(o not in OPS for o in args.ops):
        p.error(f"unknown op(s); choose from {list(OPS)}")
    text = args.n or ("256M" if cuda else "16M")
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1].upper(), 1)
    args.n = int(float(text[:-1] if mult > 1 else text) * mult)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    config = {"ops": args.ops, "n": args.n, "state_bytes_per_param": STATE_BYTES}
    rc = harness.run_benchmark(
        "optim", args, lambda impls: make_cases(args.device, args.ops, impls, args.n, args.seed, args.rotate),
        make_bars, config, load_lib,
        footnote="one optimizer.step() per call; state bytes per parameter: below and in the JSON config")
    print("optimizer-state bytes per parameter:", ", ".join(f"{k} {v:.3f}" for k, v in sorted(STATE_BYTES.items())))
    b = STATE_BYTES.get("adam8bit/bnbcy")
    if b is not None:
        print(f"{'PASS' if b <= 2.04 else 'FAIL'}  Adam8bit state <= 2.04 bytes/param: {b:.4f}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
