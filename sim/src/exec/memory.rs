//! Memory accesses of one thread: global (through the launch's allocation table), shared (with
//! the race and `cp.async` shadows), param. Each returns a [`MemErr`] that the caller turns into
//! a report naming the thread and instruction.

use super::cta::Cta;
use super::Launch;
use crate::cuda;
use crate::ir::{LOCAL_GENERIC_BASE, PARAM_BASE, SHARED_GENERIC_BASE};

/// A failed access: CUDA error code, title, detail.
pub(crate) struct MemErr {
    pub code: u32,
    pub title: String,
    pub detail: String,
}

fn merr(code: u32, title: impl Into<String>, detail: impl Into<String>) -> MemErr {
    MemErr { code, title: title.into(), detail: detail.into() }
}

/// Where a generic address points.
pub(crate) enum Where {
    Global(u64),
    Shared(u32),
    Param(usize),
    Local(u64),
}

/// Resolves a generic address.
#[inline]
pub(crate) fn classify(addr: u64) -> Where {
    if (SHARED_GENERIC_BASE..SHARED_GENERIC_BASE + (1 << 32)).contains(&addr) {
        Where::Shared((addr - SHARED_GENERIC_BASE) as u32)
    } else if (PARAM_BASE..PARAM_BASE + (1 << 32)).contains(&addr) {
        Where::Param((addr - PARAM_BASE) as usize)
    } else if (LOCAL_GENERIC_BASE..LOCAL_GENERIC_BASE + (1 << 32)).contains(&addr) {
        Where::Local(addr - LOCAL_GENERIC_BASE)
    } else {
        Where::Global(addr)
    }
}

impl Launch<'_> {
    /// The allocation and offset for a global access of `len` bytes (bounds, alignment, liveness).
    #[inline]
    pub(crate) fn global(&mut self, addr: u64, len: usize, align: usize) -> Result<(usize, usize), MemErr> {
        if align > 1 && addr % align as u64 != 0 {
            return Err(merr(
                cuda::MISALIGNED_ADDRESS,
                "misaligned global access",
                format!("address {addr:#x} of a {len}-byte access is not {align}-byte aligned"),
            ));
        }
        let live = &self.view.live;
        if let Some(a) = live.get(self.last_alloc) {
            if addr >= a.base && addr + len as u64 <= a.end() {
                return Ok((self.last_alloc, (addr - a.base) as usize));
            }
        }
        match self.view.find(addr, len) {
            Ok((a, off)) => {
                let i = self.view.index_of(a.base).unwrap_or(0);
                self.last_alloc = i;
                Ok((i, off))
            }
            Err(f) => Err(merr(
                cuda::ILLEGAL_ADDRESS,
                "invalid global access",
                format!("{len}-byte access at {addr:#x} {}", self.view.describe(addr, &f)),
            )),
        }
    }

    /// Reads `out.len()` global bytes, checking initialisation.
    #[inline]
    pub(crate) fn gload(&mut self, addr: u64, out: &mut [u8], align: usize) -> Result<(), MemErr> {
        let (i, off) = self.global(addr, out.len(), align)?;
        let a = &self.view.live[i];
        if self.check {
            if let Some(b) = a.first_uninit(off, out.len()) {
                return Err(merr(
                    cuda::LAUNCH_FAILED,
                    "uninitialised global memory read",
                    format!(
                        "{}-byte load at {addr:#x} reads byte {} of {:?}, which nothing has written",
                        out.len(),
                        b,
                        a
                    ),
                ));
            }
        }
        a.read_bytes(off, out);
        if self.profiling {
            let words = a.size.div_ceil(64);
            let (bits, first, written) = (
                bitmap(&mut self.unique, i, words),
                bitmap(&mut self.first_touch, i, words),
                self.written.get(i).filter(|w| !w.is_empty()),
            );
            for b in off..off + out.len() {
                let (w, m) = (b / 64, 1u64 << (b % 64));
                if bits[w] & m == 0 && written.is_none_or(|wr| wr[w] & m == 0) {
                    first[w] |= m; // read before this launch wrote it: must come from memory
                }
                bits[w] |= m;
            }
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn gstore(&mut self, addr: u64, src: &[u8], align: usize) -> Result<(), MemErr> {
        let (i, off) = self.global(addr, src.len(), align)?;
        let size = self.view.live[i].size;
        self.view.live[i].write_bytes(off, src);
        self.progress += 1;
        if self.profiling {
            let written = bitmap(&mut self.written, i, size.div_ceil(64));
            for b in off..off + src.len() {
                written[b / 64] |= 1 << (b % 64);
            }
        }
        Ok(())
    }

    #[inline]
    pub(crate) fn pload(&self, off: usize, out: &mut [u8]) -> Result<(), MemErr> {
        if off + out.len() > self.params.len() {
            return Err(merr(
                cuda::ILLEGAL_ADDRESS,
                "invalid parameter access",
                format!(
                    "{}-byte load at parameter offset {off}; the kernel's parameters are {} bytes",
                    out.len(),
                    self.params.len()
                ),
            ));
        }
        out.copy_from_slice(&self.params[off..off + out.len()]);
        Ok(())
    }
}

impl Cta {
    /// The bytes of thread `lane`'s local frame at `off` (warp `wi`).
    pub(crate) fn local(
        &mut self,
        l: &Launch<'_>,
        wi: usize,
        lane: usize,
        off: u64,
        len: usize,
    ) -> Result<&mut [u8], MemErr> {
        let frame = l.k.local_bytes;
        if off as usize + len > frame || off > u32::MAX as u64 {
            return Err(merr(
                cuda::ILLEGAL_ADDRESS,
                "invalid local access",
                format!("{len}-byte access at local offset {off:#x}; the thread's frame is {frame} bytes"),
            ));
        }
        let w = &mut self.warps[wi];
        let o = lane * frame + off as usize;
        Ok(&mut w.local[o..o + len])
    }

    fn shared_bounds(&self, l: &Launch<'_>, off: u32, len: usize, align: usize) -> Result<usize, MemErr> {
        if align > 1 && off as usize % align != 0 {
            return Err(merr(
                cuda::MISALIGNED_ADDRESS,
                "misaligned shared access",
                format!("shared address {off:#x} of a {len}-byte access is not {align}-byte aligned"),
            ));
        }
        let o = off as usize;
        if o + len > self.smem.len() {
            return Err(merr(
                cuda::ILLEGAL_ADDRESS,
                "invalid shared access",
                format!(
                    "{len}-byte access at shared address {off:#x}; the block has {} bytes ({} static + {} dynamic)",
                    self.smem.len(),
                    l.k.dyn_smem_base,
                    l.cfg.dynamic_smem
                ),
            ));
        }
        Ok(o)
    }

    fn stamp(&self, tid: u32) -> u64 {
        self.epoch << 16 | (tid as u64 + 1)
    }

    /// Shared load by thread `tid` (race: a write by another warp since the last barrier).
    #[inline]
    pub(crate) fn sload(
        &mut self,
        l: &Launch<'_>,
        tid: u32,
        off: u32,
        out: &mut [u8],
        align: usize,
    ) -> Result<(), MemErr> {
        let o = self.shared_bounds(l, off, out.len(), align)?;
        if l.check {
            let n = out.len();
            if let Some(i) = self.pending[o..o + n].iter().position(|&p| p != 0) {
                return Err(merr(
                    cuda::LAUNCH_FAILED,
                    "cp.async destination read before cp.async.wait_group",
                    format!(
                        "shared byte {:#x} is the destination of a cp.async that no wait_group has covered yet",
                        o + i
                    ),
                ));
            }
            let (ep, me, mywarp) = (self.epoch, self.stamp(tid), (tid / 32) as u64);
            let multi = ep << 16 | 0xFFFF;
            // Branch-free over the bytes (the compiler vectorises it); the report is built only
            // when a conflict was seen.
            let mut bad = false;
            for (&w, r) in self.wstamp[o..o + n].iter().zip(self.rstamp[o..o + n].iter_mut()) {
                let wt = w & 0xFFFF;
                bad |= (w >> 16 == ep) & (wt != 0) & (wt.wrapping_sub(1) >> 5 != mywarp);
                let rr = *r;
                let rt = rr & 0xFFFF;
                let live = (rr >> 16 == ep) & (rt != 0);
                let other = rt.wrapping_sub(1) >> 5 != mywarp;
                *r = if !live {
                    me
                } else if rt == 0xFFFF {
                    rr
                } else if other {
                    multi
                } else {
                    me
                };
            }
            if bad {
                let i = self.wstamp[o..o + n]
                    .iter()
                    .position(|&w| w >> 16 == ep && w & 0xFFFF != 0 && ((w & 0xFFFF) - 1) >> 5 != mywarp)
                    .unwrap_or(0);
                let wt = (self.wstamp[o + i] & 0xFFFF) - 1;
                return Err(merr(
                    cuda::LAUNCH_FAILED,
                    "shared-memory data race (read after write)",
                    format!(
                        "thread {tid} reads shared byte {:#x}, which thread {wt} (another warp) wrote with no barrier in between",
                        o + i
                    ),
                ));
            }
        }
        out.copy_from_slice(&self.smem[o..o + out.len()]);
        Ok(())
    }

    /// Shared store by thread `tid` (races: a read or write by another warp since the barrier).
    #[inline]
    pub(crate) fn sstore(
        &mut self,
        l: &Launch<'_>,
        tid: u32,
        off: u32,
        src: &[u8],
        align: usize,
    ) -> Result<(), MemErr> {
        let o = self.shared_bounds(l, off, src.len(), align)?;
        if l.check {
            self.check_write(tid, o, src.len())?;
        }
        self.smem[o..o + src.len()].copy_from_slice(src);
        Ok(())
    }

    fn check_write(&mut self, tid: u32, o: usize, len: usize) -> Result<(), MemErr> {
        let (ep, me, mywarp) = (self.epoch, self.stamp(tid), (tid / 32) as u64);
        let mut bad = self.pending[o..o + len].iter().any(|&p| p != 0);
        for (&w, &r) in self.wstamp[o..o + len].iter().zip(&self.rstamp[o..o + len]) {
            let (wt, rt) = (w & 0xFFFF, r & 0xFFFF);
            bad |= (w >> 16 == ep) & (wt != 0) & (wt.wrapping_sub(1) >> 5 != mywarp);
            bad |= (r >> 16 == ep) & (rt != 0) & ((rt == 0xFFFF) | (rt.wrapping_sub(1) >> 5 != mywarp));
        }
        if bad {
            return Err(self.write_conflict(tid, o, len));
        }
        self.wstamp[o..o + len].fill(me);
        Ok(())
    }

    /// The report for a conflicting shared write (the slow path of `check_write`).
    fn write_conflict(&self, tid: u32, o: usize, len: usize) -> MemErr {
        let (ep, mywarp) = (self.epoch, (tid / 32) as u64);
        for b in o..o + len {
            if self.pending[b] != 0 {
                return merr(
                    cuda::LAUNCH_FAILED,
                    "shared-memory data race with a pending cp.async",
                    format!("thread {tid} writes shared byte {b:#x}, the destination of a cp.async not yet waited for"),
                );
            }
            let w = self.wstamp[b];
            if w >> 16 == ep && w & 0xFFFF != 0 && ((w & 0xFFFF) - 1) >> 5 != mywarp {
                return merr(
                    cuda::LAUNCH_FAILED,
                    "shared-memory data race (write after write)",
                    format!(
                        "thread {tid} writes shared byte {b:#x}, which thread {} (another warp) wrote with no barrier in between",
                        (w & 0xFFFF) - 1
                    ),
                );
            }
            let r = self.rstamp[b];
            if r >> 16 == ep && r & 0xFFFF != 0 && (r & 0xFFFF == 0xFFFF || ((r & 0xFFFF) - 1) >> 5 != mywarp) {
                let who = if r & 0xFFFF == 0xFFFF {
                    "threads of several warps".to_string()
                } else {
                    format!("thread {}", (r & 0xFFFF) - 1)
                };
                return merr(
                    cuda::LAUNCH_FAILED,
                    "shared-memory data race (write after read)",
                    format!("thread {tid} writes shared byte {b:#x}, which {who} read with no barrier in between"),
                );
            }
        }
        merr(cuda::LAUNCH_FAILED, "shared-memory data race", format!("thread {tid}, shared bytes {o:#x}+{len}"))
    }

    /// Shared atomics: bounds and alignment only (atomics do not race with each other).
    #[inline]
    pub(crate) fn satomic(&mut self, l: &Launch<'_>, off: u32, len: usize) -> Result<usize, MemErr> {
        self.shared_bounds(l, off, len, len)
    }

    /// Bounds-checks a `cp.async` destination and marks it pending.
    pub(crate) fn cp_dst(&mut self, l: &Launch<'_>, off: u32, len: usize) -> Result<(), MemErr> {
        let o = self.shared_bounds(l, off, len, len)?;
        if l.check {
            for p in &mut self.pending[o..o + len] {
                *p = p.saturating_add(1);
            }
        }
        Ok(())
    }

    /// Completes the pending `cp.async` of `lanes` in warp `wi` whose group is older than the
    /// `keep` most recent committed groups (`keep == u32::MAX`: all, committed or not).
    pub(crate) fn complete_cp(&mut self, l: &Launch<'_>, wi: usize, lanes: u32, keep: u32) {
        let Cta { warps, smem, wstamp, pending, epoch, .. } = self;
        let w = &mut warps[wi];
        let committed = w.cp_committed;
        let check = l.check;
        let ep = *epoch;
        w.cp.retain(|c| {
            let lane = c.lane as usize;
            let finish = lanes >> lane & 1 != 0
                && (keep == u32::MAX || (c.group != u32::MAX && c.group + keep < committed[lane]));
            if finish {
                let o = c.dst as usize;
                let len = c.len as usize;
                smem[o..o + len].copy_from_slice(&c.data[..len]);
                if check {
                    let me = ep << 16 | (wi as u64 * 32 + lane as u64 + 1);
                    for b in o..o + len {
                        pending[b] = pending[b].saturating_sub(1);
                        wstamp[b] = me;
                    }
                }
            }
            !finish
        });
    }
}

/// The bitmap of allocation `i` in `maps`, created (all clear) on first use.
fn bitmap(maps: &mut Vec<Vec<u64>>, i: usize, words: usize) -> &mut Vec<u64> {
    if maps.len() <= i {
        maps.resize_with(i + 1, Vec::new);
    }
    let b = &mut maps[i];
    if b.is_empty() {
        *b = vec![0; words];
    }
    b
}
