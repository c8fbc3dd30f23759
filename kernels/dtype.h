/* kernels/dtype.h: element and weight types shared by GGUF, the kernels and kv/.
 *
 * The numeric values are GGUF's tensor type ids (ggml_type), so a GGUF tensor's
 * type field converts to dtype_t directly once dtype_supported() says yes.
 * Quantized types store rows as consecutive blocks of dtype_block_elems()
 * elements taking dtype_block_bytes() bytes each; a row's length must be a
 * multiple of the block size.
 */
#ifndef DUET_KERNELS_DTYPE_H
#define DUET_KERNELS_DTYPE_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef enum {
    DTYPE_F32  = 0,
    DTYPE_F16  = 1,
    DTYPE_Q4_0 = 2,
    DTYPE_Q4_1 = 3,
    DTYPE_Q8_0 = 8,
    DTYPE_Q8_1 = 9,   /* activations only (dot products with Q4_0/Q4_1) */
    DTYPE_Q4_K = 12,
    DTYPE_Q6_K = 14,
    DTYPE_Q8_K = 15,  /* activations only (dot products with K-quants) */
    DTYPE_I8   = 24,  /* plain int8 (kv/ int8 uses it with separate scales) */
    DTYPE_BF16 = 30,
} dtype_t;

/* 1 when id is a type duet can load or compute with, 0 otherwise. */
int dtype_supported(uint32_t id);
/* "f32", "q4_k", ...; "unknown" for an unsupported id. Borrowed, static. */
const char *dtype_name(dtype_t t);
/* Elements per block (1 for f32/f16/bf16/i8, 32 for Q4_0/Q4_1/Q8_0/Q8_1, 256 for K-quants). */
size_t dtype_block_elems(dtype_t t);
/* Bytes per block. */
size_t dtype_block_bytes(dtype_t t);
/* Bytes of a row of n elements; 0 when n is not a multiple of the block size. */
size_t dtype_row_bytes(dtype_t t, int64_t n);
/* Convert a row of n elements to f32 (dst[n]). Returns 0, or -1 for a bad type or n. */
int dtype_to_f32(dtype_t t, const void *src, float *dst, int64_t n);
/* Convert a row of n f32 elements into type t (dst: dtype_row_bytes(t, n) bytes),
 * with round-to-nearest reference quantizers. Returns 0, or -1 for a bad type or n. */
int dtype_from_f32(dtype_t t, const float *src, void *dst, int64_t n);

/* ---- scalar f16 / bf16 conversions (IEEE binary16, bfloat16) ----------- */

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float fp16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    if (exp == 0) {
        if (man == 0) return f32_from_bits(sign);
        /* subnormal: value = man * 2^-24 */
        float v = (float)man * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    if (exp == 31) return f32_from_bits(sign | 0x7f800000u | (man << 13));
    return f32_from_bits(sign | ((exp + 112) << 23) | (man << 13));
}

static inline uint16_t fp16_from_f32(float f)
{
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000;
    uint32_t ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000u ? 0x200 : 0));
    if (ax >= 0x477ff000u) /* rounds to >= 65520: overflow to inf */
        return (uint16_t)(sign | 0x7c00);
    if (ax < 0x38800000u) { /* below 2^-14: subnormal or zero, round to nearest even */
        float a = f32_from_bits(ax) * 16777216.0f; /* in units of 2^-24 */
        uint32_t m = (uint32_t)a;
        float rem = a - (float)m;
        if (rem > 0.5f || (rem == 0.5f && (m & 1))) m++;
        return (uint16_t)(sign | m);
    }
    uint32_t r = ax + 0xfffu + ((ax >> 13) & 1); /* round to nearest even */
    return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

static inline float bf16_to_f32(uint16_t h) { return f32_from_bits((uint32_t)h << 16); }

static inline uint16_t bf16_from_f32(float f)
{
    uint32_t x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((x >> 16) | 0x40); /* quiet nan */
    return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1)) >> 16);
}

#endif
