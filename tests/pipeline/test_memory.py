"""Few-shot memory banks and the few-shot map (Eq. 2) on hand-made cases."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import BankError
from pipeline.memory import (
    MemoryBank,
    build_bank,
    fewshot_anomaly_map,
    greedy_coreset,
    leave_one_out_maps,
    nearest_similarity,
    rotations,
)


def random_tokens(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_query_equal_to_the_bank_gives_a_zero_map() -> None:
    query = [random_tokens(2, 16, 8, seed=stage) for stage in range(4)]
    bank = [tokens.reshape(-1, 8) * 3.0 for tokens in query]  # scale must not matter (cosine)
    anomaly_map = fewshot_anomaly_map(query, bank, image_size=32)
    assert anomaly_map.shape == (2, 32, 32)
    assert anomaly_map.abs().max() < 1e-5


def test_one_altered_patch_holds_the_maximum() -> None:
    grid, channels = 4, 16
    normal = random_tokens(1, grid * grid, channels, seed=1)
    query = normal.clone()
    query[0, 6] = -query[0, 6]  # patch 6 = row 1, column 2: opposite of its normal self
    anomaly_map = fewshot_anomaly_map([query], [normal[0]], image_size=grid)
    # With image_size == grid and aligned corners, the map is exactly the patch grid.
    assert torch.argmax(anomaly_map[0]).item() == 6
    assert anomaly_map[0].flatten()[torch.arange(16) != 6].abs().max() < 1e-5


def test_matches_brute_force_and_averages_stages() -> None:
    query = [random_tokens(3, 9, 5, seed=2), random_tokens(3, 9, 7, seed=3)]
    bank = [random_tokens(20, 5, seed=4), random_tokens(11, 7, seed=5)]
    stage_maps = []
    for tokens, rows in zip(query, bank, strict=True):
        similarity = F.normalize(tokens, dim=-1) @ F.normalize(rows, dim=-1).T  # (B, L, N)
        stage_maps.append(1 - similarity.amax(dim=-1))
    expected = F.interpolate(
        torch.stack(stage_maps).mean(0).reshape(3, 1, 3, 3),
        size=(6, 6),
        mode="bilinear",
        align_corners=True,
    )[:, 0]
    assert torch.allclose(fewshot_anomaly_map(query, bank, image_size=6), expected, atol=1e-6)


@pytest.mark.parametrize("block", [1, 7, 64, 10**9])
def test_chunking_does_not_change_the_result(block: int) -> None:
    queries = F.normalize(random_tokens(13, 6, seed=6), dim=-1)
    bank = F.normalize(random_tokens(50, 6, seed=7), dim=-1)
    expected = (queries @ bank.T).amax(dim=1)
    result = nearest_similarity(queries, bank, max_block_elements=block)
    assert torch.allclose(result, expected, atol=1e-6)


def test_exclude_skips_a_range_of_bank_rows() -> None:
    queries = F.normalize(random_tokens(4, 6, seed=8), dim=-1)
    bank = torch.cat([queries, F.normalize(random_tokens(10, 6, seed=9), dim=-1)])
    assert torch.allclose(nearest_similarity(queries, bank), torch.ones(4))
    held_out = nearest_similarity(queries, bank, max_block_elements=8, exclude=(0, 4))
    assert torch.allclose(held_out, (queries @ bank[4:].T).amax(dim=1), atol=1e-6)


def test_bank_prepares_normalised_copies_once() -> None:
    bank = MemoryBank([random_tokens(10, 4).half(), random_tokens(6, 3).half()], threshold=0.2)
    assert bank.num_patches == (10, 6) and bank.dims == (4, 3)
    assert bank.nbytes == (40 + 18) * 2
    prepared = bank.prepared("cpu")
    assert prepared[0].dtype == torch.float32
    assert torch.allclose(prepared[0].norm(dim=-1), torch.ones(10), atol=1e-3)
    assert bank.prepared("cpu") is prepared


def test_empty_banks_are_refused() -> None:
    with pytest.raises(BankError, match="at least one stage"):
        MemoryBank([])
    with pytest.raises(BankError, match="stage 1 has shape"):
        MemoryBank([torch.ones(2, 3), torch.ones(0, 3)])
    with pytest.raises(BankError, match="at least one normal image"):
        build_bank([torch.ones(0, 4, 3)])


def test_dimension_mismatch_is_refused() -> None:
    bank = MemoryBank([torch.ones(4, 8)])
    with pytest.raises(BankError, match="8-dim patches, the query 5-dim"):
        bank.anomaly_map([torch.ones(1, 4, 5)], image_size=2)


def test_coreset_picks_distinct_rows_that_cover_the_bank() -> None:
    # Three tight clusters: a 3-point coreset must take one point from each.
    centres = torch.eye(3, 16) * 10
    points = torch.cat(
        [centre + 0.01 * random_tokens(20, 16, seed=i) for i, centre in enumerate(centres)]
    )
    chosen = greedy_coreset(points, 3, seed=0)
    assert len(set(chosen.tolist())) == 3
    assert sorted((chosen // 20).tolist()) == [0, 1, 2]


def test_coreset_ratio_shrinks_every_stage() -> None:
    tokens = [random_tokens(4, 16, 8, seed=10), random_tokens(4, 16, 6, seed=11)]
    bank = build_bank(tokens, coreset_ratio=0.25)
    assert bank.num_patches == (16, 16)
    with pytest.raises(BankError, match="outside"):
        build_bank(tokens, coreset_ratio=1.5)


def test_rotation_augmentation(tiny_encoder, normal_images) -> None:
    image = normal_images[0]
    views = rotations(image)
    assert len(views) == 4 and views[0] is image
    assert views[2].tobytes() == image.rotate(180).tobytes()

    # A rotated normal image matches a rotation-augmented bank better than a plain one.
    plain = build_bank(tiny_encoder.encode_images(normal_images[1:3]).patch_tokens)
    augmented_views = [view for normal in normal_images[1:3] for view in rotations(normal)]
    augmented = build_bank(tiny_encoder.encode_images(augmented_views).patch_tokens)
    assert augmented.num_patches[0] == 4 * plain.num_patches[0]
    query = tiny_encoder.encode_images([image.rotate(90)]).patch_tokens
    assert augmented.anomaly_map(query, 224).amax() < plain.anomaly_map(query, 224).amax()


def test_leave_one_out_never_matches_an_image_with_itself() -> None:
    tokens = [random_tokens(3, 4, 8, seed=12)]
    maps = leave_one_out_maps(tokens, views_per_image=1, image_size=2)
    assert maps.shape == (3, 2, 2)
    assert maps.min() > 0.05  # random tokens never match another image perfectly
    duplicated = [torch.cat([tokens[0][:1], tokens[0][:1]])]
    assert leave_one_out_maps(duplicated, 1, 2).abs().max() < 1e-5  # its twin is in the bank
    assert leave_one_out_maps([tokens[0][:1]], 1, 2).shape == (0, 2, 2)
