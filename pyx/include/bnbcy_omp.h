/* OpenMP when the compiler has it; one thread otherwise (the build still works). */
#ifndef BNBCY_OMP_H
#define BNBCY_OMP_H
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_max_threads(void) { return 1; }
#endif
#endif
