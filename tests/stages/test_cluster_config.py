"""Cluster and job configs: checked with Ray's own code, not only as YAML.

- ray-cluster.yaml goes through what `ray up` and the v2 autoscaler run before touching
  AWS (prepare_config + validate_config against ray/autoscaler/ray-schema.json, via
  AutoscalingConfig), then the v2 autoscaler's own scheduler decides which node types a
  GPU demand and a Ray Train demand launch.
- The KubeRay manifests parse, pin rayVersion to the installed Ray and give the GPU group
  nvidia.com/gpu.
- jobs/: every config section is checked by its command's own option definitions
  (mrm_ray.cli.options); every entrypoint's --help works and its --dry-run prints the
  equivalent `mrm` command for every config.
"""
from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import yaml

from mrm_ray import cli
from mrm_ray.errors import UserError

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
CONFIGS = sorted((JOBS / "configs").glob("*.yaml"))
STAGE_JOBS = ("embed", "train", "evaluate", "score")
CLUSTER_YAML = ROOT / "ray-cluster.yaml"


def _load_common():
    spec = importlib.util.spec_from_file_location("mrm_jobs_common", JOBS / "_common.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


common = _load_common()


def _job(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(JOBS / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


# --- ray-cluster.yaml: Ray's schema and Ray's scheduler ---------------------------------
@pytest.fixture(scope="module")
def autoscaling_config():
    from ray.autoscaler.v2.instance_manager.config import FileConfigReader

    # prepare_config (AWS defaults, docker checks, min/max per type) + validate_config
    # (the jsonschema at ray/autoscaler/ray-schema.json and the cross-field rules).
    return FileConfigReader(str(CLUSTER_YAML)).get_cached_autoscaling_config()


@pytest.fixture(scope="module")
def raw_cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_cluster_yaml_passes_ray_validation(autoscaling_config, raw_cluster):
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(copy.deepcopy(raw_cluster)))  # the `ray up` path, explicitly
    assert autoscaling_config.get_head_node_type() == "head"
    assert autoscaling_config.get_idle_timeout_s() == raw_cluster["idle_timeout_minutes"] * 60
    assert raw_cluster["provider"]["type"] == "aws"


@pytest.mark.parametrize("mutate", [
    lambda c: c.update(idle_timeout_minute=5),                                              # misspelt key
    lambda c: c["available_node_types"]["gpu_embed"]["resources"].update(GPU=0.5),          # non-integer
    lambda c: c["available_node_types"]["gpu_embed"].update(min_worker=0),                  # misspelt key
    lambda c: c.update(max_workers=0, available_node_types={**c["available_node_types"], "train_cpu": {
        **c["available_node_types"]["train_cpu"], "min_workers": 1}}),                      # min > global max
])
def test_the_validator_rejects_broken_variants(raw_cluster, mutate):
    """Proves the check above has teeth: the same validation fails a broken copy."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(raw_cluster)
    mutate(broken)
    with pytest.raises(Exception):
        validate_config(prepare_config(broken))


def test_node_roles(autoscaling_config, raw_cluster):
    types = autoscaling_config.get_node_type_configs()
    head = types["head"]
    assert head.resources.get("CPU") == 0 and not head.resources.get("GPU"), "no work may land on the head"
    gpu = types["gpu_embed"]
    assert gpu.resources["GPU"] >= 1 and gpu.min_worker_nodes == 0 and gpu.max_worker_nodes >= 1
    assert re.match(r"(g5|g6|g6e|p4d|p4de|p5|p5e|p5en)\.", raw_cluster["available_node_types"]["gpu_embed"]
                    ["node_config"]["InstanceType"])
    train = types["train_cpu"]
    assert train.resources["CPU"] >= 4 and not train.resources.get("GPU") and train.min_worker_nodes == 0


def test_autoscaler_routes_demand_to_the_right_node_types(autoscaling_config):
    """Ray's v2 scheduler, fed this config: GPUs come from gpu_embed, Train workers from
    train_cpu, the head is never chosen, and more GPUs than max_workers is infeasible."""
    from ray.autoscaler.v2.scheduler import ResourceDemandScheduler, SchedulingRequest
    from ray.autoscaler.v2.utils import ResourceRequestUtil
    from ray.core.generated.autoscaler_pb2 import ResourceRequestByCount

    types = autoscaling_config.get_node_type_configs()

    def launches(*demand):
        reqs = [ResourceRequestByCount(request=ResourceRequestUtil.make(shape), count=n) for shape, n in demand]
        reply = ResourceDemandScheduler().schedule(SchedulingRequest(
            disable_launch_config_check=True, node_type_configs=types,
            max_num_nodes=autoscaling_config.get_max_num_worker_nodes(), resource_requests=reqs))
        return {r.instance_type: r.count for r in reply.to_launch}, len(reply.infeasible_resource_requests)

    max_gpu = types["gpu_embed"].max_worker_nodes
    # embed replicas: one GPU + a few CPUs each (jobs/configs/prism.yaml)
    assert launches(({"GPU": 1, "CPU": 4}, max_gpu)) == ({"gpu_embed": max_gpu}, 0)
    # Ray Train: 2 workers x 4 CPUs (prism.yaml overrides) -> one CPU node, no GPU node
    assert launches(({"CPU": 4}, 2)) == ({"train_cpu": 1}, 0)
    assert launches(({"GPU": 1}, max_gpu + 1))[1] == 1


def test_image_setup_and_auth(raw_cluster):
    assert raw_cluster["docker"]["image"].endswith(":0.1.0-gpu")
    assert any("pip install" in c and "/home/ray/mrm" in c for c in raw_cluster["setup_commands"])
    assert raw_cluster["file_mounts"]["/home/ray/mrm"] == "."
    assert "~/.ray/auth_token" in raw_cluster["file_mounts"]
    for cmd in raw_cluster["head_start_ray_commands"][1:] + raw_cluster["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in cmd and "ray start" in cmd
    assert raw_cluster["idle_timeout_minutes"] > 0


def _uncommented_keys(path: Path) -> list[str]:
    """Mapping keys with no comment on their line or on the line(s) just above."""
    bad, prev_comment, block_indent = [], False, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        stripped = line.strip()
        indent = len(line) - len(line.lstrip())
        if block_indent is not None:  # inside a `key: |` block scalar
            if stripped and indent <= block_indent:
                block_indent = None
            else:
                continue
        if not stripped:
            continue
        if stripped.startswith("#"):
            prev_comment = True
            continue
        m = re.match(r"^(?:- +)?([\w\"'~./-]+) *:(?: |$)", stripped)
        if m and "#" not in line and not prev_comment:
            bad.append(f"{path.name}:{n}: {m.group(1)}")
        if re.search(r":\s*[|>][-+]?\s*(#.*)?$", line):
            block_indent = indent
        prev_comment = False
    return bad


@pytest.mark.parametrize("path", [CLUSTER_YAML, *CONFIGS], ids=lambda p: p.name)
def test_every_key_is_commented(path):
    assert _uncommented_keys(path) == []


# --- KubeRay manifests ----------------------------------------------------------------------
def _cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


@pytest.mark.parametrize("name,kind", [("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob")])
def test_kuberay_manifests(name, kind):
    doc = yaml.safe_load((ROOT / "cluster" / name).read_text())
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == kind
    spec = _cluster_spec(doc)
    assert spec["rayVersion"] == ray.__version__
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu = groups["gpu-embed"]
    assert gpu["minReplicas"] == 0 and gpu["maxReplicas"] >= 1
    (worker,) = gpu["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    cpu = groups["cpu-train"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert "nvidia.com/gpu" not in cpu, "training runs on CPU workers"
    images = {c["image"] for grp in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
              for c in grp["template"]["spec"]["containers"]}
    assert len(images) == 1, "one image for every node"


def test_rayjob_runs_a_job_entrypoint():
    doc = yaml.safe_load((ROOT / "cluster" / "rayjob.yaml").read_text())["spec"]
    assert doc["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(doc["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == "/home/ray/mrm"  # where cluster/Dockerfile puts the tree
    argv = shlex.split(doc["entrypoint"])
    assert argv[0] == "python" and argv[1] in ("jobs/pipeline.py", "jobs/train.py")
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file()
    assert _job(Path(argv[1]).name, *argv[2:], "--dry-run").returncode == 0


def test_dockerfile_pins():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert re.search(rf"rayproject/ray:{re.escape(ray.__version__)}-py3\d+-cu\d+", text)
    assert "DS_BUILD_OPS=0" in text and "deepspeed==0.19.8" in text
    assert "flash-attn" in text and "[gpu]" in text
    assert 'torch==${TORCH_VERSION}' in text and "ARG TORCH_VERSION=2.13.0" in text


# --- jobs: YAML -> the commands' own options ------------------------------------------------
def test_options_are_checked_by_the_commands_own_definitions():
    o = cli.options("train", {
        "embeddings": "s3://b/e", "out": "s3://b/run", "config": "configs/prism.yaml", "local": False,
        "overrides": {"epochs": 3, "use_gpu": False, "inner": {"lr": 0.5, "steps": 2}, "hidden_sizes": [4, 2]},
    })
    assert (o.embeddings, o.out, o.config, o.local, o.preset) == ("s3://b/e", "s3://b/run", "configs/prism.yaml",
                                                                  False, None)
    assert shlex.split(cli.command_line("train", o)) == [
        "mrm", "train", "--embeddings", "s3://b/e", "--out", "s3://b/run", "--config", "configs/prism.yaml",
        "epochs=3", "use_gpu=false", "inner.lr=0.5", "inner.steps=2", "hidden_sizes=[4, 2]"]
    o = cli.options("prepare", {"dataset": "prism", "source": "raw", "out": "pairs"})
    assert shlex.split(cli.command_line("prepare", o)) == ["mrm", "prepare", "prism", "--source", "raw", "--out",
                                                           "pairs"]
    o = cli.options("embed", {"pairs": "p", "out": "e", "batch-tokens": "8", "max_length": 16})
    assert (o.batch_tokens, o.max_length, o.batch_rows) == (8, 16, 256)   # types applied, defaults filled


@pytest.mark.parametrize("stage,options,message", [
    ("nope", {}, "unknown command"),
    ("embed", {"pairs": "p", "out": "e", "modle": "x"}, "unknown option 'modle'"),
    ("embed", {"pairs": "p", "out": "e", "pooling": "max"}, "must be one of"),
    ("embed", {"pairs": "p", "out": "e", "batch_tokens": "many"}, "expects int"),
    ("train", {"out": "r"}, "missing required option(s) --embeddings"),
    ("prepare", {"source": "raw", "out": "pairs"}, "missing required option(s) dataset"),
])
def test_option_mistakes_are_one_line(stage, options, message):
    with pytest.raises(UserError, match=re.escape(message)):
        cli.options(stage, options)


def test_sections_and_sets():
    chain = {"stages": ["train"], "embed": {"pairs": "p", "out": "e"},
             "train": {"embeddings": "e", "out": "r", "overrides": {"epochs": 3}}}
    assert common.stage_section(chain, "embed") == {"pairs": "p", "out": "e"}
    with pytest.raises(UserError, match="no 'score' section"):
        common.stage_section(chain, "score")
    assert common.stage_section({"out": "x", "stages": ["embed"]}, "embed") == {"out": "x"}  # a flat file
    cfg = common.apply_sets(copy.deepcopy(chain), ["train.overrides.epochs=5", "train.overrides.inner.lr=0.1",
                                                   "embed.out=s3://b/e2", "train.local=true"])
    assert cfg["train"] == {"embeddings": "e", "out": "r", "overrides": {"epochs": 5, "inner": {"lr": 0.1}},
                            "local": True}
    assert cfg["embed"]["out"] == "s3://b/e2" and chain["embed"]["out"] == "e"   # a new mapping
    with pytest.raises(UserError, match="not KEY=VALUE"):
        common.apply_sets({}, ["no-equals-sign"])
    steps = common.chain(chain)
    assert [name for name, _ in steps] == ["train"] and steps[0][1].overrides == {"epochs": 3}
    assert [name for name, _ in common.chain(chain, ["embed", "train"])] == ["embed", "train"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_job_configs_use_the_commands_real_options(path):
    """Every section of every shipped config passes its command's own option checks, in pipeline order."""
    cfg = common.load_config(path)
    stages = cfg["stages"]
    assert stages and all(s in common.STAGES and s in cfg for s in stages)
    assert [s for s in common.STAGES if s in stages] == stages, "stages run in pipeline order"
    checked = common.chain(cfg, [s for s in common.STAGES if s in cfg])
    assert len(checked) >= len(stages)


@pytest.mark.parametrize("script", [f"{s}.py" for s in STAGE_JOBS] + ["pipeline.py"])
def test_job_help_and_docstring(script):
    res = _job(script, "--help")
    assert res.returncode == 0, res.stderr
    assert f"ray job submit --working-dir . -- python jobs/{script} --config jobs/configs/" in res.stdout
    assert "--dry-run" in res.stdout and "--set" in res.stdout
    source = (JOBS / script).read_text()
    assert 'if __name__ == "__main__":' in source
    for code in (source, (JOBS / "_common.py").read_text()):   # options reach the stages, never an argv
        assert "cli.main(" not in code and "argv.append" not in code and "argv +=" not in code


def _expected(path: Path, stage: str) -> list[str]:
    cfg = yaml.safe_load(path.read_text())
    return shlex.split(cli.command_line(stage, cli.options(stage, cfg[stage])))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
@pytest.mark.parametrize("stage", STAGE_JOBS)
def test_stage_job_dry_run_prints_the_command(path, stage):
    cfg = common.load_config(path)
    res = _job(f"{stage}.py", "--config", str(path.relative_to(ROOT)), "--dry-run")
    if stage not in cfg:
        assert res.returncode == 2 and f"no {stage!r} section" in res.stderr
        assert "Traceback" not in res.stderr
        return
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == _expected(path, stage)


def test_prism_commands_exactly():
    res = _job("pipeline.py", "--config", "jobs/configs/prism.yaml", "--dry-run")
    lines = [shlex.split(line) for line in res.stdout.splitlines()]
    assert [a[1] for a in lines] == ["prepare", "embed", "train", "evaluate"]
    assert lines[0][:3] == ["mrm", "prepare", "prism"] and "--reference" in lines[0]
    train = lines[2]
    assert train[:8] == ["mrm", "train", "--embeddings", "s3://YOUR-BUCKET/mrm/prism/embeddings/skywork-v2-llama-8b",
                         "--out", "s3://YOUR-BUCKET/mrm/prism/runs/mrm-rpo", "--preset", "prism"]
    assert train[8:] == ["num_workers=2", "cpus_per_worker=4", "use_gpu=false"]
    embed = lines[1]
    assert embed[embed.index("--model") + 1] == "Skywork/Skywork-Reward-V2-Llama-3.1-8B"
    assert embed[embed.index("--num-gpus") + 1] == "1"


def test_set_and_stages_on_the_command_line():
    res = _job("train.py", "--config", "jobs/configs/cpu-small.yaml", "--set", "overrides.epochs=2",
               "--set", "out=/tmp/x", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == ["mrm", "train", "--embeddings", "/tmp/mrm-cpu-small/embeddings", "--out",
                                       "/tmp/x", "num_workers=2", "cpus_per_worker=0.5", "epochs=2"]
    res = _job("pipeline.py", "--config", "jobs/configs/cpu-small.yaml", "--stages", "train,evaluate",
               "--set", "train.overrides.epochs=1", "--dry-run")
    assert [shlex.split(line)[1] for line in res.stdout.splitlines()] == ["train", "evaluate"]
    assert "epochs=1" in res.stdout.splitlines()[0]
    res = _job("pipeline.py", "--dry-run")  # no --config: the demo chain
    assert res.stdout.strip() == "mrm demo"
    res = _job("pipeline.py", "--set", "demo.workdir=/tmp/d", "--dry-run")
    assert res.stdout.strip() == "mrm demo --workdir /tmp/d"


@pytest.mark.parametrize("args,message", [
    (["--config", "jobs/configs/cpu-small.yaml", "--set", "oops"], "is not KEY=VALUE"),
    (["--config", "does/not/exist.yaml"], "No such file"),
    (["--config", "jobs/configs/cpu-small.yaml", "--set", "overrides.epochs=0"], None),
    (["--config", "jobs/configs/cpu-small.yaml", "--set", "epochz=3"], "unknown option 'epochz'"),
])
def test_config_mistakes_are_one_line(args, message):
    res = _job("train.py", *args, "--dry-run")
    if message is None:   # a bad config VALUE is the stage's to refuse, when it runs (not at --dry-run)
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr, res.stderr
