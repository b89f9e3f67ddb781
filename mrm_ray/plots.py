"""PNG plots of a run: learning curves, per-user accuracy, few-shot curve.

Each function returns PNG bytes so the caller can write them anywhere
(local path or s3://) through mrm_ray.data.storage.
"""
from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")  # headless: no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def learning_curves(history: list[dict]) -> bytes:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    epochs = [h["epoch"] for h in history]
    for ax, key, title in zip(axes, ("meta_loss", "val_accuracy", "val_loss", "rpo_weight_std"),
                              ("meta-training query loss", "validation accuracy", "validation loss",
                               "spread of RPO user weights (std)")):
        ax.plot(epochs, [h.get(key, np.nan) for h in history], marker="o", ms=3)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(fig)


def per_user_accuracy(acc_seen: np.ndarray, acc_unseen: np.ndarray, bt: tuple | None = None) -> bytes:
    fig, ax = plt.subplots(figsize=(6.5, 4))
    bins = np.linspace(0, 1, 21)
    ax.hist(acc_seen, bins=bins, alpha=0.55, label=f"seen (mean {np.mean(acc_seen):.3f})")
    ax.hist(acc_unseen, bins=bins, alpha=0.55, label=f"unseen (mean {np.mean(acc_unseen):.3f})")
    if bt is not None:
        ax.axvline(np.mean(bt[1]), color="k", ls="--", lw=1, label=f"shared BT, unseen mean {np.mean(bt[1]):.3f}")
    ax.set_xlabel("per-user test accuracy")
    ax.set_ylabel("users")
    ax.set_title("MRM: accuracy per user")
    ax.legend()
    return _png(fig)


def few_shot(curves: dict[str, dict[int, float]], title: str = "accuracy vs number of support pairs") -> bytes:
    """curves: label -> {shots: accuracy}."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, pts in curves.items():
        ks = sorted(k for k, v in pts.items() if v is not None)
        ax.plot(ks, [pts[k] for k in ks], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("support pairs per user")
    ax.set_ylabel("mean per-user test accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def evaluation_plots(per_user, history: list[dict], metrics: dict, shots) -> dict[str, bytes]:
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    has = per_user.column("test_pairs").to_numpy() > 0
    acc = per_user.column("accuracy").to_numpy(zero_copy_only=False)
    bt = None
    if "bt_accuracy" in per_user.column_names:
        b = per_user.column("bt_accuracy").to_numpy(zero_copy_only=False)
        bt = (b[has & seen], b[has & ~seen])
    out = {"per_user_accuracy.png": per_user_accuracy(acc[has & seen], acc[has & ~seen], bt)}
    fs = metrics["few_shot"]
    out["few_shot.png"] = few_shot({"MRM seen": {k: fs[str(k)]["seen"] for k in shots},
                                    "MRM unseen": {k: fs[str(k)]["unseen"] for k in shots}})
    if history:
        out["learning_curves.png"] = learning_curves(history)
    return out
