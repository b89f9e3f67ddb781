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

Tokens per pair, the `mrm embed` stage with and without dedup + shared prompts
(a random Llama of 6 layers on CPU, tables with realistic sharing), and the
demo's texts through `mrm embed` against plain sentence-transformers encode:
    python benchmarks/embed.py --prism-shaped      # opening turns with 4 replies, A/B later turns
    python benchmarks/embed.py --reddit-shaped     # long posts compared many times, short summaries
    python benchmarks/embed.py --demo-texts        # `mrm embed` (Ray start-up included) vs SentenceTransformer
  GPU, the same tables through the stage's pair encoder on the random 8B shape (tokens/s, MFU, before/after):
    python benchmarks/embed.py --llama8b-shape --prism-shaped --conversations 200
    python benchmarks/embed.py --llama8b-shape --reddit-shaped --posts 40
    python benchmarks/embed.py --exactness          # shared-prefix path vs plain pass on this device

MFU in --llama8b-shape mode counts forward FLOPs over real (unpadded) tokens:
    FLOPs = sum_i (2 * N * T_i + 2 * n_layers * T_i^2 * d_model)
N = non-embedding parameters, T_i = length of text i; the second term is
attention scores and values (Kaplan et al. 2020, counted without the causal
halving).  MFU = FLOPs / seconds / --peak-tflops (989 = H100/H200 dense bf16).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))   # the tests' offline tiny-model builder

from mrm_ray.backbone import PairEncoder, default_cpu_model, load_backbone, pair_conversations  # noqa: E402
from mrm_ray.data import contract as C  # noqa: E402
from mrm_ray.data import storage  # noqa: E402
from mrm_ray.synth_text import generate  # noqa: E402


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
        torch.cuda.synchronize(device)


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


def llama8b(args, device):
    """A random Llama-3.1-8B-shaped reward model in bf16 (--layers of them), built in place on `device`."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

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
    return model, config, n_params


def forward_flops(n_params: int, config, new: np.ndarray, past: np.ndarray | None = None) -> float:
    """Forward FLOPs of segments of `new` tokens each attending over `past` cached tokens plus themselves
    (the module docstring's count; a plain pass has past = 0)."""
    new = new.astype(float)
    past = np.zeros_like(new) if past is None else past.astype(float)
    return float(np.sum(2.0 * n_params * new + 2.0 * config.num_hidden_layers * new * (past + new)
                        * config.hidden_size))


def bench_llama8b_shape(args):
    """A random Llama-3.1-8B-shaped reward model in bf16: tokens/s and MFU of the batched encoder."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, n_params = llama8b(args, device)
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
    flops = forward_flops(n_params, config, lengths)
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


# --- tables with the sharing of real preference datasets ---------------------------------------------
TOKENS_PER_WORD = 2.5   # the tests' tiny byte-level BPE on its own vocabulary (measured: 2.48-2.59)


def _text(rng, lo: int, hi: int) -> str:
    """A text of lo..hi tokens (of the tiny tokenizer), words drawn from its training corpus."""
    from tiny_models import _CORPUS
    vocab = sorted({w for line in _CORPUS for w in line.split()})
    return " ".join(rng.choice(vocab, max(1, round(int(rng.integers(lo, hi + 1)) / TOKENS_PER_WORD))))


def prism_shaped(conversations: int, seed: int = 0) -> list[dict]:
    """PRISM's layout: an opening turn with four replies (one chosen: three pairs sharing the prompt and the
    chosen reply), then 0-3 later turns with two replies each, the conversation so far as the prompt.
    User messages of 15-60 tokens, replies of 100-350."""
    rng, rows = np.random.default_rng(seed), []
    for c in range(conversations):
        history = []
        for t in range(int(rng.integers(1, 5))):
            history = history + [{"role": "user", "content": _text(rng, 15, 60)}]
            replies = [_text(rng, 100, 350) for _ in range(4 if t == 0 else 2)]
            for k, r in enumerate(replies[1:]):
                rows.append({C.USER_ID: f"u{c % 97}", C.PAIR_ID: f"c{c}-t{t}-{k}", C.CONV_ID: f"c{c}",
                             C.PROMPT: history, C.CHOSEN: replies[0], C.REJECTED: r})
            history = history + [{"role": "assistant", "content": replies[0]}]
    return rows


def reddit_shaped(posts: int, seed: int = 0) -> list[dict]:
    """Reddit TL;DR's layout: a post of 200-600 tokens with 4-8 summaries of 20-60 tokens, compared 5-40
    times by different workers, each comparison two of its summaries."""
    rng, rows = np.random.default_rng(seed), []
    for p in range(posts):
        prompt = [{"role": "user", "content": "SUBREDDIT: r/advice\nTITLE: " + _text(rng, 10, 30)
                   + "\nPOST: " + _text(rng, 200, 600)}]
        summaries = [_text(rng, 20, 60) for _ in range(int(rng.integers(4, 9)))]
        for k in range(int(rng.integers(5, 41))):
            a, b = rng.choice(len(summaries), 2, replace=False)
            rows.append({C.USER_ID: f"w{int(rng.integers(60))}", C.PAIR_ID: f"p{p}-{k}", C.CONV_ID: f"p{p}-{k}",
                         C.PROMPT: prompt, C.CHOSEN: summaries[a], C.REJECTED: summaries[b]})
    return rows


def bench_shapes(args):
    """`mrm embed` on a shaped table, once per pair (today's path) and with dedup + shared prompts."""
    import pyarrow as pa
    import ray
    from tiny_models import tiny_reward_model

    from mrm_ray.embed import embed

    work = Path(tempfile.mkdtemp(prefix="mrm-embed-bench-"))
    model = tiny_reward_model(work / "model", hidden_size=args.hidden, layers=args.layers, max_positions=4096)
    shape = "prism" if args.prism_shaped else "reddit"
    rows = prism_shaped(args.conversations) if shape == "prism" else reddit_shaped(args.posts)
    storage.write_table(pa.Table.from_pylist(rows, schema=pa.schema([
        (C.USER_ID, pa.string()), (C.PAIR_ID, pa.string()), (C.CONV_ID, pa.string()), (C.PROMPT, C.PROMPT_TYPE),
        (C.CHOSEN, pa.string()), (C.REJECTED, pa.string())])), str(work / "pairs"))
    prompts = {json_key(r[C.PROMPT]) for r in rows}
    print(f"{shape}-shaped: {len(rows)} pairs, {len(prompts)} distinct prompts; a random Llama "
          f"(hidden {args.hidden}, {args.layers} layers) on CPU, dtype {args.dtype}")
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    res = {}
    for name, dedup in (("per pair (--no-dedup)", False), ("dedup + shared prompts", True)):
        t0 = time.perf_counter()
        res[name] = embed(str(work / "pairs"), str(work / f"emb-{dedup}"), model=model, dtype=args.dtype,
                          dedup=dedup)
        res[name]["wall"] = time.perf_counter() - t0
    a, b = (storage.read_table(str(work / f"emb-{d}")).sort_by(C.PAIR_ID) for d in (False, True))
    diff = max(float(np.abs(C.emb_matrix(a.column(c)) - C.emb_matrix(b.column(c))).max())
               for c in (C.CHOSEN_EMB, C.REJECTED_EMB))
    n = len(rows)
    # Today's path ran a whole pair's texts each: the per-pair count is what it computes.
    today = res["per pair (--no-dedup)"]["per_pair_tokens"]
    for name, r in res.items():
        tokens = today if name.startswith("per pair") else r["tokens"]
        print(f"  {name:24s} {tokens / n:8.1f} backbone tokens/pair ({r['padded_tokens'] / n:6.1f} with the "
              f"batches' padding)  {r['wall']:7.1f} s wall  {r['backbone_seconds']:7.1f} s in the backbone")
    old, new = res["per pair (--no-dedup)"], res["dedup + shared prompts"]
    print(f"  tokens: {today / new['tokens']:.2f}x fewer; wall: {old['wall'] / new['wall']:.2f}x faster (Ray's start-up, "
          f"reading, the shuffle and writing included); in the backbone: "
          f"{old['backbone_seconds'] / max(new['backbone_seconds'], 1e-9):.2f}x; "
          f"distinct texts {new['distinct_texts']} of {2 * n}; max |difference| {diff:.1e}")
    ray.shutdown()


def bench_shapes_llama8b(args):
    """The shaped tables through the pair encoder of `mrm embed` (no Ray) on a random Llama-3.1-8B-shaped
    model: every pair's two texts (today's path) vs each distinct text once with shared prefixes cached."""
    from tiny_models import build_tokenizer

    from mrm_ray.backbone import _radix_tree, conversation_key

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config, n_params = llama8b(args, device)
    shape = "prism" if args.prism_shaped else "reddit"
    rows = prism_shaped(args.conversations) if shape == "prism" else reddit_shaped(args.posts)
    enc = PairEncoder(model, build_tokenizer(max_length=4096), pooling="last",
                      batch_tokens=args.batch_tokens or None, max_length=4096)
    prompts = [r[C.PROMPT] for r in rows]
    ids, _ = enc.tokenize(pair_conversations(prompts, [r[C.CHOSEN] for r in rows], [r[C.REJECTED] for r in rows]))
    groups = [conversation_key(p) for p in prompts] * 2
    # The work each path does, counted from the sequences (not from the encoder): a plain pass runs every
    # text whole; the shared path runs each radix-tree segment once against its cached past.
    plain = np.array([len(s) for s in ids])
    distinct, members = {}, {}
    for s, g in zip(ids, groups):
        if tuple(s) not in distinct:
            distinct[tuple(s)] = len(distinct)
            members.setdefault(g, []).append(len(distinct) - 1)
    seqs, seg_new, seg_past = [list(s) for s in distinct], [], []
    for m in members.values():
        stack = _radix_tree(seqs, m)
        while stack:
            node = stack.pop()
            seg_new.append(node.end - node.start)
            seg_past.append(node.start)
            stack += node.children
    seg_new, seg_past = np.array(seg_new), np.array(seg_past)
    print(f"{shape}-shaped: {len(rows)} pairs; random Llama-3.1-8B shape ({n_params / 1e9:.2f}B non-embedding "
          f"params, {args.layers} layers) in bf16, attn={model.config._attn_implementation}, device={device}, "
          f"batch_tokens={enc.batch_tokens}")
    enc.encode_ids(ids[:16])                       # warm-up both paths
    enc.encode_distinct(ids[:64], groups[:64])
    results = {}
    for name, run, tokens, flops in (
            ("per pair (today)", lambda: enc.encode_ids(ids), plain.sum(), forward_flops(n_params, config, plain)),
            ("dedup + shared prefixes", lambda: enc.encode_distinct(ids, groups), seg_new.sum(),
             forward_flops(n_params, config, seg_new, seg_past))):
        _sync(device)
        t0 = time.perf_counter()
        emb, _ = run()
        _sync(device)
        dt = time.perf_counter() - t0
        results[name] = emb
        print(f"  {name:24s} {tokens / len(rows):7.1f} tokens/pair  {dt:7.2f} s  {len(rows) / dt:8.1f} pairs/s  "
              f"{tokens / dt:9,.0f} tokens/s  MFU {flops / dt / (args.peak_tflops * 1e12):6.1%}", flush=True)
        results[name + " s"] = dt
    a, b = results["per pair (today)"], results["dedup + shared prefixes"]
    cos = torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()
    print(f"  tokens: {plain.sum() / seg_new.sum():.2f}x fewer; wall: "
          f"{results['per pair (today) s'] / results['dedup + shared prefixes s']:.2f}x faster; "
          f"min cosine between the two paths' embeddings (bf16): {cos:.5f}")


def exactness(args):
    """The shared-prefix path against the plain pass and one text at a time, on the shaped tables with a tiny
    random Llama (left and right padding, float32 and bf16) on --device: max absolute differences."""
    from tiny_models import tiny_reward_model

    from mrm_ray.backbone import conversation_key

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(tempfile.mkdtemp(prefix="mrm-embed-exact-"))
    for side in ("right", "left"):
        path = tiny_reward_model(work / side, hidden_size=64, layers=2, padding_side=side, max_positions=4096)
        for dtype in ("float32", "bfloat16"):
            model, tok = load_backbone(path, device=device, dtype=dtype)
            enc = PairEncoder(model, tok, max_length=4096)
            for shape, rows in (("prism", prism_shaped(12)), ("reddit", reddit_shaped(4))):
                prompts = [r[C.PROMPT] for r in rows]
                ids, _ = enc.tokenize(pair_conversations(prompts, [r[C.CHOSEN] for r in rows],
                                                         [r[C.REJECTED] for r in rows]))
                plain, plain_s = enc.encode_ids(ids)
                shared, shared_s = enc.encode_distinct(ids, [conversation_key(p) for p in prompts] * 2)
                one = torch.stack([enc.encode_ids([s])[0][0] for s in ids[:40]])
                print(f"{device.type} {side:5s} padding {dtype:8s} {shape:6s} {len(ids):3d} texts: "
                      f"max |shared - plain| {(shared - plain).abs().max():.1e} (scores "
                      f"{(shared_s - plain_s).abs().max():.1e}), max |plain - one at a time| "
                      f"{(plain[:40] - one).abs().max():.1e}, largest |value| {plain.abs().max():.1f}", flush=True)


def json_key(prompt) -> str:
    import json
    return json.dumps(prompt, sort_keys=True)


def bench_demo_texts(args):
    """The demo's text population through `mrm embed` (a subprocess: Ray start-up included) vs a plain
    SentenceTransformer.encode of the same texts (model load included), MiniLM on CPU."""
    from sentence_transformers import SentenceTransformer

    from mrm_ray.synth_text import write_text_population

    work = Path(tempfile.mkdtemp(prefix="mrm-embed-demo-"))
    write_text_population(str(work / "pairs"), users=args.demo_users, pairs_per_user=16, seed=0)
    table = storage.read_table(str(work / "pairs"))
    pairs = table.to_pylist()
    texts = ["\n\n".join([m["content"] for m in p[C.PROMPT]] + [p[key]]) for key in (C.CHOSEN, C.REJECTED)
             for p in pairs]
    print(f"demo texts: {len(pairs)} pairs, {len(texts)} texts, all-MiniLM-L6-v2 on {os.cpu_count()} CPU cores")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    times = {}
    for dtype in ("auto", "float32"):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "mrm_ray.cli", "embed", "--pairs", str(work / "pairs"),
                        "--out", str(work / f"emb-{dtype}"), "--dtype", dtype], check=True, env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times[dtype] = time.perf_counter() - t0
    t0 = time.perf_counter()
    st = SentenceTransformer(default_cpu_model(), device="cpu")
    ref = st.encode(texts, batch_size=64)
    t_st = time.perf_counter() - t0
    emb = {d: storage.read_table(str(work / f"emb-{d}")).sort_by(C.PAIR_ID) for d in times}
    order = {p[C.PAIR_ID]: i for i, p in enumerate(pairs)}
    idx = np.array([order[i] for i in emb["float32"].column(C.PAIR_ID).to_pylist()])
    want = ref[idx]
    cos = {}
    for d, t in emb.items():
        got = C.emb_matrix(t.column(C.CHOSEN_EMB))
        cos[d] = float(np.min(np.sum(got * want, 1) / np.linalg.norm(got, axis=1) / np.linalg.norm(want, axis=1)))
    print(f"  mrm embed (default: bf16 on this CPU)  {times['auto']:7.1f} s   min cosine to ST: {cos['auto']:.4f}")
    print(f"  mrm embed --dtype float32             {times['float32']:7.1f} s   min cosine to ST: {cos['float32']:.6f}")
    print(f"  SentenceTransformer.encode(batch 64)  {t_st:7.1f} s   (float32, model load included)")
    print(f"  mrm embed vs sentence-transformers: {t_st / times['auto']:.2f}x (default), "
          f"{t_st / times['float32']:.2f}x (float32)")


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
                   help="compute dtype; auto = bfloat16 on GPU and on CPUs with AMX/AVX512-BF16, else float32")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--llama8b-shape", action="store_true", help="GPU only: random Llama-3.1-8B-shaped bf16 model")
    p.add_argument("--layers", type=int, default=32, help="--llama8b-shape: decoder layers (32 = the real shape); "
                                                          "shaped modes: 6 unless given")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator's dense bf16 peak for MFU")
    p.add_argument("--prism-shaped", action="store_true", help="tokens/pair and wall time of `mrm embed` on a "
                                                                 "PRISM-shaped table, with and without dedup")
    p.add_argument("--reddit-shaped", action="store_true", help="the same on a Reddit-TL;DR-shaped table")
    p.add_argument("--conversations", type=int, default=400, help="--prism-shaped: conversations")
    p.add_argument("--posts", type=int, default=60, help="--reddit-shaped: posts")
    p.add_argument("--hidden", type=int, default=256, help="shaped modes: the random Llama's hidden size")
    p.add_argument("--demo-texts", action="store_true", help="`mrm embed` vs SentenceTransformer.encode on the "
                                                               "demo's texts")
    p.add_argument("--demo-users", type=int, default=200, help="--demo-texts: users (16 pairs each)")
    p.add_argument("--exactness", action="store_true", help="shared-prefix vs plain vs one-at-a-time embeddings of "
                                                              "a tiny Llama on --device (float32 and bf16)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.exactness:
        exactness(args)
    elif (args.prism_shaped or args.reddit_shaped) and args.llama8b_shape:
        bench_shapes_llama8b(args)
    elif args.prism_shaped or args.reddit_shaped:
        if args.layers == 32:
            args.layers = 6
        bench_shapes(args)
    elif args.demo_texts:
        bench_demo_texts(args)
    else:
        bench_llama8b_shape(args) if args.llama8b_shape else bench_model(args)


if __name__ == "__main__":
    main()
