/* worker/gguf.c: memory-mapped GGUF reader; see gguf.h. */
#include "worker/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* A metadata entry. Offsets are absolute file offsets. */
typedef struct {
    char *key;              /* NUL-terminated copy */
    gguf_type_t type;
    uint64_t val_off;       /* scalar value bytes, or the string's u64 length prefix */
    gguf_type_t elem_type;  /* arrays: element type */
    uint64_t n;             /* arrays: element count */
    uint64_t data_off;      /* arrays: first element */
    uint64_t *str_off;      /* arrays of strings: [n] offsets of each string's length prefix */
} gguf_kv_t;

struct gguf {
    char *path;
    const uint8_t *base;    /* the mapped file or the borrowed buffer */
    size_t size;
    int mapped;             /* base is ours to munmap */
    uint32_t version;
    size_t alignment;
    uint64_t data_off;
    int64_t n_kv;
    gguf_kv_t *kv;          /* [n_kv] */
    int64_t n_tensors;
    gguf_tensor_t *tensors; /* [n_tensors] */
    int64_t *kv_hash;       /* [kv_cap] entry index or -1 */
    size_t kv_cap;
    int64_t *t_hash;        /* [t_cap] tensor index or -1 */
    size_t t_cap;
};

/* ---- small helpers ------------------------------------------------------ */

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull; /* FNV-1a */
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static size_t cap_for(int64_t n)
{
    size_t cap = 16;
    while (cap < (size_t)n * 2) cap *= 2;
    return cap;
}

static const char *const type_names[GGUF_TYPE_COUNT_] = {
    "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32",
    "bool", "string", "array", "uint64", "int64", "float64",
};

static const size_t type_sizes[GGUF_TYPE_COUNT_] = {
    1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8,
};

const char *gguf_type_name(gguf_type_t t)
{
    return (unsigned)t < GGUF_TYPE_COUNT_ ? type_names[t] : "unknown";
}

size_t gguf_type_size(gguf_type_t t)
{
    return (unsigned)t < GGUF_TYPE_COUNT_ ? type_sizes[t] : 0;
}

/* ---- the parser --------------------------------------------------------- */

typedef struct {
    const uint8_t *p;
    size_t size;
    size_t off;
    const char *name;
    char *err;
    size_t errlen;
} cursor_t;

static int need(cursor_t *c, uint64_t n, const char *what)
{
    if (n > c->size - c->off) {
        set_err(c->err, c->errlen,
                "%s: offset %zu: file truncated: %s needs %llu bytes, %zu left (file is %zu bytes)",
                c->name, c->off, what, (unsigned long long)n, c->size - c->off, c->size);
        return -1;
    }
    return 0;
}

static int rd_u32(cursor_t *c, uint32_t *v, const char *what)
{
    if (need(c, 4, what)) return -1;
    memcpy(v, c->p + c->off, 4);
    c->off += 4;
    return 0;
}

static int rd_u64(cursor_t *c, uint64_t *v, const char *what)
{
    if (need(c, 8, what)) return -1;
    memcpy(v, c->p + c->off, 8);
    c->off += 8;
    return 0;
}

/* A string: u64 length then bytes. *s and *len describe the bytes in place. */
static int rd_str(cursor_t *c, const char **s, uint64_t *len, const char *what)
{
    size_t at = c->off;
    if (rd_u64(c, len, what)) return -1;
    if (*len > c->size - c->off) {
        set_err(c->err, c->errlen,
                "%s: offset %zu: %s has length %llu, beyond the end of the file (%zu bytes left)",
                c->name, at, what, (unsigned long long)*len, c->size - c->off);
        return -1;
    }
    *s = (const char *)c->p + c->off;
    c->off += (size_t)*len;
    return 0;
}

/* A NUL-terminated copy of a key or a tensor name, rejecting empty names and NULs. */
static char *dup_name(cursor_t *c, size_t at, const char *s, uint64_t len, const char *what)
{
    if (len == 0) {
        set_err(c->err, c->errlen, "%s: offset %zu: empty %s", c->name, at, what);
        return NULL;
    }
    if (memchr(s, 0, (size_t)len)) {
        set_err(c->err, c->errlen, "%s: offset %zu: %s contains a NUL byte", c->name, at, what);
        return NULL;
    }
    char *d = malloc((size_t)len + 1);
    if (!d) {
        set_err(c->err, c->errlen, "%s: out of memory", c->name);
        return NULL;
    }
    memcpy(d, s, (size_t)len);
    d[len] = 0;
    return d;
}

/* Parse one metadata value of type t at the cursor into kv. */
static int parse_value(cursor_t *c, gguf_kv_t *kv, const char *key)
{
    char what[96];
    kv->val_off = c->off;
    if (kv->type == GGUF_TYPE_STRING) {
        const char *s;
        uint64_t len;
        snprintf(what, sizeof what, "string value of key '%.40s'", key);
        return rd_str(c, &s, &len, what);
    }
    if (kv->type != GGUF_TYPE_ARRAY) {
        snprintf(what, sizeof what, "%s value of key '%.40s'", gguf_type_name(kv->type), key);
        if (need(c, type_sizes[kv->type], what)) return -1;
        if (kv->type == GGUF_TYPE_BOOL && c->p[c->off] > 1) {
            set_err(c->err, c->errlen, "%s: offset %zu: bool value of key '%s' is %u, not 0 or 1",
                    c->name, c->off, key, c->p[c->off]);
            return -1;
        }
        c->off += type_sizes[kv->type];
        return 0;
    }
    uint32_t et;
    size_t at = c->off;
    snprintf(what, sizeof what, "array header of key '%.40s'", key);
    if (rd_u32(c, &et, what) || rd_u64(c, &kv->n, what)) return -1;
    if (et >= GGUF_TYPE_COUNT_) {
        set_err(c->err, c->errlen, "%s: offset %zu: array of key '%s' has unknown element type %u",
                c->name, at, key, et);
        return -1;
    }
    if (et == GGUF_TYPE_ARRAY) {
        set_err(c->err, c->errlen, "%s: offset %zu: array of key '%s' holds arrays (not supported)",
                c->name, at, key);
        return -1;
    }
    kv->elem_type = (gguf_type_t)et;
    kv->data_off = c->off;
    size_t left = c->size - c->off;
    if (et != GGUF_TYPE_STRING) {
        uint64_t es = type_sizes[et];
        if (kv->n > left / es) {
            set_err(c->err, c->errlen,
                    "%s: offset %zu: array of key '%s' has %llu %s elements, beyond the end of the "
                    "file (%zu bytes left)",
                    c->name, at, key, (unsigned long long)kv->n, gguf_type_name(kv->elem_type), left);
            return -1;
        }
        if (et == GGUF_TYPE_BOOL) {
            for (uint64_t i = 0; i < kv->n; i++)
                if (c->p[c->off + i] > 1) {
                    set_err(c->err, c->errlen, "%s: offset %zu: bool element %llu of key '%s' is %u",
                            c->name, (size_t)(c->off + i), (unsigned long long)i, key,
                            c->p[c->off + i]);
                    return -1;
                }
        }
        c->off += (size_t)(kv->n * es);
        return 0;
    }
    /* strings: each takes at least its 8-byte length */
    if (kv->n > left / 8) {
        set_err(c->err, c->errlen,
                "%s: offset %zu: array of key '%s' has %llu strings, beyond the end of the file "
                "(%zu bytes left)",
                c->name, at, key, (unsigned long long)kv->n, left);
        return -1;
    }
    kv->str_off = malloc((size_t)(kv->n ? kv->n : 1) * sizeof *kv->str_off);
    if (!kv->str_off) {
        set_err(c->err, c->errlen, "%s: out of memory", c->name);
        return -1;
    }
    for (uint64_t i = 0; i < kv->n; i++) {
        const char *s;
        uint64_t len;
        kv->str_off[i] = c->off;
        snprintf(what, sizeof what, "string %llu of array '%.40s'", (unsigned long long)i, key);
        if (rd_str(c, &s, &len, what)) return -1;
    }
    return 0;
}

static int64_t kv_lookup(const gguf_t *g, const char *key, size_t len)
{
    if (!g->kv_hash) return -1;
    size_t mask = g->kv_cap - 1;
    for (size_t h = hash_bytes(key, len) & mask;; h = (h + 1) & mask) {
        int64_t i = g->kv_hash[h];
        if (i < 0) return -1;
        const char *k = g->kv[i].key;
        if (strncmp(k, key, len) == 0 && k[len] == 0) return i;
    }
}

static int64_t tensor_lookup(const gguf_t *g, const char *name)
{
    if (!g->t_hash) return -1;
    size_t mask = g->t_cap - 1;
    for (size_t h = hash_bytes(name, strlen(name)) & mask;; h = (h + 1) & mask) {
        int64_t i = g->t_hash[h];
        if (i < 0) return -1;
        if (strcmp(g->tensors[i].name, name) == 0) return i;
    }
}

static int parse(gguf_t *g, char *err, size_t errlen)
{
    cursor_t c = {g->base, g->size, 0, g->path, err, errlen};
    if (g->size < 4 || memcmp(g->base, GGUF_MAGIC, 4) != 0) {
        if (g->size < 4)
            set_err(err, errlen, "%s: file is %zu bytes, too short for a GGUF header", g->path,
                    g->size);
        else
            set_err(err, errlen, "%s: offset 0: bad magic %02x %02x %02x %02x (not a GGUF file)",
                    g->path, g->base[0], g->base[1], g->base[2], g->base[3]);
        return -1;
    }
    c.off = 4;
    if (rd_u32(&c, &g->version, "version")) return -1;
    if (g->version != 2 && g->version != 3) {
        if (g->version == 1)
            set_err(err, errlen, "%s: offset 4: GGUF version 1 is not supported (only 2 and 3)",
                    g->path);
        else if ((g->version & 0xffff) == 0 && (g->version >> 24) != 0)
            set_err(err, errlen, "%s: offset 4: big-endian GGUF (version field 0x%08x) is not "
                    "supported", g->path, g->version);
        else
            set_err(err, errlen, "%s: offset 4: unsupported GGUF version %u (only 2 and 3)",
                    g->path, g->version);
        return -1;
    }
    uint64_t n_tensors, n_kv;
    if (rd_u64(&c, &n_tensors, "tensor count") || rd_u64(&c, &n_kv, "metadata count")) return -1;
    /* a metadata entry takes at least 8 (key length) + 1 (key) + 4 (type) + 1 bytes; a tensor
     * descriptor at least 8 + 1 + 4 + 8 + 4 + 8 */
    size_t left = g->size - c.off;
    if (n_kv > left / 14) {
        set_err(err, errlen, "%s: offset 16: metadata count %llu is impossible for a file of %zu "
                "bytes (truncated or corrupt)", g->path, (unsigned long long)n_kv, g->size);
        return -1;
    }
    if (n_tensors > left / 33) {
        set_err(err, errlen, "%s: offset 8: tensor count %llu is impossible for a file of %zu "
                "bytes (truncated or corrupt)", g->path, (unsigned long long)n_tensors, g->size);
        return -1;
    }

    /* metadata */
    g->kv = calloc(n_kv ? n_kv : 1, sizeof *g->kv);
    g->kv_cap = cap_for((int64_t)n_kv);
    g->kv_hash = malloc(g->kv_cap * sizeof *g->kv_hash);
    if (!g->kv || !g->kv_hash) {
        set_err(err, errlen, "%s: out of memory", g->path);
        return -1;
    }
    memset(g->kv_hash, 0xff, g->kv_cap * sizeof *g->kv_hash);
    for (uint64_t i = 0; i < n_kv; i++) {
        gguf_kv_t *kv = &g->kv[i];
        char what[64];
        size_t at = c.off;
        const char *ks;
        uint64_t klen;
        uint32_t t;
        snprintf(what, sizeof what, "key of metadata entry %llu", (unsigned long long)i);
        if (rd_str(&c, &ks, &klen, what)) return -1;
        if (!(kv->key = dup_name(&c, at, ks, klen, what))) return -1;
        g->n_kv = (int64_t)i + 1;
        if (kv_lookup(g, kv->key, (size_t)klen) >= 0) {
            set_err(err, errlen, "%s: offset %zu: duplicate metadata key '%s'", g->path, at,
                    kv->key);
            return -1;
        }
        size_t tat = c.off;
        if (rd_u32(&c, &t, "metadata value type")) return -1;
        if (t >= GGUF_TYPE_COUNT_) {
            set_err(err, errlen, "%s: offset %zu: key '%s' has unknown value type %u", g->path,
                    tat, kv->key, t);
            return -1;
        }
        kv->type = (gguf_type_t)t;
        if (parse_value(&c, kv, kv->key)) return -1;
        size_t mask = g->kv_cap - 1, h = hash_bytes(kv->key, (size_t)klen) & mask;
        while (g->kv_hash[h] >= 0) h = (h + 1) & mask;
        g->kv_hash[h] = (int64_t)i;
    }

    /* alignment */
    g->alignment = GGUF_DEFAULT_ALIGNMENT;
    int64_t ai = gguf_find_key(g, "general.alignment");
    if (ai >= 0) {
        uint32_t a;
        if (g->kv[ai].type != GGUF_TYPE_UINT32) {
            set_err(err, errlen, "%s: general.alignment has type %s, not uint32", g->path,
                    gguf_type_name(g->kv[ai].type));
            return -1;
        }
        memcpy(&a, g->base + g->kv[ai].val_off, 4);
        if (a == 0 || (a & (a - 1)) != 0 || a > (1u << 20)) {
            set_err(err, errlen, "%s: general.alignment is %u, not a power of two up to 1 MiB",
                    g->path, a);
            return -1;
        }
        g->alignment = a;
    }

    /* tensor descriptors */
    g->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *g->tensors);
    g->t_cap = cap_for((int64_t)n_tensors);
    g->t_hash = malloc(g->t_cap * sizeof *g->t_hash);
    if (!g->tensors || !g->t_hash) {
        set_err(err, errlen, "%s: out of memory", g->path);
        return -1;
    }
    memset(g->t_hash, 0xff, g->t_cap * sizeof *g->t_hash);
    for (uint64_t i = 0; i < n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        char what[64];
        size_t at = c.off;
        const char *ns;
        uint64_t nlen;
        uint32_t nd, type;
        snprintf(what, sizeof what, "name of tensor %llu", (unsigned long long)i);
        if (rd_str(&c, &ns, &nlen, what)) return -1;
        char *name = dup_name(&c, at, ns, nlen, what);
        if (!name) return -1;
        t->name = name;
        g->n_tensors = (int64_t)i + 1;
        if (tensor_lookup(g, name) >= 0) {
            set_err(err, errlen, "%s: offset %zu: duplicate tensor name '%s'", g->path, at, name);
            return -1;
        }
        snprintf(what, sizeof what, "descriptor of tensor '%.40s'", name);
        size_t dat = c.off;
        if (rd_u32(&c, &nd, what)) return -1;
        if (nd < 1 || nd > 4) {
            set_err(err, errlen, "%s: offset %zu: tensor '%s' has %u dimensions (1 to 4 supported)",
                    g->path, dat, name, nd);
            return -1;
        }
        t->n_dims = (int)nd;
        t->ne[0] = t->ne[1] = t->ne[2] = t->ne[3] = 1;
        int64_t n_elems = 1;
        for (uint32_t d = 0; d < nd; d++) {
            uint64_t ne;
            if (rd_u64(&c, &ne, what)) return -1;
            if (ne == 0 || ne > (uint64_t)INT64_MAX || (int64_t)ne > INT64_MAX / n_elems) {
                set_err(err, errlen, "%s: offset %zu: tensor '%s' dimension %u is %llu%s", g->path,
                        c.off - 8, name, d, (unsigned long long)ne,
                        ne == 0 ? " (zero)" : " (element count overflows)");
                return -1;
            }
            t->ne[d] = (int64_t)ne;
            n_elems *= (int64_t)ne;
        }
        t->n_elems = n_elems;
        size_t tyat = c.off;
        if (rd_u32(&c, &type, what)) return -1;
        if (!dtype_supported(type)) {
            set_err(err, errlen, "%s: offset %zu: tensor '%s' has unknown or unsupported type %u",
                    g->path, tyat, name, type);
            return -1;
        }
        t->type = (dtype_t)type;
        size_t row = dtype_row_bytes(t->type, t->ne[0]);
        if (row == 0) {
            set_err(err, errlen,
                    "%s: tensor '%s': row length %lld is not a multiple of %s's block of %zu",
                    g->path, name, (long long)t->ne[0], dtype_name(t->type),
                    dtype_block_elems(t->type));
            return -1;
        }
        uint64_t rows = (uint64_t)(n_elems / t->ne[0]);
        if (rows > (uint64_t)g->size / row) {
            set_err(err, errlen, "%s: tensor '%s': %llu rows of %zu bytes are larger than the file "
                    "(%zu bytes)", g->path, name, (unsigned long long)rows, row, g->size);
            return -1;
        }
        t->nbytes = (size_t)rows * row;
        if (rd_u64(&c, &t->offset, what)) return -1;
        size_t mask = g->t_cap - 1, h = hash_bytes(name, (size_t)nlen) & mask;
        while (g->t_hash[h] >= 0) h = (h + 1) & mask;
        g->t_hash[h] = (int64_t)i;
    }

    /* data section: aligned after the descriptors */
    uint64_t a = g->alignment;
    g->data_off = ((uint64_t)c.off + a - 1) / a * a;
    for (int64_t i = 0; i < g->n_tensors; i++) {
        gguf_tensor_t *t = &g->tensors[i];
        uint64_t rel = t->offset;
        if (rel % a != 0) {
            set_err(err, errlen, "%s: tensor '%s': data offset %llu is not a multiple of the "
                    "alignment %zu", g->path, t->name, (unsigned long long)rel, g->alignment);
            return -1;
        }
        if (g->data_off > g->size || rel > g->size - g->data_off ||
            t->nbytes > g->size - g->data_off - rel) {
            set_err(err, errlen, "%s: tensor '%s': data [%llu, +%zu) at file offset %llu lies "
                    "beyond the end of the file (%zu bytes)", g->path, t->name,
                    (unsigned long long)rel, t->nbytes,
                    (unsigned long long)(g->data_off + rel), g->size);
            return -1;
        }
        t->offset = g->data_off + rel;
        t->data = g->base + t->offset;
    }
    return 0;
}

/* ---- open / close ------------------------------------------------------- */

static int open_common(gguf_t *g, gguf_t **out, char *err, size_t errlen)
{
    if (parse(g, err, errlen) != 0) {
        gguf_close(&g);
        return -1;
    }
    *out = g;
    return 0;
}

int gguf_open_mem(const void *buf, size_t size, const char *name, gguf_t **out, char *err,
                  size_t errlen)
{
    *out = NULL;
    if (!name) name = "(memory)";
    gguf_t *g = calloc(1, sizeof *g);
    if (!g || !(g->path = strdup(name))) {
        free(g);
        set_err(err, errlen, "%s: out of memory", name);
        return -1;
    }
    g->base = buf;
    g->size = size;
    return open_common(g, out, err, errlen);
}

int gguf_open(const char *path, gguf_t **out, char *err, size_t errlen)
{
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        set_err(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        set_err(err, errlen, "%s: cannot stat: %s", path, strerror(errno));
        close(fd);
        return -1;
    }
    if (!S_ISREG(st.st_mode)) {
        set_err(err, errlen, "%s: not a regular file", path);
        close(fd);
        return -1;
    }
    if (st.st_size < 24) {
        set_err(err, errlen, "%s: file is %lld bytes, too short for a GGUF header", path,
                (long long)st.st_size);
        close(fd);
        return -1;
    }
    if ((uint64_t)st.st_size > SIZE_MAX) {
        set_err(err, errlen, "%s: file too large to map", path);
        close(fd);
        return -1;
    }
    size_t size = (size_t)st.st_size;
    void *base = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0);
    int merr = errno;
    close(fd);
    if (base == MAP_FAILED) {
        set_err(err, errlen, "%s: cannot map %zu bytes: %s", path, size, strerror(merr));
        return -1;
    }
    gguf_t *g = calloc(1, sizeof *g);
    if (!g || !(g->path = strdup(path))) {
        free(g);
        munmap(base, size);
        set_err(err, errlen, "%s: out of memory", path);
        return -1;
    }
    g->base = base;
    g->size = size;
    g->mapped = 1;
    return open_common(g, out, err, errlen);
}

void gguf_close(gguf_t **self_p)
{
    if (!self_p || !*self_p) return;
    gguf_t *g = *self_p;
    for (int64_t i = 0; i < g->n_kv; i++) {
        free(g->kv[i].key);
        free(g->kv[i].str_off);
    }
    for (int64_t i = 0; i < g->n_tensors; i++) free((char *)g->tensors[i].name);
    free(g->kv);
    free(g->tensors);
    free(g->kv_hash);
    free(g->t_hash);
    if (g->mapped) munmap((void *)g->base, g->size);
    free(g->path);
    free(g);
    *self_p = NULL;
}

/* ---- accessors ---------------------------------------------------------- */

const char *gguf_path(const gguf_t *g) { return g->path; }
uint32_t gguf_version(const gguf_t *g) { return g->version; }
size_t gguf_alignment(const gguf_t *g) { return g->alignment; }
uint64_t gguf_data_offset(const gguf_t *g) { return g->data_off; }
size_t gguf_file_size(const gguf_t *g) { return g->size; }
const void *gguf_base(const gguf_t *g) { return g->base; }

int64_t gguf_n_kv(const gguf_t *g) { return g->n_kv; }

int64_t gguf_find_key(const gguf_t *g, const char *key)
{
    return kv_lookup(g, key, strlen(key));
}

const char *gguf_kv_key(const gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? g->kv[i].key : NULL;
}

gguf_type_t gguf_kv_type(const gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_kv ? g->kv[i].type : GGUF_TYPE_COUNT_;
}

/* The entry for key when it holds type t. */
static int get_typed(const gguf_t *g, const char *key, gguf_type_t t, const gguf_kv_t **kv)
{
    int64_t i = gguf_find_key(g, key);
    if (i < 0) return GGUF_ENOKEY;
    if (g->kv[i].type != t) return GGUF_ETYPE;
    *kv = &g->kv[i];
    return GGUF_OK;
}

#define GETTER(fn, ctype, gtype)                                          \
    int fn(const gguf_t *g, const char *key, ctype *out)                  \
    {                                                                     \
        const gguf_kv_t *kv;                                              \
        int rc = get_typed(g, key, gtype, &kv);                           \
        if (rc == GGUF_OK) memcpy(out, g->base + kv->val_off, sizeof *out); \
        return rc;                                                        \
    }

GETTER(gguf_get_u8, uint8_t, GGUF_TYPE_UINT8)
GETTER(gguf_get_i8, int8_t, GGUF_TYPE_INT8)
GETTER(gguf_get_u16, uint16_t, GGUF_TYPE_UINT16)
GETTER(gguf_get_i16, int16_t, GGUF_TYPE_INT16)
GETTER(gguf_get_u32, uint32_t, GGUF_TYPE_UINT32)
GETTER(gguf_get_i32, int32_t, GGUF_TYPE_INT32)
GETTER(gguf_get_u64, uint64_t, GGUF_TYPE_UINT64)
GETTER(gguf_get_i64, int64_t, GGUF_TYPE_INT64)
GETTER(gguf_get_f32, float, GGUF_TYPE_FLOAT32)
GETTER(gguf_get_f64, double, GGUF_TYPE_FLOAT64)

int gguf_get_bool(const gguf_t *g, const char *key, int *out)
{
    const gguf_kv_t *kv;
    int rc = get_typed(g, key, GGUF_TYPE_BOOL, &kv);
    if (rc == GGUF_OK) *out = g->base[kv->val_off] != 0;
    return rc;
}

/* Read one integer of type t at p as int64. */
static int read_int(gguf_type_t t, const uint8_t *p, int64_t *out)
{
    switch (t) {
    case GGUF_TYPE_UINT8: case GGUF_TYPE_BOOL: *out = p[0]; return GGUF_OK;
    case GGUF_TYPE_INT8: { int8_t v; memcpy(&v, p, 1); *out = v; return GGUF_OK; }
    case GGUF_TYPE_UINT16: { uint16_t v; memcpy(&v, p, 2); *out = v; return GGUF_OK; }
    case GGUF_TYPE_INT16: { int16_t v; memcpy(&v, p, 2); *out = v; return GGUF_OK; }
    case GGUF_TYPE_UINT32: { uint32_t v; memcpy(&v, p, 4); *out = v; return GGUF_OK; }
    case GGUF_TYPE_INT32: { int32_t v; memcpy(&v, p, 4); *out = v; return GGUF_OK; }
    case GGUF_TYPE_INT64: { int64_t v; memcpy(&v, p, 8); *out = v; return GGUF_OK; }
    case GGUF_TYPE_UINT64: {
        uint64_t v;
        memcpy(&v, p, 8);
        if (v > (uint64_t)INT64_MAX) return GGUF_ERANGE;
        *out = (int64_t)v;
        return GGUF_OK;
    }
    default: return GGUF_ETYPE;
    }
}

static int read_float(gguf_type_t t, const uint8_t *p, double *out)
{
    if (t == GGUF_TYPE_FLOAT32) {
        float v;
        memcpy(&v, p, 4);
        *out = v;
        return GGUF_OK;
    }
    if (t == GGUF_TYPE_FLOAT64) {
        memcpy(out, p, 8);
        return GGUF_OK;
    }
    return GGUF_ETYPE;
}

int gguf_get_int(const gguf_t *g, const char *key, int64_t *out)
{
    int64_t i = gguf_find_key(g, key);
    if (i < 0) return GGUF_ENOKEY;
    return read_int(g->kv[i].type, g->base + g->kv[i].val_off, out);
}

int gguf_get_float(const gguf_t *g, const char *key, double *out)
{
    int64_t i = gguf_find_key(g, key);
    if (i < 0) return GGUF_ENOKEY;
    return read_float(g->kv[i].type, g->base + g->kv[i].val_off, out);
}

/* The string whose u64 length prefix is at off (validated at open). */
static void str_at(const gguf_t *g, uint64_t off, const char **s, size_t *len)
{
    uint64_t n;
    memcpy(&n, g->base + off, 8);
    *len = (size_t)n;
    *s = (const char *)g->base + off + 8;
}

int gguf_get_str(const gguf_t *g, const char *key, const char **s, size_t *len)
{
    const gguf_kv_t *kv;
    int rc = get_typed(g, key, GGUF_TYPE_STRING, &kv);
    if (rc == GGUF_OK) str_at(g, kv->val_off, s, len);
    return rc;
}

char *gguf_get_str_dup(const gguf_t *g, const char *key)
{
    const char *s;
    size_t len;
    if (gguf_get_str(g, key, &s, &len) != GGUF_OK) return NULL;
    char *d = malloc(len + 1);
    if (!d) return NULL;
    memcpy(d, s, len);
    d[len] = 0;
    return d;
}

static int get_arr(const gguf_t *g, int64_t kv, const gguf_kv_t **e)
{
    if (kv < 0 || kv >= g->n_kv) return GGUF_ENOKEY;
    if (g->kv[kv].type != GGUF_TYPE_ARRAY) return GGUF_ETYPE;
    *e = &g->kv[kv];
    return GGUF_OK;
}

int gguf_arr_info(const gguf_t *g, int64_t kv, gguf_type_t *elem_type, uint64_t *n)
{
    const gguf_kv_t *e;
    int rc = get_arr(g, kv, &e);
    if (rc != GGUF_OK) return rc;
    if (elem_type) *elem_type = e->elem_type;
    if (n) *n = e->n;
    return GGUF_OK;
}

const void *gguf_arr_data(const gguf_t *g, int64_t kv)
{
    const gguf_kv_t *e;
    if (get_arr(g, kv, &e) != GGUF_OK || e->elem_type == GGUF_TYPE_STRING) return NULL;
    return g->base + e->data_off;
}

int gguf_arr_get_int(const gguf_t *g, int64_t kv, uint64_t i, int64_t *out)
{
    const gguf_kv_t *e;
    int rc = get_arr(g, kv, &e);
    if (rc != GGUF_OK) return rc;
    if (e->elem_type == GGUF_TYPE_STRING) return GGUF_ETYPE;
    if (i >= e->n) return GGUF_ERANGE;
    return read_int(e->elem_type, g->base + e->data_off + i * type_sizes[e->elem_type], out);
}

int gguf_arr_get_float(const gguf_t *g, int64_t kv, uint64_t i, double *out)
{
    const gguf_kv_t *e;
    int rc = get_arr(g, kv, &e);
    if (rc != GGUF_OK) return rc;
    if (e->elem_type != GGUF_TYPE_FLOAT32 && e->elem_type != GGUF_TYPE_FLOAT64) return GGUF_ETYPE;
    if (i >= e->n) return GGUF_ERANGE;
    return read_float(e->elem_type, g->base + e->data_off + i * type_sizes[e->elem_type], out);
}

int gguf_arr_get_str(const gguf_t *g, int64_t kv, uint64_t i, const char **s, size_t *len)
{
    const gguf_kv_t *e;
    int rc = get_arr(g, kv, &e);
    if (rc != GGUF_OK) return rc;
    if (e->elem_type != GGUF_TYPE_STRING) return GGUF_ETYPE;
    if (i >= e->n) return GGUF_ERANGE;
    str_at(g, e->str_off[i], s, len);
    return GGUF_OK;
}

int64_t gguf_n_tensors(const gguf_t *g) { return g->n_tensors; }

const gguf_tensor_t *gguf_tensor(const gguf_t *g, int64_t i)
{
    return i >= 0 && i < g->n_tensors ? &g->tensors[i] : NULL;
}

const gguf_tensor_t *gguf_find_tensor(const gguf_t *g, const char *name)
{
    int64_t i = tensor_lookup(g, name);
    return i >= 0 ? &g->tensors[i] : NULL;
}
