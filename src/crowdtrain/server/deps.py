"""Shared route dependencies, as Annotated aliases (the access levels are in server/auth.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from crowdtrain.server.auth import Principal
from crowdtrain.server.runtime import ServerRuntime


def _runtime(request: Request) -> ServerRuntime:
    return request.app.state.runtime


Runtime = Annotated[ServerRuntime, Depends(_runtime)]


def count_transfer(runtime: ServerRuntime, who: Principal, kind: str, wire: int, raw: int) -> None:
    """Count a download against the node that made it (an admin's downloads are not a node's)."""
    if who.role == "node":
        runtime.nodes.transferred(who.node_id, kind, wire, raw)
