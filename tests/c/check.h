/* What the C tests share: CHECK (counts a failure, prints where and the library's last error, goes on) and a
 * deterministic random source (xorshift64*). */
#ifndef HK2_TEST_CHECK_H
#define HK2_TEST_CHECK_H
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include "hk2.h"

static int g_failures;
#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (!(cond)) {                                                \
            g_failures++;                                             \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);      \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, " [%s]\n", hk2_last_error());            \
        }                                                             \
    } while (0)

static uint64_t g_rng = 0x9E3779B97F4A7C15ull;
static uint64_t next_u64(void) {
    g_rng ^= g_rng >> 12; g_rng ^= g_rng << 25; g_rng ^= g_rng >> 27;
    return g_rng * 0x2545F4914F6CDD1Dull;
}
static double urand(void) { return (double)(next_u64() >> 11) / 9007199254740992.0; }  /* uniform in [0, 1) */
static float nrand(void) { return (float)(sqrt(-2.0 * log(urand() + 1e-12)) * cos(6.283185307179586 * urand())); }
#endif
