"""Support/query/validation splits, seen users, caps and meta-batch slots (mrm_ray.core.splits)."""

import numpy as np
import pyarrow as pa

from mrm_ray.core import splits
from mrm_ray.data import contract as C
from mrm_ray.data import shards


# --- tasks ---------------------------------------------------------------------------------
def make_shard(convs_per_user=(1, 2, 5, 10), pairs_per_conv=2, d=3):
    uid, conv, rows = [], [], 0
    for u, nc in enumerate(convs_per_user):
        for c in range(nc):
            for _ in range(pairs_per_conv):
                uid.append(f"user{u}")
                conv.append(f"c{c}")
                rows += 1
    table = pa.table({C.USER_ID: uid, C.PAIR_ID: [f"p{i}" for i in range(rows)], C.CONV_ID: conv,
                      C.SPLIT: [C.TRAIN] * rows,
                      C.CHOSEN_EMB: pa.FixedSizeListArray.from_arrays(pa.array(np.random.rand(rows * d).astype(np.float32)), d),
                      C.REJECTED_EMB: pa.FixedSizeListArray.from_arrays(pa.array(np.random.rand(rows * d).astype(np.float32)), d)})
    return shards.user_pairs_from_table(C.normalize_embeddings(table))


def test_support_query_never_split_a_conversation():
    shard = make_shard()
    for epoch in range(5):
        s, q = splits.support_query_masks(shard, 0.9, seed=0, epoch=epoch)
        for conv in np.unique(shard.conv):
            rows = shard.conv == conv
            assert s[rows].all() or not s[rows].any()
            assert q[rows].all() or not q[rows].any()
        pu = shard.pair_user()
        assert (np.bincount(pu, weights=s) > 0).all()                    # everyone has support
        single = pu == 0                                                 # one conversation: support = query
        assert s[single].all() and q[single].all()
        multi = pu > 0
        assert not (s & q)[multi].any() and (s | q)[multi].all()


def test_support_query_reshuffles_per_epoch_and_is_seeded():
    shard = make_shard(convs_per_user=(10, 10, 10))
    a = splits.support_query_masks(shard, 0.5, 0, 0)[0]
    assert np.array_equal(a, splits.support_query_masks(shard, 0.5, 0, 0)[0])
    assert any(not np.array_equal(a, splits.support_query_masks(shard, 0.5, 0, e)[0]) for e in range(1, 4))


def test_validation_carve_keeps_training_pairs():
    shard = make_shard()
    val = splits.validation_mask(shard, 0.5, seed=0)
    pu = shard.pair_user()
    assert not val[pu == 0].any()                                        # 1 conversation: nothing carved
    assert (np.bincount(pu, weights=~val) > 0).all()
    s, q = splits.support_query_masks(shard, 0.5, 0, 0, exclude=val)
    assert not (s & val).any() and not (q & val).any()


def test_seen_split_and_caps():
    ids = np.array([f"u{i}" for i in range(10000)], dtype=object)
    seen = shards.seen_mask(ids, seed=3, seen_ratio=0.5)
    assert 0.47 < seen.mean() < 0.53
    assert np.array_equal(seen[::-1], shards.seen_mask(ids[::-1], 3, 0.5))  # a function of the id alone
    assert not np.array_equal(seen, shards.seen_mask(ids, 4, 0.5))
    shard = make_shard(convs_per_user=(1, 3, 8))
    keep = splits.cap_pairs(shard, 3, seed=0)
    assert np.bincount(shard.pair_user(), weights=keep).tolist() == [2, 3, 3]


def test_epoch_slots_do_not_depend_on_sharding():
    h = shards.hash_ids([f"u{i}" for i in range(1000)], 0)
    whole = splits.epoch_slots(h, 31, seed=0, epoch=2)
    assert np.array_equal(whole[500:], splits.epoch_slots(h[500:], 31, seed=0, epoch=2))
    assert 0 <= whole.min() and whole.max() == 30
