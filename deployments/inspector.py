"""One frame through the deployments: decode, encode, match, store the verdict, then (when the
policy asks) explain and store the explained result. Shared by Ingress and StreamIngest.

The encoder's output goes from the EncoderDecoder replica to the BankMatcher as an object
reference (the deployments batch concurrent frames themselves): the patch tokens never pass
through the replica that runs this. The match carries the image embedding on to the Explainer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from PIL import Image
from ray.serve.handle import DeploymentHandle

from deployments import metrics
from deployments.bank_matcher import Match
from deployments.config import IngressOptions
from deployments.encoder_decoder import EncodeRequest
from deployments.messages import (
    ErrorCode,
    ExplanationStatus,
    Frame,
    FrameError,
    Result,
    error_result,
)
from deployments.results import ResultStore
from pipeline.detector import ExplainPolicy
from pipeline.images import square_pixels
from pipeline.postprocess import answer_from_regions

logger = logging.getLogger(__name__)

MAX_PENDING_EXPLANATIONS = 256
"""Explanations queued per replica at most; beyond it frames keep their regions' answer.

TODO(#4): queued explanations live in this replica's memory; if it stops, their frames keep
`explanation: pending` (the verdicts are stored). A stream of pending explanations would make them
survive a replica."""


@dataclass(frozen=True)
class Inspected:
    """A frame's stored result, with the decoded image and match for heatmaps."""

    result: Result
    image: Image.Image | None = None
    match: Match | None = None


class Inspector:
    """The pipeline of handles, with result storage and metrics."""

    def __init__(
        self,
        encoder: DeploymentHandle,
        matcher: DeploymentHandle,
        explainer: DeploymentHandle | None,
        results: ResultStore,
        options: IngressOptions,
    ) -> None:
        self.encoder = encoder
        self.matcher = matcher
        self.explainer = explainer
        self.results = results
        self.options = options
        self._model: dict[str, Any] | None = None
        self._explanations: set[asyncio.Task[None]] = set()

    async def model_info(self) -> dict[str, Any]:
        """The encoder's input size and fingerprint, asked once."""
        if self._model is None:
            self._model = await self.encoder.info.remote()
        return self._model

    async def inspect(self, frame: Frame) -> Inspected:
        """Inspects a frame and stores its result (an error result for a bad frame).

        Raises only for failures worth retrying (a replica died, the system is overloaded);
        a frame that is wrong in itself always ends with a stored error result.
        """
        metrics.INFLIGHT.inc()
        try:
            return await self._inspect(frame)
        except FrameError as error:
            result = error_result(frame, error.code, str(error), {})
            await self.store(result)
            return Inspected(result)
        finally:
            metrics.INFLIGHT.dec()

    async def _inspect(self, frame: Frame) -> Inspected:
        model = await self.model_info()
        started = time.perf_counter()
        image = await asyncio.to_thread(frame.decode)
        pixels = await asyncio.to_thread(square_pixels, image, model["image_size"])
        decode_seconds = time.perf_counter() - started
        metrics.STAGE_LATENCY.labels("decode").observe(decode_seconds)

        encoded = self.encoder.encode.remote(EncodeRequest(pixels, frame.class_name))
        match: Match = await self.matcher.match.remote(frame.product, encoded, image.size)
        verdict = match.verdict

        policy = self.options.policy_for(frame.line, frame.explain)
        explain = self.explainer is not None and (
            policy is ExplainPolicy.ALWAYS
            or (policy is ExplainPolicy.ANOMALOUS and verdict.anomalous)
        )
        result = Result(
            frame_id=frame.frame_id,
            line=frame.line,
            camera=frame.camera,
            product=frame.product,
            timestamp=frame.timestamp,
            received_at=frame.received_at,
            completed_at=time.time(),
            score=verdict.score,
            anomalous=verdict.anomalous,
            threshold=verdict.threshold,
            regions=tuple(region.to_dict() for region in verdict.regions),
            answer=answer_from_regions(verdict.anomalous, verdict.regions),
            answer_source="regions",
            explanation=(ExplanationStatus.PENDING if explain else ExplanationStatus.NONE).value,
            timings={
                "decode": round(decode_seconds, 6),
                "encode": round(match.encode_seconds, 6),
                "match": round(match.seconds, 6),
                "total": round(time.time() - frame.received_at, 6),
            },
            bank_version=match.bank_version,
            model=model["fingerprint"],
        )
        written = await self.store(result)
        if explain and written:
            self._schedule_explanation(frame, result, match)
        return Inspected(result, image, match)

    async def store(self, result: Result) -> bool:
        """Writes a verdict (once per frame id) and counts it."""
        written = await self.results.write_verdict(result)
        if written:
            line = metrics.LINE(result.line)
            if result.status == "error":
                outcome = result.error_code or ErrorCode.FAILED.value
            else:
                outcome = "anomalous" if result.anomalous else "normal"
                metrics.ANOMALY_SCORE.labels(metrics.PRODUCT(result.product)).observe(
                    result.score or 0.0
                )
                if result.anomalous:
                    metrics.ANOMALIES.labels(line).inc()
            metrics.FRAMES.labels(line, outcome).inc()
            metrics.FRAME_LATENCY.labels(line).observe(max(0.0, time.time() - result.received_at))
        return written

    def _schedule_explanation(self, frame: Frame, result: Result, match: Match) -> None:
        if len(self._explanations) >= MAX_PENDING_EXPLANATIONS:
            metrics.EXPLANATIONS.labels("skipped").inc()
            skipped = replace(result, explanation=ExplanationStatus.FAILED.value)
            task = asyncio.create_task(self._store_explanation(skipped))
        else:
            task = asyncio.create_task(self._explain(frame, result, match))
        self._explanations.add(task)
        task.add_done_callback(self._explanations.discard)

    async def _explain(self, frame: Frame, result: Result, match: Match) -> None:
        try:
            answer = await self.explainer.explain.remote(match, frame.class_name)
            explained = result.with_explanation(
                answer.text, answer.source, ExplanationStatus.DONE, answer.seconds
            )
        except Exception as error:  # the verdict stands; the explanation is best effort
            logger.warning("explanation of frame %s failed: %s", frame.frame_id, error)
            metrics.EXPLANATIONS.labels("failed").inc()
            explained = replace(result, explanation=ExplanationStatus.FAILED.value)
        await self._store_explanation(explained)

    async def _store_explanation(self, result: Result) -> None:
        try:
            await self.results.write_explanation(result)
        except Exception as error:  # Redis down: the verdict is stored; log and move on
            logger.warning("explanation of frame %s not stored: %s", result.frame_id, error)
