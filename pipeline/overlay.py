"""Heatmap overlays: the anomaly map painted over the frame, with region boxes."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from pipeline.postprocess import Region


def heat_colours(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> (..., 3) uint8 on a blue-green-yellow-red ramp."""
    values = np.clip(values, 0.0, 1.0)[..., None]
    stops = np.array([[0, 0, 160], [0, 170, 255], [60, 230, 60], [255, 220, 0], [230, 0, 0]], float)
    position = values * (len(stops) - 1)
    low = np.floor(position).astype(int).clip(0, len(stops) - 2)
    fraction = position - low
    colours = stops[low[..., 0]] * (1 - fraction) + stops[low[..., 0] + 1] * fraction
    return colours.astype(np.uint8)


def overlay(
    image: Image.Image, anomaly_map: np.ndarray, threshold: float, regions: tuple[Region, ...]
) -> Image.Image:
    """The frame with the map blended in (red at twice the threshold) and region boxes drawn.

    Args:
        image: the original RGB frame.
        anomaly_map: (S, S) map over the whole frame.
        threshold: the threshold the verdict used; sets the colour scale.
        regions: boxes in the frame's pixels.
    """
    width, height = image.size
    resized = Image.fromarray(anomaly_map.astype(np.float32), mode="F").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    scaled = np.asarray(resized) / max(2.0 * threshold, 1e-6)  # (H, W), 0.5 at the threshold
    colours = heat_colours(scaled)  # (H, W, 3)
    alpha = np.clip(scaled, 0.15, 0.6)[..., None]
    blended = np.asarray(image.convert("RGB"), float) * (1 - alpha) + colours * alpha
    result = Image.fromarray(blended.astype(np.uint8))

    draw = ImageDraw.Draw(result)
    line = max(1, round(min(width, height) / 150))
    for region in regions:
        x0, y0, x1, y1 = region.box
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(255, 0, 255), width=line)
    return result
