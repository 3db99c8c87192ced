/* Q2_K Q3_K Q5_K: the rest of the K family. Block layouts, reference dequantizers and quantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_k[] = {
    {.name = NULL},
};
