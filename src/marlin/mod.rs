//! Marlin W4A16: repack, scale permutation, and the INT4 × BF16/F16 GEMM (DESIGN §3, §4).

pub mod gemm;
pub mod layout;
pub mod sync;
