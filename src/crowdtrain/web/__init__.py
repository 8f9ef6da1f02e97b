"""The web UI: a static single-page app (HTML, CSS, vanilla JS modules) mounted at /ui on the
server's FastAPI app; it reads and writes through the public JSON API only (docs/ui.md)."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_DIR = Path(__file__).parent / "static"
UI_PATH = "/ui"
# vendored libraries change only with a crowdtrain release; the app's own files are revalidated
# on every load (ETag), so a server upgrade never leaves a browser on stale code
VENDOR_CACHE = "public, max-age=86400"
APP_CACHE = "no-cache"


class UiFiles(StaticFiles):
    """StaticFiles with the UI's caching headers and a type for ES modules everywhere."""

    def file_response(self, full_path, stat_result, scope: Scope, status_code: int = 200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        relative = Path(full_path).relative_to(STATIC_DIR).as_posix()
        response.headers["Cache-Control"] = (
            VENDOR_CACHE if relative.startswith("vendor/") else APP_CACHE
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        if relative.endswith((".js", ".mjs")):
            # some systems' mimetypes tables lack .js or map it to text/plain; modules need this
            response.headers["Content-Type"] = "text/javascript; charset=utf-8"
        return response


def _to_ui(request: Request) -> Response:
    """/ -> the UI, under whatever path prefix (root_path) a reverse proxy serves us at."""
    return RedirectResponse(request.scope.get("root_path", "") + UI_PATH + "/", status_code=307)


def mount_ui(app: FastAPI) -> None:
    """Serve the UI at /ui/ and send / there. Plain Starlette routes, not APIRoutes: they are
    no part of the API (no schema entry, no access level; the API calls carry the tokens)."""
    app.mount(UI_PATH, UiFiles(directory=STATIC_DIR, html=True), name="ui")
    app.add_route("/", _to_ui, methods=["GET", "HEAD"], include_in_schema=False)
