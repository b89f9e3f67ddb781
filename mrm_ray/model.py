"""The MRM reward head in plain torch (no Ray, storage or transformers imports).

A frozen backbone embeds every response once as `e` (dim d).  MRM keeps K
shared linear "base rewards" and, per user, K logits theta_u:

    phi(e)   = W (s * e)                  W: (K, d), s = 0.01, no bias
    r_u(e)   = softmax(theta_u) . phi(e)  a convex mix of the K base rewards

Everything is linear in e, so a user's whole reward is one vector

    r_u(e)   = v_u . e,   v_u = s * W^T softmax(theta_u)

which is what `user_vector` returns and what export/scoring use.  The reference
also allows a stack of bias-free linear layers (hidden_sizes); their product is
still one (K, d) matrix, computed by `MRMHead.weight()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class ModelConfig:
    n_heads: int = 2                 # K: number of shared base rewards (reference: hidden_sizes=[2])
    hidden_sizes: list[int] = field(default_factory=list)  # optional bias-free layers before the K heads
    input_scale: float = 0.01        # s: embeddings of 8B reward models have large norms
    # Replace input_scale by 1 / RMS norm of (chosen - rejected) over the training
    # pairs, measured by `mrm train`: margins start O(1) for any backbone.
    auto_input_scale: bool = False
    init_std: float = 0.02           # std of the base-reward weights at initialisation


class MRMHead(nn.Module):
    """Shared parameters: the base rewards W (possibly a stack) and the meta-init theta_0.

    `log_inner_lr` exists only for Meta-SGD (a learned per-head inner step size).
    """

    def __init__(self, dim: int, cfg: ModelConfig = ModelConfig(), learn_inner_lr: bool = False,
                 inner_lr: float = 1.0):
        super().__init__()
        self.dim, self.cfg = dim, cfg
        sizes = [dim, *cfg.hidden_sizes, cfg.n_heads]
        self.layers = nn.ParameterList(
            [nn.Parameter(torch.randn(o, i) * cfg.init_std) for i, o in zip(sizes[:-1], sizes[1:])])
        # theta_0 = 0: every user starts from the uniform mix of the K heads.
        self.theta0 = nn.Parameter(torch.zeros(cfg.n_heads))
        self.log_inner_lr = (nn.Parameter(torch.full((cfg.n_heads,), float(inner_lr)).log())
                             if learn_inner_lr else None)

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
        """v_u = s W^T softmax(theta_u): (..., K) logits -> (..., d) reward vectors."""
        return F.softmax(theta, dim=-1) @ self.weight()


def mix(theta: torch.Tensor, phi: torch.Tensor) -> torch.Tensor:
    """r = softmax(theta) . phi, with theta broadcast against phi's leading dims."""
    return (F.softmax(theta, dim=-1) * phi).sum(-1)


def bt_loss(margin: torch.Tensor) -> torch.Tensor:
    """Bradley-Terry loss per pair: -log sigmoid(r(chosen) - r(rejected))."""
    return -F.logsigmoid(margin)
