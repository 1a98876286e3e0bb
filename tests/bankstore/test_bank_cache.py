"""BankCache: prepared banks, reloads on events and on missed events, LRU eviction, deletion."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bankstore import (
    BankCache,
    BankNotFoundError,
    BankStore,
    EmbeddedRedis,
    FingerprintMismatchError,
    RedisUnavailableError,
    connect,
)
from pipeline.encoder import EncoderFingerprint

pytestmark = pytest.mark.redis

WAIT_S = 10


def test_a_cached_bank_comes_prepared_and_is_served_from_memory(store, fingerprint, banks):
    store.publish("washer", banks.random(0), fingerprint, banks.sources(1), False, None)
    with BankCache(store, check_interval_s=3600) as cache:
        first = cache.get("washer")
        assert cache.get("washer") is first
        prepared = first.bank.prepared("cpu")
        assert prepared[0].dtype == torch.float32
        expected = F.normalize(first.bank.stages[0].float(), dim=-1)
        assert torch.allclose(prepared[0], expected)
        assert cache.versions() == {"washer": 1}
        # float16 stages plus float32 normalised copies
        assert cache.cached_bytes() == {"washer": 4 * 24 * 32 * (2 + 4)}


def test_a_publish_event_reloads_the_cached_bank(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    with BankCache(store, check_interval_s=3600) as cache:
        assert cache.get("washer").version == 1
        store.publish("washer", banks.marked(2), fingerprint, banks.sources(1), False, None)
        assert cache.wait_for("washer", 2, WAIT_S)
        assert banks.marker_of(cache.get("washer").bank) == 2


def test_a_missed_event_is_caught_by_the_revision_check(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    with BankCache(store, check_interval_s=0.0, listen=False) as cache:
        assert cache.get("washer").version == 1
        store.publish("washer", banks.marked(2), fingerprint, banks.sources(1), False, None)
        assert banks.marker_of(cache.get("washer").bank) == 2
        store.set_calibration("washer", 0.9)
        assert cache.get("washer").threshold == pytest.approx(0.9)


def test_within_the_check_interval_the_cache_does_not_ask_redis(store, fingerprint, banks):
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    with BankCache(store, check_interval_s=3600, listen=False) as cache:
        cache.get("washer")
        store.publish("washer", banks.marked(2), fingerprint, banks.sources(1), False, None)
        assert cache.get("washer").version == 1


def test_the_least_recently_used_product_is_evicted(store, fingerprint, banks) -> None:
    for marker, product in enumerate(["a", "b", "c"]):
        store.publish(product, banks.marked(marker), fingerprint, banks.sources(1), False, None)
    with BankCache(store, capacity=2, check_interval_s=3600, listen=False) as cache:
        cache.get("a")
        cache.get("b")
        cache.get("a")  # b is now the least recently used
        cache.get("c")
        assert set(cache.versions()) == {"a", "c"}


def test_a_deleted_product_leaves_the_cache(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    with BankCache(store, check_interval_s=3600) as cache:
        cache.get("washer")
        store.delete("washer")
        assert cache.wait_for("washer", None, WAIT_S)
        with pytest.raises(BankNotFoundError):
            cache.get("washer")


def test_a_bank_of_another_encoder_is_refused(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    other = EncoderFingerprint("ViT-H-14", "sha256:" + "ab" * 32, (8, 16, 24, 32), 224)
    with (
        BankCache(store, fingerprint=other, listen=False) as cache,
        pytest.raises(FingerprintMismatchError, match="model_name defectscope-tiny vs ViT-H-14"),
    ):
        cache.get("washer")


def test_cached_banks_keep_serving_while_redis_is_down(tmp_path, fingerprint, banks) -> None:
    server = EmbeddedRedis(tmp_path / "redis")
    store = BankStore(connect(server.start()), chunk_bytes=512)
    try:
        store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
        with BankCache(store, check_interval_s=0.0) as cache:
            cache.get("washer")
            server.stop()
            assert banks.marker_of(cache.get("washer").bank) == 1
            with pytest.raises(RedisUnavailableError, match="cannot reach Redis"):
                cache.get("bolt")
    finally:
        server.stop()
