"""One real Ray Serve instance for the whole test run: the tiny encoder, the tiny random LLM as
explainer, a real Redis under a prefix of its own, and a bank for the washer product."""

from __future__ import annotations

import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import msgpack
import pytest
import redis

from tests.helpers import delete_prefix

API_TOKEN = "line-token"
ADMIN_TOKEN = "admin-token"
PAUSED_LINE = "paused"
"""A line StreamIngest does not consume, so its backlog only grows (for admission tests)."""
BACKLOG_LIMIT = 20


@dataclass(frozen=True)
class Service:
    base_url: str
    redis_url: str
    prefix: str
    client: redis.Redis

    def http(self, token: str | None = API_TOKEN) -> httpx.Client:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)

    def admin(self) -> httpx.Client:
        return self.http(ADMIN_TOKEN)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def normal_bytes(sample_dir: Path) -> list[bytes]:
    return [path.read_bytes() for path in sorted((sample_dir / "normal").glob("*.jpg"))]


def add_normals(service: Service, product: str, images: list[bytes], **fields: object) -> dict:
    body = msgpack.packb({"images": images, **fields}, use_bin_type=True)
    with service.admin() as http:
        response = http.post(
            f"/v1/banks/{product}/normals",
            content=body,
            headers={"content-type": "application/x-msgpack"},
        )
    assert response.status_code == 201, response.text
    return response.json()


@pytest.fixture(scope="session")
def service(redis_url: str, tiny_llm_dir: Path, sample_dir: Path) -> Iterator[Service]:
    import ray
    from ray import serve

    from bankstore import connect
    from deployments.app import compose

    prefix = f"test:serve:{uuid.uuid4().hex[:8]}:"
    port = free_port()
    args = {"llm": str(tiny_llm_dir), "redis_url": redis_url, "redis_prefix": prefix}
    tokens = {"DEFECTSCOPE_API_TOKEN": API_TOKEN, "DEFECTSCOPE_ADMIN_TOKEN": ADMIN_TOKEN}
    options = {
        "Ingress": {
            "ray_actor_options": {"num_cpus": 0.25, "runtime_env": {"env_vars": tokens}},
            "user_config": {"backlog_limit": BACKLOG_LIMIT, "explain": "anomalous"},
        },
        "StreamIngest": {
            "user_config": {
                "claim_idle_ms": 1500,
                "max_deliveries": 3,
                "discover_interval_s": 0.5,
                "lines": [],
                "exclude_lines": [PAUSED_LINE],
            }
        },
        "Explainer": {"user_config": {"max_new_tokens": 6}},
    }
    # Logical CPUs: the deployments share this machine's cores.
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(compose(args, options), name="defectscope", route_prefix="/")
    client = connect(redis_url)
    running = Service(f"http://127.0.0.1:{port}", redis_url, prefix, client)
    add_normals(running, "washer", normal_bytes(sample_dir), class_name="washer")
    try:
        yield running
    finally:
        serve.shutdown()
        ray.shutdown()
        delete_prefix(client, prefix)
        client.close()


def wait_for_results(
    service: Service,
    line: str,
    frame_ids: set[str],
    kinds: tuple[str, ...] = ("verdict",),
    timeout_s: float = 120.0,
) -> list[tuple[str, str, dict]]:
    """Reads results:<line> with blocking XREADs until every frame id has every kind of entry;
    returns all (frame id, kind, result) entries read. Fails on timeout."""
    key = f"{service.prefix}results:{line}"
    entries: list[tuple[str, str, dict]] = []
    position = "0"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        have = {(frame, kind) for frame, kind, _ in entries}
        if all((frame, kind) in have for frame in frame_ids for kind in kinds):
            return entries
        reply = service.client.xread({key: position}, count=500, block=500)
        for _, stream_entries in reply or []:
            for entry_id, fields in stream_entries:
                position = entry_id
                entries.append(
                    (
                        fields[b"frame_id"].decode(),
                        fields[b"kind"].decode(),
                        msgpack.unpackb(fields[b"result"], raw=False),
                    )
                )
    missing = {frame for frame in frame_ids if frame not in {f for f, _, _ in entries}}
    raise AssertionError(f"no results for {sorted(missing)[:5]} on {line} in {timeout_s} s")
