//! CPU reference tests for the INT4 QAT grid (DESIGN §3): the consistency property, rounding,
//! edge cases, formats and bad input. Runs everywhere.
//!
//! The sequential CPU emulation of the kernels' index arithmetic that used to live here is retired
//! (DESIGN §7): `tests/gpu_quant.rs` on lowbit-sim runs the real kernels, bit for bit against these
//! references, with the simulator's bounds, race, barrier and initialisation checks on every
//! launch.

use lowbit::format::{self, GroupSize, QuantShape};
use lowbit::reference::quant::{self as rq, SteMode};
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Error, Float, ScaleFloat};

const GROUPS: [GroupSize; 4] =
    [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];

fn bits<T: Float>(v: &[T]) -> Vec<u32> {
    v.iter().map(|x| x.to_f32().to_bits()).collect()
}

/// Weights with the awkward cases mixed in: zero rows, huge and tiny magnitudes, exact ties.
fn awkward_weights<T: Float>(rng: &mut Rng, n: usize, k: usize) -> Vec<T> {
    let mut w: Vec<T> = rng.normal_vec(n * k, 0.02);
    w[..k].fill(T::from_f32(0.0)); // row 0: all zeros
    if n > 2 {
        for c in 0..k {
            w[k + c] = T::from_f32(rng.normal() * 1e4); // row 1: huge
            w[2 * k + c] = T::from_f32(rng.normal() * 1e-7); // row 2: tiny (below the 1e-5 scale floor)
        }
    }
    if n > 3 {
        // row 3: amax = 7 in every group → s = 1, and half-integers to exercise ties.
        for c in 0..k {
            let v = if c % 32 == 0 { 7.0 } else { ((c % 15) as f32 - 7.0) + 0.5 * (c % 2) as f32 };
            w[3 * k + c] = T::from_f32(v.clamp(-7.0, 7.0));
        }
    }
    w
}

fn consistency<T: Float, S: ScaleFloat>() {
    let mut rng = Rng::new(7);
    for (n, k) in [(5, 256), (8, 384), (3, 1024), (16, 128)] {
        for g in GROUPS {
            let Ok(shape) = QuantShape::new(n, k, g) else { continue };
            let w: Vec<T> = awkward_weights(&mut rng, n, k);
            let fq = rq::fake_quant::<T, S>(&w, &shape).unwrap();
            let (packed, scales) = rq::quantize_pack::<T, S>(&w, &shape).unwrap();
            let dq = rq::dequantize::<T, S>(&packed, &scales, &shape).unwrap();
            assert_eq!(bits(&fq), bits(&dq), "{}/{} n={n} k={k} g={g}", T::DTYPE, S::DTYPE);
            // Fake quantization is idempotent: the grid maps onto itself.
            let fq2 = rq::fake_quant::<T, S>(&fq, &shape).unwrap();
            if S::DTYPE == lowbit::DType::BF16 && T::DTYPE != lowbit::DType::F16 {
                assert_eq!(bits(&fq), bits(&fq2), "idempotence {}/{}", T::DTYPE, S::DTYPE);
            }
            // Codes stay on the 15-level grid; −8 (nibble 0) is never produced.
            for w in &packed {
                for q in format::unpack8(*w) {
                    assert!((-7..=7).contains(&q));
                }
            }
        }
    }
}

#[test]
fn fake_quant_equals_dequantize_of_quantize_pack_for_every_dtype() {
    consistency::<bf16, bf16>();
    consistency::<f16, f16>();
    consistency::<f32, bf16>();
    consistency::<f32, f16>();
    consistency::<bf16, f16>();
    consistency::<f16, bf16>();
}

#[test]
fn scale_is_amax_over_7_rounded_to_the_scale_dtype() {
    let shape = QuantShape::new(1, 32, GroupSize::Group(32)).unwrap();
    let mut w = vec![0f32; 32];
    w[5] = -3.3;
    let q = rq::quantize::<f32, bf16>(&w, &shape).unwrap();
    assert_eq!(q.scales[0], bf16::from_f32(3.3f32 / 7.0));
    let q16 = rq::quantize::<f32, f16>(&w, &shape).unwrap();
    assert_eq!(q16.scales[0], f16::from_f32(3.3f32 / 7.0));
    // The code is computed with the stored (rounded) scale.
    let s = q.scales[0].to_f32();
    assert_eq!(q.codes[5] as f32, (-3.3f32 / s).round_ties_even().clamp(-7.0, 7.0));
}

#[test]
fn ties_round_half_to_even() {
    let shape = QuantShape::new(1, 32, GroupSize::Group(32)).unwrap();
    let mut w = vec![0f32; 32];
    w[0] = 7.0; // s = 1
    let ties = [0.5f32, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, -0.5, -1.5, -2.5, -6.5];
    let want = [0i8, 2, 2, 4, 4, 6, 6, 0, -2, -2, -6];
    w[1..1 + ties.len()].copy_from_slice(&ties);
    let q = rq::quantize::<f32, bf16>(&w, &shape).unwrap();
    assert_eq!(&q.codes[1..1 + ties.len()], &want);
}

#[test]
fn clip_mask_backward() {
    let shape = QuantShape::new(2, 64, GroupSize::Group(32)).unwrap();
    let mut rng = Rng::new(3);
    let w: Vec<bf16> = rng.normal_vec(128, 1.0);
    let dy: Vec<bf16> = rng.normal_vec(128, 1.0);
    let id = rq::fake_quant_bwd::<bf16, bf16>(&dy, &w, &shape, SteMode::Identity).unwrap();
    assert_eq!(id, dy);
    // With scale = bf16(amax/7) the largest element lands within one bf16 ulp of ±7, so nothing
    // is clipped and ClipMask equals Identity on ordinary weights...
    let cm = rq::fake_quant_bwd::<bf16, bf16>(&dy, &w, &shape, SteMode::ClipMask).unwrap();
    for e in 0..128 {
        let s = rq::quantize::<bf16, bf16>(&w, &shape).unwrap().scales[e / 32].to_f32();
        let clipped = rq::code(w[e].to_f32(), s).1;
        assert_eq!(cm[e].to_f32(), if clipped { 0.0 } else { dy[e].to_f32() });
    }
    // ...and the mask is exact where the code is clipped: a scale rounded down far enough.
    assert!(rq::code(7.6, 1.0).1);
    assert!(!rq::code(7.49, 1.0).1);
    assert!(rq::code(-7.5, 1.0).1); // rounds to -8, outside the grid
}

#[test]
fn compressed_tensors_and_gptq_layouts_are_transposes() {
    let mut rng = Rng::new(11);
    let shape = QuantShape::new(64, 256, GroupSize::Group(128)).unwrap();
    let w: Vec<bf16> = rng.normal_vec(shape.numel(), 0.1);
    let (packed, scales) = rq::quantize_pack::<bf16, bf16>(&w, &shape).unwrap();
    let qweight = rq::ct_to_gptq(&packed, &shape).unwrap();
    for r in 0..shape.k / 8 {
        for n in 0..shape.n {
            assert_eq!(qweight[r * shape.n + n], packed[n * (shape.k / 8) + r]);
        }
    }
    assert_eq!(rq::gptq_to_ct(&qweight, &shape).unwrap(), packed);
    let st = rq::transpose(&scales, shape.n, shape.groups_per_row()).unwrap();
    assert_eq!(rq::transpose(&st, shape.groups_per_row(), shape.n).unwrap(), scales);
}

#[test]
fn pack_unpack_round_trip_and_bad_codes() {
    let shape = QuantShape::new(2, 32, GroupSize::Channelwise).unwrap();
    let codes: Vec<i8> = (0..64).map(|i| (i % 15) as i8 - 7).collect();
    let packed = format::pack(&codes, &shape).unwrap();
    assert_eq!(format::unpack(&packed, &shape).unwrap(), codes);
    let mut bad = codes.clone();
    bad[3] = -8;
    assert!(matches!(format::pack(&bad, &shape), Err(Error::InvalidArgument { .. })));
}

#[test]
fn bad_input_is_a_typed_error() {
    assert!(matches!(QuantShape::new(4, 100, GroupSize::Group(32)), Err(Error::Shape { .. })));
    assert!(matches!(QuantShape::new(4, 96, GroupSize::Group(64)), Err(Error::Shape { .. })));
    assert!(matches!(QuantShape::new(4, 96, GroupSize::Group(48)), Err(Error::InvalidArgument { .. })));
    let shape = QuantShape::new(2, 64, GroupSize::Group(32)).unwrap();
    let w = vec![bf16::ONE; 100];
    assert!(matches!(rq::quantize::<bf16, bf16>(&w, &shape), Err(Error::Length { expected: 128, got: 100, .. })));
    let mut w = vec![bf16::ONE; 128];
    w[70] = bf16::INFINITY;
    assert!(matches!(rq::quantize::<bf16, bf16>(&w, &shape), Err(Error::NonFinite { row: 1, col: 6, .. })));
    let (packed, scales) = rq::quantize_pack::<bf16, bf16>(&vec![bf16::ONE; 128], &shape).unwrap();
    assert!(matches!(rq::dequantize::<bf16, bf16>(&packed[1..], &scales, &shape), Err(Error::Length { .. })));
}
