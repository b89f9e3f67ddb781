"""Baselines over the same embeddings, in plain torch (no Ray, no storage).

Every baseline sees what MRM sees: the (chosen - rejected) embedding
differences `diff` (N, d) of a flat batch of users, `seg` (N,) saying whose
pair each row is.  Per-user work is batched with the segment ops of
mrm_ray.core.adapt (one autograd call or one batched K x K solve for all users),
never a per-user Python loop.

shared_bt  one Bradley-Terry reward for everyone (no personalization): a
           logistic regression without bias on chosen - rejected, L-BFGS.
LoRe       (Bose et al. 2025) the MRM factorization r_u = softmax(theta_u) . (B e)
           with the basis B and every seen user's theta learned JOINTLY by Adam
           (no meta-learned start, no robust objective); a new user is fit by
           many Adam steps from the neutral start theta = 0 (uniform mix) with a
           small L2 on theta.
PReF       (Shenfeld et al. 2025) free user weights r_u = lambda_u . (B e): the
           basis is initialised by the SVD of the user-by-feature matrix (row u =
           the mean chosen - rejected of user u, the direction user u prefers),
           then refined by alternating logistic matrix factorization (lambda
           step: batched Newton, convex; B step: L-BFGS, convex for fixed
           lambda).  A new user's weights are a regularized maximum likelihood
           fit (batched Newton): a Gaussian prior fitted to the seen users'
           lambdas, its strength chosen on the validation carve.

Both low-rank baselines select their number of joint steps (LoRe) / alternations
(PReF) and the new-user regularization on the validation pairs of the seen users,
as MRM selects its epoch: the test split is never looked at.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mrm_ray.core.adapt import segment_count, segment_sum

log = logging.getLogger(__name__)


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


# --- user weights over a fixed basis ----------------------------------------------
def user_margins(theta: torch.Tensor, dphi: torch.Tensor, seg: torch.Tensor, weights: str) -> torch.Tensor:
    """Margin per pair: softmax(theta_u) . dphi ("softmax", LoRe/MRM) or theta_u . dphi ("free", PReF)."""
    w = F.softmax(theta, dim=-1) if weights == "softmax" else theta
    return (w.index_select(0, seg) * dphi).sum(-1)


def fit_users_adam(dphi: torch.Tensor, seg: torch.Tensor, n_users: int, steps: int = 100, lr: float = 0.1,
                   l2: float = 1e-3, weights: str = "softmax", start: torch.Tensor | None = None) -> torch.Tensor:
    """Every user's weights by `steps` Adam steps on  sum_i bt(m_i) + l2 |theta_u|^2  (LoRe's new users).

    dphi: (N, K) base-reward differences; seg: (N,) user in [0, n_users).
    Adam is elementwise, so one Adam over the (n_users, K) matrix on the SUM of
    the users' objectives is exactly n_users independent per-user Adams.
    A user without pairs stays at its start.  Returns (n_users, K).
    """
    k = dphi.shape[1]
    theta0 = dphi.new_zeros(n_users, k) if start is None else start.to(dphi.dtype).expand(n_users, k)
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=lr)
    dphi = dphi.detach()
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            loss = F.softplus(-user_margins(theta, dphi, seg, weights)).sum() + l2 * theta.pow(2).sum()
            loss.backward()
            opt.step()
    return theta.detach()


def _map_objective(lam, dphi, seg, n_users, mu, prec):
    """Per-user sum_i softplus(-lam_u . x_i) + 1/2 (lam_u - mu)^T P (lam_u - mu)  -> (n_users,)."""
    m = (lam.index_select(0, seg) * dphi).sum(-1)
    r = lam - mu
    return segment_sum(F.softplus(-m), seg, n_users) + 0.5 * torch.einsum("uk,kl,ul->u", r, prec, r)


@torch.no_grad()
def fit_users_newton(dphi: torch.Tensor, seg: torch.Tensor, n_users: int, prior_mean: torch.Tensor | None = None,
                     prior_precision: torch.Tensor | float = 1.0, iters: int = 50, tol: float = 1e-10) -> torch.Tensor:
    """Regularized maximum likelihood of free user weights, all users at once (PReF's new users).

    Minimises per user  sum_i softplus(-lambda_u . x_i) + 1/2 (lambda_u - mu)^T P (lambda_u - mu)
    (x_i = dphi rows of user u; P = prior_precision, a (K, K) positive definite
    matrix or a scalar times I) by damped Newton: the (n_users, K, K) Hessians
    are segment sums of sigma'(m) x x^T plus P, solved in one batched call; a
    batched backtracking (halving the step of each user whose objective would
    rise) keeps every user's objective non-increasing.  Convex, so the result is the unique
    optimum.  Computed in float64; returns (n_users, K) in dphi's dtype.
    """
    out_dtype = dphi.dtype
    x = dphi.detach().to(torch.float64)
    k = x.shape[1]
    mu = x.new_zeros(k) if prior_mean is None else prior_mean.to(torch.float64)
    prec = (torch.eye(k, dtype=torch.float64) * float(prior_precision) if not torch.is_tensor(prior_precision)
            else prior_precision.to(torch.float64))
    lam = mu.expand(n_users, k).clone()
    outer = x.unsqueeze(2) * x.unsqueeze(1)                                  # (N, K, K)
    f = _map_objective(lam, x, seg, n_users, mu, prec)
    for _ in range(iters):
        m = (lam.index_select(0, seg) * x).sum(-1)
        p = torch.sigmoid(m)
        grad = segment_sum(-(1 - p).unsqueeze(1) * x, seg, n_users) + (lam - mu) @ prec
        hess = segment_sum((p * (1 - p))[:, None, None] * outer, seg, n_users) + prec
        step = torch.linalg.solve(hess, grad.unsqueeze(-1)).squeeze(-1)       # (U, K)
        # backtracking, batched: halve the step of the users whose objective went up
        t = torch.ones(n_users, 1, dtype=torch.float64)
        for _ in range(12):
            f_new = _map_objective(lam - t * step, x, seg, n_users, mu, prec)
            bad = f_new > f
            if not bool(bad.any()):
                break
            t = torch.where(bad.unsqueeze(1), t / 2, t)
        t = torch.where(bad.unsqueeze(1), torch.zeros_like(t), t)
        lam = lam - t * step
        f = torch.where(bad, f, f_new)
        if float((t * step).abs().max()) < tol:
            break
    return lam.to(out_dtype)


# --- the fitted low-rank models ------------------------------------------------------
@dataclass
class LowRankModel:
    """A fitted basis and how a user's weights over it are obtained.

    phi(e) = basis @ e (input scale folded in); r_u(e) = softmax(theta_u) . phi(e)
    ("softmax") or theta_u . phi(e) ("free").
    """
    name: str
    basis: torch.Tensor                     # (K, d)
    weights: str                            # "softmax" | "free"
    fit: str                                # "adam" | "newton": how new users are fit
    l2: float                               # adam: L2 on theta; newton: prior strength multiplier
    prior_mean: torch.Tensor | None = None  # newton: the Gaussian prior over lambda
    prior_precision: torch.Tensor | None = None
    steps: int = 100                        # adam steps / newton iterations
    lr: float = 0.1
    history: list = field(default_factory=list)

    def dphi(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.to(self.basis.dtype) @ self.basis.T

    def fit_users(self, diff: torch.Tensor, seg: torch.Tensor, n_users: int, l2: float | None = None) -> torch.Tensor:
        """Every user's weights from its pairs (diff oriented chosen - rejected)."""
        l2 = self.l2 if l2 is None else l2
        dphi = self.dphi(diff)
        if self.fit == "adam":
            return fit_users_adam(dphi, seg, n_users, self.steps, self.lr, l2, self.weights)
        return fit_users_newton(dphi, seg, n_users, self.prior_mean, l2 * self.prior_precision, self.steps)

    def margins(self, theta: torch.Tensor, diff: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
        return user_margins(theta.to(self.basis.dtype), self.dphi(diff), seg, self.weights)


@dataclass
class LoReConfig:
    n_heads: int = 2             # K (compare uses MRM's model.n_heads)
    steps: int = 400             # joint full-batch Adam steps on (B, theta of every seen user)
    lr: float = 0.05
    init_std: float = 0.1        # basis init (on unit-RMS-norm differences)
    l2_basis: float = 1e-4
    eval_every: int = 25         # steps between validation passes (best step is kept)
    new_user_steps: int = 100    # Adam steps for a new user's theta, from theta = 0
    new_user_lr: float = 0.1
    l2_grid: tuple = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # L2 on a new user's theta, picked on validation
    seed: int = 0


@dataclass
class PReFConfig:
    n_heads: int = 2
    iters: int = 20              # alternations (lambda step, B step); the best on validation is kept
    l2_weights: float = 1.0      # ridge on lambda during the factorization (per user, sum of losses)
    l2_basis: float = 1e-4
    basis_iters: int = 50        # L-BFGS iterations per B step
    # multiplier of the prior precision fitted on the seen users' lambdas, picked on validation
    prior_grid: tuple = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
    newton_iters: int = 50


def _rms_scale(diff: torch.Tensor) -> float:
    """1 / RMS norm of the differences: margins start O(1) whatever the backbone."""
    return 1.0 / max(float(diff.double().pow(2).sum(1).mean().sqrt()), 1e-12)


def _accuracy(margin: torch.Tensor, seg: torch.Tensor, n_users: int) -> float:
    """Mean over users (with rows) of the share of positive margins."""
    n = segment_count(seg, n_users, torch.float64)
    c = segment_sum((margin > 0).to(torch.float64), seg, n_users)
    has = n > 0
    return float((c[has] / n[has]).mean()) if has.any() else float("nan")


def _pick_l2(model: LowRankModel, diff, seg, n_users, val: torch.Tensor, grid) -> float:
    """The new-user regularization whose fits on the non-validation pairs score best on validation."""
    if not bool(val.any()):
        return grid[len(grid) // 2]
    scores = []
    for l2 in grid:
        theta = model.fit_users(diff[~val], seg[~val], n_users, l2=l2)
        scores.append(_accuracy(model.margins(theta, diff[val], seg[val]), seg[val], n_users))
    best = max(range(len(grid)), key=lambda i: scores[i])
    model.history.append({"l2_grid": list(grid), "val_accuracy": scores})
    return grid[best]


def fit_lore(diff: torch.Tensor, seg: torch.Tensor, n_users: int, val: torch.Tensor | None = None,
             cfg: LoReConfig = LoReConfig()) -> LowRankModel:
    """LoRe on the seen users' train pairs; `val` (N,) bool marks the validation carve."""
    val = torch.zeros(len(seg), dtype=torch.bool) if val is None else val
    scale = _rms_scale(diff)
    x, tr = diff.to(torch.float32) * scale, ~val
    gen = torch.Generator().manual_seed(cfg.seed)
    basis = (torch.randn(cfg.n_heads, x.shape[1], generator=gen) * cfg.init_std).requires_grad_(True)
    theta = torch.zeros(n_users, cfg.n_heads, requires_grad=True)
    opt = torch.optim.Adam([basis, theta], lr=cfg.lr)
    counts = segment_count(seg[tr], n_users).clamp(min=1)
    x_tr, seg_tr, x_val, seg_val = x[tr], seg[tr], x[val], seg[val]
    best, history = (-1.0, basis.detach().clone(), 0), []
    for step in range(1, cfg.steps + 1):
        opt.zero_grad()
        m = user_margins(theta, x_tr @ basis.T, seg_tr, "softmax")
        per_user = segment_sum(F.softplus(-m), seg_tr, n_users) / counts
        loss = per_user.mean() + cfg.l2_basis * basis.pow(2).sum()
        loss.backward()
        opt.step()
        if step % cfg.eval_every == 0 or step == cfg.steps:
            with torch.no_grad():
                acc = _accuracy(user_margins(theta, x_val @ basis.T, seg_val, "softmax"), seg_val, n_users) \
                    if len(seg_val) else -float(loss)
            history.append({"step": step, "loss": float(loss.detach()), "val_accuracy": acc})
            if acc > best[0]:
                best = (acc, basis.detach().clone(), step)
    log.info("LoRe: %d steps, best step %d (validation accuracy %.4f)", cfg.steps, best[2], best[0])
    model = LowRankModel("LoRe", best[1] * scale, "softmax", "adam", cfg.l2_grid[0],
                         steps=cfg.new_user_steps, lr=cfg.new_user_lr, history=history)
    model.l2 = _pick_l2(model, diff, seg, n_users, val, cfg.l2_grid)
    return model


def _basis_step(x, seg, lam, basis, n_users, cfg: PReFConfig) -> torch.Tensor:
    """argmin_B  mean_u mean_i softplus(-lambda_u . B x_i) + l2 |B|^2  (convex for fixed lambda)."""
    w = (1.0 / segment_count(seg, n_users, x.dtype).clamp(min=1)).index_select(0, seg)
    n_active = float((segment_count(seg, n_users) > 0).sum().clamp(min=1))
    lam_rows = lam.index_select(0, seg)
    b = basis.detach().clone().contiguous().requires_grad_(True)
    opt = torch.optim.LBFGS([b], max_iter=cfg.basis_iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        m = ((x @ b.T) * lam_rows).sum(-1)
        loss = (w * F.softplus(-m)).sum() / n_active + cfg.l2_basis * b.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return b.detach()


def fit_pref(diff: torch.Tensor, seg: torch.Tensor, n_users: int, val: torch.Tensor | None = None,
             cfg: PReFConfig = PReFConfig()) -> LowRankModel:
    """PReF-style factorization on the seen users' train pairs; `val` marks the validation carve."""
    val = torch.zeros(len(seg), dtype=torch.bool) if val is None else val
    scale = _rms_scale(diff)
    x = diff.to(torch.float64) * scale
    tr = ~val
    x_tr, seg_tr, x_val, seg_val = x[tr], seg[tr], x[val], seg[val]
    d, k = x.shape[1], cfg.n_heads
    # user-by-feature matrix: row u = user u's mean preferred direction; its top-K
    # right singular vectors span the directions along which users disagree most.
    g = segment_sum(x_tr, seg_tr, n_users) / segment_count(seg_tr, n_users, x.dtype).clamp(min=1).unsqueeze(1)
    _, _, vh = torch.linalg.svd(g, full_matrices=False)
    basis = vh[:k] * d ** 0.5  # unit directions, scaled so B x is O(1) on unit-norm x
    if basis.shape[0] < k:     # fewer users than heads: pad with random directions
        basis = torch.cat([basis, torch.randn(k - basis.shape[0], d, dtype=x.dtype)])
    best, history = (-1.0, basis, None, 0), []
    for it in range(1, cfg.iters + 1):
        lam = fit_users_newton(x_tr @ basis.T, seg_tr, n_users, None, 2 * cfg.l2_weights, cfg.newton_iters)
        acc = _accuracy(((x_val @ basis.T) * lam.index_select(0, seg_val)).sum(-1), seg_val, n_users) \
            if len(seg_val) else float(it)
        history.append({"iteration": it, "val_accuracy": acc})
        if acc > best[0]:
            best = (acc, basis, lam, it)
        basis = _basis_step(x_tr, seg_tr, lam, basis, n_users, cfg)
    _, basis, lam, it = best
    log.info("PReF: %d alternations, best %d (validation accuracy %.4f)", cfg.iters, it, best[0])
    # Gaussian prior over lambda from the seen users (those with train pairs), slightly shrunk.
    has = segment_count(seg_tr, n_users) > 0
    lam_seen = lam[has]
    mu = lam_seen.mean(0)
    cov = torch.cov(lam_seen.T).reshape(k, k) if len(lam_seen) > 1 else torch.eye(k, dtype=x.dtype)
    prec = torch.linalg.inv(cov + 1e-3 * torch.eye(k, dtype=x.dtype) * max(float(cov.diagonal().mean()), 1e-6))
    model = LowRankModel("PReF", (basis * scale).to(torch.float64), "free", "newton", 1.0, mu, prec,
                         steps=cfg.newton_iters, history=history)
    model.l2 = _pick_l2(model, diff.to(torch.float64), seg, n_users, val, cfg.prior_grid)
    return model
