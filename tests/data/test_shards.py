"""The one user-sharded data layer (mrm_ray.data.shards): partition, then load, equals loading the whole table."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from mrm_ray.core import splits
from mrm_ray.data import contract as C
from mrm_ray.data import shards, storage
from mrm_ray.synth import write_embedding_population

SEED = 7


@pytest.fixture(scope="module")
def table_uri(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("shards") / "emb")
    write_embedding_population(uri, users=300, pairs_per_user=12, dim=8, seed=2)
    return uri


def assert_same_users(a: splits.UserPairs, b: splits.UserPairs) -> None:
    """Same users in the same order, each with the same rows (pairs, conversations, split, order)."""
    np.testing.assert_array_equal(a.user_ids, b.user_ids)
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.user_hash, b.user_hash)
    np.testing.assert_array_equal(a.is_test, b.is_test)
    torch.testing.assert_close(a.diff, b.diff, atol=0, rtol=0)
    for u in range(a.n_users):   # conversation ids are per shard; a user's grouping and pair order are not
        ra, rb = slice(a.offsets[u], a.offsets[u + 1]), slice(b.offsets[u], b.offsets[u + 1])
        np.testing.assert_array_equal(a.conv_hash[a.conv[ra]], b.conv_hash[b.conv[rb]])
        np.testing.assert_array_equal(np.argsort(a.pair_order[ra]), np.argsort(b.pair_order[rb]))


@pytest.mark.parametrize("world", [1, 3])
def test_partition_then_load_equals_whole_table_load(table_uri, tmp_path, world):
    whole = shards.user_pairs_from_table(C.normalize_embeddings(storage.read_table(table_uri)), seed=SEED)
    out = str(tmp_path / "buckets")
    shards.write_buckets(table_uri, out, 16, SEED, normalize=C.normalize_embeddings, batch_rows=500)
    per_rank = [shards.load([shards.bucket_uri(out, b) for b in shards.buckets_of_rank(16, r, world)], SEED)
                for r in range(world)]
    assert sum(p.n_users for p in per_rank) == whole.n_users        # every user on exactly one worker
    assert set().union(*(set(p.user_ids) for p in per_rank)) == set(whole.user_ids)
    for part in per_rank:   # each worker's users, user for user, as the whole-table load has them
        assert_same_users(part, whole.select(np.isin(whole.user_ids, part.user_ids)[whole.pair_user()],
                                             keep_empty_users=False))


def test_buckets_hold_whole_users_and_do_not_depend_on_the_batching(table_uri, tmp_path):
    ids = {}
    for rows in (97, 4000):
        out = str(tmp_path / f"b{rows}")
        uris = shards.write_buckets(table_uri, out, 5, SEED, normalize=C.normalize_embeddings, batch_rows=rows)
        ids[rows] = [sorted(set(storage.read_table(u, columns=[C.USER_ID]).column(0).to_pylist())) for u in uris]
    assert ids[97] == ids[4000]
    users = [u for bucket in ids[97] for u in bucket]
    assert len(users) == len(set(users)) == 300
    want = shards.bucket_of(shards.user_hash(np.array(users, dtype=object), SEED), 5)
    got = np.repeat(np.arange(5), [len(b) for b in ids[97]])
    np.testing.assert_array_equal(want, got)                           # THE bucket function


def test_the_one_user_hash_drives_seen_users_and_buckets():
    ids = np.array([f"user-{i}" for i in range(2000)], dtype=object)
    h = shards.user_hash(ids, SEED)
    np.testing.assert_array_equal(shards.seen_mask(ids, SEED, 0.5), shards.unit(h) < 0.5)
    seen = shards.seen_mask(ids, SEED, 0.5)
    assert 0.45 < seen.mean() < 0.55
    # buckets are not the seen coin: both halves fill every bucket
    for half in (seen, ~seen):
        assert np.bincount(shards.bucket_of(h[half], 8), minlength=8).min() > 50
    assert not np.array_equal(shards.user_hash(ids, SEED), shards.user_hash(ids, SEED + 1))


def test_a_rank_reads_only_its_buckets(table_uri, tmp_path):
    out = str(tmp_path / "buckets")
    uris = shards.write_buckets(table_uri, out, 8, SEED, normalize=C.normalize_embeddings)
    sizes = [shards.count_rows(u) for u in uris]
    for world in (2, 3, 8):
        mine = [shards.buckets_of_rank(8, r, world) for r in range(world)]
        assert sorted(b for m in mine for b in m) == list(range(8))      # a partition of the buckets
        assert sum(sizes[b] for b in mine[0]) < sum(sizes)                # rank 0 reads its share only


def test_bf16_shards_halve_memory_and_keep_float32_math(table_uri):
    t = C.normalize_embeddings(storage.read_table(table_uri))
    f32 = shards.user_pairs_from_table(t, seed=SEED)
    b16 = shards.user_pairs_from_table(t, seed=SEED, dtype=shards.shard_dtype("bfloat16", 8))
    assert b16.diff.dtype == torch.bfloat16
    assert b16.diff.element_size() * 2 == f32.diff.element_size()
    torch.testing.assert_close(b16.diff.float(), f32.diff, atol=0.02, rtol=0.01)
    assert shards.shard_dtype("auto", 1024) == torch.bfloat16 and shards.shard_dtype("auto", 64) == torch.float32


def test_an_empty_bucket_loads_as_no_users(tmp_path):
    schema = C.embeddings_schema(4)
    shards.write_buckets(_write(tmp_path, schema.empty_table()), str(tmp_path / "b"), 3, SEED)
    assert shards.load([shards.bucket_uri(str(tmp_path / "b"), b) for b in range(3)], SEED).n_users == 0


def _write(tmp_path, table: pa.Table) -> str:
    uri = str(tmp_path / "t")
    storage.write_table(table, uri)
    return uri
