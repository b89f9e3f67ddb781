"""The MRM reward head in plain torch (no Ray, storage or transformers imports).

A frozen backbone embeds every response once as `e` (dim d).  MRM keeps K
shared linear "base rewards" and, per user, K logits theta_u:

    phi(e)   = W (s * e)                  W: (K, d), no bias; s = 1 / RMS norm of chosen - rejected
                                          (measured by `mrm train`; the reference's presets: 0.01)
    r_u(e)   = softmax(theta_u) . phi(e)  a convex mix of the K base rewards  (weights="softmax")
    r_u(e)   = theta_u . phi(e)           a free linear mix                  (weights="linear")

The reference uses the softmax mix.  Its logits move little in one inner
step and the mix can only interpolate between the heads, so on populations
whose users really differ every user ends up near the same reward.  Our
default uses the linear mix, adapted by Newton steps under a Gaussian prior
N(theta_0, diag(exp(log_prior))^-1) whose precision is learned: a user's
weights move as far as its pairs justify, and no further.

Everything is linear in e, so a user's whole reward is one vector

    r_u(e)   = v_u . e,   v_u = s * W^T mixing(theta_u)

which is what `user_vector` returns and what export/scoring use.  The reference
also allows a stack of bias-free linear layers (hidden_sizes); their product is
still one (K, d) matrix, computed by `MRMHead.weight()`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    n_heads: int = 0                 # K: shared base rewards; 0 = chosen by cross-validation (init="data")
    hidden_sizes: list[int] = field(default_factory=list)  # optional bias-free layers before the K heads
    input_scale: float = 0.01        # s (the reference's 0.01: embeddings of 8B reward models have large norms)
    # Replace input_scale by 1 / RMS norm of (chosen - rejected) over the training
    # pairs, measured by `mrm train`: margins start O(1) for any backbone.
    auto_input_scale: bool = True
    init_std: float = 0.02           # std of the base-reward weights at a random initialisation
    weights: str = "linear"          # user mix of the heads: "linear" or "softmax" (the reference)
    # "random": W ~ N(0, init_std^2), theta_0 = 0.  "data": the shared reward and the
    # directions along which the seen users disagree, with a fitted prior (mrm_ray.core.basis).
    # "reference": nn.Linear's default init and theta_0 ~ N(0, 1), as the reference code.
    init: str = "data"


class MRMHead(nn.Module):
    """Shared parameters: the base rewards W (possibly a stack) and the meta-init theta_0.

    `log_inner_lr` exists only for Meta-SGD (a learned per-head inner step size);
    `log_prior` only for Newton adaptation (the learned prior precision per head).
    """

    def __init__(self, dim: int, cfg: ModelConfig = ModelConfig(), learn_inner_lr: bool = False,
                 inner_lr: float = 1.0, prior: bool = False):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        sizes = [dim, *cfg.hidden_sizes, cfg.n_heads]
        self.layers = nn.ParameterList([nn.Parameter(torch.empty(o, i)) for i, o in zip(sizes[:-1], sizes[1:])])
        self.theta0 = nn.Parameter(torch.zeros(cfg.n_heads))
        with torch.no_grad():
            if cfg.init == "reference":   # nn.Linear's default init, then theta_0 ~ N(0, 1), as the reference
                init_layers(self.layers, self.theta0)
            else:                         # theta_0 = 0: every user starts from the uniform mix of the heads
                for w in self.layers:     # ("data": mrm_ray.core.basis replaces these before training)
                    w.normal_(0.0, cfg.init_std)
        self.log_inner_lr = (nn.Parameter(torch.full((cfg.n_heads,), float(inner_lr)).log())
                             if learn_inner_lr else None)
        self.log_prior = nn.Parameter(torch.zeros(cfg.n_heads)) if prior else None

    def weight(self) -> torch.Tensor:
        """The effective (K, d) base-reward matrix, input scale folded in."""
        w = self.layers[0]
        for layer in self.layers[1:]:
            w = layer @ w
        return w * self.cfg.input_scale

    def base_rewards(self, emb: torch.Tensor) -> torch.Tensor:
        """phi(e) for a (..., d) batch of embeddings -> (..., K)."""
        return emb @ self.weight().T

    def user_vector(self, theta: torch.Tensor) -> torch.Tensor:
        """v_u = s W^T mixing(theta_u): (..., K) user weights -> (..., d) reward vectors."""
        return mixing(theta, self.cfg.weights) @ self.weight()

    def inner_args(self) -> dict:
        """What `adapt` needs besides theta_0: the mix, Meta-SGD's step sizes, Newton's prior."""
        return {"weights": self.cfg.weights,
                "lr": None if self.log_inner_lr is None else self.log_inner_lr.exp(),
                "prior": None if self.log_prior is None else self.log_prior.exp()}


def init_layers(layers, theta0: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """nn.Linear's default initialisation of every layer, then theta_0 ~ N(0, 1): the reference's
    draws, in its order, from `generator` (None: torch's global RNG, as the reference)."""
    with torch.no_grad():
        for w in layers:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
        theta0.copy_(torch.randn(theta0.shape, generator=generator))


def mixing(theta: torch.Tensor, weights: str = "softmax") -> torch.Tensor:
    """The weights of the K heads in a user's reward: softmax(theta) or theta itself."""
    if weights == "softmax":
        return F.softmax(theta, dim=-1)
    if weights == "linear":
        return theta
    raise ValueError(f"unknown weights {weights!r}")


def mix(theta: torch.Tensor, phi: torch.Tensor, weights: str = "softmax") -> torch.Tensor:
    """r = mixing(theta) . phi, with theta broadcast against phi's leading dims."""
    return (mixing(theta, weights) * phi).sum(-1)


def bt_loss(margin: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss per pair: -log sigmoid(r(chosen) - r(rejected))."""
    return -F.logsigmoid(margin)
