"""The reference code's randomness and schedule, transcribed, for its REDDIT and PRISM modes.

Used only when `reference_mode` is set (the `prism` and `reddit` presets): then
`mrm train` takes the same users, caps, support/query splits, meta-batches,
learning rates and initial weights as the public reference implementation run
with the same seed, so the two can be compared user for user.  Everything here
follows that code's own description (see README "Reproducing the paper"):

* seen/unseen users: the sorted user ids shuffled by random.Random(seed); the
  first n // 2 are seen, in that order (a user's "dataset index").
* a user's training list: REDDIT: its train pairs in file order (pair_id
  order, as `mrm prepare reddit --reference` writes them), shuffled by
  random.Random(seed + md5(user_id) % 2**32), every pair its own
  conversation; PRISM: its train conversations in the order `mrm prepare prism
  --reference` wrote them (already shuffled the same way).  Caps keep the first
  `limit` items (pairs for REDDIT, conversations for PRISM).
* support/query in epoch e (1-based) for the user of dataset index i:
  random.Random(seed + i + 1000 e) shuffles its training conversations; the
  first max(1, int(n * query_ratio)) are the query, the rest the support (one
  conversation: both).
* meta-batches: consecutive `tasks_per_batch` users of a permutation drawn
  the way torch's DataLoader(shuffle=True) draws it from the global torch RNG
  seeded with `seed`, after the model's initialisation consumed its share;
  every epoch draws twice, every evaluation epoch (every `eval_every`) four
  times more (the reference re-iterates its loaders to evaluate).
* the outer learning rate: transformers' cosine schedule with int(5 %) linear
  warm-up over n_seen * epochs // tasks_per_batch steps (the first step runs at
  lr 0, and the extra leftover batches run past the end of the cosine).

These loops are per user in Python, as the reference's are: this mode is for
reproducing paper-scale datasets, not for millions of users.
"""
from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import torch

from mrm_ray.core.model import init_layers

MODES = ("none", "reddit", "prism")


def user_seed(seed: int, user_id: str) -> int:
    """seed + md5(user_id) % 2**32: the reference's per-user Random seed."""
    return seed + int(hashlib.md5(str(user_id).encode("utf-8")).hexdigest(), 16) % 2**32


def user_split(user_ids, seed: int) -> tuple[list[str], list[str]]:
    """(seen, unseen) user ids, each in the reference's dataset order."""
    ids = sorted(str(u) for u in user_ids)
    random.Random(seed).shuffle(ids)
    half = len(ids) // 2
    return ids[:half], ids[half:]


def train_items(shard, mode: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(item (N,), position (N,)): each pair's training item (its conversation; REDDIT: itself)
    and that item's position in its user's training list."""
    n = shard.n_pairs
    order = shard.pair_order if shard.pair_order is not None else np.arange(n)
    item = np.arange(n) if mode == "reddit" else shard.conv.copy()
    position = np.zeros(n, dtype=np.int64)
    for u in range(shard.n_users):
        lo, hi = int(shard.offsets[u]), int(shard.offsets[u + 1])
        if lo == hi:
            continue
        rows = np.arange(lo, hi)
        first = {}
        for r in rows[np.argsort(order[lo:hi], kind="stable")]:   # file order
            first.setdefault(int(item[r]), len(first))
        items = list(first)
        if mode == "reddit":   # the reference shuffles a user's train pool before capping it
            random.Random(user_seed(seed, shard.user_ids[u])).shuffle(items)
        rank = {it: k for k, it in enumerate(items)}
        position[lo:hi] = [rank[int(item[r])] for r in rows]
    return item, position


def attach_items(shard, mode: str, seed: int):
    """The shard with its training items and their positions (computed on ALL of each user's train
    pairs, before any cap: the reference caps its shuffled list)."""
    shard.item, shard.item_position = train_items(shard, mode, seed)
    return shard


def cap(shard, limit: int | None, eligible: np.ndarray) -> np.ndarray:
    """Row mask: each user's first `limit` training items among `eligible` rows (all when limit is None)."""
    if limit is None or limit <= 0:
        return eligible.copy()
    return eligible & (shard.item_position < limit)


def support_query(shard, index: np.ndarray, seed: int, epoch: int,
                  query_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Row masks of epoch `epoch` (1-based); index (U,): each user's dataset index.  Needs attach_items."""
    item, position = shard.item, shard.item_position
    support = np.zeros(shard.n_pairs, dtype=bool)
    query = np.zeros(shard.n_pairs, dtype=bool)
    for u in range(shard.n_users):
        lo, hi = int(shard.offsets[u]), int(shard.offsets[u + 1])
        if lo == hi:
            continue
        by_pos = {int(position[r]): int(item[r]) for r in range(lo, hi)}
        items = [by_pos[p] for p in sorted(by_pos)]
        random.Random(seed + int(index[u]) + 1000 * epoch).shuffle(items)
        if len(items) == 1:
            q = s = set(items)
        else:
            n_query = max(1, int(len(items) * query_ratio))
            q, s = set(items[:n_query]), set(items[n_query:])
        rows_items = item[lo:hi]
        query[lo:hi] = np.isin(rows_items, list(q))
        support[lo:hi] = np.isin(rows_items, list(s))
    return support, query


def _draw(g: torch.Generator) -> int:
    return int(torch.empty((), dtype=torch.int64).random_(generator=g).item())


def epoch_orders(seed: int, layer_shapes: list[tuple[int, int]], k: int, n_seen: int, epochs: int,
                 eval_every: int) -> list[np.ndarray]:
    """The user permutation (dataset indices) of each epoch 1..epochs, replaying the global torch RNG."""
    g = torch.Generator().manual_seed(seed)
    init_layers([torch.empty(o, i) for o, i in layer_shapes], torch.empty(k), generator=g)
    orders = []
    for epoch in range(1, epochs + 1):
        _draw(g)                                          # the training loader's base seed
        sampler = torch.Generator().manual_seed(_draw(g))  # RandomSampler's own generator
        orders.append(torch.randperm(n_seen, generator=sampler).numpy())
        if epoch % eval_every == 0:
            for _ in range(4):                            # evaluation re-iterates three loaders
                _draw(g)
    return orders


def slots(order: np.ndarray, index: np.ndarray, tasks_per_batch: int) -> np.ndarray:
    """The meta-batch of each user (by dataset index) in an epoch's permutation."""
    position = np.empty(len(order), dtype=np.int64)
    position[order] = np.arange(len(order))
    return position[index] // tasks_per_batch


def schedule(total_steps: int, warmup_ratio: float):
    """transformers.get_cosine_schedule_with_warmup(num_warmup_steps=int(ratio * total), total)."""
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return float(step) / float(max(1, warmup))
        progress = float(step - warmup) / float(max(1, total_steps - warmup))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    return factor
