/* SIGBUS on a memory-mapped checkpoint file: say which file before the process dies.
 *
 * Reading a page of a mapped file that was truncated after it was mapped raises SIGBUS in whichever
 * thread touches it (numpy, torch or the kernels' workers). Nothing can recover from that, but the
 * message should name the file. The handler below only calls async-signal-safe functions (write,
 * stat, sigaction, nanosleep): it runs without Python, so it cannot wait on the GIL. The first
 * faulting thread writes the message; others that fault meanwhile wait for it; each then puts the
 * previous handler back and returns, the access faults again, and the previous handler (faulthandler's,
 * or the default: the process dies of SIGBUS) runs as before. */
#define _GNU_SOURCE
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include "hk2.h"

typedef struct {
    int n;
    long long *sizes;
    char **paths;
} watch_list;

static _Atomic(watch_list *) g_list;   /* published whole; replaced lists are leaked (they are small) */
static struct sigaction g_prev;
static atomic_int g_installed, g_writer, g_written;

static void put(const char *s) {
    size_t n = strlen(s);
    while (n) {
        ssize_t k = write(2, s, n);
        if (k <= 0) return;
        s += k;
        n -= (size_t)k;
    }
}

static void put_int(long long v) {
    char buf[24], *p = buf + sizeof buf - 1;
    unsigned long long u = v < 0 ? 0ULL - (unsigned long long)v : (unsigned long long)v;
    *p = 0;
    do { *--p = (char)('0' + u % 10); u /= 10; } while (u);
    if (v < 0) *--p = '-';
    put(p);
}

static void report(void) {
    watch_list *w = atomic_load(&g_list);
    put("hybrid_k2: SIGBUS (bus error) reading a memory-mapped checkpoint file: it was truncated or replaced "
        "while in use, or its storage failed.\n");
    int n = w ? w->n : 0, same = 0;
    for (int i = 0; i < n; i++) {
        struct stat st;
        int gone = stat(w->paths[i], &st) != 0;
        if (!gone && st.st_size == w->sizes[i]) { same++; continue; }
        put("  "); put(w->paths[i]); put(": "); put_int(w->sizes[i]); put(" bytes when opened, now ");
        if (gone) put("gone\n"); else { put_int((long long)st.st_size); put(" bytes\n"); }
    }
    if (same) {
        put(same == n ? "  mapped files: " : "  other mapped files (unchanged size): ");
        int first = 1;
        for (int i = 0; i < n; i++) {
            struct stat st;
            if (stat(w->paths[i], &st) == 0 && st.st_size == w->sizes[i]) {
                if (!first) put(", ");
                put(w->paths[i]);
                first = 0;
            }
        }
        put("\n");
    }
    if (!n) put("  (no checkpoint file is mapped: the fault is elsewhere)\n");
}

static void on_sigbus(int sig, siginfo_t *info, void *ctx) {
    (void)sig; (void)ctx;
    if (info && info->si_code <= 0) {   /* sent by kill(), not a fault: deliver it as if we were not here */
        sigaction(SIGBUS, &g_prev, NULL);
        raise(SIGBUS);
        return;
    }
    int expect = 0;
    if (atomic_compare_exchange_strong(&g_writer, &expect, 1)) {
        report();
        atomic_store(&g_written, 1);
    } else {
        for (int i = 0; i < 2000 && !atomic_load(&g_written); i++) {   /* at most ~2 s */
            struct timespec nap = {0, 1000000};
            nanosleep(&nap, NULL);
        }
    }
    sigaction(SIGBUS, &g_prev, NULL);
}

int hk2_sigbus_watch(const char *const *paths, const long long *sizes, int n) {
    if (n < 0 || (n && (!paths || !sizes))) return -1;
    watch_list *w = malloc(sizeof *w);
    if (!w) return -1;
    w->n = n;
    w->sizes = malloc(sizeof(long long) * (size_t)(n ? n : 1));
    w->paths = malloc(sizeof(char *) * (size_t)(n ? n : 1));
    if (!w->sizes || !w->paths) return -1;
    for (int i = 0; i < n; i++) {
        w->sizes[i] = sizes[i];
        w->paths[i] = strdup(paths[i] ? paths[i] : "?");
        if (!w->paths[i]) return -1;
    }
    atomic_store(&g_list, w);
    int expect = 0;
    if (atomic_compare_exchange_strong(&g_installed, &expect, 1)) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_sigaction = on_sigbus;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        if (sigaction(SIGBUS, &sa, &g_prev) != 0) {
            atomic_store(&g_installed, 0);
            return -1;
        }
    }
    return 0;
}
