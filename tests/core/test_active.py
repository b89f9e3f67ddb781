"""Active onboarding (mrm_ray.core.active): known answers, batched == per-user loop, no label peeking."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mrm_ray.core import active
from mrm_ray.core.adapt import InnerConfig
from mrm_ray.core.model import ModelConfig, MRMHead


def _head(w: torch.Tensor, theta0=None) -> MRMHead:
    """A head whose base rewards are exactly the rows of w (input scale 1)."""
    k, d = w.shape
    head = MRMHead(d, ModelConfig(weights="softmax", n_heads=k, input_scale=1.0))
    with torch.no_grad():
        head.layers[0].copy_(w)
        if theta0 is not None:
            head.theta0.copy_(theta0)
    return head


INNER = InnerConfig(steps=3, lr=2.0, optimizer="sgd")


# --- active onboarding --------------------------------------------------------------------
def test_segment_argmax():
    score = torch.tensor([0.1, 0.7, 0.7, -float("inf"), 2.0, -float("inf"), 0.3])
    seg = torch.tensor([0, 0, 0, 1, 2, 3, 2])
    # user 0: tie between rows 1 and 2 -> the lower row; user 1: only -inf -> none; user 4: no rows
    assert active.segment_argmax(score, seg, 5).tolist() == [1, -1, 4, -1, -1]


def test_uncertainty_known_answer_2d():
    """A = I + sum x x^T; the max of x^T A^-1 x by hand: (2,0), then (0,1.5) over (1,1), then (1,1)."""
    head = _head(torch.eye(2))
    pool = torch.tensor([[1.0, 1.0], [2.0, 0.0], [0.0, 1.5]])
    # round 1: A = I -> |x|^2 = 2, 4, 2.25 -> row 1.  round 2: A = diag(5, 1) -> 1/5 + 1 = 1.2, -, 2.25 -> row 2
    r = active.onboard(head, INNER, pool, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), 4,
                       "uncertainty", fisher=False, reg=1.0, test_diff=pool, test_seg=torch.zeros(3, dtype=torch.long))
    assert r.asked.tolist() == [[1, 2, 0, -1]]  # the pool runs out in round 4
    assert r.curve.shape == (5,) and r.per_user.shape == (1, 5)
    a_inv = active.design_inverse(pool[1:2], torch.zeros(1, dtype=torch.long), 1)
    torch.testing.assert_close(active.uncertainty(pool, torch.zeros(3, dtype=torch.long), a_inv),
                               torch.tensor([1.2, 0.8, 2.25]))


@pytest.mark.parametrize("strategy", ["uncertainty", "margin", "random"])
def test_onboard_batched_equals_per_user(strategy):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 8, generator=gen)
    head = _head(w, theta0=torch.tensor([0.2, -0.1, 0.0]))
    counts = [7, 3, 12, 5]
    seg = torch.repeat_interleave(torch.arange(4), torch.tensor(counts))
    pool = torch.randn(len(seg), 8, generator=gen)
    labels = torch.rand(len(seg), generator=gen) < 0.6
    test = torch.randn(20, 8, generator=gen)
    test_seg = torch.arange(20) % 4
    batched = active.onboard(head, INNER, pool, seg, labels, 5, strategy, test_diff=test, test_seg=test_seg)
    for u in range(4):
        rows = (seg == u).nonzero().squeeze(1)
        one = active.onboard(head, INNER, pool[rows], torch.zeros(len(rows), dtype=torch.long), labels[rows], 5,
                             strategy, test_diff=test[test_seg == u],
                             test_seg=torch.zeros(int((test_seg == u).sum()), dtype=torch.long))
        if strategy != "random":  # random draws one number per pool row: a different stream per user
            expect = [int(rows[i]) if i >= 0 else -1 for i in one.asked[0]]
            assert batched.asked[u].tolist() == expect
            np.testing.assert_allclose(batched.per_user[u], one.per_user[0], atol=1e-6)
            torch.testing.assert_close(batched.theta[u], one.theta[0], atol=1e-5, rtol=0)
    # every user asks distinct rows of its own pool, min(n_questions, pool) of them
    for u, n in enumerate(counts):
        got = [r for r in batched.asked[u].tolist() if r >= 0]
        assert len(got) == len(set(got)) == min(5, n) and all(int(seg[r]) == u for r in got)


@pytest.mark.parametrize("strategy", ["uncertainty", "margin"])
def test_selection_does_not_peek_at_labels(strategy):
    """Flipping a pair's orientation (and its answer with it) changes nothing: choices use no label."""
    gen = torch.Generator().manual_seed(1)
    head = _head(torch.randn(2, 6, generator=gen))
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor([6, 9, 4]))
    pool = torch.randn(len(seg), 6, generator=gen)
    labels = torch.ones(len(seg), dtype=torch.bool)
    flip = torch.rand(len(seg), generator=gen) < 0.5
    test = torch.randn(12, 6, generator=gen)
    kw = dict(test_diff=test, test_seg=torch.arange(12) % 3)
    a = active.onboard(head, INNER, pool, seg, labels, 4, strategy, **kw)
    b = active.onboard(head, INNER, torch.where(flip[:, None], -pool, pool), seg, labels ^ flip, 4, strategy, **kw)
    assert a.asked.tolist() == b.asked.tolist()
    np.testing.assert_allclose(a.curve, b.curve)


def test_onboarding_learns_planted_users():
    """Heads = the two true reward directions; answers from the users' true rewards; accuracy rises."""
    gen = torch.Generator().manual_seed(2)
    d, n_users = 12, 60
    q, _ = torch.linalg.qr(torch.randn(d, 2, generator=gen))
    truth = q.T                                                       # (2, d): type 0 and type 1 rewards
    kind = torch.arange(n_users) % 2
    seg = torch.arange(n_users).repeat_interleave(20)
    pool = torch.randn(len(seg), d, generator=gen)
    test_seg = torch.arange(n_users).repeat_interleave(30)
    test = torch.randn(len(test_seg), d, generator=gen)
    test = test * torch.sign((test * truth[kind[test_seg]]).sum(1, keepdim=True))  # chosen - rejected
    answers = lambda rows: (pool[rows] * truth[kind[seg[rows]]]).sum(1) > 0  # noqa: E731
    head = _head(truth * 3.0)
    r = active.onboard(head, INNER, pool, seg, answers, 4, "uncertainty", test_diff=test, test_seg=test_seg)
    assert r.curve[0] < 0.8 and r.curve[-1] > r.curve[0] + 0.1, r.curve
    with pytest.raises(ValueError, match="unknown strategy"):
        active.onboard(head, INNER, pool, seg, answers, 1, "nope")
