"""One training swarm and one headless Chromium (Debian's, driven by Playwright) for the
browser tests of the web UI."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from crowdtrain.demo import Swarm, free_port, wait_until_up

CHROMIUM = Path("/usr/bin/chromium")
# headless as root; the background-networking flags keep Chromium off a closed network
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# where the UI keeps the admin token it sends as `Authorization: Bearer` (see app.js)
TOKEN_STORAGE_KEY = "crowdtrain.token"


class LiveSwarm:
    """A real server and one node process training `tiny` on 127.0.0.1."""

    def __init__(self, root: Path):
        self.root = root
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.swarm = Swarm(root / "logs")
        self.url = f"http://127.0.0.1:{free_port()}"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "server-data" / "checkpoints"

    @property
    def admin_token(self) -> str:
        return self.swarm.admin_token

    def start(self) -> None:
        # a round per update, an evaluation every 5 versions (the charts move every second) and
        # every 10th version kept as a checkpoint (the models page offers them)
        env = {
            "CROWDTRAIN_EVAL_EVERY": "5",
            "CROWDTRAIN_MIN_NODES": "1",
            "CROWDTRAIN_CHECKPOINT_EVERY": "10",
            "CROWDTRAIN_KEEP_CHECKPOINTS": "100",
        }
        port = int(self.url.rsplit(":", 1)[1])
        self.swarm.start_server(port, self.root / "server-data", "tiny", env)
        wait_until_up(self.url, self.swarm.server, timeout=120)
        node_env = {"CROWDTRAIN_NODE_CACHE_DIR": str(self.root / "node-cache")}
        self.swarm.start_node(0, self.url, 0.25, 1, (), node_env)

    def stop(self) -> None:
        self.swarm.stop_nodes(timeout=20)
        self.swarm.stop_server(timeout=30)

    def get(self, path: str, **params) -> dict:
        """GET an API path as the admin; the JSON answer."""
        response = httpx.get(
            f"{self.url}/api/v1{path}", params=params, timeout=30, headers=self.swarm.admin
        )
        response.raise_for_status()
        return response.json()

    def version(self) -> int:
        return self.get("/info")["version"]

    def wait_for(self, predicate: Callable, timeout: float, what: str):
        """The first truthy value of `predicate()`, polled until `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.root / "logs").glob("*.log"))
        )


# module scope (the browser tests are one module): a swarm left training would take both cores
# away from every test that runs after these
@pytest.fixture(scope="module")
def swarm(tmp_path_factory) -> Iterator[LiveSwarm]:
    live = LiveSwarm(tmp_path_factory.mktemp("browser-swarm"))
    try:
        live.start()
        live.wait_for(lambda: live.version() >= 3, 120, "the swarm's first versions")
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.fail(
            f"the browser tests need Debian's Chromium at {CHROMIUM}: install it with "
            "`apt-get install -y chromium` (as root; .ci/run does this)",
            pytrace=False,
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def open_page(browser, swarm):
    """`open_page(path, viewport=None, login=True)`: a fresh page of the UI at `path`,
    signed in as the swarm's admin; `page.js_errors` collects uncaught script errors."""
    contexts = []

    def open_(path: str = "/ui/", viewport: dict | None = None, login: bool = True):
        viewport = viewport or {"width": 1440, "height": 900}
        context = browser.new_context(viewport=viewport, accept_downloads=True)
        contexts.append(context)
        if login:
            context.add_init_script(
                f"localStorage.setItem({TOKEN_STORAGE_KEY!r}, {swarm.admin_token!r})"
            )
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.js_errors = []
        page.on("pageerror", lambda error: page.js_errors.append(str(error)))
        page.goto(swarm.url + path)
        return page

    yield open_
    for context in contexts:
        context.close()
