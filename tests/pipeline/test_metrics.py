"""Metrics against scikit-learn where it has them, and hand-computed cases where it has not."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import precision_recall_curve, roc_auc_score

from pipeline.metrics import (
    Binning,
    PixelAccumulator,
    answer_accuracy,
    aupro,
    f1_max,
    image_auroc,
    location_accuracy,
    location_words,
    pixel_auroc,
    pixel_f1_max,
)


def sklearn_f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float((2 * precision * recall / np.maximum(precision + recall, 1e-12)).max())


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """The textbook sweep: every distinct score a threshold, every region's overlap counted."""
    regions = []
    for mask in masks:
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labels == index for index in range(1, count + 1)])
    normal = ~masks.astype(bool)
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        flagged = maps >= threshold
        fpr = (flagged & normal).sum() / normal.sum()
        overlaps = [
            (flagged[image] & region).sum() / region.sum()
            for image, image_regions in enumerate(regions)
            for region in image_regions
        ]
        points.append((fpr, float(np.mean(overlaps))))
    fpr, pro = np.array(points).T
    limit_pro = np.interp(fpr_limit, fpr, pro)
    keep = fpr <= fpr_limit
    return float(np.trapezoid(np.r_[pro[keep], limit_pro], np.r_[fpr[keep], fpr_limit]) / fpr_limit)


@pytest.fixture(scope="module")
def pixel_case() -> tuple[np.ndarray, np.ndarray]:
    """Four 64 x 64 images: two with defects (one with two regions), noisy maps that see them."""
    rng = np.random.default_rng(3)
    masks = np.zeros((4, 64, 64), dtype=bool)
    masks[0, 10:20, 30:45] = True
    masks[0, 40:60, 5:12] = True
    masks[2, 25:40, 25:40] = True
    maps = rng.normal(0, 1, masks.shape) + 1.5 * masks
    return masks, maps.astype(np.float32)


# Image level ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_auroc_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes many ties
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_image_auroc_hand_cases() -> None:
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.4, 0.3, 0.2, 0.1])) == 0.0
    assert image_auroc(np.array([0, 1]), np.array([0.5, 0.5])) == 0.5
    # 1 of the 4 (anomalous, normal) pairs is ordered wrongly.
    assert image_auroc(np.array([0, 0, 1, 1]), np.array([0.1, 0.35, 0.3, 0.4])) == 0.75


@pytest.mark.parametrize("seed", [0, 1])
def test_f1_max_matches_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.normal(labels, 1.0), 1)
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-12)


def test_f1_max_hand_case() -> None:
    # Flagging the top two catches one of two defects with one false alarm: F1 = 0.5; flagging
    # the top three catches both with one false alarm: P = 2/3, R = 1, F1 = 0.8.
    labels, scores = np.array([1, 0, 1, 0]), np.array([0.9, 0.8, 0.7, 0.1])
    assert f1_max(labels, scores) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("labels", "scores", "message"),
    [
        ([1, 1, 1], [0.1, 0.2, 0.3], "both normal and anomalous"),
        ([0, 0], [0.1, 0.2], "both normal and anomalous"),
        ([0, 1], [0.1], r"\(N,\) labels"),
        ([0, 2], [0.1, 0.2], "0/1 or bool"),
        ([0, 1], [0.1, np.nan], "NaN"),
    ],
)
def test_image_metrics_refuse_degenerate_input(labels, scores, message) -> None:
    for metric in (image_auroc, f1_max):
        with pytest.raises(ValueError, match=message):
            metric(np.array(labels), np.array(scores))


# Pixel level ------------------------------------------------------------------------------------


def test_pixel_auroc_matches_sklearn_within_its_error_bound(pixel_case) -> None:
    masks, maps = pixel_case
    accumulator = PixelAccumulator(Binning.spanning(maps))
    accumulator.add_batch(masks, maps)
    exact = roc_auc_score(masks.ravel(), maps.ravel())
    assert abs(accumulator.auroc() - exact) <= accumulator.auroc_error_bound() + 1e-12
    assert accumulator.auroc_error_bound() < 1e-4
    assert pixel_auroc(masks, maps) == pytest.approx(exact, abs=1e-4)


def test_binned_metrics_on_a_large_set_match_sklearn() -> None:
    """4 x 512 x 512 pixels, the size where sorting every pixel starts to cost."""
    rng = np.random.default_rng(7)
    masks = np.zeros((4, 512, 512), dtype=bool)
    masks[0, 100:180, 200:260] = True
    masks[1, 300:420, 10:40] = True
    masks[3, 5:30, 400:500] = True
    maps = (rng.normal(0, 1, masks.shape) + 1.2 * masks).astype(np.float32)

    assert pixel_auroc(masks, maps) == pytest.approx(
        roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-4
    )
    assert pixel_f1_max(masks, maps) == pytest.approx(
        sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-3
    )


def test_pixel_f1_max_matches_sklearn_when_scores_are_on_bin_edges() -> None:
    """Scores on a grid coarser than the bins: every threshold is a bin edge, so F1 is exact."""
    rng = np.random.default_rng(5)
    masks = rng.random((3, 32, 32)) < 0.1
    maps = np.round(rng.normal(0, 1, masks.shape) + masks, 1)
    binning = Binning(float(maps.min()), float(maps.max()), bins=round(np.ptp(maps) * 10) + 1)
    accumulator = PixelAccumulator(binning)
    accumulator.add_batch(masks, maps)
    assert accumulator.f1_max() == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()))
    assert accumulator.auroc() == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))


def test_aupro_of_a_perfect_map_is_one(pixel_case) -> None:
    masks, _ = pixel_case
    assert aupro(masks, masks.astype(np.float32)) == pytest.approx(1.0)
    assert pixel_auroc(masks, masks.astype(np.float32)) == pytest.approx(1.0)


def test_aupro_of_a_constant_map_is_the_diagonal(pixel_case) -> None:
    """One threshold flags everything: the curve goes straight from (0, 0) to (1, 1), so the
    area up to FPR 0.3 is 0.3^2 / 2 and normalised 0.15."""
    masks, _ = pixel_case
    constant = np.full(masks.shape, 0.4)
    assert aupro(masks, constant) == pytest.approx(0.15)
    assert aupro(masks, constant, fpr_limit=1.0) == pytest.approx(0.5)
    assert pixel_auroc(masks, constant) == pytest.approx(0.5)


def test_aupro_weights_regions_equally_not_pixels() -> None:
    """A large region found and a small one missed give PRO 1/2 at every low FPR, though most
    defect pixels are found."""
    masks = np.zeros((1, 40, 40), dtype=bool)
    masks[0, 0:20, 0:20] = True  # 400 pixels, found
    masks[0, 30:32, 30:32] = True  # 4 pixels, missed (scored as normal background)
    maps = np.zeros((1, 40, 40))
    maps[0, 0:20, 0:20] = 1.0
    # Thresholds: above 1 -> (0, 0); at 1 -> (FPR 0, PRO 0.5); at 0 -> (1, 1).
    # Area up to 0.3: 0.3 * 0.5 (the flat part) + 0.3 * (0.65 - 0.5) / 2 = 0.1725.
    assert aupro(masks, maps) == pytest.approx(0.1725 / 0.3)


@pytest.mark.parametrize("fpr_limit", [0.05, 0.3, 1.0])
def test_aupro_matches_a_sweep_over_every_score(pixel_case, fpr_limit: float) -> None:
    masks, maps = pixel_case
    coarse = np.round(maps, 1)  # few distinct scores, so the reference sweep stays quick
    expected = reference_aupro(masks, coarse, fpr_limit)
    assert aupro(masks, coarse, fpr_limit) == pytest.approx(expected, abs=1e-3)


def test_pixel_results_do_not_depend_on_how_images_are_added(pixel_case) -> None:
    masks, maps = pixel_case
    binning = Binning.spanning(maps)
    together, one_by_one = PixelAccumulator(binning), PixelAccumulator(binning)
    together.add_batch(masks, maps)
    for mask, anomaly_map in zip(masks[::-1], maps[::-1], strict=True):
        one_by_one.add(mask, anomaly_map)
    assert together.auroc() == one_by_one.auroc()
    assert together.aupro() == one_by_one.aupro()


def test_pixel_metrics_refuse_degenerate_input(pixel_case) -> None:
    masks, maps = pixel_case
    with pytest.raises(ValueError, match="anomalous and normal pixels"):
        pixel_auroc(np.zeros_like(masks), maps)
    with pytest.raises(ValueError, match="anomalous and normal pixels"):
        aupro(np.ones_like(masks), maps)
    with pytest.raises(ValueError, match="of one shape"):
        pixel_auroc(masks, maps[:, :10])
    with pytest.raises(ValueError, match="NaN"):
        pixel_auroc(masks, np.where(masks, np.nan, maps))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(masks, maps, fpr_limit=0.0)


# Answers ----------------------------------------------------------------------------------------


def test_answer_accuracy_parses_yes_and_no() -> None:
    answers = [
        "Yes, there is an anomaly in the image, at the top left of the image.",
        "No, there is no anomaly in the image.",
        "no anomaly",
        "I cannot tell.",
    ]
    assert answer_accuracy(answers, [True, False, True, False]) == 0.5
    with pytest.raises(ValueError, match="2 answers for 3 labels"):
        answer_accuracy(answers[:2], [True, False, True])


def test_location_words_take_the_longest_match() -> None:
    text = "Yes, there are 3 anomalies in the image, at the top left, top and center of the image."
    assert location_words(text) == {"top left", "top", "center"}
    assert location_words("No, there is no anomaly in the image.") == frozenset()
    answers = ["... at the bottom right of the image.", "... at the left and right of the image."]
    assert location_accuracy(answers, [{"bottom right"}, {"left"}]) == 0.5
