"""Per-user metrics (mrm_ray.core.metrics): known answers."""
import math

import numpy as np
import torch

from mrm_ray.core import metrics


# --- metrics ----------------------------------------------------------------------------
def test_summary_known_answer():
    acc = np.array([0.1, 0.5, 0.9, 1.0] + [0.8] * 16)
    s = metrics.summarize(acc, np.full(20, 10))
    assert s["users"] == 20 and s["pairs"] == 200
    assert math.isclose(s["accuracy"], acc.mean())
    assert math.isclose(s["worst10_accuracy"], (0.1 + 0.5) / 2)     # 10% of 20 users = 2
    assert math.isclose(s["std"], acc.std())
    assert metrics.summarize(np.array([0.3, 0.7]), np.array([1, 1]))["worst10_accuracy"] == 0.3  # >= 1 user


def test_ties_count_as_wrong():
    c, n = metrics.per_user_correct(torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([0, 0, 1, 1]), 2)
    assert c.tolist() == [1.0, 1.0] and n.tolist() == [2.0, 2.0]


def test_report_splits_users():
    rep = metrics.report({"seen": np.array([True, True, False]), "accuracy": np.array([1.0, 0.5, 0.25]),
                          "test_pairs": np.array([4, 2, 4])})
    assert rep["seen"]["accuracy"] == 0.75 and rep["unseen"]["accuracy"] == 0.25
    assert math.isclose(rep["overall"]["accuracy"], 1.75 / 3)        # user-weighted, not pair-weighted
