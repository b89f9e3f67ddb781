"""The data-driven start of meta-training: a shared reward, the directions along
which users disagree, and a population prior, chosen by cross-validation over users.

Plain torch.  Input: the seen users' training pairs as x = s (chosen - rejected)
(N, d) with user index seg (N,), a fold per user (U,) and a per-pair mask
`half` that splits each user's pairs into an adaptation half and a scoring
half (by conversation).

1. Shared reward v0: ridge-regularised Bradley-Terry, penalty ridge * |v|^2 / d
   (x has unit RMS norm, so a weight vector for O(1) margins has |v| ~ sqrt(d)).
2. Directions: every user's loss gradient at v0 says where that user would
   move the shared reward.  Whitened by the covariance of x (so directions of
   small embedding variance count as much as large ones), the top principal
   directions of those per-user gradients span the users' disagreement.
   W = [v0; d_1; ...; d_{K-1}]: K base rewards, the first one shared.
3. Prior: each user's weights over W are theta_u ~ N(mu, diag(1/prec)); mu and
   prec by empirical Bayes (EM with Laplace posteriors).  A new user's weights
   are its posterior mode (Newton, mrm_ray.core.adapt.newton).
4. Selection, by k-fold cross-validation over users (never the test split):
   steps 1-2 on the other folds, the prior (3) on the held-out users'
   adaptation halves, the loss on their scoring halves.  That is exactly what
   an unseen user goes through, so the estimate is honest: fitting the prior
   on the same users as the basis would make every direction look useful.
   Candidates: the ridge, K, and a multiplier c of the prior precision; plus
   "no personalization" (v0 alone, with a global scale) -- the shared reward
   is always a candidate, so a population without user differences loses
   nothing.  Every choice minimises the held-out loss, except that among
   candidates within one standard error (paired over users) of the best the
   simplest wins: fewer heads, then a stronger prior.  (basis.select=accuracy
   decides K on held-out accuracy instead: more conservative; measured worse
   on the zoo.)
5. The final basis is fit on all users with the chosen ridge and K; the prior
   is the mean over folds, times c.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mrm_ray.core import rpo
from mrm_ray.core.adapt import newton, segment_count, segment_sum
from mrm_ray.core.rpo import RPOConfig

log = logging.getLogger(__name__)


@dataclass
class BasisConfig:
    folds: int = 5                       # cross-validation folds over the seen users
    max_heads: int = 6                   # largest K considered (model.n_heads = 0: chosen up to this)
    ridge: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0)   # shared reward's penalty, x |v|^2 / d
    prior_scale: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # multipliers c of the fitted prior precision
    em_iters: int = 10                   # EM iterations for the prior
    newton_steps: int = 8                # Newton steps of the posterior modes inside EM
    shrink: float = 0.05                 # covariance shrinkage towards its mean eigenvalue, for whitening
    select: str = "loss"                 # what decides K (and whether to personalize): held-out "loss" or "accuracy"
    max_values: int = 50_000_000         # at most this many floats (pairs x d) of the seen users are used,
    max_pairs: int = 200_000             # and at most this many pairs: the start's cost is bounded whatever
                                         # the population (the zoo's populations are far below both)
    use_carve: bool = True               # fit the start on the validation carve too: more pairs for a data-poor
                                         # population, but the carve is then not held out from the start and
                                         # reads high (README, "Model selection"); false holds it out


@dataclass
class BasisFit:
    """W (K, d) over x, the prior (mu, prec) of user weights, and what was chosen."""
    weight: torch.Tensor
    mu: torch.Tensor
    prec: torch.Tensor
    personalize: bool                    # False: the shared reward won (adaptation is switched off)
    report: dict = field(default_factory=dict)


NO_ADAPTATION = 1e8  # the prior precision of "no personalization": a user's weights do not move


# --- pieces ---------------------------------------------------------------------------
def ridge_bt(x: torch.Tensor, ridge: float, max_iter: int = 500) -> torch.Tensor:
    """argmin_v mean_i softplus(-v . x_i) + ridge |v|^2 / d  (L-BFGS, float64)."""
    x = x.to(torch.float64)
    lam = ridge / x.shape[1]
    v = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], max_iter=max_iter, line_search_fn="strong_wolfe", history_size=20,
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = F.softplus(-(x @ v)).mean() + lam * v.pow(2).sum()
        loss.backward()
        return loss
    with torch.enable_grad():
        opt.step(closure)
    return v.detach()


def whitener(x: torch.Tensor, shrink: float) -> torch.Tensor:
    """Lower Cholesky factor L of the shrunk covariance of x: L^-1 x is white."""
    cov = x.T @ x / max(len(x), 1)
    mean_eig = cov.diagonal().mean().clamp(min=1e-12)
    cov = (1 - shrink) * cov + shrink * mean_eig * torch.eye(x.shape[1], dtype=x.dtype)
    return torch.linalg.cholesky(cov)


def directions(x: torch.Tensor, seg: torch.Tensor, n_users: int, v0: torch.Tensor, chol: torch.Tensor,
               n: int, robust: RPOConfig | None = None) -> torch.Tensor:
    """The top `n` directions of the users' disagreement with v0 (rows, unit in the covariance metric).

    g_u = sum_i sigmoid(-v0 . x_i) x_i is user u's loss gradient at v0 (a
    step direction for that user alone).  In whitened coordinates the noise of
    g_u is isotropic, so its top principal directions are where users really
    differ; mapped back, they are the generalised eigenvectors of
    (sum_u g_u g_u^T, covariance).

    robust: RPO's weights on the users' losses at v0 (mrm_ray.core.rpo) scale their
    gradients, so the directions serve the hard users first -- a minority that
    the shared reward fits badly gets a head of its own.  (Noisy labellers are
    hard too, but their gradients point nowhere in particular.)
    """
    if n <= 0:
        return x.new_zeros(0, x.shape[1])
    m = x @ v0
    g = segment_sum(torch.sigmoid(-m).unsqueeze(1) * x, seg, n_users)
    count = segment_count(seg, n_users, x.dtype)
    if robust is not None and robust.enabled:
        loss = segment_sum(F.softplus(-m), seg, n_users) / count.clamp(min=1)
        has = count > 0
        w = torch.zeros_like(loss)
        w[has] = rpo.weights(loss[has], robust)
        g = g * (w / w[has].mean().clamp(min=1e-12)).sqrt().unsqueeze(1)   # weights on g g^T
    g = g[count > 0]
    gw = torch.linalg.solve_triangular(chol, g.T, upper=False).T            # rows: L^-1 g_u
    q = min(n + 8, *gw.shape)
    if q < min(gw.shape):   # top right singular vectors of the (users x d) whitened gradients
        with torch.random.fork_rng():
            torch.manual_seed(0)
            u = torch.svd_lowrank(gw, q=q, niter=4)[2].T[:n]
    else:
        u = torch.linalg.svd(gw, full_matrices=False).Vh[:n]
    dirs = torch.linalg.solve_triangular(chol.T, u.T, upper=True).T         # L^-T u
    return dirs


def fit_prior(w: torch.Tensor, x: torch.Tensor, seg: torch.Tensor, n_users: int, cfg: BasisConfig):
    """(mu, prec) of user weights over the rows of w, by EM with Laplace posteriors."""
    k = w.shape[0]
    dphi = x @ w.T
    has = segment_count(seg, n_users) > 0
    mu = torch.zeros(k, dtype=x.dtype)
    mu[0] = 1.0
    prec = torch.ones(k, dtype=x.dtype)
    if not bool(has.any()):
        return mu, prec
    outer = dphi.unsqueeze(2) * dphi.unsqueeze(1)
    for _ in range(cfg.em_iters):
        theta = newton(mu, prec, dphi, seg, n_users, cfg.newton_steps, differentiable=False)
        p = torch.sigmoid((theta.index_select(0, seg) * dphi).sum(-1))
        hess = segment_sum((p * (1 - p))[:, None, None] * outer, seg, n_users) + torch.diag(prec)
        post_var = torch.linalg.inv(hess).diagonal(dim1=1, dim2=2)
        mu = theta[has].mean(0)
        var = ((theta[has] - mu) ** 2 + post_var[has]).mean(0)
        prec = (1.0 / var.clamp(min=1e-6)).clamp(max=1e6)
    return mu, prec


def global_scale(margin: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """The one scale a maximising sum log sigmoid(a m_i): calibrates a shared reward on new users."""
    a = margin.new_ones(())
    for _ in range(iters):
        p = torch.sigmoid(a * margin)
        g = -((1 - p) * margin).sum()
        h = (p * (1 - p) * margin * margin).sum() + 1e-9
        a = (a - g / h).clamp(min=1e-3, max=1e3)
    return a


def user_losses(margin: torch.Tensor, seg: torch.Tensor, n_users: int) -> torch.Tensor:
    """Mean BT loss per user; NaN for users without rows."""
    c = segment_count(seg, n_users, margin.dtype)
    loss = segment_sum(F.softplus(-margin), seg, n_users) / c.clamp(min=1)
    return torch.where(c > 0, loss, torch.full_like(loss, float("nan")))


def user_accuracy(margin: torch.Tensor, seg: torch.Tensor, n_users: int) -> torch.Tensor:
    """Share of each user's pairs ranked right (ties wrong); NaN for users without rows."""
    c = segment_count(seg, n_users, margin.dtype)
    right = segment_sum((margin > 0).to(margin.dtype), seg, n_users) / c.clamp(min=1)
    return torch.where(c > 0, right, torch.full_like(right, float("nan")))


def one_se_choice(losses: list[torch.Tensor]) -> tuple[int, list[float]]:
    """Index of the first (simplest) candidate within one paired standard error of the best (lowest)."""
    table = torch.stack(losses)                                  # (C, U)
    table = table[:, ~torch.isnan(table).any(0)]
    means = table.mean(1)
    best = int(torch.argmin(means))
    for i in range(len(losses)):
        d = table[i] - table[best]
        se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else 0.0
        if float(d.mean()) <= se:
            return i, means.tolist()
    return best, means.tolist()


# --- the whole procedure ------------------------------------------------------------
def _heads(x, seg, n_users, ridge, k_max, cfg, chol=None, robust=None):
    v0 = ridge_bt(x, ridge)
    chol = whitener(x, cfg.shrink) if chol is None else chol
    return torch.cat([v0.unsqueeze(0), directions(x, seg, n_users, v0, chol, k_max - 1, robust)])


def fit(x: torch.Tensor, seg: torch.Tensor, n_users: int, fold: torch.Tensor, half: torch.Tensor,
        cfg: BasisConfig = BasisConfig(), n_heads: int = 0, robust: RPOConfig | None = None) -> BasisFit:
    """Choose and fit the start.  n_heads: a fixed K, or 0 to choose K in 1..cfg.max_heads.
    robust: weight the hard users up in the directions (see `directions`).

    Thousands of small ops: run it on one torch thread (mrm_ray.core.meta.single_thread) on a
    shared machine, or each op waits for a descheduled thread.
    """
    x = x.to(torch.float64)
    ks = [n_heads] if n_heads else list(range(1, cfg.max_heads + 1))
    k_max = max(ks)
    n_folds = int(fold.max()) + 1 if len(fold) else 1
    losses: dict[tuple, list[torch.Tensor]] = {}
    accs: dict[tuple, list[torch.Tensor]] = {}
    priors: dict[tuple, list] = {}
    pair_fold = fold.index_select(0, seg)

    def score(key, margin, s, n):
        losses.setdefault(key, []).append(user_losses(margin, s, n))
        accs.setdefault(key, []).append(user_accuracy(margin, s, n))

    for f in range(n_folds):
        tr, ho = pair_fold != f, pair_fold == f
        if not bool(tr.any()) or not bool(ho.any()):
            continue
        # users re-indexed within each side (segment ops want 0..n-1)
        u_tr, s_tr = torch.unique(seg[tr], return_inverse=True)
        u_ho, s_ho = torch.unique(seg[ho], return_inverse=True)
        x_tr, x_ho, h_ho = x[tr], x[ho], half[ho]
        a, b = ~h_ho, h_ho                                               # adapt on a, score on b
        chol = whitener(x_tr, cfg.shrink)
        for ridge in cfg.ridge:
            w = _heads(x_tr, s_tr, len(u_tr), ridge, k_max, cfg, chol, robust)
            m_a, m_b = x_ho[a] @ w[0], x_ho[b] @ w[0]
            scale = global_scale(m_a)
            priors.setdefault((ridge, 0), []).append((scale.reshape(1), None))
            score((ridge, 0, 0.0), scale * m_b, s_ho[b], len(u_ho))
            for k in ks:
                mu, prec = fit_prior(w[:k], x_ho[a], s_ho[a], len(u_ho), cfg)
                priors.setdefault((ridge, k), []).append((mu, prec))
                for c in cfg.prior_scale:
                    theta = newton(mu, prec * c, x_ho[a] @ w[:k].T, s_ho[a], len(u_ho), cfg.newton_steps,
                                   differentiable=False)
                    margin = (theta.index_select(0, s_ho[b]) * (x_ho[b] @ w[:k].T)).sum(-1)
                    score((ridge, k, c), margin, s_ho[b], len(u_ho))
    if not losses:
        raise ValueError("cross-validation needs at least two folds with users")
    loss = {key: torch.cat(v) for key, v in losses.items()}
    acc = {key: torch.cat(v) for key, v in accs.items()}
    mean = {key: float(v.nanmean()) for key, v in loss.items()}
    # continuous choices by the held-out loss: the ridge, then each K's prior strength
    ridge = min(mean, key=mean.get)[0]
    best_c = {k: min(cfg.prior_scale, key=lambda c: mean[(ridge, k, c)]) for k in ks}
    # the structural choice -- personalize at all, and with how many heads -- by held-out ACCURACY:
    # a per-user scale can lower the loss (calibration) without ranking a single pair better
    keys = [(ridge, 0, 0.0)] + [(ridge, k, best_c[k]) for k in ks]
    if cfg.select == "loss":
        keys = [(ridge, 0, 0.0)] + [(ridge, k, c) for k in ks for c in sorted(cfg.prior_scale, reverse=True)]
        i, means = one_se_choice([loss[key] for key in keys])
        means = [-m for m in means]
    else:
        i, means = one_se_choice([-acc[key] for key in keys])
    _, k, c = keys[i]
    report = {"ridge": ridge, "heads": k, "prior_scale": c, "personalize": k > 0,
              "cv": {("shared" if kk == 0 else f"K={kk} c={cc:g}"): {"loss": round(mean[(r, kk, cc)], 5),
                                                                      "accuracy": round(-m, 5)}
                     for (r, kk, cc), m in zip(keys, means)}}
    # final fit on all users
    w = _heads(x, seg, n_users, ridge, max(k, 1), cfg, robust=robust)
    if k == 0:
        scale = torch.stack([p[0] for p in priors[(ridge, 0)]]).mean()
        return BasisFit(w[:1], scale.reshape(1), torch.full((1,), NO_ADAPTATION, dtype=x.dtype), False, report)
    fold_priors = priors[(ridge, k)]
    mu = torch.zeros(k, dtype=x.dtype)
    mu[0] = torch.stack([p[0][0] for p in fold_priors]).mean()    # directions are centred: mu = 0 there
    var = torch.stack([1.0 / p[1] for p in fold_priors]).mean(0)
    report["prior_mean"], report["prior_precision"] = mu.tolist(), (c / var).tolist()
    return BasisFit(w[:k], mu, c / var, True, report)
