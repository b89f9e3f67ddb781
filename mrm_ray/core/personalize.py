"""A population's personal reward models from a trained head: adapt users, score responses (plain torch).

    p = Personalizer.from_run(run)                 # W (K, d), theta_0, the run's inner loop
    theta, n = p.adapt(p.project(chosen) - p.project(rejected), user_index, n_users)
    reward = p.rewards(theta, p.project(candidates), candidate_user_index)

`mrm score` (Ray tasks over user buckets) and the Python API (mrm_ray.api)
share this class, so both give the same numbers.  Because W is fixed while a
user adapts, everything after `project` needs only K floats per response.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from mrm_ray.core.adapt import InnerConfig, adapt
from mrm_ray.core.model import mix, mixing


def as_float_tensor(x) -> torch.Tensor:
    """float32 tensor view of x without a copy where possible.

    Arrays read zero-copy from Arrow are read-only; torch warns about wrapping them,
    but nothing here writes to its inputs.
    """
    if isinstance(x, np.ndarray):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(x)
    return torch.as_tensor(x, dtype=torch.float32)


@dataclass
class Personalizer:
    """What scoring needs from a run: W (K, d) with the input scale folded in, theta_0, the inner loop."""

    w: torch.Tensor
    theta0: torch.Tensor
    inner: InnerConfig
    lr: torch.Tensor | None = None     # Meta-SGD's learned per-head step sizes, else inner.lr
    prior: torch.Tensor | None = None  # Newton adaptation's prior precision
    weights: str = "softmax"           # how a user mixes the heads (mrm_ray.core.model.mixing)

    @classmethod
    def from_run(cls, run, steps: int | None = None) -> "Personalizer":
        """From a trained run (mrm_ray.data.runs.Run: its head and config); `steps` inner steps (default:
        the run's eval_inner_steps)."""
        head = run.head
        with torch.no_grad():
            args = head.inner_args()
            lr, prior = args["lr"], args["prior"]
            return cls(head.weight().detach().float().contiguous(), head.theta0.detach().float().clone(),
                       run.cfg.inner.for_evaluation(steps or run.cfg.eval_steps),
                       None if lr is None else lr.detach().float(),
                       None if prior is None else prior.detach().float(), args["weights"])

    @property
    def dim(self) -> int:
        return int(self.w.shape[1])

    @torch.no_grad()
    def project(self, emb) -> torch.Tensor:
        """phi(e) = W e for (n, d) embeddings -> (n, K).

        Written as W @ E^T: BLAS streams E once at memory bandwidth (E @ W^T with
        K = 2 is ~2.5x slower on CPU).  This is the only read of the embeddings.
        """
        emb = as_float_tensor(emb)
        return (self.w.to(emb.device) @ emb.T).T

    @torch.no_grad()
    def adapt(self, dphi: torch.Tensor, seg: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapt n_users users from theta_0 on their support pairs at once.

        dphi: (N, K) phi(chosen) - phi(rejected); seg: (N,) user index.  Returns
        (theta (n_users, K), n_support (n_users,)); a user with no pairs keeps theta_0 exactly.
        """
        seg = torch.as_tensor(seg, dtype=torch.long, device=dphi.device)
        theta0, lr = self.theta0.to(dphi.device), None if self.lr is None else self.lr.to(dphi.device)
        prior = None if self.prior is None else self.prior.to(dphi.device)
        theta = adapt(theta0, dphi, seg, n_users, self.inner, lr, prior=prior, weights=self.weights)
        n_support = torch.bincount(seg, minlength=n_users)
        return torch.where((n_support > 0)[:, None], theta, theta0), n_support

    @torch.no_grad()
    def rewards(self, theta: torch.Tensor, phi: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        """reward of candidate i = mixing(theta_seg[i]) . phi_i  (= v_u . e_i)."""
        return mix(theta.index_select(0, torch.as_tensor(seg, dtype=torch.long, device=phi.device)), phi,
                   self.weights)

    def user_vector(self, theta: torch.Tensor) -> torch.Tensor:
        """v_u = s W^T mixing(theta_u): (..., K) -> (..., d)."""
        return mixing(theta, self.weights) @ self.w
