//! The division-free INT4 rounding of the kernels (issue 9) is bit-identical to the definition.
//!
//! DESIGN §3 defines the code of a weight `w` under its stored scale `s` as
//! `q = clamp(round_half_even(w / s), -7, 7)` with an IEEE f32 division ([`rq::code`]). The weight
//! sync (`csrc/marlin/layout.cuh`) computes it without the division (`csrc/common/lowbit_int4.cuh`,
//! `qgrid::quotient` / `round8`): `r = RN(1/s)` once per scale, then per weight
//! `t = RN(w r)`, `e = fma(t, -s, w)`, `y = fma(e, r, t)`, and the code's nibble `u = q + 8` is the
//! low byte of the bits of `RN(y + 1.5·2^23 + 8)`. [`fast_nibble`] below is that sequence,
//! operation for operation, in Rust (`f32::mul_add` is the fused multiply-add); the CUDA code says
//! the same of itself, and the two must be changed together.
//!
//! **Why it is exact** (the proof is written out in `lowbit_int4.cuh`): a widened bf16 or f16 scale
//! has an integer significand `m < 2^11`. Then `e = w - t·s` is exactly representable (it is a
//! small multiple of the coarser of the grids of `w` and `t·s`), so the second fma rounds
//! `z = w/s + (w/s - t)·(r·s - 1)` once, and `|z - w/s| < 2^-47 |w/s|`. A rounding boundary of f32
//! (a midpoint `M·2^k`, `M` an odd 25-bit integer) can never equal `w/s` (that would put the
//! ≥ 25-bit odd part of `M·m` into `w`'s 24-bit significand) and lies at least
//! `min(2^-24, 2^-36)·|w/s|` away from it, so `y == RN(w/s)`, the IEEE quotient, for
//! `|w/s| ≥ 1/4` (and `|y| < 1/2` below, where both give 0). The integer rounding is exact for
//! `|y| < 2^22` (the floats of `[2^23, 2^24)` are the integers, ties to even). No clamp is needed
//! on the fast path because its scale was made from an amax ≥ `|w|`, which bounds `|w/s| < 7.02`:
//! that precondition, `s ≥ S(max(|w|/7, 1e-5))`, is checked below to imply `|w| < 7.5·s` for every
//! pair.
//!
//! **What is tested.** For every 16-bit weight (all 65536 bit patterns of bf16 and of f16, the
//! non-finite ones excepted: the kernels send those to the division) and every scale the kernels
//! can store (every positive finite bf16 and f16 value from `S(1e-5)` up to `S(f32::MAX / 7)`):
//! wherever `|w| < 7.5·s` — a superset of the precondition — the fast nibble equals `q + 8` of
//! [`rq::code`]; and the corrected quotient equals `w / s` bit for bit wherever `|w/s| ≥ 1/4`.
//! That is every pair, 4 × 2^16 × (≈ 18 000 bf16 or ≈ 31 000 f16 scales), not a sample. f32
//! weights cannot be enumerated against every scale (2^32 × 49 000); for them the argument above
//! (which never used the weight's width) is backed by every scale × the weights nearest to every
//! rounding boundary that matters — the half-integers `k + 1/2`, the f32 midpoints next to them
//! (where `RN(w/s)` could collapse onto a tie: it never does with these scales, see
//! [`f32_weights_are_never_double_rounded_onto_a_tie`]) and the integers — plus random weights.

use half::{bf16, f16};
use lowbit::reference::quant as rq;
use lowbit::{Float, ScaleFloat};

/// `1.5·2^23 + 8`: `RN(y + ROUND8)` has `rint(y) + 8` in its low bits (`qgrid::kRound8`).
const ROUND8: f32 = 12_582_920.0;

/// The kernel's corrected quotient `y` (`qgrid::recip` + `qgrid::quotient`).
#[inline(always)]
fn fast_quotient(w: f32, s: f32) -> f32 {
    let r = 1.0f32 / s; // __frcp_rn(s)
    let ns = -s;
    let t = w * r; // __fmul_rn(w, r)
    let e = t.mul_add(ns, w); // __fmaf_rn(t, ns, w)
    e.mul_add(r, t) // __fmaf_rn(e, r, t)
}

/// The kernel's code `u = q + 8`: the low byte of the bits of `qgrid::round8(y)`, which the sync
/// kernel gathers into packed words with byte permutes (so the whole byte must be `u`, not only
/// its low nibble).
#[inline(always)]
fn fast_nibble(w: f32, s: f32) -> u32 {
    (fast_quotient(w, s) + ROUND8).to_bits() & 0xFF // __fadd_rn(y, kRound8), then prmt.b32
}

/// Every scale of type `S` the kernels can store: `S(max(amax / 7, 1e-5))` for some finite amax.
fn reachable_scales<S: ScaleFloat>(bits: impl Iterator<Item = u16>, from_bits: impl Fn(u16) -> S) -> Vec<f32> {
    let lo = rq::group_scale::<S>(0.0).to_f32();
    let hi = rq::group_scale::<S>(f32::MAX).to_f32();
    bits.map(from_bits).map(|s| s.to_f32()).filter(|&s| s.is_finite() && s >= lo && s <= hi).collect()
}

/// Counters of one exhaustive sweep.
#[derive(Default, Debug, Clone, Copy)]
struct Tally {
    pairs: u64,
    checked: u64,
    code_mismatch: u64,
    quotient_mismatch: u64,
    precondition_outside: u64,
}

impl Tally {
    fn add(&mut self, o: Tally) {
        self.pairs += o.pairs;
        self.checked += o.checked;
        self.code_mismatch += o.code_mismatch;
        self.quotient_mismatch += o.quotient_mismatch;
        self.precondition_outside += o.precondition_outside;
    }
}

/// One scale against every weight of the table; `wmin[i]` is the scale weight `i` alone would get.
/// Branch-free so that it vectorises.
#[inline(always)]
fn sweep_scale(s: f32, ws: &[f32], wmin: &[f32]) -> Tally {
    let lim = 7.5 * s; // exact: s has at most 11 significant bits (or it overflows to +Inf: no limit)
    let (mut checked, mut code_bad, mut quot_bad, mut pre_bad) = (0u32, 0u32, 0u32, 0u32);
    for (&w, &wm) in ws.iter().zip(wmin) {
        let in_domain = w.abs() < lim;
        let want = (rq::code(w, s).0 as i32).wrapping_add(8) as u32;
        let got = fast_nibble(w, s);
        let x = w / s;
        let quotient_ok = (x.abs() < 0.25) | (fast_quotient(w, s).to_bits() == x.to_bits());
        // (wrapping: at most 65536 per scale; no overflow checks in the vector loop)
        checked = checked.wrapping_add(in_domain as u32);
        code_bad = code_bad.wrapping_add((in_domain & (got != want)) as u32);
        quot_bad = quot_bad.wrapping_add((in_domain & !quotient_ok) as u32);
        // The fast path's precondition (scale made from an amax >= |w|) must imply the domain.
        pre_bad = pre_bad.wrapping_add(((s >= wm) & !in_domain) as u32);
    }
    Tally {
        pairs: ws.len() as u64,
        checked: checked as u64,
        code_mismatch: code_bad as u64,
        quotient_mismatch: quot_bad as u64,
        precondition_outside: pre_bad as u64,
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sweep_avx2(scales: &[f32], ws: &[f32], wmin: &[f32]) -> Tally {
    let mut t = Tally::default();
    for &s in scales {
        t.add(sweep_scale(s, ws, wmin));
    }
    t
}

fn sweep(scales: &[f32], ws: &[f32], wmin: &[f32]) -> Tally {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for (checked just above).
        return unsafe { sweep_avx2(scales, ws, wmin) };
    }
    let mut t = Tally::default();
    for &s in scales {
        t.add(sweep_scale(s, ws, wmin));
    }
    t
}

/// Every finite weight of a 16-bit type against every reachable scale of `S`, on all cores.
fn exhaustive<W: Float, S: ScaleFloat>(w_from_bits: fn(u16) -> W, s_from_bits: fn(u16) -> S) {
    let ws: Vec<f32> = (0..=u16::MAX).map(|b| w_from_bits(b).to_f32()).filter(|w| w.is_finite()).collect();
    let wmin: Vec<f32> = ws.iter().map(|w| rq::group_scale::<S>(w.abs()).to_f32()).collect();
    let scales = reachable_scales::<S>(0..=u16::MAX, s_from_bits);
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(16);
    let chunk = scales.len().div_ceil(threads);
    let mut total = Tally::default();
    std::thread::scope(|sc| {
        let hs: Vec<_> = scales.chunks(chunk).map(|part| sc.spawn(|| sweep(part, &ws, &wmin))).collect();
        for h in hs {
            total.add(h.join().unwrap());
        }
    });
    let what = format!("{} weights x {} scales", W::DTYPE, S::DTYPE);
    eprintln!("{what}: {} weights x {} scales, {total:?}", ws.len(), scales.len());
    assert_eq!(total.pairs, ws.len() as u64 * scales.len() as u64, "{what}");
    assert!(total.checked > total.pairs / 2, "{what}: the domain covers most pairs");
    assert_eq!(total.code_mismatch, 0, "{what}: fast code != rint(w / s)");
    assert_eq!(total.quotient_mismatch, 0, "{what}: corrected quotient != w / s");
    assert_eq!(total.precondition_outside, 0, "{what}: the precondition admits |w| >= 7.5 s");
}

#[test]
fn every_bf16_weight_times_every_bf16_scale() {
    exhaustive::<bf16, bf16>(bf16::from_bits, bf16::from_bits);
}

#[test]
fn every_bf16_weight_times_every_f16_scale() {
    exhaustive::<bf16, f16>(bf16::from_bits, f16::from_bits);
}

#[test]
fn every_f16_weight_times_every_bf16_scale() {
    exhaustive::<f16, bf16>(f16::from_bits, bf16::from_bits);
}

#[test]
fn every_f16_weight_times_every_f16_scale() {
    exhaustive::<f16, f16>(f16::from_bits, f16::from_bits);
}

/// The f32 weights nearest to `c` (computed exactly in f64) and a few ulps either side.
fn around(c: f64, out: &mut Vec<f32>) {
    let w = c as f32;
    for d in -3i32..=3 {
        let x = f32::from_bits((w.to_bits() as i32).wrapping_add(d) as u32);
        if x.is_finite() {
            out.push(x);
        }
    }
}

/// f32 weights: every reachable scale × the weights next to every boundary that decides a code,
/// and × random weights of every magnitude up to the grid's edge.
fn f32_weights<S: ScaleFloat>(s_from_bits: fn(u16) -> S) {
    let scales = reachable_scales::<S>(0..=u16::MAX, s_from_bits);
    let mut rng = lowbit::reference::rng::Rng::new(9);
    let mut checked = 0u64;
    for &s in &scales {
        let mut ws = Vec::with_capacity(1024);
        for k in -8i32..=7 {
            let h = k as f64 + 0.5; // a half-integer boundary of rint
            let hf = h as f32;
            // The f32 midpoints next to h (where RN(w/s) would collapse onto h) and the integers.
            let up = f32::from_bits(hf.abs().to_bits() + 1) as f64 * h.signum();
            let down = f32::from_bits(hf.abs().to_bits() - 1) as f64 * h.signum();
            for q in [h, (h + up) / 2.0, (h + down) / 2.0, k as f64, k as f64 + 1.0] {
                around(q * s as f64, &mut ws);
                around(-q * s as f64, &mut ws);
            }
        }
        for _ in 0..256 {
            // |w| up to 7.4 s, uniform, and log-uniform down to tiny magnitudes.
            ws.push((rng.uniform() * 2.0 - 1.0) * 7.4 * s);
            ws.push((rng.uniform() * 2.0 - 1.0) * 7.4 * s * (-(rng.uniform() * 40.0)).exp2());
        }
        for &w in &ws {
            let wm = rq::group_scale::<S>(w.abs()).to_f32();
            let in_domain = w.is_finite() && w.abs() < 7.5 * s;
            if s >= wm {
                assert!(in_domain, "precondition admits w = {w:e}, s = {s:e}");
            }
            if !in_domain {
                continue;
            }
            checked += 1;
            let want = (rq::code(w, s).0 as i32 + 8) as u32;
            let exact = ((w as f64) / (s as f64)).round_ties_even().clamp(-7.0, 7.0) as i32;
            assert_eq!(want, (exact + 8) as u32, "double rounding at w = {w:e}, s = {s:e}");
            assert_eq!(fast_nibble(w, s), want, "f32 w = {w:e} ({:#x}), s = {s:e}", w.to_bits());
            let x = w / s;
            if x.abs() >= 0.25 {
                assert_eq!(fast_quotient(w, s).to_bits(), x.to_bits(), "quotient w = {w:e}, s = {s:e}");
            }
        }
    }
    eprintln!("f32 weights x {} scales: {} pairs checked", S::DTYPE, checked);
    assert!(checked > scales.len() as u64 * 500);
}

#[test]
fn f32_weights_at_every_boundary_times_every_bf16_scale() {
    f32_weights::<bf16>(bf16::from_bits);
}

#[test]
fn f32_weights_at_every_boundary_times_every_f16_scale() {
    f32_weights::<f16>(f16::from_bits);
}

/// With these scales an f32 weight is never double-rounded onto a half-integer: `h·s` is exactly
/// representable (≤ 15 significant bits), so a weight other than `h·s` is at least one of its ulps,
/// more than `h·2^-24·s`, away from it, and `|w/s - h| > h·2^-24 ≥ ulp(h)/2`: `RN(w/s)` equals `h`
/// only for `w == h·s`. So `rint(RN(w/s))` is also the exact quotient rounded half to even. Checked
/// at the worst scale significands (1 and 255/128) on every weight within 64 ulps of every
/// boundary.
#[test]
fn f32_weights_are_never_double_rounded_onto_a_tie() {
    for s in [1.0f32, 1.9921875, 1.5, 1.0e-5, 3.0e4] {
        let s = bf16::from_f32(s).to_f32();
        for k in -8i32..=7 {
            let h = k as f64 + 0.5;
            let c = (h * s as f64) as f32;
            for d in -64i32..=64 {
                let w = f32::from_bits((c.to_bits() as i32 + d) as u32);
                let exact = ((w as f64) / (s as f64)).round_ties_even().clamp(-7.0, 7.0) as i8;
                assert_eq!(rq::code(w, s).0, exact, "w = {w:e}, s = {s:e}");
                if w.abs() < 7.5 * s {
                    assert_eq!(fast_nibble(w, s), (exact as i32 + 8) as u32, "w = {w:e}, s = {s:e}");
                }
            }
        }
    }
}

/// The kernels' `amax / 7` of `qgrid::stored_scale` (the same quotient with `s = 7`, `m = 7`;
/// `+Inf` keeps the IEEE quotient), operation for operation.
#[inline(always)]
fn fast_amax_over_7(amax: f32) -> f32 {
    if amax <= f32::MAX {
        let r = 1.0f32 / 7.0; // kInv7
        let t = amax * r;
        let e = t.mul_add(-7.0, amax);
        e.mul_add(r, t)
    } else {
        amax
    }
}

/// `s32 = max(amax / 7, 1e-5)` for a range of amax bit patterns: mismatches of `s32` (what the
/// stored scale is rounded from) and of the quotient itself where `amax / 7 >= 2^-120`.
#[inline(always)]
fn sweep_amax(bits: std::ops::Range<u32>) -> (u32, u32) {
    let (mut s32_bad, mut quot_bad) = (0u32, 0u32);
    for b in bits {
        let a = f32::from_bits(b);
        let want = a / 7.0;
        let got = fast_amax_over_7(a);
        let s_ok = got.max(rq_min_scale()).to_bits() == want.max(rq_min_scale()).to_bits();
        let q_ok = (want < 7.5e-37) | (got.to_bits() == want.to_bits());
        s32_bad = s32_bad.wrapping_add(!s_ok as u32);
        quot_bad = quot_bad.wrapping_add(!q_ok as u32);
    }
    (s32_bad, quot_bad)
}

#[inline(always)]
fn rq_min_scale() -> f32 {
    lowbit::format::MIN_SCALE
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn sweep_amax_avx2(bits: std::ops::Range<u32>) -> (u32, u32) {
    sweep_amax(bits)
}

/// Every non-negative f32 amax, `0` to `+Inf` (2^31 values): the division-free `amax / 7` gives
/// the same `s32`, hence the same stored scale, as the IEEE division of DESIGN §3 — and the same
/// quotient bit for bit wherever it is a normal number. (The proof is the one above with `s = 7`.)
#[test]
fn every_amax_over_7() {
    let end = f32::INFINITY.to_bits() + 1;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).min(16) as u32;
    let step = end.div_ceil(threads * 64);
    let (mut s32_bad, mut quot_bad) = (0u64, 0u64);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                sc.spawn(move || {
                    let mut acc = (0u64, 0u64);
                    let mut lo = t * step;
                    while lo < end {
                        let r = lo..(lo + step).min(end);
                        #[cfg(target_arch = "x86_64")]
                        let (a, b) = if std::arch::is_x86_feature_detected!("avx2")
                            && std::arch::is_x86_feature_detected!("fma")
                        {
                            // SAFETY: the CPU has the features (checked just above).
                            unsafe { sweep_amax_avx2(r) }
                        } else {
                            sweep_amax(r)
                        };
                        #[cfg(not(target_arch = "x86_64"))]
                        let (a, b) = sweep_amax(r);
                        acc.0 += a as u64;
                        acc.1 += b as u64;
                        lo += threads * step;
                    }
                    acc
                })
            })
            .collect();
        for h in hs {
            let (a, b) = h.join().unwrap();
            s32_bad += a;
            quot_bad += b;
        }
    });
    assert_eq!(s32_bad, 0, "s32 differs");
    assert_eq!(quot_bad, 0, "amax / 7 differs");
    // And the stored scales themselves, through the reference, at the edges.
    for a in [0.0f32, 7e-5, f32::from_bits(7e-5f32.to_bits() + 1), 1.0, 7.0, 3e5, 458_752.0, f32::MAX, f32::INFINITY] {
        let s32 = fast_amax_over_7(a).max(rq_min_scale());
        assert_eq!(bf16::from_f32(s32).to_bits(), rq::group_scale::<bf16>(a).to_bits(), "{a:e}");
        assert_eq!(f16::from_f32(s32).to_bits(), rq::group_scale::<f16>(a).to_bits(), "{a:e}");
    }
}
