"""Bulk scoring: adapt every user of a population on its pairs, score its candidates (Ray).

    mrm score --run runs/r1 --support data/emb --candidates data/cands --out data/scored
    mrm score ... --support-split train        # adapt on split=train rows only
    mrm score ... --address auto               # on a running cluster

Inputs
  --run         a run directory of `mrm train` (W and the meta-learned theta_0)
  --support     an embeddings table: every row is one labelled pair of its user.  By
                default ALL rows are support (a user's whole feedback); with
                --support-split train only rows with split=train (absent split = train).
  --candidates  user_id, candidate_id, emb: the embedded responses to rank per user.

Outputs (committed together and atomically: `<out>/_SUCCESS` marks a complete result)
  <out>/scores/   user_id, candidate_id, reward (float32), prior (bool)
  <out>/weights/  user_id, theta (list<float32>[K]), n_support (int64), prior (bool)
  <out>/summary.json
Every user of either table gets a weights row; a user with no support pairs is
scored with theta_0 (the population prior) and flagged prior=True, not dropped.

How (two Ray stages, memory bounded by one unit of work, never by the population):
  1. route: Ray tasks over slices of the input files (row groups).  Each reads its
     embeddings ONCE and projects them onto the K base rewards (phi = W e; a support
     pair keeps only phi(chosen) - phi(rejected)), then writes the K floats per row
     into user buckets (mrm_ray.data.shards' user hash and bucket function, under the
     run's seed).  Because W is fixed when adapting, nothing after this needs the
     d-dimensional embeddings: the shuffle moves K floats per row, not the table.
  2. score: one Ray task per partition holds complete users, adapts all of them at
     once with the core's batched ragged `adapt` (eval_inner_steps of the run, its
     inner lr) and scores every candidate: reward = mixing(theta_u) . phi(e) =
     v_u . e.  Results go straight to Parquet part files.
The shuffle lives in the output's staging folder (reachable from every node, removed
at the end).  mrm_ray.core.personalize holds the math (plain torch) the Python API shares.
Throughput and memory at 1M users: benchmarks/score.py.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from mrm_ray.data import contract as C
from mrm_ray import raytools
from mrm_ray.data import runs, shards, storage
from mrm_ray.errors import UserError, unwrap
from mrm_ray.core.personalize import Personalizer

log = logging.getLogger(__name__)

SCORES, WEIGHTS, SUMMARY, SHUFFLE = "scores", "weights", "summary.json", "_shuffle"
PHI = "phi"                   # shuffle column: K base rewards (support: chosen - rejected)
SUPPORT_COLUMNS = (C.USER_ID, C.CHOSEN_EMB, C.REJECTED_EMB)
ROWS_PER_PART = 2_000_000     # shuffled rows per partition (ids + K floats each: ~100 MB in memory)
UNIT_BYTES = 256 << 20        # embedding bytes one route task reads (at most UNIT_ROWS rows)
UNIT_ROWS = 1_000_000
BATCH_BYTES = 64 << 20        # embedding bytes in memory at once inside a route task
MODEL_SHA = b"mrm.model_sha256"  # Parquet metadata key: which run's model produced a weights table


def weights_schema(k: int) -> pa.Schema:
    return pa.schema([pa.field(C.USER_ID, pa.string()), pa.field(C.THETA, pa.list_(pa.float32(), k)),
                      pa.field(C.N_SUPPORT, pa.int64()), pa.field(C.PRIOR, pa.bool_())])


# --- reading the inputs ------------------------------------------------------------
def _emb_dim(uri: str, column: str, what: str) -> int | None:
    """The embedding dimension of a table column, from its schema (or its first row)."""
    schema = storage.schema(uri)
    t = schema.field(column).type
    if isinstance(t, pa.ExtensionType) and hasattr(t, "shape"):  # Ray Data's tensor column
        return int(t.shape[-1])
    if pa.types.is_fixed_size_list(t):
        return t.list_size
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        for batch in storage.iter_batches(uri, columns=[column], batch_rows=1):
            if batch.num_rows:
                return len(batch.column(0)[0])
        return None
    raise C.ContractError(f"{what} column {column!r} must be a list of floats, got {t}")


def check_inputs(run: runs.Run, support: str, candidates: str) -> dict:
    """Everything a user can get wrong about the inputs, checked before any work; one line each."""
    sup_schema, cand_schema = storage.check_table(support), storage.check_table(candidates)
    C.require_columns(sup_schema, SUPPORT_COLUMNS, "support (embeddings)")
    C.require_columns(cand_schema, C.CANDIDATES_REQUIRED, "candidates")
    runs.check_same_backbone({"the run": run.info.get("embeddings") or {}, "support": runs.provenance(support),
                              "candidates": runs.provenance(candidates)})
    dims = {"run": run.dim}
    for name, uri, cols in (("support", support, (C.CHOSEN_EMB, C.REJECTED_EMB)), ("candidates", candidates, (C.EMB,))):
        for col in cols:
            d = _emb_dim(uri, col, name)
            if d is not None:
                dims[f"{name} {col}"] = d
    if len(set(dims.values())) > 1:
        raise UserError("embedding dimension mismatch: " + ", ".join(f"{k} has d={v}" for k, v in dims.items())
                        + f" (run {run.uri}, support {support}, candidates {candidates})")
    for name, uri in (("support", support), ("candidates", candidates)):
        if storage.dataset(uri).count_rows() == 0:   # footers only
            raise UserError(f"{name} table {uri} has no rows")
    if C.PAIR_ID in sup_schema.names:   # a pair listed twice would count twice in its user's support
        ids = C.UniqueIds(C.PAIR_ID, "support (embeddings)")
        for batch in storage.iter_batches(support, columns=[C.PAIR_ID]):
            if batch.column(0).null_count:
                raise C.ContractError(f"support (embeddings) column 'pair_id' has {batch.column(0).null_count} "
                                      f"null value(s)")
            ids.add(batch.column(0))
        ids.check()
    return {"support_split_column": C.SPLIT in sup_schema.names}


@dataclass
class Unit:
    """One route task: some row groups of one Parquet file."""
    kind: str            # "support" or "candidates"
    table: str           # the table's URI (for its filesystem)
    path: str
    row_groups: list[int]
    rows: int


def plan_units(kind: str, uri: str, row_bytes: int) -> list[Unit]:
    fs, _ = storage.resolve(uri)
    per_unit = max(1, min(UNIT_ROWS, UNIT_BYTES // row_bytes))
    units = []
    for path in storage.parquet_files(uri):
        meta = pq.ParquetFile(path, filesystem=fs).metadata
        groups, rows = [], 0
        for g in range(meta.num_row_groups):
            n = meta.row_group(g).num_rows
            if groups and rows + n > per_unit:
                units.append(Unit(kind, uri, path, groups, rows))
                groups, rows = [], 0
            groups.append(g)
            rows += n
        if groups:
            units.append(Unit(kind, uri, path, groups, rows))
    return units


def _user_ids(table, what: str) -> pa.Array:
    col = table.column(C.USER_ID)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    if col.null_count:
        raise C.ContractError(f"{what} column 'user_id' has {col.null_count} null value(s)")
    return col


def user_bucket(user_ids: pa.Array, n_parts: int, seed: int) -> np.ndarray:
    """The user bucket of each row (mrm_ray.data.shards' hash and bucket function), hashing each id once."""
    uniq = pc.unique(user_ids)
    b = shards.bucket_of(shards.user_hash(uniq.to_numpy(zero_copy_only=False), seed), n_parts)
    return b[pc.index_in(user_ids, value_set=uniq).to_numpy(zero_copy_only=False)]


def route_unit(unit: Unit, j: int, personalizer: Personalizer, n_parts: int, shuffle: str, train_only: bool,
               seed: int) -> dict:
    """Stage 1 (a Ray task): read one unit, project onto the K base rewards, split by user hash."""
    torch.set_num_threads(1)  # one task per CPU
    fs, _ = storage.resolve(unit.table)
    support = unit.kind == "support"
    pfile = pq.ParquetFile(unit.path, filesystem=fs)
    cols = list(SUPPORT_COLUMNS) if support else list(C.CANDIDATES_REQUIRED)
    if support and C.SPLIT in pfile.schema_arrow.names:
        cols.append(C.SPLIT)
    row_bytes = (2 if support else 1) * personalizer.dim * 4
    what = "support (embeddings)" if support else "candidates"
    pieces: list[pa.Table] = []
    for batch in pfile.iter_batches(batch_size=max(1, min(65536, BATCH_BYTES // row_bytes)),
                                    row_groups=unit.row_groups, columns=cols):
        if C.SPLIT in cols:  # absent or null split = train
            C.check_split(batch, what)
            if train_only:
                batch = batch.filter(pc.invert(pc.fill_null(pc.equal(batch.column(C.SPLIT), C.TEST), False)))
        if batch.num_rows == 0:
            continue
        if support:   # support rows need no pair ids here (checked once, up front, where present)
            ids = _user_ids(batch, what)
            mats = [C.emb_matrix(batch.column(c), what, c) for c in (C.CHOSEN_EMB, C.REJECTED_EMB)]
            for c, m in zip((C.CHOSEN_EMB, C.REJECTED_EMB), mats):
                C.check_values(batch, m, c, what)
            phi, extra = personalizer.project(mats[0]) - personalizer.project(mats[1]), {}
        else:
            t = C.normalize_candidates(batch, what, dim=personalizer.dim)
            ids, phi = t.column(C.USER_ID).combine_chunks(), personalizer.project(C.emb_matrix(t.column(C.EMB)))
            extra = {C.CANDIDATE_ID: t.column(C.CANDIDATE_ID).combine_chunks()}
        k = phi.shape[1]
        pieces.append(pa.table({C.USER_ID: ids, **extra,
                                PHI: pa.FixedSizeListArray.from_arrays(pa.array(phi.numpy().reshape(-1)), k)}))
    rows = sum(p.num_rows for p in pieces)
    if rows:
        table = pa.concat_tables(pieces)
        part = user_bucket(table.column(C.USER_ID), n_parts, seed)
        order = np.argsort(part, kind="stable")
        bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
        sfs, spath = storage.resolve(shuffle)
        for i in np.flatnonzero(np.diff(bounds)):
            d = f"{spath}/{unit.kind}/p{i:05d}"
            sfs.create_dir(d, recursive=True)
            pq.write_table(table.take(pa.array(order[bounds[i]:bounds[i + 1]])), f"{d}/u{j:06d}.parquet",
                           filesystem=sfs)
    return {"kind": unit.kind, "rows_in": unit.rows, "rows": rows}


def _read_part(shuffle: str, kind: str, i: int) -> pa.Table | None:
    fs, base = storage.resolve(shuffle)
    infos = fs.get_file_info(pafs.FileSelector(f"{base}/{kind}/p{i:05d}", allow_not_found=True))
    files = sorted(f.path for f in infos if f.type == pafs.FileType.File and f.path.endswith(".parquet"))
    if not files:
        return None
    return pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files])


def _phi(table: pa.Table | None, k: int) -> torch.Tensor:
    if table is None or table.num_rows == 0:
        return torch.zeros(0, k)
    return torch.from_numpy(C.emb_matrix(table.column(PHI)).copy())


def score_partition(i: int, personalizer: Personalizer, shuffle: str, staging: str, fingerprint: str) -> dict:
    """Stage 2 (a Ray task): adapt every user of partition i at once, score its candidates, write parts."""
    torch.set_num_threads(1)
    k = int(personalizer.theta0.shape[0])
    sup, cand = _read_part(shuffle, "support", i), _read_part(shuffle, "candidates", i)
    ids = [t.column(C.USER_ID) for t in (sup, cand) if t is not None]
    users = pc.unique(pa.chunked_array([c for col in ids for c in col.chunks], pa.string()))
    users = users.take(pc.sort_indices(users))
    sseg = (torch.from_numpy(pc.index_in(sup.column(C.USER_ID), value_set=users).to_numpy(zero_copy_only=False)
                             .astype(np.int64)) if sup is not None else torch.zeros(0, dtype=torch.long))
    theta, n_support = personalizer.adapt(_phi(sup, k), sseg, len(users))
    prior = (n_support == 0).numpy()
    fs, base = storage.resolve(staging)
    for name in (SCORES, WEIGHTS):
        fs.create_dir(f"{base}/{name}", recursive=True)
    wschema = weights_schema(k).with_metadata({MODEL_SHA: fingerprint.encode()})
    weights = pa.table({C.USER_ID: users,
                        C.THETA: pa.FixedSizeListArray.from_arrays(pa.array(theta.numpy().reshape(-1)), k),
                        C.N_SUPPORT: pa.array(n_support.numpy()), C.PRIOR: pa.array(prior)}, schema=wschema)
    pq.write_table(weights, f"{base}/{WEIGHTS}/part-{i:05d}.parquet", filesystem=fs)
    n_cand = n_prior_cand = 0
    if cand is not None and cand.num_rows:
        cseg_np = pc.index_in(cand.column(C.USER_ID), value_set=users).to_numpy(zero_copy_only=False).astype(np.int64)
        order = np.argsort(cseg_np, kind="stable")  # users in id order, candidates in input order
        cseg = torch.from_numpy(cseg_np[order])
        reward = personalizer.rewards(theta, _phi(cand, k)[torch.from_numpy(order)], cseg)
        cprior = prior[cseg_np[order]]
        scores = pa.table({C.USER_ID: cand.column(C.USER_ID).take(pa.array(order)),
                           C.CANDIDATE_ID: cand.column(C.CANDIDATE_ID).take(pa.array(order)),
                           C.REWARD: pa.array(reward.numpy().astype(np.float32)), C.PRIOR: pa.array(cprior)},
                          schema=C.SCORES_SCHEMA)
        n_cand, n_prior_cand = scores.num_rows, int(cprior.sum())
    else:
        scores = C.SCORES_SCHEMA.empty_table()
    pq.write_table(scores, f"{base}/{SCORES}/part-{i:05d}.parquet", filesystem=fs)
    return {"users": len(users), "prior_users": int(prior.sum()), "support_pairs": int(len(sseg)),
            "candidates_scored": n_cand, "prior_candidates": n_prior_cand}


# --- the driver -------------------------------------------------------------------
def _gather(ray, refs: list, what: str, every: float = 10.0) -> list:
    """ray.get with progress lines and one-line errors; cancels the rest on a failure."""
    out, pending, t0, last = {}, list(refs), time.time(), time.time()
    index = {r: n for n, r in enumerate(refs)}
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=min(every, 2.0))
            for r in done:
                out[index[r]] = ray.get(r)
            if time.time() - last >= every or not pending:
                last = time.time()
                log.info("%s: %d/%d tasks done (%.0fs)", what, len(out), len(refs), last - t0)
    except ray.exceptions.RayTaskError as e:
        for r in pending:
            ray.cancel(r, force=True)
        raise unwrap(e) from None
    return [out[n] for n in range(len(refs))]


def score(run: runs.Run, support: str, candidates: str, out: str, support_split: str = "all",
          partitions: int = 0, steps: int | None = None, overwrite: bool = False, address: str | None = None) -> dict:
    """Score a population; returns the summary also written to <out>/summary.json.

    partitions 0: one user bucket per ROWS_PER_PART input rows.  steps None: the run's eval_inner_steps.
    """
    support, candidates, out = (storage.absolute(u) for u in (support, candidates, out))
    if steps is not None and steps < 1:
        raise UserError("--steps must be >= 1")
    if partitions < 0:
        raise UserError("--partitions must be >= 0")
    if support_split not in ("all", "train"):
        raise UserError("--support-split must be all or train")
    storage.check_output(out, "score", [run.uri, support, candidates], overwrite)
    check_inputs(run, support, candidates)   # before starting Ray
    raytools.ensure_ray(address)
    raytools.require_resources([{"CPU": 1}], "mrm score's tasks (1 CPU each)")
    return _score(run, support, candidates, out, support_split, partitions, steps, overwrite)


def _score(run: runs.Run, support: str, candidates: str, out: str, support_split: str, partitions: int,
           steps: int | None, overwrite: bool) -> dict:
    """score() after its checks."""
    import ray

    t0 = time.time()
    inputs = [run.uri, support, candidates]
    personalizer = Personalizer.from_run(run, steps)
    fingerprint = run.model_sha256
    d = run.dim
    units = plan_units("support", support, 2 * d * 4) + plan_units("candidates", candidates, d * 4)
    total_rows = sum(u.rows for u in units)
    n_parts = partitions or max(1, math.ceil(total_rows / ROWS_PER_PART))
    log.info("scoring with %s: %d input rows in %d route tasks -> %d user partitions (inner: %s, %d step(s))",
             run.uri, total_rows, len(units), n_parts, personalizer.inner.optimizer, personalizer.inner.steps)
    route = ray.remote(num_cpus=1, max_retries=2)(route_unit)
    score_part = ray.remote(num_cpus=1, max_retries=2)(score_partition)
    with storage.atomic_output(out, "score", inputs, overwrite) as staging:
        shuffle = storage.join(staging, SHUFFLE)
        personalizer_ref = ray.put(personalizer)
        routed = _gather(ray, [route.remote(u, j, personalizer_ref, n_parts, shuffle, support_split == "train",
                                            run.cfg.seed)
                               for j, u in enumerate(units)], "route (read + project + partition by user)")
        t_route = time.time() - t0
        parts = _gather(ray, [score_part.remote(i, personalizer_ref, shuffle, staging, fingerprint) for i in range(n_parts)],
                        "score (adapt + score each partition)")
        storage.delete(shuffle)
        summary = {k: sum(p[k] for p in parts) for k in parts[0]}
        summary.update({
            "run": run.uri, "support": support, "candidates": candidates, "support_split": support_split,
            "support_rows_read": sum(r["rows_in"] for r in routed if r["kind"] == "support"),
            "inner_steps": personalizer.inner.steps, "partitions": n_parts, "model_sha256": fingerprint,
            "seconds": round(time.time() - t0, 3), "route_seconds": round(t_route, 3)})
        storage.write_json(storage.join(staging, SUMMARY), summary)
    return summary
