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
    logger.warning("%s runs on the CPU: no GPU is visible to this replica", component)
    return "cpu"


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
