//! Weight-sync throughput: `quantize_to_marlin` (BF16 master weights → Marlin qweight + permuted
//! scales) timed with CUDA events, weight buffers rotated so the total exceeds L2 (60 MB on H200)
//! several times and every timed call reads from HBM. Reports GB/s of BF16 input (the issue-5
//! metric) and GB/s of all bytes moved, next to a device-to-device copy of the same input size
//! (the roofline). Prints a skip line and exits 0 when no GPU is usable.
//!
//! `cargo bench --bench sync` (criterion is not used: timing is by CUDA events).

use cudarc::driver::sys::CUevent_flags;
use cudarc::driver::CudaSlice;
use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::sync::{quantize_to_marlin, quantize_to_marlin_into, quantize_to_marlin_into_unchecked};
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Device};

/// Bytes the rotated input buffers must span (several times the H200's 60 MB L2).
const ROTATE_BYTES: usize = 256 << 20;
const ITERS: usize = 20;

fn timed(dev: &Device, iters: usize, mut f: impl FnMut(usize) -> lowbit::Result<()>) -> lowbit::Result<f64> {
    let ctx = dev.context();
    let ev = |what| {
        ctx.new_event(Some(CUevent_flags::CU_EVENT_DEFAULT)).map_err(|e| lowbit::Error::Cuda { op: what, source: e })
    };
    let (start, end) = (ev("cuEventCreate")?, ev("cuEventCreate")?);
    f(0)?; // warm up (module load, first-touch)
    dev.synchronize()?;
    start.record(dev.stream()).map_err(|e| lowbit::Error::Cuda { op: "cuEventRecord", source: e })?;
    for i in 0..iters {
        f(i)?;
    }
    end.record(dev.stream()).map_err(|e| lowbit::Error::Cuda { op: "cuEventRecord", source: e })?;
    end.synchronize().map_err(|e| lowbit::Error::Cuda { op: "cuEventSynchronize", source: e })?;
    let ms = start.elapsed_ms(&end).map_err(|e| lowbit::Error::Cuda { op: "cuEventElapsedTime", source: e })?;
    Ok(ms as f64 / 1e3 / iters as f64)
}

fn bench(dev: &Device, name: &str, n: usize, k: usize, g: GroupSize) -> lowbit::Result<()> {
    let shape = QuantShape::new(n, k, g)?;
    let in_bytes = shape.numel() * 2;
    let copies = ROTATE_BYTES.div_ceil(in_bytes).max(2);
    let mut rng = Rng::new(1);
    let host: Vec<bf16> = rng.normal_vec(shape.numel(), 0.02);
    let inputs: Vec<CudaSlice<bf16>> = (0..copies).map(|_| dev.htod(&host)).collect::<lowbit::Result<_>>()?;
    let mut outs = Vec::with_capacity(copies);
    for w in &inputs {
        outs.push(quantize_to_marlin::<bf16, bf16>(dev, w, &shape)?);
    }
    let out_bytes = shape.packed_len() * 4 + shape.scales_len() * 2;

    let t_unchecked =
        timed(dev, ITERS, |i| quantize_to_marlin_into_unchecked(dev, &mut outs[i % copies], &inputs[i % copies]))?;
    let t_checked = timed(dev, ITERS, |i| quantize_to_marlin_into(dev, &mut outs[i % copies], &inputs[i % copies]))?;
    let mut dst: Vec<CudaSlice<bf16>> =
        (0..copies).map(|_| dev.zeros::<bf16>(shape.numel())).collect::<lowbit::Result<_>>()?;
    let t_copy = timed(dev, ITERS, |i| {
        dev.stream()
            .memcpy_dtod(&inputs[i % copies], &mut dst[i % copies])
            .map_err(|e| lowbit::Error::Cuda { op: "memcpy", source: e })
    })?;
    let gbs = |bytes: usize, t: f64| bytes as f64 / t / 1e9;
    println!(
        "{name:<28} [{n:>6} x {k:>6}] g={g:<11} kernel {:>8.1} us  {:>7.0} GB/s bf16-in  {:>7.0} GB/s moved  | checked {:>8.1} us {:>7.0} GB/s | copy {:>7.0} GB/s (r+w) -> {:>5.1}% of copy",
        t_unchecked * 1e6,
        gbs(in_bytes, t_unchecked),
        gbs(in_bytes + out_bytes, t_unchecked),
        t_checked * 1e6,
        gbs(in_bytes, t_checked),
        gbs(2 * in_bytes, t_copy),
        100.0 * gbs(in_bytes + out_bytes, t_unchecked) / gbs(2 * in_bytes, t_copy),
    );
    Ok(())
}

fn main() {
    if !lowbit::device::kernels_built() {
        println!("sync bench: skipped (kernels were not built: no nvcc at build time)");
        return;
    }
    let dev = match Device::first() {
        Ok(d) => d,
        Err(e) => {
            println!("sync bench: skipped (no usable GPU: {e})");
            return;
        }
    };
    println!("sync bench on {} ({} SMs)", dev.info().name, dev.info().sm_count);
    let cases: [(&str, usize, usize, GroupSize); 6] = [
        ("kimi-k2 expert w13", 4096, 7168, GroupSize::Group(32)),
        ("kimi-k2 expert w2", 7168, 2048, GroupSize::Group(32)),
        ("dense 18432x7168 g128", 18432, 7168, GroupSize::Group(128)),
        ("dense 7168x18432 g64", 7168, 18432, GroupSize::Group(64)),
        ("llama-70b down g128", 8192, 28672, GroupSize::Group(128)),
        ("channelwise 7168x18432", 7168, 18432, GroupSize::Channelwise),
    ];
    for (name, n, k, g) in cases {
        if let Err(e) = bench(&dev, name, n, k, g) {
            println!("{name}: error: {e}");
        }
    }
}
