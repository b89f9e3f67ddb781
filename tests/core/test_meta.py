"""Meta-training (mrm_ray.core.meta): a known-answer loss history, torchtune-style.

A fixed 40-user population (generated from a torch seed), the default config
with K=2 from a random start, three epochs on one thread: the recorded
meta-losses and validation losses must not move.  A change to the inner loop,
RPO, the meta-batching, the schedule or the validation carve shows up here as
a changed number; if the change is intended, update the numbers in the same
commit and say why.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mrm_ray.core import splits
from mrm_ray.core.config import TrainConfig
from mrm_ray.core.meta import meta_train, single_thread
from mrm_ray.core.model import MRMHead

# epoch -> (meta_loss, val_loss, val_accuracy); epoch 0 is the start (no meta_loss)
EXPECTED = {0: (None, 0.692274, 0.5625), 1: (0.691952, 0.684354, 0.6875), 2: (0.687256, 0.677153, 0.6625),
            3: (0.68523, 0.675376, 0.6625)}


def population(n_users=40, pairs=10, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_users, d, generator=g, dtype=torch.float64) + torch.tensor([1.0] + [0.0] * (d - 1), dtype=torch.float64)
    x = torch.randn(n_users * pairs, d, generator=g, dtype=torch.float64)
    u = torch.arange(n_users).repeat_interleave(pairs)
    flip = torch.sigmoid((x * w[u]).sum(1) * 2) < torch.rand(n_users * pairs, generator=g, dtype=torch.float64)
    diff = torch.where(flip[:, None], -x, x).float()
    conv = np.arange(n_users * pairs) // 2
    return splits.UserPairs(np.array([f"u{i:03d}" for i in range(n_users)], dtype=object),
                            np.arange(0, n_users * pairs + 1, pairs, dtype=np.int64), conv.astype(np.int64),
                            splits.mix64(np.arange(conv.max() + 1, dtype=np.uint64), 3), diff,
                            pair_order=np.arange(n_users * pairs, dtype=np.int64),
                            user_hash=splits.mix64(np.arange(n_users, dtype=np.uint64), 5))


def train_once():
    cfg = TrainConfig(epochs=3, tasks_per_batch=8)
    cfg.model.n_heads, cfg.model.init, cfg.model.input_scale, cfg.model.auto_input_scale = 2, "random", 1.0, False
    shard = population()
    torch.manual_seed(0)
    head = MRMHead(shard.dim, cfg.model, prior=True)
    with single_thread():
        return meta_train(cfg, head, shard, shard.n_users)


def test_meta_train_loss_history_known_answer():
    state = train_once()
    assert [h["epoch"] for h in state.history] == list(EXPECTED)
    for h in state.history:
        meta_loss, val_loss, val_acc = EXPECTED[h["epoch"]]
        if meta_loss is not None:
            assert h["meta_loss"] == pytest.approx(meta_loss, abs=2e-6), h
        assert h["val_loss"] == pytest.approx(val_loss, abs=2e-6), h
        assert h["val_accuracy"] == pytest.approx(val_acc, abs=1e-9), h
    assert state.history[-1]["meta_loss"] < state.history[1]["meta_loss"]   # and it learns


def test_meta_train_is_deterministic():
    a, b = train_once(), train_once()
    for k in a.head:
        assert torch.equal(a.head[k], b.head[k]), k
