"""The node's WebSocket session: hello, heartbeats, and the server's pushes, on one thread.

The session only speeds things up: a pushed version is fetched at once, a freed shard is asked
for at once, a lowered density budget is obeyed by the next update. Everything it carries is
also reachable over HTTP, so when the socket drops the node keeps training (the Follower goes
back to long-polling) while this thread reconnects with jittered exponential backoff; after a
server's shutdown notice it waits the `retry_after_s` the server asked for. A ban ends the node.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import random
import re
import ssl
import threading
import time
from collections import deque
from typing import TYPE_CHECKING

import torch
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from crowdtrain import __version__
from crowdtrain.node.waiting import Stopped, backoff_s
from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.session import (
    MAX_MESSAGE_BYTES,
    NODE_REVOKED,
    SESSION_REPLACED,
    DensityBudget,
    Heartbeat,
    Hello,
    LeaseOffer,
    RoundDeadline,
    SessionError,
    Shutdown,
    Status,
    VersionPublished,
    Welcome,
    parse_server_message,
)
from crowdtrain.resources import NodeResources

if TYPE_CHECKING:
    from crowdtrain.node.client import CoordinatorClient
    from crowdtrain.node.runner import Node

log = logging.getLogger(__name__)

PATH = "/api/v1/nodes/session"
TICK_S = 0.25  # how often the thread looks at the node's status between messages
MIN_BEAT_GAP_S = 0.5  # a status change is reported at once, but not more often than this
WELCOME_TIMEOUT_S = 10.0
PING_S = 10.0  # websockets' keepalive: a server that stops answering is noticed this soon
LASTING_SESSIONS_BEATS = 3  # a session that lasted this many heartbeats resets the backoff
RATE_WINDOW_S = 10.0  # tokens/s in a heartbeat counts over at least this long (updates are few)


def session_url(base_url: str) -> str:
    """ws(s)://HOST/api/v1/nodes/session for the server at http(s)://HOST."""
    return re.sub(r"^http", "ws", base_url.rstrip("/"), count=1) + PATH


class SessionBridge:
    """What a session reads from its node and does to it; this base does nothing (tests)."""

    def hello(self) -> Hello:
        return Hello(software_version=__version__, device="cpu")

    def status(self) -> Status:
        return "training"

    def heartbeat(self, status: Status) -> Heartbeat:
        return Heartbeat(status=status)

    def on_link(self, up: bool) -> None:
        """The session came up or went down."""

    def on_version(self, version: int, lineage: str) -> None:
        """The server is at `version` (published just now, or said at welcome)."""

    def on_density(self, max_density: float) -> None:
        """The densest update the server takes now."""

    def on_lease_offer(self) -> None:
        """A shard went back to the server's pool."""

    def on_revoked(self, detail: str) -> None:
        """The node was banned: stop it."""


class NodeSession:
    """The session thread of one node. `up` is true while a session is open."""

    def __init__(self, client: CoordinatorClient, bridge: SessionBridge, max_backoff_s: float):
        self.client = client
        self.bridge = bridge
        self.max_backoff_s = max_backoff_s
        self.url = session_url(client.base_url)
        self.heartbeat_s = 2.0  # until the welcome says
        self.round: tuple[int, float] | None = None  # (version, monotonic deadline) of a round
        self.sessions = 0  # welcomed sessions so far
        self._up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="session", daemon=True)

    @property
    def up(self) -> bool:
        return self._up.is_set()

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ask the thread to close the session and end (it notices within TICK_S)."""
        self._stop.set()

    def join(self, timeout: float = 10.0) -> None:
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _set_up(self, up: bool) -> None:
        if up != self.up:
            (self._up.set if up else self._up.clear)()
            self.bridge.on_link(up)

    # ---- connecting again and again --------------------------------------------------------

    def _run(self) -> None:
        failures = 0  # attempts in a row that did not reach a lasting session
        while not self._stop.is_set():
            welcomed_before = self.sessions
            started = time.monotonic()
            retry_after: float | None = None
            try:
                retry_after = self._connect_once()
            except Stopped:  # the node is stopping (it was renewing its login)
                return
            except Exception as error:  # unreachable, refused, dropped: HTTP carries on
                self._log_loss(error, failures)
            finally:
                self._set_up(False)
            if self._stop.is_set():
                return
            # a session that ends soon after its welcome (closed for too many messages, a
            # heartbeat the server found late, ...) counts as a failure: no tight reconnect loop
            lasted = time.monotonic() - started >= LASTING_SESSIONS_BEATS * self.heartbeat_s
            failures = 0 if self.sessions > welcomed_before and lasted else failures + 1
            if retry_after is None:
                retry_after = backoff_s(failures, self.max_backoff_s)
            self._stop.wait(retry_after)

    def _log_loss(self, error: Exception, failures: int) -> None:
        what = f"{type(error).__name__}: {error}".rstrip(": ")
        if failures == 0:
            log.warning(
                "WebSocket session with %s lost or refused (%s); training goes on over "
                "HTTP and the session reconnects",
                self.url,
                what,
            )
        else:
            log.debug("WebSocket session attempt %d failed: %s", failures + 1, what)

    def _connect_once(self) -> float | None:
        """One session, from handshake to end; how long to wait before the next (None: the
        usual backoff)."""
        context = None  # wss:// without a context of the node's own: the system's CAs
        if self.url.startswith("wss:") and isinstance(self.client.verify, ssl.SSLContext):
            context = self.client.verify
        try:
            websocket = connect(
                self.url,
                additional_headers=self.client.auth_headers(),
                user_agent_header=f"crowdtrain-node/{__version__}",
                open_timeout=WELCOME_TIMEOUT_S,
                close_timeout=2.0,
                ping_interval=PING_S,
                ping_timeout=PING_S,
                max_size=MAX_MESSAGE_BYTES,
                ssl=context,
            )
        except InvalidStatus as refused:
            return self._refused(refused.response.status_code, bytes(refused.response.body or b""))
        with websocket:
            return self._serve(websocket)

    def _refused(self, status: int, body: bytes) -> float | None:
        """The handshake got an HTTP answer instead of a session."""
        try:
            answer = json.loads(body)
            code, detail = answer.get("error", ""), answer.get("detail", "")
        except (ValueError, AttributeError):
            code, detail = "", body[:200].decode("utf-8", "replace")
        if code == NODE_REVOKED:
            self._revoked(detail)
            return 0.0
        if status == 401:  # the access token expired: the next attempt takes a new one
            self.client.renew_login()
        raise ConnectionError(f"the server refused the session: HTTP {status} {code} {detail}")

    # ---- one session -----------------------------------------------------------------------

    def _serve(self, websocket: ClientConnection) -> float | None:
        websocket.send(self.bridge.hello().to_json())
        welcome = self._parse(websocket.recv(timeout=WELCOME_TIMEOUT_S))
        if isinstance(welcome, SessionError):
            return self._on_error(welcome)
        if not isinstance(welcome, Welcome):
            raise ConnectionError(f"the server answered hello with {type(welcome).__name__}")
        self.heartbeat_s = welcome.heartbeat_s
        self.sessions += 1
        self._set_up(True)
        log.info("WebSocket session open (node %s, version %d)", welcome.node_id, welcome.version)
        self.bridge.on_version(welcome.version, welcome.lineage)
        next_beat, last_beat, last_status = 0.0, 0.0, None
        while not self._stop.is_set():
            now = time.monotonic()
            status = self.bridge.status()
            changed = status != last_status and now - last_beat >= MIN_BEAT_GAP_S
            if now >= next_beat or changed:
                websocket.send(self.bridge.heartbeat(status).to_json())
                last_beat, next_beat, last_status = now, now + self.heartbeat_s, status
            try:
                text = websocket.recv(timeout=TICK_S)
            except TimeoutError:
                continue
            message = self._parse(text)
            if isinstance(message, (Shutdown, SessionError)):
                return self._on_end(message)
            self._dispatch(message)
        return None

    def _parse(self, text: str | bytes):
        try:
            return parse_server_message(text)
        except WireError as error:  # a newer server's message, perhaps: skip it
            log.warning("ignoring a session message: %s", error.message)
            return None

    def _dispatch(self, message) -> None:
        if isinstance(message, VersionPublished):
            self.bridge.on_version(message.version, message.lineage)
        elif isinstance(message, DensityBudget):
            self.bridge.on_density(message.max_density)
        elif isinstance(message, LeaseOffer):
            self.bridge.on_lease_offer()
        elif isinstance(message, RoundDeadline):
            self.round = (message.version, time.monotonic() + message.closes_in_s)
            log.debug("round to version %d closes in %.1f s", message.version, message.closes_in_s)

    def _on_end(self, message: Shutdown | SessionError) -> float | None:
        if isinstance(message, SessionError):
            return self._on_error(message)
        wait = message.retry_after_s * random.uniform(1.0, 1.5)
        log.warning(
            "the server is stopping (%s); training goes on over HTTP, the session reconnects "
            "in about %.0f s",
            message.reason,
            wait,
        )
        return wait

    def _on_error(self, error: SessionError) -> float | None:
        if error.code == NODE_REVOKED:
            self._revoked(error.detail)
            return 0.0
        log.warning("the server closed the session: %s (%s)", error.detail, error.code)
        if error.code == SESSION_REPLACED:  # another process runs as this node: do not fight
            return self.max_backoff_s
        return None

    def _revoked(self, detail: str) -> None:
        self._stop.set()
        self.bridge.on_revoked(detail or "this node was banned by the server's admin")


class NodeBridge(SessionBridge):
    """A running Node's side of its session."""

    def __init__(self, node: Node):
        self.node = node
        # (time, accepted tokens) at recent heartbeats: tokens/s counts from the oldest
        self._marks: deque[tuple[float, int]] = deque([(time.monotonic(), node.stats.tokens)])
        self._resources = NodeResources(node.device)

    def hello(self) -> Hello:
        node = self.node
        link = node.density.report()
        location = getattr(node.settings, "location", None)
        return Hello(
            software_version=__version__,
            torch_version=torch.__version__[:64],
            device=str(node.device),
            device_name=device_name(node.device),
            memory_bytes=device_memory_bytes(node.device),
            cpu_count=os.cpu_count(),
            upload_bytes_per_s=link.upload_bytes_per_s,
            rtt_s=link.rtt_s,
            location=location,
        )

    def status(self) -> Status:
        node = self.node
        if node.stop_event.is_set() or node.revoked is not None:
            return "stopping"
        if node.follower is None:
            return "starting"
        if node.feed is not None and node.feed.waiting:
            return "waiting_for_shard"
        return "training"

    def heartbeat(self, status: Status) -> Heartbeat:
        node = self.node
        now, tokens = time.monotonic(), node.stats.tokens
        self._marks.append((now, tokens))
        while len(self._marks) > 2 and now - self._marks[1][0] >= RATE_WINDOW_S:
            self._marks.popleft()
        then, before = self._marks[0]
        gpu = None
        if node.device.type == "cuda":
            gpu = torch.cuda.memory_allocated(node.device)
        return Heartbeat(
            status=status,
            version=node.version,
            tokens_per_s=(tokens - before) / (now - then) if now > then else None,
            rss_bytes=process_rss_bytes(),
            gpu_memory_bytes=gpu,
            **self._resources.figures(),
        )

    def on_link(self, up: bool) -> None:
        if self.node.follower is not None:
            self.node.follower.wake()

    def on_version(self, version: int, lineage: str) -> None:
        if self.node.follower is not None:
            self.node.follower.announce(version, lineage)

    def on_density(self, max_density: float) -> None:
        self.node.density.set_server_cap(max_density)

    def on_lease_offer(self) -> None:
        if self.node.feed is not None:
            self.node.feed.offer()

    def on_revoked(self, detail: str) -> None:
        self.node.revoke(f"the server ended this node's session: {detail}")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = platform.processor() or platform.machine()
    return re.sub(r"[\x00-\x1f\x7f]", "", name)[:128]


def device_memory_bytes(device: torch.device) -> int | None:
    """The GPU's memory, or the machine's for a CPU (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def process_rss_bytes() -> int | None:
    """This process's resident memory (Linux; None elsewhere): one small file read."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
