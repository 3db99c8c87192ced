/* IQ2_XXS IQ2_XS IQ2_S IQ3_XXS IQ3_S: the lattice (grid) 2- and 3-bit types. Block layouts, reference dequantizers,
 * the scalar dot kernels and the type table (hk2_type_ops, hk2_internal.h). */
#include "hk2_internal.h"

const hk2_type_ops hk2_types_iq23[] = {
    {.name = NULL},
};
