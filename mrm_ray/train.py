"""Meta-train MRM (+RPO) on an embeddings table: `train(cfg, embeddings, out) -> Run`.

    mrm train --embeddings data/emb --out runs/r1                       # the default, Ray Train
    mrm train --embeddings data/emb --out runs/r1 --preset prism num_workers=4
    mrm train --embeddings data/emb --out runs/r1 --config exp.yaml inner.steps=8
    mrm train --embeddings data/emb --out runs/r1 --local               # one process, no Ray

Re-running on an existing run directory resumes it (same table, same config).

1. One streamed pass over the table validates every row (dimensions, NaN/inf,
   keys, whole-table pair_id uniqueness), counts every user's train/test pairs,
   and writes the seen users' train rows into `<run>/shards/`, in buckets of
   whole users (mrm_ray.data.shards): the table is read once, by the driver,
   before any worker starts.  A resume reuses the shards.
2. Users are split seen/unseen from the seed; users with too few train pairs
   are skipped and counted.
3. The data-driven start (mrm_ray.core.basis) on a bounded sample of buckets.
4. Meta-training on Ray Train (mrm_ray.train_ray: worker r reads only its
   buckets) or, with local=True, in this process (mrm_ray.core.meta).
5. The model selected on the validation carve is saved with the config,
   users and history.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import torch

from mrm_ray import config as config_mod
from mrm_ray.core import basis, reference, splits
from mrm_ray.core.config import PLACEMENT_KEYS, TrainConfig
from mrm_ray.core.meta import meta_train, single_thread
from mrm_ray.data import contract as C
from mrm_ray.data import runs, shards, storage
from mrm_ray.data.lease import Lease
from mrm_ray.errors import UserError

log = logging.getLogger(__name__)
SCAN_COLUMNS = [C.USER_ID, C.PAIR_ID, C.CONV_ID, C.SPLIT, C.CHOSEN_EMB, C.REJECTED_EMB]


# --- 1. the one pass over the table ------------------------------------------------------
def scan_and_shard(uri: str, run_uri: str, cfg: TrainConfig) -> dict:
    """Validate the whole table, count pairs per user, write the seen users' train rows to <run>/shards.

    Returns {"dim", "pairs", "rms_diff_norm"}; writes <run>/users.parquet.  In
    reference_mode the seen users are known only once every id has been seen,
    so every user's train rows are sharded and the loader keeps the seen ones.
    """
    schema = storage.check_table(uri)
    C.require_columns(schema, C.EMBEDDINGS_REQUIRED, "embeddings")
    columns = [c for c in SCAN_COLUMNS if c in schema.names]
    total = shards.count_rows(uri)
    counts: list[pd.DataFrame] = []
    state = {"dim": None, "sq": 0.0, "n_sq": 0, "pairs": 0, "t0": time.time(), "last": time.time()}
    pair_ids = C.UniqueIds(C.PAIR_ID, "embeddings")
    faithful = cfg.reference_mode != "none"

    def normalize(batch):
        t = C.normalize_embeddings(batch, dim=state["dim"])
        if t.num_rows:
            state["dim"] = t.schema.field(C.CHOSEN_EMB).type.list_size
            pair_ids.add(t.column(C.PAIR_ID))
        return t

    def keep(t):
        uid = t.column(C.USER_ID).to_numpy(zero_copy_only=False)
        is_test = pc.equal(t.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)
        counts.append(pd.DataFrame({"user_id": uid, "train_pairs": ~is_test, "test_pairs": is_test})
                      .groupby("user_id").sum())
        train_seen = ~is_test & shards.seen_mask(uid, cfg.seed, cfg.seen_ratio)
        if train_seen.any():  # the auto input scale's statistic (an approximation in reference_mode)
            diff = (C.emb_matrix(t.column(C.CHOSEN_EMB))[train_seen] - C.emb_matrix(t.column(C.REJECTED_EMB))[train_seen])
            state["sq"] += float(np.einsum("nd,nd->", diff, diff, dtype=np.float64))
            state["n_sq"] += len(diff)
        return ~is_test if faithful else train_seen

    def progress(rows):
        state["pairs"] += rows
        if time.time() - state["last"] >= 10:
            state["last"] = time.time()
            log.info("scan: %d/%d pairs validated and sharded (%.0f pairs/s)", state["pairs"], total,
                     state["pairs"] / (time.time() - state["t0"]))

    shard_uri = storage.join(run_uri, runs.SHARDS)
    with storage.atomic_output(shard_uri, "train", [uri], overwrite=True) as staging:
        shards.write_buckets(uri, staging, cfg.shard_buckets, cfg.seed, normalize=normalize, keep=keep,
                             columns=columns, progress=progress)
    if state["dim"] is None:
        raise UserError(f"embeddings table {uri} has no rows")
    pair_ids.check()
    per_user = pd.concat(counts).groupby(level=0).sum().sort_index()
    uid = per_user.index.to_numpy(dtype=object)
    train = per_user["train_pairs"].to_numpy(np.int64)
    if faithful:  # the reference's split; each user's index in its (seen or unseen) dataset drives its RNG
        seen_ids, unseen_ids = reference.user_split(uid, cfg.seed)
        position = {u: i for i, u in enumerate(seen_ids)} | {u: i for i, u in enumerate(unseen_ids)}
        seen = np.isin(uid.astype(str), seen_ids)
        index = np.array([position[str(u)] for u in uid], dtype=np.int64)
    else:
        seen = shards.seen_mask(uid, cfg.seed, cfg.seen_ratio)
        index = np.full(len(uid), -1, dtype=np.int64)
    users = pa.table({"user_id": pa.array(uid.astype(str)), "seen": pa.array(seen),
                      "train_pairs": pa.array(train), "test_pairs": pa.array(per_user["test_pairs"].to_numpy(np.int64)),
                      "skipped": pa.array(train < cfg.min_train_pairs), "reference_index": pa.array(index)})
    storage.write_table(users, storage.join(run_uri, runs.USERS), "train", overwrite=True)
    scan = {"dim": int(state["dim"]), "pairs": int(state["pairs"]),
            "rms_diff_norm": math.sqrt(state["sq"] / state["n_sq"]) if state["n_sq"] else 1.0}
    storage.write_json(storage.join(run_uri, runs.SCAN), scan)
    log.info("scan: %d pairs of %d users validated in %.1fs; seen users' train rows in %d buckets (%s)",
             scan["pairs"], len(uid), time.time() - state["t0"], cfg.shard_buckets, shard_uri)
    return scan


def seen_users(run_uri: str) -> pa.Table:
    users = storage.read_table(storage.join(run_uri, runs.USERS))
    return users.filter(pc.and_(users.column("seen"), pc.invert(users.column("skipped"))))


def tasks_per_epoch(run_uri: str, cfg: TrainConfig, n_users: int) -> int:
    """Seen users an epoch of meta-training walks through: the users trained on, or in reference_mode the
    reference's dataset size, which counts seen users without train pairs too (the reference stops on
    them; here they are skipped and their places in its permutation stay empty)."""
    if cfg.reference_mode == "none":
        return n_users
    users = storage.read_table(storage.join(run_uri, runs.USERS), columns=["seen"])
    return int(pc.sum(users.column("seen")).as_py())


def load_seen(run_uri: str, cfg: TrainConfig, users: pa.Table, dim: int, buckets: list[int] | None = None,
              ) -> splits.UserPairs:
    """The seen users' train pairs in `buckets` (all by default), caps applied: the one loader."""
    buckets = range(cfg.shard_buckets) if buckets is None else buckets
    shard_uri = storage.join(run_uri, runs.SHARDS)
    uris = [shards.bucket_uri(shard_uri, b) for b in buckets]
    ids = users.column("user_id").to_numpy(zero_copy_only=False)
    mine = ids[np.isin(shards.bucket_of(shards.user_hash(ids, cfg.seed), cfg.shard_buckets), list(buckets))]
    shard = shards.load(uris, cfg.seed, users=np.sort(mine.astype(object)),
                        dtype=shards.shard_dtype(cfg.shard_dtype, dim))
    return cap_train(shard, cfg, cfg.seen_train_limit)


def cap_train(shard: splits.UserPairs, cfg: TrainConfig, limit: int | None) -> splits.UserPairs:
    """A shard of train pairs with the cap applied (the reference's way in reference_mode)."""
    if cfg.reference_mode != "none":
        reference.attach_items(shard, cfg.reference_mode, cfg.seed)
        return shard.select(reference.cap(shard, limit, np.ones(shard.n_pairs, dtype=bool)))
    return shard.select(splits.cap_pairs(shard, limit, cfg.seed))


def reference_index(users: pa.Table, user_ids: np.ndarray) -> np.ndarray:
    """Each of `user_ids`' dataset index in the reference's order (from the users table)."""
    lookup = pd.Series(users.column("reference_index").to_numpy(),
                       index=users.column("user_id").to_numpy(zero_copy_only=False).astype(str))
    return lookup.reindex(np.asarray(user_ids).astype(str)).fillna(-1).to_numpy(np.int64)


# --- 3. the data-driven start -------------------------------------------------------------
def data_start(cfg: TrainConfig, run_uri: str, seen: pa.Table, dim: int) -> tuple[dict, dict]:
    """The data-driven start (mrm_ray.core.basis) from the seen users' training pairs.

    Uses at most cfg.basis.max_values floats and cfg.basis.max_pairs pairs: whole
    buckets (hash-random sets of whole users), as many as fit; meta-training then
    sees every user.  By default it uses the validation carve of meta-training
    too (a data-poor population needs every pair; the start's own choices are
    cross-validated over users), so the carve is not held out from the start
    or from the epochs that grow out of it, and it reads well above the test
    split (README, "Model selection", has the figures); basis.use_carve=false
    holds it out.
    Returns (head state dict, report); sets cfg.model.n_heads.
    """
    pairs = seen.column("train_pairs").to_numpy()
    if cfg.seen_train_limit:
        pairs = np.minimum(pairs, cfg.seen_train_limit)
    bucket = shards.bucket_of(shards.user_hash(seen.column("user_id").to_numpy(zero_copy_only=False), cfg.seed),
                              cfg.shard_buckets)
    per_bucket = np.bincount(bucket, weights=pairs, minlength=cfg.shard_buckets)
    budget = min(cfg.basis.max_values / dim, cfg.basis.max_pairs)   # pairs
    n_take = max(1, int(np.searchsorted(np.cumsum(per_bucket), budget, side="right")))
    shard = load_seen(run_uri, cfg, seen, dim, buckets=list(range(min(n_take, cfg.shard_buckets))))
    keep = shard.counts()[shard.pair_user()] > 0
    if not cfg.basis.use_carve:   # the very carve meta_train holds out: it is per user, and users are whole here
        keep &= ~splits.validation_mask(shard, cfg.val_ratio, cfg.seed)
    shard = shard.select(keep, keep_empty_users=False)
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
    rank = np.argsort(np.argsort(splits.unit(splits.mix64(shard.user_hash, 0xF01D)), kind="stable"), kind="stable")
    half = splits.validation_mask(shard, 0.5, cfg.seed + 1)
    x = shard.diff.to(torch.float64) * cfg.model.input_scale
    with single_thread():
        found = basis.fit(x, torch.from_numpy(shard.pair_user()), shard.n_users, torch.from_numpy(rank % folds),
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


# --- 4. meta-training in this process -----------------------------------------------------
def train_local(cfg: TrainConfig, run_uri: str, seen: pa.Table, dim: int, start: dict | None = None):
    """Single-process meta-training with resumable state files in the run directory.

    checkpoints/local/state.pt is the latest epoch's state, state.prev.pt the one before: a
    damaged latest state falls back to the previous one (and says so).
    """
    folder = storage.join(run_uri, runs.LOCAL_CHECKPOINTS)
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
    shard = load_seen(run_uri, cfg, seen, dim)
    head = runs.build_head(dim, cfg)
    if start is not None and state is None:
        head.load_state_dict(start)

    def checkpoint(st, metrics):
        latest = storage.join(folder, "state.pt")
        if storage.exists(latest):
            storage.write_bytes(storage.join(folder, "state.prev.pt"), storage.read_bytes(latest))
        storage.write_bytes(latest, runs.state_to_bytes(st))
    return head, meta_train(cfg, head, shard, tasks_per_epoch(run_uri, cfg, shard.n_users), state=state,
                            on_epoch_end=checkpoint,
                            reference_index=reference_index(seen, shard.user_ids))


# --- the run directory ------------------------------------------------------------------------
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
    entries = [i.base_name for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name != runs.LOCK]
    if entries:
        raise UserError(f"--out {out} is not empty and is not a run directory of mrm train (it holds "
                        f"{entries[0]}{' and more' if len(entries) > 1 else ''}); choose a new or empty folder")


def resolve_config(asked: TrainConfig, explicit: bool, run_uri: str,
                   placement: set[str] | None = None) -> tuple[TrainConfig, bool]:
    """(config, resuming).  A run directory that has a config resumes with it: `asked` must then agree
    with it (when `explicit`, i.e. anything beyond placement keys was asked), except where it runs:
    the `placement` keys asked for now (None: those that differ from the defaults) replace the saved ones."""
    cfg_uri = storage.join(run_uri, runs.CONFIG)
    if not storage.exists(cfg_uri):
        return asked, False
    saved = config_mod.from_dict(storage.read_json(cfg_uri))
    if explicit:
        probe = dataclasses.replace(asked, model=dataclasses.replace(asked.model))
        # resolved by the first run: the input scale, and K when it was left to cross-validation
        probe.model.input_scale, probe.model.auto_input_scale = saved.model.input_scale, saved.model.auto_input_scale
        if probe.model.n_heads == 0:
            probe.model.n_heads = saved.model.n_heads
        a, b = config_mod.to_dict(probe), config_mod.to_dict(saved)
        if any(a[k] != b[k] for k in a if k not in PLACEMENT_KEYS):
            raise UserError(f"{run_uri} holds a run with a different config; resume without "
                            f"--config/overrides or pick a new --out")
    default = TrainConfig()
    if placement is None:
        placement = {k for k in PLACEMENT_KEYS if getattr(asked, k) != getattr(default, k)}
    for key in placement:   # where it runs: as asked now, else as before
        setattr(saved, key, getattr(asked, key))
    return saved, True


def has_checkpoint(run_uri: str) -> bool:
    """Does the run directory hold training state to resume from (local or Ray Train)?"""
    return (storage.exists(storage.join(run_uri, runs.LOCAL_CHECKPOINTS, "state.pt"))
            or storage.exists(storage.join(run_uri, runs.CHECKPOINTS, "train")))


# --- the stage -------------------------------------------------------------------------------------
def train(cfg: TrainConfig, embeddings: str, out: str, local: bool = False, explicit: bool = True,
          address: str | None = None, placement: set[str] | None = None) -> runs.Run:
    """Meta-train into the run directory `out` (new, or a run to resume); returns the trained run.

    explicit: the config was asked for (not just placement keys), so a resumed
    run must have the same one.  placement: the placement keys (num_workers, ...)
    asked for now, which a resumed run takes (None: those that differ from the
    defaults).  address: the Ray cluster (None: RAY_ADDRESS, else a local one).
    """
    embeddings, out = storage.absolute(embeddings), storage.absolute(out)
    check_run_directory(out, embeddings)
    with Lease(out, "train"):   # one mrm train per run directory at a time
        return _train(cfg, embeddings, out, local, explicit, address, placement)


def _train(asked: TrainConfig, embeddings: str, out: str, local: bool, explicit: bool, address: str | None,
           placement: set[str] | None):
    cfg, resuming = resolve_config(asked, explicit, out, placement)
    runs.check_finetune_split(runs.provenance(embeddings), cfg)
    runs.check_inputs(out, embeddings)  # a resume trains on the same table, or not at all
    if not resuming:   # first: from here on the folder is a run directory (of this table)
        runs.save_inputs(out, embeddings)
    if not local:  # what the workers need must be there (or coming) before any work
        from mrm_ray.train_ray import check_cluster
        check_cluster(cfg, address)
    if resuming and storage.exists(storage.join(out, runs.SCAN)) and storage.exists(
            storage.join(out, runs.SHARDS, storage.SUCCESS)):
        scan = storage.read_json(storage.join(out, runs.SCAN))
    else:
        scan = scan_and_shard(embeddings, out, cfg)
    if cfg.model.auto_input_scale:
        cfg.model.input_scale, cfg.model.auto_input_scale = 1.0 / max(scan["rms_diff_norm"], 1e-12), False
    users = storage.read_table(storage.join(out, runs.USERS))
    seen = seen_users(out)
    skipped = int(pc.sum(users.column("skipped")).as_py())
    log.info("%d pairs, %d users (%d seen for meta-training, %d skipped with < %d train pairs), dim %d",
             scan["pairs"], users.num_rows, seen.num_rows, skipped, cfg.min_train_pairs, scan["dim"])
    if seen.num_rows == 0:
        raise UserError("no seen user has enough train pairs to meta-train on")
    if not local and cfg.num_workers > cfg.shard_buckets:
        raise UserError(f"num_workers={cfg.num_workers} is more than shard_buckets={cfg.shard_buckets}: some "
                        f"workers would hold no users; raise shard_buckets (a new run) or use fewer workers")
    start = None
    if cfg.model.init == "data" and not has_checkpoint(out):
        start, report = data_start(cfg, out, seen, scan["dim"])
        storage.write_json(storage.join(out, runs.START), report)
    if not resuming:
        runs.save_config(out, cfg)
    if local:
        head, state = train_local(cfg, out, seen, scan["dim"], start)
    else:
        from mrm_ray.train_ray import fit
        head, state = fit(cfg, out, seen, scan["dim"], start)
    head.load_state_dict(state.best_head)
    runs.save_model(out, head, cfg, {"best_epoch": state.best_epoch, "best_val_accuracy": state.best_val_accuracy,
                                     "best_val_loss": state.best_val_loss, "seen_users": seen.num_rows,
                                     "skipped_users": skipped, "embeddings": runs.provenance(embeddings)})
    storage.write_json(storage.join(out, runs.HISTORY), state.history)
    chosen = ("the final epoch (no validation carve)" if cfg.select_metric == "last" or cfg.val_ratio == 0 else
              f"best epoch {state.best_epoch} (validation accuracy {state.best_val_accuracy:.4f}, "
              f"loss {state.best_val_loss:.4f})")
    print(f"trained {state.epoch} epochs on {seen.num_rows} seen users; kept {chosen}; run: {out}")
    return runs.load_run(out)
