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
