"""One owner per run directory (mrm_ray.data.lease): local flock and the S3 conditional-PUT lease."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import one_line_error

from mrm_ray import cli
from mrm_ray.data import runs, storage
from mrm_ray.data.lease import Lease
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


# --- 3. one owner per run directory; a resume must be a resume -------------------------------------
def test_a_run_directory_in_use_is_refused(emb, tmp_path, capsys):
    out = tmp_path / "run"
    with Lease(str(out), "train"):
        rc = cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local", "epochs=1"])
        one_line_error(capsys, rc, "in use by", "mrm train")
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local", "epochs=1"]) == 0


def test_two_trainings_at_once_one_refused(emb, tmp_path):
    """Two real processes on one run directory: exactly one trains."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "mrm_ray.cli", "train", "--embeddings", str(emb), "--out", str(out), "--local",
           "epochs=3"]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    refused = [err for rc, err in results if rc == 2]
    assert codes == [0, 2] and "in use by" in refused[0], results
    cfg = json.loads((out / runs.CONFIG).read_text())
    assert cfg["epochs"] == 3 and runs.load_run(str(out)).info["format_version"] == 1


def test_s3_lease_is_exclusive_and_a_stale_one_is_taken_over(s3_bucket):
    uri = f"{s3_bucket}/run"
    with Lease(uri, "train"):
        with pytest.raises(storage.StorageError, match="in use by"):
            Lease(uri, "train").__enter__()
    stale = Lease(uri, "train", renew=1000)
    stale.__enter__()
    stale._stop.set()                                                # the owner dies without releasing
    with Lease(uri, "train", stale=0.0):                             # (every lock is stale at 0 s)
        pass
