"""Batched adaptation == a plain per-user loop (autograd, one user at a time).

The reference loop below is written the way the reference code adapts a user:
clone the start, a fresh optimizer (torch.optim.Adam / SGD) per user, forward
chosen and rejected separately through the base heads, step.  For second
order, where torch.optim cannot be differentiated, the loop spells the
update out per user.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrm_ray.config import TrainConfig
from mrm_ray.core import splits
from mrm_ray.core.adapt import InnerConfig, adapt, task_losses
from mrm_ray.core.meta import meta_batch_losses
from mrm_ray.core.model import ModelConfig, MRMHead
from mrm_ray.data import shards


@pytest.fixture(autouse=True)
def _float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def ragged_users(n_users=7, d=12, seed=0, max_pairs=9):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, max_pairs + 1, (n_users,), generator=g)
    counts[0] = 0 if n_users > 3 else counts[0]  # one user without support pairs
    users = []
    for c in counts.tolist():
        users.append((torch.randn(c, d, generator=g), torch.randn(c, d, generator=g)))
    return users


def flat(users, head):
    ch = torch.cat([u[0] for u in users])
    rj = torch.cat([u[1] for u in users])
    seg = torch.cat([torch.full((len(u[0]),), i, dtype=torch.long) for i, u in enumerate(users)])
    return (ch - rj) @ head.weight().T, seg


def reference_adapt_one(head, ch, rj, cfg: InnerConfig, second_order: bool):
    """One user, the reference's way."""
    theta = head.theta0.clone()
    if cfg.first_order or not second_order:
        theta = theta.detach().requires_grad_(True)
        opt = (torch.optim.Adam([theta], lr=cfg.lr, betas=cfg.betas, eps=cfg.eps) if cfg.optimizer == "adam"
               else torch.optim.SGD([theta], lr=cfg.lr))
        for _ in range(cfg.steps):
            opt.zero_grad()
            if len(ch):
                r = F.softmax(theta, -1) @ head.weight().detach()
                loss = -F.logsigmoid(ch @ r - rj @ r).mean()
                loss.backward()
            else:
                theta.grad = torch.zeros_like(theta)
            opt.step()
        adapted = theta.detach()
        # first-order MAML: adapted = theta0 + constant (gradient flows straight to theta0)
        return head.theta0 + (adapted - head.theta0.detach())
    m = v = None
    for t in range(1, cfg.steps + 1):
        if len(ch):
            phi_c, phi_r = ch @ head.weight().T, rj @ head.weight().T
            loss = -F.logsigmoid((F.softmax(theta, -1) * (phi_c - phi_r)).sum(-1)).mean()
            (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        else:
            g = torch.zeros_like(theta)
        if cfg.optimizer == "sgd":
            u = g
        else:
            b1, b2 = cfg.betas
            m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
            v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
            u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t) + 1e-30).sqrt() + cfg.eps)
        theta = theta - cfg.lr * u
    return theta


CASES = [InnerConfig(steps=1, lr=0.7, optimizer="sgd"), InnerConfig(steps=3, lr=0.3, optimizer="sgd"),
         InnerConfig(steps=1, lr=0.05, optimizer="adam"), InnerConfig(steps=3, lr=0.05, optimizer="adam"),
         InnerConfig(steps=2, lr=0.5, optimizer="sgd", first_order=True),
         InnerConfig(steps=2, lr=0.05, optimizer="adam", first_order=True)]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.optimizer}-{c.steps}-{'fo' if c.first_order else 'so'}")
def test_adapted_weights_match_per_user_loop(cfg):
    head = MRMHead(12, ModelConfig(weights="softmax", n_heads=3, init_std=1.0, input_scale=0.3))
    with torch.no_grad():
        head.theta0.copy_(torch.tensor([0.2, -0.1, 0.4]))
    users = ragged_users()
    dphi, seg = flat(users, head)
    with torch.no_grad():
        batched = adapt(head.theta0, dphi, seg, len(users), cfg)
    ref = torch.stack([reference_adapt_one(head, ch, rj, cfg, second_order=False).detach() for ch, rj in users])
    torch.testing.assert_close(batched, ref, atol=1e-5, rtol=1e-5)
    assert torch.equal(batched[0], head.theta0.detach())  # no support pairs: stays at the prior


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.optimizer}-{c.steps}-{'fo' if c.first_order else 'so'}")
def test_query_losses_and_meta_gradients_match_per_user_loop(cfg):
    head = MRMHead(12, ModelConfig(weights="softmax", n_heads=2, hidden_sizes=[5], init_std=0.7, input_scale=0.5))
    sup, qry = ragged_users(seed=1), ragged_users(seed=2)
    qry[0] = (torch.randn(3, 12), torch.randn(3, 12))  # user 0: no support, some query pairs
    coef = torch.linspace(0.5, 1.5, len(sup))          # an arbitrary meta-objective weighting

    dphi_s, seg_s = flat(sup, head)
    dphi_q, seg_q = flat(qry, head)
    theta = adapt(head.theta0, dphi_s, seg_s, len(sup), cfg)
    losses = task_losses(theta, dphi_q, seg_q)
    grads = torch.autograd.grad((coef * losses).sum(), list(head.parameters()))

    ref_losses = []
    for (sc, sr), (qc, qr) in zip(sup, qry):
        th = reference_adapt_one(head, sc, sr, cfg, second_order=True)
        r_c, r_r = qc @ head.weight().T, qr @ head.weight().T
        ref_losses.append(-F.logsigmoid((F.softmax(th, -1) * (r_c - r_r)).sum(-1)).mean())
    ref_losses = torch.stack(ref_losses)
    ref_grads = torch.autograd.grad((coef * ref_losses).sum(), list(head.parameters()))
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_random_ragged_tasks_many_seeds():
    """Random sizes, random K, both orders: batched == loop for adapted weights."""
    for seed in range(5):
        rng = np.random.default_rng(seed)
        k = int(rng.integers(1, 5))
        cfg = InnerConfig(steps=int(rng.integers(1, 4)), lr=float(rng.uniform(0.01, 1.0)),
                          optimizer=str(rng.choice(["sgd", "adam"])))
        head = MRMHead(8, ModelConfig(weights="softmax", n_heads=k, init_std=1.0, input_scale=0.5))
        users = ragged_users(n_users=int(rng.integers(2, 12)), d=8, seed=seed)
        dphi, seg = flat(users, head)
        with torch.no_grad():
            batched = adapt(head.theta0, dphi, seg, len(users), cfg)
        ref = torch.stack([reference_adapt_one(head, c, r, cfg, False).detach() for c, r in users])
        torch.testing.assert_close(batched, ref, atol=1e-5, rtol=1e-5)


def test_meta_batch_losses_uses_shard_rows_like_flat_layout():
    """meta.meta_batch_losses (gather from a UserPairs shard) == flat adapt on the same rows."""
    head = MRMHead(6, ModelConfig(weights="softmax", n_heads=2, init_std=1.0, input_scale=0.5))
    users = ragged_users(n_users=5, d=6, seed=3)
    users = [u for u in users if len(u[0]) >= 2]
    diff = torch.cat([c - r for c, r in users])
    counts = np.array([len(c) for c, _ in users])
    n = int(counts.sum())
    shard = splits.UserPairs(np.array([f"u{i}" for i in range(len(users))], dtype=object),
                            np.r_[0, np.cumsum(counts)].astype(np.int64), np.arange(n),
                            shards.hash_ids([str(i) for i in range(n)], 0), diff)
    support = np.zeros(n, dtype=bool)
    support[np.r_[0, np.cumsum(counts)][:-1]] = True  # first pair of each user
    query = ~support
    cfg = TrainConfig()
    cfg.inner = InnerConfig(steps=2, lr=0.4, optimizer="sgd")
    got = meta_batch_losses(head, shard, np.array([2, 0]), support, query, cfg)
    for pos, u in enumerate([2, 0]):
        ch, rj = users[u]
        th = reference_adapt_one(head, ch[:1], rj[:1], cfg.inner, second_order=True)
        want = -F.logsigmoid((F.softmax(th, -1) * ((ch[1:] - rj[1:]) @ head.weight().T)).sum(-1)).mean()
        torch.testing.assert_close(got[pos], want, atol=1e-6, rtol=1e-6)


def test_meta_sgd_learned_lr_gets_gradient():
    head = MRMHead(6, ModelConfig(weights="softmax", n_heads=2, init_std=1.0, input_scale=0.5), learn_inner_lr=True, inner_lr=0.5)
    users = ragged_users(n_users=4, d=6, seed=4)
    dphi, seg = flat(users, head)
    theta = adapt(head.theta0, dphi, seg, len(users), InnerConfig(steps=1, learn_lr=True, optimizer="sgd"),
                  lr=head.log_inner_lr.exp())
    task_losses(theta, dphi, seg).sum().backward()
    assert head.log_inner_lr.grad is not None and head.log_inner_lr.grad.abs().sum() > 0


def test_user_vector_is_the_whole_reward():
    """r_u(e) = softmax(theta) . W(s e) = v_u . e  (the closed form export relies on)."""
    head = MRMHead(10, ModelConfig(weights="softmax", n_heads=3, hidden_sizes=[4], init_std=1.0))
    theta, e = torch.randn(5, 3), torch.randn(5, 10)
    mixed = (F.softmax(theta, -1) * head.base_rewards(e)).sum(-1)
    torch.testing.assert_close((head.user_vector(theta) * e).sum(-1), mixed)
