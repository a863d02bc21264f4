"""The error contract of bnbcy's public ops, as data: one probe per (op, kind of bad input).

Each probe builds its arguments, calls the op and must raise the listed exception while leaving
every argument unchanged (bytes compared). ``PROBES`` is the single source of the table in
``docs/errors.md`` (``tests/test_fuzz_errors_doc.py`` keeps them equal) and of the crash test
(``tests/test_fuzz_crash.py`` runs every probe in a subprocess, so a crash is reported as a failure).

Run as a script, it executes the named probes (all without names) and prints one JSON line per
probe: ``{"probe", "raised", "message", "unchanged"}``, after a ``START <name>`` line written before
each call so that a crash names its probe.
"""
import json
import sys
from dataclasses import dataclass

import numpy as np
import torch

from fuzz_support import snapshot

import bnbcy
import bnbcy.functional as F


@dataclass(frozen=True)
class Probe:
    op: str
    case: str
    exception: str
    make: object  # () -> (call, args): call() must raise; args are snapshotted before and after

    @property
    def name(self):
        return f"{self.op}: {self.case}"


def _x(n=1024, dtype=torch.float32, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(n).astype(np.float32)).to(dtype)


class _Storageless(torch.Tensor):
    """A tensor subclass without storage (as DTensor): its DLPack export has a NULL data pointer."""

    @staticmethod
    def __new__(cls, shape, dtype=torch.float32):
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(f"_Storageless has no data ({func})")


def _neg(t):
    return torch._neg_view(-t)


def _q8(n=1024, nested=False):
    return F.quantize_blockwise(_x(n), blocksize=64, nested=nested)


def _q4(nested=False, quant_type="nf4"):
    return F.quantize_4bit(_x(4096).reshape(64, 64), quant_type=quant_type, compress_statistics=nested)


def _edit_state(state, **fields):
    for k, v in fields.items():
        setattr(state, k, v)
    return state


def _blob_edit(d, key, value=None, drop=False):
    k = next(k for k in d if "quant_state." in k)
    blob = F.unpack_tensor_to_dict(d[k])
    if drop:
        blob.pop(key)
    else:
        blob[key] = value
    return {**d, k: F.pack_dict_to_tensor(blob)}


def _p(op, case, exc):
    def deco(make):
        PROBES.append(Probe(op, case, exc, make))
        return make
    return deco


PROBES: list = []

# ------------------------------------------------------------------------- quantize_blockwise
_p("quantize_blockwise", "A not an array (list, None, str)", "TypeError")(
    lambda: (lambda: F.quantize_blockwise([1.0, 2.0]), []))
_p("quantize_blockwise", "A of dtype float64, int, bool", "ValueError")(
    lambda: (lambda a=_x().double(): F.quantize_blockwise(a), []))
_p("quantize_blockwise", "A empty", "ValueError")(
    lambda: (lambda: F.quantize_blockwise(torch.empty(0)), []))


@_p("quantize_blockwise", "A without memory (storageless tensor subclass) reaching the array layer", "ValueError")
def _():
    # with out= the call skips the torch op (a subclass's own __torch_dispatch__ would answer it)
    out = torch.zeros(1000, dtype=torch.uint8)
    return (lambda: F.quantize_blockwise(_Storageless((1000,)), out=out)), [out]


@_p("quantize_blockwise", "blocksize <= 0, > 2**31-1, or not an int", "ValueError")
def _():
    x = _x(5000)
    return (lambda: F.quantize_blockwise(x, blocksize=2 ** 63 - 4000)), [x]


@_p("quantize_blockwise", "blocksize a bool, float or str", "ValueError")
def _():
    x = _x()
    return (lambda: F.quantize_blockwise(x, blocksize=64.0)), [x]


@_p("quantize_blockwise", "code not float32[256]", "ValueError")
def _():
    x = _x()
    return (lambda: F.quantize_blockwise(x, code=torch.zeros(255))), [x]


@_p("quantize_blockwise", "out of the wrong shape, dtype, framework, device or layout", "ValueError")
def _():
    x, out = _x(), torch.zeros(1023, dtype=torch.uint8)
    return (lambda: F.quantize_blockwise(x, out=out)), [x, out]


@_p("quantize_blockwise", "out/absmax a negative (lazily negated) view", "ValueError")
def _():
    x, out = _x(), _neg(torch.zeros(1024, dtype=torch.uint8))
    return (lambda: F.quantize_blockwise(x, out=out)), [x, out]


@_p("quantize_blockwise", "out overlapping A", "ValueError")
def _():
    x = _x()
    return (lambda: F.quantize_blockwise(x, out=x.view(torch.uint8)[:1024], blocksize=64)), [x]


@_p("quantize_blockwise", "absmax overlapping out", "ValueError")
def _():
    x, buf = _x(), torch.zeros(1024 + 64, dtype=torch.uint8)
    return (lambda: F.quantize_blockwise(x, out=buf[:1024], absmax=buf[1024 - 32:1024 + 32].view(torch.float32),
                                         blocksize=64)), [x, buf]


@_p("quantize_blockwise", "absmax= with nested=True", "ValueError")
def _():
    x, am = _x(), torch.zeros(16)
    return (lambda: F.quantize_blockwise(x, absmax=am, blocksize=64, nested=True)), [x, am]


# ------------------------------------------------------------------------- dequantize_blockwise
@_p("dequantize_blockwise", "A not uint8", "ValueError")
def _():
    q, qs = _q8()
    return (lambda: F.dequantize_blockwise(q.to(torch.int8), qs)), [q, qs]


@_p("dequantize_blockwise", "neither quant_state nor absmax", "ValueError")
def _():
    q, _ = _q8()
    return (lambda: F.dequantize_blockwise(q)), [q]


@_p("dequantize_blockwise", "quant_state not a QuantState", "TypeError")
def _():
    q, _ = _q8()
    return (lambda: F.dequantize_blockwise(q, {"absmax": 1})), [q]


@_p("dequantize_blockwise", "quant_state.blocksize out of range", "ValueError")
def _():
    q, qs = _q8()
    qs.blocksize = 2 ** 63 - 4000
    return (lambda: F.dequantize_blockwise(q, qs)), [q, qs]


@_p("dequantize_blockwise", "quant_state.dtype not float32/float16/bfloat16 (e.g. None)", "ValueError")
def _():
    q, qs = _q8()
    qs.dtype = None
    return (lambda: F.dequantize_blockwise(q, qs)), [q, qs]


@_p("dequantize_blockwise", "absmax too short for A", "ValueError")
def _():
    q, qs = _q8()
    am = qs.absmax[:-1].clone()
    return (lambda: F.dequantize_blockwise(q, absmax=am, blocksize=64)), [q, am]


@_p("dequantize_blockwise", "nested state with offset None", "TypeError")
def _():
    q, qs = _q8(nested=True)
    qs.offset = None
    return (lambda: F.dequantize_blockwise(q, qs)), [q, qs]


@_p("dequantize_blockwise", "out overlapping A or absmax", "ValueError")
def _():
    q, qs = _q8()
    buf = torch.zeros(1024)
    qa = buf.view(torch.uint8)[:1024]
    qa.copy_(q)
    return (lambda: F.dequantize_blockwise(qa, qs, out=buf)), [buf, qs]


# ------------------------------------------------------------------------- quantize_4bit
@_p("quantize_4bit", "quant_type not 'nf4'/'fp4'", "ValueError")
def _():
    x = _x()
    return (lambda: F.quantize_4bit(x, quant_type="int4")), [x]


@_p("quantize_4bit", "blocksize not in 32..4096 (powers of 2)", "ValueError")
def _():
    x = _x()
    return (lambda: F.quantize_4bit(x, blocksize=100)), [x]


@_p("quantize_4bit", "byte count not a multiple of the quant_storage itemsize", "ValueError")
def _():
    x = _x(1022)
    return (lambda: F.quantize_4bit(x, quant_storage=torch.float32)), [x]


@_p("quantize_4bit", "A without memory (storageless tensor subclass) reaching the array layer", "ValueError")
def _():
    out = torch.zeros(512, 1, dtype=torch.uint8)
    return (lambda: F.quantize_4bit(_Storageless((1024,)), out=out)), [out]


@_p("quantize_4bit", "out/absmax overlapping each other or A", "ValueError")
def _():
    x, buf = _x(), torch.zeros(1024, dtype=torch.uint8)
    return (lambda: F.quantize_4bit(x, out=buf[:512].reshape(512, 1),
                                    absmax=buf[512 - 32:512 + 32].view(torch.float32))), [x, buf]


# ------------------------------------------------------------------------- dequantize_4bit
@_p("dequantize_4bit", "quant_state.shape negative or not ints", "ValueError")
def _():
    p, ps = _q4()
    ps.shape = (-64, 64)
    return (lambda: F.dequantize_4bit(p, ps)), [p, ps]


@_p("dequantize_4bit", "A holding too few bytes for quant_state.shape", "ValueError")
def _():
    p, ps = _q4()
    short = p[:-1]
    return (lambda: F.dequantize_4bit(short, ps)), [p, ps]


@_p("dequantize_4bit", "quant_state.dtype not a float dtype (e.g. None)", "ValueError")
def _():
    p, ps = _q4()
    ps.dtype = None
    return (lambda: F.dequantize_4bit(p, ps)), [p, ps]


@_p("dequantize_4bit", "nested state with offset None", "TypeError")
def _():
    p, ps = _q4(nested=True)
    ps.offset = None
    return (lambda: F.dequantize_4bit(p, ps)), [p, ps]


@_p("dequantize_4bit", "out overlapping A", "ValueError")
def _():
    p, ps = _q4()
    buf = torch.zeros(64, 64)
    pa = buf.view(torch.uint8).reshape(-1)[:2048].reshape(p.shape)
    pa.copy_(p)
    return (lambda: F.dequantize_4bit(pa, ps, out=buf)), [buf, ps]


# ------------------------------------------------------------------------- gemv_4bit / gemm_4bit
@_p("gemv_4bit", "state None", "ValueError")
def _():
    p, _ = _q4()
    a = _x(64).reshape(1, 64)
    return (lambda: F.gemv_4bit(a, p.t())), [a, p]


@_p("gemv_4bit", "truncated absmax (bitsandbytes aborts)", "ValueError")
def _():
    p, ps = _q4()
    a = _x(64).reshape(1, 64)
    ps.absmax = ps.absmax[:-1].clone()
    return (lambda: F.gemv_4bit(a, p.t(), state=ps)), [a, p, ps]


@_p("gemv_4bit", "truncated packed weight (bitsandbytes aborts)", "ValueError")
def _():
    p, ps = _q4()
    a = _x(64).reshape(1, 64)
    return (lambda: F.gemv_4bit(a, p[:-1].t(), state=ps)), [a, p, ps]


@_p("gemm_4bit", "A's last dimension not the weight's in_features", "ValueError")
def _():
    p, ps = _q4()
    a = _x(63).reshape(1, 63)
    return (lambda: F.gemm_4bit(a, p.t(), ps)), [a, p, ps]


@_p("gemm_4bit", "out overlapping A", "ValueError")
def _():
    p, ps = _q4()
    a = _x(64).reshape(1, 64)
    return (lambda: F.gemm_4bit(a, p.t(), ps, out=a)), [a, p, ps]


# ------------------------------------------------------------------------- int8
@_p("int8_vectorwise_quant", "A of dtype float64 or an integer dtype", "ValueError")
def _():
    a = _x(64).reshape(4, 16).double()
    return (lambda: F.int8_vectorwise_quant(a)), [a]


@_p("int8_vectorwise_quant", "threshold negative, NaN or not a number", "ValueError")
def _():
    a = _x(64).reshape(4, 16)
    return (lambda: F.int8_vectorwise_quant(a, threshold=float("nan"))), [a]


@_p("int8_linear_matmul", "inner dimensions differ", "ValueError")
def _():
    a, b = torch.ones(4, 16, dtype=torch.int8), torch.ones(8, 15, dtype=torch.int8)
    return (lambda: F.int8_linear_matmul(a, b)), [a, b]


@_p("int8_linear_matmul", "dtype other than int32", "NotImplementedError")
def _():
    a, b = torch.ones(4, 16, dtype=torch.int8), torch.ones(8, 16, dtype=torch.int8)
    return (lambda: F.int8_linear_matmul(a, b, dtype=torch.float32)), [a, b]


@_p("int8_linear_matmul", "out overlapping A or B", "ValueError")
def _():
    a, b = torch.ones(4, 32, dtype=torch.int8), torch.ones(8, 32, dtype=torch.int8)
    out = b.reshape(-1).view(torch.int32)[:32].reshape(4, 8)  # B's bytes
    return (lambda: F.int8_linear_matmul(a, b, out=out)), [a, b]


@_p("int8_mm_dequant", "row_stats/col_stats of the wrong size", "ValueError")
def _():
    a, rs, cs = torch.ones(4, 8, dtype=torch.int32), torch.ones(3), torch.ones(8)
    return (lambda: F.int8_mm_dequant(a, rs, cs)), [a, rs, cs]


@_p("int8_mm_dequant", "out overlapping A", "ValueError")
def _():
    a, rs, cs = torch.ones(4, 8, dtype=torch.int32), torch.ones(4), torch.ones(8)
    return (lambda: F.int8_mm_dequant(a, rs, cs, out=a.view(torch.float32))), [a, rs, cs]


# ------------------------------------------------------------------------- optimizer updates
@_p("optimizer_update_32bit", "unknown optimizer name", "ValueError")
def _():
    p, g, s = _x(100), _x(100, seed=1), torch.zeros(100)
    return (lambda: F.optimizer_update_32bit("adamz", g, p, s, 0.9, 1e-8, 1, 1e-3)), [p, g, s]


@_p("optimizer_update_32bit", "state1/state2 of the wrong size", "ValueError")
def _():
    p, g, s1, s2 = _x(100), _x(100, seed=1), torch.zeros(100), torch.zeros(50)
    return (lambda: F.optimizer_update_32bit("adam", g, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999)), \
        [p, g, s1, s2]


@_p("optimizer_update_32bit", "p a negative view or not contiguous (updated in place)", "ValueError")
def _():
    p, g, s = _neg(_x(100)), _x(100, seed=1), torch.zeros(100)
    return (lambda: F.optimizer_update_32bit("momentum", g, p, s, 0.9, 1e-8, 1, 1e-3)), [p, g, s]


@_p("optimizer_update_32bit", "p, g or a state sharing memory", "ValueError")
def _():
    buf, g = _x(200), _x(100, seed=1)
    p, state1 = buf[:100], buf[50:150]  # the state overlaps the parameter
    return (lambda: F.optimizer_update_32bit("momentum", g, p, state1, 0.9, 1e-8, 1, 1e-3)), [buf, g]


@_p("optimizer_update_8bit_blockwise", "absmax1 of the wrong size", "ValueError")
def _():
    p, g = _x(512), _x(512, seed=1)
    s1, a1 = torch.zeros(512, dtype=torch.uint8), torch.zeros(1)
    qmap = F.create_dynamic_map()
    return (lambda: F.optimizer_update_8bit_blockwise("momentum", g, p, s1, None, 0.9, 0.0, 0.0, 0.0, 1e-8, 1,
                                                      1e-3, qmap, None, a1, None)), [p, g, s1, a1]


@_p("percentile_clipping", "percentile not an int in [0, 100)", "ValueError")
def _():
    g, vec = _x(100), torch.zeros(100)
    return (lambda: F.percentile_clipping(g, vec, 2, percentile=5.5)), [g, vec]


# ------------------------------------------------------------------------- QuantState
@_p("QuantState.from_dict", "qs_dict not a mapping", "TypeError")
def _():
    return (lambda: F.QuantState.from_dict([1, 2], device="cpu")), []


@_p("QuantState.from_dict", "unknown or non-float dtype (also an int)", "ValueError")
def _():
    d = _blob_edit(_q4()[1].as_dict(packed=True), "dtype", "float128x")
    return (lambda: F.QuantState.from_dict(d, device="cpu")), [d]


@_p("QuantState.from_dict", "packed blob not a JSON object", "ValueError")
def _():
    d = _q4()[1].as_dict(packed=True)
    d = {k: (F.pack_dict_to_tensor([1, 2]) if "quant_state." in k else v) for k, v in d.items()}
    return (lambda: F.QuantState.from_dict(d, device="cpu")), [d]


@_p("QuantState.from_dict", "a nested field missing (nested_offset)", "ValueError")
def _():
    d = _blob_edit(_q4(nested=True)[1].as_dict(packed=True), "nested_offset", drop=True)
    return (lambda: F.QuantState.from_dict(d, device="cpu")), [d]


@_p("QuantState.from_dict", "absmax/quant_map of the wrong dtype or size", "ValueError")
def _():
    d = _q4()[1].as_dict(packed=True)
    d["absmax"] = d["absmax"][:-1]
    return (lambda: F.QuantState.from_dict(d, device="cpu")), [d]


# ------------------------------------------------------------------------- modules
@_p("Linear4bit.load_state_dict", "corrupted quant state (any from_dict error)", "RuntimeError")
def _():
    src = bnbcy.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu")
    sd = _blob_edit(src.state_dict(), "dtype", 5)
    dst = bnbcy.nn.Linear4bit(64, 64, bias=False, quant_type="nf4").to("cpu")
    return (lambda: dst.load_state_dict(sd)), [dst, sd]


@_p("Linear8bitLt.load_state_dict", "SCB of the wrong size", "RuntimeError")
def _():
    src = bnbcy.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to("cpu")
    sd = src.state_dict()
    sd["SCB"] = sd["SCB"][:-1]
    dst = bnbcy.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False).to("cpu")
    return (lambda: dst.load_state_dict(sd)), [dst, sd]


def run(probe):
    """Run one probe: ``{"probe", "raised", "message", "unchanged"}`` (raised None: it did not raise)."""
    call, args = probe.make()
    before = snapshot(args)
    raised = message = None
    try:
        call()
    except Exception as exc:  # the probe records whatever is raised; the test compares with the table
        raised, message = type(exc).__name__, str(exc)
    return {"probe": probe.name, "raised": raised, "message": message, "unchanged": snapshot(args) == before}


def render_table() -> str:
    """The markdown table of docs/errors.md: one row per probe."""
    rows = ["| op | bad input | exception |", "|---|---|---|"]
    rows += [f"| `{p.op}` | {p.case} | `{p.exception}` |" for p in PROBES]
    return "\n".join(rows)


def main(names):
    wanted = [p for p in PROBES if not names or p.name in names]
    for p in wanted:
        print("START " + p.name, flush=True)
        print(json.dumps(run(p)), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        print(render_table())
    else:
        main(sys.argv[1:])
