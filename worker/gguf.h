/* worker/gguf.h: a read-only, memory-mapped GGUF (v2 and v3) reader.
 *
 * gguf_open() maps the file and validates everything before any of it is used: the
 * header, every metadata key and value (types, string and array lengths against the
 * file's size), and every tensor descriptor (known type, n_dims <= 4, dimensions that
 * are positive and whose product does not overflow, rows that are whole blocks, data
 * inside the file and aligned to general.alignment, no duplicate names). A bad file
 * gives -1 and a message naming the file, the offset or tensor, and the problem.
 *
 * After a successful open every accessor is O(1) (keys and tensor names are hashed,
 * arrays of strings are indexed), and nothing returned needs freeing unless its name
 * says "dup". Strings inside the file are NOT NUL-terminated: they come back as a
 * pointer and a length. Keys and tensor names are copied and NUL-terminated.
 *
 * Byte order is little-endian (GGUF's), and this reader assumes a little-endian host.
 */
#ifndef DUET_WORKER_GGUF_H
#define DUET_WORKER_GGUF_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"

#define GGUF_MAGIC "GGUF"
#define GGUF_DEFAULT_ALIGNMENT 32

/* Metadata value types; the numeric values are GGUF's. */
typedef enum {
    GGUF_TYPE_UINT8 = 0,
    GGUF_TYPE_INT8 = 1,
    GGUF_TYPE_UINT16 = 2,
    GGUF_TYPE_INT16 = 3,
    GGUF_TYPE_UINT32 = 4,
    GGUF_TYPE_INT32 = 5,
    GGUF_TYPE_FLOAT32 = 6,
    GGUF_TYPE_BOOL = 7,
    GGUF_TYPE_STRING = 8,
    GGUF_TYPE_ARRAY = 9,
    GGUF_TYPE_UINT64 = 10,
    GGUF_TYPE_INT64 = 11,
    GGUF_TYPE_FLOAT64 = 12,
    GGUF_TYPE_COUNT_ = 13, /* number of types, not a type */
} gguf_type_t;

/* Status of the metadata getters. */
enum {
    GGUF_OK = 0,
    GGUF_ENOKEY = -1,  /* no such key */
    GGUF_ETYPE = -2,   /* the key holds another type */
    GGUF_ERANGE = -3,  /* index out of range, or the value does not fit the requested type */
};

typedef struct gguf gguf_t;

/* One tensor; owned by the gguf_t, valid until gguf_close(). */
typedef struct {
    const char *name;  /* NUL-terminated copy of the tensor's name */
    dtype_t type;      /* element / block type (dtype_supported() holds) */
    int n_dims;        /* 1..4 */
    int64_t ne[4];     /* elements per dimension, ne[0] = row length (contiguous); unused = 1 */
    int64_t n_elems;   /* product of ne */
    const void *data;  /* into the mapping, aligned to gguf_alignment(); nbytes bytes */
    size_t nbytes;     /* dtype_row_bytes(type, ne[0]) * ne[1] * ne[2] * ne[3] */
    uint64_t offset;   /* absolute file offset of data */
} gguf_tensor_t;

/* ---- opening ------------------------------------------------------------ */

/* Map and validate the file at path. On success *out is the caller's (gguf_close)
 * and 0 is returned; on failure -1, *out NULL and a message in err (may be NULL). */
int gguf_open(const char *path, gguf_t **out, char *err, size_t errlen);
/* The same from a buffer in memory (borrowed: it must outlive the gguf_t); name is
 * used in error messages. */
int gguf_open_mem(const void *buf, size_t size, const char *name, gguf_t **out, char *err,
                  size_t errlen);
/* Unmap and free; sets *self_p to NULL; safe on NULL and twice. */
void gguf_close(gguf_t **self_p);

const char *gguf_path(const gguf_t *g);     /* the path (or name) given at open */
uint32_t gguf_version(const gguf_t *g);     /* 2 or 3 */
size_t gguf_alignment(const gguf_t *g);     /* general.alignment, or 32 */
uint64_t gguf_data_offset(const gguf_t *g); /* file offset of the tensor data section */
size_t gguf_file_size(const gguf_t *g);
const void *gguf_base(const gguf_t *g);     /* the whole mapped file */

/* "uint8", ..., "array"; "unknown" otherwise. */
const char *gguf_type_name(gguf_type_t t);
/* Bytes of one scalar of type t (0 for STRING, ARRAY and unknown types). */
size_t gguf_type_size(gguf_type_t t);

/* ---- metadata ----------------------------------------------------------- */

int64_t gguf_n_kv(const gguf_t *g);
/* Index of key, or -1. */
int64_t gguf_find_key(const gguf_t *g, const char *key);
/* Key of entry i (NUL-terminated), or NULL when i is out of range. */
const char *gguf_kv_key(const gguf_t *g, int64_t i);
/* Type of entry i; GGUF_TYPE_COUNT_ when i is out of range. */
gguf_type_t gguf_kv_type(const gguf_t *g, int64_t i);

/* Typed scalar getters by key: GGUF_OK and *out set, or GGUF_ENOKEY / GGUF_ETYPE
 * (the stored type must match exactly). */
int gguf_get_u8(const gguf_t *g, const char *key, uint8_t *out);
int gguf_get_i8(const gguf_t *g, const char *key, int8_t *out);
int gguf_get_u16(const gguf_t *g, const char *key, uint16_t *out);
int gguf_get_i16(const gguf_t *g, const char *key, int16_t *out);
int gguf_get_u32(const gguf_t *g, const char *key, uint32_t *out);
int gguf_get_i32(const gguf_t *g, const char *key, int32_t *out);
int gguf_get_u64(const gguf_t *g, const char *key, uint64_t *out);
int gguf_get_i64(const gguf_t *g, const char *key, int64_t *out);
int gguf_get_f32(const gguf_t *g, const char *key, float *out);
int gguf_get_f64(const gguf_t *g, const char *key, double *out);
int gguf_get_bool(const gguf_t *g, const char *key, int *out); /* *out 0 or 1 */
/* Lenient getters: any integer type (or bool) as int64 (a uint64 above INT64_MAX is
 * GGUF_ERANGE); float32 or float64 as double. */
int gguf_get_int(const gguf_t *g, const char *key, int64_t *out);
int gguf_get_float(const gguf_t *g, const char *key, double *out);
/* A string value: *s points into the mapping (not NUL-terminated), *len its bytes. */
int gguf_get_str(const gguf_t *g, const char *key, const char **s, size_t *len);
/* A NUL-terminated malloc'd copy of a string value (caller frees); NULL when the key
 * is missing, not a string, or memory runs out. */
char *gguf_get_str_dup(const gguf_t *g, const char *key);

/* Arrays, by entry index (gguf_find_key): element type and count. */
int gguf_arr_info(const gguf_t *g, int64_t kv, gguf_type_t *elem_type, uint64_t *n);
/* Raw little-endian elements of a numeric array (n * gguf_type_size bytes, possibly
 * unaligned: read with memcpy), or NULL for an array of strings or a non-array. */
const void *gguf_arr_data(const gguf_t *g, int64_t kv);
/* Element i of a numeric array: any integer type (or bool) as int64 ... */
int gguf_arr_get_int(const gguf_t *g, int64_t kv, uint64_t i, int64_t *out);
/* ... float32 or float64 as double ... */
int gguf_arr_get_float(const gguf_t *g, int64_t kv, uint64_t i, double *out);
/* ... and element i of an array of strings, in O(1). */
int gguf_arr_get_str(const gguf_t *g, int64_t kv, uint64_t i, const char **s, size_t *len);

/* ---- tensors ------------------------------------------------------------ */

int64_t gguf_n_tensors(const gguf_t *g);
/* Tensor i in file order, or NULL when out of range. */
const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i);
/* Tensor by name, or NULL. */
const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name);

#endif
