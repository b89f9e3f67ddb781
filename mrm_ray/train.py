"""Meta-train MRM (+RPO) on an embeddings table; `--out` becomes a run directory.

    mrm train --embeddings data/emb --out runs/r1                       # default preset, Ray Train
    mrm train --embeddings data/emb --out runs/r1 --preset prism num_workers=4
    mrm train --embeddings data/emb --out runs/r1 --config exp.yaml inner.lr=2.0
    mrm train --embeddings data/emb --out runs/r1 --local               # one process, no Ray

Re-running on an existing run directory resumes from its latest checkpoint.

Steps: (1) one streaming pass validates the table (dimensions, NaN/inf, keys)
and counts every user's train/test pairs, before any worker starts; (2) users
are split seen/unseen from the seed, users with too few train pairs are
skipped and counted; (3) meta-training runs on Ray Train (mrm_ray.train_ray)
or, with --local, in this process (mrm_ray.meta.meta_train); (4) the model
selected on the validation carve is saved with the config, users and history.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from mrm_ray import config as config_mod
from mrm_ray import contract as C
from mrm_ray import runs, storage, tasks
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)
SCAN_COLUMNS = [C.USER_ID, C.PAIR_ID, C.CONV_ID, C.SPLIT, C.CHOSEN_EMB, C.REJECTED_EMB]


@dataclass
class Scan:
    dim: int
    users: pa.Table          # runs.USER_COLUMNS
    rms_diff_norm: float     # RMS of |chosen - rejected| over the seen users' train pairs
    pairs: int


def scan_embeddings(uri: str, cfg: config_mod.TrainConfig) -> Scan:
    """Validate the whole table and count pairs per user, streaming (bounded memory)."""
    schema = storage.schema(uri)
    C.require_columns(schema, C.EMBEDDINGS_REQUIRED, "embeddings")
    columns = [c for c in SCAN_COLUMNS if c in schema.names]
    counts: list[pd.DataFrame] = []
    dim, sq, n_sq, pairs = None, 0.0, 0, 0
    for batch in storage.iter_batches(uri, columns=columns):
        t = C.normalize_embeddings(batch, dim=dim)
        if not t.num_rows:
            continue
        dim = t.schema.field(C.CHOSEN_EMB).type.list_size
        uid = t.column(C.USER_ID).to_numpy(zero_copy_only=False)
        is_test = pc.equal(t.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)
        counts.append(pd.DataFrame({"user_id": uid, "train_pairs": ~is_test, "test_pairs": is_test})
                      .groupby("user_id").sum())
        train_seen = ~is_test & tasks.seen_mask(uid, cfg.seed, cfg.seen_ratio)
        if train_seen.any():
            diff = (C.emb_matrix(t.column(C.CHOSEN_EMB))[train_seen] - C.emb_matrix(t.column(C.REJECTED_EMB))[train_seen])
            sq += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
            n_sq += len(diff)
        pairs += t.num_rows
    if dim is None:
        raise UserError(f"embeddings table {uri} has no rows")
    per_user = pd.concat(counts).groupby(level=0).sum().sort_index()
    uid = per_user.index.to_numpy(dtype=object)
    seen = tasks.seen_mask(uid, cfg.seed, cfg.seen_ratio)
    train = per_user["train_pairs"].to_numpy(np.int64)
    users = pa.table({"user_id": pa.array(uid.astype(str)), "seen": pa.array(seen),
                      "train_pairs": pa.array(train), "test_pairs": pa.array(per_user["test_pairs"].to_numpy(np.int64)),
                      "skipped": pa.array(train < cfg.min_train_pairs)})
    return Scan(dim, users, math.sqrt(sq / n_sq) if n_sq else 1.0, pairs)


def seen_train_pairs(uri: str, users: pa.Table, cfg: config_mod.TrainConfig) -> tasks.UserPairs:
    """The meta-training pairs of the given (seen, not skipped) users, caps applied."""
    ids = users.column("user_id")
    names = storage.schema(uri).names
    keep = pc.field(C.USER_ID).isin(ids)
    if C.SPLIT in names:
        keep = keep & (pc.field(C.SPLIT) != C.TEST)
    table = storage.read_table(uri, columns=[c for c in SCAN_COLUMNS if c in names], filter=keep)
    shard = tasks.user_pairs_from_table(C.normalize_embeddings(table), users=ids.to_numpy(zero_copy_only=False))
    return shard.select(tasks.cap_pairs(shard, cfg.seen_train_limit, cfg.seed))


def train_local(cfg: config_mod.TrainConfig, uri: str, run_uri: str, seen_users: pa.Table, dim: int):
    """Single-process meta-training with a resumable state file in the run directory."""
    from mrm_ray.meta import meta_train
    state_uri = storage.join(run_uri, "checkpoints", "local", "state.pt")
    state = runs.state_from_bytes(storage.read_bytes(state_uri)) if storage.exists(state_uri) else None
    if state:
        log.info("resuming from %s (epoch %d)", state_uri, state.epoch)
    shard = seen_train_pairs(uri, seen_users, cfg)
    head = runs.build_head(dim, cfg)

    def checkpoint(st, metrics):
        storage.write_bytes(state_uri, runs.state_to_bytes(st))
    return head, meta_train(cfg, head, shard, shard.n_users, state=state, on_epoch_end=checkpoint)


# Where a run executes, not what it computes (1 or N workers take the same meta-steps):
# a resumed run may change them, e.g. continue on fewer workers or with cpus_per_worker=0.5.
PLACEMENT_KEYS = ("num_workers", "use_gpu", "cpus_per_worker", "max_failures")


def resolve_config(args, run_uri: str) -> tuple[config_mod.TrainConfig, bool]:
    """(config, resuming).  A run directory that has a config resumes with it."""
    cfg_uri = storage.join(run_uri, runs.CONFIG)
    if storage.exists(cfg_uri):
        saved = config_mod.from_dict(storage.read_json(cfg_uri))
        asked = build_config(args)
        given = set(config_mod.parse_overrides(args.overrides)) | ({"num_workers"} if args.workers is not None else set())
        if args.config:
            given |= set(yaml.safe_load(storage.read_bytes(args.config).decode()) or {})
        if args.config or args.preset != "default" or given - set(PLACEMENT_KEYS):
            asked.model.input_scale, asked.model.auto_input_scale = saved.model.input_scale, saved.model.auto_input_scale
            a, b = config_mod.to_dict(asked), config_mod.to_dict(saved)
            if any(a[k] != b[k] for k in a if k not in PLACEMENT_KEYS):
                raise UserError(f"{run_uri} holds a run with a different config; resume without "
                                f"--config/overrides or pick a new --out")
        for key in given & set(PLACEMENT_KEYS):
            setattr(saved, key, getattr(asked, key))
        return saved, True
    return build_config(args), False


def build_config(args) -> config_mod.TrainConfig:
    text = storage.read_bytes(args.config).decode() if args.config else None
    preset = args.preset if args.preset != "default" else config_mod.config_preset(text)
    cfg = config_mod.load_config(preset, text=text, overrides=args.overrides)
    if args.workers is not None:
        cfg.num_workers = args.workers
    return cfg


def add_arguments(p) -> None:
    p.add_argument("--embeddings", required=True, help="embeddings table URI (output of mrm embed / mrm synth)")
    p.add_argument("--out", required=True, help="run directory URI; an existing run there is resumed")
    p.add_argument("--config", help="YAML config file (keys of mrm_ray.config.TrainConfig; may set `preset:`)")
    p.add_argument("--preset", default="default", choices=sorted(config_mod.PRESETS),
                   help="starting point: default (tuned), prism or reddit (the reference's settings)")
    p.add_argument("--workers", type=int, help="Ray Train workers (same as num_workers=N)")
    p.add_argument("--local", action="store_true", help="train in this process without Ray (small data, debugging)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. epochs=5 inner.lr=2.0 rpo.alpha=0.3")


def run(args) -> int:
    cfg, resuming = resolve_config(args, args.out)
    scan = scan_embeddings(args.embeddings, cfg)
    users = scan.users
    skipped = int(pc.sum(users.column("skipped")).as_py())
    if cfg.model.auto_input_scale:
        cfg.model.input_scale, cfg.model.auto_input_scale = 1.0 / max(scan.rms_diff_norm, 1e-12), False
    seen = users.filter(pc.and_(users.column("seen"), pc.invert(users.column("skipped"))))
    log.info("%d pairs, %d users (%d seen for meta-training, %d skipped with < %d train pairs), dim %d",
             scan.pairs, users.num_rows, seen.num_rows, skipped, cfg.min_train_pairs, scan.dim)
    if seen.num_rows == 0:
        raise UserError("no seen user has enough train pairs to meta-train on")
    if not resuming:
        runs.save_config(args.out, cfg)
    storage.write_table(users, storage.join(args.out, runs.USERS))
    if args.local:
        head, state = train_local(cfg, args.embeddings, args.out, seen, scan.dim)
    else:
        from mrm_ray.train_ray import fit
        head, state = fit(cfg, args.embeddings, args.out, seen, scan.dim)
    head.load_state_dict(state.best_head)
    runs.save_model(args.out, head, cfg, {"best_epoch": state.best_epoch,
                                          "best_val_accuracy": state.best_val_accuracy,
                                          "seen_users": seen.num_rows, "skipped_users": skipped})
    storage.write_json(storage.join(args.out, runs.HISTORY), state.history)
    print(f"trained {state.epoch} epochs on {seen.num_rows} seen users; best epoch {state.best_epoch} "
          f"(validation accuracy {state.best_val_accuracy:.4f}); run: {args.out}")
    return 0
