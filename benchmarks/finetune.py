"""Does fine-tuning the backbone help UNSEEN users?  Frozen vs fine-tuned backbone, the rest of the chain the same.

    python benchmarks/finetune.py                       # the demo's text population, all-MiniLM-L6-v2 on CPU
    python benchmarks/finetune.py --users 400 top_layers=0 epochs=6

For each backbone: `mrm embed` -> `mrm train` (the defaults, one process) -> `mrm evaluate`; the fine-tuned
one is `mrm finetune` on the same pairs table first (seen users' train pairs only).  Prints unseen and seen
users' accuracy, the shared Bradley-Terry baseline, the paired difference over unseen users with its 95 %
interval, and how long fine-tuning took.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from mrm_ray import config as config_mod  # noqa: E402
from mrm_ray.core.metrics import paired  # noqa: E402
from mrm_ray.data import runs, storage  # noqa: E402


def chain(pairs: str, work: str, model: str) -> tuple[dict, object]:
    from mrm_ray.embed import embed
    from mrm_ray.evaluate import evaluate
    from mrm_ray.train import train

    embed(pairs, work + "/emb", model=model, overwrite=True)
    run = train(config_mod.load_config(), work + "/emb", work + "/run", local=True)
    metrics = evaluate(run, work + "/emb", overwrite=True)
    return metrics, storage.read_table(storage.join(run.uri, runs.PER_USER)).to_pandas().set_index("user_id")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=200, help="users of the text population (16 pairs each, as the demo)")
    p.add_argument("--workdir", default=None, help="where the tables and runs go (default: a temp folder)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="mrm finetune config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from mrm_ray.backbone import default_cpu_model
    from mrm_ray.finetune import finetune, load_config
    from mrm_ray.synth import synth

    work = args.workdir or tempfile.mkdtemp(prefix="mrm-finetune-bench-")
    pairs = work + "/pairs"
    synth(pairs, kind="text", users=args.users, pairs_per_user=16, seed=0, overwrite=True)
    cfg = load_config(overrides=args.overrides)
    t0 = time.time()
    summary = finetune(pairs, work + "/ft", "auto", cfg, overwrite=True)
    ft_seconds = time.time() - t0
    results = {"frozen": chain(pairs, work + "/frozen", default_cpu_model()),
               "fine-tuned": chain(pairs, work + "/tuned", work + "/ft/model")}
    print(f"\ntext population: {args.users} users x 16 pairs; fine-tuning: {len(summary['history'])} epochs, "
          f"top_layers={cfg.top_layers}, {ft_seconds:.0f} s on {os.cpu_count()} CPU cores (Ray start-up included)")
    print(f"{'backbone':12s} {'unseen':>8s} {'seen':>8s} {'shared BT (unseen)':>20s}")
    for name, (m, _) in results.items():
        bt = m.get("baselines", {}).get("shared_bt", {}).get("unseen", {}).get("accuracy")
        print(f"{name:12s} {m['unseen']['accuracy']:8.4f} {m['seen']['accuracy']:8.4f} {bt:20.4f}")
    a, b = (results[k][1] for k in ("fine-tuned", "frozen"))
    unseen = ~a["seen"]
    d = paired(a.loc[unseen, "accuracy"].to_numpy(), b.loc[a.index[unseen], "accuracy"].to_numpy())
    print(f"unseen users, fine-tuned - frozen: {100 * d['mean']:+.1f} points "
          f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (95 %, paired over {d['users']} users)")


if __name__ == "__main__":
    main()
