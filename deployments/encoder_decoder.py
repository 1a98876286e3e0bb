"""EncoderDecoder: the GPU stage. Batches frames through the frozen ViT (stage taps) and, with a
trained decoder, the zero-shot map (Eq. 1)."""

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
from deployments.config import AppArgs, EncoderOptions, from_mapping
from deployments.replica import choose_device, start_metrics
from pipeline.detector import Detector, DetectorConfig
from pipeline.encoder import EncoderConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodeRequest:
    """One frame, already resized to the encoder's input size on a CPU replica."""

    pixels: np.ndarray
    """(S, S, 3) uint8."""
    class_name: str | None = None


@dataclass(frozen=True)
class Encoded:
    """The encoder's output for one frame, in the compact form that travels between replicas."""

    patch_tokens: np.ndarray
    """(stages, L, C_vis) float16."""
    image_embedding: np.ndarray
    """(C_emb,) float32, L2-normalised."""
    zero_shot_map: np.ndarray | None
    """(S, S) float16; only with a trained decoder."""
    fingerprint: str
    map_size: int
    """Side S of the maps: the encoder's input size."""
    seconds: float
    """This frame's share of its batch's encode time."""


@serve.deployment(
    name="EncoderDecoder",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.5, "num_gpus": 0},
)
class EncoderDecoder:
    """Frozen open_clip ViT plus the zero-shot decoder, with dynamic batching."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.args = from_mapping(AppArgs, args, "EncoderDecoder args")
        device = choose_device(self.args, "EncoderDecoder")
        encoder = EncoderConfig(
            preset=self.args.preset, model_name=self.args.model_name, weights=self.args.weights
        )
        self.detector = Detector(
            DetectorConfig(encoder=encoder, checkpoint=self.args.checkpoint, device=device)
        )
        self.fingerprint = str(self.detector.encoder.fingerprint)
        self.replica, self.snapshots = start_metrics(self.args, "encoder")

    def reconfigure(self, config: dict[str, Any]) -> None:
        options = from_mapping(EncoderOptions, config, "EncoderDecoder user_config")
        self.encode_batch.set_max_batch_size(options.max_batch_size)
        self.encode_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)
        if options.torch_threads and self.detector.device.type == "cpu":
            torch.set_num_threads(options.torch_threads)

    @property
    def image_size(self) -> int:
        return self.detector.image_size

    def info(self) -> dict[str, Any]:
        """What the ingress needs to prepare frames: input size and model fingerprint."""
        return {
            "image_size": self.image_size,
            "fingerprint": self.fingerprint,
            "fingerprint_dict": self.detector.encoder.fingerprint.to_dict(),
            "zero_shot": self.detector.has_trained_decoder,
        }

    async def encode(self, request: EncodeRequest) -> Encoded:
        """One frame, batched with concurrent calls."""
        return await self.encode_batch(request)

    async def encode_many(self, requests: list[EncodeRequest]) -> list[Encoded]:
        """A batch the caller formed already (the Ingress batches concurrent frames): one handle
        call for many frames, which is what keeps Serve's per-call cost off each frame."""
        metrics.BATCH_SIZE.labels("EncoderDecoder").observe(len(requests))
        return await asyncio.to_thread(self._encode, requests)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def encode_batch(self, requests: list[EncodeRequest]) -> list[Encoded]:
        metrics.BATCH_SIZE.labels("EncoderDecoder").observe(len(requests))
        # In a thread, so the replica's event loop keeps accepting the next batch's requests.
        return await asyncio.to_thread(self._encode, requests)

    def _encode(self, requests: list[EncodeRequest]) -> list[Encoded]:
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.detector.encode(np.stack([request.pixels for request in requests]))
            zero_shot = None
            if self.detector.has_trained_decoder:
                names = [request.class_name for request in requests]
                zero_shot = self.detector.zero_shot_maps(output, names).half().cpu().numpy()
            tokens = torch.stack(output.patch_tokens, dim=1)  # (B, stages, L, C_vis)
            tokens = tokens.half().cpu().numpy()
            embeddings = output.image_embeddings.float().cpu().numpy()  # (B, C_emb)
        seconds = (time.perf_counter() - started) / len(requests)
        metrics.STAGE_LATENCY.labels("encode").observe(seconds)
        return [
            Encoded(
                tokens[index],
                embeddings[index],
                None if zero_shot is None else zero_shot[index],
                self.fingerprint,
                self.image_size,
                seconds,
            )
            for index in range(len(requests))
        ]
