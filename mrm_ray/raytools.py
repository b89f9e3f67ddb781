"""The thin Ray glue every Ray stage shares: one way to connect, to wait for resources, to unwrap errors.

    ensure_ray(address)              connect (address, else RAY_ADDRESS, else a new local cluster)
    require_resources(cpu, gpu, ...) fail at once when a cluster that cannot grow is too small; on a
                                     cluster that can, wait (bounded, with progress) for the autoscaler

A failure inside a task, actor or UDF comes back wrapped by Ray:
mrm_ray.errors.unwrap finds our one-line error inside it.
"""
from __future__ import annotations

import logging
import os
import time

from mrm_ray.errors import UserError

log = logging.getLogger(__name__)

# Seconds to wait for an autoscaling cluster to provide what a stage asks (0: fail at once).
WAIT_ENV = "MRM_RESOURCE_TIMEOUT"
DEFAULT_WAIT = 600.0
_started_here = False


class ResourceError(UserError):
    pass


def ensure_ray(address: str | None = None) -> None:
    """ray.init once: `address`, else RAY_ADDRESS, else a new local cluster (which cannot grow)."""
    global _started_here
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    # Ray's notice about its token-auth default is not about this command (docs/stack notes: noise)
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, include_dashboard=False, configure_logging=False, log_to_driver=False)
    _started_here = address is None


def can_grow() -> bool:
    """Can the connected cluster add nodes?  Only when an autoscaler runs: it publishes the cluster's
    node types to the GCS (a local cluster, or `ray start` without an autoscaling config, has none)."""
    if _started_here:
        return False
    try:
        from ray._private import state
        return state.state.get_cluster_config() is not None
    except Exception:  # noqa: BLE001 - an unknown cluster: assume it may grow, and bound the wait
        return True


def _have(kind: str) -> float:
    import ray
    return float(ray.cluster_resources().get(kind, 0.0))


def require_resources(cpus: float, gpus: float, what: str, timeout: float | None = None) -> None:
    """Refuse or wait: `what` (e.g. "2 Ray Train workers x 1 CPU") needs `cpus` CPUs and `gpus` GPUs."""
    def short() -> str | None:
        have_cpu, have_gpu = _have("CPU"), _have("GPU")
        if cpus > have_cpu or gpus > have_gpu:
            return f"{what} needs {cpus:g} CPU and {gpus:g} GPU; the cluster has {have_cpu:g} CPU and {have_gpu:g} GPU"
        return None
    missing = short()
    if missing is None:
        return
    if not can_grow():
        raise ResourceError(f"{missing}, and it cannot grow (a fixed local cluster); ask for less")
    timeout = float(os.environ.get(WAIT_ENV, DEFAULT_WAIT)) if timeout is None else timeout
    t0, last = time.time(), 0.0
    while missing is not None:
        waited = time.time() - t0
        if waited >= timeout:
            raise ResourceError(f"{missing} after waiting {waited:.0f}s for the autoscaler "
                                f"({WAIT_ENV}={timeout:g}); ask for less or check the cluster's node types")
        if waited - last >= 10 or last == 0:
            log.info("waiting for the autoscaler: %s (%.0fs of %.0fs)", missing, waited, timeout)
            last = waited or 1e-9
        time.sleep(1.0)
        missing = short()
