"""Baselines: batched new-user fits equal per-user reference loops; LoRe and PReF recover planted structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mrm_ray import synth
from mrm_ray.core import baselines as B
from mrm_ray.core import splits
from mrm_ray.data import contract as C
from mrm_ray.data import shards


def _ragged(counts, k, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    seg = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    dphi = torch.randn(int(sum(counts)), k, generator=gen, dtype=dtype) * 1.5
    return dphi, seg


@pytest.mark.parametrize("weights", ["softmax", "free"])
def test_fit_users_adam_equals_per_user_loop(weights):
    counts = [5, 1, 12, 0, 3]                      # ragged, one user without pairs
    dphi, seg = _ragged(counts, k=3)
    got = B.fit_users_adam(dphi, seg, len(counts), steps=100, lr=0.1, l2=1e-2, weights=weights)
    for u, n in enumerate(counts):
        x = dphi[seg == u]
        theta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=0.1)
        for _ in range(100):
            opt.zero_grad()
            w = F.softmax(theta, -1) if weights == "softmax" else theta
            loss = F.softplus(-(x @ w)).sum() + 1e-2 * theta.pow(2).sum()
            loss.backward()
            opt.step()
        torch.testing.assert_close(got[u], theta.detach(), atol=1e-5, rtol=0)
    assert torch.equal(got[3], torch.zeros(3, dtype=torch.float64))  # no pairs: stays at the start


def test_fit_users_newton_equals_per_user_lbfgs():
    counts = [4, 1, 9, 0, 2, 30]
    k = 3
    dphi, seg = _ragged(counts, k, seed=1)
    mu = torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64)
    a = torch.randn(k, k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    prec = a @ a.T / k + 0.3 * torch.eye(k, dtype=torch.float64)
    got = B.fit_users_newton(dphi, seg, len(counts), mu, prec)
    for u in range(len(counts)):
        x = dphi[seg == u]
        lam = mu.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([lam], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            r = lam - mu
            loss = F.softplus(-(x @ lam)).sum() + 0.5 * r @ prec @ r
            loss.backward()
            return loss
        opt.step(closure)
        torch.testing.assert_close(got[u], lam.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got[3], mu)  # no pairs: the prior mean


@pytest.fixture(scope="module")
def planted():
    """A small synthetic population: 3 user types over 4 planted directions in 16 dims."""
    rng = np.random.default_rng(0)
    dirs = synth._directions(16, rng)
    ids = np.array([f"u{i:04d}" for i in range(600)], dtype=object)
    table, _ = synth.generate_chunk(ids, dirs, rng, pairs_per_user=24)
    shard = shards.user_pairs_from_table(C.normalize_embeddings(table))
    seen = shards.seen_mask(shard.user_ids, 0, 0.5)
    pu = shard.pair_user()
    train_seen = shard.select(seen[pu] & ~shard.is_test, keep_empty_users=False)
    val = torch.from_numpy(splits.validation_mask(train_seen, 0.2, 0))
    return dirs, shard, seen, train_seen, val


def _unseen_accuracy(shard, seen, margin_fn):
    pu = shard.pair_user()
    seg, te = torch.from_numpy(pu), torch.from_numpy(shard.is_test)
    margin = margin_fn(seg, te)
    c = B.segment_sum((margin > 0).double(), seg[te], shard.n_users)
    n = B.segment_count(seg[te], shard.n_users, torch.float64)
    keep = (~seen) & (n.numpy() > 0)
    return float((c / n.clamp(min=1)).numpy()[keep].mean())


@pytest.mark.parametrize("fit", [B.fit_lore, B.fit_pref], ids=["lore", "pref"])
def test_lowrank_baselines_recover_planted_structure(planted, fit):
    dirs, shard, seen, train_seen, val = planted
    model = fit(train_seen.diff, torch.from_numpy(train_seen.pair_user()), train_seen.n_users, val)
    # the basis lies in the span of the planted directions (a random one would put 4/16 of its energy there)
    q, _ = np.linalg.qr(dirs.T)
    b = model.basis.double().numpy()
    energy = np.linalg.norm(b @ q, axis=1) ** 2 / np.linalg.norm(b, axis=1) ** 2
    assert energy.min() > 0.8, energy

    tr = torch.from_numpy(~shard.is_test)

    def personal(seg, te):
        theta = model.fit_users(shard.diff[tr], seg[tr], shard.n_users)
        return model.margins(theta, shard.diff[te], seg[te])
    v = B.fit_shared_bt(train_seen.diff)
    acc_bt = _unseen_accuracy(shard, seen, lambda seg, te: shard.diff[te] @ v)
    acc = _unseen_accuracy(shard, seen, personal)
    assert acc > acc_bt + 0.03, (acc, acc_bt)


def test_pref_deterministic_and_prior_for_users_without_pairs(planted):
    _, _, _, train_seen, val = planted
    seg = torch.from_numpy(train_seen.pair_user())
    m1 = B.fit_pref(train_seen.diff, seg, train_seen.n_users, val, B.PReFConfig(iters=3))
    m2 = B.fit_pref(train_seen.diff.clone(), seg, train_seen.n_users, val, B.PReFConfig(iters=3))
    torch.testing.assert_close(m1.basis, m2.basis)
    assert m1.fit == "newton" and m1.weights == "free" and m1.l2 in B.PReFConfig().prior_grid
    # a user with no pairs gets the population prior mean; one with pairs moves away from it
    diff = train_seen.diff[:5]
    theta = m1.fit_users(diff, torch.zeros(5, dtype=torch.long), 2)
    torch.testing.assert_close(theta[1], m1.prior_mean.to(theta.dtype))
    assert not torch.allclose(theta[0], theta[1])
