"""The prompt learner: an anomaly map becomes soft prompt embeddings for the LLM.

AnomalyGPT feeds the LLM n1 = 9 learned base prompts and n2 = 9 prompts computed from the
localisation map by a small CNN, all of the LLM's hidden size; the CNN reduces the 224 x 224 map to
a 3 x 3 grid, one embedding per grid cell, which is why the answers can name locations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAP_SIZE = 224
NUM_BASE_PROMPTS = 9
NUM_MAP_PROMPTS = 9


def _conv_block(channels_in: int, channels_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels_in, channels_out, kernel_size=3, padding=1),
        nn.BatchNorm2d(channels_out),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class PromptLearner(nn.Module):
    """(B, 224, 224) anomaly maps -> (B, 18, hidden): 9 base prompts, then 9 map prompts."""

    def __init__(self, hidden_size: int, channels: tuple[int, ...] = (8, 32, 64, 128, 256)) -> None:
        super().__init__()
        widths = (1, *channels)
        # Five halvings take 224 to 7; a valid 5 x 5 convolution then leaves the 3 x 3 grid.
        self.map_encoder = nn.Sequential(
            *(_conv_block(widths[i], widths[i + 1]) for i in range(len(channels))),
            nn.Conv2d(widths[-1], hidden_size, kernel_size=5),
        )
        self.base_prompts = nn.Parameter(torch.randn(NUM_BASE_PROMPTS, hidden_size) * 0.02)

    @property
    def num_prompts(self) -> int:
        return NUM_BASE_PROMPTS + NUM_MAP_PROMPTS

    def forward(self, anomaly_maps: torch.Tensor) -> torch.Tensor:
        batch = anomaly_maps.shape[0]
        maps = anomaly_maps.reshape(batch, 1, *anomaly_maps.shape[-2:])  # (B, 1, S, S)
        if maps.shape[-1] != MAP_SIZE or maps.shape[-2] != MAP_SIZE:
            maps = F.interpolate(
                maps, size=(MAP_SIZE, MAP_SIZE), mode="bilinear", align_corners=True
            )
        weight = self.base_prompts
        grid = self.map_encoder(maps.to(weight.device, weight.dtype))  # (B, hidden, 3, 3)
        map_prompts = grid.flatten(2).transpose(1, 2)  # (B, 9, hidden)
        base = self.base_prompts.unsqueeze(0).expand(batch, -1, -1)  # (B, 9, hidden)
        return torch.cat([base, map_prompts], dim=1)  # (B, 18, hidden)
