"""Readers for anomaly detection benchmarks on disk: MVTec AD, VisA, and a plain folder layout.

Each reader returns one `DatasetSplit` per class: the normal training images (few-shot references
are drawn from them) and the test samples with their labels and mask files. A layout that is wrong
or incomplete raises one `DatasetError` naming the directory, file or CSV column that is missing.

    MVTec AD   <root>/<class>/train/good/*.png
               <root>/<class>/test/{good,<defect>}/*.png
               <root>/<class>/ground_truth/<defect>/<name>_mask.png
    VisA       <root>/split_csv/1cls.csv with columns object, split, label, image, mask
               (paths relative to <root>; label "normal" or "anomaly")
    folder     <root>/normal/, <root>/abnormal/, optional <root>/masks/<name>[_mask].png,
               optional <root>/train/ (references; else they are drawn from normal/);
               or one such folder per class under <root>
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DefectscopeError
from pipeline.images import load_image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NORMAL_DEFECT = "good"
"""The defect type of normal samples (MVTec AD's folder name for them)."""
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")


class DatasetError(DefectscopeError):
    """A dataset directory does not have the layout its kind needs."""


class DatasetKind(StrEnum):
    MVTEC = "mvtec"
    VISA = "visa"
    FOLDER = "folder"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset."""

    path: Path
    label: int
    """1 for anomalous, 0 for normal."""
    mask_path: Path | None
    """Ground-truth mask (non-zero = anomalous); None for normal samples and unmasked defects."""
    defect_type: str
    """"good" for normal samples, else the defect's name (the folder, or "anomaly")."""

    @property
    def anomalous(self) -> bool:
        return self.label == 1

    @property
    def has_mask(self) -> bool:
        """Whether the pixel ground truth is known (always for normal samples)."""
        return not self.anomalous or self.mask_path is not None

    def load_image(self) -> Image.Image:
        return load_image(self.path)

    def load_mask(self, size: tuple[int, int]) -> np.ndarray | None:
        """The ground truth as (H, W) bool for an image of `size` = (width, height).

        Normal samples give all-false masks; an anomalous sample without a mask file gives None.
        A mask stored at another resolution is resized (nearest) to the image's.
        """
        width, height = size
        if not self.anomalous:
            return np.zeros((height, width), dtype=bool)
        if self.mask_path is None:
            return None
        try:
            mask = Image.open(self.mask_path)
            mask.load()
        except OSError as error:
            raise DatasetError(f"{self.mask_path}: unreadable mask ({error})") from error
        if mask.mode not in ("1", "L", "P", "I", "I;16"):
            mask = mask.convert("L")
        if mask.size != (width, height):
            mask = mask.resize((width, height), Image.Resampling.NEAREST)
        return np.asarray(mask) > 0


@dataclass(frozen=True)
class DatasetSplit:
    """One class of a dataset: normal training images and labelled test samples."""

    class_name: str
    train_normals: tuple[Sample, ...]
    test: tuple[Sample, ...]

    @property
    def counts(self) -> tuple[int, int]:
        """(normal, anomalous) test samples."""
        anomalous = sum(sample.label for sample in self.test)
        return len(self.test) - anomalous, anomalous


def load_dataset(
    kind: DatasetKind | str, root: str | Path, classes: Sequence[str] | None = None
) -> list[DatasetSplit]:
    """Reads a dataset's layout (no images are decoded).

    Args:
        kind: "mvtec", "visa" or "folder".
        root: the dataset's root directory.
        classes: class names to read; None reads every class found.

    Returns:
        One split per class, in the order of `classes` or sorted by name.
    """
    try:
        kind = DatasetKind(kind)
    except ValueError as error:
        known = ", ".join(member.value for member in DatasetKind)
        raise DatasetError(f"unknown dataset kind {kind!r}; choose one of {known}") from error
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root directory not found")
    reader = {
        DatasetKind.MVTEC: _read_mvtec,
        DatasetKind.VISA: _read_visa,
        DatasetKind.FOLDER: _read_folder,
    }[kind]
    return reader(root, list(classes) if classes else None)


def few_shot_references(split: DatasetSplit, k: int, seed: int) -> tuple[Sample, ...]:
    """k normal training samples drawn without replacement; the same (split, k, seed) always
    draws the same samples, in path order."""
    available = len(split.train_normals)
    if not 1 <= k <= available:
        raise DatasetError(
            f"class {split.class_name!r}: cannot draw {k} references from {available} normal "
            "training images"
        )
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(available, size=k, replace=False))
    return tuple(split.train_normals[index] for index in chosen)


def held_out(split: DatasetSplit, references: Sequence[Sample]) -> tuple[Sample, ...]:
    """The split's test samples without the references (the folder layout may share them)."""
    taken = {sample.path for sample in references}
    return tuple(sample for sample in split.test if sample.path not in taken)


# MVTec AD ---------------------------------------------------------------------------------------


def _read_mvtec(root: Path, classes: list[str] | None) -> list[DatasetSplit]:
    if classes is None:
        classes = sorted(
            entry.name
            for entry in root.iterdir()
            if (entry / "train").is_dir() or (entry / "test").is_dir()
        )
        if not classes:
            raise DatasetError(
                f"{root}: no MVTec AD class directories (<class>/train/good and <class>/test)"
            )
    return [_read_mvtec_class(root / name) for name in classes]


def _read_mvtec_class(directory: Path) -> DatasetSplit:
    name = directory.name
    if not directory.is_dir():
        raise DatasetError(f"{directory}: class directory {name!r} not found")
    train = _images(_require_dir(directory / "train" / NORMAL_DEFECT, "MVTec AD normal training"))
    test_root = _require_dir(directory / "test", "MVTec AD test")

    test: list[Sample] = []
    defect_dirs = sorted(entry for entry in test_root.iterdir() if entry.is_dir())
    if not defect_dirs:
        raise DatasetError(f"{test_root}: no test/<defect> directories")
    for defect_dir in defect_dirs:
        defect = defect_dir.name
        for path in _images(defect_dir, allow_empty=True):
            if defect == NORMAL_DEFECT:
                test.append(Sample(path, 0, None, NORMAL_DEFECT))
                continue
            mask = directory / "ground_truth" / defect / f"{path.stem}_mask.png"
            if not mask.is_file():
                raise DatasetError(f"{mask}: ground-truth mask of {path} not found")
            test.append(Sample(path, 1, mask, defect))
    if not test:
        raise DatasetError(f"{test_root}: the test directories hold no images")
    return DatasetSplit(name, _samples(train), tuple(test))


# VisA -------------------------------------------------------------------------------------------


def _read_visa(root: Path, classes: list[str] | None) -> list[DatasetSplit]:
    table = root / VISA_SPLIT_CSV
    if not table.is_file():
        raise DatasetError(f"{table}: VisA split file not found (expected {VISA_SPLIT_CSV})")
    with table.open(newline="") as file:
        reader = csv.DictReader(file)
        missing = [column for column in VISA_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(
                f"{table}: missing column(s) {', '.join(missing)}; has {reader.fieldnames}"
            )
        rows = list(reader)

    by_class: dict[str, tuple[list[Sample], list[Sample]]] = {}
    for line, row in enumerate(rows, start=2):
        train, test = by_class.setdefault(row["object"], ([], []))
        label = row["label"].strip().lower()
        if label not in ("normal", "anomaly"):
            raise DatasetError(f"{table}:{line}: label {row['label']!r}; expected normal/anomaly")
        image = _require_file(root / row["image"], f"{table}:{line}: image")
        split = row["split"].strip().lower()
        if split == "train":
            if label == "normal":
                train.append(Sample(image, 0, None, NORMAL_DEFECT))
            continue
        if split != "test":
            raise DatasetError(f"{table}:{line}: split {row['split']!r}; expected train/test")
        if label == "normal":
            test.append(Sample(image, 0, None, NORMAL_DEFECT))
        else:
            if not row["mask"].strip():
                raise DatasetError(f"{table}:{line}: anomalous image {image} has no mask entry")
            mask = _require_file(root / row["mask"], f"{table}:{line}: mask")
            test.append(Sample(image, 1, mask, "anomaly"))

    names = classes if classes is not None else sorted(by_class)
    splits = []
    for name in names:
        if name not in by_class:
            raise DatasetError(f"{table}: no rows for class {name!r}; has {sorted(by_class)}")
        train, test = by_class[name]
        if not train:
            raise DatasetError(f"{table}: class {name!r} has no normal training images")
        if not test:
            raise DatasetError(f"{table}: class {name!r} has no test images")
        splits.append(DatasetSplit(name, tuple(train), tuple(test)))
    return splits


# Folder -----------------------------------------------------------------------------------------


def _read_folder(root: Path, classes: list[str] | None) -> list[DatasetSplit]:
    if classes is None:
        if (root / "normal").is_dir():
            return [_read_folder_class(root, root.name)]
        classes = sorted(entry.name for entry in root.iterdir() if (entry / "normal").is_dir())
        if not classes:
            raise DatasetError(
                f"{root}: no normal/ directory, neither here nor in any class subdirectory"
            )
    return [_read_folder_class(root / name, name) for name in classes]


def _read_folder_class(directory: Path, name: str) -> DatasetSplit:
    if not directory.is_dir():
        raise DatasetError(f"{directory}: class directory {name!r} not found")
    normals = _samples(_images(_require_dir(directory / "normal", "folder-layout normal")))
    abnormal_paths = _images(_require_dir(directory / "abnormal", "folder-layout abnormal"))
    train_dir = directory / "train"
    train = _samples(_images(train_dir)) if train_dir.is_dir() else normals

    masks_dir = directory / "masks"
    abnormal = []
    for path in abnormal_paths:
        mask = None
        if masks_dir.is_dir():
            candidates = [masks_dir / f"{path.stem}{suffix}.png" for suffix in ("", "_mask")]
            mask = next((candidate for candidate in candidates if candidate.is_file()), None)
            if mask is None:
                raise DatasetError(
                    f"{candidates[0]}: mask of {path} not found (nor {candidates[1].name}); "
                    "a masks/ directory needs one mask per abnormal image"
                )
        abnormal.append(Sample(path, 1, mask, "abnormal"))
    return DatasetSplit(name, train, normals + tuple(abnormal))


# Helpers ----------------------------------------------------------------------------------------


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DatasetError(f"{path}: {what} directory not found")
    return path


def _require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DatasetError(f"{what} file {path} not found")
    return path


def _images(directory: Path, allow_empty: bool = False) -> list[Path]:
    paths = sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES
    )
    if not paths and not allow_empty:
        raise DatasetError(f"{directory}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _samples(paths: list[Path]) -> tuple[Sample, ...]:
    return tuple(Sample(path, 0, None, NORMAL_DEFECT) for path in paths)
