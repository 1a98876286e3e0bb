"""The embedded Redis server: survives SIGKILL, one per data directory, outlives its starter."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bankstore import BankStore, EmbeddedRedis, connect
from bankstore.embedded import wait_for_exit
from pipeline.errors import ConfigError

pytestmark = pytest.mark.redis

EXIT_WAIT_S = 30


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_a_published_bank_survives_sigkill_of_the_server(embedded, fingerprint, banks) -> None:
    url = embedded.start()
    store = BankStore(connect(url), chunk_bytes=2**16)
    bank = banks.random(0, patches=2048, dims=64)  # 4 x 256 KiB in 4 chunks each
    store.publish("washer", bank, fingerprint, banks.sources(2), False, None)
    store.client.close()

    pid = embedded.pid()
    os.kill(pid, signal.SIGKILL)
    assert wait_for_exit(pid, EXIT_WAIT_S)
    assert not embedded.ping()

    assert embedded.start() == url
    assert embedded.pid() != pid
    restarted = BankStore(connect(url))
    stored = restarted.get("washer", fingerprint=fingerprint)
    assert stored.version == 1
    for original, loaded in zip(bank.stages, stored.bank.stages, strict=True):
        assert torch.equal(loaded, original.half())
    assert (embedded.data_dir / "appendonly.aof").stat().st_size > bank.nbytes // 2


def test_processes_starting_at_once_share_one_server(embedded) -> None:
    starters = 4
    barrier = threading.Barrier(starters)
    urls = []

    def start() -> None:
        barrier.wait(timeout=EXIT_WAIT_S)
        urls.append(EmbeddedRedis(embedded.data_dir).start())

    threads = [threading.Thread(target=start) for _ in range(starters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(EXIT_WAIT_S)
    assert urls == [embedded.url] * starters
    log = (embedded.data_dir / "redis.log").read_text()
    assert log.count("Server initialized") == 1


def test_the_server_outlives_the_process_that_started_it(embedded) -> None:
    code = (
        "import sys; from bankstore.embedded import EmbeddedRedis; "
        "print(EmbeddedRedis(sys.argv[1]).start())"
    )
    started = subprocess.run(
        [sys.executable, "-c", code, str(embedded.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert started.stdout.strip() == embedded.url
    assert embedded.ping()
    assert connect(embedded.url).ping()


def test_stop_shuts_the_server_down(embedded) -> None:
    embedded.start()
    pid = embedded.pid()
    assert embedded.stop() is True
    assert wait_for_exit(pid, EXIT_WAIT_S)
    assert not embedded.ping()
    assert embedded.pid() is None
    assert embedded.stop() is False


def test_a_socket_path_too_long_for_unix_sockets_is_refused(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ConfigError, match="set DEFECTSCOPE_DATA_DIR to a shorter directory"):
        EmbeddedRedis(deep).start()
