"""``bnbcy::gemm_4bit_exec``: the CPU inference product of a 4-bit weight in its storage format
(docs/fourbit.md, "Inference on the CPU"), called by ``Linear4bit.forward`` through
:mod:`bnbcy.nn._exec_layout`.

``out = A @ W.T (+ bias)`` with ``W`` the packed ``[N, K]`` weight (bitsandbytes' nibble order),
its float32 ``absmax`` or nested statistics. Two kernels, picked by the row count of ``A``:

* up to ``plan.fused_max_rows`` rows: the fused kernel (``_C.cpu_q4x_gemm_fused``), which reads the
  packed weight once per call for all rows;
* more rows: tiles of weight rows dequantized to float32 into a cache-sized buffer
  (``_C.cpu_q4x_dequant_rows``), each multiplied with torch's float32 GEMM, so the dense weight
  never exists whole and the GEMM runs in float32 whatever the input dtype (on CPUs without
  native bfloat16/float16 arithmetic torch's 16-bit GEMMs are several times slower).

The cut-over, the tile size and the thread counts come from :data:`PLANS`, one row per
instruction set, measured with ``bench/bench_fourbit.py --calibrate``.

The instruction set is :func:`kernel_isa`: the CPU's best (``BNBCY_CPU_ISA`` honoured), but a
vector width runs only after its **self-check** passed -- on its first use in the process the
vector kernels run a small fixed problem (odd K, tails, partial blocks, K chunks, plain and
nested statistics, 1 to 9 rows, every input dtype, bias) and are compared with the scalar kernels: the
products within the tolerance the tests use (:func:`error_bound`), the dequantized tiles bit for
bit. On a mismatch it warns once and the next narrower width runs instead (AVX-512 -> AVX2 ->
scalar): a kernel that was never run on a CPU of its kind is never silently wrong.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch

from .. import _C, _arrays
from ._lib import op

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass(frozen=True)
class ExecPlan:
    """How the CPU inference product runs on one instruction set.

    Attributes
    ----------
    fused_max_rows : int
        Rows of A up to which the fused kernel beats tile dequantization + GEMM.
    tile_bytes : int
        Bytes of the float32 weight tile of the many-row path (kept in L2/L3).
    weights_per_thread : int
        Packed weights below which one more thread costs more than it gains (the fused kernel
        and the tile dequantization use ``max(1, min(threads, N*K // weights_per_thread))``).
    measured : bool
        False where the row was not measured on a CPU of that kind (copied from another row).
    """
    fused_max_rows: int
    tile_bytes: int
    weights_per_thread: int
    measured: bool = True


#: The avx2 row: fused_max_rows from the quiet-machine module bench of the previous kernel (2-core
#: AMD EPYC Zen 3, 16 rows fused 8.75 ms, 64 rows tiled 19.9 ms at 4096x4096). The calibration of
#: the present kernels (``bench/bench_fourbit.py --calibrate``,
#: ``bench/results/fourbit-exec-calibrate-20261201T231850Z.json``) ran under load average 4.6-9.5
#: on the 2 shared cores: fused beat tiled at every row count up to 48 and 2 threads lost to 1 at
#: every size by 20-40x -- both artifacts of threads stalled by the other jobs, so the row was
#: left as it was; it stays provisional until the calibration runs on a quiet machine. AVX-512
#: CPUs: their row is the AVX2 one, not measured there (their kernels were never run); the
#: scalar row is an estimate.
PLANS = {
    "avx2": ExecPlan(fused_max_rows=16, tile_bytes=4 << 20, weights_per_thread=1 << 18),
    "avx512": ExecPlan(fused_max_rows=16, tile_bytes=4 << 20, weights_per_thread=1 << 18, measured=False),
    "scalar": ExecPlan(fused_max_rows=2, tile_bytes=1 << 20, weights_per_thread=1 << 16),
}


ISA_NAMES = ("scalar", "avx2", "avx512")  # the kernels' isa argument is the index

#: Test hook of the self-check: ``hook(isa, y)`` gets each vector result before it is compared and
#: returns what is compared (a test returns a wrong one to see the fallback and the warning).
SELFCHECK_HOOK = None

_CHECKED: dict = {}  # isa -> whether its self-check passed (run once per process)


def error_bound(x64, W64, bias64, dtype):
    """Reference and error bound of ``x @ W.T + bias`` from float64 operands: float32 accumulation
    over K terms plus one rounding to ``dtype`` (the tolerance of the tests and of the self-check).

    Returns
    -------
    (ref, bound) : float64 tensors of the output's shape.
    """
    ref, mag = x64 @ W64.T, x64.abs() @ W64.abs().T
    if bias64 is not None:
        ref, mag = ref + bias64, mag + bias64.abs()
    rounding = {torch.float32: 0.0, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}[dtype]
    return ref, mag * (x64.shape[-1] * 2.0 ** -23 + 1e-6) + ref.abs() * rounding + 1e-30


def _selfcheck_problems():
    """Fixed weights from random codes and statistics (no quantizer involved): odd K with partial
    blocks, tails and nested statistics (the element-order path); K = 17 * 32 with plain statistics,
    rows starting mid-block, K chunks at 8 rows and a map holding -0.0 (the group path)."""
    g = torch.Generator().manual_seed(15)
    nf4 = torch.sort(torch.randn(16, generator=g))[0]
    fp4 = torch.tensor([0.0, 0.0052, 0.67, 1.0, 0.33, 0.5, 0.16, 0.25] * 2) * torch.tensor([1.0] * 8 + [-1.0] * 8)
    out = []
    for N, K, bs, nested, code in ((5, 75, 32, True, nf4), (3, 544, 64, False, fp4)):
        nb = -(-N * K // bs)
        B = torch.randint(0, 256, ((N * K + 1) // 2,), dtype=torch.uint8, generator=g)
        if nested:
            stats = (torch.randint(0, 256, (nb,), dtype=torch.uint8, generator=g),
                     torch.linspace(-1, 1, 256), torch.rand(-(-nb // 256), generator=g) + 0.5, 0.25, 256)
        else:
            stats = torch.rand(nb, generator=g) + 0.1
        out.append((N, K, bs, B, code, stats))
    return out


def _run_checks(isa: str) -> str:
    """'' when the ``isa`` kernels agree with the scalar ones on the fixed problems, else what differed."""
    k, v = ISA_NAMES.index(isa), _arrays.input_view
    for N, K, bs, B, code, stats in _selfcheck_problems():
        sc = v(stats, "absmax") if isinstance(stats, torch.Tensor) else \
            (v(stats[0], "absmax"), v(stats[1], "code2"), v(stats[2], "absmax2"), stats[3], stats[4])
        qv, cv = v(B, "B"), v(code, "code")
        tiles = []
        for kk in (0, k):
            tile = torch.full((N, K), float("nan"))
            _C.cpu_q4x_dequant_rows(qv, cv, sc, v(tile, "buf"), 0, N, N, K, bs, 1, kk)
            tiles.append(tile)
        if not torch.equal(tiles[0], tiles[1]):
            return f"dequantized tile of a {N}x{K} weight"
        W64 = tiles[0].double()
        g = torch.Generator().manual_seed(N)
        for dtype in FLOAT_DTYPES:
            bias = torch.randn(N, generator=g).to(dtype)
            for M in (1, 3, 8, 9):
                x = torch.randn(M, K, generator=g).to(dtype)
                ref, bound = error_bound(x.double(), W64, bias.double(), dtype)
                for kk in (0, k):
                    y = torch.full((M, N), float("nan"), dtype=dtype)
                    _C.cpu_q4x_gemm_fused(v(x, "A"), qv, cv, sc, v(bias, "bias"), v(y, "out"), M, N, K, bs, 1, kk)
                    if kk and SELFCHECK_HOOK is not None:
                        y = SELFCHECK_HOOK(isa, y)
                    if not ((y.double() - ref).abs() <= bound).all():
                        return f"{'scalar' if kk == 0 else isa} product, {M} rows of {dtype}, {N}x{K} weight"
    return ""


def self_check(isa: str) -> bool:
    """Whether the ``isa`` kernels passed their self-check (run on the first call, then cached);
    warns once when they did not."""
    if isa not in _CHECKED:
        failed = _run_checks(isa) if isa != "scalar" else ""
        if failed:
            warnings.warn(f"bnbcy: the {isa} 4-bit inference kernels disagree with the scalar ones on "
                          f"their self-check ({failed}); using a narrower instruction set instead. "
                          f"Please report this with your CPU model.", RuntimeWarning, stacklevel=3)
        _CHECKED[isa] = not failed
    return _CHECKED[isa]


def kernel_isa() -> str:
    """The instruction set the kernels run: the CPU's best (``BNBCY_CPU_ISA`` honoured), lowered
    past every width whose self-check failed."""
    isa = _C.cpu_isa()
    while isa != "scalar" and not self_check(isa):
        isa = ISA_NAMES[ISA_NAMES.index(isa) - 1]
    return isa


def plan() -> ExecPlan:
    """The plan of the instruction set the kernels run now (:func:`kernel_isa`)."""
    return PLANS[kernel_isa()]


def _threads(p: ExecPlan, weights: int) -> int:
    return max(1, min(torch.get_num_threads(), weights // p.weights_per_thread))


def fused(a, q, code, scales, bias, out, M, N, K, blocksize):
    """``out = a @ W.T (+ bias)`` on validated views with the fused kernel, the self-checked
    instruction set and the plan's threads: the one launch of the few-row product, for the
    execution layout and for the functional ``gemm_4bit``/``gemv_4bit`` on the CPU."""
    isa = kernel_isa()
    _C.cpu_q4x_gemm_fused(a, q, code, scales, bias, out, M, N, K, blocksize, _threads(PLANS[isa], N * K),
                          ISA_NAMES.index(isa))


def _check(A, B, code, absmax, nested_code, nested_absmax, nested_offset, blocksize, N, bias):
    if A.device.type != "cpu" or A.dtype not in FLOAT_DTYPES:
        raise ValueError(f"gemm_4bit_exec: A must be a float32/float16/bfloat16 CPU tensor, got {A.dtype} "
                         f"on {A.device}")
    if A.dim() == 0:
        raise ValueError("gemm_4bit_exec: A must have at least one dimension (K)")
    K = A.shape[-1]
    if N <= 0 or K <= 0:
        raise ValueError(f"gemm_4bit_exec: invalid weight shape N={N}, K={K}")
    if B.dtype != torch.uint8 or B.dim() != 1 or B.numel() < (N * K + 1) // 2:
        raise ValueError(f"gemm_4bit_exec: B must be the flat uint8 packed weight of at least "
                         f"{(N * K + 1) // 2} bytes, got {B.dtype} of shape {tuple(B.shape)}")
    if code.dtype != torch.float32 or code.numel() != 16:
        raise ValueError(f"gemm_4bit_exec: code must hold the 16 float32 values of the map, got "
                         f"{code.numel()} {code.dtype}")
    if blocksize <= 0 or blocksize & (blocksize - 1):
        raise ValueError(f"gemm_4bit_exec: blocksize must be a power of two, got {blocksize}")
    nested = nested_absmax is not None
    if nested != (nested_code is not None) or nested != (nested_offset is not None):
        raise ValueError("gemm_4bit_exec: nested_code, nested_absmax and nested_offset come together")
    want = torch.uint8 if nested else torch.float32
    if absmax.dtype != want:
        raise ValueError(f"gemm_4bit_exec: absmax must be {want} ({'nested' if nested else 'plain'} "
                         f"statistics), got {absmax.dtype}")
    for t, name in ((B, "B"), (code, "code"), (absmax, "absmax"), (nested_code, "nested_code"),
                    (nested_absmax, "nested_absmax"), (bias, "bias")):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"gemm_4bit_exec: {name} must be on the CPU, got {t.device}")
    if bias is not None and (bias.dtype != A.dtype or bias.numel() != N):
        raise ValueError(f"gemm_4bit_exec: bias must hold {N} values of A's dtype {A.dtype}, got "
                         f"{bias.numel()} {bias.dtype}")
    return K


def _view(t, name):
    return _arrays.input_view(t.contiguous(), name)


def _gemm_4bit_exec(A, B, code, absmax, nested_code, nested_absmax, nested_offset, blocksize,
                    nested_blocksize, N, bias=None):
    K = _check(A, B, code, absmax, nested_code, nested_absmax, nested_offset, blocksize, N, bias)
    M = A.numel() // K
    out = torch.empty(tuple(A.shape[:-1]) + (N,), dtype=A.dtype)
    if M == 0:
        return out
    qv, cv = _view(B, "B"), _view(code, "code")
    if nested_absmax is None:
        scales = _view(absmax, "absmax")
    else:
        scales = (_view(absmax, "absmax"), _view(nested_code, "nested_code"),
                  _view(nested_absmax, "nested_absmax"), float(nested_offset.item()), int(nested_blocksize))
    isa = kernel_isa()
    p, k = PLANS[isa], ISA_NAMES.index(isa)
    A2 = A.reshape(M, K).contiguous()
    if M <= p.fused_max_rows:
        fused(_arrays.input_view(A2, "A"), qv, cv, scales, _view(bias, "bias") if bias is not None else None,
              _arrays.input_view(out, "out"), M, N, K, blocksize)
        return out
    # many rows: float32 tiles of weight rows + torch's float32 GEMM
    A32 = A2.float()
    rows = max(8, min(N, p.tile_bytes // (4 * K)))
    buf = torch.empty(rows, K, dtype=torch.float32)
    bv = _arrays.input_view(buf, "buf")
    out32 = out.view(M, N) if A.dtype == torch.float32 else torch.empty(M, N, dtype=torch.float32)
    bias32 = bias.float() if bias is not None else None
    for n0 in range(0, N, rows):
        n1 = min(N, n0 + rows)
        _C.cpu_q4x_dequant_rows(qv, cv, scales, bv, n0, n1, N, K, blocksize, _threads(p, (n1 - n0) * K), k)
        tile = buf[: n1 - n0].T
        if bias32 is None:
            out32[:, n0:n1] = A32 @ tile
        else:
            out32[:, n0:n1] = torch.addmm(bias32[n0:n1], A32, tile)
    if out32.data_ptr() != out.data_ptr():
        out.view(M, N).copy_(out32)
    return out


def _gemm_4bit_exec_fake(A, B, code, absmax, nested_code, nested_absmax, nested_offset, blocksize,
                         nested_blocksize, N, bias=None):
    return A.new_empty(tuple(A.shape[:-1]) + (N,))


gemm_4bit_exec = op(
    "gemm_4bit_exec",
    "(Tensor A, Tensor B, Tensor code, Tensor absmax, Tensor? nested_code, Tensor? nested_absmax, "
    "Tensor? nested_offset, int blocksize, int nested_blocksize, int N, Tensor? bias=None) -> Tensor",
    impl=_gemm_4bit_exec, fake=_gemm_4bit_exec_fake)
