/* The AVX-512 kernels again, with VNNI (vpdpbusd) for the u8 x s8 dot products. */
#define HK2_AVX512_VNNI 1
#include "quants_base_avx512.c"
