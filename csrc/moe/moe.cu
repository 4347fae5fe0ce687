// The MoE kernel family: top-k gating, moe_align_block_size, and the fused Marlin MoE glue
// (activation, top-k reduction). The expert GEMMs are the Marlin family's MoE kernels.
#include "lowbit.h"
#include "lowbit_common.cuh"

#include "moe/align.cuh"
#include "moe/fused.cuh"
#include "moe/routing.cuh"

#define LOWBIT_GATING_THREADS (32 * LOWBIT_MOE_GATING_WARPS)

// Gating: lowbit_moe_{softmax,grouped}_topk_<logit dtype>.
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_softmax_topk_f32(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<float, false>(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_softmax_topk_bf16(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<__nv_bfloat16, false>(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_softmax_topk_f16(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<__half, false>(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_grouped_topk_f32(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<float, true>(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_grouped_topk_bf16(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<__nv_bfloat16, true>(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_GATING_THREADS) lowbit_moe_grouped_topk_f16(const LowbitMoeTopkParams p) {
    lowbit::moe::topk_gating<__half, true>(p);
}

// Alignment.
extern "C" __global__ void __launch_bounds__(32 * LOWBIT_MOE_ALIGN_COUNT_WARPS) lowbit_moe_align_count(const LowbitMoeAlignParams p) {
    lowbit::moe::align_count(p);
}
extern "C" __global__ void __launch_bounds__(32 * LOWBIT_MOE_ALIGN_SCATTER_WARPS) lowbit_moe_align_scatter(const LowbitMoeAlignParams p) {
    lowbit::moe::align_scatter(p);
}
extern "C" __global__ void __launch_bounds__(LOWBIT_MOE_ALIGN_SINGLE_THREADS) lowbit_moe_align_single(const LowbitMoeAlignParams p) {
    lowbit::moe::align_single(p);
}

// Fused MoE glue.
extern "C" __global__ void __launch_bounds__(256) lowbit_moe_silu_mul_bf16(const LowbitMoeSiluMulParams p) {
    lowbit::moe::silu_mul<__nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_moe_silu_mul_f16(const LowbitMoeSiluMulParams p) {
    lowbit::moe::silu_mul<__half>(p);
}
