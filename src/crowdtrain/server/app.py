"""create_app(settings): the FastAPI application; run_server: serve it with uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from crowdtrain import __version__
from crowdtrain.protocol.errors import WireError
from crowdtrain.server.routes import accounts, data, health, history, model, updates
from crowdtrain.server.runtime import ServerRuntime
from crowdtrain.server.schemas import ErrorPublic
from crowdtrain.settings import ServerSettings

log = logging.getLogger(__name__)
API_PREFIX = "/api/v1"
# what any route may answer besides its own responses (docs/security.md)
AUTH_ERRORS = {
    status: {"model": ErrorPublic, "description": description}
    for status, description in (
        (401, "no token, or one that is malformed, expired or unknown"),
        (403, "the token's role may not use this route, or it was revoked"),
        (413, "the request body is over the route's cap"),
        (422, "a parameter or the body is not valid"),
        (429, "too many requests: wait Retry-After seconds"),
    )
}


class VersionWatch:
    """Lets async handlers wait for a new version without holding a worker thread."""

    def __init__(self, loop: asyncio.AbstractEventLoop, current: int):
        self._loop = loop
        self._event = asyncio.Event()
        self.version = current

    def publish(self, version: int) -> None:  # called from the coordinator's thread
        self._loop.call_soon_threadsafe(self._fire, version)

    def _fire(self, version: int) -> None:
        self.version = version
        self._event.set()
        self._event = asyncio.Event()

    async def wait_past(self, version: int, timeout: float) -> None:
        deadline = self._loop.time() + timeout
        while self.version <= version:
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
        rt.start()
        try:
            yield
        finally:
            await asyncio.to_thread(rt.stop)

    app = FastAPI(
        title="crowdtrain",
        version=__version__,
        summary="Coordinator of a collaborative language-model training run.",
        lifespan=lifespan,
    )
    app.state.runtime = runtime or ServerRuntime(settings)

    @app.exception_handler(WireError)
    async def wire_error(request: Request, exc: WireError) -> JSONResponse:
        headers = {}
        if exc.status in (429, 503):
            headers["Retry-After"] = str(max(1, round(exc.extra.get("retry_after_s", 1))))
        if exc.status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)

    routers = (health, model, updates, history, data, accounts)
    for module in routers:
        app.include_router(module.router, prefix=API_PREFIX, responses=AUTH_ERRORS)
    return app


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def run_server(settings: ServerSettings, on_ready=None) -> None:
    """Serve until SIGINT/SIGTERM; the shutdown writes a final checkpoint."""
    runtime = ServerRuntime(settings)
    app = create_app(settings, runtime)
    sock = bind_socket(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    if on_ready is not None:
        on_ready(runtime, f"http://{host if ':' not in host else f'[{host}]'}:{port}")
    config = uvicorn.Config(
        app, log_level="warning", timeout_keep_alive=30, timeout_graceful_shutdown=10
    )
    uvicorn.Server(config).run(sockets=[sock])
