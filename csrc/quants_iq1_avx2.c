/* IQ1_S IQ1_M: AVX2 dot kernels (hk2_dot_<type>_avx2, listed in quants_iq1.c's table). */
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#include <immintrin.h>
#include "hk2_internal.h"

#if defined(__clang__)
#pragma clang attribute pop
#endif
