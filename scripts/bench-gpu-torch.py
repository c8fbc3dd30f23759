#!/usr/bin/env python3
"""scripts/bench-gpu-torch.py: bench/bench_gpu.c's workloads in PyTorch, side by side.

Reads the JSON that `bench_gpu --run --json FILE` wrote (the GPU, the model's shapes, the
decode and prefill figures), builds a Hugging Face transformers Llama of the same shapes
with random bf16 weights on the GPU (SDPA attention, DynamicCache, no torch.compile: the
library as most people run it), times the same workloads, and prints one Markdown table
with both, each beside the GPU's peak:

  decode B x C   B sequences whose cache holds C positions (filled by a chunked prefill,
                 not timed); one step = one token per sequence with logits; median step;
                 bandwidth counted with the same bytes as duet's (weights + K/V read);
  prefill T      one prompt of T tokens, logits of the last one; tokens/s and TFLOP/s with
                 duet's FLOP count.

  python3 scripts/bench-gpu-torch.py --duet build/bench-gpu.json [--reps N] [--json OUT]

PyTorch and transformers are on the GPU machine (not a dependency of duet).
"""
import argparse
import json
import statistics
import sys
import time


def median_time(fn, reps, warmup, sync):
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def build_model(mo, device):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=mo["n_vocab"],
        hidden_size=mo["n_embd"],
        intermediate_size=mo["n_ff"],
        num_hidden_layers=mo["n_layer"],
        num_attention_heads=mo["n_head"],
        num_key_value_heads=mo["n_head_kv"],
        head_dim=mo["head_dim"],
        max_position_embeddings=32768,
        rope_theta=mo["rope_base"],
        rms_norm_eps=mo["rms_eps"],
        tie_word_embeddings=False,
    )
    try:
        cfg._attn_implementation = "sdpa"
    except Exception:  # a version where it is read-only: its default is SDPA too
        pass
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype=torch.bfloat16).eval()


def forward_last_logits(model, ids, **kw):
    """model(...) keeping only the last position's logits where the version allows it."""
    for key in ("logits_to_keep", "num_logits_to_keep"):
        try:
            return model(input_ids=ids, **{key: 1}, **kw)
        except TypeError:
            continue
    return model(input_ids=ids, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duet", required=True, help="bench_gpu's JSON")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default: duet's)")
    ap.add_argument("--json", default=None, help="also write the torch figures here")
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    with open(a.duet) as f:
        d = json.load(f)
    import torch
    import transformers
    from transformers import DynamicCache

    if a.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench-gpu-torch: no CUDA device for PyTorch")
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    mo = d["model"]
    reps = a.reps or d.get("reps", 20)
    model = build_model(mo, a.device)
    V = mo["n_vocab"]
    wbytes = mo["matrix_params"] * 2.0
    kv_tok = mo["kv_bytes_per_token"]
    attn_w = mo["n_layer"] * mo["n_head"] * mo["head_dim"]
    gen = torch.Generator(device=a.device).manual_seed(1)

    decode = []
    with torch.no_grad():
        for row in d["decode"]:
            B, C = row["batch"], row["ctx"]
            try:
                cache = DynamicCache(config=model.config)
            except TypeError:  # versions whose cache takes no configuration
                cache = DynamicCache()
            ids = torch.randint(0, V, (B, C), device=a.device, generator=gen)
            chunk = max(1, 8192 // B)
            for c0 in range(0, C, chunk):  # fill the cache (not timed), no logits
                model.model(input_ids=ids[:, c0:c0 + chunk], past_key_values=cache, use_cache=True)
            tok = torch.randint(0, V, (B, 1), device=a.device, generator=gen)
            sec = median_time(lambda: model(input_ids=tok, past_key_values=cache, use_cache=True), reps, 3, sync)
            grown = C + 3 + reps / 2.0
            decode.append({"batch": B, "ctx": C, "ms": sec * 1e3, "tok_s": B / sec,
                           "gbs": (wbytes + B * grown * kv_tok) / sec / 1e9})
            del cache, ids
            torch.cuda.empty_cache() if a.device == "cuda" else None
        prefill = []
        for row in d["prefill"]:
            T = row["tokens"]
            ids = torch.randint(0, V, (1, T), device=a.device, generator=gen)
            sec = median_time(lambda: forward_last_logits(model, ids, use_cache=True), min(reps, 5), 1, sync)
            prefill.append({"tokens": T, "ms": sec * 1e3, "tok_s": T / sec,
                            "tflops": (2.0 * mo["matrix_params"] * T + 2.0 * T * T * attn_w) / sec / 1e12})

    pbw, ptf = d["peak_bw_gbs"], d["peak_bf16_tflops"]
    pct = lambda x, p: f"{100 * x / p:.0f}%" if p else "?"
    print(f"\nGPU: {d['gpu']} ({d['n_sm']} SMs); peaks from its clocks: {pbw:.0f} GB/s, {ptf:.0f} bf16 TFLOP/s")
    print(f"model: {mo['n_layer']} layers, n_embd {mo['n_embd']}, {mo['n_head']}/{mo['n_head_kv']} heads of "
          f"{mo['head_dim']}, n_ff {mo['n_ff']}, vocab {V}, {mo['matrix_params'] / 1e9:.2f} G matrix parameters, bf16")
    print(f"PyTorch {torch.__version__}, transformers {transformers.__version__} (SDPA, DynamicCache, eager)\n")
    print("| decode batch | context | duet ms | duet GB/s | of peak | torch ms | torch GB/s | of peak | duet speed-up |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for du, to in zip(d["decode"], decode):
        print(f"| {du['batch']} | {du['ctx']} | {du['ms']:.3f} | {du['gbs']:.0f} | {pct(du['gbs'], pbw)} | "
              f"{to['ms']:.3f} | {to['gbs']:.0f} | {pct(to['gbs'], pbw)} | {to['ms'] / du['ms']:.2f}x |")
    print("\n| prefill tokens | duet tokens/s | duet TFLOP/s | of peak | torch tokens/s | torch TFLOP/s | of peak |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for du, to in zip(d["prefill"], prefill):
        print(f"| {du['tokens']} | {du['tok_s']:.0f} | {du['tflops']:.1f} | {pct(du['tflops'], ptf)} | "
              f"{to['tok_s']:.0f} | {to['tflops']:.1f} | {pct(to['tflops'], ptf)} |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"torch": torch.__version__, "transformers": transformers.__version__,
                       "decode": decode, "prefill": prefill}, f, indent=1)


if __name__ == "__main__":
    main()
