//! Marlin GEMM output digest: runs a fixed set of dense W4A16 GEMMs (both dtypes, every group
//! size, act-order, every m-tile count and both block shapes) on deterministic inputs and prints
//! an FNV-1a hash of each output's bits. Two kernel builds whose lines match produce
//! bit-identical outputs on these cases (on the same device: the stream-K plan depends on the SM
//! count). Used to check that kernel rewrites keep results bit for bit (issue 9).
//!
//! `cargo run --release --example marlin_digest` (on a GPU or on lowbit-sim).

use lowbit::format::{GroupSize, QuantShape};
use lowbit::marlin::gemm::{marlin_gemm, plan_gemm, Half, MarlinWorkspace};
use lowbit::marlin::layout::MarlinWeights;
use lowbit::reference::marlin as refm;
use lowbit::reference::quant::transpose;
use lowbit::reference::rng::Rng;
use lowbit::{bf16, f16, Device};

fn fnv(bits: impl Iterator<Item = u32>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for b in bits {
        for byte in b.to_le_bytes() {
            h ^= byte as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

fn run<T: Half>(dev: &Device, n: usize, k: usize, gs: GroupSize, act_order: bool, m: usize, seed: u64) -> String {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let g = shape.group;
    let mut rng = Rng::new(seed);
    let packed: Vec<i32> = (0..shape.packed_len())
        .map(|_| (0..8).fold(0u32, |w, i| w | (rng.below(16) as u32) << (4 * i)) as i32)
        .collect();
    let scales: Vec<T> = (0..shape.scales_len()).map(|_| T::from_f32(rng.range(0.004, 0.02))).collect();
    let perm = act_order.then(|| {
        let mut gi: Vec<i32> = (0..k).map(|c| (c / g) as i32).collect();
        for i in (1..k).rev() {
            gi.swap(i, rng.below(i + 1));
        }
        refm::act_order_perm(&gi, k, g).unwrap()
    });
    let qweight = refm::ct_marlin_repack(&packed, perm.as_deref(), k, n).unwrap();
    let ms = refm::marlin_permute_scales(&transpose(&scales, n, shape.groups_per_row()).unwrap(), k, n, g).unwrap();
    let w = MarlinWeights::from_host_marlin(dev, &qweight, &ms, perm.as_deref(), &shape).unwrap();
    let x: Vec<T> = (0..m * k).map(|_| T::from_f32(rng.normal())).collect();
    let xd = dev.htod(&x).unwrap();
    let mut ws = MarlinWorkspace::new();
    let y = marlin_gemm(dev, &xd, m, k, &w, &mut ws).unwrap();
    let y: Vec<T> = dev.dtoh(&y).unwrap();
    let plan = plan_gemm(m, n, k, dev.info().sm_count).unwrap();
    format!(
        "{} n={n} k={k} g={gs} act_order={act_order} m={m} m_tiles={} {:?} ctas={} pieces={}: {:016x}",
        T::DTYPE,
        plan.m_tiles,
        plan.block,
        plan.ctas,
        plan.max_pieces_per_tile(),
        fnv(y.iter().map(|v| v.to_f32().to_bits()))
    )
}

fn main() {
    let dev = Device::new(0).expect("a CUDA device (or lowbit-sim)");
    let mut seed = 1;
    for (n, k) in [(256, 512), (384, 192)] {
        for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            if gs.resolve("digest", k).is_err() {
                continue;
            }
            for act_order in [false, true] {
                if act_order && gs == GroupSize::Channelwise {
                    continue;
                }
                for m in [1, 16, 17, 40, 64, 100] {
                    seed += 1;
                    println!("{}", run::<bf16>(&dev, n, k, gs, act_order, m, seed));
                    println!("{}", run::<f16>(&dev, n, k, gs, act_order, m, seed));
                }
            }
        }
    }
}
