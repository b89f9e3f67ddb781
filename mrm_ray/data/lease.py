"""One owner at a time for a run directory, on local disk and on S3.

    with Lease(run_uri, "train"):
        ...   # nobody else trains into run_uri meanwhile

Local disk: an exclusive flock on `<run>/_lock`, which the kernel releases when
the process ends, however it ends; no stale locks.

S3: `<run>/_lock.json` written only if absent (a conditional PUT,
If-None-Match: *), rewritten every `renew` seconds by its owner (If-Match its
own ETag) and deleted at the end.  A lock not renewed for `stale` seconds
belongs to a process that died: it is taken over by a PUT conditional on the
stale ETag, so two takers cannot both win.

Either way a second owner fails at once with one line that names the first.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid

from mrm_ray.data import storage

log = logging.getLogger(__name__)


class LeaseHeld(storage.StorageError):
    pass


def _holder(command: str) -> dict:
    return {"owner": uuid.uuid4().hex, "command": command, "host": socket.gethostname(), "pid": os.getpid(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _describe(info: dict) -> str:
    return f"`mrm {info.get('command', '?')}` (pid {info.get('pid', '?')} on {info.get('host', '?')}, since {info.get('since', '?')})"


class Lease:
    def __init__(self, uri: str, command: str, renew: float = 30.0, stale: float = 180.0):
        self.uri, self.command, self.renew, self.stale = uri, command, renew, stale
        self.info = _holder(command)
        self._fd = None
        self._stop = threading.Event()
        self._thread = None
        self._etag = None

    # --- local disk -------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl
        _, path = storage.resolve(self.uri)
        os.makedirs(path, exist_ok=True)
        fd = os.open(os.path.join(path, "_lock"), os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise LeaseHeld(f"{self.uri} is in use by {_describe(info)}; wait for it or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(self.info).encode(), 0)
        self._fd = fd

    # --- S3 ------------------------------------------------------------------------------
    def _client(self):
        import botocore.session
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        return botocore.session.get_session().create_client("s3", endpoint_url=endpoint, region_name=region)

    def _key(self):
        bucket, _, prefix = self.uri[len("s3://"):].partition("/")
        return bucket, f"{prefix.rstrip('/')}/_lock.json".lstrip("/")

    def _put(self, client, **condition) -> str:
        bucket, key = self._key()
        body = json.dumps({**self.info, "renewed": time.time()}).encode()
        return client.put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]

    def _acquire_s3(self) -> None:
        from botocore.exceptions import ClientError
        client = self._client()
        bucket, key = self._key()
        try:
            self._etag = self._put(client, IfNoneMatch="*")
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                raise storage.StorageError(f"cannot lock {self.uri}: {str(e).splitlines()[0]}") from None
            current = client.get_object(Bucket=bucket, Key=key)
            info = json.loads(current["Body"].read().decode() or "{}")
            age = time.time() - float(info.get("renewed", 0))
            if age < self.stale:
                raise LeaseHeld(f"{self.uri} is in use by {_describe(info)}; wait for it or choose another "
                                f"--out") from None
            try:  # the owner stopped renewing: take over, only if nobody else did first
                self._etag = self._put(client, IfMatch=current["ETag"])
            except ClientError:
                raise LeaseHeld(f"{self.uri} was just taken over by another process; choose another --out") from None
            log.warning("took over the lock of %s from %s, not renewed for %.0fs", self.uri, _describe(info), age)
        self._thread = threading.Thread(target=self._heartbeat, args=(client,), daemon=True)
        self._thread.start()

    def _heartbeat(self, client) -> None:
        from botocore.exceptions import ClientError
        while not self._stop.wait(self.renew):
            try:
                self._etag = self._put(client, IfMatch=self._etag)
            except ClientError:
                log.error("lost the lock of %s to another process", self.uri)
                return

    # --- both ---------------------------------------------------------------------------
    def __enter__(self) -> "Lease":
        (self._acquire_s3 if storage.is_remote(self.uri) else self._acquire_local)()
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # releases the flock; the file stays (it is harmless and reused)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            bucket, key = self._key()
            try:
                self._client().delete_object(Bucket=bucket, Key=key, IfMatch=self._etag)
            except Exception:  # noqa: BLE001 - best effort: a stale lock is taken over later anyway
                pass
