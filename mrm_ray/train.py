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
import pyarrow.fs as pafs
import yaml

from mrm_ray import config as config_mod
from mrm_ray import contract as C
from mrm_ray import reference, runs, storage, tasks
from mrm_ray.errors import UserError
from mrm_ray.lease import Lease

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
    schema = storage.check_table(uri)
    C.require_columns(schema, C.EMBEDDINGS_REQUIRED, "embeddings")
    columns = [c for c in SCAN_COLUMNS if c in schema.names]
    counts: list[pd.DataFrame] = []
    dim, sq, n_sq, pairs = None, 0.0, 0, 0
    pair_ids = C.UniqueIds(C.PAIR_ID, "embeddings")
    for batch in storage.iter_batches(uri, columns=columns):
        t = C.normalize_embeddings(batch, dim=dim)
        if not t.num_rows:
            continue
        pair_ids.add(t.column(C.PAIR_ID))
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
    pair_ids.check()
    per_user = pd.concat(counts).groupby(level=0).sum().sort_index()
    uid = per_user.index.to_numpy(dtype=object)
    train = per_user["train_pairs"].to_numpy(np.int64)
    if cfg.reference_mode == "none":
        seen = tasks.seen_mask(uid, cfg.seed, cfg.seen_ratio)
        index = np.full(len(uid), -1, dtype=np.int64)
    else:  # the reference's split; each user's index in its (seen or unseen) dataset drives its RNG
        seen_ids, unseen_ids = reference.user_split(uid, cfg.seed)
        position = {u: i for i, u in enumerate(seen_ids)} | {u: i for i, u in enumerate(unseen_ids)}
        seen = np.isin(uid.astype(str), seen_ids)
        index = np.array([position[str(u)] for u in uid], dtype=np.int64)
    users = pa.table({"user_id": pa.array(uid.astype(str)), "seen": pa.array(seen),
                      "train_pairs": pa.array(train), "test_pairs": pa.array(per_user["test_pairs"].to_numpy(np.int64)),
                      "skipped": pa.array(train < cfg.min_train_pairs), "reference_index": pa.array(index)})
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
    return cap_train(shard, cfg, cfg.seen_train_limit)


def cap_train(shard: tasks.UserPairs, cfg: config_mod.TrainConfig, limit: int | None) -> tasks.UserPairs:
    """A shard of train pairs with the cap applied (the reference's way in reference_mode)."""
    if cfg.reference_mode != "none":
        reference.attach_items(shard, cfg.reference_mode, cfg.seed)
        return shard.select(reference.cap(shard, limit, np.ones(shard.n_pairs, dtype=bool)))
    return shard.select(tasks.cap_pairs(shard, limit, cfg.seed))


def data_start(cfg: config_mod.TrainConfig, uri: str, seen_users: pa.Table, dim: int) -> tuple[dict, dict]:
    """The data-driven start (mrm_ray.basis) from the seen users' training pairs.

    Uses at most cfg.basis.max_values floats: whole users, picked by a seeded
    hash, until the budget is spent (meta-training then sees every user).
    It uses the validation carve of meta-training too (a data-poor population
    needs every pair; the start's own choices are cross-validated over users):
    epoch 0 then looks a little better on the carve than it is, so the later
    epochs of meta-training are only kept when they beat it clearly.
    Returns (head state dict, report); sets cfg.model.n_heads.
    """
    import torch
    from mrm_ray import basis
    from mrm_ray.meta import single_thread
    pairs = seen_users.column("train_pairs").to_numpy()
    if cfg.seen_train_limit:
        pairs = np.minimum(pairs, cfg.seen_train_limit)
    order = np.argsort(tasks.unit(tasks.mix64(tasks.hash_ids(seen_users.column("user_id").to_numpy(
        zero_copy_only=False), cfg.seed), 0xBA515)), kind="stable")
    n_keep = int(np.searchsorted(np.cumsum(pairs[order]) * dim, cfg.basis.max_values, side="right"))
    sample = seen_users.take(pa.array(np.sort(order[:max(n_keep, min(len(order), cfg.basis.folds))])))
    shard = seen_train_pairs(uri, sample, cfg)
    shard = shard.select(shard.counts()[shard.pair_user()] > 0, keep_empty_users=False)
    if shard.n_users < 2:
        raise UserError("model.init=data needs at least 2 seen users with training pairs to cross-validate "
                        f"the start; this table has {shard.n_users} (use model.init=random)")
    folds = min(cfg.basis.folds, shard.n_users)
    if folds < cfg.basis.folds:
        log.warning("only %d seen users: the start is cross-validated over %d folds, not %d", shard.n_users,
                    folds, cfg.basis.folds)
    log.info("data-driven start: %d users, %d pairs (cross-validated over %d folds)", shard.n_users,
             shard.n_pairs, folds)
    # users dealt round-robin in a seeded hash order: every fold gets users, however few there are
    rank = np.argsort(np.argsort(tasks.unit(tasks.mix64(tasks.hash_ids(shard.user_ids, cfg.seed), 0xF01D)),
                                 kind="stable"), kind="stable")
    fold = rank % folds
    half = tasks.validation_mask(shard, 0.5, cfg.seed + 1)
    x = shard.diff.to(torch.float64) * cfg.model.input_scale
    with single_thread():
        found = basis.fit(x, torch.from_numpy(shard.pair_user()), shard.n_users, torch.from_numpy(fold),
                          torch.from_numpy(half), cfg.basis, n_heads=cfg.model.n_heads, robust=cfg.rpo)
    cfg.model.n_heads = int(found.weight.shape[0])
    head = runs.build_head(dim, cfg)
    state = head.state_dict()
    state["layers.0"] = found.weight.to(torch.float32)
    state["theta0"] = found.mu.to(torch.float32)
    if "log_prior" in state:
        state["log_prior"] = found.prec.log().to(torch.float32)
    report = {**found.report, "users": shard.n_users, "pairs": shard.n_pairs}
    log.info("data-driven start: %s", {k: v for k, v in report.items() if k != "cv"})
    return state, report


def train_local(cfg: config_mod.TrainConfig, uri: str, run_uri: str, seen_users: pa.Table, dim: int,
                start: dict | None = None):
    """Single-process meta-training with resumable state files in the run directory.

    checkpoints/local/state.pt is the latest epoch's state, state.prev.pt the one before: a
    damaged latest state falls back to the previous one (and says so).
    """
    from mrm_ray.meta import meta_train
    folder = storage.join(run_uri, "checkpoints", "local")
    state = None
    for name in ("state.pt", "state.prev.pt"):
        uri_ = storage.join(folder, name)
        if not storage.exists(uri_):
            continue
        try:
            state = runs.state_from_bytes(storage.read_bytes(uri_))
        except Exception as e:  # noqa: BLE001 - any damage: a truncated file, garbage, a foreign pickle
            log.warning("checkpoint %s is unreadable (%s); trying an older one", uri_, str(e).splitlines()[0][:120])
            continue
        log.info("resuming from %s (epoch %d)", uri_, state.epoch)
        break
    shard = seen_train_pairs(uri, seen_users, cfg)
    head = runs.build_head(dim, cfg)
    if start is not None and state is None:
        head.load_state_dict(start)
    index = reference_index(seen_users, shard.user_ids)

    def checkpoint(st, metrics):
        latest = storage.join(folder, "state.pt")
        if storage.exists(latest):
            storage.write_bytes(storage.join(folder, "state.prev.pt"), storage.read_bytes(latest))
        storage.write_bytes(latest, runs.state_to_bytes(st))
    return head, meta_train(cfg, head, shard, shard.n_users, state=state, on_epoch_end=checkpoint,
                            reference_index=index)


def reference_index(users: pa.Table, user_ids: np.ndarray) -> np.ndarray:
    """Each of `user_ids`' dataset index in the reference's order (from the scan's users table)."""
    lookup = pd.Series(users.column("reference_index").to_numpy(),
                       index=users.column("user_id").to_numpy(zero_copy_only=False).astype(str))
    return lookup.reindex(np.asarray(user_ids).astype(str)).fillna(-1).to_numpy(np.int64)


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
            # resolved by the first run: the input scale, and K when it was left to cross-validation
            asked.model.input_scale, asked.model.auto_input_scale = saved.model.input_scale, saved.model.auto_input_scale
            if asked.model.n_heads == 0:
                asked.model.n_heads = saved.model.n_heads
            a, b = config_mod.to_dict(asked), config_mod.to_dict(saved)
            if any(a[k] != b[k] for k in a if k not in PLACEMENT_KEYS):
                raise UserError(f"{run_uri} holds a run with a different config; resume without "
                                f"--config/overrides or pick a new --out")
        for key in given & set(PLACEMENT_KEYS):
            setattr(saved, key, getattr(asked, key))
        return saved, True
    return build_config(args), False


def has_checkpoint(run_uri: str) -> bool:
    """Does the run directory hold training state to resume from (local or Ray Train)?"""
    return (storage.exists(storage.join(run_uri, "checkpoints", "local", "state.pt"))
            or storage.exists(storage.join(run_uri, "checkpoints", "train")))


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


def check_run_directory(out: str, embeddings: str) -> None:
    """Before anything: --out is new, empty, or a run directory of mrm train; never inside the table."""
    storage.check_overlap(out, [embeddings])
    if not storage.exists(out):
        return
    if not storage.is_dir(out):
        raise UserError(f"--out {out} is a file; give a run directory (new or empty)")
    if runs.is_run_directory(out):
        return
    fs, path = storage.resolve(out)
    entries = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name != "_lock"]
    if entries:
        raise UserError(f"--out {out} is not empty and is not a run directory of mrm train (it holds "
                        f"{entries[0]}{' and more' if len(entries) > 1 else ''}); choose a new or empty folder")


def run(args) -> int:
    check_run_directory(args.out, args.embeddings)
    with Lease(args.out, "train"):   # one mrm train per run directory at a time
        return _run(args)


def _run(args) -> int:
    cfg, resuming = resolve_config(args, args.out)
    runs.check_inputs(args.out, args.embeddings)  # a resume trains on the same table, or not at all
    if not args.local:  # what the workers need must be there (or coming) before any work
        from mrm_ray.train_ray import check_cluster
        check_cluster(cfg)
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
    start = None
    if cfg.model.init == "data" and not has_checkpoint(args.out):
        start, report = data_start(cfg, args.embeddings, seen, scan.dim)
        storage.write_json(storage.join(args.out, runs.START), report)
    if not resuming:
        runs.save_config(args.out, cfg)
        runs.save_inputs(args.out, args.embeddings)
    storage.write_table(users, storage.join(args.out, runs.USERS), "train", overwrite=True)
    if args.local:
        head, state = train_local(cfg, args.embeddings, args.out, seen, scan.dim, start)
    else:
        from mrm_ray.train_ray import fit
        head, state = fit(cfg, args.embeddings, args.out, seen, scan.dim, start)
    head.load_state_dict(state.best_head)
    runs.save_model(args.out, head, cfg, {"best_epoch": state.best_epoch,
                                          "best_val_accuracy": state.best_val_accuracy,
                                          "seen_users": seen.num_rows, "skipped_users": skipped})
    storage.write_json(storage.join(args.out, runs.HISTORY), state.history)
    chosen = ("the final epoch (no validation carve)" if cfg.select_metric == "last" or cfg.val_ratio == 0 else
              f"best epoch {state.best_epoch} (validation accuracy {state.best_val_accuracy:.4f}, "
              f"loss {state.best_val_loss:.4f})")
    print(f"trained {state.epoch} epochs on {seen.num_rows} seen users; kept {chosen}; run: {args.out}")
    return 0
