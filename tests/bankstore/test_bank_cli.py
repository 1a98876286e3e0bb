"""`defectscope bank ...`, `defectscope redis ...` and `inspect --product`, run as a user would,
against the test Redis server under the test's own key prefix."""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deployments.cli import main
from deployments.cli.banks import held_out_scores
from pipeline.calibration import threshold_from_normal_scores
from pipeline.encoder import EncoderFingerprint
from pipeline.images import load_image

pytestmark = pytest.mark.redis

DEFECTSCOPE = Path(sys.executable).with_name("defectscope")


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str


@pytest.fixture
def cli(redis_url: str, prefix: str, monkeypatch, capsys) -> Iterator[Callable[..., Run]]:
    """Runs `defectscope ARGS...` in this process; returns its exit code and output."""
    monkeypatch.setenv("REDIS_URL", redis_url)
    monkeypatch.setenv("DEFECTSCOPE_REDIS_PREFIX", prefix)
    handlers, level = logging.root.handlers[:], logging.root.level

    def run(*args: object) -> Run:
        capsys.readouterr()
        code = main([str(arg) for arg in args])
        out, err = capsys.readouterr()
        return Run(code, out, err)

    yield run
    logging.root.handlers[:] = handlers  # main() installs a handler on the captured stderr
    logging.root.setLevel(level)


@pytest.fixture(scope="module")
def normals(sample_dir: Path) -> list[Path]:
    return sorted((sample_dir / "normal").glob("*.jpg"))


def test_bank_add_publishes_then_appends(cli, store, normals, detector) -> None:
    first = cli("bank", "add", "washer", *normals[:5], "--class-name", "washer", "--device", "cpu")
    assert first.code == 0, first.err
    assert first.out.startswith("washer: version 1 = 5 images, 1280 patches per stage")
    v1 = store.get("washer")
    assert (v1.info.class_name, len(v1.info.sources)) == ("washer", 5)
    assert v1.info.threshold is not None

    second = cli("bank", "add", "washer", *normals[5:], "--device", "cpu")
    assert second.code == 0, second.err
    assert "version 2 = version 1 + 3 images, 2048 patches per stage" in second.out
    v2 = store.get("washer")
    assert (v2.info.base_version, len(v2.info.sources), v2.info.class_name) == (1, 8, "washer")
    # The new images scored against the old bank are held-out normals: the threshold covers them.
    images = [load_image(path) for path in normals[5:]]
    scores = held_out_scores(detector, images, v1.bank, "washer")
    expected = max(threshold_from_normal_scores(scores), v1.info.threshold)
    assert v2.info.threshold == pytest.approx(expected, rel=1e-4)


def test_bank_add_with_rotations_and_a_coreset(cli, store, normals) -> None:
    run = cli("bank", "add", "bolt", *normals[:2], "--augment", "--coreset", "0.25")
    assert run.code == 0, run.err
    info = store.get("bolt").info
    assert info.num_patches == (math.ceil(0.25 * 2 * 4 * 256),) * 4
    assert (info.augment, info.coreset_ratio) == (True, 0.25)


def test_bank_add_refuses_when_no_image_can_be_read(cli, store, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    run = cli("bank", "add", "washer", tmp_path / "missing.jpg", broken)
    assert run.code == 2
    lines = run.err.strip().splitlines()
    assert lines[-1] == (
        "defectscope: error: none of the 2 images could be read; a bank needs at least one "
        "normal image"
    )
    assert sum(line.startswith("defectscope: error:") for line in lines) == 3
    assert store.current_version("washer") is None


def test_bank_add_without_images_is_a_usage_error(cli, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["bank", "add", "washer"])
    assert exit_info.value.code == 2
    assert "the following arguments are required: IMAGE" in capsys.readouterr().err


def test_bank_list_and_show_as_tables_and_json(cli, normals) -> None:
    assert cli("bank", "list").out.startswith("no banks stored")
    cli("bank", "add", "washer", *normals[:3])
    cli("bank", "add", "washer", *normals[3:5])

    table = cli("bank", "list").out.splitlines()
    assert table[0].split()[:4] == ["PRODUCT", "CURRENT", "VERSIONS", "IMAGES"]
    assert table[1].split()[:5] == ["washer", "v2", "2", "5", "1280"]
    listed = cli("bank", "list", "--json")

    [product] = json.loads(listed.out)
    assert (product["product"], product["current"]) == ("washer", 2)
    assert [version["num_patches"] for version in product["versions"]] == [[768] * 4, [1280] * 4]

    shown = cli("bank", "show", "washer").out
    assert "current      v2" in shown
    assert "defectscope-tiny (random:0, blocks 2,4,6,8, 224 px)" in shown
    assert any(line.startswith("v2 *") and "1280" in line for line in shown.splitlines())
    details = json.loads(cli("bank", "show", "washer", "--json").out)
    assert details["versions"][1]["fingerprint"]["weights"] == "random:0"
    assert details["nbytes"] == 4 * (768 + 1280) * 192 * 2


def test_inspect_against_a_stored_bank_and_its_calibration(cli, store, normals, sample_dir):
    cli("bank", "add", "washer", *normals)
    good = sample_dir / "test" / "good_00.jpg"
    own = store.get("washer").info.threshold

    plain = cli("inspect", "--product", "washer", good)
    assert plain.code == 0, plain.err
    assert f"(threshold {own:.4f})" in plain.out

    store.set_calibration("washer", 0.0001, {"method": "test"})
    calibrated = cli("inspect", "--product", "washer", good, "--json")

    result = json.loads(calibrated.out)
    assert result["threshold"] == pytest.approx(0.0001)
    assert result["anomalous"] is True


def test_inspect_refuses_an_unknown_product_or_another_encoders_bank(cli, store, sample_dir, banks):
    image = sample_dir / "test" / "good_00.jpg"
    unknown = cli("inspect", "--product", "ghost", image)
    assert unknown.code == 2
    assert (
        unknown.err.strip()
        .splitlines()[-1]
        .startswith("defectscope: error: no memory bank is stored for product 'ghost'")
    )

    other = EncoderFingerprint("defectscope-tiny", "random:7", (2, 4, 6, 8), 224)
    store.publish("foreign", banks.random(0, dims=192), other, banks.sources(1), False, None)
    foreign = cli("inspect", "--product", "foreign", image)
    assert foreign.code == 2
    assert "weights random:7 vs random:0" in foreign.err.strip().splitlines()[-1]


def test_export_import_and_rm(cli, store, normals, tmp_path: Path) -> None:
    cli("bank", "add", "washer", *normals[:2])
    path = tmp_path / "washer.safetensors"

    exported = cli("bank", "export", "washer", path)
    assert exported.code == 0, exported.err
    assert exported.out.startswith(f"washer: version 1 exported to {path}")
    imported = cli("bank", "import", path, "--product", "washer-b")
    assert imported.out.startswith("washer-b: version 1 imported from")
    assert store.products() == ["washer", "washer-b"]

    removed = cli("bank", "rm", "washer")
    assert removed.out.startswith("washer: removed 1 version (")
    assert store.products() == ["washer-b"]
    again = cli("bank", "rm", "washer")
    assert again.code == 2
    assert "no memory bank is stored for product 'washer'" in again.err


def test_import_of_a_foreign_file_is_one_line(cli, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    run = cli("bank", "import", path)
    assert run.code == 2
    assert run.err.count("\n") == 1
    assert "is not a safetensors file" in run.err


def test_a_bad_product_name_is_one_line(cli, normals) -> None:
    run = cli("bank", "add", "line 3/washer", normals[0])
    assert run.code == 2
    assert "product name 'line 3/washer' is not allowed" in run.err


def test_redis_down_is_one_line_from_the_installed_command(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    environment = {**os.environ, "DEFECTSCOPE_DATA_DIR": str(tmp_path)}
    environment.pop("REDIS_URL", None)
    run = subprocess.run(
        [DEFECTSCOPE, "bank", "list", "--redis-url", f"redis://ops:secret@127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
    )
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1
    assert run.stderr.startswith(
        f"defectscope: error: cannot reach Redis at redis://ops@127.0.0.1:{port}"
    )
    assert "secret" not in run.stderr


def test_redis_status_names_the_server(cli) -> None:
    run = cli("redis", "status")
    assert run.code == 0, run.err
    assert "(REDIS_URL)" in run.out
    assert "status   Redis " in run.out
    refused = cli("redis", "stop")
    assert refused.code == 2
    assert "manages only the embedded one" in refused.err


def test_redis_commands_manage_the_embedded_server(cli, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("REDIS_URL")
    monkeypatch.setenv("DEFECTSCOPE_DATA_DIR", str(tmp_path))
    stopped = cli("redis", "status")
    assert stopped.code == 1
    assert "not running" in stopped.out

    started = cli("redis", "start")
    assert started.out.startswith(f"embedded Redis running at unix://{tmp_path}/redis/redis.sock")
    try:
        running = cli("redis", "status")
        assert running.code == 0, running.err
        assert "AOF on" in running.out
    finally:
        assert cli("redis", "stop").out.startswith("embedded Redis in")
    assert "was not running" in cli("redis", "stop").out
