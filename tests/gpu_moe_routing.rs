//! GPU tests of the MoE routing kernels against the CPU reference: `moe_align_block_size` over
//! the full grid (exact: the kernel's order within an expert is ascending slot index, the
//! same as the reference; ids per expert are also compared as sets), determinism, expert maps,
//! both gating schemes, and bad input; the single-block (decode) and two-kernel alignments agree
//! bit for bit on every element, and the device-side status word accumulates until checked.
//! Skips without a GPU.

mod common;

use std::collections::BTreeSet;

use lowbit::moe::{self, AlignKernels, AlignWorkspace, ExpertMap, GroupedTopK};
use lowbit::reference::moe as rm;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Error};

fn random_ids(rng: &mut Rng, tokens: usize, topk: usize, experts: usize) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * topk);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::new();
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

/// The slots of every expert segment, as sets.
fn segments(sorted: &[i32], expert_ids: &[i32], bs: usize, ntpp: usize, sentinel: i32) -> Vec<(i32, BTreeSet<i32>)> {
    let mut out: Vec<(i32, BTreeSet<i32>)> = Vec::new();
    for b in 0..ntpp / bs {
        let set: BTreeSet<i32> = sorted[b * bs..(b + 1) * bs].iter().copied().filter(|&s| s != sentinel).collect();
        out.push((expert_ids[b], set));
    }
    out
}

#[test]
fn align_matches_reference_on_the_full_grid() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(11);
    for tokens in [1usize, 3, 256, 2256, 4096] {
        for topk in [1usize, 2, 8, 16] {
            for experts in [32usize, 128, 257, 384] {
                let ids = random_ids(&mut rng, tokens, topk, experts);
                let d_ids = dev.htod(&ids).unwrap();
                for bs in [8usize, 16, 32, 64, 128] {
                    let ctx = format!("tokens {tokens} topk {topk} experts {experts} block {bs}");
                    let want = rm::moe_align_block_size(&ids, tokens, topk, experts, bs, None).unwrap();
                    let got = moe::moe_align_block_size(&dev, &d_ids, tokens, topk, experts, bs, None).unwrap();
                    let ntpp = dev.dtoh(got.num_tokens_post_padded()).unwrap()[0] as usize;
                    let sorted = dev.dtoh(got.sorted_token_ids()).unwrap();
                    let eids = dev.dtoh(got.expert_ids()).unwrap();
                    assert_eq!(ntpp, want.num_tokens_post_padded, "{ctx}");
                    assert_eq!(eids, want.expert_ids, "{ctx}: expert ids");
                    let sentinel = (tokens * topk) as i32;
                    assert_eq!(
                        segments(&sorted, &eids, bs, ntpp, sentinel),
                        segments(&want.sorted_token_ids, &want.expert_ids, bs, ntpp, sentinel),
                        "{ctx}: ids per expert as sets"
                    );
                    assert_eq!(sorted, want.sorted_token_ids, "{ctx}: exact order (ascending slot per expert)");
                    if tokens * topk <= moe::SINGLE_BLOCK_MAX_SLOTS {
                        // Auto ran the single-block kernel: the two-kernel path gives the same bits.
                        let two = moe::moe_align_block_size_with(
                            &dev,
                            &d_ids,
                            tokens,
                            topk,
                            experts,
                            bs,
                            None,
                            AlignKernels::TwoKernel,
                        )
                        .unwrap();
                        assert_eq!(dev.dtoh(two.sorted_token_ids()).unwrap(), sorted, "{ctx}: two-kernel path");
                        assert_eq!(dev.dtoh(two.expert_ids()).unwrap(), eids, "{ctx}: two-kernel path");
                        assert_eq!(dev.dtoh(two.num_tokens_post_padded()).unwrap()[0] as usize, ntpp);
                    }
                }
            }
        }
    }
}

#[test]
fn align_is_deterministic_and_supports_expert_maps() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(12);
    let (tokens, topk, experts, bs) = (4096, 8, 384, 64);
    let ids = random_ids(&mut rng, tokens, topk, experts);
    let d_ids = dev.htod(&ids).unwrap();
    let run = |map: Option<&ExpertMap>| {
        let a = moe::moe_align_block_size(&dev, &d_ids, tokens, topk, experts, bs, map).unwrap();
        (
            dev.dtoh(a.sorted_token_ids()).unwrap(),
            dev.dtoh(a.expert_ids()).unwrap(),
            dev.dtoh(a.num_tokens_post_padded()).unwrap(),
        )
    };
    let first = run(None);
    for _ in 0..5 {
        assert_eq!(run(None), first, "bit-identical across runs");
    }
    for rank in 0..4 {
        let map = ExpertMap::contiguous(&dev, experts, 4, rank).unwrap();
        let want = rm::moe_align_block_size(&ids, tokens, topk, experts, bs, Some(map.as_slice())).unwrap();
        let (sorted, eids, ntpp) = run(Some(&map));
        assert_eq!(sorted, want.sorted_token_ids, "rank {rank}");
        assert_eq!(eids, want.expert_ids, "rank {rank}");
        assert_eq!(ntpp[0] as usize, want.num_tokens_post_padded);
    }
}

#[test]
fn align_rejects_bad_input() {
    let dev = gpu_or_skip!();
    let ids = dev.htod(&[0i32, 3, 1, 7, 2, 1]).unwrap();
    // Expert id 7 with 4 experts: a typed error naming token 1, k 1 — never an illegal access.
    match moe::moe_align_block_size(&dev, &ids, 3, 2, 4, 8, None) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains("token 1, k 1"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    let neg = dev.htod(&[0i32, -5]).unwrap();
    assert!(moe::moe_align_block_size(&dev, &neg, 1, 2, 4, 8, None).is_err());
    // The status word resets: a good call afterwards succeeds.
    let good = dev.htod(&[0i32, 3, 1, 2, 2, 1]).unwrap();
    assert!(moe::moe_align_block_size(&dev, &good, 3, 2, 4, 8, None).is_ok());
    assert!(moe::moe_align_block_size(&dev, &good, 1, 6, 4, 8, None).is_err(), "topk > E");
    assert!(moe::moe_align_block_size(&dev, &good, 4, 2, 4, 8, None).is_err(), "length");
    assert!(moe::moe_align_block_size(&dev, &good, 3, 2, 2000, 8, None).is_err(), "too many experts");
    assert!(ExpertMap::new(&dev, &[0, 0, -1, -1], 2).is_err());
    assert!(ExpertMap::new(&dev, &[0, 2, -1, -1], 2).is_err());
    let map = ExpertMap::new(&dev, &[0, 1, -1], 2).unwrap();
    assert!(moe::moe_align_block_size(&dev, &good, 3, 2, 4, 8, Some(&map)).is_err(), "map size");
}

/// An alignment read back: (sorted_token_ids, expert_ids, num_tokens_post_padded).
type AlignOut = (Vec<i32>, Vec<i32>, usize);

/// `moe_align_block_size` written from its definition for ids that may be out of range: such slots
/// are skipped (what both GPU paths do), everything else as in the reference.
fn align_skipping_bad(ids: &[i32], slots: usize, experts: usize, bs: usize, map: Option<&[i32]>) -> AlignOut {
    let mut lists: Vec<Vec<i32>> = vec![Vec::new(); experts];
    for (s, &e) in ids.iter().enumerate() {
        if e >= 0 && (e as usize) < experts {
            lists[e as usize].push(s as i32);
        }
    }
    let (mut sorted, mut labels) = (Vec::new(), Vec::new());
    for (e, l) in lists.iter().enumerate() {
        let padded = l.len().div_ceil(bs) * bs;
        sorted.extend_from_slice(l);
        sorted.resize(sorted.len() + padded - l.len(), slots as i32);
        labels.resize(labels.len() + padded / bs, map.map_or(e as i32, |m| m[e]));
    }
    let total = sorted.len();
    let cap = moe::align_capacity(slots, experts, bs);
    sorted.resize(cap, slots as i32);
    labels.resize(cap / bs, -1);
    (sorted, labels, total)
}

/// One non-validating alignment on `kernels`: (sorted_token_ids, expert_ids, ntpp) and the status.
#[allow(clippy::too_many_arguments)]
fn align_on(
    dev: &lowbit::Device,
    kernels: AlignKernels,
    ids: &cudarc::driver::CudaSlice<i32>,
    tokens: usize,
    topk: usize,
    experts: usize,
    bs: usize,
    map: Option<&ExpertMap>,
) -> (AlignOut, Result<(), Error>) {
    let mut ws = AlignWorkspace::with_kernels(dev, kernels).unwrap();
    let blocks = ws.align(dev, ids, tokens, topk, experts, bs, map).unwrap();
    let out = (
        dev.dtoh(blocks.sorted_token_ids).unwrap(),
        dev.dtoh(blocks.expert_ids).unwrap(),
        dev.dtoh(blocks.num_tokens_post_padded).unwrap()[0] as usize,
    );
    (out, ws.check_ids(dev))
}

#[test]
fn single_block_and_two_kernel_alignments_agree() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(15);
    let limit = moe::SINGLE_BLOCK_MAX_SLOTS;
    assert_eq!(limit, 1024);
    // (tokens, topk, experts): decode shapes, many experts, slots at the limit and just above.
    let cases = [
        (1usize, 1usize, 1usize),
        (1, 8, 384),
        (3, 2, 4),
        (13, 8, 1024),
        (40, 6, 64),
        (128, 8, 384),  // 1024 slots: the limit
        (1024, 1, 8),   // 1024 slots, 8 experts: long per-expert lists
        (341, 3, 1024), // 1023
        (1025, 1, 64),  // 1025: just above
        (129, 8, 384),  // 1032
    ];
    for (tokens, topk, experts) in cases {
        let slots = tokens * topk;
        let clean = random_ids(&mut rng, tokens, topk, experts);
        let mut bad = clean.clone();
        for (j, v) in [experts as i32, -1, i32::MAX, i32::MIN].into_iter().enumerate() {
            let s = (j * 7919 + 3) % slots;
            bad[s] = v;
        }
        let first_bad = (0..slots).find(|&s| bad[s] != clean[s]).unwrap();
        let maps: Vec<Option<ExpertMap>> = if experts % 2 == 0 {
            vec![None, Some(ExpertMap::contiguous(&dev, experts, 2, 1).unwrap())]
        } else {
            vec![None]
        };
        for bs in [1usize, 8, 16, 32, 48, 64, 128] {
            for map in &maps {
                for ids in [&clean, &bad] {
                    let is_bad = std::ptr::eq(ids, &bad);
                    let ctx = format!(
                        "tokens {tokens} topk {topk} experts {experts} block {bs} map {} bad {is_bad}",
                        map.is_some()
                    );
                    let d_ids = dev.htod(ids).unwrap();
                    let (two, two_st) =
                        align_on(&dev, AlignKernels::TwoKernel, &d_ids, tokens, topk, experts, bs, map.as_ref());
                    let (auto, auto_st) =
                        align_on(&dev, AlignKernels::Auto, &d_ids, tokens, topk, experts, bs, map.as_ref());
                    assert_eq!(auto, two, "{ctx}: auto vs two-kernel");
                    if slots <= limit {
                        let (one, one_st) =
                            align_on(&dev, AlignKernels::SingleBlock, &d_ids, tokens, topk, experts, bs, map.as_ref());
                        assert_eq!(one.2, two.2, "{ctx}: num_tokens_post_padded");
                        assert_eq!(one.1, two.1, "{ctx}: expert_ids");
                        assert_eq!(one.0, two.0, "{ctx}: sorted_token_ids");
                        assert_eq!(format!("{one_st:?}"), format!("{two_st:?}"), "{ctx}: status");
                    } else {
                        let mut ws = AlignWorkspace::with_kernels(&dev, AlignKernels::SingleBlock).unwrap();
                        assert!(
                            matches!(
                                ws.align(&dev, &d_ids, tokens, topk, experts, bs, map.as_ref()),
                                Err(Error::InvalidArgument { .. })
                            ),
                            "{ctx}: the single-block kernel refuses more than {limit} slots"
                        );
                    }
                    let mslice = map.as_ref().map(|m| m.as_slice());
                    if is_bad {
                        assert_eq!(
                            two,
                            align_skipping_bad(ids, slots, experts, bs, mslice),
                            "{ctx}: bad slots skipped"
                        );
                        let want = format!("token {}, k {}", first_bad / topk, first_bad % topk);
                        match (two_st, auto_st) {
                            (
                                Err(Error::InvalidArgument { msg: a, .. }),
                                Err(Error::InvalidArgument { msg: b, .. }),
                            ) => {
                                assert!(a.contains(&want) && b.contains(&want), "{ctx}: {a} / {b}, want {want}")
                            }
                            other => panic!("{ctx}: expected the bad id to be reported, got {other:?}"),
                        }
                    } else {
                        let r = rm::moe_align_block_size(ids, tokens, topk, experts, bs, mslice).unwrap();
                        assert_eq!(
                            two,
                            (r.sorted_token_ids, r.expert_ids, r.num_tokens_post_padded),
                            "{ctx}: reference"
                        );
                        assert!(two_st.is_ok() && auto_st.is_ok(), "{ctx}");
                    }
                }
            }
        }
    }
}

#[test]
fn status_word_accumulates_until_checked() {
    let dev = gpu_or_skip!();
    let mut ws = AlignWorkspace::new(&dev).unwrap();
    let (tokens, topk, e) = (4usize, 2usize, 8usize);
    let with_bad = |slot: usize| {
        let mut v: Vec<i32> = (0..tokens * topk).map(|s| (s % e) as i32).collect();
        v[slot] = 99;
        dev.htod(&v).unwrap()
    };
    let good = dev.htod(&(0..tokens * topk).map(|s| (s % e) as i32).collect::<Vec<_>>()).unwrap();
    let (b5, b2) = (with_bad(5), with_bad(2));
    let before = (dev.sync_count(), dev.host_copy_count());
    for ids in [&good, &b5, &b2, &good] {
        ws.align(&dev, ids, tokens, topk, e, 8, None).unwrap();
    }
    assert_eq!((dev.sync_count(), dev.host_copy_count()), before, "aligning never waits for nor copies to the host");
    // The smallest bad slot of all calls since the last check: slot 2 = token 1, k 0.
    match ws.check_ids(&dev) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains("token 1, k 0"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
    assert!(ws.check_ids(&dev).is_ok(), "checking resets the word");
    ws.align(&dev, &good, tokens, topk, e, 8, None).unwrap();
    assert!(ws.check_ids(&dev).is_ok());
    ws.align(&dev, &b5, tokens, topk, e, 8, None).unwrap();
    // A different top-k since the last check: the slot is reported as such.
    let ids16 = dev.htod(&[0i32; 8]).unwrap();
    ws.align(&dev, &ids16, 1, 8, 8, 8, None).unwrap();
    match ws.check_ids(&dev) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains("slot 5"), "{msg}"),
        other => panic!("expected InvalidArgument, got {other:?}"),
    }
}

/// Rows whose grouped selection is decided by more than `eps` at every boundary (so last-ulp
/// differences between the GPU's and the CPU's exp cannot flip them): the `topk_group`-th best
/// group score (sum of a group's best two) beats the next group's, and within the chosen groups
/// the picked experts beat the rest and are strictly ordered. (The global ranking is not the
/// criterion: experts of groups that were not chosen may score higher than picked ones.)
fn decided(sel: &[f32], picked: &[i32], cfg: &GroupedTopK, eps: f32) -> bool {
    let gsize = sel.len() / cfg.n_group;
    let mut eligible: Vec<usize> = (0..sel.len()).collect();
    if cfg.topk_group < cfg.n_group {
        let mut scores: Vec<(f32, usize)> = (0..cfg.n_group)
            .map(|g| {
                let mut m: Vec<f32> = sel[g * gsize..(g + 1) * gsize].to_vec();
                m.sort_by(|a, b| b.total_cmp(a));
                (m.iter().take(2).sum(), g)
            })
            .collect();
        scores.sort_by(|a, b| b.0.total_cmp(&a.0));
        if scores[cfg.topk_group - 1].0 - scores[cfg.topk_group].0 <= eps {
            return false;
        }
        let chosen: Vec<usize> = scores[..cfg.topk_group].iter().map(|s| s.1).collect();
        eligible.retain(|e| chosen.contains(&(e / gsize)));
    }
    let worst = picked.iter().map(|&e| sel[e as usize]).fold(f32::INFINITY, f32::min);
    let best_rest =
        eligible.iter().filter(|e| !picked.contains(&(**e as i32))).map(|&e| sel[e]).fold(f32::NEG_INFINITY, f32::max);
    let gaps_ok = picked.windows(2).all(|w| (sel[w[0] as usize] - sel[w[1] as usize]).abs() > eps);
    worst - best_rest > eps && gaps_ok
}

#[test]
fn softmax_gating_matches_reference() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(13);
    for (tokens, experts, topk) in [(1usize, 8usize, 2usize), (33, 128, 8), (666, 384, 8), (257, 60, 4), (64, 1024, 32)]
    {
        for renorm in [false, true] {
            let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.normal()).collect();
            let want = rm::softmax_topk(&logits, tokens, experts, topk, renorm).unwrap();
            let got = moe::softmax_topk(&dev, &dev.htod(&logits).unwrap(), tokens, experts, topk, renorm).unwrap();
            let (w, ids) = (dev.dtoh(&got.weights).unwrap(), dev.dtoh(&got.ids).unwrap());
            // Selection on logits is exact: no exp involved.
            assert_eq!(ids, want.ids, "tokens {tokens} experts {experts}");
            for (g, r) in w.iter().zip(&want.weights) {
                assert!((g - r).abs() <= 2e-6 * r.abs().max(1e-3), "{g} vs {r}");
            }
        }
    }
    // Ties go to the lower index; bf16 logits.
    let flat = vec![bf16::from_f32(0.5); 2 * 64];
    let got = moe::softmax_topk(&dev, &dev.htod(&flat).unwrap(), 2, 64, 4, true).unwrap();
    assert_eq!(dev.dtoh(&got.ids).unwrap(), vec![0, 1, 2, 3, 0, 1, 2, 3]);
    assert!(dev.dtoh(&got.weights).unwrap().iter().all(|&w| (w - 0.25).abs() < 1e-7));
    // Signed zeros rank like the reference's total order (+0 before -0), NaN last.
    let z = [-0.0f32, 0.0, f32::NAN, -1.0];
    let got = moe::softmax_topk(&dev, &dev.htod(&z).unwrap(), 1, 4, 4, false).unwrap();
    assert_eq!(dev.dtoh(&got.ids).unwrap(), rm::softmax_topk(&z, 1, 4, 4, false).unwrap().ids);
    // Bad input.
    let l = dev.htod(&[0f32; 16]).unwrap();
    assert!(moe::softmax_topk(&dev, &l, 2, 8, 9, false).is_err());
    assert!(moe::softmax_topk(&dev, &l, 3, 8, 2, false).is_err());
}

#[test]
fn grouped_gating_matches_reference() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(14);
    let configs = [
        (256usize, GroupedTopK { topk: 8, n_group: 8, topk_group: 4, renormalize: true, routed_scaling_factor: 2.5 }),
        (384, GroupedTopK { topk: 8, n_group: 1, topk_group: 1, renormalize: true, routed_scaling_factor: 2.827 }),
        (64, GroupedTopK { topk: 6, n_group: 32, topk_group: 3, renormalize: false, routed_scaling_factor: 1.0 }),
    ];
    for (experts, cfg) in configs {
        let tokens = 513;
        let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.normal() * 2.0).collect();
        let bias: Vec<f32> = (0..experts).map(|_| rng.normal() * 0.05).collect();
        let want = rm::grouped_topk(&logits, tokens, experts, Some(&bias), &cfg).unwrap();
        let got = moe::grouped_topk(
            &dev,
            &dev.htod(&logits).unwrap(),
            tokens,
            experts,
            Some(&dev.htod(&bias).unwrap()),
            &cfg,
        )
        .unwrap();
        let (w, ids) = (dev.dtoh(&got.weights).unwrap(), dev.dtoh(&got.ids).unwrap());
        let mut checked = 0;
        for t in 0..tokens {
            let k = cfg.topk;
            let sel: Vec<f32> = (0..experts).map(|e| rm::sigmoid(logits[t * experts + e]) + bias[e]).collect();
            let want_ids = &want.ids[t * k..(t + 1) * k];
            if !decided(&sel, want_ids, &cfg, 1e-5) {
                continue; // a near-tie: last-ulp exp differences may legitimately flip it
            }
            checked += 1;
            assert_eq!(&ids[t * k..(t + 1) * k], want_ids, "token {t} experts {experts}");
            for (g, r) in w[t * k..(t + 1) * k].iter().zip(&want.weights[t * k..(t + 1) * k]) {
                assert!((g - r).abs() <= 1e-6 * r.abs().max(1e-3), "{g} vs {r}");
            }
        }
        assert!(checked > tokens / 2, "most rows are decided ({checked} of {tokens})");
        // Same inputs, same bits.
        let again = moe::grouped_topk(
            &dev,
            &dev.htod(&logits).unwrap(),
            tokens,
            experts,
            Some(&dev.htod(&bias).unwrap()),
            &cfg,
        )
        .unwrap();
        assert_eq!(dev.dtoh(&again.ids).unwrap(), ids);
        assert_eq!(
            dev.dtoh(&again.weights).unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
            w.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
        );
    }
    // Exact ties: equal logits and no bias → the lowest indices of the lowest groups.
    let flat = vec![0f32; 256];
    let cfg = GroupedTopK { topk: 4, n_group: 8, topk_group: 2, renormalize: false, routed_scaling_factor: 1.0 };
    let got = moe::grouped_topk(&dev, &dev.htod(&flat).unwrap(), 1, 256, None, &cfg).unwrap();
    assert_eq!(dev.dtoh(&got.ids).unwrap(), vec![0, 1, 2, 3]);
    // topk_group >= n_group keeps every group, however large (no wrap to a negative count).
    let huge = GroupedTopK { topk_group: usize::MAX, ..cfg };
    let all = GroupedTopK { topk_group: cfg.n_group, ..cfg };
    let got = moe::grouped_topk(&dev, &dev.htod(&flat).unwrap(), 1, 256, None, &huge).unwrap();
    let want = moe::grouped_topk(&dev, &dev.htod(&flat).unwrap(), 1, 256, None, &all).unwrap();
    assert_eq!(dev.dtoh(&got.ids).unwrap(), dev.dtoh(&want.ids).unwrap());
    // Bad configurations.
    let l = dev.htod(&[0f32; 256]).unwrap();
    let bad = GroupedTopK { n_group: 3, ..cfg };
    assert!(moe::grouped_topk(&dev, &l, 1, 256, None, &bad).is_err());
    let bad = GroupedTopK { topk: 65, ..cfg };
    assert!(moe::grouped_topk(&dev, &l, 1, 256, None, &bad).is_err());
}
