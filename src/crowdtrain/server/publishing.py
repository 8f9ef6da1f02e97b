"""Encoded bodies for what nodes download: snapshots and delta chains, cached per version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

from crowdtrain.protocol import encoding
from crowdtrain.protocol.snapshot import encode_deltas, encode_snapshot
from crowdtrain.server.coordinator import Coordinator


class Publisher:
    """Encodes each body once per version and keeps the newest ones up to a byte budget: many
    nodes download the same bytes."""

    def __init__(self, coordinator: Coordinator, max_bytes: int = 512 << 20):
        self.coordinator = coordinator
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def _cached(self, key: tuple, build: Callable[[], bytes]) -> bytes:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        body = build()
        with self._lock:
            if key not in self._cache and len(body) <= self.max_bytes:
                self._cache[key] = body
                self._cached_bytes += len(body)
            while self._cached_bytes > self.max_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= len(evicted)
        return body

    def snapshot(self, dtype: str, content_encoding: str) -> tuple[int, bytes]:
        """(version, body) of the current weights in `dtype`, compressed with the encoding."""
        c = self.coordinator
        with self._lock:
            cached = self._cache.get(("snapshot", c.lineage, c.version, dtype, content_encoding))
            if cached is not None:
                return c.version, cached
        version, params = c.snapshot()
        key = ("snapshot", c.lineage, version, dtype, content_encoding)
        return version, self._cached(
            key,
            lambda: encoding.compress(
                encode_snapshot(params, version, c.lineage, dtype), content_encoding
            ),
        )

    def deltas(self, since: int, lineage: str, content_encoding: str) -> tuple[int, bytes] | None:
        """(newest version, body) of the chain after `since`; None when a snapshot is needed
        (other lineage, outside the window, or a chain that outweighs a snapshot)."""
        chain = self.coordinator.deltas_since(since, lineage)
        if chain is None:
            return None
        snapshot_bytes = self.coordinator.snapshot_nbytes
        chain_bytes = sum(delta.nbytes for _, deltas in chain for delta in deltas.values())
        if chain_bytes > snapshot_bytes:  # dense fp32 deltas: any chain longer than one version
            return None
        to_version = chain[-1][0] if chain else since
        key = ("deltas", lineage, since, to_version, content_encoding)
        return to_version, self._cached(
            key,
            lambda: encoding.compress(
                encode_deltas(chain, lineage, self.coordinator.downlink_codec.name),
                content_encoding,
            ),
        )
