"""Quality on a zoo of structurally different populations: where MRM wins, where it does not.

    python benchmarks/quality.py                                   # the whole zoo, ~25 min on 2 cores
    python benchmarks/quality.py --populations lowrank,clusters    # some of it
    python benchmarks/quality.py --quick                           # a smaller zoo, a few minutes (smoke test)

Each population of mrm_ray.zoo (shared + low-rank variation, clusters, few users
with many pairs, many users with few, noisy labellers with a minority outside the
span, anisotropic large-mean embeddings at d=1024, no user differences at all,
full-rank individual differences) is written as an embeddings table and run
through `mrm compare`'s machinery (the real `mrm train` + `mrm evaluate` for every
MRM variant), so every method sees the same seen/unseen split, the same caps and
the same support pairs.  Methods:

  shared BT        one Bradley-Terry reward for everyone
  LoRe, PReF       low-rank baselines (mrm_ray.core.baselines)
  MRM ref.         the reference's recipe (--preset reddit: softmax mix, one Adam step)
  MRM 0.1.0        0.1.0's default (softmax mix, one SGD step, random start)
  MRM, no RPO      the default without the robust objective
  MRM (default)    `mrm train` as it ships
  in-span bound    each user's MAP fit inside the TRUE span of user variation, under the
                   true population prior: what a method that knew the basis could reach
  oracle           the users' true weights

Per population and method: unseen users' mean accuracy, their worst 10 %, accuracy
after adapting on 1, 4 and 16 support pairs, and the paired difference to the shared
reward over unseen users with a 95 % interval.  Model selection never sees the test
split.  Results: --out/quality.md and quality.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mrm_ray import compare, synth, zoo  # noqa: E402
from mrm_ray.core import splits  # noqa: E402
from mrm_ray.data import storage  # noqa: E402
from mrm_ray.data import contract as C  # noqa: E402
from mrm_ray.core import metrics as M  # noqa: E402
from mrm_ray.core.baselines import fit_users_newton  # noqa: E402
from mrm_ray.core.meta import single_thread  # noqa: E402

SHOTS = (1, 4, 16)
METHODS = [("shared_bt", "shared BT"), ("lore", "LoRe"), ("pref", "PReF"), ("mrm_ref", "MRM, reference preset"),
           ("mrm_v01", "MRM, 0.1.0 default"), ("mrm", "MRM, no RPO"), ("mrm_rpo", "**MRM (default)**"),
           ("bound", "in-span bound"), ("oracle", "oracle")]
QUICK = {"users": 300, "reference_epochs": 20}


def in_span_bound(embeddings: str, g: zoo.Generated, seed: int) -> dict[str, np.ndarray]:
    """Per-user accuracy of a MAP fit inside the true span, under the true prior (all train pairs, and k shots)."""
    shard = compare.load_population(embeddings)
    x = shard.diff.to(torch.float64) @ torch.from_numpy(g.span).T                 # features in the true span
    beta = g.spec.beta
    prec = torch.linalg.inv(torch.from_numpy(g.prior_cov) + 1e-6 * torch.eye(len(g.prior_mean))) / beta ** 2
    mu = torch.from_numpy(g.prior_mean) * beta
    seg, test = torch.from_numpy(shard.pair_user()), torch.from_numpy(shard.is_test)
    n_train = np.bincount(shard.pair_user(), weights=~shard.is_test, minlength=shard.n_users)

    def accuracy(support: np.ndarray) -> np.ndarray:
        s = torch.from_numpy(support)
        lam = fit_users_newton(x[s], seg[s], shard.n_users, mu, prec, iters=50)
        margin = (lam.index_select(0, seg[test]) * x[test]).sum(-1)
        c = np.bincount(seg[test].numpy(), weights=(margin > 0).numpy(), minlength=shard.n_users)
        n = np.bincount(seg[test].numpy(), minlength=shard.n_users)
        return np.where(n > 0, c / np.maximum(n, 1), np.nan)

    out = {"user_id": shard.user_ids.astype(str), "bound_accuracy": accuracy(~shard.is_test)}
    for k in compare.SHOTS:
        out[f"bound_acc_{k}_shot"] = np.where(n_train >= k, accuracy(
            splits.cap_pairs(shard, k, seed, eligible=~shard.is_test)), np.nan)
    return out


def summarize(per_user: pa.Table) -> dict:
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    ok = (per_user.column("test_pairs").to_numpy() > 0) & ~seen
    col = lambda name: per_user.column(name).to_numpy(zero_copy_only=False).astype(np.float64)[ok]  # noqa: E731
    base = col("shared_bt_accuracy")
    rows = {}
    for key, _ in METHODS:
        if f"{key}_accuracy" not in per_user.column_names:
            continue
        acc = col(f"{key}_accuracy")
        srt = np.sort(acc[~np.isnan(acc)])
        k10 = max(1, math.ceil(0.1 * len(srt)))
        rows[key] = {"unseen": float(np.nanmean(acc)), "worst10": float(srt[:k10].mean()),
                     **{f"at{k}": float(np.nanmean(col(f"{key}_acc_{k}_shot"))) for k in SHOTS},
                     "vs_shared": M.paired(acc, base), "users": int((~np.isnan(acc)).sum())}
    return rows


def run_population(name: str, args, workdir: Path) -> dict:
    t0 = time.time()
    size = {"users": QUICK["users"]} if args.quick else {}
    pop = str(workdir / name / "pop")
    g = synth.write_zoo_population(pop, name, overwrite=True, **size)
    out = str(workdir / name / "compare")
    report = compare.compare(
        pop, out, preset="default", questions=0, overwrite=True,
        methods=[k for k, _ in METHODS if k not in ("bound", "oracle")], reference_preset="reddit",
        reference_epochs=QUICK["reference_epochs"] if args.quick else args.reference_epochs)
    per_user = storage.read_table(storage.join(out, "per_user.parquet"))
    with single_thread():
        bound = pa.table(in_span_bound(pop, g, report["config"]["seed"]))
    per_user = per_user.join(bound, C.USER_ID).sort_by(C.USER_ID)
    rows = summarize(per_user)
    start = storage.read_json(storage.join(report["runs"]["mrm_rpo"], "start.json"))
    return {"name": name, "about": g.spec.about, "users": g.spec.users, "dim": g.spec.dim,
            "pairs": int(len(g.user)), "seconds": time.time() - t0, "methods": rows,
            "default_start": {k: start.get(k) for k in ("heads", "personalize", "ridge", "prior_scale")}}


def markdown(results: list[dict]) -> str:
    labels = dict(METHODS)
    lines = ["# MRM on the population zoo", "",
             "Unseen users. acc: mean per-user test accuracy; w10: the worst 10 % of users; @k: after adapting "
             "on k support pairs; vs shared: paired difference to the shared BT reward in points, with its 95 % "
             "interval.", ""]
    for r in results:
        lines += [f"## {r['name']}: {r['about']}", "",
                  f"{r['users']} users, {r['pairs']} pairs, d={r['dim']}. The default chose: "
                  f"{'K=' + str(r['default_start']['heads']) if r['default_start']['personalize'] else 'no personalization (the shared reward won cross-validation)'}.",
                  "", "| method | acc | w10 | @1 | @4 | @16 | vs shared |", "|---|---:|---:|---:|---:|---:|---:|"]
        for key, m in r["methods"].items():
            p = m["vs_shared"]
            cell = "" if key == "shared_bt" else f"{p['mean'] * 100:+.1f} [{p['ci95'][0] * 100:+.1f}, {p['ci95'][1] * 100:+.1f}]"
            lines.append(f"| {labels[key]} | {m['unseen']:.3f} | {m['worst10']:.3f} | {m['at1']:.3f} | "
                         f"{m['at4']:.3f} | {m['at16']:.3f} | {cell} |")
        lines.append("")
    lines += ["## Summary: unseen accuracy minus the shared reward (points)", "",
              "| population | " + " | ".join(labels[k] for k, _ in METHODS if k != "shared_bt") + " |",
              "|---|" + "---:|" * (len(METHODS) - 1)]
    for r in results:
        cells = []
        for key, _ in METHODS:
            if key == "shared_bt":
                continue
            m = r["methods"].get(key)
            cells.append("" if m is None else f"{m['vs_shared']['mean'] * 100:+.1f}")
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--populations", default="all", help="comma-separated names of mrm_ray.zoo, or 'all'")
    p.add_argument("--out", default="quality-report", help="where quality.md and quality.json go")
    p.add_argument("--workdir", help="populations and runs (default: <out>/work)")
    p.add_argument("--quick", action="store_true", help=f"smaller populations ({QUICK['users']} users) and "
                                                        f"{QUICK['reference_epochs']} reference epochs")
    p.add_argument("--reference-epochs", type=int, help="epochs of the reference preset (default: its 200)")
    args = p.parse_args()
    names = list(zoo.ZOO) if args.populations == "all" else args.populations.split(",")
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        p.error(f"unknown population(s): {', '.join(unknown)}; known: {', '.join(zoo.ZOO)}")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    out = Path(args.out)
    workdir = Path(args.workdir) if args.workdir else out / "work"
    os.makedirs(out, exist_ok=True)
    results = []
    for name in names:
        print(f"[quality] {name} ...", flush=True)
        results.append(run_population(name, args, workdir))
        r = results[-1]
        print(f"[quality] {name}: " + "  ".join(f"{k} {m['unseen']:.3f}" for k, m in r["methods"].items())
              + f"  ({r['seconds']:.0f}s)", flush=True)
        (out / "quality.json").write_text(json.dumps(results, indent=1))
        (out / "quality.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
