//! Byte-level Marlin repacking for `repack` and `restore` (layers without act-order): the
//! layout of DESIGN §3, bit-identical to [`crate::reference::marlin`], straight from the input
//! tensor's little-endian bytes into the output's, with one allocation and no per-nibble index
//! arithmetic.
//!
//! In Marlin row-tile `kt`, the word for lane `i` and 16-column block `j` of column-tile `nt`
//! holds the codes of column `c = 64·nt + 16j + ⌊i/4⌋` and `c + 8`, rows `r = 16kt + 2t` and
//! `r + 1`, `r + 8`, `r + 9` (`t = i mod 4`). Rows `16kt..16kt+8` of column `c` are the source
//! word `w0(c)` and rows `16kt+8..16kt+16` the word `w1(c)`; rows `r, r+1` of `w0(c)` are exactly
//! its byte `t` (low nibble `r`, high nibble `r+1`). So the Marlin word is built from byte `t` of
//! four source words, `b0 = w0(c)`, `b1 = w1(c)`, `b2 = w0(c+8)`, `b3 = w1(c+8)`:
//! nibbles `b0.lo b1.lo b2.lo b3.lo b0.hi b1.hi b2.hi b3.hi`, and the inverse scatters them back.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::reference::marlin::{TILE_K, TILE_N};

/// Where source word `(column c, K-word kr)` lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Packed {
    /// compressed-tensors `[N, K/8]`.
    Ct,
    /// GPTQ `[K/8, N]`.
    Gptq,
}

impl Packed {
    #[inline(always)]
    fn word(self, c: usize, kr: usize, k: usize, n: usize) -> usize {
        match self {
            Packed::Ct => c * (k / 8) + kr,
            Packed::Gptq => kr * n + c,
        }
    }
}

fn check(op: &str, len: usize, k: usize, n: usize) -> Result<()> {
    if k % TILE_K != 0 || n % TILE_N != 0 || len != k * n / 2 {
        return Err(Error::invalid(
            "repack",
            format!("{op}: {len} bytes for K = {k}, N = {n} (K % 16 == 0, N % 64 == 0 and K·N/2 bytes needed)"),
        ));
    }
    Ok(())
}

#[inline(always)]
fn load(b: &[u8], word: usize) -> u32 {
    let o = 4 * word;
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[inline(always)]
fn store(b: &mut [u8], word: usize, v: u32) {
    let o = 4 * word;
    b[o..o + 4].copy_from_slice(&v.to_le_bytes());
}

/// The 4×4 byte transpose of four words: byte `t` of result `r` is byte `r` of word `t`.
#[inline(always)]
fn transpose4(w: [u32; 4]) -> [u32; 4] {
    std::array::from_fn(|t| {
        let s = 8 * t;
        (w[0] >> s & 0xFF) | (w[1] >> s & 0xFF) << 8 | (w[2] >> s & 0xFF) << 16 | (w[3] >> s & 0xFF) << 24
    })
}

const LO: u32 = 0x0F0F_0F0F;

/// The 128 Marlin words of one 16×64 tile from the source words of its 64 columns: `w0[cc]`
/// (rows `0..8` of the tile) and `w1[cc]` (rows `8..16`). For lane `i = 4a + t` and block `j`
/// the word takes byte `t` of `x = w0[cc]`, `y = w1[cc]`, `z = w0[cc+8]`, `u = w1[cc+8]`
/// (`cc = 16j + a`): low nibbles of x, y, z, u then high nibbles. Building the low/high nibble
/// pairs of all four bytes at once and transposing gives the four words `t = 0..4` together.
#[inline(always)]
fn tile_words(w0: &[u32; 64], w1: &[u32; 64], out: &mut [u32; 128]) {
    for a in 0..8 {
        for j in 0..4 {
            let cc = 16 * j + a;
            let (x, y, z, u) = (w0[cc], w1[cc], w0[cc + 8], w1[cc + 8]);
            let l1 = (x & LO) | (y & LO) << 4;
            let l2 = (z & LO) | (u & LO) << 4;
            let h1 = (x >> 4 & LO) | (y & !LO);
            let h2 = (z >> 4 & LO) | (u & !LO);
            for (t, v) in transpose4([l1, l2, h1, h2]).into_iter().enumerate() {
                out[16 * a + 4 * t + j] = v;
            }
        }
    }
}

/// The inverse of [`tile_words`].
#[inline(always)]
fn tile_sources(m: &[u32; 128], w0: &mut [u32; 64], w1: &mut [u32; 64]) {
    for a in 0..8 {
        for j in 0..4 {
            let cc = 16 * j + a;
            let [l1, l2, h1, h2] = transpose4(std::array::from_fn(|t| m[16 * a + 4 * t + j]));
            w0[cc] = (l1 & LO) | (h1 & LO) << 4;
            w1[cc] = (l1 >> 4 & LO) | (h1 & !LO);
            w0[cc + 8] = (l2 & LO) | (h2 & LO) << 4;
            w1[cc + 8] = (l2 >> 4 & LO) | (h2 & !LO);
        }
    }
}

/// Source packed codes (bytes of `[N, K/8]` or `[K/8, N]` i32) → Marlin `[K/16, 2N]` bytes.
pub(crate) fn to_marlin(src: &[u8], from: Packed, k: usize, n: usize) -> Result<Vec<u8>> {
    check("to_marlin", src.len(), k, n)?;
    let mut out = vec![0u8; src.len()];
    // One Marlin row-tile (2N words) per work item.
    out.par_chunks_mut(8 * n).enumerate().for_each(|(kt, row)| {
        let (mut w0, mut w1, mut m) = ([0u32; 64], [0u32; 64], [0u32; 128]);
        for (nt, dst) in row.chunks_exact_mut(4 * 128).enumerate() {
            for cc in 0..TILE_N {
                let c = TILE_N * nt + cc;
                w0[cc] = load(src, from.word(c, 2 * kt, k, n));
                w1[cc] = load(src, from.word(c, 2 * kt + 1, k, n));
            }
            tile_words(&w0, &w1, &mut m);
            for (d, v) in dst.chunks_exact_mut(4).zip(m) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
    });
    Ok(out)
}

/// Marlin `[K/16, 2N]` bytes → packed codes in `to`'s layout (the exact inverse of
/// [`to_marlin`]).
pub(crate) fn from_marlin(src: &[u8], to: Packed, k: usize, n: usize) -> Result<Vec<u8>> {
    check("from_marlin", src.len(), k, n)?;
    let mut out = vec![0u8; src.len()];
    let tile = |kt: usize, nt: usize, w0: &mut [u32; 64], w1: &mut [u32; 64]| {
        let mut m = [0u32; 128];
        for (q, v) in m.iter_mut().enumerate() {
            *v = load(src, kt * 2 * n + 128 * nt + q);
        }
        tile_sources(&m, w0, w1);
    };
    match to {
        // 64 compressed-tensors rows (one column-tile) per work item.
        Packed::Ct => out.par_chunks_mut(TILE_N * k / 2).enumerate().for_each(|(nt, rows)| {
            let (mut w0, mut w1) = ([0u32; 64], [0u32; 64]);
            for kt in 0..k / TILE_K {
                tile(kt, nt, &mut w0, &mut w1);
                for cc in 0..TILE_N {
                    store(rows, cc * (k / 8) + 2 * kt, w0[cc]);
                    store(rows, cc * (k / 8) + 2 * kt + 1, w1[cc]);
                }
            }
        }),
        // Two GPTQ rows (one row-tile) per work item.
        Packed::Gptq => out.par_chunks_mut(8 * n).enumerate().for_each(|(kt, rows)| {
            let (mut w0, mut w1) = ([0u32; 64], [0u32; 64]);
            for nt in 0..n / TILE_N {
                tile(kt, nt, &mut w0, &mut w1);
                for cc in 0..TILE_N {
                    store(rows, TILE_N * nt + cc, w0[cc]);
                    store(rows, n + TILE_N * nt + cc, w1[cc]);
                }
            }
        }),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reference::marlin;
    use crate::reference::rng::Rng;

    fn bytes(v: &[i32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    #[test]
    fn bit_identical_to_the_reference_and_inverse() {
        let mut rng = Rng::new(9);
        for (k, n) in [(16usize, 64usize), (64, 128), (128, 192), (48, 320)] {
            let words: Vec<i32> = (0..k * n / 8).map(|_| rng.next_u64() as i32).collect();
            let src = bytes(&words);
            let m = to_marlin(&src, Packed::Ct, k, n).unwrap();
            assert_eq!(m, bytes(&marlin::ct_marlin_repack(&words, None, k, n).unwrap()), "ct {k}x{n}");
            assert_eq!(from_marlin(&m, Packed::Ct, k, n).unwrap(), src);
            let mg = to_marlin(&src, Packed::Gptq, k, n).unwrap();
            assert_eq!(mg, bytes(&marlin::gptq_marlin_repack(&words, None, k, n).unwrap()), "gptq {k}x{n}");
            assert_eq!(from_marlin(&mg, Packed::Gptq, k, n).unwrap(), src);
        }
        assert!(to_marlin(&[0u8; 8], Packed::Ct, 16, 64).is_err());
    }
}
