//! The executor: runs a kernel's grid over device memory.
//!
//! * **Warps in lockstep.** A warp executes one instruction for all its active lanes at a time.
//!   Divergent lanes form groups `(pc, mask)`; the group with the smallest pc runs first, and
//!   groups that reach the same pc merge again — which reconverges structured code at its join
//!   points without needing post-dominator information. Warp-synchronous instructions
//!   (`shfl/vote/match/redux.sync`, `bar.warp.sync`, `.aligned` `mma`/`ldmatrix`) wait until
//!   every lane they name has arrived.
//! * **Co-resident blocks make progress together.** Blocks are started in grid order (or a seeded
//!   permutation) up to the number a real device of this configuration keeps resident; each runs
//!   for a time slice and yields, so a block spinning on a flag that another block sets completes.
//!   Inside a block, warps run until they block on a barrier or their slice ends.
//! * **Deterministic.** The schedule depends only on the program, its inputs and
//!   `LOWBIT_SIM_SEED`; a seed other than 0 permutes block start order, warp order and slice
//!   lengths.
//! * A checker violation, `trap` or a hang stops the launch with a report ([`crate::check`]).

// Lane loops index several parallel per-lane arrays at once.
#![allow(clippy::needless_range_loop)]

mod cta;
mod memory;
mod ops;

use std::io::Write as _;
use std::time::{Duration, Instant};

use crate::check::Report;
use crate::ir::Kernel;
use crate::mem::{GlobalMemory, MemView};
use crate::profile::Profile;
use crate::{cuda, Result, SimConfig, SimError};

pub(crate) use cta::Cta;

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

/// State shared by all blocks of one launch.
pub(crate) struct Launch<'a> {
    pub k: &'a Kernel,
    pub cfg: LaunchConfig,
    pub params: &'a [u8],
    pub view: MemView,
    pub check: bool,
    pub profiling: bool,
    pub prof: Profile,
    /// Distinct global bytes read (profiling only): a bitmap per allocation (index in `view`).
    pub unique: Vec<Vec<u64>>,
    /// Of those, the ones first read before any store of this launch wrote them (profiling only).
    pub first_touch: Vec<Vec<u64>>,
    /// Global bytes stored by this launch (profiling only).
    pub written: Vec<Vec<u64>>,
    pub smem_size: usize,
    pub nthreads: u32,
    /// Index in `view.live` of the allocation the last global access hit.
    pub last_alloc: usize,
    /// Events that count as progress for hang detection (global stores, atomics, exits).
    pub progress: u64,
    /// Polling loads (`ld.volatile`, `.relaxed`, `.acquire` on global or generic memory): a block
    /// that polls without progress yields its time slice early.
    pub polls: u64,
    pub sm_count: u32,
    pub seed: u64,
    pub start: Instant,
    /// `LOWBIT_SIM_TRACE`: (kernel name substring, block, warp).
    pub trace: Option<(String, u64, usize)>,
}

/// CPU time of the calling thread in milliseconds (`CLOCK_THREAD_CPUTIME_ID`): launch speed on
/// one core, independent of what else the machine runs.
pub fn thread_cpu_ms() -> f64 {
    #[repr(C)]
    struct Timespec {
        tv_sec: i64,
        tv_nsec: i64,
    }
    extern "C" {
        fn clock_gettime(clk: i32, tp: *mut Timespec) -> i32;
    }
    const CLOCK_THREAD_CPUTIME_ID: i32 = 3;
    let mut t = Timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec through a valid pointer; Linux x86-64 ABI.
    let rc = unsafe { clock_gettime(CLOCK_THREAD_CPUTIME_ID, &mut t) };
    if rc != 0 {
        return 0.0;
    }
    t.tv_sec as f64 * 1e3 + t.tv_nsec as f64 / 1e6
}

static LAUNCHES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn rng_next(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// How many blocks of this launch a real device with this configuration keeps resident.
fn resident_blocks(k: &Kernel, cfg: &LaunchConfig, smem: usize, sim: &SimConfig) -> usize {
    let threads = (cfg.block[0] * cfg.block[1] * cfg.block[2]).max(1);
    let warps = threads.div_ceil(32);
    let by_threads = (2048 / (warps * 32)).max(1);
    let by_smem = (sim.smem_per_sm as usize).checked_div(smem).map_or(32, |b| b.max(1) as u32);
    // Registers: 64K per SM, our compacted count is a lower bound of what ptxas uses.
    let by_regs = (65536 / (k.nregs.max(32) as u32 * warps * 32)).max(1);
    let per_sm = by_threads.min(by_smem).min(by_regs).clamp(1, 32);
    per_sm as usize * sim.sm_count as usize
}

/// Runs `kernel` to completion (launches are synchronous). `params` is the parameter buffer,
/// `kernel.param_bytes` long. A checker violation, a trap or a hang is an `Err` with the CUDA
/// error a driver would return and a report; with `LOWBIT_SIM_PROFILE` set, one JSON line is
/// appended to the profile file.
pub fn launch(
    kernel: &Kernel,
    cfg: &LaunchConfig,
    params: &[u8],
    mem: &GlobalMemory,
    sim: &SimConfig,
) -> Result<LaunchStats> {
    let start = Instant::now();
    let cpu0 = thread_cpu_ms();
    if let Some(u) = &kernel.unsupported {
        return Err(SimError::new(cuda::ILLEGAL_INSTRUCTION, format!("kernel {}: {u}", kernel.name)));
    }
    let threads = cfg.block[0] as u64 * cfg.block[1] as u64 * cfg.block[2] as u64;
    if threads == 0 || threads > 1024 || cfg.grid.contains(&0) {
        return Err(SimError::invalid_value(format!(
            "launch of {}: grid {:?} and block {:?} are not a valid configuration",
            kernel.name, cfg.grid, cfg.block
        )));
    }
    if let Some(m) = kernel.maxntid {
        if threads > m[0] as u64 * m[1] as u64 * m[2] as u64 {
            return Err(SimError::invalid_value(format!(
                "launch of {}: block {:?} exceeds the kernel's .maxntid {:?}",
                kernel.name, cfg.block, m
            )));
        }
    }
    if params.len() < kernel.param_bytes {
        return Err(SimError::invalid_value(format!(
            "launch of {}: {} parameter bytes given, the kernel takes {}",
            kernel.name,
            params.len(),
            kernel.param_bytes
        )));
    }
    let smem_size = kernel.dyn_smem_base + cfg.dynamic_smem as usize;
    let mut l = Launch {
        k: kernel,
        cfg: *cfg,
        params,
        view: mem.view(),
        check: sim.check,
        profiling: sim.profile.is_some(),
        prof: Profile::default(),
        unique: Vec::new(),
        first_touch: Vec::new(),
        written: Vec::new(),
        smem_size,
        nthreads: threads as u32,
        last_alloc: 0,
        progress: 0,
        polls: 0,
        sm_count: sim.sm_count,
        seed: sim.seed,
        start,
        trace: std::env::var("LOWBIT_SIM_TRACE").ok().and_then(|v| {
            let mut it = v.split(',');
            Some((it.next()?.to_string(), it.next()?.parse().ok()?, it.next()?.parse().ok()?))
        }),
    };
    let launch_id = LAUNCHES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let total: u64 = cfg.grid.iter().map(|&g| g as u64).product();
    let resident = resident_blocks(kernel, cfg, smem_size, sim).min(total as usize).max(1);
    // Block start order.
    let mut rng = sim.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let order: Option<Vec<u64>> = (sim.seed != 0 && total <= 1 << 24).then(|| {
        let mut v: Vec<u64> = (0..total).collect();
        for i in (1..v.len()).rev() {
            v.swap(i, (rng_next(&mut rng) % (i as u64 + 1)) as usize);
        }
        v
    });
    let mut next = 0u64;
    let mut live: Vec<Cta> = Vec::new();
    let mut pool: Vec<Cta> = Vec::new();
    let mut stalled = 0u64;
    // Blocks start one at a time; another starts (up to the device's residency) only when the
    // live ones have run a full slice without finishing. Blocks that finish within a slice (the
    // common case) thus run one after another in pooled buffers, while a block that waits on a
    // later block's flag gets that block started next to it, as on a GPU.
    let mut grow = true;
    let result = loop {
        while (live.is_empty() || grow) && live.len() < resident && next < total {
            grow = false;
            let id = order.as_ref().map_or(next, |o| o[next as usize]);
            next += 1;
            let c = match pool.pop() {
                Some(mut c) => {
                    c.reset(&l, id, launch_id);
                    c
                }
                None => Cta::new(&l, id, launch_id),
            };
            live.push(c);
        }
        if live.is_empty() {
            break Ok(());
        }
        let mut i = 0;
        let mut any_done = false;
        let before = l.progress;
        let mut err = None;
        while i < live.len() {
            let slice = if sim.seed != 0 { 200_000 + rng_next(&mut rng) % 400_000 } else { 500_000 };
            match live[i].run(&mut l, slice) {
                Ok(true) => {
                    any_done = true;
                    pool.push(live.swap_remove(i));
                }
                Ok(false) => i += 1,
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        if let Some(e) = err {
            break Err(e);
        }
        grow = !live.is_empty();
        if any_done || l.progress != before {
            stalled = 0;
        } else {
            stalled += 500_000 * live.len() as u64;
            if stalled > sim.hang_limit {
                let c = &live[0];
                break Err(Report::new(
                    cuda::LAUNCH_FAILED,
                    "hang: no block made progress (no global store, atomic or exit)",
                )
                .detail(format!(
                    "for {stalled} warp-instructions with {} blocks resident; block {:?} is at {}",
                    live.len(),
                    c.block_idx(),
                    c.where_now(&l)
                ))
                .kernel(&l)
                .finish());
            }
        }
    };
    if l.profiling {
        let ones = |v: &[Vec<u64>]| v.iter().map(|b| b.iter().map(|w| w.count_ones() as u64).sum::<u64>()).sum();
        l.prof.global_unique_bytes_read = ones(&l.unique);
        l.prof.global_first_touch_bytes_read = ones(&l.first_touch);
    }
    let wall = start.elapsed();
    if let Some(path) = &sim.profile {
        let line = l.prof.to_json(
            &kernel.name,
            cfg.grid,
            cfg.block,
            cfg.dynamic_smem,
            wall.as_secs_f64() * 1e3,
            thread_cpu_ms() - cpu0,
        );
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
            let _ = writeln!(f, "{line}");
        }
    }
    result.map(|()| LaunchStats { profile: l.prof, wall })
}
