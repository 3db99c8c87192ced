/* F32, F16, BF16 weights: rows of plain floats, multiplied with float32 activations (act_qb 0). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_float[] = {
    {.name = NULL},
};
