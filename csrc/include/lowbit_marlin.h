/* Marlin W4A16 (DESIGN §3 Marlin layout, §4 GEMM). */
#ifndef LOWBIT_MARLIN_H
#define LOWBIT_MARLIN_H

#include <stdint.h>

/* A Marlin tile: 16 K-rows x 64 N-columns, 128 int32 words. */
#define LOWBIT_MARLIN_TILE_K 16
#define LOWBIT_MARLIN_TILE_N 64
#define LOWBIT_MARLIN_TILE_WORDS 128

/* ---- Marlin layout kernels (csrc/marlin/layout.cuh) ----
 * Every kernel treats `batch` matrices stored back to back (stacked MoE experts; 1 for a plain
 * linear layer). Within one matrix: GPTQ qweight is [k/8, n], compressed-tensors weight_packed
 * [n, k/8], Marlin qweight [k/16, 2n] (DESIGN §3). k % 16 == 0, n % 64 == 0. */

/* Word repack between GPTQ / compressed-tensors and Marlin, either direction.
 * Forward (to Marlin): Marlin K-row r holds source K-row perm[r] when perm is non-null.
 * Inverse with act-order (the gather kernels): `perm` holds the INVERSE permutation
 * (inv[perm[r]] = r), so source row s is read from Marlin row inv[s]. */
typedef struct LowbitMarlinLayoutParams {
    const int32_t *src;
    const int32_t *perm;    /* [k] (shared by the batch), or null */
    int32_t *dst;
    int64_t batch;
    int64_t k;
    int64_t n;
} LowbitMarlinLayoutParams;

/* Scale permutation of 16-bit scales (bits are moved, never converted).
 * Marlin side: [groups, n] permuted in chunks (64-element 8x8 transpose when channelwise == 0,
 * the 32-element single permutation when channelwise == 1). The other side is GPTQ order
 * [groups, n] when ct == 0, compressed-tensors order [n, groups] when ct == 1. */
typedef struct LowbitMarlinLayoutScalesParams {
    const void *src;
    void *dst;
    int64_t batch;
    int64_t groups;         /* k / group */
    int64_t n;
    int32_t channelwise;
    int32_t ct;
} LowbitMarlinLayoutScalesParams;

/* One-pass weight sync: weights [n, k] (row-major, the HF [out, in] layout) -> Marlin qweight
 * [k/16, 2n] and Marlin-permuted scales [k/group, n], with the quantization math of DESIGN §3.
 * Groups of 32/64/128 compute their scales inline; any other group (channelwise, group == k)
 * reads the scales a previous row-scale pass wrote into `scales` (already permuted). */
typedef struct LowbitMarlinSyncParams {
    const void *w;
    int32_t *qweight;
    void *scales;
    unsigned long long *status; /* LOWBIT_STATUS_WORDS words (indices are per batch-flattened
                                 * element / group), or null: no checking */
    uint32_t *scale_exp;        /* the kernels that write scales max into it the biased exponent
                                 * fields of what they write (as lowbit_marlin_scale_exp_b16: the
                                 * caller zeroes it first), or null */
    int64_t batch;
    int64_t n;
    int64_t k;
    int64_t group;
    int32_t channelwise;        /* scale permutation: 1 when group == k */
    int32_t pad_;
} LowbitMarlinSyncParams;

/* The largest biased exponent field ((bits >> 7) & 0xff, the bf16 layout) among `count` 16-bit
 * scales, max-ed into *out (which the caller zeroes first): the bf16 GEMM's scale range
 * (LowbitMarlinGemmParams::scale_exp). */
typedef struct LowbitMarlinScaleExpParams {
    const uint16_t *scales;
    uint32_t *out;
    int64_t count;
} LowbitMarlinScaleExpParams;

/* ---- Marlin W4A16 GEMM (csrc/marlin/gemm.cuh), dense and MoE ----
 * out[row, n] = sum_k A[src_row, k] * T(q[k, n] * s[group(k), n]), f32 accumulation, T output.
 * Weights: Marlin qweight [k/16, 2n] (MoE: [num_experts, k/16, 2n]), scales [k/group, n] in the
 * Marlin permutation (MoE: per expert). Dense rows: src_row = dst_row = row < m. MoE rows come
 * from sorted_token_ids (see LowbitMarlinGemmParams::sorted_token_ids).
 * Kernel names: lowbit_marlin_gemm_<dtype>_m<m_tiles>_<cfg> and lowbit_marlin_moe_gemm_<...>,
 * with cfg n128k128 (block tile 128 columns, 128-deep stages) or n256k64. */
typedef struct LowbitMarlinGemmParams {
    const void *a;          /* activations (T): dense [m, lda]; MoE [m (= a_rows), k] (lda == k) */
    const int32_t *b;       /* Marlin qweight */
    const void *scales;     /* Marlin-permuted scales (T) */
    const uint32_t *scale_exp; /* bf16: device scalar, the largest biased exponent field among the
                                * scales (lowbit_marlin_scale_exp_b16 over all of them, MoE: every
                                * expert); sets the fused dequantisation's range (gemm.cuh
                                * "Dequant<bf16>"). Unused by f16 (may be null). */
    void *out;              /* dense [m, n]; MoE [out_rows, n] (T) */
    float *partials;        /* stream-K pieces [2 * gridDim.x, m_blk, n_blk] (2 slots per CTA), or null
                             * when no tile can be cut (every tile whole: tiles % gridDim.x == 0) */
    int32_t *counters;      /* stream-K arrival counters [m_blocks * n_blocks]: zero before and after
                             * each launch (null with partials) */
    const int32_t *sorted_token_ids;      /* MoE: [capacity]; slot value = token * top_k + j, or padding (>= out_rows) */
    const int32_t *expert_ids;            /* MoE: [capacity / block_size]; -1 (or out of range) = skip the block */
    const int32_t *num_tokens_post_padded; /* MoE: device scalar, the used prefix of sorted_token_ids */
    const float *topk_weights;            /* MoE: [out_rows] router weights multiplied into the output, or null */
    int64_t m;              /* dense: rows of A and out; MoE: rows of A (a_rows) */
    int64_t n;              /* output columns, % 64 == 0 */
    int64_t k;              /* reduction length, % 64 == 0 (the kernel's stage depth divides it) */
    int64_t lda;            /* row stride of A in elements, >= k, % 8 == 0 */
    int64_t group;          /* K-rows per scale group: 32/64/128, or k when channelwise */
    int64_t m_blocks;       /* dense: ceil(m / (16 * m_tiles)); MoE: capacity / block_size */
    int64_t out_rows;       /* MoE: rows of out (sorted ids >= out_rows are padding) */
    int64_t top_k;          /* MoE: A row of slot id = id / top_k */
    int64_t block_size;     /* MoE: rows per routing block (<= 16 * m_tiles) */
    int64_t num_experts;    /* MoE */
    int64_t capacity;       /* MoE: length of sorted_token_ids */
    int64_t smem_bytes;     /* dynamic shared memory the host gave the launch (checked by the kernel) */
    int32_t channelwise;    /* 1: one scale row, 32-element scale permutation */
    int32_t max_pieces;     /* stream-K: the most pieces a tile is cut into (>= 2 stage iterations
                             * each); 1: tiles are never cut (needs no partials) */
    /* MoE top-k sum fused into the epilogue (the fused MoE's GEMM2), or sum_out == null:
     * sum_out[t, n] = T(sum over k = 0..sum_topk-1 in order, over the local slots s = t*sum_topk+k,
     * of out[s, n]) where a slot is local iff 0 <= topk_ids[s] < global_experts and
     * (expert_map == null or expert_map[topk_ids[s]] >= 0); rows of tokens with no local slot are
     * zero. The tile that completes a token's row block (sum_counters) sums it. */
    void *sum_out;                /* [sum_tokens, n] (T) */
    int32_t *sum_counters;        /* [sum_tokens * ceil(n / n_blk)]: zero before and after each launch */
    const int32_t *topk_ids;      /* [sum_tokens * sum_topk] global expert ids */
    const int32_t *expert_map;    /* [global_experts]: local id or -1; null: every expert is local */
    int64_t sum_tokens;
    int64_t sum_topk;
    int64_t global_experts;
} LowbitMarlinGemmParams;

/* Act-order activation gather for 16-bit types: dst[r, j] = src[r * lda + perm[j]] (dst is
 * [m, k] contiguous); an out-of-range perm entry yields 0. */
typedef struct LowbitMarlinGemmGatherParams {
    const void *src;
    void *dst;
    const int32_t *perm;
    int64_t m;
    int64_t k;
    int64_t lda;
} LowbitMarlinGemmGatherParams;

#endif
