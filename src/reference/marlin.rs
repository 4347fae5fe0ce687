//! The Marlin weight layout and scale permutation of DESIGN §3, on the CPU.
//!
//! Written from the layout formulas, as plain loops over row tile `kt`, column tile `nt`, lane
//! `i`, 16-column block `j` and nibble `t`:
//!
//! * Marlin `qweight` is i32 `[K/16, 2N]`. Word `4i + j` of tile `(kt, nt)` lives at
//!   `out[kt, 128·nt + 4i + j]`. With `c = 64·nt + 16j + ⌊i/4⌋` and `r = 16·kt + 2·(i mod 4)`
//!   its nibbles 0..7 hold the stored codes `u = q + 8` at (K-row, N-col)
//!   `(r,c) (r+8,c) (r,c+8) (r+8,c+8) (r+1,c) (r+9,c) (r+1,c+8) (r+9,c+8)`.
//! * With act-order, Marlin K-row `r` holds source K-row `perm[r]` (`perm = argsort(g_idx)`).
//! * Scales `[K/g, N]` are flattened row-major and permuted in chunks: grouped
//!   (`g < K`) in chunks of 64 with `new[8a+b] = old[a+8b]`; channelwise (`g == K`) in chunks
//!   of 32 with `new[8a+t] = old[2a+d[t]]`, `d = [0,1,8,9,16,17,24,25]`.
//!
//! This is the layout of vLLM's / SGLang's `gptq_marlin_repack` and `marlin_permute_scales`
//! (their `scale_perm` is `[i + 8j for i in 0..8 for j in 0..8]`, `scale_perm_single` is
//! `[2i + j for i in 0..4 for j in d]`, used when `group_size < size_k` and otherwise).
//! Nibbles are moved verbatim, so every function here is a bijection on arbitrary words and the
//! inverses are exact.

use crate::dtype::{Float, ScaleFloat};
use crate::error::{Error, Result};
use crate::format::{check_len, QuantShape, PACK};

/// K-rows of a Marlin tile.
pub const TILE_K: usize = crate::ffi::LOWBIT_MARLIN_TILE_K as usize;
/// N-columns of a Marlin tile.
pub const TILE_N: usize = crate::ffi::LOWBIT_MARLIN_TILE_N as usize;
/// i32 words per Marlin tile.
pub const TILE_WORDS: usize = crate::ffi::LOWBIT_MARLIN_TILE_WORDS as usize;

/// The `d` offsets of the channelwise scale permutation.
const SINGLE_D: [usize; 8] = [0, 1, 8, 9, 16, 17, 24, 25];

/// Checks the Marlin layout's shape limits: `K % 16 == 0`, `N % 64 == 0`, both positive.
pub fn check_marlin_shape(op: &'static str, k: usize, n: usize) -> Result<()> {
    if k == 0 || k % TILE_K != 0 {
        return Err(Error::shape(op, format!("K = {k} must be a positive multiple of {TILE_K} for the Marlin layout")));
    }
    if n == 0 || n % TILE_N != 0 {
        return Err(Error::shape(op, format!("N = {n} must be a positive multiple of {TILE_N} for the Marlin layout")));
    }
    if k.checked_mul(n).is_none_or(|e| e > i64::MAX as usize / 4) {
        return Err(Error::shape(op, format!("[{n}, {k}] is too large")));
    }
    Ok(())
}

/// Checks the group size for a `K`-row matrix: `1 ≤ g ≤ K`, `K % g == 0` (`g == K` is
/// channelwise).
pub fn check_group(op: &'static str, k: usize, group: usize) -> Result<()> {
    if group == 0 || group > k || k % group != 0 {
        return Err(Error::shape(op, format!("K = {k} is not a multiple of the group size {group}")));
    }
    Ok(())
}

/// Whether scales use the 32-element channelwise permutation: exactly when there is one group per
/// column (`g == K`), as vLLM decides with `group_size < size_k and group_size != -1`.
pub fn channelwise_scales(k: usize, group: usize) -> bool {
    group >= k
}

/// Checks that `perm` is a permutation of `0..k`.
pub fn check_perm(op: &'static str, perm: &[i32], k: usize) -> Result<()> {
    check_len(op, "perm", perm.len(), k)?;
    let mut seen = vec![false; k];
    for (r, &p) in perm.iter().enumerate() {
        let Some(slot) = usize::try_from(p).ok().and_then(|p| seen.get_mut(p)) else {
            return Err(Error::invalid(op, format!("perm[{r}] = {p} is outside 0..{k}")));
        };
        if *slot {
            return Err(Error::invalid(op, format!("perm[{r}] = {p} repeats an earlier entry: not a permutation")));
        }
        *slot = true;
    }
    Ok(())
}

/// The act-order permutation `perm = argsort(g_idx)`, stable (equal group ids keep their K
/// order), so Marlin K-row `r` holds source row `perm[r]`.
///
/// vLLM uses `torch.argsort`, which does not promise stability; any order within a group gives
/// the same GEMM result as long as the same `perm` is used for the weights and the activations.
pub fn argsort_g_idx(g_idx: &[i32]) -> Result<Vec<i32>> {
    if g_idx.len() > i32::MAX as usize {
        return Err(Error::invalid("argsort_g_idx", "g_idx is longer than i32::MAX"));
    }
    let mut idx: Vec<i32> = (0..g_idx.len() as i32).collect();
    idx.sort_by_key(|&r| g_idx[r as usize]);
    Ok(idx)
}

/// Checks an act-order `g_idx` for a `K`-row matrix with groups of `group` and returns
/// `perm = argsort(g_idx)`. Every group id must lie in `0..K/g` and every group must have exactly
/// `g` members, so that after sorting Marlin row `r` belongs to group `r / g` (the invariant the
/// Marlin GEMM relies on).
pub fn act_order_perm(g_idx: &[i32], k: usize, group: usize) -> Result<Vec<i32>> {
    const OP: &str = "act_order_perm";
    check_len(OP, "g_idx", g_idx.len(), k)?;
    check_group(OP, k, group)?;
    let groups = k / group;
    let mut count = vec![0usize; groups];
    for (r, &gi) in g_idx.iter().enumerate() {
        let Some(c) = usize::try_from(gi).ok().and_then(|g| count.get_mut(g)) else {
            return Err(Error::invalid(OP, format!("g_idx[{r}] = {gi} is outside 0..{groups}")));
        };
        *c += 1;
    }
    if let Some(g) = count.iter().position(|&c| c != group) {
        return Err(Error::invalid(OP, format!("group {g} has {} members in g_idx, expected {group}", count[g])));
    }
    argsort_g_idx(g_idx)
}

/// The eight (K-row, N-col) positions of Marlin word `4i + j` of tile `(kt, nt)`, in nibble order.
pub fn word_positions(kt: usize, nt: usize, i: usize, j: usize) -> [(usize, usize); 8] {
    let c = TILE_N * nt + 16 * j + i / 4;
    let r = TILE_K * kt + 2 * (i % 4);
    [(r, c), (r + 8, c), (r, c + 8), (r + 8, c + 8), (r + 1, c), (r + 9, c), (r + 1, c + 8), (r + 9, c + 8)]
}

/// Index of Marlin word `4i + j` of tile `(kt, nt)` in the `[K/16, 2N]` output.
pub fn word_index(kt: usize, nt: usize, i: usize, j: usize, n: usize) -> usize {
    kt * (2 * n) + TILE_WORDS * nt + 4 * i + j
}

/// Where a source word layout keeps the nibble of (K-row, N-col).
#[derive(Clone, Copy)]
enum Source {
    /// GPTQ `qweight` `[K/8, N]`.
    Gptq,
    /// compressed-tensors `weight_packed` `[N, K/8]`.
    Ct,
}

impl Source {
    /// (word index, nibble shift) of (row, col).
    fn locate(self, row: usize, col: usize, k: usize, n: usize) -> (usize, usize) {
        match self {
            Source::Gptq => ((row / PACK) * n + col, 4 * (row % PACK)),
            Source::Ct => (col * (k / PACK) + row / PACK, 4 * (row % PACK)),
        }
    }
}

fn check_layout_args(op: &'static str, words: usize, perm: Option<&[i32]>, k: usize, n: usize) -> Result<()> {
    check_marlin_shape(op, k, n)?;
    if let Some(p) = perm {
        check_perm(op, p, k)?;
    }
    check_len(op, "src", words, k * n / PACK)
}

fn repack(op: &'static str, src: &[i32], perm: Option<&[i32]>, k: usize, n: usize, from: Source) -> Result<Vec<i32>> {
    check_layout_args(op, src.len(), perm, k, n)?;
    let source_row = |r: usize| perm.map_or(r, |p| p[r] as usize);
    let mut out = vec![0i32; k * n / PACK];
    for kt in 0..k / TILE_K {
        for nt in 0..n / TILE_N {
            for i in 0..32 {
                for j in 0..4 {
                    let mut word = 0u32;
                    for (t, &(r, c)) in word_positions(kt, nt, i, j).iter().enumerate() {
                        let (w, shift) = from.locate(source_row(r), c, k, n);
                        let u = (src[w] as u32 >> shift) & 0xF;
                        word |= u << (4 * t);
                    }
                    out[word_index(kt, nt, i, j, n)] = word as i32;
                }
            }
        }
    }
    Ok(out)
}

fn unrepack(
    op: &'static str,
    marlin: &[i32],
    perm: Option<&[i32]>,
    k: usize,
    n: usize,
    to: Source,
) -> Result<Vec<i32>> {
    check_layout_args(op, marlin.len(), perm, k, n)?;
    let source_row = |r: usize| perm.map_or(r, |p| p[r] as usize);
    let mut out = vec![0u32; k * n / PACK];
    for kt in 0..k / TILE_K {
        for nt in 0..n / TILE_N {
            for i in 0..32 {
                for j in 0..4 {
                    let word = marlin[word_index(kt, nt, i, j, n)] as u32;
                    for (t, &(r, c)) in word_positions(kt, nt, i, j).iter().enumerate() {
                        let (w, shift) = to.locate(source_row(r), c, k, n);
                        out[w] |= ((word >> (4 * t)) & 0xF) << shift;
                    }
                }
            }
        }
    }
    Ok(out.into_iter().map(|w| w as i32).collect())
}

/// `gptq_marlin_repack`: GPTQ `qweight` i32 `[K/8, N]` (rows reordered by the act-order `perm`
/// when given) → Marlin i32 `[K/16, 2N]`.
pub fn gptq_marlin_repack(qweight: &[i32], perm: Option<&[i32]>, k: usize, n: usize) -> Result<Vec<i32>> {
    repack("gptq_marlin_repack", qweight, perm, k, n, Source::Gptq)
}

/// compressed-tensors `weight_packed` i32 `[N, K/8]` → Marlin i32 `[K/16, 2N]` directly (the same
/// result as transposing to GPTQ first).
pub fn ct_marlin_repack(packed: &[i32], perm: Option<&[i32]>, k: usize, n: usize) -> Result<Vec<i32>> {
    repack("ct_marlin_repack", packed, perm, k, n, Source::Ct)
}

/// The exact inverse of [`gptq_marlin_repack`]: Marlin `[K/16, 2N]` → GPTQ `qweight` `[K/8, N]`
/// in source row order (pass the same `perm`).
pub fn marlin_to_gptq(marlin: &[i32], perm: Option<&[i32]>, k: usize, n: usize) -> Result<Vec<i32>> {
    unrepack("marlin_to_gptq", marlin, perm, k, n, Source::Gptq)
}

/// The exact inverse of [`ct_marlin_repack`]: Marlin `[K/16, 2N]` → compressed-tensors
/// `weight_packed` `[N, K/8]`.
pub fn marlin_to_ct(marlin: &[i32], perm: Option<&[i32]>, k: usize, n: usize) -> Result<Vec<i32>> {
    unrepack("marlin_to_ct", marlin, perm, k, n, Source::Ct)
}

/// For permuted position `p` of a scale vector, the original (flat `[K/g, N]`) position it holds.
pub fn scale_source(p: usize, channelwise: bool) -> usize {
    if channelwise {
        let (base, o) = (p - p % 32, p % 32);
        let (a, t) = (o / 8, o % 8);
        base + 2 * a + SINGLE_D[t]
    } else {
        let (base, o) = (p - p % 64, p % 64);
        let (a, b) = (o / 8, o % 8);
        base + a + 8 * b
    }
}

fn check_scales_args(op: &'static str, len: usize, k: usize, n: usize, group: usize) -> Result<()> {
    check_marlin_shape(op, k, n)?;
    check_group(op, k, group)?;
    check_len(op, "scales", len, (k / group) * n)
}

/// `marlin_permute_scales`: scales `[K/g, N]` (GPTQ order) → Marlin's permuted `[K/g, N]`.
/// `group == k` means channelwise.
pub fn marlin_permute_scales<E: Copy>(scales: &[E], k: usize, n: usize, group: usize) -> Result<Vec<E>> {
    check_scales_args("marlin_permute_scales", scales.len(), k, n, group)?;
    let cw = channelwise_scales(k, group);
    Ok((0..scales.len()).map(|p| scales[scale_source(p, cw)]).collect())
}

/// The exact inverse of [`marlin_permute_scales`].
pub fn marlin_unpermute_scales<E: Copy>(scales: &[E], k: usize, n: usize, group: usize) -> Result<Vec<E>> {
    check_scales_args("marlin_unpermute_scales", scales.len(), k, n, group)?;
    let cw = channelwise_scales(k, group);
    let mut out = scales.to_vec();
    for (p, &s) in scales.iter().enumerate() {
        out[scale_source(p, cw)] = s;
    }
    Ok(out)
}

/// The multi-step weight-sync path the one-pass GPU kernel must equal bit for bit:
/// `quantize_pack` (compressed-tensors) → Marlin repack; scales `[N, K/g]` → transpose →
/// `marlin_permute_scales`. Returns (Marlin `qweight` `[K/16, 2N]`, permuted scales `[K/g, N]`).
pub fn quantize_to_marlin<T: Float, S: ScaleFloat>(w: &[T], shape: &QuantShape) -> Result<(Vec<i32>, Vec<S>)> {
    check_marlin_shape("quantize_to_marlin", shape.k, shape.n)?;
    let (packed, scales) = super::quant::quantize_pack::<T, S>(w, shape)?;
    let qweight = ct_marlin_repack(&packed, None, shape.k, shape.n)?;
    let gptq_scales = super::quant::transpose(&scales, shape.n, shape.groups_per_row())?;
    Ok((qweight, marlin_permute_scales(&gptq_scales, shape.k, shape.n, shape.group)?))
}

/// The inverse of the weight-sync path: Marlin `qweight` and permuted scales (no act-order) →
/// compressed-tensors `weight_packed` `[N, K/8]` and `weight_scale` `[N, K/g]`.
pub fn restore_from_marlin<S: Copy>(qweight: &[i32], scales: &[S], shape: &QuantShape) -> Result<(Vec<i32>, Vec<S>)> {
    let packed = marlin_to_ct(qweight, None, shape.k, shape.n)?;
    let gptq_scales = marlin_unpermute_scales(scales, shape.k, shape.n, shape.group)?;
    Ok((packed, super::quant::transpose(&gptq_scales, shape.groups_per_row(), shape.n)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_permutations_match_vllm_tables() {
        // vLLM: scale_perm = [i + 8*j for i in range(8) for j in range(8)].
        let grouped: Vec<usize> = (0..8).flat_map(|i| (0..8).map(move |j| i + 8 * j)).collect();
        assert_eq!((0..64).map(|p| scale_source(p, false)).collect::<Vec<_>>(), grouped);
        // scale_perm_single = [2*i + j for i in range(4) for j in [0,1,8,9,16,17,24,25]].
        let single: Vec<usize> = (0..4).flat_map(|i| SINGLE_D.iter().map(move |d| 2 * i + d)).collect();
        assert_eq!((0..32).map(|p| scale_source(p, true)).collect::<Vec<_>>(), single);
    }

    #[test]
    fn perm_validation() {
        assert!(check_perm("t", &[1, 0, 2], 3).is_ok());
        assert!(check_perm("t", &[1, 1, 2], 3).is_err());
        assert!(check_perm("t", &[0, 1, 3], 3).is_err());
        assert!(check_perm("t", &[0, -1, 2], 3).is_err());
        assert!(check_perm("t", &[0, 1], 3).is_err());
    }
}
