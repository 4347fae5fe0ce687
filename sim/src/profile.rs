//! Per-launch profile counters (`LOWBIT_SIM_PROFILE`).

/// Counters of one launch.
#[derive(Clone, Debug, Default)]
pub struct Profile {}
