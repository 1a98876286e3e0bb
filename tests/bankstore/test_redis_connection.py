"""Choosing and reaching the Redis server: URL precedence, one-line errors, bounded retries."""

from __future__ import annotations

import asyncio
import socket

import pytest
import redis

from bankstore import BankStore, RedisUnavailableError, connect, connect_async, redis_url
from bankstore.connection import safe_url, with_retries
from pipeline.errors import DefectscopeError

pytestmark = pytest.mark.redis


@pytest.fixture
def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_an_unreachable_server_is_one_line_naming_it_without_the_password(closed_port) -> None:
    url = f"redis://defectscope:s3cret@127.0.0.1:{closed_port}/0"
    with pytest.raises(RedisUnavailableError) as error:
        connect(url)
    message = str(error.value)
    assert isinstance(error.value, DefectscopeError)
    assert "\n" not in message
    assert f"redis://defectscope@127.0.0.1:{closed_port}/0" in message
    assert "s3cret" not in message
    assert "REDIS_URL" in message


def test_a_store_whose_server_went_away_raises_the_same_error(closed_port) -> None:
    client = redis.Redis(
        host="127.0.0.1", port=closed_port, retry=redis.retry.Retry(redis.backoff.NoBackoff(), 0)
    )
    store = BankStore(client)
    with pytest.raises(RedisUnavailableError, match=f"127.0.0.1:{closed_port}"):
        store.get("washer")


def test_async_connect_pings_and_reports_the_same_error(redis_url: str, closed_port) -> None:
    async def ping(url: str) -> bool:
        client = await connect_async(url)
        try:
            return bool(await client.ping())
        finally:
            await client.aclose()

    assert asyncio.run(ping(redis_url))
    with pytest.raises(RedisUnavailableError, match="cannot reach Redis"):
        asyncio.run(ping(f"redis://127.0.0.1:{closed_port}"))


def test_a_url_of_another_scheme_is_refused() -> None:
    with pytest.raises(RedisUnavailableError, match="is not usable"):
        connect("http://127.0.0.1:6379")


def test_an_explicit_url_wins_over_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://from-environment:6379")
    assert redis_url("redis://explicit:6379") == "redis://explicit:6379"
    assert redis_url() == "redis://from-environment:6379"


def test_without_redis_url_the_embedded_server_is_used(monkeypatch, tmp_path) -> None:
    from bankstore import EmbeddedRedis

    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DEFECTSCOPE_DATA_DIR", str(tmp_path))
    server = EmbeddedRedis()
    try:
        url = redis_url()
        assert url == f"unix://{tmp_path / 'redis' / 'redis.sock'}"
        assert connect(url).ping()
    finally:
        server.stop()


def test_safe_url_drops_only_the_password() -> None:
    assert safe_url("rediss://ops:pw@redis.internal:6380/2") == "rediss://ops@redis.internal:6380/2"
    assert safe_url("redis://:pw@host") == "redis://host"
    assert safe_url("unix:///run/redis.sock") == "unix:///run/redis.sock"


def test_with_retries_rides_out_a_few_failures() -> None:
    attempts = []

    def flaky() -> str:
        attempts.append(len(attempts))
        if len(attempts) < 3:
            raise redis.ConnectionError("Connection refused")
        return "answer"

    assert with_retries(flaky, attempts=5, base_delay=0.001) == "answer"
    assert len(attempts) == 3


def test_with_retries_gives_up_after_its_attempts() -> None:
    attempts = []

    def down() -> None:
        attempts.append(1)
        raise redis.ConnectionError("Connection refused")

    with pytest.raises(RedisUnavailableError, match="after 3 attempts"):
        with_retries(down, attempts=3, base_delay=0.001)
    assert len(attempts) == 3


def test_with_retries_does_not_retry_other_errors() -> None:
    attempts = []

    def broken() -> None:
        attempts.append(1)
        raise ValueError("not a connection problem")

    with pytest.raises(ValueError):
        with_retries(broken, attempts=3, base_delay=0.001)
    assert len(attempts) == 1
