//! AST → IR: register resolution in nested scopes, typed operations, constant registers,
//! branch targets, shared-memory layout, and then register compaction.

use std::collections::HashMap;
use std::sync::Arc;

use super::*;
use crate::ptx::ast::{self, Operand as O, Stmt};
use crate::{Result, SimError};

/// What a virtual register holds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum VKind {
    Normal,
    Const(u64),
    Special(Special),
}

pub(crate) struct Lowerer<'m> {
    pub vkind: Vec<VKind>,
    /// Declared width of each virtual register (1 for predicates, 0 for constants/specials).
    vbits: Vec<u8>,
    scopes: Vec<HashMap<String, R>>,
    consts: HashMap<u64, R>,
    specials: HashMap<Special, R>,
    /// Shared symbol → offset in the shared window (or the dynamic base for extern arrays).
    shared: &'m HashMap<String, SharedSym>,
    params: HashMap<String, usize>,
    kernel_shared: HashMap<String, SharedSym>,
    pub used_shared: Vec<String>,
    /// `.local` variables: name → offset in the thread's local frame.
    locals: HashMap<String, u64>,
    pub local_bytes: u64,
}

#[derive(Clone, Debug)]
pub(crate) struct SharedSym {
    pub decl: ast::VarDecl,
}

type L<T> = std::result::Result<T, String>;

fn int_ty(s: &str) -> Option<IntTy> {
    let (signed, rest) = match s.as_bytes().first()? {
        b'u' | b'b' => (false, &s[1..]),
        b's' => (true, &s[1..]),
        _ => return None,
    };
    let bits: u8 = rest.parse().ok()?;
    matches!(bits, 8 | 16 | 32 | 64).then_some(IntTy { bits, signed })
}

fn ty_of(s: &str) -> Option<Ty> {
    Some(match s {
        "f16" => Ty::F(FTy::F16),
        "bf16" => Ty::F(FTy::BF16),
        "f16x2" => Ty::F(FTy::F16x2),
        "bf16x2" => Ty::F(FTy::BF16x2),
        "f32" => Ty::F(FTy::F32),
        "f64" => Ty::F(FTy::F64),
        "pred" => Ty::Pred,
        "b128" => Ty::Int(IntTy { bits: 128, signed: false }),
        _ => Ty::Int(int_ty(s)?),
    })
}

fn special_of(name: &str) -> Option<Special> {
    let dim = |s: &str| match s {
        "x" => Some(0),
        "y" => Some(1),
        "z" => Some(2),
        _ => None,
    };
    let (base, d) = name.split_once('.').map_or((name, None), |(a, b)| (a, dim(b)));
    Some(match (base, d) {
        ("%tid", Some(d)) => Special::Tid(d),
        ("%ntid", Some(d)) => Special::Ntid(d),
        ("%ctaid", Some(d)) => Special::Ctaid(d),
        ("%nctaid", Some(d)) => Special::Nctaid(d),
        ("%laneid", None) => Special::LaneId,
        ("%warpid", None) => Special::WarpId,
        ("%nwarpid", None) => Special::NWarpId,
        ("%smid", None) => Special::SmId,
        ("%nsmid", None) => Special::NSmId,
        ("%gridid", None) => Special::GridId,
        ("%lanemask_eq", None) => Special::LaneMaskEq,
        ("%lanemask_le", None) => Special::LaneMaskLe,
        ("%lanemask_lt", None) => Special::LaneMaskLt,
        ("%lanemask_ge", None) => Special::LaneMaskGe,
        ("%lanemask_gt", None) => Special::LaneMaskGt,
        ("%dynamic_smem_size", None) => Special::DynamicSmemSize,
        ("%total_smem_size", None) => Special::TotalSmemSize,
        ("%clock", None) => Special::Clock,
        ("%clock64", None) => Special::Clock64,
        ("%globaltimer", None) => Special::GlobalTimer,
        _ => return None,
    })
}

fn is_runtime_special(s: Special) -> bool {
    matches!(s, Special::Clock | Special::Clock64 | Special::GlobalTimer)
}

impl<'m> Lowerer<'m> {
    fn new_vreg(&mut self, k: VKind) -> R {
        self.vkind.push(k);
        self.vbits.push(0);
        (self.vkind.len() - 1) as R
    }

    fn konst(&mut self, v: u64) -> R {
        if let Some(&r) = self.consts.get(&v) {
            return r;
        }
        let r = self.new_vreg(VKind::Const(v));
        self.consts.insert(v, r);
        r
    }

    fn lookup(&self, name: &str) -> Option<R> {
        self.scopes.iter().rev().find_map(|s| s.get(name).copied())
    }

    fn declare(&mut self, d: &ast::RegDecl) {
        let bits = match d.ty.as_str() {
            ".pred" => 1,
            t => ty_of(t.trim_start_matches('.')).map_or(64, |t| t.bits() as u8),
        };
        for (name, count) in &d.names {
            match count {
                Some(n) => {
                    for i in 0..*n {
                        let r = self.new_vreg(VKind::Normal);
                        self.vbits[r as usize] = bits;
                        self.scopes.last_mut().unwrap().insert(format!("{name}{i}"), r);
                    }
                }
                None => {
                    let r = self.new_vreg(VKind::Normal);
                    self.vbits[r as usize] = bits;
                    self.scopes.last_mut().unwrap().insert(name.clone(), r);
                }
            }
        }
    }

    fn sym_value(&mut self, s: &str) -> L<u64> {
        if let Some(&off) = self.params.get(s) {
            return Ok(PARAM_BASE + off as u64);
        }
        if let Some(&off) = self.locals.get(s) {
            return Ok(off);
        }
        if self.kernel_shared.contains_key(s) || self.shared.contains_key(s) {
            if !self.used_shared.iter().any(|u| u == s) {
                self.used_shared.push(s.to_string());
            }
            // Resolved after the body is lowered, once the layout is known: placeholder tag.
            return Ok(SHARED_TAG | (self.used_shared.iter().position(|u| u == s).unwrap() as u64) << 32);
        }
        Err(format!("unknown symbol `{s}` (global/const variables and functions are not supported)"))
    }

    /// A source operand as a register (immediates become constant registers).
    fn src(&mut self, o: &O) -> L<R> {
        match o {
            // Inline-asm blocks declare registers without a `%` (`.reg .b32 c;`).
            O::Sym(n) if self.lookup(n).is_some() => Ok(self.lookup(n).unwrap()),
            O::Reg(n) => {
                if let Some(r) = self.lookup(n) {
                    return Ok(r);
                }
                if let Some(s) = special_of(n) {
                    if is_runtime_special(s) {
                        return Err(format!("{n} must be read with mov"));
                    }
                    if let Some(&r) = self.specials.get(&s) {
                        return Ok(r);
                    }
                    let r = self.new_vreg(VKind::Special(s));
                    self.specials.insert(s, r);
                    return Ok(r);
                }
                Err(format!("undeclared register {n}"))
            }
            O::Imm(v) => Ok(self.konst(*v as u64)),
            O::F32(v) => Ok(self.konst(*v as u64)),
            O::F64(v) => Ok(self.konst(*v)),
            O::Sym(s) => {
                let v = self.sym_value(s)?;
                Ok(self.konst(v))
            }
            O::Addr(Some(b), off) if matches!(**b, O::Sym(_)) => {
                let O::Sym(s) = &**b else { unreachable!() };
                let v = self.sym_value(s)?;
                Ok(self.konst(v.wrapping_add(*off as u64)))
            }
            _ => Err(format!("unexpected operand {o:?}")),
        }
    }

    fn dst(&mut self, o: &O) -> L<R> {
        match o {
            O::Reg(n) | O::Sym(n) => self.lookup(n).ok_or_else(|| format!("undeclared register {n}")),
            O::Sink => Ok(self.new_vreg(VKind::Normal)),
            _ => Err(format!("bad destination {o:?}")),
        }
    }

    fn pred_src(&mut self, o: &O) -> L<(R, bool)> {
        match o {
            O::NotReg(n) => Ok((self.src(&O::Reg(n.clone()))?, true)),
            _ => Ok((self.src(o)?, false)),
        }
    }

    fn addr(&mut self, o: &O) -> L<Addr> {
        match o {
            O::Addr(None, off) => Ok(Addr { base: None, off: *off }),
            O::Addr(Some(b), off) => match &**b {
                O::Reg(n) => Ok(Addr { base: Some(self.src(&O::Reg(n.clone()))?), off: *off }),
                O::Sym(s) => {
                    let v = self.sym_value(s)?;
                    Ok(Addr { base: None, off: v.wrapping_add(*off as u64) as i64 })
                }
                _ => Err(format!("bad address {o:?}")),
            },
            _ => Err(format!("expected an address, found {o:?}")),
        }
    }

    fn regs<const N: usize>(&mut self, o: &O, dst: bool) -> L<([R; N], u8)> {
        let mut out = [0; N];
        let list: Vec<O> = match o {
            O::Vec(v) => v.clone(),
            other => vec![other.clone()],
        };
        if list.len() > N {
            return Err(format!("too many vector elements ({})", list.len()));
        }
        for (i, e) in list.iter().enumerate() {
            out[i] = if dst { self.dst(e)? } else { self.src(e)? };
        }
        Ok((out, list.len() as u8))
    }
}

/// Tag bits marking a constant that holds a shared symbol's address before layout.
pub(crate) const SHARED_TAG: u64 = 0x5AED_0000_0000_0000;

fn parse_cmp(m: &str, float: bool) -> Option<Cmp> {
    Some(if float {
        Cmp::F(match m {
            "eq" => FCmp::Eq,
            "ne" => FCmp::Ne,
            "lt" => FCmp::Lt,
            "le" => FCmp::Le,
            "gt" => FCmp::Gt,
            "ge" => FCmp::Ge,
            "equ" => FCmp::Equ,
            "neu" => FCmp::Neu,
            "ltu" => FCmp::Ltu,
            "leu" => FCmp::Leu,
            "gtu" => FCmp::Gtu,
            "geu" => FCmp::Geu,
            "num" => FCmp::Num,
            "nan" => FCmp::Nan,
            _ => return None,
        })
    } else {
        Cmp::I(match m {
            "eq" => ICmp::Eq,
            "ne" => ICmp::Ne,
            "lt" | "lo" => ICmp::Lt,
            "le" | "ls" => ICmp::Le,
            "gt" | "hi" => ICmp::Gt,
            "ge" | "hs" => ICmp::Ge,
            _ => return None,
        })
    })
}

struct Mods<'a> {
    list: Vec<&'a str>,
}

impl<'a> Mods<'a> {
    fn has(&self, m: &str) -> bool {
        self.list.contains(&m)
    }
    fn types(&self) -> Vec<Ty> {
        self.list.iter().filter_map(|m| ty_of(m)).collect()
    }
    fn rnd(&self) -> Option<Rnd> {
        self.list.iter().find_map(|m| match *m {
            "rn" => Some(Rnd::Rn),
            "rz" => Some(Rnd::Rz),
            "rm" => Some(Rnd::Rm),
            "rp" => Some(Rnd::Rp),
            _ => None,
        })
    }
    fn irnd(&self) -> Option<IRnd> {
        self.list.iter().find_map(|m| match *m {
            "rni" => Some(IRnd::Rni),
            "rzi" => Some(IRnd::Rzi),
            "rmi" => Some(IRnd::Rmi),
            "rpi" => Some(IRnd::Rpi),
            _ => None,
        })
    }
    fn fmods(&self) -> FMods {
        FMods {
            rnd: self.rnd().unwrap_or(Rnd::Rn),
            ftz: self.has("ftz"),
            sat: self.has("sat"),
            relu: self.has("relu"),
            nan: self.has("NaN"),
            approx: self.has("approx") || self.has("full"),
        }
    }
    fn space(&self) -> Space {
        for m in &self.list {
            match *m {
                "global" => return Space::Global,
                "shared" | "shared::cta" | "shared::cluster" => return Space::Shared,
                "param" => return Space::Param,
                "local" => return Space::Local,
                "const" => return Space::Const,
                _ => {}
            }
        }
        Space::Generic
    }
    fn vec(&self) -> u8 {
        if self.has("v4") {
            4
        } else if self.has("v2") {
            2
        } else if self.has("v8") {
            8
        } else {
            1
        }
    }
}

impl<'m> Lowerer<'m> {
    fn class_of(op: &Op) -> Class {
        match op {
            Op::FBin { t, .. } | Op::FUn { t, .. } | Op::Fma { t, .. } => match t {
                FTy::F32 | FTy::F64 => Class::Fp32,
                _ => Class::Half2,
            },
            Op::Copysign { .. } | Op::Testp { .. } => Class::Fp32,
            Op::Setp { t: Ty::F(FTy::F32 | FTy::F64), .. } | Op::Set { t: Ty::F(FTy::F32 | FTy::F64), .. } => {
                Class::Fp32
            }
            Op::Setp { t: Ty::F(_), .. } | Op::Set { t: Ty::F(_), .. } => Class::Half2,
            Op::Cvt { .. } | Op::CvtPack { .. } => Class::Convert,
            Op::Mov { .. } | Op::Pack { .. } | Op::Unpack { .. } => Class::Move,
            Op::Mma { .. } => Class::Mma,
            Op::Ld { space: Space::Shared, .. }
            | Op::St { space: Space::Shared, .. }
            | Op::Atom { space: Space::Shared, .. }
            | Op::Ldmatrix { .. }
            | Op::Stmatrix { .. } => Class::Shared,
            Op::Ld { .. } | Op::St { .. } | Op::Atom { .. } | Op::CpAsync { .. } => Class::Global,
            Op::Bra { .. } | Op::Ret | Op::Exit | Op::Trap | Op::Nop => Class::Control,
            Op::Bar { .. }
            | Op::BarWarp { .. }
            | Op::Fence
            | Op::CpAsyncCommit
            | Op::CpAsyncWait { .. }
            | Op::Shfl { .. }
            | Op::Vote { .. }
            | Op::Match { .. }
            | Op::Redux { .. }
            | Op::Activemask { .. }
            | Op::Nanosleep { .. } => Class::Sync,
            _ => Class::Int,
        }
    }

    /// Lowers one instruction; `Err` is a description of what is not supported.
    fn inst(&mut self, i: &ast::Inst, labels: &mut Vec<String>) -> L<Op> {
        let mut parts = i.opcode.split('.');
        let mn = parts.next().unwrap_or("");
        let m = Mods { list: parts.collect() };
        let mut ops: &[O] = &i.operands;
        // `.L2::cache_hint` on ld/st/atom/red/prefetch adds a cache-policy operand at the end: a
        // hint, no effect here (cp.async handles its own form below).
        if mn != "cp" && m.list.contains(&"L2::cache_hint") && !ops.is_empty() {
            ops = &ops[..ops.len() - 1];
        }
        let n = ops.len();
        let want = |k: usize| if n == k { Ok(()) } else { Err(format!("expected {k} operands, found {n}")) };
        let tys = m.types();
        let t0 = tys.first().copied();
        let float = matches!(t0, Some(Ty::F(_)));
        Ok(match mn {
            "mov" => {
                want(2)?;
                let t = t0.ok_or("mov without a type")?;
                let bits = t.bits() as u8;
                match (&ops[0], &ops[1]) {
                    (O::Vec(v), a) => {
                        let (ds, k) = self.regs::<8>(&ops[0], true)?;
                        let a = self.src(a)?;
                        Op::Unpack { ds, n: k, part: bits / v.len() as u8, a }
                    }
                    (d, O::Vec(v)) => {
                        let d = self.dst(d)?;
                        let (parts, k) = self.regs::<8>(&ops[1], false)?;
                        Op::Pack { d, parts, n: k, part: bits / v.len() as u8 }
                    }
                    (d, O::Reg(s)) if special_of(s).is_some_and(is_runtime_special) => {
                        Op::ReadSpecial { d: self.dst(d)?, s: special_of(s).unwrap() }
                    }
                    (d, a) => {
                        let a = self.src(a)?;
                        Op::Mov { d: self.dst(d)?, a, bits }
                    }
                }
            }
            "add" | "sub" | "mul" | "div" | "rem" | "min" | "max" | "and" | "or" | "xor" | "shl" | "shr" if !float => {
                want(3)?;
                let t = match t0 {
                    Some(Ty::Int(t)) => t,
                    Some(Ty::Pred) => {
                        let op = match mn {
                            "and" => 0,
                            "or" => 1,
                            "xor" => 2,
                            _ => return Err(format!("{mn}.pred")),
                        };
                        let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                        return Ok(Op::PredOp { op, d: self.dst(&ops[0])?, a, b });
                    }
                    _ => return Err("missing type".into()),
                };
                if m.has("cc") {
                    return Err("carry-chain arithmetic (.cc)".into());
                }
                let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                let d = self.dst(&ops[0])?;
                if mn == "mul" && m.has("wide") {
                    return Ok(Op::MulWide { t, d, a, b });
                }
                let op = match (mn, m.has("sat")) {
                    ("add", false) => IOp::Add,
                    ("add", true) => IOp::AddSat,
                    ("sub", false) => IOp::Sub,
                    ("sub", true) => IOp::SubSat,
                    ("mul", _) if m.has("hi") => IOp::MulHi,
                    ("mul", _) => IOp::MulLo,
                    ("div", _) => IOp::Div,
                    ("rem", _) => IOp::Rem,
                    ("min", _) => IOp::Min,
                    ("max", _) => IOp::Max,
                    ("and", _) => IOp::And,
                    ("or", _) => IOp::Or,
                    ("xor", _) => IOp::Xor,
                    ("shl", _) => IOp::Shl,
                    _ => IOp::Shr,
                };
                if t.bits == 128 {
                    return Err("128-bit integers".into());
                }
                Op::IBin { op, t, d, a, b }
            }
            "mul24" | "mad24" => {
                let Some(Ty::Int(t)) = t0 else { return Err("type".into()) };
                if m.has("hi") {
                    return Err(format!("{mn}.hi"));
                }
                let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                let c = if mn == "mad24" { Some(self.src(&ops[3])?) } else { None };
                Op::Mad24 { t, d: self.dst(&ops[0])?, a, b, c }
            }
            "mad" if !float => {
                want(4)?;
                let Some(Ty::Int(t)) = t0 else { return Err("type".into()) };
                if m.has("cc") {
                    return Err("carry-chain arithmetic (.cc)".into());
                }
                let mode = if m.has("wide") {
                    2
                } else if m.has("hi") {
                    1
                } else {
                    0
                };
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Mad { mode, t, d: self.dst(&ops[0])?, a, b, c }
            }
            "not" | "cnot" | "popc" | "clz" | "brev" | "bfind" | "neg" | "abs" if !float => {
                want(2)?;
                let a = self.src(&ops[1])?;
                let d = self.dst(&ops[0])?;
                match t0 {
                    Some(Ty::Pred) if mn == "not" => Op::PredOp { op: 3, d, a, b: a },
                    Some(Ty::Int(t)) => {
                        let op = match mn {
                            "not" => IUnOp::Not,
                            "cnot" => IUnOp::Cnot,
                            "popc" => IUnOp::Popc,
                            "clz" => IUnOp::Clz,
                            "brev" => IUnOp::Brev,
                            "bfind" if m.has("shiftamt") => IUnOp::BfindShift,
                            "bfind" => IUnOp::Bfind,
                            "neg" => IUnOp::Neg,
                            _ => IUnOp::Abs,
                        };
                        Op::IUn { op, t, d, a }
                    }
                    _ => return Err("type".into()),
                }
            }
            "dp4a" | "dp2a" => {
                want(4)?;
                let (Some(Ty::Int(ta)), Some(Ty::Int(tb))) = (tys.first().copied(), tys.get(1).copied()) else {
                    return Err("dp4a/dp2a need two integer types".into());
                };
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Dp {
                    two: mn == "dp2a",
                    hi: m.has("hi"),
                    sa: ta.signed,
                    sb: tb.signed,
                    d: self.dst(&ops[0])?,
                    a,
                    b,
                    c,
                }
            }
            "bfe" => {
                want(4)?;
                let Some(Ty::Int(t)) = t0 else { return Err("type".into()) };
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Bfe { t, d: self.dst(&ops[0])?, a, b, c }
            }
            "bfi" => {
                want(5)?;
                let Some(t) = t0 else { return Err("type".into()) };
                let (f, b, c, e) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?, self.src(&ops[4])?);
                Op::Bfi { bits: t.bits() as u8, d: self.dst(&ops[0])?, f, b, c, e }
            }
            "prmt" => {
                want(4)?;
                let mode = ["f4e", "b4e", "rc8", "ecl", "ecr", "rc16"]
                    .iter()
                    .position(|x| m.has(x))
                    .map_or(0, |p| p as u8 + 1);
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Prmt { mode, d: self.dst(&ops[0])?, a, b, c }
            }
            "lop3" => {
                if n != 5 {
                    return Err("lop3 with a predicate output".into());
                }
                let O::Imm(lut) = ops[4] else { return Err("lop3 LUT must be an immediate".into()) };
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Lop3 { d: self.dst(&ops[0])?, a, b, c, lut: lut as u8 }
            }
            "shf" => {
                want(4)?;
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Shf { left: m.has("l"), clamp: m.has("clamp"), d: self.dst(&ops[0])?, a, b, c }
            }
            "setp" | "set" => {
                let t = *tys.last().ok_or("setp without a type")?;
                let fl = matches!(t, Ty::F(_));
                let cmp = m.list.iter().find_map(|x| parse_cmp(x, fl)).ok_or("comparison")?;
                let bop = m.list.iter().find_map(|x| match *x {
                    "and" => Some(BoolOp::And),
                    "or" => Some(BoolOp::Or),
                    "xor" => Some(BoolOp::Xor),
                    _ => None,
                });
                let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                if mn == "set" {
                    if bop.is_some() {
                        return Err("set with a boolean operation".into());
                    }
                    let dt = tys[0];
                    return Ok(Op::Set { cmp, t, dt, d: self.dst(&ops[0])?, a, b });
                }
                let (p, q) = match &ops[0] {
                    O::Pair(p, q) => (self.dst(p)?, Some(self.dst(q)?)),
                    o => (self.dst(o)?, None),
                };
                let bop = match bop {
                    Some(o) => {
                        let (c, neg) = self.pred_src(&ops[3])?;
                        Some((o, c, neg))
                    }
                    None => None,
                };
                Op::Setp { cmp, t, ftz: m.has("ftz"), p, q, a, b, bop }
            }
            "selp" => {
                want(4)?;
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Selp { d: self.dst(&ops[0])?, a, b, c }
            }
            "slct" => {
                want(4)?;
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Slct { d: self.dst(&ops[0])?, a, b, c, cf32: matches!(tys.last(), Some(Ty::F(FTy::F32))) }
            }
            "add" | "sub" | "mul" | "div" | "min" | "max" => {
                want(3)?;
                let Some(Ty::F(t)) = t0 else { return Err("type".into()) };
                let op = match mn {
                    "add" => FOp::Add,
                    "sub" => FOp::Sub,
                    "mul" => FOp::Mul,
                    "div" => FOp::Div,
                    "min" => FOp::Min,
                    _ => FOp::Max,
                };
                let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                Op::FBin { op, t, m: m.fmods(), d: self.dst(&ops[0])?, a, b }
            }
            "fma" | "mad" => {
                want(4)?;
                let Some(Ty::F(t)) = t0 else { return Err("type".into()) };
                let (a, b, c) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?);
                Op::Fma { t, m: m.fmods(), d: self.dst(&ops[0])?, a, b, c }
            }
            "abs" | "neg" | "sqrt" | "rcp" | "rsqrt" | "ex2" | "lg2" | "sin" | "cos" | "tanh" => {
                want(2)?;
                let Some(Ty::F(t)) = t0 else { return Err("type".into()) };
                let approx = m.has("approx");
                let op = match mn {
                    "abs" => FUnOp::Abs,
                    "neg" => FUnOp::Neg,
                    "sqrt" if approx => FUnOp::SqrtApprox,
                    "sqrt" => FUnOp::Sqrt,
                    "rcp" if approx => FUnOp::RcpApprox,
                    "rcp" => FUnOp::Rcp,
                    "rsqrt" => FUnOp::Rsqrt,
                    "ex2" => FUnOp::Ex2,
                    "lg2" => FUnOp::Lg2,
                    "sin" => FUnOp::Sin,
                    "cos" => FUnOp::Cos,
                    _ => FUnOp::Tanh,
                };
                if !matches!(t, FTy::F32 | FTy::F64)
                    && !matches!(op, FUnOp::Abs | FUnOp::Neg | FUnOp::Ex2 | FUnOp::Tanh)
                {
                    return Err(format!("{mn} on {t:?}"));
                }
                let a = self.src(&ops[1])?;
                Op::FUn { op, t, m: m.fmods(), d: self.dst(&ops[0])?, a }
            }
            "copysign" => {
                want(3)?;
                let Some(Ty::F(t)) = t0 else { return Err("type".into()) };
                let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                Op::Copysign { t, d: self.dst(&ops[0])?, a, b }
            }
            "testp" => {
                want(2)?;
                let Some(Ty::F(t)) = t0 else { return Err("type".into()) };
                let kind = ["finite", "infinite", "number", "notanumber", "normal", "subnormal"]
                    .iter()
                    .position(|x| m.has(x))
                    .ok_or("testp kind")? as u8;
                let a = self.src(&ops[1])?;
                Op::Testp { t, kind, d: self.dst(&ops[0])?, a }
            }
            "cvt" => {
                if tys.len() != 2 {
                    return Err("cvt needs two types".into());
                }
                let (dt, st) = (tys[0], tys[1]);
                if matches!(dt, Ty::F(FTy::F16x2 | FTy::BF16x2)) {
                    want(3)?;
                    if st != Ty::F(FTy::F32) {
                        return Err(format!("cvt to a packed type from {st:?}"));
                    }
                    let (a, b) = (self.src(&ops[1])?, self.src(&ops[2])?);
                    return Ok(Op::CvtPack {
                        bf: dt == Ty::F(FTy::BF16x2),
                        rnd: m.rnd().ok_or("cvt to a packed type needs a rounding mode")?,
                        relu: m.has("relu"),
                        satfinite: m.has("satfinite"),
                        d: self.dst(&ops[0])?,
                        a,
                        b,
                    });
                }
                want(2)?;
                if matches!(st, Ty::F(FTy::F16x2 | FTy::BF16x2)) || dt == Ty::Pred || st == Ty::Pred {
                    return Err(format!("cvt {dt:?} <- {st:?}"));
                }
                let a = self.src(&ops[1])?;
                Op::Cvt {
                    dt,
                    st,
                    rnd: m.rnd(),
                    irnd: m.irnd(),
                    ftz: m.has("ftz"),
                    sat: m.has("sat"),
                    relu: m.has("relu"),
                    satfinite: m.has("satfinite"),
                    d: self.dst(&ops[0])?,
                    a,
                }
            }
            "cvta" => {
                want(2)?;
                let a = self.src(&ops[1])?;
                Op::Cvta { to: m.has("to"), space: m.space(), d: self.dst(&ops[0])?, a }
            }
            "ld" | "ldu" => {
                want(2)?;
                let t = *tys.last().ok_or("ld without a type")?;
                let space = m.space();
                if matches!(space, Space::Const) {
                    return Err("ld.const (constant memory)".to_string());
                }
                let (ds, k) = self.regs::<4>(&ops[0], true)?;
                if k != m.vec() {
                    return Err("vector width does not match the operands".into());
                }
                let addr = self.addr(&ops[1])?;
                Op::Ld { space, t, n: k, ds, addr, volatile: m.has("volatile") || m.has("relaxed") || m.has("acquire") }
            }
            "st" => {
                want(2)?;
                let t = *tys.last().ok_or("st without a type")?;
                let space = m.space();
                if matches!(space, Space::Const | Space::Param) {
                    return Err(format!("st.{space:?}"));
                }
                let (srcs, k) = self.regs::<4>(&ops[1], false)?;
                if k != m.vec() {
                    return Err("vector width does not match the operands".into());
                }
                let addr = self.addr(&ops[0])?;
                Op::St { space, t, n: k, srcs, addr }
            }
            "atom" | "red" => {
                let t = *tys.last().ok_or("atom without a type")?;
                let space = m.space();
                let op = m
                    .list
                    .iter()
                    .find_map(|x| match *x {
                        "add" => Some(AtomOp::Add),
                        "min" => Some(AtomOp::Min),
                        "max" => Some(AtomOp::Max),
                        "exch" => Some(AtomOp::Exch),
                        "cas" => Some(AtomOp::Cas),
                        "and" => Some(AtomOp::And),
                        "or" => Some(AtomOp::Or),
                        "xor" => Some(AtomOp::Xor),
                        "inc" => Some(AtomOp::Inc),
                        "dec" => Some(AtomOp::Dec),
                        _ => None,
                    })
                    .ok_or("atomic operation")?;
                if m.vec() != 1 {
                    return Err("vector atomics (.v2/.v4/.v8)".into());
                }
                if matches!(t, Ty::F(FTy::F16x2 | FTy::BF16x2 | FTy::F16 | FTy::BF16))
                    && !matches!(op, AtomOp::Add | AtomOp::Exch | AtomOp::Cas)
                {
                    return Err(format!("{op:?} on 16-bit floats"));
                }
                let (d, rest) = if mn == "atom" { (Some(self.dst(&ops[0])?), &ops[1..]) } else { (None, ops) };
                let addr = self.addr(&rest[0])?;
                let b = self.src(&rest[1])?;
                let c = if op == AtomOp::Cas { Some(self.src(&rest[2])?) } else { None };
                Op::Atom { space, op, t, d, addr, b, c }
            }
            "cp" => {
                if m.has("commit_group") {
                    return Ok(Op::CpAsyncCommit);
                }
                if m.has("wait_group") {
                    let O::Imm(k) = ops.first().ok_or("wait_group N")? else { return Err("wait_group N".into()) };
                    return Ok(Op::CpAsyncWait { n: *k as u32 });
                }
                if m.has("wait_all") {
                    return Ok(Op::CpAsyncWait { n: u32::MAX });
                }
                if !m.has("async") || m.has("bulk") {
                    return Err("cp other than cp.async".into());
                }
                let dst = self.addr(&ops[0])?;
                let src = self.addr(&ops[1])?;
                let O::Imm(size) = ops.get(2).ok_or("cp-size")? else {
                    return Err("cp-size must be an immediate".into());
                };
                if !matches!(size, 4 | 8 | 16) || (m.has("cg") && *size != 16) {
                    return Err(format!("cp.async size {size}"));
                }
                let mut src_size = None;
                let mut ignore = None;
                let mut extra = &ops[3..];
                if m.list.iter().any(|x| x.starts_with("L2::cache_hint")) && !extra.is_empty() {
                    extra = &extra[..extra.len() - 1]; // the cache policy
                }
                for o in extra {
                    let is_pred = match o {
                        O::NotReg(_) => true,
                        O::Reg(r) => self.lookup(r).is_some_and(|x| self.vbits[x as usize] == 1),
                        _ => false,
                    };
                    if is_pred {
                        ignore = Some(self.pred_src(o)?);
                    } else {
                        src_size = Some(self.src(o)?);
                    }
                }
                Op::CpAsync { cp_size: *size as u8, dst, src, src_size, ignore }
            }
            "ldmatrix" | "stmatrix" => {
                if !m.has("m8n8") || !m.has("b16") {
                    return Err(format!("{mn} shape/type"));
                }
                let num = if m.has("x4") {
                    4
                } else if m.has("x2") {
                    2
                } else {
                    1
                };
                if mn == "ldmatrix" {
                    let (ds, k) = self.regs::<4>(&ops[0], true)?;
                    if k != num {
                        return Err("ldmatrix register count".into());
                    }
                    Op::Ldmatrix { num, trans: m.has("trans"), ds, addr: self.addr(&ops[1])? }
                } else {
                    let (srcs, k) = self.regs::<4>(&ops[1], false)?;
                    if k != num {
                        return Err("stmatrix register count".into());
                    }
                    Op::Stmatrix { num, trans: m.has("trans"), srcs, addr: self.addr(&ops[0])? }
                }
            }
            "mma" => {
                let k = if m.has("m16n8k16") {
                    16
                } else if m.has("m16n8k8") {
                    8
                } else {
                    return Err("mma shape (only m16n8k16 and m16n8k8)".into());
                };
                if !(m.has("row") && m.has("col")) || tys.len() != 4 {
                    return Err("mma layout/types".into());
                }
                let mt = |t: Ty| match t {
                    Ty::F(FTy::F16) => Ok(MmaTy::F16),
                    Ty::F(FTy::BF16) => Ok(MmaTy::BF16),
                    Ty::F(FTy::F32) => Ok(MmaTy::F32),
                    _ => Err(format!("mma type {t:?}")),
                };
                let (dty, aty, bty, cty) = (mt(tys[0])?, mt(tys[1])?, mt(tys[2])?, mt(tys[3])?);
                if aty != bty || dty != cty || aty == MmaTy::F32 || (aty == MmaTy::BF16 && dty != MmaTy::F32) {
                    return Err("mma type combination".into());
                }
                let (ds, nd) = self.regs::<4>(&ops[0], true)?;
                let (a, na) = self.regs::<4>(&ops[1], false)?;
                let (b, nb) = self.regs::<2>(&ops[2], false)?;
                let (c, nc) = self.regs::<4>(&ops[3], false)?;
                let acc = if dty == MmaTy::F32 { 4 } else { 2 };
                let (wa, wb) = if k == 16 { (4, 2) } else { (2, 1) };
                if nd != acc || nc != acc || na != wa || nb != wb {
                    return Err("mma operand counts".into());
                }
                Op::Mma { k, ab: aty, cd: dty, ds, a, b, c }
            }
            "shfl" => {
                if !m.has("sync") {
                    return Err("shfl without .sync".into());
                }
                want(5)?;
                let mode = if m.has("up") {
                    ShflMode::Up
                } else if m.has("down") {
                    ShflMode::Down
                } else if m.has("bfly") {
                    ShflMode::Bfly
                } else {
                    ShflMode::Idx
                };
                let (d, p) = match &ops[0] {
                    O::Pair(d, p) => (self.dst(d)?, Some(self.dst(p)?)),
                    o => (self.dst(o)?, None),
                };
                let (a, b, c, mask) = (self.src(&ops[1])?, self.src(&ops[2])?, self.src(&ops[3])?, self.src(&ops[4])?);
                Op::Shfl { mode, d, p, a, b, c, mask }
            }
            "vote" => {
                let mode = if m.has("all") {
                    VoteMode::All
                } else if m.has("any") {
                    VoteMode::Any
                } else if m.has("uni") {
                    VoteMode::Uni
                } else {
                    VoteMode::Ballot
                };
                let (mask, a_op) =
                    if m.has("sync") { (self.src(&ops[2])?, &ops[1]) } else { (self.konst(u32::MAX as u64), &ops[1]) };
                let (a, neg) = self.pred_src(a_op)?;
                Op::Vote { mode, d: self.dst(&ops[0])?, a, neg, mask }
            }
            "match" => {
                let Some(Ty::Int(t)) = t0 else { return Err("type".into()) };
                let (d, p) = match &ops[0] {
                    O::Pair(d, p) => (self.dst(d)?, Some(self.dst(p)?)),
                    o => (self.dst(o)?, None),
                };
                let (a, mask) = (self.src(&ops[1])?, self.src(&ops[2])?);
                Op::Match { all: m.has("all"), t, d, p, a, mask }
            }
            "redux" => {
                let Some(Ty::Int(t)) = t0 else { return Err("redux on floats".into()) };
                let op = m
                    .list
                    .iter()
                    .find_map(|x| match *x {
                        "add" => Some(AtomOp::Add),
                        "min" => Some(AtomOp::Min),
                        "max" => Some(AtomOp::Max),
                        "and" => Some(AtomOp::And),
                        "or" => Some(AtomOp::Or),
                        "xor" => Some(AtomOp::Xor),
                        _ => None,
                    })
                    .ok_or("redux operation")?;
                let (a, mask) = (self.src(&ops[1])?, self.src(&ops[2])?);
                Op::Redux { op, t, d: self.dst(&ops[0])?, a, mask }
            }
            "activemask" => Op::Activemask { d: self.dst(&ops[0])? },
            "bar" | "barrier" if m.has("warp") => Op::BarWarp { mask: self.src(&ops[0])? },
            "bar" | "barrier" => {
                let kind = if m.has("arrive") {
                    BarKind::Arrive
                } else if m.has("red") {
                    if m.has("popc") {
                        BarKind::RedPopc
                    } else if m.has("and") {
                        BarKind::RedAnd
                    } else {
                        BarKind::RedOr
                    }
                } else {
                    BarKind::Sync
                };
                let aligned = mn == "bar" || m.has("aligned");
                if matches!(kind, BarKind::RedPopc | BarKind::RedAnd | BarKind::RedOr) {
                    let d = self.dst(&ops[0])?;
                    let id = self.src(&ops[1])?;
                    let (count, pi) = if n == 4 { (Some(self.src(&ops[2])?), 3) } else { (None, 2) };
                    let p = self.pred_src(&ops[pi])?;
                    Op::Bar { kind, aligned, id, count, d: Some(d), p: Some(p) }
                } else {
                    let id = match ops.first() {
                        Some(o) => self.src(o)?,
                        None => self.konst(0),
                    };
                    let count = if n >= 2 { Some(self.src(&ops[1])?) } else { None };
                    Op::Bar { kind, aligned, id, count, d: None, p: None }
                }
            }
            "membar" | "fence" => {
                if m.has("proxy") && !m.has("alias") {
                    // fence.proxy.async etc.: ordering between proxies; no effect in the interpreter.
                }
                Op::Fence
            }
            "bra" | "brx" => {
                if mn == "brx" {
                    return Err("brx.idx".into());
                }
                let O::Sym(l) = ops.first().ok_or("bra target")? else { return Err("bra target".into()) };
                labels.push(l.clone());
                Op::Bra { target: u32::MAX - (labels.len() as u32 - 1), uni: m.has("uni") }
            }
            "ret" => Op::Ret,
            "exit" => Op::Exit,
            "trap" => Op::Trap,
            "nanosleep" => Op::Nanosleep { a: self.src(&ops[0])? },
            // The policy operands (fractions, primary/secondary priorities) select cache behaviour
            // only; the result is an opaque 64-bit value the hinted instructions accept.
            "createpolicy" => Op::CreatePolicy { d: self.dst(&ops[0])? },
            "prefetch" | "prefetchu" | "discard" | "applypriority" => Op::Prefetch,
            "call" => return Err("call (device functions are not supported)".into()),
            _ => return Err(format!("opcode `{}`", i.opcode)),
        })
    }
}

fn fmt_operand(o: &O) -> String {
    match o {
        O::Reg(r) | O::Sym(r) => r.clone(),
        O::NotReg(r) => format!("!{r}"),
        O::Imm(v) => v.to_string(),
        O::F32(v) => format!("0f{v:08X}"),
        O::F64(v) => format!("0d{v:016X}"),
        O::Dec(v) => v.clone(),
        O::Addr(b, off) => {
            let b = b.as_ref().map(|b| fmt_operand(b)).unwrap_or_default();
            if *off == 0 {
                format!("[{b}]")
            } else if b.is_empty() {
                format!("[{off}]")
            } else {
                format!("[{b}+{off}]")
            }
        }
        O::Vec(v) => format!("{{{}}}", v.iter().map(fmt_operand).collect::<Vec<_>>().join(", ")),
        O::Pair(a, b) => format!("{}|{}", fmt_operand(a), fmt_operand(b)),
        O::Sink => "_".into(),
    }
}

/// The PTX text of an instruction, for reports.
pub fn inst_text(i: &ast::Inst) -> String {
    let g = i.guard.as_ref().map_or(String::new(), |(n, p)| format!("@{}{p} ", if *n { "!" } else { "" }));
    format!("{g}{} {};", i.opcode, i.operands.iter().map(fmt_operand).collect::<Vec<_>>().join(", "))
}

pub(crate) fn lower_module(m: &ast::Module) -> Result<Module> {
    if m.address_size != 0 && m.address_size != 64 {
        return Err(SimError::invalid_ptx(".address_size 32 is not supported"));
    }
    let mut shared = HashMap::new();
    for v in &m.vars {
        if v.space == ast::Space::Shared {
            shared.insert(v.name.clone(), SharedSym { decl: v.clone() });
        }
    }
    let files = Arc::new(m.files.clone());
    let mut kernels = Vec::with_capacity(m.entries.len());
    for e in &m.entries {
        kernels.push(Arc::new(lower_entry(e, &shared, m, &files)?));
    }
    Ok(Module { kernels })
}

fn lower_entry(
    e: &ast::Entry,
    shared: &HashMap<String, SharedSym>,
    m: &ast::Module,
    files: &Arc<Vec<(u32, String)>>,
) -> Result<Kernel> {
    let mut params = Vec::new();
    let mut pmap = HashMap::new();
    let mut off = 0usize;
    for p in &e.params {
        let align = p.align.max(1) as usize;
        off = off.next_multiple_of(align);
        pmap.insert(p.name.clone(), off);
        params.push(Param { offset: off, size: p.size as usize, align });
        off += p.size as usize;
    }
    let param_bytes = off;
    let mut lw = Lowerer {
        vkind: Vec::new(),
        vbits: Vec::new(),
        scopes: vec![HashMap::new()],
        consts: HashMap::new(),
        specials: HashMap::new(),
        shared,
        params: pmap,
        kernel_shared: HashMap::new(),
        used_shared: Vec::new(),
        locals: HashMap::new(),
        local_bytes: 0,
    };
    let mut code: Vec<Inst> = Vec::new();
    let mut locs = Vec::new();
    let mut texts = Vec::new();
    let mut label_at: HashMap<String, u32> = HashMap::new();
    let mut branch_labels: Vec<String> = Vec::new();
    let mut unsupported: Option<String> = None;
    for f in &m.funcs {
        unsupported.get_or_insert(format!("the module defines device function `{f}` (.func is not supported)"));
    }
    let file_name = |l: ast::Loc| files.iter().find(|(n, _)| *n == l.file).map_or("?".to_string(), |(_, f)| f.clone());
    for s in &e.body {
        match s {
            Stmt::Open => lw.scopes.push(HashMap::new()),
            Stmt::Close => {
                lw.scopes.pop();
                if lw.scopes.is_empty() {
                    return Err(SimError::invalid_ptx(format!("{}: unbalanced braces", e.name)));
                }
            }
            Stmt::Reg(d) => lw.declare(d),
            Stmt::Var(v) => match v.space {
                ast::Space::Shared => {
                    lw.kernel_shared.insert(v.name.clone(), SharedSym { decl: v.clone() });
                }
                ast::Space::Local if v.count.is_some() => {
                    let off = lw.local_bytes.next_multiple_of(v.align.max(1) as u64);
                    lw.locals.insert(v.name.clone(), off);
                    lw.local_bytes = off + v.bytes();
                }
                _ => {
                    unsupported.get_or_insert(format!("{:?} variable `{}` in kernel body", v.space, v.name));
                }
            },
            Stmt::Label(l) => {
                label_at.insert(l.clone(), code.len() as u32);
            }
            Stmt::Inst(i) => {
                let text = inst_text(i);
                let guard = match &i.guard {
                    Some((neg, p)) => match lw.src(&O::Reg(p.clone())) {
                        Ok(r) => Some((r, *neg)),
                        Err(msg) => return Err(SimError::invalid_ptx(format!("{}: {msg} in `{text}`", e.name))),
                    },
                    None => None,
                };
                let op = match lw.inst(i, &mut branch_labels) {
                    Ok(op) => op,
                    Err(msg) => {
                        if msg.starts_with("undeclared register")
                            || msg.starts_with("unknown symbol") && !msg.contains("not supported")
                        {
                            return Err(SimError::invalid_ptx(format!("{}: {msg} in `{text}`", e.name)));
                        }
                        unsupported.get_or_insert(format!(
                            "unsupported PTX instruction `{text}` ({msg}) at {}:{}",
                            file_name(i.loc),
                            i.loc.line
                        ));
                        Op::Trap
                    }
                };
                let class = Lowerer::class_of(&op);
                code.push(Inst { op, guard, class });
                locs.push(i.loc);
                texts.push(text);
            }
        }
    }
    // Every kernel ends in an implicit exit.
    code.push(Inst { op: Op::Exit, guard: None, class: Class::Control });
    locs.push(locs.last().copied().unwrap_or_default());
    texts.push("(end of kernel)".into());
    // Branch targets.
    for inst in &mut code {
        if let Op::Bra { target, .. } = &mut inst.op {
            let li = (u32::MAX - *target) as usize;
            let name = &branch_labels[li];
            *target = *label_at
                .get(name)
                .ok_or_else(|| SimError::invalid_ptx(format!("{}: branch to undefined label {name}", e.name)))?;
        }
    }
    // Shared memory layout: static variables this kernel uses (module scope or its own), in order of
    // first use, aligned; extern arrays alias the start of the dynamic region after them.
    let mut layout: Vec<u64> = Vec::new();
    let mut off = 0u64;
    let mut max_dyn_align = 16u64;
    let mut externs = Vec::new();
    for name in &lw.used_shared {
        let sym = lw.kernel_shared.get(name).or_else(|| shared.get(name)).unwrap();
        if sym.decl.external || sym.decl.count.is_none() {
            max_dyn_align = max_dyn_align.max(sym.decl.align as u64);
            externs.push(layout.len());
            layout.push(0);
        } else {
            off = off.next_multiple_of(sym.decl.align.max(1) as u64);
            layout.push(off);
            off += sym.decl.bytes();
        }
    }
    let static_smem = off as usize;
    let dyn_base = off.next_multiple_of(max_dyn_align);
    for i in externs {
        layout[i] = dyn_base;
    }
    // Patch shared-symbol constants.
    let fix = |v: u64| -> u64 {
        if v & 0xFFFF_0000_0000_0000 == SHARED_TAG {
            let idx = ((v >> 32) & 0xFFFF) as usize;
            layout[idx] + (v & 0xFFFF_FFFF)
        } else {
            v
        }
    };
    for k in lw.vkind.iter_mut() {
        if let VKind::Const(v) = k {
            *v = fix(*v);
        }
    }
    for inst in &mut code {
        match &mut inst.op {
            Op::Ld { addr, .. }
            | Op::St { addr, .. }
            | Op::Atom { addr, .. }
            | Op::Ldmatrix { addr, .. }
            | Op::Stmatrix { addr, .. } => addr.off = fix(addr.off as u64) as i64,
            Op::CpAsync { dst, src, .. } => {
                dst.off = fix(dst.off as u64) as i64;
                src.off = fix(src.off as u64) as i64;
            }
            _ => {}
        }
    }
    let virtual_regs = lw.vkind.iter().filter(|k| matches!(k, VKind::Normal)).count();
    let ra = regalloc::allocate(&mut code, &lw.vkind);
    Ok(Kernel {
        name: e.name.clone(),
        params,
        param_bytes,
        maxntid: e.maxntid.or(e.reqntid),
        reqntid: e.reqntid,
        static_smem,
        local_bytes: lw.local_bytes.next_multiple_of(16) as usize,
        dyn_smem_base: dyn_base as usize,
        code,
        locs,
        texts,
        nregs: ra.nregs,
        virtual_regs,
        consts: ra.consts,
        specials: ra.specials,
        unsupported,
        files: files.clone(),
    })
}
