"""Per-product thresholds: the normal-only rule and the F1-optimal point on hand cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.calibration import (
    CalibrationMethod,
    calibrate,
    f1_optimal_threshold,
    threshold_from_normal_scores,
)
from pipeline.metrics import f1_max


def test_f1_optimal_threshold_on_a_hand_case() -> None:
    # Sorted: 0.9 defect, 0.5 normal, 0.4 defect, 0.2 normal, 0.1 normal. Flagging >= 0.4 catches
    # both defects with one false alarm (F1 0.8), better than >= 0.9 (0.67) or >= 0.2 (0.67);
    # the threshold sits halfway between 0.4 and the next lower score 0.2.
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.5, 0.4, 0.9])
    threshold, f1 = f1_optimal_threshold(labels, scores)
    assert threshold == pytest.approx(0.3) and f1 == pytest.approx(0.8)
    assert f1 == pytest.approx(f1_max(labels, scores))


def test_a_separable_case_splits_the_gap() -> None:
    threshold, f1 = f1_optimal_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.6, 0.7]))
    assert threshold == pytest.approx(0.4) and f1 == 1.0


def test_when_every_score_is_flagged_the_threshold_is_below_the_lowest() -> None:
    threshold, f1 = f1_optimal_threshold(np.array([1, 0, 1]), np.array([0.3, 0.3, 0.3]))
    assert threshold < 0.3 and f1 == pytest.approx(0.8)


def test_f1_optimal_threshold_refuses_one_class() -> None:
    with pytest.raises(ValueError, match="2 normal and 0 defect"):
        f1_optimal_threshold(np.array([0, 0]), np.array([0.1, 0.2]))


def test_normal_only_calibration_keeps_the_leave_one_out_rule() -> None:
    scores = np.array([0.10, 0.12, 0.20])
    calibration = calibrate(scores)
    assert calibration.method is CalibrationMethod.LEAVE_ONE_OUT
    assert calibration.threshold == pytest.approx(0.20 + (0.20 - 0.12))
    assert calibration.threshold == threshold_from_normal_scores(torch.from_numpy(scores))
    assert calibration.f1 is None and calibration.defect_scores is None
    assert calibration.normal_scores.count == 3 and calibration.normal_scores.median == 0.12


def test_defect_scores_switch_to_the_f1_optimal_point() -> None:
    calibration = calibrate(
        np.array([0.1, 0.2, 0.3]),
        np.array([0.5, 0.25]),
        counts={"normal": 3, "defect": 1, "synthetic": 1},
    )
    assert calibration.method is CalibrationMethod.F1_OPTIMAL
    assert calibration.threshold == pytest.approx(0.225) and calibration.f1 == pytest.approx(0.8)
    document = calibration.to_dict()
    assert document["method"] == "f1-optimal" and document["counts"]["synthetic"] == 1
    assert document["defect_scores"]["maximum"] == 0.5


def test_calibration_needs_normal_scores() -> None:
    with pytest.raises(ValueError, match="at least one normal score"):
        calibrate(np.array([]), np.array([0.4]))
