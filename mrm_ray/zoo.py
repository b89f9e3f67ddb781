"""A zoo of structurally different synthetic populations (numpy only).

Defaults are chosen on the whole zoo, never on one generator: a method that
wins on "shared + low-rank" users can lose on clusters, on a few users with
many pairs, on noisy labellers or on anisotropic LLM-like embeddings, and it
must not hurt when users do not differ at all.

Every population follows one recipe, with different knobs:

    latent preference   w_u = shared + B a_u  [+ c_u m]  [+ personal noise]
    embeddings          e = mean + A z,  z ~ N(0, I),  A = Q diag(sigma)
    label               P(first preferred) = sigmoid(beta * w_u . (z1 - z2) / sqrt(2))
                        (flipped at random for noisy labellers)

Preferences live in the latent space z, so with anisotropic embeddings
(sigma decaying, a large common mean) the directions users care about are not
the directions of largest variance -- as in LLM hidden states.  The user's
reward vector over the embedding is v_u = A^{-T} w_u.

`generate` returns the pairs as arrays plus the truth: each user's v_u, the
oracle accuracy on its test pairs, and the true span of user variation (the
shared direction and B, as linear features of the embedding difference), with
the population's prior over the coefficients -- what the in-span bound of the
quality benchmark fits on.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class Population:
    name: str
    about: str
    users: int = 600
    dim: int = 64
    pairs: tuple[int, int] = (8, 40)    # pairs per user, uniform (inclusive)
    test_share: float = 0.5             # share of conversations in the test split
    train_cap: int | None = None        # at most this many train pairs per user (the rest is test)
    rank: int = 2                       # directions of user variation around the shared one
    spread: float = 0.8                 # std of a user's coefficient along each direction
    clusters: int = 0                   # > 0: coefficients are a cluster centre + individual noise
    cluster_noise: float = 0.25
    minority: float = 0.0               # share of users with a direction OUTSIDE the span
    minority_weight: float = 1.2
    noisy: float = 0.0                  # share of noisy labellers
    flip: tuple[float, float] = (0.2, 0.35)
    personal: float = 0.0               # full-rank individual deviation (norm relative to shared)
    decay: float = 0.0                  # embedding std of latent axis j ~ (j + 1) ** -decay
    mean_scale: float = 0.0             # norm of the common mean, in units of the largest std
    beta: float = 3.0                   # label sharpness
    seed: int = 0


ZOO: dict[str, Population] = {p.name: p for p in (
    Population("lowrank", "a shared preference plus a user-specific mix of two more directions",
               users=600, dim=64, pairs=(8, 40), rank=2, spread=0.8, noisy=0.05),
    Population("clusters", "five preference clusters around a shared direction; anisotropic, large-mean embeddings",
               users=700, dim=256, pairs=(4, 30), rank=4, clusters=5, spread=0.9, cluster_noise=0.25,
               decay=0.6, mean_scale=8.0, noisy=0.05),
    Population("few-users-many-pairs", "Reddit-TL;DR-like: 120 users, 120-400 pairs, 100 train pairs each, rank 3",
               users=120, dim=512, pairs=(120, 400), train_cap=100, rank=3, spread=0.6, noisy=0.15),
    Population("many-users-few-pairs", "PRISM-like: 1,300 users with 6-30 pairs each, rank 3",
               users=1300, dim=256, pairs=(6, 30), rank=3, spread=0.7, noisy=0.1),
    Population("noisy-minority", "25% noisy labellers and a 12% minority outside the span of the rest",
               users=800, dim=64, pairs=(10, 40), rank=2, spread=0.6, minority=0.12, noisy=0.25),
    Population("anisotropic-1024", "LLM-like embeddings: d=1024, decaying spectrum, a common mean 20x the largest std",
               users=500, dim=1024, pairs=(10, 40), rank=2, spread=0.8, decay=1.0, mean_scale=20.0, noisy=0.05),
    Population("homogeneous", "no user differences at all: personalization must not hurt",
               users=600, dim=128, pairs=(8, 40), rank=0, noisy=0.1),
    Population("individual", "full-rank individual deviations, no low-rank structure",
               users=600, dim=64, pairs=(10, 40), rank=0, personal=0.7, noisy=0.05),
)}


@dataclass
class Generated:
    """One population in memory: flat pairs (one row per pair) and the truth."""
    spec: Population
    user: np.ndarray            # (N,) int user index
    conv: np.ndarray            # (N,) int conversation index (global)
    is_test: np.ndarray         # (N,) bool
    chosen: np.ndarray          # (N, d) float32
    rejected: np.ndarray        # (N, d) float32
    v: np.ndarray               # (U, d) each user's true reward vector over the embedding
    oracle: np.ndarray          # (U,) accuracy of v_u on the user's test pairs (NaN without test pairs)
    span: np.ndarray            # (1 + rank, d): the true span of user variation, as features of e
    coef: np.ndarray            # (U, 1 + rank): each user's coefficients in that span
    prior_mean: np.ndarray      # (1 + rank,) the population's mean coefficient
    prior_cov: np.ndarray       # (1 + rank, 1 + rank) the population's coefficient covariance
    kind: np.ndarray = field(default_factory=lambda: np.zeros(0))  # (U,) 0 regular, 1 minority, 2 noisy

    @property
    def user_ids(self) -> np.ndarray:
        return np.array([f"{self.spec.name[:3]}{i:07d}" for i in range(self.spec.users)], dtype=object)


def _coefficients(p: Population, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, rank) coefficients along B, and the population's mean and covariance of them."""
    if p.rank == 0:
        return np.zeros((p.users, 0)), np.zeros(0), np.zeros((0, 0))
    if p.clusters:
        centres = rng.standard_normal((p.clusters, p.rank)) * p.spread
        which = rng.integers(p.clusters, size=p.users)
        a = centres[which] + p.cluster_noise * rng.standard_normal((p.users, p.rank))
        mean = centres.mean(0)
        cov = np.cov(centres.T, bias=True).reshape(p.rank, p.rank) + p.cluster_noise ** 2 * np.eye(p.rank)
        return a, mean, cov
    a = p.spread * rng.standard_normal((p.users, p.rank))
    return a, np.zeros(p.rank), p.spread ** 2 * np.eye(p.rank)


def generate(p: Population) -> Generated:
    rng = np.random.default_rng(p.seed)
    d = p.dim
    # latent preference directions: shared, B (rank), minority m -- orthonormal
    q, _ = np.linalg.qr(rng.standard_normal((d, p.rank + 2)))
    shared, basis, minority_dir = q[:, 0], q[:, 1:1 + p.rank].T, q[:, 1 + p.rank]
    a, mean_a, cov_a = _coefficients(p, rng)
    kind = np.zeros(p.users, dtype=np.int64)
    kind[rng.random(p.users) < p.minority] = 1
    w = shared[None, :] + a @ basis
    w[kind == 1] += p.minority_weight * minority_dir
    if p.personal > 0:
        w += p.personal * rng.standard_normal((p.users, d)) / np.sqrt(d)
    noisy = rng.random(p.users) < p.noisy
    kind[noisy & (kind == 0)] = 2
    flip = np.where(noisy, rng.uniform(*p.flip, p.users), 0.0)

    counts = rng.integers(p.pairs[0], p.pairs[1] + 1, size=p.users)
    user = np.repeat(np.arange(p.users), counts)
    n = len(user)
    first = np.r_[True, user[1:] != user[:-1]]
    conv = np.cumsum(first | (rng.random(n) < 0.5)) - 1          # conversations of 1-3ish pairs
    is_test = (rng.random(conv[-1] + 1) < p.test_share)[conv]
    if p.train_cap is not None:  # keep each user's first train_cap train pairs; the rest go to test
        train = ~is_test
        cum = np.cumsum(train)
        before = np.r_[0, cum][np.r_[0, np.cumsum(counts)[:-1]]]   # train rows before each user's block
        is_test = is_test | (cum - 1 - before[user] >= p.train_cap)

    z1 = rng.standard_normal((n, d))
    z2 = rng.standard_normal((n, d))
    margin = np.einsum("nd,nd->n", z1 - z2, w[user]) / np.sqrt(2.0)
    first_wins = rng.random(n) < 1.0 / (1.0 + np.exp(-p.beta * margin))
    first_wins ^= rng.random(n) < flip[user]
    # embeddings: e = mean + A z with A = Q diag(sigma); preferences live in z
    sigma = (np.arange(d) + 1.0) ** -p.decay
    qa, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a_mat = qa * sigma[None, :]
    mean = qa[:, 0] * p.mean_scale * sigma[0]
    e1 = (z1 @ a_mat.T + mean).astype(np.float32)
    e2 = (z2 @ a_mat.T + mean).astype(np.float32)
    chosen = np.where(first_wins[:, None], e1, e2)
    rejected = np.where(first_wins[:, None], e2, e1)
    # v_u over e: v . A z = w . z  <=>  v = A^{-T} w = Q diag(1/sigma) ... (A^{-T} = Q diag(1/sigma))
    to_e = qa / sigma[None, :]                        # (d, d): latent direction -> reward vector over e
    v = w @ to_e.T
    span_latent = np.vstack([shared[None, :], basis])  # (1 + rank, d)
    span = span_latent @ to_e.T / np.sqrt(2.0)          # features f = span . (e_c - e_r) = latent margin parts

    agree = (margin > 0) == first_wins
    test_n = np.bincount(user, weights=is_test, minlength=p.users)
    oracle = np.where(test_n > 0, np.bincount(user, weights=agree & is_test, minlength=p.users)
                      / np.maximum(test_n, 1), np.nan)
    coef = np.hstack([np.ones((p.users, 1)), a])
    prior_mean = np.r_[1.0, mean_a]
    prior_cov = np.zeros((1 + p.rank, 1 + p.rank))
    prior_cov[1:, 1:] = cov_a
    prior_cov[0, 0] = 1e-4  # the shared coefficient is 1 for everyone
    return Generated(p, user, conv, is_test, chosen, rejected, v.astype(np.float32), oracle, span.astype(np.float64),
                     coef, prior_mean, prior_cov, kind)


def variant(name: str, **changes) -> Population:
    """A zoo population with some knobs changed (e.g. fewer users for a quick run)."""
    return replace(ZOO[name], **changes)
