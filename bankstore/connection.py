"""Which Redis server defectscope talks to, and connecting to it.

The server is chosen in this order: an explicit URL, the `REDIS_URL` environment variable, else the
embedded server (`bankstore.embedded`), started on first use. URLs are redis-py's:

    redis://[[user]:password@]host[:port][/db]     TCP, ACL user and password
    rediss://[[user]:password@]host[:port][/db]    TLS (e.g. ?ssl_ca_certs=/path/ca.pem)
    unix://[[user]:password@]/path/to/socket[?db=N]

Every failure to reach the server becomes one `RedisUnavailableError` line that names the server
(never its password) and says what to do. Commands get `retries` transparent reconnects (a pooled
connection the server closed); long-running callers wrap whole operations in `with_retries`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from bankstore.errors import RedisUnavailableError

logger = logging.getLogger(__name__)

REDIS_URL_ENV = "REDIS_URL"
DEFAULT_SOCKET_TIMEOUT_S = 30.0
"""Longest wait for one socket read or write; a 64 MiB chunk needs far less on any link."""

T = TypeVar("T")


def redis_url(url: str | None = None) -> str:
    """The URL to use: `url`, else `$REDIS_URL`, else the embedded server's (starting it)."""
    if url:
        return url
    from_environment = os.environ.get(REDIS_URL_ENV, "").strip()
    if from_environment:
        return from_environment
    from bankstore.embedded import EmbeddedRedis

    return EmbeddedRedis().start()


def safe_url(url: str) -> str:
    """`url` without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}@{host}" if user else host
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def describe_client(client: redis.Redis | redis.asyncio.Redis) -> str:
    """A password-free URL-like name of the server a client talks to."""
    kwargs = client.connection_pool.connection_kwargs
    user = f"{kwargs['username']}@" if kwargs.get("username") else ""
    if kwargs.get("path"):
        return f"unix://{user}{kwargs['path']}"
    scheme = "rediss" if kwargs.get("ssl") or "ssl_cert_reqs" in kwargs else "redis"
    return f"{scheme}://{user}{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"


@contextmanager
def redis_errors(where: str) -> Iterator[None]:
    """Turns redis-py's connection, timeout and permission errors into `RedisUnavailableError`."""
    try:
        yield
    except redis.AuthenticationError as error:
        raise RedisUnavailableError(
            f"Redis at {where} refused the credentials ({_first_line(error)}): check the user and "
            f"password in {REDIS_URL_ENV}"
        ) from error
    except redis.exceptions.NoPermissionError as error:
        raise RedisUnavailableError(
            f"Redis at {where} denied a command ({_first_line(error)}): the ACL user needs "
            "read and write access to the defectscope keys, pub/sub and scripting"
        ) from error
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise RedisUnavailableError(
            f"cannot reach Redis at {where} ({_first_line(error)}): start that server, point "
            f"{REDIS_URL_ENV} at a running one, or unset {REDIS_URL_ENV} to use the embedded server"
        ) from error


def connect(
    url: str | None = None,
    *,
    retries: int = 1,
    socket_timeout: float | None = DEFAULT_SOCKET_TIMEOUT_S,
    **kwargs: Any,
) -> redis.Redis:
    """A client of the chosen server, checked with a PING.

    Args:
        url: the server; None takes `$REDIS_URL`, else the embedded server.
        retries: transparent reconnects per command before an error surfaces.
        socket_timeout: seconds a socket read or write may take.
        kwargs: passed to `redis.Redis.from_url` (e.g. `ssl_ca_certs`).

    Raises:
        RedisUnavailableError: the server does not answer or refuses the credentials.
    """
    resolved = redis_url(url)
    where = safe_url(resolved)
    retry = Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries)
    try:
        client = redis.Redis.from_url(
            resolved, retry=retry, socket_timeout=socket_timeout, **kwargs
        )
    except ValueError as error:
        raise RedisUnavailableError(f"Redis URL {where} is not usable: {error}") from error
    with redis_errors(where):
        client.ping()
    return client


async def connect_async(
    url: str | None = None,
    *,
    retries: int = 1,
    socket_timeout: float | None = DEFAULT_SOCKET_TIMEOUT_S,
    **kwargs: Any,
) -> redis.asyncio.Redis:
    """The asyncio counterpart of `connect`, for the serving deployments (streams, pub/sub).

    Note:
        Resolving the embedded server may start it, which blocks for the server's start-up
        (well under a second on an empty data directory); call this once per replica, at start.
    """
    resolved = redis_url(url)
    where = safe_url(resolved)
    retry = redis.asyncio.retry.Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), retries)
    try:
        client = redis.asyncio.Redis.from_url(
            resolved, retry=retry, socket_timeout=socket_timeout, **kwargs
        )
    except ValueError as error:
        raise RedisUnavailableError(f"Redis URL {where} is not usable: {error}") from error
    with redis_errors(where):
        await client.ping()
    return client


def with_retries(
    operation: Callable[[], T],
    attempts: int = 5,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
) -> T:
    """Runs `operation`, retrying while Redis is unreachable, with bounded exponential backoff.

    For long-running callers (serving replicas, watchers) that should ride out a Redis restart;
    the CLI fails at once instead. Delays are `base_delay * 2**attempt`, capped at `max_delay`,
    with jitter so that many replicas do not reconnect in step.

    Raises:
        RedisUnavailableError: still unreachable after `attempts` tries (the last error).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be at least 1, got {attempts}")
    attempt = 1
    while True:
        try:
            return operation()
        except (RedisUnavailableError, redis.ConnectionError, redis.TimeoutError) as error:
            if attempt >= attempts:
                if isinstance(error, RedisUnavailableError):
                    raise
                raise RedisUnavailableError(
                    f"Redis still unreachable after {attempts} attempts ({_first_line(error)})"
                ) from error
            delay = min(max_delay, base_delay * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            logger.warning(
                "Redis unavailable (%s); attempt %d of %d in %.2f s",
                _first_line(error),
                attempt + 1,
                attempts,
                delay,
            )
            time.sleep(delay)
            attempt += 1


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
