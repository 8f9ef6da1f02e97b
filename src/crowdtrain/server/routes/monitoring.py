"""Prometheus metrics at the app root (GET /metrics, the Prometheus convention)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from crowdtrain.server.auth import Viewer
from crowdtrain.server.monitoring import METRICS_PATH

router = APIRouter(tags=["monitoring"])


@router.get(
    METRICS_PATH,
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": "the Prometheus text format",
        }
    },
)
def metrics(request: Request, _: Viewer) -> Response:
    """Rounds, version, losses, tokens/s, bytes, nodes by state, intake refusals by reason,
    request latencies and the server's own CPU and memory (docs/monitoring.md). A scraper sends
    a viewer token as a bearer credential, or none when `public_dashboard` is on."""
    return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
