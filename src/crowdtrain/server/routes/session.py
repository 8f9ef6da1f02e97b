"""The node session: one WebSocket per node for heartbeats and server pushes (docs/sessions.md)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, WebSocket
from fastapi.responses import JSONResponse
from starlette.requests import HTTPConnection

from crowdtrain.protocol.errors import WireError
from crowdtrain.server.auth import NODE, Access, Principal

router = APIRouter(tags=["sessions"])
POLICY_VIOLATION = 1008


class HandshakeAccess(Access):
    """NODE's checks for a WebSocket handshake: a refusal is returned, not raised, because an
    exception handler cannot answer a handshake."""

    def __call__(self, request: HTTPConnection) -> Principal | WireError:  # type: ignore[override]
        try:
            return super().__call__(request)
        except WireError as error:
            return error


SESSION_ACCESS = HandshakeAccess(NODE.name, NODE.roles)


async def refuse_handshake(websocket: WebSocket, error: WireError) -> None:
    """Refuse before accepting: with the HTTP status and JSON error body of any route where the
    server can send an HTTP answer to a handshake (uvicorn can), else by closing with 1008
    (which the client sees as HTTP 403)."""
    if "websocket.http.response" in websocket.scope.get("extensions", {}):
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
        await websocket.send_denial_response(
            JSONResponse(error.to_json(), status_code=error.status, headers=headers)
        )
    else:
        await websocket.close(POLICY_VIOLATION, error.code)


@router.websocket("/nodes/session")
async def node_session(
    websocket: WebSocket, who: Annotated[Principal | WireError, Depends(SESSION_ACCESS)]
) -> None:
    """A node's session: it sends hello, then heartbeats; the server pushes new versions,
    round deadlines, density budgets, lease offers and shutdown notices."""
    if isinstance(who, WireError):
        await refuse_handshake(websocket, who)
        return
    await websocket.app.state.sessions.serve(websocket, who.node_id)
