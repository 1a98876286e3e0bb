"""Choosing the anomaly threshold of a product from its own images.

With normal images only, the threshold sits above the normal scores by their own spread
(`threshold_from_normal_scores`). With defect samples too, real or synthetic, it is the point of
best image F1 (`f1_optimal_threshold`). `calibrate` picks between the two and records what it saw.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

import numpy as np
import torch


def threshold_from_normal_scores(scores: torch.Tensor) -> float:
    """A threshold above every normal score, with a margin as wide as their upper spread.

    `scores` are image scores of normal images that were not in the bank they were matched
    against (leave-one-out), so they sample what a new good part scores. The threshold is
    max + (max - median): scale-free, and wider when the normals disagree more.
    """
    if scores.numel() == 0:
        raise ValueError("calibration needs at least one normal score")
    highest = float(scores.max())
    return highest + (highest - float(scores.median()))


class CalibrationMethod(StrEnum):
    LEAVE_ONE_OUT = "leave-one-out"
    """Normal images only: `threshold_from_normal_scores`."""
    F1_OPTIMAL = "f1-optimal"
    """Normal and defect images: the threshold of the best F1 (`f1_optimal_threshold`)."""


@dataclass(frozen=True)
class ScoreSummary:
    """The spread of a set of image scores."""

    count: int
    minimum: float
    median: float
    maximum: float

    @classmethod
    def of(cls, scores: np.ndarray) -> ScoreSummary:
        return cls(
            int(scores.size), float(scores.min()), float(np.median(scores)), float(scores.max())
        )

    def to_dict(self) -> dict[str, float | int]:
        return {key: round(value, 6) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Calibration:
    """A product's threshold and how it was chosen; stored with the product's bank."""

    threshold: float
    method: CalibrationMethod
    f1: float | None
    """Image F1 at the threshold on the calibration images; None without defect samples."""
    normal_scores: ScoreSummary
    defect_scores: ScoreSummary | None
    counts: dict[str, int]
    """Images used, by source: "normal", "defect" (real), "synthetic"."""

    def to_dict(self) -> dict[str, object]:
        return {
            "threshold": self.threshold,
            "method": self.method.value,
            "f1": None if self.f1 is None else round(self.f1, 6),
            "normal_scores": self.normal_scores.to_dict(),
            "defect_scores": None if self.defect_scores is None else self.defect_scores.to_dict(),
            "counts": dict(self.counts),
        }


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold with the best image F1 under the detector's rule "anomalous when score > t".

    Candidate thresholds lie halfway between consecutive distinct scores (and just below the
    lowest), so the chosen one sits in the gap that separates best, not on a training score.
    Among equally good gaps the highest threshold wins: fewer false alarms for the same F1.

    Args:
        labels: (N,) 1 (or True) for defects, 0 for normal images; both must occur.
        scores: (N,) image scores.

    Returns:
        (threshold, F1 at that threshold).
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape}; expected (N,) both")
    if labels.all() or not labels.any():
        raise ValueError(
            f"the F1-optimal threshold needs normal and defect scores; got {int((~labels).sum())} "
            f"normal and {int(labels.sum())} defect"
        )
    distinct = np.unique(scores)[::-1]  # (D,) high to low
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_labels = scores[order], labels[order]
    # Flagging every score >= distinct[i]: counts at the last position of each distinct score.
    last = np.searchsorted(-sorted_scores, -distinct, side="right") - 1  # (D,)
    true_positives = np.cumsum(sorted_labels)[last]
    flagged = last + 1
    f1 = 2 * true_positives / (flagged + labels.sum())
    best = int(np.argmax(f1))  # first maximum: the highest threshold
    spread = max(float(distinct[0] - distinct[-1]), abs(float(distinct[0])), 1e-12)
    below = distinct[best + 1] if best + 1 < distinct.size else distinct[best] - 1e-3 * spread
    return float((distinct[best] + below) / 2), float(f1[best])


def calibrate(
    normal_scores: np.ndarray | torch.Tensor,
    defect_scores: np.ndarray | torch.Tensor | None = None,
    counts: dict[str, int] | None = None,
) -> Calibration:
    """A product's threshold from its image scores.

    Args:
        normal_scores: (N,) scores of normal images that are not in the bank they were matched
            against (held-out parts, or leave-one-out scores).
        defect_scores: (M,) scores of defect images, real or synthetic; None or empty calibrates
            from the normal scores alone.
        counts: images per source, recorded as they are; defaults to the score counts.

    Returns:
        The F1-optimal threshold when there are defect scores, else the normal-only rule.
    """
    normal = np.asarray(normal_scores, dtype=np.float64).reshape(-1)
    defects = (
        np.asarray(defect_scores, dtype=np.float64).reshape(-1)
        if defect_scores is not None
        else np.empty(0)
    )
    if normal.size == 0:
        raise ValueError("calibration needs at least one normal score")
    counts = counts or {"normal": int(normal.size), "defect": int(defects.size)}
    if defects.size == 0:
        threshold = threshold_from_normal_scores(torch.from_numpy(normal))
        return Calibration(
            threshold, CalibrationMethod.LEAVE_ONE_OUT, None, ScoreSummary.of(normal), None, counts
        )

    labels = np.r_[np.zeros(normal.size, dtype=bool), np.ones(defects.size, dtype=bool)]
    threshold, f1 = f1_optimal_threshold(labels, np.r_[normal, defects])
    return Calibration(
        threshold,
        CalibrationMethod.F1_OPTIMAL,
        f1,
        ScoreSummary.of(normal),
        ScoreSummary.of(defects),
        counts,
    )
