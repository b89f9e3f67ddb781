"""The one user-sharded data layer: how a table becomes shards of whole users in memory.

    user_hash(ids, seed)          THE user hash (SipHash of the id under the run's seed): which users are
                                  seen, which meta-batch and which bucket a user falls in all derive from it
    bucket_of(hashes, n)          THE bucket function: which of n buckets a user's rows go to
    write_buckets(uri, out, ...)  ONE streamed pass over a table that validates every batch and writes the
                                  rows it keeps into n bucket files, whole users per bucket (bounded memory)
    load(uris, seed, ...)         bucket files (or any table) -> UserPairs: Arrow to torch once, rows
                                  grouped by user, embeddings kept as chosen - rejected
    buckets_of_rank(n, rank, world)   the buckets a worker reads: any number of workers, same buckets

Training writes the seen users' train rows into `<run>/shards/` in the driver's
single validating pass over the embeddings table, and worker r then reads only
its buckets (bucket % world == r): the table is read once, and a resume on
another number of workers reads the same buckets.  `mrm evaluate` buckets its
input the same way and evaluates one bucket at a time; `mrm score` routes its
projected rows with the same hash and bucket function.
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from mrm_ray.core.splits import UserPairs, mix64
from mrm_ray.data import contract as C
from mrm_ray.data import storage

BUCKET_SALT = 0x5EED_0F_A11     # buckets are not the seen/unseen coin (unit(user_hash) < seen_ratio)
BUCKET_BYTES = 512 << 20        # evaluation: buckets of about this many embedding bytes in memory
FLUSH_BYTES = 4 << 20           # a bucket's buffered rows are written out as one row group past this...
BUFFER_BYTES = 512 << 20        # ...or earlier, so that all buckets' buffers together stay under this


def hash_ids(ids, seed: int) -> np.ndarray:
    """A stable 64-bit hash of string ids under a seed (vectorised SipHash)."""
    key = f"{seed & 0xFFFFFFFF:08x}mrm-ray!"[:16]
    return pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False)


def user_hash(user_ids, seed: int) -> np.ndarray:
    """The one user hash."""
    return hash_ids(user_ids, seed)


def seen_mask(user_ids, seed: int, seen_ratio: float) -> np.ndarray:
    """True for meta-training ("seen") users: a seeded coin per user id."""
    return unit(user_hash(user_ids, seed)) < seen_ratio


def unit(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def bucket_of(hashes: np.ndarray, n_buckets: int) -> np.ndarray:
    """The bucket (0..n_buckets-1) of each user hash."""
    return (mix64(np.asarray(hashes, dtype=np.uint64), BUCKET_SALT) % np.uint64(n_buckets)).astype(np.int64)


def buckets_of_rank(n_buckets: int, rank: int, world: int) -> list[int]:
    """The buckets worker `rank` of `world` reads."""
    return [b for b in range(n_buckets) if b % world == rank]


def n_buckets_for(rows: int, row_bytes: int, bucket_bytes: int = BUCKET_BYTES) -> int:
    """Buckets for a table of `rows` rows of `row_bytes` embedding bytes, each about `bucket_bytes` in memory."""
    return max(1, math.ceil(rows * row_bytes / bucket_bytes))


def count_rows(uri: str) -> int:
    """Rows of a table, from its Parquet footers."""
    return storage.dataset(uri).count_rows()


def bucket_uri(out: str, b: int) -> str:
    """Bucket b of a sharded output: a table of its own (a folder), so a commit may version its parts."""
    return storage.join(out, f"bucket-{b:05d}")


def bucket_bytes(uris: list[str]) -> int:
    """Bytes on storage of some buckets (what a worker reads)."""
    fs, _ = storage.resolve(uris[0]) if uris else (None, None)
    paths = [p for u in uris for p in storage.parquet_files(u)]
    return sum(i.size for i in fs.get_file_info(paths)) if paths else 0


class BucketWriter:
    """Rows -> n bucket files under `out` (a staging folder), whole users per bucket.

    Rows are buffered per bucket and written as one row group when a bucket's
    buffer passes min(FLUSH_BYTES, BUFFER_BYTES / n), so memory is bounded
    whatever the table's size, and a bucket's file holds a few large row groups.
    """

    def __init__(self, out: str, n_buckets: int, seed: int):
        self.fs, self.base = storage.resolve(out)
        self.fs.create_dir(self.base, recursive=True)
        self.out, self.n, self.seed = out, n_buckets, seed
        self.writers: list[pq.ParquetWriter | None] = [None] * n_buckets
        self.buffers: list[list[pa.Table]] = [[] for _ in range(n_buckets)]
        self.sizes = [0] * n_buckets
        self.flush_bytes = max(64 << 10, min(FLUSH_BYTES, BUFFER_BYTES // n_buckets))
        self.schema = None
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        self.schema = self.schema or table.schema
        table = table.cast(self.schema)
        bucket = bucket_of(user_hash(table.column(C.USER_ID).to_numpy(zero_copy_only=False), self.seed), self.n)
        order = np.argsort(bucket, kind="stable")
        bounds = np.searchsorted(bucket[order], np.arange(self.n + 1))
        table = table.take(pa.array(order))
        for b in np.flatnonzero(np.diff(bounds)):
            part = table.slice(bounds[b], bounds[b + 1] - bounds[b])
            self.buffers[b].append(part)
            self.sizes[b] += part.nbytes
            if self.sizes[b] >= self.flush_bytes:
                self._flush(b)
        self.rows += table.num_rows

    def _flush(self, b: int) -> None:
        if not self.buffers[b]:
            return
        if self.writers[b] is None:
            self.fs.create_dir(f"{self.base}/bucket-{b:05d}", recursive=True)
            self.writers[b] = pq.ParquetWriter(f"{self.base}/bucket-{b:05d}/part-00000.parquet", self.schema,
                                               filesystem=self.fs)
        self.writers[b].write_table(pa.concat_tables(self.buffers[b]))
        self.buffers[b], self.sizes[b] = [], 0

    def close(self, schema: pa.Schema | None = None) -> list[str]:
        """Flush and close; every bucket gets a file (empty ones too).  Returns the bucket URIs."""
        self.schema = self.schema or schema
        for b in range(self.n):
            self._flush(b)
            if self.writers[b] is not None:
                self.writers[b].close()
            elif self.schema is not None:
                self.fs.create_dir(f"{self.base}/bucket-{b:05d}", recursive=True)
                pq.write_table(self.schema.empty_table(), f"{self.base}/bucket-{b:05d}/part-00000.parquet",
                               filesystem=self.fs)
        return [bucket_uri(self.out, b) for b in range(self.n)]


def write_buckets(uri: str, out: str, n_buckets: int, seed: int, normalize=None, keep=None,
                  columns: list[str] | None = None, batch_rows: int = 65536, progress=None) -> list[str]:
    """One streamed pass: validate every batch (`normalize(batch) -> table`), keep the rows `keep(table)`
    selects (a boolean mask), and write them into `n_buckets` bucket files under `out`."""
    writer = BucketWriter(out, n_buckets, seed)
    schema = None
    for batch in storage.iter_batches(uri, columns=columns, batch_rows=batch_rows):
        table = normalize(batch) if normalize else pa.Table.from_batches([batch])
        schema = table.schema
        if keep is not None:
            table = table.filter(pa.array(keep(table)))
        writer.write(table)
        if progress is not None:
            progress(batch.num_rows)
    if schema is None:   # an empty table: empty buckets of its schema
        schema = storage.schema(uri)
        schema = pa.schema([schema.field(c) for c in columns]) if columns else schema
    return writer.close(schema)


# --- Arrow -> torch, once ----------------------------------------------------------------
def user_pairs_from_table(table: pa.Table, users: np.ndarray | None = None, seed: int = 0,
                          dtype: torch.dtype = torch.float32) -> UserPairs:
    """Group an embeddings table (already normalized) by user.

    `users` fixes the user order (users with no rows get an empty block);
    otherwise users appear sorted by id.  Rows are sorted by (user,
    conversation, pair id): the same shard whatever the file order.  `dtype`
    of the stored differences: float32, or bfloat16/float16 to halve a
    worker's memory (meta-training multiplies them in float32).
    """
    uid = table.column(C.USER_ID).to_numpy(zero_copy_only=False).astype(object)
    conv_key = pc.binary_join_element_wise(table.column(C.USER_ID), table.column(C.CONV_ID), "\x1f")
    conv_key = conv_key.to_numpy(zero_copy_only=False).astype(object)
    if users is None:
        users = np.unique(uid)
    users = np.asarray(users, dtype=object)
    pos = pd.Index(users).get_indexer(uid)
    keep = pos >= 0
    pair_key = table.column(C.PAIR_ID).to_numpy(zero_copy_only=False).astype(object)
    conv_codes, conv_uniq = pd.factorize(conv_key, sort=True)
    pair_rank = pd.factorize(pair_key, sort=True)[0]
    order = np.lexsort((pair_rank, conv_codes, pos))
    order = order[keep[order]]
    take = pa.array(order)
    chosen = C.emb_matrix(table.column(C.CHOSEN_EMB).take(take), name=C.CHOSEN_EMB)
    rejected = C.emb_matrix(table.column(C.REJECTED_EMB).take(take), name=C.REJECTED_EMB)
    diff = torch.from_numpy(chosen - rejected).to(dtype)
    counts = np.bincount(pos[order], minlength=len(users))
    used_convs, conv = np.unique(conv_codes[order], return_inverse=True)
    is_test = None
    if C.SPLIT in table.column_names:
        is_test = pc.equal(table.column(C.SPLIT), C.TEST).to_numpy(zero_copy_only=False)[order]
    return UserPairs(users, np.r_[0, np.cumsum(counts)].astype(np.int64), conv.astype(np.int64),
                     hash_ids(np.asarray(conv_uniq, dtype=object)[used_convs], 0), diff, is_test,
                     pair_order=pair_rank[order].astype(np.int64), user_hash=user_hash(users, seed))


def load(uris: list[str], seed: int, columns: list[str] | None = None, users: np.ndarray | None = None,
         dtype: torch.dtype = torch.float32) -> UserPairs:
    """Bucket files (already validated when written) -> one UserPairs."""
    tables = [storage.read_table(u, columns=columns) for u in uris]
    tables = [t for t in tables if t.num_rows]
    if not tables:
        schema = C.embeddings_schema(1)
        table = schema.empty_table() if columns is None else schema.empty_table().select(
            [c for c in columns if c in schema.names])
    else:
        table = pa.concat_tables(tables)
    return user_pairs_from_table(table, users=users, seed=seed, dtype=dtype)


def shard_dtype(name: str, dim: int) -> torch.dtype:
    """The dtype a worker keeps its embeddings in: auto = bfloat16 from d >= 1024 (halves memory)."""
    if name == "auto":
        return torch.bfloat16 if dim >= 1024 else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]
