//! The device the simulator presents and its options, from environment variables.

use std::path::PathBuf;

/// What the simulated device reports and how launches run.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// `LOWBIT_SIM_NAME`; always contains `lowbit-sim`.
    pub name: String,
    /// `LOWBIT_SIM_CC`, e.g. `8.0`.
    pub cc: (i32, i32),
    /// `LOWBIT_SIM_SMS`.
    pub sm_count: u32,
    /// `LOWBIT_SIM_SMEM_OPTIN`: the largest dynamic shared memory a block may opt in to.
    pub smem_optin: u32,
    /// Shared memory per SM (occupancy), bytes.
    pub smem_per_sm: u32,
    /// `LOWBIT_SIM_MEMORY`: total device memory reported, bytes.
    pub total_mem: u64,
    /// `LOWBIT_SIM_SEED`: 0 runs warps and blocks in their natural order; any other value
    /// reorders them deterministically.
    pub seed: u64,
    /// `LOWBIT_SIM_PROFILE`: a file that gets one JSON line per launch.
    pub profile: Option<PathBuf>,
    /// `LOWBIT_SIM_CHECK=0` turns the checkers off (they are on by default).
    pub check: bool,
    /// `LOWBIT_SIM_HANG_LIMIT`: warp-instructions without any progress across all resident blocks
    /// before a launch is reported as hung.
    pub hang_limit: u64,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            name: "lowbit-sim (PTX interpreter, sm_80)".into(),
            cc: (8, 0),
            sm_count: 132,
            smem_optin: 232448,
            smem_per_sm: 233472,
            total_mem: 80 << 30,
            seed: 0,
            profile: None,
            check: true,
            hang_limit: 50_000_000,
        }
    }
}

impl SimConfig {
    /// Reads the `LOWBIT_SIM_*` variables over the defaults; malformed values are ignored with a
    /// message on stderr.
    pub fn from_env() -> Self {
        let mut c = SimConfig::default();
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        fn parse<T: std::str::FromStr>(k: &str, v: &str) -> Option<T> {
            let r = v.trim().parse().ok();
            if r.is_none() {
                eprintln!("lowbit-sim: ignoring {k}={v:?} (not a number)");
            }
            r
        }
        if let Some(v) = var("LOWBIT_SIM_NAME") {
            c.name = if v.contains("lowbit-sim") { v } else { format!("lowbit-sim {v}") };
        }
        if let Some(v) = var("LOWBIT_SIM_CC") {
            let mut it = v.split('.');
            match (it.next().and_then(|a| a.parse().ok()), it.next().map_or(Some(0), |b| b.parse().ok())) {
                (Some(a), Some(b)) => c.cc = (a, b),
                _ => eprintln!("lowbit-sim: ignoring LOWBIT_SIM_CC={v:?} (want e.g. 8.0)"),
            }
        }
        if let Some(n) = var("LOWBIT_SIM_SMS").and_then(|v| parse::<u32>("LOWBIT_SIM_SMS", &v)) {
            c.sm_count = n.max(1);
        }
        if let Some(n) = var("LOWBIT_SIM_SMEM_OPTIN").and_then(|v| parse::<u32>("LOWBIT_SIM_SMEM_OPTIN", &v)) {
            c.smem_optin = n;
            c.smem_per_sm = c.smem_per_sm.max(n);
        }
        if let Some(n) = var("LOWBIT_SIM_MEMORY").and_then(|v| parse::<u64>("LOWBIT_SIM_MEMORY", &v)) {
            c.total_mem = n;
        }
        if let Some(n) = var("LOWBIT_SIM_SEED").and_then(|v| parse::<u64>("LOWBIT_SIM_SEED", &v)) {
            c.seed = n;
        }
        if let Some(n) = var("LOWBIT_SIM_HANG_LIMIT").and_then(|v| parse::<u64>("LOWBIT_SIM_HANG_LIMIT", &v)) {
            c.hang_limit = n.max(1000);
        }
        c.profile = var("LOWBIT_SIM_PROFILE").map(PathBuf::from);
        if let Some(v) = var("LOWBIT_SIM_CHECK") {
            c.check = v != "0";
        }
        c
    }
}
