"""The benchmark loop: per class, a few-shot bank from k references, every held-out test image
inspected, and the image, pixel and answer metrics of `pipeline.metrics`.

Pixel metrics are computed at the ground truth's resolution, as the MVTec AD and VisA protocols
do: each map (over the squashed frame, at the encoder's size) is resized bilinearly to its image's
original size. Shrinking the masks to the map's size instead would be cheaper but blurs away thin
defects (1-3 pixel scratches) and changes the figures being compared with published ones.

The figures measure the weights in use: with the tiny preset's random encoder they say whether the
machinery works, not how well defectscope inspects real parts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import cv2
import numpy as np

from pipeline.datasets import DatasetSplit, Sample, few_shot_references, held_out
from pipeline.detector import Detector, Inspection
from pipeline.metrics import (
    Binning,
    PixelAccumulator,
    answer_accuracy,
    f1_max,
    image_auroc,
)

logger = logging.getLogger(__name__)

METRICS = ("image_auroc", "image_f1_max", "pixel_auroc", "pixel_f1_max", "aupro", "answer_accuracy")
"""The figures of a `ClassResult`, in table order."""


@dataclass(frozen=True)
class ClassResult:
    """The figures of one class; a metric the class cannot have (no defects, no masks) is None."""

    class_name: str
    normal_count: int
    anomalous_count: int
    image_auroc: float | None
    image_f1_max: float | None
    pixel_auroc: float | None
    pixel_f1_max: float | None
    aupro: float | None
    answer_accuracy: float
    """Share of answers whose yes/no matches the label, at the bank's calibrated threshold."""
    threshold: float
    references: tuple[str, ...]
    """Paths of the k references the bank was built from."""
    seconds: float

    def metrics(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in METRICS}

    def to_dict(self) -> dict[str, object]:
        return {
            "class": self.class_name,
            "normal": self.normal_count,
            "anomalous": self.anomalous_count,
            **{name: _round(value) for name, value in self.metrics().items()},
            "threshold": round(self.threshold, 6),
            "references": list(self.references),
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class ScoredSample:
    """A test sample with what the detector said about it."""

    sample: Sample
    inspection: Inspection


@dataclass(frozen=True)
class ClassEvaluation:
    """One class's result and its worst cases, for overlays."""

    result: ClassResult
    worst_normals: tuple[ScoredSample, ...] = field(repr=False)
    """The highest-scoring normal samples, worst first."""
    worst_anomalies: tuple[ScoredSample, ...] = field(repr=False)
    """The lowest-scoring anomalous samples, worst first."""


@dataclass(frozen=True)
class EvaluationReport:
    """Every class's result and the mean over classes of each metric."""

    classes: tuple[ClassEvaluation, ...]
    mean: dict[str, float | None]
    k_shot: int
    seed: int
    encoder: str
    """The encoder's fingerprint, which the figures depend on."""

    def to_dict(self) -> dict[str, object]:
        return {
            "k_shot": self.k_shot,
            "seed": self.seed,
            "encoder": self.encoder,
            "classes": [evaluation.result.to_dict() for evaluation in self.classes],
            "mean": {name: _round(value) for name, value in self.mean.items()},
        }


def evaluate(
    detector: Detector,
    splits: Sequence[DatasetSplit],
    k_shot: int,
    seed: int = 0,
    augment: bool = False,
    worst: int = 3,
    on_images: Callable[[int], None] | None = None,
) -> EvaluationReport:
    """Evaluates every class of a dataset.

    Args:
        detector: the detector to measure.
        splits: the dataset's classes (`load_dataset`).
        k_shot: normal references per class, drawn by `few_shot_references(split, k_shot, seed)`.
        seed: seed of the draw.
        augment: build the banks with rotated references, as `build_bank(augment=True)`.
        worst: how many worst normal and anomalous cases to keep per class.
        on_images: called with the number of test images each time a batch is done (progress).
    """
    evaluations = tuple(
        evaluate_class(detector, split, k_shot, seed, augment, worst, on_images) for split in splits
    )
    mean = {}
    for name in METRICS:
        values = [evaluation.result.metrics()[name] for evaluation in evaluations]
        present = [value for value in values if value is not None]
        mean[name] = float(np.mean(present)) if present else None
    return EvaluationReport(evaluations, mean, k_shot, seed, str(detector.encoder.fingerprint))


def evaluate_class(
    detector: Detector,
    split: DatasetSplit,
    k_shot: int,
    seed: int = 0,
    augment: bool = False,
    worst: int = 3,
    on_images: Callable[[int], None] | None = None,
) -> ClassEvaluation:
    """Evaluates one class; see `evaluate`."""
    started = time.perf_counter()
    references = few_shot_references(split, k_shot, seed)
    bank = detector.build_bank(
        [sample.load_image() for sample in references], augment=augment, class_name=split.class_name
    )
    samples = held_out(split, references)
    if not samples:
        raise ValueError(f"class {split.class_name!r}: no test samples besides the references")

    inspections: list[Inspection] = []
    size = detector.config.batch_size
    for start in range(0, len(samples), size):
        batch = samples[start : start + size]
        images = [sample.load_image() for sample in batch]
        inspections.extend(detector.inspect(images, bank=bank, class_name=split.class_name))
        if on_images is not None:
            on_images(len(batch))

    labels = np.array([sample.label for sample in samples])
    scores = np.array([inspection.score for inspection in inspections])
    both = 0 < labels.sum() < labels.size
    pixel = _pixel_metrics(samples, inspections) if labels.any() else None
    if labels.any() and pixel is None:
        logger.warning(
            "class %s: some defects have no mask; pixel metrics left out", split.class_name
        )

    result = ClassResult(
        class_name=split.class_name,
        normal_count=int(labels.size - labels.sum()),
        anomalous_count=int(labels.sum()),
        image_auroc=image_auroc(labels, scores) if both else None,
        image_f1_max=f1_max(labels, scores) if both else None,
        pixel_auroc=pixel.auroc() if pixel else None,
        pixel_f1_max=pixel.f1_max() if pixel else None,
        aupro=pixel.aupro() if pixel else None,
        answer_accuracy=answer_accuracy([i.answer for i in inspections], labels.astype(bool)),
        threshold=inspections[0].threshold,
        references=tuple(str(sample.path) for sample in references),
        seconds=time.perf_counter() - started,
    )
    scored = [ScoredSample(s, i) for s, i in zip(samples, inspections, strict=True)]
    normals = sorted((s for s in scored if not s.sample.anomalous), key=_score, reverse=True)
    anomalies = sorted((s for s in scored if s.sample.anomalous), key=_score)
    logger.info(
        "class %s: image AUROC %s, pixel AUROC %s in %.1f s",
        split.class_name,
        _round(result.image_auroc),
        _round(result.pixel_auroc),
        result.seconds,
    )
    return ClassEvaluation(result, tuple(normals[:worst]), tuple(anomalies[:worst]))


def _pixel_metrics(
    samples: Sequence[Sample], inspections: Sequence[Inspection]
) -> PixelAccumulator | None:
    """Pixel counts over every sample at its mask's resolution; None when a mask is missing."""
    if not all(sample.has_mask for sample in samples):
        return None
    # The maps' own range bounds their bilinear upsampling, so it spans every pixel's score.
    accumulator = PixelAccumulator(Binning.spanning(i.anomaly_map for i in inspections))
    for sample, inspection in zip(samples, inspections, strict=True):
        width, height = inspection.image_size
        mask = sample.load_mask((width, height))  # (H, W) bool
        full = cv2.resize(inspection.anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)
        accumulator.add(mask, full)
    if accumulator.anomalous.sum() == 0:
        return None
    return accumulator


def _score(scored: ScoredSample) -> float:
    return scored.inspection.score


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
