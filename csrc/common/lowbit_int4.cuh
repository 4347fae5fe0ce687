// The symmetric INT4 QAT grid of DESIGN §3, shared by every kernel that quantizes (the quant
// family's fake-quant / quantize+pack and the marlin family's one-pass weight sync), so that all
// of them produce bit-identical scales and codes:
//   s32 = max(amax / 7, 1e-5); s = S(s32) (round to nearest even);
//   q = clamp(rint(w / f32(s)), -7, 7); stored nibble u = q + 8.
// The definition divides (IEEE round-to-nearest); the kernels compute the same values without
// dividing (below: an exact fma-corrected quotient, proven and exhaustively tested). quant_code,
// the plain division, remains for the inputs outside the fast path's precondition (non-finite
// weights or scales). Never build with fast math.
#pragma once

#include "lowbit_common.cuh"
#include "lowbit_quant.h"

namespace lowbit {
namespace qgrid {

// ---- Division without a division (issue 9) ------------------------------------------------------
//
// quant_code below costs one IEEE division per weight. The fast path below computes the very same
// q from r = RN(1/s), taken once per scale, with three f32 operations and one rounding add per
// weight, and is bit-identical to rint(w / s) for every input it is used on. The CPU mirror in
// tests/cpu_quant_exact.rs performs the same operations in the same order (it is the test's copy
// of this code; keep the two in step) and compares it with the division, exhaustively for 16-bit
// weights and scales.
//
// Claim. Let s > 0 be a widened bf16/f16 scale, so s = m * 2^e with an integer m < 2^11, and w a
// finite f32. With r = RN(1/s), t = RN(w r), e = fma(t, -s, w), y = fma(e, r, t):
//   y == RN(w / s) (the IEEE quotient) whenever 1/4 <= |w / s| and nothing overflows, and
//   |y| < 1/2 whenever |w / s| < 1/4 (so both round to 0).
// Proof (u = 2^-24, x = w / s exactly, ulp(v) = 2^(E-23) for 2^E <= |v| < 2^(E+1)):
//  1. r = (1/s)(1 + d1), t = w r (1 + d2), |d1|, |d2| < u, so |t - x| < 2.0001 u |x|.
//  2. e is exact: w is a multiple of ulp(w), t*s of ulp(t) 2^e; |w - t s| = s |x - t| is below
//     2.0001 u |w| < 4 ulp(w), and (as |x| < 2^(E_t+1) (1 + 3u)) below 2.0001 u |x| m 2^e
//     < 2.001 m ulp(t) 2^e < 2^13 ulp(t) 2^e, so it is a small integer multiple of the finer of
//     the two grids (which is not below 2^-149: |w| >= s/4 >= 2^-19 here): the fma's single
//     rounding is exact.
//  3. The fma for y rounds z = t + e r = t + (x - t)(1 + d1) = x + (x - t) d1 once, and
//     |z - x| < 2.0001 u^2 |x| < 2^-47 |x|.
//  4. RN(z) == RN(x) unless a rounding boundary (a midpoint between two floats) lies between x and
//     z. A midpoint is M 2^k with M an odd 25-bit integer; w = M 2^k s would need M * m, whose odd
//     part has at least 25 bits, in w's 24-bit significand, so x is never a midpoint; and w and
//     M 2^k s lie on a common grid no finer than min(ulp(w), 2^(k+e)), so |x - midpoint| is at
//     least min(ulp(w) / s, 2^k / m) > min(2^-24 |x|, 2^-36 |x|) >> 2^-47 |x| >= |z - x|.
//  5. |x| < 1/4: t, e r and y stay within a few ulps (or, below 2^-126, a few 2^-149) of x, so
//     |y| < 1/2.
// Ties need no care: y is the IEEE quotient itself, and the final rounding below is
// round-half-even as rintf is.
//
// Rounding to an integer: for |y| < 2^22, RN(y + 1.5 * 2^23) lies in [2^23, 2^24) where the floats
// are the integers, so it is 1.5 * 2^23 + rint(y) (ties to even: 1.5 * 2^23 is even), and its bits
// are 0x4B400000 + rint(y). Adding 8 more (kRound8) makes the low byte u = q + 8 for q in [-8, 7].
//
// Precondition of the fast path (what makes the clamp unnecessary): |w| <= amax for the amax the
// scale was made from, s = S(max(amax / 7, 1e-5)) finite. Then |w / s| <= 7 / ((1 - 2^-24)(1 - 2^-9))
// < 7.02 (bf16 rounds s32 by at most 2^-9 relative; f16 by 2^-11, or by 2^-25 absolute below
// 2^-14, which is < 0.3% of s32 >= 1e-5), so q = rint(y) is in [-7, 7] and no clamp is needed.
// Non-finite weights or a non-finite scale take quant_code (the division) instead, so their codes
// are what they always were.
//
// The same quotient divides amax by 7 in stored_scale: 7 = 7 * 2^0 has m = 7 < 2^11, amax is an
// f32, and amax / 7 >= 1e-5 where it matters (there amax >= 7e-5 is a normal number, all that
// step 2 needs; below, the max with 1e-5 takes over). An infinite amax keeps the IEEE result,
// +Inf. tests/cpu_quant_exact.rs checks every non-negative f32 amax.
constexpr float kRound8 = 12582920.0f; // 1.5 * 2^23 + 8, bits 0x4B400008
constexpr float kInv7 = 1.0f / 7.0f;   // RN(1/7), 0x3E124925
constexpr float kMaxFinite = 3.40282347e38f; // FLT_MAX: x <= kMaxFinite is false for NaN and +-Inf

// r = RN(1/s), once per scale.
__device__ __forceinline__ float recip(float s) { return __frcp_rn(s); }

// y = RN(w / s) from r = RN(1/s) and ns = -s (see above).
__device__ __forceinline__ float quotient(float w, float ns, float r) {
    const float t = __fmul_rn(w, r);
    const float e = __fmaf_rn(t, ns, w);
    return __fmaf_rn(e, r, t);
}

// RN(y + kRound8), whose bits are 0x4B400000 + u with u = rint(y) + 8: for |y| < 7.5 its low
// byte is u itself (the kernels gather these bytes into packed words with byte permutes).
__device__ __forceinline__ float round8(float y) { return __fadd_rn(y, kRound8); }

// Bytes 0 of b0..b3 (each holding a nibble u) -> bytes 0..3 of one word: three byte permutes.
__device__ __forceinline__ uint32_t low_bytes4(float b0, float b1, float b2, float b3) {
    uint32_t p, q, d;
    asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(p) : "f"(b0), "f"(b1));
    asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(q) : "f"(b2), "f"(b3));
    asm("prmt.b32 %0, %1, %2, 0x5410;" : "=r"(d) : "r"(p), "r"(q));
    return d;
}

// Eight codes (as round8 results, or floats whose low byte is u) -> one packed word, nibble i =
// u[i]: the even nibbles are the low halves of the bytes of x, the odd ones of y; word = x + 16 y.
__device__ __forceinline__ uint32_t pack8(const float a[8]) {
    const uint32_t x = low_bytes4(a[0], a[2], a[4], a[6]);
    const uint32_t y = low_bytes4(a[1], a[3], a[5], a[7]);
    uint32_t d;
    asm("mad.lo.u32 %0, %1, 16, %2;" : "=r"(d) : "r"(y), "r"(x));
    return d;
}

// max |v| over 8 values, NaN-propagating: finite exactly when all 8 are.
__device__ __forceinline__ float absmax8_nan(const float v[8]);

// Max of two packed pairs of magnitudes (bits 0x7FFF7FFF already masked), NaN-propagating.
template <typename T> __device__ __forceinline__ uint32_t max2_nan(uint32_t a, uint32_t b);
template <> __device__ __forceinline__ uint32_t max2_nan<__nv_bfloat16>(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("max.NaN.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
template <> __device__ __forceinline__ uint32_t max2_nan<__half>(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("max.NaN.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}

// Max of x and |v| that propagates NaN (max.NaN): a NaN or an Inf anywhere shows in the result.
__device__ __forceinline__ float max_abs_nan(float x, float v) {
    float d;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(x), "f"(fabsf(v)));
    return d;
}

// The stored scale of a group whose largest magnitude is `amax`; returns it widened to f32.
template <typename S>
__device__ __forceinline__ float stored_scale(float amax, S *stored) {
    // amax / 7 (IEEE), computed without a division (see quotient); +Inf stays +Inf.
    const float a7 = amax <= kMaxFinite ? quotient(amax, -7.0f, kInv7) : amax;
    const float s32 = fmaxf(a7, (float)LOWBIT_MIN_SCALE);
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

__device__ __forceinline__ float absmax8_nan(const float v[8]) {
    float m = fabsf(v[0]);
#pragma unroll
    for (int i = 1; i < 8; ++i) m = max_abs_nan(m, v[i]);
    return m;
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
