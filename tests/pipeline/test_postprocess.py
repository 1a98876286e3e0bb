"""Fusion, image scores, regions and location words."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.postprocess import (
    LOCATIONS,
    NO_ANOMALY_ANSWER,
    Fusion,
    Region,
    ScoreMode,
    answer_from_regions,
    find_regions,
    fuse_maps,
    image_scores,
    location_word,
)


@pytest.mark.parametrize(
    ("x", "y", "word"),
    [
        (0.1, 0.1, "top left"),
        (0.5, 0.1, "top"),
        (0.9, 0.1, "top right"),
        (0.1, 0.5, "left"),
        (0.5, 0.5, "center"),
        (0.9, 0.5, "right"),
        (0.1, 0.9, "bottom left"),
        (0.5, 0.9, "bottom"),
        (0.9, 0.9, "bottom right"),
        (1.0, 1.0, "bottom right"),
        (0.0, 0.0, "top left"),
    ],
)
def test_location_words_on_the_3x3_grid(x: float, y: float, word: str) -> None:
    assert location_word(x, y) == word


def test_every_grid_cell_has_a_word() -> None:
    words = [
        location_word((column + 0.5) / 3, (row + 0.5) / 3)
        for row in range(3)
        for column in range(3)
    ]
    assert words == [word for row in LOCATIONS for word in row]


def test_regions_are_boxed_in_original_image_pixels() -> None:
    anomaly_map = np.zeros((100, 100), np.float32)
    anomaly_map[10:20, 70:90] = 0.8  # top right blob
    anomaly_map[80:82, 5:7] = 0.6  # small bottom left blob
    regions = find_regions(anomaly_map, threshold=0.5, image_width=400, image_height=200)
    assert [region.location for region in regions] == ["top right", "bottom left"]
    top_right = regions[0]
    assert top_right.box == (280, 20, 360, 40)  # x scaled by 4, y by 2, stop exclusive
    assert top_right.area == pytest.approx(200 / 10_000)
    assert top_right.peak == pytest.approx(0.8)


def test_min_area_drops_specks_but_keeps_the_strongest() -> None:
    anomaly_map = np.zeros((50, 50), np.float32)
    anomaly_map[5, 5] = 0.9
    anomaly_map[30:40, 30:40] = 0.7
    regions = find_regions(anomaly_map, 0.5, 50, 50, min_area=0.01)
    assert [region.peak for region in regions] == pytest.approx([0.9, 0.7])
    assert find_regions(np.zeros((4, 4), np.float32), 0.5, 4, 4) == ()


def test_diagonal_pixels_join_one_region() -> None:
    anomaly_map = np.eye(10, dtype=np.float32)
    assert len(find_regions(anomaly_map, 0.5, 10, 10)) == 1


def test_fusion_modes() -> None:
    fewshot, zeroshot = torch.full((1, 2, 2), 0.2), torch.full((1, 2, 2), 0.6)
    assert fuse_maps(fewshot, zeroshot, Fusion.AUTO) is fewshot
    assert fuse_maps(None, zeroshot, "auto") is zeroshot
    assert fuse_maps(fewshot, zeroshot, "zeroshot") is zeroshot
    assert torch.allclose(fuse_maps(fewshot, zeroshot, "mean"), torch.full((1, 2, 2), 0.4))
    with pytest.raises(ConfigError, match="needs a memory bank"):
        fuse_maps(None, zeroshot, "fewshot")
    with pytest.raises(ConfigError, match="needs the zero-shot map"):
        fuse_maps(fewshot, None, "mean")


def test_image_scores() -> None:
    anomaly_map = torch.zeros(2, 10, 10)
    anomaly_map[0, 0, 0] = 1.0
    anomaly_map[1, :5] = 0.5
    assert image_scores(anomaly_map).tolist() == [1.0, 0.5]
    topk = image_scores(anomaly_map, ScoreMode.TOPK, topk_fraction=0.1)  # mean of 10 pixels
    assert topk.tolist() == pytest.approx([0.1, 0.5])


def test_answers_in_anomalygpt_format() -> None:
    one = (Region((0, 0, 1, 1), 0.1, "top left", 0.9),)
    two = (*one, Region((0, 0, 1, 1), 0.1, "center", 0.8))
    three = (*two, Region((0, 0, 1, 1), 0.1, "center", 0.7))
    assert answer_from_regions(False, ()) == NO_ANOMALY_ANSWER
    assert answer_from_regions(True, one) == (
        "Yes, there is an anomaly in the image, at the top left of the image."
    )
    assert answer_from_regions(True, two) == (
        "Yes, there are 2 anomalies in the image, at the top left and center of the image."
    )
    assert answer_from_regions(True, three).startswith("Yes, there are 3 anomalies")
    assert Region((1, 2, 3, 4), 0.25, "top", 0.5).to_dict()["box"] == [1, 2, 3, 4]
