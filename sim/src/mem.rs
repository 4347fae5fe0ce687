//! Device (global) memory: an allocation table with poisoned fresh memory and an
//! initialisation shadow (one bit per byte), shared by the driver (allocation, copies) and the
//! executor (kernel loads and stores).
//!
//! Addresses are never reused: every allocation gets a fresh range, 256-byte aligned, followed by
//! an unmapped guard gap, so a stale pointer is always recognisably "after free" and an overrun
//! never lands in a neighbour.

use std::cell::UnsafeCell;
use std::sync::{Arc, RwLock};

use crate::{cuda, Result, SimError};

/// The byte fresh allocations are filled with (0xFF: a NaN in f16, bf16 and f32).
pub const POISON: u8 = 0xFF;
/// The first device address handed out.
pub const BASE: u64 = 0x7f00_0000_0000;
/// Unmapped bytes between two allocations.
pub const GUARD: u64 = 1 << 16;

/// One device allocation. Its bytes are shared by every thread that holds it (launches on other
/// host threads included), exactly as device memory is shared by everything on a GPU; accesses
/// go through raw pointers, and the executor checks bounds before every access.
pub struct Allocation {
    pub base: u64,
    pub size: usize,
    data: Box<[UnsafeCell<u8>]>,
    /// Bit `i` set: byte `i` has been written (by the host, a memset, a copy or a kernel).
    init: Box<[UnsafeCell<u64>]>,
    /// A serial number, for reports ("allocation #12 of 4096 bytes").
    pub serial: u64,
}

// SAFETY: device memory is shared memory by definition; the simulator serialises each launch on
// one host thread, and concurrent launches on different host threads touch the same bytes only
// when the program itself races, as it would on a GPU.
unsafe impl Send for Allocation {}
// SAFETY: as above.
unsafe impl Sync for Allocation {}

impl Allocation {
    fn new(base: u64, size: usize, serial: u64) -> Result<Self> {
        let mut data = Vec::new();
        data.try_reserve_exact(size.max(1))
            .map_err(|_| SimError::new(cuda::OUT_OF_MEMORY, format!("cannot allocate {size} bytes of host memory")))?;
        data.resize_with(size.max(1), || UnsafeCell::new(POISON));
        let words = size.div_ceil(64).max(1);
        let init = (0..words).map(|_| UnsafeCell::new(0u64)).collect();
        Ok(Allocation { base, size, data: data.into_boxed_slice(), init, serial })
    }

    /// End address (exclusive).
    pub fn end(&self) -> u64 {
        self.base + self.size as u64
    }

    /// A raw pointer to byte `off`. The caller keeps `off + len <= size`.
    #[inline]
    pub fn ptr(&self, off: usize) -> *mut u8 {
        debug_assert!(off <= self.size);
        self.data[0].get().wrapping_add(off)
    }

    /// Copies `out.len()` bytes from offset `off` (bounds checked by the caller).
    #[inline]
    pub fn read_bytes(&self, off: usize, out: &mut [u8]) {
        assert!(off + out.len() <= self.size);
        // SAFETY: in bounds (asserted); see the Sync note on the type.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr(off), out.as_mut_ptr(), out.len()) }
    }

    /// Copies `src` to offset `off` and marks the bytes initialised.
    #[inline]
    pub fn write_bytes(&self, off: usize, src: &[u8]) {
        assert!(off + src.len() <= self.size);
        // SAFETY: in bounds (asserted); see the Sync note on the type.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr(off), src.len()) }
        self.mark_init(off, src.len());
    }

    /// Fills `len` bytes at `off` with `v` and marks them initialised.
    pub fn fill(&self, off: usize, len: usize, v: u8) {
        assert!(off + len <= self.size);
        // SAFETY: in bounds (asserted).
        unsafe { std::ptr::write_bytes(self.ptr(off), v, len) }
        self.mark_init(off, len);
    }

    /// Marks `[off, off+len)` as written.
    #[inline]
    pub fn mark_init(&self, off: usize, len: usize) {
        let (mut i, end) = (off, off + len);
        while i < end {
            let w = i / 64;
            let b = i % 64;
            let n = (64 - b).min(end - i);
            let m = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
            // SAFETY: w < init.len() because end <= size; see the Sync note on the type.
            unsafe { *self.init[w].get() |= m };
            i += n;
        }
    }

    /// The first byte of `[off, off+len)` never written, if any.
    #[inline]
    pub fn first_uninit(&self, off: usize, len: usize) -> Option<usize> {
        let (mut i, end) = (off, off + len);
        while i < end {
            let w = i / 64;
            let b = i % 64;
            let n = (64 - b).min(end - i);
            let m = if n == 64 { u64::MAX } else { ((1u64 << n) - 1) << b };
            // SAFETY: as in mark_init.
            let bits = unsafe { *self.init[w].get() };
            let missing = !bits & m;
            if missing != 0 {
                return Some(w * 64 + missing.trailing_zeros() as usize);
            }
            i += n;
        }
        None
    }
}

impl std::fmt::Debug for Allocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "allocation #{} [{:#x}, {:#x}) of {} bytes", self.serial, self.base, self.end(), self.size)
    }
}

#[derive(Default)]
struct Table {
    /// Live allocations, sorted by base.
    live: Vec<Arc<Allocation>>,
    /// Freed ranges (base, size, serial), for use-after-free reports.
    freed: Vec<(u64, usize, u64)>,
    next: u64,
    serial: u64,
    bytes: u64,
}

/// All device memory of the simulated device.
pub struct GlobalMemory {
    table: RwLock<Table>,
}

impl Default for GlobalMemory {
    fn default() -> Self {
        GlobalMemory { table: RwLock::new(Table { next: BASE, ..Default::default() }) }
    }
}

/// What is wrong with an address range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Inside no allocation, live or freed.
    Unmapped,
    /// Inside an allocation that was freed.
    AfterFree { base: u64, size: usize, serial: u64 },
    /// Starts inside a live allocation but runs past its end.
    Overrun { base: u64, size: usize, serial: u64 },
}

impl GlobalMemory {
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        self.table.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh allocation of `size` bytes, filled with [`POISON`] and marked uninitialised.
    pub fn alloc(&self, size: usize) -> Result<u64> {
        let mut t = self.write();
        let base = t.next;
        t.serial += 1;
        let a = Allocation::new(base, size, t.serial)?;
        t.next = (base + size.max(1) as u64 + GUARD).next_multiple_of(256);
        t.bytes += size as u64;
        t.live.push(Arc::new(a)); // bases increase, so `live` stays sorted
        Ok(base)
    }

    /// Frees the allocation that starts at `ptr`.
    pub fn free(&self, ptr: u64) -> Result<()> {
        let mut t = self.write();
        let i = t.live.binary_search_by_key(&ptr, |a| a.base).map_err(|_| {
            SimError::invalid_value(format!("cuMemFree: {ptr:#x} is not the start of a live allocation"))
        })?;
        let a = t.live.remove(i);
        t.bytes -= a.size as u64;
        t.freed.push((a.base, a.size, a.serial));
        Ok(())
    }

    /// Bytes currently allocated.
    pub fn allocated_bytes(&self) -> u64 {
        self.read().bytes
    }

    /// The live allocation holding `[addr, addr+len)` and the offset of `addr` in it.
    pub fn find(&self, addr: u64, len: usize) -> std::result::Result<(Arc<Allocation>, usize), Fault> {
        self.view().find(addr, len).map(|(a, off)| (a.clone(), off))
    }

    /// Host → device copy (marks the bytes initialised).
    pub fn copy_in(&self, dst: u64, src: &[u8]) -> Result<()> {
        let (a, off) = self.find(dst, src.len()).map_err(|f| self.copy_fault("cuMemcpyHtoD", dst, src.len(), f))?;
        a.write_bytes(off, src);
        Ok(())
    }

    /// Device → host copy.
    pub fn copy_out(&self, src: u64, dst: &mut [u8]) -> Result<()> {
        let (a, off) = self.find(src, dst.len()).map_err(|f| self.copy_fault("cuMemcpyDtoH", src, dst.len(), f))?;
        a.read_bytes(off, dst);
        Ok(())
    }

    /// Device → device copy (initialisation travels with the bytes).
    pub fn copy_within(&self, dst: u64, src: u64, len: usize) -> Result<()> {
        let (s, soff) = self.find(src, len).map_err(|f| self.copy_fault("cuMemcpyDtoD (source)", src, len, f))?;
        let (d, doff) = self.find(dst, len).map_err(|f| self.copy_fault("cuMemcpyDtoD (destination)", dst, len, f))?;
        let mut tmp = vec![0u8; len];
        s.read_bytes(soff, &mut tmp);
        // SAFETY: in bounds (find checked both ranges).
        unsafe { std::ptr::copy_nonoverlapping(tmp.as_ptr(), d.ptr(doff), len) };
        for i in 0..len {
            if s.first_uninit(soff + i, 1).is_none() {
                d.mark_init(doff + i, 1);
            }
        }
        Ok(())
    }

    /// `cuMemsetD8`.
    pub fn memset(&self, dst: u64, v: u8, len: usize) -> Result<()> {
        let (a, off) = self.find(dst, len).map_err(|f| self.copy_fault("cuMemsetD8", dst, len, f))?;
        a.fill(off, len, v);
        Ok(())
    }

    fn copy_fault(&self, what: &str, addr: u64, len: usize, f: Fault) -> SimError {
        SimError::invalid_value(format!("{what}: [{addr:#x}, +{len}) {}", self.view().describe(addr, &f)))
    }

    /// A snapshot of the table for one launch: allocations freed on other threads while it runs
    /// stay valid for it (as on a GPU, where the free waits for the stream).
    pub fn view(&self) -> MemView {
        let t = self.read();
        MemView { live: t.live.clone(), freed: t.freed.clone() }
    }
}

/// The allocation table as one launch sees it.
#[derive(Clone)]
pub struct MemView {
    pub live: Vec<Arc<Allocation>>,
    freed: Vec<(u64, usize, u64)>,
}

impl MemView {
    /// The index in `live` of the allocation that contains `addr`, if any.
    #[inline]
    pub fn index_of(&self, addr: u64) -> Option<usize> {
        let i = self.live.partition_point(|a| a.base <= addr);
        if i == 0 {
            return None;
        }
        let a = &self.live[i - 1];
        (addr < a.end() || (a.size == 0 && addr == a.base)).then_some(i - 1)
    }

    /// The live allocation holding `[addr, addr+len)` and the offset of `addr`.
    #[inline]
    pub fn find(&self, addr: u64, len: usize) -> std::result::Result<(&Arc<Allocation>, usize), Fault> {
        match self.index_of(addr) {
            Some(i) => {
                let a = &self.live[i];
                let off = (addr - a.base) as usize;
                if off + len <= a.size {
                    Ok((a, off))
                } else {
                    Err(Fault::Overrun { base: a.base, size: a.size, serial: a.serial })
                }
            }
            None => Err(self.classify(addr)),
        }
    }

    fn classify(&self, addr: u64) -> Fault {
        for &(base, size, serial) in self.freed.iter().rev() {
            if addr >= base && addr < base + size.max(1) as u64 {
                return Fault::AfterFree { base, size, serial };
            }
        }
        Fault::Unmapped
    }

    /// A sentence about `addr` and the nearest allocation, for reports.
    pub fn describe(&self, addr: u64, f: &Fault) -> String {
        match *f {
            Fault::AfterFree { base, size, serial } => format!(
                "is inside allocation #{serial} [{base:#x}, {:#x}) of {size} bytes, which was freed (use after free)",
                base + size as u64
            ),
            Fault::Overrun { base, size, serial } => format!(
                "runs past the end of allocation #{serial} [{base:#x}, {:#x}) of {size} bytes (offset {})",
                base + size as u64,
                addr as i128 - base as i128
            ),
            Fault::Unmapped => {
                let i = self.live.partition_point(|a| a.base <= addr);
                let before = i.checked_sub(1).map(|j| &self.live[j]);
                let after = self.live.get(i);
                let near = match (before, after) {
                    (Some(b), Some(a)) if addr - b.end() > a.base - addr => Some(a),
                    (Some(b), _) => Some(b),
                    (None, a) => a,
                };
                match near {
                    Some(a) if addr >= a.end() => format!(
                        "is outside every allocation; nearest: {} bytes after the end of allocation #{} [{:#x}, {:#x}) of {} bytes",
                        addr - a.end(),
                        a.serial,
                        a.base,
                        a.end(),
                        a.size
                    ),
                    Some(a) => format!(
                        "is outside every allocation; nearest: {} bytes before allocation #{} [{:#x}, {:#x}) of {} bytes",
                        a.base - addr,
                        a.serial,
                        a.base,
                        a.end(),
                        a.size
                    ),
                    None => "is outside every allocation (none is live)".to_string(),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alloc_poison_init_and_faults() {
        let m = GlobalMemory::new();
        let a = m.alloc(100).unwrap();
        let b = m.alloc(16).unwrap();
        assert_eq!(a % 256, 0);
        assert!(b >= a + 100 + GUARD);
        let mut out = [0u8; 4];
        m.copy_out(a, &mut out).unwrap();
        assert_eq!(out, [POISON; 4]);
        let (al, off) = m.find(a + 10, 4).unwrap();
        assert_eq!(al.first_uninit(off, 4), Some(10));
        m.copy_in(a + 10, &[1, 2, 3, 4]).unwrap();
        assert_eq!(al.first_uninit(off, 4), None);
        assert_eq!(al.first_uninit(8, 4), Some(8));
        assert!(matches!(m.find(a + 98, 4), Err(Fault::Overrun { .. })));
        assert!(matches!(m.find(a + 200, 4), Err(Fault::Unmapped)));
        m.free(a).unwrap();
        assert!(matches!(m.find(a + 4, 4), Err(Fault::AfterFree { .. })));
        assert!(m.free(a).is_err());
        assert_eq!(m.allocated_bytes(), 16);
    }

    #[test]
    fn init_bits_span_words() {
        let m = GlobalMemory::new();
        let a = m.alloc(300).unwrap();
        m.memset(a + 3, 7, 200).unwrap();
        let (al, _) = m.find(a, 1).unwrap();
        assert_eq!(al.first_uninit(0, 300), Some(0));
        assert_eq!(al.first_uninit(3, 200), None);
        assert_eq!(al.first_uninit(3, 201), Some(203));
    }
}
