/* Mixture of experts: routing, moe_align_block_size, fused Marlin MoE (DESIGN §4). */
#ifndef LOWBIT_MOE_H
#define LOWBIT_MOE_H

#include <stdint.h>

/* Largest expert count the routing and alignment kernels handle (one thread per expert in the
 * alignment scan, one warp's shared memory row per expert in the gating kernels). */
#define LOWBIT_MOE_MAX_EXPERTS 1024
/* Largest expert-group count of grouped top-k routing (one lane per group). */
#define LOWBIT_MOE_MAX_GROUPS 32
/* Token rows per block of the gating kernels (one warp per row). */
#define LOWBIT_MOE_GATING_WARPS 4
/* Alignment: slots are cut into chunks of 32 * rounds (rounds <= LOWBIT_MOE_ALIGN_MAX_ROUNDS),
 * one warp per chunk; the count kernel runs LOWBIT_MOE_ALIGN_COUNT_WARPS warps per block, the
 * scatter kernel LOWBIT_MOE_ALIGN_SCATTER_WARPS. */
#define LOWBIT_MOE_ALIGN_MAX_ROUNDS 16
#define LOWBIT_MOE_ALIGN_COUNT_WARPS 32
#define LOWBIT_MOE_ALIGN_SCATTER_WARPS 4
/* The one-launch alignment for small problems (decode): one block, one slot per thread, so
 * slots <= LOWBIT_MOE_ALIGN_SINGLE_MAX_SLOTS; its per-warp 16-bit histograms need 64 * E bytes of
 * dynamic shared memory (64 KiB at LOWBIT_MOE_MAX_EXPERTS). */
#define LOWBIT_MOE_ALIGN_SINGLE_THREADS 1024
#define LOWBIT_MOE_ALIGN_SINGLE_MAX_SLOTS 1024 /* = LOWBIT_MOE_ALIGN_SINGLE_THREADS */
/* Status words of the alignment (all ones = nothing to report; reset on the device by a memset).
 * `status` points at one block of LOWBIT_MOE_STATUS_WORDS words; the host keeps two such blocks
 * per workspace (ids since the caller last checked, and one validating call's own). */
#define LOWBIT_MOE_STATUS_BAD_ID 0 /* smallest slot index holding an expert id outside [0, E) */
#define LOWBIT_MOE_STATUS_WORDS 1

/* Top-k gating over router logits [tokens, experts] (f32, bf16 or f16). Softmax kernels use
 * topk and renormalize; grouped (sigmoid + bias, DeepSeek-V3 noaux_tc) kernels use all fields.
 * Ranking: score descending, ties to the lower index, NaN ranks as -inf. */
typedef struct LowbitMoeTopkParams {
    const void *logits;   /* [tokens, experts] */
    const float *bias;    /* [experts] selection-only correction bias; may be null */
    float *weights;       /* [tokens, topk] */
    int32_t *ids;         /* [tokens, topk] */
    int64_t tokens;
    int32_t experts;
    int32_t topk;
    int32_t n_group;      /* experts % n_group == 0, n_group <= LOWBIT_MOE_MAX_GROUPS */
    int32_t topk_group;   /* groups kept; >= n_group keeps every group */
    int32_t renormalize;  /* nonzero: divide the chosen weights by their sum */
    float routed_scaling_factor;
} LowbitMoeTopkParams;

/* moe_align_block_size over topk_ids [slots] (slots = tokens * topk): a stable counting sort of
 * the slots by expert, every expert's list padded to a multiple of block_size with the sentinel
 * `slots`. Two kernels: count (+ scan in the last block to finish) and scatter (+ padding); or,
 * for slots <= LOWBIT_MOE_ALIGN_SINGLE_MAX_SLOTS, the single-block kernel (chunk_counts,
 * expert_base, expert_count, done, chunk and num_chunks unused). Positions [0, capacity) are all
 * written: capacity may exceed the problem's bound (a workspace's reused buffer). */
typedef struct LowbitMoeAlignParams {
    const int32_t *topk_ids;         /* [slots] global expert ids */
    const int32_t *expert_map;       /* [num_experts] global -> local expert or -1; null = identity */
    int32_t *sorted_token_ids;       /* [capacity] */
    int32_t *expert_ids;             /* [capacity / block_size] */
    int32_t *num_tokens_post_padded; /* [1] */
    int32_t *chunk_counts;           /* [num_chunks, num_experts] scratch (counts, then offsets) */
    int32_t *expert_base;            /* [num_experts] scratch: start of each expert's list */
    int32_t *expert_count;           /* [num_experts] scratch: slots routed to each expert */
    uint32_t *done;                  /* [1] scratch, zero between calls (the last block resets it) */
    unsigned long long *status;      /* [LOWBIT_MOE_STATUS_WORDS] */
    int64_t slots;
    int64_t capacity;                /* multiple of block_size */
    int32_t num_experts;
    int32_t block_size;
    int32_t chunk;                   /* slots per chunk: 32 * rounds */
    int32_t num_chunks;
} LowbitMoeAlignParams;

/* act[s, i] = T(silu(gate_up[s, i]) * gate_up[s, inter + i]) for every slot s whose expert is
 * valid and local; other rows are not written (and never read). */
typedef struct LowbitMoeSiluMulParams {
    const void *gate_up;       /* [slots, 2 * inter] */
    void *act;                 /* [slots, inter] */
    const int32_t *topk_ids;   /* [slots] */
    const int32_t *expert_map; /* [num_experts] or null */
    int64_t slots;
    int64_t inter;             /* multiple of 8 */
    int32_t num_experts;       /* global expert count: valid ids are [0, num_experts) */
} LowbitMoeSiluMulParams;

#endif
