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
#if HK2_AVX512_VNNI   /* the entry points' suffix (HK2_DOT_ENTRY) */
#define HK2_ISA avx512vnni
#else
#define HK2_ISA avx512bw
#endif
#include "hk2_simd.h"

/* helpers more than one AVX-512 file uses */
/* two blocks' 16 packed bytes -> [lo b0 | hi b0 | lo b1 | hi b1]: values 0..31 of each block in order; [p0 p0 p1 p1]
 * by two broadcast loads (load ports and one merge, no shuffle-port work) */
INLINE __m512i nibbles2(const uint8_t *p0, const uint8_t *p1) {
    const __m512i r = _mm512_mask_broadcast_i32x4(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)p0)), 0xFF00,
                                                  _mm_loadu_si128((const __m128i *)p1));
    return _mm512_and_si512(_mm512_srlv_epi64(r, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}
/* the fp16 at p + i * stride, i < 4, as floats */
INLINE __m128 four_halves(const uint8_t *p, int stride) {
#ifdef HK2_USE_SIMDE  /* SIMDe has no F16C */
    return _mm_setr_ps(half_at(p), half_at(p + stride), half_at(p + 2 * stride), half_at(p + 3 * stride));
#else
    uint16_t h[4];
    for (int i = 0; i < 4; i++) memcpy(&h[i], p + i * stride, 2);
    uint64_t v;
    memcpy(&v, h, 8);
    return _mm_cvtph_ps(_mm_cvtsi64_si128((long long)v));
#endif
}
/* 8 fp16 at p as floats */
INLINE __m256 fp16x8(const void *p) {
#ifdef HK2_USE_SIMDE
    float f[8];
    for (int i = 0; i < 8; i++) f[i] = half_at((const uint8_t *)p + 2 * i);
    return _mm256_loadu_ps(f);
#else
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
}
