/* Mappings behind the CPU output pool (cpu_pool.pxi): anonymous, 2 MiB aligned so that the whole
 * buffer can be backed by transparent huge pages. */
#ifndef BNBCY_CPU_POOL_H
#define BNBCY_CPU_POOL_H
#include <stddef.h>
#include <stdint.h>
#if defined(__linux__) || defined(__APPLE__)
#include <sys/mman.h>
#define BNBCY_POOL_ALIGN ((size_t)2 << 20)

/* bytes (a multiple of BNBCY_POOL_ALIGN) at a 2 MiB boundary, or NULL; *base and *mapped are what
 * bnbcy_pool_unmap takes back. */
static void *bnbcy_pool_map(size_t bytes, void **base, size_t *mapped) {
    const size_t total = bytes + BNBCY_POOL_ALIGN;
    void *p = mmap(NULL, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    const uintptr_t a = ((uintptr_t)p + BNBCY_POOL_ALIGN - 1) & ~(uintptr_t)(BNBCY_POOL_ALIGN - 1);
#ifdef MADV_HUGEPAGE
    madvise((void *)a, bytes, MADV_HUGEPAGE);
#endif
    *base = p;
    *mapped = total;
    return (void *)a;
}

static void bnbcy_pool_unmap(void *base, size_t mapped) { munmap(base, mapped); }
#else
#include <stdlib.h>
#define BNBCY_POOL_ALIGN ((size_t)2 << 20)
static void *bnbcy_pool_map(size_t bytes, void **base, size_t *mapped) {
    void *p = malloc(bytes + BNBCY_POOL_ALIGN);
    if (p == NULL) return NULL;
    *base = p;
    *mapped = bytes + BNBCY_POOL_ALIGN;
    return (void *)(((uintptr_t)p + BNBCY_POOL_ALIGN - 1) & ~(uintptr_t)(BNBCY_POOL_ALIGN - 1));
}
static void bnbcy_pool_unmap(void *base, size_t mapped) { (void)mapped; free(base); }
#endif
#endif
