"""Checkpoints of the trainable parts: the decoder projections, the prompt learner, the image
projection.

A checkpoint is a directory holding `weights.safetensors` (tensors named `<part>.<parameter>`) and
`config.json` (the encoder fingerprint and LLM the parts were trained with, and which parts are
present). Loading one made for another encoder or LLM is refused: the parts would silently compute
nonsense on features they never saw.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from pipeline.cache import write_atomic
from pipeline.encoder import EncoderFingerprint
from pipeline.errors import CheckpointError

FORMAT = "defectscope-checkpoint"
VERSION = 1
WEIGHTS_FILE = "weights.safetensors"
CONFIG_FILE = "config.json"
PARTS = ("decoder", "prompt_learner", "image_projection")


@dataclass(frozen=True)
class Checkpoint:
    """Loaded trainable parts: a state dict per part present, and what they were made for."""

    path: Path
    encoder: EncoderFingerprint
    llm: str | None
    """Identity of the LLM the prompt learner and projection were trained for, if any."""
    state: dict[str, dict[str, torch.Tensor]]
    extra: dict[str, Any] = field(default_factory=dict)
    """Training metadata (steps, losses, seeds); informational."""

    def has(self, part: str) -> bool:
        return part in self.state

    def load_into(self, part: str, module: nn.Module) -> None:
        """Loads one part's weights into `module`, with shape errors made readable."""
        try:
            module.load_state_dict(self.state[part])
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise CheckpointError(f"{self.path}: {part} weights do not fit: {detail}") from error


def save_checkpoint(
    directory: str | Path,
    encoder: EncoderFingerprint,
    parts: dict[str, nn.Module],
    llm: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Writes the given parts (keys from `PARTS`) to `directory`; returns its path."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown checkpoint parts {sorted(unknown)}; expected some of {PARTS}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    tensors = {
        f"{name}.{key}": value.detach().cpu().contiguous()
        for name, module in parts.items()
        for key, value in module.state_dict().items()
    }
    temporary = directory / f".{WEIGHTS_FILE}.partial"
    save_file(tensors, str(temporary))
    temporary.replace(directory / WEIGHTS_FILE)

    config = {
        "format": FORMAT,
        "version": VERSION,
        "encoder": encoder.to_dict(),
        "llm": llm,
        "parts": sorted(parts),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "extra": extra or {},
    }
    write_atomic(directory / CONFIG_FILE, json.dumps(config, indent=2).encode())
    return directory


def load_checkpoint(
    directory: str | Path, encoder: EncoderFingerprint, llm: str | None = None
) -> Checkpoint:
    """Reads a checkpoint and checks it was made for `encoder` (and `llm`, when both name one)."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise CheckpointError(
            f"{directory}: not a defectscope checkpoint (needs {CONFIG_FILE} and {WEIGHTS_FILE})"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as error:
        raise CheckpointError(f"{config_path}: unreadable JSON ({error})") from error
    if config.get("format") != FORMAT or config.get("version") != VERSION:
        raise CheckpointError(
            f"{config_path}: format {config.get('format')!r} v{config.get('version')}, expected "
            f"{FORMAT!r} v{VERSION}"
        )

    made_for = EncoderFingerprint.from_dict(config["encoder"])
    if made_for != encoder:
        raise CheckpointError(
            f"{directory}: made for encoder {made_for}, but this detector uses {encoder} "
            f"({'; '.join(made_for.differences(encoder))})"
        )
    made_for_llm = config.get("llm")
    if llm is not None and made_for_llm is not None and made_for_llm != llm:
        raise CheckpointError(f"{directory}: made for LLM {made_for_llm}, but this one is {llm}")

    try:
        tensors = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{weights_path}: unreadable weights ({error})") from error
    state: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        part, _, name = key.partition(".")
        state.setdefault(part, {})[name] = value
    return Checkpoint(directory, made_for, made_for_llm, state, config.get("extra", {}))
