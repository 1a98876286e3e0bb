"""The frozen encoder: stage taps, shapes, weights resolution, fingerprints, text features."""

from __future__ import annotations

import itertools
import logging

import open_clip
import pytest
import torch

from pipeline.encoder import (
    PRESETS,
    EncoderConfig,
    EncoderFingerprint,
    evenly_spaced_taps,
    load_encoder,
    register_model_configs,
)
from pipeline.errors import ConfigError, WeightsError
from pipeline.prompts import PromptEnsemble, TextFeatures


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_taps_four_evenly_spaced_blocks(preset: str) -> None:
    register_model_configs()
    config = open_clip.get_model_config(PRESETS[preset].model_name)
    assert config is not None, f"{preset}: open_clip has no config for its model"
    depth = config["vision_cfg"]["layers"]
    taps = evenly_spaced_taps(depth, 4)
    assert taps[-1] == depth
    assert len(set(taps)) == 4
    assert all(later - earlier == depth // 4 for earlier, later in itertools.pairwise(taps))


def test_anomalygpt_preset_taps_blocks_8_16_24_32() -> None:
    assert PRESETS["anomalygpt"].model_name == "ViT-H-14"
    assert evenly_spaced_taps(32, 4) == (8, 16, 24, 32)


def test_tiny_encoder_shapes(tiny_encoder) -> None:
    pixels = torch.zeros(2, 224, 224, 3, dtype=torch.uint8).numpy()
    output = tiny_encoder(tiny_encoder.to_pixels(pixels))
    assert len(output.patch_tokens) == 4
    for tokens in output.patch_tokens:
        assert tokens.shape == (2, 256, tiny_encoder.vision_width)  # 16 x 16 patches, CLS dropped
    assert output.image_embeddings.shape == (2, tiny_encoder.embed_dim)
    norms = output.image_embeddings.norm(dim=-1)
    assert torch.allclose(norms, torch.ones(2), atol=1e-5)
    assert not any(parameter.requires_grad for parameter in tiny_encoder.parameters())
    assert not tiny_encoder.clip.training


def test_random_weights_are_seeded_and_fingerprinted() -> None:
    first = load_encoder(EncoderConfig(seed=3), device="cpu")
    second = load_encoder(EncoderConfig(seed=3), device="cpu")
    other = load_encoder(EncoderConfig(seed=4), device="cpu")
    weight = "clip.visual.conv1.weight"
    assert torch.equal(first.state_dict()[weight], second.state_dict()[weight])
    assert not torch.equal(first.state_dict()[weight], other.state_dict()[weight])
    assert first.fingerprint.weights == "random:3"
    assert first.fingerprint.tap_blocks == (2, 4, 6, 8)
    assert first.fingerprint.differences(other.fingerprint) == ["weights random:3 vs random:4"]


def test_random_weights_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.encoder"):
        load_encoder(EncoderConfig(), device="cpu")
    warnings = [record for record in caplog.records if "random weights" in record.getMessage()]
    assert len(warnings) == 1


def test_fingerprint_round_trips_through_a_dict() -> None:
    fingerprint = EncoderFingerprint("ViT-H-14", "sha256:" + "ab" * 32, (8, 16, 24, 32), 224)
    assert EncoderFingerprint.from_dict(fingerprint.to_dict()) == fingerprint
    assert "ViT-H-14" in str(fingerprint)


def test_missing_weight_file_is_one_line_naming_it(tmp_path) -> None:
    missing = tmp_path / "open_clip_model.safetensors"
    with pytest.raises(WeightsError) as error:
        load_encoder(EncoderConfig(preset="vit-b-16", weights=str(missing)), device="cpu")
    message = str(error.value)
    assert str(missing) in message and "\n" not in message


def test_uncached_pretrained_tag_says_how_to_supply_weights(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(WeightsError) as error:
        load_encoder(EncoderConfig(preset="vit-b-16"), device="cpu")
    message = str(error.value)
    assert "--weights" in message and "nothing is downloaded" in message and "\n" not in message


def test_unknown_tag_lists_known_ones() -> None:
    with pytest.raises(WeightsError, match=r"known: .*openai"):
        load_encoder(EncoderConfig(preset="vit-b-16", weights="no-such-tag"), device="cpu")


def test_weights_file_for_another_model_is_refused(tmp_path) -> None:
    tiny = load_encoder(EncoderConfig(), device="cpu")
    path = tmp_path / "tiny.pt"
    torch.save(tiny.clip.state_dict(), path)
    with pytest.raises(WeightsError, match="cannot load as ViT-B-16 weights"):
        load_encoder(EncoderConfig(preset="vit-b-16", weights=str(path)), device="cpu")


def test_weights_file_loads_and_is_fingerprinted_by_sha256(tmp_path) -> None:
    source = load_encoder(EncoderConfig(seed=7), device="cpu")
    path = tmp_path / "tiny.pt"
    torch.save(source.clip.state_dict(), path)
    loaded = load_encoder(EncoderConfig(weights=str(path)), device="cpu")
    assert loaded.fingerprint.weights.startswith("sha256:")
    weight = "clip.visual.conv1.weight"
    assert torch.equal(loaded.state_dict()[weight], source.state_dict()[weight])


def test_unknown_preset_and_model_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="unknown encoder preset"):
        EncoderConfig(preset="huge")
    with pytest.raises(ConfigError, match="unknown open_clip model"):
        load_encoder(EncoderConfig(model_name="ViT-Nope"), device="cpu")


def test_text_features_are_normalised_and_cached(tiny_encoder) -> None:
    features = TextFeatures(tiny_encoder)
    washer = features("washer")
    assert washer.shape == (2, tiny_encoder.embed_dim)
    assert torch.allclose(washer.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert features("washer") is washer
    assert not torch.equal(features("bottle"), washer)
    assert features.batch(["washer", "bottle", None]).shape == (3, 2, tiny_encoder.embed_dim)


def test_prompt_ensemble_crosses_states_and_templates() -> None:
    ensemble = PromptEnsemble(("{}", "flawless {}"), ("broken {}",), ("a photo of a {}.",))
    normal, abnormal = ensemble.sentences("washer")
    assert normal == ["a photo of a washer.", "a photo of a flawless washer."]
    assert abnormal == ["a photo of a broken washer."]
