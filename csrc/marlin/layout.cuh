// Marlin layout kernels (DESIGN §3): word repack GPTQ / compressed-tensors <-> Marlin (with the
// act-order row permutation), the Marlin scale permutation and its inverse, and the one-pass
// weight sync (BF16/F16/F32 weights -> Marlin qweight + permuted scales).
//
// Layout (DESIGN §3): Marlin qweight is i32 [K/16, 2N] of 16x64 tiles; word 4i+j of tile
// (kt, nt) sits at [kt, 128 nt + 4i + j]; with c = 64 nt + 16 j + i/4 and r = 16 kt + 2 (i%4) its
// nibbles 0..7 hold the codes at (r,c) (r+8,c) (r,c+8) (r+8,c+8) (r+1,c) (r+9,c) (r+1,c+8)
// (r+9,c+8).
//
// Work decomposition shared by the tile kernels: a unit is one 64-column tile `nt` times one
// strip of up to 128 K-rows (8 Marlin row tiles) of one matrix of the batch. A block stages the
// strip in shared memory as "GPTQ words" sm[kw][c] (8 consecutive K-rows of column c, nibble e =
// row 8 kw + e) and converts between that and Marlin words. Global reads and writes of both sides
// are contiguous per warp; all element offsets are 64-bit.

#include "lowbit_int4.cuh"

namespace lowbit {
namespace marlin {

constexpr int kTileK = LOWBIT_MARLIN_TILE_K;         // 16
constexpr int kTileN = LOWBIT_MARLIN_TILE_N;         // 64
constexpr int kTileWords = LOWBIT_MARLIN_TILE_WORDS; // 128
constexpr int kStripK = 128;                         // K-rows per unit
constexpr int kStripWords = kStripK / 8;             // GPTQ words per column per unit (16)
constexpr int kLayoutThreads = 256;

// Shared-memory column of GPTQ word (kw, c) in the staged strip: XOR-swizzled so that the 16
// words of one column (written by a half-warp) and of the next column fall in distinct banks.
__device__ __forceinline__ int sw(int kw, int c) { return c ^ (2 * kw); }

// Padded index of Marlin word `idx` of a staged row tile (one extra word per 16 spreads the
// gather of unrepack over the banks).
constexpr int kMwStride = kTileWords + kTileWords / 16;
__device__ __forceinline__ int mw_idx(int ktl, int idx) { return ktl * kMwStride + idx + (idx >> 4); }

// Records the smallest offending index (status words start at all ones; null: no checking).
__device__ __forceinline__ void report(unsigned long long *status, int slot, unsigned long long index) {
    if (status != nullptr) atomicMin(status + slot, index);
}

// For the flat GPTQ-order scale index f (of one [groups, n] matrix), the Marlin position that
// holds it. Grouped: chunks of 64, new[8a + b] = old[a + 8b]. Channelwise: chunks of 32,
// new[8a + t] = old[2a + d[t]] with d = [0,1,8,9,16,17,24,25].
__device__ __forceinline__ long long scale_dest(long long f, bool channelwise) {
    if (channelwise) {
        const int o = (int)(f & 31);
        const int a = (o & 7) >> 1;
        const int d = o - 2 * a;              // one of 0,1,8,9,16,17,24,25
        const int t = 2 * (d >> 3) + (d & 1); // its index in d
        return (f - o) + 8 * a + t;
    }
    const int o = (int)(f & 63);
    return (f - o) + 8 * (o & 7) + (o >> 3);
}

// The inverse: which flat GPTQ-order index Marlin position p holds.
__device__ __forceinline__ long long scale_source(long long p, bool channelwise) {
    if (channelwise) {
        const int o = (int)(p & 31);
        const int a = o >> 3, t = o & 7;
        const int d = 8 * (t >> 1) + (t & 1);
        return (p - o) + 2 * a + d;
    }
    const int o = (int)(p & 63);
    return (p - o) + (o >> 3) + 8 * (o & 7);
}

// Marlin word index (within one matrix) and nibble of the code at (K-row r, N-col c).
__device__ __forceinline__ void marlin_locate(long long r, long long c, long long n, long long *word, int *nibble) {
    const long long kt = r >> 4, nt = c >> 6;
    const int rr = (int)(r & 15), cc = (int)(c & 63);
    const int j = cc >> 4, c16 = cc & 15, ch = c16 >> 3;
    const int i = 4 * (c16 & 7) + ((rr & 7) >> 1);
    *word = kt * (2 * n) + (long long)kTileWords * nt + 4 * i + j;
    *nibble = 4 * (rr & 1) + 2 * ch + (rr >> 3);
}

// A unit of the tile decomposition.
struct Unit {
    long long b;  // matrix of the batch
    long long nt; // 64-column tile
    long long k0; // first K-row of the strip
    int rows;     // K-rows in the strip (multiple of 16, <= 128)
};

__device__ __forceinline__ Unit unit_of(long long u, long long k, long long n) {
    const long long strips = (k + kStripK - 1) / kStripK, ntiles = n / kTileN;
    Unit x;
    x.b = u / (ntiles * strips);
    const long long rem = u % (ntiles * strips);
    x.nt = rem / strips;
    x.k0 = (rem % strips) * kStripK;
    x.rows = (int)min((long long)kStripK, k - x.k0);
    return x;
}

__device__ __forceinline__ long long unit_count(long long batch, long long k, long long n) {
    return batch * (n / kTileN) * ((k + kStripK - 1) / kStripK);
}

// Writes the Marlin words of a staged strip: sm[kw][c] -> Marlin tiles (k0/16 ..), column tile nt.
// Word 4i+j of a tile takes byte i%4 (rows 2(i%4), 2(i%4)+1) of the four GPTQ words at columns
// c, c+8 and row halves 0, 1: low nibbles give (r,c) (r+8,c) (r,c+8) (r+8,c+8), high nibbles the
// r+1 / r+9 rows, in that order.
__device__ __forceinline__ void emit_marlin(const uint32_t (*sm)[kTileN], const Unit &x, int32_t *dst, long long k,
                                            long long n) {
    int32_t *out = dst + x.b * (k / 16) * (2 * n) + (x.k0 / kTileK) * (2 * n) + (long long)kTileWords * x.nt;
    const int words = (x.rows / kTileK) * kTileWords;
    for (int q = threadIdx.x; q < words; q += blockDim.x) {
        const int ktl = q / kTileWords, t = q % kTileWords;
        const int i = t >> 2, j = t & 3;
        const int c = 16 * j + (i >> 2), sh = 8 * (i & 3);
        const int k0 = 2 * ktl, k1 = 2 * ktl + 1;
        const uint32_t x0 = (sm[k0][sw(k0, c)] >> sh) & 0xFF;
        const uint32_t x1 = (sm[k1][sw(k1, c)] >> sh) & 0xFF;
        const uint32_t x2 = (sm[k0][sw(k0, c + 8)] >> sh) & 0xFF;
        const uint32_t x3 = (sm[k1][sw(k1, c + 8)] >> sh) & 0xFF;
        const uint32_t lo = (x0 & 0xF) | (x1 & 0xF) << 4 | (x2 & 0xF) << 8 | (x3 & 0xF) << 12;
        const uint32_t hi = (x0 >> 4) | (x1 >> 4) << 4 | (x2 >> 4) << 8 | (x3 >> 4) << 12;
        out[(long long)ktl * (2 * n) + t] = (int32_t)(lo | hi << 16);
    }
}

// ---------------------------------------------------------------------------------------------
// GPTQ / compressed-tensors -> Marlin.
template <bool CT>
__device__ __forceinline__ void repack(const LowbitMarlinLayoutParams &p) {
    __shared__ uint32_t sm[kStripWords][kTileN];
    const long long k = p.k, n = p.n, kw_total = k / 8;
    const long long units = unit_count(p.batch, k, n);
    for (long long u = blockIdx.x; u < units; u += gridDim.x) {
        const Unit x = unit_of(u, k, n);
        const int kws = x.rows / 8;
        const long long col0 = x.nt * kTileN;
        for (int q = threadIdx.x; q < kws * kTileN; q += blockDim.x) {
            // GPTQ: consecutive threads walk N (rows of qweight are contiguous in N);
            // compressed-tensors: consecutive threads walk K-words of one column.
            const int kw = CT ? q % kws : q / kTileN;
            const int c = CT ? q / kws : q % kTileN;
            const long long col = col0 + c;
            uint32_t word;
            if (p.perm == nullptr) {
                const long long w = x.k0 / 8 + kw;
                word = (uint32_t)(CT ? p.src[(x.b * n + col) * kw_total + w] : p.src[(x.b * kw_total + w) * n + col]);
            } else {
                word = 0;
#pragma unroll
                for (int e = 0; e < 8; ++e) {
                    const long long s = p.perm[x.k0 + 8 * kw + e];
                    const uint32_t v = (uint32_t)(CT ? p.src[(x.b * n + col) * kw_total + s / 8]
                                                     : p.src[(x.b * kw_total + s / 8) * n + col]);
                    word |= ((v >> (4 * (s % 8))) & 0xF) << (4 * e);
                }
            }
            sm[kw][sw(kw, c)] = word;
        }
        __syncthreads();
        emit_marlin(sm, x, p.dst, k, n);
        __syncthreads();
    }
}

// Marlin -> GPTQ / compressed-tensors, no act-order: stage the strip's Marlin words, then build
// each GPTQ word from four of them.
template <bool CT>
__device__ __forceinline__ void unrepack(const LowbitMarlinLayoutParams &p) {
    __shared__ uint32_t mw[(kStripK / kTileK) * kMwStride];
    const long long k = p.k, n = p.n, kw_total = k / 8;
    const long long units = unit_count(p.batch, k, n);
    for (long long u = blockIdx.x; u < units; u += gridDim.x) {
        const Unit x = unit_of(u, k, n);
        const int tiles = x.rows / kTileK, kws = x.rows / 8;
        const int32_t *in = p.src + x.b * (k / 16) * (2 * n) + (x.k0 / kTileK) * (2 * n) + (long long)kTileWords * x.nt;
        for (int q = threadIdx.x; q < tiles * kTileWords; q += blockDim.x) {
            mw[mw_idx(q / kTileWords, q % kTileWords)] = (uint32_t)in[(long long)(q / kTileWords) * (2 * n) + q % kTileWords];
        }
        __syncthreads();
        const long long col0 = x.nt * kTileN;
        for (int q = threadIdx.x; q < kws * kTileN; q += blockDim.x) {
            const int kw = CT ? q % kws : q / kTileN;
            const int c = CT ? q / kws : q % kTileN;
            const int ktl = kw >> 1, h = kw & 1;
            const int j = c >> 4, c16 = c & 15, ch = c16 >> 3;
            const int lo_nib = 2 * ch + h, hi_nib = 4 + 2 * ch + h;
            uint32_t word = 0;
#pragma unroll
            for (int b = 0; b < 4; ++b) {
                const uint32_t m = mw[mw_idx(ktl, 4 * (4 * (c16 & 7) + b) + j)];
                const uint32_t lo = (m >> (4 * lo_nib)) & 0xF, hi = (m >> (4 * hi_nib)) & 0xF;
                word |= (lo | hi << 4) << (8 * b);
            }
            const long long w = x.k0 / 8 + kw, col = col0 + c;
            if (CT) {
                p.dst[(x.b * n + col) * kw_total + w] = (int32_t)word;
            } else {
                p.dst[(x.b * kw_total + w) * n + col] = (int32_t)word;
            }
        }
        __syncthreads();
    }
}

// Marlin -> GPTQ / compressed-tensors with act-order: one thread per destination word gathers its
// eight codes from the Marlin rows inv[s] (p.perm holds the inverse permutation).
template <bool CT>
__device__ __forceinline__ void unrepack_gather(const LowbitMarlinLayoutParams &p) {
    const long long k = p.k, n = p.n, kw_total = k / 8;
    const long long per = kw_total * n, total = p.batch * per;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long o = (long long)blockIdx.x * blockDim.x + threadIdx.x; o < total; o += stride) {
        const long long b = o / per, rem = o % per;
        const long long w = CT ? rem % kw_total : rem / n;
        const long long col = CT ? rem / kw_total : rem % n;
        const int32_t *in = p.src + b * per;
        uint32_t word = 0;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            long long mword;
            int nib;
            marlin_locate(p.perm[8 * w + e], col, n, &mword, &nib);
            word |= (((uint32_t)in[mword] >> (4 * nib)) & 0xF) << (4 * e);
        }
        p.dst[o] = (int32_t)word;
    }
}

// ---------------------------------------------------------------------------------------------
// Scales: Marlin position p <-> GPTQ [groups, n] or compressed-tensors [n, groups] position.
template <bool INVERSE>
__device__ __forceinline__ void permute_scales(const LowbitMarlinLayoutScalesParams &p) {
    const uint16_t *src = reinterpret_cast<const uint16_t *>(p.src);
    uint16_t *dst = reinterpret_cast<uint16_t *>(p.dst);
    const long long per = p.groups * p.n, total = p.batch * per;
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long m = (long long)blockIdx.x * blockDim.x + threadIdx.x; m < total; m += stride) {
        const long long b = m / per, pm = m % per;
        const long long f = scale_source(pm, p.channelwise != 0);
        const long long other = b * per + (p.ct ? (f % p.n) * p.groups + f / p.n : f);
        if (INVERSE) {
            dst[other] = src[m];
        } else {
            dst[m] = src[other];
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One-pass weight sync, built in registers (issue 9). A unit is one 64-column Marlin tile `nt`
// times a strip of up to 128 K-rows (8 Marlin row tiles) of one matrix. The 256 threads are 8 row
// tiles x 32 column pairs: lane bits 0..2 are the row tile kb (K-rows k0 + 16 kb .. + 16), and
// warp w with lane bits 3..4 (call them j) own the two N-rows c = 16 j + w and c + 8 of the tile.
// Those 2 x 16 weights are exactly the codes of Marlin words 4 i + j, i = 4 w + m (m = 0..3), of
// row tile kb: DESIGN §3 with c = 16 j + i / 4 and r = 2 (i % 4) = 2 m, the code of K-row kk
// (0..15) of row c (B = 0) or c + 8 (B = 1) is nibble 4 (kk & 1) + (kk >> 3) + 2 B of word
// m = (kk & 7) / 2. So each thread quantizes straight into its four words: no shared memory, no
// second pass. A half-warp's 8 row tiles of one N-row are 256 contiguous bytes of bf16 (the
// group of g weights is g / 16 consecutive lanes, which reduce amax with shuffles), and the four
// words of the 4 lanes with one kb are 16 contiguous bytes of the output.
template <typename T> struct Row16 { uint4 q[sizeof(T)]; }; // 16 weights: 32 bytes (64 for f32)

template <typename T>
__device__ __forceinline__ void load_row16(const T *p, Row16<T> &r) {
#pragma unroll
    for (int i = 0; i < (int)sizeof(T); ++i) r.q[i] = __ldg(reinterpret_cast<const uint4 *>(p) + i);
}

// Element kk (0..15) of a loaded row, widened to f32 (exact).
template <typename T> __device__ __forceinline__ float row_elem(const Row16<T> &r, int kk);
template <> __device__ __forceinline__ float row_elem<float>(const Row16<float> &r, int kk) {
    const uint4 &x = r.q[kk >> 2];
    const uint32_t b = (kk & 3) == 0 ? x.x : (kk & 3) == 1 ? x.y : (kk & 3) == 2 ? x.z : x.w;
    return __uint_as_float(b);
}
__device__ __forceinline__ uint32_t row_word(const uint4 &x, int i) {
    return i == 0 ? x.x : i == 1 ? x.y : i == 2 ? x.z : x.w;
}
template <> __device__ __forceinline__ float row_elem<__nv_bfloat16>(const Row16<__nv_bfloat16> &r, int kk) {
    const uint32_t b = row_word(r.q[kk >> 3], (kk >> 1) & 3);
    float f;
    // bf16 -> f32 is a 16-bit shift (low half) or a mask (high half), written so that no extra
    // register move appears.
    if (kk & 1) {
        asm("and.b32 %0, %1, 0xFFFF0000;" : "=f"(f) : "r"(b));
    } else {
        asm("shl.b32 %0, %1, 16;" : "=f"(f) : "r"(b));
    }
    return f;
}
template <> __device__ __forceinline__ float row_elem<__half>(const Row16<__half> &r, int kk) {
    const uint32_t b = row_word(r.q[kk >> 3], (kk >> 1) & 3);
    const unsigned short h = (kk & 1) ? (unsigned short)(b >> 16) : (unsigned short)(b & 0xFFFF);
    return __half2float(__ushort_as_half(h));
}

// The codes of one N-row's 16 weights, as floats whose low byte is u = q + 8 (the rest of the bits
// are don't-care). FAST: the division-free rounding of lowbit_int4.cuh (its precondition holds:
// see the caller); otherwise quant_code, the division.
template <bool FAST>
__device__ __forceinline__ void code_row16(const float v[16], float sf, float r, float ns, float a[16]) {
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
        if (FAST) {
            a[kk] = qgrid::round8(qgrid::quotient(v[kk], ns, r)); // bits 0x4B400000 + u
        } else {
            bool clipped;
            const uint32_t u = (uint32_t)(qgrid::quant_code(v[kk], sf, &clipped) + LOWBIT_QZERO);
            // (an f32-typed register, like the fast path's, so the two paths merge without moves)
            asm("mov.b32 %0, %1;" : "=f"(a[kk]) : "r"(u));
        }
    }
}

// A row's 16 codes as 8 byte pairs (so that only 8 registers stay live while the other row is
// quantized): pr[m] = bytes (K-row 2m, 2m+1), pr[4 + m] = (2m+8, 2m+9), m = 0..3.
__device__ __forceinline__ void code_pairs(const float a[16], uint32_t pr[8]) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(pr[m]) : "f"(a[2 * m]), "f"(a[2 * m + 1]));
        asm("prmt.b32 %0, %1, %2, 0x0040;" : "=r"(pr[4 + m]) : "f"(a[2 * m + 8]), "f"(a[2 * m + 9]));
    }
}

// The thread's four Marlin words from the code pairs of rows c (pa) and c + 8 (pb): word m holds,
// in nibbles 0..7, K-rows 2m (c), 2m+8 (c), 2m (c+8), 2m+8 (c+8), 2m+1 (c), 2m+9 (c), 2m+1 (c+8),
// 2m+9 (c+8): the even nibbles are the low halves of the bytes of x = (2m c, 2m c+8, 2m+1 c,
// 2m+1 c+8), the odd ones of y (the same for 2m+8, 2m+9), and word = x + 16 y (no carries: every
// byte of x and y is below 16).
__device__ __forceinline__ void marlin_words(const uint32_t pa[8], const uint32_t pb[8], uint32_t words[4]) {
#pragma unroll
    for (int m = 0; m < 4; ++m) {
        uint32_t x, y;
        asm("prmt.b32 %0, %1, %2, 0x5140;" : "=r"(x) : "r"(pa[m]), "r"(pb[m]));
        asm("prmt.b32 %0, %1, %2, 0x5140;" : "=r"(y) : "r"(pa[4 + m]), "r"(pb[4 + m]));
        asm("mad.lo.u32 %0, %1, 16, %2;" : "=r"(words[m]) : "r"(y), "r"(x));
    }
}

// Reports the first non-finite weight of a row of 16 (flat index e0 + kk).
__device__ __forceinline__ void report_nonfinite16(unsigned long long *status, const float v[16], long long e0) {
#pragma unroll
    for (int kk = 0; kk < 16; ++kk) {
        if (!isfinite(v[kk])) {
            report(status, LOWBIT_STATUS_NONFINITE, (unsigned long long)(e0 + kk));
            break;
        }
    }
}

// max |v| over a row of 16, NaN-propagating (a NaN or an Inf anywhere shows): for 16-bit weights
// on the packed pairs (the max of bf16/f16 magnitudes is exact in the narrow type), then widened.
template <typename T>
__device__ __forceinline__ float row_absmax_nan(const Row16<T> &r, const float v[16]) {
    float m = fabsf(v[0]);
#pragma unroll
    for (int kk = 1; kk < 16; ++kk) m = qgrid::max_abs_nan(m, v[kk]);
    return m;
}
template <typename T>
__device__ __forceinline__ float row_absmax_nan16(const Row16<T> &r) {
    uint32_t x[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) x[i] = row_word(r.q[i >> 2], i & 3) & 0x7FFF7FFFu;
#pragma unroll
    for (int i = 0; i < 4; ++i) x[i] = qgrid::max2_nan<T>(x[i], x[i + 4]);
    x[0] = qgrid::max2_nan<T>(x[0], x[2]);
    x[1] = qgrid::max2_nan<T>(x[1], x[3]);
    x[0] = qgrid::max2_nan<T>(x[0], x[1]);
    Row16<T> one{};
    one.q[0].x = x[0];
    return qgrid::max_abs_nan(row_elem<T>(one, 0), row_elem<T>(one, 1));
}
template <>
__device__ __forceinline__ float row_absmax_nan<__nv_bfloat16>(const Row16<__nv_bfloat16> &r, const float *) {
    return row_absmax_nan16<__nv_bfloat16>(r);
}
template <>
__device__ __forceinline__ float row_absmax_nan<__half>(const Row16<__half> &r, const float *) {
    return row_absmax_nan16<__half>(r);
}

// Butterfly max over WIDTH aligned lanes (NaN-dropping, as fmaxf). Every lane must call it.
template <int WIDTH>
__device__ __forceinline__ float lanes_max(float x) {
    if constexpr (WIDTH > 1) {
        float y;
        asm volatile("shfl.sync.bfly.b32 %0, %1, %2, 0x1f, 0xffffffff;" : "=f"(y) : "f"(x), "n"(WIDTH / 2));
        return lanes_max<WIDTH / 2>(fmaxf(x, y));
    } else {
        return x;
    }
}

// The biased exponent field of a 16-bit scale read in the bf16 layout (bits 14..7): what
// LowbitMarlinSyncParams::scale_exp and lowbit_marlin_scale_exp_b16 take the maximum of.
template <typename S> __device__ __forceinline__ uint32_t exp_field(S v) {
    static_assert(sizeof(S) == 2, "16-bit scales");
    uint16_t b;
    memcpy(&b, &v, 2);
    return (uint32_t(b) >> 7) & 0xffu;
}
// One atomic per warp: the warp's running maximum of exp_field into *out (if any).
__device__ __forceinline__ void publish_exp(uint32_t *out, uint32_t m) {
    m = __reduce_max_sync(0xffffffffu, m);
    if (out != nullptr && (threadIdx.x & 31) == 0 && m != 0) atomicMax(out, m);
}

// WIDTH = g / 16 lanes per group (g = 32, 64, 128) computes the scales inline; WIDTH = 0 reads the
// scales the row-scale pass wrote (channelwise).
template <typename T, typename S, int WIDTH>
__device__ __forceinline__ void sync_quantize(const LowbitMarlinSyncParams &p) {
    constexpr bool INLINE_SCALES = WIDTH > 0;
    const long long k = p.k, n = p.n, g = INLINE_SCALES ? 16 * WIDTH : p.group, groups = k / g;
    const bool cw = p.channelwise != 0;
    const T *w = reinterpret_cast<const T *>(p.w);
    S *scales = reinterpret_cast<S *>(p.scales);
    const int lane = threadIdx.x & 31, kb = lane & 7;
    const int c = 16 * (lane >> 3) + (threadIdx.x >> 5); // N-row of the tile; the other is c + 8
    const int dest_a = (int)scale_dest(c, cw), dest_b = (int)scale_dest(c + 8, cw);
    // Each block takes a contiguous range of units (unit_of's order: strips of one column tile,
    // then the next tile, then the next matrix) and steps through it without dividing.
    const long long ntiles = n / kTileN;
    const long long units = unit_count(p.batch, k, n);
    const long long per = (units + gridDim.x - 1) / gridDim.x;
    long long u = (long long)blockIdx.x * per;
    const long long u_end = min(u + per, units);
    if (u >= u_end) return;
    Unit x = unit_of(u, k, n);
    uint32_t emax = 0; // the scale range of the scales this thread writes (inline path)
    for (; u < u_end; ++u) {
        const bool active = 16 * kb < x.rows;
        const long long row_a = x.b * n + x.nt * kTileN + c; // batch-flattened weight rows
        const long long col = x.k0 + 16 * kb;
        // Inactive lanes (a strip shorter than 128) read the strip's first K-rows instead, so every
        // lane loads unconditionally; their values only enter the amax as 0.
        const T *src = w + row_a * k + (active ? col : x.k0);
        Row16<T> raw[2];
        load_row16<T>(src, raw[0]);
        load_row16<T>(src + 8 * k, raw[1]);
        float va[16], vb[16];
#pragma unroll
        for (int kk = 0; kk < 16; ++kk) {
            va[kk] = row_elem<T>(raw[0], kk);
            vb[kk] = row_elem<T>(raw[1], kk);
        }
        float ma = row_absmax_nan<T>(raw[0], va), mb = row_absmax_nan<T>(raw[1], vb);
        const bool ok_a = ma <= qgrid::kMaxFinite, ok_b = mb <= qgrid::kMaxFinite; // false for NaN, Inf
        if (active && !ok_a) report_nonfinite16(p.status, va, row_a * k + col);
        if (active && !ok_b) report_nonfinite16(p.status, vb, (row_a + 8) * k + col);
        // Scale positions: GPTQ order f = gi n + 64 nt + c; as n and 64 nt are multiples of 64,
        // scale_dest(f) = (gi n + 64 nt) + scale_dest(c) (dest_a / dest_b, per thread).
        S *sc = scales + x.b * groups * n + (col / g) * n + x.nt * kTileN;
        float sa = 1.0f, sb = 1.0f;
        if constexpr (INLINE_SCALES) {
            // The group's amax ignores NaNs (fmaxf), as it always did: recompute a NaN row so.
            if (ma != ma) {
                ma = 0.0f;
#pragma unroll
                for (int kk = 0; kk < 16; ++kk) ma = fmaxf(ma, fabsf(va[kk]));
            }
            if (mb != mb) {
                mb = 0.0f;
#pragma unroll
                for (int kk = 0; kk < 16; ++kk) mb = fmaxf(mb, fabsf(vb[kk]));
            }
            ma = lanes_max<WIDTH>(active ? ma : 0.0f); // uniform: every lane of the warp takes part
            mb = lanes_max<WIDTH>(active ? mb : 0.0f);
            S st_a, st_b;
            sa = qgrid::stored_scale<S>(ma, &st_a);
            sb = qgrid::stored_scale<S>(mb, &st_b);
            if (active && kb % WIDTH == 0) {
                const long long gi = col / g;
                if (!(sa <= qgrid::kMaxFinite))
                    report(p.status, LOWBIT_STATUS_SCALE_OVERFLOW, (unsigned long long)(row_a * groups + gi));
                if (!(sb <= qgrid::kMaxFinite))
                    report(p.status, LOWBIT_STATUS_SCALE_OVERFLOW, (unsigned long long)((row_a + 8) * groups + gi));
                sc[dest_a] = st_a;
                sc[dest_b] = st_b;
                emax = max(emax, max(exp_field(st_a), exp_field(st_b)));
            }
        } else if (active) {
            sa = Num<S>::to_f32(sc[dest_a]);
            sb = Num<S>::to_f32(sc[dest_b]);
        }
        if (active) {
            // Fast path: finite weights and a finite scale made from their group's amax (inline:
            // just above; staged: by the row-scale pass over the same weights).
            const float ra = qgrid::recip(sa), rb = qgrid::recip(sb);
            float ca[16], cb[16];
            uint32_t pa[8], pb[8];
            if (ok_a && sa <= qgrid::kMaxFinite) {
                code_row16<true>(va, sa, ra, -sa, ca);
            } else {
                code_row16<false>(va, sa, ra, -sa, ca);
            }
            code_pairs(ca, pa);
            if (ok_b && sb <= qgrid::kMaxFinite) {
                code_row16<true>(vb, sb, rb, -sb, cb);
            } else {
                code_row16<false>(vb, sb, rb, -sb, cb);
            }
            code_pairs(cb, pb);
            uint32_t words[4];
            marlin_words(pa, pb, words);
            int32_t *out = p.qweight + x.b * (k / 16) * (2 * n) + (x.k0 / kTileK + kb) * (2 * n) +
                           (long long)kTileWords * x.nt + 16 * (threadIdx.x >> 5) + (lane >> 3);
#pragma unroll
            for (int m = 0; m < 4; ++m) out[4 * m] = (int32_t)words[m];
        }
        // Next unit: the next strip, else the next column tile, else the next matrix.
        x.k0 += kStripK;
        if (x.k0 >= k) {
            x.k0 = 0;
            if (++x.nt == ntiles) {
                x.nt = 0;
                ++x.b;
            }
        }
        x.rows = (int)min((long long)kStripK, k - x.k0);
    }
    if constexpr (INLINE_SCALES) publish_exp(p.scale_exp, emax); // every lane of the warp gets here
}

// The inline kernels: one instance per group size (the lane width of the amax reduction).
template <typename T, typename S>
__device__ __forceinline__ void sync_inline(const LowbitMarlinSyncParams &p) {
    if (p.group == 32) {
        sync_quantize<T, S, 2>(p);
    } else if (p.group == 64) {
        sync_quantize<T, S, 4>(p);
    } else {
        sync_quantize<T, S, 8>(p);
    }
}

// Channelwise (or any group the inline path does not take) pre-pass: one block per group of
// `group` contiguous weights computes amax and writes the stored scale at its Marlin position.
template <typename T, typename S>
__device__ __forceinline__ void sync_group_scales(const LowbitMarlinSyncParams &p) {
    const long long k = p.k, n = p.n, g = p.group, groups = k / g;
    const bool cw = p.channelwise != 0;
    const long long total = p.batch * n * groups;
    const T *w = reinterpret_cast<const T *>(p.w);
    S *scales = reinterpret_cast<S *>(p.scales);
    uint32_t emax = 0; // thread 0: the scale range of the scales this block writes
    for (long long gg = blockIdx.x; gg < total; gg += gridDim.x) {
        const long long nrow = gg / groups, gi = gg % groups;
        const long long e0 = nrow * k + gi * g;
        float amax = 0.0f;
        for (long long c = threadIdx.x; c < g / 8; c += blockDim.x) {
            float v[8];
            load8<T>(w + e0 + c * 8, v);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                if (!isfinite(v[e])) {
                    report(p.status, LOWBIT_STATUS_NONFINITE, (unsigned long long)(e0 + c * 8 + e));
                    break;
                }
            }
#pragma unroll
            for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(v[e]));
        }
        amax = block_max(amax);
        if (threadIdx.x == 0) {
            S stored;
            const float sf = qgrid::stored_scale<S>(amax, &stored);
            if (!isfinite(sf)) report(p.status, LOWBIT_STATUS_SCALE_OVERFLOW, (unsigned long long)gg);
            const long long b = nrow / n, row = nrow % n;
            scales[b * groups * n + scale_dest(gi * n + row, cw)] = stored;
            emax = max(emax, exp_field(stored));
        }
    }
    publish_exp(p.scale_exp, emax);
}

// The bf16 GEMM's scale range: max over the scales of the biased exponent field of |s| (bits
// 14..7 of a bf16; the exponent of the largest magnitude, 255 for inf/NaN), max-ed into *out.
// One atomic per warp; *out must be zero before the launch.
__device__ __forceinline__ void scale_exp(const LowbitMarlinScaleExpParams &p) {
    uint32_t m = 0;
    const int64_t stride = int64_t(gridDim.x) * blockDim.x;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < p.count; i += stride)
        m = max(m, (uint32_t(__ldg(p.scales + i)) >> 7) & 0xffu);
    publish_exp(p.out, m);
}

} // namespace marlin
} // namespace lowbit

// ---- extern "C" entry points (names scanned by build.rs) ------------------------------------
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_repack_gptq(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::repack<false>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_repack_ct(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::repack<true>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_to_gptq(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::unrepack<false>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_to_ct(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::unrepack<true>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_to_gptq_perm(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::unrepack_gather<false>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_to_ct_perm(const LowbitMarlinLayoutParams p) {
    lowbit::marlin::unrepack_gather<true>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_permute_scales(const LowbitMarlinLayoutScalesParams p) {
    lowbit::marlin::permute_scales<false>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_unpermute_scales(const LowbitMarlinLayoutScalesParams p) {
    lowbit::marlin::permute_scales<true>(p);
}

extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_scale_exp_b16(const LowbitMarlinScaleExpParams p) {
    lowbit::marlin::scale_exp(p);
}

// Weight sync: lowbit_marlin_sync_<inline|staged>_<weight dtype>_<scale dtype>, and the row-scale
// pre-pass lowbit_marlin_sync_scales_<weight dtype>_<scale dtype> for the staged path. The inline
// kernels are bounded to 3 CTAs per SM (80 registers): 4 would cap them at 64 and spill ~100 bytes;
// 3 x 256 threads with 64 bytes (bf16/f16) or 128 bytes (f32) of loads each issued up front is
// still 48-96 KB in flight per SM.
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_bf16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<__nv_bfloat16, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_bf16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<__nv_bfloat16, __half>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_f16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<__half, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_f16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<__half, __half>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_f32_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<float, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256, 3) lowbit_marlin_sync_inline_f32_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_inline<float, __half>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_bf16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<__nv_bfloat16, __nv_bfloat16, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_bf16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<__nv_bfloat16, __half, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_f16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<__half, __nv_bfloat16, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_f16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<__half, __half, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_f32_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<float, __nv_bfloat16, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_staged_f32_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_quantize<float, __half, 0>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_bf16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<__nv_bfloat16, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_bf16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<__nv_bfloat16, __half>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_f16_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<__half, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_f16_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<__half, __half>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_f32_bf16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<float, __nv_bfloat16>(p);
}
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_sync_scales_f32_f16(const LowbitMarlinSyncParams p) {
    lowbit::marlin::sync_group_scales<float, __half>(p);
}
