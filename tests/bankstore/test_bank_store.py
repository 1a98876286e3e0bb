"""BankStore against a real Redis: publish and read, versions, chunks, checksums, fingerprints,
appends, garbage collection, deletion, calibration, events, and concurrent readers and writers."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
import redis
import torch

from bankstore import (
    BankCorruptError,
    BankEvent,
    BankNotFoundError,
    BankStore,
    FingerprintMismatchError,
    ProductNameError,
)
from pipeline.encoder import EncoderFingerprint
from pipeline.errors import BankError
from pipeline.memory import MemoryBank

pytestmark = pytest.mark.redis

JOIN_TIMEOUT_S = 60


def test_publish_then_get_returns_the_same_bank(store, fingerprint, banks) -> None:
    bank = banks.random(0)
    result = store.publish("washer", bank, fingerprint, banks.sources(3), False, None, "washer")

    assert (result.version, result.current) == (1, True)
    assert result.num_patches == (24,) * 4
    stored = store.get("washer", fingerprint=fingerprint)
    for original, loaded in zip(bank.stages, stored.bank.stages, strict=True):
        assert loaded.dtype == torch.float16
        assert torch.equal(loaded, original.half())
    info = stored.info
    assert (info.product, info.version, info.fingerprint) == ("washer", 1, fingerprint)
    assert info.sources == tuple(banks.sources(3))
    assert (info.augment, info.coreset_ratio, info.class_name) == (False, None, "washer")
    assert stored.threshold == pytest.approx(0.3)
    assert store.current_version("washer") == 1


def test_versions_count_up_and_old_ones_stay_readable(store, fingerprint, banks) -> None:
    for marker in (1, 2, 3):
        store.publish("washer", banks.marked(marker), fingerprint, banks.sources(1), False, None)

    assert store.current_version("washer") == 3
    assert banks.marker_of(store.get("washer").bank) == 3
    assert banks.marker_of(store.get("washer", version=1).bank) == 1
    info = store.info("washer")
    assert info.current == 3
    assert [version.version for version in info.versions] == [1, 2, 3]


def test_stage_above_the_chunk_size_is_split_and_reassembled(
    client, prefix, fingerprint, banks, monkeypatch
) -> None:
    chunk_bytes = 2**20
    store = BankStore(client, prefix=prefix, chunk_bytes=chunk_bytes)
    monkeypatch.setattr("bankstore.store.READ_BATCH_BYTES", 2 * chunk_bytes)  # several round trips
    # 1,300 x 1,024 float16 = 2.54 MiB per stage: two full chunks and a shorter last one.
    bank = banks.random(1, patches=1300, dims=1024)
    store.publish("large", bank, fingerprint, banks.sources(1), False, None)

    stage_bytes = 1300 * 1024 * 2
    lengths = [client.strlen(store.keys.chunk("large", 1, 0, number)) for number in range(3)]
    assert lengths == [chunk_bytes, chunk_bytes, stage_bytes - 2 * chunk_bytes]
    assert not client.exists(store.keys.chunk("large", 1, 0, 3))
    assert store.get("large").info.stages[0].num_chunks == 3
    for original, loaded in zip(bank.stages, store.get("large").bank.stages, strict=True):
        assert torch.equal(loaded, original.half())


def test_stage_of_exactly_two_chunks_has_no_empty_third(client, prefix, fingerprint, banks):
    store = BankStore(client, prefix=prefix, chunk_bytes=48 * 32)  # 48 x 32 float16 = 2 chunks
    store.publish("even", banks.random(2, patches=48), fingerprint, banks.sources(1), False, None)
    assert store.get("even").info.num_chunks == 8
    assert not client.exists(store.keys.chunk("even", 1, 3, 2))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-1] + bytes([data[-1] ^ 1]), "fails its checksum"),
        (lambda data: data[:-2], "is 510 bytes, expected 512"),
    ],
    ids=["flipped-bit", "truncated"],
)
def test_a_damaged_chunk_is_refused_naming_where_it_is(store, fingerprint, banks, damage, message):
    store.publish("washer", banks.random(3), fingerprint, banks.sources(1), False, None)
    key = store.keys.chunk("washer", 1, 2, 1)
    store.client.set(key, damage(store.client.get(key)))

    with pytest.raises(BankCorruptError) as error:
        store.get("washer")
    assert "product 'washer' version 1 stage 2 chunk 1" in str(error.value)
    assert message in str(error.value)


def test_a_missing_chunk_of_the_current_version_is_corruption(store, fingerprint, banks) -> None:
    store.publish("washer", banks.random(4), fingerprint, banks.sources(1), False, None)
    store.client.delete(store.keys.chunk("washer", 1, 1, 0))
    with pytest.raises(BankCorruptError, match="version 1: stage 1 chunk 0 is missing"):
        store.get("washer")


def test_unreadable_metadata_is_corruption(store, fingerprint, banks) -> None:
    store.publish("washer", banks.random(5), fingerprint, banks.sources(1), False, None)
    store.client.set(store.keys.meta("washer", 1), b"\xc1not msgpack")
    with pytest.raises(BankCorruptError, match="metadata of product 'washer' version 1"):
        store.get("washer")


def test_a_bank_of_another_encoder_is_refused(store, fingerprint, banks) -> None:
    store.publish("washer", banks.random(6), fingerprint, banks.sources(1), False, None)
    other = EncoderFingerprint("defectscope-tiny", "random:1", (2, 4, 6, 8), 224)

    with pytest.raises(FingerprintMismatchError) as error:
        store.get("washer", fingerprint=other)
    assert "weights random:0 vs random:1" in str(error.value)
    assert "defectscope bank add washer" in str(error.value)
    with pytest.raises(FingerprintMismatchError):
        store.append("washer", banks.random(7), other, banks.sources(1), False)


def test_a_bank_that_does_not_fit_the_fingerprint_is_refused(store, fingerprint, banks) -> None:
    three_stages = MemoryBank(banks.random(8).stages[:3])
    with pytest.raises(BankError, match="3 stages, the encoder"):
        store.publish("washer", three_stages, fingerprint, banks.sources(1), False, None)


def test_a_bank_without_source_images_is_refused(store, fingerprint, banks) -> None:
    with pytest.raises(BankError, match="at least one source image"):
        store.publish("washer", banks.random(9), fingerprint, [], False, None)
    with pytest.raises(BankError, match="not a lowercase sha256"):
        store.publish("washer", banks.random(9), fingerprint, ["washer_00.jpg"], False, None)
    with pytest.raises(BankError, match="at least one stage"):
        MemoryBank([])
    assert store.current_version("washer") is None


@pytest.mark.parametrize("name", ["", "a:b", "../etc", "with space", "-leading", "x" * 129, "é"])
def test_product_names_are_validated(store, name: str) -> None:
    with pytest.raises(ProductNameError, match="letters, digits"):
        store.get(name)


@pytest.mark.parametrize("name", ["washer", "Line-3.cam_2", "x" * 128, "0"])
def test_valid_product_names_pass(store, fingerprint, banks, name: str) -> None:
    store.publish(name, banks.random(10), fingerprint, banks.sources(1), False, None)
    assert store.get(name).product == name


def test_an_unknown_product_says_how_to_add_it(store) -> None:
    with pytest.raises(BankNotFoundError) as error:
        store.get("ghost")
    assert "defectscope bank add ghost IMAGE..." in str(error.value)
    with pytest.raises(BankNotFoundError):
        store.info("ghost")


def test_an_unknown_version_lists_the_stored_ones(store, fingerprint, banks) -> None:
    store.publish("washer", banks.random(11), fingerprint, banks.sources(1), False, None)
    with pytest.raises(BankNotFoundError, match=r"no version 7 \(stored: 1\)"):
        store.get("washer", version=7)


def test_collect_keeps_the_newest_versions_and_the_current(client, prefix, fingerprint, banks):
    store = BankStore(client, prefix=prefix, chunk_bytes=512, keep_versions=2)
    for marker in range(1, 6):
        store.publish("washer", banks.marked(marker), fingerprint, banks.sources(1), False, None)

    assert [info.version for info in store.info("washer").versions] == [4, 5]
    for version in (1, 2, 3):
        assert not client.exists(store.keys.meta("washer", version))
        assert not list(client.scan_iter(store.keys.version_pattern("washer", version)))

    assert store.collect("washer", keep=1) == 1
    assert store.collect("washer", keep=1) == 0
    assert [info.version for info in store.info("washer").versions] == [5]
    assert banks.marker_of(store.get("washer").bank) == 5
    with pytest.raises(BankError, match="at least 1"):
        store.collect("washer", keep=0)


def test_delete_removes_everything_but_the_version_counter(store, fingerprint, banks) -> None:
    for marker in (1, 2):
        store.publish("washer", banks.marked(marker), fingerprint, banks.sources(1), False, None)
    store.publish("bolt", banks.marked(9), fingerprint, banks.sources(1), False, None)
    store.set_calibration("washer", 0.5)

    assert store.delete("washer") is True
    assert store.delete("washer") is False
    assert store.products() == ["bolt"]
    with pytest.raises(BankNotFoundError):
        store.get("washer")
    remaining = {
        key.decode() for key in store.client.scan_iter(f"{store.keys.prefix}bank:washer:*")
    }
    assert remaining == {store.keys.next_version("washer")}

    again = store.publish("washer", banks.marked(3), fingerprint, banks.sources(1), False, None)
    assert again.version == 3  # versions never repeat, so caches never see one go backwards


def test_list_gives_every_product_with_its_stats(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(2), False, None)
    store.publish("washer", banks.marked(2, patches=30), fingerprint, banks.sources(3), True, 0.5)
    store.publish("bolt", banks.marked(3), fingerprint, banks.sources(1), False, None)

    listed = store.list()
    assert [product.product for product in listed] == ["bolt", "washer"]
    washer = listed[1]
    assert washer.current == 2
    assert washer.current_info.num_patches == (30,) * 4
    assert washer.current_info.nbytes == 4 * 30 * 32 * 2
    assert washer.nbytes == 4 * (24 + 30) * 32 * 2
    assert (washer.current_info.augment, washer.current_info.coreset_ratio) == (True, 0.5)
    assert len(washer.current_info.sources) == 3
    assert washer.to_dict()["versions"][1]["fingerprint"] == fingerprint.to_dict()


def test_append_adds_the_new_normals_to_the_current_bank(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(2), False, None, "washer")
    result = store.append(
        "washer", banks.marked(2, patches=8), fingerprint, banks.sources(1, "new"), False, None, 0.4
    )

    assert (result.version, result.base_version, result.current) == (2, 1, True)
    stored = store.get("washer")
    assert stored.bank.num_patches == (32,) * 4
    assert torch.equal(stored.bank.stages[0][:24], torch.full((24, 32), 1.0, dtype=torch.float16))
    assert torch.equal(stored.bank.stages[0][24:], torch.full((8, 32), 2.0, dtype=torch.float16))
    assert stored.info.sources == tuple(banks.sources(2) + banks.sources(1, "new"))
    assert (stored.threshold, stored.info.class_name, stored.info.base_version) == (
        pytest.approx(0.4),
        "washer",
        1,
    )


def test_append_can_re_select_a_coreset_of_the_combined_patches(store, fingerprint, banks):
    store.publish("washer", banks.random(12), fingerprint, banks.sources(1), False, None)
    store.append("washer", banks.random(13), fingerprint, banks.sources(1, "b"), False, 0.25)
    stored = store.get("washer")
    assert stored.bank.num_patches == (12,) * 4  # a quarter of 24 + 24
    assert stored.info.coreset_ratio == 0.25
    assert stored.threshold == pytest.approx(0.3)  # kept from the stored bank


def test_append_to_a_new_product_publishes_it(store, fingerprint, banks) -> None:
    result = store.append("fresh", banks.marked(4), fingerprint, banks.sources(1), False)
    assert (result.version, result.base_version) == (1, None)
    assert banks.marker_of(store.get("fresh").bank) == 4


def test_append_refuses_mismatched_dims_or_augmentation(store, fingerprint, banks) -> None:
    store.publish("washer", banks.random(14), fingerprint, banks.sources(1), True, None)
    with pytest.raises(BankError, match="built with rotation augmentation"):
        store.append("washer", banks.random(15), fingerprint, banks.sources(1, "b"), False)
    with pytest.raises(BankError, match="dims"):
        store.append("washer", banks.random(16, dims=16), fingerprint, banks.sources(1, "c"), True)
    assert store.current_version("washer") == 1


def test_concurrent_appends_lose_no_normals(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(0, patches=8), fingerprint, banks.sources(1), False, None)
    writers = 4
    barrier = threading.Barrier(writers)
    failures: list[BaseException] = []

    def append(marker: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            bank = banks.marked(marker, patches=8)
            store.append("washer", bank, fingerprint, banks.sources(1, f"w{marker}"), False)
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=append, args=(marker,)) for marker in range(1, writers + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures

    stored = store.get("washer")
    assert stored.bank.num_patches == (8 * (writers + 1),) * 4
    rows = Counter(int(value) for value in stored.bank.stages[0][:, 0].tolist())
    assert rows == {marker: 8 for marker in range(writers + 1)}
    assert len(stored.info.sources) == writers + 1
    assert stored.version == store.current_version("washer")


def test_concurrent_publishers_all_finish_and_one_bank_stands_whole(
    client, prefix, fingerprint, banks
) -> None:
    store = BankStore(client, prefix=prefix, chunk_bytes=512, keep_versions=1)
    writers = 4
    barrier = threading.Barrier(writers)
    results = {}
    failures: list[BaseException] = []

    def publish(marker: int) -> None:
        try:
            barrier.wait(timeout=JOIN_TIMEOUT_S)
            bank = banks.marked(marker, patches=10 + marker)
            results[marker] = store.publish(
                "washer", bank, fingerprint, banks.sources(1), False, None
            )
        except BaseException as error:
            failures.append(error)

    threads = [threading.Thread(target=publish, args=(marker,)) for marker in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(JOIN_TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures
    assert len(results) == writers

    newest = max(result.version for result in results.values())
    assert store.current_version("washer") == newest
    stored = store.get("washer")
    winner = next(marker for marker, result in results.items() if result.version == newest)
    assert banks.marker_of(stored.bank) == winner
    assert stored.bank.num_patches == (10 + winner,) * 4
    # Losers cleaned up after themselves and older winners were collected: one version is left.
    versions_with_keys = {
        key.decode().split(":v")[1].split(":")[0]
        for key in client.scan_iter(f"{prefix}bank:washer:v[0-9]*")
    }
    assert versions_with_keys == {str(newest)}
    assert list(client.scan_iter(f"{prefix}bank:washer:meta:*")) == [
        store.keys.meta("washer", newest).encode()
    ]


def test_readers_see_one_whole_version_while_versions_switch(client, prefix, fingerprint, banks):
    # keep_versions=1 collects each old version right behind the readers, so reads also run
    # into keys that vanish under them and must start again from the new current version.
    store = BankStore(client, prefix=prefix, chunk_bytes=256, keep_versions=1)
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    last = 25
    stop = threading.Event()
    seen = threading.Condition()
    newest_seen = [0]
    reads: list[tuple[int, int, tuple[int, ...]]] = []
    failures: list[BaseException] = []

    def read() -> None:
        try:
            while not stop.is_set():
                stored = store.get("washer")
                marker = banks.marker_of(stored.bank)
                reads.append((stored.version, marker, stored.bank.num_patches))
                with seen:
                    newest_seen[0] = max(newest_seen[0], stored.version)
                    seen.notify_all()
        except BaseException as error:
            failures.append(error)
            with seen:
                seen.notify_all()

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    try:
        for marker in range(2, last + 1):
            store.publish(
                "washer",
                banks.marked(marker, patches=8 + marker),
                fingerprint,
                banks.sources(1),
                False,
                None,
            )
            with seen:  # let the readers catch up with each version before the next one
                assert seen.wait_for(lambda v=marker: newest_seen[0] >= v or failures, 30)
    finally:
        stop.set()
        for reader in readers:
            reader.join(JOIN_TIMEOUT_S)
    assert not failures
    assert not any(reader.is_alive() for reader in readers)
    for version, marker, num_patches in reads:
        assert marker == version  # the writer published marker n as version n
        assert num_patches == ((24 if version == 1 else 8 + version),) * 4
    assert {version for version, _, _ in reads} >= set(range(2, last + 1))


def test_subscribers_hear_publish_calibration_and_delete(store, fingerprint, banks) -> None:
    with store.subscribe() as subscription:
        store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
        assert subscription.get(timeout_s=10) == BankEvent("publish", "washer", 1)
        store.set_calibration("washer", 0.7, {"method": "test"})
        assert subscription.get(timeout_s=10) == BankEvent("calibration", "washer", 1)
        store.delete("washer")
        assert subscription.get(timeout_s=10) == BankEvent("delete", "washer", None)
        assert subscription.get(timeout_s=0.05) is None


def test_a_publish_that_lost_the_race_leaves_no_trace(store, fingerprint, banks) -> None:
    store.publish("washer", banks.marked(1), fingerprint, banks.sources(1), False, None)
    # As if another writer had allocated and committed version 5 while this one was writing.
    store.client.set(store.keys.current("washer"), 5)
    with store.subscribe() as subscription:
        result = store.publish(
            "washer", banks.marked(2), fingerprint, banks.sources(1), False, None
        )
        assert (result.version, result.current) == (2, False)
        assert subscription.get(timeout_s=0.05) is None
    assert not store.client.exists(store.keys.meta("washer", 2))
    assert not list(store.client.scan_iter(store.keys.version_pattern("washer", 2)))
    assert store.current_version("washer") == 5  # never moved backwards


def test_calibration_overrides_the_bank_threshold(store, fingerprint, banks) -> None:
    store.publish(
        "washer", banks.marked(1, threshold=0.25), fingerprint, banks.sources(1), False, None
    )
    assert store.get_calibration("washer") is None
    calibration = store.set_calibration("washer", 0.61, {"method": "f1-optimal", "f1": 0.9})

    assert calibration.bank_version == 1
    stored = store.get("washer")
    assert stored.threshold == pytest.approx(0.61)
    assert stored.info.threshold == pytest.approx(0.25)  # the bank's own stays recorded
    assert store.get_calibration("washer").details == {"method": "f1-optimal", "f1": 0.9}
    assert store.info("washer").calibration.threshold == pytest.approx(0.61)
    with pytest.raises(BankNotFoundError):
        store.set_calibration("ghost", 0.5)


def test_a_client_that_decodes_responses_is_refused(redis_url) -> None:
    decoding = redis.Redis.from_url(redis_url, decode_responses=True)
    with pytest.raises(BankError, match="decodes responses"):
        BankStore(decoding)
