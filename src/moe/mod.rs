//! Mixture of experts: top-k gating, `moe_align_block_size`, and the fused Marlin MoE (DESIGN §4).
