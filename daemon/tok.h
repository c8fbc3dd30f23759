/* daemon/tok.h: the tokenizer, built from a GGUF file's tokenizer.* metadata.
 *
 * Two models:
 *  - byte-level BPE (tokenizer.ggml.model "gpt2": GPT-2, Llama 3, Qwen2, SmolLM2,
 *    StarCoder, Falcon, DeepSeek...): the text is split by the regular expressions
 *    that tokenizer.ggml.pre names (run through PCRE2 in UTF and UCP mode), each piece's
 *    bytes are mapped to GPT-2's byte characters and merged by the ranks of
 *    tokenizer.ggml.merges;
 *  - SentencePiece-style BPE (tokenizer.ggml.model "llama": Llama 2, Mistral, Phi-3):
 *    spaces become "▁", a "▁" is prefixed (add_space_prefix) at the start and after
 *    each special token, characters are merged by token score, and what no token
 *    covers falls back to byte tokens <0xXX>.
 * Special tokens (CONTROL, and UNKNOWN) are recognised in the text when the caller asks
 * (parse_special); USER_DEFINED tokens always are. Matching is leftmost, longest first.
 *
 * A tok_t is immutable after tok_new_from_gguf(): encode and decode may run from
 * several threads at once. It copies what it needs: the gguf_t may be closed after.
 */
#ifndef DUET_DAEMON_TOK_H
#define DUET_DAEMON_TOK_H

#include <stddef.h>
#include <stdint.h>

#include "worker/gguf.h"

typedef struct tok tok_t;

/* Token types (tokenizer.ggml.token_type; the values are GGUF's). */
typedef enum {
    TOK_NORMAL = 1,
    TOK_UNKNOWN = 2,
    TOK_CONTROL = 3,
    TOK_USER_DEFINED = 4,
    TOK_UNUSED = 5,
    TOK_BYTE = 6,
} tok_type;

typedef enum {
    TOK_MODEL_BPE = 1, /* byte-level BPE ("gpt2") */
    TOK_MODEL_SPM = 2, /* SentencePiece BPE ("llama") */
} tok_model;

/* Decode flags. */
enum {
    TOK_DECODE_SPECIAL = 1,     /* render CONTROL/UNKNOWN tokens as their text (else nothing) */
    TOK_DECODE_STRIP_SPACE = 2, /* SPM with add_space_prefix: drop the leading space that
                                   encoding added (so that decode(encode(x)) == x) */
};

/* Build the tokenizer of g. 0, or -1 with a message in err (missing or inconsistent
 * tokenizer metadata, an unsupported model or pre-tokenizer, out of memory). */
int tok_new_from_gguf(const gguf_t *g, tok_t **out, char *err, size_t errlen);
void tok_destroy(tok_t **self_p);

/* Encode len bytes of text (any bytes; invalid UTF-8 is encoded byte by byte).
 * add_special: add BOS / EOS where the model's metadata asks (tok_add_bos/eos).
 * parse_special: turn the text of CONTROL tokens into those tokens.
 * *ids_out is malloc'd, the caller's (also when *n_out is 0). 0, or -1 (out of memory). */
int tok_encode(const tok_t *t, const char *text, size_t len, int add_special, int parse_special,
               int32_t **ids_out, int *n_out);

/* Decode n ids to bytes (not NUL-terminated data, but a NUL is appended for
 * convenience; *len_out excludes it). *text_out is malloc'd, the caller's. Returns 0,
 * or -1 for an id out of range (nothing allocated) or out of memory. */
int tok_decode(const tok_t *t, const int32_t *ids, int n, int flags, char **text_out,
               size_t *len_out);

/* The bytes that token id decodes to (special tokens: their text), borrowed; NULL for
 * an id out of range. */
const char *tok_piece(const tok_t *t, int32_t id, size_t *len);
/* The token's text as stored in the vocabulary (byte-level or "▁" form), borrowed. */
const char *tok_text(const tok_t *t, int32_t id, size_t *len);
/* The id whose vocabulary text is exactly text[0..len), or -1. */
int32_t tok_find(const tok_t *t, const char *text, size_t len);

int tok_n_vocab(const tok_t *t);
tok_model tok_model_of(const tok_t *t);
const char *tok_pre_name(const tok_t *t); /* tokenizer.ggml.pre, or "default" */
tok_type tok_type_of(const tok_t *t, int32_t id); /* 0 for an id out of range */
int32_t tok_bos(const tok_t *t); /* -1 when the model has none */
int32_t tok_eos(const tok_t *t);
int32_t tok_eot(const tok_t *t); /* end of turn (e.g. <|eot_id|>), or -1 */
int32_t tok_pad(const tok_t *t);
int32_t tok_unk(const tok_t *t);
int tok_add_bos(const tok_t *t); /* tokenizer.ggml.add_bos_token (default: SPM 1, BPE 0) */
int tok_add_eos(const tok_t *t);
int tok_add_space_prefix(const tok_t *t);
/* 1 when id ends generation: eos, eot, eom, or a control token such as <|im_end|>,
 * <|eot_id|>, <|end|>, <|endoftext|>. */
int tok_is_eog(const tok_t *t, int32_t id);

/* ---- incremental decoding ----------------------------------------------- */

/* Turns a stream of ids into text that never ends in the middle of a UTF-8 character:
 * bytes of an incomplete character are held back until the next push. Output is valid
 * UTF-8 (invalid bytes become U+FFFD). */
typedef struct tok_stream tok_stream_t;

/* flags: TOK_DECODE_* as for tok_decode. 0, or -1 (out of memory). */
int tok_stream_new(const tok_t *t, int flags, tok_stream_t **out);
void tok_stream_destroy(tok_stream_t **self_p);
/* Add one token; *text / *len receive the newly complete text (possibly empty), valid
 * until the next call on s. 0, or -1 for an id out of range or out of memory. */
int tok_stream_push(tok_stream_t *s, int32_t id, const char **text, size_t *len);
/* End of stream: whatever is held back (an incomplete character becomes U+FFFD); the
 * stream is then ready for a new sequence. */
int tok_stream_flush(tok_stream_t *s, const char **text, size_t *len);

#endif
