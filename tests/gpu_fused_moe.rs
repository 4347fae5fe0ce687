//! GPU tests of `fused_marlin_moe` against the CPU reference MoE on the dequantized weights:
//! `mean|Δ| / mean|ref| ≤ 5e-3` (bf16: four roundings to bf16 — GEMM1 output, act, GEMM2
//! output, sum — against one in the dense GEMM; 1e-3 f16) and `|Δ| ≤ 2e-2 + 4·tol·rms(ref)`
//! (2e-2 on `randn/10`-sized outputs as vLLM; the relative part covers large-K outputs such as
//! Kimi-K2's, rms ≈ 6 and |ref| up to 18, whose bf16 ulp alone is 0.125), over
//! M ∈ {1, 33, 123, 666, 2048} × (E, topk) ∈ {(8, 2), (128, 8), (384, 8)} with small and real
//! hidden/intermediate sizes (the reference is evaluated on a subsample of rows for big cases),
//! expert parallelism, the QAT consistency property (rollout MoE = MoE on `fake_quant` weights),
//! determinism, every output element written, and bad input. Skips without a GPU.
//!
//! Integer-exact cases (kernel_review C1): ternary activations, power-of-two scales and router
//! weights, gates that make `silu` exact, compared bit for bit on every output element against a
//! reference with the kernels' rounding points, for every block size, both K % 128 cases, every
//! group size, expert maps. On lowbit-sim (`common::on_sim`) the random-data tests run a reduced
//! set: fewer tokens for the large expert counts, fewer experts for the real hidden sizes (the
//! simulator pays for every routed (expert, block) pair).

mod common;

use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::gemm::{Half, MarlinExperts};
use lowbit::moe::{self, ExpertMap, MoeOptions, MoeWorkspace};
use lowbit::reference::moe::{self as rm, MoeDims, PackedExperts};
use lowbit::reference::rng::Rng;
use lowbit::reference::{marlin as rmarlin, quant as rq};
use lowbit::{bf16, f16, Device, Error};

/// Uploads compressed-tensors experts in Marlin layout (repacked on the device — on the simulator
/// by the CPU reference, which is much cheaper there; the layout kernels have their own tests —
/// scales permuted by the reference).
fn to_marlin<T: Half>(dev: &Device, p: &PackedExperts<T>) -> MarlinExperts<T> {
    let s = &p.shape;
    let (pl, sl) = (s.packed_len(), s.scales_len());
    let mut q = Vec::with_capacity(p.num_experts * pl);
    let mut sc = Vec::with_capacity(p.num_experts * sl);
    let sim = common::on_sim(dev);
    for e in 0..p.num_experts {
        let packed = &p.packed[e * pl..(e + 1) * pl];
        if sim {
            q.extend(rmarlin::ct_marlin_repack(packed, None, s.k, s.n).unwrap());
        } else {
            let d = dev.htod(packed).unwrap();
            q.extend(dev.dtoh(&lowbit::marlin::layout::ct_marlin_repack(dev, &d, None, s).unwrap()).unwrap());
        }
        let gptq = rq::transpose(&p.scales[e * sl..(e + 1) * sl], s.n, s.groups_per_row()).unwrap();
        sc.extend(rmarlin::marlin_permute_scales(&gptq, s.k, s.n, s.group).unwrap());
    }
    MarlinExperts::from_host(dev, &q, &sc, p.num_experts, s.n, s.k, s.group_size).unwrap()
}

/// Random experts straight from random codes (cheap for big expert stacks): codes in [-7, 7],
/// scales ≈ 0.25 / 7 so weights look like `randn/10` after quantization.
fn random_experts<T: Half>(rng: &mut Rng, e: usize, n: usize, k: usize, g: GroupSize) -> PackedExperts<T> {
    let shape = QuantShape::new(n, k, g).unwrap();
    let packed = (0..e * shape.packed_len())
        .map(|_| {
            let q: [i8; 8] = std::array::from_fn(|_| rng.below(15) as i8 - 7);
            lowbit::format::pack8(&q)
        })
        .collect();
    let scales = (0..e * shape.scales_len()).map(|_| T::from_f32(rng.range(0.02, 0.05))).collect();
    PackedExperts { packed, scales, shape, num_experts: e }
}

fn random_routing(rng: &mut Rng, tokens: usize, topk: usize, experts: usize) -> (Vec<f32>, Vec<i32>) {
    let logits: Vec<f32> = (0..tokens * experts).map(|_| rng.normal()).collect();
    let r = rm::softmax_topk(&logits, tokens, experts, topk, true).unwrap();
    (r.weights, r.ids)
}

/// Rows to evaluate the reference on: all of them for small problems, an even subsample otherwise.
fn sample_rows(tokens: usize, cost_per_row: usize) -> Vec<usize> {
    let budget = (2_000_000_000 / cost_per_row.max(1)).clamp(8, 256);
    if tokens <= budget {
        return (0..tokens).collect();
    }
    let step = tokens.div_ceil(budget);
    let mut v: Vec<usize> = (0..tokens).step_by(step).collect();
    if v.last() != Some(&(tokens - 1)) {
        v.push(tokens - 1);
    }
    v
}

/// `mean|Δ|/mean|ref|` bound of the fused layer in bf16 (see the module doc).
const BF16_TOL: f64 = 5e-3;

/// Checks the GPU output against the reference on the sampled rows.
#[allow(clippy::too_many_arguments)]
fn check_rows<T: Half>(
    what: &str,
    got: &[T],
    x: &[T],
    dims: &MoeDims,
    w13: &PackedExperts<T>,
    w2: &PackedExperts<T>,
    tw: &[f32],
    ids: &[i32],
    map: Option<&[i32]>,
    rel_tol: f64,
) {
    let (h, k) = (dims.hidden, dims.topk);
    let rows = sample_rows(dims.tokens, k * 3 * dims.inter * h);
    let xs: Vec<T> = rows.iter().flat_map(|&r| x[r * h..(r + 1) * h].to_vec()).collect();
    let tws: Vec<f32> = rows.iter().flat_map(|&r| tw[r * k..(r + 1) * k].to_vec()).collect();
    let idss: Vec<i32> = rows.iter().flat_map(|&r| ids[r * k..(r + 1) * k].to_vec()).collect();
    let sub = MoeDims { tokens: rows.len(), ..*dims };
    let want = rm::fused_moe_ref(&xs, &sub, w13, w2, &tws, &idss, map).unwrap();
    let (mut num, mut den, mut worst, mut sq) = (0f64, 0f64, (0f64, 0f64), 0f64);
    for (i, &r) in rows.iter().enumerate() {
        for c in 0..h {
            let g = got[r * h + c].to_f32() as f64;
            let w = want[i * h + c] as f64;
            assert!(g.is_finite(), "{what}: row {r} col {c} is {g}");
            num += (g - w).abs();
            den += w.abs();
            sq += w * w;
            if (g - w).abs() > worst.0 {
                worst = ((g - w).abs(), w);
            }
        }
    }
    let rel = num / den.max(1e-30);
    let rms = (sq / (rows.len() * h) as f64).sqrt();
    assert!(rel <= rel_tol, "{what}: mean|Δ|/mean|ref| = {rel:.2e} > {rel_tol:.0e} (rms of ref {rms:.3e})");
    // Rounding errors of the intermediates scale with the outputs' typical size, not each value.
    let atol = 2e-2 + 4.0 * rel_tol * rms;
    assert!(
        worst.0 <= atol,
        "{what}: max |Δ| = {:.3e} > {atol:.3e} at ref {:.3e} (rms of ref {rms:.3e})",
        worst.0,
        worst.1
    );
}

struct Case<T> {
    w13: PackedExperts<T>,
    w2: PackedExperts<T>,
    m13: MarlinExperts<T>,
    m2: MarlinExperts<T>,
}

fn case<T: Half>(dev: &Device, rng: &mut Rng, e: usize, h: usize, i: usize, g: GroupSize, quantize: bool) -> Case<T> {
    let (w13, w2) = if quantize {
        // randn/10 master weights, quantized the QAT way.
        let s13 = QuantShape::new(2 * i, h, g).unwrap();
        let s2 = QuantShape::new(h, i, g).unwrap();
        let a: Vec<T> = rng.normal_vec(e * s13.numel(), 0.1);
        let b: Vec<T> = rng.normal_vec(e * s2.numel(), 0.1);
        (PackedExperts::quantize(&a, &s13, e).unwrap(), PackedExperts::quantize(&b, &s2, e).unwrap())
    } else {
        (random_experts(rng, e, 2 * i, h, g), random_experts(rng, e, h, i, g))
    };
    let (m13, m2) = (to_marlin(dev, &w13), to_marlin(dev, &w2));
    Case { w13, w2, m13, m2 }
}

fn run_case<T: Half>(dev: &Device, rng: &mut Rng, c: &Case<T>, ms: &[usize], topk: usize, rel_tol: f64, what: &str) {
    let (e, h, i) = (c.w13.num_experts, c.w13.shape.k, c.w2.shape.k);
    let mut ws = MoeWorkspace::<T>::new(dev).unwrap();
    for &m in ms {
        let x: Vec<T> = rng.normal_vec(m * h, 0.1);
        let (tw, ids) = random_routing(rng, m, topk, e);
        let (dx, dtw, dids) = (dev.htod(&x).unwrap(), dev.htod(&tw).unwrap(), dev.htod(&ids).unwrap());
        let out =
            moe::fused_marlin_moe(dev, &dx, m, &c.m13, &c.m2, &dtw, &dids, topk, None, &MoeOptions::default(), &mut ws)
                .unwrap();
        let got = dev.dtoh(&out).unwrap();
        let dims = MoeDims { tokens: m, hidden: h, inter: i, experts: e, topk };
        check_rows(&format!("{what} M={m}"), &got, &x, &dims, &c.w13, &c.w2, &tw, &ids, None, rel_tol);
    }
}

#[test]
fn small_hidden_sizes_over_the_grid() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(21);
    let groups = [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];
    let sim = common::on_sim(&dev);
    let all: &[usize] = &[1, 33, 123, 666, 2048];
    for (idx, (e, topk)) in [(8usize, 2usize), (128, 8), (384, 8)].into_iter().enumerate() {
        let g = groups[idx % groups.len()];
        let c = case::<bf16>(&dev, &mut rng, e, 256, 128, g, true);
        let ms: &[usize] = match (sim, e) {
            (false, _) => all,
            (true, 8) => &all[..4],
            (true, 128) => &[1, 33],
            (true, _) => &[1, 5],
        };
        run_case(&dev, &mut rng, &c, ms, topk, BF16_TOL, &format!("bf16 E={e} top{topk} g={g}"));
    }
    // All group sizes on one configuration, and f16.
    let ms: &[usize] = common::pick(&dev, &[1, 123], &[1, 17]);
    for g in groups {
        let c = case::<bf16>(&dev, &mut rng, 8, 512, 256, g, true);
        run_case(&dev, &mut rng, &c, ms, 2, BF16_TOL, &format!("bf16 g={g}"));
        let c = case::<f16>(&dev, &mut rng, 8, 512, 256, g, true);
        run_case(&dev, &mut rng, &c, ms, 2, 1e-3, &format!("f16 g={g}"));
    }
}

#[test]
fn real_hidden_sizes() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(22);
    // Qwen3-30B-A3B: E = 128, top-8, H = 2048, I = 768, g = 128 (the simulator: 16 experts, one
    // token: 8 routed experts either way).
    let (e, ms): (usize, &[usize]) = common::pick(&dev, (128, &[1, 33, 123, 666, 2048]), (16, &[1]));
    let c = case::<bf16>(&dev, &mut rng, e, 2048, 768, GroupSize::Group(128), false);
    run_case(&dev, &mut rng, &c, ms, 8, BF16_TOL, "Qwen3-30B-A3B");
    // Kimi-K2 expert shape (H = 7168, I = 2048, g = 32) on 8 experts, top-2 (the simulator: 2
    // experts, one token).
    let (e, ms): (usize, &[usize]) = common::pick(&dev, (8, &[1, 33, 666]), (2, &[1]));
    let c = case::<bf16>(&dev, &mut rng, e, 7168, 2048, GroupSize::Group(32), false);
    run_case(&dev, &mut rng, &c, ms, 2, BF16_TOL, "Kimi-K2 shape");
}

#[test]
fn expert_parallel_ranks_sum_to_the_full_layer() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(23);
    let (global, ranks, topk, h, i, m) = (64usize, 4usize, 8usize, 256usize, 128usize, 123usize);
    let full = case::<bf16>(&dev, &mut rng, global, h, i, GroupSize::Group(64), true);
    let x: Vec<bf16> = rng.normal_vec(m * h, 0.1);
    let (tw, ids) = random_routing(&mut rng, m, topk, global);
    let (dx, dtw, dids) = (dev.htod(&x).unwrap(), dev.htod(&tw).unwrap(), dev.htod(&ids).unwrap());
    let per = global / ranks;
    let mut sum = vec![0f64; m * h];
    for rank in 0..ranks {
        let map = ExpertMap::contiguous(&dev, global, ranks, rank).unwrap();
        let slice = |p: &PackedExperts<bf16>| PackedExperts {
            packed: p.packed[rank * per * p.shape.packed_len()..(rank + 1) * per * p.shape.packed_len()].to_vec(),
            scales: p.scales[rank * per * p.shape.scales_len()..(rank + 1) * per * p.shape.scales_len()].to_vec(),
            shape: p.shape,
            num_experts: per,
        };
        let (w13, w2) = (slice(&full.w13), slice(&full.w2));
        let (m13, m2) = (to_marlin(&dev, &w13), to_marlin(&dev, &w2));
        let mut ws = MoeWorkspace::<bf16>::new(&dev).unwrap();
        // Poison the output: every element must be written (tokens with no local expert get 0).
        let mut out = dev.htod(&vec![bf16::NAN; m * h]).unwrap();
        moe::fused::fused_marlin_moe_into(
            &dev,
            &dx,
            m,
            &m13,
            &m2,
            &dtw,
            &dids,
            topk,
            Some(&map),
            &MoeOptions::default(),
            &mut ws,
            &mut out,
        )
        .unwrap();
        let got = dev.dtoh(&out).unwrap();
        let dims = MoeDims { tokens: m, hidden: h, inter: i, experts: per, topk };
        check_rows(&format!("EP rank {rank}"), &got, &x, &dims, &w13, &w2, &tw, &ids, Some(map.as_slice()), BF16_TOL);
        for (s, g) in sum.iter_mut().zip(&got) {
            *s += g.to_f32() as f64;
        }
    }
    let dims = MoeDims { tokens: m, hidden: h, inter: i, experts: global, topk };
    let want = rm::fused_moe_ref(&x, &dims, &full.w13, &full.w2, &tw, &ids, None).unwrap();
    let num: f64 = sum.iter().zip(&want).map(|(s, w)| (s - *w as f64).abs()).sum();
    let den: f64 = want.iter().map(|w| (*w as f64).abs()).sum();
    assert!(num / den <= 6e-3, "Σ over ranks vs the full layer: {:.2e}", num / den);
}

/// QAT consistency: the rollout path (bf16 master weights → `quantize_to_marlin` on the GPU →
/// fused Marlin MoE) matches the trainer's MoE on `fake_quant` weights.
#[test]
fn qat_consistency() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(24);
    let (e, m) = common::pick(&dev, (16usize, 67usize), (8, 33));
    let (topk, h, i) = (4usize, 512usize, 256usize);
    for g in [GroupSize::Group(32), GroupSize::Group(128), GroupSize::Channelwise] {
        let s13 = QuantShape::new(2 * i, h, g).unwrap();
        let s2 = QuantShape::new(h, i, g).unwrap();
        let w13: Vec<bf16> = rng.normal_vec(e * s13.numel(), 0.1);
        let w2: Vec<bf16> = rng.normal_vec(e * s2.numel(), 0.1);
        let sync = |w: &[bf16], s: &QuantShape| {
            let (mut q, mut sc) = (Vec::new(), Vec::new());
            for chunk in w.chunks(s.numel()) {
                let d = dev.htod(chunk).unwrap();
                let mw = lowbit::marlin::sync::quantize_to_marlin::<bf16, bf16>(&dev, &d, s).unwrap();
                q.extend(dev.dtoh(mw.qweight()).unwrap());
                sc.extend(dev.dtoh(mw.scales()).unwrap());
            }
            MarlinExperts::from_host(&dev, &q, &sc, e, s.n, s.k, s.group_size).unwrap()
        };
        let (m13, m2) = (sync(&w13, &s13), sync(&w2, &s2));
        let x: Vec<bf16> = rng.normal_vec(m * h, 0.1);
        let (tw, ids) = random_routing(&mut rng, m, topk, e);
        let mut ws = MoeWorkspace::<bf16>::new(&dev).unwrap();
        let out = moe::fused_marlin_moe(
            &dev,
            &dev.htod(&x).unwrap(),
            m,
            &m13,
            &m2,
            &dev.htod(&tw).unwrap(),
            &dev.htod(&ids).unwrap(),
            topk,
            None,
            &MoeOptions::default(),
            &mut ws,
        )
        .unwrap();
        let got = dev.dtoh(&out).unwrap();
        let fq = |w: &[bf16], s: &QuantShape| -> Vec<f32> {
            w.chunks(s.numel()).flat_map(|c| rq::fake_quant::<bf16, bf16>(c, s).unwrap()).map(|v| v.to_f32()).collect()
        };
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let dims = MoeDims { tokens: m, hidden: h, inter: i, experts: e, topk };
        let want = rm::moe_ref(&xf, &dims, &fq(&w13, &s13), &fq(&w2, &s2), &tw, &ids, None).unwrap();
        let num: f64 = got.iter().zip(&want).map(|(g, w)| (g.to_f32() as f64 - *w as f64).abs()).sum();
        let den: f64 = want.iter().map(|w| (*w as f64).abs()).sum();
        assert!(num / den <= 4e-3, "g={g}: {:.2e}", num / den);
    }
}

#[test]
fn deterministic_and_workspace_reuse() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(25);
    let (e, ms) = common::pick(&dev, (128usize, [666usize, 1, 2048, 33]), (32, [123, 1, 200, 33]));
    let c = case::<bf16>(&dev, &mut rng, e, 256, 128, GroupSize::Group(128), true);
    let mut ws = MoeWorkspace::<bf16>::new(&dev).unwrap();
    let mut first: Vec<Vec<u16>> = Vec::new();
    for pass in 0..2 {
        // Sizes going up and down exercise workspace growth and reuse.
        for (j, m) in ms.into_iter().enumerate() {
            let mut r = Rng::new(100 + m as u64);
            let x: Vec<bf16> = r.normal_vec(m * 256, 0.1);
            let (tw, ids) = random_routing(&mut r, m, 8, e);
            let out = moe::fused_marlin_moe(
                &dev,
                &dev.htod(&x).unwrap(),
                m,
                &c.m13,
                &c.m2,
                &dev.htod(&tw).unwrap(),
                &dev.htod(&ids).unwrap(),
                8,
                None,
                &MoeOptions::default(),
                &mut ws,
            )
            .unwrap();
            let bits: Vec<u16> = dev.dtoh(&out).unwrap().iter().map(|v| v.to_bits()).collect();
            if pass == 0 {
                first.push(bits);
            } else {
                assert_eq!(bits, first[j], "M={m}: bit-identical across runs");
            }
        }
    }
}

#[test]
fn bad_input_is_rejected_before_launch() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(26);
    let c = case::<bf16>(&dev, &mut rng, 8, 256, 128, GroupSize::Group(128), false);
    let other = case::<bf16>(&dev, &mut rng, 4, 256, 128, GroupSize::Group(128), false);
    let wide = case::<bf16>(&dev, &mut rng, 8, 256, 192, GroupSize::Group(64), false);
    let m = 5;
    let x = dev.htod(&rng.normal_vec::<bf16>(m * 256, 0.1)).unwrap();
    let tw = dev.htod(&vec![0.5f32; m * 2]).unwrap();
    let ids = dev.htod(&[0i32, 1, 2, 3, 4, 5, 6, 7, 0, 1]).unwrap();
    let mut ws = MoeWorkspace::<bf16>::new(&dev).unwrap();
    let o = MoeOptions::default();
    let mut call = |m13: &MarlinExperts<bf16>, m2: &MarlinExperts<bf16>, ids: &_, topk: usize, opts: &MoeOptions| {
        moe::fused_marlin_moe(&dev, &x, m, m13, m2, &tw, ids, topk, None, opts, &mut ws)
    };
    assert!(call(&c.m13, &c.m2, &ids, 2, &o).is_ok());
    assert!(matches!(call(&c.m13, &other.m2, &ids, 2, &o), Err(Error::Shape { .. })), "expert counts differ");
    assert!(matches!(call(&c.m13, &wide.m2, &ids, 2, &o), Err(Error::Shape { .. })), "w13.n != 2·w2.k");
    assert!(call(&c.m13, &c.m2, &ids, 9, &o).is_err(), "topk > E");
    let bad = dev.htod(&[0i32, 1, 2, 3, 4, 5, 6, 8, 0, 1]).unwrap();
    assert!(matches!(call(&c.m13, &c.m2, &bad, 2, &o), Err(Error::InvalidArgument { .. })), "id 8 of 8 experts");
    let neg = dev.htod(&[0i32, 1, 2, -3, 4, 5, 6, 7, 0, 1]).unwrap();
    assert!(matches!(call(&c.m13, &c.m2, &neg, 2, &o), Err(Error::InvalidArgument { .. })));
    // Without the host check bad ids are skipped on the device: no fault, finite output.
    let lax = MoeOptions { validate_ids: false, ..o };
    let out = call(&c.m13, &c.m2, &bad, 2, &lax).unwrap();
    assert!(dev.dtoh(&out).unwrap().iter().all(|v| v.to_f32().is_finite()));
    assert!(call(&c.m13, &c.m2, &ids, 2, &MoeOptions { block_size: Some(24), ..o }).is_err(), "block size");
    let short = dev.htod(&[0i32; 3]).unwrap();
    assert!(matches!(call(&c.m13, &c.m2, &short, 2, &o), Err(Error::Length { .. })));
    // The workspace is still usable after errors.
    assert!(call(&c.m13, &c.m2, &ids, 2, &o).is_ok());
}

// ---- integer-exact cases (kernel_review C1) ---------------------------------------------------

/// Experts built from codes: `w13 [E, 2I, H]` whose gate rows have a single nonzero code, at
/// hidden column 0 (which every token sets to 1), with scale 2^6 — so every gate is 0, 64 or 128
/// and `silu` is exact there (silu(0) = 0; for g ≥ 40, 1 + e^−g rounds to 1 in f32 and f64) —
/// and random up rows; `w2 [E, H, I]` random. All scales are powers of two.
fn exact_experts<T: Half>(
    rng: &mut Rng,
    e: usize,
    h: usize,
    i: usize,
    g: GroupSize,
) -> (PackedExperts<T>, PackedExperts<T>) {
    let s13 = QuantShape::new(2 * i, h, g).unwrap();
    let s2 = QuantShape::new(h, i, g).unwrap();
    let (mut c13, mut sc13, mut c2, mut sc2) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..e {
        for row in 0..2 * i {
            for col in 0..h {
                c13.push(if row < i {
                    if col == 0 {
                        [0i8, 1, 2][rng.below(3)]
                    } else {
                        0
                    }
                } else {
                    rng.below(16) as i8 - 8
                });
            }
            for grp in 0..s13.groups_per_row() {
                let s = if row < i && grp == 0 { 64.0 } else { common::pow2(rng, -6, -4) };
                sc13.push(T::from_f32(s));
            }
        }
        c2.extend((0..h * i).map(|_| rng.below(16) as i8 - 8));
        sc2.extend((0..s2.scales_len()).map(|_| T::from_f32(common::pow2(rng, -4, -2))));
    }
    let pe = |c: &[i8], s: Vec<T>, shape: QuantShape| PackedExperts {
        packed: common::pack_codes(c),
        scales: s,
        shape,
        num_experts: e,
    };
    (pe(&c13, sc13, s13), pe(&c2, sc2, s2))
}

/// `Σ terms` in f64, checked to be exact in f32 in any order: every term is a multiple of
/// `2^unit` and `Σ|terms| ≤ 2^(24 + unit)`.
fn exact_sum(terms: impl Iterator<Item = f64>, unit: i32, what: &str) -> f32 {
    let (mut s, mut a) = (0f64, 0f64);
    for t in terms {
        assert_eq!((t / 2f64.powi(unit)).fract(), 0.0, "test construction: {what}: {t} is not a multiple of 2^{unit}");
        s += t;
        a += t.abs();
    }
    assert!(a <= 2f64.powi(24 + unit), "test construction: {what}: Σ|terms| = {a} is not exact in f32");
    s as f32 + 0.0
}

/// The fused layer with the kernels' rounding points (documented in `moe::fused`): GEMM1 rounds
/// its exact f32 sums to T; act = T(silu(gate) · up); GEMM2 rounds `tw · Σ` to T; the top-k sum
/// adds the local slots' T partials in f32 in k order from 0 and rounds once.
#[allow(clippy::too_many_arguments)]
fn staged_ref<T: Half>(
    x: &[f32],
    dims: &MoeDims,
    w13: &PackedExperts<T>,
    w2: &PackedExperts<T>,
    tw: &[f32],
    ids: &[i32],
    map: Option<&[i32]>,
) -> Vec<f64> {
    let (h, i_dim, k) = (dims.hidden, dims.inter, dims.topk);
    let rt = |v: f32| T::from_f32(v).to_f32();
    let deq13: Vec<Vec<f32>> =
        (0..w13.num_experts).map(|e| w13.dequantize::<T>(e).unwrap().iter().map(|v| v.to_f32()).collect()).collect();
    let deq2: Vec<Vec<f32>> =
        (0..w2.num_experts).map(|e| w2.dequantize::<T>(e).unwrap().iter().map(|v| v.to_f32()).collect()).collect();
    let mut out = Vec::with_capacity(dims.tokens * h);
    for t in 0..dims.tokens {
        let xt = &x[t * h..(t + 1) * h];
        let mut acc = vec![0f32; h];
        for j in 0..k {
            let s = t * k + j;
            let Some(e) = (match map {
                None => Some(ids[s] as usize),
                Some(m) => (m[ids[s] as usize] >= 0).then(|| m[ids[s] as usize] as usize),
            }) else {
                continue;
            };
            let gu: Vec<f32> = (0..2 * i_dim)
                .map(|r| {
                    let w = &deq13[e][r * h..(r + 1) * h];
                    rt(exact_sum(xt.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64), -6, "GEMM1"))
                })
                .collect();
            let act: Vec<f32> = (0..i_dim)
                .map(|r| {
                    let g = gu[r];
                    assert!(g == 0.0 || g >= 40.0, "test construction: gate {g}");
                    rt(g * gu[i_dim + r]) // silu(g) == g exactly here
                })
                .collect();
            for (n, a) in acc.iter_mut().enumerate() {
                let w = &deq2[e][n * i_dim..(n + 1) * i_dim];
                let sum = exact_sum(act.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64), -4, "GEMM2");
                *a += rt(tw[s] * sum);
            }
        }
        out.extend(acc.iter().map(|&v| rt(v) as f64));
    }
    out
}

/// Tokens with hidden column 0 set to 1 and ternary activations elsewhere (about `nnz`).
fn exact_x(rng: &mut Rng, tokens: usize, h: usize, nnz: usize) -> Vec<f32> {
    let mut x = Vec::with_capacity(tokens * h);
    for _ in 0..tokens {
        let mut row = common::ternary(rng, h, nnz as f64 / h as f64);
        row[0] = 1.0;
        x.extend(row);
    }
    x
}

#[allow(clippy::too_many_arguments)]
fn exact_fused_case<T: Half>(
    dev: &Device,
    rng: &mut Rng,
    (tokens, topk, e): (usize, usize, usize),
    (h, i): (usize, usize),
    g: GroupSize,
    bs: Option<usize>,
    ranks: usize,
) {
    let (w13, w2) = exact_experts::<T>(rng, e, h, i, g);
    let x = exact_x(rng, tokens, h, 16);
    let xt: Vec<T> = x.iter().map(|&v| T::from_f32(v)).collect();
    let mut ids = Vec::with_capacity(tokens * topk);
    for _ in 0..tokens {
        let mut row: Vec<i32> = Vec::new();
        while row.len() < topk {
            let c = rng.below(e) as i32;
            if !row.contains(&c) {
                row.push(c);
            }
        }
        ids.extend(row);
    }
    // Power-of-two router weights.
    let tw: Vec<f32> = (0..tokens * topk).map(|_| common::pow2(rng, -3, 0)).collect();
    let (dx, dtw, dids) = (dev.htod(&xt).unwrap(), dev.htod(&tw).unwrap(), dev.htod(&ids).unwrap());
    let opts = MoeOptions { block_size: bs, ..MoeOptions::default() };
    let per = e / ranks;
    for rank in 0..ranks {
        let map = (ranks > 1).then(|| ExpertMap::contiguous(dev, e, ranks, rank).unwrap());
        let slice = |p: &PackedExperts<T>| PackedExperts {
            packed: p.packed[rank * per * p.shape.packed_len()..(rank + 1) * per * p.shape.packed_len()].to_vec(),
            scales: p.scales[rank * per * p.shape.scales_len()..(rank + 1) * per * p.shape.scales_len()].to_vec(),
            shape: p.shape,
            num_experts: per,
        };
        let (l13, l2) = (slice(&w13), slice(&w2));
        let (m13, m2) = (to_marlin(dev, &l13), to_marlin(dev, &l2));
        let mut ws = MoeWorkspace::<T>::new(dev).unwrap();
        let mut out = dev.htod(&vec![T::from_f32(f32::NAN); tokens * h]).unwrap();
        moe::fused::fused_marlin_moe_into(
            dev,
            &dx,
            tokens,
            &m13,
            &m2,
            &dtw,
            &dids,
            topk,
            map.as_ref(),
            &opts,
            &mut ws,
            &mut out,
        )
        .unwrap();
        let got: Vec<T> = dev.dtoh(&out).unwrap();
        let dims = MoeDims { tokens, hidden: h, inter: i, experts: per, topk };
        let mslice = map.as_ref().map(|m| m.as_slice());
        let want = staged_ref(&x, &dims, &l13, &l2, &tw, &ids, mslice);
        let what = format!(
            "{} exact fused tokens={tokens} top{topk} E={e} H={h} I={i} g={g} bs={bs:?} rank {rank}/{ranks}",
            T::DTYPE
        );
        common::assert_exact(&what, &got, &want, h);
        // The f64 reference agrees within the tolerance (the staged one only adds roundings).
        let r64 = rm::fused_moe_ref(&xt, &dims, &l13, &l2, &tw, &ids, mslice).unwrap();
        let num: f64 = want.iter().zip(&r64).map(|(a, b)| (a - *b as f64).abs()).sum();
        let den: f64 = r64.iter().map(|b| (*b as f64).abs()).sum();
        assert!(num <= 1e-2 * den.max(1e-30), "{what}: staged vs f64 reference {:.2e}", num / den);
    }
}

fn exact_fused<T: Half>(dev: &Device) {
    let mut rng = Rng::new(0xC1F);
    let groups = [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];
    let mut idx = 0;
    // Every block size; w13 256x256 / w2 256x128 (K % 128 == 0) and w13 384x192 / w2 192x192
    // (K % 128 != 0); then the planner's block size, an expert map, many experts.
    for bs in lowbit::marlin::gemm::MOE_BLOCK_SIZES {
        for (h, i) in [(256, 128), (192, 192)] {
            let g = groups[idx % 4];
            idx += 1;
            if g.resolve("t", i).is_err() || g.resolve("t", h).is_err() {
                continue;
            }
            exact_fused_case::<T>(dev, &mut rng, (40, 2, 8), (h, i), g, Some(bs), 1);
        }
    }
    exact_fused_case::<T>(dev, &mut rng, (33, 4, 16), (256, 128), GroupSize::Group(64), None, 4);
    exact_fused_case::<T>(dev, &mut rng, (6, 8, 64), (256, 128), GroupSize::Group(128), None, 1);
}

#[test]
fn exact_fused_bf16() {
    let dev = gpu_or_skip!();
    exact_fused::<bf16>(&dev);
}

#[test]
fn exact_fused_f16() {
    let dev = gpu_or_skip!();
    exact_fused::<f16>(&dev);
}

// ---- the capturable decode path (issue 9) ------------------------------------------------------

/// Kernel launches of one decode call (≤ 1024 slots): align (one block), GEMM1, `silu·mul`, GEMM2
/// (with the top-k sum in its epilogue). Change it here when kernels are fused (e.g. `silu·mul`
/// into GEMM1's epilogue).
const DECODE_LAUNCHES: u64 = 4;
/// Above 1024 slots the alignment takes two kernels (count + scan, scatter).
const LARGE_LAUNCHES: u64 = DECODE_LAUNCHES + 1;

#[test]
fn reserved_workspace_allocates_copies_and_syncs_nothing() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(27);
    let (e, topk) = (16usize, 4usize);
    let c = case::<bf16>(&dev, &mut rng, e, 256, 128, GroupSize::Group(128), true);
    let h = 256;
    // Token counts up and down, both alignment paths (300·4 = 1200 slots > 1024).
    let max_tokens = 300;
    let ms = [1usize, 7, 64, 3, 300, 2, 256];
    let lax = MoeOptions { validate_ids: false, ..MoeOptions::default() };
    // Everything a call reads or writes is uploaded first (uploads allocate and copy).
    let inputs: Vec<_> = ms
        .iter()
        .map(|&m| {
            let x: Vec<bf16> = rng.normal_vec(m * h, 0.1);
            let (tw, ids) = random_routing(&mut rng, m, topk, e);
            (dev.htod(&x).unwrap(), dev.htod(&tw).unwrap(), dev.htod(&ids).unwrap(), dev.zeros::<bf16>(m * h).unwrap())
        })
        .collect();
    let mut ws = MoeWorkspace::<bf16>::new(&dev).unwrap();
    ws.reserve(&dev, &c.m13, &c.m2, max_tokens, topk, None, &lax).unwrap();
    assert!(ws.reserve(&dev, &c.m13, &c.m2, 0, topk, None, &lax).is_err(), "reserve validates like a call");
    let mut outs: Vec<_> = inputs.iter().map(|i| i.3.clone()).collect();
    dev.synchronize().unwrap();
    let before = (dev.alloc_count(), dev.host_copy_count(), dev.sync_count());
    for (j, ((x, tw, ids, _), &m)) in inputs.iter().zip(&ms).enumerate() {
        let l0 = dev.launch_count();
        moe::fused::fused_marlin_moe_into(&dev, x, m, &c.m13, &c.m2, tw, ids, topk, None, &lax, &mut ws, &mut outs[j])
            .unwrap();
        let launches = dev.launch_count() - l0;
        let want = if m * topk <= moe::SINGLE_BLOCK_MAX_SLOTS { DECODE_LAUNCHES } else { LARGE_LAUNCHES };
        assert_eq!(launches, want, "M={m}: launches per call");
        assert_eq!(launches as usize, moe::fused::launches_per_call(m, topk), "M={m}: the documented count");
    }
    let after = (dev.alloc_count(), dev.host_copy_count(), dev.sync_count());
    assert_eq!(after, before, "(allocations, host copies, host syncs) over {} reserved calls", ms.len());
    assert!(ws.check_ids(&dev).is_ok());
    // Same bits as validating calls on a fresh, unreserved workspace.
    let mut fresh = MoeWorkspace::<bf16>::new(&dev).unwrap();
    for ((x, tw, ids, _), (&m, out)) in inputs.iter().zip(ms.iter().zip(&outs)) {
        let want =
            moe::fused_marlin_moe(&dev, x, m, &c.m13, &c.m2, tw, ids, topk, None, &MoeOptions::default(), &mut fresh)
                .unwrap();
        let bits = |v: Vec<bf16>| v.iter().map(|b| b.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(dev.dtoh(out).unwrap()), bits(dev.dtoh(&want).unwrap()), "M={m}: reserved vs fresh");
    }

    // Bad ids on the capturable path: skipped on the device, reported by check_ids.
    let m = 3;
    let (x, tw, _, _) = &inputs[3];
    let bad = dev.htod(&[0i32, 1, 2, 3, 4, 5, 6, 7, 8, 99, 10, 11]).unwrap(); // slot 9 = token 2, k 1
    let good = dev.htod(&[0i32, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]).unwrap();
    let mut out = dev.zeros::<bf16>(m * h).unwrap();
    let call = |ids: &_, opts: &MoeOptions, ws: &mut MoeWorkspace<bf16>, out: &mut _| {
        moe::fused::fused_marlin_moe_into(&dev, x, m, &c.m13, &c.m2, tw, ids, topk, None, opts, ws, out)
    };
    let s0 = (dev.alloc_count(), dev.host_copy_count(), dev.sync_count());
    call(&bad, &lax, &mut ws, &mut out).unwrap();
    call(&good, &lax, &mut ws, &mut out).unwrap();
    assert_eq!((dev.alloc_count(), dev.host_copy_count(), dev.sync_count()), s0, "no host work for bad ids either");
    // A validating call reports its own ids only (these are good) and leaves the pending word.
    assert!(call(&good, &MoeOptions::default(), &mut ws, &mut out).is_ok());
    match ws.check_ids(&dev) {
        Err(Error::InvalidArgument { msg, .. }) => assert!(msg.contains("token 2, k 1"), "{msg}"),
        other => panic!("expected the pending bad id, got {other:?}"),
    }
    assert!(ws.check_ids(&dev).is_ok(), "check_ids resets the word");
    // A validating call with bad ids still fails before the GEMMs, and does not leave them pending.
    assert!(matches!(call(&bad, &MoeOptions::default(), &mut ws, &mut out), Err(Error::InvalidArgument { .. })));
    assert!(ws.check_ids(&dev).is_ok());
}
