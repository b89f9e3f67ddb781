"""Baselines over the same embeddings, in plain torch.

shared_bt: one Bradley-Terry reward for everyone (no personalization), i.e. a
logistic regression without bias on chosen - rejected, fit by L-BFGS.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def fit_shared_bt(diff: torch.Tensor, l2: float = 1e-4, max_iter: int = 200) -> torch.Tensor:
    """The reward vector v (d,) maximising sum log sigmoid(v . (chosen - rejected)) - l2 |v|^2."""
    # Rescale so the problem is well conditioned whatever the embedding norm.
    scale = diff.norm(dim=1).pow(2).mean().sqrt().clamp(min=1e-12)
    x = diff / scale
    v = torch.zeros(diff.shape[1], dtype=torch.float64, requires_grad=True)
    x = x.to(torch.float64)
    opt = torch.optim.LBFGS([v], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(x @ v)).mean() + l2 * v.pow(2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return (v.detach() / scale).to(torch.float32)
