"""A fast subset of every emulated module, for a run under AddressSanitizer + UBSan.

Run by tests/test_emulator_sanitize.py in a process that preloads libasan, with
``BNBCY_EMULATOR_SANITIZE=1`` (the emulated kernels are then built with
``-fsanitize=address,undefined``). Exits non-zero on a wrong result; a sanitizer
report aborts the process.
"""
import sys

import torch

from bnbcy import _C, kernels
from bnbcy import functional as F
from bnbcy.functional import _int8_cuda as I8


def main():
    g = torch.Generator().manual_seed(0)
    ok = True
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        x = torch.randn(3 * 256 + 5, generator=g).to(dtype)[1:]  # unaligned, partial block
        with kernels.emulate(False):
            ref8 = F.quantize_blockwise(x, blocksize=256)[0]
            ref4 = F.quantize_4bit(x, blocksize=64)[0]
        with kernels.emulate():
            q8, s8 = F.quantize_blockwise(x, blocksize=256)
            F.dequantize_blockwise(q8, s8)
            q4, s4 = F.quantize_4bit(x, blocksize=64)
            F.dequantize_4bit(q4, s4)
            CA, rs, _ = F.int8_vectorwise_quant(x.reshape(-1, 11).contiguous(), threshold=1.5)
        ok &= torch.equal(q8, ref8) and torch.equal(q4, ref4)
    M, N, K = 70, 33, 72
    A = torch.randint(-128, 128, (M, K), generator=g, dtype=torch.int8)
    B = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    for kernel in ("mma", "dp4a"):
        C = torch.zeros(M, N, dtype=torch.int32)
        with kernels.emulate(late_cp_async=True):
            I8.launch_int8_gemm(_C.view(A, "A"), _C.view(B, "B"), _C.view(C, "C"), M, N, K, kernel)
        ok &= torch.equal(C.long(), A.long() @ B.long().T)
    p = torch.randn(300, generator=g)
    gr = torch.randn(300, generator=g) * 0.1
    s1, s2 = torch.zeros(300), torch.zeros(300)
    with kernels.emulate():
        F.optimizer_update_32bit("lamb", gr, p, s1, 0.9, 1e-8, 1, 1e-3, state2=s2, beta2=0.999,
                                 unorm_vec=torch.zeros(1), max_unorm=1.0)
    ok &= bool(torch.isfinite(p).all())
    print("sanitized emulated kernels:", "ok" if ok else "WRONG RESULTS")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
