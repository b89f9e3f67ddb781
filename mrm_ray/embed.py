"""Embed preference pairs with a frozen reward model (Ray Data): pairs table -> embeddings table.

    embed(pairs, out, model="auto", ...) -> summary       (mrm embed; mrm_ray.backbone does the model work)

Commands:
  CPU demo (packaged all-MiniLM-L6-v2, mean pooling):
    mrm embed --pairs pairs/ --out emb/
  one node, every GPU one replica (bf16, flash-attention-2 when installed):
    mrm embed --pairs s3://b/pairs --out s3://b/emb --model Skywork/Skywork-Reward-V2-Llama-3.1-8B
  a running cluster:  mrm embed ... --address auto --actors 16

Fewer tokens: pairs are hash-partitioned by their conversation (a hash of the
prompt's opening, up to the first user message; Ray Data's repartition by
key, sorted), so all pairs of one conversation reach one replica together:
every distinct (prompt, response) text of the table runs once, and for a
decoder every token prefix its texts share (the prompt, an earlier turn that
later turns continue) runs once, its key/value cache reused by what follows
(mrm_ray.backbone.PairEncoder.encode_distinct).  The stage reports tokens
computed against what a pass over every pair would compute.  --no-dedup
streams every pair's two texts straight through the plain pass instead.

Throughput: the texts of a Ray batch are split into sub-batches of at most
`batch_tokens` padded tokens after sorting them by length, so a sub-batch
carries little padding and its size adapts to the text lengths.
The output is written under a staging folder and committed at the end
(storage.atomic_output): a failed run never leaves a table that looks complete.
Reruns are deterministic: rows come in a fixed order (the input order with
--no-dedup; by conversation hash, then pair id, otherwise) and part files have fixed
names.  The table's schema metadata records how it was made (mrm.backbone,
mrm.backbone_id, mrm.pooling, mrm.max_length, mrm.dtype, mrm.dim; mrm.finetune_split for a
backbone `mrm finetune` made): `mrm train` copies it into the run, and train, score and export-hf check it.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from mrm_ray import raytools
from mrm_ray.backbone import (DEFAULT_GPU_MODEL, PairEncoder, backbone_id, compute_dtype, conversation_key,
                              conversations, default_cpu_model, default_pooling, effective_max_length, hidden_size,
                              load_backbone, load_config, load_tokenizer, pair_conversations)
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage
from mrm_ray.errors import UserError, unwrap

log = logging.getLogger(__name__)

_PROMPT_JSON = "_prompt_json"  # internal columns between the validate and embed stages
_CONV_KEY = "_conversation_key"
PAIRS_PER_PARTITION = 2048     # with dedup: pairs per hash partition (one replica call), on average
MAX_GROUP_ROWS = 4096          # a conversation with more pairs than this is embedded in pieces of this many


# --- Ray Data stages -----------------------------------------------------------
def _validate_batch(batch: pa.Table) -> pa.Table:
    """Contract check of one batch; prompts travel to the actor as JSON strings (numpy-friendly)."""
    table = C.normalize_pairs(batch)
    prompts = table.column(C.PROMPT).to_pylist()
    return (table.drop_columns([C.PROMPT])
            .append_column(_PROMPT_JSON, pa.array([json.dumps(p, ensure_ascii=False) for p in prompts], pa.string()))
            .append_column(_CONV_KEY, pa.array([conversation_key(p) for p in prompts], pa.string())))


class EmbedActor:
    """One model replica: loads it once, then maps a batch of pairs to their embeddings."""

    def __init__(self, model: str, pooling: str, dtype: str, max_length: int | None, batch_tokens: int | None,
                 device: str, threads: int = 0, replicas: int = 1, progress=None, unit_rows: int = 256,
                 grouped: bool = False):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            # a node that advertises a GPU Ray resource without a usable CUDA device (a custom resource
            # set by hand, the test's fake GPU nodes): run, on its CPU, rather than fail the stage
            log.warning("embedding replica: a GPU was assigned but CUDA is not available here; using the CPU")
            device = "cpu"
        if device == "cpu":
            # Ray pins OMP_NUM_THREADS to the actor's (fractional) CPU reservation; share the node's
            # cores among the replicas instead.
            torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // replicas))
        m, tok = load_backbone(model, device=device, dtype=dtype)
        self.encoder = PairEncoder(m, tok, pooling=pooling, max_length=max_length, batch_tokens=batch_tokens)
        self.progress, self.unit_rows, self.grouped = progress, unit_rows, grouped

    def __call__(self, batch: dict[str, np.ndarray]):
        """The batch's embeddings.  A grouped batch (a whole hash partition) is sorted by conversation,
        then pair id (a fixed order whatever order the shuffle delivered), and embedded in units of
        whole conversations of at most `unit_rows` pairs; a bigger one alone, in pieces of MAX_GROUP_ROWS."""
        if not self.grouped:
            yield self._embed(batch, share=False)
            return
        batch = {k: v[np.lexsort((batch[C.PAIR_ID], batch[_CONV_KEY]))] for k, v in batch.items()}
        keys = batch[_CONV_KEY]
        ends = np.r_[np.flatnonzero(keys[1:] != keys[:-1]) + 1, len(keys)] if len(keys) else []
        lo = 0
        for g, hi in enumerate(ends):
            if g + 1 < len(ends) and ends[g + 1] - lo <= self.unit_rows:
                continue   # the next group fits in this unit too
            step = MAX_GROUP_ROWS if hi - lo > self.unit_rows else hi - lo   # > unit_rows: one big group
            for a in range(lo, hi, step):
                yield self._embed({k: v[a:min(hi, a + step)] for k, v in batch.items()})
            lo = hi

    def _embed(self, batch: dict[str, np.ndarray], share: bool = True) -> dict[str, np.ndarray]:
        """Embeddings of a batch's pairs; share=False: every pair's two texts through the plain pass."""
        import torch

        t0 = time.perf_counter()
        if not share:
            n = len(batch[C.PAIR_ID])
            prompts = [json.loads(p) for p in batch[_PROMPT_JSON]]
            ids, truncated = self.encoder.tokenize(pair_conversations(prompts, batch[C.CHOSEN], batch[C.REJECTED]))
            emb, scores = self.encoder.encode_ids(ids)
            tokens = sum(map(len, ids))
            padded = self.encoder.stats.take()[3]
            return self._output(batch, emb.numpy(), scores,
                                (n, tokens, tokens, truncated, 2 * n, 0, time.perf_counter() - t0, padded))

        n, keys, prompts = len(batch[C.PAIR_ID]), batch[_CONV_KEY], batch[_PROMPT_JSON]
        # Distinct (prompt, response) texts first (tokenizing is not free either); texts[i] is pair i % n's
        # chosen (i < n) or rejected response.
        texts = list(zip(prompts, batch[C.CHOSEN])) + list(zip(prompts, batch[C.REJECTED]))
        index, first, inverse = {}, [], np.empty(2 * n, dtype=np.int64)
        for i, t in enumerate(texts):
            j = index.get(t)
            if j is None:
                j = index[t] = len(first)
                first.append(i)
            inverse[i] = j
        ids, truncated = self.encoder.tokenize(conversations([json.loads(texts[i][0]) for i in first],
                                                             [texts[i][1] for i in first]))
        emb, scores = self.encoder.encode_distinct(ids, [keys[i % n] for i in first])
        _, computed, unshared, padded = self.encoder.stats.take()
        per_pair = int(sum(len(ids[j]) for j in inverse))   # what a pass over every pair's two texts computes
        inv = torch.as_tensor(inverse)
        return self._output(batch, emb[inv].numpy(), scores[inv] if scores is not None else None,
                            (n, per_pair, computed, truncated, len(first), unshared, time.perf_counter() - t0,
                             padded))

    def _output(self, batch, emb: np.ndarray, scores, totals: tuple) -> dict[str, np.ndarray]:
        """The keys and the chosen/rejected halves of (2n, d) embeddings; totals go to the progress actor."""
        n = len(batch[C.PAIR_ID])
        out = {c: batch[c] for c in C.KEY_COLUMNS}
        out[C.CHOSEN_EMB], out[C.REJECTED_EMB] = emb[:n], emb[n:]
        if scores is not None:
            scores = scores.numpy()
            out[C.CHOSEN_SCORE], out[C.REJECTED_SCORE] = scores[:n], scores[n:]
        if self.progress is not None:  # fire and forget: the driver polls the totals
            self.progress.add.remote(*totals)
        return out


def _to_contract_table(batch: dict[str, np.ndarray], emb_dtype: str, metadata: dict[str, str]) -> pa.Table:
    """Ray tensor columns -> the contract's fixed_size_list<float>[d] columns, provenance in the schema."""
    pa_dtype = pa.float16() if emb_dtype == "float16" else pa.float32()
    cols = {c: pa.array(batch[c], pa.string()) for c in C.KEY_COLUMNS}
    for c in (C.CHOSEN_EMB, C.REJECTED_EMB):
        mat = np.ascontiguousarray(batch[c], dtype=np.float16 if emb_dtype == "float16" else np.float32)
        cols[c] = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1), pa_dtype), mat.shape[1])
    for c in (C.CHOSEN_SCORE, C.REJECTED_SCORE):
        if c in batch:
            cols[c] = pa.array(np.asarray(batch[c], np.float32))
    return pa.table(cols).replace_schema_metadata(metadata)


class _Progress:
    """Totals reported by the actors (a tiny Ray actor with no CPU reservation)."""

    # backbone_s: seconds inside tokenization and the backbone, summed over replicas (the stage's wall time
    # also holds Ray's start-up, reading, the shuffle and writing); padded_tokens: tokens the forward
    # batches ran, their padding included
    FIELDS = ("rows", "per_pair_tokens", "tokens", "truncated", "distinct_texts", "unshared_groups", "backbone_s",
              "padded_tokens")

    def __init__(self):
        self.totals = dict.fromkeys(self.FIELDS, 0)

    def add(self, *values):
        for k, v in zip(self.FIELDS, values):
            self.totals[k] += v

    def get(self) -> dict:
        return dict(self.totals)


def _log_progress(progress, total_rows: int, stop: threading.Event, every: float = 10.0):
    import ray

    t0 = time.time()
    while not stop.wait(every):
        try:
            t = ray.get(progress.get.remote())
        except ray.exceptions.RayError:   # progress is a report, never a reason to fail the stage
            log.warning("embedding progress is unavailable (its actor's node was lost); the stage goes on")
            return
        dt = max(time.time() - t0, 1e-9)
        log.info("embedded %d/%d pairs: %.1f pairs/s, %.0f tokens/s computed (%s)", t["rows"], total_rows,
                 t["rows"] / dt, t["tokens"] / dt, _saving(t))


def _saving(t: dict) -> str:
    return (f"{t['tokens']:,} tokens computed of {t['per_pair_tokens']:,} a pass over every pair would compute, "
            f"{t['per_pair_tokens'] / max(t['tokens'], 1):.2f}x fewer")


# --- the stage ----------------------------------------------------------------------
def embed(pairs: str, out: str, model: str = "auto", pooling: str = "auto", dtype: str = "auto",
          emb_dtype: str = "float32", batch_tokens: int = 0, batch_rows: int = 256, max_length: int = 4096,
          actors: int = 0, num_gpus: float | None = None, num_cpus: float = 0.5, threads: int = 0,
          address: str | None = None, overwrite: bool = False, dedup: bool = True) -> dict:
    """Embed the pairs table `pairs` into the embeddings table `out`; returns a summary.

    model auto: DEFAULT_GPU_MODEL when the cluster has GPUs, else the packaged
    all-MiniLM-L6-v2.  batch_tokens 0: 16384 on GPU, 4096 on CPU.  actors 0:
    one replica per GPU, or 1 on a CPU-only cluster.  num_gpus None: 1 per
    replica when the cluster has GPUs.  threads 0: the node's cores / actors.
    dtype auto: bfloat16 on GPUs and on CPUs with native bf16, else float32.
    dedup: group pairs by conversation (a hash shuffle) and run each distinct
    text and each shared token prefix once; False runs every pair's two texts,
    in input order.
    """
    import ray

    # Everything a user can get wrong is checked here, once, before any Ray work starts.
    pairs, out = storage.absolute(pairs), storage.absolute(out)
    if batch_rows < 1 or max_length < 2 or batch_tokens < 0 or actors < 0:
        raise UserError("--batch-rows must be >= 1, --max-length >= 2, --batch-tokens and --actors >= 0")
    if num_cpus <= 0 or (num_gpus is not None and num_gpus < 0):
        raise UserError("--num-cpus must be > 0 and --num-gpus >= 0")
    storage.check_output(out, "embed", [pairs], overwrite)
    files = storage.parquet_files(pairs)  # one-line StorageError when missing or unreachable
    in_fs, _ = storage.resolve(pairs)
    C.require_columns(storage.check_table(pairs).empty_table(), C.PAIRS_REQUIRED, "pairs")
    total_rows, ids = 0, C.UniqueIds(C.PAIR_ID, "pairs")   # one pass over the id column (rows are checked
    for batch in storage.iter_batches(pairs, columns=[C.PAIR_ID]):   # batch by batch as they embed)
        ids.add(batch.column(0))
        total_rows += batch.num_rows
    ids.check()
    if total_rows == 0:
        raise UserError(f"pairs table {pairs} has no rows")
    if model != "auto":
        load_tokenizer(model)

    raytools.ensure_ray(address)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    num_gpus = num_gpus if num_gpus is not None else (1.0 if cluster_gpus else 0.0)
    raytools.require_resources([{"CPU": num_cpus, "GPU": num_gpus}, {"CPU": 0.5}], f"one embedding replica "
                               f"({num_cpus:g} CPU, {num_gpus:g} GPU) plus 0.5 CPU for reading")
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))   # an autoscaler may have added some
    actors = actors or (max(1, int(cluster_gpus // num_gpus)) if num_gpus else 1)
    model = model if model != "auto" else DEFAULT_GPU_MODEL if num_gpus else default_cpu_model()
    tokenizer = load_tokenizer(model)
    config = load_config(model)
    pooling = default_pooling(config, model) if pooling == "auto" else pooling
    is_rm = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    # Resolved once, here, so every replica computes (and the table records) the same dtype.
    compute = compute_dtype(dtype, "cuda" if num_gpus else "cpu")
    metadata = runs.provenance_metadata({
        "backbone": model, "backbone_id": backbone_id(config), "pooling": pooling,
        "max_length": effective_max_length(config, tokenizer, max_length), "dtype": compute,
        "dim": hidden_size(config),
        **({runs.FINETUNE_SPLIT: json.dumps(config.mrm_finetune_split, sort_keys=True)}
           if getattr(config, "mrm_finetune_split", None) else {})})
    log.info("embedding %d pairs with %s (pooling=%s, %s, reward scores=%s, chat template=%s, dedup=%s) on up to "
             "%d %s replica(s)", total_rows, model, pooling, compute, is_rm and pooling == "last",
             bool(tokenizer.chat_template), dedup, actors, "GPU" if num_gpus else "CPU")

    # on the head: a zero-CPU actor could land on a worker node and be lost with it
    progress = ray.remote(num_cpus=0)(_Progress).options(resources={"node:__internal_head__": 0.001}).remote()
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True  # same input -> same output rows in the same order
    # Ray Data's v2 Parquet reader reads footers in plain actors (no restarts): a node lost while they run
    # fails the stage.  The v1 reader's tasks are retried like every other task.
    ctx.use_datasource_v2 = False
    ds = (ray.data.read_parquet(files, filesystem=in_fs)
          .map_batches(_validate_batch, batch_format="pyarrow", batch_size=batch_rows))
    if dedup:
        # Every pair of one conversation in one partition (sorted, so the partition is one block and a
        # replica sees it whole: Ray's own map_groups relies on the same): whole-table dedup, not per batch.
        ds = ds.repartition(max(1, -(-total_rows // PAIRS_PER_PARTITION)), keys=[_CONV_KEY], sort=True)
    # A grouped batch is a whole partition (batch_size None).  Ray Data refuses None for GPU actors, so on
    # GPUs a batch holds up to two average partitions: a bigger one is cut in two, and each piece is still
    # embedded exactly (sharing is an optimisation; only less of it happens across the cut).
    grouped_rows = None if not num_gpus else 2 * PAIRS_PER_PARTITION
    ds = (ds.map_batches(EmbedActor, batch_format="numpy", batch_size=grouped_rows if dedup else batch_rows,
                         compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
                         num_gpus=num_gpus, num_cpus=num_cpus,
                         fn_constructor_kwargs=dict(
                             model=model, pooling=pooling, dtype=compute, max_length=max_length,
                             batch_tokens=batch_tokens or None, device="cuda" if num_gpus else "cpu",
                             threads=threads, replicas=actors, progress=progress, unit_rows=batch_rows,
                             grouped=dedup))
            .map_batches(_to_contract_table, batch_format="numpy",
                         fn_kwargs={"emb_dtype": emb_dtype, "metadata": metadata}))

    stop = threading.Event()
    ticker = threading.Thread(target=_log_progress, args=(progress, total_rows, stop), daemon=True)
    t0 = time.time()
    ticker.start()
    try:
        with storage.atomic_output(out, "embed", [pairs], overwrite) as staging:
            out_fs, out_path = storage.resolve(staging)
            try:
                # OVERWRITE: the staging folder is ours alone, and fixed part names need it.
                ds.write_parquet(out_path, filesystem=out_fs, filename_provider=_part_names(),
                                 mode=ray.data.SaveMode.OVERWRITE)
            except Exception as e:  # noqa: BLE001 - a user's bad row arrives wrapped by Ray
                raise unwrap(e) from None
            _copy_truth(pairs, staging)
    finally:
        stop.set()
    try:
        t = ray.get(progress.get.remote())
    except ray.exceptions.RayError:   # the table is complete; only the counts of its making are lost
        t = {**dict.fromkeys(_Progress.FIELDS, 0), "rows": total_rows}
    dt = time.time() - t0
    log.info("wrote %d pairs to %s in %.1fs (%.1fs in the backbone; %.1f pairs/s, %.0f tokens/s computed); %s; "
             "%d distinct texts of %d, %d truncated to %d tokens; %d conversations whose texts shared no prefix",
             t["rows"], out, dt, t["backbone_s"], t["rows"] / dt, t["tokens"] / dt, _saving(t), t["distinct_texts"],
             2 * t["rows"], t["truncated"], max_length, t["unshared_groups"])
    return {"pairs": t["rows"], "seconds": round(dt, 1), "pairs_per_s": t["rows"] / dt,
            "tokens_per_s": t["tokens"] / dt, "tokens": t["tokens"], "per_pair_tokens": t["per_pair_tokens"],
            "padded_tokens": t["padded_tokens"],
            "distinct_texts": t["distinct_texts"], "unshared_groups": t["unshared_groups"],
            "backbone_seconds": round(t["backbone_s"], 3), "truncated": t["truncated"], "model": model,
            "pooling": pooling, "dtype": compute, "out": out}


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
