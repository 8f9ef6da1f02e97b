"""Real server and node processes on 127.0.0.1 for end-to-end tests."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from crowdtrain.demo import Swarm, free_port, wait_until_up


class E2E:
    """A swarm under test: start processes, read the server's API, always clean up."""

    def __init__(self, root: Path):
        self.root = root
        self.data_dir = root / "server-data"
        (root / "logs").mkdir(parents=True, exist_ok=True)
        self.swarm = Swarm(root / "logs")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server_env: dict[str, str] = {}

    def start_server(self, **settings) -> None:
        self.server_env.update({f"CROWDTRAIN_{k.upper()}": str(v) for k, v in settings.items()})
        self.swarm.start_server(self.port, self.data_dir, "tiny", self.server_env)
        wait_until_up(self.url, self.swarm.server, timeout=120)

    def start_nodes(self, count: int, *args: str, density: float | None = 0.25, **env: str) -> None:
        """Node processes; `env` sets CROWDTRAIN_NODE_* settings (density_warmup="0", ...)."""
        env = {"cache_dir": str(self.root / "node-cache"), **env}  # not the user's ~/.cache
        node_env = {f"CROWDTRAIN_NODE_{k.upper()}": str(v) for k, v in env.items()}
        for _ in range(count):
            self.swarm.start_node(len(self.swarm.nodes), self.url, density, 1, args, node_env)

    @property
    def admin(self) -> dict[str, str]:
        """Headers of the server's admin (the swarm's CROWDTRAIN_ADMIN_TOKEN)."""
        return self.swarm.admin

    def enrollment_token(self) -> str:
        """The swarm's enrollment token for this server (what its nodes register with)."""
        return self.swarm.enrollment_token(self.url)

    def get(self, path: str, **params) -> dict:
        """GET an API path as the admin; the JSON answer."""
        return httpx.get(
            f"{self.url}/api/v1{path}", params=params, timeout=60, headers=self.admin
        ).json()

    def wait_for(self, predicate, timeout: float, what: str):
        """The first truthy value of `predicate()`, polled until `timeout` seconds pass."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}\n{self.logs()}")

    def first_and_final_evaluation(self, final: int) -> tuple[dict, dict]:
        """The Evaluator's records of version 0 and of `final` (waiting for the latter)."""
        evals = self.wait_for(
            lambda: (
                [e for e in self.get("/history")["evals"] if e["version"] == final]
                and self.get("/history")["evals"]
            ),
            30,
            f"the evaluation of version {final}",
        )
        return evals[0], evals[-1]

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.root / "logs").glob("*.log"))
        )


@pytest.fixture
def e2e(tmp_path):
    harness = E2E(tmp_path)
    try:
        yield harness
    finally:
        harness.swarm.stop_nodes(timeout=20)
        harness.swarm.stop_server(timeout=30)
