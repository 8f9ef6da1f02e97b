"""The real FastAPI app (create_app) with its runtime, driven in-process by TestClient."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from crowdtrain.compression import SparseDelta
from crowdtrain.protocol.snapshot import decode_snapshot
from crowdtrain.protocol.update import UPDATE_FORMAT, UpdateMeta, encode_update
from crowdtrain.server.app import create_app
from crowdtrain.server.runtime import ServerRuntime
from crowdtrain.settings import ServerSettings

API = "/api/v1"
# every test server accepts this admin token (CROWDTRAIN_ADMIN_TOKEN)
ADMIN_TOKEN = "ct_admin_" + "test" * 10
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
# what every test server sets: the admin token, and room for the many nodes tests register
TEST_SECURITY = {"admin_token": ADMIN_TOKEN, "max_registrations_per_min": 100_000}
# one counter for every node's updates: each body gets a higher seq than any built before it
_SEQ = itertools.count(1)


def next_seq() -> int:
    return next(_SEQ)


class Server:
    """One running app: its client, its runtime (read-only here) and the calls tests repeat."""

    def __init__(self, client: TestClient, runtime: ServerRuntime):
        self.client = client
        self.runtime = runtime
        self._node_headers: dict[str, dict[str, str]] = {}
        self._enrollment: str | None = None

    def get(self, path: str, **kwargs):
        """GET as the admin (unless the call gives its own Authorization)."""
        headers = {**ADMIN, **kwargs.pop("headers", {})}
        return self.client.get(API + path, headers=headers, **kwargs)

    def enrollment_token(self, uses: int | None = None, expires: str | None = None) -> str:
        body = {"role": "node", "uses": uses, "expires": expires}
        response = self.client.post(API + "/tokens", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        return response.json()["token"]

    def register(self, name: str, token: str | None = None) -> dict:
        """Register a node; its credentials (node_id, access_token, refresh_token, ...)."""
        if token is None:
            self._enrollment = self._enrollment or self.enrollment_token()
            token = self._enrollment
        response = self.client.post(
            API + "/nodes/register", json={"enrollment_token": token, "name": name}
        )
        assert response.status_code == 201, response.text
        return response.json()

    def as_node(self, name: str) -> dict[str, str]:
        """Headers that make a request node `name`'s (registered on first use)."""
        if name not in self._node_headers:
            credentials = self.register(name)
            assert credentials["node_id"] == name, "a test node name was registered twice"
            self._node_headers[name] = {"Authorization": f"Bearer {credentials['access_token']}"}
        return self._node_headers[name]

    def post_update(self, body, node: str | None = "node-a", content_encoding="zstd", **kwargs):
        headers = dict(kwargs.pop("headers", {}))
        if node is not None:
            headers.update(self.as_node(node))
        if content_encoding is not None:
            headers["Content-Encoding"] = content_encoding
        return self.client.post(API + "/updates", content=body, headers=headers, **kwargs)

    def info(self) -> dict:
        response = self.get("/info")
        assert response.status_code == 200
        return response.json()

    def version(self) -> tuple[int, str]:
        body = self.get("/model/version").json()
        return body["version"], body["lineage"]

    def wait_past(self, version: int, timeout: float = 10.0) -> int:
        """Long-poll /model/version until it passes `version` (fails after `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get("/model/version", params={"after": version, "wait": 5}).json()
            if body["version"] > version:
                self._wait_for_round_record(body["version"], deadline)
                return body["version"]
        raise AssertionError(f"the server did not pass version {version} in {timeout} s")

    def _wait_for_round_record(self, version: int, deadline: float) -> None:
        """The round's record lands after the version bump (with the totals); wait for it so
        that state read next is settled."""
        while time.monotonic() < deadline:
            rounds = self.get("/history", params={"since": version - 1}).json()["rounds"]
            if any(r["version"] == version for r in rounds):
                return
            time.sleep(0.01)
        raise AssertionError(f"no history record for version {version}")

    def snapshot_bytes(self, dtype: str = "fp32") -> bytes:
        response = self.get(
            "/model/snapshot", params={"dtype": dtype}, headers={"Accept-Encoding": "identity"}
        )
        assert response.status_code == 200 and "content-encoding" not in response.headers
        return response.content

    def snapshot_params(self) -> tuple[int, dict[str, torch.Tensor]]:
        params, meta = decode_snapshot(self.snapshot_bytes(), self.runtime.manifest)
        return meta["version"], params

    def node(self, node_id: str) -> dict | None:
        return next((n for n in self.info()["nodes"] if n["node_id"] == node_id), None)

    def update_body(
        self,
        base_version: int | None = None,
        lineage: str | None = None,
        seed: int = 0,
        content_encoding: str = "zstd",
        **meta_changes,
    ) -> bytes:
        """A valid update (sparse fp16 for two parameters, dense for one) for the current
        version and lineage unless told otherwise."""
        current, current_lineage = self.version()
        g = torch.Generator().manual_seed(seed)
        deltas = {}
        for i, spec in enumerate(self.runtime.manifest.params[:3]):
            if i == 2:
                deltas[spec.name] = SparseDelta(None, torch.randn(spec.shape, generator=g).half())
                continue
            k = max(1, spec.numel // 100)
            indices = torch.randperm(spec.numel, generator=g)[:k].sort().values
            values = torch.randn(k, generator=g).half()
            deltas[spec.name] = SparseDelta(indices.to(torch.int32), values)
        fields = dict(
            format=UPDATE_FORMAT,
            value_codec="fp16",
            base_version=current if base_version is None else base_version,
            lineage=current_lineage if lineage is None else lineage,
            samples=8,
            tokens=1024,
            loss=5.0,
            seq=next_seq(),
        )
        fields.update(meta_changes)
        # model_construct skips validation, so tests can also build deliberately bad metadata
        return encode_update(deltas, UpdateMeta.model_construct(**fields), content_encoding)


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Iterator[Server]:
    """One app per test module (building the runtime trains a tokenizer). A module may set
    SERVER_SETTINGS, a dict of ServerSettings overrides."""
    overrides = dict(getattr(request.module, "SERVER_SETTINGS", {}))
    settings = ServerSettings(
        data_dir=tmp_path_factory.mktemp("server-data"),
        model="tiny",
        evaluate=False,
        min_nodes=1,
        **{**TEST_SECURITY, **overrides},
    )
    app = create_app(settings)
    with TestClient(app) as client:
        yield Server(client, app.state.runtime)
