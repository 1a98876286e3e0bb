"""The frozen open_clip ViT: patch tokens at four stage taps, and the final image embedding.

AnomalyGPT reads the patch tokens of ImageBind-Huge's vision tower (OpenCLIP ViT-H-14) after four
evenly spaced blocks; `Encoder` does the same for any open_clip ViT. Weights are only ever read from
local files: a path, or an open_clip pretrained tag whose file already sits in the local Hugging
Face cache. Nothing is downloaded.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.cache import file_sha256
from pipeline.errors import ConfigError, WeightsError
from pipeline.images import square_pixels

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "configs"
RANDOM_WEIGHTS = "random"


@dataclass(frozen=True)
class EncoderPreset:
    """A named encoder choice: an open_clip architecture and where its weights usually come from."""

    model_name: str
    pretrained_tag: str | None
    summary: str


PRESETS: dict[str, EncoderPreset] = {
    "anomalygpt": EncoderPreset(
        "ViT-H-14", "laion2b_s32b_b79k", "the vision tower ImageBind-Huge uses (the paper's)"
    ),
    "vit-l-14-336": EncoderPreset("ViT-L-14-336", "openai", "OpenAI CLIP ViT-L/14 at 336 px"),
    "vit-b-16": EncoderPreset("ViT-B-16", "openai", "OpenAI CLIP ViT-B/16, a light real encoder"),
    "tiny": EncoderPreset("defectscope-tiny", None, "8-block ViT, seeded random weights"),
}


@dataclass(frozen=True)
class EncoderConfig:
    """Which encoder to build and from which weights."""

    preset: str = "tiny"
    """A key of `PRESETS`; sets the model name and the default weights."""
    model_name: str | None = None
    """Any open_clip ViT model name; overrides the preset's."""
    weights: str | None = None
    """A checkpoint file, an open_clip pretrained tag already in the local cache, or "random".
    None takes the preset's tag (or random weights for the tiny preset)."""
    seed: int = 0
    """Seed for random weights."""
    num_taps: int = 4
    """How many evenly spaced blocks to tap."""
    tap_blocks: tuple[int, ...] | None = None
    """Explicit 1-based block numbers to tap; overrides `num_taps`."""

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError(
                f"unknown encoder preset {self.preset!r}; choose one of {', '.join(PRESETS)}"
            )

    @property
    def resolved_model_name(self) -> str:
        return self.model_name or PRESETS[self.preset].model_name


@dataclass(frozen=True)
class EncoderFingerprint:
    """What makes two encoders produce the same features; banks and checkpoints record it."""

    model_name: str
    weights: str
    """"sha256:<hex>" of the weights file, or "random:<seed>"."""
    tap_blocks: tuple[int, ...]
    image_size: int

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tap_blocks": list(self.tap_blocks)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderFingerprint:
        return cls(
            model_name=str(data["model_name"]),
            weights=str(data["weights"]),
            tap_blocks=tuple(int(block) for block in data["tap_blocks"]),
            image_size=int(data["image_size"]),
        )

    def differences(self, other: EncoderFingerprint) -> list[str]:
        """Human-readable field differences, `self` first."""
        mine, theirs = self.to_dict(), other.to_dict()
        return [f"{key} {mine[key]} vs {theirs[key]}" for key in mine if mine[key] != theirs[key]]

    def __str__(self) -> str:
        weights = self.weights if len(self.weights) <= 20 else self.weights[:19] + "…"
        taps = ",".join(map(str, self.tap_blocks))
        return f"{self.model_name} ({weights}, blocks {taps}, {self.image_size} px)"


class EncoderOutput(NamedTuple):
    """What the encoder hands to the decoder and the memory bank."""

    patch_tokens: tuple[torch.Tensor, ...]
    """One (B, L, C_vis) tensor per tapped block; CLS token dropped."""
    image_embeddings: torch.Tensor
    """(B, C_emb), L2-normalised."""


@dataclass(frozen=True)
class _Normalisation:
    mean: tuple[float, ...] = field(default=(0.48145466, 0.4578275, 0.40821073))
    std: tuple[float, ...] = field(default=(0.26862954, 0.26130258, 0.27577711))


class Encoder(nn.Module):
    """A frozen open_clip model: the vision tower for stage taps, the text tower for prompts."""

    def __init__(
        self,
        clip: nn.Module,
        fingerprint: EncoderFingerprint,
        tokenizer: Any,
        normalisation: _Normalisation,
    ) -> None:
        super().__init__()
        self.clip = clip.eval().requires_grad_(False)
        self.fingerprint = fingerprint
        self.tokenizer = tokenizer
        self.register_buffer("mean", torch.tensor(normalisation.mean).view(1, 3, 1, 1), False)
        self.register_buffer("std", torch.tensor(normalisation.std).view(1, 3, 1, 1), False)

    @property
    def image_size(self) -> int:
        return self.fingerprint.image_size

    @property
    def patch_size(self) -> int:
        return int(self.clip.visual.patch_size[0])

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_stages(self) -> int:
        return len(self.fingerprint.tap_blocks)

    @property
    def vision_width(self) -> int:
        return int(self.clip.visual.transformer.width)

    @property
    def embed_dim(self) -> int:
        return int(self.clip.visual.output_dim)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    def resize(self, image: Image.Image) -> np.ndarray:
        """An RGB image as the encoder's square input, (S, S, 3) uint8 (`square_pixels`)."""
        return square_pixels(image, self.image_size)

    def to_pixels(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(B, S, S, 3) uint8 -> normalised (B, 3, S, S) on the encoder's device and dtype."""
        pixels = torch.as_tensor(images).to(self.device)
        pixels = pixels.permute(0, 3, 1, 2).float() / 255.0  # (B, 3, S, S)
        pixels = (pixels - self.mean) / self.std
        return pixels.to(self.dtype)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        """Runs the vision tower on normalised pixels (B, 3, S, S)."""
        indices = [block - 1 for block in self.fingerprint.tap_blocks]
        output = self.clip.visual.forward_intermediates(pixels, indices=indices, output_fmt="NLC")
        patch_tokens = tuple(output["image_intermediates"])  # num_stages x (B, L, C_vis)
        image_embeddings = F.normalize(output["image_features"].float(), dim=-1)  # (B, C_emb)
        return EncoderOutput(patch_tokens, image_embeddings)

    def encode_images(self, images: list[Image.Image]) -> EncoderOutput:
        """Resizes, normalises and encodes RGB images."""
        batch = np.stack([self.resize(image) for image in images])  # (B, S, S, 3)
        return self(self.to_pixels(batch))

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Text-tower features (T, C_emb), L2-normalised, in float32."""
        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(self.clip.encode_text(tokens).float(), dim=-1)


def evenly_spaced_taps(depth: int, num_taps: int) -> tuple[int, ...]:
    """1-based blocks (depth / n, 2 depth / n, ..., depth): 8, 16, 24, 32 for 32 blocks."""
    if not 1 <= num_taps <= depth:
        raise ConfigError(f"cannot tap {num_taps} of a {depth}-block ViT")
    return tuple(round(depth * (tap + 1) / num_taps) for tap in range(num_taps))


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU that has it, float32 on the CPU (where half precision is slow)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_encoder(
    config: EncoderConfig,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Encoder:
    """Builds a frozen encoder from local weights (never downloads)."""
    register_model_configs()
    model_name = config.resolved_model_name
    if open_clip.get_model_config(model_name) is None:
        raise ConfigError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)

    weights_file, weights_id = _resolve_weights(model_name, config)
    if weights_file is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            clip = open_clip.create_model(model_name, pretrained=None)
        logger.warning(
            "encoder %s has random weights (seed %d): few-shot matching works, zero-shot maps "
            "and explanations are not meaningful",
            model_name,
            config.seed,
        )
    else:
        try:
            clip = open_clip.create_model(model_name, pretrained=str(weights_file))
        except (RuntimeError, KeyError, ValueError, OSError, AssertionError) as error:
            first_line = str(error).strip().splitlines()[0][:200]
            raise WeightsError(
                f"{weights_file}: cannot load as {model_name} weights ({first_line})"
            ) from error
        logger.info("encoder %s weights loaded from %s", model_name, weights_file)

    visual = clip.visual
    if not hasattr(visual, "forward_intermediates") or not hasattr(visual, "transformer"):
        raise ConfigError(f"{model_name} is not an open_clip ViT; defectscope needs a ViT")
    depth = len(visual.transformer.resblocks)
    taps = config.tap_blocks or evenly_spaced_taps(depth, config.num_taps)
    if any(not 1 <= block <= depth for block in taps):
        raise ConfigError(f"tap blocks {taps} outside 1..{depth} for {model_name}")

    image_size = int(visual.image_size[0])
    fingerprint = EncoderFingerprint(model_name, weights_id, tuple(taps), image_size)
    preprocess = getattr(visual, "preprocess_cfg", {}) or {}
    normalisation = _Normalisation(
        tuple(preprocess.get("mean", _Normalisation.mean)),
        tuple(preprocess.get("std", _Normalisation.std)),
    )
    clip = clip.to(device=device, dtype=dtype)
    return Encoder(clip, fingerprint, open_clip.get_tokenizer(model_name), normalisation).to(device)


def describe_encoder(config: EncoderConfig) -> tuple[EncoderFingerprint, int]:
    """(fingerprint, embedding dimension) of the encoder `config` builds, without building it.

    Lets a process that never runs the encoder (the explainer) check checkpoints against it.
    """
    register_model_configs()
    model_name = config.resolved_model_name
    model_config = open_clip.get_model_config(model_name)
    if model_config is None:
        raise ConfigError(f"unknown open_clip model {model_name!r} (see open_clip.list_models())")
    _, weights_id = _resolve_weights(model_name, config)
    vision = model_config["vision_cfg"]
    taps = config.tap_blocks or evenly_spaced_taps(int(vision["layers"]), config.num_taps)
    image_size = vision["image_size"]
    image_size = int(image_size[0] if isinstance(image_size, list | tuple) else image_size)
    return EncoderFingerprint(model_name, weights_id, tuple(taps), image_size), int(
        model_config["embed_dim"]
    )


@cache
def register_model_configs() -> None:
    """Makes the model configs shipped in pipeline/configs (the tiny preset) known to open_clip."""
    open_clip.add_model_config(CONFIG_DIR)


def _resolve_weights(model_name: str, config: EncoderConfig) -> tuple[Path | None, str]:
    """(file to load or None for random init, the fingerprint's weights id)."""
    weights = config.weights
    if weights is None:
        weights = PRESETS[config.preset].pretrained_tag if config.model_name is None else None
        if weights is None:
            weights = RANDOM_WEIGHTS
    if weights == RANDOM_WEIGHTS:
        return None, f"random:{config.seed}"

    path = Path(weights).expanduser()
    if path.is_file():
        return path, f"sha256:{file_sha256(path)}"
    if os.sep in weights or path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
        raise WeightsError(f"{path}: weights file not found; pass an existing open_clip checkpoint")

    cached = _cached_pretrained(model_name, weights)
    if cached is None:
        raise WeightsError(
            f"no local weights for {model_name} tag {weights!r}: pass --weights PATH to an "
            f"open_clip checkpoint file, put the tag's file in the Hugging Face cache, or use "
            f"--preset tiny for random weights (nothing is downloaded)"
        )
    return cached, f"sha256:{file_sha256(cached)}"


def _cached_pretrained(model_name: str, tag: str) -> Path | None:
    """The local file of an open_clip pretrained tag, if a previous download left one."""
    pretrained = open_clip.get_pretrained_cfg(model_name, tag)
    if not pretrained:
        known = ", ".join(open_clip.list_pretrained_tags_by_model(model_name)) or "none"
        raise WeightsError(f"{model_name} has no pretrained tag {tag!r} (known: {known})")

    candidates: list[Path] = []
    if pretrained.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(pretrained["hf_hub"])
        names = [filename] if filename else []
        names += ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        for name in names:
            found = try_to_load_from_cache(repo_id, name)
            if isinstance(found, str):
                candidates.append(Path(found))
    if pretrained.get("url"):
        clip_cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clip"
        candidates.append(clip_cache / os.path.basename(pretrained["url"]))
    return next((path for path in candidates if path.is_file()), None)
