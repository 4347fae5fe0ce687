//! `moe_align_block_size` on the GPU and vLLM's block-size heuristic.
//!
//! For `topk_ids [tokens, topk]` (global expert ids) the routed slots `s = t·topk + k` are sorted
//! by expert — ascending expert id, ascending slot index within an expert, so the result is
//! deterministic — and every expert's list is padded to a multiple of the block size with the
//! sentinel `tokens·topk`. One expert id per block (the local id under an [`ExpertMap`], −1 for
//! experts that are not local and for blocks past `num_tokens_post_padded`).
//!
//! Up to [`SINGLE_BLOCK_MAX_SLOTS`] slots (decode batches: 128 tokens at top-8) one launch of one
//! block does everything: per-warp histograms, the scan over experts, the in-order scatter and the
//! padding. Larger problems take two kernels: per-chunk histograms with shared-memory atomics plus
//! a scan by the last block to finish, then an in-order scatter (warp `match_any` ranks) that also
//! writes the padding. Both give bit-identical outputs. Expert ids outside `[0, num_experts)` are
//! skipped on the device and reported through a status word, which the device accumulates and the
//! host reads only when asked (see [`AlignWorkspace::check_ids`]).

use cudarc::driver::{CudaSlice, LaunchConfig};

use super::{align_capacity, validate_align_args, validate_expert_map, FAMILY};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::ffi;
use crate::marlin::gemm::MoeBlocks;

const COUNT_WARPS: usize = ffi::LOWBIT_MOE_ALIGN_COUNT_WARPS as usize;
const SCATTER_WARPS: usize = ffi::LOWBIT_MOE_ALIGN_SCATTER_WARPS as usize;
const MAX_ROUNDS: usize = ffi::LOWBIT_MOE_ALIGN_MAX_ROUNDS as usize;
/// The count kernel's shared memory limit: 64 bytes per expert (16-bit counts, 32 warps); the
/// single-block kernel has the same per-warp histograms.
pub(crate) const COUNT_SMEM_LIMIT: usize = 64 * super::MAX_EXPERTS;
const SINGLE_THREADS: usize = ffi::LOWBIT_MOE_ALIGN_SINGLE_THREADS as usize;

/// The largest slot count (`tokens·topk`) the one-launch alignment handles: one slot per thread of
/// a 1024-thread block. The limit follows from the kernel's design — each thread holds one id, the
/// per-warp histograms of 32 warps hold 16-bit counts in 64 bytes per expert (64 KiB of shared
/// memory at 1024 experts) — and it covers decode (up to 128 tokens at top-8). Above it, one SM
/// would do work that the two-kernel path spreads over the whole GPU.
pub const SINGLE_BLOCK_MAX_SLOTS: usize = ffi::LOWBIT_MOE_ALIGN_SINGLE_MAX_SLOTS as usize;

/// Which alignment kernels run. [`AlignKernels::Auto`] (what every lowbit entry point uses) picks
/// the single-block kernel up to [`SINGLE_BLOCK_MAX_SLOTS`] slots and the two-kernel path above;
/// the others force a path (for tests and benchmarks: the outputs are bit-identical).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlignKernels {
    #[default]
    Auto,
    /// One launch; an error above [`SINGLE_BLOCK_MAX_SLOTS`] slots.
    SingleBlock,
    /// Count (+ scan) then scatter (+ padding): two launches, any size.
    TwoKernel,
}

impl AlignKernels {
    /// Whether `slots` run on the single-block kernel.
    fn single(self, op: &'static str, slots: usize) -> Result<bool> {
        match self {
            AlignKernels::Auto => Ok(slots <= SINGLE_BLOCK_MAX_SLOTS),
            AlignKernels::TwoKernel => Ok(false),
            AlignKernels::SingleBlock if slots <= SINGLE_BLOCK_MAX_SLOTS => Ok(true),
            AlignKernels::SingleBlock => Err(Error::invalid(
                op,
                format!("the single-block alignment handles at most {SINGLE_BLOCK_MAX_SLOTS} slots, not {slots}"),
            )),
        }
    }

    /// Kernel launches of one alignment of `slots` slots.
    pub fn launches(self, slots: usize) -> usize {
        match self {
            AlignKernels::Auto if slots <= SINGLE_BLOCK_MAX_SLOTS => 1,
            AlignKernels::SingleBlock => 1,
            _ => 2,
        }
    }
}

/// vLLM's block-size heuristic for the Marlin MoE GEMM (`fused_marlin_moe.py`,
/// "M block size selection logic"): the smallest of 8, 16, 32, 48, 64 for which the expected
/// number of slots per expert per block, `tokens·topk / experts / block`, is below 0.9; 64 when
/// none is. `experts` is the number of experts whose weights the GEMM holds (vLLM uses
/// `w1.size(0)`, the local experts under expert parallelism).
pub fn choose_block_size(tokens: usize, topk: usize, experts: usize) -> usize {
    let expected = tokens as f64 * topk as f64 / experts.max(1) as f64;
    for block in [8usize, 16, 32, 48, 64] {
        if expected / (block as f64) < 0.9 {
            return block;
        }
    }
    64
}

/// An expert-parallel map from global expert ids to this rank's local experts (−1: not local),
/// validated on the host once and kept on the device.
#[derive(Debug)]
pub struct ExpertMap {
    host: Vec<i32>,
    device: CudaSlice<i32>,
    local_experts: usize,
}

impl ExpertMap {
    /// Validates `map` (`[global experts]`, entries −1 or distinct local indices below
    /// `local_experts`) and uploads it.
    pub fn new(dev: &Device, map: &[i32], local_experts: usize) -> Result<Self> {
        const OP: &str = "ExpertMap::new";
        if map.is_empty() || map.len() > super::MAX_EXPERTS {
            return Err(Error::shape(OP, format!("{} global experts; expected 1..={}", map.len(), super::MAX_EXPERTS)));
        }
        validate_expert_map(OP, map, map.len(), Some(local_experts))?;
        Ok(ExpertMap { host: map.to_vec(), device: dev.htod(map)?, local_experts })
    }

    /// The common EP layout: rank `rank` of `ranks` owns the contiguous global experts
    /// `[rank·E/ranks, (rank+1)·E/ranks)` (`E % ranks == 0`).
    pub fn contiguous(dev: &Device, global_experts: usize, ranks: usize, rank: usize) -> Result<Self> {
        const OP: &str = "ExpertMap::contiguous";
        if ranks == 0 || rank >= ranks || global_experts % ranks != 0 {
            return Err(Error::invalid(OP, format!("rank {rank} of {ranks} over {global_experts} experts")));
        }
        let per = global_experts / ranks;
        let map: Vec<i32> = (0..global_experts).map(|g| if g / per == rank { (g % per) as i32 } else { -1 }).collect();
        Self::new(dev, &map, per)
    }

    /// The number of global experts (the valid range of routed ids).
    pub fn global_experts(&self) -> usize {
        self.host.len()
    }
    /// The number of local experts (the expert count of the weights on this rank).
    pub fn local_experts(&self) -> usize {
        self.local_experts
    }
    /// The map on the host.
    pub fn as_slice(&self) -> &[i32] {
        &self.host
    }
    /// The map on the device.
    pub fn device(&self) -> &CudaSlice<i32> {
        &self.device
    }
}

/// Which status block a launch reports into (see `LowbitMoeAlignParams::status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusWord {
    /// Accumulates the smallest bad slot of every non-validating alignment since the caller last
    /// checked (read and reset by `check_ids`).
    Pending = 0,
    /// One validating call's own ids: reset before its alignment, read right after it.
    Call = 1,
}

const STATUS_BLOCK: usize = ffi::LOWBIT_MOE_STATUS_WORDS as usize;

/// The scratch of the alignment kernels; grows as needed and is reused across calls.
#[derive(Debug)]
pub(crate) struct AlignScratch {
    chunk_counts: CudaSlice<i32>,
    expert_base: CudaSlice<i32>,
    expert_count: CudaSlice<i32>,
    done: CudaSlice<u32>,
    /// Two status blocks, [`StatusWord::Pending`] then [`StatusWord::Call`]; all ones = clean.
    status: CudaSlice<u64>,
}

/// How the slots are cut into chunks: one warp per chunk of `32·rounds` slots, about 64 chunks.
pub(crate) fn chunk_plan(slots: usize) -> (usize, usize) {
    let rounds = slots.div_ceil(64 * 32).clamp(1, MAX_ROUNDS);
    let chunk = 32 * rounds;
    (chunk, slots.div_ceil(chunk))
}

impl AlignScratch {
    pub(crate) fn new(dev: &Device) -> Result<Self> {
        let mut scratch = AlignScratch {
            chunk_counts: dev.zeros(1)?,
            expert_base: dev.zeros(1)?,
            expert_count: dev.zeros(1)?,
            done: dev.zeros(1)?,
            status: dev.zeros(2 * STATUS_BLOCK)?,
        };
        scratch.reset(dev, StatusWord::Pending)?;
        scratch.reset(dev, StatusWord::Call)?;
        Ok(scratch)
    }

    /// Makes room for an alignment of `slots` slots over `num_experts` experts (the two-kernel
    /// path's per-chunk counts and per-expert tables); allocates only when it grows.
    pub(crate) fn ensure(&mut self, dev: &Device, slots: usize, num_experts: usize) -> Result<()> {
        self.ensure_chunks(dev, chunk_plan(slots).1, num_experts)
    }

    /// As [`AlignScratch::ensure`], for `num_chunks` chunks.
    pub(crate) fn ensure_chunks(&mut self, dev: &Device, num_chunks: usize, num_experts: usize) -> Result<()> {
        if self.chunk_counts.len() < num_chunks * num_experts {
            self.chunk_counts = dev.zeros(num_chunks * num_experts)?;
        }
        if self.expert_base.len() < num_experts {
            self.expert_base = dev.zeros(num_experts)?;
            self.expert_count = dev.zeros(num_experts)?;
        }
        Ok(())
    }

    /// Device bytes held.
    pub(crate) fn bytes(&self) -> usize {
        (self.chunk_counts.len() + self.expert_base.len() + self.expert_count.len() + self.done.len()) * 4
            + self.status.len() * 8
    }

    /// Sets a status block to all ones ("nothing to report") on lowbit's stream: a driver memset,
    /// stream-ordered and capturable in a CUDA graph, with no host-to-device copy.
    pub(crate) fn reset(&mut self, dev: &Device, which: StatusWord) -> Result<()> {
        const OP: &str = "moe status reset";
        dev.check_buffer(OP, "workspace status", &self.status, 2 * STATUS_BLOCK)?;
        dev.context().bind_to_thread().map_err(Error::cuda("cuCtxSetCurrent"))?;
        let (base, _guard) = dev.ptr_mut(OP, "status", &mut self.status, 8)?;
        let addr = base + (which as usize * STATUS_BLOCK * 8) as u64;
        // SAFETY: `status` holds 2·STATUS_BLOCK u64 words (checked above), so the block at `addr`
        // (STATUS_BLOCK·8 bytes) lies inside the allocation; all-ones bytes are a valid u64. The
        // memset is queued on lowbit's stream, the stream every kernel using the buffer runs on,
        // and the guard orders it with the buffer's other accesses.
        unsafe { cudarc::driver::result::memset_d8_async(addr, 0xFF, STATUS_BLOCK * 8, dev.stream().cu_stream()) }
            .map_err(Error::cuda("cuMemsetD8Async"))
    }

    /// Synchronises, reads one status block and resets it when it holds something: the smallest
    /// slot holding an out-of-range id since it was last reset, if any.
    pub(crate) fn take_bad_slot(&mut self, dev: &Device, which: StatusWord) -> Result<Option<usize>> {
        let st = dev.dtoh(&self.status)?;
        let bad = st[which as usize * STATUS_BLOCK + ffi::LOWBIT_MOE_STATUS_BAD_ID as usize];
        if bad == u64::MAX {
            return Ok(None);
        }
        self.reset(dev, which)?;
        Ok(Some(bad as usize))
    }
}

/// The output buffers of an alignment: `capacity` is at least the problem's bound
/// ([`align_capacity`]) and a multiple of the block size; the kernels write all of it.
#[derive(Debug)]
pub(crate) struct AlignBuffers {
    pub(crate) sorted_token_ids: CudaSlice<i32>,
    pub(crate) expert_ids: CudaSlice<i32>,
    pub(crate) num_tokens_post_padded: CudaSlice<i32>,
    pub(crate) capacity: usize,
    pub(crate) block_size: usize,
}

impl AlignBuffers {
    /// Buffers for `capacity` slots (a positive multiple of `block_size`); the alignment kernels
    /// write every element.
    pub(crate) fn new(dev: &Device, capacity: usize, block_size: usize) -> Result<Self> {
        if block_size == 0 || capacity == 0 || capacity % block_size != 0 {
            return Err(Error::invalid("AlignBuffers::new", format!("capacity {capacity}, block {block_size}")));
        }
        // SAFETY: `launch_align` writes every element of all three (both paths fill every
        // position of [0, capacity) not holding a slot with the sentinel and every block's expert
        // id, and write the total); they are not read before it runs.
        unsafe {
            Ok(AlignBuffers {
                sorted_token_ids: dev.alloc_for_kernel(capacity)?,
                expert_ids: dev.alloc_for_kernel(capacity / block_size)?,
                num_tokens_post_padded: dev.alloc_for_kernel(1)?,
                capacity,
                block_size,
            })
        }
    }

    /// Device bytes held.
    pub(crate) fn bytes(&self) -> usize {
        (self.capacity + self.capacity / self.block_size + 1) * 4
    }

    /// The view the Marlin MoE GEMM consumes.
    pub(crate) fn blocks(&self) -> MoeBlocks<'_> {
        MoeBlocks {
            sorted_token_ids: &self.sorted_token_ids,
            expert_ids: &self.expert_ids,
            num_tokens_post_padded: &self.num_tokens_post_padded,
            block_size: self.block_size,
        }
    }
}

/// Queues the alignment kernels into `out` (one launch up to [`SINGLE_BLOCK_MAX_SLOTS`] slots
/// under [`AlignKernels::Auto`], two above). Arguments must have been validated with
/// [`validate_align_args`]; `topk_ids` must hold `slots` ids; `out` must hold at least
/// [`align_capacity`] positions. Out-of-range ids are skipped and recorded in `scratch`'s status
/// block `status`. Never synchronises, copies or (once `scratch` was ensured for `slots`)
/// allocates.
#[allow(clippy::too_many_arguments)]
pub(crate) fn launch_align(
    dev: &Device,
    op: &'static str,
    topk_ids: &CudaSlice<i32>,
    slots: usize,
    num_experts: usize,
    expert_map: Option<&ExpertMap>,
    out: &mut AlignBuffers,
    scratch: &mut AlignScratch,
    status: StatusWord,
    kernels: AlignKernels,
) -> Result<()> {
    dev.check_buffer(op, "topk_ids", topk_ids, slots)?;
    if let Some(m) = expert_map {
        if m.global_experts() != num_experts {
            return Err(Error::shape(
                op,
                format!("the expert map covers {} global experts, the routing {num_experts}", m.global_experts()),
            ));
        }
        dev.check_buffer(op, "expert_map", m.device(), num_experts)?;
    }
    // A workspace belongs to the device it was created on (its scratch is allocated there).
    dev.check_buffer(op, "workspace status", &scratch.status, 2 * STATUS_BLOCK)?;
    let bs = out.block_size;
    if out.capacity < align_capacity(slots, num_experts, bs) || out.capacity % bs != 0 {
        return Err(Error::invalid(op, "alignment buffers were sized for another problem"));
    }
    dev.check_buffer(op, "sorted_token_ids", &out.sorted_token_ids, out.capacity)?;
    dev.check_buffer(op, "expert_ids", &out.expert_ids, out.capacity / bs)?;
    dev.check_buffer(op, "num_tokens_post_padded", &out.num_tokens_post_padded, 1)?;
    let single = kernels.single(op, slots)?;
    let (chunk, num_chunks) = chunk_plan(slots);
    if !single {
        scratch.ensure(dev, slots, num_experts)?;
    }

    let (ids_ptr, _g1) = dev.ptr(op, "topk_ids", topk_ids, 4)?;
    let map_guard = expert_map.map(|m| dev.ptr(op, "expert_map", m.device(), 4)).transpose()?;
    let (sorted, _g2) = dev.ptr_mut(op, "sorted_token_ids", &mut out.sorted_token_ids, 4)?;
    let (eids, _g3) = dev.ptr_mut(op, "expert_ids", &mut out.expert_ids, 4)?;
    let (ntpp, _g4) = dev.ptr_mut(op, "num_tokens_post_padded", &mut out.num_tokens_post_padded, 4)?;
    let (counts, _g5) = dev.ptr_mut(op, "chunk_counts", &mut scratch.chunk_counts, 4)?;
    let (base, _g6) = dev.ptr_mut(op, "expert_base", &mut scratch.expert_base, 4)?;
    let (cnt, _g7) = dev.ptr_mut(op, "expert_count", &mut scratch.expert_count, 4)?;
    let (done, _g8) = dev.ptr_mut(op, "done", &mut scratch.done, 4)?;
    let (status_base, _g9) = dev.ptr_mut(op, "status", &mut scratch.status, 8)?;
    let params = ffi::LowbitMoeAlignParams {
        topk_ids: ids_ptr as *const i32,
        expert_map: map_guard.as_ref().map_or(0, |g| g.0) as *const i32,
        sorted_token_ids: sorted as *mut i32,
        expert_ids: eids as *mut i32,
        num_tokens_post_padded: ntpp as *mut i32,
        chunk_counts: counts as *mut i32,
        expert_base: base as *mut i32,
        expert_count: cnt as *mut i32,
        done: done as *mut u32,
        status: (status_base + (status as usize * STATUS_BLOCK * 8) as u64) as *mut _,
        slots: slots as i64,
        capacity: out.capacity as i64,
        num_experts: num_experts as i32,
        block_size: bs as i32,
        chunk: chunk as i32,
        num_chunks: num_chunks as i32,
    };
    if single {
        let f = dev.function(FAMILY, "lowbit_moe_align_single", COUNT_SMEM_LIMIT)?;
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (SINGLE_THREADS as u32, 1, 1),
            shared_mem_bytes: (32 * num_experts.div_ceil(2) * 4) as u32,
        };
        // SAFETY: topk_ids holds `slots` ≤ 1024 ids, one per thread of the 1024-thread block
        // (checked); every id is range-checked before it indexes anything; sorted_token_ids holds
        // `capacity` ≥ align_capacity(..) entries, which bounds every position written (an
        // expert's list starts at the padded prefix of the counts, the padded total is at most
        // align_capacity, padding runs to `capacity`); expert_ids holds capacity / block_size
        // entries; the expert map `num_experts` entries; the status pointer is one block inside
        // the two-block status buffer. `num_experts ≤ 1024` fits the static tables and the
        // dynamic histograms (32 rows of ceil(E/2) words, within the limit raised when the
        // function was loaded). The guards keep every buffer ordered on the stream.
        unsafe { dev.launch(&f, cfg, params)? };
        return Ok(());
    }
    let count = dev.function(FAMILY, "lowbit_moe_align_count", COUNT_SMEM_LIMIT)?;
    let scatter = dev.function(FAMILY, "lowbit_moe_align_scatter", 0)?;
    let count_cfg = LaunchConfig {
        grid_dim: (num_chunks.div_ceil(COUNT_WARPS) as u32, 1, 1),
        block_dim: ((32 * COUNT_WARPS) as u32, 1, 1),
        shared_mem_bytes: (COUNT_WARPS * num_experts.div_ceil(2) * 4) as u32,
    };
    let fill_blocks = out.capacity.div_ceil(32 * SCATTER_WARPS * 4).min(dev.info().sm_count.max(1) * 4);
    let scatter_cfg = LaunchConfig {
        grid_dim: (num_chunks.div_ceil(SCATTER_WARPS).max(fill_blocks).max(1) as u32, 1, 1),
        block_dim: ((32 * SCATTER_WARPS) as u32, 1, 1),
        shared_mem_bytes: (SCATTER_WARPS * num_experts * 4) as u32,
    };
    // SAFETY: topk_ids holds `slots` ids (checked); every id is range-checked on the device
    // before it indexes anything. sorted_token_ids holds `capacity` ≥ align_capacity(..)
    // entries, which bounds every position the scatter writes (an expert's list starts at the
    // padded prefix of the counts and the padded total is at most align_capacity; the tail fill
    // runs to `capacity`); expert_ids holds capacity / block_size entries; the scratch holds
    // num_chunks·E counts, E bases and counts, the zeroed ticket (ensured above) and the status
    // pointer is one block inside the two-block status buffer. `num_experts ≤ 1024` and the
    // chunk plan (≤ 16 rounds of 32) match the kernels' fixed limits and shared-memory sizes (the
    // count kernel's limit was raised to its worst case when the function was loaded). The
    // guards keep every buffer ordered on the stream until after both launches.
    unsafe {
        dev.launch(&count, count_cfg, params)?;
        dev.launch(&scatter, scatter_cfg, params)?;
    }
    Ok(())
}

/// The result of [`moe_align_block_size`], on the device.
#[derive(Debug)]
pub struct MoeAlignment {
    pub(crate) buffers: AlignBuffers,
    tokens: usize,
    topk: usize,
    num_experts: usize,
}

impl MoeAlignment {
    /// `[capacity]`: slots grouped by expert, padding = `tokens·topk`.
    pub fn sorted_token_ids(&self) -> &CudaSlice<i32> {
        &self.buffers.sorted_token_ids
    }
    /// `[capacity / block_size]`: the (local) expert of every block, −1 when none.
    pub fn expert_ids(&self) -> &CudaSlice<i32> {
        &self.buffers.expert_ids
    }
    /// `[1]`: the padded slot count actually used.
    pub fn num_tokens_post_padded(&self) -> &CudaSlice<i32> {
        &self.buffers.num_tokens_post_padded
    }
    pub fn block_size(&self) -> usize {
        self.buffers.block_size
    }
    /// Length of `sorted_token_ids`, see [`super::align_capacity`].
    pub fn capacity(&self) -> usize {
        self.buffers.capacity
    }
    pub fn tokens(&self) -> usize {
        self.tokens
    }
    pub fn topk(&self) -> usize {
        self.topk
    }
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// The block description the Marlin MoE GEMM consumes.
    pub fn blocks(&self) -> MoeBlocks<'_> {
        self.buffers.blocks()
    }
}

/// `moe_align_block_size(topk_ids [tokens, topk], num_experts, block_size, expert_map)`.
///
/// Validates the arguments, runs the kernels, then synchronises once to read the status word: an
/// expert id outside `[0, num_experts)` is reported as [`Error::InvalidArgument`] naming the
/// first offending token and k. With an expert map, `num_experts` is the global expert count.
pub fn moe_align_block_size(
    dev: &Device,
    topk_ids: &CudaSlice<i32>,
    tokens: usize,
    topk: usize,
    num_experts: usize,
    block_size: usize,
    expert_map: Option<&ExpertMap>,
) -> Result<MoeAlignment> {
    moe_align_block_size_with(dev, topk_ids, tokens, topk, num_experts, block_size, expert_map, AlignKernels::Auto)
}

/// [`moe_align_block_size`] on the kernels `kernels` selects (the outputs are the same on every
/// path; forcing one is for tests and benchmarks).
#[allow(clippy::too_many_arguments)]
pub fn moe_align_block_size_with(
    dev: &Device,
    topk_ids: &CudaSlice<i32>,
    tokens: usize,
    topk: usize,
    num_experts: usize,
    block_size: usize,
    expert_map: Option<&ExpertMap>,
    kernels: AlignKernels,
) -> Result<MoeAlignment> {
    const OP: &str = "moe_align_block_size";
    validate_align_args(OP, tokens, topk, num_experts, block_size)?;
    let slots = tokens * topk;
    dev.check_buffer(OP, "topk_ids", topk_ids, slots)?;
    kernels.single(OP, slots)?;
    let mut buffers = AlignBuffers::new(dev, align_capacity(slots, num_experts, block_size), block_size)?;
    let mut scratch = AlignScratch::new(dev)?;
    launch_align(
        dev,
        OP,
        topk_ids,
        slots,
        num_experts,
        expert_map,
        &mut buffers,
        &mut scratch,
        StatusWord::Call,
        kernels,
    )?;
    if let Some(bad) = scratch.take_bad_slot(dev, StatusWord::Call)? {
        return Err(bad_id_error(OP, bad, topk, num_experts));
    }
    Ok(MoeAlignment { buffers, tokens, topk, num_experts })
}

/// What the host knows about the alignments that reported into a pending status word since it
/// was last checked: their `(topk, num_experts)`, needed to name a bad slot as token and k.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct PendingIds {
    shape: Option<(usize, usize)>,
    mixed: bool,
}

impl PendingIds {
    pub(crate) fn record(&mut self, topk: usize, num_experts: usize) {
        match self.shape {
            None => self.shape = Some((topk, num_experts)),
            Some(s) if s != (topk, num_experts) => self.mixed = true,
            Some(_) => {}
        }
    }

    /// Synchronises, reads and resets the pending status word of `scratch`: `Err` naming the
    /// smallest offending slot seen since the last check (as token and k when every call since
    /// used the same top-k), `Ok` when there was none. Either way the record starts afresh.
    pub(crate) fn check(&mut self, op: &'static str, dev: &Device, scratch: &mut AlignScratch) -> Result<()> {
        let bad = scratch.take_bad_slot(dev, StatusWord::Pending)?;
        let seen = std::mem::take(self);
        let Some(slot) = bad else { return Ok(()) };
        match seen.shape {
            Some((topk, e)) if !seen.mixed => Err(bad_id_error(op, slot, topk, e)),
            _ => Err(Error::invalid(
                op,
                format!(
                    "topk_ids held an out-of-range expert id at slot {slot} (t·topk + k) of a call since the last \
                     check; the calls used different top-k or expert counts, so it cannot be named as token and k"
                ),
            )),
        }
    }
}

/// Reusable alignment for engines that call it every step: the outputs are sized exactly per
/// problem and reused while the size repeats, the scratch grows; [`AlignWorkspace::align`] never
/// blocks the host nor copies to or from it. Out-of-range ids are skipped on the device (never
/// used as an index) and accumulate in a device-side status word (the smallest offending slot)
/// until [`AlignWorkspace::check_ids`] reads and clears it.
#[derive(Debug)]
pub struct AlignWorkspace {
    scratch: AlignScratch,
    buffers: Option<AlignBuffers>,
    pending: PendingIds,
    kernels: AlignKernels,
}

impl AlignWorkspace {
    pub fn new(dev: &Device) -> Result<Self> {
        Self::with_kernels(dev, AlignKernels::Auto)
    }

    /// A workspace whose alignments run on `kernels` (for tests and benchmarks; the outputs are
    /// the same on every path).
    pub fn with_kernels(dev: &Device, kernels: AlignKernels) -> Result<Self> {
        Ok(AlignWorkspace { scratch: AlignScratch::new(dev)?, buffers: None, pending: PendingIds::default(), kernels })
    }

    /// Queues `moe_align_block_size` (see [`moe_align_block_size`]) and returns the blocks for
    /// the Marlin MoE GEMM.
    #[allow(clippy::too_many_arguments)]
    pub fn align(
        &mut self,
        dev: &Device,
        topk_ids: &CudaSlice<i32>,
        tokens: usize,
        topk: usize,
        num_experts: usize,
        block_size: usize,
        expert_map: Option<&ExpertMap>,
    ) -> Result<MoeBlocks<'_>> {
        const OP: &str = "AlignWorkspace::align";
        validate_align_args(OP, tokens, topk, num_experts, block_size)?;
        let slots = tokens * topk;
        dev.check_buffer(OP, "topk_ids", topk_ids, slots)?;
        let capacity = align_capacity(slots, num_experts, block_size);
        if self.buffers.as_ref().is_none_or(|b| b.capacity != capacity || b.block_size != block_size) {
            self.buffers = None;
            self.buffers = Some(AlignBuffers::new(dev, capacity, block_size)?);
        }
        let Some(buffers) = self.buffers.as_mut() else {
            return Err(Error::invalid(OP, "alignment buffers missing"));
        };
        launch_align(
            dev,
            OP,
            topk_ids,
            slots,
            num_experts,
            expert_map,
            buffers,
            &mut self.scratch,
            StatusWord::Pending,
            self.kernels,
        )?;
        self.pending.record(topk, num_experts);
        Ok(buffers.blocks())
    }

    /// Synchronises and reports the smallest out-of-range expert id slot seen since the last
    /// check (a typed [`Error::InvalidArgument`] naming token and k), then clears the status.
    pub fn check_ids(&mut self, dev: &Device) -> Result<()> {
        self.pending.check("AlignWorkspace::check_ids", dev, &mut self.scratch)
    }
}

pub(crate) fn bad_id_error(op: &'static str, slot: usize, topk: usize, num_experts: usize) -> Error {
    Error::invalid(
        op,
        format!(
            "topk_ids holds an expert id outside [0, {num_experts}) at token {}, k {}",
            slot / topk.max(1),
            slot % topk.max(1)
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_plan_limits() {
        assert_eq!(chunk_plan(1), (32, 1));
        assert_eq!(chunk_plan(32768), (512, 64));
        let (c, n) = chunk_plan(10_000_000);
        assert_eq!(c, 32 * MAX_ROUNDS);
        assert!(n * c >= 10_000_000);
    }
}
