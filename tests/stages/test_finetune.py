"""`mrm finetune`: Ray Train workers with DeepSpeed ZeRO over gloo, on a tiny offline Llama reward model.

Real parts throughout: a local Ray cluster, TorchTrainer, DeepSpeed's engine and checkpoints, Parquet
buckets.  The trajectory checks compare the per-step global training losses the runs record.
"""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from helpers import one_line_error
from mrm_ray import cli
from mrm_ray.core.finetune import FinetuneConfig
from mrm_ray.data import contract as C
from mrm_ray.config import TrainConfig
from mrm_ray.data import runs, shards, storage
from mrm_ray.finetune import finetune
from reference_loops import meta_margins_loop
from tiny_models import tiny_reward_model

TOL = 1e-5   # per-step loss, float32: the workers' partial sums are added in another order


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mrm_ray.synth import synth

    root = tmp_path_factory.mktemp("finetune")
    synth(str(root / "pairs"), kind="text", users=24, pairs_per_user=12, seed=0)
    return {"root": root, "pairs": str(root / "pairs"), "model": tiny_reward_model(root / "model", layers=3),
            "dropout_model": tiny_reward_model(root / "model-dropout", layers=3, attention_dropout=0.2)}


def run(setup, name: str, model: str = "model", **overrides) -> dict:
    # dropout off: the trajectory checks compare steps exactly (dropout draws differ with the workers)
    cfg = FinetuneConfig(**{"epochs": 2, "batch_pairs": 16, "cpus_per_worker": 0.5, "dropout": False, **overrides})
    return finetune(setup["pairs"], str(setup["root"] / name), setup[model], cfg)


@pytest.fixture(scope="module")
def one_worker(setup, ray_local):
    return run(setup, "w1")


def test_two_workers_with_zero3_take_the_steps_of_one(setup, one_worker):
    """The default objective (meta): a step's users are the same set however they are sharded."""
    two = run(setup, "w2", num_workers=2, zero_stage=3)
    assert len(one_worker["steps"]) == len(two["steps"]) >= 6   # whole users per slot: a slot can be empty
    np.testing.assert_allclose(two["steps"], one_worker["steps"], atol=TOL, rtol=0)
    first, last = (h["train_loss"] for h in (one_worker["history"][0], one_worker["history"][-1]))
    assert last < first   # it learns (epoch means: one step's users are a draw)
    for a, b in zip(one_worker["history"], two["history"]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)


def test_factors_objective_two_workers_take_the_steps_of_one(setup, ray_local):
    """objective=factors: a step's global batch is a hash slot of pairs, whichever worker holds them."""
    one = run(setup, "f1", objective="factors")
    two = run(setup, "f2", objective="factors", num_workers=2)
    assert len(one["steps"]) == len(two["steps"]) >= 8
    np.testing.assert_allclose(two["steps"], one["steps"], atol=TOL, rtol=0)
    for a, b in zip(one["history"], two["history"]):
        assert a["val_accuracy"] == b["val_accuracy"] and a["val_loss"] == pytest.approx(b["val_loss"], abs=TOL)
        assert 0 < a["train_loss"] < 2 and 0 <= a["train_accuracy"] <= 1


def test_only_seen_users_train_pairs_are_fine_tuned_on(setup, one_worker):
    import pyarrow as pa

    data = pa.concat_tables([storage.read_table(shards.bucket_uri(str(setup["root"] / "w1" / "data"), b))
                             for b in range(FinetuneConfig().buckets)])
    pairs = storage.read_table(setup["pairs"])
    cfg = FinetuneConfig()
    seen = shards.seen_mask(pairs.column(C.USER_ID).to_numpy(zero_copy_only=False), cfg.seed, cfg.seen_ratio)
    expected = pairs.filter(pc.and_(pc.equal(pairs.column(C.SPLIT), C.TRAIN), seen))
    assert 0 < data.num_rows == expected.num_rows < pairs.num_rows
    assert set(data.column(C.PAIR_ID).to_pylist()) == set(expected.column(C.PAIR_ID).to_pylist())


def test_a_resumed_run_continues_the_same_trajectory(setup, one_worker):
    """With dropout on (the default): its draws are seeded per epoch, so a resume draws them again."""
    whole = run(setup, "whole", "dropout_model", dropout=True)
    # the same weights (the same seed) with dropout off are one_worker's: the draws are on
    assert not np.allclose(whole["steps"], one_worker["steps"], atol=TOL, rtol=0)
    first = run(setup, "resumed", "dropout_model", epochs=1, dropout=True)
    assert len(first["history"]) == 1
    done = run(setup, "resumed", "dropout_model", dropout=True)   # the same directory, two epochs: continues
    assert [h["epoch"] for h in done["history"]] == [1, 2]
    np.testing.assert_allclose(done["steps"], whole["steps"], atol=TOL, rtol=0)


def test_another_draw_fine_tunes_the_same_data_with_other_draws(setup, one_worker, capsys):
    """draw=1: the split, the carve and the data are the seed's (mrm train's), the steps are another draw's;
    continuing a run under another draw or split is refused in one line, before or after its first epoch."""
    other = run(setup, "draw1", draw=1)
    root = setup["root"]
    assert storage.read_table(str(root / "w1" / "users.parquet")).equals(
        storage.read_table(str(root / "draw1" / "users.parquet")))
    for b in range(FinetuneConfig().buckets):
        assert storage.read_table(shards.bucket_uri(str(root / "w1" / "data"), b)).equals(
            storage.read_table(shards.bucket_uri(str(root / "draw1" / "data"), b)))
    assert not np.allclose(other["steps"][:3], one_worker["steps"][:3], atol=1e-3, rtol=0)
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(root / "draw1"), "--model", setup["model"],
                   "dropout=false", "draw=0"])
    one_line_error(capsys, rc, "draw")
    started = root / "started"                     # stopped before its first epoch: data, no finetune.json
    started.mkdir()
    (started / "users.parquet").symlink_to(root / "w1" / "users.parquet")
    from mrm_ray.errors import UserError
    from mrm_ray.finetune import check_continuation

    with pytest.raises(UserError, match="seed"):
        check_continuation(str(started), FinetuneConfig(seed=1))
    check_continuation(str(started), FinetuneConfig(draw=3))   # no epoch yet: any draw may start it


def test_the_saved_backbone_loads_and_embeds_like_the_fine_tuned_model(setup, one_worker, tmp_path, capsys):
    from transformers import AutoModelForSequenceClassification

    from mrm_ray.backbone import encode_pairs, load_backbone
    from mrm_ray.embed import embed

    out = setup["root"] / "w1" / "model"
    tuned = AutoModelForSequenceClassification.from_pretrained(out)
    original = AutoModelForSequenceClassification.from_pretrained(setup["model"])
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, original.get_parameter(n))}
    assert changed and all(".layers.1." in n or ".layers.2." in n for n in changed), changed  # top 2 of 3 blocks
    embed(setup["pairs"], str(tmp_path / "emb"), model=str(out), dtype="float32")
    table = storage.read_table(str(tmp_path / "emb")).sort_by(C.PAIR_ID).slice(0, 12)
    pairs = {r[C.PAIR_ID]: r for r in storage.read_table(setup["pairs"]).to_pylist()}
    model, tok = load_backbone(str(out), device="cpu", dtype="float32")
    chosen, rejected = encode_pairs(model, tok, [pairs[p] for p in table.column(C.PAIR_ID).to_pylist()])
    torch.testing.assert_close(torch.from_numpy(C.emb_matrix(table.column(C.CHOSEN_EMB))), chosen, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(C.emb_matrix(table.column(C.REJECTED_EMB))), rejected,
                               atol=1e-5, rtol=1e-4)
    summary = json.loads((setup["root"] / "w1" / "finetune.json").read_text())
    assert summary["history"][-1]["epoch"] == 2 and (setup["root"] / "w1" / "loss.png").stat().st_size > 1000
    # the split it was tuned under travels with it: `mrm train` under another one is refused before it writes
    made_with = runs.provenance(str(tmp_path / "emb"))
    assert json.loads(made_with[runs.FINETUNE_SPLIT]) == {"seed": 0, "seen_ratio": FinetuneConfig.seen_ratio,
                                                          "val_ratio": FinetuneConfig.val_ratio}
    capsys.readouterr()
    rc = cli.main(["train", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "run"), "seed=1"])
    one_line_error(capsys, rc, "fine-tuned with seed=0")
    assert not runs.is_run_directory(str(tmp_path / "run"))
    runs.check_finetune_split(made_with, TrainConfig())   # the defaults agree


def plain_validation(setup, name: str, summary: dict) -> tuple[float, int, int, int]:
    """The last epoch's validation recomputed from its checkpoint: each pair embedded alone, each user adapted on
    all its train pairs by a plain autograd loop (reference_loops), scored on its validation pairs.  Returns
    (mean loss, correct, pairs, margins within 1e-4 of 0)."""
    from mrm_ray.backbone import PairEncoder, encode_pairs, load_backbone
    from mrm_ray.core.finetune import MetaHead, pair_losses
    from mrm_ray.finetune import worker_pairs

    out, cfg = setup["root"] / name, FinetuneConfig(**summary["config"])
    state = next(out.glob(f"checkpoints/**/epoch-{cfg.epochs:04d}/state/mp_rank_00_model_states.pt"))
    params = torch.load(state, weights_only=False)["module"]
    model, tok = load_backbone(setup["model"], device="cpu", dtype="float32")
    PairEncoder(model, tok).base.load_state_dict({k[5:]: v for k, v in params.items() if k.startswith("base.")})
    head = MetaHead(model.config.hidden_size, cfg.rank, steps=cfg.inner_steps)
    head.load_state_dict({k[8:]: v for k, v in params.items() if k.startswith("factors.")})
    data = worker_pairs(str(out), storage.read_table(str(out / "users.parquet")), cfg, list(range(cfg.buckets)))
    rows = np.flatnonzero(np.isin(data["user"], data["user"][data["val"]]))   # the users with validation pairs
    with torch.no_grad():
        pairs = [encode_pairs(model, tok, [{C.PROMPT: data["prompt"][i], C.CHOSEN: data["chosen"][i],
                                            C.REJECTED: data["rejected"][i]}]) for i in rows]
    chosen, rejected = torch.cat([c for c, _ in pairs]), torch.cat([r for _, r in pairs])
    margins = meta_margins_loop(head, chosen, rejected, data["user"][rows].tolist(), (~data["val"][rows]).tolist())
    m = torch.tensor(margins)[torch.as_tensor(data["val"][rows])]
    return float(pair_losses(m).mean()), int((m > 0).sum()), len(m), int((m.abs() < 1e-4).sum())


def assert_validation_recorded(setup, name: str, summary: dict) -> None:
    loss, right, n, near_zero = plain_validation(setup, name, summary)
    last = summary["history"][-1]
    assert n >= 8
    assert last["val_loss"] == pytest.approx(loss, abs=1e-5)
    assert abs(round(last["val_accuracy"] * n) - right) <= near_zero   # a margin at 0 may fall either way


def test_recorded_validation_equals_a_plain_loop_over_users(setup, one_worker):
    """The workers validate in chunks of users with batched adaptation; a plain loop over users agrees."""
    assert_validation_recorded(setup, "w1", one_worker)


def test_meta_shared_trains_the_start_too_and_validates_the_adapted_users_only(setup, one_worker):
    """shared=true adds the start w0's loss on the query pairs in training: the first step (same parameters,
    same rows) has a larger loss; validation still scores only the adapted margins."""
    shared = run(setup, "shared", epochs=1, shared=True)
    assert shared["steps"][0] > one_worker["steps"][0] + 0.1
    assert_validation_recorded(setup, "shared", shared)


def test_bad_input_is_one_line_and_leaves_nothing_complete(setup, ray_local, tmp_path, capsys):
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(tmp_path / "a"), "--model",
                   str(tmp_path / "no-such-model")])
    one_line_error(capsys, rc, "no-such-model")
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(tmp_path / "b"), "--model", setup["model"],
                   "min_train_pairs=1000"])
    one_line_error(capsys, rc, "no seen user")
    assert storage.check_output(str(tmp_path / "b"), "finetune")["state"] != "complete"   # not presented as done
    assert not (tmp_path / "b" / "model").exists()
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(tmp_path / "c"), "zero_stage=4"])
    one_line_error(capsys, rc, "zero_stage")


def test_offload_without_the_ops_is_one_line(setup, tmp_path, capsys, monkeypatch):
    """ZeRO-Offload on a DeepSpeed installed without its ops, on a machine that cannot build them (no compiler
    or ninja on PATH): refused before anything starts, one line naming the fix."""
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(tmp_path / "o"), "--model", setup["model"],
                   "offload=cpu", "zero_stage=3"])
    one_line_error(capsys, rc, "cpu_adam")
    assert not (tmp_path / "o").exists()
    rc = cli.main(["finetune", "--pairs", setup["pairs"], "--out", str(tmp_path / "o"), "offload=cpu", "zero_stage=0"])
    one_line_error(capsys, rc, "zero_stage 1, 2 or 3")


def test_a_model_folder_on_s3_loads_like_the_local_one(setup, s3_bucket, tmp_path, monkeypatch):
    """`mrm finetune --out s3://...` leaves <out>/model on S3: the loaders fetch it once and load it."""
    import pyarrow.fs as pafs

    from mrm_ray.backbone import load_backbone, model_path

    monkeypatch.setenv("MRM_MODEL_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    fs, path = storage.resolve(uri)
    pafs.copy_files(setup["model"], path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    local = model_path(uri)
    assert local.startswith(str(tmp_path)) and model_path(uri) == local     # fetched once, then reused
    remote_model, _ = load_backbone(uri, device="cpu", dtype="float32")
    local_model, _ = load_backbone(setup["model"], device="cpu", dtype="float32")
    for (name, a), b in zip(remote_model.named_parameters(), local_model.parameters()):
        assert torch.equal(a, b), name


def test_demo_finetune_runs_the_chain_on_both_backbones(setup, ray_local, tmp_path):
    """`mrm demo --finetune`: the frozen chain, then finetune -> embed -> train -> evaluate on the fine-tuned
    backbone; the summary reports both, and the second embedding came from the fine-tuned model."""
    from mrm_ray.demo import demo

    summary = demo(str(tmp_path / "d"), users=16, pairs_per_user=8, workers=1, epochs=1, model=setup["model"],
                   finetune=True)
    tuned = summary["finetuned"]
    assert tuned["epochs"] == FinetuneConfig().epochs and tuned["finetune_seconds"] > 0
    assert 0 <= tuned["unseen_accuracy"] <= 1
    frozen = storage.read_table(summary["embeddings"], columns=[C.PAIR_ID, C.CHOSEN_EMB]).sort_by(C.PAIR_ID)
    again = storage.read_table(summary["embeddings-finetuned"], columns=[C.PAIR_ID, C.CHOSEN_EMB]).sort_by(C.PAIR_ID)
    assert frozen.column(C.PAIR_ID).equals(again.column(C.PAIR_ID))
    assert not np.allclose(np.stack(frozen.column(C.CHOSEN_EMB).to_numpy(zero_copy_only=False)),
                           np.stack(again.column(C.CHOSEN_EMB).to_numpy(zero_copy_only=False)))
    assert storage.read_json(str(tmp_path / "d" / "summary.json"))["finetuned"] == tuned


def test_validation_chunks_equal_a_plain_membership_loop():
    """val_chunks groups rows in one pass; a plain loop over chunks of whole users with np.isin gives the same."""
    from mrm_ray.finetune import val_chunks

    def loop(data, val_rows, batch_pairs):
        users = data["user"]
        val_users = np.unique(users[val_rows])
        chunks, seen = {}, 0
        for u in val_users:   # a user goes to the chunk of batch_pairs validation pairs where its last one falls
            seen += int((users[val_rows] == u).sum())
            chunks.setdefault((seen - 1) // batch_pairs, []).append(u)
        out = []
        for chunk in chunks.values():
            rows = np.flatnonzero(np.isin(users, chunk))
            out.append((rows, ~data["val"][rows]))
        return out

    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 120))
        users = np.array([f"u{k:03d}" for k in rng.integers(0, int(rng.integers(1, 30)), n)])
        val = rng.random(n) < rng.random()
        val[int(rng.integers(n))] = True
        data, batch_pairs = {"user": users, "val": val}, int(rng.integers(1, 20))
        got, want = val_chunks(data, np.flatnonzero(val), batch_pairs), loop(data, np.flatnonzero(val), batch_pairs)
        assert len(got) == len(want)
        for (rows, support), (want_rows, want_support) in zip(got, want):
            assert rows.tolist() == want_rows.tolist() and support.tolist() == want_support.tolist()
    assert val_chunks({"user": np.array(["u1", "u2"]), "val": np.zeros(2, bool)}, np.array([], int), 4) == []
