//! lowbit-sim: the PTX that nvcc emits, executed on the CPU behind a drop-in CUDA driver.
//!
//! The crate builds a `cdylib` that exports the CUDA driver API (`cu*` symbols, see [`driver`]);
//! `scripts/sim-lib` links it as `libcuda.so` into a directory of its own, and
//! `LD_LIBRARY_PATH=<that dir>` makes cudarc — or any program written against the driver API —
//! load it instead of NVIDIA's driver.
//!
//! Layers, each its own module:
//! * [`fatbin`]: the fatbin container (`cuModuleLoadData` images), picking the PTX entry;
//! * [`ptx`]: lexer and parser for PTX text into an AST that keeps `.loc` source lines;
//! * [`ir`]: lowering to a compact executable form (typed ops, dense registers compacted by
//!   liveness, resolved branch targets);
//! * [`exec`]: the executor — warps in lockstep with an active mask, co-resident blocks that make
//!   progress together, a seeded deterministic scheduler;
//! * [`fp`]: IEEE arithmetic and conversions with PTX rounding modes (f32, f16, bf16, packed);
//! * [`mem`]: device memory — an allocation table with poisoning and an initialisation shadow;
//! * [`check`]: the checkers' reports (memory, races, `cp.async`, barriers, traps);
//! * [`profile`]: per-launch counters (`LOWBIT_SIM_PROFILE`);
//! * [`driver`]: the C ABI.
//!
//! Semantics come from the PTX ISA text (the tests cite its sections), never from the kernels
//! this crate happens to run.

pub mod check;
pub mod config;
pub mod driver;
pub mod exec;
pub mod fatbin;
pub mod fp;
pub mod ir;
pub mod mem;
pub mod profile;
pub mod ptx;

pub use config::SimConfig;
pub use exec::{launch, LaunchConfig, LaunchStats};
pub use ir::{Kernel, Module};
pub use mem::GlobalMemory;

/// CUDA driver result codes (`CUresult`), the subset the simulator returns.
pub mod cuda {
    pub const SUCCESS: u32 = 0;
    pub const INVALID_VALUE: u32 = 1;
    pub const OUT_OF_MEMORY: u32 = 2;
    pub const NOT_INITIALIZED: u32 = 3;
    pub const DEINITIALIZED: u32 = 4;
    pub const NO_DEVICE: u32 = 100;
    pub const INVALID_DEVICE: u32 = 101;
    pub const INVALID_IMAGE: u32 = 200;
    pub const INVALID_CONTEXT: u32 = 201;
    pub const NO_BINARY_FOR_GPU: u32 = 209;
    pub const INVALID_PTX: u32 = 218;
    pub const UNSUPPORTED_PTX_VERSION: u32 = 222;
    pub const INVALID_HANDLE: u32 = 400;
    pub const NOT_FOUND: u32 = 500;
    pub const NOT_READY: u32 = 600;
    pub const ILLEGAL_ADDRESS: u32 = 700;
    pub const LAUNCH_OUT_OF_RESOURCES: u32 = 701;
    pub const MISALIGNED_ADDRESS: u32 = 716;
    pub const ILLEGAL_INSTRUCTION: u32 = 715;
    pub const LAUNCH_FAILED: u32 = 719;
    pub const NOT_SUPPORTED: u32 = 801;
    pub const UNKNOWN: u32 = 999;
}

/// An error of the simulator: the CUDA error code a real driver would return, and a report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimError {
    pub code: u32,
    pub message: String,
}

impl SimError {
    pub fn new(code: u32, message: impl Into<String>) -> Self {
        SimError { code, message: message.into() }
    }
    pub fn invalid_ptx(message: impl Into<String>) -> Self {
        Self::new(cuda::INVALID_PTX, message)
    }
    pub fn invalid_value(message: impl Into<String>) -> Self {
        Self::new(cuda::INVALID_VALUE, message)
    }
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (CUDA error {})", self.message, self.code)
    }
}

impl std::error::Error for SimError {}

pub type Result<T> = std::result::Result<T, SimError>;
