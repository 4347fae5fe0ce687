// Top-k gating: softmax top-k (optional renormalisation) and DeepSeek-V3 / Kimi-K2 grouped
// sigmoid top-k with a selection-only correction bias.
//
// One warp per token row; the row's selection scores (and, for sigmoid, the unbiased scores) are
// staged in shared memory. Selection is k rounds of a warp arg-max over the strict total order
// "score descending, then index ascending" restricted to the elements after the previous pick,
// so no element needs marking and ties always go to the lower index. NaN ranks as -inf.
#pragma once

#include "lowbit.h"
#include "lowbit_common.cuh"

namespace lowbit {
namespace moe {

__device__ __forceinline__ float rank_key(float x) { return isnan(x) ? -INFINITY : x; }

// a ranks before b: the reference's total order (f32::total_cmp on NaN-free keys), so +0 ranks
// before -0; equal keys go to the lower index.
__device__ __forceinline__ bool ranks_before(float av, int ai, float bv, int bi) {
    if (av != bv) return av > bv;
    const bool an = signbit(av), bn = signbit(bv); // differ only for +0 / -0
    if (an != bn) return bn;
    return ai < bi;
}

// Warp arg-max under ranks_before; every lane gets the result.
__device__ __forceinline__ void warp_argbest(float &v, int &i) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off);
        const int oi = __shfl_xor_sync(0xffffffffu, i, off);
        if (ranks_before(ov, oi, v, i)) {
            v = ov;
            i = oi;
        }
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    return x;
}

__device__ __forceinline__ float sigmoid_f32(float x) { return 1.0f / (1.0f + expf(-x)); }

// Picks the next element after (pv, pi) in rank order among sel[0..n) whose group is in `gmask`
// (group of e = e / group_size). Every lane must call it; returns the pick in every lane.
__device__ __forceinline__ void next_pick(const float *sel, int n, int group_size, uint32_t gmask, float &pv, int &pi) {
    const int lane = threadIdx.x & 31;
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    for (int e = lane; e < n; e += 32) {
        if (!((gmask >> (e / group_size)) & 1u)) continue;
        const float v = sel[e];
        if (!ranks_before(pv, pi, v, e)) continue; // only elements after the previous pick
        if (ranks_before(v, e, bv, bi)) {
            bv = v;
            bi = e;
        }
    }
    warp_argbest(bv, bi);
    pv = bv;
    pi = bi;
}

template <typename L, bool GROUPED>
__device__ __forceinline__ void topk_gating(const LowbitMoeTopkParams &p) {
    extern __shared__ float smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int E = p.experts;
    float *sel = smem + (size_t)warp * E * (GROUPED ? 2 : 1);
    float *score = sel + E; // GROUPED only
    const L *logits = reinterpret_cast<const L *>(p.logits);
    const long long stride = (long long)gridDim.x * LOWBIT_MOE_GATING_WARPS;
    for (long long row = (long long)blockIdx.x * LOWBIT_MOE_GATING_WARPS + warp; row < p.tokens; row += stride) {
        const L *lrow = logits + row * E;
        float mx = -INFINITY;
        for (int e = lane; e < E; e += 32) {
            const float l = Num<L>::to_f32(lrow[e]);
            if (GROUPED) {
                const float s = sigmoid_f32(l);
                score[e] = s;
                sel[e] = rank_key(s + (p.bias != nullptr ? p.bias[e] : 0.0f));
            } else {
                sel[e] = rank_key(l);
                mx = fmaxf(mx, sel[e]);
            }
        }
        __syncwarp();

        uint32_t gmask = 0xffffffffu;
        int group_size = E;
        float denom = 1.0f;
        if (GROUPED) {
            group_size = E / p.n_group;
            if (p.topk_group < p.n_group) {
                // Group score: the sum of the group's two best selection scores.
                float my_gscore = -INFINITY;
                for (int g = 0; g < p.n_group; ++g) {
                    float a = -INFINITY, b = -INFINITY; // a >= b
                    for (int e = g * group_size + lane; e < (g + 1) * group_size; e += 32) {
                        const float v = sel[e];
                        if (v > a) {
                            b = a;
                            a = v;
                        } else if (v > b) {
                            b = v;
                        }
                    }
#pragma unroll
                    for (int off = 16; off > 0; off >>= 1) {
                        const float oa = __shfl_xor_sync(0xffffffffu, a, off);
                        const float ob = __shfl_xor_sync(0xffffffffu, b, off);
                        if (oa >= a) {
                            b = fmaxf(a, ob);
                            a = oa;
                        } else {
                            b = fmaxf(b, oa);
                        }
                    }
                    // rank_key: +inf + -inf (an infinite bias) is NaN, which ranks as -inf.
                    const float gs = rank_key(group_size == 1 ? a : a + b);
                    if (lane == g) my_gscore = gs;
                }
                gmask = 0;
                float pv = INFINITY;
                int pi = -1;
                for (int r = 0; r < p.topk_group; ++r) {
                    float bv = my_gscore;
                    int bi = lane < p.n_group ? lane : 0x7fffffff;
                    if (lane >= p.n_group || !ranks_before(pv, pi, bv, bi)) {
                        bv = -INFINITY;
                        bi = 0x7fffffff;
                    }
                    warp_argbest(bv, bi);
                    gmask |= 1u << bi;
                    pv = bv;
                    pi = bi;
                }
            }
        } else {
            mx = warp_max(mx);
            float s = 0.0f;
            for (int e = lane; e < E; e += 32) s += expf(sel[e] - mx);
            denom = warp_sum(s);
        }

        float pv = INFINITY;
        int pi = -1;
        float total = 0.0f;
        float *wrow = p.weights + row * p.topk;
        int32_t *irow = p.ids + row * p.topk;
        for (int r = 0; r < p.topk; ++r) {
            next_pick(sel, E, group_size, gmask, pv, pi);
            if (lane == 0) {
                const float w = GROUPED ? score[pi] : expf(pv - mx);
                total += w;
                irow[r] = pi;
                wrow[r] = w;
            }
        }
        if (lane == 0) {
            if (GROUPED) {
                const float d = p.renormalize ? total + 1e-20f : 1.0f;
                for (int r = 0; r < p.topk; ++r) wrow[r] = wrow[r] / d * p.routed_scaling_factor;
            } else {
                const float d = p.renormalize ? total : denom;
                for (int r = 0; r < p.topk; ++r) wrow[r] = wrow[r] / d;
            }
        }
        __syncwarp(); // sel/score are rewritten for the next row
    }
}

} // namespace moe
} // namespace lowbit
