//! The PTX front end: a lexer and a parser for the PTX that nvcc emits (ISA 9.x), producing an
//! AST ([`ast`]) that keeps every instruction's `.loc` source position.
//!
//! Accepted beyond the plain grammar, as nvcc writes it: `.loc`/`.file` lines without a `;`,
//! `.section .debug_*` blocks (skipped), `.pragma`, nested `{ }` scopes with their own `.reg`
//! declarations (inline asm), vector operands, `%r|%p` destination pairs, `[%rd+-16]`.

pub mod ast;
pub mod lexer;
pub mod parser;

pub use ast::*;
pub use parser::parse;
