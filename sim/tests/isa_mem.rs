//! Memory instructions, from the PTX ISA 9.x text: "Data Movement and Conversion Instructions:
//! ld, st" (vector forms `.v2/.v4`, state spaces), "Kernel Function Parameters" (taking a
//! parameter's address with `mov` and loading through it with `ld.param`), "Generic Addressing"
//! and "cvta", "Parallel Synchronization and Communication Instructions: atom, red" (each
//! operation's definition; atomics are performed one at a time, so contended results equal some
//! sequential order), "cp.async", "cp.async.commit_group", "cp.async.wait_group /
//! cp.async.wait_all" (src-size < cp-size zero-fills the rest), "bar.sync / bar.red",
//! "membar / fence".

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;

fn kernel(name: &str, params: &[&str], body: &str) -> String {
    let ps: Vec<String> = params.iter().enumerate().map(|(i, t)| format!("\t.param .{t} {name}_param_{i}")).collect();
    format!(".visible .entry {name}(\n{}\n)\n{{\n{REGS}{body}\n\tret;\n}}\n", ps.join(",\n"))
}

/// "ld", "st": `.v2`/`.v4` vectors on global and shared memory, element order = memory order.
#[test]
fn vector_ld_st_global_shared() {
    let body = "\t.shared .align 16 .b8 sm[4096];
	ld.param.u64 %rd1, [vk_param_0];
	ld.param.u64 %rd2, [vk_param_1];
	mov.u32 %r1, %tid.x;
	mul.wide.u32 %rd3, %r1, 16;
	add.s64 %rd4, %rd1, %rd3;
	add.s64 %rd5, %rd2, %rd3;
	ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd4];
	ld.global.v2.u64 {%rd10, %rd11}, [%rd4];
	mov.u32 %r6, sm;
	shl.b32 %r7, %r1, 4;
	add.s32 %r8, %r6, %r7;
	st.shared.v4.u32 [%r8], {%r5, %r4, %r3, %r2};
	st.shared.v2.u64 [%r8+2048], {%rd11, %rd10};
	bar.sync 0;
	xor.b32 %r9, %r1, 1;
	shl.b32 %r9, %r9, 4;
	add.s32 %r10, %r6, %r9;
	ld.shared.v2.u32 {%r11, %r12}, [%r10];
	ld.shared.v2.u32 {%r13, %r14}, [%r10+8];
	ld.shared.u64 %rd12, [%r10+2048];
	add.s64 %rd12, %rd12, %rd10;
	st.global.v4.u32 [%rd5], {%r11, %r12, %r13, %r14};
	st.global.v2.u32 [%rd5+2048], {%r2, %r3};
	st.global.u64 [%rd5+2056], %rd12;";
    let ptx = kernel("vk", &["u64", "u64"], body);
    let mut rng = Rng::new(30);
    let src = rng.vec_u32(128 * 4);
    let d = Dev::new();
    let (ps, po) = (d.upload(&src), d.zeros(128 * 16 + 2048 + 16 * 128));
    d.run(&ptx, "vk", 1, 128, &[Arg::Ptr(ps), Arg::Ptr(po)]);
    let out: Vec<u32> = d.read(po, 128 * 4);
    let tail: Vec<u32> = d.read(po + 2048, 128 * 4);
    for t in 0..128 {
        let o = t ^ 1;
        // Thread t stored (w3, w2, w1, w0) of its 16 bytes; t reads thread t^1's.
        let want = [src[o * 4 + 3], src[o * 4 + 2], src[o * 4 + 1], src[o * 4]];
        assert_eq!(&out[t * 4..t * 4 + 4], &want, "thread {t}");
        // v2 store of its own first two words, then thread t^1's u64 {w2,w3} (stored first by
        // the swapped v2.u64) plus its own {w0,w1}.
        let w = |i: usize| src[i] as u64 | (src[i + 1] as u64) << 32;
        assert_eq!(&tail[t * 4..t * 4 + 2], &[src[t * 4], src[t * 4 + 1]]);
        let u = tail[t * 4 + 2] as u64 | (tail[t * 4 + 3] as u64) << 32;
        assert_eq!(u, w(o * 4 + 2).wrapping_add(w(t * 4)), "thread {t} u64");
    }
}

/// "Kernel Function Parameters": parameters of several types at their aligned offsets, and a
/// parameter address taken with `mov.b64 %rd, k_param_0` then read with `ld.param` through the
/// register (`[%rd+8]` is the next parameter).
#[test]
fn param_space_through_register() {
    let body = "\tld.param.u64 %rd1, [pk_param_0];
	ld.param.u32 %r1, [pk_param_1];
	ld.param.u64 %rd2, [pk_param_2];
	ld.param.f32 %f1, [pk_param_3];
	mov.b64 %rd3, pk_param_0;
	ld.param.u64 %rd4, [%rd3+16];
	ld.param.u32 %r2, [%rd3+8];
	mov.b32 %r3, %f1;
	st.global.u32 [%rd1], %r1;
	st.global.u64 [%rd1+8], %rd2;
	st.global.u32 [%rd1+16], %r3;
	st.global.u64 [%rd1+24], %rd4;
	st.global.u32 [%rd1+32], %r2;";
    let ptx = kernel("pk", &["u64", "u32", "u64", "f32"], body);
    let d = Dev::new();
    let out = d.zeros(40);
    d.run(&ptx, "pk", 1, 1, &[Arg::Ptr(out), Arg::U32(0xDEAD_BEEF), Arg::U64(0x0123_4567_89AB_CDEF), Arg::F32(1.5)]);
    let w: Vec<u32> = d.read(out, 10);
    assert_eq!(w[0], 0xDEAD_BEEF);
    assert_eq!(w[2] as u64 | (w[3] as u64) << 32, 0x0123_4567_89AB_CDEF);
    assert_eq!(w[4], 1.5f32.to_bits());
    assert_eq!(w[6] as u64 | (w[7] as u64) << 32, 0x0123_4567_89AB_CDEF);
    assert_eq!(w[8], 0xDEAD_BEEF);
}

/// "Generic Addressing", "cvta": a shared variable's generic address (`cvta.shared.u64`) and a
/// global pointer (`cvta.to.global.u64`, `cvta.global.u64`) used with generic `ld`/`st`.
#[test]
fn generic_addressing_cvta() {
    let body = "\t.shared .align 4 .b8 gs[512];
	ld.param.u64 %rd1, [gk_param_0];
	cvta.to.global.u64 %rd2, %rd1;
	mov.u32 %r1, %tid.x;
	mov.u64 %rd3, gs;
	cvta.shared.u64 %rd4, %rd3;
	mul.wide.u32 %rd5, %r1, 4;
	add.s64 %rd6, %rd4, %rd5;
	add.u32 %r2, %r1, 100;
	st.u32 [%rd6], %r2;
	bar.sync 0;
	xor.b32 %r3, %r1, 5;
	mul.wide.u32 %rd7, %r3, 4;
	add.s64 %rd8, %rd4, %rd7;
	ld.u32 %r4, [%rd8];
	cvta.to.shared.u64 %rd12, %rd8;
	cvt.u32.u64 %r5, %rd12;
	ld.shared.u32 %r6, [%r5];
	add.u32 %r4, %r4, %r6;
	cvta.global.u64 %rd9, %rd2;
	add.s64 %rd10, %rd9, %rd5;
	st.u32 [%rd10], %r4;";
    let ptx = kernel("gk", &["u64"], body);
    let d = Dev::new();
    let out = d.zeros(128 * 4);
    d.run(&ptx, "gk", 1, 128, &[Arg::Ptr(out)]);
    let got: Vec<u32> = d.read(out, 128);
    for t in 0..128u32 {
        assert_eq!(got[t as usize], 2 * ((t ^ 5) + 100), "thread {t}");
    }
}

/// One contended atomic: every thread of `blocks`×256 applies `inst` (operand `%r2` = `vals[i]`,
/// `%r3` = `vals2[i]`) to word 0 of `cell` in `space`; old values go to `olds[i]`, the final
/// cell to `olds[n]`.
fn contend(space: &str, inst: &str, init: u32, vals: &[u32], vals2: &[u32]) -> (Vec<u32>, u32) {
    let n = vals.len();
    let (addr, pre, post) = if space == "global" {
        ("%rd4", "", String::new())
    } else {
        (
            "%r20",
            "\tmov.u32 %r20, cell;\n\tsetp.ne.u32 %p1, %r1, 0;\n\t@!%p1 st.shared.u32 [%r20], %r22;\n\tbar.sync 0;\n",
            "\tbar.sync 0;\n\t@%p1 bra $L__end;\n\tld.shared.u32 %r9, [%r20];\n\tatom.global.add.u32 %r10, [%rd4], %r9;\n$L__end:\n".to_string(),
        )
    };
    let body = format!(
        "\t.shared .align 4 .b32 cell;
	ld.param.u64 %rd1, [ak_param_0];
	ld.param.u64 %rd2, [ak_param_1];
	ld.param.u64 %rd3, [ak_param_2];
	ld.param.u64 %rd4, [ak_param_3];
	ld.param.u32 %r22, [ak_param_4];
	mov.u32 %r1, %tid.x;
	mov.u32 %r5, %ctaid.x;
	mad.lo.s32 %r6, %r5, 256, %r1;
	mul.wide.u32 %rd5, %r6, 4;
	add.s64 %rd6, %rd1, %rd5;
	ld.global.u32 %r2, [%rd6];
	add.s64 %rd7, %rd2, %rd5;
	ld.global.u32 %r3, [%rd7];
{pre}	{}
	add.s64 %rd8, %rd3, %rd5;
	st.global.u32 [%rd8], %r7;
{post}",
        inst.replace("[A]", &format!("[{addr}]")).replace("{space}", space)
    );
    let ptx = kernel("ak", &["u64", "u64", "u64", "u64", "u32"], &body);
    let d = Dev::new();
    let (pv, pv2, po) = (d.upload(vals), d.upload(vals2), d.zeros(4 * n));
    let cellp = d.upload(&[if space == "global" { init } else { 0 }]);
    d.run(
        &ptx,
        "ak",
        (n / 256) as u32,
        256,
        &[Arg::Ptr(pv), Arg::Ptr(pv2), Arg::Ptr(po), Arg::Ptr(cellp), Arg::U32(init)],
    );
    (d.read(po, n), d.read::<u32>(cellp, 1)[0])
}

/// "atom", "red" on global and shared memory with every thread contending for one word: the
/// returned old values and the final value must be those of some sequential order of the
/// operations (checked through order-independent consequences of each definition).
#[test]
fn atomics_contended() {
    let mut rng = Rng::new(31);
    for space in ["global", "shared"] {
        let blocks = if space == "global" { 4 } else { 1 };
        let n = 256 * blocks;
        let ones = vec![1u32; n];
        let rand = rng.vec_u32(n);
        let small: Vec<u32> = (0..n).map(|_| rng.below(1000) as u32).collect();
        let z = vec![0u32; n];
        // add: the olds are a permutation of 0..n, the final n.
        let (olds, fin) = contend(space, "atom.{space}.add.u32 %r7, [A], %r2;", 0, &ones, &z);
        let mut s = olds.clone();
        s.sort();
        assert_eq!(s, (0..n as u32).collect::<Vec<_>>(), "{space} atom.add olds");
        assert_eq!(fin, n as u32);
        // red.add: only the final value.
        let (_, fin) = contend(space, "red.{space}.add.u32 [A], %r2;\n\tmov.u32 %r7, 0;", 5, &small, &z);
        assert_eq!(fin, 5 + small.iter().sum::<u32>(), "{space} red.add");
        // min/max signed and unsigned.
        let (_, fin) = contend(space, "atom.{space}.min.s32 %r7, [A], %r2;", 0x7FFF_FFFF, &rand, &z);
        assert_eq!(fin, rand.iter().map(|&x| x as i32).min().unwrap() as u32, "{space} atom.min.s32");
        let (_, fin) = contend(space, "atom.{space}.max.u32 %r7, [A], %r2;", 0, &rand, &z);
        assert_eq!(fin, *rand.iter().max().unwrap(), "{space} atom.max.u32");
        // and/or/xor.
        let bits: Vec<u32> = (0..n as u32).map(|i| 1 << (i % 32)).collect();
        let (_, fin) = contend(space, "atom.{space}.or.b32 %r7, [A], %r2;", 0, &bits, &z);
        assert_eq!(fin, u32::MAX);
        let (_, fin) = contend(space, "atom.{space}.xor.b32 %r7, [A], %r2;", 0x1234, &rand, &z);
        assert_eq!(fin, rand.iter().fold(0x1234, |a, &b| a ^ b), "{space} atom.xor");
        let (_, fin) = contend(space, "atom.{space}.and.b32 %r7, [A], %r2;", u32::MAX, &rand, &z);
        assert_eq!(fin, rand.iter().fold(u32::MAX, |a, &b| a & b));
        // exch: the olds plus the final value are the initial value plus all operands.
        let (olds, fin) = contend(space, "atom.{space}.exch.b32 %r7, [A], %r2;", 77, &small, &z);
        let mut l: Vec<u32> = olds.iter().copied().chain([fin]).collect();
        let mut r: Vec<u32> = small.iter().copied().chain([77]).collect();
        l.sort();
        r.sort();
        assert_eq!(l, r, "{space} atom.exch");
        // cas: a lock-free increment loop (d = old; store c if old == b) — final n, olds distinct.
        let (olds, fin) = contend(
            space,
            "ld.volatile.{space}.u32 %r8, [A];\n$L__retry:\n\tadd.u32 %r11, %r8, 1;\n\tatom.{space}.cas.b32 %r7, [A], %r8, %r11;\n\tsetp.ne.u32 %p2, %r7, %r8;\n\tmov.u32 %r8, %r7;\n\t@%p2 bra $L__retry;",
            0,
            &ones,
            &z,
        );
        assert_eq!(fin, n as u32, "{space} cas loop");
        let mut s = olds.clone();
        s.sort();
        assert_eq!(s, (0..n as u32).collect::<Vec<_>>());
        // inc: new = old >= b ? 0 : old + 1; dec: new = (old == 0 || old > b) ? b : old - 1.
        let hundred = vec![100u32; n];
        let (olds, fin) = contend(space, "atom.{space}.inc.u32 %r7, [A], %r2;", 0, &hundred, &z);
        assert_eq!(fin, n as u32 % 101, "{space} atom.inc");
        let mut hist = [0usize; 101];
        olds.iter().for_each(|&o| hist[o as usize] += 1);
        assert!(hist.iter().all(|&h| h == n / 101 || h == n / 101 + 1));
        let seven = vec![7u32; n];
        let (_, fin) = contend(space, "atom.{space}.dec.u32 %r7, [A], %r2;", 5, &seven, &z);
        assert_eq!(fin, (5 - n as i64).rem_euclid(8) as u32, "{space} atom.dec");
    }
}

/// "atom" `.add.f32` and `.add.u64` on global memory (small integers: the f32 sum is exact in
/// any order).
#[test]
fn atomics_f32_u64() {
    let n = 512u32;
    let body = "\tld.param.u64 %rd1, [fk_param_0];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, %ctaid.x;
	mad.lo.s32 %r3, %r2, 256, %r1;
	and.b32 %r4, %r3, 15;
	cvt.rn.f32.u32 %f1, %r4;
	red.global.add.f32 [%rd1], %f1;
	cvt.u64.u32 %rd2, %r3;
	shl.b64 %rd2, %rd2, 32;
	atom.global.add.u64 %rd3, [%rd1+8], %rd2;";
    let ptx = kernel("fk", &["u64"], body);
    let d = Dev::new();
    let p = d.zeros(16);
    d.run(&ptx, "fk", n / 256, 256, &[Arg::Ptr(p)]);
    let w: Vec<u32> = d.read(p, 4);
    assert_eq!(f32::from_bits(w[0]), (0..n).map(|i| (i & 15) as f32).sum::<f32>());
    let s: u64 = (0..n as u64).map(|i| i << 32).fold(0, u64::wrapping_add);
    assert_eq!(w[2] as u64 | (w[3] as u64) << 32, s);
}

/// "cp.async": `.ca` with cp-size 4/8/16 and `.cg` 16 with src-size 0..=16 (bytes past src-size
/// are zero-filled); "cp.async.commit_group" / "cp.async.wait_group N" (groups older than the
/// N most recent are complete) / "cp.async.wait_all".
#[test]
fn cp_async_sizes_zero_fill_groups() {
    let body = "\t.shared .align 16 .b8 dst[2048];
	ld.param.u64 %rd1, [ck_param_0];
	ld.param.u64 %rd2, [ck_param_1];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, dst;
	shl.b32 %r3, %r1, 4;
	add.s32 %r4, %r2, %r3;
	mov.u32 %r5, 0xABABABAB;
	st.shared.v4.u32 [%r4], {%r5, %r5, %r5, %r5};
	st.shared.v4.u32 [%r4+1024], {%r5, %r5, %r5, %r5};
	bar.sync 0;
	mul.wide.u32 %rd3, %r1, 16;
	add.s64 %rd4, %rd1, %rd3;
	and.b32 %r6, %r1, 3;
	setp.eq.u32 %p1, %r6, 0;
	setp.eq.u32 %p2, %r6, 1;
	setp.eq.u32 %p3, %r6, 2;
	@%p1 cp.async.ca.shared.global [%r4], [%rd4], 4;
	@%p2 cp.async.ca.shared.global [%r4], [%rd4], 8;
	@%p3 cp.async.ca.shared.global [%r4], [%rd4], 16;
	setp.eq.u32 %p4, %r6, 3;
	@%p4 cp.async.cg.shared.global [%r4], [%rd4], 16;
	cp.async.commit_group;
	rem.u32 %r7, %r1, 17;
	add.s32 %r8, %r4, 1024;
	cp.async.cg.shared.global [%r8], [%rd4], 16, %r7;
	cp.async.commit_group;
	cp.async.wait_group 1;
	ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r4];
	cp.async.wait_all;
	bar.sync 0;
	ld.shared.v4.u32 {%r14, %r15, %r16, %r17}, [%r4+1024];
	mul.wide.u32 %rd5, %r1, 32;
	add.s64 %rd6, %rd2, %rd5;
	st.global.v4.u32 [%rd6], {%r10, %r11, %r12, %r13};
	st.global.v4.u32 [%rd6+16], {%r14, %r15, %r16, %r17};";
    let ptx = kernel("ck", &["u64", "u64"], body);
    let mut rng = Rng::new(32);
    let src: Vec<u8> = (0..64 * 16).map(|_| rng.next_u32() as u8).collect();
    let d = Dev::new();
    let (ps, po) = (d.upload(&src), d.zeros(64 * 32));
    d.run(&ptx, "ck", 1, 64, &[Arg::Ptr(ps), Arg::Ptr(po)]);
    let out: Vec<u8> = d.read(po, 64 * 32);
    for t in 0..64 {
        let s = &src[t * 16..t * 16 + 16];
        let first = &out[t * 32..t * 32 + 16];
        let size = [4, 8, 16, 16][t % 4];
        for i in 0..16 {
            assert_eq!(first[i], if i < size { s[i] } else { 0xAB }, "thread {t} cp-size {size} byte {i}");
        }
        let second = &out[t * 32 + 16..t * 32 + 32];
        let ss = t % 17;
        for i in 0..16 {
            assert_eq!(second[i], if i < ss { s[i] } else { 0 }, "thread {t} src-size {ss} byte {i}");
        }
    }
}

/// "bar.sync" orders shared memory between warps (a block-wide tree reduction), and "bar.red":
/// `.popc.u32` counts the threads whose predicate is true, `.and.pred` / `.or.pred` combine it.
#[test]
fn bar_sync_and_bar_red() {
    let body = "\t.shared .align 4 .b32 red[256];
	ld.param.u64 %rd1, [bk_param_0];
	ld.param.u64 %rd2, [bk_param_1];
	mov.u32 %r1, %tid.x;
	mul.wide.u32 %rd3, %r1, 4;
	add.s64 %rd4, %rd1, %rd3;
	ld.global.u32 %r2, [%rd4];
	mov.u32 %r3, red;
	shl.b32 %r4, %r1, 2;
	add.s32 %r5, %r3, %r4;
	st.shared.u32 [%r5], %r2;
	bar.sync 0;
	mov.u32 %r6, 128;
$L__tree:
	setp.ge.u32 %p1, %r1, %r6;
	@%p1 bra $L__skip;
	shl.b32 %r7, %r6, 2;
	add.s32 %r8, %r5, %r7;
	ld.shared.u32 %r9, [%r8];
	ld.shared.u32 %r10, [%r5];
	add.u32 %r10, %r10, %r9;
	st.shared.u32 [%r5], %r10;
$L__skip:
	bar.sync 0;
	shr.u32 %r6, %r6, 1;
	setp.ne.u32 %p2, %r6, 0;
	@%p2 bra $L__tree;
	ld.shared.u32 %r11, [%r3];
	and.b32 %r12, %r2, 1;
	setp.ne.u32 %p3, %r12, 0;
	bar.red.popc.u32 %r13, 0, %p3;
	bar.red.and.pred %p4, 1, %p3;
	bar.red.or.pred %p5, 2, %p3;
	selp.u32 %r14, 1, 0, %p4;
	selp.u32 %r15, 2, 0, %p5;
	or.b32 %r14, %r14, %r15;
	mul.wide.u32 %rd6, %r1, 8;
	add.s64 %rd5, %rd2, %rd6;
	st.global.v2.u32 [%rd5], {%r11, %r13};
	add.s64 %rd7, %rd2, %rd3;
	st.global.u32 [%rd7+2048], %r14;";
    let ptx = kernel("bk", &["u64", "u64"], body);
    let mut rng = Rng::new(33);
    for (k, input) in [(0..256).map(|_| rng.below(1000) as u32).collect::<Vec<u32>>(), vec![1; 256], vec![2; 256]]
        .into_iter()
        .enumerate()
    {
        let d = Dev::new();
        let (pi, po) = (d.upload(&input), d.zeros(4096));
        d.run(&ptx, "bk", 1, 256, &[Arg::Ptr(pi), Arg::Ptr(po)]);
        let out: Vec<u32> = d.read(po, 768);
        let sum: u32 = input.iter().sum();
        let odd = input.iter().filter(|&&x| x & 1 == 1).count() as u32;
        for t in 0..256 {
            assert_eq!(out[2 * t], sum, "case {k}: block sum seen by thread {t}");
            assert_eq!(out[2 * t + 1], odd, "case {k}: bar.red.popc");
            assert_eq!(out[512 + t], (odd == 256) as u32 | ((odd > 0) as u32) << 1, "case {k}: bar.red.and/or");
        }
    }
}

/// "membar / fence": `membar.gl`, `membar.cta`, `fence.acq_rel.gpu`, `fence.sc.sys` and the
/// `.release`/`.acquire` forms of `st`/`ld` execute (an interpreter that runs threads
/// sequentially-consistently is stronger than the model, so a message-passing program sees its
/// data).
#[test]
fn fences_message_passing() {
    let body = "\tld.param.u64 %rd1, [mk_param_0];
	mov.u32 %r1, %ctaid.x;
	setp.ne.u32 %p1, %r1, 0;
	@%p1 bra $L__consumer;
	mov.u32 %r2, 12345;
	st.global.u32 [%rd1+4], %r2;
	membar.gl;
	fence.acq_rel.gpu;
	mov.u32 %r3, 1;
	st.release.gpu.global.u32 [%rd1], %r3;
	bra.uni $L__end;
$L__consumer:
	ld.acquire.gpu.global.u32 %r4, [%rd1];
	setp.eq.u32 %p2, %r4, 0;
	@%p2 bra $L__consumer;
	membar.cta;
	fence.sc.sys;
	ld.relaxed.gpu.global.u32 %r5, [%rd1+4];
	st.global.u32 [%rd1+8], %r5;
$L__end:";
    let ptx = kernel("mk", &["u64"], body);
    let d = Dev::new();
    let p = d.zeros(12);
    d.run(&ptx, "mk", 2, 1, &[Arg::Ptr(p)]);
    assert_eq!(d.read::<u32>(p, 3), [1, 12345, 12345]);
}

/// "State Spaces: Shared State Space": dynamic (`.extern`) shared memory lies after the static
/// shared variables, and `%dynamic_smem_size` ("Special Registers") is the launch's size.
#[test]
fn dynamic_smem_after_static() {
    let ptx = format!(
        r#".extern .shared .align 16 .b8 dyn[];

.visible .entry vars(
	.param .u64 vars_param_0
)
{{
{REGS}	.shared .align 4 .b8 st[64];
	ld.param.u64 %rd1, [vars_param_0];
	mov.u32 %r1, %tid.x;
	add.u32 %r5, %r1, 1000;
	mul.lo.u32 %r7, %r1, 3;
	mov.u32 %r8, %r7;
	// dynamic shared memory lies after the 64 static bytes: write, sync, read a neighbour's word
	mov.u32 %r9, dyn;
	mov.u32 %r10, st;
	sub.u32 %r11, %r9, %r10;
	mov.u32 %r12, %dynamic_smem_size;
	shl.b32 %r13, %r1, 2;
	add.s32 %r14, %r9, %r13;
	st.shared.u32 [%r14], %r1;
	bar.sync 0;
	xor.b32 %r15, %r1, 1;
	shl.b32 %r16, %r15, 2;
	add.s32 %r17, %r9, %r16;
	ld.shared.u32 %r18, [%r17];
	mul.wide.u32 %rd7, %r1, 32;
	add.s64 %rd8, %rd1, %rd7;
	st.global.v4.u32 [%rd8], {{%r5, %r7, %r8, %r18}};
	st.global.v2.u32 [%rd8+16], {{%r11, %r12}};
	ret;
}}
"#
    );
    let d = Dev::new();
    let p = d.zeros(64 * 32);
    d.launch(&ptx, "vars", [1, 1, 1], [64, 1, 1], 256, &[Arg::Ptr(p)]).unwrap();
    let out: Vec<u32> = d.read(p, 64 * 8);
    for t in 0..64u32 {
        let r = &out[t as usize * 8..t as usize * 8 + 6];
        assert_eq!(r[0], 1000 + t);
        assert_eq!(r[1], 3 * t);
        assert_eq!(r[2], 3 * t);
        assert_eq!(r[3], t ^ 1, "dynamic shared");
        assert!(r[4] >= 64, "dynamic shared starts after the static variables ({})", r[4]);
        assert_eq!(r[5], 256, "%dynamic_smem_size");
    }
}

/// "State Spaces: Local State Space": a per-thread stack frame as nvcc writes it
/// (`.local .b8 __local_depot0[..]`, `cvta.local.u64`), written through the generic address and
/// read back with `ld.local`; each thread has its own copy.
#[test]
fn local_memory_stack_frame() {
    let ptx = format!(
        r#".visible .entry loc(
	.param .u64 loc_param_0
)
{{
	.local .align 8 .b8 __local_depot0[32];
	.reg .b64 %SP;
	.reg .b64 %SPL;
{REGS}	mov.u64 %SPL, __local_depot0;
	cvta.local.u64 %SP, %SPL;
	ld.param.u64 %rd1, [loc_param_0];
	mov.u32 %r1, %tid.x;
	add.u32 %r2, %r1, 1000;
	st.u32 [%SP], %r2;
	st.u32 [%SP+4], %r1;
	add.s64 %rd2, %SPL, 4;
	ld.local.u32 %r3, [%SPL];
	ld.local.u32 %r4, [%rd2];
	add.u32 %r5, %r3, %r4;
	mul.wide.u32 %rd7, %r1, 4;
	add.s64 %rd8, %rd1, %rd7;
	st.global.u32 [%rd8], %r5;
	ret;
}}
"#
    );
    let d = Dev::new();
    let p = d.zeros(4 * 64);
    d.run(&ptx, "loc", 1, 64, &[Arg::Ptr(p)]);
    assert_eq!(d.read::<u32>(p, 64), (0..64).map(|t| 1000 + 2 * t).collect::<Vec<u32>>());
}

/// "Variable Declarations: Initializers": module-scope `.const` and `.global` arrays with
/// initial values (nvcc emits these for lookup tables), addressed with `mov.u64 %rd, name`.
/// (Module-scope `.global` variables without initialisers are refused too: "unknown symbol
/// `gv` (global/const variables and functions are not supported)", 715.)
#[test]
#[ignore = "sim gap: module-scope .const/.global variables are not supported (initialised: INVALID_PTX 218 at load; uninitialised: 715 at launch)"]
fn initialised_const_and_global() {
    let ptx = format!(
        r#".const .align 4 .b32 tbl[4] = {{10, 20, 30, 40}};
.global .align 4 .u32 gv[2] = {{7, 9}};

.visible .entry ini(
	.param .u64 ini_param_0
)
{{
{REGS}	ld.param.u64 %rd1, [ini_param_0];
	mov.u32 %r1, %tid.x;
	and.b32 %r6, %r1, 3;
	mul.wide.u32 %rd3, %r6, 4;
	mov.u64 %rd4, tbl;
	add.s64 %rd5, %rd4, %rd3;
	ld.const.u32 %r7, [%rd5];
	mov.u64 %rd6, gv;
	ld.global.u32 %r8, [%rd6+4];
	add.u32 %r9, %r7, %r8;
	mul.wide.u32 %rd7, %r1, 4;
	add.s64 %rd8, %rd1, %rd7;
	st.global.u32 [%rd8], %r9;
	ret;
}}
"#
    );
    let d = Dev::new();
    let p = d.zeros(4 * 8);
    d.run(&ptx, "ini", 1, 8, &[Arg::Ptr(p)]);
    assert_eq!(d.read::<u32>(p, 8), [19, 29, 39, 49, 19, 29, 39, 49]);
}

/// "cp.async" with `.ca` and src-size on 4- and 8-byte copies, and the ignore-src predicate
/// form (`cp.async... [dst], [src], 16, p`: with p true nothing is read and the 16 bytes are
/// zero); "atom" on 64-bit words (`.cas.b64`, `.exch.b64`, `.add.u64` on shared), and
/// non-coherent loads (`ld.global.nc`).
#[test]
fn cp_async_small_ignore_src_and_more_atomics() {
    let body = "\t.shared .align 16 .b8 dst[1024];
	.shared .align 8 .b64 cell;
	ld.param.u64 %rd1, [xk_param_0];
	ld.param.u64 %rd2, [xk_param_1];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, dst;
	shl.b32 %r3, %r1, 4;
	add.s32 %r4, %r2, %r3;
	mov.u32 %r5, 0x5A5A5A5A;
	st.shared.v4.u32 [%r4], {%r5, %r5, %r5, %r5};
	mov.u64 %rd20, 0;
	mov.u32 %r30, cell;
	setp.eq.u32 %p5, %r1, 0;
	@%p5 st.shared.u64 [%r30], %rd20;
	bar.sync 0;
	mul.wide.u32 %rd3, %r1, 16;
	add.s64 %rd4, %rd1, %rd3;
	and.b32 %r6, %r1, 7;
	and.b32 %r7, %r1, 3;
	setp.lt.u32 %p1, %r1, 16;
	setp.ge.u32 %p6, %r1, 32;
	@%p1 cp.async.ca.shared.global [%r4], [%rd4], 8, %r6;
	@!%p1 bra $L__big;
	bra.uni $L__commit;
$L__big:
	@!%p6 cp.async.ca.shared.global [%r4], [%rd4], 4, %r7;
	and.b32 %r8, %r1, 1;
	setp.eq.u32 %p2, %r8, 1;
	@%p6 cp.async.cg.shared.global [%r4], [%rd4], 16, %p2;
$L__commit:
	cp.async.wait_all;
	bar.sync 0;
	ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r4];
	add.s64 %rd5, %rd2, %rd3;
	st.global.v4.u32 [%rd5], {%r10, %r11, %r12, %r13};
	// 64-bit shared atomics: a cas-increment of the high word, an add
	cvt.u64.u32 %rd6, %r1;
	atom.shared.add.u64 %rd7, [%r30], %rd6;
	bar.sync 0;
	// 64-bit global exch/cas on the word at +2056
	@%p5 atom.global.exch.b64 %rd8, [%rd2+2056], 0x1122334455667788;
	bar.sync 0;
	ld.global.nc.u64 %rd9, [%rd1+8];
	@%p5 atom.global.cas.b64 %rd10, [%rd2+2056], 0x1122334455667788, %rd9;
	@%p5 ld.shared.u64 %rd11, [%r30];
	@%p5 st.global.u64 [%rd2+2064], %rd11;";
    let ps: Vec<String> = (0..2).map(|i| format!("\t.param .u64 xk_param_{i}")).collect();
    let ptx = format!(".visible .entry xk(\n{}\n)\n{{\n{REGS}{body}\n\tret;\n}}\n", ps.join(",\n"));
    let mut rng = Rng::new(34);
    let src: Vec<u8> = (0..64 * 16).map(|_| rng.next_u32() as u8).collect();
    let d = Dev::new();
    let (psrc, po) = (d.upload(&src), d.zeros(4096));
    d.run(&ptx, "xk", 1, 64, &[Arg::Ptr(psrc), Arg::Ptr(po)]);
    let out: Vec<u8> = d.read(po, 64 * 16);
    for t in 0..64 {
        let s = &src[t * 16..t * 16 + 16];
        let (cp, real) = if t < 16 {
            (8, t % 8)
        } else if t < 32 {
            (4, t % 4)
        } else if t % 2 == 1 {
            (16, 0)
        } else {
            (16, 16)
        };
        for i in 0..16 {
            let want = if i >= cp {
                0x5A
            } else if i < real {
                s[i]
            } else {
                0
            };
            assert_eq!(out[t * 16 + i], want, "thread {t} cp-size {cp} src-size {real} byte {i}");
        }
    }
    let w: Vec<u64> = d.read(po + 2048, 3);
    let next = u64::from_le_bytes(src[8..16].try_into().unwrap());
    assert_eq!(w[1], next, "exch then cas");
    assert_eq!(w[2], (0..64).sum::<u64>(), "atom.shared.add.u64");
}

/// "atom": `.add.noftz.f16x2` (sm_60+, what `atomicAdd(__half2*)` compiles to) adds both halves
/// atomically: 64 threads × (1.0, 1.0) from 0 give 64.0 = 0x5400 in each half.
#[test]
fn atom_add_f16x2() {
    let ptx = format!(
        ".visible .entry hk(\n\t.param .u64 hk_param_0\n)\n{{\n{REGS}\tld.param.u64 %rd1, [hk_param_0];\n\tmov.b32 %r1, 0x3C003C00;\n\tatom.global.add.noftz.f16x2 %r2, [%rd1], %r1;\n\tret;\n}}\n"
    );
    let d = Dev::new();
    let p = d.zeros(4);
    d.run(&ptx, "hk", 1, 64, &[Arg::Ptr(p)]);
    assert_eq!(d.read::<u32>(p, 1), [0x5400_5400]);
}

/// "ld", "st" on sub-word types: `.s8/.u8/.s16/.u16/.b16` loads into 32-bit registers sign- or
/// zero-extend by the instruction type, stores write only the low bytes; `.v4.u16` / `.v2.b16`.
#[test]
fn subword_ld_st() {
    let body = "\tld.param.u64 %rd1, [wk_param_0];
	ld.param.u64 %rd2, [wk_param_1];
	mov.u32 %r1, %tid.x;
	cvt.u64.u32 %rd3, %r1;
	add.s64 %rd4, %rd1, %rd3;
	ld.global.s8 %r2, [%rd4];
	ld.global.u8 %r3, [%rd4];
	mul.wide.u32 %rd5, %r1, 2;
	add.s64 %rd6, %rd1, %rd5;
	ld.global.s16 %r4, [%rd6];
	ld.global.u16 %r5, [%rd6];
	ld.global.b16 %rs1, [%rd6];
	mul.wide.u32 %rd7, %r1, 32;
	add.s64 %rd8, %rd2, %rd7;
	st.global.v4.u32 [%rd8], {%r2, %r3, %r4, %r5};
	st.global.b16 [%rd8+16], %rs1;
	st.global.u8 [%rd8+18], %r2;
	mul.wide.u32 %rd9, %r1, 8;
	add.s64 %rd10, %rd1, %rd9;
	ld.global.v4.u16 {%rs2, %rs3, %rs4, %rs5}, [%rd10];
	st.global.v2.b16 [%rd8+20], {%rs5, %rs2};
	st.global.v2.u16 [%rd8+24], {%rs3, %rs4};";
    let ps: Vec<String> = (0..2).map(|i| format!("\t.param .u64 wk_param_{i}")).collect();
    let ptx = format!(".visible .entry wk(\n{}\n)\n{{\n{REGS}{body}\n\tret;\n}}\n", ps.join(",\n"));
    let mut rng = Rng::new(35);
    let src: Vec<u8> = (0..256).map(|_| rng.next_u32() as u8).collect();
    let d = Dev::new();
    let (ps_, po) = (d.upload(&src), d.zeros(32 * 32));
    let _ = d.mem.memset(po, 0xEE, 32 * 32);
    d.run(&ptx, "wk", 1, 32, &[Arg::Ptr(ps_), Arg::Ptr(po)]);
    let out: Vec<u8> = d.read(po, 32 * 32);
    for t in 0..32 {
        let r = &out[t * 32..t * 32 + 32];
        let w = |i: usize| u32::from_le_bytes(r[4 * i..4 * i + 4].try_into().unwrap());
        let h = |i: usize| u16::from_le_bytes([src[2 * i], src[2 * i + 1]]);
        assert_eq!(w(0), src[t] as i8 as i32 as u32, "ld.s8");
        assert_eq!(w(1), src[t] as u32, "ld.u8");
        assert_eq!(w(2), h(t) as i16 as i32 as u32, "ld.s16");
        assert_eq!(w(3), h(t) as u32, "ld.u16");
        assert_eq!(u16::from_le_bytes([r[16], r[17]]), h(t), "st.b16");
        assert_eq!(r[18], src[t], "st.u8 writes one byte");
        assert_eq!(r[19], 0xEE, "st.u8 leaves the next byte alone");
        let q = |k: usize| h(4 * t + k);
        assert_eq!(u16::from_le_bytes([r[20], r[21]]), q(3));
        assert_eq!(u16::from_le_bytes([r[22], r[23]]), q(0));
        assert_eq!(u16::from_le_bytes([r[24], r[25]]), q(1));
        assert_eq!(u16::from_le_bytes([r[26], r[27]]), q(2));
        assert_eq!(&r[28..32], &[0xEE; 4]);
    }
}

/// Hints without architectural effect: "prefetch", "nanosleep", `ld.global.ca/.cg/.cs` cache
/// operators, and `%clock64` / `%globaltimer` (readable, non-decreasing).
#[test]
fn hints_and_timers() {
    let body = "\t.shared .align 16 .b8 sm[512];
	ld.param.u64 %rd1, [hk2_param_0];
	ld.param.u64 %rd2, [hk2_param_1];
	mov.u32 %r1, %tid.x;
	mov.u64 %rd30, %clock64;
	mov.u64 %rd31, %globaltimer;
	mul.wide.u32 %rd4, %r1, 16;
	add.s64 %rd5, %rd1, %rd4;
	prefetch.global.L2 [%rd5];
	ld.global.cg.v4.u32 {%r2, %r3, %r4, %r5}, [%rd5];
	ld.global.cs.u32 %r6, [%rd5];
	mov.u32 %r7, sm;
	shl.b32 %r8, %r1, 4;
	add.s32 %r9, %r7, %r8;
	cp.async.cg.shared.global [%r9], [%rd5], 16;
	cp.async.commit_group;
	cp.async.wait_group 0;
	nanosleep.u32 100;
	ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r9];
	add.u32 %r2, %r2, %r6;
	mov.u64 %rd32, %clock64;
	mov.u64 %rd33, %globaltimer;
	setp.ge.u64 %p1, %rd32, %rd30;
	setp.ge.u64 %p2, %rd33, %rd31;
	and.pred %p3, %p1, %p2;
	selp.u32 %r14, 1, 0, %p3;
	mul.wide.u32 %rd6, %r1, 32;
	add.s64 %rd7, %rd2, %rd6;
	st.global.v4.u32 [%rd7], {%r2, %r3, %r4, %r5};
	st.global.v4.u32 [%rd7+16], {%r10, %r11, %r12, %r14};";
    let ps: Vec<String> = (0..2).map(|i| format!("\t.param .u64 hk2_param_{i}")).collect();
    let ptx = format!(".visible .entry hk2(\n{}\n)\n{{\n{REGS}{body}\n\tret;\n}}\n", ps.join(",\n"));
    let mut rng = Rng::new(36);
    let src = rng.vec_u32(32 * 4);
    let d = Dev::new();
    let (ps_, po) = (d.upload(&src), d.zeros(32 * 32));
    d.run(&ptx, "hk2", 1, 32, &[Arg::Ptr(ps_), Arg::Ptr(po)]);
    let out: Vec<u32> = d.read(po, 32 * 8);
    for t in 0..32 {
        let s = &src[t * 4..t * 4 + 4];
        assert_eq!(
            &out[t * 8..t * 8 + 8],
            &[s[0].wrapping_mul(2), s[1], s[2], s[3], s[0], s[1], s[2], 1],
            "thread {t}"
        );
    }
}
/// Qualifiers spelled with `::` ("ld", "cp.async", "createpolicy"; `.level::eviction_priority`,
/// `.level::cache_hint`, `.level::prefetch_size`) have no architectural effect: "createpolicy" (returns an opaque
/// policy), `ld.global.L2::cache_hint`, `ld.global.L1::no_allocate`, `cp.async...L2::cache_hint`,
/// "prefetch", "nanosleep", and `%clock64` / `%globaltimer` (readable, non-decreasing).
#[test]
fn double_colon_qualifiers() {
    let body = "\t.shared .align 16 .b8 sm[512];
	ld.param.u64 %rd1, [hk3_param_0];
	ld.param.u64 %rd2, [hk3_param_1];
	mov.u32 %r1, %tid.x;
	mov.u64 %rd30, %clock64;
	mov.u64 %rd31, %globaltimer;
	createpolicy.fractional.L2::evict_first.b64 %rd3, 1.0;
	mul.wide.u32 %rd4, %r1, 16;
	add.s64 %rd5, %rd1, %rd4;
	prefetch.global.L2 [%rd5];
	ld.global.L2::cache_hint.v4.u32 {%r2, %r3, %r4, %r5}, [%rd5], %rd3;
	ld.global.L1::no_allocate.u32 %r6, [%rd5];
	mov.u32 %r7, sm;
	shl.b32 %r8, %r1, 4;
	add.s32 %r9, %r7, %r8;
	cp.async.cg.shared.global.L2::cache_hint [%r9], [%rd5], 16, %rd3;
	cp.async.commit_group;
	cp.async.wait_group 0;
	nanosleep.u32 100;
	ld.shared.v4.u32 {%r10, %r11, %r12, %r13}, [%r9];
	add.u32 %r2, %r2, %r6;
	mov.u64 %rd32, %clock64;
	mov.u64 %rd33, %globaltimer;
	setp.ge.u64 %p1, %rd32, %rd30;
	setp.ge.u64 %p2, %rd33, %rd31;
	and.pred %p3, %p1, %p2;
	selp.u32 %r14, 1, 0, %p3;
	mul.wide.u32 %rd6, %r1, 32;
	add.s64 %rd7, %rd2, %rd6;
	st.global.v4.u32 [%rd7], {%r2, %r3, %r4, %r5};
	st.global.v4.u32 [%rd7+16], {%r10, %r11, %r12, %r14};";
    let ps: Vec<String> = (0..2).map(|i| format!("\t.param .u64 hk3_param_{i}")).collect();
    let ptx = format!(".visible .entry hk3(\n{}\n)\n{{\n{REGS}{body}\n\tret;\n}}\n", ps.join(",\n"));
    let mut rng = Rng::new(36);
    let src = rng.vec_u32(32 * 4);
    let d = Dev::new();
    let (ps_, po) = (d.upload(&src), d.zeros(32 * 32));
    d.run(&ptx, "hk3", 1, 32, &[Arg::Ptr(ps_), Arg::Ptr(po)]);
    let out: Vec<u32> = d.read(po, 32 * 8);
    for t in 0..32 {
        let s = &src[t * 4..t * 4 + 4];
        assert_eq!(
            &out[t * 8..t * 8 + 8],
            &[s[0].wrapping_mul(2), s[1], s[2], s[3], s[0], s[1], s[2], 1],
            "thread {t}"
        );
    }
}

/// "ld" and "cp.async" with the `.level::prefetch_size` qualifier (`.L2::64B`, `.L2::128B`,
/// `.L2::256B`), as nvcc writes for 16-byte `__ldg` (`ld.global.nc.L1::no_allocate.L2::256B`).
#[test]
fn prefetch_size_qualifiers() {
    let ptx = format!(
        ".visible .entry pz(\n\t.param .u64 pz_param_0\n)\n{{\n{REGS}\t.shared .align 16 .b8 sm[16];\n\tld.param.u64 %rd1, [pz_param_0];\n\tld.global.nc.L1::no_allocate.L2::256B.v4.u32 {{%r1, %r2, %r3, %r4}}, [%rd1];\n\tmov.u32 %r5, sm;\n\tcp.async.cg.shared.global.L2::128B [%r5], [%rd1], 16;\n\tcp.async.wait_all;\n\tld.shared.u32 %r6, [%r5+4];\n\tadd.u32 %r1, %r1, %r6;\n\tst.global.v4.u32 [%rd1+16], {{%r1, %r2, %r3, %r4}};\n\tret;\n}}\n"
    );
    let d = Dev::new();
    let p = d.upload(&[1u32, 2, 3, 4, 0, 0, 0, 0]);
    d.run(&ptx, "pz", 1, 1, &[Arg::Ptr(p)]);
    assert_eq!(d.read::<u32>(p + 16, 4), [3, 2, 3, 4]);
}
