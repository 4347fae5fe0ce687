//! Opening checkpoints (one safetensors file, a directory, or a sharded directory with
//! `*.safetensors.index.json`), and writing new ones atomically: everything goes to
//! `OUT.partial-<pid>` and is renamed into place only when complete.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;

use super::config::{self, QuantConfig};
use super::stfile::{OutSpec, SafeFile, TensorInfo, Writer};
use super::Progress;
use crate::error::{Error, Result};

/// An open input checkpoint.
pub(crate) struct Checkpoint {
    /// What the user passed.
    pub root: PathBuf,
    /// The safetensors files, in order.
    pub files: Vec<SafeFile>,
    /// Whether the input had an index file (its name), so the output gets one too.
    pub index_name: Option<String>,
    /// Tensor name → (file, tensor index in the file's header).
    pub tensors: HashMap<String, (usize, usize)>,
    /// `config.json`, if any.
    pub config: Option<Value>,
    /// Where `config` came from (for messages).
    pub config_path: String,
    /// The parsed `quantization_config` (from `config.json`, or GPTQ's `quantize_config.json`),
    /// with its raw JSON.
    pub quant: Option<(QuantConfig, Value)>,
    /// Other small files of the directory (tokenizer, generation config...), copied unchanged.
    pub extra_files: Vec<PathBuf>,
    /// The text of `config.json`, so outputs keep its bytes except `quantization_config`.
    pub config_text: Option<String>,
    /// Unknown `quantization_config` keys accepted because their value is null, empty or false.
    pub ignored_keys: Vec<config::IgnoredKey>,
    /// The input index's `metadata` object (without `total_size`), kept in outputs.
    pub index_metadata: serde_json::Map<String, Value>,
    /// The input index's `metadata.total_size`, if any.
    pub index_total_size: Option<Value>,
}

fn read_json(path: &Path) -> Result<Value> {
    read_json_text(path).map(|(v, _)| v)
}

fn read_json_text(path: &Path) -> Result<(Value, String)> {
    let display = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(Error::io(&display))?;
    let v = serde_json::from_str(&text).map_err(|e| Error::checkpoint(&display, format!("not valid JSON: {e}")))?;
    Ok((v, text))
}

impl Checkpoint {
    /// Opens `path`: a `.safetensors` file or a directory.
    pub fn open(path: &Path) -> Result<Self> {
        let display = path.display().to_string();
        let meta = std::fs::metadata(path).map_err(Error::io(&display))?;
        let mut ck = Checkpoint {
            root: path.to_path_buf(),
            files: Vec::new(),
            index_name: None,
            tensors: HashMap::new(),
            config: None,
            config_path: String::new(),
            quant: None,
            extra_files: Vec::new(),
            config_text: None,
            ignored_keys: Vec::new(),
            index_metadata: Default::default(),
            index_total_size: None,
        };
        if meta.is_file() {
            ck.add_file(SafeFile::open(path)?)?;
            return Ok(ck);
        }
        let mut names = Vec::new();
        for entry in std::fs::read_dir(path).map_err(Error::io(&display))? {
            let entry = entry.map_err(Error::io(&display))?;
            if entry.file_type().map_err(Error::io(&display))?.is_file() {
                names.push(entry.file_name().to_string_lossy().into_owned());
            }
        }
        names.sort();
        let indexes: Vec<&String> = names.iter().filter(|n| n.ends_with(".safetensors.index.json")).collect();
        if indexes.len() > 1 {
            return Err(Error::checkpoint(&display, format!("more than one index file: {indexes:?}")));
        }
        let mut shard_names: Vec<String> = Vec::new();
        let mut weight_map: Option<BTreeMap<String, String>> = None;
        if let Some(&index) = indexes.first() {
            let ipath = path.join(index);
            let idisplay = ipath.display().to_string();
            let v = read_json(&ipath)?;
            let wm = v
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::checkpoint(&idisplay, "no `weight_map` object"))?;
            let mut map = BTreeMap::new();
            for (t, f) in wm {
                let f = f.as_str().ok_or_else(|| {
                    Error::checkpoint(&idisplay, format!("weight_map entry for `{t}` is not a string"))
                })?;
                if f.is_empty() || f.contains('/') || f.contains('\\') || f == "." || f == ".." {
                    return Err(Error::checkpoint(
                        &idisplay,
                        format!("weight_map entry for `{t}`: bad file name `{f}`"),
                    ));
                }
                if !shard_names.iter().any(|s| s == f) {
                    shard_names.push(f.to_string());
                }
                map.insert(t.clone(), f.to_string());
            }
            shard_names.sort();
            if let Some(md) = v.get("metadata").and_then(Value::as_object) {
                let mut md = md.clone();
                ck.index_total_size = md.remove("total_size");
                ck.index_metadata = md;
            }
            ck.index_name = Some(index.clone());
            weight_map = Some(map);
        } else {
            shard_names = names.iter().filter(|n| n.ends_with(".safetensors")).cloned().collect();
        }
        if shard_names.is_empty() {
            return Err(Error::checkpoint(&display, "no .safetensors files"));
        }
        for s in &shard_names {
            ck.add_file(SafeFile::open(&path.join(s))?)?;
        }
        if let Some(map) = weight_map {
            for (t, f) in &map {
                match ck.tensors.get(t) {
                    Some(&(fi, _)) if ck.files[fi].path().file_name().is_some_and(|n| n.to_string_lossy() == *f) => {}
                    Some(&(fi, _)) => {
                        return Err(Error::checkpoint(
                            &display,
                            format!("tensor `{t}`: the index says {f}, but it is in {}", ck.files[fi].display()),
                        ))
                    }
                    None => {
                        return Err(Error::checkpoint(
                            &display,
                            format!("tensor `{t}` is listed in the index for {f} but missing from it"),
                        ))
                    }
                }
            }
            if let Some(t) = ck.tensors.keys().find(|t| !map.contains_key(*t)) {
                return Err(Error::checkpoint(&display, format!("tensor `{t}` is not listed in the index")));
            }
        }
        let cfg_path = path.join("config.json");
        if cfg_path.is_file() {
            ck.config_path = cfg_path.display().to_string();
            let (cfg, text) = read_json_text(&cfg_path)?;
            if !cfg.is_object() {
                return Err(Error::checkpoint(&ck.config_path, "config.json is not a JSON object"));
            }
            // `"quantization_config": null` (some exporters write it) means not quantized.
            if let Some(qc) = cfg.get("quantization_config").filter(|v| !v.is_null()) {
                let (parsed, ignored) = config::parse_noting(&ck.config_path, qc)?;
                ck.quant = Some((parsed, qc.clone()));
                ck.ignored_keys = ignored;
            }
            ck.config = Some(cfg);
            ck.config_text = Some(text);
        }
        let qcfg_path = path.join("quantize_config.json");
        if ck.quant.is_none() && qcfg_path.is_file() {
            let p = qcfg_path.display().to_string();
            let qc = read_json(&qcfg_path)?;
            let (parsed, ignored) = config::parse_noting(&p, &qc)?;
            ck.quant = Some((parsed, qc));
            ck.ignored_keys = ignored;
            ck.config_path = p;
        }
        let skip = |n: &str| {
            n.ends_with(".safetensors")
                || n.ends_with(".safetensors.index.json")
                || n == "config.json"
                || n.contains(".partial-")
        };
        ck.extra_files = names.iter().filter(|n| !skip(n)).map(|n| path.join(n)).collect();
        Ok(ck)
    }

    fn add_file(&mut self, f: SafeFile) -> Result<()> {
        let fi = self.files.len();
        for (ti, t) in f.header.tensors.iter().enumerate() {
            if let Some(&(other, _)) = self.tensors.get(&t.name) {
                return Err(Error::checkpoint(
                    f.display(),
                    format!("tensor `{}` is also in {}", t.name, self.files[other].display()),
                ));
            }
            self.tensors.insert(t.name.clone(), (fi, ti));
        }
        self.files.push(f);
        Ok(())
    }

    /// The file and header entry of tensor `name`.
    pub fn get(&self, name: &str) -> Option<(&SafeFile, &TensorInfo)> {
        self.tensors.get(name).map(|&(f, t)| (&self.files[f], &self.files[f].header.tensors[t]))
    }

    /// Like [`get`](Self::get), but a missing tensor is an error saying who needs it.
    pub fn require(&self, name: &str, needed_by: &str) -> Result<(&SafeFile, &TensorInfo)> {
        self.get(name).ok_or_else(|| {
            Error::checkpoint(
                self.root.display(),
                format!("tensor `{name}` is missing (needed by quantized layer `{needed_by}`)"),
            )
        })
    }

    /// The file index holding tensor `name`.
    pub fn file_of(&self, name: &str) -> Option<usize> {
        self.tensors.get(name).map(|&(f, _)| f)
    }

    /// Every tensor name, in file then header order.
    pub fn names(&self) -> Vec<&str> {
        self.files.iter().flat_map(|f| f.header.tensors.iter().map(|t| t.name.as_str())).collect()
    }

    /// Whether any file's `__metadata__` says `format: marlin`.
    pub fn marlin_metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.files.iter().map(|f| &f.header.metadata).find(|m| m.get("format").is_some_and(|v| v == "marlin"))
    }

    /// Total bytes of tensor data.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().flat_map(|f| f.header.tensors.iter()).map(|t| t.nbytes() as u64).sum()
    }
}

/// Partial output directories of this process that are being written (so an interrupt can
/// remove them).
static PARTIALS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// Removes every `OUT.partial-<pid>` directory this process is writing. Called by the `lowbit`
/// command's SIGINT/SIGTERM handler before it exits; safe to call from any thread.
pub fn remove_partials() {
    let dirs = match PARTIALS.lock() {
        Ok(mut g) => std::mem::take(&mut *g),
        Err(p) => std::mem::take(&mut *p.into_inner()),
    };
    for d in dirs {
        let _ = std::fs::remove_dir_all(&d);
    }
}

fn register(p: &Path, add: bool) {
    let mut g = match PARTIALS.lock() {
        Ok(g) => g,
        Err(p) => p.into_inner(),
    };
    if add {
        g.push(p.to_path_buf());
    } else {
        g.retain(|x| x != p);
    }
}

/// Whether process `pid` exists (on Unix; elsewhere every process is assumed alive).
fn process_alive(pid: u32) -> bool {
    #[cfg(unix)]
    {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return false };
        // SAFETY: kill with signal 0 only checks that the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }
    #[cfg(not(unix))]
    {
        let _ = pid;
        true
    }
}

/// An output directory being written: `OUT.partial-<pid>`, renamed to `OUT` by
/// [`commit`](Self::commit) and removed if dropped before that (on any error or panic), or by
/// [`remove_partials`] on an interrupt.
pub(crate) struct OutDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
    /// Partial directories of dead processes that were found next to `OUT` and removed.
    pub removed_stale: Vec<String>,
}

impl OutDir {
    /// Refuses an existing `out`; removes stale `OUT.partial-<pid>` directories of processes
    /// that no longer exist; creates the temporary directory next to it.
    pub fn create(out: &Path) -> Result<Self> {
        let display = out.display().to_string();
        if out.exists() {
            return Err(Error::checkpoint(&display, "the output already exists; remove it or choose another path"));
        }
        let name = out
            .file_name()
            .ok_or_else(|| Error::checkpoint(&display, "the output path has no final component"))?
            .to_string_lossy()
            .into_owned();
        let parent = out.parent().filter(|p| !p.as_os_str().is_empty());
        if let Some(parent) = parent {
            std::fs::create_dir_all(parent).map_err(Error::io(parent.display()))?;
        }
        let mut removed_stale = Vec::new();
        let prefix = format!("{name}.partial-");
        if let Ok(entries) = std::fs::read_dir(parent.unwrap_or(Path::new("."))) {
            for e in entries.flatten() {
                let fname = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = fname.strip_prefix(&prefix).and_then(|p| p.parse::<u32>().ok()) else { continue };
                if pid != std::process::id() && !process_alive(pid) && e.path().is_dir() {
                    std::fs::remove_dir_all(e.path()).map_err(Error::io(e.path().display()))?;
                    removed_stale.push(e.path().display().to_string());
                }
            }
        }
        let tmp = out.with_file_name(format!("{name}.partial-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(Error::io(tmp.display()))?;
        }
        std::fs::create_dir(&tmp).map_err(Error::io(tmp.display()))?;
        register(&tmp, true);
        Ok(OutDir { target: out.to_path_buf(), tmp, committed: false, removed_stale })
    }

    /// The temporary directory everything is written into.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// Renames the finished directory into place.
    pub fn commit(mut self) -> Result<()> {
        if self.target.exists() {
            return Err(Error::checkpoint(self.target.display(), "the output appeared while it was being written"));
        }
        std::fs::rename(&self.tmp, &self.target).map_err(Error::io(self.target.display()))?;
        self.committed = true;
        register(&self.tmp, false);
        Ok(())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.tmp);
            register(&self.tmp, false);
        }
    }
}

/// Named output tensors with their little-endian bytes.
pub(crate) type Tensors = Vec<(String, Vec<u8>)>;

/// Computes the output tensors of one job.
pub(crate) type JobFn<'a> = Box<dyn Fn() -> Result<Tensors> + Send + Sync + 'a>;

/// One unit of output.
pub(crate) enum Item<'a> {
    /// Copy tensor `name` of the input unchanged.
    Copy(String),
    /// Compute new tensors.
    Job {
        /// What to show in progress and errors.
        label: String,
        /// The input tensors it reads (released from memory once it is done).
        inputs: Vec<String>,
        /// Input bytes it reads (for progress and batching).
        in_bytes: u64,
        /// The tensors it produces.
        outputs: Vec<OutSpec>,
        /// The computation.
        run: JobFn<'a>,
    },
}

/// One output safetensors file.
pub(crate) struct FilePlan<'a> {
    /// File name inside the output directory.
    pub name: String,
    /// Its `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Its contents.
    pub items: Vec<Item<'a>>,
    /// Tensor names to lay out first, in this order (see `Writer::create_ordered`).
    pub order: Vec<String>,
}

/// A whole output checkpoint.
pub(crate) struct Plan<'a> {
    pub files: Vec<FilePlan<'a>>,
    /// The text of `config.json` to write (None: copy the input's bytes, if any).
    pub config: Option<String>,
    /// The output index's `metadata` besides `total_size`.
    pub index_metadata: serde_json::Map<String, Value>,
    /// The output index's `total_size` (None: the size of the tensors written).
    pub index_total_size: Option<Value>,
    /// Names of extra input files not to copy.
    pub skip_extra: Vec<String>,
    /// Run jobs in parallel batches of at most this many input bytes (0: one job at a time).
    pub batch_bytes: u64,
}

/// Statistics of a written checkpoint.
#[derive(Default)]
pub(crate) struct Written {
    pub tensors: usize,
    pub bytes: u64,
    /// Stale partial directories of dead processes that were removed.
    pub removed_stale: Vec<String>,
}

/// Writes `plan` into `out` atomically.
pub(crate) fn write(ck: &Checkpoint, out: &Path, plan: Plan<'_>, progress: &mut dyn Progress) -> Result<Written> {
    let dir = OutDir::create(out)?;
    let mut stats = Written { removed_stale: dir.removed_stale.clone(), ..Written::default() };
    let total_items: usize = plan.files.iter().map(|f| f.items.len()).sum();
    let in_bytes = |it: &Item| match it {
        Item::Copy(n) => ck.get(n).map_or(0, |(_, t)| t.nbytes() as u64),
        Item::Job { in_bytes, .. } => *in_bytes,
    };
    let total_bytes: u64 = plan.files.iter().flat_map(|f| f.items.iter()).map(in_bytes).sum();
    progress.start(total_items, total_bytes);
    let mut weight_map = BTreeMap::new();
    for fp in &plan.files {
        let path = dir.path().join(&fp.name);
        let mut specs = Vec::new();
        for it in &fp.items {
            match it {
                Item::Copy(n) => {
                    let (_, t) = ck
                        .get(n)
                        .ok_or_else(|| Error::checkpoint(ck.root.display(), format!("tensor `{n}` is missing")))?;
                    specs.push(OutSpec { name: t.name.clone(), dtype: t.dtype, shape: t.shape.clone() });
                }
                Item::Job { outputs, .. } => specs.extend(outputs.iter().cloned()),
            }
        }
        for s in &specs {
            weight_map.insert(s.name.clone(), fp.name.clone());
            stats.bytes += s.nbytes() as u64;
        }
        stats.tensors += specs.len();
        let mut w = Writer::create_ordered(&path, specs, &fp.metadata, &fp.order)?;
        // Batches of consecutive items, computed in parallel, written in order.
        let mut i = 0;
        while i < fp.items.len() {
            let mut j = i;
            let mut budget = 0u64;
            while j < fp.items.len()
                && (j == i || (plan.batch_bytes > 0 && budget + in_bytes(&fp.items[j]) <= plan.batch_bytes))
            {
                budget += in_bytes(&fp.items[j]);
                j += 1;
            }
            let batch = &fp.items[i..j];
            let results: Vec<Result<Option<Tensors>>> = batch
                .par_iter()
                .map(|it| match it {
                    Item::Copy(_) => Ok(None),
                    Item::Job { run, .. } => run().map(Some),
                })
                .collect();
            for (it, r) in batch.iter().zip(results) {
                match (it, r?) {
                    (Item::Copy(n), _) => {
                        let (f, t) = ck
                            .get(n)
                            .ok_or_else(|| Error::checkpoint(ck.root.display(), format!("tensor `{n}` is missing")))?;
                        let (file, offset, _) = f.range(t);
                        w.copy_from(n, file, offset, f.bytes(t))?;
                        f.release(t);
                        progress.advance(n, t.nbytes() as u64);
                    }
                    (Item::Job { label, in_bytes, outputs, inputs, .. }, Some(tensors)) => {
                        for n in inputs {
                            if let Some((f, t)) = ck.get(n) {
                                f.release(t);
                            }
                        }
                        if tensors.len() != outputs.len() {
                            return Err(Error::checkpoint(
                                path.display(),
                                format!("`{label}`: produced the wrong tensors"),
                            ));
                        }
                        for (name, bytes) in &tensors {
                            w.write(name, bytes)?;
                        }
                        progress.advance(label, *in_bytes);
                    }
                    (Item::Job { .. }, None) => {}
                }
            }
            i = j;
        }
        w.finish()?;
    }
    if let Some(index) = &ck.index_name {
        let mut md = plan.index_metadata.clone();
        md.insert("total_size".into(), plan.index_total_size.clone().unwrap_or_else(|| stats.bytes.into()));
        let v = serde_json::json!({ "metadata": md, "weight_map": weight_map });
        write_json(&dir.path().join(index), &v)?;
    }
    match (&plan.config, &ck.config_text) {
        (Some(text), _) | (None, Some(text)) => {
            let p = dir.path().join("config.json");
            std::fs::write(&p, text).map_err(Error::io(p.display()))?
        }
        (None, None) => {}
    }
    for src in &ck.extra_files {
        let Some(name) = src.file_name() else { continue };
        if plan.skip_extra.iter().any(|s| name.to_string_lossy() == *s) {
            continue;
        }
        let dst = dir.path().join(name);
        std::fs::copy(src, &dst).map_err(Error::io(src.display()))?;
    }
    progress.finish();
    dir.commit()?;
    Ok(stats)
}

/// Writes pretty JSON with a trailing newline.
pub(crate) fn write_json(path: &Path, v: &Value) -> Result<()> {
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::checkpoint(path.display(), e))?;
    text.push('\n');
    std::fs::write(path, text).map_err(Error::io(path.display()))
}
