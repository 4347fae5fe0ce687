//! CPU checks of the Marlin GEMM: the tile-config planner (pure, only names built kernels), input
//! validation, the CPU reference, and a model of the kernel's register-level data path (which
//! int32 nibble and which permuted scale a lane feeds into which B-fragment element) checked
//! against weights dequantized without the Marlin layout.

use half::{bf16, f16};
use lowbit::device::kernel_declared;
use lowbit::format::{self, GroupSize, QuantShape};
use lowbit::marlin::gemm::{
    all_kernel_names, check_gemm_shape, kernels_declared, plan_gemm, plan_moe_gemm, plannable, BlockShape, GemmPlan,
    MAX_SPLIT_K, MOE_BLOCK_SIZES, SMEM_BUDGET,
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
    assert!(plan.split_k >= 1 && plan.split_k <= MAX_SPLIT_K && plan.split_k <= iters.max(1));
    if plan.split_k > 1 {
        assert!(plan.tiles() < sm, "split only when the tiles do not fill the device");
        assert!(plan.grid_blocks() <= sm, "{plan:?} on {sm} SMs");
        assert!(iters / plan.split_k >= 2, "at least two stages per split");
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
    // Small M: narrow, deep blocks; split-K fills the device.
    let p = plan_gemm(1, 4096, 4096, 132).unwrap();
    assert_eq!((p.m_tiles, p.block, p.n_blocks), (1, BlockShape::N128K128, 32));
    assert_eq!(p.split_k, 4);
    assert_eq!(p.workspace_counters(), 32);
    assert_eq!(p.workspace_partials(), 32 * 4 * 16 * 128);
    // Many tiles: no split, no workspace.
    let p = plan_gemm(16, 28672, 8192, 132).unwrap();
    assert_eq!((p.split_k, p.workspace_partials(), p.workspace_counters()), (1, 0, 0));
    // Large M: 64-row, wide blocks, also when N % 256 != 0 (64 rows x 128-deep stages would
    // not fit sm_86/sm_89 shared memory).
    let p = plan_gemm(4096, 4096, 4096, 132).unwrap();
    assert_eq!((p.m_tiles, p.block, p.m_blocks, p.split_k), (4, BlockShape::N256K64, 64, 1));
    assert_eq!(plan_gemm(4096, 192, 4096, 132).unwrap().block, BlockShape::N256K64);
    assert_eq!(plan_gemm(40, 192, 4096, 132).unwrap().block, BlockShape::N128K128);
    for m_tiles in 1..=4 {
        for block in [BlockShape::N128K128, BlockShape::N256K64] {
            let p = GemmPlan { m_tiles, block, split_k: 1, m_blocks: 1, n_blocks: 1 };
            assert_eq!(plannable(m_tiles, block), p.smem_bytes() <= SMEM_BUDGET, "{p:?}");
        }
    }
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
            assert_eq!((p.m_blocks, p.split_k), (37, 1));
            assert_eq!(p.workspace_partials(), 0);
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

// ---------------------------------------------------------------------------------------------
// A model of the kernel's B path (csrc/marlin/gemm.cuh): NOT a reference. It replays, on the
// CPU, exactly which bits the kernel takes for every B-fragment element and which scale it
// multiplies them by, and the test compares the resulting K×N matrix with weights dequantized
// from the plain codes. Together with the standard mma fragment layout this pins down the
// kernel's weight path.

/// `channelwise_pos` of the kernel.
fn channelwise_pos(x: usize) -> usize {
    let y = x & 31;
    (x & !31) + 8 * ((y & 7) >> 1) + 2 * (y >> 3) + (y & 1)
}

/// The f32 value of `T(q · s)` computed as the kernel does: q exact from the exponent trick, then
/// one rounding of the product.
fn kernel_dequant<T: Float>(nibble: u32, s: f32) -> f32 {
    // (base + u) - (base + 8) is exact in T for the kernel's bases (f16 1024, bf16 128).
    let base = if T::DTYPE == DType::F16 { 1024.0f32 } else { 128.0 };
    let biased = T::from_f32(base + nibble as f32).to_f32();
    let q = T::from_f32(biased - (base + 8.0)).to_f32();
    assert_eq!(q, nibble as f32 - 8.0);
    T::from_f32(q * s).to_f32()
}

/// B[k][n] as the kernel's warps see it, for every stage of every block shape.
fn model_b_matrix<T: Float + ScaleFloat>(
    qweight: &[i32],
    scales: &[T],
    shape: &QuantShape,
    block: BlockShape,
) -> Vec<f32> {
    let (n, k, g) = (shape.n, shape.k, shape.group);
    let channelwise = g >= k;
    let gshift = g.trailing_zeros() as usize;
    let k_blk = block.k_blk();
    let mut b = vec![f32::NAN; k * n];
    let mut seen = vec![false; k * n];
    for k0 in (0..k).step_by(k_blk) {
        // The stage loads scale rows g0 .. g0 + ng (grouped).
        let g0 = k0 >> gshift;
        let ng = if g < k_blk { k_blk >> gshift } else { 1 };
        for kt_local in 0..k_blk / 16 {
            let kt = k0 / 16 + kt_local;
            let gl = ((k0 + 16 * kt_local) >> gshift) - g0;
            if !channelwise {
                assert!(gl < ng, "scale row within the stage");
            }
            for nt in 0..n / 64 {
                for lane in 0..32 {
                    // Scale of n8 subtile b for this lane (its column lane/4 + 8b of the n-tile).
                    let scale = |sub: usize| -> f32 {
                        if channelwise {
                            scales[64 * nt + channelwise_pos(lane / 4 + 8 * sub)].to_f32()
                        } else {
                            scales[(g0 + gl) * n + 64 * nt + 8 * (lane / 4) + sub].to_f32()
                        }
                    };
                    for j in 0..4 {
                        let word = qweight[kt * 2 * n + 128 * nt + 4 * lane + j] as u32;
                        // (shift, subtile, row offset of the fragment register)
                        for (shift, sub, roff) in [(0, 2 * j, 0), (4, 2 * j, 8), (8, 2 * j + 1, 0), (12, 2 * j + 1, 8)]
                        {
                            let bits = (word >> shift) & 0x000f_000f;
                            let col = 64 * nt + 8 * sub + lane / 4;
                            let row = 16 * kt + 2 * (lane % 4) + roff;
                            for (half, nib) in [(0, bits & 0xf), (1, bits >> 16)] {
                                let idx = (row + half) * n + col;
                                assert!(!seen[idx], "element ({}, {col}) fed twice", row + half);
                                seen[idx] = true;
                                b[idx] = kernel_dequant::<T>(nib, scale(sub));
                            }
                        }
                    }
                }
            }
        }
    }
    assert!(seen.iter().all(|&s| s), "every weight is fed to some fragment");
    b
}

fn random_codes(rng: &mut Rng, len: usize) -> Vec<i8> {
    (0..len).map(|_| rng.below(15) as i8 - 7).collect()
}

fn random_scales<S: ScaleFloat>(rng: &mut Rng, len: usize) -> Vec<S> {
    (0..len).map(|_| S::from_f32(rng.range(1e-3, 0.05))).collect()
}

fn check_model<T: Float + ScaleFloat>(n: usize, k: usize, gs: GroupSize, act_order: bool, seed: u64) {
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
    for block in [BlockShape::N128K128, BlockShape::N256K64] {
        if k % block.k_blk() != 0 {
            continue;
        }
        let b = model_b_matrix::<T>(&qweight, &mscales, &shape, block);
        // Kernel row r multiplies gathered activation column perm[r]: B[r][n] == W[n][perm[r]].
        for r in 0..k {
            let src = perm.as_ref().map_or(r, |p| p[r] as usize);
            for nn in 0..n {
                assert_eq!(
                    b[r * n + nn].to_bits(),
                    want[nn * k + src].to_bits(),
                    "{n}x{k} {gs} act_order={act_order} {block:?}: B[{r}][{nn}]"
                );
            }
        }
    }
}

#[test]
fn kernel_b_path_model_matches_dequant() {
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
                check_model::<bf16>(n, k, gs, act_order, seed);
                check_model::<f16>(n, k, gs, act_order, seed + 1000);
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

// ---------------------------------------------------------------------------------------------
// A kernel index emulator (csrc/marlin/gemm.cuh): NOT a reference. It runs every thread of every
// block of a launch sequentially, with the kernel's constants and index arithmetic verbatim:
// cp.async copies (16 bytes, zero-fill, commit/wait groups landing asynchronously), the A-row
// XOR swizzle, ldmatrix.x4 lane addressing, the Marlin word / nibble / scale reads, the mma
// m16n8k16 fragment layouts of the PTX ISA, the shared-memory epilogue and the split-K
// protocol. Shared memory is a byte array of exactly the host's `smem_bytes()`, with a race
// detector (two threads touching one word between two barriers, one of them writing; a read of
// a word whose cp.async has not landed). Only the arithmetic is plain f32 (the mma's internal
// order differs on the GPU); the result is compared with the f64 product of weights dequantized
// by the layout reference, and every output element must be written exactly once.

trait Bits: Float + ScaleFloat {
    const BASE: u32;
    const BIAS: u32;
    fn bits(self) -> u16;
    fn of_bits(b: u16) -> Self;
}
impl Bits for bf16 {
    const BASE: u32 = 0x4300_4300;
    const BIAS: u32 = 0x4308_4308;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn of_bits(b: u16) -> Self {
        bf16::from_bits(b)
    }
}
impl Bits for f16 {
    const BASE: u32 = 0x6400_6400;
    const BIAS: u32 = 0x6408_6408;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn of_bits(b: u16) -> Self {
        f16::from_bits(b)
    }
}

fn bytes_of_t<T: Bits>(v: &[T]) -> Vec<u8> {
    v.iter().flat_map(|x| x.bits().to_le_bytes()).collect()
}

const EMU_THREADS: usize = 256;
const EMU_WARPS: usize = 8;
const MANY: usize = usize::MAX;

/// Dynamic shared memory with a race detector at 4-byte granularity.
struct Smem {
    bytes: Vec<u8>,
    busy: Vec<bool>,
    last_w: Vec<(u64, usize)>,
    last_r: Vec<(u64, usize)>,
    phase: u64,
}

impl Smem {
    fn new(len: usize) -> Self {
        let words = len.div_ceil(4);
        Smem {
            bytes: vec![0xAB; len],
            busy: vec![false; words],
            last_w: vec![(u64::MAX, 0); words],
            last_r: vec![(u64::MAX, 0); words],
            phase: 0,
        }
    }
    fn range(&self, off: usize, len: usize, align: usize) -> std::ops::Range<usize> {
        assert_eq!(off % align, 0, "shared access at byte {off} not {align}-aligned");
        assert!(
            off + len <= self.bytes.len(),
            "shared access [{off}, {}) beyond {} bytes",
            off + len,
            self.bytes.len()
        );
        off / 4..(off + len).div_ceil(4)
    }
    fn read(&mut self, tid: usize, off: usize, len: usize, align: usize) -> Vec<u8> {
        for w in self.range(off, len, align) {
            assert!(!self.busy[w], "thread {tid} reads shared word {w} before its cp.async landed");
            let (p, t) = self.last_w[w];
            assert!(
                !(p == self.phase && t != tid),
                "race: thread {tid} reads word {w} written by {t} in the same phase"
            );
            let (rp, rt) = self.last_r[w];
            self.last_r[w] = (self.phase, if rp == self.phase && rt != tid { MANY } else { tid });
        }
        self.bytes[off..off + len].to_vec()
    }
    fn check_write(&mut self, tid: usize, off: usize, len: usize, align: usize) {
        for w in self.range(off, len, align) {
            assert!(!self.busy[w], "thread {tid} overwrites shared word {w} with a copy in flight");
            let (p, t) = self.last_w[w];
            assert!(!(p == self.phase && t != tid), "race: threads {t} and {tid} write word {w} in the same phase");
            let (rp, rt) = self.last_r[w];
            assert!(
                !(rp == self.phase && rt != tid),
                "race: thread {tid} writes word {w} read by {rt} in the same phase"
            );
            self.last_w[w] = (self.phase, tid);
        }
    }
    fn write(&mut self, tid: usize, off: usize, data: &[u8], align: usize) {
        self.check_write(tid, off, data.len(), align);
        self.bytes[off..off + data.len()].copy_from_slice(data);
    }
    fn barrier(&mut self) {
        self.phase += 1;
    }
}

/// One thread's cp.async state: the open group and the committed, not yet landed groups.
#[derive(Default, Clone)]
struct AsyncState {
    open: Vec<(usize, [u8; 16])>,
    committed: std::collections::VecDeque<Vec<(usize, [u8; 16])>>,
}

fn cp_async16(sm: &mut Smem, st: &mut AsyncState, tid: usize, dst: usize, src: Option<(&[u8], usize)>) {
    let mut data = [0u8; 16];
    if let Some((buf, off)) = src {
        assert_eq!(off % 16, 0, "cp.async global source at byte {off} not 16-aligned");
        assert!(off + 16 <= buf.len(), "cp.async reads [{off}, {}) of a {}-byte buffer", off + 16, buf.len());
        data.copy_from_slice(&buf[off..off + 16]);
    }
    sm.check_write(tid, dst, 16, 16);
    for w in dst / 4..dst / 4 + 4 {
        sm.busy[w] = true;
    }
    st.open.push((dst, data));
}

fn cp_async_commit(st: &mut AsyncState) {
    let g = std::mem::take(&mut st.open);
    st.committed.push_back(g);
}

fn cp_async_wait(sm: &mut Smem, st: &mut AsyncState, n: usize) {
    while st.committed.len() > n {
        for (dst, data) in st.committed.pop_front().unwrap() {
            sm.bytes[dst..dst + 16].copy_from_slice(&data);
            for w in dst / 4..dst / 4 + 4 {
                sm.busy[w] = false;
            }
        }
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[4 * i..4 * i + 4].try_into().unwrap())
}

/// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}: fragment layouts of the PTX ISA,
/// lane = 4·groupID + threadID_in_group.
#[allow(clippy::needless_range_loop)]
fn mma<T: Bits>(c: &mut [[f32; 4]; 32], a: &[[u32; 4]; 32], b0: &[u32; 32], b1: &[u32; 32]) {
    let h = |r: u32, hi: bool| T::of_bits(if hi { (r >> 16) as u16 } else { r as u16 }).to_f32();
    let mut am = [[f32::NAN; 16]; 16];
    let mut bm = [[f32::NAN; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        for (reg, (row, col)) in
            [(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)].into_iter().enumerate()
        {
            am[row][col] = h(a[l][reg], false);
            am[row][col + 1] = h(a[l][reg], true);
        }
        bm[2 * t][g] = h(b0[l], false);
        bm[2 * t + 1][g] = h(b0[l], true);
        bm[2 * t + 8][g] = h(b1[l], false);
        bm[2 * t + 9][g] = h(b1[l], true);
    }
    let mut d = [[0f32; 8]; 16];
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        d[g][2 * t] = c[l][0];
        d[g][2 * t + 1] = c[l][1];
        d[g + 8][2 * t] = c[l][2];
        d[g + 8][2 * t + 1] = c[l][3];
    }
    for (i, drow) in d.iter_mut().enumerate() {
        for (j, dv) in drow.iter_mut().enumerate() {
            for kk in 0..16 {
                *dv += am[i][kk] * bm[kk][j];
            }
        }
    }
    for l in 0..32 {
        let (g, t) = (l / 4, l % 4);
        c[l] = [d[g][2 * t], d[g][2 * t + 1], d[g + 8][2 * t], d[g + 8][2 * t + 1]];
    }
}

/// `dequant_pair` of the kernel, bit for bit.
fn dequant_pair<T: Bits>(word: u32, shift: u32, scale: u16) -> u32 {
    let biased = ((word >> shift) & 0x000f_000f) | T::BASE;
    let s = T::of_bits(scale).to_f32();
    let half = |x: u32, b: u32| {
        let q = T::from_f32(T::of_bits(x as u16).to_f32() - T::of_bits(b as u16).to_f32()); // exact
        T::from_f32(q.to_f32() * s).bits() as u32 // q·s exact in f32, one rounding to T
    };
    half(biased & 0xffff, T::BIAS & 0xffff) | (half(biased >> 16, T::BIAS >> 16) << 16)
}

struct EmuMoe<'a> {
    sorted_token_ids: &'a [i32],
    expert_ids: &'a [i32],
    num_tokens_post_padded: i32,
    topk_weights: Option<&'a [f32]>,
    out_rows: usize,
    top_k: usize,
    block_size: usize,
    num_experts: usize,
}

/// The kernel's parameters (LowbitMarlinGemmParams) as the emulator sees them.
struct EmuLaunch<'a> {
    a: &'a [u8],
    m: usize,
    lda: usize,
    b: &'a [i32],
    scales: &'a [u8],
    n: usize,
    k: usize,
    group: usize,
    moe: Option<EmuMoe<'a>>,
}

/// Global memory the launch writes: the output (16-bit bits, with a per-element write count),
/// split-K partials and counters.
struct EmuGlobal {
    out: Vec<u16>,
    writes: Vec<u8>,
    partials: Vec<f32>,
    counters: Vec<i32>,
}

#[allow(clippy::needless_range_loop)]
fn emu_block<T: Bits>(l: &EmuLaunch, plan: &GemmPlan, bid: usize, gm: &mut EmuGlobal) {
    let moe = l.moe.is_some();
    let m_tiles = plan.m_tiles;
    let n_tiles = plan.block.n_blk() / 64;
    let k_tiles = plan.block.k_blk() / 16;
    let stages = lowbit::marlin::gemm::STAGES;
    let (m_blk, n_blk, k_blk) = (16 * m_tiles, 64 * n_tiles, 16 * k_tiles);
    let warps_k = EMU_WARPS / n_tiles;
    let kt_per_warp = k_tiles / warps_k;
    assert!(EMU_WARPS % n_tiles == 0 && k_tiles % warps_k == 0 && k_blk >= 64);
    let a_chunks = k_blk / 8;
    let b_words = k_tiles * n_tiles * 128;
    let a_elems = m_blk * k_blk;
    let s_elems = (k_blk / 32) * n_blk;
    let c_stride = n_blk + 8;
    let (n, k) = (l.n as i64, l.k as i64);
    let n_blocks = (n + n_blk as i64 - 1) / n_blk as i64;
    assert_eq!(n_blocks as usize, plan.n_blocks);
    let split_k = if moe { 1 } else { plan.split_k as i64 };
    let mut sm = Smem::new(plan.smem_bytes());

    let mut bidv = bid as i64;
    let nb = bidv % n_blocks;
    bidv /= n_blocks;
    let split = bidv % split_k;
    let mb = bidv / split_k;
    if mb >= plan.m_blocks as i64 {
        return;
    }
    let n0 = nb * n_blk as i64;
    let groups = k / l.group as i64;
    let gshift = l.group.trailing_zeros() as i64;

    // Expert offsets (elements of B / of the scales).
    let (mut b_off, mut s_off) = (0i64, 0i64);
    let mut moe_start = 0i64;
    if let Some(mo) = &l.moe {
        moe_start = mb * mo.block_size as i64;
        let used = mo.num_tokens_post_padded as i64;
        if moe_start >= used || moe_start >= mo.sorted_token_ids.len() as i64 {
            return;
        }
        let e = mo.expert_ids[mb as usize];
        if e < 0 || e as usize >= mo.num_experts {
            return;
        }
        b_off = e as i64 * (k / 16) * (2 * n);
        s_off = e as i64 * groups * n;
    }
    let mut s_src = vec![-1i64; m_blk];
    let mut s_dst = vec![-1i64; m_blk];
    let mut s_wt = vec![1f32; m_blk];
    for r in 0..m_blk {
        if let Some(mo) = &l.moe {
            let slot = moe_start + r as i64;
            let cap = mo.sorted_token_ids.len() as i64;
            if r < mo.block_size && slot < cap && slot < mo.num_tokens_post_padded as i64 {
                let id = mo.sorted_token_ids[slot as usize] as i64;
                if id >= 0 && id < mo.out_rows as i64 && id / (mo.top_k as i64) < l.m as i64 {
                    s_src[r] = id / mo.top_k as i64;
                    s_dst[r] = id;
                    if let Some(w) = mo.topk_weights {
                        s_wt[r] = w[id as usize];
                    }
                }
            }
        } else {
            let row = mb * m_blk as i64 + r as i64;
            if row < l.m as i64 {
                s_src[r] = row;
                s_dst[r] = row;
            }
        }
    }

    let sb = 0usize;
    let sa = stages * b_words * 4;
    let ss = stages * (b_words * 4 + a_elems * 2);
    let channelwise = l.group >= l.k;

    // Channelwise scales, per thread.
    let mut cw = vec![[0u16; 8]; EMU_THREADS];
    for tid in 0..EMU_THREADS {
        let (lane, warp) = (tid % 32, tid / 32);
        let wn = warp % n_tiles;
        let tile_col = n0 + 64 * wn as i64;
        for b in 0..8 {
            if channelwise && tile_col < n {
                let idx = (s_off + tile_col + channelwise_pos(lane / 4 + 8 * b) as i64) as usize;
                cw[tid][b] = u16::from_le_bytes([l.scales[2 * idx], l.scales[2 * idx + 1]]);
            }
        }
    }

    let mut st = vec![AsyncState::default(); EMU_THREADS];
    let load_stage = |sm: &mut Smem, st: &mut [AsyncState], slot: usize, it: i64| {
        let k0 = it * k_blk as i64;
        for tid in 0..EMU_THREADS {
            let stt = &mut st[tid];
            let db = sb + slot * b_words * 4;
            for q in (tid..k_tiles * n_tiles * 32).step_by(EMU_THREADS) {
                let (kt, nt, c) = (q / (n_tiles * 32), (q / 32) % n_tiles, q % 32);
                let gnt = nb * n_tiles as i64 + nt as i64;
                let ok = gnt * 64 < n;
                let src = b_off + (k0 / 16 + kt as i64) * (2 * n) + gnt * 128 + 4 * c as i64;
                let bbytes: &[u8] = bytemuck_i32(l.b);
                cp_async16(
                    sm,
                    stt,
                    tid,
                    db + ((kt * n_tiles + nt) * 128 + 4 * c) * 4,
                    ok.then(|| (bbytes, 4 * src as usize)),
                );
            }
            let da = sa + slot * a_elems * 2;
            for q in (tid..m_blk * a_chunks).step_by(EMU_THREADS) {
                let (r, c) = (q / a_chunks, q % a_chunks);
                let row = s_src[r];
                let src = row * l.lda as i64 + k0 + 8 * c as i64;
                cp_async16(
                    sm,
                    stt,
                    tid,
                    da + (r * k_blk + 8 * (c ^ (r & 7))) * 2,
                    (row >= 0).then(|| (l.a, 2 * src as usize)),
                );
            }
            if !channelwise {
                let g0 = k0 >> gshift;
                let ng = if l.group < k_blk { k_blk >> gshift } else { 1 };
                let ds = ss + slot * s_elems * 2;
                for q in (tid..ng * n_tiles * 8).step_by(EMU_THREADS) {
                    let (gi, nt, c) = (q / (n_tiles * 8), (q / 8) % n_tiles, q % 8);
                    let gnt = nb * n_tiles as i64 + nt as i64;
                    let ok = gnt * 64 < n;
                    let src = s_off + (g0 + gi as i64) * n + gnt * 64 + 8 * c as i64;
                    cp_async16(
                        sm,
                        stt,
                        tid,
                        ds + (gi * n_blk + nt * 64 + 8 * c) * 2,
                        ok.then(|| (l.scales, 2 * src as usize)),
                    );
                }
            }
        }
    };

    // acc[warp][lane][mt][b][4]
    let mut acc = vec![vec![vec![[[0f32; 4]; 8]; m_tiles]; 32]; EMU_WARPS];
    let compute = |sm: &mut Smem, acc: &mut Vec<Vec<Vec<[[f32; 4]; 8]>>>, slot: usize, it: i64| {
        let k0 = it * k_blk as i64;
        for warp in 0..EMU_WARPS {
            let (wn, wk) = (warp % n_tiles, warp / n_tiles);
            for t in 0..kt_per_warp {
                let kt = wk + t * warps_k;
                let mut words = [[0u32; 4]; 32];
                let mut sc = [[0u16; 8]; 32];
                for lane in 0..32 {
                    let tid = 32 * warp + lane;
                    let bytes =
                        sm.read(tid, sb + slot * b_words * 4 + ((kt * n_tiles + wn) * 128 + 4 * lane) * 4, 16, 16);
                    for j in 0..4 {
                        words[lane][j] = u32_at(&bytes, j);
                    }
                    if channelwise {
                        sc[lane] = cw[tid];
                    } else {
                        let gl = (((k0 + 16 * kt as i64) >> gshift) - (k0 >> gshift)) as usize;
                        let raw =
                            sm.read(tid, ss + slot * s_elems * 2 + (gl * n_blk + wn * 64 + 8 * (lane / 4)) * 2, 16, 16);
                        for b in 0..8 {
                            sc[lane][b] = u16::from_le_bytes([raw[2 * b], raw[2 * b + 1]]);
                        }
                    }
                }
                // ldmatrix.x4: lane l gives the row address of matrix l/8, row l%8; register j of
                // lane l is matrix j, row l/4, elements 2(l%4), 2(l%4)+1.
                let mut af = vec![[[0u32; 4]; 32]; m_tiles];
                for mt in 0..m_tiles {
                    let mut addr = [0usize; 32];
                    for lane in 0..32 {
                        let r = 16 * mt + (lane & 15);
                        let c = 2 * kt + (lane >> 4);
                        addr[lane] = sa + slot * a_elems * 2 + (r * k_blk + 8 * (c ^ (r & 7))) * 2;
                        assert_eq!(addr[lane] % 16, 0);
                    }
                    for lane in 0..32 {
                        for j in 0..4 {
                            let a = addr[8 * j + lane / 4] + 4 * (lane % 4);
                            af[mt][lane][j] = u32_at(&sm.read(32 * warp + lane, a, 4, 4), 0);
                        }
                    }
                }
                for j in 0..4 {
                    let (mut b00, mut b01, mut b10, mut b11) = ([0u32; 32], [0u32; 32], [0u32; 32], [0u32; 32]);
                    for lane in 0..32 {
                        b00[lane] = dequant_pair::<T>(words[lane][j], 0, sc[lane][2 * j]);
                        b01[lane] = dequant_pair::<T>(words[lane][j], 4, sc[lane][2 * j]);
                        b10[lane] = dequant_pair::<T>(words[lane][j], 8, sc[lane][2 * j + 1]);
                        b11[lane] = dequant_pair::<T>(words[lane][j], 12, sc[lane][2 * j + 1]);
                    }
                    for mt in 0..m_tiles {
                        for (b, (x0, x1)) in [(2 * j, (&b00, &b01)), (2 * j + 1, (&b10, &b11))] {
                            let mut c: [[f32; 4]; 32] = std::array::from_fn(|lane| acc[warp][lane][mt][b]);
                            mma::<T>(&mut c, &af[mt], x0, x1);
                            for lane in 0..32 {
                                acc[warp][lane][mt][b] = c[lane];
                            }
                        }
                    }
                }
            }
        }
    };

    // Main loop.
    let iters = k / k_blk as i64;
    let it0 = split * iters / split_k;
    let it1 = (split + 1) * iters / split_k;
    let n_it = it1 - it0;
    for s in 0..stages - 1 {
        if (s as i64) < n_it {
            load_stage(&mut sm, &mut st, s, it0 + s as i64);
        }
        st.iter_mut().for_each(cp_async_commit);
    }
    for i in 0..n_it {
        for s in st.iter_mut() {
            cp_async_wait(&mut sm, s, stages - 2);
        }
        sm.barrier();
        let next = i + stages as i64 - 1;
        if next < n_it {
            load_stage(&mut sm, &mut st, (next % stages as i64) as usize, it0 + next);
        }
        st.iter_mut().for_each(cp_async_commit);
        compute(&mut sm, &mut acc, (i % stages as i64) as usize, it0 + i);
    }
    for s in st.iter_mut() {
        cp_async_wait(&mut sm, s, 0);
    }
    sm.barrier();

    // Sum the warps_k partial accumulators into sC, in wk order.
    for w in 0..warps_k {
        for warp in 0..EMU_WARPS {
            let (wn, wk) = (warp % n_tiles, warp / n_tiles);
            if wk != w {
                continue;
            }
            for lane in 0..32 {
                let tid = 32 * warp + lane;
                for mt in 0..m_tiles {
                    for b in 0..8 {
                        let row = 16 * mt + lane / 4;
                        let col = 64 * wn + 8 * b + 2 * (lane % 4);
                        let a = &acc[warp][lane][mt][b];
                        for (r, (v0, v1)) in [(row, (a[0], a[1])), (row + 8, (a[2], a[3]))] {
                            let off = (r * c_stride + col) * 4;
                            let (mut x0, mut x1) = (v0, v1);
                            if w != 0 {
                                let old = sm.read(tid, off, 8, 8);
                                x0 += f32::from_bits(u32_at(&old, 0));
                                x1 += f32::from_bits(u32_at(&old, 1));
                            }
                            let mut data = x0.to_le_bytes().to_vec();
                            data.extend_from_slice(&x1.to_le_bytes());
                            sm.write(tid, off, &data, 8);
                        }
                    }
                }
            }
        }
        sm.barrier();
    }

    let vecs = m_blk * (n_blk / 4);
    let out_rows = gm.out.len() as i64 / n;
    let store4 = |gm: &mut EmuGlobal, row: i64, col: i64, v: [f32; 4]| {
        assert!(row >= 0 && row < out_rows && col >= 0 && col + 4 <= n, "store to ({row}, {col})");
        for (e, x) in v.iter().enumerate() {
            let idx = (row * n + col) as usize + e;
            gm.out[idx] = T::from_f32(*x).bits();
            gm.writes[idx] += 1;
        }
    };
    let read_c = |sm: &mut Smem, tid: usize, r: usize, c: usize| -> [f32; 4] {
        let raw = sm.read(tid, (r * c_stride + c) * 4, 16, 16);
        std::array::from_fn(|e| f32::from_bits(u32_at(&raw, e)))
    };
    if split_k == 1 {
        for tid in 0..EMU_THREADS {
            for q in (tid..vecs).step_by(EMU_THREADS) {
                let (r, c) = (q / (n_blk / 4), 4 * (q % (n_blk / 4)));
                let dst = s_dst[r];
                if dst < 0 || n0 + c as i64 >= n {
                    continue;
                }
                let mut v = read_c(&mut sm, tid, r, c);
                if moe {
                    v.iter_mut().for_each(|x| *x *= s_wt[r]);
                }
                store4(gm, dst, n0 + c as i64, v);
            }
        }
        return;
    }
    let tile = mb * n_blocks + nb;
    let tile_elems = (m_blk * n_blk) as i64;
    let part = tile * split_k * tile_elems;
    for tid in 0..EMU_THREADS {
        for q in (tid..vecs).step_by(EMU_THREADS) {
            let (r, c) = (q / (n_blk / 4), 4 * (q % (n_blk / 4)));
            if s_dst[r] < 0 || n0 + c as i64 >= n {
                continue;
            }
            let v = read_c(&mut sm, tid, r, c);
            let at = (part + split * tile_elems + (r * n_blk + c) as i64) as usize;
            assert!(at % 4 == 0 && at + 4 <= gm.partials.len(), "partials [{at}, +4) of {}", gm.partials.len());
            gm.partials[at..at + 4].copy_from_slice(&v);
        }
    }
    let ctr = &mut gm.counters[tile as usize];
    let prev = *ctr;
    *ctr += 1;
    let last = prev as i64 == split_k - 1;
    if last {
        *ctr = 0;
    } else {
        return;
    }
    for tid in 0..EMU_THREADS {
        let _ = tid;
        for q in (tid..vecs).step_by(EMU_THREADS) {
            let (r, c) = (q / (n_blk / 4), 4 * (q % (n_blk / 4)));
            let dst = s_dst[r];
            if dst < 0 || n0 + c as i64 >= n {
                continue;
            }
            let src = (part + (r * n_blk + c) as i64) as usize;
            let mut sum: [f32; 4] = gm.partials[src..src + 4].try_into().unwrap();
            for s in 1..split_k as usize {
                let o = src + s * tile_elems as usize;
                for e in 0..4 {
                    sum[e] += gm.partials[o + e];
                }
            }
            store4(gm, dst, n0 + c as i64, sum);
        }
    }
}

fn bytemuck_i32(v: &[i32]) -> &[u8] {
    // SAFETY: i32 has no padding and any byte pattern is a valid u8; alignment only decreases.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// Runs a whole launch (blocks in `order`) and returns the output bits and write counts.
fn emu_launch<T: Bits>(l: &EmuLaunch, plan: &GemmPlan, out_rows: usize, order: &[usize]) -> (Vec<u16>, Vec<u8>) {
    let poison = T::from_f32(f32::NAN).bits();
    let mut gm = EmuGlobal {
        out: vec![poison; out_rows * l.n],
        writes: vec![0; out_rows * l.n],
        partials: vec![f32::NAN; plan.workspace_partials()],
        counters: vec![0; plan.workspace_counters()],
    };
    assert_eq!(order.len(), plan.grid_blocks());
    for &bid in order {
        emu_block::<T>(l, plan, bid, &mut gm);
    }
    assert!(gm.counters.iter().all(|&c| c == 0), "split-K counters are reset after the launch");
    (gm.out, gm.writes)
}

/// The act-order gather kernel: dst[r, j] = src[r·lda + perm[j]].
fn emu_gather<T: Copy + Default>(src: &[T], m: usize, k: usize, lda: usize, perm: &[i32]) -> Vec<T> {
    (0..m * k)
        .map(|i| {
            let (r, j) = (i / k, i % k);
            let c = perm[j];
            if c >= 0 && (c as usize) < k {
                src[r * lda + c as usize]
            } else {
                T::default()
            }
        })
        .collect()
}

/// All (m_tiles, block, split_k) configurations plus the planner's, for a dense problem.
fn emu_plans(m: usize, n: usize, k: usize) -> Vec<GemmPlan> {
    let mut v = Vec::new();
    for m_tiles in 1..=4 {
        for block in [BlockShape::N128K128, BlockShape::N256K64] {
            if k % block.k_blk() != 0 {
                continue;
            }
            let iters = k / block.k_blk();
            for split_k in [1, 2, 3] {
                if split_k > iters {
                    continue;
                }
                v.push(GemmPlan {
                    m_tiles,
                    block,
                    split_k,
                    m_blocks: m.div_ceil(16 * m_tiles),
                    n_blocks: n.div_ceil(block.n_blk()),
                });
            }
        }
    }
    for sm in [1, 132] {
        v.push(plan_gemm(m, n, k, sm).unwrap());
    }
    v
}

fn assert_close(got: &[f64], want: &[f64], what: &str) {
    let err = lowbit::reference::gemm::rel_mean_abs_err(got, want);
    let scale = want.iter().fold(0f64, |a, w| a.max(w.abs())).max(1e-6);
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0f64, f64::max);
    assert!(err <= 4e-3 && worst <= 2e-2 * scale, "{what}: mean rel err {err:.3e}, worst {worst:.3e} of {scale:.3e}");
}

#[allow(clippy::too_many_arguments)]
fn emu_dense_case<T: Bits>(m: usize, n: usize, k: usize, lda: usize, gs: GroupSize, act_order: bool, seed: u64) {
    let shape = QuantShape::new(n, k, gs).unwrap();
    let mut rng = Rng::new(seed);
    let codes = random_codes(&mut rng, shape.numel());
    let ct_scales: Vec<T> = random_scales(&mut rng, shape.scales_len());
    let gptq_scales = transpose(&ct_scales, n, shape.groups_per_row()).unwrap();
    let packed = format::pack(&codes, &shape).unwrap();
    let perm = act_order.then(|| {
        let mut g_idx: Vec<i32> = (0..k).map(|c| (c / shape.group) as i32).collect();
        for i in (1..k).rev() {
            g_idx.swap(i, rng.below(i + 1));
        }
        refm::act_order_perm(&g_idx, k, shape.group).unwrap()
    });
    let qweight = refm::ct_marlin_repack(&packed, perm.as_deref(), k, n).unwrap();
    let mscales = refm::marlin_permute_scales(&gptq_scales, k, n, shape.group).unwrap();
    let w = marlin_dequant_ref::<T, T>(&qweight, &mscales, perm.as_deref(), &shape).unwrap();
    let x: Vec<T> = (0..(m - 1) * lda + k)
        .map(|i| if i % lda < k { T::from_f32(rng.normal()) } else { T::from_f32(f32::NAN) })
        .collect();
    let want = gemm_ref_f64(&x, m, k, lda, &w, n).unwrap();
    let (a, a_lda) = match &perm {
        Some(p) => (emu_gather(&x, m, k, lda, p), k),
        None => (x.clone(), lda),
    };
    let a_bytes = bytes_of_t(&a);
    let s_bytes = bytes_of_t(&mscales);
    let l =
        EmuLaunch { a: &a_bytes, m, lda: a_lda, b: &qweight, scales: &s_bytes, n, k, group: shape.group, moe: None };
    for plan in emu_plans(m, n, k) {
        let what = format!("{} m={m} n={n} k={k} lda={lda} {gs} act_order={act_order} {plan:?}", T::DTYPE);
        let fwd: Vec<usize> = (0..plan.grid_blocks()).collect();
        let (out, writes) = emu_launch::<T>(&l, &plan, m, &fwd);
        assert!(writes.iter().all(|&c| c == 1), "{what}: every element written exactly once");
        let got: Vec<f64> = out.iter().map(|&b| T::of_bits(b).to_f32() as f64).collect();
        assert_close(&got, &want, &what);
        if plan.split_k > 1 {
            // Another arrival order: bit-identical (the last block sums in split order).
            let rev: Vec<usize> = fwd.iter().rev().copied().collect();
            assert_eq!(emu_launch::<T>(&l, &plan, m, &rev).0, out, "{what}: split-K order independence");
        }
    }
}

#[test]
fn kernel_index_emulator_dense() {
    let mut seed = 100;
    // (m, n, k, lda): M tails, several n-blocks with a partial last block, K not a multiple of
    // 128, strided X.
    for (m, n, k, lda) in [(1, 64, 128, 128), (13, 192, 256, 264), (26, 320, 192, 200), (67, 128, 128, 136)] {
        for gs in [GroupSize::Group(32), GroupSize::Group(64), GroupSize::Group(128), GroupSize::Channelwise] {
            if gs.resolve("t", k).is_err() {
                continue;
            }
            for act_order in [false, true] {
                if act_order && gs == GroupSize::Channelwise {
                    continue;
                }
                seed += 1;
                emu_dense_case::<bf16>(m, n, k, lda, gs, act_order, seed);
                emu_dense_case::<f16>(m, n, k, lda, gs, act_order, seed);
            }
        }
    }
}

/// Routing blocks as moe_align_block_size builds them (per-expert lists padded to the block
/// size with the sentinel `out_rows`), with an unused tail, and with the given extra blocks.
fn emu_align(
    topk_ids: &[i32],
    e: usize,
    bs: usize,
    capacity: usize,
    extra: &[(i32, Vec<i32>)],
) -> (Vec<i32>, Vec<i32>, i32) {
    let sentinel = topk_ids.len() as i32;
    let mut sorted = Vec::new();
    let mut experts = Vec::new();
    for ex in 0..e {
        let ids: Vec<i32> = (0..topk_ids.len()).filter(|&i| topk_ids[i] == ex as i32).map(|i| i as i32).collect();
        for chunk in ids.chunks(bs) {
            let mut c = chunk.to_vec();
            c.resize(bs, sentinel);
            sorted.extend(c);
            experts.push(ex as i32);
        }
    }
    for (ex, ids) in extra {
        let mut c = ids.clone();
        c.resize(bs, sentinel);
        sorted.extend(c);
        experts.push(*ex);
    }
    let used = sorted.len() as i32;
    assert!(sorted.len() <= capacity);
    // Garbage beyond the used prefix: the kernel must not touch it.
    sorted.resize(capacity, 0);
    experts.resize(capacity / bs, 0);
    (sorted, experts, used)
}

fn emu_moe_case<T: Bits>(bs: usize, n: usize, k: usize, gs: GroupSize, seed: u64) {
    let (e, top_k, a_rows) = (5usize, 2usize, 11usize);
    let out_rows = a_rows * top_k;
    let shape = QuantShape::new(n, k, gs).unwrap();
    let mut rng = Rng::new(seed);
    let mut qw = Vec::new();
    let mut sc: Vec<T> = Vec::new();
    let mut wdq = Vec::new();
    for _ in 0..e {
        let codes = random_codes(&mut rng, shape.numel());
        let ct_scales: Vec<T> = random_scales(&mut rng, shape.scales_len());
        let gptq = transpose(&ct_scales, n, shape.groups_per_row()).unwrap();
        let q = refm::ct_marlin_repack(&format::pack(&codes, &shape).unwrap(), None, k, n).unwrap();
        let s = refm::marlin_permute_scales(&gptq, k, n, shape.group).unwrap();
        wdq.extend(marlin_dequant_ref::<T, T>(&q, &s, None, &shape).unwrap());
        qw.extend(q);
        sc.extend(s);
    }
    // Tokens routed to distinct experts (expert 3 gets none).
    let topk_ids: Vec<i32> = (0..out_rows)
        .map(|i| {
            let t = i / top_k;
            [0, 1, 2, 4][(t + (i % top_k) * 3) % 4]
        })
        .collect();
    // Extra blocks: one skipped (-1) and one with a corrupt expert id, both holding real ids.
    let extra = vec![(-1, vec![0, 1]), (e as i32 + 7, vec![2, 3])];
    let capacity = bs * 16;
    let (sorted, expert_ids, used) = emu_align(&topk_ids, e, bs, capacity, &extra);
    let a: Vec<T> = rng.normal_vec(a_rows * k, 1.0);
    let tw: Vec<f32> = (0..out_rows).map(|i| 0.25 + 0.01 * i as f32).collect();
    let blocks = MoeBlocksRef {
        sorted_token_ids: &sorted,
        expert_ids: &expert_ids,
        num_tokens_post_padded: used as usize,
        block_size: bs,
    };
    let (want, written) = moe_gemm_ref(&a, a_rows, k, &wdq, e, n, &blocks, top_k, Some(&tw), out_rows).unwrap();
    let a_bytes = bytes_of_t(&a);
    let s_bytes = bytes_of_t(&sc);
    let plan = plan_moe_gemm(bs, capacity, n, k, 132).unwrap();
    let mut plans = vec![plan];
    for block in [BlockShape::N128K128, BlockShape::N256K64] {
        if k % block.k_blk() == 0 && block != plan.block {
            plans.push(GemmPlan { block, n_blocks: n.div_ceil(block.n_blk()), ..plan });
        }
    }
    for plan in plans {
        let l = EmuLaunch {
            a: &a_bytes,
            m: a_rows,
            lda: k,
            b: &qw,
            scales: &s_bytes,
            n,
            k,
            group: shape.group,
            moe: Some(EmuMoe {
                sorted_token_ids: &sorted,
                expert_ids: &expert_ids,
                num_tokens_post_padded: used,
                topk_weights: Some(&tw),
                out_rows,
                top_k,
                block_size: bs,
                num_experts: e,
            }),
        };
        let what = format!("{} MoE bs={bs} n={n} k={k} {gs} {plan:?}", T::DTYPE);
        let order: Vec<usize> = (0..plan.grid_blocks()).collect();
        let (out, writes) = emu_launch::<T>(&l, &plan, out_rows, &order);
        for r in 0..out_rows {
            for c in 0..n {
                assert_eq!(writes[r * n + c], written[r] as u8, "{what}: row {r} col {c} write count");
            }
        }
        let got: Vec<f64> = out.iter().map(|&b| T::of_bits(b).to_f32() as f64).collect();
        assert_close(&got, &want, &what);
    }
}

#[test]
fn kernel_index_emulator_moe() {
    let mut seed = 900;
    for &bs in &MOE_BLOCK_SIZES {
        for (n, k, gs) in
            [(128, 128, GroupSize::Group(32)), (192, 256, GroupSize::Group(128)), (64, 192, GroupSize::Channelwise)]
        {
            seed += 1;
            emu_moe_case::<bf16>(bs, n, k, gs, seed);
            emu_moe_case::<f16>(bs, n, k, gs, seed);
        }
    }
}
