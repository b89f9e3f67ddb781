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
import pytest
import torch

from autoscaling import FakeCluster, fake_config, node_types_from_yaml
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
    from mrm_ray.synth import synth

    assert active(cluster) == {}
    model = tiny_reward_model(tmp_path / "model")
    synth(str(tmp_path / "pairs"), kind="text", users=6, pairs_per_user=4, seed=0)
    t0 = time.time()
    res = mrm(cluster, "embed", "--pairs", str(tmp_path / "pairs"), "--out", str(tmp_path / "emb"), "--model",
              model, "--num-gpus", "1", "--dtype", "float32")
    stage_s = time.time() - t0
    assert res.returncode == 0, res.stderr[-3000:]
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
    from mrm_ray.synth import synth

    synth(str(tmp_path / "emb"), users=60, pairs_per_user=10, dim=16, seed=0)
    t0 = time.time()
    res = mrm(cluster, "train", "--embeddings", str(tmp_path / "emb"), "--out", str(tmp_path / "run"),
              "num_workers=2", "cpus_per_worker=1", "epochs=2")
    assert res.returncode == 0, res.stderr[-3000:]
    nodes = active(cluster)
    assert nodes.get("train_cpu", 0) >= 1 and "gpu_embed" not in nodes, nodes
    print(f"\ntrain num_workers=2 on the training type scaled from 0: {time.time() - t0:.0f}s")
    res = mrm(cluster, "evaluate", "--run", str(tmp_path / "run"), "--embeddings", str(tmp_path / "emb"))
    assert res.returncode == 0, res.stderr[-3000:]
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


@pytest.mark.skip(reason="flaky: in 2 of 4 runs the stage failed after the kill (an actor lost with its node); "
                         "under investigation, see cluster/OPERATIONS.md")
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
    cluster.kill_node("GPU")
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

