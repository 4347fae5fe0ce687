// The MoE kernel family: top-k gating, moe_align_block_size, and the fused Marlin MoE glue
// (activation, top-k reduction). The expert GEMMs are the Marlin family's MoE kernels.
#include "lowbit.h"
#include "lowbit_common.cuh"
