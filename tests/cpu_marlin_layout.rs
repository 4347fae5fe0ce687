//! CPU checks of the Marlin layout references (DESIGN §3): hand-computed words, an independent
//! re-derivation of vLLM's `get_weight_perm` + `marlin_permute_weights` construction, scale
//! permutations, exact inverses on arbitrary words, act-order, and the one-pass sync reference
//! against the multi-step path. Runs everywhere.

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

/// Sequential CPU emulations of `csrc/marlin/layout.cuh`: every block and thread of a kernel runs
/// in turn with the kernel's own constants and index arithmetic (shared-memory swizzle, strip
/// decomposition, scale chunk maps, the weight-sync lane groups), and the results are compared
/// with the §3 references. Shared-memory slots are tracked so that a read of a slot not written
/// in the same unit, or two writes of one output word, fail the test.
mod kernel_emulation {
    use super::*;
    use lowbit::ScaleFloat;

    const TILE_K: usize = 16;
    const TILE_N: usize = 64;
    const STRIP_K: usize = 128;
    const STRIP_WORDS: usize = STRIP_K / 8;
    const THREADS: usize = 256;
    const MW_STRIDE: usize = TILE_WORDS + TILE_WORDS / 16;

    fn sw(kw: usize, c: usize) -> usize {
        c ^ (2 * kw)
    }
    fn mw_idx(ktl: usize, idx: usize) -> usize {
        ktl * MW_STRIDE + idx + (idx >> 4)
    }

    fn scale_dest(f: usize, channelwise: bool) -> usize {
        if channelwise {
            let o = f & 31;
            let a = (o & 7) >> 1;
            let d = o - 2 * a;
            let t = 2 * (d >> 3) + (d & 1);
            return (f - o) + 8 * a + t;
        }
        let o = f & 63;
        (f - o) + 8 * (o & 7) + (o >> 3)
    }
    fn scale_source(p: usize, channelwise: bool) -> usize {
        if channelwise {
            let o = p & 31;
            let (a, t) = (o >> 3, o & 7);
            let d = 8 * (t >> 1) + (t & 1);
            return (p - o) + 2 * a + d;
        }
        let o = p & 63;
        (p - o) + (o >> 3) + 8 * (o & 7)
    }

    fn marlin_locate(r: usize, c: usize, n: usize) -> (usize, usize) {
        let (kt, nt) = (r >> 4, c >> 6);
        let (rr, cc) = (r & 15, c & 63);
        let (j, c16) = (cc >> 4, cc & 15);
        let ch = c16 >> 3;
        let i = 4 * (c16 & 7) + ((rr & 7) >> 1);
        (kt * (2 * n) + TILE_WORDS * nt + 4 * i + j, 4 * (rr & 1) + 2 * ch + (rr >> 3))
    }

    #[derive(Clone, Copy, Debug)]
    struct Unit {
        b: usize,
        nt: usize,
        k0: usize,
        rows: usize,
    }
    fn unit_of(u: usize, k: usize, n: usize) -> Unit {
        let (strips, ntiles) = (k.div_ceil(STRIP_K), n / TILE_N);
        let rem = u % (ntiles * strips);
        let k0 = (rem % strips) * STRIP_K;
        Unit { b: u / (ntiles * strips), nt: rem / strips, k0, rows: STRIP_K.min(k - k0) }
    }
    fn unit_count(batch: usize, k: usize, n: usize) -> usize {
        batch * (n / TILE_N) * k.div_ceil(STRIP_K)
    }

    /// Staged strip `sm[kw][c]`, with the written flag of every slot.
    struct Strip {
        w: [[u32; TILE_N]; STRIP_WORDS],
        set: [[bool; TILE_N]; STRIP_WORDS],
    }
    impl Strip {
        fn new() -> Self {
            Strip { w: [[0; TILE_N]; STRIP_WORDS], set: [[false; TILE_N]; STRIP_WORDS] }
        }
        fn put(&mut self, kw: usize, col: usize, word: u32) {
            let s = sw(kw, col);
            assert!(s < TILE_N, "swizzled column {s}");
            assert!(!self.set[kw][s], "slot ({kw}, {col}) written twice");
            self.set[kw][s] = true;
            self.w[kw][s] = word;
        }
        fn get(&self, kw: usize, col: usize) -> u32 {
            let s = sw(kw, col);
            assert!(self.set[kw][s], "slot ({kw}, {col}) read before it was written");
            self.w[kw][s]
        }
    }

    /// Output buffer that fails on a double write and remembers what was written.
    struct Out {
        v: Vec<i32>,
        hits: Vec<u8>,
    }
    impl Out {
        fn new(len: usize) -> Self {
            Out { v: vec![0x5a5a_5a5a; len], hits: vec![0; len] }
        }
        fn put(&mut self, i: usize, x: i32) {
            assert!(i < self.v.len(), "write at {i} past {}", self.v.len());
            self.hits[i] += 1;
            assert_eq!(self.hits[i], 1, "word {i} written twice");
            self.v[i] = x;
        }
        fn done(self) -> Vec<i32> {
            assert!(self.hits.iter().all(|&h| h == 1), "every output word written");
            self.v
        }
    }

    fn emit_marlin(sm: &Strip, x: &Unit, dst: &mut Out, k: usize, n: usize) {
        let out = x.b * (k / 16) * (2 * n) + (x.k0 / TILE_K) * (2 * n) + TILE_WORDS * x.nt;
        let words = (x.rows / TILE_K) * TILE_WORDS;
        for q in 0..words {
            let (ktl, t) = (q / TILE_WORDS, q % TILE_WORDS);
            let (i, j) = (t >> 2, t & 3);
            let (c, sh) = (16 * j + (i >> 2), 8 * (i & 3));
            let (k0, k1) = (2 * ktl, 2 * ktl + 1);
            let x0 = (sm.get(k0, c) >> sh) & 0xFF;
            let x1 = (sm.get(k1, c) >> sh) & 0xFF;
            let x2 = (sm.get(k0, c + 8) >> sh) & 0xFF;
            let x3 = (sm.get(k1, c + 8) >> sh) & 0xFF;
            let lo = (x0 & 0xF) | (x1 & 0xF) << 4 | (x2 & 0xF) << 8 | (x3 & 0xF) << 12;
            let hi = (x0 >> 4) | (x1 >> 4) << 4 | (x2 >> 4) << 8 | (x3 >> 4) << 12;
            dst.put(out + ktl * (2 * n) + t, (lo | hi << 16) as i32);
        }
    }

    /// `repack<CT>` for `batch` stacked matrices, `grid` blocks.
    fn repack(ct: bool, src: &[i32], perm: Option<&[i32]>, batch: usize, k: usize, n: usize, grid: usize) -> Vec<i32> {
        let kw_total = k / 8;
        let mut dst = Out::new(batch * (k / 16) * 2 * n);
        for block in 0..grid {
            let mut u = block;
            while u < unit_count(batch, k, n) {
                let x = unit_of(u, k, n);
                let kws = x.rows / 8;
                let col0 = x.nt * TILE_N;
                let mut sm = Strip::new();
                for q in 0..kws * TILE_N {
                    let kw = if ct { q % kws } else { q / TILE_N };
                    let c = if ct { q / kws } else { q % TILE_N };
                    let col = col0 + c;
                    let word = match perm {
                        None => {
                            let w = x.k0 / 8 + kw;
                            (if ct { src[(x.b * n + col) * kw_total + w] } else { src[(x.b * kw_total + w) * n + col] })
                                as u32
                        }
                        Some(p) => {
                            let mut word = 0u32;
                            for e in 0..8 {
                                let s = p[x.k0 + 8 * kw + e] as usize;
                                let v = (if ct {
                                    src[(x.b * n + col) * kw_total + s / 8]
                                } else {
                                    src[(x.b * kw_total + s / 8) * n + col]
                                }) as u32;
                                word |= ((v >> (4 * (s % 8))) & 0xF) << (4 * e);
                            }
                            word
                        }
                    };
                    sm.put(kw, c, word);
                }
                emit_marlin(&sm, &x, &mut dst, k, n);
                u += grid;
            }
        }
        dst.done()
    }

    /// `unrepack<CT>` (no act-order).
    fn unrepack(ct: bool, src: &[i32], batch: usize, k: usize, n: usize, grid: usize) -> Vec<i32> {
        let kw_total = k / 8;
        let mut dst = Out::new(batch * kw_total * n);
        for block in 0..grid {
            let mut u = block;
            while u < unit_count(batch, k, n) {
                let x = unit_of(u, k, n);
                let (tiles, kws) = (x.rows / TILE_K, x.rows / 8);
                let inp = x.b * (k / 16) * (2 * n) + (x.k0 / TILE_K) * (2 * n) + TILE_WORDS * x.nt;
                let mut mw = vec![None::<u32>; (STRIP_K / TILE_K) * MW_STRIDE];
                for q in 0..tiles * TILE_WORDS {
                    let slot = mw_idx(q / TILE_WORDS, q % TILE_WORDS);
                    assert!(mw[slot].is_none(), "mw slot {slot} written twice");
                    mw[slot] = Some(src[inp + (q / TILE_WORDS) * (2 * n) + q % TILE_WORDS] as u32);
                }
                let col0 = x.nt * TILE_N;
                for q in 0..kws * TILE_N {
                    let kw = if ct { q % kws } else { q / TILE_N };
                    let c = if ct { q / kws } else { q % TILE_N };
                    let (ktl, h) = (kw >> 1, kw & 1);
                    let (j, c16) = (c >> 4, c & 15);
                    let ch = c16 >> 3;
                    let (lo_nib, hi_nib) = (2 * ch + h, 4 + 2 * ch + h);
                    let mut word = 0u32;
                    for b in 0..4 {
                        let m = mw[mw_idx(ktl, 4 * (4 * (c16 & 7) + b) + j)].expect("mw read before write");
                        let (lo, hi) = ((m >> (4 * lo_nib)) & 0xF, (m >> (4 * hi_nib)) & 0xF);
                        word |= (lo | hi << 4) << (8 * b);
                    }
                    let (w, col) = (x.k0 / 8 + kw, col0 + c);
                    let o = if ct { (x.b * n + col) * kw_total + w } else { (x.b * kw_total + w) * n + col };
                    dst.put(o, word as i32);
                }
                u += grid;
            }
        }
        dst.done()
    }

    /// `unrepack_gather<CT>`: `inv` is the inverse act-order permutation.
    fn unrepack_gather(ct: bool, src: &[i32], inv: &[i32], batch: usize, k: usize, n: usize) -> Vec<i32> {
        let kw_total = k / 8;
        let per = kw_total * n;
        let mut dst = Out::new(batch * per);
        for o in 0..batch * per {
            let (b, rem) = (o / per, o % per);
            let w = if ct { rem % kw_total } else { rem / n };
            let col = if ct { rem / kw_total } else { rem % n };
            let mut word = 0u32;
            for e in 0..8 {
                let (mword, nib) = marlin_locate(inv[8 * w + e] as usize, col, n);
                assert!(mword < per);
                word |= ((src[b * per + mword] as u32 >> (4 * nib)) & 0xF) << (4 * e);
            }
            dst.put(o, word as i32);
        }
        dst.done()
    }

    /// `permute_scales<INVERSE>` over `[groups, n]` (GPTQ order, or `[n, groups]` when `ct`).
    fn permute_scales(
        inverse: bool,
        src: &[u16],
        batch: usize,
        groups: usize,
        n: usize,
        cw: bool,
        ct: bool,
    ) -> Vec<u16> {
        let per = groups * n;
        let mut dst = vec![None::<u16>; batch * per];
        for m in 0..batch * per {
            let (b, pm) = (m / per, m % per);
            let f = scale_source(pm, cw);
            let other = b * per + if ct { (f % n) * groups + f / n } else { f };
            let (d, s) = if inverse { (other, m) } else { (m, other) };
            assert!(dst[d].is_none(), "scale {d} written twice");
            dst[d] = Some(src[s]);
        }
        dst.into_iter().map(|v| v.expect("every scale written")).collect()
    }

    /// `sync_quantize` (inline scales for g in 32/64/128, else the staged path after
    /// `sync_group_scales`): returns (qweight, Marlin-permuted scale bits).
    fn sync<T: lowbit::Float, S: ScaleFloat>(w: &[T], n: usize, k: usize, g: usize, grid: usize) -> (Vec<i32>, Vec<S>) {
        let groups = k / g;
        let cw = m::channelwise_scales(k, g);
        let inline = [32, 64, 128].contains(&g);
        let width = if inline { g / 8 } else { 1 };
        let mut scales: Vec<Option<S>> = vec![None; groups * n];
        if !inline {
            // sync_group_scales: one block per (row, group); block_max over all chunks.
            for gg in 0..n * groups {
                let (nrow, gi) = (gg / groups, gg % groups);
                let e0 = nrow * k + gi * g;
                let amax = (0..g).map(|c| w[e0 + c].to_f32().abs()).fold(0f32, f32::max);
                let (b, row) = (nrow / n, nrow % n);
                let d = b * groups * n + scale_dest(gi * n + row, cw);
                assert!(scales[d].is_none(), "scale {d} written twice by the pre-pass");
                scales[d] = Some(quant::group_scale::<S>(amax));
            }
        }
        let mut qw = Out::new(k / 16 * 2 * n);
        for block in 0..grid {
            let mut u = block;
            while u < unit_count(1, k, n) {
                let x = unit_of(u, k, n);
                let mut sm = Strip::new();
                // Per (thread, m): the chunk's values and whether it is active.
                let mut v = vec![[0f32; 8]; THREADS * 4];
                let mut active = vec![false; THREADS * 4];
                for tid in 0..THREADS {
                    for mm in 0..4 {
                        let q = tid + THREADS * mm;
                        let (row, ch) = (q >> 4, q & 15);
                        active[q] = 8 * ch < x.rows;
                        if active[q] {
                            let base = (x.b * n + x.nt * TILE_N + row) * k + x.k0 + 8 * ch;
                            for e in 0..8 {
                                v[q][e] = w[base + e].to_f32();
                            }
                        }
                    }
                }
                for tid in 0..THREADS {
                    for mm in 0..4 {
                        let q = tid + THREADS * mm;
                        let (row, ch) = (q >> 4, q & 15);
                        let col = x.k0 + 8 * ch;
                        let sf;
                        if inline {
                            // group_max over the `width` aligned lanes of tid's group (same m).
                            let lane0 = tid / width * width;
                            let mut amax = 0f32;
                            for t2 in lane0..lane0 + width {
                                let q2 = t2 + THREADS * mm;
                                assert_eq!(active[q2], active[q], "a group is all active or all inactive");
                                assert_eq!(q2 >> 4, row, "a group stays in one weight row");
                                for x in v[q2] {
                                    amax = amax.max(x.abs());
                                }
                            }
                            if !active[q] {
                                continue;
                            }
                            let stored = quant::group_scale::<S>(amax);
                            sf = stored.to_f32();
                            if ch % width == 0 {
                                let gi = col / g;
                                assert_eq!(col % g, 0, "the writing lane holds the group's first chunk");
                                let f = gi * n + x.nt * TILE_N + row;
                                let d = x.b * groups * n + scale_dest(f, cw);
                                assert!(scales[d].is_none(), "scale {d} written twice");
                                scales[d] = Some(stored);
                            }
                        } else {
                            if !active[q] {
                                continue;
                            }
                            let f = (col / g) * n + x.nt * TILE_N + row;
                            sf = scales[x.b * groups * n + scale_dest(f, cw)]
                                .expect("scale read before written")
                                .to_f32();
                        }
                        let mut word = 0u32;
                        for (e, &x) in v[q].iter().enumerate() {
                            let (c, _) = quant::code(x, sf);
                            word |= ((c as i32 + 8) as u32) << (4 * e);
                        }
                        sm.put(ch, row, word);
                    }
                }
                emit_marlin(&sm, &x, &mut qw, k, n);
                u += grid;
            }
        }
        (qw.done(), scales.into_iter().map(|s| s.expect("every scale written")).collect())
    }

    fn bits<S: ScaleFloat>(v: &[S]) -> Vec<u32> {
        v.iter().map(|s| s.to_f32().to_bits()).collect()
    }

    #[test]
    fn scale_maps_are_inverse_bijections_matching_the_reference() {
        for cw in [false, true] {
            for p in 0..4096 {
                assert_eq!(scale_source(p, cw), m::scale_source(p, cw), "p {p} cw {cw}");
                assert_eq!(scale_dest(scale_source(p, cw), cw), p, "p {p} cw {cw}");
            }
        }
    }

    #[test]
    fn locate_matches_the_word_formula() {
        let (k, n) = (32, 128);
        for kt in 0..k / 16 {
            for nt in 0..n / 64 {
                for i in 0..32 {
                    for j in 0..4 {
                        for (nib, &(r, c)) in m::word_positions(kt, nt, i, j).iter().enumerate() {
                            assert_eq!(marlin_locate(r, c, n), (m::word_index(kt, nt, i, j, n), nib));
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn repack_kernels_match_the_reference() {
        let mut rng = Rng::new(31);
        // K: one partial strip, exact strips, strips plus a 16-row tail; N: one and several tiles.
        for (k, n) in [(16usize, 64usize), (48, 128), (128, 64), (272, 192), (512, 64)] {
            let src = random_words(&mut rng, k / 8 * n);
            let perm = random_perm(&mut rng, k);
            let mut inv = vec![0i32; k];
            for (r, &p) in perm.iter().enumerate() {
                inv[p as usize] = r as i32;
            }
            let units = unit_count(1, k, n);
            for grid in [1, 3, units] {
                let ctx = format!("k {k} n {n} grid {grid}");
                // src read as GPTQ [K/8, N] and, separately, as compressed-tensors [N, K/8].
                let want_g = m::gptq_marlin_repack(&src, None, k, n).unwrap();
                assert_eq!(repack(false, &src, None, 1, k, n, grid), want_g, "{ctx} gptq");
                let want_c = m::ct_marlin_repack(&src, None, k, n).unwrap();
                assert_eq!(repack(true, &src, None, 1, k, n, grid), want_c, "{ctx} ct");
                let want_gp = m::gptq_marlin_repack(&src, Some(&perm), k, n).unwrap();
                assert_eq!(repack(false, &src, Some(&perm), 1, k, n, grid), want_gp, "{ctx} gptq perm");
                let want_cp = m::ct_marlin_repack(&src, Some(&perm), k, n).unwrap();
                assert_eq!(repack(true, &src, Some(&perm), 1, k, n, grid), want_cp, "{ctx} ct perm");
                // Inverses.
                assert_eq!(unrepack(false, &want_g, 1, k, n, grid), m::marlin_to_gptq(&want_g, None, k, n).unwrap());
                assert_eq!(unrepack(true, &want_c, 1, k, n, grid), m::marlin_to_ct(&want_c, None, k, n).unwrap());
                assert_eq!(unrepack(false, &want_g, 1, k, n, grid), src, "{ctx} gptq round trip");
                assert_eq!(unrepack(true, &want_c, 1, k, n, grid), src, "{ctx} ct round trip");
            }
            assert_eq!(unrepack_gather(false, &want_perm(&src, &perm, k, n, false), &inv, 1, k, n), src);
            assert_eq!(unrepack_gather(true, &want_perm(&src, &perm, k, n, true), &inv, 1, k, n), src);
            assert_eq!(
                unrepack_gather(false, &m::gptq_marlin_repack(&src, Some(&perm), k, n).unwrap(), &inv, 1, k, n),
                m::marlin_to_gptq(&m::gptq_marlin_repack(&src, Some(&perm), k, n).unwrap(), Some(&perm), k, n).unwrap()
            );
            // Batched (stacked experts): matrix b of the batch equals the single-matrix result.
            let src3 = random_words(&mut rng, 3 * (k / 8) * n);
            let got = repack(true, &src3, Some(&perm), 3, k, n, 5);
            let mw = k / 16 * 2 * n;
            for b in 0..3 {
                let one = &src3[b * (k / 8) * n..(b + 1) * (k / 8) * n];
                assert_eq!(&got[b * mw..(b + 1) * mw], m::ct_marlin_repack(one, Some(&perm), k, n).unwrap());
                assert_eq!(&unrepack_gather(true, &got, &inv, 3, k, n)[b * (k / 8) * n..(b + 1) * (k / 8) * n], one);
            }
        }
    }

    fn want_perm(src: &[i32], perm: &[i32], k: usize, n: usize, ct: bool) -> Vec<i32> {
        if ct {
            m::ct_marlin_repack(src, Some(perm), k, n).unwrap()
        } else {
            m::gptq_marlin_repack(src, Some(perm), k, n).unwrap()
        }
    }

    #[test]
    fn scale_kernels_match_the_reference() {
        let mut rng = Rng::new(32);
        for (k, n, gs) in [
            (256usize, 64usize, GroupSize::Group(32)),
            (256, 192, GroupSize::Group(128)),
            (128, 128, GroupSize::Group(64)),
            (256, 192, GroupSize::Channelwise),
            (16, 64, GroupSize::Channelwise),
        ] {
            let shape = QuantShape::new(n, k, gs).unwrap();
            let (groups, cw) = (shape.groups_per_row(), m::channelwise_scales(k, shape.group));
            let s: Vec<u16> = (0..groups * n).map(|_| rng.next_u64() as u16).collect();
            let want = m::marlin_permute_scales(&s, k, n, shape.group).unwrap();
            assert_eq!(permute_scales(false, &s, 1, groups, n, cw, false), want, "{k} {n} {gs}");
            assert_eq!(permute_scales(true, &want, 1, groups, n, cw, false), s);
            // compressed-tensors side: [n, groups].
            let s_ct = quant::transpose(&s, groups, n).unwrap();
            assert_eq!(permute_scales(false, &s_ct, 1, groups, n, cw, true), want, "{k} {n} {gs} ct");
            assert_eq!(permute_scales(true, &want, 1, groups, n, cw, true), s_ct);
        }
    }

    fn check_sync_kernel<T: lowbit::Float, S: ScaleFloat>(rng: &mut Rng, n: usize, k: usize, gs: GroupSize) {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let mut w: Vec<T> = rng.normal_vec(n * k, 0.02);
        // Exact ties and a zero group, so rounding and the minimum scale are exercised.
        for (i, v) in w.iter_mut().enumerate().take(k) {
            *v = T::from_f32(if i % 3 == 0 { 0.0 } else { 0.5 * (i % 15) as f32 - 3.5 });
        }
        let (want_q, want_s) = m::quantize_to_marlin::<T, S>(&w, &shape).unwrap();
        let units = unit_count(1, k, n);
        for grid in [1, units] {
            let (q, s) = sync::<T, S>(&w, n, k, shape.group, grid);
            assert_eq!(q, want_q, "n {n} k {k} {gs} grid {grid}: qweight");
            assert_eq!(bits(&s), bits(&want_s), "n {n} k {k} {gs} grid {grid}: scales");
        }
    }

    #[test]
    fn weight_sync_kernel_matches_the_reference() {
        let mut rng = Rng::new(33);
        for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            check_sync_kernel::<bf16, bf16>(&mut rng, 64, 256, gs);
            check_sync_kernel::<f16, f16>(&mut rng, 128, 384, gs);
            check_sync_kernel::<f32, bf16>(&mut rng, 64, 128, gs);
            check_sync_kernel::<bf16, f16>(&mut rng, 64, 640, gs);
        }
        // Channelwise with K of one tile / below the inline group sizes.
        check_sync_kernel::<bf16, bf16>(&mut rng, 64, 16, GroupSize::Channelwise);
        check_sync_kernel::<bf16, bf16>(&mut rng, 64, 32, GroupSize::Channelwise);
        check_sync_kernel::<bf16, bf16>(&mut rng, 64, 48, GroupSize::Channelwise);
    }
}
