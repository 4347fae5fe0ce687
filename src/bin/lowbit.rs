//! `lowbit`: quantize, repack, restore and inspect checkpoints; `lowbit bench` (see `bench/`).
//!
//! A thin layer over [`lowbit::checkpoint`]; see `docs/checkpoints.md`. Exit codes: 0 on success,
//! 1 on any error (the message names the file, the tensor and the problem), 2 on bad usage.

mod bench;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use lowbit::checkpoint::{self, DeviceChoice, Inspection, Progress, QuantizeOptions, Report};
use lowbit::GroupSize;

#[derive(Parser)]
#[command(name = "lowbit", version, about = "INT4 checkpoints: quantize, repack to Marlin, restore, inspect")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeviceArg {
    Cpu,
    Gpu,
    Auto,
}

#[derive(Subcommand)]
enum Cmd {
    /// BF16/F16/F32 Hugging Face checkpoint (file or directory) → compressed-tensors INT4.
    Quantize {
        /// Weights per scale along K: 32, 64, 128, or 0 for channelwise.
        #[arg(long, short = 'g', default_value_t = 32, value_parser = parse_group)]
        group_size: i64,
        /// Keep matching modules unquantized: a module name, or `re:REGEX` (repeatable).
        #[arg(long, value_name = "PATTERN")]
        ignore: Vec<String>,
        /// Do not add the default ignore patterns (lm_head, embeddings, MoE routers).
        #[arg(long)]
        no_default_ignore: bool,
        /// Where to compute (identical output bytes either way).
        #[arg(long, value_enum, default_value = "auto")]
        device: DeviceArg,
        /// Input checkpoint: a .safetensors file or a directory.
        input: PathBuf,
        /// Output directory (must not exist).
        output: PathBuf,
    },
    /// compressed-tensors or GPTQ → Marlin.
    Repack {
        /// Input checkpoint directory or file.
        input: PathBuf,
        /// Output directory (must not exist).
        output: PathBuf,
    },
    /// Marlin → the format it was repacked from (compressed-tensors or GPTQ), byte for byte.
    Restore {
        /// Input Marlin checkpoint.
        input: PathBuf,
        /// Output directory (must not exist).
        output: PathBuf,
    },
    /// Format, layers, shapes, group size, code histogram and scale statistics.
    Inspect {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Checkpoint directory or file.
        input: PathBuf,
    },
    /// Time (GPU) or count and predict (lowbit-sim) one kernel operation; exit 2 without a device.
    Bench(bench::BenchArgs),
}

fn parse_group(s: &str) -> Result<i64, String> {
    match s.parse::<i64>() {
        Ok(g @ (0 | 32 | 64 | 128)) => Ok(g),
        _ => Err(format!("`{s}` is not a supported group size (32, 64, 128, or 0 for channelwise)")),
    }
}

/// An indicatif bar on stderr (bytes, rate, ETA, tensors done), hidden when stderr is not a
/// terminal.
struct Bar {
    pb: ProgressBar,
    items: usize,
    done: usize,
}

impl Bar {
    fn new() -> Self {
        let target =
            if std::io::stderr().is_terminal() { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() };
        Bar { pb: ProgressBar::with_draw_target(None, target), items: 0, done: 0 }
    }
}

impl Progress for Bar {
    fn start(&mut self, items: usize, bytes: u64) {
        self.items = items;
        self.pb.set_length(bytes);
        self.pb.set_style(
            ProgressStyle::with_template(
                "[{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        self.pb.set_message(format!("0/{items} tensors"));
    }
    fn advance(&mut self, _name: &str, bytes: u64) {
        self.done += 1;
        self.pb.inc(bytes);
        self.pb.set_message(format!("{}/{} tensors", self.done, self.items));
    }
    fn finish(&mut self) {
        self.pb.finish_and_clear();
    }
}

fn summary(what: &str, r: &Report) {
    eprintln!(
        "{what}: {} quantized layers, {} tensors copied, {} files, {} bytes written (device: {})",
        r.quantized.len(),
        r.copied,
        r.files,
        r.bytes_written,
        r.device
    );
    for s in &r.skipped {
        eprintln!("warning: `{}` left unquantized: {}", s.name, s.reason);
    }
    for d in &r.removed_stale {
        eprintln!("note: removed `{d}`, the partial output of a run that no longer exists");
    }
}

fn format_inspection(i: &Inspection) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(o, "path:     {}", i.path);
    let _ = writeln!(o, "format:   {}", i.format);
    if let Some(g) = i.group_size {
        let _ = writeln!(o, "group:    {}", if g < 0 { "channelwise".to_string() } else { g.to_string() });
    }
    let _ = writeln!(o, "files:    {} ({} bytes of tensors)", i.files.len(), i.total_bytes);
    let _ = writeln!(o, "quantized layers: {}", i.quantized.len());
    for l in &i.quantized {
        let s = &l.scales;
        let _ = writeln!(
            o,
            "  {}  [{}, {}] g={} {}{} levels={}/15{} scale min={} max={} mean={}",
            l.name,
            l.n,
            l.k,
            if l.group_size < 0 { "channel".to_string() } else { l.group_size.to_string() },
            l.scale_dtype,
            if l.act_order { " act-order" } else { "" },
            l.levels_used,
            if l.code_minus8 > 0 { format!(" +code -8 ({}x)", l.code_minus8) } else { String::new() },
            fmt_opt(s.min),
            fmt_opt(s.max),
            fmt_opt(s.mean),
        );
    }
    if i.code_minus8 > 0 {
        let _ = writeln!(
            o,
            "note: {} weights use the code -8, outside lowbit's 15-level grid (compressed-tensors' own quantizer \
             writes it; lowbit's never does); repack and restore keep it exactly",
            i.code_minus8
        );
    }
    for k in &i.ignored_config_keys {
        let _ = writeln!(o, "ignored config key: {} = {}", k.key, k.value);
    }
    let _ = writeln!(o, "plain tensors: {}", i.plain.len());
    for t in &i.plain {
        let _ = writeln!(o, "  {}  {} {:?}", t.name, t.dtype, t.shape);
    }
    if !i.quantized.is_empty() {
        let total: u64 = i.levels.iter().sum();
        let _ = writeln!(o, "code histogram (q: share):");
        for (idx, &c) in i.levels.iter().enumerate() {
            if c > 0 || idx > 0 {
                let _ = writeln!(o, "  {:>3}: {:>7.3}%  ({c})", idx as i64 - 8, 100.0 * c as f64 / total.max(1) as f64);
            }
        }
        let s = &i.scales;
        let _ = writeln!(
            o,
            "scales: {} total, min={} max={} mean={}, {} at the 1e-5 floor, {} invalid",
            s.count,
            fmt_opt(s.min),
            fmt_opt(s.max),
            fmt_opt(s.mean),
            s.at_floor,
            s.invalid
        );
    }
    o
}

fn fmt_opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_string(), |x| format!("{x:.4e}"))
}

fn run(cli: Cli) -> lowbit::Result<()> {
    match cli.cmd {
        Cmd::Bench(args) => bench::run(args)?,
        Cmd::Quantize { group_size, ignore, no_default_ignore, device, input, output } => {
            let opts = QuantizeOptions {
                group_size: if group_size == 0 {
                    GroupSize::Channelwise
                } else {
                    GroupSize::Group(group_size as usize)
                },
                ignore,
                default_ignore: !no_default_ignore,
                device: match device {
                    DeviceArg::Cpu => DeviceChoice::Cpu,
                    DeviceArg::Gpu => DeviceChoice::Gpu,
                    DeviceArg::Auto => DeviceChoice::Auto,
                },
            };
            let r = checkpoint::quantize_checkpoint_with(&input, &output, &opts, &mut Bar::new())?;
            summary("quantize", &r);
        }
        Cmd::Repack { input, output } => {
            let r = checkpoint::repack_checkpoint_with(&input, &output, &mut Bar::new())?;
            summary("repack", &r);
        }
        Cmd::Restore { input, output } => {
            let r = checkpoint::restore_checkpoint_with(&input, &output, &mut Bar::new())?;
            summary("restore", &r);
        }
        Cmd::Inspect { json, input } => {
            let i = checkpoint::inspect(&input)?;
            let text = if json {
                let mut t = serde_json::to_string_pretty(&i).map_err(|e| lowbit::Error::InvalidArgument {
                    op: "inspect",
                    msg: format!("cannot encode JSON: {e}"),
                })?;
                t.push('\n');
                t
            } else {
                format_inspection(&i)
            };
            // A closed pipe (`lowbit inspect ... | head`) is not an error.
            use std::io::Write;
            match std::io::stdout().lock().write_all(text.as_bytes()) {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
                    return Err(lowbit::Error::Io { path: "<stdout>".into(), source: e })
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    #[cfg(unix)]
    checkpoint::install_interrupt_cleanup();
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lowbit: error: {e}");
            ExitCode::FAILURE
        }
    }
}
