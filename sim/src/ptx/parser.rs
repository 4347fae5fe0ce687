//! PTX text → [`Module`].

use super::ast::*;
use super::lexer::{lex, Tok, Token};
use crate::{Result, SimError};

struct P<'a> {
    t: Vec<Token<'a>>,
    i: usize,
    loc: Loc,
}

/// Parses a PTX module.
pub fn parse(src: &str) -> Result<Module> {
    let mut p = P { t: lex(src)?, i: 0, loc: Loc::default() };
    p.module()
}

fn ty_size(ty: &str) -> Option<u32> {
    Some(match ty {
        ".b8" | ".u8" | ".s8" => 1,
        ".b16" | ".u16" | ".s16" | ".f16" | ".bf16" => 2,
        ".b32" | ".u32" | ".s32" | ".f32" | ".f16x2" | ".bf16x2" => 4,
        ".b64" | ".u64" | ".s64" | ".f64" => 8,
        ".b128" => 16,
        ".pred" => 1,
        _ => return None,
    })
}

impl<'a> P<'a> {
    fn peek(&self) -> Option<Tok<'a>> {
        self.t.get(self.i).map(|t| t.tok)
    }
    fn peek_at(&self, k: usize) -> Option<Tok<'a>> {
        self.t.get(self.i + k).map(|t| t.tok)
    }
    fn line(&self) -> u32 {
        self.t.get(self.i).or(self.t.last()).map_or(0, |t| t.line)
    }
    fn next(&mut self) -> Result<Tok<'a>> {
        let t = self.peek().ok_or_else(|| self.err("unexpected end of PTX"))?;
        self.i += 1;
        Ok(t)
    }
    fn err(&self, msg: impl std::fmt::Display) -> SimError {
        SimError::invalid_ptx(format!("PTX line {}: {msg}", self.line()))
    }
    fn eat(&mut self, c: u8) -> bool {
        if self.peek() == Some(Tok::Punct(c)) {
            self.i += 1;
            true
        } else {
            false
        }
    }
    fn expect(&mut self, c: u8) -> Result<()> {
        if self.eat(c) {
            Ok(())
        } else {
            Err(self.err(format!("expected `{}`, found {:?}", c as char, self.peek())))
        }
    }
    fn ident(&mut self) -> Result<&'a str> {
        match self.next()? {
            Tok::Ident(s) => Ok(s),
            t => Err(self.err(format!("expected a name, found {t:?}"))),
        }
    }
    fn int(&mut self) -> Result<i128> {
        let neg = self.eat(b'-');
        match self.next()? {
            Tok::Int(v) => Ok(if neg { -v } else { v }),
            t => Err(self.err(format!("expected an integer, found {t:?}"))),
        }
    }
    /// Skips the rest of the current source line (for `.loc`, `.file` without `;`).
    fn skip_line(&mut self, line: u32) {
        while self.t.get(self.i).is_some_and(|t| t.line == line) {
            self.i += 1;
        }
    }
    fn skip_braces(&mut self) -> Result<()> {
        while !self.eat(b'{') {
            self.next()?;
        }
        let mut depth = 1;
        while depth > 0 {
            match self.next()? {
                Tok::Punct(b'{') => depth += 1,
                Tok::Punct(b'}') => depth -= 1,
                _ => {}
            }
        }
        Ok(())
    }

    fn module(&mut self) -> Result<Module> {
        let mut m = Module::default();
        while let Some(t) = self.peek() {
            let line = self.line();
            match t {
                Tok::Ident(".version") => {
                    self.i += 1;
                    match self.next()? {
                        Tok::Dotted(v) => {
                            let (a, b) = v.split_once('.').unwrap_or((v, "0"));
                            m.version = (a.parse().unwrap_or(0), b.parse().unwrap_or(0));
                        }
                        Tok::Int(v) => m.version = (v as u32, 0),
                        t => return Err(self.err(format!("bad .version {t:?}"))),
                    }
                }
                Tok::Ident(".target") => {
                    self.i += 1;
                    m.target.push(self.ident()?.to_string());
                    while self.eat(b',') {
                        m.target.push(self.ident()?.to_string());
                    }
                }
                Tok::Ident(".address_size") => {
                    self.i += 1;
                    m.address_size = self.int()? as u32;
                }
                Tok::Ident(".file") => {
                    self.i += 1;
                    let n = self.int()? as u32;
                    if let Some(Tok::Str(s)) = self.peek() {
                        m.files.push((n, s.to_string()));
                    }
                    self.skip_line(line);
                }
                Tok::Ident(".loc") => self.skip_line(line),
                Tok::Ident(".section") => self.skip_braces()?,
                Tok::Ident(".pragma") => {
                    while !self.eat(b';') {
                        self.next()?;
                    }
                }
                Tok::Ident(".visible" | ".weak" | ".extern" | ".entry" | ".func") if self.is_function_ahead() => {
                    self.function(&mut m)?;
                }
                Tok::Ident(".extern" | ".visible" | ".weak" | ".shared" | ".global" | ".const") => {
                    let v = self.var_decl()?;
                    m.vars.push(v);
                }
                t => return Err(self.err(format!("unexpected {t:?} at module scope"))),
            }
        }
        Ok(m)
    }

    fn is_function_ahead(&self) -> bool {
        (0..4).any(|k| matches!(self.peek_at(k), Some(Tok::Ident(".entry" | ".func"))))
    }

    fn function(&mut self, m: &mut Module) -> Result<()> {
        let line = self.line();
        loop {
            match self.ident()? {
                ".visible" | ".weak" | ".extern" => continue,
                ".entry" => break,
                ".func" => {
                    // Device functions: recorded (and rejected by the lowering); the body is skipped.
                    let mut name = String::new();
                    while !matches!(self.peek(), Some(Tok::Punct(b'{' | b';'))) {
                        if let (Tok::Ident(s), Some(Tok::Punct(b'('))) = (self.next()?, self.peek()) {
                            if name.is_empty() && !s.starts_with('.') {
                                name = s.to_string();
                            }
                        }
                    }
                    if self.eat(b';') {
                        return Ok(());
                    }
                    self.skip_braces()?;
                    m.funcs.push(name);
                    return Ok(());
                }
                s => return Err(self.err(format!("unexpected {s} before .entry"))),
            }
        }
        let mut e = Entry { name: self.ident()?.to_string(), loc: Loc { file: 0, line }, ..Default::default() };
        if self.eat(b'(') {
            while !self.eat(b')') {
                e.params.push(self.param()?);
                self.eat(b',');
            }
        }
        // Performance directives.
        loop {
            match self.peek() {
                Some(Tok::Ident(d @ (".maxntid" | ".reqntid"))) => {
                    self.i += 1;
                    let mut v = [1u32; 3];
                    v[0] = self.int()? as u32;
                    for x in v.iter_mut().skip(1) {
                        if !self.eat(b',') {
                            break;
                        }
                        *x = self.int()? as u32;
                    }
                    if d == ".maxntid" {
                        e.maxntid = Some(v);
                    } else {
                        e.reqntid = Some(v);
                    }
                }
                Some(Tok::Ident(".minnctapersm")) => {
                    self.i += 1;
                    e.minnctapersm = Some(self.int()? as u32);
                }
                Some(Tok::Ident(
                    ".maxnreg" | ".maxnctapersm" | ".noreturn" | ".explicitcluster" | ".reqnctapercluster"
                    | ".maxclusterrank",
                )) => {
                    self.i += 1;
                    while matches!(self.peek(), Some(Tok::Int(_) | Tok::Punct(b','))) {
                        self.i += 1;
                    }
                }
                _ => break,
            }
        }
        self.expect(b'{')?;
        self.loc = Loc { file: 0, line: 0 };
        let mut depth = 1;
        while depth > 0 {
            let line = self.line();
            match self.peek().ok_or_else(|| self.err("unterminated .entry body"))? {
                Tok::Punct(b'{') => {
                    self.i += 1;
                    depth += 1;
                    e.body.push(Stmt::Open);
                }
                Tok::Punct(b'}') => {
                    self.i += 1;
                    depth -= 1;
                    if depth > 0 {
                        e.body.push(Stmt::Close);
                    }
                }
                Tok::Ident(".loc") => {
                    self.i += 1;
                    let f = self.int()? as u32;
                    let l = self.int()? as u32;
                    self.loc = Loc { file: f, line: l };
                    self.skip_line(line);
                }
                Tok::Ident(".pragma") => {
                    while !self.eat(b';') {
                        self.next()?;
                    }
                }
                Tok::Ident(".reg") => {
                    self.i += 1;
                    let mut ty = self.ident()?.to_string();
                    if ty.starts_with(".v") {
                        return Err(self.err("vector registers (.reg .v2 ...) are not supported"));
                    }
                    if ty == ".align" {
                        self.int()?;
                        ty = self.ident()?.to_string();
                    }
                    let mut names = Vec::new();
                    loop {
                        let n = self.ident()?.to_string();
                        if self.eat(b'<') {
                            let c = self.int()? as u32;
                            self.expect(b'>')?;
                            names.push((n, Some(c)));
                        } else {
                            names.push((n, None));
                        }
                        if !self.eat(b',') {
                            break;
                        }
                    }
                    self.expect(b';')?;
                    e.body.push(Stmt::Reg(RegDecl { ty, names }));
                }
                Tok::Ident(".shared" | ".local" | ".global" | ".const") => {
                    let v = self.var_decl()?;
                    e.body.push(Stmt::Var(v));
                }
                Tok::Ident(s) if self.peek_at(1) == Some(Tok::Punct(b':')) && !s.starts_with('.') => {
                    self.i += 2;
                    e.body.push(Stmt::Label(s.to_string()));
                }
                _ => {
                    let inst = self.inst()?;
                    e.body.push(Stmt::Inst(inst));
                }
            }
        }
        m.entries.push(e);
        Ok(())
    }

    fn param(&mut self) -> Result<ParamDecl> {
        let d = self.ident()?;
        if d != ".param" {
            return Err(self.err(format!("expected .param, found {d}")));
        }
        let mut align = 0;
        let mut ty = self.ident()?;
        loop {
            match ty {
                ".align" => {
                    align = self.int()? as u32;
                    ty = self.ident()?;
                }
                ".ptr" | ".global" | ".shared" | ".const" | ".local" => ty = self.ident()?,
                _ => break,
            }
        }
        let elem = ty_size(ty).ok_or_else(|| self.err(format!("unknown parameter type {ty}")))?;
        let name = self.ident()?.to_string();
        let mut count = 1;
        if self.eat(b'[') {
            count = self.int()? as u32;
            self.expect(b']')?;
        }
        Ok(ParamDecl { name, align: if align == 0 { elem } else { align }, size: elem * count })
    }

    fn var_decl(&mut self) -> Result<VarDecl> {
        let mut external = false;
        let mut space = None;
        let mut align = 0;
        let elem;
        loop {
            match self.ident()? {
                ".extern" => external = true,
                ".visible" | ".weak" => {}
                ".shared" => space = Some(Space::Shared),
                ".global" => space = Some(Space::Global),
                ".const" => space = Some(Space::Const),
                ".local" => space = Some(Space::Local),
                ".align" => align = self.int()? as u32,
                t if t.starts_with(".v") => return Err(self.err(format!("vector variables ({t}) are not supported"))),
                t if ty_size(t).is_some() => {
                    elem = ty_size(t).unwrap();
                    break;
                }
                t => return Err(self.err(format!("unexpected {t} in a variable declaration"))),
            }
        }
        let space = space.ok_or_else(|| self.err("variable without a state space"))?;
        let name = self.ident()?.to_string();
        let mut count = Some(1u64);
        while self.eat(b'[') {
            if self.eat(b']') {
                count = None;
            } else {
                let n = self.int()? as u64;
                self.expect(b']')?;
                count = count.map(|c| c * n);
            }
        }
        if self.eat(b'=') {
            return Err(self.err(format!("initialised variables ({name}) are not supported")));
        }
        self.expect(b';')?;
        Ok(VarDecl { space, name, align: if align == 0 { elem } else { align }, elem, count, external })
    }

    fn inst(&mut self) -> Result<Inst> {
        let loc = self.loc;
        let guard = if self.eat(b'@') {
            let neg = self.eat(b'!');
            Some((neg, self.ident()?.to_string()))
        } else {
            None
        };
        let opcode = self.ident()?.to_string();
        let mut operands = Vec::new();
        if !self.eat(b';') {
            loop {
                operands.push(self.operand()?);
                if self.eat(b';') {
                    break;
                }
                self.expect(b',')?;
            }
        }
        Ok(Inst { guard, opcode, operands, loc })
    }

    fn operand(&mut self) -> Result<Operand> {
        let op = match self.next()? {
            Tok::Punct(b'{') => {
                let mut v = Vec::new();
                if !self.eat(b'}') {
                    loop {
                        v.push(self.operand()?);
                        if self.eat(b'}') {
                            break;
                        }
                        self.expect(b',')?;
                    }
                }
                Operand::Vec(v)
            }
            Tok::Punct(b'[') => {
                let mut base = None;
                let mut off = 0i64;
                match self.peek() {
                    Some(Tok::Ident(s)) => {
                        self.i += 1;
                        base = Some(Box::new(if s.starts_with('%') {
                            Operand::Reg(s.to_string())
                        } else {
                            Operand::Sym(s.to_string())
                        }));
                    }
                    Some(Tok::Int(_) | Tok::Punct(b'-')) => off = self.int()? as i64,
                    t => return Err(self.err(format!("bad address {t:?}"))),
                }
                while self.eat(b'+') {
                    off += self.int()? as i64;
                }
                if self.peek() == Some(Tok::Punct(b'-')) {
                    off += self.int()? as i64;
                }
                self.expect(b']')?;
                Operand::Addr(base, off)
            }
            Tok::Punct(b'!') => Operand::NotReg(self.ident()?.to_string()),
            Tok::Punct(b'-') => match self.next()? {
                Tok::Int(v) => Operand::Imm(-v),
                Tok::F32(v) => Operand::F32(v ^ 0x8000_0000),
                Tok::F64(v) => Operand::F64(v ^ (1 << 63)),
                t => return Err(self.err(format!("bad operand -{t:?}"))),
            },
            Tok::Int(v) => Operand::Imm(v),
            Tok::Dotted(v) => Operand::Dec(v.to_string()),
            Tok::F32(v) => Operand::F32(v),
            Tok::F64(v) => Operand::F64(v),
            Tok::Ident("_") => Operand::Sink,
            Tok::Ident(s) if s.starts_with('%') => Operand::Reg(s.to_string()),
            Tok::Ident(s) => {
                if self.peek() == Some(Tok::Punct(b'+')) && matches!(self.peek_at(1), Some(Tok::Int(_))) {
                    self.i += 1;
                    let off = self.int()? as i64;
                    return Ok(Operand::Addr(Some(Box::new(Operand::Sym(s.to_string()))), off));
                }
                Operand::Sym(s.to_string())
            }
            t => return Err(self.err(format!("bad operand {t:?}"))),
        };
        if self.eat(b'|') {
            let p = self.operand()?;
            return Ok(Operand::Pair(Box::new(op), Box::new(p)));
        }
        Ok(op)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRC: &str = r#"
.version 9.0
.target sm_80
.address_size 64
.file 1 "/x/y.cu"
.shared .align 4 .b8 part[128];
.extern .shared .align 16 .b8 smem[];
.visible .entry k(
	.param .align 8 .b8 k_param_0[72]
)
.maxntid 256, 1, 1
{
	.reg .pred 	%p<25>;
	.reg .b32 	%r<57>;
	.loc	1 2 0
	.loc	2 59 5, function_name $L__info_string0, inlined_at 1 2 77
	ld.param.u64 	%rd25, [k_param_0+64];
	@%p1 bra 	$L__BB0_31;
	{ .reg .b32 c; mov.b32 c, 0xbf80bf80U; fma.rn.bf16x2 %r1,%r2,c,%r3;}
	ld.global.nc.v4.u32 {%r16,%r17,%r18,%r19}, [%rd35+-16];
	shfl.sync.bfly.b32	%r1|%p2, %r3, 16, 31, -1;
	mov.b32 %f1, {0,%rs2};
$L__BB0_31:
	ret;
}
.section .debug_str { $L__info_string0: .b8 95,90,0
}
"#;

    #[test]
    fn parses_nvcc_forms() {
        let m = parse(SRC).unwrap();
        assert_eq!(m.version, (9, 0));
        assert_eq!(m.vars.len(), 2);
        assert!(m.vars[1].external && m.vars[1].count.is_none());
        let e = &m.entries[0];
        assert_eq!(e.params[0].size, 72);
        assert_eq!(e.maxntid, Some([256, 1, 1]));
        let insts: Vec<&Inst> =
            e.body.iter().filter_map(|s| if let Stmt::Inst(i) = s { Some(i) } else { None }).collect();
        assert_eq!(insts[0].loc, Loc { file: 2, line: 59 });
        assert_eq!(insts[0].operands[1], Operand::Addr(Some(Box::new(Operand::Sym("k_param_0".into()))), 64));
        assert_eq!(insts[1].guard, Some((false, "%p1".into())));
        assert_eq!(insts[4].operands[1], Operand::Addr(Some(Box::new(Operand::Reg("%rd35".into()))), -16));
        assert!(matches!(insts[5].operands[0], Operand::Pair(..)));
        assert_eq!(insts[6].operands[1], Operand::Vec(vec![Operand::Imm(0), Operand::Reg("%rs2".into())]));
        assert!(e.body.iter().any(|s| matches!(s, Stmt::Open)));
        assert!(matches!(e.body.last(), Some(Stmt::Inst(i)) if i.opcode == "ret"));
    }
}
