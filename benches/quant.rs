//! Fake-quant forward and quantize_pack throughput, timed with CUDA events, against the device's
//! measured device-to-device copy bandwidth (DESIGN §6). Weight buffers rotate through more memory
//! than L2 holds so every call reads from HBM. Prints a skip line and exits 0 without a GPU.
//!
//! Run: `cargo bench --bench quant` (on the GPU machine: `bash .gpu/run.sh --benches`), then
//! `python3 benches/peers_quant.py` for the PyTorch numbers of the same shapes.

use std::time::Duration;

use criterion::{Criterion, Throughput};
use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lowbit::format::{GroupSize, QuantShape};
use lowbit::quant::{self, FakeQuantOptions};
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Device};

/// Buffers in rotation: together well above the 50-60 MB L2 of H100/H200.
const ROTATE_BYTES: usize = 512 << 20;

fn event_time(dev: &Device, iters: u64, mut f: impl FnMut()) -> Duration {
    let ctx = dev.context();
    let start = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    let end = ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).expect("event");
    f(); // warm-up: module load, allocations
    start.record(dev.stream()).expect("record");
    for _ in 0..iters {
        f();
    }
    end.record(dev.stream()).expect("record");
    end.synchronize().expect("sync");
    Duration::from_secs_f64(start.elapsed_ms(&end).expect("elapsed") as f64 / 1e3)
}

fn copy_bandwidth(dev: &Device) -> f64 {
    let n = 1usize << 29; // 1 GiB of bytes
    let src: CudaSlice<u8> = dev.zeros(n).expect("alloc");
    let mut dst: CudaSlice<u8> = dev.zeros(n).expect("alloc");
    let t = event_time(dev, 20, || dev.stream().memcpy_dtod(&src, &mut dst).expect("copy"));
    (2 * n) as f64 * 20.0 / t.as_secs_f64() / 1e9
}

struct Case {
    name: &'static str,
    shape: QuantShape,
}

fn main() {
    let dev = match Device::first() {
        Ok(d) if lowbit::device::kernels_built() => d,
        Ok(_) => return println!("bench quant: skipped (kernels not built)"),
        Err(e) => return println!("bench quant: skipped ({e})"),
    };
    let copy = copy_bandwidth(&dev);
    println!(
        "device: {} ({} SMs); device-to-device copy: {copy:.0} GB/s (read + write)",
        dev.info().name,
        dev.info().sm_count
    );
    let cases = [
        Case { name: "dense 7168x18432 g128", shape: QuantShape::new(7168, 18432, GroupSize::Group(128)).unwrap() },
        Case { name: "kimi w13 4096x7168 g32", shape: QuantShape::new(4096, 7168, GroupSize::Group(32)).unwrap() },
        Case { name: "kimi w2 7168x2048 g32", shape: QuantShape::new(7168, 2048, GroupSize::Group(32)).unwrap() },
        Case {
            name: "llama 8192x8192 channelwise",
            shape: QuantShape::new(8192, 8192, GroupSize::Channelwise).unwrap(),
        },
    ];
    let mut c = Criterion::default().configure_from_args().sample_size(20).warm_up_time(Duration::from_millis(300));
    let mut summary = Vec::new();
    for case in &cases {
        let s = case.shape;
        let bytes_in = s.numel() * 2;
        let nbuf = (ROTATE_BYTES / bytes_in).clamp(2, 8);
        let mut rng = Rng::new(1);
        let host: Vec<bf16> = rng.normal_vec(s.numel(), 0.02);
        let bufs: Vec<CudaSlice<bf16>> = (0..nbuf).map(|_| dev.htod(&host).expect("htod")).collect();
        let packed_bytes = s.packed_len() * 4 + s.scales_len() * 2;
        let variants: [(&str, usize, FakeQuantOptions, bool); 4] = [
            ("fake_quant_fwd", 2 * bytes_in, FakeQuantOptions { check_finite: true, ..Default::default() }, false),
            (
                "fake_quant_fwd unchecked",
                2 * bytes_in,
                FakeQuantOptions { check_finite: false, ..Default::default() },
                false,
            ),
            (
                "fake_quant_fwd +scales +packed unchecked",
                2 * bytes_in + packed_bytes,
                FakeQuantOptions { scales: true, packed: true, check_finite: false },
                false,
            ),
            ("quantize_pack", bytes_in + packed_bytes, FakeQuantOptions::default(), true),
        ];
        let mut g = c.benchmark_group(case.name);
        for (label, bytes, opts, pack) in variants {
            g.throughput(Throughput::Bytes(bytes as u64));
            let mut best = f64::INFINITY;
            g.bench_function(label, |b| {
                b.iter_custom(|iters| {
                    let mut i = 0;
                    let t = event_time(&dev, iters, || {
                        let w = &bufs[i % nbuf];
                        i += 1;
                        if pack {
                            quant::quantize_pack::<bf16, bf16>(&dev, w, &s).expect("quantize_pack");
                        } else {
                            quant::fake_quant_fwd::<bf16, bf16>(&dev, w, &s, opts).expect("fake_quant_fwd");
                        }
                    });
                    best = best.min(t.as_secs_f64() / iters as f64);
                    t
                })
            });
            let gbs = bytes as f64 / best / 1e9;
            summary.push(format!(
                "| {} | {label} | {:.1} | {gbs:.0} | {:.0}% |",
                case.name,
                best * 1e6,
                100.0 * gbs / copy
            ));
        }
        g.finish();
    }
    println!("\n| shape | op | best µs | GB/s | of copy bw |\n|---|---|---|---|---|");
    for line in summary {
        println!("{line}");
    }
}
