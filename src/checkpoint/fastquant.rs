//! The CPU quantizer of `lowbit quantize`: the grid of DESIGN §3, bit-identical to
//! [`crate::reference::quant::quantize_pack`], written so the compiler vectorises it.
//!
//! Per row: decode the weights to f32 once; per group, `amax` with a branch-free max and a
//! non-finite flag; the stored scale by the reference's own [`group_scale`]; the codes by an exact
//! round-half-to-even that inlines: the quotient `y = w / s` is bounded by about 7.1 in magnitude
//! (|w| ≤ amax and `s` is `amax / 7` rounded to 16 bits, or the `1e-5` floor when `amax` is
//! smaller), so `t = y + 1.5·2²³` lies in `[2²³, 2²⁴)`, where the f32 spacing is exactly 1: the
//! addition itself rounds `y` to the nearest integer, ties to even (the IEEE default mode), and
//! `bits(t) − bits(1.5·2²³)` is that integer. No libm call, no per-element branch. The division
//! is a true IEEE division (never a reciprocal multiply), as in the reference, so every code is
//! the reference's. On x86-64 the same code is also compiled with AVX2 and chosen at run time.
//! Output bytes go straight into the little-endian tensors (no intermediate code array).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::dtype::ScaleFloat;
use crate::error::{Error, Result};
use crate::format::{QuantShape, QMAX};
use crate::reference::quant::group_scale;

/// `1.5 · 2²³`: adding it rounds any |y| < 2²² to an integer, ties to even.
const MAGIC: f32 = 12_582_912.0;

/// Rows per parallel work item: about a million weights.
const CHUNK_ELEMS: usize = 1 << 20;

/// Input element types: little-endian bytes → f32 (exact for all three).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Input {
    Bf16,
    F16,
    F32,
}

impl Input {
    fn size(self) -> usize {
        match self {
            Input::Bf16 | Input::F16 => 2,
            Input::F32 => 4,
        }
    }
}

/// Scale types, with their raw bits.
pub(crate) trait ScaleBits: ScaleFloat {
    fn bits(self) -> u16;
}
impl ScaleBits for bf16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}
impl ScaleBits for f16 {
    fn bits(self) -> u16 {
        self.to_bits()
    }
}

#[inline(always)]
fn decode(input: Input, src: &[u8], dst: &mut [f32]) {
    match input {
        Input::Bf16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f32::from_bits((u16::from_le_bytes([s[0], s[1]]) as u32) << 16);
            }
        }
        Input::F16 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                *d = f16::from_bits(u16::from_le_bytes([s[0], s[1]])).to_f32();
            }
        }
        Input::F32 => {
            for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
                *d = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
            }
        }
    }
}

/// `max |x|` and whether any element is NaN or infinite.
#[inline(always)]
fn amax_of(x: &[f32]) -> (f32, bool) {
    let mut m = [0f32; 8];
    let mut bad = [0u32; 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for i in 0..8 {
            let a = c[i].abs();
            m[i] = if a > m[i] { a } else { m[i] };
            bad[i] |= (!a.is_finite()) as u32;
        }
    }
    for (i, &v) in chunks.remainder().iter().enumerate() {
        let a = v.abs();
        m[i] = if a > m[i] { a } else { m[i] };
        bad[i] |= (!a.is_finite()) as u32;
    }
    let amax = m.iter().fold(0f32, |acc, &v| if v > acc { v } else { acc });
    (amax, bad.iter().any(|&b| b != 0))
}

/// Codes of one group, two per byte (element `2i` in the low nibble): the compressed-tensors
/// packing, since word `w` holds elements `8w..8w+8` at bits `4i` and is stored little-endian.
#[inline(always)]
fn codes_into(x: &[f32], s: f32, out: &mut [u8]) {
    let bias = MAGIC.to_bits() as i32;
    let q = QMAX;
    let code = |v: f32| -> u8 { (((v / s + MAGIC).to_bits() as i32 - bias).clamp(-q, q) + 8) as u8 };
    for (o, p) in out.iter_mut().zip(x.chunks_exact(2)) {
        *o = code(p[0]) | (code(p[1]) << 4);
    }
}

/// Quantizes `rows` rows (global index of the first: `row0`) into their packed bytes and scale
/// bytes.
#[inline(always)]
fn rows_body<S: ScaleBits>(
    input: Input,
    src: &[u8],
    k: usize,
    g: usize,
    row0: usize,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    const OP: &str = "quantize";
    let mut buf = vec![0f32; k];
    let gpr = k / g;
    let esize = input.size();
    for (r, ((row, prow), srow)) in src
        .chunks_exact(k * esize)
        .zip(packed.chunks_exact_mut(k / 2))
        .zip(scales.chunks_exact_mut(2 * gpr))
        .enumerate()
    {
        decode(input, row, &mut buf);
        for (j, (x, pg)) in buf.chunks_exact(g).zip(prow.chunks_exact_mut(g / 2)).enumerate() {
            let (amax, bad) = amax_of(x);
            if bad || !amax.is_finite() {
                let col = x.iter().position(|v| !v.is_finite()).unwrap_or(0);
                return Err(Error::NonFinite { op: OP, row: row0 + r, col: j * g + col });
            }
            let s: S = group_scale(amax);
            let sf = s.to_f32();
            if !sf.is_finite() {
                return Err(Error::ScaleOverflow { op: OP, row: row0 + r, group: j });
            }
            srow[2 * j..2 * j + 2].copy_from_slice(&s.bits().to_le_bytes());
            codes_into(x, sf, pg);
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn rows_avx2<S: ScaleBits>(
    input: Input,
    src: &[u8],
    k: usize,
    g: usize,
    row0: usize,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    rows_body::<S>(input, src, k, g, row0, packed, scales)
}

fn rows<S: ScaleBits>(
    input: Input,
    src: &[u8],
    k: usize,
    g: usize,
    row0: usize,
    packed: &mut [u8],
    scales: &mut [u8],
) -> Result<()> {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above). AVX2 changes no result: Rust never
        // contracts a*b+c into an FMA, and the code uses only exact IEEE operations.
        return unsafe { rows_avx2::<S>(input, src, k, g, row0, packed, scales) };
    }
    rows_body::<S>(input, src, k, g, row0, packed, scales)
}

/// Quantizes a weight matrix given as little-endian bytes: returns `(weight_packed bytes,
/// weight_scale bytes)`, identical to the reference's output encoded little-endian. Rows are
/// processed in parallel; the first error in row-major order is returned, as by the reference.
pub(crate) fn quantize_pack_bytes<S: ScaleBits>(
    src: &[u8],
    input: Input,
    shape: &QuantShape,
) -> Result<(Vec<u8>, Vec<u8>)> {
    let (n, k, g) = (shape.n, shape.k, shape.group);
    if src.len() != n * k * input.size() {
        return Err(Error::invalid("quantize", format!("{} bytes for {n}×{k} weights", src.len())));
    }
    if k == 0 || g == 0 || k % g != 0 || g % 8 != 0 {
        return Err(Error::invalid("quantize", format!("K = {k} and group {g} do not fit the packing")));
    }
    let gpr = k / g;
    let mut packed = vec![0u8; n * k / 2];
    let mut scales = vec![0u8; n * gpr * 2];
    let rows_per = (CHUNK_ELEMS / k).max(1);
    let results: Vec<Result<()>> = src
        .par_chunks(rows_per * k * input.size())
        .zip(packed.par_chunks_mut(rows_per * k / 2))
        .zip(scales.par_chunks_mut(rows_per * gpr * 2))
        .enumerate()
        .map(|(i, ((s, p), sc))| rows::<S>(input, s, k, g, i * rows_per, p, sc))
        .collect();
    results.into_iter().collect::<Result<Vec<()>>>()?;
    Ok((packed, scales))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::Float;
    use crate::format::GroupSize;
    use crate::reference::quant;
    use crate::reference::rng::Rng;

    fn check<T: Float, S: ScaleBits>(w: &[T], bytes: &[u8], input: Input, shape: &QuantShape) {
        let (rp, rs) = quant::quantize_pack::<T, S>(w, shape).unwrap();
        let (p, s) = quantize_pack_bytes::<S>(bytes, input, shape).unwrap();
        let rp: Vec<u8> = rp.iter().flat_map(|x| x.to_le_bytes()).collect();
        let rs: Vec<u8> = rs.iter().flat_map(|x| x.bits().to_le_bytes()).collect();
        assert!(p == rp, "packed differs");
        assert!(s == rs, "scales differ");
    }

    #[test]
    fn bit_identical_to_the_reference() {
        let mut rng = Rng::new(3);
        for (n, k, gs) in [
            (3usize, 256usize, GroupSize::Group(32)),
            (5, 128, GroupSize::Group(128)),
            (4, 192, GroupSize::Group(64)),
            (2, 200, GroupSize::Channelwise),
        ] {
            let shape = QuantShape::new(n, k, gs).unwrap();
            let mut w: Vec<bf16> = rng.normal_vec(n * k, 0.02);
            // Ties and edge cases: exact multiples of half a step, zeros, a zero group (the floor),
            // tiny values (the floor again), huge values.
            w[0] = bf16::from_f32(7.0);
            w[1] = bf16::from_f32(0.5);
            w[2] = bf16::from_f32(-2.5);
            w[3] = bf16::from_f32(1.5);
            w[4] = bf16::from_f32(-0.0);
            for x in w[k..k + 32].iter_mut() {
                *x = bf16::from_f32(0.0);
            }
            for x in w[k + 32..k + 64].iter_mut() {
                *x = bf16::from_f32(3e-6);
            }
            w[(n - 1) * k + 5] = bf16::from_f32(3.0e38);
            let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            check::<bf16, bf16>(&w, &bytes, Input::Bf16, &shape);
            let wh: Vec<f16> = rng.normal_vec(n * k, 0.5);
            let bytes: Vec<u8> = wh.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
            check::<f16, f16>(&wh, &bytes, Input::F16, &shape);
            let wf: Vec<f32> = rng.normal_vec(n * k, 3.0);
            let bytes: Vec<u8> = wf.iter().flat_map(|x| x.to_le_bytes()).collect();
            check::<f32, bf16>(&wf, &bytes, Input::F32, &shape);
        }
    }

    #[test]
    fn every_bf16_value_codes_like_the_reference() {
        // All 65536 bf16 bit patterns that are finite, spread over groups with varied scales.
        let vals: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).filter(|v| v.to_f32().is_finite()).collect();
        let k = 64;
        let n = vals.len() / k;
        let w = &vals[..n * k];
        let shape = QuantShape::new(n, k, GroupSize::Group(32)).unwrap();
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        check::<bf16, bf16>(w, &bytes, Input::Bf16, &shape);
    }

    #[test]
    fn errors_match_the_reference() {
        let shape = QuantShape::new(4, 64, GroupSize::Group(32)).unwrap();
        let mut w = vec![bf16::from_f32(0.1); 4 * 64];
        w[2 * 64 + 40] = bf16::NAN;
        w[3 * 64 + 1] = bf16::INFINITY;
        let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
        let e = quantize_pack_bytes::<bf16>(&bytes, Input::Bf16, &shape).unwrap_err();
        let r = quant::quantize_pack::<bf16, bf16>(&w, &shape).unwrap_err();
        assert_eq!(e.to_string(), r.to_string());
        let w = vec![f16::from_f32(60000.0); 4 * 64];
        let wf: Vec<f32> = w.iter().map(|x| x.to_f32() * 100.0).collect();
        let bytes: Vec<u8> = wf.iter().flat_map(|x| x.to_le_bytes()).collect();
        let e = quantize_pack_bytes::<f16>(&bytes, Input::F32, &shape).unwrap_err();
        let r = quant::quantize_pack::<f32, f16>(&wf, &shape).unwrap_err();
        assert_eq!(e.to_string(), r.to_string());
    }
}
