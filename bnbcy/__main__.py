"""``python -m bnbcy``: what this build has, then a short quantization demo.

The demo quantizes an embedded, generated weight tensor (normal values with a
few large outliers, as in trained linear layers) with 8-bit blockwise
quantization, for each blocksize and dtype, on the CPU and (when available)
on the GPU, and prints memory before/after and the round-trip error.

A second part builds a small generated bf16 MLP stack (residual blocks of
``hidden -> ffn -> hidden`` linears), quantizes every linear layer to 4 bits
(NF4 and FP4, double-quantized statistics) and prints the weight memory, the
model's output error against the float64 dense model and the time of one
forward pass, next to the dense bf16 model.

A third part quantizes the same kind of MLP (float16) with LLM.int8 layers
(``Linear8bitLt(has_fp16_weights=False)``) at outlier thresholds 0.0 and 6.0,
on an input with a few large outlier feature columns (as in large transformers),
and prints the same figures: with the threshold, the outlier columns are
multiplied in float16 and the rest in int8.
"""
from __future__ import annotations

import argparse
import copy
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


class _MLPBlock(torch.nn.Module):
    """``x + down(gelu(up(x)))``: the feed-forward half of a transformer layer."""

    def __init__(self, hidden, ffn):
        super().__init__()
        self.up = torch.nn.Linear(hidden, ffn)
        self.down = torch.nn.Linear(ffn, hidden)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(x)))


def _mlp(hidden=1024, ffn=4096, blocks=2, seed=0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(*[_MLPBlock(hidden, ffn) for _ in range(blocks)]).eval()


class _Functional4bit(torch.nn.Module):
    """Fallback when ``bnbcy.nn`` does not import: a linear layer on the functional 4-bit ops."""

    def __init__(self, linear, quant_type):
        super().__init__()
        self.q, self.quant_state = F.quantize_4bit(linear.weight.data, compress_statistics=True,
                                                   quant_type=quant_type)
        self.bias = linear.bias

    def forward(self, x):
        return bnbcy.matmul_4bit(x, self.q.t(), self.quant_state, bias=self.bias)


class _FunctionalInt8(torch.nn.Module):
    """Fallback when ``bnbcy.nn`` does not import: an LLM.int8 linear layer on the functional ops."""

    def __init__(self, linear, threshold):
        super().__init__()
        self.state = bnbcy.MatmulLtState()
        self.state.threshold = threshold
        self.state.has_fp16_weights = False
        self.state.is_training = False
        self.state.CB, self.state.SCB, _ = F.int8_vectorwise_quant(linear.weight.data.to(torch.float16))
        self.bias = linear.bias

    def forward(self, x):
        return bnbcy.matmul(x, self.state.CB, bias=self.bias, state=self.state)


def _quantize_model_int8(model, threshold):
    """An LLM.int8 copy of ``model``: every nn.Linear replaced; returns ``(model, how)``."""
    model = copy.deepcopy(model)
    try:
        from bnbcy import nn as bnn
        linear_cls = bnn.Linear8bitLt
    except Exception:  # not built yet: the same thing with the functional ops
        linear_cls = None
    if linear_cls is not None:
        bnn.replace_linear(model, linear_cls, has_fp16_weights=False, threshold=threshold)
        return model, "bnbcy.nn.replace_linear(model, Linear8bitLt, has_fp16_weights=False, threshold=...)"

    def swap(parent):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _FunctionalInt8(child, threshold))
            else:
                swap(child)
    swap(model)
    return model, "bnbcy.functional.int8_vectorwise_quant + bnbcy.matmul"


def _quantize_model(model, quant_type):
    """A 4-bit copy of ``model``: every nn.Linear replaced; returns ``(model, how)``."""
    model = copy.deepcopy(model)
    try:
        from bnbcy import nn as bnn
    except Exception:  # not built yet: the same thing with the functional ops
        bnn = None
    if bnn is not None:
        bnn.replace_linear(model, bnn.Linear4bit, quant_type=quant_type, compress_statistics=True,
                           compute_dtype=next(model.parameters()).dtype)
        return model, "bnbcy.nn.replace_linear(model, Linear4bit)"

    def swap(parent):
        for name, child in parent.named_children():
            if isinstance(child, torch.nn.Linear):
                setattr(parent, name, _Functional4bit(child, quant_type))
            else:
                swap(child)
    swap(model)
    return model, "bnbcy.functional.quantize_4bit + bnbcy.matmul_4bit"


def _nbytes(*tensors):
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _weight_bytes(model):
    """Bytes of the linear weights: dense, packed 4-bit codes plus the whole quant state, or
    int8 codes plus their float32 row scales."""
    total = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        qs = getattr(m, "quant_state", None)
        state = getattr(m, "state", None)  # an LLM.int8 MatmulLtState
        if isinstance(m, _FunctionalInt8):
            total += _nbytes(m.state.CB, m.state.SCB)
        elif isinstance(w, torch.Tensor) and w.dtype == torch.int8:
            scb = getattr(w, "SCB", None)
            total += _nbytes(w, scb if scb is not None else getattr(state, "SCB", None))
        elif qs is not None:
            codes = m.q if isinstance(m, _Functional4bit) else w
            total += _nbytes(codes, qs.absmax, qs.code, qs.offset)
            if qs.state2 is not None:
                total += _nbytes(qs.state2.absmax, qs.state2.code)
        elif isinstance(m, torch.nn.Linear):
            total += _nbytes(w)
    return total


def _time_forward(model, x, device, repeats=3):
    with torch.inference_mode():
        y = model(x)  # warm-up (first-call costs, kernel loading)
        times = []
        for _ in range(repeats):
            if device != "cpu":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            if device != "cpu":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
    return y, sorted(times)[len(times) // 2]


def _demo_4bit(device, hidden, ffn, blocks, batch, dtype=torch.bfloat16):
    dense = _mlp(hidden, ffn, blocks).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, hidden, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        ref = copy.deepcopy(dense).double()(x.double())
    rows, how = [], None
    for label in ("dense", "nf4", "fp4"):
        model = dense if label == "dense" else None
        if model is None:
            model, how = _quantize_model(dense, label)
        y, ms = _time_forward(model, x, device)
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        rows.append((device, label, _weight_bytes(model), rel, ms))
    return rows, how


def _outlier_input(batch, hidden, outliers, device, dtype, seed=2):
    """N(0, 1) activations with ``outliers`` feature columns of magnitude 15-25 (random signs)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, hidden, generator=g)
    cols = torch.randperm(hidden, generator=g)[:outliers].sort().values
    sign = torch.where(torch.rand(batch, len(cols), generator=g) < 0.5, -1.0, 1.0)
    x[:, cols] = sign * (15.0 + 10.0 * torch.rand(batch, len(cols), generator=g))
    return x.to(device=device, dtype=dtype), cols.tolist()


def _demo_int8(device, hidden, ffn, blocks, batch, outliers, dtype=torch.float16):
    dense = _mlp(hidden, ffn, blocks).to(device=device, dtype=dtype)
    x, cols = _outlier_input(batch, hidden, outliers, device, dtype)
    with torch.inference_mode():
        ref = copy.deepcopy(dense).double()(x.double())
    rows, how = [], None
    for label, threshold in (("dense", None), ("int8", 0.0), ("int8", 6.0)):
        model = dense
        if threshold is not None:
            model, how = _quantize_model_int8(dense, threshold)
        y, ms = _time_forward(model, x, device)
        rel = ((y.double() - ref).norm() / ref.norm()).item()
        rows.append((device, label, threshold, _weight_bytes(model), rel, ms))
    return rows, how, cols


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bnbcy", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--cols", type=int, default=1024)
    ap.add_argument("--blocksizes", default="64,256,1024,4096")
    ap.add_argument("--hidden", type=int, default=1024, help="4-bit and int8 demos: model width")
    ap.add_argument("--ffn", type=int, default=4096, help="4-bit and int8 demos: feed-forward width")
    ap.add_argument("--blocks", type=int, default=2, help="4-bit and int8 demos: residual MLP blocks")
    ap.add_argument("--batch", type=int, default=8, help="4-bit and int8 demos: rows of the input batch")
    ap.add_argument("--outliers", type=int, default=4,
                    help="int8 demo: input feature columns holding outliers (|x| 15-25)")
    ap.add_argument("--optim-steps", type=int, default=200, help="optimizer demo: training steps")
    args = ap.parse_args(argv)

    info = bnbcy.build_info()
    _print_features(info)
    from ._gpu_evidence import evidence, format_evidence   # how the GPU path was checked (its rule)
    print("\n".join(format_evidence(evidence())))
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

    print(f"\n4-bit linear layers (blocksize 64, double-quantized statistics) in a generated bf16 MLP: "
          f"{args.blocks} blocks of x + down(gelu(up(x))), {args.hidden}->{args.ffn}->{args.hidden}, "
          f"input {args.batch}x{args.hidden}")
    header = f"{'device':6}  {'weights':7}  {'weight bytes':>12}  {'ratio':>5}  {'rel L2 err':>10}  " \
             f"{'forward ms':>10}"
    print(header)
    print("-" * len(header))
    how = None
    for device in devices:
        rows, how = _demo_4bit(device, args.hidden, args.ffn, args.blocks, args.batch)
        dense_bytes = rows[0][2]
        for dev, label, nbytes, rel, ms in rows:
            name = "bf16" if label == "dense" else label
            print(f"{dev:6}  {name:7}  {nbytes:>12,}  {dense_bytes / nbytes:>5.2f}  {rel:>10.3e}  {ms:>10.2f}")
    print(f"\nquantized with {how}; weight bytes count the linear weights (4-bit: packed codes + "
          "absmax codes + nested state),\nrel L2 err is the model output against the float64 dense "
          "model, forward ms the median of 3 forwards.")

    outliers = max(0, min(args.outliers, args.hidden))
    print(f"\nLLM.int8 linear layers (Linear8bitLt, has_fp16_weights=False) in a generated fp16 MLP: "
          f"{args.blocks} blocks of x + down(gelu(up(x))), {args.hidden}->{args.ffn}->{args.hidden}, "
          f"input {args.batch}x{args.hidden} with {outliers} outlier feature columns")
    header = f"{'device':6}  {'weights':7}  {'threshold':>9}  {'weight bytes':>12}  {'ratio':>5}  " \
             f"{'rel L2 err':>10}  {'forward ms':>10}"
    print(header)
    print("-" * len(header))
    how = cols = None
    for device in devices:
        rows, how, cols = _demo_int8(device, args.hidden, args.ffn, args.blocks, args.batch, outliers)
        dense_bytes = rows[0][3]
        for dev, label, threshold, nbytes, rel, ms in rows:
            name = "fp16" if label == "dense" else label
            thr = "-" if threshold is None else f"{threshold:.1f}"
            print(f"{dev:6}  {name:7}  {thr:>9}  {nbytes:>12,}  {dense_bytes / nbytes:>5.2f}  {rel:>10.3e}  "
                  f"{ms:>10.2f}")
    print(f"\nquantized with {how}; outlier columns {cols}. Weight bytes count int8 codes + float32 row "
          "scales (SCB);\nthreshold 6.0 multiplies the input columns holding |x| >= 6 in fp16 (the rest in "
          "int8), 0.0 quantizes all of them.")

    from ._main_optim import run as run_optimizers
    for device in devices:
        run_optimizers(device, steps=args.optim_steps)


if __name__ == "__main__":
    main()
