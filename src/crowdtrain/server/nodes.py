"""What the server knows of each node it has heard from: activity, contribution, traffic."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field

CONNECTED_WITHIN_S = 60.0


@dataclass
class NodeRecord:
    node_id: str
    first_seen: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    updates_accepted: int = 0
    updates_refused: int = 0
    samples: int = 0
    tokens: int = 0
    last_loss: float | None = None
    last_version: int | None = None
    bytes_in: int = 0
    bytes_out: int = 0

    def public(self) -> dict:
        out = asdict(self)
        out["connected"] = time.time() - self.last_seen < CONNECTED_WITHIN_S
        return out


class NodeRegistry:
    """Thread-safe record of nodes; the identity comes from the request, never the payload."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeRecord] = {}

    def _get(self, node_id: str) -> NodeRecord:
        record = self._nodes.get(node_id)
        if record is None:
            record = self._nodes[node_id] = NodeRecord(node_id)
        record.last_seen = time.time()
        return record

    def seen(self, node_id: str, bytes_out: int = 0) -> None:
        with self._lock:
            self._get(node_id).bytes_out += bytes_out

    def accepted(
        self, node_id: str, samples: int, tokens: int, loss: float, version: int, wire_bytes: int
    ) -> None:
        with self._lock:
            record = self._get(node_id)
            record.updates_accepted += 1
            record.samples += samples
            record.tokens += tokens
            record.last_loss = loss
            record.last_version = version
            record.bytes_in += wire_bytes

    def refused(self, node_id: str, wire_bytes: int) -> None:
        with self._lock:
            record = self._get(node_id)
            record.updates_refused += 1
            record.bytes_in += wire_bytes

    def list(self) -> list[dict]:
        with self._lock:
            return [r.public() for r in sorted(self._nodes.values(), key=lambda r: r.node_id)]

    def connected_count(self) -> int:
        return sum(1 for r in self.list() if r["connected"])
