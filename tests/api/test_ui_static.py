"""The web UI's mount (crowdtrain.web): index and vendored files with the right types and
caching, / sends to the UI, everything relative so that a path prefix (root_path) works, the
modules' imports resolve, and the files ship as package data."""

from __future__ import annotations

import re
import sys
from importlib import resources
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from crowdtrain.server.auth import api_routes
from crowdtrain.web import STATIC_DIR, mount_ui

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
VENDORED = {
    "vendor/echarts.min.js": "text/javascript",
    "vendor/topojson-client.min.js": "text/javascript",
    "vendor/countries-110m.json": "application/json",
}
PAGES = ("dashboard", "nodes", "chat", "models", "data", "admin")


@pytest.fixture(scope="module")
def client() -> TestClient:
    app = FastAPI()
    mount_ui(app)
    return TestClient(app)


def static_files() -> list[Path]:
    return sorted(p for p in STATIC_DIR.rglob("*") if p.is_file())


def test_index_is_served_and_revalidated(client):
    response = client.get("/ui/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert response.headers["cache-control"] == "no-cache"
    assert 'src="app.js"' in response.text and 'data-testid="login-dialog"' in response.text


def test_root_and_bare_ui_redirect_to_the_ui(client):
    response = client.get("/", follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/ui/"
    assert client.get("/ui", follow_redirects=False).headers["location"].endswith("/ui/")
    assert client.get("/").url.path == "/ui/"


@pytest.mark.parametrize("path", ["app.js", "api.js", "ui.js", *[f"pages/{p}.js" for p in PAGES]])
def test_modules_are_javascript_and_revalidated(client, path):
    response = client.get(f"/ui/{path}")
    assert response.status_code == 200
    # browsers refuse an ES module served with any other type
    assert response.headers["content-type"].startswith("text/javascript")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize(("path", "content_type"), VENDORED.items())
def test_vendored_files_are_served_cached(client, path, content_type):
    response = client.get(f"/ui/{path}")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith(content_type)
    assert "max-age=" in response.headers["cache-control"]
    assert len(response.content) > 1000


@pytest.mark.parametrize("name", ["echarts", "topojson-client", "world-atlas"])
def test_vendored_files_keep_their_licenses(name):
    assert (STATIC_DIR / "vendor" / f"{name}.LICENSE").stat().st_size > 100


def test_unknown_file_is_a_json_404(client):
    response = client.get("/ui/no-such-file.js")
    assert response.status_code == 404


def test_works_under_a_path_prefix():
    """Behind a proxy at /crowd, the redirect and the files carry the prefix."""
    app = FastAPI()
    mount_ui(app)
    prefixed = TestClient(app, root_path="/crowd")
    response = prefixed.get("/", follow_redirects=False)
    assert response.headers["location"] == "/crowd/ui/"
    assert prefixed.get("/crowd/ui/").status_code == 200
    assert prefixed.get("/crowd/ui/pages/chat.js").status_code == 200


def test_urls_are_relative():
    """No absolute path anywhere in the app's own files: a prefix would break it."""
    index = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r'(src|href)="/', index)
    for path in [*STATIC_DIR.glob("*.js"), *STATIC_DIR.glob("pages/*.js")]:
        text = path.read_text()
        assert '"/api' not in text and "'/api" not in text and "`/api" not in text, path.name
        assert 'fetch("/' not in text, path.name


def test_module_imports_resolve():
    """Every relative import of every module names a file that exists (no build step checks it)."""
    for path in [*STATIC_DIR.glob("*.js"), *STATIC_DIR.glob("pages/*.js")]:
        for target in re.findall(r'(?:from|import\()\s*"(\.{1,2}/[^"]+)"', path.read_text()):
            assert (path.parent / target).resolve().is_file(), f"{path.name} imports {target}"


def test_every_test_id_in_use_is_documented():
    """app.js lists the data-testid values browser tests may rely on."""
    documented = (STATIC_DIR / "app.js").read_text().split("import ")[0]
    for prefix, names in re.findall(r"([a-z-]+)\{([a-z,-]+)\}", documented):  # nav-{a,b}
        documented += " " + " ".join(prefix + name for name in names.split(","))
    code = "\n".join(
        p.read_text() for p in [STATIC_DIR / "index.html", *STATIC_DIR.glob("pages/*.js")]
    )
    for testid in re.findall(r'testid(?:=|: )"([a-z0-9-]+)"', code):
        assert testid in documented, f"data-testid {testid} is not listed at the top of app.js"


def test_package_data_ships_every_static_file():
    """pyproject's package-data globs cover each file, so `pip install .` has the UI."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    globs = config["tool"]["setuptools"]["package-data"]["crowdtrain"]
    package = ROOT / "src" / "crowdtrain"
    shipped = {p for pattern in globs for p in package.glob(pattern)}
    missing = [str(p.relative_to(package)) for p in static_files() if p not in shipped]
    assert not missing, f"add to [tool.setuptools.package-data]: {missing}"


def test_installed_package_holds_the_ui():
    static = resources.files("crowdtrain.web") / "static"
    assert (static / "index.html").is_file()
    assert (static / "vendor" / "echarts.min.js").is_file()


def test_the_server_app_mounts_the_ui_outside_the_api(server):
    """The real app serves the UI, and the mount adds no APIRoute (the authorization matrix
    walks those) and nothing to the OpenAPI schema."""
    client = server.client
    assert client.get("/", follow_redirects=False).headers["location"] == "/ui/"
    assert client.get("/ui/").status_code == 200
    assert not [r for r in api_routes(client.app.routes) if r.path.startswith("/ui")]
    assert not [p for p in client.get("/openapi.json").json()["paths"] if p in ("/", "/ui")]
