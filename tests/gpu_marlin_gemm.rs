//! GPU tests of the dense Marlin W4A16 GEMM against the f64 CPU reference (DESIGN §5):
//! `mean|Y − ref| / mean|ref|` ≤ 1e-3 (f16) / 4e-3 (bf16), no NaN, every element written (the
//! output is poisoned with NaN first, and the padding of strided X is NaN too), determinism,
//! stream-K workspace reuse, QAT consistency, and typed errors for bad input.
//!
//! Integer-exact cases (kernel_review C1): ternary activations, power-of-two scales, compared bit
//! for bit on every output element, plus one-hot probes (one nonzero activation per row, or one
//! nonzero weight code per column) that pin any wrong index — over every kernel instance and
//! plan variant (`exact_cases`, checked by `exact_cases_cover_every_plan_variant`).
//!
//! On lowbit-sim (`common::on_sim`) the random-data tests run a reduced shape set; the exact
//! tests run the same set everywhere. Without a GPU these tests print why and pass
//! (LOWBIT_REQUIRE_GPU=1 makes that a failure).

mod common;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use lowbit::format::{self, GroupSize, QuantShape};
use lowbit::marlin::gemm::{
    marlin_gemm, marlin_gemm_into, plan_gemm, BlockShape, GemmPlan, Half, MarlinLinear, MarlinWorkspace,
};
use lowbit::marlin::layout::MarlinWeights;
use lowbit::reference::gemm::{gemm_ref_f64_at, rel_mean_abs_err};
use lowbit::reference::marlin as refm;
use lowbit::reference::quant::transpose;
use lowbit::reference::rng::Rng;
use lowbit::{DType, Device, Error, Float};

/// A random INT4 weight matrix in compressed-tensors form (+ optional act-order `g_idx`).
struct Problem<T> {
    shape: QuantShape,
    /// `weight_packed` `[N, K/8]`, nibbles in 1..=15.
    packed: Vec<i32>,
    /// `weight_scale` `[N, K/g]`.
    scales: Vec<T>,
    /// Act-order group of each source K-row (uniform groups), or `None`.
    g_idx: Option<Vec<i32>>,
}

impl<T: Half> Problem<T> {
    fn random(n: usize, k: usize, gs: GroupSize, act_order: bool, seed: u64) -> Self {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let mut rng = Rng::new(seed);
        let packed: Vec<i32> = (0..shape.packed_len())
            .map(|_| {
                let mut w = 0u32;
                for i in 0..8 {
                    w |= (1 + rng.below(15) as u32) << (4 * i);
                }
                w as i32
            })
            .collect();
        let scales: Vec<T> = (0..shape.scales_len()).map(|_| T::from_f32(rng.range(0.004, 0.02))).collect();
        let g_idx = act_order.then(|| {
            let mut g: Vec<i32> = (0..k).map(|c| (c / shape.group) as i32).collect();
            for i in (1..k).rev() {
                g.swap(i, rng.below(i + 1));
            }
            g
        });
        Problem { shape, packed, scales, g_idx }
    }

    /// Given codes `[N, K]` in −8..=7 and scales `[N, K/g]`, with a random uniform act-order
    /// `g_idx` when asked.
    fn from_codes(
        n: usize,
        k: usize,
        gs: GroupSize,
        act_order: bool,
        codes: &[i8],
        scales: Vec<T>,
        rng: &mut Rng,
    ) -> Self {
        let shape = QuantShape::new(n, k, gs).unwrap();
        assert_eq!((codes.len(), scales.len()), (shape.numel(), shape.scales_len()));
        let g_idx = act_order.then(|| {
            let mut g: Vec<i32> = (0..k).map(|c| (c / shape.group) as i32).collect();
            for i in (1..k).rev() {
                g.swap(i, rng.below(i + 1));
            }
            g
        });
        Problem { shape, packed: common::pack_codes(codes), scales, g_idx }
    }

    /// Random codes in −8..=7 (all sixteen) and power-of-two scales `2^e`, `e` in `lo..=hi`.
    fn exact(n: usize, k: usize, gs: GroupSize, act_order: bool, lo: i32, hi: i32, rng: &mut Rng) -> Self {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let codes: Vec<i8> = (0..n * k).map(|_| rng.below(16) as i8 - 8).collect();
        let scales = (0..shape.scales_len()).map(|_| T::from_f32(common::pow2(rng, lo, hi))).collect();
        Self::from_codes(n, k, gs, act_order, &codes, scales, rng)
    }

    /// One nonzero code per column `nn`, at source column `(7·nn + off) % K`, a power of two
    /// (±1, ±2, ±4, −8); scales as [`Problem::exact`].
    fn one_hot_weights(n: usize, k: usize, gs: GroupSize, act_order: bool, off: usize, rng: &mut Rng) -> Self {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let mut codes = vec![0i8; n * k];
        for nn in 0..n {
            codes[nn * k + (7 * nn + off) % k] = [1, -1, 2, -2, 4, -4, -8][rng.below(7)];
        }
        let scales = (0..shape.scales_len()).map(|_| T::from_f32(common::pow2(rng, -4, 0))).collect();
        Self::from_codes(n, k, gs, act_order, &codes, scales, rng)
    }

    /// The dequantized `W[N, K]` (source column order), row-major.
    fn w_matrix(&self) -> Vec<f32> {
        (0..self.shape.n).flat_map(|nn| self.w_row(nn)).collect()
    }

    /// Row `nn` of the dequantized `W[N, K]`: `T(q · s)` from the plain codes.
    fn w_row(&self, nn: usize) -> Vec<f32> {
        let (k, g, gpr) = (self.shape.k, self.shape.group, self.shape.groups_per_row());
        let codes: Vec<i8> =
            self.packed[nn * k / 8..(nn + 1) * k / 8].iter().flat_map(|&w| format::unpack8(w)).collect();
        (0..k)
            .map(|c| {
                let grp = self.g_idx.as_ref().map_or(c / g, |gi| gi[c] as usize);
                T::from_f32(codes[c] as f32 * self.scales[nn * gpr + grp].to_f32()).to_f32()
            })
            .collect()
    }

    /// Marlin weights: small shapes through the CPU reference repack (independent of the GPU
    /// layout kernels), large ones through the GPU repack — except on the simulator, where the
    /// CPU repack is much cheaper (the layout kernels have their own tests).
    fn weights(&self, dev: &Device) -> MarlinWeights<T> {
        let (n, k, g) = (self.shape.n, self.shape.k, self.shape.group);
        let perm = self.g_idx.as_ref().map(|gi| refm::act_order_perm(gi, k, g).unwrap());
        if n * k <= 1 << 22 || common::on_sim(dev) {
            let qweight = refm::ct_marlin_repack(&self.packed, perm.as_deref(), k, n).unwrap();
            let gptq_scales = transpose(&self.scales, n, self.shape.groups_per_row()).unwrap();
            let ms = refm::marlin_permute_scales(&gptq_scales, k, n, g).unwrap();
            MarlinWeights::from_host_marlin(dev, &qweight, &ms, perm.as_deref(), &self.shape).unwrap()
        } else {
            let packed = dev.htod(&self.packed).unwrap();
            let scales = dev.htod(&self.scales).unwrap();
            match &self.g_idx {
                None => MarlinWeights::from_compressed_tensors(dev, &packed, &scales, &self.shape).unwrap(),
                Some(gi) => {
                    let qw = lowbit::quant::ct_to_gptq(dev, &packed, &self.shape).unwrap();
                    let sc = lowbit::quant::transpose_scales(dev, &scales, n, self.shape.groups_per_row()).unwrap();
                    MarlinWeights::from_gptq_act_order(dev, &qw, &sc, gi, &self.shape).unwrap()
                }
            }
        }
    }
}

fn tolerance<T: Float>() -> f64 {
    if T::DTYPE == DType::F16 {
        1e-3
    } else {
        4e-3
    }
}

fn nan<T: Float>() -> T {
    T::from_f32(f32::NAN)
}

/// Rows/columns to compare: all when small, else the edges plus a random sample.
fn sample(len: usize, max: usize, rng: &mut Rng) -> Vec<usize> {
    if len <= max {
        return (0..len).collect();
    }
    let mut v = vec![0, 1, len / 2, len - 2, len - 1];
    while v.len() < max {
        v.push(rng.below(len));
    }
    v.sort_unstable();
    v.dedup();
    v
}

/// X with `m` rows of stride `lda`: N(0, 1) values, NaN in the padding columns.
fn random_x<T: Float>(m: usize, k: usize, lda: usize, seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    let len = (m - 1) * lda + k;
    (0..len).map(|i| if i % lda < k { T::from_f32(rng.normal()) } else { nan() }).collect()
}

/// Runs one GEMM into a NaN-poisoned output and checks it against the f64 reference.
#[allow(clippy::too_many_arguments)]
fn check_case<T: Half>(
    dev: &Device,
    prob: &Problem<T>,
    w: &MarlinWeights<T>,
    m: usize,
    lda: usize,
    ws: &mut MarlinWorkspace,
    seed: u64,
    what: &str,
) {
    let (n, k) = (prob.shape.n, prob.shape.k);
    let x = random_x::<T>(m, k, lda, seed);
    let xd = dev.htod(&x).unwrap();
    let mut out = dev.htod(&vec![nan::<T>(); m * n]).unwrap();
    marlin_gemm_into(dev, &xd, m, lda, w, &mut out, ws).unwrap();
    let y: Vec<T> = dev.dtoh(&out).unwrap();
    if let Some(i) = y.iter().position(|v| !v.to_f32().is_finite()) {
        panic!("{what} m={m}: output element ({}, {}) is {:?} (not written or NaN)", i / n, i % n, y[i]);
    }
    let mut rng = Rng::new(seed ^ 0x5eed);
    let rows = sample(m, 24, &mut rng);
    let cols = sample(n, if n * k > 1 << 24 { 192 } else { 1024 }, &mut rng);
    // W restricted to the sampled columns, as a [cols, K] matrix.
    let w_cols: Vec<f32> = cols.iter().flat_map(|&c| prob.w_row(c)).collect();
    let col_idx: Vec<usize> = (0..cols.len()).collect();
    let want = gemm_ref_f64_at(&x, m, k, lda, &w_cols, cols.len(), &rows, &col_idx).unwrap();
    let got: Vec<f64> = rows
        .iter()
        .flat_map(|&r| cols.iter().map(move |&c| (r, c)))
        .map(|(r, c)| y[r * n + c].to_f32() as f64)
        .collect();
    let err = rel_mean_abs_err(&got, &want);
    assert!(err <= tolerance::<T>(), "{what} m={m} lda={lda}: mean|Δ|/mean|ref| = {err:.3e}");
}

const MS: [usize; 13] = [1, 2, 3, 8, 13, 16, 26, 64, 67, 257, 658, 1024, 4096];
const GROUPS: [GroupSize; 4] =
    [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise];

fn grid_small<T: Half>(dev: &Device) {
    let mut ws = MarlinWorkspace::new();
    let mut seed = 11;
    for (n, k) in [(64, 128), (192, 256), (256, 384), (512, 1024)] {
        for gs in GROUPS {
            if gs.resolve("t", k).is_err() {
                continue;
            }
            for act_order in [false, true] {
                if act_order && gs == GroupSize::Channelwise {
                    continue;
                }
                seed += 1;
                let prob = Problem::<T>::random(n, k, gs, act_order, seed);
                let w = prob.weights(dev);
                for (i, &m) in MS.iter().enumerate() {
                    // The simulator keeps M <= 257 (658, 1024, 4096 only on the smallest shape,
                    // M <= 67 on the largest).
                    let max_m = match (n, k) {
                        (64, 128) => usize::MAX,
                        (512, 1024) => 67,
                        _ => 257,
                    };
                    if common::on_sim(dev) && m > max_m {
                        continue;
                    }
                    let lda = if i % 2 == 1 { k + 8 * (1 + i) } else { k };
                    let what = format!("{} {n}x{k} g={gs} act_order={act_order}", T::DTYPE);
                    check_case(dev, &prob, &w, m, lda, &mut ws, seed * 100 + i as u64, &what);
                }
            }
        }
    }
}

#[test]
fn dense_grid_small_bf16() {
    let dev = gpu_or_skip!();
    grid_small::<bf16>(&dev);
}

#[test]
fn dense_grid_small_f16() {
    let dev = gpu_or_skip!();
    grid_small::<f16>(&dev);
}

/// (N, K, group, act-order, Ms) of `real_shapes` on the simulator (ptxsim.md §6, trimmed): no
/// 28672×8192, 8192×28672 or 4096×7168, fewer M; still stream-K at real widths, every group kind,
/// act-order, several m-blocks (the exact cases cover every plan variant on small shapes).
const REAL_SHAPES_SIM: [(usize, usize, GroupSize, bool, &[usize]); 5] = [
    (4096, 4096, GroupSize::Group(128), false, &[1]),
    (4096, 4096, GroupSize::Group(128), true, &[26]),
    (1536, 2048, GroupSize::Group(32), false, &[3, 67]),
    (2048, 768, GroupSize::Channelwise, false, &[1, 257]),
    (7168, 2048, GroupSize::Group(32), false, &[64]),
];

fn real_shapes<T: Half>(dev: &Device) {
    let mut ws = MarlinWorkspace::new();
    // (N, K, group, act-order, Ms): Llama-3-70B, Llama-3-8B-like, Qwen3-30B-A3B and Kimi-K2 experts.
    let full: [(usize, usize, GroupSize, bool, &[usize]); 8] = [
        (4096, 4096, GroupSize::Group(128), false, &[1, 13, 16, 67, 1024, 4096]),
        (4096, 4096, GroupSize::Group(128), true, &[1, 26, 257]),
        (28672, 8192, GroupSize::Group(128), false, &[1, 16, 67, 1024]),
        (8192, 28672, GroupSize::Group(128), false, &[1, 16, 658]),
        (1536, 2048, GroupSize::Group(32), false, &[1, 3, 64, 257]),
        (2048, 768, GroupSize::Channelwise, false, &[1, 8, 658]),
        (4096, 7168, GroupSize::Group(32), false, &[1, 16, 1024]),
        (7168, 2048, GroupSize::Group(32), false, &[2, 64, 658]),
    ];
    let cases: &[_] = common::pick(dev, &full[..], &REAL_SHAPES_SIM[..]);
    for (i, &(n, k, gs, act_order, ms)) in cases.iter().enumerate() {
        let prob = Problem::<T>::random(n, k, gs, act_order, 500 + i as u64);
        let w = prob.weights(dev);
        for (j, &m) in ms.iter().enumerate() {
            let lda = if j % 2 == 1 { k + 64 } else { k };
            let what = format!("{} {n}x{k} g={gs} act_order={act_order}", T::DTYPE);
            check_case(dev, &prob, &w, m, lda, &mut ws, 9000 + 10 * i as u64 + j as u64, &what);
        }
    }
}

#[test]
fn dense_real_shapes_bf16() {
    let dev = gpu_or_skip!();
    real_shapes::<bf16>(&dev);
}

#[test]
fn dense_real_shapes_f16() {
    let dev = gpu_or_skip!();
    real_shapes::<f16>(&dev);
}

#[test]
fn deterministic_across_runs() {
    let dev = gpu_or_skip!();
    let mut ws = MarlinWorkspace::new();
    let full: &[(usize, usize, usize)] = &[(1, 4096, 4096), (13, 4096, 4096), (67, 1024, 8192), (658, 4096, 4096)];
    // The simulator: stream-K plans (tiles in up to 16 pieces, one to eleven m-blocks) on
    // narrower shapes, 3 runs each (`stream_k_stress` repeats more).
    let sim: &[(usize, usize, usize)] = &[(1, 512, 4096), (13, 1024, 2048), (67, 512, 2048), (658, 256, 512)];
    let (shapes, runs) = common::pick(&dev, (full, 10), (sim, 3));
    for &(m, n, k) in shapes {
        let plan = plan_gemm(m, n, k, dev.info().sm_count).unwrap();
        let prob = Problem::<bf16>::random(n, k, GroupSize::Group(128), false, 77);
        let w = prob.weights(&dev);
        let x = dev.htod(&random_x::<bf16>(m, k, k, 78)).unwrap();
        let first: Vec<bf16> = dev.dtoh(&marlin_gemm(&dev, &x, m, k, &w, &mut ws).unwrap()).unwrap();
        for run in 1..runs {
            let y: Vec<bf16> = dev.dtoh(&marlin_gemm(&dev, &x, m, k, &w, &mut ws).unwrap()).unwrap();
            common::assert_bits_eq(&format!("{m}x{n}x{k} {plan:?} run {run}"), &y, &first);
        }
    }
}

#[test]
fn workspace_reuse_across_shapes() {
    // Stream-K counters must be back at zero after every launch, whatever the shape.
    let dev = gpu_or_skip!();
    let mut ws = MarlinWorkspace::new();
    let a = Problem::<f16>::random(512, 4096, GroupSize::Group(64), false, 5);
    let b = Problem::<f16>::random(256, 2048, GroupSize::Group(128), false, 6);
    let (wa, wb) = (a.weights(&dev), b.weights(&dev));
    for round in 0..3 {
        check_case(&dev, &a, &wa, 1, 4096, &mut ws, 40 + round, "reuse a");
        check_case(&dev, &b, &wb, 5, 2048, &mut ws, 50 + round, "reuse b");
        check_case(&dev, &a, &wa, 40, 4096, &mut ws, 60 + round, "reuse a");
    }
}

fn qat_consistency<T: Half>(dev: &Device) {
    // marlin_gemm(X, repacked quantize_pack(W)) == X · fake_quant(W)ᵀ (f64), within the GEMM bound.
    for (n, k, gs) in
        [(256, 512, GroupSize::Group(32)), (1024, 2048, GroupSize::Group(128)), (192, 256, GroupSize::Channelwise)]
    {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let mut rng = Rng::new(n as u64 + k as u64);
        let w_host: Vec<T> = rng.normal_vec(n * k, 0.05);
        let fq: Vec<f32> =
            lowbit::reference::quant::fake_quant::<T, T>(&w_host, &shape).unwrap().iter().map(|v| v.to_f32()).collect();
        let w_dev = dev.htod(&w_host).unwrap();
        let packed = lowbit::quant::quantize_pack::<T, T>(dev, &w_dev, &shape).unwrap();
        let weights = MarlinWeights::from_packed(dev, &packed).unwrap();
        let mut ws = MarlinWorkspace::new();
        for m in [1, 17, 130] {
            let x = random_x::<T>(m, k, k, m as u64);
            let y: Vec<T> =
                dev.dtoh(&marlin_gemm(dev, &dev.htod(&x).unwrap(), m, k, &weights, &mut ws).unwrap()).unwrap();
            let rows: Vec<usize> = (0..m).collect();
            let cols: Vec<usize> = (0..n).collect();
            let want = gemm_ref_f64_at(&x, m, k, k, &fq, n, &rows, &cols).unwrap();
            let got: Vec<f64> = y.iter().map(|v| v.to_f32() as f64).collect();
            let err = rel_mean_abs_err(&got, &want);
            assert!(err <= tolerance::<T>(), "QAT {} {n}x{k} g={gs} m={m}: {err:.3e}", T::DTYPE);
        }
    }
}

#[test]
fn qat_consistency_bf16() {
    let dev = gpu_or_skip!();
    qat_consistency::<bf16>(&dev);
}

#[test]
fn qat_consistency_f16() {
    let dev = gpu_or_skip!();
    qat_consistency::<f16>(&dev);
}

#[test]
fn marlin_linear_forward() {
    let dev = gpu_or_skip!();
    let prob = Problem::<bf16>::random(384, 512, GroupSize::Group(64), false, 91);
    let layer = MarlinLinear::new(prob.weights(&dev)).unwrap();
    assert_eq!((layer.out_features(), layer.in_features()), (384, 512));
    let x = random_x::<bf16>(9, 512, 512, 92);
    let y: Vec<bf16> = dev.dtoh(&layer.forward(&dev, &dev.htod(&x).unwrap(), 9).unwrap()).unwrap();
    let mut ws = MarlinWorkspace::new();
    let y2: Vec<bf16> =
        dev.dtoh(&marlin_gemm(&dev, &dev.htod(&x).unwrap(), 9, 512, layer.weights(), &mut ws).unwrap()).unwrap();
    common::assert_bits_eq("MarlinLinear::forward vs marlin_gemm", &y, &y2);
}

#[test]
fn bad_input_is_a_typed_error() {
    let dev = gpu_or_skip!();
    let prob = Problem::<bf16>::random(128, 256, GroupSize::Group(32), false, 3);
    let w = prob.weights(&dev);
    let mut ws = MarlinWorkspace::new();
    let x: CudaSlice<bf16> = dev.htod(&random_x::<bf16>(4, 256, 256, 4)).unwrap();
    // m = 0, x too short for m rows, lda < K, lda not a multiple of 8.
    assert!(matches!(marlin_gemm(&dev, &x, 0, 256, &w, &mut ws), Err(Error::Shape { .. })));
    assert!(matches!(marlin_gemm(&dev, &x, 5, 256, &w, &mut ws), Err(Error::Length { .. })));
    assert!(matches!(marlin_gemm(&dev, &x, 4, 128, &w, &mut ws), Err(Error::Shape { .. })));
    assert!(matches!(marlin_gemm(&dev, &x, 1, 260, &w, &mut ws), Err(Error::Shape { .. })));
    // Output of the wrong length.
    let mut out = dev.zeros::<bf16>(4 * 128 + 1).unwrap();
    assert!(matches!(marlin_gemm_into(&dev, &x, 4, 256, &w, &mut out, &mut ws), Err(Error::Length { .. })));
    // A shape the layout accepts but the GEMM does not (K % 64 != 0).
    let odd = Problem::<bf16>::random(64, 96, GroupSize::Group(32), false, 8);
    let wodd = odd.weights(&dev);
    let x96 = dev.htod(&random_x::<bf16>(1, 96, 96, 9)).unwrap();
    assert!(matches!(marlin_gemm(&dev, &x96, 1, 96, &wodd, &mut ws), Err(Error::Shape { .. })));
    assert!(MarlinLinear::new(wodd).is_err());
}

// ---- integer-exact cases and one-hot probes (kernel_review C1) --------------------------------

/// (M, N, K, group, act-order, lda − K): every kernel instance with tiles cut into stream-K
/// pieces and without (on 132 SMs), every group size with both block shapes, act-order with both,
/// lda > K, N % 256 != 0, K % 128 != 0, partial and multiple m-blocks, pieces over several
/// m-blocks, a tile in 16 pieces, data-parallel rounds with and without a stream-K tail.
/// Small enough to run unchanged on the simulator; `exact_cases_cover_every_plan_variant`
/// checks the coverage with `plan_gemm`.
const EXACT_CASES: [(usize, usize, usize, GroupSize, bool, usize); 28] = [
    // tiles cut into pieces
    (1, 256, 512, GroupSize::Group(128), false, 0),
    (3, 192, 1024, GroupSize::Group(32), true, 8),
    (13, 128, 320, GroupSize::Group(64), false, 0),
    (16, 512, 576, GroupSize::Channelwise, false, 16),
    (26, 320, 512, GroupSize::Group(64), true, 0),
    (20, 256, 448, GroupSize::Group(32), false, 24),
    (40, 192, 512, GroupSize::Group(128), false, 0),
    (48, 512, 256, GroupSize::Channelwise, false, 0),
    (67, 256, 512, GroupSize::Group(32), true, 8),
    (64, 384, 320, GroupSize::Group(64), false, 0),
    (1, 256, 4096, GroupSize::Group(128), false, 0),
    // 396 data-parallel tiles, then 4 tiles of 3 iterations over 6 CTAs
    (1, 51200, 384, GroupSize::Group(128), false, 0),
    // 9..=16 rows on the 64-column block (N64K128, 8 stages): pieces, every group kind, act-order
    (16, 192, 1024, GroupSize::Group(32), true, 8),
    (12, 320, 512, GroupSize::Group(64), false, 0),
    (16, 448, 2048, GroupSize::Group(128), false, 0),
    (9, 64, 512, GroupSize::Channelwise, false, 0),
    // ... 15-16 stage iterations per CTA: its steady-state loop (2 x 8 stages) with pieces
    (16, 7168, 4608, GroupSize::Group(128), false, 0),
    // ... 264 whole tiles on 264 CTAs (the 128-column block would cut 132 tiles in two)
    (16, 16896, 512, GroupSize::Group(128), false, 0),
    // whole tiles only (at most 3 stage iterations)
    (1, 128, 256, GroupSize::Channelwise, false, 0),
    (8, 192, 192, GroupSize::Group(64), true, 8),
    (17, 256, 384, GroupSize::Group(128), true, 0),
    (20, 256, 256, GroupSize::Group(64), true, 0),
    (24, 256, 192, GroupSize::Group(64), false, 0),
    (32, 320, 192, GroupSize::Channelwise, false, 8),
    (33, 192, 128, GroupSize::Group(32), false, 0),
    (45, 256, 192, GroupSize::Group(64), true, 0),
    (130, 320, 128, GroupSize::Group(128), false, 8),
    (200, 256, 192, GroupSize::Channelwise, false, 0),
];

/// (M, N, K, group, act-order) of the one-hot sweeps: one case per kernel instance, M = the
/// instance's rows (the m4 case is the identity, M = K, over several m-blocks), every K-row probed
/// over at least two pipeline stages, tiles cut into stream-K pieces.
const PROBE_CASES: [(usize, usize, usize, GroupSize, bool); 8] = [
    (16, 256, 512, GroupSize::Group(128), false),
    (16, 192, 1024, GroupSize::Group(64), false),
    (16, 256, 320, GroupSize::Group(64), true),
    (32, 256, 512, GroupSize::Group(32), false),
    (32, 256, 320, GroupSize::Channelwise, false),
    (48, 192, 512, GroupSize::Group(64), true),
    (48, 256, 256, GroupSize::Group(128), false),
    (320, 256, 320, GroupSize::Group(32), false),
];

/// The exact `X · Wᵀ` (f64; every term is a small integer times a power of two, so every partial
/// sum is exact in f32 and f64 whatever the order) of `m` dense rows `x [m, K]` and `w [N, K]`,
/// skipping zero activations.
fn exact_ref(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
    let mut out = vec![0f64; m * n];
    for r in 0..m {
        let nz: Vec<(usize, f64)> = (0..k).filter(|&c| x[r * k + c] != 0.0).map(|c| (c, x[r * k + c] as f64)).collect();
        for nn in 0..n {
            // From +0, as the kernel's zero-initialised accumulators (an exact zero is +0).
            out[r * n + nn] = nz.iter().fold(0f64, |a, &(c, v)| a + v * w[nn * k + c] as f64);
        }
    }
    out
}

/// Runs the GEMM on dense rows `x [m, K]` laid out with stride `lda` (NaN padding) into a
/// NaN-poisoned output.
#[allow(clippy::too_many_arguments)]
fn run_rows<T: Half>(
    dev: &Device,
    w: &MarlinWeights<T>,
    x: &[f32],
    m: usize,
    k: usize,
    lda: usize,
    ws: &mut MarlinWorkspace,
) -> (Vec<T>, GemmPlan) {
    let n = w.shape().n;
    let buf: Vec<T> = (0..(m - 1) * lda + k)
        .map(|i| if i % lda < k { T::from_f32(x[(i / lda) * k + i % lda]) } else { nan() })
        .collect();
    let xd = dev.htod(&buf).unwrap();
    let mut out = dev.htod(&vec![nan::<T>(); m * n]).unwrap();
    marlin_gemm_into(dev, &xd, m, lda, w, &mut out, ws).unwrap();
    (dev.dtoh(&out).unwrap(), plan_gemm(m, n, k, dev.info().sm_count).unwrap())
}

/// Ternary rows whose every output against `w [N, K]` is exact in `T` (about 24 nonzeros per row
/// for bf16, 256 for f16, fewer where needed).
fn exact_rows<T: Half>(rng: &mut Rng, m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    let nnz = if T::DTYPE == DType::F16 { 256 } else { 24 };
    common::ternary_rows(rng, m, k, nnz, |_, row| exact_ref(row, 1, k, w, n).iter().all(|&v| common::exact_in::<T>(v)))
}

/// Rows `r` of `m`, one-hot (alternating ±1) at K-row `(first + r) % K`.
fn one_hot_rows(m: usize, k: usize, first: usize) -> Vec<f32> {
    let mut x = vec![0f32; m * k];
    for r in 0..m {
        x[r * k + (first + r) % k] = if r % 2 == 0 { 1.0 } else { -1.0 };
    }
    x
}

/// Dense integer rows in −127..=127 (exact in bf16 and f16).
fn int_rows(rng: &mut Rng, m: usize, k: usize) -> Vec<f32> {
    (0..m * k).map(|_| rng.below(255) as f32 - 127.0).collect()
}

fn exact_dense<T: Half>(dev: &Device) {
    let mut ws = MarlinWorkspace::new();
    let mut rng = Rng::new(0xC1);
    for (i, &(m, n, k, gs, act_order, pad)) in EXACT_CASES.iter().enumerate() {
        let lda = k + pad;
        let prob = Problem::<T>::exact(n, k, gs, act_order, -3, -1, &mut rng);
        let w = prob.weights(dev);
        let wm = prob.w_matrix();
        let tag = |kind: &str, plan: &GemmPlan| {
            format!("{} exact #{i} {kind} m={m} {n}x{k} lda={lda} g={gs} act_order={act_order} {plan:?}", T::DTYPE)
        };
        // Ternary activations, power-of-two scales, all sixteen codes.
        let x = exact_rows::<T>(&mut rng, m, k, &wm, n);
        let (y, plan) = run_rows(dev, &w, &x, m, k, lda, &mut ws);
        common::assert_exact(&tag("ternary", &plan), &y, &exact_ref(&x, m, k, &wm, n), n);
        // One nonzero activation per row: row r of the output is ±W[:, k_r] exactly.
        let x = one_hot_rows(m, k, rng.below(k));
        let (y, plan) = run_rows(dev, &w, &x, m, k, lda, &mut ws);
        common::assert_exact(&tag("one-hot X", &plan), &y, &exact_ref(&x, m, k, &wm, n), n);
        // One nonzero weight code per column: column n of the output is x[:, k_n] · q · s exactly.
        let p1 = Problem::<T>::one_hot_weights(n, k, gs, act_order, rng.below(k), &mut rng);
        let (w1, wm1) = (p1.weights(dev), p1.w_matrix());
        let x = int_rows(&mut rng, m, k);
        let (y, plan) = run_rows(dev, &w1, &x, m, k, lda, &mut ws);
        common::assert_exact(&tag("one-hot W", &plan), &y, &exact_ref(&x, m, k, &wm1, n), n);
    }
}

#[test]
fn exact_dense_bf16() {
    let dev = gpu_or_skip!();
    exact_dense::<bf16>(&dev);
}

#[test]
fn exact_dense_f16() {
    let dev = gpu_or_skip!();
    exact_dense::<f16>(&dev);
}

fn one_hot_sweep<T: Half>(dev: &Device) {
    let mut ws = MarlinWorkspace::new();
    let mut rng = Rng::new(0x1407);
    for &(m, n, k, gs, act_order) in &PROBE_CASES {
        let prob = Problem::<T>::exact(n, k, gs, act_order, -6, 0, &mut rng);
        let w = prob.weights(dev);
        let wm = prob.w_matrix();
        // Every K-row, M of them per launch.
        for first in (0..k).step_by(m) {
            let x = one_hot_rows(m, k, first);
            let (y, plan) = run_rows(dev, &w, &x, m, k, k, &mut ws);
            let what =
                format!("{} one-hot X rows {first}.. m={m} {n}x{k} g={gs} act_order={act_order} {plan:?}", T::DTYPE);
            common::assert_exact(&what, &y, &exact_ref(&x, m, k, &wm, n), n);
        }
        // Every K-row carries some column's single nonzero weight.
        for set in 0..k.div_ceil(n) {
            let p1 = Problem::<T>::one_hot_weights(n, k, gs, act_order, 7 * n * set, &mut rng);
            let (w1, wm1) = (p1.weights(dev), p1.w_matrix());
            let x = int_rows(&mut rng, m, k);
            let (y, plan) = run_rows(dev, &w1, &x, m, k, k, &mut ws);
            let what = format!("{} one-hot W set {set} m={m} {n}x{k} g={gs} act_order={act_order} {plan:?}", T::DTYPE);
            common::assert_exact(&what, &y, &exact_ref(&x, m, k, &wm1, n), n);
        }
    }
}

#[test]
fn one_hot_probes_bf16() {
    let dev = gpu_or_skip!();
    one_hot_sweep::<bf16>(&dev);
}

#[test]
fn one_hot_probes_f16() {
    let dev = gpu_or_skip!();
    one_hot_sweep::<f16>(&dev);
}

/// The bf16 dequantisation over the whole scale range (`csrc/marlin/gemm.cuh` "Dequant<bf16>":
/// one fma per weight pair whose power-of-two prescale `2^-j` follows the tensor's largest
/// scale). One-hot X rows read every weight back, `T(q·s)` bit for bit, for scales with random
/// full mantissas spread over many binades, zero and negative scales, all sixteen codes, and
/// tensors whose largest scale is tiny, about 1, 2^40 or near the bf16 maximum (where `T(q·s)`
/// overflows to ±inf in the reference and the GEMM alike). Each tensor spans at most the
/// documented 2^120 below its largest scale.
#[test]
fn bf16_scale_range_probes() {
    let dev = gpu_or_skip!();
    let mut ws = MarlinWorkspace::new();
    let mut rng = Rng::new(0x5ca1e);
    let cases = [
        (16, 128, 256, GroupSize::Group(32)),
        (16, 256, 256, GroupSize::Group(128)),
        (16, 128, 128, GroupSize::Channelwise),
    ];
    // Unbiased exponents lo..=hi of the scales.
    for (lo, hi) in [(-120, -100), (-60, 0), (-40, 40), (20, 127), (-20, -20)] {
        for &(m, n, k, gs) in &cases {
            let shape = QuantShape::new(n, k, gs).unwrap();
            let codes: Vec<i8> = (0..n * k).map(|_| rng.below(16) as i8 - 8).collect();
            let scales: Vec<bf16> = (0..shape.scales_len())
                .map(|i| {
                    if i % 29 == 3 {
                        return bf16::ZERO;
                    }
                    let e = (lo + rng.below((hi - lo + 1) as usize) as i32 + 127) as u16;
                    let sign = if rng.below(4) == 0 { 0x8000 } else { 0 };
                    bf16::from_bits(sign | (e << 7) | rng.below(128) as u16)
                })
                .collect();
            let prob = Problem::<bf16>::from_codes(n, k, gs, false, &codes, scales, &mut rng);
            let w = prob.weights(&dev);
            let wm = prob.w_matrix();
            for first in (0..k).step_by(m) {
                let x = one_hot_rows(m, k, first);
                let (y, plan) = run_rows(&dev, &w, &x, m, k, k, &mut ws);
                let what = format!("scales 2^{lo}..2^{hi} one-hot X rows {first}.. {n}x{k} g={gs} {plan:?}");
                common::assert_exact(&what, &y, &exact_ref(&x, m, k, &wm, n), n);
            }
        }
    }
}

/// The weight sync keeps the bf16 GEMM's scale range in step with the scales it writes: the same
/// buffers re-quantized (checked and unchecked) from weights 2^-90, 1 and 2^90 times as large
/// still read back `T(q·s)` of the reference quantization bit for bit (a fresh
/// `quantize_to_marlin` first, on both sync paths).
#[test]
fn bf16_weight_sync_updates_the_scale_range() {
    use lowbit::marlin::sync::{quantize_to_marlin, quantize_to_marlin_into, quantize_to_marlin_into_unchecked};
    let dev = gpu_or_skip!();
    let mut ws = MarlinWorkspace::new();
    let mut rng = Rng::new(0x5eed);
    let (m, n, k) = (16, 128, 256);
    // Inline scales (g = 32, 128) and the channelwise pre-pass (K = 256 is not an inline group): each path's kernels that write
    // scales also compute their range.
    for gs in [GroupSize::Group(32), GroupSize::Group(128), GroupSize::Channelwise] {
        let shape = QuantShape::new(n, k, gs).unwrap();
        let base: Vec<f32> = (0..n * k).map(|_| rng.normal() * 0.05).collect();
        let scaled = |e: i32| -> Vec<bf16> { base.iter().map(|&v| bf16::from_f32(v * 2f32.powi(e))).collect() };
        let mut w = quantize_to_marlin::<bf16, bf16>(&dev, &dev.htod(&scaled(0)).unwrap(), &shape).unwrap();
        for (e, checked) in [(90, true), (-90, false), (0, true), (90, false)] {
            let src = scaled(e);
            let wd = dev.htod(&src).unwrap();
            if checked {
                quantize_to_marlin_into(&dev, &mut w, &wd).unwrap();
            } else {
                quantize_to_marlin_into_unchecked(&dev, &mut w, &wd).unwrap();
            }
            let (packed, scales) = lowbit::reference::quant::quantize_pack::<bf16, bf16>(&src, &shape).unwrap();
            let wm = Problem { shape, packed, scales, g_idx: None }.w_matrix();
            for first in (0..k).step_by(m) {
                let x = one_hot_rows(m, k, first);
                let (y, _) = run_rows(&dev, &w, &x, m, k, k, &mut ws);
                common::assert_exact(
                    &format!("g={gs} weights x 2^{e}, rows {first}.."),
                    &y,
                    &exact_ref(&x, m, k, &wm, n),
                    n,
                );
            }
        }
    }
}

/// Stream-K stress (kernel_review C2): the same stream-K GEMMs (tiles in 16 pieces; 8 pieces over
/// two m-blocks) launched back to back give bit-identical outputs, equal to the exact reference. Seed-agnostic:
/// on lowbit-sim run it under several schedules, e.g.
/// `LOWBIT_SIM_SEED=<n> cargo test --release --test gpu_marlin_gemm stream_k_stress`, which
/// reorders the blocks and warps (and so which piece arrives last).
#[test]
fn stream_k_stress() {
    let dev = gpu_or_skip!();
    let runs = common::pick(&dev, 1000, 12);
    let mut ws = MarlinWorkspace::new();
    let mut rng = Rng::new(0x5b11);
    for (m, n, k, gs) in [(1, 256, 4096, GroupSize::Group(128)), (67, 512, 1024, GroupSize::Group(32))] {
        let prob = Problem::<bf16>::exact(n, k, gs, false, -3, -1, &mut rng);
        let w = prob.weights(&dev);
        let wm = prob.w_matrix();
        let x = exact_rows::<bf16>(&mut rng, m, k, &wm, n);
        let want = exact_ref(&x, m, k, &wm, n);
        let xd = dev.htod(&x.iter().map(|&v| bf16::from_f32(v)).collect::<Vec<_>>()).unwrap();
        let plan = plan_gemm(m, n, k, dev.info().sm_count).unwrap();
        if dev.info().sm_count >= 132 {
            assert!(plan.max_pieces_per_tile() >= 8, "{plan:?}: the stress shapes cut tiles into many pieces");
        }
        let mut outs: Vec<CudaSlice<bf16>> = (0..4).map(|_| dev.htod(&vec![nan::<bf16>(); m * n]).unwrap()).collect();
        let mut launched = [true, false, false, false];
        let first: Vec<bf16> = {
            marlin_gemm_into(&dev, &xd, m, k, &w, &mut outs[0], &mut ws).unwrap();
            dev.dtoh(&outs[0]).unwrap()
        };
        common::assert_exact(&format!("stream-K stress {m}x{n}x{k} {plan:?}"), &first, &want, n);
        for run in 1..runs {
            // Several outputs in flight between host reads: back-to-back launches on the stream.
            marlin_gemm_into(&dev, &xd, m, k, &w, &mut outs[run % 4], &mut ws).unwrap();
            launched[run % 4] = true;
            if run % 4 == 3 || run + 1 == runs {
                for (j, o) in outs.iter().enumerate().filter(|(j, _)| launched[*j]) {
                    let y: Vec<bf16> = dev.dtoh(o).unwrap();
                    common::assert_bits_eq(
                        &format!("stream-K stress {m}x{n}x{k} {plan:?} run {run} out {j}"),
                        &y,
                        &first,
                    );
                }
            }
        }
    }
}

/// The plan variants `plan_gemm` can produce on 132 SMs (the simulator's default and an H200),
/// as strings, and the ones the exact and probe cases reach.
#[test]
fn exact_cases_cover_every_plan_variant() {
    use std::collections::BTreeSet;
    let sm = 132;
    let mut got = BTreeSet::new();
    let mut note = |m: usize, n: usize, k: usize, gs: GroupSize, act: bool, pad: usize| {
        let p = plan_gemm(m, n, k, sm).unwrap();
        let inst = format!("m{}_{}", p.m_tiles, p.block.name());
        got.insert(format!("{inst} cut={}", p.cuts_tiles()));
        got.insert(format!("{} group={gs}", p.block.name()));
        if act {
            got.insert(format!("{} act_order", p.block.name()));
        }
        if pad > 0 {
            got.insert("lda > K".to_string());
        }
        if n % 256 != 0 {
            got.insert(format!("{} N%256!=0", p.block.name()));
        }
        if k % 128 != 0 {
            got.insert("K%128!=0".to_string());
        }
        if m % p.m_blk() != 0 {
            got.insert("partial m-block".to_string());
        }
        if p.m_blocks > 1 {
            got.insert(format!("m_blocks>1 cut={}", p.cuts_tiles()));
        }
        if p.dp_tiles() > 0 && p.cuts_tiles() {
            got.insert("data-parallel rounds + stream-K pieces".to_string());
        }
        if p.dp_tiles() > p.ctas {
            got.insert("several data-parallel rounds".to_string());
        }
        if p.n_blocks > 1 {
            got.insert(format!("{} n_blocks>1", p.block.name()));
        }
        if p.max_pieces_per_tile() >= 8 {
            got.insert("a tile in >= 8 pieces".to_string());
        }
    };
    for &(m, n, k, gs, act, pad) in &EXACT_CASES {
        note(m, n, k, gs, act, pad);
    }
    let mut probed = BTreeSet::new();
    for &(m, n, k, gs, act) in &PROBE_CASES {
        note(m, n, k, gs, act, 0);
        let p = plan_gemm(m, n, k, sm).unwrap();
        probed.insert(format!("m{}_{}", p.m_tiles, p.block.name()));
    }
    let mut want = BTreeSet::new();
    let mut instances = BTreeSet::new();
    for m_tiles in 1..=4 {
        for block in BlockShape::ALL {
            if lowbit::marlin::gemm::plannable(m_tiles, block) {
                let inst = format!("m{m_tiles}_{}", block.name());
                for cut in [false, true] {
                    want.insert(format!("{inst} cut={cut}"));
                }
                instances.insert(inst);
            }
        }
    }
    for block in BlockShape::ALL {
        for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            want.insert(format!("{} group={gs}", block.name()));
        }
        want.insert(format!("{} act_order", block.name()));
        want.insert(format!("{} N%256!=0", block.name()));
        want.insert(format!("{} n_blocks>1", block.name()));
    }
    for v in [
        "lda > K",
        "K%128!=0",
        "partial m-block",
        "m_blocks>1 cut=false",
        "m_blocks>1 cut=true",
        "a tile in >= 8 pieces",
        "data-parallel rounds + stream-K pieces",
        "several data-parallel rounds",
    ] {
        want.insert(v.to_string());
    }
    let missing: Vec<_> = want.difference(&got).collect();
    assert!(missing.is_empty(), "plan variants the exact cases miss: {missing:?}");
    assert_eq!(probed, instances, "one one-hot sweep per kernel instance");
    // Every instance the planner names for the dense GEMM is one of these (the table is complete).
    for m in [1, 16, 17, 32, 33, 48, 49, 64, 65, 4096] {
        for (n, k) in [(192, 128), (256, 192), (4096, 4096), (192, 4096)] {
            let p = plan_gemm(m, n, k, sm).unwrap();
            assert!(instances.contains(&format!("m{}_{}", p.m_tiles, p.block.name())), "{p:?}");
        }
    }
}

/// The capturable dense path: after `MarlinWorkspace::reserve_for(weights, max_m)`, calls with
/// m ≤ max_m (stream-K plans with and without cut tiles, act-order with its gather) allocate
/// nothing, copy nothing from or to the host and synchronise nothing, launch one kernel (two with
/// act-order), and give the bits of a fresh workspace.
#[test]
fn reserved_workspace_allocates_copies_and_syncs_nothing() {
    let dev = gpu_or_skip!();
    let max_m = 70;
    let ms = [1usize, 16, 70, 5, 33, 64, 2];
    for act_order in [false, true] {
        let (n, k) = (512, 256);
        let prob = Problem::<bf16>::random(n, k, GroupSize::Group(128), act_order, 91);
        let w = prob.weights(&dev);
        let xs: Vec<_> = ms.iter().map(|&m| dev.htod(&random_x::<bf16>(m, k, k, 92 + m as u64)).unwrap()).collect();
        let mut outs: Vec<CudaSlice<bf16>> = ms.iter().map(|&m| dev.zeros(m * n).unwrap()).collect();
        let mut ws = MarlinWorkspace::new();
        ws.reserve_for(&dev, &w, max_m).unwrap();
        assert!(ws.reserve_for(&dev, &w, 0).is_err());
        // Load the kernels first (a module load is host work, not a stream operation).
        let mut warm = dev.zeros::<bf16>(n).unwrap();
        marlin_gemm_into(&dev, &xs[0], 1, k, &w, &mut warm, &mut MarlinWorkspace::new()).unwrap();
        dev.synchronize().unwrap();
        let before = (dev.alloc_count(), dev.host_copy_count(), dev.sync_count());
        for (j, &m) in ms.iter().enumerate() {
            let l0 = dev.launch_count();
            marlin_gemm_into(&dev, &xs[j], m, k, &w, &mut outs[j], &mut ws).unwrap();
            assert_eq!(dev.launch_count() - l0, 1 + act_order as u64, "M={m} act_order={act_order}: launches");
        }
        let after = (dev.alloc_count(), dev.host_copy_count(), dev.sync_count());
        assert_eq!(after, before, "act_order={act_order}: (allocations, host copies, host syncs) over the calls");
        let plans: Vec<GemmPlan> = ms.iter().map(|&m| plan_gemm(m, n, k, dev.info().sm_count).unwrap()).collect();
        if dev.info().sm_count >= 132 {
            assert!(plans.iter().any(|p| p.cuts_tiles()) && plans.iter().any(|p| !p.cuts_tiles()), "{plans:?}");
        }
        for (j, &m) in ms.iter().enumerate() {
            let want = marlin_gemm(&dev, &xs[j], m, k, &w, &mut MarlinWorkspace::new()).unwrap();
            let got: Vec<bf16> = dev.dtoh(&outs[j]).unwrap();
            common::assert_bits_eq(
                &format!("M={m} act_order={act_order}: reserved vs fresh"),
                &got,
                &dev.dtoh(&want).unwrap(),
            );
        }
    }
}
