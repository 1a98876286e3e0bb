"""Training the learned parts on synthetic anomalies: the decoder's per-stage projections (Eq. 1)
and the explainer's prompt learner and image projection (optionally LoRA adapters of the LLM).

Both loops follow AnomalyGPT's recipe on a product's own normal images:

- `train_decoder`: the frozen encoder's patch tokens of NSA / cut-paste / noise anomalies, the
  decoder's per-stage (normal, abnormal) probabilities upsampled to the image size, and per stage
  a focal loss on both channels plus a dice loss on the abnormal one, summed over stages (as the
  reference code does).
- `train_explainer`: AnomalyGPT's input sequence (`Explainer.build_inputs`) followed by the answer
  its mask implies ("Yes, there is an anomaly in the image, at the top left of the image."), with
  the LLM's cross-entropy on the answer tokens and the end-of-sequence token only.

Training samples form a fixed pool of `pool_size` synthetic samples whose frozen features are
computed once; step `s` draws its batch from a generator seeded with (seed, s), so a run resumed
from its last checkpoint draws exactly the batches the uninterrupted run would have. A checkpoint
directory holds the parts (`pipeline.checkpoint`), the optimizer state as safetensors with its
hyperparameters as JSON metadata, and the step and loss history in the checkpoint's `extra`.
Nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from pipeline.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from pipeline.decoder import ZeroShotDecoder, upsample
from pipeline.detector import Detector
from pipeline.encoder import Encoder
from pipeline.errors import CheckpointError, ConfigError
from pipeline.explainer import Explainer, Grounding, question_for
from pipeline.llm import LoadedLLM
from pipeline.memory import MemoryBank
from pipeline.postprocess import Region, answer_from_regions, find_regions, fuse_maps
from pipeline.prompts import TextFeatures
from pipeline.synthetic import SYNTHETIC_KINDS, SyntheticAnomaly, SyntheticDataset

logger = logging.getLogger(__name__)

OPTIMIZER_FILE = "optimizer.safetensors"
LORA_DIRECTORY = "lora"
MERGED_LLM_DIRECTORY = "llm"
MIN_REGION_AREA = 0.001
"""Mask regions smaller than this share of the image are not named in an answer (the largest
always is): specks a mask cleanup left behind are not defects an operator would count."""
IGNORE_INDEX = -100


@dataclass(frozen=True)
class DecoderTrainingConfig:
    """How `train_decoder` trains the per-stage projections."""

    steps: int = 500
    """Total optimizer steps; a resumed run continues up to this many."""
    batch_size: int = 8
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay."""
    focal_gamma: float = 2.0
    """Focusing parameter of the focal loss (2 in the reference code)."""
    normal_fraction: float = 0.25
    """Share of the pool left normal: the decoder must also learn to stay quiet."""
    kinds: tuple[str, ...] = SYNTHETIC_KINDS
    pool_size: int = 256
    """Distinct synthetic samples; their patch tokens are kept in memory (stages x 256 x C_vis x
    4 bytes each: 0.8 MB for the tiny encoder, 5 MB for ViT-H-14)."""
    class_name: str | None = None
    """The product's class name for the text features (None: "object")."""
    seed: int = 0
    save_every: int = 100
    """Write a checkpoint every this many steps (and always at the end)."""
    max_seconds: float | None = None
    """Stop early, with a checkpoint, once training has run this long."""


@dataclass(frozen=True)
class ExplainerTrainingConfig:
    """How `train_explainer` trains the prompt learner, the image projection and LoRA adapters."""

    steps: int = 500
    """Total optimizer steps; a resumed run continues up to this many."""
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    normal_fraction: float = 0.5
    """Share of the pool left normal, so "No" answers are learned as well as "Yes" ones."""
    kinds: tuple[str, ...] = SYNTHETIC_KINDS
    pool_size: int = 256
    """Distinct synthetic samples; their image embeddings and maps are computed once."""
    k_shot: int = 4
    """Normal images drawn (by `seed`) for the memory bank that makes the maps; the others are
    the bases of the synthetic samples, so no sample is ever in its own bank."""
    augment_bank: bool = False
    """Build that bank with rotations, as `build_bank(augment=True)` does for a product."""
    lora_rank: int | None = None
    """Train LoRA adapters of this rank on the LLM's attention projections; None freezes it."""
    lora_alpha: float = 16.0
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    class_name: str | None = None
    """The product's class name, put into the question as at inference."""
    seed: int = 0
    save_every: int = 100
    max_seconds: float | None = None


@dataclass(frozen=True)
class TrainingResult:
    """What a training run did."""

    checkpoint: Path
    start_step: int
    """The step it started from: 0, or the checkpoint's step when resumed."""
    step: int
    """The step it stopped at (`steps`, or earlier when the time budget ran out)."""
    losses: tuple[float, ...] = field(repr=False)
    """The loss of every step from 0 to `step`, the resumed-from part included."""
    seconds: float

    @property
    def run_losses(self) -> tuple[float, ...]:
        """The losses of this run's own steps."""
        return self.losses[self.start_step :]


# Losses -----------------------------------------------------------------------------------------


def focal_loss(
    probabilities: torch.Tensor, masks: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """The focal loss of two-class probabilities, mean over pixels.

    Args:
        probabilities: (B, 2, S, S), channel 0 normal, 1 abnormal, summing to 1.
        masks: (B, S, S) in {0, 1}.
    """
    target = masks.to(probabilities.dtype)
    true_class = probabilities[:, 1] * target + probabilities[:, 0] * (1 - target)  # (B, S, S)
    true_class = true_class.clamp(1e-6, 1.0)
    return (-((1 - true_class) ** gamma) * true_class.log()).mean()


def dice_loss(probabilities: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """1 - soft dice of the abnormal probability per image (smoothing 1), mean over the batch.

    Args:
        probabilities: (B, S, S) abnormal probability.
        masks: (B, S, S) in {0, 1}.

    Note:
        The smoothing term makes a normal image's dice 1 / (sum of p + 1): the loss then pushes its
        abnormal probability towards zero, as the reference code's does.
    """
    predicted = probabilities.flatten(1)  # (B, S * S)
    target = masks.to(probabilities.dtype).flatten(1)
    overlap = (predicted * target).sum(dim=1)
    dice = (2 * overlap + 1) / (predicted.sum(dim=1) + target.sum(dim=1) + 1)
    return (1 - dice).mean()


def decoder_loss(
    stages: Sequence[torch.Tensor], masks: torch.Tensor, gamma: float = 2.0
) -> torch.Tensor:
    """Focal + dice over the decoder's stages, summed (AnomalyGPT's pixel loss).

    Args:
        stages: one (B, 2, g, g) probability grid per stage (`stage_probabilities`).
        masks: (B, S, S) ground truth at the image size.
    """
    image_size = masks.shape[-1]
    total = masks.new_zeros((), dtype=torch.float32)
    for stage in stages:
        probabilities = upsample(stage.float(), image_size)  # (B, 2, S, S)
        total = total + focal_loss(probabilities, masks, gamma)
        total = total + dice_loss(probabilities[:, 1], masks)
    return total


# Answers from masks -----------------------------------------------------------------------------


def mask_regions(mask: np.ndarray) -> tuple[Region, ...]:
    """The regions of a ground-truth mask, as `find_regions` finds them in an anomaly map."""
    height, width = mask.shape
    return find_regions(mask.astype(np.float32), 0.5, width, height, MIN_REGION_AREA)


def answer_for_mask(mask: np.ndarray) -> str:
    """AnomalyGPT's answer for an image whose (H, W) bool ground truth is `mask`."""
    if not mask.any():
        return answer_from_regions(False, ())
    return answer_from_regions(True, mask_regions(mask))


def locations_for_mask(mask: np.ndarray) -> frozenset[str]:
    """The location words the answer for `mask` names."""
    return (
        frozenset(region.location for region in mask_regions(mask)) if mask.any() else frozenset()
    )


# The decoder ------------------------------------------------------------------------------------


def train_decoder(
    encoder: Encoder,
    normals: Sequence[Image.Image],
    output: str | Path,
    config: DecoderTrainingConfig | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainingResult:
    """Trains the zero-shot decoder's projections on synthetic anomalies of `normals`.

    Args:
        encoder: the frozen encoder (its device is the training device).
        normals: normal RGB images of one product.
        output: checkpoint directory (parts: decoder).
        config: hyperparameters; None takes the defaults.
        resume: continue from the checkpoint in `output` (weights, optimizer state, step).
        progress: show progress bars.
    """
    config = config or DecoderTrainingConfig()
    _check_common(config.steps, config.batch_size, config.pool_size, config.save_every)
    output = Path(output)
    device = encoder.device
    decoder = ZeroShotDecoder(
        encoder.vision_width, encoder.embed_dim, encoder.num_stages, seed=config.seed
    ).to(device)
    parameters = list(decoder.parameters())
    optimizer = torch.optim.AdamW(
        parameters, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    state = _TrainingState.fresh("decoder", config)
    if resume:
        checkpoint = _resumable(output, encoder, None, "decoder", config)
        checkpoint.load_into("decoder", decoder)
        state = _TrainingState.from_checkpoint(checkpoint)
        load_optimizer_state(optimizer, output / OPTIMIZER_FILE)

    pool = _DecoderPool.build(encoder, normals, config, progress)
    text = TextFeatures(encoder)(config.class_name).to(device)  # (2, C_emb)
    decoder.train()

    def step(index: int) -> float:
        batch = _batch_indices(config.seed, index, config.pool_size, config.batch_size)
        tokens = [stage[batch].to(device) for stage in pool.patch_tokens]  # (B, L, C_vis) each
        masks = pool.masks[batch].to(device)  # (B, S, S)
        loss = decoder_loss(decoder.stage_probabilities(tokens, text), masks, config.focal_gamma)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    def save(step_count: int) -> None:
        save_checkpoint(
            output,
            encoder.fingerprint,
            {"decoder": decoder},
            extra={"training": state.to_dict(step_count)},
        )
        save_optimizer_state(optimizer, output / OPTIMIZER_FILE)

    result = _run(
        state, output, config.steps, config.save_every, config.max_seconds, step, save, progress
    )
    decoder.eval()
    return result


@dataclass(frozen=True)
class _DecoderPool:
    patch_tokens: tuple[torch.Tensor, ...]
    """One (P, L, C_vis) tensor per stage, on the CPU."""
    masks: torch.Tensor
    """(P, S, S) float32 in {0, 1}."""

    @classmethod
    def build(
        cls,
        encoder: Encoder,
        normals: Sequence[Image.Image],
        config: DecoderTrainingConfig,
        progress: bool,
    ) -> _DecoderPool:
        dataset = SyntheticDataset(
            normals,
            config.seed,
            config.kinds,
            config.normal_fraction,
            config.pool_size,
            encoder.image_size,
        )
        stages: list[list[torch.Tensor]] = [[] for _ in range(encoder.num_stages)]
        masks = []
        for samples in _sample_batches(dataset, 16, progress):
            output = encoder.encode_images([sample.image for sample in samples])
            for stage, tokens in zip(stages, output.patch_tokens, strict=True):
                stage.append(tokens.float().cpu())
            masks.extend(torch.from_numpy(sample.mask) for sample in samples)
        tokens = tuple(torch.cat(stage) for stage in stages)  # (P, L, C_vis) each
        return cls(tokens, torch.stack(masks).float())


# The explainer ----------------------------------------------------------------------------------


def train_explainer(
    detector: Detector,
    llm: LoadedLLM,
    normals: Sequence[Image.Image],
    output: str | Path,
    config: ExplainerTrainingConfig | None = None,
    resume: bool = False,
    progress: bool = False,
) -> TrainingResult:
    """Trains the prompt learner and image projection (and LoRA adapters) for `llm`.

    The prompt learner is fed the map the detector would compute at inference: the few-shot map
    against a bank of `k_shot` of the normals (fused with the zero-shot map when the detector's
    fusion asks for it). The reference code feeds the decoder's own map; both are "the map the
    model will see", and ours is the one our detector actually uses with a bank.

    Args:
        detector: the frozen encoder and decoder; its checkpoint's decoder is carried into the
            output checkpoint, so one checkpoint holds every trained part.
        llm: the frozen causal LM (with LoRA, its weights are changed in place at the end).
        normals: normal RGB images of one product, at least `k_shot` + 1.
        output: checkpoint directory (parts: prompt_learner, image_projection[, decoder]).
        config: hyperparameters; None takes the defaults.
        resume: continue from the checkpoint in `output`.
        progress: show progress bars.
    """
    config = config or ExplainerTrainingConfig()
    _check_common(config.steps, config.batch_size, config.pool_size, config.save_every)
    if len(normals) <= config.k_shot:
        raise ConfigError(
            f"{len(normals)} normal images: explainer training needs more than k_shot = "
            f"{config.k_shot} (the bank) so that synthetic samples come from images outside it"
        )
    output = Path(output)
    explainer = Explainer(llm, detector.encoder.embed_dim, Grounding.IMAGE, seed=config.seed)
    adapters = _add_lora(llm, config) if config.lora_rank else None
    trainable = [*explainer.prompt_learner.parameters(), *explainer.image_projection.parameters()]
    if adapters is not None:
        trainable += [parameter for _, parameter in _lora_parameters(adapters)]
    optimizer = torch.optim.AdamW(
        trainable, lr=config.learning_rate, weight_decay=config.weight_decay
    )
    state = _TrainingState.fresh("explainer", config, base_llm=llm.identity)
    if resume:
        checkpoint = _resumable(output, detector.encoder, llm, "explainer", config)
        checkpoint.load_into("prompt_learner", explainer.prompt_learner)
        checkpoint.load_into("image_projection", explainer.image_projection)
        if adapters is not None:
            _load_lora(adapters, output / LORA_DIRECTORY)
        state = _TrainingState.from_checkpoint(checkpoint)
        load_optimizer_state(optimizer, output / OPTIMIZER_FILE)

    pool = _ExplainerPool.build(detector, normals, config, progress)
    answer_ids = [_answer_ids(llm, answer) for answer in pool.answers]
    question = question_for(config.class_name)
    explainer.prompt_learner.train()

    def step(index: int) -> float:
        batch = _batch_indices(config.seed, index, config.pool_size, config.batch_size)
        loss = answer_loss(
            explainer,
            pool.image_embeddings[batch],
            pool.maps[batch],
            [question] * len(batch),
            [answer_ids[sample] for sample in batch],
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    parts: dict[str, nn.Module] = {
        "prompt_learner": explainer.prompt_learner,
        "image_projection": explainer.image_projection,
    }
    if detector.has_trained_decoder:
        parts["decoder"] = detector.decoder

    def save(step_count: int) -> None:
        save_checkpoint(
            output,
            detector.encoder.fingerprint,
            parts,
            llm=llm.identity,
            extra={"training": state.to_dict(step_count)},
        )
        save_optimizer_state(optimizer, output / OPTIMIZER_FILE)
        if adapters is not None:
            adapters.save_pretrained(output / LORA_DIRECTORY)

    result = _run(
        state, output, config.steps, config.save_every, config.max_seconds, step, save, progress
    )
    explainer.prompt_learner.eval()
    if adapters is not None:
        _merge_lora(adapters, llm, output, parts, detector, state, result.step)
    return result


def answer_loss(
    explainer: Explainer,
    image_embeddings: torch.Tensor,
    anomaly_maps: torch.Tensor,
    questions: list[str],
    answer_ids: list[list[int]],
) -> torch.Tensor:
    """Teacher-forced cross-entropy of the answers after AnomalyGPT's input sequence.

    The prompt (left-padded by `build_inputs`) is followed by each answer's tokens, right-padded;
    only answer positions (end-of-sequence token included) carry labels. Logits are computed for
    the answer positions alone: with a 262k-token vocabulary they are most of the cost.

    Args:
        explainer: its prompt learner and image projection receive the gradients.
        image_embeddings: (B, C_emb).
        anomaly_maps: (B, S, S).
        questions: B questions.
        answer_ids: B token id lists, each ending with the end-of-sequence id.

    Returns:
        The mean cross-entropy per answer token, a scalar.
    """
    inputs, attention, _ = explainer.build_inputs(image_embeddings, anomaly_maps, questions)
    batch = inputs.shape[0]  # inputs: (B, T, hidden)
    answer_length = max(len(ids) for ids in answer_ids)
    device = inputs.device
    pad = explainer.llm.tokenizer.pad_token_id
    ids = torch.full((batch, answer_length), pad, dtype=torch.long, device=device)  # (B, A)
    answer_mask = torch.zeros(batch, answer_length, dtype=torch.long, device=device)
    for row, tokens in enumerate(answer_ids):
        ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
        answer_mask[row, : len(tokens)] = 1

    sequence = torch.cat([inputs, explainer.embeddings(ids).to(inputs.dtype)], dim=1)  # (B, T+A, h)
    mask = torch.cat([attention, answer_mask], dim=1)  # (B, T + A)
    # Positions count real tokens only, as generation does for left-padded batches.
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    logits = explainer.llm.model(
        inputs_embeds=sequence,
        attention_mask=mask,
        position_ids=positions,
        logits_to_keep=answer_length + 1,
    ).logits  # (B, A + 1, V): position T - 1 + j predicts answer token j
    labels = ids.masked_fill(answer_mask == 0, IGNORE_INDEX)  # (B, A)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX
    )


@dataclass(frozen=True)
class _ExplainerPool:
    image_embeddings: torch.Tensor
    """(P, C_emb) on the detector's device."""
    maps: torch.Tensor
    """(P, S, S) fused maps, as the detector makes them."""
    answers: tuple[str, ...]
    anomalous: tuple[bool, ...]

    @classmethod
    def build(
        cls,
        detector: Detector,
        normals: Sequence[Image.Image],
        config: ExplainerTrainingConfig,
        progress: bool,
    ) -> _ExplainerPool:
        references, bases = split_references(normals, config.k_shot, config.seed)
        bank = detector.build_bank(
            references, augment=config.augment_bank, class_name=config.class_name
        )
        dataset = SyntheticDataset(
            bases,
            config.seed,
            config.kinds,
            config.normal_fraction,
            config.pool_size,
            detector.image_size,
        )
        embeddings, maps, answers, anomalous = [], [], [], []
        for samples in _sample_batches(dataset, detector.config.batch_size, progress):
            embedding, anomaly_map = detector_view(
                detector, [sample.image for sample in samples], bank, config.class_name
            )
            embeddings.append(embedding)
            maps.append(anomaly_map)
            answers.extend(answer_for_mask(sample.mask) for sample in samples)
            anomalous.extend(sample.anomalous for sample in samples)
        return cls(torch.cat(embeddings), torch.cat(maps), tuple(answers), tuple(anomalous))


def split_references(
    normals: Sequence[Image.Image], k_shot: int, seed: int
) -> tuple[list[Image.Image], list[Image.Image]]:
    """(the k_shot references of the explainer's training bank, the other normals), drawn by
    `seed` as `train_explainer` draws them."""
    chosen = set(np.random.default_rng(seed).choice(len(normals), k_shot, replace=False).tolist())
    references = [image for index, image in enumerate(normals) if index in chosen]
    bases = [image for index, image in enumerate(normals) if index not in chosen]
    return references, bases


@torch.no_grad()
def detector_view(
    detector: Detector, images: list[Image.Image], bank: MemoryBank, class_name: str | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C_emb) image embeddings and (B, S, S) fused maps, as `Detector.inspect` computes them."""
    output = detector.encode(detector.prepare(images))
    fewshot = detector.fewshot_maps(output, bank)
    zeroshot = (
        detector.zero_shot_maps(output, [class_name] * len(images))
        if detector.needs_zero_shot(bank)
        else None
    )
    maps = fuse_maps(fewshot, zeroshot, detector.config.fusion)
    return output.image_embeddings.float(), maps.float()


def _answer_ids(llm: LoadedLLM, answer: str) -> list[int]:
    """Token ids of " <answer>" plus end-of-sequence: the continuation after "### Assistant:"."""
    ids = llm.tokenizer(" " + answer, add_special_tokens=False).input_ids
    eos = llm.tokenizer.eos_token_id
    return [*ids, eos] if eos is not None else list(ids)


def _add_lora(llm: LoadedLLM, config: ExplainerTrainingConfig) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_rank,
        lora_alpha=config.lora_alpha,
        lora_dropout=0.0,
        target_modules=list(config.lora_targets),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        try:
            # Adapters are injected into llm.model itself; the wrapper is kept for saving.
            return get_peft_model(llm.model, lora)
        except ValueError as error:
            raise ConfigError(f"cannot add LoRA adapters to {llm.identity}: {error}") from error


def _lora_parameters(adapters: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return sorted(
        (name, parameter)
        for name, parameter in adapters.named_parameters()
        if parameter.requires_grad
    )


def _load_lora(adapters: Any, directory: Path) -> None:
    from peft import set_peft_model_state_dict

    weights = directory / "adapter_model.safetensors"
    if not weights.is_file():
        raise CheckpointError(f"{weights}: LoRA adapters to resume from not found")
    set_peft_model_state_dict(adapters, load_file(str(weights)))


def _merge_lora(
    adapters: Any,
    llm: LoadedLLM,
    output: Path,
    parts: dict[str, nn.Module],
    detector: Detector,
    state: _TrainingState,
    step_count: int,
) -> None:
    """Merges the adapters into the LLM and saves it beside the checkpoint, which then names it.

    TODO(#5): the explainer loads an LLM directory, not adapters, so the merged copy (the whole
    LLM) is written; loading the adapters from the checkpoint would save that disk space.
    """
    from pipeline.llm import resolve_llm

    merged = adapters.merge_and_unload()
    directory = output / MERGED_LLM_DIRECTORY
    merged.save_pretrained(directory)
    llm.tokenizer.save_pretrained(directory)
    identity = resolve_llm(str(directory))[1]
    save_checkpoint(
        output,
        detector.encoder.fingerprint,
        parts,
        llm=identity,
        extra={"training": state.to_dict(step_count)},
    )
    logger.info("LoRA merged into %s; explain with --llm %s", directory, directory)


# The loop and its state -------------------------------------------------------------------------


@dataclass
class _TrainingState:
    """What a checkpoint's extra records about training, to resume and to report."""

    kind: str
    config: dict[str, Any]
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    base_llm: str | None = None

    @classmethod
    def fresh(cls, kind: str, config: Any, base_llm: str | None = None) -> _TrainingState:
        return cls(kind, _jsonable(asdict(config)), base_llm=base_llm)

    @classmethod
    def from_checkpoint(cls, checkpoint: Checkpoint) -> _TrainingState:
        training = checkpoint.extra["training"]
        losses = [float(loss) for loss in training["losses"]]
        return cls(
            training["kind"],
            training["config"],
            int(training["step"]),
            losses[: int(training["step"])],
            training.get("base_llm"),
        )

    def to_dict(self, step_count: int) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "step": step_count,
            "config": self.config,
            "losses": [round(loss, 6) for loss in self.losses[:step_count]],
            "base_llm": self.base_llm,
        }


def _run(
    state: _TrainingState,
    output: Path,
    steps: int,
    save_every: int,
    max_seconds: float | None,
    step: Callable[[int], float],
    save: Callable[[int], None],
    progress: bool,
) -> TrainingResult:
    """Runs steps `state.start_step`..`steps`, saving every `save_every` and at the end."""
    start = done = state.start_step
    started = time.perf_counter()
    log_every = max(1, (steps - start) // 20)
    # With a time budget the number of steps is not known up front: the bar just counts.
    total = steps if max_seconds is None else None
    with tqdm(
        total=total, initial=start, desc=f"training {state.kind}", unit="step", disable=not progress
    ) as bar:
        while done < steps:
            state.losses.append(step(done))
            done += 1
            bar.update(1)
            bar.set_postfix(loss=f"{state.losses[-1]:.4f}")
            if done % log_every == 0 or done == steps:
                window = state.losses[-log_every:]
                logger.info(
                    "%s step %d/%d: loss %.4f", state.kind, done, steps, sum(window) / len(window)
                )
            if max_seconds is not None and time.perf_counter() - started >= max_seconds:
                logger.info("%s training stopped at step %d: time budget spent", state.kind, done)
                break
            if done % save_every == 0 and done < steps:
                save(done)
    save(done)
    seconds = time.perf_counter() - started
    return TrainingResult(output, start, done, tuple(state.losses), seconds)


def _resumable(
    output: Path, encoder: Encoder, llm: LoadedLLM | None, kind: str, config: Any
) -> Checkpoint:
    """The checkpoint to resume from, checked to be a `kind` training run for these models."""
    checkpoint = load_checkpoint(output, encoder.fingerprint)
    training = checkpoint.extra.get("training")
    if not isinstance(training, dict) or training.get("kind") != kind:
        found = training.get("kind") if isinstance(training, dict) else None
        raise CheckpointError(
            f"{output}: not a {kind} training checkpoint (training kind {found!r}); cannot resume"
        )
    if llm is not None and training.get("base_llm") not in (None, llm.identity):
        raise CheckpointError(
            f"{output}: trained for LLM {training['base_llm']}, but this one is {llm.identity}"
        )
    if not (output / OPTIMIZER_FILE).is_file():
        raise CheckpointError(f"{output / OPTIMIZER_FILE}: optimizer state to resume not found")
    changed = {
        key: (training["config"].get(key), value)
        for key, value in _jsonable(asdict(config)).items()
        if key not in ("steps", "save_every", "max_seconds")
        and training["config"].get(key) != value
    }
    if changed:
        described = ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())
        logger.warning("resuming %s training with changed settings: %s", kind, described)
    logger.info("resuming %s training from %s at step %d", kind, output, training["step"])
    return checkpoint


def _check_common(steps: int, batch_size: int, pool_size: int, save_every: int) -> None:
    if steps < 1 or batch_size < 1 or save_every < 1:
        raise ConfigError(
            f"steps {steps}, batch size {batch_size}, save every {save_every}: each must be >= 1"
        )
    if pool_size < batch_size:
        raise ConfigError(f"pool of {pool_size} samples is smaller than a batch of {batch_size}")


def _batch_indices(seed: int, step: int, pool_size: int, batch_size: int) -> list[int]:
    """The pool indices of step `step`: a function of (seed, step) alone, so resuming is exact."""
    rng = np.random.default_rng([seed, step, 1])
    return rng.choice(pool_size, size=batch_size, replace=False).tolist()


def _sample_batches(
    dataset: SyntheticDataset, size: int, progress: bool
) -> Iterator[list[SyntheticAnomaly]]:
    with tqdm(
        total=len(dataset), desc="synthetic samples", unit="image", disable=not progress
    ) as bar:
        for start in range(0, len(dataset), size):
            samples = [dataset[index] for index in range(start, min(len(dataset), start + size))]
            yield samples
            bar.update(len(samples))


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


# Optimizer state --------------------------------------------------------------------------------


def save_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Writes an optimizer's state: its tensors as safetensors, its hyperparameters as JSON
    metadata of the same file (no pickle)."""
    state = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[name] = value
    metadata = {"param_groups": json.dumps(state["param_groups"]), "scalars": json.dumps(scalars)}
    partial = path.with_name(f".{path.name}.partial")
    save_file(tensors, str(partial), metadata=metadata)
    partial.replace(path)


def load_optimizer_state(optimizer: torch.optim.Optimizer, path: Path) -> None:
    """Restores what `save_optimizer_state` wrote into an optimizer over the same parameters."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata() or {}
        tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118
    if "param_groups" not in metadata:
        raise CheckpointError(f"{path}: not an optimizer state file (no param_groups metadata)")
    groups = json.loads(metadata["param_groups"])
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in json.loads(metadata.get("scalars", "{}")).items():
        state.setdefault(int(index), {}).update(values)
    expected = sum(len(group["params"]) for group in optimizer.param_groups)
    saved = sum(len(group["params"]) for group in groups)
    if saved != expected:
        raise CheckpointError(
            f"{path}: optimizer state for {saved} parameters, this run trains {expected}"
        )
    optimizer.load_state_dict({"state": state, "param_groups": groups})
