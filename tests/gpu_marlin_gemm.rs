//! GPU tests of the dense Marlin W4A16 GEMM against the f64 CPU reference (DESIGN §5):
//! `mean|Y − ref| / mean|ref|` ≤ 1e-3 (f16) / 4e-3 (bf16), no NaN, every element written (the
//! output is poisoned with NaN first, and the padding of strided X is NaN too), determinism,
//! split-K workspace reuse, QAT consistency, and typed errors for bad input.
//! Without a GPU these tests print why and pass (LOWBIT_REQUIRE_GPU=1 makes that a failure).

mod common;

use cudarc::driver::CudaSlice;
use half::{bf16, f16};
use lowbit::format::{self, GroupSize, QuantShape};
use lowbit::marlin::gemm::{marlin_gemm, marlin_gemm_into, plan_gemm, Half, MarlinLinear, MarlinWorkspace};
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
    /// layout kernels), large ones through the GPU repack.
    fn weights(&self, dev: &Device) -> MarlinWeights<T> {
        let (n, k, g) = (self.shape.n, self.shape.k, self.shape.group);
        let perm = self.g_idx.as_ref().map(|gi| refm::act_order_perm(gi, k, g).unwrap());
        if n * k <= 1 << 22 {
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

fn real_shapes<T: Half>(dev: &Device) {
    let mut ws = MarlinWorkspace::new();
    // (N, K, group, act-order, Ms): Llama-3-70B, Llama-3-8B-like, Qwen3-30B-A3B and Kimi-K2 experts.
    let cases: [(usize, usize, GroupSize, bool, &[usize]); 8] = [
        (4096, 4096, GroupSize::Group(128), false, &[1, 13, 16, 67, 1024, 4096]),
        (4096, 4096, GroupSize::Group(128), true, &[1, 26, 257]),
        (28672, 8192, GroupSize::Group(128), false, &[1, 16, 67, 1024]),
        (8192, 28672, GroupSize::Group(128), false, &[1, 16, 658]),
        (1536, 2048, GroupSize::Group(32), false, &[1, 3, 64, 257]),
        (2048, 768, GroupSize::Channelwise, false, &[1, 8, 658]),
        (4096, 7168, GroupSize::Group(32), false, &[1, 16, 1024]),
        (7168, 2048, GroupSize::Group(32), false, &[2, 64, 658]),
    ];
    for (i, (n, k, gs, act_order, ms)) in cases.into_iter().enumerate() {
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
    for (m, n, k) in [(1, 4096, 4096), (13, 4096, 4096), (67, 1024, 8192), (658, 4096, 4096)] {
        let plan = plan_gemm(m, n, k, dev.info().sm_count).unwrap();
        let prob = Problem::<bf16>::random(n, k, GroupSize::Group(128), false, 77);
        let w = prob.weights(&dev);
        let x = dev.htod(&random_x::<bf16>(m, k, k, 78)).unwrap();
        let first: Vec<bf16> = dev.dtoh(&marlin_gemm(&dev, &x, m, k, &w, &mut ws).unwrap()).unwrap();
        for run in 1..10 {
            let y: Vec<bf16> = dev.dtoh(&marlin_gemm(&dev, &x, m, k, &w, &mut ws).unwrap()).unwrap();
            common::assert_bits_eq(&format!("{m}x{n}x{k} {plan:?} run {run}"), &y, &first);
        }
    }
}

#[test]
fn workspace_reuse_across_shapes() {
    // Split-K counters must be back at zero after every launch, whatever the shape.
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
