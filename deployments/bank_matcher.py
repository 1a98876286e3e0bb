"""BankMatcher: the few-shot stage. Caches each product's memory bank on its device (LRU), follows
new versions as bankstore announces them, and turns patch tokens into maps and verdicts (Eq. 2,
fusion, regions) in batches."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ray import serve

from bankstore import BankCache, BankNotFoundError, BankStore, FingerprintMismatchError
from deployments import metrics
from deployments.config import AppArgs, MatcherOptions, from_mapping
from deployments.encoder_decoder import Encoded
from deployments.messages import ErrorCode, FrameError
from deployments.replica import choose_device, start_metrics
from pipeline.detector import DEFAULT_THRESHOLDS
from pipeline.encoder import EncoderConfig, describe_encoder
from pipeline.errors import ConfigError
from pipeline.memory import MemoryBank
from pipeline.postprocess import DecisionRules, Fusion, ScoreMode, Verdict, decide, fuse_maps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """The verdict for one frame, with the map the explainer and heatmaps need."""

    verdict: Verdict
    anomaly_map: np.ndarray
    """(S, S) float16."""
    image_embedding: np.ndarray
    """(C_emb,) float32, passed along from the encoder for the explainer's image token."""
    bank_version: int
    seconds: float
    """This frame's share of its batch's matching time."""
    encode_seconds: float
    """The encoder's time for this frame, passed along."""


@dataclass(frozen=True)
class _Item:
    product: str
    encoded: Encoded
    image_size: tuple[int, int]


@serve.deployment(
    name="BankMatcher",
    max_ongoing_requests=64,
    ray_actor_options={"num_cpus": 0.25, "num_gpus": 0},
)
class BankMatcher:
    """Memory banks from Redis, cached per replica, matched in batches."""

    def __init__(self, args: dict[str, Any] | None = None) -> None:
        self.args = from_mapping(AppArgs, args, "BankMatcher args")
        self.device = torch.device(choose_device(self.args, "BankMatcher"))
        encoder = EncoderConfig(
            preset=self.args.preset, model_name=self.args.model_name, weights=self.args.weights
        )
        self.fingerprint, _ = describe_encoder(encoder)
        self.store = BankStore.connect(self.args.redis_url, prefix=self.args.redis_prefix)
        self.options = MatcherOptions()
        self.cache = self._new_cache(self.options)
        self.replica, self.snapshots = start_metrics(self.args, "matcher")

    def _new_cache(self, options: MatcherOptions) -> BankCache:
        return BankCache(
            self.store,
            device=self.device,
            capacity=options.cache_capacity,
            check_interval_s=options.check_interval_s,
            fingerprint=self.fingerprint,
        )

    def reconfigure(self, config: dict[str, Any]) -> None:
        options = from_mapping(MatcherOptions, config, "BankMatcher user_config")
        Fusion(options.fusion), ScoreMode(options.score_mode)  # validate before switching
        if (options.cache_capacity, options.check_interval_s) != (
            self.options.cache_capacity,
            self.options.check_interval_s,
        ):
            old, self.cache = self.cache, self._new_cache(options)
            old.close()
        self.options = options
        self.match_batch.set_max_batch_size(options.max_batch_size)
        self.match_batch.set_batch_wait_timeout_s(options.batch_wait_timeout_s)

    async def match(self, product: str, encoded: Encoded, image_size: tuple[int, int]) -> Match:
        """Few-shot map, fusion and verdict for one encoded frame of `product`."""
        result = await self.match_batch(_Item(product, encoded, tuple(image_size)))
        if isinstance(result, Exception):
            raise result  # a per-item failure (unknown product) fails only its own request
        return result

    def bank_versions(self) -> dict[str, int]:
        return self.cache.versions()

    def rules(self) -> DecisionRules:
        """How this matcher scores maps (the ingress calibrates new banks with the same rules)."""
        options = self.options
        return DecisionRules(
            ScoreMode(options.score_mode), options.topk_fraction, options.min_region_area
        )

    async def match_many(
        self, products: list[str], encoded: list[Encoded], image_sizes: list[tuple[int, int]]
    ) -> list[Match | Exception]:
        """A batch the caller formed already (the Ingress batches concurrent frames): one handle
        call for many frames. An unknown product fails only its own entries (an exception in the
        list)."""
        items = [
            _Item(product, item, tuple(size))
            for product, item, size in zip(products, encoded, image_sizes, strict=True)
        ]
        return await self.match_items(items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def match_batch(self, items: list[_Item]) -> list[Match | Exception]:
        return await self.match_items(items)

    async def match_items(self, items: list[_Item]) -> list[Match | Exception]:
        metrics.BATCH_SIZE.labels("BankMatcher").observe(len(items))
        by_product: dict[str, list[int]] = defaultdict(list)
        for index, item in enumerate(items):
            by_product[item.product].append(index)

        results: list[Match | Exception] = [None] * len(items)  # type: ignore[list-item]
        for product, indices in by_product.items():
            try:
                stored = await asyncio.to_thread(self.cache.get, product)
            except BankNotFoundError as error:
                failure: Exception = FrameError(ErrorCode.UNKNOWN_PRODUCT, str(error))
            except FingerprintMismatchError as error:
                failure = FrameError(ErrorCode.BANK_MISMATCH, str(error))
            else:
                group = [items[index] for index in indices]
                matches = await asyncio.to_thread(
                    self._match_group, stored.bank, stored.version, group
                )
                for index, match in zip(indices, matches, strict=True):
                    results[index] = match
                self._record_bank(product, stored.bank, stored.version)
                continue
            for index in indices:
                results[index] = failure
        return results

    def _match_group(self, bank: MemoryBank, version: int, items: list[_Item]) -> list[Match]:
        started = time.perf_counter()
        options = self.options
        with torch.inference_mode():
            tokens = torch.from_numpy(np.stack([item.encoded.patch_tokens for item in items]))
            tokens = tokens.to(self.device)  # (B, stages, L, C)
            stages = [tokens[:, stage] for stage in range(tokens.shape[1])]
            fewshot = bank.anomaly_map(stages, items[0].encoded.map_size, self.device)  # (B, S, S)
            zero_shot = None
            if _has_zero_shot(items):
                maps = np.stack([item.encoded.zero_shot_map for item in items])
                zero_shot = torch.from_numpy(maps).float().to(self.device)
            fusion = Fusion(options.fusion)
            if fusion in (Fusion.ZEROSHOT, Fusion.MEAN) and zero_shot is None:
                raise ConfigError(f"{fusion.value} fusion needs a trained decoder checkpoint")
            anomaly_maps = fuse_maps(fewshot, zero_shot, fusion)
            threshold = self._threshold(items[0].product, bank, fusion)
            sizes = [item.image_size for item in items]
            verdicts = decide(anomaly_maps, threshold, sizes, self.rules())
            maps_half = anomaly_maps.half().cpu().numpy()
        seconds = (time.perf_counter() - started) / len(items)
        metrics.STAGE_LATENCY.labels("match").observe(seconds)
        return [
            Match(
                verdict,
                maps_half[index],
                item.encoded.image_embedding,
                version,
                seconds,
                item.encoded.seconds,
            )
            for index, (verdict, item) in enumerate(zip(verdicts, items, strict=True))
        ]

    def _threshold(self, product: str, bank: MemoryBank, fusion: Fusion) -> float:
        """Configured override, else the stored calibration (or the bank's own), else a default."""
        if product in self.options.thresholds:
            return float(self.options.thresholds[product])
        if bank.threshold is not None and fusion is not Fusion.ZEROSHOT:
            return bank.threshold
        if self.options.default_threshold is not None:
            return self.options.default_threshold
        return DEFAULT_THRESHOLDS[Fusion.FEWSHOT if fusion is Fusion.AUTO else fusion]

    def _record_bank(self, product: str, bank: MemoryBank, version: int) -> None:
        label = metrics.PRODUCT(product)
        metrics.BANK_PATCHES.labels(label).set(sum(bank.num_patches))
        metrics.BANK_BYTES.labels(label).set(self.cache.cached_bytes().get(product, bank.nbytes))
        metrics.BANK_VERSION.labels(label).set(version)


def _has_zero_shot(items: list[_Item]) -> bool:
    return all(item.encoded.zero_shot_map is not None for item in items)
