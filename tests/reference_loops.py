"""Plain one-user-at-a-time references that the batched code is checked against.

Written the way the MRM reference adapts a user (a fresh torch optimizer on theta,
chosen and rejected forwarded separately), or, for Newton adaptation, as the
posterior mode found by L-BFGS on the same objective: nothing shared with
mrm_ray.core.adapt except the definition of the reward.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def mixing(theta: torch.Tensor, weights: str) -> torch.Tensor:
    return torch.softmax(theta, -1) if weights == "softmax" else theta


def adapt_one_user(theta0: torch.Tensor, w: torch.Tensor, ch: torch.Tensor, rj: torch.Tensor, inner, steps: int,
                   weights: str = "softmax", prior: torch.Tensor | None = None,
                   lrs: list[float] | None = None) -> torch.Tensor:
    """One user's adapted theta (float64).  w: (K, d) base rewards with the input scale folded in."""
    theta0, w = theta0.detach().double(), w.detach().double()
    ch, rj = ch.double(), rj.double()
    if inner.optimizer == "newton":
        if not len(ch):
            return theta0.clone()
        prec = prior.detach().double()
        theta = theta0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                                line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            v = theta @ w
            loss = F.softplus(-(ch @ v - rj @ v)).sum() + 0.5 * ((theta - theta0) ** 2 * prec).sum()
            loss.backward()
            return loss
        opt.step(closure)
        return theta.detach()
    # one scalar parameter per head, so that each head can have its own step size (Meta-SGD)
    lrs = lrs or [inner.lr] * len(theta0)
    params = [torch.nn.Parameter(t.clone()) for t in theta0]
    opt_cls = torch.optim.Adam if inner.optimizer == "adam" else torch.optim.SGD
    kwargs = {"betas": inner.betas, "eps": inner.eps} if inner.optimizer == "adam" else {}
    opt = opt_cls([{"params": [p], "lr": lr} for p, lr in zip(params, lrs)], **kwargs)
    for _ in range(steps if len(ch) else 0):
        opt.zero_grad()
        v = mixing(torch.stack(params), weights) @ w
        (-F.logsigmoid(ch @ v - rj @ v).mean()).backward()
        opt.step()
    return torch.stack([p.detach() for p in params])


def user_vector(theta: torch.Tensor, w: torch.Tensor, weights: str) -> torch.Tensor:
    return mixing(theta.double(), weights) @ w.detach().double()


def meta_margins_loop(head, chosen, rejected, user, support) -> list[float]:
    """Per user, plain autograd: w0 -> `steps` gradient steps of the mean support loss -> margins."""
    out, d = [], (chosen - rejected) @ head.proj.detach().T
    for i in range(len(user)):
        mine = [j for j in range(len(user)) if user[j] == user[i] and support[j]]
        w = head.init.detach().clone().requires_grad_(True)
        for _ in range(head.steps):
            if mine:
                loss = torch.stack([F.softplus(-(w @ d[j])) for j in mine]).mean()
                (g,) = torch.autograd.grad(loss, w)
                w = (w - head.log_lr.exp().detach() * g).detach().requires_grad_(True)
        out.append(float(w @ d[i]))
    return out
