//! GPU Marlin layout kernels against the CPU reference, bit for bit (DESIGN §3, §5): repack from
//! GPTQ (with and without act-order) and from compressed-tensors, the inverses, the scale
//! permutations, `MarlinWeights` constructors, and bad input. Skips when no GPU is usable.
//! On lowbit-sim (`common::on_sim`) 4096×7168 and 7168×18432 are left out (the layout kernels
//! cost the interpreter about a hundred instructions per word); 7168×2048 (without act-order)
//! still takes two grid-stride rounds.

mod common;

use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::layout::{self, MarlinWeights};
use lowbit::reference::marlin as rm;
use lowbit::reference::quant as rq;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Device, Error, ScaleFloat};

/// (N, K): single tiles, K not a multiple of 128, Kimi-K2 experts (w13 / w2), a large dense one.
const SHAPES: [(usize, usize); 7] =
    [(64, 16), (128, 48), (192, 272), (256, 1024), (4096, 7168), (7168, 2048), (7168, 18432)];

fn words(rng: &mut Rng, len: usize) -> Vec<i32> {
    (0..len).map(|_| rng.next_u64() as i32).collect()
}

fn perm(rng: &mut Rng, k: usize) -> Vec<i32> {
    let mut p: Vec<i32> = (0..k as i32).collect();
    for i in (1..k).rev() {
        p.swap(i, rng.below(i + 1));
    }
    p
}

fn shape(n: usize, k: usize, g: GroupSize) -> QuantShape {
    QuantShape::new(n, k, g).unwrap()
}

#[test]
fn repack_and_inverse_match_the_reference() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(1);
    let sim = common::on_sim(&dev);
    for (n, k) in SHAPES.into_iter().filter(|&(n, k)| !sim || n * k <= 7168 * 2048) {
        let s = shape(n, k, GroupSize::Channelwise);
        let gptq = words(&mut rng, k / 8 * n);
        let ct = rq::transpose(&gptq, k / 8, n).unwrap();
        let (gd, cd) = (dev.htod(&gptq).unwrap(), dev.htod(&ct).unwrap());
        let perms =
            if k <= 7168 && !(sim && n * k > 1 << 22) { vec![None, Some(perm(&mut rng, k))] } else { vec![None] };
        for p in perms {
            let p = p.as_deref();
            let what = format!("{n}x{k} perm={}", p.is_some());
            let want = rm::gptq_marlin_repack(&gptq, p, k, n).unwrap();
            let got = dev.dtoh(&layout::gptq_marlin_repack(&dev, &gd, p, &s).unwrap()).unwrap();
            assert!(got == want, "gptq_marlin_repack {what}");
            let md = layout::ct_marlin_repack(&dev, &cd, p, &s).unwrap();
            assert!(dev.dtoh(&md).unwrap() == want, "ct_marlin_repack {what}");
            assert!(
                dev.dtoh(&layout::marlin_to_gptq(&dev, &md, p, &s).unwrap()).unwrap() == gptq,
                "marlin_to_gptq {what}"
            );
            assert!(dev.dtoh(&layout::marlin_to_ct(&dev, &md, p, &s).unwrap()).unwrap() == ct, "marlin_to_ct {what}");
        }
    }
}

fn check_scales<S: ScaleFloat>(dev: &Device, rng: &mut Rng, n: usize, k: usize, g: GroupSize) {
    let s = shape(n, k, g);
    let sc: Vec<S> = (0..s.scales_len()).map(|_| S::from_f32(rng.range(1e-4, 1.0))).collect();
    let want = rm::marlin_permute_scales(&sc, k, n, s.group).unwrap();
    let d = dev.htod(&sc).unwrap();
    let p = layout::marlin_permute_scales(dev, &d, &s).unwrap();
    common::assert_bits_eq(&format!("permute {n}x{k} g={g}"), &dev.dtoh(&p).unwrap(), &want);
    let back = layout::marlin_unpermute_scales(dev, &p, &s).unwrap();
    common::assert_bits_eq(&format!("unpermute {n}x{k} g={g}"), &dev.dtoh(&back).unwrap(), &sc);
}

#[test]
fn scale_permutations_match_the_reference() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(2);
    for (n, k) in [(64, 128), (192, 384), (4096, 7168), (7168, 2048)] {
        for g in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            check_scales::<bf16>(&dev, &mut rng, n, k, g);
            check_scales::<f16>(&dev, &mut rng, n, k, g);
        }
    }
    // g == K requested as a group size: channelwise permutation, as vLLM.
    check_scales::<bf16>(&dev, &mut rng, 128, 128, GroupSize::Group(128));
}

#[test]
fn marlin_weights_constructors_and_inverses() {
    let dev = gpu_or_skip!();
    let mut rng = Rng::new(3);
    let big = common::pick(&dev, (4096, 7168), (1024, 2048));
    for (n, k, g) in
        [(128, 256, GroupSize::Group(32)), (big.0, big.1, GroupSize::Group(32)), (192, 384, GroupSize::Channelwise)]
    {
        let s = shape(n, k, g);
        let gptq = words(&mut rng, k / 8 * n);
        let sc: Vec<bf16> = (0..s.scales_len()).map(|_| bf16::from_f32(rng.range(1e-3, 1.0))).collect();
        let ct = rq::transpose(&gptq, k / 8, n).unwrap();
        let ct_sc = rq::transpose(&sc, s.groups_per_row(), n).unwrap();
        let want_q = rm::gptq_marlin_repack(&gptq, None, k, n).unwrap();
        let want_s = rm::marlin_permute_scales(&sc, k, n, s.group).unwrap();

        let a = MarlinWeights::from_gptq(&dev, &dev.htod(&gptq).unwrap(), &dev.htod(&sc).unwrap(), None, &s).unwrap();
        let b = MarlinWeights::from_compressed_tensors(&dev, &dev.htod(&ct).unwrap(), &dev.htod(&ct_sc).unwrap(), &s)
            .unwrap();
        for (name, w) in [("from_gptq", &a), ("from_compressed_tensors", &b)] {
            let (q, scl, p) = w.to_host(&dev).unwrap();
            assert!(q == want_q, "{name} qweight");
            common::assert_bits_eq(name, &scl, &want_s);
            assert!(p.is_none() && !w.has_act_order());
        }
        let (q, scl) = a.to_gptq(&dev).unwrap();
        assert!(dev.dtoh(&q).unwrap() == gptq);
        common::assert_bits_eq("to_gptq scales", &dev.dtoh(&scl).unwrap(), &sc);
        let back = b.to_compressed_tensors(&dev).unwrap();
        assert!(dev.dtoh(&back.packed).unwrap() == ct);
        common::assert_bits_eq("to_ct scales", &dev.dtoh(&back.scales).unwrap(), &ct_sc);
        let h = MarlinWeights::from_host_marlin(&dev, &want_q, &want_s, None, &s).unwrap();
        assert!(dev.dtoh(h.qweight()).unwrap() == want_q);

        // Act-order from g_idx: perm = argsort(g_idx); restore returns source row order.
        if let GroupSize::Group(gs) = g {
            let g_idx: Vec<i32> = perm(&mut rng, k).iter().map(|&r| r / gs as i32).collect();
            let p = rm::act_order_perm(&g_idx, k, gs).unwrap();
            let w = MarlinWeights::from_gptq_act_order(
                &dev,
                &dev.htod(&gptq).unwrap(),
                &dev.htod(&sc).unwrap(),
                &g_idx,
                &s,
            )
            .unwrap();
            assert!(dev.dtoh(w.qweight()).unwrap() == rm::gptq_marlin_repack(&gptq, Some(&p), k, n).unwrap());
            assert!(dev.dtoh(w.perm().unwrap()).unwrap() == p);
            let back = w.to_compressed_tensors(&dev).unwrap();
            assert!(dev.dtoh(&back.packed).unwrap() == ct, "act-order restore");
            assert!(dev.dtoh(&w.to_gptq(&dev).unwrap().0).unwrap() == gptq, "act-order to_gptq");
        }
    }
}

#[test]
fn bad_input_is_a_typed_error_before_launch() {
    let dev = gpu_or_skip!();
    let s = shape(128, 256, GroupSize::Group(32));
    let q = dev.htod(&vec![0i32; s.packed_len()]).unwrap();
    let short = dev.htod(&vec![0i32; s.packed_len() - 1]).unwrap();
    let sc = dev.htod(&vec![bf16::ONE; s.scales_len()]).unwrap();
    assert!(matches!(layout::gptq_marlin_repack(&dev, &short, None, &s), Err(Error::Length { .. })));
    let mut bad: Vec<i32> = (0..256).collect();
    bad[7] = 0;
    assert!(matches!(layout::gptq_marlin_repack(&dev, &q, Some(&bad), &s), Err(Error::InvalidArgument { .. })));
    assert!(matches!(layout::marlin_to_ct(&dev, &q, Some(&bad[..10]), &s), Err(Error::Length { .. })));
    let odd = shape(96, 256, GroupSize::Group(32)); // N % 64 != 0
    let q96 = dev.htod(&vec![0i32; odd.packed_len()]).unwrap();
    assert!(matches!(layout::gptq_marlin_repack(&dev, &q96, None, &odd), Err(Error::Shape { .. })));
    let k8 = shape(64, 24, GroupSize::Channelwise); // K % 16 != 0
    let q8 = dev.htod(&vec![0i32; k8.packed_len()]).unwrap();
    assert!(matches!(layout::ct_marlin_repack(&dev, &q8, None, &k8), Err(Error::Shape { .. })));
    assert!(matches!(
        MarlinWeights::from_gptq(&dev, &q, &dev.htod(&[bf16::ONE; 3]).unwrap(), None, &s),
        Err(Error::Length { .. })
    ));
    assert!(matches!(
        MarlinWeights::from_host_marlin(&dev, &[0i32; 5], &[bf16::ONE; 1024], None, &s),
        Err(Error::Length { .. })
    ));
    let uneven: Vec<i32> = (0..256).map(|r| (r < 40) as i32).collect();
    assert!(matches!(
        MarlinWeights::from_gptq_act_order(&dev, &q, &sc, &uneven, &s),
        Err(Error::InvalidArgument { .. })
    ));
}
