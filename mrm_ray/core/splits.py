"""Splits: which pairs are support, query, validation; which meta-batch a user is in.

Every decision here is a pure function of (seed, hashed ids), computed with
vectorised numpy, never a per-user Python loop (the ids themselves are hashed
once, when a table is loaded: mrm_ray.data.shards).  Because a
user's fate depends only on its own id, any worker holding any shard of the
users makes the same choices: the seen/unseen split, the validation carve,
the per-epoch support/query split and the meta-batch a user falls in are the
same for 1 worker or 64.

`UserPairs` is the in-memory form of one shard: the pairs of a set of users,
one contiguous block per user, embeddings kept as chosen - rejected (the
reward is linear, so the difference is all that training and evaluation need).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


# --- hashing (ids are hashed once, by mrm_ray.data.shards; here only uint64s) ------
def mix64(h: np.ndarray, salt: int) -> np.ndarray:
    """splitmix64 of (h + salt): a cheap fresh hash per epoch from a stored one."""
    with np.errstate(over="ignore"):
        z = (h + np.uint64(salt) * np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return z ^ (z >> np.uint64(31))


def unit(h: np.ndarray) -> np.ndarray:
    """A hash as a float in [0, 1)."""
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def rank_within(group: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Rank of each element by `key` among the elements of its group (0-based)."""
    order = np.lexsort((key, group))
    g = group[order]
    first = np.r_[True, g[1:] != g[:-1]]
    start = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
    rank = np.empty(len(g), dtype=np.int64)
    rank[order] = np.arange(len(g)) - start
    return rank


def group_sizes(group: np.ndarray, n: int) -> np.ndarray:
    return np.bincount(group, minlength=n)


# --- a shard of users in memory -------------------------------------------------
@dataclass
class UserPairs:
    """The pairs of U users.  Pairs of user i are rows offsets[i]:offsets[i+1]."""

    user_ids: np.ndarray          # (U,) object: user ids
    offsets: np.ndarray           # (U+1,) int64
    conv: np.ndarray              # (N,) int64 conversation code, contiguous per user
    conv_hash: np.ndarray         # (C,) uint64 hash of (user, conv_id)
    diff: torch.Tensor            # (N, d) chosen_emb - rejected_emb, float32
    is_test: np.ndarray | None = None  # (N,) bool: the pair is in the test split
    pair_order: np.ndarray | None = None  # (N,) int64: rank of the pair_id in sorted order (file order)
    # the reference's training items and their positions in a user's list (mrm_ray.core.reference only)
    item: np.ndarray | None = None
    item_position: np.ndarray | None = None
    user_hash: np.ndarray | None = None  # (U,) uint64: the one user hash under the run's seed (shards.user_hash)

    ROW_FIELDS = ("is_test", "pair_order", "item", "item_position")   # per-row arrays, kept by select

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_pairs(self) -> int:
        return int(self.offsets[-1])

    @property
    def dim(self) -> int:
        return int(self.diff.shape[1])

    def counts(self) -> np.ndarray:
        return np.diff(self.offsets)

    def pair_user(self) -> np.ndarray:
        return np.repeat(np.arange(self.n_users), self.counts())

    def conv_user(self) -> np.ndarray:
        cu = np.zeros(len(self.conv_hash), dtype=np.int64)
        cu[self.conv] = self.pair_user()
        return cu

    def rows(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row indices, batch position) of every pair of `users`, in that order."""
        starts, lens = self.offsets[users], self.counts()[users]
        seg = np.repeat(np.arange(len(users)), lens)
        first = np.cumsum(lens) - lens
        rows = np.repeat(starts - first, lens) + np.arange(int(lens.sum()))
        return rows, seg

    def select(self, row_mask: np.ndarray, keep_empty_users: bool = True) -> "UserPairs":
        """A new shard with only the masked pairs (users keep their order)."""
        pu = self.pair_user()
        counts = np.bincount(pu[row_mask], minlength=self.n_users)
        users = np.arange(self.n_users) if keep_empty_users else np.flatnonzero(counts > 0)
        rows = np.flatnonzero(row_mask)
        conv_old = self.conv[rows]
        uniq, conv_new = np.unique(conv_old, return_inverse=True)
        per_row = {f: (None if getattr(self, f) is None else getattr(self, f)[rows]) for f in self.ROW_FIELDS}
        return UserPairs(self.user_ids[users], np.r_[0, np.cumsum(counts[users])].astype(np.int64),
                         conv_new.astype(np.int64), self.conv_hash[uniq], self.diff[torch.from_numpy(rows)], **per_row,
                         user_hash=None if self.user_hash is None else self.user_hash[users])


# --- splits ------------------------------------------------------------------------
def cap_pairs(shard: UserPairs, limit: int | None, seed: int, eligible: np.ndarray | None = None) -> np.ndarray:
    """Row mask keeping at most `limit` of each user's `eligible` pairs (whole conversations first, seeded)."""
    eligible = np.ones(shard.n_pairs, dtype=bool) if eligible is None else eligible
    if limit is None or limit <= 0:
        return eligible.copy()
    key = unit(mix64(shard.conv_hash[shard.conv], seed + 101)) + 1e-9 * np.arange(shard.n_pairs) / max(shard.n_pairs, 1)
    key = key + 2.0 * ~eligible  # ineligible rows rank after every eligible one
    return (rank_within(shard.pair_user(), key) < limit) & eligible


def adaptation_rows(shard: UserPairs, seen: np.ndarray, cfg) -> np.ndarray:
    """Row mask: the train pairs each user adapts on outside meta-training (evaluation, compare),
    capped by cfg.seen_train_limit / cfg.unseen_train_limit -- the reference's way in reference_mode."""
    train = ~shard.is_test if shard.is_test is not None else np.ones(shard.n_pairs, dtype=bool)
    seen_rows = seen[shard.pair_user()]
    if cfg.reference_mode != "none":
        from mrm_ray.core import reference
        sub = reference.attach_items(shard.select(train), cfg.reference_mode, cfg.seed)
        position = np.full(shard.n_pairs, np.iinfo(np.int64).max)
        position[train] = sub.item_position
        within = lambda limit: train if not limit else train & (position < limit)  # noqa: E731
        return np.where(seen_rows, within(cfg.seen_train_limit), within(cfg.unseen_train_limit))
    return np.where(seen_rows, cap_pairs(shard, cfg.seen_train_limit, cfg.seed, eligible=train),
                    cap_pairs(shard, cfg.unseen_train_limit, cfg.seed, eligible=train))


def validation_mask(shard: UserPairs, val_ratio: float, seed: int) -> np.ndarray:
    """Row mask of the pairs carved out for model selection (by conversation).

    A user with fewer than 2 conversations keeps them all for training.
    """
    if val_ratio <= 0:
        return np.zeros(shard.n_pairs, dtype=bool)
    conv_user = shard.conv_user()
    n_conv = group_sizes(conv_user, shard.n_users)
    rank = rank_within(conv_user, unit(mix64(shard.conv_hash, seed + 202)))
    n_val = np.floor(val_ratio * n_conv[conv_user]).astype(np.int64)
    n_val = np.minimum(n_val, n_conv[conv_user] - 1)
    return (rank < n_val)[shard.conv]


def support_query_masks(shard: UserPairs, query_ratio: float, seed: int, epoch: int,
                        exclude: np.ndarray | None = None):
    """Per-epoch split of each user's pairs into support and query, by conversation.

    ~(1 - query_ratio) of a user's conversations (at least one) go to support,
    the rest to query; a user with a single conversation uses it for both.
    Pairs in `exclude` (a row mask: the validation carve) are in neither.
    """
    conv_user = shard.conv_user()
    out = np.zeros(len(conv_user), dtype=bool)
    if exclude is not None:
        out[shard.conv[exclude]] = True
    n_conv = np.bincount(conv_user[~out], minlength=shard.n_users)[conv_user]
    key = unit(mix64(shard.conv_hash, seed * 1_000_003 + epoch)) + out  # excluded convs rank last
    rank = rank_within(conv_user, key)
    n_sup = np.clip(np.rint((1 - query_ratio) * n_conv), 1, np.maximum(n_conv - 1, 1)).astype(np.int64)
    sup_c = (rank < n_sup) & ~out
    qry_c = (~sup_c | (n_conv == 1)) & ~out
    return sup_c[shard.conv], qry_c[shard.conv]


def epoch_slots(user_hash: np.ndarray, n_slots: int, seed: int, epoch: int) -> np.ndarray:
    """The meta-batch (0..n_slots-1) each user falls in this epoch.

    A seeded hash of the user id, so the global meta-batch of a step is the
    same set of users however the users are sharded across workers.
    """
    return np.minimum((unit(mix64(user_hash, seed * 7_919 + epoch + 1)) * n_slots).astype(np.int64), n_slots - 1)
