"""The whole chain with every table and run directory in S3 (moto's server on loopback).

prepare (PRISM files in the bucket) -> embed (tiny Llama reward model, Ray Data)
-> train (Ray Train, 2 workers) -> evaluate -> score, each through `mrm`.
"""
from pathlib import Path

import pytest
from test_prepare import prism_conversation
from tiny_models import tiny_reward_model

from mrm_ray import cli
from mrm_ray.data import contract as C
from mrm_ray.data import storage
from mrm_ray.demo import candidates_from_embeddings


def put_jsonl(uri: str, records) -> None:
    import json
    storage.write_bytes(uri, "".join(json.dumps(r) + "\n" for r in records).encode())


@pytest.mark.slow
def test_whole_chain_on_s3(ray_local, s3_bucket, tmp_path):
    b = s3_bucket
    users = [f"user{u}" for u in range(8)]
    put_jsonl(f"{b}/prism/conversations.jsonl",
              [prism_conversation(u, f"{u}_c{c}", n_turns=2) for u in users for c in range(6)])
    put_jsonl(f"{b}/prism/survey.jsonl", [{"user_id": u, "num_completed_conversations": 6} for u in users])
    model = tiny_reward_model(tmp_path / "model")

    def mrm(*argv):
        assert cli.main([str(a) for a in argv]) == 0, argv

    mrm("prepare", "prism", "--source", f"{b}/prism", "--out", f"{b}/pairs")
    mrm("embed", "--pairs", f"{b}/pairs", "--out", f"{b}/emb", "--model", model)
    mrm("train", "--embeddings", f"{b}/emb", "--out", f"{b}/run", "num_workers=2", "cpus_per_worker=0.5",
        "epochs=2", "seen_ratio=0.5", "val_ratio=0.3")
    mrm("evaluate", "--run", f"{b}/run", "--embeddings", f"{b}/emb")
    candidates_from_embeddings(f"{b}/emb", f"{b}/candidates")
    mrm("score", "--run", f"{b}/run", "--support", f"{b}/emb", "--candidates", f"{b}/candidates",
        "--out", f"{b}/scores")

    for name in ("pairs/_SUCCESS", "emb/_SUCCESS", "run/model.safetensors", "run/config.json",
                 "run/metrics.json", "run/per_user.parquet/_SUCCESS", "scores/_SUCCESS"):
        assert storage.exists(f"{b}/{name}"), name
    metrics = storage.read_json(f"{b}/run/metrics.json")
    assert metrics["overall"]["users"] == len(users)
    scores = storage.read_table(f"{b}/scores/scores")
    candidates = storage.read_table(f"{b}/candidates")
    assert scores.num_rows == candidates.num_rows > 0
    assert set(scores.column(C.USER_ID).to_pylist()) <= set(users)
    # every stage wrote through S3: nothing landed on local disk under the bucket's name
    bucket = b[len("s3://"):]
    assert not Path(bucket).exists() and not (tmp_path / bucket).exists()
