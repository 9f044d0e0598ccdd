"""Start or join a Ray cluster, and size the job to it.

Without an address a local Ray instance is started for the run and shut down after it;
``auto`` or ``ray://host:port`` (or ``host:port``) joins an existing cluster, which is left
running. A driver that is already connected (a test session, a notebook) is reused as is.
Whether this process started the instance it is connected to is remembered
(:func:`driver_started_ray`): only then may the driver compute rows itself
(:mod:`audit.pipeline.head_start`).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from audit.errors import AuditError, first_line


class ClusterError(AuditError):
    """The Ray cluster cannot be reached or started."""


@contextmanager
def ray_cluster(address: str | None = None, runtime_env: dict | None = None) -> Iterator[None]:
    """Connected to Ray for the block; ``runtime_env`` is the job's (code shipped to every worker)."""
    import ray

    if ray.is_initialized():
        yield
        return
    if address not in (None, "auto"):
        check_reachable(address)
    try:
        if address is None:
            start_local_ray(
                include_dashboard=False,
                logging_level=logging.WARNING,
                configure_logging=True,
                runtime_env=runtime_env,
            )
        else:
            ray.init(address=address, logging_level=logging.WARNING, runtime_env=runtime_env)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ClusterError(f"cannot connect to {where}: {first_line(exc)}") from exc
    try:
        yield
    finally:
        ray.shutdown()


_started_here: set[str] = set()  # GCS addresses of the Ray instances this process started


def start_local_ray(**init_kwargs) -> None:
    """``ray.init`` without an address, remembering whether it started an instance of its own:
    it joins the cluster ``RAY_ADDRESS`` names, or one already running on this machine, instead."""
    import ray

    context = ray.init(**init_kwargs)
    node = getattr(getattr(ray._private.worker, "global_worker", None), "node", None)
    if getattr(node, "head", False):
        _started_here.add(context.address_info["gcs_address"])


def driver_started_ray() -> bool:
    """True while this process is connected to a local Ray instance it started (:func:`start_local_ray`):
    its workers are this process's children, with its environment, its files and its code."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().gcs_address in _started_here


@dataclass(frozen=True)
class ResourcePlan:
    """How many explain actors, and what each reserves.

    GPUs: one actor per GPU (``num_gpus=1``). CPU only: one actor per node, reserving one CPU
    and running torch on all but one of the node's cores (at least one), so the read tasks
    always find a free CPU and the job cannot starve itself (ray-project/ray#44687).
    With a ``node_resource``, the plan counts only the nodes holding that custom resource, and
    every read task and actor asks for ``NODE_RESOURCE_SHARE`` of it (``resources``), which
    places them there without limiting how many run at once.
    """

    actors: int
    gpus_per_actor: float
    cpus_per_actor: float
    torch_threads: int
    read_cpus: float
    resources: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**self.__dict__, "resources": dict(self.resources)}


NODE_RESOURCE_SHARE = 0.001


def plan_resources(actors: int | None = None, node_resource: str | None = None) -> ResourcePlan:
    import ray

    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if node_resource:
        nodes = [node for node in nodes if node.get("Resources", {}).get(node_resource)]
        if not nodes:
            raise ClusterError(
                f"no node of the Ray cluster has the resource {node_resource!r} "
                f"(start one with ray start --resources='{{\"{node_resource}\": 1}}')"
            )
    cpus = int(sum(node.get("Resources", {}).get("CPU", 0) for node in nodes)) or os.cpu_count() or 1
    gpus = int(sum(node.get("Resources", {}).get("GPU", 0) for node in nodes))
    placed = {node_resource: NODE_RESOURCE_SHARE} if node_resource else {}
    if gpus:
        return ResourcePlan(actors or gpus, 1.0, 1.0, max(1, cpus // max(1, gpus) - 1), 1.0, placed)
    per_node = max(1, cpus // max(1, len(nodes)))
    threads = max(1, per_node - 1) if per_node > 2 else per_node
    return ResourcePlan(actors or max(1, len(nodes)), 0.0, 1.0 if per_node > 1 else 0.5, threads, 0.5, placed)


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Fail in seconds, not minutes: ray.init keeps retrying an address nobody answers on."""
    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"cannot use Ray address {address!r}: expected auto, host:port or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from exc
