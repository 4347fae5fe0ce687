//! CPU checks of the Marlin GEMM: the tile-config planner (pure, only names built kernels), input
//! validation and the CPU references.
//!
//! The hand-written CPU models of the kernel's index arithmetic that used to live here (a
//! B-fragment data-path model and a sequential thread-block emulator with a shared-memory race
//! detector) are retired (DESIGN §7): `tests/gpu_marlin_gemm.rs` and `tests/gpu_marlin_moe_gemm.rs`
//! run the real kernels on lowbit-sim, whose race, cp.async, bounds and initialisation checks are
//! on for every launch, with integer-exact cases and one-hot probes over every kernel instance
//! and plan variant, and a stream-K stress run under several `LOWBIT_SIM_SEED` schedules.

use half::{bf16, f16};
use lowbit::device::kernel_declared;
use lowbit::format::{self, GroupSize, QuantShape};
use lowbit::marlin::gemm::{
    all_kernel_names, check_gemm_shape, ctas_per_sm, kernels_declared, plan_gemm, plan_moe_gemm, plannable, BlockShape,
    GemmPlan, MAX_PIECES, MOE_BLOCK_SIZES, SMEM_BUDGET,
};
use lowbit::reference::gemm::{dequant_codes, gemm_ref_f64, marlin_dequant_ref, moe_gemm_ref, MoeBlocksRef};
use lowbit::reference::marlin as refm;
use lowbit::reference::quant::transpose;
use lowbit::reference::rng::Rng;
use lowbit::{DType, Float, ScaleFloat};

const MS: [usize; 14] = [1, 2, 3, 8, 13, 16, 26, 33, 64, 67, 257, 658, 1024, 4096];
const NKS: [(usize, usize); 9] = [
    (64, 64),
    (192, 128),
    (256, 192),
    (4096, 4096),
    (28672, 8192),
    (8192, 28672),
    (4096, 7168),
    (7168, 2048),
    (1536, 2048),
];
const SMS: [usize; 5] = [1, 8, 108, 132, 144];

fn check_plan(plan: &GemmPlan, m: usize, n: usize, k: usize, sm: usize) {
    assert!((1..=4).contains(&plan.m_tiles));
    assert!(plan.m_blocks * plan.m_blk() >= m, "{plan:?} covers {m} rows");
    assert!(plan.n_blocks * plan.block.n_blk() >= n && (plan.n_blocks - 1) * plan.block.n_blk() < n);
    assert_eq!(k % plan.block.k_blk(), 0, "{plan:?}: K = {k} is a whole number of stages");
    let iters = k / plan.block.k_blk();
    assert_eq!(plan.iters, iters);
    assert!(
        plan.ctas >= 1 && plan.ctas <= sm * ctas_per_sm(plan.m_tiles, plan.block),
        "{plan:?}: one CTA per slot at most"
    );
    assert_eq!(plan.dp_tiles() % plan.ctas, 0);
    assert!(plan.sk_tiles() < plan.ctas, "{plan:?}: stream-K takes less than one round");
    assert!(plan.sk_ctas() <= plan.ctas);
    assert!(plan.max_pieces_per_tile() <= MAX_PIECES + 1, "{plan:?}");
    if !plan.moe {
        // Balance: every CTA gets its data-parallel tiles plus an equal share (±1 iteration) of
        // the stream-K iterations; at least two iterations each on average.
        assert!(plan.tiles() * iters >= 2 * plan.ctas || plan.ctas == 1, "{plan:?}");
        let (w, g) = (plan.sk_tiles() * iters, plan.sk_ctas());
        if g > 0 {
            let share = |c: usize| (c + 1) * w / g - c * w / g;
            let (lo, hi) = ((0..g).map(share).min().unwrap(), (0..g).map(share).max().unwrap());
            assert!(hi - lo <= 1, "{plan:?}: stream-K shares {lo}..{hi}");
            assert!(lo >= 2.min(w), "{plan:?}: at least two stage iterations per stream-K CTA");
        }
        assert_eq!(plan.cuts_tiles(), plan.max_pieces_per_tile() > 1, "{plan:?}");
        assert_eq!(plan.workspace_partials() > 0, plan.cuts_tiles());
    }
    // Every planned configuration fits the 99 KiB opt-in of sm_86/sm_89 (A100/H100: 163/227 KiB),
    // static shared memory included.
    assert!(plannable(plan.m_tiles, plan.block), "{plan:?}");
    assert!(plan.smem_bytes() <= SMEM_BUDGET, "{plan:?}: {} bytes", plan.smem_bytes());
    for dt in [DType::BF16, DType::F16] {
        let name = plan.kernel_name(dt, false);
        assert!(kernel_declared("marlin", &name), "{name} is not in the built table");
    }
}

#[test]
fn planner_names_only_built_kernels() {
    assert!(kernels_declared());
    for dt in [DType::BF16, DType::F16] {
        for name in all_kernel_names(dt) {
            assert!(kernel_declared("marlin", &name), "{name}");
        }
    }
    for &m in &MS {
        for &(n, k) in &NKS {
            for &sm in &SMS {
                let plan = plan_gemm(m, n, k, sm).unwrap();
                check_plan(&plan, m, n, k, sm);
                assert_eq!(plan, plan_gemm(m, n, k, sm).unwrap(), "pure");
            }
        }
    }
}

#[test]
fn planner_choices() {
    // Small M: narrow, deep blocks; 3 CTAs per SM, all of them stream-K (32 tiles < 396 CTAs).
    let p = plan_gemm(1, 4096, 4096, 132).unwrap();
    assert_eq!((p.m_tiles, p.block, p.n_blocks, p.iters), (1, BlockShape::N128K128, 32, 32));
    assert_eq!((p.ctas, p.dp_tiles(), p.sk_ctas()), (396, 0, 396));
    assert!(p.cuts_tiles());
    assert_eq!(p.workspace_counters(), 32);
    assert_eq!(p.workspace_partials(), 2 * 396 * 16 * 128);
    // The issue-9 decode shape: 224 tiles of 64 iterations over 396 CTAs, 36-37 each.
    let p = plan_gemm(1, 28672, 8192, 132).unwrap();
    assert_eq!((p.ctas, p.tiles(), p.dp_tiles(), p.sk_ctas(), p.max_pieces_per_tile()), (396, 224, 0, 396, 3));
    // Fewer tiles than CTAs: all stream-K, each tile in two pieces (one row: the pieces are
    // small, the 128-column block stays).
    let p = plan_gemm(1, 25344, 8192, 132).unwrap();
    assert_eq!(
        (p.block, p.tiles(), p.ctas, p.sk_tiles(), p.max_pieces_per_tile()),
        (BlockShape::N128K128, 198, 396, 198, 2)
    );
    // 16 rows: 16-row f32 pieces; the 64-column block has half the bytes per piece and fewer
    // pieces (264 whole tiles on 264 CTAs, then 132 tiles cut in two).
    let p = plan_gemm(16, 25344, 8192, 132).unwrap();
    let wide = GemmPlan { block: BlockShape::N128K128, ctas: 396, n_blocks: 198, iters: 64, ..p };
    assert_eq!((p.block, p.tiles(), p.ctas, p.dp_tiles(), p.sk_tiles()), (BlockShape::N64K128, 396, 264, 264, 132));
    assert!(p.piece_bytes_estimate() * 2 < wide.piece_bytes_estimate(), "{p:?}");
    // The issue-9 shape (7168, 18432): 112 tiles of 144 iterations over 264 CTAs.
    let p = plan_gemm(16, 7168, 18432, 132).unwrap();
    assert_eq!((p.block, p.tiles(), p.ctas, p.iters), (BlockShape::N64K128, 112, 264, 144));
    // At most 8 rows the pieces stay small: the 3-CTA block.
    assert_eq!(plan_gemm(8, 7168, 18432, 132).unwrap().block, BlockShape::N128K128);
    // Tiles a multiple of the CTAs: data-parallel only, no workspace.
    let p = plan_gemm(64, 33792, 4096, 132).unwrap();
    assert_eq!((p.m_tiles, p.tiles(), p.ctas, p.sk_tiles()), (4, 132, 132, 0));
    assert_eq!((p.cuts_tiles(), p.workspace_partials(), p.workspace_counters()), (false, 0, 0));
    // Large M: 64-row, wide blocks, also when N % 256 != 0 (64 rows x 128-deep stages would
    // not fit sm_86/sm_89 shared memory).
    let p = plan_gemm(4096, 4096, 4096, 132).unwrap();
    assert_eq!((p.m_tiles, p.block, p.m_blocks, p.ctas), (4, BlockShape::N256K64, 64, 132));
    assert_eq!((p.tiles(), p.dp_tiles(), p.sk_tiles()), (1024, 924, 100));
    assert_eq!(plan_gemm(4096, 192, 4096, 132).unwrap().block, BlockShape::N256K64);
    assert_eq!(plan_gemm(40, 192, 4096, 132).unwrap().block, BlockShape::N128K128);
    for m_tiles in 1..=4 {
        for block in BlockShape::ALL {
            let p = GemmPlan { m_tiles, block, ctas: 1, iters: 1, m_blocks: 1, n_blocks: 1, moe: false };
            if plannable(m_tiles, block) {
                assert!(p.smem_bytes() <= SMEM_BUDGET, "{p:?}");
            }
        }
    }
    let m4 =
        GemmPlan { m_tiles: 4, block: BlockShape::N128K128, ctas: 1, iters: 1, m_blocks: 1, n_blocks: 1, moe: false };
    assert!(!plannable(4, BlockShape::N128K128) && m4.smem_bytes() > SMEM_BUDGET);
    assert!((2..=4).all(|m| !plannable(m, BlockShape::N64K128)), "the narrow block is for 16-row blocks only");
    // K % 128 != 0 forces the 64-deep stages.
    assert_eq!(plan_gemm(1, 256, 192, 132).unwrap().block, BlockShape::N256K64);
    // M not a multiple of 16.
    let p = plan_gemm(67, 256, 256, 132).unwrap();
    assert_eq!((p.m_tiles, p.m_blocks), (4, 2));
    let p = plan_gemm(26, 256, 256, 132).unwrap();
    assert_eq!((p.m_tiles, p.m_blocks), (2, 1));
}

#[test]
fn moe_planner() {
    for &bs in &MOE_BLOCK_SIZES {
        for &(n, k) in &NKS {
            let cap = bs * 37;
            let p = plan_moe_gemm(bs, cap, n, k, 132).unwrap();
            assert!(p.m_blk() >= bs && p.m_blk() < bs + 16);
            assert_eq!(p.m_blocks, 37);
            assert!(
                p.moe && p.ctas == 132 * ctas_per_sm(p.m_tiles, p.block),
                "the grid does not depend on the capacity"
            );
            assert_eq!(p.ctas, plan_moe_gemm(bs, cap * 5, n, k, 132).unwrap().ctas);
            assert_eq!(p.workspace_partials(), 2 * p.ctas * p.m_blk() * p.block.n_blk());
            check_plan(&p, bs, n, k, 132);
            for dt in [DType::BF16, DType::F16] {
                assert!(kernel_declared("marlin", &p.kernel_name(dt, true)));
            }
        }
    }
    assert!(plan_moe_gemm(24, 48, 256, 256, 132).is_err());
    assert!(plan_moe_gemm(16, 40, 256, 256, 132).is_err());
    assert!(plan_moe_gemm(16, 0, 256, 256, 132).is_err());
    assert!(plan_moe_gemm(16, 32, 100, 256, 132).is_err());
}

#[test]
fn bad_shapes_are_errors() {
    assert!(plan_gemm(0, 256, 256, 132).is_err());
    assert!(plan_gemm(1, 96, 256, 132).is_err());
    assert!(plan_gemm(1, 256, 96, 132).is_err());
    assert!(plan_gemm(1, 256, 0, 132).is_err());
    assert!(check_gemm_shape("t", 256, 256, 32).is_ok());
    assert!(check_gemm_shape("t", 256, 256, 256).is_ok());
    assert!(check_gemm_shape("t", 256, 192, 192).is_ok());
    assert!(check_gemm_shape("t", 256, 256, 16).is_err());
    assert!(check_gemm_shape("t", 256, 192, 128).is_err());
    assert!(check_gemm_shape("t", 256, 256, 48).is_err());
    assert!(plan_gemm(usize::MAX, 256, 256, 132).is_err());
}

fn random_codes(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| rng.below(15) as i8 - 7).collect()
}

fn random_scales<S: ScaleFloat>(rng: &mut Rng, len: usize) -> Vec<S> {
    (0..len).map(|_| S::from_f32(rng.range(1e-3, 0.05))).collect()
}

/// The Marlin-layout dequant reference (`marlin_dequant_ref` of the repacked, permuted weights)
/// equals `T(q · s)` taken straight from the plain codes, with and without act-order.
fn check_dequant_refs<T: Float + ScaleFloat>(n: usize, k: usize, gs: GroupSize, act_order: bool, seed: u64) {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let mut rng = Rng::new(seed);
    let codes = random_codes(&mut rng, shape.numel());
    let ct_scales: Vec<T> = random_scales(&mut rng, shape.scales_len()); // [N, K/g]
    let gptq_scales = transpose(&ct_scales, n, shape.groups_per_row()).unwrap(); // [K/g, N]
    let packed = format::pack(&codes, &shape).unwrap();
    // Act-order: a uniform random group assignment (each group exactly g rows).
    let (perm, g_idx) = if act_order {
        let mut g_idx: Vec<i32> = (0..k).map(|c| (c / shape.group) as i32).collect();
        for i in (1..k).rev() {
            g_idx.swap(i, rng.below(i + 1));
        }
        (Some(refm::act_order_perm(&g_idx, k, shape.group).unwrap()), g_idx)
    } else {
        (None, (0..k).map(|c| (c / shape.group) as i32).collect())
    };
    let qweight = refm::ct_marlin_repack(&packed, perm.as_deref(), k, n).unwrap();
    let mscales = refm::marlin_permute_scales(&gptq_scales, k, n, shape.group).unwrap();
    // W[n][c] = T(q · s[g_idx[c]][n]) straight from the codes.
    let want: Vec<f32> = (0..n * k)
        .map(|i| {
            let (nn, c) = (i / k, i % k);
            let s = gptq_scales[g_idx[c] as usize * n + nn].to_f32();
            T::from_f32(codes[i] as f32 * s).to_f32()
        })
        .collect();
    if !act_order {
        assert_eq!(want, dequant_codes::<T, T>(&codes, &ct_scales, &shape).unwrap());
    }
    assert_eq!(marlin_dequant_ref::<T, T>(&qweight, &mscales, perm.as_deref(), &shape).unwrap(), want);
}

#[test]
fn marlin_dequant_reference_matches_plain_dequant() {
    let mut seed = 1;
    for (n, k) in [(64, 64), (128, 128), (192, 256), (256, 384)] {
        for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            if gs.resolve("t", k).is_err() {
                continue;
            }
            for act_order in [false, true] {
                if act_order && gs == GroupSize::Channelwise {
                    continue;
                }
                check_dequant_refs::<bf16>(n, k, gs, act_order, seed);
                check_dequant_refs::<f16>(n, k, gs, act_order, seed + 1000);
                seed += 1;
            }
        }
    }
}

#[test]
fn act_order_gemm_equals_plain_gemm() {
    // X·Wᵀ over source order equals the kernel's view: gathered X times Marlin-row-ordered B.
    let (m, n, k, g) = (3, 64, 128, 32);
    let shape = QuantShape::new(n, k, GroupSize::Group(g)).unwrap();
    let mut rng = Rng::new(7);
    let codes = random_codes(&mut rng, shape.numel());
    let scales: Vec<bf16> = random_scales(&mut rng, shape.scales_len());
    let w = dequant_codes::<bf16, bf16>(&codes, &scales, &shape).unwrap();
    let x: Vec<bf16> = rng.normal_vec(m * k, 1.0);
    let y = gemm_ref_f64(&x, m, k, k, &w, n).unwrap();
    let mut perm: Vec<i32> = (0..k as i32).collect();
    for i in (1..k).rev() {
        perm.swap(i, rng.below(i + 1));
    }
    let xp: Vec<bf16> = (0..m * k).map(|i| x[(i / k) * k + perm[i % k] as usize]).collect();
    let wp: Vec<f32> = (0..n * k).map(|i| w[(i / k) * k + perm[i % k] as usize]).collect();
    let yp = gemm_ref_f64(&xp, m, k, k, &wp, n).unwrap();
    for (a, b) in y.iter().zip(&yp) {
        assert!((a - b).abs() <= 1e-9 * a.abs().max(1.0));
    }
}

#[test]
fn moe_reference_routes_slots() {
    // Two experts, top_k 2, three tokens; block size 4 with padding and one skipped block.
    let (k, n, e, top_k, a_rows) = (4, 2, 2, 2, 3);
    let out_rows = a_rows * top_k;
    let a: Vec<f32> = (0..a_rows * k).map(|i| i as f32).collect();
    let experts: Vec<f32> = (0..e * n * k).map(|i| (i % 3) as f32 - 1.0).collect();
    let pad = out_rows as i32;
    let sorted = [0, 3, 5, pad, 1, 2, 4, pad, 0, 0, 0, 0];
    let expert_ids = [0, 1, -1];
    let blocks =
        MoeBlocksRef { sorted_token_ids: &sorted, expert_ids: &expert_ids, num_tokens_post_padded: 8, block_size: 4 };
    let tw: Vec<f32> = (0..out_rows).map(|i| 0.5 + i as f32).collect();
    let (out, written) = moe_gemm_ref(&a, a_rows, k, &experts, e, n, &blocks, top_k, Some(&tw), out_rows).unwrap();
    assert!(written.iter().all(|&w| w));
    for (id, ex) in [(0usize, 0usize), (3, 0), (5, 0), (1, 1), (2, 1), (4, 1)] {
        for c in 0..n {
            let row = id / top_k;
            let dot: f64 = (0..k).map(|i| a[row * k + i] as f64 * experts[(ex * n + c) * k + i] as f64).sum();
            assert_eq!(out[id * n + c], tw[id] as f64 * dot);
        }
    }
}
