//! GPU quantization kernels against the CPU reference, bit for bit (DESIGN §3, §5).
//! Skips with a printed reason when no GPU is usable; fails under LOWBIT_REQUIRE_GPU=1.
//! On lowbit-sim (`common::on_sim`) the real shapes shrink to ones that still take many
//! grid-stride iterations (grouped) and long rows (channelwise).

mod common;

use lowbit::format::{GroupSize, QuantShape};
use lowbit::quant::{self, FakeQuantOptions};
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Device, Error, Float, ScaleFloat, SteMode};

const GROUPS: [GroupSize; 4] =
    [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];

fn weights<T: Float>(rng: &mut Rng, shape: &QuantShape) -> Vec<T> {
    let (n, k) = (shape.n, shape.k);
    let mut w: Vec<T> = rng.normal_vec(n * k, 0.05);
    // Zero row, huge row, tiny row, a row of ties on the s = 1 grid.
    for c in 0..k {
        w[c] = T::from_f32(0.0);
        if n > 3 {
            w[k + c] = T::from_f32(rng.normal() * 3e3);
            w[2 * k + c] = T::from_f32(rng.normal() * 1e-7);
            let tie = if c % shape.group == 0 { 7.0 } else { (c % 14) as f32 * 0.5 - 3.5 };
            w[3 * k + c] = T::from_f32(tie);
        }
    }
    w
}

fn check_fwd<T: Float, S: ScaleFloat>(dev: &Device, shape: &QuantShape, seed: u64) {
    let mut rng = Rng::new(seed);
    let w: Vec<T> = weights(&mut rng, shape);
    let want = rq::quantize::<T, S>(&w, shape).unwrap();
    let (want_packed, _) = rq::quantize_pack::<T, S>(&w, shape).unwrap();
    let wd = dev.htod(&w).unwrap();
    let what = format!("{}/{} {}x{} g={}", T::DTYPE, S::DTYPE, shape.n, shape.k, shape.group_size);
    let out = quant::fake_quant_fwd::<T, S>(
        dev,
        &wd,
        shape,
        FakeQuantOptions { scales: true, packed: true, ..Default::default() },
    )
    .unwrap();
    common::assert_bits_eq(&format!("fake_quant {what}"), &dev.dtoh(&out.weights).unwrap(), &want.fake_quant);
    common::assert_bits_eq(&format!("scales {what}"), &dev.dtoh(out.scales.as_ref().unwrap()).unwrap(), &want.scales);
    assert_eq!(dev.dtoh(out.packed.as_ref().unwrap()).unwrap(), want_packed, "packed {what}");

    // Without the status check the outputs are the same.
    let unchecked = FakeQuantOptions { scales: true, packed: true, check_finite: false };
    let out2 = quant::fake_quant_fwd::<T, S>(dev, &wd, shape, unchecked).unwrap();
    common::assert_bits_eq(&format!("unchecked {what}"), &dev.dtoh(&out2.weights).unwrap(), &want.fake_quant);
    assert_eq!(dev.dtoh(out2.packed.as_ref().unwrap()).unwrap(), want_packed, "unchecked packed {what}");

    // Export path and the consistency property on the GPU.
    let packed = quant::quantize_pack::<T, S>(dev, &wd, shape).unwrap();
    assert_eq!(dev.dtoh(&packed.packed).unwrap(), want_packed, "quantize_pack {what}");
    let dq = quant::dequantize::<T, S>(dev, &packed).unwrap();
    common::assert_bits_eq(&format!("dequantize {what}"), &dev.dtoh(&dq).unwrap(), &want.fake_quant);

    // ClipMask backward.
    let dy: Vec<T> = rng.normal_vec(shape.numel(), 1.0);
    let dyd = dev.htod(&dy).unwrap();
    let dw = quant::fake_quant_bwd::<T, S>(dev, &dyd, &wd, shape, SteMode::ClipMask).unwrap();
    let want_dw = rq::fake_quant_bwd::<T, S>(&dy, &w, shape, SteMode::ClipMask).unwrap();
    common::assert_bits_eq(&format!("bwd {what}"), &dev.dtoh(&dw).unwrap(), &want_dw);
    let dw = quant::fake_quant_bwd::<T, S>(dev, &dyd, &wd, shape, SteMode::Identity).unwrap();
    common::assert_bits_eq(&format!("bwd identity {what}"), &dev.dtoh(&dw).unwrap(), &dy);
}

#[test]
fn fake_quant_matches_reference_all_dtypes_and_groups() {
    let dev = gpu_or_skip!();
    let mut seed = 1;
    for (n, k) in [(1, 128), (7, 384), (64, 4096), (33, 1152), (130, 2048)] {
        for g in GROUPS {
            let Ok(shape) = QuantShape::new(n, k, g) else { continue };
            seed += 1;
            check_fwd::<bf16, bf16>(&dev, &shape, seed);
            check_fwd::<f16, f16>(&dev, &shape, seed);
            check_fwd::<f32, bf16>(&dev, &shape, seed);
            check_fwd::<f32, f16>(&dev, &shape, seed);
        }
    }
}

#[test]
fn fake_quant_matches_reference_on_real_shapes() {
    let dev = gpu_or_skip!();
    // Kimi-K2 experts (hidden 7168, intermediate 2048, g = 32) and a large dense projection.
    let full: &[(usize, usize, GroupSize)] = &[
        (4096, 7168, GroupSize::Group(32)),
        (7168, 2048, GroupSize::Group(32)),
        (7168, 18432, GroupSize::Group(128)),
        (1024, 18432, GroupSize::Channelwise),
    ];
    // The simulator: 131072 groups of 32 (15 grid-stride rounds of the 8448-block grid) and
    // channelwise rows of 18432.
    let sim: &[(usize, usize, GroupSize)] = &[(2048, 2048, GroupSize::Group(32)), (128, 18432, GroupSize::Channelwise)];
    for (i, &(n, k, g)) in common::pick(&dev, full, sim).iter().enumerate() {
        check_fwd::<bf16, bf16>(&dev, &QuantShape::new(n, k, g).unwrap(), 100 + i as u64);
    }
}

#[test]
fn random_shapes() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(77);
    for i in 0..common::pick(&dev, 20, 10) {
        let g = GROUPS[rng.below(4)];
        let k = 128 * (1 + rng.below(24));
        let n = 1 + rng.below(300);
        let shape = QuantShape::new(n, k, g).unwrap();
        check_fwd::<bf16, bf16>(&dev, &shape, 1000 + i);
    }
}

#[test]
fn layout_conversions_match_reference() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(5);
    let big = common::pick(&dev, (4096, 7168), (1024, 2048));
    for (n, k, g) in
        [(64, 256, GroupSize::Group(128)), (100, 1024, GroupSize::Group(32)), (big.0, big.1, GroupSize::Group(32))]
    {
        let shape = QuantShape::new(n, k, g).unwrap();
        let w: Vec<bf16> = rng.normal_vec(shape.numel(), 0.1);
        let (packed, scales) = rq::quantize_pack::<bf16, bf16>(&w, &shape).unwrap();
        let pd = dev.htod(&packed).unwrap();
        let q = quant::ct_to_gptq(&dev, &pd, &shape).unwrap();
        assert_eq!(dev.dtoh(&q).unwrap(), rq::ct_to_gptq(&packed, &shape).unwrap());
        let back = quant::gptq_to_ct(&dev, &q, &shape).unwrap();
        assert_eq!(dev.dtoh(&back).unwrap(), packed);
        let sd = dev.htod(&scales).unwrap();
        let st = quant::transpose_scales(&dev, &sd, n, shape.groups_per_row()).unwrap();
        assert_eq!(dev.dtoh(&st).unwrap(), rq::transpose(&scales, n, shape.groups_per_row()).unwrap());
    }
}

#[test]
fn non_finite_weights_are_reported_not_quantized() {
    let dev = gpu_or_skip!();
    for g in GROUPS {
        let shape = QuantShape::new(8, 256, g).unwrap();
        let mut w = vec![bf16::from_f32(0.5); shape.numel()];
        w[3 * 256 + 17] = bf16::NAN;
        w[5 * 256 + 2] = bf16::INFINITY;
        let wd = dev.htod(&w).unwrap();
        let e = quant::fake_quant_fwd::<bf16, bf16>(&dev, &wd, &shape, FakeQuantOptions::default()).unwrap_err();
        assert!(matches!(e, Error::NonFinite { row: 3, col: 17, .. }), "{e}");
        let e = quant::quantize_pack::<bf16, bf16>(&dev, &wd, &shape).unwrap_err();
        assert!(matches!(e, Error::NonFinite { row: 3, col: 17, .. }), "{e}");
    }
    // f32 weights whose scale overflows f16.
    let shape = QuantShape::new(2, 64, GroupSize::Group(32)).unwrap();
    let mut w = vec![1.0f32; 128];
    w[100] = 1e9;
    let wd = dev.htod(&w).unwrap();
    let e = quant::quantize_pack::<f32, f16>(&dev, &wd, &shape).unwrap_err();
    assert!(matches!(e, Error::ScaleOverflow { row: 1, group: 1, .. }), "{e}");
    // Both kinds of error: the first offending group in (row, group) order wins, as in the
    // reference (here the overflowing group 0 of row 0 comes before the NaN in row 1).
    let mut w = vec![1.0f32; 128];
    w[3] = 1e9;
    w[70] = f32::NAN;
    let e = quant::quantize_pack::<f32, f16>(&dev, &dev.htod(&w).unwrap(), &shape).unwrap_err();
    let want = lowbit::reference::quant::quantize_pack::<f32, f16>(&w, &shape).unwrap_err();
    assert!(matches!(e, Error::ScaleOverflow { row: 0, group: 0, .. }), "{e}");
    assert!(matches!(want, Error::ScaleOverflow { row: 0, group: 0, .. }), "{want}");
}

#[test]
fn wrong_lengths_are_rejected_before_launch() {
    let dev = gpu_or_skip!();
    let shape = QuantShape::new(4, 128, GroupSize::Group(32)).unwrap();
    let wd = dev.htod(&vec![bf16::ONE; 500]).unwrap();
    let e = quant::fake_quant_fwd::<bf16, bf16>(&dev, &wd, &shape, FakeQuantOptions::default()).unwrap_err();
    assert!(matches!(e, Error::Length { expected: 512, got: 500, .. }), "{e}");
    let dy = dev.htod(&vec![bf16::ONE; 512]).unwrap();
    let e = quant::fake_quant_bwd::<bf16, bf16>(&dev, &dy, &wd, &shape, SteMode::ClipMask).unwrap_err();
    assert!(matches!(e, Error::Length { .. }), "{e}");
}

#[test]
fn deterministic_across_runs() {
    let dev = gpu_or_skip!();
    let shape = QuantShape::new(common::pick(&dev, 512, 128), 4096, GroupSize::Group(128)).unwrap();
    let w: Vec<bf16> = Rng::new(9).normal_vec(shape.numel(), 0.02);
    let wd = dev.htod(&w).unwrap();
    let first = dev.dtoh(&quant::quantize_pack::<bf16, bf16>(&dev, &wd, &shape).unwrap().packed).unwrap();
    for _ in 0..5 {
        let again = dev.dtoh(&quant::quantize_pack::<bf16, bf16>(&dev, &wd, &shape).unwrap().packed).unwrap();
        assert_eq!(again, first);
    }
}
