"""External group-by-user: stream a table into hash partitions of whole users.

Stages that need ALL pairs of a user together (evaluation, scoring) cannot
assume the input is sorted by user.  One streaming pass writes every row to
partition hash(user_id) % n_parts; afterwards each partition holds complete
users and is small enough to process in memory, one at a time or in parallel.
Memory stays bounded by one input batch plus one partition.
"""
from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mrm_ray import contract as C
from mrm_ray import storage, tasks

ROWS_PER_PART = 1_000_000


def n_parts_for(rows: int, rows_per_part: int = ROWS_PER_PART) -> int:
    return max(1, math.ceil(rows / rows_per_part))


def count_rows(uri: str) -> int:
    return sum(pq.ParquetFile(f, filesystem=storage.resolve(uri)[0]).metadata.num_rows
               for f in storage.parquet_files(uri))


def partition_by_user(uri: str, out_dir: str, n_parts: int, columns: list[str] | None = None,
                      normalize=None, batch_rows: int = 65536) -> list[str]:
    """Write `uri`'s rows into `n_parts` Parquet files under `out_dir`, grouped by user hash.

    `normalize(batch) -> table` validates each batch on the way (contract checks).
    Returns the partition URIs (a partition with no rows is still written, empty).
    """
    fs, base = storage.resolve(out_dir)
    fs.create_dir(base, recursive=True)
    writers: list[pq.ParquetWriter | None] = [None] * n_parts
    paths = [f"{base}/part-{i:05d}.parquet" for i in range(n_parts)]
    schema = None
    try:
        for batch in storage.iter_batches(uri, columns=columns, batch_rows=batch_rows):
            table = normalize(batch) if normalize else pa.Table.from_batches([batch])
            schema = schema or table.schema
            part = (tasks.hash_ids(table.column(C.USER_ID).to_numpy(zero_copy_only=False), 17)
                    % np.uint64(n_parts)).astype(np.int64)
            for i in np.unique(part):
                if writers[i] is None:
                    writers[i] = pq.ParquetWriter(paths[i], table.schema, filesystem=fs)
                writers[i].write_table(table.filter(pa.array(part == i)).cast(writers[i].schema))
    finally:
        for w in writers:
            if w is not None:
                w.close()
    for i, w in enumerate(writers):
        if w is None and schema is not None:
            pq.write_table(schema.empty_table(), paths[i], filesystem=fs)
    return [storage.join(out_dir, f"part-{i:05d}.parquet") for i in range(n_parts)]

