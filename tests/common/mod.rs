//! Shared helpers for integration tests: GPU availability (skip with a printed reason, or fail
//! under LOWBIT_REQUIRE_GPU=1) and test data.
#![allow(dead_code)]

use lowbit::Device;

/// The GPU to test on, or `None` (with the reason printed) when none is usable.
/// With `LOWBIT_REQUIRE_GPU=1` a missing GPU or missing kernels fail the test instead.
pub fn gpu() -> Option<Device> {
    let require = std::env::var("LOWBIT_REQUIRE_GPU").is_ok_and(|v| v == "1");
    let reason = if !lowbit::device::kernels_built() {
        "kernels were not built (no nvcc at build time)".to_string()
    } else {
        match Device::first() {
            Ok(d) => return Some(d),
            Err(e) => e.to_string(),
        }
    };
    if require {
        panic!("LOWBIT_REQUIRE_GPU=1 but no GPU is usable: {reason}");
    }
    eprintln!("skipping GPU test: {reason}");
    None
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
