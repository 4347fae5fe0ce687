// The glue of the fused Marlin MoE between the two expert GEMMs: the gated activation
// silu(gate) * up. (The deterministic top-k sum runs in GEMM2's epilogue, csrc/marlin/gemm.cuh.)
//
// Slots whose expert id is out of range or not local under the expert map are never produced by
// GEMM1 (alignment skips them), so the activation skips them too and leaves their rows unwritten.
#pragma once

#include "lowbit.h"
#include "lowbit_common.cuh"

namespace lowbit {
namespace moe {

__device__ __forceinline__ bool slot_is_local(const int32_t *topk_ids, const int32_t *expert_map, int32_t num_experts,
                                              long long slot) {
    const int32_t id = topk_ids[slot];
    if (id < 0 || id >= num_experts) return false;
    return expert_map == nullptr || expert_map[id] >= 0;
}

__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + expf(-x)); }

template <typename T>
__device__ __forceinline__ void silu_mul(const LowbitMoeSiluMulParams &p) {
    const long long vec_per_row = p.inter / 8;
    const long long work = p.slots * vec_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const T *gu = reinterpret_cast<const T *>(p.gate_up);
    T *act = reinterpret_cast<T *>(p.act);
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += stride) {
        const long long s = w / vec_per_row, i = (w % vec_per_row) * 8;
        if (!slot_is_local(p.topk_ids, p.expert_map, p.num_experts, s)) continue;
        float g[8], u[8], o[8];
        load8<T>(gu + s * 2 * p.inter + i, g);
        load8<T>(gu + s * 2 * p.inter + p.inter + i, u);
#pragma unroll
        for (int j = 0; j < 8; ++j) o[j] = silu_f32(g[j]) * u[j];
        store8<T>(act + s * p.inter + i, o);
    }
}

} // namespace moe
} // namespace lowbit
