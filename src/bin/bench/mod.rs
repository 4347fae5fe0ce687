//! `lowbit bench gemm|moe|sync|fake-quant`: one kernel operation on the shapes of issue 9.
//!
//! * On a GPU: times `--iters` calls with CUDA events (created with timing enabled), rotating
//!   weight copies whose total exceeds L2 (50 MB on H200) so weights come from HBM; prints µs,
//!   GB/s, TFLOP/s and the ratio to the roofline `bytes_moved / measured copy bandwidth`
//!   (a device-to-device memcpy, bytes read + written, the DESIGN §6 convention).
//! * On lowbit-sim (the device name contains `lowbit-sim`): runs one iteration with the
//!   simulator's profile on (`LOWBIT_SIM_PROFILE`, set here before the first `Device` is opened,
//!   because the simulator reads it at `cuInit`), reads the per-launch JSON lines back and
//!   prints the counters and a **predicted** H200 time from the model in `model.rs`.
//! * Without a usable device (or without kernels): a message on stderr and exit status 2.
//!
//! `--json` prints one JSON object per case (one line each).

pub mod model;

use std::collections::BTreeSet;
use std::io::{BufRead, Seek, SeekFrom};
use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::gemm::{marlin_gemm_into, plan_gemm, Half, MarlinExperts, MarlinWorkspace};
use lowbit::marlin::layout::MarlinWeights;
use lowbit::marlin::sync::{quantize_to_marlin, quantize_to_marlin_into, quantize_to_marlin_into_unchecked};
use lowbit::moe::{self, MoeOptions, MoeWorkspace};
use lowbit::quant::{self, FakeQuantOptions};
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Device, Error, Result};
use serde_json::{json, Map, Value};

use model::{Counters, Machine};

/// Weight bytes the rotated copies must span: over 5x the 50 MB L2 of an H200.
const ROTATE_BYTES: usize = 256 << 20;
/// Different routings cycled through by the MoE bench on a GPU.
const ROUTINGS: usize = 8;
/// The issue's dense target shapes (N, K).
const DENSE_SHAPES: [(usize, usize); 3] = [(28672, 8192), (8192, 28672), (7168, 18432)];

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub op: Op,
}

#[derive(Subcommand, Debug)]
pub enum Op {
    /// Dense Marlin W4A16 GEMM `Y[M,N] = X[M,K] · Wᵀ` (default: the three issue-9 shapes).
    Gemm(GemmArgs),
    /// Fused Marlin MoE layer (default: Kimi-K2, E 384, top-8, H 7168, I 2048, g 32).
    Moe(MoeArgs),
    /// Weight sync: `quantize_to_marlin` of BF16/F16 master weights into existing buffers.
    Sync(QuantArgs),
    /// Fake-quant forward pass (`fake_quant_fwd`).
    FakeQuant(QuantArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    Bf16,
    F16,
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Activation/weight dtype (scales use the same type).
    #[arg(long, value_enum, default_value = "bf16")]
    pub dtype: DtypeArg,
    /// Timed calls per measurement on a GPU (the simulator always runs one).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub iters: u64,
    /// One JSON object per case instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct GemmArgs {
    /// Rows of X, comma-separated for several.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub m: Vec<usize>,
    /// Output features (with --k); default: the issue's three shapes.
    #[arg(long, requires = "k")]
    pub n: Option<usize>,
    /// Input features (with --n).
    #[arg(long, requires = "n")]
    pub k: Option<usize>,
    /// 32, 64, 128, or 0 for channelwise.
    #[arg(long, default_value_t = 128, value_parser = parse_group)]
    pub group_size: usize,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct MoeArgs {
    /// Tokens, comma-separated for several.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub m: Vec<usize>,
    #[arg(long, default_value_t = 384)]
    pub experts: usize,
    #[arg(long, default_value_t = 8)]
    pub top_k: usize,
    #[arg(long, default_value_t = 7168)]
    pub hidden: usize,
    #[arg(long, default_value_t = 2048)]
    pub intermediate: usize,
    /// 32, 64, 128, or 0 for channelwise.
    #[arg(long, default_value_t = 32, value_parser = parse_group)]
    pub group_size: usize,
    /// Skip the expert-id check (and its host synchronisation), as a decode engine would.
    #[arg(long)]
    pub no_validate_ids: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Args, Debug)]
pub struct QuantArgs {
    /// Output features (with --k); default: the issue's three shapes.
    #[arg(long, requires = "k")]
    pub n: Option<usize>,
    /// Input features (with --n).
    #[arg(long, requires = "n")]
    pub k: Option<usize>,
    /// 32, 64, 128, or 0 for channelwise.
    #[arg(long, default_value_t = 128, value_parser = parse_group)]
    pub group_size: usize,
    /// Skip the non-finite check (its status read-back synchronises with the host).
    #[arg(long)]
    pub unchecked: bool,
    #[command(flatten)]
    pub common: Common,
}

pub fn parse_group(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(g @ (0 | 32 | 64 | 128)) => Ok(g),
        _ => Err(format!("`{s}` is not a supported group size (32, 64, 128, or 0 for channelwise)")),
    }
}

fn group(g: usize, k: usize) -> GroupSize {
    if g == 0 || g == k {
        GroupSize::Channelwise
    } else {
        GroupSize::Group(g)
    }
}

fn invalid(op: &'static str, msg: impl std::fmt::Display) -> Error {
    Error::InvalidArgument { op, msg: msg.to_string() }
}

fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> Error {
    move |source| Error::Cuda { op, source }
}

/// The device, whether it is the simulator, and how results are reported.
struct Bench {
    dev: Device,
    sim: bool,
    /// The simulator's profile file (always set in this process; only the simulator writes it).
    profile: PathBuf,
    /// Whether this process chose (and must delete) the profile file.
    own_profile: bool,
    /// Device-to-device copy bandwidth, bytes (read + written) per second: measured on a GPU,
    /// the model's constant on the simulator.
    copy_bw: f64,
    iters: u64,
    json: bool,
}

/// What one case measured (GPU) or counted (simulator).
enum Outcome {
    Measured { seconds: f64, launches: f64 },
    Simulated { launches: Vec<Value>, issued: u64 },
}

impl Bench {
    /// One measurement of `f(i)` (i = call number): event-timed mean over `iters` calls after
    /// a warm-up, best of three, on a GPU; one profiled call on the simulator.
    fn run(&self, mut f: impl FnMut(usize) -> Result<()>) -> Result<Outcome> {
        let dev = &self.dev;
        if self.sim {
            let io = |e| Error::Io { path: self.profile.display().to_string(), source: e };
            // The profile is appended to: the lines after its current end belong to this call.
            let offset = std::fs::metadata(&self.profile).map(|m| m.len()).unwrap_or(0);
            let before = dev.launch_count();
            f(0)?;
            dev.synchronize()?;
            let issued = dev.launch_count() - before;
            let mut launches = Vec::new();
            match std::fs::File::open(&self.profile) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
                Ok(mut file) => {
                    file.seek(SeekFrom::Start(offset)).map_err(io)?;
                    for line in std::io::BufReader::new(file).lines() {
                        let line = line.map_err(io)?;
                        if line.trim().is_empty() {
                            continue;
                        }
                        let v: Value = serde_json::from_str(&line).map_err(|e| {
                            invalid(
                                "bench",
                                format!("{}: not a JSON profile line ({e}): {line}", self.profile.display()),
                            )
                        })?;
                        launches.push(v);
                    }
                }
            }
            if launches.is_empty() {
                return Err(invalid(
                    "bench",
                    format!(
                        "the simulator wrote no profile lines to {} for the measured call ({issued} launches issued)",
                        self.profile.display()
                    ),
                ));
            }
            return Ok(Outcome::Simulated { launches, issued });
        }
        let ctx = dev.context();
        let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("cuEventCreate"));
        let (start, end) = (ev()?, ev()?);
        f(0)?; // warm-up: module load, workspace growth
        f(1)?;
        dev.synchronize()?;
        let mut best = f64::INFINITY;
        let mut launches = 0.0;
        let mut call = 2usize;
        for _ in 0..3 {
            let before = dev.launch_count();
            start.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
            for _ in 0..self.iters {
                f(call)?;
                call += 1;
            }
            end.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
            end.synchronize().map_err(cuda("cuEventSynchronize"))?;
            let ms = start.elapsed_ms(&end).map_err(cuda("cuEventElapsedTime"))? as f64;
            best = best.min(ms / 1e3 / self.iters as f64);
            launches = (dev.launch_count() - before) as f64 / self.iters as f64;
        }
        Ok(Outcome::Measured { seconds: best, launches })
    }

    /// Copies per rotation so that the copies span more than L2 (1 on the simulator).
    fn copies(&self, bytes: usize, max: usize) -> usize {
        if self.sim {
            1
        } else {
            ROTATE_BYTES.div_ceil(bytes.max(1)).clamp(2, max.max(2))
        }
    }

    /// Prints one case: `rec` holds op, shape and the byte/FLOP counts; `outcome` adds the rest.
    fn report(&self, mut rec: Map<String, Value>, bytes_moved: f64, flops: f64, weight_bytes: f64, outcome: Outcome) {
        let roofline = model::roofline_s(bytes_moved, self.copy_bw);
        rec.insert("device".into(), json!(self.dev.info().name));
        rec.insert("weight_bytes".into(), json!(weight_bytes));
        rec.insert("bytes_moved".into(), json!(bytes_moved));
        rec.insert("flops".into(), json!(flops));
        rec.insert("roofline_us".into(), json!(roofline * 1e6));
        let text_head = format!(
            "{}: {} ",
            rec["op"].as_str().unwrap_or("?"),
            rec.iter()
                .filter(|(k, _)| !matches!(
                    k.as_str(),
                    "op" | "device" | "weight_bytes" | "bytes_moved" | "flops" | "roofline_us"
                ))
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        let text = match outcome {
            Outcome::Measured { seconds, launches } => {
                rec.insert("copy_gb_s".into(), json!(self.copy_bw / 1e9));
                rec.insert("kernel_launches".into(), json!(launches));
                rec.insert("iters".into(), json!(self.iters));
                rec.insert("measured_us".into(), json!(seconds * 1e6));
                rec.insert("gb_s".into(), json!(bytes_moved / seconds / 1e9));
                rec.insert("tflop_s".into(), json!(flops / seconds / 1e12));
                rec.insert("x_roofline".into(), json!(seconds / roofline));
                format!(
                    "{text_head}\n  measured {:.2} us  {:.0} GB/s  {:.2} TFLOP/s  | roofline {:.2} us ({:.0} MB at copy {:.0} GB/s) -> {:.2}x | {} launches",
                    seconds * 1e6,
                    bytes_moved / seconds / 1e9,
                    flops / seconds / 1e12,
                    roofline * 1e6,
                    bytes_moved / 1e6,
                    self.copy_bw / 1e9,
                    seconds / roofline,
                    launches
                )
            }
            Outcome::Simulated { launches, issued } => {
                // lowbit's own count: it differs from the profile's only if the simulator missed a launch.
                rec.insert("kernel_launches_issued".into(), json!(issued));
                sim_record(&mut rec, &launches, roofline, weight_bytes, &text_head)
            }
        };
        if self.json {
            println!("{}", Value::Object(rec));
        } else {
            println!("{text}");
        }
    }
}

/// Adds the simulator's per-launch counters and the model's prediction to `rec`; returns the
/// text report (`head` first).
fn sim_record(
    rec: &mut Map<String, Value>,
    launches: &[Value],
    roofline: f64,
    weight_bytes: f64,
    head: &str,
) -> String {
    let m = Machine::H200;
    let num = |v: &Value, k: &str| v.get(k).and_then(Value::as_f64).unwrap_or(0.0);
    let class = |v: &Value, k: &str| v.get("by_class").and_then(|c| c.get(k)).and_then(Value::as_f64).unwrap_or(0.0);
    let mut per_launch = Vec::new();
    let mut lines = Vec::new();
    let (mut total, mut warp, mut issued, mut dram, mut by_class) = (0.0, 0.0, 0.0, 0.0, Map::new());
    for l in launches {
        let grid = l.get("grid").map(grid_blocks).unwrap_or(1);
        let c = Counters {
            grid_blocks: grid,
            // Moves fold into operands in SASS (model.rs, "Moves").
            warp_instructions: num(l, "warp_instructions") - class(l, "move"),
            alu: class(l, "int"),
            fma: class(l, "fp32") + class(l, "half2"),
            mma: num(l, "mma"),
            dram_bytes: model::dram_bytes(
                num(l, "global_unique_bytes_read"),
                l.get("global_first_touch_bytes_read").and_then(Value::as_f64),
                num(l, "global_store_bytes"),
                m.l2_bytes,
            ),
        };
        let p = model::predict(&m, &c);
        total += p.total_s;
        warp += num(l, "warp_instructions");
        issued += c.warp_instructions;
        dram += c.dram_bytes;
        if let Some(Value::Object(bc)) = l.get("by_class") {
            for (k, v) in bc {
                let acc = by_class.get(k).and_then(Value::as_f64).unwrap_or(0.0) + v.as_f64().unwrap_or(0.0);
                by_class.insert(k.clone(), json!(acc));
            }
        }
        let kernel = l.get("kernel").and_then(Value::as_str).unwrap_or("?").to_string();
        lines.push(format!(
                "  {kernel:<44} grid {grid:>6} warp-instr {:>12.0} alu {:>11.0} mma {:>9.0} dram {:>8.2} MB -> predicted {:>8.2} us ({}-bound, {} waves x{:.2})",
                c.warp_instructions,
                c.alu,
                c.mma,
                c.dram_bytes / 1e6,
                p.total_s * 1e6,
                p.bound,
                p.waves,
                p.wave_factor
            ));
        // Every counter of the profile line (docs/simulator.md lists them), plus the prediction.
        let mut o = l.as_object().cloned().unwrap_or_default();
        o.insert(
            "predicted".into(),
            json!({
                "total_us": p.total_s * 1e6, "mem_us": p.mem_s * 1e6, "issue_us": p.issue_s * 1e6,
                "alu_us": p.alu_s * 1e6, "fma_us": p.fma_s * 1e6, "mma_us": p.mma_s * 1e6,
                "waves": p.waves, "wave_factor": p.wave_factor, "bound": p.bound,
            }),
        );
        per_launch.push(Value::Object(o));
    }
    rec.insert("kernel_launches".into(), json!(launches.len()));
    rec.insert("predicted_us".into(), json!(total * 1e6));
    rec.insert("predicted_x_roofline".into(), json!(total / roofline));
    rec.insert("warp_instructions".into(), json!(warp));
    rec.insert("warp_instructions_per_weight_byte".into(), json!(warp / weight_bytes.max(1.0)));
    // What the model's issue term counts: without the moves ptxas folds away (model.rs).
    rec.insert("issued_warp_instructions".into(), json!(issued));
    rec.insert("issued_warp_instructions_per_weight_byte".into(), json!(issued / weight_bytes.max(1.0)));
    rec.insert(
        "int_instructions_per_weight_byte".into(),
        json!(by_class.get("int").and_then(Value::as_f64).unwrap_or(0.0) / weight_bytes.max(1.0)),
    );
    rec.insert("dram_bytes_counted".into(), json!(dram));
    rec.insert("by_class".into(), Value::Object(by_class));
    rec.insert("model".into(), json!("predicted H200 time from simulator counters (src/bin/bench/model.rs)"));
    rec.insert("launches".into(), Value::Array(per_launch));
    format!(
            "{head}\n  PREDICTED (H200 model, not measured) {:.2} us | roofline {:.2} us (bytes moved / 4.3 TB/s) -> {:.2}x | {} launches, {:.0} warp-instructions ({:.3} per weight byte)\n{}",
            total * 1e6,
            roofline * 1e6,
            total / roofline,
            launches.len(),
            warp,
            warp / weight_bytes.max(1.0),
            lines.join("\n")
        )
}

/// CTAs of a profile line's `grid` ([x, y, z], an object or a number).
fn grid_blocks(v: &Value) -> u64 {
    match v {
        Value::Array(a) => a.iter().map(|x| x.as_u64().unwrap_or(1).max(1)).product(),
        Value::Object(o) => {
            ["x", "y", "z"].iter().map(|k| o.get(*k).and_then(Value::as_u64).unwrap_or(1).max(1)).product()
        }
        v => v.as_u64().unwrap_or(1),
    }
}

/// Device-to-device copy bandwidth (bytes read + written per second) of 1 GiB.
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = 1usize << 30;
    let src: CudaSlice<u8> = dev.zeros(n)?;
    let mut dst: CudaSlice<u8> = dev.zeros(n)?;
    let ctx = dev.context();
    let ev = || ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("cuEventCreate"));
    let (start, end) = (ev()?, ev()?);
    dev.stream().memcpy_dtod(&src, &mut dst).map_err(cuda("cuMemcpyDtoD"))?;
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        start.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
        for _ in 0..5 {
            dev.stream().memcpy_dtod(&src, &mut dst).map_err(cuda("cuMemcpyDtoD"))?;
        }
        end.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
        end.synchronize().map_err(cuda("cuEventSynchronize"))?;
        best = best.min(start.elapsed_ms(&end).map_err(cuda("cuEventElapsedTime"))? as f64 / 5e3);
    }
    Ok(2.0 * n as f64 / best)
}

/// Runs `lowbit bench`. Exits with status 2 when there is no usable device or no kernels.
pub fn run(args: BenchArgs) -> Result<()> {
    // The simulator reads its configuration at cuInit: set the profile path before the first
    // Device. A real driver ignores the variable.
    let (profile, own_profile) = match std::env::var_os("LOWBIT_SIM_PROFILE") {
        Some(p) => (PathBuf::from(p), false),
        None => {
            let p = std::env::temp_dir().join(format!("lowbit-bench-{}.jsonl", std::process::id()));
            std::env::set_var("LOWBIT_SIM_PROFILE", &p);
            (p, true)
        }
    };
    if !lowbit::device::kernels_built() {
        eprintln!("lowbit bench: this build has no GPU kernels (nvcc was missing at build time); run scripts/install-cuda-toolchain.sh and rebuild");
        std::process::exit(2);
    }
    let dev = match Device::first() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("lowbit bench: no usable CUDA device: {e}");
            eprintln!("lowbit bench: run on a GPU, or on lowbit-sim (LD_LIBRARY_PATH pointing at its libcuda.so)");
            std::process::exit(2);
        }
    };
    let sim = dev.info().name.contains("lowbit-sim");
    let common = match &args.op {
        Op::Gemm(a) => a.common.clone(),
        Op::Moe(a) => a.common.clone(),
        Op::Sync(a) | Op::FakeQuant(a) => a.common.clone(),
    };
    let copy_bw = if sim { Machine::H200.dram_bytes_per_s } else { copy_bandwidth(&dev)? };
    let b = Bench { dev, sim, profile, own_profile, copy_bw, iters: common.iters, json: common.json };
    if !b.json {
        let what = if sim {
            "simulator: counters of one call and a PREDICTED H200 time".to_string()
        } else {
            format!("GPU: CUDA-event timing, device-to-device copy {:.0} GB/s (read + write)", b.copy_bw / 1e9)
        };
        println!("# lowbit bench on {} ({} SMs): {what}", b.dev.info().name, b.dev.info().sm_count);
    }
    let result = match (&args.op, common.dtype) {
        (Op::Gemm(a), DtypeArg::Bf16) => bench_gemm::<bf16>(&b, a),
        (Op::Gemm(a), DtypeArg::F16) => bench_gemm::<f16>(&b, a),
        (Op::Moe(a), DtypeArg::Bf16) => bench_moe::<bf16>(&b, a),
        (Op::Moe(a), DtypeArg::F16) => bench_moe::<f16>(&b, a),
        (Op::Sync(a), DtypeArg::Bf16) => bench_quant::<bf16>(&b, a, true),
        (Op::Sync(a), DtypeArg::F16) => bench_quant::<f16>(&b, a, true),
        (Op::FakeQuant(a), DtypeArg::Bf16) => bench_quant::<bf16>(&b, a, false),
        (Op::FakeQuant(a), DtypeArg::F16) => bench_quant::<f16>(&b, a, false),
    };
    if b.own_profile {
        let _ = std::fs::remove_file(&b.profile);
    }
    result
}

fn shapes(n: Option<usize>, k: Option<usize>) -> Vec<(usize, usize)> {
    match (n, k) {
        (Some(n), Some(k)) => vec![(n, k)],
        _ => DENSE_SHAPES.to_vec(),
    }
}

fn dtype_name<T: Half>() -> &'static str {
    T::DTYPE.name()
}

/// Random compressed-tensors codes and scales of one layer (timing should not see all-zero data).
fn random_layer<T: Half>(rng: &mut Rng, shape: &QuantShape) -> (Vec<i32>, Vec<T>) {
    let packed = (0..shape.packed_len()).map(|_| (rng.next_u64() as u32 | 0x1111_1111) as i32).collect();
    let scales = (0..shape.scales_len()).map(|_| T::from_f32(rng.range(0.004, 0.02))).collect();
    (packed, scales)
}

fn bench_gemm<T: Half>(b: &Bench, a: &GemmArgs) -> Result<()> {
    let dev = &b.dev;
    for (n, k) in shapes(a.n, a.k) {
        let shape = QuantShape::new(n, k, group(a.group_size, k))?;
        let mut rng = Rng::new((n as u64) << 32 ^ k as u64);
        let (packed, scales) = random_layer::<T>(&mut rng, &shape);
        let weight_bytes = shape.packed_len() * 4 + shape.scales_len() * 2;
        let (pd, sd) = (dev.htod(&packed)?, dev.htod(&scales)?);
        let first = MarlinWeights::<T>::from_compressed_tensors(dev, &pd, &sd, &shape)?;
        drop((pd, sd, packed, scales));
        let mut weights = vec![first];
        for _ in 1..b.copies(weight_bytes, 32) {
            let q = dev.stream().clone_dtod(weights[0].qweight()).map_err(cuda("cuMemcpyDtoD"))?;
            let s = dev.stream().clone_dtod(weights[0].scales()).map_err(cuda("cuMemcpyDtoD"))?;
            weights.push(MarlinWeights::from_marlin_buffers(dev, q, s, None, &shape)?);
        }
        let mut ws = MarlinWorkspace::new();
        for &m in &a.m {
            if m == 0 {
                return Err(invalid("bench gemm", "--m must be at least 1"));
            }
            let x = dev.htod(&rng.normal_vec::<T>(m * k, 1.0))?;
            let mut out = dev.zeros::<T>(m * n)?;
            let outcome = b.run(|i| marlin_gemm_into(dev, &x, m, k, &weights[i % weights.len()], &mut out, &mut ws))?;
            let plan = plan_gemm(m, n, k, dev.info().sm_count)?;
            let bytes = weight_bytes + m * k * 2 + m * n * 2;
            let mut rec = Map::new();
            rec.insert("op".into(), json!("gemm"));
            rec.insert("m".into(), json!(m));
            rec.insert("n".into(), json!(n));
            rec.insert("k".into(), json!(k));
            rec.insert("group_size".into(), json!(a.group_size));
            rec.insert("dtype".into(), json!(dtype_name::<T>()));
            rec.insert("kernel".into(), json!(plan.kernel_name(T::DTYPE, false)));
            rec.insert("grid_blocks".into(), json!(plan.grid_blocks()));
            rec.insert("tiles".into(), json!(plan.tiles()));
            rec.insert("dp_tiles".into(), json!(plan.dp_tiles()));
            rec.insert("sk_ctas".into(), json!(plan.sk_ctas()));
            rec.insert("max_pieces_per_tile".into(), json!(plan.max_pieces_per_tile()));
            b.report(rec, bytes as f64, 2.0 * (m * n * k) as f64, weight_bytes as f64, outcome);
        }
    }
    Ok(())
}

fn bench_moe<T: Half>(b: &Bench, a: &MoeArgs) -> Result<()> {
    let dev = &b.dev;
    let (e, topk, h, inter, g) = (a.experts, a.top_k, a.hidden, a.intermediate, a.group_size);
    if e == 0 || topk == 0 || topk > e {
        return Err(invalid("bench moe", format!("--top-k {topk} must be in 1..=--experts {e}")));
    }
    let s13 = QuantShape::new(2 * inter, h, group(g, h))?;
    let s2 = QuantShape::new(h, inter, group(g, inter))?;
    let per = |s: &QuantShape| s.packed_len() * 4 + s.scales_len() * 2;
    let expert_bytes = per(&s13) + per(&s2);
    // One random expert, replicated over the stack on the device.
    let mut rng = Rng::new(7);
    let stack = |shape: &QuantShape, rng: &mut Rng| -> Result<MarlinExperts<T>> {
        let (packed, scales) = random_layer::<T>(rng, shape);
        let (pd, sd) = (dev.htod(&packed)?, dev.htod(&scales)?);
        let one = MarlinWeights::<T>::from_compressed_tensors(dev, &pd, &sd, shape)?;
        let (ql, sl) = (one.qweight().len(), one.scales().len());
        let mut q = dev.zeros::<i32>(e * ql)?;
        let mut s = dev.zeros::<T>(e * sl)?;
        for i in 0..e {
            dev.stream()
                .memcpy_dtod(one.qweight(), &mut q.slice_mut(i * ql..(i + 1) * ql))
                .map_err(cuda("cuMemcpyDtoD"))?;
            dev.stream()
                .memcpy_dtod(one.scales(), &mut s.slice_mut(i * sl..(i + 1) * sl))
                .map_err(cuda("cuMemcpyDtoD"))?;
        }
        MarlinExperts::from_device(dev, q, s, e, shape.n, shape.k, shape.group_size)
    };
    let copies = if b.sim { 1 } else { ROTATE_BYTES.div_ceil(e * expert_bytes).clamp(1, 4) };
    let stacks: Vec<(MarlinExperts<T>, MarlinExperts<T>)> =
        (0..copies).map(|_| Ok((stack(&s13, &mut rng)?, stack(&s2, &mut rng)?))).collect::<Result<_>>()?;
    let opts = MoeOptions { validate_ids: !a.no_validate_ids, ..MoeOptions::default() };
    let mut ws = MoeWorkspace::<T>::new(dev)?;
    for &m in &a.m {
        if m == 0 {
            return Err(invalid("bench moe", "--m must be at least 1"));
        }
        let x = dev.htod(&rng.normal_vec::<T>(m * h, 0.1))?;
        let mut out = dev.zeros::<T>(m * h)?;
        let nroutes = if b.sim { 1 } else { ROUTINGS };
        let mut routes = Vec::new();
        let mut touched = 0usize;
        for _ in 0..nroutes {
            let logits: Vec<f32> = (0..m * e).map(|_| rng.normal()).collect();
            let r = lowbit::reference::moe::softmax_topk(&logits, m, e, topk, true)?;
            touched += r.ids.iter().copied().collect::<BTreeSet<i32>>().len();
            routes.push((dev.htod(&r.weights)?, dev.htod(&r.ids)?));
        }
        let touched = touched as f64 / nroutes as f64;
        let outcome = b.run(|i| {
            let (w13, w2) = &stacks[i % copies];
            let (wt, ids) = &routes[i % nroutes];
            moe::fused::fused_marlin_moe_into(dev, &x, m, w13, w2, wt, ids, topk, None, &opts, &mut ws, &mut out)
        })?;
        let weight_bytes = touched * expert_bytes as f64;
        let bytes = weight_bytes + 2.0 * (m * h * 2) as f64;
        let flops = 2.0 * (m * topk) as f64 * (h * 2 * inter + inter * h) as f64;
        let mut rec = Map::new();
        rec.insert("op".into(), json!("moe"));
        rec.insert("m".into(), json!(m));
        rec.insert("experts".into(), json!(e));
        rec.insert("top_k".into(), json!(topk));
        rec.insert("hidden".into(), json!(h));
        rec.insert("intermediate".into(), json!(inter));
        rec.insert("group_size".into(), json!(g));
        rec.insert("dtype".into(), json!(dtype_name::<T>()));
        rec.insert("validate_ids".into(), json!(opts.validate_ids));
        rec.insert("experts_touched".into(), json!(touched));
        b.report(rec, bytes, flops, weight_bytes, outcome);
    }
    Ok(())
}

fn bench_quant<T: Half>(b: &Bench, a: &QuantArgs, sync: bool) -> Result<()> {
    let dev = &b.dev;
    for (n, k) in shapes(a.n, a.k) {
        let shape = QuantShape::new(n, k, group(a.group_size, k))?;
        let in_bytes = shape.numel() * 2;
        let packed_bytes = shape.packed_len() * 4 + shape.scales_len() * 2;
        let mut rng = Rng::new(1);
        let host: Vec<T> = rng.normal_vec(shape.numel(), 0.02);
        let first = dev.htod(&host)?;
        drop(host);
        let mut inputs = vec![first];
        for _ in 1..b.copies(in_bytes, 8) {
            inputs.push(dev.stream().clone_dtod(&inputs[0]).map_err(cuda("cuMemcpyDtoD"))?);
        }
        let (outcome, bytes) = if sync {
            let mut outs =
                inputs.iter().map(|w| quantize_to_marlin::<T, T>(dev, w, &shape)).collect::<Result<Vec<_>>>()?;
            let nb = inputs.len();
            let o = b.run(|i| {
                if a.unchecked {
                    quantize_to_marlin_into_unchecked(dev, &mut outs[i % nb], &inputs[i % nb])
                } else {
                    quantize_to_marlin_into(dev, &mut outs[i % nb], &inputs[i % nb])
                }
            })?;
            (o, in_bytes + packed_bytes)
        } else {
            let opts = FakeQuantOptions { check_finite: !a.unchecked, ..FakeQuantOptions::default() };
            let nb = inputs.len();
            let o = b.run(|i| quant::fake_quant_fwd::<T, T>(dev, &inputs[i % nb], &shape, opts).map(|_| ()))?;
            (o, 2 * in_bytes)
        };
        let mut rec = Map::new();
        rec.insert("op".into(), json!(if sync { "sync" } else { "fake-quant" }));
        rec.insert("n".into(), json!(n));
        rec.insert("k".into(), json!(k));
        rec.insert("group_size".into(), json!(a.group_size));
        rec.insert("dtype".into(), json!(dtype_name::<T>()));
        rec.insert("checked".into(), json!(!a.unchecked));
        b.report(rec, bytes as f64, 0.0, in_bytes as f64, outcome);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(kernel: &str, grid: Value, warp: f64, int: f64, mma: f64, read: f64, store: f64) -> Value {
        json!({
            "kernel": kernel, "grid": grid, "block": [256, 1, 1], "dynamic_smem": 53248,
            "thread_instructions": warp * 32.0, "warp_instructions": warp, "mma": mma,
            "by_class": {"int": int, "fp32": 0.0, "half2": 0.0, "convert": 0.0, "mma": mma, "global": 0.0,
                         "shared": 0.0, "control": 0.0, "sync": 0.0},
            "global_load_bytes": read, "global_store_bytes": store, "global_load_sectors": 0,
            "global_store_sectors": 0, "global_unique_bytes_read": read, "shared_wavefronts": 0,
            "shared_requests": 0, "wall_ms": 1.0,
        })
    }

    #[test]
    fn grid_forms() {
        assert_eq!(grid_blocks(&json!([224, 1, 1])), 224);
        assert_eq!(grid_blocks(&json!([4, 2, 3])), 24);
        assert_eq!(grid_blocks(&json!({"x": 7, "y": 2})), 14);
        assert_eq!(grid_blocks(&json!(5)), 5);
    }

    #[test]
    fn sim_record_sums_launches_and_labels_the_prediction() {
        // Two memory-bound launches of 4.3 MB each on a full wave: 1 us + 2 us launch cost each.
        let l = line("k", json!([132, 1, 1]), 1000.0, 10.0, 0.0, 4.0e6, 0.3e6);
        let mut rec = Map::new();
        let text = sim_record(&mut rec, &[l.clone(), l], 2e-6, 8.6e6, "gemm: m=1");
        assert!(text.contains("PREDICTED"), "{text}");
        assert_eq!(rec["kernel_launches"], json!(2));
        assert_eq!(rec["warp_instructions"], json!(2000.0));
        let us = rec["predicted_us"].as_f64().unwrap();
        assert!((us - 6.0).abs() < 1e-9, "{us}");
        assert!((rec["predicted_x_roofline"].as_f64().unwrap() - 3.0).abs() < 1e-9);
        assert_eq!(rec["by_class"]["int"], json!(20.0));
        assert_eq!(rec["launches"][0]["predicted"]["bound"], json!("memory"));
        assert!((rec["warp_instructions_per_weight_byte"].as_f64().unwrap() - 2000.0 / 8.6e6).abs() < 1e-15);
    }

    #[test]
    fn sim_record_applies_the_wave_factor() {
        // ALU-bound on 224 CTAs: 2 waves on 132 SMs.
        let clk = 132.0 * 1.755e9;
        let l = line("k", json!([224, 1, 1]), 2.0 * clk * 1e-6, 2.0 * clk * 1e-6, 0.0, 0.0, 0.0);
        let mut rec = Map::new();
        sim_record(&mut rec, &[l], 1e-6, 1.0, "");
        let us = rec["predicted_us"].as_f64().unwrap();
        assert!((us - (1.0 * 264.0 / 224.0 + 2.0)).abs() < 1e-9, "{us}");
        assert_eq!(rec["launches"][0]["predicted"]["bound"], json!("alu"));
    }
}
