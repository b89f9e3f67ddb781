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

Inner optimizers: "sgd" and "adam" (a fresh Adam per user, as the reference)
take `steps` gradient steps on the mean support loss.  "newton" (linear
weights only) takes `steps` damped Newton steps towards the user's posterior
mode under a Gaussian prior N(theta_0, diag(prior)^-1):

    theta_u = argmin  sum_i softplus(-theta . dphi_i) + 1/2 (theta - theta_0)^T P (theta - theta_0)

a K x K solve per user (batched), converged in a handful of steps; a user
with one pair moves a little, a user with a hundred moves as far as its pairs
say.  Each step is halved per user until the objective does not rise (the
step sizes are constants for autograd), so it never diverges.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from mrm_ray.core.model import bt_loss, mix


@dataclass
class InnerConfig:
    steps: int = 5                 # inner steps on the support pairs (Newton: at most; it stops at the mode)
    lr: float = 1.0                # SGD / Adam step size (Adam: roughly the size of each step on theta)
    optimizer: str = "newton"      # "newton", "sgd" or "adam" (a fresh Adam per user, as the reference)
    first_order: bool = False      # first-order MAML: do not differentiate through the inner steps
    learn_lr: bool = False         # Meta-SGD: learn a per-head inner step size
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    # Meta-training's inner Adam as the `higher` library writes it (the reference): eps is added to
    # sqrt(v) before the bias correction, not after.  Evaluation and scoring use torch.optim.Adam's
    # form either way, as the reference does (InnerConfig.for_evaluation).
    higher_adam: bool = False

    def for_evaluation(self, steps: int | None = None) -> "InnerConfig":
        """This inner loop as users are adapted outside meta-training."""
        return replace(self, higher_adam=False, steps=self.steps if steps is None else steps)


def segment_sum(values: torch.Tensor, seg: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of `values` (N, ...) per segment -> (n, ...)."""
    out = values.new_zeros((n, *values.shape[1:]))
    return out.index_add(0, seg, values)


def segment_count(seg: torch.Tensor, n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(n, dtype=dtype, device=seg.device).index_add_(0, seg, torch.ones_like(seg, dtype=dtype))


def margins(theta: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor, weights: str = "softmax") -> torch.Tensor:
    """r_u(chosen) - r_u(rejected) per pair, for theta (B, K) and flat pairs."""
    return mix(theta.index_select(0, seg), dphi, weights)


def task_losses(theta: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor,
                counts: torch.Tensor | None = None, weights: str = "softmax") -> torch.Tensor:
    """Mean BT loss per user (B,).  A user with no pairs has loss 0 (and no gradient)."""
    n = theta.shape[0]
    counts = segment_count(seg, n, dphi.dtype) if counts is None else counts
    return segment_sum(bt_loss(margins(theta, dphi, seg, weights)), seg, n) / counts.clamp(min=1)


def posterior_objective(theta, theta0, prior, dphi, seg) -> torch.Tensor:
    """Per user: sum of BT losses + 1/2 (theta - theta_0)^T diag(prior) (theta - theta_0)."""
    n = theta.shape[0]
    fit = segment_sum(bt_loss((theta.index_select(0, seg) * dphi).sum(-1)), seg, n)
    return fit + 0.5 * ((theta - theta0) ** 2 * prior).sum(-1)


def newton(theta0: torch.Tensor, prior: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor, n_users: int,
           steps: int, differentiable: bool = True) -> torch.Tensor:
    """`steps` damped Newton steps from theta_0 towards each user's posterior mode (linear weights).

    theta0: (K,) or (B, K); prior: (K,) precision.  Differentiable w.r.t.
    theta0, prior and dphi (through the batched solves) unless `differentiable`
    is False.  Every user's objective is non-increasing step after step.
    """
    k, dtype = dphi.shape[1], dphi.dtype
    if not differentiable:
        theta0, prior, dphi = theta0.detach(), prior.detach(), dphi.detach()
    # float64 whatever the input: the K x K solves would amplify float32 rounding
    theta0, prior, dphi = theta0.double(), prior.double(), dphi.double()
    mu = theta0.expand(n_users, k)
    theta = mu
    eye_p = torch.diag_embed(prior.expand(n_users, k))
    outer = dphi.unsqueeze(2) * dphi.unsqueeze(1)                              # (N, K, K)
    with torch.no_grad():
        f = posterior_objective(theta, mu, prior, dphi, seg)
    for _ in range(steps):
        p = torch.sigmoid((theta.index_select(0, seg) * dphi).sum(-1))
        grad = segment_sum(-(1 - p).unsqueeze(1) * dphi, seg, n_users) + (theta - mu) * prior
        hess = segment_sum((p * (1 - p))[:, None, None] * outer, seg, n_users) + eye_p
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)
        with torch.no_grad():  # halve each user's step until its objective does not rise (beyond rounding)
            t = torch.ones(n_users, 1, dtype=theta.dtype, device=theta.device)
            for _ in range(30):
                f_new = posterior_objective(theta - t * step, mu, prior, dphi, seg)
                worse = f_new > f + 1e-9 * (1 + f.abs())
                if not bool(worse.any()):
                    break
                t = torch.where(worse.unsqueeze(1), t / 2, t)
            t = torch.where(worse.unsqueeze(1), torch.zeros_like(t), t)
            f = torch.where(worse, f, f_new)
            done = float((t * step).abs().max()) < 1e-9 if len(step) else True
        theta = theta - t * step
        if done:  # every user is at its mode: further steps would not move anything
            break
    return theta.to(dtype)


def adapt(theta0: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor, n_users: int,
          cfg: InnerConfig, lr: torch.Tensor | None = None, *, prior: torch.Tensor | None = None,
          weights: str = "softmax") -> torch.Tensor:
    """Adapt every user's weights from theta0 on its support pairs.

    theta0: (K,) meta-init, or (B, K) per-user starts.  dphi: (N, K) support
    base-reward differences; seg: (N,) user index in [0, n_users).  lr:
    optional learned (K,) step sizes (Meta-SGD) in place of cfg.lr.  prior:
    the (K,) prior precision of Newton adaptation; weights: the head mix
    ("softmax" or "linear"; see mrm_ray.core.model).  Returns theta (B, K).

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
        isinstance(x, torch.Tensor) and x.requires_grad for x in (theta, dphi, step, prior))
    second_order = tracked and not cfg.first_order
    if cfg.optimizer == "newton":
        if weights != "linear" or prior is None:
            raise ValueError("newton adaptation needs linear weights and a prior precision")
        with torch.enable_grad() if second_order else torch.no_grad():
            out = newton(theta0, prior, dphi, seg, n_users, cfg.steps, differentiable=second_order)
        # first order: the posterior mode's offset from theta_0 is a constant
        return out if second_order or not tracked else theta + (out - theta.detach())
    counts = segment_count(seg, n_users, dphi.dtype)
    m = v = None
    for t in range(1, cfg.steps + 1):
        with torch.enable_grad():
            x = theta if second_order else theta.detach().requires_grad_(True)
            d = dphi if second_order else dphi.detach()
            loss = task_losses(x, d, seg, counts, weights).sum()
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
            if cfg.higher_adam:
                update = m_hat / ((v + 1e-30).sqrt() / math.sqrt(1 - b2 ** t) + cfg.eps / math.sqrt(1 - b2 ** t))
            else:
                update = m_hat / ((v_hat + 1e-30).sqrt() + cfg.eps)
        else:
            raise ValueError(f"unknown inner optimizer {cfg.optimizer!r}")
        theta = theta - step * update
    return theta
