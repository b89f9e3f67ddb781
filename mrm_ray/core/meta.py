"""Meta-training (MAML + RPO) and evaluation over an in-memory shard of users.

Plain torch: no Ray, no storage.  `meta_train` is the function every Ray Train
worker calls on its own shard; with torch.distributed initialised it all-gathers
the meta-batch's query losses (RPO's quantile is over the GLOBAL meta-batch)
and all-reduces the meta-gradients, so N workers compute exactly what one
worker computes on the same global meta-batches.  Without it, it is the
single-process trainer.

`adapt_and_score` is evaluation: adapt each user from theta_0 on one set of its
pairs, count correct pairs on another; the same `adapt` as training.
"""
from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from mrm_ray.core import reference, rpo, splits

from mrm_ray.core.adapt import adapt, segment_sum, task_losses
from mrm_ray.core.config import TrainConfig
from mrm_ray.core.metrics import per_user_correct
from mrm_ray.core.model import MRMHead, bt_loss, mix

log = logging.getLogger(__name__)


@contextmanager
def single_thread():
    """Run torch on one intra-op thread inside the block.

    Meta-training is thousands of small ops (softmax over (rows, K), segment
    sums) that torch splits across threads; on a busy 2-core machine each
    split op waits for a descheduled thread (measured: 38 ms vs 0.02 ms per
    softmax on (300, 2)).  Data parallelism comes from Ray workers instead.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Collective:
    """Sums and gathers across data-parallel workers; identity in one process."""

    def __init__(self):
        self.on = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if self.on else 1
        self.rank = dist.get_rank() if self.on else 0
        # NCCL moves CUDA tensors only: CPU bookkeeping tensors take a trip through the GPU.
        self.device = torch.device("cuda", torch.cuda.current_device()) if (
            self.on and dist.get_backend() == "nccl") else None

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.on:
            x = t if self.device is None else t.to(self.device)
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
            if x is not t:
                t.copy_(x)
        return t

    def all_gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """(world, *t.shape): every worker's equally-shaped tensor."""
        if not self.on:
            return t.unsqueeze(0)
        x = t.contiguous() if self.device is None else t.to(self.device).contiguous()
        out = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(out, x)
        return torch.stack(out).to(t.device)

    def gather_ragged(self, t: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """Concatenate each worker's 1-d tensor (worker r has sizes[r] entries)."""
        if not self.on:
            return t
        padded = t.new_zeros(max(sizes))
        padded[: len(t)] = t
        rows = self.all_gather_rows(padded)
        return torch.cat([rows[r, :n] for r, n in enumerate(sizes)])


@dataclass
class TrainState:
    """Everything needed to resume: plain tensors and numbers (weights_only-loadable)."""
    epoch: int = 0                      # epochs completed
    head: dict = field(default_factory=dict)
    optimizer: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    best_head: dict = field(default_factory=dict)
    best_val_accuracy: float = -1.0
    best_val_loss: float = float("inf")
    best_epoch: int = -1
    history: list = field(default_factory=list)


def warmup_cosine(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    warmup = max(1, int(round(warmup_ratio * total_steps)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def meta_batch_losses(head: MRMHead, shard: splits.UserPairs, users: np.ndarray, support: np.ndarray,
                      query: np.ndarray, cfg: TrainConfig) -> torch.Tensor:
    """Query loss (B,) of each user in `users` after adapting on its support pairs."""
    rows, seg = shard.rows(users)
    s, q = support[rows], query[rows]
    dev = shard.diff.device
    # One (rows, d) x (d, K) product per step: the only time the embeddings are read.  The inner
    # loop then works on K floats per pair, in float64: Newton's solves would amplify float32
    # rounding, and 1 worker and N workers must take the same steps.
    w = head.weight()
    dphi = (shard.diff[torch.from_numpy(rows).to(dev)].to(w.dtype) @ w.T).double()  # bf16 shards: float32 math
    seg_t = torch.from_numpy(seg).to(dev)
    s_t, q_t = torch.from_numpy(s).to(dev), torch.from_numpy(q).to(dev)
    args = {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in head.inner_args().items()}
    theta = adapt(head.theta0.double(), dphi[s_t], seg_t[s_t], len(users), cfg.inner, **args)
    return task_losses(theta, dphi[q_t], seg_t[q_t], weights=head.cfg.weights).to(head.theta0.dtype)


@torch.no_grad()
@single_thread()
def adapt_and_score(head: MRMHead, shard: splits.UserPairs, support: np.ndarray, query: np.ndarray,
                    cfg: TrainConfig, steps: int | None = None, users_per_chunk: int = 65536):
    """Adapt every user on its `support` rows, score its `query` rows.

    Returns (theta (U, K), correct (U,), total (U,), loss (U,): the summed BT
    loss of the query rows).  Users are processed in chunks so memory stays
    bounded by the chunk, not the population.
    """
    inner = cfg.inner.for_evaluation(steps)
    w = head.weight()
    args = {k: (v.detach().double() if isinstance(v, torch.Tensor) else v) for k, v in head.inner_args().items()}
    thetas, correct, total, losses = [], [], [], []
    for lo in range(0, shard.n_users, users_per_chunk):
        users = np.arange(lo, min(lo + users_per_chunk, shard.n_users))
        rows, seg = shard.rows(users)
        dev = shard.diff.device
        dphi = (shard.diff[torch.from_numpy(rows).to(dev)].to(w.dtype) @ w.T).double()
        seg_t = torch.from_numpy(seg).to(dev)
        s_t, q_t = torch.from_numpy(support[rows]).to(dev), torch.from_numpy(query[rows]).to(dev)
        theta = adapt(head.theta0.detach().double(), dphi[s_t], seg_t[s_t], len(users), inner, **args)
        margin = mix(theta.index_select(0, seg_t[q_t]), dphi[q_t], args["weights"])
        c, n = per_user_correct(margin, seg_t[q_t], len(users))
        thetas.append(theta.detach().to(head.theta0.dtype))
        correct.append(c)
        total.append(n)
        losses.append(segment_sum(bt_loss(margin).to(torch.float64), seg_t[q_t], len(users)))
    if not thetas:
        k = head.theta0.shape[0]
        empty = torch.zeros(0, dtype=torch.float64)
        return torch.zeros(0, k), empty, empty, empty
    return torch.cat(thetas), torch.cat(correct), torch.cat(total), torch.cat(losses)


def meta_step(head: MRMHead, opt: torch.optim.Optimizer, shard: splits.UserPairs, users: np.ndarray,
              sizes: list[int], support: np.ndarray, query: np.ndarray, cfg: TrainConfig,
              comm: Collective) -> tuple[torch.Tensor, torch.Tensor]:
    """One meta-step on this worker's `users` of a global meta-batch of sum(sizes) users.

    sizes[r] is worker r's share.  Returns (objective J, the global query losses).
    """
    params = list(head.parameters())
    for p in params:  # a worker with no users in this meta-batch still joins the all-reduce, with zeros
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    losses = meta_batch_losses(head, shard, users, support, query, cfg) if len(users) else torch.zeros(0)
    global_losses = comm.gather_ragged(losses.detach(), sizes)
    j, coef = rpo.coefficients(global_losses, cfg.rpo)
    lo = sum(sizes[: comm.rank])
    opt.zero_grad(set_to_none=False)
    if len(users):
        (coef[lo:lo + len(users)] * losses).sum().backward()
    if comm.on:  # one all-reduce for all meta-gradients: latency, not bytes, bounds a step
        flat = comm.all_sum(torch.cat([p.grad.reshape(-1) for p in params]))
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad.copy_(g.view_as(p))
    if cfg.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return j, global_losses


def validate(head: MRMHead, shard: splits.UserPairs, val: np.ndarray, cfg: TrainConfig,
             comm: Collective) -> tuple[float, float]:
    """(accuracy, loss) on the validation carve: means over users (all workers') of per-user figures."""
    if not val.any() and comm.world == 1:
        return float("nan"), float("nan")
    _, c, n, loss = adapt_and_score(head, shard, ~val, val, cfg, steps=cfg.eval_steps)
    has = n > 0
    sums = torch.stack([(c[has] / n[has]).sum(), (loss[has] / n[has]).sum(), has.sum().to(torch.float64)])
    sums = comm.all_sum(sums)
    if sums[2] == 0:
        return float("nan"), float("nan")
    return float(sums[0] / sums[2]), float(sums[1] / sums[2])


def _better(metrics: dict, state: "TrainState", cfg: TrainConfig) -> bool:
    """Is this validation pass the best so far?  (higher accuracy, or lower loss, on the carve)"""
    if state.best_epoch < 0:
        return True
    if cfg.select_metric == "last":
        return True
    if cfg.select_metric == "loss":
        return not math.isnan(metrics["val_loss"]) and metrics["val_loss"] < state.best_val_loss
    return not math.isnan(metrics["val_accuracy"]) and metrics["val_accuracy"] > state.best_val_accuracy


@single_thread()
def meta_train(cfg: TrainConfig, head: MRMHead, shard: splits.UserPairs, n_global_users: int,
               state: TrainState | None = None,
               on_epoch_end: Callable[[TrainState, dict], None] | None = None,
               reference_index: np.ndarray | None = None) -> TrainState:
    """Meta-train `head` on the seen users of this worker's shard.

    shard: this worker's seen users, their TRAIN pairs only (caps applied).
    n_global_users: seen users over all workers (fixes the number of steps per epoch).
    state: resume from it (epoch, optimizer, scheduler, best model, history).
    on_epoch_end(state, metrics): called after every validation pass (checkpointing).
    reference_index: with cfg.reference_mode, each shard user's dataset index (mrm_ray.core.reference).
    """
    comm = Collective()
    state = state or TrainState()
    opt = torch.optim.Adam(head.parameters(), lr=cfg.meta_lr)
    n_slots = max(1, math.ceil(n_global_users / cfg.tasks_per_batch))
    faithful = cfg.reference_mode != "none"
    if faithful:
        factor = reference.schedule(n_global_users * cfg.epochs // cfg.tasks_per_batch, cfg.warmup_ratio)
        orders = reference.epoch_orders(cfg.seed, [tuple(w.shape) for w in head.layers], head.theta0.shape[0],
                                        n_global_users, cfg.epochs, cfg.eval_every)
    else:
        factor = warmup_cosine(cfg.epochs * n_slots, cfg.warmup_ratio)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    if state.head:
        head.load_state_dict(state.head)
        opt.load_state_dict(state.optimizer)
        sched.load_state_dict(state.scheduler)
    if shard.user_hash is None:
        raise ValueError("meta_train needs the shard's user hashes (load it with mrm_ray.data.shards)")
    user_hash = shard.user_hash
    val = splits.validation_mask(shard, cfg.val_ratio, cfg.seed)

    def record(metrics: dict) -> None:
        """Validate, keep the best head so far, log, checkpoint."""
        acc, loss = validate(head, shard, val, cfg, comm)
        metrics = {"epoch": state.epoch, **metrics, "val_accuracy": acc, "val_loss": loss,
                   "lr": sched.get_last_lr()[0]}
        state.history.append(metrics)
        state.head = {k: v.detach().clone() for k, v in head.state_dict().items()}
        state.optimizer, state.scheduler = opt.state_dict(), sched.state_dict()
        if _better(metrics, state, cfg):
            state.best_val_accuracy = -1.0 if math.isnan(acc) else acc
            state.best_val_loss = float("inf") if math.isnan(loss) else loss
            state.best_epoch, state.best_head = state.epoch, state.head
        if comm.rank == 0:
            log.info("epoch %d/%d  meta_loss %.4f  val_acc %.4f  val_loss %.4f", state.epoch, cfg.epochs,
                     metrics.get("meta_loss", float("nan")), acc, loss)
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)

    if state.epoch == 0 and state.best_epoch < 0:
        record({})  # epoch 0: the start itself is a candidate (a data-driven start may already be best)
    for epoch in range(state.epoch, cfg.epochs):
        t0 = time.time()
        if faithful:  # the reference's epochs count from 1
            support, query = reference.support_query(shard, reference_index, cfg.seed, epoch + 1, cfg.query_ratio)
            slot = reference.slots(orders[epoch], reference_index, cfg.tasks_per_batch)
        else:
            support, query = splits.support_query_masks(shard, cfg.query_ratio, cfg.seed, epoch, exclude=val)
            slot = splits.epoch_slots(user_hash, n_slots, cfg.seed, epoch)
        order = np.argsort(slot, kind="stable")
        bounds = np.searchsorted(slot[order], np.arange(n_slots + 1))
        local_sizes = torch.from_numpy(np.diff(bounds)).to(torch.float64)
        all_sizes = comm.all_gather_rows(local_sizes).long()  # (world, n_slots)
        objective_sum, loss_sum, users_seen, w_spread = 0.0, 0.0, 0, []
        for t in range(n_slots):
            sizes = all_sizes[:, t].tolist()
            if sum(sizes) == 0:
                continue
            users = order[bounds[t]:bounds[t + 1]]
            j, global_losses = meta_step(head, opt, shard, users, sizes, support, query, cfg, comm)
            sched.step()
            objective_sum += float(j)
            loss_sum += float(global_losses.sum())
            users_seen += len(global_losses)
            if cfg.rpo.enabled and len(global_losses) > 1:
                w_spread.append(float(rpo.weights(global_losses, cfg.rpo).std()))
        state.epoch = epoch + 1
        if state.epoch % cfg.eval_every == 0 or state.epoch == cfg.epochs:
            seconds = time.time() - t0
            record({"meta_loss": loss_sum / max(users_seen, 1), "objective": objective_sum / n_slots,
                    "rpo_weight_std": float(np.mean(w_spread)) if w_spread else 0.0, "seconds": seconds,
                    "users_per_second": users_seen / max(seconds, 1e-9)})
    return state
