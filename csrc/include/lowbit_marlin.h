/* Marlin W4A16 (DESIGN §3 Marlin layout, §4 GEMM). */
#ifndef LOWBIT_MARLIN_H
#define LOWBIT_MARLIN_H

#include <stdint.h>

/* A Marlin tile: 16 K-rows x 64 N-columns, 128 int32 words. */
#define LOWBIT_MARLIN_TILE_K 16
#define LOWBIT_MARLIN_TILE_N 64
#define LOWBIT_MARLIN_TILE_WORDS 128

#endif
