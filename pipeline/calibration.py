"""Choosing the anomaly threshold of a product from its own images."""

from __future__ import annotations

import torch


def threshold_from_normal_scores(scores: torch.Tensor) -> float:
    """A threshold above every normal score, with a margin as wide as their upper spread.

    `scores` are image scores of normal images that were not in the bank they were matched
    against (leave-one-out), so they sample what a new good part scores. The threshold is
    max + (max - median): scale-free, and wider when the normals disagree more.
    """
    if scores.numel() == 0:
        raise ValueError("calibration needs at least one normal score")
    highest = float(scores.max())
    return highest + (highest - float(scores.median()))
