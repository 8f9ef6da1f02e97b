"""What nodes download: manifest, tokenizer, snapshots, published deltas, version waits."""

from __future__ import annotations

from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Header, Query, Request, Response

from crowdtrain.protocol import encoding
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.auth import Downloader, Viewer
from crowdtrain.server.deps import Runtime, count_transfer
from crowdtrain.server.schemas import ManifestPublic, VersionPublic

router = APIRouter(prefix="/model", tags=["model"])

MAX_WAIT_S = 60.0
BINARY = "application/octet-stream"


def _encoding_for(accept_encoding: str | None) -> str:
    return encoding.choose(accept_encoding)


def binary_response(body: bytes, content_encoding: str, headers: dict[str, str]) -> Response:
    if content_encoding != "identity":
        headers = {**headers, "Content-Encoding": content_encoding}
    return Response(content=body, media_type=BINARY, headers={**headers, "Vary": "Accept-Encoding"})


@router.get("/manifest", response_model=ManifestPublic)
def manifest(runtime: Runtime, _: Viewer) -> dict:
    """Every parameter an update may name, with its shape and dtype."""
    return {
        "version": runtime.coordinator.version,
        "parameters": runtime.manifest.numel,
        "tensors": runtime.manifest.to_json(),
    }


@router.get(
    "/tokenizer", response_class=Response, responses={200: {"content": {"application/json": {}}}}
)
def tokenizer(runtime: Runtime, _: Viewer) -> Response:
    """The tokenizer (HF tokenizers JSON) the model was trained with."""
    return Response(
        runtime.tokenizer.to_json(),
        media_type="application/json",
        headers={"ETag": f'"{runtime.tokenizer.version}"'},
    )


@router.get(
    "/snapshot",
    response_class=Response,
    responses={200: {"content": {BINARY: {}}}, 304: {"description": "not modified"}},
)
async def snapshot(
    runtime: Runtime,
    who: Downloader,
    dtype: Annotated[Literal["fp32", "bf16", "fp16"], Query(description="tensor dtype")] = "fp32",
    accept_encoding: Annotated[str | None, Header()] = None,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """The current weights as safetensors (fp32 is bit-exact; bf16/fp16 halve the download).

    ETag is the version (with the server's lineage and the dtype); a matching If-None-Match
    gets 304. zstd-compressed when the client accepts it."""
    c = runtime.coordinator
    etag = f'"{c.version}-{c.lineage}-{dtype}"'
    headers = {
        "ETag": etag,
        "X-Crowdtrain-Version": str(c.version),
        "X-Crowdtrain-Lineage": c.lineage,
    }
    if if_none_match == etag:
        return Response(status_code=304, headers=headers)
    content_encoding = _encoding_for(accept_encoding)
    encoded = await anyio.to_thread.run_sync(runtime.publisher.snapshot, dtype, content_encoding)
    count_transfer(runtime, who, "snapshot", len(encoded.body), encoded.raw_bytes)
    version = encoded.version
    headers.update(
        {"ETag": f'"{version}-{c.lineage}-{dtype}"', "X-Crowdtrain-Version": str(version)}
    )
    return binary_response(encoded.body, content_encoding, headers)


@router.get(
    "/deltas",
    response_class=Response,
    responses={
        200: {"content": {BINARY: {}}},
        204: {"description": "no new version"},
        410: {"description": "too far behind: download a snapshot"},
    },
)
async def deltas(
    request: Request,
    runtime: Runtime,
    who: Downloader,
    since: Annotated[int, Query(ge=0, description="the version the node holds")],
    lineage: Annotated[str, Query(max_length=64, description="lineage of that version")],
    wait: Annotated[
        float, Query(ge=0, le=MAX_WAIT_S, description="seconds to wait for a newer version")
    ] = 0.0,
    accept_encoding: Annotated[str | None, Header()] = None,
) -> Response:
    """The published deltas after `since`, applied in order with `param += delta` (fp32).

    Waits up to `wait` seconds when nothing is newer (204 then). 410 when the node must
    download a snapshot instead (server restarted, too far behind, or a snapshot is smaller)."""
    c = runtime.coordinator
    if wait > 0 and lineage == c.lineage and since == c.version:
        await request.app.state.version_watch.wait_past(since, wait)
    content_encoding = _encoding_for(accept_encoding)
    result = await anyio.to_thread.run_sync(
        runtime.publisher.deltas, since, lineage, content_encoding
    )
    headers = {"X-Crowdtrain-Version": str(c.version), "X-Crowdtrain-Lineage": c.lineage}
    if result is None:
        raise WireError(
            410,
            "snapshot_required",
            f"version {since} of lineage {lineage!r} "
            "cannot be advanced by deltas; download /api/v1/model/snapshot",
            current_version=c.version,
            lineage=c.lineage,
        )
    if result.version == since:
        return Response(status_code=204, headers=headers)
    count_transfer(runtime, who, "deltas", len(result.body), result.raw_bytes)
    headers["X-Crowdtrain-Version"] = str(result.version)
    return binary_response(result.body, content_encoding, headers)


@router.get("/version", response_model=VersionPublic)
async def version(
    request: Request,
    runtime: Runtime,
    _: Viewer,
    after: Annotated[
        int | None, Query(ge=0, description="wait for a version newer than this")
    ] = None,
    wait: Annotated[float, Query(ge=0, le=MAX_WAIT_S)] = 0.0,
) -> dict:
    """The current version; with `after` and `wait`, waits (long-poll) for a newer one."""
    c = runtime.coordinator
    if after is not None and wait > 0 and c.version <= after:
        await request.app.state.version_watch.wait_past(after, wait)
    return {"version": c.version, "lineage": c.lineage}
