"""Paints the bundled sample images: a machined washer on a conveyor belt, some with defects.

The samples under pipeline/samples/ were made by this script; rerun it to rebuild them exactly:

    python scripts/make_samples.py pipeline/samples

normal/ holds the reference images a bank is built from; test/ holds good parts and parts with a
painted defect (scratch, rust stain, chipped edge, crack), named after it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SIZE = 256


def washer(rng: np.random.Generator) -> Image.Image:
    """A good part: ring with a brushed finish on a textured belt, with pose and light jitter."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    belt = 70 + 8 * np.sin(xx / 3.0) + rng.normal(0, 2, (SIZE, SIZE))

    cx, cy = SIZE / 2 + rng.uniform(-1.5, 1.5), SIZE / 2 + rng.uniform(-1.5, 1.5)
    radius = np.hypot(xx - cx, yy - cy)
    angle = np.arctan2(yy - cy, xx - cx)
    outer, inner = 92 + rng.uniform(-0.5, 0.5), 40 + rng.uniform(-0.5, 0.5)
    brushed = 165 + 8 * np.sin(angle * 40) + rng.normal(0, 3, (SIZE, SIZE))
    bevel = 25 * np.exp(-((radius - outer + 4) ** 2) / 8) - 20 * np.exp(
        -((radius - inner - 3) ** 2) / 6
    )
    ring = np.clip((outer - radius) * 0.8, 0, 1) * np.clip((radius - inner) * 0.8, 0, 1)

    light = rng.uniform(0.99, 1.01)
    grey = light * (ring * (brushed + bevel) + (1 - ring) * belt)
    rgb = np.stack([grey * 1.0, grey * 0.98, grey * 0.94], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def paint_scratch(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    draw = ImageDraw.Draw(image)
    x0, y0 = rng.uniform(150, 160), rng.uniform(60, 70)
    draw.line([(x0, y0), (x0 + 40, y0 + 22)], fill=(40, 38, 35), width=3)
    return image


def paint_rust(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    stain = Image.new("L", image.size, 0)
    cx, cy = rng.uniform(60, 80), rng.uniform(170, 190)
    ImageDraw.Draw(stain).ellipse([cx - 16, cy - 12, cx + 16, cy + 12], fill=220)
    stain = stain.filter(ImageFilter.GaussianBlur(3))
    rust = Image.new("RGB", image.size, (150, 70, 25))
    return Image.composite(rust, image, stain)


def paint_chip(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    draw = ImageDraw.Draw(image)
    cx = rng.uniform(118, 138)
    draw.polygon([(cx - 18, 30), (cx + 18, 30), (cx, 58)], fill=(72, 72, 70))
    return image


def paint_crack(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    x, y = rng.uniform(185, 195), rng.uniform(120, 130)
    points = [(x, y)]
    for _ in range(8):
        x, y = x + rng.uniform(1, 4), y + rng.uniform(-5, 5)
        points.append((x, y))
    ImageDraw.Draw(image).line(points, fill=(30, 28, 26), width=2)
    return image


DEFECTS = {"scratch": paint_scratch, "rust": paint_rust, "chip": paint_chip, "crack": paint_crack}


def main(out_dir: Path) -> None:
    rng = np.random.default_rng(20261203)
    (out_dir / "normal").mkdir(parents=True, exist_ok=True)
    (out_dir / "test").mkdir(parents=True, exist_ok=True)
    for index in range(8):
        washer(rng).save(out_dir / "normal" / f"washer_{index:02d}.jpg", quality=92)
    for index in range(3):
        washer(rng).save(out_dir / "test" / f"good_{index:02d}.jpg", quality=92)
    for name, paint in DEFECTS.items():
        paint(washer(rng), rng).save(out_dir / "test" / f"{name}.jpg", quality=92)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "pipeline/samples"))
