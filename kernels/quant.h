/* kernels/quant.h: the byte layouts of GGUF's block-quantized types.
 *
 * Each struct is exactly one block as a GGUF file stores it (little-endian, no
 * padding; the static asserts below hold the sizes). Scales marked f16 are IEEE
 * binary16 bit patterns (fp16_to_f32 in kernels/dtype.h converts them).
 *
 *   Q4_0: x[i] = d * (q[i] - 8), q in 0..15; byte j holds q[j] (low nibble) and q[j+16] (high).
 *   Q4_1: x[i] = d * q[i] + m, same nibble order.
 *   Q8_0: x[i] = d * q[i], q signed.
 *   Q8_1: as Q8_0 plus s = d * sum(q) (activations for Q4_0/Q4_1 dot products).
 *   Q4_K: 256 elements in 8 sub-blocks of 32; sub-block j has a 6-bit scale sc[j] and min
 *         mn[j] (packed in scales[12], see quant_k4_scale_min); x = d*sc[j]*q - dmin*mn[j].
 *         qs[32*c + l] holds element 64c + l (low nibble) and 64c + 32 + l (high nibble).
 *   Q6_K: 256 elements in 16 sub-blocks of 16 with int8 scales; q is 6 bits (0..63, minus
 *         32): 4 low bits in ql, 2 high bits in qh; x = d * sc[j] * (q - 32). For each half
 *         h (128 elements) and l < 32: ql[64h+l] holds the low bits of elements 128h+l (low
 *         nibble) and 128h+64+l (high nibble); ql[64h+32+l] those of 128h+32+l and
 *         128h+96+l; qh[32h+l] bits 0-1, 2-3, 4-5, 6-7 hold the high bits of elements
 *         128h+l, +32+l, +64+l, +96+l.
 *   Q8_K: float d, 256 int8, bsums[16] = sums of each 16 consecutive q (activations).
 */
#ifndef DUET_KERNELS_QUANT_H
#define DUET_KERNELS_QUANT_H

#include <stdint.h>

#define QK32 32   /* elements per Q4_0/Q4_1/Q8_0/Q8_1 block */
#define QK_K 256  /* elements per K-quant super-block */

typedef struct { uint16_t d; uint8_t qs[QK32 / 2]; } blk_q4_0;              /* 18 bytes */
typedef struct { uint16_t d, m; uint8_t qs[QK32 / 2]; } blk_q4_1;           /* 20 bytes */
typedef struct { uint16_t d; int8_t qs[QK32]; } blk_q8_0;                   /* 34 bytes */
typedef struct { uint16_t d, s; int8_t qs[QK32]; } blk_q8_1;                /* 36 bytes */
typedef struct {
    uint16_t d;                 /* f16 scale of the sub-block scales */
    uint16_t dmin;              /* f16 scale of the sub-block mins */
    uint8_t scales[12];         /* 8 6-bit scales and 8 6-bit mins, packed */
    uint8_t qs[QK_K / 2];       /* 4-bit quants */
} blk_q4_k;                                                                 /* 144 bytes */
typedef struct {
    uint8_t ql[QK_K / 2];       /* low 4 bits */
    uint8_t qh[QK_K / 4];       /* high 2 bits */
    int8_t scales[QK_K / 16];   /* sub-block scales */
    uint16_t d;                 /* f16 super-block scale */
} blk_q6_k;                                                                 /* 210 bytes */
typedef struct {
    float d;
    int8_t qs[QK_K];
    int16_t bsums[QK_K / 16];
} blk_q8_k;                                                                 /* 292 bytes */

_Static_assert(sizeof(blk_q4_0) == 18, "blk_q4_0 layout");
_Static_assert(sizeof(blk_q4_1) == 20, "blk_q4_1 layout");
_Static_assert(sizeof(blk_q8_0) == 34, "blk_q8_0 layout");
_Static_assert(sizeof(blk_q8_1) == 36, "blk_q8_1 layout");
_Static_assert(sizeof(blk_q4_k) == 144, "blk_q4_k layout");
_Static_assert(sizeof(blk_q6_k) == 210, "blk_q6_k layout");
_Static_assert(sizeof(blk_q8_k) == 292, "blk_q8_k layout");

/* Sub-block j (0..7) of a Q4_K scales[12] array: its 6-bit scale and min. */
static inline void quant_k4_scale_min(const uint8_t *scales, int j, uint8_t *sc, uint8_t *mn)
{
    if (j < 4) {
        *sc = scales[j] & 63;
        *mn = scales[j + 4] & 63;
    } else {
        *sc = (uint8_t)((scales[j + 4] & 0xF) | ((scales[j - 4] >> 6) << 4));
        *mn = (uint8_t)((scales[j + 4] >> 4) | ((scales[j] >> 6) << 4));
    }
}

#endif
