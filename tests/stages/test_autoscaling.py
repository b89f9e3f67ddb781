"""Stages on a live Ray autoscaler: the node types of ray-cluster.yaml scale from zero and back.

The cluster (tests/autoscaling.py) is Ray's fake_multinode provider driven by the real autoscaler, with
the node types of ray-cluster.yaml (names, min/max workers, resource kinds) scaled to this machine: each
node 1 CPU, the GPU type's GPU fake, idle nodes removed after 10 s.  Its head has no CPU, as in the
YAML, so every task of a stage runs on a node the autoscaler launched for it.  The stages run as the
`mrm` command in a subprocess with RAY_ADDRESS set, the way a user on the head node runs them.

Timings go to the log (`-s`) and are quoted in cluster/OPERATIONS.md.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch

from autoscaling import FakeCluster, fake_config, node_types_from_yaml
from helpers import assert_continued, assert_heads_close, registered_checkpoint
from mrm_ray import api
from mrm_ray.data import contract as C
from mrm_ray.data import storage
from tiny_models import tiny_reward_model

ROOT = Path(__file__).resolve().parents[2]
IDLE_S = 10.0


@pytest.fixture(scope="module")
def cluster():
    c = FakeCluster(fake_config(ROOT / "ray-cluster.yaml", idle_timeout_s=IDLE_S)).start()
    yield c
    c.stop()


def mrm(cluster, *args: str, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mrm_ray.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**cluster.env, "RAY_ADDRESS": cluster.address, **env})


def active(cluster) -> dict[str, int]:
    """Running worker nodes per node type, as `ray status` reports them."""
    out = subprocess.run([str(Path(sys.executable).parent / "ray"), "status", f"--address={cluster.address}"],
                         env=cluster.env, capture_output=True, text=True, timeout=60).stdout
    counts, section = {}, None
    for line in out.splitlines():
        s = line.strip()
        if s in ("Active:", "Pending:", "Recent failures:"):
            section = s
        elif section == "Active:" and s and s[0].isdigit():
            n, name = s.split(None, 1)
            name = name.split()[0]
            if name != "ray.head.default":
                counts[name] = int(n)
    return counts


def wait_for(predicate, timeout: float) -> float:
    t0 = time.time()
    while not predicate():
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(1)
    return time.time() - t0


def embed_on_a_gpu(cluster, tmp_path) -> tuple[subprocess.CompletedProcess, str]:
    """`mrm embed --num-gpus 1` of a small text population with a tiny model: (result, model path)."""
    from mrm_ray.synth import synth

    model = tiny_reward_model(tmp_path / "model")
    synth(str(tmp_path / "pairs"), kind="text", users=6, pairs_per_user=4, seed=0)
    res = mrm(cluster, "embed", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "emb"), "--model",
              model, "--num-gpus", "1", "--dtype", "float32")
    assert res.returncode == 0, res.stderr[-3000:]
    return res, model


def train_two_workers(cluster, tmp_path) -> None:
    """`mrm train num_workers=2 cpus_per_worker=1` on a small embedding population (in tmp_path/emb)."""
    from mrm_ray.synth import synth

    synth(str(tmp_path / "emb"), users=60, pairs_per_user=10, dim=16, seed=0)
    res = mrm(cluster, "train", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "run"),
              "num_workers=2", "cpus_per_worker=1", "epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]


def test_the_fake_cluster_has_the_yamls_node_types():
    head, types = node_types_from_yaml(ROOT / "ray-cluster.yaml")
    config = fake_config(ROOT / "ray-cluster.yaml")["available_node_types"]
    assert set(config) - {"ray.head.default"} == set(types) and head not in config
    for name, t in types.items():
        assert set(config[name]["resources"]) == set(t["resources"])
        assert config[name]["min_workers"] == min(t["min_workers"], 2) and 1 <= config[name]["max_workers"] <= 2
    # the KubeRay cluster offers the same kinds of node: one with a GPU, one without
    _, kube = node_types_from_yaml(ROOT / "cluster" / "raycluster.yaml")
    assert sorted("GPU" in t["resources"] for t in kube.values()) == sorted("GPU" in t["resources"]
                                                                            for t in types.values())


def test_embed_scales_the_gpu_type_from_zero_and_back(cluster, tmp_path):
    from mrm_ray.backbone import encode_pairs, load_backbone

    assert active(cluster) == {}
    t0 = time.time()
    res, model = embed_on_a_gpu(cluster, tmp_path)
    stage_s = time.time() - t0
    # it waited, then the autoscaler grew the cluster (which type it names while launching is a race with the
    # 1 s polls here; test_waiting_is_bounded_and_says_for_what checks that text on a wait that lasts)
    assert "waiting for the autoscaler (" in res.stderr and "the cluster grew in" in res.stderr
    nodes = active(cluster)   # Ray Data may also ask for CPU nodes for its read and write tasks
    assert nodes.get("gpu_embed", 0) >= 1, nodes
    assert "CUDA is not available here; using the CPU" in res.stderr + "".join(
        p.read_text(errors="replace") for p in Path(cluster.temp).glob("session_latest/logs/worker-*.err"))
    down_s = wait_for(lambda: active(cluster) == {}, IDLE_S + 60)
    grew = re.search(r"the cluster grew in (\d+)s", res.stderr).group(1)
    print(f"\nembed on a GPU node type scaled from 0: nodes there in {grew}s, stage {stage_s:.0f}s; "
          f"back to 0 nodes {down_s:.0f}s after it")
    # the output is what the backbone computes in-process
    pairs = storage.read_table(str(tmp_path / "pairs")).sort_by(C.PAIR_ID).to_pylist()
    emb = storage.read_table(str(tmp_path / "emb")).sort_by(C.PAIR_ID)
    ch, _ = encode_pairs(*load_backbone(model, device="cpu", dtype="float32"), pairs)
    got = torch.as_tensor(np.stack(emb.column(C.CHOSEN_EMB).to_numpy(zero_copy_only=False)))
    torch.testing.assert_close(got, ch, atol=1e-4, rtol=1e-4)


def test_train_lands_on_the_training_type(cluster, tmp_path):
    t0 = time.time()
    train_two_workers(cluster, tmp_path)
    nodes = active(cluster)
    assert nodes.get("train_cpu", 0) >= 1 and "gpu_embed" not in nodes, nodes
    print(f"\ntrain num_workers=2 on the training type scaled from 0: {time.time() - t0:.0f}s")
    res = mrm(cluster, "evaluate", "--run", str(tmp_path / "run"), "--embeddings", str(tmp_path / "emb"))
    assert res.returncode == 0, res.stderr[-3000:]

    # mrm score asks for CPUs only: it runs on the nodes that are up (or launches a CPU type), never a GPU one
    emb = storage.read_table(str(tmp_path / "emb"))
    test = emb.filter(pc.equal(emb.column(C.SPLIT), C.TEST))
    cands = pa.table({C.USER_ID: test.column(C.USER_ID), C.CANDIDATE_ID: test.column(C.PAIR_ID),
                      C.EMB: test.column(C.CHOSEN_EMB)})
    storage.write_table(cands, str(tmp_path / "cands"))
    t0 = time.time()
    res = mrm(cluster, "score", "--run", str(tmp_path / "run"), "--support", str(tmp_path / "emb"),
              "--support-split", "train", "--candidates", str(tmp_path / "cands"), "--out", str(tmp_path / "scored"))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "gpu_embed" not in active(cluster), active(cluster)
    print(f"score of {cands.num_rows} candidates on the nodes there: {time.time() - t0:.0f}s")
    # equal to the Python API, one user at a time, in this process
    rm = api.load(str(tmp_path / "run"))
    scores = storage.read_table(str(tmp_path / "scored" / "scores")).sort_by([(C.USER_ID, "ascending"),
                                                                              (C.CANDIDATE_ID, "ascending")])
    assert scores.num_rows == cands.num_rows
    for user in pc.unique(cands.column(C.USER_ID)).to_pylist():
        mine = cands.filter(pc.equal(cands.column(C.USER_ID), user)).sort_by(C.CANDIDATE_ID)
        want = rm.adapt_from_table(str(tmp_path / "emb"), user, split="train").score(C.emb_matrix(mine.column(C.EMB)))
        got = scores.filter(pc.equal(scores.column(C.USER_ID), user)).column(C.REWARD).to_numpy()
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-5)
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)


def test_train_survives_losing_a_training_node(cluster, tmp_path):
    """Kill the raylet of a node holding a Ray Train worker once a checkpoint is registered: the group
    restarts from that checkpoint on the nodes there (the autoscaler replaces the lost one) and the run
    ends where an uninterrupted run ends (the single-process trainer, equal to 2 workers)."""
    from mrm_ray import cli, train_ray
    from mrm_ray.data import runs
    from mrm_ray.synth import write_embedding_population

    emb, run = tmp_path / "emb", tmp_path / "run"
    write_embedding_population(str(emb), users=1000, pairs_per_user=40, dim=16, seed=0)
    args = ["tasks_per_batch=2", "epochs=10"]   # small meta-batches: epochs of ~1 s, time to kill mid-run
    assert cli.main(["train", "--embeddings", str(emb), "--out", str(tmp_path / "single"), "--local", *args]) == 0
    expected = runs.state_from_bytes((tmp_path / "single" / "checkpoints" / "local" / "state.pt").read_bytes())
    on_cluster = [*args, "num_workers=2", "cpus_per_worker=1", "max_failures=2"]
    t0 = time.time()   # the same run uninterrupted, from 0 nodes: the baseline of the extra wall time
    res = mrm(cluster, "train", "--embeddings", str(emb), "--out", str(tmp_path / "whole"), *on_cluster)
    assert res.returncode == 0, res.stderr[-3000:]
    uninterrupted = time.time() - t0
    assert_heads_close(train_ray.latest_state(str(tmp_path / "whole")).head, expected.head)
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "mrm_ray.cli", "train", "--embeddings", str(emb), "--out", str(run),
                             *on_cluster], cwd=ROOT,
                            env={**cluster.env, "RAY_ADDRESS": cluster.address}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    killed = None
    while proc.poll() is None and time.time() - t0 < 400:
        ckpt = registered_checkpoint(str(run))
        if ckpt is not None and ckpt.rsplit("/", 1)[1] >= "epoch-000002":
            history = runs.state_from_bytes(storage.read_bytes(storage.join(ckpt, train_ray.STATE_FILE))).history
            cluster.kill_node("train_cpu")
            killed = {"history": history, "at": time.time() - t0}
            break
        time.sleep(0.05)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0, log[-3000:]
    assert killed is not None and len(killed["history"]) < 10, log[-3000:]
    print(f"\ntrain losing a training node at {killed['at']:.0f}s: {time.time() - t0:.0f}s; "
          f"uninterrupted: {uninterrupted:.0f}s")
    assert_continued(train_ray.latest_state(str(run)), killed, expected)
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)


def test_waiting_is_bounded_and_says_for_what(cluster, tmp_path):
    from mrm_ray.synth import synth

    synth(str(tmp_path / "emb"), users=20, pairs_per_user=6, dim=8, seed=0)
    # 3 GPUs where the GPU type stops at 2 nodes: it waits, naming the type, then gives up in one line
    res = mrm(cluster, "train", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "b"),
              "num_workers=3", "cpus_per_worker=0.5", "use_gpu=true", MRM_RESOURCE_TIMEOUT="20")
    assert res.returncode != 0
    last = res.stderr.strip().splitlines()[-1]
    assert "after waiting" in last and "MRM_RESOURCE_TIMEOUT=20" in last and "Traceback" not in res.stderr
    assert "waiting for the autoscaler (launching gpu_embed" in res.stderr
    assert not (tmp_path / "b" / "state.json").exists()
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)


def test_embed_survives_losing_its_gpu_node(cluster, tmp_path):
    """Kill the GPU node (its raylet) while `mrm embed` runs on it: the autoscaler replaces it, Ray Data
    retries the lost work, and the table equals an uninterrupted run's."""
    from mrm_ray.synth import synth

    model = tiny_reward_model(tmp_path / "model")
    synth(str(tmp_path / "pairs"), kind="text", users=300, pairs_per_user=8, seed=1)
    args = ["embed", "--pairs", str(tmp_path / "pairs"), "--model", model, "--num-gpus", "1", "--dtype", "float32",
            "--no-dedup", "--batch-rows", "64"]
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "mrm_ray.cli", *args, "--out", str(tmp_path / "lost")], cwd=ROOT,
                    env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:   # the replica is placed once the autoscaler has launched the GPU node
        log.append(line)
        if "the cluster grew" in line:
            break
    time.sleep(3)   # the replica loads the model and starts on its first blocks
    assert proc.poll() is None, "".join(log)[-3000:]
    cluster.kill_node("gpu_embed")
    killed_at = time.time() - t0
    log += proc.stdout.readlines()
    assert proc.wait(600) == 0, "".join(log)[-3000:]
    lost_s = time.time() - t0
    wait_for(lambda: active(cluster) == {}, IDLE_S + 90)
    t0 = time.time()
    res = mrm(cluster, *args, "--out", str(tmp_path / "whole"))
    assert res.returncode == 0, res.stderr[-3000:]
    whole_s = time.time() - t0
    print(f"\nembed losing its GPU node at {killed_at:.0f}s: {lost_s:.0f}s; uninterrupted: {whole_s:.0f}s")
    a = storage.read_table(str(tmp_path / "lost")).sort_by(C.PAIR_ID)
    b = storage.read_table(str(tmp_path / "whole")).sort_by(C.PAIR_ID)
    assert a.column(C.PAIR_ID).equals(b.column(C.PAIR_ID)) and a.num_rows == 2400
    for col in (C.CHOSEN_EMB, C.REJECTED_EMB):
        np.testing.assert_allclose(np.stack(a.column(col).to_numpy(zero_copy_only=False)),
                                   np.stack(b.column(col).to_numpy(zero_copy_only=False)), atol=1e-5)
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)


def test_pipeline_job_submitted_to_the_autoscaling_cluster(cluster, tmp_path):
    """jobs/pipeline.py through `ray job submit`: the job's driver on the head (no CPU), its stages on
    nodes the autoscaler launches.  Without --working-dir here: the fake nodes share the head's disk, and
    each node Ray sets a working dir up on re-unpacks it in place, deleting the directory the job's driver
    runs in (on a real cluster every node has its own disk; tests/stages/test_job_submit.py submits with
    --working-dir, as the README does, to a fixed head)."""
    import json

    out = tmp_path / "job"
    ray = str(Path(sys.executable).parent / "ray")
    t0 = time.time()
    p = subprocess.run(
        [ray, "job", "submit", "--address", f"http://127.0.0.1:{cluster.dashboard}", "--",
         sys.executable, str(ROOT / "jobs" / "pipeline.py"), "--config", str(ROOT / "jobs/configs/cpu-small.yaml"),
         "--set", f"synth.out={out}/emb", "--set", "synth.users=400", "--set", f"train.embeddings={out}/emb",
         "--set", f"train.out={out}/run", "--set", "train.overrides.epochs=3", "--set", "train.overrides.cpus_per_worker=1",
         "--set", f"evaluate.run={out}/run", "--set", f"evaluate.embeddings={out}/emb",
         "--set", f"evaluate.out={out}/metrics.json"],
        cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "succeeded" in (p.stdout + p.stderr).lower()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["users"] > 350 and (out / "run" / "model.safetensors").exists()
    print(f"\npipeline job on the autoscaling cluster: {time.time() - t0:.0f}s")
    wait_for(lambda: active(cluster) == {}, IDLE_S + 60)


def test_the_kuberay_groups_scale_from_zero_and_back(tmp_path):
    """cluster/raycluster.yaml's worker groups (names, min/max replicas, GPU or not), live: `mrm embed`
    asks for a GPU and its GPU group scales from 0, `mrm train num_workers=2` lands on the CPU group, and
    both are gone again after the idle timeout."""
    _, groups = node_types_from_yaml(ROOT / "cluster" / "raycluster.yaml")
    gpu = next(name for name, g in groups.items() if "GPU" in g["resources"])
    cpu = next(name for name, g in groups.items() if "GPU" not in g["resources"])
    kube = FakeCluster(fake_config(ROOT / "cluster" / "raycluster.yaml", idle_timeout_s=IDLE_S)).start()
    try:
        assert active(kube) == {}
        (tmp_path / "embed").mkdir(), (tmp_path / "train").mkdir()
        embed_on_a_gpu(kube, tmp_path / "embed")
        assert active(kube).get(gpu, 0) >= 1, active(kube)
        wait_for(lambda: active(kube) == {}, IDLE_S + 60)

        train_two_workers(kube, tmp_path / "train")
        nodes = active(kube)
        assert nodes.get(cpu, 0) >= 1 and gpu not in nodes, nodes
        wait_for(lambda: active(kube) == {}, IDLE_S + 60)
    finally:
        kube.stop()
