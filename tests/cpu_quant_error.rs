//! Error bounds of the INT4 grid (DESIGN §3), from the math rather than from the implementation:
//! every weight lands within half a quantization step of its fake-quantized value (plus the one
//! rounding to the output dtype), and a group's largest weight within rounding of ±7·s.

use approx::assert_abs_diff_eq;
use lowbit::format::{GroupSize, QuantShape};
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Float, ScaleFloat};

/// Unit roundoff of the output dtype (half an ulp at 1.0).
fn unit_roundoff<T: Float>() -> f64 {
    match T::DTYPE {
        lowbit::DType::BF16 => 2f64.powi(-8),
        lowbit::DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

fn check_bounds<T: Float, S: ScaleFloat>(std: f32, shape: QuantShape, seed: u64) {
    let mut rng = Rng::new(seed);
    let w: Vec<T> = rng.normal_vec(shape.numel(), std);
    let q = rq::quantize::<T, S>(&w, &shape).unwrap();
    let u = unit_roundoff::<T>();
    let gpr = shape.groups_per_row();
    for (e, (x, y)) in w.iter().zip(&q.fake_quant).enumerate() {
        let s = q.scales[(e / shape.k) * gpr + (e % shape.k) / shape.group].to_f32() as f64;
        let (x, y) = (x.to_f32() as f64, y.to_f32() as f64);
        let qs = q.codes[e] as f64 * s;
        // Half a step (the f32 quotient may sit a hair past the midpoint), then one rounding of q·s.
        assert_abs_diff_eq!(x, qs, epsilon = 0.5 * s * (1.0 + 1e-6));
        assert_abs_diff_eq!(y, qs, epsilon = qs.abs() * u);
    }
    // The largest magnitude of each group maps to ±7 (the scale is amax/7 rounded to S).
    for g in 0..shape.n * gpr {
        let (row, j) = (g / gpr, g % gpr);
        let cols = (j * shape.group)..((j + 1) * shape.group);
        let (amax_at, amax) = cols
            .map(|c| (row * shape.k + c, w[row * shape.k + c].to_f32().abs()))
            .fold((0, -1f32), |a, b| if b.1 > a.1 { b } else { a });
        if amax > 7e-5 {
            assert_eq!(q.codes[amax_at].abs(), 7, "group {g}: amax {amax}");
        }
    }
}

#[test]
fn every_weight_is_within_half_a_step() {
    for (i, g) in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise]
        .into_iter()
        .enumerate()
    {
        let shape = QuantShape::new(48, 512, g).unwrap();
        check_bounds::<bf16, bf16>(0.02, shape, i as u64);
        check_bounds::<f16, f16>(0.5, shape, 10 + i as u64);
        check_bounds::<f32, bf16>(3.0, shape, 20 + i as u64);
        check_bounds::<f32, f16>(1e-3, shape, 30 + i as u64);
    }
}
