"""Anomaly detection metrics: image and pixel AUROC, AUPRO, F1-max, answer accuracy.

Image-level metrics are exact. Pixel-level metrics run on full-resolution ground truth (millions of
pixels per class), so they count pixels in a fixed histogram of scores instead of sorting them:
memory is O(bins + one image) whatever the number of pixels, and images can be added one at a time
(`PixelAccumulator`), which is how the evaluation loop uses them.

Precision of the binned metrics: scores are cut into `bins` equal-width bins over their observed
range, and pixels in one bin are treated as tied. For AUROC that is the only approximation, and
its error is bounded by half the share of (anomalous, normal) pixel pairs that fall into the same
bin (`PixelAccumulator.auroc_error_bound`); with 2^16 bins over maps that spread their values, it is
of the order of 1e-5. F1-max and AUPRO are evaluated at the bin edges, so they can miss a better
threshold that lies inside a bin by at most what one bin's pixels change.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.stats import rankdata

from pipeline.explainer import agrees
from pipeline.postprocess import LOCATIONS

DEFAULT_BINS = 2**16
"""Score bins of the pixel metrics; see the module docstring for what it costs in precision."""
DEFAULT_FPR_LIMIT = 0.3
"""AUPRO integrates the PRO curve up to this false positive rate (the MVTec AD protocol)."""
LOCATION_WORDS = tuple(sorted((word for row in LOCATIONS for word in row), key=len, reverse=True))
_LOCATION_PATTERN = re.compile(r"\b(" + "|".join(LOCATION_WORDS) + r")\b")


# Image level ------------------------------------------------------------------------------------


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """The area under the ROC curve of image scores, exact.

    Computed as the Mann-Whitney statistic on average ranks, so tied scores count one half, as
    in `sklearn.metrics.roc_auc_score`.

    Args:
        labels: (N,) 1 (or True) for anomalous, 0 for normal.
        scores: (N,) higher means more anomalous.

    Returns:
        A float in [0, 1].
    """
    positive, scores = _binary_problem(labels, scores, "image_auroc")
    ranks = rankdata(scores)  # (N,), ties get their average rank
    count_positive = int(positive.sum())
    count_negative = positive.size - count_positive
    rank_sum = float(ranks[positive].sum())
    statistic = rank_sum - count_positive * (count_positive + 1) / 2
    return statistic / (count_positive * count_negative)


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """The best F1 over all thresholds "anomalous when score >= t", exact.

    Args:
        labels: (N,) 1 (or True) for anomalous, 0 for normal.
        scores: (N,) higher means more anomalous.

    Returns:
        A float in [0, 1].
    """
    positive, scores = _binary_problem(labels, scores, "f1_max")
    order = np.argsort(-scores, kind="stable")
    sorted_scores, sorted_positive = scores[order], positive[order]
    true_positives = np.cumsum(sorted_positive)  # (N,)
    predicted = np.arange(1, scores.size + 1)
    # Only the last index of a run of tied scores is a threshold one can actually set.
    last_of_tie = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    f1 = 2 * true_positives / (predicted + positive.sum())
    return float(f1[last_of_tie].max())


def answer_accuracy(answers: Sequence[str], labels: Sequence[bool] | np.ndarray) -> float:
    """The share of answers whose yes/no matches the label (an unparseable answer is wrong).

    Args:
        answers: N answers in AnomalyGPT's form ("Yes, there is an anomaly ..." / "No, ...").
        labels: N booleans, True for anomalous.
    """
    labels = np.asarray(labels, dtype=bool)
    if len(answers) != labels.size:
        raise ValueError(f"{len(answers)} answers for {labels.size} labels")
    if labels.size == 0:
        raise ValueError("answer accuracy needs at least one answer")
    correct = [agrees(answer, bool(label)) for answer, label in zip(answers, labels, strict=True)]
    return float(np.mean(correct))


def location_words(text: str) -> frozenset[str]:
    """The 3 x 3 grid words an answer names ("top left", "center", ...), longest match first."""
    return frozenset(_LOCATION_PATTERN.findall(text.lower()))


def location_accuracy(answers: Sequence[str], expected: Sequence[Iterable[str]]) -> float:
    """The share of answers that name exactly the expected set of location words.

    Args:
        answers: N answers of anomalous samples.
        expected: N collections of location words, from the ground-truth regions.
    """
    if len(answers) != len(expected):
        raise ValueError(f"{len(answers)} answers for {len(expected)} expected locations")
    if not answers:
        raise ValueError("location accuracy needs at least one answer")
    hits = [
        location_words(answer) == frozenset(words)
        for answer, words in zip(answers, expected, strict=True)
    ]
    return float(np.mean(hits))


# Pixel level ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Binning:
    """Equal-width score bins over [low, high]; values outside are clipped into the end bins."""

    low: float
    high: float
    bins: int = DEFAULT_BINS

    def __post_init__(self) -> None:
        if not (np.isfinite(self.low) and np.isfinite(self.high)) or self.high < self.low:
            raise ValueError(f"score range [{self.low}, {self.high}] is not a finite interval")
        if self.bins < 1:
            raise ValueError(f"{self.bins} bins; need at least one")

    @classmethod
    def spanning(cls, maps: Iterable[np.ndarray], bins: int = DEFAULT_BINS) -> Binning:
        """Bins over the range of all values in `maps` (read once, one array at a time)."""
        low, high = np.inf, -np.inf
        for anomaly_map in maps:
            values = np.asarray(anomaly_map)
            if not np.isfinite(values).all():
                raise ValueError("anomaly maps contain NaN or infinite values")
            if values.size:
                low = min(low, float(np.min(values)))
                high = max(high, float(np.max(values)))
        if not np.isfinite(low):
            raise ValueError("no score values to bin")
        return cls(low, high, bins)

    def index(self, values: np.ndarray) -> np.ndarray:
        """Bin index of each value, same shape, int64 in [0, bins)."""
        if self.high == self.low:
            return np.zeros(np.shape(values), dtype=np.int64)
        scale = self.bins / (self.high - self.low)
        indices = ((np.asarray(values, dtype=np.float64) - self.low) * scale).astype(np.int64)
        return np.clip(indices, 0, self.bins - 1)


class PixelAccumulator:
    """Per-bin pixel counts for pixel AUROC, pixel F1-max and AUPRO, filled image by image.

    Every pixel is counted as anomalous or normal per score bin; every connected ground-truth
    region (8-neighbour, as in the MVTec AD evaluation code) adds, per bin, the share of its own
    pixels that fall into that bin. Thresholding at a bin edge then gives the true positive rate,
    the false positive rate and the per-region overlap of the PRO curve by cumulative sums.
    """

    def __init__(self, binning: Binning) -> None:
        self.binning = binning
        self.anomalous = np.zeros(binning.bins, dtype=np.int64)
        self.normal = np.zeros(binning.bins, dtype=np.int64)
        self.region_overlap = np.zeros(binning.bins, dtype=np.float64)
        self.region_count = 0

    def add(self, mask: np.ndarray, anomaly_map: np.ndarray) -> None:
        """Adds one image.

        Args:
            mask: (H, W) bool ground truth.
            anomaly_map: (H, W) scores at the mask's resolution.
        """
        mask = np.asarray(mask, dtype=bool)
        if mask.ndim != 2 or mask.shape != np.shape(anomaly_map):
            raise ValueError(
                f"mask of shape {mask.shape} and map of shape {np.shape(anomaly_map)}; expected "
                "the same (H, W)"
            )
        if not np.isfinite(anomaly_map).all():
            raise ValueError("anomaly map contains NaN or infinite values")
        indices = self.binning.index(anomaly_map)  # (H, W)
        bins = self.binning.bins
        self.anomalous += np.bincount(indices[mask], minlength=bins)
        self.normal += np.bincount(indices[~mask], minlength=bins)

        regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count:
            inside = regions > 0
            sizes = np.bincount(regions[inside])  # (count + 1,), sizes[0] unused
            weights = 1.0 / sizes[regions[inside]]  # each region's pixels sum to 1
            self.region_overlap += np.bincount(indices[inside], weights=weights, minlength=bins)
            self.region_count += count

    def add_batch(self, masks: np.ndarray, maps: np.ndarray) -> None:
        """Adds (N, H, W) masks and maps, one image at a time."""
        masks, maps = _pixel_problem(masks, maps)
        for mask, anomaly_map in zip(masks, maps, strict=True):
            self.add(mask, anomaly_map)

    def _check_both_classes(self, metric: str) -> tuple[int, int]:
        positives, negatives = int(self.anomalous.sum()), int(self.normal.sum())
        if positives == 0 or negatives == 0:
            raise ValueError(
                f"{metric} needs anomalous and normal pixels; got {positives} anomalous and "
                f"{negatives} normal"
            )
        return positives, negatives

    def auroc(self) -> float:
        """Pixel AUROC: P(anomalous pixel scores above normal pixel), same-bin pairs count half."""
        positives, negatives = self._check_both_classes("pixel AUROC")
        above = np.cumsum(self.anomalous[::-1])[::-1] - self.anomalous  # positives in higher bins
        pairs = self.normal * (above + 0.5 * self.anomalous)  # per bin of the normal pixel
        return float(pairs.sum() / (positives * negatives))

    def auroc_error_bound(self) -> float:
        """Largest possible |binned AUROC - exact AUROC|: half the same-bin pair share."""
        positives, negatives = self._check_both_classes("pixel AUROC")
        same_bin = (self.anomalous.astype(np.float64) * self.normal).sum()
        return float(0.5 * same_bin / (positives * negatives))

    def f1_max(self) -> float:
        """Pixel F1-max over the bin edges."""
        positives, _ = self._check_both_classes("pixel F1-max")
        true_positives = np.cumsum(self.anomalous[::-1])  # threshold at each edge, high to low
        predicted = true_positives + np.cumsum(self.normal[::-1])
        f1 = 2 * true_positives / np.maximum(predicted + positives, 1)
        return float(f1.max())

    def aupro(self, fpr_limit: float = DEFAULT_FPR_LIMIT) -> float:
        """The normalised area under the PRO curve up to `fpr_limit`.

        PRO at a threshold is the mean over ground-truth regions of the share of the region above
        it; the curve against the false positive rate is integrated by the trapezoid rule from
        FPR 0 to `fpr_limit` (interpolating the last point) and divided by `fpr_limit`.
        """
        if not 0.0 < fpr_limit <= 1.0:
            raise ValueError(f"fpr_limit {fpr_limit} is outside (0, 1]")
        _, negatives = self._check_both_classes("AUPRO")
        # Thresholds from above the maximum down to the lowest bin edge: FPR rises from 0 to 1.
        fpr = np.r_[0.0, np.cumsum(self.normal[::-1]) / negatives]
        pro = np.r_[0.0, np.cumsum(self.region_overlap[::-1]) / self.region_count]
        return float(_area_up_to(fpr, pro, fpr_limit) / fpr_limit)


def pixel_auroc(masks: np.ndarray, maps: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Pixel AUROC of (N, H, W) bool masks against (N, H, W) maps, binned (module docstring).

    Returns:
        A float in [0, 1].
    """
    return _accumulate(masks, maps, bins).auroc()


def pixel_f1_max(masks: np.ndarray, maps: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Pixel F1-max of (N, H, W) bool masks against (N, H, W) maps, at the bin edges.

    Returns:
        A float in [0, 1].
    """
    return _accumulate(masks, maps, bins).f1_max()


def aupro(
    masks: np.ndarray,
    maps: np.ndarray,
    fpr_limit: float = DEFAULT_FPR_LIMIT,
    bins: int = DEFAULT_BINS,
) -> float:
    """The area under the per-region overlap curve up to `fpr_limit`, normalised to [0, 1].

    Args:
        masks: (N, H, W) bool ground truth; each 8-connected component is one region.
        maps: (N, H, W) anomaly scores.
        fpr_limit: upper end of the false positive rate range (0.3 in the MVTec AD protocol).
        bins: score bins (thresholds) of the sweep.

    Returns:
        A float in [0, 1]: 1 for a map that separates every region from all normal pixels.
    """
    return _accumulate(masks, maps, bins).aupro(fpr_limit)


def _accumulate(masks: np.ndarray, maps: np.ndarray, bins: int) -> PixelAccumulator:
    masks, maps = _pixel_problem(masks, maps)
    accumulator = PixelAccumulator(Binning.spanning(maps, bins))
    accumulator.add_batch(masks, maps)
    return accumulator


def _area_up_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing from 0, for x in [0, limit]."""
    beyond = int(np.searchsorted(x, limit, side="right"))  # first point past the limit
    xs, ys = x[:beyond], y[:beyond]
    if beyond < x.size and xs[-1] < limit:
        fraction = (limit - xs[-1]) / (x[beyond] - xs[-1])
        xs = np.r_[xs, limit]
        ys = np.r_[ys, ys[-1] + fraction * (y[beyond] - ys[-1])]
    return float(np.trapezoid(ys, xs))


def _binary_problem(
    labels: np.ndarray, scores: np.ndarray, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels), np.asarray(scores, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"{metric} needs (N,) labels and (N,) scores; got {labels.shape} and {scores.shape}"
        )
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"{metric} labels must be 0/1 or bool; got values {np.unique(labels)}")
    if not np.isfinite(scores).all():
        raise ValueError(f"{metric} scores contain NaN or infinite values")
    positive = labels.astype(bool)
    count = int(positive.sum())
    if count in (0, positive.size):
        raise ValueError(
            f"{metric} needs both normal and anomalous samples; got {positive.size - count} "
            f"normal and {count} anomalous"
        )
    return positive, scores


def _pixel_problem(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks), np.asarray(maps)
    if masks.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(
            f"pixel metrics need (N, H, W) masks and maps of one shape; got {masks.shape} and "
            f"{maps.shape}"
        )
    return masks, maps
