"""Models to download, import and chat with: bundles (docs/models.md) and streamed replies."""

from __future__ import annotations

import shutil
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from crowdtrain.model.bundle import HEADER_ALLOWANCE
from crowdtrain.protocol.errors import WireError, invalid_request
from crowdtrain.server.auth import Admin, Downloader, Viewer, client_address
from crowdtrain.server.deps import Runtime
from crowdtrain.server.inference import Sampling
from crowdtrain.server.library import BUNDLE_FILE, MODEL_ID_PATTERN, MODEL_NAME_PATTERN
from crowdtrain.server.routes.data import _receive
from crowdtrain.server.schemas import ErrorPublic

router = APIRouter(tags=["models"])

ZIP = "application/zip"
BINARY = "application/octet-stream"
ModelId = Annotated[
    str, Path(pattern=MODEL_ID_PATTERN, description="current, vN (a checkpoint) or imported:NAME")
]
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorPublic} for code in (404, 409, 410, 413, 415, 422)
}
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 32_000


class ModelPublic(BaseModel):
    id: str
    kind: Literal["current", "checkpoint", "imported"]
    version: int
    parameters: int | None = None
    created_at: float | None = None  # checkpoints: when the file was written
    name: str | None = None  # imported: the name it was imported under
    imported_at: float | None = None
    preset: str | None = None
    bytes: int | None = None  # imported: size of the bundle


class ModelsPublic(BaseModel):
    models: list[ModelPublic]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=MAX_CONTENT_CHARS)


class ChatIn(BaseModel):
    """A conversation to reply to, and how to sample the reply."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("current", pattern=MODEL_ID_PATTERN, description="a model id")
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    temperature: float = Field(0.8, ge=0, le=2, description="0: greedy")
    top_k: int | None = Field(None, ge=1, le=1_000_000, description="sample from the k likeliest")
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling")
    max_tokens: int = Field(256, ge=1, le=1024, description="most tokens in the reply")


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema with its $defs written in place: an OpenAPI document resolves `$ref`
    from its root, where pydantic's `#/$defs/...` are not."""
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


@router.get("/models", response_model=ModelsPublic, response_model_exclude_none=True)
def list_models(runtime: Runtime, _: Viewer) -> dict:
    """Every model to download or chat with: `current` (the weights being trained), the kept
    checkpoints (`vN`), and imported bundles (`imported:NAME`)."""
    return {"models": runtime.models.list()}


@router.get(
    "/models/{model_id}/bundle",
    response_class=Response,
    responses={200: {"content": {ZIP: {}}}, **_ERRORS},
)
async def download_bundle(runtime: Runtime, _: Downloader, model_id: ModelId) -> Response:
    """A model as a bundle: one zip of model.safetensors (fp32), config.json and
    tokenizer.json, which `crowdtrain.model.bundle.load_bundle` loads back."""
    zipped, version = await anyio.to_thread.run_sync(runtime.models.bundle, model_id)
    filename = f"crowdtrain-{model_id.replace(':', '-')}-v{version}.zip"
    headers = {
        "Content-Disposition": f'attachment; filename="{filename}"',
        "X-Crowdtrain-Version": str(version),
    }
    return Response(zipped, media_type=ZIP, headers=headers)


@router.post(
    "/models/import",
    response_model=ModelPublic,
    response_model_exclude_none=True,
    status_code=201,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                ZIP: {"schema": {"type": "string", "format": "binary"}},
                BINARY: {"schema": {"type": "string", "format": "binary"}},
            },
        }
    },
)
async def import_model(
    request: Request,
    runtime: Runtime,
    admin: Admin,
    name: Annotated[
        str, Query(pattern=f"^{MODEL_NAME_PATTERN}$", description="it becomes imported:NAME")
    ],
) -> dict:
    """Import a bundle (the body, up to max_upload_mb) as the model `imported:NAME`, to chat
    with and download. It is checked in full first: a bundle that does not load is 422."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in (ZIP, BINARY):
        raise WireError(415, "unsupported_media_type", f"send the bundle as {ZIP} or {BINARY}")
    library = runtime.models
    library.check_free(name)
    cap = int(runtime.settings.max_upload_mb * (1 << 20))
    staging = library.staging()
    try:
        with open(staging / BUNDLE_FILE, "wb") as handle:
            await _receive(request, handle, cap)
        # fp32 weights barely compress: twice the upload bounds what a real bundle unpacks to
        max_bytes = 2 * cap + 2 * HEADER_ALLOWANCE
        record = await anyio.to_thread.run_sync(library.import_bundle, name, staging, max_bytes)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already once imported
    runtime.security.audit.record(
        admin.subject,
        "model.import",
        record["id"],
        {
            "version": record["version"],
            "parameters": record["parameters"],
            "bytes": record["bytes"],
        },
        client_address(request),
    )
    return record


@router.delete(
    "/models/{model_id}",
    response_model=ModelPublic,
    response_model_exclude_none=True,
    responses=_ERRORS,
)
def remove_model(request: Request, runtime: Runtime, admin: Admin, model_id: ModelId) -> dict:
    """Remove an imported model (`imported:NAME`); chats already running with it finish."""
    record = runtime.models.remove(model_id)
    runtime.inference.forget(model_id)
    runtime.security.audit.record(
        admin.subject,
        "model.remove",
        model_id,
        {"version": record["version"]},
        client_address(request),
    )
    return record


@router.post(
    "/chat",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the reply, streamed"},
        **_ERRORS,
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _inlined(ChatIn.model_json_schema())}},
        }
    },
)
async def chat(request: Request, runtime: Runtime, _: Viewer) -> StreamingResponse:
    """Reply to a conversation, streamed as server-sent events: `data: {"text": ...}` per
    piece, then `data: {"done": true, "tokens", "seconds", "model", "version", "finish"}` (or
    `data: {"error", "detail"}`). 429 while max_chat_streams replies are being generated.

    The body is read after the access check, so a caller without access learns nothing of
    what the route expects."""
    raw = await request.body()
    try:
        body = ChatIn.model_validate_json(raw)
    except ValidationError as error:
        raise invalid_request([dict(problem) for problem in error.errors()]) from None
    sampling = Sampling(body.temperature, body.top_k, body.top_p, body.max_tokens)
    messages = [message.model_dump() for message in body.messages]
    stream = await runtime.inference.open(body.model, messages, sampling)
    return StreamingResponse(
        stream.events(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
