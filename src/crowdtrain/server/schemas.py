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
    training: dict[str, Any]
    totals: dict[str, Any]
    pending_updates: int
    traffic: dict[str, dict[str, int]]
    nodes: list[dict[str, Any]]
    connected_nodes: int
    resumed_from: int | None


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


class ErrorPublic(BaseModel):
    error: str
    detail: str


class HistoryPublic(BaseModel):
    rounds: list[dict[str, Any]]
    evals: list[dict[str, Any]]
