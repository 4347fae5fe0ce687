// The symmetric INT4 QAT grid of DESIGN §3, shared by every kernel that quantizes (the quant
// family's fake-quant / quantize+pack and the marlin family's one-pass weight sync), so that all
// of them produce bit-identical scales and codes:
//   s32 = max(amax / 7, 1e-5); s = S(s32) (round to nearest even);
//   q = clamp(rint(w / f32(s)), -7, 7); stored nibble u = q + 8.
// Division is IEEE round-to-nearest (nvcc's default -prec-div=true; never build with fast math).
#pragma once

#include "lowbit_common.cuh"
#include "lowbit_quant.h"

namespace lowbit {
namespace qgrid {

// The stored scale of a group whose largest magnitude is `amax`; returns it widened to f32.
template <typename S>
__device__ __forceinline__ float stored_scale(float amax, S *stored) {
    const float s32 = fmaxf(amax / 7.0f, (float)LOWBIT_MIN_SCALE);
    const S s = Num<S>::from_f32(s32);
    *stored = s;
    return Num<S>::to_f32(s);
}

// q = clamp(rint(w / s), -7, 7); `clipped` when the rounded value fell outside the grid.
__device__ __forceinline__ int quant_code(float w, float s, bool *clipped) {
    float q = rintf(w / s);
    *clipped = !(q >= -(float)LOWBIT_QMAX && q <= (float)LOWBIT_QMAX);
    q = fminf(fmaxf(q, -(float)LOWBIT_QMAX), (float)LOWBIT_QMAX);
    return (int)q;
}

// Eight consecutive weights under one scale -> one packed word (nibble i holds q[i] + 8).
__device__ __forceinline__ uint32_t quant_word(const float v[8], float s) {
    uint32_t word = 0;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        bool clipped;
        const int q = quant_code(v[i], s, &clipped);
        word |= (uint32_t)(q + LOWBIT_QZERO) << (4 * i);
    }
    return word;
}

} // namespace qgrid
} // namespace lowbit
