"""Liveness and the server's public description."""

from __future__ import annotations

from fastapi import APIRouter, Response

from crowdtrain.server.auth import Anyone, Viewer
from crowdtrain.server.deps import Runtime
from crowdtrain.server.schemas import HealthPublic, InfoPublic

router = APIRouter(tags=["server"])


@router.get("/health", response_model=HealthPublic, responses={503: {"model": HealthPublic}})
def health(runtime: Runtime, response: Response, _: Anyone) -> dict:
    """Is the server up and applying updates, and at which version (503 when it cannot)."""
    c = runtime.coordinator
    if c.failure is not None:
        response.status_code = 503
        return {"status": "failed", "version": c.version, "failure": c.failure}
    return {"status": "ok", "version": c.version}


@router.get("/info", response_model=InfoPublic)
def info(runtime: Runtime, _: Viewer) -> dict:
    """Version, model config, training settings and the nodes the server has heard from."""
    return runtime.info()
