/* Block layouts of IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S (ggml-common.h, byte for byte), shared by the family's
 * scalar, AVX2 and AVX-512 files. Every super-block holds 256 values in 8 sub-blocks of 32; values are
 * grid entries (iq_grids.h) times signs times a per-(sub)block scale. */
#ifndef HK2_QUANTS_IQ23_H
#define HK2_QUANTS_IQ23_H
#include "hk2_internal.h"
#include "iq_grids.h"

/* qs: per sub-block two uint32: 4 grid indices (one byte each, 8 values each) | 4 x 7-bit sign indices
 * (hk2_ksigns) and a 4-bit scale ls in the top bits; value = d * (2 ls + 1) / 8 * grid * sign */
typedef struct { hk2_half d; uint16_t qs[HK2_QK_K / 8]; } block_iq2_xxs;
/* qs: per 8 values a 9-bit grid index | 7-bit sign index; scales: two 4-bit scales per sub-block
 * (low nibble: its first 16 values) */
typedef struct { hk2_half d; uint16_t qs[HK2_QK_K / 8]; uint8_t scales[HK2_QK_K / 32]; } block_iq2_xs;
/* qs: low 8 bits of the 10-bit grid index per 8 values; signs: one byte per 8 values (bit j: value j
 * negative); qh: the indices' top 2 bits, 4 per byte; scales as IQ2_XS */
typedef struct {
    hk2_half d;
    uint8_t qs[HK2_QK_K / 8];
    uint8_t signs[HK2_QK_K / 8];
    uint8_t qh[HK2_QK_K / 32];
    uint8_t scales[HK2_QK_K / 32];
} block_iq2_s;
/* qs: one grid index per 4 values; sas: per sub-block one uint32 of 4 x 7-bit sign indices and the
 * 4-bit scale ls (top); value = d * (2 ls + 1) / 4 * grid * sign */
typedef struct { hk2_half d; uint8_t qs[HK2_QK_K / 4]; uint8_t sas[HK2_QK_K / 8]; } block_iq3_xxs;
/* qs: low 8 bits of the 9-bit grid index per 4 values; qh: the top bits, one byte per sub-block (bit k:
 * its index k); signs: one byte per 8 values; scales: 4 bits per sub-block; value = d * (2 s + 1) * grid * sign */
typedef struct {
    hk2_half d;
    uint8_t qs[HK2_QK_K / 4];
    uint8_t qh[HK2_QK_K / 32];
    uint8_t signs[HK2_QK_K / 8];
    uint8_t scales[HK2_QK_K / 64];
} block_iq3_s;

_Static_assert(sizeof(block_iq2_xxs) == 66, "block_iq2_xxs layout");
_Static_assert(sizeof(block_iq2_xs) == 74, "block_iq2_xs layout");
_Static_assert(sizeof(block_iq2_s) == 82, "block_iq2_s layout");
_Static_assert(sizeof(block_iq3_xxs) == 98, "block_iq3_xxs layout");
_Static_assert(sizeof(block_iq3_s) == 110, "block_iq3_s layout");

#endif
