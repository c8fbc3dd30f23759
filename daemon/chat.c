/* daemon/chat.c: chat template families and their rendering; see chat.h. */
#include "daemon/chat.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static const struct {
    const char *name;
    chat_style style;
} style_names[] = {
    {"chatml", CHAT_CHATML}, {"llama2", CHAT_LLAMA2}, {"llama-2", CHAT_LLAMA2},
    {"llama3", CHAT_LLAMA3}, {"llama-3", CHAT_LLAMA3}, {"phi3", CHAT_PHI3},
    {"phi-3", CHAT_PHI3},
};

int chat_style_from_name(const char *name, chat_style *out)
{
    *out = CHAT_UNKNOWN;
    for (size_t i = 0; name && i < sizeof style_names / sizeof *style_names; i++)
        if (strcmp(name, style_names[i].name) == 0) {
            *out = style_names[i].style;
            return 0;
        }
    return -1;
}

const char *chat_style_name(chat_style style)
{
    for (size_t i = 0; i < sizeof style_names / sizeof *style_names; i++)
        if (style_names[i].style == style) return style_names[i].name;
    return "unknown";
}

int chat_style_from_template(const char *tmpl, chat_style *out)
{
    *out = CHAT_UNKNOWN;
    if (!tmpl) return -1;
    if (strstr(tmpl, "<|im_start|>")) *out = CHAT_CHATML;
    else if (strstr(tmpl, "<|start_header_id|>") && strstr(tmpl, "<|end_header_id|>"))
        *out = CHAT_LLAMA3;
    else if (strstr(tmpl, "[INST]") && strstr(tmpl, "[/INST]"))
        *out = CHAT_LLAMA2;
    else if (strstr(tmpl, "<|user|>") && strstr(tmpl, "<|end|>") && strstr(tmpl, "<|assistant|>"))
        *out = CHAT_PHI3;
    return *out == CHAT_UNKNOWN ? -1 : 0;
}

char *chat_default_system(const char *tmpl)
{
    static const char open[] = "<|im_start|>system";
    static const char close[] = "<|im_end|>";
    if (!tmpl) return NULL;
    /* a string literal that holds a whole system turn: '<|im_start|>system\n...<|im_end|>' */
    for (const char *p = strstr(tmpl, open); p; p = strstr(p + 1, open)) {
        if (p == tmpl || (p[-1] != '\'' && p[-1] != '"')) continue;
        char quote = p[-1];
        const char *q = p + sizeof open - 1;
        if (*q == '\n') q++;
        else if (q[0] == '\\' && q[1] == 'n') q += 2;
        else continue;
        size_t cap = strlen(q) + 1, k = 0;
        char *s = malloc(cap);
        if (!s) return NULL;
        int ok = 0;
        while (*q) {
            if (strncmp(q, close, sizeof close - 1) == 0) {
                ok = 1;
                break;
            }
            if (*q == quote) break; /* the literal ends before the turn does */
            if (q[0] == '\\' && q[1]) {
                char c = q[1];
                s[k++] = c == 'n' ? '\n' : c == 't' ? '\t' : c;
                q += 2;
                continue;
            }
            s[k++] = *q++;
        }
        s[k] = 0;
        if (ok && k > 0 && !strstr(s, "{{") && !strstr(s, "{%")) return s;
        free(s);
    }
    return NULL;
}

/* ---- rendering ------------------------------------------------------------ */

typedef struct {
    char *p;
    size_t len, cap;
    int oom;
} sbuf_t;

static void put_n(sbuf_t *b, const char *s, size_t n)
{
    if (b->oom) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, s, n);
    b->len += n;
    b->p[b->len] = 0;
}

static void put(sbuf_t *b, const char *s) { put_n(b, s, strlen(s)); }

/* s without leading and trailing whitespace (Python's str.strip on ASCII space). */
static void put_stripped(sbuf_t *b, const char *s)
{
    static const char ws[] = " \t\n\r\v\f";
    while (*s && strchr(ws, *s)) s++;
    size_t n = strlen(s);
    while (n > 0 && strchr(ws, s[n - 1])) n--;
    put_n(b, s, n);
}

static int render_chatml(sbuf_t *b, const chat_msg *m, int n, int gen)
{
    for (int i = 0; i < n; i++) {
        put(b, "<|im_start|>");
        put(b, m[i].role);
        put(b, "\n");
        put(b, m[i].content);
        put(b, "<|im_end|>\n");
    }
    if (gen) put(b, "<|im_start|>assistant\n");
    return 0;
}

static int render_llama3(sbuf_t *b, const chat_msg *m, int n, int gen)
{
    for (int i = 0; i < n; i++) {
        put(b, "<|start_header_id|>");
        put(b, m[i].role);
        put(b, "<|end_header_id|>\n\n");
        put_stripped(b, m[i].content);
        put(b, "<|eot_id|>");
    }
    if (gen) put(b, "<|start_header_id|>assistant<|end_header_id|>\n\n");
    return 0;
}

static int render_llama2(sbuf_t *b, const chat_msg *m, int n, char *err, size_t errlen)
{
    const char *sys = NULL;
    int i0 = 0;
    if (n > 0 && strcmp(m[0].role, "system") == 0) {
        sys = m[0].content;
        i0 = 1;
    }
    for (int i = i0; i < n; i++) {
        int user = strcmp(m[i].role, "user") == 0;
        if (!user && strcmp(m[i].role, "assistant") != 0) {
            set_err(err, errlen, "chat message %d: role '%s' cannot be expressed in the llama2 "
                    "template (system first, then user and assistant)", i, m[i].role);
            return -1;
        }
        if ((i - i0) % 2 != (user ? 0 : 1)) {
            set_err(err, errlen, "chat message %d: the llama2 template needs user and assistant "
                    "turns to alternate, starting with user", i);
            return -1;
        }
        sbuf_t c = {0};
        if (i == i0 && sys) {
            put(&c, "<<SYS>>\n");
            put(&c, sys);
            put(&c, "\n<</SYS>>\n\n");
        }
        put(&c, m[i].content);
        if (c.oom) {
            free(c.p);
            return -1;
        }
        if (user) {
            if (i > i0) put(b, "<s>");
            put(b, "[INST] ");
            put_stripped(b, c.p ? c.p : "");
            put(b, " [/INST]");
        } else {
            put(b, " ");
            put_stripped(b, c.p ? c.p : "");
            put(b, " </s>");
        }
        free(c.p);
    }
    return 0;
}

static int render_phi3(sbuf_t *b, const chat_msg *m, int n, int gen, char *err, size_t errlen)
{
    for (int i = 0; i < n; i++) {
        const char *r = m[i].role;
        if (strcmp(r, "system") != 0 && strcmp(r, "user") != 0 && strcmp(r, "assistant") != 0) {
            set_err(err, errlen, "chat message %d: role '%s' cannot be expressed in the phi3 "
                    "template (system, user, assistant)", i, r);
            return -1;
        }
        put(b, "<|");
        put(b, r);
        put(b, "|>\n");
        put(b, m[i].content);
        put(b, "<|end|>\n");
    }
    if (gen) put(b, "<|assistant|>\n");
    return 0;
}

int chat_render_sys(chat_style style, const char *default_system, const chat_msg *msgs, int n,
                    int add_generation_prompt, char **out, char *err, size_t errlen)
{
    *out = NULL;
    if (n < 0 || (n > 0 && !msgs)) {
        set_err(err, errlen, "chat: bad message count %d", n);
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (!msgs[i].role || !msgs[i].content || !msgs[i].role[0]) {
            set_err(err, errlen, "chat message %d: missing role or content", i);
            return -1;
        }
    /* the template's default system prompt, when the conversation has none */
    chat_msg *all = NULL;
    if (default_system && n > 0 && strcmp(msgs[0].role, "system") != 0) {
        all = malloc(((size_t)n + 1) * sizeof *all);
        if (!all) {
            set_err(err, errlen, "chat: out of memory");
            return -1;
        }
        all[0] = (chat_msg){"system", default_system};
        memcpy(all + 1, msgs, (size_t)n * sizeof *msgs);
        msgs = all;
        n++;
    }
    sbuf_t b = {0};
    int rc;
    switch (style) {
    case CHAT_CHATML: rc = render_chatml(&b, msgs, n, add_generation_prompt); break;
    case CHAT_LLAMA3: rc = render_llama3(&b, msgs, n, add_generation_prompt); break;
    case CHAT_LLAMA2: rc = render_llama2(&b, msgs, n, err, errlen); break;
    case CHAT_PHI3: rc = render_phi3(&b, msgs, n, add_generation_prompt, err, errlen); break;
    default:
        set_err(err, errlen, "chat: unknown template style %d", (int)style);
        rc = -1;
    }
    free(all);
    if (rc == 0 && b.oom) {
        set_err(err, errlen, "chat: out of memory");
        rc = -1;
    }
    if (rc == 0 && !b.p) { /* nothing to render: an empty string */
        b.p = calloc(1, 1);
        if (!b.p) {
            set_err(err, errlen, "chat: out of memory");
            rc = -1;
        }
    }
    if (rc != 0) {
        free(b.p);
        return -1;
    }
    *out = b.p;
    return 0;
}

int chat_render(chat_style style, const chat_msg *msgs, int n, int add_generation_prompt,
                char **out)
{
    return chat_render_sys(style, NULL, msgs, n, add_generation_prompt, out, NULL, 0);
}

int chat_template_init(chat_template *ct, const char *tmpl, const char *style_name, char *err,
                       size_t errlen)
{
    ct->style = CHAT_UNKNOWN;
    ct->default_system = NULL;
    if (style_name && *style_name) {
        if (chat_style_from_name(style_name, &ct->style) != 0) {
            set_err(err, errlen, "unknown chat template style '%s' (chatml, llama2, llama3, phi3)",
                    style_name);
            return -1;
        }
    } else if (!tmpl) {
        set_err(err, errlen, "the model has no tokenizer.chat_template: name a chat template "
                "style (chatml, llama2, llama3, phi3)");
        return -1;
    } else if (chat_style_from_template(tmpl, &ct->style) != 0) {
        set_err(err, errlen, "the model's chat template is of an unknown family (it has none of "
                "the markers of chatml, llama2, llama3, phi3): name a style");
        return -1;
    }
    if (ct->style == CHAT_CHATML && tmpl) ct->default_system = chat_default_system(tmpl);
    return 0;
}

void chat_template_free(chat_template *ct)
{
    if (!ct) return;
    free(ct->default_system);
    ct->default_system = NULL;
}

int chat_template_render(const chat_template *ct, const chat_msg *msgs, int n,
                         int add_generation_prompt, char **out, char *err, size_t errlen)
{
    return chat_render_sys(ct->style, ct->default_system, msgs, n, add_generation_prompt, out, err,
                           errlen);
}
