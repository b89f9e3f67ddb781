"""`mrm train --preset reddit` next to the reference code itself, on the same users.

    python benchmarks/reference_parity.py --reference-code ~/src/MRM --python ~/venvs/mrm-ref/bin/python
    python benchmarks/reference_parity.py ... --population clusters --users 400 --epochs 100

Needs a checkout of github.com/ModalityDance/MRM (not part of this project) and a
Python with its training requirements (torch, higher, transformers; `wandb`, which
it imports but does not use unless asked, is replaced by an empty module when
missing).  One run:

1. a population of mrm_ray.zoo is written twice: as our embeddings table (pair_id
   in file order, as `mrm prepare reddit --reference` writes it) and in the
   reference's input format (an embeddings .pt and the meta JSON; train/val splits);
2. the reference's train.py runs in REDDIT mode with scripts/train_on_reddit.sh's
   hyper-parameters (100 train pairs per seen user, 50 per unseen), --epochs of them;
   it saves its model every 10 epochs;
3. `mrm train --preset reddit` and `mrm evaluate` run on our table;
4. the reference's final model is evaluated by `mrm evaluate` too (its own protocol:
   one Adam step on the capped train pairs, accuracy on the test pairs), after
   checking that this reproduces the final-epoch figures the reference logged.

Printed: seen / unseen / overall accuracy of both, and the paired difference per
user (ours minus the reference) with a 95 % interval.  Both report their final
epoch: the reference's "best epoch" is chosen on the test split, which we do not copy.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from mrm_ray import cli, config, synth  # noqa: E402
from mrm_ray.data import runs, storage  # noqa: E402
from mrm_ray.data import contract as C  # noqa: E402
from mrm_ray.core import metrics as M  # noqa: E402

REDDIT_FLAGS = ["--dataset", "REDDIT", "--seen_train_limit", "100", "--unseen_train_limit", "50",
                "--hidden_layers", "2", "--inner_lr", "5e-3", "--meta_lr", "5e-3", "--train_inner_epochs", "1",
                "--eval_inner_epochs", "1", "--tasks_per_batch", "2", "--log_freq", "10", "--save_freq", "10",
                "--val_ratio", "0.9", "--score_threshold", "-1", "--rpo_ratio", "0.5", "--rpo_gamma", "0.5"]
NO_WANDB = "def init(*a, **k):\n    pass\n\ndef log(*a, **k):\n    pass\n"


def write_inputs(name: str, users: int | None, work: Path) -> tuple[str, Path, Path]:
    """Our table (pair ids in file order) and the reference's .pt + meta JSON of the same pairs."""
    emb_uri = str(work / "emb")
    g = synth.write_zoo_population(emb_uri, name, users=users)
    table = storage.read_table(emb_uri).sort_by(C.PAIR_ID)       # pair ids sort in file order
    # as `mrm prepare reddit`: only users with both train and test pairs (the reference needs both)
    uid = np.asarray(table.column(C.USER_ID).to_pylist())
    test = np.asarray(table.column(C.SPLIT).to_pylist()) == C.TEST
    both = set(uid[test]) & set(uid[~test])
    table = table.filter(pa.array(np.isin(uid, list(both))))
    storage.write_table(table, emb_uri + "-both")
    emb_uri += "-both"
    uid = np.asarray(table.column(C.USER_ID).to_pylist())
    ch, rj = C.emb_matrix(table.column(C.CHOSEN_EMB)), C.emb_matrix(table.column(C.REJECTED_EMB))
    emb = torch.from_numpy(np.stack([ch, rj], 1).reshape(-1, ch.shape[1]))      # rows 2k, 2k+1
    meta: dict[str, list] = {}
    for k, (u, split) in enumerate(zip(uid.tolist(), table.column(C.SPLIT).to_pylist())):
        meta.setdefault(u, []).append({"chosen_idx": 2 * k, "rejected_idx": 2 * k + 1,
                                       "split": "train" if split == C.TRAIN else "val"})
    torch.save(emb, work / "emb.pt")
    (work / "meta.json").write_text(json.dumps(meta))
    del g
    return emb_uri, work / "emb.pt", work / "meta.json"


def run_reference(code: Path, python: str, pt: Path, meta: Path, epochs: int, work: Path) -> tuple[Path, dict]:
    shim = work / "shim"
    shim.mkdir(exist_ok=True)
    if subprocess.run([python, "-c", "import wandb"], capture_output=True).returncode != 0:
        (shim / "wandb.py").write_text(NO_WANDB)
    out = work / "reference-out"
    cmd = [python, str(code / "train.py"), "--embed_pt", str(pt), "--meta_json", str(meta), "--input_dim",
           str(torch.load(pt).shape[1]), "--output_path", str(out), "--epochs", str(epochs), "--device", "cpu",
           *REDDIT_FLAGS]
    print("[parity] reference:", " ".join(cmd[1:3]), "...", flush=True)
    env = {"PYTHONPATH": f"{shim}:{code}", "PATH": "/usr/bin:/bin"}
    subprocess.run(cmd, cwd=code, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = next(out.rglob("training.log")).read_text()
    last = re.findall(r"\[Epoch (\d+)\].*Seen acc: ([\d.]+) \| Unseen acc: ([\d.]+) \| Overall acc: ([\d.]+)", log)[-1]
    ckpt = next(out.rglob(f"epoch_{epochs}.pt"))
    return ckpt, {"epoch": int(last[0]), "seen": float(last[1]), "unseen": float(last[2]), "overall": float(last[3])}


def as_run(ckpt: Path, ours: str, out: str, epochs: int) -> str:
    """The reference's checkpoint as a run directory (our split, the reddit preset's evaluation)."""
    cfg = config.load_config("reddit", overrides=[f"epochs={epochs}"])
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    head = runs.build_head(int(state["layers.0.weight"].shape[1]), cfg)
    head.load_state_dict({"layers.0": state["layers.0.weight"], "theta0": state["shared_weight"]})
    runs.save_config(out, cfg)
    runs.save_model(out, head, cfg)
    storage.write_table(storage.read_table(storage.join(ours, runs.USERS)), storage.join(out, runs.USERS))
    return out


def per_user(run: str) -> dict:
    t = storage.read_table(storage.join(run, "per_user.parquet"))
    return {u: (s, a) for u, s, a, n in zip(*(t.column(c).to_pylist() for c in
                                             (C.USER_ID, "seen", "accuracy", "test_pairs"))) if n > 0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reference-code", required=True, type=Path, help="a checkout of ModalityDance/MRM")
    p.add_argument("--python", default=sys.executable, help="a Python with the reference's requirements")
    p.add_argument("--population", default="lowrank", help="a population of mrm_ray.zoo")
    p.add_argument("--users", type=int, help="its number of users (default: the zoo's)")
    p.add_argument("--epochs", type=int, default=200, help="both runs (a multiple of 10: the reference saves every 10)")
    p.add_argument("--workdir", type=Path, help="default: a temporary folder")
    args = p.parse_args()
    if args.epochs % 10:
        p.error("--epochs must be a multiple of 10")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="mrm-parity-"))
    work.mkdir(parents=True, exist_ok=True)
    emb, pt, meta = write_inputs(args.population, args.users, work)
    ckpt, logged = run_reference(args.reference_code, args.python, pt, meta, args.epochs, work)
    ours = str(work / "ours")
    assert cli.main(["train", "--embeddings", emb, "--out", ours, "--local", "--preset", "reddit",
                     f"epochs={args.epochs}"]) == 0
    assert cli.main(["evaluate", "--run", ours, "--embeddings", emb, "--no-baseline"]) == 0
    theirs = as_run(ckpt, ours, str(work / "reference-run"), args.epochs)
    assert cli.main(["evaluate", "--run", theirs, "--embeddings", emb, "--no-baseline"]) == 0
    a, b = per_user(ours), per_user(theirs)
    rows = {}
    for split, want in (("seen", True), ("unseen", False), ("overall", None)):
        users = [u for u in a if want is None or a[u][0] == want]
        x, y = np.array([a[u][1] for u in users]), np.array([b[u][1] for u in users])
        rows[split] = {"ours": float(x.mean()), "reference": float(y.mean()), "paired": M.paired(x, y)}
    print(f"\n{args.population}: {len(a)} users, {args.epochs} epochs; the reference logged at its final epoch "
          f"{logged['epoch']}: seen {logged['seen']:.3f} unseen {logged['unseen']:.3f} overall {logged['overall']:.3f}")
    for split, r in rows.items():
        d = r["paired"]
        print(f"  {split:8s} ours {r['ours']:.4f}  reference {r['reference']:.4f}  paired {d['mean'] * 100:+.2f} points "
              f"[{d['ci95'][0] * 100:+.2f}, {d['ci95'][1] * 100:+.2f}]")
    agree = all(math.isclose(rows[s]["reference"], logged[s], abs_tol=6e-4) for s in ("seen", "unseen", "overall"))
    print(f"  our evaluation of the reference's model reproduces its logged figures: {agree}")
    (work / "parity.json").write_text(json.dumps({"logged": logged, "rows": rows, "agree": agree}, indent=1))


if __name__ == "__main__":
    main()
