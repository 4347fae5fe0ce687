// moe_align_block_size: a stable counting sort of the (token, k) slots by expert, each expert's
// list padded to a multiple of the block size.
//
// The slots are cut into chunks of `chunk` = 32 * rounds consecutive slots, one warp per chunk.
//  1. count:   every warp histograms its chunk in shared memory (atomics; order-free) and writes
//              its row of chunk_counts[chunk][expert]. The last block to finish (threadfence +
//              ticket) scans: per expert, the exclusive prefix over chunks, the padded totals,
//              the exclusive prefix over experts -> every chunk's absolute start per expert.
//  2. scatter: every warp walks its chunk in order, 32 slots per round; lanes with the same
//              expert find each other with __match_any_sync and take consecutive positions in
//              lane order. So the order within an expert is ascending slot index, independent of
//              scheduling: the output is deterministic. The same kernel writes the padding
//              sentinels and the per-block expert ids.
// Ids outside [0, E) are reported in the status word and skipped: they are never used as an
// index, so bad input cannot cause an illegal memory access.
#pragma once

#include "lowbit.h"
#include "lowbit_common.cuh"

namespace lowbit {
namespace moe {

__device__ __forceinline__ bool valid_expert(int32_t id, int32_t num_experts) {
    return id >= 0 && id < num_experts;
}

// Block-wide exclusive scan of one int per thread (blockDim.x a multiple of 32, <= 1024);
// every thread must call it. Returns the exclusive prefix and the block total.
__device__ __forceinline__ int block_exclusive_scan(int x, int *total) {
    __shared__ int warp_sums[32];
    __shared__ int block_total;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    int incl = x;
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, incl, off);
        if (lane >= off) incl += y;
    }
    if (lane == 31) warp_sums[warp] = incl;
    __syncthreads();
    if (warp == 0) {
        const int s = lane < nwarps ? warp_sums[lane] : 0;
        int si = s;
#pragma unroll
        for (int off = 1; off < 32; off <<= 1) {
            const int y = __shfl_up_sync(0xffffffffu, si, off);
            if (lane >= off) si += y;
        }
        if (lane < nwarps) warp_sums[lane] = si - s; // exclusive prefix of warp sums
        if (lane == 31) block_total = si;
    }
    __syncthreads();
    const int r = warp_sums[warp] + incl - x;
    *total = block_total;
    __syncthreads(); // the shared words may be reused
    return r;
}

// The last count block: turns chunk_counts into absolute per-chunk starts and fills the
// per-expert tables. Tasks are (expert, part) pairs; each part covers a range of chunks.
// blockDim.x >= num_experts (1024 threads, at most LOWBIT_MOE_MAX_EXPERTS experts).
__device__ __forceinline__ void align_scan(const LowbitMoeAlignParams &p) {
    constexpr int BATCH = 16; // loads in flight per thread
    __shared__ int partial[LOWBIT_MOE_MAX_EXPERTS]; // [parts][E], parts * E <= 1024
    const int E = p.num_experts, nc = p.num_chunks;
    const int parts = min(32, max(1, LOWBIT_MOE_MAX_EXPERTS / E));
    const int per_part = (nc + parts - 1) / parts;
    // (a) every (expert, part) sums its chunks.
    for (int task = threadIdx.x; task < parts * E; task += blockDim.x) {
        const int e = task % E, c0 = (task / E) * per_part, c1 = min(nc, c0 + per_part);
        int s = 0;
        for (int c = c0; c < c1; c += BATCH) {
            int v[BATCH];
#pragma unroll
            for (int j = 0; j < BATCH; ++j) v[j] = c + j < c1 ? __ldcg(p.chunk_counts + (size_t)(c + j) * E + e) : 0;
#pragma unroll
            for (int j = 0; j < BATCH; ++j) s += v[j];
        }
        partial[task] = s;
    }
    __syncthreads();
    // (b) per expert: exclusive prefix over parts, total, padded total; scan over experts.
    int padded = 0, count = 0;
    if ((int)threadIdx.x < E) {
        for (int q = 0; q < parts; ++q) {
            const int v = partial[q * E + threadIdx.x];
            partial[q * E + threadIdx.x] = count;
            count += v;
        }
        padded = (count + p.block_size - 1) / p.block_size * p.block_size;
    }
    int total;
    const int base = block_exclusive_scan(padded, &total);
    if ((int)threadIdx.x < E) {
        p.expert_base[threadIdx.x] = base;
        p.expert_count[threadIdx.x] = count;
        for (int q = 0; q < parts; ++q) partial[q * E + threadIdx.x] += base;
    }
    __syncthreads();
    // (c) absolute start of every (chunk, expert).
    for (int task = threadIdx.x; task < parts * E; task += blockDim.x) {
        const int e = task % E, c0 = (task / E) * per_part, c1 = min(nc, c0 + per_part);
        int run = partial[task];
        for (int c = c0; c < c1; c += BATCH) {
            int v[BATCH]; // batched: the loads of a batch overlap instead of alternating with stores
#pragma unroll
            for (int j = 0; j < BATCH; ++j) v[j] = c + j < c1 ? __ldcg(p.chunk_counts + (size_t)(c + j) * E + e) : 0;
#pragma unroll
            for (int j = 0; j < BATCH; ++j) {
                if (c + j < c1) p.chunk_counts[(size_t)(c + j) * E + e] = run;
                run += v[j];
            }
        }
    }
    if (threadIdx.x == 0) {
        *p.num_tokens_post_padded = total;
        *p.done = 0; // ready for the next call
    }
}

// Per-warp histograms of 16-bit counts (a chunk holds at most 32 * LOWBIT_MOE_ALIGN_MAX_ROUNDS
// = 512 slots), two per 32-bit word so shared-memory atomics apply: 64 * E bytes per block.
__device__ __forceinline__ void align_count(const LowbitMoeAlignParams &p) {
    extern __shared__ uint32_t hist2[]; // [COUNT_WARPS][ceil(E / 2)]
    __shared__ bool is_last;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int E = p.num_experts, words = (E + 1) / 2;
    uint32_t *row = hist2 + warp * words;
    for (int w = lane; w < words; w += 32) row[w] = 0;
    __syncwarp();
    const int c = blockIdx.x * LOWBIT_MOE_ALIGN_COUNT_WARPS + warp;
    if (c < p.num_chunks) {
        const long long s0 = (long long)c * p.chunk;
        const int rounds = p.chunk / 32;
        int32_t ids[LOWBIT_MOE_ALIGN_MAX_ROUNDS];
#pragma unroll
        for (int r = 0; r < LOWBIT_MOE_ALIGN_MAX_ROUNDS; ++r) {
            const long long s = s0 + r * 32 + lane;
            ids[r] = (r < rounds && s < p.slots) ? __ldg(p.topk_ids + s) : -1;
        }
#pragma unroll
        for (int r = 0; r < LOWBIT_MOE_ALIGN_MAX_ROUNDS; ++r) {
            const long long s = s0 + r * 32 + lane;
            if (r >= rounds || s >= p.slots) continue;
            const int32_t id = ids[r];
            if (valid_expert(id, E)) {
                atomicAdd(row + id / 2, 1u << (16 * (id & 1)));
            } else {
                report_min(p.status, LOWBIT_MOE_STATUS_BAD_ID, (unsigned long long)s);
            }
        }
        __syncwarp();
        for (int e = lane; e < E; e += 32) {
            p.chunk_counts[(size_t)c * E + e] = (int)((row[e / 2] >> (16 * (e & 1))) & 0xffffu);
        }
    }
    // The last block to finish does the scan.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(p.done, 1u) == gridDim.x - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    align_scan(p);
}

__device__ __forceinline__ void align_scatter(const LowbitMoeAlignParams &p) {
    extern __shared__ int offs[]; // [SCATTER_WARPS][E]
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int E = p.num_experts;
    const int32_t sentinel = (int32_t)p.slots;
    const int c = blockIdx.x * LOWBIT_MOE_ALIGN_SCATTER_WARPS + warp;
    if (c < p.num_chunks) {
        int *off = offs + warp * E;
        for (int e = lane; e < E; e += 32) off[e] = p.chunk_counts[(size_t)c * E + e];
        const long long s0 = (long long)c * p.chunk;
        const int rounds = p.chunk / 32;
        int32_t ids[LOWBIT_MOE_ALIGN_MAX_ROUNDS];
#pragma unroll
        for (int r = 0; r < LOWBIT_MOE_ALIGN_MAX_ROUNDS; ++r) {
            const long long s = s0 + r * 32 + lane;
            ids[r] = (r < rounds && s < p.slots) ? __ldg(p.topk_ids + s) : -1;
        }
        __syncwarp();
        const unsigned lt = (1u << lane) - 1u;
#pragma unroll
        for (int r = 0; r < LOWBIT_MOE_ALIGN_MAX_ROUNDS; ++r) {
            if (r >= rounds) break; // uniform across the warp
            const long long s = s0 + r * 32 + lane;
            const bool ok = s < p.slots && valid_expert(ids[r], E);
            const int key = ok ? ids[r] : -1;
            const unsigned peers = __match_any_sync(0xffffffffu, key);
            int pos = 0;
            if (ok) pos = off[key] + __popc(peers & lt);
            __syncwarp();
            if (ok) {
                p.sorted_token_ids[pos] = (int32_t)s;
                if ((peers & lt) == 0) off[key] += __popc(peers); // the group's lowest lane
            }
            __syncwarp();
        }
    }
    // Padding: each expert's tail, the tail after the last expert, and the block labels.
    const long long nthreads = (long long)gridDim.x * blockDim.x;
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int bs = p.block_size;
    for (long long e = tid; e < E; e += nthreads) {
        const int base = p.expert_base[e], cnt = p.expert_count[e];
        const int padded = (cnt + bs - 1) / bs * bs;
        for (int i = cnt; i < padded; ++i) p.sorted_token_ids[base + i] = sentinel;
        const int32_t label = p.expert_map != nullptr ? p.expert_map[e] : (int32_t)e;
        for (int b = base / bs; b < (base + padded) / bs; ++b) p.expert_ids[b] = label;
    }
    const long long total = *p.num_tokens_post_padded;
    for (long long i = total + tid; i < p.capacity; i += nthreads) p.sorted_token_ids[i] = sentinel;
    for (long long b = total / bs + tid; b < p.capacity / bs; b += nthreads) p.expert_ids[b] = -1;
}

// Small problems (decode): everything in one block of LOWBIT_MOE_ALIGN_SINGLE_THREADS threads,
// one slot per thread (slots <= LOWBIT_MOE_ALIGN_SINGLE_MAX_SLOTS = the block size), so the whole
// alignment is one launch:
//  1. every warp histograms its 32 consecutive slots into its own row of 16-bit counts (shared
//     atomics on pairs packed in 32-bit words: 64 * E bytes for 32 warps, as the count kernel);
//  2. one thread per expert turns its column into exclusive prefixes over the warps (in place,
//     16-bit: at most 1024 slots) and its count; a block scan over the padded counts gives every
//     expert's base and num_tokens_post_padded;
//  3. every lane writes its slot at base[e] + prefix[warp][e] + (lower lanes of its warp with the
//     same expert, __match_any_sync): ascending slot index within an expert, exactly the order of
//     the two-kernel path and of the reference;
//  4. padding: every position of [0, capacity) that holds no slot gets the sentinel (the owner of
//     a position below the total is the last expert whose base is <= it), every block its label,
//     blocks past the total -1.
// Steps 3 and 4 write disjoint positions, so they need no barrier between them.
__device__ __forceinline__ void align_single(const LowbitMoeAlignParams &p) {
    extern __shared__ uint32_t hist2[]; // [32 warps][ceil(E / 2)] packed 16-bit counts
    __shared__ int base_s[LOWBIT_MOE_MAX_EXPERTS];
    __shared__ int count_s[LOWBIT_MOE_MAX_EXPERTS];
    constexpr int WARPS = LOWBIT_MOE_ALIGN_SINGLE_THREADS / 32;
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int E = p.num_experts, words = (E + 1) / 2;
    unsigned short *hist = reinterpret_cast<unsigned short *>(hist2); // row stride 2 * words
    for (int i = tid; i < WARPS * words; i += LOWBIT_MOE_ALIGN_SINGLE_THREADS) hist2[i] = 0;
    const long long s = tid;
    const int32_t id = s < p.slots ? __ldg(p.topk_ids + s) : -1;
    const bool ok = s < p.slots && valid_expert(id, E);
    if (s < p.slots && !ok) report_min(p.status, LOWBIT_MOE_STATUS_BAD_ID, (unsigned long long)s);
    __syncthreads();
    // (1) histograms.
    if (ok) atomicAdd(hist2 + warp * words + id / 2, 1u << (16 * (id & 1)));
    __syncthreads();
    // (2) per expert: prefix over warps, count, padded count; scan over experts.
    int padded = 0;
    if (tid < E) {
        int run = 0;
#pragma unroll 8
        for (int w = 0; w < WARPS; ++w) {
            unsigned short *c = hist + (size_t)w * 2 * words + tid;
            const int v = *c;
            *c = (unsigned short)run;
            run += v;
        }
        count_s[tid] = run;
        padded = (run + p.block_size - 1) / p.block_size * p.block_size;
    }
    int total;
    const int base = block_exclusive_scan(padded, &total); // has barriers: orders (2) before (3)
    if (tid < E) base_s[tid] = base;
    __syncthreads();
    // (3) the in-order scatter.
    const unsigned peers = __match_any_sync(0xffffffffu, ok ? id : -1);
    if (ok) {
        const int pos = base_s[id] + hist[(size_t)warp * 2 * words + id] + __popc(peers & ((1u << lane) - 1u));
        p.sorted_token_ids[pos] = (int32_t)s;
    }
    // (4) padding, labels, the tail.
    const int32_t sentinel = (int32_t)p.slots;
    const int bs = p.block_size;
    for (long long i = tid; i < p.capacity; i += LOWBIT_MOE_ALIGN_SINGLE_THREADS) {
        bool pad = i >= total;
        if (!pad) {
            int lo = 0, hi = E - 1; // the last expert whose base is <= i (base_s[0] == 0)
            while (lo < hi) {
                const int mid = (lo + hi + 1) >> 1;
                if (base_s[mid] <= i) lo = mid; else hi = mid - 1;
            }
            pad = i - base_s[lo] >= count_s[lo];
        }
        if (pad) p.sorted_token_ids[i] = sentinel;
    }
    if (tid < E) {
        const int32_t label = p.expert_map != nullptr ? p.expert_map[tid] : (int32_t)tid;
        for (int b = base / bs; b < (base + padded) / bs; ++b) p.expert_ids[b] = label;
    }
    for (long long b = total / bs + tid; b < p.capacity / bs; b += LOWBIT_MOE_ALIGN_SINGLE_THREADS) p.expert_ids[b] = -1;
    if (tid == 0) *p.num_tokens_post_padded = total;
}

} // namespace moe
} // namespace lowbit
