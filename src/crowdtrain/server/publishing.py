"""Encoded bodies for what nodes download: snapshots and delta chains, cached per version."""

from __future__ import annotations

import threading
from collections import OrderedDict

from crowdtrain.protocol import encoding
from crowdtrain.protocol.snapshot import encode_deltas, encode_snapshot
from crowdtrain.server.coordinator import Coordinator


class Publisher:
    """Encodes each body once per version and keeps a few; many nodes download the same bytes."""

    def __init__(self, coordinator: Coordinator, max_entries: int = 8):
        self.coordinator = coordinator
        self.max_entries = max_entries
        self._cache: OrderedDict[tuple, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def _cached(self, key: tuple, build) -> bytes:
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        body = build()
        with self._lock:
            self._cache[key] = body
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return body

    def snapshot(self, dtype: str, content_encoding: str) -> tuple[int, bytes]:
        """(version, body) of the current weights in `dtype`, compressed with the encoding."""
        version = self.coordinator.version
        key = ("snapshot", self.coordinator.lineage, version, dtype, content_encoding)
        with self._lock:
            if key in self._cache:
                return version, self._cache[key]
        version, params = self.coordinator.snapshot()
        key = ("snapshot", self.coordinator.lineage, version, dtype, content_encoding)
        return version, self._cached(
            key,
            lambda: encoding.compress(
                encode_snapshot(params, version, self.coordinator.lineage, dtype), content_encoding
            ),
        )

    def deltas(self, since: int, lineage: str, content_encoding: str) -> tuple[int, bytes] | None:
        """(newest version, body) of the chain after `since`; None when a snapshot is needed
        (other lineage, outside the window, or a chain bigger than a snapshot)."""
        chain = self.coordinator.deltas_since(since, lineage)
        if chain is None:
            return None
        if len(chain) > 1:  # published deltas are dense fp32: a longer chain outweighs a snapshot
            return None
        to_version = chain[-1][0] if chain else since
        key = ("deltas", lineage, since, to_version, content_encoding)
        return to_version, self._cached(
            key, lambda: encoding.compress(encode_deltas(chain, lineage), content_encoding)
        )
