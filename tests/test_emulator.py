"""bnbcy's SIMT emulator (bnbcy/_emulator): its CUDA semantics on small test kernels, and every
shipped blockwise8 / fourbit / int8 kernel run through the CUDA launchers against bnbcy's CPU
kernels (bit-identical codes, exact integers) on inputs with partial blocks, odd sizes, unaligned
views and edge values. Needs no GPU (the kernels are emulated, not run on one), only g++."""
import textwrap

import numpy as np
import pytest
import torch

from bnbcy import _C, kernels
from bnbcy import functional as F
from bnbcy._emulator import EmulatorBuildError, build
from bnbcy.functional import _fourbit_cuda as FC
from bnbcy.functional import _int8_cuda as I8

# The emulated CUDA suite (BNBCY_EMULATE_CUDA=1 python -m pytest -m cuda tests) runs these; they need
# no GPU, only g++, and call bnbcy.kernels.emulate() themselves.
pytestmark = pytest.mark.cuda

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _v(t, name="t"):
    return _C.view(t, name)


def _lib(src, name="t"):
    return build(name, textwrap.dedent(src), kernels.registry.cuda_dir)


def _launch(lib, sym, grid, block, sig, args, shmem=0):
    _C.cuda_launch(lib.handle(sym), grid, block, shmem, 0, _C.EMULATED_DEVICE, sig, args, False)


def _same(a, b):
    a, b = a.contiguous(), b.contiguous()
    if a.dtype.is_floating_point:
        ia = a.view(torch.int16 if a.element_size() == 2 else torch.int32)
        ib = b.view(torch.int16 if b.element_size() == 2 else torch.int32)
        nan = torch.isnan(a.float()) & torch.isnan(b.float())
        return bool(((ia == ib) | nan).all())
    return torch.equal(a, b)


# --------------------------------------------------------------------------------------------------
# semantics
# --------------------------------------------------------------------------------------------------
SEMANTICS = r"""
#include "bnbcy_common.cuh"
extern "C" __global__ void shfl(const int *in, int *out, int mode, int arg) {
    const int v = in[threadIdx.x];
    int r = 0;
    if (mode == 0) r = __shfl_xor_sync(0xffffffffu, v, arg);
    if (mode == 1) r = __shfl_down_sync(0xffffffffu, v, arg);
    if (mode == 2) r = __shfl_up_sync(0xffffffffu, v, arg);
    if (mode == 3) r = __shfl_sync(0xffffffffu, v, arg);
    if (mode == 4) r = (int)__ballot_sync(0xffffffffu, v & 1);
    if (mode == 5) r = __shfl_xor_sync(0xffffffffu, v, arg, 8);
    out[blockIdx.x * blockDim.x + threadIdx.x] = r;
}
extern "C" __global__ void reverse(const float *in, float *out, int n) {
    __shared__ float s[256];
    s[threadIdx.x] = in[blockIdx.x * blockDim.x + threadIdx.x];
    __syncthreads();
    out[blockIdx.x * blockDim.x + threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void reverse_no_barrier(const float *in, float *out, int n) {
    __shared__ float s[256];
    s[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = s[blockDim.x - 1 - threadIdx.x];
}
extern "C" __global__ void dyn(const float *in, float *out) {
    extern __shared__ float d[];
    d[threadIdx.x] = in[threadIdx.x] * 2.0f;
    __syncthreads();
    out[threadIdx.x] = d[(threadIdx.x + 1) % blockDim.x];
}
extern "C" __global__ void partial_barrier(int *out) {
    if (threadIdx.x < 16) __syncthreads();
    else __syncthreads();
    out[threadIdx.x] = 1;
}
extern "C" __global__ void partial_shuffle(int *out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
}
extern "C" __global__ void exits_then_barrier(int *out) {
    if (threadIdx.x >= 32) return;  // exited threads count as arrived, as on the GPU
    __syncthreads();
    out[threadIdx.x] = 2;
}
extern "C" __global__ void __launch_bounds__(64) bounded(int *out) { out[threadIdx.x] = 3; }
extern "C" __global__ void ptx(const float *a, const float *b, const float *c, float *out, int *iout,
                               unsigned short *hout, int n) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        out[6 * i + 0] = mul_ftz(a[i], b[i]);
        out[6 * i + 1] = add_ftz(a[i], b[i]);
        out[6 * i + 2] = fma_ftz(a[i], b[i], c[i]);
        out[6 * i + 3] = max_ftz(a[i], b[i]);
        out[6 * i + 4] = abs_ftz(a[i]);
        out[6 * i + 5] = rcp_approx(a[i]);
        iout[i] = f2i_rni(a[i] * 1.0e3f);
        hout[2 * i] = f16_t::from_float(a[i]);
        hout[2 * i + 1] = bf16_t::from_float(a[i]);
    }
}
"""


@pytest.fixture(scope="module")
def sem():
    return _lib(SEMANTICS, "semantics")


@pytest.mark.parametrize("mode,arg", [(0, 1), (0, 16), (1, 3), (2, 5), (3, 7), (4, 0), (5, 4), (5, 9)])
def test_warp_shuffles_and_ballot(sem, mode, arg):
    x = torch.randint(-1000, 1000, (64,), dtype=torch.int32)
    out = torch.full((64,), -7, dtype=torch.int32)
    _launch(sem, "shfl", (1,), (64,), "ppii", (_v(x[:64]), _v(out), mode, arg))
    lane = np.arange(64) % 32
    base = np.arange(64) - lane
    xs = x.numpy()
    if mode == 0:
        src = base + (lane ^ arg)
    elif mode == 1:
        src = np.where(lane + arg < 32, np.arange(64) + arg, np.arange(64))
    elif mode == 2:
        src = np.where(lane >= arg, np.arange(64) - arg, np.arange(64))
    elif mode == 3:
        src = base + arg
    elif mode == 5:  # width 8: lanes reading a later segment get their own value
        s = lane ^ (arg & 31)
        src = np.where(s < (lane & ~7) + 8, base + s, np.arange(64))
    if mode == 4:
        bits = (xs & 1).astype(np.int64)
        want = [int(sum(int(bits[w * 32 + k]) << k for k in range(32))) for w in range(2)]
        want = np.array([np.int64(want[i // 32]).astype(np.uint32).view(np.int32) for i in range(64)])
    else:
        want = xs[src]
    assert np.array_equal(out.numpy(), want)


def test_shared_memory_barrier_and_poison(sem):
    x = torch.randn(512)
    out = torch.empty(512)
    _launch(sem, "reverse", (2,), (256,), "ppi", (_v(x), _v(out), 512))
    assert torch.equal(out, torch.cat([x[:256].flip(0), x[256:].flip(0)]))
    # without the barrier, thread t reads slot 255 - t before its writer ran: poisoned (NaN)
    _launch(sem, "reverse_no_barrier", (1,), (256,), "ppi", (_v(x), _v(out), 256))
    assert torch.isnan(out[:128]).all() and torch.equal(out[128:256], x[:128].flip(0))


def test_dynamic_shared_memory(sem):
    x = torch.randn(96)
    out = torch.empty(96)
    _launch(sem, "dyn", (1,), (96,), "pp", (_v(x), _v(out)), shmem=96 * 4)
    assert torch.equal(out, (x * 2).roll(-1))


def test_partial_barrier_and_partial_shuffle_are_errors(sem):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(_C.EmulatedKernelError, match="__syncthreads reached by part of the block"):
        _launch(sem, "partial_barrier", (1,), (64,), "p", (_v(out),))
    with pytest.raises(_C.EmulatedKernelError, match="reached by part of warp 0: lane 16 has exited"):
        _launch(sem, "partial_shuffle", (1,), (32,), "p", (_v(out),))
    _launch(sem, "exits_then_barrier", (1,), (64,), "p", (_v(out),))
    assert (out[:32] == 2).all()


def test_launch_checks(sem):
    out = torch.zeros(128, dtype=torch.int32)
    with pytest.raises(_C.EmulatedKernelError, match="exceed its __launch_bounds__"):
        _launch(sem, "bounded", (1,), (128,), "p", (_v(out),))
    with pytest.raises(_C.EmulatedKernelError, match="takes 1 parameters, the launch passed 2"):
        _launch(sem, "bounded", (1,), (32,), "pi", (_v(out), 1))
    assert sem.kinds("ptx") == "ppppppi"


def test_unsupported_constructs_do_not_compile():
    with pytest.raises(EmulatorBuildError, match="inline PTX"):
        _lib('extern "C" __global__ void k(int *o) { int r; asm("mov.u32 %0, %%laneid;" : "=r"(r)); *o = r; }',
             "bad_asm")
    with pytest.raises(EmulatorBuildError, match="atomicAdd"):
        _lib('extern "C" __global__ void k(int *o) { atomicAdd(o, 1); }', "bad_atomic")


def _f32(bits):
    return np.array(bits, dtype=np.uint32).view(np.float32)


def test_exact_ptx_operations(sem):
    rng = np.random.default_rng(1)
    special = _f32([0x00000001, 0x80000001, 0x007fffff, 0x00800000, 0x7f800000, 0xff800000, 0x7fc00000,
                    0x00000000, 0x80000000, 0x3f800000, 0x477ff000, 0x477fefff, 0x33000000, 0x33000001,
                    0x38800000, 0x387fffff, 0x3f808000, 0x3f818000])
    a = np.concatenate([special, (rng.standard_normal(300) * 10.0 ** rng.integers(-40, 5, 300)).astype(np.float32)])
    b = np.concatenate([special[::-1], rng.standard_normal(300).astype(np.float32) * 1e-37])
    c = rng.standard_normal(a.size).astype(np.float32)
    n = a.size
    out = torch.empty(6 * n)
    iout = torch.empty(n, dtype=torch.int32)
    hout = torch.empty(2 * n, dtype=torch.int16)
    ta, tb, tc = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)
    _launch(sem, "ptx", (1,), (64,), "ppppppi", (_v(ta), _v(tb), _v(tc), _v(out), _v(iout), _v(hout), n))
    o = out.numpy().reshape(n, 6)

    def ftz(x):
        x = np.asarray(x, np.float32).copy()
        x[(x != 0) & (np.abs(x) < np.float32(2.0 ** -126))] *= np.float32(0)
        return x
    with np.errstate(all="ignore"):
        fa, fb, fc = ftz(a), ftz(b), ftz(c)
        exp = [ftz(fa * fb), ftz(fa + fb), ftz((fa.astype(np.float64) * fb + fc).astype(np.float32)),
               None, np.abs(fa), ftz(np.float32(1) / fa)]
    for k in (0, 1, 4, 5):
        assert _same(torch.from_numpy(o[:, k].copy()), torch.from_numpy(exp[k])), k
    # fma: one rounding (the float64 product of two floats is exact; the sum rounds once, then to f32
    # may double-round only near halfway points, which these random inputs avoid except by chance)
    assert np.mean(o[:, 2].view(np.uint32) == exp[2].view(np.uint32)) > 0.99
    # max drops NaN, +0 > -0
    m = o[:, 3]
    assert np.all(np.where(np.isnan(fa), m == fb, True) | np.isnan(fb))
    both = ~np.isnan(fa) & ~np.isnan(fb)
    assert np.array_equal(np.where(both, m, 0), np.where(both, np.fmax(fa, fb), 0))
    # f16 / bf16 conversions against torch (round to nearest even; NaN -> 0x7fff canonical)
    h = torch.from_numpy(a).half().view(torch.int16).numpy()
    bf = torch.from_numpy(a).bfloat16().view(torch.int16).numpy()
    hv = hout.numpy()
    fin = ~np.isnan(a)
    assert np.array_equal(hv[0::2][fin], h[fin]) and np.all(hv[0::2][~fin] == 0x7fff)
    assert np.array_equal(hv[1::2][fin], bf[fin]) and np.all(hv[1::2][~fin] == 0x7fff)
    # cvt.rni: nearest even, saturating, NaN -> 0
    with np.errstate(all="ignore"):
        x = ftz(fa * np.float32(1e3))
        want = np.where(np.isnan(x), 0, np.clip(np.rint(x.astype(np.float64)), -2**31, 2**31 - 1)).astype(np.int64)
    assert np.array_equal(iout.numpy().astype(np.int64), want)


# --------------------------------------------------------------------------------------------------
# shipped kernels vs bnbcy's CPU kernels, through the CUDA launchers
# --------------------------------------------------------------------------------------------------
def _input(n, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n + 1, generator=g, dtype=torch.float64) * 3
    if n > 200:
        x[64:128] = 0.0
        x[130:135] = float("nan")
        x[140] = float("inf")
        x[150:160] *= 1e-40
    return x.to(DTYPES[dtype])[1:]  # an unaligned view


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", F.blockwise.CUDA_BLOCKSIZES)
def test_blockwise8_kernels_match_cpu(dtype, blocksize):
    for n in (1, 7, blocksize + 3, 2 * blocksize + 8 * 37):
        x = _input(n, dtype, n + blocksize)
        q0, s0 = F.quantize_blockwise(x, blocksize=blocksize)
        d0 = F.dequantize_blockwise(q0, s0)
        with kernels.emulate():
            q1, s1 = F.quantize_blockwise(x, blocksize=blocksize)
            d1 = F.dequantize_blockwise(q0, s0)
        assert torch.equal(q0, q1) and _same(s0.absmax, s1.absmax), (n, "codes/absmax")
        assert _same(d0, d1), (n, "dequantize")


@pytest.mark.parametrize("qt", FC.QUANT_TYPES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("blocksize", FC.BLOCKSIZES)
def test_fourbit_quantize_kernels_match_cpu(qt, dtype, blocksize):
    for n in (1, 6, blocksize + 5, 3 * blocksize + 16):
        x = _input(n, dtype, 3 * n + blocksize)
        q0, s0 = F.quantize_4bit(x, blocksize=blocksize, quant_type=qt)
        with kernels.emulate():
            q1, s1 = F.quantize_4bit(x, blocksize=blocksize, quant_type=qt)
            d1 = F.dequantize_4bit(q0, s0)
        d0 = F.dequantize_4bit(q0, s0)
        assert torch.equal(q0, q1) and _same(s0.absmax, s1.absmax), (n, "codes/absmax")
        assert _same(d0, d1), (n, "dequantize")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("M", [1, 3, 8, 16])
def test_fourbit_matmul_kernels_match_cpu(dtype, M):
    N, K = 37, 160
    g = torch.Generator().manual_seed(M)
    W = torch.randn(N, K, generator=g).to(DTYPES[dtype])
    q, st = F.quantize_4bit(W, blocksize=64, quant_type="nf4")
    A = torch.randn(M, K, generator=g).to(DTYPES[dtype])
    bias = torch.randn(N, generator=g).to(DTYPES[dtype])
    Wd = F.dequantize_4bit(q, st).double()
    ref = A.double() @ Wd.T + bias.double()
    cm = st.code.float().contiguous()
    for a in (A, A[:1]):
        o = torch.full((a.shape[0], N), float("nan"), dtype=a.dtype)
        with kernels.emulate():
            if a.shape[0] == 1:
                FC.launch_gemv_4bit(_v(a.reshape(-1)), _v(q.reshape(-1)), _v(st.absmax), _v(cm), _v(bias),
                                    _v(o.reshape(-1)), N, K, 64)
            else:
                FC.launch_gemm_4bit_small(_v(a), _v(q.reshape(-1)), _v(st.absmax), _v(cm), _v(bias),
                                          _v(o), a.shape[0], N, K, 64)
        err = (o.double() - ref[:a.shape[0]]).abs()
        tol = (a.double().abs() @ Wd.abs().T + bias.double().abs()) * (K * 2.0**-23 + 2.0**-7) + 1e-6
        assert bool((err <= tol).all()), (M, a.shape, float(err.max()))


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("threshold", [0.0, 2.5])
@pytest.mark.parametrize("shape", [(5, 40), (3, 1100), (9, 17)])
def test_int8_quant_and_dequant_kernels_match_cpu(dtype, threshold, shape):
    g = torch.Generator().manual_seed(shape[1])
    A = (torch.randn(*shape, generator=g) * 2).to(DTYPES[dtype])
    A[0, 0] = float("nan")
    A[1] = 0
    r0 = F.int8_vectorwise_quant(A, threshold=threshold)
    with kernels.emulate():
        r1 = F.int8_vectorwise_quant(A, threshold=threshold)
    assert torch.equal(r0[0], r1[0]) and _same(r0[1], r1[1])
    assert (r0[2] is None and r1[2] is None) or torch.equal(r0[2], r1[2])
    C = torch.randint(-2**20, 2**20, (shape[0], shape[1]), generator=g, dtype=torch.int32)
    rs, cs = torch.rand(shape[0], generator=g) * 3, torch.rand(shape[1], generator=g) * 3
    for bias in (None, torch.randn(shape[1], generator=g).to(DTYPES[dtype])):
        y0 = F.int8_mm_dequant(C, rs, cs, bias=bias, dtype=DTYPES[dtype])
        with kernels.emulate():
            y1 = F.int8_mm_dequant(C, rs, cs, bias=bias, dtype=DTYPES[dtype])
        assert _same(y0, y1)


@pytest.mark.parametrize("arch", [800, 750])
@pytest.mark.parametrize("shape", [(1, 1, 1), (33, 70, 48), (130, 129, 80), (17, 8, 7), (5, 300, 1)])
def test_int8_gemm_kernels_exact(monkeypatch, arch, shape):
    monkeypatch.setenv("BNBCY_EMULATOR_ARCH", str(arch))
    M, N, K = shape
    g = torch.Generator().manual_seed(M * N + K)
    A = torch.randint(-128, 128, (M, K + 1), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    for a in (A[:, :K].contiguous(), A.reshape(-1)[1:M * K + 1].reshape(M, K)):  # aligned, unaligned
        for kernel in ("mma", "dp4a"):
            C = torch.full((M, N), -1, dtype=torch.int32)
            with kernels.emulate():
                I8.launch_int8_gemm(_v(a), _v(B), _v(C), M, N, K, kernel)
            assert torch.equal(C.long(), a.long() @ B.long().T), (kernel, shape)


def test_late_cp_async_catches_a_weakened_wait():
    """The int8 mma GEMM with cp.async.wait_group<STAGES-1> (one stage too weak): eager copies
    hide it, late copies give wrong products."""
    M = N = 128
    K = 256
    g = torch.Generator().manual_seed(0)
    A = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    ref = (A.long() @ B.long().T)
    src = kernels.shipped_source("int8")
    weak = src.replace("cp_async_wait<STAGES - 2>();", "cp_async_wait<STAGES - 1>();")
    assert weak != src
    try:
        with kernels.emulate():
            for late, ok in ((False, True), (True, True)):
                C = torch.zeros(M, N, dtype=torch.int32)
                with kernels.emulate(late_cp_async=late):
                    I8.launch_int8_gemm(_v(A), _v(B), _v(C), M, N, K, "mma")
                assert torch.equal(C.long(), ref) == ok
            kernels.rebuild("int8", weak)
            for late, ok in ((False, True), (True, False)):
                C = torch.zeros(M, N, dtype=torch.int32)
                with kernels.emulate(late_cp_async=late):
                    I8.launch_int8_gemm(_v(A), _v(B), _v(C), M, N, K, "mma")
                assert torch.equal(C.long(), ref) == ok, late
    finally:
        kernels.restore("int8")
    assert kernels.source("int8") == src


def test_swapped_mma_fragments_are_caught():
    src = kernels.shipped_source("int8")
    bad = src.replace("const int row = wm * 64 + mi * 16 + (lmat & 1) * 8 + lrow;",
                      "const int row = wm * 64 + mi * 16 + (lmat >> 1) * 8 + lrow;")
    assert bad != src
    M, N, K = 64, 64, 64
    g = torch.Generator().manual_seed(1)
    A = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    C = torch.zeros(M, N, dtype=torch.int32)
    try:
        with kernels.emulate():
            kernels.rebuild("int8", bad)
            I8.launch_int8_gemm(_v(A), _v(B), _v(C), M, N, K, "mma")
    finally:
        kernels.restore("int8")
    assert not torch.equal(C.long(), A.long() @ B.long().T)


def test_emulating_flag_and_cpu_arrays_outside_emulation(monkeypatch):
    monkeypatch.delenv("BNBCY_EMULATE_CUDA", raising=False)
    assert not kernels.emulating()
    with kernels.emulate():
        assert kernels.emulating()
        with kernels.emulate():
            assert kernels.emulating()
        assert kernels.emulating()
    assert not kernels.emulating()
    monkeypatch.setenv("BNBCY_EMULATE_CUDA", "1")
    assert kernels.emulating()
    monkeypatch.setenv("BNBCY_EMULATE_CUDA", "0")
    x = torch.zeros(8)
    with pytest.raises(ValueError, match="needs CUDA arrays"):
        kernels.registry.launch(FC._QUANTIZE, {"qt": "nf4", "dtype": "f32", "blocksize": 64}, (1,), (256,),
                                (_v(x), _v(x), _v(x), 8), _v(x))


def test_numpy_arrays_run_emulated():
    x = np.random.default_rng(0).standard_normal(300).astype(np.float32)
    q0, s0 = F.quantize_4bit(x, blocksize=64)
    with kernels.emulate():
        q1, s1 = F.quantize_4bit(x, blocksize=64)
    assert isinstance(q1, np.ndarray) and np.array_equal(q0, q1)


# --------------------------------------------------------------------------------------------------
# optimizer kernels vs bnbcy's CPU optimizer kernels
# --------------------------------------------------------------------------------------------------
# name -> (beta1, beta2, beta3, alpha, eps, weight_decay, lr)
OPT_HP = {
    "adam": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-2, 1e-3), "lamb": (0.9, 0.999, 0.0, 0.0, 1e-8, 1e-2, 1e-3),
    "momentum": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2, 1e-2), "lars": (0.9, 0.0, 0.0, 0.0, 0.0, 1e-2, 1e-2),
    "rmsprop": (0.99, 0.0, 0.0, 0.0, 1e-8, 1e-2, 1e-2), "adagrad": (0.0, 0.0, 0.0, 0.0, 1e-10, 1e-2, 1e-2),
    "lion": (0.9, 0.99, 0.0, 0.0, 0.0, 1e-2, 1e-4), "ademamix": (0.9, 0.999, 0.9999, 5.0, 1e-8, 1e-2, 1e-3),
}
TWO_STATE = ("adam", "lamb", "ademamix")


def _opt_inputs(name, dtype, n, bits, seed):
    g = torch.Generator().manual_seed(seed)
    mul = 2 if name == "ademamix" else 1
    out = {"p": torch.randn(n, generator=g).to(dtype), "g": (torch.randn(n, generator=g) * 0.1).to(dtype)}
    shape1 = (2, n) if mul == 2 else (n,)
    if bits == 32:
        s1 = torch.randn(mul * n, generator=g) * 0.05
        out["s1"] = (s1.abs() if name in ("rmsprop", "adagrad") else s1).reshape(shape1)
        out["s2"] = torch.rand(n, generator=g) * 1e-3 if name in TWO_STATE else None
    else:
        nb = -(-n // 256)
        lo = 128 if name in ("rmsprop", "adagrad") else 0  # codes of non-negative values for 2nd moments
        out["s1"] = torch.randint(lo, 256, (mul * n,), generator=g, dtype=torch.uint8).reshape(shape1)
        out["a1"] = (torch.rand(mul * nb, generator=g) * 0.1 + 0.01).reshape((2, nb) if mul == 2 else (nb,))
        out["s2"] = torch.randint(0, 256, (n,), generator=g, dtype=torch.uint8) if name in TWO_STATE else None
        out["a2"] = torch.rand(nb, generator=g) * 1e-3 + 1e-4 if name in TWO_STATE else None
    return out


def _opt_step(name, bits, t, max_unorm):
    b1, b2, b3, alpha, eps, wd, lr = OPT_HP[name]
    unorm = torch.zeros(1) if max_unorm else None
    if bits == 32:
        F.optimizer_update_32bit(name, t["g"], t["p"], t["s1"], b1, eps, 3, lr, state2=t["s2"], beta2=b2, beta3=b3,
                                 alpha=alpha, weight_decay=wd, unorm_vec=unorm, max_unorm=max_unorm)
    else:
        q1 = F.create_dynamic_map(signed=True)
        q2 = F.create_dynamic_map(signed=False)
        F.optimizer_update_8bit_blockwise(name, t["g"], t["p"], t["s1"], t["s2"], b1, b2, b3, alpha, eps, 3, lr,
                                          q1, q2 if t["s2"] is not None else None, t["a1"], t["a2"],
                                          weight_decay=wd, max_unorm=max_unorm, unorm_vec=unorm)
    return unorm


@pytest.mark.parametrize("bits", [32, 8])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", list(OPT_HP))
def test_optimizer_kernels_match_cpu(name, dtype, bits):
    """The emulated CUDA update equals bnbcy's CPU update up to the rounding of the CUDA path's
    approximate ops (emulated as IEEE) and its deterministic reduction order (LAMB/LARS)."""
    max_unorm = {"lamb": 1.0, "lars": 0.02}.get(name, 0.0)
    if bits == 8 and name in ("lamb", "lars"):
        max_unorm = 0.0  # bitsandbytes has no 8-bit trust ratio: plain adam/momentum state update
    for n in (1, 300, 2 * 256 + 7):
        ref = _opt_inputs(name, DTYPES[dtype], n, bits, seed=n + bits)
        emu = {k: (None if v is None else v.clone()) for k, v in ref.items()}
        with kernels.emulate(False):
            u0 = _opt_step(name, bits, ref, max_unorm)
        with kernels.emulate():
            u1 = _opt_step(name, bits, emu, max_unorm)
        rtol = {"float32": 2e-6, "float16": 2e-3, "bfloat16": 1.6e-2}[dtype]
        torch.testing.assert_close(emu["p"].float(), ref["p"].float(), rtol=rtol, atol=1e-6)
        for k in ("s1", "s2", "a1", "a2"):
            if ref.get(k) is None:
                continue
            if ref[k].dtype == torch.uint8:  # an 8-bit state code may sit one step over a midpoint
                diff = (emu[k].int() - ref[k].int()).abs()
                assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) <= 0.02, (k, n)
            else:
                torch.testing.assert_close(emu[k], ref[k], rtol=1e-5, atol=1e-8)
        if max_unorm:
            torch.testing.assert_close(u1, u0, rtol=1e-5, atol=0)
