"""Embedding throughput: the pipeline's batched encoder vs the reference's one-example loop.

The batched side is exactly what each `mrm embed` Ray actor runs
(mrm_ray.embed.PairEncoder: batched chat-template tokenization, texts sorted by
length, sub-batches bounded by --batch-tokens padded tokens).  The reference
side is MRM's preprocessing loop: one conversation at a time,
`model(ids, output_hidden_states=True)`, keep the last hidden state.  Same
model, same texts, same pooling, one process; both include tokenization.

  CPU (the demo MiniLM, texts from the synthetic text population):
    python benchmarks/embed.py
    python benchmarks/embed.py --dtype bfloat16      # CPUs with AMX / AVX512-BF16
    python benchmarks/embed.py --model /path/to/model --pairs 256 --batch-tokens 8192
  GPU, a random Llama-3.1-8B-shaped reward model in bf16 (no weights needed):
    python benchmarks/embed.py --llama8b-shape --pairs 512 --batch-tokens 32768

MFU in --llama8b-shape mode counts forward FLOPs over real (unpadded) tokens:
    FLOPs = sum_i (2 * N * T_i + 2 * n_layers * T_i^2 * d_model)
N = non-embedding parameters, T_i = length of text i; the second term is
attention scores and values (Kaplan et al. 2020, counted without the causal
halving).  MFU = FLOPs / seconds / --peak-tflops (989 = H100/H200 dense bf16).
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from types import SimpleNamespace

import numpy as np
import torch

from mrm_ray.data import contract as C
from mrm_ray.embed import PairEncoder, default_cpu_model, load_backbone, pair_conversations
from mrm_ray.synth_text import generate


def sample_pairs(n: int, seed: int = 0) -> list[dict]:
    users = max(1, -(-n // 8))
    pairs, _, _ = generate(users, 8, seed=seed)
    return pairs[:n]


@torch.no_grad()
def reference_loop(model, tokenizer, conversations, pooling: str, device) -> tuple[torch.Tensor, int]:
    """MRM's encode loop, one text at a time (mean/cls pooling for encoders, else the last token)."""
    out, tokens = [], 0
    for conv in conversations:
        if tokenizer.chat_template:
            ids = tokenizer.apply_chat_template(conv, tokenize=True, return_dict=True, return_tensors="pt")["input_ids"]
        else:
            ids = tokenizer("\n\n".join(m["content"] for m in conv), return_tensors="pt")["input_ids"]
        ids = ids.to(device)
        hidden = model(ids, output_hidden_states=True).hidden_states[-1][0]
        out.append({"last": hidden[-1], "cls": hidden[0], "mean": hidden.mean(0)}[pooling].float().cpu())
        tokens += ids.shape[1]
    return torch.stack(out), tokens


def _sync(device):
    if device.type == "cuda":
        _sync(device)


def bench_model(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = load_backbone(args.model or default_cpu_model(), device=device, dtype=args.dtype)
    enc = PairEncoder(model, tok, batch_tokens=args.batch_tokens or None, max_length=args.max_length)
    pairs = sample_pairs(args.pairs)
    convs = pair_conversations([p[C.PROMPT] for p in pairs], [p[C.CHOSEN] for p in pairs],
                           [p[C.REJECTED] for p in pairs])
    print(f"model={args.model or 'all-MiniLM-L6-v2 (packaged)'} device={device} dtype={model.dtype} "
          f"threads={torch.get_num_threads()} pooling={enc.pooling} texts={len(convs)} "
          f"batch_tokens={enc.batch_tokens}")
    enc.encode_ids(enc.tokenize(convs[:8])[0])  # warm-up both paths
    reference_loop(model, tok, convs[:8], enc.pooling, device)
    # The reference loop times an evenly spaced subset (same length mix); tokens/s normalizes.
    n_ref = min(len(convs), args.reference_texts or len(convs))
    ref_convs = convs[:: max(1, len(convs) // n_ref)][:n_ref]

    # Best of --repeats, alternating the two sides: on a shared machine the minimum
    # time is the one least disturbed by other processes.
    best_batched = best_ref = 0.0
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        ids, _ = enc.tokenize(convs)
        batched, _ = enc.encode_ids(ids)
        _sync(device)
        best_batched = max(best_batched, sum(len(s) for s in ids) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        ref, ref_tokens = reference_loop(model, tok, ref_convs, enc.pooling, device)
        _sync(device)
        best_ref = max(best_ref, ref_tokens / (time.perf_counter() - t0))
    texts_per_token = len(convs) / sum(len(s) for s in ids)
    diff = (batched[:: max(1, len(convs) // n_ref)][:n_ref] - ref).abs().max().item()
    report(best_batched, best_ref, best_batched * texts_per_token, best_ref * len(ref_convs) / ref_tokens, diff)


def report(batched_tps, ref_tps, batched_rows, ref_rows, diff=None):
    print(f"batched (token-bounded, length-sorted): {batched_tps:10.0f} tokens/s  {batched_rows:8.1f} texts/s")
    print(f"reference (one text at a time):         {ref_tps:10.0f} tokens/s  {ref_rows:8.1f} texts/s")
    check = f"   max |batched - reference| = {diff:.2e}" if diff is not None else ""
    print(f"speed-up: {batched_tps / ref_tps:.1f}x{check}")


def bench_llama8b_shape(args):
    """A random Llama-3.1-8B-shaped reward model in bf16: tokens/s and MFU of the batched encoder."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and args.layers == 32:
        raise SystemExit("--llama8b-shape needs a GPU (8B parameters in bf16 are 16 GB); "
                         "for a CPU smoke test pass --device cpu --layers 1")
    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rope_theta=500000.0, num_labels=1, pad_token_id=0)
    flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
    with torch.device(device):  # random weights created in place, in bf16: no 32 GB fp32 detour
        model = LlamaForSequenceClassification._from_config(
            config, attn_implementation="flash_attention_2" if flash else "sdpa", dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    n_params = sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n)
    # Reward-model texts: lengths like chat turns with a response, 64..2048 tokens, log-uniform.
    rng = np.random.default_rng(0)
    lengths = np.exp(rng.uniform(np.log(64), np.log(2048), 2 * args.pairs)).astype(int)
    seqs = [rng.integers(1, config.vocab_size, n).tolist() for n in lengths]
    tok = SimpleNamespace(pad_token_id=0, eos_token_id=0, padding_side="right", all_special_ids=[],
                          model_max_length=10**9, chat_template=None)
    enc = PairEncoder(model, tok, pooling="last", batch_tokens=args.batch_tokens or 32768, max_length=4096)
    print(f"Llama-3.1-8B shape: {n_params / 1e9:.2f}B non-embedding params, attn={model.config._attn_implementation}, "
          f"texts={len(seqs)}, mean length={lengths.mean():.0f}, batch_tokens={enc.batch_tokens}")
    enc.encode_ids(seqs[:16])  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    enc.encode_ids(seqs)
    _sync(device)
    dt = time.perf_counter() - t0
    tokens = int(lengths.sum())
    flops = float(np.sum(2.0 * n_params * lengths + 2.0 * config.num_hidden_layers * lengths.astype(float) ** 2
                         * config.hidden_size))
    print(f"batched: {tokens / dt:,.0f} tokens/s, {len(seqs) / dt:.1f} texts/s, "
          f"{flops / dt / 1e12:.1f} TFLOP/s = MFU {flops / dt / (args.peak_tflops * 1e12):.1%} "
          f"(peak {args.peak_tflops} TFLOP/s)")
    n_ref = min(len(seqs), args.reference_texts or len(seqs))
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in seqs[:n_ref]:
            model(torch.tensor([s], device=device), output_hidden_states=True)
    _sync(device)
    t_ref = time.perf_counter() - t0
    report(tokens / dt, int(lengths[:n_ref].sum()) / t_ref, len(seqs) / dt, n_ref / t_ref)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="backbone path or name (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--pairs", type=int, default=256, help="pairs to embed (2 texts each)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="max padded tokens per forward pass (0 = the pipeline's default: 16384 GPU, 4096 CPU)")
    p.add_argument("--max-length", type=int, default=4096, help="truncation length")
    p.add_argument("--reference-texts", type=int, default=64,
                   help="texts timed in the one-at-a-time loop (evenly spaced; 0 = all)")
    p.add_argument("--repeats", type=int, default=3, help="report the best of this many timed runs of each side")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="both sides' compute dtype; auto = bfloat16 on GPU, float32 on CPU (bfloat16 pays off "
                        "on CPUs with AMX/AVX512-BF16)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--llama8b-shape", action="store_true", help="GPU only: random Llama-3.1-8B-shaped bf16 model")
    p.add_argument("--layers", type=int, default=32, help="--llama8b-shape: decoder layers (32 = the real shape)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator's dense bf16 peak for MFU")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bench_llama8b_shape(args) if args.llama8b_shape else bench_model(args)


if __name__ == "__main__":
    main()
