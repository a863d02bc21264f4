// The emulator's scheduler: runs one kernel launch, block by block, each CUDA thread a fiber.
// Compiled into every emulated module library next to the module's translation unit.
#include "cuda_emu.h"
#include "kernel_table.h"

#include <stdlib.h>
#include <vector>

extern "C" {
__attribute__((section("bnbcy_shared"), aligned(128))) uint8_t bnbcy_emu_dyn_shared[BNBCY_EMU_MAX_DYN_SHARED];
}

namespace bnbcy_emu {

Launch *g = nullptr;
static std::mutex g_mutex;

#if BNBCY_EMU_ASAN
static const size_t kStack = 1024 * 1024;
#else
static const size_t kStack = 128 * 1024;
#endif

static std::vector<Fiber> g_fibers;
static std::vector<void *> g_stacks;
static const Entry *g_entry;
static void **g_params;
static int g_flags;  // bnbcy_emu_configure(): bit 0 late cp.async

// fail() from the scheduler's own code (completing a collective) unwinds to run_block().
struct SchedulerError {};
static bool g_in_scheduler = false;

void fail(const char *fmt, ...) {
    if (!g->failed) {
        va_list ap;
        va_start(ap, fmt);
        int k = snprintf(g->error, g->errlen, "block (%u, %u, %u), thread (%u, %u, %u): ", g->bid.x, g->bid.y,
                         g->bid.z, g->cur ? g->cur->tid.x : 0, g->cur ? g->cur->tid.y : 0,
                         g->cur ? g->cur->tid.z : 0);
        if (k < 0) k = 0;
        if ((size_t)k < g->errlen) vsnprintf(g->error + k, g->errlen - k, fmt, ap);
        va_end(ap);
        g->failed = true;
    }
    if (g_in_scheduler || g->cur == nullptr) throw SchedulerError();
    Fiber *f = g->cur;
    f->state = DONE;
    for (;;) swapcontext(&f->ctx, &g->sched);  // never resumed
}

// ------------------------------------------------------------------ switching (ASan-aware)
static void switch_to_fiber(Fiber *f) {
    g->cur = f;
#if BNBCY_EMU_ASAN
    void *fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, g_stacks[f->linear], kStack);
    swapcontext(&g->sched, &f->ctx);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swapcontext(&g->sched, &f->ctx);
#endif
    g->cur = nullptr;
}

static void switch_to_scheduler(Fiber *f) {
#if BNBCY_EMU_ASAN
    __sanitizer_start_switch_fiber(f->state == DONE ? nullptr : &f->fake_stack, g->sched_stack_bottom,
                                   g->sched_stack_size);
    swapcontext(&f->ctx, &g->sched);
    __sanitizer_finish_switch_fiber(f->fake_stack, nullptr, nullptr);
#else
    swapcontext(&f->ctx, &g->sched);
#endif
}

static void perform(const CpAsync &c) {
    memcpy(c.dst, c.src, c.src_bytes);
    if (c.src_bytes < c.cp_size) memset(c.dst + c.src_bytes, 0, c.cp_size - c.src_bytes);
}

// Copies of the oldest groups, leaving the newest `keep` committed groups (and the
// uncommitted copies) in flight.
static void land(Fiber *f, int keep) {
    const int n_done_groups = f->ngroups - keep;
    if (n_done_groups <= 0) return;
    const int upto = f->group_end[n_done_groups - 1];
    for (int k = 0; k < upto; k++) perform(f->cp[k]);
    memmove(f->cp, f->cp + upto, (f->ncp - upto) * sizeof(CpAsync));
    f->ncp -= upto;
    for (int k = 0; k + n_done_groups < f->ngroups; k++) f->group_end[k] = f->group_end[k + n_done_groups] - upto;
    f->ngroups -= n_done_groups;
    f->committed = f->ngroups ? f->group_end[f->ngroups - 1] : 0;
}

static void fiber_main() {
    Fiber *f = g->cur;
#if BNBCY_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g->sched_stack_bottom, &g->sched_stack_size);
#endif
    _mm_setcsr(BNBCY_EMU_FTZ ? (_mm_getcsr() | 0x8040u) : (_mm_getcsr() & ~0x8040u));
    g_entry->invoke(g_entry->fn, g_params);
    // copies still in flight land (the GPU completes them); nothing can read them any more
    f->ngroups = f->ncp ? 1 : 0;
    if (f->ncp) f->group_end[0] = f->ncp;
    land(f, 0);
    f->state = DONE;
    switch_to_scheduler(f);
    abort();  // a finished fiber is never resumed
}

void yield_to_scheduler(int state, const char *site, int line) {
    Fiber *f = g->cur;
    f->state = state;
    f->site = site;
    f->line = line;
    switch_to_scheduler(f);
}

uint32_t warp_collective(int op, unsigned mask, const uint32_t *in, int nin, uint32_t *out, const char *site,
                         int line) {
    Fiber *f = g->cur;
    f->op = op;
    f->mask = mask;
    memcpy(f->in, in, nin * sizeof(uint32_t));
    yield_to_scheduler(AT_WARP, site, line);
    const int nout = (op == W_LDMATRIX_X4 || op == W_MMA_S8_16832) ? 4 : 1;
    memcpy(out, f->out, nout * sizeof(uint32_t));
    return out[0];
}

void cp_async(uint8_t *dst, const void *src, unsigned cp_size, unsigned src_bytes) {
    Fiber *f = g->cur;
    if (src_bytes > cp_size) fail("cp.async: src-size %u exceeds cp-size %u", src_bytes, cp_size);
    if (((uintptr_t)dst | (uintptr_t)src) % cp_size)
        fail("cp.async: misaligned address (dst %p, src %p, cp-size %u)", (void *)dst, src, cp_size);
    if (f->ncp == MAX_CP_ASYNC) fail("cp.async: more than %d copies in flight in one thread", MAX_CP_ASYNC);
    CpAsync c = {dst, (const uint8_t *)src, src_bytes, cp_size};
    if (!g->late_cp_async) {
        perform(c);  // eager mode: the copy lands at once (still counted in its group)
        c.src_bytes = 0;
        c.cp_size = 0;
    }
    f->cp[f->ncp++] = c;
}

void cp_async_commit() {
    Fiber *f = g->cur;
    if (f->ngroups == MAX_CP_GROUPS) land(f, MAX_CP_GROUPS - 1);  // bounded bookkeeping, same semantics
    f->group_end[f->ngroups++] = f->ncp;
    f->committed = f->ncp;
}

void cp_async_wait(int n) {
    Fiber *f = g->cur;
    land(f, n);
}

// ------------------------------------------------------------------------ warp collectives
static const char *op_name(int op) { return kWarpOpName[op]; }

static int shfl_src(int op, int lane, uint32_t arg, int width) {
    const int seg = lane & ~(width - 1);
    switch (op) {
        case W_SHFL_IDX: return seg + (int)(arg & (uint32_t)(width - 1));
        case W_SHFL_UP: return (lane - seg) < (int)arg ? lane : lane - (int)arg;
        case W_SHFL_DOWN: return (lane - seg) + (int)arg >= width ? lane : lane + (int)arg;
        default: {
            const int s = lane ^ (int)(arg & 31u);
            return s >= seg + width ? lane : s;
        }
    }
}

static uint32_t rd32(uint32_t addr) {
    uint32_t v;
    memcpy(&v, shared_ptr(addr, 4, "ldmatrix"), 4);
    return v;
}

static void complete(Fiber *lanes[32], unsigned mask, int op) {
    if (op >= W_SHFL_XOR && op <= W_SHFL_IDX) {
        for (int l = 0; l < 32; l++) {
            if (!(mask >> l & 1u)) continue;
            Fiber *f = lanes[l];
            const int width = (int)f->in[2];
            if (width < 1 || width > 32 || (width & (width - 1)))
                fail("%s: width %d is not a power of two in 1..32", op_name(op), width);
            const int s = shfl_src(op, l, f->in[1], width);
            if (!(mask >> s & 1u))
                fail("%s at %s:%d: lane %d reads lane %d, which is not in the mask 0x%08x", op_name(op), f->site,
                     f->line, l, s, mask);
            f->out[0] = lanes[s]->in[0];
        }
    } else if (op == W_BALLOT || op == W_ANY || op == W_ALL || op == W_SYNCWARP) {
        uint32_t ballot = 0;
        for (int l = 0; l < 32; l++)
            if ((mask >> l & 1u) && lanes[l]->in[0]) ballot |= 1u << l;
        const uint32_t r = op == W_BALLOT ? ballot : op == W_ANY ? (ballot != 0) : (ballot == mask);
        for (int l = 0; l < 32; l++)
            if (mask >> l & 1u) lanes[l]->out[0] = r;
    } else if (op == W_LDMATRIX_X4) {
        // lanes 8j..8j+7 give the 16-byte rows of matrix j; lane l gets word (l & 3) of row l >> 2
        for (int l = 0; l < 32; l++)
            if (lanes[l]->in[0] % 16)
                fail("ldmatrix.x4: lane %d row address 0x%x is not 16-byte aligned", l, lanes[l]->in[0]);
        for (int l = 0; l < 32; l++)
            for (int j = 0; j < 4; j++) lanes[l]->out[j] = rd32(lanes[8 * j + (l >> 2)]->in[0] + 4 * (l & 3));
    } else if (op == W_MMA_S8_16832) {
        // PTX ISA fragment layouts of mma.m16n8k32 .s8 (groupID g = lane >> 2, t = lane & 3):
        //   A 16x32 row: a0 (g, 4t..4t+3) a1 (g+8, 4t..) a2 (g, 16+4t..) a3 (g+8, 16+4t..)
        //   B 32x8 col:  b0 (k 4t..4t+3, n g) b1 (k 16+4t.., n g)
        //   C/D 16x8:    c0, c1 (g, 2t, 2t+1) c2, c3 (g+8, 2t, 2t+1)
        int8_t A[16][32], B[32][8];
        int32_t C[16][8];
        for (int l = 0; l < 32; l++) {
            const int gq = l >> 2, t = l & 3;
            const uint32_t *r = lanes[l]->in;
            for (int e = 0; e < 4; e++) {
                A[gq][4 * t + e] = (int8_t)(r[0] >> (8 * e));
                A[gq + 8][4 * t + e] = (int8_t)(r[1] >> (8 * e));
                A[gq][16 + 4 * t + e] = (int8_t)(r[2] >> (8 * e));
                A[gq + 8][16 + 4 * t + e] = (int8_t)(r[3] >> (8 * e));
                B[4 * t + e][gq] = (int8_t)(r[4] >> (8 * e));
                B[16 + 4 * t + e][gq] = (int8_t)(r[5] >> (8 * e));
            }
            C[gq][2 * t] = (int32_t)r[6];
            C[gq][2 * t + 1] = (int32_t)r[7];
            C[gq + 8][2 * t] = (int32_t)r[8];
            C[gq + 8][2 * t + 1] = (int32_t)r[9];
        }
        for (int l = 0; l < 32; l++) {
            const int gq = l >> 2, t = l & 3;
            const int rows[4] = {gq, gq, gq + 8, gq + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
            for (int j = 0; j < 4; j++) {
                uint32_t acc = (uint32_t)C[rows[j]][cols[j]];
                for (int k = 0; k < 32; k++) acc += (uint32_t)((int)A[rows[j]][k] * (int)B[k][cols[j]]);
                lanes[l]->out[j] = acc;
            }
        }
    }
    for (int l = 0; l < 32; l++)
        if (mask >> l & 1u) lanes[l]->state = RUNNABLE;
}

// Completes every warp collective whose lanes all arrived; an error when one cannot complete.
static bool resolve_warps() {
    bool progress = false;
    const int n = (int)g->nthreads;
    for (int w0 = 0; w0 < n; w0 += 32) {
        const int nl = n - w0 < 32 ? n - w0 : 32;
        Fiber *lanes[32] = {nullptr};
        for (int l = 0; l < nl; l++) lanes[l] = &g->fibers[w0 + l];
        for (int l = 0; l < nl; l++) {
            Fiber *f = lanes[l];
            if (f->state != AT_WARP) continue;
            const unsigned mask = f->mask;
            g->cur = f;  // errors name this lane
            if (!(mask >> l & 1u))
                fail("%s at %s:%d with mask 0x%08x that does not name the calling lane %d", op_name(f->op),
                     f->site, f->line, mask, l);
            if ((f->op == W_LDMATRIX_X4 || f->op == W_MMA_S8_16832) && mask != 0xffffffffu)
                fail("%s needs the whole warp", op_name(f->op));
            for (int k = 0; k < 32; k++) {
                if (!(mask >> k & 1u)) continue;
                if (k >= nl)
                    fail("%s at %s:%d: mask 0x%08x names lane %d, which does not exist (blockDim %u x %u x %u)",
                         op_name(f->op), f->site, f->line, mask, k, g->block.x, g->block.y, g->block.z);
                Fiber *o = lanes[k];
                if (o->state == DONE)
                    fail("%s at %s:%d reached by part of warp %d: lane %d has exited", op_name(f->op), f->site,
                         f->line, w0 / 32, k);
                if (o->state == AT_BARRIER)
                    fail("%s at %s:%d reached by part of warp %d: lane %d waits at __syncthreads (%s:%d)",
                         op_name(f->op), f->site, f->line, w0 / 32, k, o->site, o->line);
                if (o->op != f->op || o->mask != mask)
                    fail("lanes of warp %d meet at different collectives: lane %d at %s (mask 0x%08x, %s:%d), "
                         "lane %d at %s (mask 0x%08x, %s:%d)", w0 / 32, l, op_name(f->op), mask, f->site, f->line,
                         k, op_name(o->op), o->mask, o->site, o->line);
            }
            g->cur = nullptr;
            complete(lanes, mask, f->op);
            progress = true;
        }
    }
    return progress;
}

static bool release_barrier() {
    Fiber *first = nullptr;
    for (unsigned t = 0; t < g->nthreads; t++) {
        Fiber *f = &g->fibers[t];
        if (f->state == DONE) continue;
        if (f->state != AT_BARRIER) return false;
        if (first == nullptr) {
            first = f;
        } else if (f->line != first->line || strcmp(f->site, first->site) != 0) {
            g->cur = f;
            fail("__syncthreads reached by part of the block: this thread waits at %s:%d, thread (%u, %u, %u) "
                 "at %s:%d", f->site, f->line, first->tid.x, first->tid.y, first->tid.z, first->site, first->line);
        }
    }
    if (first == nullptr) return false;
    for (unsigned t = 0; t < g->nthreads; t++)
        if (g->fibers[t].state == AT_BARRIER) g->fibers[t].state = RUNNABLE;
    return true;
}

// Uninitialised shared memory reads as 0xFF bytes (NaN floats, -1 integers), block after block.
__attribute__((no_sanitize_address)) static void poison_shared() {
    volatile uint8_t *p = __start_bnbcy_shared;
    const size_t n = (size_t)(__stop_bnbcy_shared - __start_bnbcy_shared);
    for (size_t k = 0; k < n; k++) p[k] = 0xff;
}

static void run_block() {
    const unsigned n = g->nthreads;
    for (unsigned t = 0; t < n; t++) {
        Fiber *f = &g->fibers[t];
        f->tid.x = t % g->block.x;
        f->tid.y = (t / g->block.x) % g->block.y;
        f->tid.z = t / (g->block.x * g->block.y);
        f->linear = (int)t;
        f->state = RUNNABLE;
        f->site = "";
        f->line = 0;
        f->op = W_NONE;
        f->ncp = f->ngroups = f->committed = 0;
        f->fake_stack = nullptr;
        getcontext(&f->ctx);
        f->ctx.uc_stack.ss_sp = g_stacks[t];
        f->ctx.uc_stack.ss_size = kStack;
        f->ctx.uc_link = nullptr;
        makecontext(&f->ctx, fiber_main, 0);
    }
    for (;;) {
        for (unsigned t = 0; t < n && !g->failed; t++)
            if (g->fibers[t].state == RUNNABLE) switch_to_fiber(&g->fibers[t]);
        if (g->failed) return;
        bool progress;
        g_in_scheduler = true;
        try {
            progress = resolve_warps() || release_barrier();
        } catch (const SchedulerError &) {
            g_in_scheduler = false;
            return;
        }
        g_in_scheduler = false;
        if (progress) continue;
        bool all_done = true;
        for (unsigned t = 0; t < n; t++) all_done &= g->fibers[t].state == DONE;
        if (all_done) return;
        g->cur = nullptr;
        snprintf(g->error, g->errlen, "block (%u, %u, %u): no thread can proceed (deadlock)", g->bid.x, g->bid.y,
                 g->bid.z);
        g->failed = true;
        return;
    }
}

}  // namespace bnbcy_emu

namespace bnbcy_emu {
static int launch_impl(const Entry *e, const unsigned *grid, const unsigned *block, unsigned shmem, void **params,
                       int nparams, char *err, int errlen, int flags) {
    std::lock_guard<std::mutex> lock(g_mutex);
    Launch L;
    memset(&L, 0, sizeof(L));
    L.error = err;
    L.errlen = (size_t)errlen;
    L.late_cp_async = ((flags | g_flags) & 1) != 0;
    g = &L;
    if (nparams != e->nparams) {
        snprintf(err, errlen, "%s takes %d parameters, the launch passed %d", e->name, e->nparams, nparams);
        return 1;
    }
    L.grid = {grid[0], grid[1], grid[2]};
    L.block = {block[0], block[1], block[2]};
    L.nthreads = block[0] * block[1] * block[2];
    const unsigned long long threads = (unsigned long long)block[0] * block[1] * block[2];
    if (threads > 1024 || block[2] > 64 || grid[1] > 65535 || grid[2] > 65535) {
        snprintf(err, errlen, "%s: invalid launch dimensions grid (%u, %u, %u) block (%u, %u, %u) "
                 "(at most 1024 threads, blockDim.z <= 64, gridDim.y/z <= 65535)",
                 e->name, grid[0], grid[1], grid[2], block[0], block[1], block[2]);
        return 1;
    }
    if (e->max_threads > 0 && threads > (unsigned long long)e->max_threads) {
        snprintf(err, errlen, "%s: %llu threads per block exceed its __launch_bounds__(%d)", e->name, threads,
                 e->max_threads);
        return 1;
    }
    if (shmem > BNBCY_EMU_MAX_DYN_SHARED) {
        snprintf(err, errlen, "%s: %u bytes of dynamic shared memory requested (at most %d)", e->name, shmem,
                 (int)BNBCY_EMU_MAX_DYN_SHARED);
        return 1;
    }
    L.dyn_shared = shmem;
    if (g_fibers.size() < L.nthreads) {
        g_fibers.resize(L.nthreads);
        while (g_stacks.size() < L.nthreads) {
            void *s = mmap(nullptr, kStack, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                           -1, 0);
            if (s == MAP_FAILED) {
                snprintf(err, errlen, "%s: cannot map fiber stacks", e->name);
                return 1;
            }
            g_stacks.push_back(s);
        }
    }
    L.fibers = g_fibers.data();
    g_entry = e;
    g_params = params;
    const unsigned csr = _mm_getcsr();
    for (unsigned z = 0; z < grid[2] && !L.failed; z++)
        for (unsigned y = 0; y < grid[1] && !L.failed; y++)
            for (unsigned x = 0; x < grid[0] && !L.failed; x++) {
                L.bid = {x, y, z};
                poison_shared();
                run_block();
            }
    _mm_setcsr(csr);
    g = nullptr;
    if (L.failed) return 2;
    const_cast<Entry *>(e)->launches++;
    return 0;
}
}  // namespace bnbcy_emu

extern "C" __attribute__((visibility("default"))) int bnbcy_emu_launch(const void *entry, const unsigned *grid, const unsigned *block, unsigned shmem,
                                void **params, int nparams, char *err, int errlen, int flags) {
    return bnbcy_emu::launch_impl((const bnbcy_emu::Entry *)entry, grid, block, shmem, params, nparams, err, errlen, flags);
}

extern "C" __attribute__((visibility("default"))) void bnbcy_emu_configure(int flags) { bnbcy_emu::g_flags = flags; }
