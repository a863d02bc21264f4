"""``bnbcy::quantize_blockwise``, ``bnbcy::dequantize_blockwise(.out)`` (bitsandbytes' schemas)."""
from __future__ import annotations

import torch

from ..backends import blockwise as _bw
from ._lib import op

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _check_blockwise_fake(A, blocksize, dtype, want_dtype):
    torch._check(blocksize > 0, lambda: f"blocksize must be positive, got {blocksize}")
    torch._check(A.dtype == want_dtype, lambda: f"A must be {want_dtype}, got {A.dtype}")
    torch._check(dtype in _FLOATS, lambda: f"dtype must be float16, bfloat16 or float32, got {dtype}")


def _quantize_fake(A, code, blocksize):
    _check_blockwise_fake(A, blocksize, A.dtype, A.dtype)
    torch._check(A.dtype in _FLOATS, lambda: f"A must be float16, bfloat16 or float32, got {A.dtype}")
    blocks = -(A.numel() // -blocksize)
    return torch.empty_like(A, dtype=torch.uint8), A.new_empty((blocks,), dtype=torch.float32)


quantize_blockwise = op(
    "quantize_blockwise", "(Tensor A, Tensor code, int blocksize) -> (Tensor, Tensor)",
    impl=lambda A, code, blocksize: _bw.quantize_blockwise(A, code, blocksize), fake=_quantize_fake)


def _dequantize_fake(A, absmax, code, blocksize, dtype):
    _check_blockwise_fake(A, blocksize, dtype, torch.uint8)
    return torch.empty_like(A, dtype=dtype)


def _dequantize_out(A, absmax, code, blocksize, dtype, out):
    _bw.dequantize_blockwise(A, absmax, code, blocksize, dtype, out=out)


def _dequantize_out_fake(A, absmax, code, blocksize, dtype, out):
    _check_blockwise_fake(A, blocksize, dtype, torch.uint8)
    torch._check(out.shape == A.shape, lambda: f"Expected out.shape == {A.shape}, got {out.shape}")
    torch._check(out.dtype == dtype, lambda: f"Expected out.dtype == {dtype}, got {out.dtype}")


dequantize_blockwise = op(
    "dequantize_blockwise", "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype) -> Tensor",
    impl=_bw.dequantize_blockwise, fake=_dequantize_fake)
op("dequantize_blockwise.out",
   "(Tensor A, Tensor absmax, Tensor code, int blocksize, ScalarType dtype, Tensor! out) -> ()",
   impl=_dequantize_out, fake=_dequantize_out_fake)
