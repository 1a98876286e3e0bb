"""Few-shot memory banks of normal patch tokens, and the few-shot map (AnomalyGPT Eq. 2).

For each query patch, the anomaly is 1 - its largest cosine similarity to the bank of the same
stage; stages are averaged on the patch grid and upsampled. Matching is exact: a chunked matmul
whose similarity blocks never exceed `max_block_elements`, so memory stays bounded for any bank.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.decoder import tokens_to_grid, upsample
from pipeline.errors import BankError

MAX_BLOCK_ELEMENTS = 2**18
"""Largest similarity block computed at once (1 MiB in float32, 1,024 bank rows for a frame's 256
patches): small enough to stay in cache while it is reduced, large enough to keep the matmul
efficient (bench/memory_bank.py measured larger blocks slower). Any bank size fits in bounded
memory."""
QUERY_CHUNK = 2048
"""Most query patches matched at once."""


def nearest_similarity(
    queries: torch.Tensor,
    bank: torch.Tensor,
    max_block_elements: int = MAX_BLOCK_ELEMENTS,
    exclude: tuple[int, int] | None = None,
) -> torch.Tensor:
    """The largest inner product of each query with any bank row (cosine when both are normalised).

    Args:
        queries: (M, C).
        bank: (N, C), same device and dtype as `queries`.
        max_block_elements: bound on the (queries x bank rows) block held at once.
        exclude: a [start, stop) range of bank rows to ignore (leave-one-out calibration).

    Returns:
        (M,) float32.

    Note:
        The cost is one (M x C) x (C x N) GEMM, as for faiss's IndexFlatIP; on the CPU the BLAS
        decides. TODO(#2): on AMD Zen 4, torch's MKL sgemm runs about 10% behind the OpenBLAS
        that faiss bundles (bench/memory_bank.py); an OpenBLAS-backed CPU path would close it.
    """
    num_queries, num_rows = queries.shape[0], bank.shape[0]
    query_chunk = max(1, min(num_queries, QUERY_CHUNK, max_block_elements))
    bank_chunk = max(1, min(num_rows, max_block_elements // query_chunk))
    best = torch.full((num_queries,), -math.inf, device=queries.device, dtype=torch.float32)
    block = queries.new_empty(query_chunk * bank_chunk)  # reused for every similarity block

    for query_start in range(0, num_queries, query_chunk):
        block_queries = queries[query_start : query_start + query_chunk]
        block_best = best[query_start : query_start + query_chunk]
        for row_start in range(0, num_rows, bank_chunk):
            row_stop = min(num_rows, row_start + bank_chunk)
            rows = bank[row_start:row_stop]
            similarity = block[: len(block_queries) * len(rows)].view(len(block_queries), len(rows))
            torch.mm(block_queries, rows.T, out=similarity)  # (m, n)
            if exclude is not None:
                low, high = max(exclude[0], row_start), min(exclude[1], row_stop)
                if low < high:
                    similarity[:, low - row_start : high - row_start] = -math.inf
            torch.maximum(block_best, similarity.amax(dim=1).float(), out=block_best)
    return best


def fewshot_anomaly_map(
    query_tokens: Sequence[torch.Tensor],
    bank_tokens: Sequence[torch.Tensor],
    image_size: int,
) -> torch.Tensor:
    """The few-shot anomaly map of Eq. 2.

    Args:
        query_tokens: one (B, L, C_i) tensor per stage; L a square number.
        bank_tokens: one (N_i, C_i) tensor per stage, not necessarily normalised.
        image_size: side S of the returned map.

    Returns:
        (B, S, S) float32: per stage 1 - max cosine similarity over the bank, on the
        sqrt(L) x sqrt(L) grid, mean over stages, bilinear upsampling with aligned corners.
    """
    normalised = [F.normalize(bank.float(), dim=-1) for bank in bank_tokens]
    return _anomaly_map(query_tokens, normalised, image_size)


def _anomaly_map(
    query_tokens: Sequence[torch.Tensor],
    normalised_banks: Sequence[torch.Tensor],
    image_size: int,
    exclude: Sequence[tuple[int, int] | None] | None = None,
) -> torch.Tensor:
    if len(query_tokens) != len(normalised_banks):
        raise BankError(
            f"{len(query_tokens)} stages of query tokens against a {len(normalised_banks)}-stage "
            "bank"
        )
    exclude = exclude or [None] * len(normalised_banks)

    distances = []
    for tokens, bank, skip in zip(query_tokens, normalised_banks, exclude, strict=True):
        batch, length, channels = tokens.shape
        if bank.shape[1] != channels:
            raise BankError(f"bank has {bank.shape[1]}-dim patches, the query {channels}-dim")
        queries = F.normalize(tokens.reshape(batch * length, channels).to(bank), dim=-1)
        similarity = nearest_similarity(queries, bank, exclude=skip)  # (B * L,)
        distances.append((1.0 - similarity).reshape(batch, length, 1))

    # Bilinear upsampling is linear, so averaging on the grid first gives the same map for less.
    grid_map = tokens_to_grid(torch.stack(distances).mean(dim=0))  # (B, 1, g, g)
    return upsample(grid_map, image_size)[:, 0]  # (B, S, S)


class MemoryBank:
    """Per-stage matrices of raw normal patch tokens, with normalised copies made on demand.

    Attributes:
        stages: one (N_i, C_i) tensor per stage, as built or stored (float16 or float32).
        threshold: the calibrated image-score threshold, when calibration was possible.
    """

    def __init__(self, stages: Sequence[torch.Tensor], threshold: float | None = None) -> None:
        if not stages:
            raise BankError("a memory bank needs at least one stage")
        for index, stage in enumerate(stages):
            if stage.ndim != 2 or stage.shape[0] == 0:
                raise BankError(
                    f"memory bank stage {index} has shape {tuple(stage.shape)}; expected a "
                    "non-empty (patches, channels) matrix"
                )
        self.stages = tuple(stages)
        self.threshold = threshold
        self._prepared: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    @property
    def num_patches(self) -> tuple[int, ...]:
        return tuple(stage.shape[0] for stage in self.stages)

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(stage.shape[1] for stage in self.stages)

    @property
    def nbytes(self) -> int:
        return sum(stage.numel() * stage.element_size() for stage in self.stages)

    def prepared(
        self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, ...]:
        """Normalised stages on `device` (float32 on the CPU, float16 on a GPU), cached."""
        device = torch.device(device)
        dtype = dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        key = (device, dtype)
        if key not in self._prepared:
            self._prepared[key] = tuple(
                F.normalize(stage.to(device).float(), dim=-1).to(dtype) for stage in self.stages
            )
        return self._prepared[key]

    def anomaly_map(
        self,
        query_tokens: Sequence[torch.Tensor],
        image_size: int,
        device: torch.device | None = None,
    ) -> torch.Tensor:
        """Eq. 2 against this bank: (B, S, S) float32."""
        device = device or query_tokens[0].device
        return _anomaly_map(query_tokens, self.prepared(device), image_size)


def build_bank(
    patch_tokens: Sequence[torch.Tensor],
    coreset_ratio: float | None = None,
    seed: int = 0,
    threshold: float | None = None,
) -> MemoryBank:
    """A bank from the patch tokens of k normal images.

    Args:
        patch_tokens: one (K, L, C_i) tensor per stage (K images, or K images x 4 rotations).
        coreset_ratio: keep this fraction of each stage's patches by greedy coreset; None keeps all.
        seed: seed of the coreset's starting point and projection.
        threshold: a calibrated threshold to carry.
    """
    if not patch_tokens or patch_tokens[0].shape[0] == 0:
        raise BankError("a memory bank needs at least one normal image")
    stages = [tokens.reshape(-1, tokens.shape[-1]) for tokens in patch_tokens]  # (K * L, C_i)
    if coreset_ratio is not None:
        if not 0.0 < coreset_ratio <= 1.0:
            raise BankError(f"coreset ratio {coreset_ratio} is outside (0, 1]")
        stages = [
            stage[greedy_coreset(stage, math.ceil(coreset_ratio * len(stage)), seed)]
            for stage in stages
        ]
    return MemoryBank(stages, threshold=threshold)


def greedy_coreset(
    features: torch.Tensor, count: int, seed: int = 0, projection_dim: int = 128
) -> torch.Tensor:
    """Indices of `count` rows chosen by greedy k-centre selection (PatchCore's coreset).

    Rows are normalised first, so the cover is in the cosine geometry the matching uses, and
    projected to `projection_dim` dimensions (Johnson-Lindenstrauss) to keep selection cheap.

    Returns:
        (count,) int64 indices into `features`.
    """
    num_rows, channels = features.shape
    count = max(1, min(count, num_rows))
    generator = torch.Generator(device="cpu").manual_seed(seed)
    points = F.normalize(features.float(), dim=-1)
    if channels > projection_dim:
        projection = torch.randn(channels, projection_dim, generator=generator) / math.sqrt(
            projection_dim
        )
        points = points @ projection.to(points.device)  # (N, projection_dim)

    selected = torch.empty(count, dtype=torch.long)
    selected[0] = int(torch.randint(num_rows, (1,), generator=generator))
    min_distance = torch.linalg.vector_norm(points - points[selected[0]], dim=1)  # (N,)
    for step in range(1, count):
        selected[step] = int(torch.argmax(min_distance))
        distance = torch.linalg.vector_norm(points - points[selected[step]], dim=1)
        torch.minimum(min_distance, distance, out=min_distance)
    return selected


def rotations(image: Image.Image) -> list[Image.Image]:
    """The image at 0, 90, 180 and 270 degrees: AnomalyGPT's x4 bank augmentation."""
    return [image] + [image.rotate(angle, expand=True) for angle in (90, 180, 270)]


def leave_one_out_maps(
    patch_tokens: Sequence[torch.Tensor],
    views_per_image: int,
    image_size: int,
    max_held_out: int = 8,
) -> torch.Tensor:
    """Maps of normal images, each matched against a bank of the other images.

    These are honest normal maps (an image is never in its own bank), from which a threshold is
    calibrated without any defect samples.

    Args:
        patch_tokens: one (K * V, L, C_i) tensor per stage, the V views of each image adjacent.
        views_per_image: V (1, or 4 with rotation augmentation); only the first view is queried.
        image_size: side S of the maps.
        max_held_out: how many images to hold out at most (the first ones).

    Returns:
        (min(K, max_held_out), S, S) float32; empty when K < 2.
    """
    total, length = patch_tokens[0].shape[:2]
    num_images = total // views_per_image
    if num_images < 2:
        return torch.empty(0, image_size, image_size)
    banks = [
        F.normalize(tokens.reshape(-1, tokens.shape[-1]).float(), dim=-1) for tokens in patch_tokens
    ]

    maps = []
    for image in range(min(num_images, max_held_out)):
        first = image * views_per_image
        skip = (first * length, (first + views_per_image) * length)  # this image's bank rows
        query = [tokens[first : first + 1] for tokens in patch_tokens]  # (1, L, C_i) each
        maps.append(_anomaly_map(query, banks, image_size, exclude=[skip] * len(banks))[0])
    return torch.stack(maps)
