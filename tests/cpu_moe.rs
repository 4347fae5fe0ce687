//! CPU reference tests for the MoE math (DESIGN §4): alignment invariants over the full
//! grid, vLLM's block-size heuristic, both gating schemes, the MoE layer, expert parallelism and
//! the QAT consistency property. Runs everywhere.

use lowbit::format::{GroupSize, QuantShape};
use lowbit::moe::{align_capacity, choose_block_size, GroupedTopK};
use lowbit::reference::moe::{self as rm, MoeDims, PackedExperts};
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Error};

/// `topk` distinct experts per token, uniformly at random.
fn random_ids(rng: &mut Rng, tokens: usize, topk: usize, experts: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * topk);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::with_capacity(topk);
        while row.len() < topk {
            let e = rng.below(experts) as i32;
            if !row.contains(&e) {
                row.push(e);
            }
        }
        ids.extend(row);
    }
    ids
}

/// Every invariant of an alignment, checked from the definition.
fn check_alignment(a: &rm::Alignment, ids: &[i32], tokens: usize, topk: usize, experts: usize, map: Option<&[i32]>) {
    let bs = a.block_size;
    let slots = tokens * topk;
    let ctx = format!("tokens {tokens} topk {topk} experts {experts} block {bs} map {}", map.is_some());
    assert_eq!(a.sorted_token_ids.len(), align_capacity(slots, experts, bs), "{ctx}: capacity");
    assert!(a.sorted_token_ids.len() <= (slots + experts * (bs - 1)).div_ceil(bs) * bs, "{ctx}: within vLLM's bound");
    assert_eq!(a.expert_ids.len() * bs, a.sorted_token_ids.len(), "{ctx}: one expert id per block");
    // Every slot exactly once; everything else is the sentinel.
    let mut seen = vec![0u8; slots];
    for &s in &a.sorted_token_ids {
        if s == slots as i32 {
            continue;
        }
        assert!((0..slots as i32).contains(&s), "{ctx}: entry {s}");
        seen[s as usize] += 1;
    }
    assert!(seen.iter().all(|&c| c == 1), "{ctx}: every slot exactly once");
    // Counts padded to the block size, experts in ascending order, slots ascending within one.
    let mut counts = vec![0usize; experts];
    for &e in ids {
        counts[e as usize] += 1;
    }
    let ntpp: usize = counts.iter().map(|c| c.div_ceil(bs) * bs).sum();
    assert_eq!(a.num_tokens_post_padded, ntpp, "{ctx}: num_tokens_post_padded");
    let mut pos = 0;
    for (e, &c) in counts.iter().enumerate() {
        let seg = &a.sorted_token_ids[pos..pos + c.div_ceil(bs) * bs];
        let (real, pad) = seg.split_at(c);
        assert!(real.windows(2).all(|w| w[0] < w[1]), "{ctx}: expert {e} in slot order");
        assert!(real.iter().all(|&s| ids[s as usize] == e as i32), "{ctx}: expert {e} holds its slots");
        assert!(pad.iter().all(|&s| s == slots as i32), "{ctx}: expert {e} padding");
        let label = map.map_or(e as i32, |m| m[e]);
        for b in pos / bs..(pos + seg.len()) / bs {
            assert_eq!(a.expert_ids[b], label, "{ctx}: block {b} of expert {e}");
        }
        pos += seg.len();
    }
    assert!(a.sorted_token_ids[ntpp..].iter().all(|&s| s == slots as i32), "{ctx}: tail sentinel");
    assert!(a.expert_ids[ntpp / bs..].iter().all(|&e| e == -1), "{ctx}: unused blocks are -1");
}

#[test]
fn align_full_grid() {
    let mut rng = Rng::new(1);
    for tokens in [1usize, 3, 256, 2256, 4096] {
        for topk in [1usize, 2, 8, 16] {
            for experts in [32usize, 128, 257, 384] {
                let ids = random_ids(&mut rng, tokens, topk, experts);
                // An EP map: this rank owns every third expert.
                let map: Vec<i32> = (0..experts).map(|g| if g % 3 == 1 { (g / 3) as i32 } else { -1 }).collect();
                for bs in [8usize, 16, 32, 64, 128] {
                    let a = rm::moe_align_block_size(&ids, tokens, topk, experts, bs, None).unwrap();
                    check_alignment(&a, &ids, tokens, topk, experts, None);
                    if tokens == 256 || tokens == 3 {
                        let a = rm::moe_align_block_size(&ids, tokens, topk, experts, bs, Some(&map)).unwrap();
                        check_alignment(&a, &ids, tokens, topk, experts, Some(&map));
                    }
                }
            }
        }
    }
}

#[test]
fn align_matches_vllm_docstring_example() {
    // vLLM's example: topk_ids = [[2,3,4],[1,2,4],[1,3,4],[1,2,3]] (1-based experts there), block 4.
    let ids: Vec<i32> = [[2, 3, 4], [1, 2, 4], [1, 3, 4], [1, 2, 3]].iter().flatten().map(|&e| e - 1).collect();
    let a = rm::moe_align_block_size(&ids, 4, 3, 4, 4, None).unwrap();
    assert_eq!(&a.sorted_token_ids[..16], &[3, 6, 9, 12, 0, 4, 10, 12, 1, 7, 11, 12, 2, 5, 8, 12]);
    assert_eq!(&a.expert_ids[..4], &[0, 1, 2, 3]);
    assert_eq!(a.num_tokens_post_padded, 16);
}

#[test]
fn align_bad_input() {
    assert!(matches!(rm::moe_align_block_size(&[0, 5], 1, 2, 4, 8, None), Err(Error::InvalidArgument { .. })));
    assert!(matches!(rm::moe_align_block_size(&[0, -1], 1, 2, 4, 8, None), Err(Error::InvalidArgument { .. })));
    assert!(rm::moe_align_block_size(&[0; 5], 1, 5, 4, 8, None).is_err(), "topk > E");
    assert!(rm::moe_align_block_size(&[0, 1], 1, 2, 4, 0, None).is_err(), "block 0");
    assert!(rm::moe_align_block_size(&[0, 1], 1, 2, 4, 8, Some(&[0, 1, 2])).is_err(), "map length");
    assert!(rm::moe_align_block_size(&[0, 1], 1, 2, 4, 8, Some(&[0, 0, -1, -1])).is_err(), "map duplicate");
    assert!(rm::moe_align_block_size(&[0, 1], 1, 2, 4, 8, Some(&[0, -2, -1, -1])).is_err(), "map entry");
}

#[test]
fn block_size_heuristic_is_vllms() {
    // vLLM: for b in [8,16,32,48,64]: if M*topk/E/b < 0.9: break (64 when none breaks).
    let vllm = |m: usize, k: usize, e: usize| {
        let mut chosen = 64;
        for b in [8usize, 16, 32, 48, 64] {
            if (m * k) as f64 / e as f64 / (b as f64) < 0.9 {
                chosen = b;
                break;
            }
        }
        chosen
    };
    for m in [1usize, 16, 33, 64, 123, 256, 666, 1024, 2048, 4096, 65536] {
        for (e, k) in [(8usize, 2usize), (128, 8), (384, 8), (256, 8)] {
            assert_eq!(choose_block_size(m, k, e), vllm(m, k, e), "M {m} E {e} topk {k}");
        }
    }
    assert_eq!(choose_block_size(1, 8, 128), 8);
    assert_eq!(choose_block_size(2048, 8, 128), 64);
    assert_eq!(choose_block_size(256, 8, 128), 32); // 16/32 = 0.5
}

#[test]
fn softmax_topk_reference() {
    let logits = [1.0f32, 3.0, 2.0, 3.0, -1.0, 0.5];
    let r = rm::softmax_topk(&logits, 1, 6, 3, false).unwrap();
    assert_eq!(r.ids, vec![1, 3, 2], "ties go to the lower index");
    let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
    for (w, id) in r.weights.iter().zip(&r.ids) {
        assert!((*w as f64 - (logits[*id as usize] as f64).exp() / z).abs() < 1e-7);
    }
    let r = rm::softmax_topk(&logits, 1, 6, 3, true).unwrap();
    assert!((r.weights.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    // NaN ranks lowest; bf16 logits are accepted.
    let l2: Vec<bf16> = [f32::NAN, 0.0, 1.0].iter().map(|&v| bf16::from_f32(v)).collect();
    assert_eq!(rm::softmax_topk(&l2, 1, 3, 2, true).unwrap().ids, vec![2, 1]);
    // Bad input.
    assert!(rm::softmax_topk(&logits, 1, 6, 7, false).is_err());
    assert!(rm::softmax_topk(&logits, 1, 6, 0, false).is_err());
    assert!(rm::softmax_topk(&logits, 2, 6, 1, false).is_err());
}

#[test]
fn grouped_topk_reference() {
    // 8 experts in 4 groups of 2; keep 2 groups; top 2 experts.
    let logits = [0.0f32, 0.1, 2.0, -3.0, 1.0, 1.0, -1.0, 3.0];
    let cfg = GroupedTopK { topk: 2, n_group: 4, topk_group: 2, renormalize: false, routed_scaling_factor: 1.0 };
    let s: Vec<f32> = logits.iter().map(|&l| rm::sigmoid(l)).collect();
    // Group scores (sum of both members): g0 .. g3 = s0+s1, s2+s3, s4+s5, s6+s7 → g2 and g3 win.
    let r = rm::grouped_topk(&logits, 1, 8, None, &cfg).unwrap();
    assert_eq!(r.ids, vec![7, 4], "expert 2 (score 2.0) sits in a losing group; 4 and 5 tie → 4");
    assert_eq!(r.weights, vec![s[7], s[4]]);
    // The bias changes the selection but not the weights.
    let mut bias = vec![0f32; 8];
    bias[0] = 10.0;
    // Group scores are now g0 ≈ 11.0, g2 ≈ 1.46, g3 ≈ 1.22: groups 0 and 2 stay eligible.
    let r = rm::grouped_topk(&logits, 1, 8, Some(&bias), &cfg).unwrap();
    assert_eq!(r.ids, vec![0, 4]);
    assert_eq!(r.weights, vec![s[0], s[4]]);
    // Renormalisation and the scaling factor.
    let cfg2 = GroupedTopK { renormalize: true, routed_scaling_factor: 2.5, ..cfg };
    let r = rm::grouped_topk(&logits, 1, 8, Some(&bias), &cfg2).unwrap();
    let d = s[0] + s[4] + 1e-20;
    assert_eq!(r.weights, vec![s[0] / d * 2.5, s[4] / d * 2.5]);
    // Kimi-K2 style: one group is plain sigmoid top-k on biased scores.
    let kimi = GroupedTopK { topk: 3, n_group: 1, topk_group: 1, renormalize: true, routed_scaling_factor: 2.827 };
    let r = rm::grouped_topk(&logits, 1, 8, None, &kimi).unwrap();
    assert_eq!(r.ids, vec![7, 2, 4]);
    // Bad configurations.
    let bad = |c: GroupedTopK| rm::grouped_topk(&logits, 1, 8, None, &c).is_err();
    assert!(bad(GroupedTopK { n_group: 3, ..cfg }), "8 % 3 != 0");
    assert!(bad(GroupedTopK { topk: 5, ..cfg }), "only 4 eligible experts");
    assert!(bad(GroupedTopK { topk_group: 0, ..cfg }));
    assert!(bad(GroupedTopK { n_group: 64, ..cfg }));
    assert!(rm::grouped_topk(&logits, 1, 8, Some(&bias[..7]), &cfg).is_err());
}

#[test]
fn grouped_topk_matches_a_brute_force_definition() {
    // DeepSeek-V3 shape: 256 experts, 8 groups, keep 4, top 8.
    let mut rng = Rng::new(5);
    let (tokens, experts) = (64, 256);
    let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.normal()).collect();
    let bias: Vec<f32> = (0..experts).map(|_| rng.normal() * 0.1).collect();
    let cfg = GroupedTopK { topk: 8, n_group: 8, topk_group: 4, renormalize: true, routed_scaling_factor: 2.5 };
    let r = rm::grouped_topk(&logits, tokens, experts, Some(&bias), &cfg).unwrap();
    for t in 0..tokens {
        let sel: Vec<f32> = (0..experts).map(|e| rm::sigmoid(logits[t * experts + e]) + bias[e]).collect();
        let mut gs: Vec<(f32, usize)> = (0..8)
            .map(|g| {
                let mut m: Vec<f32> = sel[g * 32..(g + 1) * 32].to_vec();
                m.sort_by(|a, b| b.total_cmp(a));
                (m[0] + m[1], g)
            })
            .collect();
        gs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let keep: Vec<usize> = gs[..4].iter().map(|g| g.1).collect();
        let mut cand: Vec<(f32, usize)> =
            (0..experts).filter(|e| keep.contains(&(e / 32))).map(|e| (sel[e], e)).collect();
        cand.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let want: Vec<i32> = cand[..8].iter().map(|c| c.1 as i32).collect();
        assert_eq!(&r.ids[t * 8..(t + 1) * 8], &want[..], "token {t}");
        let sum: f32 = r.weights[t * 8..(t + 1) * 8].iter().sum();
        assert!((sum - 2.5).abs() < 1e-5, "renormalised weights sum to the scaling factor");
    }
}

/// A small dense MoE computed by hand.
#[test]
fn moe_ref_by_hand_and_expert_parallel() {
    // H = 2, I = 1, 2 experts, topk 2, one token.
    let x = [1.0f32, 2.0];
    // w13 per expert: [2I = 2, H = 2]: gate row, up row.
    let w13 = [1.0f32, 0.0, 0.0, 1.0, /* e1 */ 0.5, 0.5, 1.0, 1.0];
    // w2 per expert: [H = 2, I = 1].
    let w2 = [1.0f32, -1.0, /* e1 */ 2.0, 0.0];
    let dims = MoeDims { tokens: 1, hidden: 2, inter: 1, experts: 2, topk: 2 };
    let silu = |v: f64| v / (1.0 + (-v).exp());
    let a0 = silu(1.0) * 2.0;
    let a1 = silu(1.5) * 3.0;
    let (w0, w1) = (0.25f32, 0.75f32);
    let want = [w0 as f64 * a0 + w1 as f64 * 2.0 * a1, -(w0 as f64) * a0];
    let got = rm::moe_ref(&x, &dims, &w13, &w2, &[w0, w1], &[0, 1], None).unwrap();
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-6, "{got:?} vs {want:?}");
    }
    // EP: 4 global experts, this rank holds global 1 (local 0) and global 3 (local 1).
    let map = [-1, 0, -1, 1];
    let got = rm::moe_ref(&x, &dims, &w13, &w2, &[w0, w1], &[3, 2], Some(&map)).unwrap();
    let only = rm::moe_ref(&x, &MoeDims { topk: 1, ..dims }, &w13, &w2, &[w0], &[1], None).unwrap();
    assert_eq!(got, only, "non-local experts contribute zero");
    // Bad ids.
    assert!(rm::moe_ref(&x, &dims, &w13, &w2, &[w0, w1], &[0, 2], None).is_err());
    assert!(rm::moe_ref(&x, &dims, &w13, &w2, &[w0, w1], &[0, 4], Some(&map)).is_err());
}

/// The QAT consistency property on the MoE: the rollout MoE (compressed-tensors weights,
/// dequantized as the kernels do) equals the MoE on `fake_quant` weights, bit for bit.
#[test]
fn qat_consistency_rollout_equals_fake_quant() {
    let mut rng = Rng::new(9);
    let (tokens, hidden, inter, experts, topk) = (5usize, 128usize, 64usize, 4usize, 2usize);
    for g in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Channelwise] {
        let s13 = QuantShape::new(2 * inter, hidden, g).unwrap();
        let s2 = QuantShape::new(hidden, inter, g).unwrap();
        let w13: Vec<bf16> = rng.normal_vec(experts * s13.numel(), 0.1);
        let w2: Vec<bf16> = rng.normal_vec(experts * s2.numel(), 0.1);
        let x: Vec<bf16> = rng.normal_vec(tokens * hidden, 0.1);
        let ids = random_ids(&mut rng, tokens, topk, experts);
        let tw: Vec<f32> = (0..tokens * topk).map(|_| rng.uniform()).collect();
        let dims = MoeDims { tokens, hidden, inter, experts, topk };

        let p13 = PackedExperts::<bf16>::quantize(&w13, &s13, experts).unwrap();
        let p2 = PackedExperts::<bf16>::quantize(&w2, &s2, experts).unwrap();
        let rollout = rm::fused_moe_ref(&x, &dims, &p13, &p2, &tw, &ids, None).unwrap();

        let fq = |w: &[bf16], s: &QuantShape| -> Vec<f32> {
            w.chunks(s.numel()).flat_map(|e| rq::fake_quant::<bf16, bf16>(e, s).unwrap()).map(|v| v.to_f32()).collect()
        };
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let trainer = rm::moe_ref(&xf, &dims, &fq(&w13, &s13), &fq(&w2, &s2), &tw, &ids, None).unwrap();
        assert_eq!(
            rollout.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            trainer.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            "group {g}"
        );
    }
}

/// Sequential CPU emulations of `csrc/moe/align.cuh` and `csrc/moe/routing.cuh`: every warp and
/// lane runs in turn with the kernels' constants, chunking, 16-bit packed histograms, the
/// last-block scan (parts, batches, warp-shuffle scan), the `match_any` scatter, the padding
/// pass, and the gating kernels' warp arg-max / group top-2 butterflies. Results are compared
/// with the references; every output position must be written exactly once and within bounds.
mod kernel_emulation {
    use super::*;

    const MAX_EXPERTS: usize = 1024;
    const MAX_ROUNDS: usize = 16;
    const COUNT_WARPS: usize = 32;

    fn chunk_plan(slots: usize) -> (usize, usize) {
        let rounds = slots.div_ceil(64 * 32).clamp(1, MAX_ROUNDS);
        let chunk = 32 * rounds;
        (chunk, slots.div_ceil(chunk))
    }

    /// `block_exclusive_scan` with 1024 threads: shfl_up scans per warp, then over warp sums.
    fn block_exclusive_scan(x: &[i32]) -> (Vec<i32>, i32) {
        assert_eq!(x.len(), 1024);
        let mut incl = x.to_vec();
        for w in 0..32 {
            let mut off = 1;
            while off < 32 {
                let old: Vec<i32> = incl[w * 32..w * 32 + 32].to_vec();
                for lane in off..32 {
                    incl[w * 32 + lane] += old[lane - off];
                }
                off <<= 1;
            }
        }
        let s: Vec<i32> = (0..32).map(|w| incl[w * 32 + 31]).collect();
        let mut si = s.clone();
        let mut off = 1;
        while off < 32 {
            let old = si.clone();
            for lane in off..32 {
                si[lane] += old[lane - off];
            }
            off <<= 1;
        }
        let warp_excl: Vec<i32> = (0..32).map(|l| si[l] - s[l]).collect();
        let total = si[31];
        ((0..1024).map(|t| warp_excl[t / 32] + incl[t] - x[t]).collect(), total)
    }

    struct Aligned {
        sorted: Vec<i32>,
        expert_ids: Vec<i32>,
        ntpp: i32,
        bad: Option<usize>,
    }

    // Loops mirror the kernels' thread loops, indices included.
    #[allow(clippy::needless_range_loop)]
    fn align(ids: &[i32], e_count: usize, bs: usize, map: Option<&[i32]>) -> Aligned {
        let slots = ids.len();
        let capacity = align_capacity(slots, e_count, bs);
        let (chunk, nc) = chunk_plan(slots);
        let rounds = chunk / 32;
        let mut bad: Option<usize> = None;
        // ---- count: one warp per chunk, 16-bit counts packed two per word.
        let words = e_count.div_ceil(2);
        let mut chunk_counts = vec![0i32; nc * e_count];
        for c in 0..nc.div_ceil(COUNT_WARPS) * COUNT_WARPS {
            if c >= nc {
                continue;
            }
            let mut row = vec![0u32; words];
            for r in 0..MAX_ROUNDS {
                for lane in 0..32 {
                    let s = c * chunk + r * 32 + lane;
                    if r >= rounds || s >= slots {
                        continue;
                    }
                    let id = ids[s];
                    if id >= 0 && (id as usize) < e_count {
                        let w = &mut row[id as usize / 2];
                        *w = w.checked_add(1u32 << (16 * (id & 1))).expect("packed count overflow");
                    } else {
                        bad = Some(bad.map_or(s, |b| b.min(s)));
                    }
                }
            }
            for e in 0..e_count {
                chunk_counts[c * e_count + e] = ((row[e / 2] >> (16 * (e & 1))) & 0xffff) as i32;
            }
        }
        // Independent check of the 16-bit counts.
        for c in 0..nc {
            for e in 0..e_count {
                let n = (c * chunk..((c + 1) * chunk).min(slots)).filter(|&s| ids[s] == e as i32).count();
                assert_eq!(chunk_counts[c * e_count + e] as usize, n, "chunk {c} expert {e}");
            }
        }
        // ---- align_scan in the last block (1024 threads).
        let parts = 32usize.min(1.max(MAX_EXPERTS / e_count));
        assert!(parts * e_count <= MAX_EXPERTS, "partial[] holds parts·E");
        let per_part = nc.div_ceil(parts);
        const BATCH: usize = 16;
        let mut partial = vec![0i32; MAX_EXPERTS];
        for task in 0..parts * e_count {
            let (e, c0) = (task % e_count, (task / e_count) * per_part);
            let c1 = nc.min(c0 + per_part);
            let mut s = 0;
            let mut c = c0;
            while c < c1 {
                for j in 0..BATCH {
                    if c + j < c1 {
                        s += chunk_counts[(c + j) * e_count + e];
                    }
                }
                c += BATCH;
            }
            partial[task] = s;
        }
        let mut padded = vec![0i32; 1024];
        let mut count = vec![0i32; 1024];
        for t in 0..e_count {
            for q in 0..parts {
                let v = partial[q * e_count + t];
                partial[q * e_count + t] = count[t];
                count[t] += v;
            }
            padded[t] = (count[t] + bs as i32 - 1) / bs as i32 * bs as i32;
        }
        let (base, total) = block_exclusive_scan(&padded);
        let expert_base: Vec<i32> = base[..e_count].to_vec();
        let expert_count: Vec<i32> = count[..e_count].to_vec();
        for t in 0..e_count {
            for q in 0..parts {
                partial[q * e_count + t] += base[t];
            }
        }
        for task in 0..parts * e_count {
            let (e, c0) = (task % e_count, (task / e_count) * per_part);
            let c1 = nc.min(c0 + per_part);
            let mut run = partial[task];
            for c in c0..c1 {
                let v = chunk_counts[c * e_count + e];
                chunk_counts[c * e_count + e] = run;
                run += v;
            }
        }
        assert!(total as usize <= capacity, "num_tokens_post_padded {total} within capacity {capacity}");
        // ---- scatter: one warp per chunk, match_any ranks; then padding and labels.
        let mut sorted = vec![None::<i32>; capacity];
        let mut eids = vec![None::<i32>; capacity / bs];
        let put = |v: &mut Vec<Option<i32>>, i: usize, x: i32, what: &str| {
            assert!(i < v.len(), "{what} write at {i} past {}", v.len());
            assert!(v[i].is_none(), "{what}[{i}] written twice");
            v[i] = Some(x);
        };
        for c in 0..nc {
            let mut off: Vec<i32> = chunk_counts[c * e_count..(c + 1) * e_count].to_vec();
            for r in 0..rounds {
                let keys: Vec<i32> = (0..32)
                    .map(|lane| {
                        let s = c * chunk + r * 32 + lane;
                        if s < slots && ids[s] >= 0 && (ids[s] as usize) < e_count {
                            ids[s]
                        } else {
                            -1
                        }
                    })
                    .collect();
                let peers: Vec<u32> =
                    (0..32).map(|l| (0..32).filter(|&o| keys[o] == keys[l]).fold(0u32, |m, o| m | 1 << o)).collect();
                let pos: Vec<i32> = (0..32)
                    .map(|l| {
                        if keys[l] < 0 {
                            0
                        } else {
                            off[keys[l] as usize] + (peers[l] & ((1u32 << l) - 1)).count_ones() as i32
                        }
                    })
                    .collect();
                for l in 0..32 {
                    if keys[l] >= 0 {
                        put(&mut sorted, pos[l] as usize, (c * chunk + r * 32 + l) as i32, "sorted_token_ids");
                        if peers[l] & ((1u32 << l) - 1) == 0 {
                            off[keys[l] as usize] += peers[l].count_ones() as i32;
                        }
                    }
                }
            }
        }
        let sentinel = slots as i32;
        for e in 0..e_count {
            let (b0, cnt) = (expert_base[e], expert_count[e]);
            let padded = (cnt + bs as i32 - 1) / bs as i32 * bs as i32;
            for i in cnt..padded {
                put(&mut sorted, (b0 + i) as usize, sentinel, "sorted_token_ids padding");
            }
            let label = map.map_or(e as i32, |m| m[e]);
            for b in b0 / bs as i32..(b0 + padded) / bs as i32 {
                put(&mut eids, b as usize, label, "expert_ids");
            }
        }
        for i in total as usize..capacity {
            put(&mut sorted, i, sentinel, "sorted_token_ids tail");
        }
        for b in total as usize / bs..capacity / bs {
            put(&mut eids, b, -1, "expert_ids tail");
        }
        Aligned {
            sorted: sorted.into_iter().map(|v| v.expect("every sorted_token_ids entry written")).collect(),
            expert_ids: eids.into_iter().map(|v| v.expect("every expert id written")).collect(),
            ntpp: total,
            bad,
        }
    }

    #[test]
    fn align_kernels_match_the_reference() {
        let mut rng = Rng::new(21);
        for tokens in [1usize, 3, 256, 2256, 4097] {
            for topk in [1usize, 2, 8] {
                for experts in [1usize, 2, 32, 257, 384, 1024] {
                    if topk > experts {
                        continue;
                    }
                    let ids = random_ids(&mut rng, tokens, topk, experts);
                    let map: Vec<i32> = (0..experts).map(|g| if g % 3 == 1 { (g / 3) as i32 } else { -1 }).collect();
                    for bs in [1usize, 8, 16, 48, 64] {
                        let ctx = format!("tokens {tokens} topk {topk} experts {experts} block {bs}");
                        for m in [None, Some(map.as_slice())] {
                            let want = rm::moe_align_block_size(&ids, tokens, topk, experts, bs, m).unwrap();
                            let got = align(&ids, experts, bs, m);
                            assert_eq!(got.bad, None, "{ctx}");
                            assert_eq!(got.ntpp as usize, want.num_tokens_post_padded, "{ctx}");
                            assert_eq!(got.sorted, want.sorted_token_ids, "{ctx}: sorted_token_ids");
                            assert_eq!(got.expert_ids, want.expert_ids, "{ctx}: expert_ids");
                        }
                    }
                }
            }
        }
        // A skewed routing (every slot to one expert: the largest per-chunk count, 512) and
        // the chunk plan's round limit.
        let ids = vec![5i32; 40_000];
        let want = rm::moe_align_block_size(&ids, 40_000, 1, 8, 64, None).unwrap();
        let got = align(&ids, 8, 64, None);
        assert_eq!(got.sorted, want.sorted_token_ids);
        assert_eq!(got.expert_ids, want.expert_ids);
    }

    #[test]
    fn align_kernels_skip_and_report_bad_ids() {
        let ids = [0i32, 3, 1, 7, 2, -1, 1, 1];
        let got = align(&ids, 4, 8, None);
        assert_eq!(got.bad, Some(3));
        // The good slots are still laid out exactly as the reference lays out the good ones.
        let good: Vec<i32> = ids.iter().map(|&e| if (0..4).contains(&e) { e } else { 0 }).collect();
        let want = rm::moe_align_block_size(&good, 4, 2, 4, 8, None).unwrap();
        let strip = |v: &[i32]| v.iter().copied().filter(|&s| s != 3 && s != 5).collect::<Vec<_>>();
        assert_eq!(strip(&got.sorted).len(), got.sorted.len());
        assert!(got.ntpp as usize <= want.num_tokens_post_padded);
    }

    // ---- gating ----------------------------------------------------------------------------

    fn rank_key(x: f32) -> f32 {
        if x.is_nan() {
            f32::NEG_INFINITY
        } else {
            x
        }
    }
    fn ranks_before(av: f32, ai: i32, bv: f32, bi: i32) -> bool {
        if av != bv {
            return av > bv;
        }
        let (an, bn) = (av.is_sign_negative(), bv.is_sign_negative());
        if an != bn {
            return bn;
        }
        ai < bi
    }
    fn warp_argbest(v: &mut [(f32, i32); 32]) {
        let mut off = 16;
        while off > 0 {
            let old = *v;
            for l in 0..32 {
                let (ov, oi) = old[l ^ off];
                if ranks_before(ov, oi, old[l].0, old[l].1) {
                    v[l] = (ov, oi);
                }
            }
            off >>= 1;
        }
        assert!(v.iter().all(|&x| x.0.to_bits() == v[0].0.to_bits() && x.1 == v[0].1), "lanes agree");
    }
    fn next_pick(sel: &[f32], group_size: usize, gmask: u32, pv: f32, pi: i32) -> (f32, i32) {
        let mut lanes = [(f32::NEG_INFINITY, i32::MAX); 32];
        for (lane, best) in lanes.iter_mut().enumerate() {
            let mut e = lane;
            while e < sel.len() {
                if (gmask >> (e / group_size)) & 1 == 1 {
                    let v = sel[e];
                    if ranks_before(pv, pi, v, e as i32) && ranks_before(v, e as i32, best.0, best.1) {
                        *best = (v, e as i32);
                    }
                }
                e += 32;
            }
        }
        warp_argbest(&mut lanes);
        lanes[0]
    }

    /// One token row of `topk_gating<L, GROUPED>`; grouped scores use the reference's sigmoid so
    /// that the weights can be compared bit for bit.
    #[allow(clippy::too_many_arguments)]
    fn gate_row(
        logits: &[f32],
        bias: Option<&[f32]>,
        grouped: bool,
        topk: usize,
        n_group: usize,
        topk_group: usize,
        renorm: bool,
        rsf: f32,
    ) -> (Vec<i32>, Vec<f32>) {
        let e_count = logits.len();
        let score: Vec<f32> = logits.iter().map(|&l| rm::sigmoid(l)).collect();
        let sel: Vec<f32> = if grouped {
            (0..e_count).map(|e| rank_key(score[e] + bias.map_or(0.0, |b| b[e]))).collect()
        } else {
            logits.iter().map(|&l| rank_key(l)).collect()
        };
        let mut gmask = u32::MAX;
        let mut group_size = e_count;
        let mx = sel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if grouped {
            group_size = e_count / n_group;
            let topk_group = topk_group.min(n_group); // the host clamps
            if topk_group < n_group {
                let mut gscore = [f32::NEG_INFINITY; 32];
                for (g, gs_out) in gscore.iter_mut().enumerate().take(n_group) {
                    let mut ab = [(f32::NEG_INFINITY, f32::NEG_INFINITY); 32];
                    for (lane, (a, b)) in ab.iter_mut().enumerate() {
                        let mut e = g * group_size + lane;
                        while e < (g + 1) * group_size {
                            let v = sel[e];
                            if v > *a {
                                *b = *a;
                                *a = v;
                            } else if v > *b {
                                *b = v;
                            }
                            e += 32;
                        }
                    }
                    let mut off = 16;
                    while off > 0 {
                        let old = ab;
                        for l in 0..32 {
                            let (oa, ob) = old[l ^ off];
                            let (a, b) = old[l];
                            ab[l] = if oa >= a { (oa, a.max(ob)) } else { (a, b.max(oa)) };
                        }
                        off >>= 1;
                    }
                    assert!(ab.iter().all(|&x| x == ab[0]), "group top-2 agrees across lanes");
                    let (a, b) = ab[0];
                    *gs_out = rank_key(if group_size == 1 { a } else { a + b });
                }
                gmask = 0;
                let (mut pv, mut pi) = (f32::INFINITY, -1);
                for _ in 0..topk_group {
                    let mut lanes = [(f32::NEG_INFINITY, i32::MAX); 32];
                    for (lane, c) in lanes.iter_mut().enumerate() {
                        if lane < n_group && ranks_before(pv, pi, gscore[lane], lane as i32) {
                            *c = (gscore[lane], lane as i32);
                        }
                    }
                    warp_argbest(&mut lanes);
                    assert!((0..n_group as i32).contains(&lanes[0].1), "a group is always found");
                    gmask |= 1 << lanes[0].1;
                    (pv, pi) = lanes[0];
                }
            }
        }
        let (mut pv, mut pi) = (f32::INFINITY, -1);
        let (mut ids, mut w) = (Vec::new(), Vec::new());
        let mut total = 0f32;
        for _ in 0..topk {
            (pv, pi) = next_pick(&sel, group_size, gmask, pv, pi);
            assert!((0..e_count as i32).contains(&pi), "a pick is always found");
            let x = if grouped { score[pi as usize] } else { (pv - mx).exp() };
            total += x;
            ids.push(pi);
            w.push(x);
        }
        if grouped {
            let d = if renorm { total + 1e-20 } else { 1.0 };
            w.iter_mut().for_each(|x| *x = *x / d * rsf);
        } else {
            // Per-lane strided sums, then the xor butterfly, as the kernel adds them.
            let mut lanes = [0f32; 32];
            for (lane, acc) in lanes.iter_mut().enumerate() {
                *acc = sel.iter().skip(lane).step_by(32).map(|&v| (v - mx).exp()).fold(0f32, |a, x| a + x);
            }
            let mut off = 16;
            while off > 0 {
                let old = lanes;
                for l in 0..32 {
                    lanes[l] = old[l] + old[l ^ off];
                }
                off >>= 1;
            }
            let denom = lanes[0];
            let d = if renorm { total } else { denom };
            w.iter_mut().for_each(|x| *x /= d);
        }
        (ids, w)
    }

    #[test]
    fn gating_selection_matches_the_reference() {
        let mut rng = Rng::new(22);
        // Softmax: random logits, heavy ties (bf16-like coarse values), NaN, ±0 and ±inf.
        for (tokens, experts, topk) in [(40usize, 8usize, 2usize), (20, 60, 4), (10, 384, 8), (4, 1024, 32), (8, 5, 5)]
        {
            for renorm in [false, true] {
                let mut logits: Vec<f32> = (0..tokens * experts).map(|_| (rng.normal() * 4.0).round() / 4.0).collect();
                for (i, l) in logits.iter_mut().enumerate() {
                    match i % 37 {
                        3 => *l = f32::NAN,
                        5 => *l = -0.0,
                        6 => *l = 0.0,
                        7 => *l = f32::NEG_INFINITY,
                        _ => {}
                    }
                }
                let want = rm::softmax_topk(&logits, tokens, experts, topk, renorm).unwrap();
                for t in 0..tokens {
                    let row = &logits[t * experts..(t + 1) * experts];
                    let (ids, w) = gate_row(row, None, false, topk, 1, 1, renorm, 1.0);
                    assert_eq!(ids, &want.ids[t * topk..(t + 1) * topk], "softmax token {t} experts {experts}");
                    for (g, r) in w.iter().zip(&want.weights[t * topk..(t + 1) * topk]) {
                        // The GPU test's tolerance (f32 exp and sums against the f64 reference).
                        assert!((g - r).abs() <= 2e-6 * r.abs().max(1e-3), "{g} vs {r}");
                    }
                }
            }
        }
        // Grouped: DeepSeek-V3, Kimi-K2, many small groups, one-expert groups, ties, NaN.
        let configs = [
            (
                256usize,
                GroupedTopK { topk: 8, n_group: 8, topk_group: 4, renormalize: true, routed_scaling_factor: 2.5 },
            ),
            (384, GroupedTopK { topk: 8, n_group: 1, topk_group: 1, renormalize: true, routed_scaling_factor: 2.827 }),
            (64, GroupedTopK { topk: 6, n_group: 32, topk_group: 3, renormalize: false, routed_scaling_factor: 1.0 }),
            (32, GroupedTopK { topk: 3, n_group: 32, topk_group: 5, renormalize: true, routed_scaling_factor: 1.0 }),
            (96, GroupedTopK { topk: 4, n_group: 3, topk_group: 9, renormalize: true, routed_scaling_factor: 1.5 }),
        ];
        for (experts, cfg) in configs {
            for coarse in [false, true] {
                let tokens = 64;
                let mut logits: Vec<f32> = (0..tokens * experts)
                    .map(|_| if coarse { (rng.normal() * 2.0).round() } else { rng.normal() * 2.0 })
                    .collect();
                logits.iter_mut().step_by(41).for_each(|l| *l = f32::NAN);
                let bias: Vec<f32> = (0..experts).map(|_| if coarse { 0.0 } else { rng.normal() * 0.05 }).collect();
                let want = rm::grouped_topk(&logits, tokens, experts, Some(&bias), &cfg).unwrap();
                let k = cfg.topk;
                for t in 0..tokens {
                    let row = &logits[t * experts..(t + 1) * experts];
                    let (ids, w) = gate_row(
                        row,
                        Some(&bias),
                        true,
                        k,
                        cfg.n_group,
                        cfg.topk_group,
                        cfg.renormalize,
                        cfg.routed_scaling_factor,
                    );
                    let ctx = format!("grouped token {t} experts {experts} {cfg:?}");
                    assert_eq!(ids, &want.ids[t * k..(t + 1) * k], "{ctx}");
                    let wb: Vec<u32> = w.iter().map(|x| x.to_bits()).collect();
                    let rb: Vec<u32> = want.weights[t * k..(t + 1) * k].iter().map(|x| x.to_bits()).collect();
                    assert_eq!(wb, rb, "{ctx}: weights bit for bit");
                }
            }
        }
    }
}
