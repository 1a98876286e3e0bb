"""What every defectscope replica does at start: pick its device, name itself, connect to Redis,
and publish its metrics."""

from __future__ import annotations

import logging
import os
import uuid

import redis.asyncio
import torch

from bankstore import connect, redis_url
from deployments.config import AppArgs
from deployments.metrics import SnapshotPublisher

logger = logging.getLogger(__name__)


def replica_id() -> str:
    """Serve's unique id of this replica (a random id outside Serve)."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return serve.get_replica_context().replica_id.unique_id
    except RayServeException:  # outside a replica there is no context to ask
        return uuid.uuid4().hex[:8]


def choose_device(args: AppArgs, component: str) -> str:
    """The configured device, else CUDA when this replica was given a GPU, else the CPU."""
    if args.device:
        return args.device
    if torch.cuda.is_available():
        return "cuda"
    if _assigned_gpus() > 0:
        logger.warning("%s was given a GPU but CUDA is not usable: running on the CPU", component)
    else:
        logger.info("%s runs on the CPU (num_gpus is 0 in its ray_actor_options)", component)
    return "cpu"


def _assigned_gpus() -> float:
    import ray

    if not ray.is_initialized():
        return 0.0
    return float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))


def start_metrics(args: AppArgs, component: str) -> tuple[str, SnapshotPublisher]:
    """Starts publishing this replica's metrics snapshots; returns (replica id, publisher)."""
    replica = replica_id()
    client = connect(args.redis_url)
    publisher = SnapshotPublisher(client, args.redis_prefix, component, replica).start()
    logger.info("%s replica %s ready (pid %d)", component, replica, os.getpid())
    return replica, publisher


def async_client(url: str | None) -> redis.asyncio.Redis:
    """An asyncio Redis client for a replica's event loop, made without I/O (constructors are
    synchronous); the first command connects, and failures surface there."""
    return redis.asyncio.Redis.from_url(redis_url(url), socket_timeout=30.0)
