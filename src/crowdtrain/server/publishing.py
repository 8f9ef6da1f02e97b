"""Encoded bodies for what nodes download: snapshots and delta chains, cached per version."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from crowdtrain.protocol import encoding
from crowdtrain.protocol.snapshot import encode_deltas, encode_snapshot
from crowdtrain.server.coordinator import Coordinator


@dataclass(frozen=True)
class Encoded:
    """A body ready to send: the version it leads to, its bytes, and its size before
    compression (for traffic accounting)."""

    version: int
    body: bytes
    raw_bytes: int


class Publisher:
    """Encodes each body once per version and keeps the newest ones up to a byte budget: many
    nodes download the same bytes."""

    def __init__(self, coordinator: Coordinator, max_bytes: int = 512 << 20):
        self.coordinator = coordinator
        self.max_bytes = max_bytes
        self._cache: OrderedDict[tuple, Encoded] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def _lookup(self, key: tuple) -> Encoded | None:
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
            return found

    def _encode(self, key: tuple, version: int, raw: bytes, content_encoding: str) -> Encoded:
        encoded = Encoded(version, encoding.compress(raw, content_encoding), len(raw))
        with self._lock:
            if key not in self._cache and len(encoded.body) <= self.max_bytes:
                self._cache[key] = encoded
                self._cached_bytes += len(encoded.body)
            while self._cached_bytes > self.max_bytes:
                _, evicted = self._cache.popitem(last=False)
                self._cached_bytes -= len(evicted.body)
        return encoded

    def snapshot(self, dtype: str, content_encoding: str) -> Encoded:
        """The current weights in `dtype`, compressed with the encoding."""
        c = self.coordinator
        found = self._lookup(("snapshot", c.lineage, c.version, dtype, content_encoding))
        if found is not None:
            return found
        version, params = c.snapshot()
        key = ("snapshot", c.lineage, version, dtype, content_encoding)
        raw = encode_snapshot(params, version, c.lineage, dtype)
        return self._encode(key, version, raw, content_encoding)

    def deltas(self, since: int, lineage: str, content_encoding: str) -> Encoded | None:
        """The chain after `since` (an empty one when nothing is newer); None when a snapshot is
        needed (other lineage, outside the window, or a chain that outweighs a snapshot)."""
        c = self.coordinator
        chain = c.deltas_since(since, lineage)
        if chain is None:
            return None
        chain_bytes = sum(delta.nbytes for _, deltas in chain for delta in deltas.values())
        if chain_bytes > c.snapshot_nbytes:  # dense fp32 deltas: any chain longer than one
            return None
        to_version = chain[-1][0] if chain else since
        key = ("deltas", lineage, since, to_version, content_encoding)
        found = self._lookup(key)
        if found is not None:
            return found
        raw = encode_deltas(chain, lineage, c.downlink_codec.name)
        return self._encode(key, to_version, raw, content_encoding)
