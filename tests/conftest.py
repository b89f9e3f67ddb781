"""Shared fixtures: one local Ray cluster per test session, an S3 server on loopback.

Everything here is real: `ray.init` starts a real local cluster (2 CPUs, like
the machines CI runs on) and moto's ThreadedMotoServer speaks the S3 protocol
on 127.0.0.1, which pyarrow, s3fs, Ray Data and Ray Train all talk to.
"""
from __future__ import annotations

import os
import uuid

import pytest

from helpers import free_port

os.environ.setdefault("RAY_DISABLE_USAGE_STATS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """A local Ray cluster shared by every test that needs one (start-up costs ~5 s).

    It starts after the S3 server so its workers inherit the AWS_* variables.
    """
    import ray

    if not ray.is_initialized():
        # address="local": always a fresh cluster, even if a `ray start` head runs on this machine
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, runtime_env={"env_vars": {"RAY_TRAIN_V2_ENABLED": "1"}})
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on loopback; sets the AWS_* variables that mrm_ray.data.storage reads."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns its s3:// URI."""
    import boto3

    name = f"mrm-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=s3_server["AWS_ENDPOINT_URL"], region_name="us-east-1").create_bucket(Bucket=name)
    return f"s3://{name}"
