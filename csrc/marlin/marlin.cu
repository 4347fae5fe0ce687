// The Marlin kernel family: layout kernels (repack, scale permutation, inverses, the one-pass
// BF16 -> Marlin weight-sync path) and the W4A16 GEMM (dense and MoE).
#include "lowbit.h"
#include "lowbit_common.cuh"

#include "layout.cuh"
#include "gemm.cuh"
