"""Known answers for RPO and metrics; task splits; contract validation; configs."""
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from mrm_ray import contract as C
from mrm_ray import metrics, rpo, tasks
from mrm_ray.config import ConfigError, load_config, parse_overrides


# --- RPO ------------------------------------------------------------------------------
def test_rpo_soft_known_answer():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    cfg = rpo.RPOConfig(alpha=0.5, gamma=0.5)
    w = torch.sigmoid(torch.tensor([-3.0, -1.0, 1.0, 3.0]))  # (L - tau) / gamma with tau = 2.5
    torch.testing.assert_close(rpo.weights(L, cfg), w)
    torch.testing.assert_close(rpo.objective(L, cfg), (w * L).sum())


def test_rpo_hard_and_off_known_answers():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert rpo.objective(L, rpo.RPOConfig(alpha=0.5, gamma=0.0)).item() == 7.0   # top half: 3 + 4
    assert rpo.objective(L, rpo.RPOConfig(alpha=0.25, gamma=-1)).item() == 4.0  # tau = 3.25
    assert rpo.objective(L, rpo.RPOConfig(enabled=False)).item() == 2.5          # plain mean


def test_rpo_gradient_through_weights_and_tau():
    L = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = torch.sigmoid((L - 2.5) / 0.5)
    direct = w + w * (1 - w) * L / 0.5                       # d/dL_i of w_i L_i with tau fixed
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="tau"))
    torch.testing.assert_close(c, direct)
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="weights"))
    torch.testing.assert_close(c, w)
    # reference form: tau = (L_2 + L_3) / 2 also carries gradient, shared by the two middle users
    _, c = rpo.coefficients(L, rpo.RPOConfig(detach="none"))
    through_tau = -(w * (1 - w) * L / 0.5).sum() / 2
    torch.testing.assert_close(c, direct + torch.tensor([0, through_tau, through_tau, 0]))


def test_rpo_coefficients_reproduce_the_objective_gradient():
    """Distributed form: backprop sum_i c_i L_i == backprop J (any split of the users)."""
    x = torch.randn(9, requires_grad=True)
    L = torch.nn.functional.softplus(x * 3)
    cfg = rpo.RPOConfig(alpha=0.3, gamma=0.2)
    (g_direct,) = torch.autograd.grad(rpo.objective(L, cfg), x, retain_graph=True)
    _, c = rpo.coefficients(L.detach(), cfg)
    (g_coef,) = torch.autograd.grad((c * L).sum(), x)
    torch.testing.assert_close(g_direct, g_coef)


# --- metrics ----------------------------------------------------------------------------
def test_summary_known_answer():
    acc = np.array([0.1, 0.5, 0.9, 1.0] + [0.8] * 16)
    s = metrics.summarize(acc, np.full(20, 10))
    assert s["users"] == 20 and s["pairs"] == 200
    assert math.isclose(s["accuracy"], acc.mean())
    assert math.isclose(s["worst10_accuracy"], (0.1 + 0.5) / 2)     # 10% of 20 users = 2
    assert math.isclose(s["std"], acc.std())
    assert metrics.summarize(np.array([0.3, 0.7]), np.array([1, 1]))["worst10_accuracy"] == 0.3  # >= 1 user


def test_ties_count_as_wrong():
    c, n = metrics.per_user_correct(torch.tensor([0.0, 1.0, -1.0, 2.0]), torch.tensor([0, 0, 1, 1]), 2)
    assert c.tolist() == [1.0, 1.0] and n.tolist() == [2.0, 2.0]


def test_report_splits_users():
    rep = metrics.report({"seen": np.array([True, True, False]), "accuracy": np.array([1.0, 0.5, 0.25]),
                          "test_pairs": np.array([4, 2, 4])})
    assert rep["seen"]["accuracy"] == 0.75 and rep["unseen"]["accuracy"] == 0.25
    assert math.isclose(rep["overall"]["accuracy"], 1.75 / 3)        # user-weighted, not pair-weighted


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
    return tasks.user_pairs_from_table(C.normalize_embeddings(table))


def test_support_query_never_split_a_conversation():
    shard = make_shard()
    for epoch in range(5):
        s, q = tasks.support_query_masks(shard, 0.9, seed=0, epoch=epoch)
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
    a = tasks.support_query_masks(shard, 0.5, 0, 0)[0]
    assert np.array_equal(a, tasks.support_query_masks(shard, 0.5, 0, 0)[0])
    assert any(not np.array_equal(a, tasks.support_query_masks(shard, 0.5, 0, e)[0]) for e in range(1, 4))


def test_validation_carve_keeps_training_pairs():
    shard = make_shard()
    val = tasks.validation_mask(shard, 0.5, seed=0)
    pu = shard.pair_user()
    assert not val[pu == 0].any()                                        # 1 conversation: nothing carved
    assert (np.bincount(pu, weights=~val) > 0).all()
    s, q = tasks.support_query_masks(shard, 0.5, 0, 0, exclude=val)
    assert not (s & val).any() and not (q & val).any()


def test_seen_split_and_caps():
    ids = np.array([f"u{i}" for i in range(10000)], dtype=object)
    seen = tasks.seen_mask(ids, seed=3, seen_ratio=0.5)
    assert 0.47 < seen.mean() < 0.53
    assert np.array_equal(seen[::-1], tasks.seen_mask(ids[::-1], 3, 0.5))  # a function of the id alone
    assert not np.array_equal(seen, tasks.seen_mask(ids, 4, 0.5))
    shard = make_shard(convs_per_user=(1, 3, 8))
    keep = tasks.cap_pairs(shard, 3, seed=0)
    assert np.bincount(shard.pair_user(), weights=keep).tolist() == [2, 3, 3]


def test_epoch_slots_do_not_depend_on_sharding():
    h = tasks.hash_ids([f"u{i}" for i in range(1000)], 0)
    whole = tasks.epoch_slots(h, 31, seed=0, epoch=2)
    assert np.array_equal(whole[500:], tasks.epoch_slots(h[500:], 31, seed=0, epoch=2))
    assert 0 <= whole.min() and whole.max() == 30


# --- contract ------------------------------------------------------------------------------
def pairs(**over):
    base = {C.USER_ID: ["a", "b"], C.PAIR_ID: ["1", "2"], C.PROMPT: ["hi", "yo"],
            C.CHOSEN: ["good", "fine"], C.REJECTED: ["bad", "meh"]}
    base.update(over)
    return pa.table({k: v for k, v in base.items() if v is not None})


def test_pairs_defaults_and_string_prompt():
    t = C.normalize_pairs(pairs())
    assert t.column(C.CONV_ID).to_pylist() == ["1", "2"] and t.column(C.SPLIT).to_pylist() == ["train"] * 2
    assert t.column(C.PROMPT).to_pylist()[0] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("table, needle", [
    (pairs(chosen=None), "missing column(s) chosen"),
    (pairs(rejected=["bad", " "]), "'rejected' has empty values: 1 row(s) empty or null (first: row 1, user_id='b'"),
    (pairs(split=["train", "dev"]), "found 'dev'"),
    (pairs(pair_id=["1", "1"]), "'pair_id' must be unique; '1'"),
    (pairs(prompt=[1, 2]), "'prompt' must be a string or a list"),
])
def test_pairs_refused_with_one_line(table, needle):
    with pytest.raises(C.ContractError) as e:
        C.normalize_pairs(table)
    assert needle in str(e.value) and "\n" not in str(e.value)


def emb_table(chosen, rejected):
    return pa.table({C.USER_ID: ["a"] * len(chosen), C.PAIR_ID: [str(i) for i in range(len(chosen))],
                     C.CHOSEN_EMB: chosen, C.REJECTED_EMB: rejected})


def test_embeddings_refused():
    with pytest.raises(C.ContractError, match="non-finite"):
        C.normalize_embeddings(emb_table([[1.0, float("nan")]], [[1.0, 2.0]]))
    with pytest.raises(C.ContractError, match="mixes embedding dimensions"):
        C.normalize_embeddings(emb_table([[1.0, 2.0], [1.0]], [[1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(C.ContractError, match="different dimensions"):
        C.normalize_embeddings(emb_table([[1.0, 2.0]], [[1.0, 2.0, 3.0]]))
    with pytest.raises(C.ContractError, match="does not match the expected 3"):
        C.normalize_embeddings(emb_table([[1.0, 2.0]], [[1.0, 2.0]]), dim=3)
    t = C.normalize_embeddings(emb_table([[1.0, 2.0]], [[3.0, 4.0]]))  # plain lists accepted
    assert t.schema.field(C.CHOSEN_EMB).type == pa.list_(pa.float32(), 2)


# --- config --------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    ("meta_lr=-1", "meta_lr must be > 0"), ("inner.lr=-0.1", "inner.lr must be > 0"),
    ("rpo.alpha=1.5", "rpo.alpha must be in (0, 1]"), ("rpo.alpha=0", "rpo.alpha must be in (0, 1]"),
    ("tasks_per_batch=0", "tasks_per_batch must be >= 1"), ("nope=1", "unknown config key 'nope'"),
    ("inner.nope=1", "unknown config key 'inner.nope'"), ("epochs=abc", "epochs expects int"),
    ("rpo.enabled=maybe", "rpo.enabled must be true or false"), ("inner=3", "is a section"),
])
def test_config_refuses_impossible_values(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(overrides=[override])
    assert needle in str(e.value)


def test_config_presets_and_overrides():
    cfg = load_config("prism", overrides=["inner.steps=3", "rpo.enabled=false", "model.hidden_sizes=[8]"])
    assert cfg.meta_lr == 1e-3 and cfg.tasks_per_batch == 2 and cfg.epochs == 200
    assert cfg.inner.optimizer == "adam" and cfg.inner.steps == 3 and not cfg.rpo.enabled
    assert cfg.model.hidden_sizes == [8]
    assert load_config("reddit").seen_train_limit == 100
    assert parse_overrides(["a.b=1", "c=2"]) == {"a": {"b": "1"}, "c": "2"}
    cfg = load_config(text="epochs: 3\ninner:\n  lr: 0.5\n")
    assert cfg.epochs == 3 and cfg.inner.lr == 0.5
