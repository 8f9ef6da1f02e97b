"""What the server knows of each node it has heard from: activity, contribution, traffic."""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from crowdtrain.protocol.update import DecodedUpdate

CONNECTED_WITHIN_S = 60.0
# what moves, by kind: bytes on the wire (compressed) and raw (after decompression)
INBOUND_KINDS = ("update",)
OUTBOUND_KINDS = ("snapshot", "deltas", "shard")
# what a heartbeat reports of the node's machine, kept as the latest in its record
MACHINE_FIGURES = (
    "cpu_percent",
    "memory_used_bytes",
    "memory_total_bytes",
    "gpu_utilization_percent",
    "gpu_memory_used_bytes",
    "gpu_memory_total_bytes",
)


def _empty_traffic() -> dict[str, dict[str, int]]:
    return {kind: {"wire": 0, "raw": 0} for kind in INBOUND_KINDS + OUTBOUND_KINDS}


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
    density: float | None = None  # of its last accepted update (entries / model size)
    upload_bytes_per_s: float | None = None  # its link, as the node measured it
    rtt_s: float | None = None
    local_data_updates: int = 0  # accepted updates computed on the node's own files
    bytes_in: int = 0
    bytes_out: int = 0
    traffic: dict[str, dict[str, int]] = field(default_factory=_empty_traffic)
    # its WebSocket session (docs/sessions.md). state: "online" (a session is open), "gone" (its
    # session ended: it left, went silent or was banned; until it opens a new one), "http" (it
    # never opened one)
    state: str = "http"
    sessions: int = 0  # opened since the server started (reconnects count)
    session_started: float | None = None
    gone_reason: str | None = None  # why the last session ended
    capabilities: dict | None = None  # from its hello: device, memory, software versions
    last_heartbeat: float | None = None
    status: str | None = None  # from its last heartbeat: training, waiting_for_shard, ...
    held_version: int | None = None
    tokens_per_s: float | None = None
    rss_bytes: int | None = None
    gpu_memory_bytes: int | None = None
    # its machine, from its last heartbeat (MACHINE_FIGURES; docs/monitoring.md)
    cpu_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    gpu_utilization_percent: float | None = None
    gpu_memory_used_bytes: int | None = None
    gpu_memory_total_bytes: int | None = None

    def public(self) -> dict:
        out = asdict(self)
        recent = time.time() - self.last_seen < CONNECTED_WITHIN_S
        out["connected"] = self.state == "online" or (self.state == "http" and recent)
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

    def session_opened(self, node_id: str, capabilities: dict, link: dict) -> None:
        """A node's session began (its hello): `link` holds its upload rate and rtt."""
        with self._lock:
            record = self._get(node_id)
            record.state, record.gone_reason = "online", None
            record.sessions += 1
            record.session_started = record.last_heartbeat = record.last_seen
            record.capabilities = capabilities
            for key, value in link.items():
                if value is not None:
                    setattr(record, key, value)

    def heartbeat(self, node_id: str, figures: dict) -> None:
        """A heartbeat: status, held version, tokens/s, memory (what the node reported)."""
        with self._lock:
            record = self._get(node_id)
            record.last_heartbeat = record.last_seen
            for key, value in figures.items():
                setattr(record, key, value)

    def session_closed(self, node_id: str, reason: str) -> None:
        """Its session ended (it left, went silent, broke the protocol, or was banned)."""
        with self._lock:
            record = self._nodes.get(node_id)
            if record is not None and record.state == "online":
                record.state, record.gone_reason = "gone", reason

    def transferred(self, node_id: str, kind: str, wire: int, raw: int) -> None:
        """Count bytes of one transfer to or from a node, as sent and as decompressed."""
        with self._lock:
            self._transferred(self._get(node_id), kind, wire, raw)

    def _transferred(self, record: NodeRecord, kind: str, wire: int, raw: int) -> None:
        counts = record.traffic[kind]
        counts["wire"] += wire
        counts["raw"] += raw
        if kind in INBOUND_KINDS:
            record.bytes_in += wire
        else:
            record.bytes_out += wire

    def accepted(self, node_id: str, update: DecodedUpdate, numel: int) -> None:
        meta = update.meta
        with self._lock:
            record = self._get(node_id)
            record.updates_accepted += 1
            record.samples += meta.samples
            record.tokens += meta.tokens
            record.last_loss = meta.loss
            record.last_version = meta.base_version
            record.density = update.nnz / numel
            record.upload_bytes_per_s = meta.upload_bytes_per_s
            record.rtt_s = meta.rtt_s
            record.local_data_updates += meta.data_source == "local"
            self._transferred(record, "update", update.wire_bytes, update.raw_bytes)

    def refused(self, node_id: str, wire_bytes: int) -> None:
        with self._lock:
            record = self._get(node_id)
            record.updates_refused += 1
            self._transferred(record, "update", wire_bytes, 0)  # never decompressed whole

    def traffic(self) -> dict[str, dict[str, int]]:
        """Bytes by kind over every node, as sent (wire) and decompressed (raw)."""
        totals = _empty_traffic()
        with self._lock:
            for record in self._nodes.values():
                for kind, counts in record.traffic.items():
                    for key, value in counts.items():
                        totals[kind][key] += value
        return totals

    def list(self) -> list[dict]:
        with self._lock:
            return [r.public() for r in sorted(self._nodes.values(), key=lambda r: r.node_id)]

    def connected_count(self) -> int:
        return sum(1 for r in self.list() if r["connected"])
