"""Batched user adaptation: many users at once, ragged numbers of pairs.

ONE function, `adapt`, serves meta-training, evaluation and scoring.

Layout: a batch of B users is flat.  Row i of `dphi` (N, K) holds the base-
reward difference phi(chosen) - phi(rejected) of one pair and `seg[i]` in
[0, B) says whose pair it is.  No padding, so a user with 500 pairs next to
one with 3 costs nothing extra; per-user sums are `index_add_` (segment ops).

W is fixed in the inner loop (only theta adapts), so the base rewards of the
support pairs are computed once per batch by the caller (a (N, d) x (d, K)
matmul: the only place the embeddings are read) and every inner step works on
K floats per pair.  Gradients w.r.t. each user's theta come from ONE autograd
call on the SUM of per-user losses: user u's loss depends only on theta_u, so
d(sum)/d theta_u = dL_u/d theta_u, exactly what a per-user loop computes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mrm_ray.model import bt_loss, mix


@dataclass
class InnerConfig:
    steps: int = 1                 # gradient steps on the support pairs
    lr: float = 1.0                # inner step size (Adam: roughly the size of each step on theta)
    optimizer: str = "sgd"         # "sgd" or "adam" (a fresh Adam per user, as the reference)
    first_order: bool = False      # first-order MAML: do not differentiate through the inner steps
    learn_lr: bool = False         # Meta-SGD: learn a per-head inner step size
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of `values` (N, ...) per segment -> (n, ...)."""
    out = values.new_zeros((n, *values.shape[1:]))
    return out.index_add(0, seg, values)


def segment_count(seg: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=seg.device).index_add_(0, seg, torch.ones_like(seg, dtype=dtype))


def margins(theta: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """r_u(chosen) - r_u(rejected) per pair, for theta (B, K) and flat pairs."""
    return mix(theta.index_select(0, seg), dphi)


def task_losses(theta: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor,
                counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean BT loss per user (B,).  A user with no pairs has loss 0 (and no gradient)."""
    n = theta.shape[0]
    counts = segment_count(seg, n, dphi.dtype) if counts is None else counts
    return segment_sum(bt_loss(margins(theta, dphi, seg)), seg, n) / counts.clamp(min=1)


def adapt(theta0: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor, n_users: int,
          cfg: InnerConfig, lr: torch.Tensor | None = None) -> torch.Tensor:
    """Adapt every user's logits from theta0 on its support pairs.

    theta0: (K,) meta-init, or (B, K) per-user starts.  dphi: (N, K) support
    base-reward differences; seg: (N,) user index in [0, n_users).  lr:
    optional learned (K,) step sizes (Meta-SGD) in place of cfg.lr.
    Returns theta (B, K).

    Under autograd (meta-training) the result is differentiable w.r.t. theta0,
    W (through dphi) and lr: second order through the inner steps, or first
    order (cfg.first_order: the inner gradients are treated as constants, so
    theta = theta0 - const).  Under torch.no_grad() (evaluation, scoring) it
    returns plain tensors; do not call it under inference_mode, which forbids
    the inner autograd call.
    """
    theta = theta0.expand(n_users, -1) if theta0.dim() == 1 else theta0
    step = cfg.lr if lr is None else lr
    tracked = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (theta, dphi, step))
    second_order = tracked and not cfg.first_order
    counts = segment_count(seg, n_users, dphi.dtype)
    m = v = None
    for t in range(1, cfg.steps + 1):
        with torch.enable_grad():
            x = theta if second_order else theta.detach().requires_grad_(True)
            d = dphi if second_order else dphi.detach()
            loss = task_losses(x, d, seg, counts).sum()
            (g,) = torch.autograd.grad(loss, x, create_graph=second_order)
        if cfg.optimizer == "sgd":
            update = g
        elif cfg.optimizer == "adam":
            # torch.optim.Adam's update from a fresh state, written out so that
            # it can be differentiated through (the reference's per-user Adam).
            b1, b2 = cfg.betas
            m = (1 - b1) * g if m is None else b1 * m + (1 - b1) * g
            v = (1 - b2) * g * g if v is None else b2 * v + (1 - b2) * g * g
            m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
            # +1e-30 keeps sqrt differentiable at v == 0 (a user with no support
            # pairs); it is below float32 resolution for any non-zero v.
            update = m_hat / ((v_hat + 1e-30).sqrt() + cfg.eps)
        else:
            raise ValueError(f"unknown inner optimizer {cfg.optimizer!r}")
        theta = theta - step * update
    return theta
