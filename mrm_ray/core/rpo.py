"""Robust Personalization Objective (RPO): weight the hard users of a meta-batch up.

Over the query losses L_1..L_B of one (GLOBAL) meta-batch:
    tau = quantile(L, 1 - alpha)                   alpha: share of "hard" users
    gamma > 0:  J = sum_i sigmoid((L_i - tau) / gamma) * L_i     (soft)
    gamma <= 0: J = sum_i 1[L_i > tau] * L_i                      (hard top-alpha)
As the reference: a sum, not a mean.  The reference also differentiates
through w_i and tau; by default we hold tau constant (`detach`).  With RPO off, J = mean_i L_i.

Data-parallel training needs tau over ALL workers' users.  `coefficients`
gives c_i = dJ/dL_i on the gathered losses; each worker then back-propagates
sum_{i local} c_i L_i and the all-reduced SUM of gradients equals the
gradient of J on the whole meta-batch, whatever the number of workers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RPOConfig:
    enabled: bool = True
    alpha: float = 0.5   # share of hard users; tau is the (1 - alpha) quantile of the losses
    gamma: float = 0.5   # temperature of the soft weights; <= 0 selects the hard top-alpha form
    # What the gradient flows through.  "none" is the reference: through the
    # weights AND the quantile tau, which pushes the loss of the users AT the
    # quantile up.  "tau" (ours) treats tau as a constant; "weights" treats
    # every w_i as a constant (plain reweighting).
    detach: str = "tau"


def weights(losses: torch.Tensor, cfg: RPOConfig) -> torch.Tensor:
    """The per-user weights w_i (differentiable; ones when RPO is off)."""
    if not cfg.enabled:
        return torch.ones_like(losses)
    x = losses.detach() if cfg.detach == "weights" else losses
    tau = torch.quantile(x, 1.0 - cfg.alpha)
    if cfg.detach == "tau":
        tau = tau.detach()
    if cfg.gamma > 0:
        return torch.sigmoid((x - tau) / cfg.gamma)
    return (x > tau).to(losses.dtype)


def objective(losses: torch.Tensor, cfg: RPOConfig) -> torch.Tensor:
    """The meta-objective J over one meta-batch's query losses."""
    if not cfg.enabled:
        return losses.mean()
    return (weights(losses, cfg) * losses).sum()


def coefficients(losses: torch.Tensor, cfg: RPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(J, dJ/dL) at the given (gathered, detached) losses."""
    with torch.enable_grad():
        x = losses.detach().clone().requires_grad_(True)
        j = objective(x, cfg)
        (c,) = torch.autograd.grad(j, x)
    return j.detach(), c
