//! MoE benches, timed with CUDA events (DESIGN §6): `moe_align_block_size` for M = 4096, top-8,
//! E = 384, and `fused_marlin_moe` for the Qwen3-30B-A3B (E = 128, top-8, H = 2048, I = 768,
//! g = 128) and Kimi-K2 (E = 384, top-8, H = 7168, I = 2048, g = 32) layers × M ∈ {1, 16, 64,
//! 256, 2048}. Reports time, TB/s of the expert weights actually touched (the distinct experts
//! routed to: their INT4 codes and scales of w13 and w2), and that time against the roofline
//! (touched bytes / measured device-to-device copy bandwidth). Each iteration uses a different
//! routing and the small expert stack is rotated through copies, so weights come from HBM.
//! Prints a skip line and exits 0 when no GPU is usable.
//!
//! `cargo bench --bench moe`; `python3 benches/peers_moe.py` times the PyTorch peers.

use std::collections::BTreeSet;

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lowbit::format::GroupSize;
use lowbit::marlin::gemm::MarlinExperts;
use lowbit::moe::{self, AlignWorkspace, MoeOptions, MoeWorkspace};
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Device, Result};

const ITERS: usize = 20;
const ROUTINGS: usize = 8;

fn cuda(op: &'static str) -> impl FnOnce(cudarc::driver::DriverError) -> lowbit::Error {
    move |source| lowbit::Error::Cuda { op, source }
}

/// Mean seconds per call of `f(i)` over `iters` calls, after one warm-up call.
fn timed(dev: &Device, iters: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("cuEventCreate"))?;
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(cuda("cuEventCreate"))?;
    f(0)?;
    dev.synchronize()?;
    start.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
    for i in 0..iters {
        f(i)?;
    }
    end.record(dev.stream()).map_err(cuda("cuEventRecord"))?;
    end.synchronize().map_err(cuda("cuEventSynchronize"))?;
    Ok(start.elapsed_ms(&end).map_err(cuda("cuEventElapsedTime"))? as f64 / 1e3 / iters as f64)
}

/// Device-to-device copy bandwidth, bytes read + written per second.
fn copy_bandwidth(dev: &Device) -> Result<f64> {
    let n = 1usize << 30;
    let src: CudaSlice<u8> = dev.zeros(n)?;
    let mut dst: CudaSlice<u8> = dev.zeros(n)?;
    let t = timed(dev, 10, |_| dev.stream().memcpy_dtod(&src, &mut dst).map_err(cuda("memcpy")))?;
    Ok(2.0 * n as f64 / t)
}

fn routing(rng: &mut Rng, m: usize, topk: usize, e: usize) -> (Vec<f32>, Vec<i32>) {
    let logits: Vec<f32> = (0..m * e).map(|_| rng.normal()).collect();
    let r = lowbit::reference::moe::softmax_topk(&logits, m, e, topk, true).expect("routing");
    (r.weights, r.ids)
}

/// Expert stacks of zero codes (timing does not depend on the values) built on the device.
fn experts(dev: &Device, e: usize, n: usize, k: usize, g: usize) -> Result<MarlinExperts<bf16>> {
    let q = dev.zeros::<i32>(e * (k / 16) * 2 * n)?;
    let s = dev.zeros::<bf16>(e * (k / g) * n)?;
    MarlinExperts::from_device(dev, q, s, e, n, k, GroupSize::Group(g))
}

fn bench_align(dev: &Device) -> Result<()> {
    let (m, topk, e) = (4096, 8, 384);
    let bs = moe::choose_block_size(m, topk, e);
    let mut rng = Rng::new(1);
    let ids: Vec<CudaSlice<i32>> =
        (0..ROUTINGS).map(|_| dev.htod(&routing(&mut rng, m, topk, e).1)).collect::<Result<_>>()?;
    let mut ws = AlignWorkspace::new(dev)?;
    let t = timed(dev, 200, |i| ws.align(dev, &ids[i % ROUTINGS], m, topk, e, bs, None).map(|_| ()))?;
    ws.check_ids(dev)?;
    println!("moe_align_block_size M={m} top{topk} E={e} block={bs}: {:.2} us", t * 1e6);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn bench_layer(
    dev: &Device,
    name: &str,
    e: usize,
    topk: usize,
    h: usize,
    i: usize,
    g: usize,
    copy_bw: f64,
) -> Result<()> {
    let per_expert = |n: usize, k: usize| (k / 16) * 2 * n * 4 + (k / g) * n * 2;
    let expert_bytes = per_expert(2 * i, h) + per_expert(h, i);
    // Rotate copies of the stack when it is small enough to stay in L2 between calls.
    let copies = (256usize << 20).div_ceil(e * expert_bytes).clamp(1, 4);
    let stacks: Vec<(MarlinExperts<bf16>, MarlinExperts<bf16>)> =
        (0..copies).map(|_| Ok((experts(dev, e, 2 * i, h, g)?, experts(dev, e, h, i, g)?))).collect::<Result<_>>()?;
    let mut ws = MoeWorkspace::<bf16>::new(dev)?;
    let opts = MoeOptions { validate_ids: false, ..MoeOptions::default() };
    for m in [1usize, 16, 64, 256, 2048] {
        let mut rng = Rng::new(m as u64);
        let x: CudaSlice<bf16> = dev.htod(&rng.normal_vec::<bf16>(m * h, 0.1))?;
        let mut out: CudaSlice<bf16> = dev.zeros(m * h)?;
        let mut routes = Vec::new();
        let mut touched = 0usize;
        for _ in 0..ROUTINGS {
            let (w, ids) = routing(&mut rng, m, topk, e);
            touched += ids.iter().copied().collect::<BTreeSet<i32>>().len();
            routes.push((dev.htod(&w)?, dev.htod(&ids)?));
        }
        let bytes = touched as f64 / ROUTINGS as f64 * expert_bytes as f64;
        let t = timed(dev, ITERS, |it| {
            let (m13, m2) = &stacks[it % copies];
            let (w, ids) = &routes[it % ROUTINGS];
            moe::fused::fused_marlin_moe_into(dev, &x, m, m13, m2, w, ids, topk, None, &opts, &mut ws, &mut out)
        })?;
        let roofline = bytes / (copy_bw / 2.0); // reading at the copy's per-direction rate
        println!(
            "{name:<14} M={m:>5}: {:>9.1} us  {:>6.2} TB/s of touched experts ({:>6.1} MB)  roofline {:>8.1} us -> {:>5.2}x",
            t * 1e6,
            bytes / t / 1e12,
            bytes / 1e6,
            roofline * 1e6,
            t / roofline
        );
    }
    Ok(())
}

fn run(dev: &Device) -> Result<()> {
    let copy = copy_bandwidth(dev)?;
    println!(
        "device: {} ({} SMs); device-to-device copy {:.0} GB/s (read + write)",
        dev.info().name,
        dev.info().sm_count,
        copy / 1e9
    );
    bench_align(dev)?;
    bench_layer(dev, "Qwen3-30B-A3B", 128, 8, 2048, 768, 128, copy)?;
    bench_layer(dev, "Kimi-K2", 384, 8, 7168, 2048, 32, copy)?;
    Ok(())
}

fn main() {
    let dev = match Device::first() {
        Ok(d) if lowbit::device::kernels_built() => d,
        Ok(_) => return println!("bench moe: skipped (kernels not built)"),
        Err(e) => return println!("bench moe: skipped ({e})"),
    };
    if let Err(e) = run(&dev) {
        println!("bench moe: failed: {e}");
        std::process::exit(1);
    }
}
