"""Text features for "normal" and "abnormal": a prompt ensemble through the CLIP text tower."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.encoder import Encoder

NORMAL_STATES = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a close-up photo of a {}.",
    "a cropped photo of the {}.",
    "a bright photo of a {}.",
    "a dark photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "an industrial photo of a {}.",
    "a photo of a {} on a production line.",
    "there is a {} in the scene.",
)
DEFAULT_CLASS_NAME = "object"


@dataclass(frozen=True)
class PromptEnsemble:
    """State phrases ("{} with defect") and templates ("a photo of a {}.") to cross."""

    normal_states: tuple[str, ...] = NORMAL_STATES
    abnormal_states: tuple[str, ...] = ABNORMAL_STATES
    templates: tuple[str, ...] = TEMPLATES

    def sentences(self, class_name: str) -> tuple[list[str], list[str]]:
        """(normal sentences, abnormal sentences) for one class name."""

        def cross(states: tuple[str, ...]) -> list[str]:
            phrases = [state.format(class_name) for state in states]
            return [template.format(phrase) for phrase in phrases for template in self.templates]

        return cross(self.normal_states), cross(self.abnormal_states)


class TextFeatures:
    """Normal/abnormal text features per class name, computed once and cached."""

    def __init__(self, encoder: Encoder, ensemble: PromptEnsemble | None = None) -> None:
        self.encoder = encoder
        self.ensemble = ensemble or PromptEnsemble()
        self._cache: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    def __call__(self, class_name: str | None) -> torch.Tensor:
        """(2, C_emb) float32: row 0 normal, row 1 abnormal, each the normalised side mean."""
        name = (class_name or DEFAULT_CLASS_NAME).strip().replace("_", " ")
        with self._lock:
            if name not in self._cache:
                normal, abnormal = self.ensemble.sentences(name)
                sides = [self.encoder.encode_text(side).mean(0) for side in (normal, abnormal)]
                self._cache[name] = F.normalize(torch.stack(sides), dim=-1)  # (2, C_emb)
            return self._cache[name]

    def batch(self, class_names: list[str | None]) -> torch.Tensor:
        """(B, 2, C_emb) for a batch whose images may belong to different classes."""
        return torch.stack([self(name) for name in class_names])
