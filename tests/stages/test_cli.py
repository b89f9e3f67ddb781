"""The `mrm` console script: --help everywhere, one-line errors, and the local chain.

synth -> train --local -> evaluate on 2,000 synthetic users: MRM beats a shared
Bradley-Terry reward on unseen users, and the report carries both and the oracle.
"""
import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrm_ray.cli import COMMANDS
from mrm_ray.data import contract as C
from mrm_ray.data import storage

MRM = [sys.executable, "-m", "mrm_ray.cli"]


def mrm(*args, check=True):
    p = subprocess.run([*MRM, *map(str, args)], capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"mrm {' '.join(map(str, args))} failed:\n{p.stdout}\n{p.stderr}")
    return p


def assert_one_line_error(p, needle):
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.startswith("mrm ")]
    assert len(lines) == 1 and needle in lines[0], p.stderr


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help(command):
    p = mrm(*([command] if command else []), "--help")
    assert "usage: mrm" in p.stdout and len(p.stdout) > 200


@pytest.fixture(scope="module")
def population(tmp_path_factory):
    out = tmp_path_factory.mktemp("pop") / "emb"
    mrm("synth", "--out", out, "--users", 2000, "--dim", 32, "--seed", 1)
    return out


def test_synth_writes_contract_table_with_truth(population):
    t = storage.read_table(str(population))
    C.normalize_embeddings(t)
    assert set(t.column(C.SPLIT).to_pylist()) == {"train", "test"}
    assert (population / "_SUCCESS").exists()
    truth = pq.read_table(population / "_truth")
    assert truth.num_rows == 2000 and set(truth.column("type").to_pylist()) == {"A", "B", "M"}
    counts = np.unique(t.column(C.USER_ID).to_numpy(zero_copy_only=False), return_counts=True)[1]
    assert counts.min() >= 4 and counts.max() > 2 * counts.min()  # ragged


def test_train_and_evaluate_local_beats_shared_bt(population, tmp_path):
    run = tmp_path / "run"
    mrm("train", "--embeddings", population, "--out", run, "--local")  # default settings
    for name in ("config.json", "model.json", "model.safetensors", "history.json"):
        assert (run / name).exists(), name
    users = pq.read_table(run / "users.parquet").to_pydict()
    assert sum(users["seen"]) > 800 and len(users["user_id"]) == 2000
    p = mrm("evaluate", "--run", run, "--embeddings", population)
    m = json.loads((run / "metrics.json").read_text())
    assert m["unseen"]["users"] + m["seen"]["users"] == m["overall"]["users"] > 1900
    for split in ("seen", "unseen", "overall"):
        assert 0 <= m[split]["worst10_accuracy"] <= m[split]["accuracy"] <= 1
    bt = m["baselines"]["shared_bt"]
    assert m["unseen"]["accuracy"] > bt["unseen"]["accuracy"] + 0.03, (m["unseen"], bt["unseen"])
    assert m["oracle"]["unseen"]["accuracy"] > m["unseen"]["accuracy"]
    assert m["few_shot"]["16"]["unseen"] > m["few_shot"]["1"]["unseen"]
    assert "shared BT" in p.stdout and "oracle" in p.stdout
    for png in ("per_user_accuracy.png", "few_shot.png", "learning_curves.png"):
        assert (run / png).read_bytes()[:4] == b"\x89PNG"
    assert pq.read_table(run / "per_user.parquet").num_rows == 2000  # users without test pairs too


def test_local_resume_continues_from_checkpoint(population, tmp_path):
    run = tmp_path / "run"
    mrm("train", "--embeddings", population, "--out", run, "--local", "epochs=2")
    cfg = json.loads((run / "config.json").read_text())
    cfg["epochs"] = 3  # as if the first run had been stopped after 2 of 3 epochs
    (run / "config.json").write_text(json.dumps(cfg))
    p = mrm("train", "--embeddings", population, "--out", run, "--local")
    assert "resuming" in p.stderr
    hist = json.loads((run / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]  # 0: the start itself, validated before training


def test_bad_inputs_exit_with_one_line(tmp_path, population):
    assert_one_line_error(mrm("train", "--embeddings", tmp_path / "nope", "--out", tmp_path / "r", "--local",
                              check=False), "no table at")
    assert_one_line_error(mrm("train", "--embeddings", population, "--out", tmp_path / "r", "inner.lr=-1",
                              check=False), "inner.lr must be > 0")
    assert_one_line_error(mrm("train", "--embeddings", population, "--out", tmp_path / "r", "rpo.alpha=2",
                              check=False), "rpo.alpha must be in (0, 1]")
    bad = tmp_path / "nan"
    bad.mkdir()
    t = storage.read_table(str(population)).slice(0, 50)
    emb = np.stack(t.column(C.CHOSEN_EMB).to_numpy(zero_copy_only=False))
    emb[7, 3] = np.nan
    t = t.set_column(t.schema.get_field_index(C.CHOSEN_EMB), C.CHOSEN_EMB,
                     pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1]))
    pq.write_table(t, bad / "part-0.parquet")
    p = mrm("train", "--embeddings", bad, "--out", tmp_path / "r2", "--local", check=False)
    assert_one_line_error(p, "non-finite")
    assert not (tmp_path / "r2" / "model.safetensors").exists()
    assert_one_line_error(mrm("evaluate", "--run", tmp_path / "nope", "--embeddings", population, check=False),
                          "no run directory")
    assert_one_line_error(mrm("synth", "--out", tmp_path / "s", "--users", 0, check=False), "--users")


def test_users_with_too_few_pairs_are_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(60):
        n = 1 if u < 5 else 8
        for i in range(n):
            rows.append((f"u{u}", f"u{u}-{i}", "train" if i % 2 == 0 or n == 1 else "test"))
    d = 8
    t = pa.table({C.USER_ID: [r[0] for r in rows], C.PAIR_ID: [r[1] for r in rows], C.SPLIT: [r[2] for r in rows],
                  C.CHOSEN_EMB: pa.FixedSizeListArray.from_arrays(pa.array(rng.random(len(rows) * d, dtype=np.float32)), d),
                  C.REJECTED_EMB: pa.FixedSizeListArray.from_arrays(pa.array(rng.random(len(rows) * d, dtype=np.float32)), d)})
    (tmp_path / "emb").mkdir()
    pq.write_table(t, tmp_path / "emb" / "part-0.parquet")
    p = mrm("train", "--embeddings", tmp_path / "emb", "--out", tmp_path / "run", "--local", "epochs=1")
    assert "5 skipped" in p.stderr
    users = pq.read_table(tmp_path / "run" / "users.parquet").to_pydict()
    assert sum(users["skipped"]) == 5
