/* quants_base_avx512.c's kernels again, without VNNI (maddubs + madd for the u8 x s8 sums): the avx512bw level. */
#define HK2_AVX512_VNNI 0
#include "quants_base_avx512.c"
