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

The table is read once: one streamed pass validates it and writes whole users
into buckets (mrm_ray.data.shards, the loader training uses too), then each
bucket is evaluated in memory: memory is bounded by a bucket, not by the
population.
"""
from __future__ import annotations

import logging
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from mrm_ray.data import contract as C
from mrm_ray.core import metrics as M
from mrm_ray import synth
from mrm_ray.core import splits
from mrm_ray.data import runs, shards, storage
from mrm_ray.core.baselines import fit_shared_bt
from mrm_ray.errors import UserError
from mrm_ray.core.meta import adapt_and_score

log = logging.getLogger(__name__)
SHOTS = (1, 2, 4, 8, 16)


def check_outputs(out: str, embeddings: str, overwrite: bool) -> None:
    """Before any work: the metrics file and the per-user table beside it may be replaced only when they are
    a previous evaluation and --overwrite is given; nothing goes inside the embeddings table."""
    per_user = storage.join(storage.parent(out), runs.PER_USER)
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


def evaluate(run: runs.Run, embeddings: str, out: str | None = None, baseline: bool = True,
             overwrite: bool = False, shots=SHOTS) -> dict:
    """Evaluate `run` on `embeddings`; writes the metrics JSON `out` (default <run>/metrics.json), the
    per-user table and plots beside it, and returns the metrics."""
    embeddings, out = storage.absolute(embeddings), storage.absolute(out or storage.join(run.uri, runs.METRICS))
    check_outputs(out, embeddings, overwrite)
    storage.check_table(embeddings)
    runs.check_same_backbone({"the run": run.info.get("embeddings") or {}, embeddings: runs.provenance(embeddings)})
    users = run.users()
    seen_ids = users.filter(pc.and_(users.column("seen"), pc.invert(users.column("skipped")))).column("user_id")
    seen_set = pa.array(seen_ids.to_numpy(zero_copy_only=False).astype(str))
    n_rows = shards.count_rows(embeddings)
    n_buckets = shards.n_buckets_for(n_rows, row_bytes=2 * 4 * run.dim)
    pair_ids = C.UniqueIds(C.PAIR_ID, "embeddings")
    bt: list[torch.Tensor] = []   # the baseline's seen train pairs, gathered in the same pass
    state = {"rows": 0, "bt": 0, "test": 0, "t0": time.time(), "last": time.time()}

    def normalize(batch):
        table = C.normalize_embeddings(batch, dim=run.dim)
        pair_ids.add(table.column(C.PAIR_ID))
        is_test = pc.equal(table.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)
        state["test"] += int(is_test.sum())
        if baseline and state["bt"] < BT_MAX_PAIRS:
            rows = ~is_test & pc.is_in(table.column(C.USER_ID), seen_set).to_numpy(zero_copy_only=False)
            rows = np.flatnonzero(rows)[: BT_MAX_PAIRS - state["bt"]]
            if len(rows):
                sub = table.take(pa.array(rows))
                bt.append(torch.from_numpy(C.emb_matrix(sub.column(C.CHOSEN_EMB)) - C.emb_matrix(sub.column(C.REJECTED_EMB))))
                state["bt"] += len(rows)
        return table

    def progress(rows):
        state["rows"] += rows
        if time.time() - state["last"] >= 10:
            state["last"] = time.time()
            log.info("evaluate: %d/%d pairs validated and bucketed by user", state["rows"], n_rows)

    with tempfile.TemporaryDirectory(prefix="mrm-eval-") as tmp:
        # one pass: validate, gather the baseline's pairs, write whole users into buckets
        buckets = shards.write_buckets(embeddings, tmp, n_buckets, run.cfg.seed, normalize=normalize,
                                       progress=progress)
        pair_ids.check()
        if state["test"] == 0:
            raise UserError(f"{embeddings} has no test pairs (split == 'test'): nothing to score")
        v_bt = fit_shared_bt(torch.cat(bt)) if bt else None
        log.info("evaluate: %d pairs in %d bucket(s) of whole users (%.1fs); adapting and scoring", n_rows,
                 n_buckets, time.time() - state["t0"])
        tables = []
        for i, uri in enumerate(buckets):
            shard = shards.load([uri], run.cfg.seed, dtype=shards.shard_dtype(run.cfg.shard_dtype, run.dim))
            if shard.n_users:
                tables.append(_evaluate_part(run, shard, seen_set, shots, v_bt))
            if time.time() - state["last"] >= 10 or i + 1 == len(buckets):
                state["last"] = time.time()
                log.info("evaluate: %d/%d buckets done (%.1fs)", i + 1, len(buckets), time.time() - state["t0"])
    per_user = pa.concat_tables(tables).sort_by(C.USER_ID)
    return _write_outputs(run, per_user, embeddings, out, shots)


@torch.no_grad()
def _evaluate_part(run, shard: splits.UserPairs, seen_set, shots, v_bt) -> pa.Table:
    cfg, head = run.cfg, run.head
    seen = pc.is_in(pa.array(shard.user_ids.astype(str)), seen_set).to_numpy(zero_copy_only=False)
    support = splits.adaptation_rows(shard, seen, run.cfg)
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
        margin = shard.diff[torch.from_numpy(test)].to(v_bt.dtype) @ v_bt
        c, n = M.per_user_correct(margin, torch.from_numpy(pu[test]), shard.n_users)
        cols["bt_accuracy"] = (c / n.clamp(min=1)).numpy()
    n_train = np.bincount(pu, weights=~test, minlength=shard.n_users)
    for k in shots:
        sup_k = splits.cap_pairs(shard, k, cfg.seed, eligible=~test)
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
    storage.write_table(per_user, storage.join(out_dir, runs.PER_USER), "evaluate", overwrite=True)  # checked up front
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
