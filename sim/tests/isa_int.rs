//! Integer and bit-manipulation instructions, from the PTX ISA 9.x text ("Integer Arithmetic
//! Instructions", "Logic and Shift Instructions", "Comparison and Selection Instructions",
//! "Data Movement and Conversion Instructions: prmt"). Expected values come from the ISA's
//! definitions (its pseudo-code where it gives one), computed here in plain Rust.

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;

fn ops_pairs(body: &str, f: impl Fn(u32, u32) -> Option<u32>) {
    let mut rng = Rng::new(1);
    let xs = edge_u32(&mut rng, 15);
    let (a, b) = pairs(&xs);
    let c = vec![0; a.len()];
    let out = ew32(body, &a, &b, &c);
    for i in 0..a.len() {
        if let Some(want) = f(a[i], b[i]) {
            assert_eq!(out[i], want, "`{}` a={:#x} b={:#x}", body.trim(), a[i], b[i]);
        }
    }
}

/// "Integer Arithmetic Instructions: add", "sub", "mul" (.lo/.hi/.wide), "mad".
#[test]
fn add_sub_mul_mad() {
    ops_pairs("add.s32 %r4, %r1, %r2;", |a, b| Some(a.wrapping_add(b)));
    ops_pairs("sub.u32 %r4, %r1, %r2;", |a, b| Some(a.wrapping_sub(b)));
    ops_pairs("mul.lo.s32 %r4, %r1, %r2;", |a, b| Some(a.wrapping_mul(b)));
    ops_pairs("mul.hi.u32 %r4, %r1, %r2;", |a, b| Some(((a as u64 * b as u64) >> 32) as u32));
    ops_pairs("mul.hi.s32 %r4, %r1, %r2;", |a, b| Some(((a as i32 as i64 * b as i32 as i64) >> 32) as u32));
    // .wide: "d = a * b" in twice the width; the halves come back through mov.b64 {lo, hi}.
    ops_pairs("mul.wide.s32 %rd30, %r1, %r2;\n\tmov.b64 {%r5, %r4}, %rd30;", |a, b| {
        Some(((a as i32 as i64 * b as i32 as i64) >> 32) as u32)
    });
    ops_pairs("mul.wide.u32 %rd30, %r1, %r2;\n\tmov.b64 {%r4, %r5}, %rd30;", |a, b| Some(a.wrapping_mul(b)));
    ops_pairs("mul.wide.u32 %rd30, %r1, %r2;\n\tmov.b64 {%r5, %r4}, %rd30;", |a, b| {
        Some(((a as u64 * b as u64) >> 32) as u32)
    });
    // mad.lo: d = (a*b)[31:0] + c; here c = a ^ b.
    ops_pairs("xor.b32 %r5, %r1, %r2;\n\tmad.lo.s32 %r4, %r1, %r2, %r5;", |a, b| {
        Some(a.wrapping_mul(b).wrapping_add(a ^ b))
    });
    ops_pairs("mad.hi.u32 %r4, %r1, %r2, %r1;", |a, b| Some((((a as u64 * b as u64) >> 32) as u32).wrapping_add(a)));
    ops_pairs(
        "cvt.u64.u32 %rd31, %r2;\n\tmad.wide.s32 %rd30, %r1, %r2, %rd31;\n\tmov.b64 {%r5, %r4}, %rd30;",
        |a, b| Some(((a as i32 as i64).wrapping_mul(b as i32 as i64).wrapping_add(b as i64) >> 32) as u32),
    );
}

/// "Integer Arithmetic Instructions: div", "rem": C semantics (truncation toward zero, the
/// remainder has the dividend's sign); division by zero is unspecified, so it is skipped, as is
/// the signed overflow INT_MIN / -1.
#[test]
fn div_rem() {
    ops_pairs("div.u32 %r4, %r1, %r2;", |a, b| (b != 0).then(|| a / b));
    ops_pairs("rem.u32 %r4, %r1, %r2;", |a, b| (b != 0).then(|| a % b));
    let ok = |a: u32, b: u32| b != 0 && !(a == 0x8000_0000 && b == u32::MAX);
    ops_pairs("div.s32 %r4, %r1, %r2;", |a, b| ok(a, b).then(|| (a as i32 / b as i32) as u32));
    ops_pairs("rem.s32 %r4, %r1, %r2;", |a, b| ok(a, b).then(|| (a as i32 % b as i32) as u32));
    // Hand cases: -7 / 2 = -3, -7 % 2 = -1, 7 % -2 = 1.
    let out = ew32(
        "div.s32 %r5, %r1, %r2;\n\trem.s32 %r6, %r1, %r2;\n\tprmt.b32 %r4, %r5, %r6, 0x5410;",
        &[-7i32 as u32, 7],
        &[2, -2i32 as u32],
        &[0, 0],
    );
    assert_eq!(out, [(-1i32 as u32 & 0xFFFF) << 16 | (-3i32 as u32 & 0xFFFF), (1 << 16) | (-3i32 as u32 & 0xFFFF)]);
}

/// "Integer Arithmetic Instructions: min", "max" (signed and unsigned compare).
#[test]
fn min_max() {
    ops_pairs("min.s32 %r4, %r1, %r2;", |a, b| Some((a as i32).min(b as i32) as u32));
    ops_pairs("max.s32 %r4, %r1, %r2;", |a, b| Some((a as i32).max(b as i32) as u32));
    ops_pairs("min.u32 %r4, %r1, %r2;", |a, b| Some(a.min(b)));
    ops_pairs("max.u32 %r4, %r1, %r2;", |a, b| Some(a.max(b)));
}

/// "Logic and Shift Instructions: shl", "shr": "Shift amounts greater than the register width N
/// are clamped to N"; `shr` on signed types fills with the sign bit, on unsigned with zeros.
#[test]
fn shifts_clamp() {
    let mut rng = Rng::new(2);
    let mut a = Vec::new();
    let mut b = Vec::new();
    for x in edge_u32(&mut rng, 8) {
        for s in [0u32, 1, 5, 31, 32, 33, 63, 64, 100, 0x8000_0000, u32::MAX] {
            a.push(x);
            b.push(s);
        }
    }
    let c = vec![0; a.len()];
    let shl = ew32("shl.b32 %r4, %r1, %r2;", &a, &b, &c);
    let shru = ew32("shr.u32 %r4, %r1, %r2;", &a, &b, &c);
    let shrs = ew32("shr.s32 %r4, %r1, %r2;", &a, &b, &c);
    for i in 0..a.len() {
        let n = b[i].min(32);
        let want_shl = if n >= 32 { 0 } else { a[i] << n };
        let want_shru = if n >= 32 { 0 } else { a[i] >> n };
        let want_shrs = ((a[i] as i32) >> n.min(31)) as u32;
        assert_eq!(shl[i], want_shl, "shl {:#x} {}", a[i], b[i]);
        assert_eq!(shru[i], want_shru, "shr.u32 {:#x} {}", a[i], b[i]);
        assert_eq!(shrs[i], want_shrs, "shr.s32 {:#x} {}", a[i], b[i]);
    }
    // 64-bit: the shift amount is a .u32 operand, clamped to 64.
    let a64: Vec<u64> = (0..a.len()).map(|i| (a[i] as u64) << 32 | 0x8765_4321).collect();
    let b64: Vec<u64> = b.iter().map(|&s| s as u64).collect();
    let z = vec![0u64; a64.len()];
    let shl64 = ew64("cvt.u32.u64 %r30, %rd12;\n\tshl.b64 %rd14, %rd11, %r30;", &a64, &b64, &z);
    let shr64 = ew64("cvt.u32.u64 %r30, %rd12;\n\tshr.s64 %rd14, %rd11, %r30;", &a64, &b64, &z);
    for i in 0..a64.len() {
        let n = b[i].min(64);
        assert_eq!(shl64[i], if n >= 64 { 0 } else { a64[i] << n }, "shl.b64 {:#x} {}", a64[i], b[i]);
        assert_eq!(shr64[i], ((a64[i] as i64) >> n.min(63)) as u64, "shr.s64 {:#x} {}", a64[i], b[i]);
    }
}

/// The ISA's pseudo-code for "Integer Arithmetic Instructions: bfe".
fn bfe_ref(a: u64, b: u32, c: u32, bits: u32, signed: bool) -> u64 {
    let msb = bits - 1;
    let pos = b & 0xff;
    let len = c & 0xff;
    let sbit = if !signed || len == 0 { 0 } else { (a >> (pos + len - 1).min(msb)) & 1 };
    let mut d = 0u64;
    for i in 0..=msb {
        let bit = if i < len && pos + i <= msb { (a >> (pos + i)) & 1 } else { sbit };
        d |= bit << i;
    }
    d
}

/// The ISA's pseudo-code for "Integer Arithmetic Instructions: bfi".
fn bfi_ref(a: u64, b: u64, c: u32, d: u32, bits: u32) -> u64 {
    let msb = bits - 1;
    let pos = c & 0xff;
    let len = d & 0xff;
    let mut f = b;
    let mut i = 0;
    while i < len && pos + i <= msb {
        f = (f & !(1 << (pos + i))) | (((a >> i) & 1) << (pos + i));
        i += 1;
    }
    f
}

/// "Integer Arithmetic Instructions: bfe" and "bfi": positions and lengths over the whole 0..255
/// range (pos + len past the msb, len 0, garbage in the upper bits of b/c, which the ISA masks).
#[test]
fn bfe_bfi_edges() {
    let mut rng = Rng::new(3);
    let mut a = Vec::new();
    let mut pl = Vec::new();
    let mut other = Vec::new();
    for x in edge_u32(&mut rng, 6) {
        for pos in [0u32, 1, 7, 16, 31, 32, 40, 200, 255] {
            for len in [0u32, 1, 8, 16, 31, 32, 33, 255] {
                a.push(x);
                // pos in bits 0..8, len in bits 8..16, noise above.
                pl.push(pos | len << 8 | (rng.next_u32() & 0xFFFF_0000));
                other.push(rng.next_u32());
            }
        }
    }
    let bfe_u = ew32("shr.b32 %r5, %r2, 8;\n\tbfe.u32 %r4, %r1, %r2, %r5;", &a, &pl, &other);
    let bfe_s = ew32("shr.b32 %r5, %r2, 8;\n\tbfe.s32 %r4, %r1, %r2, %r5;", &a, &pl, &other);
    let bfi = ew32("shr.b32 %r5, %r2, 8;\n\tbfi.b32 %r4, %r1, %r3, %r2, %r5;", &a, &pl, &other);
    for i in 0..a.len() {
        let (p, l) = (pl[i], pl[i] >> 8);
        assert_eq!(
            bfe_u[i] as u64,
            bfe_ref(a[i] as u64, p, l, 32, false),
            "bfe.u32 {:#x} pos {} len {}",
            a[i],
            p & 255,
            l & 255
        );
        assert_eq!(
            bfe_s[i] as u64,
            bfe_ref(a[i] as u64, p, l, 32, true),
            "bfe.s32 {:#x} pos {} len {}",
            a[i],
            p & 255,
            l & 255
        );
        assert_eq!(
            bfi[i] as u64,
            bfi_ref(a[i] as u64, other[i] as u64, p, l, 32),
            "bfi {:#x} into {:#x} pos {} len {}",
            a[i],
            other[i],
            p & 255,
            l & 255
        );
    }
    // 64-bit forms.
    let a64 = rng.vec_u64(64);
    let pl64: Vec<u64> =
        (0..64).map(|i| [0u64, 5, 33, 63, 64, 100][i % 6] | [0u64, 1, 20, 40, 64, 70, 0][i % 7] << 8).collect();
    let b64 = rng.vec_u64(64);
    let bfe64 = ew64(
        "cvt.u32.u64 %r30, %rd12;\n\tshr.b32 %r31, %r30, 8;\n\tbfe.s64 %rd14, %rd11, %r30, %r31;",
        &a64,
        &pl64,
        &b64,
    );
    let bfi64 = ew64(
        "cvt.u32.u64 %r30, %rd12;\n\tshr.b32 %r31, %r30, 8;\n\tbfi.b64 %rd14, %rd11, %rd13, %r30, %r31;",
        &a64,
        &pl64,
        &b64,
    );
    for i in 0..64 {
        let (p, l) = (pl64[i] as u32, (pl64[i] >> 8) as u32);
        assert_eq!(bfe64[i], bfe_ref(a64[i], p, l, 64, true), "bfe.s64 pos {p} len {l}");
        assert_eq!(bfi64[i], bfi_ref(a64[i], b64[i], p, l, 64), "bfi.b64 pos {} len {}", p & 255, l & 255);
    }
}

/// "Data Movement and Conversion Instructions: prmt", generic mode: the bytes of {b, a} are
/// numbered b7..b4 (b) and b3..b0 (a); result byte k takes selector nibble c[4k+3:4k]: its low 3
/// bits pick the byte, and with bit 3 set the byte's sign bit is replicated (the "msb" form).
#[test]
fn prmt_generic() {
    let mut rng = Rng::new(4);
    let n = 2048;
    let a = rng.vec_u32(n);
    let b = rng.vec_u32(n);
    let c = rng.vec_u32(n);
    let out = ew32("prmt.b32 %r4, %r1, %r2, %r3;", &a, &b, &c);
    for i in 0..n {
        let bytes = (b[i] as u64) << 32 | a[i] as u64;
        let mut want = 0u32;
        for k in 0..4 {
            let s = (c[i] >> (4 * k)) & 0xF;
            let v = ((bytes >> (8 * (s & 7))) & 0xFF) as u32;
            let v = if s & 8 != 0 {
                if v & 0x80 != 0 {
                    0xFF
                } else {
                    0
                }
            } else {
                v
            };
            want |= v << (8 * k);
        }
        assert_eq!(out[i], want, "prmt {:#x} {:#x} {:#x}", a[i], b[i], c[i]);
    }
    // Immediate selectors as nvcc writes them (decimal): 0x5410 packs the low halves.
    let out = ew32("prmt.b32 %r4, %r1, %r2, 21520;", &[0x1111_2222], &[0x3333_4444], &[0]);
    assert_eq!(out, [0x4444_2222]);
}

/// "Data Movement and Conversion Instructions: prmt", the table of the named modes: for each
/// mode and selector c[1:0], the source byte numbers of d.b3 d.b2 d.b1 d.b0.
#[test]
fn prmt_modes() {
    #[rustfmt::skip]
    let table: [(&str, [[u32; 4]; 4]); 6] = [
        ("f4e",  [[3, 2, 1, 0], [4, 3, 2, 1], [5, 4, 3, 2], [6, 5, 4, 3]]),
        ("b4e",  [[5, 6, 7, 0], [6, 7, 0, 1], [7, 0, 1, 2], [0, 1, 2, 3]]),
        ("rc8",  [[0, 0, 0, 0], [1, 1, 1, 1], [2, 2, 2, 2], [3, 3, 3, 3]]),
        ("ecl",  [[3, 2, 1, 0], [3, 2, 1, 1], [3, 2, 2, 2], [3, 3, 3, 3]]),
        ("ecr",  [[0, 0, 0, 0], [1, 1, 1, 0], [2, 2, 1, 0], [3, 2, 1, 0]]),
        ("rc16", [[1, 0, 1, 0], [3, 2, 3, 2], [1, 0, 1, 0], [3, 2, 3, 2]]),
    ];
    let a = vec![0x0302_0100u32; 8];
    let b = vec![0x0706_0504u32; 8];
    // Selectors 0..3, and again with noise above bit 1 (only c[1:0] counts).
    let c: Vec<u32> = (0..8u32).map(|i| (i & 3) | if i >= 4 { 0xABCD_EF00 } else { 0 }).collect();
    for (mode, rows) in table {
        let out = ew32(&format!("prmt.b32.{mode} %r4, %r1, %r2, %r3;"), &a, &b, &c);
        for i in 0..8 {
            let r = rows[i & 3];
            // Byte j of {b, a} is the value j here, so d is the byte numbers themselves.
            let want = r[0] << 24 | r[1] << 16 | r[2] << 8 | r[3];
            assert_eq!(out[i], want, "prmt.{mode} selector {}", i & 3);
        }
    }
}

/// "Logic and Shift Instructions: lop3": bit i of d is bit (a_i·4 + b_i·2 + c_i) of immLut, for
/// all 256 LUTs over random operands (one launch, one store per LUT).
#[test]
fn lop3_all_luts() {
    let n = 64usize;
    let mut rng = Rng::new(5);
    let (a, b, c) = (rng.vec_u32(n), rng.vec_u32(n), rng.vec_u32(n));
    let mut body = String::from("\tadd.s64 %rd30, %rd1, %rd5;\n");
    for lut in 0..256 {
        body.push_str(&format!(
            "\tlop3.b32 %r5, %r1, %r2, %r3, {lut};\n\tst.global.u32 [%rd30+{}], %r5;\n",
            lut * n * 4 + n * 4
        ));
    }
    let d = Dev::new();
    let (pa, pb, pc, po) = (d.upload(&a), d.upload(&b), d.upload(&c), d.zeros(257 * n * 4));
    d.run(
        &ew32_ptx(&body),
        "ew",
        1,
        n as u32,
        &[Arg::Ptr(po), Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::U32(n as u32)],
    );
    let out: Vec<u32> = d.read(po, 257 * n);
    for lut in 0..256u32 {
        for i in 0..n {
            let mut want = 0u32;
            for bit in 0..32 {
                let idx = ((a[i] >> bit) & 1) << 2 | ((b[i] >> bit) & 1) << 1 | ((c[i] >> bit) & 1);
                want |= ((lut >> idx) & 1) << bit;
            }
            assert_eq!(out[(lut as usize + 1) * n + i], want, "lop3 lut {lut:#x}");
        }
    }
}

/// "Logic and Shift Instructions: shf": `n = clamp ? min(c, 32) : c & 0x1f`; `shf.l` gives
/// `(b << n) | (a >> (32-n))`, `shf.r` gives `(b << (32-n)) | (a >> n)` (the 64-bit {b,a}).
#[test]
fn shf_wrap_clamp() {
    let mut rng = Rng::new(6);
    let mut a = Vec::new();
    let mut b = Vec::new();
    let mut c = Vec::new();
    for s in [0u32, 1, 4, 16, 31, 32, 33, 40, 63, 64, 200, u32::MAX] {
        for _ in 0..8 {
            a.push(rng.next_u32());
            b.push(rng.next_u32());
            c.push(s);
        }
    }
    for (form, left, clamp) in
        [("l.wrap", true, false), ("l.clamp", true, true), ("r.wrap", false, false), ("r.clamp", false, true)]
    {
        let out = ew32(&format!("shf.{form}.b32 %r4, %r1, %r2, %r3;"), &a, &b, &c);
        for i in 0..a.len() {
            let n = if clamp { c[i].min(32) } else { c[i] & 31 };
            let v = (b[i] as u64) << 32 | a[i] as u64;
            let want = if left { ((v << n) >> 32) as u32 } else { (v >> n) as u32 };
            assert_eq!(out[i], want, "shf.{form} a={:#x} b={:#x} c={}", a[i], b[i], c[i]);
        }
    }
}

/// "Integer Arithmetic Instructions: popc", "clz", "brev", "bfind" (with `.shiftamt`; no set bit
/// gives 0xFFFFFFFF; for signed types bfind finds the most significant non-sign bit).
#[test]
fn popc_clz_brev_bfind() {
    let mut rng = Rng::new(7);
    let a = edge_u32(&mut rng, 64);
    let z = vec![0; a.len()];
    let popc = ew32("popc.b32 %r4, %r1;", &a, &z, &z);
    let clz = ew32("clz.b32 %r4, %r1;", &a, &z, &z);
    let brev = ew32("brev.b32 %r4, %r1;", &a, &z, &z);
    let bfu = ew32("bfind.u32 %r4, %r1;", &a, &z, &z);
    let bfs = ew32("bfind.s32 %r4, %r1;", &a, &z, &z);
    let bfsh = ew32("bfind.shiftamt.u32 %r4, %r1;", &a, &z, &z);
    for i in 0..a.len() {
        let x = a[i];
        assert_eq!(popc[i], x.count_ones());
        assert_eq!(clz[i], x.leading_zeros());
        assert_eq!(brev[i], x.reverse_bits());
        assert_eq!(bfu[i], if x == 0 { u32::MAX } else { 31 - x.leading_zeros() }, "bfind.u32 {x:#x}");
        let y = if (x as i32) < 0 { !x } else { x };
        assert_eq!(bfs[i], if y == 0 { u32::MAX } else { 31 - y.leading_zeros() }, "bfind.s32 {x:#x}");
        assert_eq!(bfsh[i], if x == 0 { u32::MAX } else { x.leading_zeros() }, "bfind.shiftamt.u32 {x:#x}");
    }
    let a64: Vec<u64> = rng.vec_u64(32).into_iter().chain([0, 1, u64::MAX, 1 << 63]).collect();
    let z64 = vec![0u64; a64.len()];
    let p64 = ew64("popc.b64 %r30, %rd11;\n\tclz.b64 %r31, %rd11;\n\tmov.b64 %rd14, {%r30, %r31};", &a64, &z64, &z64);
    let br64 = ew64("brev.b64 %rd14, %rd11;", &a64, &z64, &z64);
    for i in 0..a64.len() {
        assert_eq!(p64[i], (a64[i].leading_zeros() as u64) << 32 | a64[i].count_ones() as u64);
        assert_eq!(br64[i], a64[i].reverse_bits());
    }
}

/// "Comparison and Selection Instructions: setp": signed (`lt`) vs unsigned (`lo`) orderings,
/// and `setp.CmpOp.BoolOp p|q, a, b, {!}c`: `p = (a CmpOp b) BoolOp c`, `q = !(a CmpOp b) BoolOp c`.
#[test]
fn setp_signed_unsigned_boolop() {
    let mut rng = Rng::new(8);
    let xs = edge_u32(&mut rng, 6);
    let (a, b) = pairs(&xs);
    let c: Vec<u32> = (0..a.len()).map(|i| (i % 3) as u32).collect();
    let cmps: [(&str, fn(u32, u32) -> bool); 14] = [
        ("eq.s32", |a, b| a == b),
        ("ne.s32", |a, b| a != b),
        ("lt.s32", |a, b| (a as i32) < b as i32),
        ("le.s32", |a, b| a as i32 <= b as i32),
        ("gt.s32", |a, b| a as i32 > b as i32),
        ("ge.s32", |a, b| a as i32 >= b as i32),
        ("lt.u32", |a, b| a < b),
        ("le.u32", |a, b| a <= b),
        ("gt.u32", |a, b| a > b),
        ("ge.u32", |a, b| a >= b),
        ("lo.u32", |a, b| a < b),
        ("ls.u32", |a, b| a <= b),
        ("hi.u32", |a, b| a > b),
        ("hs.u32", |a, b| a >= b),
    ];
    let mut body = String::new();
    for (k, (cmp, _)) in cmps.iter().enumerate() {
        body.push_str(&format!(
            "\tsetp.{cmp} %p1, %r1, %r2;\n\tselp.u32 %r5, {}, 0, %p1;\n\tor.b32 %r4, %r4, %r5;\n",
            1u32 << k
        ));
    }
    let out = ew32(&body, &a, &b, &c);
    for i in 0..a.len() {
        let want: u32 = cmps.iter().enumerate().map(|(k, (_, f))| (f(a[i], b[i]) as u32) << k).sum();
        assert_eq!(out[i], want, "a={:#x} b={:#x}", a[i], b[i]);
    }
    // BoolOp with a negated predicate operand, both destinations.
    for (bop, f) in [("and", (|x, y| x && y) as fn(bool, bool) -> bool), ("or", |x, y| x || y), ("xor", |x, y| x ^ y)] {
        let body = format!(
            "\tsetp.ne.s32 %p2, %r3, 0;\n\tsetp.lt.s32.{bop} %p3|%p4, %r1, %r2, !%p2;\n\tselp.u32 %r5, 1, 0, %p3;\n\tselp.u32 %r6, 2, 0, %p4;\n\tor.b32 %r4, %r5, %r6;\n"
        );
        let out = ew32(&body, &a, &b, &c);
        for i in 0..a.len() {
            let t = (a[i] as i32) < b[i] as i32;
            let cv = c[i] == 0; // !(c != 0)
            let want = f(t, cv) as u32 | (f(!t, cv) as u32) << 1;
            assert_eq!(out[i], want, "setp.lt.s32.{bop} a={:#x} b={:#x} c={}", a[i], b[i], c[i]);
        }
    }
}

/// "Comparison and Selection Instructions: selp" and guarded execution ("Instruction
/// Statements: Predicates": `@p` executes where p is true, `@!p` where it is false; a guarded-off
/// instruction leaves its destination unchanged).
#[test]
fn selp_and_guards() {
    let a: Vec<u32> = (0..64).collect();
    let b: Vec<u32> = (0..64).map(|i| 1000 + i).collect();
    let c: Vec<u32> = (0..64).map(|i| i % 2).collect();
    let out = ew32("setp.ne.u32 %p1, %r3, 0;\n\tselp.b32 %r4, %r1, %r2, %p1;", &a, &b, &c);
    for i in 0..64 {
        assert_eq!(out[i], if c[i] != 0 { a[i] } else { b[i] });
    }
    let out = ew32(
        "mov.u32 %r4, 7;\n\tsetp.ne.u32 %p1, %r3, 0;\n\t@%p1 add.u32 %r4, %r4, %r1;\n\t@!%p1 mul.lo.u32 %r4, %r4, %r2;\n\t@%p1 bra $L__skip;\n\tadd.u32 %r4, %r4, 1;\n$L__skip:",
        &a,
        &b,
        &c,
    );
    for i in 0..64 {
        assert_eq!(out[i], if c[i] != 0 { 7 + a[i] } else { 7 * b[i] + 1 }, "lane {i}");
    }
}

/// 64-bit integer arithmetic: "add", "mul" (.lo/.hi on .u64/.s64), "div", "rem" (signed, C
/// semantics), "min"/"max".
#[test]
fn int64_arith() {
    let mut rng = Rng::new(9);
    let mut xs: Vec<u64> = vec![0, 1, 2, 7, u64::MAX, 1 << 63, (1 << 63) - 1, 0xFFFF_FFFF, 1 << 32];
    xs.extend(rng.vec_u64(8));
    xs.extend((0..4).map(|_| rng.below(1000)));
    let mut a = Vec::new();
    let mut b = Vec::new();
    for &x in &xs {
        for &y in &xs {
            a.push(x);
            b.push(y);
        }
    }
    let z = vec![0u64; a.len()];
    type F = fn(u64, u64) -> Option<u64>;
    let ops: [(&str, F); 9] = [
        ("add.s64 %rd14, %rd11, %rd12;", |a, b| Some(a.wrapping_add(b))),
        ("mul.lo.u64 %rd14, %rd11, %rd12;", |a, b| Some(a.wrapping_mul(b))),
        ("mul.hi.u64 %rd14, %rd11, %rd12;", |a, b| Some(((a as u128 * b as u128) >> 64) as u64)),
        ("mul.hi.s64 %rd14, %rd11, %rd12;", |a, b| Some(((a as i64 as i128 * b as i64 as i128) >> 64) as u64)),
        ("div.u64 %rd14, %rd11, %rd12;", |a, b| (b != 0).then(|| a / b)),
        ("rem.u64 %rd14, %rd11, %rd12;", |a, b| (b != 0).then(|| a % b)),
        ("div.s64 %rd14, %rd11, %rd12;", |a, b| {
            (b != 0 && !(a == 1 << 63 && b == u64::MAX)).then(|| (a as i64 / b as i64) as u64)
        }),
        ("rem.s64 %rd14, %rd11, %rd12;", |a, b| {
            (b != 0 && !(a == 1 << 63 && b == u64::MAX)).then(|| (a as i64 % b as i64) as u64)
        }),
        ("min.s64 %rd14, %rd11, %rd12;", |a, b| Some((a as i64).min(b as i64) as u64)),
    ];
    for (inst, f) in ops {
        let out = ew64(inst, &a, &b, &z);
        for i in 0..a.len() {
            if let Some(w) = f(a[i], b[i]) {
                assert_eq!(out[i], w, "`{inst}` {:#x} {:#x}", a[i], b[i]);
            }
        }
    }
}

/// "cvt" between integer types: widening sign- or zero-extends by the source type, narrowing
/// truncates, `.sat` clamps to the destination range; 16-bit arithmetic wraps at 16 bits.
#[test]
fn int_cvt_and_16bit() {
    let a: Vec<u32> =
        vec![0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x1_2345, 0x8000_0000, 0xFFFF_FFFF, 300, (-300i32) as u32];
    let z = vec![0; a.len()];
    let run = |body: &str| ew32(body, &a, &z, &z);
    let s8 = run("cvt.u8.u32 %rs1, %r1;\n\tcvt.s32.s8 %r4, %rs1;");
    let u16 = run("cvt.u16.u32 %rs1, %r1;\n\tcvt.u32.u16 %r4, %rs1;");
    let s16 = run("cvt.u16.u32 %rs1, %r1;\n\tcvt.s32.s16 %r4, %rs1;");
    let sat_s8 = run("cvt.sat.s8.s32 %rs1, %r1;\n\tcvt.s32.s8 %r4, %rs1;");
    let sat_u8 = run("cvt.sat.u8.s32 %rs1, %r1;\n\tcvt.u32.u8 %r4, %rs1;");
    let sat_u16 = run("cvt.sat.u16.u32 %rs1, %r1;\n\tcvt.u32.u16 %r4, %rs1;");
    let add16 = run(
        "cvt.u16.u32 %rs1, %r1;\n\tadd.u16 %rs2, %rs1, 0x8001;\n\tmul.lo.s16 %rs3, %rs2, 3;\n\tcvt.u32.u16 %r4, %rs3;",
    );
    let wide = run("cvt.s64.s32 %rd30, %r1;\n\tshr.u64 %rd31, %rd30, 32;\n\tcvt.u32.u64 %r4, %rd31;");
    for i in 0..a.len() {
        let x = a[i];
        assert_eq!(s8[i], x as u8 as i8 as i32 as u32, "cvt.s32.s8 {x:#x}");
        assert_eq!(u16[i], x & 0xFFFF);
        assert_eq!(s16[i], x as u16 as i16 as i32 as u32);
        assert_eq!(sat_s8[i], (x as i32).clamp(-128, 127) as u32, "cvt.sat.s8.s32 {x:#x}");
        assert_eq!(sat_u8[i], (x as i32).clamp(0, 255) as u32, "cvt.sat.u8.s32 {x:#x}");
        assert_eq!(sat_u16[i], x.min(0xFFFF), "cvt.sat.u16.u32 {x:#x}");
        assert_eq!(add16[i], ((x as u16).wrapping_add(0x8001).wrapping_mul(3)) as u32);
        assert_eq!(wide[i], if (x as i32) < 0 { u32::MAX } else { 0 });
    }
}

/// "Integer Arithmetic Instructions: dp4a, dp2a": `d = c + Σ a.byte[i] * b.byte[i]` with each
/// operand's bytes sign- or zero-extended by its type; `dp2a.lo/.hi` use the low/high bytes of b
/// against the two halves of a.
#[test]
fn dp4a_dp2a() {
    let mut rng = Rng::new(10);
    let n = 512;
    let (a, b, c) = (rng.vec_u32(n), rng.vec_u32(n), rng.vec_u32(n));
    for (ta, tb) in [("u32", "u32"), ("s32", "s32"), ("s32", "u32"), ("u32", "s32")] {
        let out = ew32(&format!("dp4a.{ta}.{tb} %r4, %r1, %r2, %r3;"), &a, &b, &c);
        for i in 0..n {
            let byte = |v: u32, k: u32, s: bool| -> i64 {
                let x = (v >> (8 * k)) & 0xFF;
                if s {
                    x as u8 as i8 as i64
                } else {
                    x as i64
                }
            };
            let dot: i64 = (0..4).map(|k| byte(a[i], k, ta == "s32") * byte(b[i], k, tb == "s32")).sum();
            assert_eq!(out[i], (c[i] as i64).wrapping_add(dot) as u32, "dp4a.{ta}.{tb}");
        }
    }
    for part in ["lo", "hi"] {
        let out = ew32(&format!("dp2a.{part}.s32.s32 %r4, %r1, %r2, %r3;"), &a, &b, &c);
        for i in 0..n {
            let half = |v: u32, k: u32| ((v >> (16 * k)) & 0xFFFF) as u16 as i16 as i64;
            let base = if part == "lo" { 0 } else { 2 };
            let byte = |v: u32, k: u32| ((v >> (8 * k)) & 0xFF) as u8 as i8 as i64;
            let dot = half(a[i], 0) * byte(b[i], base) + half(a[i], 1) * byte(b[i], base + 1);
            assert_eq!(out[i], (c[i] as i64).wrapping_add(dot) as u32, "dp2a.{part}");
        }
    }
}

/// Predicate logic ("Logic and Shift Instructions: and, or, xor, not" on `.pred`, "cnot") and
/// integer `abs`/`neg` at the edges (abs(INT_MIN) wraps).
#[test]
fn pred_logic_abs_neg_cnot() {
    let a: Vec<u32> = (0..16).collect();
    let z = vec![0; 16];
    let body = "and.b32 %r5, %r1, 1;\n\tsetp.ne.u32 %p1, %r5, 0;\n\tand.b32 %r5, %r1, 2;\n\tsetp.ne.u32 %p2, %r5, 0;\n\tand.pred %p3, %p1, %p2;\n\tor.pred %p4, %p1, %p2;\n\txor.pred %p5, %p1, %p2;\n\tnot.pred %p6, %p1;\n\tselp.u32 %r6, 1, 0, %p3;\n\tselp.u32 %r7, 2, 0, %p4;\n\tselp.u32 %r8, 4, 0, %p5;\n\tselp.u32 %r9, 8, 0, %p6;\n\tor.b32 %r4, %r6, %r7;\n\tor.b32 %r4, %r4, %r8;\n\tor.b32 %r4, %r4, %r9;";
    let out = ew32(body, &a, &z, &z);
    for i in 0..16 {
        let (p, q) = (i & 1 != 0, i & 2 != 0);
        assert_eq!(out[i], (p && q) as u32 | ((p || q) as u32) << 1 | ((p ^ q) as u32) << 2 | (!p as u32) << 3);
    }
    let a = vec![0u32, 1, 5, 0x8000_0000, 0xFFFF_FFFF, 0x7FFF_FFFF];
    let z = vec![0; a.len()];
    let abs = ew32("abs.s32 %r4, %r1;", &a, &z, &z);
    let neg = ew32("neg.s32 %r4, %r1;", &a, &z, &z);
    let cnot = ew32("cnot.b32 %r4, %r1;", &a, &z, &z);
    for i in 0..a.len() {
        assert_eq!(abs[i], (a[i] as i32).wrapping_abs() as u32);
        assert_eq!(neg[i], (a[i] as i32).wrapping_neg() as u32);
        assert_eq!(cnot[i], (a[i] == 0) as u32);
    }
}

/// "add/sub" `.sat.s32` (clamps to the s32 range), "mul24/mad24" `.lo` (24-bit operands),
/// 16-bit shifts.
#[test]
fn sat_mul24_shift16() {
    let mut rng = Rng::new(11);
    let xs = edge_u32(&mut rng, 10);
    let (a, b) = pairs(&xs);
    let c = vec![0; a.len()];
    let adds = ew32("add.sat.s32 %r4, %r1, %r2;", &a, &b, &c);
    let subs = ew32("sub.sat.s32 %r4, %r1, %r2;", &a, &b, &c);
    let m24u = ew32("mul24.lo.u32 %r4, %r1, %r2;", &a, &b, &c);
    let m24s = ew32("mul24.lo.s32 %r4, %r1, %r2;", &a, &b, &c);
    let sh16 = ew32("cvt.u16.u32 %rs1, %r1;\n\tand.b32 %r5, %r2, 31;\n\tshl.b16 %rs2, %rs1, %r5;\n\tshr.s16 %rs3, %rs1, %r5;\n\tmov.b32 %r4, {%rs2, %rs3};", &a, &b, &c);
    for i in 0..a.len() {
        let (x, y) = (a[i] as i32 as i64, b[i] as i32 as i64);
        assert_eq!(adds[i], (x + y).clamp(i32::MIN as i64, i32::MAX as i64) as i32 as u32);
        assert_eq!(subs[i], (x - y).clamp(i32::MIN as i64, i32::MAX as i64) as i32 as u32);
        assert_eq!(m24u[i], ((a[i] & 0xFF_FFFF) as u64 * (b[i] & 0xFF_FFFF) as u64) as u32, "mul24.lo.u32");
        let s24 = |v: u32| ((v << 8) as i32 >> 8) as i64;
        assert_eq!(m24s[i], (s24(a[i]) * s24(b[i])) as u32, "mul24.lo.s32 {:#x} {:#x}", a[i], b[i]);
        let n = b[i] & 31;
        let h = a[i] as u16;
        let shl = if n >= 16 { 0 } else { h << n };
        let shr = (h as i16 >> n.min(15)) as u16;
        assert_eq!(sh16[i], shl as u32 | (shr as u32) << 16, "16-bit shifts {h:#x} by {n}");
    }
}
