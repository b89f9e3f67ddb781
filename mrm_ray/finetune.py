"""Fine-tune the backbone for personalization on Ray Train with DeepSpeed: `finetune(pairs, out, ...)`.

    mrm finetune --pairs data/pairs --out runs/ft                         # the packaged MiniLM, 1 CPU worker
    mrm finetune --pairs data/pairs --out runs/ft num_workers=2 cpus_per_worker=0.5 zero_stage=2
    mrm finetune --pairs s3://b/pairs --out s3://b/ft --model /models/llama-8b-rm use_gpu=true num_workers=8 zero_stage=3
    mrm embed --pairs data/pairs --out data/emb-ft --model runs/ft/model  # then train / evaluate as usual

1. One streamed pass over the pairs table validates every row, counts each user's train pairs and
   writes the SEEN users' train pairs (the split of `mrm train`, same seed and ratio) into bucket files
   under `<out>/data/`, whole users per bucket; `<out>/users.parquet` numbers the seen users.  Unseen
   users' pairs and test pairs never enter fine-tuning.
2. Ray Train workers (TorchTrainer; DeepSpeed ZeRO over gloo on CPU, NCCL on GPU) each read their
   buckets.  A step's global batch is the pairs whose hash falls in that step's slot this epoch (with
   objective=meta, the users whose hash does: whole users, each on one worker), so 1 worker or N take
   the same steps (exactly so with dropout=false).  The validation carve of
   `mrm train` is held out and scored after every epoch; the backbone of the best epoch so far goes to
   `<out>/model/`, its config.json recording the split (`mrm_finetune_split`: seed, seen_ratio, val_ratio)
   that `mrm embed` carries into the table and `mrm train` checks.
3. A checkpoint (DeepSpeed's, every rank's part) after every epoch under `<out>/checkpoints/`: a worker
   that dies restarts from it, and re-running the command continues the run.

The objective lives in mrm_ray.core.finetune; this module is the data and Ray glue.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from mrm_ray.core import splits
from mrm_ray.core.finetune import FinetuneConfig, check, draw_seed
from mrm_ray.data import contract as C
from mrm_ray.data import runs, shards, storage
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)

COMMAND = "finetune"
DATA, USERS, MODEL, STATE, CHECKPOINTS = "data", "users.parquet", "model", "finetune.json", "checkpoints"
RUN_NAME = "finetune"
SPLIT_KEYS = ("seed", "seen_ratio", "min_train_pairs", "val_ratio", "buckets")   # what the data depends on
SPLIT_META = b"mrm_finetune_split"   # users.parquet's schema metadata: the SPLIT_KEYS its data was written with


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> FinetuneConfig:
    """Defaults, then a YAML file, then key=value overrides (the parser of `mrm train`); validated."""
    from mrm_ray import config as config_mod

    cfg = FinetuneConfig()
    config_mod._apply(cfg, config_mod._read_yaml(path, None))
    if overrides:
        config_mod._apply(cfg, overrides if isinstance(overrides, dict) else config_mod.parse_overrides(overrides))
    problems = check(cfg)
    if problems:
        raise config_mod.ConfigError("invalid config: " + "; ".join(problems))
    return cfg


# --- 1. the one pass over the pairs table ------------------------------------------------------------
def write_data(pairs: str, out: str, cfg: FinetuneConfig) -> pa.Table:
    """Seen users' train pairs -> <out>/data buckets; returns the seen users (user_id, train_pairs, index)."""
    counts: list[pd.Series] = []

    def normalize(batch):
        return C.normalize_pairs(pa.Table.from_batches([batch]))

    def keep(t):
        uid = t.column(C.USER_ID).to_numpy(zero_copy_only=False)
        train = pc.not_equal(t.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)
        mask = train & shards.seen_mask(uid, cfg.seed, cfg.seen_ratio)
        counts.append(pd.Series(uid[mask]).value_counts())
        return mask

    with storage.atomic_output(storage.join(out, DATA), COMMAND, [pairs], overwrite=True) as staging:
        shards.write_buckets(pairs, staging, cfg.buckets, cfg.seed, normalize=normalize, keep=keep,
                             columns=None)
    per_user = pd.concat(counts).groupby(level=0).sum().sort_index() if counts else pd.Series(dtype=np.int64)
    per_user = per_user[per_user >= cfg.min_train_pairs]
    if per_user.empty:
        raise UserError(f"pairs table {pairs} has no seen user with {cfg.min_train_pairs}+ train pairs "
                        f"(seen_ratio={cfg.seen_ratio}, seed={cfg.seed}): nothing to fine-tune on")
    users = pa.table({C.USER_ID: pa.array(per_user.index.astype(str)),
                      "train_pairs": pa.array(per_user.to_numpy(np.int64)),
                      "index": pa.array(np.arange(len(per_user), dtype=np.int64))},
                     metadata={SPLIT_META: json.dumps({k: getattr(cfg, k) for k in SPLIT_KEYS})})
    storage.write_table(users, storage.join(out, USERS), COMMAND, overwrite=True)
    return users


def worker_pairs(out: str, users: pa.Table, cfg: FinetuneConfig, buckets: list[int]) -> dict:
    """A worker's pairs: texts, global user index, pair hash and the validation carve of `mrm train`."""
    tables = [storage.read_table(shards.bucket_uri(storage.join(out, DATA), b)) for b in buckets]
    table = pa.concat_tables([t for t in tables if t.num_rows] or tables[:1])
    table = table.filter(pc.is_in(table.column(C.USER_ID), value_set=users.column(C.USER_ID)))  # min_train_pairs
    # The order and conversation grouping of mrm_ray.data.shards, so the carve is the very one of `mrm train`
    # (its grouping needs only the keys: a zero embedding stands in for the texts).
    table = table.sort_by([(C.USER_ID, "ascending"), (C.CONV_ID, "ascending"), (C.PAIR_ID, "ascending")])
    zero = pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(table.num_rows, np.float32)), 1)
    grouped = shards.user_pairs_from_table(table.select([C.USER_ID, C.PAIR_ID, C.CONV_ID])
                                           .append_column(C.CHOSEN_EMB, zero).append_column(C.REJECTED_EMB, zero))
    uid = table.column(C.USER_ID).to_numpy(zero_copy_only=False).astype(object)
    assert np.array_equal(grouped.user_ids[grouped.pair_user()], uid)   # the same row order
    return {"prompt": table.column(C.PROMPT).to_pylist(), "chosen": table.column(C.CHOSEN).to_pylist(),
            "rejected": table.column(C.REJECTED).to_pylist(),
            "user": users.column("index").to_numpy()[pd.Index(users.column(C.USER_ID).to_numpy(
                zero_copy_only=False)).get_indexer(uid)],
            "hash": shards.hash_ids(table.column(C.PAIR_ID).to_numpy(zero_copy_only=False), cfg.seed),
            "user_hash": shards.user_hash(uid, cfg.seed),
            "val": splits.validation_mask(grouped, cfg.val_ratio, cfg.seed)}


def support_rows(pair_hash: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """objective=meta: the pairs that adapt their user this epoch (about half, by a seeded hash of the pair)."""
    return splits.unit(splits.mix64(pair_hash, seed * 104_729 + epoch + 1)) < 0.5


def val_chunks(data: dict, val_rows: np.ndarray, batch_pairs: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """objective=meta: validation in chunks of whole users, about batch_pairs validation pairs each: every
    user adapts on all its train pairs (support) and is scored on its validation pairs."""
    users = data["user"]
    val_users, per_user = np.unique(users[val_rows], return_counts=True)
    if not len(val_users):                         # a worker whose users have no validation pairs
        return []
    # A user goes to the chunk of batch_pairs validation pairs in which its last one falls.
    user_chunk = (np.cumsum(per_user) - 1) // batch_pairs
    pos = np.minimum(np.searchsorted(val_users, users), len(val_users) - 1)
    chunk = np.where(val_users[pos] == users, user_chunk[pos], -1)   # -1: a user without validation pairs
    order = np.argsort(chunk, kind="stable")       # one pass over the rows, each chunk's rows in order
    ids, starts = np.unique(chunk[order], return_index=True)
    return [(rows, ~data["val"][rows]) for c, rows in zip(ids, np.split(order, starts[1:])) if c >= 0]


# --- 2. the workers -----------------------------------------------------------------------------------
def offload_problem() -> str | None:
    """Why ZeRO-Offload cannot run here, or None.  It steps the optimizer with DeepSpeed's cpu_adam op, which
    a `DS_BUILD_OPS=0` install does not contain: DeepSpeed then builds it on first use, which needs a C++
    compiler and ninja.  (Checked on the driver; the cluster's workers run the same image.)"""
    import shutil

    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if installed_ops.get("cpu_adam"):
        return None
    missing = [tool for tool in ("c++", "ninja") if shutil.which(tool) is None]
    if not missing and CPUAdamBuilder().is_compatible(verbose=False):
        return None
    return ("offload=cpu needs DeepSpeed's cpu_adam op: this DeepSpeed was installed without its ops and cannot "
            f"build it here (no {' or '.join(missing) or 'compatible toolchain'}); reinstall with "
            "DS_BUILD_CPU_ADAM=1 pip install deepspeed, or set offload=none")


def ds_config(cfg: FinetuneConfig, world: int) -> dict:
    """DeepSpeed's config: AdamW, ZeRO `zero_stage`, bf16 on GPU (fp32 on CPU).  The loss passed to
    backward is already the global batch's mean (finetune_worker), so the micro batch size DeepSpeed
    is told is nominal."""
    zero = {"stage": cfg.zero_stage}
    if cfg.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu"}
        if cfg.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu"}
    return {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": 0.0}},
            "zero_optimization": zero, "bf16": {"enabled": cfg.use_gpu},
            "steps_per_print": 10 ** 9, "wall_clock_breakdown": False}


def finetune_worker(config: dict) -> None:
    """Runs on every Ray Train worker (TorchTrainer made the process group; DeepSpeed joins it)."""
    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    from mrm_ray.backbone import POOLING, PairEncoder, load_backbone, pair_conversations
    from mrm_ray.core.finetune import MetaHead, UserFactors, pair_losses, select_trainable

    cfg, out = FinetuneConfig(**config["cfg"]), config["out"]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    deepspeed.init_distributed(dist_backend="nccl" if cfg.use_gpu else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if not cfg.use_gpu:  # Ray pins OMP_NUM_THREADS to the reservation; share the node's cores instead
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    users = storage.read_table(storage.join(out, USERS))
    data = worker_pairs(out, users, cfg, shards.buckets_of_rank(cfg.buckets, rank, world))
    if not len(data["user"]):
        raise UserError(f"fine-tuning worker {rank} of {world} got no pairs ({users.num_rows} seen users in "
                        f"{cfg.buckets} buckets): use fewer workers")
    device = torch.device("cuda", torch.cuda.current_device()) if cfg.use_gpu else torch.device("cpu")
    model, tok = load_backbone(config["model"], device=device, dtype="bfloat16" if cfg.use_gpu else "float32")
    enc = PairEncoder(model, tok, max_length=cfg.max_length)
    select_trainable(enc.base, cfg.top_layers)
    # With dropout off (eval mode, gradients on), 1 worker or N take the same steps, and so does a resume.
    enc.base.train(cfg.dropout)
    seed = draw_seed(cfg)
    torch.manual_seed(seed)
    dim, meta = model.config.get_text_config().hidden_size, cfg.objective == "meta"
    factors = (MetaHead(dim, cfg.rank, seed, cfg.inner_lr, cfg.inner_steps) if meta else
               UserFactors(dim, users.num_rows, cfg.rank, seed, cfg.shared)).to(device)

    class Tuner(torch.nn.Module):
        """The trained parts in one module, the way DeepSpeed wants them."""

        def __init__(self):
            super().__init__()
            self.base, self.factors = enc.base, factors

        def forward(self, rows: np.ndarray, weight: float = 1.0, support: np.ndarray | None = None,
                    train: bool = True):
            """(sum of the rows' pair losses x weight, correct count); objective=meta: each user of the rows
            adapts on its `support` rows and the loss and count are the other (query) rows'; with `shared`,
            training adds the query rows' losses under the unadapted start w0 (validation scores only the
            adapted margins)."""
            convs = pair_conversations([data["prompt"][i] for i in rows], [data["chosen"][i] for i in rows],
                                       [data["rejected"][i] for i in rows])
            f = POOLING[enc.pooling](*enc.hidden(enc.tokenize(convs)[0]))   # as `mrm embed` runs it
            user = torch.as_tensor(data["user"][rows], device=device)
            if meta:
                s = torch.as_tensor(support, device=device)
                m = self.factors.margins(f[:len(rows)], f[len(rows):], user, s)[~s]
            else:
                m = self.factors.margins(f[:len(rows)], f[len(rows):], user)
            loss = pair_losses(m).sum()
            if meta and cfg.shared and train:
                loss = loss + pair_losses(self.factors.start_margins(f[:len(rows)], f[len(rows):])[~s]).sum()
            return loss * weight, int((m > 0).sum())

    tuner = Tuner()
    groups = [{"params": [p for p in enc.base.parameters() if p.requires_grad], "lr": cfg.lr},
              {"params": list(factors.parameters()), "lr": cfg.head_lr}]
    engine, *_ = deepspeed.initialize(model=tuner, model_parameters=groups, config=ds_config(cfg, world))

    def total(*values) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    state = {"history": [], "steps": []}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            engine.load_checkpoint(d, tag="state")
            state = json.loads(Path(d, "history.json").read_text())
        if rank == 0:
            log.info("resuming after epoch %d", len(state["history"]))
    train_rows, val_rows = np.flatnonzero(~data["val"]), np.flatnonzero(data["val"])
    n_train, n_val = (int(v) for v in total(len(train_rows), len(val_rows)))
    n_steps = max(1, math.ceil(n_train / cfg.batch_pairs))
    # Every rank runs the same number of forward passes (ZeRO-3 gathers parameters inside them); a rank
    # with no rows in a step runs one row at weight 0.
    spare, no = np.array([0]), np.array([False])
    t0 = last = time.time()
    for epoch in range(len(state["history"]), cfg.epochs):
        # the dropout draws are seeded by the epoch (and the rank), so a resumed run draws what an
        # uninterrupted one would, and an epoch's draws do not depend on how many epochs are asked for
        torch.manual_seed(seed * 1_000_003 + epoch * 1_009 + rank)
        # objective=meta: a step takes whole users (slots by user), half of each user's pairs (by pair hash,
        # drawn again every epoch) adapt it and the other half score it
        slot = splits.epoch_slots(data["user_hash" if meta else "hash"][train_rows], n_steps, seed, epoch)
        support = support_rows(data["hash"], seed, epoch) if meta else np.zeros(len(data["hash"]), bool)
        loss_sum = correct = scored = 0.0   # scored: the pairs the loss was taken on (objective=meta: query pairs)
        for step in range(n_steps):
            rows = train_rows[slot == step]
            count = total(int((~support[rows]).sum()))[0]
            if count == 0:
                continue
            loss, right = engine(rows if len(rows) else spare, (world / count) if len(rows) else 0.0,
                                 support[rows] if len(rows) else no)
            engine.backward(loss)   # DeepSpeed averages over ranks: world x (rank's sum / global count)
            engine.step()
            step_loss, step_right = total(loss.item() * count / world, right if len(rows) else 0)
            state["steps"].append(step_loss / count)
            loss_sum, correct, scored = loss_sum + step_loss, correct + step_right, scored + count
            if rank == 0 and time.time() - last >= 30:   # progress inside long epochs
                last = time.time()
                log.info("finetune epoch %d/%d: step %d/%d, loss %.4f (%.0f s)", epoch + 1, cfg.epochs, step + 1,
                         n_steps, step_loss / count, last - t0)
        enc.base.eval()
        with torch.no_grad():
            chunks = val_chunks(data, val_rows, cfg.batch_pairs) if meta else [
                (val_rows[c:c + cfg.batch_pairs], None) for c in range(0, len(val_rows), cfg.batch_pairs)]
            most = torch.tensor([len(chunks)], device=device)
            dist.all_reduce(most, op=dist.ReduceOp.MAX)
            v_loss = v_right = 0.0
            for c in range(int(most.item())):
                rows, sup = chunks[c] if c < len(chunks) else (np.array([], np.int64), None)
                loss, right = engine(rows if len(rows) else spare, 1.0 if len(rows) else 0.0,
                                     sup if len(rows) else no, train=False)
                v_loss, v_right = v_loss + loss.item(), v_right + (right if len(rows) else 0)
            v_loss, v_right = total(v_loss, v_right)
        enc.base.train(cfg.dropout)
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(scored, 1),
                  "train_accuracy": correct / max(scored, 1),
                  "val_loss": v_loss / n_val if n_val else None, "val_accuracy": v_right / n_val if n_val else None,
                  "seconds": round(time.time() - t0, 1)}
        # kept: the best validation accuracy so far, ties to the lower validation loss
        record["kept"] = not n_val or all((record["val_accuracy"], -record["val_loss"])
                                          > (h["val_accuracy"], -h["val_loss"]) for h in state["history"])
        state["history"].append(record)
        if rank == 0:
            log.info("finetune epoch %d/%d: train loss %.4f accuracy %.3f, validation loss %s accuracy %s%s",
                     epoch + 1, cfg.epochs, record["train_loss"], record["train_accuracy"],
                     _fmt(record["val_loss"]), _fmt(record["val_accuracy"]), " (kept)" if record["kept"] else "")
        if record["kept"]:
            save_backbone(enc.base, model, tok, config["model"], storage.join(out, MODEL), cfg, rank)
        with tempfile.TemporaryDirectory(prefix="mrm-ft-ckpt-") as d:
            engine.save_checkpoint(d, tag="state")
            if rank == 0:
                Path(d, "history.json").write_text(json.dumps(state))
                storage.write_json(storage.join(out, STATE), {"config": dataclasses.asdict(cfg), **state,
                                                              "model": config["model"]})
            ray.train.report({"epoch": epoch + 1, "val_accuracy": record["val_accuracy"] or 0.0},
                             checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=f"epoch-{epoch + 1:04d}")


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def save_backbone(base, model, tok, source: str, uri: str, cfg: FinetuneConfig, rank: int) -> None:
    """The backbone as a standard transformers checkpoint (the class it was loaded as, its tokenizer, and
    a sentence-transformers pooling folder when the source had one), gathered from ZeRO-3's shards."""
    import shutil

    import deepspeed

    from mrm_ray.backbone import model_path

    params = list(model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if cfg.zero_stage == 3 else None
    with gather if gather is not None else _nothing():
        if rank != 0:
            return
        with tempfile.TemporaryDirectory(prefix="mrm-ft-model-") as d:
            # the users it was tuned on, for `mrm train` to check (mrm_ray.data.runs.check_finetune_split)
            model.config.mrm_finetune_split = {k: getattr(cfg, k) for k in runs.FINETUNE_SPLIT_KEYS}
            model.save_pretrained(d, safe_serialization=True)
            tok.save_pretrained(d)
            pooling = Path(model_path(source), "1_Pooling")
            if pooling.is_dir():
                shutil.copytree(pooling, Path(d, "1_Pooling"))
            fs, path = storage.resolve(uri)
            if storage.exists(uri):
                fs.delete_dir(path)
            fs.create_dir(path, recursive=True)
            pafs.copy_files(d, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check_continuation(out: str, cfg: FinetuneConfig) -> None:
    """Refuse, in one line, to continue the run in `out` with another split (its data would mix two
    datasets, and `mrm train`'s unseen users could be among the fine-tuned ones) or another draw (the
    run would be neither draw's)."""
    before = {}
    if storage.exists(storage.join(out, USERS)):    # written with the data, before any epoch
        before.update(json.loads((storage.read_table(storage.join(out, USERS)).schema.metadata or {})
                                 .get(SPLIT_META, b"{}")))
    if storage.exists(storage.join(out, STATE)):    # written after every epoch
        before.update(storage.read_json(storage.join(out, STATE))["config"])
    changed = [k for k in SPLIT_KEYS + ("draw",) if k in before and before[k] != getattr(cfg, k)]
    if changed:
        raise UserError(f"{out} was fine-tuned with other {', '.join(changed)}; pass --overwrite to start afresh")


# --- the driver -----------------------------------------------------------------------------------------
def finetune(pairs: str, out: str, model: str = "auto", cfg: FinetuneConfig | None = None,
             overwrite: bool = False) -> dict:
    """Fine-tune `model` on the seen users' train pairs of `pairs` into `out`; returns the summary
    (`<out>/finetune.json`).  Re-running on an unfinished `out` continues it."""
    import ray
    import ray.train
    import ray.train.torch

    from mrm_ray import raytools
    from mrm_ray.backbone import DEFAULT_GPU_MODEL, default_cpu_model, load_config, load_tokenizer
    from mrm_ray.errors import unwrap

    import importlib.util

    cfg = cfg or FinetuneConfig()
    if importlib.util.find_spec("deepspeed") is None:
        raise UserError("mrm finetune needs DeepSpeed: DS_BUILD_OPS=0 pip install 'mrm-ray[finetune]'")
    if cfg.offload != "none" and (problem := offload_problem()):
        raise UserError(problem)
    pairs, out = storage.absolute(pairs), storage.absolute(out)
    if model == "auto":
        model = DEFAULT_GPU_MODEL if cfg.use_gpu else default_cpu_model()
    load_config(model), load_tokenizer(model)   # one line now for a backbone that cannot load
    storage.check_table(pairs)
    # Ours or new (anything else is refused); a finished fine-tuning continues when asked for more epochs.
    previous = storage.check_output(out, COMMAND, [pairs], overwrite=True)
    if previous is not None and not overwrite:
        check_continuation(out, cfg)
    if previous is not None and previous["state"] == "complete" and not overwrite:
        summary = storage.read_json(storage.join(out, STATE))
        if len(summary["history"]) >= cfg.epochs:
            log.info("%s already holds %d epoch(s) of fine-tuning; nothing to do (--overwrite to redo it)",
                     out, len(summary["history"]))
            return summary
    storage.claim_folder(out, COMMAND, [pairs], overwrite=True)
    if overwrite:   # a fresh run: the Ray Train run of that name would otherwise resume
        for part in (CHECKPOINTS, MODEL, USERS, STATE):
            if storage.exists(storage.join(out, part)):
                storage.delete(storage.join(out, part))
    t0 = time.time()
    if storage.exists(storage.join(out, USERS)):   # continuing: the data of the first run (its keys checked above)
        users = storage.read_table(storage.join(out, USERS))
    else:
        users = write_data(pairs, out, cfg)
    log.info("finetune: %d seen users, %d train pairs (validation carve included) in %s", users.num_rows,
             int(pc.sum(users.column("train_pairs")).as_py()), storage.join(out, DATA))
    raytools.ensure_ray()
    raytools.require_workers(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, "fine-tuning worker")
    ckpt_fs, ckpt_path = storage.resolve(storage.join(out, CHECKPOINTS))
    ckpt_fs.create_dir(ckpt_path, recursive=True)
    trainer = ray.train.torch.TorchTrainer(
        finetune_worker,
        train_loop_config={"cfg": dataclasses.asdict(cfg), "out": out, "model": str(model)},
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
        run_config=ray.train.RunConfig(name=RUN_NAME, storage_path=ckpt_path, storage_filesystem=ckpt_fs,
                                       failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2)))
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        err = unwrap(e)
        if err is not e:
            raise err from None
        log.error("fine-tuning failed; re-run the same `mrm finetune` command to continue from the last checkpoint")
        raise
    summary = storage.read_json(storage.join(out, STATE))
    summary["seconds"] = round(time.time() - t0, 1)
    storage.write_json(storage.join(out, STATE), summary)
    _plot(out, summary["history"], summary["steps"])
    storage.finish_folder(out, COMMAND, [DATA, USERS, MODEL, STATE, "loss.png"])
    return summary


def _plot(out: str, history: list[dict], steps: list[float]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mrm_ray.plots import _png

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(np.arange(1, len(steps) + 1), steps, lw=1)
    axes[0].set_title("training loss per step")
    axes[0].set_xlabel("step")
    epochs = [h["epoch"] for h in history]
    axes[1].plot(epochs, [h["val_accuracy"] for h in history], marker="o", label="validation")
    axes[1].plot(epochs, [h["train_accuracy"] for h in history], marker="o", label="train")
    axes[1].set_title("pair accuracy of the fine-tuning objective")
    axes[1].set_xlabel("epoch")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    storage.write_bytes(storage.join(out, "loss.png"), _png(fig))
