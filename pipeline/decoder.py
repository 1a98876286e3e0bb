"""The zero-shot decoder (AnomalyGPT Eq. 1): patch tokens against normal/abnormal text features."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOGIT_SCALE = 100.0


def upsample(grid_maps: torch.Tensor, image_size: int) -> torch.Tensor:
    """(B, K, g, g) -> (B, K, S, S), bilinear with aligned corners as the reference code does."""
    return F.interpolate(
        grid_maps, size=(image_size, image_size), mode="bilinear", align_corners=True
    )


def tokens_to_grid(values: torch.Tensor) -> torch.Tensor:
    """(B, L, K) per-patch values -> (B, K, g, g) on the square patch grid."""
    batch, length, channels = values.shape
    grid = math.isqrt(length)
    if grid * grid != length:
        raise ValueError(f"{length} patch tokens do not form a square grid")
    return values.transpose(1, 2).reshape(batch, channels, grid, grid)


class ZeroShotDecoder(nn.Module):
    """One learned linear map C_vis -> C_emb per stage, then cosine against the text features.

    Eq. 1: for stage i, M_i = softmax(100 * <norm(W_i F_i), [T_normal, T_abnormal]>)[abnormal],
    upsampled to the image size; the map is the mean over stages. The paper writes a sum; the mean
    keeps the map in [0, 1].
    """

    def __init__(self, vision_width: int, embed_dim: int, num_stages: int, seed: int = 0) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.projections = nn.ModuleList(
                nn.Linear(vision_width, embed_dim) for _ in range(num_stages)
            )

    def stage_probabilities(
        self,
        patch_tokens: tuple[torch.Tensor, ...] | list[torch.Tensor],
        text_features: torch.Tensor,
    ) -> list[torch.Tensor]:
        """Per-stage (normal, abnormal) probabilities on the patch grid.

        Args:
            patch_tokens: one (B, L, C_vis) tensor per stage.
            text_features: (2, C_emb) shared by the batch, or (B, 2, C_emb) per image.

        Returns:
            One (B, 2, g, g) tensor per stage, summing to 1 over dim 1.
        """
        if len(patch_tokens) != len(self.projections):
            raise ValueError(
                f"{len(patch_tokens)} stages of patch tokens for a {len(self.projections)}-stage "
                "decoder"
            )
        weight = self.projections[0].weight
        text = text_features.to(weight.device, weight.dtype).transpose(-1, -2)  # ([B,] C_emb, 2)

        stages = []
        for tokens, projection in zip(patch_tokens, self.projections, strict=True):
            projected = F.normalize(projection(tokens.to(weight.device, weight.dtype)), dim=-1)
            logits = LOGIT_SCALE * projected @ text  # (B, L, 2)
            stages.append(tokens_to_grid(logits.softmax(dim=-1)))  # (B, 2, g, g)
        return stages

    def forward(
        self,
        patch_tokens: tuple[torch.Tensor, ...] | list[torch.Tensor],
        text_features: torch.Tensor,
        image_size: int,
    ) -> torch.Tensor:
        """The zero-shot anomaly map (B, S, S) in [0, 1]."""
        stages = self.stage_probabilities(patch_tokens, text_features)
        abnormal = [upsample(stage, image_size)[:, 1] for stage in stages]  # num_stages x (B, S, S)
        return torch.stack(abnormal).mean(dim=0).float()
