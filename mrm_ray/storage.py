"""Where tables and run directories live: a local path or s3://bucket/prefix.

One function turns a URI into a pyarrow filesystem and a path; everything
else (Ray Data reads/writes, Ray Train's storage, our own JSON and Parquet
files) goes through it, so s3 settings are read in exactly one place.

S3 settings come from the usual AWS environment (credentials, region) plus
AWS_ENDPOINT_URL for S3-compatible servers (MinIO, moto, ...).

Outputs are committed atomically: a stage writes into `<out>/.partial-<id>/`
and moves the files into place only when every part is written, then writes a
`_SUCCESS` marker.  A crash leaves a `.partial-*` folder, never a table that
looks complete.
"""
from __future__ import annotations

import json
import os
import uuid
from contextlib import contextmanager
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from mrm_ray.errors import UserError

SUCCESS = "_SUCCESS"


class StorageError(UserError):
    """A location cannot be read or written.  The message is one line for a user."""


def is_remote(uri: str) -> bool:
    return str(uri).startswith("s3://")


def s3_filesystem() -> pafs.S3FileSystem:
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    # Fail fast on an unreachable endpoint instead of retrying for minutes.
    kwargs["connect_timeout"] = float(os.environ.get("MRM_S3_CONNECT_TIMEOUT", "5"))
    kwargs["request_timeout"] = float(os.environ.get("MRM_S3_REQUEST_TIMEOUT", "30"))
    kwargs["retry_strategy"] = pafs.AwsStandardS3RetryStrategy(max_attempts=3)
    return pafs.S3FileSystem(**kwargs)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_remote(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def _info(uri: str) -> pafs.FileInfo:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"cannot reach {uri}: {str(e).splitlines()[0]}") from None


def exists(uri: str) -> bool:
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def parquet_files(uri: str) -> list[str]:
    """The Parquet files of a table (a file, or a folder of part files), sorted."""
    fs, path = resolve(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"no table at {uri}")
    if info.type == pafs.FileType.File:
        return [path]
    sel = pafs.FileSelector(path, recursive=True)
    files = [f.path for f in fs.get_file_info(sel)
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")
             and "/.partial-" not in f.path and "/_" not in f.path[len(path):]]
    if not files:
        raise StorageError(f"no Parquet files under {uri}")
    return sorted(files)


def dataset(uri: str) -> pads.Dataset:
    fs, _ = resolve(uri)
    return pads.dataset(parquet_files(uri), filesystem=fs, format="parquet")


def schema(uri: str) -> pa.Schema:
    return dataset(uri).schema


def read_table(uri: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """Read (part of) a table.  For small tables and per-shard reads only."""
    try:
        return dataset(uri).to_table(columns=columns, filter=filter)
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None


def iter_batches(uri: str, columns: list[str] | None = None, batch_rows: int = 65536):
    """Stream a table as RecordBatches: memory stays bounded by batch_rows."""
    yield from dataset(uri).to_batches(columns=columns, batch_size=batch_rows)


def read_json(uri: str):
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise StorageError(f"no file at {uri}") from None


def write_bytes(uri: str, data: bytes) -> None:
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    try:
        fs.create_dir(parent, recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {str(e).splitlines()[0]}") from None


def write_json(uri: str, obj) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"no file at {uri}") from None


def delete(uri: str) -> None:
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


@contextmanager
def atomic_output(uri: str, overwrite: bool = True):
    """Yield a staging folder URI; on success move its files to `uri` and mark _SUCCESS.

    On an exception the staging folder is removed and `uri` is left as it was
    (a previous complete table there stays complete).
    """
    fs, path = resolve(uri)
    try:
        fs.create_dir(path, recursive=True)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {str(e).splitlines()[0]}") from None
    staging = join(uri, f".partial-{uuid.uuid4().hex[:8]}")
    _, spath = resolve(staging)
    fs.create_dir(spath, recursive=True)
    try:
        yield staging
    except BaseException:
        try:
            fs.delete_dir(spath)
        except OSError:
            pass
        raise
    if overwrite:  # drop the old table's parts only once the new one is fully written
        for f in fs.get_file_info(pafs.FileSelector(path)):
            if f.path != spath and not f.base_name.startswith(".partial-"):
                fs.delete_dir(f.path) if f.type == pafs.FileType.Directory else fs.delete_file(f.path)
    for f in fs.get_file_info(pafs.FileSelector(spath, recursive=True)):
        if f.type == pafs.FileType.File:
            dest = path + f.path[len(spath):]
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.move(f.path, dest)
    fs.delete_dir(spath)
    with fs.open_output_stream(f"{path}/{SUCCESS}") as f:
        f.write(b"")


def write_table(table: pa.Table, uri: str, row_group_rows: int = 65536) -> None:
    """Write one table atomically as `<uri>/part-00000.parquet`."""
    with atomic_output(uri) as staging:
        fs, spath = resolve(staging)
        pq.write_table(table, f"{spath}/part-00000.parquet", filesystem=fs, row_group_size=row_group_rows)


class PartWriter:
    """Stream batches into numbered Parquet parts under a staging URI (bounded memory)."""

    def __init__(self, staging: str, schema: pa.Schema, rows_per_file: int = 1_000_000):
        self.fs, self.dir = resolve(staging)
        self.fs.create_dir(self.dir, recursive=True)
        self.schema, self.rows_per_file = schema, rows_per_file
        self.part, self.rows, self.writer = 0, 0, None

    def write(self, batch: pa.RecordBatch | pa.Table) -> None:
        if self.writer is None or self.rows >= self.rows_per_file:
            self._roll()
        self.writer.write(batch)
        self.rows += batch.num_rows

    def _roll(self):
        if self.writer is not None:
            self.writer.close()
            self.part += 1
        self.rows = 0
        self.writer = pq.ParquetWriter(f"{self.dir}/part-{self.part:05d}.parquet", self.schema, filesystem=self.fs)

    def close(self):
        if self.writer is None:
            self._roll()  # an empty table still has a schema
        self.writer.close()
