//! The execution model, from the PTX ISA 9.x text ("Programming Model: Thread Hierarchy",
//! "Memory Consistency Model": forward progress of co-resident CTAs that communicate through
//! global memory with volatile/relaxed accesses and fences), and the simulator's scheduler
//! contract (`SimConfig.seed`, `SimConfig.hang_limit`): blocks that wait on flags set by other
//! blocks complete, a real deadlock is reported, and reordering never changes the results of a
//! race-free program.

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;
use lowbit_sim::cuda;

/// Block b waits (spinning with `ld.volatile.global`) until block `order(b)` has published, then
/// adds its own id to the running value and publishes itself: a serial chain across blocks.
fn chain_ptx() -> String {
    format!(
        r#".visible .entry chain(
	.param .u64 chain_param_0,
	.param .u32 chain_param_1
)
{{
{REGS}	ld.param.u64 %rd1, [chain_param_0];
	ld.param.u32 %r1, [chain_param_1];
	mov.u32 %r2, %ctaid.x;
	mov.u32 %r3, %tid.x;
	setp.ne.u32 %p1, %r3, 0;
	@%p1 bra $L__end;
	// Blocks run the chain from the last block to the first: block b waits for b+1.
	add.u32 %r4, %r2, 1;
	setp.ge.u32 %p2, %r4, %r1;
	mov.u32 %r7, 0;
	@%p2 bra $L__go;
	mul.wide.u32 %rd2, %r4, 8;
	add.s64 %rd3, %rd1, %rd2;
$L__spin:
	ld.volatile.global.u32 %r5, [%rd3];
	setp.eq.u32 %p3, %r5, 0;
	@%p3 bra $L__spin;
	membar.gl;
	ld.volatile.global.u32 %r7, [%rd3+4];
$L__go:
	add.u32 %r7, %r7, %r2;
	mul.wide.u32 %rd4, %r2, 8;
	add.s64 %rd5, %rd1, %rd4;
	st.volatile.global.u32 [%rd5+4], %r7;
	membar.gl;
	mov.u32 %r6, 1;
	st.volatile.global.u32 [%rd5], %r6;
$L__end:
	ret;
}}
"#
    )
}

/// Blocks that wait on flags set by *later* blocks (which a naive one-block-at-a-time
/// interpreter would never run) complete, under the natural order and under seeds.
#[test]
fn blocks_wait_on_other_blocks() {
    // Small grids: a spinning block keeps its full time slice, so each link costs a slice.
    for seed in [0u64, 7] {
        for n in [2u32, 5] {
            let mut d = Dev::new();
            d.sim.seed = seed;
            let p = d.zeros(8 * n as usize);
            d.launch(&chain_ptx(), "chain", [n, 1, 1], [64, 1, 1], 0, &[Arg::Ptr(p), Arg::U32(n)])
                .unwrap_or_else(|e| panic!("seed {seed} n {n}: {e}"));
            let w: Vec<u32> = d.read(p, 2 * n as usize);
            for b in 0..n {
                assert_eq!(w[2 * b as usize], 1);
                assert_eq!(w[2 * b as usize + 1], (b..n).sum::<u32>(), "seed {seed} block {b}");
            }
        }
    }
}

/// A spin on a flag nobody sets is a real deadlock: reported as `CUDA_ERROR_LAUNCH_FAILED`
/// once the hang limit passes, naming the kernel.
#[test]
fn real_deadlock_is_reported() {
    let ptx = format!(
        ".visible .entry stuck(\n\t.param .u64 stuck_param_0\n)\n{{\n{REGS}\tld.param.u64 %rd1, [stuck_param_0];\n$L__spin:\n\tld.volatile.global.u32 %r1, [%rd1];\n\tsetp.eq.u32 %p1, %r1, 0;\n\t@%p1 bra $L__spin;\n\tret;\n}}\n"
    );
    let mut d = Dev::new();
    d.sim.hang_limit = 1_000_000;
    let p = d.zeros(4);
    let t = std::time::Instant::now();
    let e = d.launch(&ptx, "stuck", [2, 1, 1], [32, 1, 1], 0, &[Arg::Ptr(p)]).unwrap_err();
    assert_eq!(e.code, cuda::LAUNCH_FAILED, "{e}");
    assert!(e.message.contains("stuck") && e.message.contains("hang"), "{}", e.message);
    assert!(t.elapsed().as_secs() < 20, "took {:?}", t.elapsed());
}

/// A race-free program (per-block shared reductions with barriers, per-thread outputs, a
/// commutative atomic total) gives identical results under every seed; the order-dependent part
/// (an atomic ticket) shows that the seeds do reorder blocks.
#[test]
fn seeds_reorder_but_preserve_race_free_results() {
    let ptx = format!(
        r#".visible .entry rf(
	.param .u64 rf_param_0,
	.param .u64 rf_param_1,
	.param .u64 rf_param_2
)
{{
{REGS}	.shared .align 4 .b32 acc[4];
	ld.param.u64 %rd1, [rf_param_0];
	ld.param.u64 %rd2, [rf_param_1];
	ld.param.u64 %rd3, [rf_param_2];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, %ctaid.x;
	mad.lo.s32 %r3, %r2, 128, %r1;
	mul.wide.u32 %rd4, %r3, 4;
	add.s64 %rd5, %rd1, %rd4;
	ld.global.u32 %r4, [%rd5];
	redux.sync.add.u32 %r5, %r4, -1;
	shr.u32 %r6, %r1, 5;
	and.b32 %r7, %r1, 31;
	mov.u32 %r8, acc;
	shl.b32 %r9, %r6, 2;
	add.s32 %r10, %r8, %r9;
	setp.eq.u32 %p1, %r7, 0;
	@%p1 st.shared.u32 [%r10], %r5;
	bar.sync 0;
	ld.shared.v4.u32 {{%r11, %r12, %r13, %r14}}, [%r8];
	add.u32 %r15, %r11, %r12;
	add.u32 %r15, %r15, %r13;
	add.u32 %r15, %r15, %r14;
	mul.lo.u32 %r16, %r4, %r15;
	add.s64 %rd6, %rd2, %rd4;
	st.global.u32 [%rd6], %r16;
	setp.ne.u32 %p2, %r1, 0;
	@%p2 bra $L__end;
	red.global.add.u32 [%rd3], %r15;
	atom.global.add.u32 %r17, [%rd3+4], 1;
	mul.wide.u32 %rd7, %r2, 4;
	add.s64 %rd8, %rd3, %rd7;
	st.global.u32 [%rd8+8], %r17;
$L__end:
	ret;
}}
"#
    );
    let blocks = 32usize;
    let mut rng = Rng::new(40);
    let input: Vec<u32> = (0..blocks * 128).map(|_| rng.below(100) as u32).collect();
    let run = |seed: u64| {
        let mut d = Dev::new();
        d.sim.seed = seed;
        let (pi, po, pt) = (d.upload(&input), d.zeros(input.len() * 4), d.zeros(8 + 4 * blocks));
        d.launch(&ptx, "rf", [blocks as u32, 1, 1], [128, 1, 1], 0, &[Arg::Ptr(pi), Arg::Ptr(po), Arg::Ptr(pt)])
            .unwrap();
        (d.read::<u32>(po, input.len()), d.read::<u32>(pt, 2), d.read::<u32>(pt + 8, blocks))
    };
    let (out0, tot0, tickets0) = run(0);
    for b in 0..blocks {
        let s: u32 = input[b * 128..b * 128 + 128].iter().sum();
        for t in 0..128 {
            assert_eq!(out0[b * 128 + t], input[b * 128 + t] * s);
        }
    }
    assert_eq!(tot0, [input.iter().sum::<u32>(), blocks as u32]);
    let mut reordered = false;
    for seed in [1u64, 2, 3, 12345, 0xDEAD_BEEF] {
        let (out, tot, tickets) = run(seed);
        assert_eq!(out, out0, "seed {seed}");
        assert_eq!(tot, tot0, "seed {seed}");
        let mut t = tickets.clone();
        t.sort();
        assert_eq!(t, (0..blocks as u32).collect::<Vec<_>>());
        reordered |= tickets != tickets0;
    }
    assert!(reordered, "no seed changed the block order");
}

/// "Special Registers": `%tid`, `%ntid`, `%ctaid`, `%nctaid` in three dimensions (x fastest in
/// the linear thread order), `%laneid`, `%warpid`, the `%lanemask_*` family.
#[test]
fn special_registers_3d() {
    let ptx = format!(
        r#".visible .entry sr(
	.param .u64 sr_param_0
)
{{
{REGS}	ld.param.u64 %rd1, [sr_param_0];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, %tid.y;
	mov.u32 %r3, %tid.z;
	mov.u32 %r4, %ntid.x;
	mov.u32 %r5, %ntid.y;
	mov.u32 %r6, %ntid.z;
	mov.u32 %r7, %ctaid.x;
	mov.u32 %r8, %ctaid.y;
	mov.u32 %r9, %ctaid.z;
	mov.u32 %r10, %nctaid.x;
	mov.u32 %r11, %nctaid.y;
	mov.u32 %r12, %nctaid.z;
	mov.u32 %r13, %laneid;
	mov.u32 %r14, %lanemask_lt;
	mov.u32 %r15, %lanemask_ge;
	mov.u32 %r16, %lanemask_eq;
	// linear thread id t = x + ntid.x * (y + ntid.y * z), linear block id likewise
	mad.lo.s32 %r17, %r5, %r3, %r2;
	mad.lo.s32 %r17, %r4, %r17, %r1;
	mad.lo.s32 %r18, %r11, %r9, %r8;
	mad.lo.s32 %r18, %r10, %r18, %r7;
	mul.lo.s32 %r19, %r4, %r5;
	mul.lo.s32 %r19, %r19, %r6;
	mad.lo.s32 %r20, %r18, %r19, %r17;
	mul.wide.u32 %rd2, %r20, 64;
	add.s64 %rd3, %rd1, %rd2;
	st.global.v4.u32 [%rd3], {{%r1, %r2, %r3, %r17}};
	st.global.v4.u32 [%rd3+16], {{%r4, %r5, %r6, %r18}};
	st.global.v4.u32 [%rd3+32], {{%r7, %r8, %r9, %r13}};
	st.global.v4.u32 [%rd3+48], {{%r14, %r15, %r16, %r12}};
	ret;
}}
"#
    );
    let (grid, block) = ([2u32, 3, 2], [5u32, 3, 4]);
    let nt = (block[0] * block[1] * block[2]) as usize;
    let nb = (grid[0] * grid[1] * grid[2]) as usize;
    let d = Dev::new();
    let p = d.zeros(nt * nb * 64);
    d.launch(&ptx, "sr", grid, block, 0, &[Arg::Ptr(p)]).unwrap();
    let out: Vec<u32> = d.read(p, nt * nb * 16);
    for b in 0..nb {
        let (bx, by, bz) = (b as u32 % grid[0], (b as u32 / grid[0]) % grid[1], b as u32 / (grid[0] * grid[1]));
        for t in 0..nt {
            let (x, y, z) = (t as u32 % block[0], (t as u32 / block[0]) % block[1], t as u32 / (block[0] * block[1]));
            let lane = t as u32 % 32;
            let r = &out[(b * nt + t) * 16..(b * nt + t) * 16 + 16];
            let want = [
                x,
                y,
                z,
                t as u32,
                block[0],
                block[1],
                block[2],
                b as u32,
                bx,
                by,
                bz,
                lane,
                (1u32 << lane) - 1,
                !((1u32 << lane) - 1),
                1 << lane,
                grid[2],
            ];
            assert_eq!(r, &want, "block {b} thread {t}");
        }
    }
}

/// `ret` inside a divergent branch retires only those lanes; the others continue and a later
/// collective over the remaining lanes' mask works ("ret", "exit"; "activemask").
#[test]
fn divergent_ret() {
    let body = "and.b32 %r5, %r23, 31;\n\tsetp.lt.u32 %p1, %r5, 10;\n\t@%p1 bra $L__early;\n\tactivemask.b32 %r4;\n\tadd.s64 %rd9, %rd1, %rd5;\n\tst.global.u32 [%rd9], %r4;\n\tret;\n$L__early:\n\tmov.u32 %r4, 7;";
    let z = vec![0u32; 64];
    let out = ew32(body, &z, &z, &z);
    for i in 0..64 {
        assert_eq!(out[i], if i % 32 < 10 { 7 } else { !((1u32 << 10) - 1) }, "thread {i}");
    }
}
