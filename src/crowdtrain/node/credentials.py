"""A node's identity on a server: registered once with an enrollment token, kept in the node's
config directory (owner-only), and turned into short-lived access tokens as needed.

One file per (server, node name): `CONFIG_DIR/servers/HOST_PORT/NAME.json` holding the node id
and its refresh token. While a node runs it holds a lock on that identity, so two processes on
one machine cannot share (and trip over) one sequence of submissions.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from crowdtrain.files import write_atomic
from crowdtrain.node.tls import certificate_error
from crowdtrain.node.waiting import backoff_s, sleep_unless_stopped

log = logging.getLogger(__name__)

API = "/api/v1"
RENEW_BEFORE_S = 60.0
MAX_BACKOFF_S = 30.0  # renew an access token this long before it expires

try:  # POSIX: an identity is used by one process at a time
    import fcntl
except ImportError:  # pragma: no cover - Windows: no lock
    fcntl = None


class LoginError(RuntimeError):
    """The node cannot get an identity on the server; the message says what to do."""


def default_config_dir() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "crowdtrain"


def server_key(url: str) -> str:
    """A folder name for a server URL: scheme, host and port (and path prefix)."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    text = f"{parts.scheme}_{parts.hostname}_{port}{parts.path.rstrip('/')}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", text)


class NodeLogin:
    """Registers (first time), renews access tokens, and hands out sequence numbers."""

    def __init__(
        self,
        config_dir: Path,
        server: str,
        name: str,
        enrollment_token: str | None = None,
        should_stop=lambda: False,
    ):
        self.should_stop = should_stop
        self.server = server
        self.name = name
        self.enrollment_token = enrollment_token
        folder = Path(config_dir) / "servers" / server_key(server)
        folder.mkdir(parents=True, exist_ok=True)
        for directory in (Path(config_dir), folder.parent, folder):
            directory.chmod(0o700)
        self.path = folder / f"{name}.json"
        self._lock_file = None
        self._lock = threading.Lock()
        self.node_id: str | None = None
        self._refresh_token: str | None = None
        self._access: str | None = None
        self._expires_at = 0.0
        self._seq = 0
        self.heartbeat_s = 2.0

    # ---- the identity file -----------------------------------------------------------

    def hold(self) -> None:
        """Take the identity's lock, or fail when another process on this machine uses it."""
        if fcntl is None:
            return
        handle = open(self.path.with_suffix(".lock"), "a")  # noqa: SIM115 - held while running
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise LoginError(
                f"another node on this machine is already running as {self.name!r} for "
                f"{self.server}; give this one its own --name"
            ) from None
        self._lock_file = handle

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _load(self) -> bool:
        try:
            saved = json.loads(self.path.read_text())
            self.node_id, self._refresh_token = saved["node_id"], saved["refresh_token"]
        except FileNotFoundError:
            return False
        except (ValueError, KeyError, TypeError):
            raise LoginError(
                f"the identity file {self.path} is damaged; delete it and register again with "
                "an enrollment token (--token)"
            ) from None
        return True

    def _save(self) -> None:
        payload = {
            "server": self.server,
            "name": self.name,
            "node_id": self.node_id,
            "refresh_token": self._refresh_token,
            "registered_at": time.time(),
        }
        write_atomic(self.path, json.dumps(payload, indent=2), mode=0o600)

    # ---- talking to the server -------------------------------------------------------

    def login(self, http: httpx.Client) -> None:
        """Have a valid access token: load the identity (or register), then renew."""
        with self._lock:
            if not self._load():
                self._register(http)
                return
            try:
                self._refresh(http)
            except LoginError as error:
                if getattr(error, "status", None) != 401 or not self.enrollment_token:
                    raise
                # the server does not know this identity (a new data directory): register anew
                log.warning("the server no longer knows node %s; registering again", self.node_id)
                self._register(http)

    def bearer(self, http: httpx.Client) -> str:
        """The access token to send, renewed when it is about to expire."""
        with self._lock:
            if self._access is None or time.time() > self._expires_at - RENEW_BEFORE_S:
                self._refresh(http)
            return self._access

    def renew(self, http: httpx.Client) -> None:
        """Renew now (the server said the token expired)."""
        with self._lock:
            self._refresh(http)

    def next_seq(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def skip_to(self, last_seq: int) -> None:
        """Continue above `last_seq` (the server refused a replay: its count is ahead)."""
        with self._lock:
            self._seq = max(self._seq, last_seq)

    def _register(self, http: httpx.Client) -> None:
        if not self.enrollment_token:
            raise LoginError(
                f"this node has no identity on {self.server} yet: give it the enrollment "
                "token the server's admin made (--token ct_enroll_..., or the environment "
                "variable CROWDTRAIN_NODE_TOKEN)"
            )
        body = {"enrollment_token": self.enrollment_token, "name": self.name}
        answer = self._post(http, "/nodes/register", body, "registering")
        self.node_id, self._refresh_token = answer["node_id"], answer["refresh_token"]
        self._save()
        self._take(answer)
        log.info("registered on %s as node %s", self.server, self.node_id)

    def _refresh(self, http: httpx.Client) -> None:
        body = {"node_id": self.node_id, "refresh_token": self._refresh_token}
        self._take(self._post(http, "/nodes/refresh", body, "logging in"))

    def _take(self, answer: dict) -> None:
        self._access = answer["access_token"]
        self._expires_at = float(answer["expires_at"])
        self._seq = max(self._seq, int(answer["last_seq"]))
        self.heartbeat_s = float(answer.get("heartbeat_s", self.heartbeat_s))

    def _post(self, http: httpx.Client, path: str, body: dict, doing: str) -> dict:
        """POST to the accounts API, retrying while the server is unreachable or busy."""
        attempt = 0
        while True:
            try:
                response = http.post(API + path, json=body, timeout=30.0)
            except httpx.TransportError as error:
                refusal = certificate_error(error, self.server)
                if refusal is not None:  # retrying cannot fix a certificate
                    raise refusal from None
                response = None
            if response is not None and response.status_code < 500 and response.status_code != 429:
                break
            log.warning("%s on %s: the server is unreachable or busy; retrying", doing, self.server)
            sleep_unless_stopped(backoff_s(attempt, MAX_BACKOFF_S), self.should_stop)
            attempt += 1
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text[:300]
            error = LoginError(f"{doing} on {self.server} was refused: {detail}")
            error.status = response.status_code
            raise error
        return response.json()
