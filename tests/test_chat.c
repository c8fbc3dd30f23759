/* tests/test_chat.c: chat template recognition and rendering. The expected strings are
 * what Jinja2 renders from the real templates (SmolLM2's, from the default model) or
 * from templates of the same structure as the official Llama 2 / Llama 3 ones, minus
 * the leading BOS that the tokenizer adds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/chat.h"
#include "daemon/tok.h"
#include "worker/gguf.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define SMOL_SYS "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

/* A ChatML template with a default system turn (the default model's has one too: that
 * test reads the real text from the model). */
static const char smol_like[] =
    "{%- for m in messages -%}{%- if loop.first and messages[0].role != 'system' -%}"
    "{{ '<|im_start|>system\n" SMOL_SYS "<|im_end|>\n' }}{%- endif -%}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}";

/* A ChatML template whose default system turn is written with escapes. */
static const char chatml_escaped[] =
    "{%- if messages[0]['role'] != \"system\" %}{{- \"<|im_start|>system\\nBe \\\"nice\\\".<|im_end|>\\n\" }}"
    "{%- endif %}{%- for m in messages %}{{- \"<|im_start|>\" + m.role + \"\\n\" + m.content + "
    "\"<|im_end|>\\n\" }}{%- endfor %}";

/* A ChatML template without a default system turn. */
static const char chatml_plain[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>system\\n' "
    "+ 'x' }}{% endif %}";

static const char llama3_like[] =
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{{ content }}{% endfor %}";

static const char llama2_like[] =
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + "
    "' [/INST]' }}{% endif %}{% endfor %}";

static const char phi3_like[] =
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}"
    "{{'<|user|>' + '\\n' + message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}"
    "{% endif %}{% endfor %}";

static const chat_msg msg_u[] = {{"user", "Hi there"}};
static const chat_msg msg_su[] = {{"system", "Be brief."}, {"user", "Hi there"}};
static const chat_msg msg_uau[] = {
    {"user", "Hi"}, {"assistant", "Hello! How can I help?"}, {"user", "Tell me a joke."}};
static const chat_msg msg_suau[] = {{"system", "Be brief."},
                                    {"user", "Hi"},
                                    {"assistant", "Hello! How can I help?"},
                                    {"user", "Tell me a joke."}};

static void expect_render(chat_style st, const char *sys, const chat_msg *m, int n, int gen,
                          const char *want)
{
    char *out = NULL, err[256];
    if (chat_render_sys(st, sys, m, n, gen, &out, err, sizeof err) != 0) fail_msg("%s", err);
    if (strcmp(out, want) != 0) fail_msg("rendered\n[%s]\nwanted\n[%s]", out, want);
    free(out);
}

static void test_recognise(void **state)
{
    (void)state;
    chat_style st;
    assert_int_equal(chat_style_from_template(smol_like, &st), 0);
    assert_int_equal(st, CHAT_CHATML);
    assert_int_equal(chat_style_from_template(llama3_like, &st), 0);
    assert_int_equal(st, CHAT_LLAMA3);
    assert_int_equal(chat_style_from_template(llama2_like, &st), 0);
    assert_int_equal(st, CHAT_LLAMA2);
    assert_int_equal(chat_style_from_template(phi3_like, &st), 0);
    assert_int_equal(st, CHAT_PHI3);
    assert_int_equal(chat_style_from_template("{{ '<start_of_turn>' + m }}", &st), -1);
    assert_int_equal(st, CHAT_UNKNOWN);
    assert_int_equal(chat_style_from_template(NULL, &st), -1);
    assert_int_equal(chat_style_from_name("llama-3", &st), 0);
    assert_int_equal(st, CHAT_LLAMA3);
    assert_int_equal(chat_style_from_name("chatml", &st), 0);
    assert_int_equal(st, CHAT_CHATML);
    assert_int_equal(chat_style_from_name("vicuna", &st), -1);
    assert_string_equal(chat_style_name(CHAT_LLAMA2), "llama2");
    assert_string_equal(chat_style_name((chat_style)42), "unknown");
}

static void test_default_system(void **state)
{
    (void)state;
    char *s = chat_default_system(smol_like);
    assert_non_null(s);
    assert_string_equal(s, SMOL_SYS);
    free(s);
    s = chat_default_system(chatml_escaped);
    assert_non_null(s);
    assert_string_equal(s, "Be \"nice\".");
    free(s);
    assert_null(chat_default_system(chatml_plain));
    assert_null(chat_default_system(llama3_like));
    assert_null(chat_default_system(NULL));
}

static void test_chatml(void **state)
{
    (void)state;
    expect_render(CHAT_CHATML, SMOL_SYS, msg_u, 1, 1,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(CHAT_CHATML, SMOL_SYS, msg_u, 1, 0,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n");
    expect_render(CHAT_CHATML, SMOL_SYS, msg_su, 2, 1,
                  "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
                  "<|im_start|>assistant\n");
    expect_render(CHAT_CHATML, SMOL_SYS, msg_uau, 3, 1,
                  "<|im_start|>system\n" SMOL_SYS "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\nHello! How can I help?<|im_end|>\n<|im_start|>user\nTell "
                  "me a joke.<|im_end|>\n<|im_start|>assistant\n");
    expect_render(CHAT_CHATML, NULL, msg_u, 1, 1,
                  "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n");
    expect_render(CHAT_CHATML, SMOL_SYS, NULL, 0, 0, "");
    char *out;
    assert_int_equal(chat_render(CHAT_CHATML, msg_su, 2, 0, &out), 0);
    assert_string_equal(out, "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n");
    free(out);
}

static void test_llama3(void **state)
{
    (void)state;
    expect_render(CHAT_LLAMA3, NULL, msg_u, 1, 1,
                  "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    const chat_msg su[] = {{"system", "Be brief."}, {"user", " Hi there\n"}};
    expect_render(CHAT_LLAMA3, NULL, su, 2, 1,
                  "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
    expect_render(CHAT_LLAMA3, NULL, msg_suau, 4, 1,
                  "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHello! How can I help?<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nTell me a joke.<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n");
}

static void test_llama2(void **state)
{
    (void)state;
    expect_render(CHAT_LLAMA2, NULL, msg_u, 1, 1, "[INST] Hi there [/INST]");
    const chat_msg su[] = {{"system", "Be brief."}, {"user", " Hi there\n"}};
    expect_render(CHAT_LLAMA2, NULL, su, 2, 1,
                  "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n Hi there [/INST]");
    expect_render(CHAT_LLAMA2, NULL, msg_suau, 4, 1,
                  "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! How can I help? "
                  "</s><s>[INST] Tell me a joke. [/INST]");
    /* roles it cannot express are errors */
    char *out = (char *)1, err[256];
    const chat_msg bad1[] = {{"user", "a"}, {"tool", "b"}};
    assert_int_equal(chat_render_sys(CHAT_LLAMA2, NULL, bad1, 2, 1, &out, err, sizeof err), -1);
    assert_null(out);
    assert_non_null(strstr(err, "tool"));
    const chat_msg bad2[] = {{"user", "a"}, {"user", "b"}};
    assert_int_equal(chat_render_sys(CHAT_LLAMA2, NULL, bad2, 2, 1, &out, err, sizeof err), -1);
    assert_non_null(strstr(err, "alternate"));
    const chat_msg bad3[] = {{"user", "a"}, {"system", "b"}};
    assert_int_equal(chat_render_sys(CHAT_LLAMA2, NULL, bad3, 2, 1, &out, err, sizeof err), -1);
}

static void test_phi3(void **state)
{
    (void)state;
    /* matches the Phi-3 template of ../shared's phi-3 vocabulary for user/assistant turns */
    expect_render(CHAT_PHI3, NULL, msg_u, 1, 1, "<|user|>\nHi there<|end|>\n<|assistant|>\n");
    expect_render(CHAT_PHI3, NULL, msg_uau, 3, 1,
                  "<|user|>\nHi<|end|>\n<|assistant|>\nHello! How can I help?<|end|>\n<|user|>\n"
                  "Tell me a joke.<|end|>\n<|assistant|>\n");
    char *out, err[256];
    const chat_msg bad[] = {{"tool", "x"}};
    assert_int_equal(chat_render_sys(CHAT_PHI3, NULL, bad, 1, 1, &out, err, sizeof err), -1);
}

static void test_bad_input(void **state)
{
    (void)state;
    char *out, err[256];
    const chat_msg noc[] = {{"user", NULL}};
    assert_int_equal(chat_render_sys(CHAT_CHATML, NULL, noc, 1, 1, &out, err, sizeof err), -1);
    assert_non_null(strstr(err, "message 0"));
    assert_int_equal(chat_render_sys(CHAT_UNKNOWN, NULL, msg_u, 1, 1, &out, err, sizeof err), -1);
    assert_int_equal(chat_render(CHAT_CHATML, msg_u, -1, 1, &out), -1);
}

static void test_template_init(void **state)
{
    (void)state;
    chat_template ct;
    char err[256];
    assert_int_equal(chat_template_init(&ct, smol_like, NULL, err, sizeof err), 0);
    assert_int_equal(ct.style, CHAT_CHATML);
    assert_string_equal(ct.default_system, SMOL_SYS);
    char *out;
    assert_int_equal(chat_template_render(&ct, msg_u, 1, 1, &out, err, sizeof err), 0);
    assert_non_null(strstr(out, SMOL_SYS));
    free(out);
    chat_template_free(&ct);
    chat_template_free(&ct);
    /* unknown family: an error unless a style is named */
    assert_int_equal(chat_template_init(&ct, "{{ '<start_of_turn>' }}", NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "unknown family"));
    assert_int_equal(chat_template_init(&ct, "{{ '<start_of_turn>' }}", "llama3", err, sizeof err), 0);
    assert_int_equal(ct.style, CHAT_LLAMA3);
    assert_null(ct.default_system);
    chat_template_free(&ct);
    assert_int_equal(chat_template_init(&ct, NULL, NULL, err, sizeof err), -1);
    assert_non_null(strstr(err, "no tokenizer.chat_template"));
    assert_int_equal(chat_template_init(&ct, smol_like, "nope", err, sizeof err), -1);
    assert_non_null(strstr(err, "nope"));
    /* a named style over a recognised one */
    assert_int_equal(chat_template_init(&ct, llama3_like, "chatml", err, sizeof err), 0);
    assert_int_equal(ct.style, CHAT_CHATML);
    chat_template_free(&ct);
}

/* The default model's real template, and its rendering tokenized. */
static void test_default_model(void **state)
{
    (void)state;
    if (access(DEFAULT_MODEL, R_OK) != 0) {
        printf("skip: %s is missing (run 'make model')\n", DEFAULT_MODEL);
        skip();
    }
    gguf_t *g;
    char err[512];
    if (gguf_open(DEFAULT_MODEL, &g, err, sizeof err) != 0) fail_msg("%s", err);
    char *tmpl = gguf_get_str_dup(g, "tokenizer.chat_template");
    assert_non_null(tmpl);
    chat_template ct;
    assert_int_equal(chat_template_init(&ct, tmpl, NULL, err, sizeof err), 0);
    assert_int_equal(ct.style, CHAT_CHATML);
    assert_string_equal(ct.default_system, SMOL_SYS);
    char *out;
    assert_int_equal(chat_template_render(&ct, msg_u, 1, 1, &out, err, sizeof err), 0);
    tok_t *t;
    if (tok_new_from_gguf(g, &t, err, sizeof err) != 0) fail_msg("%s", err);
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(t, out, strlen(out), 1, 1, &ids, &n), 0);
    /* <|im_start|> system \n ... <|im_end|> \n <|im_start|> user ... <|im_start|> assistant \n */
    assert_int_equal(ids[0], 1);
    int starts = 0, ends = 0;
    for (int i = 0; i < n; i++) {
        starts += ids[i] == 1;
        ends += ids[i] == 2;
    }
    assert_int_equal(starts, 3);
    assert_int_equal(ends, 2);
    char *back;
    size_t bl;
    assert_int_equal(tok_decode(t, ids, n, TOK_DECODE_SPECIAL, &back, &bl), 0);
    assert_string_equal(back, out);
    free(back);
    free(ids);
    free(out);
    tok_destroy(&t);
    chat_template_free(&ct);
    free(tmpl);
    gguf_close(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_recognise),  cmocka_unit_test(test_default_system),
        cmocka_unit_test(test_chatml),     cmocka_unit_test(test_llama3),
        cmocka_unit_test(test_llama2),     cmocka_unit_test(test_phi3),
        cmocka_unit_test(test_bad_input),  cmocka_unit_test(test_template_init),
        cmocka_unit_test(test_default_model),
    };
    return cmocka_run_group_tests_name("chat", tests, NULL, NULL);
}
