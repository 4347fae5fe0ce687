// Marlin W4A16 GEMM.
