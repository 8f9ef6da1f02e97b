"""Accounts: node registration and token renewal, enrollment and API tokens, bans, the audit
log (docs/security.md)."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request
from pydantic import BaseModel, Field, ValidationError

from crowdtrain.protocol.errors import WireError, invalid_request
from crowdtrain.server.accounts import parse_duration
from crowdtrain.server.auth import Admin, Anyone, client_address, failed_login
from crowdtrain.server.deps import Runtime
from crowdtrain.server.schemas import (
    AuditPublic,
    ErrorPublic,
    NodeAccountPublic,
    NodeCredentialsPublic,
    TokenCreatedPublic,
    TokenPublic,
)
from crowdtrain.settings import NODE_NAME_PATTERN

router = APIRouter(tags=["accounts"])

_ERRORS = {code: {"model": ErrorPublic} for code in (401, 403, 404, 409, 422, 429)}
NODE_NAME = f"^{NODE_NAME_PATTERN}$"


class RegisterIn(BaseModel):
    enrollment_token: str = Field(min_length=1, max_length=200)
    name: str = Field(pattern=NODE_NAME, description="what the node wants to be called")


class RefreshIn(BaseModel):
    node_id: str = Field(pattern=NODE_NAME)
    refresh_token: str = Field(min_length=1, max_length=200)


class TokenIn(BaseModel):
    role: Literal["node", "viewer", "admin"]
    uses: int | None = Field(
        None, ge=1, le=1_000_000, description="node tokens: registrations it is good for"
    )
    expires: str | None = Field(
        None, max_length=20, description="lifetime such as 7d, 12h or 3600; unset: never"
    )
    label: str = Field("", max_length=200)


def _credentials(runtime, state, refresh: str | None = None) -> dict:
    security = runtime.security
    token, expires_at = security.keys.issue(state.id, state.registration)
    out = {
        "node_id": state.id,
        "access_token": token,
        "expires_at": expires_at,
        "last_seq": state.last_seq,
        "heartbeat_s": runtime.settings.heartbeat_s,
    }
    if refresh is not None:
        out["refresh_token"] = refresh
    return out


@router.post(
    "/nodes/register", response_model=NodeCredentialsPublic, status_code=201, responses=_ERRORS
)
def register(body: RegisterIn, request: Request, runtime: Runtime, _: Anyone) -> dict:
    """Trade an enrollment token for a node identity: the node id (its name, or the name with
    a suffix when taken), a short-lived access token, and a refresh token to keep."""
    security, address = runtime.security, client_address(request)
    security.registrations.take(address, "registrations from this address")
    try:
        state, refresh = security.accounts.register(body.enrollment_token, body.name, address)
    except WireError as error:
        failed_login(security, "register.refused", body.name, address, error)
        raise
    return _credentials(runtime, state, refresh)


@router.post("/nodes/refresh", response_model=NodeCredentialsPublic, responses=_ERRORS)
def refresh(body: RefreshIn, request: Request, runtime: Runtime, _: Anyone) -> dict:
    """A new access token for a registered node, and the last sequence number it used."""
    security, address = runtime.security, client_address(request)
    try:
        state = security.accounts.refresh(body.node_id, body.refresh_token, address)
    except WireError as error:
        failed_login(security, "refresh.refused", body.node_id, address, error)
        raise
    return _credentials(runtime, state)


@router.get("/nodes", response_model=list[NodeAccountPublic], responses=_ERRORS)
def list_nodes(runtime: Runtime, _: Admin) -> list[dict]:
    """Every registered node, banned ones included."""
    return runtime.security.accounts.list_nodes()


@router.delete("/nodes/{node_id}", response_model=NodeAccountPublic, responses=_ERRORS)
async def ban_node(
    request: Request,
    runtime: Runtime,
    admin: Admin,
    node_id: Annotated[str, Path(pattern=NODE_NAME)],
    reason: Annotated[str, Query(max_length=200)] = "",
    revoke_token: Annotated[
        bool, Query(description="also revoke the enrollment token it registered with")
    ] = True,
) -> dict:
    """Ban a node: its requests are refused at once, its WebSocket session is closed, and (by
    default) its enrollment token stops working, so it cannot register again with it."""
    return await anyio.to_thread.run_sync(
        lambda: runtime.security.accounts.ban(
            node_id, admin.subject, reason, revoke_token, client_address(request)
        )
    )


@router.post(
    "/tokens",
    response_model=TokenCreatedPublic,
    status_code=201,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": TokenIn.model_json_schema()}},
        }
    },
)
async def create_token(request: Request, runtime: Runtime, admin: Admin) -> dict:
    """Create a token. `node`: an enrollment token, traded at /nodes/register; `viewer`,
    `admin`: API tokens sent as `Authorization: Bearer`. The secret is shown only here.

    The body is read after the admin token is checked (a parameter would be parsed first),
    so a caller without one learns nothing of what the route expects."""
    raw = await request.body()
    try:
        body = TokenIn.model_validate_json(raw)
    except ValidationError as error:
        raise invalid_request(error.errors()) from None
    try:
        expires_in = parse_duration(body.expires) if body.expires else None
    except ValueError as error:
        raise WireError(422, "bad_expires", str(error)) from None
    secret, public = await anyio.to_thread.run_sync(
        lambda: runtime.security.accounts.create_token(
            body.role, admin.subject, body.uses, expires_in, body.label, client_address(request)
        )
    )
    return {**public, "token": secret}


@router.get("/tokens", response_model=list[TokenPublic], responses=_ERRORS)
def list_tokens(runtime: Runtime, _: Admin) -> list[dict]:
    """Every token (never the secrets) with its state: active, expired, used up, revoked."""
    return runtime.security.accounts.list_tokens()


@router.delete("/tokens/{token_id}", response_model=TokenPublic, responses=_ERRORS)
def revoke_token(
    request: Request,
    runtime: Runtime,
    admin: Admin,
    token_id: Annotated[int, Path(ge=1, le=1 << 62)],
) -> dict:
    """Revoke a token: it stops working on the next request. Nodes already registered with an
    enrollment token keep their identity (ban them with DELETE /nodes/ID)."""
    return runtime.security.accounts.revoke_token(token_id, admin.subject, client_address(request))


@router.get("/audit", response_model=AuditPublic, responses=_ERRORS)
def audit(
    runtime: Runtime,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    before: Annotated[
        int | None, Query(ge=1, le=1 << 62, description="events older than this id")
    ] = None,
    action: Annotated[str | None, Query(max_length=40)] = None,
) -> dict:
    """The audit log, newest first: admin actions, registrations, bans, refused logins and
    refused submissions with their reason."""
    runtime.security.audit.flush()
    return {"events": runtime.security.audit.query(limit, before, action)}
