// The glue of the fused Marlin MoE around the two expert GEMMs: the gated activation
// silu(gate) * up, and the deterministic sum over the top-k slots of every token.
//
// Slots whose expert id is out of range or not local under the expert map are never produced by
// the GEMMs (alignment skips them), so both kernels skip them too: the activation leaves their
// rows unwritten, and the sum treats them as zero without reading them.
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

template <typename T>
__device__ __forceinline__ void topk_sum(const LowbitMoeSumParams &p) {
    const long long vec_per_row = p.hidden / 8;
    const long long work = p.tokens * vec_per_row;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const T *part = reinterpret_cast<const T *>(p.partial);
    T *out = reinterpret_cast<T *>(p.out);
    for (long long w = (long long)blockIdx.x * blockDim.x + threadIdx.x; w < work; w += stride) {
        const long long t = w / vec_per_row, h = (w % vec_per_row) * 8;
        float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
        for (int k = 0; k < p.topk; ++k) {
            const long long s = t * p.topk + k;
            if (!slot_is_local(p.topk_ids, p.expert_map, p.num_experts, s)) continue;
            float v[8];
            load8<T>(part + s * p.hidden + h, v);
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[j] += v[j];
        }
        store8<T>(out + t * p.hidden + h, acc);
    }
}

} // namespace moe
} // namespace lowbit
