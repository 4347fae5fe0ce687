//! Top-k gating on the GPU: softmax top-k (optional renormalisation) and DeepSeek-V3 / Kimi-K2
//! grouped sigmoid top-k with a correction bias (see [`GroupedTopK`]). Router logits are
//! `[tokens, experts]` in f32, bf16 or f16; outputs are f32 weights and i32 expert ids
//! `[tokens, topk]`, listed best first. Ranking is score descending with ties going to the lower
//! expert index (NaN ranks lowest), exactly as [`crate::reference::moe`] defines it.

use cudarc::driver::CudaSlice;

use super::{validate_gating_dims, GroupedTopK, FAMILY};
use crate::device::Device;
use crate::dtype::Float;
use crate::error::Result;
use crate::ffi;

const WARPS: usize = ffi::LOWBIT_MOE_GATING_WARPS as usize;

/// Routing on the device: `weights` f32 `[tokens, topk]`, `ids` i32 `[tokens, topk]`.
#[derive(Debug)]
pub struct DeviceTopK {
    pub weights: CudaSlice<f32>,
    pub ids: CudaSlice<i32>,
    pub tokens: usize,
    pub topk: usize,
}

#[allow(clippy::too_many_arguments)]
fn launch_gating<L: Float>(
    dev: &Device,
    op: &'static str,
    grouped: bool,
    logits: &CudaSlice<L>,
    bias: Option<&CudaSlice<f32>>,
    tokens: usize,
    experts: usize,
    cfg: &GroupedTopK,
) -> Result<DeviceTopK> {
    validate_gating_dims(op, tokens, experts, cfg.topk)?;
    dev.check_buffer(op, "logits", logits, tokens * experts)?;
    if let Some(b) = bias {
        dev.check_buffer(op, "bias", b, experts)?;
    }
    if grouped {
        cfg.validate(op, experts)?;
    }
    let kind = if grouped { "grouped" } else { "softmax" };
    let name = format!("lowbit_moe_{kind}_topk_{}", L::DTYPE.name());
    let smem = WARPS * experts * 4 * if grouped { 2 } else { 1 };
    let func = dev.function(FAMILY, &name, smem)?;
    let n = tokens * cfg.topk;
    // SAFETY: the kernel writes every element of both outputs (each token row writes its `topk`
    // picks); on error they are dropped.
    let mut weights = unsafe { dev.alloc_for_kernel::<f32>(n)? };
    let mut ids = unsafe { dev.alloc_for_kernel::<i32>(n)? };
    {
        let (l, _g1) = dev.ptr(op, "logits", logits, std::mem::size_of::<L>())?;
        let bias_guard = bias.map(|b| dev.ptr(op, "bias", b, 4)).transpose()?;
        let (w, _g2) = dev.ptr_mut(op, "weights", &mut weights, 4)?;
        let (i, _g3) = dev.ptr_mut(op, "ids", &mut ids, 4)?;
        let params = ffi::LowbitMoeTopkParams {
            logits: l as *const _,
            bias: bias_guard.as_ref().map_or(0, |g| g.0) as *const f32,
            weights: w as *mut f32,
            ids: i as *mut i32,
            tokens: tokens as i64,
            experts: experts as i32,
            topk: cfg.topk as i32,
            n_group: cfg.n_group as i32,
            // Clamped: `topk_group >= n_group` keeps every group, and a value above i32::MAX must
            // not wrap to a negative count (that would leave no group eligible).
            topk_group: cfg.topk_group.min(cfg.n_group) as i32,
            renormalize: cfg.renormalize as i32,
            routed_scaling_factor: cfg.routed_scaling_factor,
        };
        let mut lc = dev.grid_stride(tokens, (32 * WARPS) as u32, WARPS);
        lc.shared_mem_bytes = smem as u32;
        // SAFETY: logits holds tokens·experts elements of L, bias (if any) `experts` f32, and the
        // outputs tokens·topk elements, all checked above; `experts ≤ 1024` bounds the dynamic
        // shared memory the kernel indexes (WARPS rows of `experts` floats, two for grouped), and
        // the configuration was validated (n_group ≤ 32, topk ≤ eligible experts). The guards
        // order the buffers on the stream until after the launch.
        unsafe { dev.launch(&func, lc, params)? };
    }
    Ok(DeviceTopK { weights, ids, tokens, topk: cfg.topk })
}

/// Softmax top-k: the `topk` largest `softmax(logits[t, :])` and their experts, best first; with
/// `renormalize` the chosen weights sum to one.
pub fn softmax_topk<L: Float>(
    dev: &Device,
    logits: &CudaSlice<L>,
    tokens: usize,
    experts: usize,
    topk: usize,
    renormalize: bool,
) -> Result<DeviceTopK> {
    let cfg = GroupedTopK { topk, n_group: 1, topk_group: 1, renormalize, routed_scaling_factor: 1.0 };
    launch_gating(dev, "softmax_topk", false, logits, None, tokens, experts, &cfg)
}

/// DeepSeek-V3 / Kimi-K2 grouped sigmoid top-k with an optional selection-only correction bias
/// (`[experts]` f32); see [`GroupedTopK`].
pub fn grouped_topk<L: Float>(
    dev: &Device,
    logits: &CudaSlice<L>,
    tokens: usize,
    experts: usize,
    bias: Option<&CudaSlice<f32>>,
    cfg: &GroupedTopK,
) -> Result<DeviceTopK> {
    launch_gating(dev, "grouped_topk", true, logits, bias, tokens, experts, cfg)
}
