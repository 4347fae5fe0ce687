//! Profile counters, counted exactly on tiny programs. The definitions are in the module doc of
//! `sim/src/profile.rs`; the memory-side quantities follow the CUDA memory model the counters
//! stand for (32-byte global sectors; 32 shared banks of 4 bytes, with 8- and 16-byte accesses
//! served in 2 and 4 phases).

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;
use lowbit_sim::profile::{Profile, CLASS_NAMES};

fn class(p: &Profile, name: &str) -> u64 {
    p.by_class[CLASS_NAMES.iter().position(|&n| n == name).unwrap()]
}

fn prof(ptx: &str, name: &str, block: u32, args: &[Arg], d: &Dev) -> Profile {
    d.launch(ptx, name, [1, 1, 1], [block, 1, 1], 0, args).unwrap().profile
}

fn k1(name: &str, body: &str) -> String {
    format!(".visible .entry {name}(\n\t.param .u64 {name}_param_0\n)\n{{\n{REGS}\tld.param.u64 %rd1, [{name}_param_0];\n{body}\n\tret;\n}}\n")
}

/// `warp_instructions`, `thread_instructions` and `by_class` on straight-line code: 2 warps ×
/// 10 instructions.
#[test]
fn straight_line_counts() {
    let body = "\tmov.u32 %r1, %tid.x;
	mul.wide.u32 %rd2, %r1, 4;
	add.s64 %rd3, %rd1, %rd2;
	ld.global.u32 %r2, [%rd3];
	mov.b32 %f1, %r2;
	add.f32 %f2, %f1, %f1;
	cvt.rn.f16.f32 %rs1, %f2;
	st.global.u32 [%rd3], %r2;";
    let d = Dev::profiled();
    let p = d.zeros(256);
    let pr = prof(&k1("sl", body), "sl", 64, &[Arg::Ptr(p)], &d);
    // ld.param, mov, mul.wide, add, ld, mov, add.f32, cvt, st, ret.
    assert_eq!(pr.warp_instructions, 20, "{pr:?}");
    assert_eq!(pr.thread_instructions, 640);
    // mul.wide and add are integer work; the two movs are moves.
    assert_eq!(class(&pr, "int"), 2 * 2);
    assert_eq!(class(&pr, "move"), 2 * 2);
    assert_eq!(class(&pr, "fp32"), 2);
    assert_eq!(class(&pr, "convert"), 2);
    assert_eq!(class(&pr, "control"), 2);
    // ld.param is counted among the memory instructions, but moves no global bytes.
    assert_eq!(
        class(&pr, "global")
            + class(&pr, "int")
            + class(&pr, "move")
            + class(&pr, "fp32")
            + class(&pr, "convert")
            + class(&pr, "control"),
        20
    );
    assert_eq!(pr.global_load_bytes, 256);
    assert_eq!(pr.global_store_bytes, 256);
    assert_eq!(pr.mma, 0);
    assert_eq!(pr.shared_requests, 0);
}

const DIVERGENT: &str = "\tmov.u32 %r1, %tid.x;
	setp.lt.u32 %p1, %r1, 8;
	setp.gt.u32 %p2, %r1, 100;
	@%p2 add.u32 %r3, %r1, 1;
	@%p1 bra $L__join;
	add.u32 %r2, %r1, 1;
$L__join:
	add.u32 %r4, %r1, 2;";

/// Divergent code: lanes are summed per issued instruction; a guarded-off lane counts 0
/// (`@%p2 add` with p2 false everywhere adds 0, `@%p1 bra` taken by 8 lanes adds 8).
#[test]
fn divergent_thread_counts() {
    let d = Dev::profiled();
    let p = d.zeros(4);
    let pr = prof(&k1("dv", DIVERGENT), "dv", 32, &[Arg::Ptr(p)], &d);
    // ld.param 32, mov 32, setp 32, setp 32, @p2 add 0, @p1 bra 8, add 24, add 32, ret 32.
    assert_eq!(pr.thread_instructions, 32 * 6 + 8 + 24, "{pr:?}");
}

/// Divergent code, warp side: an instruction whose guard is false for every active lane still
/// issues, and after the if-then the two paths reconverge at the join label, so the join `add`
/// and the `ret` issue once for the warp: 9 warp-instructions, 2 of them control.
#[test]
fn divergent_warp_counts() {
    let d = Dev::profiled();
    let p = d.zeros(4);
    let pr = prof(&k1("dv", DIVERGENT), "dv", 32, &[Arg::Ptr(p)], &d);
    assert_eq!(pr.warp_instructions, 9, "{pr:?}");
    assert_eq!(class(&pr, "control"), 2, "{pr:?}");
}

fn load_kernel(name: &str, addr: &str, inst: &str) -> String {
    k1(name, &format!("\tmov.u32 %r1, %tid.x;\n{addr}\t{inst}\n"))
}

/// `global_load_bytes`, `global_load_sectors` (distinct 32-byte sectors per warp request) and
/// `global_unique_bytes_read` for coalesced, strided, broadcast and vector loads (one warp).
#[test]
fn global_sectors() {
    let cases: [(&str, &str, &str, u64, u64, u64); 5] = [
        // (name, address computation, load, bytes, sectors, unique bytes)
        (
            "coal",
            "\tmul.wide.u32 %rd2, %r1, 4;\n\tadd.s64 %rd3, %rd1, %rd2;\n",
            "ld.global.u32 %r2, [%rd3];",
            128,
            4,
            128,
        ),
        (
            "strided",
            "\tmul.wide.u32 %rd2, %r1, 128;\n\tadd.s64 %rd3, %rd1, %rd2;\n",
            "ld.global.u32 %r2, [%rd3];",
            128,
            32,
            128,
        ),
        ("bcast", "\tmov.u64 %rd3, %rd1;\n", "ld.global.u32 %r2, [%rd3];", 128, 1, 4),
        (
            "vec4",
            "\tmul.wide.u32 %rd2, %r1, 16;\n\tadd.s64 %rd3, %rd1, %rd2;\n",
            "ld.global.v4.u32 {%r2, %r3, %r4, %r5}, [%rd3];",
            512,
            16,
            512,
        ),
        (
            "twice",
            "\tmul.wide.u32 %rd2, %r1, 4;\n\tadd.s64 %rd3, %rd1, %rd2;\n\tld.global.u32 %r6, [%rd3];\n",
            "ld.global.u32 %r2, [%rd3];",
            256,
            8,
            128,
        ),
    ];
    for (name, addr, inst, bytes, sectors, unique) in cases {
        let d = Dev::profiled();
        let p = d.zeros(32 * 128);
        let pr = prof(&load_kernel(name, addr, inst), name, 32, &[Arg::Ptr(p)], &d);
        assert_eq!(pr.global_load_bytes, bytes, "{name}: {pr:?}");
        assert_eq!(pr.global_load_sectors, sectors, "{name}: {pr:?}");
        assert_eq!(pr.global_unique_bytes_read, unique, "{name}: {pr:?}");
        assert_eq!(pr.global_first_touch_bytes_read, unique, "{name}: nothing was stored first");
        assert_eq!(pr.global_store_bytes, 0, "{name}");
    }
    // First-touch reads: lanes 0..15 store their word and read it back, then every lane reads the
    // word 32 lanes on (never stored): 64 + 128 unique bytes read, of which 128 first-touch.
    let d = Dev::profiled();
    let p = d.zeros(64 * 4);
    let pr = prof(
        &load_kernel(
            "ft",
            "	mul.wide.u32 %rd2, %r1, 4;
	add.s64 %rd3, %rd1, %rd2;
	setp.lt.u32 %p1, %r1, 16;
",
            "@%p1 st.global.u32 [%rd3], %r1;
	@%p1 ld.global.u32 %r2, [%rd3];
	ld.global.u32 %r3, [%rd3+128];",
        ),
        "ft",
        32,
        &[Arg::Ptr(p)],
        &d,
    );
    assert_eq!(pr.global_unique_bytes_read, 64 + 128, "{pr:?}");
    assert_eq!(pr.global_first_touch_bytes_read, 128, "{pr:?}");
    // Stores: a coalesced 4-byte store by 32 lanes is 4 sectors; half the lanes predicated off
    // touch 2 sectors and 64 bytes.
    let d = Dev::profiled();
    let p = d.zeros(256);
    let pr = prof(
        &load_kernel(
            "st",
            "\tmul.wide.u32 %rd2, %r1, 4;\n\tadd.s64 %rd3, %rd1, %rd2;\n\tsetp.lt.u32 %p1, %r1, 16;\n",
            "st.global.u32 [%rd3], %r1;\n\t@%p1 st.global.u32 [%rd3], %r1;",
        ),
        "st",
        32,
        &[Arg::Ptr(p)],
        &d,
    );
    assert_eq!((pr.global_store_bytes, pr.global_store_sectors), (128 + 64, 4 + 2), "{pr:?}");
}

/// `shared_wavefronts` and `shared_requests`: conflict-free, 2-way, 32-way and broadcast 4-byte
/// accesses, and 8- and 16-byte vector accesses (2 and 4 phases of a conflict-free pattern).
#[test]
fn shared_bank_conflicts() {
    let cases: [(&str, &str, u64); 7] = [
        ("free", "shl.b32 %r3, %r1, 2;\n\tadd.s32 %r4, %r2, %r3;\n\tld.shared.u32 %r5, [%r4];", 1),
        ("twoway", "shl.b32 %r3, %r1, 3;\n\tadd.s32 %r4, %r2, %r3;\n\tld.shared.u32 %r5, [%r4];", 2),
        ("allway", "shl.b32 %r3, %r1, 7;\n\tadd.s32 %r4, %r2, %r3;\n\tld.shared.u32 %r5, [%r4];", 32),
        ("bcast", "ld.shared.u32 %r5, [%r2+12];", 1),
        ("v2", "shl.b32 %r3, %r1, 3;\n\tadd.s32 %r4, %r2, %r3;\n\tld.shared.v2.u32 {%r5, %r6}, [%r4];", 2),
        ("v4", "shl.b32 %r3, %r1, 4;\n\tadd.s32 %r4, %r2, %r3;\n\tld.shared.v4.u32 {%r5, %r6, %r7, %r8}, [%r4];", 4),
        ("st", "shl.b32 %r3, %r1, 2;\n\tadd.s32 %r4, %r2, %r3;\n\tst.shared.u32 [%r4], %r1;", 1),
    ];
    for (name, inst, wavefronts) in cases {
        // Shared memory is zeroed first (one conflict-free store per lane: 8 requests of
        // 16 bytes, 4 wavefronts each) and fenced by a barrier.
        let body = format!(
            "\t.shared .align 16 .b8 sm[4096];\n\tmov.u32 %r1, %tid.x;\n\tmov.u32 %r2, sm;\n\tshl.b32 %r9, %r1, 4;\n\tadd.s32 %r9, %r2, %r9;\n\tmov.u32 %r10, 0;\n\tst.shared.v4.u32 [%r9], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+512], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+1024], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+1536], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+2048], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+2560], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+3072], {{%r10, %r10, %r10, %r10}};\n\tst.shared.v4.u32 [%r9+3584], {{%r10, %r10, %r10, %r10}};\n\tbar.sync 0;\n\t{inst}"
        );
        let d = Dev::profiled();
        let p = d.zeros(4);
        let pr = prof(&k1(name, &body), name, 32, &[Arg::Ptr(p)], &d);
        assert_eq!(pr.shared_requests, 9, "{name}: {pr:?}");
        assert_eq!(pr.shared_wavefronts, 8 * 4 + wavefronts, "{name}: {pr:?}");
        assert_eq!(class(&pr, "shared"), 9);
        assert_eq!(class(&pr, "sync"), 1);
    }
}

/// `mma` counts warp-level `mma` instructions (2 warps × 2), also in `by_class.mma`; an
/// `ldmatrix.x4` is one shared request of 4 matrices, one wavefront each when conflict-free.
#[test]
fn mma_and_ldmatrix_counts() {
    let body = "\t.shared .align 16 .b8 sm[1024];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, sm;
	shl.b32 %r6, %r1, 4;
	add.s32 %r7, %r2, %r6;
	mov.u32 %r10, 0;
	st.shared.v4.u32 [%r7], {%r10, %r10, %r10, %r10};
	and.b32 %r3, %r1, 31;
	shl.b32 %r4, %r3, 4;
	add.s32 %r5, %r2, %r4;
	bar.sync 0;
	ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%r11, %r12, %r13, %r14}, [%r5];
	mov.f32 %f1, 0f00000000;
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2, %f3, %f4, %f5}, {%r11, %r12, %r13, %r14}, {%r11, %r12}, {%f1, %f1, %f1, %f1};
	mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f2, %f3, %f4, %f5}, {%r11, %r12, %r13, %r14}, {%r11, %r12}, {%f2, %f3, %f4, %f5};";
    let d = Dev::profiled();
    let p = d.zeros(4);
    let pr = prof(&k1("mm", body), "mm", 64, &[Arg::Ptr(p)], &d);
    assert_eq!(pr.mma, 4, "{pr:?}");
    assert_eq!(class(&pr, "mma"), 4);
    // Per warp: one v4 store (4 wavefronts) + ldmatrix.x4 (4 matrices × 1).
    assert_eq!(pr.shared_requests, 2 * 2, "{pr:?}");
    assert_eq!(pr.shared_wavefronts, 2 * (4 + 4), "{pr:?}");
}

/// Atomics count as a load and a store of their bytes; `cp.async` as a global load only (its
/// shared side is not a shared request); `ld.param` moves no global bytes.
#[test]
fn atomics_and_cp_async_traffic() {
    let body = "\t.shared .align 16 .b8 sm[512];
	mov.u32 %r1, %tid.x;
	atom.global.add.u32 %r2, [%rd1], 1;
	mul.wide.u32 %rd2, %r1, 16;
	add.s64 %rd3, %rd1, %rd2;
	mov.u32 %r3, sm;
	shl.b32 %r4, %r1, 4;
	add.s32 %r5, %r3, %r4;
	cp.async.cg.shared.global [%r5], [%rd3], 16;
	cp.async.wait_all;";
    let d = Dev::profiled();
    let p = d.zeros(512);
    let pr = prof(&k1("tr", body), "tr", 32, &[Arg::Ptr(p)], &d);
    assert_eq!(pr.global_load_bytes, 128 + 512, "{pr:?}");
    assert_eq!(pr.global_store_bytes, 128, "{pr:?}");
    assert_eq!(pr.global_load_sectors, 1 + 16, "{pr:?}");
    assert_eq!(pr.global_store_sectors, 1, "{pr:?}");
    assert_eq!(pr.global_unique_bytes_read, 512, "{pr:?}");
    assert_eq!(pr.shared_requests, 0, "{pr:?}");
}
