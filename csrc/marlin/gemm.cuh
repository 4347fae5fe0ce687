// Marlin W4A16 GEMM: Y = X · dequant(W), dense and MoE (DESIGN §3 "Marlin", §4).
//
// Written from the technique of IST-DASLab Marlin / vLLM gptq_marlin (mma.sync m16n8k16 with f32
// accumulation, INT4 -> 16-bit dequantisation in registers, cp.async multistage pipeline), but
// deliberately simpler: a persistent grid with a stream-K tail (see "Schedule") and a
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
// f16: each masked pair is OR-ed into the exponent of 1024.0 (0x6400, ulp 1): the pair becomes
// (1024 + u_lo, 1024 + u_hi) exactly, subtracting 1032 gives q = u - 8 exactly, and
// __hmul2_rn(q, s) rounds once: the weight is T(q * s), the value fake_quant produces (DESIGN §3).
// bf16: the masked pair is read as two bf16 subnormals, u * 2^-133 exactly, and one fma with
// per-scale factors gives T(q * s) * 2^-j directly (see Dequant<bf16>); the accumulators are
// scaled back by 2^j, exactly, after the main loop.
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
// Schedule (dense and MoE; src/marlin/gemm.rs `GemmPlan` mirrors it): a grid of G CTAs (the
// host picks G: about one per resident CTA slot of the device) over the output tiles, tile t =
// (row block t % R, column block t / R) with R the row blocks in use (MoE: those of the used
// prefix num_tokens_post_padded, read on the device), so CTAs running together share weights.
//  1. Data-parallel rounds: the first floor(tiles / G) * G tiles, tile t on CTA t % G, whole.
//  2. Stream-K: the remaining tiles' w = tiles_left * I stage iterations (I = K / K_BLK) are cut
//     into g = min(G, w / min_it) equal ranges, CTA c taking [c w / g, (c+1) w / g), where
//     min_it = max(2, ceil(I / max_pieces)) bounds the pieces of one tile. A range may cover
//     the end of one tile, whole tiles and the start of another. A piece (part of a tile) is
//     written to the CTA's slot of `partials` (slot 0: its first segment, 1: its last); the
//     tile's counter counts arrivals and the last piece to arrive sums the pieces in CTA order
//     (a fixed order: bit-identical on every run, whichever is last), writes the output, and
//     resets the counter to zero for the next launch. Every CTA gets the same number of stage
//     iterations to within one (plus at most one whole tile): no tail wave.
// ---------------------------------------------------------------------------------------------
#pragma once

#include "lowbit_marlin.h"

namespace lowbit {
namespace mgemm {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// L2::evict_first on the weight stream (see load_stage's setup in gemm()).
constexpr bool kWeightsEvictFirst = true;

template <bool V> struct BoolTag { static constexpr bool value = V; };
template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<__nv_bfloat16> { static constexpr bool value = true; };

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

// (a & B) | C in one LOP3 (LUT 0xEA = (0xF0 & 0xCC) | 0xAA). nvcc does not fuse the `&` and the
// `|` of two different immediates by itself, because a SASS LOP3 holds only one 32-bit
// immediate; here the second constant lives in a loop-invariant register.
template <uint32_t B, uint32_t C> __device__ __forceinline__ uint32_t and_or(uint32_t a) {
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;\n" : "=r"(d) : "r"(a), "n"(B), "n"(C));
    return d;
}

// The four B-fragment registers of one Marlin word (see the header comment), dequantised and
// scaled: b[0] = nibbles (0,4), b[1] = (1,5) with scale s0 (subtile 2j); b[2] = (2,6),
// b[3] = (3,7) with scale s1 (subtile 2j+1). Every pair is (T(q_lo * s), T(q_hi * s)),
// q = u - 8 exact, one rounding (DESIGN §1/§3); bf16 pairs carry an exact extra factor 2^-j.
template <typename T> struct Dequant;

// bf16: 1 SHF + 4 LOP3 + 4 HFMA2 per word, and 3 HMUL2 per scale pair (once per group and
// stage), instead of 3 SHF + 4 LOP3 + 4 HSUB2 + 4 HMUL2.
//
// A bf16 bit pattern p < 256 has the value p * 2^-133 exactly: below 128 it is a subnormal
// (mantissa p, scale 2^-133), from 128 to 255 a normal of the smallest binade (2^-126 (1 +
// (p - 128) / 128) = p * 2^-133). So the masked nibble pair at bits [0,4) | [16,20) reads as
// (u_lo, u_hi) * 2^-133 and the pair at [4,8) | [20,24) as (u_lo, u_hi) * 2^-129, with no offset
// to remove. With S_lo = s * 2^(133-j), S_hi = s * 2^(129-j) and C = -8 s * 2^-j, one fma
//   fma(x, S, C) = RN(u s 2^-j - 8 s 2^-j) = RN((u - 8) s 2^-j) = T(q s) * 2^-j
// rounds once (PTX ISA §9.7.4.4 `fma.rn.bf16x2`: subnormal inputs are supported, there is no
// .ftz), and is exact scaling of T(q s) as long as S_lo is finite and (q s) 2^-j, C are normal.
// A fixed j cannot serve every tensor (j = 0 overflows S_lo for scales >= 2^-5), so j is per
// tensor: j = max(6, E - 121), E the largest biased exponent field among the scales
// (LowbitMarlinGemmParams::scale_exp, computed when the weights are built). Then every scale
// s < 2^(E-126) gives S_lo < 2^128 (finite), the constants are normal bf16 (2^(133-j) <= 2^127),
// and the result is exact for every scale >= 2^(j-126), i.e. down to 2^-120 of the largest scale
// (scale 0 gives +0, the reference's 0 * q is +-0: the same products in the f32 sums). The
// tensor cores' f32 sums of the scaled products are the unscaled sums times 2^-j (a power of two
// commutes with every rounding while nothing is near the f32 underflow), and the epilogue
// multiplies by 2^j, exactly. Non-finite scales give non-finite outputs (not the reference's).
struct Bf16Dequant {
    uint32_t k_lo; // (2^(133-j), 2^(133-j)); S_hi = S_lo * 2^-4 and C = S_lo * -2^-130 from it

    __device__ __forceinline__ static int shift(uint32_t biased_max) {
        const int e = biased_max > 254u ? 254 : static_cast<int>(biased_max);
        return max(6, e - 121);
    }
    __device__ __forceinline__ explicit Bf16Dequant(uint32_t biased_max) {
        const uint32_t lo = static_cast<uint32_t>(260 - shift(biased_max)) << 7;
        k_lo = lo | (lo << 16);
    }
    // 2^j = post[0] * post[1], each factor <= 2^67 (2^j itself may exceed the f32 range).
    __device__ __forceinline__ static void post(uint32_t biased_max, float post[2]) {
        const int j = shift(biased_max), j0 = j / 2;
        post[0] = __int_as_float((j0 + 127) << 23);
        post[1] = __int_as_float((j - j0 + 127) << 23);
    }
};

// a * b as fma(a, b, -0): `mul.bf16x2` needs sm_90, and adding -0 changes no product (the
// exact product rounded once; +0 + -0 = +0 under .rn).
__device__ __forceinline__ uint32_t bf16x2_mul(uint32_t a, uint32_t b) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));
    return d;
}
__device__ __forceinline__ uint32_t bf16x2_fma(uint32_t a, uint32_t b, uint32_t c) {
    uint32_t d;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
// (x.lo, x.lo) and (x.hi, x.hi) of a bf16 pair: written as the bf16 intrinsics (a PTX unpack and
// pack), which ptxas folds into the .H0_H0 / .H1_H1 operand selectors of the HFMA2 that uses them
// (a __byte_perm stays a PRMT).
__device__ __forceinline__ uint32_t pair_lo(uint32_t x) {
    return bits_of(__low2bfloat162(from_bits<__nv_bfloat162>(x)));
}
__device__ __forceinline__ uint32_t pair_hi(uint32_t x) {
    return bits_of(__high2bfloat162(from_bits<__nv_bfloat162>(x)));
}

template <> struct Dequant<__nv_bfloat16> {
    // The factors of one scale pair (s_a, s_b) (two n8 subtiles): S_lo, S_hi, C as pairs.
    struct Factors {
        uint32_t lo, hi, c;
    };
    // S_lo = s * 2^(133-j) is exact (a power of two, finite by the choice of j); S_hi and C are
    // exact multiples of it by powers of two (2^-4, -2^-130: a bf16 subnormal), so each is the
    // single rounding of s * 2^(129-j) and -8 s * 2^-j, exact while those are normal.
    static __device__ __forceinline__ Factors factors(uint32_t s2, const Bf16Dequant &d) {
        const uint32_t lo = bf16x2_mul(s2, d.k_lo);
        return {lo, bf16x2_mul(lo, 0x3d803d80u), bf16x2_mul(lo, 0x80088008u)};
    }
    // Subtile 2j takes the low scale of the pair, 2j+1 the high one.
    static __device__ __forceinline__ void word(uint32_t w, const Factors &f, uint32_t b[4]) {
        const uint32_t w8 = w >> 8;
        const uint32_t c0 = pair_lo(f.c), c1 = pair_hi(f.c);
        b[0] = bf16x2_fma(w & 0x000f000fu, pair_lo(f.lo), c0);
        b[1] = bf16x2_fma(w & 0x00f000f0u, pair_lo(f.hi), c0);
        b[2] = bf16x2_fma(w8 & 0x000f000fu, pair_hi(f.lo), c1);
        b[3] = bf16x2_fma(w8 & 0x00f000f0u, pair_hi(f.hi), c1);
    }
};

// f16: 1 SHF + 4 LOP3 per word (IST Marlin's trick). The low nibble of each byte is OR-ed into
// 1024.0 (0x6400, ulp 1): 1024 + u, and (1024 + u) - 1032 = q exactly. The high nibble is
// masked in place (0x00f0: mantissa bits 4..7, f16 has 10): 1024 + 16u, exact; then
// fma(1024 + 16u, 1/16, -72) = 64 + u - 72 = q: 1/16 (0x2c00) and -72 (0xd480) are exact f16,
// the exact result q is an integer in [-8, 7], so the fma's one rounding is exact too (q = 0
// gives +0, as the subtraction does). The multiply by the scale is then the same single rounding
// as on the bf16 path: bit-identical weights T(q * s).
template <> struct Dequant<__half> {
    using T2 = __half2;
    static __device__ __forceinline__ uint32_t lo(uint32_t biased) { // 1024 + u -> q
        return bits_of(__hsub2_rn(from_bits<T2>(biased), from_bits<T2>(0x64086408u)));
    }
    static __device__ __forceinline__ uint32_t hi(uint32_t biased) { // 1024 + 16u -> q
        return bits_of(__hfma2(from_bits<T2>(biased), from_bits<T2>(0x2c002c00u), from_bits<T2>(0xd480d480u)));
    }
    static __device__ __forceinline__ void word(uint32_t w, T2 s0, T2 s1, uint32_t b[4]) {
        const uint32_t w8 = w >> 8;
        b[0] = bits_of(__hmul2_rn(from_bits<T2>(lo(and_or<0x000f000fu, 0x64006400u>(w))), s0));
        b[1] = bits_of(__hmul2_rn(from_bits<T2>(hi(and_or<0x00f000f0u, 0x64006400u>(w))), s0));
        b[2] = bits_of(__hmul2_rn(from_bits<T2>(lo(and_or<0x000f000fu, 0x64006400u>(w8))), s1));
        b[3] = bits_of(__hmul2_rn(from_bits<T2>(hi(and_or<0x00f000f0u, 0x64006400u>(w8))), s1));
    }
};

// The pair (x.lo, x.lo) / (x.hi, x.hi) of a 32-bit pair of scales.
__device__ __forceinline__ __half2 bcast_lo(__half2 x) { return __low2half2(x); }
__device__ __forceinline__ __half2 bcast_hi(__half2 x) { return __high2half2(x); }
__device__ __forceinline__ __nv_bfloat162 bcast_lo(__nv_bfloat162 x) { return __low2bfloat162(x); }
__device__ __forceinline__ __nv_bfloat162 bcast_hi(__nv_bfloat162 x) { return __high2bfloat162(x); }

// ---- PTX wrappers ------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// A value the compiler must keep in a register instead of recomputing it at every use: NVVM
// rematerialises %tid-derived addresses inside the unrolled main loop (an S2R plus the index
// arithmetic per use), which costs ALU issue slots on every stage.
__device__ __forceinline__ uint32_t pinned(uint32_t x) {
    asm volatile("mov.b32 %0, %0;\n" : "+r"(x));
    return x;
}

// 16-byte global -> shared copy to shared address `dst`; src_bytes 16, or 0: zero-fills the
// destination without reading (the source must still be a valid address of the buffer).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, uint32_t src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes));
}
// The same with an L2 cache policy (from createpolicy).
__device__ __forceinline__ void cp_async16_hint(uint32_t dst, const void *src, uint32_t src_bytes, uint64_t policy) {
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;\n" ::"r"(dst), "l"(src),
                 "r"(src_bytes), "l"(policy));
}
// L2 policies: evict_first for data streamed exactly once (the weights at M <= 64), evict_normal
// otherwise.
__device__ __forceinline__ uint64_t l2_policy(bool evict_first) {
    uint64_t p;
    if (evict_first)
        asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(p));
    else
        asm volatile("createpolicy.fractional.L2::evict_normal.b64 %0, 1.0;\n" : "=l"(p));
    return p;
}
__device__ __forceinline__ void st_shared_zero16(uint32_t addr) {
    asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t r[4], uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
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

__device__ __forceinline__ uint2 ld_cg_u2(const void *p) {
    uint2 v;
    asm volatile("ld.global.cg.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
    return v;
}

// The fused top-k sum (LowbitMarlinGemmParams::sum_out): whether slot s is local.
__device__ __forceinline__ bool sum_slot_local(const LowbitMarlinGemmParams &p, int64_t s) {
    const int32_t id = __ldg(p.topk_ids + s);
    if (id < 0 || id >= p.global_experts) return false;
    return p.expert_map == nullptr || __ldg(p.expert_map + id) >= 0;
}
__device__ __forceinline__ int sum_local_slots(const LowbitMarlinGemmParams &p, int64_t t) {
    int n = 0;
    for (int64_t k = 0; k < p.sum_topk; ++k) n += sum_slot_local(p, t * p.sum_topk + k);
    return n;
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

    // ---- the work of this CTA (see "Schedule" in the header) ----
    const int64_t iters64 = K / K_BLK; // stage iterations per tile (32-bit: K / 64 < 2^31)
    if (iters64 > 0x7fffffff || iters64 < 1) __trap();
    const int iters = static_cast<int>(iters64);
    // The schedule's scalars live in shared memory (thread 0 computes them and advances the
    // segment cursor; everyone reads the segment after a barrier): none of it occupies registers
    // across the main loop.
    __shared__ long long s_tiles_dp, s_w_sk, s_g_sk, s_row_blocks, s_used, s_next_dp, s_next_x;
    __shared__ long long s_seg_mb, s_seg_nb, s_seg_first;
    __shared__ int s_seg_it0, s_seg_it1, s_seg_slot, s_seg_count, s_seg_first_slot;
    if (tid == 0) {
        int64_t row_blocks = p.m_blocks; // row blocks with work
        int64_t used = 0;
        if constexpr (MOE) {
            // MoE: the routing blocks of the used prefix of sorted_token_ids.
            used = static_cast<int64_t>(__ldg(p.num_tokens_post_padded));
            used = used < 0 ? 0 : (used > p.capacity ? p.capacity : used);
            const int64_t b = (used + p.block_size - 1) / p.block_size;
            row_blocks = b < p.m_blocks ? b : p.m_blocks;
        }
        const int64_t tiles = row_blocks * n_blocks;
        const int64_t G = gridDim.x, cta = blockIdx.x;
        const int64_t dp_tiles = (tiles / G) * G;        // whole tiles, round-robin over the CTAs
        const int64_t w_sk = (tiles - dp_tiles) * iters; // stream-K iterations of the rest
        const int min_it = p.max_pieces > 1 ? max(2, (iters + p.max_pieces - 1) / p.max_pieces) : iters;
        const int64_t g_sk = w_sk == 0 ? 0 : max(int64_t(1), min(G, w_sk / min_it));
        s_row_blocks = row_blocks;
        s_used = used;
        s_tiles_dp = dp_tiles;
        s_w_sk = w_sk;
        s_g_sk = g_sk;
        s_next_dp = cta;
        s_next_x = cta < g_sk ? cta * w_sk / g_sk : 0;
    }

    const T *A = static_cast<const T *>(p.a);
    const int64_t groups = K / p.group;
    // Grouped scales: group is 32, 64 or 128 (a power of two); shift instead of dividing.
    const int gshift = __ffsll(static_cast<long long>(p.group)) - 1;
    const bool channelwise = p.channelwise != 0;
    constexpr bool kBf16 = IsBf16<T>::value;
    // bf16: the fused dequantisation's constants from the scales' range (see Dequant<bf16>).
    const Bf16Dequant bdq(kBf16 ? __ldg(p.scale_exp) : 0u);

    if constexpr (MOE) {
        // Fused top-k sum: tokens with no local slot get zero rows (no tile will sum them).
        if (p.sum_out != nullptr) {
            T *so = static_cast<T *>(p.sum_out);
            for (int64_t t = blockIdx.x; t < p.sum_tokens; t += gridDim.x) {
                if (sum_local_slots(p, t) != 0) continue; // uniform: every thread reads the same ids
                for (int64_t i = tid; i < N; i += kThreads) so[t * N + i] = static_cast<T>(0.0f);
            }
        }
    }

#pragma unroll 1
    for (;;) {
    __syncthreads(); // the previous segment's epilogue is done with shared memory
    if (tid == 0) {
        const int64_t G = gridDim.x, cta = blockIdx.x;
        const int64_t dp_tiles = s_tiles_dp, w_sk = s_w_sk, g_sk = s_g_sk, row_blocks = s_row_blocks;
        // The CTA owning stream-K iteration x: [start(c), start(c + 1)) with start(c) = c w / g.
        auto sk_start = [&](int64_t c) { return c * w_sk / g_sk; };
        auto sk_owner = [&](int64_t x) { return ((x + 1) * g_sk + w_sk - 1) / w_sk - 1; };
        long long t = -1;
        int it0 = 0, it1 = iters, slot = -1, count = 1, first_slot = 0;
        long long first = 0;
        if (s_next_dp < dp_tiles) {
            t = s_next_dp;
            s_next_dp += G;
        } else if (cta < g_sk && s_next_x < sk_start(cta + 1)) {
            const int64_t x = s_next_x, hi = sk_start(cta + 1);
            const int64_t ts = x / iters;
            it0 = static_cast<int>(x - ts * iters);
            it1 = static_cast<int>(min(int64_t(iters), hi - ts * iters));
            t = dp_tiles + ts;
            s_next_x = ts * iters + it1;
            if (it0 != 0 || it1 != iters) { // a piece: summed by the last of its tile to arrive
                slot = static_cast<int>(2 * cta + (x == sk_start(cta) ? 0 : 1));
                first = sk_owner(ts * iters);
                count = static_cast<int>(sk_owner((ts + 1) * iters - 1) - first + 1);
                first_slot = sk_start(first) == ts * iters ? 0 : 1;
            }
        }
        // Tile t -> (row block, column block), row blocks fastest: the CTAs that run together
        // share column blocks, so a weight stripe read from HBM serves every row block from L2.
        s_seg_mb = t < 0 ? -1 : t % row_blocks;
        s_seg_nb = t < 0 ? -1 : t / row_blocks;
        s_seg_it0 = it0;
        s_seg_it1 = it1;
        s_seg_slot = slot;
        s_seg_count = count;
        s_seg_first = first;
        s_seg_first_slot = first_slot;
    }
    __syncthreads();
    const int64_t mb = s_seg_mb, nb = s_seg_nb;
    if (mb < 0) break; // uniform: no work left
    const int it0 = s_seg_it0, n_it = s_seg_it1 - s_seg_it0;
    const int32_t *B = p.b;
    const T *S = static_cast<const T *>(p.scales);

    // ---- rows of this block (and, for MoE, its expert) ----
    int64_t moe_start = 0, used = 0;
    if constexpr (MOE) {
        used = s_used;
        moe_start = mb * p.block_size; // < used: mb < row_blocks
        const int e = __ldg(p.expert_ids + mb);
        if (e < 0 || e >= p.num_experts) continue;                 // uniform: -1 or corrupt: skip, never read
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

    // ---- shared memory map: slot s of a stream at its base + s * its stage bytes ----
    constexpr uint32_t B_BYTES = B_WORDS * 4, A_BYTES = A_ELEMS * 2, S_BYTES = S_ELEMS * 2;
    constexpr uint32_t A_OFF = STAGES * B_BYTES, S_OFF = STAGES * (B_BYTES + A_BYTES);
    const uint32_t sbase = smem_addr(smem);

    // ---- per-thread copy state, set up once. Copy i of a later stage is the same copy moved
    // by a loop-invariant stride, and its shared destination is a compile-time offset from the
    // slot base: no index arithmetic per copy (review §2.6 #1). A copy whose source lies past
    // the edge of the matrix (an n-tile >= N, a zero row) is the same in every stage: its
    // shared chunk is zeroed once in every slot below and the copy is never issued. Its source
    // pointer still points inside the buffer (n-tile 0 / row 0 of the same K-rows). ----
    // B: copy i of thread tid is k16 tile kt = tid / (32 * N_TILES / B_ITERS), n-tile
    // nt = B_ITERS * ((tid / 32) % (N_TILES / B_ITERS)) + i, 16-byte chunk tid % 32: the copies
    // of one thread are adjacent n-tiles of one k16 row, 512 B apart in global and in shared.
    constexpr int B_CHUNKS = K_TILES * N_TILES * 32;
    static_assert(B_CHUNKS % kThreads == 0, "whole B copies per thread");
    constexpr int B_ITERS = B_CHUNKS / kThreads;
    static_assert(N_TILES % B_ITERS == 0, "B copies of a thread share a k16 row");
    constexpr int B_GROUPS = N_TILES / B_ITERS; // n-tile groups per k16 row
    const int64_t row_words = 2 * N;            // int32 per k16 row of tiles of the Marlin qweight
    const int32_t *gB;
    bool b_ok[B_ITERS];
    uint32_t b_dst;
    {
        const int kt = tid / (32 * B_GROUPS), nt0 = B_ITERS * ((tid / 32) % B_GROUPS), c = tid % 32;
        const int64_t gnt0 = nb * N_TILES + nt0;
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) b_ok[i] = (gnt0 + i) * 64 < N;
        gB = B + (int64_t(it0) * K_TILES + kt) * row_words + (b_ok[0] ? gnt0 * 128 : 0) + 4 * c;
        b_dst = pinned(sbase + ((kt * N_TILES + nt0) * 128 + 4 * c) * 4);
    }
    const int64_t b_stage = int64_t(K_TILES) * row_words;
    // Weights are streamed exactly once when one row block covers M (dense): evict_first would
    // keep them out of the way of the activations and partials in L2 (MoE re-reads an expert for
    // each of its routing blocks, M > 64 re-reads B per row block: normal priority there). A hint
    // only: results cannot change (lowbit-sim accepts and ignores the policy).
    uint64_t b_policy = 0;
    if constexpr (kWeightsEvictFirst) b_policy = l2_policy(!MOE && p.m_blocks == 1);

    // A: chunk q = tid + 256 i is row q / A_CHUNKS, chunk q % A_CHUNKS, stored at chunk position
    // c ^ (r % 8); 256 / A_CHUNKS rows (a multiple of 8) per i, so copy i lands 4096 B after copy 0.
    constexpr int A_TOTAL = M_BLK * A_CHUNKS;
    constexpr int A_ITERS = (A_TOTAL + kThreads - 1) / kThreads;
    static_assert(kThreads % A_CHUNKS == 0 && (kThreads / A_CHUNKS) % 8 == 0, "A copy stride");
    static_assert(A_TOTAL % 32 == 0, "whole warps per A copy");
    const T *gA[A_ITERS];
    bool a_in[A_ITERS], a_ok[A_ITERS]; // chunk exists in the tile / its row is a real row
    uint32_t a_dst;
    {
        const int c = tid % A_CHUNKS;
        const int r0 = tid / A_CHUNKS;
        a_dst = pinned(sbase + A_OFF + (r0 * K_BLK + 8 * (c ^ (r0 & 7))) * 2);
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            const int r = r0 + i * (kThreads / A_CHUNKS);
            a_in[i] = A_TOTAL % kThreads == 0 || i + 1 < A_ITERS || tid < A_TOTAL - (A_ITERS - 1) * kThreads;
            const long long row = a_in[i] ? s_src[r] : -1;
            a_ok[i] = row >= 0;
            gA[i] = A + (row >= 0 ? row * p.lda : 0) + int64_t(it0) * K_BLK + 8 * c;
        }
    }
    // S (grouped): chunk tid is scale row tid / (N_TILES*8) of the stage, n-tile
    // (tid/8) % N_TILES, chunk tid % 8 (shared byte 16 tid). The stage's first row is
    // (it * K_BLK) >> gshift (group 32/64/128, a power of two): it advances by K_BLK / group
    // rows every stage (group <= K_BLK), or by one row every group / K_BLK = 2 stages
    // (g = 128 with 64-deep stages). Load j of this block (stage it0 + j) goes to slot
    // j % STAGES, and STAGES is even, so the slot's parity is j's: the advance after a load is
    // s_adv[slot & 1], with no counter.
    static_assert(STAGES % 2 == 0, "S advance by slot parity");
    constexpr int S_PER_ROW = N_TILES * 8;
    const int s_rows = p.group < K_BLK ? static_cast<int>(K_BLK >> gshift) : 1;
    const bool s_copy = !channelwise && tid < s_rows * S_PER_ROW;
    int64_t s_adv[2] = {0, 0}; // channelwise: no scale loads
    if (channelwise) {
    } else if (p.group > K_BLK) {
        if (p.group != 2 * K_BLK) __trap(); // groups are 32/64/128 (host-checked), K_BLK >= 64
        // after load j the next stage it0 + j + 1 starts a new group iff it is even
        s_adv[0] = ((it0 + 1) & 1) == 0 ? N : 0; // j even
        s_adv[1] = (it0 & 1) == 0 ? N : 0;       // j odd
    } else {
        s_adv[0] = s_adv[1] = (K_BLK >> gshift) * N;
    }
    const T *gS;
    bool s_ok;
    const uint32_t sc_dst = pinned(sbase + S_OFF + 16 * tid);
    {
        const int gi = tid / S_PER_ROW, nt = (tid / 8) % N_TILES, c = tid % 8;
        const int64_t gnt = nb * N_TILES + nt;
        s_ok = gnt * 64 < N;
        gS = S + ((int64_t(it0) * K_BLK) >> gshift) * N + (s_copy ? gi * N : 0) + (s_ok ? gnt * 64 : 0) + 8 * c;
    }

    // Zero, once, the shared chunks of the copies that are never issued (see above).
#pragma unroll
    for (int slot = 0; slot < STAGES; ++slot) {
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i)
            if (!b_ok[i]) st_shared_zero16(b_dst + slot * B_BYTES + i * 512);
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i)
            if (a_in[i] && !a_ok[i]) st_shared_zero16(a_dst + slot * A_BYTES + i * 4096);
        if (s_copy && !s_ok) st_shared_zero16(sc_dst + slot * S_BYTES);
    }

    // `full`: BoolTag<true> when every B copy of the block is in range (the column block lies
    // inside N), so the copies need no predicate.
    auto load_stage = [&](int slot, auto full) {
#pragma unroll
        for (int i = 0; i < B_ITERS; ++i) {
            if (decltype(full)::value || b_ok[i]) {
                if constexpr (kWeightsEvictFirst)
                    cp_async16_hint(b_dst + slot * B_BYTES + i * 512, gB + 128 * i, 16, b_policy);
                else
                    cp_async16(b_dst + slot * B_BYTES + i * 512, gB + 128 * i, 16);
            }
        }
        gB += b_stage;
#pragma unroll
        for (int i = 0; i < A_ITERS; ++i) {
            if (a_ok[i]) cp_async16(a_dst + slot * A_BYTES + i * 4096, gA[i], 16);
            gA[i] += K_BLK;
        }
        if (s_copy && s_ok) cp_async16(sc_dst + slot * S_BYTES, gS, 16);
        gS += s_adv[slot & 1];
    };

    // ---- channelwise scales: one row, written once into row 0 of every stage's scale slot in
    // the grouped order (position 8x + b of an n-tile holds its column x + 8b), so the compute
    // reads both kinds the same way; no stage load ever overwrites them. ----
    if (channelwise) {
        for (int e = tid; e < N_BLK; e += kThreads) {
            const int nt = e / 64, x = (e % 64) / 8, b = e % 8;
            const int64_t tile_col = nb * N_BLK + 64 * nt;
            const T s = tile_col < N ? S[tile_col + channelwise_pos(x + 8 * b)] : static_cast<T>(0.0f);
            T *sS = reinterpret_cast<T *>(smem + S_OFF);
#pragma unroll
            for (int slot = 0; slot < STAGES; ++slot) sS[slot * S_ELEMS + e] = s;
        }
    }

    float acc[M_TILES][8][4];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int b = 0; b < 8; ++b)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][b][e] = 0.0f;

    // ---- this warp's share of one resident stage: k16 tiles kt = wk + t * WARPS_K ----
    // Per-thread shared read offsets (bytes within a slot), set once.
    uint32_t rB[KT_PER_WARP], rS[KT_PER_WARP], rA[KT_PER_WARP];
#pragma unroll
    for (int t = 0; t < KT_PER_WARP; ++t) {
        const int kt = wk + t * WARPS_K;
        rB[t] = pinned(((kt * N_TILES + wn) * 128 + 4 * lane) * 4);
        // The scale row of k16 tile kt within the stage: group >= 32 and K_BLK is a multiple of
        // the group or smaller than it, so this is (k0 + 16 kt) / group - k0 / group.
        const int gl = channelwise ? 0 : (16 * kt) >> gshift;
        rS[t] = pinned((gl * N_BLK + wn * 64 + 8 * (lane / 4)) * 2);
        const int r = lane & 15, c = 2 * kt + (lane >> 4);
        // m16 tile mt adds 16 * mt rows (the same r % 8)
        rA[t] = pinned(sbase + A_OFF + (r * K_BLK + 8 * (c ^ (r & 7))) * 2);
    }
    // `one_group`: BoolTag<true> when all k16 tiles of a stage share one scale row (group >=
    // K_BLK, or channelwise): the scales (and the bf16 factors) are read once per stage.
    auto compute = [&](int slot, auto one_group) {
        uint32_t s4[4];
        [[maybe_unused]] typename Dequant<__nv_bfloat16>::Factors f[4]; // bf16 only
#pragma unroll
        for (int t = 0; t < KT_PER_WARP; ++t) {
            const uint4 words = *reinterpret_cast<const uint4 *>(smem + slot * B_BYTES + rB[t]);
            if (t == 0 || !decltype(one_group)::value) {
                const uint4 sraw = *reinterpret_cast<const uint4 *>(smem + S_OFF + slot * S_BYTES + rS[t]);
                s4[0] = sraw.x, s4[1] = sraw.y, s4[2] = sraw.z, s4[3] = sraw.w;
                if constexpr (kBf16) {
#pragma unroll
                    for (int h = 0; h < 4; ++h) f[h] = Dequant<__nv_bfloat16>::factors(s4[h], bdq);
                }
            }
            uint32_t af[M_TILES][4];
#pragma unroll
            for (int mt = 0; mt < M_TILES; ++mt)
                ldmatrix_x4(af[mt], rA[t] + slot * A_BYTES + mt * (16 * K_BLK * 2));
            const uint32_t w4[4] = {words.x, words.y, words.z, words.w};
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                uint32_t b[4];
                if constexpr (kBf16) {
                    Dequant<__nv_bfloat16>::word(w4[j], f[j], b);
                } else {
                    // (s, s) pairs of the columns lane/4 + 8 (2j) and lane/4 + 8 (2j + 1)
                    Dequant<T>::word(w4[j], bcast_lo(from_bits<T2>(s4[j])), bcast_hi(from_bits<T2>(s4[j])), b);
                }
#pragma unroll
                for (int mt = 0; mt < M_TILES; ++mt) {
                    H::mma(acc[mt][2 * j], af[mt], b[0], b[1]);
                    H::mma(acc[mt][2 * j + 1], af[mt], b[2], b[3]);
                }
            }
        }
    };

    // ---- main loop: wait for stage i, prefetch stage i + STAGES - 1 into the slot freed by
    // i - 1. Unrolled over STAGES so that every slot offset is a compile-time constant. ----
    auto pipeline = [&](auto full, auto one_group) {
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < n_it) load_stage(s, full);
            cp_async_commit(); // always commit: group i is stage i
        }
        // Steady state: every stage of the unrolled body and its prefetch exist (no bound checks).
        int i0 = 0;
#pragma unroll 1
        for (; i0 + 2 * STAGES - 1 <= n_it; i0 += STAGES) {
#pragma unroll
            for (int s = 0; s < STAGES; ++s) {
                cp_async_wait<STAGES - 2>(); // groups 0..i complete (this thread's copies)
                __syncthreads();             // ... and everyone's; slot (i-1) % STAGES is no longer read
                load_stage((s + STAGES - 1) % STAGES, full);
                cp_async_commit();
                compute(s, one_group);
            }
        }
        // The last < 2 STAGES - 1 stages, checked; i0 is a multiple of STAGES.
#pragma unroll 1
        for (; i0 < n_it; i0 += STAGES) {
#pragma unroll
            for (int s = 0; s < STAGES; ++s) {
                if (i0 + s >= n_it) break;
                cp_async_wait<STAGES - 2>();
                __syncthreads();
                if (i0 + s + STAGES - 1 < n_it) load_stage((s + STAGES - 1) % STAGES, full);
                cp_async_commit();
                compute(s, one_group);
            }
        }
    };
    // Column blocks inside N (all of them when N % N_BLK == 0) run the copy loop unpredicated;
    // the one edge block of an N % N_BLK != 0 shape takes the general path.
    if ((nb + 1) * N_BLK > N)
        pipeline(BoolTag<false>{}, BoolTag<false>{});
    else if (channelwise || p.group >= K_BLK)
        pipeline(BoolTag<true>{}, BoolTag<true>{});
    else
        pipeline(BoolTag<true>{}, BoolTag<false>{});
    cp_async_wait<0>();
    __syncthreads(); // the pipeline space is free: reuse it for the epilogue tile

    if constexpr (kBf16) { // undo the 2^-j of the bf16 dequantisation: exact (powers of two)
        float post[2];
        Bf16Dequant::post(__ldg(p.scale_exp), post);
#pragma unroll
        for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int b = 0; b < 8; ++b)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc[mt][b][e] = acc[mt][b][e] * post[0] * post[1];
    }

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
    auto weighted = [&](int r, float4 v) {
        if constexpr (MOE) {
            const float w = s_wt[r];
            v.x *= w; v.y *= w; v.z *= w; v.w *= w;
        }
        return v;
    };
    const int slot = s_seg_slot;
    const int64_t n0 = s_seg_nb * N_BLK; // re-read: not kept in a register across the main loop
    // The fused top-k sum, after this tile's rows are stored: each row bumps its token's counter
    // for this column block; the row completing a token sums the token's local slots in k order.
    auto token_sums = [&]() {
        if constexpr (MOE) {
            if (p.sum_out == nullptr) return;
            __threadfence(); // this thread's output stores are visible device-wide ...
            __syncthreads(); // ... for every thread, before the counters move
            if (tid < M_BLK) {
                long long fin = -1;
                const long long dst = s_dst[tid];
                if (dst >= 0) {
                    const long long t = dst / p.sum_topk;
                    int *ctr = p.sum_counters + t * n_blocks + s_seg_nb;
                    if (atomicAdd(ctr, 1) == sum_local_slots(p, t) - 1) {
                        atomicExch(ctr, 0); // all of the token's slots arrived: ready for the next launch
                        fin = t;
                    }
                }
                s_src[tid] = fin; // s_src is free after the main loop
            }
            __syncthreads();
            __threadfence();
            T *so = static_cast<T *>(p.sum_out);
            const T *rows = static_cast<const T *>(p.out);
            for (int q = tid; q < VECS; q += kThreads) {
                const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
                const long long t = s_src[r];
                if (t < 0 || n0 + c >= N) continue;
                float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
                for (int64_t k = 0; k < p.sum_topk; ++k) {
                    const int64_t sl = t * p.sum_topk + k;
                    if (!sum_slot_local(p, sl)) continue;
                    const uint2 v = ld_cg_u2(rows + sl * N + n0 + c);
                    const T2 lo = from_bits<T2>(v.x), hi = from_bits<T2>(v.y);
                    acc.x += __low2float(lo); acc.y += __high2float(lo);
                    acc.z += __low2float(hi); acc.w += __high2float(hi);
                }
                uint2 packed;
                packed.x = bits_of(H::pair(acc.x, acc.y));
                packed.y = bits_of(H::pair(acc.z, acc.w));
                *reinterpret_cast<uint2 *>(so + t * N + n0 + c) = packed;
            }
        }
    };
    if (slot < 0) { // a whole tile
        for (int q = tid; q < VECS; q += kThreads) {
            const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
            const long long dst = s_dst[r];
            if (dst < 0 || n0 + c >= N) continue;
            store4(dst, n0 + c, weighted(r, *reinterpret_cast<const float4 *>(sC + r * C_STRIDE + c)));
        }
        token_sums();
        continue;
    }
    // A stream-K piece: publish it in this CTA's slot; the last piece of the tile to arrive sums
    // all of them in CTA order (a fixed order: bit-identical whichever arrives last).
    const int64_t tile = s_seg_mb * n_blocks + s_seg_nb;
    const int64_t tile_elems = int64_t(M_BLK) * N_BLK;
    for (int q = tid; q < VECS; q += kThreads) {
        const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
        if (s_dst[r] < 0 || n0 + c >= N) continue;
        *reinterpret_cast<float4 *>(p.partials + slot * tile_elems + r * N_BLK + c) =
            *reinterpret_cast<const float4 *>(sC + r * C_STRIDE + c);
    }
    __threadfence(); // this thread's partial stores are visible device-wide ...
    __syncthreads(); // ... for every thread, before the counter moves
    const int count = s_seg_count;
    if (tid == 0) {
        const int prev = atomicAdd(p.counters + tile, 1);
        s_last = prev == count - 1;
        if (s_last) atomicExch(p.counters + tile, 0); // all pieces arrived: ready for the next launch
    }
    __syncthreads();
    if (!s_last) continue;
    __threadfence();
    const float *first = p.partials + (2 * s_seg_first + s_seg_first_slot) * tile_elems;
    for (int q = tid; q < VECS; q += kThreads) {
        const int r = q / (N_BLK / 4), c = 4 * (q % (N_BLK / 4));
        const long long dst = s_dst[r];
        if (dst < 0 || n0 + c >= N) continue;
        // Piece j > 0 is the first segment (slot 0) of CTA first + j.
        float4 sum = ld_cg_f4(first + r * N_BLK + c);
        const float *src = p.partials + (2 * (s_seg_first + 1)) * tile_elems + r * N_BLK + c;
        for (int j = 1; j < count; ++j, src += 2 * tile_elems) {
            const float4 v = ld_cg_f4(src);
            sum.x += v.x; sum.y += v.y; sum.z += v.z; sum.w += v.w;
        }
        store4(dst, n0 + c, weighted(r, sum));
    }
    token_sums();
    } // segments
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
