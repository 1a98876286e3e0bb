"""Explainer: the LLM stage. Prompt learner + LLM with batched generation, for the frames the
explanation policy picks. It runs after the verdict is delivered; its answer updates the result."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from deployments import metrics
from deployments.bank_matcher import Match
from deployments.config import AppArgs, ExplainerOptions, from_mapping
from deployments.replica import choose_device, start_metrics
from pipeline.checkpoint import load_checkpoint
from pipeline.detector import choose_answer
from pipeline.encoder import EncoderConfig, describe_encoder
from pipeline.errors import ConfigError
from pipeline.explainer import (
    Explainer as ExplainerModel,
)
from pipeline.explainer import (
    ExplainerConfig,
    describe_findings,
    question_for,
)
from pipeline.llm import load_llm
from pipeline.postprocess import Verdict

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Answer:
    """An explanation for one frame."""

    text: str
    source: str
    """"llm", or "regions" when the LLM contradicted the verdict."""
    new_tokens: int
    seconds: float


@dataclass(frozen=True)
class _Item:
    image_embedding: np.ndarray
    anomaly_map: np.ndarray
    question: str
    findings: str
    verdict: Verdict


@serve.deployment(
    name="Explainer",
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
)
class Explainer:
    """The prompt learner and LLM of AnomalyGPT, answering in batches."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.args = from_mapping(AppArgs, args, "Explainer args")
        if not self.args.llm:
            raise ConfigError("the Explainer deployment needs an LLM (args.llm)")
        device = choose_device(self.args, "Explainer")
        encoder = EncoderConfig(
            preset=self.args.preset, model_name=self.args.model_name, weights=self.args.weights
        )
        fingerprint, embed_dim = describe_encoder(encoder)
        llm = load_llm(self.args.llm, device)
        checkpoint = None
        if self.args.checkpoint:
            checkpoint = load_checkpoint(self.args.checkpoint, fingerprint, llm=llm.identity)
        config = ExplainerConfig(llm=self.args.llm, checkpoint=self.args.checkpoint)
        self.model = ExplainerModel.from_config(config, llm, embed_dim, checkpoint)
        self.replica, self.snapshots = start_metrics(self.args, "explainer")

    def reconfigure(self, config: dict[str, Any]) -> None:
        options = from_mapping(ExplainerOptions, config, "Explainer user_config")
        self.model.max_new_tokens = options.max_new_tokens
        self.explain_batch.set_max_batch_size(options.max_batch_size)
        self.explain_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    async def explain(self, match: Match, class_name: str | None) -> Answer:
        """Explains one frame from its match (verdict, map, image embedding)."""
        verdict = match.verdict
        item = _Item(
            match.image_embedding,
            match.anomaly_map,
            question_for(class_name),
            describe_findings(verdict.anomalous, verdict.regions),
            verdict,
        )
        return await self.explain_batch(item)

    @serve.batch(max_batch_size=4, batch_wait_timeout_s=0.05)
    async def explain_batch(self, items: list[_Item]) -> list[Answer]:
        metrics.BATCH_SIZE.labels("Explainer").observe(len(items))
        return await asyncio.to_thread(self._generate, items)

    def _generate(self, items: list[_Item]) -> list[Answer]:
        started = time.perf_counter()
        with torch.inference_mode():
            embeddings = torch.from_numpy(np.stack([item.image_embedding for item in items]))
            maps = torch.from_numpy(np.stack([item.anomaly_map for item in items])).float()
            explanations = self.model.explain(
                embeddings,
                maps,
                [item.question for item in items],
                [item.findings for item in items],
            )
        seconds = (time.perf_counter() - started) / len(items)
        metrics.STAGE_LATENCY.labels("explain").observe(seconds)

        answers = []
        for item, explanation in zip(items, explanations, strict=True):
            text, source = choose_answer(explanation.text, item.verdict)
            metrics.EXPLANATIONS.labels(source.value).inc()
            metrics.LLM_TOKENS.inc(explanation.new_tokens)
            answers.append(Answer(text, source.value, explanation.new_tokens, seconds))
        return answers
