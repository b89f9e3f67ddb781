"""The run directory (mrm_ray.data.runs): a resume must be a resume; damaged checkpoints fall back."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import digest, one_line_error

from mrm_ray import cli
from mrm_ray.data import runs
from mrm_ray.synth import write_embedding_population

DIM = 8


@pytest.fixture(scope="module")
def emb(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety") / "emb"
    write_embedding_population(str(out), users=60, pairs_per_user=10, dim=DIM, seed=3)
    return out


@pytest.fixture(scope="module")
def run(emb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safety-run") / "run"
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local", "epochs=2"]) == 0
    return out


def test_rerun_with_another_table_or_config_is_refused(emb, run, tmp_path, capsys):
    other = tmp_path / "other"
    write_embedding_population(str(other), users=30, pairs_per_user=10, dim=DIM, seed=9)
    before = digest(run)
    one_line_error(capsys, cli.main(["train", "--embeddings", str(other), "--out", str(run), "--local"]),
                   "another embeddings table")
    one_line_error(capsys, cli.main(["train", "--embeddings", str(emb), "--out", str(run), "--local",
                                     "meta_lr=0.5"]), "different config")
    assert digest(run) == before


# --- 4. a damaged checkpoint: fall back to the newest readable one ---------------------------------
def test_a_damaged_latest_checkpoint_falls_back_to_the_previous(emb, tmp_path, caplog):
    out = tmp_path / "run"
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local", "epochs=2"]) == 0
    cfg = json.loads((out / runs.CONFIG).read_text())
    cfg["epochs"] = 3
    (out / runs.CONFIG).write_text(json.dumps(cfg))
    (out / "checkpoints" / "local" / "state.pt").write_bytes(b"garbage")
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(out), "--local"]) == 0
    assert "unreadable" in caplog.text
    assert [h["epoch"] for h in json.loads((out / runs.HISTORY).read_text())] == [0, 1, 2, 3]


def test_ray_checkpoints_skip_a_garbage_state(tmp_path):
    from mrm_ray import train_ray
    base = tmp_path / "checkpoints" / train_ray.RUN_NAME
    import torch
    st = train_ray.meta.TrainState(epoch=1, head={"theta0": torch.zeros(2)})
    for epoch, data in ((1, runs.state_to_bytes(st)), (2, b"\x80\x04garbage")):
        (base / f"epoch-{epoch:06d}").mkdir(parents=True)
        (base / f"epoch-{epoch:06d}" / train_ray.STATE_FILE).write_bytes(data)
    assert train_ray.latest_state(str(tmp_path)).epoch == 1


# --- provenance: which backbone made a table; tables of two backbones never mix ---------------------
def _with_provenance(src: Path, dst: Path, **made) -> Path:
    """A copy of an embeddings table whose schema says it was embedded by `made`."""
    from mrm_ray.data import storage
    t = storage.read_table(str(src))
    storage.write_table(t.replace_schema_metadata(runs.provenance_metadata(made)), str(dst))
    return dst


def test_provenance_travels_into_the_run_and_other_backbones_are_refused(emb, tmp_path, capsys):
    a = _with_provenance(emb, tmp_path / "a", backbone="org/model-a", backbone_id="llama-aaa", pooling="last",
                         dim=DIM)
    b = _with_provenance(emb, tmp_path / "b", backbone="org/model-b", backbone_id="llama-bbb", pooling="last",
                         dim=DIM)
    run = tmp_path / "run"
    assert cli.main(["train", "--embeddings", str(a), "--out", str(run), "--local", "epochs=1"]) == 0
    assert runs.load_run(str(run)).info["embeddings"]["backbone"] == "org/model-a"
    assert cli.main(["evaluate", "--run", str(run), "--embeddings", str(a), "--no-baseline"]) == 0
    capsys.readouterr()
    one_line_error(capsys, cli.main(["evaluate", "--run", str(run), "--embeddings", str(b), "--out",
                                     str(tmp_path / "m.json")]), "different backbones", "org/model-b")
    assert not (tmp_path / "m.json").exists()


def test_a_table_assembled_from_two_embed_runs_is_refused(emb, tmp_path, capsys):
    import shutil
    a = _with_provenance(emb, tmp_path / "a", backbone="org/model-a", pooling="last")
    b = _with_provenance(emb, tmp_path / "b", backbone="org/model-b", pooling="last")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, src in enumerate((a, b)):
        part = sorted(src.glob("*.parquet"))[0]
        shutil.copy(part, mixed / f"part-{i:05d}.parquet")
    one_line_error(capsys, cli.main(["train", "--embeddings", str(mixed), "--out", str(tmp_path / "run"),
                                     "--local"]), "made differently")


def test_export_checks_how_the_run_was_embedded():
    from transformers import LlamaConfig

    from mrm_ray.backbone import backbone_id
    from mrm_ray.errors import UserError
    from mrm_ray.export import check_backbone
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                      vocab_size=100)
    check_backbone("m", cfg, {"pooling": "last", "backbone_id": backbone_id(cfg)})   # the model that embedded it
    check_backbone("m", cfg, {})                                                      # a table that does not say
    with pytest.raises(UserError, match="pooled with 'mean'"):
        check_backbone("m", cfg, {"pooling": "mean", "backbone": "an encoder"})
    with pytest.raises(UserError, match="not the model that embedded"):
        check_backbone("m", cfg, {"pooling": "last", "backbone_id": "llama-000000000000", "backbone": "other"})
