/* kernels/ops.c: element-wise and row operations (portable, with AVX2 dispatch). */
#include "kernels/ops.h"

#include <math.h>

#include "kernels/cpu.h"
#include "kernels/ops_internal.h"

/* One implementation for every path, in llama.cpp's arithmetic: squares rounded to
 * float and summed in order in double, the mean rounded to float, then x * scale * w
 * with float roundings. The model amplifies last-bit differences here (they move the
 * 8-bit activation quantization that follows), so exactness beats a vector sum. */
void ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps)
{
    if (n <= 0) return;
    double ss = 0.0;
    for (int64_t i = 0; i < n; i++) {
        float sq = x[i] * x[i];
        ss += sq;
    }
    float mean = (float)(ss / (double)n);
    float scale = 1.0f / sqrtf(mean + eps);
    if (w)
        for (int64_t i = 0; i < n; i++) {
            float t = x[i] * scale;
            y[i] = t * w[i];
        }
    else
        for (int64_t i = 0; i < n; i++) y[i] = x[i] * scale;
}

/* e^x in the arithmetic of llama.cpp's vector exp (the scalar twin of exp256 in
 * kernels/ops_avx2.c): the same fused steps, so both paths give the same bits. */
static float exp_vec_twin(float x)
{
    const float shift = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, shift);
    const float n = z - shift;
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    float b = fmaf(-n, 0x1.62e4p-1f, x);
    b = fmaf(-n, 0x1.7f7d1cp-20f, b);
    const float u = b * b;
    const float hi = fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f));
    const float j = fmaf(hi, u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    return ldexpf(j, (int)n); /* one rounding, like AVX-512 scalef */
}

void ops_swiglu(float *y, const float *gate, const float *up, int64_t n)
{
    if (cpu_use_avx2()) {
        ops_avx2_swiglu(y, gate, up, n);
        return;
    }
    /* llama.cpp: 16-element chunks through its vector exp, the rest through expf */
    const int64_t nv = n / 16 * 16;
    for (int64_t i = 0; i < n; i++) {
        float g = gate[i];
        float e = i < nv ? exp_vec_twin(-g) : expf(-g);
        y[i] = g / (1.0f + e) * up[i];
    }
}

void ops_softmax(float *x, int64_t n)
{
    /* llama.cpp's soft_max arithmetic: max, then e^(x - max) through its vector exp in
     * 16-element chunks (each chunk summed as a float tree, chunks added in double) and
     * expf for the last n % 16, then x * (float)(1 / sum) */
    if (n <= 0) return;
    if (cpu_use_avx2()) {
        ops_avx2_softmax(x, n);
        return;
    }
    float mx = x[0];
    for (int64_t i = 1; i < n; i++)
        if (x[i] > mx) mx = x[i];
    double sum = 0.0;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        float e[16], t[8];
        for (int l = 0; l < 16; l++) x[i + l] = e[l] = exp_vec_twin(x[i + l] - mx);
        for (int l = 0; l < 8; l++) t[l] = e[l] + e[l + 8];
        for (int l = 0; l < 4; l++) t[l] += t[l + 4];
        sum += (double)((t[0] + t[2]) + (t[1] + t[3]));
    }
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += (double)x[i];
    }
    const float inv = (float)(1.0 / sum);
    for (i = 0; i < n; i++) x[i] *= inv;
}

void ops_add(float *y, const float *a, const float *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] = a[i] + b[i];
}

void ops_scale(float *y, const float *x, float s, int64_t n)
{
    for (int64_t i = 0; i < n; i++) y[i] = x[i] * s;
}

void ops_rope_cache(float *cs, int pos, const ops_rope_params *p)
{
    /* llama.cpp's float recurrence for the angles (theta_i = pos * base^(-2i/n)), so the
     * rotations match its bits; the error grows slowly with position (~3e-5 at 8k). */
    int half = p->n_dims / 2;
    float ts = powf(p->freq_base, -2.0f / (float)p->n_dims), th = (float)pos;
    for (int i = 0; i < half; i++) {
        float t = th;
        if (p->freq_factors) t /= p->freq_factors[i];
        t *= p->freq_scale;
        cs[2 * i] = cosf(t);
        cs[2 * i + 1] = sinf(t);
        th *= ts;
    }
}

void ops_rope_apply(float *x, int n_head, int head_dim, const float *cs, int n_dims,
                    ops_rope_mode mode)
{
    int half = n_dims / 2;
    for (int h = 0; h < n_head; h++) {
        float *v = x + (int64_t)h * head_dim;
        if (mode == OPS_ROPE_NEOX) {
            for (int i = 0; i < half; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1], a = v[i], b = v[i + half];
                v[i] = fmaf(a, c, -(b * s));
                v[i + half] = fmaf(a, s, b * c);
            }
        } else {
            for (int i = 0; i < half; i++) {
                float c = cs[2 * i], s = cs[2 * i + 1], a = v[2 * i], b = v[2 * i + 1];
                v[2 * i] = fmaf(a, c, -(b * s));
                v[2 * i + 1] = fmaf(a, s, b * c);
            }
        }
    }
}

void ops_rope(float *x, int n_head, int head_dim, int pos, const ops_rope_params *p)
{
    float cs[2 * 256];
    int half = p->n_dims / 2;
    for (int i0 = 0; i0 < half; i0 += 256) {
        /* angles for pairs [i0, i0 + 256) at a time (head_dim up to any size) */
        int cnt = half - i0 < 256 ? half - i0 : 256;
        for (int i = 0; i < cnt; i++) {
            double inv_freq = pow((double)p->freq_base, -2.0 * (i0 + i) / (double)p->n_dims);
            double theta = (double)pos * (double)p->freq_scale * inv_freq;
            if (p->freq_factors) theta /= (double)p->freq_factors[i0 + i];
            cs[2 * i] = (float)cos(theta);
            cs[2 * i + 1] = (float)sin(theta);
        }
        for (int h = 0; h < n_head; h++) {
            float *v = x + (int64_t)h * head_dim;
            for (int i = 0; i < cnt; i++) {
                int ia = p->mode == OPS_ROPE_NEOX ? i0 + i : 2 * (i0 + i);
                int ib = p->mode == OPS_ROPE_NEOX ? i0 + i + half : ia + 1;
                float c = cs[2 * i], s = cs[2 * i + 1], a = v[ia], b = v[ib];
                v[ia] = a * c - b * s;
                v[ib] = a * s + b * c;
            }
        }
    }
}

int ops_embed(float *y, dtype_t type, const void *table, int64_t n_vocab, int64_t n_embd,
              const int32_t *ids, int n_tok)
{
    size_t rb = dtype_row_bytes(type, n_embd);
    if (!rb) return -1;
    for (int t = 0; t < n_tok; t++)
        if (ids[t] < 0 || ids[t] >= n_vocab) return -1;
    for (int t = 0; t < n_tok; t++)
        if (dtype_to_f32(type, (const uint8_t *)table + (size_t)ids[t] * rb, y + (int64_t)t * n_embd,
                         n_embd) < 0)
            return -1;
    return 0;
}
