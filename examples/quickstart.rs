//! Quickstart: quantize one linear layer the QAT way and see what the INT4 grid does to it.
//!
//! 1. Fake-quantize a BF16 weight `[N, K]` (what the trainer's forward uses), report the error
//!    and the levels used.
//! 2. Really quantize it (compressed-tensors `weight_packed` + `weight_scale`, what the rollout
//!    engine loads) and check that dequantizing gives back exactly the fake-quantized weights.
//! 3. Lay the weights out for the Marlin W4A16 GEMM (what the rollout engine multiplies with)
//!    and check that the layout change is exactly invertible.
//! 4. When a GPU is usable, run the same through the CUDA kernels: fake quant and the one-pass
//!    weight sync bit for bit against the CPU reference, and the Marlin GEMM against an f64
//!    product with the fake-quantized weights (training and rollout see the same weights).
//!
//! `cargo run --release --example quickstart [N K GROUP]` (GROUP 0 = channelwise).

use std::time::Instant;

use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::{gemm::MarlinLinear, sync};
use lowbit::quant::{self, FakeQuantOptions};
use lowbit::reference::gemm as rg;
use lowbit::reference::marlin as rm;
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, Device, SteMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let (n, k, g) = match args.as_slice() {
        [] => (2048, 7168, 32),
        [n, k, g] => (*n, *k, *g),
        _ => return Err("usage: quickstart [N K GROUP]".into()),
    };
    let group = if g == 0 { GroupSize::Channelwise } else { GroupSize::Group(g) };
    let shape = QuantShape::new(n, k, group)?;
    println!("lowbit quickstart: W [{n}, {k}] bf16, INT4 symmetric, group size {group}");

    // Weights like a trained projection: Gaussian with a few outlier columns.
    let mut rng = Rng::new(2026);
    let mut w: Vec<bf16> = rng.normal_vec(n * k, 0.02);
    for r in 0..n {
        for c in (0..k).step_by(997) {
            w[r * k + c] = bf16::from_f32(rng.normal() * 0.2);
        }
    }

    // 1. Fake quantization (trainer forward) on the CPU reference.
    let t = Instant::now();
    let q = rq::quantize::<bf16, bf16>(&w, &shape)?;
    let cpu_time = t.elapsed();
    let (mut err2, mut ref2, mut max_err) = (0f64, 0f64, 0f64);
    for (a, b) in w.iter().zip(&q.fake_quant) {
        let (a, b) = (a.to_f32() as f64, b.to_f32() as f64);
        err2 += (a - b) * (a - b);
        ref2 += a * a;
        max_err = max_err.max((a - b).abs());
    }
    let rel = (err2 / ref2).sqrt();
    println!("\n1. fake_quant (CPU reference, {:.0} ms)", cpu_time.as_secs_f64() * 1e3);
    println!("   relative RMS error {rel:.4}  (SQNR {:.1} dB), max |error| {max_err:.2e}", -20.0 * rel.log10());
    let mut hist = [0usize; 15];
    for &c in &q.codes {
        hist[(c + 7) as usize] += 1;
    }
    println!("   levels used (q = -7..7):");
    for (i, h) in hist.iter().enumerate() {
        let pct = 100.0 * *h as f64 / q.codes.len() as f64;
        println!("   {:>3} {:>6.2}% {}", i as i32 - 7, pct, "#".repeat((pct * 1.5).round() as usize));
    }
    let scales: Vec<f32> = q.scales.iter().map(|s| s.to_f32()).collect();
    let (smin, smax) = scales.iter().fold((f32::MAX, 0f32), |(a, b), &s| (a.min(s), b.max(s)));
    println!(
        "   {} scales in [{smin:.3e}, {smax:.3e}], mean {:.3e}",
        scales.len(),
        scales.iter().sum::<f32>() / scales.len() as f32
    );

    // A toy forward: how far does Y = X · fq(W)ᵀ move from X · Wᵀ for one token?
    let x: Vec<f32> = (0..k).map(|_| rng.normal()).collect();
    let (mut dy2, mut y2) = (0f64, 0f64);
    for r in 0..n.min(256) {
        let (mut y, mut yq) = (0f64, 0f64);
        for c in 0..k {
            y += x[c] as f64 * w[r * k + c].to_f32() as f64;
            yq += x[c] as f64 * q.fake_quant[r * k + c].to_f32() as f64;
        }
        dy2 += (y - yq) * (y - yq);
        y2 += y * y;
    }
    println!("   one token through the layer: relative output error {:.4}", (dy2 / y2).sqrt());

    // 2. Real quantization for export; dequantizing must give back fake_quant bit for bit.
    let (packed, scales) = rq::quantize_pack::<bf16, bf16>(&w, &shape)?;
    let dq = rq::dequantize::<bf16, bf16>(&packed, &scales, &shape)?;
    let same = dq.iter().zip(&q.fake_quant).all(|(a, b)| a.to_bits() == b.to_bits());
    let bytes_q = packed.len() * 4 + scales.len() * 2;
    println!(
        "\n2. quantize_pack: weight_packed [{n}, {}] i32 + weight_scale [{n}, {}] bf16",
        k / 8,
        shape.groups_per_row()
    );
    println!(
        "   {:.1} MB -> {:.1} MB ({:.2}x smaller)",
        (n * k * 2) as f64 / 1e6,
        bytes_q as f64 / 1e6,
        (n * k * 2) as f64 / bytes_q as f64
    );
    println!("   dequantize(quantize_pack(W)) == fake_quant(W) bit for bit: {}", if same { "yes" } else { "NO" });
    if !same {
        return Err("consistency property violated".into());
    }

    // 3. Marlin layout for the rollout GEMM, and back.
    let (mq, ms) = rm::quantize_to_marlin::<bf16, bf16>(&w, &shape)?;
    let (back_packed, back_scales) = rm::restore_from_marlin(&mq, &ms, &shape)?;
    println!(
        "\n3. Marlin layout: qweight [{}, {}] i32, permuted scales [{}, {n}]",
        k / 16,
        2 * n,
        shape.groups_per_row()
    );
    let exact = back_packed == packed && back_scales == scales;
    println!("   restore(quantize_to_marlin(W)) == quantize_pack(W): {}", if exact { "yes" } else { "NO" });
    if !exact {
        return Err("Marlin layout is not exactly invertible".into());
    }

    // 4. The same on the GPU, checked against the CPU.
    println!("\n4. GPU kernels");
    if !lowbit::device::kernels_built() {
        println!("   skipped: this build has no kernels (run scripts/install-cuda-toolchain.sh and rebuild)");
        return Ok(());
    }
    let dev = match Device::first() {
        Ok(d) => d,
        Err(e) => {
            println!("   skipped: {e}");
            return Ok(());
        }
    };
    println!(
        "   {} (sm_{}{}, {} SMs)",
        dev.info().name,
        dev.info().compute_capability.0,
        dev.info().compute_capability.1,
        dev.info().sm_count
    );
    let wd = dev.htod(&w)?;
    let t = Instant::now();
    let out = quant::fake_quant_fwd::<bf16, bf16>(
        &dev,
        &wd,
        &shape,
        FakeQuantOptions { scales: true, packed: true, ..Default::default() },
    )?;
    dev.synchronize()?;
    let gpu_time = t.elapsed();
    let ok_fq = dev.dtoh(&out.weights)?.iter().zip(&q.fake_quant).all(|(a, b)| a.to_bits() == b.to_bits());
    let ok_packed = out.packed.as_ref().map(|p| dev.dtoh(p)).transpose()?.as_deref() == Some(&packed[..]);
    let ok_scales = out.scales.as_ref().map(|s| dev.dtoh(s)).transpose()?.as_deref() == Some(&scales[..]);
    println!(
        "   fake_quant_fwd (+scales +packed, one pass): {:.2} ms incl. first-use module load",
        gpu_time.as_secs_f64() * 1e3
    );
    println!("   GPU == CPU bit for bit: weights {ok_fq}, scales {ok_scales}, packed {ok_packed}");
    let dy = dev.htod(&rng.normal_vec::<bf16>(n * k, 1.0))?;
    let dw = quant::fake_quant_bwd::<bf16, bf16>(&dev, &dy, &wd, &shape, SteMode::Identity)?;
    println!("   STE backward (identity): dW == dY: {}", dev.dtoh(&dw)? == dev.dtoh(&dy)?);
    if !(ok_fq && ok_packed && ok_scales) {
        return Err("GPU result differs from the CPU reference".into());
    }

    // Weight sync and a rollout GEMM: Y = X · dequant(W)ᵀ for 16 tokens.
    let marlin = sync::quantize_to_marlin::<bf16, bf16>(&dev, &wd, &shape)?;
    let (gq, gs, _) = marlin.to_host(&dev)?;
    println!("   quantize_to_marlin == CPU reference bit for bit: {}", gq == mq && gs == ms);
    let m = 16;
    let xs: Vec<bf16> = rng.normal_vec(m * k, 1.0);
    let layer = MarlinLinear::new(marlin)?;
    let y = dev.dtoh(&layer.forward(&dev, &dev.htod(&xs)?, m)?)?;
    let wf: Vec<f32> = q.fake_quant.iter().map(|v| v.to_f32()).collect();
    let want = rg::gemm_ref_f64(&xs, m, k, k, &wf, n)?;
    let got: Vec<f64> = y.iter().map(|v| v.to_f32() as f64).collect();
    let err = rg::rel_mean_abs_err(&got, &want);
    println!("   marlin_gemm (M = {m}) vs f64 X·fake_quant(W)ᵀ: mean|Δ|/mean|ref| = {err:.2e} (bound 4e-3)");
    let within = err.is_finite() && err <= 4e-3; // NaN fails too
    if gq != mq || gs != ms || !within {
        return Err("GPU rollout path differs from the CPU reference".into());
    }
    Ok(())
}
