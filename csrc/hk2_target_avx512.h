/* Included first by an AVX-512 kernel file: the rest of the file compiles for AVX-512 F/BW/VL + VNNI (the
 * avx512vnni kernel table level), or without VNNI where the file defines HK2_AVX512_VNNI 0 first (the avx512bw
 * level), or, with HK2_USE_SIMDE, against SIMDe's portable AVX-512 so the same code is tested on CPUs without
 * it. The file ends with hk2_target_end.h. */
#ifndef HK2_AVX512_VNNI
#define HK2_AVX512_VNNI 1
#endif
#ifdef HK2_USE_SIMDE
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
#include "hk2_simde_shim.h"
#else
/* (#pragma GCC target does not expand macros, hence the spelled-out lines) */
#if defined(__clang__) && HK2_AVX512_VNNI
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c"))), apply_to = function)
#define HK2_TARGET_PUSHED
#elif defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c"))), apply_to = function)
#define HK2_TARGET_PUSHED
#elif HK2_AVX512_VNNI
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")
#endif
#include <immintrin.h>
#endif
#include "hk2_internal.h"

/* the fp16 at p (any alignment) as a float */
INLINE float half_at(const uint8_t *p) {
    hk2_half h;
    memcpy(&h, p, sizeof h);
    return hk2_fp16_to_fp32(h);
}
