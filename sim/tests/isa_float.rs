//! Floating-point instructions and conversions, from the PTX ISA 9.x text ("Data Movement and
//! Conversion Instructions: cvt" with its rounding-modifier and saturation rules, "Floating
//! Point Instructions: add/sub/mul/fma/div/min/max/ex2", "Half Precision Floating Point
//! Instructions", "Data Movement and Conversion Instructions: mov" for vector packing). The
//! arithmetic itself is unit-tested exhaustively in `fp.rs`; here the point is that every
//! instruction form reaches it with the right operands, modifiers and result placement.

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;

/// IEEE binary16 → f64, decoded by hand (exact).
fn f16_val(h: u16) -> f64 {
    let s = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let e = ((h >> 10) & 0x1F) as i32;
    let m = (h & 0x3FF) as f64;
    match e {
        0 => s * m * 2f64.powi(-24),
        31 => {
            if m == 0.0 {
                s * f64::INFINITY
            } else {
                f64::NAN
            }
        }
        _ => s * (1.0 + m / 1024.0) * 2f64.powi(e - 15),
    }
}

fn is_nan16(h: u32) -> bool {
    (h & 0x7C00) == 0x7C00 && (h & 0x3FF) != 0
}
fn is_nan_bf16(h: u32) -> bool {
    (h & 0x7F80) == 0x7F80 && (h & 0x7F) != 0
}

fn f(bits: &[f32]) -> Vec<u32> {
    bits.iter().map(|x| x.to_bits()).collect()
}

/// "cvt": `cvt.f32.f16` is exact and `cvt.rn.f16.f32` of an f16 value gives it back: all 65536
/// inputs in one launch each.
#[test]
fn f16_exhaustive_roundtrip() {
    let a: Vec<u32> = (0..65536).collect();
    let z = vec![0; a.len()];
    let widened = ew32("cvt.u16.u32 %rs1, %r1;\n\tcvt.f32.f16 %f1, %rs1;\n\tmov.b32 %r4, %f1;", &a, &z, &z);
    let round = ew32(
        "cvt.u16.u32 %rs1, %r1;\n\tcvt.f32.f16 %f1, %rs1;\n\tcvt.rn.f16.f32 %rs2, %f1;\n\tcvt.u32.u16 %r4, %rs2;",
        &a,
        &z,
        &z,
    );
    for h in 0..65536u32 {
        let want = f16_val(h as u16);
        let got = f32::from_bits(widened[h as usize]);
        if want.is_nan() {
            assert!(got.is_nan(), "cvt.f32.f16 {h:#06x}");
            assert!(is_nan16(round[h as usize]), "cvt.rn.f16.f32 of NaN from {h:#06x} gave {:#x}", round[h as usize]);
        } else {
            assert_eq!(got as f64, want, "cvt.f32.f16 {h:#06x}");
            assert_eq!(got.is_sign_negative(), h & 0x8000 != 0, "sign of {h:#06x}");
            assert_eq!(round[h as usize], h, "cvt.rn.f16.f32 round trip of {h:#06x}");
        }
    }
}

/// "cvt": `cvt.f32.bf16` is exact (bf16 is the upper half of an f32) and `cvt.rn.bf16.f32` gives
/// it back, over all 65536 inputs.
#[test]
fn bf16_exhaustive_roundtrip() {
    let a: Vec<u32> = (0..65536).collect();
    let z = vec![0; a.len()];
    let widened = ew32("cvt.u16.u32 %rs1, %r1;\n\tcvt.f32.bf16 %f1, %rs1;\n\tmov.b32 %r4, %f1;", &a, &z, &z);
    let round = ew32(
        "cvt.u16.u32 %rs1, %r1;\n\tcvt.f32.bf16 %f1, %rs1;\n\tcvt.rn.bf16.f32 %rs2, %f1;\n\tcvt.u32.u16 %r4, %rs2;",
        &a,
        &z,
        &z,
    );
    for h in 0..65536u32 {
        if is_nan_bf16(h) {
            assert!(f32::from_bits(widened[h as usize]).is_nan());
            assert!(is_nan_bf16(round[h as usize]), "NaN {h:#06x} → {:#x}", round[h as usize]);
        } else {
            assert_eq!(widened[h as usize], h << 16, "cvt.f32.bf16 {h:#06x}");
            assert_eq!(round[h as usize], h, "cvt.rn.bf16.f32 round trip of {h:#06x}");
        }
    }
}

/// "cvt", rounding modifiers `.rn .rz .rm .rp` for f32 → f16 and f32 → bf16 at exact ties,
/// just off ties, overflow and the subnormal range (expected bits derived by hand from IEEE 754
/// round-to-nearest-even / toward zero / toward −∞ / toward +∞).
#[test]
fn cvt_narrow_rounding_modes() {
    let t = 2f32.powi(-11); // half an f16 ulp at 1.0
    #[rustfmt::skip]
    let cases: &[(f32, [u32; 4])] = &[
        //  x                      rn      rz      rm      rp
        (1.0 + t,                [0x3C00, 0x3C00, 0x3C00, 0x3C01]), // tie, even below
        (1.0 + 3.0 * t,          [0x3C02, 0x3C01, 0x3C01, 0x3C02]), // tie, even above
        (-(1.0 + t),             [0xBC00, 0xBC00, 0xBC01, 0xBC00]),
        (1.0 + t + 2f32.powi(-20), [0x3C01, 0x3C00, 0x3C00, 0x3C01]), // just above the tie
        (65520.0,                [0x7C00, 0x7BFF, 0x7BFF, 0x7C00]), // overflow threshold
        (-1.0e10,                [0xFC00, 0xFBFF, 0xFC00, 0xFBFF]),
        (2f32.powi(-24),         [0x0001, 0x0001, 0x0001, 0x0001]), // smallest subnormal
        (2f32.powi(-25),         [0x0000, 0x0000, 0x0000, 0x0001]), // tie with zero
        (-2f32.powi(-26),        [0x8000, 0x8000, 0x8001, 0x8000]),
        (-0.0,                   [0x8000, 0x8000, 0x8000, 0x8000]),
        (f32::INFINITY,          [0x7C00, 0x7C00, 0x7C00, 0x7C00]),
    ];
    let x: Vec<u32> = cases.iter().map(|c| c.0.to_bits()).collect();
    let z = vec![0; x.len()];
    for (m, rnd) in ["rn", "rz", "rm", "rp"].iter().enumerate() {
        let out =
            ew32(&format!("mov.b32 %f1, %r1;\n\tcvt.{rnd}.f16.f32 %rs1, %f1;\n\tcvt.u32.u16 %r4, %rs1;"), &x, &z, &z);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(out[i], c.1[m], "cvt.{rnd}.f16.f32 {:e}", c.0);
        }
    }
    let t = 2f32.powi(-8); // half a bf16 ulp at 1.0
    #[rustfmt::skip]
    let cases: &[(f32, [u32; 4])] = &[
        (1.0 + t,              [0x3F80, 0x3F80, 0x3F80, 0x3F81]),
        (1.0 + 3.0 * t,        [0x3F82, 0x3F81, 0x3F81, 0x3F82]),
        (-(1.0 + t),           [0xBF80, 0xBF80, 0xBF81, 0xBF80]),
        (f32::MAX,             [0x7F80, 0x7F7F, 0x7F7F, 0x7F80]),
        (-f32::MAX,            [0xFF80, 0xFF7F, 0xFF80, 0xFF7F]),
        (f32::from_bits(1),    [0x0000, 0x0000, 0x0000, 0x0001]), // f32 subnormal below half a bf16 ulp
    ];
    let x: Vec<u32> = cases.iter().map(|c| c.0.to_bits()).collect();
    let z = vec![0; x.len()];
    for (m, rnd) in ["rn", "rz", "rm", "rp"].iter().enumerate() {
        let out =
            ew32(&format!("mov.b32 %f1, %r1;\n\tcvt.{rnd}.bf16.f32 %rs1, %f1;\n\tcvt.u32.u16 %r4, %rs1;"), &x, &z, &z);
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(out[i], c.1[m], "cvt.{rnd}.bf16.f32 {:e}", c.0);
        }
    }
    // NaN → a NaN (the ISA gives the canonical NaN).
    let out = ew32(
        "mov.b32 %f1, %r1;\n\tcvt.rn.f16.f32 %rs1, %f1;\n\tcvt.rn.bf16.f32 %rs2, %f1;\n\tmov.b32 %r4, {%rs1, %rs2};",
        &[0x7FC0_1234, 0xFF80_0001],
        &[0, 0],
        &[0, 0],
    );
    for v in out {
        assert!(is_nan16(v & 0xFFFF) && is_nan_bf16(v >> 16), "{v:#x}");
    }
}

/// "cvt", float → integer with `.rni .rzi .rmi .rpi`: the result saturates to the destination's
/// range and NaN converts to 0.
#[test]
fn cvt_float_to_int() {
    let xs = [
        2.5f32,
        3.5,
        -2.5,
        -2.7,
        -2.2,
        2.2,
        0.5,
        -0.5,
        1e10,
        -1e10,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        4294967040.0,
        -1.0,
    ];
    let a = f(&xs);
    let z = vec![0; a.len()];
    let r = |m: &str, ty: &str| ew32(&format!("mov.b32 %f1, %r1;\n\tcvt.{m}.{ty}.f32 %r4, %f1;"), &a, &z, &z);
    let sat_s = |v: f64| if v.is_nan() { 0 } else { v.clamp(i32::MIN as f64, i32::MAX as f64) as i32 as u32 };
    let sat_u = |v: f64| if v.is_nan() { 0 } else { v.clamp(0.0, u32::MAX as f64) as u32 };
    for (m, g) in [
        ("rni", (|v: f64| v.round_ties_even()) as fn(f64) -> f64),
        ("rzi", f64::trunc),
        ("rmi", f64::floor),
        ("rpi", f64::ceil),
    ] {
        let s = r(m, "s32");
        let u = r(m, "u32");
        for (i, &x) in xs.iter().enumerate() {
            assert_eq!(s[i], sat_s(g(x as f64)), "cvt.{m}.s32.f32 {x}");
            assert_eq!(u[i], sat_u(g(x as f64)), "cvt.{m}.u32.f32 {x}");
        }
    }
    // Integer → float rounds: 2^24 + 1 is not an f32 (rn: ties to even → 2^24; rp → 2^24 + 2).
    let a = [(1u32 << 24) + 1, (1 << 24) + 3, u32::MAX];
    let z = [0; 3];
    let rn = ew32("cvt.rn.f32.u32 %f1, %r1;\n\tmov.b32 %r4, %f1;", &a, &z, &z);
    let rp = ew32("cvt.rp.f32.u32 %f1, %r1;\n\tmov.b32 %r4, %f1;", &a, &z, &z);
    let rz = ew32("cvt.rz.f32.s32 %f1, %r1;\n\tmov.b32 %r4, %f1;", &a, &z, &z);
    assert_eq!(rn, f(&[16777216.0, 16777220.0, 4294967296.0]));
    assert_eq!(rp, f(&[16777218.0, 16777220.0, 4294967296.0]));
    assert_eq!(rz, f(&[16777216.0, 16777218.0, -1.0]));
}

/// "cvt": `.sat` clamps to [0.0, 1.0] with NaN → +0.0; f32 ↔ f64 (widening exact, narrowing
/// rounds per the modifier); `cvt.rni.f32.f32` rounds to an integral value.
#[test]
fn cvt_sat_and_f64() {
    let xs = [1.5f32, -0.5, 0.25, f32::NAN, f32::INFINITY, -0.0, 1.0];
    let a = f(&xs);
    let z = vec![0; a.len()];
    let out = ew32("mov.b32 %f1, %r1;\n\tcvt.sat.f32.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    assert_eq!(
        out,
        f(&[1.0, 0.0, 0.25, 0.0, 1.0, 0.0, 1.0])
            .iter()
            .enumerate()
            .map(|(i, &v)| if i == 5 { out[5] } else { v })
            .collect::<Vec<_>>()
    );
    assert!(out[5] == 0 || out[5] == 0x8000_0000);
    let out = ew32(
        "mov.b32 %f1, %r1;\n\tcvt.rni.f32.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;",
        &f(&[2.5, 3.5, -1.5, 0.4]),
        &[0; 4],
        &[0; 4],
    );
    assert_eq!(out, f(&[2.0, 4.0, -2.0, 0.0]));
    // f32 → f64 → f32.
    let mut rng = Rng::new(9);
    let a: Vec<u32> = (0..512).map(|_| rng.next_u32()).filter(|&b| !f32::from_bits(b).is_nan()).collect();
    let z = vec![0; a.len()];
    let out = ew32(
        "mov.b32 %f1, %r1;\n\tcvt.f64.f32 %fd1, %f1;\n\tcvt.rn.f32.f64 %f2, %fd1;\n\tmov.b32 %r4, %f2;",
        &a,
        &z,
        &z,
    );
    assert_eq!(out, a);
    // f64 → f32 at a tie: 1 + 2^-24 is halfway between 1 and 1 + 2^-23.
    let x = [(1.0f64 + 2f64.powi(-24)).to_bits(), (-(1.0f64 + 3.0 * 2f64.powi(-24))).to_bits()];
    let z = [0u64; 2];
    for (m, want) in [
        ("rn", [1.0f32, -(1.0 + 2.0 * 2f32.powi(-23))]),
        ("rz", [1.0, -(1.0 + 2f32.powi(-23))]),
        ("rm", [1.0, -(1.0 + 2.0 * 2f32.powi(-23))]),
        ("rp", [1.0 + 2f32.powi(-23), -(1.0 + 2f32.powi(-23))]),
    ] {
        let out = ew64(
            &format!(
                "mov.b64 %fd1, %rd11;\n\tcvt.{m}.f32.f64 %f1, %fd1;\n\tmov.b32 %r30, %f1;\n\tcvt.u64.u32 %rd14, %r30;"
            ),
            &x,
            &z,
            &z,
        );
        assert_eq!(out, want.map(|v| v.to_bits() as u64), "cvt.{m}.f32.f64");
    }
}

/// "cvt": `cvt.rn.bf16x2.f32 d, a, b` and `cvt.rn.f16x2.f32 d, a, b` put cvt(a) in d[31:16] and
/// cvt(b) in d[15:0]; `mov.b32 d, {lo, hi}` packs with the first operand in the low half and
/// `mov.b32 {lo, hi}, d` unpacks the same way ("mov", vector operands).
#[test]
fn cvt_packed_and_mov_packing() {
    let mut rng = Rng::new(10);
    let n = 256;
    // Values exact in bf16 and f16 (small integers times powers of two).
    let vals: Vec<f32> =
        (0..2 * n).map(|_| (rng.below(255) as f32 - 127.0) * 2f32.powi(rng.below(8) as i32 - 4)).collect();
    let a = f(&vals[..n]);
    let b = f(&vals[n..]);
    let z = vec![0; n];
    let bf = ew32("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tcvt.rn.bf16x2.f32 %r4, %f1, %f2;", &a, &b, &z);
    let hf = ew32("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tcvt.rn.f16x2.f32 %r4, %f1, %f2;", &a, &b, &z);
    let sep = ew32("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tcvt.rn.f16.f32 %rs1, %f1;\n\tcvt.rn.f16.f32 %rs2, %f2;\n\tmov.b32 %r4, {%rs2, %rs1};", &a, &b, &z);
    let unpack = ew32("mov.b32 {%rs1, %rs2}, %r1;\n\tcvt.u32.u16 %r5, %rs1;\n\tcvt.u32.u16 %r6, %rs2;\n\tshl.b32 %r6, %r6, 16;\n\tor.b32 %r4, %r5, %r6;\n\txor.b32 %r4, %r4, 0xFFFF;", &a, &b, &z);
    for i in 0..n {
        assert_eq!(bf[i], (a[i] >> 16) << 16 | (b[i] >> 16), "bf16x2 of {} {}", vals[i], vals[n + i]);
        assert_eq!(f16_val((hf[i] >> 16) as u16), vals[i] as f64);
        assert_eq!(f16_val(hf[i] as u16), vals[n + i] as f64);
        assert_eq!(sep[i], hf[i], "{{lo, hi}} packing");
        assert_eq!(unpack[i], a[i] ^ 0xFFFF);
    }
}

/// "Floating Point Instructions: add, sub, mul, fma, div" with `.rn .rz .rm .rp` (hand-derived
/// ties and near-ties) and random `.rn` sweeps against IEEE arithmetic.
#[test]
fn f32_arith_rounding() {
    let u = 2f32.powi(-23); // ulp of 1.0
    let one_up = 1.0 + u;
    let add = [(1.0f32, 0.75 * u), (1.0, 0.5 * u), (-1.0, -0.75 * u), (1.0, -0.25 * u)];
    #[rustfmt::skip]
    let add_want: [[f32; 4]; 4] = [
        // rn        rz       rm          rp
        [one_up,     1.0,     1.0,        one_up],
        [1.0,        1.0,     1.0,        one_up],
        [-one_up,    -1.0,    -one_up,    -1.0],
        [1.0,        1.0 - u / 2.0, 1.0 - u / 2.0, 1.0],
    ];
    let (a, b): (Vec<f32>, Vec<f32>) = add.iter().copied().unzip();
    for (m, rnd) in ["rn", "rz", "rm", "rp"].iter().enumerate() {
        let out = ew32(
            &format!("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tadd.{rnd}.f32 %f3, %f1, %f2;\n\tmov.b32 %r4, %f3;"),
            &f(&a),
            &f(&b),
            &[0; 4],
        );
        for i in 0..4 {
            assert_eq!(out[i], add_want[i][m].to_bits(), "add.{rnd}.f32 {} {}", a[i], b[i]);
        }
        // (1+u)^2 = 1 + 2u + u^2: rn/rz/rm → 1 + 2u, rp → 1 + 3u.
        let out = ew32(
            &format!("mov.b32 %f1, %r1;\n\tmul.{rnd}.f32 %f3, %f1, %f1;\n\tmov.b32 %r4, %f3;"),
            &f(&[one_up]),
            &[0],
            &[0],
        );
        assert_eq!(out[0], if m == 3 { 0x3F80_0003 } else { 0x3F80_0002 }, "mul.{rnd}");
        // 1/3 and 2/3: 0x3EAAAAAB / 0x3F2AAAAB when rounded up.
        let out = ew32(
            &format!("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tdiv.{rnd}.f32 %f3, %f1, %f2;\n\tmov.b32 %r4, %f3;"),
            &f(&[1.0, 2.0, -1.0]),
            &f(&[3.0, 3.0, 3.0]),
            &[0; 3],
        );
        let up = m == 0 || m == 3;
        let down_neg = m == 0 || m == 2; // -1/3 rounds away from zero for rn and rm
        assert_eq!(
            out,
            [
                if up { 0x3EAA_AAAB } else { 0x3EAA_AAAA },
                if up { 0x3F2A_AAAB } else { 0x3F2A_AAAA },
                if down_neg { 0xBEAA_AAAB } else { 0xBEAA_AAAA }
            ],
            "div.{rnd}"
        );
    }
    // fma rounds once: (1+u)(1+u) - (1+2u) = u^2 exactly, where mul-then-add gives 0.
    let out = ew32("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tfma.rn.f32 %f3, %f1, %f1, %f2;\n\tmul.rn.f32 %f4, %f1, %f1;\n\tadd.rn.f32 %f5, %f4, %f2;\n\tmov.b32 %r4, %f3;\n\tmov.b32 %r5, %f5;\n\tsetp.eq.f32 %p1, %f5, 0f00000000;\n\t@!%p1 mov.b32 %r4, 0;", &f(&[one_up]), &f(&[-(1.0 + 2.0 * u)]), &[0]);
    assert_eq!(out[0], (u * u).to_bits());
    // Random .rn sweeps (finite operands) against IEEE single precision.
    let mut rng = Rng::new(11);
    let n = 2048;
    let gen = |rng: &mut Rng| loop {
        let v = f32::from_bits(rng.next_u32() & 0x8FFF_FFFF | 0x3000_0000);
        if v.is_finite() {
            break v;
        }
    };
    let a: Vec<f32> = (0..n).map(|_| gen(&mut rng)).collect();
    let b: Vec<f32> = (0..n).map(|_| gen(&mut rng)).collect();
    let c: Vec<f32> = (0..n).map(|_| gen(&mut rng)).collect();
    let ld = "mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tmov.b32 %f3, %r3;\n\t";
    for (op, g) in [
        ("add.rn.f32 %f4, %f1, %f2;", (|a: f32, b: f32, _c: f32| a + b) as fn(f32, f32, f32) -> f32),
        ("sub.f32 %f4, %f1, %f2;", |a, b, _| a - b),
        ("mul.rn.f32 %f4, %f1, %f2;", |a, b, _| a * b),
        ("div.rn.f32 %f4, %f1, %f2;", |a, b, _| a / b),
        ("fma.rn.f32 %f4, %f1, %f2, %f3;", |a: f32, b, c| a.mul_add(b, c)),
    ] {
        let out = ew32(&format!("{ld}{op}\n\tmov.b32 %r4, %f4;"), &f(&a), &f(&b), &f(&c));
        for i in 0..n {
            assert_eq!(out[i], g(a[i], b[i], c[i]).to_bits(), "{op} {} {} {}", a[i], b[i], c[i]);
        }
    }
}

/// "Floating Point Instructions: min, max": a NaN operand yields the other operand, two NaNs
/// yield NaN, `.NaN` propagates NaN, and −0.0 is treated as smaller than +0.0.
#[test]
fn f32_min_max_nan_zero() {
    let nan = f32::from_bits(0x7FC0_0000);
    let cases =
        [(1.0f32, nan), (nan, -2.0), (nan, nan), (0.0, -0.0), (-0.0, 0.0), (3.0, -4.0), (f32::NEG_INFINITY, 1.0)];
    let a: Vec<u32> = cases.iter().map(|c| c.0.to_bits()).collect();
    let b: Vec<u32> = cases.iter().map(|c| c.1.to_bits()).collect();
    let z = vec![0; a.len()];
    let run = |op: &str| {
        ew32(
            &format!("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\t{op}.f32 %f3, %f1, %f2;\n\tmov.b32 %r4, %f3;"),
            &a,
            &b,
            &z,
        )
    };
    let mn = run("min");
    let mx = run("max");
    let mnn = run("min.NaN");
    let want_min = [1.0f32, -2.0, nan, -0.0, -0.0, -4.0, f32::NEG_INFINITY];
    let want_max = [1.0f32, -2.0, nan, 0.0, 0.0, 3.0, 1.0];
    for i in 0..cases.len() {
        if want_min[i].is_nan() {
            assert!(f32::from_bits(mn[i]).is_nan() && f32::from_bits(mx[i]).is_nan());
        } else {
            assert_eq!(mn[i], want_min[i].to_bits(), "min {:?}", cases[i]);
            assert_eq!(mx[i], want_max[i].to_bits(), "max {:?}", cases[i]);
        }
        let any_nan = cases[i].0.is_nan() || cases[i].1.is_nan();
        assert_eq!(f32::from_bits(mnn[i]).is_nan(), any_nan, "min.NaN {:?}", cases[i]);
    }
}

/// "Half Precision Floating Point Instructions: add, sub, mul, fma" on `.f16x2` and `.bf16x2`
/// (each half independently; small integers so results are exact, plus an f16 tie under `.rn`).
#[test]
fn half2_arith() {
    let mut rng = Rng::new(12);
    let n = 512;
    // Exact small values (f32 arithmetic on them is exact, signed zeros included) → 16-bit bits.
    let h = |x: f32| -> u16 {
        let bits = x.to_bits();
        let s = (bits >> 16) & 0x8000;
        if x == 0.0 {
            return s as u16;
        }
        let e = ((bits >> 23) & 0xFF) as i32 - 127 + 15;
        let m = (bits >> 13) & 0x3FF;
        (s | (e as u32) << 10 | m) as u16
    };
    let bfh = |x: f32| -> u16 { (x.to_bits() >> 16) as u16 };
    let vals: Vec<[f32; 6]> = (0..n).map(|_| std::array::from_fn(|_| rng.below(21) as f32 - 10.0)).collect();
    let pack = |lo: u16, hi: u16| lo as u32 | (hi as u32) << 16;
    for (ty, enc) in [("f16x2", &h as &dyn Fn(f32) -> u16), ("bf16x2", &bfh)] {
        let a: Vec<u32> = vals.iter().map(|v| pack(enc(v[0]), enc(v[1]))).collect();
        let b: Vec<u32> = vals.iter().map(|v| pack(enc(v[2]), enc(v[3]))).collect();
        let c: Vec<u32> = vals.iter().map(|v| pack(enc(v[4]), enc(v[5]))).collect();
        let mut ops: Vec<(&str, fn(f32, f32, f32) -> f32)> = vec![("fma.rn", |a: f32, b, c| a.mul_add(b, c))];
        if ty == "f16x2" {
            ops.push(("add", |a, b, _| a + b));
            ops.push(("sub", |a, b, _| a - b));
            ops.push(("mul", |a, b, _| a * b));
        }
        for (op, g) in ops {
            let inst = if op.starts_with("fma") {
                format!("{op}.{ty} %r4, %r1, %r2, %r3;")
            } else {
                format!("{op}.{ty} %r4, %r1, %r2;")
            };
            let out = ew32(&inst, &a, &b, &c);
            for i in 0..n {
                let v = vals[i];
                let want = pack(enc(g(v[0], v[2], v[4])), enc(g(v[1], v[3], v[5])));
                assert_eq!(out[i], want, "{inst} {v:?}");
            }
        }
    }
    // f16 ties: 1 + 2^-11 (0x1000) rounds to even (1.0) in the low half; 1 + 3·2^-11 to 1 + 2^-9.
    let out = ew32("add.rn.f16x2 %r4, %r1, %r2;", &[0x3C01_3C00], &[0x1000_1000], &[0]);
    assert_eq!(out[0], 0x3C02_3C00);
}

/// "Floating Point Instructions: ex2": `ex2.approx.f32` within the ISA's bound (2 ulp of the
/// exact 2^x here), exact at integers, and the special values of its table
/// (−Inf → +0, +Inf → +Inf, NaN → NaN).
#[test]
fn ex2_approx_bound() {
    let mut xs: Vec<f32> = (-200..200).map(|i| i as f32 * 0.37).filter(|x| x.abs() < 120.0).collect();
    xs.extend([0.0, 1.0, -1.0, 10.0, -126.0, 127.0, 0.5]);
    let a = f(&xs);
    let z = vec![0; a.len()];
    let out = ew32("mov.b32 %f1, %r1;\n\tex2.approx.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    for (i, &x) in xs.iter().enumerate() {
        let want = (x as f64).exp2();
        let got = f32::from_bits(out[i]) as f64;
        let ulp = 2f64.powi(want.log2().floor() as i32 - 23);
        assert!((got - want).abs() <= 2.0 * ulp, "ex2.approx {x}: {got} vs {want}");
        if x.fract() == 0.0 {
            assert_eq!(got, want, "ex2.approx of the integer {x}");
        }
    }
    let out = ew32(
        "mov.b32 %f1, %r1;\n\tex2.approx.ftz.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;",
        &f(&[f32::NEG_INFINITY, f32::INFINITY, f32::NAN]),
        &[0; 3],
        &[0; 3],
    );
    assert_eq!(out[0], 0);
    assert_eq!(out[1], f32::INFINITY.to_bits());
    assert!(f32::from_bits(out[2]).is_nan());
}

/// "Floating Point Comparisons" (the table of `setp` comparison operators for floating point):
/// ordered `eq ne lt le gt ge` are false when either operand is NaN, the unordered `equ neu ltu
/// leu gtu geu` are true, `num` is true when neither is NaN and `nan` when either is; +0 == −0.
#[test]
fn f32_setp_ordered_unordered() {
    let vals = [0.0f32, -0.0, 1.0, -1.0, f32::INFINITY, f32::NEG_INFINITY, f32::NAN, f32::from_bits(1)];
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in &vals {
        for &y in &vals {
            a.push(x.to_bits());
            b.push(y.to_bits());
        }
    }
    let ops: [(&str, fn(f32, f32) -> bool); 14] = [
        ("eq", |x, y| x == y),
        ("ne", |x, y| !x.is_nan() && !y.is_nan() && x != y),
        ("lt", |x, y| x < y),
        ("le", |x, y| x <= y),
        ("gt", |x, y| x > y),
        ("ge", |x, y| x >= y),
        ("equ", |x, y| x.is_nan() || y.is_nan() || x == y),
        ("neu", |x, y| x != y),
        ("ltu", |x, y| x.is_nan() || y.is_nan() || x < y),
        ("leu", |x, y| x.is_nan() || y.is_nan() || x <= y),
        ("gtu", |x, y| x.is_nan() || y.is_nan() || x > y),
        ("geu", |x, y| x.is_nan() || y.is_nan() || x >= y),
        ("num", |x, y| !x.is_nan() && !y.is_nan()),
        ("nan", |x, y| x.is_nan() || y.is_nan()),
    ];
    let mut body = String::from("mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n");
    for (k, (op, _)) in ops.iter().enumerate() {
        body += &format!(
            "\tsetp.{op}.f32 %p1, %f1, %f2;\n\tselp.u32 %r5, {}, 0, %p1;\n\tor.b32 %r4, %r4, %r5;\n",
            1u32 << k
        );
    }
    let out = ew32(&body, &a, &b, &vec![0; a.len()]);
    for i in 0..a.len() {
        let (x, y) = (f32::from_bits(a[i]), f32::from_bits(b[i]));
        let want: u32 = ops.iter().enumerate().map(|(k, (_, f))| (f(x, y) as u32) << k).sum();
        assert_eq!(out[i], want, "setp on {x:?} {y:?}: got {:014b} want {want:014b}", out[i]);
    }
    // .f16x2 with two destinations: p from the low halves, q from the high halves.
    let out = ew32("setp.lt.f16x2 %p1|%p2, %r1, %r2;\n\tselp.u32 %r5, 1, 0, %p1;\n\tselp.u32 %r6, 2, 0, %p2;\n\tor.b32 %r4, %r5, %r6;", &[0x3C00_4000, 0x7E00_3C00], &[0x4000_3C00, 0x4000_4000], &[0, 0]);
    assert_eq!(out, [2, 1]);
}

/// IEEE-exact f32 and f64 operations reach correctly rounded results: "sqrt" (`.rn`), "rcp"
/// (`.rn`), "add/mul/fma/div" on `.f64`, "abs"/"neg" (sign-bit operations, NaN included),
/// "testp" (`.notanumber .infinite .subnormal .normal`), "copysign".
#[test]
fn f32_sqrt_rcp_and_f64_arith() {
    let mut rng = Rng::new(13);
    let n = 1024;
    let a: Vec<u32> = (0..n).map(|_| rng.next_u32() & 0x7FFF_FFFF).filter(|&b| !f32::from_bits(b).is_nan()).collect();
    let z = vec![0; a.len()];
    let sq = ew32("mov.b32 %f1, %r1;\n\tsqrt.rn.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    let rc = ew32("mov.b32 %f1, %r1;\n\trcp.rn.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    for i in 0..a.len() {
        let x = f32::from_bits(a[i]);
        assert_eq!(sq[i], x.sqrt().to_bits(), "sqrt.rn {x:e}");
        assert_eq!(rc[i], (1.0 / x).to_bits(), "rcp.rn {x:e}");
    }
    let gen = |rng: &mut Rng| loop {
        let v = f64::from_bits(rng.next_u64() & 0x8FFF_FFFF_FFFF_FFFF | 0x3000_0000_0000_0000);
        if v.is_finite() {
            break v.to_bits();
        }
    };
    let (x, y, w): (Vec<u64>, Vec<u64>, Vec<u64>) =
        (0..n).map(|_| (gen(&mut rng), gen(&mut rng), gen(&mut rng))).fold((vec![], vec![], vec![]), |mut acc, t| {
            acc.0.push(t.0);
            acc.1.push(t.1);
            acc.2.push(t.2);
            acc
        });
    let ld = "mov.b64 %fd1, %rd11;\n\tmov.b64 %fd2, %rd12;\n\tmov.b64 %fd3, %rd13;\n\t";
    for (inst, f) in [
        ("add.rn.f64 %fd4, %fd1, %fd2;", (|a: f64, b: f64, _c: f64| a + b) as fn(f64, f64, f64) -> f64),
        ("mul.f64 %fd4, %fd1, %fd2;", |a, b, _| a * b),
        ("div.rn.f64 %fd4, %fd1, %fd2;", |a, b, _| a / b),
        ("fma.rn.f64 %fd4, %fd1, %fd2, %fd3;", |a: f64, b, c| a.mul_add(b, c)),
        ("sqrt.rn.f64 %fd4, %fd1;", |a: f64, _, _| a.abs().sqrt()),
    ] {
        let inst2 = if inst.starts_with("sqrt") { format!("abs.f64 %fd1, %fd1;\n\t{inst}") } else { inst.to_string() };
        let out = ew64(&format!("{ld}{inst2}\n\tmov.b64 %rd14, %fd4;"), &x, &y, &w);
        for i in 0..n {
            let want = f(f64::from_bits(x[i]), f64::from_bits(y[i]), f64::from_bits(w[i]));
            assert_eq!(out[i], want.to_bits(), "{inst}");
        }
    }
    // abs/neg only touch the sign bit (also of a NaN); testp classifies; copysign takes a's sign.
    let a: Vec<u32> = vec![0x7FC0_0001, 0xFFC0_0001, 0x8000_0000, 0x0000_0001, 0x7F80_0000, 0xBF80_0000];
    let z = vec![0; a.len()];
    let abs = ew32("mov.b32 %f1, %r1;\n\tabs.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    let neg = ew32("mov.b32 %f1, %r1;\n\tneg.f32 %f2, %f1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    let cls = ew32(
        "mov.b32 %f1, %r1;\n\ttestp.notanumber.f32 %p1, %f1;\n\ttestp.infinite.f32 %p2, %f1;\n\ttestp.subnormal.f32 %p3, %f1;\n\ttestp.normal.f32 %p4, %f1;\n\tselp.u32 %r5, 1, 0, %p1;\n\tselp.u32 %r6, 2, 0, %p2;\n\tselp.u32 %r7, 4, 0, %p3;\n\tselp.u32 %r8, 8, 0, %p4;\n\tor.b32 %r4, %r5, %r6;\n\tor.b32 %r4, %r4, %r7;\n\tor.b32 %r4, %r4, %r8;",
        &a,
        &z,
        &z,
    );
    let cs = ew32(
        "mov.b32 %f1, %r1;\n\tmov.f32 %f3, 0f40000000;\n\tcopysign.f32 %f2, %f1, %f3;\n\tmov.b32 %r4, %f2;",
        &a,
        &z,
        &z,
    );
    for i in 0..a.len() {
        assert_eq!(abs[i], a[i] & 0x7FFF_FFFF, "abs {:#x}", a[i]);
        assert_eq!(neg[i], a[i] ^ 0x8000_0000, "neg {:#x}", a[i]);
        let x = f32::from_bits(a[i]);
        let want = x.is_nan() as u32
            | (x.is_infinite() as u32) << 1
            | (x.is_subnormal() as u32) << 2
            | (x.is_normal() as u32) << 3;
        assert_eq!(cls[i], want, "testp {:#x}", a[i]);
        // copysign.f32 d, a, b: d = b with the sign of a.
        assert_eq!(cs[i], 0x4000_0000 | (a[i] & 0x8000_0000), "copysign {:#x}", a[i]);
    }
}

/// Half-precision modifiers and min/max: "Half Precision Floating Point Instructions: fma"
/// (`.relu` clamps negative results to +0, `.sat` to [0, 1]), "min/max" on `.f16x2`/`.bf16x2`
/// (a NaN operand yields the other, `.NaN` propagates a NaN, −0 < +0), and "cvt" with `.relu`
/// (negative → +0, NaN → NaN) and `.satfinite` (out-of-range → ±MAX_NORM, NaN → NaN).
#[test]
fn half_modifiers_and_minmax() {
    // f16 bits: 1.0 = 0x3C00, -1.0 = 0xBC00, 2.0 = 0x4000, 0.5 = 0x3800, NaN = 0x7E00, -0 = 0x8000.
    let pack = |lo: u32, hi: u32| lo | hi << 16;
    // fma(a, b, c) with a·b + c = -1 (low) and 3 (high).
    let a = [pack(0xBC00, 0x4000)];
    let b = [pack(0x4000, 0x3C00)];
    let c = [pack(0x3C00, 0x3C00)];
    assert_eq!(ew32("fma.rn.f16x2 %r4, %r1, %r2, %r3;", &a, &b, &c), [pack(0xBC00, 0x4200)]);
    assert_eq!(ew32("fma.rn.relu.f16x2 %r4, %r1, %r2, %r3;", &a, &b, &c), [pack(0x0000, 0x4200)]);
    assert_eq!(ew32("fma.rn.sat.f16x2 %r4, %r1, %r2, %r3;", &a, &b, &c), [pack(0x0000, 0x3C00)]);
    // bf16: 1.0 = 0x3F80, -1.0 = 0xBF80, 2.0 = 0x4000.
    let out = ew32(
        "fma.rn.relu.bf16x2 %r4, %r1, %r2, %r3;",
        &[pack(0xBF80, 0x4000)],
        &[pack(0x4000, 0x3F80)],
        &[pack(0x3F80, 0x3F80)],
    );
    assert_eq!(out, [pack(0x0000, 0x4040)]);
    // min/max on f16x2: (1, NaN) vs (NaN, -0) and (-0, +0).
    let x = [pack(0x3C00, 0x7E00), pack(0x8000, 0x0000)];
    let y = [pack(0x7E00, 0x8000), pack(0x0000, 0x8000)];
    let z = [0, 0];
    assert_eq!(ew32("min.f16x2 %r4, %r1, %r2;", &x, &y, &z), [pack(0x3C00, 0x8000), pack(0x8000, 0x8000)]);
    assert_eq!(ew32("max.f16x2 %r4, %r1, %r2;", &x, &y, &z), [pack(0x3C00, 0x8000), pack(0x0000, 0x0000)]);
    let nan = ew32("max.NaN.f16x2 %r4, %r1, %r2;", &x, &y, &z);
    assert!(
        (nan[0] & 0x7C00) == 0x7C00
            && (nan[0] & 0x3FF) != 0
            && (nan[0] >> 16 & 0x7C00) == 0x7C00
            && (nan[0] >> 16 & 0x3FF) != 0,
        "{:#x}",
        nan[0]
    );
    let xb = [pack(0x3F80, 0x7FC0)];
    let yb = [pack(0x7FC0, 0xBF80)];
    assert_eq!(ew32("min.bf16x2 %r4, %r1, %r2;", &xb, &yb, &[0]), [pack(0x3F80, 0xBF80)]);
    // cvt .relu / .satfinite.
    let vals = [-3.0f32, 2.0, f32::NAN, 1.0e6, -1.0e6, f32::INFINITY];
    let a = f(&vals);
    let z = vec![0; a.len()];
    let relu = ew32("mov.b32 %f1, %r1;\n\tcvt.rn.relu.f16.f32 %rs1, %f1;\n\tcvt.u32.u16 %r4, %rs1;", &a, &z, &z);
    let satf = ew32("mov.b32 %f1, %r1;\n\tcvt.rn.satfinite.f16.f32 %rs1, %f1;\n\tcvt.u32.u16 %r4, %rs1;", &a, &z, &z);
    let want_relu = [0x0000, 0x4000, u32::MAX, 0x7C00, 0x0000, 0x7C00];
    let want_satf = [0xC200, 0x4000, u32::MAX, 0x7BFF, 0xFBFF, 0x7BFF];
    for i in 0..vals.len() {
        if want_relu[i] == u32::MAX {
            assert!(is_nan16(relu[i]) && is_nan16(satf[i]), "NaN through .relu/.satfinite");
        } else {
            assert_eq!(relu[i], want_relu[i], "cvt.rn.relu.f16.f32 {}", vals[i]);
            assert_eq!(satf[i], want_satf[i], "cvt.rn.satfinite.f16.f32 {}", vals[i]);
        }
    }
    let out = ew32(
        "mov.b32 %f1, %r1;\n\tmov.b32 %f2, %r2;\n\tcvt.rn.relu.bf16x2.f32 %r4, %f1, %f2;",
        &f(&[-2.0, 3.0]),
        &f(&[5.0, -0.5]),
        &[0, 0],
    );
    assert_eq!(out, [pack(0x40A0, 0x0000), pack(0x0000, 0x4040)]);
}

/// "set": `set.CmpOp.u32.f32` writes 0xFFFFFFFF for true and 0 for false, `set...f32.f32`
/// writes 1.0f / 0.0f; "selp.f32" and float immediates in nvcc's `0fXXXXXXXX` form.
#[test]
fn set_and_float_immediates() {
    let a = f(&[1.0, 2.0, f32::NAN]);
    let z = vec![0; 3];
    let s = ew32("mov.b32 %f1, %r1;\n\tset.lt.u32.f32 %r4, %f1, 0f3FC00000;", &a, &z, &z);
    assert_eq!(s, [u32::MAX, 0, 0]);
    let s = ew32("mov.b32 %f1, %r1;\n\tset.gtu.f32.f32 %f2, %f1, 0f3FC00000;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    assert_eq!(s, f(&[0.0, 1.0, 1.0]));
    let s = ew32("mov.b32 %f1, %r1;\n\tsetp.gt.f32 %p1, %f1, 0f3FC00000;\n\tselp.f32 %f2, 0fBF800000, 0f40490FDB, %p1;\n\tmov.b32 %r4, %f2;", &a, &z, &z);
    assert_eq!(s, f(&[std::f32::consts::PI, -1.0, std::f32::consts::PI]));
    let s = ew64("mov.f64 %fd1, 0d3FF8000000000000;\n\tmov.b64 %rd14, %fd1;", &[0], &[0], &[0]);
    assert_eq!(s, [1.5f64.to_bits()]);
}

/// "cvt" rounds once, from the exact source value: f64 → f16/bf16 and 64-bit integer → bf16 must
/// not round twice through f32. The sources sit just off an f16/bf16 rounding boundary by less
/// than an f32 ulp, where a truncating f32 intermediate would land exactly on a tie (or on the
/// lower neighbour) and round the wrong way.
#[test]
fn cvt_single_rounding_from_f64_and_s64() {
    let t = 2f64.powi(-11); // half an f16 ulp at 1.0
    #[rustfmt::skip]
    let cases: &[(f64, [u32; 4])] = &[
        //  x                          rn      rz      rm      rp
        (1.0 + t + 2f64.powi(-40),   [0x3C01, 0x3C00, 0x3C00, 0x3C01]),
        (1.0 + 2f64.powi(-40),       [0x3C00, 0x3C00, 0x3C00, 0x3C01]),
        (-(1.0 + 2f64.powi(-40)),    [0xBC00, 0xBC00, 0xBC01, 0xBC00]),
        (1.0e-300,                   [0x0000, 0x0000, 0x0000, 0x0001]),
        (1.0 + t,                    [0x3C00, 0x3C00, 0x3C00, 0x3C01]),
    ];
    let x: Vec<u64> = cases.iter().map(|c| c.0.to_bits()).collect();
    let z = vec![0u64; x.len()];
    for (m, rnd) in ["rn", "rz", "rm", "rp"].iter().enumerate() {
        let out = ew64(
            &format!("mov.b64 %fd1, %rd11;\n\tcvt.{rnd}.f16.f64 %rs1, %fd1;\n\tcvt.u64.u16 %rd14, %rs1;"),
            &x,
            &z,
            &z,
        );
        for (i, c) in cases.iter().enumerate() {
            assert_eq!(out[i] as u32, c.1[m], "cvt.{rnd}.f16.f64 {:e}", c.0);
        }
    }
    let tb = 2f64.powi(-8); // half a bf16 ulp at 1.0
    let x = [(1.0 + tb + 2f64.powi(-40)).to_bits(), (1.0 + 2f64.powi(-40)).to_bits()];
    let z = [0u64; 2];
    let rn = ew64("mov.b64 %fd1, %rd11;\n\tcvt.rn.bf16.f64 %rs1, %fd1;\n\tcvt.u64.u16 %rd14, %rs1;", &x, &z, &z);
    let rp = ew64("mov.b64 %fd1, %rd11;\n\tcvt.rp.bf16.f64 %rs1, %fd1;\n\tcvt.u64.u16 %rd14, %rs1;", &x, &z, &z);
    assert_eq!(rn, [0x3F81, 0x3F80], "cvt.rn.bf16.f64");
    assert_eq!(rp, [0x3F81, 0x3F81], "cvt.rp.bf16.f64");
    // s64 → bf16: 2^40 + 2^32 + 1 is just above the tie 2^40 + 2^32 between bf16 neighbours
    // 2^40 and 2^40 + 2^33; 2^40 + 1 rounds up only under .rp.
    let x = [(1u64 << 40) + (1 << 32) + 1, (1 << 40) + 1];
    let rn = ew64("cvt.rn.bf16.s64 %rs1, %rd11;\n\tcvt.u64.u16 %rd14, %rs1;", &x, &z, &z);
    let rp = ew64("cvt.rp.bf16.u64 %rs1, %rd11;\n\tcvt.u64.u16 %rd14, %rs1;", &x, &z, &z);
    assert_eq!(rn, [0x5381, 0x5380], "cvt.rn.bf16.s64");
    assert_eq!(rp, [0x5381, 0x5381], "cvt.rp.bf16.u64");
}
