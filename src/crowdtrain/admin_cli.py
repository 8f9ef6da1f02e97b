"""`crowdtrain tokens`, `crowdtrain nodes`, `crowdtrain audit`: a server's accounts, managed
over its HTTP API with an admin token (docs/security.md)."""

from __future__ import annotations

import getpass
import json
import re
import ssl
import time
from datetime import datetime
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import httpx
import typer
from rich.markup import escape
from rich.table import Table

from crowdtrain import __version__
from crowdtrain.settings import NODE_NAME_PATTERN, SERVER_URL_ENV
from crowdtrain.terminal import console, fail, table_text

DEFAULT_SERVER = "http://127.0.0.1:8000"
API = "/api/v1"
TIMEOUT_S = 30.0
LOST_ADMIN_TOKEN = (
    "lost the admin token? on the server's machine, `crowdtrain tokens create --role admin "
    "--data-dir DIR` makes a new one"
)

tokens_app = typer.Typer(
    help="Create, list and revoke the tokens of a running server.\n\n"
    "node: an enrollment token; a node trades it once for its own identity "
    "(`crowdtrain node --server URL --token SECRET`). viewer: reads the dashboard and the "
    "training history. admin: everything, these commands included.\n\n"
    "Every command talks to the server at --server with an admin token (--admin-token, or "
    "CROWDTRAIN_ADMIN_TOKEN): the one the server printed at its first start, or one made here.",
    no_args_is_help=True,
)
nodes_app = typer.Typer(
    help="List the nodes registered with a running server, and ban them.\n\n"
    "Example: `crowdtrain nodes list`, then `crowdtrain nodes ban laptop-7 --reason spam`.",
    no_args_is_help=True,
)


class Role(str, Enum):
    node = "node"
    viewer = "viewer"
    admin = "admin"


# ---- talking to the server -------------------------------------------------------------


class AdminError(Exception):
    """A command cannot do what it was asked; the message says why (one line) and what to do.
    `code`: the exit status (1: the server is unreachable or refused; 2: bad input)."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code


def refusal_message(status: int, body: Any, url: str) -> str:
    """One line for a 4xx/5xx answer: the server's own message where it gave one."""
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(body, dict) and isinstance(detail, str) and "error" in body:
        message = f"{detail} (HTTP {status} {body['error']})"
    elif isinstance(detail, list):  # FastAPI's request validation: where, and what is wrong
        problems = []
        for problem in detail:
            where = [str(p) for p in problem.get("loc", []) if p not in ("body", "query", "path")]
            problems.append(f"{'.'.join(where) or 'request'}: {problem.get('msg', problem)}")
        message = f"the server refused the request: {'; '.join(problems)} (HTTP {status})"
    elif isinstance(detail, str):
        message = f"HTTP {status} from {url}: {detail}"
    else:
        text = body if isinstance(body, str) else json.dumps(body)
        message = f"HTTP {status} from {url}: {' '.join(text.split())[:200]}"
    if status in (401, 403):
        message = (
            f"the server refused the admin token: {message}; check --admin-token (or "
            f"CROWDTRAIN_ADMIN_TOKEN); {LOST_ADMIN_TOKEN}"
        )
    return message


class AdminClient:
    """The admin API of one server (`/api/v1` under `server`), answers parsed from JSON."""

    def __init__(self, server: str, admin_token: str, verify: ssl.SSLContext | bool = True):
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server + API,
            timeout=httpx.Timeout(TIMEOUT_S, connect=10.0),
            headers={
                "Authorization": f"Bearer {admin_token}",
                "User-Agent": f"crowdtrain-admin/{__version__}",
            },
            verify=verify,
        )

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """The answer's JSON; AdminError when the server is unreachable or refuses."""
        response = self.request(method, path, **kwargs)
        try:
            body = response.json()
        except ValueError:
            body = response.text
        if isinstance(body, str):
            raise AdminError(
                f"{self.server + API + path} did not answer with JSON: is {self.server} a "
                "crowdtrain server?"
            )
        return body

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The answer, whatever its content (a bundle); AdminError as for call."""
        from crowdtrain.node.tls import certificate_error

        url = self.server + API + path
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException:
            raise AdminError(
                f"the server at {self.server} did not answer within {TIMEOUT_S:.0f} s"
            ) from None
        except httpx.TransportError as error:
            tls = certificate_error(error, self.server)
            if tls is not None:
                raise AdminError(str(tls)) from None
            hint = (
                "; a server with TLS needs an https:// URL"
                if isinstance(error, httpx.RemoteProtocolError) and self.server.startswith("http:")
                else ""
            )
            raise AdminError(
                f"cannot reach the server at {self.server} ({error or type(error).__name__}); "
                f"is it running, and is --server (or {SERVER_URL_ENV}) its URL?{hint}"
            ) from None
        if response.is_error:
            try:
                body = response.json()
            except ValueError:
                body = response.text
            code = 2 if response.status_code in (404, 409, 422) else 1
            raise AdminError(refusal_message(response.status_code, body, url), code)
        return response

    def close(self) -> None:
        self._http.close()


def _connect(
    server: str, admin_token: str | None, ca_cert: Path | None, pin_sha256: str | None
) -> AdminClient:
    from crowdtrain.node.tls import TlsError, client_ssl

    if not admin_token:
        fail(
            "these commands need the server's admin token: pass --admin-token or set "
            "CROWDTRAIN_ADMIN_TOKEN (the server printed one at its first start); "
            f"{LOST_ADMIN_TOKEN}"
        )
    if not re.fullmatch(r"[!-~]+", admin_token):  # what an HTTP header can carry
        fail("the admin token holds spaces or characters no crowdtrain token has (ct_admin_...)")
    try:
        parts = urlsplit(server)
        usable = parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
        httpx.URL(server)
    except (ValueError, httpx.InvalidURL):  # a bad port or IPv6 address
        usable = False
    if not usable:
        fail(f"--server must be an http:// or https:// URL, like {DEFAULT_SERVER}; got {server!r}")
    try:
        verify = client_ssl(server, ca_cert, pin_sha256)
    except TlsError as error:
        fail(str(error), code=1)
    return AdminClient(server, admin_token, verify)


def _call(client: AdminClient, method: str, path: str, **kwargs: Any) -> Any:
    try:
        return client.call(method, path, **kwargs)
    except AdminError as error:
        fail(str(error), error.code)
    finally:
        client.close()


# ---- formatting --------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A rough length of time: 45s, 12m, 3h 20m, 6d 23h."""
    seconds = abs(seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m"
    if seconds < 86400:
        hours, minutes = divmod(seconds // 60, 60)
        return f"{hours:.0f}h {minutes:.0f}m" if minutes else f"{hours:.0f}h"
    days, hours = divmod(seconds // 3600, 24)
    return f"{days:.0f}d {hours:.0f}h" if hours else f"{days:.0f}d"


def moment(timestamp: float | None, now: float | None = None, never: str = "-") -> str:
    """A time as local date and time with how far it is from now: '2024-05-08 14:03 (in 7d)'."""
    if timestamp is None:
        return never
    now = time.time() if now is None else now
    when = datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")
    distance = span(timestamp - now)
    return f"{when} (in {distance})" if timestamp > now else f"{when} ({distance} ago)"


def uses_text(token: dict[str, Any]) -> str:
    """Registrations of an enrollment token: '2/5', or '2' without a limit; '-' for API tokens."""
    if token["kind"] != "enroll":
        return "-"
    return f"{token['uses']}/{token['max_uses']}" if token["max_uses"] else str(token["uses"])


def detail_text(detail: dict[str, Any]) -> str:
    """An audit event's detail as 'key=value' pairs, leaving out the empty ones (times, the
    keys ending in _at, as local dates)."""
    pairs = []
    for key, value in detail.items():
        if value in (None, ""):
            continue
        if key.endswith("_at") and isinstance(value, (int, float)):
            value = datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M")
        pairs.append(f"{key}={value}")
    return " ".join(pairs)


def tokens_table(tokens: list[dict[str, Any]], now: float | None = None) -> Table:
    table = Table("id", "role", "label", "starts with", "uses", "state", "expires", "created")
    for token in tokens:
        table.add_row(
            str(token["id"]),
            token["role"],
            escape(token["label"]),
            escape(token["prefix"]) + "…",
            uses_text(token),
            token["state"],
            moment(token["expires_at"], now, never="never"),
            f"{moment(token['created_at'], now)} by {escape(token['created_by'])}",
        )
    return table


def nodes_table(nodes: list[dict[str, Any]], now: float | None = None) -> Table:
    table = Table("node", "name", "token", "registered", "last seen", "state")
    for node in nodes:
        if node["revoked_at"] is None:
            state = "active"
        else:
            state = f"banned {moment(node['revoked_at'], now)}"
            state += f": {node['revoked_reason']}" if node["revoked_reason"] else ""
        table.add_row(
            escape(node["node_id"]),
            escape(node["name"]),
            "-" if node["token_id"] is None else str(node["token_id"]),
            moment(node["created_at"], now),
            moment(node["last_seen_at"], now),
            escape(state),
        )
    return table


def audit_table(events: list[dict[str, Any]]) -> Table:
    table = Table("id", "time", "actor", "action", "target", "detail", "address")
    for event in events:
        table.add_row(
            str(event["id"]),
            datetime.fromtimestamp(event["time"]).strftime("%Y-%m-%d %H:%M:%S"),
            escape(event["actor"]),
            escape(event["action"]),
            escape(event["target"]),
            escape(detail_text(event["detail"])),
            escape(event["address"]),
        )
    return table


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2))


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


# ---- options every command shares --------------------------------------------------------

SERVER = typer.Option(
    DEFAULT_SERVER,
    "--server",
    "-s",
    envvar=SERVER_URL_ENV,
    help="The server's URL, as nodes use it.",
)
ADMIN_TOKEN = typer.Option(
    None,
    "--admin-token",
    envvar="CROWDTRAIN_ADMIN_TOKEN",
    show_default=False,
    help="An admin token (ct_admin_...). Prefer the environment variable: a flag shows in "
    "the shell's history and the process list.",
)
CA_CERT = typer.Option(
    None, "--ca-cert", help="https: trust only the CA in this PEM file (a server with --tls-cert)."
)
PIN_SHA256 = typer.Option(
    None,
    "--pin-sha256",
    help="https: accept only the certificate with this SHA-256 fingerprint (a --self-signed "
    "server prints it at start).",
)
AS_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")


# ---- tokens ------------------------------------------------------------------------------


@tokens_app.command("create")
def create_token(
    role: Role = typer.Option(
        ...,
        "--role",
        help="node: an enrollment token for nodes to register with; viewer: read-only API "
        "access; admin: full API access.",
    ),
    uses: int | None = typer.Option(
        None,
        "--uses",
        min=1,
        max=1_000_000,
        help="node tokens: how many registrations it is good for (default: no limit).",
    ),
    expires: str | None = typer.Option(
        None,
        "--expires",
        help="Lifetime: 30m, 12h, 7d, 2w or seconds (default: it never expires).",
    ),
    label: str = typer.Option("", "--label", help="A note to tell it apart in `tokens list`."),
    data_dir: Path | None = typer.Option(
        None,
        "--data-dir",
        help="Offline: write the token straight into the database of the server with this "
        "data directory, without --server or an admin token (safe while it runs). For when "
        "the admin token is lost.",
    ),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Create a token and print its secret, once: the server keeps only its hash.

    Examples:

      crowdtrain tokens create --role node --uses 10 --expires 7d --label "lab machines"

      crowdtrain tokens create --role viewer --label dashboard

    Lost the admin token? On the server's machine, make a new one offline:

      crowdtrain tokens create --role admin --data-dir ./crowdtrain-data
    """
    if data_dir is not None:
        secret, token = _create_offline(data_dir, role.value, uses, expires, label)
        server_flags = ""  # unknown offline
    else:
        body = {"role": role.value, "uses": uses, "expires": expires, "label": label}
        client = _connect(server, admin_token, ca_cert, pin_sha256)
        token = _call(client, "POST", "/tokens", json=body)
        secret = token["token"]
        server_flags = server + (f" --pin-sha256 {pin_sha256}" if pin_sha256 else "")
        server_flags += f" --ca-cert {ca_cert}" if ca_cert else ""
    if as_json:
        _print_json(token)
        return
    _show_secret(secret, token, server_flags)


def _create_offline(
    data_dir: Path, role: str, uses: int | None, expires: str | None, label: str
) -> tuple[str, dict[str, Any]]:
    """A token written into the server's database directly; the server finds it on first use."""
    from crowdtrain.db import Database, DatabaseError
    from crowdtrain.db.database import DATABASE_FILE
    from crowdtrain.protocol.errors import WireError
    from crowdtrain.server.accounts import Accounts, parse_duration
    from crowdtrain.server.audit import AuditLog
    from crowdtrain.settings import ServerSettings, SettingsError, load_settings

    try:
        expires_in = parse_duration(expires) if expires else None
    except ValueError as error:
        fail(f"--expires: {error}")
    try:
        settings = load_settings(ServerSettings, None, data_dir=data_dir)
    except SettingsError as error:
        fail(str(error))
    if settings.database_url is None and not (data_dir / DATABASE_FILE).is_file():
        fail(
            f"{data_dir} holds no {DATABASE_FILE}: give the --data-dir the server runs with "
            "(the server makes its database at its first start)"
        )
    try:
        database = (
            Database(settings.database_url)
            if settings.database_url
            else Database.in_directory(data_dir)
        )
    except (DatabaseError, OSError) as error:
        fail(f"cannot open the server's database: {error}", code=1)
    audit = AuditLog(database)
    try:
        actor = f"local:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name for this uid (some containers)
        actor = "local"
    try:
        secret, public = Accounts(database, audit).create_token(
            role, actor, uses, expires_in, label
        )
        return secret, {**public, "token": secret}
    except WireError as error:
        fail(error.message)
    finally:
        audit.close()
        database.close()


def _show_secret(secret: str, token: dict[str, Any], server_flags: str) -> None:
    """The secret alone on stdout (so `$(crowdtrain tokens create ...)` captures it), what it
    is and how to use it on stderr. `server_flags`: the URL and TLS flags that reach the
    server ("" when unknown)."""
    limits = []
    if token["max_uses"]:
        limits.append(f"{token['max_uses']} registrations")
    limits.append(f"expires {moment(token['expires_at'], never='never')}")
    kind = "enrollment token" if token["kind"] == "enroll" else "API token"
    label = f" {escape(repr(token['label']))}" if token["label"] else ""
    _say(f"Created {token['role']} {kind} {token['id']}{label} ({', '.join(limits)}):")
    print(secret, flush=True)
    _say(
        "[bold]Copy it now: it is not shown again[/] (the server keeps only its hash; lost, "
        "revoke it and make a new one)."
    )
    url = escape(server_flags) if server_flags else "SERVER_URL"
    if token["role"] == "node":
        _say(
            f"Give it to whoever runs the node; they join with:\n"
            f"  crowdtrain node --server {url} --token {secret}\n"
            "The node registers once and keeps its own identity in its config directory."
        )
    elif token["role"] == "admin":
        _say(
            f"Use it with these commands:\n  export CROWDTRAIN_ADMIN_TOKEN={secret}\n"
            f"  crowdtrain tokens list --server {url}"
        )
    else:
        _say(
            "Send it as the header 'Authorization: Bearer SECRET' to read what viewers read "
            f"(the dashboard, {API}/info, {API}/history)."
        )


@tokens_app.command("list")
def list_tokens(
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Every token with its state (active, expired, used up, revoked); never the secrets.

    Example: crowdtrain tokens list --server https://train.example.org
    """
    tokens = _call(_connect(server, admin_token, ca_cert, pin_sha256), "GET", "/tokens")
    if as_json:
        _print_json(tokens)
    else:
        typer.echo(table_text(tokens_table(tokens)))


@tokens_app.command("revoke")
def revoke_token(
    token_id: int = typer.Argument(..., min=1, help="The token's id, from `tokens list`."),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Revoke a token: it is refused from the next request on.

    Nodes that already registered with an enrollment token keep their identity; ban them with
    `crowdtrain nodes ban NODE_ID`.

    Example: crowdtrain tokens revoke 7
    """
    client = _connect(server, admin_token, ca_cert, pin_sha256)
    token = _call(client, "DELETE", f"/tokens/{token_id}")
    if as_json:
        _print_json(token)
        return
    _say(f"token {token['id']} ({token['role']}, {escape(token['prefix'])}…) is revoked")
    if token["kind"] == "enroll" and token["uses"]:
        _say(
            f"the {token['uses']} node(s) registered with it keep their identity; "
            "`crowdtrain nodes list` shows them, `crowdtrain nodes ban NODE_ID` bans one"
        )


# ---- nodes -------------------------------------------------------------------------------


@nodes_app.command("list")
def list_nodes(
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Every node that registered with the server, banned ones included.

    The token column is the enrollment token each one registered with.

    Example: crowdtrain nodes list --server https://train.example.org
    """
    nodes = _call(_connect(server, admin_token, ca_cert, pin_sha256), "GET", "/nodes")
    if as_json:
        _print_json(nodes)
    elif not nodes:
        _say("no node has registered yet: give one an enrollment token (tokens create --role node)")
    else:
        typer.echo(table_text(nodes_table(nodes)))


@nodes_app.command("ban")
def ban_node(
    node_id: str = typer.Argument(..., help="The node's id, from `nodes list`."),
    reason: str = typer.Option("", "--reason", help="Why: kept in the audit log, shown to it."),
    keep_token: bool = typer.Option(
        False,
        "--keep-token",
        help="Leave the enrollment token it registered with usable (by default it is revoked, "
        "so that the node cannot come back under a new name).",
    ),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Ban a node: the server refuses its requests from now on.

    Its WebSocket session is closed and it cannot renew its access token; by default the
    enrollment token it used is revoked too. There is no unban: to come back, it registers
    again with a new enrollment token.

    Example: crowdtrain nodes ban laptop-7 --reason "poisoned updates"
    """
    if not re.fullmatch(NODE_NAME_PATTERN, node_id):
        fail(f"{node_id!r} is not a node id: see `crowdtrain nodes list` for them")
    client = _connect(server, admin_token, ca_cert, pin_sha256)
    params = {"reason": reason, "revoke_token": str(not keep_token).lower()}
    node = _call(client, "DELETE", f"/nodes/{quote(node_id, safe='')}", params=params)
    if as_json:
        _print_json(node)
        return
    _say(f"node {node['node_id']} is banned: the server refuses its requests from now on")
    if node["token_id"] is not None:
        _say(
            f"its enrollment token {node['token_id']} still works (revoke it with "
            f"`crowdtrain tokens revoke {node['token_id']}`)"
            if keep_token
            else f"its enrollment token {node['token_id']} is revoked too"
        )


# ---- audit -------------------------------------------------------------------------------


def audit(
    limit: int = typer.Option(50, "--limit", "-n", min=1, max=1000, help="Events to show."),
    action: str | None = typer.Option(
        None,
        "--action",
        help="Only this action: token.create, token.revoke, node.register, node.revoke, "
        "register.refused, refresh.refused, auth.refused, ...",
    ),
    before: int | None = typer.Option(
        None, "--before", min=1, help="Only events older than this id (to page back)."
    ),
    server: str = SERVER,
    admin_token: str | None = ADMIN_TOKEN,
    ca_cert: Path | None = CA_CERT,
    pin_sha256: str | None = PIN_SHA256,
    as_json: bool = AS_JSON,
) -> None:
    """Show the server's audit log, newest first.

    It records admin actions (tokens made and revoked, bans), registrations, refused logins
    and refused submissions with their reason: who, when, and from which address.

    Examples:

      crowdtrain audit --limit 20

      crowdtrain audit --action node.revoke
    """
    params: dict[str, Any] = {"limit": limit}
    if action:
        params["action"] = action
    if before is not None:
        params["before"] = before
    answer = _call(
        _connect(server, admin_token, ca_cert, pin_sha256), "GET", "/audit", params=params
    )
    events = answer["events"]
    if as_json:
        _print_json(events)
    elif not events:
        _say("no audit events" + (f" with action {action!r}" if action else ""))
    else:
        typer.echo(table_text(audit_table(events)))
