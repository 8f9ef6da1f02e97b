"""create_app(settings): the FastAPI application; run_server: serve it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from crowdtrain import __version__
from crowdtrain.protocol.errors import WireError, invalid_request
from crowdtrain.protocol.session import MAX_MESSAGE_BYTES
from crowdtrain.server.limits import RequestLimits, guarded_protocol
from crowdtrain.server.monitoring import RequestTimer, ServerMetrics
from crowdtrain.server.routes import (
    accounts,
    data,
    health,
    history,
    model,
    models,
    session,
    updates,
)
from crowdtrain.server.routes import monitoring as metrics_route
from crowdtrain.server.runtime import ServerRuntime
from crowdtrain.server.schemas import ErrorPublic
from crowdtrain.server.sessions import SessionHub
from crowdtrain.server.tls import uvicorn_tls_options
from crowdtrain.settings import ServerSettings
from crowdtrain.web import mount_ui

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"
# what any route may answer besides its own responses (docs/security.md)
COMMON_ERRORS = {
    status: {"model": ErrorPublic, "description": description}
    for status, description in (
        (400, "the request could not be read (a body that is not UTF-8 JSON, ...)"),
        (401, "no token, or one that is malformed, expired or unknown"),
        (403, "the token's role may not use this route, or it was revoked"),
        (408, "the request body paused too long or came too slowly"),
        (413, "the request body is over the route's cap"),
        (422, "a parameter or the body is not valid"),
        (429, "too many requests: wait Retry-After seconds"),
        (503, "too many connections, or the server cannot take this now: retry later"),
    )
}

HTTP_CODES = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


class VersionWatch:
    """Lets async handlers wait for a new version without holding a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, current: int):
        self._loop = loop
        self._event = asyncio.Event()
        self.version = current
        self.closed = False  # the server is stopping: waits end at once

    def publish(self, version: int) -> None:  # called from the coordinator's thread
        self._loop.call_soon_threadsafe(self._fire, version)

    def _fire(self, version: int) -> None:
        self.version = version
        self._event.set()
        self._event = asyncio.Event()

    def close(self) -> None:
        """End every wait now (long polls answer at once), so that a stop is not held up."""
        self.closed = True
        self._event.set()

    async def wait_past(self, version: int, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while self.version <= version and not self.closed:
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._event.wait(), remaining)


def create_app(settings: ServerSettings, runtime: ServerRuntime | None = None) -> FastAPI:
    """The application. The runtime (model, coordinator, ...) starts and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        rt = app.state.runtime
        watch = VersionWatch(asyncio.get_running_loop(), rt.coordinator.version)
        app.state.version_watch = watch
        rt.coordinator.add_listener(lambda result: watch.publish(result.version))
        sessions = app.state.sessions = SessionHub(rt)
        await sessions.start()
        rt.start()
        try:
            yield
        finally:
            await sessions.stop()  # under uvicorn, _Server.shutdown already did
            await asyncio.to_thread(rt.stop)

    app = FastAPI(
        title="crowdtrain",
        version=__version__,
        summary="Coordinator of a collaborative language-model training run.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime or ServerRuntime(settings)
    app.state.metrics = ServerMetrics(app.state.runtime)  # a registry per app (never global)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError) -> JSONResponse:
        headers = {}
        if exc.status in (429, 503):
            headers["Retry-After"] = str(max(1, round(exc.extra.get("retry_after_s", 1))))
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (an unknown path, a body it cannot parse) in the shape of
        every other error."""
        code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        """A bad parameter or body, in the same shape as every other error."""
        return JSONResponse(invalid_request(exc.errors()).to_json(), status_code=422)

    routers = (health, model, updates, history, data, accounts, session, models)
    for module in routers:
        app.include_router(module.router, prefix=API_PREFIX, responses=COMMON_ERRORS)
    app.include_router(metrics_route.router, responses=COMMON_ERRORS)  # /metrics, at the root
    # updates and data uploads stream their bodies against caps of their own
    self_capped = [("POST", "/updates"), ("PUT", "/datasets/{name}/{split}/files/{filename}")]
    self_capped.append(("POST", "/models/import"))  # capped by max_upload_mb
    self_capped = [(method, API_PREFIX + path) for method, path in self_capped]
    mount_ui(app)  # the web UI at /ui/ (docs/ui.md)
    app.add_middleware(RequestLimits, settings=settings, self_capped=self_capped)
    app.add_middleware(RequestTimer, metrics=app.state.metrics)  # outermost: times all of it
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_server(settings: ServerSettings, on_ready=None, on_admin_token=None) -> None:
    """Serve until SIGINT/SIGTERM; the shutdown writes a final checkpoint. `on_admin_token`
    gets an admin token made at this first start, before anything else can fail."""
    tls = uvicorn_tls_options(settings)  # first: a bad certificate fails before the set-up
    runtime = ServerRuntime(settings, on_admin_token)
    app = create_app(settings, runtime)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        scheme = "https" if tls else "http"
        on_ready(runtime, f"{scheme}://{host if ':' not in host else f'[{host}]'}:{port}")
    config = uvicorn.Config(
        app,
        log_level="warning",
        timeout_keep_alive=30,
        timeout_graceful_shutdown=10,
        http=guarded_protocol(settings.header_timeout_s),
        limit_concurrency=settings.max_connections,
        proxy_headers=True,  # client address and scheme from trusted proxies only
        forwarded_allow_ips=settings.trusted_proxies,
        root_path=settings.root_path,
        # node session messages (protocol/session.py): the app answers one over its cap with
        # an `error`; only a frame twice that size is cut off by uvicorn (1009) unread
        ws_max_size=2 * MAX_MESSAGE_BYTES,
        **tls,
    )
    _Server(config).run(sockets=[sock])


class _Server(uvicorn.Server):
    """Stops what uvicorn's shutdown would wait on or cut short: it closes WebSockets (1012)
    and waits for open requests before the app's lifespan ends, so node sessions get their
    shutdown notice, and long polls their answer, here first."""

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()  # no new connections meanwhile (uvicorn's own close repeats this)
        app: FastAPI = self.config.app  # type: ignore[assignment]  # run_server passes ours
        state = app.state
        if getattr(state, "sessions", None) is not None:
            await state.sessions.stop()
        if getattr(state, "version_watch", None) is not None:
            state.version_watch.close()
        await super().shutdown(sockets)
