//! Shared helpers for integration tests: GPU availability (skip with a printed reason, or fail
//! under LOWBIT_REQUIRE_GPU=1), the device a test ran on, the simulator check, and test data.
#![allow(dead_code)]

use lowbit::reference::rng::Rng;
use lowbit::{Device, Float};

/// The GPU to test on, or `None` (with the reason printed) when none is usable.
/// With `LOWBIT_REQUIRE_GPU=1` a missing GPU or missing kernels fail the test instead.
/// Prints the device (name, compute capability, SMs) once per call, i.e. once per test.
pub fn gpu() -> Option<Device> {
    let require = std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let reason = if !lowbit::device::kernels_built() {
        "kernels were not built (no nvcc at build time)".to_string()
    } else {
        match Device::first() {
            Ok(d) => {
                let test = std::thread::current().name().unwrap_or("?").to_string();
                eprintln!("{test}: running on {}", describe(&d));
                return Some(d);
            }
            Err(e) => e.to_string(),
        }
    };
    if require {
        panic!("LOWBIT_REQUIRE_GPU=1 but no GPU is usable: {reason}");
    }
    eprintln!("skipping GPU test: {reason}");
    None
}

/// `name (CC x.y, n SMs)` of a device.
pub fn describe(dev: &Device) -> String {
    let i = dev.info();
    let (major, minor) = i.compute_capability;
    format!("{} (CC {major}.{minor}, {} SMs)", i.name, i.sm_count)
}

/// Whether `dev` is lowbit-sim, the PTX interpreter behind a drop-in `libcuda.so` (its device
/// name contains `lowbit-sim`). Tests run a reduced shape set there that still covers every
/// kernel instance and plan variant; real GPUs run the full set.
pub fn on_sim(dev: &Device) -> bool {
    dev.info().name.contains("lowbit-sim")
}

/// `full` on a real GPU, `reduced` on the simulator.
pub fn pick<T>(dev: &Device, full: T, reduced: T) -> T {
    if on_sim(dev) {
        reduced
    } else {
        full
    }
}

/// Opens the GPU or returns from the test (after printing why).
#[macro_export]
macro_rules! gpu_or_skip {
    () => {
        match common::gpu() {
            Some(d) => d,
            None => return,
        }
    };
}

/// Bitwise equality of two slices of 16/32-bit floats, reporting the first difference.
pub fn assert_bits_eq<T: lowbit::Float>(what: &str, got: &[T], want: &[T]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let (gb, wb) = (g.to_f32().to_bits(), w.to_f32().to_bits());
        assert!(gb == wb, "{what}: element {i} differs: got {g:?}, want {w:?}");
    }
}

// ---- integer-exact data (kernel_review C1, DESIGN §5 "exactness over tolerance") ---------------

/// Whether `v` is exactly representable in `T` (and so in f32).
pub fn exact_in<T: Float>(v: f64) -> bool {
    let f = v as f32;
    f as f64 == v && T::from_f32(f).to_f32() == f
}

/// `2^e` with `e` uniform in `lo..=hi`.
pub fn pow2(rng: &mut Rng, lo: i32, hi: i32) -> f32 {
    2f32.powi(lo + rng.below((hi - lo + 1) as usize) as i32)
}

/// A ternary row: each of `k` entries is ±1 with probability `p`, else 0.
pub fn ternary(rng: &mut Rng, k: usize, p: f64) -> Vec<f32> {
    (0..k)
        .map(|_| {
            if (rng.uniform() as f64) < p {
                if rng.below(2) == 0 {
                    1.0
                } else {
                    -1.0
                }
            } else {
                0.0
            }
        })
        .collect()
}

/// `m` ternary rows of `k` entries with about `nnz` nonzeros each, every row accepted by `ok`
/// (which checks that all outputs that row feeds are exact): a rejected row is drawn again, with
/// half the density after every four rejections, so the data adapts to the dtype's precision.
pub fn ternary_rows(rng: &mut Rng, m: usize, k: usize, nnz: usize, ok: impl Fn(usize, &[f32]) -> bool) -> Vec<f32> {
    let mut x = Vec::with_capacity(m * k);
    for r in 0..m {
        let mut p = (nnz as f64 / k as f64).min(1.0);
        let mut tries = 0;
        loop {
            let row = ternary(rng, k, p);
            if ok(r, &row) {
                x.extend(row);
                break;
            }
            tries += 1;
            if tries % 4 == 0 {
                p /= 2.0;
            }
            assert!(tries < 200, "test construction: no exact ternary row found");
        }
    }
    x
}

/// 4-bit codes in `-8..=7` packed as compressed-tensors words (`[N, K/8]`), code −8 included.
pub fn pack_codes(codes: &[i8]) -> Vec<i32> {
    codes.chunks(8).map(|c| lowbit::format::pack8(c.try_into().unwrap())).collect()
}

/// Bitwise equality of 16-bit outputs against exact f64 values, reporting the first difference
/// as (row, column) of a `[rows, n]` matrix. An exact zero is +0 (what zero-initialised f32
/// accumulators give), whatever sign the reference's f64 sum left on it.
pub fn assert_exact<T: Float>(what: &str, got: &[T], want: &[f64], n: usize) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let mut bad = 0usize;
    let mut first = None;
    for (i, (g, &w)) in got.iter().zip(want).enumerate() {
        let w = w + 0.0;
        assert!(exact_in::<T>(w), "{what}: test construction: reference ({}, {}) = {w} is not exact", i / n, i % n);
        if g.to_f32().to_bits() != T::from_f32(w as f32).to_f32().to_bits() {
            bad += 1;
            first.get_or_insert((i, *g, w));
        }
    }
    if let Some((i, g, w)) = first {
        panic!("{what}: {bad} of {} elements differ; first ({}, {}): got {g:?}, want {w}", got.len(), i / n, i % n);
    }
}
