//! Marlin W4A16 GEMM benchmark (DESIGN §6, issue 3): CUDA-event timing, weight buffers rotated
//! through more memory than L2 holds (so weights come from HBM), shapes of issue 3 × M ∈
//! {1, 16, 64, 256, 1024, 4096}. Prints time, TB/s of weight + scale bytes, TFLOP/s and the ratio
//! to the bandwidth roofline (weight + scale bytes / measured device-to-device copy bandwidth).
//! Prints a skip line and exits 0 without a GPU.
//!
//! Run: `cargo bench --bench marlin` (on the GPU machine: `bash .gpu/run.sh --benches`), then
//! `python3 benches/peers_marlin.py` for cuBLAS bf16 and tinygemm on the same shapes.

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::gemm::{marlin_gemm_into, plan_gemm, MarlinWorkspace};
use lowbit::marlin::layout::MarlinWeights;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Device};

/// Weight bytes in rotation: well above the 50–60 MB L2 of H100/H200.
const ROTATE_BYTES: usize = 256 << 20;
const MS: [usize; 6] = [1, 16, 64, 256, 1024, 4096];

fn time_ms(dev: &Device, iters: usize, mut f: impl FnMut()) -> f64 {
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    start.record(dev.stream()).expect("record");
    for _ in 0..iters {
        f();
    }
    end.record(dev.stream()).expect("record");
    end.synchronize().expect("sync");
    start.elapsed_ms(&end).expect("elapsed") as f64 / iters as f64
}

fn copy_bandwidth(dev: &Device) -> f64 {
    let n = 1usize << 29;
    let src: CudaSlice<u8> = dev.zeros(n).expect("alloc");
    let mut dst: CudaSlice<u8> = dev.zeros(n).expect("alloc");
    dev.stream().memcpy_dtod(&src, &mut dst).expect("copy");
    let ms = time_ms(dev, 10, || dev.stream().memcpy_dtod(&src, &mut dst).expect("copy"));
    // A copy reads and writes n bytes each.
    2.0 * n as f64 / (ms / 1e3) / 1e12
}

fn main() {
    let dev = match Device::first() {
        Ok(d) if lowbit::device::kernels_built() => d,
        Ok(_) => return println!("bench marlin: skipped (kernels not built)"),
        Err(e) => return println!("bench marlin: skipped ({e})"),
    };
    let copy = copy_bandwidth(&dev);
    println!(
        "device: {} ({} SMs); device-to-device copy {copy:.2} TB/s (read + write)",
        dev.info().name,
        dev.info().sm_count
    );
    let shapes: [(&str, usize, usize, GroupSize); 7] = [
        ("4096x4096 g128", 4096, 4096, GroupSize::Group(128)),
        ("28672x8192 g128 (llama70b up)", 28672, 8192, GroupSize::Group(128)),
        ("8192x28672 g128 (llama70b down)", 8192, 28672, GroupSize::Group(128)),
        ("qwen3 expert 1536x2048 g128", 1536, 2048, GroupSize::Group(128)),
        ("qwen3 expert 2048x768 g128", 2048, 768, GroupSize::Group(128)),
        ("kimi expert 4096x7168 g32", 4096, 7168, GroupSize::Group(32)),
        ("kimi expert 7168x2048 g32", 7168, 2048, GroupSize::Group(32)),
    ];
    println!("| shape (N x K) | M | grid | time us | weight TB/s | TFLOP/s | roofline us | x roofline |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut ws = MarlinWorkspace::new();
    for (name, n, k, gs) in shapes {
        let shape = QuantShape::new(n, k, gs).expect("shape");
        let mut rng = Rng::new(n as u64 ^ k as u64);
        let packed: Vec<i32> = (0..shape.packed_len()).map(|_| (rng.next_u64() as u32 | 0x1111_1111) as i32).collect();
        let scales: Vec<bf16> = (0..shape.scales_len()).map(|_| bf16::from_f32(rng.range(0.004, 0.02))).collect();
        let wbytes = shape.packed_len() * 4 + shape.scales_len() * 2;
        let nbuf = ROTATE_BYTES.div_ceil(wbytes).clamp(2, 32);
        let pd = dev.htod(&packed).expect("htod");
        let sd = dev.htod(&scales).expect("htod");
        let weights: Vec<MarlinWeights<bf16>> = (0..nbuf)
            .map(|_| MarlinWeights::from_compressed_tensors(&dev, &pd, &sd, &shape).expect("repack"))
            .collect();
        drop((pd, sd));
        for m in MS {
            let x: Vec<bf16> = (0..m * k).map(|_| bf16::from_f32(rng.normal())).collect();
            let xd = dev.htod(&x).expect("htod");
            let mut out = dev.zeros::<bf16>(m * n).expect("alloc");
            let mut i = 0;
            let mut run = || {
                marlin_gemm_into(&dev, &xd, m, k, &weights[i % nbuf], &mut out, &mut ws).expect("gemm");
                i += 1;
            };
            for _ in 0..3 {
                run();
            }
            dev.synchronize().expect("sync");
            let iters = (2e6 / (m as f64 * n as f64 * k as f64 / 1e6).max(1.0)).clamp(5.0, 200.0) as usize;
            let ms = (0..3).map(|_| time_ms(&dev, iters, &mut run)).fold(f64::INFINITY, f64::min);
            let t = ms / 1e3;
            // HBM moves `copy` TB/s (reads + writes); the GEMM must at least read its weights.
            let roof = wbytes as f64 / (copy * 1e12);
            let plan = plan_gemm(m, n, k, dev.info().sm_count).expect("plan");
            println!(
                "| {name} | {m} | {} CTAs, {} pieces | {:.1} | {:.2} | {:.1} | {:.1} | {:.2} |",
                plan.ctas,
                plan.max_pieces_per_tile(),
                t * 1e6,
                wbytes as f64 / t / 1e12,
                2.0 * m as f64 * n as f64 * k as f64 / t / 1e12,
                roof * 1e6,
                t / roof
            );
        }
    }
}
