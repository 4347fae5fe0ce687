//! Warp collectives and divergence, from the PTX ISA 9.x text: "Data Movement and Conversion
//! Instructions: shfl.sync" (its pseudo-code, clamps and segment masks in c[12:8]),
//! "Parallel Synchronization and Communication Instructions: vote.sync", "match.sync",
//! "redux.sync", "activemask", and the SIMT model of "Programming Model: Thread Hierarchy"
//! (threads of a warp may diverge and later reconverge; `.sync` collectives need every thread
//! of membermask to execute them).

// Parallel input/output arrays read clearest with index loops.
#![allow(clippy::needless_range_loop, clippy::type_complexity)]

mod common;
use common::*;

/// The "shfl.sync" pseudo-code: (source lane, pval) for `lane` with operands b and c.
fn shfl_ref(mode: &str, lane: i32, b: u32, c: u32) -> (i32, bool) {
    let bval = (b & 31) as i32;
    let cval = (c & 31) as i32;
    let mask = ((c >> 8) & 31) as i32;
    let max_lane = (lane & mask) | (cval & !mask);
    let min_lane = lane & mask;
    let (j, p) = match mode {
        "up" => {
            let j = lane - bval;
            (j, j >= max_lane)
        }
        "down" => {
            let j = lane + bval;
            (j, j <= max_lane)
        }
        "bfly" => {
            let j = lane ^ bval;
            (j, j <= max_lane)
        }
        _ => {
            let j = min_lane | (bval & !mask);
            (j, j <= max_lane)
        }
    };
    if p {
        (j, true)
    } else {
        (lane, false)
    }
}

/// "shfl.sync" up/down/bfly/idx over many (b, c) pairs: plain clamps (`c = 31` for down/bfly/idx,
/// `c = 0` for up, as `__shfl_*_sync` passes them) and segment masks for widths 2..16
/// (`c = ((32-w) << 8) | (w-1)`, and `(32-w) << 8` for up), with the predicate output.
#[test]
fn shfl_modes_clamps_segments() {
    let mut combos: Vec<(&str, u32, u32)> = Vec::new();
    for mode in ["up", "down", "bfly", "idx"] {
        for b in [0u32, 1, 2, 3, 5, 8, 16, 31, 33] {
            for w in [32u32, 16, 8, 4, 2] {
                let c = if mode == "up" { (32 - w) << 8 } else { ((32 - w) << 8) | (w - 1) };
                combos.push((mode, b, c));
            }
            // Odd clamps: cval without a segment.
            combos.push((mode, b, 7));
            combos.push((mode, b, 20));
        }
    }
    for mode in ["up", "down", "bfly", "idx"] {
        let cs: Vec<&(&str, u32, u32)> = combos.iter().filter(|x| x.0 == mode).collect();
        let n = cs.len() * 32;
        let a: Vec<u32> = (0..n as u32).map(|i| i * 3 + 1).collect();
        let b: Vec<u32> = (0..n).map(|i| cs[i / 32].1).collect();
        let c: Vec<u32> = (0..n).map(|i| cs[i / 32].2).collect();
        let body = format!("shfl.sync.{mode}.b32 %r5|%p1, %r1, %r2, %r3, -1;\n\tselp.u32 %r6, 0x80000000, 0, %p1;\n\tor.b32 %r4, %r5, %r6;");
        let out = ew32(&body, &a, &b, &c);
        for i in 0..n {
            let lane = (i % 32) as i32;
            let (j, p) = shfl_ref(mode, lane, b[i], c[i]);
            let want = a[i - lane as usize + j as usize] | if p { 0x8000_0000 } else { 0 };
            assert_eq!(out[i], want, "shfl.{mode} b={} c={:#x} lane {lane}", b[i], c[i]);
        }
    }
    // idx with a per-lane source lane (the usual broadcast/gather form).
    let n = 64;
    let a: Vec<u32> = (0..n).map(|i| 1000 + i).collect();
    let b: Vec<u32> = (0..n).map(|i| (i * 7 + 3) % 32).collect();
    let out = ew32("shfl.sync.idx.b32 %r4, %r1, %r2, 31, -1;", &a, &b, &vec![0; n as usize]);
    for i in 0..n as usize {
        assert_eq!(out[i], a[i / 32 * 32 + b[i] as usize]);
    }
}

/// "vote.sync" `.all .any .uni` (predicate results) and `.ballot.b32` (bit i = predicate of lane
/// i), also with a negated source predicate.
#[test]
fn vote_all_any_uni_ballot() {
    let mut rng = Rng::new(20);
    let patterns = [0u32, u32::MAX, 1, 0x8000_0000, rng.next_u32(), rng.next_u32(), 0x5555_5555];
    let n = patterns.len() * 32;
    let a: Vec<u32> = (0..n).map(|i| (patterns[i / 32] >> (i % 32)) & 1).collect();
    let z = vec![0; n];
    let body = "setp.ne.u32 %p1, %r1, 0;\n\tvote.sync.all.pred %p2, %p1, -1;\n\tvote.sync.any.pred %p3, %p1, -1;\n\tvote.sync.uni.pred %p4, %p1, -1;\n\tvote.sync.any.pred %p5, !%p1, -1;\n\tselp.u32 %r5, 1, 0, %p2;\n\tselp.u32 %r6, 2, 0, %p3;\n\tselp.u32 %r7, 4, 0, %p4;\n\tselp.u32 %r8, 8, 0, %p5;\n\tor.b32 %r4, %r5, %r6;\n\tor.b32 %r4, %r4, %r7;\n\tor.b32 %r4, %r4, %r8;";
    let out = ew32(body, &a, &z, &z);
    let ballot = ew32("setp.ne.u32 %p1, %r1, 0;\n\tvote.sync.ballot.b32 %r4, %p1, -1;", &a, &z, &z);
    let nballot = ew32("setp.ne.u32 %p1, %r1, 0;\n\tvote.sync.ballot.b32 %r4, !%p1, -1;", &a, &z, &z);
    for i in 0..n {
        let p = patterns[i / 32];
        let want = (p == u32::MAX) as u32
            | ((p != 0) as u32) << 1
            | ((p == 0 || p == u32::MAX) as u32) << 2
            | ((p != u32::MAX) as u32) << 3;
        assert_eq!(out[i], want, "vote pattern {p:#x}");
        assert_eq!(ballot[i], p);
        assert_eq!(nballot[i], !p);
    }
}

/// "match.sync": `.any.b32 d` = lanes of membermask whose value equals this lane's;
/// `.all.b32 d|p` = membermask and true when all values are equal, else 0 and false.
#[test]
fn match_any_all() {
    let groups: [fn(u32) -> u32; 4] = [|l| l % 3, |_| 42, |l| l, |l| (l / 8) * 0x1_0000_0001u64 as u32];
    let n = groups.len() * 32;
    let a: Vec<u32> = (0..n).map(|i| groups[i / 32](i as u32 % 32)).collect();
    let z = vec![0; n];
    let any = ew32("match.any.sync.b32 %r4, %r1, -1;", &a, &z, &z);
    let all =
        ew32("match.all.sync.b32 %r5|%p1, %r1, -1;\n\tselp.u32 %r6, 1, 0, %p1;\n\txor.b32 %r4, %r5, %r6;", &a, &z, &z);
    for i in 0..n {
        let w = i / 32 * 32;
        let want: u32 = (0..32).filter(|&j| a[w + j] == a[i]).map(|j| 1u32 << j).sum();
        assert_eq!(any[i], want, "match.any lane {i}");
        let eq = (0..32).all(|j| a[w + j] == a[w]);
        assert_eq!(all[i], if eq { u32::MAX ^ 1 } else { 0 }, "match.all warp {}", i / 32);
    }
}

/// "redux.sync" `.add .min .max` (.u32/.s32) and `.and .or .xor` (.b32) over the warp.
#[test]
fn redux_ops() {
    let mut rng = Rng::new(21);
    let n = 4 * 32;
    let a: Vec<u32> = (0..n).map(|i| if i < 32 { rng.next_u32() } else { rng.next_u32() % 1000 }).collect();
    let z = vec![0; n];
    let ops: [(&str, fn(&[u32]) -> u32); 7] = [
        ("add.u32", |v| v.iter().fold(0u32, |s, &x| s.wrapping_add(x))),
        ("min.u32", |v| *v.iter().min().unwrap()),
        ("max.u32", |v| *v.iter().max().unwrap()),
        ("min.s32", |v| v.iter().map(|&x| x as i32).min().unwrap() as u32),
        ("max.s32", |v| v.iter().map(|&x| x as i32).max().unwrap() as u32),
        ("and.b32", |v| v.iter().fold(u32::MAX, |s, &x| s & x)),
        ("xor.b32", |v| v.iter().fold(0, |s, &x| s ^ x)),
    ];
    for (op, g) in ops {
        let out = ew32(&format!("redux.sync.{op} %r4, %r1, -1;"), &a, &z, &z);
        for i in 0..n {
            assert_eq!(out[i], g(&a[i / 32 * 32..i / 32 * 32 + 32]), "redux.{op} warp {}", i / 32);
        }
    }
    let out = ew32("redux.sync.or.b32 %r4, %r1, -1;", &a, &z, &z);
    assert_eq!(out[0], a[..32].iter().fold(0, |s, &x| s | x));
}

/// "activemask" inside a divergent branch gives exactly the lanes on that path; collectives with
/// a partial membermask inside the branch ("shfl.sync": only the named threads take part).
#[test]
fn activemask_and_partial_masks() {
    let n = 64;
    let a: Vec<u32> = (0..n).map(|i| if i < 32 { (i % 3 == 0) as u32 } else { (i % 2) as u32 }).collect();
    let z = vec![0; n as usize];
    let out = ew32("setp.eq.u32 %p1, %r1, 0;\n\t@%p1 bra $L__else;\n\tactivemask.b32 %r4;\n\tbra.uni $L__join;\n$L__else:\n\tactivemask.b32 %r4;\n\tnot.b32 %r4, %r4;\n$L__join:", &a, &z, &z);
    for i in 0..n as usize {
        let w = i / 32 * 32;
        let taken: u32 = (0..32).filter(|&j| a[w + j] != 0).map(|j| 1u32 << j).sum();
        assert_eq!(out[i], taken, "activemask lane {i}");
    }
    // Odd lanes only (membermask 0xAAAAAAAA): butterfly by 2 stays inside the odd lanes.
    let a: Vec<u32> = (0..32).map(|i| 100 + i).collect();
    let out = ew32("and.b32 %r5, %r23, 1;\n\tsetp.eq.u32 %p1, %r5, 0;\n\t@%p1 bra $L__skip;\n\tshfl.sync.bfly.b32 %r4, %r1, 2, 31, 0xAAAAAAAA;\n$L__skip:", &a, &z[..32], &z[..32]);
    for l in 0..32 {
        assert_eq!(out[l], if l % 2 == 1 { a[l ^ 2] } else { 0 }, "lane {l}");
    }
}

/// Divergence and reconvergence: if/else sides compute different values, then a full-warp
/// `shfl.sync` after the join sees every lane's value; a loop with per-lane trip counts
/// (divergent exits) followed by a `redux.sync`; and a collective inside a loop entered by
/// lanes that took different paths before it.
#[test]
fn divergence_reconvergence() {
    let n = 64usize;
    let a: Vec<u32> = (0..n as u32).map(|i| (i * 7) % 11).collect();
    let z = vec![0; n];
    // if (a & 1) v = a * 10 else v = a + 1000; then v' = shfl.idx(v, lane + 1).
    let out = ew32(
        "and.b32 %r5, %r1, 1;\n\tsetp.eq.u32 %p1, %r5, 0;\n\t@%p1 bra $L__even;\n\tmul.lo.u32 %r6, %r1, 10;\n\tbra.uni $L__join;\n$L__even:\n\tadd.u32 %r6, %r1, 1000;\n$L__join:\n\tand.b32 %r7, %r23, 31;\n\tadd.u32 %r7, %r7, 1;\n\tshfl.sync.idx.b32 %r4, %r6, %r7, 31, -1;",
        &a,
        &z,
        &z,
    );
    let v = |x: u32| if x & 1 == 1 { x * 10 } else { x + 1000 };
    for i in 0..n {
        let src = i / 32 * 32 + (i % 32 + 1) % 32;
        assert_eq!(out[i], v(a[src]), "lane {i}");
    }
    // for (k = 0; k < a; k++) s += k + 1; then the warp sum of s.
    let out = ew32(
        "mov.u32 %r5, 0;\n\tmov.u32 %r6, 0;\n$L__loop:\n\tsetp.ge.u32 %p1, %r6, %r1;\n\t@%p1 bra $L__out;\n\tadd.u32 %r6, %r6, 1;\n\tadd.u32 %r5, %r5, %r6;\n\tbra.uni $L__loop;\n$L__out:\n\tredux.sync.add.u32 %r4, %r5, -1;",
        &a,
        &z,
        &z,
    );
    for i in 0..n {
        let w = i / 32 * 32;
        let want: u32 = a[w..w + 32].iter().map(|&x| x * (x + 1) / 2).sum();
        assert_eq!(out[i], want);
    }
    // Lanes < 13 add 5, the rest double; then 4 rounds of v += shfl.bfly(v, 1 << r).
    let out = ew32(
        "and.b32 %r7, %r23, 31;\n\tsetp.lt.u32 %p1, %r7, 13;\n\t@%p1 bra $L__a;\n\tshl.b32 %r5, %r1, 1;\n\tbra.uni $L__b;\n$L__a:\n\tadd.u32 %r5, %r1, 5;\n$L__b:\n\tmov.u32 %r6, 0;\n$L__loop:\n\tmov.u32 %r8, 1;\n\tshl.b32 %r8, %r8, %r6;\n\tshfl.sync.bfly.b32 %r9, %r5, %r8, 31, -1;\n\tadd.u32 %r5, %r5, %r9;\n\tadd.u32 %r6, %r6, 1;\n\tsetp.lt.u32 %p2, %r6, 4;\n\t@%p2 bra $L__loop;\n\tmov.u32 %r4, %r5;",
        &a,
        &z,
        &z,
    );
    for w in 0..n / 32 {
        let mut v: Vec<u32> = (0..32).map(|l| if l < 13 { a[w * 32 + l] + 5 } else { a[w * 32 + l] * 2 }).collect();
        for r in 0..4 {
            v = (0..32).map(|l| v[l] + v[l ^ (1 << r)]).collect();
        }
        assert_eq!(&out[w * 32..w * 32 + 32], &v[..]);
    }
}

/// Collectives whose destination is also their source ("Instruction Operands": every source is
/// read before the destination is written, for all threads of the collective), e.g.
/// `shfl.sync.bfly.b32 %r1, %r1, 1, 31, -1`.
#[test]
fn collectives_with_aliased_operands() {
    let n = 64usize;
    let a: Vec<u32> = (0..n as u32).map(|i| i * 5 + 3).collect();
    let z = vec![0; n];
    let cases: [(&str, fn(&[u32], usize) -> u32); 5] = [
        ("shfl.sync.bfly.b32 %r1, %r1, 1, 31, -1;", |w, l| w[l ^ 1]),
        ("shfl.sync.down.b32 %r1, %r1, 3, 31, -1;", |w, l| if l + 3 < 32 { w[l + 3] } else { w[l] }),
        ("shfl.sync.idx.b32 %r1, %r1, %r1, 31, -1;", |w, l| w[(w[l] % 32) as usize]),
        ("redux.sync.add.u32 %r1, %r1, -1;", |w, _| w.iter().sum()),
        ("match.any.sync.b32 %r1, %r1, -1;", |w, l| (0..32).filter(|&j| w[j] % 7 == w[l] % 7).map(|j| 1u32 << j).sum()),
    ];
    for (inst, f) in cases {
        let pre = if inst.starts_with("match") { "rem.u32 %r1, %r1, 7;\n\t" } else { "" };
        let out = ew32(&format!("{pre}{inst}\n\tmov.u32 %r4, %r1;"), &a, &z, &z);
        for i in 0..n {
            let w = &a[i / 32 * 32..i / 32 * 32 + 32];
            assert_eq!(out[i], f(w, i % 32), "`{inst}` lane {i}");
        }
    }
}

/// Named barriers with a thread count ("bar.sync": `bar.sync a, b` waits for b threads at
/// barrier a; `bar.arrive a, b` arrives without waiting): warps 0–1 meet at barrier 1 and warps
/// 2–3 at barrier 2, independently; a producer warp `bar.arrive`s and consumers `bar.sync`.
#[test]
fn named_barriers_with_counts() {
    let ptx = format!(
        r#".visible .entry nb(
	.param .u64 nb_param_0
)
{{
{REGS}	.shared .align 4 .b32 sm[128];
	ld.param.u64 %rd1, [nb_param_0];
	mov.u32 %r1, %tid.x;
	mov.u32 %r2, sm;
	shl.b32 %r3, %r1, 2;
	add.s32 %r4, %r2, %r3;
	mul.lo.u32 %r5, %r1, 11;
	st.shared.u32 [%r4], %r5;
	shr.u32 %r6, %r1, 6;
	setp.eq.u32 %p1, %r6, 0;
	@%p1 bar.sync 1, 64;
	@!%p1 bar.sync 2, 64;
	// read the word of the thread 32 away, inside the same pair of warps
	xor.b32 %r7, %r1, 32;
	shl.b32 %r8, %r7, 2;
	add.s32 %r9, %r2, %r8;
	ld.shared.u32 %r10, [%r9];
	// producer/consumer: warp 0 writes then arrives at barrier 3; warps 1-3 wait there
	shr.u32 %r11, %r1, 5;
	setp.eq.u32 %p2, %r11, 0;
	@!%p2 bra $L__consumer;
	add.u32 %r12, %r1, 5000;
	st.shared.u32 [%r4+0], %r12;
	bar.arrive 3, 128;
	bra.uni $L__out;
$L__consumer:
	bar.sync 3, 128;
	and.b32 %r13, %r1, 31;
	shl.b32 %r14, %r13, 2;
	add.s32 %r15, %r2, %r14;
	ld.shared.u32 %r10, [%r15];
$L__out:
	mul.wide.u32 %rd2, %r1, 4;
	add.s64 %rd3, %rd1, %rd2;
	st.global.u32 [%rd3], %r10;
	ret;
}}
"#
    );
    let d = Dev::new();
    let p = d.zeros(128 * 4);
    d.run(&ptx, "nb", 1, 128, &[Arg::Ptr(p)]);
    let out: Vec<u32> = d.read(p, 128);
    for t in 0..128u32 {
        let want = if t < 32 { (t ^ 32) * 11 } else { 5000 + (t % 32) };
        assert_eq!(out[t as usize], want, "thread {t}");
    }
}

/// Collectives with partial membermasks from divergent code: `vote.sync.ballot` and
/// `redux.sync` over the lanes 0–15 that took a branch.
#[test]
fn partial_mask_vote_redux() {
    let a: Vec<u32> = (0..32).map(|i| i * 3 + 1).collect();
    let z = vec![0; 32];
    let out = ew32(
        "and.b32 %r5, %r23, 31;\n\tsetp.ge.u32 %p1, %r5, 16;\n\t@%p1 bra $L__skip;\n\tand.b32 %r6, %r1, 1;\n\tsetp.ne.u32 %p2, %r6, 0;\n\tvote.sync.ballot.b32 %r7, %p2, 0xFFFF;\n\tredux.sync.max.u32 %r8, %r1, 0xFFFF;\n\txor.b32 %r4, %r7, %r8;\n$L__skip:",
        &a,
        &z,
        &z,
    );
    let ballot: u32 = (0..16).filter(|&l| a[l] & 1 == 1).map(|l| 1u32 << l).sum();
    for l in 0..32 {
        assert_eq!(out[l], if l < 16 { ballot ^ a[15] } else { 0 }, "lane {l}");
    }
}

/// Divergent sides that each run their own collective with a disjoint membermask
/// ("shfl.sync": membermask names the participating threads), nested divergence followed by a
/// full-warp `vote` after both levels reconverge, and `bar.warp.sync` ("bar.warp.sync": a
/// barrier for the threads in membermask).
#[test]
fn disjoint_masks_nested_divergence_warp_barrier() {
    let a: Vec<u32> = (0..64).map(|i| i * 2 + 1).collect();
    let z = vec![0u32; 64];
    let out = ew32(
        "and.b32 %r5, %r23, 31;\n\tsetp.lt.u32 %p1, %r5, 16;\n\t@!%p1 bra $L__hi;\n\tshfl.sync.bfly.b32 %r6, %r1, 1, 31, 0xFFFF;\n\tbra.uni $L__join;\n$L__hi:\n\tshfl.sync.down.b32 %r6, %r1, 2, 31, 0xFFFF0000;\n$L__join:\n\tbar.warp.sync -1;\n\tmov.u32 %r4, %r6;",
        &a,
        &z,
        &z,
    );
    for i in 0..64 {
        let l = i % 32;
        let w = i / 32 * 32;
        let want = if l < 16 {
            a[w + (l ^ 1)]
        } else if l + 2 < 32 {
            a[w + l + 2]
        } else {
            a[i]
        };
        assert_eq!(out[i], want, "lane {i}");
    }
    // if (l < 20) { if (l & 1) v = 1 else v = 2 } else v = 4; ballot(v == 2) after the join.
    let out = ew32(
        "and.b32 %r5, %r23, 31;\n\tsetp.lt.u32 %p1, %r5, 20;\n\t@!%p1 bra $L__else;\n\tand.b32 %r7, %r5, 1;\n\tsetp.eq.u32 %p2, %r7, 1;\n\t@%p2 bra $L__odd;\n\tmov.u32 %r6, 2;\n\tbra.uni $L__inner;\n$L__odd:\n\tmov.u32 %r6, 1;\n$L__inner:\n\tbra.uni $L__join;\n$L__else:\n\tmov.u32 %r6, 4;\n$L__join:\n\tsetp.eq.u32 %p3, %r6, 2;\n\tvote.sync.ballot.b32 %r8, %p3, -1;\n\tredux.sync.add.u32 %r9, %r6, -1;\n\txor.b32 %r4, %r8, %r9;",
        &a,
        &z,
        &z,
    );
    let ballot: u32 = (0..20).filter(|l| l % 2 == 0).map(|l| 1u32 << l).sum();
    let sum: u32 = (0..32)
        .map(|l| {
            if l < 20 {
                if l % 2 == 1 {
                    1
                } else {
                    2
                }
            } else {
                4
            }
        })
        .sum();
    assert!(out.iter().all(|&v| v == ballot ^ sum), "{out:?}");
}
