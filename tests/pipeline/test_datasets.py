"""Dataset readers on tiny MVTec AD, VisA and folder layouts built on disk, missing pieces
included."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import (
    DatasetError,
    few_shot_references,
    held_out,
    load_dataset,
)


def write_mask(path: Path, box: tuple[int, int, int, int], size: int = 256) -> None:
    mask = np.zeros((size, size), dtype=np.uint8)
    x0, y0, x1, y1 = box
    mask[y0:y1, x0:x1] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask).save(path)


def copy(source: Path, target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


@pytest.fixture
def mvtec_root(tmp_path: Path, sample_dir: Path) -> Path:
    """Two classes; washer has a good and a "rust" defect folder, belt only good test images."""
    normals = sorted((sample_dir / "normal").glob("*.jpg"))
    for name in ("washer", "belt"):
        for index, path in enumerate(normals[:4]):
            copy(path, tmp_path / name / "train" / "good" / f"{index:03d}.jpg")
        copy(sample_dir / "test" / "good_00.jpg", tmp_path / name / "test" / "good" / "000.jpg")
    copy(sample_dir / "test" / "rust.jpg", tmp_path / "washer" / "test" / "rust" / "000.jpg")
    write_mask(tmp_path / "washer" / "ground_truth" / "rust" / "000_mask.png", (50, 160, 90, 200))
    copy(sample_dir / "test" / "chip.jpg", tmp_path / "belt" / "test" / "chip" / "000.jpg")
    write_mask(tmp_path / "belt" / "ground_truth" / "chip" / "000_mask.png", (100, 30, 150, 60))
    return tmp_path


@pytest.fixture
def visa_root(tmp_path: Path, sample_dir: Path) -> Path:
    rows = ["object,split,label,image,mask"]
    normals = sorted((sample_dir / "normal").glob("*.jpg"))
    for index, path in enumerate(normals[:3]):
        image = f"candle/Data/Images/Normal/{index:04d}.JPG"
        copy(path, tmp_path / image)
        rows.append(f"candle,train,normal,{image},")
    image = "candle/Data/Images/Normal/0100.JPG"
    copy(sample_dir / "test" / "good_01.jpg", tmp_path / image)
    rows.append(f"candle,test,normal,{image},")
    image, mask = "candle/Data/Images/Anomaly/000.JPG", "candle/Data/Masks/Anomaly/000.png"
    copy(sample_dir / "test" / "crack.jpg", tmp_path / image)
    write_mask(tmp_path / mask, (180, 110, 210, 140))
    rows.append(f"candle,test,anomaly,{image},{mask}")
    (tmp_path / "split_csv").mkdir()
    (tmp_path / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


@pytest.fixture
def folder_root(tmp_path: Path, sample_dir: Path) -> Path:
    root = tmp_path / "washer"
    for index, path in enumerate(sorted((sample_dir / "normal").glob("*.jpg"))[:5]):
        copy(path, root / "normal" / f"n{index}.jpg")
    for name in ("scratch", "rust"):
        copy(sample_dir / "test" / f"{name}.jpg", root / "abnormal" / f"{name}.jpg")
    write_mask(root / "masks" / "scratch.png", (150, 60, 200, 90))
    write_mask(root / "masks" / "rust_mask.png", (50, 160, 90, 200))
    return root


# MVTec AD ---------------------------------------------------------------------------------------


def test_mvtec_reads_every_class_with_labels_and_masks(mvtec_root: Path) -> None:
    splits = load_dataset("mvtec", mvtec_root)
    assert [split.class_name for split in splits] == ["belt", "washer"]
    washer = splits[1]
    assert len(washer.train_normals) == 4 and washer.counts == (1, 1)
    good, rust = sorted(washer.test, key=lambda sample: sample.label)
    assert good.defect_type == "good" and rust.defect_type == "rust" and rust.anomalous

    mask = rust.load_mask(rust.load_image().size)
    assert mask.dtype == bool and mask.shape == (256, 256)
    assert mask.sum() == 40 * 40 and mask[180, 70] and not mask[0, 0]
    assert not good.load_mask((256, 256)).any()


def test_mvtec_masks_at_another_resolution_are_resized(mvtec_root: Path) -> None:
    rust = next(s for s in load_dataset("mvtec", mvtec_root, ["washer"])[0].test if s.anomalous)
    mask = rust.load_mask((512, 128))
    assert mask.shape == (128, 512) and mask.any()


def test_mvtec_class_selection_and_missing_pieces(mvtec_root: Path) -> None:
    assert [s.class_name for s in load_dataset("mvtec", mvtec_root, ["washer"])] == ["washer"]
    with pytest.raises(DatasetError, match="class directory 'bolt' not found"):
        load_dataset("mvtec", mvtec_root, ["bolt"])

    (mvtec_root / "belt" / "ground_truth" / "chip" / "000_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"000_mask\.png: ground-truth mask of .*000\.jpg"):
        load_dataset("mvtec", mvtec_root, ["belt"])

    shutil.rmtree(mvtec_root / "washer" / "train")
    with pytest.raises(DatasetError, match=r"washer/train/good: MVTec AD normal training"):
        load_dataset("mvtec", mvtec_root, ["washer"])


def test_a_root_without_classes_or_at_all_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no MVTec AD class directories"):
        load_dataset("mvtec", tmp_path)
    with pytest.raises(DatasetError, match="dataset root directory not found"):
        load_dataset("mvtec", tmp_path / "absent")
    with pytest.raises(DatasetError, match="unknown dataset kind 'coco'"):
        load_dataset("coco", tmp_path)


# VisA -------------------------------------------------------------------------------------------


def test_visa_reads_the_split_csv(visa_root: Path) -> None:
    (candle,) = load_dataset("visa", visa_root)
    assert candle.class_name == "candle"
    assert len(candle.train_normals) == 3 and candle.counts == (1, 1)
    anomaly = next(sample for sample in candle.test if sample.anomalous)
    assert anomaly.load_mask((256, 256)).sum() == 30 * 30


def test_visa_missing_pieces_are_named(visa_root: Path) -> None:
    table = visa_root / "split_csv" / "1cls.csv"
    lines = table.read_text().splitlines()

    table.write_text("\n".join([lines[0].replace(",mask", ""), *lines[1:]]))
    with pytest.raises(DatasetError, match=r"missing column.*mask"):
        load_dataset("visa", visa_root)

    table.write_text("\n".join([*lines[:-1], lines[-1].replace("000.png", "404.png")]))
    with pytest.raises(DatasetError, match=r"1cls\.csv:6: mask file .*404\.png not found"):
        load_dataset("visa", visa_root)

    table.write_text("\n".join(lines))
    with pytest.raises(DatasetError, match="no rows for class 'pcb1'"):
        load_dataset("visa", visa_root, ["pcb1"])

    table.unlink()
    with pytest.raises(DatasetError, match=r"split_csv/1cls\.csv: VisA split file not found"):
        load_dataset("visa", visa_root)


# Folder -----------------------------------------------------------------------------------------


def test_folder_layout_with_masks(folder_root: Path) -> None:
    (split,) = load_dataset("folder", folder_root)
    assert split.class_name == "washer" and split.counts == (5, 2)
    assert len(split.train_normals) == 5  # no train/: references come from normal/
    scratch = next(sample for sample in split.test if sample.path.stem == "scratch")
    assert scratch.load_mask((256, 256)).sum() == 50 * 30


def test_folder_layout_without_masks_has_no_pixel_truth(folder_root: Path) -> None:
    shutil.rmtree(folder_root / "masks")
    (split,) = load_dataset("folder", folder_root.parent)  # one class per subdirectory
    anomalous = [sample for sample in split.test if sample.anomalous]
    assert all(not sample.has_mask and sample.load_mask((256, 256)) is None for sample in anomalous)


def test_folder_layout_missing_pieces(folder_root: Path) -> None:
    (folder_root / "masks" / "rust_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"masks/rust\.png: mask of .*rust\.jpg not found"):
        load_dataset("folder", folder_root)
    shutil.rmtree(folder_root / "abnormal")
    with pytest.raises(DatasetError, match="abnormal: folder-layout abnormal directory not found"):
        load_dataset("folder", folder_root)
    with pytest.raises(DatasetError, match="no normal/ directory"):
        load_dataset("folder", folder_root / "normal")


# References -------------------------------------------------------------------------------------


def test_few_shot_references_are_deterministic_and_held_out(folder_root: Path) -> None:
    (split,) = load_dataset("folder", folder_root)
    first = few_shot_references(split, 2, seed=0)
    assert first == few_shot_references(split, 2, seed=0)
    draws = {few_shot_references(split, 2, seed=seed) for seed in range(6)}
    assert len(draws) > 1
    remaining = held_out(split, first)
    assert len(remaining) == len(split.test) - 2
    assert not {sample.path for sample in first} & {sample.path for sample in remaining}
    with pytest.raises(DatasetError, match="cannot draw 6 references from 5"):
        few_shot_references(split, 6, seed=0)
