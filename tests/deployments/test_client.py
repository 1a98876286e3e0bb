"""The camera client and the results tail against the running service: a real video file over
HTTP, an image directory straight into Redis, and `defectscope results`."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from deployments.cli import main
from deployments.client import SourceError, push, read_source
from tests.deployments.conftest import API_TOKEN, Service, wait_for_results
from tests.helpers import wait_for

pytestmark = [pytest.mark.ray, pytest.mark.redis, pytest.mark.slow]


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """An H.264 MP4 of the test washers, two frames each."""
    path = tmp_path_factory.mktemp("video") / "line.mp4"
    pictures = [Image.open(p).convert("RGB") for p in sorted((sample_dir / "test").glob("*.jpg"))]
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 256, 256, "yuv420p"
        stream.options = {"crf": "10"}
        for picture in pictures:
            for _ in range(2):
                for packet in stream.encode(
                    av.VideoFrame.from_ndarray(np.asarray(picture), "rgb24")
                ):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def test_a_video_file_decodes_frame_by_frame(video: Path) -> None:
    frames = list(read_source(str(video)))
    assert len(frames) == 14 and all(encoding == "jpeg" for _, encoding in frames)
    assert Image.open(io.BytesIO(frames[0][0])).size == (256, 256)


def test_unreadable_sources_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no image files"):
        list(read_source(str(tmp_path)))
    (tmp_path / "clip.mp4").write_bytes(b"not a video")
    with pytest.raises(SourceError, match="cannot open as video"):
        list(read_source(str(tmp_path / "clip.mp4")))
    with pytest.raises(SourceError, match="not a directory, a video file or an rtsp"):
        list(read_source(str(tmp_path / "missing.mp4")))


def test_push_a_video_over_http(service: Service, video: Path) -> None:
    accepted: list[str] = []
    summary = asyncio.run(
        push(
            str(video),
            "video-line",
            "cam-v",
            "washer",
            via="http",
            url=service.base_url,
            token=API_TOKEN,
            max_inflight=4,
            progress=False,
            on_sent=accepted.append,
        )
    )
    assert (summary.sent, summary.accepted, summary.rejected, summary.failed) == (14, 14, 0, 0)
    entries = wait_for_results(service, "video-line", set(accepted))
    verdicts = {frame: result for frame, kind, result in entries if kind == "verdict"}
    anomalous = sum(bool(verdicts[frame]["anomalous"]) for frame in accepted)
    assert anomalous == 8  # the four painted defects, two frames each


def test_push_cli_into_redis_and_results_cli(service: Service, sample_dir: Path, capsys) -> None:
    common = ["--redis-url", service.redis_url, "--redis-prefix", service.prefix]
    status = main(
        ["push", "--line", "cli-line", "--camera", "cam-c", "--product", "washer", "--source",
         str(sample_dir / "test"), "--via", "redis", *common]
    )  # fmt: skip
    assert status == 0
    assert "sent 7, accepted 7, rejected 0, retried 0, failed 0" in capsys.readouterr().out

    results_key = f"{service.prefix}results:cli-line"

    def verdicts_written() -> int:
        entries = service.client.xrange(results_key)
        return sum(fields[b"kind"] == b"verdict" for _, fields in entries)

    wait_for(lambda: verdicts_written() >= 7, 120, "seven verdicts on cli-line")
    assert main(["results", "--line", "cli-line", "--json", *common]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    verdicts = [line for line in printed if line["kind"] == "verdict"]
    assert len(verdicts) == 7 and all(line["line"] == "cli-line" for line in printed)
    assert sum(line["anomalous"] for line in verdicts) == 4
    assert main(["results", "--line", "cli-line", *common]) == 0
    human = capsys.readouterr().out
    assert "ANOMALOUS" in human and "cli-line/cam-c" in human
