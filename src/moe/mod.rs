//! Mixture of experts: top-k gating, `moe_align_block_size`, and the fused Marlin MoE (DESIGN §4).
//!
//! * [`routing`]: softmax top-k and DeepSeek-V3 / Kimi-K2 grouped sigmoid top-k on the GPU.
//! * [`align`]: `moe_align_block_size` (a deterministic, stable counting sort of the routed
//!   `(token, k)` slots by expert, padded to the GEMM's block size) and vLLM's block-size choice.
//! * [`fused`]: `fused_marlin_moe` (align → GEMM1 → `silu(gate)·up` → GEMM2 with router weights →
//!   sum over top-k) with a reusable [`fused::MoeWorkspace`].
//!
//! Everything here is validated on the host before a launch. Expert ids that live on the device
//! are checked by the alignment kernel itself (out-of-range ids are reported through a status word
//! and never used as an index), so bad routing can never cause an illegal memory access.
//! The host-side rules shared with [`crate::reference::moe`] live in this module.

pub mod align;
pub mod fused;
pub mod routing;

pub use align::{
    choose_block_size, moe_align_block_size, moe_align_block_size_with, AlignKernels, AlignWorkspace, ExpertMap,
    MoeAlignment, SINGLE_BLOCK_MAX_SLOTS,
};
pub use fused::{fused_marlin_moe, MoeOptions, MoeWorkspace};
pub use routing::{grouped_topk, softmax_topk, DeviceTopK};

use crate::error::{Error, Result};
use crate::ffi;

const FAMILY: &str = "moe";

/// Largest number of experts the routing and alignment kernels handle.
pub const MAX_EXPERTS: usize = ffi::LOWBIT_MOE_MAX_EXPERTS as usize;
/// Largest number of expert groups of grouped top-k routing.
pub const MAX_GROUPS: usize = ffi::LOWBIT_MOE_MAX_GROUPS as usize;

// SAFETY: the MoE parameter structs are plain `repr(C)` data (integers, floats and raw device
// addresses) passed to kernels by value; they have no drop glue and hold no references.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMoeTopkParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMoeAlignParams {}
// SAFETY: as above.
unsafe impl cudarc::driver::DeviceRepr for ffi::LowbitMoeSiluMulParams {}

/// DeepSeek-V3 / Kimi-K2 routing parameters (`noaux_tc`): sigmoid scores, a selection-only
/// correction bias, `n_group` groups of consecutive experts of which the `topk_group` best (by the
/// sum of their two best biased scores) stay eligible, then the `topk` best eligible experts.
/// Weights are the unbiased sigmoid scores, optionally renormalised (`w / (Σw + 1e-20)`), times
/// `routed_scaling_factor`.
///
/// DeepSeek-V3: `{ topk: 8, n_group: 8, topk_group: 4, renormalize: true, routed_scaling_factor: 2.5 }`
/// over 256 experts; Kimi-K2: `{ topk: 8, n_group: 1, topk_group: 1, renormalize: true,
/// routed_scaling_factor: 2.827 }` over 384 experts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupedTopK {
    pub topk: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub renormalize: bool,
    pub routed_scaling_factor: f32,
}

impl GroupedTopK {
    /// Checks the configuration against the expert count: `experts % n_group == 0`,
    /// `1 ≤ n_group ≤ 32`, `1 ≤ topk_group`, and enough eligible experts for `topk`.
    pub fn validate(&self, op: &'static str, experts: usize) -> Result<()> {
        if self.n_group == 0 || self.n_group > MAX_GROUPS {
            return Err(Error::invalid(op, format!("n_group = {} must be in 1..={MAX_GROUPS}", self.n_group)));
        }
        if experts % self.n_group != 0 {
            return Err(Error::shape(op, format!("{experts} experts do not split into {} groups", self.n_group)));
        }
        if self.topk_group == 0 {
            return Err(Error::invalid(op, "topk_group must be at least 1"));
        }
        let eligible = self.topk_group.min(self.n_group) * (experts / self.n_group);
        if self.topk == 0 || self.topk > eligible {
            return Err(Error::invalid(
                op,
                format!(
                    "topk = {} must be in 1..={eligible} (experts in the {} best of {} groups)",
                    self.topk,
                    self.topk_group.min(self.n_group),
                    self.n_group
                ),
            ));
        }
        if !self.routed_scaling_factor.is_finite() {
            return Err(Error::invalid(op, "routed_scaling_factor must be finite"));
        }
        Ok(())
    }
}

/// Dimension rules of the gating kernels: `tokens ≥ 1`, `1 ≤ experts ≤ 1024`, `1 ≤ topk ≤ experts`.
pub fn validate_gating_dims(op: &'static str, tokens: usize, experts: usize, topk: usize) -> Result<()> {
    if tokens == 0 {
        return Err(Error::shape(op, "tokens must be at least 1"));
    }
    if experts == 0 || experts > MAX_EXPERTS {
        return Err(Error::shape(op, format!("experts = {experts} must be in 1..={MAX_EXPERTS}")));
    }
    if topk == 0 || topk > experts {
        return Err(Error::invalid(op, format!("topk = {topk} must be in 1..={experts} (the expert count)")));
    }
    if tokens.checked_mul(experts).is_none_or(|n| n > i64::MAX as usize / 4) {
        return Err(Error::shape(op, format!("[{tokens}, {experts}] is too large")));
    }
    Ok(())
}

/// Length of `sorted_token_ids` for `slots = tokens·topk` routed slots: every non-empty expert
/// pads at most `block − 1` slots, and at most `min(E, slots)` experts are non-empty, so
/// `slots + min(E, slots)·(block − 1)` rounded up to the block size. This never exceeds vLLM's
/// `slots + E·(block − 1)` and keeps the GEMM's grid small for decode batches.
pub fn align_capacity(slots: usize, num_experts: usize, block_size: usize) -> usize {
    let raw = slots + num_experts.min(slots) * block_size.saturating_sub(1);
    raw.div_ceil(block_size.max(1)) * block_size.max(1)
}

/// Argument rules of `moe_align_block_size`: `tokens ≥ 1`, `1 ≤ num_experts ≤ 1024`,
/// `1 ≤ topk ≤ num_experts`, `1 ≤ block_size ≤ 1024`, and every index fits in i32.
pub fn validate_align_args(
    op: &'static str,
    tokens: usize,
    topk: usize,
    num_experts: usize,
    block_size: usize,
) -> Result<()> {
    if tokens == 0 {
        return Err(Error::shape(op, "tokens must be at least 1"));
    }
    if num_experts == 0 || num_experts > MAX_EXPERTS {
        return Err(Error::shape(op, format!("num_experts = {num_experts} must be in 1..={MAX_EXPERTS}")));
    }
    if topk == 0 || topk > num_experts {
        return Err(Error::invalid(op, format!("topk = {topk} must be in 1..={num_experts} (the expert count)")));
    }
    if block_size == 0 || block_size > 1024 {
        return Err(Error::invalid(op, format!("block_size = {block_size} must be in 1..=1024")));
    }
    let slots = tokens.checked_mul(topk).ok_or_else(|| Error::shape(op, "tokens·topk overflows"))?;
    if slots > i32::MAX as usize / 2 || align_capacity(slots, num_experts, block_size) > i32::MAX as usize {
        return Err(Error::shape(op, format!("{slots} routed slots do not fit 32-bit slot indices")));
    }
    Ok(())
}

/// Checks an expert map (`[global experts]`, global → local expert or −1): the length, every entry
/// `−1` or non-negative (below `local_experts` when given), and no local expert mapped twice.
pub fn validate_expert_map(
    op: &'static str,
    map: &[i32],
    global_experts: usize,
    local_experts: Option<usize>,
) -> Result<()> {
    if map.len() != global_experts {
        return Err(Error::Length { op, name: "expert_map", expected: global_experts, got: map.len() });
    }
    let mut seen = vec![false; map.len()];
    for (g, &l) in map.iter().enumerate() {
        if l == -1 {
            continue;
        }
        let ok = l >= 0 && local_experts.is_none_or(|n| (l as usize) < n) && (l as usize) < map.len();
        if !ok {
            return Err(Error::invalid(
                op,
                format!(
                    "expert_map[{g}] = {l}: entries must be -1 or a local expert index{}",
                    local_experts.map_or(String::new(), |n| format!(" below {n}"))
                ),
            ));
        }
        if std::mem::replace(&mut seen[l as usize], true) {
            return Err(Error::invalid(op, format!("expert_map maps two global experts to local expert {l}")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_bounds() {
        assert_eq!(align_capacity(8, 384, 8), 64);
        assert_eq!(align_capacity(32768, 384, 64), (32768 + 384 * 63usize).div_ceil(64) * 64);
        assert_eq!(align_capacity(3, 32, 1), 3);
    }

    #[test]
    fn kernel_table_lists_moe_family() {
        for k in [
            "lowbit_moe_align_count",
            "lowbit_moe_align_scatter",
            "lowbit_moe_align_single",
            "lowbit_moe_softmax_topk_bf16",
            "lowbit_moe_silu_mul_bf16",
        ] {
            assert!(crate::device::kernel_declared(FAMILY, k), "{k}");
        }
    }
}
