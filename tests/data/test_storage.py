"""Atomic, manifest-committed outputs (mrm_ray.data.storage): a kill anywhere leaves the old output or the new one."""
from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mrm_ray.data import storage

DIM = 8


# --- 2. commits are atomic: a kill anywhere leaves the old output or the new one -----------------
def _write_version(uri: str, n: int, overwrite: bool, die_at: str | None) -> None:
    """In a child process: write an n-row table; die (as by SIGKILL: no clean-up runs) at `die_at`:
    staging (parts written, nothing committed), placing (one part moved into place), committed
    (right after the manifest: the other files not moved in, the old version not deleted)."""
    if die_at == "placing":
        real, calls = storage.pq.read_metadata, {"n": 0}

        def read_metadata(*a, **k):   # read just before each staged part is moved into place
            calls["n"] += 1
            if calls["n"] == 2:
                os._exit(9)
            return real(*a, **k)
        storage.pq.read_metadata = read_metadata
    if die_at == "committed":
        real_manifest = storage._write_manifest

        def manifest(fs, path, m):  # noqa: ANN001
            real_manifest(fs, path, m)
            if m.get("state") == "complete":
                os._exit(9)
        storage._write_manifest = manifest
    with storage.atomic_output(uri, "api", overwrite=overwrite) as staging:
        fs, path = storage.resolve(staging)
        for k in range(3):   # 3 parts, so a kill can fall between them
            pq.write_table(pa.table({"x": np.arange(k * n, (k + 1) * n)}), f"{path}/part-{k:05d}.parquet",
                           filesystem=fs)
        if die_at == "staging":
            os._exit(9)
        storage.write_json(storage.join(staging, "summary.json"), {"rows": 3 * n})


def _killed(uri: str, n: int, overwrite: bool, die_at: str | None) -> None:
    p = multiprocessing.get_context("fork").Process(target=_write_version, args=(uri, n, overwrite, die_at))
    p.start()
    p.join(60)
    assert p.exitcode == (9 if die_at else 0)


@pytest.mark.parametrize("where", ["local", "s3"])
@pytest.mark.parametrize("die_at", ["staging", "placing", "committed"])
def test_kill_in_commit_leaves_old_or_new_complete(tmp_path, where, die_at, request):
    base = request.getfixturevalue("s3_bucket") if where == "s3" else str(tmp_path)
    uri = f"{base}/table"
    _killed(uri, 10, False, None)                                   # version 1: 30 rows
    _killed(uri, 100, True, die_at)                                  # version 2 killed
    rows = storage.read_table(uri).num_rows
    assert rows == (300 if die_at == "committed" else 30)            # all of one version, never a mix
    _killed(uri, 1000, True, None)                                   # the next run completes and tidies up
    assert storage.read_table(uri).num_rows == 3000
    fs, path = storage.resolve(uri)
    names = [i.base_name for i in fs.get_file_info(storage.pafs.FileSelector(path, recursive=True))]
    assert not [n for n in names if n.startswith(storage.STAGING)]
    assert len([n for n in names if n.endswith(".parquet")]) == 3


def test_a_new_output_killed_before_its_commit_is_refused_by_readers(tmp_path, capsys):
    uri = str(tmp_path / "new")
    _killed(uri, 10, False, "placing")
    with pytest.raises(storage.StorageError, match="did not finish"):
        storage.read_table(uri)
    _killed(uri, 10, False, None)                                    # the same command may finish it
    assert storage.read_table(uri).num_rows == 30


def test_a_legacy_unfinished_write_is_refused(tmp_path):
    t = tmp_path / "legacy"
    (t / ".partial-1234").mkdir(parents=True)
    pq.write_table(pa.table({"x": [1]}), t / "part-00000.parquet")
    with pytest.raises(storage.StorageError, match="did not finish"):
        storage.read_table(str(t))
