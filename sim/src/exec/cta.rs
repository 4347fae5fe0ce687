//! A thread block: its warps, shared memory with the race and `cp.async` shadows, barriers, and
//! the warp scheduler.

use super::Launch;
use crate::check::Report;
use crate::ir::{BarKind, Op, Special};
use crate::{cuda, Result, SimError};

/// Why a group of lanes is not running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Park {
    Run,
    /// Waiting at barrier `id` (at the group's pc).
    Barrier(u32),
    /// Waiting at a warp-synchronous instruction for lanes still elsewhere.
    Collective,
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct Group {
    pub pc: u32,
    pub mask: u32,
    pub park: Park,
}

/// One pending `cp.async` of one lane.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CpOp {
    pub lane: u8,
    /// Commit-group number of the lane, or `u32::MAX` while uncommitted.
    pub group: u32,
    pub dst: u32,
    pub len: u8,
    pub data: [u8; 16],
}

pub(crate) struct Warp {
    pub regs: Vec<u64>,
    /// `.local` frames of the 32 lanes, `local_bytes` each.
    pub local: Vec<u8>,
    pub groups: Vec<Group>,
    /// Lanes that exist (a partial last warp has fewer).
    pub exists: u32,
    pub exited: u32,
    pub cp: Vec<CpOp>,
    /// Committed `cp.async` groups per lane.
    pub cp_committed: [u32; 32],
    /// Lanes not exited when the warp first arrived at the barrier it waits on (synccheck).
    pub bar_expect: u32,
}

impl Warp {
    pub fn live(&self) -> u32 {
        self.exists & !self.exited
    }
}

#[derive(Clone, Copy, Debug)]
pub(crate) struct BarState {
    pub arrived: u32,
    pub expected: u32,
    /// `bar.red`: lanes whose predicate was true.
    pub red: u32,
    pub kind: BarKind,
}

pub(crate) struct Cta {
    pub linear: u64,
    pub idx: [u32; 3],
    pub warps: Vec<Warp>,
    pub smem: Vec<u8>,
    /// Race shadow: per byte, (epoch << 16 | tid + 1) of the last writer and of the last reader
    /// (tid field 0xFFFF: readers from several warps).
    pub wstamp: Vec<u64>,
    pub rstamp: Vec<u64>,
    /// Per byte: a `cp.async` has been issued to it and not yet waited for.
    pub pending: Vec<u8>,
    pub epoch: u64,
    pub bars: [BarState; 16],
    pub live_threads: u32,
    pub done_warps: usize,
    pub launch_id: u64,
}

impl Default for BarState {
    fn default() -> Self {
        BarState { arrived: 0, expected: 0, red: 0, kind: BarKind::Sync }
    }
}

pub(crate) const FULL: u32 = u32::MAX;

impl Cta {
    pub fn new(l: &Launch<'_>, linear: u64, launch_id: u64) -> Self {
        let mut c = Cta {
            linear: 0,
            idx: [0; 3],
            warps: Vec::new(),
            smem: Vec::new(),
            wstamp: Vec::new(),
            rstamp: Vec::new(),
            pending: Vec::new(),
            epoch: 1,
            bars: Default::default(),
            live_threads: 0,
            done_warps: 0,
            launch_id,
        };
        c.reset(l, linear, launch_id);
        c
    }

    /// Re-initialises a (pooled) block for grid index `linear`.
    pub fn reset(&mut self, l: &Launch<'_>, linear: u64, launch_id: u64) {
        let g = l.cfg.grid;
        self.linear = linear;
        self.launch_id = launch_id;
        self.idx = [
            (linear % g[0] as u64) as u32,
            ((linear / g[0] as u64) % g[1] as u64) as u32,
            (linear / (g[0] as u64 * g[1] as u64)) as u32,
        ];
        let n = l.smem_size;
        self.smem.clear();
        self.smem.resize(n, 0xFF);
        if l.check {
            if self.wstamp.len() != n {
                self.wstamp = vec![0; n];
                self.rstamp = vec![0; n];
                self.pending = vec![0; n];
            } else {
                self.pending.iter_mut().for_each(|p| *p = 0);
            }
        }
        // A fresh epoch range, so stamps left by a previous block in these buffers are stale.
        self.epoch += 2;
        self.bars = Default::default();
        self.live_threads = l.nthreads;
        self.done_warps = 0;
        let nwarps = l.nthreads.div_ceil(32) as usize;
        let nregs = l.k.nregs.max(1);
        self.warps.truncate(nwarps);
        while self.warps.len() < nwarps {
            self.warps.push(Warp {
                regs: Vec::new(),
                local: Vec::new(),
                groups: Vec::new(),
                exists: 0,
                exited: 0,
                cp: Vec::new(),
                cp_committed: [0; 32],
                bar_expect: 0,
            });
        }
        let b = l.cfg.block;
        for (wi, w) in self.warps.iter_mut().enumerate() {
            w.regs.clear();
            w.regs.resize(nregs * 32, 0);
            w.local.clear();
            w.local.resize(l.k.local_bytes * 32, 0xFF);
            let first = wi as u32 * 32;
            let n = (l.nthreads - first).min(32);
            w.exists = if n == 32 { FULL } else { (1u32 << n) - 1 };
            w.exited = 0;
            w.groups.clear();
            w.groups.push(Group { pc: 0, mask: w.exists, park: Park::Run });
            w.cp.clear();
            w.cp_committed = [0; 32];
            w.bar_expect = 0;
            for &(r, v) in &l.k.consts {
                w.regs[r as usize * 32..r as usize * 32 + 32].fill(v);
            }
            for &(r, s) in &l.k.specials {
                for lane in 0..32u32 {
                    let t = first + lane;
                    let tid = [t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])];
                    let v: u64 = match s {
                        Special::Tid(d) => tid[d as usize] as u64,
                        Special::Ntid(d) => b[d as usize] as u64,
                        Special::Ctaid(d) => self.idx[d as usize] as u64,
                        Special::Nctaid(d) => g[d as usize] as u64,
                        Special::LaneId => lane as u64,
                        Special::WarpId => wi as u64,
                        Special::NWarpId => 64,
                        Special::SmId => linear % l.sm_count as u64,
                        Special::NSmId => l.sm_count as u64,
                        Special::GridId => launch_id,
                        Special::LaneMaskEq => 1u64 << lane,
                        Special::LaneMaskLe => (((1u64 << (lane + 1)) - 1) as u32) as u64,
                        Special::LaneMaskLt => (1u64 << lane) - 1,
                        Special::LaneMaskGe => (!((1u64 << lane) - 1) as u32) as u64,
                        Special::LaneMaskGt => (!((1u64 << (lane + 1)) - 1) as u32) as u64,
                        Special::DynamicSmemSize => l.cfg.dynamic_smem as u64,
                        Special::TotalSmemSize => l.smem_size as u64,
                        Special::Clock | Special::Clock64 | Special::GlobalTimer => 0,
                    };
                    w.regs[r as usize * 32 + lane as usize] = v;
                }
            }
        }
    }

    pub fn block_idx(&self) -> [u32; 3] {
        self.idx
    }

    /// Where the block's first unfinished warp is, for hang reports.
    pub fn where_now(&self, l: &Launch<'_>) -> String {
        for (wi, w) in self.warps.iter().enumerate() {
            if let Some(g) = w.groups.first() {
                return format!(
                    "warp {wi} pc {}: {} ({})",
                    g.pc,
                    l.k.texts.get(g.pc as usize).map_or("?", |s| s.as_str()),
                    l.k.where_(g.pc as usize)
                );
            }
        }
        "nowhere (all warps done)".into()
    }

    /// The report header for thread `lane` of warp `wi` at instruction `pc`.
    pub fn fault(&self, l: &Launch<'_>, wi: usize, lane: u32, pc: u32, code: u32, title: impl Into<String>) -> Report {
        let b = l.cfg.block;
        let t = wi as u32 * 32 + lane;
        let tid = [t % b[0], (t / b[0]) % b[1], t / (b[0] * b[1])];
        Report::new(code, title)
            .kernel(l)
            .detail(format!(
                "block ({},{},{}), thread ({},{},{}) (warp {wi}, lane {lane})",
                self.idx[0], self.idx[1], self.idx[2], tid[0], tid[1], tid[2]
            ))
            .detail(format!(
                "at {}: {}",
                l.k.where_(pc as usize),
                l.k.texts.get(pc as usize).map_or("?", |s| s.as_str())
            ))
    }

    /// Runs the block for about `budget` warp-instructions. `Ok(true)` when it has finished.
    pub fn run(&mut self, l: &mut Launch<'_>, budget: u64) -> Result<bool> {
        let mut spent = 0u64;
        let nw = self.warps.len();
        let mut rot = 0usize;
        let (progress0, polls0) = (l.progress, l.polls);
        loop {
            if self.done_warps == nw {
                return Ok(true);
            }
            let mut ran = false;
            for k in 0..nw {
                let wi = if l.seed != 0 { (k * 7 + rot) % nw } else { k };
                if self.warps[wi].groups.is_empty() || !self.runnable(wi) {
                    continue;
                }
                let slice = 4096u64;
                let n = self.run_warp(l, wi, slice)?;
                spent += n;
                ran |= n > 0;
                if self.done_warps == nw {
                    return Ok(true);
                }
            }
            rot += 1;
            if !ran {
                return Err(self.deadlock(l));
            }
            if spent >= budget {
                return Ok(false);
            }
            // A block that polls memory (volatile/relaxed/acquire loads) without storing,
            // exiting or passing a barrier is waiting for another block: let the others run.
            if spent >= 32768 && l.progress == progress0 && l.polls != polls0 {
                return Ok(false);
            }
        }
    }

    fn runnable(&mut self, wi: usize) -> bool {
        let w = &mut self.warps[wi];
        if w.groups.iter().any(|g| g.park == Park::Run) {
            return true;
        }
        // Groups waiting at a warp-synchronous instruction retry only once other lanes have
        // joined them (groups at the same pc merged); otherwise the warp is blocked, and a block
        // whose warps are all blocked is a deadlock.
        let before = w.groups.len();
        merge_groups(&mut w.groups);
        if w.groups.len() == before {
            return false;
        }
        let mut any = false;
        for g in w.groups.iter_mut() {
            if g.park == Park::Collective {
                g.park = Park::Run;
                any = true;
            }
        }
        any
    }

    fn deadlock(&self, l: &Launch<'_>) -> SimError {
        let mut r = Report::new(cuda::LAUNCH_FAILED, "deadlock: every thread of the block waits and none can proceed")
            .kernel(l);
        r = r.detail(format!("block ({},{},{})", self.idx[0], self.idx[1], self.idx[2]));
        for (wi, w) in self.warps.iter().enumerate() {
            for g in &w.groups {
                let what = match g.park {
                    Park::Barrier(id) => format!("wait at barrier {id}"),
                    Park::Collective => "wait for the other lanes of a warp-synchronous instruction".into(),
                    Park::Run => "run".into(),
                };
                r = r.detail(format!(
                    "warp {wi} lanes {:#010x} {what} at {}: {}",
                    g.mask,
                    l.k.where_(g.pc as usize),
                    l.k.texts.get(g.pc as usize).map_or("?", |s| s.as_str())
                ));
            }
            if w.live() != 0 && w.groups.is_empty() {
                r = r.detail(format!("warp {wi}: lanes {:#010x} live but nowhere", w.live()));
            }
        }
        r.finish()
    }

    /// Lanes of warp `wi` exit.
    pub fn exit_lanes(&mut self, l: &mut Launch<'_>, wi: usize, mask: u32, pc: u32) -> Result<()> {
        // Pending cp.async of exiting lanes complete (their destination is theirs to race on).
        let w = &mut self.warps[wi];
        if w.cp.iter().any(|c| mask >> c.lane & 1 != 0) {
            self.complete_cp(l, wi, mask, u32::MAX);
        }
        // synccheck: lanes leaving while others of their warp wait at an aligned barrier.
        let w = &self.warps[wi];
        if w.bar_expect & mask != 0 {
            if let Some(waiting) = w.groups.iter().find(|g| matches!(g.park, Park::Barrier(_))).copied() {
                let lane = (mask & w.bar_expect).trailing_zeros();
                return Err(self
                    .fault(
                        l,
                        wi,
                        lane,
                        pc,
                        cuda::LAUNCH_FAILED,
                        "barrier divergence: bar.sync not reached by all threads of the warp",
                    )
                    .detail(format!(
                        "lanes {:#010x} exit while lanes {:#010x} wait at {}: {}",
                        mask,
                        waiting.mask,
                        l.k.where_(waiting.pc as usize),
                        l.k.texts[waiting.pc as usize]
                    ))
                    .finish());
            }
        }
        let w = &mut self.warps[wi];
        w.exited |= mask;
        self.live_threads -= mask.count_ones();
        l.progress += 1;
        if self.warps[wi].live() == 0 {
            self.done_warps += 1;
        }
        // Barriers may now be complete.
        for id in 0..16u32 {
            if self.bars[id as usize].arrived > 0 {
                self.try_release(l, id)?;
            }
        }
        Ok(())
    }

    /// A group arrives at barrier `id` (`red`: how many of its lanes have the `bar.red`
    /// predicate true).
    #[allow(clippy::too_many_arguments)]
    pub fn arrive(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        gi: usize,
        id: u32,
        count: Option<u32>,
        red: Option<u32>,
        kind: BarKind,
    ) -> Result<()> {
        if id >= 16 {
            let g = self.warps[wi].groups[gi];
            return Err(self
                .fault(
                    l,
                    wi,
                    g.mask.trailing_zeros(),
                    g.pc,
                    cuda::LAUNCH_FAILED,
                    format!("barrier id {id} out of range (0..16)"),
                )
                .finish());
        }
        let w = &mut self.warps[wi];
        let live = w.live();
        if w.bar_expect == 0 {
            w.bar_expect = live;
        }
        let g = &mut w.groups[gi];
        g.park = Park::Barrier(id);
        let n = g.mask.count_ones();
        let b = &mut self.bars[id as usize];
        b.arrived += n;
        b.red += red.unwrap_or(0);
        b.kind = kind;
        if let Some(c) = count {
            b.expected = c;
        }
        self.try_release(l, id)
    }

    fn try_release(&mut self, l: &mut Launch<'_>, id: u32) -> Result<()> {
        let b = self.bars[id as usize];
        let expected = if b.expected > 0 { b.expected } else { self.live_threads };
        if b.arrived < expected || b.arrived == 0 {
            return Ok(());
        }
        // synccheck: an aligned barrier must be one instruction for the whole warp.
        for wi in 0..self.warps.len() {
            let w = &self.warps[wi];
            let mut pcs = w.groups.iter().filter(|g| g.park == Park::Barrier(id)).map(|g| g.pc);
            if let Some(first) = pcs.next() {
                if let Some(other) = pcs.find(|&p| p != first) {
                    let aligned = matches!(l.k.code[first as usize].op, Op::Bar { aligned: true, .. });
                    if aligned {
                        return Err(self
                            .fault(
                                l,
                                wi,
                                0,
                                first,
                                cuda::LAUNCH_FAILED,
                                "barrier divergence: threads of one warp wait at different bar.sync instructions",
                            )
                            .detail(format!("also at {}: {}", l.k.where_(other as usize), l.k.texts[other as usize]))
                            .finish());
                    }
                }
            }
        }
        self.epoch += 1;
        self.bars[id as usize] = BarState::default();
        let red = match b.kind {
            BarKind::RedPopc => Some(b.red as u64),
            BarKind::RedAnd => Some((b.red == b.arrived) as u64),
            BarKind::RedOr => Some((b.red > 0) as u64),
            _ => None,
        };
        for w in self.warps.iter_mut() {
            let mut released = false;
            for g in w.groups.iter_mut() {
                if g.park == Park::Barrier(id) {
                    if let (Some(v), Op::Bar { d: Some(d), .. }) = (red, &l.k.code[g.pc as usize].op) {
                        for lane in 0..32 {
                            if g.mask >> lane & 1 != 0 {
                                w.regs[*d as usize * 32 + lane] = v;
                            }
                        }
                    }
                    g.park = Park::Run;
                    g.pc += 1;
                    released = true;
                }
            }
            if released {
                w.bar_expect = 0;
                merge_groups(&mut w.groups);
            }
        }
        l.progress += 1;
        Ok(())
    }
}

/// Merges groups at the same pc; keeps the list sorted by pc. Groups waiting at the same barrier
/// merge and keep waiting; any other two groups at one pc merge into a running group (lanes that
/// waited at a warp-synchronous instruction retry it with the lanes that joined them). A group
/// waiting at a barrier never merges with one that has not arrived there yet.
pub(crate) fn merge_groups(gs: &mut Vec<Group>) {
    if gs.len() < 2 {
        return;
    }
    gs.sort_by_key(|g| g.pc);
    let mut out: Vec<Group> = Vec::with_capacity(gs.len());
    for g in gs.drain(..) {
        if let Some(last) = out.last_mut() {
            if last.pc == g.pc {
                let lb = matches!(last.park, Park::Barrier(_));
                let gb = matches!(g.park, Park::Barrier(_));
                if lb && gb && last.park == g.park {
                    last.mask |= g.mask;
                    continue;
                }
                if !lb && !gb {
                    last.mask |= g.mask;
                    last.park = Park::Run;
                    continue;
                }
            }
        }
        out.push(g);
    }
    *gs = out;
}

impl Cta {
    /// The thread index within the block of `lane` in warp `wi`.
    pub fn tid(wi: usize, lane: u32) -> u32 {
        wi as u32 * 32 + lane
    }
}
