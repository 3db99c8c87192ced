/* Included first by a type family's AVX2 kernel file: the rest of the file compiles for AVX2 + FMA + F16C.
 * The file ends with hk2_target_end.h. */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#define HK2_TARGET_PUSHED
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include "hk2_internal.h"
#define HK2_ISA avx2   /* the entry points' suffix (HK2_DOT_ENTRY) */
#include "hk2_simd.h"
