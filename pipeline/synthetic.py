"""Synthetic anomalies made from normal images, with their masks: what the decoder and the
explainer train on, and what calibration can use when a product has no defect samples.

Three kinds:

- ``nsa``: Natural Synthetic Anomalies (Schlüter et al., 2022), as AnomalyGPT trains on: a patch
  of another normal image, resized, moved elsewhere and blended in by Poisson image editing
  (OpenCV's seamless clone, normal or mixed gradients).
- ``cutpaste``: a patch of the same image, its brightness and contrast jittered, pasted elsewhere
  without blending (Li et al., 2021).
- ``noise``: a blob with a wobbly outline filled with structured noise of a contrasting colour.

The mask of every kind is where the result differs visibly from the original, not the pasted
rectangle: Poisson blending fades a patch into its surroundings, and a patch of plain background
moved onto plain background changes nothing a model could or should detect. A try whose visible
change is too small is drawn again; after `MAX_TRIES` a noise blob is used instead.

Everything is drawn from a `numpy.random.Generator`, so a seed fixes every sample.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image
from scipy import ndimage

logger = logging.getLogger(__name__)

SYNTHETIC_KINDS = ("nsa", "cutpaste", "noise")
NORMAL_KIND = "normal"
VISIBLE_DIFFERENCE = 24
"""A pixel belongs to the mask when some channel changed by more than this (of 255), after a 5 x 5
blur: above the washer samples' texture noise, below any change a person would call a defect."""
MIN_MASK_FRACTION = 0.002
"""A try whose visible change covers less of the image than this is drawn again."""
MAX_TRIES = 8


@dataclass(frozen=True)
class SyntheticAnomaly:
    """One synthetic sample; normal samples have kind "normal" and an all-false mask."""

    image: Image.Image
    """RGB."""
    mask: np.ndarray
    """(H, W) bool at the image's resolution, True where the anomaly is."""
    kind: str

    @property
    def anomalous(self) -> bool:
        return self.kind != NORMAL_KIND


def make_anomaly(
    image: Image.Image,
    donors: Sequence[Image.Image],
    rng: np.random.Generator,
    kind: str = "nsa",
) -> SyntheticAnomaly:
    """Puts one synthetic anomaly into a copy of `image`.

    Args:
        image: a normal RGB image.
        donors: other normal images of the product; NSA takes its patch from one of them (from
            `image` itself when there are none). Resized to `image`'s size when they differ.
        rng: the source of every random choice.
        kind: one of `SYNTHETIC_KINDS`.

    Returns:
        The anomalous image and its (H, W) bool mask.
    """
    if kind not in SYNTHETIC_KINDS:
        raise ValueError(f"unknown synthetic anomaly kind {kind!r}; choose from {SYNTHETIC_KINDS}")
    original = np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    height, width = original.shape[:2]
    if min(height, width) < 16:
        raise ValueError(f"image of {width}x{height} pixels is too small for a synthetic anomaly")
    donor_arrays = [_as_array(donor, (width, height)) for donor in donors] or [original]
    return _from_array(original, donor_arrays, rng, kind)


def _from_array(
    original: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator, kind: str
) -> SyntheticAnomaly:
    painters = {"nsa": _nsa, "cutpaste": _cutpaste, "noise": _noise}
    attempts = [kind] * MAX_TRIES + ([] if kind == "noise" else ["noise"] * MAX_TRIES)
    min_pixels = MIN_MASK_FRACTION * original.shape[0] * original.shape[1]
    for attempt, used in enumerate(attempts):
        result, region = painters[used](original, donors, rng)
        mask = visible_mask(original, result, region)
        if mask.sum() >= min_pixels or (attempt == len(attempts) - 1 and mask.any()):
            if used != kind:
                logger.debug("%s anomaly stayed invisible %d times; used noise", kind, MAX_TRIES)
            return SyntheticAnomaly(Image.fromarray(result), mask, used)
    raise RuntimeError("no visible synthetic anomaly after every try; is the image uniform?")


def visible_mask(original: np.ndarray, result: np.ndarray, region: np.ndarray) -> np.ndarray:
    """Where `result` differs visibly from `original` inside `region`, as a clean (H, W) bool.

    Args:
        original, result: (H, W, 3) uint8.
        region: (H, W) bool, where the painter changed pixels.
    """
    difference = np.abs(result.astype(np.int16) - original.astype(np.int16)).max(axis=2)
    difference = cv2.GaussianBlur(difference.astype(np.float32), (5, 5), 0)  # (H, W)
    mask = (difference > VISIBLE_DIFFERENCE) & region
    # Opening drops specks of texture change; closing and filling make one solid defect.
    mask = ndimage.binary_opening(mask, structure=np.ones((3, 3)))
    mask = ndimage.binary_closing(mask, structure=np.ones((5, 5)))
    return ndimage.binary_fill_holes(mask) & region


def _nsa(
    original: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    height, width = original.shape[:2]
    donor = donors[int(rng.integers(len(donors)))]
    patch_width, patch_height = _patch_size(height, width, rng, area=(0.01, 0.08))
    x0 = int(rng.integers(0, width - patch_width + 1))
    y0 = int(rng.integers(0, height - patch_height + 1))
    patch = donor[y0 : y0 + patch_height, x0 : x0 + patch_width]

    # NSA resizes the patch, then moves it: a scale and a place the part never shows them at.
    scale = rng.uniform(0.7, 1.3)
    new_width = int(np.clip(round(patch_width * scale), 8, width - 4))
    new_height = int(np.clip(round(patch_height * scale), 8, height - 4))
    patch = cv2.resize(patch, (new_width, new_height), interpolation=cv2.INTER_LINEAR)
    clone_mask = np.zeros((new_height, new_width), dtype=np.uint8)
    clone_mask[2:-2, 2:-2] = 255  # seamlessClone needs the mask off the patch border

    # seamlessClone needs the whole patch inside the image: keep a 2-pixel margin.
    left = int(rng.integers(2, width - new_width - 1))
    top = int(rng.integers(2, height - new_height - 1))
    centre = (left + new_width // 2, top + new_height // 2)
    mode = cv2.NORMAL_CLONE if rng.random() < 0.5 else cv2.MIXED_CLONE
    result = cv2.seamlessClone(
        np.ascontiguousarray(patch), np.ascontiguousarray(original), clone_mask, centre, mode
    )
    region = np.zeros((height, width), dtype=bool)
    region[top : top + new_height, left : left + new_width] = True
    return result, region


def _cutpaste(
    original: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    height, width = original.shape[:2]
    patch_width, patch_height = _patch_size(height, width, rng, area=(0.02, 0.15))
    x0 = int(rng.integers(0, width - patch_width + 1))
    y0 = int(rng.integers(0, height - patch_height + 1))
    patch = original[y0 : y0 + patch_height, x0 : x0 + patch_width].astype(np.float32)

    # CutPaste's colour jitter: brightness and contrast, so a pasted patch of the same texture
    # still reads as foreign.
    contrast, brightness = rng.uniform(0.6, 1.4), rng.uniform(-40, 40)
    patch = (patch - patch.mean()) * contrast + patch.mean() + brightness
    left = int(rng.integers(0, width - patch_width + 1))
    top = int(rng.integers(0, height - patch_height + 1))
    result = original.copy()
    result[top : top + patch_height, left : left + patch_width] = np.clip(patch, 0, 255)
    region = np.zeros((height, width), dtype=bool)
    region[top : top + patch_height, left : left + patch_width] = True
    return result, region


def _noise(
    original: np.ndarray, donors: Sequence[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    height, width = original.shape[:2]
    rows, columns = np.mgrid[0:height, 0:width].astype(np.float32)

    # A rotated ellipse whose radius wobbles with a few random harmonics of the angle.
    area = rng.uniform(0.005, 0.05) * height * width
    aspect = math.exp(rng.uniform(-0.7, 0.7))
    radius_x, radius_y = math.sqrt(area * aspect / math.pi), math.sqrt(area / aspect / math.pi)
    centre_x = rng.uniform(radius_x, width - radius_x)
    centre_y = rng.uniform(radius_y, height - radius_y)
    turn = rng.uniform(0, math.pi)
    dx, dy = columns - centre_x, rows - centre_y
    along = (dx * math.cos(turn) + dy * math.sin(turn)) / radius_x
    across = (-dx * math.sin(turn) + dy * math.cos(turn)) / radius_y
    angle = np.arctan2(across, along)
    wobble = sum(
        rng.uniform(0, 0.25) * np.cos(harmonic * angle + rng.uniform(0, 2 * math.pi))
        for harmonic in (2, 3, 5)
    )
    region = np.hypot(along, across) < 1.0 + wobble  # (H, W)
    region[int(centre_y), int(centre_x)] = True  # never empty, however small the image

    # Structured noise: a coarse random field upsampled smoothly, plus fine grain.
    cells = int(rng.integers(4, 12))
    coarse = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
    field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC)  # (H, W, 3)
    field += rng.normal(0, 0.3, (height, width, 3)).astype(np.float32)
    # A colour 60-120 levels away from the blob's surroundings, on whichever side has room.
    local = original[region].mean(axis=0)  # (3,)
    shift = rng.uniform(60, 120) * (1.0 if rng.random() < 0.5 else -1.0)
    colour = np.where((local + shift < 0) | (local + shift > 255), local - shift, local + shift)
    texture = colour + 25 * field
    opacity = rng.uniform(0.6, 1.0)
    blended = original.astype(np.float32)
    blended[region] = (1 - opacity) * blended[region] + opacity * texture[region]
    return np.clip(blended, 0, 255).astype(np.uint8), region


def _patch_size(
    height: int, width: int, rng: np.random.Generator, area: tuple[float, float]
) -> tuple[int, int]:
    """(width, height) of a patch covering a random share of the image, aspect in [0.3, 3.3]."""
    share = rng.uniform(*area) * height * width
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    patch_width = int(np.clip(round(math.sqrt(share * aspect)), 8, width - 8))
    patch_height = int(np.clip(round(math.sqrt(share / aspect)), 8, height - 8))
    return patch_width, patch_height


def _as_array(image: Image.Image, size: tuple[int, int]) -> np.ndarray:
    image = image.convert("RGB")
    if image.size != size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8)


class SyntheticDataset(Sequence[SyntheticAnomaly]):
    """Synthetic samples made on demand from a product's normal images; sample `i` is the same
    on every call, in every process, for the same arguments.

    Sample `i` starts from normal image `i % len(normals)`; it stays normal with probability
    `normal_fraction`, else gets an anomaly of a kind drawn from `kinds`, with the other normal
    images as donors.
    """

    def __init__(
        self,
        normals: Sequence[Image.Image],
        seed: int = 0,
        kinds: Sequence[str] = SYNTHETIC_KINDS,
        normal_fraction: float = 0.5,
        length: int = 256,
        image_size: int | None = None,
    ) -> None:
        """
        Args:
            normals: normal RGB images of one product.
            seed: seed of every sample.
            kinds: the anomaly kinds to draw from.
            normal_fraction: share of samples left normal, in [0, 1].
            length: number of samples.
            image_size: squash every image to this square side first (the encoder's input size:
                the encoder squashes anyway, and small images are fast to edit); None keeps them.
        """
        if not normals:
            raise ValueError("a synthetic dataset needs at least one normal image")
        unknown = sorted(set(kinds) - set(SYNTHETIC_KINDS))
        if unknown or not kinds:
            raise ValueError(f"anomaly kinds {list(kinds)}; choose from {SYNTHETIC_KINDS}")
        if not 0.0 <= normal_fraction <= 1.0:
            raise ValueError(f"normal fraction {normal_fraction} is outside [0, 1]")
        if length < 1:
            raise ValueError(f"a synthetic dataset of length {length}")
        size = (image_size, image_size) if image_size else None
        self.normals = [_as_array(image, size or image.size) for image in normals]
        self.seed = seed
        self.kinds = tuple(kinds)
        self.normal_fraction = normal_fraction
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SyntheticAnomaly:  # type: ignore[override]
        if not -self.length <= index < self.length:
            raise IndexError(f"sample {index} of a synthetic dataset of {self.length}")
        index %= self.length
        rng = np.random.default_rng([self.seed, index])
        base_index = index % len(self.normals)
        base = self.normals[base_index]
        if rng.random() < self.normal_fraction:
            mask = np.zeros(base.shape[:2], dtype=bool)
            return SyntheticAnomaly(Image.fromarray(base), mask, NORMAL_KIND)

        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        donors = [image for i, image in enumerate(self.normals) if i != base_index]
        donors = [image for image in donors if image.shape == base.shape] or [base]
        return _from_array(base, donors, rng, kind)
