/* daemon/chat.h: chat templates, recognised from a GGUF's tokenizer.chat_template.
 *
 * duet does not run Jinja: it recognises the template family by its distinctive
 * markers and renders that family in C:
 *   chatml  <|im_start|>role\ncontent<|im_end|>\n ... <|im_start|>assistant\n
 *           (SmolLM2, Qwen2; a default system prompt that the template inserts when the
 *           conversation has none is extracted from the template and inserted too)
 *   llama2  [INST] <<SYS>>\nsystem\n<</SYS>>\n\nuser [/INST] assistant </s><s>[INST] ...
 *   llama3  <|start_header_id|>role<|end_header_id|>\n\ncontent<|eot_id|> ...
 *   phi3    <|system|>\n...<|end|>\n<|user|>\ncontent<|end|>\n<|assistant|>\n
 * The rendered text holds special tokens as text: tokenize it with parse_special on.
 * It does not start with the BOS token: encode with add_special so that the tokenizer
 * adds BOS where the model wants one (later turns of llama2 carry "<s>" as text).
 */
#ifndef DUET_DAEMON_CHAT_H
#define DUET_DAEMON_CHAT_H

#include <stddef.h>

typedef enum {
    CHAT_UNKNOWN = 0,
    CHAT_CHATML = 1,
    CHAT_LLAMA2 = 2,
    CHAT_LLAMA3 = 3,
    CHAT_PHI3 = 4,
} chat_style;

/* One message: role ("system", "user", "assistant", ...) and content, both
 * NUL-terminated and borrowed. */
typedef struct {
    const char *role;
    const char *content;
} chat_msg;

/* Recognise the family of a Jinja template text. 0, or -1 (and CHAT_UNKNOWN) when no
 * known family's markers are there. */
int chat_style_from_template(const char *tmpl, chat_style *out);
/* "chatml", "llama2" (or "llama-2"), "llama3" (or "llama-3"), "phi3" (or "phi-3"). 0 or -1. */
int chat_style_from_name(const char *name, chat_style *out);
/* The style's name ("chatml", ...); "unknown" otherwise. Static. */
const char *chat_style_name(chat_style style);
/* The system prompt that a ChatML template inserts when the first message is not a
 * system message (e.g. SmolLM2's "You are a helpful AI assistant named SmolLM, trained
 * by Hugging Face"), malloc'd, the caller's; NULL when the template has none. */
char *chat_default_system(const char *tmpl);

/* Render n messages in style; add_generation_prompt appends the assistant's header.
 * default_system (may be NULL) is inserted as a first system message when msgs has
 * none. *out is malloc'd, the caller's. 0, or -1 with a message in err (an unknown
 * style, a role the style cannot express, out of memory). */
int chat_render_sys(chat_style style, const char *default_system, const chat_msg *msgs, int n,
                    int add_generation_prompt, char **out, char *err, size_t errlen);
/* The same without a default system prompt. */
int chat_render(chat_style style, const chat_msg *msgs, int n, int add_generation_prompt,
                char **out);

/* A model's template: its style and default system prompt, from the template text and
 * an optional style name that overrides recognition. */
typedef struct {
    chat_style style;
    char *default_system; /* owned; NULL when none */
} chat_template;

/* From tmpl (may be NULL: the model has none) and style_name (may be NULL: recognise).
 * 0, or -1 with a message in err: no template and no name, a template of an unknown
 * family (name a style), or an unknown name. */
int chat_template_init(chat_template *ct, const char *tmpl, const char *style_name, char *err,
                       size_t errlen);
void chat_template_free(chat_template *ct); /* safe twice */
int chat_template_render(const chat_template *ct, const chat_msg *msgs, int n,
                         int add_generation_prompt, char **out, char *err, size_t errlen);

#endif
