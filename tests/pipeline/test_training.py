"""Training loops on a tiny synthetic set: losses fall, the trained decoder localises better than
the untrained one, resuming continues exactly, and the explainer's checkpoint is picked up."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.checkpoint import load_checkpoint
from pipeline.detector import Detector, DetectorConfig
from pipeline.encoder import Encoder
from pipeline.errors import CheckpointError, ConfigError
from pipeline.explainer import Explainer, ExplainerConfig, Grounding
from pipeline.llm import load_llm, resolve_llm
from pipeline.metrics import pixel_auroc
from pipeline.synthetic import SyntheticDataset
from pipeline.training import (
    DecoderTrainingConfig,
    ExplainerTrainingConfig,
    answer_for_mask,
    dice_loss,
    focal_loss,
    locations_for_mask,
    train_decoder,
    train_explainer,
)

DECODER = DecoderTrainingConfig(steps=100, batch_size=6, pool_size=32, learning_rate=1e-3)
EXPLAINER = ExplainerTrainingConfig(steps=30, batch_size=4, pool_size=16, k_shot=4)


def mean_of(values: tuple[float, ...], count: int = 5) -> float:
    return float(np.mean(values[:count])), float(np.mean(values[-count:]))


@pytest.fixture(scope="module")
def trained_decoder(
    tiny_encoder: Encoder, normal_images: list[Image.Image], tmp_path_factory
) -> object:
    output = tmp_path_factory.mktemp("decoder")
    return train_decoder(tiny_encoder, normal_images[:6], output, DECODER)


@pytest.fixture(scope="module")
def tiny_llm(tiny_llm_dir: Path):
    return load_llm(str(tiny_llm_dir))


# Losses and answers -----------------------------------------------------------------------------


def test_focal_and_dice_losses_on_hand_cases() -> None:
    masks = torch.zeros(1, 4, 4)
    masks[0, :2, :2] = 1
    perfect = torch.stack([1 - masks, masks], dim=1)  # (1, 2, 4, 4)
    assert focal_loss(perfect, masks) < 1e-6
    assert dice_loss(perfect[:, 1], masks) == pytest.approx(0.0)
    # A normal image with zero abnormal probability: dice (0 + 1) / (0 + 0 + 1) = 1, loss 0.
    assert dice_loss(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4)) == pytest.approx(0.0)
    # Everything at p = 0.5: focal (0.5)^2 * log 2 per pixel.
    half = torch.full((1, 2, 4, 4), 0.5)
    assert focal_loss(half, masks) == pytest.approx(0.25 * np.log(2), rel=1e-5)


def test_answers_come_from_the_mask_regions() -> None:
    mask = np.zeros((90, 90), dtype=bool)
    assert answer_for_mask(mask) == "No, there is no anomaly in the image."
    mask[5:20, 5:20] = True
    assert answer_for_mask(mask) == (
        "Yes, there is an anomaly in the image, at the top left of the image."
    )
    mask[70:85, 40:50] = True
    assert answer_for_mask(mask) == (
        "Yes, there are 2 anomalies in the image, at the top left and bottom of the image."
    )
    assert locations_for_mask(mask) == {"top left", "bottom"}


# The decoder ------------------------------------------------------------------------------------


def test_decoder_loss_falls(trained_decoder) -> None:
    first, last = mean_of(trained_decoder.losses)
    assert trained_decoder.step == DECODER.steps and len(trained_decoder.losses) == DECODER.steps
    assert last < first - 0.1, f"decoder loss {first:.3f} -> {last:.3f}"


def test_trained_decoder_localises_held_out_anomalies_better(
    trained_decoder, detector: Detector, normal_images: list[Image.Image]
) -> None:
    held_out = SyntheticDataset(
        normal_images[6:], seed=99, normal_fraction=0.0, length=8, image_size=224
    )
    masks = np.stack([sample.mask for sample in held_out])
    trained = Detector(DetectorConfig(device="cpu", checkpoint=str(trained_decoder.checkpoint)))
    assert trained.has_trained_decoder

    scores = {}
    for name, model in (("untrained", detector), ("trained", trained)):
        output = model.encode(model.prepare([sample.image for sample in held_out]))
        maps = model.zero_shot_maps(output, [None] * len(held_out)).numpy()
        scores[name] = pixel_auroc(masks, maps)
    assert scores["trained"] > scores["untrained"] + 0.03, scores


def test_decoder_resume_continues_exactly(
    tiny_encoder: Encoder, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    config = DecoderTrainingConfig(steps=6, batch_size=2, pool_size=8, save_every=100)
    straight = train_decoder(tiny_encoder, normal_images[:4], tmp_path / "straight", config)

    halfway = DecoderTrainingConfig(steps=3, batch_size=2, pool_size=8, save_every=100)
    train_decoder(tiny_encoder, normal_images[:4], tmp_path / "resumed", halfway)
    resumed = train_decoder(
        tiny_encoder, normal_images[:4], tmp_path / "resumed", config, resume=True
    )
    assert (resumed.start_step, resumed.step) == (3, 6)
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-5)

    weights = [
        load_checkpoint(result.checkpoint, tiny_encoder.fingerprint).state["decoder"]
        for result in (straight, resumed)
    ]
    for name, tensor in weights[0].items():
        assert torch.allclose(tensor, weights[1][name], atol=1e-5), name
    assert (tmp_path / "resumed" / "optimizer.safetensors").is_file()


def test_time_budget_stops_with_a_checkpoint(
    tiny_encoder: Encoder, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    config = DecoderTrainingConfig(steps=50, batch_size=2, pool_size=4, max_seconds=0.0)
    result = train_decoder(tiny_encoder, normal_images[:3], tmp_path, config)
    assert result.step == 1
    checkpoint = load_checkpoint(tmp_path, tiny_encoder.fingerprint)
    assert checkpoint.extra["training"]["step"] == 1 and checkpoint.has("decoder")


def test_bad_settings_are_refused(
    tiny_encoder: Encoder, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="smaller than a batch"):
        train_decoder(
            tiny_encoder, normal_images, tmp_path, DecoderTrainingConfig(batch_size=8, pool_size=4)
        )
    with pytest.raises(CheckpointError, match="not a defectscope checkpoint"):
        train_decoder(tiny_encoder, normal_images, tmp_path / "absent", resume=True)


# The explainer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_explainer(
    detector: Detector, tiny_llm, normal_images: list[Image.Image], tmp_path_factory
) -> object:
    output = tmp_path_factory.mktemp("explainer")
    return train_explainer(detector, tiny_llm, normal_images, output, EXPLAINER)


def test_explainer_loss_falls(trained_explainer) -> None:
    first, last = mean_of(trained_explainer.losses)
    assert last < first - 0.02, f"explainer loss {first:.3f} -> {last:.3f}"


def test_explainer_checkpoint_switches_on_image_grounding(
    trained_explainer, detector: Detector, tiny_llm, tiny_llm_dir: Path
) -> None:
    checkpoint = load_checkpoint(
        trained_explainer.checkpoint, detector.encoder.fingerprint, tiny_llm.identity
    )
    assert checkpoint.has("prompt_learner") and checkpoint.has("image_projection")
    assert checkpoint.llm == tiny_llm.identity

    explainer = Explainer.from_config(
        ExplainerConfig(llm=str(tiny_llm_dir)), tiny_llm, detector.encoder.embed_dim, checkpoint
    )
    assert explainer.grounding is Grounding.IMAGE
    detector_with_it = Detector(
        DetectorConfig(
            device="cpu",
            checkpoint=str(trained_explainer.checkpoint),
            explainer=ExplainerConfig(llm=str(tiny_llm_dir)),
        )
    )
    assert detector_with_it.explainer().grounding is Grounding.IMAGE


def test_explainer_resume_continues_exactly(
    detector: Detector, tiny_llm, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    config = ExplainerTrainingConfig(steps=4, batch_size=2, pool_size=4, k_shot=4)
    straight = train_explainer(detector, tiny_llm, normal_images, tmp_path / "straight", config)
    halfway = ExplainerTrainingConfig(steps=2, batch_size=2, pool_size=4, k_shot=4)
    train_explainer(detector, tiny_llm, normal_images, tmp_path / "resumed", halfway)
    resumed = train_explainer(
        detector, tiny_llm, normal_images, tmp_path / "resumed", config, resume=True
    )
    assert (resumed.start_step, resumed.step) == (2, 4)
    assert resumed.losses == pytest.approx(straight.losses, abs=1e-5)


def test_explainer_needs_images_outside_its_bank(
    detector: Detector, tiny_llm, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="more than k_shot = 4"):
        train_explainer(detector, tiny_llm, normal_images[:4], tmp_path, EXPLAINER)


# peft asks transformers a question transformers has deprecated; nothing of ours to change.
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_lora_adapters_train_and_merge_into_a_loadable_llm(
    detector: Detector, tiny_llm_dir: Path, normal_images: list[Image.Image], tmp_path: Path
) -> None:
    llm = load_llm(str(tiny_llm_dir))  # LoRA changes the model in place: a private copy
    config = ExplainerTrainingConfig(steps=20, batch_size=4, pool_size=8, k_shot=4, lora_rank=4)
    result = train_explainer(detector, llm, normal_images, tmp_path, config)
    first, last = mean_of(result.losses)
    assert last < first - 0.1, f"LoRA loss {first:.3f} -> {last:.3f}"

    merged = tmp_path / "llm"
    assert (merged / "config.json").is_file() and (tmp_path / "lora").is_dir()
    checkpoint = load_checkpoint(tmp_path, detector.encoder.fingerprint)
    assert checkpoint.llm == resolve_llm(str(merged))[1]
    reloaded = load_llm(str(merged))
    assert not any("lora" in name for name, _ in reloaded.model.named_parameters())
