"""Liveness and the server's public description."""

from __future__ import annotations

from fastapi import APIRouter

from crowdtrain.server.deps import Runtime
from crowdtrain.server.schemas import HealthPublic, InfoPublic

router = APIRouter(tags=["server"])


@router.get("/health", response_model=HealthPublic)
def health(runtime: Runtime) -> dict:
    """Is the server up, and at which version."""
    return {"status": "ok", "version": runtime.coordinator.version}


@router.get("/info", response_model=InfoPublic)
def info(runtime: Runtime) -> dict:
    """Version, model config, training settings and the nodes the server has heard from."""
    return runtime.info()
