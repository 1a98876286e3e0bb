"""`BankCache`: the banks a matcher replica uses, kept in memory and on its device, kept current.

A replica asks for a product's bank on every batch; the cache answers from memory. It learns of new
versions two ways: a listener thread subscribed to the bank events reloads a cached product as soon
as a publish names a newer version (the old bank keeps serving until the new one is ready), and,
for notifications missed while the connection was down, `get` compares the stored revision at most
every `check_interval_s`.

While Redis is unreachable, cached banks keep being served (with one warning) and a product that
is not cached fails with `RedisUnavailableError`.

Locking: one lock guards the table of entries and is held only to look up or swap an entry; loads
run under a per-product lock, so loading one product never holds up readers of the others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import redis
import torch

from bankstore.errors import RedisUnavailableError
from bankstore.store import BankEvent, BankStore, BankSubscription, StoredBank
from pipeline.encoder import EncoderFingerprint
from pipeline.errors import DefectscopeError

logger = logging.getLogger(__name__)

LISTEN_TIMEOUT_S = 0.5
"""How long the listener waits for an event before looking at its stop flag again."""


@dataclass
class _Entry:
    stored: StoredBank
    checked_at: float
    """Monotonic time the stored revision was last compared with this entry."""
    nbytes: int


class BankCache:
    """An LRU cache of stored banks, with normalised copies prepared on one device."""

    def __init__(
        self,
        store: BankStore,
        device: torch.device | str = "cpu",
        capacity: int = 8,
        check_interval_s: float = 1.0,
        fingerprint: EncoderFingerprint | None = None,
        listen: bool = True,
    ) -> None:
        """
        Args:
            store: where the banks live.
            device: where `MemoryBank.prepared` puts the normalised stages.
            capacity: products kept at once; the least recently used is evicted beyond it.
            check_interval_s: longest time a cached bank is served without comparing revisions.
            fingerprint: the replica's encoder; banks made with another are refused.
            listen: subscribe to bank events (a background thread); False relies on the checks.
        """
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self.store = store
        self.device = torch.device(device)
        self.capacity = capacity
        self.check_interval_s = check_interval_s
        self.fingerprint = fingerprint
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._changed = threading.Condition()
        """Guards `_entries` and `_product_locks`; notified whenever an entry changes."""
        self._product_locks: dict[str, threading.Lock] = {}
        self._stop = threading.Event()
        self._unreachable = False
        """Whether the last revision check failed (warned about once per outage)."""
        self._listener: threading.Thread | None = None
        if listen:
            subscription = store.subscribe()  # active before any get, so no publish is missed
            self._listener = threading.Thread(
                target=self._listen, args=(subscription,), name="bank-cache-listener", daemon=True
            )
            self._listener.start()

    def get(self, product: str) -> StoredBank:
        """The product's bank, prepared on the device; loads it on a miss or a newer revision.

        Raises:
            BankNotFoundError: the product has no bank (any cached one is dropped).
            FingerprintMismatchError: the stored bank was made with another encoder.
        """
        with self._changed:
            entry = self._entries.get(product)
            if entry is not None and time.monotonic() - entry.checked_at < self.check_interval_s:
                self._entries.move_to_end(product)
                return entry.stored
        return self._revalidate(product)

    def versions(self) -> dict[str, int]:
        """The cached version of each product."""
        with self._changed:
            return {product: entry.stored.version for product, entry in self._entries.items()}

    def cached_bytes(self) -> dict[str, int]:
        """Bytes held per product: the float16 stages plus their prepared copies."""
        with self._changed:
            return {product: entry.nbytes for product, entry in self._entries.items()}

    def wait_for(self, product: str, version: int | None, timeout_s: float) -> bool:
        """Waits until the cache holds `version` or later of `product` (None: until it holds no
        version of it); False on timeout."""

        def reached() -> bool:
            entry = self._entries.get(product)
            if version is None:
                return entry is None
            return entry is not None and entry.stored.version >= version

        with self._changed:
            return self._changed.wait_for(reached, timeout_s)

    def close(self) -> None:
        """Stops the listener thread; the cached banks stay readable."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(timeout=LISTEN_TIMEOUT_S * 10)

    def __enter__(self) -> BankCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Internals ----------------------------------------------------------------------------------

    def _revalidate(self, product: str) -> StoredBank:
        """Compares the stored revision with the cached entry and loads when they differ."""
        with self._product_lock(product):
            with self._changed:
                entry = self._entries.get(product)
            if entry is not None:
                try:
                    stored_revision = self.store.revision(product)
                except RedisUnavailableError as error:
                    return self._serve_stale(entry, error)
                self._unreachable = False
                if stored_revision == entry.stored.revision:
                    with self._changed:
                        entry.checked_at = time.monotonic()
                        if product in self._entries:
                            self._entries.move_to_end(product)
                    return entry.stored
                if stored_revision is None:
                    self._drop(product)

            try:
                stored = self.store.get(product, fingerprint=self.fingerprint)
            except DefectscopeError:
                self._drop(product)
                raise
            prepared = stored.bank.prepared(self.device)
            nbytes = stored.bank.nbytes + sum(t.numel() * t.element_size() for t in prepared)
            with self._changed:
                self._entries[product] = _Entry(stored, time.monotonic(), nbytes)
                self._entries.move_to_end(product)
                evicted = []
                while len(self._entries) > self.capacity:
                    evicted.append(self._entries.popitem(last=False)[0])
                self._changed.notify_all()
        switched = f"switched from version {entry.stored.version}" if entry else "loaded"
        logger.info(
            "bank %s: version %d %s on %s (%.1f MiB)",
            product,
            stored.version,
            switched,
            self.device,
            nbytes / 2**20,
        )
        for name in evicted:
            logger.info("bank %s evicted from the cache (capacity %d)", name, self.capacity)
        return stored

    def _serve_stale(self, entry: _Entry, error: RedisUnavailableError) -> StoredBank:
        """Keeps serving a cached bank while Redis is unreachable: better than failing frames."""
        if not self._unreachable:
            self._unreachable = True
            logger.warning("serving cached banks unchecked: %s", error)
        with self._changed:
            entry.checked_at = time.monotonic()
        return entry.stored

    def _product_lock(self, product: str) -> threading.Lock:
        with self._changed:
            return self._product_locks.setdefault(product, threading.Lock())

    def _drop(self, product: str) -> None:
        with self._changed:
            if self._entries.pop(product, None) is not None:
                logger.info("bank %s dropped from the cache: no longer stored", product)
                self._changed.notify_all()

    def _on_event(self, event: BankEvent) -> None:
        if event.kind == "delete":
            self._drop(event.product)
            return
        with self._changed:
            entry = self._entries.get(event.product)
        if entry is None:
            return  # not cached here: nothing to refresh
        stale = event.kind != "publish" or (event.version or 0) > entry.stored.version
        if stale:
            self._revalidate(event.product)

    def _listen(self, subscription: BankSubscription) -> None:
        """The listener thread: reloads cached products on events; resubscribes after errors."""
        delay = 0.1
        current: BankSubscription | None = subscription
        while not self._stop.is_set():
            try:
                if current is None:
                    current = self.store.subscribe()
                    self._expire_checks()  # events may have been missed while disconnected
                    logger.info("bank events: subscribed again")
                event = current.get(LISTEN_TIMEOUT_S)
                delay = 0.1
                if event is not None:
                    self._on_event(event)
            except (RedisUnavailableError, redis.RedisError) as error:
                logger.warning("bank events unavailable (%s); retrying in %.1f s", error, delay)
                if current is not None:
                    current.close()
                current = None
                self._stop.wait(delay)
                delay = min(5.0, delay * 2)
            except DefectscopeError as error:
                logger.error("bank reload after an event failed: %s", error)
        if current is not None:
            current.close()

    def _expire_checks(self) -> None:
        with self._changed:
            for entry in self._entries.values():
                entry.checked_at = float("-inf")
