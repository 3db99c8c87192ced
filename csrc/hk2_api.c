/* Process-wide state behind the C API: error messages, the API lock and the workspace it guards, ISA selection
 * (cpuid, overridable with HYBRID_K2_ISA), thread count, the bandwidth probe, test hooks. */
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include "hk2_internal.h"

/* ---- errors ---- */
static __thread char t_err[512];

int hk2_fail(int code, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(t_err, sizeof t_err, fmt, ap);
    va_end(ap);
    return code;
}
void hk2_clear_error(void) { t_err[0] = '\0'; }
const char *hk2_last_error(void) { return t_err; }

/* ---- API lock: one pool and one workspace, so calls run one at a time ---- */
static pthread_mutex_t g_api_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_once_t g_fork_once = PTHREAD_ONCE_INIT;

/* fork() while another thread is inside a call: the child must not inherit a held lock */
static void fork_prepare(void) { pthread_mutex_lock(&g_api_mu); }
static void fork_parent(void) { pthread_mutex_unlock(&g_api_mu); }
static void fork_child(void) { pthread_mutex_unlock(&g_api_mu); }
static void register_fork_handlers(void) { pthread_atfork(fork_prepare, fork_parent, fork_child); }

void hk2_api_lock(void) {
    pthread_once(&g_fork_once, register_fork_handlers);
    pthread_mutex_lock(&g_api_mu);
}
void hk2_api_unlock(void) { pthread_mutex_unlock(&g_api_mu); }

/* ---- workspace: grown on demand, kept between calls (guarded by the API lock) ---- */
static uint8_t *g_ws;
static size_t g_ws_size;

void *hk2_workspace(size_t n) {
    if (n > g_ws_size) {
        free(g_ws);
        g_ws_size = 0;
        g_ws = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(n));
        if (!g_ws) return NULL;
        g_ws_size = n;
    }
    return g_ws;
}

/* ---- ISA ---- */
typedef struct { const char *name; const hk2_kernels *k; } isa_entry;

static int cpu_has(const char *name) {
#ifdef HK2_NO_X86
    return strcmp(name, "scalar") == 0;
#else
    __builtin_cpu_init();
    if (!strcmp(name, "scalar")) return 1;
    const int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    if (!strcmp(name, "avx2")) return avx2;
#ifdef HK2_USE_SIMDE
    /* test build: the AVX-512 kernels run on SIMDe's portable emulation */
    if (!strcmp(name, "avx512bw") || !strcmp(name, "avx512vnni")) return 1;
#else
    const int bw = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                   __builtin_cpu_supports("avx512vl");
    if (!strcmp(name, "avx512bw")) return bw;
    if (!strcmp(name, "avx512vnni")) return bw && __builtin_cpu_supports("avx512vnni");
#endif
    return 0;
#endif
}

static const hk2_kernels *kernels_named(const char *name) {
    if (!strcmp(name, "scalar")) return &hk2_kernels_scalar;
#ifndef HK2_NO_X86
    if (!strcmp(name, "avx2")) return &hk2_kernels_avx2;
    if (!strcmp(name, "avx512bw")) return &hk2_kernels_avx512bw;
    if (!strcmp(name, "avx512vnni")) return &hk2_kernels_avx512vnni;
#endif
    return NULL;
}

/* "avx512" means the best AVX-512 variant this CPU runs */
static const char *resolve(const char *name) {
    if (!strcmp(name, "avx512")) return cpu_has("avx512vnni") ? "avx512vnni" : "avx512bw";
    return name;
}

static const hk2_kernels *g_kernels;
static int g_isa_err;  /* HYBRID_K2_ISA named something unusable */

static void select_default(void) {
    static const char *order[] = {"avx512vnni", "avx512bw", "avx2", "scalar"};
    const char *env = getenv("HYBRID_K2_ISA");
    if (env && *env) {
        const char *r = resolve(env);
        if (kernels_named(r) && cpu_has(r)) { g_kernels = kernels_named(r); return; }
        g_isa_err = 1;
    }
    for (size_t i = 0; i < sizeof order / sizeof order[0]; i++) {
        if (cpu_has(order[i]) && kernels_named(order[i])) { g_kernels = kernels_named(order[i]); return; }
    }
}

static pthread_once_t g_isa_once = PTHREAD_ONCE_INIT;

const hk2_kernels *hk2_active_kernels(void) {
    pthread_once(&g_isa_once, select_default);
    return g_kernels;
}

static int isa_known(const char *n) {
    return !strcmp(n, "scalar") || !strcmp(n, "avx2") || !strcmp(n, "avx512") || !strcmp(n, "avx512bw") ||
           !strcmp(n, "avx512vnni");
}

int hk2_isa_supported(const char *name) {
    if (!name) return hk2_fail(HK2_EINVAL, "isa name is NULL");
    if (!isa_known(name))
        return hk2_fail(HK2_EISA, "unknown ISA '%s' (scalar, avx2, avx512, avx512bw, avx512vnni)", name);
    const char *r = resolve(name);
    return kernels_named(r) != NULL && cpu_has(r);
}

int hk2_set_isa(const char *name) {
    hk2_clear_error();
    int ok = hk2_isa_supported(name);
    if (ok < 0) return ok;
    if (!ok) return hk2_fail(HK2_EISA, "this CPU (or build) lacks ISA '%s'", name);
    hk2_active_kernels();
    hk2_api_lock();
    g_kernels = kernels_named(resolve(name));
    g_isa_err = 0;
    hk2_api_unlock();
    return HK2_OK;
}

const char *hk2_isa(void) {
    const hk2_kernels *k = hk2_active_kernels();
    if (g_isa_err) return "invalid HYBRID_K2_ISA";
    return k->name;
}

/* ---- threads ---- */
int hk2_set_threads(int n) {
    hk2_clear_error();
    if (n < 1 || n > 1024) return hk2_fail(HK2_EINVAL, "threads=%d must be in [1, 1024]", n);
    hk2_api_lock();
    int err = hk2_pool_resize(n);
    hk2_api_unlock();
    return err;
}

int hk2_get_threads(void) {
    hk2_api_lock();
    int n = hk2_pool_threads();
    hk2_api_unlock();
    return n;
}

void hk2_shutdown(void) {
    hk2_api_lock();
    hk2_pool_shutdown();
    hk2_api_unlock();
}

/* ---- bandwidth probe: each thread streams its own contiguous slice ---- */
typedef struct {
    const uint8_t *buf;
    size_t n;
    uint64_t (*read_sum)(const void *, size_t);
    _Alignas(HK2_CACHE_LINE) uint64_t sums[1024][HK2_CACHE_LINE / sizeof(uint64_t)];
} probe_job;

static void probe_task(void *ctx, int ith, int nth) {
    probe_job *job = ctx;
    const size_t per = (job->n / (size_t)nth) & ~(size_t)4095;
    const size_t lo = per * (size_t)ith, hi = ith == nth - 1 ? job->n : lo + per;
    job->sums[ith][0] = job->read_sum(job->buf + lo, hi - lo);
}

uint64_t hk2_read_probe(const void *buf, size_t n) {
    if (!buf || n == 0) return 0;
    const hk2_kernels *k = hk2_active_kernels();
    probe_job *job = aligned_alloc(HK2_CACHE_LINE, sizeof(probe_job));
    if (!job) return 0;
    job->buf = buf;
    job->n = n;
    job->read_sum = k->read_sum;
    hk2_api_lock();
    const int nth = hk2_pool_threads();
    hk2_pool_run(probe_task, job);
    hk2_api_unlock();
    uint64_t s = 0;
    for (int i = 0; i < nth && i < 1024; i++) s += job->sums[i][0];
    free(job);
    return s;
}

/* ---- test hooks: a C wait that only a second Python thread can end ---- */
static atomic_int g_debug_state;  /* 0 idle, 1 a thread waits, 2 released */

int hk2_debug_wait(int timeout_ms) {
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    atomic_store(&g_debug_state, 1);
    for (;;) {
        int released = 2;
        if (atomic_compare_exchange_strong(&g_debug_state, &released, 0)) return 0;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 > timeout_ms) {
            atomic_store(&g_debug_state, 0);
            return -1;
        }
        struct timespec nap = {0, 200000};
        nanosleep(&nap, NULL);
    }
}

int hk2_debug_signal(void) {
    int waiting = 1;
    return atomic_compare_exchange_strong(&g_debug_state, &waiting, 2);
}
