//! `quantize` on the GPU writes exactly the bytes of the CPU path (skips without a usable GPU;
//! fails instead under `LOWBIT_REQUIRE_GPU=1`).

mod ckpt_util;
mod common;

use ckpt_util::*;
use lowbit::checkpoint::{self, DeviceChoice, QuantizeOptions};
use lowbit::GroupSize;

#[test]
fn gpu_quantize_matches_cpu_bytes() {
    let dev = gpu_or_skip!();
    drop(dev);
    let tmp = TempDir::new("gpu");
    let input = tmp.path().join("in");
    make_model(&input, true);
    for g in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
        let (c, d) = (tmp.path().join(format!("cpu-{g}")), tmp.path().join(format!("gpu-{g}")));
        let opts = |device| QuantizeOptions { group_size: g, device, ..Default::default() };
        let rc = checkpoint::quantize_checkpoint(&input, &c, &opts(DeviceChoice::Cpu)).unwrap();
        let rg = checkpoint::quantize_checkpoint(&input, &d, &opts(DeviceChoice::Gpu)).unwrap();
        assert_eq!(rc.device, "cpu");
        assert_ne!(rg.device, "cpu");
        assert_same_tree(&c, &d);
        // And the round trip through Marlin holds for the GPU output too.
        let (m, r) = (tmp.path().join(format!("m-{g}")), tmp.path().join(format!("r-{g}")));
        checkpoint::repack_checkpoint(&d, &m).unwrap();
        checkpoint::restore_checkpoint(&m, &r).unwrap();
        assert_same_tree(&d, &r);
    }
}

#[test]
fn gpu_quantize_larger_layers() {
    // Big enough for the CPU path to split rows across threads and the GPU grid to stride.
    let dev = gpu_or_skip!();
    drop(dev);
    let tmp = TempDir::new("gpu-big");
    let input = tmp.path().join("in");
    std::fs::create_dir_all(&input).unwrap();
    let mut rng = lowbit::reference::rng::Rng::new(3);
    let w: Vec<lowbit::bf16> = rng.normal_vec(4096 * 1024, 0.02);
    let bytes: Vec<u8> = w.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect();
    write_st(
        &input.join("model.safetensors"),
        vec![("big.weight".into(), safetensors::Dtype::BF16, vec![4096, 1024], bytes)],
        None,
    );
    let (c, d) = (tmp.path().join("c"), tmp.path().join("d"));
    let opts = |device| QuantizeOptions { device, ..Default::default() };
    checkpoint::quantize_checkpoint(&input, &c, &opts(DeviceChoice::Cpu)).unwrap();
    checkpoint::quantize_checkpoint(&input, &d, &opts(DeviceChoice::Gpu)).unwrap();
    assert_same_tree(&c, &d);
}
