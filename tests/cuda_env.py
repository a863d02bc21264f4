"""Where the CUDA tests run: a GPU, or bnbcy's SIMT emulator (``BNBCY_EMULATE_CUDA=1``).

Under emulation the CUDA kernels run on CPU tensors through the same launchers and
``_C.cuda_launch``; tests then use smaller shapes (``pick``) so the suite stays fast.
"""
import torch

from bnbcy import kernels

EMULATED = kernels.emulating()
DEVICE = "cpu" if EMULATED else "cuda"


def sync():
    """Wait for the kernels (a no-op in the emulator: launches complete before returning)."""
    if not EMULATED:
        torch.cuda.synchronize()


def pick(on_gpu, emulated):
    """``on_gpu`` on a GPU, ``emulated`` (smaller sizes) in the emulator."""
    return emulated if EMULATED else on_gpu
