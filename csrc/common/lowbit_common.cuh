// Device helpers shared by all kernel families: dtype conversion, vector loads, reductions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

namespace lowbit {

// Conversions between a storage dtype and f32. from_f32 rounds to nearest even.
template <typename T> struct Num;
template <> struct Num<float> {
    static __device__ __forceinline__ float to_f32(float x) { return x; }
    static __device__ __forceinline__ float from_f32(float x) { return x; }
};
template <> struct Num<__nv_bfloat16> {
    static __device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ __nv_bfloat16 from_f32(float x) { return __float2bfloat16_rn(x); }
};
template <> struct Num<__half> {
    static __device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
    static __device__ __forceinline__ __half from_f32(float x) { return __float2half_rn(x); }
};

// Eight consecutive elements <-> f32 registers, with 16-byte vector accesses.
// The pointer must be aligned to 8 elements (the host validates alignment).
template <typename T>
__device__ __forceinline__ void load8(const T *p, float v[8]) {
    static_assert(sizeof(T) == 2, "16-bit types");
    uint4 raw = __ldg(reinterpret_cast<const uint4 *>(p));
    const T *e = reinterpret_cast<const T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = Num<T>::to_f32(e[i]);
}
template <>
__device__ __forceinline__ void load8<float>(const float *p, float v[8]) {
    float4 a = __ldg(reinterpret_cast<const float4 *>(p));
    float4 b = __ldg(reinterpret_cast<const float4 *>(p) + 1);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
    v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <typename T>
__device__ __forceinline__ void store8(T *p, const float v[8]) {
    static_assert(sizeof(T) == 2, "16-bit types");
    uint4 raw;
    T *e = reinterpret_cast<T *>(&raw);
#pragma unroll
    for (int i = 0; i < 8; ++i) e[i] = Num<T>::from_f32(v[i]);
    *reinterpret_cast<uint4 *>(p) = raw;
}
template <>
__device__ __forceinline__ void store8<float>(float *p, const float v[8]) {
    reinterpret_cast<float4 *>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
    reinterpret_cast<float4 *>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

// Max over `width` consecutive lanes (width a power of two <= 32, aligned groups).
// Every lane of the warp must call it.
__device__ __forceinline__ float group_max(float x, int width) {
    for (int off = width >> 1; off > 0; off >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, off));
    return x;
}

__device__ __forceinline__ float warp_max(float x) { return group_max(x, 32); }

// Block-wide max; every thread of the block must call it; blockDim.x a multiple of 32, <= 1024.
__device__ __forceinline__ float block_max(float x) {
    __shared__ float partial[32];
    __shared__ float result;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = warp_max(x);
    if (lane == 0) partial[warp] = x;
    __syncthreads();
    if (warp == 0) {
        float y = lane < (int)(blockDim.x >> 5) ? partial[lane] : 0.0f;
        y = warp_max(y);
        if (lane == 0) result = y;
    }
    __syncthreads();
    float r = result;
    __syncthreads(); // partial/result may be reused by the next call
    return r;
}

// Records the smallest offending index in status word `slot` (initialised to all ones by the
// host). A null status array means the caller opted out of checking.
__device__ __forceinline__ void report_min(unsigned long long *status, int slot, unsigned long long index) {
    if (status != nullptr) atomicMin(status + slot, index);
}

} // namespace lowbit
