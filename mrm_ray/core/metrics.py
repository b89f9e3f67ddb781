"""Per-user accuracy and the summary of contracts.md §3 (plain numpy/torch).

accuracy         mean over users of per-user test accuracy (ties are wrong)
worst10_accuracy mean accuracy of the 10% of users with the lowest accuracy (>= 1 user)
std              standard deviation of per-user accuracy (population std)
"""
from __future__ import annotations

import math

import numpy as np
import torch

from mrm_ray.core.adapt import segment_count, segment_sum


def per_user_correct(margin: torch.Tensor, seg: torch.Tensor, n_users: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct, total) test pairs per user; a tie (margin == 0) counts as wrong."""
    correct = segment_sum((margin > 0).to(torch.float64), seg, n_users)
    return correct, segment_count(seg, n_users, torch.float64)


def summarize(acc: np.ndarray, pairs: np.ndarray) -> dict:
    """Summary of per-user accuracies (users without test pairs must be removed first)."""
    acc = np.asarray(acc, dtype=np.float64)
    n = len(acc)
    if n == 0:
        return {"users": 0, "pairs": 0, "accuracy": None, "worst10_accuracy": None, "std": None}
    k = max(1, math.ceil(0.1 * n))
    return {"users": int(n), "pairs": int(np.sum(pairs)), "accuracy": float(acc.mean()),
            "worst10_accuracy": float(np.sort(acc)[:k].mean()), "std": float(acc.std())}


def report(per_user: dict[str, np.ndarray]) -> dict:
    """The metrics JSON from a per-user table with columns seen (bool), accuracy, test_pairs."""
    seen, acc, pairs = (np.asarray(per_user[k]) for k in ("seen", "accuracy", "test_pairs"))
    has = pairs > 0
    return {"seen": summarize(acc[has & seen], pairs[has & seen]),
            "unseen": summarize(acc[has & ~seen], pairs[has & ~seen]),
            "overall": summarize(acc[has], pairs[has])}


def paired(a: np.ndarray, b: np.ndarray) -> dict | None:
    """Mean of a - b over the entries where both exist, with a normal 95% interval (paired per user)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    d = d[~np.isnan(d)]
    if len(d) == 0:
        return None
    half = 1.96 * d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "ci95": [float(d.mean() - half), float(d.mean() + half)], "users": int(len(d))}


def few_shot(acc_by_k: dict[int, np.ndarray], seen: np.ndarray, has_test: np.ndarray) -> dict:
    """{"k": {seen, unseen, users}}: mean accuracy after adapting on k pairs.

    acc_by_k[k] is per-user accuracy, NaN for users with fewer than k train pairs.
    """
    out = {}
    for k, acc in acc_by_k.items():
        ok = has_test & ~np.isnan(acc)
        out[str(k)] = {"seen": float(acc[ok & seen].mean()) if (ok & seen).any() else None,
                       "unseen": float(acc[ok & ~seen].mean()) if (ok & ~seen).any() else None,
                       "users": int(ok.sum())}
    return out
