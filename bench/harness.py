"""Small, reusable benchmark harness for bnbcy.

A benchmark script describes its work as a list of :class:`Case` objects; each
case carries, per implementation (``bnbcy``, ``bitsandbytes``, ``torch``), a
function that binds prepared inputs into a zero-argument callable. The harness
allocates the inputs, binds the callables (outside the timed region), warms
them up, times them, optionally checks their outputs against a reference
implementation, and reports a text table plus a JSON file with every raw
sample and the run's metadata.

Timing
------
* CPU: ``time.perf_counter`` around each call, after warm-up, with the garbage
  collector paused; the call's result is released *after* the clock is read so
  that freeing a large output is not billed to the call.
* CUDA: a ``torch.cuda.Event(enable_timing=True)`` pair recorded on the current
  stream around each call, after warm-up and ``torch.cuda.synchronize()``. The
  wall-clock time of the whole loop is also recorded: if the event times add up
  to much less than the wall time, the implementation probably launched its
  kernels on a stream other than ``torch.cuda.current_stream()`` and the event
  times are meaningless (the harness warns).
* L2 residency (CUDA): when a case's per-call footprint is smaller than twice
  the L2 cache, the inputs are cloned into several copies and the timed calls
  rotate among them, so a call never finds its inputs left in L2 by the
  previous one (see :func:`auto_rotation`).

An implementation whose import, preparation or call raises is reported as
``n/a`` together with the reason; it never aborts the run.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import gc
import importlib
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch

#: Repository root (``bench/..``); used for ``git rev-parse`` and result paths.
REPO_ROOT = Path(__file__).resolve().parent.parent
#: Default folder for JSON results.
RESULTS_DIR = REPO_ROOT / "bench" / "results"
#: Implementations in the order they appear in tables.
DEFAULT_IMPLS = ("bnbcy", "bitsandbytes", "torch")
#: Short names used in table headers to keep rows narrow.
SHORT_NAMES = {"bitsandbytes": "bnb"}
#: Fallback L2 size (H100 has 50 MB) when the device does not report one.
DEFAULT_L2_BYTES = 50 * 1024 * 1024
#: IQR above this fraction of the median marks a timing as noisy ('~').
NOISY_IQR_FRACTION = 0.10

SCHEMA = "bnbcy-bench/1"


class ImplUnavailable(Exception):
    """Raised by a bind function when an implementation cannot run a case.

    The message is reported as the ``n/a`` reason; use it for expected
    situations (library not installed, dtype not supported) so that the report
    shows a one-line reason instead of a traceback.
    """


# --------------------------------------------------------------------------
# Case description
# --------------------------------------------------------------------------

Binder = Callable[[Any], Optional[Callable[[], Any]]]


@dataclasses.dataclass
class Case:
    """One benchmarked operation at one parameter point.

    Parameters
    ----------
    name : str
        Row label, e.g. ``"quantize f32 bs=4096 n=16M"``.
    params : dict
        Parameters of the case (stored verbatim in the JSON; used by bars to
        select cases, e.g. ``params["op"] == "quantize"``).
    nbytes : int
        Bytes one call reads plus writes; used for GB/s and % of copy
        bandwidth.
    setup : callable
        ``setup() -> inputs``. Allocates the inputs (any structure of tensors in
        tuples, lists or dicts). Called once per case, outside the timed region;
        for input rotation the harness clones the result (:func:`clone_inputs`).
    impls : dict of str to callable
        ``{impl_name: bind}`` where ``bind(inputs) -> fn`` does all
        implementation-specific preparation (e.g. quantizing the input for a
        dequantize benchmark) and returns the zero-argument callable that is
        timed. ``bind`` may raise (reported as ``n/a``) or return ``None``
        (reported as ``n/a: not provided``).
    device : str
        ``"cpu"`` or ``"cuda"``; selects the timer.
    rotate : int or None
        Number of input copies the timed calls rotate among. ``None`` picks
        automatically (:func:`auto_rotation`): on CUDA enough copies to exceed
        twice the L2 cache, on CPU one.
    reference : str or None
        Implementation whose output the others are compared with by ``check``.
        It runs first so its output is available.
    check : callable or None
        ``check(reference_output, output) -> dict`` returning metrics, and
        ``"ok": bool``. Stored in the JSON; failures are printed under the
        table.
    """

    name: str
    params: dict
    nbytes: int
    setup: Callable[[], Any]
    impls: Mapping[str, Binder]
    device: str = "cpu"
    rotate: Optional[int] = None
    reference: Optional[str] = "bitsandbytes"
    check: Optional[Callable[[Any, Any], dict]] = None


def clone_inputs(obj: Any) -> Any:
    """Deep-copy the tensors in a nested tuple/list/dict structure.

    Non-tensor leaves are shared, not copied. Used to make the extra input
    copies for L2 rotation: distinct memory with identical contents.
    """
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, tuple):
        return tuple(clone_inputs(o) for o in obj)
    if isinstance(obj, list):
        return [clone_inputs(o) for o in obj]
    if isinstance(obj, dict):
        return {k: clone_inputs(v) for k, v in obj.items()}
    return obj


def l2_cache_bytes(device: str) -> int:
    """L2 cache size of the current CUDA device in bytes.

    Falls back to :data:`DEFAULT_L2_BYTES` when the property is missing (older
    torch) or the device is not CUDA.
    """
    if device != "cuda" or not torch.cuda.is_available():
        return DEFAULT_L2_BYTES
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    size = getattr(props, "L2_cache_size", 0) or 0
    return int(size) if size > 0 else DEFAULT_L2_BYTES


def auto_rotation(device: str, footprint: int, max_copies: int = 32) -> int:
    """Number of input copies needed to keep a CUDA case out of L2.

    Parameters
    ----------
    device : str
        ``"cpu"`` or ``"cuda"``.
    footprint : int
        Bytes one call touches (reads + writes).
    max_copies : int
        Upper bound, so tiny cases do not allocate hundreds of copies.

    Returns
    -------
    int
        1 on CPU (its caches are far smaller than the sizes benchmarked here),
        otherwise ``ceil(2 * L2 / footprint)`` clamped to ``[1, max_copies]``.
        Twice L2 because L2 is not perfectly LRU: with barely more than L2 of
        data a noticeable part of the previous call's data can still hit.
    """
    if device != "cuda":
        return 1
    target = 2 * l2_cache_bytes(device)
    if footprint <= 0 or footprint >= target:
        return 1
    return max(1, min(max_copies, math.ceil(target / footprint)))


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Samples and summary statistics of one implementation on one case.

    All times are in milliseconds. ``wall_ms_mean`` is only set on CUDA: the
    host wall-clock time of the whole timed loop (ended by a synchronize)
    divided by the number of calls.
    """

    samples_ms: list
    median_ms: float
    min_ms: float
    mean_ms: float
    q1_ms: float
    q3_ms: float
    iqr_ms: float
    copies: int
    warmup: int
    wall_ms_mean: Optional[float] = None

    @classmethod
    def from_samples(cls, samples_ms: Sequence[float], copies: int, warmup: int,
                     wall_ms_mean: Optional[float] = None) -> "Timing":
        s = [float(x) for x in samples_ms]
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(samples_ms=s, median_ms=statistics.median(s), min_ms=min(s),
                   mean_ms=statistics.fmean(s), q1_ms=q1, q3_ms=q3, iqr_ms=q3 - q1,
                   copies=copies, warmup=warmup, wall_ms_mean=wall_ms_mean)


def _warm_up(fns: Sequence[Callable[[], Any]], warmup: int) -> Any:
    """Call every copy at least once (and ``warmup`` calls in total).

    Returns the output of the first call (on copy 0) for the correctness check;
    the first call also absorbs one-time costs (kernel compilation, lazy
    imports, first-touch page faults).
    """
    first = fns[0]()
    for i in range(1, max(warmup, len(fns))):
        out = fns[i % len(fns)]()
        del out
    return first


def time_cpu(fns: Sequence[Callable[[], Any]], repeats: int) -> Timing:
    """Time already warmed-up CPU callables with ``time.perf_counter``.

    Parameters
    ----------
    fns : sequence of callables
        One zero-argument callable per input copy; call ``i`` uses
        ``fns[i % len(fns)]``.
    repeats : int
        Number of timed calls.
    """
    samples = []
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call would be billed to it
    try:
        out = None
        for i in range(repeats):
            fn = fns[i % len(fns)]
            t0 = time.perf_counter()
            out = fn()
            t1 = time.perf_counter()
            out = None  # free the result outside the timed interval
            samples.append((t1 - t0) * 1e3)
        del out
    finally:
        if gc_was_enabled:
            gc.enable()
    return Timing.from_samples(samples, copies=len(fns), warmup=0)


def time_cuda(fns: Sequence[Callable[[], Any]], repeats: int) -> Timing:
    """Time already warmed-up CUDA callables with CUDA events.

    One event pair per call is recorded on ``torch.cuda.current_stream()``; the
    host does not wait between calls, so for kernels longer than their launch
    overhead the events measure GPU execution time, and for launch-bound calls
    they measure the real per-call throughput including the host side.
    Reading the events happens after a single final synchronize.
    """
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(repeats)]
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        torch.cuda.synchronize()
        out = None
        t0 = time.perf_counter()
        for i in range(repeats):
            fn = fns[i % len(fns)]
            starts[i].record()
            out = fn()
            ends[i].record()
            out = None  # returns the block to the caching allocator, stream-ordered
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        del out
    finally:
        if gc_was_enabled:
            gc.enable()
    samples = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    return Timing.from_samples(samples, copies=len(fns), warmup=0,
                               wall_ms_mean=wall * 1e3 / repeats)


def time_interleaved(impls: Mapping[str, Sequence[Callable[[], Any]]], device: str, repeats: int) -> dict:
    """Time warmed-up implementations round by round: round ``r`` calls every implementation's
    ``fns[r % len(fns)]`` once, in the order given. Returns ``{name: Timing}``.

    CPU calls are timed with ``time.perf_counter``; CUDA calls with an event pair each, read
    after one synchronize per round.
    """
    samples = {name: [] for name in impls}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # a collection in the middle of a call would be billed to it
    try:
        for r in range(repeats):
            events = []
            for name, fns in impls.items():
                fn = fns[r % len(fns)]
                if device == "cuda":
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    out = fn()
                    end.record()
                    events.append((name, start, end))
                else:
                    t0 = time.perf_counter()
                    out = fn()
                    t1 = time.perf_counter()
                    samples[name].append((t1 - t0) * 1e3)
                out = None  # noqa: F841  (freed outside the timed interval)
            if device == "cuda":
                torch.cuda.synchronize()
                for name, start, end in events:
                    samples[name].append(start.elapsed_time(end))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing.from_samples(v, copies=len(impls[name]), warmup=0) for name, v in samples.items() if v}


def time_callables(fns: Sequence[Callable[[], Any]], device: str, warmup: int,
                   repeats: int) -> tuple:
    """Warm up, then time ``fns`` on ``device``.

    Returns
    -------
    (Timing, Any)
        The timing and the output of the first warm-up call.
    """
    first = _warm_up(fns, warmup)
    if device == "cuda":
        torch.cuda.synchronize()  # surface asynchronous errors of the warm-up here
        timing = time_cuda(fns, repeats)
    else:
        timing = time_cpu(fns, repeats)
    timing.warmup = max(warmup, len(fns))
    return timing, first


def measure_copy_bandwidth(device: str = "cuda", nbytes: int = 1 << 30, warmup: int = 3,
                           repeats: int = 20) -> dict:
    """Device-to-device copy bandwidth, the yardstick for "% of copy bandwidth".

    Times ``dst.copy_(src)`` on two ``nbytes`` float32 buffers with the same
    timers as the benchmarks, and counts ``2 * nbytes`` (read + write) per copy.

    Parameters
    ----------
    device : str
        ``"cuda"`` (the intended use) or ``"cpu"``.
    nbytes : int
        Size of one buffer; 1 GiB is far beyond any L2 and long enough
        (~0.7 ms on an H100) for event resolution to be irrelevant.

    Returns
    -------
    dict
        ``{"nbytes": ..., "gbps": median-based GB/s, "gbps_best": min-based GB/s,
        "timing": {...}}``, GB meaning 1e9 bytes.
    """
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    fns = [lambda: dst.copy_(src)]
    timing, _ = time_callables(fns, device, warmup, repeats)
    moved = 2 * numel * 4
    del src, dst, fns
    if device == "cuda":
        torch.cuda.empty_cache()
    return {
        "nbytes": numel * 4,
        "bytes_moved_per_copy": moved,
        "gbps": moved / (timing.median_ms * 1e-3) / 1e9,
        "gbps_best": moved / (timing.min_ms * 1e-3) / 1e9,
        "timing": dataclasses.asdict(timing),
    }


# --------------------------------------------------------------------------
# Running cases
# --------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    """One-line reason for an ``n/a``: exception type, message and origin."""
    if isinstance(exc, ImplUnavailable):
        return str(exc)
    msg = str(exc).strip().splitlines()
    first = msg[0] if msg else ""
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    text = f"{type(exc).__name__}: {first}{where}"
    return text if len(text) <= 300 else text[:297] + "..."


def _free(device: str) -> None:
    gc.collect()
    if device == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_case(case: Case, warmup: int = 3, repeats: int = 20,
             copy_gbps: Optional[float] = None, ratio_base: str = "bnbcy",
             log: Callable[[str], None] = lambda s: None) -> dict:
    """Prepare, warm up, time and check every implementation of one case.

    Parameters
    ----------
    case : Case
        The case to run.
    warmup, repeats : int
        Untimed and timed calls per implementation.
    copy_gbps : float or None
        Copy bandwidth for the "% of copy" figures (None on CPU).
    ratio_base : str
        Implementation in the denominator of the speed ratios; a ratio
        ``other/base > 1`` means ``base`` is faster.
    log : callable
        Progress sink (one short line per implementation).

    Returns
    -------
    dict
        JSON-ready result: name, params, nbytes, copies, per-impl status,
        timing, GB/s, % of copy bandwidth, check metrics, and ratios.
    """
    result = {"name": case.name, "params": dict(case.params), "nbytes": int(case.nbytes),
              "device": case.device, "impls": {}, "ratios": {}}
    copies = case.rotate if case.rotate is not None else auto_rotation(case.device, case.nbytes)
    result["copies"] = copies

    try:
        base = case.setup()
        inputs = [base] + [clone_inputs(base) for _ in range(copies - 1)]
        del base
        if case.device == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # e.g. out of memory: the whole case is n/a
        reason = "setup failed: " + _reason(exc)
        for name in case.impls:
            result["impls"][name] = {"status": "n/a", "reason": reason}
        log(f"  {case.name}: {reason}")
        _free(case.device)
        return result

    # The reference runs first so the others can be compared with its output.
    order = list(case.impls)
    if case.reference in case.impls:
        order.remove(case.reference)
        order.insert(0, case.reference)

    # Prepare and warm up every implementation, then time them interleaved: round r calls each
    # implementation once, in turn, so a stall of the machine (these VMs stall threads in ~4 ms
    # quanta) or a drift of its clock hits all of them alike instead of one implementation's
    # whole series.
    ref_out = None
    ready = {}
    for name in order:
        entry: dict = {"status": "n/a", "reason": None}
        result["impls"][name] = entry
        fns = None
        out = None
        try:
            fns = [case.impls[name](inp) for inp in inputs]
            if any(fn is None for fn in fns):
                raise ImplUnavailable("not provided for this case")
            out = _warm_up(fns, warmup)
            if case.device == "cuda":
                torch.cuda.synchronize()  # surface asynchronous errors of the warm-up here
        except Exception as exc:
            entry["reason"] = _reason(exc)
            log(f"  {case.name} [{name}]: n/a ({entry['reason']})")
            del fns, out
            _free(case.device)
            continue
        ready[name] = fns
        if case.check is not None:
            try:
                if name == case.reference:
                    ref_out = out
                elif ref_out is not None:
                    entry["check"] = case.check(ref_out, out)
            except Exception as exc:
                entry["check"] = {"ok": False, "error": _reason(exc)}
        del out

    timings = time_interleaved(ready, case.device, repeats)
    for name, timing in timings.items():
        entry = result["impls"][name]
        timing.warmup = max(warmup, len(ready[name]))
        entry["status"] = "ok"
        entry.update(dataclasses.asdict(timing))
        entry["gbps"] = case.nbytes / (timing.median_ms * 1e-3) / 1e9
        entry["pct_copy"] = 100.0 * entry["gbps"] / copy_gbps if copy_gbps else None
        if case.device == "cuda":
            entry["peak_mem_bytes"] = int(torch.cuda.max_memory_allocated())
        log(f"  {case.name} [{name}]: median {timing.median_ms:.3f} ms (min {timing.min_ms:.3f}, "
            f"IQR {timing.iqr_ms:.3f}), {entry['gbps']:.1f} GB/s")
    del ready
    del inputs, ref_out
    _free(case.device)

    base = result["impls"].get(ratio_base, {})
    for name, entry in result["impls"].items():
        if name == ratio_base:
            continue
        if base.get("status") == "ok" and entry.get("status") == "ok":
            result["ratios"][f"{name}/{ratio_base}"] = entry["median_ms"] / base["median_ms"]
        else:
            result["ratios"][f"{name}/{ratio_base}"] = None
    return result


def run_cases(cases: Iterable[Case], warmup: int = 3, repeats: int = 20,
              copy_gbps: Optional[float] = None, ratio_base: str = "bnbcy",
              verbose: bool = True) -> list:
    """Run :func:`run_case` on each case in turn; progress goes to stderr.

    ``cases`` may be a generator: only one case's inputs are alive at a time
    (setup happens inside :func:`run_case`).
    """
    log = (lambda s: print(s, file=sys.stderr, flush=True)) if verbose else (lambda s: None)
    results = []
    for case in cases:
        log(f"[{len(results) + 1}] {case.name}")
        results.append(run_case(case, warmup=warmup, repeats=repeats, copy_gbps=copy_gbps,
                                ratio_base=ratio_base, log=log))
    return results


# --------------------------------------------------------------------------
# Pass/fail bars
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Bar:
    """A performance target evaluated over a selection of cases.

    Parameters
    ----------
    label : str
        Printed description, e.g. ``"CPU quantize: bnbcy >= 5x bitsandbytes"``.
    select : callable
        ``select(case_result) -> bool`` picks the cases the bar applies to.
    metric : callable
        ``metric(case_result) -> float or None`` (None when not measurable,
        e.g. an implementation is n/a).
    threshold : float
        The bar passes when ``metric >= threshold`` for every selected case.
    """

    label: str
    select: Callable[[dict], bool]
    metric: Callable[[dict], Optional[float]]
    threshold: float


def ratio_metric(other: str, base: str = "bnbcy") -> Callable[[dict], Optional[float]]:
    """Metric: ``time(other) / time(base)`` (> 1 means ``base`` is faster)."""
    return lambda r: r["ratios"].get(f"{other}/{base}")


def pct_copy_metric(impl: str = "bnbcy") -> Callable[[dict], Optional[float]]:
    """Metric: ``impl``'s bandwidth as % of the device copy bandwidth."""
    return lambda r: r["impls"].get(impl, {}).get("pct_copy")


def evaluate_bars(bars: Sequence[Bar], results: Sequence[dict]) -> list:
    """Evaluate bars; returns JSON-ready dicts with status PASS, FAIL or N/A.

    A bar is N/A when none of its cases could be measured, FAIL when any
    selected case misses the threshold or could not be measured.
    """
    out = []
    for bar in bars:
        sel = [r for r in results if bar.select(r)]
        vals = [(r["name"], bar.metric(r)) for r in sel]
        measured = [(n, v) for n, v in vals if v is not None]
        missing = [n for n, v in vals if v is None]
        failing = [n for n, v in measured if v < bar.threshold]
        if not measured:
            status = "N/A"
        elif failing or missing:
            status = "FAIL"
        else:
            status = "PASS"
        worst = min(measured, key=lambda nv: nv[1]) if measured else None
        out.append({"label": bar.label, "threshold": bar.threshold, "status": status,
                    "cases": len(sel), "passed": len(measured) - len(failing),
                    "not_measured": missing, "failing": failing,
                    "worst": {"case": worst[0], "value": worst[1]} if worst else None})
    return out


def format_bars(bar_results: Sequence[dict]) -> str:
    """One ``PASS``/``FAIL``/``N/A`` line per bar."""
    lines = []
    for b in bar_results:
        detail = f"{b['passed']}/{b['cases']} cases"
        if b["worst"]:
            detail += f", worst {b['worst']['value']:.2f} ({b['worst']['case']})"
        if b["not_measured"]:
            detail += f", {len(b['not_measured'])} not measured (bnbcy n/a?)"
        lines.append(f"{b['status']:4s}  {b['label']}: {detail}")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Report: table
# --------------------------------------------------------------------------


def _fmt_ms(entry: dict) -> str:
    if entry.get("status") != "ok":
        return "n/a"
    ms = entry["median_ms"]
    text = f"{ms:.3f}" if ms >= 0.1 else f"{ms:.4f}"
    if ms > 0 and entry["iqr_ms"] > NOISY_IQR_FRACTION * ms:
        text += "~"
    return text


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def format_table(results: Sequence[dict], impls: Sequence[str] = DEFAULT_IMPLS,
                 ratio_base: str = "bnbcy", show_pct_copy: bool = False) -> str:
    """Human-readable table, one row per case.

    Columns: median ms per implementation (``~`` marks IQR > 10% of the
    median), speed ratios ``other/base`` (> 1 means ``base`` is faster), GB/s
    per implementation and, on GPU, % of copy bandwidth per implementation.
    Below the table: the distinct n/a reasons, failed output checks and
    warnings.
    """
    short = lambda n: SHORT_NAMES.get(n, n)  # noqa: E731
    others = [n for n in impls if n != ratio_base]
    header = (["case"] + [f"ms {short(n)}" for n in impls]
              + [f"{short(n)}/{short(ratio_base)}" for n in others]
              + [f"GB/s {short(n)}" for n in impls]
              + ([f"%copy {short(n)}" for n in impls] if show_pct_copy else []))
    rows = []
    for r in results:
        e = {n: r["impls"].get(n, {"status": "n/a"}) for n in impls}
        row = [r["name"]]
        row += [_fmt_ms(e[n]) for n in impls]
        row += [_fmt(r["ratios"].get(f"{n}/{ratio_base}"), ".2f") for n in others]
        row += [_fmt(e[n].get("gbps"), ".1f") for n in impls]
        if show_pct_copy:
            row += [_fmt(e[n].get("pct_copy"), ".0f") for n in impls]
        rows.append(row)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt_row = lambda row: "  ".join(  # noqa: E731
        (str(x).ljust(w) if i == 0 else str(x).rjust(w)) for i, (x, w) in enumerate(zip(row, widths)))
    lines = [fmt_row(header), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(row) for row in rows]

    notes = []
    reasons: dict = {}
    for r in results:
        for n, e in r["impls"].items():
            if e.get("status") != "ok":
                reasons.setdefault((n, e.get("reason")), []).append(r["name"])
            chk = e.get("check")
            if chk is not None and not chk.get("ok", True):
                notes.append(f"CHECK FAILED {n} on {r['name']}: {chk}")
            if e.get("warning"):
                notes.append(f"WARNING {n} on {r['name']}: {e['warning']}")
    for (n, reason), names in reasons.items():
        where = "all cases" if len(names) == len(results) else f"{len(names)} case(s)"
        notes.insert(0, f"n/a {n} ({where}): {reason}")
    if any("~" in c for row in rows for c in row[1:1 + len(impls)]):
        notes.append("~ : interquartile range > 10% of the median (noisy timing)")
    return "\n".join(lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------
# Report: metadata and JSON
# --------------------------------------------------------------------------


def _run(cmd: Sequence[str]) -> Optional[str]:
    try:
        res = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except Exception:
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def git_commit() -> Optional[str]:
    """``git rev-parse --short HEAD`` of the repository, or None (no git, no .git)."""
    return _run(["git", "rev-parse", "--short", "HEAD"])


def git_dirty() -> Optional[bool]:
    """Whether tracked files differ from HEAD (so the commit alone does not pin the code)."""
    out = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    return None if out is None else bool(out)


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo``, else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


#: the CPU flags that decide bnbcy's kernel paths (recorded with every result)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
              "avx512_bf16", "avx512_vbmi", "amx_tile", "amx_bf16")


def cpu_flags() -> list:
    """The :data:`SIMD_FLAGS` this CPU reports in ``/proc/cpuinfo`` (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("flags"):
                    have = set(line.split(":", 1)[1].split())
                    return [x for x in SIMD_FLAGS if x in have]
    except OSError:
        pass
    return []


def device_name(device: str) -> str:
    """GPU name for ``"cuda"``, CPU model otherwise."""
    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return cpu_model()


def package_version(module: str, dist_names: Sequence[str] = ()) -> Optional[str]:
    """Version of a package, or None when it is not importable.

    Prefers the module's ``__version__``; falls back to the installed
    distribution metadata (e.g. ``cupy-cuda13x`` for ``cupy``). A module that
    imports but reports no version (e.g. an unbuilt namespace package) gives
    ``"unknown"``.
    """
    try:
        mod = importlib.import_module(module)
    except Exception:
        return None
    ver = getattr(mod, "__version__", None)
    if ver:
        return str(ver)
    for dist in (module, *dist_names):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


def collect_metadata(device: str) -> dict:
    """Everything needed to interpret and reproduce a result file."""
    meta = {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "device": device,
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
        "torch_num_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {
            "torch": torch.__version__,
            "bitsandbytes": package_version("bitsandbytes"),
            "bnbcy": package_version("bnbcy"),
            "cupy": package_version("cupy", ("cupy-cuda13x", "cupy-cuda12x")),
        },
        "argv": list(sys.argv),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        meta["cuda"] = {
            "torch_cuda_version": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "multi_processor_count": int(props.multi_processor_count),
            "l2_cache_bytes": l2_cache_bytes(device),
        }
    return meta


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def default_result_path(meta: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """``bench/results/<device>-<date>-<commit>.json``.

    ``<device>`` is ``cpu`` or ``cuda-<gpu name>`` (e.g.
    ``cuda-nvidia-h100-80gb-hbm3``), ``<date>`` is UTC ``YYYYMMDDTHHMMSSZ``
    (seconds, so runs on one commit do not overwrite each other), ``<commit>``
    is the short hash or ``nogit``.
    """
    dev = "cpu" if meta["device"] != "cuda" else "cuda-" + _slug(meta["device_name"])
    date = _dt.datetime.fromisoformat(meta["date_utc"]).strftime("%Y%m%dT%H%M%SZ")
    commit = meta.get("git_commit") or "nogit"
    if meta.get("git_dirty"):
        commit += "-dirty"
    return results_dir / f"{dev}-{date}-{commit}.json"


def _jsonable(obj: Any) -> Any:
    """Convert torch dtypes/devices and other leftovers to JSON-friendly values."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def write_json(path: Path, benchmark: str, meta: dict, results: Sequence[dict],
               copy_bandwidth: Optional[dict] = None, bars: Sequence[dict] = (),
               config: Optional[dict] = None) -> Path:
    """Write the raw results, metadata and bar outcomes to ``path`` (dirs created)."""
    payload = {
        "schema": SCHEMA,
        "benchmark": benchmark,
        "metadata": meta,
        "config": config or {},
        "copy_bandwidth": copy_bandwidth,
        "cases": list(results),
        "bars": list(bars),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(payload), f, indent=1)
        f.write("\n")
    return path


def format_header(meta: dict, copy_bandwidth: Optional[dict]) -> str:
    """Short preamble printed above the table."""
    v = meta["versions"]
    lines = [
        f"device: {meta['device']} ({meta['device_name']}), torch threads "
        f"{meta['torch_num_threads']}, OMP_NUM_THREADS={meta['omp_num_threads_env']}",
        f"commit {meta['git_commit']}{' (dirty)' if meta['git_dirty'] else ''}, "
        f"{meta['date_utc']}; torch {v['torch']}, bitsandbytes {v['bitsandbytes']}, "
        f"bnbcy {v['bnbcy']}, cupy {v['cupy']}",
    ]
    if meta.get("device") == "cpu":
        load = meta.get("load_average")
        lines.append(f"cpu: {meta.get('cpu_model')}; flags {' '.join(meta.get('cpu_flags') or []) or '?'}; "
                     f"load average {' '.join(f'{x:.1f}' for x in load) if load else '?'}")
    if copy_bandwidth:
        lines.append(f"copy bandwidth: {copy_bandwidth['gbps']:.0f} GB/s (median; best "
                     f"{copy_bandwidth['gbps_best']:.0f}), {copy_bandwidth['nbytes'] / 2**20:.0f} MiB "
                     "device-to-device copy, read + write counted")
    return "\n".join(lines)


# --------------------------------------------------------------------------
# The command line and main flow every bench_*.py shares
# --------------------------------------------------------------------------


def list_arg(values, conv):
    """Accept both ``--x 1 2`` and ``--x 1,2``."""
    out = []
    for v in values:
        out += [conv(p) for p in str(v).split(",") if p.strip()]
    return out


def add_common_args(p, repeats: int = 20, warmup: int = 3) -> None:
    """The options of every benchmark script (device, impls, timing, output)."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--impls", nargs="+", default=list(DEFAULT_IMPLS),
                   help="subset of bnbcy bitsandbytes torch")
    p.add_argument("--repeats", type=int, default=repeats, help="timed calls per implementation")
    p.add_argument("--warmup", type=int, default=warmup, help="untimed calls first (at least one per copy)")
    p.add_argument("--rotate", type=int, default=None,
                   help="input copies to rotate among (default: auto, >2x L2 on cuda, 1 on cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--copy-mib", type=int, default=1024,
                   help="buffer size for the copy-bandwidth measurement (cuda; cpu where the script measures it)")
    p.add_argument("--json", type=Path, default=None,
                   help="result file (default: bench/results/<device>-<date>-<commit>.json)")
    p.add_argument("--no-json", action="store_true", help="do not write a result file")
    p.add_argument("--strict", action="store_true", help="exit 1 if a bar FAILs or a check fails")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def check_common_args(p, args) -> None:
    """Validate the options of :func:`add_common_args` (``p.error`` on bad ones)."""
    args.impls = list_arg(args.impls, str)
    bad = [i for i in args.impls if i not in DEFAULT_IMPLS]
    if bad:
        p.error(f"unknown impl(s) {bad}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.repeats < MIN_REPEATS:
        print(f"warning: --repeats {args.repeats} < {MIN_REPEATS}: on these VMs (threads stalled in ~4 ms "
              "quanta) that is a smoke run, not a measurement", file=sys.stderr)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")


#: the fewest timed rounds that make a measurement (see bench/README.md)
MIN_REPEATS = 30

#: the case results of the latest :func:`run_benchmark`
LAST_RESULTS: list = []


def run_benchmark(kind: str, args, make_cases: Callable[[list], Iterable[Case]],
                  make_bars: Callable[[str, int], Sequence[Bar]], config: dict,
                  load: Callable[[str], tuple], footnote: str = "") -> int:
    """The main flow of a benchmark script; returns its exit status.

    Announces unavailable libraries, measures the copy bandwidth (CUDA), runs
    ``make_cases(impls)``, prints the table and the bars of
    ``make_bars(device, torch_threads)``, writes the JSON (``kind``, with
    ``config``) and applies ``--strict``. ``load(impl) -> (module, reason)``.
    """
    impls = [i for i in DEFAULT_IMPLS if i in args.impls]
    # import the libraries up front: import-time warnings and costs stay out of the cases
    for impl in ("bnbcy", "bitsandbytes"):
        if impl in impls:
            _, reason = load(impl)
            if reason and not args.quiet:
                print(f"note: {impl} is n/a: {reason}", file=sys.stderr)
    meta = collect_metadata(args.device)
    config = dict(config, impls=impls, repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                  rotate=args.rotate if args.rotate is not None else "auto")

    copy_bw = None
    if args.device == "cuda" or getattr(args, "cpu_copy_bandwidth", False):
        try:
            copy_bw = measure_copy_bandwidth(args.device, nbytes=args.copy_mib << 20,
                                             repeats=max(args.repeats, MIN_REPEATS))
        except Exception as exc:
            print(f"copy-bandwidth measurement failed: {exc}", file=sys.stderr)

    results = run_cases(make_cases(impls), warmup=args.warmup, repeats=args.repeats,
                        copy_gbps=copy_bw["gbps"] if copy_bw else None,
                        ratio_base="bnbcy", verbose=not args.quiet)
    LAST_RESULTS[:] = results  # for scripts that derive more from the run (e.g. dispatch tables)
    bars = evaluate_bars(make_bars(args.device, meta["torch_num_threads"]), results)

    print()
    print(format_header(meta, copy_bw))
    print()
    # columns: the selected libraries, then any further implementations a case times (e.g. the
    # other 8-bit rules of bench_optim's adam8bit case)
    columns = impls + [n for n in dict.fromkeys(n for r in results for n in r["impls"]) if n not in impls]
    print(format_table(results, impls=columns, ratio_base="bnbcy", show_pct_copy=copy_bw is not None))
    print()
    print("ratios are time(other)/time(bnbcy): > 1 means bnbcy is faster; "
          "GB/s counts bytes read + written, 1 GB = 1e9 B" + (";\n" + footnote if footnote else ""))
    print(format_bars(bars))

    if not args.no_json:
        path = args.json or default_result_path(meta)
        write_json(path, kind, meta, results, copy_bandwidth=copy_bw, bars=bars, config=config)
        print(f"results: {path}")

    if args.strict:
        failed_check = any(not e.get("check", {}).get("ok", True)
                           for r in results for e in r["impls"].values())
        if failed_check or any(b["status"] == "FAIL" for b in bars):
            return 1
    return 0


@functools.lru_cache(maxsize=None)
def load_module(modname: str, attrs: tuple = ()) -> tuple:
    """Import ``modname`` once and check it has ``attrs``; ``(module, None)`` or ``(None, reason)``
    (the reason is what the table prints for an ``n/a`` implementation)."""
    try:
        mod = importlib.import_module(modname)
    except Exception as exc:  # ImportError, or a broken extension raising anything
        hint = ""
        if isinstance(exc, ModuleNotFoundError) and modname.startswith("bnbcy"):
            hint = " (not installed? pip install --no-build-isolation -e .)"
        return None, f"import {modname} failed: {type(exc).__name__}: {exc}{hint}"
    missing = [a for a in attrs if not hasattr(mod, a)]
    if missing:
        where = getattr(mod, "__file__", None) or list(getattr(mod, "__path__", []))
        return None, f"{modname} has no {', '.join(missing)} (module at {where}; not built/installed yet?)"
    return mod, None


def require(loaded: tuple):
    """The module of a ``(module, reason)`` pair from :func:`load_module`, or ImplUnavailable(reason)."""
    mod, reason = loaded
    if mod is None:
        raise ImplUnavailable(reason)
    return mod
