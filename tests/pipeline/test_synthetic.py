"""Synthetic anomalies: seeded, fast, and masked where the image visibly changed."""

from __future__ import annotations

import time

import numpy as np
import pytest
from PIL import Image

from pipeline.synthetic import (
    MIN_MASK_FRACTION,
    SYNTHETIC_KINDS,
    SyntheticDataset,
    make_anomaly,
    visible_mask,
)


@pytest.fixture(scope="module")
def dataset(normal_images: list[Image.Image]) -> SyntheticDataset:
    return SyntheticDataset(normal_images, seed=3, normal_fraction=0.25, length=24, image_size=224)


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_each_kind_changes_the_image_where_its_mask_is(
    kind: str, normal_images: list[Image.Image]
) -> None:
    rng = np.random.default_rng(0)
    for _ in range(5):
        sample = make_anomaly(normal_images[0], normal_images[1:], rng, kind)
        original = np.asarray(normal_images[0], dtype=np.int16)
        changed = np.abs(np.asarray(sample.image, dtype=np.int16) - original).max(axis=2)

        assert sample.anomalous and sample.kind in (kind, "noise")
        assert sample.mask.dtype == bool and sample.mask.shape == (256, 256)
        assert sample.mask.mean() >= MIN_MASK_FRACTION
        assert changed[sample.mask].mean() > 20  # the masked pixels really changed
        assert changed[~sample.mask].mean() < changed[sample.mask].mean() / 4


def test_the_mask_is_the_visible_change_not_the_pasted_rectangle() -> None:
    """A flat patch cloned onto the same flat grey changes nothing, so it cannot be the anomaly:
    NSA gives up on it and paints a noise blob instead."""
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    sample = make_anomaly(grey, [grey], np.random.default_rng(1), "nsa")
    assert sample.kind == "noise" and sample.mask.any()


def test_visible_mask_ignores_an_unchanged_image(normal_images: list[Image.Image]) -> None:
    original = np.asarray(normal_images[0])
    everywhere = np.ones(original.shape[:2], dtype=bool)
    assert not visible_mask(original, original.copy(), everywhere).any()


def test_samples_are_deterministic_per_index(
    dataset: SyntheticDataset, normal_images: list[Image.Image]
) -> None:
    again = SyntheticDataset(normal_images, seed=3, normal_fraction=0.25, length=24, image_size=224)
    for index in (0, 5, 17):
        first, second = dataset[index], again[index]
        assert first.kind == second.kind
        assert np.array_equal(first.mask, second.mask)
        assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    other_seed = SyntheticDataset(normal_images, seed=4, normal_fraction=0.0, length=24)
    assert not np.array_equal(other_seed[1].mask, dataset[1].mask)


def test_dataset_mixes_normal_and_every_kind(dataset: SyntheticDataset) -> None:
    samples = list(dataset)
    assert len(samples) == 24
    kinds = {sample.kind for sample in samples}
    assert kinds == {"normal", *SYNTHETIC_KINDS}
    for sample in samples:
        assert sample.image.size == (224, 224) and sample.mask.shape == (224, 224)
        assert sample.mask.any() == sample.anomalous
    with pytest.raises(IndexError):
        dataset[24]


def test_normal_fraction_bounds(normal_images: list[Image.Image]) -> None:
    normal = SyntheticDataset(normal_images, normal_fraction=1.0, length=4)
    assert all(not sample.anomalous and not sample.mask.any() for sample in normal)
    anomalous = SyntheticDataset(normal_images, normal_fraction=0.0, length=4)
    assert all(sample.anomalous for sample in anomalous)
    with pytest.raises(ValueError, match="normal fraction"):
        SyntheticDataset(normal_images, normal_fraction=1.5)
    with pytest.raises(ValueError, match="kinds"):
        SyntheticDataset(normal_images, kinds=("scratch",))
    with pytest.raises(ValueError, match="unknown synthetic anomaly kind"):
        make_anomaly(normal_images[0], [], np.random.default_rng(0), "scratch")


def test_samples_take_milliseconds(normal_images: list[Image.Image]) -> None:
    dataset = SyntheticDataset(
        normal_images, seed=0, normal_fraction=0.0, length=30, image_size=224
    )
    started = time.perf_counter()
    for index in range(len(dataset)):
        dataset[index]
    per_sample = (time.perf_counter() - started) / len(dataset)
    assert per_sample < 0.1, f"{per_sample * 1000:.0f} ms per synthetic sample"
