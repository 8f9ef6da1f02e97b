"""Training history: per-version round records and validation results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from crowdtrain.server.auth import Viewer
from crowdtrain.server.deps import Runtime
from crowdtrain.server.schemas import HistoryPublic

router = APIRouter(tags=["metrics"])


@router.get("/history", response_model=HistoryPublic)
def history(
    runtime: Runtime,
    _: Viewer,
    since: Annotated[int, Query(ge=-1, le=1 << 62, description="only versions after this")] = -1,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 10_000,
) -> dict:
    """Loss, learning rate, updates, tokens, bytes and timings per version; validation loss."""
    return {
        "rounds": runtime.rounds.since(since, limit),
        "evals": runtime.evals.since(since, limit),
    }
