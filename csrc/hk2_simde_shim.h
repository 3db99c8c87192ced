/* Fill-ins for the AVX-512 intrinsics that SIMDe 0.7.x (Debian's libsimde-dev) lacks or
 * aliases wrongly, written against its portable types; SIMDe 0.8 (PyPI's simde-py) has the mask
 * types, and the same fill-ins replace its versions so both builds compute alike. Only the SIMDe
 * test build uses this. */
#ifndef HK2_SIMDE_SHIM_H
#define HK2_SIMDE_SHIM_H
#include <stdint.h>

#if SIMDE_VERSION < HEDLEY_VERSION_ENCODE(0, 8, 0)
typedef simde__mmask16 __mmask16;
typedef simde__mmask64 __mmask64;
#endif
#ifndef _MM_FROUND_NO_EXC
#define _MM_FROUND_NO_EXC SIMDE_MM_FROUND_NO_EXC
#endif

/* SIMDe 0.7.4 maps the native name to its masked 4-argument form */
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)

static inline simde__m512 hk2s_cvtepi32_ps(simde__m512i a) {
    int32_t v[16];
    float r[16];
    simde_mm512_storeu_si512(v, a);
    for (int i = 0; i < 16; i++) r[i] = (float)v[i];
    return simde_mm512_loadu_ps(r);
}
static inline simde__m512i hk2s_cvttps_epi32(simde__m512 a) {
    float v[16];
    int32_t r[16];
    simde_mm512_storeu_ps(v, a);
    for (int i = 0; i < 16; i++) r[i] = (int32_t)v[i];
    return simde_mm512_loadu_si512(r);
}
static inline simde__m512i hk2s_cvtepi8_epi32(simde__m128i a) {
    int8_t v[16];
    int32_t r[16];
    simde_mm_storeu_si128((simde__m128i *)v, a);
    for (int i = 0; i < 16; i++) r[i] = v[i];
    return simde_mm512_loadu_si512(r);
}
static inline simde__m128i hk2s_cvtepi32_epi8(simde__m512i a) {
    int32_t v[16];
    int8_t r[16];
    simde_mm512_storeu_si512(v, a);
    for (int i = 0; i < 16; i++) r[i] = (int8_t)v[i];
    return simde_mm_loadu_si128((const simde__m128i *)r);
}
static inline int hk2s_reduce_add_epi32(simde__m512i a) {
    int32_t v[16];
    simde_mm512_storeu_si512(v, a);
    int s = 0;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}
static inline long long hk2s_reduce_add_epi64(simde__m512i a) {
    uint64_t v[8], s = 0;  /* wraps like the native instruction */
    simde_mm512_storeu_si512(v, a);
    for (int i = 0; i < 8; i++) s += v[i];
    return (long long)s;
}
static inline float hk2s_reduce_add_ps(simde__m512 a) {
    float v[16];
    simde_mm512_storeu_ps(v, a);
    float s = 0.0f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}
static inline float hk2s_reduce_max_ps(simde__m512 a) {
    float v[16];
    simde_mm512_storeu_ps(v, a);
    float m = v[0];
    for (int i = 1; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
}
static inline simde__m512i hk2s_zextsi256_si512(simde__m256i a) {
    return simde_mm512_inserti64x4(simde_mm512_setzero_si512(), a, 0);
}

#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps hk2s_cvtepi32_ps
#undef _mm512_cvttps_epi32
#define _mm512_cvttps_epi32 hk2s_cvttps_epi32
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 hk2s_cvtepi8_epi32
#undef _mm512_cvtepi32_epi8
#define _mm512_cvtepi32_epi8 hk2s_cvtepi32_epi8
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 hk2s_reduce_add_epi32
#undef _mm512_reduce_add_epi64
#define _mm512_reduce_add_epi64 hk2s_reduce_add_epi64
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps hk2s_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps hk2s_reduce_max_ps
#undef _mm512_zextsi256_si512
#define _mm512_zextsi256_si512 hk2s_zextsi256_si512
#endif
