"""Where tables and run directories live: a local path or s3://bucket/prefix.

One function turns a URI into a pyarrow filesystem and a path; everything
else (Ray Data reads/writes, Ray Train's storage, our own JSON and Parquet
files) goes through it, so s3 settings are read in exactly one place.

S3 settings come from the usual AWS environment (credentials, region) plus
AWS_ENDPOINT_URL for S3-compatible servers (MinIO, moto, ...).

Outputs (docs/safety.md):
* `check_output` runs before any work: an existing --out that another command
  wrote, or that mrm-ray did not write at all, is refused; a previous output
  of the same command is replaced only with overwrite; --out equal to, inside
  or around an input is refused.
* `atomic_output` stages everything under `<out>/.mrm-partial-<version>/`
  (hidden from Parquet readers), then commits: the Parquet parts move into
  place under versioned names, and `_mrm_manifest.json` (parts, row counts,
  schema, producer) is written in ONE atomic step (a rename on local disk, a
  single PUT on S3).  That write is the commit point: readers of the manifest
  see the old complete output or the new complete one, never a mix.  Only
  then are the other files moved in and the old version's files deleted.
* `parquet_files` (every table read) follows the manifest when there is one:
  it refuses an output that mrm-ray started and did not finish, and one whose
  listed parts are missing or truncated.  Parquet without a manifest (written
  by anything else) is read as it is.
"""
from __future__ import annotations

import json
import os
import re
import time
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


def absolute(uri: str) -> str:
    """A URI that means the same in every process: local paths made absolute (Ray workers, Ray Train's
    above all, run in other working directories), s3:// as it is."""
    uri = str(uri)
    if is_remote(uri):
        return uri
    return os.path.abspath(os.path.expanduser(uri[len("file://"):] if uri.startswith("file://") else uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *parts])


def parent(uri: str) -> str:
    """The folder holding `uri` (a bare local file name's folder is the current one)."""
    uri = str(uri).rstrip("/")
    if is_remote(uri):
        return uri.rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(os.path.expanduser(uri)))


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
    """The Parquet files of a table (a file, or a folder of part files), sorted.

    Follows the mrm-ray manifest of the output the table belongs to, if any (see
    the module docstring); otherwise every .parquet file under the folder,
    except hidden and `_`-prefixed paths.
    """
    fs, path = resolve(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"no table at {uri}")
    if info.type == pafs.FileType.File:
        return [path]
    listed = _manifest_parts(uri)
    if listed is not None:
        return listed
    sel = pafs.FileSelector(path, recursive=True)
    found = fs.get_file_info(sel)
    rel = [f.path[len(path):] for f in found]
    if not any(r == f"/{SUCCESS}" for r in rel) and any(r.startswith(f"/{LEGACY_STAGING}") for r in rel):
        raise StorageError(f"{uri} was started by mrm-ray and did not finish (a {LEGACY_STAGING}* folder and "
                           f"no {SUCCESS}); re-run the command that writes it")
    files = [f.path for f in found
             if f.type == pafs.FileType.File and f.path.endswith(".parquet")
             and "/." not in f.path[len(path):] and "/_" not in f.path[len(path):]]
    if not files:
        raise StorageError(f"no Parquet files under {uri}")
    return sorted(files)


# --- outputs: ownership, atomic commit, manifest --------------------------------------
MANIFEST = "_mrm_manifest.json"
STAGING = ".mrm-partial-"
LEGACY_STAGING = ".partial-"      # 0.1.0's staging folders


def _manifest_at(uri: str) -> dict | None:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(f"{path}/{MANIFEST}") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise StorageError(f"cannot read {join(uri, MANIFEST)}: {str(e).splitlines()[0]}") from None
    try:
        data = json.loads(raw.decode())
        if not isinstance(data, dict) or "state" not in data:
            raise ValueError("not a manifest")
        return data
    except (ValueError, UnicodeDecodeError):
        raise StorageError(f"{join(uri, MANIFEST)} is corrupt; re-run the command that writes {uri}") from None


def _manifest_parts(uri: str) -> list[str] | None:
    """The parts of the table at `uri` from the manifest of its output (at uri or up to 2 folders up)."""
    fs, path = resolve(uri)
    base, rel = uri.rstrip("/"), "."
    for _ in range(3):
        manifest = _manifest_at(base)
        if manifest is not None:
            break
        if "/" not in base.strip("/"):
            return None
        base, name = base.rsplit("/", 1)
        rel = name if rel == "." else f"{name}/{rel}"
    else:
        return None
    producer = manifest.get("producer", {}).get("command", "?")
    if manifest["state"] != "complete":
        raise StorageError(f"{uri} was started by `mrm {producer}` and did not finish; re-run that command")
    tables = manifest.get("tables", {})
    keys = [k for k in tables if k == rel or (rel != "." and k.startswith(rel + "/"))]
    if not keys:
        return None if rel != "." else []
    _, base_path = resolve(base)
    parts = [(f"{base_path}/{p['path']}", p["bytes"]) for k in keys for p in tables[k]["parts"]]
    infos = fs.get_file_info([p for p, _ in parts])
    for (p, size), i in zip(parts, infos):
        if i.type != pafs.FileType.File or i.size != size:
            raise StorageError(f"{uri} is incomplete: part {p.rsplit('/', 1)[1]} listed in its manifest is "
                               f"{'missing' if i.type != pafs.FileType.File else 'truncated'}; re-run `mrm {producer}`")
    return sorted(p for p, _ in parts)


def _canonical(uri: str) -> str:
    fs, path = resolve(uri)
    if is_remote(uri):
        return "s3://" + path.rstrip("/")
    return os.path.realpath(path)


def check_overlap(out: str, inputs) -> None:
    """Refuse an output equal to, inside, or containing one of the inputs."""
    o = _canonical(out)
    for inp in inputs:
        if inp is None:
            continue
        i = _canonical(inp)
        if o == i:
            raise StorageError(f"--out {out} is the input {inp} itself; choose another --out")
        if o.startswith(i + "/"):
            raise StorageError(f"--out {out} is inside the input {inp}; choose a folder outside it")
        if i.startswith(o + "/"):
            raise StorageError(f"--out {out} contains the input {inp}; choose a folder that does not")


def check_output(uri: str, command: str, inputs=(), overwrite: bool = False) -> dict | None:
    """Refuse what a command must not write over; returns the previous output's manifest (to replace) or None.

    Call before any work: a mistake costs a second, not an hour.
    """
    check_overlap(uri, inputs)
    fs, path = resolve(uri)
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        return None
    if info.type == pafs.FileType.File:
        raise StorageError(f"--out {uri} is a file; give a folder (new or empty)")
    manifest = _manifest_at(uri)
    if manifest is not None:
        producer = manifest.get("producer", {}).get("command")
        if producer != command:
            raise StorageError(f"--out {uri} holds the output of {_who(producer)}; {_who(command)} will not "
                               f"replace it: choose another --out")
        if manifest["state"] == "complete" and not overwrite:
            raise StorageError(f"--out {uri} holds a previous output of `mrm {command}`; pass --overwrite to "
                               f"replace it, or choose another --out")
        return manifest
    try:
        entries = [i for i in fs.get_file_info(pafs.FileSelector(path))
                   if not i.base_name.startswith((STAGING, LEGACY_STAGING))]
    except OSError as e:
        raise StorageError(f"cannot list {uri}: {str(e).splitlines()[0]}") from None
    if entries:
        raise StorageError(f"--out {uri} is not empty and was not written by `mrm {command}` (it holds "
                           f"{entries[0].base_name}{' and more' if len(entries) > 1 else ''}); nothing was "
                           f"changed: choose a new or empty --out")
    return None


_VERSIONED = re.compile(r"-\d{8}T\d{6}[0-9a-f]{6}\.parquet$")


def _who(command: str | None) -> str:
    return "mrm-ray's Python API" if command == "api" else f"`mrm {command}`"


def _versioned(rel: str, version: str) -> str:
    """part-00000.parquet -> part-00000-<version>.parquet: parts of two versions never collide."""
    stem, dot, ext = rel.rpartition(".")
    return f"{stem}-{version}.{ext}"


def _producer(command: str) -> dict:
    from mrm_ray import __version__
    import sys
    return {"command": command, "mrm_ray": __version__, "argv": sys.argv[1:]}


def _write_manifest(fs, path: str, manifest: dict) -> None:
    tmp = f"{path}/{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open_output_stream(tmp) as f:
        f.write((json.dumps(manifest, indent=1) + "\n").encode())
    fs.move(tmp, f"{path}/{MANIFEST}")  # local: an atomic rename; S3: one PUT of the whole object


@contextmanager
def atomic_output(uri: str, command: str = "api", inputs=(), overwrite: bool = False, describe: dict | None = None):
    """Yield a staging folder URI; commit it as `uri` on success (see the module docstring).

    On an exception nothing that was there before is touched: a previous
    complete output stays complete, and a new one we started is removed.
    """
    old = check_output(uri, command, inputs, overwrite)
    fs, path = resolve(uri)
    version = time.strftime("%Y%m%dT%H%M%S") + uuid.uuid4().hex[:6]
    try:
        fs.create_dir(path, recursive=True)
        fresh = old is None
        if fresh:  # readers refuse a new output until it is committed
            _write_manifest(fs, path, {"state": "writing", "version": version, "producer": _producer(command)})
        staging = join(uri, STAGING + version)
        fs.create_dir(resolve(staging)[1], recursive=True)
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {str(e).splitlines()[0]}") from None
    try:
        yield staging
    except BaseException:
        _discard(fs, path, resolve(staging)[1], fresh)
        raise
    _commit(fs, path, resolve(staging)[1], version, command, old, describe, fresh)


def _discard(fs, path: str, spath: str, fresh: bool) -> None:
    try:
        fs.delete_dir(spath)
        if fresh:  # we created this output: take away our marker, and the folder if nothing else is in it
            fs.delete_file(f"{path}/{MANIFEST}")
            if not fs.get_file_info(pafs.FileSelector(path)):
                fs.delete_dir(path)
    except OSError:
        pass


def _commit(fs, path: str, spath: str, version: str, command: str, old: dict | None, describe: dict | None,
            fresh: bool) -> None:
    placed: list[str] = []
    try:
        tables, others = _place_parts(fs, path, spath, version, placed)
    except BaseException:   # before the commit point: as if nothing happened
        for rel in placed:
            _delete_quietly(fs, f"{path}/{rel}")
        _discard(fs, path, spath, fresh)
        raise
    manifest = {"state": "complete", "version": version, "producer": _producer(command),
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tables": tables,
                "files": [{"path": rel, "bytes": f.size} for rel, f in others], **(describe or {})}
    _write_manifest(fs, path, manifest)                                   # the commit point
    # after it, a failure leaves the new output committed; the next run of the command tidies up
    for rel, f in others:
        fs.create_dir(f"{path}/{rel}".rsplit("/", 1)[0], recursive=True)
        fs.move(f.path, f"{path}/{rel}")
    keep = {p["path"] for t in tables.values() for p in t["parts"]} | {rel for rel, _ in others}
    # What goes: our staging folders, and Parquet parts named by OUR versioning (a previous version's,
    # or those of a run killed between placing its parts and its commit) -- nothing anyone else wrote.
    for i in fs.get_file_info(pafs.FileSelector(path, recursive=True)):
        rel = i.path[len(path) + 1:]
        if i.type == pafs.FileType.Directory and i.base_name.startswith((STAGING, LEGACY_STAGING)):
            _delete_quietly(fs, i.path, directory=True)
        elif (i.type == pafs.FileType.File and _VERSIONED.search(i.base_name) and rel not in keep
              and not rel.startswith((STAGING, LEGACY_STAGING))):
            _delete_quietly(fs, i.path)
    with fs.open_output_stream(f"{path}/{SUCCESS}") as f:
        f.write(b"")


def _place_parts(fs, path: str, spath: str, version: str, placed: list) -> tuple[dict, list]:
    """Move the staged Parquet parts into place under versioned names (appended to `placed` as they
    go); returns (tables, other staged files)."""
    staged = [f for f in fs.get_file_info(pafs.FileSelector(spath, recursive=True)) if f.type == pafs.FileType.File]
    tables: dict[str, dict] = {}
    others = []
    for f in sorted(staged, key=lambda f: f.path):
        rel = f.path[len(spath) + 1:]
        if rel.endswith(".parquet"):
            table = rel.rsplit("/", 1)[0] if "/" in rel else "."
            meta = pq.read_metadata(f.path, filesystem=fs)
            dest = _versioned(rel, version)
            t = tables.setdefault(table, {"parts": [], "rows": 0, "schema": meta.schema.to_arrow_schema().to_string(
                show_schema_metadata=False)})
            t["parts"].append({"path": dest, "rows": meta.num_rows, "bytes": f.size})
            t["rows"] += meta.num_rows
            fs.create_dir(f"{path}/{dest}".rsplit("/", 1)[0], recursive=True)
            fs.move(f.path, f"{path}/{dest}")
            placed.append(dest)
        else:
            others.append((rel, f))
    return tables, others


def _delete_quietly(fs, path: str, directory: bool = False) -> None:
    try:
        fs.delete_dir(path) if directory else fs.delete_file(path)
    except OSError:
        pass


def fingerprint(uri: str) -> str:
    """Identifies a version of a table: its manifest's version, else its part files' names and sizes."""
    import hashlib
    fs, path = resolve(uri)
    manifest = _manifest_at(uri) if is_dir(uri) else None
    if manifest is not None and "version" in manifest:
        return f"mrm:{manifest['version']}"
    files = parquet_files(uri)
    sizes = [i.size for i in fs.get_file_info(files)]
    digest = hashlib.sha256("\n".join(f"{f[len(path):]}:{s}" for f, s in zip(files, sizes)).encode()).hexdigest()
    return f"files:{digest[:16]}"


def dataset(uri: str) -> pads.Dataset:
    fs, _ = resolve(uri)
    return pads.dataset(parquet_files(uri), filesystem=fs, format="parquet")


def schema(uri: str) -> pa.Schema:
    return dataset(uri).schema


def check_table(uri: str) -> pa.Schema:
    """Every part of the table is readable Parquet with the same schema; returns it.

    One footer read per part: stages call it once on each input, before any
    work, so a truncated part or a part of another dimension is one line now,
    not a traceback later.
    """
    fs, _ = resolve(uri)
    first = None
    for path in parquet_files(uri):
        try:
            s = pq.read_schema(path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise StorageError(f"{path} is not a readable Parquet file ({str(e).splitlines()[0][:100]})") from None
        if first is None:
            first, first_path = s, path
        elif _provenance(s) != _provenance(first):   # parts of two `mrm embed` runs put in one folder
            raise StorageError(f"the parts of {uri} were made differently: {path.rsplit('/', 1)[-1]} has "
                               f"{_provenance(s) or 'no provenance'}, {first_path.rsplit('/', 1)[-1]} has "
                               f"{_provenance(first) or 'no provenance'}")
        elif not s.remove_metadata().equals(first.remove_metadata()):
            diff = next((f"{f.name}: {f.type} here, {first.field(f.name).type} in {first_path.rsplit('/', 1)[-1]}"
                         for f in s if f.name in first.names and f.type != first.field(f.name).type),
                        f"columns {s.names} here, {first.names} in {first_path.rsplit('/', 1)[-1]}")
            raise StorageError(f"the parts of {uri} disagree: {path.rsplit('/', 1)[-1]} has {diff}")
    return first


PROVENANCE_PREFIX = "mrm."   # schema metadata: how a table was made (mrm_ray.data.runs.provenance)


def _provenance(schema: pa.Schema) -> dict:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items()
            if k.decode().startswith(PROVENANCE_PREFIX)}


def _read_error(uri: str, e: Exception) -> StorageError:
    return StorageError(f"cannot read {uri}: {str(e).splitlines()[0][:160]}")


def read_table(uri: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """Read (part of) a table.  For small tables and per-shard reads only."""
    try:
        return dataset(uri).to_table(columns=columns, filter=filter)
    except (OSError, pa.ArrowException) as e:
        raise _read_error(uri, e) from None


def iter_batches(uri: str, columns: list[str] | None = None, batch_rows: int = 65536):
    """Stream a table as RecordBatches: memory stays bounded by batch_rows."""
    try:
        yield from dataset(uri).to_batches(columns=columns, batch_size=batch_rows)
    except (OSError, pa.ArrowException) as e:
        raise _read_error(uri, e) from None


def read_json(uri: str):
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:
        raise StorageError(f"no file at {uri}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise StorageError(f"{uri} is not valid JSON ({str(e).splitlines()[0][:80]})") from None
    except OSError as e:
        raise StorageError(f"cannot read {uri}: {str(e).splitlines()[0]}") from None


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


def write_table(table: pa.Table, uri: str, command: str = "api", overwrite: bool = False, inputs=(),
                row_group_rows: int = 65536) -> None:
    """Write one table atomically as `<uri>/part-00000-<version>.parquet` (an output of `mrm <command>`;
    "api": written through the Python API)."""
    with atomic_output(uri, command, inputs, overwrite) as staging:
        fs, spath = resolve(staging)
        pq.write_table(table, f"{spath}/part-00000.parquet", filesystem=fs, row_group_size=row_group_rows)


def write_staged(table: pa.Table, uri: str, row_group_rows: int = 65536) -> None:
    """Write a table as `<uri>/part-00000.parquet` INSIDE a staging folder (the enclosing
    atomic_output commits it; no manifest of its own)."""
    fs, path = resolve(uri)
    fs.create_dir(path, recursive=True)
    pq.write_table(table, f"{path}/part-00000.parquet", filesystem=fs, row_group_size=row_group_rows)


def claim_folder(uri: str, command: str, inputs=(), overwrite: bool = False, resume: bool = False) -> None:
    """Take a folder that a command fills file by file (compare's report, the demo's workdir).

    A folder this command left unfinished is continued when `resume`; a finished
    one needs overwrite; anything else is refused as check_output refuses it.
    """
    manifest = check_output(uri, command, inputs, overwrite=overwrite or resume)
    fs, path = resolve(uri)
    if manifest is not None and manifest["state"] == "complete" and not overwrite:
        raise StorageError(f"--out {uri} holds a finished `mrm {command}`; pass --overwrite to redo it")
    try:
        fs.create_dir(path, recursive=True)
        _write_manifest(fs, path, {"state": "writing", "producer": _producer(command),
                                   "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    except OSError as e:
        raise StorageError(f"cannot write {uri}: {str(e).splitlines()[0]}") from None


def finish_folder(uri: str, command: str, files: list[str]) -> None:
    """Mark a claimed folder complete (its last write)."""
    fs, path = resolve(uri)
    _write_manifest(fs, path, {"state": "complete", "producer": _producer(command),
                               "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "tables": {}, "files": [{"path": f} for f in files]})


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
