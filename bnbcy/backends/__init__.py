"""Array-level ops and the one place that decides where an op runs.

Every bnbcy op travels the same way, whatever the array kind:

* ``bnbcy.functional.*`` (bitsandbytes' API) builds the arguments of an op;
* torch tensors go through the ``torch.library`` op (``torch.ops.bnbcy.*``, :mod:`bnbcy._ops`),
  whose kernel is the array-level function of this package; CuPy and NumPy arrays call that
  function directly;
* the array-level function (:mod:`.blockwise`, :mod:`.fourbit`, :mod:`.int8`) validates every
  argument once (through :mod:`bnbcy._arrays`), allocates the outputs and hands validated
  :class:`bnbcy._C.TensorView` objects to the device kernels that :func:`device_kernels`
  picks: :mod:`.cpu` (Cython/OpenMP) or :mod:`.cuda` (the CUDA launchers).
"""
from __future__ import annotations

from .. import kernels
from . import cpu, cuda


def on_cuda(v) -> bool:
    """Whether the op on view ``v`` runs the CUDA kernels: ``v`` lives on a CUDA device, or
    CPU arrays are sent to the SIMT emulator (:func:`bnbcy.kernels.emulating`)."""
    return v.is_cuda or kernels.emulating()


def device_kernels(v):
    """The kernel module (:mod:`.cpu` or :mod:`.cuda`) for an op whose main input is ``v``.
    The one CPU/CUDA decision of bnbcy."""
    return cuda if on_cuda(v) else cpu
