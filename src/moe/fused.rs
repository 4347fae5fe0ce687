//! The fused Marlin MoE layer: `moe_align_block_size` → GEMM1 (gate_up, per expert `2I × H`) →
//! `silu(gate) · up` → GEMM2 (down, `H × I`, times the router weight) with the sum over the top-k
//! slots of every token fused into its epilogue (in k order, so the result is deterministic).
//!
//! Engines call this every layer of every step, so all intermediates live in a [`MoeWorkspace`]
//! that is reused across calls. [`MoeWorkspace::reserve`] sizes it for the largest call once;
//! after that a call with at most that many tokens allocates nothing, and with
//! [`MoeOptions::validate_ids`] off it neither copies between host and device nor synchronises:
//! it only queues [`launches_per_call`] kernels on lowbit's stream, so it can be captured in a
//! CUDA graph. Out-of-range expert ids then accumulate in a device-side status word that
//! [`MoeWorkspace::check_ids`] reads when the engine asks.
//!
//! Expert parallelism: with an [`ExpertMap`], `topk_ids` hold global ids; slots routed to
//! experts that are not local are skipped by both GEMMs and contribute zero to the sum.
//!
//! The capturable decode loop (the README's example, compiled here):
//!
//! ```rust,no_run
//! use lowbit::marlin::gemm::MarlinExperts;
//! use lowbit::moe::{fused::fused_marlin_moe_into, MoeOptions, MoeWorkspace};
//! use lowbit::{bf16, Device, GroupSize};
//!
//! # fn main() -> lowbit::Result<()> {
//! let dev = Device::first()?; // or Device::with_stream(ctx, stream): the engine's stream
//! let (experts, hidden, inter, topk, max_tokens) = (128, 2048, 768, 8, 64); // Qwen3-30B-A3B
//! # let g = GroupSize::Group(128);
//! # let w13 = MarlinExperts::<bf16>::from_host(&dev, &vec![0x8888_8888u32 as i32; experts * hidden * 2 * inter / 8],
//! #     &vec![bf16::ONE; experts * hidden / 128 * 2 * inter], experts, 2 * inter, hidden, g)?;
//! # let w2 = MarlinExperts::<bf16>::from_host(&dev, &vec![0x8888_8888u32 as i32; experts * inter * hidden / 8],
//! #     &vec![bf16::ONE; experts * inter / 128 * hidden], experts, hidden, inter, g)?;
//! let opts = MoeOptions { validate_ids: false, ..MoeOptions::default() };
//! let mut ws = MoeWorkspace::<bf16>::new(&dev)?;
//! // Once: every buffer and kernel that calls of up to `max_tokens` tokens can need.
//! ws.reserve(&dev, &w13, &w2, max_tokens, topk, None, &opts)?;
//!
//! // A call's buffers have exactly its length: one set per batch size, made up front (the engine's
//! // own kernels fill x, the router weights and ids before each call).
//! let mut bufs = Vec::new();
//! for t in 1..=max_tokens {
//!     bufs.push((dev.zeros::<bf16>(t * hidden)?, dev.zeros::<f32>(t * topk)?, dev.zeros::<i32>(t * topk)?,
//!                dev.zeros::<bf16>(t * hidden)?));
//! }
//!
//! for step in 0..1000 {
//!     let tokens = 1 + step % max_tokens; // this step's decode batch
//!     let (x, topk_weights, topk_ids, out) = &mut bufs[tokens - 1];
//!     // Capturable: queues moe::fused::launches_per_call(tokens, topk) kernels (4 here) and
//!     // nothing else — no allocation, no host<->device copy, no host synchronisation.
//!     fused_marlin_moe_into(&dev, x, tokens, &w13, &w2, topk_weights, topk_ids, topk, None, &opts, &mut ws, out)?;
//!     // When the engine wants to know (outside a captured region): one sync and one 16-byte read.
//!     if step % 100 == 99 {
//!         ws.check_ids(&dev)?; // Err(InvalidArgument): "... expert id outside [0, 128) at token t, k k"
//!     }
//! }
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use cudarc::driver::CudaSlice;

use super::align::{
    bad_id_error, chunk_plan, launch_align, AlignBuffers, AlignKernels, AlignScratch, ExpertMap, PendingIds,
    StatusWord, COUNT_SMEM_LIMIT, SINGLE_BLOCK_MAX_SLOTS,
};
use super::{align_capacity, choose_block_size, validate_align_args, FAMILY};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::marlin::gemm::{
    marlin_moe_gemm, marlin_moe_gemm_topk_sum, plan_moe_gemm, Half, MarlinExperts, MarlinWorkspace, TopkSum,
    MOE_BLOCK_SIZES,
};

/// Launches of a fused call besides the alignment: GEMM1, `silu·mul`, GEMM2 (with the top-k sum
/// in its epilogue).
pub const LAUNCHES_AFTER_ALIGN: usize = 3;

/// Kernel launches one [`fused_marlin_moe_into`] call of `tokens · topk` slots queues: the
/// alignment's (1 up to [`SINGLE_BLOCK_MAX_SLOTS`] slots, 2 above) plus
/// [`LAUNCHES_AFTER_ALIGN`]. Decode (≤ 1024 slots): 4.
pub fn launches_per_call(tokens: usize, topk: usize) -> usize {
    AlignKernels::Auto.launches(tokens.saturating_mul(topk)) + LAUNCHES_AFTER_ALIGN
}

const THREADS: u32 = 256;
/// The vectorised glue kernels move 8 elements (16 bytes) at a time.
const VEC_ALIGN: usize = 16;

/// Options of [`fused_marlin_moe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeOptions {
    /// The GEMM's block of slots per expert; `None` picks [`choose_block_size`].
    pub block_size: Option<usize>,
    /// Synchronise once after the alignment to report this call's out-of-range expert ids as an
    /// error before the GEMMs run (default). Without it the call never blocks the host nor copies
    /// to or from it: out-of-range ids are still never used as an index (their slots contribute
    /// zero), and the smallest offending slot accumulates on the device until
    /// [`MoeWorkspace::check_ids`] reports it. A validating call reports only its own ids and
    /// leaves that accumulated word alone.
    pub validate_ids: bool,
}

impl Default for MoeOptions {
    fn default() -> Self {
        MoeOptions { block_size: None, validate_ids: true }
    }
}

/// Reusable buffers of [`fused_marlin_moe`]: alignment outputs and scratch, the GEMM1 output
/// `[slots, 2I]`, the activation `[slots, I]`, the GEMM2 output `[slots, H]`, and the Marlin GEMM
/// workspace. Create one per stream, [`reserve`](MoeWorkspace::reserve) it for the largest call,
/// and pass it to every call.
///
/// The alignment outputs are kept per block size, sized for the largest call that uses it: the
/// MoE GEMM works only on the used prefix (`num_tokens_post_padded`, read on the device) and its
/// grid does not depend on the buffer's capacity, so a larger buffer changes neither the work nor
/// the result. After [`MoeWorkspace::reserve`] they are never reallocated by calls within it, so
/// their addresses stay valid for CUDA graphs captured earlier.
#[derive(Debug)]
pub struct MoeWorkspace<T> {
    scratch: AlignScratch,
    /// Alignment buffers by block size.
    align: HashMap<usize, AlignBuffers>,
    gate_up: Option<CudaSlice<T>>,
    act: Option<CudaSlice<T>>,
    partial: Option<CudaSlice<T>>,
    marlin: MarlinWorkspace,
    pending: PendingIds,
}

/// For every block size calls of 1..=`max_tokens` tokens use (`block_size`, or the heuristic
/// over `local` experts), the largest token count that uses it.
fn block_size_tops(max_tokens: usize, topk: usize, local: usize, block_size: Option<usize>) -> HashMap<usize, usize> {
    let mut tops = HashMap::new();
    for t in 1..=max_tokens {
        tops.insert(block_size.unwrap_or_else(|| choose_block_size(t, topk, local)), t);
    }
    tops
}

/// The alignment buffers of block size `bs`, (re)made only when they hold fewer than `capacity`
/// slots.
fn align_buffers<'a>(
    dev: &Device,
    align: &'a mut HashMap<usize, AlignBuffers>,
    capacity: usize,
    bs: usize,
) -> Result<&'a mut AlignBuffers> {
    if align.get(&bs).is_none_or(|a| a.capacity < capacity) {
        align.remove(&bs); // free first so the peak stays one buffer
        align.insert(bs, AlignBuffers::new(dev, capacity, bs)?);
    }
    align.get_mut(&bs).ok_or_else(|| Error::invalid("fused_marlin_moe", "alignment buffers missing"))
}

impl<T: Half> MoeWorkspace<T> {
    /// An empty workspace; buffers are allocated on first use (or by [`MoeWorkspace::reserve`]).
    pub fn new(dev: &Device) -> Result<Self> {
        Ok(MoeWorkspace {
            scratch: AlignScratch::new(dev)?,
            align: HashMap::new(),
            gate_up: None,
            act: None,
            partial: None,
            marlin: MarlinWorkspace::new(),
            pending: PendingIds::default(),
        })
    }

    /// Makes room for every [`fused_marlin_moe_into`] call with these weights, `topk`, expert map
    /// and options and at most `max_tokens` tokens, and loads every kernel those calls use: after
    /// it such calls allocate nothing (and, with `validate_ids` off, make no host copy and no host
    /// synchronisation). Validates like a call of `max_tokens` tokens. May be called again with
    /// other shapes; buffers only grow.
    #[allow(clippy::too_many_arguments)]
    pub fn reserve(
        &mut self,
        dev: &Device,
        w13: &MarlinExperts<T>,
        w2: &MarlinExperts<T>,
        max_tokens: usize,
        topk: usize,
        expert_map: Option<&ExpertMap>,
        opts: &MoeOptions,
    ) -> Result<()> {
        const OP: &str = "MoeWorkspace::reserve";
        let p = validate_shapes(OP, max_tokens, w13, w2, topk, expert_map, opts)?;
        dev.check_buffer(OP, "qweight", &w13.qweight, w13.qweight.len())?;
        let (e, local) = (p.global_experts, w13.num_experts());
        let tops = block_size_tops(max_tokens, topk, local, opts.block_size);
        for (&bs, &tokens) in &tops {
            align_buffers(dev, &mut self.align, align_capacity(tokens * topk, e, bs), bs)?;
        }
        // The two-kernel path's chunk scratch: within each round count of the chunk plan the chunk
        // count grows with the slots, so its maximum is at a round boundary or at the largest call.
        let max_slots = max_tokens * topk;
        if max_slots > SINGLE_BLOCK_MAX_SLOTS {
            let tops = (1..=ffi::LOWBIT_MOE_ALIGN_MAX_ROUNDS as usize).map(|r| 2048 * r).filter(|&s| s <= max_slots);
            let max_chunks = tops.chain([max_slots]).map(|s| chunk_plan(s).1).max().unwrap_or(1);
            self.scratch.ensure_chunks(dev, max_chunks, e)?;
        }
        at_least(dev, &mut self.gate_up, max_slots * 2 * p.inter)?;
        at_least(dev, &mut self.act, max_slots * p.inter)?;
        at_least(dev, &mut self.partial, max_slots * p.hidden)?;
        // Load the kernels now, not inside the first (possibly captured) call: a module load there
        // may be refused during capture and is a host-side stall in any case.
        dev.function(FAMILY, "lowbit_moe_align_single", COUNT_SMEM_LIMIT)?;
        dev.function(FAMILY, "lowbit_moe_align_count", COUNT_SMEM_LIMIT)?;
        dev.function(FAMILY, "lowbit_moe_align_scatter", 0)?;
        dev.function(FAMILY, &format!("lowbit_moe_silu_mul_{}", T::DTYPE.name()), 0)?;
        let sm = dev.info().sm_count;
        for (&bs, &tokens) in &tops {
            let cap = self.align.get(&bs).map_or(0, |a| a.capacity);
            for w in [w13, w2] {
                let plan = plan_moe_gemm(bs, cap, w.n(), w.k(), sm)?;
                dev.function("marlin", &plan.kernel_name(T::DTYPE, true), plan.smem_bytes())?;
                self.marlin.reserve(dev, &plan)?;
            }
            // GEMM2's fused top-k sum: per (token, column block) counters.
            let plan = plan_moe_gemm(bs, cap, w2.n(), w2.k(), sm)?;
            self.marlin.reserve_topk_sum(dev, &plan, tokens)?;
        }
        Ok(())
    }

    /// Synchronises and reports the smallest out-of-range expert id of the non-validating calls
    /// since the last check ([`Error::InvalidArgument`] naming token and k, as a validating call
    /// would), then clears the device-side status word. `Ok` when every id was in range. Call it
    /// outside any captured region, as often as the engine wants (e.g. once per step).
    pub fn check_ids(&mut self, dev: &Device) -> Result<()> {
        self.pending.check("MoeWorkspace::check_ids", dev, &mut self.scratch)
    }

    /// Device bytes currently held by the intermediates.
    pub fn bytes(&self) -> usize {
        let t = std::mem::size_of::<T>();
        let len = |b: &Option<CudaSlice<T>>| b.as_ref().map_or(0, |b| b.len());
        (len(&self.gate_up) + len(&self.act) + len(&self.partial)) * t
            + self.align.values().map(AlignBuffers::bytes).sum::<usize>()
            + self.scratch.bytes()
            + self.marlin.device_bytes()
    }
}

/// A buffer of at least `len` elements: reused when large enough, replaced when not.
fn at_least<T: Half>(dev: &Device, slot: &mut Option<CudaSlice<T>>, len: usize) -> Result<()> {
    if slot.as_ref().is_none_or(|b| b.len() < len) {
        *slot = None; // free first so the peak stays one buffer
                      // SAFETY: every row a later kernel reads is written first in the same call (GEMM1 writes
                      // the rows of every local slot before the activation reads them, the activation before
                      // GEMM2, GEMM2 before the sum); rows of skipped slots are never read.
        *slot = Some(unsafe { dev.alloc_for_kernel::<T>(len)? });
    }
    Ok(())
}

/// Shapes of one fused MoE call, validated.
struct Problem {
    tokens: usize,
    topk: usize,
    hidden: usize,
    inter: usize,
    global_experts: usize,
    block_size: usize,
}

#[allow(clippy::too_many_arguments)]
fn validate<T: Half>(
    dev: &Device,
    op: &'static str,
    x: &CudaSlice<T>,
    tokens: usize,
    w13: &MarlinExperts<T>,
    w2: &MarlinExperts<T>,
    topk_weights: &CudaSlice<f32>,
    topk_ids: &CudaSlice<i32>,
    topk: usize,
    expert_map: Option<&ExpertMap>,
    opts: &MoeOptions,
) -> Result<Problem> {
    let p = validate_shapes(op, tokens, w13, w2, topk, expert_map, opts)?;
    dev.check_buffer(op, "x", x, tokens * p.hidden)?;
    dev.check_buffer(op, "topk_weights", topk_weights, tokens * topk)?;
    dev.check_buffer(op, "topk_ids", topk_ids, tokens * topk)?;
    Ok(p)
}

/// The shape rules of a call of `tokens` tokens (everything but the activation and routing
/// buffers).
fn validate_shapes<T: Half>(
    op: &'static str,
    tokens: usize,
    w13: &MarlinExperts<T>,
    w2: &MarlinExperts<T>,
    topk: usize,
    expert_map: Option<&ExpertMap>,
    opts: &MoeOptions,
) -> Result<Problem> {
    let local = w13.num_experts();
    if w2.num_experts() != local {
        return Err(Error::shape(op, format!("w13 holds {local} experts, w2 {}", w2.num_experts())));
    }
    let (hidden, inter) = (w13.k(), w2.k());
    if w13.n() != 2 * inter {
        return Err(Error::shape(
            op,
            format!("w13 has {} output features per expert; expected 2·I = {} (I = w2's K)", w13.n(), 2 * inter),
        ));
    }
    if w2.n() != hidden {
        return Err(Error::shape(op, format!("w2 has {} output features; expected H = w13's K = {hidden}", w2.n())));
    }
    if hidden % 8 != 0 || inter % 8 != 0 || hidden == 0 || inter == 0 {
        return Err(Error::shape(op, format!("H = {hidden} and I = {inter} must be positive multiples of 8")));
    }
    let global_experts = match expert_map {
        None => local,
        Some(m) => {
            if m.local_experts() != local {
                return Err(Error::shape(
                    op,
                    format!("the expert map has {} local experts, the weights {local}", m.local_experts()),
                ));
            }
            m.global_experts()
        }
    };
    let block_size = opts.block_size.unwrap_or_else(|| choose_block_size(tokens, topk, local));
    if !MOE_BLOCK_SIZES.contains(&block_size) {
        return Err(Error::invalid(op, format!("block size {block_size} is not one of {MOE_BLOCK_SIZES:?}")));
    }
    validate_align_args(op, tokens, topk, global_experts, block_size)?;
    // Intermediate sizes in checked arithmetic (tokens and H, I come from the caller).
    let slots = tokens * topk; // fits i32 (validate_align_args)
    for (what, a, b) in [("tokens·H", tokens, hidden), ("slots·2I", slots, 2 * inter), ("slots·H", slots, hidden)] {
        if a.checked_mul(b).is_none_or(|v| v > i64::MAX as usize / 8) {
            return Err(Error::shape(op, format!("{what} = {a}·{b} is too large")));
        }
    }
    Ok(Problem { tokens, topk, hidden, inter, global_experts, block_size })
}

/// `fused_marlin_moe` into a fresh output `[tokens, H]`. See [`fused_marlin_moe_into`].
#[allow(clippy::too_many_arguments)]
pub fn fused_marlin_moe<T: Half>(
    dev: &Device,
    x: &CudaSlice<T>,
    tokens: usize,
    w13: &MarlinExperts<T>,
    w2: &MarlinExperts<T>,
    topk_weights: &CudaSlice<f32>,
    topk_ids: &CudaSlice<i32>,
    topk: usize,
    expert_map: Option<&ExpertMap>,
    opts: &MoeOptions,
    ws: &mut MoeWorkspace<T>,
) -> Result<CudaSlice<T>> {
    // Validate before allocating so a bad call allocates nothing.
    validate(dev, "fused_marlin_moe", x, tokens, w13, w2, topk_weights, topk_ids, topk, expert_map, opts)?;
    // SAFETY: the final sum kernel writes every element of `out` (tokens with no local expert
    // get zeros); on error the buffer is dropped.
    let mut out = unsafe { dev.alloc_for_kernel::<T>(tokens * w13.k())? };
    fused_marlin_moe_into(dev, x, tokens, w13, w2, topk_weights, topk_ids, topk, expert_map, opts, ws, &mut out)?;
    Ok(out)
}

/// The fused Marlin MoE layer: `out[t] = Σ_k w[t,k] · W2_e (silu(W1_e x_t) ⊙ W3_e x_t)` with
/// `e = topk_ids[t, k]`, for `x [tokens, H]` (bf16 or f16), `w13` (per expert `2I × H`, gate =
/// the first `I` output features, up = the second `I`), `w2` (per expert `H × I`), `topk_weights`
/// f32 and `topk_ids` i32 `[tokens, topk]`. Writes every element of `out [tokens, H]`.
///
/// Validates expert counts (w13 vs w2 vs the expert map), shapes (`w13.n == 2·w2.k`,
/// `w13.k == w2.n == H`), buffer lengths and devices, and `topk ≤ E` before any launch; with
/// [`MoeOptions::validate_ids`] out-of-range ids are reported after the alignment, before the
/// GEMMs run.
///
/// Queues [`launches_per_call`] kernels. After [`MoeWorkspace::reserve`] for at least `tokens`
/// tokens (same weights, `topk`, map and options) it allocates nothing; with `validate_ids` off
/// it also makes no host↔device copy and no host synchronisation, so it can be captured in a
/// CUDA graph (ids are then checked by [`MoeWorkspace::check_ids`]).
#[allow(clippy::too_many_arguments)]
pub fn fused_marlin_moe_into<T: Half>(
    dev: &Device,
    x: &CudaSlice<T>,
    tokens: usize,
    w13: &MarlinExperts<T>,
    w2: &MarlinExperts<T>,
    topk_weights: &CudaSlice<f32>,
    topk_ids: &CudaSlice<i32>,
    topk: usize,
    expert_map: Option<&ExpertMap>,
    opts: &MoeOptions,
    ws: &mut MoeWorkspace<T>,
    out: &mut CudaSlice<T>,
) -> Result<()> {
    const OP: &str = "fused_marlin_moe";
    let p = validate(dev, OP, x, tokens, w13, w2, topk_weights, topk_ids, topk, expert_map, opts)?;
    dev.check_buffer(OP, "out", out, p.tokens * p.hidden)?;
    let slots = p.tokens * p.topk;
    let silu = dev.function(FAMILY, &format!("lowbit_moe_silu_mul_{}", T::DTYPE.name()), 0)?;

    // 1. Alignment (buffers per block size, grown only past what they hold; see MoeWorkspace).
    let MoeWorkspace { scratch, align, gate_up, act, partial, marlin, pending } = ws;
    let align = align_buffers(dev, align, align_capacity(slots, p.global_experts, p.block_size), p.block_size)?;
    at_least(dev, gate_up, slots * 2 * p.inter)?;
    at_least(dev, act, slots * p.inter)?;
    at_least(dev, partial, slots * p.hidden)?;
    let (Some(gate_up), Some(act), Some(partial)) = (gate_up.as_mut(), act.as_mut(), partial.as_mut()) else {
        return Err(Error::invalid(OP, "workspace buffers missing"));
    };
    let status = if opts.validate_ids { StatusWord::Call } else { StatusWord::Pending };
    if opts.validate_ids {
        scratch.reset(dev, StatusWord::Call)?;
    }
    launch_align(dev, OP, topk_ids, slots, p.global_experts, expert_map, align, scratch, status, AlignKernels::Auto)?;
    if opts.validate_ids {
        if let Some(bad) = scratch.take_bad_slot(dev, StatusWord::Call)? {
            return Err(bad_id_error(OP, bad, p.topk, p.global_experts));
        }
    } else {
        pending.record(p.topk, p.global_experts);
    }
    let blocks = align.blocks();

    // 2. GEMM1: gate_up[s] = x[s / topk] · W13_e.
    marlin_moe_gemm(dev, x, p.tokens, w13, &blocks, p.topk, None, gate_up, slots, marlin)?;

    // 3. act = silu(gate) · up, on the slots of local experts.
    {
        let (gu, _g1) = dev.ptr(OP, "gate_up", &*gate_up, VEC_ALIGN)?;
        let (a, _g2) = dev.ptr_mut(OP, "act", &mut *act, VEC_ALIGN)?;
        let (ids, _g3) = dev.ptr(OP, "topk_ids", topk_ids, 4)?;
        let map = expert_map.map(|m| dev.ptr(OP, "expert_map", m.device(), 4)).transpose()?;
        let params = ffi::LowbitMoeSiluMulParams {
            gate_up: gu as *const _,
            act: a as *mut _,
            topk_ids: ids as *const i32,
            expert_map: map.as_ref().map_or(0, |g| g.0) as *const i32,
            slots: slots as i64,
            inter: p.inter as i64,
            num_experts: p.global_experts as i32,
        };
        let cfg = dev.grid_stride(slots * (p.inter / 8), THREADS, THREADS as usize);
        // SAFETY: gate_up holds slots·2I elements and act slots·I (sized above), I % 8 == 0 and
        // both are 16-byte aligned for the 8-wide accesses; topk_ids holds `slots` ids and the
        // expert map `global_experts` entries; every id is range-checked before indexing the
        // map. The guards order the buffers on the stream.
        unsafe { dev.launch(&silu, cfg, params)? };
    }

    // 4. GEMM2: partial[s] = topk_weights[s] · act[s] · W2_e, and in its epilogue
    //    out[t] = Σ_k partial[t·topk + k] over local slots, in k order (zeros for tokens with none).
    let mut sum = TopkSum {
        out,
        tokens: p.tokens,
        topk: p.topk,
        topk_ids,
        expert_map: expert_map.map(|m| m.device()),
        global_experts: p.global_experts,
    };
    marlin_moe_gemm_topk_sum(dev, &*act, slots, w2, &blocks, Some(topk_weights), partial, slots, marlin, &mut sum)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserved_block_sizes_cover_every_call() {
        for (topk, local) in [(1usize, 8usize), (2, 8), (8, 128), (8, 96), (6, 64)] {
            for block in [None, Some(16), Some(48)] {
                for max_tokens in [1usize, 2, 3, 64, 100, 1000, 5000] {
                    let tops = block_size_tops(max_tokens, topk, local, block);
                    assert!(tops.len() <= MOE_BLOCK_SIZES.len());
                    for tokens in 1..=max_tokens {
                        let bs = block.unwrap_or_else(|| choose_block_size(tokens, topk, local));
                        assert!(tops.get(&bs).is_some_and(|&top| top >= tokens), "tokens {tokens}, {block:?}");
                    }
                }
            }
        }
    }
}
