"""`defectscope eval`, `train decoder`, `train explainer` and `calibrate` on tiny on-disk sets."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deployments.cli import main
from pipeline.checkpoint import load_checkpoint
from pipeline.detector import Detector, DetectorConfig
from pipeline.synthetic import make_anomaly

REDIS_URL = "redis://127.0.0.1:6379"


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """MVTec AD layout, class "washer": 5 training normals, 3 good test images and 4 synthetic
    defects with their masks."""
    root = tmp_path_factory.mktemp("mvtec")
    washer = root / "washer"
    normals = [
        Image.open(path).convert("RGB") for path in sorted((sample_dir / "normal").glob("*"))
    ]
    for directory in ("train/good", "test/good", "test/synthetic", "ground_truth/synthetic"):
        (washer / directory).mkdir(parents=True)
    for index, image in enumerate(normals[:5]):
        image.save(washer / "train" / "good" / f"{index:03d}.png")
    for index, path in enumerate(sorted((sample_dir / "test").glob("good_*.jpg"))):
        Image.open(path).save(washer / "test" / "good" / f"{index:03d}.png")
    rng = np.random.default_rng(0)
    for index, kind in enumerate(("nsa", "cutpaste", "noise", "noise")):
        sample = make_anomaly(normals[5 + index % 3], normals[:5], rng, kind)
        sample.image.save(washer / "test" / "synthetic" / f"{index:03d}.png")
        mask = Image.fromarray(sample.mask.astype(np.uint8) * 255)
        mask.save(washer / "ground_truth" / "synthetic" / f"{index:03d}_mask.png")
    return root


def normal_paths(sample_dir: Path) -> list[str]:
    return [str(path) for path in sorted((sample_dir / "normal").glob("*.jpg"))]


def argv(line: str, *paths: object) -> list[str]:
    """A command line: the words of `line`, then `paths` as strings (paths may hold spaces)."""
    return [*line.split(), *map(str, paths)]


def last_error(capsys: pytest.CaptureFixture) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# eval -------------------------------------------------------------------------------------------


def test_eval_json_reports_every_metric(mvtec_root: Path, tmp_path: Path, capsys) -> None:
    status = main(
        argv("eval --dataset mvtec --k-shot 3 --json --root", mvtec_root, "--out", tmp_path)
    )
    assert status == 0
    report = json.loads(capsys.readouterr().out)
    (washer,) = report["classes"]
    assert washer["class"] == "washer" and (washer["normal"], washer["anomalous"]) == (3, 4)
    assert len(washer["references"]) == 3
    for name in ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro"):
        assert 0.0 <= washer[name] <= 1.0 and report["mean"][name] == washer[name]
    # Even random features find these synthetic defects few-shot.
    assert washer["image_auroc"] > 0.7 and washer["pixel_auroc"] > 0.7
    assert "random weights" in report["note"]

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["classes"][0]["aupro"] == washer["aupro"]
    overlays = sorted(path.name for path in (tmp_path / "washer").iterdir())
    assert len(overlays) == 6
    assert sum(name.startswith("worst_anomalous_1_synthetic_") for name in overlays) == 1


def test_eval_is_deterministic_for_a_seed_and_prints_a_table(mvtec_root: Path, capsys) -> None:
    arguments = argv("eval --dataset mvtec --k-shot 2 --root", mvtec_root)
    assert main([*arguments, "--seed", "5", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main([*arguments, "--seed", "5"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("| class | normal | anomalous | image AUROC |")
    assert "| **mean** |" in table and "random weights" in table
    assert main([*arguments, "--seed", "5", "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for result in (first, again):
        del result["classes"][0]["seconds"]
    assert again["classes"] == first["classes"]


def test_eval_layout_and_k_errors_are_one_line(mvtec_root: Path, tmp_path: Path, capsys) -> None:
    assert main(argv("eval --dataset mvtec --root", tmp_path)) == 2
    assert "no MVTec AD class directories" in last_error(capsys)
    arguments = argv("eval --dataset mvtec --k-shot 9 --root", mvtec_root)
    assert main(arguments) == 2
    assert "cannot draw 9 references from 5" in last_error(capsys)


# train ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder_checkpoint(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    output = tmp_path_factory.mktemp("decoder") / "checkpoint"
    arguments = argv("train decoder --normal", sample_dir / "normal", "--out", output)
    arguments += argv("--steps 6 --batch-size 2 --pool-size 4 --save-every 3 --class-name washer")
    assert main(arguments) == 0
    return output


def test_train_decoder_writes_a_checkpoint_the_detector_loads(decoder_checkpoint: Path) -> None:
    detector = Detector(DetectorConfig(device="cpu", checkpoint=str(decoder_checkpoint)))
    assert detector.has_trained_decoder
    assert detector.checkpoint.extra["training"]["step"] == 6


def test_train_decoder_resumes_and_refuses_to_overwrite(
    decoder_checkpoint: Path, sample_dir: Path, capsys
) -> None:
    capsys.readouterr()
    arguments = argv("train decoder --normal", sample_dir / "normal", "--out", decoder_checkpoint)
    arguments += argv("--batch-size 2 --pool-size 4 --class-name washer --device cpu")
    assert main([*arguments, "--steps", "8"]) == 2
    assert "--resume" in last_error(capsys)
    assert main([*arguments, "--steps", "8", "--resume", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["start_step"], result["step"]) == (6, 8)


def test_train_explainer_on_a_tiny_llm(
    decoder_checkpoint: Path, sample_dir: Path, tiny_llm_dir: Path, tmp_path: Path, capsys
) -> None:
    output = tmp_path / "explainer"
    arguments = argv("train explainer --normal", *normal_paths(sample_dir), "--out", output)
    arguments += argv("--llm", tiny_llm_dir, "--checkpoint", decoder_checkpoint)
    arguments += argv("--steps 4 --batch-size 2 --pool-size 4 --k-shot 4 --json")
    assert main(arguments) == 0
    assert json.loads(capsys.readouterr().out)["step"] == 4
    detector = Detector(DetectorConfig(device="cpu", checkpoint=str(output)))
    checkpoint = load_checkpoint(output, detector.encoder.fingerprint)
    # One checkpoint holds every trained part: the decoder came along from --checkpoint.
    assert {"decoder", "prompt_learner", "image_projection"} <= set(checkpoint.state)
    assert checkpoint.llm is not None and checkpoint.llm.startswith(tiny_llm_dir.name)


# calibrate --------------------------------------------------------------------------------------


@pytest.fixture
def bank_store(monkeypatch: pytest.MonkeyPatch):
    """A BankStore on the Redis server at 127.0.0.1:6379 under a key prefix of its own."""
    try:
        from bankstore import BankStore
    except ImportError as error:
        pytest.skip(f"bankstore.BankStore is not importable ({error})")
    prefix = f"test-calibrate-{uuid.uuid4().hex[:12]}:"
    monkeypatch.setenv("DEFECTSCOPE_REDIS_PREFIX", prefix)
    store = BankStore.connect(REDIS_URL, prefix=prefix)
    yield store
    for key in store.client.scan_iter(match=f"{prefix}*"):
        store.client.delete(key)


@pytest.mark.redis
def test_calibrate_stores_the_threshold_with_the_product(
    bank_store, detector: Detector, sample_dir: Path, capsys
) -> None:
    paths = normal_paths(sample_dir)
    references = [Image.open(path).convert("RGB") for path in paths[:4]]
    bank = detector.build_bank(references, class_name="washer")
    sources = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths[:4]]
    bank_store.publish("washer", bank, detector.encoder.fingerprint, sources, False, None, "washer")
    base = ["calibrate", "washer", "--redis-url", REDIS_URL, "--json"]

    assert main([*base, "--normal", *paths[4:]]) == 0
    normal_only = json.loads(capsys.readouterr().out)
    assert normal_only["method"] == "leave-one-out" and normal_only["f1"] is None

    defects = [str(sample_dir / "test" / f"{name}.jpg") for name in ("rust", "scratch")]
    assert main([*base, "--normal", *paths[4:], "--defects", *defects, "--synthetic", "4"]) == 0
    calibration = json.loads(capsys.readouterr().out)
    assert calibration["method"] == "f1-optimal" and 0.0 < calibration["f1"] <= 1.0
    assert calibration["counts"] == {"normal": 4, "defect": 2, "synthetic": 4}

    stored = bank_store.get_calibration("washer")
    assert stored.threshold == pytest.approx(calibration["threshold"])
    assert stored.details["method"] == "f1-optimal"
    loaded = bank_store.get("washer", fingerprint=detector.encoder.fingerprint)
    assert loaded.bank.threshold == pytest.approx(calibration["threshold"])


@pytest.mark.redis
def test_calibrate_refuses_the_banks_own_references(
    bank_store, detector: Detector, sample_dir: Path, capsys
) -> None:
    paths = normal_paths(sample_dir)
    bank = detector.build_bank([Image.open(path).convert("RGB") for path in paths[:3]])
    sources = [hashlib.sha256(Path(path).read_bytes()).hexdigest() for path in paths[:3]]
    bank_store.publish("washer", bank, detector.encoder.fingerprint, sources, False, None)
    assert main(["calibrate", "washer", "--redis-url", REDIS_URL, "--normal", *paths[:3]]) == 2
    assert "its own references" in last_error(capsys)
    assert main(["calibrate", "bolt", "--redis-url", REDIS_URL, "--normal", *paths[3:]]) == 2
    assert "bolt" in last_error(capsys)
