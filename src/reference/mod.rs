//! CPU reference implementations, written plainly from the math of DESIGN §3/§4, not from the
//! kernels' index tricks. Tests compare every GPU result against these.

pub mod gemm;
pub mod marlin;
pub mod moe;
pub mod quant;
pub mod rng;
