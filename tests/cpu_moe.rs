//! CPU reference tests for the MoE math (DESIGN §4): alignment invariants over the full
//! grid, vLLM's block-size heuristic, both gating schemes, the MoE layer, expert parallelism and
//! the QAT consistency property. Runs everywhere.
//!
//! The sequential CPU emulation of the kernels' index arithmetic that used to live here is retired
//! (DESIGN §7): `tests/gpu_moe_routing.rs` on lowbit-sim runs the real kernels, bit for bit against
//! these references, with the simulator's bounds, race, barrier and initialisation checks on every
//! launch.

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
