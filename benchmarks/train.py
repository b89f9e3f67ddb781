"""User-tasks per second of meta-training: the batched meta-step vs. the reference's per-user loop.

    python benchmarks/train.py                                  # d=64, 4096 users, meta-batch 256
    python benchmarks/train.py --dim 1024 --users 2048          # larger embeddings: memory bound
    python benchmarks/train.py --preset prism --tasks-per-batch 2   # the reference's meta-batch
    python benchmarks/train.py --dim 1024 --users 2048 --workers 0 --memory   # float32 vs bfloat16 shards

One run, same data, same config, same global meta-batches:

  per-user loop   the reference's way: for each user of the meta-batch, its own
                  forward through the base heads, a fresh inner optimizer, autograd
                  through the inner step (create_graph), its query loss; then RPO
                  over the B losses, one backward, one Adam step.
  batched, 1 wkr  what `mrm train` runs (mrm_ray.core.meta): one (rows, d) x (d, K) product
                  for all B users' pairs, `adapt` on K floats per pair with segment
                  ops, RPO, backward, all-reduce (a no-op here), Adam.
  batched, 2 wkr  the same step in 2 processes joined by torch.distributed (gloo),
                  each reading only its user buckets as Ray Train does (mrm_ray.train_ray;
                  it prints the bytes each worker read):
                  per step one all-gather of the B query losses and one all-reduce
                  of the meta-gradient.

Every path runs torch on one thread per worker (mrm_ray.core.meta.single_thread), so
"per worker" is per core; rates are those of the median step.  The first step
of the loop and of the batched path are checked to give the same losses and
the same updated parameters.
"""
from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time

import numpy as np
import pyarrow.compute as pc
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mrm_ray import config as config_mod
from mrm_ray.core import meta, rpo, splits
from mrm_ray.core.adapt import adapt, task_losses
from mrm_ray.data import contract as C
from mrm_ray.data import runs, shards
from mrm_ray.synth import write_embedding_population


# --- data and the meta-batches ------------------------------------------------------
def shard_table(emb: str, out: str, cfg) -> str:
    """The driver's one validating pass, as `mrm train` makes it: every user's train rows into buckets of
    whole users (mrm_ray.data.shards)."""
    def train_rows(t):
        return ~pc.equal(t.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)
    shards.write_buckets(emb, out, cfg.shard_buckets, cfg.seed, normalize=C.normalize_embeddings, keep=train_rows)
    return out


def load(buckets: str, cfg, rank: int = 0, world: int = 1) -> tuple[splits.UserPairs, int]:
    """Worker rank's share of the users, read from its buckets only (as mrm_ray.train_ray does); and the
    bytes it read."""
    uris = [shards.bucket_uri(buckets, b) for b in shards.buckets_of_rank(cfg.shard_buckets, rank, world)]
    return shards.load(uris, cfg.seed), shards.bucket_bytes(uris)


def memory_and_speed_by_dtype(buckets: str, cfg, steps: int) -> None:
    """A worker's shard held as float32 vs bfloat16 (shard_dtype): bytes in memory and meta-step rate."""
    import gc

    def rss() -> int:   # resident bytes of this process (Linux /proc)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for dtype in (torch.float32, torch.bfloat16):
        gc.collect()
        before = rss()
        uris = [shards.bucket_uri(buckets, b) for b in range(cfg.shard_buckets)]
        shard = shards.load(uris, cfg.seed, dtype=dtype)
        grown = rss() - before
        with meta.single_thread():
            rate = run_batched(shard, cfg, steps, meta.Collective(), shard.n_users)
        print(f"shard as {str(dtype).split('.')[-1]:8s}: embeddings {shard.diff.nbytes / 1e6:8.1f} MB "
              f"(process grew {grown / 1e6:8.1f} MB while loading), {rate:10.0f} user-tasks/s")
        del shard


def meta_batches(shard: splits.UserPairs, cfg, n_global: int, comm: meta.Collective | None = None):
    """support, query, and per step of epoch 0 (local users, every worker's share): the global meta-batches."""
    n_slots = max(1, math.ceil(n_global / cfg.tasks_per_batch))
    support, query = splits.support_query_masks(shard, cfg.query_ratio, cfg.seed, 0)
    slot = splits.epoch_slots(shard.user_hash, n_slots, cfg.seed, 0)
    local = torch.from_numpy(np.bincount(slot, minlength=n_slots)).to(torch.float64)
    shares = (comm or meta.Collective()).all_gather_rows(local).long()  # (world, n_slots), once per epoch
    return support, query, [(np.flatnonzero(slot == t), shares[:, t].tolist()) for t in range(n_slots)]


# --- the two ways of taking a meta-step ---------------------------------------------
def batched_step(head, opt, shard, users, sizes, support, query, cfg, comm: meta.Collective) -> int:
    """One meta-step exactly as mrm_ray.core.meta.meta_train takes it; returns the global meta-batch size."""
    meta.meta_step(head, opt, shard, users, sizes, support, query, cfg, comm)
    return sum(sizes)


def per_user_step(head, opt, shard, users, support, query, cfg) -> torch.Tensor:
    """One meta-step the reference's way: one user at a time.  Returns the query losses."""
    losses = []
    w = head.weight()
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in head.inner_args().items()}
    for u in users:
        lo, hi = shard.offsets[u], shard.offsets[u + 1]
        diff, s, q = shard.diff[lo:hi], torch.from_numpy(support[lo:hi]), torch.from_numpy(query[lo:hi])
        dphi_s, dphi_q = (diff[s] @ w.T).double(), (diff[q] @ w.T).double()   # this user's base rewards
        one = torch.zeros(len(dphi_s), dtype=torch.long)
        theta = adapt(head.theta0.double(), dphi_s, one, 1, cfg.inner, **args)  # a fresh inner loop
        losses.append(task_losses(theta, dphi_q, torch.zeros(len(dphi_q), dtype=torch.long),
                                  weights=head.cfg.weights)[0].to(head.theta0.dtype))
    losses = torch.stack(losses)
    opt.zero_grad()
    rpo.objective(losses, cfg.rpo).backward()
    torch.nn.utils.clip_grad_norm_(list(head.parameters()), cfg.grad_clip)
    opt.step()
    return losses


def new_head(dim, cfg):
    head = runs.build_head(dim, cfg)
    return head, torch.optim.Adam(head.parameters(), lr=cfg.meta_lr)


# --- runs -----------------------------------------------------------------------------
def median_rate(users: list[int], seconds: list[float]) -> float:
    """Users per second of the median step (robust to a busy machine's stalls)."""
    rates = sorted(u / s for u, s in zip(users, seconds))
    return rates[len(rates) // 2]


def run_batched(shard, cfg, steps: int, comm: meta.Collective, n_global: int) -> float:
    """Global user-tasks per second over `steps` meta-steps (after one warm-up step)."""
    head, opt = new_head(shard.dim, cfg)
    support, query, batches = meta_batches(shard, cfg, n_global, comm)
    batches = [batches[t % len(batches)] for t in range(steps + 1)]
    batched_step(head, opt, shard, *batches[0], support, query, cfg, comm)  # warm-up
    comm.all_sum(torch.zeros(1))  # barrier; the steps' own collectives keep the workers in lockstep
    users, seconds = [], []
    for b in batches[1:]:
        t0 = time.perf_counter()
        users.append(batched_step(head, opt, shard, *b, support, query, cfg, comm))
        seconds.append(time.perf_counter() - t0)
    return median_rate(users, seconds)


def _worker(rank: int, world: int, port: int, emb: str, cfg_dict: dict, steps: int, n_global: int, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        cfg = config_mod.from_dict(cfg_dict)
        shard, read = load(emb, cfg, rank, world)
        with meta.single_thread():
            rate = run_batched(shard, cfg, steps, meta.Collective(), n_global)
        out.put((rank, rate, read, shard.n_users))
    finally:
        dist.destroy_process_group()


def run_distributed(emb: str, cfg, steps: int, world: int, n_global: int) -> tuple[float, list]:
    """(global user-tasks/s, [(rank, bytes read, users)] per worker)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(world, port, emb, config_mod.to_dict(cfg), steps, n_global, out),
                       nprocs=world, join=True, start_method="spawn")
    got = sorted(out.get() for _ in range(world))
    return got[0][1], [(rank, read, users) for rank, _, read, users in got]


def check_same_step(shard, cfg) -> None:
    """The loop and the batched path: same losses, same meta-gradient on the first meta-batch."""
    support, query, batches = meta_batches(shard, cfg, shard.n_users)
    users, sizes = batches[0]
    h1, o1 = new_head(shard.dim, cfg)
    h2, o2 = new_head(shard.dim, cfg)
    loop_losses = per_user_step(h1, o1, shard, users, support, query, cfg)
    batched_losses = meta.meta_batch_losses(h2, shard, users, support, query, cfg)
    torch.testing.assert_close(loop_losses, batched_losses.detach(), atol=1e-5, rtol=1e-4)
    batched_step(h2, o2, shard, users, sizes, support, query, cfg, meta.Collective())
    for a, b in zip(h1.parameters(), h2.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def communication(shard, cfg, world: int) -> tuple[int, int]:
    """Bytes per meta-step: (all-gathered losses, all-reduced gradient), as payload sizes."""
    head = runs.build_head(shard.dim, cfg)
    b_local = math.ceil(cfg.tasks_per_batch / world)  # gather_ragged pads to the largest share
    losses = world * b_local * 4
    grads = sum(p.numel() * p.element_size() for p in head.parameters())
    return losses, grads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=4096)
    ap.add_argument("--pairs-per-user", type=int, default=20)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--preset", default="default", choices=sorted(config_mod.PRESETS))
    ap.add_argument("--tasks-per-batch", type=int, default=256, help="users per global meta-batch")
    ap.add_argument("--steps", type=int, default=20, help="timed batched meta-steps")
    ap.add_argument("--loop-steps", type=int, default=3, help="timed per-user-loop meta-steps")
    ap.add_argument("--workers", type=int, default=2, help="processes in the distributed run (0: skip)")
    ap.add_argument("--memory", action="store_true",
                    help="also compare a shard held as float32 and as bfloat16 (memory and speed)")
    ap.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for mrm train")
    args = ap.parse_args()

    cfg = config_mod.load_config(args.preset, overrides=[f"tasks_per_batch={args.tasks_per_batch}",
                                                         "val_ratio=0", *args.overrides])
    with tempfile.TemporaryDirectory(prefix="mrm-bench-") as tmp:
        emb = os.path.join(tmp, "emb")
        write_embedding_population(emb, args.users, args.pairs_per_user, args.dim, seed=0)
        buckets = shard_table(emb, os.path.join(tmp, "shards"), cfg)
        shard, table_bytes = load(buckets, cfg)
        if cfg.model.n_heads == 0:  # K is chosen by the data-driven start in `mrm train`; speed needs a K
            cfg.model.n_heads = 2
        if cfg.model.auto_input_scale:  # as `mrm train` does
            rms = float(shard.diff.pow(2).sum(1).mean().sqrt())
            cfg.model.input_scale, cfg.model.auto_input_scale = 1.0 / rms, False
        n = shard.n_users
        print(f"{n} users, {shard.n_pairs} train pairs (~{shard.n_pairs / n:.0f}/user), d={args.dim}, "
              f"K={cfg.model.n_heads}, meta-batch {cfg.tasks_per_batch} users, inner {cfg.inner.optimizer} "
              f"x{cfg.inner.steps}, RPO {'on' if cfg.rpo.enabled else 'off'}; torch on 1 thread per worker")

        with meta.single_thread():
            check_same_step(shard, cfg)
            support, query, batches = meta_batches(shard, cfg, n)
            head, opt = new_head(shard.dim, cfg)
            per_user_step(head, opt, shard, batches[0][0], support, query, cfg)  # warm-up
            users, seconds = [], []
            for t in range(1, args.loop_steps + 1):
                step_users = batches[t % len(batches)][0]
                t0 = time.perf_counter()
                per_user_step(head, opt, shard, step_users, support, query, cfg)
                seconds.append(time.perf_counter() - t0)
                users.append(len(step_users))
            loop = median_rate(users, seconds)
            one = run_batched(shard, cfg, args.steps, meta.Collective(), n)
        print(f"per-user loop (reference)  : {loop:10.0f} user-tasks/s")
        print(f"batched, 1 worker          : {one:10.0f} user-tasks/s   {one / loop:6.1f}x the loop")
        if args.workers > 1:
            many, reads = run_distributed(buckets, cfg, args.steps, args.workers, n)
            for rank, read, users in reads:
                print(f"worker {rank}: read {read / 1e6:.2f} MB of the {table_bytes / 1e6:.2f} MB of train shards "
                      f"({read / table_bytes:.1%}; {users} of {n} users)")
            print(f"batched, {args.workers} workers (gloo)   : {many:10.0f} user-tasks/s   "
                  f"{many / args.workers / loop:6.1f}x the loop per worker, {many / one:.2f}x 1 worker "
                  f"(on {os.cpu_count()} CPUs)")
        if args.memory:
            memory_and_speed_by_dtype(buckets, cfg, args.steps)
        world = max(args.workers, 2)
        losses, grads = communication(shard, cfg, world)
        per_worker = 2 * (world - 1) / world * grads + (world - 1) / world * losses
        print(f"communication per meta-step: all-gather of {cfg.tasks_per_batch} query losses = {losses} B, "
              f"all-reduce of the K*d+K meta-gradient = {grads} B ({grads // 4} floats); "
              f"ring algorithms move ~{per_worker:.0f} B per worker per step with {world} workers, "
              f"independent of the users and pairs per worker")


if __name__ == "__main__":
    main()
