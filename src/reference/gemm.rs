//! The W4A16 GEMM on the CPU, from the math (DESIGN §4): `Y[M, N] = X[M, K] · Wᵀ` with
//! `W[N, K]` the dequantized weights `T(q · s)`, accumulated in f64; and the MoE expert GEMM
//! per routed slot.
//!
//! Weights come back from the Marlin layout only through the layout reference's exact inverses
//! ([`crate::reference::marlin::marlin_to_ct`], [`crate::reference::marlin::marlin_unpermute_scales`]),
//! never through the GPU kernel's fragment arithmetic.

use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::format::{self, check_len, QuantShape};
use crate::reference::marlin as refm;

/// `T(q · s)` as f32 for codes `[N, K]` and compressed-tensors scales `[N, K/g]`: the weights
/// fake quantization produces.
pub fn dequant_codes<T: Float, S: ScaleFloat>(codes: &[i8], scales: &[S], shape: &QuantShape) -> Result<Vec<f32>> {
    const OP: &str = "dequant_codes";
    check_len(OP, "codes", codes.len(), shape.numel())?;
    check_len(OP, "scales", scales.len(), shape.scales_len())?;
    let (k, g, gpr) = (shape.k, shape.group, shape.groups_per_row());
    Ok((0..shape.numel())
        .map(|i| {
            let (n, c) = (i / k, i % k);
            let s = scales[n * gpr + c / g].to_f32();
            T::from_f32(codes[i] as f32 * s).to_f32()
        })
        .collect())
}

/// Dequantizes Marlin host data back to `W[N, K]` (source K order) as f32 values of `T(q · s)`.
///
/// `qweight` `[K/16, 2N]`, Marlin-permuted `scales` `[K/g, N]`, optional act-order `perm`
/// (Marlin row `r` holds source row `perm[r]` and belongs to scale group `r / g`).
pub fn marlin_dequant_ref<T: Float, S: ScaleFloat>(
    qweight: &[i32],
    scales: &[S],
    perm: Option<&[i32]>,
    shape: &QuantShape,
) -> Result<Vec<f32>> {
    const OP: &str = "marlin_dequant_ref";
    let (n, k, g) = (shape.n, shape.k, shape.group);
    let packed = refm::marlin_to_ct(qweight, perm, k, n)?; // [N, K/8], source row order
    let codes = format::unpack(&packed, shape)?;
    let gptq_scales = refm::marlin_unpermute_scales(scales, k, n, g)?; // [K/g, N]
                                                                       // Scale group of source row c: the Marlin row holding it, divided by g.
    let marlin_row: Vec<usize> = match perm {
        None => (0..k).collect(),
        Some(p) => {
            refm::check_perm(OP, p, k)?;
            let mut inv = vec![0usize; k];
            for (r, &src) in p.iter().enumerate() {
                inv[src as usize] = r;
            }
            inv
        }
    };
    let mut w = vec![0f32; n * k];
    for nn in 0..n {
        for c in 0..k {
            let s = gptq_scales[(marlin_row[c] / g) * n + nn].to_f32();
            w[nn * k + c] = T::from_f32(codes[nn * k + c] as f32 * s).to_f32();
        }
    }
    Ok(w)
}

fn check_x<X>(op: &'static str, x: &[X], m: usize, k: usize, lda: usize) -> Result<()> {
    if m == 0 || lda < k {
        return Err(Error::shape(op, format!("m = {m}, k = {k}, lda = {lda}")));
    }
    let need = (m - 1) * lda + k;
    if x.len() < need {
        return Err(Error::Length { op, name: "x", expected: need, got: x.len() });
    }
    Ok(())
}

/// `Y[M, N] = X · Wᵀ` in f64: `x` has `m` rows of stride `lda`, `w` is `[N, K]`.
pub fn gemm_ref_f64<X: Float>(x: &[X], m: usize, k: usize, lda: usize, w: &[f32], n: usize) -> Result<Vec<f64>> {
    let rows: Vec<usize> = (0..m).collect();
    let cols: Vec<usize> = (0..n).collect();
    gemm_ref_f64_at(x, m, k, lda, w, n, &rows, &cols)
}

/// The entries `Y[rows[i], cols[j]]` of [`gemm_ref_f64`] only, `[rows.len(), cols.len()]`
/// (for shapes whose full product is too slow on the CPU).
#[allow(clippy::too_many_arguments)]
pub fn gemm_ref_f64_at<X: Float>(
    x: &[X],
    m: usize,
    k: usize,
    lda: usize,
    w: &[f32],
    n: usize,
    rows: &[usize],
    cols: &[usize],
) -> Result<Vec<f64>> {
    const OP: &str = "gemm_ref_f64";
    check_x(OP, x, m, k, lda)?;
    check_len(OP, "w", w.len(), n * k)?;
    if let Some(&r) = rows.iter().find(|&&r| r >= m) {
        return Err(Error::invalid(OP, format!("row {r} >= m = {m}")));
    }
    if let Some(&c) = cols.iter().find(|&&c| c >= n) {
        return Err(Error::invalid(OP, format!("column {c} >= n = {n}")));
    }
    let mut y = Vec::with_capacity(rows.len() * cols.len());
    for &r in rows {
        let xr: Vec<f64> = x[r * lda..r * lda + k].iter().map(|v| v.to_f32() as f64).collect();
        for &c in cols {
            let wr = &w[c * k..(c + 1) * k];
            y.push(xr.iter().zip(wr).map(|(a, b)| a * *b as f64).sum());
        }
    }
    Ok(y)
}

/// The routing blocks of `moe_align_block_size`, on the host.
#[derive(Clone, Copy, Debug)]
pub struct MoeBlocksRef<'a> {
    pub sorted_token_ids: &'a [i32],
    pub expert_ids: &'a [i32],
    pub num_tokens_post_padded: usize,
    pub block_size: usize,
}

/// The MoE expert GEMM in f64: for every slot of a used block with a valid expert `e` and every
/// valid id (`0 ≤ id < out_rows`), `out[id, :] = (topk_weights[id]) · A[id / top_k, :] · W[e]ᵀ`.
/// `a` is `[a_rows, K]`, `experts` `[E, N, K]` (dequantized). Returns the output `[out_rows, N]`
/// and which rows were written (rows never routed stay 0 / `false`).
#[allow(clippy::too_many_arguments)]
pub fn moe_gemm_ref<X: Float>(
    a: &[X],
    a_rows: usize,
    k: usize,
    experts: &[f32],
    num_experts: usize,
    n: usize,
    blocks: &MoeBlocksRef<'_>,
    top_k: usize,
    topk_weights: Option<&[f32]>,
    out_rows: usize,
) -> Result<(Vec<f64>, Vec<bool>)> {
    const OP: &str = "moe_gemm_ref";
    check_len(OP, "a", a.len(), a_rows * k)?;
    check_len(OP, "experts", experts.len(), num_experts * n * k)?;
    if top_k == 0 || blocks.block_size == 0 {
        return Err(Error::invalid(OP, "top_k and block_size must be positive"));
    }
    if let Some(w) = topk_weights {
        check_len(OP, "topk_weights", w.len(), out_rows)?;
    }
    let mut out = vec![0f64; out_rows * n];
    let mut written = vec![false; out_rows];
    let used = blocks.num_tokens_post_padded.min(blocks.sorted_token_ids.len());
    for (slot, &id) in blocks.sorted_token_ids[..used].iter().enumerate() {
        let Some(&e) = blocks.expert_ids.get(slot / blocks.block_size) else { continue };
        if e < 0 || e as usize >= num_experts || id < 0 || id as usize >= out_rows {
            continue;
        }
        let (e, id) = (e as usize, id as usize);
        let row = id / top_k;
        if row >= a_rows {
            continue;
        }
        let scale = topk_weights.map_or(1.0, |w| w[id] as f64);
        let ar = &a[row * k..(row + 1) * k];
        for c in 0..n {
            let wr = &experts[(e * n + c) * k..(e * n + c + 1) * k];
            let dot: f64 = ar.iter().zip(wr).map(|(x, w)| x.to_f32() as f64 * *w as f64).sum();
            out[id * n + c] = scale * dot;
        }
        written[id] = true;
    }
    Ok((out, written))
}

/// The GEMM error metric of DESIGN §5: `mean|got − want| / mean|want|` (0 when both are 0).
pub fn rel_mean_abs_err(got: &[f64], want: &[f64]) -> f64 {
    let num: f64 = got.iter().zip(want).map(|(g, w)| (g - w).abs()).sum();
    let den: f64 = want.iter().map(|w| w.abs()).sum();
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        num / den
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::GroupSize;
    use half::bf16;

    #[test]
    fn tiny_gemm_by_hand() {
        // X = [[1, 2], [3, 4]] with lda 3, W = [[1, 0], [0.5, -1]] -> Y = [[1, -1.5], [3, -2.5]].
        let x: Vec<f32> = vec![1.0, 2.0, 9.0, 3.0, 4.0];
        let w = [1.0, 0.0, 0.5, -1.0];
        let y = gemm_ref_f64(&x, 2, 2, 3, &w, 2).unwrap();
        assert_eq!(y, vec![1.0, -1.5, 3.0, -2.5]);
        assert_eq!(gemm_ref_f64_at(&x, 2, 2, 3, &w, 2, &[1], &[1]).unwrap(), vec![-2.5]);
    }

    #[test]
    fn marlin_dequant_matches_codes() {
        let shape = QuantShape::new(64, 128, GroupSize::Group(32)).unwrap();
        let mut rng = crate::reference::rng::Rng::new(3);
        let codes: Vec<i8> = (0..shape.numel()).map(|_| rng.below(15) as i8 - 7).collect();
        let scales: Vec<bf16> = (0..shape.scales_len()).map(|_| bf16::from_f32(rng.range(0.01, 0.1))).collect();
        let want = dequant_codes::<bf16, bf16>(&codes, &scales, &shape).unwrap();
        let packed = format::pack(&codes, &shape).unwrap();
        let qweight = refm::ct_marlin_repack(&packed, None, shape.k, shape.n).unwrap();
        let gptq_scales = crate::reference::quant::transpose(&scales, shape.n, shape.groups_per_row()).unwrap();
        let ms = refm::marlin_permute_scales(&gptq_scales, shape.k, shape.n, shape.group).unwrap();
        let got = marlin_dequant_ref::<bf16, bf16>(&qweight, &ms, None, &shape).unwrap();
        assert_eq!(got, want);
    }
}
