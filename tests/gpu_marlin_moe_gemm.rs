//! GPU tests of the Marlin MoE expert GEMM against a CPU per-slot reference: every routed slot's
//! row matches (`mean|Δ|/mean|ref|` ≤ 4e-3 bf16 / 1e-3 f16), unrouted rows are left untouched
//! (the output is poisoned with NaN), blocks with expert −1 or a corrupt id are skipped without
//! any out-of-bounds access, router weights are applied, every block size works.
//! Routing blocks are built on the host here (the same contract as `moe_align_block_size`).
//!
//! Integer-exact cases (kernel_review C1): ternary activations, power-of-two scales and router
//! weights, compared bit for bit on every routed row (and unrouted rows still hold the poison
//! bits), plus one-hot activation probes, for every block size with both block shapes, expert
//! maps (skipped and corrupt expert ids), GEMM1 (`top_k > 1`) and GEMM2 (`top_k = 1`) reads.
//! On lowbit-sim (`common::on_sim`) the random-data tests run a reduced shape set.

mod common;

use half::{bf16, f16};
use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::gemm::{marlin_moe_gemm, Half, MarlinExperts, MarlinWorkspace, MoeBlocks, MOE_BLOCK_SIZES};
use lowbit::reference::gemm::{moe_gemm_ref, rel_mean_abs_err, MoeBlocksRef};
use lowbit::reference::marlin as refm;
use lowbit::reference::quant::transpose;
use lowbit::reference::rng::Rng;
use lowbit::{DType, Device, Error};

/// Host routing in the `moe_align_block_size` format.
struct Routing {
    sorted: Vec<i32>,
    expert_ids: Vec<i32>,
    used: usize,
}

/// Per-expert slot lists padded to `bs` with the sentinel `tokens·top_k`; capacity
/// `tokens·top_k + E·(bs−1)` rounded up to `bs`, unused blocks get expert −1.
/// Experts in `skip` are treated as non-local (their blocks get −1).
fn route(topk_ids: &[i32], tokens: usize, top_k: usize, e: usize, bs: usize, skip: &[usize]) -> Routing {
    let sentinel = (tokens * top_k) as i32;
    let capacity = (tokens * top_k + e * (bs - 1)).div_ceil(bs) * bs;
    let mut sorted = Vec::with_capacity(capacity);
    let mut expert_ids = Vec::new();
    for ex in 0..e {
        let slots: Vec<i32> = (0..tokens * top_k).filter(|&s| topk_ids[s] as usize == ex).map(|s| s as i32).collect();
        if slots.is_empty() {
            continue;
        }
        let blocks = slots.len().div_ceil(bs);
        sorted.extend(&slots);
        sorted.resize(sorted.len() + blocks * bs - slots.len(), sentinel);
        let id = if skip.contains(&ex) { -1 } else { ex as i32 };
        expert_ids.extend(std::iter::repeat_n(id, blocks));
    }
    let used = sorted.len();
    sorted.resize(capacity, sentinel);
    expert_ids.resize(capacity / bs, -1);
    Routing { sorted, expert_ids, used }
}

fn random_topk(tokens: usize, top_k: usize, e: usize, rng: &mut Rng) -> Vec<i32> {
    let mut ids = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        let mut chosen: Vec<i32> = Vec::new();
        while chosen.len() < top_k {
            let x = rng.below(e) as i32;
            if !chosen.contains(&x) {
                chosen.push(x);
            }
        }
        ids.extend(chosen);
    }
    ids
}

/// Random stacked experts: Marlin data for the GPU, dequantized `[E, N, K]` f32 for the reference.
fn random_experts<T: Half>(
    dev: &Device,
    e: usize,
    n: usize,
    k: usize,
    gs: GroupSize,
    seed: u64,
) -> (MarlinExperts<T>, Vec<f32>) {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let mut rng = Rng::new(seed);
    let (mut qw, mut sc, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..e {
        let codes: Vec<i8> = (0..n * k).map(|_| rng.below(15) as i8 - 7).collect();
        let scales: Vec<T> = (0..shape.scales_len()).map(|_| T::from_f32(rng.range(0.004, 0.02))).collect();
        deq.extend(lowbit::reference::gemm::dequant_codes::<T, T>(&codes, &scales, &shape).unwrap());
        let packed = lowbit::format::pack(&codes, &shape).unwrap();
        qw.extend(refm::ct_marlin_repack(&packed, None, k, n).unwrap());
        let gptq = transpose(&scales, n, shape.groups_per_row()).unwrap();
        sc.extend(refm::marlin_permute_scales(&gptq, k, n, shape.group).unwrap());
    }
    (MarlinExperts::from_host(dev, &qw, &sc, e, n, k, gs).unwrap(), deq)
}

#[allow(clippy::too_many_arguments)]
fn check_moe<T: Half>(
    dev: &Device,
    tokens: usize,
    top_k: usize,
    e: usize,
    n: usize,
    k: usize,
    gs: GroupSize,
    bs: usize,
    gemm2: bool,
    weighted: bool,
    skip: &[usize],
    seed: u64,
) {
    let what = format!("{} tokens={tokens} top_k={top_k} E={e} {n}x{k} g={gs} bs={bs} gemm2={gemm2}", T::DTYPE);
    let mut rng = Rng::new(seed);
    let (experts, deq) = random_experts::<T>(dev, e, n, k, gs, seed + 1);
    let topk_ids = random_topk(tokens, top_k, e, &mut rng);
    let r = route(&topk_ids, tokens, top_k, e, bs, skip);
    // GEMM1 reads token rows (A [tokens, K], id / top_k); GEMM2 reads one row per slot (top_k 1).
    let (a_rows, a_top_k) = if gemm2 { (tokens * top_k, 1) } else { (tokens, top_k) };
    let out_rows = tokens * top_k;
    let a: Vec<T> = (0..a_rows * k).map(|_| T::from_f32(rng.normal() * 0.1)).collect();
    let tw: Vec<f32> = (0..out_rows).map(|_| rng.range(0.0, 1.0)).collect();
    let (ad, sorted, eids, ntpp) = (
        dev.htod(&a).unwrap(),
        dev.htod(&r.sorted).unwrap(),
        dev.htod(&r.expert_ids).unwrap(),
        dev.htod(&[r.used as i32]).unwrap(),
    );
    let twd = dev.htod(&tw).unwrap();
    let mut out = dev.htod(&vec![T::from_f32(f32::NAN); out_rows * n]).unwrap();
    let blocks =
        MoeBlocks { sorted_token_ids: &sorted, expert_ids: &eids, num_tokens_post_padded: &ntpp, block_size: bs };
    let mut ws = MarlinWorkspace::new();
    marlin_moe_gemm(
        dev,
        &ad,
        a_rows,
        &experts,
        &blocks,
        a_top_k,
        weighted.then_some(&twd),
        &mut out,
        out_rows,
        &mut ws,
    )
    .unwrap();
    let y: Vec<T> = dev.dtoh(&out).unwrap();
    let rb = MoeBlocksRef {
        sorted_token_ids: &r.sorted,
        expert_ids: &r.expert_ids,
        num_tokens_post_padded: r.used,
        block_size: bs,
    };
    let (want, written) =
        moe_gemm_ref(&a, a_rows, k, &deq, e, n, &rb, a_top_k, weighted.then_some(&tw[..]), out_rows).unwrap();
    let (mut got_v, mut want_v) = (Vec::new(), Vec::new());
    for row in 0..out_rows {
        let yr = &y[row * n..(row + 1) * n];
        if written[row] {
            assert!(yr.iter().all(|v| v.to_f32().is_finite()), "{what}: routed row {row} not fully written");
            got_v.extend(yr.iter().map(|v| v.to_f32() as f64));
            want_v.extend(&want[row * n..(row + 1) * n]);
            // atol 2e-2 on randn/10 data, as vLLM checks.
            for c in 0..n {
                let d = (yr[c].to_f32() as f64 - want[row * n + c]).abs();
                assert!(d <= 2e-2, "{what}: ({row}, {c}) differs by {d}");
            }
        } else {
            assert!(yr.iter().all(|v| v.to_f32().is_nan()), "{what}: unrouted row {row} was written");
        }
    }
    let tol = if T::DTYPE == DType::F16 { 1e-3 } else { 4e-3 };
    let err = rel_mean_abs_err(&got_v, &want_v);
    assert!(err <= tol, "{what}: mean|Δ|/mean|ref| = {err:.3e}");
}

fn moe_grid<T: Half>(dev: &Device) {
    let mut seed = 100;
    // The simulator replaces 666 tokens on 8 experts (21 blocks of 8 per expert) by 200 on 4
    // (still several blocks per expert at every block size, about a third of the blocks).
    let token_sets = common::pick(
        dev,
        [(1, 2, 8), (33, 2, 8), (123, 8, 16), (666, 2, 8)],
        [(1, 2, 8), (33, 2, 8), (123, 8, 16), (200, 2, 4)],
    );
    for &bs in &MOE_BLOCK_SIZES {
        for (tokens, top_k, e) in token_sets {
            for (n, k, gs) in [
                (256, 128, GroupSize::Group(32)),
                (128, 256, GroupSize::Channelwise),
                (192, 512, GroupSize::Group(128)),
            ] {
                seed += 1;
                let gemm2 = seed % 2 == 0;
                let weighted = seed % 3 != 0;
                check_moe::<T>(dev, tokens, top_k, e, n, k, gs, bs, gemm2, weighted, &[], seed);
            }
        }
    }
}

#[test]
fn moe_gemm_grid_bf16() {
    let dev = gpu_or_skip!();
    moe_grid::<bf16>(&dev);
}

#[test]
fn moe_gemm_grid_f16() {
    let dev = gpu_or_skip!();
    moe_grid::<f16>(&dev);
}

#[test]
fn moe_gemm_real_expert_shapes() {
    let dev = gpu_or_skip!();
    // Qwen3-30B-A3B experts (gate_up 1536x2048, down 2048x768) with 128 experts, top-8; Kimi-K2
    // expert down projection 7168x2048 (g = 32) with 16 experts to keep the reference cheap.
    // The simulator pays for every routed (expert, block) pair: fewer tokens and top-2 there.
    let (t1, t2, t3, k1, k3) = common::pick(&dev, (33, 5, 9, 8, 8), (2, 2, 1, 2, 2));
    check_moe::<bf16>(&dev, t1, k1, 128, 1536, 2048, GroupSize::Group(128), 16, false, false, &[], 1);
    check_moe::<bf16>(&dev, t2, 8, 128, 2048, 768, GroupSize::Group(128), 8, true, true, &[], 2);
    check_moe::<f16>(&dev, t3, k3, 16, 7168, 2048, GroupSize::Group(32), 16, true, true, &[], 3);
}

#[test]
fn moe_gemm_expert_parallel_skips_blocks() {
    let dev = gpu_or_skip!();
    check_moe::<bf16>(&dev, 64, 4, 16, 256, 256, GroupSize::Group(64), 16, false, true, &[0, 3, 7, 15], 9);
    check_moe::<f16>(&dev, 64, 4, 16, 256, 256, GroupSize::Group(64), 32, true, false, &[1, 2], 10);
}

#[test]
fn moe_gemm_corrupt_expert_ids_are_skipped() {
    // Ids outside [-1, E) must be skipped on the device, never used as an index.
    let dev = gpu_or_skip!();
    let (e, n, k, bs, tokens, top_k) = (4, 128, 128, 16, 20, 2);
    let (experts, _) = random_experts::<bf16>(&dev, e, n, k, GroupSize::Group(32), 5);
    let mut rng = Rng::new(6);
    let r = route(&random_topk(tokens, top_k, e, &mut rng), tokens, top_k, e, bs, &[]);
    let mut eids = r.expert_ids.clone();
    eids[0] = 1_000_000;
    if eids.len() > 1 {
        eids[1] = -7;
    }
    let a = dev.htod(&vec![bf16::from_f32(0.1); tokens * k]).unwrap();
    let (sorted, eids_d, ntpp) =
        (dev.htod(&r.sorted).unwrap(), dev.htod(&eids).unwrap(), dev.htod(&[r.used as i32]).unwrap());
    let mut out = dev.htod(&vec![bf16::from_f32(f32::NAN); tokens * top_k * n]).unwrap();
    let blocks =
        MoeBlocks { sorted_token_ids: &sorted, expert_ids: &eids_d, num_tokens_post_padded: &ntpp, block_size: bs };
    let mut ws = MarlinWorkspace::new();
    marlin_moe_gemm(&dev, &a, tokens, &experts, &blocks, top_k, None, &mut out, tokens * top_k, &mut ws).unwrap();
    dev.synchronize().unwrap();
    // Rows of the corrupt blocks stay NaN; the others are finite.
    let y: Vec<bf16> = dev.dtoh(&out).unwrap();
    for (slot, &id) in r.sorted[..r.used].iter().enumerate() {
        if (id as usize) < tokens * top_k {
            let row = &y[id as usize * n..(id as usize + 1) * n];
            let skipped = slot / bs < 2;
            assert_eq!(row.iter().all(|v| v.to_f32().is_nan()), skipped, "slot {slot}");
        }
    }
}

#[test]
fn moe_bad_input_is_a_typed_error() {
    let dev = gpu_or_skip!();
    let (experts, _) = random_experts::<bf16>(&dev, 2, 64, 128, GroupSize::Group(32), 1);
    let a = dev.zeros::<bf16>(4 * 128).unwrap();
    let sorted = dev.htod(&[8i32; 32]).unwrap();
    let eids = dev.htod(&[-1i32, -1]).unwrap();
    let ntpp = dev.htod(&[0i32]).unwrap();
    let mut out = dev.zeros::<bf16>(8 * 64).unwrap();
    let mut ws = MarlinWorkspace::new();
    let ok = MoeBlocks { sorted_token_ids: &sorted, expert_ids: &eids, num_tokens_post_padded: &ntpp, block_size: 16 };
    assert!(marlin_moe_gemm(&dev, &a, 4, &experts, &ok, 2, None, &mut out, 8, &mut ws).is_ok());
    let bad_bs = MoeBlocks { block_size: 24, ..ok };
    assert!(marlin_moe_gemm(&dev, &a, 4, &experts, &bad_bs, 2, None, &mut out, 8, &mut ws).is_err());
    // out_rows > a_rows · top_k, top_k = 0, A too short.
    assert!(matches!(
        marlin_moe_gemm(&dev, &a, 4, &experts, &ok, 1, None, &mut out, 8, &mut ws),
        Err(Error::Shape { .. })
    ));
    assert!(marlin_moe_gemm(&dev, &a, 4, &experts, &ok, 0, None, &mut out, 8, &mut ws).is_err());
    assert!(matches!(
        marlin_moe_gemm(&dev, &a, 5, &experts, &ok, 2, None, &mut out, 8, &mut ws),
        Err(Error::Length { .. })
    ));
    // Wrong stacked lengths are rejected when building the experts.
    assert!(
        MarlinExperts::<f16>::from_host(&dev, &[0; 10], &[f16::ZERO; 10], 2, 64, 128, GroupSize::Group(32)).is_err()
    );
}

// ---- integer-exact cases and one-hot probes (kernel_review C1) --------------------------------

/// Random stacked experts for the exact cases: codes in −8..=7 (all sixteen), power-of-two
/// scales `2^−3 .. 2^−1`; returns the Marlin experts and the dequantized `[E, N, K]`.
fn exact_experts<T: Half>(
    dev: &Device,
    e: usize,
    n: usize,
    k: usize,
    gs: GroupSize,
    rng: &mut Rng,
) -> (MarlinExperts<T>, Vec<f32>) {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let (mut qw, mut sc, mut deq) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..e {
        let codes: Vec<i8> = (0..n * k).map(|_| rng.below(16) as i8 - 8).collect();
        let scales: Vec<T> = (0..shape.scales_len()).map(|_| T::from_f32(common::pow2(rng, -3, -1))).collect();
        let packed = common::pack_codes(&codes);
        // W[n][c] = T(q · s) straight from the codes (q · 2^e is exact).
        let gpr = shape.groups_per_row();
        deq.extend((0..n * k).map(|i| codes[i] as f32 * scales[(i / k) * gpr + (i % k) / shape.group].to_f32()));
        qw.extend(refm::ct_marlin_repack(&packed, None, k, n).unwrap());
        let gptq = transpose(&scales, n, gpr).unwrap();
        sc.extend(refm::marlin_permute_scales(&gptq, k, n, shape.group).unwrap());
    }
    (MarlinExperts::from_host(dev, &qw, &sc, e, n, k, gs).unwrap(), deq)
}

/// The exact `tw · A[row] · W[e]ᵀ` of one slot (f64 from +0; every partial sum exact).
fn slot_ref(a_row: &[f32], w: &[f32], e: usize, n: usize, k: usize, tw: f32) -> Vec<f64> {
    (0..n)
        .map(|c| {
            let wr = &w[(e * n + c) * k..(e * n + c + 1) * k];
            tw as f64
                * a_row.iter().zip(wr).filter(|(x, _)| **x != 0.0).fold(0f64, |s, (x, w)| s + *x as f64 * *w as f64)
        })
        .collect()
}

/// One exact MoE GEMM case: ternary A (then one-hot A), power-of-two router weights, experts in
/// `skip` not local (their blocks get −1, or a corrupt id beyond E for every second one), and
/// valid-looking ids and experts beyond the used prefix (`num_tokens_post_padded`).
#[allow(clippy::too_many_arguments)]
fn exact_moe_case<T: Half>(
    dev: &Device,
    rng: &mut Rng,
    (tokens, top_k, e): (usize, usize, usize),
    (n, k, gs): (usize, usize, GroupSize),
    bs: usize,
    gemm2: bool,
    weighted: bool,
    skip: &[usize],
) -> lowbit::marlin::gemm::GemmPlan {
    let (experts, deq) = exact_experts::<T>(dev, e, n, k, gs, rng);
    let topk_ids = random_topk(tokens, top_k, e, rng);
    let mut r = route(&topk_ids, tokens, top_k, e, bs, skip);
    // Every second skipped block carries a corrupt id instead of -1: skipped on the device too.
    let mut flip = false;
    for id in r.expert_ids.iter_mut().take(r.used / bs) {
        if *id < 0 {
            if flip {
                *id = (e + 3) as i32;
            }
            flip = !flip;
        }
    }
    let (a_rows, a_top_k) = if gemm2 { (tokens * top_k, 1) } else { (tokens, top_k) };
    let out_rows = tokens * top_k;
    // Beyond the used prefix: valid-looking ids and experts that the kernel must not touch.
    let used_blocks = r.used / bs;
    for id in &mut r.sorted[r.used..] {
        *id = rng.below(out_rows) as i32;
    }
    for ex in &mut r.expert_ids[used_blocks..] {
        *ex = rng.below(e) as i32;
    }
    let tw: Vec<f32> = (0..out_rows).map(|_| common::pow2(rng, -3, 0)).collect();
    // Slot -> (expert, weight) of each routed id, for the exactness check of A's rows.
    let mut route_of: Vec<Option<usize>> = vec![None; out_rows];
    for (slot, &id) in r.sorted[..r.used].iter().enumerate() {
        let ex = r.expert_ids[slot / bs];
        if (id as usize) < out_rows && ex >= 0 && (ex as usize) < e {
            route_of[id as usize] = Some(ex as usize);
        }
    }
    let wt = |id: usize| if weighted { tw[id] } else { 1.0 };
    let ids_of_row = |row: usize| if gemm2 { row..row + 1 } else { row * top_k..(row + 1) * top_k };
    let what = format!(
        "{} exact MoE tokens={tokens} top_k={top_k} E={e} {n}x{k} g={gs} bs={bs} gemm2={gemm2} \
         weighted={weighted} skip={skip:?}",
        T::DTYPE
    );
    let plan = lowbit::marlin::gemm::plan_moe_gemm(bs, r.sorted.len(), n, k, dev.info().sm_count).unwrap();
    let nnz = if T::DTYPE == DType::F16 { 128 } else { 24 };
    for kind in ["ternary", "one-hot"] {
        let a: Vec<f32> = if kind == "ternary" {
            common::ternary_rows(rng, a_rows, k, nnz, |row, x| {
                ids_of_row(row).all(|id| {
                    route_of[id]
                        .is_none_or(|ex| slot_ref(x, &deq, ex, n, k, wt(id)).iter().all(|&v| common::exact_in::<T>(v)))
                })
            })
        } else {
            let off = rng.below(k);
            (0..a_rows * k)
                .map(|i| {
                    if i % k == (off + 7 * (i / k)) % k {
                        if (i / k) % 2 == 0 {
                            1.0
                        } else {
                            -1.0
                        }
                    } else {
                        0.0
                    }
                })
                .collect()
        };
        let at: Vec<T> = a.iter().map(|&v| T::from_f32(v)).collect();
        let (ad, sorted, eids, ntpp, twd) = (
            dev.htod(&at).unwrap(),
            dev.htod(&r.sorted).unwrap(),
            dev.htod(&r.expert_ids).unwrap(),
            dev.htod(&[r.used as i32]).unwrap(),
            dev.htod(&tw).unwrap(),
        );
        let poison = T::from_f32(f32::NAN);
        let mut out = dev.htod(&vec![poison; out_rows * n]).unwrap();
        let blocks =
            MoeBlocks { sorted_token_ids: &sorted, expert_ids: &eids, num_tokens_post_padded: &ntpp, block_size: bs };
        let mut ws = MarlinWorkspace::new();
        marlin_moe_gemm(
            dev,
            &ad,
            a_rows,
            &experts,
            &blocks,
            a_top_k,
            weighted.then_some(&twd),
            &mut out,
            out_rows,
            &mut ws,
        )
        .unwrap();
        let y: Vec<T> = dev.dtoh(&out).unwrap();
        let (mut got, mut want) = (Vec::new(), Vec::new());
        for id in 0..out_rows {
            let yr = &y[id * n..(id + 1) * n];
            match route_of[id] {
                Some(ex) => {
                    let row = if gemm2 { id } else { id / top_k };
                    got.extend_from_slice(yr);
                    want.extend(slot_ref(&a[row * k..(row + 1) * k], &deq, ex, n, k, wt(id)));
                }
                None => assert!(
                    yr.iter().all(|v| v.to_f32().to_bits() == poison.to_f32().to_bits()),
                    "{what} {kind}: unrouted row {id} was written"
                ),
            }
        }
        common::assert_exact(&format!("{what} {kind} {plan:?}"), &got, &want, n);
    }
    plan
}

fn exact_moe<T: Half>(dev: &Device) -> Vec<lowbit::marlin::gemm::GemmPlan> {
    let mut rng = Rng::new(0xC1_0E);
    let groups = [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];
    let mut plans = Vec::new();
    let mut i = 0;
    for &bs in &MOE_BLOCK_SIZES {
        // K % 128 == 0 with N % 256 != 0 (n128k128 up to 48 rows), K % 128 != 0 (n256k64), and
        // N % 256 == 0 (n256k64 from 33 rows).
        for (n, k) in [(192, 256), (256, 192), (256, 256)] {
            // The next group size (in rotation) that divides K.
            let gs = (0..4).map(|j| groups[(i + j) % 4]).find(|g| g.resolve("t", k).is_ok()).unwrap();
            let gemm2 = i % 2 == 1;
            let weighted = i % 3 != 2;
            // 150 tokens top-2 on 4 experts: several blocks per expert at every block size, a
            // partial last block; the expert-parallel cases skip two of them.
            let skip: &[usize] = if i % 3 == 0 { &[1, 3] } else { &[] };
            plans.push(exact_moe_case::<T>(dev, &mut rng, (150, 2, 4), (n, k, gs), bs, gemm2, weighted, skip));
            i += 1;
        }
    }
    // Many experts, top-8, a few tokens: blocks of one slot each.
    plans.push(exact_moe_case::<T>(dev, &mut rng, (5, 8, 32), (128, 128, GroupSize::Group(64)), 16, false, true, &[]));
    plans
}

#[test]
fn exact_moe_gemm_bf16() {
    let dev = gpu_or_skip!();
    let plans = exact_moe::<bf16>(&dev);
    // Every MoE instance the planner can name: m1..m3 with both blocks, m4 with n256k64.
    let names: std::collections::BTreeSet<String> = plans.iter().map(|p| p.kernel_name(DType::BF16, true)).collect();
    let all: std::collections::BTreeSet<String> =
        lowbit::marlin::gemm::all_kernel_names(DType::BF16).into_iter().filter(|s| s.contains("_moe_")).collect();
    assert_eq!(names, all, "the exact MoE cases run every MoE kernel instance");
}

#[test]
fn exact_moe_gemm_f16() {
    let dev = gpu_or_skip!();
    exact_moe::<f16>(&dev);
}
