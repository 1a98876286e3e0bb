"""`defectscope inspect` over real image files, bad ones included."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.cli import main

EXPECTED_FIELDS = {"path", "score", "anomalous", "regions", "answer"}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("bad")
    good_jpeg = (sample_dir / "test" / "good_00.jpg").read_bytes()
    files = {
        "corrupt": directory / "corrupt.jpg",
        "truncated": directory / "truncated.jpg",
        "text": directory / "readme.png",
        "tiny": directory / "tiny.png",
        "huge": directory / "huge.png",
    }
    files["corrupt"].write_bytes(good_jpeg[:200] + bytes(len(good_jpeg) - 200))
    files["truncated"].write_bytes(good_jpeg[: len(good_jpeg) // 3])
    files["text"].write_text("not an image")
    Image.new("RGB", (10, 10)).save(files["tiny"])
    Image.new("1", (9000, 9000)).save(files["huge"])
    return files


@pytest.fixture(scope="module")
def converted_files(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> dict[str, Path]:
    """A 16-bit greyscale and an RGBA version of a defective part: both must be inspected."""
    directory = tmp_path_factory.mktemp("converted")
    rust = Image.open(sample_dir / "test" / "rust.jpg").convert("RGB")
    grey16 = (np.asarray(rust.convert("L")).astype(np.uint16) * 257).astype(np.uint16)
    files = {"grey16": directory / "rust16.png", "rgba": directory / "rust_rgba.png"}
    Image.fromarray(grey16).save(files["grey16"])
    rgba = rust.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(files["rgba"])
    return files


def normals(sample_dir: Path) -> list[str]:
    return [str(path) for path in sorted((sample_dir / "normal").glob("*.jpg"))]


def run_json(arguments: list[str], capsys: pytest.CaptureFixture) -> tuple[int, list[dict], str]:
    status = main(["inspect", *arguments, "--json"])
    captured = capsys.readouterr()
    lines = [json.loads(line) for line in captured.out.splitlines() if line.strip()]
    return status, lines, captured.err


def test_json_lines_for_every_image(sample_dir: Path, capsys, tmp_path: Path) -> None:
    images = [str(path) for path in sorted((sample_dir / "test").glob("*.jpg"))]
    status, results, _ = run_json(
        [*images, "--normal", *normals(sample_dir), "--heatmap-dir", str(tmp_path / "heat")], capsys
    )
    assert status == 0
    assert [result["path"] for result in results] == images
    for result in results:
        assert set(result) >= EXPECTED_FIELDS
        for region in result["regions"]:
            assert set(region) >= {"box", "area", "location"} and len(region["box"]) == 4
    verdicts = {Path(result["path"]).stem: result["anomalous"] for result in results}
    assert verdicts == {
        "chip": True,
        "crack": True,
        "good_00": False,
        "good_01": False,
        "good_02": False,
        "rust": True,
        "scratch": True,
    }
    heatmaps = sorted(path.name for path in (tmp_path / "heat").iterdir())
    assert heatmaps == sorted(f"{Path(image).stem}.png" for image in images)
    assert Image.open(tmp_path / "heat" / "rust.png").size == (256, 256)


def test_bad_files_get_one_line_each_and_the_rest_is_inspected(
    sample_dir: Path, bad_files: dict[str, Path], converted_files: dict[str, Path], capsys
) -> None:
    good = str(sample_dir / "test" / "crack.jpg")
    arguments = [*map(str, bad_files.values()), good, *map(str, converted_files.values())]
    status, results, errors = run_json([*arguments, "--normal", *normals(sample_dir)], capsys)
    assert status == 1
    error_lines = [line for line in errors.splitlines() if line.startswith("defectscope: error:")]
    assert len(error_lines) == len(bad_files)
    for name, path in bad_files.items():
        assert any(str(path) in line for line in error_lines), name
    inspected = {Path(result["path"]).name: result for result in results}
    assert set(inspected) == {"crack.jpg", "rust16.png", "rust_rgba.png"}
    assert all(result["anomalous"] for result in inspected.values())
    assert "bottom left" in inspected["rust_rgba.png"]["answer"]


def test_nothing_readable(bad_files: dict[str, Path], capsys) -> None:
    assert main(["inspect", str(bad_files["text"]), "--normal", str(bad_files["tiny"])]) == 1
    assert "no image could be read" in capsys.readouterr().err


def test_no_references_is_one_clear_line(sample_dir: Path, capsys) -> None:
    status = main(["inspect", str(sample_dir / "test" / "good_00.jpg")])
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("defectscope: error: nothing to compare against")


def test_console_script_prints_human_verdicts(sample_dir: Path) -> None:
    script = Path(sys.executable).with_name("defectscope")
    completed = subprocess.run(
        [
            str(script),
            "inspect",
            str(sample_dir / "test" / "scratch.jpg"),
            "--normal",
            *normals(sample_dir),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert "scratch.jpg: ANOMALOUS" in completed.stdout
    assert "top right" in completed.stdout
    assert "Traceback" not in completed.stderr


def test_heatmap_overlay_marks_the_region(sample_dir: Path, tmp_path: Path, capsys) -> None:
    main(
        [
            "inspect",
            str(sample_dir / "test" / "rust.jpg"),
            "--normal",
            *normals(sample_dir),
            "--heatmap-dir",
            str(tmp_path),
        ]
    )
    capsys.readouterr()
    overlay = np.asarray(Image.open(tmp_path / "rust.png").convert("RGB")).astype(int)
    original = np.asarray(
        Image.open(io.BytesIO((sample_dir / "test" / "rust.jpg").read_bytes())).convert("RGB")
    ).astype(int)
    change = np.abs(overlay - original).sum(axis=2)
    # The rust stain sits bottom left: the overlay changes that quarter most.
    quarters = [change[r : r + 128, c : c + 128].mean() for r in (0, 128) for c in (0, 128)]
    assert int(np.argmax(quarters)) == 2
