//! # lowbit
//!
//! Hand-written CUDA kernels with safe Rust APIs for low-precision reinforcement learning on
//! large language models: INT4 fake quantization for QAT, real quantization and packing for
//! weight export, the Marlin W4A16 layout and GEMM for rollouts, and the fused Marlin MoE.
//!
//! The three sides agree bit for bit on the weights: `fake_quant(W)` equals
//! `dequantize(quantize_pack(W))`, and the GEMM multiplies by exactly those values.
//!
//! * [`reference`](mod@reference): CPU implementations written from the math; everything is tested against them.
//! * [`quant`], [`marlin`], [`moe`]: the GPU kernels, one module per family.
//! * [`device`]: probing the driver, the context/stream, module loading.
//! * [`format`](mod@format): the weight formats (group sizes, shapes, nibble packing).
//!
//! The crate builds without nvcc or a GPU: GPU entry points then return
//! [`Error::KernelsNotBuilt`] / [`Error::NoDriver`] / [`Error::NoDevice`], never panic.

pub mod checkpoint;
pub mod device;
pub mod dtype;
pub mod error;
pub mod ffi;
pub mod format;
pub mod marlin;
pub mod moe;
pub mod quant;
pub mod reference;

pub use device::Device;
pub use dtype::{DType, Float, ScaleFloat};
pub use error::{Error, Result};
pub use format::{GroupSize, QuantShape};
pub use half::{bf16, f16};
pub use reference::quant::SteMode;
