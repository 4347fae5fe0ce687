//! CPU checks of the Marlin layout references (DESIGN §3): hand-computed words, an independent
//! re-derivation of vLLM's `get_weight_perm` + `marlin_permute_weights` construction, scale
//! permutations, exact inverses on arbitrary words, act-order, and the one-pass sync reference
//! against the multi-step path. Runs everywhere.
//!
//! The sequential CPU emulation of the kernels' index arithmetic that used to live here is retired
//! (DESIGN §7): `tests/gpu_marlin_layout.rs` and `tests/gpu_sync.rs` on lowbit-sim run the real
//! kernels, bit for bit against these references, with the simulator's bounds, race, barrier and
//! initialisation checks on every launch.

use lowbit::format::{pack8, unpack8, GroupSize, QuantShape};
use lowbit::reference::marlin::{self as m, TILE_WORDS};
use lowbit::reference::quant;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Error};

/// GPTQ `qweight` `[K/8, N]` from stored nibbles `u[r][c]` (`[K, N]`).
fn gptq_from_nibbles(u: &[u8], k: usize, n: usize) -> Vec<i32> {
    let mut q = vec![0i32; k / 8 * n];
    for r in 0..k {
        for c in 0..n {
            q[(r / 8) * n + c] |= ((u[r * n + c] as u32 & 0xF) << (4 * (r % 8))) as i32;
        }
    }
    q
}

fn random_words(rng: &mut Rng, len: usize) -> Vec<i32> {
    (0..len).map(|_| rng.next_u64() as i32).collect()
}

fn random_perm(rng: &mut Rng, k: usize) -> Vec<i32> {
    let mut p: Vec<i32> = (0..k as i32).collect();
    for i in (1..k).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

#[test]
fn known_words_of_a_single_tile() {
    let (k, n) = (16, 64);
    // Nibble = K-row: word (i, j) holds rows r, r+8, r, r+8, r+1, r+9, r+1, r+9 with r = 2(i%4).
    let by_row: Vec<u8> = (0..k * n).map(|e| (e / n) as u8).collect();
    let out = m::gptq_marlin_repack(&gptq_from_nibbles(&by_row, k, n), None, k, n).unwrap();
    assert_eq!(out.len(), 128);
    assert_eq!(out[0] as u32, 0x9191_8080); // i = 0: r = 0
    assert_eq!(out[4] as u32, 0xB3B3_A2A2); // i = 1: r = 2
    assert_eq!(out[4 * 3 + 2] as u32, 0xF7F7_E6E6); // i = 3: r = 6 (any j)
    assert_eq!(out[4 * 4] as u32, 0x9191_8080); // i = 4: r = 0 again
                                                // Nibble = N-col mod 16: word (i, j) holds c, c, c+8, c+8 (twice) with c % 16 = i / 4.
    let by_col: Vec<u8> = (0..k * n).map(|e| (e % n % 16) as u8).collect();
    let out = m::gptq_marlin_repack(&gptq_from_nibbles(&by_col, k, n), None, k, n).unwrap();
    assert_eq!(out[4 * 5] as u32, 0x9911_9911); // i = 5: c = 1
    assert_eq!(out[4 * 31 + 3] as u32, 0xFF77_FF77); // i = 31: c = 7
                                                     // Nibble = 16-column block: every nibble of word (i, j) is j.
    let by_block: Vec<u8> = (0..k * n).map(|e| (e % n / 16) as u8).collect();
    let out = m::gptq_marlin_repack(&gptq_from_nibbles(&by_block, k, n), None, k, n).unwrap();
    for i in 0..32 {
        for j in 0..4 {
            assert_eq!(out[4 * i + j] as u32, 0x1111_1111 * j as u32, "i={i} j={j}");
        }
    }
}

#[test]
fn word_placement_follows_the_formula_on_distinct_codes() {
    // K = 32, N = 128: two row tiles, two column tiles; every (r, c) gets a code we can recompute.
    let (k, n) = (32, 128);
    let u = |r: usize, c: usize| ((r * 5 + c * 3 + r * c) % 16) as u8;
    let nib: Vec<u8> = (0..k * n).map(|e| u(e / n, e % n)).collect();
    let out = m::gptq_marlin_repack(&gptq_from_nibbles(&nib, k, n), None, k, n).unwrap();
    for kt in 0..k / 16 {
        for nt in 0..n / 64 {
            for i in 0..32 {
                for j in 0..4 {
                    let w = out[kt * 2 * n + 128 * nt + 4 * i + j] as u32;
                    let c = 64 * nt + 16 * j + i / 4;
                    let r = 16 * kt + 2 * (i % 4);
                    let want = [
                        (r, c),
                        (r + 8, c),
                        (r, c + 8),
                        (r + 8, c + 8),
                        (r + 1, c),
                        (r + 9, c),
                        (r + 1, c + 8),
                        (r + 9, c + 8),
                    ];
                    for (t, &(rr, cc)) in want.iter().enumerate() {
                        assert_eq!((w >> (4 * t)) & 0xF, u(rr, cc) as u32, "kt={kt} nt={nt} i={i} j={j} t={t}");
                    }
                }
            }
        }
    }
}

/// An independent derivation of the vLLM Python path (`get_weight_perm(4)` applied to the
/// 16×16-block-major flattening of each 16-row tile, then 8 consecutive codes per word).
fn vllm_style_marlin(nib: &[u8], k: usize, n: usize) -> Vec<i32> {
    // The 1024-entry permutation of one 16x64 tile.
    let mut perm = Vec::with_capacity(1024);
    for i in 0..32 {
        let col = i / 4;
        let mut block_perm = Vec::with_capacity(8);
        for block in 0..2 {
            for row in [2 * (i % 4), 2 * (i % 4) + 1, 2 * (i % 4 + 4), 2 * (i % 4 + 4) + 1] {
                block_perm.push(16 * row + col + 8 * block);
            }
        }
        for j in 0..4 {
            perm.extend(block_perm.iter().map(|p| p + 256 * j));
        }
    }
    let interleave = [0, 2, 4, 6, 1, 3, 5, 7];
    let perm: Vec<usize> = perm.chunks(8).flat_map(|c| interleave.iter().map(move |&t| c[t])).collect();
    let mut out = Vec::with_capacity(k * n / 8);
    for kt in 0..k / 16 {
        // (K/16, 16, N/16, 16) -> (K/16, N/16, 16, 16) -> one row of N*16 codes.
        let mut flat = Vec::with_capacity(16 * n);
        for nb in 0..n / 16 {
            for r in 0..16 {
                for c in 0..16 {
                    flat.push(nib[(16 * kt + r) * n + 16 * nb + c]);
                }
            }
        }
        let permuted: Vec<u8> = flat.chunks(1024).flat_map(|ch| perm.iter().map(move |&p| ch[p])).collect();
        out.extend(
            permuted.chunks(8).map(|c| c.iter().enumerate().fold(0u32, |w, (t, &v)| w | (v as u32) << (4 * t)) as i32),
        );
    }
    out
}

#[test]
fn matches_an_independent_vllm_style_derivation() {
    let mut rng = Rng::new(7);
    for (k, n) in [(16, 64), (32, 128), (128, 192), (256, 64)] {
        let nib: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
        let ours = m::gptq_marlin_repack(&gptq_from_nibbles(&nib, k, n), None, k, n).unwrap();
        assert_eq!(ours, vllm_style_marlin(&nib, k, n), "K={k} N={n}");
    }
}

#[test]
fn act_order_reorders_k_rows_first() {
    let mut rng = Rng::new(11);
    let (k, n) = (64, 128);
    let nib: Vec<u8> = (0..k * n).map(|_| rng.below(16) as u8).collect();
    let perm = random_perm(&mut rng, k);
    let permuted: Vec<u8> = (0..k * n).map(|e| nib[perm[e / n] as usize * n + e % n]).collect();
    let with_perm = m::gptq_marlin_repack(&gptq_from_nibbles(&nib, k, n), Some(&perm), k, n).unwrap();
    let plain = m::gptq_marlin_repack(&gptq_from_nibbles(&permuted, k, n), None, k, n).unwrap();
    assert_eq!(with_perm, plain);
}

#[test]
fn word_round_trips_on_arbitrary_words() {
    let mut rng = Rng::new(3);
    for (k, n) in [(16, 64), (48, 64), (128, 128), (144, 320), (512, 256)] {
        let gptq = random_words(&mut rng, k / 8 * n);
        let ct = quant::transpose(&gptq, k / 8, n).unwrap();
        for perm in [None, Some(random_perm(&mut rng, k))] {
            let p = perm.as_deref();
            let mw = m::gptq_marlin_repack(&gptq, p, k, n).unwrap();
            assert_eq!(m::marlin_to_gptq(&mw, p, k, n).unwrap(), gptq, "K={k} N={n} perm={}", p.is_some());
            // compressed-tensors directly == through the GPTQ transpose.
            assert_eq!(m::ct_marlin_repack(&ct, p, k, n).unwrap(), mw);
            assert_eq!(m::marlin_to_ct(&mw, p, k, n).unwrap(), ct);
        }
        // The inverse is also a left inverse on arbitrary Marlin words.
        let marlin = random_words(&mut rng, k / 8 * n);
        assert_eq!(
            m::gptq_marlin_repack(&m::marlin_to_gptq(&marlin, None, k, n).unwrap(), None, k, n).unwrap(),
            marlin
        );
    }
}

#[test]
fn scale_permutations_known_positions() {
    // Grouped: K = 128, g = 64 -> [2, 64]; chunk of 64: new[8a + b] = old[a + 8b].
    let old: Vec<u16> = (0..128).collect();
    let new = m::marlin_permute_scales(&old, 128, 64, 64).unwrap();
    assert_eq!(&new[..10], &[0, 8, 16, 24, 32, 40, 48, 56, 1, 9]);
    assert_eq!(new[64 + 8 * 3 + 5], 64 + 3 + 8 * 5);
    // Channelwise: [1, 64]; chunks of 32: new[8a + t] = old[2a + d[t]].
    let old: Vec<u16> = (0..64).collect();
    let new = m::marlin_permute_scales(&old, 128, 64, 128).unwrap();
    assert_eq!(&new[..16], &[0, 1, 8, 9, 16, 17, 24, 25, 2, 3, 10, 11, 18, 19, 26, 27]);
    assert_eq!(&new[32..40], &[32, 33, 40, 41, 48, 49, 56, 57]);
    // g == K uses the channelwise permutation even when requested as a group size (as vLLM).
    let shape = QuantShape::new(64, 128, GroupSize::Group(128)).unwrap();
    assert!(m::channelwise_scales(shape.k, shape.group));
    assert!(!m::channelwise_scales(256, 128));
}

#[test]
fn scale_round_trips_every_group_size() {
    let mut rng = Rng::new(5);
    for (k, n) in [(128, 64), (256, 192), (384, 128)] {
        for g in [32, 64, 128, k] {
            let len = k / g * n;
            let s: Vec<bf16> = (0..len).map(|_| bf16::from_bits(rng.next_u64() as u16)).collect();
            let p = m::marlin_permute_scales(&s, k, n, g).unwrap();
            let back = m::marlin_unpermute_scales(&p, k, n, g).unwrap();
            assert!(back.iter().zip(&s).all(|(a, b)| a.to_bits() == b.to_bits()), "K={k} N={n} g={g}");
            let mut sorted_p: Vec<u16> = p.iter().map(|x| x.to_bits()).collect();
            let mut sorted_s: Vec<u16> = s.iter().map(|x| x.to_bits()).collect();
            sorted_p.sort_unstable();
            sorted_s.sort_unstable();
            assert_eq!(sorted_p, sorted_s, "a permutation");
        }
    }
}

fn check_sync<T: lowbit::Float, S: lowbit::ScaleFloat>(rng: &mut Rng, n: usize, k: usize, gs: GroupSize) {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let w: Vec<T> = rng.normal_vec(n * k, 0.02);
    let (qw, sc) = m::quantize_to_marlin::<T, S>(&w, &shape).unwrap();
    // The GPTQ route: codes -> qweight [K/8, N] -> gptq_marlin_repack; scales^T -> permute.
    let q = quant::quantize::<T, S>(&w, &shape).unwrap();
    let nib: Vec<u8> = (0..k * n).map(|e| (q.codes[(e % n) * k + e / n] + 8) as u8).collect();
    assert_eq!(qw, m::gptq_marlin_repack(&gptq_from_nibbles(&nib, k, n), None, k, n).unwrap());
    let gptq_scales = quant::transpose(&q.scales, n, shape.groups_per_row()).unwrap();
    let want = m::marlin_permute_scales(&gptq_scales, k, n, shape.group).unwrap();
    assert!(sc.iter().zip(&want).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()));
    // Restore gives back exactly quantize_pack's compressed-tensors tensors.
    let (packed, scales) = quant::quantize_pack::<T, S>(&w, &shape).unwrap();
    let (rp, rs) = m::restore_from_marlin(&qw, &sc, &shape).unwrap();
    assert_eq!(rp, packed);
    assert!(rs.iter().zip(&scales).all(|(a, b)| a.to_f32().to_bits() == b.to_f32().to_bits()));
}

#[test]
fn sync_reference_equals_the_multi_step_path() {
    let mut rng = Rng::new(9);
    for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
        check_sync::<bf16, bf16>(&mut rng, 128, 256, gs);
        check_sync::<f16, f16>(&mut rng, 64, 384, gs);
        check_sync::<f32, bf16>(&mut rng, 64, 128, gs);
    }
}

#[test]
fn argsort_is_stable_and_act_order_is_validated() {
    let g_idx = [1, 0, 1, 0, 2, 2];
    assert_eq!(m::argsort_g_idx(&g_idx).unwrap(), vec![1, 3, 0, 2, 4, 5]);
    // Real act-order: K = 64, g = 32, groups interleaved.
    let g_idx: Vec<i32> = (0..64).map(|r| r % 2).collect();
    let perm = m::act_order_perm(&g_idx, 64, 32).unwrap();
    assert_eq!(&perm[..4], &[0, 2, 4, 6]);
    assert_eq!(&perm[32..34], &[1, 3]);
    // Uneven groups, out-of-range ids, wrong length.
    let uneven: Vec<i32> = (0..64).map(|r| (r < 40) as i32).collect();
    assert!(matches!(m::act_order_perm(&uneven, 64, 32), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m::act_order_perm(&[2i32; 64], 64, 32), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m::act_order_perm(&[0; 32], 64, 32), Err(Error::Length { .. })));
}

#[test]
fn bad_input_is_a_typed_error() {
    let q = vec![0i32; 8 * 64];
    assert!(matches!(m::gptq_marlin_repack(&q, None, 8, 64), Err(Error::Shape { .. }))); // K % 16
    assert!(matches!(m::gptq_marlin_repack(&q, None, 128, 64), Err(Error::Length { .. })));
    let q = vec![0i32; 2 * 96];
    assert!(matches!(m::gptq_marlin_repack(&q, None, 16, 96), Err(Error::Shape { .. }))); // N % 64
    let q = vec![0i32; 2 * 64];
    let mut perm: Vec<i32> = (0..16).collect();
    perm[3] = 4;
    assert!(matches!(m::gptq_marlin_repack(&q, Some(&perm), 16, 64), Err(Error::InvalidArgument { .. })));
    assert!(matches!(m::marlin_to_ct(&q, Some(&perm[..8]), 16, 64), Err(Error::Length { .. })));
    assert!(matches!(m::marlin_permute_scales(&[0u16; 64], 96, 64, 64), Err(Error::Shape { .. }))); // K % g
    assert!(matches!(m::marlin_permute_scales(&[0u16; 63], 128, 64, 128), Err(Error::Length { .. })));
    assert!(matches!(m::marlin_unpermute_scales(&[0u16; 64], 128, 64, 0), Err(Error::Shape { .. })));
    let shape = QuantShape::new(64, 24, GroupSize::Channelwise).unwrap();
    assert!(matches!(m::quantize_to_marlin::<bf16, bf16>(&[bf16::ZERO; 64 * 24], &shape), Err(Error::Shape { .. })));
}

#[test]
fn nibble_helpers_agree_with_the_format_module() {
    // The layout moves stored nibbles u = q + 8 verbatim.
    let q = [-7i8, -3, 0, 1, 7, 2, -1, 5];
    let w = pack8(&q);
    let gptq = vec![w; 2 * 64];
    let mw = m::gptq_marlin_repack(&gptq, None, 16, 64).unwrap();
    let back = m::marlin_to_gptq(&mw, None, 16, 64).unwrap();
    assert!(back.iter().all(|&b| unpack8(b) == q));
    assert_eq!(TILE_WORDS, 128);
}
