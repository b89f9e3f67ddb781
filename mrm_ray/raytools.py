"""The thin Ray glue every Ray stage shares: one way to connect, to wait for resources, to unwrap errors.

    ensure_ray(address)              connect (address, else RAY_ADDRESS, else a new local cluster)
    require_resources(bundles, what) fail at once when a cluster that cannot grow is too small; on a
                                     cluster that can, ask the autoscaler for the bundles and wait
                                     (bounded, saying for which node types) until they are there

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


def _autoscaler_report() -> dict | None:
    """What the head's autoscaler last published to the GCS (its launches, node types), or None."""
    import json

    from ray._private import ray_constants
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(ray_constants.DEBUG_AUTOSCALING_STATUS)
    return json.loads(raw).get("autoscaler_report") if raw else None


def can_grow() -> bool:
    """Can the connected cluster add nodes?  Only when its autoscaler has node types to launch: autoscaler v2
    publishes them to the GCS; v1 publishes a report whose node types, on a cluster started without an
    autoscaling config (`ray start`, a local cluster), are only the "readonly" mirrors of its nodes."""
    if _started_here:
        return False
    try:
        from ray._private import state
        from ray.autoscaler._private.util import format_readonly_node_type
        if state.state.get_cluster_config() is not None:
            return True
        report = _autoscaler_report()
    except Exception:  # noqa: BLE001 - an unknown cluster: assume it may grow, and bound the wait
        return True
    if report is None:
        return True
    mapping = report.get("node_type_mapping") or {}
    return not mapping or any(t != format_readonly_node_type(n) for n, t in mapping.items())


def launching() -> str:
    """The node types the autoscaler is launching now ("gpu_embed x1"), or ""."""
    try:
        report = _autoscaler_report() or {}
    except Exception:  # noqa: BLE001 - progress text only
        return ""
    counts = dict(report.get("pending_launches") or {})
    for node in report.get("pending_nodes") or []:   # [ip, node type, status]
        if isinstance(node, (list, tuple)) and len(node) > 1:
            counts[node[1]] = counts.get(node[1], 0) + 1
    return ", ".join(f"{t} x{n}" for t, n in counts.items())


def _have(kind: str) -> float:
    import ray
    return float(ray.cluster_resources().get(kind, 0.0))


def require_workers(num_workers: int, cpus_per_worker: float, use_gpu: bool, noun: str) -> None:
    """require_resources for a Ray Train worker group: one {CPU, GPU} bundle per worker."""
    bundle = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    require_resources([bundle] * num_workers, f"{num_workers} {noun}(s) x {cpus_per_worker:g} CPU"
                                              f"{' and 1 GPU' if use_gpu else ''}")


def node_types_for(bundle: dict) -> list[str]:
    """The autoscaler's node types whose nodes can hold `bundle`, as "name (max N)"; [] when unknown."""
    try:
        from ray._private import state
        config = state.state.get_cluster_config()
    except Exception:  # noqa: BLE001 - no autoscaler to ask
        return []
    if config is None:
        return []
    return [f"{g.name} (max {g.max_count})" for g in config.node_group_configs
            if g.max_count > 0 and all(g.resources.get(k, 0) >= v for k, v in bundle.items() if v > 0)]


def require_resources(bundles: list[dict], what: str, timeout: float | None = None) -> None:
    """Refuse or wait: `what` (e.g. "2 Ray Train workers x 1 CPU") needs every bundle ({"CPU": 1, "GPU": 1}
    per worker).  A cluster that cannot grow and is too small: one line at once.  One that can: the
    bundles become a placement group, demand the autoscaler launches the node types that fit for even before
    any task asks, and the wait says what it waits for and gives up with one line after `timeout` seconds
    (MRM_RESOURCE_TIMEOUT, default 600).  The group is removed once placed: the stage's own tasks hold the
    nodes from there.

    Not `ray.autoscaler.sdk.request_resources`: that is one cluster-wide slot, and Ray Data's coordinator
    actor (detached, left by any earlier Ray Data job) overwrites it every 20 s with its own requests,
    so a request made there could vanish before the autoscaler acted on it and the stage wait in vain."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    cpus = sum(float(b.get("CPU", 0)) for b in bundles)
    gpus = sum(float(b.get("GPU", 0)) for b in bundles)

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
    biggest = max(bundles, key=lambda b: (b.get("GPU", 0), b.get("CPU", 0)))
    types = node_types_for(biggest)
    if not types and node_types_for({}):   # the autoscaler knows its node types, and none fits
        raise ResourceError(f"{missing}, and no node type of this cluster fits {biggest}; ask for less")
    demand = [{k: float(v) for k, v in b.items() if v} for b in bundles]
    pg = placement_group([b for b in demand if b], strategy="PACK")   # PACK: as few nodes as fit
    t0, last, said = time.time(), -1e9, None
    try:
        while not ray.wait([pg.ready()], timeout=1.0)[0]:
            waited = time.time() - t0
            if waited >= timeout:
                raise ResourceError(f"{short() or missing} after waiting {waited:.0f}s for the autoscaler "
                                    f"({WAIT_ENV}={timeout:g}); ask for less or check the cluster's node types")
            now = launching()
            plan = f"launching {now}" if now else "node types that fit: " + (" or ".join(types) or "not published")
            if waited - last >= 10 or plan != said:   # every 10 s, and whenever the autoscaler's plan changes
                log.info("waiting for the autoscaler (%s): %s (%.0fs of %.0fs)", plan, short() or missing, waited,
                         timeout)
                last, said = waited, plan
        log.info("%s: the cluster grew in %.0fs", what, time.time() - t0)
    finally:
        remove_placement_group(pg)
