"""CPU 4-bit inference: ``Linear4bit`` forward (bnbcy's execution layout) against bitsandbytes
0.50.2's ``Linear4bit`` and the dense bf16 ``nn.Linear``, and greedy generation through
transformers (issue 15). One command, one interleaved run; prints and writes JSON to
``bench/results/``.

Usage::

    python bench/bench_fourbit.py               # the bars (several minutes on 2 cores)
    python bench/bench_fourbit.py --quick       # smoke run (small layers, few rounds)
    python bench/bench_fourbit.py --calibrate   # fused/tiled cut-over and threads for this ISA
    python bench/bench_fourbit.py --generate    # only the generation through transformers
    python bench/bench_fourbit_functional.py    # the functional quantize/dequantize/gemv bench

Method
------
* Layers: NF4, blocksize 64, double-quantized statistics, bf16 input and compute dtype, eval
  mode, inference mode, after warm-up (bnbcy builds its layout, bitsandbytes repacks where its
  CPU has AVX512-BF16). Each implementation rotates among enough layers that their weights
  exceed 1.5x the L3 cache (32 MB), as the layers of a model do; every round times one call of
  each implementation (interleaved), ``--repeats`` rounds (30), medians with min and IQR.
* Shapes ``K -> N``: 4096->4096, 2048->5632, 5632->2048; rows 1, 4, 16, 64, 256. bnbcy is also
  timed with float16 and float32 inputs (compute dtype = input dtype) for the dtype bar.
* GB/s: the packed weight and its statistics bytes per call over the median time, against the
  machine's read bandwidth (a 2-thread ``torch.sum`` over 512 MB, best of the rounds).
* Generation: a generated ~100M-parameter Llama-style model (2 layers, hidden 2048,
  intermediate 5632, GQA 16/4 heads, vocabulary 8192) in bf16; bnbcy quantizes its linear
  layers with ``bnbcy.nn.replace_linear`` (lm_head kept), bitsandbytes loads it through
  ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant, bf16 compute)``. Greedy,
  16-token prompt, 16 new tokens, batch 1 and 8, interleaved rounds; tokens/s = batch*16/time.

Bars (PASS/FAIL lines): against bitsandbytes >= 1.3x at 1 row, >= 1.5x at 4, >= 2x at 16,
>= 1.0x at 64 and 256; >= 1.0x dense bf16 at 64 and 256; float16 and float32 inputs within
1.2x of bf16's time; generation >= 1.3x bitsandbytes' tokens/s at batch 1 and 8.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script from anywhere
import harness  # noqa: E402

from bnbcy import _C  # noqa: E402
from bnbcy._main_fourbit import (bitsandbytes_or_none, interleaved, make_layers, rotating_call,  # noqa: E402
                                 summary, with_compute_dtype)

SHAPES = ((4096, 4096), (2048, 5632), (5632, 2048))
ROWS = (1, 4, 16, 64, 256)
L3_BYTES = 32 << 20
SPEEDUP_BARS = {1: 1.3, 4: 1.5, 16: 2.0, 64: 1.0, 256: 1.0}
DENSE_BAR_ROWS = (64, 256)
DTYPE_BAR = 1.2
GEN_BAR = 1.3


def packed_bytes(K, N, blocksize=64):
    """Bytes a 4-bit forward reads of the weight: codes + uint8 absmax + nested float32 absmax."""
    nblocks = -(-K * N // blocksize)
    return (K * N + 1) // 2 + nblocks + 4 * -(-nblocks // 256)


def rotation(nbytes):
    return max(2, math.ceil(1.5 * L3_BYTES / nbytes))


def read_bandwidth(repeats=10):
    """Read GB/s of a 2-thread ``torch.sum`` over 512 MB (best and median of the rounds)."""
    x = torch.ones(128 << 20, dtype=torch.float32)
    x.sum()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t0)
    s = summary(ts)
    return {"best_gbps": x.numel() * 4 / s["min_ms"] / 1e6, "median_gbps": x.numel() * 4 / s["median_ms"] / 1e6}


def bench_layers(shapes, rows, repeats, bnb, with_dtypes=True):
    results = []
    for K, N in shapes:
        q_bytes = packed_bytes(K, N)
        impls = {"bnbcy": make_layers("bnbcy", K, N, rotation(q_bytes))}
        if bnb is not None:
            impls["bitsandbytes"] = make_layers("bitsandbytes", K, N, rotation(q_bytes))
        impls["dense"] = make_layers("dense", K, N, rotation(2 * K * N))
        if with_dtypes:
            impls["bnbcy_f16"] = with_compute_dtype(impls["bnbcy"], torch.float16)
            impls["bnbcy_f32"] = with_compute_dtype(impls["bnbcy"], torch.float32)
        for M in rows:
            x = torch.randn(M, K, generator=torch.Generator().manual_seed(M)).bfloat16()
            inputs = {"bnbcy_f16": x.half(), "bnbcy_f32": x.float()}
            # the dtype variants share bnbcy's layers: each starts a third of the rotation further on
            starts = {"bnbcy_f16": len(impls["bnbcy"]) // 3, "bnbcy_f32": 2 * len(impls["bnbcy"]) // 3}
            fns = {name: rotating_call(layers, inputs.get(name, x), starts.get(name, 0))
                   for name, layers in impls.items()}
            times = interleaved(fns, repeats)
            entry = {"K": K, "N": N, "rows": M, "layers": {n: len(v) for n, v in impls.items()},
                     "weight_bytes": q_bytes, "raw_s": times,
                     "stats": {name: summary(ts) for name, ts in times.items()}}
            st = entry["stats"]
            entry["bnbcy_gbps"] = q_bytes / st["bnbcy"]["median_ms"] / 1e6
            results.append(entry)
            line = f"{K:>5}->{N:<5} rows {M:>3}: " + "  ".join(
                f"{n} {s['median_ms']:.3f} ms (min {s['min_ms']:.3f}, IQR {s['iqr_ms']:.3f})" for n, s in st.items())
            print(line + f"  | bnbcy {entry['bnbcy_gbps']:.1f} GB/s of weight", flush=True)
    return results


def _llama_config(vocab=8192):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=vocab, hidden_size=2048, intermediate_size=5632, num_hidden_layers=2,
                       num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256,
                       tie_word_embeddings=False)


def bench_generation(bnb, batches, repeats, new_tokens=16, prompt=16):
    """tokens/s of greedy generation, bnbcy (replace_linear) and bitsandbytes (BitsAndBytesConfig)."""
    try:
        import transformers
        from transformers import BitsAndBytesConfig, LlamaForCausalLM
    except Exception as exc:  # optional: report why it did not run
        return {"skipped": f"transformers unavailable: {exc}"}
    import bnbcy
    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_config()).to(torch.bfloat16).eval()
    n_params = sum(p.numel() for p in base.parameters())
    models = {}
    with tempfile.TemporaryDirectory() as d:
        base.save_pretrained(d)
        ours = LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.bfloat16).eval()
        bnbcy.nn.replace_linear(ours, bnbcy.nn.Linear4bit, compute_dtype=torch.bfloat16, quant_type="nf4",
                                compress_statistics=True)
        models["bnbcy"] = ours
        if bnb is not None:
            try:
                cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                         bnb_4bit_compute_dtype=torch.bfloat16)
                models["bitsandbytes"] = LlamaForCausalLM.from_pretrained(
                    d, quantization_config=cfg, torch_dtype=torch.bfloat16, device_map="cpu").eval()
            except Exception as exc:
                print(f"bitsandbytes through transformers failed: {type(exc).__name__}: {exc}")
    del base
    out = {"transformers": transformers.__version__, "params": n_params, "new_tokens": new_tokens,
           "prompt": prompt, "batches": {}}
    for B in batches:
        ids = torch.randint(1, 8192, (B, prompt), generator=torch.Generator().manual_seed(B))
        tokens = {}

        def gen(name, m=None):
            def call():
                tokens[name] = models[name].generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                     max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                                     pad_token_id=0)
            return call
        times = interleaved({name: gen(name) for name in models}, repeats, warmup=1)
        st = {name: summary(ts) for name, ts in times.items()}
        entry = {"stats": st, "tokens_per_s": {n: B * new_tokens / (s["median_ms"] / 1e3) for n, s in st.items()}}
        if "bitsandbytes" in tokens:
            entry["same_tokens_fraction"] = float((tokens["bnbcy"] == tokens["bitsandbytes"]).float().mean())
        out["batches"][B] = entry
        print(f"generate batch {B}: " + "  ".join(f"{n} {v:.1f} tok/s" for n, v in entry["tokens_per_s"].items())
              + (f"  (same tokens: {entry['same_tokens_fraction']:.0%})" if "same_tokens_fraction" in entry else ""),
              flush=True)
    return out


def evaluate(layer_results, gen):
    bars = []

    def bar(name, value, need, higher=True):
        ok = None if value is None else (value >= need if higher else value <= need)
        bars.append({"bar": name, "value": value, "need": need, "pass": ok})

    for e in layer_results:
        st, tag = e["stats"], f"{e['K']}->{e['N']} rows {e['rows']}"
        med = {n: s["median_ms"] for n, s in st.items()}
        if e["rows"] in SPEEDUP_BARS and "bitsandbytes" in med:
            bar(f"{tag}: bitsandbytes/bnbcy", med["bitsandbytes"] / med["bnbcy"], SPEEDUP_BARS[e["rows"]])
        if e["rows"] in DENSE_BAR_ROWS:
            bar(f"{tag}: dense bf16/bnbcy", med["dense"] / med["bnbcy"], 1.0)
        for d in ("f16", "f32"):
            if f"bnbcy_{d}" in med:
                bar(f"{tag}: bnbcy {d}/bf16 time", med[f"bnbcy_{d}"] / med["bnbcy"], DTYPE_BAR, higher=False)
    for B, g in (gen or {}).get("batches", {}).items():
        tps = g["tokens_per_s"]
        if "bitsandbytes" in tps:
            bar(f"generate batch {B}: bnbcy/bitsandbytes tokens/s", tps["bnbcy"] / tps["bitsandbytes"], GEN_BAR)
    return bars


def under_plan(isa, plan, f):
    """``f`` run with ``PLANS[isa]`` set to ``plan`` for the call (restored after)."""
    from bnbcy._ops import fourbit_exec as FE

    def call():
        base = FE.PLANS[isa]
        FE.PLANS[isa] = plan
        try:
            return f()
        finally:
            FE.PLANS[isa] = base
    return call


def calibrate(K, N, repeats):
    """Fused vs tiled at several row counts, and 1 vs 2 threads for small layers, on this ISA."""
    import dataclasses
    from bnbcy._ops import fourbit_exec as FE
    isa, base = FE.kernel_isa(), FE.plan()
    layers = make_layers("bnbcy", K, N, rotation(packed_bytes(K, N)))
    report = {"isa": isa, "plan": dataclasses.asdict(base), "rows": {}, "threads": {}}
    for M in (2, 4, 8, 12, 16, 24, 32, 48):
        x = torch.randn(M, K).bfloat16()
        fns = {"fused": under_plan(isa, dataclasses.replace(base, fused_max_rows=10 ** 9), rotating_call(layers, x)),
               "tiled": under_plan(isa, dataclasses.replace(base, fused_max_rows=0), rotating_call(layers, x))}
        st = {n: summary(t) for n, t in interleaved(fns, repeats).items()}
        report["rows"][M] = st
        print(f"calibrate rows {M:>3}: fused {st['fused']['median_ms']:.3f} ms  tiled {st['tiled']['median_ms']:.3f} ms",
              flush=True)
    tiled_wins = [M for M, st in report["rows"].items() if st["tiled"]["median_ms"] < st["fused"]["median_ms"]]
    report["suggested_fused_max_rows"] = (min(tiled_wins) - 1) if tiled_wins else max(report["rows"])
    for k in (256, 512, 1024, 2048):
        small = make_layers("bnbcy", k, k, 8)
        x = torch.randn(1, k).bfloat16()
        fns = {t: under_plan(isa, dataclasses.replace(base, weights_per_thread=(k * k if t == 1 else 1)),
                             rotating_call(small, x)) for t in (1, 2)}
        st = {n: summary(ts) for n, ts in interleaved(fns, repeats).items()}
        report["threads"][k * k] = st
        print(f"calibrate {k}x{k} 1 row: 1 thread {st[1]['median_ms']:.3f} ms  2 threads {st[2]['median_ms']:.3f} ms",
              flush=True)
    two_win = [w for w, st in report["threads"].items() if st[2]["median_ms"] < st[1]["median_ms"]]
    report["suggested_weights_per_thread"] = (min(two_win) // 2) if two_win else None
    print(f"suggested for '{isa}': fused_max_rows={report['suggested_fused_max_rows']}, "
          f"weights_per_thread={report['suggested_weights_per_thread']} (now {base})")
    return report


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: small layers, 5 rounds, batch 1 only")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-generate", action="store_true", help="skip the transformers generation")
    ap.add_argument("--calibrate", action="store_true", help="measure the cut-over and threads of this ISA")
    ap.add_argument("--generate", action="store_true", help="only the generation bench (batch 1 and 8)")
    ap.add_argument("--gen-repeats", type=int, default=5, help="interleaved rounds of the generation bench")
    ap.add_argument("--strict", action="store_true", help="exit 1 when a bar fails")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/...)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    meta = harness.collect_metadata("cpu")
    meta["cpu_flags"] = sorted(f for f in _cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))
    meta["bnbcy_cpu_isa"] = _C.cpu_isa()
    from bnbcy._ops import fourbit_exec
    meta["bnbcy_kernel_isa"] = fourbit_exec.kernel_isa()  # after the self-check
    meta["load_average"] = os.getloadavg()
    print(f"CPU {meta['cpu_model']} ({', '.join(meta['cpu_flags'])}), bnbcy ISA {meta['bnbcy_cpu_isa']}, "
          f"{args.threads} threads, load average {meta['load_average'][0]:.1f}")
    bnb = bitsandbytes_or_none()
    if args.calibrate:
        report = {"calibration": calibrate(1024 if args.quick else 4096, 1024 if args.quick else 4096,
                                           5 if args.quick else args.repeats)}
        return _write(args, meta, report, "calibrate")
    if args.generate:
        gen = bench_generation(bnb, (1,) if args.quick else (1, 8), 2 if args.quick else args.gen_repeats)
        bars = evaluate([], gen)
        _print_bars(bars)
        _write(args, meta, {"generation": gen, "bars": bars}, "generate")
        return 1 if args.strict and any(b["pass"] is False for b in bars) else 0
    repeats = 5 if args.quick else args.repeats
    shapes = ((1024, 1024), (512, 1408)) if args.quick else SHAPES
    rows = (1, 16, 64) if args.quick else ROWS
    bw = read_bandwidth()
    print(f"read bandwidth: best {bw['best_gbps']:.1f} GB/s, median {bw['median_gbps']:.1f} GB/s")
    layers = bench_layers(shapes, rows, repeats, bnb)
    gen = None if args.no_generate else bench_generation(bnb, (1,) if args.quick else (1, 8),
                                                         2 if args.quick else args.gen_repeats)
    bars = evaluate(layers, gen)
    _print_bars(bars)
    one_row = [e for e in layers if e["rows"] == 1]
    for e in one_row:
        print(f"1 row {e['K']}->{e['N']}: {e['bnbcy_gbps']:.1f} GB/s of weight bytes = "
              f"{e['bnbcy_gbps'] / bw['best_gbps']:.0%} of the measured read bandwidth")
    _write(args, meta, {"read_bandwidth": bw, "layers": layers, "generation": gen, "bars": bars})
    return 1 if args.strict and any(b["pass"] is False for b in bars) else 0


def _print_bars(bars):
    for b in bars:
        status = "N/A" if b["pass"] is None else ("PASS" if b["pass"] else "FAIL")
        print(f"{status:4}  {b['bar']}: {b['value']:.2f} (need {'>=' if 'time' not in b['bar'] else '<='} {b['need']})")


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return line.split(":", 1)[1].split()
    except OSError:
        pass
    return []


def _write(args, meta, payload, kind="module"):
    stamp = time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())
    path = args.out or harness.RESULTS_DIR / f"fourbit-exec-{kind}-{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"benchmark": "fourbit_exec", "meta": meta, **payload}, indent=1, default=str))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
