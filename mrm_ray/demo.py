"""The whole chain on the embedded defaults: local Ray, local files, a small offline model.

    mrm demo                      # writes ./mrm-demo/
    mrm demo --workdir /tmp/d --users 400

synth (text) -> embed (Ray Data, all-MiniLM-L6-v2 packaged on PyPI, CPU)
-> train (Ray Train, 2 workers) -> evaluate -> score (Ray Data) -> export-hf.
Each step is the same code path as its `mrm` command; the work directory
keeps every table and the run, and `summary.json` lists what was produced.
"""
from __future__ import annotations

import json
import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from mrm_ray import contract as C
from mrm_ray import storage

log = logging.getLogger(__name__)


def candidates_from_embeddings(emb_uri: str, out_uri: str) -> None:
    """Each test pair's two responses as scoring candidates of its user (for the demo)."""
    t = storage.read_table(emb_uri, columns=[C.USER_ID, C.PAIR_ID, C.SPLIT, C.CHOSEN_EMB, C.REJECTED_EMB])
    t = t.filter(pc.equal(t.column(C.SPLIT), C.TEST))
    cands = pa.concat_tables([
        pa.table({C.USER_ID: t.column(C.USER_ID),
                  C.CANDIDATE_ID: pc.binary_join_element_wise(t.column(C.PAIR_ID), side, ":"),
                  C.EMB: t.column(col)})
        for side, col in (("chosen", C.CHOSEN_EMB), ("rejected", C.REJECTED_EMB))])
    storage.write_table(cands, out_uri, "demo", overwrite=True)


def pairwise_accuracy_from_scores(scores_uri: str) -> float:
    """Share of test pairs whose chosen candidate outscored the rejected one (pair-weighted)."""
    s = storage.read_table(scores_uri, columns=[C.CANDIDATE_ID, C.REWARD]).to_pandas()
    s[["pair", "side"]] = s[C.CANDIDATE_ID].str.rsplit(":", n=1, expand=True)
    wide = s.pivot_table(index="pair", columns="side", values=C.REWARD)
    return float((wide["chosen"] > wide["rejected"]).mean())


def add_arguments(p) -> None:
    p.add_argument("--workdir", default="mrm-demo", help="where every table, the run and the report go")
    p.add_argument("--users", type=int, default=200, help="synthetic users (text population)")
    p.add_argument("--pairs-per-user", type=int, default=16, help="mean preference pairs per user")
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers")
    p.add_argument("--epochs", type=int, help="meta-training epochs (default: the config's)")
    p.add_argument("--model", help="backbone (default: the packaged all-MiniLM-L6-v2)")


def run(args) -> int:
    from mrm_ray.cli import main as mrm

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    w = args.workdir.rstrip("/")
    paths = {k: storage.join(w, k) for k in ("pairs", "embeddings", "run", "candidates", "scores", "export")}
    # the demo owns its work directory: a previous demo there is redone, anything else is refused
    storage.claim_folder(w, "demo", overwrite=True)
    t0, steps = time.time(), []

    def step(name, argv):
        log.info("demo: %s: mrm %s", name, " ".join(argv))
        t = time.time()
        rc = mrm(argv)
        if rc != 0:
            raise SystemExit(rc)
        steps.append({"step": name, "seconds": round(time.time() - t, 1)})

    step("synth", ["synth", "--kind", "text", "--out", paths["pairs"], "--users", str(args.users),
                   "--pairs-per-user", str(args.pairs_per_user), "--seed", "0", "--overwrite"])
    step("embed", ["embed", "--pairs", paths["pairs"], "--out", paths["embeddings"], "--overwrite",
                   *(["--model", args.model] if args.model else [])])
    overrides = [f"num_workers={args.workers}", "cpus_per_worker=0.5"]
    if args.epochs:
        overrides.append(f"epochs={args.epochs}")
    if storage.exists(storage.join(paths["run"], "model.safetensors")):
        storage.delete(paths["run"])  # the demo always trains afresh
    step("train", ["train", "--embeddings", paths["embeddings"], "--out", paths["run"], *overrides])
    step("evaluate", ["evaluate", "--run", paths["run"], "--embeddings", paths["embeddings"], "--overwrite"])
    candidates_from_embeddings(paths["embeddings"], paths["candidates"])
    step("score", ["score", "--run", paths["run"], "--support", paths["embeddings"],
                   "--candidates", paths["candidates"], "--out", paths["scores"], "--overwrite"])
    metrics = storage.read_json(storage.join(paths["run"], "metrics.json"))
    first_user = storage.read_table(storage.join(paths["scores"], "weights"), columns=[C.USER_ID]).column(0)[0].as_py()
    from mrm_ray.embed import default_cpu_model, default_pooling, load_config
    backbone = args.model or default_cpu_model()
    if default_pooling(load_config(backbone), backbone) == "last":
        step("export-hf", ["export-hf", "--run", paths["run"], "--user", first_user,
                           "--weights", storage.join(paths["scores"], "weights"),
                           "--backbone", backbone, "--out", paths["export"], "--overwrite"])
    else:  # a mean-pooled encoder has no sequence-classification head that reads the same embedding
        log.info("demo: export-hf skipped: %s is an encoder; export needs a decoder reward model "
                 "(e.g. --model Skywork/Skywork-Reward-V2-Llama-3.1-8B)", backbone)
        paths.pop("export")
    summary = {"workdir": w, "seconds": round(time.time() - t0, 1), "steps": steps,
               "unseen_accuracy": metrics["unseen"]["accuracy"], "seen_accuracy": metrics["seen"]["accuracy"],
               "shared_bt_unseen_accuracy": metrics.get("baselines", {}).get("shared_bt", {}).get("unseen", {}).get("accuracy"),
               "score_pairwise_accuracy": pairwise_accuracy_from_scores(storage.join(paths["scores"], "scores")),
               "exported_user": first_user if "export" in paths else None, **paths}
    storage.write_json(storage.join(w, "summary.json"), summary)
    storage.finish_folder(w, "demo", [*(k for k in paths), "summary.json"])
    print(json.dumps(summary, indent=2))
    return 0
