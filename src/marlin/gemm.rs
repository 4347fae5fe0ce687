//! The Marlin W4A16 GEMM (DESIGN §4): `Y[M, N] = X[M, K] · dequant(W)` with INT4 weights in the
//! Marlin layout, X and scales bf16 or f16, f32 accumulation, output in X's dtype; dense and MoE.
//!
//! * [`marlin_gemm`] / [`marlin_gemm_into`]: dense; any `M ≥ 1`, a row stride `lda ≥ K`,
//!   group sizes 32/64/128/channelwise, act-order (activations gathered by the weights' `perm`).
//! * [`MarlinLinear`]: owns the weights and a workspace; `forward(dev, x, m)`.
//! * [`marlin_moe_gemm`]: the expert GEMM over [`MarlinExperts`] driven by the routing blocks of
//!   `moe_align_block_size` ([`MoeBlocks`]).
//! * [`plan_gemm`] / [`plan_moe_gemm`]: the tile-config choice, a pure function of the shape and
//!   the SM count, which only ever names kernels of the built table.
//!
//! The weights the kernel multiplies by are exactly `T(q · s)` (one rounding of the exact
//! product), the values `fake_quant` produces: training and rollout see the same weights.
//! The grid is persistent: about one CTA per resident CTA slot, whole tiles round-robin, then the
//! remaining tiles' K-iterations split evenly over the CTAs (stream-K). Pieces of a cut tile are
//! summed in a fixed order, so the same inputs give bit-identical outputs on every run (on the
//! same device: the plan depends on the SM count).
//!
//! Shape limits: `N % 64 == 0` (the Marlin layout), `K % 64 == 0` (the kernels' pipeline stage is
//! 64 or 128 K-rows deep and has no partial-stage predication; the layout itself needs only
//! `K % 16`, and every group size already implies `K % 32`), `K % 128 == 0` selects the deeper
//! 128-row stages for blocks of up to 48 rows (every planned configuration fits the 99 KiB of
//! shared memory sm_86/sm_89 allow, see [`SMEM_BUDGET`]).

use std::sync::Mutex;

use cudarc::driver::{CudaSlice, DeviceRepr, DeviceSlice, LaunchConfig};
use half::{bf16, f16};

use crate::device::{kernel_declared, Device};
use crate::dtype::{DType, ScaleFloat};
use crate::error::{Error, Result};
use crate::ffi;
use crate::format::{GroupSize, QuantShape};
use crate::marlin::layout::{scale_exp_of, MarlinWeights};

const FAMILY: &str = "marlin";
/// Threads per block of every GEMM kernel.
pub const THREADS: u32 = 256;
/// Pipeline stages of the GEMM kernels (all but [`BlockShape::N64K128`], which has 8:
/// [`BlockShape::stages`]).
pub const STAGES: usize = 4;
/// The most pieces stream-K cuts one tile into (each at least two stage iterations).
pub const MAX_PIECES: usize = 16;
/// The routing block sizes the MoE GEMM accepts.
pub const MOE_BLOCK_SIZES: [usize; 5] = [8, 16, 32, 48, 64];

// SAFETY: plain `repr(C)` data (integers and raw device addresses) passed to kernels by value.
unsafe impl DeviceRepr for ffi::LowbitMarlinGemmParams {}
// SAFETY: as above.
unsafe impl DeviceRepr for ffi::LowbitMarlinGemmGatherParams {}

/// The 16-bit activation types the GEMM runs on (scales use the same type): bf16 and f16.
pub trait Half: ScaleFloat {
    /// The workspace's act-order gather buffer of this type.
    #[doc(hidden)]
    fn gather_buffer(ws: &mut MarlinWorkspace) -> &mut Option<CudaSlice<Self>>;
}
impl Half for bf16 {
    fn gather_buffer(ws: &mut MarlinWorkspace) -> &mut Option<CudaSlice<Self>> {
        &mut ws.gather_bf16
    }
}
impl Half for f16 {
    fn gather_buffer(ws: &mut MarlinWorkspace) -> &mut Option<CudaSlice<Self>> {
        &mut ws.gather_f16
    }
}

/// The block tile of a GEMM kernel instance: output columns × K-rows per pipeline stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockShape {
    /// 128 columns (two Marlin n-tiles), 128-deep stages: small M, `K % 128 == 0`.
    N128K128,
    /// 256 columns (four n-tiles), 64-deep stages: larger M, or `K % 128 != 0`.
    N256K64,
    /// 64 columns (one n-tile), 128-deep stages, 8 of them, 2 CTAs per SM: dense 9..=16 rows
    /// when its stream-K pieces are fewer bytes (half the bytes per piece, 16 rows × 64 f32, and
    /// fewer pieces: fewer CTAs), with 2 × 7 stages × 4 KiB = 56 KiB of weights in flight per SM
    /// (the m1 [`BlockShape::N128K128`] block: 72 KiB).
    N64K128,
}

impl BlockShape {
    /// The name suffix of the kernel instances.
    pub const fn name(self) -> &'static str {
        match self {
            BlockShape::N128K128 => "n128k128",
            BlockShape::N256K64 => "n256k64",
            BlockShape::N64K128 => "n64k128",
        }
    }
    /// Every block shape.
    pub const ALL: [BlockShape; 3] = [BlockShape::N128K128, BlockShape::N256K64, BlockShape::N64K128];
    /// Output columns per block.
    pub const fn n_blk(self) -> usize {
        match self {
            BlockShape::N128K128 => 128,
            BlockShape::N256K64 => 256,
            BlockShape::N64K128 => 64,
        }
    }
    /// K-rows per pipeline stage.
    pub const fn k_blk(self) -> usize {
        match self {
            BlockShape::N128K128 | BlockShape::N64K128 => 128,
            BlockShape::N256K64 => 64,
        }
    }
    /// Pipeline stages of the instances with this block.
    pub const fn stages(self) -> usize {
        match self {
            BlockShape::N64K128 => 8,
            _ => STAGES,
        }
    }
}

/// A launch plan: which kernel instance, how many CTAs, how much shared memory and workspace.
///
/// The schedule (`csrc/marlin/gemm.cuh`, "Schedule"; the kernel computes it, these methods mirror
/// it): tile `t` is (row block `t % m_blocks`, column block `t / m_blocks`); the first
/// [`GemmPlan::dp_tiles`] tiles go whole, round-robin, to the `ctas` CTAs; the stage iterations
/// of the other tiles are split into [`GemmPlan::sk_ctas`] equal ranges (stream-K), and a tile cut
/// into pieces is summed, in a fixed order, by its last piece to finish. For the MoE GEMM the
/// kernel uses the row blocks of the used prefix (`num_tokens_post_padded`, on the device)
/// instead of `m_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GemmPlan {
    /// m16 tiles per block (1..=4): the block covers `16 · m_tiles` rows.
    pub m_tiles: usize,
    /// The block tile.
    pub block: BlockShape,
    /// CTAs in the (one-dimensional, persistent) grid.
    pub ctas: usize,
    /// Stage iterations per tile, `K / k_blk`.
    pub iters: usize,
    /// Row blocks (dense: `ceil(M / (16 · m_tiles))`; MoE: routing blocks of the capacity).
    pub m_blocks: usize,
    /// Column blocks, `ceil(N / n_blk)`.
    pub n_blocks: usize,
    /// The MoE GEMM (its tiles in use are only known on the device).
    pub moe: bool,
}

impl GemmPlan {
    /// Rows per block.
    pub fn m_blk(&self) -> usize {
        16 * self.m_tiles
    }

    /// The kernel instance's name (`lowbit_marlin[_moe]_gemm_<dtype>_m<t>_<block>`).
    pub fn kernel_name(&self, dtype: DType, moe: bool) -> String {
        format!(
            "lowbit_marlin_{}gemm_{}_m{}_{}",
            if moe { "moe_" } else { "" },
            dtype.name(),
            self.m_tiles,
            self.block.name()
        )
    }

    /// Dynamic shared memory in bytes: the larger of the pipeline, `STAGES` × (B tiles, A rows,
    /// scale rows), and the f32 epilogue tile. Mirrors `smem_bytes()` in `csrc/marlin/gemm.cuh`;
    /// the kernel traps when it is given less.
    pub fn smem_bytes(&self) -> usize {
        let (m_blk, n_blk, k_blk) = (self.m_blk(), self.block.n_blk(), self.block.k_blk());
        let stage = (k_blk / 16) * (n_blk / 64) * 512 + m_blk * k_blk * 2 + (k_blk / 32) * n_blk * 2;
        (self.block.stages() * stage).max(m_blk * (n_blk + 8) * 4)
    }

    /// Output tiles (`m_blocks · n_blocks`).
    pub fn tiles(&self) -> usize {
        self.m_blocks * self.n_blocks
    }

    /// Blocks in the (one-dimensional) grid: `ctas`.
    pub fn grid_blocks(&self) -> usize {
        self.ctas
    }

    /// Tiles computed whole in the data-parallel rounds (a multiple of `ctas`).
    pub fn dp_tiles(&self) -> usize {
        self.tiles() / self.ctas.max(1) * self.ctas.max(1)
    }

    /// Tiles left to stream-K.
    pub fn sk_tiles(&self) -> usize {
        self.tiles() - self.dp_tiles()
    }

    /// CTAs sharing the stream-K iterations (0 when every tile is data-parallel).
    pub fn sk_ctas(&self) -> usize {
        let w = self.sk_tiles() * self.iters;
        let min_it = 2usize.max(self.iters.div_ceil(MAX_PIECES));
        if w == 0 {
            0
        } else {
            (w / min_it).clamp(1, self.ctas.max(1))
        }
    }

    /// Whether some tile is cut into pieces (summed through the workspace).
    pub fn cuts_tiles(&self) -> bool {
        let (w, g) = (self.sk_tiles() * self.iters, self.sk_ctas());
        // Every range boundary c·w/g (0 < c < g) must fall on a tile boundary for no cut.
        (1..g).any(|c| (c * w / g) % self.iters != 0)
    }

    /// The most pieces any tile is cut into (1: none is cut).
    pub fn max_pieces_per_tile(&self) -> usize {
        let (w, g, it) = (self.sk_tiles() * self.iters, self.sk_ctas(), self.iters);
        if g == 0 {
            return 1;
        }
        let owner = |x: usize| ((x + 1) * g).div_ceil(w) - 1;
        (0..self.sk_tiles()).map(|t| owner((t + 1) * it - 1) - owner(t * it) + 1).max().unwrap_or(1)
    }

    /// The f32 bytes the stream-K pieces of a full block of rows write (and the last piece of
    /// each tile reads back): about one piece per stream-K CTA plus one per stream-K tile, each
    /// `m_blk · n_blk` floats. The planner's measure for the block choice at 9..=16 rows.
    pub fn piece_bytes_estimate(&self) -> usize {
        if !self.cuts_tiles() {
            return 0;
        }
        (self.sk_ctas() + self.sk_tiles()) * self.m_blk() * self.block.n_blk() * 4
    }

    /// Whether the launch may cut a tile: dense, when [`GemmPlan::cuts_tiles`]; MoE, always
    /// (the tiles in use are counted on the device).
    pub fn needs_workspace(&self) -> bool {
        self.moe || self.cuts_tiles()
    }

    /// f32 elements of stream-K pieces the launch needs in the workspace: two tile slots per CTA
    /// (0 when no tile is cut).
    pub fn workspace_partials(&self) -> usize {
        if self.needs_workspace() {
            2 * self.ctas * self.m_blk() * self.block.n_blk()
        } else {
            0
        }
    }

    /// Stream-K arrival counters the launch needs in the workspace: one per tile (0 when no tile
    /// is cut).
    pub fn workspace_counters(&self) -> usize {
        if self.needs_workspace() {
            self.tiles()
        } else {
            0
        }
    }
}

/// Resident CTAs per SM the instances are built for (`instances.list` launch bounds: m1 3 (2 with
/// [`BlockShape::N64K128`]), m2 2, larger blocks 1); the persistent grid has this many CTAs per
/// SM. Where shared memory allows fewer (sm_86/sm_89), the CTAs run in as many waves of equal
/// work: still balanced.
pub const fn ctas_per_sm(m_tiles: usize, block: BlockShape) -> usize {
    match (m_tiles, block) {
        (1, BlockShape::N64K128) => 2,
        (1, _) => 3,
        (2, _) => 2,
        _ => 1,
    }
}

/// Checks the GEMM's shape limits: `N % 64 == 0`, `K % 64 == 0`, a supported group.
pub fn check_gemm_shape(op: &'static str, n: usize, k: usize, group: usize) -> Result<()> {
    if n == 0 || n % 64 != 0 {
        return Err(Error::shape(op, format!("N = {n} must be a positive multiple of 64")));
    }
    if k == 0 || k % 64 != 0 {
        return Err(Error::shape(op, format!("K = {k} must be a positive multiple of 64 for the Marlin GEMM")));
    }
    if !(group == k || ([32, 64, 128].contains(&group) && k % group == 0)) {
        return Err(Error::shape(op, format!("group size {group} with K = {k}: expected 32, 64, 128 or K")));
    }
    if k.checked_mul(n).is_none_or(|e| e > i64::MAX as usize / 4) {
        return Err(Error::shape(op, format!("[{n}, {k}] is too large")));
    }
    Ok(())
}

/// Shared memory every planned configuration must fit: the 99 KiB opt-in limit of sm_86/sm_89
/// (A10, A40, L4, L40S, RTX 30/40 run the sm_80 SASS), less the kernel's static shared memory
/// (the per-row tables, under 1.5 KiB).
pub const SMEM_BUDGET: usize = 99 * 1024 - 1536;

/// Whether the planners ever pick `m_tiles` with `block`. 64 rows with 128-deep stages would need
/// 100 KiB of shared memory, more than sm_86/sm_89 allow: that combination is never built.
/// [`BlockShape::N64K128`] exists for 16-row dense blocks only.
pub const fn plannable(m_tiles: usize, block: BlockShape) -> bool {
    match block {
        BlockShape::N128K128 => m_tiles < 4,
        BlockShape::N256K64 => true,
        BlockShape::N64K128 => m_tiles == 1,
    }
}

/// Whether the planners ever pick `block` for the MoE GEMM (only the dense GEMM has
/// [`BlockShape::N64K128`]).
pub const fn plannable_moe(m_tiles: usize, block: BlockShape) -> bool {
    plannable(m_tiles, block) && !matches!(block, BlockShape::N64K128)
}

fn block_shape(m_tiles: usize, n: usize, k: usize) -> BlockShape {
    if k % 128 == 0 && (m_tiles <= 2 || (n % 256 != 0 && plannable(m_tiles, BlockShape::N128K128))) {
        BlockShape::N128K128
    } else {
        BlockShape::N256K64
    }
}

/// The dense tile configuration for `M × N × K` on a device with `sm_count` SMs. Pure: same
/// inputs, same plan. See [`GemmPlan`] for the schedule.
pub fn plan_gemm(m: usize, n: usize, k: usize, sm_count: usize) -> Result<GemmPlan> {
    const OP: &str = "plan_gemm";
    if m == 0 {
        return Err(Error::shape(OP, "M must be at least 1"));
    }
    if m > i32::MAX as usize {
        return Err(Error::shape(OP, format!("M = {m} exceeds i32::MAX")));
    }
    check_gemm_shape(OP, n, k, k)?;
    let m_tiles = m.div_ceil(16).min(4);
    let dense = |block: BlockShape| {
        let m_blocks = m.div_ceil(16 * m_tiles);
        let n_blocks = n.div_ceil(block.n_blk());
        let tiles = m_blocks * n_blocks;
        let iters = k / block.k_blk();
        // One CTA per resident slot, but at least two stage iterations per CTA on average.
        let slots = sm_count.max(1) * ctas_per_sm(m_tiles, block);
        let ctas = slots.min((tiles * iters / 2).max(1));
        GemmPlan { m_tiles, block, ctas, iters, m_blocks, n_blocks, moe: false }
    };
    let mut plan = dense(block_shape(m_tiles, n, k));
    // 9..=16 rows: stream-K pieces are 16 full rows of f32; take the narrow block when its
    // pieces are fewer bytes (ties keep the 128-column block and its 3 CTAs per SM).
    if m_tiles == 1 && m > 8 && plan.block == BlockShape::N128K128 {
        let narrow = dense(BlockShape::N64K128);
        if narrow.piece_bytes_estimate() < plan.piece_bytes_estimate() {
            plan = narrow;
        }
    }
    if plan.grid_blocks() > i32::MAX as usize {
        return Err(Error::shape(OP, format!("{m} x {n} needs too many blocks")));
    }
    Ok(plan)
}

/// The MoE tile configuration: one routing block of `block_size` rows per row block; a
/// persistent grid over the tiles the kernel finds in use (the used prefix is on the device).
pub fn plan_moe_gemm(block_size: usize, capacity: usize, n: usize, k: usize, sm_count: usize) -> Result<GemmPlan> {
    const OP: &str = "plan_moe_gemm";
    if !MOE_BLOCK_SIZES.contains(&block_size) {
        return Err(Error::invalid(OP, format!("block size {block_size} is not one of {MOE_BLOCK_SIZES:?}")));
    }
    if capacity == 0 || capacity % block_size != 0 {
        return Err(Error::shape(
            OP,
            format!("sorted_token_ids capacity {capacity} must be a positive multiple of the block size {block_size}"),
        ));
    }
    check_gemm_shape(OP, n, k, k)?;
    let m_tiles = block_size.div_ceil(16);
    let m_blocks = capacity / block_size;
    let block = block_shape(m_tiles, n, k);
    let n_blocks = n.div_ceil(block.n_blk());
    // One CTA per resident slot whatever the capacity: the tiles in use are counted on the
    // device, so the grid (and with it the stream-K split and the result) does not depend on how
    // large the routing buffers are.
    let ctas = sm_count.max(1) * ctas_per_sm(m_tiles, block);
    let plan = GemmPlan { m_tiles, block, ctas, iters: k / block.k_blk(), m_blocks, n_blocks, moe: true };
    if plan.tiles() > i32::MAX as usize {
        return Err(Error::shape(OP, "too many routing blocks"));
    }
    Ok(plan)
}

/// Caller-owned, reusable scratch space of the GEMM: stream-K pieces and arrival counters.
///
/// Grows on demand (never shrinks); the counters are zero between launches (the kernel resets
/// them). Reuse one per stream; it is tied to the device it was first used on.
#[derive(Debug, Default)]
pub struct MarlinWorkspace {
    partials: Option<CudaSlice<f32>>,
    counters: Option<CudaSlice<i32>>,
    /// Per (token, column block) arrival counters of the fused top-k sum.
    sum_counters: Option<CudaSlice<i32>>,
    /// Act-order activations gathered by `perm` (`[m, K]`), per dtype.
    gather_bf16: Option<CudaSlice<bf16>>,
    gather_f16: Option<CudaSlice<f16>>,
}

impl MarlinWorkspace {
    /// An empty workspace (allocates on first use).
    pub fn new() -> Self {
        Self::default()
    }

    /// Bytes currently held on the device.
    pub fn device_bytes(&self) -> usize {
        let len = |c: &Option<CudaSlice<i32>>| c.as_ref().map_or(0, |c| c.len() * 4);
        self.partials.as_ref().map_or(0, |p| p.len() * 4)
            + len(&self.counters)
            + len(&self.sum_counters)
            + self.gather_bf16.as_ref().map_or(0, |g| g.len() * 2)
            + self.gather_f16.as_ref().map_or(0, |g| g.len() * 2)
    }

    /// Makes room for every [`marlin_gemm_into`] call on `weights` with at most `max_m` rows:
    /// afterwards such calls allocate nothing, synchronise nothing and copy nothing from the host,
    /// so they can be captured in a CUDA graph.
    ///
    /// ```no_run
    /// # use lowbit::marlin::gemm::{marlin_gemm_into, MarlinWorkspace};
    /// # use lowbit::marlin::layout::MarlinWeights;
    /// # use lowbit::{bf16, Device};
    /// # use cudarc::driver::CudaSlice;
    /// # fn step(dev: &Device, w: &MarlinWeights<bf16>, x: &CudaSlice<bf16>, y: &mut CudaSlice<bf16>) -> lowbit::Result<()> {
    /// let mut ws = MarlinWorkspace::new();
    /// ws.reserve_for(dev, w, 64)?; // once, for decode batches of up to 64 rows
    /// let m = 16; // this step's rows: x holds m·K, y m·N elements
    /// let k = w.shape().k;
    /// marlin_gemm_into(dev, x, m, k, w, y, &mut ws)?; // capturable
    /// # Ok(()) }
    /// ```
    pub fn reserve_for<T: Half>(&mut self, dev: &Device, weights: &MarlinWeights<T>, max_m: usize) -> Result<()> {
        const OP: &str = "MarlinWorkspace::reserve_for";
        let geom = weight_geom(OP, weights.shape())?;
        if max_m == 0 {
            return Err(Error::shape(OP, "max_m must be at least 1"));
        }
        // For a fixed m-tile count the CTAs and tiles grow with M: the largest M of every count
        // bounds them. Whether a plan cuts tiles is not monotone in M, so the pieces are sized
        // as if every one of these plans did.
        for m in [16, 32, 48, 64, max_m] {
            let plan = plan_gemm(m.min(max_m), geom.n, geom.k, dev.info().sm_count)?;
            self.grow(dev, 2 * plan.ctas * plan.m_blk() * plan.block.n_blk(), plan.tiles())?;
        }
        if weights.perm().is_some() {
            let len = max_m.checked_mul(geom.k).ok_or_else(|| Error::shape(OP, "max_m·K overflows"))?;
            gather_slot(dev, T::gather_buffer(self), len)?;
        }
        Ok(())
    }

    /// Makes room for the fused top-k sum (`TopkSum`) of `tokens` tokens under `plan`.
    pub(crate) fn reserve_topk_sum(&mut self, dev: &Device, plan: &GemmPlan, tokens: usize) -> Result<()> {
        let need = tokens * plan.n_blocks;
        if let Some(c) = &self.sum_counters {
            dev.check_buffer("MarlinWorkspace::reserve", "workspace", c, c.len())?;
        }
        if self.sum_counters.as_ref().is_none_or(|c| c.len() < need) {
            self.sum_counters = None;
            // The kernel relies on zero counters between launches (and leaves them zero).
            self.sum_counters = Some(dev.zeros::<i32>(need)?);
        }
        Ok(())
    }

    /// Makes room for `plan` on `dev`.
    pub fn reserve(&mut self, dev: &Device, plan: &GemmPlan) -> Result<()> {
        self.grow(dev, plan.workspace_partials(), plan.workspace_counters())
    }

    /// Grows the stream-K pieces to `need_p` f32 and the counters to `need_c` entries.
    fn grow(&mut self, dev: &Device, need_p: usize, need_c: usize) -> Result<()> {
        const OP: &str = "MarlinWorkspace::reserve";
        if let Some(p) = &self.partials {
            dev.check_buffer(OP, "workspace", p, p.len())?;
        }
        if let Some(c) = &self.counters {
            dev.check_buffer(OP, "workspace", c, c.len())?;
        }
        if need_p > 0 && self.partials.as_ref().is_none_or(|p| p.len() < need_p) {
            // Free first so the peak stays one buffer.
            self.partials = None;
            // SAFETY: a piece is always written (by its CTA) before the last piece of its tile
            // reads it, in the same launch: the kernel never reads a slot it did not write.
            self.partials = Some(unsafe { dev.alloc_for_kernel::<f32>(need_p)? });
        }
        if need_c > 0 && self.counters.as_ref().is_none_or(|c| c.len() < need_c) {
            self.counters = None;
            // The kernel relies on zero counters between launches (and leaves them zero).
            self.counters = Some(dev.zeros::<i32>(need_c)?);
        }
        Ok(())
    }
}

/// A buffer that must hold at least `min` elements and live on `dev`.
fn check_min<T, S: DeviceSlice<T>>(
    dev: &Device,
    op: &'static str,
    name: &'static str,
    buf: &S,
    min: usize,
) -> Result<()> {
    if buf.len() < min {
        return Err(Error::Length { op, name, expected: min, got: buf.len() });
    }
    dev.check_buffer(op, name, buf, buf.len())
}

/// Validated weight geometry shared by the dense and MoE paths.
struct WeightGeom {
    n: usize,
    k: usize,
    group: usize,
    channelwise: bool,
}

fn weight_geom(op: &'static str, shape: &QuantShape) -> Result<WeightGeom> {
    check_gemm_shape(op, shape.n, shape.k, shape.group)?;
    Ok(WeightGeom { n: shape.n, k: shape.k, group: shape.group, channelwise: shape.group >= shape.k })
}

/// Everything one GEMM launch needs besides the plan.
struct Launch<'a, T> {
    a: &'a CudaSlice<T>,
    lda: usize,
    m: usize,
    qweight: &'a CudaSlice<i32>,
    scales: &'a CudaSlice<T>,
    scale_exp: &'a CudaSlice<u32>,
    geom: WeightGeom,
    moe: Option<MoeArgs<'a>>,
}

/// The top-k sum fused into the MoE GEMM's epilogue (the fused MoE's GEMM2): `out[t, :]` = the
/// sum, in k order, of the GEMM's output rows `t·topk + k` over the local slots of token `t`
/// (`topk_ids` in range and, with an expert map, mapped to a local expert); zero rows for tokens
/// with no local slot. Rounded once to `T` from the f32 sum of the `T` rows.
pub(crate) struct TopkSum<'a, T> {
    pub out: &'a mut CudaSlice<T>,
    pub tokens: usize,
    pub topk: usize,
    pub topk_ids: &'a CudaSlice<i32>,
    pub expert_map: Option<&'a CudaSlice<i32>>,
    pub global_experts: usize,
}

struct MoeArgs<'a> {
    blocks: &'a MoeBlocks<'a>,
    topk_weights: Option<&'a CudaSlice<f32>>,
    top_k: usize,
    out_rows: usize,
    num_experts: usize,
}

/// Launches the GEMM kernel. All buffers have been validated by the caller against the shapes the
/// kernel indexes (documented in `LowbitMarlinGemmParams`).
fn launch_gemm<T: Half>(
    dev: &Device,
    op: &'static str,
    l: &Launch<'_, T>,
    plan: &GemmPlan,
    out: &mut CudaSlice<T>,
    ws: &mut MarlinWorkspace,
    sum: Option<&mut TopkSum<'_, T>>,
) -> Result<()> {
    let name = plan.kernel_name(T::DTYPE, l.moe.is_some());
    let smem = plan.smem_bytes();
    let func = dev.function(FAMILY, &name, smem)?;
    ws.reserve(dev, plan)?;
    if let Some(sm) = &sum {
        ws.reserve_topk_sum(dev, plan, sm.tokens)?;
    }
    let (a, _ga) = dev.ptr(op, "x", l.a, 16)?;
    let (b, _gb) = dev.ptr(op, "qweight", l.qweight, 16)?;
    let (s, _gs) = dev.ptr(op, "scales", l.scales, 16)?;
    dev.check_buffer(op, "scale_exp", l.scale_exp, 1)?;
    let (se, _gse) = dev.ptr(op, "scale_exp", l.scale_exp, 4)?;
    let (partials, counters) = match (&mut ws.partials, &mut ws.counters, plan.needs_workspace()) {
        (Some(p), Some(c), true) => {
            (Some(dev.ptr_mut(op, "workspace", p, 16)?), Some(dev.ptr_mut(op, "workspace", c, 4)?))
        }
        (_, _, true) => return Err(Error::invalid(op, "the workspace could not be reserved")),
        _ => (None, None),
    };
    let moe_ptrs = match &l.moe {
        Some(mo) => Some((
            dev.ptr(op, "sorted_token_ids", mo.blocks.sorted_token_ids, 4)?,
            dev.ptr(op, "expert_ids", mo.blocks.expert_ids, 4)?,
            dev.ptr(op, "num_tokens_post_padded", mo.blocks.num_tokens_post_padded, 4)?,
            mo.topk_weights.map(|w| dev.ptr(op, "topk_weights", w, 4)).transpose()?,
        )),
        None => None,
    };
    let (o, _go) = dev.ptr_mut(op, "out", out, 16)?;
    let ptr_of = |g: &Option<(u64, cudarc::driver::SyncOnDrop<'_>)>| g.as_ref().map_or(0, |g| g.0);
    let mut params = ffi::LowbitMarlinGemmParams {
        a: a as *const _,
        b: b as *const _,
        scales: s as *const _,
        scale_exp: se as *const _,
        out: o as *mut _,
        partials: ptr_of(&partials) as *mut _,
        counters: ptr_of(&counters) as *mut _,
        sorted_token_ids: std::ptr::null(),
        expert_ids: std::ptr::null(),
        num_tokens_post_padded: std::ptr::null(),
        topk_weights: std::ptr::null(),
        m: l.m as i64,
        n: l.geom.n as i64,
        k: l.geom.k as i64,
        lda: l.lda as i64,
        group: l.geom.group as i64,
        m_blocks: plan.m_blocks as i64,
        out_rows: 0,
        top_k: 1,
        block_size: 0,
        num_experts: 0,
        capacity: 0,
        smem_bytes: smem as i64,
        channelwise: l.geom.channelwise as i32,
        max_pieces: MAX_PIECES as i32,
        sum_out: std::ptr::null_mut(),
        sum_counters: std::ptr::null_mut(),
        topk_ids: std::ptr::null(),
        expert_map: std::ptr::null(),
        sum_tokens: 0,
        sum_topk: 1,
        global_experts: 0,
    };
    if let (Some(mo), Some((sorted, experts, ntpp, tw))) = (&l.moe, &moe_ptrs) {
        params.sorted_token_ids = sorted.0 as *const _;
        params.expert_ids = experts.0 as *const _;
        params.num_tokens_post_padded = ntpp.0 as *const _;
        params.topk_weights = tw.as_ref().map_or(0, |g| g.0) as *const _;
        params.out_rows = mo.out_rows as i64;
        params.top_k = mo.top_k as i64;
        params.block_size = mo.blocks.block_size as i64;
        params.num_experts = mo.num_experts as i64;
        params.capacity = mo.blocks.sorted_token_ids.len() as i64;
    }
    // Guards of the fused top-k sum's buffers, alive until after the launch.
    let mut sum_guards = Vec::new();
    if let Some(sm) = sum {
        let Some(counters) = ws.sum_counters.as_mut() else {
            return Err(Error::invalid(op, "the workspace could not be reserved"));
        };
        let (so, g1) = dev.ptr_mut(op, "out", &mut *sm.out, 16)?;
        let (sc, g2) = dev.ptr_mut(op, "workspace", counters, 4)?;
        let (ids, g3) = dev.ptr(op, "topk_ids", sm.topk_ids, 4)?;
        params.sum_out = so as *mut _;
        params.sum_counters = sc as *mut _;
        params.topk_ids = ids as *const _;
        sum_guards.extend([g1, g2, g3]);
        if let Some(map) = sm.expert_map {
            let (mp, g4) = dev.ptr(op, "expert_map", map, 4)?;
            params.expert_map = mp as *const _;
            sum_guards.push(g4);
        }
        params.sum_tokens = sm.tokens as i64;
        params.sum_topk = sm.topk as i64;
        params.global_experts = sm.global_experts as i64;
    }
    let cfg = LaunchConfig {
        grid_dim: (plan.grid_blocks() as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    // SAFETY: the caller validated every buffer against the shapes in `params` (A: rows
    // `(m-1)·lda + k`, Marlin qweight `[E·K/16, 2N]`, scales `[E·K/g, N]`, out rows, routing
    // arrays); the workspace was reserved for this plan and its counters are zero between
    // launches; `cfg` matches the instance (256 threads, `smem` bytes of dynamic shared memory,
    // `grid_blocks` blocks). The guards keep every buffer ordered on lowbit's stream.
    unsafe { dev.launch(&func, cfg, params) }
}

/// The gather buffer in `slot`, grown (never shrunk) to at least `len` elements.
fn gather_slot<'a, T: Half>(
    dev: &Device,
    slot: &'a mut Option<CudaSlice<T>>,
    len: usize,
) -> Result<&'a mut CudaSlice<T>> {
    if let Some(g) = slot.as_ref() {
        dev.check_buffer("MarlinWorkspace", "workspace", g, g.len())?;
    }
    if slot.as_ref().is_none_or(|g| g.len() < len) {
        *slot = None;
        // SAFETY: every use gathers its m·K elements into the buffer before the GEMM reads them.
        *slot = Some(unsafe { dev.alloc_for_kernel::<T>(len)? });
    }
    slot.as_mut().ok_or_else(|| Error::invalid("MarlinWorkspace", "the gather buffer could not be reserved"))
}

/// Gathers activation columns by the act-order `perm`: `dst[r, j] = x[r·lda + perm[j]]` into
/// the first `m·k` elements of `dst`.
#[allow(clippy::too_many_arguments)]
fn gather_columns<T: Half>(
    dev: &Device,
    op: &'static str,
    x: &CudaSlice<T>,
    m: usize,
    lda: usize,
    k: usize,
    perm: &CudaSlice<i32>,
    dst: &mut CudaSlice<T>,
) -> Result<()> {
    dev.check_buffer(op, "perm", perm, k)?;
    check_min(dev, op, "workspace", dst, m * k)?;
    let func = dev.function(FAMILY, "lowbit_marlin_gemm_gather_b16", 0)?;
    {
        let (s, _g1) = dev.ptr(op, "x", x, 2)?;
        let (p, _g2) = dev.ptr(op, "perm", perm, 4)?;
        let (d, _g3) = dev.ptr_mut(op, "x_perm", dst, 16)?;
        let params = ffi::LowbitMarlinGemmGatherParams {
            src: s as *const _,
            dst: d as *mut _,
            perm: p as *const _,
            m: m as i64,
            k: k as i64,
            lda: lda as i64,
        };
        // SAFETY: x holds at least (m-1)·lda + k elements (checked by the caller), perm k
        // entries (out-of-range entries read nothing), dst at least m·k elements (checked).
        unsafe { dev.launch(&func, dev.grid_stride(m * k, 256, 256), params)? };
    }
    Ok(())
}

/// `Y = X · dequant(W)` into a new `[m, N]` buffer. `x` holds `m` rows of `lda ≥ K` elements
/// (`lda % 8 == 0`; the buffer needs at least `(m−1)·lda + K` elements).
pub fn marlin_gemm<T: Half>(
    dev: &Device,
    x: &CudaSlice<T>,
    m: usize,
    lda: usize,
    weights: &MarlinWeights<T>,
    workspace: &mut MarlinWorkspace,
) -> Result<CudaSlice<T>> {
    const OP: &str = "marlin_gemm";
    let n = weights.shape().n;
    let len = m.checked_mul(n).ok_or_else(|| Error::shape(OP, "M·N overflows"))?;
    // Validate before allocating; `marlin_gemm_into` validates again (cheap) and launches.
    validate_dense(dev, OP, x, m, lda, weights)?;
    // SAFETY: the kernel writes every element of the [m, N] output (every row < m, every
    // column < N is stored by exactly one block); on error the buffer is dropped.
    let mut out = unsafe { dev.alloc_for_kernel::<T>(len)? };
    marlin_gemm_into(dev, x, m, lda, weights, &mut out, workspace)?;
    Ok(out)
}

fn validate_dense<T: Half>(
    dev: &Device,
    op: &'static str,
    x: &CudaSlice<T>,
    m: usize,
    lda: usize,
    weights: &MarlinWeights<T>,
) -> Result<WeightGeom> {
    let geom = weight_geom(op, weights.shape())?;
    if m == 0 {
        return Err(Error::shape(op, "M must be at least 1"));
    }
    if lda < geom.k || lda % 8 != 0 {
        return Err(Error::shape(op, format!("lda = {lda} must be >= K = {} and a multiple of 8", geom.k)));
    }
    let x_len = (m - 1)
        .checked_mul(lda)
        .and_then(|v| v.checked_add(geom.k))
        .filter(|&v| v <= i64::MAX as usize)
        .ok_or_else(|| Error::shape(op, "(M-1)·lda + K overflows"))?;
    check_min(dev, op, "x", x, x_len)?;
    dev.check_buffer(op, "qweight", weights.qweight(), geom.k / 16 * 2 * geom.n)?;
    dev.check_buffer(op, "scales", weights.scales(), geom.k / geom.group * geom.n)?;
    if let Some(p) = weights.perm() {
        dev.check_buffer(op, "perm", p, geom.k)?;
    }
    Ok(geom)
}

/// As [`marlin_gemm`], into `out` (exactly `m · N` elements; every element is written).
pub fn marlin_gemm_into<T: Half>(
    dev: &Device,
    x: &CudaSlice<T>,
    m: usize,
    lda: usize,
    weights: &MarlinWeights<T>,
    out: &mut CudaSlice<T>,
    workspace: &mut MarlinWorkspace,
) -> Result<()> {
    const OP: &str = "marlin_gemm";
    let geom = validate_dense(dev, OP, x, m, lda, weights)?;
    let out_len = m.checked_mul(geom.n).ok_or_else(|| Error::shape(OP, "M·N overflows"))?;
    dev.check_buffer(OP, "out", out, out_len)?;
    let plan = plan_gemm(m, geom.n, geom.k, dev.info().sm_count)?;
    // Act-order: gather into the workspace's buffer, taken out for the call (the launch borrows
    // the rest of the workspace) and put back whatever the outcome.
    let mut gathered = T::gather_buffer(workspace).take();
    let result = (|| {
        let (a, lda) = match weights.perm() {
            Some(perm) => {
                let g = gather_slot(dev, &mut gathered, m * geom.k)?;
                gather_columns(dev, OP, x, m, lda, geom.k, perm, g)?;
                (&*g, geom.k)
            }
            None => (x, lda),
        };
        let launch = Launch {
            a,
            lda,
            m,
            qweight: weights.qweight(),
            scales: weights.scales(),
            scale_exp: &weights.scale_exp,
            geom,
            moe: None,
        };
        launch_gemm(dev, OP, &launch, &plan, out, workspace, None)
    })();
    *T::gather_buffer(workspace) = gathered;
    result
}

/// A quantized linear layer for inference: Marlin weights plus its own workspace.
///
/// `forward` takes `&self` (the workspace sits behind a mutex), so one layer can be shared by an
/// engine's threads; launches are ordered on the device's stream.
#[derive(Debug)]
pub struct MarlinLinear<T: Half> {
    weights: MarlinWeights<T>,
    workspace: Mutex<MarlinWorkspace>,
}

impl<T: Half> MarlinLinear<T> {
    /// Wraps repacked weights (see [`MarlinWeights`] for building them from compressed-tensors or
    /// GPTQ tensors); checks that their shape is one the GEMM supports.
    pub fn new(weights: MarlinWeights<T>) -> Result<Self> {
        weight_geom("MarlinLinear::new", weights.shape())?;
        Ok(MarlinLinear { weights, workspace: Mutex::new(MarlinWorkspace::new()) })
    }

    /// The weights.
    pub fn weights(&self) -> &MarlinWeights<T> {
        &self.weights
    }

    /// Takes the weights back.
    pub fn into_weights(self) -> MarlinWeights<T> {
        self.weights
    }

    /// Output features `N`.
    pub fn out_features(&self) -> usize {
        self.weights.shape().n
    }

    /// Input features `K`.
    pub fn in_features(&self) -> usize {
        self.weights.shape().k
    }

    /// `Y = X · dequant(W)` for a contiguous `X` of `m` rows.
    pub fn forward(&self, dev: &Device, x: &CudaSlice<T>, m: usize) -> Result<CudaSlice<T>> {
        self.forward_strided(dev, x, m, self.in_features())
    }

    /// As [`MarlinLinear::forward`] with a row stride `lda ≥ K`.
    pub fn forward_strided(&self, dev: &Device, x: &CudaSlice<T>, m: usize, lda: usize) -> Result<CudaSlice<T>> {
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        marlin_gemm(dev, x, m, lda, &self.weights, &mut ws)
    }

    /// As [`MarlinLinear::forward_strided`], into `out` (`m · N` elements).
    pub fn forward_into(
        &self,
        dev: &Device,
        x: &CudaSlice<T>,
        m: usize,
        lda: usize,
        out: &mut CudaSlice<T>,
    ) -> Result<()> {
        let mut ws = self.workspace.lock().unwrap_or_else(|e| e.into_inner());
        marlin_gemm_into(dev, x, m, lda, &self.weights, out, &mut ws)
    }
}

/// Stacked expert weights in Marlin layout: qweight `[E, K/16, 2N]` i32, scales `[E, K/g, N]`
/// (Marlin-permuted per expert), in the activation dtype `T`.
#[derive(Debug)]
pub struct MarlinExperts<T> {
    pub(crate) qweight: CudaSlice<i32>,
    pub(crate) scales: CudaSlice<T>,
    /// The scale range of every expert's scales for the bf16 GEMM (`layout::scale_exp_of`).
    pub(crate) scale_exp: CudaSlice<u32>,
    pub(crate) num_experts: usize,
    pub(crate) shape: QuantShape,
}

impl<T: Half> MarlinExperts<T> {
    fn check(op: &'static str, num_experts: usize, n: usize, k: usize, group_size: GroupSize) -> Result<QuantShape> {
        if num_experts == 0 || num_experts > i32::MAX as usize {
            return Err(Error::shape(op, format!("{num_experts} experts")));
        }
        let shape = QuantShape::new(n, k, group_size)?;
        check_gemm_shape(op, n, k, shape.group)?;
        if num_experts.checked_mul(n * k).is_none_or(|e| e > i64::MAX as usize / 4) {
            return Err(Error::shape(op, "the expert stack is too large"));
        }
        Ok(shape)
    }

    fn lens(num_experts: usize, shape: &QuantShape) -> (usize, usize) {
        (num_experts * (shape.k / 16) * 2 * shape.n, num_experts * shape.groups_per_row() * shape.n)
    }

    /// Uploads host tensors: `qweight` `[E, K/16, 2N]`, `scales` `[E, K/g, N]` (Marlin order).
    pub fn from_host(
        dev: &Device,
        qweight: &[i32],
        scales: &[T],
        num_experts: usize,
        n: usize,
        k: usize,
        group_size: GroupSize,
    ) -> Result<Self> {
        const OP: &str = "MarlinExperts::from_host";
        let shape = Self::check(OP, num_experts, n, k, group_size)?;
        let (ql, sl) = Self::lens(num_experts, &shape);
        crate::format::check_len(OP, "qweight", qweight.len(), ql)?;
        crate::format::check_len(OP, "scales", scales.len(), sl)?;
        let scales = dev.htod(scales)?;
        let scale_exp = scale_exp_of(dev, OP, &scales)?;
        Ok(MarlinExperts { qweight: dev.htod(qweight)?, scales, scale_exp, num_experts, shape })
    }

    /// Takes ownership of device tensors of the same shapes as [`MarlinExperts::from_host`].
    pub fn from_device(
        dev: &Device,
        qweight: CudaSlice<i32>,
        scales: CudaSlice<T>,
        num_experts: usize,
        n: usize,
        k: usize,
        group_size: GroupSize,
    ) -> Result<Self> {
        const OP: &str = "MarlinExperts::from_device";
        let shape = Self::check(OP, num_experts, n, k, group_size)?;
        let (ql, sl) = Self::lens(num_experts, &shape);
        dev.check_buffer(OP, "qweight", &qweight, ql)?;
        dev.check_buffer(OP, "scales", &scales, sl)?;
        let scale_exp = scale_exp_of(dev, OP, &scales)?;
        Ok(MarlinExperts { qweight, scales, scale_exp, num_experts, shape })
    }

    /// Number of experts `E`.
    pub fn num_experts(&self) -> usize {
        self.num_experts
    }
    /// Output features per expert `N`.
    pub fn n(&self) -> usize {
        self.shape.n
    }
    /// Input features `K`.
    pub fn k(&self) -> usize {
        self.shape.k
    }
    /// The group size.
    pub fn group_size(&self) -> GroupSize {
        self.shape.group_size
    }
    /// The per-expert shape.
    pub fn shape(&self) -> &QuantShape {
        &self.shape
    }
    /// The stacked Marlin qweight.
    pub fn qweight(&self) -> &CudaSlice<i32> {
        &self.qweight
    }
    /// The stacked permuted scales.
    pub fn scales(&self) -> &CudaSlice<T> {
        &self.scales
    }
}

/// Routing blocks produced by `moe_align_block_size` (device buffers).
///
/// `sorted_token_ids` has the capacity `max_padded` (a multiple of `block_size`); the used prefix
/// is the device scalar `num_tokens_post_padded`. `expert_ids` holds one expert per block
/// (`capacity / block_size` entries at least); −1 marks a block to skip.
#[derive(Clone, Copy, Debug)]
pub struct MoeBlocks<'a> {
    pub sorted_token_ids: &'a CudaSlice<i32>,
    pub expert_ids: &'a CudaSlice<i32>,
    pub num_tokens_post_padded: &'a CudaSlice<i32>,
    pub block_size: usize,
}

/// The MoE expert GEMM:
/// `out[id, :] = (topk_weights[id] if given) · A[id / top_k, :] · dequant(W[expert])` for every
/// valid slot `id` of `sorted_token_ids` (within `num_tokens_post_padded`).
///
/// A is `[a_rows, K]` (contiguous; the buffer may be longer); out is `[out_rows, N]` (may be
/// longer). Padding slots (`id >= out_rows`) and blocks whose expert id is −1 — or outside
/// `[0, E)`, checked on the device — are skipped: their rows are not written (the caller zeroes
/// `out` first if some rows may be left unrouted, e.g. under expert parallelism).
/// Requires `out_rows ≤ a_rows · top_k` so every valid id reads a row of A.
/// Accumulation in f32; the router weight multiplies the f32 sum before the one rounding to `T`.
#[allow(clippy::too_many_arguments)]
pub fn marlin_moe_gemm<T: Half>(
    dev: &Device,
    a: &CudaSlice<T>,
    a_rows: usize,
    experts: &MarlinExperts<T>,
    blocks: &MoeBlocks,
    top_k: usize,
    topk_weights: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    out_rows: usize,
    workspace: &mut MarlinWorkspace,
) -> Result<()> {
    moe_gemm_impl(dev, a, a_rows, experts, blocks, top_k, topk_weights, out, out_rows, workspace, None)
}

/// [`marlin_moe_gemm`] with the top-k sum fused into its epilogue (see [`TopkSum`]): the fused
/// MoE's GEMM2 writes its per-slot rows to `out` and their per-token sums to `sum.out`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn marlin_moe_gemm_topk_sum<T: Half>(
    dev: &Device,
    a: &CudaSlice<T>,
    a_rows: usize,
    experts: &MarlinExperts<T>,
    blocks: &MoeBlocks,
    topk_weights: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    out_rows: usize,
    workspace: &mut MarlinWorkspace,
    sum: &mut TopkSum<'_, T>,
) -> Result<()> {
    moe_gemm_impl(dev, a, a_rows, experts, blocks, 1, topk_weights, out, out_rows, workspace, Some(sum))
}

#[allow(clippy::too_many_arguments)]
fn moe_gemm_impl<T: Half>(
    dev: &Device,
    a: &CudaSlice<T>,
    a_rows: usize,
    experts: &MarlinExperts<T>,
    blocks: &MoeBlocks,
    top_k: usize,
    topk_weights: Option<&CudaSlice<f32>>,
    out: &mut CudaSlice<T>,
    out_rows: usize,
    workspace: &mut MarlinWorkspace,
    sum: Option<&mut TopkSum<'_, T>>,
) -> Result<()> {
    const OP: &str = "marlin_moe_gemm";
    let geom = weight_geom(OP, &experts.shape)?;
    if a_rows == 0 || out_rows == 0 {
        return Err(Error::shape(OP, "a_rows and out_rows must be at least 1"));
    }
    if top_k == 0 {
        return Err(Error::invalid(OP, "top_k must be at least 1"));
    }
    if a_rows > i32::MAX as usize || out_rows > i32::MAX as usize {
        return Err(Error::shape(OP, "a_rows / out_rows exceed i32::MAX"));
    }
    if a_rows.checked_mul(top_k).is_none_or(|v| v < out_rows) {
        return Err(Error::shape(OP, format!("out_rows = {out_rows} exceeds a_rows · top_k = {a_rows} · {top_k}")));
    }
    let capacity = blocks.sorted_token_ids.len();
    let plan = plan_moe_gemm(blocks.block_size, capacity, geom.n, geom.k, dev.info().sm_count)?;
    let a_len = a_rows.checked_mul(geom.k).ok_or_else(|| Error::shape(OP, "a_rows·K overflows"))?;
    let out_len = out_rows.checked_mul(geom.n).ok_or_else(|| Error::shape(OP, "out_rows·N overflows"))?;
    check_min(dev, OP, "a", a, a_len)?;
    check_min(dev, OP, "out", out, out_len)?;
    let (ql, sl) = MarlinExperts::<T>::lens(experts.num_experts, &experts.shape);
    dev.check_buffer(OP, "qweight", &experts.qweight, ql)?;
    dev.check_buffer(OP, "scales", &experts.scales, sl)?;
    dev.check_buffer(OP, "sorted_token_ids", blocks.sorted_token_ids, capacity)?;
    check_min(dev, OP, "expert_ids", blocks.expert_ids, capacity / blocks.block_size)?;
    check_min(dev, OP, "num_tokens_post_padded", blocks.num_tokens_post_padded, 1)?;
    if let Some(w) = topk_weights {
        check_min(dev, OP, "topk_weights", w, out_rows)?;
    }
    if let Some(sm) = &sum {
        // Slot ids index tokens·topk rows: exactly the GEMM's output rows.
        if sm.tokens.checked_mul(sm.topk) != Some(out_rows) || sm.topk == 0 {
            return Err(Error::shape(
                OP,
                format!("top-k sum of {} tokens x {} over {out_rows} rows", sm.tokens, sm.topk),
            ));
        }
        let sum_len = sm.tokens.checked_mul(geom.n).ok_or_else(|| Error::shape(OP, "tokens·N overflows"))?;
        dev.check_buffer(OP, "out", &*sm.out, sum_len)?;
        check_min(dev, OP, "topk_ids", sm.topk_ids, out_rows)?;
        if let Some(map) = sm.expert_map {
            dev.check_buffer(OP, "expert_map", map, sm.global_experts)?;
        }
        if sm.global_experts == 0 || sm.global_experts > i32::MAX as usize {
            return Err(Error::shape(OP, format!("{} global experts", sm.global_experts)));
        }
    }
    let moe = MoeArgs { blocks, topk_weights, top_k, out_rows, num_experts: experts.num_experts };
    let launch = Launch {
        a,
        lda: geom.k,
        m: a_rows,
        qweight: &experts.qweight,
        scales: &experts.scales,
        scale_exp: &experts.scale_exp,
        geom,
        moe: Some(moe),
    };
    launch_gemm(dev, OP, &launch, &plan, out, workspace, sum)
}

/// Every kernel name the planners can produce for `dtype` (for tests and tooling).
pub fn all_kernel_names(dtype: DType) -> Vec<String> {
    let mut v = Vec::new();
    for moe in [false, true] {
        for m_tiles in 1..=4 {
            for block in BlockShape::ALL {
                if !(if moe { plannable_moe(m_tiles, block) } else { plannable(m_tiles, block) }) {
                    continue;
                }
                let plan = GemmPlan { m_tiles, block, ctas: 1, iters: 1, m_blocks: 1, n_blocks: 1, moe };
                v.push(plan.kernel_name(dtype, moe));
            }
        }
    }
    v
}

/// Whether every kernel the planners can name is in the built `marlin` table.
pub fn kernels_declared() -> bool {
    [DType::BF16, DType::F16].iter().all(|&d| all_kernel_names(d).iter().all(|n| kernel_declared(FAMILY, n)))
        && kernel_declared(FAMILY, "lowbit_marlin_gemm_gather_b16")
}
