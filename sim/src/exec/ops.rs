//! Instruction semantics (PTX ISA chapter 9), executed for all active lanes of a warp.

use super::cta::{merge_groups, CpOp, Cta, Group, Park, FULL};
use super::memory::{classify, MemErr, Where};
use super::Launch;
use crate::fp::{self, Rnd};
use crate::ir::*;
use crate::{cuda, Result, SimError};

type Lanes = [u64; 32];

#[inline(always)]
fn get(regs: &[u64], r: R) -> &Lanes {
    let s = r as usize * 32;
    regs[s..s + 32].try_into().unwrap()
}

#[inline(always)]
fn put(regs: &mut [u64], m: u32, d: R, out: &Lanes) {
    let s = d as usize * 32;
    let dst: &mut Lanes = (&mut regs[s..s + 32]).try_into().unwrap();
    if m == FULL {
        *dst = *out;
    } else {
        for l in 0..32 {
            if m >> l & 1 != 0 {
                dst[l] = out[l];
            }
        }
    }
}

#[inline(always)]
fn map1(regs: &mut [u64], m: u32, d: R, a: R, f: impl Fn(u64) -> u64) {
    let a = get(regs, a);
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l]);
    }
    put(regs, m, d, &o);
}

#[inline(always)]
fn map2(regs: &mut [u64], m: u32, d: R, a: R, b: R, f: impl Fn(u64, u64) -> u64) {
    let (a, b) = (get(regs, a), get(regs, b));
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l], b[l]);
    }
    put(regs, m, d, &o);
}

#[inline(always)]
fn map3(regs: &mut [u64], m: u32, d: R, a: R, b: R, c: R, f: impl Fn(u64, u64, u64) -> u64) {
    let (a, b, c) = (get(regs, a), get(regs, b), get(regs, c));
    let mut o = [0u64; 32];
    for l in 0..32 {
        o[l] = f(a[l], b[l], c[l]);
    }
    put(regs, m, d, &o);
}

#[inline(always)]
fn mask_bits(v: u64, bits: u32) -> u64 {
    if bits >= 64 {
        v
    } else {
        v & ((1u64 << bits) - 1)
    }
}

#[inline(always)]
fn sext(v: u64, bits: u32) -> i64 {
    if bits >= 64 {
        v as i64
    } else {
        let s = 64 - bits;
        ((v << s) as i64) >> s
    }
}

#[inline(always)]
fn ext(v: u64, t: IntTy) -> i128 {
    if t.signed {
        sext(v, t.bits as u32) as i128
    } else {
        mask_bits(v, t.bits as u32) as i128
    }
}

fn ibin(op: IOp, t: IntTy, a: u64, b: u64) -> u64 {
    let bits = t.bits as u32;
    let (x, y) = (ext(a, t), ext(b, t));
    let r: i128 = match op {
        IOp::Add => x.wrapping_add(y),
        IOp::Sub => x.wrapping_sub(y),
        IOp::MulLo => x.wrapping_mul(y),
        IOp::MulHi => (x.wrapping_mul(y)) >> bits,
        IOp::Div => {
            if y == 0 {
                -1
            } else {
                x.wrapping_div(y)
            }
        }
        IOp::Rem => {
            if y == 0 {
                x
            } else {
                x.wrapping_rem(y)
            }
        }
        IOp::Min => x.min(y),
        IOp::Max => x.max(y),
        IOp::And => x & y,
        IOp::Or => x | y,
        IOp::Xor => x ^ y,
        IOp::Shl => {
            let s = mask_bits(b, 32);
            if s >= bits as u64 {
                0
            } else {
                x << s
            }
        }
        IOp::Shr => {
            let s = mask_bits(b, 32).min(127);
            if s >= bits as u64 {
                if t.signed && x < 0 {
                    -1
                } else {
                    0
                }
            } else {
                x >> s
            }
        }
        IOp::AddSat | IOp::SubSat => {
            let r = if op == IOp::AddSat { x + y } else { x - y };
            let (lo, hi) = (-(1i128 << (bits - 1)), (1i128 << (bits - 1)) - 1);
            r.clamp(lo, hi)
        }
    };
    mask_bits(r as u64, bits)
}

fn iun(op: IUnOp, t: IntTy, a: u64) -> u64 {
    let bits = t.bits as u32;
    let v = mask_bits(a, bits);
    match op {
        IUnOp::Not => mask_bits(!v, bits),
        IUnOp::Neg => mask_bits((v as i64).wrapping_neg() as u64, bits),
        IUnOp::Abs => mask_bits(sext(v, bits).wrapping_abs() as u64, bits),
        IUnOp::Popc => v.count_ones() as u64,
        IUnOp::Clz => (v.leading_zeros() - (64 - bits)) as u64,
        IUnOp::Brev => mask_bits(v.reverse_bits() >> (64 - bits), bits),
        IUnOp::Cnot => (v == 0) as u64,
        IUnOp::Bfind | IUnOp::BfindShift => {
            let x = if t.signed && sext(v, bits) < 0 { mask_bits(!v, bits) } else { v };
            if x == 0 {
                0xFFFF_FFFF
            } else {
                let pos = 63 - x.leading_zeros();
                if op == IUnOp::BfindShift {
                    (bits - 1 - pos) as u64
                } else {
                    pos as u64
                }
            }
        }
    }
}

fn icmp(c: ICmp, t: IntTy, a: u64, b: u64) -> bool {
    let (x, y) = (ext(a, t), ext(b, t));
    match c {
        ICmp::Eq => x == y,
        ICmp::Ne => x != y,
        ICmp::Lt => x < y,
        ICmp::Le => x <= y,
        ICmp::Gt => x > y,
        ICmp::Ge => x >= y,
    }
}

#[inline(always)]
fn f32b(v: u64) -> f32 {
    f32::from_bits(v as u32)
}
#[inline(always)]
fn bf32(v: f32) -> u64 {
    if v.is_nan() {
        fp::NAN_F32 as u64
    } else {
        v.to_bits() as u64
    }
}
#[inline(always)]
fn f64b(v: u64) -> f64 {
    f64::from_bits(v)
}
#[inline(always)]
fn bf64(v: f64) -> u64 {
    if v.is_nan() {
        fp::NAN_F64
    } else {
        v.to_bits()
    }
}

fn fcmp(c: FCmp, t: Ty, ftz: bool, a: u64, b: u64) -> (bool, bool) {
    match t {
        Ty::F(FTy::F32) => {
            let (mut x, mut y) = (f32b(a), f32b(b));
            if ftz {
                x = fp::ftz32(x);
                y = fp::ftz32(y);
            }
            let r = fp::cmp_f32(x, y, c);
            (r, r)
        }
        Ty::F(FTy::F64) => {
            let r = fp::cmp_f64(f64b(a), f64b(b), c);
            (r, r)
        }
        Ty::F(FTy::F16) => {
            let r = fp::cmp_f16(a as u16, b as u16, c);
            (r, r)
        }
        Ty::F(FTy::BF16) => {
            let r = fp::cmp_bf16(a as u16, b as u16, c);
            (r, r)
        }
        Ty::F(FTy::F16x2) => (fp::cmp_f16(a as u16, b as u16, c), fp::cmp_f16((a >> 16) as u16, (b >> 16) as u16, c)),
        Ty::F(FTy::BF16x2) => {
            (fp::cmp_bf16(a as u16, b as u16, c), fp::cmp_bf16((a >> 16) as u16, (b >> 16) as u16, c))
        }
        _ => (false, false),
    }
}

fn fbin(op: FOp, t: FTy, m: FMods, a: u64, b: u64) -> u64 {
    match t {
        FTy::F32 => {
            let (mut x, mut y) = (f32b(a), f32b(b));
            if m.ftz {
                x = fp::ftz32(x);
                y = fp::ftz32(y);
            }
            let fast = m.rnd == Rnd::Rn;
            let mut r = match op {
                FOp::Add if fast => x + y,
                FOp::Sub if fast => x - y,
                FOp::Mul if fast => x * y,
                FOp::Add => fp::add_f32(x, y, m.rnd),
                FOp::Sub => fp::sub_f32(x, y, m.rnd),
                FOp::Mul => fp::mul_f32(x, y, m.rnd),
                FOp::Div if m.approx => fp::div_full_f32(x, y, m.ftz),
                FOp::Div if fast => x / y,
                FOp::Div => fp::div_f32(x, y, m.rnd),
                FOp::Min => fp::min_f32(x, y, m.nan),
                FOp::Max => fp::max_f32(x, y, m.nan),
            };
            if m.ftz {
                r = fp::ftz32(r);
            }
            if m.sat {
                r = fp::f32_sat(r);
            }
            bf32(r)
        }
        FTy::F64 => {
            let (x, y) = (f64b(a), f64b(b));
            let fast = m.rnd == Rnd::Rn;
            bf64(match op {
                FOp::Add if fast => x + y,
                FOp::Sub if fast => x - y,
                FOp::Mul if fast => x * y,
                FOp::Div if fast => x / y,
                FOp::Add => fp::add_f64(x, y, m.rnd),
                FOp::Sub => fp::sub_f64(x, y, m.rnd),
                FOp::Mul => fp::mul_f64(x, y, m.rnd),
                FOp::Div => fp::div_f64(x, y, m.rnd),
                FOp::Min => fp::min_f64(x, y),
                FOp::Max => fp::max_f64(x, y),
            })
        }
        FTy::F16 => {
            let (x, y) = (a as u16, b as u16);
            (match op {
                FOp::Add => fp::f16_add(x, y, m.rnd, m.ftz, m.sat),
                FOp::Sub => fp::f16_sub(x, y, m.rnd, m.ftz, m.sat),
                FOp::Mul => fp::f16_mul(x, y, m.rnd, m.ftz, m.sat),
                FOp::Min => fp::f16_min(x, y, m.ftz, m.nan),
                FOp::Max => fp::f16_max(x, y, m.ftz, m.nan),
                FOp::Div => fp::f32_to_f16(fp::f16_to_f32(x) / fp::f16_to_f32(y), Rnd::Rn, false, false),
            }) as u64
        }
        FTy::BF16 => {
            let (x, y) = (a as u16, b as u16);
            (match op {
                FOp::Add => fp::bf16_add(x, y, m.rnd),
                FOp::Sub => fp::bf16_sub(x, y, m.rnd),
                FOp::Mul => fp::bf16_mul(x, y, m.rnd),
                FOp::Min => fp::bf16_min(x, y, m.nan),
                FOp::Max => fp::bf16_max(x, y, m.nan),
                FOp::Div => fp::f32_to_bf16(fp::bf16_to_f32(x) / fp::bf16_to_f32(y), Rnd::Rn, false, false),
            }) as u64
        }
        FTy::F16x2 => {
            let (x, y) = (a as u32, b as u32);
            (match op {
                FOp::Add => fp::f16x2_add(x, y, m.rnd, m.ftz, m.sat),
                FOp::Sub => fp::f16x2_sub(x, y, m.rnd, m.ftz, m.sat),
                FOp::Mul => fp::f16x2_mul(x, y, m.rnd, m.ftz, m.sat),
                FOp::Min => fp::f16x2_min(x, y, m.ftz, m.nan),
                FOp::Max => fp::f16x2_max(x, y, m.ftz, m.nan),
                FOp::Div => 0,
            }) as u64
        }
        FTy::BF16x2 => {
            let (x, y) = (a as u32, b as u32);
            (match op {
                FOp::Add => fp::bf16x2_add(x, y, m.rnd),
                FOp::Sub => fp::bf16x2_sub(x, y, m.rnd),
                FOp::Mul => fp::bf16x2_mul(x, y, m.rnd),
                FOp::Min => fp::bf16x2_min(x, y, m.nan),
                FOp::Max => fp::bf16x2_max(x, y, m.nan),
                FOp::Div => 0,
            }) as u64
        }
    }
}

fn fun(op: FUnOp, t: FTy, m: FMods, a: u64) -> u64 {
    match t {
        FTy::F32 => {
            let mut x = f32b(a);
            if m.ftz {
                x = fp::ftz32(x);
            }
            let r = match op {
                FUnOp::Abs => f32::from_bits(x.to_bits() & 0x7FFF_FFFF),
                FUnOp::Neg => -x,
                FUnOp::Sqrt => fp::sqrt_f32(x, m.rnd),
                FUnOp::Rcp => fp::rcp_f32(x, m.rnd),
                FUnOp::RcpApprox => fp::rcp_approx_f32(x, m.ftz),
                FUnOp::SqrtApprox => fp::sqrt_approx_f32(x, m.ftz),
                FUnOp::Rsqrt => fp::rsqrt_approx_f32(x, m.ftz),
                FUnOp::Ex2 => fp::ex2_approx_f32(x, m.ftz),
                FUnOp::Lg2 => fp::lg2_approx_f32(x, m.ftz),
                FUnOp::Sin => fp::sin_approx_f32(x, m.ftz),
                FUnOp::Cos => fp::cos_approx_f32(x, m.ftz),
                FUnOp::Tanh => fp::tanh_approx_f32(x),
            };
            let r = if m.ftz { fp::ftz32(r) } else { r };
            let r = if m.sat { fp::f32_sat(r) } else { r };
            if matches!(op, FUnOp::Abs | FUnOp::Neg) {
                r.to_bits() as u64
            } else {
                bf32(r)
            }
        }
        FTy::F64 => {
            let x = f64b(a);
            match op {
                FUnOp::Abs => x.abs().to_bits(),
                FUnOp::Neg => (-x).to_bits(),
                FUnOp::Sqrt => bf64(fp::sqrt_f64(x, m.rnd)),
                FUnOp::Rcp => bf64(fp::rcp_f64(x, m.rnd)),
                FUnOp::RcpApprox => bf64(fp::rcp_approx_ftz_f64(x)),
                _ => bf64(f64::from(fun(op, FTy::F32, m, bf32(x as f32)) as u32 as f32)),
            }
        }
        FTy::F16 | FTy::BF16 => {
            let h = a as u16;
            (match op {
                FUnOp::Abs => fp::h_abs(h),
                FUnOp::Neg => fp::h_neg(h),
                _ => {
                    let x = if t == FTy::F16 { fp::f16_to_f32(h) } else { fp::bf16_to_f32(h) };
                    let r = f32b(fun(op, FTy::F32, m, bf32(x)));
                    if t == FTy::F16 {
                        fp::f32_to_f16(r, Rnd::Rn, false, false)
                    } else {
                        fp::f32_to_bf16(r, Rnd::Rn, false, false)
                    }
                }
            }) as u64
        }
        FTy::F16x2 | FTy::BF16x2 => {
            let s = if t == FTy::F16x2 { FTy::F16 } else { FTy::BF16 };
            let lo = fun(op, s, m, a & 0xFFFF);
            let hi = fun(op, s, m, (a >> 16) & 0xFFFF);
            (hi << 16 | lo) & 0xFFFF_FFFF
        }
    }
}

fn fma(t: FTy, m: FMods, a: u64, b: u64, c: u64) -> u64 {
    match t {
        FTy::F32 => {
            let (mut x, mut y, mut z) = (f32b(a), f32b(b), f32b(c));
            if m.ftz {
                x = fp::ftz32(x);
                y = fp::ftz32(y);
                z = fp::ftz32(z);
            }
            let mut r = if m.rnd == Rnd::Rn { x.mul_add(y, z) } else { fp::fma_f32(x, y, z, m.rnd) };
            if m.ftz {
                r = fp::ftz32(r);
            }
            if m.sat {
                r = fp::f32_sat(r);
            }
            bf32(r)
        }
        FTy::F64 => bf64(if m.rnd == Rnd::Rn {
            f64b(a).mul_add(f64b(b), f64b(c))
        } else {
            fp::fma_f64(f64b(a), f64b(b), f64b(c), m.rnd)
        }),
        FTy::F16 => fp::f16_fma(a as u16, b as u16, c as u16, m.rnd, m.ftz, m.sat, m.relu) as u64,
        FTy::BF16 => fp::bf16_fma(a as u16, b as u16, c as u16, m.rnd, m.relu) as u64,
        FTy::F16x2 => fp::f16x2_fma(a as u32, b as u32, c as u32, m.rnd, m.ftz, m.sat, m.relu) as u64,
        FTy::BF16x2 => fp::bf16x2_fma(a as u32, b as u32, c as u32, m.rnd, m.relu) as u64,
    }
}

#[allow(clippy::too_many_arguments)]
fn cvt(
    dt: Ty,
    st: Ty,
    rnd: Option<Rnd>,
    irnd: Option<IRnd>,
    ftz: bool,
    sat: bool,
    relu: bool,
    satfinite: bool,
    a: u64,
) -> u64 {
    let r = rnd.unwrap_or(Rnd::Rn);
    let ir = irnd.unwrap_or(IRnd::Rzi);
    match (dt, st) {
        (Ty::Int(d), Ty::Int(s)) => {
            let v = ext(a, s);
            let v = if sat {
                let (lo, hi) = if d.signed {
                    (-(1i128 << (d.bits - 1)), (1i128 << (d.bits - 1)) - 1)
                } else {
                    (0, (1i128 << d.bits) - 1)
                };
                v.clamp(lo, hi)
            } else {
                v
            };
            let m = mask_bits(v as u64, d.bits as u32);
            if d.signed {
                sext(m, d.bits as u32) as u64
            } else {
                m
            }
        }
        (Ty::Int(d), Ty::F(s)) => match s {
            FTy::F32 => {
                let x = f32b(a);
                fp::f32_to_int(if ftz { fp::ftz32(x) } else { x }, ir, d.signed, d.bits as u32)
            }
            FTy::F64 => fp::f64_to_int(f64b(a), ir, d.signed, d.bits as u32),
            FTy::F16 => fp::f16_to_int(a as u16, ir, d.signed, d.bits as u32),
            FTy::BF16 => fp::f32_to_int(fp::bf16_to_f32(a as u16), ir, d.signed, d.bits as u32),
            _ => 0,
        },
        (Ty::F(d), Ty::Int(s)) => {
            let v = ext(a, s);
            let bits = match d {
                FTy::F32 => bf32(fp::int_to_f32(v, r)),
                FTy::F64 => bf64(fp::int_to_f64(v, r)),
                FTy::F16 => fp::int_to_f16(v, r) as u64,
                FTy::BF16 => fp::int_to_bf16(v, r) as u64,
                _ => 0,
            };
            if sat {
                float_sat(d, bits)
            } else {
                bits
            }
        }
        (Ty::F(d), Ty::F(s)) => {
            // Source as f64 where exact, else handle directly.
            let out = match (d, s) {
                (FTy::F32, FTy::F32) => {
                    let mut x = f32b(a);
                    if ftz {
                        x = fp::ftz32(x);
                    }
                    if let Some(ir) = irnd {
                        x = fp::f32_round_int(x, ir, ftz);
                    }
                    bf32(x)
                }
                (FTy::F32, FTy::F16) => bf32(fp::f16_to_f32(a as u16)),
                (FTy::F32, FTy::BF16) => bf32(fp::bf16_to_f32(a as u16)),
                (FTy::F32, FTy::F64) => bf32(fp::f64_to_f32(f64b(a), r)),
                (FTy::F64, FTy::F32) => bf64(fp::f32_to_f64(f32b(a))),
                (FTy::F64, FTy::F16) => bf64(fp::f16_to_f32(a as u16) as f64),
                (FTy::F64, FTy::BF16) => bf64(fp::bf16_to_f32(a as u16) as f64),
                (FTy::F64, FTy::F64) => {
                    let x = f64b(a);
                    bf64(match irnd {
                        Some(IRnd::Rni) => x.round_ties_even(),
                        Some(IRnd::Rzi) => x.trunc(),
                        Some(IRnd::Rmi) => x.floor(),
                        Some(IRnd::Rpi) => x.ceil(),
                        None => x,
                    })
                }
                (FTy::F16, FTy::F32) => fp::f32_to_f16(f32b(a), r, relu, satfinite) as u64,
                (FTy::BF16, FTy::F32) => fp::f32_to_bf16(f32b(a), r, relu, satfinite) as u64,
                (FTy::F16, FTy::F16) | (FTy::BF16, FTy::BF16) => a & 0xFFFF,
                (FTy::F16, FTy::BF16) => fp::f32_to_f16(fp::bf16_to_f32(a as u16), r, relu, satfinite) as u64,
                (FTy::BF16, FTy::F16) => fp::f32_to_bf16(fp::f16_to_f32(a as u16), r, relu, satfinite) as u64,
                (FTy::F16, FTy::F64) => fp::f64_to_f16(f64b(a), r, relu, satfinite) as u64,
                (FTy::BF16, FTy::F64) => fp::f64_to_bf16(f64b(a), r, relu, satfinite) as u64,
                _ => 0,
            };
            if sat {
                float_sat(d, out)
            } else {
                out
            }
        }
        _ => 0,
    }
}

fn float_sat(t: FTy, bits: u64) -> u64 {
    match t {
        FTy::F32 => bf32(fp::f32_sat(f32b(bits))),
        FTy::F64 => {
            let x = f64b(bits);
            bf64(if x.is_nan() { 0.0 } else { x.clamp(0.0, 1.0) })
        }
        FTy::F16 => fp::f32_to_f16(fp::f32_sat(fp::f16_to_f32(bits as u16)), Rnd::Rn, false, false) as u64,
        FTy::BF16 => fp::f32_to_bf16(fp::f32_sat(fp::bf16_to_f32(bits as u16)), Rnd::Rn, false, false) as u64,
        _ => bits,
    }
}

fn prmt(mode: u8, a: u64, b: u64, c: u64) -> u64 {
    let bytes = ((b as u32 as u64) << 32) | (a as u32 as u64);
    let byte = |i: u64| (bytes >> (8 * (i & 7))) & 0xFF;
    let sel = c as u32;
    let idx: [u64; 4] = match mode {
        0 => {
            let mut r = 0u64;
            for k in 0..4 {
                let s = (sel >> (4 * k)) & 0xF;
                let v = byte(s as u64 & 7);
                let v = if s & 8 != 0 {
                    if v & 0x80 != 0 {
                        0xFF
                    } else {
                        0
                    }
                } else {
                    v
                };
                r |= v << (8 * k);
            }
            return r;
        }
        // (d.b0, d.b1, d.b2, d.b3) for selector values 0..3 (PTX ISA "prmt", table of modes).
        1 => [[0, 1, 2, 3], [1, 2, 3, 4], [2, 3, 4, 5], [3, 4, 5, 6]][(sel & 3) as usize],
        2 => [[0, 7, 6, 5], [1, 0, 7, 6], [2, 1, 0, 7], [3, 2, 1, 0]][(sel & 3) as usize],
        3 => [[0; 4], [1; 4], [2; 4], [3; 4]][(sel & 3) as usize],
        4 => [[0, 1, 2, 3], [1, 1, 2, 3], [2, 2, 2, 3], [3, 3, 3, 3]][(sel & 3) as usize],
        5 => [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 2, 2], [0, 1, 2, 3]][(sel & 3) as usize],
        _ => [[0, 1, 0, 1], [2, 3, 2, 3], [0, 1, 0, 1], [2, 3, 2, 3]][(sel & 3) as usize],
    };
    (0..4).fold(0u64, |r, k| r | byte(idx[k]) << (8 * k))
}

/// "Integer Arithmetic Instructions: dp4a / dp2a".
fn dp(two: bool, hi: bool, sa: bool, sb: bool, a: u64, b: u64, c: u64) -> u64 {
    let part = |v: u64, k: u32, bits: u32, signed: bool| -> i64 {
        let x = (v >> (bits * k)) & ((1 << bits) - 1);
        if signed {
            sext(x, bits)
        } else {
            x as i64
        }
    };
    let dot: i64 = if two {
        let base = if hi { 2 } else { 0 };
        (0..2).map(|k| part(a, k, 16, sa) * part(b, base + k, 8, sb)).sum()
    } else {
        (0..4).map(|k| part(a, k, 8, sa) * part(b, k, 8, sb)).sum()
    };
    ((c as u32 as i64).wrapping_add(dot) as u64) & 0xFFFF_FFFF
}

fn lop3(a: u64, b: u64, c: u64, lut: u8) -> u64 {
    let (a, b, c) = (a as u32, b as u32, c as u32);
    let mut r = 0u32;
    for i in 0..8 {
        if lut >> i & 1 != 0 {
            let x = if i & 4 != 0 { a } else { !a };
            let y = if i & 2 != 0 { b } else { !b };
            let z = if i & 1 != 0 { c } else { !c };
            r |= x & y & z;
        }
    }
    r as u64
}

fn bfe(t: IntTy, a: u64, b: u64, c: u64) -> u64 {
    let bits = t.bits as u32;
    let (pos, len) = ((b & 0xFF) as u32, (c & 0xFF) as u32);
    let v = mask_bits(a, bits);
    let msb = bits - 1;
    let sbit = if t.signed && len > 0 { (v >> (pos + len - 1).min(msb)) & 1 } else { 0 };
    let mut r = 0u64;
    for i in 0..bits {
        let bit = if i < len && pos + i <= msb { (v >> (pos + i)) & 1 } else { sbit };
        r |= bit << i;
    }
    r
}

fn bfi(bits: u32, f: u64, b: u64, c: u64, e: u64) -> u64 {
    let (pos, len) = ((c & 0xFF) as u32, (e & 0xFF) as u32);
    let mut r = mask_bits(b, bits);
    for i in 0..len {
        if pos + i < bits {
            r = (r & !(1u64 << (pos + i))) | (((f >> i) & 1) << (pos + i));
        }
    }
    r
}

fn elem_bytes(t: Ty) -> usize {
    match t {
        Ty::Pred => 1,
        t => (t.bits() / 8) as usize,
    }
}

#[inline(always)]
fn ld_value(t: Ty, bytes: &[u8]) -> u64 {
    let v = match bytes.len() {
        4 => u32::from_le_bytes(bytes.try_into().unwrap()) as u64,
        8 => u64::from_le_bytes(bytes.try_into().unwrap()),
        2 => u16::from_le_bytes(bytes.try_into().unwrap()) as u64,
        _ => {
            let mut b = [0u8; 8];
            b[..bytes.len()].copy_from_slice(bytes);
            u64::from_le_bytes(b)
        }
    };
    match t {
        Ty::Int(i) if i.signed => sext(v, i.bits as u32) as u64,
        _ => v,
    }
}

fn mem_report(c: &Cta, l: &Launch<'_>, wi: usize, lane: u32, pc: u32, e: MemErr) -> SimError {
    c.fault(l, wi, lane, pc, e.code, e.title).detail(e.detail).finish()
}

/// What the scheduler does after an instruction.
pub(crate) enum Flow {
    Next,
    /// The group parked at a barrier (the instruction has issued): return to the scheduler.
    Parked,
    /// The group waits for other lanes at a warp-synchronous instruction, which will issue again
    /// once they have arrived (not counted now): return to the scheduler.
    Retry,
}

impl Cta {
    /// Runs warp `wi` for up to `budget` warp-instructions; returns how many it executed.
    pub fn run_warp(&mut self, l: &mut Launch<'_>, wi: usize, budget: u64) -> Result<u64> {
        let mut n = 0u64;
        while n < budget {
            let w = &mut self.warps[wi];
            if w.groups.len() > 1 {
                merge_groups(&mut w.groups);
            }
            let Some(gi) = w.groups.iter().position(|g| g.park == Park::Run) else { break };
            n += self.run_group(l, wi, gi, budget - n)?;
        }
        Ok(n)
    }

    fn run_group(&mut self, l: &mut Launch<'_>, wi: usize, gi: usize, budget: u64) -> Result<u64> {
        let k = l.k;
        let mut n = 0u64;
        let Group { mut pc, mask, .. } = self.warps[wi].groups[gi];
        let mut mask = mask;
        // The other groups of the warp this one may merge with (not those waiting at a barrier):
        // reaching one of their pcs, or jumping past the lowest running one, returns to the
        // scheduler, which merges groups at equal pcs and runs the lowest pc first. That is
        // where divergent paths reconverge.
        let mut stops = [u32::MAX; 8];
        let mut nstops = 0;
        let mut lowest_other = u32::MAX;
        for (i, g) in self.warps[wi].groups.iter().enumerate() {
            if i != gi && !matches!(g.park, Park::Barrier(_)) && nstops < stops.len() {
                stops[nstops] = g.pc;
                nstops += 1;
                if g.park == Park::Run {
                    lowest_other = lowest_other.min(g.pc);
                }
            }
        }
        let stops = &stops[..nstops];
        while n < budget {
            if !stops.is_empty() && stops.contains(&pc) {
                break;
            }
            let inst = &k.code[pc as usize];
            let em = match inst.guard {
                None => mask,
                Some((p, neg)) => {
                    let v = get(&self.warps[wi].regs, p);
                    let mut t = 0u32;
                    for (lane, x) in v.iter().enumerate() {
                        t |= ((*x & 1) as u32) << lane;
                    }
                    if neg {
                        mask & !t
                    } else {
                        mask & t
                    }
                }
            };
            n += 1;
            l.prof.warp_instructions += 1;
            l.prof.thread_instructions += em.count_ones() as u64;
            l.prof.by_class[inst.class as usize] += 1;
            match &inst.op {
                Op::Bra { target, .. } => {
                    let taken = em;
                    if taken == mask {
                        pc = *target;
                        if pc > lowest_other {
                            break;
                        }
                        continue;
                    }
                    if taken == 0 {
                        pc += 1;
                        continue;
                    }
                    let w = &mut self.warps[wi];
                    w.groups[gi] = Group { pc: *target, mask: taken, park: Park::Run };
                    w.groups.push(Group { pc: pc + 1, mask: mask & !taken, park: Park::Run });
                    return Ok(n);
                }
                Op::Ret | Op::Exit => {
                    if em != 0 {
                        self.exit_lanes(l, wi, em, pc)?;
                    }
                    let rest = mask & !em;
                    if rest == 0 {
                        self.warps[wi].groups.remove(gi);
                        return Ok(n);
                    }
                    mask = rest;
                    pc += 1;
                    self.warps[wi].groups[gi].mask = mask;
                    continue;
                }
                Op::Trap => {
                    if em != 0 {
                        return Err(self
                            .fault(l, wi, em.trailing_zeros(), pc, cuda::LAUNCH_FAILED, "trap executed")
                            .finish());
                    }
                    pc += 1;
                    continue;
                }
                _ => {}
            }
            self.warps[wi].groups[gi].pc = pc;
            self.warps[wi].groups[gi].mask = mask;
            if l.trace.is_some() {
                self.trace(l, wi, pc, em);
            }
            match self.exec(l, wi, gi, pc, mask, em, &inst.op)? {
                Flow::Next => pc += 1,
                Flow::Parked => return Ok(n),
                Flow::Retry => {
                    l.prof.warp_instructions -= 1;
                    l.prof.thread_instructions -= em.count_ones() as u64;
                    l.prof.by_class[inst.class as usize] -= 1;
                    return Ok(n - 1);
                }
            }
        }
        let g = &mut self.warps[wi].groups[gi];
        g.pc = pc;
        g.mask = mask;
        Ok(n)
    }

    /// `LOWBIT_SIM_TRACE=<kernel substring>,<block>,<warp>`: prints each instruction of that warp
    /// with the values its lowest active lane reads (a debugging aid).
    fn trace(&self, l: &Launch<'_>, wi: usize, pc: u32, em: u32) {
        let Some((k, b, w)) = &l.trace else { return };
        if !l.k.name.contains(k.as_str()) || self.linear != *b || wi != *w {
            return;
        }
        let lane = em.trailing_zeros().min(31) as usize;
        let mut op = l.k.code[pc as usize].op.clone();
        let mut vals = Vec::new();
        crate::ir::regalloc::visit(&mut op, &mut |r, def| {
            if !def {
                vals.push(format!("r{}={:#x}", r, self.warps[wi].regs[*r as usize * 32 + lane]));
            }
        });
        eprintln!("[trace] pc {pc:5} mask {em:#010x} {:60} {}", l.k.texts[pc as usize], vals.join(" "));
    }

    /// Checks that every live lane named by `members` is in this group; otherwise parks it.
    fn converged(&mut self, wi: usize, gi: usize, mask: u32, members: u32) -> bool {
        let w = &mut self.warps[wi];
        let need = members & w.live();
        if need & !mask == 0 {
            return true;
        }
        w.groups[gi].park = Park::Collective;
        false
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(&mut self, l: &mut Launch<'_>, wi: usize, gi: usize, pc: u32, mask: u32, em: u32, op: &Op) -> Result<Flow> {
        macro_rules! regs {
            () => {
                &mut self.warps[wi].regs
            };
        }
        match *op {
            Op::Nop | Op::Fence | Op::Prefetch => {}
            Op::Mov { d, a, bits } => {
                let bits = if bits == 1 { 64 } else { bits as u32 };
                map1(regs!(), em, d, a, |x| mask_bits(x, bits));
            }
            Op::Pack { d, parts, n, part } => {
                let regs = regs!();
                let mut o = [0u64; 32];
                for i in 0..n as usize {
                    let p = get(regs, parts[i]);
                    for lane in 0..32 {
                        o[lane] |= mask_bits(p[lane], part as u32) << (i as u32 * part as u32);
                    }
                }
                put(regs, em, d, &o);
            }
            Op::Unpack { ds, n, part, a } => {
                let regs = regs!();
                let av = *get(regs, a);
                for i in 0..n as usize {
                    let mut o = [0u64; 32];
                    for lane in 0..32 {
                        o[lane] = mask_bits(av[lane] >> (i as u32 * part as u32), part as u32);
                    }
                    put(regs, em, ds[i], &o);
                }
            }
            Op::IBin { op, t, d, a, b } => {
                let regs = regs!();
                match (op, t.bits, t.signed) {
                    (IOp::Add, 32, _) => map2(regs, em, d, a, b, |x, y| (x as u32).wrapping_add(y as u32) as u64),
                    (IOp::Add, 64, _) => map2(regs, em, d, a, b, |x, y| x.wrapping_add(y)),
                    (IOp::Sub, 32, _) => map2(regs, em, d, a, b, |x, y| (x as u32).wrapping_sub(y as u32) as u64),
                    (IOp::Sub, 64, _) => map2(regs, em, d, a, b, |x, y| x.wrapping_sub(y)),
                    (IOp::MulLo, 32, _) => map2(regs, em, d, a, b, |x, y| (x as u32).wrapping_mul(y as u32) as u64),
                    (IOp::MulLo, 64, _) => map2(regs, em, d, a, b, |x, y| x.wrapping_mul(y)),
                    (IOp::And, 32, _) => map2(regs, em, d, a, b, |x, y| (x & y) & 0xFFFF_FFFF),
                    (IOp::And, 64, _) => map2(regs, em, d, a, b, |x, y| x & y),
                    (IOp::Or, 32, _) => map2(regs, em, d, a, b, |x, y| (x | y) & 0xFFFF_FFFF),
                    (IOp::Or, 64, _) => map2(regs, em, d, a, b, |x, y| x | y),
                    (IOp::Xor, 32, _) => map2(regs, em, d, a, b, |x, y| (x ^ y) & 0xFFFF_FFFF),
                    (IOp::Shl, 32, _) => {
                        map2(regs, em, d, a, b, |x, y| if y as u32 >= 32 { 0 } else { ((x as u32) << y) as u64 })
                    }
                    (IOp::Shl, 64, _) => map2(regs, em, d, a, b, |x, y| if y as u32 >= 64 { 0 } else { x << y }),
                    (IOp::Shr, 32, false) => {
                        map2(regs, em, d, a, b, |x, y| if y as u32 >= 32 { 0 } else { ((x as u32) >> y) as u64 })
                    }
                    (IOp::Shr, 32, true) => {
                        map2(regs, em, d, a, b, |x, y| ((x as i32) >> (y as u32).min(31)) as u32 as u64)
                    }
                    (IOp::Shr, 64, false) => map2(regs, em, d, a, b, |x, y| if y as u32 >= 64 { 0 } else { x >> y }),
                    (IOp::Shr, 64, true) => map2(regs, em, d, a, b, |x, y| ((x as i64) >> (y as u32).min(63)) as u64),
                    _ => map2(regs, em, d, a, b, |x, y| ibin(op, t, x, y)),
                }
            }
            Op::IUn { op, t, d, a } => map1(regs!(), em, d, a, |x| iun(op, t, x)),
            Op::MulWide { t, d, a, b } => {
                let bits = t.bits as u32 * 2;
                map2(regs!(), em, d, a, b, |x, y| mask_bits((ext(x, t) * ext(y, t)) as u64, bits))
            }
            Op::Mad { mode, t, d, a, b, c } => {
                let bits = t.bits as u32;
                map3(regs!(), em, d, a, b, c, |x, y, z| match mode {
                    0 => mask_bits((ext(x, t).wrapping_mul(ext(y, t)) as u64).wrapping_add(z), bits),
                    1 => mask_bits(((ext(x, t).wrapping_mul(ext(y, t)) >> bits) as u64).wrapping_add(z), bits),
                    _ => mask_bits((ext(x, t).wrapping_mul(ext(y, t)) as u64).wrapping_add(z), 2 * bits),
                })
            }
            Op::Mad24 { t, d, a, b, c } => {
                let f = move |x: u64, y: u64| -> i64 {
                    let (x, y) = if t.signed {
                        (sext(x, 24), sext(y, 24))
                    } else {
                        ((x & 0xFF_FFFF) as i64, (y & 0xFF_FFFF) as i64)
                    };
                    x.wrapping_mul(y)
                };
                match c {
                    Some(c) => map3(regs!(), em, d, a, b, c, |x, y, z| (f(x, y) as u64).wrapping_add(z) & 0xFFFF_FFFF),
                    None => map2(regs!(), em, d, a, b, |x, y| f(x, y) as u64 & 0xFFFF_FFFF),
                }
            }
            Op::Bfe { t, d, a, b, c } => map3(regs!(), em, d, a, b, c, |x, y, z| bfe(t, x, y, z)),
            Op::Dp { two, hi, sa, sb, d, a, b, c } => {
                map3(regs!(), em, d, a, b, c, |x, y, z| dp(two, hi, sa, sb, x, y, z))
            }
            Op::Bfi { bits, d, f, b, c, e } => {
                let regs = regs!();
                let (fv, bv, cv, ev) = (*get(regs, f), *get(regs, b), *get(regs, c), *get(regs, e));
                let mut o = [0u64; 32];
                for lane in 0..32 {
                    o[lane] = bfi(bits as u32, fv[lane], bv[lane], cv[lane], ev[lane]);
                }
                put(regs, em, d, &o);
            }
            Op::Prmt { mode, d, a, b, c } => map3(regs!(), em, d, a, b, c, |x, y, z| prmt(mode, x, y, z)),
            Op::Lop3 { d, a, b, c, lut } => map3(regs!(), em, d, a, b, c, |x, y, z| lop3(x, y, z, lut)),
            Op::Shf { left, clamp, d, a, b, c } => map3(regs!(), em, d, a, b, c, |x, y, z| {
                let n = if clamp { (z as u32).min(32) } else { z as u32 & 31 };
                let v = ((y as u32 as u64) << 32) | x as u32 as u64;
                if left {
                    ((v << n) >> 32) & 0xFFFF_FFFF
                } else {
                    (v >> n) & 0xFFFF_FFFF
                }
            }),
            Op::Setp { cmp, t, ftz, p, q, a, b, bop } => {
                let regs = regs!();
                let (av, bv) = (*get(regs, a), *get(regs, b));
                let cv = bop.map(|(_, c, neg)| (*get(regs, c), neg));
                let mut op_ = [0u64; 32];
                let mut oq = [0u64; 32];
                for lane in 0..32 {
                    let (r, r2) = match (cmp, t) {
                        (Cmp::I(c), Ty::Int(it)) => {
                            let r = icmp(c, it, av[lane], bv[lane]);
                            (r, !r)
                        }
                        (Cmp::F(c), t) => {
                            let (lo, hi) = fcmp(c, t, ftz, av[lane], bv[lane]);
                            if matches!(t, Ty::F(FTy::F16x2 | FTy::BF16x2)) {
                                (lo, hi)
                            } else {
                                (lo, !lo)
                            }
                        }
                        _ => (false, true),
                    };
                    let (r, r2) = match (bop, cv) {
                        (Some((o, _, _)), Some((cvv, neg))) => {
                            let c = (cvv[lane] & 1 != 0) ^ neg;
                            let f = |x: bool| match o {
                                BoolOp::And => x && c,
                                BoolOp::Or => x || c,
                                BoolOp::Xor => x ^ c,
                            };
                            (f(r), f(r2))
                        }
                        _ => (r, r2),
                    };
                    op_[lane] = r as u64;
                    oq[lane] = r2 as u64;
                }
                put(regs, em, p, &op_);
                if let Some(q) = q {
                    put(regs, em, q, &oq);
                }
            }
            Op::Set { cmp, t, dt, d, a, b } => {
                let tv = match dt {
                    Ty::F(FTy::F32) => 1.0f32.to_bits() as u64,
                    _ => 0xFFFF_FFFF,
                };
                map2(regs!(), em, d, a, b, |x, y| {
                    let r = match (cmp, t) {
                        (Cmp::I(c), Ty::Int(it)) => icmp(c, it, x, y),
                        (Cmp::F(c), t) => fcmp(c, t, false, x, y).0,
                        _ => false,
                    };
                    if r {
                        tv
                    } else {
                        0
                    }
                })
            }
            Op::Selp { d, a, b, c } => map3(regs!(), em, d, a, b, c, |x, y, z| if z & 1 != 0 { x } else { y }),
            Op::Slct { d, a, b, c, cf32 } => map3(regs!(), em, d, a, b, c, |x, y, z| {
                let ge = if cf32 { f32b(z) >= 0.0 || f32b(z) == 0.0 } else { z as u32 as i32 >= 0 };
                if ge {
                    x
                } else {
                    y
                }
            }),
            Op::PredOp { op, d, a, b } => map2(regs!(), em, d, a, b, |x, y| match op {
                0 => x & y & 1,
                1 => (x | y) & 1,
                2 => (x ^ y) & 1,
                _ => !x & 1,
            }),
            Op::FBin { op, t, m, d, a, b } => {
                let regs = regs!();
                if t == FTy::F32 && m.rnd == Rnd::Rn && !m.ftz && !m.sat && matches!(op, FOp::Add | FOp::Mul | FOp::Sub)
                {
                    match op {
                        FOp::Add => map2(regs, em, d, a, b, |x, y| bf32(f32b(x) + f32b(y))),
                        FOp::Sub => map2(regs, em, d, a, b, |x, y| bf32(f32b(x) - f32b(y))),
                        _ => map2(regs, em, d, a, b, |x, y| bf32(f32b(x) * f32b(y))),
                    }
                } else {
                    map2(regs, em, d, a, b, |x, y| fbin(op, t, m, x, y))
                }
            }
            Op::FUn { op, t, m, d, a } => map1(regs!(), em, d, a, |x| fun(op, t, m, x)),
            Op::Fma { t, m, d, a, b, c } => map3(regs!(), em, d, a, b, c, |x, y, z| fma(t, m, x, y, z)),
            Op::Copysign { t, d, a, b } => map2(regs!(), em, d, a, b, |x, y| match t {
                FTy::F64 => (y & 0x7FFF_FFFF_FFFF_FFFF) | (x & (1 << 63)),
                _ => (y & 0x7FFF_FFFF) | (x & 0x8000_0000),
            }),
            Op::Testp { t, kind, d, a } => map1(regs!(), em, d, a, |x| {
                let v = if t == FTy::F64 { f64b(x) } else { f32b(x) as f64 };
                let sub = if t == FTy::F64 { v.is_subnormal() } else { f32b(x).is_subnormal() };
                (match kind {
                    0 => v.is_finite(),
                    1 => v.is_infinite(),
                    2 => !v.is_nan(),
                    3 => v.is_nan(),
                    4 => v.is_normal() && !sub,
                    _ => sub,
                }) as u64
            }),
            Op::Cvt { dt, st, rnd, irnd, ftz, sat, relu, satfinite, d, a } => {
                map1(regs!(), em, d, a, |x| cvt(dt, st, rnd, irnd, ftz, sat, relu, satfinite, x))
            }
            Op::CvtPack { bf, rnd, relu, satfinite, d, a, b } => map2(regs!(), em, d, a, b, |x, y| {
                (if bf {
                    fp::f32x2_to_bf16x2(f32b(x), f32b(y), rnd, relu, satfinite)
                } else {
                    fp::f32x2_to_f16x2(f32b(x), f32b(y), rnd, relu, satfinite)
                }) as u64
            }),
            Op::Cvta { to, space, d, a } => map1(regs!(), em, d, a, |x| match (space, to) {
                (Space::Shared, true) => x.wrapping_sub(SHARED_GENERIC_BASE) & 0xFFFF_FFFF,
                (Space::Shared, false) => (x & 0xFFFF_FFFF).wrapping_add(SHARED_GENERIC_BASE),
                (Space::Local, true) => x.wrapping_sub(LOCAL_GENERIC_BASE) & 0xFFFF_FFFF,
                (Space::Local, false) => (x & 0xFFFF_FFFF).wrapping_add(LOCAL_GENERIC_BASE),
                _ => x,
            }),
            Op::ReadSpecial { d, s } => {
                let v = match s {
                    Special::GlobalTimer => l.start.elapsed().as_nanos() as u64,
                    _ => l.prof.warp_instructions,
                };
                let regs = regs!();
                let o = [if s == Special::Clock { v & 0xFFFF_FFFF } else { v }; 32];
                put(regs, em, d, &o);
            }
            Op::CreatePolicy { d } => {
                let o = [0x1000_0000_0000_0000u64; 32];
                put(regs!(), em, d, &o);
            }
            Op::Activemask { d } => {
                let o = [mask as u64; 32];
                put(regs!(), em, d, &o);
            }
            Op::Nanosleep { .. } => {}
            Op::Ld { space, t, n, ds, addr, volatile } => {
                if volatile && !matches!(space, Space::Shared | Space::Param | Space::Local) {
                    l.polls += 1;
                }
                self.ld(l, wi, pc, em, space, t, n, ds, addr)?
            }
            Op::St { space, t, n, srcs, addr } => self.st(l, wi, pc, em, space, t, n, srcs, addr)?,
            Op::Atom { space, op, t, d, addr, b, c } => self.atom(l, wi, pc, em, space, op, t, d, addr, b, c)?,
            Op::CpAsync { cp_size, dst, src, src_size, ignore } => {
                self.cp_async(l, wi, pc, em, cp_size, dst, src, src_size, ignore)?
            }
            Op::CpAsyncCommit => {
                let w = &mut self.warps[wi];
                for lane in 0..32 {
                    if em >> lane & 1 != 0 {
                        let g = w.cp_committed[lane];
                        let mut any = false;
                        for c in w.cp.iter_mut() {
                            if c.lane as usize == lane && c.group == u32::MAX {
                                c.group = g;
                                any = true;
                            }
                        }
                        let _ = any;
                        w.cp_committed[lane] += 1;
                    }
                }
            }
            Op::CpAsyncWait { n } => {
                if n == u32::MAX {
                    self.complete_cp(l, wi, em, u32::MAX);
                } else {
                    self.complete_cp(l, wi, em, n);
                }
            }
            Op::Ldmatrix { num, trans, ds, addr } => {
                if !self.converged(wi, gi, mask, FULL) {
                    return Ok(Flow::Retry);
                }
                self.ldmatrix(l, wi, pc, em, num, trans, ds, addr)?
            }
            Op::Stmatrix { num, trans, srcs, addr } => {
                if !self.converged(wi, gi, mask, FULL) {
                    return Ok(Flow::Retry);
                }
                self.stmatrix(l, wi, pc, em, num, trans, srcs, addr)?
            }
            Op::Mma { k, ab, cd, ds, a, b, c } => {
                if !self.converged(wi, gi, mask, FULL) {
                    return Ok(Flow::Retry);
                }
                if em != FULL {
                    return Err(self
                        .fault(
                            l,
                            wi,
                            (!em).trailing_zeros(),
                            pc,
                            cuda::LAUNCH_FAILED,
                            "mma.sync.aligned executed by a partial warp",
                        )
                        .detail(format!("active lanes {em:#010x}"))
                        .finish());
                }
                l.prof.mma += 1;
                mma(regs!(), k, ab, cd, ds, a, b, c);
            }
            Op::Shfl { mode, d, p, a, b, c, mask: mr } => {
                let members = get(&self.warps[wi].regs, mr)[em.trailing_zeros().min(31) as usize] as u32;
                if !self.converged(wi, gi, mask, members) {
                    return Ok(Flow::Retry);
                }
                let regs = regs!();
                let (av, bv, cv) = (*get(regs, a), *get(regs, b), *get(regs, c));
                let mut od = [0u64; 32];
                let mut op_ = [0u64; 32];
                for lane in 0..32u32 {
                    let (bval, cval) = ((bv[lane as usize] & 31) as i32, (cv[lane as usize] & 31) as i32);
                    let segmask = ((cv[lane as usize] >> 8) & 31) as i32;
                    let lanei = lane as i32;
                    let max_lane = (lanei & segmask) | (cval & !segmask);
                    let min_lane = lanei & segmask;
                    let (j, pval) = match mode {
                        ShflMode::Up => (lanei - bval, lanei - bval >= max_lane),
                        ShflMode::Down => (lanei + bval, lanei + bval <= max_lane),
                        ShflMode::Bfly => (lanei ^ bval, (lanei ^ bval) <= max_lane),
                        ShflMode::Idx => {
                            let j = min_lane | (bval & !segmask);
                            (j, j <= max_lane)
                        }
                    };
                    let j = if pval { j } else { lanei };
                    od[lane as usize] = av[(j & 31) as usize];
                    op_[lane as usize] = pval as u64;
                }
                put(regs, em, d, &od);
                if let Some(p) = p {
                    put(regs, em, p, &op_);
                }
            }
            Op::Vote { mode, d, a, neg, mask: mr } => {
                let members = get(&self.warps[wi].regs, mr)[em.trailing_zeros().min(31) as usize] as u32;
                if !self.converged(wi, gi, mask, members) {
                    return Ok(Flow::Retry);
                }
                let regs = regs!();
                let av = *get(regs, a);
                let mut ballot = 0u32;
                for lane in 0..32 {
                    if em >> lane & 1 != 0 && ((av[lane] & 1 != 0) ^ neg) {
                        ballot |= 1 << lane;
                    }
                }
                let v = match mode {
                    VoteMode::Ballot => ballot as u64,
                    VoteMode::All => (ballot == em) as u64,
                    VoteMode::Any => (ballot != 0) as u64,
                    VoteMode::Uni => (ballot == em || ballot == 0) as u64,
                };
                put(regs, em, d, &[v; 32]);
            }
            Op::Match { all, t, d, p, a, mask: mr } => {
                let members = get(&self.warps[wi].regs, mr)[em.trailing_zeros().min(31) as usize] as u32;
                if !self.converged(wi, gi, mask, members) {
                    return Ok(Flow::Retry);
                }
                let regs = regs!();
                let av = *get(regs, a);
                let bits = t.bits as u32;
                let mut od = [0u64; 32];
                let mut op_ = [0u64; 32];
                let all_same = (0..32)
                    .filter(|&x| em >> x & 1 != 0)
                    .all(|x| mask_bits(av[x], bits) == mask_bits(av[em.trailing_zeros() as usize], bits));
                for lane in 0..32 {
                    let mut m = 0u32;
                    for o in 0..32 {
                        if em >> o & 1 != 0 && mask_bits(av[o], bits) == mask_bits(av[lane], bits) {
                            m |= 1 << o;
                        }
                    }
                    od[lane] = if all {
                        if all_same {
                            em as u64
                        } else {
                            0
                        }
                    } else {
                        m as u64
                    };
                    op_[lane] = all_same as u64;
                }
                put(regs, em, d, &od);
                if let Some(p) = p {
                    put(regs, em, p, &op_);
                }
            }
            Op::Redux { op, t, d, a, mask: mr } => {
                let members = get(&self.warps[wi].regs, mr)[em.trailing_zeros().min(31) as usize] as u32;
                if !self.converged(wi, gi, mask, members) {
                    return Ok(Flow::Retry);
                }
                let regs = regs!();
                let av = *get(regs, a);
                let lanes: Vec<i128> = (0..32).filter(|&x| em >> x & 1 != 0).map(|x| ext(av[x], t)).collect();
                let r: i128 = match op {
                    AtomOp::Add => lanes.iter().sum(),
                    AtomOp::Min => *lanes.iter().min().unwrap_or(&0),
                    AtomOp::Max => *lanes.iter().max().unwrap_or(&0),
                    AtomOp::And => lanes.iter().fold(-1, |a, b| a & b),
                    AtomOp::Or => lanes.iter().fold(0, |a, b| a | b),
                    _ => lanes.iter().fold(0, |a, b| a ^ b),
                };
                put(regs, em, d, &[mask_bits(r as u64, 32); 32]);
            }
            Op::BarWarp { mask: mr } => {
                let members = get(&self.warps[wi].regs, mr)[em.trailing_zeros().min(31) as usize] as u32;
                if !self.converged(wi, gi, mask, members) {
                    return Ok(Flow::Retry);
                }
            }
            Op::Bar { kind, id, count, p, .. } => {
                if em == 0 {
                    return Ok(Flow::Next);
                }
                let regs = &self.warps[wi].regs;
                let idv = get(regs, id)[em.trailing_zeros() as usize] as u32;
                let cnt = count.map(|c| get(regs, c)[em.trailing_zeros() as usize] as u32);
                let red = p.map(|(pr, neg)| {
                    let v = get(regs, pr);
                    (0..32).filter(|&x| em >> x & 1 != 0 && ((v[x] & 1 != 0) ^ neg)).count() as u32
                });
                if kind == BarKind::Arrive {
                    let b = &mut self.bars[(idv & 15) as usize];
                    b.arrived += em.count_ones();
                    if let Some(c) = cnt {
                        b.expected = c;
                    }
                    return Ok(Flow::Next);
                }
                // The group (only its active lanes) waits.
                if em != mask {
                    let w = &mut self.warps[wi];
                    w.groups[gi].mask = em;
                    w.groups.push(Group { pc: pc + 1, mask: mask & !em, park: Park::Run });
                }
                self.arrive(l, wi, gi, idv, cnt, red, kind)?;
                return Ok(Flow::Parked);
            }
            Op::Bra { .. } | Op::Ret | Op::Exit | Op::Trap => unreachable!(),
        }
        Ok(Flow::Next)
    }

    #[inline]
    fn lane_addr(&self, wi: usize, addr: Addr, lane: usize) -> u64 {
        let base = addr.base.map_or(0, |b| self.warps[wi].regs[b as usize * 32 + lane]);
        base.wrapping_add(addr.off as u64)
    }

    #[allow(clippy::too_many_arguments)]
    fn ld(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        em: u32,
        space: Space,
        t: Ty,
        n: u8,
        ds: [R; 4],
        addr: Addr,
    ) -> Result<()> {
        let es = elem_bytes(t);
        let total = es * n as usize;
        let mut vals = [[0u64; 32]; 4];
        let mut acc = Acc::default();
        let mut sacc = SAcc::default();
        let mut is_global = false;
        let mut is_shared = false;
        for lane in 0..32usize {
            if em >> lane & 1 == 0 {
                continue;
            }
            let a = self.lane_addr(wi, addr, lane);
            let mut buf = [0u8; 32];
            let b = &mut buf[..total];
            let place = match space {
                Space::Global => Where::Global(a),
                Space::Shared => Where::Shared(a as u32),
                Space::Param => Where::Param(a.wrapping_sub(PARAM_BASE) as usize),
                Space::Local => Where::Local(a),
                _ => classify(a),
            };
            let r = match place {
                Where::Global(g) => {
                    is_global = true;
                    if l.profiling {
                        acc.push((g, total as u32));
                    }
                    l.gload(g, b, total)
                }
                Where::Shared(s) => {
                    is_shared = true;
                    if l.profiling {
                        sacc.push((s, total as u32));
                    }
                    self.sload(l, Cta::tid(wi, lane as u32), s, b, total)
                }
                Where::Param(p) => l.pload(p, b),
                Where::Local(o) => self.local(l, wi, lane, o, total).map(|src| b.copy_from_slice(src)),
            };
            if let Err(e) = r {
                return Err(mem_report(self, l, wi, lane as u32, pc, e));
            }
            for i in 0..n as usize {
                vals[i][lane] = ld_value(t, &b[i * es..(i + 1) * es]);
            }
        }
        let regs = &mut self.warps[wi].regs;
        for i in 0..n as usize {
            put(regs, em, ds[i], &vals[i]);
        }
        account(l, true, is_global.then_some(&acc), is_shared.then_some(&sacc), total);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn st(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        em: u32,
        space: Space,
        t: Ty,
        n: u8,
        srcs: [R; 4],
        addr: Addr,
    ) -> Result<()> {
        let es = elem_bytes(t);
        let total = es * n as usize;
        let mut acc = Acc::default();
        let mut sacc = SAcc::default();
        let (mut is_global, mut is_shared) = (false, false);
        for lane in 0..32usize {
            if em >> lane & 1 == 0 {
                continue;
            }
            let a = self.lane_addr(wi, addr, lane);
            let mut buf = [0u8; 32];
            for i in 0..n as usize {
                let v = self.warps[wi].regs[srcs[i] as usize * 32 + lane];
                buf[i * es..(i + 1) * es].copy_from_slice(&v.to_le_bytes()[..es]);
            }
            let b = &buf[..total];
            let place = match space {
                Space::Global => Where::Global(a),
                Space::Shared => Where::Shared(a as u32),
                Space::Local => Where::Local(a),
                _ => classify(a),
            };
            let r = match place {
                Where::Local(o) => self.local(l, wi, lane, o, total).map(|dst| dst.copy_from_slice(b)),
                Where::Global(g) => {
                    is_global = true;
                    if l.profiling {
                        acc.push((g, total as u32));
                    }
                    l.gstore(g, b, total)
                }
                Where::Shared(s) => {
                    is_shared = true;
                    if l.profiling {
                        sacc.push((s, total as u32));
                    }
                    self.sstore(l, Cta::tid(wi, lane as u32), s, b, total)
                }
                Where::Param(_) => Err(MemErr {
                    code: cuda::ILLEGAL_ADDRESS,
                    title: "store to the parameter space".into(),
                    detail: format!("address {a:#x}"),
                }),
            };
            if let Err(e) = r {
                return Err(mem_report(self, l, wi, lane as u32, pc, e));
            }
        }
        account(l, false, is_global.then_some(&acc), is_shared.then_some(&sacc), total);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn atom(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        em: u32,
        space: Space,
        op: AtomOp,
        t: Ty,
        d: Option<R>,
        addr: Addr,
        b: R,
        c: Option<R>,
    ) -> Result<()> {
        let es = elem_bytes(t);
        let mut out = [0u64; 32];
        let mut acc = Acc::default();
        for lane in 0..32usize {
            if em >> lane & 1 == 0 {
                continue;
            }
            let a = self.lane_addr(wi, addr, lane);
            let bv = self.warps[wi].regs[b as usize * 32 + lane];
            let cv = c.map_or(0, |c| self.warps[wi].regs[c as usize * 32 + lane]);
            let place = match space {
                Space::Global => Where::Global(a),
                Space::Shared => Where::Shared(a as u32),
                _ => classify(a),
            };
            let mut buf = [0u8; 8];
            let r: std::result::Result<(), MemErr> = (|| {
                match place {
                    Where::Global(g) => {
                        acc.push((g, es as u32));
                        l.gload(g, &mut buf[..es], es)?;
                    }
                    Where::Shared(s) => {
                        let o = self.satomic(l, s, es)?;
                        buf[..es].copy_from_slice(&self.smem[o..o + es]);
                    }
                    Where::Param(_) | Where::Local(_) => {
                        return Err(MemErr {
                            code: cuda::ILLEGAL_ADDRESS,
                            title: "atomic on the parameter or local space".into(),
                            detail: String::new(),
                        })
                    }
                }
                let old = u64::from_le_bytes(buf);
                let new = atom_op(op, t, old, bv, cv);
                out[lane] = ld_value(t, &buf[..es]);
                let nb = new.to_le_bytes();
                match place {
                    Where::Global(g) => l.gstore(g, &nb[..es], es)?,
                    Where::Shared(s) => {
                        let o = s as usize;
                        self.smem[o..o + es].copy_from_slice(&nb[..es]);
                    }
                    Where::Param(_) | Where::Local(_) => {}
                }
                Ok(())
            })();
            if let Err(e) = r {
                return Err(mem_report(self, l, wi, lane as u32, pc, e));
            }
        }
        if let Some(d) = d {
            put(&mut self.warps[wi].regs, em, d, &out);
        }
        if l.profiling && acc.n > 0 {
            let bytes = acc.get().iter().map(|x| x.1 as u64).sum::<u64>();
            let sec = crate::profile::sectors(acc.get());
            l.prof.global_load_bytes += bytes;
            l.prof.global_store_bytes += bytes;
            l.prof.global_load_sectors += sec;
            l.prof.global_store_sectors += sec;
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn cp_async(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        em: u32,
        cp_size: u8,
        dst: Addr,
        src: Addr,
        src_size: Option<R>,
        ignore: Option<(R, bool)>,
    ) -> Result<()> {
        let mut acc = Acc::default();
        for lane in 0..32usize {
            if em >> lane & 1 == 0 {
                continue;
            }
            let d = self.lane_addr(wi, dst, lane) as u32;
            let s = self.lane_addr(wi, src, lane);
            let mut n = src_size.map_or(cp_size as u64, |r| self.warps[wi].regs[r as usize * 32 + lane] & 0xFFFF_FFFF);
            if let Some((p, neg)) = ignore {
                if (self.warps[wi].regs[p as usize * 32 + lane] & 1 != 0) ^ neg {
                    n = 0;
                }
            }
            if n > cp_size as u64 {
                return Err(self
                    .fault(
                        l,
                        wi,
                        lane as u32,
                        pc,
                        cuda::LAUNCH_FAILED,
                        "cp.async src-size larger than cp-size (undefined)",
                    )
                    .detail(format!("src-size {n}, cp-size {cp_size}"))
                    .finish());
            }
            let mut data = [0u8; 16];
            if n > 0 {
                if l.profiling {
                    acc.push((s, n as u32));
                }
                if let Err(e) = l.gload(s, &mut data[..n as usize], cp_size as usize) {
                    return Err(mem_report(self, l, wi, lane as u32, pc, e));
                }
            }
            if let Err(e) = self.cp_dst(l, d, cp_size as usize) {
                return Err(mem_report(self, l, wi, lane as u32, pc, e));
            }
            self.warps[wi].cp.push(CpOp { lane: lane as u8, group: u32::MAX, dst: d, len: cp_size, data });
        }
        if l.profiling && acc.n > 0 {
            l.prof.global_load_bytes += acc.get().iter().map(|x| x.1 as u64).sum::<u64>();
            l.prof.global_load_sectors += crate::profile::sectors(acc.get());
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn ldmatrix(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        em: u32,
        num: u8,
        trans: bool,
        ds: [R; 4],
        addr: Addr,
    ) -> Result<()> {
        // Row r of matrix j comes from the address in lane 8j + r (PTX ISA "ldmatrix").
        let mut rows = [[0u8; 16]; 32];
        let mut sacc: Vec<(u32, u32)> = Vec::new();
        for src in 0..(8 * num as usize) {
            let a = self.lane_addr(wi, addr, src) as u32;
            sacc.push((a, 16));
            if let Err(e) = self.sload(l, Cta::tid(wi, src as u32), a, &mut rows[src], 16) {
                return Err(mem_report(self, l, wi, src as u32, pc, e));
            }
        }
        let regs = &mut self.warps[wi].regs;
        for j in 0..num as usize {
            let mut o = [0u64; 32];
            for (lane, out) in o.iter_mut().enumerate() {
                let (g, t) = (lane / 4, lane % 4);
                let el = |r: usize, c: usize| {
                    u16::from_le_bytes([rows[8 * j + r][2 * c], rows[8 * j + r][2 * c + 1]]) as u64
                };
                *out =
                    if trans { el(2 * t, g) | el(2 * t + 1, g) << 16 } else { el(g, 2 * t) | el(g, 2 * t + 1) << 16 };
            }
            put(regs, em, ds[j], &o);
        }
        if l.profiling {
            l.prof.shared_requests += 1;
            let phases: Vec<&[(u32, u32)]> = sacc.chunks(8).collect();
            l.prof.shared_wavefronts += crate::profile::wavefronts(&phases);
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn stmatrix(
        &mut self,
        l: &mut Launch<'_>,
        wi: usize,
        pc: u32,
        _em: u32,
        num: u8,
        trans: bool,
        srcs: [R; 4],
        addr: Addr,
    ) -> Result<()> {
        for j in 0..num as usize {
            let mut rows = [[0u8; 16]; 8];
            for lane in 0..32usize {
                let v = self.warps[wi].regs[srcs[j] as usize * 32 + lane];
                let (g, t) = (lane / 4, lane % 4);
                let (lo, hi) = ((v & 0xFFFF) as u16, (v >> 16) as u16);
                if trans {
                    rows[2 * t][2 * g..2 * g + 2].copy_from_slice(&lo.to_le_bytes());
                    rows[2 * t + 1][2 * g..2 * g + 2].copy_from_slice(&hi.to_le_bytes());
                } else {
                    rows[g][4 * t..4 * t + 2].copy_from_slice(&lo.to_le_bytes());
                    rows[g][4 * t + 2..4 * t + 4].copy_from_slice(&hi.to_le_bytes());
                }
            }
            for (r, row) in rows.iter().enumerate() {
                let src = 8 * j + r;
                let a = self.lane_addr(wi, addr, src) as u32;
                if let Err(e) = self.sstore(l, Cta::tid(wi, src as u32), a, row, 16) {
                    return Err(mem_report(self, l, wi, src as u32, pc, e));
                }
            }
        }
        Ok(())
    }
}

/// Profile accounting of one warp-level load (`load`) or store request.
fn account(l: &mut Launch<'_>, load: bool, global: Option<&Acc>, shared: Option<&SAcc>, size: usize) {
    if !l.profiling {
        return;
    }
    if let Some(acc) = global {
        let bytes = acc.get().iter().map(|x| x.1 as u64).sum::<u64>();
        let sectors = crate::profile::sectors(acc.get());
        if load {
            l.prof.global_load_bytes += bytes;
            l.prof.global_load_sectors += sectors;
        } else {
            l.prof.global_store_bytes += bytes;
            l.prof.global_store_sectors += sectors;
        }
    }
    if let Some(sacc) = shared {
        l.prof.shared_requests += 1;
        l.prof.shared_wavefronts += shared_wavefronts(sacc.get(), size);
    }
}

/// Per-lane `(address, bytes)` of one warp request, for the profile (no allocation).
#[derive(Default)]
struct Lanes32<A: Copy + Default> {
    v: [(A, u32); 32],
    n: usize,
}
impl<A: Copy + Default> Lanes32<A> {
    #[inline]
    fn push(&mut self, x: (A, u32)) {
        if self.n < 32 {
            self.v[self.n] = x;
            self.n += 1;
        }
    }
    fn get(&self) -> &[(A, u32)] {
        &self.v[..self.n]
    }
}
/// Global accesses (64-bit addresses).
type Acc = Lanes32<u64>;
/// Shared accesses (32-bit shared-window addresses).
type SAcc = Lanes32<u32>;

fn shared_wavefronts(acc: &[(u32, u32)], size: usize) -> u64 {
    let per = match size {
        0..=4 => 32,
        5..=8 => 16,
        _ => 8,
    };
    let phases: Vec<&[(u32, u32)]> = acc.chunks(per).collect();
    crate::profile::wavefronts(&phases)
}

fn atom_op(op: AtomOp, t: Ty, old: u64, b: u64, c: u64) -> u64 {
    match (t, op) {
        (Ty::F(FTy::F16 | FTy::BF16 | FTy::F16x2 | FTy::BF16x2), AtomOp::Exch) => return b,
        (Ty::F(FTy::F16 | FTy::BF16), AtomOp::Cas) => return if old & 0xFFFF == b & 0xFFFF { c } else { old },
        (Ty::F(FTy::F16x2 | FTy::BF16x2), AtomOp::Cas) => return if old as u32 == b as u32 { c } else { old },
        // `.noftz` adds (the only form the ISA has for 16-bit floats): round to nearest, no flush.
        (Ty::F(FTy::F16), _) => return fp::f16_add(old as u16, b as u16, Rnd::Rn, false, false) as u64,
        (Ty::F(FTy::BF16), _) => return fp::bf16_add(old as u16, b as u16, Rnd::Rn) as u64,
        (Ty::F(FTy::F16x2), _) => return fp::f16x2_add(old as u32, b as u32, Rnd::Rn, false, false) as u64,
        (Ty::F(FTy::BF16x2), _) => return fp::bf16x2_add(old as u32, b as u32, Rnd::Rn) as u64,
        _ => {}
    }
    match t {
        Ty::F(FTy::F32) => {
            let (x, y) = (f32b(old), f32b(b));
            bf32(match op {
                AtomOp::Add => x + y,
                AtomOp::Min => fp::min_f32(x, y, false),
                AtomOp::Max => fp::max_f32(x, y, false),
                AtomOp::Exch => y,
                AtomOp::Cas => {
                    if old as u32 == b as u32 {
                        f32b(c)
                    } else {
                        x
                    }
                }
                _ => x,
            })
        }
        Ty::F(FTy::F64) => {
            let (x, y) = (f64b(old), f64b(b));
            bf64(match op {
                AtomOp::Add => x + y,
                AtomOp::Exch => y,
                AtomOp::Cas => {
                    if old == b {
                        f64b(c)
                    } else {
                        x
                    }
                }
                _ => x,
            })
        }
        Ty::Int(it) => {
            let bits = it.bits as u32;
            let (x, y) = (ext(old, it), ext(b, it));
            let r: i128 = match op {
                AtomOp::Add => x.wrapping_add(y),
                AtomOp::Min => x.min(y),
                AtomOp::Max => x.max(y),
                AtomOp::Exch => y,
                AtomOp::Cas => {
                    if mask_bits(old, bits) == mask_bits(b, bits) {
                        ext(c, it)
                    } else {
                        x
                    }
                }
                AtomOp::And => x & y,
                AtomOp::Or => x | y,
                AtomOp::Xor => x ^ y,
                AtomOp::Inc => {
                    let (xo, yo) = (mask_bits(old, bits), mask_bits(b, bits));
                    if xo >= yo {
                        0
                    } else {
                        xo as i128 + 1
                    }
                }
                AtomOp::Dec => {
                    let (xo, yo) = (mask_bits(old, bits), mask_bits(b, bits));
                    if xo == 0 || xo > yo {
                        yo as i128
                    } else {
                        xo as i128 - 1
                    }
                }
            };
            mask_bits(r as u64, bits)
        }
        _ => old,
    }
}

/// `mma.sync.aligned.m16n8k{16,8}.row.col` over the warp's fragments (PTX ISA "Matrix Fragments
/// for mma.m16n8k16 with floating point type"): lane l holds, with g = l/4 and t = l%4,
/// A rows g and g+8, columns 2t, 2t+1 (+8); B rows 2t, 2t+1 (+8), column g; C/D rows g, g+8,
/// columns 2t, 2t+1.
#[allow(clippy::too_many_arguments)]
fn mma(regs: &mut [u64], k: u8, ab: MmaTy, cd: MmaTy, ds: [R; 4], a: [R; 4], b: [R; 2], c: [R; 4]) {
    let k = k as usize;
    let h = |v: u64| -> f32 {
        match ab {
            MmaTy::BF16 => fp::bf16_to_f32(v as u16),
            _ => fp::f16_to_f32(v as u16),
        }
    };
    let mut am = [[0f32; 16]; 16];
    let mut bm = [[0f32; 8]; 16];
    let mut cm = [[0f32; 8]; 16];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        let na = if k == 16 { 4 } else { 2 };
        for (ri, &r) in a.iter().enumerate().take(na) {
            let v = regs[r as usize * 32 + lane];
            let row = g + 8 * (ri & 1);
            let col = 2 * t + 8 * (ri >> 1);
            am[row][col] = h(v & 0xFFFF);
            am[row][col + 1] = h(v >> 16 & 0xFFFF);
        }
        let nb = if k == 16 { 2 } else { 1 };
        for (ri, &r) in b.iter().enumerate().take(nb) {
            let v = regs[r as usize * 32 + lane];
            let row = 2 * t + 8 * ri;
            bm[row][g] = h(v & 0xFFFF);
            bm[row + 1][g] = h(v >> 16 & 0xFFFF);
        }
        if cd == MmaTy::F32 {
            for (ri, &r) in c.iter().enumerate() {
                let v = regs[r as usize * 32 + lane];
                cm[g + 8 * (ri >> 1)][2 * t + (ri & 1)] = f32b(v);
            }
        } else {
            for (ri, &r) in c.iter().enumerate().take(2) {
                let v = regs[r as usize * 32 + lane];
                cm[g + 8 * ri][2 * t] = fp::f16_to_f32(v as u16);
                cm[g + 8 * ri][2 * t + 1] = fp::f16_to_f32((v >> 16) as u16);
            }
        }
    }
    let mut dm = [[0f32; 8]; 16];
    mma_product(&am, &bm, &cm, k, ab == MmaTy::BF16, &mut dm);
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        if cd == MmaTy::F32 {
            for (ri, &r) in ds.iter().enumerate() {
                regs[r as usize * 32 + lane] = bf32(dm[g + 8 * (ri >> 1)][2 * t + (ri & 1)]);
            }
        } else {
            for (ri, &r) in ds.iter().enumerate().take(2) {
                let lo = fp::f32_to_f16(dm[g + 8 * ri][2 * t], Rnd::Rn, false, false) as u64;
                let hi = fp::f32_to_f16(dm[g + 8 * ri][2 * t + 1], Rnd::Rn, false, false) as u64;
                regs[r as usize * 32 + lane] = hi << 16 | lo;
            }
        }
    }
}

/// The sign of an exactly zero sum: -0 only when every term is -0 (IEEE 754 §6.3).
fn zero_sum(am: &[[f32; 16]; 16], bm: &[[f32; 8]; 16], cm: &[[f32; 8]; 16], i: usize, j: usize, k: usize) -> f32 {
    let c = cm[i][j];
    let all_neg = c == 0.0
        && c.is_sign_negative()
        && (0..k).all(|x| {
            let p = am[i][x] as f64 * bm[x][j] as f64;
            p == 0.0 && p.is_sign_negative()
        });
    if all_neg {
        -0.0
    } else {
        0.0
    }
}

/// Bounds on the nonzero values: every one is below 2^(hi+1) and a multiple of 2^lo, from the
/// exponent field and the format's `prec` fraction bits (7 for bf16, 10 for f16, 23 for f32
/// values). A non-finite or subnormal value gives a range that fails every bound.
fn bit_range<'a>(vals: impl Iterator<Item = &'a f32>, prec: i32) -> (i32, i32) {
    let (mut hi, mut lo, mut odd) = (0u32, 255u32, false);
    for v in vals {
        let e = (v.to_bits() >> 23) & 0xFF;
        let nz = v.to_bits() & 0x7FFF_FFFF != 0;
        odd |= nz & ((e == 0) | (e == 255));
        hi = hi.max(if nz { e } else { 0 });
        lo = lo.min(if nz { e } else { 255 });
    }
    if odd {
        return (i32::MAX / 2, i32::MIN / 2);
    }
    if hi == 0 {
        return (i32::MIN / 2, i32::MAX / 2); // all zero
    }
    (hi as i32 - 127, lo as i32 - 127 - prec)
}

/// `D = A·B + C` for one m16n8k`k` tile, each element the exact sum rounded once to f32.
///
/// The 8 columns of a row are summed in f64 side by side (independent chains the compiler can
/// vectorise); products of 16-bit floats are exact in f64, and TwoSum (Knuth) tells exactly
/// whether any addition rounded. Elements where one did — or with non-finite terms, a zero or a
/// subnormal result — take the exact routine [`fp::dot_f32_acc`].
fn mma_product(
    am: &[[f32; 16]; 16],
    bm: &[[f32; 8]; 16],
    cm: &[[f32; 8]; 16],
    k: usize,
    bf16: bool,
    dm: &mut [[f32; 8]; 16],
) {
    // Fast path: if every product and partial sum is a multiple of 2^lo below 2^(hi + 6) with
    // hi + 6 - lo <= 53, plain f64 sums are exact (no rounding can happen), so rounding each to
    // f32 once is the exact result. The bound is taken over the whole tile from the inputs'
    // highest and lowest set bits.
    let prec = if bf16 { 7 } else { 10 };
    let (amax, amin) = bit_range(am.iter().flat_map(|r| r[..k].iter()), prec);
    let (bmax, bmin) = bit_range(bm[..k].iter().flatten(), prec);
    let (cmax, cmin) = bit_range(cm.iter().flatten(), 23);
    let hi = (amax + bmax + 1).max(cmax);
    let lo = (amin + bmin).min(cmin);
    if hi - lo + 6 <= 53 && amax > i32::MIN / 4 && bmax > i32::MIN / 4 && cmax < i32::MAX / 4 {
        for i in 0..16 {
            let mut s = [0f64; 8];
            for j in 0..8 {
                s[j] = cm[i][j] as f64;
            }
            for kk in 0..k {
                let x = am[i][kk] as f64;
                let row = &bm[kk];
                for j in 0..8 {
                    s[j] += x * row[j] as f64;
                }
            }
            for j in 0..8 {
                dm[i][j] = if s[j] != 0.0 { s[j] as f32 } else { zero_sum(am, bm, cm, i, j, k) };
            }
        }
        return;
    }

    let finite = am.iter().flatten().fold(true, |f, v| f & v.is_finite())
        & bm.iter().flatten().fold(true, |f, v| f & v.is_finite())
        & cm.iter().flatten().fold(true, |f, v| f & v.is_finite());
    for i in 0..16 {
        let mut s = [0f64; 8];
        // OR of the bits of every rounding error (sign masked): zero iff every addition was exact.
        let mut err = [0u64; 8];
        for j in 0..8 {
            s[j] = cm[i][j] as f64;
        }
        for kk in 0..k {
            let x = am[i][kk] as f64;
            let row = &bm[kk];
            for j in 0..8 {
                let p = x * row[j] as f64;
                let t = s[j] + p;
                let bp = t - s[j];
                err[j] |= ((s[j] - (t - bp)) + (p - bp)).to_bits() & 0x7FFF_FFFF_FFFF_FFFF;
                s[j] = t;
            }
        }
        for j in 0..8 {
            let r = s[j] as f32;
            dm[i][j] = if finite && err[j] == 0 && r != 0.0 && r.is_finite() && r.abs() >= f32::MIN_POSITIVE {
                r
            } else if finite && err[j] == 0 && s[j] == 0.0 {
                zero_sum(am, bm, cm, i, j, k)
            } else {
                let a: Vec<f32> = am[i][..k].to_vec();
                let b: Vec<f32> = (0..k).map(|x| bm[x][j]).collect();
                fp::dot_f32_acc(&a, &b, cm[i][j])
            };
        }
    }
}
