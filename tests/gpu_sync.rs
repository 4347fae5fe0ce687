//! The one-pass weight-sync path on the GPU (issue 5) against the CPU reference, bit for bit:
//! `quantize_to_marlin` equals quantize_pack + repack + permute_scales, `restore_from_marlin`
//! gives back compressed-tensors exactly, the in-place variant, determinism, and bad input.
//! On lowbit-sim (`common::on_sim`) the real shapes shrink (still many grid-stride rounds,
//! channelwise rows of 18432).

mod common;

use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::layout::MarlinWeights;
use lowbit::marlin::sync::{quantize_to_marlin, quantize_to_marlin_into, restore_from_marlin};
use lowbit::reference::marlin as rm;
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Device, Error, Float, ScaleFloat};

const GROUPS: [GroupSize; 4] =
    [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];

fn weights<T: Float>(rng: &mut Rng, shape: &QuantShape) -> Vec<T> {
    let (n, k) = (shape.n, shape.k);
    let mut w: Vec<T> = rng.normal_vec(n * k, 0.05);
    // A zero row, a huge row, a tiny row and a row of exact ties on the s = 1 grid.
    for c in 0..k {
        w[c] = T::from_f32(0.0);
        w[k + c] = T::from_f32(rng.normal() * 3e3);
        w[2 * k + c] = T::from_f32(rng.normal() * 1e-7);
        let tie = if c % shape.group == 0 { 7.0 } else { (c % 14) as f32 * 0.5 - 3.5 };
        w[3 * k + c] = T::from_f32(tie);
    }
    w
}

fn check<T: Float, S: ScaleFloat>(dev: &Device, n: usize, k: usize, g: GroupSize, seed: u64) {
    let shape = QuantShape::new(n, k, g).unwrap();
    let mut rng = Rng::new(seed);
    let w: Vec<T> = weights(&mut rng, &shape);
    let what = format!("{}/{} {n}x{k} g={g}", T::DTYPE, S::DTYPE);
    let (want_q, want_s) = rm::quantize_to_marlin::<T, S>(&w, &shape).unwrap();
    let wd = dev.htod(&w).unwrap();
    let m = quantize_to_marlin::<T, S>(dev, &wd, &shape).unwrap();
    assert!(dev.dtoh(m.qweight()).unwrap() == want_q, "qweight {what}");
    common::assert_bits_eq(&format!("scales {what}"), &dev.dtoh(m.scales()).unwrap(), &want_s);
    // Restore == the compressed-tensors export of the same weights.
    let (packed, scales) = rq::quantize_pack::<T, S>(&w, &shape).unwrap();
    let r = restore_from_marlin(dev, &m).unwrap();
    assert!(dev.dtoh(&r.packed).unwrap() == packed, "restore packed {what}");
    common::assert_bits_eq(&format!("restore scales {what}"), &dev.dtoh(&r.scales).unwrap(), &scales);
    // The GPU multi-step path agrees too, and a second run is bit-identical.
    let multi =
        MarlinWeights::from_packed(dev, &lowbit::quant::quantize_pack::<T, S>(dev, &wd, &shape).unwrap()).unwrap();
    assert!(dev.dtoh(multi.qweight()).unwrap() == want_q, "multi-step {what}");
    let again = quantize_to_marlin::<T, S>(dev, &wd, &shape).unwrap();
    assert!(dev.dtoh(again.qweight()).unwrap() == want_q, "determinism {what}");
}

#[test]
fn quantize_to_marlin_matches_the_reference() {
    let dev = gpu_or_skip!();
    for (i, (n, k)) in [(64, 16), (64, 32), (128, 96), (192, 272), (256, 1024), (128, 4224)].into_iter().enumerate() {
        for g in GROUPS {
            if g.resolve("t", k).is_err() {
                continue;
            }
            check::<bf16, bf16>(&dev, n, k, g, i as u64);
            check::<f16, f16>(&dev, n, k, g, 10 + i as u64);
            check::<bf16, f16>(&dev, n, k, g, 20 + i as u64);
            check::<f32, bf16>(&dev, n, k, g, 30 + i as u64);
        }
    }
}

#[test]
fn real_shapes() {
    let dev = gpu_or_skip!();
    // Kimi-K2 experts (g = 32): w13 [2·2048, 7168], w2 [7168, 2048]; a large dense layer.
    let full: &[(usize, usize, GroupSize)] = &[
        (4096, 7168, GroupSize::Group(32)),
        (7168, 2048, GroupSize::Group(32)),
        (18432, 7168, GroupSize::Group(128)),
        (7168, 18432, GroupSize::Channelwise),
    ];
    let sim: &[(usize, usize, GroupSize)] = &[(2048, 2048, GroupSize::Group(32)), (128, 18432, GroupSize::Channelwise)];
    for (i, &(n, k, g)) in common::pick(&dev, full, sim).iter().enumerate() {
        check::<bf16, bf16>(&dev, n, k, g, 1 + i as u64);
    }
}

#[test]
fn into_existing_buffers_and_errors_zero_them() {
    let dev = gpu_or_skip!();
    let shape = QuantShape::new(128, 256, GroupSize::Group(32)).unwrap();
    let mut rng = Rng::new(5);
    let w1: Vec<bf16> = weights(&mut rng, &shape);
    let w2: Vec<bf16> = weights(&mut rng, &shape);
    let mut m = quantize_to_marlin::<bf16, bf16>(&dev, &dev.htod(&w1).unwrap(), &shape).unwrap();
    quantize_to_marlin_into(&dev, &mut m, &dev.htod(&w2).unwrap()).unwrap();
    let (want_q, want_s) = rm::quantize_to_marlin::<bf16, bf16>(&w2, &shape).unwrap();
    assert!(dev.dtoh(m.qweight()).unwrap() == want_q);
    common::assert_bits_eq("into scales", &dev.dtoh(m.scales()).unwrap(), &want_s);

    // A NaN weight: typed error naming the element, buffers zeroed.
    let mut bad = w2.clone();
    bad[3 * 256 + 77] = bf16::NAN;
    match quantize_to_marlin_into(&dev, &mut m, &dev.htod(&bad).unwrap()) {
        Err(Error::NonFinite { row: 3, col: 77, .. }) => {}
        other => panic!("{other:?}"),
    }
    assert!(dev.dtoh(m.qweight()).unwrap().iter().all(|&x| x == 0));
    assert!(dev.dtoh(m.scales()).unwrap().iter().all(|x| x.to_bits() == 0));
    // Channelwise (two-pass) path reports it too.
    let cw = QuantShape::new(64, 256, GroupSize::Channelwise).unwrap();
    let mut nan = vec![0.5f32; 64 * 256];
    nan[5 * 256 + 200] = f32::INFINITY;
    assert!(matches!(
        quantize_to_marlin::<f32, bf16>(&dev, &dev.htod(&nan).unwrap(), &cw),
        Err(Error::NonFinite { row: 5, col: 200, .. })
    ));
    // f16 scales cannot hold the scale of 1e6 weights.
    let big = vec![1e6f32; 64 * 256];
    assert!(matches!(
        quantize_to_marlin::<f32, f16>(&dev, &dev.htod(&big).unwrap(), &cw),
        Err(Error::ScaleOverflow { row: 0, group: 0, .. })
    ));
    // Wrong lengths / shapes / act-order destinations.
    let short = dev.htod(&w1[..1000]).unwrap();
    assert!(matches!(quantize_to_marlin::<bf16, bf16>(&dev, &short, &shape), Err(Error::Length { .. })));
    assert!(matches!(quantize_to_marlin_into(&dev, &mut m, &short), Err(Error::Length { .. })));
    let odd = QuantShape::new(96, 256, GroupSize::Group(32)).unwrap();
    let wo = dev.htod(&vec![bf16::ONE; 96 * 256]).unwrap();
    assert!(matches!(quantize_to_marlin::<bf16, bf16>(&dev, &wo, &odd), Err(Error::Shape { .. })));
    let p: Vec<i32> = (0..256).rev().collect();
    let (q, s) = (vec![0i32; 128 * 256 / 8], vec![bf16::ONE; shape.scales_len()]);
    let mut act = MarlinWeights::from_host_marlin(&dev, &q, &s, Some(&p), &shape).unwrap();
    assert!(matches!(
        quantize_to_marlin_into(&dev, &mut act, &dev.htod(&w1).unwrap()),
        Err(Error::InvalidArgument { .. })
    ));
}
