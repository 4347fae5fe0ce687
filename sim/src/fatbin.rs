//! The fatbin container: finding the PTX text in a `cuModuleLoadData` image.
//!
//! An image is one of (CUDA driver documentation, "cuModuleLoadData"; layout as observed with
//! nvcc 13.0, see `shared/research/ptxsim.md` §3.2):
//! * a fatbin: a 16-byte header (magic `0xBA55ED50`, u16 version, u16 header size, u64 size of the
//!   entries) followed by entries, each with its own header (u16 kind: 1 = PTX, 2 = ELF; u32 header
//!   size at +4; u64 payload size at +8; u32 compressed size at +0x10; u32 arch×10 at +0x1C; u64
//!   flags at +0x28) and then its payload;
//! * the `__nv_fatbin` wrapper nvcc puts in host objects: magic `0x466243b1`, u32 version, then a
//!   pointer to the fatbin at offset 8;
//! * NUL-terminated PTX text;
//! * an ELF cubin (SASS), which the simulator cannot run.
//!
//! There is no size argument: the size comes from the fatbin header, or from `strlen` for text.
//! Every multi-byte field is read with unaligned-safe loads.

use crate::{cuda, Result, SimError};

/// Fatbin file magic (little-endian bytes `50 ED 55 BA`).
pub const FATBIN_MAGIC: u32 = 0xBA55_ED50;
/// `__nv_fatbin` wrapper magic.
pub const WRAPPER_MAGIC: u32 = 0x4662_43b1;
/// Entry kind: PTX text.
pub const KIND_PTX: u16 = 1;
/// Entry kind: ELF (SASS cubin).
pub const KIND_ELF: u16 = 2;
/// Entry flag: the payload is zstd-compressed.
pub const FLAG_ZSTD: u64 = 0x8000;
/// Entry flag: the payload is LZ4-compressed (older toolkits; unverified).
pub const FLAG_LZ4: u64 = 0x2000;
/// Entry flag: arch-specific target (`sm_90a`), usable only on exactly that arch.
pub const FLAG_ARCH_SPECIFIC: u64 = 0x10_0000;

/// Images larger than this are rejected as corrupt rather than trusted (the largest fatbin of
/// the crate is about 10 MB).
const MAX_IMAGE: u64 = 1 << 32;
/// The smallest entry header that holds every field read here (flags end at 0x30).
const MIN_ENTRY_HEADER: usize = 0x30;

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off.checked_add(8)?)?.try_into().ok()?))
}

/// One entry of a fatbin, as far as choosing one goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub kind: u16,
    /// Arch ×10 (80 = sm_80 / compute_80).
    pub arch: u32,
    pub flags: u64,
    /// Compressed size (0 when stored plainly).
    pub compressed_size: u32,
    /// Payload range in the fatbin.
    pub payload: std::ops::Range<usize>,
}

impl Entry {
    pub fn is_compressed(&self) -> bool {
        self.flags & (FLAG_ZSTD | FLAG_LZ4) != 0 || self.compressed_size != 0
    }
    pub fn arch_specific(&self) -> bool {
        self.flags & FLAG_ARCH_SPECIFIC != 0
    }
    fn describe(&self) -> String {
        let kind = match self.kind {
            KIND_PTX => "compute",
            KIND_ELF => "sm",
            _ => "kind?",
        };
        let a = if self.arch_specific() { "a" } else { "" };
        let z = if self.is_compressed() { " (compressed)" } else { "" };
        format!("{kind}_{}{a}{z}", self.arch)
    }
}

fn bad(msg: impl Into<String>) -> SimError {
    SimError::new(cuda::INVALID_IMAGE, msg)
}

/// Total size of the fatbin whose header is `header` (header + entries).
pub fn fatbin_size(header: &[u8]) -> Result<u64> {
    if u32_at(header, 0) != Some(FATBIN_MAGIC) {
        return Err(bad("not a fatbin (bad magic)"));
    }
    let hs = u16_at(header, 6).ok_or_else(|| bad("fatbin header truncated"))? as u64;
    let body = u64_at(header, 8).ok_or_else(|| bad("fatbin header truncated"))?;
    if hs < 16 {
        return Err(bad(format!("fatbin header size {hs} is below 16")));
    }
    let total = hs
        .checked_add(body)
        .filter(|&t| t <= MAX_IMAGE)
        .ok_or_else(|| bad(format!("fatbin size {body} is implausible")))?;
    Ok(total)
}

/// The entries of a fatbin held completely in `b`.
pub fn entries(b: &[u8]) -> Result<Vec<Entry>> {
    let total = fatbin_size(b)? as usize;
    if b.len() < total {
        return Err(bad(format!("fatbin claims {total} bytes but only {} are present", b.len())));
    }
    let hs = u16_at(b, 6).unwrap_or(16) as usize;
    let mut out = Vec::new();
    let mut off = hs;
    while off < total {
        let e = &b[off..total];
        let (Some(kind), Some(ehs), Some(psize)) = (u16_at(e, 0), u32_at(e, 4), u64_at(e, 8)) else {
            return Err(bad(format!("fatbin entry at offset {off} is truncated")));
        };
        let ehs = ehs as usize;
        if ehs < MIN_ENTRY_HEADER || ehs > e.len() {
            return Err(bad(format!("fatbin entry at offset {off} has a bad header size {ehs}")));
        }
        let end =
            (ehs as u64).checked_add(psize).filter(|&n| n <= e.len() as u64).ok_or_else(|| {
                bad(format!("fatbin entry at offset {off}: payload of {psize} bytes runs past the end"))
            })? as usize;
        out.push(Entry {
            kind,
            arch: u32_at(e, 0x1C).unwrap_or(0),
            flags: u64_at(e, 0x28).unwrap_or(0),
            compressed_size: u32_at(e, 0x10).unwrap_or(0),
            payload: off + ehs..off + end,
        });
        off += end;
    }
    Ok(out)
}

/// The entry the simulator uses for a device of compute capability `cc`: the PTX entry of the
/// highest arch ≤ cc, arch-specific entries only on an exact match; an uncompressed one is
/// preferred over a compressed one of a higher arch (the simulator cannot decompress).
pub fn choose(entries: &[Entry], cc: (i32, i32)) -> Result<&Entry> {
    let want = (cc.0.max(0) * 10 + cc.1.max(0)) as u32;
    let usable = |e: &&Entry| e.kind == KIND_PTX && e.arch <= want && (!e.arch_specific() || e.arch == want);
    let best = |plain_only: bool| {
        entries.iter().filter(usable).filter(|e| !plain_only || !e.is_compressed()).fold(
            None,
            |b: Option<&Entry>, e| match b {
                Some(b) if b.arch >= e.arch => Some(b),
                _ => Some(e),
            },
        )
    };
    if let Some(e) = best(true) {
        return Ok(e);
    }
    let list = entries.iter().map(Entry::describe).collect::<Vec<_>>().join(", ");
    if let Some(e) = best(false) {
        return Err(SimError::new(
            cuda::INVALID_IMAGE,
            format!(
                "the fatbin's PTX entry {} is compressed and the simulator cannot decompress it; \
                 build with nvcc --no-compress (entries: {list})",
                e.describe()
            ),
        ));
    }
    Err(SimError::new(
        cuda::NO_BINARY_FOR_GPU,
        format!(
            "the fatbin has no PTX entry for compute capability {}.{} (entries: {}); \
             add -gencode arch=compute_{want},code=compute_{want}",
            cc.0,
            cc.1,
            if list.is_empty() { "none" } else { &list }
        ),
    ))
}

/// Cuts text at its first NUL and checks it is UTF-8.
fn text_until_nul(b: &[u8]) -> Result<&str> {
    let n = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    std::str::from_utf8(&b[..n]).map_err(|e| SimError::invalid_ptx(format!("PTX text is not UTF-8: {e}")))
}

/// Whether bytes look like PTX text: after whitespace, `//`, `/*` or `.version`.
pub fn looks_like_ptx(b: &[u8]) -> bool {
    let s = b.iter().position(|c| !c.is_ascii_whitespace()).map_or(&b[..0], |i| &b[i..]);
    s.starts_with(b"//") || s.starts_with(b"/*") || s.starts_with(b".version")
}

/// The PTX text of an image held in `b` (a fatbin, PTX text, or an ELF, which is refused).
/// The `__nv_fatbin` wrapper holds a pointer and is handled by [`ptx_from_ptr`] only.
pub fn ptx_from_bytes(b: &[u8], cc: (i32, i32)) -> Result<&str> {
    if u32_at(b, 0) == Some(FATBIN_MAGIC) {
        let es = entries(b)?;
        let e = choose(&es, cc)?;
        return text_until_nul(&b[e.payload.clone()]);
    }
    if b.starts_with(b"\x7fELF") {
        return Err(SimError::new(
            cuda::NO_BINARY_FOR_GPU,
            "the image is an ELF cubin (SASS); the simulator runs PTX only (embed compute_XX PTX)",
        ));
    }
    if looks_like_ptx(b) {
        return text_until_nul(b);
    }
    Err(bad("the image is neither a fatbin, nor PTX text, nor an ELF cubin"))
}

/// Reads up to `n` bytes at `p`, stopping after the first NUL (so a short C string is never read
/// past its terminator).
///
/// # Safety
/// `p` must point to a NUL-terminated string or to at least `n` readable bytes.
unsafe fn peek(p: *const u8, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: bytes before the first NUL are readable (caller's contract), and we stop there.
        let c = unsafe { p.add(i).read() };
        v.push(c);
        if c == 0 {
            break;
        }
    }
    v
}

/// The PTX text of the image at `p`, copied out (`cuModuleLoadData` semantics).
///
/// # Safety
/// `p` must point to a valid image as `cuModuleLoadData` defines it: a fatbin whose header
/// tells its full size, a `__nv_fatbin` wrapper pointing at one, a NUL-terminated string, or an
/// ELF image.
pub unsafe fn ptx_from_ptr(p: *const u8, cc: (i32, i32)) -> Result<String> {
    if p.is_null() {
        return Err(SimError::invalid_value("cuModuleLoadData: null image"));
    }
    // None of the magics contains a zero byte, so a NUL in the first 4 bytes means short text,
    // and 4 bytes without one that match a magic mean a binary image of at least 16 bytes.
    // SAFETY: caller's contract.
    let magic = unsafe { peek(p, 4) };
    match u32_at(&magic, 0) {
        Some(WRAPPER_MAGIC) => {
            // The wrapper is { u32 magic, u32 version, const void *fatbin, const void *name }:
            // the pointer is at offset 8.
            // SAFETY: a wrapper is at least 16 bytes (caller's contract); read unaligned.
            let inner = unsafe { p.add(8).cast::<*const u8>().read_unaligned() };
            if inner.is_null() {
                return Err(bad("__nv_fatbin wrapper with a null fatbin pointer"));
            }
            // SAFETY: the wrapper points at an image (caller's contract).
            if u32_at(&unsafe { peek(inner, 4) }, 0) != Some(FATBIN_MAGIC) {
                return Err(bad("__nv_fatbin wrapper does not point at a fatbin"));
            }
            // SAFETY: as for a direct fatbin below.
            unsafe { fatbin_at(inner, cc) }
        }
        // SAFETY: caller's contract.
        Some(FATBIN_MAGIC) => unsafe { fatbin_at(p, cc) },
        _ if magic.starts_with(b"\x7fELF") => ptx_from_bytes(&magic, cc).map(str::to_owned),
        _ => {
            // NUL-terminated text.
            // SAFETY: caller's contract: not a fatbin nor ELF, so a NUL-terminated string.
            let s = unsafe { std::ffi::CStr::from_ptr(p.cast()) };
            ptx_from_bytes(s.to_bytes(), cc).map(str::to_owned)
        }
    }
}

/// # Safety
/// `p` points at a fatbin (its magic checked) whose header tells its full size.
unsafe fn fatbin_at(p: *const u8, cc: (i32, i32)) -> Result<String> {
    let mut head = [0u8; 16];
    // SAFETY: a fatbin starts with a 16-byte header (caller's contract).
    unsafe { std::ptr::copy_nonoverlapping(p, head.as_mut_ptr(), 16) };
    let total = fatbin_size(&head)? as usize;
    // SAFETY: the header says the fatbin is `total` bytes long (caller's contract); u8 has no
    // alignment requirement.
    let b = unsafe { std::slice::from_raw_parts(p, total) };
    ptx_from_bytes(b, cc).map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PTX80: &str = "//\n// test\n//\n\n.version 9.0\n.target sm_80\n.address_size 64\n";
    const PTX90A: &str = ".version 9.0\n.target sm_90a\n.address_size 64\n";

    /// One entry as nvcc lays it out (ptxsim.md §3.2): header of 0x50 (ELF) or 0x70 (PTX) bytes,
    /// payload padded to 8.
    fn entry(kind: u16, arch: u32, flags: u64, payload: &[u8], compressed: u32) -> Vec<u8> {
        let ehs: u32 = if kind == KIND_PTX { 0x70 } else { 0x50 };
        let mut p = payload.to_vec();
        if kind == KIND_PTX && compressed == 0 {
            p.push(0);
        }
        while p.len() % 8 != 0 {
            p.push(0);
        }
        let mut h = vec![0u8; ehs as usize];
        h[0..2].copy_from_slice(&kind.to_le_bytes());
        h[2..4].copy_from_slice(&0x0101u16.to_le_bytes());
        h[4..8].copy_from_slice(&ehs.to_le_bytes());
        h[8..16].copy_from_slice(&(p.len() as u64).to_le_bytes());
        h[0x10..0x14].copy_from_slice(&compressed.to_le_bytes());
        h[0x18..0x1C].copy_from_slice(&[0, 0, 9, 0]);
        h[0x1C..0x20].copy_from_slice(&arch.to_le_bytes());
        h[0x20..0x24].copy_from_slice(&0x40u32.to_le_bytes());
        h[0x24..0x28].copy_from_slice(&14u32.to_le_bytes());
        h[0x28..0x30].copy_from_slice(&flags.to_le_bytes());
        h[0x40..0x4e].copy_from_slice(b"tu/quant_tu.cu");
        h.extend_from_slice(&p);
        h
    }

    fn fatbin(entries: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = entries.concat();
        let mut f = Vec::new();
        f.extend_from_slice(&FATBIN_MAGIC.to_le_bytes());
        f.extend_from_slice(&1u16.to_le_bytes());
        f.extend_from_slice(&16u16.to_le_bytes());
        f.extend_from_slice(&(body.len() as u64).to_le_bytes());
        f.extend_from_slice(&body);
        f
    }

    fn elf(arch: u32, flags: u64) -> Vec<u8> {
        let mut p = b"\x7fELF".to_vec();
        p.resize(100, 7);
        entry(KIND_ELF, arch, flags, &p, 0)
    }

    #[test]
    fn picks_plain_ptx_among_sass() {
        let f = fatbin(&[elf(90, 0x100011), entry(KIND_PTX, 80, 0x11, PTX80.as_bytes(), 0), elf(80, 0x11)]);
        assert_eq!(ptx_from_bytes(&f, (8, 0)).unwrap(), PTX80);
        assert_eq!(ptx_from_bytes(&f, (9, 0)).unwrap(), PTX80);
        // A CC below every PTX entry.
        let e = ptx_from_bytes(&f, (7, 5)).unwrap_err();
        assert_eq!(e.code, cuda::NO_BINARY_FOR_GPU);
        assert!(e.message.contains("compute_80"), "{}", e.message);
    }

    #[test]
    fn highest_arch_and_arch_specific_only_on_exact_match() {
        let f = fatbin(&[
            entry(KIND_PTX, 90, 0x100011, PTX90A.as_bytes(), 0),
            entry(KIND_PTX, 75, 0x11, b".version 9.0\n.target sm_75\n", 0),
            entry(KIND_PTX, 80, 0x11, PTX80.as_bytes(), 0),
        ]);
        assert_eq!(ptx_from_bytes(&f, (8, 6)).unwrap(), PTX80);
        assert_eq!(ptx_from_bytes(&f, (9, 0)).unwrap(), PTX90A);
        assert_eq!(ptx_from_bytes(&f, (10, 0)).unwrap(), PTX80);
        assert!(ptx_from_bytes(&f, (7, 5)).unwrap().contains("sm_75"));
    }

    #[test]
    fn compressed_entry_is_refused_with_advice() {
        let zstd = [0x28, 0xB5, 0x2F, 0xFD, 1, 2, 3, 4, 5];
        let f = fatbin(&[elf(80, 0x11), entry(KIND_PTX, 80, 0x8011, &zstd, zstd.len() as u32)]);
        let e = ptx_from_bytes(&f, (8, 0)).unwrap_err();
        assert_eq!(e.code, cuda::INVALID_IMAGE);
        assert!(e.message.contains("--no-compress"), "{}", e.message);
        // An uncompressed entry of a lower arch is used instead.
        let f = fatbin(&[
            entry(KIND_PTX, 80, 0x8011, &zstd, zstd.len() as u32),
            entry(KIND_PTX, 75, 0x11, b".version 9.0\n.target sm_75\n", 0),
        ]);
        assert!(ptx_from_bytes(&f, (8, 0)).unwrap().contains("sm_75"));
    }

    #[test]
    fn sass_only_and_elf_and_garbage() {
        let f = fatbin(&[elf(90, 0x100011), elf(80, 0x11)]);
        let e = ptx_from_bytes(&f, (8, 0)).unwrap_err();
        assert_eq!(e.code, cuda::NO_BINARY_FOR_GPU);
        assert!(e.message.contains("sm_80") && e.message.contains("sm_90a"), "{}", e.message);
        assert_eq!(ptx_from_bytes(b"\x7fELF\x02\x01\x01", (8, 0)).unwrap_err().code, cuda::NO_BINARY_FOR_GPU);
        assert_eq!(ptx_from_bytes(b"hello", (8, 0)).unwrap_err().code, cuda::INVALID_IMAGE);
        assert_eq!(ptx_from_bytes(&fatbin(&[]), (8, 0)).unwrap_err().code, cuda::NO_BINARY_FOR_GPU);
    }

    #[test]
    fn truncated_and_corrupt_fatbins() {
        let f = fatbin(&[entry(KIND_PTX, 80, 0x11, PTX80.as_bytes(), 0)]);
        for cut in [0, 8, 15, 16, 40, f.len() - 1] {
            let e = ptx_from_bytes(&f[..cut], (8, 0));
            assert!(e.is_err(), "cut at {cut}");
        }
        let mut g = f.clone();
        g[16 + 8..16 + 16].copy_from_slice(&u64::MAX.to_le_bytes()); // payload size
        assert_eq!(ptx_from_bytes(&g, (8, 0)).unwrap_err().code, cuda::INVALID_IMAGE);
        let mut g = f.clone();
        g[16 + 4..16 + 8].copy_from_slice(&4u32.to_le_bytes()); // entry header size
        assert_eq!(ptx_from_bytes(&g, (8, 0)).unwrap_err().code, cuda::INVALID_IMAGE);
        let mut g = f;
        g[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // total size
        assert_eq!(ptx_from_bytes(&g, (8, 0)).unwrap_err().code, cuda::INVALID_IMAGE);
    }

    #[test]
    fn text_images() {
        assert_eq!(ptx_from_bytes(b"  \n\t.version 9.0\n\0junk", (8, 0)).unwrap(), "  \n\t.version 9.0\n");
        assert_eq!(ptx_from_bytes(b"// c\n.version 9.0", (8, 0)).unwrap(), "// c\n.version 9.0");
        assert_eq!(ptx_from_bytes(b".version \xff", (8, 0)).unwrap_err().code, cuda::INVALID_PTX);
    }

    #[test]
    fn from_pointers_unaligned_wrapped_and_short() {
        let f = fatbin(&[elf(80, 0x11), entry(KIND_PTX, 80, 0x11, PTX80.as_bytes(), 0)]);
        // Misaligned copy of the fatbin, with trailing bytes the size must exclude.
        let mut buf = vec![0u8; 3];
        buf.extend_from_slice(&f);
        buf.extend_from_slice(&[0xAA; 64]);
        let p = buf[3..].as_ptr();
        // SAFETY: p points at a complete fatbin.
        assert_eq!(unsafe { ptx_from_ptr(p, (8, 0)) }.unwrap(), PTX80);
        // The __nv_fatbin wrapper, itself misaligned.
        let mut w = vec![0u8; 1];
        w.extend_from_slice(&WRAPPER_MAGIC.to_le_bytes());
        w.extend_from_slice(&1u32.to_le_bytes());
        w.extend_from_slice(&(p as usize as u64).to_le_bytes());
        w.extend_from_slice(&0u64.to_le_bytes());
        // SAFETY: a wrapper that points at the fatbin above.
        assert_eq!(unsafe { ptx_from_ptr(w[1..].as_ptr(), (8, 0)) }.unwrap(), PTX80);
        // Short C strings are never read past their NUL.
        let s = Box::new(*b"//\0");
        // SAFETY: NUL-terminated.
        assert_eq!(unsafe { ptx_from_ptr(s.as_ptr(), (8, 0)) }.unwrap(), "//");
        let s = Box::new(*b"\0");
        // SAFETY: NUL-terminated.
        assert_eq!(unsafe { ptx_from_ptr(s.as_ptr(), (8, 0)) }.unwrap_err().code, cuda::INVALID_IMAGE);
        let text = std::ffi::CString::new(PTX80).unwrap();
        // SAFETY: NUL-terminated.
        assert_eq!(unsafe { ptx_from_ptr(text.as_ptr().cast(), (8, 0)) }.unwrap(), PTX80);
        // SAFETY: null is checked.
        assert_eq!(unsafe { ptx_from_ptr(std::ptr::null(), (8, 0)) }.unwrap_err().code, cuda::INVALID_VALUE);
    }
}
