"""Publish and load of memory banks through `BankStore`, against raw redis-py SET/GET of the same
bytes on the same server.

    .venv/bin/python bench/bankstore.py --url redis://127.0.0.1:6379 --sizes 4096 51200

Banks are random float16, PATCHES x 1,280 dims x 4 stages (51,200 patches: 500 MiB). The peer is
one pipeline of one SET (or GET) per stage holding the stage's whole byte string: no chunks, no
checksums, no metadata, no version switch, and its GET stops at the `bytes` objects, while a
`BankStore` load ends with verified (N, C) float16 tensors. Each figure is the median of
`--repeats` runs after one warm-up; the two sides alternate so that drift hits both. Targets: load
<= 1.3x and publish <= 1.5x the peer.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import torch

# This file is bench/bankstore.py and its directory comes first on sys.path: the repository root
# must come before it, or `import bankstore` would import this script.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bankstore import BankStore, connect
from pipeline.encoder import EncoderFingerprint
from pipeline.memory import MemoryBank

DIMS = 1280
STAGES = 4
TARGETS = {"publish": 1.5, "load": 1.3}
FINGERPRINT = EncoderFingerprint("ViT-H-14", "random:0", (8, 16, 24, 32), 224)


def random_bank(patches: int, seed: int) -> MemoryBank:
    generator = torch.Generator().manual_seed(seed)
    stages = [
        torch.randn(patches, DIMS, generator=generator).half() for _ in range(STAGES)
    ]  # (patches, DIMS) each
    return MemoryBank(stages)


def timed(operation: Callable[[], object]) -> float:
    start = time.perf_counter()
    operation()
    return time.perf_counter() - start


def bench_size(store: BankStore, patches: int, repeats: int) -> dict[str, tuple[float, float]]:
    """{"publish" | "load": (ours, raw)} median seconds for one bank size."""
    bank = random_bank(patches, seed=patches)
    product = f"bench-{patches}"
    stage_views = [memoryview(stage.numpy().reshape(-1).view("uint8")) for stage in bank.stages]
    raw_keys = [f"{store.keys.prefix}raw:{patches}:stage{index}" for index in range(STAGES)]
    sources = [hashlib.sha256(str(patches).encode()).hexdigest()]
    client = store.client

    def publish() -> None:
        store.publish(product, bank, FINGERPRINT, sources, False, None)

    def load() -> None:
        store.get(product, fingerprint=FINGERPRINT)

    def raw_set() -> None:
        pipe = client.pipeline(transaction=False)
        for key, view in zip(raw_keys, stage_views, strict=True):
            pipe.set(key, view)
        pipe.execute()

    def raw_get() -> None:
        pipe = client.pipeline(transaction=False)
        for key in raw_keys:
            pipe.get(key)
        pipe.execute()

    publish(), raw_set(), load(), raw_get()  # warm-up: scripts loaded, pools connected
    times: dict[str, list[float]] = {"publish": [], "raw set": [], "load": [], "raw get": []}
    for _ in range(repeats):
        times["raw set"].append(timed(raw_set))
        times["publish"].append(timed(publish))
        times["raw get"].append(timed(raw_get))
        times["load"].append(timed(load))
    client.unlink(*raw_keys)
    store.delete(product)

    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "publish": (median["publish"], median["raw set"]),
        "load": (median["load"], median["raw get"]),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="redis://127.0.0.1:6379", help="the Redis server")
    parser.add_argument("--sizes", nargs="+", type=int, default=[4096, 51200], help="patches")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per figure (median)")
    args = parser.parse_args()

    client = connect(args.url)
    store = BankStore(client, prefix=f"bench:{uuid.uuid4().hex[:12]}:")
    server = client.info("server")["redis_version"]
    print(
        f"Redis {server} at {args.url}; banks of {STAGES} stages x {DIMS} dims float16, "
        f"{store.chunk_bytes // 2**20} MiB chunks; median of {args.repeats} runs"
    )
    print(f"{'patches':>8} {'MiB':>7}  {'operation':<8} {'ours s':>8} {'raw s':>8} {'ratio':>6}")
    missed = []
    try:
        for patches in args.sizes:
            mebibytes = patches * DIMS * STAGES * 2 / 2**20
            for operation, (ours, raw) in bench_size(store, patches, args.repeats).items():
                ratio = ours / raw
                target = TARGETS[operation]
                mark = "" if ratio <= target else f"  above the {target}x target"
                if ratio > target:
                    missed.append(f"{operation} at {patches}")
                print(
                    f"{patches:>8} {mebibytes:>7.1f}  {operation:<8} {ours:>8.3f} {raw:>8.3f} "
                    f"{ratio:>5.2f}x{mark}"
                )
    finally:
        leftovers = list(client.scan_iter(f"{store.keys.prefix}*", count=1000))
        if leftovers:
            client.unlink(*leftovers)
    print("targets met" if not missed else f"targets missed: {', '.join(missed)}")
    return 0 if not missed else 1


if __name__ == "__main__":
    sys.exit(main())
