"""StreamIngest: frames from Redis Streams, at least once.

Each replica is one consumer of the group `defectscope` on every `frames:<line>` stream. An entry
is acknowledged (and deleted) only after its result is written to `results:<line>`; a verdict is
written once per frame id, so a frame delivered again after a crash still has exactly one verdict.
Entries left pending longer than `claim_idle_ms` by a consumer that stopped are taken over with
XAUTOCLAIM. A frame that fails `max_deliveries` times goes to `deadletter:<line>` with the reason,
gets an error result, and is acknowledged. A frame that is wrong in itself (corrupt image, unknown
product, oversize) gets its error result at once: retrying could not help.

Drop policy: processed entries are deleted, so a stream holds only frames not yet inspected.
Producers add with `MAXLEN ~ frames_maxlen`, which drops the oldest uninspected frames once a line
is that far behind; `POST /v1/frames` and `defectscope push` stop adding well before, at
`backlog_limit`, so frames are only dropped by producers that ignore the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from fnmatch import fnmatch
from typing import Any

import redis.asyncio
from ray import serve
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.config import AppArgs, StreamOptions, from_mapping
from deployments.inspector import Inspector
from deployments.messages import ErrorCode, FrameError, error_result, parse_frame
from deployments.replica import async_client, start_metrics
from deployments.results import Keys, ResultStore

logger = logging.getLogger(__name__)

METRICS_PERIOD_S = 5.0
MAX_BACKOFF_S = 10.0


@serve.deployment(
    name="StreamIngest",
    num_replicas=1,
    max_ongoing_requests=8,
    ray_actor_options={"num_cpus": 0.25},
)
class StreamIngest:
    """A consumer-group reader that runs every frame through the `Inspector`."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        matcher: DeploymentHandle,
        explainer: DeploymentHandle | None,
        args: dict[str, Any] | None = None,
    ) -> None:
        self.args = from_mapping(AppArgs, args, "StreamIngest args")
        self.options = StreamOptions()
        self.redis: redis.asyncio.Redis = async_client(self.args.redis_url)
        self.keys = Keys(self.args.redis_prefix)
        self.results = ResultStore(
            self.redis,
            self.args.redis_prefix,
            self.options.results_ttl_s,
            self.options.results_maxlen,
        )
        self.inspector = Inspector(encoder, matcher, explainer, self.results, self.options)
        self.replica, self.snapshots = start_metrics(self.args, "stream")
        self.consumer = f"consumer-{self.replica}"
        self.streams: set[str] = set()
        self.processed = 0
        self._slots = asyncio.Semaphore(self.options.max_inflight)
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped = asyncio.Event()
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def reconfigure(self, config: dict[str, Any]) -> None:
        options = from_mapping(StreamOptions, config, "StreamIngest user_config")
        if options.max_inflight != self.options.max_inflight:
            self._slots = asyncio.Semaphore(options.max_inflight)
        self.options = options
        self.inspector.options = options
        self.results.ttl_s, self.results.maxlen = options.results_ttl_s, options.results_maxlen

    async def check_health(self) -> None:
        """Serve restarts the replica when its reader loop has died."""
        if self._loop_task.done() and not self._stopped.is_set():
            raise RuntimeError(f"stream reader stopped: {self._loop_task.exception()!r}")

    async def status(self) -> dict[str, Any]:
        return {
            "consumer": self.consumer,
            "streams": sorted(self.streams),
            "processed": self.processed,
        }

    async def __del__(self) -> None:
        self._stopped.set()
        self._loop_task.cancel()

    # The reader loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = 0.5
        next_discovery = next_claim = next_metrics = 0.0
        while not self._stopped.is_set():
            try:
                now = time.monotonic()
                if now >= next_discovery:
                    await self._discover()
                    next_discovery = now + self.options.discover_interval_s
                if now >= next_claim:
                    await self._claim_abandoned()
                    next_claim = now + self.options.claim_idle_ms / 2000
                if now >= next_metrics:
                    await self._record_stream_metrics()
                    next_metrics = now + METRICS_PERIOD_S
                await self._read_new()
                backoff = 0.5
            except asyncio.CancelledError:
                raise
            except Exception as error:  # keep consuming: Redis restarts, a replica going away
                logger.warning("stream reader: %s; retrying in %.1f s", error, backoff)
                await asyncio.sleep(backoff)
                backoff = min(MAX_BACKOFF_S, backoff * 2)

    async def _discover(self) -> None:
        """Finds the lines' streams and makes sure the group exists on each."""
        if self.options.lines:
            keys = {self.keys.frames(line) for line in self.options.lines}
        else:
            pattern = self.keys.frames("*")
            keys = {_text(key) async for key in self.redis.scan_iter(match=pattern, count=500)}
        keys = {
            key
            for key in keys
            if not any(
                fnmatch(self.keys.line_of(key), pattern) for pattern in self.options.exclude_lines
            )
        }
        for key in keys - self.streams:
            try:
                await self.redis.xgroup_create(key, self.options.group, id="0", mkstream=True)
                logger.info("consumer group %s created on %s", self.options.group, key)
            except redis.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise
        self.streams = keys

    async def _read_new(self) -> None:
        if not self.streams:
            await asyncio.sleep(self.options.block_ms / 1000)  # nothing to read yet
            return
        await self._slots.acquire()  # do not read more than we can work on
        self._slots.release()
        replies = await self.redis.xreadgroup(
            self.options.group,
            self.consumer,
            {key: ">" for key in self.streams},
            count=self.options.read_count,
            block=self.options.block_ms,
        )
        for key, entries in replies or []:
            for entry_id, fields in entries:
                await self._spawn(_text(key), _text(entry_id), fields, deliveries=1)

    async def _claim_abandoned(self) -> None:
        """Takes over entries that a stopped consumer left pending."""
        for key in list(self.streams):
            start = "0-0"
            while True:
                reply = await self.redis.xautoclaim(
                    key,
                    self.options.group,
                    self.consumer,
                    min_idle_time=self.options.claim_idle_ms,
                    start_id=start,
                    count=self.options.read_count,
                )
                start, entries = _text(reply[0]), reply[1]
                live = [(entry_id, fields) for entry_id, fields in entries if fields]
                if live:
                    deliveries = await self._delivery_counts(key, [_text(e) for e, _ in live])
                    metrics.STREAM_CLAIMED.labels(metrics.LINE(self.keys.line_of(key))).inc(
                        len(live)
                    )
                    for entry_id, fields in live:
                        entry = _text(entry_id)
                        await self._spawn(key, entry, fields, deliveries.get(entry, 2))
                if start == "0-0" or not entries:
                    break

    async def _delivery_counts(self, key: str, entry_ids: list[str]) -> dict[str, int]:
        pending = await self.redis.xpending_range(
            key, self.options.group, min=entry_ids[0], max=entry_ids[-1], count=len(entry_ids) * 2
        )
        return {_text(item["message_id"]): int(item["times_delivered"]) for item in pending}

    async def _spawn(
        self, key: str, entry_id: str, fields: dict[Any, Any], deliveries: int
    ) -> None:
        await self._slots.acquire()
        task = asyncio.create_task(self._handle(key, entry_id, fields, deliveries))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(
        self, key: str, entry_id: str, fields: dict[Any, Any], deliveries: int
    ) -> None:
        line = self.keys.line_of(key)
        try:
            data = fields.get(b"frame") or fields.get("frame") or b""
            try:
                frame = parse_frame(data, self.options.max_frame_bytes, {"line": line})
                frame = replace(frame, received_at=_entry_time(entry_id))
            except FrameError as error:
                fallback = {"frame_id": f"{line}-{entry_id}", "line": line}
                await self.inspector.store(error_result(None, error.code, str(error), fallback))
            else:
                if deliveries > 1 and await self.results.get(frame.frame_id) is not None:
                    pass  # redelivered after its result was written: just acknowledge it
                elif deliveries > self.options.max_deliveries:
                    await self._dead_letter(key, entry_id, data, frame.frame_id, deliveries)
                else:
                    await self.inspector.inspect(frame)
            await self._acknowledge(key, entry_id)
            self.processed += 1
        except Exception as error:  # left pending: claimed again after claim_idle_ms
            logger.warning(
                "frame entry %s of %s failed (delivery %d): %s", entry_id, key, deliveries, error
            )
            if deliveries >= self.options.max_deliveries:
                await self._dead_letter(
                    key, entry_id, fields.get(b"frame", b""), None, deliveries, error
                )
        finally:
            self._slots.release()

    async def _dead_letter(
        self,
        key: str,
        entry_id: str,
        data: bytes,
        frame_id: str | None,
        deliveries: int,
        error: Exception | None = None,
    ) -> None:
        line = self.keys.line_of(key)
        reason = f"failed {deliveries} deliveries" + (f": {error}" if error else "")
        try:
            frame = parse_frame(data, self.options.max_frame_bytes, {"line": line})
        except FrameError:
            frame = None
        fallback = {"frame_id": frame_id or f"{line}-{entry_id}", "line": line}
        await self.redis.xadd(
            self.keys.dead_letters(line),
            {
                "entry_id": entry_id,
                "frame_id": fallback["frame_id"],
                "reason": reason,
                "frame": data,
            },
            maxlen=self.options.frames_maxlen,
            approximate=True,
        )
        await self.inspector.store(error_result(frame, ErrorCode.FAILED, reason, fallback))
        await self._acknowledge(key, entry_id)
        metrics.DEAD_LETTERS.labels(metrics.LINE(line)).inc()
        logger.warning("frame entry %s of %s dead-lettered: %s", entry_id, key, reason)

    async def _acknowledge(self, key: str, entry_id: str) -> None:
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(key, self.options.group, entry_id)
            pipe.xdel(key, entry_id)
            await pipe.execute()

    async def _record_stream_metrics(self) -> None:
        for key in self.streams:
            line = metrics.LINE(self.keys.line_of(key))
            summary = await self.redis.xpending(key, self.options.group)
            metrics.STREAM_PENDING.labels(line).set(int(summary.get("pending", 0)))
            for group in await self.redis.xinfo_groups(key):
                if _text(group.get("name")) == self.options.group and group.get("lag") is not None:
                    metrics.STREAM_LAG.labels(line).set(int(group["lag"]))


def _entry_time(entry_id: str) -> float:
    """When Redis added a stream entry: its id is <milliseconds>-<sequence>."""
    return int(entry_id.split("-", 1)[0]) / 1000


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
