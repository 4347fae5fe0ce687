//! The executor: runs a kernel's grid over device memory.

use std::time::Duration;

use crate::ir::Kernel;
use crate::mem::GlobalMemory;
use crate::profile::Profile;
use crate::{Result, SimConfig};

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: [u32; 3],
    pub block: [u32; 3],
    pub dynamic_smem: u32,
}

/// What one launch did.
#[derive(Clone, Debug, Default)]
pub struct LaunchStats {
    pub profile: Profile,
    pub wall: Duration,
}

/// Runs `kernel` to completion (launches are synchronous). `params` is the parameter buffer,
/// `kernel.param_bytes` long. A checker violation, a trap or a hang is an `Err` with the CUDA
/// error a driver would return and a report; with `LOWBIT_SIM_PROFILE` set, one JSON line is
/// appended to the profile file.
pub fn launch(_kernel: &Kernel, _cfg: &LaunchConfig, _params: &[u8], _mem: &GlobalMemory, _sim: &SimConfig) -> Result<LaunchStats> {
    Err(crate::SimError::new(crate::cuda::NOT_SUPPORTED, "the executor is not built yet"))
}
