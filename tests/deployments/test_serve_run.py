"""The README's `serve run deployments/serve_config.yaml`, as a user runs it: Ray started by Serve,
the embedded Redis (in a temporary data directory), Gemma 3 270M as explainer, port 8000."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import msgpack
import pytest

from tests.helpers import wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.llm]


def port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.skipif(not port_free(8000), reason="the config serves on port 8000, which is taken")
def test_serve_run_with_the_shipped_config(tmp_path: Path, sample_dir: Path) -> None:
    from bankstore import EmbeddedRedis

    environment = {key: value for key, value in os.environ.items() if key != "REDIS_URL"}
    environment["DEFECTSCOPE_DATA_DIR"] = str(tmp_path / "redis")
    serve = Path(sys.executable).with_name("serve")
    process = subprocess.Popen(
        [str(serve), "run", "deployments/serve_config.yaml"],
        cwd=ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    url = "http://127.0.0.1:8000"
    try:
        wait_for(lambda: healthy(url) or process.poll() is not None, 300, "serve run to answer")
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        normals = [path.read_bytes() for path in sorted((sample_dir / "normal").glob("*.jpg"))]
        created = httpx.post(
            f"{url}/v1/banks/washer/normals",
            content=msgpack.packb({"images": normals}, use_bin_type=True),
            headers={"content-type": "application/x-msgpack"},
            timeout=300,
        )
        assert created.status_code == 201, created.text
        result = httpx.post(
            f"{url}/v1/inspect",
            params={"line": "line-1", "product": "washer"},
            content=(sample_dir / "test" / "scratch.jpg").read_bytes(),
            headers={"content-type": "image/jpeg"},
            timeout=300,
        ).json()
        assert result["anomalous"] is True and result["regions"][0]["location"] == "top right"
        assert result["explanation"] == "pending"  # Gemma follows; the verdict did not wait

        frame_id = result["frame_id"]

        def explained() -> bool:
            stored = httpx.get(f"{url}/v1/results/{frame_id}", timeout=10).json()
            return stored["explanation"] == "done"

        wait_for(explained, 300, "Gemma's explanation")
    finally:
        os.killpg(process.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        EmbeddedRedis(tmp_path / "redis").stop()
