//! Warp-level matrix instructions, from the PTX ISA 9.x text: "Warp-level Matrix Multiply-
//! Accumulate Instructions: mma" with the fragment tables of "Matrix Fragments for
//! mma.m16n8k16 with floating point type" and "Matrix Fragments for mma.m16n8k8" (g = laneid >> 2,
//! t = laneid % 4, lower element in the lower half of each .b32), and "Warp-level matrix load
//! instruction: ldmatrix" / "Warp-level matrix store instruction: stmatrix". The host packs
//! fragments from the tables, the simulator multiplies, and the host unpacks the result through
//! the same tables and compares with a plain f64 matrix product, bit for bit (the inputs are
//! small integers times powers of two, so every product and sum is exact).

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;

#[derive(Clone, Copy, PartialEq)]
enum T {
    F16,
    BF16,
}

fn enc(t: T, x: f32) -> u32 {
    (match t {
        T::F16 => f16_bits(x),
        T::BF16 => bf16_bits(x),
    }) as u32
}

/// A (16×k, row) fragment element positions of register `r`, half `h` for lane `l`.
fn a_pos(k: usize, l: usize, r: usize, h: usize) -> (usize, usize) {
    let (g, t) = (l / 4, l % 4);
    let i = 2 * r + h; // element a_i
    if k == 16 {
        let row = if matches!(i, 0 | 1 | 4 | 5) { g } else { g + 8 };
        let col = 2 * t + (i & 1) + if i >= 4 { 8 } else { 0 };
        (row, col)
    } else {
        (if i < 2 { g } else { g + 8 }, 2 * t + (i & 1))
    }
}

/// B (k×8, col) fragment: element b_i of lane l is at (row k, col n).
fn b_pos(l: usize, r: usize, h: usize) -> (usize, usize) {
    let (g, t) = (l / 4, l % 4);
    let i = 2 * r + h;
    (2 * t + (i & 1) + if i >= 2 { 8 } else { 0 }, g)
}

/// C/D (16×8) element c_i of lane l.
fn c_pos(l: usize, i: usize) -> (usize, usize) {
    let (g, t) = (l / 4, l % 4);
    (if i < 2 { g } else { g + 8 }, 2 * t + (i & 1))
}

fn mma_ptx(shape: &str, k: usize, f32acc: bool, ty: &str) -> String {
    let (na, nb) = if k == 16 { (4, 2) } else { (2, 1) };
    let nc = if f32acc { 4 } else { 2 };
    let mut s = format!(
        ".visible .entry mma_k(\n\t.param .u64 mma_k_param_0,\n\t.param .u64 mma_k_param_1,\n\t.param .u64 mma_k_param_2,\n\t.param .u64 mma_k_param_3\n)\n{{\n{REGS}\tld.param.u64 %rd1, [mma_k_param_0];\n\tld.param.u64 %rd2, [mma_k_param_1];\n\tld.param.u64 %rd3, [mma_k_param_2];\n\tld.param.u64 %rd4, [mma_k_param_3];\n\tmov.u32 %r1, %ctaid.x;\n\tmov.u32 %r2, %tid.x;\n\tshl.b32 %r3, %r1, 5;\n\tadd.s32 %r3, %r3, %r2;\n\tmul.wide.u32 %rd10, %r3, 16;\n\tadd.s64 %rd11, %rd1, %rd10;\n\tadd.s64 %rd12, %rd2, %rd10;\n\tadd.s64 %rd13, %rd3, %rd10;\n\tadd.s64 %rd14, %rd4, %rd10;\n"
    );
    for i in 0..na {
        s += &format!("\tld.global.u32 %r{}, [%rd11+{}];\n", 10 + i, 4 * i);
    }
    for i in 0..nb {
        s += &format!("\tld.global.u32 %r{}, [%rd12+{}];\n", 20 + i, 4 * i);
    }
    let (creg, dreg) = if f32acc { ("%f", "%f") } else { ("%r", "%r") };
    let cbase = if f32acc { 1 } else { 30 };
    let dbase = if f32acc { 11 } else { 40 };
    for i in 0..nc {
        s += &format!("\tld.global.{} {creg}{}, [%rd13+{}];\n", if f32acc { "f32" } else { "b32" }, cbase + i, 4 * i);
    }
    let list = |p: &str, b: usize, n: usize| (0..n).map(|i| format!("{p}{}", b + i)).collect::<Vec<_>>().join(", ");
    let types = if f32acc { format!("f32.{ty}.{ty}.f32") } else { format!("{ty}.{ty}.{ty}.{ty}") };
    s += &format!(
        "\tmma.sync.aligned.{shape}.row.col.{types} {{{}}}, {{{}}}, {{{}}}, {{{}}};\n",
        list(dreg, dbase, nc),
        list("%r", 10, na),
        list("%r", 20, nb),
        list(creg, cbase, nc)
    );
    for i in 0..nc {
        s += &format!("\tst.global.{} [%rd14+{}], {dreg}{};\n", if f32acc { "f32" } else { "b32" }, 4 * i, dbase + i);
    }
    s + "\tret;\n}\n"
}

fn check_mma(k: usize, t: T, f32acc: bool, problems: usize, seed: u64) {
    let shape = if k == 16 { "m16n8k16" } else { "m16n8k8" };
    let ty = if t == T::F16 { "f16" } else { "bf16" };
    let mut rng = Rng::new(seed);
    let val = |rng: &mut Rng| -> f32 {
        if f32acc {
            (rng.below(9) as f32 - 4.0) * 2f32.powi(rng.below(5) as i32 - 2)
        } else {
            rng.below(7) as f32 - 3.0
        }
    };
    let lanes = problems * 32;
    let (mut fa, mut fb, mut fc) = (vec![0u32; lanes * 4], vec![0u32; lanes * 4], vec![0u32; lanes * 4]);
    let mut mats = Vec::new();
    for p in 0..problems {
        let a: Vec<Vec<f32>> = (0..16).map(|_| (0..k).map(|_| val(&mut rng)).collect()).collect();
        let b: Vec<Vec<f32>> = (0..k).map(|_| (0..8).map(|_| val(&mut rng)).collect()).collect();
        let c: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| val(&mut rng)).collect()).collect();
        for l in 0..32 {
            let base = (p * 32 + l) * 4;
            for r in 0..k / 4 {
                let (x0, y0) = a_pos(k, l, r, 0);
                let (x1, y1) = a_pos(k, l, r, 1);
                fa[base + r] = enc(t, a[x0][y0]) | enc(t, a[x1][y1]) << 16;
            }
            for r in 0..k / 8 {
                let (x0, y0) = b_pos(l, r, 0);
                let (x1, y1) = b_pos(l, r, 1);
                fb[base + r] = enc(t, b[x0][y0]) | enc(t, b[x1][y1]) << 16;
            }
            if f32acc {
                for i in 0..4 {
                    let (x, y) = c_pos(l, i);
                    fc[base + i] = c[x][y].to_bits();
                }
            } else {
                for r in 0..2 {
                    let (x0, y0) = c_pos(l, 2 * r);
                    let (x1, y1) = c_pos(l, 2 * r + 1);
                    fc[base + r] = enc(T::F16, c[x0][y0]) | enc(T::F16, c[x1][y1]) << 16;
                }
            }
        }
        mats.push((a, b, c));
    }
    let d = Dev::new();
    let (pa, pb, pc, pd) = (d.upload(&fa), d.upload(&fb), d.upload(&fc), d.zeros(lanes * 16));
    d.run(
        &mma_ptx(shape, k, f32acc, ty),
        "mma_k",
        problems as u32,
        32,
        &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::Ptr(pd)],
    );
    let out: Vec<u32> = d.read(pd, lanes * 4);
    for (p, (a, b, c)) in mats.iter().enumerate() {
        let want = |i: usize, j: usize| -> f64 {
            (0..k).map(|kk| a[i][kk] as f64 * b[kk][j] as f64).sum::<f64>() + c[i][j] as f64
        };
        for l in 0..32 {
            let base = (p * 32 + l) * 4;
            for e in 0..4 {
                let (i, j) = c_pos(l, e);
                let got = if f32acc {
                    f32::from_bits(out[base + e]) as f64
                } else {
                    f16_val((out[base + e / 2] >> (16 * (e % 2))) as u16)
                };
                assert_eq!(
                    got,
                    want(i, j),
                    "{shape} {ty} {} problem {p} lane {l} D[{i}][{j}]",
                    if f32acc { "f32 acc" } else { "f16 acc" }
                );
            }
        }
    }
}

/// "mma" `.m16n8k16.row.col.f32.bf16.bf16.f32`, fragments per "Matrix Fragments for
/// mma.m16n8k16 with floating point type".
#[test]
fn mma_m16n8k16_bf16_f32() {
    check_mma(16, T::BF16, true, 64, 1);
}

/// "mma" `.m16n8k16.row.col.f32.f16.f16.f32`.
#[test]
fn mma_m16n8k16_f16_f32() {
    check_mma(16, T::F16, true, 64, 2);
}

/// "mma" `.m16n8k16.row.col.f16.f16.f16.f16`: C and D are two `.f16x2` registers per lane
/// (c0,c1 in row g, c2,c3 in row g+8).
#[test]
fn mma_m16n8k16_f16_f16acc() {
    check_mma(16, T::F16, false, 64, 3);
}

/// "mma" `.m16n8k8`, fragments per "Matrix Fragments for mma.m16n8k8" (A: two registers, B: one).
#[test]
fn mma_m16n8k8() {
    check_mma(8, T::F16, true, 48, 4);
    check_mma(8, T::BF16, true, 48, 5);
    check_mma(8, T::F16, false, 48, 6);
}

/// A kernel that copies 64 16-byte rows (`src`, 1024 bytes) to shared memory, has lane l take
/// its row address from `slots[l]` (a row number), runs `inst` with `%r30` as the address, and
/// stores `%r10..%r13` to `out[lane*4..]`; afterwards the shared window (possibly written by
/// `inst`) goes to `dump`.
fn ldm_ptx(inst: &str) -> String {
    format!(
        r#".visible .entry ldm(
	.param .u64 ldm_param_0,
	.param .u64 ldm_param_1,
	.param .u64 ldm_param_2,
	.param .u64 ldm_param_3
)
{{
{REGS}	.shared .align 16 .b8 tile[2048];
	ld.param.u64 %rd1, [ldm_param_0];
	ld.param.u64 %rd2, [ldm_param_1];
	ld.param.u64 %rd3, [ldm_param_2];
	ld.param.u64 %rd4, [ldm_param_3];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, tile;
	mul.wide.u32 %rd5, %r1, 32;
	add.s64 %rd6, %rd1, %rd5;
	ld.global.v4.u32 {{%r3, %r4, %r5, %r6}}, [%rd6];
	shl.b32 %r7, %r1, 5;
	add.s32 %r8, %r2, %r7;
	st.shared.v4.u32 [%r8], {{%r3, %r4, %r5, %r6}};
	ld.global.v4.u32 {{%r3, %r4, %r5, %r6}}, [%rd6+16];
	st.shared.v4.u32 [%r8+16], {{%r3, %r4, %r5, %r6}};
	mov.u32 %r3, 0;
	st.shared.v4.u32 [%r8+1024], {{%r3, %r3, %r3, %r3}};
	st.shared.v4.u32 [%r8+1040], {{%r3, %r3, %r3, %r3}};
	bar.sync 0;
	mul.wide.u32 %rd7, %r1, 4;
	add.s64 %rd8, %rd2, %rd7;
	ld.global.u32 %r9, [%rd8];
	shl.b32 %r9, %r9, 4;
	add.s32 %r30, %r2, %r9;
	mov.u32 %r10, 0;
	mov.u32 %r11, 0;
	mov.u32 %r12, 0;
	mov.u32 %r13, 0;
	{inst}
	mul.wide.u32 %rd9, %r1, 16;
	add.s64 %rd10, %rd3, %rd9;
	st.global.v4.u32 [%rd10], {{%r10, %r11, %r12, %r13}};
	bar.sync 0;
	mul.wide.u32 %rd11, %r1, 64;
	add.s64 %rd12, %rd4, %rd11;
	add.s32 %r14, %r2, %r7;
	shl.b32 %r15, %r1, 6;
	add.s32 %r14, %r2, %r15;
	ld.shared.v4.u32 {{%r3, %r4, %r5, %r6}}, [%r14];
	st.global.v4.u32 [%rd12], {{%r3, %r4, %r5, %r6}};
	ld.shared.v4.u32 {{%r3, %r4, %r5, %r6}}, [%r14+16];
	st.global.v4.u32 [%rd12+16], {{%r3, %r4, %r5, %r6}};
	ld.shared.v4.u32 {{%r3, %r4, %r5, %r6}}, [%r14+32];
	st.global.v4.u32 [%rd12+32], {{%r3, %r4, %r5, %r6}};
	ld.shared.v4.u32 {{%r3, %r4, %r5, %r6}}, [%r14+48];
	st.global.v4.u32 [%rd12+48], {{%r3, %r4, %r5, %r6}};
	ret;
}}
"#
    )
}

/// Runs [`ldm_ptx`]: returns (per-lane registers, the 2048-byte shared window as u16).
fn run_ldm(inst: &str, slots: &[u32; 32]) -> (Vec<u32>, Vec<u16>) {
    // Row s holds the 16-bit values s*8 + col.
    let src: Vec<u16> = (0..512u16).collect();
    let d = Dev::new();
    let (ps, pt, po, pd) = (d.upload(&src), d.upload(&slots[..]), d.zeros(32 * 16), d.zeros(2048));
    d.run(&ldm_ptx(inst), "ldm", 1, 32, &[Arg::Ptr(ps), Arg::Ptr(pt), Arg::Ptr(po), Arg::Ptr(pd)]);
    (d.read(po, 128), d.read(pd, 1024))
}

/// "ldmatrix" `.m8n8.x1/.x2/.x4 .shared.b16`, with and without `.trans`: thread 8j + r gives
/// the address of row r of matrix j (other threads' addresses are ignored); without `.trans`
/// destination j of lane l holds matrix j's (row l/4, cols 2(l%4), 2(l%4)+1); with `.trans`
/// it holds (rows 2(l%4), 2(l%4)+1, col l/4) — lower element in the lower half.
#[test]
fn ldmatrix_x1_x2_x4_trans() {
    let mut rng = Rng::new(7);
    for trial in 0..4 {
        // A random permutation of the 64 rows: lane l points at row slots[l].
        let mut perm: Vec<u32> = (0..64).collect();
        for i in (1..64).rev() {
            perm.swap(i, rng.below(i as u64 + 1) as usize);
        }
        let slots: [u32; 32] = std::array::from_fn(|i| perm[i]);
        for (num, regs) in [(1usize, "{%r10}"), (2, "{%r10, %r11}"), (4, "{%r10, %r11, %r12, %r13}")] {
            for trans in [false, true] {
                let inst = format!(
                    "ldmatrix.sync.aligned.m8n8.x{num}{}.shared.b16 {regs}, [%r30];",
                    if trans { ".trans" } else { "" }
                );
                let (out, _) = run_ldm(&inst, &slots);
                let elem = |j: usize, row: usize, col: usize| slots[8 * j + row] * 8 + col as u32;
                for l in 0..32 {
                    for j in 0..4 {
                        let got = out[l * 4 + j];
                        let want = if j >= num {
                            0
                        } else if !trans {
                            elem(j, l / 4, 2 * (l % 4)) | elem(j, l / 4, 2 * (l % 4) + 1) << 16
                        } else {
                            elem(j, 2 * (l % 4), l / 4) | elem(j, 2 * (l % 4) + 1, l / 4) << 16
                        };
                        assert_eq!(got, want, "trial {trial} `{inst}` lane {l} reg {j}");
                    }
                }
            }
        }
    }
}

/// "stmatrix" `.m8n8.x4{.trans}.shared.b16`: the inverse of ldmatrix — thread 8j + r gives the
/// address of row r of matrix j, and lane l's register j supplies matrix j's (row l/4,
/// cols 2(l%4)..+1) (transposed with `.trans`). Round trip: ldmatrix from rows `slots`, stmatrix
/// to rows 64 + slots (the zeroed upper half), which must reproduce the source rows there.
#[test]
fn stmatrix_roundtrip() {
    let slots: [u32; 32] = std::array::from_fn(|i| ((i * 37) % 64) as u32);
    for trans in ["", ".trans"] {
        let inst = format!(
            "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {{%r10, %r11, %r12, %r13}}, [%r30];\n\tadd.s32 %r31, %r30, 1024;\n\tstmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 [%r31], {{%r10, %r11, %r12, %r13}};"
        );
        let (_, sh) = run_ldm(&inst, &slots);
        for (l, &s) in slots.iter().enumerate() {
            let (j, r) = (l / 8, l % 8);
            for col in 0..8 {
                let got = sh[(64 + s as usize) * 8 + col];
                // Without .trans the row comes back as loaded; with .trans row r of the stored
                // matrix is column r of the loaded one.
                let want = if trans.is_empty() { s * 8 + col as u32 } else { slots[8 * j + col] * 8 + r as u32 };
                assert_eq!(got as u32, want, "stmatrix{trans} matrix {j} row {r} col {col}");
            }
        }
    }
}

/// Operand aliasing in warp-wide matrix instructions ("Instruction Operands": all sources are
/// read before any destination is written): `mma` with D = C (in-place accumulation, twice:
/// D = 2·A·B + C), and `ldmatrix` whose destination register is also the address register.
#[test]
fn mma_and_ldmatrix_aliasing() {
    // In-place mma: reuse check_mma's fragment layout on one problem, C = D registers.
    let mut rng = Rng::new(77);
    let val = |rng: &mut Rng| rng.below(7) as f32 - 3.0;
    let a: Vec<Vec<f32>> = (0..16).map(|_| (0..16).map(|_| val(&mut rng)).collect()).collect();
    let b: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| val(&mut rng)).collect()).collect();
    let c: Vec<Vec<f32>> = (0..16).map(|_| (0..8).map(|_| val(&mut rng)).collect()).collect();
    let (mut fa, mut fb, mut fc) = (vec![0u32; 128], vec![0u32; 128], vec![0u32; 128]);
    for l in 0..32 {
        for r in 0..4 {
            let ((x0, y0), (x1, y1)) = (a_pos(16, l, r, 0), a_pos(16, l, r, 1));
            fa[l * 4 + r] = enc(T::BF16, a[x0][y0]) | enc(T::BF16, a[x1][y1]) << 16;
        }
        for r in 0..2 {
            let ((x0, y0), (x1, y1)) = (b_pos(l, r, 0), b_pos(l, r, 1));
            fb[l * 4 + r] = enc(T::BF16, b[x0][y0]) | enc(T::BF16, b[x1][y1]) << 16;
        }
        for i in 0..4 {
            let (x, y) = c_pos(l, i);
            fc[l * 4 + i] = c[x][y].to_bits();
        }
    }
    let ptx = mma_ptx("m16n8k16", 16, true, "bf16").replace(
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f11, %f12, %f13, %f14}, {%r10, %r11, %r12, %r13}, {%r20, %r21}, {%f1, %f2, %f3, %f4};\n",
        "\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r10, %r11, %r12, %r13}, {%r20, %r21}, {%f1, %f2, %f3, %f4};\n\tmma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1, %f2, %f3, %f4}, {%r10, %r11, %r12, %r13}, {%r20, %r21}, {%f1, %f2, %f3, %f4};\n\tmov.f32 %f11, %f1;\n\tmov.f32 %f12, %f2;\n\tmov.f32 %f13, %f3;\n\tmov.f32 %f14, %f4;\n",
    );
    assert!(ptx.matches("mma.sync").count() == 2);
    let d = Dev::new();
    let (pa, pb, pc, pd) = (d.upload(&fa), d.upload(&fb), d.upload(&fc), d.zeros(512));
    d.run(&ptx, "mma_k", 1, 32, &[Arg::Ptr(pa), Arg::Ptr(pb), Arg::Ptr(pc), Arg::Ptr(pd)]);
    let out: Vec<u32> = d.read(pd, 128);
    for l in 0..32 {
        for e in 0..4 {
            let (i, j) = c_pos(l, e);
            let ab: f64 = (0..16).map(|k| a[i][k] as f64 * b[k][j] as f64).sum();
            assert_eq!(f32::from_bits(out[l * 4 + e]) as f64, 2.0 * ab + c[i][j] as f64, "in-place mma D[{i}][{j}]");
        }
    }
    // ldmatrix.x4 into {%r30, ...}: %r30 is also every lane's address operand.
    let slots: [u32; 32] = std::array::from_fn(|i| ((i * 13 + 5) % 64) as u32);
    let inst = "ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r30, %r11, %r12, %r13}, [%r30];\n\tmov.u32 %r10, %r30;";
    let (out, _) = run_ldm(inst, &slots);
    let elem = |j: usize, row: usize, col: usize| slots[8 * j + row] * 8 + col as u32;
    for l in 0..32 {
        for j in 0..4 {
            let want = elem(j, l / 4, 2 * (l % 4)) | elem(j, l / 4, 2 * (l % 4) + 1) << 16;
            assert_eq!(out[l * 4 + j], want, "aliased ldmatrix lane {l} reg {j}");
        }
    }
}
