/* Mixture of experts: routing, moe_align_block_size, fused Marlin MoE (DESIGN §4). */
#ifndef LOWBIT_MOE_H
#define LOWBIT_MOE_H

#include <stdint.h>

#endif
