/* Persistent thread pool: n-1 workers plus the calling thread, created once (hk2_pool_resize)
 * and reused by every call. Idle workers spin briefly, then yield the core (torch's own threads
 * share these cores between our calls), then sleep on a condvar; waits spin, then yield, so an
 * oversubscribed machine still makes progress.
 *
 * A worker takes part in a job by joining it: one atomic word holds the job's generation, a
 * closed bit and the number of workers that joined. hk2_pool_run waits until every worker has
 * joined (tasks may use hk2_pool_barrier). hk2_pool_run_dynamic is for tasks that hand out their
 * work through atomic counters and never wait on a thread that has not started: once the caller
 * has finished, it closes the job and waits only for the workers that joined, so a worker the OS
 * has not scheduled yet costs nothing (the caller did its share of the work instead).
 * Joined at exit; after fork() the child starts with no pool and builds one on first use. */
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>
#include "hk2_internal.h"

#define CPU_RELAX() hk2_cpu_relax()

#define IDLE_PAUSES 2000         /* an idle worker first polls for the next job with pauses, */
#define IDLE_YIELDS 400          /* then yields the core between polls, then sleeps */
#define SPIN_BEFORE_YIELD 2000   /* pauses in a wait before yielding the core */
#define JOIN_CLOSED (1ull << 31) /* join word: generation << 32 | closed | workers joined */

typedef struct {
    int n;  /* threads including the caller */
    pthread_t *threads;
    hk2_task_fn fn;
    void *ctx;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    _Alignas(HK2_CACHE_LINE) atomic_uint gen;       /* bumped once per job */
    _Alignas(HK2_CACHE_LINE) atomic_ullong join;    /* this job's generation << 32 | closed | joined */
    _Alignas(HK2_CACHE_LINE) atomic_int done;       /* workers finished with the job */
    _Alignas(HK2_CACHE_LINE) atomic_int bar_count;
    _Alignas(HK2_CACHE_LINE) atomic_uint bar_gen;
    _Alignas(HK2_CACHE_LINE) atomic_int stop;
} pool_t;

typedef struct { pool_t *pool; int ith; } worker_arg;

static pool_t *g_pool;
static int g_want = 0;           /* requested size; 0 = online CPUs */
static int g_atexit_registered;

static void wait_relax(unsigned *spins) {
    if (++*spins < SPIN_BEFORE_YIELD) CPU_RELAX();
    else sched_yield();
}

/* join the job of generation g if it is still open; false when it closed or a newer one started */
static int try_join(pool_t *pool, unsigned g) {
    unsigned long long v = atomic_load_explicit(&pool->join, memory_order_acquire);
    while ((unsigned)(v >> 32) == g && !(v & JOIN_CLOSED))
        if (atomic_compare_exchange_weak_explicit(&pool->join, &v, v + 1, memory_order_acq_rel, memory_order_acquire))
            return 1;
    return 0;
}

static void *worker_main(void *p) {
    worker_arg *arg = p;
    pool_t *pool = arg->pool;
    const int ith = arg->ith;
    free(arg);
    unsigned seen = 0;
    for (;;) {
        unsigned g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        for (int i = 0; g == seen && !atomic_load_explicit(&pool->stop, memory_order_relaxed); i++) {
            if (i < IDLE_PAUSES) {
                CPU_RELAX();
            } else if (i < IDLE_PAUSES + IDLE_YIELDS) {
                sched_yield();
            } else {
                pthread_mutex_lock(&pool->mu);
                while ((g = atomic_load_explicit(&pool->gen, memory_order_acquire)) == seen && !atomic_load(&pool->stop))
                    pthread_cond_wait(&pool->cv, &pool->mu);
                pthread_mutex_unlock(&pool->mu);
            }
            g = atomic_load_explicit(&pool->gen, memory_order_acquire);
        }
        if (atomic_load(&pool->stop)) break;
        seen = g;
        if (!try_join(pool, g)) continue;  /* a dynamic job that finished without us */
        pool->fn(pool->ctx, ith, pool->n);
        atomic_fetch_add_explicit(&pool->done, 1, memory_order_acq_rel);
    }
    return NULL;
}

static void pool_destroy(pool_t *pool) {
    if (!pool) return;
    pthread_mutex_lock(&pool->mu);
    atomic_store(&pool->stop, 1);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    for (int i = 1; i < pool->n; i++) pthread_join(pool->threads[i], NULL);
    pthread_mutex_destroy(&pool->mu);
    pthread_cond_destroy(&pool->cv);
    free(pool->threads);
    free(pool);
}

static int pool_create(int n, pool_t **out) {
    pool_t *pool = aligned_alloc(HK2_CACHE_LINE, hk2_align_up(sizeof(pool_t)));
    if (!pool) return hk2_fail(HK2_ENOMEM, "thread pool: out of memory");
    memset(pool, 0, sizeof *pool);
    pool->n = 1;
    pool->threads = calloc((size_t)n, sizeof(pthread_t));
    if (!pool->threads) { free(pool); return hk2_fail(HK2_ENOMEM, "thread pool: out of memory"); }
    pthread_mutex_init(&pool->mu, NULL);
    pthread_cond_init(&pool->cv, NULL);
    atomic_init(&pool->gen, 0);
    atomic_init(&pool->join, JOIN_CLOSED);
    atomic_init(&pool->done, 0);
    atomic_init(&pool->bar_count, 0);
    atomic_init(&pool->bar_gen, 0);
    atomic_init(&pool->stop, 0);
    /* Workers block every signal (the mask is inherited), so a process-directed SIGINT reaches a thread that
     * can act on it: Python runs handlers on its main thread only, and a Ctrl-C taken by a worker would not
     * interrupt the main thread's wait for terminal input. Not the signals of a fault in the worker itself:
     * a blocked SIGBUS/SIGSEGV is fatal at once, bypassing every handler (a truncated checkpoint's message,
     * faulthandler's traceback). */
    sigset_t all, old;
    sigfillset(&all);
    sigdelset(&all, SIGBUS);
    sigdelset(&all, SIGSEGV);
    sigdelset(&all, SIGFPE);
    sigdelset(&all, SIGILL);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    for (int i = 1; i < n; i++) {
        worker_arg *arg = malloc(sizeof *arg);
        if (!arg) { pool_destroy(pool); return hk2_fail(HK2_ENOMEM, "thread pool: out of memory"); }
        arg->pool = pool;
        arg->ith = i;
        if (pthread_create(&pool->threads[i], NULL, worker_main, arg) != 0) {
            free(arg);
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            pool_destroy(pool);
            return hk2_fail(HK2_ETHREAD, "thread pool: could not create thread %d of %d", i, n);
        }
        pool->n = i + 1;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    *out = pool;
    return HK2_OK;
}

static void at_exit(void) { hk2_pool_shutdown(); }
static void after_fork_child(void) { g_pool = NULL; }  /* the workers did not survive the fork */

static int default_threads(void) {
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

static int ensure_pool(void) {
    const int want = g_want > 0 ? g_want : default_threads();
    if (g_pool && g_pool->n == want) return HK2_OK;
    if (!g_atexit_registered) {
        atexit(at_exit);
        pthread_atfork(NULL, NULL, after_fork_child);
        g_atexit_registered = 1;
    }
    pool_destroy(g_pool);
    g_pool = NULL;
    return pool_create(want, &g_pool);
}

/* callers hold the API lock (hk2_api_lock) for all pool functions below */
int hk2_pool_resize(int n) {
    g_want = n;
    return ensure_pool();
}

int hk2_pool_threads(void) { return g_want > 0 ? g_want : (g_pool ? g_pool->n : default_threads()); }

void hk2_pool_shutdown(void) {
    pool_destroy(g_pool);
    g_pool = NULL;
}

static int pool_run(hk2_task_fn fn, void *ctx, int dynamic) {
    int err = ensure_pool();
    if (err) return err;
    pool_t *pool = g_pool;
    if (pool->n == 1) { fn(ctx, 0, 1); return HK2_OK; }
    pool->fn = fn;
    pool->ctx = ctx;
    const unsigned g = atomic_load_explicit(&pool->gen, memory_order_relaxed) + 1;
    atomic_store_explicit(&pool->done, 0, memory_order_relaxed);
    atomic_store_explicit(&pool->join, (unsigned long long)g << 32, memory_order_release);  /* open */
    pthread_mutex_lock(&pool->mu);  /* under the lock: a worker about to sleep sees the new gen */
    atomic_store_explicit(&pool->gen, g, memory_order_release);
    pthread_cond_broadcast(&pool->cv);
    pthread_mutex_unlock(&pool->mu);
    fn(ctx, 0, pool->n);
    unsigned spins = 0;
    if (!dynamic)  /* every worker takes part (the task may hold barriers) */
        while ((atomic_load_explicit(&pool->join, memory_order_acquire) & (JOIN_CLOSED - 1)) != (unsigned)(pool->n - 1))
            wait_relax(&spins);
    const int joined = (int)(atomic_fetch_or_explicit(&pool->join, JOIN_CLOSED, memory_order_acq_rel) & (JOIN_CLOSED - 1));
    while (atomic_load_explicit(&pool->done, memory_order_acquire) != joined) wait_relax(&spins);
    return HK2_OK;
}

int hk2_pool_run(hk2_task_fn fn, void *ctx) { return pool_run(fn, ctx, 0); }
int hk2_pool_run_dynamic(hk2_task_fn fn, void *ctx) { return pool_run(fn, ctx, 1); }

void hk2_pool_barrier(void) {
    pool_t *pool = g_pool;
    if (!pool || pool->n == 1) return;
    const unsigned g = atomic_load_explicit(&pool->bar_gen, memory_order_acquire);
    if (atomic_fetch_add_explicit(&pool->bar_count, 1, memory_order_acq_rel) == pool->n - 1) {
        atomic_store_explicit(&pool->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add_explicit(&pool->bar_gen, 1, memory_order_release);
        return;
    }
    unsigned spins = 0;
    while (atomic_load_explicit(&pool->bar_gen, memory_order_acquire) == g) wait_relax(&spins);
}
