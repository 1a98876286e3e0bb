"""`BankStore`: versioned memory banks in Redis, published atomically, read whole or not at all.

A publish allocates a version (INCR) and writes every chunk and the metadata of that version under
keys nobody reads yet: pipelined, sent straight from the tensors' memory (`bankstore.wire`), with a
pending TTL so that a writer that dies leaves nothing behind. Then one Lua script checks they are
all there, makes them permanent, moves `current` forward and announces the version on the events
channel. Versions never go backwards: a publish whose version is below `current` by the time it
commits (it lost a race) is discarded, so the highest version committed stands, whole.

A reader takes `current`, then that version's metadata and chunks; the versioned keys never change
once written, so it sees one version or, if the version was garbage-collected under it, starts
again from a fresh `current`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import msgpack
import redis
import torch

from bankstore.codec import (
    BankInfo,
    ChunkMissingError,
    StageInfo,
    checksum,
    now,
    pack_info,
    split_chunks,
    stage_buffer,
    stage_bytes,
    stage_from_buffer,
    stored_stage,
    unpack_info,
)
from bankstore.connection import connect, describe_client, redis_errors
from bankstore.errors import BankCorruptError, BankNotFoundError, FingerprintMismatchError
from bankstore.keys import DEFAULT_PREFIX, KeySchema, validate_product
from bankstore.wire import Reply, get_into, set_from
from pipeline.encoder import EncoderFingerprint
from pipeline.errors import BankError
from pipeline.memory import MemoryBank, greedy_coreset

logger = logging.getLogger(__name__)

PREFIX_ENV = "DEFECTSCOPE_REDIS_PREFIX"
DEFAULT_CHUNK_BYTES = 64 * 2**20
MAX_CHUNK_BYTES = 512 * 2**20
"""Redis refuses longer strings (proto-max-bulk-len)."""
DEFAULT_KEEP_VERSIONS = 3
PENDING_TTL_S = 3600
"""Keys of a version being written expire after this unless its publish commits them."""
READ_ATTEMPTS = 5
RACE_ATTEMPTS = 8
"""How many times an append or delete that lost a race with another writer starts again."""
WAITAOF_TIMEOUT_MS = 5000
READ_BATCH_BYTES = 128 * 2**20
"""Chunk bytes asked for per round trip when reading a bank."""
SHA256_HEX = re.compile(r"[0-9a-f]{64}")

P = ParamSpec("P")
R = TypeVar("R")

# Lua scripts run atomically: no reader sees a state between two of their commands.

_COMMIT = """
-- KEYS: current, versions, products, then the new version's meta and chunk keys.
-- ARGV: version, expected current ('' accepts any lower one), product, channel, event.
-- Returns {1, version} when it became current, {0, current} when refused, and {-1, i} when
-- KEYS[i] is missing (its pending TTL ran out, or it was deleted).
local version = tonumber(ARGV[1])
for index = 4, #KEYS do
  if redis.call('EXISTS', KEYS[index]) == 0 then
    return {-1, index}
  end
end
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if (ARGV[2] ~= '' and current ~= tonumber(ARGV[2])) or version <= current then
  return {0, current}
end
for index = 4, #KEYS do
  redis.call('PERSIST', KEYS[index])
end
redis.call('SET', KEYS[1], version)
redis.call('ZADD', KEYS[2], version, version)
redis.call('SADD', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return {1, version}
"""

_DROP_VERSION = """
-- KEYS: current, versions, then the version's meta and chunk keys. ARGV: version.
-- Never drops the current version (returns -1); else the number of keys unlinked.
if tonumber(redis.call('GET', KEYS[1]) or '0') == tonumber(ARGV[1]) then
  return -1
end
redis.call('ZREM', KEYS[2], ARGV[1])
local removed = 0
for index = 3, #KEYS do
  removed = removed + redis.call('UNLINK', KEYS[index])
end
return removed
"""

_DROP_PRODUCT = """
-- KEYS: current, versions, calibration, products, then every version's meta and chunk keys.
-- ARGV: product, the newest version the caller listed ('' for none), channel, event.
-- Returns -1 when a version was committed since the caller listed them (it lists again), else
-- 1 when the product existed and 0 when it did not.
local newest = redis.call('ZREVRANGE', KEYS[2], 0, 0)
if (newest[1] or '') ~= ARGV[2] then
  return -1
end
local existed = redis.call('EXISTS', KEYS[1], KEYS[2]) > 0
for index = 5, #KEYS do
  redis.call('UNLINK', KEYS[index])
end
redis.call('UNLINK', KEYS[1], KEYS[2], KEYS[3])
redis.call('SREM', KEYS[4], ARGV[1])
if existed then
  redis.call('PUBLISH', ARGV[3], ARGV[4])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class StoredCalibration:
    """A product-level threshold, preferred to the bank's own leave-one-out threshold."""

    threshold: float
    details: dict[str, Any] = field(default_factory=dict)
    """Whatever the calibration wants to record (method, scores, sample counts); JSON-ready."""
    bank_version: int | None = None
    """The bank version that was current when it was set."""
    created: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "details": self.details,
            "bank_version": self.bank_version,
            "created": self.created,
        }


@dataclass(frozen=True)
class StoredBank:
    """A bank read from the store, with its metadata.

    `bank.threshold` is the product's calibrated threshold when one is set, else the bank's own.
    """

    bank: MemoryBank
    info: BankInfo
    calibration: StoredCalibration | None = None

    @property
    def product(self) -> str:
        return self.info.product

    @property
    def version(self) -> int:
        return self.info.version

    @property
    def threshold(self) -> float | None:
        return self.bank.threshold

    @property
    def revision(self) -> Revision:
        return Revision(self.info.version, self.calibration.created if self.calibration else None)


class Revision(NamedTuple):
    """What a cached bank must match to be up to date."""

    version: int
    calibrated: float | None
    """Creation time of the product's calibration, if it has one."""


@dataclass(frozen=True)
class PublishResult:
    """What a publish, append or import wrote."""

    product: str
    version: int
    current: bool
    """Whether this version became current (False: a higher version was published meanwhile)."""
    num_patches: tuple[int, ...]
    nbytes: int
    base_version: int | None = None


@dataclass(frozen=True)
class ProductInfo:
    """A product's stored versions, oldest first, and its calibration."""

    product: str
    current: int | None
    versions: tuple[BankInfo, ...]
    calibration: StoredCalibration | None

    @property
    def current_info(self) -> BankInfo | None:
        return next((info for info in self.versions if info.version == self.current), None)

    @property
    def nbytes(self) -> int:
        """Bytes of tensors stored over all versions."""
        return sum(info.nbytes for info in self.versions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "product": self.product,
            "current": self.current,
            "nbytes": self.nbytes,
            "versions": [info.to_dict() for info in self.versions],
            "calibration": self.calibration.to_dict() if self.calibration else None,
        }


@dataclass(frozen=True)
class BankEvent:
    """One message of the bank events channel."""

    kind: str
    """"publish", "delete" or "calibration"."""
    product: str
    version: int | None

    def to_json(self) -> str:
        return json.dumps({"event": self.kind, "product": self.product, "version": self.version})

    @classmethod
    def from_json(cls, data: bytes | str) -> BankEvent:
        fields = json.loads(data)
        version = fields.get("version")
        return cls(
            str(fields["event"]), str(fields["product"]), None if version is None else int(version)
        )


def _translated(
    method: Callable[Concatenate[BankStore, P], R],
) -> Callable[Concatenate[BankStore, P], R]:
    """Runs a store method with Redis connection errors turned into one-line user errors."""

    @functools.wraps(method)
    def wrapper(self: BankStore, *args: P.args, **kwargs: P.kwargs) -> R:
        with redis_errors(self.where):
            return method(self, *args, **kwargs)

    return wrapper


class BankStore:
    """Memory banks of every product, versioned, in one Redis database."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        keep_versions: int = DEFAULT_KEEP_VERSIONS,
        pending_ttl_s: int = PENDING_TTL_S,
    ) -> None:
        """
        Args:
            client: a redis-py client (see `bankstore.connect`); it must not decode responses.
            prefix: put before every key and the events channel.
            chunk_bytes: largest stored string; stages above it are split.
            keep_versions: versions kept per product by `collect` (the current one included).
            pending_ttl_s: how long a version being written may take before its keys expire.
        """
        if not 0 < chunk_bytes <= MAX_CHUNK_BYTES:
            raise BankError(f"chunk size {chunk_bytes} is outside 1..{MAX_CHUNK_BYTES} bytes")
        if keep_versions < 1:
            raise BankError(
                f"keep_versions must be at least 1 (the current version), got {keep_versions}"
            )
        if client.get_encoder().decode_responses:
            raise BankError("the Redis client decodes responses; banks need raw bytes")
        self.client = client
        self.keys = KeySchema(prefix)
        self.chunk_bytes = chunk_bytes
        self.keep_versions = keep_versions
        self.pending_ttl_s = pending_ttl_s
        self.where = describe_client(client)
        self._commit = client.register_script(_COMMIT)
        self._drop_version = client.register_script(_DROP_VERSION)
        self._drop_product = client.register_script(_DROP_PRODUCT)
        self._waitaof: bool | None = None
        """Whether the server takes WAITAOF; None until the first publish finds out."""

    @classmethod
    def connect(cls, url: str | None = None, prefix: str | None = None, **kwargs: Any) -> BankStore:
        """A store on the server `url` names (default `$REDIS_URL`, else the embedded server).

        Args:
            url: a redis://, rediss:// or unix:// URL.
            prefix: key prefix; None takes `$DEFECTSCOPE_REDIS_PREFIX`, else "defectscope:".
            kwargs: the other `BankStore` arguments.
        """
        if prefix is None:
            prefix = os.environ.get(PREFIX_ENV) or DEFAULT_PREFIX
        return cls(connect(url), prefix=prefix, **kwargs)

    # Writing ------------------------------------------------------------------------------------

    @_translated
    def publish(
        self,
        product: str,
        bank: MemoryBank,
        fingerprint: EncoderFingerprint,
        sources: Sequence[str],
        augment: bool,
        coreset_ratio: float | None,
        class_name: str | None = None,
    ) -> PublishResult:
        """Stores `bank` as the product's new version and makes it current (create or replace).

        Args:
            product: the product name (see `bankstore.keys.PRODUCT_RULE`).
            bank: its stages; stored as float16; `bank.threshold` is kept as the bank's threshold.
            fingerprint: the encoder that made the patch tokens.
            sources: sha256 hex of each source image.
            augment: whether rotations were added.
            coreset_ratio: the coreset ratio used, None for all patches.
            class_name: what the product is (for zero-shot prompts).

        Returns:
            The version written; `current` is False only if a higher version was committed first.
        """
        product = validate_product(product)
        sources = _validated_sources(sources)
        _check_stages(bank, fingerprint)
        stages = [stored_stage(stage, index) for index, stage in enumerate(bank.stages)]

        template = BankInfo(
            product=product,
            version=0,
            fingerprint=fingerprint,
            stages=(),
            sources=sources,
            augment=augment,
            coreset_ratio=coreset_ratio,
            threshold=bank.threshold,
            class_name=class_name,
            created=0.0,
        )
        info, current = self._write_version(template, stages, expected_base=None)
        return self._finish(info, current)

    @_translated
    def append(
        self,
        product: str,
        bank: MemoryBank,
        fingerprint: EncoderFingerprint,
        sources: Sequence[str],
        augment: bool,
        coreset_ratio: float | None = None,
        threshold: float | None = None,
        class_name: str | None = None,
        seed: int = 0,
    ) -> PublishResult:
        """Adds normal patches to a product: new version = current patches + `bank`'s.

        Concurrent appends never lose normals: the new version commits only if `current` is
        still the version it was built on; otherwise it is built again on the newer one.

        Args:
            product: the product; a product with no bank yet gets `bank` as its first version.
            bank: the new normals' stages, same dims as the stored ones.
            fingerprint: must equal the stored bank's.
            sources: sha256 hex of each new source image.
            augment: must equal the stored bank's (a bank is rotated throughout or not at all).
            coreset_ratio: re-select this fraction of the combined patches by greedy coreset.
            threshold: the threshold for the combined bank; None keeps the stored one.
            class_name: None keeps the stored one.
            seed: coreset seed.
        """
        product = validate_product(product)
        sources = _validated_sources(sources)
        _check_stages(bank, fingerprint)
        additions = [stored_stage(stage, index) for index, stage in enumerate(bank.stages)]
        if coreset_ratio is not None and not 0.0 < coreset_ratio <= 1.0:
            raise BankError(f"coreset ratio {coreset_ratio} is outside (0, 1]")

        for _ in range(RACE_ATTEMPTS):
            base_version = self.current_version(product)
            if base_version is None:
                stages, all_sources = additions, sources
                combined_threshold = threshold if threshold is not None else bank.threshold
                combined_class, ratio = class_name, coreset_ratio
            else:
                try:
                    base = self.get(product, base_version, fingerprint=fingerprint)
                except BankNotFoundError:
                    continue  # a newer version replaced it and collected it meanwhile
                _check_appendable(base.info, bank, augment)
                stages = [
                    torch.cat([old, new])
                    for old, new in zip(base.bank.stages, additions, strict=True)
                ]  # (N_old + N_new, C_i) each
                all_sources = base.info.sources + sources
                combined_threshold = threshold if threshold is not None else base.info.threshold
                combined_class = class_name or base.info.class_name
                ratio = coreset_ratio if coreset_ratio is not None else base.info.coreset_ratio
            if coreset_ratio is not None:
                stages = [
                    stage[greedy_coreset(stage, math.ceil(coreset_ratio * len(stage)), seed)]
                    for stage in stages
                ]

            template = BankInfo(
                product=product,
                version=0,
                fingerprint=fingerprint,
                stages=(),
                sources=all_sources,
                augment=augment,
                coreset_ratio=ratio,
                threshold=combined_threshold,
                class_name=combined_class,
                created=0.0,
                base_version=base_version,
            )
            info, current = self._write_version(template, stages, expected_base=base_version or 0)
            if current:
                return self._finish(info, True)
            logger.info(
                "append to %s on version %s lost a race with another writer; building again",
                product,
                base_version,
            )
        raise BankError(
            f"could not append to product {product!r}: it changed {RACE_ATTEMPTS} times while "
            "the append was being written; try again"
        )

    @_translated
    def set_calibration(
        self, product: str, threshold: float, details: dict[str, Any] | None = None
    ) -> StoredCalibration:
        """Stores the product's calibrated threshold; banks loaded from now on carry it.

        Args:
            product: a product with a stored bank.
            threshold: the image-score threshold.
            details: JSON-ready notes on how it was obtained.
        """
        product = validate_product(product)
        version = self.current_version(product)
        if version is None:
            raise self._not_found(product)
        calibration = StoredCalibration(float(threshold), dict(details or {}), version, now())
        record = msgpack.packb(
            {
                "threshold": calibration.threshold,
                "details_json": json.dumps(calibration.details),
                "bank_version": version,
                "created": calibration.created,
            }
        )
        event = BankEvent("calibration", product, version).to_json()
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self.keys.calibration(product), record)
        pipe.publish(self.keys.events, event)
        pipe.execute()
        logger.info("product %s calibrated: threshold %.4f", product, calibration.threshold)
        return calibration

    @_translated
    def get_calibration(self, product: str) -> StoredCalibration | None:
        """The product's calibrated threshold, if one was set."""
        return _unpack_calibration(
            self.client.get(self.keys.calibration(validate_product(product))), product
        )

    # Reading ------------------------------------------------------------------------------------

    @_translated
    def current_version(self, product: str) -> int | None:
        """The product's current version, None if it has no bank."""
        value = self.client.get(self.keys.current(validate_product(product)))
        return None if value is None else int(value)

    @_translated
    def revision(self, product: str) -> Revision | None:
        """Current version and calibration time in one round trip (what caches compare)."""
        product = validate_product(product)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.current(product))
        pipe.get(self.keys.calibration(product))
        current, record = pipe.execute()
        if current is None:
            return None
        calibration = _unpack_calibration(record, product)
        return Revision(int(current), calibration.created if calibration else None)

    @_translated
    def get(
        self,
        product: str,
        version: int | None = None,
        fingerprint: EncoderFingerprint | None = None,
    ) -> StoredBank:
        """Reads a bank whole: every chunk's length and checksum verified.

        Args:
            product: the product.
            version: a stored version; None reads the current one.
            fingerprint: the reader's encoder; a bank made with another is refused.

        Raises:
            BankNotFoundError: no such product or version.
            FingerprintMismatchError: the bank was made with another encoder.
            BankCorruptError: a chunk or the metadata fails its checks.
        """
        product = validate_product(product)
        for _ in range(READ_ATTEMPTS):
            wanted = version if version is not None else self.current_version(product)
            if wanted is None:
                raise self._not_found(product)
            stored = self._read(product, wanted, fingerprint, explicit=version is not None)
            if stored is not None:
                return stored
        raise BankError(
            f"product {product!r} changed {READ_ATTEMPTS} times while being read; try again"
        )

    @_translated
    def info(self, product: str) -> ProductInfo:
        """Every stored version of a product (oldest first) and its calibration."""
        product = validate_product(product)
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.current(product))
        pipe.zrange(self.keys.versions(product), 0, -1)
        pipe.get(self.keys.calibration(product))
        current, members, record = pipe.execute()
        if current is None and not members:
            raise self._not_found(product)

        versions = sorted(int(member) for member in members)
        pipe = self.client.pipeline(transaction=False)
        for version in versions:
            pipe.get(self.keys.meta(product, version))
        infos = tuple(
            unpack_info(data, product, version)
            for version, data in zip(versions, pipe.execute(), strict=True)
            if data is not None  # collected since the listing
        )
        return ProductInfo(
            product,
            None if current is None else int(current),
            infos,
            _unpack_calibration(record, product),
        )

    @_translated
    def products(self) -> list[str]:
        """Names of the products with a stored bank, sorted."""
        return sorted(member.decode() for member in self.client.smembers(self.keys.products))

    def list(self) -> list[ProductInfo]:
        """`info` of every product, sorted by name."""
        listed = []
        for product in self.products():
            try:
                listed.append(self.info(product))
            except BankNotFoundError:
                continue  # deleted since the listing
        return listed

    # Removing -----------------------------------------------------------------------------------

    @_translated
    def delete(self, product: str) -> bool:
        """Removes every version and the calibration of a product; False if it had none.

        The version counter stays, so a product published again continues from a higher version
        and caches never see a version go backwards. A publish that was still being written
        commits afterwards and brings the product back with that version.
        """
        product = validate_product(product)
        for _ in range(RACE_ATTEMPTS):
            versions = self._stored_versions(product)
            keys = [key for version in versions for key in self._version_keys(product, version)]
            result = self._drop_product(
                keys=[
                    self.keys.current(product),
                    self.keys.versions(product),
                    self.keys.calibration(product),
                    self.keys.products,
                    *keys,
                ],
                args=[
                    product,
                    str(versions[-1]) if versions else "",
                    self.keys.events,
                    BankEvent("delete", product, None).to_json(),
                ],
            )
            if result >= 0:
                if result:
                    logger.info("product %s deleted (%d versions)", product, len(versions))
                return bool(result)
        raise BankError(f"product {product!r} kept changing while being deleted; try again")

    @_translated
    def collect(self, product: str, keep: int | None = None) -> int:
        """Deletes the versions older than the newest `keep`; never the current one.

        Args:
            product: the product.
            keep: versions to keep, the current one included; None takes `keep_versions`.

        Returns:
            How many versions were deleted.
        """
        product = validate_product(product)
        keep = self.keep_versions if keep is None else keep
        if keep < 1:
            raise BankError(f"keep must be at least 1 (the current version), got {keep}")
        current = self.current_version(product)
        if current is None:
            return 0
        versions = self._stored_versions(product)
        doomed = [version for version in versions[:-keep] if version < current]

        deleted = 0
        for version in doomed:
            keys = self._version_keys(product, version)
            result = self._drop_version(
                keys=[self.keys.current(product), self.keys.versions(product), *keys],
                args=[version],
            )
            deleted += result >= 0
        if deleted:
            logger.info("product %s: collected %d old versions", product, deleted)
        return deleted

    # Watching -----------------------------------------------------------------------------------

    @_translated
    def subscribe(self) -> BankSubscription:
        """Bank events from now on (publish, delete, calibration), for caches and watchers."""
        return BankSubscription(self.client, self.keys.events, self.where)

    # Moving banks between clusters --------------------------------------------------------------

    def export(self, product: str, path: str | Path, version: int | None = None) -> BankInfo:
        """Writes one version (default: current) and the calibration to a safetensors file.

        Returns:
            The metadata of the exported version.
        """
        from bankstore.transfer import write_export

        stored = self.get(product, version)
        write_export(stored, Path(path))
        return stored.info

    def import_(self, path: str | Path, product: str | None = None) -> PublishResult:
        """Publishes the bank of an export file, under its own product name or `product`.

        The file's calibration, if any, becomes the product's calibration.
        """
        from bankstore.transfer import read_export

        exported = read_export(Path(path))
        info = exported.info
        result = self.publish(
            product or info.product,
            exported.bank,
            info.fingerprint,
            info.sources,
            info.augment,
            info.coreset_ratio,
            info.class_name,
        )
        if exported.calibration is not None and result.current:
            self.set_calibration(
                result.product, exported.calibration.threshold, exported.calibration.details
            )
        return result

    # Internals ----------------------------------------------------------------------------------

    def _write_version(
        self, template: BankInfo, stages: Sequence[torch.Tensor], expected_base: int | None
    ) -> tuple[BankInfo, bool]:
        """Writes a new version and commits it; (its metadata, whether it became current).

        Args:
            template: the metadata, with the version, stages and time still to fill in.
            stages: (N_i, C_i) float16 CPU tensors.
            expected_base: commit only if `current` is this (0: no current); None: any lower.
        """
        product = template.product
        version = int(self.client.incr(self.keys.next_version(product)))
        writes: list[tuple[str, memoryview]] = []
        stage_infos = []
        for index, stage in enumerate(stages):
            chunks = split_chunks(stage_bytes(stage), self.chunk_bytes)
            writes += [
                (self.keys.chunk(product, version, index, number), chunk)
                for number, chunk in enumerate(chunks)
            ]
            patches, dims = stage.shape
            sums = tuple(checksum(chunk) for chunk in chunks)
            stage_infos.append(StageInfo(patches, dims, self.chunk_bytes, sums))
        info = replace(template, version=version, stages=tuple(stage_infos), created=now())
        meta_key = self.keys.meta(product, version)
        chunk_keys = [key for key, _ in writes]
        writes.append((meta_key, memoryview(pack_info(info))))
        set_from(self.client, writes, self.pending_ttl_s)

        # The commit and WAITAOF share one connection: WAITAOF waits for that connection's writes.
        pipe = self.client.pipeline(transaction=False)
        self._commit(
            keys=[
                self.keys.current(product),
                self.keys.versions(product),
                self.keys.products,
                meta_key,
                *chunk_keys,
            ],
            args=[
                version,
                "" if expected_base is None else expected_base,
                product,
                self.keys.events,
                BankEvent("publish", product, version).to_json(),
            ],
            client=pipe,
        )
        if self._waitaof is not False:
            pipe.execute_command("WAITAOF", 1, 0, WAITAOF_TIMEOUT_MS)
        replies = pipe.execute(raise_on_error=False)
        if isinstance(replies[0], Exception):
            raise replies[0]
        status, value = (int(part) for part in replies[0])
        if len(replies) > 1:
            self._check_durable(replies[1], product, version)

        if status == -1:
            missing = ([meta_key, *chunk_keys])[value - 4]
            self._unlink([meta_key, *chunk_keys])
            raise BankError(
                f"version {version} of product {product!r} lost key {missing} before it was "
                f"published (pending keys expire after {self.pending_ttl_s} s); publish again"
            )
        if status == 0:
            self._unlink([meta_key, *chunk_keys])
            logger.info(
                "version %d of product %s not made current: current is %d", version, product, value
            )
            return info, False
        return info, True

    def _finish(self, info: BankInfo, current: bool) -> PublishResult:
        if current:
            logger.info(
                "product %s: version %d published (%s patches, %.1f MiB)",
                info.product,
                info.version,
                "/".join(map(str, info.num_patches)),
                info.nbytes / 2**20,
            )
            self.collect(info.product)
        return PublishResult(
            info.product, info.version, current, info.num_patches, info.nbytes, info.base_version
        )

    def _check_durable(self, reply: Any, product: str, version: int) -> None:
        if isinstance(reply, redis.ResponseError):
            # Before Redis 7.2, or with AOF off: the server has nothing to wait for.
            self._waitaof = False
            logger.debug("WAITAOF unavailable on %s (%s)", self.where, reply)
        elif isinstance(reply, Exception):
            raise reply
        else:
            self._waitaof = True
            if int(reply[0]) < 1:
                logger.warning(
                    "version %d of product %s not yet fsynced to the AOF after %d ms",
                    version,
                    product,
                    WAITAOF_TIMEOUT_MS,
                )

    def _read(
        self,
        product: str,
        version: int,
        fingerprint: EncoderFingerprint | None,
        explicit: bool,
    ) -> StoredBank | None:
        """One attempt at reading a version; None when it vanished and a fresh read may succeed."""
        pipe = self.client.pipeline(transaction=False)
        pipe.get(self.keys.meta(product, version))
        pipe.get(self.keys.calibration(product))
        data, record = pipe.execute()
        if data is None:
            return self._vanished(product, version, explicit, "its metadata key is missing")
        info = unpack_info(data, product, version)
        if fingerprint is not None and fingerprint != info.fingerprint:
            raise FingerprintMismatchError(
                f"product {product!r} version {version} was built with another encoder (stored "
                f"vs this one: {'; '.join(info.fingerprint.differences(fingerprint))}): rebuild "
                f"it with `defectscope bank add {product} IMAGE...` and this encoder"
            )

        # Each chunk is received straight into its place in its stage's buffer.
        buffers = [stage_buffer(stage) for stage in info.stages]
        keys = [
            self.keys.chunk(product, version, index, number)
            for index, stage in enumerate(info.stages)
            for number in range(stage.num_chunks)
        ]
        replies = self._get_chunks(keys, [view for _, views in buffers for view in views])
        stages = []
        start = 0
        for index, (stage, (buffer, views)) in enumerate(zip(info.stages, buffers, strict=True)):
            stage_replies = replies[start : start + len(views)]
            start += len(views)
            try:
                stages.append(
                    stage_from_buffer(buffer, views, stage_replies, stage, index, product, version)
                )
            except ChunkMissingError as missing:
                return self._vanished(product, version, explicit, str(missing))

        calibration = _unpack_calibration(record, product)
        threshold = calibration.threshold if calibration else info.threshold
        return StoredBank(MemoryBank(stages, threshold=threshold), info, calibration)

    def _get_chunks(self, keys: Sequence[str], views: Sequence[memoryview]) -> list[Reply]:
        """`get_into` in pipelines of about `READ_BATCH_BYTES`, so that Redis never holds much
        more than that in its output buffer for one reader, however large the bank."""
        replies: list[Reply] = []
        start = 0
        while start < len(keys):
            stop, batch_bytes = start, 0
            while stop < len(keys) and (stop == start or batch_bytes < READ_BATCH_BYTES):
                batch_bytes += len(views[stop])
                stop += 1
            replies += get_into(self.client, keys[start:stop], views[start:stop])
            start = stop
        return replies

    def _vanished(self, product: str, version: int, explicit: bool, what: str) -> None:
        """Decides what a missing key means: collected under the reader (None), or an error."""
        current = self.current_version(product)
        if current is None:
            raise self._not_found(product)
        if explicit:
            stored = self._stored_versions(product)
            if version not in stored:
                listed = ", ".join(map(str, stored)) or "none"
                raise BankNotFoundError(
                    f"product {product!r} has no version {version} (stored: {listed})"
                )
        elif current != version:
            logger.debug(
                "product %s version %d was collected while being read (%s); reading version %d",
                product,
                version,
                what,
                current,
            )
            return None
        raise BankCorruptError(f"product {product!r} version {version}: {what}")

    def _stored_versions(self, product: str) -> list[int]:
        return sorted(int(v) for v in self.client.zrange(self.keys.versions(product), 0, -1))

    def _version_keys(self, product: str, version: int) -> list[str]:
        """The meta and chunk keys of a version: from its metadata, else by scanning."""
        meta_key = self.keys.meta(product, version)
        data = self.client.get(meta_key)
        try:
            info = unpack_info(data, product, version) if data is not None else None
        except BankError:
            info = None
        if info is None:
            pattern = self.keys.version_pattern(product, version)
            return [meta_key, *(key.decode() for key in self.client.scan_iter(pattern, 1000))]
        return [
            meta_key,
            *(
                self.keys.chunk(product, version, index, number)
                for index, stage in enumerate(info.stages)
                for number in range(stage.num_chunks)
            ),
        ]

    def _unlink(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), 1000):
            self.client.unlink(*keys[start : start + 1000])

    def _not_found(self, product: str) -> BankNotFoundError:
        return BankNotFoundError(
            f"no memory bank is stored for product {product!r} (prefix {self.keys.prefix!r} on "
            f"{self.where}): add one with `defectscope bank add {product} IMAGE...`"
        )


class BankSubscription:
    """Bank events as they are published: iterate, or `get(timeout_s)`; close when done.

    The subscription is active on the server when the constructor returns, so no event published
    after that is missed while the connection lasts.
    """

    def __init__(self, client: redis.Redis, channel: str, where: str) -> None:
        self.where = where
        self._pubsub = client.pubsub()
        self._pubsub.subscribe(channel)
        confirmation = self._pubsub.get_message(timeout=10.0)
        if confirmation is None or confirmation["type"] != "subscribe":
            self._pubsub.close()
            raise redis.ConnectionError(f"no confirmation of SUBSCRIBE {channel} within 10 s")

    def get(self, timeout_s: float | None = None) -> BankEvent | None:
        """The next event, waiting at most `timeout_s` (None: forever); None on timeout."""
        with redis_errors(self.where):
            while True:
                message = self._pubsub.get_message(timeout=timeout_s)
                if message is None:
                    return None
                if message["type"] != "message":
                    continue
                try:
                    return BankEvent.from_json(message["data"])
                except (ValueError, KeyError, TypeError):
                    logger.warning("ignoring a malformed bank event: %r", message["data"][:200])

    def __iter__(self) -> Iterator[BankEvent]:
        while True:
            event = self.get(None)
            if event is not None:
                yield event

    def close(self) -> None:
        self._pubsub.close()

    def __enter__(self) -> BankSubscription:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _validated_sources(sources: Sequence[str]) -> tuple[str, ...]:
    if isinstance(sources, str):
        raise BankError("sources must be a list of sha256 hex digests, not one string")
    sources = tuple(sources)
    if not sources:
        raise BankError("a memory bank needs at least one source image; none were given")
    for index, source in enumerate(sources):
        if not isinstance(source, str) or SHA256_HEX.fullmatch(source) is None:
            raise BankError(f"source {index} ({source!r}) is not a lowercase sha256 hex digest")
    return sources


def _check_stages(bank: MemoryBank, fingerprint: EncoderFingerprint) -> None:
    if len(bank.stages) != len(fingerprint.tap_blocks):
        raise BankError(
            f"the bank has {len(bank.stages)} stages, the encoder {fingerprint} taps "
            f"{len(fingerprint.tap_blocks)} blocks"
        )


def _check_appendable(stored: BankInfo, bank: MemoryBank, augment: bool) -> None:
    if bank.dims != stored.dims:
        raise BankError(
            f"product {stored.product!r} stores stages of dims {stored.dims}; the new patches "
            f"have {bank.dims}"
        )
    if augment != stored.augment:
        flag = "with" if stored.augment else "without"
        raise BankError(
            f"product {stored.product!r} was built {flag} rotation augmentation; append {flag} "
            "it too (a bank is rotated throughout or not at all)"
        )


def _unpack_calibration(record: bytes | None, product: str) -> StoredCalibration | None:
    if record is None:
        return None
    try:
        fields = msgpack.unpackb(record)
        return StoredCalibration(
            float(fields["threshold"]),
            json.loads(fields["details_json"]),
            fields.get("bank_version"),
            float(fields["created"]),
        )
    except (KeyError, TypeError, ValueError, msgpack.UnpackException) as error:
        raise BankCorruptError(
            f"calibration of product {product!r} is unreadable ({type(error).__name__}: {error})"
        ) from error
