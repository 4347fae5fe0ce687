//! The Marlin W4A16 GEMM (DESIGN §4): tile-config selection, workspace, `MarlinLinear`.
