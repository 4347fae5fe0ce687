//! The fused Marlin MoE layer: `moe_align_block_size` → GEMM1 (gate_up, per expert `2I × H`) →
//! `silu(gate) · up` → GEMM2 (down, `H × I`, times the router weight) with the sum over the top-k
//! slots of every token fused into its epilogue (in k order, so the result is deterministic).
//!
//! Engines call this every layer of every step, so all intermediates live in a [`MoeWorkspace`]
//! that is reused across calls and only reallocated when a problem needs more (or, for the
//! alignment buffers, a different) size.
//!
//! Expert parallelism: with an [`ExpertMap`], `topk_ids` hold global ids; slots routed to
//! experts that are not local are skipped by both GEMMs and contribute zero to the sum.

use cudarc::driver::CudaSlice;

use super::align::{bad_id_error, launch_align, AlignBuffers, AlignScratch, ExpertMap};
use super::{align_capacity, choose_block_size, validate_align_args, FAMILY};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::marlin::gemm::{
    marlin_moe_gemm, marlin_moe_gemm_topk_sum, Half, MarlinExperts, MarlinWorkspace, TopkSum, MOE_BLOCK_SIZES,
};

const THREADS: u32 = 256;
/// The vectorised glue kernels move 8 elements (16 bytes) at a time.
const VEC_ALIGN: usize = 16;

/// Options of [`fused_marlin_moe`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MoeOptions {
    /// The GEMM's block of slots per expert; `None` picks [`choose_block_size`].
    pub block_size: Option<usize>,
    /// Synchronise once after the alignment to report out-of-range expert ids as an error
    /// (default). Without it the call never blocks the host: out-of-range ids are still never
    /// used as an index, their slots simply contribute zero.
    pub validate_ids: bool,
}

impl Default for MoeOptions {
    fn default() -> Self {
        MoeOptions { block_size: None, validate_ids: true }
    }
}

/// Reusable buffers of [`fused_marlin_moe`]: alignment outputs and scratch, the GEMM1 output
/// `[slots, 2I]`, the activation `[slots, I]`, the GEMM2 output `[slots, H]`, and the Marlin GEMM
/// workspace. Create one per stream and pass it to every call.
#[derive(Debug)]
pub struct MoeWorkspace<T> {
    scratch: AlignScratch,
    align: Option<AlignBuffers>,
    gate_up: Option<CudaSlice<T>>,
    act: Option<CudaSlice<T>>,
    partial: Option<CudaSlice<T>>,
    marlin: MarlinWorkspace,
}

impl<T: Half> MoeWorkspace<T> {
    /// An empty workspace; buffers are allocated on first use.
    pub fn new(dev: &Device) -> Result<Self> {
        Ok(MoeWorkspace {
            scratch: AlignScratch::new(dev)?,
            align: None,
            gate_up: None,
            act: None,
            partial: None,
            marlin: MarlinWorkspace::new(),
        })
    }

    /// Device bytes currently held by the intermediates.
    pub fn bytes(&self) -> usize {
        let t = std::mem::size_of::<T>();
        let len = |b: &Option<CudaSlice<T>>| b.as_ref().map_or(0, |b| b.len());
        (len(&self.gate_up) + len(&self.act) + len(&self.partial)) * t
            + self.align.as_ref().map_or(0, |a| (a.capacity + a.capacity / a.block_size + 1) * 4)
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
    dev.check_buffer(op, "x", x, tokens * hidden)?;
    dev.check_buffer(op, "topk_weights", topk_weights, tokens * topk)?;
    dev.check_buffer(op, "topk_ids", topk_ids, tokens * topk)?;
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

    // 1. Alignment (buffers sized exactly for this problem, reused when the size repeats).
    let capacity = align_capacity(slots, p.global_experts, p.block_size);
    if ws.align.as_ref().is_none_or(|a| a.capacity != capacity || a.block_size != p.block_size) {
        ws.align = None;
        ws.align = Some(AlignBuffers::new(dev, capacity, p.block_size)?);
    }
    at_least(dev, &mut ws.gate_up, slots * 2 * p.inter)?;
    at_least(dev, &mut ws.act, slots * p.inter)?;
    at_least(dev, &mut ws.partial, slots * p.hidden)?;
    let MoeWorkspace { scratch, align, gate_up, act, partial, marlin } = ws;
    let (Some(align), Some(gate_up), Some(act), Some(partial)) =
        (align.as_mut(), gate_up.as_mut(), act.as_mut(), partial.as_mut())
    else {
        return Err(Error::invalid(OP, "workspace buffers missing"));
    };
    if opts.validate_ids {
        scratch.reset_status(dev)?;
    }
    launch_align(dev, OP, topk_ids, slots, p.global_experts, expert_map, align, scratch)?;
    if opts.validate_ids {
        if let Some(bad) = scratch.take_bad_slot(dev)? {
            return Err(bad_id_error(OP, bad, p.topk, p.global_experts));
        }
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
