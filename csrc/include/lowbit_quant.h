/* INT4 quantization (DESIGN §3): the symmetric QAT grid, compressed-tensors packing. */
#ifndef LOWBIT_QUANT_H
#define LOWBIT_QUANT_H

#include <stdint.h>

/* Largest code magnitude: q in [-7, 7] (15 levels; -8 is never produced). */
#define LOWBIT_QMAX 7
/* Offset of the stored unsigned nibble: u = q + 8. */
#define LOWBIT_QZERO 8
/* Lower bound of the f32 scale before rounding to the stored dtype. */
#define LOWBIT_MIN_SCALE 1e-5
/* INT4 values per packed int32 word. */
#define LOWBIT_PACK 8
/* Status words written by quantization kernels (initialised to all ones by the host). */
#define LOWBIT_STATUS_NONFINITE 0 /* smallest flat index of a NaN/Inf weight */
#define LOWBIT_STATUS_SCALE_OVERFLOW 1 /* smallest flat group index whose scale overflowed */
#define LOWBIT_STATUS_WORDS 2

/* Fake quantization forward / quantize+pack / ClipMask backward over a row-major
 * [rows, k] matrix with groups of `group` consecutive elements along k (group == k for
 * channelwise). Optional outputs are skipped when null. */
typedef struct LowbitQuantParams {
    const void *w;          /* [rows, k] weights, input dtype */
    const void *grad_in;    /* backward only: [rows, k] dY, input dtype */
    void *out;              /* [rows, k] fake-quantized weights (fwd) or dW (bwd); may be null */
    void *scales;           /* [rows, k / group] stored scales, scale dtype; may be null */
    int32_t *packed;        /* [rows, k / 8] compressed-tensors packed codes; may be null */
    unsigned long long *status; /* LOWBIT_STATUS_WORDS words, or null: no checking */
    int64_t rows;
    int64_t k;
    int64_t group;
} LowbitQuantParams;

/* Dequantize compressed-tensors packed codes: out[r, c] = T(q * s[r, c / group]). */
typedef struct LowbitDequantParams {
    const int32_t *packed;  /* [rows, k / 8] */
    const void *scales;     /* [rows, k / group] */
    void *out;              /* [rows, k] */
    int64_t rows;
    int64_t k;
    int64_t group;
} LowbitDequantParams;

/* Row-major [rows, cols] -> [cols, rows] transpose of 16- or 32-bit elements. */
typedef struct LowbitTransposeParams {
    const void *src;
    void *dst;
    int64_t rows;
    int64_t cols;
} LowbitTransposeParams;

#endif
