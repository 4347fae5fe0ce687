//! Register compaction by liveness.
//!
//! Liveness is computed per thread on the control-flow graph (writes are lane-masked, so two
//! virtual registers may share a slot whenever no single thread needs both at once, whatever the
//! other lanes of its warp do). Each virtual register gets the interval `[first, last]` of
//! positions where it is live or mentioned (holes are ignored, which is conservative), and a
//! linear scan packs the intervals into as few slots as possible. Constants and special
//! registers take fixed slots at the start: they are written once, when a warp starts.

use super::lower::VKind;
use super::*;

/// The result of allocation.
pub struct Allocation {
    pub nregs: usize,
    pub consts: Vec<(R, u64)>,
    pub specials: Vec<(R, Special)>,
}

/// Calls `f(reg, is_def)` for every register an operation reads or writes (reads first).
pub fn visit(op: &mut Op, f: &mut dyn FnMut(&mut R, bool)) {
    fn addr(a: &mut Addr, f: &mut dyn FnMut(&mut R, bool)) {
        if let Some(b) = &mut a.base {
            f(b, false);
        }
    }
    match op {
        Op::Nop
        | Op::Fence
        | Op::Bra { .. }
        | Op::Ret
        | Op::Exit
        | Op::Trap
        | Op::Prefetch
        | Op::CpAsyncCommit
        | Op::CpAsyncWait { .. } => {}
        Op::Mov { d, a, .. }
        | Op::IUn { d, a, .. }
        | Op::FUn { d, a, .. }
        | Op::Cvt { d, a, .. }
        | Op::Cvta { d, a, .. } => {
            f(a, false);
            f(d, true);
        }
        Op::Testp { d, a, .. } => {
            f(a, false);
            f(d, true);
        }
        Op::Pack { d, parts, n, .. } => {
            for p in &mut parts[..*n as usize] {
                f(p, false);
            }
            f(d, true);
        }
        Op::Unpack { ds, n, a, .. } => {
            f(a, false);
            for d in &mut ds[..*n as usize] {
                f(d, true);
            }
        }
        Op::IBin { d, a, b, .. }
        | Op::MulWide { d, a, b, .. }
        | Op::FBin { d, a, b, .. }
        | Op::Copysign { d, a, b, .. }
        | Op::CvtPack { d, a, b, .. }
        | Op::Set { d, a, b, .. }
        | Op::PredOp { d, a, b, .. } => {
            f(a, false);
            f(b, false);
            f(d, true);
        }
        Op::Mad { d, a, b, c, .. }
        | Op::Dp { d, a, b, c, .. }
        | Op::Bfe { d, a, b, c, .. }
        | Op::Prmt { d, a, b, c, .. }
        | Op::Lop3 { d, a, b, c, .. }
        | Op::Shf { d, a, b, c, .. }
        | Op::Selp { d, a, b, c, .. }
        | Op::Slct { d, a, b, c, .. }
        | Op::Fma { d, a, b, c, .. } => {
            f(a, false);
            f(b, false);
            f(c, false);
            f(d, true);
        }
        Op::Mad24 { d, a, b, c, .. } => {
            f(a, false);
            f(b, false);
            if let Some(c) = c {
                f(c, false);
            }
            f(d, true);
        }
        Op::Bfi { d, f: fr, b, c, e, .. } => {
            f(fr, false);
            f(b, false);
            f(c, false);
            f(e, false);
            f(d, true);
        }
        Op::Setp { p, q, a, b, bop, .. } => {
            f(a, false);
            f(b, false);
            if let Some((_, c, _)) = bop {
                f(c, false);
            }
            f(p, true);
            if let Some(q) = q {
                f(q, true);
            }
        }
        Op::ReadSpecial { d, .. } | Op::Activemask { d } | Op::CreatePolicy { d } => f(d, true),
        Op::Ld { ds, n, addr: a, .. } => {
            addr(a, f);
            for d in &mut ds[..*n as usize] {
                f(d, true);
            }
        }
        Op::St { srcs, n, addr: a, .. } => {
            addr(a, f);
            for s in &mut srcs[..*n as usize] {
                f(s, false);
            }
        }
        Op::Atom { d, addr: a, b, c, .. } => {
            addr(a, f);
            f(b, false);
            if let Some(c) = c {
                f(c, false);
            }
            if let Some(d) = d {
                f(d, true);
            }
        }
        Op::CpAsync { dst, src, src_size, ignore, .. } => {
            addr(dst, f);
            addr(src, f);
            if let Some(s) = src_size {
                f(s, false);
            }
            if let Some((p, _)) = ignore {
                f(p, false);
            }
        }
        Op::Ldmatrix { num, ds, addr: a, .. } => {
            addr(a, f);
            for d in &mut ds[..*num as usize] {
                f(d, true);
            }
        }
        Op::Stmatrix { num, srcs, addr: a, .. } => {
            addr(a, f);
            for s in &mut srcs[..*num as usize] {
                f(s, false);
            }
        }
        Op::Mma { k, cd, ds, a, b, c, .. } => {
            let (na, nb) = if *k == 16 { (4, 2) } else { (2, 1) };
            let nc = if *cd == MmaTy::F32 { 4 } else { 2 };
            for r in &mut a[..na] {
                f(r, false);
            }
            for r in &mut b[..nb] {
                f(r, false);
            }
            for r in &mut c[..nc] {
                f(r, false);
            }
            for r in &mut ds[..nc] {
                f(r, true);
            }
        }
        Op::Shfl { d, p, a, b, c, mask, .. } => {
            f(a, false);
            f(b, false);
            f(c, false);
            f(mask, false);
            f(d, true);
            if let Some(p) = p {
                f(p, true);
            }
        }
        Op::Vote { d, a, mask, .. } => {
            f(a, false);
            f(mask, false);
            f(d, true);
        }
        Op::Match { d, p, a, mask, .. } => {
            f(a, false);
            f(mask, false);
            f(d, true);
            if let Some(p) = p {
                f(p, true);
            }
        }
        Op::Redux { d, a, mask, .. } => {
            f(a, false);
            f(mask, false);
            f(d, true);
        }
        Op::Bar { id, count, d, p, .. } => {
            f(id, false);
            if let Some(c) = count {
                f(c, false);
            }
            if let Some((p, _)) = p {
                f(p, false);
            }
            if let Some(d) = d {
                f(d, true);
            }
        }
        Op::BarWarp { mask } => f(mask, false),
        Op::Nanosleep { a } => f(a, false),
    }
}

struct BitSet {
    words: usize,
    bits: Vec<u64>,
}

impl BitSet {
    fn new(sets: usize, n: usize) -> Self {
        let words = n.div_ceil(64).max(1);
        BitSet { words, bits: vec![0; words * sets] }
    }
    fn row(&self, i: usize) -> &[u64] {
        &self.bits[i * self.words..(i + 1) * self.words]
    }
    fn row_mut(&mut self, i: usize) -> &mut [u64] {
        let w = self.words;
        &mut self.bits[i * w..(i + 1) * w]
    }
    fn get(&self, i: usize, b: usize) -> bool {
        self.bits[i * self.words + b / 64] >> (b % 64) & 1 != 0
    }
    fn set(&mut self, i: usize, b: usize) {
        self.bits[i * self.words + b / 64] |= 1 << (b % 64);
    }
}

/// Compacts the registers of `code` in place.
pub(crate) fn allocate(code: &mut [Inst], vkind: &[VKind]) -> Allocation {
    // Fixed slots: constants, then specials.
    let mut map: Vec<u32> = vec![u32::MAX; vkind.len()];
    let mut consts = Vec::new();
    let mut specials = Vec::new();
    let mut next = 0u32;
    for (v, k) in vkind.iter().enumerate() {
        if let VKind::Const(c) = k {
            map[v] = next;
            consts.push((next, *c));
            next += 1;
        }
    }
    for (v, k) in vkind.iter().enumerate() {
        if let VKind::Special(s) = k {
            map[v] = next;
            specials.push((next, *s));
            next += 1;
        }
    }
    let fixed = next;
    // Dense numbering of the normal registers.
    let mut dense = vec![u32::MAX; vkind.len()];
    let mut normal = Vec::new();
    for (v, k) in vkind.iter().enumerate() {
        if matches!(k, VKind::Normal) {
            dense[v] = normal.len() as u32;
            normal.push(v);
        }
    }
    let nv = normal.len();
    let n = code.len();
    // Basic blocks.
    let mut leader = vec![false; n + 1];
    leader[0] = true;
    for (i, inst) in code.iter().enumerate() {
        match inst.op {
            Op::Bra { target, .. } => {
                leader[target as usize] = true;
                leader[i + 1] = true;
            }
            Op::Ret | Op::Exit | Op::Trap => leader[i + 1] = true,
            _ => {}
        }
    }
    let starts: Vec<usize> = (0..n).filter(|&i| leader[i]).collect();
    let nb = starts.len();
    let mut block_of = vec![0usize; n];
    for (b, &s) in starts.iter().enumerate() {
        let e = starts.get(b + 1).copied().unwrap_or(n);
        for x in block_of.iter_mut().take(e).skip(s) {
            *x = b;
        }
    }
    let ends: Vec<usize> = (0..nb).map(|b| starts.get(b + 1).copied().unwrap_or(n)).collect();
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); nb];
    for b in 0..nb {
        let last = ends[b] - 1;
        let inst = &code[last];
        let fall = ends[b] < n;
        match inst.op {
            Op::Bra { target, .. } => {
                succ[b].push(block_of[target as usize]);
                if inst.guard.is_some() && fall {
                    succ[b].push(b + 1);
                }
            }
            Op::Ret | Op::Exit | Op::Trap => {
                if inst.guard.is_some() && fall {
                    succ[b].push(b + 1);
                }
            }
            _ => {
                if fall {
                    succ[b].push(b + 1);
                }
            }
        }
    }
    // use/def per block.
    let mut uses = BitSet::new(nb, nv);
    let mut defs = BitSet::new(nb, nv);
    for b in 0..nb {
        for inst in code.iter_mut().take(ends[b]).skip(starts[b]) {
            let guarded = inst.guard.is_some();
            if let Some((g, _)) = &inst.guard {
                let d = dense[*g as usize];
                if d != u32::MAX && !defs.get(b, d as usize) {
                    uses.set(b, d as usize);
                }
            }
            let mut reads = Vec::new();
            let mut writes = Vec::new();
            visit(&mut inst.op, &mut |r, is_def| {
                let d = dense[*r as usize];
                if d != u32::MAX {
                    if is_def {
                        writes.push(d as usize)
                    } else {
                        reads.push(d as usize)
                    }
                }
            });
            for r in reads {
                if !defs.get(b, r) {
                    uses.set(b, r);
                }
            }
            for w in writes {
                if guarded {
                    // A guarded write may not happen: the old value stays live through it.
                    if !defs.get(b, w) {
                        uses.set(b, w);
                    }
                } else {
                    defs.set(b, w);
                }
            }
        }
    }
    // Fixpoint: in = use ∪ (out − def), out = ∪ in(succ).
    let mut live_in = BitSet::new(nb, nv);
    let mut live_out = BitSet::new(nb, nv);
    let words = live_in.words;
    let mut changed = true;
    let mut tmp = vec![0u64; words];
    while changed {
        changed = false;
        for b in (0..nb).rev() {
            tmp.iter_mut().for_each(|w| *w = 0);
            for &s in &succ[b] {
                for (t, x) in tmp.iter_mut().zip(live_in.row(s)) {
                    *t |= x;
                }
            }
            if live_out.row(b) != tmp.as_slice() {
                live_out.row_mut(b).copy_from_slice(&tmp);
            }
            let (u, d) = (uses.row(b), defs.row(b));
            let mut diff = false;
            let newin: Vec<u64> = (0..words).map(|w| u[w] | (tmp[w] & !d[w])).collect();
            if live_in.row(b) != newin.as_slice() {
                diff = true;
                live_in.row_mut(b).copy_from_slice(&newin);
            }
            changed |= diff;
        }
    }
    // Intervals.
    let mut lo = vec![usize::MAX; nv];
    let mut hi = vec![0usize; nv];
    for (i, inst) in code.iter_mut().enumerate() {
        let mut touch = |r: &mut R| {
            let d = dense[*r as usize];
            if d != u32::MAX {
                let d = d as usize;
                lo[d] = lo[d].min(i);
                hi[d] = hi[d].max(i);
            }
        };
        if let Some((g, _)) = &mut inst.guard {
            touch(g);
        }
        visit(&mut inst.op, &mut |r, _| touch(r));
    }
    for b in 0..nb {
        for w in 0..words {
            let (mut li, mut lo_) = (live_in.row(b)[w], live_out.row(b)[w]);
            while li != 0 {
                let v = w * 64 + li.trailing_zeros() as usize;
                li &= li - 1;
                lo[v] = lo[v].min(starts[b]);
                hi[v] = hi[v].max(starts[b]);
            }
            while lo_ != 0 {
                let v = w * 64 + lo_.trailing_zeros() as usize;
                lo_ &= lo_ - 1;
                lo[v] = lo[v].min(ends[b] - 1);
                hi[v] = hi[v].max(ends[b] - 1);
            }
        }
    }
    // Linear scan (LOWBIT_SIM_NO_COMPACT=1 gives every virtual register its own slot: a debugging aid).
    if std::env::var("LOWBIT_SIM_NO_COMPACT").is_ok_and(|v| v == "1") {
        for v in 0..nv {
            lo[v] = v;
            hi[v] = usize::MAX;
        }
    }
    let mut order: Vec<usize> = (0..nv).filter(|&v| lo[v] != usize::MAX).collect();
    order.sort_by_key(|&v| (lo[v], hi[v]));
    let mut active: std::collections::BinaryHeap<std::cmp::Reverse<(usize, u32)>> = Default::default();
    let mut free: Vec<u32> = Vec::new();
    let mut top = fixed;
    for v in order {
        while let Some(&std::cmp::Reverse((end, slot))) = active.peek() {
            if end < lo[v] {
                active.pop();
                free.push(slot);
            } else {
                break;
            }
        }
        let slot = free.pop().unwrap_or_else(|| {
            top += 1;
            top - 1
        });
        map[normal[v]] = slot;
        active.push(std::cmp::Reverse((hi[v], slot)));
    }
    // Registers never mentioned keep no slot; give any stray one slot 0 of its own kind.
    let spare = top;
    let mut used_spare = false;
    for inst in code.iter_mut() {
        let mut remap = |r: &mut R| {
            let m = map[*r as usize];
            *r = if m == u32::MAX {
                used_spare = true;
                spare
            } else {
                m
            };
        };
        if let Some((g, _)) = &mut inst.guard {
            remap(g);
        }
        visit(&mut inst.op, &mut |r, _| remap(r));
    }
    Allocation { nregs: (top + used_spare as u32) as usize, consts, specials }
}
