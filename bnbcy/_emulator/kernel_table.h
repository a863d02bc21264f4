// The table of a module's kernels: one Entry per extern "C" __global__ function, with a
// trampoline that unpacks cuLaunchKernel-style parameters (void *params[]) by the kernel's
// own parameter types, and those types as signature letters for the Python side to check.
#pragma once
#include <stddef.h>
#include <type_traits>
#include <utility>

namespace bnbcy_emu {

struct Entry;
// The first member of an Entry: what bnbcy._C.cuda_launch calls for an emulated kernel.
typedef int (*LaunchFn)(const void *entry, const unsigned *grid, const unsigned *block, unsigned shmem,
                        void **params, int nparams, char *err, int errlen, int flags);

struct Entry {
    LaunchFn launch;
    const char *name;
    void *fn;
    void (*invoke)(void *fn, void **params);
    int nparams;
    const char *kinds;  // bnbcy's signature letters: p q i u f d ('?' for anything else)
    int max_threads;    // __launch_bounds__, 0 if none
    unsigned long long launches;
};

template <class T>
constexpr char kind_of() {
    return std::is_pointer<T>::value ? 'p'
           : std::is_same<T, float>::value ? 'f'
           : std::is_same<T, double>::value ? 'd'
           : (std::is_integral<T>::value && sizeof(T) == 8) ? 'q'
           : (std::is_integral<T>::value && sizeof(T) == 4 && std::is_signed<T>::value) ? 'i'
           : (std::is_integral<T>::value && sizeof(T) == 4) ? 'u'
           : '?';
}

template <class... A, size_t... I>
inline void invoke_impl(void (*f)(A...), void **p, std::index_sequence<I...>) {
    f(*static_cast<typename std::remove_cv<A>::type *>(p[I])...);
}

template <class... A>
void invoke_as(void *fn, void **params) {
    invoke_impl(reinterpret_cast<void (*)(A...)>(fn), params, std::index_sequence_for<A...>{});
}

template <class... A>
const char *kinds_of() {
    static const char k[] = {kind_of<typename std::remove_cv<A>::type>()..., '\0'};
    return k;
}

template <class... A>
Entry make_entry(LaunchFn launch, const char *name, void (*f)(A...), int max_threads) {
    return Entry{launch, name, reinterpret_cast<void *>(f), &invoke_as<A...>, (int)sizeof...(A), kinds_of<A...>(),
                 max_threads, 0ull};
}

}  // namespace bnbcy_emu

extern "C" int bnbcy_emu_launch(const void *entry, const unsigned *grid, const unsigned *block, unsigned shmem,
                                void **params, int nparams, char *err, int errlen, int flags);
