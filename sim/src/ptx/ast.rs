//! The PTX syntax tree.

/// A source position from `.loc file line col`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loc {
    pub file: u32,
    pub line: u32,
}

/// A parsed module.
#[derive(Debug, Default)]
pub struct Module {
    pub version: (u32, u32),
    pub target: Vec<String>,
    pub address_size: u32,
    /// `.file N "path"`.
    pub files: Vec<(u32, String)>,
    /// Module-scope variables (`.shared`, `.global`, `.const`).
    pub vars: Vec<VarDecl>,
    pub entries: Vec<Entry>,
    /// `.func` definitions are recognised and reported as unsupported by the lowering.
    pub funcs: Vec<String>,
}

/// A state space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Space {
    Reg,
    Param,
    Shared,
    Global,
    Local,
    Const,
    Generic,
}

/// A variable declaration (`.shared .align 16 .b8 name[4096];`, `.extern .shared ... name[];`).
#[derive(Clone, Debug)]
pub struct VarDecl {
    pub space: Space,
    pub name: String,
    pub align: u32,
    /// Element size in bytes.
    pub elem: u32,
    /// Number of elements (`None` for `[]`, i.e. extern dynamic shared memory).
    pub count: Option<u64>,
    pub external: bool,
}

impl VarDecl {
    pub fn bytes(&self) -> u64 {
        self.elem as u64 * self.count.unwrap_or(0)
    }
}

/// A kernel parameter.
#[derive(Clone, Debug)]
pub struct ParamDecl {
    pub name: String,
    pub align: u32,
    pub size: u32,
}

/// A `.entry`.
#[derive(Debug, Default)]
pub struct Entry {
    pub name: String,
    pub params: Vec<ParamDecl>,
    pub maxntid: Option<[u32; 3]>,
    pub reqntid: Option<[u32; 3]>,
    pub minnctapersm: Option<u32>,
    pub body: Vec<Stmt>,
    pub loc: Loc,
}

/// A register declaration: `.reg .b32 %r<57>;` (a range) or `.reg .b32 c, d;`.
#[derive(Clone, Debug)]
pub struct RegDecl {
    pub ty: String,
    /// (name, count): `count` registers named `name0..name{count-1}` for `%r<57>`, or one named
    /// `name` when `count` is `None`.
    pub names: Vec<(String, Option<u32>)>,
}

/// A body statement.
#[derive(Clone, Debug)]
pub enum Stmt {
    Reg(RegDecl),
    Var(VarDecl),
    Label(String),
    Inst(Inst),
    Open,
    Close,
}

/// An instruction.
#[derive(Clone, Debug)]
pub struct Inst {
    /// `@%p` / `@!%p`.
    pub guard: Option<(bool, String)>,
    /// The whole opcode with its modifiers, e.g. `ld.global.nc.v4.u32`.
    pub opcode: String,
    pub operands: Vec<Operand>,
    pub loc: Loc,
}

/// An operand.
#[derive(Clone, Debug, PartialEq)]
pub enum Operand {
    Reg(String),
    /// `!%p`.
    NotReg(String),
    /// Integer literal (two's complement bits; the lowering narrows it).
    Imm(i128),
    /// `0fXXXXXXXX`.
    F32(u32),
    /// `0dXXXXXXXXXXXXXXXX`.
    F64(u64),
    /// A decimal floating-point literal (`1.0`), as written.
    Dec(String),
    /// A symbol (variable, parameter, label).
    Sym(String),
    /// `[base+offset]`; base is a register or a symbol (or absent for `[imm]`).
    Addr(Option<Box<Operand>>, i64),
    /// `{a, b, ...}`.
    Vec(Vec<Operand>),
    /// `%r|%p`.
    Pair(Box<Operand>, Box<Operand>),
    /// `_`.
    Sink,
}
