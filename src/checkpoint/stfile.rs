//! A defensive safetensors reader (through mmap) and a streaming writer.
//!
//! The format: an 8-byte little-endian header length `n`, `n` bytes of JSON
//! (`{"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...}`),
//! then the data section; offsets are relative to the start of the data section.
//!
//! The parser here is this crate's own (not the `safetensors` crate's) so that every problem is
//! reported as [`Error::Checkpoint`] naming the file and the tensor: a header length larger than
//! the file, offsets out of bounds or overlapping, a byte length that does not match the dtype and
//! shape, duplicate names, unknown dtypes or fields. Nothing in here panics on bad input.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Largest JSON header accepted (the `safetensors` crate uses the same bound).
pub const MAX_HEADER_LEN: u64 = 100 * 1024 * 1024;

/// Element types of safetensors tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[allow(missing_docs, non_camel_case_types)]
pub enum Dtype {
    BOOL,
    U8,
    I8,
    F8_E5M2,
    F8_E4M3,
    I16,
    U16,
    F16,
    BF16,
    I32,
    U32,
    F32,
    F64,
    I64,
    U64,
}

impl Dtype {
    const ALL: [Dtype; 15] = [
        Dtype::BOOL,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::F8_E5M2 | Dtype::F8_E4M3 => 1,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 4,
            Dtype::F64 | Dtype::I64 | Dtype::U64 => 8,
        }
    }

    /// The name used in safetensors headers (`"BF16"`, `"I32"`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// Parses a header dtype name.
    pub fn parse(s: &str) -> Option<Dtype> {
        Self::ALL.into_iter().find(|d| d.name() == s)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One tensor's entry in a safetensors header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape (empty for scalars).
    pub shape: Vec<usize>,
    /// Byte range in the data section, `[begin, end)`.
    pub begin: usize,
    /// End of the byte range (exclusive).
    pub end: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Number of bytes.
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// A parsed, validated header.
#[derive(Clone, Debug, Default)]
pub struct Header {
    /// The `__metadata__` map (empty when absent).
    pub metadata: BTreeMap<String, String>,
    /// Tensors in header order.
    pub tensors: Vec<TensorInfo>,
}

/// The header's top-level entries in file order, so duplicate names can be detected (a plain
/// map would silently keep the last one).
struct Entries(Vec<(String, serde_json::Value)>);

impl<'de> Deserialize<'de> for Entries {
    fn deserialize<D: Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Entries;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> std::result::Result<Entries, A::Error> {
                let mut v = Vec::new();
                while let Some(e) = m.next_entry::<String, serde_json::Value>()? {
                    v.push(e);
                }
                Ok(Entries(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTensor {
    dtype: String,
    shape: Vec<u64>,
    data_offsets: [u64; 2],
}

/// Parses and validates a header. `path` is used in messages; `header` is the JSON bytes; the data
/// section that follows the header is `data_len` bytes long.
pub fn parse_header(path: &str, header: &[u8], data_len: u64) -> Result<Header> {
    let err = |msg: String| Error::checkpoint(path, msg);
    let text = std::str::from_utf8(header).map_err(|e| err(format!("safetensors header is not UTF-8: {e}")))?;
    if !text.trim_start().starts_with('{') {
        return Err(err("safetensors header is not a JSON object (corrupt or not a safetensors file)".into()));
    }
    let entries: Entries =
        serde_json::from_str(text).map_err(|e| err(format!("safetensors header is not valid JSON: {e}")))?;
    let mut out = Header::default();
    let mut seen = std::collections::HashSet::new();
    for (name, value) in entries.0 {
        if !seen.insert(name.clone()) {
            return Err(err(format!("tensor `{name}` appears twice in the header")));
        }
        if name == "__metadata__" {
            let obj = value.as_object().ok_or_else(|| err("`__metadata__` is not a JSON object".into()))?;
            for (k, v) in obj {
                let s = v.as_str().ok_or_else(|| err(format!("`__metadata__.{k}` is not a string")))?;
                out.metadata.insert(k.clone(), s.to_string());
            }
            continue;
        }
        let raw: RawTensor =
            serde_json::from_value(value).map_err(|e| err(format!("tensor `{name}`: bad header entry: {e}")))?;
        let dtype =
            Dtype::parse(&raw.dtype).ok_or_else(|| err(format!("tensor `{name}`: unknown dtype `{}`", raw.dtype)))?;
        let [begin, end] = raw.data_offsets;
        if begin > end {
            return Err(err(format!("tensor `{name}`: data_offsets [{begin}, {end}] are reversed")));
        }
        if end > data_len {
            return Err(err(format!(
                "tensor `{name}`: data_offsets [{begin}, {end}] run past the end of the data section \
                 ({data_len} bytes): the file is truncated or the header lies"
            )));
        }
        let mut numel: u64 = 1;
        for &d in &raw.shape {
            numel =
                numel.checked_mul(d).ok_or_else(|| err(format!("tensor `{name}`: shape {:?} overflows", raw.shape)))?;
        }
        let nbytes = numel
            .checked_mul(dtype.size() as u64)
            .ok_or_else(|| err(format!("tensor `{name}`: shape {:?} overflows", raw.shape)))?;
        if nbytes != end - begin {
            return Err(err(format!(
                "tensor `{name}`: {dtype} {:?} needs {nbytes} bytes but data_offsets [{begin}, {end}] hold {}",
                raw.shape,
                end - begin
            )));
        }
        // end <= data_len <= file size, so these fit usize on every platform that mapped the file.
        let shape = raw
            .shape
            .iter()
            .map(|&d| usize::try_from(d).map_err(|_| err(format!("tensor `{name}`: dimension {d} too large"))))
            .collect::<Result<Vec<_>>>()?;
        let to_usize = |x: u64| usize::try_from(x).map_err(|_| err(format!("tensor `{name}`: offset {x} too large")));
        let (begin, end) = (to_usize(begin)?, to_usize(end)?);
        out.tensors.push(TensorInfo { name, dtype, shape, begin, end });
    }
    let mut order: Vec<&TensorInfo> = out.tensors.iter().filter(|t| t.begin < t.end).collect();
    order.sort_by_key(|t| (t.begin, t.end));
    for w in order.windows(2) {
        if w[1].begin < w[0].end {
            return Err(err(format!(
                "tensors `{}` [{}, {}) and `{}` [{}, {}) overlap in the data section",
                w[0].name, w[0].begin, w[0].end, w[1].name, w[1].begin, w[1].end
            )));
        }
    }
    Ok(out)
}

/// Splits a whole safetensors file image into (header JSON, data section), validating the header
/// length against the size.
pub fn split_file<'a>(path: &str, bytes: &'a [u8]) -> Result<(&'a [u8], &'a [u8])> {
    let len = bytes.len() as u64;
    if len < 8 {
        return Err(Error::checkpoint(
            path,
            format!("truncated: {len} bytes is too short for a safetensors file (8-byte header length missing)"),
        ));
    }
    let mut n8 = [0u8; 8];
    n8.copy_from_slice(&bytes[..8]);
    let n = u64::from_le_bytes(n8);
    if n > MAX_HEADER_LEN {
        return Err(Error::checkpoint(
            path,
            format!(
                "header length {n} is larger than the {MAX_HEADER_LEN}-byte limit (corrupt or not a safetensors file)"
            ),
        ));
    }
    if n > len - 8 {
        return Err(Error::checkpoint(
            path,
            format!("header length {n} runs past the end of the {len}-byte file (truncated or corrupt)"),
        ));
    }
    let n = n as usize;
    Ok((&bytes[8..8 + n], &bytes[8 + n..]))
}

/// Parses a complete in-memory safetensors image (used by the fuzz tests and by [`SafeFile`]).
pub fn parse_bytes(path: &str, bytes: &[u8]) -> Result<Header> {
    let (header, data) = split_file(path, bytes)?;
    parse_header(path, header, data.len() as u64)
}

enum Storage {
    Map(Mmap),
    Empty,
}

/// An open safetensors file: the validated header and a read-only memory map of the file, so
/// tensors are read one at a time and only the pages touched are loaded.
pub struct SafeFile {
    path: PathBuf,
    display: String,
    storage: Storage,
    data_start: usize,
    /// The validated header.
    pub header: Header,
    by_name: HashMap<String, usize>,
    file: File,
}

impl fmt::Debug for SafeFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SafeFile").field("path", &self.path).field("tensors", &self.header.tensors.len()).finish()
    }
}

impl SafeFile {
    /// Opens and validates `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let display = path.display().to_string();
        let file = File::open(path).map_err(Error::io(&display))?;
        let len = file.metadata().map_err(Error::io(&display))?.len();
        let storage = if len == 0 {
            Storage::Empty
        } else {
            // SAFETY: the map is read-only. Like every mmap reader, this assumes the file is not
            // truncated or rewritten by another process while it is open.
            Storage::Map(unsafe { Mmap::map(&file) }.map_err(Error::io(&display))?)
        };
        let bytes: &[u8] = match &storage {
            Storage::Map(m) => m,
            Storage::Empty => &[],
        };
        let header = parse_bytes(&display, bytes)?;
        let (h, _) = split_file(&display, bytes)?;
        let data_start = 8 + h.len();
        let by_name = header.tensors.iter().enumerate().map(|(i, t)| (t.name.clone(), i)).collect();
        Ok(SafeFile { path: path.to_path_buf(), display, storage, data_start, header, by_name, file })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The file's path as displayed in messages.
    pub fn display(&self) -> &str {
        &self.display
    }

    /// The tensor called `name`, if present.
    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.header.tensors[i])
    }

    /// The raw little-endian bytes of a tensor of this file.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        let all: &[u8] = match &self.storage {
            Storage::Map(m) => m,
            Storage::Empty => &[],
        };
        // Validated at open: begin <= end <= data length.
        all.get(self.data_start + t.begin..self.data_start + t.end).unwrap_or(&[])
    }
}

impl SafeFile {
    /// The open file and the absolute byte range of tensor `t` in it.
    pub fn range(&self, t: &TensorInfo) -> (&File, u64, usize) {
        (&self.file, (self.data_start + t.begin) as u64, t.nbytes())
    }

    /// Tells the kernel that this process no longer needs the pages holding tensor `t`, so they
    /// leave its resident set (they stay in the page cache; a later read faults them back in).
    /// Only pages that lie entirely inside the tensor are released. Best effort: errors are
    /// ignored, and it does nothing where `madvise` is unavailable.
    pub fn release(&self, t: &TensorInfo) {
        #[cfg(unix)]
        if let Storage::Map(m) = &self.storage {
            const PAGE: usize = 4096;
            let (start, end) = (self.data_start + t.begin, self.data_start + t.end);
            let first = start.div_ceil(PAGE) * PAGE;
            let last = end / PAGE * PAGE;
            if last > first && last <= m.len() {
                // SAFETY: the map is a read-only file mapping: MADV_DONTNEED only drops this
                // process's page-table entries; the contents stay those of the file, so every
                // later access through `bytes` reads the same data (from the page cache or disk).
                let _ = unsafe { m.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, first, last - first) };
            }
        }
        #[cfg(not(unix))]
        let _ = t;
    }
}

/// The tensor names of `header` in data order, or `None` when that is already the official
/// writer's order (dtype descending, then name), as for every file written by `safetensors`'
/// `serialize` / `save_file`.
pub fn custom_order(header: &Header) -> Option<Vec<String>> {
    let mut by_data: Vec<&TensorInfo> = header.tensors.iter().collect();
    by_data.sort_by_key(|t| (t.begin, t.end));
    let mut canonical: Vec<&TensorInfo> = header.tensors.iter().collect();
    canonical.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
    let same = by_data.iter().zip(&canonical).all(|(a, b)| a.name == b.name);
    (!same).then(|| by_data.into_iter().map(|t| t.name.clone()).collect())
}

/// Little-endian bytes → i32.
pub fn le_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4).map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Little-endian bytes → u16.
pub fn le_u16(b: &[u8]) -> Vec<u16> {
    b.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}

/// Little-endian bytes → i64.
pub fn le_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect()
}

/// i32 → little-endian bytes.
pub fn i32_le(v: &[i32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// u16 → little-endian bytes.
pub fn u16_le(v: &[u16]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The declaration of one tensor of a file being written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutSpec {
    /// Name in the output file.
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Shape.
    pub shape: Vec<usize>,
}

impl OutSpec {
    /// Bytes of data.
    pub fn nbytes(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.size()
    }
}

/// The header bytes (length prefix included, padded with spaces to a multiple of 8) for tensors
/// laid out in the given order, and each tensor's `[begin, end)`.
pub fn encode_header(specs: &[OutSpec], metadata: &BTreeMap<String, String>) -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut ranges = Vec::with_capacity(specs.len());
    let mut off = 0usize;
    let mut json = String::from("{");
    if !metadata.is_empty() {
        let m = serde_json::to_string(metadata).unwrap_or_else(|_| "{}".into());
        json.push_str(&format!("\"__metadata__\":{m}"));
    }
    for s in specs {
        let end = off + s.nbytes();
        ranges.push((off, end));
        if json.len() > 1 {
            json.push(',');
        }
        let name = serde_json::to_string(&s.name).unwrap_or_else(|_| "\"\"".into());
        let shape = serde_json::to_string(&s.shape).unwrap_or_else(|_| "[]".into());
        json.push_str(&format!(
            "{name}:{{\"dtype\":\"{}\",\"shape\":{shape},\"data_offsets\":[{off},{end}]}}",
            s.dtype
        ));
        off = end;
    }
    json.push('}');
    while (json.len() + 8) % 8 != 0 {
        json.push(' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(json.as_bytes());
    (out, ranges)
}

/// Writes one safetensors file whose tensor list is known up front; tensors may then be supplied
/// in any order. Tensors are laid out in the order of the official writer (`safetensors.serialize`,
/// used by `save_file` and `save_pretrained`): dtype in descending order of its enum (U64, I64,
/// F64, F32, U32, I32, BF16, F16, ...: largest element size first, which keeps every tensor
/// aligned), then by name. A file written by the Python tools therefore comes back byte for byte.
pub struct Writer {
    path: String,
    file: File,
    data_start: u64,
    slots: HashMap<String, (usize, usize, usize)>,
    written: Vec<bool>,
    /// Bytes written since writeback was last started.
    unflushed: usize,
}

/// Start writing dirty pages back every this many bytes, so the disk works while the next tensors
/// are computed and the final `fsync` has little left to wait for.
const WRITEBACK_BYTES: usize = 32 << 20;

impl Writer {
    /// Creates `path` and writes the header for `specs`.
    pub fn create(path: &Path, specs: Vec<OutSpec>, metadata: &BTreeMap<String, String>) -> Result<Self> {
        Self::create_ordered(path, specs, metadata, &[])
    }

    /// [`create`](Self::create), but the tensors named in `order` come first, in that order (the
    /// data order of a source file written by another writer, so `restore` gives it back byte for
    /// byte); the others follow in the official writer's order.
    pub fn create_ordered(
        path: &Path,
        mut specs: Vec<OutSpec>,
        metadata: &BTreeMap<String, String>,
        order: &[String],
    ) -> Result<Self> {
        let display = path.display().to_string();
        specs.sort_by(|a, b| b.dtype.cmp(&a.dtype).then_with(|| a.name.cmp(&b.name)));
        if let Some(w) = specs.windows(2).find(|w| w[0].name == w[1].name) {
            return Err(Error::checkpoint(&display, format!("tensor `{}` would be written twice", w[0].name)));
        }
        if !order.is_empty() {
            let rank: HashMap<&str, usize> = order.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
            specs.sort_by_key(|s| rank.get(s.name.as_str()).copied().unwrap_or(usize::MAX));
        }
        let (header, ranges) = encode_header(&specs, metadata);
        let mut file = File::create(path).map_err(Error::io(&display))?;
        file.write_all(&header).map_err(Error::io(&display))?;
        let slots =
            specs.iter().zip(&ranges).enumerate().map(|(i, (s, &(b, e)))| (s.name.clone(), (i, b, e))).collect();
        Ok(Writer {
            path: display,
            file,
            data_start: header.len() as u64,
            slots,
            written: vec![false; specs.len()],
            unflushed: 0,
        })
    }

    /// Writes the data of tensor `name` (whose size must match its declaration).
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let &(i, b, e) = self
            .slots
            .get(name)
            .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor `{name}` was not declared")))?;
        if bytes.len() != e - b {
            return Err(Error::checkpoint(
                &self.path,
                format!("tensor `{name}`: {} bytes supplied, {} declared", bytes.len(), e - b),
            ));
        }
        if self.written[i] {
            return Err(Error::checkpoint(&self.path, format!("tensor `{name}` written twice")));
        }
        self.file.seek(SeekFrom::Start(self.data_start + b as u64)).map_err(Error::io(&self.path))?;
        self.file.write_all(bytes).map_err(Error::io(&self.path))?;
        self.written[i] = true;
        self.wrote(bytes.len());
        Ok(())
    }

    /// Starts asynchronous writeback of the file's dirty pages once enough accumulated (Linux
    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: it does not wait; `finish` still fsyncs).
    fn wrote(&mut self, n: usize) {
        self.unflushed += n;
        if self.unflushed < WRITEBACK_BYTES {
            return;
        }
        self.unflushed = 0;
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a valid open descriptor; the call only schedules writeback.
            let _ = unsafe { libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
        }
    }

    /// Writes the data of tensor `name` by copying `len` bytes at `offset` of `src` inside the
    /// kernel (`copy_file_range`: no copy through this process's memory), falling back to a plain
    /// write of `fallback` where that is not possible.
    pub fn copy_from(&mut self, name: &str, src: &File, offset: u64, fallback: &[u8]) -> Result<()> {
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            let &(i, b, e) = self
                .slots
                .get(name)
                .ok_or_else(|| Error::checkpoint(&self.path, format!("tensor `{name}` was not declared")))?;
            if fallback.len() == e - b && !self.written[i] {
                let mut off_in = offset as libc::loff_t;
                let mut off_out = (self.data_start + b as u64) as libc::loff_t;
                let mut left = e - b;
                while left > 0 {
                    // SAFETY: both descriptors are open for the duration of the call and the
                    // offsets are plain integers owned by this frame.
                    let r = unsafe {
                        libc::copy_file_range(
                            src.as_raw_fd(),
                            &mut off_in,
                            self.file.as_raw_fd(),
                            &mut off_out,
                            left,
                            0,
                        )
                    };
                    if r <= 0 {
                        break;
                    }
                    left -= r as usize;
                }
                if left == 0 {
                    self.written[i] = true;
                    self.wrote(e - b);
                    return Ok(());
                }
            }
        }
        let _ = (src, offset);
        self.write(name, fallback)
    }

    /// Checks that every declared tensor was written and flushes the file to disk.
    pub fn finish(self) -> Result<()> {
        if let Some((name, _)) = self.slots.iter().find(|(_, &(i, _, _))| !self.written[i]) {
            return Err(Error::checkpoint(&self.path, format!("tensor `{name}` was declared but never written")));
        }
        self.file.sync_all().map_err(Error::io(&self.path))
    }
}
