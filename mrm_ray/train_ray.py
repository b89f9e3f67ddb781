"""Meta-training on Ray Train: data-parallel MAML + RPO with checkpoints, resume and fault tolerance.

    mrm train --embeddings s3://bucket/emb --out s3://bucket/runs/r1 num_workers=8     # a cluster (RAY_ADDRESS)
    mrm train --embeddings data/emb --out runs/r1 num_workers=2 cpus_per_worker=0.5     # a 2-CPU machine
    mrm train --embeddings data/emb --out runs/r1 num_workers=4 use_gpu=true           # one GPU per worker, NCCL

`fit` is the driver: it builds the ScalingConfig, RunConfig and a TorchTrainer;
the table never passes through it.  Every worker (`train_worker`):

  1. reads ITS buckets of `<run>/shards/` (bucket b goes to worker b % world),
     written by the driver's one validating pass over the table (mrm_ray.train
     and mrm_ray.data.shards): all pairs of a user sit in one bucket, so
     support/query splits and the inner loop need nothing from the others, and
     a worker reads its share of the data and nothing else;
  2. runs mrm_ray.core.meta.meta_train on them.  Per meta-step the workers
     exchange only the meta-batch's B query losses (all-gather: RPO's quantile is
     over the GLOBAL meta-batch) and the K*d + K meta-gradient (all-reduce); which
     users form a meta-batch is a hash of (seed, epoch, user id), so 1 worker or
     N workers take exactly the same steps;
  3. after every validation pass reports its metrics, rank 0 with a checkpoint
     (a folder holding state.pt: head, optimizer, scheduler, best head, history).

Checkpoints live in <run>/checkpoints/train/epoch-NNNNNN.  A worker that dies
restarts the worker group from the latest checkpoint Ray Train has registered
(FailureConfig(max_failures); a damaged checkpoint falls back to the newest
readable one); re-running `mrm train` on the run directory restores the same
Ray Train run (same name and storage path) and continues from there, on the
same or another number of workers: the buckets and the steps do not depend on it.
"""
from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import ray
import ray.train
import ray.train.torch
import torch

from mrm_ray import config as config_mod
from mrm_ray import raytools
from mrm_ray.core import meta
from mrm_ray.core.model import MRMHead
from mrm_ray.data import runs, shards, storage
from mrm_ray.errors import unwrap

log = logging.getLogger(__name__)

RUN_NAME = "train"              # <run>/checkpoints/<RUN_NAME>: the Ray Train run (same name -> resume)
STATE_FILE = "state.pt"         # meta.TrainState, runs.state_to_bytes
CHECKPOINTS_KEPT = 3


def _cpu(obj):
    """A copy of nested dicts/lists with every tensor on the CPU (checkpoints load anywhere)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def read_state(checkpoint) -> meta.TrainState:
    """The state in a Ray Train checkpoint; if it is damaged, the newest readable older checkpoint's."""
    try:
        with checkpoint.as_directory() as d:
            return runs.state_from_bytes(Path(d, STATE_FILE).read_bytes())
    except Exception as e:  # noqa: BLE001 - any damage: a truncated file, garbage, a missing file
        fs, path = checkpoint.filesystem, checkpoint.path.rstrip("/")
        log.warning("checkpoint %s is unreadable (%s); falling back to the newest readable older one", path,
                    str(e).splitlines()[0][:120])
        state = _newest_readable(fs, path.rsplit("/", 1)[0], before=path.rsplit("/", 1)[1])
        if state is None:
            raise RuntimeError(f"no readable checkpoint left under {path.rsplit('/', 1)[0]}") from None
        return state


def _newest_readable(fs, base: str, before: str | None = None) -> meta.TrainState | None:
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    except OSError as e:
        raise storage.StorageError(f"cannot list {base}: {str(e).splitlines()[0]}") from None
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch-")
                   and (before is None or i.base_name < before)), reverse=True)
    for d in dirs:
        try:
            with fs.open_input_stream(f"{d}/{STATE_FILE}") as f:
                return runs.state_from_bytes(f.read())
        except Exception:  # noqa: BLE001 - missing, half-written (a crash during upload) or damaged: try older
            log.warning("checkpoint %s is unreadable; trying an older one", d)
            continue
    return None


def train_worker(config: dict) -> None:
    """Runs on every Ray Train worker (torch.distributed is initialised by TorchTrainer)."""
    from mrm_ray.train import load_seen, reference_index, seen_users, tasks_per_epoch
    cfg = config_mod.from_dict(config["cfg"])
    dim, n_users = config["dim"], config["n_users"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    t0 = time.time()
    mine = shards.buckets_of_rank(cfg.shard_buckets, rank, world)
    seen = seen_users(config["run"])
    shard = load_seen(config["run"], cfg, seen, dim, buckets=mine)
    read = shards.bucket_bytes([shards.bucket_uri(storage.join(config["run"], runs.SHARDS), b) for b in mine])
    log.info("rank %d: %d users, %d pairs from %d buckets (%.1f MB read) in %.1fs", rank, shard.n_users,
             shard.n_pairs, len(mine), read / 1e6, time.time() - t0)
    # Every seen user must be on exactly one worker: the users counted here are the driver's.
    found = int(meta.Collective().all_sum(torch.tensor([shard.n_users], dtype=torch.float64)).item())
    if found != n_users:
        raise RuntimeError(f"the workers hold {found} seen users, the driver counted {n_users}")

    checkpoint = ray.train.get_checkpoint()
    state = read_state(checkpoint) if checkpoint else None
    if state is not None and rank == 0:
        log.info("resuming from the checkpoint of epoch %d", state.epoch)
    head = runs.build_head(dim, cfg)
    if state is None and config.get("start") is not None:
        head.load_state_dict(config["start"])
    if cfg.use_gpu:
        device = ray.train.torch.get_device()
        head.to(device)
        shard.diff = shard.diff.to(device)

    def on_epoch_end(st: meta.TrainState, metrics: dict) -> None:
        metrics = {**metrics, "shard_users": shard.n_users, "shard_pairs": shard.n_pairs, "shard_bytes_read": read}
        if rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="mrm-ckpt-") as d:
            Path(d, STATE_FILE).write_bytes(runs.state_to_bytes(meta.TrainState(**_cpu(dict(st.__dict__)))))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d),
                             checkpoint_dir_name=f"epoch-{st.epoch:06d}")

    meta.meta_train(cfg, head, shard, tasks_per_epoch(config["run"], cfg, n_users), state=state,
                    on_epoch_end=on_epoch_end,
                    reference_index=reference_index(seen, shard.user_ids))


# --- the driver ---------------------------------------------------------------------
def checkpoint_root(run_uri: str) -> str:
    return storage.join(run_uri, runs.CHECKPOINTS)


def latest_state(run_uri: str) -> meta.TrainState | None:
    """The newest readable checkpoint of the run's Ray Train run, or None."""
    fs, base = storage.resolve(storage.join(checkpoint_root(run_uri), RUN_NAME))
    return _newest_readable(fs, base)


def check_cluster(cfg: config_mod.TrainConfig, address: str | None = None) -> None:
    """Connect to Ray and refuse a worker group it cannot host (see _check_resources)."""
    raytools.ensure_ray(address)
    _check_resources(cfg)


def _check_resources(cfg: config_mod.TrainConfig) -> None:
    """Before Ray Train waits: the worker group fits, or an autoscaler will make it fit."""
    raytools.require_workers(cfg.num_workers, cfg.cpus_per_worker, cfg.use_gpu, "Ray Train worker")


_INTERRUPTED = threading.Event()


def _trainer_class():
    """TorchTrainer whose Ctrl-C stops the run like Ray's own handler (the controller aborts the
    workers; checkpoints stay), then lets `mrm train` exit 130 with one line, where Ray's handler
    would end the process itself.  A second Ctrl-C leaves at once."""
    import signal

    class Trainer(ray.train.torch.TorchTrainer):
        def _register_sigint_handler(self, controller):
            _INTERRUPTED.clear()

            def handler(signum, frame):
                if _INTERRUPTED.is_set():
                    raise KeyboardInterrupt
                _INTERRUPTED.set()
                log.warning("interrupted: stopping the workers (Ctrl-C again to leave at once); "
                            "re-run the same command to resume from the last checkpoint")
                try:
                    ray.get(controller.abort.remote(), timeout=60)
                except Exception:  # noqa: BLE001 - the controller may already be gone
                    pass
            signal.signal(signal.SIGINT, handler)
    return Trainer


def selected_head(dim: int, cfg: config_mod.TrainConfig, state: meta.TrainState) -> MRMHead:
    """The head selected on the validation carve (state.best_head); state.head is the last epoch's."""
    head = runs.build_head(dim, cfg)
    head.load_state_dict({k: v.cpu() for k, v in (state.best_head or state.head).items()})
    return head


def fit(cfg: config_mod.TrainConfig, run_uri: str, seen_users: pa.Table, dim: int,
        start: dict | None = None) -> tuple[MRMHead, meta.TrainState]:
    """Meta-train on Ray Train from the run's latest checkpoint, if any.

    Returns the selected head and the final training state (last and best head, history).
    """
    done = latest_state(run_uri)
    if done is not None and done.epoch >= cfg.epochs:
        log.info("%s already holds a checkpoint of the last epoch (%d); nothing to train", run_uri, done.epoch)
        return selected_head(dim, cfg, done), done

    raytools.ensure_ray()
    _check_resources(cfg)
    ckpt_fs, ckpt_path = storage.resolve(checkpoint_root(run_uri))
    ckpt_fs.create_dir(ckpt_path, recursive=True)
    train = ray.train
    try:
        trainer = _trainer_class()(
            train_worker,
            # the workers read the seen users from the run directory (not through this config)
            train_loop_config={"cfg": config_mod.to_dict(cfg), "dim": dim, "n_users": seen_users.num_rows,
                               "start": start, "run": run_uri},
            torch_config=train.torch.TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
            scaling_config=train.ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                               resources_per_worker={"CPU": cfg.cpus_per_worker}),
            run_config=train.RunConfig(name=RUN_NAME, storage_path=ckpt_path, storage_filesystem=ckpt_fs,
                                       failure_config=train.FailureConfig(max_failures=cfg.max_failures),
                                       checkpoint_config=train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)),
        )
        log.info("meta-training %d seen users on %d Ray Train worker(s) (%s); checkpoints in %s", seen_users.num_rows,
                 cfg.num_workers, "GPU, nccl" if cfg.use_gpu else "CPU, gloo", checkpoint_root(run_uri))
        result = trainer.fit()
    except (train.TrainingFailedError, ray.exceptions.RayActorError, SystemExit) as e:
        if _INTERRUPTED.is_set():
            raise KeyboardInterrupt from None
        if not isinstance(e, train.TrainingFailedError):
            raise
        err = unwrap(e)
        if err is not e:   # a mistake in the input, found by a worker: one line, as anywhere else
            raise err from None
        log.error("training failed; re-run the same `mrm train` command to resume from the last checkpoint")
        raise
    if _INTERRUPTED.is_set():
        raise KeyboardInterrupt
    state = read_state(result.checkpoint) if result.checkpoint is not None else latest_state(run_uri)
    if state is None:
        raise RuntimeError(f"training finished without a checkpoint in {checkpoint_root(run_uri)}")
    return selected_head(dim, cfg, state), state
