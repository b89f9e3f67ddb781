"""Active onboarding: which preference question to ask a new user next.

A new user arrives with a pool of unlabeled candidate pairs.  Each round, every
user is asked ONE pair from its remaining pool, answers it, and is re-adapted
from the meta-learned theta_0 on all its answers so far with the same `adapt`
that training and evaluation use.  Strategies:

  uncertainty  PReF's logistic-bandit criterion in base-reward space: with
               x = phi(chosen) - phi(rejected) = W (s * diff) (K floats) and the
               user's design/Fisher matrix
                   A_u = reg * I + sum_{answered j} w_j x_j x_j^T,
                   w_j = sigma'(m_j) under the current adapted weights (or 1),
               ask the pair maximising x^T A_u^{-1} x: the direction the user's
               answers have pinned down least.
  margin       the pair whose predicted margin under the current weights is
               closest to 0 (the model's coin flip).
  random       a uniformly random remaining pair (seeded).

Everything is batched over users: the pool is flat (rows of `pool_seg` say
whose candidate each is), the K x K matrices are segment sums, and the choice
is a segment argmax (scatter_reduce), never a per-user loop.  Plain torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from mrm_ray.core.adapt import InnerConfig, adapt, segment_sum
from mrm_ray.core.metrics import per_user_correct
from mrm_ray.core.model import MRMHead, mix

STRATEGIES = ("uncertainty", "margin", "random")


@dataclass
class OnboardResult:
    curve: np.ndarray        # (n_questions + 1,) mean per-user test accuracy after q answers (q = 0: theta_0)
    per_user: np.ndarray     # (n_users, n_questions + 1) test accuracy per user (nan: no test pairs)
    asked: np.ndarray        # (n_users, n_questions) pool row asked in each round, -1 once the pool is empty
    theta: torch.Tensor      # (n_users, K) weights after the last answer


def segment_argmax(score: torch.Tensor, seg: torch.Tensor, n_users: int) -> torch.Tensor:
    """Per user, the row with the largest finite score (lowest row on ties); -1 where none."""
    rows = torch.arange(len(score), device=score.device)
    best = score.new_full((n_users,), -float("inf")).scatter_reduce(0, seg, score, "amax")
    hit = (score == best.index_select(0, seg)) & torch.isfinite(score)
    pick = torch.full((n_users,), len(score), dtype=torch.long, device=score.device)
    pick = pick.scatter_reduce(0, seg[hit], rows[hit], "amin")
    return torch.where(pick == len(score), torch.full_like(pick, -1), pick)


def design_inverse(dphi: torch.Tensor, seg: torch.Tensor, n_users: int, weight: torch.Tensor | None = None,
                   reg: float = 1.0) -> torch.Tensor:
    """(n_users, K, K) inverse of A_u = reg I + sum_j weight_j x_j x_j^T over each user's answered rows."""
    k = dphi.shape[1]
    w = torch.ones(len(dphi), dtype=dphi.dtype) if weight is None else weight
    outer = w[:, None, None] * dphi.unsqueeze(2) * dphi.unsqueeze(1)
    a = segment_sum(outer, seg, n_users) + reg * torch.eye(k, dtype=dphi.dtype)
    return torch.linalg.inv(a)


def uncertainty(dphi: torch.Tensor, seg: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """x^T A_u^{-1} x for every candidate row (user u = seg of the row)."""
    return torch.einsum("nk,nkl,nl->n", dphi, a_inv.index_select(0, seg), dphi)


def _answer_fn(answers) -> Callable[[torch.Tensor], torch.Tensor]:
    if callable(answers):
        return lambda rows: torch.as_tensor(answers(rows), dtype=torch.bool)
    labels = torch.as_tensor(np.asarray(answers), dtype=torch.bool)
    return lambda rows: labels.index_select(0, rows)


@torch.no_grad()
def onboard(head: MRMHead, cfg, pool_diff: torch.Tensor, pool_seg: torch.Tensor, answers, n_questions: int,
            strategy: str = "uncertainty", *, test_diff: torch.Tensor | None = None,
            test_seg: torch.Tensor | None = None, n_users: int | None = None, reg: float = 1.0,
            fisher: bool = True, steps: int | None = None, seed: int = 0) -> OnboardResult:
    """Ask every user `n_questions` questions from its pool, one per round; re-adapt after each answer.

    head, cfg: a trained MRM head and its TrainConfig (or a bare InnerConfig);
      users adapt from head.theta0 with cfg.inner (eval_inner_steps steps, or `steps`).
    pool_diff (N, d), pool_seg (N,): candidate pairs as embedding differences
      first - second, and the user (0..n_users-1) each belongs to.
    answers: (N,) bools (True: the user prefers the first response of the pair),
      or a function rows (LongTensor) -> bools, called once per round with the
      rows asked (at most one per user).
    test_diff (M, d), test_seg (M,): held-out pairs oriented chosen - rejected;
      the curve is the mean over users with test pairs of their accuracy.
    reg, fisher: A_u's ridge, and whether answered rows are weighted by
      sigma'(margin) (the Fisher information) or by 1 (the design matrix).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    inner = cfg if isinstance(cfg, InnerConfig) else cfg.inner
    n_steps = steps if steps is not None else (cfg.eval_steps if hasattr(cfg, "eval_steps") else inner.steps)
    inner = inner.for_evaluation(n_steps)
    pool_seg = torch.as_tensor(pool_seg, dtype=torch.long)
    n_users = int(pool_seg.max()) + 1 if n_users is None else n_users
    ask = _answer_fn(answers)
    w = head.weight().detach()
    theta0 = head.theta0.detach()
    args = {k: (v.detach() if isinstance(v, torch.Tensor) else v) for k, v in head.inner_args().items()}
    weights = args["weights"]
    dphi = pool_diff.to(w.dtype) @ w.T                                     # (N, K)
    has_test = test_diff is not None and len(test_diff) > 0
    if has_test:
        test_seg = torch.as_tensor(test_seg, dtype=torch.long)
        dphi_test = test_diff.to(w.dtype) @ w.T
        n_test = torch.bincount(test_seg, minlength=n_users)
    gen = torch.Generator().manual_seed(seed)

    asked = torch.zeros(len(dphi), dtype=torch.bool)
    sign = torch.zeros(len(dphi), dtype=dphi.dtype)                        # +1 / -1 once answered
    theta = theta0.expand(n_users, -1).clone()
    picks, accs = [], []

    def accuracy(th):
        if not has_test:
            return np.full(n_users, np.nan)
        c, n = per_user_correct(mix(th.index_select(0, test_seg), dphi_test, weights), test_seg, n_users)
        return np.where(n_test.numpy() > 0, (c / n.clamp(min=1)).numpy(), np.nan)

    accs.append(accuracy(theta))
    for _ in range(n_questions):
        margin = mix(theta.index_select(0, pool_seg), dphi, weights)
        if strategy == "uncertainty":
            weight = None
            if fisher:
                p = torch.sigmoid(margin[asked])
                weight = p * (1 - p)                                      # sigma'(m): symmetric in the answer
            a_inv = design_inverse(dphi[asked], pool_seg[asked], n_users, weight, reg)
            score = uncertainty(dphi, pool_seg, a_inv)
        elif strategy == "margin":
            score = -margin.abs()
        else:
            score = torch.rand(len(dphi), generator=gen, dtype=dphi.dtype)
        score = score.masked_fill(asked, -float("inf"))
        pick = segment_argmax(score, pool_seg, n_users)
        rows = pick[pick >= 0]
        if len(rows):
            sign[rows] = torch.where(ask(rows), 1.0, -1.0).to(sign.dtype)
            asked[rows] = True
        picks.append(pick)
        sup = asked.nonzero().squeeze(1)
        theta = adapt(theta0, dphi[sup] * sign[sup].unsqueeze(1), pool_seg[sup], n_users, inner, **args)
        accs.append(accuracy(theta))
    per_user = np.stack(accs, axis=1)
    valid = ~np.isnan(per_user[:, 0])
    curve = per_user[valid].mean(0) if valid.any() else np.full(n_questions + 1, np.nan)
    asked_rows = torch.stack(picks, 1).numpy() if picks else np.zeros((n_users, 0), dtype=np.int64)
    return OnboardResult(curve, per_user, asked_rows, theta)
