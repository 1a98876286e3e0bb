"""Every benchmark still runs (tiny sizes; the figures themselves come from full runs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.deployments.conftest import free_port

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def run(script: str, *arguments: str, statuses: tuple[int, ...] = (0,)) -> str:
    completed = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *arguments],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
        cwd=ROOT,
    )
    assert completed.returncode in statuses, completed.stderr[-3000:]
    return completed.stdout


def test_memory_bank_benchmark() -> None:
    output = run("memory_bank.py", "--sizes", "256", "1024", "--dims", "64", "--repeats", "2")
    assert output.count("identical") == 2 and "ours/faiss" in output


@pytest.mark.redis
def test_bankstore_benchmark(redis_url: str) -> None:
    # Exit status 1 says a target was missed, which tiny banks always do (fixed costs dominate).
    output = run(
        "bankstore.py", "--url", redis_url, "--sizes", "64", "--repeats", "1", statuses=(0, 1)
    )
    assert "publish" in output and "load" in output and "ratio" in output


@pytest.mark.ray
@pytest.mark.redis
def test_pipeline_benchmark(redis_url: str) -> None:
    output = run(
        "pipeline.py", "--frames", "16", "--concurrency", "4", "--rates", "2",
        "--rate-seconds", "2", "--redis-url", redis_url, "--port", str(free_port()),
    )  # fmt: skip
    # Only that it measured: the figures themselves belong to full runs on a quiet machine.
    assert "pipeline / in-process throughput" in output
    assert "largest sustained rate without loss:" in output


@pytest.mark.llm
def test_explainer_learns_benchmark() -> None:
    output = run("explainer_learns.py", "--minutes", "0.05", "--train", "8", "--test", "4")
    assert "yes/no accuracy" in output and "location accuracy" in output
