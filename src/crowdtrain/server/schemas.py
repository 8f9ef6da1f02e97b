"""Response models of the HTTP API (named XPublic)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class HealthPublic(BaseModel):
    status: str
    version: int
    failure: str | None = None


class InfoPublic(BaseModel):
    crowdtrain_version: str
    version: int
    lineage: str
    model: dict[str, Any]
    tokenizer: dict[str, Any]
    corpus: str
    data: dict[str, Any]
    training: dict[str, Any]
    totals: dict[str, Any]
    pending_updates: int
    traffic: dict[str, dict[str, int]]
    nodes: list[dict[str, Any]]
    connected_nodes: int
    resumed_from: int | None
    server: dict[str, Any]  # the server's own CPU, memory, disk and load (docs/monitoring.md)


class ParamPublic(BaseModel):
    name: str
    shape: list[int]
    dtype: str


class ManifestPublic(BaseModel):
    version: int
    parameters: int
    tensors: list[ParamPublic]


class VersionPublic(BaseModel):
    version: int
    lineage: str


class SubmitPublic(BaseModel):
    accepted: bool
    duplicate: bool = False
    current_version: int
    lineage: str
    queued: int
    max_density: float = 1.0  # the densest update this node should send next
    # per lease the update finishes: "submitted", or why not (lease_expired, not_your_lease...)
    leases: dict[str, str] = {}


class ErrorPublic(BaseModel):
    error: str
    detail: str


class HistoryPublic(BaseModel):
    rounds: list[dict[str, Any]]
    evals: list[dict[str, Any]]


class ShardPublic(BaseModel):
    id: int
    index: int
    tokens: int
    sha256: str  # of the token bytes, then the mask bytes
    dtype: str  # uint16 or uint32, little-endian
    masked: bool  # a uint8 loss mask of `tokens` bytes follows the token bytes


class LeasePublic(BaseModel):
    lease: str | None  # None: every shard of the open epochs is leased or done
    shard: ShardPublic | None = None
    epoch: int | None = None
    expires_at: float | None = None
    ttl_s: float
    retry_after_s: float | None = None


class RenewPublic(BaseModel):
    lease: str
    expires_at: float


class CoveragePublic(BaseModel):
    epoch: int
    started_at: float
    completed_at: float | None
    shards: int
    completed: int
    missing: list[int]
    duplicates: list[int]
    leases: dict[str, int]  # leases of the epoch by state
    held: list[dict[str, Any]]  # the shards being trained on now: lease, node, expiry
    ledger: list[dict[str, Any]]


class DatasetPublic(BaseModel):
    name: str
    created_at: float
    splits: list[dict[str, Any]]


class ImportPublic(BaseModel):
    dataset: str
    split: str
    changed: bool
    imported: list[str]
    skipped: list[str]
    documents: int
    duplicates: int
    bytes: int
    summary: str


class NodeCredentialsPublic(BaseModel):
    node_id: str
    access_token: str  # a JWT: send it as `Authorization: Bearer`
    expires_at: float
    last_seq: int  # the highest submission sequence number this node has used
    heartbeat_s: float  # how often to send a heartbeat on the WebSocket session
    refresh_token: str | None = None  # at registration only: keep it to renew access tokens


class NodeAccountPublic(BaseModel):
    node_id: str
    name: str
    token_id: int | None
    created_at: float
    last_seen_at: float | None
    revoked_at: float | None
    revoked_reason: str | None


class TokenPublic(BaseModel):
    id: int
    prefix: str  # the first characters of the secret
    kind: str  # api or enroll
    role: str
    label: str
    uses: int
    max_uses: int | None
    created_at: float
    created_by: str
    expires_at: float | None
    revoked_at: float | None
    last_used_at: float | None
    state: str  # active, expired, used up, revoked


class TokenCreatedPublic(TokenPublic):
    token: str  # the secret, shown only in this answer


class AuditPublic(BaseModel):
    events: list[dict[str, Any]]
