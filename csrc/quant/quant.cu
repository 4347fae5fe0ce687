// INT4 quantization kernels: fake-quant forward (+ scales, + packed codes in the same pass),
// the ClipMask straight-through backward, dequantization of packed codes, and the transposes
// between compressed-tensors ([N, K/8]) and GPTQ ([K/8, N]) layouts.
//
// The math is DESIGN §3, evaluated exactly as the CPU reference does it:
//   amax = max |w| over the group (f32); s32 = max(amax / 7, 1e-5); s = S(s32) (round to nearest
//   even); q = clamp(rint(w / f32(s)), -7, 7); dequant = T(q * f32(s)).
// The divisions are computed without dividing, exactly (csrc/common/lowbit_int4.cuh: the
// fma-corrected quotient; proven there and exhaustively tested in tests/cpu_quant_exact.rs); a
// chunk with a non-finite weight or scale takes the plain division. Never build with fast math.

#include "lowbit.h"
#include "lowbit_common.cuh"
#include "lowbit_int4.cuh"

namespace lowbit {
namespace quant {

using qgrid::quant_code;
using qgrid::stored_scale;

// Quantizes (or masks the gradient of) one chunk of 8 consecutive elements whose group scale
// is known. `e` is the flat element index of the chunk's first element. `fast`: the weights and
// the scale are finite and the scale was made from an amax covering them (the precondition of the
// division-free rounding: |w / s| < 7.02, so nothing is clipped).
template <typename T, typename S, bool BWD>
__device__ __forceinline__ void finish_chunk(const LowbitQuantParams &p, long long e, const float v[8], float sf,
                                             bool fast) {
    float o[8];
    uint32_t word = 0;
    if (BWD) {
        load8<T>(reinterpret_cast<const T *>(p.grad_in) + e, o);
    }
    if (fast) {
        const float r = qgrid::recip(sf), ns = -sf;
        float a[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            a[i] = qgrid::round8(qgrid::quotient(v[i], ns, r));
            // q = a - kRound8 exactly (both in [2^23, 2^24)); never clipped here.
            if (!BWD) o[i] = __fsub_rn(a[i], qgrid::kRound8) * sf;
        }
        word = qgrid::pack8(a);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            bool clipped;
            const int q = quant_code(v[i], sf, &clipped);
            word |= (uint32_t)(q + LOWBIT_QZERO) << (4 * i);
            if (BWD) {
                if (clipped) o[i] = 0.0f;
            } else {
                o[i] = (float)q * sf; // exact in f32: |q| <= 7 times an 8- or 11-bit significand
            }
        }
    }
    if (p.out != nullptr) store8<T>(reinterpret_cast<T *>(p.out) + e, o);
    if (!BWD && p.packed != nullptr) p.packed[e / 8] = (int32_t)word;
}

__device__ __forceinline__ void check_finite(const LowbitQuantParams &p, long long e, const float v[8]) {
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        if (!isfinite(v[i])) {
            report_min(p.status, LOWBIT_STATUS_NONFINITE, (unsigned long long)(e + i));
            break;
        }
    }
}

// Groups of 32/64/128: each lane owns 8 consecutive elements (one packed word); the g/8 lanes
// of a group reduce amax with shuffles. Grid-stride over chunks; the loop bound is uniform per
// warp so every lane takes part in the shuffles.
template <typename T, typename S, bool BWD>
__device__ __forceinline__ void quant_grouped(const LowbitQuantParams &p) {
    const long long chunks = p.rows * (p.k / 8);
    const int width = (int)(p.group / 8);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long base = (long long)blockIdx.x * blockDim.x; base < chunks; base += stride) {
        const long long c = base + threadIdx.x;
        const bool active = c < chunks;
        float v[8];
        if (active) {
            load8<T>(reinterpret_cast<const T *>(p.w) + c * 8, v);
        } else {
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] = 0.0f;
        }
        // NaN-propagating chunk max: finite exactly when the chunk is. The group's amax ignores
        // NaNs (fmaxf), as it always did, so a NaN chunk is recomputed so.
        float amax = qgrid::absmax8_nan(v);
        const bool ok = amax <= qgrid::kMaxFinite;
        if (amax != amax) {
            amax = 0.0f;
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = group_max(amax, width);
        if (!active) continue;
        if (!ok) check_finite(p, c * 8, v);
        S stored;
        const float sf = stored_scale<S>(amax, &stored);
        const long long group = (c * 8) / p.group;
        if (threadIdx.x % width == 0) {
            if (!isfinite(sf)) report_min(p.status, LOWBIT_STATUS_SCALE_OVERFLOW, (unsigned long long)group);
            if (!BWD && p.scales != nullptr) reinterpret_cast<S *>(p.scales)[group] = stored;
        }
        finish_chunk<T, S, BWD>(p, c * 8, v, sf, ok && sf <= qgrid::kMaxFinite);
    }
}

// One block per group of `group` contiguous elements (channelwise: group == k). Two passes:
// block-wide amax, then quantize (the second read mostly hits L2).
template <typename T, typename S, bool BWD>
__device__ __forceinline__ void quant_rowwise(const LowbitQuantParams &p) {
    const long long groups = p.rows * (p.k / p.group);
    const long long chunks = p.group / 8;
    for (long long g = blockIdx.x; g < groups; g += gridDim.x) {
        const long long e0 = g * p.group;
        float amax = 0.0f;
        for (long long c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[8];
            load8<T>(reinterpret_cast<const T *>(p.w) + e0 + c * 8, v);
            check_finite(p, e0 + c * 8, v);
#pragma unroll
            for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
        }
        amax = block_max(amax);
        S stored;
        const float sf = stored_scale<S>(amax, &stored);
        if (threadIdx.x == 0) {
            if (!isfinite(sf)) report_min(p.status, LOWBIT_STATUS_SCALE_OVERFLOW, (unsigned long long)g);
            if (!BWD && p.scales != nullptr) reinterpret_cast<S *>(p.scales)[g] = stored;
        }
        for (long long c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[8];
            load8<T>(reinterpret_cast<const T *>(p.w) + e0 + c * 8, v);
            const bool ok = qgrid::absmax8_nan(v) <= qgrid::kMaxFinite;
            finish_chunk<T, S, BWD>(p, e0 + c * 8, v, sf, ok && sf <= qgrid::kMaxFinite);
        }
    }
}

// out[e] = T(q * s) for every element, from packed codes and scales.
template <typename T, typename S>
__device__ __forceinline__ void dequant(const LowbitDequantParams &p) {
    const long long chunks = p.rows * (p.k / 8);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long c = (long long)blockIdx.x * blockDim.x + threadIdx.x; c < chunks; c += stride) {
        const long long e = c * 8;
        const long long row = e / p.k, col = e % p.k;
        const float sf = Num<S>::to_f32(reinterpret_cast<const S *>(p.scales)[row * (p.k / p.group) + col / p.group]);
        const uint32_t word = (uint32_t)p.packed[c];
        float o[8];
#pragma unroll
        for (int i = 0; i < 8; ++i) o[i] = (float)((int)((word >> (4 * i)) & 0xF) - LOWBIT_QZERO) * sf;
        store8<T>(reinterpret_cast<T *>(p.out) + e, o);
    }
}

// Tiled transpose through shared memory: 32x32 tiles, 32x8 threads.
template <typename E>
__device__ __forceinline__ void transpose(const LowbitTransposeParams &p) {
    __shared__ E tile[32][33];
    const E *src = reinterpret_cast<const E *>(p.src);
    E *dst = reinterpret_cast<E *>(p.dst);
    const long long tiles_c = (p.cols + 31) / 32, tiles_r = (p.rows + 31) / 32;
    for (long long t = blockIdx.x; t < tiles_r * tiles_c; t += gridDim.x) {
        const long long r0 = (t / tiles_c) * 32, c0 = (t % tiles_c) * 32;
        for (int i = threadIdx.y; i < 32; i += blockDim.y) {
            const long long r = r0 + i, c = c0 + threadIdx.x;
            if (r < p.rows && c < p.cols) tile[i][threadIdx.x] = src[r * p.cols + c];
        }
        __syncthreads();
        for (int i = threadIdx.y; i < 32; i += blockDim.y) {
            const long long r = c0 + i, c = r0 + threadIdx.x; // dst is [cols, rows]
            if (r < p.cols && c < p.rows) dst[r * p.rows + c] = tile[threadIdx.x][i];
        }
        __syncthreads();
    }
}

} // namespace quant
} // namespace lowbit
