#!/usr/bin/env python3
"""scripts/golden.py: record reference outputs of an independent implementation
(llama.cpp, through llama-cpp-python built from source) into tests/golden/.

    .venv/bin/python scripts/golden.py [--out tests/golden] [--only smollm2,tiny,tok]
                                       [--mkmodel build/tools/mkmodel] [--no-variation]

What it writes (tests/golden/README.md is the full description):
  smollm2.json + smollm2.bin   the default model: 4 prompts, llama.cpp's prompt token ids,
                               logits at every position (top 64 + every 37th id), 32 greedy
                               tokens and their logits;
  tiny_<type>.json + .bin      random models from build/tools/mkmodel (the exact arguments
                               and the file's SHA-256 are recorded), full logits;
  tok_smollm2.jsonl            llama.cpp's tokenization of corpus.txt with the default model.
Each model's JSON also records how far llama.cpp's own logits move between settings
(threads, KV type, batching) and against exact float math on the same dequantized
weights (a numpy forward pass written here, needs the `gguf` package), which is what
the tolerance of the C golden test rests on.
"""
import argparse
import datetime
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_MODEL = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
FORMAT = "duet-golden-1"
N_GEN = 32          # greedy continuation tokens per prompt
TOP_N = 64          # (id, logit) pairs kept per row for large vocabularies
STRIDE = 37         # and the logits of ids 0, 37, 74, ...
N_THREADS = 2

SMOLLM2_PROMPTS = [
    ("english", "The history of the printing press begins in the fifteenth century, when"),
    ("code", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
             "    if n < 2:\n        return n\n"),
    ("chat", "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by "
             "Hugging Face<|im_end|>\n<|im_start|>user\nWhat is the capital of France?"
             "<|im_end|>\n<|im_start|>assistant\n"),
    ("multilingual", "Der Bär läuft über die Straße. Le café est très chaud. "
                     "東京は日本の首都です。"),
]

# Random models: every weight type at shapes the K-quants accept (multiples of 256),
# grouped-query attention (4 query heads over 2 KV heads, head_dim 64), plus a qwen2
# model (Q/K/V biases, NeoX RoPE) and one with tied embeddings.
TINY_SHAPE = ["--n-embd", "256", "--n-layer", "2", "--n-head", "4", "--n-head-kv", "2",
              "--n-ff", "512", "--n-ctx", "256"]
TINY_MODELS = [(f"tiny_{t}", ["--arch", "llama", "--type", t, "--seed", str(101 + i)] + TINY_SHAPE)
               for i, t in enumerate(["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q6_k"])]
TINY_MODELS += [
    ("tiny_qwen2_f32", ["--arch", "qwen2", "--type", "f32", "--seed", "201"] + TINY_SHAPE),
    ("tiny_tied_q8_0", ["--arch", "llama", "--type", "q8_0", "--seed", "202", "--tied"] + TINY_SHAPE),
]
TINY_TEXT = "Hello world, this is a test of the tiny model."
TINY_RANDOM_LEN = 24
TINY_RANDOM_SEED = 7


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ggml_version(llama_cpp):
    """ggml's version, from the shared library's file name (libggml.so.X.Y.Z)."""
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    try:
        for f in sorted(os.listdir(libdir)):
            if f.startswith("libggml.so.") and f.count(".") >= 4:
                return f[len("libggml.so."):]
    except OSError:
        pass
    return None


def reference_info():
    import llama_cpp
    info = {
        "impl": "llama.cpp",
        "llama_cpp_python": llama_cpp.__version__,
        "libllama": llama_cpp.llama_version().decode(),
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "build": "pip install llama-cpp-python with CMAKE_ARGS=-DGGML_NATIVE=ON (from source)",
        "ggml": ggml_version(llama_cpp),
        "machine": platform.machine(),
        "recorded": datetime.date.today().isoformat(),
    }
    try:
        import importlib.metadata as md
        info["numpy"] = md.version("numpy")
        info["gguf_py"] = md.version("gguf")
    except Exception:
        pass
    return info


# ---- llama.cpp ----------------------------------------------------------------------

class LlamaRef:
    """One llama.cpp context over a model with logits for every evaluated token."""

    def __init__(self, path, n_threads=N_THREADS, kv_f32=True, n_ctx=512):
        import llama_cpp
        self.llama_cpp = llama_cpp
        kw = dict(type_k=0, type_v=0) if kv_f32 else {}  # GGML_TYPE_F32 = 0; default is f16
        self.m = llama_cpp.Llama(path, n_threads=n_threads, n_threads_batch=n_threads,
                                 logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                 flash_attn=False, verbose=False, seed=0, **kw)
        self.n_vocab = self.m.n_vocab()
        self.greedy = llama_cpp.llama_sampler_init_greedy()

    def close(self):
        self.llama_cpp.llama_sampler_free(self.greedy)
        self.m.close()

    def tokenize(self, text, add_bos=False):
        return self.m.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def run(self, prompt_ids, n_gen=N_GEN, stepwise=True, forced=None):
        """Evaluates the prompt in one batch, then n_gen greedy tokens one decode call at a
        time (or `forced` tokens; or all in one batch when stepwise is False). Returns
        (generated ids, logits [len(prompt)+n_gen][n_vocab] float32)."""
        m = self.m
        m.reset()
        if not stepwise:
            seq = list(prompt_ids) + list(forced)
            m.eval(seq)
            return list(forced), np.array(m.scores[:len(seq)], dtype=np.float32)
        m.eval(prompt_ids)
        gen = []
        for i in range(n_gen):
            if forced is not None:
                tok = forced[i]
            else:
                tok = self.llama_cpp.llama_sampler_sample(self.greedy, m._ctx.ctx, -1)
                row = m.scores[m.n_tokens - 1]
                assert tok == int(np.argmax(row)), "llama.cpp greedy disagrees with argmax"
            gen.append(int(tok))
            m.eval([tok])
        return gen, np.array(m.scores[:m.n_tokens], dtype=np.float32)


# ---- exact float reference (numpy) ---------------------------------------------------

class FloatRef:
    """Llama/Qwen2 forward pass in float64 over the GGUF's dequantized weights: exact
    math, no activation quantization. For measuring llama.cpp's deviation only."""

    def __init__(self, path):
        from gguf import GGUFReader
        from gguf.quants import dequantize
        r = GGUFReader(path)

        def field(key):
            f = r.fields[key]
            v = f.contents()
            return v

        self.arch = field("general.architecture")
        a = self.arch
        self.n_layer = int(field(f"{a}.block_count"))
        self.n_embd = int(field(f"{a}.embedding_length"))
        self.n_head = int(field(f"{a}.attention.head_count"))
        self.n_head_kv = int(field(f"{a}.attention.head_count_kv"))
        self.eps = float(field(f"{a}.attention.layer_norm_rms_epsilon"))
        self.rope_base = float(field(f"{a}.rope.freq_base")) if f"{a}.rope.freq_base" in r.fields else 10000.0
        self.head_dim = self.n_embd // self.n_head
        self.w = {}
        for t in r.tensors:
            d = dequantize(t.data, t.tensor_type)
            self.w[t.name] = np.asarray(d, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])
        if "output.weight" not in self.w:
            self.w["output.weight"] = self.w["token_embd.weight"]

    def _rms(self, x, w):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + self.eps) * w

    def _rope(self, x, pos):
        # x: [n_tok][heads][head_dim]; llama: adjacent pairs; qwen2: halves (NeoX)
        d = self.head_dim
        inv = self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = pos[:, None] * inv[None, :]                      # [n_tok][d/2]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        if self.arch == "qwen2":
            a, b = x[..., : d // 2], x[..., d // 2:]
            return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out

    def logits(self, ids):
        W = self.w
        n = len(ids)
        x = W["token_embd.weight"][np.asarray(ids)].astype(np.float64)
        pos = np.arange(n, dtype=np.float64)
        hd, nh, nkv = self.head_dim, self.n_head, self.n_head_kv
        mask = np.triu(np.full((n, n), -np.inf), 1)
        for L in range(self.n_layer):
            p = f"blk.{L}."
            h = self._rms(x, W[p + "attn_norm.weight"])
            q = h @ W[p + "attn_q.weight"].T
            k = h @ W[p + "attn_k.weight"].T
            v = h @ W[p + "attn_v.weight"].T
            if p + "attn_q.bias" in W:
                q, k, v = q + W[p + "attn_q.bias"], k + W[p + "attn_k.bias"], v + W[p + "attn_v.bias"]
            q = self._rope(q.reshape(n, nh, hd), pos)
            k = self._rope(k.reshape(n, nkv, hd), pos)
            v = v.reshape(n, nkv, hd)
            att = np.empty((n, nh, hd))
            for hh in range(nh):
                g = hh // (nh // nkv)
                s = q[:, hh, :] @ k[:, g, :].T / np.sqrt(hd) + mask
                s = np.exp(s - s.max(axis=1, keepdims=True))
                s /= s.sum(axis=1, keepdims=True)
                att[:, hh, :] = s @ v[:, g, :]
            x = x + att.reshape(n, nh * hd) @ W[p + "attn_output.weight"].T
            h = self._rms(x, W[p + "ffn_norm.weight"])
            g = h @ W[p + "ffn_gate.weight"].T
            u = h @ W[p + "ffn_up.weight"].T
            x = x + ((g / (1.0 + np.exp(-g))) * u) @ W[p + "ffn_down.weight"].T
        x = self._rms(x, W["output_norm.weight"])
        return (x @ W["output.weight"].T).astype(np.float32)


# ---- storage --------------------------------------------------------------------------

def top_strided_rows(logits):
    """Per row: int32 ids[TOP_N] (best first, ties by lower id), float32 logits[TOP_N],
    float32 logits of ids 0, STRIDE, 2*STRIDE, ... ."""
    out = bytearray()
    for row in logits:
        order = np.lexsort((np.arange(row.size), -row.astype(np.float64)))[:TOP_N]
        out += order.astype("<i4").tobytes()
        out += row[order].astype("<f4").tobytes()
        out += row[::STRIDE].astype("<f4").tobytes()
    return bytes(out)


def diff_stats(a, b):
    """How far logits a [rows][n_vocab] are from b: the largest and typical |a - b|, the
    per-row maximum (median and 90th percentile over rows), that maximum over the mean row
    standard deviation of b, and how often the argmax agrees; where it does not, the
    largest top-1/top-2 margin of b among those rows (a tie-break flip has a tiny one)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    d = np.abs(a64 - b64)
    rowmax = d.max(axis=1)
    scale = float(np.mean(np.std(b64, axis=1)))
    dis = np.argmax(a64, 1) != np.argmax(b64, 1)
    top2 = np.sort(b64, axis=1)[:, -2:]
    margins = (top2[:, 1] - top2[:, 0])[dis]
    return {"rows": int(a.shape[0]),
            "max_abs": round(float(d.max()), 6), "mean_abs": round(float(d.mean()), 6),
            "row_max_median": round(float(np.median(rowmax)), 6),
            "row_max_p90": round(float(np.percentile(rowmax, 90)), 6),
            "max_abs_over_row_std": round(float(d.max()) / scale, 6) if scale > 0 else None,
            "argmax_agree": round(float(np.mean(~dis)), 4),
            "disagree_max_margin": round(float(margins.max()), 6) if margins.size else None}


def merge_stats(stats):
    """One summary over several diff_stats (maxima of maxima, row-weighted means)."""
    if not stats:
        return None
    w = np.array([s["rows"] for s in stats], dtype=np.float64)
    avg = lambda k: round(float(np.sum(w * [s[k] for s in stats]) / w.sum()), 6)
    margins = [s["disagree_max_margin"] for s in stats if s["disagree_max_margin"] is not None]
    return {"rows": int(w.sum()),
            "max_abs": max(s["max_abs"] for s in stats), "mean_abs": avg("mean_abs"),
            "row_max_median": avg("row_max_median"), "row_max_p90": max(s["row_max_p90"] for s in stats),
            "max_abs_over_row_std": max(s["max_abs_over_row_std"] or 0 for s in stats),
            "argmax_agree": avg("argmax_agree"),
            "disagree_max_margin": max(margins) if margins else None}


def record_model(name, path, model_desc, cases_in, out_dir, layout, variation=True, info=None):
    """Runs llama.cpp over each (case name, text or None, prompt ids or None) and writes
    name.json and name.bin."""
    ref = LlamaRef(path)
    n_vocab = ref.n_vocab
    cases, blob, row0 = [], bytearray(), 0
    runs = []
    for cname, text, ids in cases_in:
        prompt = ref.tokenize(text) if ids is None else list(ids)
        gen, logits = ref.run(prompt)
        runs.append((prompt, gen, logits))
        assert logits.shape == (len(prompt) + N_GEN, n_vocab)
        blob += top_strided_rows(logits) if layout == "top+strided" else logits.astype("<f4").tobytes()
        c = {"name": cname}
        if text is not None:
            c["text"] = text
        c.update({"prompt_ids": [int(t) for t in prompt], "greedy_ids": gen,
                  "n_rows": int(logits.shape[0]), "first_row": row0})
        row0 += logits.shape[0]
        cases.append(c)
    ref.close()

    var = None
    if variation:
        var = measure_variation(path, runs)
    if layout == "top+strided":
        n_strided = (n_vocab + STRIDE - 1) // STRIDE
        lay = {"layout": "top+strided", "top_n": TOP_N, "stride": STRIDE, "n_strided": n_strided,
               "row_bytes": TOP_N * 8 + n_strided * 4}
    else:
        lay = {"layout": "full", "row_bytes": n_vocab * 4}
    lay["file"] = name + ".bin"
    lay["n_rows"] = row0
    doc = {
        "format": FORMAT,
        "model": model_desc,
        "n_vocab": n_vocab,
        "reference": dict(info or {}, n_threads=N_THREADS, kv_type="f32", flash_attn=False,
                          add_bos=False, special_tokens_parsed=True),
        "generation": (f"prompt evaluated in one batch, then {N_GEN} tokens one decode call each, "
                       "chosen by llama.cpp's greedy sampler (argmax, lowest id on ties); "
                       "generation does not stop at EOS. Row j of a case holds the logits after "
                       "token j of prompt_ids + greedy_ids, so row len(prompt_ids)-1+i predicted "
                       "greedy_ids[i]."),
        "logits": lay,
        "cases": cases,
        "variation": var,
    }
    with open(os.path.join(out_dir, name + ".bin"), "wb") as f:
        f.write(blob)
    with open(os.path.join(out_dir, name + ".json"), "w") as f:
        json.dump(doc, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"golden: {name}: {len(cases)} cases, {row0} rows, {len(blob)} bytes"
          + (f"; float ref max |d| {var['float_ref_vs_llama']['max_abs']}" if var and var.get("float_ref_vs_llama") else ""))


def measure_variation(path, runs):
    """How much llama.cpp's logits move with settings, and against exact float math,
    over the recorded cases (teacher-forced on the recorded greedy tokens)."""
    res = {}
    settings = {
        "threads_1_vs_2": dict(n_threads=1),
        "kv_f16_vs_f32": dict(kv_f32=False),
    }
    for key, kw in settings.items():
        r = LlamaRef(path, **kw)
        res[key] = merge_stats([diff_stats(r.run(p, forced=g)[1], l) for p, g, l in runs])
        r.close()
    r = LlamaRef(path)
    res["one_batch_vs_stepwise"] = merge_stats(
        [diff_stats(r.run(p, forced=g, stepwise=False)[1], l) for p, g, l in runs])
    r.close()
    try:
        fr = FloatRef(path)
    except ImportError as e:
        res["float_ref_vs_llama"] = None
        res["float_ref_note"] = f"skipped: {e} (pip install gguf)"
        return res
    res["float_ref_vs_llama"] = merge_stats(
        [diff_stats(l, fr.logits(list(p) + list(g))) for p, g, l in runs])
    res["float_ref_note"] = ("recorded llama.cpp logits against exact float64 math over the "
                             "same dequantized weights (numpy forward pass in this script); "
                             "argmax_agree is per row, disagree_max_margin is the float "
                             "reference's top-1/top-2 margin where they disagree")
    return res


# ---- the three groups -------------------------------------------------------------------

def do_smollm2(out_dir, variation, info):
    path = os.path.join(ROOT, DEFAULT_MODEL)
    desc = {"source": "file", "path": DEFAULT_MODEL, "sha256": sha256_file(path)}
    record_model("smollm2", path, desc, [(n, t, None) for n, t in SMOLLM2_PROMPTS], out_dir,
                 "top+strided", variation, info)


def find_mkmodel(arg):
    cands = [arg] if arg else ["build/tools/mkmodel", "build/ref/tools/mkmodel"]
    for c in cands:
        p = c if os.path.isabs(c) else os.path.join(ROOT, c)
        if os.access(p, os.X_OK):
            return p
    sys.exit("golden: no mkmodel (build it: make build/tools/mkmodel, or pass --mkmodel)")


def do_tiny(out_dir, variation, info, mkmodel):
    rng = np.random.default_rng(TINY_RANDOM_SEED)
    with tempfile.TemporaryDirectory() as tmp:
        for name, args in TINY_MODELS:
            path = os.path.join(tmp, name + ".gguf")
            subprocess.run([mkmodel] + args + ["-o", path], check=True)
            # the C test re-creates the model from these arguments and checks the hash
            desc = {"source": "mkmodel", "args": args, "sha256": sha256_file(path)}
            ref = LlamaRef(path)
            n_vocab = ref.n_vocab
            ref.close()
            rand_ids = [int(x) for x in rng.integers(3, n_vocab, TINY_RANDOM_LEN)]
            record_model(name, path, desc, [("text", TINY_TEXT, None), ("random_ids", None, rand_ids)],
                         out_dir, "full", variation, info)


def read_corpus(path):
    """corpus.txt: one text per line; escapes \\n \\t \\r \\\\ and \\s (a space, for
    leading/trailing spaces that editors would drop); lines starting with '# ' are
    comments and empty lines are skipped."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("# ") or line == "":
                continue
            out, i = [], 0
            while i < len(line):
                ch = line[i]
                if ch == "\\" and i + 1 < len(line):
                    nx = line[i + 1]
                    rep = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "s": " "}.get(nx)
                    if rep is not None:
                        out.append(rep)
                        i += 2
                        continue
                out.append(ch)
                i += 1
            texts.append("".join(out))
    return texts


def do_tok(out_dir, corpus):
    import llama_cpp
    path = os.path.join(ROOT, DEFAULT_MODEL)
    m = llama_cpp.Llama(path, vocab_only=True, verbose=False)
    texts = read_corpus(corpus)
    with open(os.path.join(out_dir, "tok_smollm2.jsonl"), "w", encoding="utf-8") as f:
        for t in texts:
            ids = m.tokenize(t.encode("utf-8"), add_bos=False, special=True)
            # round trip through llama.cpp's detokenizer, as a sanity check of the corpus
            back = m.detokenize(ids, special=True).decode("utf-8", errors="replace")
            if back != t:
                print(f"golden: note: detokenize differs for {t[:40]!r}", file=sys.stderr)
            f.write(json.dumps({"text": t, "ids": ids}, ensure_ascii=False) + "\n")
    m.close()
    print(f"golden: tok_smollm2.jsonl: {len(texts)} texts")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "golden"))
    ap.add_argument("--only", default="smollm2,tiny,tok")
    ap.add_argument("--mkmodel", default=None)
    ap.add_argument("--corpus", default=os.path.join(ROOT, "tests", "golden", "corpus.txt"))
    ap.add_argument("--no-variation", action="store_true",
                    help="skip the tolerance measurements (faster)")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    only = set(a.only.split(","))
    info = reference_info()
    with open(os.path.join(a.out, "reference.json"), "w") as f:
        json.dump(info, f, indent=1)
        f.write("\n")
    if "tok" in only:
        do_tok(a.out, a.corpus)
    if "smollm2" in only:
        do_smollm2(a.out, not a.no_variation, info)
    if "tiny" in only:
        do_tiny(a.out, not a.no_variation, info, find_mkmodel(a.mkmodel))


if __name__ == "__main__":
    main()
