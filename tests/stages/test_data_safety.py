"""No command loses or corrupts a user's data (docs/safety.md).

Each test is one of the failures an adversarial user found in 0.1.0: outputs that
wiped what was there, commits that a kill could break, readers that took half a
table, run directories shared by two trainings, a damaged checkpoint that made a
run unrecoverable, a model folder without its tokenizer, requests Ray would wait
on forever, Ctrl-C.  And a fuzz-style pass: every command fed malformed tables
exits non-zero with exactly one line on stderr, no traceback, inputs unchanged.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import digest, one_line_error

from mrm_ray import cli
from mrm_ray.data import contract as C
from mrm_ray.data import runs, storage
from mrm_ray.synth import write_embedding_population

DIM = 8


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "emb"
    write_embedding_population(str(out), users=60, pairs_per_user=10, dim=DIM, seed=3)
    return out


@pytest.fixture(scope="module")
def run(emb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-run") / "run"
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local", "epochs=2"]) == 0
    return out


# --- 1. never delete or overwrite what a command did not create ---------------------------------
def test_foreign_files_in_out_are_refused_and_kept(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.txt").write_text("hi")
    rc = cli.main(["synth", "--users", "20", "--dim", "8", "--out", str(mine)])
    one_line_error(capsys, rc, "not empty", "thesis.txt")
    assert (mine / "thesis.txt").read_text() == "hi" and len(list(mine.iterdir())) == 1


def test_previous_output_needs_overwrite_and_foreign_files_beside_it_survive(tmp_path, capsys):
    out = tmp_path / "pop"
    assert cli.main(["synth", "--users", "20", "--dim", "8", "--out", str(out)]) == 0
    first = storage.read_table(str(out))
    one_line_error(capsys, cli.main(["synth", "--users", "30", "--dim", "8", "--out", str(out)]), "--overwrite")
    assert storage.read_table(str(out)).equals(first)
    (out / "notes.md").write_text("mine")                        # a user's file inside our output
    assert cli.main(["synth", "--users", "30", "--dim", "8", "--out", str(out), "--overwrite"]) == 0
    assert storage.read_table(str(out)).num_rows != first.num_rows
    assert (out / "notes.md").read_text() == "mine"              # we delete only what we wrote
    assert len(list(out.glob("part-*.parquet"))) == 1            # the old version's parts are gone
    # another command's output is never replaced, --overwrite or not
    (tmp_path / "src").mkdir()
    one_line_error(capsys, cli.main(["prepare", "reddit", "--source", str(tmp_path / "src"), "--out", str(out),
                                     "--overwrite"]), "mrm synth")


def test_out_equal_to_inside_or_around_an_input_is_refused(emb, run, tmp_path, capsys):
    before = digest(emb)
    cands = tmp_path / "cands"
    storage.write_table(pa.table({C.USER_ID: ["u"], C.CANDIDATE_ID: ["c"],
                                  C.EMB: pa.array([[0.0] * DIM], pa.list_(pa.float32(), DIM))}), str(cands))
    for argv, expect in (
            (["embed", "--pairs", str(emb), "--out", str(emb)], "is the input"),
            (["embed", "--pairs", str(emb), "--out", str(emb / "emb")], "inside the input"),
            (["embed", "--pairs", str(emb), "--out", str(emb.parent)], "contains the input"),
            (["score", "--run", str(run), "--support", str(emb), "--candidates", str(cands), "--out", str(run)],
             "is the input"),
            (["train", "--embeddings", str(emb), "--out", str(emb / "run"), "--local"], "inside the input"),
            (["evaluate", "--run", str(run), "--embeddings", str(emb), "--out", str(emb / "m.json")],
             "inside the input")):
        one_line_error(capsys, cli.main(argv), expect)
    assert digest(emb) == before
    assert runs.load_run(str(run)).head is not None


def test_evaluate_to_a_bare_file_name_writes_beside_it(run, emb, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["evaluate", "--run", str(run), "--embeddings", str(emb), "--out", "metrics.json",
                     "--no-baseline"]) == 0
    assert (tmp_path / "metrics.json").exists() and (tmp_path / "per_user.parquet").is_dir()


def test_readers_refuse_a_table_with_a_missing_or_truncated_part(emb, tmp_path, capsys):
    import shutil
    for damage in ("missing", "truncated"):
        copy = tmp_path / damage
        shutil.copytree(emb, copy)
        part = sorted(copy.glob("part-*.parquet"))[0]
        if damage == "missing":
            part.unlink()
        else:
            part.write_bytes(part.read_bytes()[:100])
        rc = cli.main(["train", "--embeddings", str(copy), "--out", str(tmp_path / f"run-{damage}"), "--local"])
        one_line_error(capsys, rc, "incomplete", damage)


# --- 5. a backbone that cannot embed -------------------------------------------------------------
def test_a_model_folder_without_tokenizer_is_refused(tmp_path, capsys):
    from tiny_models import tiny_reward_model
    model = tiny_reward_model(tmp_path / "model")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (Path(model) / f).unlink(missing_ok=True)
    pairs = tmp_path / "pairs"
    storage.write_table(pa.table({C.USER_ID: ["u"], C.PAIR_ID: ["p"], C.PROMPT: ["hi"], C.CHOSEN: ["a"],
                                  C.REJECTED: ["b"]}), str(pairs))
    capsys.readouterr()                                              # (the model writer's progress bar)
    rc = cli.main(["embed", "--pairs", str(pairs), "--out", str(tmp_path / "emb"), "--model", str(model)])
    one_line_error(capsys, rc, "no tokenizer files")
    assert not (tmp_path / "emb").exists()


# --- 6. requests a fixed cluster cannot meet fail at once ------------------------------------------
@pytest.mark.parametrize("ask", [["num_workers=8"], ["use_gpu=true", "num_workers=1", "cpus_per_worker=0.5"]])
def test_infeasible_resources_fail_in_seconds(ray_local, emb, tmp_path, capsys, ask):
    t0 = time.time()
    rc = cli.main(["train", "--embeddings", str(emb), "--out", str(tmp_path / "run"), "epochs=1", *ask])
    one_line_error(capsys, rc, "cannot grow")
    assert time.time() - t0 < 60


# --- 7. Ctrl-C -----------------------------------------------------------------------------------------
def test_ctrl_c_stops_training_with_130_and_the_run_resumes(emb, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    cmd = [sys.executable, "-m", "mrm_ray.cli", "train", "--embeddings", str(emb), "--out", str(out),
           "num_workers=1", "cpus_per_worker=0.5", "epochs=400", "tasks_per_batch=2"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                         start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and not list((out / "checkpoints").glob("train/epoch-*")):
        time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    try:
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    err = p.stderr.read()
    assert rc == 130 and "mrm train: interrupted" in err, err[-2000:]
    from mrm_ray import train_ray
    assert train_ray.latest_state(str(out)) is not None              # resumable state was left


# --- 8. fuzz: malformed tables, every command, one line each ----------------------------------------
def _emb_table(n=6, dim=DIM, **replace):
    rng = np.random.default_rng(0)
    cols = {C.USER_ID: [f"u{i % 3}" for i in range(n)], C.PAIR_ID: [f"p{i}" for i in range(n)],
            C.CONV_ID: [f"c{i}" for i in range(n)], C.SPLIT: ["train", "test"] * (n // 2),
            C.CHOSEN_EMB: pa.array(rng.standard_normal((n, dim)).astype(np.float32).tolist(), pa.list_(pa.float32(), dim)),
            C.REJECTED_EMB: pa.array(rng.standard_normal((n, dim)).astype(np.float32).tolist(), pa.list_(pa.float32(), dim))}
    cols.update(replace)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def _bad_tables(tmp: Path) -> dict[str, Path]:
    out = {}

    def put(name, *tables):
        d = tmp / name
        d.mkdir(parents=True)
        for k, t in enumerate(tables):
            pq.write_table(t, d / f"part-{k:05d}.parquet")
        out[name] = d
    put("no_user_id", _emb_table(**{C.USER_ID: None}))
    put("nan", _emb_table(**{C.CHOSEN_EMB: pa.array([[float("nan")] * DIM] * 6, pa.list_(pa.float32(), DIM))}))
    put("huge", _emb_table(**{C.CHOSEN_EMB: pa.array([[1e30] * DIM] * 6, pa.list_(pa.float32(), DIM))}))
    put("integers", _emb_table(**{C.CHOSEN_EMB: pa.array([[1] * DIM] * 6, pa.list_(pa.int64(), DIM))}))
    put("mixed_dims", _emb_table(), _emb_table(dim=DIM + 1))
    put("duplicate_ids", _emb_table(), _emb_table())
    put("bad_split", _emb_table(**{C.SPLIT: ["train", "dev"] * 3}))
    put("null_ids", _emb_table(**{C.PAIR_ID: [None, "a", "b", "c", "d", "e"]}))
    put("empty", _emb_table().slice(0, 0))
    d = tmp / "truncated"
    d.mkdir(parents=True)
    pq.write_table(_emb_table(), d / "part-00000.parquet")
    (d / "part-00001.parquet").write_bytes((d / "part-00000.parquet").read_bytes()[:200])
    out["truncated"] = d
    return out


def test_fuzz_every_command_one_line_inputs_unchanged(run, tmp_path, capsys):
    bad = _bad_tables(tmp_path / "bad")
    cands = tmp_path / "cands"
    storage.write_table(pa.table({C.USER_ID: ["u0"], C.CANDIDATE_ID: ["c"],
                                  C.EMB: pa.array([[0.0] * DIM], pa.list_(pa.float32(), DIM))}), str(cands))
    before = {name: digest(path) for name, path in bad.items()}
    run_before = digest(run)
    for name, table in bad.items():
        for k, argv in enumerate((
                ["train", "--embeddings", str(table), "--out", str(tmp_path / f"r-{name}"), "--local"],
                ["evaluate", "--run", str(run), "--embeddings", str(table), "--out", str(tmp_path / f"m-{name}.json")],
                ["score", "--run", str(run), "--support", str(table), "--candidates", str(cands),
                 "--out", str(tmp_path / f"s-{name}")],
                ["compare", "--embeddings", str(table), "--out", str(tmp_path / f"c-{name}"), "--epochs", "1"])):
            rc = cli.main(argv)
            err = capsys.readouterr().err.strip()
            lines = err.splitlines()
            assert rc == 2 and len(lines) == 1 and "Traceback" not in err, (name, argv[0], err)
            assert not (tmp_path / f"s-{name}" / "_SUCCESS").exists()
        assert digest(table) == before[name], name
    assert digest(run) == run_before


def test_bad_config_values_are_one_line(emb, tmp_path, capsys):
    for bad in ("cpus_per_worker=0", "cpus_per_worker=-1", "max_failures=-5"):
        rc = cli.main(["train", "--embeddings", str(emb), "--out", str(tmp_path / "r"), "--local", bad])
        one_line_error(capsys, rc, bad.split("=")[0])
    rc = cli.main(["embed", "--pairs", str(emb), "--out", str(tmp_path / "e"), "--batch-rows", "0"])
    one_line_error(capsys, rc, "--batch-rows")


def test_export_of_an_unknown_user_needs_prior(run, tmp_path, capsys):
    from tiny_models import tiny_reward_model
    model = tiny_reward_model(tmp_path / "model")
    capsys.readouterr()
    rc = cli.main(["export-hf", "--run", str(run), "--user", "nobody", "--backbone", str(model),
                   "--out", str(tmp_path / "x")])
    one_line_error(capsys, rc, "--prior")
    assert not (tmp_path / "x").exists()
