"""From anomaly maps to decisions: fusion, image score, regions, location words, answers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import torch
from scipy import ndimage

from pipeline.errors import ConfigError

LOCATIONS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
NO_ANOMALY_ANSWER = "No, there is no anomaly in the image."


class Fusion(StrEnum):
    """How the few-shot and zero-shot maps combine."""

    AUTO = "auto"
    """Few-shot when there is a bank (the reference code's choice), else zero-shot."""
    FEWSHOT = "fewshot"
    ZEROSHOT = "zeroshot"
    MEAN = "mean"


class ScoreMode(StrEnum):
    """How a map becomes one image score."""

    MAX = "max"
    """The map's maximum (the reference code)."""
    TOPK = "topk"
    """Mean of the highest `topk_fraction` of pixels: steadier against single-pixel noise."""


def fuse_maps(
    fewshot: torch.Tensor | None, zeroshot: torch.Tensor | None, fusion: Fusion | str
) -> torch.Tensor:
    """Combines (B, S, S) maps; either may be None where it was not computed."""
    fusion = Fusion(fusion)
    if fusion is Fusion.AUTO:
        fusion = Fusion.FEWSHOT if fewshot is not None else Fusion.ZEROSHOT
    if fusion is Fusion.FEWSHOT:
        if fewshot is None:
            raise ConfigError("few-shot fusion needs a memory bank")
        return fewshot
    if zeroshot is None:
        raise ConfigError(f"{fusion.value} fusion needs the zero-shot map")
    if fusion is Fusion.ZEROSHOT:
        return zeroshot
    if fewshot is None:
        raise ConfigError("mean fusion needs a memory bank")
    return (fewshot + zeroshot) / 2


def image_scores(
    anomaly_maps: torch.Tensor, mode: ScoreMode | str = ScoreMode.MAX, topk_fraction: float = 0.01
) -> torch.Tensor:
    """(B, S, S) -> (B,) image scores."""
    flat = anomaly_maps.flatten(1)  # (B, S * S)
    if ScoreMode(mode) is ScoreMode.MAX:
        return flat.amax(dim=1)
    count = max(1, math.ceil(topk_fraction * flat.shape[1]))
    return flat.topk(count, dim=1).values.mean(dim=1)


@dataclass(frozen=True)
class Region:
    """One connected area above the threshold, in the coordinates of the original image."""

    box: tuple[int, int, int, int]
    """[x0, y0, x1, y1] in image pixels, x1 and y1 exclusive."""
    area: float
    """Fraction of the image the region covers, in [0, 1]."""
    location: str
    """Where its centre of mass lies on a 3 x 3 grid ("top left", ..., "bottom right")."""
    peak: float
    """The largest map value inside the region."""

    def to_dict(self) -> dict[str, object]:
        return {
            "box": list(self.box),
            "area": round(self.area, 6),
            "location": self.location,
            "peak": round(self.peak, 6),
        }


def location_word(x: float, y: float) -> str:
    """The 3 x 3 grid cell of a point given as fractions of width and height, each in [0, 1]."""
    column = min(2, max(0, int(x * 3)))
    row = min(2, max(0, int(y * 3)))
    return LOCATIONS[row][column]


def find_regions(
    anomaly_map: np.ndarray,
    threshold: float,
    image_width: int,
    image_height: int,
    min_area: float = 0.0,
) -> tuple[Region, ...]:
    """Connected components (8-neighbour) of `anomaly_map > threshold`, largest peak first.

    Args:
        anomaly_map: (S, S) map over the whole image (the encoder squashes the frame to a square).
        threshold: pixel threshold.
        image_width, image_height: size of the original image, for boxes in its pixels.
        min_area: drop regions smaller than this fraction of the image (the strongest is kept).
    """
    height, width = anomaly_map.shape
    labels, count = ndimage.label(anomaly_map > threshold, structure=np.ones((3, 3)))
    if count == 0:
        return ()
    index = np.arange(1, count + 1)
    sizes = ndimage.sum_labels(np.ones_like(anomaly_map), labels, index)
    peaks = ndimage.maximum(anomaly_map, labels, index)
    centres = ndimage.center_of_mass(np.ones_like(anomaly_map), labels, index)
    slices = ndimage.find_objects(labels)
    scale_x, scale_y = image_width / width, image_height / height

    regions = []
    for size, peak, (centre_y, centre_x), (rows, columns) in zip(
        sizes, peaks, centres, slices, strict=True
    ):
        box = (
            math.floor(columns.start * scale_x),
            math.floor(rows.start * scale_y),
            min(image_width, math.ceil(columns.stop * scale_x)),
            min(image_height, math.ceil(rows.stop * scale_y)),
        )
        location = location_word((centre_x + 0.5) / width, (centre_y + 0.5) / height)
        regions.append(Region(box, float(size) / (height * width), location, float(peak)))
    regions.sort(key=lambda region: region.peak, reverse=True)
    kept = [region for region in regions[1:] if region.area >= min_area]
    return (regions[0], *kept)


@dataclass(frozen=True)
class DecisionRules:
    """How a fused map becomes a verdict (the threshold aside, which is per product)."""

    score_mode: ScoreMode = ScoreMode.MAX
    topk_fraction: float = 0.01
    min_region_area: float = 0.0


@dataclass(frozen=True)
class Verdict:
    """The decision for one image, before any LLM explanation."""

    score: float
    anomalous: bool
    threshold: float
    regions: tuple[Region, ...]


def decide(
    anomaly_maps: torch.Tensor,
    threshold: float,
    image_sizes: list[tuple[int, int]] | tuple[tuple[int, int], ...],
    rules: DecisionRules = DecisionRules(),
) -> list[Verdict]:
    """Scores, verdicts and regions for (B, S, S) fused maps of images of the given (w, h) sizes.

    The same threshold applies to the image score and to the pixels that form regions; regions
    are only reported for anomalous images.
    """
    scores = image_scores(anomaly_maps, rules.score_mode, rules.topk_fraction)
    maps = anomaly_maps.float().cpu().numpy()
    verdicts = []
    for anomaly_map, score, (width, height) in zip(maps, scores.tolist(), image_sizes, strict=True):
        anomalous = score > threshold
        regions = (
            find_regions(anomaly_map, threshold, width, height, rules.min_region_area)
            if anomalous
            else ()
        )
        verdicts.append(Verdict(score, anomalous, threshold, regions))
    return verdicts


def answer_from_regions(anomalous: bool, regions: tuple[Region, ...]) -> str:
    """AnomalyGPT's answer format, filled from the regions instead of an LLM."""
    if not anomalous:
        return NO_ANOMALY_ANSWER
    locations = list(dict.fromkeys(region.location for region in regions))
    if not locations:
        return "Yes, there is an anomaly in the image."
    where = join_words(locations)
    if len(regions) == 1:
        return f"Yes, there is an anomaly in the image, at the {where} of the image."
    return f"Yes, there are {len(regions)} anomalies in the image, at the {where} of the image."


def join_words(words: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + f" and {words[-1]}"
