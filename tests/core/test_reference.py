"""`--preset reddit` reproduces the reference code step for step.

The transcription below follows the reference's training loop as its README and
code describe it, one user at a time, written independently of mrm_ray: the
users shuffled with random.Random(seed) and split n // 2; each user's training
pairs shuffled with random.Random(seed + md5(user) % 2**32) and capped; an
nn.Linear head with its default initialisation and shared_weight ~ randn(K);
a torch DataLoader(shuffle=True) per epoch (and the extra loader passes of its
evaluation epochs) deciding the order of the users; per user and epoch a
random.Random(seed + index + 1000 * epoch) support/query split; ONE differentiable
Adam step (the `higher` library's form) on the support pairs, second order; RPO
over each 2 users' query losses (a sum, nothing detached); gradient clipping at 1;
transformers' cosine schedule with 5 % warm-up.  Evaluation: one torch Adam step
on all the user's (capped) train pairs, accuracy on its test pairs.
"""
from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from mrm_ray import cli
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage

SEED, DIM, K = 42, 8, 2
EPOCHS, TASKS, LOG_FREQ = 3, 2, 2
INNER_LR = META_LR = 5e-3
SEEN_CAP, UNSEEN_CAP = 6, 3
OVERRIDES = [f"epochs={EPOCHS}", f"eval_every={LOG_FREQ}", f"seen_train_limit={SEEN_CAP}",
             f"unseen_train_limit={UNSEEN_CAP}"]


def population(n_users: int = 31, seed: int = 0):
    """Users with train and test pairs; pair_id = <user>/<position> in file order (as prepare --reference)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((n_users, DIM)) * 3
    rows = []
    for u in range(n_users):
        user = f"worker{u:03d}"
        n_train, n_test = int(rng.integers(1, 11)), int(rng.integers(1, 6))
        for k in range(n_train + n_test):
            a, b = rng.standard_normal(DIM) * 5, rng.standard_normal(DIM) * 5
            first = rng.random() < 1 / (1 + np.exp(-(a - b) @ w[u] * 0.01))
            ch, rj = (a, b) if first else (b, a)
            rows.append((user, f"{user}/{k:06d}", C.TRAIN if k < n_train else C.TEST, ch, rj))
    return rows


def as_table(rows) -> pa.Table:
    emb = lambda i: pa.FixedSizeListArray.from_arrays(  # noqa: E731
        pa.array(np.concatenate([r[i] for r in rows]).astype(np.float32)), DIM)
    return pa.table({C.USER_ID: [r[0] for r in rows], C.PAIR_ID: [r[1] for r in rows],
                     C.CONV_ID: [r[1] for r in rows], C.SPLIT: [r[2] for r in rows],
                     C.CHOSEN_EMB: emb(3), C.REJECTED_EMB: emb(4)})


# --- the transcription -------------------------------------------------------------------------
class Ref(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(DIM, K, bias=False)])
        self.shared_weight = nn.Parameter(torch.randn(K))

    def reward(self, x, theta):
        h = x * 0.01
        for layer in self.layers:
            h = layer(h)
        return (h * torch.softmax(theta, -1)).sum(-1)


def bt(m):
    return -F.logsigmoid(m).mean()


def transcription(rows):
    torch.manual_seed(SEED)
    random.seed(SEED)
    by_user: dict[str, dict] = {}
    for user, _, split, ch, rj in rows:   # file order
        by_user.setdefault(user, {"train": [], "test": []})[split].append(
            (torch.tensor(ch, dtype=torch.float32), torch.tensor(rj, dtype=torch.float32)))
    ids = sorted(by_user)
    random.Random(SEED).shuffle(ids)
    seen, unseen = ids[: len(ids) // 2], ids[len(ids) // 2:]

    def train_list(user, cap):
        items = list(by_user[user]["train"])
        random.Random(SEED + int(hashlib.md5(user.encode("utf-8")).hexdigest(), 16) % 2**32).shuffle(items)
        return items[:cap]

    data = {u: train_list(u, SEEN_CAP) for u in seen} | {u: train_list(u, UNSEEN_CAP) for u in unseen}
    model = Ref()
    opt = torch.optim.Adam(model.parameters(), lr=META_LR)
    total = len(seen) * EPOCHS // TASKS
    sched = get_cosine_schedule_with_warmup(opt, int(total * 0.05), total)
    loader = torch.utils.data.DataLoader(list(range(len(seen))), batch_size=1, shuffle=True)
    losses = []

    def step(buffer):
        q = torch.stack(buffer)
        tau = torch.quantile(q, 0.5)
        objective = (torch.sigmoid((q - tau) / 0.5) * q).sum()
        opt.zero_grad()
        objective.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()

    for epoch in range(1, EPOCHS + 1):
        buffer, epoch_loss = [], 0.0
        for batch in loader:
            index = int(batch[0])
            items = list(range(len(data[seen[index]])))
            random.Random(SEED + index + 1000 * epoch).shuffle(items)
            n_query = max(1, int(len(items) * 0.9))
            query, support = (items, items) if len(items) == 1 else (items[:n_query], items[n_query:])
            pick = lambda idx: [torch.stack([data[seen[index]][i][j] for i in idx]) for j in (0, 1)]  # noqa: E731
            (s_ch, s_rj), (q_ch, q_rj) = pick(support), pick(query)
            theta = model.shared_weight
            g, = torch.autograd.grad(bt(model.reward(s_ch, theta) - model.reward(s_rj, theta)), theta,
                                     create_graph=True)
            m, v = 0.1 * g, 0.001 * g * g                        # higher's Adam, first step
            theta = theta - INNER_LR * (0.001 ** 0.5) / 0.1 * m / (v.sqrt() + 1e-8)
            loss = bt(model.reward(q_ch, theta) - model.reward(q_rj, theta))
            epoch_loss += float(loss)
            buffer.append(loss)
            if len(buffer) == TASKS:
                step(buffer)
                buffer = []
        if buffer:
            step(buffer)
        losses.append(epoch_loss / len(seen))
        if epoch % LOG_FREQ == 0:  # the reference's evaluation passes draw from the RNG too
            for _ in loader:
                pass
            for _ in range(2):
                for _ in torch.utils.data.DataLoader(list(range(3)), batch_size=1, shuffle=False):
                    pass
    # evaluation: one torch Adam step on the (capped) train pairs, accuracy on the test pairs
    accuracy = {}
    for user in ids:
        theta = nn.Parameter(model.shared_weight.detach().clone())
        inner = torch.optim.Adam([theta], lr=INNER_LR)
        ch, rj = (torch.stack([p[j] for p in data[user]]) for j in (0, 1))
        inner.zero_grad()
        bt(model.reward(ch, theta) - model.reward(rj, theta)).backward()
        inner.step()
        with torch.no_grad():
            t_ch, t_rj = (torch.stack([p[j] for p in by_user[user]["test"]]) for j in (0, 1))
            accuracy[user] = float((model.reward(t_ch, theta) > model.reward(t_rj, theta)).float().mean())
    return model, losses, set(seen), accuracy


@pytest.fixture(scope="module")
def runs_compared(tmp_path_factory):
    root = tmp_path_factory.mktemp("reference")
    rows = population()
    storage.write_table(as_table(rows), str(root / "emb"))
    run = root / "run"
    assert cli.main(["train", "--embeddings", str(root / "emb"), "--out", str(run), "--local", "--preset", "reddit",
                     *OVERRIDES]) == 0
    assert cli.main(["evaluate", "--run", str(run), "--embeddings", str(root / "emb"), "--no-baseline"]) == 0
    return run, transcription(rows)


def test_same_users_losses_and_parameters_step_for_step(runs_compared):
    run, (model, losses, seen, _) = runs_compared
    r = runs.load_run(str(run))
    users = storage.read_table(str(run / runs.USERS))
    ours_seen = {u for u, s in zip(users.column("user_id").to_pylist(), users.column("seen").to_pylist()) if s}
    assert ours_seen == seen
    history = json.loads((run / runs.HISTORY).read_text())
    recorded = [h for h in history if "meta_loss" in h]           # every eval_every epochs, and the last
    assert [h["epoch"] for h in recorded] == [2, 3]
    assert len(seen) // TASKS * EPOCHS >= 20                       # at least 20 meta-steps compared
    np.testing.assert_allclose([h["meta_loss"] for h in recorded], [losses[h["epoch"] - 1] for h in recorded],
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(r.head.layers[0].detach(), model.layers[0].weight.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(r.head.theta0.detach(), model.shared_weight.detach(), atol=2e-6, rtol=1e-5)


def test_same_per_user_test_accuracy(runs_compared):
    run, (_, _, _, accuracy) = runs_compared
    per_user = storage.read_table(str(run / "per_user.parquet"))
    got = dict(zip(per_user.column(C.USER_ID).to_pylist(), per_user.column("accuracy").to_pylist()))
    assert got.keys() == accuracy.keys()
    for user, acc in accuracy.items():
        assert abs(got[user] - acc) < 1e-6, user  # stored as float32


def test_a_seen_user_without_train_pairs_keeps_its_place(tmp_path):
    """The reference's dataset counts every seen user (and stops on one without train pairs); here that
    user is skipped, the permutation keeps the reference's size, and training runs."""
    from mrm_ray.core import reference

    rows = population()
    seen, _ = reference.user_split(np.array(sorted({r[0] for r in rows}), dtype=object), 42)
    empty = seen[3]
    rows = [(u, p, C.TEST if u == empty else s, ch, rj) for u, p, s, ch, rj in rows]
    storage.write_table(as_table(rows), str(tmp_path / "emb"))
    run = tmp_path / "run"
    assert cli.main(["train", "--embeddings", str(tmp_path / "emb"), "--out", str(run), "--local", "--preset",
                     "reddit", *OVERRIDES]) == 0
    users = storage.read_table(str(run / runs.USERS)).to_pylist()
    skipped = [u for u in users if u["skipped"]]
    assert [u["user_id"] for u in skipped] == [empty] and skipped[0]["seen"]
    assert sum(u["seen"] for u in users) == len(seen)
