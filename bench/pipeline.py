"""Frames/s and latency through the whole Serve pipeline against the in-process Detector.

Both sides run the same model (the tiny preset unless --preset says otherwise), the same image
size, the same batch size and the same bank, decode the same JPEG frames, and skip explanations
(the LLM is its own stage and has its own figures). The in-process side inspects the frames in
batches; the pipeline side keeps `--concurrency` requests in flight against POST /v1/inspect
through Ray Serve (Ingress -> EncoderDecoder -> BankMatcher). Then frames are pushed into a Redis
stream at rising rates to find the largest rate the pipeline sustains without falling behind.

    python bench/pipeline.py [--frames 256] [--batch-size 8] [--concurrency 16] [--redis-url URL]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

# Run as a script, this file's directory (bench/) comes first on sys.path, and bench/pipeline.py
# would hide the `pipeline` package: the repository root goes ahead of it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
ROOT = Path(__file__).resolve().parents[1]

import httpx
import msgpack
import torch

SAMPLES = ROOT / "pipeline" / "samples"


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def frames(count: int) -> list[bytes]:
    pictures = [path.read_bytes() for path in sorted((SAMPLES / "test").glob("*.jpg"))]
    return [pictures[index % len(pictures)] for index in range(count)]


def in_process(preset: str, data: list[bytes], batch_size: int) -> tuple[float, list[float]]:
    """(frames/s, per-frame latencies) of Detector.inspect in batches, decode included."""
    from pipeline.detector import Detector, DetectorConfig
    from pipeline.encoder import EncoderConfig
    from pipeline.images import decode_image, load_image

    detector = Detector(DetectorConfig(encoder=EncoderConfig(preset=preset), batch_size=batch_size))
    normals = [load_image(path) for path in sorted((SAMPLES / "normal").glob("*.jpg"))]
    bank = detector.build_bank(normals)
    detector.inspect([decode_image(data[0], "warm-up")], bank=bank)

    latencies = []
    started = time.perf_counter()
    for start in range(0, len(data), batch_size):
        batch_started = time.perf_counter()
        images = [decode_image(item, "frame") for item in data[start : start + batch_size]]
        detector.inspect(images, bank=bank)
        latencies += [time.perf_counter() - batch_started] * len(images)
    return len(data) / (time.perf_counter() - started), latencies


async def through_http(base: str, data: list[bytes], concurrency: int) -> tuple[float, list[float]]:
    """(frames/s, per-request latencies) with `concurrency` requests in flight."""
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base, timeout=120) as client:

        async def one(index: int, body: bytes) -> None:
            async with slots:
                sent = time.perf_counter()
                response = await client.post(
                    "/v1/inspect",
                    params={"line": "bench", "product": "washer", "frame_id": f"b{index}"},
                    content=body,
                    headers={"content-type": "image/jpeg"},
                )
                response.raise_for_status()
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(one(-i - 1, body) for i, body in enumerate(data[:concurrency])))
        latencies.clear()  # warm-up done: batches formed, banks cached
        started = time.perf_counter()
        await asyncio.gather(*(one(i, body) for i, body in enumerate(data)))
        return len(data) / (time.perf_counter() - started), latencies


def sustained_rate(client, prefix: str, data: list[bytes], rates: list[int], seconds: float) -> int:
    """The largest rate at which every pushed frame has its verdict within 2 s of the last push."""
    from deployments.messages import Frame

    best = 0
    for rate in rates:
        line = f"rate-{rate}-{uuid.uuid4().hex[:6]}"
        key, results = f"{prefix}frames:{line}", f"{prefix}results:{line}"
        # One frame first, so the line's stream is found and its consumer group made before timing.
        warm_up = Frame(f"{line}-warm", line, "cam", "washer", time.time(), "jpeg", data[0])
        client.xadd(key, {"frame": warm_up.to_message()})
        client.xread({results: "0"}, block=60_000)
        total = int(rate * seconds)
        started = time.monotonic()
        for index in range(total):
            delay = started + index / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)  # pacing the simulated camera
            frame = Frame(
                f"{line}-{index}",
                line,
                "cam",
                "washer",
                time.time(),
                "jpeg",
                data[index % len(data)],
            )
            client.xadd(key, {"frame": frame.to_message()})
        deadline = time.monotonic() + 2.0
        while client.xlen(results) < total + 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        kept_up = client.xlen(results) >= total + 1
        print(
            f"  {rate:>4} frames/s for {seconds:.0f} s: {'kept up' if kept_up else 'fell behind'}"
        )
        if not kept_up:
            break
        best = rate
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--frames", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379")
    )
    parser.add_argument("--rates", type=int, nargs="+", default=[5, 10, 15, 20, 25, 30, 40, 50])
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument("--device", default=None, help="cuda or cpu for the pipeline replicas")
    parser.add_argument("--port", type=int, default=8765)
    arguments = parser.parse_args()
    data = frames(arguments.frames)

    local_fps, local_latencies = in_process(arguments.preset, data, arguments.batch_size)

    import ray
    from ray import serve

    from bankstore import connect
    from deployments.app import compose
    from tests.helpers import delete_prefix

    prefix = f"bench:{uuid.uuid4().hex[:8]}:"
    gpus = 1 if arguments.device == "cuda" else 0
    args = {"preset": arguments.preset, "llm": None, "redis_url": arguments.redis_url,
            "redis_prefix": prefix, "device": arguments.device}  # fmt: skip
    batching = {"max_batch_size": arguments.batch_size, "batch_wait_timeout_s": 0.01}
    # The encoder gets as many torch threads as the in-process side uses.
    threads = {"torch_threads": torch.get_num_threads()}
    options = {
        "EncoderDecoder": {
            "user_config": {**batching, **threads},
            "ray_actor_options": {"num_cpus": 1, "num_gpus": gpus},
        },
        "BankMatcher": {"user_config": batching},
    }
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    client = connect(arguments.redis_url)
    try:
        base = f"http://127.0.0.1:{arguments.port}"
        serve.start(http_options={"host": "127.0.0.1", "port": arguments.port})
        serve.run(compose(args, options), name="defectscope", route_prefix="/")
        normals = [p.read_bytes() for p in sorted((SAMPLES / "normal").glob("*.jpg"))]
        httpx.post(
            f"{base}/v1/banks/washer/normals",
            content=msgpack.packb({"images": normals}, use_bin_type=True),
            headers={"content-type": "application/x-msgpack"},
            timeout=300,
        ).raise_for_status()
        serve_fps, serve_latencies = asyncio.run(through_http(base, data, arguments.concurrency))
        print(
            f"\n{arguments.frames} frames, preset {arguments.preset}, batch {arguments.batch_size}"
        )
        print(f"{'':>22}{'frames/s':>10}{'p50 (ms)':>10}{'p99 (ms)':>10}")
        for name, fps, latencies in (
            ("in-process Detector", local_fps, local_latencies),
            (f"Serve, {arguments.concurrency} in flight", serve_fps, serve_latencies),
        ):
            p50, p99 = 1000 * statistics.median(latencies), 1000 * percentile(latencies, 0.99)
            print(f"{name:>22}{fps:>10.1f}{p50:>10.1f}{p99:>10.1f}")
        print(f"pipeline / in-process throughput: {serve_fps / local_fps:.2f}x")
        print("sustained rate through Redis Streams (every verdict within 2 s of the last frame):")
        best = sustained_rate(client, prefix, data, arguments.rates, arguments.rate_seconds)
        print(f"largest sustained rate without loss: {best} frames/s")
    finally:
        serve.shutdown()
        ray.shutdown()
        delete_prefix(client, prefix)


if __name__ == "__main__":
    main()
