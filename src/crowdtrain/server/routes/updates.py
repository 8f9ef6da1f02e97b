"""Update submission: bounded read, strict decode off the event loop, then the Coordinator."""

from __future__ import annotations

from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Request

from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.update import UpdateMeta, decode_update
from crowdtrain.server.auth import CurrentNode, client_address
from crowdtrain.server.deps import Runtime
from crowdtrain.server.schemas import ErrorPublic, SubmitPublic

router = APIRouter(tags=["updates"])

_ERRORS = {code: {"model": ErrorPublic} for code in (400, 401, 403, 409, 413, 415, 422, 429, 503)}


async def read_body_capped(request: Request, cap: int) -> bytes:
    """The request body, refusing with 413 as soon as it passes `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise WireError(400, "bad_length", "Content-Length must be a number")
        if int(declared) > cap:
            raise WireError(413, "too_large", f"body of {declared} bytes exceeds the cap of {cap}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise WireError(413, "too_large", f"body exceeds the cap of {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post(
    "/updates",
    status_code=202,
    response_model=SubmitPublic,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def submit_update(
    request: Request,
    runtime: Runtime,
    node: CurrentNode,
    content_encoding: Annotated[str | None, Header()] = None,
) -> dict:
    """Submit an update in the wire format (safetensors container, zstd or identity).

    Checked before it touches state: sizes before and after decompression, tensor names and
    shapes against the manifest, indices in range and strictly increasing, finite values,
    metadata types. 409 when its base version is too old (or from before a server restart)."""
    limits, coordinator, security = runtime.limits, runtime.coordinator, runtime.security
    node_id = node.node_id
    body = b""
    held: dict[str, str] = {}
    try:
        security.submissions.take(node_id, "updates from this node")
        coordinator.reserve(node_id)  # 503 before reading anything when the queue is full
        try:
            body = await read_body_capped(request, limits.max_body_bytes)
            update = await anyio.to_thread.run_sync(
                decode_update, body, content_encoding, runtime.manifest, limits
            )
            security.accounts.check_seq(node_id, update.meta.seq, update.meta.update_id)
            _check_data(runtime, update.meta)
            if update.meta.lease_ids:  # before queueing: its round may apply at once
                meta = update.meta
                held = await anyio.to_thread.run_sync(
                    runtime.leases.hold,
                    meta.lease_ids,
                    node_id,
                    meta.update_id,
                    coordinator.seen(meta.update_id),
                )
        except BaseException:
            coordinator.release(node_id)
            raise
        try:
            receipt = coordinator.submit(node_id, update, reserved=True)
        except BaseException:
            if held:
                await anyio.to_thread.run_sync(runtime.leases.unhold, update.meta.update_id)
            raise
    except WireError as error:
        runtime.nodes.refused(node_id, len(body))
        request.app.state.metrics.refused(error.code)  # every refusal passes here, 429s too
        if error.status in (429, 503):  # "later", not a verdict on the update: not audited
            raise
        security.audit.record(
            f"node:{node_id}",
            "update.refused",
            f"node:{node_id}",
            {"reason": error.code, "detail": error.message[:300], "bytes": len(body)},
            client_address(request),
        )
        raise
    if not receipt["duplicate"]:
        runtime.nodes.accepted(node_id, update, runtime.manifest.numel)
    return {**receipt, "leases": held}


def _check_data(runtime: Runtime, meta: UpdateMeta) -> None:
    if meta.data_source == "local" and not runtime.settings.allow_local_data:
        raise WireError(
            422,
            "local_data_refused",
            "this server takes only updates computed on its own shards; "
            "run the node without --data",
        )
    if meta.lease_ids and not meta.update_id:
        raise WireError(
            422, "bad_metadata", "an update that finishes leases must carry an update_id"
        )
