"""`mrm score`: the Ray pipeline equals a plain per-user reference loop.

The reference adapts ONE user at a time with a fresh torch optimizer on its own
pairs (as the MRM README's `adapt_single_user`), or finds its posterior mode by
L-BFGS (Newton adaptation, the default), then scores each candidate as
v_u . e with v_u = s W^T mixing(theta_u), all in float64.  The pipeline routes
projected rows into hash partitions, adapts thousands of users per call and
scores through the K base rewards; it must agree.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from reference_loops import adapt_one_user, user_vector

from mrm_ray import api, cli, config, synth
from mrm_ray import score as S
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage

DIM, K = 16, 3


def make_run(uri: str, dim: int = DIM, overrides=(), seed: int = 0, lrs=None) -> str:
    """A run directory with a random head (K=3, O(1) rewards): no training needed to test scoring."""
    cfg = config.load_config(overrides=[f"model.n_heads={K}", "model.auto_input_scale=false",
                                        "model.input_scale=0.2", f"seed={seed}", *overrides])
    head = runs.build_head(dim, cfg)
    with torch.no_grad():
        torch.manual_seed(seed)
        head.layers[0].normal_()
        head.theta0.copy_(torch.tensor([0.4, -0.3, 0.1]))
        if lrs is not None:
            head.log_inner_lr.copy_(torch.tensor(lrs).log())
    runs.save_config(uri, cfg)
    runs.save_model(uri, head, cfg)
    return uri


def candidates_table(users, per_user: int, dim: int = DIM, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    uid = np.repeat(np.asarray(users, dtype=object), per_user).astype(str)
    emb = rng.standard_normal((len(uid), dim)).astype(np.float32)
    return pa.table({C.USER_ID: uid, C.CANDIDATE_ID: [f"{u}/c{i % per_user}" for i, u in enumerate(uid)],
                     C.EMB: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), dim)})


def write_candidates(uri: str, tables: list[pa.Table]) -> str:
    """Several part files with small row groups: several route tasks per table."""
    with storage.atomic_output(uri) as staging:
        fs, path = storage.resolve(staging)
        for i, t in enumerate(tables):
            pq.write_table(t, f"{path}/part-{i:05d}.parquet", filesystem=fs, row_group_size=40)
    return uri


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    """40 users with pairs; candidates for 30 of them plus 5 users that have no pairs at all."""
    root = tmp_path_factory.mktemp("score")
    support = str(root / "support")
    synth.write_embedding_population(support, users=40, pairs_per_user=6, dim=DIM, seed=1, chunk_users=15)
    support_users = [f"u{i:08d}" for i in range(40)]
    cands = write_candidates(str(root / "cands"), [candidates_table(support_users[:18], 4, seed=2),
                                                   candidates_table(support_users[18:30] + [f"new-{i}" for i in range(5)],
                                                                    3, seed=3)])
    return {"root": root, "support": support, "candidates": cands,
            "sgd_run": make_run(str(root / "run_sgd"), overrides=["inner.optimizer=sgd", "inner.lr=2.0",
                                                                  "inner.steps=1", "eval_inner_steps=2"])}


# --- the plain per-user reference ---------------------------------------------------
def reference_scores(run_uri: str, support: str, candidates: str, train_only: bool = False):
    """{user: theta} and {(user, candidate): reward}: one user at a time, torch.optim, float64."""
    run = runs.load_run(run_uri)
    cfg, head = run.cfg, run.head
    w = head.weight().detach().double()                        # (K, d), input scale folded in
    lrs = (head.log_inner_lr.detach().exp().double().tolist() if head.log_inner_lr is not None
           else [cfg.inner.lr] * K)
    sup = storage.read_table(support)
    if train_only:
        sup = sup.filter(pc.not_equal(sup.column(C.SPLIT), C.TEST))
    sup_uid = np.asarray(sup.column(C.USER_ID).to_pylist())
    ch = torch.from_numpy(C.emb_matrix(sup.column(C.CHOSEN_EMB)).astype(np.float64))
    rj = torch.from_numpy(C.emb_matrix(sup.column(C.REJECTED_EMB)).astype(np.float64))
    cand = storage.read_table(candidates)
    cand_uid = cand.column(C.USER_ID).to_pylist()
    users = sorted(set(sup_uid) | set(cand_uid))
    thetas = {}
    prior = None if head.log_prior is None else head.log_prior.detach().exp()
    for u in users:
        rows = torch.from_numpy(np.flatnonzero(sup_uid == u))
        thetas[u] = adapt_one_user(head.theta0, w, ch[rows], rj[rows], cfg.inner, cfg.eval_steps,
                                   head.cfg.weights, prior, lrs)
    emb = torch.from_numpy(C.emb_matrix(cand.column(C.EMB)).astype(np.float64))
    rewards = {}
    for i, (u, c) in enumerate(zip(cand_uid, cand.column(C.CANDIDATE_ID).to_pylist())):
        rewards[(u, c)] = float(emb[i] @ user_vector(thetas[u], w, head.cfg.weights))
    return thetas, rewards, {u: int((sup_uid == u).sum()) for u in users}


def check_against_reference(out: str, run_uri: str, support: str, candidates: str, train_only: bool = False):
    thetas, rewards, n_support = reference_scores(run_uri, support, candidates, train_only)
    scores = storage.read_table(storage.join(out, S.SCORES))
    weights = storage.read_table(storage.join(out, S.WEIGHTS))
    assert scores.schema.equals(C.SCORES_SCHEMA)
    got = {(u, c): (r, p) for u, c, r, p in zip(*(scores.column(n).to_pylist() for n in
                                                 (C.USER_ID, C.CANDIDATE_ID, C.REWARD, C.PRIOR)))}
    assert len(got) == scores.num_rows == len(rewards)          # every candidate exactly once
    for key, want in rewards.items():
        r, prior = got[key]
        assert math.isclose(r, want, rel_tol=1e-4, abs_tol=1e-5), (key, r, want)
        assert prior == (n_support[key[0]] == 0)
    assert sorted(weights.column(C.USER_ID).to_pylist()) == sorted(thetas)   # every user of either table
    theta = C.emb_matrix(weights.column(C.THETA))
    for u, t, n, p in zip(weights.column(C.USER_ID).to_pylist(), theta, weights.column(C.N_SUPPORT).to_pylist(),
                          weights.column(C.PRIOR).to_pylist()):
        np.testing.assert_allclose(t, thetas[u].numpy(), rtol=1e-4, atol=1e-5)
        assert n == n_support[u] and p == (n == 0)
    return scores, weights


# --- tests ---------------------------------------------------------------------------
def test_scores_equal_per_user_reference_loop(ray_local, population, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "UNIT_BYTES", 4096)                 # many small route tasks
    out = str(tmp_path / "scored")
    argv = ["score", "--run", population["sgd_run"], "--support", population["support"],
            "--candidates", population["candidates"], "--out", out, "--partitions", "3"]
    assert cli.main(argv) == 0
    scores, weights = check_against_reference(out, population["sgd_run"], population["support"],
                                              population["candidates"])
    # users without support pairs: the population prior theta_0, flagged, not dropped
    new = weights.filter(pc.starts_with(weights.column(C.USER_ID), "new-"))
    assert new.num_rows == 5 and all(new.column(C.PRIOR).to_pylist())
    np.testing.assert_allclose(C.emb_matrix(new.column(C.THETA)), [[0.4, -0.3, 0.1]] * 5, atol=1e-7)
    assert pc.sum(scores.column(C.PRIOR)).as_py() == 15
    summary = storage.read_json(storage.join(out, S.SUMMARY))
    assert summary["users"] == 45 and summary["prior_users"] == 5 and summary["inner_steps"] == 2
    assert storage.exists(storage.join(out, "_SUCCESS")) and not storage.exists(storage.join(out, S.SHUFFLE))
    # the Python API on one user's pairs gives the same weights and rewards as the batched pipeline
    rm = api.load(population["sgd_run"])
    user = rm.adapt_from_table(population["support"], "u00000003")
    row = weights.filter(pc.equal(weights.column(C.USER_ID), "u00000003"))
    np.testing.assert_allclose(user.theta.numpy(), C.emb_matrix(row.column(C.THETA))[0], rtol=1e-5, atol=1e-6)
    cands = storage.read_table(population["candidates"])
    mine = cands.filter(pc.equal(cands.column(C.USER_ID), "u00000003"))
    want = scores.filter(pc.equal(scores.column(C.USER_ID), "u00000003"))
    np.testing.assert_allclose(user.score(C.emb_matrix(mine.column(C.EMB))).numpy(),
                               want.column(C.REWARD).to_numpy(), rtol=1e-5, atol=1e-5)
    assert rm.user_from_weights(out, "u00000003").theta.tolist() == pytest.approx(user.theta.tolist(), abs=1e-6)


def test_adam_meta_sgd_train_split_float16(ray_local, population, tmp_path):
    """Fresh-Adam inner steps with learned per-head step sizes; support restricted to split=train."""
    root = population["root"]
    support = str(tmp_path / "support16")
    synth.write_embedding_population(support, users=40, pairs_per_user=6, dim=DIM, seed=1, dtype="float16")
    run_uri = make_run(str(tmp_path / "run_adam"), overrides=["inner.optimizer=adam", "inner.lr=0.1",
                                                              "inner.steps=3", "inner.learn_lr=true"],
                       lrs=[0.05, 0.1, 0.3])
    out = str(root / "scored_adam")
    s = S.score(runs.load_run(run_uri), support, population["candidates"], out, support_split="train")
    assert s["support_pairs"] < s["support_rows_read"]          # test rows were left out
    check_against_reference(out, run_uri, support, population["candidates"], train_only=True)


def test_s3_round_trip(ray_local, s3_bucket, population, tmp_path):
    run_uri = make_run(f"{s3_bucket}/run", overrides=["inner.steps=10"])  # Newton: converged to the mode
    storage.write_table(storage.read_table(population["support"]), f"{s3_bucket}/support")
    storage.write_table(storage.read_table(population["candidates"]), f"{s3_bucket}/cands")
    out = f"{s3_bucket}/scored"
    assert cli.main(["score", "--run", run_uri, "--support", f"{s3_bucket}/support",
                     "--candidates", f"{s3_bucket}/cands", "--out", out]) == 0
    assert storage.exists(f"{out}/_SUCCESS")
    check_against_reference(out, run_uri, f"{s3_bucket}/support", f"{s3_bucket}/cands")


def test_dim_mismatch_fails_before_any_work(population, tmp_path, capsys):
    bad = write_candidates(str(tmp_path / "cands8"), [candidates_table(["u00000001"], 2, dim=8)])
    out = tmp_path / "never"
    code = cli.main(["score", "--run", population["sgd_run"], "--support", population["support"],
                     "--candidates", bad, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "dimension mismatch" in err and "d=8" in err and "d=16" in err
    assert not out.exists()


def test_incomplete_run_names_the_missing_file(population, tmp_path, capsys):
    run_uri = make_run(str(tmp_path / "run"))
    (tmp_path / "run" / runs.MODEL).unlink()
    code = cli.main(["score", "--run", run_uri, "--support", population["support"],
                     "--candidates", population["candidates"], "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model.safetensors is missing" in err


def test_bad_rows_fail_with_one_line_and_no_output(ray_local, population, tmp_path, capsys):
    t = candidates_table(["u00000001", "u00000002"], 3)
    emb = C.emb_matrix(t.column(C.EMB)).copy()
    emb[4, 3] = np.nan
    t = t.set_column(2, C.EMB, pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), DIM))
    bad = write_candidates(str(tmp_path / "nan"), [t])
    out = tmp_path / "o"
    code = cli.main(["score", "--run", population["sgd_run"], "--support", population["support"],
                     "--candidates", bad, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "NaN" in err and "u00000002" in err
    assert not (out / "_SUCCESS").exists() and not list(out.glob("scores"))
