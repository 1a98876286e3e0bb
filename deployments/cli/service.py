"""`defectscope push`, `defectscope results` and `defectscope demo`: the service from the line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from deployments.cli.inspection import add_redis_options, redis_prefix
from pipeline.errors import DefectscopeError

SAMPLES = Path(__file__).resolve().parents[2] / "pipeline" / "samples"
DEMO_PRODUCT = "washer"
DEMO_LINES = ("line-1", "line-2")
DEMO_CPUS = 6


def register(commands: argparse._SubParsersAction) -> None:
    push = commands.add_parser(
        "push",
        help="push camera frames (a directory, a video file or rtsp://) to the service",
        description="Push frames to defectscope over HTTP or straight into the line's Redis "
        "stream, keeping a bounded number in flight and backing off when the service is busy.",
    )
    push.add_argument("--line", required=True)
    push.add_argument("--camera", default="cam-1")
    push.add_argument("--product", required=True)
    push.add_argument("--source", required=True, help="image directory, video file or rtsp:// URL")
    push.add_argument("--fps", type=float, help="frames per second (default: as fast as accepted)")
    push.add_argument("--via", choices=["http", "redis"], default="http")
    push.add_argument("--url", default="http://127.0.0.1:8000", help="the service (for --via http)")
    push.add_argument("--max-inflight", type=int, default=8)
    push.add_argument("--max-frames", type=int, help="stop after this many frames")
    push.add_argument("--loop", action="store_true", help="start the source again at its end")
    push.add_argument("--class-name")
    add_redis_options(push)
    push.set_defaults(run=run_push)

    results = commands.add_parser("results", help="print a line's results as they arrive")
    results.add_argument("--line", required=True, action="append", help="repeat for more lines")
    results.add_argument("--follow", "-f", action="store_true", help="keep waiting for new results")
    results.add_argument("--json", action="store_true", help="one JSON object per line")
    add_redis_options(results)
    results.set_defaults(run=run_results)

    demo = commands.add_parser(
        "demo",
        help="run the whole service on embedded defaults with a simulated camera",
        description="Starts Ray Serve locally with the embedded Redis, the tiny encoder and the "
        "embedded Gemma 3 270M explainer, builds a bank from the bundled normal washers, and "
        "pushes the bundled test frames (some with painted defects) through Redis Streams and "
        "HTTP, printing verdicts as they arrive. Ctrl-C stops it.",
    )
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument("--llm", default="gemma3-270m", help="explainer LLM, or 'none'")
    demo.add_argument("--fps", type=float, default=1.0, help="frames per second per camera")
    demo.add_argument("--frames", type=int, help="frames per camera, then stop (default: forever)")
    add_redis_options(demo)
    demo.set_defaults(run=run_demo)


def _async_redis(args: argparse.Namespace) -> Any:
    from bankstore import redis_url
    from deployments.replica import async_client

    return async_client(redis_url(args.redis_url))


def run_push(args: argparse.Namespace) -> int:
    from deployments.client import push

    client = _async_redis(args) if args.via == "redis" else None
    summary = asyncio.run(
        push(
            args.source,
            args.line,
            args.camera,
            args.product,
            via=args.via,
            url=args.url,
            redis_client=client,
            prefix=redis_prefix(args),
            fps=args.fps,
            max_inflight=args.max_inflight,
            max_frames=args.max_frames,
            loop=args.loop,
            token=os.environ.get("DEFECTSCOPE_API_TOKEN"),
            class_name=args.class_name,
            progress=sys.stderr.isatty(),
        )
    )
    for error in summary.errors[:20]:
        print(f"defectscope: rejected: {error}", file=sys.stderr)
    print(summary.line())
    return 0 if summary.rejected == 0 and summary.failed == 0 else 1


def run_results(args: argparse.Namespace) -> int:
    from deployments.client import describe, tail_results

    async def follow() -> None:
        client = _async_redis(args)
        async for kind, result in tail_results(client, redis_prefix(args), args.line, args.follow):
            if args.json:
                print(json.dumps({"kind": kind, **result.to_dict()}), flush=True)
            else:
                print(describe(kind, result), flush=True)

    asyncio.run(follow())
    return 0


def run_demo(args: argparse.Namespace) -> int:
    import httpx
    import msgpack
    import ray
    from ray import serve

    from bankstore import BankStore, redis_url
    from bankstore.connection import safe_url
    from deployments.app import compose

    url = redis_url(args.redis_url)
    llm = None if args.llm in ("", "none") else args.llm
    base = f"http://127.0.0.1:{args.port}"
    print(f"defectscope demo: Redis at {safe_url(url)}, service at {base}")
    print("starting Ray Serve (about a minute; converting Gemma the first time takes another)")
    # Logical CPUs: the five deployments share this machine's cores rather than wait for more.
    ray.init(
        address="local",  # a cluster of its own, even where `ray start` left one running
        num_cpus=max(DEMO_CPUS, os.cpu_count() or 1),
        include_dashboard=False,
        log_to_driver=False,
        logging_level="ERROR",
    )
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app_args = {"llm": llm, "redis_url": url, "redis_prefix": redis_prefix(args)}
        serve.run(compose(app_args), name="defectscope", route_prefix="/")

        store = BankStore.connect(url, prefix=redis_prefix(args))
        version = store.current_version(DEMO_PRODUCT)
        if version is None:
            images = [path.read_bytes() for path in sorted((SAMPLES / "normal").glob("*.jpg"))]
            body = msgpack.packb({"images": images, "class_name": DEMO_PRODUCT}, use_bin_type=True)
            response = httpx.post(
                f"{base}/v1/banks/{DEMO_PRODUCT}/normals",
                content=body,
                headers={"content-type": "application/x-msgpack"},
                timeout=300,
            )
            if response.status_code != 201:
                raise DefectscopeError(f"building the demo bank failed: {response.text}")
            version = response.json()["version"]
            print(f"bank {DEMO_PRODUCT!r}: version {version} from {len(images)} normal images")
        else:
            print(f"bank {DEMO_PRODUCT!r}: using stored version {version}")
        print(f"metrics: {base}/metrics   API docs: {base}/docs   health: {base}/healthz")
        print("line-1 camera pushes through Redis Streams, line-2 through HTTP; Ctrl-C stops\n")
        asyncio.run(_cameras(args, url, base))
    except KeyboardInterrupt:
        print("\nstopping")
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


async def _cameras(args: argparse.Namespace, url: str, base: str) -> None:
    from deployments.client import describe, push, tail_results
    from deployments.replica import async_client

    client = async_client(url)
    start = f"{int(time.time() * 1000)}-0"
    sent: set[str] = set()
    verdicts: set[str] = set()
    explaining: set[str] = set()
    source = str(SAMPLES / "test")

    cameras = [
        push(source, DEMO_LINES[0], "cam-a", DEMO_PRODUCT, via="redis", redis_client=client,
             prefix=redis_prefix(args), fps=args.fps, max_frames=args.frames, loop=True,
             progress=False, on_sent=sent.add),
        push(source, DEMO_LINES[1], "cam-b", DEMO_PRODUCT, via="http", url=base, fps=args.fps,
             max_frames=args.frames, loop=True, progress=False, on_sent=sent.add),
    ]  # fmt: skip
    pushing = asyncio.gather(*cameras)

    async def printer() -> None:
        async for kind, result in tail_results(
            client, redis_prefix(args), list(DEMO_LINES), follow=True, start=start
        ):
            print(describe(kind, result), flush=True)
            if kind == "verdict":
                verdicts.add(result.frame_id)
                if result.explanation == "pending":
                    explaining.add(result.frame_id)
            else:
                explaining.discard(result.frame_id)

    reading = asyncio.create_task(printer())
    summaries = await pushing
    deadline = time.monotonic() + 300
    while (not sent <= verdicts or explaining) and time.monotonic() < deadline:
        await asyncio.wait({reading}, timeout=0.5)  # the printer is the condition's source
    reading.cancel()
    for camera, summary in zip(("cam-a (redis)", "cam-b (http)"), summaries, strict=True):
        print(f"{camera}: {summary.line()}")
