"""`ray job submit` against a real head node started by this test.

A head is started on free ports with its own temp dir (auth disabled for the
test), the small CPU pipeline (synth -> train on Ray Train -> evaluate) is
submitted with `--working-dir .` exactly as the README says, the job must end
SUCCEEDED with its outputs written, and then only this head is stopped (its
process group, then any process still naming its temp dir).
"""
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import free_port, stop_head

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture
def head_node():
    temp = f"/tmp/rayjob-{uuid.uuid4().hex[:6]}"
    port, dash = free_port(), free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--num-cpus=2", f"--temp-dir={temp}",
         "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 90
    while time.time() < deadline:
        ok = subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], env=env,
                            capture_output=True, text=True).returncode == 0
        if ok:
            break
        assert proc.poll() is None, "ray start --head exited"
        time.sleep(2)
    else:
        pytest.fail("the head node's job server did not come up in 90 s")
    yield address, env
    stop_head(proc, temp)


def test_submit_small_pipeline_job(head_node, tmp_path):
    address, env = head_node
    out = tmp_path / "job"
    sid = f"mrm-test-{uuid.uuid4().hex[:6]}"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", sid,
           "--working-dir", ".", "--", sys.executable, "jobs/pipeline.py", "--config", "jobs/configs/cpu-small.yaml",
           "--set", f"synth.out={out}/emb", "--set", "synth.users=400",
           "--set", f"train.embeddings={out}/emb", "--set", f"train.out={out}/run",
           "--set", "train.overrides.epochs=3",
           "--set", f"evaluate.run={out}/run", "--set", f"evaluate.embeddings={out}/emb",
           "--set", f"evaluate.out={out}/metrics.json"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    status = subprocess.run([str(BIN / "ray"), "job", "status", "--address", address, sid], env=env,
                            capture_output=True, text=True)
    assert "succeeded" in (status.stdout + status.stderr).lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["users"] > 350 and 0 <= metrics["overall"]["accuracy"] <= 1
    assert (out / "run" / "model.safetensors").exists()


def test_failed_job_reports_failure(head_node, tmp_path):
    address, env = head_node
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", ".", "--",
           sys.executable, "jobs/train.py", "--config", "jobs/configs/cpu-small.yaml",
           "--set", f"embeddings={tmp_path}/does-not-exist", "--set", f"out={tmp_path}/run"]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode != 0
    assert "no table at" in p.stdout + p.stderr
