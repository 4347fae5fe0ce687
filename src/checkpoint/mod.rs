//! Checkpoints: safetensors readers and writers for compressed-tensors, GPTQ and Marlin formats.
//!
//! The library side of the `lowbit` command (see `docs/checkpoints.md`):
//!
//! * [`quantize_checkpoint`]: a BF16/F16/F32 Hugging Face checkpoint → compressed-tensors
//!   `pack-quantized` symmetric INT4, with the exact grid of DESIGN §3 (the same as `fake_quant`),
//!   on the CPU (all cores) or the GPU, with identical bytes.
//! * [`repack_checkpoint`]: compressed-tensors or GPTQ → this crate's Marlin checkpoint.
//! * [`restore_checkpoint`]: Marlin → compressed-tensors, the bit-exact inverse.
//! * [`inspect`]: format, layers, shapes, group size, code histogram, scale statistics.
//!
//! Inputs are one `.safetensors` file or a directory (optionally sharded with
//! `*.safetensors.index.json`). Files are memory-mapped and read tensor by tensor, so memory stays
//! bounded by the largest tensor (times the small number of layers converted in parallel).
//! Headers are validated by this module's own parser: a truncated file or a header that lies about
//! sizes is an [`Error::Checkpoint`] naming the file and the tensor, never a panic.
//!
//! Outputs are always directories. They are written into `OUT.partial-<pid>` and renamed to `OUT`
//! only when complete; on any error the partial directory is removed, so a failed or interrupted
//! run never leaves something that looks like a finished checkpoint. `OUT` must not exist.
//! [`install_interrupt_cleanup`] makes SIGINT/SIGTERM remove the partial directory too, and a
//! later run removes stale partial directories of processes that no longer exist.

pub mod config;
mod fastquant;
mod fastrepack;
mod inspect;
mod jsontext;
mod linear;
mod ops;
mod source;
pub mod stfile;

use std::fmt;

use serde::Serialize;

pub use inspect::{inspect, Inspection, PlainTensor, QuantizedLayer, ScaleStats};
pub use ops::{
    quantize_checkpoint, quantize_checkpoint_with, repack_checkpoint, repack_checkpoint_with, restore_checkpoint,
    restore_checkpoint_with,
};
#[cfg(unix)]
pub use signals::install_interrupt_cleanup;
pub use source::remove_partials;

use crate::error::{Error, Result};
use crate::format::GroupSize;
use config::QuantConfig;
use linear::LinearMeta;
use source::Checkpoint;

#[cfg(unix)]
mod signals {
    /// Makes SIGINT and SIGTERM remove every `OUT.partial-<pid>` directory this process is
    /// writing, then exit with 130 (SIGINT) or 143 (SIGTERM), as a shell reports a process killed
    /// by that signal. Call it once, at the start of `main` and before any other thread exists
    /// (the signals are blocked in the calling thread, and so in every thread started after it; a
    /// dedicated thread waits for them). Returns false when the signal mask could not be set.
    pub fn install_interrupt_cleanup() -> bool {
        // SAFETY: plain libc calls on a zero-initialised sigset_t owned by this function.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return false;
            }
            let spawned = std::thread::Builder::new().name("lowbit-signals".into()).spawn(move || loop {
                let mut sig: libc::c_int = 0;
                if libc::sigwait(&set, &mut sig) == 0 {
                    super::source::remove_partials();
                    let code = if sig == libc::SIGINT { 130 } else { 143 };
                    let name = if sig == libc::SIGINT { "SIGINT" } else { "SIGTERM" };
                    eprintln!("lowbit: interrupted ({name}); the partial output was removed");
                    std::process::exit(code);
                }
            });
            if spawned.is_err() {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                return false;
            }
        }
        true
    }
}

/// The weight format of a checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Format {
    /// No quantized layers (BF16/F16/F32).
    Plain,
    /// compressed-tensors `pack-quantized`, symmetric INT4.
    CompressedTensors,
    /// GPTQ, symmetric 4-bit (v1 or v2 zero points).
    Gptq,
    /// This crate's Marlin checkpoints.
    Marlin,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Plain => "plain",
            Format::CompressedTensors => "compressed-tensors",
            Format::Gptq => "gptq",
            Format::Marlin => "marlin",
        })
    }
}

/// Where `quantize` runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DeviceChoice {
    /// The CPU, all cores.
    Cpu,
    /// The GPU; an error if none is usable.
    Gpu,
    /// The GPU when one is usable (kernels built, driver and device present), else the CPU.
    #[default]
    Auto,
}

/// Options of [`quantize_checkpoint`].
#[derive(Clone, Debug)]
pub struct QuantizeOptions {
    /// Group size along K (default 32, the Kimi-K2 / slime export grid); `Channelwise` for one
    /// scale per row.
    pub group_size: GroupSize,
    /// Extra compressed-tensors `ignore` patterns (module names, or `re:` regular expressions
    /// matched at the start of the name).
    pub ignore: Vec<String>,
    /// Also ignore [`config::DEFAULT_IGNORE`] (LM head, embeddings, MoE routers). Default true.
    pub default_ignore: bool,
    /// Where to compute.
    pub device: DeviceChoice,
}

impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            group_size: GroupSize::Group(32),
            ignore: Vec::new(),
            default_ignore: true,
            device: DeviceChoice::Auto,
        }
    }
}

/// A tensor that looked like a linear weight but was left unquantized, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// Tensor name.
    pub name: String,
    /// Why it was not quantized.
    pub reason: String,
}

/// What a conversion did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Format of the input.
    pub input_format: Option<Format>,
    /// Format written.
    pub output_format: Option<Format>,
    /// Quantized layers written (module names).
    pub quantized: Vec<String>,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// 2-D weights not quantized because of their shape (they are added to `ignore`).
    pub skipped: Vec<Skipped>,
    /// Weights not quantized because an ignore pattern matched them.
    pub ignored: Vec<String>,
    /// Safetensors files written.
    pub files: usize,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of tensor data read.
    pub bytes_read: u64,
    /// Bytes of tensor data written.
    pub bytes_written: u64,
    /// Where the work ran (`cpu`, or the GPU's name).
    pub device: String,
    /// Stale `OUT.partial-<pid>` directories of processes that no longer exist, found next to
    /// the output and removed.
    pub removed_stale: Vec<String>,
}

/// Progress of a long conversion (the CLI draws a bar with it).
pub trait Progress {
    /// Called once with the number of work items (tensors or layers) and input bytes.
    fn start(&mut self, _items: usize, _bytes: u64) {}
    /// Called after each item.
    fn advance(&mut self, _name: &str, _bytes: u64) {}
    /// Called when everything was written (before the rename into place).
    fn finish(&mut self) {}
}

/// A [`Progress`] that ignores everything.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoProgress;

impl Progress for NoProgress {}

/// The format and quantized layers of an open checkpoint.
pub(crate) struct Detected {
    pub format: Format,
    pub group: Option<GroupSize>,
    pub layers: Vec<LinearMeta>,
}

fn prefixes(ck: &Checkpoint, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> =
        ck.names().into_iter().filter_map(|n| n.strip_suffix(suffix).map(str::to_string)).collect();
    v.sort();
    v
}

/// Detects the format from `config.json` and the file metadata (or, when both are silent, from
/// the tensor names) and validates every quantized layer's tensors.
pub(crate) fn detect(ck: &Checkpoint) -> Result<Detected> {
    let root = ck.root.display().to_string();
    let quant = ck.quant.as_ref().map(|(q, _)| q.clone());
    if let Some(md) = ck.marlin_metadata().cloned().or(match quant {
        Some(QuantConfig::Marlin { .. }) => Some(Default::default()),
        _ => None,
    }) {
        let group = match &quant {
            Some(QuantConfig::Marlin { group, .. }) => *group,
            _ => {
                let g = md.get("group_size").and_then(|g| g.parse::<i64>().ok()).ok_or_else(|| {
                    Error::checkpoint(
                        &root,
                        "Marlin checkpoint without a group size (config.json or __metadata__.group_size)",
                    )
                })?;
                GroupSize::from_checkpoint(g).map_err(|e| Error::checkpoint(&root, e))?
            }
        };
        let layers =
            prefixes(ck, ".qweight").iter().map(|p| linear::probe_marlin(ck, p, group)).collect::<Result<_>>()?;
        return Ok(Detected { format: Format::Marlin, group: Some(group), layers });
    }
    let (format, group, v2) = match quant {
        Some(QuantConfig::CompressedTensors { group, .. }) => (Format::CompressedTensors, Some(group), None),
        Some(QuantConfig::Gptq { group, v2, .. }) => (Format::Gptq, Some(group), Some(v2)),
        Some(QuantConfig::Marlin { .. }) => unreachable_marlin(&root)?,
        None if !prefixes(ck, ".weight_packed").is_empty() => (Format::CompressedTensors, None, None),
        None if !prefixes(ck, ".qzeros").is_empty() => (Format::Gptq, None, None),
        None => (Format::Plain, None, None),
    };
    let layers: Vec<LinearMeta> = match format {
        Format::CompressedTensors => {
            prefixes(ck, ".weight_packed").iter().map(|p| linear::probe_ct(ck, p, group)).collect::<Result<_>>()?
        }
        Format::Gptq => {
            prefixes(ck, ".qweight").iter().map(|p| linear::probe_gptq(ck, p, group, v2)).collect::<Result<_>>()?
        }
        _ => Vec::new(),
    };
    let group = group.or_else(|| layers.first().map(|l| l.shape.group_size));
    Ok(Detected { format, group, layers })
}

fn unreachable_marlin<T>(root: &str) -> Result<T> {
    Err(Error::checkpoint(root, "internal: Marlin configuration handled above"))
}
