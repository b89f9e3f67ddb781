"""The one data contract: column names, dtypes and validation for every table.

Every stage and every test takes the contract's column names from here.
Validation works on one pyarrow Table or
RecordBatch at a time so that it streams: a stage validates each batch as it
reads it, and a bad row anywhere fails the stage with one line that names the
column and a sample row.

Tables (see docs in README "Contracts"):
  pairs       user_id, pair_id, [conv_id], [split], prompt, chosen, rejected
  embeddings  user_id, pair_id, conv_id, split, chosen_emb, rejected_emb,
              [chosen_score, rejected_score]
  candidates  user_id, candidate_id, emb
  scores      user_id, candidate_id, reward, prior
  weights     user_id, theta, n_support, prior
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mrm_ray.errors import UserError

# --- column names ----------------------------------------------------------
USER_ID = "user_id"
PAIR_ID = "pair_id"
CONV_ID = "conv_id"
SPLIT = "split"
PROMPT = "prompt"
CHOSEN = "chosen"
REJECTED = "rejected"
CHOSEN_EMB = "chosen_emb"
REJECTED_EMB = "rejected_emb"
CHOSEN_SCORE = "chosen_score"
REJECTED_SCORE = "rejected_score"
CANDIDATE_ID = "candidate_id"
EMB = "emb"
REWARD = "reward"
PRIOR = "prior"  # True when a user had no support pairs and was scored with theta_0
THETA = "theta"
N_SUPPORT = "n_support"

TRAIN, TEST = "train", "test"
SPLITS = (TRAIN, TEST)
KEY_COLUMNS = (USER_ID, PAIR_ID, CONV_ID, SPLIT)
PAIRS_REQUIRED = (USER_ID, PAIR_ID, PROMPT, CHOSEN, REJECTED)
EMBEDDINGS_REQUIRED = (USER_ID, PAIR_ID, CHOSEN_EMB, REJECTED_EMB)
CANDIDATES_REQUIRED = (USER_ID, CANDIDATE_ID, EMB)

MESSAGE_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
PROMPT_TYPE = pa.list_(MESSAGE_TYPE)


class ContractError(UserError):
    """A table breaks the contract.  The message is one line meant for a user."""


def emb_type(dim: int, dtype=pa.float32()) -> pa.DataType:
    return pa.list_(dtype, dim)


def embeddings_schema(dim: int, with_scores: bool = False, dtype=pa.float32()) -> pa.Schema:
    fields = [pa.field(c, pa.string()) for c in KEY_COLUMNS]
    fields += [pa.field(CHOSEN_EMB, emb_type(dim, dtype)), pa.field(REJECTED_EMB, emb_type(dim, dtype))]
    if with_scores:
        fields += [pa.field(CHOSEN_SCORE, pa.float32()), pa.field(REJECTED_SCORE, pa.float32())]
    return pa.schema(fields)


def candidates_schema(dim: int) -> pa.Schema:
    return pa.schema([pa.field(USER_ID, pa.string()), pa.field(CANDIDATE_ID, pa.string()),
                      pa.field(EMB, emb_type(dim))])


SCORES_SCHEMA = pa.schema([pa.field(USER_ID, pa.string()), pa.field(CANDIDATE_ID, pa.string()),
                           pa.field(REWARD, pa.float32()), pa.field(PRIOR, pa.bool_())])


# --- helpers -----------------------------------------------------------------
def _sample(table, mask, what: str) -> str:
    """'N rows <what>; first: user_id=.., pair_id=..' for a boolean mask over rows."""
    idx = np.flatnonzero(np.asarray(mask, dtype=bool))
    row = int(idx[0])
    keys = [c for c in (USER_ID, PAIR_ID, CANDIDATE_ID) if c in table.column_names]
    desc = ", ".join(f"{c}={table.column(c)[row].as_py()!r}" for c in keys)
    return f"{len(idx)} row(s) {what} (first: row {row}{', ' + desc if desc else ''})"


def require_columns(table, required, what: str) -> None:
    names = table.names if isinstance(table, pa.Schema) else table.column_names
    missing = [c for c in required if c not in names]
    if missing:
        raise ContractError(f"{what} table is missing column(s) {', '.join(missing)}; it has: {', '.join(names)}")


def _require_nonempty_strings(table, column: str, what: str) -> None:
    col = table.column(column)
    if not pa.types.is_string(col.type) and not pa.types.is_large_string(col.type):
        raise ContractError(f"{what} column {column!r} must be strings, got {col.type}")
    bad = pc.fill_null(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(col)), 0), True)
    if pc.any(bad).as_py():
        raise ContractError(f"{what} column {column!r} has empty values: {_sample(table, bad.to_numpy(zero_copy_only=False), 'empty or null')}")


def _require_utf8(table, what: str) -> None:
    """Parquet does not promise valid UTF-8 in string columns; a tokenizer would fail far from here."""
    for name in table.column_names:
        col = table.column(name)
        try:
            col.validate(full=True)
        except pa.ArrowInvalid as e:
            raise ContractError(f"{what} column {name!r} is not valid UTF-8 text ({str(e).splitlines()[0][:80]})") from None


def _fill_string(table, column: str, default_from: str | None = None, value: str | None = None):
    """Add `column` when absent (copying `default_from` or a constant); cast to string."""
    if column not in table.column_names:
        arr = table.column(default_from) if default_from else pa.array([value] * table.num_rows, pa.string())
        return table.append_column(column, arr)
    col = table.column(column)
    if pa.types.is_null(col.type) or not pa.types.is_string(col.type):
        col = pc.cast(col, pa.string())
    if default_from is not None:
        col = pc.if_else(pc.is_null(col), table.column(default_from), col)
    elif value is not None:
        col = pc.fill_null(col, value)
    return table.set_column(table.schema.get_field_index(column), column, col)


def check_split(table, what: str) -> None:
    """split is 'train' or 'test' (null counts as train)."""
    bad = pc.fill_null(pc.invert(pc.is_in(table.column(SPLIT), pa.array(SPLITS))), False)
    if pc.any(bad).as_py():
        bad_np = bad.to_numpy(zero_copy_only=False)
        value = table.column(SPLIT)[int(np.flatnonzero(bad_np)[0])].as_py()
        raise ContractError(f"{what} column 'split' must be 'train' or 'test', found {value!r}: "
                            f"{_sample(table, bad_np, 'with an unknown split')}")


def _check_unique(table, column: str, what: str) -> None:
    col = table.column(column)
    if pc.count_distinct(col).as_py() != len(col):
        counts = pc.value_counts(col)
        dup = [v["values"] for v in counts.to_pylist() if v["counts"] > 1][0]
        raise ContractError(f"{what} column {column!r} must be unique; {dup!r} appears more than once")


def _required_strings(table, columns, what: str):
    """Cast id columns to string and refuse nulls, naming a sample row."""
    for c in columns:
        table = _fill_string(table, c)
        if pc.any(pc.is_null(table.column(c))).as_py():
            raise ContractError(f"{what} column {c!r} has nulls: "
                                f"{_sample(table, pc.is_null(table.column(c)).to_numpy(zero_copy_only=False), 'null')}")
    return table


def _normalize_keys(table, what: str):
    table = _required_strings(table, (USER_ID, PAIR_ID), what)
    table = _fill_string(table, CONV_ID, default_from=PAIR_ID)
    table = _fill_string(table, SPLIT, value=TRAIN)
    check_split(table, what)
    _check_unique(table, PAIR_ID, what)
    return table


# --- pairs -------------------------------------------------------------------
def _prompt_as_messages(col: pa.ChunkedArray, table, what: str) -> pa.Array:
    """Accept list<struct<role, content>> or a plain string (one user message)."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        if col.null_count:
            raise ContractError(f"{what} column 'prompt' has nulls: "
                                f"{_sample(table, col.is_null().to_numpy(zero_copy_only=False), 'null')}")
        n = len(col)
        structs = pa.StructArray.from_arrays([pa.array(["user"] * n), col.cast(pa.string())], ["role", "content"])
        return pa.ListArray.from_arrays(pa.array(np.arange(n + 1, dtype=np.int32)), structs)
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        vt = col.type.value_type
        if pa.types.is_struct(vt) and {vt.field(i).name for i in range(vt.num_fields)} >= {"role", "content"}:
            flat = col.flatten()
            bad_msg = pc.or_(pc.is_null(flat.field("content")), pc.is_null(flat.field("role")))
            if col.null_count or pc.any(bad_msg).as_py():
                raise ContractError(f"{what} column 'prompt' has null messages, roles or contents")
            return col.cast(PROMPT_TYPE)
    raise ContractError(f"{what} column 'prompt' must be a string or a list of {{role, content}} messages, "
                        f"got {col.type}")


def normalize_pairs(table: pa.Table, what: str = "pairs") -> pa.Table:
    """Validate a pairs table (or batch) and fill defaults: conv_id <- pair_id, split <- 'train'."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    require_columns(table, PAIRS_REQUIRED, what)
    _require_utf8(table, what)
    for c in (CHOSEN, REJECTED):
        _require_nonempty_strings(table, c, what)
    table = _normalize_keys(table, what)
    prompt = _prompt_as_messages(table.column(PROMPT), table, what)
    table = table.set_column(table.schema.get_field_index(PROMPT), PROMPT, prompt)
    return table.select([USER_ID, PAIR_ID, CONV_ID, SPLIT, PROMPT, CHOSEN, REJECTED])


# --- embeddings ----------------------------------------------------------------
def emb_matrix(column, what: str = "embeddings", name: str = "") -> np.ndarray:
    """A (rows, d) float32 matrix from a fixed_size_list, list or Ray tensor column.

    Refuses ragged rows (mixed dimensions) and nulls; callers check finiteness.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if isinstance(t, pa.ExtensionType):  # Ray Data's ArrowTensorType
        column = column.storage
        t = column.type
    if column.null_count:
        raise ContractError(f"{what} column {name!r} has null embeddings")
    if pa.types.is_fixed_size_list(t):
        d = t.list_size
        values = column.flatten()
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        d = int(lengths[0]) if len(lengths) else 0
        if len(lengths) and (lengths != d).any():
            raise ContractError(f"{what} column {name!r} mixes embedding dimensions "
                                f"{sorted(set(lengths.tolist()))[:4]}")
        values = column.flatten()
    else:
        raise ContractError(f"{what} column {name!r} must be a list of floats, got {t}")
    if not pa.types.is_floating(values.type):
        raise ContractError(f"{what} column {name!r} must hold floats (float16/32/64), got {values.type}")
    arr = values.to_numpy(zero_copy_only=False)
    return arr.astype(np.float32, copy=False).reshape(len(column), d)


MAX_ABS = 1e12  # no backbone's hidden state comes near: a larger value is a corrupt or unscaled table


def check_values(table, mat: np.ndarray, name: str, what: str) -> None:
    """An embedding matrix's values: finite, and within +-MAX_ABS (one line naming a sample row)."""
    bad = ~np.isfinite(mat).all(axis=1)
    if bad.any():
        raise ContractError(f"{what} column {name!r} has non-finite values (NaN/inf): {_sample(table, bad, 'affected')}")
    huge = (np.abs(mat) > MAX_ABS).any(axis=1)
    if huge.any():
        raise ContractError(f"{what} column {name!r} has values beyond +-{MAX_ABS:g} (a corrupt or unscaled "
                            f"table): {_sample(table, huge, 'affected')}")


def normalize_embeddings(table: pa.Table, what: str = "embeddings", dim: int | None = None) -> pa.Table:
    """Validate an embeddings table (or batch) and fill key defaults.

    Checks dimensions (equal in both columns and to `dim` if given) and
    finiteness, so NaNs never reach training.  Returns the table with
    fixed_size_list<float32>[d] embedding columns.
    """
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    require_columns(table, EMBEDDINGS_REQUIRED, what)
    table = _normalize_keys(table, what)
    out = {c: table.column(c) for c in KEY_COLUMNS}
    dims = set()
    for name in (CHOSEN_EMB, REJECTED_EMB):
        mat = emb_matrix(table.column(name), what, name)
        check_values(table, mat, name, what)
        dims.add(mat.shape[1])
        out[name] = pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])
    if len(dims) > 1:
        raise ContractError(f"{what} columns chosen_emb and rejected_emb have different dimensions {sorted(dims)}")
    if dim is not None and table.num_rows and dims != {dim}:
        raise ContractError(f"{what} embedding dimension {dims.pop()} does not match the expected {dim}")
    for c in (CHOSEN_SCORE, REJECTED_SCORE):
        if c in table.column_names:
            out[c] = pc.cast(table.column(c), pa.float32())
    return pa.table(out)


class UniqueIds:
    """Whole-table uniqueness of an id column, streamed: each id becomes a 128-bit hash (two keyed
    64-bit hashes; a false alarm needs ~2^64 ids) and the hashes are spread over buckets on disk,
    so memory stays bounded whatever the table's size.

        ids = UniqueIds("pair_id", "embeddings")
        for batch in ...: ids.add(batch.column("pair_id"))
        ids.check()
    """

    BUCKETS = 64
    SPILL = 4_000_000   # ids held in memory before their hashes are written out
    KEYS = ("mrm-unique-ids-1", "mrm-unique-ids-2")

    def __init__(self, column: str, what: str):
        import tempfile
        self.column, self.what = column, what
        self.dir = tempfile.TemporaryDirectory(prefix="mrm-unique-")
        self.pending: list[np.ndarray] = []
        self.held = 0

    def add(self, ids) -> None:
        import pandas as pd
        values = np.asarray(ids.to_pylist() if hasattr(ids, "to_pylist") else ids, dtype=object)
        h = np.stack([pd.util.hash_array(values, hash_key=k, categorize=False) for k in self.KEYS], axis=1)
        self.pending.append(h)
        self.held += len(h)
        if self.held >= self.SPILL:
            self._spill()

    def _spill(self) -> None:
        if not self.pending:
            return
        h = np.concatenate(self.pending)
        bucket = (h[:, 0] % np.uint64(self.BUCKETS)).astype(np.int64)
        for b in np.unique(bucket):
            with open(f"{self.dir.name}/{b}.u64", "ab") as f:
                h[bucket == b].tofile(f)
        self.pending, self.held = [], 0

    def check(self) -> None:
        """Raise a ContractError when some id appears more than once."""
        import os
        self._spill()
        try:
            for name in os.listdir(self.dir.name):
                h = np.fromfile(f"{self.dir.name}/{name}", dtype=np.uint64).reshape(-1, 2)
                h = h[np.lexsort((h[:, 1], h[:, 0]))]
                dup = (h[1:] == h[:-1]).all(axis=1)
                if dup.any():
                    raise ContractError(f"{self.what} column {self.column!r} must be unique across the whole "
                                        f"table; {int(dup.sum())} id(s) appear more than once")
        finally:
            self.dir.cleanup()


def normalize_candidates(table: pa.Table, what: str = "candidates", dim: int | None = None) -> pa.Table:
    """Validate a candidates table (or batch): string ids without nulls, finite embeddings of one size."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    require_columns(table, CANDIDATES_REQUIRED, what)
    table = _required_strings(table, (USER_ID, CANDIDATE_ID), what)
    mat = emb_matrix(table.column(EMB), what, EMB)
    check_values(table, mat, EMB, what)
    if dim is not None and table.num_rows and mat.shape[1] != dim:
        raise ContractError(f"{what} embedding dimension {mat.shape[1]} does not match the expected {dim}")
    return pa.table({USER_ID: table.column(USER_ID), CANDIDATE_ID: table.column(CANDIDATE_ID),
                     EMB: pa.FixedSizeListArray.from_arrays(pa.array(mat.reshape(-1)), mat.shape[1])})
