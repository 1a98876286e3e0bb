"""Fixtures of the bank store tests: a real Redis server, and a store under a prefix of its own.

The server is the session's `redis_url` (tests/conftest.py): `$REDIS_URL`, else 127.0.0.1:6379
when it answers, else an embedded one started in a temporary directory. Every test gets a unique
key prefix, and its keys are deleted afterwards.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator

import pytest
import redis
import torch

from bankstore import BankStore, connect
from pipeline.encoder import EncoderFingerprint
from pipeline.memory import MemoryBank
from tests.helpers import delete_prefix

STAGES = 4
PATCHES = 24
DIMS = 32


@pytest.fixture(scope="session")
def client(redis_url: str) -> Iterator[redis.Redis]:
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def prefix(client: redis.Redis) -> Iterator[str]:
    prefix = f"test:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(client, prefix)


@pytest.fixture
def store(client: redis.Redis, prefix: str) -> BankStore:
    """A store with small chunks, so that every stage spans several of them."""
    return BankStore(client, prefix=prefix, chunk_bytes=512)


@pytest.fixture(scope="session")
def fingerprint() -> EncoderFingerprint:
    return EncoderFingerprint("defectscope-tiny", "random:0", (2, 4, 6, 8), 224)


class Banks:
    """Small banks whose content tells where it came from."""

    @staticmethod
    def marked(marker: int, patches: int = PATCHES, threshold: float | None = 0.25) -> MemoryBank:
        """Stage i holds only the value `marker + i / 4` (exact in float16), so a reader can tell
        whether everything it got came from one bank."""
        stages = [
            torch.full((patches, DIMS), marker + stage / 4, dtype=torch.float16)
            for stage in range(STAGES)
        ]
        return MemoryBank(stages, threshold=threshold)

    @staticmethod
    def marker_of(bank: MemoryBank) -> int:
        """The marker of a `marked` bank; fails if its values come from several banks."""
        first = float(bank.stages[0][0, 0])
        for stage, tensor in enumerate(bank.stages):
            expected = first + stage / 4
            assert bool((tensor == expected).all()), f"stage {stage} mixes values of several banks"
        return int(first)

    @staticmethod
    def random(seed: int, patches: int = PATCHES, dims: int = DIMS) -> MemoryBank:
        generator = torch.Generator().manual_seed(seed)
        stages = [torch.randn(patches, dims, generator=generator) for _ in range(STAGES)]
        return MemoryBank(stages, threshold=0.3)

    @staticmethod
    def sources(count: int, salt: str = "") -> list[str]:
        """`count` distinct sha256 hex digests."""
        return [hashlib.sha256(f"{salt}{index}".encode()).hexdigest() for index in range(count)]


@pytest.fixture(scope="session")
def banks() -> Banks:
    return Banks()
