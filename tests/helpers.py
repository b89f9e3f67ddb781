"""Helpers shared by the tests (import: from helpers import ...)."""
from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
from pathlib import Path

DIM = 8


def one_line_error(capsys, rc: int, *expect: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc not in (0, None), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for e in expect:
        assert e in err, err
    return err


def digest(path: Path) -> str:
    """Everything under a folder (names and bytes; not a run directory's lock): unchanged means untouched."""
    h = hashlib.sha256()
    for p in sorted(q for q in path.rglob("*") if q.name != "_lock"):
        h.update(str(p.relative_to(path)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_head(proc: subprocess.Popen, temp: str) -> None:
    """Stop a `ray start --head --block` this test started (its process group), then anything left of THAT
    cluster (its temp dir is in every command line): `ray stop` would stop every Ray on the machine."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    subprocess.run(["pkill", "-9", "-f", temp], check=False)


# --- Ray Train runs ---------------------------------------------------------------------------
def registered_checkpoint(run: str) -> str | None:
    """The latest checkpoint `mrm train` has registered with Ray Train (the one a restart resumes from)."""
    from mrm_ray.data import storage
    from mrm_ray.train_ray import RUN_NAME

    base = storage.join(run, "checkpoints", RUN_NAME)
    try:
        snap = storage.read_json(storage.join(base, "checkpoint_manager_snapshot.json"))
        return storage.join(base, snap["latest_checkpoint_result"]["checkpoint_dir_name"])
    except (storage.StorageError, OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return None


def assert_heads_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    import torch

    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k].cpu(), b[k].cpu(), atol=atol, rtol=0, msg=k)


def assert_continued(final, killed: dict, expected) -> None:
    """The run finished all epochs, kept the records of the checkpoint it resumed from, and ended where
    an uninterrupted run ends."""
    n = len(killed["history"])
    assert [h["epoch"] for h in final.history] == [h["epoch"] for h in expected.history]
    assert final.history[:n] == killed["history"]  # same timings too: restored, not recomputed
    assert abs(final.history[-1]["val_accuracy"] - expected.history[-1]["val_accuracy"]) < 1e-4
    assert_heads_close(final.head, expected.head)
