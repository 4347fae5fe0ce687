//! IEEE arithmetic and conversions with PTX rounding modes.
//!
//! Semantics follow the PTX ISA 9.x text: 9.7.3 "Floating-Point Instructions" (add, sub, mul,
//! fma, div, sqrt, rcp, min, max, and the `.approx` family), 9.7.4 "Half Precision
//! Floating-Point Instructions" (add, sub, mul, fma, neg, abs, min, max), 9.7.9.21 "Data
//! Movement and Conversion Instructions: cvt", and 9.3.1.2 "Floating Point Comparisons".
//!
//! Every exact operation rounds **once**, from the exact mathematical result, into the
//! destination format with the requested rounding mode (`.rn` ties to even, `.rz`, `.rm`,
//! `.rp`; `cvt`'s `.frnd`/`.irnd`). The core is a small exact engine: every f16/bf16/f32/f64
//! value is decomposed into `(sign, integer mantissa, exponent)`, products are formed exactly in
//! `u128` (53 × 53 = 106 bits), sums are aligned in `u128` with a sticky bit for the bits that
//! fall far below the result (`exact_sum`), and `round_bits` rounds the exact value into a
//! target format (subnormals, overflow per mode, `.satfinite`). Division and square root start
//! from the host's correctly rounded `.rn` result and use the exact sign of the residual
//! (`q*b - a`, `q*q - a`, computed by the same engine) to step to the directed result. f16/bf16
//! operations never pass through an f32 intermediate (no double rounding). The `.rn` f32/f64
//! operations use the host's IEEE operations directly (they are correctly rounded too).
//!
//! NaN rules:
//! * arithmetic producing a NaN returns the canonical NaN: `0x7FFFFFFF` (f32), `0x7FFF` (f16,
//!   bf16: CUDA's `CUDART_NAN_BF16`/`CUDART_NAN_FP16`), and by the same convention
//!   `0x7FFF_FFFF_FFFF_FFFF` for f64 (the ISA only fixes `0x7fffffff00000000` for
//!   `rcp/rsqrt.approx.ftz.f64`, which is honoured);
//! * `min`/`max`: both NaN → canonical NaN; one NaN → the other operand (its bits unchanged);
//!   `.NaN` → canonical NaN if either is NaN; −0.0 < +0.0 ("If values of both inputs are 0.0,
//!   then +0.0 > -0.0");
//! * `cvt` f32→f16/bf16: canonical NaN (`.relu`: "NaN results are converted to canonical NaN";
//!   `.satfinite`: "the result is NaN in the specified destination format");
//! * `cvt` float→int: NaN → 0, except that an `.f64` source or an `.s64/.u64` destination gives
//!   `1 << (BitWidth(dst) - 1)` (cvt, Integer Notes);
//! * `.sat`: NaN → +0.0;
//! * exact widenings (`cvt.f32.f16`, `cvt.f32.bf16`, `cvt.f64.f32`) keep the payload (the ISA:
//!   "For cvt.f32.bf16, NaN input yields unspecified NaN"; bf16→f32 is a 16-bit shift).
//!
//! Only `std` is used.

/// Floating-point rounding modifier (`.rn .rz .rm .rp`, PTX ISA "Rounding Modifiers").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rnd {
    Rn,
    Rz,
    Rm,
    Rp,
}

/// Integer rounding modifier (`.rni .rzi .rmi .rpi`, PTX ISA "cvt").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IRnd {
    Rni,
    Rzi,
    Rmi,
    Rpi,
}

/// Floating-point comparison operators (PTX ISA 9.3.1.2 "Floating Point Comparisons").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FCmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
    Equ,
    Neu,
    Ltu,
    Leu,
    Gtu,
    Geu,
    Num,
    Nan,
}

/// Canonical f32 NaN.
pub const NAN_F32: u32 = 0x7FFF_FFFF;
/// Canonical f64 NaN (convention of this module).
pub const NAN_F64: u64 = 0x7FFF_FFFF_FFFF_FFFF;
/// Canonical f16 NaN.
pub const NAN_F16: u16 = 0x7FFF;
/// Canonical bf16 NaN.
pub const NAN_BF16: u16 = 0x7FFF;

// ---------------------------------------------------------------------------------------------
// Exact engine
// ---------------------------------------------------------------------------------------------

/// A binary format: precision `p` (with the hidden bit), exponent bias and width.
#[derive(Clone, Copy, Debug)]
struct Fmt {
    p: u32,
    bias: i32,
    ebits: u32,
    nan: u64,
}

const F16: Fmt = Fmt { p: 11, bias: 15, ebits: 5, nan: NAN_F16 as u64 };
const BF16: Fmt = Fmt { p: 8, bias: 127, ebits: 8, nan: NAN_BF16 as u64 };
const F32: Fmt = Fmt { p: 24, bias: 127, ebits: 8, nan: NAN_F32 as u64 };
const F64: Fmt = Fmt { p: 53, bias: 1023, ebits: 11, nan: NAN_F64 };

impl Fmt {
    #[inline]
    fn inf(self) -> u64 {
        ((1u64 << self.ebits) - 1) << (self.p - 1)
    }
    #[inline]
    fn sign(self) -> u64 {
        1u64 << (self.p - 1 + self.ebits)
    }
    #[inline]
    fn max(self) -> u64 {
        self.inf() - 1
    }
    /// The value of `bits` (any class) as an f64 (exact).
    #[inline]
    fn to_f64(self, bits: u64) -> f64 {
        match self.p {
            11 => f16_to_f64(bits as u16),
            8 => f32::from_bits((bits as u32) << 16) as f64,
            24 => f32::from_bits(bits as u32) as f64,
            _ => f64::from_bits(bits),
        }
    }
}

/// A finite value `(-1)^neg * m * 2^e`.
#[derive(Clone, Copy, Debug)]
struct Dec {
    neg: bool,
    m: u128,
    e: i32,
}

#[inline]
fn dec(x: f64) -> Dec {
    let b = x.to_bits();
    let neg = b >> 63 != 0;
    let ex = ((b >> 52) & 0x7FF) as i32;
    let fr = (b & ((1u64 << 52) - 1)) as u128;
    if ex == 0 {
        Dec { neg, m: fr, e: -1074 }
    } else {
        Dec { neg, m: fr | (1u128 << 52), e: ex - 1075 }
    }
}

/// An exact value with a sticky bit: `(-1)^neg * (m + δ) * 2^e`, `δ ∈ (0,1)` iff `sticky`.
#[derive(Clone, Copy, Debug)]
struct Wide {
    neg: bool,
    m: u128,
    e: i32,
    sticky: bool,
}

#[inline]
fn top(d: &Dec) -> i32 {
    (127 - d.m.leading_zeros() as i32) + d.e
}

/// Exact sum of two finite values whose mantissas have at most 106 bits.
fn exact_sum(x: Dec, y: Dec) -> Wide {
    if x.m == 0 {
        return Wide { neg: y.neg, m: y.m, e: y.e, sticky: false };
    }
    if y.m == 0 {
        return Wide { neg: x.neg, m: x.m, e: x.e, sticky: false };
    }
    let (big, small) = if top(&x) >= top(&y) { (x, y) } else { (y, x) };
    let bl = 127 - big.m.leading_zeros() as i32;
    let sh = 125 - bl;
    let bm = big.m << sh;
    let be = big.e - sh;
    let (sm, sticky) = if small.e >= be {
        (small.m << (small.e - be), false)
    } else {
        let d = be - small.e;
        if d >= 128 {
            (0, true)
        } else {
            (small.m >> d, small.m & ((1u128 << d) - 1) != 0)
        }
    };
    if big.neg == small.neg {
        Wide { neg: big.neg, m: bm + sm, e: be, sticky }
    } else if sticky {
        // bm - (sm + δ) = (bm - sm - 1) + (1 - δ); bm > sm + 1 here (the small operand lost bits).
        Wide { neg: big.neg, m: bm - sm - 1, e: be, sticky: true }
    } else if bm >= sm {
        Wide { neg: big.neg, m: bm - sm, e: be, sticky: false }
    } else {
        Wide { neg: small.neg, m: sm - bm, e: be, sticky: false }
    }
}

#[inline]
fn overflow_bits(f: Fmt, neg: bool, r: Rnd, satfinite: bool) -> u64 {
    let s = if neg { f.sign() } else { 0 };
    let to_inf = !satfinite
        && match r {
            Rnd::Rn => true,
            Rnd::Rz => false,
            Rnd::Rm => neg,
            Rnd::Rp => !neg,
        };
    s | if to_inf { f.inf() } else { f.max() }
}

/// Round the exact value `w` into format `f` (once), returning its bits.
fn round_bits(f: Fmt, w: Wide, r: Rnd, satfinite: bool) -> u64 {
    let s = if w.neg { f.sign() } else { 0 };
    let neg = w.neg;
    if w.m == 0 && !w.sticky {
        return s;
    }
    let pm = if w.m == 0 { -1 } else { 127 - w.m.leading_zeros() as i32 };
    let big_e = pm + w.e;
    let emin = 1 - f.bias;
    if big_e > f.bias {
        return overflow_bits(f, neg, r, satfinite);
    }
    let p = f.p as i32;
    let lsb_exp = if big_e >= emin { big_e - (p - 1) } else { emin - (p - 1) };
    let shift = lsb_exp - w.e;
    let (q, rb, rest) = if shift <= 0 {
        // Only reachable without sticky by construction; a sticky here is below half an ulp.
        (w.m << (-shift), false, w.sticky)
    } else if shift >= 129 {
        (0u128, false, true)
    } else if shift == 128 {
        (0u128, w.m >> 127 != 0, (w.m << 1) != 0 || w.sticky)
    } else {
        let q = w.m >> shift;
        let rb = (w.m >> (shift - 1)) & 1 != 0;
        let rest = (w.m & ((1u128 << (shift - 1)) - 1)) != 0 || w.sticky;
        (q, rb, rest)
    };
    let inexact = rb || rest;
    let up = match r {
        Rnd::Rn => rb && (rest || q & 1 == 1),
        Rnd::Rz => false,
        Rnd::Rm => neg && inexact,
        Rnd::Rp => !neg && inexact,
    };
    let q = (q + up as u128) as u64;
    let bits = if big_e >= emin { (((big_e + f.bias - 1) as u64) << (f.p - 1)) + q } else { q };
    if bits >= f.inf() {
        return overflow_bits(f, neg, r, satfinite);
    }
    s | bits
}

#[inline]
fn exact_wide(d: Dec) -> Wide {
    Wide { neg: d.neg, m: d.m, e: d.e, sticky: false }
}

#[inline]
fn is_neg(x: f64) -> bool {
    x.is_sign_negative()
}

/// Sum of two finite values rounded once into `f`, with the IEEE zero-sign rule.
fn add_fin(f: Fmt, x: Dec, y: Dec, r: Rnd) -> u64 {
    let w = exact_sum(x, y);
    if w.m == 0 && !w.sticky {
        // Exact zero: same-signed zeros keep their sign; otherwise +0 (−0 under .rm).
        let neg = if x.m == 0 && y.m == 0 && x.neg == y.neg { x.neg } else { r == Rnd::Rm };
        return if neg { f.sign() } else { 0 };
    }
    round_bits(f, w, r, false)
}

#[inline]
fn prod(a: Dec, b: Dec) -> Dec {
    Dec { neg: a.neg != b.neg, m: a.m * b.m, e: a.e + b.e }
}

/// Fast `.rn` rounding of a finite f64 into a 16-bit format when the result is a normal number
/// of that format (else `None`: zero, subnormal, overflow go through `round_bits`).
#[inline]
fn fast_rn16(f: Fmt, s: f64) -> Option<u64> {
    let b = s.to_bits();
    let drop = 53 - f.p;
    let lsb = (b >> drop) & 1;
    let r = ((b & !(1u64 << 63)) + ((1u64 << (drop - 1)) - 1) + lsb) >> drop;
    let e = (r >> (f.p - 1)) as i32 - 1023 + f.bias;
    if e < 1 || e >= (1 << f.ebits) - 1 {
        return None;
    }
    let mant = r & ((1u64 << (f.p - 1)) - 1);
    Some(((b >> 63) << (f.p - 1 + f.ebits)) | ((e as u64) << (f.p - 1)) | mant)
}

/// For 16-bit formats under `.rn`: if `s = x + y` is exact in f64 (TwoSum error 0), round it
/// directly (one rounding from the exact value).
#[inline]
fn fast16_sum(f: Fmt, x: f64, y: f64, r: Rnd) -> Option<u64> {
    if f.p > 11 || r != Rnd::Rn {
        return None;
    }
    let s = x + y;
    let bb = s - x;
    if (x - (s - bb)) + (y - bb) != 0.0 {
        return None;
    }
    fast_rn16(f, s)
}

#[inline]
fn g_add(f: Fmt, a: f64, b: f64, r: Rnd) -> u64 {
    if a.is_nan() || b.is_nan() {
        return f.nan;
    }
    if a.is_infinite() || b.is_infinite() {
        if a.is_infinite() && b.is_infinite() && is_neg(a) != is_neg(b) {
            return f.nan;
        }
        let n = if a.is_infinite() { is_neg(a) } else { is_neg(b) };
        return f.inf() | if n { f.sign() } else { 0 };
    }
    if let Some(v) = fast16_sum(f, a, b, r) {
        return v;
    }
    add_fin(f, dec(a), dec(b), r)
}

#[inline]
fn g_mul(f: Fmt, a: f64, b: f64, r: Rnd) -> u64 {
    if a.is_nan() || b.is_nan() {
        return f.nan;
    }
    let neg = is_neg(a) != is_neg(b);
    if a.is_infinite() || b.is_infinite() {
        if a == 0.0 || b == 0.0 {
            return f.nan;
        }
        return f.inf() | if neg { f.sign() } else { 0 };
    }
    if f.p <= 11 && r == Rnd::Rn {
        // 16-bit products (≤ 22 bits, ≥ 2^-266) are exact in f64
        if let Some(v) = fast_rn16(f, a * b) {
            return v;
        }
    }
    round_bits(f, exact_wide(prod(dec(a), dec(b))), r, false)
}

#[inline]
fn g_fma(f: Fmt, a: f64, b: f64, c: f64, r: Rnd) -> u64 {
    if a.is_nan() || b.is_nan() || c.is_nan() {
        return f.nan;
    }
    let pneg = is_neg(a) != is_neg(b);
    if a.is_infinite() || b.is_infinite() {
        if a == 0.0 || b == 0.0 {
            return f.nan;
        }
        if c.is_infinite() && is_neg(c) != pneg {
            return f.nan;
        }
        return f.inf() | if pneg { f.sign() } else { 0 };
    }
    if c.is_infinite() {
        return f.inf() | if is_neg(c) { f.sign() } else { 0 };
    }
    if f.p <= 11 {
        // a*b is exact in f64 for 16-bit inputs
        if let Some(v) = fast16_sum(f, a * b, c, r) {
            return v;
        }
    }
    add_fin(f, prod(dec(a), dec(b)), dec(c), r)
}

/// Step a finite value one ulp toward +inf (`up`) or −inf in format `f`.
#[inline]
fn step(f: Fmt, bits: u64, up: bool) -> u64 {
    let neg = bits & f.sign() != 0;
    let mag = bits & !f.sign();
    if neg == up {
        // toward zero in magnitude
        if mag == 0 {
            1 | if up { 0 } else { f.sign() }
        } else {
            bits - 1
        }
    } else {
        bits + 1
    }
}

/// Directed rounding from an RN result `q` (finite) whose position relative to the exact value
/// is `dir = sign(q - exact)`; `exact_neg` is the sign of the exact value.
fn fix_dir(f: Fmt, q: u64, dir: i32, exact_neg: bool, r: Rnd) -> u64 {
    let r = match r {
        Rnd::Rz => {
            if exact_neg {
                Rnd::Rp
            } else {
                Rnd::Rm
            }
        }
        o => o,
    };
    match r {
        Rnd::Rm if dir > 0 => step(f, q, false),
        Rnd::Rp if dir < 0 => step(f, q, true),
        _ => q,
    }
}

#[inline]
fn sign_of(w: Wide) -> i32 {
    if w.m == 0 && !w.sticky {
        0
    } else if w.neg {
        -1
    } else {
        1
    }
}

fn g_div(f: Fmt, a: f64, b: f64, r: Rnd) -> u64 {
    if a.is_nan() || b.is_nan() {
        return f.nan;
    }
    let neg = is_neg(a) != is_neg(b);
    let sgn = if neg { f.sign() } else { 0 };
    if a.is_infinite() {
        return if b.is_infinite() { f.nan } else { sgn | f.inf() };
    }
    if b.is_infinite() {
        return sgn;
    }
    if b == 0.0 {
        return if a == 0.0 { f.nan } else { sgn | f.inf() };
    }
    if a == 0.0 {
        return sgn;
    }
    let (qb, qf) = if f.p == 24 {
        let q = a as f32 / b as f32;
        (q.to_bits() as u64, q as f64)
    } else {
        let q = a / b;
        (q.to_bits(), q)
    };
    if qf.is_infinite() {
        return overflow_bits(f, neg, r, false);
    }
    if r == Rnd::Rn {
        return qb;
    }
    // sign(q - a/b) = sign(q*b - a) * sign(b)
    let mut na = dec(a);
    na.neg = !na.neg;
    let s = sign_of(exact_sum(prod(dec(qf), dec(b)), na));
    let dir = if is_neg(b) { -s } else { s };
    fix_dir(f, qb, dir, neg, r)
}

fn g_sqrt(f: Fmt, a: f64, r: Rnd) -> u64 {
    if a.is_nan() || (a < 0.0) {
        return f.nan;
    }
    if a == 0.0 || a.is_infinite() {
        return if f.p == 24 { (a as f32).to_bits() as u64 } else { a.to_bits() };
    }
    let (qb, qf) = if f.p == 24 {
        let q = (a as f32).sqrt();
        (q.to_bits() as u64, q as f64)
    } else {
        let q = a.sqrt();
        (q.to_bits(), q)
    };
    if r == Rnd::Rn {
        return qb;
    }
    let mut na = dec(a);
    na.neg = true;
    let dq = dec(qf);
    let dir = sign_of(exact_sum(prod(dq, dq), na));
    fix_dir(f, qb, dir, false, r)
}

// ---------------------------------------------------------------------------------------------
// Conversions ("cvt")
// ---------------------------------------------------------------------------------------------

/// `cvt.f64.f16` (exact; a NaN keeps its payload in the top mantissa bits).
#[inline]
pub fn f16_to_f64(h: u16) -> f64 {
    let neg = h & 0x8000 != 0;
    let ex = ((h >> 10) & 0x1F) as i32;
    let fr = (h & 0x3FF) as f64;
    let v = if ex == 0 {
        fr * (2f64).powi(-24)
    } else if ex == 31 {
        if fr == 0.0 {
            f64::INFINITY
        } else {
            return f64::from_bits(((neg as u64) << 63) | 0x7FF0_0000_0000_0000 | (((h & 0x3FF) as u64) << 42));
        }
    } else {
        (1024.0 + fr) * (2f64).powi(ex - 25)
    };
    if neg {
        -v
    } else {
        v
    }
}

/// Narrowing conversion of an f64 value to f16/bf16 per "cvt" (`.frnd2{.relu}{.satfinite}`).
fn narrow(f: Fmt, x: f64, r: Rnd, relu: bool, satfinite: bool) -> u64 {
    if x.is_nan() {
        return f.nan;
    }
    if relu && is_neg(x) {
        return 0;
    }
    if x.is_infinite() {
        let s = if is_neg(x) { f.sign() } else { 0 };
        return s | if satfinite { f.max() } else { f.inf() };
    }
    round_bits(f, exact_wide(dec(x)), r, satfinite)
}

/// `cvt.frnd2{.relu}{.satfinite}.f16.f32`: round once; NaN → canonical `0x7FFF`; `.relu` maps
/// negative inputs (−0 included) to +0; `.satfinite` maps |x| > MAX_NORM (±inf included) to
/// ±MAX_NORM (`0x7BFF`). The ISA's `.frnd2` is `.rn/.rz`; `.rm/.rp` are accepted as well.
#[inline]
pub fn f32_to_f16(x: f32, r: Rnd, relu: bool, satfinite: bool) -> u16 {
    narrow(F16, x as f64, r, relu, satfinite) as u16
}

/// `cvt.frnd2{.relu}{.satfinite}.bf16.f32`; same rules as [`f32_to_f16`] (NaN → `0x7FFF`,
/// MAX_NORM = `0x7F7F`).
#[inline]
pub fn f32_to_bf16(x: f32, r: Rnd, relu: bool, satfinite: bool) -> u16 {
    narrow(BF16, x as f64, r, relu, satfinite) as u16
}

/// `cvt.frnd2{.relu}{.satfinite}.f16.f64`: one rounding from the exact f64 (no f32 step, which
/// would round twice); rules as [`f32_to_f16`].
#[inline]
pub fn f64_to_f16(x: f64, r: Rnd, relu: bool, satfinite: bool) -> u16 {
    narrow(F16, x, r, relu, satfinite) as u16
}

/// `cvt.frnd2{.relu}{.satfinite}.bf16.f64`: one rounding from the exact f64.
#[inline]
pub fn f64_to_bf16(x: f64, r: Rnd, relu: bool, satfinite: bool) -> u16 {
    narrow(BF16, x, r, relu, satfinite) as u16
}

/// `cvt.f32.f16` (exact; a NaN keeps its payload in the top mantissa bits, quiet bit included).
#[inline]
pub fn f16_to_f32(h: u16) -> f32 {
    if h & 0x7C00 == 0x7C00 && h & 0x3FF != 0 {
        return f32::from_bits(((h as u32 & 0x8000) << 16) | 0x7F80_0000 | ((h as u32 & 0x3FF) << 13));
    }
    f16_to_f64(h) as f32
}

/// `cvt.f32.bf16` (exact: a 16-bit shift, NaN payload kept).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `cvt.frnd.f32.f64`: NaN → canonical f32 NaN.
#[inline]
pub fn f64_to_f32(x: f64, r: Rnd) -> f32 {
    if x.is_nan() {
        return f32::from_bits(NAN_F32);
    }
    if x.is_infinite() {
        return x as f32;
    }
    f32::from_bits(round_bits(F32, exact_wide(dec(x)), r, false) as u32)
}

/// `cvt.f64.f32` (exact).
#[inline]
pub fn f32_to_f64(x: f32) -> f64 {
    x as f64
}

#[inline]
fn round_int_f64(x: f64, r: IRnd) -> f64 {
    match r {
        IRnd::Rni => x.round_ties_even(),
        IRnd::Rzi => x.trunc(),
        IRnd::Rmi => x.floor(),
        IRnd::Rpi => x.ceil(),
    }
}

/// Float → integer (`cvt.irnd.{s,u}N.{f16,bf16,f32,f64}`), see [`f64_to_int`].
fn to_int(x: f64, src_f64: bool, r: IRnd, signed: bool, bits: u32) -> u64 {
    debug_assert!((1..=64).contains(&bits));
    if x.is_nan() {
        // "cvt", Integer Notes: NaN gives zero if the source is not .f64 and the destination
        // is not .s64/.u64; otherwise 1 << (BitWidth(dst) - 1) (MININT for signed types).
        if !src_f64 && bits != 64 {
            return 0;
        }
        let v = 1u64 << (bits - 1);
        return if signed && bits < 64 { v.wrapping_neg() } else { v };
    }
    let v = round_int_f64(x, r);
    if signed {
        let lo = -(2f64.powi(bits as i32 - 1));
        let hi = 2f64.powi(bits as i32 - 1);
        let i = if v < lo {
            lo as i64
        } else if v >= hi {
            (hi as i128 - 1) as i64
        } else {
            v as i64
        };
        i as u64
    } else {
        let hi = 2f64.powi(bits as i32);
        if v <= 0.0 {
            0
        } else if v >= hi {
            (hi as u128 - 1) as u64
        } else {
            v as u64
        }
    }
}

/// `cvt.irnd.{s,u}{8,16,32,64}.f64`: round to an integer with `r`, then clamp to the destination
/// range ("cvt": "For float-to-integer conversions, the result is clamped to the destination
/// range by default"). NaN (Integer Notes): an f64 source gives `1 << (bits-1)` (MININT for
/// signed destinations, `(MAXINT >> 1) + 1` for unsigned). The result is the destination's
/// bits, sign-extended to 64 for signed types (unsigned results are zero-extended).
#[inline]
pub fn f64_to_int(x: f64, r: IRnd, signed: bool, bits: u32) -> u64 {
    to_int(x, true, r, signed, bits)
}

/// `cvt.irnd.{s,u}N.f32`: saturating; NaN → 0, except for 64-bit destinations where NaN →
/// `1 << 63` (i64::MIN for `.s64`), per the "cvt" Integer Notes.
#[inline]
pub fn f32_to_int(x: f32, r: IRnd, signed: bool, bits: u32) -> u64 {
    to_int(x as f64, false, r, signed, bits)
}

/// `cvt.irnd.{s,u}N.f16`: same rules as [`f32_to_int`].
#[inline]
pub fn f16_to_int(h: u16, r: IRnd, signed: bool, bits: u32) -> u64 {
    to_int(f16_to_f64(h), false, r, signed, bits)
}

/// `cvt.irnd.{s,u}N.bf16`: same rules as [`f32_to_int`].
#[inline]
pub fn bf16_to_int(h: u16, r: IRnd, signed: bool, bits: u32) -> u64 {
    to_int(bf16_to_f32(h) as f64, false, r, signed, bits)
}

/// `cvt.frnd.bf16.{s,u}N`.
#[inline]
pub fn int_to_bf16(v: i128, r: Rnd) -> u16 {
    int_round(BF16, v, r) as u16
}

/// `cvt.frnd.bf16.f16` / `cvt.frnd.f16.bf16`.
#[inline]
pub fn f16_to_bf16(h: u16, r: Rnd) -> u16 {
    narrow(BF16, f16_to_f64(h), r, false, false) as u16
}
/// `cvt.frnd.f16.bf16`.
#[inline]
pub fn bf16_to_f16(h: u16, r: Rnd) -> u16 {
    narrow(F16, bf16_to_f32(h) as f64, r, false, false) as u16
}

#[inline]
fn int_round(f: Fmt, v: i128, r: Rnd) -> u64 {
    round_bits(f, Wide { neg: v < 0, m: v.unsigned_abs(), e: 0, sticky: false }, r, false)
}

/// `cvt.frnd.f32.{s,u}N` (an unsigned source is passed as a non-negative `i128`).
#[inline]
pub fn int_to_f32(v: i128, r: Rnd) -> f32 {
    f32::from_bits(int_round(F32, v, r) as u32)
}

/// `cvt.frnd.f64.{s,u}N`.
#[inline]
pub fn int_to_f64(v: i128, r: Rnd) -> f64 {
    f64::from_bits(int_round(F64, v, r))
}

/// `cvt.frnd.f16.{s,u}N` (overflow per mode: `.rn` → inf, `.rz` → MAX_NORM, ...).
#[inline]
pub fn int_to_f16(v: i128, r: Rnd) -> u16 {
    int_round(F16, v, r) as u16
}

/// `cvt.irnd{.ftz}.f32.f32`: round to an integral value (`.rni` = ties to even), keeping the
/// sign of zero; NaN → canonical NaN.
#[inline]
pub fn f32_round_int(x: f32, r: IRnd, ftz: bool) -> f32 {
    if x.is_nan() {
        return f32::from_bits(NAN_F32);
    }
    let x = if ftz { ftz32(x) } else { x };
    match r {
        IRnd::Rni => x.round_ties_even(),
        IRnd::Rzi => x.trunc(),
        IRnd::Rmi => x.floor(),
        IRnd::Rpi => x.ceil(),
    }
}

/// `.sat` on a floating-point destination ("cvt": "limits the result to the range [0.0, 1.0].
/// NaN results are flushed to positive zero"). −0.0 also becomes +0.0 (our choice: the clamp is
/// `max(x, +0.0)` with −0 < +0).
#[inline]
pub fn f32_sat(x: f32) -> f32 {
    if x.is_nan() || x <= 0.0 {
        0.0
    } else if x > 1.0 {
        1.0
    } else {
        x
    }
}

/// `.ftz`: a subnormal becomes a zero of the same sign.
#[inline]
pub fn ftz32(x: f32) -> f32 {
    if x.is_subnormal() {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// `.ftz` for f64 (only `rcp.approx.ftz.f64` uses it).
#[inline]
pub fn ftz64(x: f64) -> f64 {
    if x.is_subnormal() {
        f64::from_bits(x.to_bits() & (1 << 63))
    } else {
        x
    }
}

// ---------------------------------------------------------------------------------------------
// f32 / f64 arithmetic
// ---------------------------------------------------------------------------------------------

// `.rn` fast paths use the host's IEEE operations (correctly rounded, subnormals kept: the
// x86-64/aarch64 defaults), with the NaN made canonical; the directed modes use the engine.
// `tests::fp_engine_rn_matches_host` checks that the engine agrees with the fast paths.

#[inline]
fn canon32(v: f32) -> f32 {
    if v.is_nan() {
        f32::from_bits(NAN_F32)
    } else {
        v
    }
}
#[inline]
fn canon64(v: f64) -> f64 {
    if v.is_nan() {
        f64::from_bits(NAN_F64)
    } else {
        v
    }
}

macro_rules! f32op2 {
    ($(#[$m:meta])* $name:ident, $g:ident, $op:tt) => {
        $(#[$m])*
        #[inline]
        pub fn $name(a: f32, b: f32, r: Rnd) -> f32 {
            if r == Rnd::Rn {
                return canon32(a $op b);
            }
            f32::from_bits($g(F32, a as f64, b as f64, r) as u32)
        }
    };
}
macro_rules! f64op2 {
    ($(#[$m:meta])* $name:ident, $g:ident, $op:tt) => {
        $(#[$m])*
        #[inline]
        pub fn $name(a: f64, b: f64, r: Rnd) -> f64 {
            if r == Rnd::Rn {
                return canon64(a $op b);
            }
            f64::from_bits($g(F64, a, b, r))
        }
    };
}

f32op2!(
    /// `add.rnd.f32` (exact sum rounded once; `(+0)+(-0)` is +0, −0 under `.rm`).
    add_f32, g_add, +
);
f32op2!(
    /// `mul.rnd.f32`.
    mul_f32, g_mul, *
);
f32op2!(
    /// `div.rnd.f32` (IEEE, correctly rounded).
    div_f32, g_div, /
);
f64op2!(
    /// `add.rnd.f64`.
    add_f64, g_add, +
);
f64op2!(
    /// `mul.rnd.f64`.
    mul_f64, g_mul, *
);
f64op2!(
    /// `div.rnd.f64`.
    div_f64, g_div, /
);

/// `sub.rnd.f32` = `a + (-b)` (exactly; the sign flip is exact).
#[inline]
pub fn sub_f32(a: f32, b: f32, r: Rnd) -> f32 {
    add_f32(a, -b, r)
}
/// `sub.rnd.f64`.
#[inline]
pub fn sub_f64(a: f64, b: f64, r: Rnd) -> f64 {
    add_f64(a, -b, r)
}
/// `fma.rnd.f32` / `mad.rnd.f32`: `a*b + c` rounded once.
#[inline]
pub fn fma_f32(a: f32, b: f32, c: f32, r: Rnd) -> f32 {
    if r == Rnd::Rn {
        return canon32(a.mul_add(b, c));
    }
    f32::from_bits(g_fma(F32, a as f64, b as f64, c as f64, r) as u32)
}
/// `fma.rnd.f64`.
#[inline]
pub fn fma_f64(a: f64, b: f64, c: f64, r: Rnd) -> f64 {
    if r == Rnd::Rn {
        return canon64(a.mul_add(b, c));
    }
    f64::from_bits(g_fma(F64, a, b, c, r))
}
/// `sqrt.rnd.f32`.
#[inline]
pub fn sqrt_f32(a: f32, r: Rnd) -> f32 {
    f32::from_bits(g_sqrt(F32, a as f64, r) as u32)
}
/// `sqrt.rnd.f64`.
#[inline]
pub fn sqrt_f64(a: f64, r: Rnd) -> f64 {
    f64::from_bits(g_sqrt(F64, a, r))
}
/// `rcp.rnd.f32` = `1/a` correctly rounded.
#[inline]
pub fn rcp_f32(a: f32, r: Rnd) -> f32 {
    div_f32(1.0, a, r)
}
/// `rcp.rnd.f64`.
#[inline]
pub fn rcp_f64(a: f64, r: Rnd) -> f64 {
    div_f64(1.0, a, r)
}

// ---------------------------------------------------------------------------------------------
// min / max ("Floating Point Instructions: min", "... max"; "Half Precision ...: min/max")
// ---------------------------------------------------------------------------------------------
//
// Rule implemented: if both inputs are NaN the result is the canonical NaN; if one is NaN the
// other input is returned; with `.NaN` (`nan_prop`) any NaN input gives the canonical NaN;
// otherwise the smaller/larger value, with −0.0 treated as less than +0.0.

#[inline]
fn key_lt(a_neg: bool, a: f64, b_neg: bool, b: f64) -> bool {
    // strict "a < b" with −0 < +0
    a < b || (a == b && a == 0.0 && a_neg && !b_neg)
}

#[inline]
fn g_minmax(f: Fmt, ab: u64, bb: u64, nan_prop: bool, want_max: bool) -> u64 {
    let a = f.to_f64(ab);
    let b = f.to_f64(bb);
    match (a.is_nan(), b.is_nan()) {
        (true, true) => return f.nan,
        (true, false) | (false, true) if nan_prop => return f.nan,
        (true, false) => return bb,
        (false, true) => return ab,
        _ => {}
    }
    let a_lt_b = key_lt(is_neg(a), a, is_neg(b), b);
    if a_lt_b == want_max {
        bb
    } else {
        ab
    }
}

/// `min{.NaN}.f32` (`.ftz` is the caller's, via [`ftz32`] on the inputs).
#[inline]
pub fn min_f32(a: f32, b: f32, nan_prop: bool) -> f32 {
    f32::from_bits(g_minmax(F32, a.to_bits() as u64, b.to_bits() as u64, nan_prop, false) as u32)
}
/// `max{.NaN}.f32`.
#[inline]
pub fn max_f32(a: f32, b: f32, nan_prop: bool) -> f32 {
    f32::from_bits(g_minmax(F32, a.to_bits() as u64, b.to_bits() as u64, nan_prop, true) as u32)
}
/// `min/max{.NaN}.xorsign.abs.{f32,f16,bf16}` on raw bits of format `f`: the min/max of the
/// magnitudes, with the sign bit set to `sign(a) ^ sign(b)` unless the result is NaN.
#[inline]
fn g_xorsign_abs(f: Fmt, a: u64, b: u64, nan_prop: bool, want_max: bool) -> u64 {
    let xs = (a ^ b) & f.sign();
    let r = g_minmax(f, a & !f.sign(), b & !f.sign(), nan_prop, want_max);
    if f.to_f64(r).is_nan() {
        r
    } else {
        r | xs
    }
}
/// `min{.NaN}.xorsign.abs.f32`.
#[inline]
pub fn min_xorsign_abs_f32(a: f32, b: f32, nan_prop: bool) -> f32 {
    f32::from_bits(g_xorsign_abs(F32, a.to_bits() as u64, b.to_bits() as u64, nan_prop, false) as u32)
}
/// `max{.NaN}.xorsign.abs.f32`.
#[inline]
pub fn max_xorsign_abs_f32(a: f32, b: f32, nan_prop: bool) -> f32 {
    f32::from_bits(g_xorsign_abs(F32, a.to_bits() as u64, b.to_bits() as u64, nan_prop, true) as u32)
}
/// `min{.NaN}.xorsign.abs.{f16,bf16}` (`bf16` selects the format).
#[inline]
pub fn h_min_xorsign_abs(a: u16, b: u16, bf16: bool, nan_prop: bool) -> u16 {
    g_xorsign_abs(if bf16 { BF16 } else { F16 }, a as u64, b as u64, nan_prop, false) as u16
}
/// `max{.NaN}.xorsign.abs.{f16,bf16}`.
#[inline]
pub fn h_max_xorsign_abs(a: u16, b: u16, bf16: bool, nan_prop: bool) -> u16 {
    g_xorsign_abs(if bf16 { BF16 } else { F16 }, a as u64, b as u64, nan_prop, true) as u16
}
/// `min.f64`.
#[inline]
pub fn min_f64(a: f64, b: f64) -> f64 {
    f64::from_bits(g_minmax(F64, a.to_bits(), b.to_bits(), false, false))
}
/// `max.f64`.
#[inline]
pub fn max_f64(a: f64, b: f64) -> f64 {
    f64::from_bits(g_minmax(F64, a.to_bits(), b.to_bits(), false, true))
}

// ---------------------------------------------------------------------------------------------
// Comparisons
// ---------------------------------------------------------------------------------------------

/// `setp/set.CmpOp` on two values already widened to f64 (9.3.1.2 "Floating Point Comparisons").
#[inline]
pub fn cmp_f64(a: f64, b: f64, c: FCmp) -> bool {
    let un = a.is_nan() || b.is_nan();
    match c {
        FCmp::Eq => !un && a == b,
        FCmp::Ne => !un && a != b,
        FCmp::Lt => !un && a < b,
        FCmp::Le => !un && a <= b,
        FCmp::Gt => !un && a > b,
        FCmp::Ge => !un && a >= b,
        FCmp::Equ => un || a == b,
        FCmp::Neu => un || a != b,
        FCmp::Ltu => un || a < b,
        FCmp::Leu => un || a <= b,
        FCmp::Gtu => un || a > b,
        FCmp::Geu => un || a >= b,
        FCmp::Num => !un,
        FCmp::Nan => un,
    }
}
/// `setp.CmpOp.f32`.
#[inline]
pub fn cmp_f32(a: f32, b: f32, c: FCmp) -> bool {
    cmp_f64(a as f64, b as f64, c)
}
/// `setp.CmpOp.f16`.
#[inline]
pub fn cmp_f16(a: u16, b: u16, c: FCmp) -> bool {
    cmp_f64(f16_to_f64(a), f16_to_f64(b), c)
}
/// `setp.CmpOp.bf16`.
#[inline]
pub fn cmp_bf16(a: u16, b: u16, c: FCmp) -> bool {
    cmp_f64(bf16_to_f32(a) as f64, bf16_to_f32(b) as f64, c)
}

// ---------------------------------------------------------------------------------------------
// Half precision ("Half Precision Floating Point Instructions": add, sub, mul, fma, min, max,
// neg, abs). Each operation rounds once from the exact result (no f32 intermediate).
// ---------------------------------------------------------------------------------------------

#[inline]
fn f16_in(h: u16, ftz: bool) -> f64 {
    if ftz && h & 0x7C00 == 0 {
        if h & 0x8000 != 0 {
            -0.0
        } else {
            0.0
        }
    } else {
        f16_to_f64(h)
    }
}

#[inline]
fn f16_out(h: u16, ftz: bool, sat: bool) -> u16 {
    let h = if ftz && h & 0x7C00 == 0 { h & 0x8000 } else { h };
    if sat {
        // [0, 1]; NaN → +0
        if (h & 0x7FFF) > 0x7C00 || h & 0x8000 != 0 {
            0
        } else if h > 0x3C00 {
            0x3C00
        } else {
            h
        }
    } else {
        h
    }
}

#[inline]
fn relu16(h: u16) -> u16 {
    // ".relu clamps the result to 0 if negative. NaN results are converted to canonical NaN."
    if h & 0x7FFF > 0x7C00 {
        NAN_F16
    } else if h & 0x8000 != 0 {
        0
    } else {
        h
    }
}

/// `add{.rnd}{.ftz}{.sat}.f16`.
#[inline]
pub fn f16_add(a: u16, b: u16, r: Rnd, ftz: bool, sat: bool) -> u16 {
    f16_out(g_add(F16, f16_in(a, ftz), f16_in(b, ftz), r) as u16, ftz, sat)
}
/// `sub{.rnd}{.ftz}{.sat}.f16`.
#[inline]
pub fn f16_sub(a: u16, b: u16, r: Rnd, ftz: bool, sat: bool) -> u16 {
    f16_out(g_add(F16, f16_in(a, ftz), -f16_in(b, ftz), r) as u16, ftz, sat)
}
/// `mul{.rnd}{.ftz}{.sat}.f16`.
#[inline]
pub fn f16_mul(a: u16, b: u16, r: Rnd, ftz: bool, sat: bool) -> u16 {
    f16_out(g_mul(F16, f16_in(a, ftz), f16_in(b, ftz), r) as u16, ftz, sat)
}
/// `fma{.rnd}{.ftz}{.sat|.relu}.f16`.
#[inline]
pub fn f16_fma(a: u16, b: u16, c: u16, r: Rnd, ftz: bool, sat: bool, relu: bool) -> u16 {
    let v = g_fma(F16, f16_in(a, ftz), f16_in(b, ftz), f16_in(c, ftz), r) as u16;
    let v = f16_out(v, ftz, sat);
    if relu {
        relu16(v)
    } else {
        v
    }
}
/// `add{.rnd}.bf16`.
#[inline]
pub fn bf16_add(a: u16, b: u16, r: Rnd) -> u16 {
    g_add(BF16, bf16_to_f32(a) as f64, bf16_to_f32(b) as f64, r) as u16
}
/// `sub{.rnd}.bf16`.
#[inline]
pub fn bf16_sub(a: u16, b: u16, r: Rnd) -> u16 {
    g_add(BF16, bf16_to_f32(a) as f64, -(bf16_to_f32(b) as f64), r) as u16
}
/// `mul{.rnd}.bf16`.
#[inline]
pub fn bf16_mul(a: u16, b: u16, r: Rnd) -> u16 {
    g_mul(BF16, bf16_to_f32(a) as f64, bf16_to_f32(b) as f64, r) as u16
}
/// `fma{.rnd}{.relu}.bf16`.
#[inline]
pub fn bf16_fma(a: u16, b: u16, c: u16, r: Rnd, relu: bool) -> u16 {
    let v = g_fma(BF16, bf16_to_f32(a) as f64, bf16_to_f32(b) as f64, bf16_to_f32(c) as f64, r) as u16;
    if relu {
        relu16(v)
    } else {
        v
    }
}
/// `min{.ftz}{.NaN}.f16`.
#[inline]
pub fn f16_min(a: u16, b: u16, ftz: bool, nan_prop: bool) -> u16 {
    let (a, b) = if ftz { (f16_out(a, true, false), f16_out(b, true, false)) } else { (a, b) };
    g_minmax(F16, a as u64, b as u64, nan_prop, false) as u16
}
/// `max{.ftz}{.NaN}.f16`.
#[inline]
pub fn f16_max(a: u16, b: u16, ftz: bool, nan_prop: bool) -> u16 {
    let (a, b) = if ftz { (f16_out(a, true, false), f16_out(b, true, false)) } else { (a, b) };
    g_minmax(F16, a as u64, b as u64, nan_prop, true) as u16
}
/// `min{.NaN}.bf16`.
#[inline]
pub fn bf16_min(a: u16, b: u16, nan_prop: bool) -> u16 {
    g_minmax(BF16, a as u64, b as u64, nan_prop, false) as u16
}
/// `max{.NaN}.bf16`.
#[inline]
pub fn bf16_max(a: u16, b: u16, nan_prop: bool) -> u16 {
    g_minmax(BF16, a as u64, b as u64, nan_prop, true) as u16
}
/// `neg{.ftz}.f32`: flips the sign bit (NaN included: the sign of a NaN is not significant).
#[inline]
pub fn neg_f32(a: f32, ftz: bool) -> f32 {
    let a = if ftz { ftz32(a) } else { a };
    f32::from_bits(a.to_bits() ^ 0x8000_0000)
}
/// `abs{.ftz}.f32`: clears the sign bit.
#[inline]
pub fn abs_f32(a: f32, ftz: bool) -> f32 {
    let a = if ftz { ftz32(a) } else { a };
    f32::from_bits(a.to_bits() & 0x7FFF_FFFF)
}
/// `neg.f16` / `neg.bf16`: flips the sign bit (NaN included).
#[inline]
pub fn h_neg(a: u16) -> u16 {
    a ^ 0x8000
}
/// `abs.f16` / `abs.bf16`: clears the sign bit.
#[inline]
pub fn h_abs(a: u16) -> u16 {
    a & 0x7FFF
}

#[inline]
fn lanes2(a: u32, b: u32, op: impl Fn(u16, u16) -> u16) -> u32 {
    let lo = op(a as u16, b as u16) as u32;
    let hi = op((a >> 16) as u16, (b >> 16) as u16) as u32;
    lo | (hi << 16)
}
#[inline]
fn lanes3(a: u32, b: u32, c: u32, op: impl Fn(u16, u16, u16) -> u16) -> u32 {
    let lo = op(a as u16, b as u16, c as u16) as u32;
    let hi = op((a >> 16) as u16, (b >> 16) as u16, (c >> 16) as u16) as u32;
    lo | (hi << 16)
}

/// `add{.rnd}{.ftz}{.sat}.f16x2` (lane-wise; element 0 in the low 16 bits).
#[inline]
pub fn f16x2_add(a: u32, b: u32, r: Rnd, ftz: bool, sat: bool) -> u32 {
    lanes2(a, b, |x, y| f16_add(x, y, r, ftz, sat))
}
/// `sub{.rnd}{.ftz}{.sat}.f16x2`.
#[inline]
pub fn f16x2_sub(a: u32, b: u32, r: Rnd, ftz: bool, sat: bool) -> u32 {
    lanes2(a, b, |x, y| f16_sub(x, y, r, ftz, sat))
}
/// `mul{.rnd}{.ftz}{.sat}.f16x2`.
#[inline]
pub fn f16x2_mul(a: u32, b: u32, r: Rnd, ftz: bool, sat: bool) -> u32 {
    lanes2(a, b, |x, y| f16_mul(x, y, r, ftz, sat))
}
/// `fma{.rnd}{.ftz}{.sat|.relu}.f16x2`.
#[inline]
pub fn f16x2_fma(a: u32, b: u32, c: u32, r: Rnd, ftz: bool, sat: bool, relu: bool) -> u32 {
    lanes3(a, b, c, |x, y, z| f16_fma(x, y, z, r, ftz, sat, relu))
}
/// `min{.ftz}{.NaN}.f16x2`.
#[inline]
pub fn f16x2_min(a: u32, b: u32, ftz: bool, nan_prop: bool) -> u32 {
    lanes2(a, b, |x, y| f16_min(x, y, ftz, nan_prop))
}
/// `max{.ftz}{.NaN}.f16x2`.
#[inline]
pub fn f16x2_max(a: u32, b: u32, ftz: bool, nan_prop: bool) -> u32 {
    lanes2(a, b, |x, y| f16_max(x, y, ftz, nan_prop))
}
/// `add{.rnd}.bf16x2`.
#[inline]
pub fn bf16x2_add(a: u32, b: u32, r: Rnd) -> u32 {
    lanes2(a, b, |x, y| bf16_add(x, y, r))
}
/// `sub{.rnd}.bf16x2`.
#[inline]
pub fn bf16x2_sub(a: u32, b: u32, r: Rnd) -> u32 {
    lanes2(a, b, |x, y| bf16_sub(x, y, r))
}
/// `mul{.rnd}.bf16x2`.
#[inline]
pub fn bf16x2_mul(a: u32, b: u32, r: Rnd) -> u32 {
    lanes2(a, b, |x, y| bf16_mul(x, y, r))
}
/// `fma{.rnd}{.relu}.bf16x2`.
#[inline]
pub fn bf16x2_fma(a: u32, b: u32, c: u32, r: Rnd, relu: bool) -> u32 {
    lanes3(a, b, c, |x, y, z| bf16_fma(x, y, z, r, relu))
}
/// `min{.NaN}.bf16x2`.
#[inline]
pub fn bf16x2_min(a: u32, b: u32, nan_prop: bool) -> u32 {
    lanes2(a, b, |x, y| bf16_min(x, y, nan_prop))
}
/// `max{.NaN}.bf16x2`.
#[inline]
pub fn bf16x2_max(a: u32, b: u32, nan_prop: bool) -> u32 {
    lanes2(a, b, |x, y| bf16_max(x, y, nan_prop))
}
/// `neg.f16x2` / `neg.bf16x2`.
#[inline]
pub fn h2_neg(a: u32) -> u32 {
    a ^ 0x8000_8000
}
/// `abs.f16x2` / `abs.bf16x2`.
#[inline]
pub fn h2_abs(a: u32) -> u32 {
    a & 0x7FFF_7FFF
}
/// `cvt.frnd2{.relu}{.satfinite}.f16x2.f32 d, a, b`: **`a` goes to `d[31:16]`, `b` to `d[15:0]`**.
#[inline]
pub fn f32x2_to_f16x2(a: f32, b: f32, r: Rnd, relu: bool, satfinite: bool) -> u32 {
    ((f32_to_f16(a, r, relu, satfinite) as u32) << 16) | f32_to_f16(b, r, relu, satfinite) as u32
}
/// `cvt.frnd2{.relu}{.satfinite}.bf16x2.f32 d, a, b`: `a` → `d[31:16]`, `b` → `d[15:0]`.
#[inline]
pub fn f32x2_to_bf16x2(a: f32, b: f32, r: Rnd, relu: bool, satfinite: bool) -> u32 {
    ((f32_to_bf16(a, r, relu, satfinite) as u32) << 16) | f32_to_bf16(b, r, relu, satfinite) as u32
}

// ---------------------------------------------------------------------------------------------
// Approximate instructions. Each is computed in f64 with the host libm and rounded once to f32
// (.rn), so the error is at most 0.5 ulp of f32 plus the libm's f64 error (< 1 ulp of f64,
// i.e. ~2^-29 ulp of f32). That meets every bound the ISA states ("Floating Point
// Instructions": ex2 — 2 ulp from the correctly rounded result, full range; lg2 — 2^-22
// absolute in (0.5, 2), 2^-22 relative elsewhere; rcp.approx — 1 ulp; sqrt.approx — 2^-23
// relative; rsqrt.approx — 2^-22.9 relative; sin/cos — 2^-20.5 absolute in [-2π, 2π], 2^-14.7
// in [-100π, 100π]; tanh — 2^-11 relative; div.approx / div.full — 2 ulp). Results are
// deterministic for a given host libm. The corner-case tables of those sections hold:
// ex2(-inf)=+0, ex2(±0)=1, lg2(±0)=-inf, lg2(<0)=NaN, rcp(±0)=±inf, rcp(±inf)=±0,
// rsqrt(-0)=-inf, rsqrt(+inf)=+0, sqrt(-0)=-0, sin/cos(±inf)=NaN, tanh(±inf)=±1; a NaN input
// gives the canonical NaN.
// ---------------------------------------------------------------------------------------------

#[inline]
fn approx(x: f32, ftz: bool, f: impl Fn(f64) -> f64) -> f32 {
    let x = if ftz { ftz32(x) } else { x };
    if x.is_nan() {
        return f32::from_bits(NAN_F32);
    }
    let v = f(x as f64);
    let y = f64_to_f32(v, Rnd::Rn);
    if ftz {
        ftz32(y)
    } else {
        y
    }
}

/// `ex2.approx{.ftz}.f32`.
#[inline]
pub fn ex2_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, f64::exp2)
}
/// `lg2.approx{.ftz}.f32`.
#[inline]
pub fn lg2_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, |v| if v == 0.0 { f64::NEG_INFINITY } else { v.log2() })
}
/// `rcp.approx{.ftz}.f32`.
#[inline]
pub fn rcp_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, |v| 1.0 / v)
}
/// `rsqrt.approx{.ftz}.f32`.
#[inline]
pub fn rsqrt_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, |v| 1.0 / v.sqrt())
}
/// `sqrt.approx{.ftz}.f32`.
#[inline]
pub fn sqrt_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, f64::sqrt)
}
/// `sin.approx{.ftz}.f32`.
#[inline]
pub fn sin_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, f64::sin)
}
/// `cos.approx{.ftz}.f32`.
#[inline]
pub fn cos_approx_f32(x: f32, ftz: bool) -> f32 {
    approx(x, ftz, f64::cos)
}
/// `tanh.approx.f32`.
#[inline]
pub fn tanh_approx_f32(x: f32) -> f32 {
    approx(x, false, f64::tanh)
}
/// `div.approx{.ftz}.f32` and `div.full{.ftz}.f32`: the correctly rounded quotient (meets both
/// bounds).
#[inline]
pub fn div_approx_f32(a: f32, b: f32, ftz: bool) -> f32 {
    let (a, b) = if ftz { (ftz32(a), ftz32(b)) } else { (a, b) };
    let q = div_f32(a, b, Rnd::Rn);
    if ftz {
        ftz32(q)
    } else {
        q
    }
}
/// `div.full{.ftz}.f32` (same as [`div_approx_f32`]).
#[inline]
pub fn div_full_f32(a: f32, b: f32, ftz: bool) -> f32 {
    div_approx_f32(a, b, ftz)
}
/// Shared shape of `rcp.approx.ftz.f64` / `rsqrt.approx.ftz.f64` ("Floating Point
/// Instructions: rcp.approx.ftz.f64"): only `a[63:32]` (1.11.20) is used, the result is placed
/// in `d[63:32]` with `d[31:0] = 0`, subnormal inputs/results flush to sign-preserving zero,
/// NaN inputs give `0x7fffffff00000000`.
fn approx_hi_f64(x: f64, f: impl Fn(f64) -> f64) -> f64 {
    if x.is_nan() {
        return f64::from_bits(0x7FFF_FFFF_0000_0000);
    }
    let t = ftz64(f64::from_bits(x.to_bits() & 0xFFFF_FFFF_0000_0000));
    let v = f(t);
    if v.is_nan() || v.is_infinite() {
        return v;
    }
    // round the result to the 1.11.20 format (nearest), then flush a subnormal result
    let b = v.to_bits();
    let r = (b.wrapping_add(0x8000_0000)) & 0xFFFF_FFFF_0000_0000;
    let r = if (r & 0x7FF0_0000_0000_0000) == 0x7FF0_0000_0000_0000 {
        b & 0xFFF0_0000_0000_0000 | 0x000F_FFFF_0000_0000
    } else {
        r
    };
    ftz64(f64::from_bits(r))
}

/// `rcp.approx.ftz.f64` (rcp(±0 or ±subnormal) = ±inf, rcp(±inf) = ±0).
#[inline]
pub fn rcp_approx_ftz_f64(x: f64) -> f64 {
    approx_hi_f64(x, |t| 1.0 / t)
}

/// `rsqrt.approx.ftz.f64` (rsqrt(-0 or -subnormal) = -inf, negative → NaN).
#[inline]
pub fn rsqrt_approx_ftz_f64(x: f64) -> f64 {
    approx_hi_f64(x, |t| if t == 0.0 { 1.0 / t } else { 1.0 / t.sqrt() })
}

/// `rsqrt.approx.f64` (emulated in software on the GPU; here correctly rounded from the f64
/// computation, rsqrt(-0) = -inf).
#[inline]
pub fn rsqrt_approx_f64(x: f64) -> f64 {
    if x == 0.0 {
        1.0 / x
    } else {
        1.0 / x.sqrt()
    }
}

// ---------------------------------------------------------------------------------------------
// mma helper
// ---------------------------------------------------------------------------------------------

/// Fixed-point exact accumulator: 12 × 64-bit two's-complement limbs, LSB = 2^-320. Holds any
/// sum of < 2^60 products of two f32 values (|p| < 2^256, lsb ≥ 2^-298) plus f32 addends.
struct Acc {
    l: [u64; 12],
}

const ACC_LSB: i32 = -320;

impl Acc {
    fn add(&mut self, d: Dec) {
        if d.m == 0 {
            return;
        }
        let tz = d.m.trailing_zeros();
        let d = Dec { neg: d.neg, m: d.m >> tz, e: d.e + tz as i32 };
        let sh = (d.e - ACC_LSB) as u32;
        let (limb, bit) = ((sh / 64) as usize, sh % 64);
        // m < 2^106: spread over up to 3 limbs.
        let lo = (d.m << bit) as u64;
        let mid = ((d.m << bit) >> 64) as u64;
        let hi = if bit == 0 { 0 } else { (d.m >> (128 - bit)) as u64 };
        let parts = [lo, mid, hi];
        let mut carry = 0u64;
        let mut i = limb;
        if !d.neg {
            for (k, p) in parts.iter().enumerate() {
                let (s1, c1) = self.l[limb + k].overflowing_add(*p);
                let (s2, c2) = s1.overflowing_add(carry);
                self.l[limb + k] = s2;
                carry = (c1 || c2) as u64;
                i = limb + k + 1;
            }
            while carry != 0 && i < self.l.len() {
                let (s, c) = self.l[i].overflowing_add(carry);
                self.l[i] = s;
                carry = c as u64;
                i += 1;
            }
        } else {
            for (k, p) in parts.iter().enumerate() {
                let (s1, b1) = self.l[limb + k].overflowing_sub(*p);
                let (s2, b2) = s1.overflowing_sub(carry);
                self.l[limb + k] = s2;
                carry = (b1 || b2) as u64;
                i = limb + k + 1;
            }
            while carry != 0 && i < self.l.len() {
                let (s, b) = self.l[i].overflowing_sub(carry);
                self.l[i] = s;
                carry = b as u64;
                i += 1;
            }
        }
    }

    /// The exact value as a [`Wide`] (top 126 bits, rest as sticky).
    fn wide(&self) -> Wide {
        let neg = self.l[11] >> 63 != 0;
        let mut mag = self.l;
        if neg {
            let mut c = 1u64;
            for x in mag.iter_mut() {
                let (s, o) = (!*x).overflowing_add(c);
                *x = s;
                c = o as u64;
            }
        }
        let Some(t) = (0..12).rev().find(|&i| mag[i] != 0) else {
            return Wide { neg, m: 0, e: 0, sticky: false };
        };
        // bit position of the msb overall
        let msb = t as i32 * 64 + 63 - mag[t].leading_zeros() as i32;
        let lsb = (msb - 125).max(0);
        // bits [lsb, msb] (at most 126) as m; everything below as sticky
        let (li, sh) = ((lsb / 64) as usize, (lsb % 64) as u32);
        let get = |i: usize| if i < 12 { mag[i] } else { 0 };
        let lo = get(li) as u128 | ((get(li + 1) as u128) << 64);
        let m = if sh == 0 { lo } else { (lo >> sh) | ((get(li + 2) as u128) << (128 - sh)) };
        let sticky = mag[..li].iter().any(|&x| x != 0) || (sh != 0 && get(li) & ((1u64 << sh) - 1) != 0);
        Wide { neg, m, e: lsb + ACC_LSB, sticky }
    }
}

/// One mma output element: `c + Σ a[i]*b[i]`, every product exact, the whole sum exact (fixed
/// point accumulator), rounded **once** to f32 with `.rn`.
///
/// Choice documented: the PTX ISA ("Matrix multiply-accumulate operation using mma
/// instruction") fixes neither the accumulation order nor the internal precision, so the
/// simulator uses the exactly rounded sum, which is independent of order (deterministic). Note
/// that f64 accumulation would *not* be exact for bf16 inputs (products span 2^-266..2^256).
/// Special values: any NaN, `inf*0` or `+inf + -inf` gives the canonical NaN; an exact zero sum
/// is −0 only if every term (products and c) is −0.
pub fn dot_f32_acc(a: &[f32], b: &[f32], c: f32) -> f32 {
    debug_assert_eq!(a.len(), b.len());
    let mut pinf = false;
    let mut ninf = false;
    let mut nan = c.is_nan();
    let mut all_neg_zero = c == 0.0 && c.is_sign_negative();
    if c.is_infinite() {
        if c > 0.0 {
            pinf = true
        } else {
            ninf = true
        }
    }
    for (&x, &y) in a.iter().zip(b) {
        if x.is_nan() || y.is_nan() {
            nan = true;
        } else if x.is_infinite() || y.is_infinite() {
            if x == 0.0 || y == 0.0 {
                nan = true;
            } else if (x < 0.0) != (y < 0.0) {
                ninf = true;
            } else {
                pinf = true;
            }
        }
        let p = x as f64 * y as f64;
        if !(p == 0.0 && p.is_sign_negative()) {
            all_neg_zero = false;
        }
    }
    if nan || (pinf && ninf) {
        return f32::from_bits(NAN_F32);
    }
    if pinf {
        return f32::INFINITY;
    }
    if ninf {
        return f32::NEG_INFINITY;
    }
    let mut acc = Acc { l: [0; 12] };
    for (&x, &y) in a.iter().zip(b) {
        acc.add(prod(dec(x as f64), dec(y as f64)));
    }
    acc.add(dec(c as f64));
    let w = acc.wide();
    if w.m == 0 && !w.sticky {
        return if all_neg_zero { -0.0 } else { 0.0 };
    }
    f32::from_bits(round_bits(F32, w, Rnd::Rn, false) as u32)
}

#[cfg(test)]
mod tests {
    //! Tests written from the PTX ISA text (sections cited) and from exact arithmetic: every
    //! reference here is independent of the engine above (sorted tables of all 16-bit values,
    //! TwoSum/TwoProduct error-free transformations in f64, exact residual signs).
    use super::*;
    use std::cmp::Ordering;

    const MODES: [Rnd; 4] = [Rnd::Rn, Rnd::Rz, Rnd::Rm, Rnd::Rp];

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// All positive finite values of a 16-bit format, by bits, plus a virtual "inf" at the next
    /// power of two (the overflow threshold of IEEE rounding).
    struct Table {
        vals: Vec<f64>,
        inf: u16,
    }
    fn table(f16: bool) -> Table {
        let (max, inf, virt) = if f16 { (0x7BFFu16, 0x7C00u16, 65536.0) } else { (0x7F7F, 0x7F80, 2f64.powi(128)) };
        let mut vals: Vec<f64> =
            (0..=max).map(|b| if f16 { f16_to_f32(b) as f64 } else { bf16_to_f32(b) as f64 }).collect();
        vals.push(virt);
        Table { vals, inf }
    }
    /// Reference rounding of an exactly-known nonzero f64 value into the 16-bit format.
    fn ref16(t: &Table, x: f64, r: Rnd, satfinite: bool) -> u16 {
        assert!(x != 0.0 && x.is_finite());
        let neg = x < 0.0;
        let ax = x.abs();
        let r = match (r, neg) {
            (Rnd::Rm, true) => Rnd::Rp,
            (Rnd::Rp, true) => Rnd::Rm,
            (o, _) => o,
        };
        let n = t.vals.len();
        let bits = if ax >= t.vals[n - 1] {
            if r == Rnd::Rp || r == Rnd::Rn {
                t.inf
            } else {
                t.inf - 1
            }
        } else {
            let i = t.vals.partition_point(|&v| v <= ax); // vals[i-1] <= ax < vals[i]
            let (lo, hi) = (i - 1, i);
            if t.vals[lo] == ax {
                lo as u16
            } else {
                match r {
                    Rnd::Rz | Rnd::Rm => lo as u16,
                    Rnd::Rp => hi as u16,
                    Rnd::Rn => {
                        let mid = (t.vals[lo] + t.vals[hi]) / 2.0;
                        match ax.partial_cmp(&mid).unwrap() {
                            Ordering::Less => lo as u16,
                            Ordering::Greater => hi as u16,
                            Ordering::Equal => {
                                if lo % 2 == 0 {
                                    lo as u16
                                } else {
                                    hi as u16
                                }
                            }
                        }
                    }
                }
            }
        };
        let bits = if satfinite && bits == t.inf { t.inf - 1 } else { bits };
        bits | if neg { 0x8000 } else { 0 }
    }

    // ---- cvt ("Data Movement and Conversion Instructions: cvt") -----------------------------

    /// Exhaustive: every f16 / bf16 value survives f16→f32→f16 in every mode; NaN → 0x7FFF.
    #[test]
    fn fp_cvt_roundtrip_exhaustive() {
        for h in 0..=u16::MAX {
            let x = f16_to_f32(h);
            let y = bf16_to_f32(h);
            assert_eq!(y.to_bits(), (h as u32) << 16);
            if (h & 0x7FFF) > 0x7C00 {
                assert!(x.is_nan());
                assert_eq!(x.to_bits(), ((h as u32 & 0x8000) << 16) | 0x7F80_0000 | ((h as u32 & 0x3FF) << 13));
                for r in MODES {
                    assert_eq!(f32_to_f16(x, r, false, false), 0x7FFF);
                    assert_eq!(f32_to_f16(x, r, true, true), 0x7FFF);
                }
            } else {
                assert_eq!(x as f64, f16_to_f64(h));
                for r in MODES {
                    assert_eq!(f32_to_f16(x, r, false, false), h, "{h:#x} {r:?}");
                }
            }
            if (h & 0x7FFF) > 0x7F80 {
                for r in MODES {
                    assert_eq!(f32_to_bf16(y, r, false, false), 0x7FFF);
                }
            } else {
                for r in MODES {
                    assert_eq!(f32_to_bf16(y, r, false, false), h);
                }
            }
        }
    }

    /// Every midpoint between adjacent 16-bit values (and ±1 f32 ulp around it), both signs,
    /// every mode, against the sorted-table reference (ties to even under .rn).
    #[test]
    fn fp_cvt_midpoints_all_modes() {
        for is_f16 in [true, false] {
            let t = table(is_f16);
            for i in 0..t.vals.len() - 1 {
                let mid = ((t.vals[i] + t.vals[i + 1]) / 2.0) as f32;
                assert_eq!(mid as f64, (t.vals[i] + t.vals[i + 1]) / 2.0);
                let cands = [mid, f32::from_bits(mid.to_bits() + 1), f32::from_bits(mid.to_bits() - 1)];
                for x in cands {
                    for x in [x, -x] {
                        if x == 0.0 {
                            continue;
                        }
                        for r in MODES {
                            for sf in [false, true] {
                                let got =
                                    if is_f16 { f32_to_f16(x, r, false, sf) } else { f32_to_bf16(x, r, false, sf) };
                                assert_eq!(got, ref16(&t, x as f64, r, sf), "{x:e} {r:?} f16={is_f16}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// "cvt": `.relu` clamps negatives to 0 and makes NaN canonical; `.satfinite` maps
    /// |x| > MAX_NORM (inf included) to ±MAX_NORM and NaN to NaN; x2 forms put `a` high.
    #[test]
    fn fp_cvt_relu_satfinite_x2() {
        assert_eq!(f32_to_f16(-3.0, Rnd::Rn, true, false), 0);
        assert_eq!(f32_to_bf16(-3.0, Rnd::Rn, true, false), 0);
        assert_eq!(f32_to_f16(f32::from_bits(0xFFC0_0001), Rnd::Rn, true, false), 0x7FFF);
        assert_eq!(f32_to_f16(f32::INFINITY, Rnd::Rn, false, true), 0x7BFF);
        assert_eq!(f32_to_f16(f32::NEG_INFINITY, Rnd::Rn, false, true), 0xFBFF);
        assert_eq!(f32_to_f16(1e6, Rnd::Rn, false, false), 0x7C00);
        assert_eq!(f32_to_f16(1e6, Rnd::Rz, false, false), 0x7BFF);
        assert_eq!(f32_to_bf16(f32::MAX, Rnd::Rn, false, false), 0x7F80);
        assert_eq!(f32_to_bf16(f32::MAX, Rnd::Rn, false, true), 0x7F7F);
        assert_eq!(f32_to_bf16(f32::NEG_INFINITY, Rnd::Rz, false, false), 0xFF80);
        assert_eq!(f64_to_f16(1.0 + 2f64.powi(-11) + 2f64.powi(-40), Rnd::Rn, false, false), 0x3C01); // once
        assert_eq!(f64_to_bf16(-1e300, Rnd::Rz, false, false), 0xFF7F);
        assert_eq!(f16_to_bf16(0x3C01, Rnd::Rn), 0x3F80);
        assert_eq!(f16_to_bf16(0x3C01, Rnd::Rp), 0x3F81);
        assert_eq!(bf16_to_f16(0x7F7F, Rnd::Rn), 0x7C00);
        assert_eq!(bf16_to_f16(0x7F7F, Rnd::Rz), 0x7BFF);
        assert_eq!(int_to_bf16(257, Rnd::Rn), 0x4380);
        assert_eq!(int_to_bf16(259, Rnd::Rn), 0x4382);
        assert_eq!(f32x2_to_f16x2(1.0, 2.0, Rnd::Rn, false, false), 0x3C00_4000);
        assert_eq!(f32x2_to_bf16x2(1.0, -2.0, Rnd::Rn, false, false), 0x3F80_C000);
        // subnormal f16 results, ties to even at the bottom of the range
        assert_eq!(f32_to_f16(2f32.powi(-25), Rnd::Rn, false, false), 0);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25), Rnd::Rn, false, false), 2);
        assert_eq!(f32_to_f16(2f32.powi(-30), Rnd::Rp, false, false), 1);
        assert_eq!(f32_to_f16(-(2f32.powi(-30)), Rnd::Rp, false, false), 0x8000);
        assert_eq!(f32_to_f16(-(2f32.powi(-30)), Rnd::Rm, false, false), 0x8001);
    }

    /// "cvt": float→int clamps to the destination range, NaN → 0; `.rni` is ties to even.
    #[test]
    fn fp_cvt_float_to_int() {
        let nan = f32::NAN;
        // Integer Notes: NaN → 0 unless the source is .f64 or the destination is 64-bit, where
        // it is 1 << (BitWidth(dst) - 1) (MININT for signed types).
        for (s, b) in [(true, 8), (true, 16), (true, 32), (false, 8), (false, 16), (false, 32)] {
            assert_eq!(f32_to_int(nan, IRnd::Rzi, s, b), 0);
            assert_eq!(f16_to_int(0x7E00, IRnd::Rni, s, b), 0);
            assert_eq!(bf16_to_int(0x7FC0, IRnd::Rni, s, b), 0);
        }
        assert_eq!(f32_to_int(nan, IRnd::Rzi, true, 64), 1 << 63);
        assert_eq!(f32_to_int(nan, IRnd::Rzi, false, 64), 1 << 63);
        assert_eq!(f16_to_int(0x7E00, IRnd::Rzi, true, 64), 1 << 63);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, true, 32) as i64, i32::MIN as i64);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, false, 32), 1 << 31);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, true, 8) as i64, -128);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, false, 8), 0x80);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, true, 64), 1 << 63);
        assert_eq!(f64_to_int(f64::NAN, IRnd::Rni, false, 64), 1 << 63);
        assert_eq!(f32_to_int(f32::INFINITY, IRnd::Rzi, true, 32) as i64, i32::MAX as i64);
        assert_eq!(f32_to_int(f32::NEG_INFINITY, IRnd::Rzi, true, 32) as i64, i32::MIN as i64);
        assert_eq!(f32_to_int(f32::INFINITY, IRnd::Rzi, false, 32), u32::MAX as u64);
        assert_eq!(f32_to_int(-5.0, IRnd::Rzi, false, 32), 0);
        assert_eq!(f32_to_int(3e9, IRnd::Rzi, true, 32) as i64, i32::MAX as i64);
        assert_eq!(f32_to_int(1e30, IRnd::Rzi, true, 64) as i64, i64::MAX);
        assert_eq!(f32_to_int(-1e30, IRnd::Rzi, true, 64) as i64, i64::MIN);
        assert_eq!(f32_to_int(1e30, IRnd::Rzi, false, 64), u64::MAX);
        assert_eq!(f32_to_int(-(2f32.powi(63)), IRnd::Rzi, true, 64) as i64, i64::MIN);
        assert_eq!(f32_to_int(200.0, IRnd::Rni, true, 8) as i64, 127);
        assert_eq!(f32_to_int(-200.0, IRnd::Rni, true, 8) as i64, -128);
        assert_eq!(f32_to_int(-1.0, IRnd::Rni, true, 16), 0xFFFF_FFFF_FFFF_FFFF);
        for (x, rni, rzi, rmi, rpi) in
            [(2.5f32, 2, 2, 2, 3), (3.5, 4, 3, 3, 4), (-2.5, -2, -2, -3, -2), (-0.5, 0, 0, -1, 0)]
        {
            assert_eq!(f32_to_int(x, IRnd::Rni, true, 32) as i64, rni);
            assert_eq!(f32_to_int(x, IRnd::Rzi, true, 32) as i64, rzi);
            assert_eq!(f32_to_int(x, IRnd::Rmi, true, 32) as i64, rmi);
            assert_eq!(f32_to_int(x, IRnd::Rpi, true, 32) as i64, rpi);
        }
        assert_eq!(f16_to_int(0x3E00, IRnd::Rni, true, 32), 2); // 1.5 → 2
        assert_eq!(f16_to_int(0x7C00, IRnd::Rni, false, 16), 0xFFFF);
        assert_eq!(f16_to_int(0x7E00, IRnd::Rni, false, 16), 0);
    }

    /// `cvt.frnd.f{32,64,16}.{s,u}N` vs the host's (ties-to-even) integer casts, and directed
    /// modes by bracketing.
    #[test]
    fn fp_cvt_int_to_float() {
        let mut g = Rng(0x1234_5678_9ABC_DEF1);
        for _ in 0..200_000 {
            let v = g.next() as i64 >> (g.next() % 64);
            let u = g.next() >> (g.next() % 64);
            assert_eq!(int_to_f32(v as i128, Rnd::Rn), v as f32);
            assert_eq!(int_to_f64(v as i128, Rnd::Rn), v as f64);
            assert_eq!(int_to_f32(u as i128, Rnd::Rn), u as f32);
            assert_eq!(int_to_f64(u as i128, Rnd::Rn), u as f64);
            let lo = int_to_f32(v as i128, Rnd::Rm);
            let hi = int_to_f32(v as i128, Rnd::Rp);
            assert!((lo as i128) <= v as i128 && (hi as i128) >= v as i128);
            if lo != hi {
                assert_eq!(f32::from_bits(if lo >= 0.0 { lo.to_bits() + 1 } else { lo.to_bits() - 1 }), hi);
            }
            let z = int_to_f32(v as i128, Rnd::Rz);
            assert_eq!(z, if v >= 0 { lo } else { hi });
        }
        assert_eq!(int_to_f16(65519, Rnd::Rn), 0x7BFF);
        assert_eq!(int_to_f16(65520, Rnd::Rn), 0x7C00);
        assert_eq!(int_to_f16(1 << 40, Rnd::Rz), 0x7BFF);
        assert_eq!(int_to_f16(-(1 << 40), Rnd::Rm), 0xFC00);
        assert_eq!(int_to_f16(2049, Rnd::Rn), 0x6800);
        assert_eq!(int_to_f16(2049, Rnd::Rp), 0x6801);
        assert_eq!(int_to_f32(0, Rnd::Rm).to_bits(), 0);
    }

    #[test]
    fn fp_cvt_f64_to_f32_modes() {
        let mut g = Rng(99);
        for _ in 0..200_000 {
            let x = f64::from_bits(g.next() & 0xBFFF_FFFF_FFFF_FFFF | 0x3000_0000_0000_0000);
            let x = if g.next() & 1 == 0 { x } else { -x };
            let n = f64_to_f32(x, Rnd::Rn);
            assert_eq!(n, x as f32);
            let d = f64_to_f32(x, Rnd::Rm);
            let u = f64_to_f32(x, Rnd::Rp);
            assert!((d as f64) <= x && (u as f64) >= x);
            assert!(d == u || step(F32, d.to_bits() as u64, true) == u.to_bits() as u64);
        }
        assert_eq!(f64_to_f32(1e300, Rnd::Rz), f32::MAX);
        assert_eq!(f64_to_f32(-1e300, Rnd::Rz), -f32::MAX);
        assert_eq!(f64_to_f32(1e-300, Rnd::Rp).to_bits(), 1);
        assert_eq!(f64_to_f32(-1e-300, Rnd::Rn).to_bits(), 0x8000_0000);
        assert_eq!(f64_to_f32(f64::NAN, Rnd::Rn).to_bits(), NAN_F32);
    }

    /// `cvt.rni.f32.f32` etc.; `.sat` ("cvt": [0.0, 1.0], NaN → +0); `.ftz`.
    #[test]
    fn fp_round_int_sat_ftz() {
        assert_eq!(f32_round_int(2.5, IRnd::Rni, false), 2.0);
        assert_eq!(f32_round_int(-0.4, IRnd::Rni, false).to_bits(), 0x8000_0000);
        assert_eq!(f32_round_int(-1.5, IRnd::Rni, false), -2.0);
        assert_eq!(f32_round_int(1.5, IRnd::Rzi, false), 1.0);
        assert_eq!(f32_round_int(1.5, IRnd::Rmi, false), 1.0);
        assert_eq!(f32_round_int(1.2, IRnd::Rpi, false), 2.0);
        assert_eq!(f32_round_int(1e30, IRnd::Rni, false), 1e30);
        assert_eq!(f32_round_int(f32::from_bits(1), IRnd::Rpi, false), 1.0);
        assert_eq!(f32_round_int(f32::from_bits(1), IRnd::Rpi, true), 0.0);
        assert_eq!(f32_round_int(f32::NAN, IRnd::Rni, false).to_bits(), NAN_F32);
        assert_eq!(f32_sat(f32::NAN).to_bits(), 0);
        assert_eq!(f32_sat(-0.0).to_bits(), 0);
        assert_eq!(f32_sat(-3.0), 0.0);
        assert_eq!(f32_sat(3.0), 1.0);
        assert_eq!(f32_sat(f32::INFINITY), 1.0);
        assert_eq!(f32_sat(0.25), 0.25);
        assert_eq!(ftz32(f32::from_bits(0x8000_0001)).to_bits(), 0x8000_0000);
        assert_eq!(ftz32(f32::MIN_POSITIVE), f32::MIN_POSITIVE);
    }

    // ---- f32 / f64 arithmetic ("Floating Point Instructions": add, sub, mul, fma, div, sqrt,
    // rcp; rounding modifiers) ---------------------------------------------------------------

    fn two_sum(a: f64, b: f64) -> (f64, f64) {
        let s = a + b;
        let bb = s - a;
        let e = (a - (s - bb)) + (b - bb);
        (s, e)
    }
    fn sgn(x: f64) -> Ordering {
        x.partial_cmp(&0.0).unwrap()
    }
    /// Reference: round the exact value known only through `cmp(y) = sign(exact - y)` and an
    /// approximation `y0` within one f32 ulp, into f32 with mode `r`.
    fn ref_f32(y0: f32, exact_neg: bool, cmp: &dyn Fn(f64) -> Ordering, r: Rnd) -> f32 {
        let c0 = cmp(y0 as f64);
        if c0 == Ordering::Equal {
            return y0;
        }
        let (lo, hi) = if c0 == Ordering::Greater {
            (y0, f32::from_bits(step(F32, y0.to_bits() as u64, true) as u32))
        } else {
            (f32::from_bits(step(F32, y0.to_bits() as u64, false) as u32), y0)
        };
        assert!(cmp(lo as f64) == Ordering::Greater && cmp(hi as f64) == Ordering::Less);
        match r {
            Rnd::Rm => lo,
            Rnd::Rp => hi,
            Rnd::Rz => {
                if exact_neg {
                    hi
                } else {
                    lo
                }
            }
            Rnd::Rn => match cmp((lo as f64 + hi as f64) / 2.0) {
                Ordering::Less => lo,
                Ordering::Greater => hi,
                Ordering::Equal => {
                    if lo.to_bits() & 1 == 0 {
                        lo
                    } else {
                        hi
                    }
                }
            },
        }
    }
    /// `sign((s + t) - y)` exactly, for a TwoSum pair `(s, t)` and y near s.
    fn cmp_pair(s: f64, t: f64, y: f64) -> Ordering {
        if y.is_infinite() {
            return if y > 0.0 { Ordering::Less } else { Ordering::Greater };
        }
        sign_sum(&[s, t, -y])
    }
    /// Exact sign of a sum of f64 terms (Shewchuk's expansion growth with TwoSum: the expansion
    /// is nonoverlapping and ordered by magnitude, so its sign is that of its last component).
    fn sign_sum(terms: &[f64]) -> Ordering {
        let mut e: Vec<f64> = Vec::new();
        for &x in terms {
            let mut q = x;
            let mut next = Vec::new();
            for &c in &e {
                let (s, h) = two_sum(q, c);
                if h != 0.0 {
                    next.push(h);
                }
                q = s;
            }
            next.push(q);
            e = next;
        }
        e.iter().rev().find(|&&v| v != 0.0).map_or(Ordering::Equal, |&v| sgn(v))
    }
    fn rand_f32(g: &mut Rng, emin: u32, erange: u32) -> f32 {
        let b = g.next();
        let e = (emin + (b >> 40) as u32 % erange) & 0xFF;
        f32::from_bits(((b as u32) & 0x807F_FFFF) | (e << 23))
    }

    fn check_add(a: f32, b: f32) {
        let (s, t) = two_sum(a as f64, b as f64);
        if s == 0.0 && t == 0.0 {
            return;
        }
        for r in MODES {
            let want = ref_f32(s as f32, s < 0.0, &|y| cmp_pair(s, t, y), r);
            let got = add_f32(a, b, r);
            assert_eq!(got.to_bits(), want.to_bits(), "{a:e} + {b:e} {r:?}");
            assert_eq!(sub_f32(a, -b, r).to_bits(), want.to_bits());
        }
    }
    fn check_fma(a: f32, b: f32, c: f32) {
        let p = a as f64 * b as f64; // exact
        let (s, t) = two_sum(p, c as f64);
        if s == 0.0 && t == 0.0 {
            return;
        }
        for r in MODES {
            let want = ref_f32(s as f32, s < 0.0, &|y| cmp_pair(s, t, y), r);
            assert_eq!(fma_f32(a, b, c, r).to_bits(), want.to_bits(), "fma({a:e},{b:e},{c:e}) {r:?}");
        }
    }

    #[test]
    fn fp_f32_add_fma_directed_random() {
        let mut g = Rng(0xDEAD_BEEF_1234_5678);
        for i in 0..300_000 {
            // a wide exponent range, including subnormals (exponent field 0)
            let a = rand_f32(&mut g, 0, 254);
            let b = if i % 3 == 0 {
                rand_f32(&mut g, 0, 254)
            } else {
                f32::from_bits(a.to_bits() ^ (g.next() as u32 & 0x8000_FFFF))
            };
            check_add(a, b);
            let x = rand_f32(&mut g, 64, 127);
            let y = rand_f32(&mut g, 64, 127);
            let c = match i % 4 {
                0 => rand_f32(&mut g, 0, 254),
                1 => -((x as f64 * y as f64) as f32), // cancellation
                2 => {
                    // near a tie: c = -(RN(p)) plus a few ulps of the residual
                    let p = x as f64 * y as f64;
                    f32::from_bits(((-(p as f32)).to_bits() as i64 + (g.next() % 5) as i64 - 2) as u32)
                }
                _ => f32::from_bits(g.next() as u32 & 0x807F_FFFF), // subnormal / zero
            };
            if c.is_finite() {
                check_fma(x, y, c);
            }
            // products in (and below) the f32 subnormal range, with subnormal addends
            let (xs, ys) = (rand_f32(&mut g, 40, 12), rand_f32(&mut g, 40, 12));
            check_fma(xs, ys, f32::from_bits(g.next() as u32 & 0x800F_FFFF));
            check_fma(xs, ys, 0.0);
            check_add(f32::from_bits(g.next() as u32 & 0x807F_FFFF), f32::from_bits(g.next() as u32 & 0x80FF_FFFF));
        }
    }

    /// The engine's `.rn` path (used by every 16-bit op) against the host's IEEE f32/f64 ops,
    /// which the `.rn` fast paths use.
    #[test]
    fn fp_engine_rn_matches_host() {
        let mut g = Rng(0xABCD_EF01);
        for _ in 0..300_000 {
            let (a, b, c) = (rand_f32(&mut g, 0, 255), rand_f32(&mut g, 0, 255), rand_f32(&mut g, 0, 255));
            let (ad, bd, cd) = (a as f64, b as f64, c as f64);
            let chk = |got: u64, want: f32| {
                if want.is_nan() {
                    assert_eq!(got, NAN_F32 as u64)
                } else {
                    assert_eq!(got, want.to_bits() as u64, "{a:e} {b:e} {c:e}")
                }
            };
            chk(g_add(F32, ad, bd, Rnd::Rn), a + b);
            chk(g_mul(F32, ad, bd, Rnd::Rn), a * b);
            chk(g_fma(F32, ad, bd, cd, Rnd::Rn), a.mul_add(b, c));
            chk(g_sqrt(F32, ad.abs(), Rnd::Rn), a.abs().sqrt());
            let (x, y, z) = (f64::from_bits(g.next()), f64::from_bits(g.next()), f64::from_bits(g.next()));
            for (got, want) in [
                (g_add(F64, x, y, Rnd::Rn), x + y),
                (g_mul(F64, x, y, Rnd::Rn), x * y),
                (g_fma(F64, x, y, z, Rnd::Rn), x.mul_add(y, z)),
            ] {
                if want.is_nan() {
                    assert_eq!(got, NAN_F64);
                } else {
                    assert_eq!(got, want.to_bits(), "{x:e} {y:e} {z:e}");
                }
            }
        }
    }

    /// Every f16 value against a fixed set of partners (zeros, ±1, tiny, huge, subnormal,
    /// inf, NaN), add and mul in every mode, against the table reference.
    #[test]
    fn fp_half_exhaustive_vs_partners() {
        let t = table(true);
        let partners = [
            0x0000u16, 0x8000, 0x3C00, 0xBC00, 0x0001, 0x83FF, 0x7BFF, 0xFBFF, 0x3C01, 0x1400, 0x5A3F, 0xC7FF, 0x7C00,
            0xFC00, 0x7E00,
        ];
        for h in 0..=u16::MAX {
            for &o in &partners {
                let (x, y) = (f16_to_f64(h), f16_to_f64(o));
                for r in MODES {
                    let add = f16_add(h, o, r, false, false);
                    let mul = f16_mul(h, o, r, false, false);
                    if x.is_nan() || y.is_nan() {
                        assert_eq!((add, mul), (0x7FFF, 0x7FFF));
                        continue;
                    }
                    if x.is_finite() && y.is_finite() {
                        let s = x + y; // exact
                        let want = if s != 0.0 {
                            ref16(&t, s, r, false)
                        } else if x == 0.0 && y == 0.0 && x.is_sign_negative() == y.is_sign_negative() {
                            h & 0x8000
                        } else if r == Rnd::Rm {
                            0x8000
                        } else {
                            0
                        };
                        assert_eq!(add, want, "{h:#x}+{o:#x} {r:?}");
                        let p = x * y; // exact
                        let want = if p != 0.0 { ref16(&t, p, r, false) } else { (h ^ o) & 0x8000 };
                        assert_eq!(mul, want, "{h:#x}*{o:#x} {r:?}");
                    } else {
                        let s = x + y;
                        let p = x * y;
                        assert_eq!(add, if s.is_nan() { 0x7FFF } else { f32_to_f16(s as f32, r, false, false) });
                        assert_eq!(mul, if p.is_nan() { 0x7FFF } else { f32_to_f16(p as f32, r, false, false) });
                    }
                }
            }
        }
    }

    #[test]
    fn fp_f32_adversarial_ties_and_zeros() {
        // exact ties: 1 + 2^-24 is the midpoint of 1 and 1+2^-23
        let t = 2f32.powi(-24);
        assert_eq!(add_f32(1.0, t, Rnd::Rn), 1.0);
        assert_eq!(add_f32(1.0, t, Rnd::Rp), 1.0 + 2.0 * t);
        assert_eq!(add_f32(1.0 + 2.0 * t, t, Rnd::Rn), 1.0 + 4.0 * t);
        // a far smaller operand acts only as a sticky bit
        let tiny = f32::from_bits(1);
        assert_eq!(add_f32(1.0, tiny, Rnd::Rp), 1.0 + 2.0 * t);
        assert_eq!(add_f32(1.0, -tiny, Rnd::Rz), 1.0 - t);
        assert_eq!(add_f32(1.0, -tiny, Rnd::Rn), 1.0);
        assert_eq!(add_f32(f32::MAX, f32::MAX, Rnd::Rz), f32::MAX);
        assert_eq!(add_f32(f32::MAX, f32::MAX, Rnd::Rn), f32::INFINITY);
        assert_eq!(add_f32(-f32::MAX, -f32::MAX, Rnd::Rp), -f32::MAX);
        for (a, b) in [(1.0f32, 1.0f32), (t, -tiny), (f32::MAX, 0.5), (1e-40, 3e-39)] {
            check_add(a, b);
            check_add(a, -b);
        }
        // signed zeros (IEEE 754 §6.3, which the PTX rounding modifiers follow)
        let nz = -0.0f32;
        assert_eq!(add_f32(0.0, nz, Rnd::Rn).to_bits(), 0);
        assert_eq!(add_f32(0.0, nz, Rnd::Rm).to_bits(), 0x8000_0000);
        assert_eq!(add_f32(nz, nz, Rnd::Rn).to_bits(), 0x8000_0000);
        assert_eq!(add_f32(1.5, -1.5, Rnd::Rn).to_bits(), 0);
        assert_eq!(add_f32(1.5, -1.5, Rnd::Rm).to_bits(), 0x8000_0000);
        assert_eq!(sub_f32(nz, nz, Rnd::Rn).to_bits(), 0);
        for r in MODES {
            // x*y + (-0.0) keeps the product (and a zero product's sign) except +0 under .rm
            assert_eq!(fma_f32(-2.0, 0.0, nz, r).to_bits(), 0x8000_0000);
            let pz = fma_f32(2.0, 0.0, nz, r).to_bits();
            assert_eq!(pz, if r == Rnd::Rm { 0x8000_0000 } else { 0 });
            assert_eq!(fma_f32(3.0, 5.0, nz, r), 15.0);
            assert_eq!(mul_f32(-0.0, 5.0, r).to_bits(), 0x8000_0000);
            // underflow keeps the sign
            assert_eq!(mul_f32(-1e-30, 1e-30, r).to_bits() & 0x8000_0000, 0x8000_0000);
        }
        assert_eq!(fma_f32(1.0, 1.0, -1.0, Rnd::Rm).to_bits(), 0x8000_0000);
        assert_eq!(mul_f32(1e-30, 1e-30, Rnd::Rp).to_bits(), 1);
        assert_eq!(mul_f32(1e-30, -1e-30, Rnd::Rn).to_bits(), 0x8000_0000);
        // NaN / inf rules: canonical NaN
        assert_eq!(add_f32(f32::INFINITY, f32::NEG_INFINITY, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(mul_f32(f32::INFINITY, 0.0, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(fma_f32(f32::INFINITY, 1.0, f32::NEG_INFINITY, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(fma_f32(f32::from_bits(0x7F80_0001), 1.0, 1.0, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(fma_f32(2.0, 3.0, f32::NEG_INFINITY, Rnd::Rn), f32::NEG_INFINITY);
        assert_eq!(div_f32(0.0, 0.0, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(div_f32(-1.0, 0.0, Rnd::Rz), f32::NEG_INFINITY);
        assert_eq!(sqrt_f32(-1.0, Rnd::Rn).to_bits(), NAN_F32);
        assert_eq!(sqrt_f32(-0.0, Rnd::Rp).to_bits(), 0x8000_0000);
        assert_eq!(rcp_f32(-0.0, Rnd::Rn), f32::NEG_INFINITY);
    }

    #[test]
    fn fp_f32_div_sqrt_directed() {
        let mut g = Rng(777);
        for _ in 0..200_000 {
            let a = rand_f32(&mut g, 0, 254);
            let b = rand_f32(&mut g, 0, 254);
            if a == 0.0 || b == 0.0 {
                continue;
            }
            let (ad, bd) = (a as f64, b as f64);
            let neg = (a < 0.0) != (b < 0.0);
            let q0 = a / b;
            if q0.is_finite() && q0 != 0.0 {
                // sign(a/b - y) = sign(a - y*b) * sign(b); y*b is exact in f64
                let cmp = |y: f64| {
                    let o = sgn(ad - y * bd);
                    if bd < 0.0 {
                        o.reverse()
                    } else {
                        o
                    }
                };
                for r in MODES {
                    assert_eq!(div_f32(a, b, r).to_bits(), ref_f32(q0, neg, &cmp, r).to_bits(), "{a:e}/{b:e} {r:?}");
                }
            }
            let aa = a.abs();
            let s0 = aa.sqrt();
            let cmp = |y: f64| sgn(aa as f64 - y * y);
            for r in MODES {
                assert_eq!(sqrt_f32(aa, r).to_bits(), ref_f32(s0, false, &cmp, r).to_bits(), "sqrt {aa:e} {r:?}");
            }
        }
        assert_eq!(div_f32(f32::MAX, 0.5, Rnd::Rz), f32::MAX);
        assert_eq!(div_f32(f32::MAX, -0.5, Rnd::Rp), -f32::MAX);
        assert_eq!(div_f32(f32::from_bits(1), 4.0, Rnd::Rp).to_bits(), 1);
        assert_eq!(div_f32(f32::from_bits(1), -4.0, Rnd::Rm).to_bits(), 0x8000_0001);
        assert_eq!(div_f32(f32::from_bits(1), -4.0, Rnd::Rz).to_bits(), 0x8000_0000);
        assert_eq!(rcp_f32(3.0, Rnd::Rz).to_bits(), 0x3EAA_AAAA);
        assert_eq!(rcp_f32(3.0, Rnd::Rn).to_bits(), 0x3EAA_AAAB);
        assert_eq!(rcp_f32(-3.0, Rnd::Rm).to_bits(), 0xBEAA_AAAB);
    }

    #[test]
    fn fp_f64_directed() {
        let mut g = Rng(4242);
        let down = |x: f64| f64::from_bits(step(F64, x.to_bits(), false));
        let up = |x: f64| f64::from_bits(step(F64, x.to_bits(), true));
        for _ in 0..200_000 {
            // |a|, |b| in [2^-255, 2): no overflow, and every residual below is representable
            let a = f64::from_bits(g.next() & 0x8FFF_FFFF_FFFF_FFFF | 0x3000_0000_0000_0000);
            let b = f64::from_bits(g.next() & 0x8FFF_FFFF_FFFF_FFFF | 0x3000_0000_0000_0000);
            let b = if g.next() & 1 == 0 { b } else { -b };
            let pick = |s: f64, e: f64, r: Rnd| -> f64 {
                // exact = s + e, s = RN(exact)
                if e == 0.0 {
                    return s;
                }
                match r {
                    Rnd::Rn => s,
                    Rnd::Rm => {
                        if e < 0.0 {
                            down(s)
                        } else {
                            s
                        }
                    }
                    Rnd::Rp => {
                        if e > 0.0 {
                            up(s)
                        } else {
                            s
                        }
                    }
                    Rnd::Rz => {
                        if (s > 0.0) == (e < 0.0) {
                            if s > 0.0 {
                                down(s)
                            } else {
                                up(s)
                            }
                        } else {
                            s
                        }
                    }
                }
            };
            let (s, e) = two_sum(a, b);
            let p = a * b;
            let pe = a.mul_add(b, -p);
            let q = a / b;
            let qe = (-q).mul_add(b, a); // a - q*b exact
            let qe = if b < 0.0 { -qe } else { qe }; // sign of a/b - q
            let sq = a.abs().sqrt();
            let se = (-sq).mul_add(sq, a.abs());
            for r in MODES {
                assert_eq!(add_f64(a, b, r).to_bits(), pick(s, e, r).to_bits());
                assert_eq!(mul_f64(a, b, r).to_bits(), pick(p, pe, r).to_bits());
                assert_eq!(div_f64(a, b, r).to_bits(), pick(q, qe, r).to_bits());
                assert_eq!(sqrt_f64(a.abs(), r).to_bits(), pick(sq, se, r).to_bits());
                assert_eq!(fma_f64(a, b, -p, r).to_bits(), pe.to_bits(), "exact residual");
            }
            assert_eq!(fma_f64(a, b, s, Rnd::Rn), a.mul_add(b, s));
        }
        assert_eq!(add_f64(f64::MAX, f64::MAX, Rnd::Rz), f64::MAX);
        assert_eq!(rcp_f64(3.0, Rnd::Rn), 1.0 / 3.0);
    }

    // ---- half precision ("Half Precision Floating Point Instructions") ---------------------

    #[test]
    fn fp_half_random_vs_reference() {
        let tf = table(true);
        let tb = table(false);
        let mut g = Rng(0x5151_7171);
        for i in 0..300_000 {
            let (a, b) = (g.next() as u32, g.next() as u32);
            let b = if i % 2 == 0 { b } else { (a ^ b) & 0x83FF_83FF ^ a }; // nearby exponents
            for r in MODES {
                let add = f16x2_add(a, b, r, false, false);
                let mul = f16x2_mul(a, b, r, false, false);
                let badd = bf16x2_add(a, b, r);
                let bmul = bf16x2_mul(a, b, r);
                for lane in 0..2 {
                    let (x, y) = ((a >> (16 * lane)) as u16, (b >> (16 * lane)) as u16);
                    let get = |v: u32| (v >> (16 * lane)) as u16;
                    let (fx, fy) = (f16_to_f64(x), f16_to_f64(y));
                    if fx.is_finite() && fy.is_finite() {
                        // f16 sums/products are exact in f64
                        let s = fx + fy;
                        if s != 0.0 {
                            assert_eq!(get(add), ref16(&tf, s, r, false), "{x:#x}+{y:#x} {r:?}");
                        }
                        let p = fx * fy;
                        if p != 0.0 {
                            assert_eq!(get(mul), ref16(&tf, p, r, false), "{x:#x}*{y:#x} {r:?}");
                        }
                    } else if fx.is_nan() || fy.is_nan() {
                        assert_eq!(get(add), 0x7FFF);
                        assert_eq!(get(mul), 0x7FFF);
                    }
                    let (bx, by) = (bf16_to_f32(x) as f64, bf16_to_f32(y) as f64);
                    if bx.is_finite() && by.is_finite() {
                        let (s, e) = two_sum(bx, by);
                        if s != 0.0 && e == 0.0 {
                            assert_eq!(get(badd), ref16(&tb, s, r, false), "bf {x:#x}+{y:#x} {r:?}");
                        }
                        let p = bx * by;
                        if p != 0.0 {
                            assert_eq!(get(bmul), ref16(&tb, p, r, false), "bf {x:#x}*{y:#x} {r:?}");
                        }
                    } else if bx.is_nan() || by.is_nan() {
                        assert_eq!(get(badd), 0x7FFF);
                    }
                }
            }
        }
        // far-apart bf16 operands: the small one is only a sticky bit
        assert_eq!(bf16_add(0x3F80, 0x0001, Rnd::Rp), 0x3F81);
        assert_eq!(bf16_add(0x3F80, 0x8001, Rnd::Rz), 0x3F7F);
        assert_eq!(bf16_add(0x3F80, 0x8001, Rnd::Rn), 0x3F80);
        assert_eq!(bf16_sub(0x3F80, 0x0001, Rnd::Rm), 0x3F7F);
    }

    /// Double rounding (exact → f32 → f16) must not happen: 1 + 2^-11 + 2^-24 is just above the
    /// f16 midpoint between 1 and 1 + 2^-10, but rounds to the midpoint itself in f32.
    #[test]
    fn fp_half_no_double_rounding() {
        // (1 + 2^-10) * (1 - 2^-11) + 9 * 2^-24 = 1 + 2^-11 + 2^-24
        assert_eq!(f16_fma(0x3C01, 0x3BFF, 0x0009, Rnd::Rn, false, false, false), 0x3C01);
        let via_f32 = fma_f32(f16_to_f32(0x3C01), f16_to_f32(0x3BFF), f16_to_f32(0x0009), Rnd::Rn);
        assert_eq!(f32_to_f16(via_f32, Rnd::Rn, false, false), 0x3C00); // the pitfall
                                                                        // bf16: (1 + 2^-7)(1 - 2^-8) + 2^-16 + 2^-24·... exact 1 + 2^-8 - 2^-15 + c
        let (a, b) = (0x3F81u16, 0x3F7Fu16); // 1+2^-7, 1-2^-8
        let c = f32_to_bf16(2f32.powi(-15) + 2f32.powi(-22), Rnd::Rn, false, false);
        assert_eq!(bf16_to_f32(c), 2f32.powi(-15) + 2f32.powi(-22));
        // exact = 1 + 2^-8 + 2^-22: above the midpoint → 1 + 2^-7
        assert_eq!(bf16_fma(a, b, c, Rnd::Rn, false), 0x3F81);
        // x*y + (-0) keeps the zero product's sign under .rn (Marlin dequant relies on it)
        assert_eq!(bf16x2_fma(0x8000_3F80, 0x3F80_0000, 0x8000_8000, Rnd::Rn, false), 0x8000_0000);
        assert_eq!(bf16_fma(0x3F80, 0x4000, 0x8000, Rnd::Rn, false), 0x4000);
        assert_eq!(f16_fma(0x0000, 0x3C00, 0x8000, Rnd::Rn, false, false, false), 0x0000);
        assert_eq!(f16_fma(0x8000, 0x3C00, 0x8000, Rnd::Rn, false, false, false), 0x8000);
    }

    #[test]
    fn fp_half_fma_random() {
        let tf = table(true);
        let tb = table(false);
        let mut g = Rng(31337);
        for _ in 0..300_000 {
            let (a, b, c) = (g.next() as u16, g.next() as u16, g.next() as u16);
            for r in MODES {
                let (x, y, z) = (f16_to_f64(a), f16_to_f64(b), f16_to_f64(c));
                if x.is_finite() && y.is_finite() && z.is_finite() {
                    let (s, e) = two_sum(x * y, z); // x*y exact (22 bits)
                    if s != 0.0 && e == 0.0 {
                        assert_eq!(f16_fma(a, b, c, r, false, false, false), ref16(&tf, s, r, false));
                    }
                }
                let (x, y, z) = (bf16_to_f32(a) as f64, bf16_to_f32(b) as f64, bf16_to_f32(c) as f64);
                if x.is_finite() && y.is_finite() && z.is_finite() {
                    let (s, e) = two_sum(x * y, z);
                    if s != 0.0 && e == 0.0 {
                        assert_eq!(bf16_fma(a, b, c, r, false), ref16(&tb, s, r, false));
                    }
                }
            }
        }
    }

    /// PTX ISA §9.7.4.4 (`fma`, half precision): `.bf16`/`.bf16x2` have no `.ftz`, subnormal
    /// inputs take part at their value. Subnormal `a` (bit patterns below 256 are `p · 2^-133`,
    /// subnormals and the smallest binade alike) times a large `b` plus `c`, rounded once: the
    /// exact f64 value `a·b + c` rounded by the reference table.
    #[test]
    fn fp_bf16_fma_subnormal_operands() {
        let tb = table(false);
        let mut g = Rng(0xb16f);
        let (mut checked, mut rounded) = (0, 0);
        for _ in 0..50_000 {
            let p = (g.next() % 256) as u16; // 0 ..= 255: subnormal or the smallest binade
            let b = ((g.next() % 200 + 54) as u16) << 7 | (g.next() % 128) as u16 | (g.next() as u16 & 0x8000);
            let c = (g.next() as u16) & 0xff7f; // any finite sign/exponent below the maximum
            let (x, y, z) = (bf16_to_f32(p) as f64, bf16_to_f32(b) as f64, bf16_to_f32(c) as f64);
            assert_eq!(x, p as f64 * 2f64.powi(-133));
            if !(y.is_finite() && z.is_finite()) {
                continue;
            }
            let (sum, err) = two_sum(x * y, z); // x·y is exact (8 + 8 bits)
            if err != 0.0 || sum == 0.0 {
                continue; // the reference needs the exact, nonzero sum in one f64
            }
            checked += 1;
            rounded += (bf16_to_f32(ref16(&tb, sum, Rnd::Rn, false)) as f64 != sum) as usize;
            for r in MODES {
                assert_eq!(bf16_fma(p, b, c, r, false), ref16(&tb, sum, r, false), "{p:#x} {b:#x} {c:#x} {r:?}");
            }
        }
        assert!(checked > 8_000 && rounded > 4_000, "{checked} checked, {rounded} rounded");
    }

    #[test]
    fn fp_half_ftz_sat_relu() {
        // .ftz: subnormal inputs and results are sign-preserving zeros
        assert_eq!(f16_add(0x0001, 0x0001, Rnd::Rn, false, false), 0x0002);
        assert_eq!(f16_add(0x0001, 0x0001, Rnd::Rn, true, false), 0x0000);
        assert_eq!(f16_mul(0x8400, 0x3800, Rnd::Rn, true, false), 0x8000); // -2^-14 * 0.5
                                                                           // .sat: clamp to [0, 1], NaN → +0
        assert_eq!(f16_add(0x3C00, 0x3C00, Rnd::Rn, false, true), 0x3C00);
        assert_eq!(f16_sub(0x3C00, 0x4000, Rnd::Rn, false, true), 0x0000);
        assert_eq!(f16_mul(0x7C00, 0x0000, Rnd::Rn, false, true), 0x0000);
        // .relu on fma: negative → 0, NaN → canonical
        assert_eq!(f16_fma(0x3C00, 0xC000, 0x0000, Rnd::Rn, false, false, true), 0x0000);
        assert_eq!(bf16_fma(0x3F80, 0xC000, 0x0000, Rnd::Rn, true), 0x0000);
        assert_eq!(bf16_fma(0x7F80, 0x0000, 0x0000, Rnd::Rn, true), 0x7FFF);
        assert_eq!(f16x2_fma(0x3C00_3C00, 0x4000_C000, 0, Rnd::Rn, false, false, true), 0x4000_0000);
        // overflow
        assert_eq!(f16_add(0x7BFF, 0x7BFF, Rnd::Rn, false, false), 0x7C00);
        assert_eq!(f16_add(0x7BFF, 0x7BFF, Rnd::Rz, false, false), 0x7BFF);
        assert_eq!(h_neg(0x3C00), 0xBC00);
        assert_eq!(h_abs(0xBC00), 0x3C00);
        assert_eq!(h2_neg(0x3C00_BC00), 0xBC00_3C00);
        assert_eq!(h2_abs(0xBC00_BC00), 0x3C00_3C00);
    }

    // ---- min/max ("Floating Point Instructions: min/max", "Half Precision ...: min/max") ----

    #[test]
    fn fp_min_max_nan_and_zero() {
        let n = f32::from_bits(0x7FC0_1234);
        assert_eq!(min_f32(n, 2.0, false), 2.0);
        assert_eq!(max_f32(2.0, n, false), 2.0);
        assert_eq!(min_f32(n, n, false).to_bits(), NAN_F32);
        assert_eq!(min_f32(n, 2.0, true).to_bits(), NAN_F32);
        assert_eq!(max_f32(2.0, n, true).to_bits(), NAN_F32);
        assert_eq!(min_f32(0.0, -0.0, false).to_bits(), 0x8000_0000);
        assert_eq!(min_f32(-0.0, 0.0, false).to_bits(), 0x8000_0000);
        assert_eq!(max_f32(-0.0, 0.0, false).to_bits(), 0);
        assert_eq!(max_f32(0.0, -0.0, false).to_bits(), 0);
        assert_eq!(max_f32(-1.0, -2.0, false), -1.0);
        assert_eq!(min_f32(f32::NEG_INFINITY, 1.0, false), f32::NEG_INFINITY);
        assert_eq!(min_f64(f64::NAN, 1.0), 1.0);
        assert_eq!(max_f64(-0.0, 0.0).to_bits(), 0);
        assert_eq!(f16_min(0x7E00, 0x3C00, false, false), 0x3C00);
        assert_eq!(f16_min(0x7E01, 0x3C00, false, true), 0x7FFF);
        assert_eq!(f16_max(0x8000, 0x0000, false, false), 0x0000);
        assert_eq!(f16_min(0x8000, 0x0000, false, false), 0x8000);
        assert_eq!(f16_min(0x8001, 0x0000, true, false), 0x8000);
        assert_eq!(bf16_max(0x7FC1, 0x7FC2, false), 0x7FFF);
        assert_eq!(bf16x2_max(0x7FC0_3F80, 0x4000_7FC0, false), 0x4000_3F80);
        assert_eq!(bf16x2_min(0x7FC0_3F80, 0x4000_4000, true), 0x7FFF_3F80);
        assert_eq!(f16x2_max(0x3C00_4000, 0x4000_3C00, false, false), 0x4000_4000);
        assert_eq!(f16x2_min(0x3C00_4000, 0x4000_3C00, false, false), 0x3C00_3C00);
        // .xorsign.abs: magnitude min/max, sign = xor of the input signs; NaN result untouched
        assert_eq!(min_xorsign_abs_f32(-3.0, 2.0, false), -2.0);
        assert_eq!(max_xorsign_abs_f32(-3.0, -2.0, false), 3.0);
        assert_eq!(min_xorsign_abs_f32(-3.0, f32::NAN, true).to_bits(), NAN_F32);
        assert_eq!(min_xorsign_abs_f32(-3.0, f32::NAN, false), -3.0);
        assert_eq!(h_min_xorsign_abs(0xC000, 0x3C00, false, false), 0xBC00);
        assert_eq!(h_max_xorsign_abs(0xC000, 0x3F80, true, false), 0xC000);
        // exhaustive over f16 pairs with a fixed partner set: result is one of the inputs
        for h in 0..=u16::MAX {
            for o in [0x0000u16, 0x8000, 0x3C00, 0xFC00, 0x7E00] {
                let m = f16_min(h, o, false, false);
                let x = f16_max(h, o, false, false);
                let (fh, fo) = (f16_to_f64(h), f16_to_f64(o));
                if fh.is_nan() && fo.is_nan() {
                    assert_eq!((m, x), (0x7FFF, 0x7FFF));
                } else if fh.is_nan() {
                    assert_eq!((m, x), (o, o));
                } else if fo.is_nan() {
                    assert_eq!((m, x), (h, h));
                } else {
                    assert!(f16_to_f64(m) <= fh.min(fo) && f16_to_f64(x) >= fh.max(fo));
                }
            }
        }
    }

    // ---- comparisons (9.3.1.2 "Floating Point Comparisons") ---------------------------------

    #[test]
    fn fp_compare() {
        let n = f32::NAN;
        use FCmp::*;
        for c in [Eq, Ne, Lt, Le, Gt, Ge, Num] {
            assert!(!cmp_f32(n, 1.0, c) && !cmp_f32(1.0, n, c), "{c:?}");
        }
        for c in [Equ, Neu, Ltu, Leu, Gtu, Geu, Nan] {
            assert!(cmp_f32(n, 1.0, c) && cmp_f32(1.0, n, c), "{c:?}");
        }
        assert!(cmp_f32(0.0, -0.0, Eq) && !cmp_f32(-0.0, 0.0, Lt));
        assert!(cmp_f32(1.0, 2.0, Lt) && cmp_f32(1.0, 2.0, Ltu) && !cmp_f32(1.0, 2.0, Geu));
        assert!(cmp_f32(1.0, 2.0, Num) && !cmp_f32(1.0, 2.0, Nan));
        assert!(cmp_f64(1.0, 1.0, Le) && cmp_f64(1.0, 1.0, Ge) && !cmp_f64(1.0, 1.0, Ne));
        assert!(cmp_f16(0x3C00, 0x4000, Lt) && cmp_f16(0x7E00, 0x3C00, Neu) && !cmp_f16(0x7E00, 0x7E00, Eq));
        assert!(cmp_f16(0x8000, 0x0000, Eq));
        assert!(cmp_bf16(0xBF80, 0x3F80, Lt) && cmp_bf16(0x7FC0, 0x3F80, Gtu) && !cmp_bf16(0x7FC0, 0x3F80, Gt));
    }

    // ---- approximate instructions ----------------------------------------------------------

    fn ulp_err(got: f32, exact: f64) -> f64 {
        let u = if exact.abs() < f32::MIN_POSITIVE as f64 {
            2f64.powi(-149)
        } else {
            2f64.powi(exact.abs().log2().floor() as i32 - 23)
        };
        (got as f64 - exact).abs() / u
    }

    #[test]
    fn fp_approx_within_isa_bounds() {
        let mut x = -130.0f32;
        while x < 130.0 {
            let e = ex2_approx_f32(x, true);
            let exact = (x as f64).exp2();
            if exact >= f32::MIN_POSITIVE as f64 && exact < f32::MAX as f64 {
                assert!(ulp_err(e, exact) <= 2.0, "ex2 {x}");
            }
            x += 0.0137;
        }
        assert_eq!(ex2_approx_f32(f32::NEG_INFINITY, true), 0.0);
        assert_eq!(ex2_approx_f32(f32::INFINITY, true), f32::INFINITY);
        assert_eq!(ex2_approx_f32(-140.0, true), 0.0); // subnormal result flushed
        assert!(ex2_approx_f32(-140.0, false) > 0.0);
        assert_eq!(ex2_approx_f32(f32::from_bits(1), true), 1.0);
        let mut g = Rng(5);
        for _ in 0..100_000 {
            let v = rand_f32(&mut g, 1, 253).abs();
            assert!(ulp_err(rcp_approx_f32(v, false), 1.0 / v as f64) <= 1.0);
            assert!(ulp_err(rsqrt_approx_f32(v, false), 1.0 / (v as f64).sqrt()) <= 1.0);
            assert!(ulp_err(sqrt_approx_f32(v, false), (v as f64).sqrt()) <= 1.0);
            // lg2: absolute error 2^-22 (ISA bound is 2^-22.6 / a few ulp)
            assert!(
                (lg2_approx_f32(v, false) as f64 - (v as f64).log2()).abs()
                    <= 2f64.powi(-22).max((v as f64).log2().abs() * 2f64.powi(-22))
            );
            let w = rand_f32(&mut g, 1, 253);
            let q = w as f64 / v as f64;
            if q.abs() >= f32::MIN_POSITIVE as f64 && q.abs() <= f32::MAX as f64 {
                assert!(ulp_err(div_approx_f32(w, v, false), q) <= 2.0);
                assert!(ulp_err(div_full_f32(w, v, false), q) <= 2.0);
            }
        }
        let mut t = -100.0 * std::f32::consts::PI;
        while t < 100.0 * std::f32::consts::PI {
            assert!((sin_approx_f32(t, false) as f64 - (t as f64).sin()).abs() <= 2f64.powi(-20)); // ISA: 2^-20.9
            assert!((cos_approx_f32(t, false) as f64 - (t as f64).cos()).abs() <= 2f64.powi(-20));
            let th = tanh_approx_f32(t / 50.0);
            let ex = ((t / 50.0) as f64).tanh();
            assert!((th as f64 - ex).abs() <= ex.abs() * 2f64.powi(-11) + 1e-38); // ISA: 2^-10.987
            t += 0.01;
        }
        assert!(sin_approx_f32(f32::INFINITY, false).is_nan());
        assert_eq!(lg2_approx_f32(0.0, false), f32::NEG_INFINITY);
        assert!(lg2_approx_f32(-1.0, false).is_nan());
        assert_eq!(rcp_approx_f32(-0.0, false), f32::NEG_INFINITY);
        assert_eq!(rsqrt_approx_f32(-0.0, false), f32::NEG_INFINITY);
        assert_eq!(rsqrt_approx_f32(f32::INFINITY, false), 0.0);
        assert_eq!(sqrt_approx_f32(-0.0, false).to_bits(), 0x8000_0000);
        // rcp/rsqrt.approx.ftz.f64: only a[63:32] is used, d[31:0] = 0, NaN → 0x7fffffff00000000
        assert_eq!(rcp_approx_ftz_f64(2.0), 0.5);
        assert_eq!(rcp_approx_ftz_f64(3.0).to_bits() & 0xFFFF_FFFF, 0);
        assert!((rcp_approx_ftz_f64(3.0) - 1.0 / 3.0).abs() < 1e-6);
        assert_eq!(rcp_approx_ftz_f64(f64::NAN).to_bits(), 0x7FFF_FFFF_0000_0000);
        assert_eq!(rcp_approx_ftz_f64(-5e-324), f64::NEG_INFINITY);
        assert_eq!(rcp_approx_ftz_f64(f64::INFINITY), 0.0);
        assert_eq!(rsqrt_approx_ftz_f64(4.0), 0.5);
        assert_eq!(rsqrt_approx_ftz_f64(-0.0), f64::NEG_INFINITY);
        assert!(rsqrt_approx_ftz_f64(-1.0).is_nan());
        assert_eq!(rsqrt_approx_ftz_f64(f64::INFINITY), 0.0);
        assert_eq!(rsqrt_approx_f64(0.25), 2.0);
        assert!(tanh_approx_f32(f32::NEG_INFINITY) == -1.0 && tanh_approx_f32(-0.0).to_bits() == 0x8000_0000);
        assert_eq!(cos_approx_f32(-0.0, false), 1.0);
        assert_eq!(ex2_approx_f32(-0.0, false), 1.0);
    }

    // ---- mma helper ("Matrix multiply-accumulate operation using mma instruction") --------

    #[test]
    fn fp_dot_exact() {
        // exact where f64 summation is not: 2^120 + 2^-120 - 2^120 = 2^-120
        let big = 2f32.powi(60);
        assert_eq!(dot_f32_acc(&[big, 1.0, -big], &[big, 2f32.powi(-120), big], 0.0), 2f32.powi(-120));
        // bf16-like extremes: products at 2^-266 only matter as sticky
        let tiny = f32::from_bits(1 << 16); // 2^-133, the bf16 minimum subnormal
        let one_plus = dot_f32_acc(&[1.0, tiny], &[1.0, tiny], 2f32.powi(-24));
        assert_eq!(one_plus, 1.0 + 2f32.powi(-23)); // tie 1 + 2^-24 broken upward by 2^-266
        assert_eq!(dot_f32_acc(&[1.0], &[1.0], 2f32.powi(-24)), 1.0);
        assert_eq!(dot_f32_acc(&[-0.0, 0.0], &[1.0, -1.0], -0.0).to_bits(), 0x8000_0000);
        assert_eq!(dot_f32_acc(&[0.0, 0.0], &[1.0, -1.0], -0.0).to_bits(), 0);
        assert_eq!(dot_f32_acc(&[1.0, -1.0], &[1.0, 1.0], -0.0).to_bits(), 0);
        assert!(dot_f32_acc(&[f32::INFINITY], &[0.0], 1.0).is_nan());
        assert!(dot_f32_acc(&[f32::INFINITY, 1.0], &[1.0, f32::NEG_INFINITY], 1.0).is_nan());
        assert_eq!(dot_f32_acc(&[f32::INFINITY], &[-1.0], 1.0), f32::NEG_INFINITY);
        assert_eq!(dot_f32_acc(&[f32::MAX, f32::MAX], &[2.0, -2.0], 3.0), 3.0);
        // random f16 data with a narrow exponent range: the f64 sum is exact, then RN to f32
        let mut g = Rng(2024);
        for _ in 0..20_000 {
            let mut a = [0f32; 16];
            let mut b = [0f32; 16];
            for k in 0..16 {
                a[k] = f16_to_f32((g.next() as u16 & 0x83FF) | (0x3000 + (g.next() as u16 % 8) * 0x0400));
                b[k] = f16_to_f32((g.next() as u16 & 0x83FF) | (0x3000 + (g.next() as u16 % 8) * 0x0400));
            }
            let c = f16_to_f32(g.next() as u16 & 0xBFFF);
            let mut s = c as f64;
            for k in 0..16 {
                s += a[k] as f64 * b[k] as f64;
            }
            assert_eq!(dot_f32_acc(&a, &b, c), s as f32);
        }
    }
}
