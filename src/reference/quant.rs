//! The symmetric INT4 QAT grid of DESIGN §3, on the CPU.
//!
//! For each row `n` and group `j` of `g` consecutive weights along K:
//! `amax = max |W[n, jg..jg+g)|` (f32); `s32 = max(amax / 7, 1e-5)`; the stored scale is
//! `s = S(s32)` rounded to nearest even; `q = clamp(round_half_even(W / f32(s)), -7, 7)` in f32;
//! `dequant = T(q · f32(s))`.

use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::format::{self, check_len, QuantShape, MIN_SCALE, QMAX};

/// The straight-through estimator used by the fake-quant backward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum SteMode {
    /// `dW = dY` everywhere (slime / Kimi K2).
    #[default]
    Identity,
    /// `dW = dY` where the weight was inside the grid, 0 where rounding fell outside `[-7, 7]` and
    /// was clipped (torchao style).
    ClipMask,
}

/// The stored scale of a group whose largest magnitude is `amax`.
pub fn group_scale<S: ScaleFloat>(amax: f32) -> S {
    let s32 = (amax / QMAX as f32).max(MIN_SCALE);
    S::from_f32(s32)
}

/// The code of `w` under stored scale `s`, and whether it was clipped to the grid.
#[inline]
pub fn code(w: f32, s: f32) -> (i8, bool) {
    let q = (w / s).round_ties_even();
    let clipped = !(q >= -(QMAX as f32) && q <= QMAX as f32);
    (q.clamp(-(QMAX as f32), QMAX as f32) as i8, clipped)
}

/// Everything the forward pass produces for one weight matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantized<T, S> {
    /// `dequant(quant(W))` in the weight dtype, `[N, K]`.
    pub fake_quant: Vec<T>,
    /// Codes `q ∈ [-7, 7]`, `[N, K]`.
    pub codes: Vec<i8>,
    /// Stored scales, `[N, K/g]`.
    pub scales: Vec<S>,
}

/// Computes every group's scale and every weight's code, checking that all weights are finite and
/// all scales representable.
pub fn quantize<T: Float, S: ScaleFloat>(w: &[T], shape: &QuantShape) -> Result<Quantized<T, S>> {
    const OP: &str = "quantize";
    check_len(OP, "weights", w.len(), shape.numel())?;
    let (k, g) = (shape.k, shape.group);
    let mut codes = vec![0i8; shape.numel()];
    let mut fq = vec![T::default(); shape.numel()];
    let mut scales = Vec::with_capacity(shape.scales_len());
    for n in 0..shape.n {
        for j in 0..shape.groups_per_row() {
            let cols = j * g..(j + 1) * g;
            let mut amax = 0f32;
            for c in cols.clone() {
                let x = w[n * k + c].to_f32();
                if !x.is_finite() {
                    return Err(Error::NonFinite { op: OP, row: n, col: c });
                }
                amax = amax.max(x.abs());
            }
            let s: S = group_scale(amax);
            let sf = s.to_f32();
            if !sf.is_finite() {
                return Err(Error::ScaleOverflow { op: OP, row: n, group: j });
            }
            scales.push(s);
            for c in cols {
                let (q, _) = code(w[n * k + c].to_f32(), sf);
                codes[n * k + c] = q;
                fq[n * k + c] = T::from_f32(q as f32 * sf);
            }
        }
    }
    Ok(Quantized { fake_quant: fq, codes, scales })
}

/// `fake_quant(W)`: W rounded to the INT4 grid, in W's dtype.
pub fn fake_quant<T: Float, S: ScaleFloat>(w: &[T], shape: &QuantShape) -> Result<Vec<T>> {
    Ok(quantize::<T, S>(w, shape)?.fake_quant)
}

/// compressed-tensors `weight_packed` `[N, K/8]` and `weight_scale` `[N, K/g]`.
pub fn quantize_pack<T: Float, S: ScaleFloat>(w: &[T], shape: &QuantShape) -> Result<(Vec<i32>, Vec<S>)> {
    let q = quantize::<T, S>(w, shape)?;
    Ok((format::pack(&q.codes, shape)?, q.scales))
}

/// `T(q · s)` for every element of packed codes with their scales.
pub fn dequantize<T: Float, S: ScaleFloat>(packed: &[i32], scales: &[S], shape: &QuantShape) -> Result<Vec<T>> {
    check_len("dequantize", "scales", scales.len(), shape.scales_len())?;
    let codes = format::unpack(packed, shape)?;
    let gpr = shape.groups_per_row();
    Ok(codes
        .iter()
        .enumerate()
        .map(|(e, &q)| {
            let (n, c) = (e / shape.k, e % shape.k);
            T::from_f32(q as f32 * scales[n * gpr + c / shape.group].to_f32())
        })
        .collect())
}

/// The straight-through backward pass: `dW` from `dY` (and, for ClipMask, the weights).
pub fn fake_quant_bwd<T: Float, S: ScaleFloat>(
    grad: &[T],
    w: &[T],
    shape: &QuantShape,
    mode: SteMode,
) -> Result<Vec<T>> {
    const OP: &str = "fake_quant_bwd";
    check_len(OP, "grad", grad.len(), shape.numel())?;
    check_len(OP, "weights", w.len(), shape.numel())?;
    match mode {
        SteMode::Identity => Ok(grad.to_vec()),
        SteMode::ClipMask => {
            let q = quantize::<T, S>(w, shape)?;
            let gpr = shape.groups_per_row();
            Ok((0..shape.numel())
                .map(|e| {
                    let s = q.scales[(e / shape.k) * gpr + (e % shape.k) / shape.group].to_f32();
                    let (_, clipped) = code(w[e].to_f32(), s);
                    if clipped {
                        T::from_f32(0.0)
                    } else {
                        grad[e]
                    }
                })
                .collect())
        }
    }
}

/// Row-major `[rows, cols]` → `[cols, rows]`.
pub fn transpose<E: Copy>(src: &[E], rows: usize, cols: usize) -> Result<Vec<E>> {
    check_len("transpose", "src", src.len(), rows * cols)?;
    let mut dst = Vec::with_capacity(src.len());
    for c in 0..cols {
        for r in 0..rows {
            dst.push(src[r * cols + c]);
        }
    }
    Ok(dst)
}

/// compressed-tensors `weight_packed` `[N, K/8]` → GPTQ `qweight` `[K/8, N]`
/// (`qweight[r, n] == weight_packed[n, r]`).
pub fn ct_to_gptq(packed: &[i32], shape: &QuantShape) -> Result<Vec<i32>> {
    check_len("ct_to_gptq", "packed", packed.len(), shape.packed_len())?;
    transpose(packed, shape.n, shape.k / format::PACK)
}

/// GPTQ `qweight` `[K/8, N]` → compressed-tensors `weight_packed` `[N, K/8]`.
pub fn gptq_to_ct(qweight: &[i32], shape: &QuantShape) -> Result<Vec<i32>> {
    check_len("gptq_to_ct", "qweight", qweight.len(), shape.packed_len())?;
    transpose(qweight, shape.k / format::PACK, shape.n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::GroupSize;
    use half::bf16;

    #[test]
    fn grid_of_a_simple_group() {
        // amax = 7 → s = 1 exactly; values round half to even.
        let shape = QuantShape::new(1, 32, GroupSize::Group(32)).unwrap();
        let mut w = vec![0f32; 32];
        w[0] = 7.0;
        w[1] = 2.5; // tie → 2
        w[2] = 3.5; // tie → 4
        w[3] = -2.5; // tie → -2
        w[4] = -0.0;
        let q = quantize::<f32, bf16>(&w, &shape).unwrap();
        assert_eq!(q.scales[0].to_f32(), 1.0);
        assert_eq!(&q.codes[..5], &[7, 2, 4, -2, 0]);
        assert_eq!(&q.fake_quant[..5], &[7.0, 2.0, 4.0, -2.0, 0.0]);
        assert!(q.fake_quant[4].is_sign_positive());
    }

    #[test]
    fn zero_row_uses_min_scale() {
        let shape = QuantShape::new(2, 64, GroupSize::Channelwise).unwrap();
        let q = quantize::<bf16, bf16>(&vec![bf16::ZERO; 128], &shape).unwrap();
        assert_eq!(q.scales, vec![bf16::from_f32(1e-5); 2]);
        assert!(q.codes.iter().all(|&c| c == 0));
    }

    #[test]
    fn non_finite_is_an_error() {
        let shape = QuantShape::new(2, 32, GroupSize::Group(32)).unwrap();
        let mut w = vec![1f32; 64];
        w[40] = f32::NAN;
        match quantize::<f32, bf16>(&w, &shape) {
            Err(Error::NonFinite { row: 1, col: 8, .. }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn f16_scale_overflow_is_an_error() {
        let shape = QuantShape::new(1, 32, GroupSize::Group(32)).unwrap();
        let w = vec![1e6f32; 32];
        assert!(matches!(quantize::<f32, half::f16>(&w, &shape), Err(Error::ScaleOverflow { row: 0, group: 0, .. })));
    }
}
