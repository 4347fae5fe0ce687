//! The performance model `lowbit bench` applies to simulator counters: a **prediction** of H200
//! time from counted work, never a measurement. Plain arithmetic with no dependency on the
//! library or a device, so other tools (and `tests/cpu_bench_cli.rs`) can include this file.
//!
//! Per kernel launch, with `W` = CTAs in the grid and `S` = 132 SMs:
//!
//! ```text
//! waves        = ceil(W / S)
//! wave_factor  = waves · S / W          (>= 1: the busiest SM does waves CTAs' work; the
//!                                        others idle through the tail)
//! t_mem        = dram_bytes / 4.3 TB/s
//! t_issue      = warp_instructions / (S · 4 issue/clk · f)
//! t_alu        = alu_instructions / (S · 2 /clk · f)
//! t_fma        = fma_instructions / (S · 4 /clk · f)
//! t_mma        = mma_instructions / (S · 0.66 /clk · f)
//! predicted    = max(t_mem, t_issue, t_alu, t_fma, t_mma) · wave_factor + 2 µs
//! ```
//! and a multi-launch operation is the sum of its launches (one stream, serial).
//!
//! Constants (H200 SXM; `/work/.library/device/H200.md`, `HOPPER.md`, `KINDS.md`, DESIGN §6, the
//! kernel review §2.3):
//! * `S = 132` SMs, `f = 1.755 GHz`: the sustained SM clock (1.98 GHz is the boost clock seen
//!   right after a matrix product; the lower clock is the conservative choice).
//! * 4.3 TB/s: the device-to-device copy bandwidth measured on this workplace's H200 (bytes read
//!   plus written), the same number the roofline uses, so a bandwidth-bound kernel predicts 1.0×.
//! * Issue: 4 SM sub-partitions, each issues one warp-instruction per clock.
//! * ALU (integer/logic pipe: LOP3, SHF, IADD3, LEA, ISETP, PRMT, SEL, ...): 16 lanes per
//!   sub-partition, so a warp-instruction takes 2 clocks there: 2 per clock per SM.
//! * FMA (FP32, HFMA2/HMUL2/HADD2, IMAD): 32 lanes per sub-partition: 4 per clock per SM.
//! * MMA: one `mma.sync.m16n8k16` is 4096 FLOP; the Hopper tensor cores peak at 4096 dense
//!   bf16 FLOP per clock per SM (990 TFLOP/s), which only `wgmma` reaches. `mma.sync` reaches
//!   about 60–75% of it (review §2.2); 0.66 per clock per SM is used.
//! * 2 µs per launch: launch latency plus pipeline ramp and drain of back-to-back kernels on one
//!   stream (a lead, not measured here).
//!
//! Where the counters come from (the simulator profile, one JSON line per launch): `dram_bytes`
//! = `global_first_touch_bytes_read` + `global_store_bytes` (what must cross HBM at least once:
//! bytes a launch stores and reads back, such as stream-K pieces and the fused MoE sum's rows,
//! are L2 hits while the launch's stores fit in the 50 MB L2; beyond that
//! `global_unique_bytes_read` is used),
//! `warp_instructions` = the profile's `warp_instructions` − `by_class.move`, `alu` =
//! `by_class.int` (PTX integer instructions: an upper bound, since ptxas puts part of them, IMAD,
//! on the FMA pipe), `fma` = `by_class.fp32` + `by_class.half2`, `mma`. The SASS report
//! (`scripts/sass-report`) gives the sm_90a pipe split of the main loop.
//!
//! Moves (`by_class.move`: PTX `mov` of registers, immediates and special registers, and the
//! pack/unpack forms) are left out of the issue and ALU terms: PTX is in SSA form with explicit
//! constants, and ptxas folds these into the operands of the instructions that use them (register
//! allocation, 32-bit immediates, the `.H0_H0`/`.H1_H1` half selectors of HFMA2/HMUL2). Measured
//! on the Marlin m1 main loop (sm_90a, `scripts/sass-report` at 4f75c7f): the PTX holds 101
//! moves per warp and stage (0.099 per weight byte), the SASS 0 MOV; without the moves the PTX
//! count per weight byte (0.163 all, 0.069 integer) matches the SASS (0.177 all issued, 0.068 ALU)
//! within 10%. Where ptxas does keep a move (a phi copy, an S2R) the model is optimistic by it.
//!
//! Simplifications, each an upper or lower bound to keep in mind: every CTA of a launch does the
//! same work (MoE grids have CTAs that exit at once); each SM streams at 1/132 of the bandwidth
//! (an SM alone can exceed that, so tails are pessimistic); the terms overlap perfectly (max, not
//! sum); latency (bytes in flight per SM) is not modelled.

// Both the binary and tests include this file; neither uses every item.
#![allow(dead_code)]

/// The machine the prediction is for.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Machine {
    pub sms: f64,
    pub clock_hz: f64,
    /// Warp-instructions issued per clock per SM.
    pub issue_per_clk: f64,
    /// ALU-pipe warp-instructions per clock per SM.
    pub alu_per_clk: f64,
    /// FMA-pipe warp-instructions per clock per SM.
    pub fma_per_clk: f64,
    /// `mma.sync.m16n8k16` per clock per SM.
    pub mma_per_clk: f64,
    /// HBM bandwidth, bytes per second (device-to-device copy, read + write).
    pub dram_bytes_per_s: f64,
    /// Fixed cost of one launch, seconds.
    pub launch_s: f64,
    /// L2 cache, bytes.
    pub l2_bytes: f64,
}

impl Machine {
    /// NVIDIA H200 SXM (see the module comment for each number).
    pub const H200: Machine = Machine {
        sms: 132.0,
        clock_hz: 1.755e9,
        issue_per_clk: 4.0,
        alu_per_clk: 2.0,
        fma_per_clk: 4.0,
        mma_per_clk: 0.66,
        dram_bytes_per_s: 4.3e12,
        launch_s: 2.0e-6,
        l2_bytes: 50.0 * 1024.0 * 1024.0,
    };
}

/// Counted work of one launch.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    /// CTAs in the grid.
    pub grid_blocks: u64,
    pub warp_instructions: f64,
    pub alu: f64,
    pub fma: f64,
    pub mma: f64,
    /// Bytes that must cross HBM.
    pub dram_bytes: f64,
}

/// The predicted time of one launch and its terms, seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub mem_s: f64,
    pub issue_s: f64,
    pub alu_s: f64,
    pub fma_s: f64,
    pub mma_s: f64,
    pub waves: u64,
    pub wave_factor: f64,
    /// Which term is the largest: "memory", "issue", "alu", "fma" or "mma".
    pub bound: &'static str,
    pub total_s: f64,
}

/// `(waves, wave_factor)` of a grid of `blocks` CTAs on `sms` SMs: the busiest SM runs `waves`
/// CTAs, so the launch takes `wave_factor` = waves · sms / blocks times an even spread.
pub fn waves(blocks: u64, sms: f64) -> (u64, f64) {
    let sms = sms.max(1.0) as u64;
    if blocks == 0 {
        return (0, 1.0);
    }
    let w = blocks.div_ceil(sms);
    (w, (w * sms) as f64 / blocks as f64)
}

/// Bytes that must cross HBM in one launch: the bytes it stores, plus the distinct bytes it reads
/// that it did not write first (`first_touch`, when the profile has it) if its stores fit in L2,
/// otherwise every distinct byte it reads (what it wrote may have been evicted to HBM).
pub fn dram_bytes(unique_read: f64, first_touch: Option<f64>, stored: f64, l2_bytes: f64) -> f64 {
    match first_touch {
        Some(f) if stored <= l2_bytes => f + stored,
        _ => unique_read + stored,
    }
}

/// The prediction for one launch.
pub fn predict(m: &Machine, c: &Counters) -> Prediction {
    let per_clk = |rate: f64| m.sms * rate * m.clock_hz;
    let terms = [
        ("memory", c.dram_bytes / m.dram_bytes_per_s),
        ("issue", c.warp_instructions / per_clk(m.issue_per_clk)),
        ("alu", c.alu / per_clk(m.alu_per_clk)),
        ("fma", c.fma / per_clk(m.fma_per_clk)),
        ("mma", c.mma / per_clk(m.mma_per_clk)),
    ];
    let (bound, longest) = terms.iter().fold(("memory", 0.0f64), |a, &(n, t)| if t > a.1 { (n, t) } else { a });
    let (w, factor) = waves(c.grid_blocks, m.sms);
    Prediction {
        mem_s: terms[0].1,
        issue_s: terms[1].1,
        alu_s: terms[2].1,
        fma_s: terms[3].1,
        mma_s: terms[4].1,
        waves: w,
        wave_factor: factor,
        bound,
        total_s: longest * factor + m.launch_s,
    }
}

/// The predicted time of launches run one after another on a stream.
pub fn predict_sequence(m: &Machine, launches: &[Counters]) -> f64 {
    launches.iter().map(|c| predict(m, c).total_s).sum()
}

/// The bandwidth roofline: `bytes` at `bytes_per_s`, seconds.
pub fn roofline_s(bytes: f64, bytes_per_s: f64) -> f64 {
    bytes / bytes_per_s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1e-12)
    }

    #[test]
    fn dram_bytes_counts_read_backs_only_beyond_l2() {
        let l2 = Machine::H200.l2_bytes;
        assert_eq!(dram_bytes(100.0, Some(60.0), 10.0, l2), 70.0);
        assert_eq!(dram_bytes(100.0, None, 10.0, l2), 110.0);
        assert_eq!(dram_bytes(100.0, Some(60.0), 2.0 * l2, l2), 100.0 + 2.0 * l2);
    }

    #[test]
    fn waves_and_tails() {
        assert_eq!(waves(132, 132.0), (1, 1.0));
        assert_eq!(waves(264, 132.0), (2, 1.0));
        let (w, f) = waves(224, 132.0); // the M <= 16 plan of (28672, 8192): 1.7 "waves"
        assert_eq!(w, 2);
        assert!(close(f, 264.0 / 224.0));
        let (w, f) = waves(112, 132.0); // 20 idle SMs
        assert_eq!(w, 1);
        assert!(close(f, 132.0 / 112.0));
        assert_eq!(waves(0, 132.0), (0, 1.0));
    }

    #[test]
    fn memory_bound_launch_is_bytes_over_bandwidth() {
        let m = Machine { launch_s: 0.0, ..Machine::H200 };
        let c = Counters { grid_blocks: 132, dram_bytes: 4.3e9, warp_instructions: 1.0, ..Default::default() };
        let p = predict(&m, &c);
        assert_eq!(p.bound, "memory");
        assert!(close(p.total_s, 1e-3));
        assert!(close(p.total_s, roofline_s(4.3e9, 4.3e12)));
    }

    #[test]
    fn each_rate_is_applied() {
        let m = Machine::H200;
        let clk = 132.0 * 1.755e9;
        let c = Counters {
            grid_blocks: 132,
            warp_instructions: 4.0 * clk,
            alu: 2.0 * clk,
            fma: 4.0 * clk,
            mma: 0.66 * clk,
            dram_bytes: 4.3e12,
        };
        let p = predict(&m, &c);
        for t in [p.mem_s, p.issue_s, p.alu_s, p.fma_s, p.mma_s] {
            assert!(close(t, 1.0), "{p:?}");
        }
        assert!(close(p.total_s, 1.0 + 2e-6));
    }

    #[test]
    fn alu_bound_with_a_tail() {
        // The review's M <= 16 estimate: 0.2 ALU warp-instructions per weight byte of a
        // 117 MB matrix on a 224-CTA grid.
        let m = Machine { launch_s: 0.0, ..Machine::H200 };
        let wb = 117.4e6;
        let c = Counters {
            grid_blocks: 224,
            warp_instructions: 0.39 * wb,
            alu: 0.2 * wb,
            fma: 0.13 * wb,
            mma: 0.0156 * wb,
            dram_bytes: 121e6,
        };
        let p = predict(&m, &c);
        assert_eq!(p.bound, "alu");
        let alu = 0.2 * wb / (132.0 * 2.0 * 1.755e9);
        assert!(close(p.alu_s, alu));
        assert!(close(p.total_s, alu * 264.0 / 224.0));
        // 1.6-2.2x the 28 us roofline, as the review predicts.
        let ratio = p.total_s / roofline_s(121e6, 4.3e12);
        assert!((1.6..2.6).contains(&ratio), "{ratio}");
    }

    #[test]
    fn sequence_sums_launches() {
        let m = Machine::H200;
        let a = Counters { grid_blocks: 132, dram_bytes: 4.3e6, ..Default::default() };
        let total = predict_sequence(&m, &[a, a]);
        assert!(close(total, 2.0 * (1e-6 + 2e-6)));
    }
}
