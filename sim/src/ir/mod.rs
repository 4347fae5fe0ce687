//! The executable form of a PTX module: kernels with typed instructions over dense registers.
//!
//! Every operand is a register index: immediates and symbol addresses become constant registers
//! and special registers (`%tid.x`, ...) become registers the executor fills when a warp starts,
//! so the executor's lane loops never branch on operand kinds. Virtual registers are compacted by
//! liveness ([`regalloc`]): a Marlin kernel that declares 7362 needs a few hundred.

pub mod lower;
pub mod regalloc;

use std::sync::Arc;

use crate::ptx::ast::Loc;
use crate::Result;

/// A register index into a warp's register file (`regs[r * 32 + lane]`, 64 bits per lane).
pub type R = u32;

/// A kernel parameter: where its bytes go in the parameter buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub offset: usize,
    pub size: usize,
    pub align: usize,
}

/// Base of the parameter window: `mov.b64 %rd, k_param_0` yields `PARAM_BASE + offset`.
pub const PARAM_BASE: u64 = 0x7d00_0000_0000;
/// Base of the shared window in the generic address space (`cvta.shared`).
pub const SHARED_GENERIC_BASE: u64 = 0x7c00_0000_0000;
/// Base of the local window in the generic address space (`cvta.local`): each thread sees its
/// own frame there.
pub const LOCAL_GENERIC_BASE: u64 = 0x7b00_0000_0000;

/// Integer and bit-string widths/signedness.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IntTy {
    pub bits: u8,
    pub signed: bool,
}

/// Floating-point formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FTy {
    F16,
    BF16,
    F16x2,
    BF16x2,
    F32,
    F64,
}

/// Scalar types of `cvt`, loads and stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Ty {
    Int(IntTy),
    F(FTy),
    Pred,
}

impl Ty {
    pub fn bits(self) -> u32 {
        match self {
            Ty::Int(i) => i.bits as u32,
            Ty::F(FTy::F16 | FTy::BF16) => 16,
            Ty::F(FTy::F16x2 | FTy::BF16x2 | FTy::F32) => 32,
            Ty::F(FTy::F64) => 64,
            Ty::Pred => 1,
        }
    }
}

/// Rounding modifiers (`.rn .rz .rm .rp` / `.rni .rzi .rmi .rpi`).
pub use crate::fp::{IRnd, Rnd};

/// Special registers filled per warp or read at run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Special {
    Tid(u8),
    Ntid(u8),
    Ctaid(u8),
    Nctaid(u8),
    LaneId,
    WarpId,
    NWarpId,
    SmId,
    NSmId,
    GridId,
    LaneMaskEq,
    LaneMaskLe,
    LaneMaskLt,
    LaneMaskGe,
    LaneMaskGt,
    DynamicSmemSize,
    TotalSmemSize,
    Clock,
    Clock64,
    GlobalTimer,
}

/// A memory address: `base` register (if any) plus a constant byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Addr {
    pub base: Option<R>,
    pub off: i64,
}

/// State spaces of memory instructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Global,
    Shared,
    Param,
    Local,
    Const,
    Generic,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IOp {
    Add,
    Sub,
    MulLo,
    MulHi,
    Div,
    Rem,
    Min,
    Max,
    And,
    Or,
    Xor,
    Shl,
    Shr,
    AddSat,
    SubSat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IUnOp {
    Not,
    Neg,
    Abs,
    Popc,
    Clz,
    Brev,
    Cnot,
    Bfind,
    BfindShift,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ICmp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

pub use crate::fp::FCmp;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmp {
    I(ICmp),
    F(FCmp),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BoolOp {
    And,
    Or,
    Xor,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FOp {
    Add,
    Sub,
    Mul,
    Div,
    Min,
    Max,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FUnOp {
    Abs,
    Neg,
    Sqrt,
    Rcp,
    RcpApprox,
    SqrtApprox,
    Rsqrt,
    Ex2,
    Lg2,
    Sin,
    Cos,
    Tanh,
}

/// Floating-point modifiers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FMods {
    pub rnd: Rnd,
    pub ftz: bool,
    pub sat: bool,
    pub relu: bool,
    /// `.NaN` on min/max.
    pub nan: bool,
    /// `.approx`/`.full` division.
    pub approx: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AtomOp {
    Add,
    Min,
    Max,
    Exch,
    Cas,
    And,
    Or,
    Xor,
    Inc,
    Dec,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShflMode {
    Up,
    Down,
    Bfly,
    Idx,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VoteMode {
    All,
    Any,
    Uni,
    Ballot,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    Sync,
    Arrive,
    RedPopc,
    RedAnd,
    RedOr,
}

/// Element types of `mma.sync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MmaTy {
    F16,
    BF16,
    F32,
}

/// One executable operation. Register lists are fixed arrays with a length, to keep `Op` small
/// and free of heap pointers.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Nop,
    /// `mov` (also of constants and specials): `d = a`, masked to `bits`.
    Mov {
        d: R,
        a: R,
        bits: u8,
    },
    /// Packs `n` parts of `part` bits (first part lowest) into `d`.
    Pack {
        d: R,
        parts: [R; 8],
        n: u8,
        part: u8,
    },
    /// Splits `a` into `n` parts of `part` bits (first part lowest).
    Unpack {
        ds: [R; 8],
        n: u8,
        part: u8,
        a: R,
    },
    IBin {
        op: IOp,
        t: IntTy,
        d: R,
        a: R,
        b: R,
    },
    IUn {
        op: IUnOp,
        t: IntTy,
        d: R,
        a: R,
    },
    /// `mul.wide`: `d` has twice the bits of `t`.
    MulWide {
        t: IntTy,
        d: R,
        a: R,
        b: R,
    },
    /// `mad.{lo,hi,wide}` (`mode` 0 lo, 1 hi, 2 wide); `sat` for `.hi.sat.s32`.
    Mad {
        mode: u8,
        t: IntTy,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    /// `mul24`/`mad24` (lo only).
    Mad24 {
        t: IntTy,
        d: R,
        a: R,
        b: R,
        c: Option<R>,
    },
    /// `dp4a` (`two` false) / `dp2a.lo|hi`: `d = c + Σ a.part[i] · b.byte[i]`, parts sign- or
    /// zero-extended by each operand's type.
    Dp {
        two: bool,
        hi: bool,
        sa: bool,
        sb: bool,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    Bfe {
        t: IntTy,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    Bfi {
        bits: u8,
        d: R,
        f: R,
        b: R,
        c: R,
        e: R,
    },
    /// `prmt.b32` generic mode (`mode` 0) or `.f4e .b4e .rc8 .ecl .ecr .rc16` (1..=6).
    Prmt {
        mode: u8,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    Lop3 {
        d: R,
        a: R,
        b: R,
        c: R,
        lut: u8,
    },
    /// `shf.{l,r}.{wrap,clamp}.b32`.
    Shf {
        left: bool,
        clamp: bool,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    /// `setp`: `p = cmp(a, b) [bop c]`, `q = !cmp(a, b) [bop c]`.
    Setp {
        cmp: Cmp,
        t: Ty,
        ftz: bool,
        p: R,
        q: Option<R>,
        a: R,
        b: R,
        bop: Option<(BoolOp, R, bool)>,
    },
    /// `set`: 0xFFFFFFFF / 1.0f for true in the destination type.
    Set {
        cmp: Cmp,
        t: Ty,
        dt: Ty,
        d: R,
        a: R,
        b: R,
    },
    /// `selp`: `d = c ? a : b`.
    Selp {
        d: R,
        a: R,
        b: R,
        c: R,
    },
    /// `slct`: `d = c >= 0 ? a : b`.
    Slct {
        d: R,
        a: R,
        b: R,
        c: R,
        cf32: bool,
    },
    /// Predicate logic: `and/or/xor/not.pred` (`b` unused for Not).
    PredOp {
        op: u8,
        d: R,
        a: R,
        b: R,
    },
    FBin {
        op: FOp,
        t: FTy,
        m: FMods,
        d: R,
        a: R,
        b: R,
    },
    FUn {
        op: FUnOp,
        t: FTy,
        m: FMods,
        d: R,
        a: R,
    },
    Fma {
        t: FTy,
        m: FMods,
        d: R,
        a: R,
        b: R,
        c: R,
    },
    /// Copysign(a, b) for f32/f64.
    Copysign {
        t: FTy,
        d: R,
        a: R,
        b: R,
    },
    Testp {
        t: FTy,
        kind: u8,
        d: R,
        a: R,
    },
    Cvt {
        dt: Ty,
        st: Ty,
        rnd: Option<Rnd>,
        irnd: Option<IRnd>,
        ftz: bool,
        sat: bool,
        relu: bool,
        satfinite: bool,
        d: R,
        a: R,
    },
    /// `cvt.rn{.relu}{.satfinite}.{f16x2,bf16x2}.f32 d, a, b`: `d[31:16] = cvt(a)`, `d[15:0] = cvt(b)`.
    CvtPack {
        bf: bool,
        rnd: Rnd,
        relu: bool,
        satfinite: bool,
        d: R,
        a: R,
        b: R,
    },
    /// Generic ↔ state-space addresses.
    Cvta {
        to: bool,
        space: Space,
        d: R,
        a: R,
    },
    /// Run-time special registers (`%clock`, `%globaltimer`).
    ReadSpecial {
        d: R,
        s: Special,
    },
    Ld {
        space: Space,
        t: Ty,
        n: u8,
        ds: [R; 4],
        addr: Addr,
        volatile: bool,
    },
    St {
        space: Space,
        t: Ty,
        n: u8,
        srcs: [R; 4],
        addr: Addr,
    },
    Atom {
        space: Space,
        op: AtomOp,
        t: Ty,
        d: Option<R>,
        addr: Addr,
        b: R,
        c: Option<R>,
    },
    CpAsync {
        cp_size: u8,
        dst: Addr,
        src: Addr,
        src_size: Option<R>,
        ignore: Option<(R, bool)>,
    },
    CpAsyncCommit,
    CpAsyncWait {
        n: u32,
    },
    Ldmatrix {
        num: u8,
        trans: bool,
        ds: [R; 4],
        addr: Addr,
    },
    Stmatrix {
        num: u8,
        trans: bool,
        srcs: [R; 4],
        addr: Addr,
    },
    /// `mma.sync.aligned.{m16n8k16,m16n8k8}.row.col`.
    Mma {
        k: u8,
        ab: MmaTy,
        cd: MmaTy,
        ds: [R; 4],
        a: [R; 4],
        b: [R; 2],
        c: [R; 4],
    },
    Shfl {
        mode: ShflMode,
        d: R,
        p: Option<R>,
        a: R,
        b: R,
        c: R,
        mask: R,
    },
    Vote {
        mode: VoteMode,
        d: R,
        a: R,
        neg: bool,
        mask: R,
    },
    Match {
        all: bool,
        t: IntTy,
        d: R,
        p: Option<R>,
        a: R,
        mask: R,
    },
    Redux {
        op: AtomOp,
        t: IntTy,
        d: R,
        a: R,
        mask: R,
    },
    Activemask {
        d: R,
    },
    Bar {
        kind: BarKind,
        aligned: bool,
        id: R,
        count: Option<R>,
        d: Option<R>,
        p: Option<(R, bool)>,
    },
    BarWarp {
        mask: R,
    },
    Fence,
    Bra {
        target: u32,
        uni: bool,
    },
    Ret,
    Exit,
    Trap,
    Nanosleep {
        a: R,
    },
    /// `createpolicy`: a no-op that returns an opaque value.
    CreatePolicy {
        d: R,
    },
    /// A prefetch or cache-control instruction: no effect.
    Prefetch,
}

/// Classes the profile counts warp-instructions in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    Int,
    /// `mov` (registers, immediates, special registers) and the vector pack/unpack forms of
    /// `mov`: data movement a compiler folds into operands.
    Move,
    Fp32,
    Half2,
    Convert,
    Mma,
    Global,
    Shared,
    Control,
    Sync,
}

/// One instruction: the operation, its guard predicate, its profile class.
#[derive(Clone, Debug)]
pub struct Inst {
    pub op: Op,
    /// `@p` (false) or `@!p` (true).
    pub guard: Option<(R, bool)>,
    pub class: Class,
}

/// A loaded kernel (`.entry`).
#[derive(Debug)]
pub struct Kernel {
    pub name: String,
    pub params: Vec<Param>,
    /// Size of the parameter buffer (all params laid out with their alignment).
    pub param_bytes: usize,
    /// `.maxntid` (or `.reqntid`), if declared.
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
    /// Bytes of statically declared `.shared` memory the kernel uses.
    pub static_smem: usize,
    /// Bytes of `.local` memory per thread (stack frames, spills).
    pub local_bytes: usize,
    /// Where dynamic (extern) shared memory starts in the shared window.
    pub dyn_smem_base: usize,
    pub code: Vec<Inst>,
    /// Source position and PTX text of each instruction, for reports.
    pub locs: Vec<Loc>,
    pub texts: Vec<String>,
    /// Registers per lane after compaction.
    pub nregs: usize,
    /// Declared virtual registers (before compaction).
    pub virtual_regs: usize,
    /// Registers holding constants, set when a warp starts.
    pub consts: Vec<(R, u64)>,
    /// Registers holding special registers, set when a warp starts.
    pub specials: Vec<(R, Special)>,
    /// The first instruction the simulator does not implement, if any: launching the kernel
    /// fails with this report.
    pub unsupported: Option<String>,
    /// Source file names by `.file` number.
    pub files: Arc<Vec<(u32, String)>>,
}

impl Kernel {
    /// `file:line` of instruction `pc`.
    pub fn where_(&self, pc: usize) -> String {
        let loc = self.locs.get(pc).copied().unwrap_or_default();
        let file = self.files.iter().find(|(n, _)| *n == loc.file).map_or("?", |(_, f)| f.as_str());
        format!("{file}:{}", loc.line)
    }

    /// One line about the kernel, for tools.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} instructions, {} registers ({} virtual, {} constants), {} B static shared, params {} B{}",
            self.name,
            self.code.len(),
            self.nregs,
            self.virtual_regs,
            self.consts.len(),
            self.static_smem,
            self.param_bytes,
            self.unsupported.as_ref().map_or(String::new(), |u| format!(", UNSUPPORTED: {u}"))
        )
    }
}

/// A loaded module.
#[derive(Debug, Default)]
pub struct Module {
    pub kernels: Vec<Arc<Kernel>>,
}

impl Module {
    /// Parses and lowers PTX text. Syntax errors are `CUDA_ERROR_INVALID_PTX`; an instruction the
    /// simulator does not implement fails the launch of the kernel containing it (with the
    /// instruction and its source line), so the module's other kernels stay usable.
    pub fn from_ptx(text: &str) -> Result<Module> {
        let ast = crate::ptx::parse(text)?;
        Self::from_ast(&ast)
    }

    /// Lowers a parsed module.
    pub fn from_ast(ast: &crate::ptx::Module) -> Result<Module> {
        lower::lower_module(ast)
    }

    pub fn kernel(&self, name: &str) -> Option<&Arc<Kernel>> {
        self.kernels.iter().find(|k| k.name == name)
    }
}
