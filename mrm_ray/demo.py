"""The whole chain on the embedded defaults: local Ray, local files, a small offline model.

    mrm demo                      # writes ./mrm-demo/
    mrm demo --workdir /tmp/d --users 400
    mrm demo --finetune           # and the same chain again on a fine-tuned backbone (mrm finetune), side by side

synth (text) -> embed (Ray Data, all-MiniLM-L6-v2 packaged on PyPI, CPU)
-> train (Ray Train, 2 workers) -> evaluate -> score (Ray tasks) -> export-hf (decoder backbones).
With --finetune, `mrm finetune` then trains the backbone's top blocks on the
seen users' train pairs, and embed -> train -> evaluate run again on it: the
summary holds both backbones' accuracies (a few minutes more on 2 cores).
Each step calls the same stage function as its `mrm` command; the work
directory keeps every table and the run, and `summary.json` lists what was
produced.
"""
from __future__ import annotations

import logging
import os
import time

import pyarrow as pa
import pyarrow.compute as pc

from mrm_ray.data import contract as C
from mrm_ray.data import storage

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


def demo(workdir: str = "mrm-demo", users: int = 200, pairs_per_user: int = 16, workers: int = 2,
         epochs: int | None = None, model: str | None = None, finetune: bool = False) -> dict:
    """The whole chain into `workdir` (redone from scratch each time); returns the summary it writes."""
    from mrm_ray import config as config_mod
    from mrm_ray.backbone import default_cpu_model, default_pooling, load_config
    from mrm_ray.embed import embed
    from mrm_ray.evaluate import evaluate
    from mrm_ray.export import export
    from mrm_ray.score import score
    from mrm_ray.synth import synth
    from mrm_ray.train import train

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    w = workdir.rstrip("/")
    names = ["pairs", "embeddings", "run", "candidates", "scores", "export"]
    names += ["finetune", "embeddings-finetuned", "run-finetuned"] if finetune else []
    paths = {k: storage.join(w, k) for k in names}
    # the demo owns its work directory: a previous demo there is redone, anything else is refused
    storage.claim_folder(w, "demo", overwrite=True)
    t0, steps = time.time(), []

    def step(name, fn, *args, **kwargs):
        log.info("demo: %s", name)
        t = time.time()
        result = fn(*args, **kwargs)
        steps.append({"step": name, "seconds": round(time.time() - t, 1)})
        return result

    step("synth", synth, paths["pairs"], kind="text", users=users, pairs_per_user=pairs_per_user, seed=0,
         overwrite=True)
    step("embed", embed, paths["pairs"], paths["embeddings"], model=model or "auto", overwrite=True)
    cfg = config_mod.load_config(overrides={"num_workers": workers, "cpus_per_worker": 0.5,
                                            **({"epochs": epochs} if epochs else {})})

    def train_and_evaluate(embeddings: str, run_uri: str, suffix: str = ""):
        if storage.exists(run_uri):
            storage.delete(run_uri)  # the demo always trains afresh
        run = step("train" + suffix, train, cfg, embeddings, run_uri)
        return run, step("evaluate" + suffix, evaluate, run, embeddings, overwrite=True)

    run, metrics = train_and_evaluate(paths["embeddings"], paths["run"])
    candidates_from_embeddings(paths["embeddings"], paths["candidates"])
    step("score", score, run, paths["embeddings"], paths["candidates"], paths["scores"], overwrite=True)
    first_user = storage.read_table(storage.join(paths["scores"], "weights"), columns=[C.USER_ID]).column(0)[0].as_py()
    backbone = model or default_cpu_model()
    if default_pooling(load_config(backbone), backbone) == "last":
        step("export-hf", export, paths["run"], first_user, backbone, paths["export"],
             weights=storage.join(paths["scores"], "weights"), overwrite=True)
    else:  # a mean-pooled encoder has no sequence-classification head that reads the same embedding
        log.info("demo: export-hf skipped: %s is an encoder; export needs a decoder reward model "
                 "(e.g. --model Skywork/Skywork-Reward-V2-Llama-3.1-8B)", backbone)
        paths.pop("export")
    tuned = {}
    if finetune:
        from mrm_ray.finetune import finetune as finetune_stage
        from mrm_ray.finetune import load_config as finetune_config
        ft = step("finetune", finetune_stage, paths["pairs"], paths["finetune"], model or "auto", finetune_config(),
                  overwrite=True)
        step("embed (fine-tuned)", embed, paths["pairs"], paths["embeddings-finetuned"],
             model=storage.join(paths["finetune"], "model"), overwrite=True)
        _, m = train_and_evaluate(paths["embeddings-finetuned"], paths["run-finetuned"], " (fine-tuned)")
        tuned = {"finetuned": {"unseen_accuracy": m["unseen"]["accuracy"], "seen_accuracy": m["seen"]["accuracy"],
                               "finetune_seconds": ft["seconds"], "epochs": len(ft["history"])}}
    summary = {"workdir": w, "seconds": round(time.time() - t0, 1), "steps": steps,
               "unseen_accuracy": metrics["unseen"]["accuracy"], "seen_accuracy": metrics["seen"]["accuracy"],
               "shared_bt_unseen_accuracy": metrics.get("baselines", {}).get("shared_bt", {}).get("unseen", {}).get("accuracy"),
               "score_pairwise_accuracy": pairwise_accuracy_from_scores(storage.join(paths["scores"], "scores")),
               "exported_user": first_user if "export" in paths else None, **tuned, **paths}
    storage.write_json(storage.join(w, "summary.json"), summary)
    storage.finish_folder(w, "demo", [*(k for k in paths), "summary.json"])
    return summary
