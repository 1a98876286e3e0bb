"""The detector: one object that builds banks and inspects images with the whole method.

    detector = Detector(DetectorConfig())
    bank = detector.build_bank(normal_images)
    results = detector.inspect(images, bank=bank, class_name="washer")

Its steps (`prepare`, `encode`, `zero_shot_maps`, `fewshot_maps`, `decide`, `explain`) are public
so that the serving deployments run the same code one stage per deployment.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from enum import StrEnum

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.calibration import threshold_from_normal_scores
from pipeline.checkpoint import Checkpoint, load_checkpoint
from pipeline.decoder import ZeroShotDecoder
from pipeline.encoder import EncoderConfig, EncoderOutput, default_device, load_encoder
from pipeline.errors import BankError, ConfigError
from pipeline.explainer import Explainer, ExplainerConfig, agrees, describe_findings, question_for
from pipeline.llm import load_llm
from pipeline.memory import MemoryBank, build_bank, leave_one_out_maps, rotations
from pipeline.postprocess import (
    DecisionRules,
    Fusion,
    Region,
    ScoreMode,
    Verdict,
    answer_from_regions,
    decide,
    fuse_maps,
    image_scores,
)
from pipeline.prompts import TextFeatures

logger = logging.getLogger(__name__)

MAX_HELD_OUT = 8
"""Normal images held out one at a time to calibrate a bank's threshold."""
DEFAULT_THRESHOLDS = {Fusion.FEWSHOT: 0.1, Fusion.ZEROSHOT: 0.5, Fusion.MEAN: 0.3}
"""Thresholds used when neither the configuration nor the bank gives one; rarely right."""


class ExplainPolicy(StrEnum):
    """Which frames get an LLM explanation."""

    NEVER = "never"
    ANOMALOUS = "anomalous"
    ALWAYS = "always"


class AnswerSource(StrEnum):
    REGIONS = "regions"
    """AnomalyGPT's answer format filled in from the regions."""
    LLM = "llm"


@dataclass(frozen=True)
class DetectorConfig:
    """Everything that decides how images are inspected."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    checkpoint: str | None = None
    """A checkpoint directory with trained decoder (and optionally explainer) parts."""
    fusion: Fusion = Fusion.AUTO
    score_mode: ScoreMode = ScoreMode.MAX
    topk_fraction: float = 0.01
    """Share of pixels averaged by the top-k score mode."""
    threshold: float | None = None
    """Fixed image/pixel threshold; None takes the bank's calibrated one."""
    min_region_area: float = 0.0
    """Regions smaller than this fraction of the image are dropped (the strongest is kept)."""
    explainer: ExplainerConfig | None = None
    """The LLM explainer; None answers from the regions."""
    explain: ExplainPolicy = ExplainPolicy.ANOMALOUS
    device: str | None = None
    """"cuda", "cpu", ...; None picks CUDA when present."""
    batch_size: int = 16


@dataclass(frozen=True)
class StageTimings:
    """Seconds spent per stage, for one image (its share of the batch)."""

    encode: float = 0.0
    zero_shot: float = 0.0
    few_shot: float = 0.0
    postprocess: float = 0.0
    explain: float = 0.0

    @property
    def total(self) -> float:
        return self.encode + self.zero_shot + self.few_shot + self.postprocess + self.explain

    def to_dict(self) -> dict[str, float]:
        return {key: round(value, 6) for key, value in asdict(self).items()}


@dataclass(frozen=True)
class Inspection:
    """Everything the detector says about one image."""

    score: float
    anomalous: bool
    threshold: float
    regions: tuple[Region, ...]
    answer: str
    answer_source: AnswerSource
    anomaly_map: np.ndarray
    """(S, S) float32 over the whole (squashed) frame."""
    image_size: tuple[int, int]
    """(width, height) of the original image."""
    timings: StageTimings

    def to_dict(self) -> dict[str, object]:
        """JSON-ready, without the map."""
        return {
            "score": round(self.score, 6),
            "anomalous": self.anomalous,
            "threshold": round(self.threshold, 6),
            "regions": [region.to_dict() for region in self.regions],
            "answer": self.answer,
            "answer_source": self.answer_source.value,
            "image_size": list(self.image_size),
            "timings": self.timings.to_dict(),
        }


class Detector:
    """The AnomalyGPT method on one machine: encoder, decoder, memory bank, explainer."""

    def __init__(self, config: DetectorConfig | None = None) -> None:
        self.config = config or DetectorConfig()
        self.device = torch.device(self.config.device) if self.config.device else default_device()
        self.encoder = load_encoder(self.config.encoder, self.device)
        self.text_features = TextFeatures(self.encoder)
        self.decoder = ZeroShotDecoder(
            self.encoder.vision_width, self.encoder.embed_dim, self.encoder.num_stages
        ).to(self.device)
        self.decoder.eval().requires_grad_(False)

        self.checkpoint: Checkpoint | None = None
        if self.config.checkpoint:
            self.checkpoint = load_checkpoint(self.config.checkpoint, self.encoder.fingerprint)
            if self.checkpoint.has("decoder"):
                self.checkpoint.load_into("decoder", self.decoder)
                logger.info("decoder weights loaded from %s", self.config.checkpoint)
        self._explainer: Explainer | None = None
        self._explainer_lock = threading.Lock()
        self._warned: set[str] = set()

    @property
    def has_trained_decoder(self) -> bool:
        return self.checkpoint is not None and self.checkpoint.has("decoder")

    @property
    def image_size(self) -> int:
        return self.encoder.image_size

    # Steps -------------------------------------------------------------------------------------

    def prepare(self, images: Sequence[Image.Image]) -> np.ndarray:
        """RGB images -> (B, S, S, 3) uint8 at the encoder's input size (CPU work)."""
        return np.stack([self.encoder.resize(image) for image in images])

    def encode(self, pixels: np.ndarray) -> EncoderOutput:
        """(B, S, S, 3) uint8 -> stage patch tokens and image embeddings."""
        return self.encoder(self.encoder.to_pixels(pixels))

    def zero_shot_maps(
        self, output: EncoderOutput, class_names: Sequence[str | None]
    ) -> torch.Tensor:
        """Eq. 1 maps (B, S, S); meaningful only with a trained decoder."""
        if not self.has_trained_decoder:
            self._warn_once(
                "zero-shot",
                "the zero-shot decoder has no trained weights: its maps are not meaningful "
                "(pass a checkpoint from `defectscope train decoder`)",
            )
        text = self.text_features.batch(list(class_names))  # (B, 2, C_emb)
        return self.decoder(output.patch_tokens, text, self.image_size)

    def fewshot_maps(self, output: EncoderOutput, bank: MemoryBank) -> torch.Tensor:
        """Eq. 2 maps (B, S, S) against a memory bank."""
        if bank.dims != tuple(tokens.shape[-1] for tokens in output.patch_tokens):
            raise BankError(
                f"bank has stage dims {bank.dims}, the encoder "
                f"{tuple(t.shape[-1] for t in output.patch_tokens)}: it was built with another "
                "encoder"
            )
        return bank.anomaly_map(output.patch_tokens, self.image_size)

    def fusion_for(self, bank: MemoryBank | None) -> Fusion:
        """The configured fusion with AUTO resolved: few-shot with a bank, zero-shot without."""
        fusion = Fusion(self.config.fusion)
        if fusion is Fusion.AUTO:
            return Fusion.FEWSHOT if bank is not None else Fusion.ZEROSHOT
        return fusion

    def needs_zero_shot(self, bank: MemoryBank | None) -> bool:
        return self.fusion_for(bank) is not Fusion.FEWSHOT

    def resolve_threshold(self, bank: MemoryBank | None) -> float:
        """The configured threshold, else the bank's calibrated one, else the fusion's default."""
        if self.config.threshold is not None:
            return self.config.threshold
        fusion = self.fusion_for(bank)
        if fusion is not Fusion.ZEROSHOT and bank is not None and bank.threshold is not None:
            return bank.threshold
        self._warn_once(
            f"threshold-{fusion}",
            f"no calibrated threshold (a bank of at least 2 normal images calibrates one); using "
            f"the {fusion.value} default {DEFAULT_THRESHOLDS[fusion]}",
        )
        return DEFAULT_THRESHOLDS[fusion]

    @property
    def rules(self) -> DecisionRules:
        return DecisionRules(
            self.config.score_mode, self.config.topk_fraction, self.config.min_region_area
        )

    def decide(
        self, anomaly_maps: torch.Tensor, threshold: float, image_sizes: Sequence[tuple[int, int]]
    ) -> list[Verdict]:
        """Scores, verdicts and regions for (B, S, S) fused maps."""
        return decide(anomaly_maps, threshold, image_sizes, self.rules)

    def explainer(self) -> Explainer | None:
        """The LLM explainer, loaded on first use; None when none is configured."""
        config = self.config.explainer
        if config is None or config.llm is None:
            return None
        with self._explainer_lock:
            if self._explainer is None:
                llm = load_llm(config.llm, self.device)
                self._explainer = Explainer.from_config(
                    config, llm, self.encoder.embed_dim, self.checkpoint
                )
            return self._explainer

    def wants_explanation(self, verdict: Verdict) -> bool:
        policy = ExplainPolicy(self.config.explain)
        return policy is ExplainPolicy.ALWAYS or (
            policy is ExplainPolicy.ANOMALOUS and verdict.anomalous
        )

    # The whole method ---------------------------------------------------------------------------

    @torch.inference_mode()
    def build_bank(
        self,
        images: Sequence[Image.Image],
        augment: bool = False,
        coreset_ratio: float | None = None,
        seed: int = 0,
        class_name: str | None = None,
        progress: bool = False,
    ) -> MemoryBank:
        """A memory bank from normal images, with a threshold calibrated by leave-one-out.

        Args:
            images: normal RGB images of one product.
            augment: add the 90/180/270 degree rotations of every image (x4 patches).
            coreset_ratio: keep this fraction of patches by greedy coreset.
            seed: coreset seed.
            class_name: the product's class name, for calibrating mean fusion.
            progress: show a progress bar.
        """
        if not images:
            raise BankError("a memory bank needs at least one normal image")
        views = [rotations(image) if augment else [image] for image in images]
        flat = [view for image_views in views for view in image_views]

        stage_tokens: list[list[torch.Tensor]] = []
        for batch in _batches(flat, self.config.batch_size, progress, "encoding normals"):
            output = self.encode(self.prepare(batch))
            stage_tokens.append([tokens.float().cpu() for tokens in output.patch_tokens])
        tokens = [torch.cat(stage) for stage in zip(*stage_tokens, strict=True)]  # (K * V, L, C)

        zero_shot = None
        if Fusion(self.config.fusion) is Fusion.MEAN and len(images) > 1:
            held_out = images[:MAX_HELD_OUT]
            normals = self.encode(self.prepare(held_out))
            zero_shot = self.zero_shot_maps(normals, [class_name] * len(held_out)).cpu()
        return calibrated_bank(
            tokens, len(views[0]), self.image_size, self.rules, coreset_ratio, seed, zero_shot
        )

    @torch.inference_mode()
    def inspect(
        self,
        images: Sequence[Image.Image],
        bank: MemoryBank | None = None,
        class_name: str | None = None,
        progress: bool = False,
    ) -> list[Inspection]:
        """Inspects RGB images of one product (against its bank, when given)."""
        if bank is None and not self.has_trained_decoder:
            raise ConfigError(
                "nothing to compare against: give normal reference images (a memory bank) or a "
                "checkpoint with a trained zero-shot decoder"
            )
        threshold = self.resolve_threshold(bank)
        results: list[Inspection] = []
        for batch in _batches(images, self.config.batch_size, progress, "inspecting"):
            results.extend(self._inspect_batch(batch, bank, class_name, threshold))
        return results

    def _inspect_batch(
        self,
        images: Sequence[Image.Image],
        bank: MemoryBank | None,
        class_name: str | None,
        threshold: float,
    ) -> list[Inspection]:
        count = len(images)
        clock = _Clock(self.device)
        output = self.encode(self.prepare(images))
        encode = clock.lap()
        zero_shot = (
            self.zero_shot_maps(output, [class_name] * count)
            if self.needs_zero_shot(bank)
            else None
        )
        zero_shot_time = clock.lap()
        fewshot = self.fewshot_maps(output, bank) if bank is not None else None
        fewshot_time = clock.lap()
        anomaly_maps = fuse_maps(fewshot, zero_shot, self.config.fusion)
        verdicts = self.decide(anomaly_maps, threshold, [image.size for image in images])
        postprocess = clock.lap()

        answers = [
            (answer_from_regions(v.anomalous, v.regions), AnswerSource.REGIONS) for v in verdicts
        ]
        chosen = [
            index for index, verdict in enumerate(verdicts) if self.wants_explanation(verdict)
        ]
        explainer = self.explainer() if chosen else None
        if explainer is not None:
            explanations = explainer.explain(
                output.image_embeddings[chosen],
                anomaly_maps[chosen],
                [question_for(class_name)] * len(chosen),
                [describe_findings(verdicts[i].anomalous, verdicts[i].regions) for i in chosen],
            )
            for index, explanation in zip(chosen, explanations, strict=True):
                answers[index] = choose_answer(explanation.text, verdicts[index])
        explain = clock.lap()

        timings = StageTimings(
            encode / count,
            zero_shot_time / count,
            fewshot_time / count,
            postprocess / count,
            explain / count,
        )
        maps = anomaly_maps.float().cpu().numpy()
        return [
            Inspection(
                verdict.score,
                verdict.anomalous,
                verdict.threshold,
                verdict.regions,
                answer,
                source,
                maps[index],
                images[index].size,
                timings,
            )
            for index, (verdict, (answer, source)) in enumerate(zip(verdicts, answers, strict=True))
        ]

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


def calibrated_bank(
    tokens: Sequence[torch.Tensor],
    views_per_image: int,
    image_size: int,
    rules: DecisionRules,
    coreset_ratio: float | None = None,
    seed: int = 0,
    zero_shot: torch.Tensor | None = None,
) -> MemoryBank:
    """A bank from normal patch tokens, its threshold calibrated by leave-one-out.

    Args:
        tokens: one (K * V, L, C_i) tensor per stage, the V views of each image adjacent.
        views_per_image: V.
        image_size: side of the maps.
        rules: how maps become scores.
        coreset_ratio: keep this fraction of patches by greedy coreset.
        seed: coreset seed.
        zero_shot: zero-shot maps (K', S, S) of the first K' images, to calibrate mean fusion.

    Returns:
        The bank, with `threshold` set when there were at least two images.
    """
    threshold = None
    held_out = leave_one_out_maps(tokens, views_per_image, image_size, MAX_HELD_OUT)
    if len(held_out) > 0:
        if zero_shot is not None:
            held_out = fuse_maps(held_out, zero_shot[: len(held_out)], Fusion.MEAN)
        scores = image_scores(held_out, rules.score_mode, rules.topk_fraction)
        threshold = threshold_from_normal_scores(scores)
        logger.info(
            "bank of %d images: held-out normal scores %.4f..%.4f, threshold %.4f",
            tokens[0].shape[0] // views_per_image,
            float(scores.min()),
            float(scores.max()),
            threshold,
        )
    return build_bank(tokens, coreset_ratio, seed, threshold)


def threshold_after_append(old_threshold: float | None, held_out_scores: torch.Tensor) -> float:
    """The threshold of a bank grown by new normal images.

    `held_out_scores` are the new images' scores against the bank before they joined it, honest
    normal scores like the leave-one-out ones. A bigger bank only lowers normal scores, so the old
    threshold stays a safe floor.
    """
    threshold = threshold_from_normal_scores(held_out_scores)
    return threshold if old_threshold is None else max(threshold, old_threshold)


def choose_answer(llm_answer: str, verdict: Verdict) -> tuple[str, AnswerSource]:
    """The LLM's answer, unless its yes/no contradicts the verdict; then the regions' answer.

    Note:
        The verdict is the detector's and stays authoritative: an operator must never read
        "no anomaly" beside a frame flagged anomalous.
    """
    if agrees(llm_answer, verdict.anomalous):
        return llm_answer, AnswerSource.LLM
    logger.debug("LLM answer %r contradicts the verdict; using the regions' answer", llm_answer)
    return answer_from_regions(verdict.anomalous, verdict.regions), AnswerSource.REGIONS


class _Clock:
    """Lap timer that waits for queued GPU work, so each lap is the stage's own time."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last = time.perf_counter()

    def lap(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.last = now - self.last, now
        return elapsed


def _batches(
    items: Sequence[Image.Image], size: int, progress: bool, description: str
) -> Iterator[Sequence[Image.Image]]:
    with tqdm(total=len(items), desc=description, unit="image", disable=not progress) as bar:
        for start in range(0, len(items), size):
            batch = items[start : start + size]
            yield batch
            bar.update(len(batch))
