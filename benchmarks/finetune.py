"""Does fine-tuning the backbone help UNSEEN users?  Frozen vs fine-tuned backbone, the rest of the chain the same.

    python benchmarks/finetune.py                       # the demo's text population, all-MiniLM-L6-v2 on CPU
    python benchmarks/finetune.py --kind text-hard      # relations the frozen encoder does not carry linearly
    python benchmarks/finetune.py --kind text-order     # attributes that only reorder the same sentences
    python benchmarks/finetune.py --users 400 top_layers=0 epochs=6
    python benchmarks/finetune.py --kind text-hard --pairs-per-user 48   # three times the signal per user
    python benchmarks/finetune.py --kind text-order --draws 3     # three draws of fine-tuning on the same split
    python benchmarks/finetune.py --kind text-hard --supervised   # could the trained blocks learn each attribute?

For each backbone: `mrm embed` -> `mrm train` (the defaults, one process) -> `mrm evaluate`; the fine-tuned
one is `mrm finetune` on the same pairs table first (seen users' train pairs only).  Prints unseen and seen
users' accuracy, the shared Bradley-Terry baseline, the paired difference over unseen users with its 95 %
interval, and how long fine-tuning took; then how linearly visible each response attribute is in each
backbone's embedding: a ridge probe fitted on half the users' responses, its accuracy on the other half's.

One fine-tuning run is one draw of its randomness (the head's start, the support halves, the step batches,
the dropout masks), and its figure moves by several points with it.  `--draws N` fine-tunes N times
(`draw=0..N-1`: the same split, carve and data) and adds the mean over the draws: each unseen user's
accuracy averaged over the draws, paired with the frozen backbone's.

`--supervised` asks instead whether the blocks `mrm finetune` trains COULD make each attribute visible: it
trains them (the config's `top_layers`, `lr`, `head_lr`, `max_length`; `batch_pairs` responses per AdamW
step, torch's default weight decay; the backbone's dropout on) with a linear head on the responses' true
0/1 attributes, on the same users' responses as the probe fits on, and prints the
held-out users' accuracy per attribute after every epoch.  An attribute this does not learn is out of reach
of fine-tuning from preferences, which see the attributes only through a few noisy pairs per user.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from mrm_ray import config as config_mod  # noqa: E402
from mrm_ray.core.metrics import paired  # noqa: E402
from mrm_ray.data import contract as C  # noqa: E402
from mrm_ray.data import runs, storage  # noqa: E402
from mrm_ray.synth_text import SCHEMES  # noqa: E402


def chain(pairs: str, work: str, model: str) -> tuple[dict, object]:
    from mrm_ray.embed import embed
    from mrm_ray.evaluate import evaluate
    from mrm_ray.train import train

    embed(pairs, work + "/emb", model=model, overwrite=True)
    run = train(config_mod.load_config(), work + "/emb", work + "/run", local=True)
    metrics = evaluate(run, work + "/emb", overwrite=True)
    return metrics, storage.read_table(storage.join(run.uri, runs.PER_USER)).to_pandas().set_index("user_id")


def probe(emb_uri: str, attributes: list[str]) -> list[float]:
    """Per attribute: accuracy of a linear (ridge) probe from a response's embedding to its 0/1 attribute,
    fitted on the responses of users with an even index, measured on the others' (chance is about 0.5)."""
    cols = [C.USER_ID, C.PAIR_ID, C.CHOSEN_EMB, C.REJECTED_EMB]
    emb = storage.read_table(emb_uri, columns=cols).to_pandas().set_index(C.PAIR_ID)
    truth = storage.read_table(storage.join(emb_uri, "_truth_pairs")).to_pandas().set_index(C.PAIR_ID)
    truth = truth.loc[emb.index]
    x = np.concatenate([np.stack(emb[C.CHOSEN_EMB].to_numpy()), np.stack(emb[C.REJECTED_EMB].to_numpy())])
    y = np.concatenate([np.stack(truth["chosen_attrs"].to_numpy()), np.stack(truth["rejected_attrs"].to_numpy())])
    user = np.tile(emb[C.USER_ID].str.slice(4).astype(int).to_numpy(), 2)
    x = np.hstack([x - x.mean(0), np.ones((len(x), 1))])
    fit, held = user % 2 == 0, user % 2 == 1
    w = np.linalg.solve(x[fit].T @ x[fit] + 1.0 * np.eye(x.shape[1]), x[fit].T @ (2.0 * y[fit] - 1))
    return [float(((x[held] @ w[:, j] > 0) == (y[held, j] > 0)).mean()) for j in range(len(attributes))]


def supervised(pairs: str, model: str, cfg, epochs: int, attributes: list[str]) -> None:
    """The --supervised diagnostic (module docstring): per epoch, held-out users' accuracy per attribute."""
    import torch
    import torch.nn.functional as F

    from mrm_ray.backbone import POOLING, PairEncoder, conversations, load_backbone
    from mrm_ray.core.finetune import select_trainable

    table = storage.read_table(pairs).to_pandas().set_index(C.PAIR_ID)
    truth = storage.read_table(storage.join(pairs, "_truth_pairs")).to_pandas().set_index(C.PAIR_ID).loc[table.index]
    prompts = list(table[C.PROMPT]) * 2
    responses = list(table[C.CHOSEN]) + list(table[C.REJECTED])
    y = torch.tensor(np.concatenate([np.stack(truth["chosen_attrs"].to_numpy()),
                                     np.stack(truth["rejected_attrs"].to_numpy())]), dtype=torch.float32)
    user = np.tile(table[C.USER_ID].str.slice(4).astype(int).to_numpy(), 2)
    fit, held = np.flatnonzero(user % 2 == 0), np.flatnonzero(user % 2 == 1)
    torch.manual_seed(cfg.seed)
    backbone, tok = load_backbone(model, device="cpu", dtype="float32")
    enc = PairEncoder(backbone, tok, max_length=cfg.max_length)
    trained = select_trainable(enc.base, cfg.top_layers)
    head = torch.nn.Linear(backbone.config.get_text_config().hidden_size, len(attributes))
    opt = torch.optim.AdamW([{"params": [p for p in enc.base.parameters() if p.requires_grad], "lr": cfg.lr},
                             {"params": head.parameters(), "lr": cfg.head_lr}])

    def logits(rows) -> torch.Tensor:
        ids, _ = enc.tokenize(conversations([prompts[i] for i in rows], [responses[i] for i in rows]))
        return head(POOLING[enc.pooling](*enc.hidden(ids)))

    def held_out() -> str:
        enc.base.eval()
        with torch.no_grad():
            z = torch.cat([logits(held[c:c + 128]) for c in range(0, len(held), 128)])
        enc.base.train()
        return " ".join(f"{float(((z[:, j] > 0) == (y[held, j] > 0)).float().mean()):14.3f}"
                        for j in range(len(attributes)))

    print(f"supervised: {trained:,} parameters (top_layers={cfg.top_layers}) and a linear head trained on the "
          f"true attributes of {len(fit)} responses (even users), accuracy on {len(held)} (odd users)")
    print(f"{'epoch':12s} " + " ".join(f"{a:>14s}" for a in attributes))
    print(f"{0:<12d} {held_out()}", flush=True)
    rng, t0 = np.random.default_rng(cfg.seed), time.time()
    enc.base.train()
    for epoch in range(epochs):
        order = rng.permutation(fit)
        for c in range(0, len(order), cfg.batch_pairs):
            rows = order[c:c + cfg.batch_pairs]
            loss = F.binary_cross_entropy_with_logits(logits(rows), y[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
        print(f"{epoch + 1:<12d} {held_out()}   ({time.time() - t0:.0f} s)", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--users", type=int, default=200, help="users of the text population")
    p.add_argument("--pairs-per-user", type=int, default=16,
                   help="pairs per user, half train and half test (16, as the demo)")
    p.add_argument("--kind", choices=tuple(SCHEMES), default="text",
                   help="the demo's text population; text-hard: attributes that are relations, not linear in the "
                        "frozen embedding; text-order: attributes that only reorder the same sentences")
    p.add_argument("--workdir", default=None, help="where the tables and runs go (default: a temp folder)")
    p.add_argument("--supervised", action="store_true",
                   help="instead: train the fine-tuned blocks on the responses' true attributes and print how "
                        "well each is learnt (module docstring)")
    p.add_argument("--supervised-epochs", type=int, default=3, help="epochs of --supervised")
    p.add_argument("--draws", type=int, default=1, help="fine-tune this many times (draw=0..N-1, the same split) "
                                                        "and add the mean over draws")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="mrm finetune config overrides")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from mrm_ray.backbone import default_cpu_model
    from mrm_ray.finetune import finetune, load_config
    from mrm_ray.synth import synth

    work = args.workdir or tempfile.mkdtemp(prefix="mrm-finetune-bench-")
    pairs = work + "/pairs"
    population = synth(pairs, kind=args.kind, users=args.users, pairs_per_user=args.pairs_per_user, seed=0,
                       overwrite=True)
    oracle = population["oracle_test_accuracy"]
    cfg = load_config(overrides=args.overrides)
    if args.supervised:
        attributes = storage.read_json(storage.join(pairs, "_truth.json"))["attributes"]
        return supervised(pairs, default_cpu_model(), cfg, args.supervised_epochs, attributes)
    # name -> (metrics, per-user table, kept epoch, folder suffix)
    results = {"frozen": chain(pairs, work + "/frozen", default_cpu_model()) + ("", "")}
    ft_seconds, epochs_run = [], 0
    for draw in range(args.draws):
        suffix = f"-draw{draw}" if draw else ""
        t0 = time.time()
        summary = finetune(pairs, work + "/ft" + suffix, "auto", dataclasses.replace(cfg, draw=cfg.draw + draw),
                           overwrite=True)
        ft_seconds.append(time.time() - t0)
        epochs_run = len(summary["history"])
        kept = max(h["epoch"] for h in summary["history"] if h["kept"])
        name = "fine-tuned" if args.draws == 1 else f"draw {cfg.draw + draw}"
        results[name] = chain(pairs, work + "/tuned" + suffix, work + "/ft" + suffix + "/model") + (kept, suffix)
    print(f"\n{args.kind} population: {args.users} users x {args.pairs_per_user} pairs (the users' true weights: "
          f"{oracle:.4f} on test pairs); fine-tuning: {epochs_run} epochs, top_layers={cfg.top_layers}, "
          f"{' + '.join(f'{t:.0f}' for t in ft_seconds)} s on {os.cpu_count()} CPU cores (Ray start-up included)")
    print(f"{'backbone':12s} {'unseen':>8s} {'seen':>8s} {'shared BT (unseen)':>20s} {'kept epoch':>11s}")
    for name, (m, _, kept, _) in results.items():
        bt = m.get("baselines", {}).get("shared_bt", {}).get("unseen", {}).get("accuracy")
        print(f"{name:12s} {m['unseen']['accuracy']:8.4f} {m['seen']['accuracy']:8.4f} {bt:20.4f} {kept:>11}")
    frozen = results["frozen"][1]
    unseen_ids = frozen.index[~frozen["seen"]]
    rows = [(k, v[1].loc[unseen_ids, "accuracy"].to_numpy()) for k, v in results.items() if k != "frozen"]
    if len(rows) > 1:
        rows.append((f"mean of {len(rows)} draws", np.mean([acc for _, acc in rows], axis=0)))
    for name, acc in rows:
        d = paired(acc, frozen.loc[unseen_ids, "accuracy"].to_numpy())
        print(f"unseen users, {name} - frozen: {100 * d['mean']:+.1f} points "
              f"[{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}] (95 %, paired over {d['users']} users)")
    attributes = storage.read_json(storage.join(pairs, "_truth.json"))["attributes"]
    print("linear probe accuracy per response attribute (held-out users; 0.5 = not visible):")
    print(f"{'backbone':12s} " + " ".join(f"{a:>14s}" for a in attributes))
    for name, (*_, suffix) in results.items():
        sub = "frozen" if name == "frozen" else "tuned" + suffix
        print(f"{name:12s} " + " ".join(f"{v:14.3f}" for v in probe(f"{work}/{sub}/emb", attributes)))


if __name__ == "__main__":
    main()
