// Marlin W4A16 GEMM: Y = X · dequant(W), dense and MoE (DESIGN §3 "Marlin", §4).
//
// Written from the technique of IST-DASLab Marlin / vLLM gptq_marlin (mma.sync m16n8k16 with f32
// accumulation, INT4 -> 16-bit dequantisation in registers, cp.async multistage pipeline), but
// deliberately simpler: no stripe partitioning, a plain (n-block, split, m-block) grid, and a
// shared-memory staged epilogue. Every piece below states the layout it relies on.
//
// ---------------------------------------------------------------------------------------------
// Block structure (template <T, M_TILES, N_TILES, K_TILES, STAGES, MOE>), 256 threads = 8 warps:
//   block tile   M_BLK = 16*M_TILES rows x N_BLK = 64*N_TILES columns of the output,
//   stage depth  K_BLK = 16*K_TILES K-rows per pipeline stage.
//   Warp w owns the 64-column Marlin n-tile wn = w % N_TILES of the block and the k16 tiles
//   kt = wk, wk + WARPS_K, ... (wk = w / N_TILES, WARPS_K = 8 / N_TILES) of every stage, for all
//   M_TILES m16 tiles: its accumulator is acc[M_TILES][8 n8-subtiles][4] f32.
//   The WARPS_K warps sharing an n-tile are summed in shared memory at the end, in wk order.
//
// Fragment layouts (PTX ISA, mma.m16n8k16 .row.col, 16-bit inputs), lane = 4*g + t:
//   A (16x16, row-major):  reg0 (row g,   k 2t..2t+1)  reg1 (row g+8, k 2t..2t+1)
//                          reg2 (row g,   k 2t+8..+9)  reg3 (row g+8, k 2t+8..+9)
//     = ldmatrix.x4 where lane l points at row (l % 16), 8-column half (l / 16).
//   B (16x8, "col"):       reg0 (k 2t, 2t+1 ; n g)     reg1 (k 2t+8, 2t+9 ; n g)
//     low 16 bits = the smaller k.
//   C (16x8 f32):          c0,c1 (row g, n 2t, 2t+1)   c2,c3 (row g+8, n 2t, 2t+1)
//
// Marlin weights (DESIGN §3): in k16-tile kt / n-tile nt, int32 number 4*i + j (lane i, j=0..3)
// holds the codes u = q + 8 at (K-row, N-col), with c = 16j + i/4 and r = 2*(i%4) in the tile:
//   nibble 0 (r,c)  1 (r+8,c)  2 (r,c+8)  3 (r+8,c+8)  4 (r+1,c)  5 (r+9,c)  6 (r+1,c+8)  7 (r+9,c+8)
// For lane i these are exactly its B fragments of two n8 subtiles, 2j (columns 16j..16j+7, own
// column i/4) and 2j+1 (columns 16j+8..16j+15):
//   subtile 2j:   reg0 = nibbles (0, 4) = bits [0,4) | [16,20)      -> (word >> 0)  & 0x000f000f
//                 reg1 = nibbles (1, 5)                             -> (word >> 4)  & 0x000f000f
//   subtile 2j+1: reg0 = nibbles (2, 6)                             -> (word >> 8)  & 0x000f000f
//                 reg1 = nibbles (3, 7)                             -> (word >> 12) & 0x000f000f
// Each masked pair is OR-ed into the exponent of a 16-bit pair (f16 1024.0 = 0x6400, whose ulp is
// 1; bf16 128.0 = 0x4300, ulp 1): the pair becomes (base + u_lo, base + u_hi) exactly, and
// subtracting (base + 8) gives q = u - 8 exactly. Then __hmul2_rn(q, s) rounds once: the weight is
// T(q * s), the same value fake_quant produces (DESIGN §3).
//
// Marlin scales (DESIGN §3). Lane i needs the scales of its columns i/4 + 8b of the n-tile,
// b = 0..7 (one per n8 subtile).
//   grouped (64-chunks, new[8a+b] = old[a+8b]): positions 8*(i/4) .. 8*(i/4)+7 of the n-tile's
//     64-chunk hold exactly those 8 columns in b order -> one 16-byte load per group row.
//   channelwise (32-chunks, new[8a+t] = old[2a+d[t]]): column x of the n-tile sits at
//     32*(x/32) + 8*((y%8)/2) + 2*(y/8) + (y%2), y = x % 32; loaded once into registers.
// The scale group of a k16 tile at K-row k16 is k16 / group (group >= 32, so the 16 rows share
// one). With act-order the activation columns were gathered by perm first, and the scale group of
// permuted row r is g_idx[perm[r]] == r / group: the host only accepts act-order weights whose
// groups are uniform (every group id used by exactly `group` rows, as GPTQ produces).
//
// Shared memory (dynamic, bytes):
//   pipeline: STAGES x [ B: K_TILES*N_TILES tiles * 512 | A: M_BLK*K_BLK*2 | S: (K_BLK/32)*N_BLK*2 ]
//   epilogue: C: M_BLK x (N_BLK + 8) f32 (reuses the pipeline space after it drained)
//   A rows are stored with 16-byte chunk c of row r at chunk position c ^ (r % 8), so the eight
//   row addresses of one ldmatrix 8x8 matrix hit eight different 16-byte bank groups.
//   The host computes the same size (src/marlin/gemm.rs `smem_bytes`); the kernel traps when the
//   launch gave less.
//
// Split-K (dense only): split s of S reduces stage iterations [s*I/S, (s+1)*I/S). Each split
// writes its f32 tile to `partials`, then bumps the tile's counter; the block that arrives last
// sums the S partials in split order 0..S-1 (a fixed order: bit-identical on every run, whichever
// block is last), writes the output, and resets the counter to zero for the next launch.
// ---------------------------------------------------------------------------------------------
#pragma once

#include "lowbit_marlin.h"

namespace lowbit {
namespace mgemm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// ---- 16-bit type traits: the exponent-trick constants and the mma instruction ----------------
template <typename T> struct Half16;

template <> struct Half16<__half> {
    using T2 = __half2;
    static constexpr uint32_t kBase = 0x64006400u;   // (1024, 1024)
    static constexpr uint32_t kBias = 0x64086408u;   // (1032, 1032)
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ T2 pair(float lo, float hi) { return __floats2half2_rn(lo, hi); }
};

template <> struct Half16<__nv_bfloat16> {
    using T2 = __nv_bfloat162;
    static constexpr uint32_t kBase = 0x43004300u;   // (128, 128)
    static constexpr uint32_t kBias = 0x43084308u;   // (136, 136)
    static __device__ __forceinline__ void mma(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
    static __device__ __forceinline__ T2 pair(float lo, float hi) { return __floats2bfloat162_rn(lo, hi); }
};

template <typename V> __device__ __forceinline__ uint32_t bits_of(V v) {
    static_assert(sizeof(V) == 4, "32-bit pair");
    uint32_t u;
    memcpy(&u, &v, 4);
    return u;
}
template <typename V> __device__ __forceinline__ V from_bits(uint32_t u) {
    static_assert(sizeof(V) == 4, "32-bit pair");
    V v;
    memcpy(&v, &u, 4);
    return v;
}

// The B-fragment register holding nibbles (s/4, s/4 + 4) of `word` (s = 0, 4, 8, 12), dequantised
// and scaled: (T(q_lo * s), T(q_hi * s)) with q = u - 8. See the header comment.
template <typename T>
__device__ __forceinline__ uint32_t dequant_pair(uint32_t word, int shift, typename Half16<T>::T2 scale) {
    using T2 = typename Half16<T>::T2;
    const uint32_t biased = ((word >> shift) & 0x000f000fu) | Half16<T>::kBase; // (base+u_lo, base+u_hi)
    // The _rn forms are never contracted into an FMA with neighbouring operations.
    const T2 q = __hsub2_rn(from_bits<T2>(biased), from_bits<T2>(Half16<T>::kBias)); // exact u - 8
    return bits_of(__hmul2_rn(q, scale));                                            // one rounding
}

// ---- PTX wrappers ------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes == 0 zero-fills the destination without reading.
__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], const void *p) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(p)));
}

__device__ __forceinline__ float4 ld_cg_f4(const float *p) {
    float4 v;
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];\n"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}

__device__ __forceinline__ uint32_t dynamic_smem_size() {
    uint32_t r;
    asm volatile("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(r));
    return r;
}

// Position of column x (0..63) of an n-tile inside the Marlin channelwise scale permutation.
__device__ __forceinline__ int channelwise_pos(int x) {
    const int y = x & 31;
    return (x & ~31) + 8 * ((y & 7) >> 1) + 2 * (y >> 3) + (y & 1);
}

// Dynamic shared memory the kernel needs; src/marlin/gemm.rs `smem_bytes` mirrors this formula.
template <int M_TILES, int N_TILES, int K_TILES, int STAGES>
__host__ __device__ constexpr size_t smem_bytes() {
    constexpr size_t m_blk = 16 * M_TILES, n_blk = 64 * N_TILES, k_blk = 16 * K_TILES;
    constexpr size_t stage = K_TILES * N_TILES * 512 + m_blk * k_blk * 2 + (k_blk / 32) * n_blk * 2;
    constexpr size_t pipe = STAGES * stage;
    constexpr size_t epi = m_blk * (n_blk + 8) * 4;
    return pipe > epi ? pipe : epi;
}

// ---- the kernel body ---------------------------------------------------------------------------
template <typename T, int M_TILES, int N_TILES, int K_TILES, int STAGES, bool MOE>
__device__ __forceinline__ void gemm(const LowbitMarlinGemmParams &p) {
    using H = Half16<T>;
    using T2 = typename H::T2;
    constexpr int M_BLK = 16 * M_TILES;
    constexpr int N_BLK = 64 * N_TILES;
    constexpr int K_BLK = 16 * K_TILES;
    constexpr int WARPS_K = kWarps / N_TILES;
    constexpr int KT_PER_WARP = K_TILES / WARPS_K;
    static_assert(M_TILES >= 1 && M_TILES <= 4, "16..64 rows per block");
    static_assert(kWarps % N_TILES == 0 && K_TILES % WARPS_K == 0, "warp split");
    static_assert(K_BLK >= 64, "the A swizzle needs at least 8 chunks per row");
    static_assert(STAGES >= 2, "pipeline");
    constexpr int A_CHUNKS = K_BLK / 8;                 // 16-byte chunks per A row of a stage
    constexpr int B_WORDS = K_TILES * N_TILES * 128;    // int32 per stage
    constexpr int A_ELEMS = M_BLK * K_BLK;              // T per stage
    constexpr int S_GROUPS = K_BLK / 32;                // most scale rows one stage can touch
    constexpr int S_ELEMS = S_GROUPS * N_BLK;           // T per stage
    constexpr int C_STRIDE = N_BLK + 8;                 // f32 per epilogue row (bank padding)
    constexpr size_t SMEM = smem_bytes<M_TILES, N_TILES, K_TILES, STAGES>();

    extern __shared__ __align__(16) unsigned char smem[];
    __shared__ long long s_src[M_BLK];   // A row of block row r, or -1 (zero row)
    __shared__ long long s_dst[M_BLK];   // out row of block row r, or -1 (not written)
    __shared__ float s_wt[M_BLK];        // MoE router weight of block row r (1 otherwise)
    __shared__ int s_last;

    if (dynamic_smem_size() < SMEM) __trap(); // host/kernel layout mismatch: a bug, never silent

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wn = warp % N_TILES, wk = warp / N_TILES;
    const int64_t N = p.n, K = p.k;
    const int64_t n_blocks = (N + N_BLK - 1) / N_BLK;
    const int split_k = MOE ? 1 : p.split_k;

    // Block -> (n-block, split, m-block); n-block fastest.
    int64_t bid = blockIdx.x;
    const int64_t nb = bid % n_blocks;
    bid /= n_blocks;
    const int split = static_cast<int>(bid % split_k);
    const int64_t mb = bid / split_k;
    if (mb >= p.m_blocks) return;
    const int64_t n0 = nb * N_BLK;

    const T *A = static_cast<const T *>(p.a);
    const int32_t *B = p.b;
    const T *S = static_cast<const T *>(p.scales);
    const int64_t groups = K / p.group;
    // Grouped scales: group is 32, 64 or 128 (a power of two); shift instead of dividing.
    const int gshift = __ffsll(static_cast<long long>(p.group)) - 1;

    // ---- rows of this block (and, for MoE, its expert) ----
    int64_t moe_start = 0, used = 0;
    if constexpr (MOE) {
        moe_start = mb * p.block_size;
        used = static_cast<int64_t>(__ldg(p.num_tokens_post_padded));
        if (moe_start >= used || moe_start >= p.capacity) return;   // uniform: whole block exits
        const int e = __ldg(p.expert_ids + mb);
        if (e < 0 || e >= p.num_experts) return;                   // -1 or corrupt: skip, never read
        B += static_cast<int64_t>(e) * (K / 16) * (2 * N);
        S += static_cast<int64_t>(e) * groups * N;
    }
    for (int r = tid; r < M_BLK; r += kThreads) {
        long long src = -1, dst = -1;
        float wt = 1.0f;
        if constexpr (MOE) {
            const int64_t slot = moe_start + r;
            // Only slots of the used prefix, as the reference (moe_align pads it to whole blocks).
            if (r < p.block_size && slot < p.capacity && slot < used) {
                const int64_t id = __ldg(p.sorted_token_ids + slot);
                if (id >= 0 && id < p.out_rows && id / p.top_k < p.m) {
                    src = id / p.top_k;
                    dst = id;
                    if (p.topk_weights != nullptr) wt = __ldg(p.topk_weights + id);
                }
            }
        } else {
            const int64_t row = mb * M_BLK + r;
            if (row < p.m) src = dst = row;
        }
        s_src[r] = src;
        s_dst[r] = dst;
        s_wt[r] = wt;
    }
    __syncthreads();

    int32_t *sB = reinterpret_cast<int32_t *>(smem);
    T *sA = reinterpret_cast<T *>(smem + size_t(STAGES) * B_WORDS * 4);
    T *sS = reinterpret_cast<T *>(smem + size_t(STAGES) * (B_WORDS * 4 + A_ELEMS * 2));

    // ---- channelwise scales: one row, loaded once (column i/4 + 8b of this warp's n-tile) ----
    const bool channelwise = p.channelwise != 0;
    T2 cw_scale[8];
    {
        const int64_t tile_col = n0 + 64 * wn;
#pragma unroll
        for (int b = 0; b < 8; ++b) {
            float s = 0.0f;
            if (channelwise && tile_col < N) s = static_cast<float>(S[tile_col + channelwise_pos(lane / 4 + 8 * b)]);
            cw_scale[b] = H::pair(s, s); // exact: s is already a T
        }
    }

    // ---- one pipeline stage: B tiles, A rows, scale rows of stage iteration `it` ----
    auto load_stage = [&](int slot, int64_t it) {
        const int64_t k0 = it * K_BLK;
        int32_t *dB = sB + slot * B_WORDS;
        for (int q = tid; q < K_TILES * N_TILES * 32; q += kThreads) {
            const int kt = q / (N_TILES * 32), nt = (q / 32) % N_TILES, c = q % 32;
            const int64_t gnt = nb * N_TILES + nt;
            const bool ok = gnt * 64 < N;
            const int32_t *src = B + (k0 / 16 + kt) * (2 * N) + gnt * 128 + 4 * c;
            cp_async16(dB + (kt * N_TILES + nt) * 128 + 4 * c, ok ? src : B, ok);
        }
        T *dA = sA + slot * A_ELEMS;
        for (int q = tid; q < M_BLK * A_CHUNKS; q += kThreads) {
            const int r = q / A_CHUNKS, c = q % A_CHUNKS;
            const long long row = s_src[r];
            const T *src = row >= 0 ? A + row * p.lda + k0 + 8 * c : A;
            cp_async16(dA + r * K_BLK + 8 * (c ^ (r & 7)), src, row >= 0);
        }
        if (!channelwise) {
            const int64_t g0 = k0 >> gshift;
            const int ng = p.group < K_BLK ? static_cast<int>(K_BLK >> gshift) : 1;
            T *dS = sS + slot * S_ELEMS;
            for (int q = tid; q < ng * N_TILES * 8; q += kThreads) {
                const int gi = q / (N_TILES * 8), nt = (q / 8) % N_TILES, c = q % 8;
                const int64_t gnt = nb * N_TILES + nt;
                const bool ok = gnt * 64 < N;
                const T *src = S + (g0 + gi) * N + gnt * 64 + 8 * c;
                cp_async16(dS + gi * N_BLK + nt * 64 + 8 * c, ok ? src : S, ok);
            }
        }
    };

    float acc[M_TILES][8][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][b][e] = 0.0f;

    // ---- this warp's share of one resident stage ----
    auto compute = [&](int slot, int64_t it) {
        const int64_t k0 = it * K_BLK;
        const int32_t *cB = sB + slot * B_WORDS;
        const T *cA = sA + slot * A_ELEMS;
        const T *cS = sS + slot * S_ELEMS;
#pragma unroll
        for (int t = 0; t < KT_PER_WARP; ++t) {
            const int kt = wk + t * WARPS_K;
            const int4 words = *reinterpret_cast<const int4 *>(cB + (kt * N_TILES + wn) * 128 + 4 * lane);
            T2 sc[8];
            if (channelwise) {
#pragma unroll
                for (int b = 0; b < 8; ++b) sc[b] = cw_scale[b];
            } else {
                const int gl = static_cast<int>(((k0 + 16 * kt) >> gshift) - (k0 >> gshift));
                const int4 raw = *reinterpret_cast<const int4 *>(cS + gl * N_BLK + wn * 64 + 8 * (lane / 4));
                const T *v = reinterpret_cast<const T *>(&raw);
#pragma unroll
                for (int b = 0; b < 8; ++b) sc[b] = T2(v[b], v[b]);
            }
            uint32_t af[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt) {
                const int r = 16 * mt + (lane & 15);
                const int c = 2 * kt + (lane >> 4);
                ldmatrix_x4(af[mt], cA + r * K_BLK + 8 * (c ^ (r & 7)));
            }
            const uint32_t w4[4] = {static_cast<uint32_t>(words.x), static_cast<uint32_t>(words.y),
                                    static_cast<uint32_t>(words.z), static_cast<uint32_t>(words.w)};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const uint32_t b00 = dequant_pair<T>(w4[j], 0, sc[2 * j]);
                const uint32_t b01 = dequant_pair<T>(w4[j], 4, sc[2 * j]);
                const uint32_t b10 = dequant_pair<T>(w4[j], 8, sc[2 * j + 1]);
                const uint32_t b11 = dequant_pair<T>(w4[j], 12, sc[2 * j + 1]);
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    H::mma(acc[mt][2 * j], af[mt], b00, b01);
                    H::mma(acc[mt][2 * j + 1], af[mt], b10, b11);
                }
            }
        }
    };

    // ---- main loop: wait for stage i, prefetch stage i + STAGES - 1 into the slot freed by i - 1 ----
    const int64_t iters = K / K_BLK;
    const int64_t it0 = split * iters / split_k;
    const int64_t it1 = (split + 1) * iters / split_k;
    const int64_t n_it = it1 - it0;
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < n_it) load_stage(s, it0 + s);
        cp_async_commit(); // always commit: group i is stage i
    }
    for (int64_t i = 0; i < n_it; ++i) {
        cp_async_wait<STAGES - 2>(); // groups 0..i complete (this thread's copies)
        __syncthreads();             // ... and everyone's; slot (i-1) % STAGES is no longer read
        const int64_t next = i + STAGES - 1;
        if (next < n_it) load_stage(static_cast<int>(next % STAGES), it0 + next);
        cp_async_commit();
        compute(static_cast<int>(i % STAGES), it0 + i);
    }
    cp_async_wait<0>();
    __syncthreads(); // the pipeline space is free: reuse it for the epilogue tile

    // ---- sum the WARPS_K partial accumulators of each n-tile into sC, in wk order ----
    float *sC = reinterpret_cast<float *>(smem);
#pragma unroll 1
    for (int w = 0; w < WARPS_K; ++w) {
        if (wk == w) {
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
                for (int b = 0; b < 8; ++b) {
                    const int row = 16 * mt + lane / 4;
                    const int col = 64 * wn + 8 * b + 2 * (lane % 4);
                    float2 *lo = reinterpret_cast<float2 *>(sC + row * C_STRIDE + col);
                    float2 *hi = reinterpret_cast<float2 *>(sC + (row + 8) * C_STRIDE + col);
                    if (w == 0) {
                        *lo = make_float2(acc[mt][b][0], acc[mt][b][1]);
                        *hi = make_float2(acc[mt][b][2], acc[mt][b][3]);
                    } else {
                        const float2 a = *lo, c = *hi;
                        *lo = make_float2(a.x + acc[mt][b][0], a.y + acc[mt][b][1]);
                        *hi = make_float2(c.x + acc[mt][b][2], c.y + acc[mt][b][3]);
                    }
                }
        }
        __syncthreads();
    }

    // ---- global epilogue: 4 consecutive columns per thread and step ----
    T *out = static_cast<T *>(p.out);
    constexpr int VECS = M_BLK * (N_BLK / 4);
    auto store4 = [&](long long row, int64_t col, float4 v) {
        uint2 packed;
        packed.x = bits_of(H::pair(v.x, v.y));
        packed.y = bits_of(H::pair(v.z, v.w));
        *reinterpret_cast<uint2 *>(out + row * N + col) = packed;
    };
    if (split_k == 1) {
        for (int q = tid; q < VECS; q += kThreads) {
            const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
            const long long dst = s_dst[r];
            if (dst < 0 || n0 + c >= N) continue;
            float4 v = *reinterpret_cast<const float4 *>(sC + r * C_STRIDE + c);
            if constexpr (MOE) {
                const float w = s_wt[r];
                v.x *= w; v.y *= w; v.z *= w; v.w *= w;
            }
            store4(dst, n0 + c, v);
        }
        return;
    }
    // split-K: publish this split's tile, the last arriving split reduces in split order.
    const int64_t tile = mb * n_blocks + nb;
    const int64_t tile_elems = int64_t(M_BLK) * N_BLK;
    float *part = p.partials + (tile * split_k) * tile_elems;
    for (int q = tid; q < VECS; q += kThreads) {
        const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
        if (s_dst[r] < 0 || n0 + c >= N) continue;
        *reinterpret_cast<float4 *>(part + split * tile_elems + r * N_BLK + c) =
            *reinterpret_cast<const float4 *>(sC + r * C_STRIDE + c);
    }
    __threadfence(); // this thread's partial stores are visible device-wide ...
    __syncthreads(); // ... for every thread, before the counter moves
    if (tid == 0) {
        const int prev = atomicAdd(p.counters + tile, 1);
        s_last = prev == split_k - 1;
        if (s_last) atomicExch(p.counters + tile, 0); // all splits arrived: ready for the next launch
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    for (int q = tid; q < VECS; q += kThreads) {
        const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
        const long long dst = s_dst[r];
        if (dst < 0 || n0 + c >= N) continue;
        const float *src = part + r * N_BLK + c;
        float4 sum = ld_cg_f4(src);
        for (int s = 1; s < split_k; ++s) {
            const float4 v = ld_cg_f4(src + s * tile_elems);
            sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
        }
        store4(dst, n0 + c, sum);
    }
}

} // namespace mgemm
} // namespace lowbit

// Act-order activation gather (16-bit elements): dst[r, j] = src[r * lda + perm[j]].
extern "C" __global__ void __launch_bounds__(256) lowbit_marlin_gemm_gather_b16(const LowbitMarlinGemmGatherParams p) {
    const uint16_t *src = static_cast<const uint16_t *>(p.src);
    uint16_t *dst = static_cast<uint16_t *>(p.dst);
    const int64_t total = p.m * p.k;
    for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
        const int64_t r = i / p.k, j = i % p.k;
        const int32_t c = __ldg(p.perm + j);
        dst[i] = (c >= 0 && c < p.k) ? src[r * p.lda + c] : uint16_t(0);
    }
}
