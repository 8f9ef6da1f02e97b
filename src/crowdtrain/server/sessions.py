"""The SessionHub: one WebSocket session per node, kept on the server's event loop.

A session starts with the node's `hello` and lives on its heartbeats; the hub pushes news to it
(new versions, round deadlines, density budgets, lease offers, shutdown) and closes it, after an
`error` message saying why, when the node breaks the protocol, goes silent for
`session_timeout_s`, is banned, or opens a newer session. A node marked gone keeps its leases
until they expire by their TTL: the hub never releases them (the node may still be training).

Other threads (the coordinator's apply thread, route worker threads) reach the hub only through
`call`, which hands the work to the event loop. Each session has an outbox drained by its own
writer task, so a slow node never holds up a broadcast.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.websockets import WebSocket

from crowdtrain.protocol.errors import WireError
from crowdtrain.protocol.session import (
    BAD_MESSAGE,
    HEARTBEAT_TIMEOUT,
    HELLO_TIMEOUT,
    MESSAGE_TOO_BIG,
    NODE_REVOKED,
    SESSION_PROTOCOL,
    SESSION_REPLACED,
    TOO_MANY_MESSAGES,
    TOO_MANY_SESSIONS,
    DensityBudget,
    Heartbeat,
    Hello,
    LeaseOffer,
    RoundDeadline,
    SessionError,
    Shutdown,
    VersionPublished,
    Welcome,
    parse_node_message,
)
from crowdtrain.server.nodes import MACHINE_FIGURES

if TYPE_CHECKING:
    from crowdtrain.server.runtime import ServerRuntime

log = logging.getLogger(__name__)

HELLO_TIMEOUT_S = 5.0  # the first message must be hello, this soon after the handshake
SEND_TIMEOUT_S = 10.0  # a node that takes no frame for this long is dropped
OUTBOX_SIZE = 64  # messages queued for one node; a node this far behind is closed
RESTART_RETRY_S = 5.0  # how long a shutdown notice tells nodes to wait before reconnecting
MESSAGE_WINDOW_S = 10.0
MAX_MESSAGES_PER_WINDOW = 50  # from one node: heartbeats come every heartbeat_s
STOP_WAIT_S = 3.0  # at shutdown, for the sessions' goodbyes to go out

# close codes (RFC 6455): policy violation, too big, service restart, try again later
POLICY, TOO_BIG, RESTART, TRY_LATER = 1008, 1009, 1012, 1013


@dataclass
class _Close:
    code: int


@dataclass(eq=False)
class Session:
    """One node's open session: what it said last, and its outbox."""

    node_id: str
    websocket: WebSocket
    opened_at: float = field(default_factory=time.monotonic)
    last_heard: float = field(default_factory=time.monotonic)
    status: str = "starting"
    closing: bool = False
    end_reason: str | None = None
    _outbox: asyncio.Queue = field(default_factory=lambda: asyncio.Queue(OUTBOX_SIZE + 2))
    _window: tuple[float, int] = (0.0, 0)  # start of the rate window, messages in it

    def push(self, message) -> None:
        """Queue a message for the node (from the event loop); a node that lets its outbox
        fill up is not reading, and is closed."""
        if self.closing:
            return
        if self._outbox.qsize() >= OUTBOX_SIZE:
            self.close(POLICY, None, "not reading its messages")
            return
        self._outbox.put_nowait(message)

    def close(self, code: int, last: SessionError | Shutdown | None, reason: str) -> None:
        """Send `last` (the error, or the shutdown notice), then close; whatever else is still
        queued is dropped."""
        if self.closing:
            return
        self.closing = True
        self.end_reason = self.end_reason or reason
        while not self._outbox.empty():
            self._outbox.get_nowait()
        if last is not None:
            self._outbox.put_nowait(last)
        self._outbox.put_nowait(_Close(code))

    def count_message(self, now: float) -> bool:
        """Count one received message; False when the node sends too many."""
        start, count = self._window
        if now - start > MESSAGE_WINDOW_S:
            start, count = now, 0
        self._window = (start, count + 1)
        return count + 1 <= MAX_MESSAGES_PER_WINDOW

    async def write_loop(self) -> None:
        """Send the outbox in order until a close went out (or sending failed)."""
        while True:
            item = await self._outbox.get()
            try:
                if isinstance(item, _Close):
                    await asyncio.wait_for(self.websocket.close(item.code), SEND_TIMEOUT_S)
                    return
                await asyncio.wait_for(self.websocket.send_text(item.to_json()), SEND_TIMEOUT_S)
            except Exception as error:  # gone, or too slow: the handler ends the session
                self.end_reason = self.end_reason or f"send failed ({type(error).__name__})"
                return


class SessionHub:
    """Every open session by node id (a newer session of a node replaces the older one)."""

    def __init__(self, runtime: ServerRuntime):
        self.runtime = runtime
        self.settings = runtime.settings
        self.sessions: dict[str, Session] = {}
        self._opening = 0  # accepted, hello not yet received
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._watchdog: asyncio.Task | None = None
        self._density: float | None = None  # the budget last announced
        self._deadline: float | None = None  # the round deadline last announced

    # ---- lifecycle (event loop) ----------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        rt = self.runtime
        self._density = rt.coordinator.density_advice()
        rt.coordinator.add_listener(lambda result: self.call(self.publish_version, result.version))
        rt.security.accounts.on_ban(lambda node_id: self.call(self.revoke, node_id))
        rt.leases.on_freed(lambda count: self.call(self.offer_leases, count))
        self._watchdog = asyncio.create_task(self._watch(), name="session-watchdog")

    async def stop(self, reason: str = "shutdown or restart by its operator") -> None:
        """Tell every node the server is stopping and close their sessions (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        notice = Shutdown(reason=reason, retry_after_s=RESTART_RETRY_S)
        for session in list(self.sessions.values()):
            session.close(RESTART, notice, "server stopping")
        deadline = time.monotonic() + STOP_WAIT_S
        while self.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    def call(self, function: Callable, *args) -> None:
        """Run `function(*args)` on the event loop; callable from any thread."""
        if self._stopped or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop closed: the server is stopping
            self._loop.call_soon_threadsafe(function, *args)

    # ---- pushes (event loop) -------------------------------------------------------------

    def broadcast(self, message, where: Callable[[Session], bool] = lambda s: True) -> int:
        sent = 0
        for session in list(self.sessions.values()):
            if where(session):
                session.push(message)
                sent += 1
        return sent

    def publish_version(self, version: int) -> None:
        self.broadcast(VersionPublished(version=version, lineage=self.runtime.coordinator.lineage))

    def offer_leases(self, count: int) -> None:
        """Shards were freed: tell the nodes waiting for one (they race for it over HTTP)."""
        self.broadcast(LeaseOffer(free=count), lambda s: s.status == "waiting_for_shard")

    def revoke(self, node_id: str) -> None:
        """The node was banned: say so and close its session at once."""
        session = self.sessions.get(node_id)
        if session is None:
            return
        detail = f"node {node_id} was banned by the server's admin; it cannot rejoin"
        session.close(POLICY, SessionError(code=NODE_REVOKED, detail=detail), "banned")
        self._drop(session)

    def _round_message(self) -> RoundDeadline | None:
        deadline = self.runtime.coordinator.round_deadline()
        if deadline is None:
            return None
        closes_in = max(0.0, deadline - time.monotonic())
        return RoundDeadline(version=self.runtime.coordinator.version + 1, closes_in_s=closes_in)

    def _check_changes(self) -> None:
        """Announce a new round deadline or a changed density budget (polled: both are read
        from the coordinator without taking its locks)."""
        coordinator = self.runtime.coordinator
        deadline = coordinator.round_deadline()
        if deadline is not None and deadline != self._deadline:
            message = self._round_message()
            if message is not None:
                self.broadcast(message)
        self._deadline = deadline
        density = coordinator.density_advice()
        if density != self._density:
            self._density = density
            self.broadcast(DensityBudget(max_density=density))

    async def _watch(self) -> None:
        """Close sessions gone silent; announce deadlines and density changes."""
        timeout = self.settings.session_timeout_s
        tick = min(0.5, timeout / 4)
        while True:
            await asyncio.sleep(tick)
            try:
                self._close_silent(timeout)
                self._check_changes()
            except Exception:  # a check that failed must not stop the watchdog
                log.exception("the session watchdog's checks failed")

    def _close_silent(self, timeout: float) -> None:
        now = time.monotonic()
        for session in list(self.sessions.values()):
            if not session.closing and now - session.last_heard > timeout:
                error = SessionError(
                    code=HEARTBEAT_TIMEOUT,
                    detail=f"no message for {timeout:g} s; the session is closed",
                )
                session.close(POLICY, error, HEARTBEAT_TIMEOUT)
                self._drop(session)

    def _drop(self, session: Session) -> None:
        """Forget a session (if it is still the node's current one) and mark the node gone."""
        if self.sessions.get(session.node_id) is session:
            del self.sessions[session.node_id]
            self.runtime.nodes.session_closed(session.node_id, session.end_reason or "closed")

    # ---- one session (its handler's task) ------------------------------------------------

    async def serve(self, websocket: WebSocket, node_id: str) -> None:
        """Run an authenticated node's session until it ends."""
        if self._stopped:
            await websocket.accept()
            notice = Shutdown(reason="shutdown in progress", retry_after_s=RESTART_RETRY_S)
            await _refuse(websocket, RESTART, notice)
            return
        if len(self.sessions) + self._opening >= self.settings.max_sessions and (
            node_id not in self.sessions
        ):
            await websocket.accept()
            error = SessionError(
                code=TOO_MANY_SESSIONS,
                detail=f"the server holds {self.settings.max_sessions} sessions, its maximum; "
                "keep training over HTTP and try again later",
            )
            await _refuse(websocket, TRY_LATER, error)
            return
        self._opening += 1
        try:
            await websocket.accept()
            hello = await _receive_hello(websocket)
        finally:
            self._opening -= 1
        if hello is None:
            return
        if self._stopped:  # it stopped while the node was saying hello
            notice = Shutdown(reason="shutdown in progress", retry_after_s=RESTART_RETRY_S)
            await _refuse(websocket, RESTART, notice)
            return
        session = self._open(websocket, node_id, hello)
        writer = asyncio.create_task(session.write_loop())
        reader = asyncio.create_task(self._read_loop(session))
        try:
            done, _ = await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
            if writer not in done and session.closing:  # let the error and the close go out
                await asyncio.wait({writer}, timeout=SEND_TIMEOUT_S)
        finally:
            reader.cancel()
            writer.cancel()
            self._drop(session)

    def _open(self, websocket: WebSocket, node_id: str, hello: Hello) -> Session:
        session = Session(node_id, websocket)
        old = self.sessions.get(node_id)
        self.sessions[node_id] = session
        if old is not None:
            error = SessionError(
                code=SESSION_REPLACED, detail="a newer session of this node took over"
            )
            old.close(POLICY, error, "replaced")
        rt = self.runtime
        capabilities = hello.model_dump(exclude={"type", "upload_bytes_per_s", "rtt_s"})
        link = {"upload_bytes_per_s": hello.upload_bytes_per_s, "rtt_s": hello.rtt_s}
        rt.nodes.session_opened(node_id, capabilities, link)
        session.push(
            Welcome(
                node_id=node_id,
                heartbeat_s=self.settings.heartbeat_s,
                session_timeout_s=self.settings.session_timeout_s,
                version=rt.coordinator.version,
                lineage=rt.coordinator.lineage,
            )
        )
        session.push(DensityBudget(max_density=self._density or rt.coordinator.density_advice()))
        round_message = self._round_message()
        if round_message is not None:
            session.push(round_message)
        account = rt.security.accounts.node(node_id)
        if account is None or account.revoked:  # banned between the handshake and now
            self.revoke(node_id)
        log.info("node %s opened a session (%s, %s)", node_id, hello.device, hello.device_name)
        return session

    async def _read_loop(self, session: Session) -> None:
        """Take heartbeats until the node leaves or breaks the protocol."""
        while True:
            try:
                message = await session.websocket.receive()
            except Exception:  # the connection broke under us
                message = {"type": "websocket.disconnect"}
            if message["type"] == "websocket.disconnect":
                session.end_reason = session.end_reason or "disconnected"
                return
            now = time.monotonic()
            session.last_heard = now
            if not session.count_message(now):
                error = SessionError(
                    code=TOO_MANY_MESSAGES,
                    detail=f"more than {MAX_MESSAGES_PER_WINDOW} messages in "
                    f"{MESSAGE_WINDOW_S:g} s",
                )
                session.close(POLICY, error, TOO_MANY_MESSAGES)
                return
            try:
                parsed = _parse_frame(message)
                if not isinstance(parsed, Heartbeat):
                    raise WireError(422, BAD_MESSAGE, "hello comes once, at the start")
            except WireError as error:
                code = TOO_BIG if error.code == MESSAGE_TOO_BIG else POLICY
                session.close(code, SessionError(code=error.code, detail=error.message), error.code)
                return
            session.status = parsed.status
            self.runtime.nodes.heartbeat(
                session.node_id,
                {
                    "status": parsed.status,
                    "held_version": parsed.version,
                    "tokens_per_s": parsed.tokens_per_s,
                    "rss_bytes": parsed.rss_bytes,
                    "gpu_memory_bytes": parsed.gpu_memory_bytes,
                    **{key: getattr(parsed, key) for key in MACHINE_FIGURES},
                },
            )


def _parse_frame(message: Mapping[str, Any]) -> Hello | Heartbeat:
    text = message.get("text")
    if text is None:
        raise WireError(422, BAD_MESSAGE, "session messages are JSON in text frames, not binary")
    return parse_node_message(text)


async def _receive_hello(websocket: WebSocket) -> Hello | None:
    """The node's hello, or None after the session was refused (late, malformed, not hello)."""
    try:
        message = await asyncio.wait_for(websocket.receive(), HELLO_TIMEOUT_S)
    except asyncio.TimeoutError:
        detail = f"the first message must be hello, within {HELLO_TIMEOUT_S:g} s"
        await _refuse(websocket, POLICY, SessionError(code=HELLO_TIMEOUT, detail=detail))
        return None
    if message["type"] == "websocket.disconnect":
        return None
    try:
        hello = _parse_frame(message)
        if not isinstance(hello, Hello):
            raise WireError(422, BAD_MESSAGE, "the first message must be hello")
        if hello.protocol != SESSION_PROTOCOL:
            raise WireError(
                422,
                BAD_MESSAGE,
                f"this server speaks session protocol {SESSION_PROTOCOL}, not "
                f"{hello.protocol}; upgrade crowdtrain on the node or the server",
            )
    except WireError as error:
        code = TOO_BIG if error.code == MESSAGE_TOO_BIG else POLICY
        await _refuse(websocket, code, SessionError(code=error.code, detail=error.message))
        return None
    return hello


async def _refuse(websocket: WebSocket, code: int, message) -> None:
    """Send one message, then close (a peer already gone is no error)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(websocket.send_text(message.to_json()), SEND_TIMEOUT_S)
        await asyncio.wait_for(websocket.close(code), SEND_TIMEOUT_S)
