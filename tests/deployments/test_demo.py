"""`make demo`'s command, bounded: the whole service on embedded defaults with Gemma 3 270M."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.deployments.conftest import free_port
from tests.helpers import delete_prefix

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow, pytest.mark.llm]


def test_demo_runs_end_to_end(redis_url: str) -> None:
    from bankstore import connect

    prefix = f"test:demo:{uuid.uuid4().hex[:8]}:"
    script = Path(sys.executable).with_name("defectscope")
    command = [
        str(script), "demo", "--frames", "5", "--fps", "4", "--port", str(free_port()),
        "--redis-url", redis_url, "--redis-prefix", prefix,
    ]  # fmt: skip
    try:
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=900, check=False, env=os.environ
        )
    finally:
        delete_prefix(connect(redis_url), prefix)
    output = completed.stdout
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "bank 'washer': version 1 from 8 normal images" in output
    assert output.count("ANOMALOUS") >= 4  # chip and crack from each camera
    assert "explained (llm): Yes, there is an anomaly" in output
    assert "cam-a (redis): sent 5, accepted 5" in output
    assert "cam-b (http): sent 5, accepted 5" in output
    assert "/metrics" in output
