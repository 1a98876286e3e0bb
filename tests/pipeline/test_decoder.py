"""The zero-shot map (Eq. 1) on hand-made cases."""

from __future__ import annotations

import pytest
import torch

from pipeline.decoder import LOGIT_SCALE, ZeroShotDecoder, tokens_to_grid


def identity_decoder(width: int, stages: int) -> ZeroShotDecoder:
    decoder = ZeroShotDecoder(width, width, stages)
    with torch.no_grad():
        for projection in decoder.projections:
            projection.weight.copy_(torch.eye(width))
            projection.bias.zero_()
    return decoder


def test_map_follows_which_text_feature_each_patch_matches() -> None:
    # Text features: normal = e0, abnormal = e1. Patch 5 points at "abnormal", the rest at "normal".
    text = torch.eye(2, 4)  # (2, C)
    tokens = torch.zeros(1, 16, 4)
    tokens[0, :, 0] = 1.0
    tokens[0, 5] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    decoder = identity_decoder(4, 1)

    with torch.no_grad():
        (probabilities,) = decoder.stage_probabilities([tokens], text)
    assert probabilities.shape == (1, 2, 4, 4)
    abnormal = probabilities[0, 1]
    expected_high = torch.softmax(torch.tensor([0.0, LOGIT_SCALE]), 0)[1]
    assert float(abnormal[1, 1]) == pytest.approx(float(expected_high))  # patch 5 = row 1, column 1
    assert abnormal.flatten()[torch.arange(16) != 5].max() < 1e-6
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(1, 4, 4))


def test_map_is_the_mean_of_stages_upsampled_with_aligned_corners() -> None:
    text = torch.eye(2, 4)
    normal_tokens = torch.zeros(1, 4, 4)
    normal_tokens[..., 0] = 1.0
    abnormal_tokens = torch.zeros(1, 4, 4)
    abnormal_tokens[..., 1] = 1.0
    decoder = identity_decoder(4, 2)

    anomaly_map = decoder([normal_tokens, abnormal_tokens], text, image_size=8)
    assert anomaly_map.shape == (1, 8, 8)
    assert torch.allclose(anomaly_map, torch.full((1, 8, 8), 0.5), atol=1e-6)
    assert anomaly_map.min() >= 0.0 and anomaly_map.max() <= 1.0


def test_per_image_text_features() -> None:
    decoder = identity_decoder(4, 1)
    tokens = torch.zeros(2, 4, 4)
    tokens[..., 1] = 1.0
    text = torch.stack([torch.eye(2, 4), torch.eye(2, 4).flip(0)])  # image 1 swaps the two sides
    anomaly_map = decoder([tokens], text, image_size=2)
    assert anomaly_map[0].min() > 0.99 and anomaly_map[1].max() < 0.01


def test_shapes_on_the_tiny_encoder(tiny_encoder, normal_images) -> None:
    from pipeline.prompts import TextFeatures

    output = tiny_encoder.encode_images(normal_images[:2])
    decoder = ZeroShotDecoder(tiny_encoder.vision_width, tiny_encoder.embed_dim, 4)
    anomaly_map = decoder(output.patch_tokens, TextFeatures(tiny_encoder)("washer"), 224)
    assert anomaly_map.shape == (2, 224, 224)
    assert anomaly_map.dtype == torch.float32


def test_projections_are_seeded() -> None:
    first, second = ZeroShotDecoder(8, 4, 2, seed=1), ZeroShotDecoder(8, 4, 2, seed=1)
    assert torch.equal(first.projections[1].weight, second.projections[1].weight)


def test_stage_count_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="2 stages of patch tokens for a 4-stage decoder"):
        ZeroShotDecoder(4, 4, 4).stage_probabilities([torch.zeros(1, 4, 4)] * 2, torch.eye(2, 4))


def test_non_square_token_count_is_refused() -> None:
    with pytest.raises(ValueError, match="do not form a square grid"):
        tokens_to_grid(torch.zeros(1, 10, 1))
