/* lowbit: the C ABI shared between the CUDA kernels (csrc/) and Rust (src/ffi/bindings.rs,
 * generated from this header by bindgen; see build.rs).
 *
 * Every kernel takes one parameter struct by value. Pointers are device pointers. Sizes and
 * element offsets that can exceed 2^31 are 64-bit. */
#ifndef LOWBIT_H
#define LOWBIT_H

#include "lowbit_quant.h"
#include "lowbit_marlin.h"
#include "lowbit_moe.h"

#endif
