//! PTX lexer and parser.
