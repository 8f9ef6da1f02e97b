"""`crowdtrain models`: list a running server's models, download one as a bundle, import a
bundle into it (docs/models.md). Same --server, --admin-token and TLS options as `tokens`."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from crowdtrain.admin_cli import (
    ADMIN_TOKEN,
    AS_JSON,
    CA_CERT,
    PIN_SHA256,
    SERVER,
    TIMEOUT_S,
    AdminError,
    _call,
    _connect,
    _print_json,
    _say,
)
from crowdtrain.files import write_atomic
from crowdtrain.terminal import fail, table_text

MODEL_ID = re.compile(r"^(current|v[0-9]{1,12}|imported:[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# a bundle of a big model takes a while to send, and the server checks it in full before it
# answers an import
TRANSFER_TIMEOUT = httpx.Timeout(TIMEOUT_S, connect=10.0, read=600.0, write=600.0)

models_app = typer.Typer(
    help="The models of a running server: its current weights, the checkpoints it keeps, and "
    "bundles imported into it.\n\n"
    "A bundle is one zip of model.safetensors, config.json and tokenizer.json, which "
    "crowdtrain.model.bundle.load_bundle loads back. Example: `crowdtrain models download "
    "current`, then `crowdtrain models import crowdtrain-current-v150.zip --name mine` on "
    "another server.",
    no_args_is_help=True,
)


def models_table(models: list[dict[str, Any]]) -> Table:
    table = Table("id", "kind", "version", "parameters", "when")
    for model in models:
        when = model.get("created_at") or model.get("imported_at")
        table.add_row(
            escape(model["id"]),
            model["kind"],
            str(model["version"]),
            f"{model['parameters']:,}" if model.get("parameters") is not None else "-",
            datetime.fromtimestamp(when).strftime("%Y-%m-%d %H:%M") if when else "now",
        )
    return table


@models_app.command("list")
def list_models(
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Every model of the server: current, the kept checkpoints (vN), imported ones.

    Example: crowdtrain models list --server https://train.example.org
    """
    answer = _call(_connect(server, admin_token, ca_cert, pin_sha256), "GET", "/models")
    if as_json:
        _print_json(answer["models"])
    else:
        typer.echo(table_text(models_table(answer["models"])))


@models_app.command("download")
def download(
    model_id: str = typer.Argument(
        "current", help="current, vN (a kept checkpoint) or imported:NAME, from `models list`."
    ),
    output: Path | None = typer.Option(
        None,
        "--output",
        "-o",
        help="Where to write the bundle (default: crowdtrain-ID-vVERSION.zip here).",
    ),
    force: bool = typer.Option(False, "--force", help="Replace --output if it exists."),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
) -> None:
    """Download a model as a bundle (zip: fp32 safetensors, config, tokenizer).

    Examples:

      crowdtrain models download current

      crowdtrain models download v150 -o run-150.zip
    """
    if not MODEL_ID.match(model_id):
        fail(f"{model_id!r} is not a model id: current, vN or imported:NAME (`models list`)")
    if output is not None and output.exists() and not force:
        fail(f"{output} exists: pass --force to replace it, or another --output")
    client = _connect(server, admin_token, ca_cert, pin_sha256)
    path = f"/models/{quote(model_id, safe=':')}/bundle"
    try:
        response = client.request("GET", path, timeout=TRANSFER_TIMEOUT)
    except AdminError as error:
        fail(str(error), error.code)
    finally:
        client.close()
    if output is None:
        output = Path(_attachment_name(response) or f"crowdtrain-{model_id.replace(':', '-')}.zip")
        if output.exists() and not force:
            fail(f"{output} exists: pass --force to replace it, or give --output")
    try:
        write_atomic(output, response.content)
    except OSError as error:
        fail(f"cannot write {output}: {error}", code=1)
    version = response.headers.get("x-crowdtrain-version", "?")
    _say(f"{escape(model_id)} (version {version}): {len(response.content):,} bytes in {output}")


@models_app.command("import")
def import_bundle(
    bundle: Path = typer.Argument(..., help="A bundle zip (from `models download`)."),
    name: str | None = typer.Option(
        None,
        "--name",
        help="The model becomes imported:NAME (default: the file's name without .zip).",
    ),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Import a bundle into the server, to chat with and download.

    The server checks it in full first; the chat page and POST /api/v1/chat then offer it.

    Example: crowdtrain models import crowdtrain-current-v150.zip --name shakespeare
    """
    name = bundle.stem if name is None else name
    if not MODEL_NAME.match(name):
        fail(
            f"{name!r} cannot name a model: use letters, digits, '.', '_' and '-' (at most 64, "
            "starting with a letter or digit); pass --name"
        )
    try:
        content = bundle.read_bytes()
    except OSError as error:
        fail(f"cannot read {bundle}: {error}")
    client = _connect(server, admin_token, ca_cert, pin_sha256)
    headers = {"Content-Type": "application/zip"}
    record = _call(
        client,
        "POST",
        "/models/import",
        params={"name": name},
        content=content,
        headers=headers,
        timeout=TRANSFER_TIMEOUT,
    )
    if as_json:
        _print_json(record)
        return
    _say(
        f"imported {escape(bundle.name)} as {escape(record['id'])} (version {record['version']}, "
        f"{record['parameters']:,} parameters)"
    )


@models_app.command("remove")
def remove(
    model_id: str = typer.Argument(..., help="imported:NAME, from `models list`."),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
) -> None:
    """Remove an imported model from the server.

    Example: crowdtrain models remove imported:shakespeare
    """
    if not MODEL_ID.match(model_id) or not model_id.startswith("imported:"):
        fail(f"{model_id!r} is not an imported model: imported:NAME (`models list`)")
    client = _connect(server, admin_token, ca_cert, pin_sha256)
    _call(client, "DELETE", f"/models/{quote(model_id, safe=':')}")
    _say(f"{escape(model_id)} is removed")


def _attachment_name(response: httpx.Response) -> str | None:
    """The file name the server suggests, if it is a plain one."""
    found = re.search(
        r'filename="([A-Za-z0-9._-]+)"', response.headers.get("content-disposition", "")
    )
    return found.group(1) if found else None
