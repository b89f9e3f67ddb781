"""Adapt every user on its train pairs, score its test pairs; metrics, per-user table, plots.

    mrm evaluate --run runs/r1 --embeddings data/emb            # -> runs/r1/metrics.json

Every user, seen or unseen, adapts from the meta-learned theta_0 on its train
pairs (eval_inner_steps, the training inner lr; capped by seen/unseen_train_limit)
and is scored on its test pairs.  Alongside the contract's metrics
(seen / unseen / overall: users, pairs, accuracy, worst10_accuracy, std) it
reports a shared Bradley-Terry baseline fit on the same seen users' train
pairs, the few-shot curve (accuracy when adapting on 1, 2, 4, 8, 16 train
pairs) and, for synthetic populations, the oracle accuracy.

Next to the metrics file: per_user.parquet and PNG plots (learning curves,
per-user accuracy seen vs unseen, accuracy vs number of support pairs).

The table is streamed once into hash partitions of whole users
(mrm_ray.partition), then each partition is evaluated in memory: memory is
bounded by a partition, not by the population.
"""
from __future__ import annotations

import logging
import tempfile

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mrm_ray import contract as C
from mrm_ray import metrics as M
from mrm_ray import partition, runs, storage, synth, tasks
from mrm_ray.baselines import fit_shared_bt
from mrm_ray.errors import UserError
from mrm_ray.meta import adapt_and_score

log = logging.getLogger(__name__)
SHOTS = (1, 2, 4, 8, 16)
PER_USER = "per_user.parquet"


def require_test_pairs(embeddings: str) -> None:
    """One streamed pass over the split column: there must be something to score."""
    if C.SPLIT in storage.schema(embeddings).names:
        for batch in storage.iter_batches(embeddings, columns=[C.SPLIT]):
            if pc.any(pc.equal(batch.column(0), C.TEST)).as_py():
                return
    raise UserError(f"{embeddings} has no test pairs (split == 'test'): nothing to score")


def check_outputs(out: str, embeddings: str, overwrite: bool) -> None:
    """Before any work: the metrics file and the per-user table beside it may be replaced only when they are
    a previous evaluation and --overwrite is given; nothing goes inside the embeddings table."""
    per_user = storage.join(storage.parent(out), PER_USER)
    storage.check_overlap(out, [embeddings])
    storage.check_overlap(per_user, [embeddings])
    if storage.exists(out):
        try:
            previous = storage.read_json(out)
        except (storage.StorageError, ValueError, UnicodeDecodeError):
            previous = None
        if not (isinstance(previous, dict) and {"seen", "unseen", "overall"} <= previous.keys()):
            raise UserError(f"{out} exists and is not a metrics file of mrm evaluate; choose another --out")
        if not overwrite:
            raise UserError(f"{out} holds a previous evaluation; pass --overwrite to replace it, or choose another --out")
    storage.check_output(per_user, "evaluate", overwrite=True)
BT_MAX_PAIRS = 500_000  # the shared-BT baseline is fit on at most this many seen train pairs


def _load_part(uri: str) -> tasks.UserPairs | None:
    table = storage.read_table(uri)
    if table.num_rows == 0:
        return None
    return tasks.user_pairs_from_table(C.normalize_embeddings(table))


def evaluate(run: runs.Run, embeddings: str, out: str, shots=SHOTS, baseline: bool = True) -> dict:
    users = run.users()
    seen_ids = users.filter(pc.and_(users.column("seen"), pc.invert(users.column("skipped")))).column("user_id")
    seen_set = pa.array(seen_ids.to_numpy(zero_copy_only=False).astype(str))
    storage.check_table(embeddings)
    n_rows = partition.count_rows(embeddings)
    pair_ids = C.UniqueIds(C.PAIR_ID, "embeddings")

    def normalize(batch):
        table = C.normalize_embeddings(batch, dim=run.dim)
        pair_ids.add(table.column(C.PAIR_ID))
        return table
    with tempfile.TemporaryDirectory(prefix="mrm-eval-") as tmp:
        parts = partition.partition_by_user(embeddings, tmp, partition.n_parts_for(n_rows), normalize=normalize)
        pair_ids.check()
        v_bt = None
        if baseline:
            diffs, n = [], 0
            for p in parts:
                shard = _load_part(p)
                if shard is None or n >= BT_MAX_PAIRS:
                    continue
                seen = pc.is_in(pa.array(shard.user_ids.astype(str)), seen_set).to_numpy(zero_copy_only=False)
                rows = tasks.adaptation_rows(shard, seen, run.cfg) & seen[shard.pair_user()]
                diffs.append(shard.diff[torch.from_numpy(rows)][: BT_MAX_PAIRS - n])
                n += len(diffs[-1])
            v_bt = fit_shared_bt(torch.cat(diffs)) if n else None
        tables = [t for t in (_evaluate_part(run, p, seen_set, shots, v_bt) for p in parts) if t is not None]
    if not tables:
        raise UserError(f"{embeddings} has no rows to evaluate")
    per_user = pa.concat_tables(tables).sort_by(C.USER_ID)
    if int(pc.sum(per_user.column("test_pairs")).as_py() or 0) == 0:
        raise UserError(f"{embeddings} has no test pairs (split == 'test'): nothing to score")
    return _write_outputs(run, per_user, embeddings, out, shots)


@torch.no_grad()
def _evaluate_part(run, uri, seen_set, shots, v_bt) -> pa.Table | None:
    shard = _load_part(uri)
    if shard is None:
        return None
    cfg, head = run.cfg, run.head
    seen = pc.is_in(pa.array(shard.user_ids.astype(str)), seen_set).to_numpy(zero_copy_only=False)
    support = tasks.adaptation_rows(shard, seen, run.cfg)
    test = shard.is_test
    theta, correct, total, _ = adapt_and_score(head, shard, support, test, cfg, steps=cfg.eval_steps)
    # the population prior alone (no adaptation): what personalization has to beat
    _, c_prior, _, _ = adapt_and_score(head, shard, np.zeros_like(support), test, cfg, steps=cfg.eval_steps)
    pu = shard.pair_user()
    cols = {C.USER_ID: shard.user_ids.astype(str), "seen": seen,
            "train_pairs": np.bincount(pu, weights=support, minlength=shard.n_users).astype(np.int64),
            "test_pairs": total.numpy().astype(np.int64), "correct": correct.numpy().astype(np.int64),
            "accuracy": (correct / total.clamp(min=1)).numpy(),
            "prior_accuracy": (c_prior / total.clamp(min=1)).numpy()}
    if v_bt is not None:
        margin = shard.diff[torch.from_numpy(test)] @ v_bt
        c, n = M.per_user_correct(margin, torch.from_numpy(pu[test]), shard.n_users)
        cols["bt_accuracy"] = (c / n.clamp(min=1)).numpy()
    n_train = np.bincount(pu, weights=~test, minlength=shard.n_users)
    for k in shots:
        sup_k = tasks.cap_pairs(shard, k, cfg.seed, eligible=~test)
        _, c, n, _ = adapt_and_score(head, shard, sup_k, test, cfg, steps=cfg.eval_steps)
        acc = (c / n.clamp(min=1)).numpy()
        cols[f"acc_{k}_shot"] = np.where(n_train >= k, acc, np.nan)  # only users that have k train pairs
    table = pa.table(cols)
    return table.append_column(C.THETA, pa.FixedSizeListArray.from_arrays(
        pa.array(theta.numpy().reshape(-1).astype(np.float32)), theta.shape[1]))


def personalization(run, per_user: pa.Table) -> dict:
    """Does adaptation do anything?  Gain over the population prior, spread of the weights, head similarity."""
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    ok = (per_user.column("test_pairs").to_numpy() > 0) & ~seen
    acc = per_user.column("accuracy").to_numpy(zero_copy_only=False)[ok]
    prior = per_user.column("prior_accuracy").to_numpy(zero_copy_only=False)[ok]
    theta = np.asarray(per_user.column(C.THETA).to_pylist(), dtype=np.float64)
    w = run.head.weight().detach().double()
    wn = w / w.norm(dim=1, keepdim=True).clamp(min=1e-12)
    gain = M.paired(acc, prior)
    out = {"unseen_gain_over_prior": gain, "prior": _summaries(per_user, "prior_accuracy"),
           "weight_std": theta.std(0).tolist() if len(theta) else [], "head_cosine": (wn @ wn.T).tolist()}
    if gain is None or gain["ci95"][1] <= 0:
        out["warning"] = ("adaptation does not beat the population prior on unseen users: every user gets "
                          "(close to) the same reward")
    return out


def _summaries(per_user: pa.Table, column: str) -> dict:
    return M.report({"seen": per_user.column("seen").to_numpy(zero_copy_only=False),
                     "accuracy": per_user.column(column).to_numpy(zero_copy_only=False),
                     "test_pairs": per_user.column("test_pairs").to_numpy()})


def _write_outputs(run, per_user: pa.Table, embeddings: str, out: str, shots) -> dict:
    metrics = _summaries(per_user, "accuracy")
    seen = per_user.column("seen").to_numpy(zero_copy_only=False)
    has = per_user.column("test_pairs").to_numpy() > 0
    if "bt_accuracy" in per_user.column_names:
        metrics["baselines"] = {"shared_bt": _summaries(per_user, "bt_accuracy")}
    metrics["few_shot"] = M.few_shot(
        {k: per_user.column(f"acc_{k}_shot").to_numpy(zero_copy_only=False) for k in shots}, seen, has)
    truth = synth.read_truth(embeddings)
    if truth is not None:
        joined = per_user.select([C.USER_ID, "seen", "test_pairs"]).join(
            truth.select([C.USER_ID, "oracle_test_accuracy"]), C.USER_ID)
        metrics["oracle"] = _summaries(joined, "oracle_test_accuracy")
    metrics["personalization"] = personalization(run, per_user)
    metrics["run"] = run.uri
    metrics["eval_inner_steps"] = run.cfg.eval_steps
    out_dir = storage.parent(out)
    storage.write_table(per_user, storage.join(out_dir, PER_USER), "evaluate", overwrite=True)  # checked up front
    try:
        from mrm_ray import plots
        history = storage.read_json(storage.join(run.uri, runs.HISTORY)) if storage.exists(
            storage.join(run.uri, runs.HISTORY)) else []
        for name, png in plots.evaluation_plots(per_user, history, metrics, shots).items():
            storage.write_bytes(storage.join(out_dir, name), png)
    except ImportError:  # matplotlib is a dependency; a stripped install still gets its metrics
        log.warning("matplotlib missing: no plots")
    storage.write_json(out, metrics)  # last: its presence means the evaluation completed
    return metrics


def add_arguments(p) -> None:
    p.add_argument("--run", required=True, help="run directory written by mrm train")
    p.add_argument("--embeddings", required=True, help="embeddings table to evaluate (train pairs adapt, test pairs score)")
    p.add_argument("--out", help="metrics JSON file (default: <run>/metrics.json); per_user.parquet and plots go beside it")
    p.add_argument("--no-baseline", action="store_true", help="skip the shared Bradley-Terry baseline")
    p.add_argument("--overwrite", action="store_true", help="replace a previous evaluation at --out")


def _fmt(d: dict | None) -> str:
    if not d or d.get("accuracy") is None:
        return "   n/a"
    return f"{d['accuracy']:.4f} (worst10 {d['worst10_accuracy']:.4f}, {d['users']} users)"


def run(args) -> int:
    r = runs.load_run(args.run)
    out = args.out or storage.join(args.run, runs.METRICS)
    check_outputs(out, args.embeddings, args.overwrite)
    require_test_pairs(args.embeddings)
    m = evaluate(r, args.embeddings, out, baseline=not args.no_baseline)
    rows = [("MRM", m)]
    if "baselines" in m:
        rows.append(("shared BT", m["baselines"]["shared_bt"]))
    if "oracle" in m:
        rows.append(("oracle", m["oracle"]))
    for name, d in rows:
        print(f"{name:10s} seen {_fmt(d['seen'])}  unseen {_fmt(d['unseen'])}")
    p = m["personalization"]
    g = p["unseen_gain_over_prior"]
    if g is not None:
        print(f"personalization: {g['mean'] * 100:+.2f} points over the population prior on unseen users "
              f"(95% interval {g['ci95'][0] * 100:+.2f} to {g['ci95'][1] * 100:+.2f}); "
              f"spread of user weights {np.round(p['weight_std'], 3).tolist()}")
    if "warning" in p:
        log.warning("%s", p["warning"])
    print(f"metrics: {out}")
    return 0
