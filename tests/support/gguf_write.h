/* tests/support/gguf_write.h: a small GGUF (v3) writer and a random-model generator,
 * for tests, benchmarks and tools.
 *
 * The writer collects metadata and tensors in memory (tensor data is copied) and
 * writes the whole file at the end, metadata in the order it was added and tensor
 * data aligned to the alignment (general.alignment is written when it is not 32).
 *
 * mkmodel_write() makes a Llama-shaped model with deterministic random weights,
 * named exactly as llama.cpp's converter names things, with a tokenizer (a small
 * built-in byte-level BPE, or one copied from another GGUF), so that duet and
 * llama.cpp can both load it.
 */
#ifndef DUET_TESTS_GGUF_WRITE_H
#define DUET_TESTS_GGUF_WRITE_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"
#include "worker/gguf.h"

typedef struct gguf_writer gguf_writer_t;

/* A new, empty writer (version 3, alignment 32). 0 or -1 (out of memory). */
int gguf_writer_new(gguf_writer_t **out);
void gguf_writer_destroy(gguf_writer_t **self_p);

/* The version field written in the header (default 3; anything, for tests). */
void gguf_writer_set_version(gguf_writer_t *w, uint32_t version);
/* Tensor data alignment (a power of two); writes general.alignment unless it is 32, so
 * call it once, before or among the metadata. */
void gguf_writer_set_alignment(gguf_writer_t *w, uint32_t alignment);

/* Metadata, in the order added. Keys are copied; no check against duplicates (so that
 * tests can write bad files). All return 0 or -1 (out of memory). */
int gguf_w_u8(gguf_writer_t *w, const char *key, uint8_t v);
int gguf_w_i8(gguf_writer_t *w, const char *key, int8_t v);
int gguf_w_u16(gguf_writer_t *w, const char *key, uint16_t v);
int gguf_w_i16(gguf_writer_t *w, const char *key, int16_t v);
int gguf_w_u32(gguf_writer_t *w, const char *key, uint32_t v);
int gguf_w_i32(gguf_writer_t *w, const char *key, int32_t v);
int gguf_w_u64(gguf_writer_t *w, const char *key, uint64_t v);
int gguf_w_i64(gguf_writer_t *w, const char *key, int64_t v);
int gguf_w_f32(gguf_writer_t *w, const char *key, float v);
int gguf_w_f64(gguf_writer_t *w, const char *key, double v);
int gguf_w_bool(gguf_writer_t *w, const char *key, int v);
int gguf_w_str(gguf_writer_t *w, const char *key, const char *s);          /* NUL-terminated */
int gguf_w_str_n(gguf_writer_t *w, const char *key, const char *s, size_t len);
/* A numeric (or bool) array of n elements of type et, little-endian, copied from data. */
int gguf_w_arr(gguf_writer_t *w, const char *key, gguf_type_t et, const void *data, uint64_t n);
/* An array of n strings; lens may be NULL for NUL-terminated strings. */
int gguf_w_arr_str(gguf_writer_t *w, const char *key, const char *const *strs,
                   const size_t *lens, uint64_t n);
/* Copy entry kv of another file (any type, arrays included) under the same key. */
int gguf_w_copy_kv(gguf_writer_t *w, const gguf_t *src, int64_t kv);

/* A tensor of type t with n_dims dimensions ne[] (ne[0] = row length); data holds
 * dtype_row_bytes(t, ne[0]) * (rows) bytes and is copied. Returns 0, or -1 for a bad
 * shape or out of memory. */
int gguf_w_tensor(gguf_writer_t *w, const char *name, dtype_t t, int n_dims, const int64_t *ne,
                  const void *data);

/* The file as one malloc'd buffer (*buf is the caller's). 0 or -1. */
int gguf_writer_to_mem(const gguf_writer_t *w, uint8_t **buf, size_t *size);
/* Write the file. 0, or -1 with a message in err. */
int gguf_writer_write(const gguf_writer_t *w, const char *path, char *err, size_t errlen);

/* ---- random models ------------------------------------------------------ */

typedef struct {
    const char *arch;       /* "llama" or "qwen2" (qwen2 adds Q/K/V biases) */
    dtype_t type;           /* type of the matrices (norms and biases are f32) */
    uint64_t seed;          /* weights are a function of the seed and the shape */
    int n_embd;             /* K-quants need multiples of 256, other blocks of 32 */
    int n_layer;
    int n_head;
    int n_head_kv;
    int n_ff;               /* K-quants need multiples of 256, other blocks of 32 */
    int n_ctx;              /* {arch}.context_length */
    float rope_base;        /* {arch}.rope.freq_base */
    float rms_eps;          /* {arch}.attention.layer_norm_rms_epsilon */
    int tied;               /* no output.weight: the output projection is token_embd */
    const char *vocab_from; /* copy tokenizer.* from this GGUF; NULL: the built-in vocab */
} mkmodel_opts;

/* Small defaults: llama, f32, seed 1, n_embd 64, 2 layers, 4 heads, 2 KV heads,
 * n_ff 128, n_ctx 512, rope base 10000, eps 1e-5, untied, built-in vocabulary. */
void mkmodel_defaults(mkmodel_opts *o);
/* Write the model to path. 0, or -1 with a message in err. */
int mkmodel_write(const mkmodel_opts *o, const char *path, char *err, size_t errlen);
/* Size of the built-in vocabulary (tokens), for tests. */
int mkmodel_builtin_vocab_size(void);

#endif
