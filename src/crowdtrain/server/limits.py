"""Abuse limits at the transport: body caps and read timeouts, header timeouts, connection cap.

- `RequestLimits`, an ASGI middleware, caps request bodies at `max_request_kb` (the routes that
  stream big bodies against caps of their own are left to them) and ends a body that pauses
  longer than `body_timeout_s`, or trickles under `min_body_rate`, with 408. A refused request's
  connection is closed.
- `guarded_protocol` builds uvicorn's HTTP protocol (httptools, else h11) with what uvicorn
  lacks: a deadline on request headers (slow-loris), and a JSON 503 past `max_connections`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Iterable
from typing import Any

import anyio
from starlette.responses import JSONResponse
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from crowdtrain.protocol.errors import WireError
from crowdtrain.settings import ServerSettings

log = logging.getLogger(__name__)
# the answer to a refused request ends its connection: the rest of its body is never read
CLOSE = {"Connection": "close"}


class RequestLimits:
    """Caps and times every HTTP request body; WebSocket and lifespan scopes pass untouched.

    The time a body takes is the time spent waiting for it, so that a route that is slow to
    read is not held against the client.
    """

    def __init__(
        self, app: ASGIApp, settings: ServerSettings, self_capped: Iterable[tuple[str, str]] = ()
    ):
        """`self_capped`: (method, path) of the routes that cap their own bodies; a path may
        hold {parameters}, as routes declare them."""
        self.app = app
        self.cap = int(settings.max_request_kb * 1024)
        self.cap_name = (
            f"{self.cap} bytes (max_request_kb = {settings.max_request_kb:g} on the server)"
        )
        self.body_timeout_s = settings.body_timeout_s
        self.min_body_rate = settings.min_body_rate
        self.self_capped = [(method, compile_path(path)[0]) for method, path in self_capped]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cap = None if self._caps_itself(scope) else self.cap
        declared = _content_length(scope)
        if cap is not None and declared is not None and declared > cap:
            detail = f"the request body of {declared} bytes is over the cap of {self.cap_name}"
            await _refuse(scope, receive, send, WireError(413, "too_large", detail))
            return
        body = _TimedBody(receive, cap, self)
        gate = _ResponseGate(send, body)
        try:
            await self.app(scope, body.receive, gate.send)
        except Exception:
            if body.refusal is None:
                raise
            # the app let the refusal raised by `receive` out (or failed on it): answered below
        if body.refusal is None:
            return
        if gate.started:  # too late for a status: leaving the response unfinished closes it
            log.warning("%s; the response had started", body.refusal.message)
            return
        await _refuse(scope, receive, send, body.refusal)

    def _caps_itself(self, scope: Scope) -> bool:
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return any(
            scope["method"] == method and regex.match(path) for method, regex in self.self_capped
        )


class _TimedBody:
    """One request's `receive`: counts the body against the cap and the clock. A refusal is
    raised into the app (which unwinds) and kept, for the middleware to answer."""

    def __init__(self, receive: Receive, cap: int | None, limits: RequestLimits):
        self._receive = receive
        self.cap = cap
        self.limits = limits
        self.size = 0
        self.waited_s = 0.0
        self.complete = False
        self.refusal: WireError | None = None

    async def receive(self) -> Message:
        if self.refusal is not None:
            raise self.refusal
        if self.complete:  # what follows is the wait for a disconnect: no limit to it
            return await self._receive()
        timeout_s = self._time_left()
        started = time.monotonic()
        try:
            with anyio.move_on_after(max(timeout_s, 0)) as deadline:
                message = await self._receive()
        finally:
            self.waited_s += time.monotonic() - started
        if deadline.cancelled_caught:
            self.refusal = WireError(408, "body_timeout", self._timeout_detail(timeout_s))
            raise self.refusal
        if message["type"] == "http.request":
            self.size += len(message.get("body", b""))
            self.complete = not message.get("more_body", False)
            if self.cap is not None and self.size > self.cap:
                detail = f"the request body is over the cap of {self.limits.cap_name}"
                self.refusal = WireError(413, "too_large", detail)
                raise self.refusal
        return message

    def _time_left(self) -> float:
        """Until the next chunk must arrive: a pause of at most body_timeout_s, and past that
        much waiting in all, an average of at least min_body_rate."""
        pause_s, rate = self.limits.body_timeout_s, self.limits.min_body_rate
        if rate <= 0:
            return pause_s
        return min(pause_s, max(pause_s, self.size / rate) - self.waited_s)

    def _timeout_detail(self, pause_s: float) -> str:
        # one message for both rules: at the end of the first pause they trip together
        limits = self.limits
        return (
            f"the request body came too slowly: {self.size} bytes in {self.waited_s:.1f} s, "
            f"none in the last {pause_s:.1f} s; a body may pause at most "
            f"{limits.body_timeout_s:g} s (body_timeout_s) and, once it has taken longer, must "
            f"average {limits.min_body_rate:g} bytes/s (min_body_rate)"
        )


class _ResponseGate:
    """The app's `send`, closed once its body was refused: the refusal is the answer."""

    def __init__(self, send: Send, body: _TimedBody):
        self._send = send
        self.body = body
        self.started = False

    async def send(self, message: Message) -> None:
        if self.body.refusal is not None:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self._send(message)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _refuse(scope: Scope, receive: Receive, send: Send, error: WireError) -> None:
    log.info("refused %s %s from %s: %s", scope["method"], scope["path"], _client(scope), error)
    response = JSONResponse(error.to_json(), status_code=error.status, headers=CLOSE)
    await response(scope, receive, send)


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return f"{client[0]}:{client[1]}" if client else "?"


# ---- uvicorn: header deadline and connection cap ----


def guarded_protocol(
    header_timeout_s: float, base: type[asyncio.Protocol] | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol `base` (default: httptools if installed, else h11) with a
    header deadline of `header_timeout_s`, and uvicorn's `limit_concurrency` answered in JSON.
    Give it to uvicorn.Config as `http=`."""
    base = base or _default_protocol()
    attributes = {"header_timeout_s": header_timeout_s}
    return type(f"Guarded{base.__name__}", (_ConnectionGuard, base), attributes)


def _default_protocol() -> type[asyncio.Protocol]:
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        return HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn[standard] brings httptools
        from uvicorn.protocols.http.h11_impl import H11Protocol

        return H11Protocol


class _ConnectionGuard(asyncio.Protocol):
    """Mixed into uvicorn's HttpToolsProtocol or H11Protocol (both keep `transport`, `cycle`,
    `connections`, `app`, `limit_concurrency`, ...): a connection's request headers must be
    complete within header_timeout_s of its opening, or of the first byte of a follow-up
    request; else it gets 408 (nothing if it sent nothing) and is closed."""

    header_timeout_s: float
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any
    connections: set[Any]
    server_state: Any
    app: Any
    limit_concurrency: int | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_begun = False
        # past the cap, answer in JSON with Retry-After rather than uvicorn's plain text
        self._max_connections, self.limit_concurrency = self.limit_concurrency, None
        self._app, self.app = self.app, self._admit
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        cycle = self.cycle
        if cycle is None or cycle.response_complete:  # bytes of the next request's headers
            self._request_begun = True
            self._arm_header_timer()
        super().data_received(data)
        headers_done = self.cycle is not cycle
        if headers_done or self.transport.get_protocol() is not self:  # or a WebSocket now
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._request_begun = False

    def _headers_late(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return
        if self._request_begun:  # no app has this request yet: the answer is written here
            self.transport.write(self._header_timeout_response())
        self.transport.close()

    def _header_timeout_response(self) -> bytes:
        detail = (
            f"the request headers did not arrive within {self.header_timeout_s:g} s "
            "(header_timeout_s on the server)"
        )
        body = json.dumps({"error": "header_timeout", "detail": detail}).encode()
        lines = [b"HTTP/1.1 408 Request Timeout"]
        lines += [name + b": " + value for name, value in self.server_state.default_headers]
        lines += [b"content-type: application/json", b"connection: close"]
        lines += [b"content-length: %d" % len(body), b"", body]
        return b"\r\n".join(lines)

    async def _admit(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The app, unless more than max_connections HTTP connections are open (this one
        among them): then 503, and this connection is closed to make room. WebSocket
        sessions are not counted here (max_sessions caps them)."""
        limit = self._max_connections
        open_now = sum(1 for c in self.connections if isinstance(c, type(self)))
        if limit is None or open_now <= limit:
            await self._app(scope, receive, send)
            return
        detail = (
            f"the server has {open_now} open connections, more than its max_connections "
            f"({limit}); retry in a moment"
        )
        headers = {**CLOSE, "Retry-After": "1"}
        body = {"error": "too_many_connections", "detail": detail}
        await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
