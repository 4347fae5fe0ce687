//! Per-launch profile counters. With `LOWBIT_SIM_PROFILE=<file>` every launch appends one JSON
//! object (one line) to the file.
//!
//! Definitions (counted exactly; `sim/tests/profile.rs` checks them on small programs):
//! * `warp_instructions`: instructions issued per warp, however many lanes were active (an
//!   instruction whose guard is false for every active lane still issues);
//! * `thread_instructions`: active lanes summed over issued instructions (guard false counts 0);
//! * `by_class`: warp-instructions per class (`int`, `move`, `fp32`, `half2`, `convert`, `mma`,
//!   `global`, `shared`, `control`, `sync`); `move` holds `mov` of registers, immediates and
//!   special registers and its vector (pack/unpack) forms, which ptxas mostly folds into the
//!   operands of other instructions; `global` holds every non-shared memory instruction
//!   (global, generic, `ld.param` — a constant-cache load on hardware —, `.local`, atomics,
//!   `cp.async`), `shared` the shared-memory ones and `ldmatrix`/`stmatrix`, `sync` barriers,
//!   fences, `cp.async` commit/wait and warp collectives;
//! * `mma`: warp-level `mma` instructions;
//! * `global_load_bytes` / `global_store_bytes`: bytes requested by active lanes (atomics count
//!   as a load and a store; `cp.async` as a load);
//! * `global_load_sectors` / `global_store_sectors`: distinct 32-byte sectors per warp-level
//!   request, summed over requests;
//! * `global_unique_bytes_read`: distinct global bytes read by the whole launch;
//! * `global_first_touch_bytes_read`: those of them first read before the launch stored to them
//!   (bytes the launch writes and then reads back, such as split-K partials, are not counted);
//! * `shared_requests`: warp-level shared-memory instructions (`ld/st/atom.shared`, `ldmatrix`,
//!   the shared side of `cp.async` is not counted); `shared_wavefronts`: the passes the 32 banks
//!   of 4 bytes need: for each request, per phase (32 lanes for ≤4-byte accesses, 16 for 8-byte,
//!   8 for 16-byte, one 8-row matrix for `ldmatrix`), the largest number of distinct 4-byte words
//!   any one bank must deliver, summed (a conflict-free request of 4-byte words is 1).

use std::fmt::Write as _;

/// Counters of one launch.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Profile {
    pub thread_instructions: u64,
    pub warp_instructions: u64,
    pub mma: u64,
    pub by_class: [u64; 10],
    pub global_load_bytes: u64,
    pub global_store_bytes: u64,
    pub global_load_sectors: u64,
    pub global_store_sectors: u64,
    pub global_unique_bytes_read: u64,
    pub global_first_touch_bytes_read: u64,
    pub shared_wavefronts: u64,
    pub shared_requests: u64,
}

/// Names of `by_class`, in [`crate::ir::Class`] order.
pub const CLASS_NAMES: [&str; 10] =
    ["int", "move", "fp32", "half2", "convert", "mma", "global", "shared", "control", "sync"];

impl Profile {
    /// The JSON line for a launch.
    pub fn to_json(
        &self,
        kernel: &str,
        grid: [u32; 3],
        block: [u32; 3],
        dynamic_smem: u32,
        wall_ms: f64,
        cpu_ms: f64,
    ) -> String {
        let mut s = String::with_capacity(512);
        let _ = write!(
            s,
            "{{\"kernel\":\"{}\",\"grid\":[{},{},{}],\"block\":[{},{},{}],\"dynamic_smem\":{},\"thread_instructions\":{},\"warp_instructions\":{},\"mma\":{},\"by_class\":{{",
            kernel.replace('"', "\\\""),
            grid[0],
            grid[1],
            grid[2],
            block[0],
            block[1],
            block[2],
            dynamic_smem,
            self.thread_instructions,
            self.warp_instructions,
            self.mma
        );
        for (i, n) in CLASS_NAMES.iter().enumerate() {
            let _ = write!(s, "{}\"{n}\":{}", if i > 0 { "," } else { "" }, self.by_class[i]);
        }
        let _ = write!(
            s,
            "}},\"global_load_bytes\":{},\"global_store_bytes\":{},\"global_load_sectors\":{},\"global_store_sectors\":{},\"global_unique_bytes_read\":{},\"global_first_touch_bytes_read\":{},\"shared_wavefronts\":{},\"shared_requests\":{},\"wall_ms\":{:.3},\"cpu_ms\":{:.3}}}",
            self.global_load_bytes,
            self.global_store_bytes,
            self.global_load_sectors,
            self.global_store_sectors,
            self.global_unique_bytes_read,
            self.global_first_touch_bytes_read,
            self.shared_wavefronts,
            self.shared_requests,
            wall_ms,
            cpu_ms
        );
        s
    }
}

/// Distinct 32-byte sectors touched by a warp request (`(addr, len)` per lane).
pub fn sectors(accesses: &[(u64, u32)]) -> u64 {
    let mut ids = [0u64; 96];
    let mut n = 0;
    for &(a, len) in accesses {
        let (first, last) = (a / 32, (a + len.max(1) as u64 - 1) / 32);
        for s in first..=last {
            if n < ids.len() {
                ids[n] = s;
                n += 1;
            }
        }
    }
    let ids = &mut ids[..n];
    ids.sort_unstable();
    let mut distinct = 0;
    for i in 0..ids.len() {
        if i == 0 || ids[i] != ids[i - 1] {
            distinct += 1;
        }
    }
    distinct
}

/// Shared-memory wavefronts of one request: `phases` lists, per phase, the `(addr, len)` of each
/// participating access.
pub fn wavefronts(phases: &[&[(u32, u32)]]) -> u64 {
    let mut total = 0;
    for ph in phases {
        if ph.is_empty() {
            continue;
        }
        let mut words = [0u32; 160];
        let mut n = 0;
        for &(a, len) in ph.iter() {
            let mut w = a / 4;
            while w * 4 < a + len.max(1) && n < words.len() {
                words[n] = w;
                n += 1;
                w += 1;
            }
        }
        let words = &mut words[..n];
        words.sort_unstable();
        let mut per_bank = [0u32; 32];
        for (i, &w) in words.iter().enumerate() {
            if i == 0 || words[i - 1] != w {
                per_bank[(w % 32) as usize] += 1;
            }
        }
        total += per_bank.iter().copied().max().unwrap_or(0).max(1) as u64;
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sector_counting() {
        // 32 lanes × 4 contiguous bytes = 128 bytes = 4 sectors.
        let v: Vec<(u64, u32)> = (0..32).map(|l| (0x1000 + 4 * l, 4)).collect();
        assert_eq!(sectors(&v), 4);
        // All lanes on one address: 1 sector; a 16-byte access straddling two sectors: 2.
        assert_eq!(sectors(&[(0x1000, 4); 32]), 1);
        assert_eq!(sectors(&[(0x1018, 16)]), 2);
    }

    #[test]
    fn bank_conflicts() {
        // Stride-1 words: conflict-free.
        let v: Vec<(u32, u32)> = (0..32).map(|l| (4 * l, 4)).collect();
        assert_eq!(wavefronts(&[&v]), 1);
        // Stride 32 words: every lane in bank 0, 32 distinct words.
        let v: Vec<(u32, u32)> = (0..32).map(|l| (128 * l, 4)).collect();
        assert_eq!(wavefronts(&[&v]), 32);
        // Broadcast: one word.
        assert_eq!(wavefronts(&[&[(8, 4); 32]]), 1);
        // Stride 2 words: 2-way.
        let v: Vec<(u32, u32)> = (0..32).map(|l| (8 * l, 4)).collect();
        assert_eq!(wavefronts(&[&v]), 2);
    }

    #[test]
    fn json_has_the_keys() {
        let j = Profile::default().to_json("k", [1, 2, 3], [32, 1, 1], 0, 1.0, 1.0);
        for key in [
            "kernel",
            "grid",
            "block",
            "dynamic_smem",
            "thread_instructions",
            "warp_instructions",
            "mma",
            "by_class",
            "global_load_bytes",
            "global_store_bytes",
            "global_load_sectors",
            "global_store_sectors",
            "global_unique_bytes_read",
            "global_first_touch_bytes_read",
            "shared_wavefronts",
            "shared_requests",
            "wall_ms",
        ] {
            assert!(j.contains(&format!("\"{key}\":")), "{key}");
        }
    }
}
