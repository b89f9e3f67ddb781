"""Is the validation carve held out?  `mrm train` with the default start (fit on the carve too) and with
`basis.use_carve=false` (the carve held out of the start as well as of meta-training).

    python benchmarks/carve.py                                  # the zoo (mrm_ray.zoo), ~4 min on 2 cores
    python benchmarks/carve.py --populations lowrank --text text,text-hard,text-order
                                                               # text populations: embedded with MiniLM first

For each population and setting: `mrm train` (one process) then `mrm evaluate`.  Printed: the accuracy the
carve read for the kept epoch and for the start (epoch 0), the seen users' test accuracy (the same users,
adapted on their train pairs: what the carve is meant to estimate), the unseen users', and the paired
difference on unseen users (held out minus default) with its 95 % interval.  The test split is only read
by `mrm evaluate`, as always.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from mrm_ray import config as config_mod  # noqa: E402
from mrm_ray.core.metrics import paired  # noqa: E402
from mrm_ray.data import runs, storage  # noqa: E402
from mrm_ray.synth_text import SCHEMES  # noqa: E402
from mrm_ray.zoo import ZOO  # noqa: E402

SETTINGS = (("default", "basis.use_carve=true"), ("held out", "basis.use_carve=false"))


def population(name: str, work: str) -> str:
    """The embeddings table of a zoo population, or of a text population embedded with the CPU default."""
    from mrm_ray.synth import synth, write_zoo_population

    if name in ZOO:
        write_zoo_population(work + "/emb", name, overwrite=True)
        return work + "/emb"
    from mrm_ray.backbone import default_cpu_model
    from mrm_ray.embed import embed

    synth(work + "/pairs", kind=name, users=200, pairs_per_user=16, seed=0, overwrite=True)
    embed(work + "/pairs", work + "/emb", model=default_cpu_model(), overwrite=True)
    return work + "/emb"


def measure(emb: str, work: str) -> dict:
    from mrm_ray.evaluate import evaluate
    from mrm_ray.train import train

    out = {}
    for name, override in SETTINGS:
        run = train(config_mod.load_config(overrides=[override]), emb, f"{work}/run-{name.replace(' ', '-')}",
                    local=True)
        metrics = evaluate(run, emb, overwrite=True)
        history = storage.read_json(storage.join(run.uri, runs.HISTORY))
        per_user = storage.read_table(storage.join(run.uri, runs.PER_USER)).to_pandas().set_index("user_id")
        out[name] = {"carve": run.info["best_val_accuracy"], "carve_start": history[0]["val_accuracy"],
                     "kept": run.info["best_epoch"], "seen": metrics["seen"]["accuracy"],
                     "unseen": metrics["unseen"]["accuracy"], "per_user": per_user}
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--populations", default="all", help="comma-separated zoo populations, 'all' or 'none'")
    p.add_argument("--text", default="", help=f"comma-separated text populations ({', '.join(SCHEMES)}), 200 users")
    p.add_argument("--workdir", default=None, help="where the tables and runs go (default: a temp folder)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    names = (list(ZOO) if args.populations == "all" else [] if args.populations == "none"
             else args.populations.split(","))
    names += [t for t in args.text.split(",") if t]
    work = args.workdir or tempfile.mkdtemp(prefix="mrm-carve-bench-")
    rows = []
    for name in names:
        r = measure(population(name, f"{work}/{name}"), f"{work}/{name}")
        a, b = r["held out"]["per_user"], r["default"]["per_user"]
        unseen = ~b["seen"]
        d = paired(a.loc[b.index[unseen], "accuracy"].to_numpy(), b.loc[unseen, "accuracy"].to_numpy())
        rows.append((name, r, d))
        print(f"{name}: done", flush=True)
    print(f"\n{'population':22s} {'setting':9s} {'carve (kept)':>12s} {'carve (start)':>13s} {'kept epoch':>10s} "
          f"{'seen test':>9s} {'unseen test':>11s}   held out - default (unseen)")
    for name, r, d in rows:
        for setting, _ in SETTINGS:
            m = r[setting]
            diff = (f"{100 * d['mean']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"
                    if setting == "held out" else "")
            print(f"{name:22s} {setting:9s} {m['carve']:12.3f} {m['carve_start']:13.3f} {m['kept']:10d} "
                  f"{m['seen']:9.3f} {m['unseen']:11.3f}   {diff}")


if __name__ == "__main__":
    main()
