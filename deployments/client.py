"""The camera side: push frames to the service, and read results back.

`push` reads a directory of images, a video file or an RTSP stream (decoded with PyAV), and sends
each frame over HTTP (`POST /v1/frames`) or straight into the line's Redis stream. It keeps a
bounded number of frames in flight, backs off when the service answers 429/503 (honouring
Retry-After) or when the stream's backlog passes its limit, and counts what happened.
"""

from __future__ import annotations

import asyncio
import io
import logging
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis.asyncio
from tqdm import tqdm

from deployments.messages import Frame, Result
from deployments.results import FrameQueue, Keys
from pipeline.errors import DefectscopeError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {
    ".jpg": "jpeg",
    ".jpeg": "jpeg",
    ".png": "png",
    ".bmp": "png",
    ".tif": "png",
    ".tiff": "png",
}
MAX_BACKOFF_S = 10.0
MAX_ATTEMPTS = 20
"""Tries per frame before it counts as failed (each overload answer is one try)."""


class SourceError(DefectscopeError):
    """A frame source that cannot be read."""


@dataclass
class PushSummary:
    """What a push did."""

    sent: int = 0
    """Frames offered to the service (first attempts)."""
    accepted: int = 0
    rejected: int = 0
    """Refused as bad (4xx other than 429); they will not get better by retrying."""
    retried: int = 0
    """Attempts repeated after an overload answer or a connection error."""
    failed: int = 0
    """Gave up after `MAX_ATTEMPTS`."""
    errors: list[str] = field(default_factory=list)

    def line(self) -> str:
        return (
            f"sent {self.sent}, accepted {self.accepted}, rejected {self.rejected}, "
            f"retried {self.retried}, failed {self.failed}"
        )


def read_source(source: str, loop: bool = False) -> Iterator[tuple[bytes, str]]:
    """(encoded image, encoding) per frame of a directory, a video file or an RTSP URL."""
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise SourceError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        while True:
            for file in files:
                data = file.read_bytes()
                encoding = IMAGE_SUFFIXES[file.suffix.lower()]
                yield (
                    data,
                    encoding if encoding == "jpeg" or file.suffix.lower() == ".png" else "png",
                )
            if not loop:
                return
    if not (source.startswith(("rtsp://", "rtsps://", "http://", "https://")) or path.is_file()):
        raise SourceError(f"{source}: not a directory, a video file or an rtsp:// URL")
    while True:
        yield from _video_frames(source)
        if not loop or source.startswith("rtsp"):
            return


def _video_frames(source: str) -> Iterator[tuple[bytes, str]]:
    import av

    options = {"rtsp_transport": "tcp"} if source.startswith("rtsp") else {}
    try:
        container = av.open(source, options=options, timeout=10.0)
    except (av.error.FFmpegError, OSError) as error:
        raise SourceError(f"{source}: cannot open as video ({error})") from error
    with container:
        if not container.streams.video:
            raise SourceError(f"{source}: has no video stream")
        try:
            for picture in container.decode(video=0):
                buffer = io.BytesIO()
                picture.to_image().save(buffer, format="JPEG", quality=90)
                yield buffer.getvalue(), "jpeg"
        except av.error.FFmpegError as error:
            raise SourceError(f"{source}: decoding failed ({error})") from error


async def push(
    source: str,
    line: str,
    camera: str,
    product: str,
    via: str = "http",
    url: str = "http://127.0.0.1:8000",
    redis_client: redis.asyncio.Redis | None = None,
    prefix: str = "defectscope:",
    fps: float | None = None,
    max_inflight: int = 8,
    max_frames: int | None = None,
    loop: bool = False,
    token: str | None = None,
    class_name: str | None = None,
    backlog_limit: int = 10_000,
    frames_maxlen: int = 100_000,
    progress: bool = True,
    on_sent: object = None,
) -> PushSummary:
    """Pushes every frame of `source` to `line`; returns what happened.

    Args:
        via: "http" (POST /v1/frames at `url`) or "redis" (XADD to frames:<line> directly).
        fps: pace frames at this rate; None sends as fast as the service accepts.
        max_inflight: frames sent and not yet answered, at most.
        max_frames: stop after this many frames.
        loop: start the source again at its end (directories and files).
        on_sent: called with each accepted frame id.
    """
    summary = PushSummary()
    slots = asyncio.Semaphore(max_inflight)
    started = time.monotonic()
    headers = {"content-type": "application/x-msgpack"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    http = httpx.AsyncClient(base_url=url, timeout=60.0, headers=headers) if via == "http" else None
    queue = None
    if via == "redis":
        if redis_client is None:
            raise SourceError("pushing via redis needs a Redis connection")
        queue = FrameQueue(redis_client, prefix, frames_maxlen, "defectscope")
    elif via != "http":
        raise SourceError(f"--via {via!r}: choose http or redis")

    pending: set[asyncio.Task[None]] = set()
    bar = tqdm(total=max_frames, unit="frame", desc=f"{line}/{camera}", disable=not progress)
    try:
        async for data, encoding in _paced(read_source(source, loop), fps, max_frames, started):
            frame = Frame(
                frame_id=f"{line}.{camera}.{uuid.uuid4().hex[:16]}",
                line=line,
                camera=camera,
                product=product,
                timestamp=time.time(),
                encoding=encoding,
                image=data,
                class_name=class_name,
            )
            await slots.acquire()
            summary.sent += 1
            send = (
                _send_http(http, frame, summary)
                if http
                else _send_redis(queue, frame, summary, backlog_limit)
            )
            task = asyncio.create_task(_release_after(send, slots, bar, frame, summary, on_sent))
            pending.add(task)
            task.add_done_callback(pending.discard)
        if pending:
            await asyncio.gather(*pending)
    finally:
        bar.close()
        if http is not None:
            await http.aclose()
    return summary


async def _paced(
    frames: Iterator[tuple[bytes, str]], fps: float | None, max_frames: int | None, started: float
) -> AsyncIterator[tuple[bytes, str]]:
    """Yields frames, waiting for each one's slot in time when a rate is set."""
    for index, item in enumerate(frames):
        if max_frames is not None and index >= max_frames:
            return
        if fps:
            delay = started + index / fps - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing to the camera's frame rate
        yield item


async def _release_after(
    send: object,
    slots: asyncio.Semaphore,
    bar: tqdm,
    frame: Frame,
    summary: PushSummary,
    on_sent: object,
) -> None:
    try:
        accepted = await send  # type: ignore[misc]
        if accepted and callable(on_sent):
            on_sent(frame.frame_id)
    finally:
        slots.release()
        bar.update(1)
        bar.set_postfix_str(summary.line(), refresh=False)


async def _send_http(client: httpx.AsyncClient, frame: Frame, summary: PushSummary) -> bool:
    body = frame.to_message()
    delay = 0.5
    for attempt in range(MAX_ATTEMPTS):
        try:
            response = await client.post("/v1/frames", content=body)
        except httpx.TransportError as error:
            wait, reason = delay, f"connection: {error}"
        else:
            if response.status_code == 202:
                summary.accepted += 1
                return True
            if response.status_code not in (429, 503):
                summary.rejected += 1
                summary.errors.append(
                    f"{frame.frame_id}: {response.status_code} {_reason(response)}"
                )
                return False
            wait = float(response.headers.get("retry-after") or delay)
            reason = f"{response.status_code} {_reason(response)}"
        summary.retried += 1
        logger.debug(
            "frame %s attempt %d: %s; waiting %.1f s", frame.frame_id, attempt + 1, reason, wait
        )
        await asyncio.sleep(wait)  # backing off as the service asked
        delay = min(MAX_BACKOFF_S, delay * 2)
    summary.failed += 1
    summary.errors.append(f"{frame.frame_id}: gave up after {MAX_ATTEMPTS} attempts")
    return False


async def _send_redis(
    queue: FrameQueue, frame: Frame, summary: PushSummary, backlog_limit: int
) -> bool:
    delay = 0.5
    for _ in range(MAX_ATTEMPTS):
        try:
            if await queue.backlog(frame.line) < backlog_limit:
                await queue.push(frame)
                summary.accepted += 1
                return True
        except redis.RedisError as error:
            logger.debug("frame %s: %s", frame.frame_id, error)
        summary.retried += 1
        await asyncio.sleep(delay)  # the line is behind (or Redis is away): back off
        delay = min(MAX_BACKOFF_S, delay * 2)
    summary.failed += 1
    summary.errors.append(f"{frame.frame_id}: gave up after {MAX_ATTEMPTS} attempts")
    return False


def _reason(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200]
    return str(body.get("error") or body.get("detail") or body)[:200]


async def tail_results(
    client: redis.asyncio.Redis,
    prefix: str,
    lines: list[str],
    follow: bool,
    start: str = "0",
    block_ms: int = 1000,
) -> AsyncIterator[tuple[str, Result]]:
    """(kind, result) for each entry of the lines' results streams, oldest first; with `follow`,
    keeps waiting for new ones."""
    keys = Keys(prefix)
    positions = {keys.results(line): start for line in lines}
    while True:
        replies = await client.xread(positions, count=100, block=block_ms if follow else None)
        if not replies and not follow:
            return
        for key, entries in replies or []:
            name = key.decode() if isinstance(key, bytes) else key
            for entry_id, fields in entries:
                positions[name] = entry_id
                kind = fields.get(b"kind", b"verdict").decode()
                yield kind, Result.unpack(fields[b"result"])


def describe(kind: str, result: Result) -> str:
    """One human line for a result entry."""
    who = f"{result.line}/{result.camera} {result.frame_id}"
    if result.status == "error":
        return f"{who}: ERROR {result.error_code}: {result.error}"
    if kind == "explanation":
        return f"{who}: explained ({result.answer_source}): {result.answer}"
    verdict = "ANOMALOUS" if result.anomalous else "ok"
    where = ", ".join(region["location"] for region in result.regions)
    where = f" at {where}" if where else ""
    return (
        f"{who}: {verdict} score {result.score:.4f} (threshold {result.threshold:.4f}){where} "
        f"[{1000 * result.timings.get('total', 0.0):.0f} ms]"
    )
