//! Tokens of PTX text. Comments are dropped; every token keeps its line number, because
//! `.loc` and `.file` directives end at the end of their line rather than at a `;`.

use crate::{Result, SimError};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Tok<'a> {
    /// Identifiers, directives (`.reg`), opcodes with modifiers (`ld.global.u32`), registers
    /// (`%r1`, `%tid.x`), labels (`$L__BB0_1`).
    Ident(&'a str),
    Int(i128),
    F32(u32),
    F64(u64),
    /// `9.0` (only in `.version`).
    Dotted(&'a str),
    Str(&'a str),
    Punct(u8),
}

#[derive(Clone, Copy, Debug)]
pub struct Token<'a> {
    pub tok: Tok<'a>,
    pub line: u32,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || matches!(c, b'_' | b'$' | b'%' | b'.')
}
fn ident_cont(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'_' | b'$' | b'.')
}

/// Splits PTX text into tokens.
pub fn lex(src: &str) -> Result<Vec<Token<'_>>> {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(src.len() / 4);
    let (mut i, mut line) = (0usize, 1u32);
    while i < b.len() {
        let c = b[i];
        match c {
            b'\n' => {
                line += 1;
                i += 1;
            }
            b' ' | b'\t' | b'\r' | 0 => i += 1,
            b'/' if b.get(i + 1) == Some(&b'/') => {
                while i < b.len() && b[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if b.get(i + 1) == Some(&b'*') => {
                i += 2;
                while i + 1 < b.len() && !(b[i] == b'*' && b[i + 1] == b'/') {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                i += 2;
            }
            b'"' => {
                let s = i + 1;
                i += 1;
                while i < b.len() && b[i] != b'"' {
                    if b[i] == b'\n' {
                        line += 1;
                    }
                    i += 1;
                }
                out.push(Token { tok: Tok::Str(&src[s..i.min(b.len())]), line });
                i += 1;
            }
            b'0'..=b'9' => {
                let s = i;
                if c == b'0'
                    && matches!(b.get(i + 1), Some(b'f' | b'F' | b'd' | b'D'))
                    && b.get(i + 2).is_some_and(|c| c.is_ascii_hexdigit())
                {
                    let dbl = matches!(b[i + 1], b'd' | b'D');
                    i += 2;
                    let hs = i;
                    while i < b.len() && b[i].is_ascii_hexdigit() {
                        i += 1;
                    }
                    let hex = &src[hs..i];
                    let v = u64::from_str_radix(hex, 16)
                        .map_err(|_| err(line, format!("bad float literal {}", &src[s..i])))?;
                    out.push(Token { tok: if dbl { Tok::F64(v) } else { Tok::F32(v as u32) }, line });
                    continue;
                }
                let (radix, start) = if c == b'0' && matches!(b.get(i + 1), Some(b'x' | b'X')) {
                    (16, i + 2)
                } else if c == b'0' && matches!(b.get(i + 1), Some(b'b' | b'B')) {
                    (2, i + 2)
                } else if c == b'0' && b.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                    (8, i + 1)
                } else {
                    (10, i)
                };
                i = start;
                while i < b.len() && (b[i].is_ascii_hexdigit()) {
                    i += 1;
                }
                if radix == 10 && b.get(i) == Some(&b'.') && b.get(i + 1).is_some_and(|c| c.is_ascii_digit()) {
                    i += 1;
                    while i < b.len() && b[i].is_ascii_digit() {
                        i += 1;
                    }
                    out.push(Token { tok: Tok::Dotted(&src[s..i]), line });
                    continue;
                }
                let digits = &src[start..i];
                let v = i128::from_str_radix(digits, radix)
                    .map_err(|_| err(line, format!("bad integer literal {}", &src[s..i])))?;
                if matches!(b.get(i), Some(b'U' | b'u')) {
                    i += 1;
                }
                out.push(Token { tok: Tok::Int(v), line });
            }
            c if ident_start(c) => {
                let s = i;
                i += 1;
                loop {
                    while i < b.len() && ident_cont(b[i]) {
                        i += 1;
                    }
                    // Qualifiers with `::` inside opcodes and directives: `.shared::cta`,
                    // `.L2::cache_hint`, `createpolicy.fractional.L2::evict_first`, `.L2::128B`.
                    if b.get(i) == Some(&b':')
                        && b.get(i + 1) == Some(&b':')
                        && b.get(i + 2).is_some_and(|c| ident_cont(*c))
                    {
                        i += 2;
                        continue;
                    }
                    break;
                }
                out.push(Token { tok: Tok::Ident(&src[s..i]), line });
            }
            b'{' | b'}' | b'[' | b']' | b'(' | b')' | b',' | b';' | b':' | b'+' | b'-' | b'|' | b'!' | b'@' | b'<'
            | b'>' | b'=' => {
                out.push(Token { tok: Tok::Punct(c), line });
                i += 1;
            }
            _ => return Err(err(line, format!("unexpected character {:?}", c as char))),
        }
    }
    Ok(out)
}

fn err(line: u32, msg: String) -> SimError {
    SimError::invalid_ptx(format!("PTX line {line}: {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        let t =
            lex("ld.global.nc.v4.u32 {%r1,%r2}, [%rd3+-16]; // c\n mov.f32 %f1, 0f3F800000; 0x80008000U .version 9.0 cp.async.cg.shared.global.L2::128B $L__BB0_1:")
                .unwrap();
        let k: Vec<Tok> = t.iter().map(|t| t.tok).collect();
        assert_eq!(k[0], Tok::Ident("ld.global.nc.v4.u32"));
        assert!(k.contains(&Tok::F32(0x3F80_0000)));
        assert!(k.contains(&Tok::Int(0x8000_8000)));
        assert!(k.contains(&Tok::Dotted("9.0")));
        assert_eq!(t.last().unwrap().line, 2);
        assert!(k.contains(&Tok::Ident("cp.async.cg.shared.global.L2::128B")));
        assert_eq!(k[k.len() - 2..], [Tok::Ident("$L__BB0_1"), Tok::Punct(b':')]);
    }
}
