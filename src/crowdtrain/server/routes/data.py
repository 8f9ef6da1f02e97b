"""Training data: shard leases and downloads, the epoch ledger, datasets and uploads."""

from __future__ import annotations

import logging
import os
import uuid
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Path, Query, Request, Response

from crowdtrain.data.importers import DataImportError, ImportOptions
from crowdtrain.data.leases import LEASE_ID_PATTERN, LeaseError
from crowdtrain.data.store import SPLITS, StoreError
from crowdtrain.protocol import encoding
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.auth import Admin, CurrentNode, Downloader, Viewer, client_address
from crowdtrain.server.deps import Runtime, count_transfer
from crowdtrain.server.routes.model import BINARY, binary_response
from crowdtrain.server.schemas import (
    CoveragePublic,
    DatasetPublic,
    ErrorPublic,
    ImportPublic,
    LeasePublic,
    RenewPublic,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["data"])

LeaseId = Annotated[str, Path(pattern=LEASE_ID_PATTERN, description="a lease id")]
DatasetName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
FileName = Annotated[str, Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,199}$")]
_ERRORS = {code: {"model": ErrorPublic} for code in (403, 404, 409, 410, 413, 422)}
NO_SHARD_RETRY_S = 5.0


def _lease_error(error: LeaseError) -> WireError:
    return WireError(error.status, error.code, error.message)


@router.post("/leases", response_model=LeasePublic, responses=_ERRORS)
def acquire_lease(runtime: Runtime, node: CurrentNode) -> dict:
    """Lease the next shard to train on. Renew it within `ttl_s`, and name it in the `leases`
    of the update that finishes it. `lease` is null while every shard is taken: retry later."""
    book = runtime.leases
    try:
        grant = book.acquire(node.node_id)
    except LeaseError as error:  # too_many_leases: 429, retry once some are finished
        raise WireError(
            error.status, error.code, error.message, retry_after_s=NO_SHARD_RETRY_S
        ) from None
    if grant is None:
        return {"lease": None, "ttl_s": book.ttl_s, "retry_after_s": NO_SHARD_RETRY_S}
    info = book.tokenization
    return {
        "lease": grant.id,
        "shard": {
            "id": grant.shard.id,
            "index": grant.shard.index,
            "tokens": grant.shard.tokens,
            "sha256": grant.shard.sha256,
            "dtype": info.dtype,
            "masked": info.masked,
        },
        "epoch": grant.epoch,
        "expires_at": grant.expires_at,
        "ttl_s": grant.ttl_s,
    }


@router.post("/leases/{lease_id}/renew", response_model=RenewPublic, responses=_ERRORS)
def renew_lease(runtime: Runtime, node: CurrentNode, lease_id: LeaseId) -> dict:
    """Keep a lease while training on its shard; 409 lease_lost once it expired."""
    try:
        return {"lease": lease_id, "expires_at": runtime.leases.renew(lease_id, node.node_id)}
    except LeaseError as error:
        raise _lease_error(error) from None


@router.delete("/leases/{lease_id}", status_code=204, responses=_ERRORS)
def release_lease(runtime: Runtime, node: CurrentNode, lease_id: LeaseId) -> Response:
    """Give an unfinished shard back (the node is stopping); it is issued again at once."""
    try:
        runtime.leases.release(lease_id, node.node_id)
    except LeaseError as error:
        raise _lease_error(error) from None
    return Response(status_code=204)


@router.get(
    "/shards/{shard_id}",
    response_class=Response,
    responses={
        200: {"content": {BINARY: {}}},
        404: {"model": ErrorPublic},
        410: {"model": ErrorPublic},
    },
)
async def download_shard(
    runtime: Runtime,
    who: Downloader,
    shard_id: Annotated[int, Path(ge=0, le=1 << 62)],
    accept_encoding: Annotated[str | None, Header()] = None,
) -> Response:
    """A training shard's bytes: the token ids (then the loss mask, for sft), compressed when
    the client accepts it. `X-Crowdtrain-Sha256` is what they hash to. Validation shards are
    never served."""
    shard = runtime.leases.shards.get(shard_id)
    if shard is None:
        raise WireError(404, "unknown_shard", f"no training shard {shard_id} on this server")
    content_encoding = encoding.choose(accept_encoding)

    def read() -> tuple[bytes, int]:
        raw = shard.path.read_bytes()
        if shard.mask_path is not None:
            raw += shard.mask_path.read_bytes()
        return encoding.compress(raw, content_encoding), len(raw)

    try:
        body, raw_bytes = await anyio.to_thread.run_sync(read)
    except OSError as error:  # deleted or unreadable under a running server: not the node's fault
        log.error("training shard %d cannot be read: %s", shard_id, error)
        raise WireError(
            410,
            "shard_gone",
            f"training shard {shard_id} cannot be read on the server; take another lease",
        ) from None
    count_transfer(runtime, who, "shard", len(body), raw_bytes)
    headers = {"X-Crowdtrain-Sha256": shard.sha256, "ETag": f'"{shard.sha256}"'}
    return binary_response(body, content_encoding, headers)


@router.get("/data/status", responses=_ERRORS)
def data_status(runtime: Runtime, _: Viewer) -> dict:
    """The training data: dataset, split, shards, the current epoch and its progress."""
    return runtime.leases.status()


@router.get("/data/epochs/{number}", response_model=CoveragePublic, responses=_ERRORS)
def epoch_coverage(
    runtime: Runtime, _: Viewer, number: Annotated[int, Path(ge=0, le=2**31)]
) -> dict:
    """The ledger of an epoch: the lease, node, update and version that completed each shard,
    the shards still missing, and (by construction always none) shards completed twice."""
    try:
        return runtime.leases.coverage(number)
    except LeaseError as error:
        raise _lease_error(error) from None


@router.get("/datasets", response_model=list[DatasetPublic], responses=_ERRORS)
def list_datasets(runtime: Runtime, _: Viewer) -> list[dict]:
    """Every dataset in the store with its splits' sizes."""
    return runtime.store.list()


@router.get("/datasets/{name}", response_model=DatasetPublic, responses=_ERRORS)
def show_dataset(runtime: Runtime, _: Viewer, name: DatasetName) -> dict:
    """A dataset's splits, sources (with sha256) and tokenizations."""
    try:
        return runtime.store.show(name, runtime.tokenizer.version)
    except StoreError as error:
        raise WireError(404, "unknown_dataset", str(error)) from None


@router.put(
    "/datasets/{name}/{split}/files/{filename}",
    response_model=ImportPublic,
    responses=_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
        }
    },
)
async def upload_file(
    request: Request,
    runtime: Runtime,
    admin: Admin,
    name: DatasetName,
    split: Annotated[str, Path(pattern=f"^({'|'.join(SPLITS)})$")],
    filename: FileName,
    field: Annotated[str, Query(max_length=256, description="column holding the text")] = "text",
    paragraphs: Annotated[bool, Query(description=".txt/.md: one document per paragraph")] = False,
) -> dict:
    """Import one uploaded file (its suffix picks the format) into a dataset split: all of it
    or nothing, like `crowdtrain data import`. Training picks new documents up at the next
    server start."""
    cap = int(runtime.settings.max_upload_mb * (1 << 20))
    uploads = runtime.data_dir / "uploads"
    uploads.mkdir(exist_ok=True)
    # the file keeps its name (and so its suffix, which picks the importer) in its own folder
    folder = uploads / f".upload-{uuid.uuid4().hex}"
    folder.mkdir()
    path = folder / filename
    try:
        with open(path, "wb") as handle:
            await _receive(request, handle, cap)
        options = ImportOptions(field=field, paragraphs=paragraphs)
        report = await anyio.to_thread.run_sync(
            lambda: runtime.store.import_path(
                path, name, split, options, label=f"upload:{filename}"
            )
        )
    except (DataImportError, StoreError) as error:
        message = str(error)
        for prefix in (str(folder.resolve()), str(folder)):  # the server's paths stay its own
            message = message.replace(prefix + os.sep, "")
        raise WireError(422, "bad_data", message) from None
    finally:
        path.unlink(missing_ok=True)
        folder.rmdir()
    runtime.security.audit.record(
        admin.subject,
        "data.upload",
        f"{name}/{split}",
        {"file": filename, "documents": report.documents, "changed": report.changed},
        client_address(request),
    )
    return _report(report)


async def _receive(request: Request, handle, cap: int) -> None:
    """Stream the body to a file, refusing with 413 past `cap` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > cap:
        raise WireError(413, "too_large", f"the file of {declared} bytes exceeds {cap} bytes")
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > cap:
            raise WireError(
                413, "too_large", f"the file exceeds {cap} bytes (max_upload_mb on the server)"
            )
        handle.write(chunk)


def _report(report) -> dict:
    return {
        "dataset": report.dataset,
        "split": report.split,
        "changed": report.changed,
        "imported": report.imported,
        "skipped": report.skipped,
        "documents": report.documents,
        "duplicates": report.duplicates,
        "bytes": report.bytes,
        "summary": report.summary(),
    }
