"""A live autoscaling Ray cluster on one machine, made from the project's own cluster YAML.

Ray's fake_multinode provider launches each "node" as a set of local Ray processes (a raylet and its
workers) with the node type's resources, so the real autoscaler (the head's monitor) scales node
types up from their minimum on demand and back down when idle.  `fake_config` derives that cluster
from ray-cluster.yaml (or a RayCluster manifest): the same node type names, min/max workers and
resource kinds, scaled down to this machine (each node 1 CPU; GPUs stay, as fake GPUs), so a change to
the YAML is what the tests run.  Only this cluster is stopped afterwards (its process group, then any
process naming its temp dir): `ray stop` would stop every Ray on the machine.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import yaml

from helpers import free_port, stop_head

BIN = Path(sys.executable).parent
HEAD_TYPE = "ray.head.default"   # the fake provider's fixed name for the head's type


def node_types_from_yaml(path: Path) -> tuple[str, dict]:
    """(head type name, {worker type: {min_workers, max_workers, resources}}) of a ray-cluster.yaml or a
    KubeRay RayCluster/RayJob manifest (its rayStartParams and resource limits)."""
    doc = yaml.safe_load(Path(path).read_text())
    if "available_node_types" in doc:
        types = doc["available_node_types"]
        head = doc["head_node_type"]
        return head, {name: {"min_workers": t.get("min_workers", 0), "max_workers": t.get("max_workers", 0),
                             "resources": dict(t.get("resources", {}))}
                      for name, t in types.items() if name != head}
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    out = {}
    for group in spec["workerGroupSpecs"]:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        res = {"CPU": float(str(limits.get("cpu", 1)).rstrip("m"))}
        if "nvidia.com/gpu" in limits:
            res["GPU"] = float(limits["nvidia.com/gpu"])
        out[group["groupName"]] = {"min_workers": group.get("minReplicas", 0),
                                   "max_workers": group.get("maxReplicas", 0), "resources": res}
    return "head", out


def fake_config(path: Path, max_workers: int = 2, idle_timeout_s: float = 10.0) -> dict:
    """The autoscaling config of a fake cluster with `path`'s node types, scaled down: each node 1 CPU (and
    its GPUs, fake), at most `max_workers` nodes per type, idle nodes removed after `idle_timeout_s`."""
    _, types = node_types_from_yaml(path)
    available = {}
    for name, t in types.items():
        res = {k: (1 if k == "CPU" else v) for k, v in t["resources"].items()}
        available[name] = {"min_workers": min(t["min_workers"], max_workers),
                           "max_workers": min(t["max_workers"], max_workers),
                           "resources": res, "node_config": {}}
    available[HEAD_TYPE] = {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0}
    return {"cluster_name": "fake-" + Path(path).stem, "max_workers": max_workers * len(types),
            "upscaling_speed": 1.0, "idle_timeout_minutes": idle_timeout_s / 60.0,
            "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                         "disable_launch_config_check": True},
            "auth": {"ssh_user": "ray"}, "docker": {}, "available_node_types": available,
            "head_node_type": HEAD_TYPE, "file_mounts": {}, "cluster_synced_files": [],
            "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
            "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
            "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": []}


class FakeCluster:
    """`ray start --head` with an autoscaling config on the fake_multinode provider (see the module doc)."""

    def __init__(self, config: dict):
        self.temp = f"/tmp/rayfake-{uuid.uuid4().hex[:6]}"
        self.port, self.dashboard = free_port(), free_port()
        self.address = f"127.0.0.1:{self.port}"
        config = json.loads(json.dumps(config))
        config["provider"]["gcs_address"] = self.address
        os.makedirs(self.temp, exist_ok=True)
        self.config_path = f"{self.temp}/autoscaling.json"
        Path(self.config_path).write_text(json.dumps(config))
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        self.proc = None

    def start(self) -> FakeCluster:
        self.proc = subprocess.Popen(
            [str(BIN / "ray"), "start", "--head", "--block", f"--autoscaling-config={self.config_path}",
             f"--port={self.port}", "--num-cpus=0", "--node-ip-address=127.0.0.1", f"--temp-dir={self.temp}",
             "--include-dashboard=true", f"--dashboard-port={self.dashboard}", "--dashboard-host=127.0.0.1",
             "--disable-usage-stats", f"--ray-client-server-port={free_port()}",
             f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
            env=self.env, stdout=open(f"{self.temp}/head.log", "w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        deadline = time.time() + 90
        while time.time() < deadline:
            if subprocess.run([str(BIN / "ray"), "status", f"--address={self.address}"], env=self.env,
                              capture_output=True).returncode == 0:
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"ray start --head exited: {Path(self.temp, 'head.log').read_text()[-2000:]}")
            time.sleep(1)
        raise RuntimeError("the fake cluster's head did not come up in 90 s")

    def stop(self) -> None:
        if self.proc is not None:   # with the worker "nodes" the autoscaler launched
            stop_head(self.proc, self.temp)

    def kill_node(self, node_type: str) -> int:
        """Lose a node: SIGKILL the raylet of one running worker node of `node_type` in this cluster (the fake
        provider names the type in the raylet's environment); its workers die with it.  Returns its pid."""
        out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True,
                             env={**os.environ, "COLUMNS": "100000"}).stdout
        for line in out.splitlines():
            pid, _, args = line.strip().partition(" ")
            if "raylet/raylet " not in args or self.temp not in args:
                continue
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:   # gone meanwhile
                continue
            if f"RAY_NODE_TYPE_NAME={node_type}".encode() in environ:
                os.kill(int(pid), signal.SIGKILL)
                return int(pid)
        raise LookupError(f"no running {node_type} node to kill")
