# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""bnbcy._C: the Cython layer of bnbcy.

One extension module, assembled from topic files: the DLPack tensor view,
the CPU kernels (OpenMP) and the CUDA launch path.
"""

cdef extern from "bnbcy_omp.h" nogil:
    int omp_get_max_threads()

include "tensor_view.pxi"
include "cpu_blockwise.pxi"
include "cpu_fourbit.pxi"
include "cpu_fourbit_exec.pxi"
include "cpu_int8.pxi"
include "cpu_optim.pxi"
include "cpu_pool.pxi"
include "cuda_launch.pxi"


def num_threads():
    """Number of OpenMP threads the CPU kernels use (``OMP_NUM_THREADS``)."""
    return omp_get_max_threads()
